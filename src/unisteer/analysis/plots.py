"""Charts of the preference–utility dynamics, trade-offs and generic metrics against the multiplier m.

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas, never through ``pyplot``: no window is
ever opened, no global backend is switched (a notebook importing this module keeps its own), and nothing is
shared between calls. Every function writes one PNG and returns its path.

Inputs are plain dataclasses so that the sweep module (or a user) can build them from any source:
``Curve`` (a mean per multiplier with an optional CI band), ``UpdateDynamics`` (preference and utility
curves per split plus optional fits) and ``TradeoffCurve`` (preference vs utility, one point per m)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ..errors import PlotError
from .fitting import CONVERGENCE_THRESHOLD, LINEAR_THRESHOLD, DecayFit, score
from .logodds import AggregatedCurve

REGION_COLORS: dict[str, str] = {
    "linear": "#b7e4c7",
    "transitional": "#ffe8a3",
    "convergence": "#f4b6b6",
}


_DPI = 120


_FIT_GRID_POINTS = 400


PALETTE = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)


@dataclass(frozen=True)
class Curve:
    """A quantity against the multiplier: ``mean[i]`` at ``m[i]``, with an optional CI band.

    ``ci_low``/``ci_high`` may contain NaN where an interval is undefined (e.g. a single example); the band
    is simply not drawn there.
    """

    label: str
    m: np.ndarray
    mean: np.ndarray
    ci_low: np.ndarray | None = None
    ci_high: np.ndarray | None = None

    def __post_init__(self) -> None:
        m = _vector(self.m, f"curve {self.label!r}: m")
        object.__setattr__(self, "m", m)
        object.__setattr__(self, "mean", _vector(self.mean, f"curve {self.label!r}: mean", m.size))
        if (self.ci_low is None) != (self.ci_high is None):
            raise PlotError(f"curve {self.label!r}: give both ci_low and ci_high, or neither")
        if self.ci_low is not None:
            object.__setattr__(self, "ci_low", _vector(self.ci_low, f"curve {self.label!r}: ci_low", m.size))
            object.__setattr__(
                self, "ci_high", _vector(self.ci_high, f"curve {self.label!r}: ci_high", m.size)
            )

    @classmethod
    def from_aggregated(cls, label: str, curve: AggregatedCurve) -> Curve:
        """From ``unisteer.analysis.logodds.aggregate_per_multiplier`` output."""
        return cls(label, curve.m, curve.mean, curve.ci_low, curve.ci_high)


@dataclass(frozen=True)
class UpdateDynamics:
    """Preference and utility curves of one update, keyed by split name (e.g. "train", "test").

    The fits (usually fitted on the train split) are overlaid on every split, so the test panels show how
    the train fit generalises; their R² on each split's mean curve is shown in the legend.
    """

    label: str
    preference: Mapping[str, Curve]
    utility: Mapping[str, Curve]
    preference_fit: DecayFit | None = None
    utility_fit: DecayFit | None = None


@dataclass(frozen=True)
class TradeoffCurve:
    """Preference against utility for one method; each point is one multiplier ``m[i]``."""

    label: str
    m: np.ndarray
    preference: np.ndarray
    utility: np.ndarray

    def __post_init__(self) -> None:
        m = _vector(self.m, f"trade-off {self.label!r}: m")
        object.__setattr__(self, "m", m)
        for name in ("preference", "utility"):
            object.__setattr__(
                self, name, _vector(getattr(self, name), f"trade-off {self.label!r}: {name}", m.size)
            )

    @classmethod
    def from_curves(cls, label: str, preference: Curve, utility: Curve) -> TradeoffCurve:
        """Pair the means of a preference and a utility curve measured at the same multipliers."""
        if preference.m.shape != utility.m.shape or not np.array_equal(preference.m, utility.m):
            raise PlotError(f"trade-off {label!r}: preference and utility curves have different multipliers")
        return cls(label, preference.m, preference.mean, utility.mean)


@dataclass(frozen=True)
class Reference:
    """A horizontal reference line on a metric chart (e.g. the unsteered model's value)."""

    value: float
    label: str
    style: dict[str, Any] = field(default_factory=lambda: {"color": "0.4", "linestyle": "--"})


def plot_dynamics(
    path: str | Path,
    updates: Sequence[UpdateDynamics],
    *,
    splits: Sequence[str] = ("train", "test"),
    title: str | None = None,
    shade_regions: bool = True,
    linear_threshold: float = LINEAR_THRESHOLD,
    convergence_threshold: float = CONVERGENCE_THRESHOLD,
) -> Path:
    """Preference (top row) and utility (bottom row) log-odds vs m, one column per split.

    Each update gets a colour: points with CI bands, its fitted curve, and dotted vertical lines at its
    breakdown multipliers (D = 1/2). With ``shade_regions`` the linear / transitional / convergence regions
    of the first update's fits are shaded (one set of regions keeps a multi-update chart readable).
    """
    if not updates:
        raise PlotError("plot_dynamics needs at least one update")
    if not splits:
        raise PlotError("plot_dynamics needs at least one split")
    for split in splits:
        if not any(split in u.preference or split in u.utility for u in updates):
            raise PlotError(f"split {split!r} is in none of the updates ({[u.label for u in updates]})")

    fig = Figure(figsize=(5.2 * len(splits), 7.6), layout="constrained")
    axes = fig.subplots(2, len(splits), sharex=True, squeeze=False)
    rows = (("preference", "PrefOdds (log-odds)"), ("utility", "UtilOdds (log-odds)"))
    for col, split in enumerate(splits):
        for row, (quantity, ylabel) in enumerate(rows):
            ax = axes[row][col]
            for index, update in enumerate(updates):
                color = PALETTE[index % len(PALETTE)]
                curve = getattr(update, quantity).get(split)
                fit = getattr(update, f"{quantity}_fit")
                if shade_regions and index == 0 and fit is not None:
                    span = _x_span(updates, quantity, split)
                    draw_regions(ax, fit, span, linear_threshold, convergence_threshold)
                if curve is not None:
                    # Without a fit, a thin line joins the points; with one, the fitted curve is the line.
                    draw_curve(ax, curve, color, label=update.label, connect=fit is None)
                if fit is not None:
                    draw_fit(ax, fit, curve, color, _x_span(updates, quantity, split))
            ax.axhline(0.0, color="0.6", linewidth=0.6)
            ax.axvline(0.0, color="0.6", linewidth=0.6)
            ax.set_title(f"{quantity} — {split}")
            ax.set_ylabel(ylabel)
            if row == len(rows) - 1:
                ax.set_xlabel("multiplier m")
            ax.grid(alpha=0.3)
            handles, _ = ax.get_legend_handles_labels()
            if shade_regions and getattr(updates[0], f"{quantity}_fit") is not None:
                handles += [Patch(color=c, label=f"{name} region") for name, c in REGION_COLORS.items()]
            ax.legend(handles=handles, fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_tradeoff(
    path: str | Path,
    curves: Sequence[TradeoffCurve],
    *,
    annotate: int = 5,
    title: str | None = None,
    xlabel: str = "UtilOdds (log-odds)",
    ylabel: str = "PrefOdds (log-odds)",
    highlight: Mapping[str, Sequence[float]] | None = None,
    references: Sequence[Reference] = (),
) -> Path:
    """Preference (y) against utility (x) for several methods, each point a multiplier.

    ``annotate`` points per curve are labelled with their m: both ends, the one nearest m = 0, and evenly
    spaced ones in between. Up and to the right is better: more preference at equal utility. ``highlight``
    marks chosen multipliers per curve label with a large ring; ``references`` are horizontal lines.
    """
    if not curves:
        raise PlotError("plot_tradeoff needs at least one curve")
    fig = Figure(figsize=(6.4, 5.2), layout="constrained")
    ax = fig.subplots()
    for index, curve in enumerate(curves):
        color = PALETTE[index % len(PALETTE)]
        order = np.argsort(curve.m)
        x, y, m = curve.utility[order], curve.preference[order], curve.m[order]
        ax.plot(x, y, "-o", color=color, markersize=3.5, linewidth=1.4, label=curve.label)
        for chosen in (highlight or {}).get(curve.label, ()):
            at = np.flatnonzero(m == chosen)
            if at.size:
                ax.plot(x[at], y[at], "o", markersize=11, markerfacecolor="none", markeredgecolor=color,
                        markeredgewidth=1.8)
        for i in _annotated_indices(m, annotate):
            ax.annotate(
                f"m={m[i]:g}",
                (x[i], y[i]),
                textcoords="offset points",
                xytext=(5, 4),
                fontsize=7,
                color=color,
            )
    for reference in references:
        ax.axhline(reference.value, label=reference.label, linewidth=1.0, **reference.style)
    ax.margins(0.08)  # room for the m labels at the ends of the curves
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title or "preference–utility trade-off")
    return _save(fig, path)


def plot_metric(
    path: str | Path,
    curves: Sequence[Curve],
    *,
    ylabel: str,
    title: str | None = None,
    xlabel: str = "multiplier m",
    references: Sequence[Reference] = (),
    log_y: bool = False,
) -> Path:
    """Any metric against m (manifold distance, accuracy, judge score, ...) with CI bands."""
    if not curves:
        raise PlotError("plot_metric needs at least one curve")
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    for index, curve in enumerate(curves):
        draw_curve(ax, curve, PALETTE[index % len(PALETTE)], label=curve.label, connect=True)
    for reference in references:
        ax.axhline(reference.value, label=reference.label, **reference.style)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    if title:
        ax.set_title(title)
    return _save(fig, path)


def draw_curve(ax: Any, curve: Curve, color: str, *, label: str, connect: bool) -> None:
    order = np.argsort(curve.m)
    m = curve.m[order]
    style = "-o" if connect else "o"
    ax.plot(m, curve.mean[order], style, color=color, markersize=3.5, linewidth=1.0, label=label)
    if curve.ci_low is not None and curve.ci_high is not None:
        ax.fill_between(m, curve.ci_low[order], curve.ci_high[order], color=color, alpha=0.18, linewidth=0)


def draw_fit(ax: Any, fit: DecayFit, curve: Curve | None, color: str, span: tuple[float, float]) -> None:
    grid = np.linspace(span[0], span[1], _FIT_GRID_POINTS)
    r2 = score(fit, curve.m, curve.mean) if curve is not None else None
    label = "fit" if r2 is None else f"fit, R²={r2:.3f}"
    ax.plot(grid, fit.predict(grid), "-", color=color, linewidth=1.5, label=label)
    for breakdown in (fit.breakdown_negative, fit.breakdown_positive):
        if span[0] <= breakdown <= span[1]:
            ax.axvline(breakdown, color=color, linestyle=":", linewidth=1.2)


def draw_regions(
    ax: Any,
    fit: DecayFit,
    span: tuple[float, float],
    linear_threshold: float,
    convergence_threshold: float,
) -> None:
    grid = np.linspace(span[0], span[1], _FIT_GRID_POINTS)
    regions = fit.decay.region_of(grid, linear_threshold, convergence_threshold)
    # Shade each maximal run of equal region; run edges sit midway between grid points.
    change = np.flatnonzero(regions[1:] != regions[:-1]) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [grid.size]])
    edges = np.concatenate([[grid[0]], (grid[1:] + grid[:-1]) / 2, [grid[-1]]])
    for start, end in zip(starts, ends, strict=True):
        ax.axvspan(edges[start], edges[end], color=REGION_COLORS[str(regions[start])], alpha=0.45, lw=0)


def _x_span(updates: Sequence[UpdateDynamics], quantity: str, split: str) -> tuple[float, float]:
    ms = [getattr(u, quantity)[split].m for u in updates if split in getattr(u, quantity)]
    if not ms:  # only fits for this panel: fall back to all of the update's multipliers
        ms = [c.m for u in updates for c in (*u.preference.values(), *u.utility.values())]
    values = np.concatenate(ms)
    return float(values.min()), float(values.max())


def _annotated_indices(m: np.ndarray, count: int) -> list[int]:
    if count <= 0 or m.size == 0:
        return []
    chosen = {int(i) for i in np.round(np.linspace(0, m.size - 1, min(count, m.size)))}
    if count >= 3:
        chosen.add(int(np.argmin(np.abs(m))))
    return sorted(chosen)


def _vector(values: Any, what: str, size: int | None = None) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise PlotError(f"{what} must be numeric: {exc}") from exc
    if size is not None and arr.size != size:
        raise PlotError(f"{what} has {arr.size} entries, expected {size} (one per multiplier)")
    return arr


def _save(fig: Figure, path: str | Path) -> Path:
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise PlotError(f"plots are written as PNG; give a path ending in .png, got {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out, dpi=_DPI, format="png")
    return out
