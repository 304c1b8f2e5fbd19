"""`unisteer run CONFIG.yaml`: train → sweep → fit → evaluate → report for a list of cells.

A cell is one (form, objective) trained on the run's dataset at the run's layer. Every cell keeps its
artefacts under `OUT/cells/<name>/` (the update, its training log); the sweep, fits and sweep report of all
cells live under `OUT/sweep/`; `OUT/eval/` holds the choice evaluations; `OUT/report.html` (and `.md`) opens
with the headline; `OUT/summary.json` / `summary.md` hold the Table-3-shaped comparison. Each stage skips
work whose result is already on disk, and a training stage that was interrupted continues from its last
checkpoint (or restarts, if it had none), so rerunning the same command resumes an interrupted run.

The run's settings are one `Recipe` (model, dtype, layer, rendering with max_length, split, seed), built from
the YAML once (`Recipe.from_run_config`), resolved against the loaded model and data (`workflow.resolve_recipe`)
and handed to every stage: its encoder is the one every stage trains and scores with.

`executor` says where the stages run. `local` (the default): one process loads the model once and runs every
stage in turn. `ray`: each cell's training, then its sweep and choice evaluation, run as Ray tasks (each loading
the model itself, with `ray.num_cpus_per_cell` / `num_gpus_per_cell`), all writing the same folders of OUT; the
driver then fits, summarises and reports exactly as the local executor does. Both call the same stage functions
(`_load`, `_train_stage`, `_sweep_stage`, `_evaluate_stage`, `_finish`), so resuming works the same and the
summary is the same. On a cluster of several machines OUT must be on storage every node sees at the same path.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import from_dict
from .engine.updates import FORMS
from .errors import ConfigError, UnisteerError
from .files import read_json, read_yaml, write_json, write_text
from .judged import JudgeRunConfig
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


EXECUTORS = ("local", "ray")


@dataclass
class RayConfig:
    """Where and how `executor: ray` runs the cells' tasks.

    address: None starts a local Ray on this machine (all its CPUs); "auto" joins the cluster this machine is
    part of; "ray://HEAD:10001" connects to a remote cluster. Each task asks for `num_cpus_per_cell` CPUs and
    `num_gpus_per_cell` GPUs (fractions allowed, e.g. 0.5 to place two cells on one GPU).
    """

    address: str | None = None
    num_cpus_per_cell: float = 1
    num_gpus_per_cell: float = 0

    def __post_init__(self) -> None:
        if self.address is not None and (not isinstance(self.address, str) or not self.address):
            raise ConfigError(f"ray.address: expected null, 'auto' or 'ray://HOST:PORT', got {self.address!r}")
        for name in ("num_cpus_per_cell", "num_gpus_per_cell"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"ray.{name}: expected a number >= 0, got {value!r}")


@dataclass
class RunConfig:
    data: str
    cells: list[CellConfig]
    model: str = "smollm2-135m-instruct"
    dtype: str = "auto"
    layer: int | str | None = "default"  # an index, or "default": the model's measured layer
    rendering: Any = "auto"  # "auto" (measured), "natural", "reference", or a mapping of Rendering fields
    max_length: int | None = None  # longest sequence in tokens (default 512; train.max_length says the same)
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
    executor: str = "local"  # "local" (this process) or "ray" (cells as Ray tasks; see RayConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    judge: JudgeRunConfig | None = None  # absent: no judged generation (see JudgeRunConfig)

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise ConfigError(f"executor: {self.executor!r} is not one of {EXECUTORS}")
        if isinstance(self.ray, dict):
            self.ray = from_dict(RayConfig, self.ray, where="ray")
        if not isinstance(self.ray, RayConfig):
            raise ConfigError(f"ray: expected a mapping of RayConfig keys, got {self.ray!r}")
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
        if isinstance(self.judge, dict):
            self.judge = from_dict(JudgeRunConfig, self.judge, where="judge")
        if self.judge is not None and not isinstance(self.judge, JudgeRunConfig):
            raise ConfigError(f"judge: expected a mapping of JudgeRunConfig keys, got {self.judge!r}")


def load_run_config(path: str | Path) -> RunConfig:
    """Read and validate a run config completely (every section) before anything runs."""
    from .analysis.sweep import SweepConfig
    from .data.pairs import SplitConfig
    from .data.rendering import Rendering
    from .judged import resolve_rubric
    from .recipe import Recipe
    from .training.config import TrainConfig

    path = Path(path)
    raw = read_yaml(path, what="config file")
    config = from_dict(RunConfig, raw or {}, where=str(path))
    from_dict(SweepConfig, config.sweep, where=f"{path}: sweep")
    if config.split is not None:  # each field now, not after the model has loaded
        try:
            from_dict(SplitConfig, config.split, where="split")
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    for cell in config.cells:
        from_dict(TrainConfig, {**config.train, **cell.train}, where=f"{path}: cells[{cell.name}].train")
    if config.rendering != "auto":
        Rendering.parse(config.rendering)
    try:  # the recipe's settings agree wherever they are given (top level, train, sweep, cells)
        Recipe.from_run_config(config)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if config.judge is not None:  # an unknown rubric or an unset key variable fails now, not after training
        resolve_rubric(config.judge.rubric, config.data)
        config.judge.judge_config(Path(config.out) / "judge" / "responses.jsonl", progress=False)
    return config


def run_pipeline(config: RunConfig, *, progress: bool = True) -> Path:
    """Run every stage for every cell; returns the path of the run report (OUT/report.html)."""
    if config.executor == "ray":
        return _run_with_ray(config, progress=progress)
    run = _load(config, progress=progress, prepare=True)
    trained = {cell.name: _train_stage(run, cell) for cell in config.cells}
    updates = {name: t.update for name, t in trained.items()}
    _sweep_stage(run, updates)
    for name, update in [("vanilla", None), *updates.items()]:
        _evaluate_stage(run, name, update)
    for name, update in updates.items():
        _judge_stage(run, name, update)
    return _finish(config, run.prepared, {name: t.seconds for name, t in trained.items()})


# ---------------------------------------------------------------------------------------------- stages
# The one implementation of each stage: the local executor calls them in this process, the Ray executor in
# its tasks. Each skips what is already on disk, which is what makes a rerun resume.


@dataclass(frozen=True)
class Prepared:
    """What the driver needs from the run's preparation: the resolved recipe it reports (layer, dtype, ...),
    whether choice evaluations exist for the dataset."""

    recipe: Any  # the resolved `Recipe`
    evaluates: bool

    @property
    def layer(self) -> int:
        return self.recipe.layer

    @property
    def dtype(self) -> str:
        return self.recipe.dtype


@dataclass
class _Loaded:
    """A stage's working set: the model, the data and the run's resolved recipe (layer, split, rendering with
    max_length, seed), whose encoder every stage uses."""

    config: RunConfig
    out: Path
    model: Any
    tokenizer: Any
    data: Any
    recipe: Any
    sweep_config: Any
    prepared: Prepared
    progress: bool

    @property
    def rendering(self) -> Any:
        return self.recipe.rendering


def _load(config: RunConfig, *, progress: bool, prepare: bool = False) -> _Loaded:
    """Load the model and the run's data. `prepare` (once per run, before any stage): also record the config and
    the dataset; the rendering is measured on the first call and read back from OUT/rendering.json afterwards."""
    from .analysis.sweep import SweepConfig
    from .engine.models import load_model
    from .recipe import Recipe
    from .workflow import load_data, resolve_recipe

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = Recipe.from_run_config(config)
    sweep_config = from_dict(SweepConfig, {**config.sweep, "max_length": recipe.max_length, "progress": progress},
                             where="sweep")
    if prepare:
        write_json(out / "config.json", asdict(config))
    model, tokenizer = load_model(recipe.model, dtype=recipe.dtype)
    data = load_data(config.data, data_dir=config.data_dir, fields=config.fields, split=recipe.split, model=model,
                     tokenizer=tokenizer, cache_dir=out / "cache")
    if prepare:
        write_json(out / "data.json", data.record())
    rendering, record = _run_rendering(out, model, tokenizer, config, data, recipe)
    recipe = resolve_recipe(recipe, model, tokenizer, data, rendering=rendering, rendering_choice=record)
    evaluates = config.evaluate.enabled and data.choice_test is not None
    return _Loaded(config, out, model, tokenizer, data, recipe, sweep_config, Prepared(recipe, evaluates), progress)


def _train_stage(run: _Loaded, cell: CellConfig):
    """Train one cell into OUT/cells/<name>/ (a finished cell is loaded; an interrupted one continues)."""
    from .workflow import train_cell

    config = run.config
    recipe = run.recipe.cell_recipe(cell.train, where=f"cells[{cell.name}].train")
    return train_cell(run.model, run.tokenizer, run.data, objective=cell.objective, form=cell.form, recipe=recipe,
                      out_dir=run.out / "cells" / cell.name, overrides={**config.train, **cell.train},
                      name=cell.name, progress=run.progress)


def _sweep_stage(run: _Loaded, updates: dict[str, Any]) -> None:
    """Sweep `updates` (all cells, or one) into OUT/sweep/ (rows already there are skipped)."""
    from .analysis.sweep import run_sweep
    from .workflow import first_pairs

    config = run.config
    splits = {name: first_pairs(run.data.splits[name], config.sweep_max_pairs) for name in config.sweep_splits}
    settings = {"model": config.model, "dtype": run.prepared.dtype, "layer": run.prepared.layer,
                "dataset": run.data.record(), "recipe": run.recipe.to_dict()}
    run_sweep(run.model, run.tokenizer, updates, splits, run.sweep_config, run.out / "sweep",
              encoder=run.recipe.encoder(run.tokenizer), settings=settings)


def _evaluate_stage(run: _Loaded, name: str, update) -> None:
    """Choice evaluation of one cell's update (or of the plain model, `vanilla`) into OUT/eval/<name>.json."""
    from .engine.updates import default_grid
    from .workflow import evaluate_choices

    config = run.config
    path = run.out / "eval" / f"{name}.json"
    if not run.prepared.evaluates or path.exists():
        return
    form = next((c.form for c in config.cells if c.name == name), None)
    grid = [0.0] if form is None else config.evaluate.grids.get(form, default_grid(form))
    result = evaluate_choices(run.model, run.tokenizer, run.data, update, grid, recipe=run.recipe,
                              max_pairs=config.evaluate.max_pairs, progress=run.progress)
    write_json(path, result.to_dict())


def _judge_stage(run: _Loaded, name: str, update) -> None:
    """Judged generation of one cell on the test prompts into OUT/judge/<name>.json (`judged.judge_update`), at
    judge.multipliers or m = 0 and the +m / −m the cell's choice evaluation chose on dev."""
    from .judged import chosen_multipliers, judge_prompts, judge_update, read_judged, resolve_rubric

    judge = run.config.judge
    if judge is None:
        return
    form = _cell(run.config, name).form
    evaluation_path = run.out / "eval" / f"{name}.json"
    evaluation = read_json(evaluation_path) if evaluation_path.exists() else None
    if judge.multipliers is not None:
        multipliers, source = judge.multipliers, "judge.multipliers"
    else:
        multipliers, source = chosen_multipliers(evaluation, form)
    rubric = resolve_rubric(judge.rubric, run.config.data)
    out_dir = run.out / "judge"
    if read_judged(out_dir / f"{name}.json", rubric=rubric, multipliers=multipliers) is not None:
        return
    judge_update(run.model, run.tokenizer, update, judge_prompts(run.data, "test", judge.max_prompts), multipliers,
                 judge, rubric=rubric, out_dir=out_dir, name=name, recipe=run.recipe,
                 multiplier_source=source, progress=run.progress)


def _finish(config: RunConfig, prepared: Prepared, timings: dict[str, float | None]) -> Path:
    """Fit the sweep, write its report, the summary and the run report (no model needed: files only)."""
    from .analysis.fits import fit_sweep
    from .analysis.report import write_report
    from .analysis.sweep import SweepConfig, order_updates
    from .run_report import write_run_report

    out = Path(config.out)
    variant = from_dict(SweepConfig, config.sweep, where="sweep").variant
    order_updates(out / "sweep", [cell.name for cell in config.cells])
    fits = fit_sweep(out / "sweep")
    sweep_report = write_report(out / "sweep", fits=fits,
                                title=f"unisteer sweep — {config.data}, layer {prepared.layer}")
    evaluations: dict[str, dict[str, Any]] = {}
    if prepared.evaluates:
        for name in ("vanilla", *(cell.name for cell in config.cells)):
            evaluations[name] = read_json(out / "eval" / f"{name}.json")
    summary = run_summary(config, prepared.dtype, prepared.layer, timings, fits, evaluations, variant)
    summary["recipe"] = prepared.recipe.to_dict()
    data_record = read_json(out / "data.json") if (out / "data.json").exists() else {}
    _add_judged(summary, out, open_ended=bool((data_record.get("open_prompts") or {}).get("test")),
                judged=config.judge is not None)
    write_json(out / "summary.json", summary)
    write_text(out / "summary.md", _summary_markdown(summary))
    return write_run_report(out, summary, fits, sweep_report=sweep_report)


# ---------------------------------------------------------------------------------------------- Ray executor
# Task bodies: module-level functions (Ray ships them by reference), each loading the model once for itself.


def _prepare_task(config: RunConfig) -> Prepared:
    return _load(config, progress=False, prepare=True).prepared


def _train_task(config: RunConfig, name: str) -> float | None:
    run = _load(config, progress=False)
    return _train_stage(run, _cell(config, name)).seconds


def _cell_task(config: RunConfig, name: str) -> None:
    """Sweep and evaluate one trained cell (its update is read back from OUT/cells/<name>/update)."""
    run = _load(config, progress=False)
    update = _train_stage(run, _cell(config, name)).update
    _sweep_stage(run, {name: update})
    _evaluate_stage(run, name, update)
    _judge_stage(run, name, update)


def _vanilla_task(config: RunConfig) -> None:
    _evaluate_stage(_load(config, progress=False), "vanilla", None)


def _cell(config: RunConfig, name: str) -> CellConfig:
    return next(cell for cell in config.cells if cell.name == name)


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(f"executor: ray needs Ray, which is not installed ({exc}); install it with "
                          "pip install 'unisteer[ray]'") from None
    return ray


def _run_with_ray(config: RunConfig, *, progress: bool) -> Path:
    """Run the cells as Ray tasks: prepare once, then per cell train → (sweep + evaluate); then `_finish` here."""
    ray = _import_ray()
    if (config.ray.address or "").startswith("ray://"):
        try:  # what ray.init checks, as a ValueError traceback
            import grpc  # noqa: F401
        except ImportError:
            raise ConfigError(f"ray.address {config.ray.address!r}: a ray:// address needs Ray Client, which is "
                              "not installed; install it with pip install 'ray[client]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        if config.ray.address is None:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
        else:
            ray.init(address=config.ray.address)
    try:
        return _ray_cells(ray, config, progress=progress)
    finally:
        if started_here:
            ray.shutdown()


def _ray_cells(ray, config: RunConfig, *, progress: bool) -> Path:
    resources = {"num_cpus": config.ray.num_cpus_per_cell, "num_gpus": config.ray.num_gpus_per_cell}
    prepare, train, sweep, vanilla = (ray.remote(f).options(**resources)
                                      for f in (_prepare_task, _train_task, _cell_task, _vanilla_task))
    began = time.perf_counter()

    def say(message: str) -> None:
        if progress:
            print(f"[ray {time.perf_counter() - began:6.1f} s] {message}", file=sys.stderr, flush=True)

    n = len(config.cells)
    pending: dict[Any, tuple[str, str]] = {}
    try:
        say(f"preparing {config.out} (model, data, rendering)")
        ref = prepare.remote(config)
        pending[ref] = ("prepare", "")
        prepared = _ray_get(ray, ref, pending)
        del pending[ref]
        for cell in config.cells:
            pending[train.remote(config, cell.name)] = ("train", cell.name)
        if prepared.evaluates:
            pending[vanilla.remote(config)] = ("vanilla", "vanilla")
        timings: dict[str, float | None] = {}
        swept = 0
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            stage, name = pending[ref]
            result = _ray_get(ray, ref, pending)
            del pending[ref]
            if stage == "train":
                timings[name] = result
                say(f"cell {name}: trained ({len(timings)}/{n})")
                pending[sweep.remote(config, name)] = ("sweep", name)
            elif stage == "sweep":
                swept += 1
                say(f"cell {name}: swept and evaluated ({swept}/{n})")
            else:
                say("vanilla: evaluated")
    except KeyboardInterrupt:
        _cancel(ray, pending)
        raise
    say("fitting and writing the report")
    return _finish(config, prepared, timings)


def _ray_get(ray, ref, pending: dict[Any, Any]):
    """A task's result; a task's user error is raised as itself (the one-line message), the rest cancelled."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        _cancel(ray, {k: v for k, v in pending.items() if k != ref})
        cause = getattr(exc, "cause", None)
        if isinstance(cause, UnisteerError):
            raise cause from None
        raise


def _cancel(ray, pending: dict[Any, Any]) -> None:
    for ref in pending:
        ray.cancel(ref, force=True)  # a no-op for a task that finished meanwhile


def _run_rendering(out: Path, model, tokenizer, config: RunConfig, data, recipe):
    """The run's rendering and how it was chosen, measured once and kept in OUT/rendering.json so a rerun uses
    the same one."""
    from .data.rendering import Rendering
    from .workflow import resolve_rendering

    # What the config asked for, as written (the recipe takes train.rendering when the top level is unset).
    requested = config.rendering if config.rendering not in (None, "auto") else \
        config.train.get("rendering", config.rendering)
    path = out / "rendering.json"
    if path.exists():
        record = read_json(path)
        if record.get("requested") == requested:
            return Rendering.parse({k: v for k, v in record["rendering"].items()}), record
    rendering, record = resolve_rendering(model, tokenizer, recipe.rendering, data.splits.train,
                                          max_length=recipe.max_length)
    write_json(path, {"requested": requested, **record})
    return rendering, record


# ---------------------------------------------------------------------------------------------- summary


def run_summary(config: RunConfig, dtype: str, layer: int, timings, fits, evaluations, variant: str) -> dict[str, Any]:
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
    matched = _matched_utility(config.cells, evaluations, fits, variant)
    # The paper compares objectives within a form (Table 3 per form): matched utility per form as well.
    by_form = {}
    for form in dict.fromkeys(c.form for c in config.cells):
        within = _matched_utility([c for c in config.cells if c.form == form], evaluations, fits, variant)
        if within is not None and len(within["cells"]) > 1:
            by_form[form] = within
    return {"model": config.model, "dtype": dtype, "layer": layer, "data": config.data, "variant": variant,
            "rows": rows, "matched_utility": matched, "matched_utility_by_form": by_form}


def _add_judged(summary: dict[str, Any], out: Path, *, open_ended: bool, judged: bool) -> None:
    """Each judged cell's per-m ratings as row["judge"]; on open-ended data the choice scores are labelled a
    proxy (A/B questions stand in for the behaviour, which only the judge rates on generated answers)."""
    from .judged import summary_entry

    for row in summary["rows"]:
        path = out / "judge" / f"{row['cell']}.json"
        if judged and row["cell"] != "vanilla" and path.is_file():
            row["judge"] = summary_entry(read_json(path))
    summary["choice_scores"] = "A/B proxy" if open_ended else "choice accuracy"


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


def _matched_utility(cells: list[CellConfig], evaluations, fits, variant: str) -> dict[str, Any] | None:
    """Each cell's best test balanced accuracy at m >= 0 among multipliers whose test utility is at least that of
    the best cell's chosen +m: the comparison "at matched utility"."""
    best, level = None, None
    for cell in cells:
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
    for cell in cells:
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
    from .judged import judge_report_lines
    from .run_report import table3_rows

    header, rows = table3_rows(summary)
    proxy = " (A/B proxy: choice questions standing in for open-ended behaviour)" \
        if summary.get("choice_scores") == "A/B proxy" else ""
    lines = [f"Model {summary['model']} ({summary['dtype']}), layer {summary['layer']}, data {summary['data']}. "
             f"Test scores at the multipliers chosen on dev (balanced accuracy){proxy}; 95 % intervals in brackets.",
             "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    judged = judge_report_lines(summary)
    lines += ["", *judged] if judged else []
    return "\n".join(lines) + "\n"


__all__ = ["CellConfig", "EvaluationConfig", "RayConfig", "RunConfig", "UnisteerError", "load_run_config", "run_pipeline"]
