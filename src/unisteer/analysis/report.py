"""The sweep report: PNG plots, a self-contained HTML page (images embedded) and a Markdown twin.

    from unisteer.analysis.report import write_report
    write_report("out/")        # fits the sweep if needed (unisteer.analysis.fits.fit_sweep), returns out/report.html

Contents: the settings (model, layers, datasets with split seeds and sizes, grids), an account of where the
measured curves agree with the paper's shapes and where they do not (generated from the numbers by the rules
in `observations`), tables of the fits (parameters, R² on the fit split and of that fit on the other splits,
breakdown multipliers, regions) and of clamped points, the manifold measurement and its correlation with
utility, and the plots: preference and utility vs m with fits and regions per update, all updates sharing a
multiplier range on one chart, preference-vs-utility trade-offs, manifold distance vs m and utility vs
distance.
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..files import write_text
from .fits import SweepFits, UpdateFit, fit_sweep
from .fitting import DecayFit
from .logodds import VARIANTS, AggregatedCurve
from .manifold import METRICS
from .plots import Curve, Reference, TradeoffCurve, UpdateDynamics, plot_dynamics, plot_metric, plot_tradeoff

GOOD_R2 = 0.9
MODERATE_R2 = 0.7
NEAR_ZERO_SHARE = 0.15  # a utility peak within this share of the multiplier range counts as "near m = 0"
STRONG_CORRELATION = 0.5
METRIC_LABELS = {"off_subspace": "off-subspace residual", "nearest_neighbour": "nearest-neighbour distance"}


# ---------------------------------------------------------------------------------------------- document


@dataclass
class Block:
    kind: str  # "h2", "h3", "p", "ul", "table", "img"
    text: str = ""
    items: Sequence[str] = ()
    header: Sequence[str] = ()
    rows: Sequence[Sequence[Any]] = ()
    path: Path | None = None


def write_report(out_dir: str | Path, *, fits: SweepFits | None = None, variant: str | None = None,
                 title: str | None = None) -> Path:
    """Write `plots/*.png`, `report.html` and `report.md` into the sweep folder; return the HTML path."""
    out = Path(out_dir)
    fits = fits or fit_sweep(out)
    variant = variant or fits.info["config"]["variant"]
    if variant not in VARIANTS:
        raise ConfigError(f"report variant: {variant!r} is not one of {VARIANTS}")
    title = title or f"unisteer sweep — {', '.join(fits.updates)}"
    plots = make_plots(fits, variant, out / "plots")
    blocks = _document(fits, variant, plots)
    html_path = out / "report.html"
    write_text(html_path, render_html(title, blocks, out))
    write_text(out / "report.md", render_markdown(title, blocks, out))
    return html_path


# ---------------------------------------------------------------------------------------------- plots


def _curve(label: str, curve: AggregatedCurve) -> Curve:
    return Curve.from_aggregated(label, curve)


def _file_name(*parts: Any) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", "_".join(str(p) for p in parts)) + ".png"


def make_plots(fits: SweepFits, variant: str, folder: Path) -> list[tuple[str, Path]]:
    """Every chart of the report, as (caption, path)."""
    plots: list[tuple[str, Path]] = []
    splits = fits.splits
    dynamics = {update: _dynamics(fits, update, variant) for update in fits.updates}
    for update, item in dynamics.items():
        shown = [s for s in splits if s in item.preference]
        path = plot_dynamics(folder / _file_name("dynamics", update, variant), [item], splits=shown,
                             title=f"{update} — {variant} log-odds vs m")
        plots.append((f"{update}: preference (top) and utility (bottom) log-odds vs m per split, with the fit on "
                      f"'{_fit_split(fits, update, variant)}' (regions shaded, breakdown dotted)", path))
    for span, members in _by_range(fits).items():
        if len(members) > 1:
            path = plot_dynamics(folder / _file_name("dynamics", "range", f"{span:g}", variant),
                                 [dynamics[u] for u in members], splits=splits, shade_regions=False,
                                 title=f"updates swept over |m| ≤ {span:g}")
            plots.append((f"all updates swept over |m| ≤ {span:g} on one chart", path))
    for split in splits:
        curves = [TradeoffCurve.from_curves(update, _curve(update, pair.preference), _curve(update, pair.utility))
                  for (update, s, v), pair in fits.curves.items() if s == split and v == variant]
        if curves:
            path = plot_tradeoff(folder / _file_name("tradeoff", split, variant), curves,
                                 title=f"preference vs utility — {split} ({variant})")
            plots.append((f"trade-off on '{split}': each point one multiplier (up and right is better)", path))
    for split in splits:
        for metric in METRICS:
            curves = [_curve(f"{update} @ layer {layer}", curve)
                      for (update, s, layer, name), curve in fits.manifold.items() if s == split and name == metric]
            if not curves:
                continue
            path = plot_metric(folder / _file_name("manifold", metric, split), curves,
                               ylabel=f"{METRIC_LABELS[metric]} (× unsteered)",
                               title=f"distance from the unsteered activations — {split}",
                               references=[Reference(1.0, "unsteered (m = 0)")])
            plots.append((f"{METRIC_LABELS[metric]} of the steered hidden states vs m on '{split}' "
                          "(1 = as close as the unsteered model)", path))
            vs_utility = []
            for (update, s, layer, name), curve in fits.manifold.items():
                if s != split or name != metric:
                    continue
                utility = fits.curves[(update, split, variant)].utility
                _, i, j = np.intersect1d(curve.m, utility.m, return_indices=True)
                vs_utility.append(Curve(f"{update} @ layer {layer}", curve.mean[i], utility.mean[j]))
            path = plot_metric(folder / _file_name("utility_vs", metric, split, variant), vs_utility,
                               ylabel=f"UtilOdds ({variant})", xlabel=f"{METRIC_LABELS[metric]} (× unsteered)",
                               title=f"utility vs distance — {split}")
            plots.append((f"utility against {METRIC_LABELS[metric]} on '{split}' (one point per m)", path))
    return plots


def _dynamics(fits: SweepFits, update: str, variant: str) -> UpdateDynamics:
    preference, utility = {}, {}
    for split in fits.splits:
        pair = fits.curves.get((update, split, variant))
        if pair is not None:
            preference[split] = _curve(split, pair.preference)
            utility[split] = _curve(split, pair.utility)
    fit = fits.fits.get((update, variant))
    return UpdateDynamics(update, preference, utility, None if fit is None else fit.preference,
                          None if fit is None else fit.utility)


def _by_range(fits: SweepFits) -> dict[float, list[str]]:
    groups: dict[float, list[str]] = {}
    for update in fits.updates:
        groups.setdefault(float(np.max(np.abs(fits.info["grids"][update]))), []).append(update)
    return groups


def _fit_split(fits: SweepFits, update: str, variant: str) -> str:
    fit = fits.fits.get((update, variant))
    return fit.fit_split if fit is not None else "-"


# ---------------------------------------------------------------------------------------------- account


def observations(fits: SweepFits, variant: str) -> list[str]:
    """Plain statements of what the measured curves show, driven by confidence intervals.

    An effect at m is a paired change from m = 0 (per example, then averaged) whose 95 % interval excludes 0;
    verdicts use the held-out split ('test') when the sweep has one, else the fit split, and say which.
    Fitted shapes (saturation, breakdown) are only described where the fit is good and determined by the data.
    """
    notes = []
    for update in fits.updates:
        fit = fits.fits.get((update, variant))
        if fit is None:
            continue
        split = _verdict_split(fits, update, variant, fit.fit_split)
        pair = fits.curves[(update, split, variant)]
        where = f"on '{split}'" + ("" if split == "test" else " (no held-out split was swept)")
        notes.append(f"<b>{update}</b> — preference {where}: " + _preference_note(fit, pair) + " Utility: "
                     + _utility_note(fit, pair) + _transfer_note(fit) + _clamp_note(fits, update, variant))
        manifold = _manifold_note(fits, update, variant, fit.fit_split)
        if manifold:
            notes.append(f"<b>{update}</b> — manifold: {manifold}")
        notes += tradeoff_notes(fits, update, variant, split)
    return notes


def tradeoff_notes(fits: SweepFits, update: str, variant: str, split: str) -> list[str]:
    """F3 (where utility peaks), F4 (does distance track utility) and the confound checks, as sentences."""
    notes = []
    where = f"on '{split}'"
    tradeoff = fits.tradeoff.get((update, split, variant))
    if tradeoff is not None:
        notes.append(f"<b>{update}</b> — trade-off {where}: {tradeoff.peak.sentence()}.")
        tracked = [t.sentence(f"{METRIC_LABELS[t.metric]}") for t in tradeoff.manifold]
        if tracked:
            notes.append(f"<b>{update}</b> — manifold account {where}: " + "; ".join(tracked) + ".")
    confounds = fits.confounds.get((update, split, variant))
    if confounds is not None:
        notes.append(f"<b>{update}</b> — length and perplexity {where}: {confounds.sentence()}.")
    return notes


def _verdict_split(fits: SweepFits, update: str, variant: str, fit_split: str) -> str:
    return "test" if (update, "test", variant) in fits.curves else fit_split


def _quality(decay: DecayFit) -> str:
    if decay.undetermined:
        return "not determined by the data (its variation is within the noise), so its shape means nothing"
    r2 = decay.r2
    if r2 is None:
        return "undefined (flat data)"
    word = "good" if r2 >= GOOD_R2 else "moderate" if r2 >= MODERATE_R2 else "poor"
    return f"{word} (R² = {r2:.3f})"


@dataclass(frozen=True)
class _Effect:
    m: float
    change: float
    low: float
    high: float

    def text(self, quantity: str) -> str:
        word = "rises" if self.change > 0 else "falls"
        return f"{quantity} {word} by {abs(self.change):.2f} [{self.low:+.2f}, {self.high:+.2f}] at m = {self.m:g}"


def _effects(change: AggregatedCurve | None) -> list[_Effect]:
    """Multipliers whose paired change from m = 0 has an interval excluding 0."""
    if change is None:
        return []
    out = []
    for i, m in enumerate(change.m):
        low, high = change.ci_low[i], change.ci_high[i]
        if m != 0 and math.isfinite(low) and math.isfinite(high) and (low > 0 or high < 0):
            out.append(_Effect(float(m), float(change.mean[i]), float(low), float(high)))
    return out


def _largest(effects: list[_Effect], *, positive_m: bool, rising: bool) -> _Effect | None:
    chosen = [e for e in effects if (e.m > 0) == positive_m and (e.change > 0) == rising]
    return max(chosen, key=lambda e: abs(e.change)) if chosen else None


def _preference_note(fit: UpdateFit, pair) -> str:
    effects = _effects(pair.preference_change)
    toward = _largest(effects, positive_m=True, rising=True)
    away = _largest(effects, positive_m=False, rising=False)
    wrong = [e for e in (_largest(effects, positive_m=True, rising=False), _largest(effects, positive_m=False,
                                                                                  rising=True)) if e]
    parts = []
    if toward:
        parts.append(toward.text("PrefOdds") + " (toward the concept)")
    if away:
        parts.append(away.text("PrefOdds") + " (away from it)")
    if toward or away:
        text = "steers: " + "; ".join(parts) + " (paired change from m = 0, 95 % interval)."
    elif wrong:
        text = "steers the wrong way round:"
    else:
        text = ("does not steer measurably: no multiplier changes PrefOdds from its m = 0 value beyond the 95 % "
                "interval of the paired change.")
    if wrong:
        text += (" " if not (toward or away) else " It also moves the wrong way: ") + \
            "; ".join(e.text("PrefOdds") for e in wrong) + \
            " — opposite to the paper, where positive m steers toward the concept."
    decay = fit.preference
    if decay is None:
        return text + f" Fit failed: {fit.errors.get('preference', 'no fit')}."
    text += f" Fit on '{fit.fit_split}': {_quality(decay)}."
    if _trustworthy(decay):
        text += _saturation_note(decay, pair.preference.m)
    return text


def _trustworthy(decay: DecayFit) -> bool:
    return not decay.undetermined and decay.r2 is not None and decay.r2 >= GOOD_R2 and not decay.poor_fit


def _saturation_note(decay: DecayFit, m: np.ndarray) -> str:
    ends = {"positive": float(m.max()), "negative": float(m.min())}
    parts = []
    for side, end in ends.items():
        if (side == "positive" and end <= 0) or (side == "negative" and end >= 0):
            continue
        validity = float(decay.decay(np.array([end]))[0])
        breakdown = decay.breakdown_positive if side == "positive" else decay.breakdown_negative
        if validity > 0.5:
            parts.append(f"on the {side} side no saturation within the grid (validity D = {validity:.2f} at "
                         f"m = {end:g}; the fitted breakdown, {breakdown:.3g}, lies outside the grid)")
        elif (breakdown > 0) == (side == "positive"):
            parts.append(f"on the {side} side it saturates (breakdown, D = 1/2, at m = {breakdown:.3g})")
        else:
            parts.append(f"on the {side} side it decays, but its breakdown lies at m = {breakdown:.3g}, on the "
                         "other side of 0 (a degenerate fit, not a breakdown point)")
    return (" Fitted decay: " + "; ".join(parts) + ".") if parts else ""


def _utility_note(fit: UpdateFit, pair) -> str:
    curve = pair.utility
    m, mean = curve.m, curve.mean
    zero = np.flatnonzero(m == 0.0)
    text = f"UtilOdds at m = 0 is {mean[zero[0]]:.2f}. " if zero.size else ""
    effects = _effects(pair.utility_change)
    drops = [e for e in (_largest(effects, positive_m=True, rising=False),
                         _largest(effects, positive_m=False, rising=False)) if e]
    gains = [e for e in effects if e.change > 0]
    if drops:
        text += "It falls: " + "; ".join(e.text("UtilOdds") for e in drops) + "."
    else:
        text += "No multiplier lowers it beyond the 95 % interval of the paired change: no utility cost measured."
    if gains:
        best = max(gains, key=lambda e: e.change)
        span = float(np.max(np.abs(m))) or 1.0
        where = "near m = 0" if abs(best.m) <= NEAR_ZERO_SHARE * span else "away from m = 0, unlike the paper"
        text += (f" It is higher than at m = 0 at {len(gains)} multiplier(s), most at m = {best.m:g} "
                 f"(+{best.change:.2f} [{best.low:+.2f}, {best.high:+.2f}], {where}): the steered model finds these "
                 "completions more likely than the plain model does.")
    elif drops:
        text += " Its peak is at m = 0, as in the paper."
    decay = fit.utility
    if decay is None:
        return text + f" Fit failed: {fit.errors.get('utility', 'no fit')}."
    return text + f" Fit on '{fit.fit_split}': {_quality(decay)}."


def _half_ci(curve: AggregatedCurve, index: int) -> float:
    low, high = curve.ci_low[index], curve.ci_high[index]
    return 0.0 if not (math.isfinite(low) and math.isfinite(high)) else float(high - low) / 2


def _transfer_note(fit: UpdateFit) -> str:
    parts = []
    for quantity in ("preference", "utility"):
        decay = getattr(fit, quantity)
        if decay is None or decay.undetermined:
            continue
        scores = fit.r2.get(quantity, {})
        own = scores.get(fit.fit_split)
        for split, value in scores.items():
            if split == fit.fit_split or value is None or own is None:
                continue
            verdict = "transfers" if value >= own - 0.1 else "transfers poorly"
            parts.append(f"the {quantity} fit on '{fit.fit_split}' {verdict} to '{split}' (R² {value:.3f} vs {own:.3f})")
    return (" Generalisation: " + "; ".join(parts) + ".") if parts else ""


def _clamp_note(fits: SweepFits, update: str, variant: str) -> str:
    total = clamped = 0
    for (u, _split), rows in fits.rows.items():
        if u == update:
            total += rows.m.size
            clamped += int(rows.log_odds[variant].clamped.sum())
    if not clamped:
        return ""
    return (f" {clamped} of {total} per-example points were clamped (1 − S < ε): their UtilOdds is the cap "
            "log S − log ε, not a measured value.")


def _manifold_note(fits: SweepFits, update: str, variant: str, split: str) -> str:
    rows = [c for c in fits.correlations if c["update"] == update and c["split"] == split
            and c["variant"] == variant and c["spearman_rho"] is not None]
    if not rows:
        return ""
    parts = []
    for c in sorted(rows, key=lambda c: (c["metric"], c["layer"])):
        rho = c["spearman_rho"]
        verdict = ("distance grows where utility falls, as the manifold view predicts" if rho <= -STRONG_CORRELATION
                   else "no strong monotone relation" if abs(rho) < STRONG_CORRELATION
                   else "distance and utility rise together, against the manifold view")
        parts.append(f"{METRIC_LABELS[c['metric']]} at layer {c['layer']}: Spearman ρ = {rho:.2f}, "
                     f"Pearson r = {c['pearson_r']:.2f} ({verdict})")
    return "on '" + split + "', " + "; ".join(parts) + "."


# ---------------------------------------------------------------------------------------------- tables


def _document(fits: SweepFits, variant: str, plots: list[tuple[str, Path]]) -> list[Block]:
    info = fits.info
    blocks = [Block("p", f"Generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC from {fits.out_dir}. "
                          f"Log-odds variant shown: <b>{variant}</b> "
                          f"({'sequence sums, the exact definition' if variant == 'sum' else 'per-token means'}); "
                          "both variants are in the tables and CSV files.")]
    used = sorted({fit.fit_split for fit in fits.fits.values()})
    blocks += [Block("h2", "Settings"),
               Block("table", header=["setting", "value"], rows=_settings_rows(info, used))]
    blocks += [Block("table", header=["split", "pairs", "content hash", "source"],
                      rows=[[name, rec["size"], rec["hash"][:12], rec["name"]] for name, rec in info["splits"].items()])]
    blocks += [Block("table", header=["update", "form", "layer", "insertion", "positions", "multipliers"],
                      rows=[[name, u["form"], u["layer"], u["insertion"], u["positions"], _grid_text(info["grids"][name])]
                            for name, u in info["updates"].items() if name in fits.updates])]
    blocks += [Block("h2", "What the curves show"),
               Block("p", "Statements generated from the numbers below by fixed rules, on the fit split. The paper "
                           "(SPEC §8, Gemma-2-9B and Qwen-2.5-7B) reports preference rising linearly in m and then "
                           "saturating, utility peaking near m = 0 and falling with |m|, and fits with R² of "
                           f"0.93–0.99. Fit quality here: good ≥ {GOOD_R2}, moderate ≥ {MODERATE_R2}, else poor."),
               Block("ul", items=observations(fits, variant))]
    for v in (variant, *[x for x in VARIANTS if x != variant]):
        blocks += [Block("h2", f"Fits ({v} variant)"),
                   Block("table", header=["update", "quantity", "fit split", "R² (fit split)", "R² of that fit on",
                                           "breakdown −", "breakdown +", "linear region", "convergence beyond",
                                           "parameters", "warnings"],
                          rows=_fit_rows(fits, v))]
    blocks += [Block("h2", "Clamped points"),
               Block("p", "Where 1 − S < ε the utility log-odds is capped; counts per update, split and variant."),
               Block("table", header=["update", "split", "variant", "clamped", "rows", "multipliers with clamps"],
                      rows=_clamp_rows(fits))]
    if fits.manifold:
        blocks += [Block("h2", "Manifold measurement"),
                   Block("p", "Distances of the steered hidden states (last prompt token and every completion token) "
                               "from the unsteered ones on the same data, relative to the unsteered spread (1 at "
                               "m = 0). Off-subspace: residual outside the top-k principal subspace. Nearest "
                               "neighbour: distance to the closest unsteered point of another example."),
                   Block("table", header=["split", "layer", "rank k", "variance in subspace", "reference points",
                                           "reference examples"], rows=_reference_rows(info)),
                   Block("table", header=["update", "split", "layer", "metric", "variant", "Pearson r", "Spearman ρ",
                                           "multipliers", "note"], rows=_correlation_rows(fits))]
    if fits.tradeoff:
        blocks += [Block("h2", "The trade-off: where utility peaks, and what tracks it"),
                   Block("p", "Peak: the multiplier of highest mean UtilOdds, with the bootstrap interval (over "
                               "examples) of its location; 'falls' on a side when some multiplier there has a paired "
                               "difference from the peak whose 95 % interval lies below 0. Distance–utility: "
                               "Spearman ρ across multipliers of the per-m means, with a bootstrap interval."),
                   Block("table", header=["update", "split", "variant", "peak m", "interval", "UtilOdds at peak",
                                           "at m = 0", "falls below / above", "distance–utility ρ [interval]"],
                          rows=_tradeoff_rows(fits))]
    if fits.confounds:
        blocks += [Block("h2", "Length and perplexity: balance and orthogonality"),
                   Block("p", "Balance: the paired positive − negative difference of completion length and of the "
                               "plain model's per-token NLL, as a standardised mean difference. Orthogonality: Spearman "
                               "ρ across examples of the scores (at m = 0, and their change over +m and −m) against "
                               "those features. Flagged: interval excludes 0 and |ρ| ≥ 0.3 or |SMD| ≥ 0.2."),
                   Block("table", header=["update", "split", "variant", "check", "value", "interval", "flagged"],
                          rows=_confound_rows(fits))]
    blocks += [Block("h2", "Plots")]
    for caption, path in plots:
        blocks += [Block("img", text=caption, path=path)]
    blocks += [Block("h2", "Files"),
               Block("ul", items=[f"{name}: {_describe_file(name)}" for name in sorted(fits.files)])]
    return blocks


def _settings_rows(info: dict[str, Any], fit_splits: Sequence[str]) -> list[list[Any]]:
    model, config, encoder = info["model"], info["config"], info["encoder"]
    rows = [["model", f"{model['id']} ({model['dtype']}, {model['num_layers']} layers, d = {model['hidden_size']})"],
            ["prompt rendering", f"chat template: {encoder['chat_template']}, max length {encoder['max_length']}"],
            ["aggregation", f"mean over examples, standard error, {config['ci_level']:.0%} percentile bootstrap CI "
                            f"({config['n_boot']} resamples, seed {config['seed']}); clamp ε = {config['eps']:g}"],
            ["fits fitted on", ", ".join(fit_splits) + ("" if list(fit_splits) == [config["fit_split"]] else
                                                         f" (configured: {config['fit_split']}, which has no rows)")]]
    manifold = info.get("manifold", {})
    if manifold.get("layers"):
        rows.append(["manifold", f"layers {manifold['layers']}, subspace variance {manifold['variance']}, "
                                 f"up to {manifold['max_examples']} reference examples"])
    for key, value in info.get("settings", {}).items():
        rows.append([key, _settings_text(value)])
    return rows


def _settings_text(value: Any) -> str:
    if isinstance(value, dict):
        splits = value.get("splits")
        if isinstance(splits, dict) and "seed" in splits:
            return (f"{value.get('name', '')}: split seed {splits['seed']}, sizes {splits.get('sizes')}"
                    f"{', files ' + ', '.join(map(str, value['files'])) if value.get('files') else ''}")
        return ", ".join(f"{k}: {v}" for k, v in value.items())
    return str(value)


def _grid_text(grid: Sequence[float]) -> str:
    values = np.asarray(grid, dtype=np.float64)
    steps = np.unique(np.round(np.diff(values), 12))
    if values.size > 3 and steps.size == 1:
        return f"{values[0]:g} … {values[-1]:g} step {steps[0]:g} ({values.size} points)"
    return ", ".join(f"{v:g}" for v in values)


def _fit_rows(fits: SweepFits, variant: str) -> list[list[Any]]:
    rows = []
    for (update, v), fit in fits.fits.items():
        if v != variant:
            continue
        for quantity in ("preference", "utility"):
            decay = getattr(fit, quantity)
            if decay is None:
                rows.append([update, quantity, fit.fit_split, "fit failed", fit.errors.get(quantity, ""), "", "", "", "",
                             "", ""])
                continue
            regions = decay.regions()
            others = ", ".join(f"{s}: {format_number(r)}" for s, r in fit.r2[quantity].items() if s != fit.fit_split)
            params = ", ".join(f"{k}={format_number(p)}" for k, p in decay.params.items())
            rows.append([update, quantity, fit.fit_split, format_number(decay.r2), others or "-",
                         format_number(decay.breakdown_negative), format_number(decay.breakdown_positive),
                         f"[{format_number(regions.linear_negative)}, {format_number(regions.linear_positive)}]",
                         f"< {format_number(regions.convergence_negative)}, > {format_number(regions.convergence_positive)}",
                         params, "; ".join(decay.warnings) or "-"])
    return rows


def _clamp_rows(fits: SweepFits) -> list[list[Any]]:
    rows = []
    for (update, split), data in fits.rows.items():
        for variant in VARIANTS:
            mask = data.log_odds[variant].clamped
            where = sorted({float(m) for m in data.m[mask]})
            rows.append([update, split, variant, int(mask.sum()), int(mask.size),
                         ", ".join(f"{m:g}" for m in where) or "-"])
    return rows


def _reference_rows(info: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for split, layers in info.get("manifold_reference", {}).items():
        for layer, ref in layers.items():
            rows.append([split, layer, ref["rank"], format_number(ref["explained_variance"]), ref["n_points"],
                         ref["n_examples"]])
    return rows


def _correlation_rows(fits: SweepFits) -> list[list[Any]]:
    return [[c["update"], c["split"], c["layer"], METRIC_LABELS[c["metric"]], c["variant"], format_number(c["pearson_r"]),
             format_number(c["spearman_rho"]), c["n_points"], c["note"] or "-"] for c in fits.correlations]


def _tradeoff_rows(fits: SweepFits) -> list[list[Any]]:
    rows = []
    for (update, split, variant), t in fits.tradeoff.items():
        peak = t.peak
        tracked = "; ".join(
            f"{METRIC_LABELS[m.metric]} L{m.layer}: {format_number(m.spearman_rho)}"
            + (f" [{m.spearman_ci[0]:.2f}, {m.spearman_ci[1]:.2f}]" if m.spearman_ci else "") for m in t.manifold)
        rows.append([update, split, variant, f"{peak.m:g}", f"[{peak.ci[0]:g}, {peak.ci[1]:g}]",
                     format_number(peak.value), format_number(peak.value_at_zero),
                     f"{_yes_no(peak.falls_below)} / {_yes_no(peak.falls_above)}", tracked or "-"])
    return rows


def _yes_no(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


def _confound_rows(fits: SweepFits) -> list[list[Any]]:
    rows = []
    for (update, split, variant), report in fits.confounds.items():
        for check in (*report.balance, *report.orthogonality):
            interval = "-" if check.ci is None else f"[{check.ci[0]:.2f}, {check.ci[1]:.2f}]"
            rows.append([update, split, variant, check.name, check.note or format_number(check.value), interval,
                         "FLAG" if check.flagged else ""])
    return rows


def _describe_file(name: str) -> str:
    return {
        "per_example.csv": "every (update, split, example, m): L_p, L_n, token counts, log-odds of both variants, "
                           "clamp flags, manifold metrics",
        "curves.csv": "per (update, split, variant, quantity, m): mean, standard error, bootstrap CI, n, clamped",
        "fits.json": "fit parameters, R², breakdown multipliers, regions, warnings",
        "fits.csv": "the fits as a table",
        "manifold.csv": "per (update, split, layer, metric, m): mean distance with CI",
        "manifold_correlations.csv": "Pearson/Spearman of distance vs utility across m",
        "tradeoff.json": "per (update, split, variant): the utility peak with its bootstrap interval, whether "
                         "utility falls on each side, distance–utility correlations with intervals",
        "confounds.json": "per (update, split, variant): balance and orthogonality checks against completion "
                          "length and plain-model NLL, with intervals and flags",
        "summary.json": "all of the above in one file, with the sweep settings",
    }.get(name, "")


def format_number(value: Any) -> str:
    if value is None:
        return "-"
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.3e}"


# ---------------------------------------------------------------------------------------------- rendering

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.85em}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}th{background:#f3f3f3}
figure{margin:1.2em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.9em;color:#555}
li{margin:.35em 0}
"""


def render_html(title: str, blocks: Sequence[Block], out: Path) -> str:
    parts = [f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    for block in blocks:
        if block.kind in ("h2", "h3"):
            parts.append(f"<{block.kind}>{html.escape(block.text)}</{block.kind}>")
        elif block.kind == "p":
            parts.append(f"<p>{_inline_html(block.text)}</p>")
        elif block.kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{_inline_html(item)}</li>" for item in block.items) + "</ul>")
        elif block.kind == "table":
            head = "".join(f"<th>{html.escape(str(h))}</th>" for h in block.header)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                           for row in block.rows)
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif block.kind == "img":
            assert block.path is not None
            data = base64.b64encode(block.path.read_bytes()).decode("ascii")
            parts.append(f"<figure><img alt='{html.escape(block.text)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{html.escape(block.text)}</figcaption></figure>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _inline_html(text: str) -> str:
    """Escape everything except the <b> tags the account uses for emphasis."""
    return html.escape(text).replace("&lt;b&gt;", "<b>").replace("&lt;/b&gt;", "</b>")


def render_markdown(title: str, blocks: Sequence[Block], out: Path) -> str:
    lines = [f"# {title}", ""]
    for block in blocks:
        if block.kind == "h2":
            lines += [f"## {block.text}", ""]
        elif block.kind == "h3":
            lines += [f"### {block.text}", ""]
        elif block.kind == "p":
            lines += [_inline_markdown(block.text), ""]
        elif block.kind == "ul":
            lines += [f"- {_inline_markdown(item)}" for item in block.items] + [""]
        elif block.kind == "table":
            lines.append("| " + " | ".join(_cell(h) for h in block.header) + " |")
            lines.append("|" + "---|" * len(block.header))
            lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in block.rows]
            lines.append("")
        elif block.kind == "img":
            assert block.path is not None
            lines += [f"![{block.text}]({block.path.relative_to(out).as_posix()})", "", f"*{block.text}*", ""]
    return "\n".join(lines)


def _inline_markdown(text: str) -> str:
    return text.replace("<b>", "**").replace("</b>", "**")


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


__all__ = ["Block", "format_number", "make_plots", "observations", "render_html", "render_markdown", "write_report"]
