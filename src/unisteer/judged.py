"""Judged generation: steered answers to a dataset's held-out prompts, rated by an LLM judge per multiplier.

The one implementation behind the `judge:` stage of `unisteer run` and the `unisteer judge` command:

    prompts = judge_prompts(data, "test", limit)          # open-ended test prompts, never train/dev items
    record = judge_update(model, tokenizer, update, prompts, multipliers, config, rubric=..., out_dir=..., ...)

`judge_update` generates greedily with `generation.generate_steered` into `out_dir/<name>/generations.jsonl`
(resumable), judges with `evaluation.judging.judge_generations` (replies cached in `out_dir/responses.jsonl`,
so a rerun sends no request twice), and writes `out_dir/<name>.json`: per multiplier the mean rating of each
metric with a bootstrap interval over items (`analysis.logodds.aggregate`), plus the judge's settings. The
full judge report (prompts, raw replies) goes to `out_dir/<name>/judged.json`.

The API key is read from the environment variable the config names (`api_key_env`); only that name is ever
written anywhere.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, DataError
from .files import read_json, write_json

AUTO_RUBRIC = "auto"
AXBENCH_RUBRIC = "axbench"  # three 0–2 ratings (concept, instruction, fluency) and their harmonic mean
SPLITS = ("test", "dev")  # held-out parts only: judging training prompts would measure memorisation
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
N_BOOT = 1000


@dataclass
class JudgeRunConfig:
    """The `judge:` section of a run config (absent: no judging). Rates steered answers to the test prompts.

    base_url / model: the OpenAI-compatible endpoint (e.g. a local vLLM at http://127.0.0.1:8000/v1) and its
    model; None takes UNISTEER_JUDGE_BASE_URL / UNISTEER_JUDGE_MODEL (then OpenAI's API and gpt-4.1-mini).
    api_key_env: the NAME of the environment variable that holds the key (never the key itself); None: none,
    or UNISTEER_JUDGE_API_KEY / OPENAI_API_KEY when set.
    rubric: "auto" (power_seeking for power-seeking data, axbench for axbench/* data), "axbench", or a
    registered rubric name (`unisteer.evaluation.rubrics.RUBRICS`). concept: the concept for rubrics that
    need one when the prompts do not carry it.
    multipliers: None = m = 0 and the +m / −m each cell chose on dev (else a 5-point grid of its form).
    """

    base_url: str | None = None
    model: str | None = None
    api_key_env: str | None = None
    rubric: str = AUTO_RUBRIC
    concept: str | None = None
    multipliers: list[float] | None = None
    max_prompts: int | None = 32
    max_new_tokens: int = 128
    concurrency: int = 8
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.api_key_env is not None and (not isinstance(self.api_key_env, str)
                                             or not _ENV_NAME.match(self.api_key_env)):
            # The value is not echoed: someone who wrote the key itself here must not see it in a log.
            raise ConfigError("judge.api_key_env: expected the name of an environment variable that holds the "
                              "judge's API key (e.g. OPENAI_API_KEY), not the key itself")
        known = _known_rubrics()
        if self.rubric not in known:
            raise ConfigError(f"judge.rubric: {self.rubric!r} is not one of {known}")
        for name in ("max_prompts", "max_new_tokens", "concurrency"):
            value = getattr(self, name)
            if value is None and name == "max_prompts":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"judge.{name}: expected a positive integer, got {value!r}")
        if self.multipliers is not None:
            if not isinstance(self.multipliers, list) or not self.multipliers or not all(
                    isinstance(m, int | float) and not isinstance(m, bool) for m in self.multipliers):
                raise ConfigError(f"judge.multipliers: expected a non-empty list of numbers, got {self.multipliers!r}")
            self.multipliers = [float(m) for m in self.multipliers]

    def api_key(self, env: Mapping[str, str] | None = None) -> str | None:
        """The key from the named environment variable; a ConfigError naming the field when it is unset."""
        if self.api_key_env is None:
            return None
        env = os.environ if env is None else env
        key = env.get(self.api_key_env)
        if not key:
            raise ConfigError(f"judge.api_key_env: the environment variable {self.api_key_env} is not set; export "
                              "it with the judge's API key (or leave api_key_env out for a keyless local server)")
        return key

    def judge_config(self, cache_path: Path, *, progress: bool, env: Mapping[str, str] | None = None):
        """The client settings (`evaluation.judge.JudgeConfig`), the key taken from the environment now."""
        from .evaluation.judge import JudgeConfig

        return JudgeConfig(base_url=self.base_url, model=self.model, api_key=self.api_key(env),
                           concurrency=self.concurrency, timeout_s=self.timeout_s, cache_path=str(cache_path),
                           progress=progress).resolved(env)


def _known_rubrics() -> list[str]:
    from .evaluation.rubrics import RUBRICS

    return [AUTO_RUBRIC, AXBENCH_RUBRIC, *sorted(RUBRICS)]


def resolve_rubric(rubric: str, data_name: str) -> str:
    """The rubric `auto` stands for on `data_name` (power-seeking data: power_seeking; axbench/*: axbench)."""
    if rubric not in _known_rubrics():
        raise ConfigError(f"judge.rubric: {rubric!r} is not one of {_known_rubrics()}")
    if rubric != AUTO_RUBRIC:
        return rubric
    if data_name.startswith("axbench/"):
        return AXBENCH_RUBRIC
    if "power-seeking" in data_name or "power_seeking" in data_name:
        return "power_seeking"
    raise ConfigError(f"judge.rubric: 'auto' knows power-seeking and axbench/* data, not {data_name!r}; name a "
                      f"rubric, one of {_known_rubrics()[1:]}")


def judge_prompts(data: Any, split: str = "test", limit: int | None = None) -> list[Any]:
    """The held-out prompts of `split` (test or dev) to generate from, at most `limit`.

    The dataset's open-ended prompts where it has them (BiPO test questions, AxBench's held-out instructions,
    CAA's open-ended test), else the prompts of the pairs in that part of the run's one seeded split.
    """
    from .data.builtin import EvalPrompt

    if split not in SPLITS:
        raise ConfigError(f"judge split: expected one of {SPLITS} (held-out parts only), got {split!r}")
    prompts = list(data.open_prompts.get(split) or [])
    if not prompts:
        prompts = [EvalPrompt(p.prompt, dict(p.meta)) for p in data.splits[split]]
    if not prompts:
        raise DataError(f"{data.name}: no {split} prompts to judge (the {split} part is empty)")
    return prompts[:limit] if limit is not None else prompts


def small_grid(form: str | None) -> list[float]:
    """Five multipliers of a form's default grid (ends, quarter points, 0); [0] for the plain model."""
    from .engine.updates import default_grid

    if form is None:
        return [0.0]
    grid = sorted(default_grid(form))
    n = len(grid) - 1
    return sorted({0.0, *(grid[round(n * q)] for q in (0, 0.25, 0.75, 1))})


def chosen_multipliers(evaluation: Mapping[str, Any] | None, form: str) -> tuple[list[float], str]:
    """m = 0 and the +m / −m chosen on dev (a choice evaluation's record), else `small_grid(form)`."""
    chosen = [side["multiplier"] for side in ((evaluation or {}).get(k) for k in ("toward", "away")) if side]
    if not chosen:
        return small_grid(form), "default grid"
    return sorted({0.0, *(float(m) for m in chosen)}), "0 and the +m / -m chosen on dev"


def judge_update(model: Any, tokenizer: Any, update: Any, prompts: Sequence[Any], multipliers: Sequence[float],
                 config: JudgeRunConfig, *, rubric: str, out_dir: Path, name: str, recipe: Any = None,
                 rendering: Any = None, split: str = "test", multiplier_source: str = "given", progress: bool = True,
                 env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Generate at `multipliers`, judge, write `out_dir/<name>.json` (returned) and the full report.

    The prompts are rendered by the resolved `recipe`'s encoder (the run's); a direct caller may give a
    `rendering` instead (neither: `generate_steered`'s default)."""
    from .evaluation.judge import Judge
    from .evaluation.judging import judge_generations
    from .generation.generate import generate_steered
    from .generation.sampling import SamplingConfig

    if rubric == AUTO_RUBRIC:
        raise ConfigError("judge.rubric: resolve 'auto' with resolve_rubric(rubric, data name) first")
    _check_concept(rubric, prompts, config.concept)
    judge_config = config.judge_config(out_dir / "responses.jsonl", progress=progress, env=env)
    if recipe is not None and rendering is not None:
        raise ConfigError("judge_update: give the recipe or a rendering, not both")
    if recipe is None and rendering is not None:
        from .recipe import Recipe

        recipe = Recipe(rendering=rendering, layer=None, seed=None)
    encoder = recipe.encoder(tokenizer) if recipe is not None else None
    generations = generate_steered(model, tokenizer, list(prompts), update, list(multipliers),
                                   SamplingConfig(max_new_tokens=config.max_new_tokens),
                                   out_dir / name / "generations.jsonl", encoder=encoder, progress=progress)
    with Judge(judge_config) as judge:
        scores = judge_generations(generations, judge, rubric, concept=config.concept, desc=f"judge {name}")
    write_json(out_dir / name / "judged.json", scores.to_dict())
    record = {"cell": name, "rubric": scores.rubric, "split": split, "n_prompts": len(prompts),
              "multipliers": scores.multipliers, "multiplier_source": multiplier_source,
              "scale": _scale(scores.rubric), "rows": _rows(scores),
              "judge": {"model": judge_config.model, "base_url": judge_config.base_url,
                        "temperature": judge_config.temperature, "seed": judge_config.seed,
                        "api_key_env": config.api_key_env},
              "generation": {"max_new_tokens": config.max_new_tokens, "greedy": True,
                             "file": str(Path(name) / "generations.jsonl")},
              "interval": f"95 % percentile bootstrap over items ({N_BOOT} resamples)"}
    write_json(out_dir / f"{name}.json", record)
    return record


def _check_concept(rubric: str, prompts: Sequence[Any], concept: str | None) -> None:
    """Fail before generating when the rubric needs a concept that neither the config nor the prompts give."""
    from .evaluation.rubrics import get_rubric

    needs = rubric == AXBENCH_RUBRIC or "concept" in get_rubric(rubric).fields
    if needs and concept is None and not all("concept" in getattr(p, "meta", {}) for p in prompts):
        raise ConfigError(f"judge.concept: rubric {rubric!r} rates a concept, and the prompts do not name one; "
                          "set judge.concept (--concept)")


def _scale(rubric: str) -> list[int]:
    from .evaluation.rubrics import AXBENCH_CONCEPT, get_rubric

    found = AXBENCH_CONCEPT if rubric == AXBENCH_RUBRIC else get_rubric(rubric)
    return [found.min_score, found.max_score]


def _rows(scores: Any) -> list[dict[str, Any]]:
    """Per multiplier: every metric's mean with its bootstrap interval, and the unparsable/failed counts."""
    from .analysis.logodds import aggregate

    rows = []
    for j, m in enumerate(scores.multipliers):
        statuses = scores.statuses[j]
        row: dict[str, Any] = {"multiplier": m, "n": len(statuses), "n_unparsable": statuses.count("unparsable"),
                               "n_failed": statuses.count("failed")}
        for metric, per_m in scores.scores.items():
            agg = aggregate(per_m[j], n_boot=N_BOOT, seed=0)
            row[metric] = {"mean": agg.mean, "ci_low": agg.ci_low, "ci_high": agg.ci_high, "sem": agg.sem}
        rows.append(row)
    return rows


def read_judged(path: Path, *, rubric: str, multipliers: Sequence[float]) -> dict[str, Any] | None:
    """A finished `<name>.json` when it holds this rubric at these multipliers (a rerun skips it), else None."""
    if not path.is_file():
        return None
    record = read_json(path)
    same = record.get("rubric") == rubric and [float(m) for m in record.get("multipliers", [])] == sorted(
        float(m) for m in multipliers)
    return record if same else None


def primary_metric(record: Mapping[str, Any]) -> str:
    """The one number per multiplier a table shows: AxBench's harmonic mean, else the rubric's score."""
    return "harmonic" if record.get("rubric") == AXBENCH_RUBRIC else "score"


def summary_entry(record: Mapping[str, Any]) -> dict[str, Any]:
    """What a cell's row in summary.json keeps of its judge record (means and intervals per m)."""
    return {"rubric": record["rubric"], "scale": record["scale"], "metric": primary_metric(record),
            "multiplier_source": record.get("multiplier_source"), "judge_model": record["judge"]["model"],
            "rows": record["rows"]}


def judge_table(summary: Mapping[str, Any]) -> tuple[str, list[str], list[list[str]]] | None:
    """(caption, header, rows) of the judge's mean rating per cell and multiplier; None if nothing was judged."""
    judged = [row for row in summary.get("rows", []) if row.get("judge")]
    if not judged:
        return None
    first = judged[0]["judge"]
    low, high = first["scale"]
    caption = (f"LLM judge ({first['judge_model']}, rubric {first['rubric']}, {first['metric']} on {low}–{high}) "
               "on steered answers to the held-out test prompts; 95 % bootstrap intervals over prompts.")
    header = ["cell", "m", "mean", "95 % CI", "n", "unparsable", "failed"]
    rows = []
    for row in judged:
        entry = row["judge"]
        for r in entry["rows"]:
            value = r[entry["metric"]]
            ci = "–" if value["ci_low"] is None else f"[{value['ci_low']:.2f}, {value['ci_high']:.2f}]"
            rows.append([row["cell"], f"{r['multiplier']:g}", f"{value['mean']:.2f}", ci, str(r["n"]),
                         str(r["n_unparsable"]), str(r["n_failed"])])
    return caption, header, rows


def judge_report_lines(summary: Mapping[str, Any]) -> list[str]:
    """Markdown lines of `judge_table` for summary.md ([] if no judging)."""
    table = judge_table(summary)
    if table is None:
        return []
    caption, header, rows = table
    return [caption, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


__all__ = ["JudgeRunConfig", "chosen_multipliers", "judge_prompts", "judge_report_lines", "judge_table", "judge_update",
           "read_judged", "resolve_rubric", "small_grid", "summary_entry"]
