"""`unisteer run CONFIG.yaml`: train → sweep → fit → evaluate → report for a list of cells.

A cell is one (form, objective) trained on the run's dataset at the run's layer. Every cell keeps its
artefacts under `OUT/cells/<name>/` (the update, its training log); the sweep, fits and sweep report of all
cells live under `OUT/sweep/`; `OUT/eval/` holds the choice evaluations; `OUT/report.html` (and `.md`) opens
with the headline; `OUT/summary.json` / `summary.md` hold the Table-3-shaped comparison. Each stage skips
work whose result is already on disk, and a training stage that was interrupted continues from its last
checkpoint (or restarts, if it had none), so rerunning the same command resumes an interrupted run.

The split, the layer and the rendering are decided once per run (`workflow`) and used by every stage.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import from_dict
from .engine.updates import FORMS
from .errors import ConfigError, UnisteerError
from .files import read_json, read_yaml, write_json, write_text
from .training.objectives import OBJECTIVES


@dataclass
class CellConfig:
    """One trained update: `objective` ∈ diffmean/split/sft/reps/dpo, `form` ∈ vector/lora/local_weight.

    `train` overrides the objective's preset for this cell only (keys of `TrainConfig`).
    """

    form: str
    objective: str
    name: str = ""
    train: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise ConfigError(f"cells[].form: {self.form!r} is not one of {FORMS}")
        known = ("diffmean", *OBJECTIVES)
        if self.objective not in known:
            raise ConfigError(f"cells[].objective: {self.objective!r} is not one of {known}")
        if self.objective == "diffmean" and self.form != "vector":
            raise ConfigError("cells[]: diffmean is closed-form and exists only as a vector")
        self.name = self.name or f"{self.objective}-{self.form}"


@dataclass
class EvaluationConfig:
    """Choice accuracy (yes/no or A/B from answer log-probs) over a multiplier grid on the dataset's dev and
    test choice items; +m and −m chosen on dev by balanced accuracy, reported on test.

    grids: per-form multiplier grids (default: the sweep's default grid of each form).
    """

    enabled: bool = True
    grids: dict[str, list[float]] = field(default_factory=dict)
    max_pairs: int | None = None


@dataclass
class RunConfig:
    data: str
    cells: list[CellConfig]
    model: str = "smollm2-135m-instruct"
    dtype: str = "auto"
    layer: int | str | None = "default"  # an index, or "default": the model's measured layer
    rendering: Any = "auto"  # "auto" (measured), "natural", "reference", or a mapping of Rendering fields
    data_dir: str | None = None
    fields: Any = None
    split: dict[str, Any] | None = None  # fields of the dataset's default split to change
    train: dict[str, Any] = field(default_factory=dict)  # overrides for every cell
    sweep: dict[str, Any] = field(default_factory=dict)  # SweepConfig keys
    sweep_splits: list[str] = field(default_factory=lambda: ["train", "test"])
    sweep_max_pairs: int | None = None
    evaluate: EvaluationConfig = field(default_factory=EvaluationConfig)
    out: str = "results/run"
    seed: int = 42

    def __post_init__(self) -> None:
        self.cells = [c if isinstance(c, CellConfig) else from_dict(CellConfig, c, where=f"cells[{i}]")
                      for i, c in enumerate(self.cells)]
        if not self.cells:
            raise ConfigError("cells: at least one cell is needed")
        names = [c.name for c in self.cells]
        if len(set(names)) != len(names):
            raise ConfigError(f"cells: names must be unique, got {names}")
        if "vanilla" in names:
            raise ConfigError("cells: 'vanilla' names the plain model in the summary; choose another name")
        if isinstance(self.evaluate, dict):
            self.evaluate = from_dict(EvaluationConfig, self.evaluate, where="evaluate")


def load_run_config(path: str | Path) -> RunConfig:
    """Read and validate a run config completely (every section) before anything runs."""
    from .analysis.sweep import SweepConfig
    from .data.rendering import Rendering
    from .training.config import TrainConfig

    path = Path(path)
    raw = read_yaml(path, what="config file")
    config = from_dict(RunConfig, raw or {}, where=str(path))
    from_dict(SweepConfig, config.sweep, where=f"{path}: sweep")
    for cell in config.cells:
        from_dict(TrainConfig, {**config.train, **cell.train}, where=f"{path}: cells[{cell.name}].train")
    if config.rendering != "auto":
        Rendering.parse(config.rendering)
    return config


def run_pipeline(config: RunConfig, *, progress: bool = True) -> Path:
    """Run every stage for every cell; returns the path of the run report (OUT/report.html)."""
    from .analysis.fits import fit_sweep
    from .analysis.report import write_report
    from .analysis.sweep import SweepConfig, run_sweep
    from .data.rendering import PairEncoder
    from .engine.models import load_model
    from .engine.updates import default_grid
    from .run_report import write_run_report
    from .workflow import (
        evaluate_choices,
        first_pairs,
        load_data,
        resolve_layer,
        resolve_rendering,
        train_cell,
    )

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    sweep_config = from_dict(SweepConfig, {**config.sweep, "progress": progress}, where="sweep")
    write_json(out / "config.json", asdict(config))
    model, tokenizer = load_model(config.model, dtype=config.dtype)
    layer = resolve_layer(model, config.layer)
    data = load_data(config.data, data_dir=config.data_dir, fields=config.fields, split=config.split, model=model,
                     tokenizer=tokenizer, cache_dir=out / "cache")
    write_json(out / "data.json", data.record())
    rendering = _run_rendering(out, model, tokenizer, config, data, resolve_rendering)

    updates, timings = {}, {}
    for cell in config.cells:
        trained = train_cell(model, tokenizer, data, objective=cell.objective, form=cell.form, layer=layer,
                             rendering=rendering, out_dir=out / "cells" / cell.name,
                             overrides={**config.train, **cell.train}, seed=config.seed, name=cell.name,
                             progress=progress)
        updates[cell.name], timings[cell.name] = trained.update, trained.seconds

    splits = {name: first_pairs(data.splits[name], config.sweep_max_pairs) for name in config.sweep_splits}
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    settings = {"model": config.model, "dtype": dtype, "layer": layer, "dataset": data.record()}
    encoder = PairEncoder(tokenizer, rendering, max_length=sweep_config.max_length)
    run_sweep(model, tokenizer, updates, splits, sweep_config, out / "sweep", encoder=encoder, settings=settings)
    fits = fit_sweep(out / "sweep")
    sweep_report = write_report(out / "sweep", fits=fits, title=f"unisteer sweep — {config.data}, layer {layer}")

    evaluations: dict[str, dict[str, Any]] = {}
    if config.evaluate.enabled and data.choice_test is not None:
        grids = {c.name: config.evaluate.grids.get(c.form, default_grid(c.form)) for c in config.cells}
        for name, update in [("vanilla", None), *updates.items()]:
            path = out / "eval" / f"{name}.json"
            if not path.exists():
                result = evaluate_choices(model, tokenizer, data, update, grids.get(name, [0.0]),
                                          rendering=rendering, max_pairs=config.evaluate.max_pairs,
                                          progress=progress)
                write_json(path, result.to_dict())
            evaluations[name] = read_json(path)
    summary = _summary(config, dtype, layer, timings, fits, evaluations, sweep_config.variant)
    write_json(out / "summary.json", summary)
    write_text(out / "summary.md", _summary_markdown(summary))
    return write_run_report(out, summary, fits, sweep_report=sweep_report)


def _run_rendering(out: Path, model, tokenizer, config: RunConfig, data, resolve_rendering):
    """The run's rendering, measured once and kept in OUT/rendering.json so a rerun uses the same one."""
    from .data.rendering import Rendering

    path = out / "rendering.json"
    if path.exists():
        record = read_json(path)
        if record.get("requested") == config.rendering:
            return Rendering.parse({k: v for k, v in record["rendering"].items()})
    rendering, record = resolve_rendering(model, tokenizer, config.rendering, data.splits.train)
    write_json(path, {"requested": config.rendering, **record})
    return rendering


# ---------------------------------------------------------------------------------------------- summary


def _summary(config: RunConfig, dtype: str, layer: int, timings, fits, evaluations, variant: str) -> dict[str, Any]:
    rows = []
    vanilla = evaluations.get("vanilla")
    if vanilla is not None:
        rows.append({"cell": "vanilla", "form": "-", "objective": "vanilla",
                     "m0": _score_columns(vanilla["test_rows"][0]),
                     "utility_m0": _utility_at(fits, next(iter(fits.updates), None), 0.0, variant)})
    for cell in config.cells:
        row: dict[str, Any] = {"cell": cell.name, "form": cell.form, "objective": cell.objective,
                               "train_seconds": None if timings[cell.name] is None else round(timings[cell.name], 1)}
        evaluation = evaluations.get(cell.name)
        if evaluation is not None:
            for side in ("toward", "away"):
                chosen = evaluation[side]
                if chosen is None:
                    continue
                row[side] = {"multiplier": chosen["multiplier"], **_score_columns(chosen),
                             "change": chosen["change"], "calibrated": chosen.get("calibrated"),
                             "utility": _utility_at(fits, cell.name, chosen["multiplier"], variant)}
            row["steers"] = _steers(row)
        row["fits"] = _fit_columns(fits.fits.get((cell.name, variant)))
        rows.append(row)
    matched = _matched_utility(config, evaluations, fits, variant)
    return {"model": config.model, "dtype": dtype, "layer": layer, "data": config.data, "variant": variant,
            "rows": rows, "matched_utility": matched}


def _score_columns(row: dict[str, Any]) -> dict[str, Any]:
    keys = ("accuracy", "ci_low", "ci_high", "balanced_accuracy", "balanced_ci", "auc", "auc_ci", "answer_shares",
            "n")
    return {k: row[k] for k in keys if k in row}


def _steers(row: dict[str, Any]) -> dict[str, bool]:
    """Toward: balanced accuracy at +m above m = 0 with a paired interval excluding 0; away: below."""
    out = {}
    for side, sign in (("toward", 1), ("away", -1)):
        change = (row.get(side) or {}).get("change")
        out[side] = bool(change and change["separated"] and sign * change["change"] > 0)
    return out


def _utility_at(fits, update: str | None, m: float, variant: str) -> dict[str, float] | None:
    """Mean test UtilOdds at m (and its CI) from the sweep, when the sweep scored that m on 'test'."""
    if update is None:
        return None
    pair = fits.curves.get((update, "test", variant))
    if pair is None or m not in pair.utility.m:
        return None
    i = int(list(pair.utility.m).index(m))
    return {"mean": float(pair.utility.mean[i]), "ci_low": float(pair.utility.ci_low[i]),
            "ci_high": float(pair.utility.ci_high[i])}


def _matched_utility(config: RunConfig, evaluations, fits, variant: str) -> dict[str, Any] | None:
    """Each cell's best test balanced accuracy at m >= 0 among multipliers whose test utility is at least that of
    the best cell's chosen +m: the comparison "at matched utility"."""
    best, level = None, None
    for cell in config.cells:
        evaluation = evaluations.get(cell.name)
        if not evaluation or not evaluation.get("toward"):
            continue
        if evaluation["toward"]["multiplier"] <= 0:
            continue  # a cell that does not move toward the concept sets no utility level to match
        utility = _utility_at(fits, cell.name, evaluation["toward"]["multiplier"], variant)
        value = evaluation["toward"].get("balanced_accuracy")
        if utility is None or value is None:
            continue
        if best is None or value > best[1]:
            best, level = (cell.name, value), utility["mean"]
    if best is None:
        return None
    by_cell = {}
    for cell in config.cells:
        evaluation = evaluations.get(cell.name)
        if not evaluation:
            continue
        candidates = []
        for row in evaluation["test_rows"]:
            utility = _utility_at(fits, cell.name, row["multiplier"], variant)
            if row["multiplier"] >= 0 and utility is not None and utility["mean"] >= level and \
                    "balanced_accuracy" in row:
                candidates.append((row["balanced_accuracy"], row["multiplier"]))
        if candidates:
            value, m = max(candidates)
            by_cell[cell.name] = {"balanced_accuracy": value, "multiplier": m}
    return {"reference_cell": best[0], "utility_at_least": level, "cells": by_cell}


def _fit_columns(fit) -> dict[str, Any]:
    """R² of the preference / utility fits on each split, whether the fit is determined, utility breakdowns."""
    if fit is None:
        return {}
    columns: dict[str, Any] = {}
    for quantity, by_split in fit.r2.items():
        decay = getattr(fit, quantity)
        for split, r2 in by_split.items():
            columns[f"{quantity[:4]}_r2_{split}"] = r2
        columns[f"{quantity[:4]}_determined"] = decay is not None and not decay.undetermined
    if fit.utility is not None:
        columns["util_breakdown_+"] = fit.utility.breakdown_positive
        columns["util_breakdown_-"] = fit.utility.breakdown_negative
    return columns


def _summary_markdown(summary: dict[str, Any]) -> str:
    from .run_report import table3_rows

    header, rows = table3_rows(summary)
    lines = [f"Model {summary['model']} ({summary['dtype']}), layer {summary['layer']}, data {summary['data']}. "
             "Test scores at the multipliers chosen on dev (balanced accuracy); 95 % intervals in brackets.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


__all__ = ["CellConfig", "EvaluationConfig", "RunConfig", "UnisteerError", "load_run_config", "run_pipeline"]
