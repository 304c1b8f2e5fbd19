"""The whole method from Python: data, training, sweeps, fits, evaluation, Table 3 and generation.

    import unisteer as us
    model, tokenizer = us.load_model("smollm2-135m-instruct")
    data = us.load_dataset("persona/psychopathy", split={"train": 64})
    trained = us.train(model, tokenizer, data, objective="split", form="vector", out="runs/split", epochs=1)
    swept = us.sweep(model, tokenizer, [trained], data, out="runs/sweep", grid=[-8, -4, 0, 4, 8])
    fits = us.fit(swept)                       # .plot() → a matplotlib Figure, .to_pandas() → the curves
    plain = us.evaluate(model, tokenizer, data)                   # the plain model (m = 0)
    steered = us.evaluate(model, tokenizer, data, trained)        # ±m chosen on dev, reported on test
    us.table3(fits, {"vanilla": plain, trained.name: steered})    # the Table-3 row, with intervals
    us.generate(model, tokenizer, ["Is lying fine?"], trained, [-8, 0, 8]).table()

Every function here is the step the CLI and `unisteer run` run (`workflow.load_data`, `workflow.train_cell`,
`analysis.sweep.run_sweep`, `analysis.fits.fit_sweep`, `workflow.evaluate_choices`, the run summary of
`pipeline`, `generation.generate_steered`): the same files are written, the same folders resume, the same
`UnisteerError`s are raised. Results are typed objects with `to_pandas()` (pandas, installed with unisteer),
`plot()` (a `matplotlib.figure.Figure`, drawn without pyplot), `save(path)` / `Cls.load(path)` (JSON, never
pickle; `load` also reads what the CLI and `unisteer run` wrote) and a readable `repr` / `_repr_html_`.
"""

from __future__ import annotations

import functools
import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .errors import ConfigError, DataError, UnisteerError

FORMAT = "unisteer.api/1"


# ---------------------------------------------------------------------------------------------- base


def _pandas():
    try:
        import pandas
    except ImportError as exc:  # pragma: no cover - pandas is a dependency; kept for slim installs
        raise UnisteerError(f"to_pandas() needs pandas ({exc}); install it with pip install 'unisteer[notebook]'"
                            ) from None
    return pandas


def _figure(rows: int = 1, cols: int = 1, *, size: tuple[float, float] = (6.4, 4.4)):
    """A Figure on the Agg canvas (no pyplot: a notebook keeps its own backend); returns (fig, axes[rows][cols])."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _cell_html(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return html.escape("" if value is None else str(value))


def _html_table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, limit: int = 40) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell_html(v)}</td>" for v in row) + "</tr>" for row in rows[:limit])
    more = f"<p>… {len(rows) - limit} more rows (to_pandas() has all)</p>" if len(rows) > limit else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{more}"


class _Result:
    """Shared behaviour: JSON save/load, repr, HTML repr. Subclasses define `kind`, `to_dict`, `_from_dict`."""

    kind: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def _from_dict(cls, data: dict[str, Any], path: Path):  # pragma: no cover - abstract
        raise NotImplementedError

    def save(self, path: str | Path) -> Path:
        """Write this result as JSON (atomically); `type(self).load(path)` reads it back."""
        from .files import write_json

        path = Path(path)
        write_json(path, {"format": FORMAT, "kind": self.kind, **self.to_dict()})
        return path

    @classmethod
    def load(cls, path: str | Path):
        """Read a result written by `save` (see each class for the CLI / `unisteer run` files it also reads)."""
        from .files import read_json

        path = Path(path)
        if not path.exists():
            raise DataError(f"{path}: no such file or folder")
        data = read_json(path)
        if data.get("format") == FORMAT and data.get("kind") != cls.kind:
            raise DataError(f"{path}: holds a {data.get('kind')!r} result, not {cls.kind!r}")
        return cls._from_dict(data, path)

    def _summary_line(self) -> str:  # pragma: no cover - overridden
        return ""

    def _table(self) -> tuple[list[str], list[list[Any]]]:  # pragma: no cover - overridden
        return [], []

    def to_pandas(self):
        """The result's table as a pandas DataFrame."""
        header, rows = self._table()
        return _pandas().DataFrame(rows, columns=header)

    def __repr__(self) -> str:
        header, rows = self._table()
        lines = [f"{type(self).__name__}: {self._summary_line()}"]
        if rows:
            widths = [max(len(str(h)), *(len(_cell_text(r[i])) for r in rows[:12])) for i, h in enumerate(header)]
            lines.append("  " + "  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)))
            for row in rows[:12]:
                lines.append("  " + "  ".join(_cell_text(v).ljust(w) for v, w in zip(row, widths, strict=True)))
            if len(rows) > 12:
                lines.append(f"  … {len(rows) - 12} more rows")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        header, rows = self._table()
        return (f"<div><b>{html.escape(type(self).__name__)}</b>: {html.escape(self._summary_line())}"
                f"{_html_table(header, rows) if rows else ''}</div>")


def _cell_text(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    text = "" if value is None else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------------------------------------- data


def load_dataset(name: str | Sequence[Any], *, split: Mapping[str, Any] | None = None, data_dir: str | None = None,
                 fields: Any = None, model: Any = None, tokenizer: Any = None, cache_dir: str | Path | None = None):
    """A built-in dataset (`unisteer data` lists them), a JSONL/JSON/CSV/Parquet file of pairs, or a list of
    `us.PolarityPair` built in the notebook, split.

    `split` changes the dataset's default split ({"seed": 42, "train": 64, "dev": 50, "test": 100}); the same
    values give the same parts in every command, and sizes never move test or dev pairs into train. Returns a
    `BuiltinData`: `.splits.train / .dev / .test` (PairDataset), `.choice_dev / .choice_test` (the yes/no or
    A/B items `evaluate` scores), `.record()`. AxBench names need `model`, `tokenizer` and `cache_dir`.
    """
    from .workflow import load_data

    return load_data(name, data_dir=data_dir, fields=fields, split=split, model=model, tokenizer=tokenizer,
                     cache_dir=cache_dir)


def _data(data: Any, model: Any, tokenizer: Any, out: str | Path | None):
    if isinstance(data, str | list | tuple):
        return load_dataset(data, model=model, tokenizer=tokenizer,
                            cache_dir=Path(out or "results") / "cache")
    if not hasattr(data, "splits"):
        raise ConfigError(f"data: expected a dataset name or the result of us.load_dataset, got {type(data).__name__}")
    return data


# ---------------------------------------------------------------------------------------------- train


@dataclass(repr=False)
class TrainResult(_Result):
    """A trained (or computed) update, where it lives, and its per-step training metrics.

    `update` is the live update (None after `load` without a model); `path` its saved folder, `out_dir` the
    training folder (`metrics.jsonl`, checkpoints: rerunning `us.train` with the same `out` resumes).
    """

    kind: ClassVar[str] = "train"

    name: str
    objective: str
    form: str
    layer: int
    path: Path
    out_dir: Path
    seconds: float | None
    rendering: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    training: dict[str, Any] = field(default_factory=dict)
    update: Any = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "objective": self.objective, "form": self.form, "layer": self.layer,
                "path": str(self.path), "out_dir": str(self.out_dir), "seconds": self.seconds,
                "rendering": self.rendering, "metrics": self.metrics, "training": self.training}

    @classmethod
    def _from_dict(cls, data: dict[str, Any], path: Path) -> TrainResult:
        return cls(data["name"], data["objective"], data["form"], int(data["layer"]), Path(data["path"]),
                   Path(data["out_dir"]), data.get("seconds"), data.get("rendering", {}), data.get("metrics", []),
                   data.get("training", {}))

    @classmethod
    def load(cls, path: str | Path, model: Any = None) -> TrainResult:
        """A saved result (JSON), or a training folder written by `us.train` / `unisteer train` / `unisteer run`
        (`runs/split`, `results/demo/cells/split-vector`). With `model`, the update is loaded and checked too."""
        from .engine.storage import load_update

        path = Path(path)
        if path.is_dir():
            result = _train_result_from_folder(path)
        else:
            result = super().load(path)
        if model is not None:
            result.update = load_update(result.path, model)
        return result

    def _summary_line(self) -> str:
        took = "" if self.seconds is None else f", {self.seconds:.0f} s"
        return (f"{self.name} ({self.objective}, {self.form}, layer {self.layer}) at {self.path}; "
                f"{len(self.metrics)} steps{took}")

    def _table(self) -> tuple[list[str], list[list[Any]]]:
        keys = ["step", "epoch", "loss", "win_nll", "lose_nll", "margin", "lr", "grad_norm"]
        present = [k for k in keys if any(k in r for r in self.metrics)]
        return present, [[r.get(k) for k in present] for r in self.metrics]

    def _repr_html_(self) -> str:
        header, rows = self._table()
        shown = rows[-5:]
        return (f"<div><b>TrainResult</b>: {html.escape(self._summary_line())}"
                f"{_html_table(header, shown) if shown else ''}</div>")

    def plot(self):
        """Training loss (and the winning / losing NLL where recorded) per optimizer step."""
        fig, axes = _figure()
        ax = axes[0][0]
        steps = [r["step"] for r in self.metrics]
        for key in ("loss", "win_nll", "lose_nll"):
            if self.metrics and all(key in r for r in self.metrics):
                ax.plot(steps, [r[key] for r in self.metrics], "-o", markersize=2.5, label=key)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("value")
        ax.set_title(f"{self.name}: training" if self.metrics else f"{self.name}: no steps (closed form)")
        ax.grid(alpha=0.3)
        if self.metrics:
            ax.legend(fontsize=8)
        return fig


def _train_result_from_folder(out: Path) -> TrainResult:
    from .files import read_json
    from .training.run_folder import METRICS_FILE

    update_json = out / "update" / "update.json"
    if not update_json.exists():
        raise DataError(f"{out}: not a finished training folder (no update/update.json)")
    spec = read_json(update_json).get("spec", {})
    training = spec.get("training") or {}
    metrics = []
    if (out / METRICS_FILE).exists():
        for line in (out / METRICS_FILE).read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                if record.get("kind", "step") == "step":
                    metrics.append(record)
    timing = out / "timing.json"
    seconds = read_json(timing).get("seconds") if timing.exists() else None
    rendering = ((training.get("encoder") or {}).get("rendering")) or {}
    return TrainResult(spec.get("name") or out.name, training.get("objective", "?"), spec.get("form", "?"),
                       int(spec.get("layer", training.get("layer", -1))), out / "update", out, seconds, rendering,
                       metrics, training)


def train(model: Any, tokenizer: Any, data: Any, *, out: str | Path, objective: str = "split",
          form: str = "vector", layer: int | str | None = "default", rendering: Any = "auto", name: str = "",
          seed: int = 42, resume: bool | None = None, overwrite: bool = False, progress: bool = True,
          **settings: Any) -> TrainResult:
    """Train an update with `objective` (split, sft, reps, dpo; or the closed-form diffmean) in `form` (vector,
    lora, local_weight) on `data`'s train split; what `unisteer train` and each cell of `unisteer run` do.

    `settings` override fields of the objective's preset (`TrainConfig`: epochs=1, lr=0.05, batch_size=8, ...).
    The update, `metrics.jsonl` and checkpoints go to `out`; rerunning with the same `out` continues from the
    last checkpoint, and a finished `out` is loaded rather than retrained (`overwrite=True` retrains).
    `layer="default"` is the model's measured layer; `rendering="auto"` is measured on the training pairs.
    layer, rendering, seed and `max_length` (among `settings`) are the run's `Recipe`, recorded with the update.
    """
    from .engine.models import model_id
    from .engine.updates import FORMS
    from .recipe import DEFAULT_MAX_LENGTH, Recipe
    from .training.objectives import OBJECTIVES
    from .workflow import resolve_recipe, train_cell

    if objective not in (*OBJECTIVES, "diffmean"):
        raise ConfigError(f"objective {objective!r} is not one of {[*OBJECTIVES, 'diffmean']}")
    if form not in FORMS:
        raise ConfigError(f"form {form!r} is not one of {list(FORMS)}")
    if settings:
        from .config import from_dict
        from .training.config import TrainConfig

        from_dict(TrainConfig, dict(settings), where="us.train settings")  # unknown keys before any work
    data = _data(data, model, tokenizer, out)
    recipe = Recipe(model=model_id(model), layer="default" if layer is None else layer,
                    rendering="auto" if rendering is None else rendering, seed=seed,
                    max_length=settings.pop("max_length", DEFAULT_MAX_LENGTH))
    recipe = resolve_recipe(recipe, model, tokenizer, data)
    trained = train_cell(model, tokenizer, data, objective=objective, form=form, recipe=recipe, out_dir=out,
                         overrides=settings, name=name, resume=resume, overwrite=overwrite, progress=progress,
                         extra_record={"rendering_choice": recipe.rendering_choice})
    result = _train_result_from_folder(Path(out))
    result.update = trained.update
    result.seconds = trained.seconds
    return result


# ---------------------------------------------------------------------------------------------- sweep


@dataclass(repr=False)
class SweepResult(_Result):
    """A sweep folder: per (update, split, m, example) the completion NLLs of both answers (`to_pandas`).

    `fit()` (or `us.fit(sweep)`) turns it into curves and fits; rerunning `us.sweep` with the same `out`
    resumes (only missing rows are scored)."""

    kind: ClassVar[str] = "sweep"

    out_dir: Path
    updates: list[str]
    splits: list[str]
    rows_computed: int = 0
    rows_reused: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "updates": self.updates, "splits": self.splits,
                "rows_computed": self.rows_computed, "rows_reused": self.rows_reused, "seconds": self.seconds}

    @classmethod
    def _from_dict(cls, data: dict[str, Any], path: Path) -> SweepResult:
        return cls(Path(data["out_dir"]), list(data["updates"]), list(data["splits"]), data.get("rows_computed", 0),
                   data.get("rows_reused", 0), data.get("seconds", 0.0))

    @classmethod
    def load(cls, path: str | Path) -> SweepResult:
        """A saved result (JSON) or a sweep folder (`us.sweep`, `unisteer sweep`, `unisteer run`'s OUT/sweep)."""
        from .analysis.sweep import read_sweep_info

        path = Path(path)
        if path.is_dir():
            info = read_sweep_info(path)
            return cls(path, list(info["updates"]), list(info["splits"]))
        return super().load(path)

    def _summary_line(self) -> str:
        return (f"{', '.join(self.updates)} on {', '.join(self.splits)} in {self.out_dir} ({self.rows_computed} rows "
                f"computed, {self.rows_reused} reused)")

    def _table(self) -> tuple[list[str], list[list[Any]]]:
        from .analysis.sweep import read_scores, scores_path

        header = ["update", "split", "example", "m", "L_p", "L_n", "T_p", "T_n"]
        rows = []
        for update in self.updates:
            for split in self.splits:
                for s in read_scores(scores_path(self.out_dir, update, split)):
                    rows.append([update, split, s.example, s.m, s.L_p, s.L_n, s.T_p, s.T_n])
        return header, sorted(rows, key=lambda r: (r[0], r[1], r[3], r[2]))

    def __repr__(self) -> str:
        return f"SweepResult: {self._summary_line()}"

    def _repr_html_(self) -> str:
        return f"<div><b>SweepResult</b>: {html.escape(self._summary_line())}</div>"

    def fit(self, *, fit_split: str | None = None) -> FitResult:
        return fit(self, fit_split=fit_split)

    def plot(self, **kwargs: Any):
        """The fitted preference / utility curves (`self.fit().plot(...)`)."""
        return self.fit().plot(**kwargs)


def _named_updates(updates: Any) -> dict[str, Any]:
    if isinstance(updates, Mapping):
        items = list(updates.items())
    else:
        listed = [updates] if isinstance(updates, TrainResult) or hasattr(updates, "spec") else list(updates)
        items = [(u.name if isinstance(u, TrainResult) else (u.spec.name or u.spec.form), u) for u in listed]
    named: dict[str, Any] = {}
    for name, update in items:
        if isinstance(update, TrainResult):
            if update.update is None:
                raise ConfigError(f"update {name!r}: this TrainResult was loaded without a model; use "
                                  "TrainResult.load(path, model)")
            update = update.update
        if name in named:
            raise ConfigError(f"updates: the name {name!r} is used more than once; pass a dict name -> update")
        named[name] = update
    if not named:
        raise ConfigError("updates: give at least one update")
    return named


def sweep(model: Any, tokenizer: Any, updates: Any, data: Any, *, out: str | Path,
          splits: Sequence[str] = ("train", "test"), max_pairs: int | None = None, grid: Sequence[float] | None = None,
          rendering: Any = None, allow_overlap: bool = False, progress: bool = True, settings: Mapping[str, Any] | None
          = None, **config: Any) -> SweepResult:
    """Score preference and utility of `updates` on `splits` over a multiplier grid (`unisteer sweep`).

    `updates`: a TrainResult, an update, a list of them (named by their names) or a dict name -> update.
    `grid` defaults to each form's grid; `config` sets other `SweepConfig` fields (n_boot=200,
    manifold=False, batch_rows=32, grids={"name": [...]}, ...). Held-out splits are checked against the
    updates' training pairs (`allow_overlap` turns the refusal into a warning). Resumes `out`.
    """
    from .analysis.sweep import SweepConfig, run_sweep
    from .config import from_dict
    from .workflow import check_held_out, first_pairs, scoring_recipe

    sweep_config = from_dict(SweepConfig, {**config, "grid": None if grid is None else [float(m) for m in grid],
                                           "progress": progress}, where="us.sweep")
    named = _named_updates(updates)
    data = _data(data, model, tokenizer, out)
    parts = {name: first_pairs(data.splits[name], max_pairs) for name in splits}
    for split, pairs in parts.items():
        if split != "train":
            for update in named.values():
                check_held_out(update, pairs, name=f"split {split!r}", allow_overlap=allow_overlap)
    recipe = scoring_recipe(model, data, named, rendering=rendering, max_length=sweep_config.max_length)
    record = {"model": recipe.model, "dtype": recipe.dtype, "dataset": data.record(), "recipe": recipe.to_dict(),
              **dict(settings or {})}
    result = run_sweep(model, tokenizer, named, parts, sweep_config, out, settings=record,
                       encoder=recipe.encoder(tokenizer))
    return SweepResult(Path(out), list(named), list(parts), result.rows_computed, result.rows_reused, result.seconds)


# ---------------------------------------------------------------------------------------------- fit


@dataclass(repr=False)
class FitResult(_Result):
    """Preference / utility curves per (update, split, variant) and their validity-decay fits.

    `fits` is the `analysis.fits.SweepFits` the report is drawn from; `to_pandas()` the curves (one row per
    update, split, variant, quantity and m), `fits_table()` the fits with R² per split and breakdowns.
    """

    kind: ClassVar[str] = "fit"

    fits: Any
    variant: str = "sum"

    @property
    def out_dir(self) -> Path:
        return Path(self.fits.out_dir)

    @property
    def updates(self) -> list[str]:
        return list(self.fits.updates)

    def to_dict(self) -> dict[str, Any]:
        fits = self.fits
        return {"out_dir": str(fits.out_dir), "variant": self.variant, "sweep": fits.info,
                "curves": {f"{u}/{s}/{v}": {"preference": p.preference.to_dict(), "utility": p.utility.to_dict()}
                           for (u, s, v), p in fits.curves.items()},
                "fits": {f"{u}/{v}": fit.to_dict() for (u, v), fit in fits.fits.items()}}

    @classmethod
    def _from_dict(cls, data: dict[str, Any], path: Path) -> FitResult:
        if "curves" not in data or "fits" not in data:
            raise DataError(f"{path}: holds no curves and fits (expected us.FitResult.save output or a fitted "
                            "sweep's summary.json)")
        return cls(_rebuilt_fits(data, Path(data.get("out_dir") or path.parent)),
                   data.get("variant") or data.get("sweep", {}).get("config", {}).get("variant", "sum"))

    @classmethod
    def load(cls, path: str | Path) -> FitResult:
        """A saved result (JSON), or a fitted sweep folder (its `summary.json`, written by `us.fit`,
        `unisteer fit` and `unisteer run` — e.g. results/demo/sweep)."""
        path = Path(path)
        if path.is_dir():
            if not (path / "summary.json").exists():
                raise DataError(f"{path}: no summary.json; fit the sweep first (us.fit or unisteer fit)")
            path = path / "summary.json"
        return super().load(path)

    def _summary_line(self) -> str:
        return f"{', '.join(self.updates)} ({self.variant} log-odds) from {self.out_dir}"

    def _table(self) -> tuple[list[str], list[list[Any]]]:
        header = ["update", "split", "variant", "quantity", "m", "mean", "sem", "ci_low", "ci_high", "n"]
        rows = []
        for (update, split, variant), pair in self.fits.curves.items():
            for quantity in ("preference", "utility"):
                curve = getattr(pair, quantity)
                for m, a in zip(curve.m, curve.aggregates, strict=True):
                    rows.append([update, split, variant, quantity, float(m), a.mean, a.sem, a.ci_low, a.ci_high, a.n])
        return header, rows

    def fits_table(self):
        """One row per (update, variant, quantity): the fit split, R² on every split, breakdown multipliers."""
        rows = []
        for (update, variant), fit in self.fits.fits.items():
            for quantity in ("preference", "utility"):
                decay = getattr(fit, quantity)
                row = {"update": update, "variant": variant, "quantity": quantity, "fit_split": fit.fit_split}
                row.update({f"r2_{split}": r2 for split, r2 in fit.r2.get(quantity, {}).items()})
                if decay is not None:
                    row.update({"breakdown_negative": decay.breakdown_negative,
                                "breakdown_positive": decay.breakdown_positive, "poor_fit": decay.poor_fit,
                                "undetermined": decay.undetermined})
                else:
                    row["error"] = fit.errors.get(quantity, "")
                rows.append(row)
        return _pandas().DataFrame(rows)

    def _repr_html_(self) -> str:
        rows = []
        for (update, variant), fit in self.fits.fits.items():
            if variant != self.variant:
                continue
            for quantity in ("preference", "utility"):
                r2 = ", ".join(f"{s} {v:.3f}" if v is not None else f"{s} n/a"
                               for s, v in fit.r2.get(quantity, {}).items())
                decay = getattr(fit, quantity)
                rows.append([update, quantity, fit.fit_split, r2 or fit.errors.get(quantity, ""),
                             "" if decay is None else f"{decay.breakdown_negative:.3g} / {decay.breakdown_positive:.3g}"])
        return (f"<div><b>FitResult</b>: {html.escape(self._summary_line())}"
                f"{_html_table(['update', 'quantity', 'fit split', 'R²', 'breakdown − / +'], rows)}</div>")

    def plot(self, update: str | None = None, *, variant: str | None = None, splits: Sequence[str] | None = None,
             mark: float | None = None):
        """Preference (top) and utility (bottom) log-odds vs m per split, with the fit; `mark` draws a line at m."""
        from .analysis.fitting import CONVERGENCE_THRESHOLD, LINEAR_THRESHOLD
        from .analysis.plots import PALETTE, Curve, draw_curve, draw_fit, draw_regions

        variant = variant or self.variant
        names = [update] if update is not None else self.updates
        unknown = [n for n in names if n not in self.updates]
        if unknown:
            raise ConfigError(f"plot: no update {unknown}; the sweep has {self.updates}")
        present = [s for s in self.fits.info.get("splits", []) if any((n, s, variant) in self.fits.curves
                                                                       for n in names)]
        splits = list(splits or present)
        if not splits:
            raise DataError(f"plot: no curves of variant {variant!r}")
        fig, axes = _figure(2, len(splits), size=(5.2 * len(splits), 7.2))
        for col, split in enumerate(splits):
            for row, quantity in enumerate(("preference", "utility")):
                ax = axes[row][col]
                for index, name in enumerate(names):
                    pair = self.fits.curves.get((name, split, variant))
                    fit = self.fits.fits.get((name, variant))
                    decay = None if fit is None else getattr(fit, quantity)
                    if pair is None:
                        continue
                    curve = Curve.from_aggregated(name, getattr(pair, quantity))
                    color = PALETTE[index % len(PALETTE)]
                    span = (float(curve.m.min()), float(curve.m.max()))
                    if decay is not None and len(names) == 1:
                        draw_regions(ax, decay, span, LINEAR_THRESHOLD, CONVERGENCE_THRESHOLD)
                    draw_curve(ax, curve, color, label=name, connect=decay is None)
                    if decay is not None:
                        draw_fit(ax, decay, curve, color, span)
                if mark is not None:
                    ax.axvline(mark, color="black", linewidth=1.2, label=f"m = {mark:g}")
                ax.axhline(0.0, color="0.6", linewidth=0.6)
                ax.set_title(f"{quantity} — {split}")
                ax.set_ylabel("PrefOdds" if quantity == "preference" else "UtilOdds")
                if row == 1:
                    ax.set_xlabel("multiplier m")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7, loc="best")
        fig.suptitle(f"{', '.join(names)} — {variant} log-odds vs m")
        return fig


def _rebuilt_fits(data: dict[str, Any], out_dir: Path):
    """A `SweepFits` holding the curves and fits of a saved summary (no per-example rows)."""
    from .analysis.fits import CurvePair, UpdateFit
    from .analysis.fitting import DecayFit
    from .analysis.logodds import Aggregate, AggregatedCurve

    def curve(d: dict[str, Any]) -> AggregatedCurve:
        return AggregatedCurve(np.asarray(d["m"], dtype=np.float64), tuple(Aggregate(**a) for a in d["aggregates"]))

    curves = {tuple(key.split("/")): CurvePair(curve(v["preference"]), curve(v["utility"]))
              for key, v in data["curves"].items()}
    fits = {}
    for key, v in data["fits"].items():
        update, variant = key.rsplit("/", 1)
        fits[(update, variant)] = UpdateFit(
            v["update"], v["variant"], v["fit_split"],
            None if v.get("preference") is None else DecayFit.from_dict(v["preference"]),
            None if v.get("utility") is None else DecayFit.from_dict(v["utility"]), v.get("r2", {}),
            v.get("errors", {}))
    return _saved_fits_class()(out_dir, data.get("sweep", {}), {}, curves, fits, {}, [], {})


@functools.cache
def _saved_fits_class():
    from .analysis.fits import SweepFits

    class SavedFits(SweepFits):
        """SweepFits read back from JSON: updates and splits come from the curves (there are no rows)."""

        @property
        def updates(self) -> list[str]:
            order = list(self.info.get("updates", []))
            found = {u for u, _, _ in self.curves}
            return sorted(found, key=lambda u: order.index(u) if u in order else len(order))

        @property
        def splits(self) -> list[str]:
            order = list(self.info.get("splits", []))
            found = {s for _, s, _ in self.curves}
            return sorted(found, key=lambda s: order.index(s) if s in order else len(order))

    return SavedFits


def fit(sweep: SweepResult | str | Path, *, fit_split: str | None = None) -> FitResult:
    """Aggregate a sweep into curves and fit the validity-decay model (`unisteer fit`); writes the sweep
    folder's fits.json, curves.csv, summary.json, ... as the CLI does."""
    from .analysis.fits import fit_sweep

    folder = sweep.out_dir if isinstance(sweep, SweepResult) else Path(sweep)
    fits = fit_sweep(folder, fit_split=fit_split)
    return FitResult(fits, fits.info.get("config", {}).get("variant", "sum"))


def report(sweep: SweepResult | FitResult | str | Path) -> Path:
    """The sweep's HTML/Markdown report with its plots (`unisteer report`); returns the HTML path."""
    from .analysis.report import write_report

    if isinstance(sweep, FitResult):
        return write_report(sweep.out_dir, fits=sweep.fits if sweep.fits.rows else None)
    folder = sweep.out_dir if isinstance(sweep, SweepResult) else Path(sweep)
    return write_report(folder)


# ---------------------------------------------------------------------------------------------- evaluate


@dataclass(repr=False)
class EvalResult(_Result):
    """Choice accuracy over a grid on dev and test: +m and −m chosen on dev, reported on test with intervals.

    `record` is exactly what `unisteer eval --out` and `unisteer run` (OUT/eval/<name>.json) write.
    """

    kind: ClassVar[str] = "eval"

    name: str
    record: dict[str, Any]
    update: dict[str, Any] = field(default_factory=dict)  # name, form, objective, layer of the update (or {})

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "update": self.update, "evaluation": self.record}

    @classmethod
    def _from_dict(cls, data: dict[str, Any], path: Path) -> EvalResult:
        if "evaluation" in data:
            return cls(data["name"], data["evaluation"], data.get("update", {}))
        if "test_rows" in data:  # unisteer eval --out / unisteer run's OUT/eval/<name>.json
            return cls(path.stem, data)
        raise DataError(f"{path}: not an evaluation (no test_rows)")

    @property
    def toward(self) -> dict[str, Any] | None:
        """Test scores at the +m chosen on dev (with `change` from m = 0), None for the plain model."""
        return self.record.get("toward")

    @property
    def away(self) -> dict[str, Any] | None:
        return self.record.get("away")

    def _summary_line(self) -> str:
        parts = [self.name]
        for side, sign in (("toward", "+m"), ("away", "−m")):
            chosen = self.record.get(side)
            if chosen:
                parts.append(f"{sign} = {chosen['multiplier']:g}: test accuracy {chosen['accuracy']:.2f} "
                             f"[{chosen['ci_low']:.2f}, {chosen['ci_high']:.2f}]")
        return "; ".join(parts)

    def _table(self) -> tuple[list[str], list[list[Any]]]:
        header = ["part", "multiplier", "accuracy", "ci_low", "ci_high", "balanced_accuracy", "balanced_ci_low",
                  "balanced_ci_high", "auc", "n", "chosen"]
        chosen = {(self.record.get(s) or {}).get("multiplier"): s for s in ("toward", "away") if self.record.get(s)}
        rows = []
        for part in ("dev", "test"):
            for r in self.record.get(f"{part}_rows") or []:
                balanced_ci = r.get("balanced_ci") or [None, None]
                rows.append([part, r["multiplier"], r.get("accuracy"), r.get("ci_low"), r.get("ci_high"),
                             r.get("balanced_accuracy"), balanced_ci[0], balanced_ci[1], r.get("auc"), r.get("n"),
                             chosen.get(r["multiplier"], "") if part == "test" else ""])
        return header, rows

    def plot(self, metric: str = "balanced_accuracy"):
        """`metric` (balanced_accuracy, accuracy, auc) vs m on dev and test; rings at the chosen ±m."""
        fig, axes = _figure()
        ax = axes[0][0]
        for part, style in (("dev", "--o"), ("test", "-o")):
            rows = [r for r in self.record.get(f"{part}_rows") or [] if r.get(metric) is not None]
            if rows:
                ax.plot([r["multiplier"] for r in rows], [r[metric] for r in rows], style, markersize=3.5, label=part)
        for side in ("toward", "away"):
            chosen = self.record.get(side)
            if chosen and chosen.get(metric) is not None:
                ax.plot([chosen["multiplier"]], [chosen[metric]], "o", markersize=11, markerfacecolor="none",
                        markeredgecolor="black", label=f"{side} (m = {chosen['multiplier']:g})")
        ax.axhline(0.5, color="0.6", linewidth=0.6)
        ax.set_xlabel("multiplier m")
        ax.set_ylabel(metric.replace("_", " "))
        ax.set_title(f"{self.name}: {metric.replace('_', ' ')} vs m")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        return fig


def evaluate(model: Any, tokenizer: Any, data: Any, update: Any = None, *, grid: Sequence[float] | None = None,
             rendering: Any = None, max_pairs: int | None = None, allow_overlap: bool = False, progress: bool = True,
             name: str | None = None, max_length: int = 512) -> EvalResult:
    """Yes/no or A/B choice accuracy of `update` (None: the plain model) over `grid` (`unisteer eval`).

    Scores dev and test; +m and −m are chosen on dev by balanced accuracy and reported on test with Wilson /
    bootstrap intervals and the paired change from m = 0. `rendering` defaults to the update's own; a prompt
    longer than `max_length` tokens loses tokens from the left of its user turn. Both parts are checked to be
    held out from the update's training pairs.
    """
    from .engine.updates import default_grid
    from .workflow import evaluate_choices, scoring_recipe

    label = name
    if isinstance(update, TrainResult):
        label = label or update.name
        update = _named_updates({update.name: update})[update.name]
    grid = [float(m) for m in grid] if grid is not None else \
        (default_grid(update.spec.form) if update is not None else [0.0])
    data = _data(data, model, tokenizer, None)
    recipe = scoring_recipe(model, data, {} if update is None else {"update": update}, rendering=rendering,
                            max_length=max_length)
    result = evaluate_choices(model, tokenizer, data, update, grid, recipe=recipe, max_pairs=max_pairs,
                              allow_overlap=allow_overlap, progress=progress)
    meta = {}
    if update is not None:
        training = update.spec.training if isinstance(update.spec.training, dict) else {}
        meta = {"name": update.spec.name or update.spec.form, "form": update.spec.form,
                "objective": training.get("objective"), "layer": update.layer}
    return EvalResult(label or meta.get("name") or "vanilla", result.to_dict(), meta)


# ---------------------------------------------------------------------------------------------- Table 3


@dataclass(repr=False)
class Table3(_Result):
    """The Table-3 comparison: per cell the test scores at the ±m chosen on dev, utility there, fit R².

    `summary` is the same dictionary `unisteer run` writes to OUT/summary.json (`Table3.load` reads it)."""

    kind: ClassVar[str] = "table3"

    summary: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary}

    @classmethod
    def _from_dict(cls, data: dict[str, Any], path: Path) -> Table3:
        if "summary" in data:
            return cls(data["summary"])
        if "rows" in data:
            return cls(data)
        raise DataError(f"{path}: not a run summary (no rows)")

    @classmethod
    def load(cls, path: str | Path) -> Table3:
        """A saved table (JSON), a run's `summary.json`, or a run folder (e.g. results/demo)."""
        path = Path(path)
        return super().load(path / "summary.json" if path.is_dir() else path)

    def row(self, cell: str) -> dict[str, Any]:
        """One cell's row of the summary (toward / away scores, steers, fits)."""
        for row in self.summary["rows"]:
            if row["cell"] == cell:
                return row
        raise ConfigError(f"no cell {cell!r}; cells are {[r['cell'] for r in self.summary['rows']]}")

    def _summary_line(self) -> str:
        s = self.summary
        return f"{s.get('data')}, {s.get('model')} ({s.get('dtype')}), layer {s.get('layer')}"

    def _table(self) -> tuple[list[str], list[list[Any]]]:
        from .run_report import table3_rows

        return table3_rows(self.summary)

    def headline(self) -> list[str]:
        """The finding in sentences (as the run report opens)."""
        import re

        from .run_report import headline

        return [re.sub(r"</?b>", "", line) for line in headline(self.summary)]

    def plot(self):
        """Test balanced accuracy at +m and −m per cell, with intervals (vanilla as a line)."""
        fig, axes = _figure()
        ax = axes[0][0]
        cells = [r for r in self.summary["rows"] if r["cell"] != "vanilla"]
        for offset, side, color in ((-0.12, "toward", "#1f77b4"), (0.12, "away", "#d62728")):
            xs, ys, low, high = [], [], [], []
            for i, row in enumerate(cells):
                chosen = row.get(side) or {}
                if chosen.get("balanced_accuracy") is None:
                    continue
                ci = chosen.get("balanced_ci") or [chosen["balanced_accuracy"]] * 2
                xs.append(i + offset)
                ys.append(chosen["balanced_accuracy"])
                low.append(chosen["balanced_accuracy"] - ci[0])
                high.append(ci[1] - chosen["balanced_accuracy"])
            if xs:
                ax.errorbar(xs, ys, yerr=[low, high], fmt="o", color=color, capsize=3,
                            label="+m (toward)" if side == "toward" else "−m (away)")
        vanilla = next((r for r in self.summary["rows"] if r["cell"] == "vanilla"), None)
        if vanilla and vanilla.get("m0", {}).get("balanced_accuracy") is not None:
            ax.axhline(vanilla["m0"]["balanced_accuracy"], color="0.4", linestyle="--", label="vanilla")
        ax.set_xticks(range(len(cells)), [r["cell"] for r in cells])
        ax.set_ylabel("test balanced accuracy")
        ax.set_title("Table 3: test scores at the multipliers chosen on dev")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        return fig


def table3(fits: FitResult, evaluations: Mapping[str, EvalResult], *, trained: Any = None, data: str | None = None,
           model: str | None = None, layer: int | None = None, dtype: str | None = None) -> Table3:
    """The Table-3 comparison `unisteer run` writes (OUT/summary.json), from a fitted sweep and evaluations.

    `evaluations`: cell name -> EvalResult; "vanilla" names the plain model's (us.evaluate without an update).
    Each other name must be an update of the sweep (its utility at ±m comes from the sweep's test curve).
    `trained` (TrainResults, a list or dict) adds training times; data / model / layer / dtype label the table
    (default: what the sweep recorded).
    """
    from .pipeline import CellConfig, RunConfig, run_summary

    trained_by_name = {}
    if trained is not None:
        items = trained.values() if isinstance(trained, Mapping) else \
            ([trained] if isinstance(trained, TrainResult) else trained)
        trained_by_name = {t.name: t for t in items}
    info = fits.fits.info
    settings = info.get("settings", {}) if isinstance(info.get("settings"), dict) else {}
    cells = []
    for name, evaluation in evaluations.items():
        if name == "vanilla":
            continue
        meta = evaluation.update or {}
        source = trained_by_name.get(name)
        form = meta.get("form") or (source.form if source else None)
        objective = meta.get("objective") or (source.objective if source else None)
        if form is None or objective is None:
            raise ConfigError(f"table3: cannot tell the form and objective of {name!r}; evaluate a trained update "
                              "or pass trained=")
        cells.append(CellConfig(form=form, objective=objective, name=name))
    if not cells:
        raise ConfigError("table3: give the evaluation of at least one update (besides 'vanilla')")
    missing = [c.name for c in cells if c.name not in fits.updates]
    if missing:
        raise ConfigError(f"table3: {missing} are not in the sweep ({fits.updates}); name each evaluation as its "
                          "update is named in the sweep")
    dataset = settings.get("dataset", {}) if isinstance(settings.get("dataset"), dict) else {}
    config = RunConfig(data=data or dataset.get("name") or "?", cells=cells,
                       model=model or settings.get("model") or "?")
    layers = {c.name: (evaluations[c.name].update or {}).get("layer") for c in cells}
    chosen_layer = layer if layer is not None else next((v for v in layers.values() if v is not None), -1)
    timings = {c.name: trained_by_name[c.name].seconds if c.name in trained_by_name else None for c in cells}
    summary = run_summary(config, dtype or settings.get("dtype") or "?", chosen_layer, timings, fits.fits,
                       {name: e.record for name, e in evaluations.items()}, fits.variant)
    return Table3(summary)


def run(config: Any, *, progress: bool = True) -> Table3:
    """`unisteer run`: every cell of a run config (a YAML path or a `pipeline.RunConfig`), resumable; returns
    its Table 3 (the report is at OUT/report.html)."""
    from .pipeline import RunConfig, load_run_config, run_pipeline

    config = config if isinstance(config, RunConfig) else load_run_config(config)
    run_pipeline(config, progress=progress)
    return Table3.load(Path(config.out) / "summary.json")


# ---------------------------------------------------------------------------------------------- generate


@dataclass(repr=False)
class Generations(_Result):
    """Steered generations: one per prompt × multiplier (× sample). `table()` puts each m in a column."""

    kind: ClassVar[str] = "generations"

    items: list[Any]

    def to_dict(self) -> dict[str, Any]:
        return {"generations": [g.to_record() for g in self.items]}

    @classmethod
    def _from_dict(cls, data: dict[str, Any], path: Path) -> Generations:
        from .generation.generate import Generation

        return cls([Generation.from_record(r) for r in data["generations"]])

    @classmethod
    def load(cls, path: str | Path) -> Generations:
        """A saved result (JSON) or the JSONL file `unisteer generate --out` / `us.generate(out=)` appends to."""
        from .generation.generate import read_generations

        path = Path(path)
        if path.suffix == ".jsonl":
            return cls(read_generations(path))
        return super().load(path)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    def __getitem__(self, index: int):
        return self.items[index]

    def text(self, prompt: int | str = 0, multiplier: float = 0.0, sample: int = 0) -> str:
        """The text generated for a prompt (index or text) at a multiplier."""
        for g in self.items:
            if (g.prompt_index == prompt if isinstance(prompt, int) else g.prompt == prompt) and \
                    g.multiplier == float(multiplier) and g.sample == sample:
                return g.text
        raise ConfigError(f"no generation for prompt {prompt!r} at m = {multiplier:g} (sample {sample})")

    def _summary_line(self) -> str:
        prompts = len({g.prompt_index for g in self.items})
        ms = sorted({g.multiplier for g in self.items})
        name = next((g.update_name for g in self.items if g.update_name), None) or "plain model"
        return f"{len(self.items)} generations: {prompts} prompt(s) × m in {[f'{m:g}' for m in ms]} ({name})"

    def _table(self) -> tuple[list[str], list[list[Any]]]:
        header = ["prompt_index", "prompt", "multiplier", "sample", "text", "finished", "n_new_tokens"]
        return header, [[g.prompt_index, g.prompt, g.multiplier, g.sample, g.text, g.finished, g.n_new_tokens]
                        for g in self.items]

    def table(self):
        """A DataFrame with one row per prompt (and sample) and one column of text per multiplier."""
        frame = self.to_pandas()
        wide = frame.pivot_table(index=["prompt_index", "prompt", "sample"], columns="multiplier", values="text",
                                 aggfunc="first")
        wide.columns = [f"m={m:g}" for m in wide.columns]
        return wide.reset_index()

    def plot(self, width: int = 40):
        """The generations as a figure: one row per prompt, one column per m (text wrapped to `width`)."""
        import textwrap

        ms = sorted({g.multiplier for g in self.items})
        prompts = sorted({(g.prompt_index, g.prompt) for g in self.items})
        fig, axes = _figure(size=(3.2 * len(ms) + 2.0, 1.6 + 1.4 * len(prompts)))
        ax = axes[0][0]
        ax.axis("off")
        cells = [[textwrap.fill(p, 24)] + [textwrap.fill(next((g.text for g in self.items if g.prompt_index == i and
                                                               g.multiplier == m and g.sample == 0), ""), width)
                                           for m in ms] for i, p in prompts]
        table = ax.table(cellText=cells, colLabels=["prompt"] + [f"m = {m:g}" for m in ms], loc="upper center",
                         cellLoc="left")
        table.auto_set_font_size(False)
        table.set_fontsize(7)
        for (row, _), cell in table.get_celld().items():
            cell.set_height(0.9 / (len(prompts) + 1) if row else 0.06)
        return fig


def generate(model: Any, tokenizer: Any, prompts: str | Sequence[str], update: Any = None,
             multipliers: float | Sequence[float] = (0.0,), *, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, samples: int = 1, out: str | Path | None = None,
             progress: bool = True) -> Generations:
    """Generate for every prompt at every multiplier (`unisteer generate`): greedy by default, m = 0 is the
    plain model. `out` (JSONL) keeps the generations and resumes."""
    from .generation.generate import generate_steered
    from .generation.sampling import SamplingConfig

    if isinstance(update, TrainResult):
        update = _named_updates({update.name: update})[update.name]
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    multipliers = [multipliers] if isinstance(multipliers, (int, float)) else list(multipliers)
    settings = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    return Generations(generate_steered(model, tokenizer, prompts, update, [float(m) for m in multipliers], settings,
                                        out, samples=samples, progress=progress))


__all__ = ["EvalResult", "FitResult", "Generations", "SweepResult", "Table3", "TrainResult", "evaluate", "fit",
           "generate", "load_dataset", "report", "run", "sweep", "table3", "train"]
