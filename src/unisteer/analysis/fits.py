"""A finished sweep's rows turned into curves, validity-decay fits and manifold correlations, and the CSV/JSON
files that hold them (`fit_sweep`). Per (update, split, variant): the mean, standard error and bootstrap
CI of PrefOdds and UtilOdds per m, their paired change from m = 0, clamped counts; fits on the fit split
(with per-point standard errors, so noise-level curves are flagged undetermined) scored on every split.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError, FitError
from ..files import write_csv, write_json
from .confounds import ConfoundReport, confound_checks
from .fitting import DecayFit, fit_preference, fit_utility, score
from .logodds import VARIANTS, AggregatedCurve, aggregate_per_multiplier, compute_log_odds, paired_change
from .manifold import correlate
from .paired import PairScore
from .sweep import log, read_scores, read_sweep_info, scores_path
from .tradeoff import ExampleGrid, ManifoldTracking, UtilityPeak, manifold_tracking, utility_peak


@dataclass
class SplitRows:
    """All rows of one (update, split) as arrays, with per-example log-odds of both variants."""

    example: np.ndarray
    m: np.ndarray
    L_p: np.ndarray
    L_n: np.ndarray
    T_p: np.ndarray
    T_n: np.ndarray
    log_odds: dict[str, Any]  # variant → LogOdds
    manifold: dict[tuple[int, str], np.ndarray]  # (layer, metric) → values (NaN where a row lacks it)


@dataclass
class CurvePair:
    """Per-m aggregates of both quantities, and their paired change from m = 0 (per example, then averaged):
    an effect at m is a change whose interval excludes 0."""

    preference: AggregatedCurve
    utility: AggregatedCurve
    preference_change: AggregatedCurve | None = None
    utility_change: AggregatedCurve | None = None


@dataclass
class UpdateFit:
    """Preference and utility fits of one update and variant (fitted on `fit_split`), R² on every split."""

    update: str
    variant: str
    fit_split: str
    preference: DecayFit | None
    utility: DecayFit | None
    r2: dict[str, dict[str, float | None]]  # quantity → split → R²
    errors: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {"update": self.update, "variant": self.variant, "fit_split": self.fit_split,
                "preference": None if self.preference is None else self.preference.to_dict(),
                "utility": None if self.utility is None else self.utility.to_dict(),
                "r2": self.r2, "errors": self.errors}


@dataclass
class TradeOff:
    """F3 and F4 of one (update, split, variant): the utility peak and how distance tracks utility."""

    peak: UtilityPeak
    manifold: list[ManifoldTracking]

    def to_dict(self) -> dict[str, Any]:
        return {"peak": self.peak.to_dict(), "manifold": [t.to_dict() for t in self.manifold]}


@dataclass
class SweepFits:
    """Everything `fit_sweep` computed, as written to the files listed in `files`."""

    out_dir: Path
    info: dict[str, Any]
    rows: dict[tuple[str, str], SplitRows]
    curves: dict[tuple[str, str, str], CurvePair]  # (update, split, variant)
    fits: dict[tuple[str, str], UpdateFit]  # (update, variant)
    manifold: dict[tuple[str, str, int, str], AggregatedCurve]  # (update, split, layer, metric)
    correlations: list[dict[str, Any]]
    files: dict[str, Path]
    tradeoff: dict[tuple[str, str, str], TradeOff] = field(default_factory=dict)  # (update, split, variant)
    confounds: dict[tuple[str, str, str], ConfoundReport] = field(default_factory=dict)

    @property
    def updates(self) -> list[str]:
        return sorted({u for u, _ in self.rows}, key=list(self.info["updates"]).index)

    @property
    def splits(self) -> list[str]:
        return sorted({s for _, s in self.rows}, key=list(self.info["splits"]).index)


def load_sweep(out_dir: str | Path) -> tuple[dict[str, Any], dict[tuple[str, str], SplitRows]]:
    """`sweep.json` and every scores file, with log-odds of both variants per row."""
    out = Path(out_dir)
    info = read_sweep_info(out)
    eps = float(info["config"]["eps"])
    rows = {}
    for update in info["updates"]:
        for split in info["splits"]:
            scores = read_scores(scores_path(out, update, split))
            if scores:
                rows[(update, split)] = _rows_to_arrays(scores, eps)
    if not rows:
        raise DataError(f"{out}: the sweep has no scored rows yet")
    return info, rows


def _rows_to_arrays(scores: Sequence[PairScore], eps: float) -> SplitRows:
    scores = sorted(scores, key=lambda s: (s.m, s.example))
    column = {name: np.array([getattr(s, name) for s in scores]) for name in ("example", "m", "L_p", "L_n", "T_p",
                                                                               "T_n")}
    log_odds = {variant: compute_log_odds(column["L_p"], column["L_n"], column["T_p"], column["T_n"],
                                          variant=variant, eps=eps) for variant in VARIANTS}
    keys = sorted({(int(layer), metric) for s in scores for layer, values in s.manifold.items() for metric in values})
    manifold = {(layer, metric): np.array([s.manifold.get(str(layer), {}).get(metric, np.nan) for s in scores])
                for layer, metric in keys}
    return SplitRows(column["example"].astype(np.int64), column["m"].astype(np.float64), column["L_p"],
                     column["L_n"], column["T_p"].astype(np.int64), column["T_n"].astype(np.int64), log_odds,
                     manifold)


def fit_sweep(out_dir: str | Path, *, fit_split: str | None = None) -> SweepFits:
    """Aggregate, fit and correlate a sweep's rows; write the CSV/JSON files; return everything.

    Curves: per (update, split, variant) the mean, standard error and bootstrap CI of PrefOdds and UtilOdds
    per m, with clamped counts. Fits (SPEC §4), per update and variant, on the mean curve of `fit_split`
    (default: the sweep config's, else the first split present), scored on every split. Manifold: per
    (update, split, layer, metric) the mean distance per m and its Pearson/Spearman correlation with the
    mean UtilOdds across m.
    """
    out = Path(out_dir)
    info, rows = load_sweep(out)
    config = info["config"]
    n_boot, level, seed = int(config["n_boot"]), float(config["ci_level"]), int(config["seed"])
    splits = [s for s in info["splits"] if any(key[1] == s for key in rows)]
    chosen = fit_split or config.get("fit_split", "train")
    if chosen not in splits:
        if fit_split is not None:
            raise ConfigError(f"fit_split {fit_split!r}: no rows for that split; splits with rows: {splits}")
        log.warning("fit split %r has no rows; fitting on %r instead", chosen, splits[0])
        chosen = splits[0]

    curves: dict[tuple[str, str, str], CurvePair] = {}
    for (update, split), data in rows.items():
        has_zero = bool(np.any(data.m == 0.0))
        for variant, odds in data.log_odds.items():
            curves[(update, split, variant)] = CurvePair(
                aggregate_per_multiplier(data.m, odds.pref, odds.clamped, n_boot=n_boot, level=level, seed=seed),
                aggregate_per_multiplier(data.m, odds.util, odds.clamped, n_boot=n_boot, level=level, seed=seed),
                paired_change(data.m, data.example, odds.pref, n_boot=n_boot, level=level, seed=seed)
                if has_zero else None,
                paired_change(data.m, data.example, odds.util, n_boot=n_boot, level=level, seed=seed)
                if has_zero else None)

    fits: dict[tuple[str, str], UpdateFit] = {}
    for update in info["updates"]:
        for variant in VARIANTS:
            if (update, chosen, variant) in curves:
                fits[(update, variant)] = _fit_update(update, variant, chosen, curves, splits)

    manifold: dict[tuple[str, str, int, str], AggregatedCurve] = {}
    correlations = []
    for (update, split), data in rows.items():
        for (layer, metric), values in data.manifold.items():
            present = np.isfinite(values)
            curve = aggregate_per_multiplier(data.m[present], values[present], n_boot=n_boot, level=level, seed=seed)
            manifold[(update, split, layer, metric)] = curve
            for variant in VARIANTS:
                utility = curves[(update, split, variant)].utility
                common, in_distance, in_utility = np.intersect1d(curve.m, utility.m, return_indices=True)
                result = correlate(curve.mean[in_distance], utility.mean[in_utility])
                correlations.append({"update": update, "split": split, "layer": layer, "metric": metric,
                                     "variant": variant, "m_min": float(common.min()), "m_max": float(common.max()),
                                     **result.to_dict()})

    tradeoff, confounds = {}, {}
    for (update, split), data in rows.items():
        for variant, odds in data.log_odds.items():
            utility = ExampleGrid.pivot(data.example, data.m, odds.util)
            if utility.n_examples < 2:
                continue
            tracked = [manifold_tracking(ExampleGrid.pivot(data.example, data.m, values), utility, layer=layer,
                                         metric=metric, n_boot=n_boot, level=level, seed=seed)
                       for (layer, metric), values in sorted(data.manifold.items())]
            tradeoff[(update, split, variant)] = TradeOff(
                utility_peak(utility, n_boot=n_boot, level=level, seed=seed), tracked)
            report = confound_checks(data.example, data.m, data.L_p, data.L_n, data.T_p, data.T_n, odds.pref,
                                     odds.util, n_boot=n_boot, level=level, seed=seed)
            if report is not None:
                confounds[(update, split, variant)] = report

    result = SweepFits(out, info, rows, curves, fits, manifold, correlations, {}, tradeoff, confounds)
    result.files = _write_fit_files(result)
    return result


def _fit_update(update: str, variant: str, fit_split: str, curves: Mapping[tuple[str, str, str], CurvePair],
                splits: Sequence[str]) -> UpdateFit:
    fitted: dict[str, DecayFit | None] = {}
    errors: dict[str, str] = {}
    r2: dict[str, dict[str, float | None]] = {}
    train = curves[(update, fit_split, variant)]
    for quantity, fitter in (("preference", fit_preference), ("utility", fit_utility)):
        curve = getattr(train, quantity)
        sem = curve.sem if np.all(np.isfinite(curve.sem)) else None
        try:
            fitted[quantity] = fitter(curve.m, curve.mean, sem=sem)
        except FitError as exc:
            fitted[quantity], errors[quantity] = None, str(exc)
            continue
        r2[quantity] = {}
        for split in splits:
            if (update, split, variant) in curves:
                other = getattr(curves[(update, split, variant)], quantity)
                r2[quantity][split] = score(fitted[quantity], other.m, other.mean)
    return UpdateFit(update, variant, fit_split, fitted["preference"], fitted["utility"], r2, errors)


def _write_fit_files(result: SweepFits) -> dict[str, Path]:
    out = result.out_dir
    files = {name: out / name for name in ("per_example.csv", "curves.csv", "fits.json", "fits.csv",
                                           "manifold.csv", "manifold_correlations.csv", "tradeoff.json",
                                           "confounds.json", "summary.json")}
    manifold_keys = sorted({key for data in result.rows.values() for key in data.manifold})
    header = ["update", "split", "example", "m", "L_p", "L_n", "T_p", "T_n"]
    for variant in VARIANTS:
        header += [f"pref_{variant}", f"util_{variant}", f"clamped_{variant}"]
    header += [f"{metric}_layer{layer}" for layer, metric in manifold_keys]
    table = []
    for (update, split), data in result.rows.items():
        for i in range(data.m.size):
            row = [update, split, int(data.example[i]), float(data.m[i]), float(data.L_p[i]), float(data.L_n[i]),
                   int(data.T_p[i]), int(data.T_n[i])]
            for variant in VARIANTS:
                odds = data.log_odds[variant]
                row += [float(odds.pref[i]), float(odds.util[i]), bool(odds.clamped[i])]
            row += [_csv_value(data.manifold[key][i]) if key in data.manifold else "" for key in manifold_keys]
            table.append(row)
    write_csv(files["per_example.csv"], header, table)

    header = ["update", "split", "variant", "quantity", "m", "mean", "sem", "ci_low", "ci_high", "n", "n_clamped"]
    table = []
    for (update, split, variant), pair in result.curves.items():
        for quantity in ("preference", "utility"):
            table += _curve_rows([update, split, variant, quantity], getattr(pair, quantity))
    write_csv(files["curves.csv"], header, table)

    fits_json = {f"{update}/{variant}": fit.to_dict() for (update, variant), fit in result.fits.items()}
    write_json(files["fits.json"], fits_json)
    header = ["update", "variant", "quantity", "fit_split", "r2_fit_split", "r2_other_splits", "poor_fit",
              "breakdown_negative", "breakdown_positive", "linear_region", "params", "warnings", "error"]
    table = []
    for (update, variant), fit in result.fits.items():
        for quantity in ("preference", "utility"):
            decay = getattr(fit, quantity)
            if decay is None:
                table.append([update, variant, quantity, fit.fit_split, "", "", "", "", "", "", "", "",
                              fit.errors.get(quantity, "")])
                continue
            regions = decay.regions()
            others = {s: r for s, r in fit.r2[quantity].items() if s != fit.fit_split}
            table.append([update, variant, quantity, fit.fit_split, _csv_value(decay.r2), json.dumps(others),
                          decay.poor_fit, decay.breakdown_negative, decay.breakdown_positive,
                          json.dumps([regions.linear_negative, regions.linear_positive]), json.dumps(decay.params),
                          "; ".join(decay.warnings), ""])
    write_csv(files["fits.csv"], header, table)

    header = ["update", "split", "layer", "metric", "m", "mean", "sem", "ci_low", "ci_high", "n", "n_clamped"]
    table = []
    for (update, split, layer, metric), curve in result.manifold.items():
        table += _curve_rows([update, split, layer, metric], curve)
    write_csv(files["manifold.csv"], header, table)
    header = ["update", "split", "layer", "metric", "variant", "m_min", "m_max", "n_points", "pearson_r",
              "pearson_p", "spearman_rho", "spearman_p", "note"]
    write_csv(files["manifold_correlations.csv"], header,
               [[_csv_value(c[k]) for k in header] for c in result.correlations])

    write_json(files["tradeoff.json"], {"/".join(key): t.to_dict() for key, t in result.tradeoff.items()})
    write_json(files["confounds.json"], {"/".join(key): c.to_dict() for key, c in result.confounds.items()})
    summary = {
        "sweep": result.info,
        "curves": {f"{u}/{s}/{v}": {"preference": p.preference.to_dict(), "utility": p.utility.to_dict()}
                   for (u, s, v), p in result.curves.items()},
        "fits": fits_json,
        "manifold": {f"{u}/{s}/{layer}/{metric}": c.to_dict() for (u, s, layer, metric), c in result.manifold.items()},
        "manifold_correlations": result.correlations,
    }
    write_json(files["summary.json"], summary)
    return files


def _curve_rows(prefix: list[Any], curve: AggregatedCurve) -> list[list[Any]]:
    return [[*prefix, float(m), a.mean, _csv_value(a.sem), _csv_value(a.ci_low), _csv_value(a.ci_high), a.n,
             a.n_clamped] for m, a in zip(curve.m, curve.aggregates, strict=True)]


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)) and not math.isfinite(float(value)):
        return ""
    return value
