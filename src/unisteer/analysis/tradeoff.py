"""The preference–utility trade-off read from a sweep: where utility peaks over m, whether it falls on both
sides, and how closely the measured off-manifold distance tracks it (the paper's F3 and F4).

Both are per (update, split, variant) and carry bootstrap intervals over examples (resampled with the same
seeded indices for every statistic), so "utility peaks at m = 0" and "distance tracks utility" are claims
with intervals, not readings of one mean curve.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .manifold import correlate

# Utility "peaks near m = 0" when the bootstrap interval of the peak's location lies within this distance of 0.
NEAR_ZERO_M = 2.0


@dataclass(frozen=True)
class ExampleGrid:
    """Per-example values on a complete grid: `values[i, j]` is example `ids[i]` at multiplier `m[j]`."""

    m: np.ndarray
    ids: np.ndarray
    values: np.ndarray

    @classmethod
    def pivot(cls, examples: np.ndarray, multipliers: np.ndarray, values: np.ndarray) -> ExampleGrid:
        """Examples scored at every multiplier of the grid (others are left out: a torn sweep is partial)."""
        grid = np.unique(multipliers)
        ids = np.unique(examples)
        table = np.full((ids.size, grid.size), np.nan)
        table[np.searchsorted(ids, examples), np.searchsorted(grid, multipliers)] = values
        complete = np.isfinite(table).all(axis=1)
        return cls(grid, ids[complete], table[complete])

    def select(self, ids: np.ndarray, m: np.ndarray) -> np.ndarray:
        """The values of these examples (a subset of `ids`) at these multipliers (a subset of `m`)."""
        return self.values[np.ix_(np.searchsorted(self.ids, ids), np.searchsorted(self.m, m))]

    @property
    def n_examples(self) -> int:
        return int(self.values.shape[0])


def bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """`n_boot` resamples of `n` examples with replacement, as an [n_boot, n] index array."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2.0
    return float(np.quantile(samples, tail)), float(np.quantile(samples, 1.0 - tail))


@dataclass(frozen=True)
class UtilityPeak:
    """Where mean UtilOdds is highest over the grid, with a bootstrap interval of that location.

    `falls_below` / `falls_above`: some multiplier below (above) the peak has utility lower than at the peak,
    by a paired difference whose interval lies below 0; None where the grid has no multiplier on that side.
    """

    m: float
    ci: tuple[float, float]
    value: float
    value_at_zero: float | None
    falls_below: bool | None
    falls_above: bool | None
    n_examples: int

    @property
    def near_zero(self) -> bool:
        return max(abs(self.ci[0]), abs(self.ci[1])) <= NEAR_ZERO_M

    @property
    def falls_both_sides(self) -> bool:
        return bool(self.falls_below) and bool(self.falls_above)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ci": list(self.ci), "near_zero": self.near_zero,
                "falls_both_sides": self.falls_both_sides}

    def sentence(self) -> str:
        where = (f"utility peaks at m = {self.m:g} (95 % interval of the peak's location [{self.ci[0]:g}, "
                 f"{self.ci[1]:g}], UtilOdds {self.value:.2f})")
        sides = {(True, True): "and falls on both sides", (True, False): "and falls only below it",
                 (False, True): "and falls only above it", (False, False): "and does not fall measurably on either side"}
        shape = sides[(bool(self.falls_below), bool(self.falls_above))]
        if self.falls_below is None or self.falls_above is None:
            shape += " (the peak is at the edge of the grid)"
        verdict = ("near m = 0, as in the paper" if self.near_zero and self.falls_both_sides
                   else "not the paper's shape (a peak within |m| ≤ 2 of 0, falling on both sides)")
        return f"{where} {shape}: {verdict}"


def utility_peak(grid: ExampleGrid, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> UtilityPeak:
    """The peak of the mean utility curve, its location's bootstrap interval and whether it falls each side."""
    mean = grid.values.mean(axis=0)
    peak = int(np.argmax(mean))
    resamples = bootstrap_indices(grid.n_examples, n_boot, seed)
    boot_means = grid.values[resamples].mean(axis=1)  # [n_boot, n_m]
    peak_m = grid.m[np.argmax(boot_means, axis=1)]
    # Paired difference from the peak, per example: its interval decides whether utility is lower there.
    below_peak = boot_means - boot_means[:, [peak]]
    upper = np.quantile(below_peak, 1.0 - (1.0 - level) / 2.0, axis=0)
    lower_side, upper_side = np.arange(grid.m.size) < peak, np.arange(grid.m.size) > peak
    zero = np.flatnonzero(grid.m == 0.0)
    return UtilityPeak(
        float(grid.m[peak]), _interval(peak_m, level), float(mean[peak]),
        float(mean[zero[0]]) if zero.size else None,
        bool(np.any(upper[lower_side] < 0)) if lower_side.any() else None,
        bool(np.any(upper[upper_side] < 0)) if upper_side.any() else None,
        grid.n_examples)


@dataclass(frozen=True)
class ManifoldTracking:
    """How the mean off-manifold distance tracks mean utility across m: Spearman ρ and Pearson r over the
    grid's multipliers, with bootstrap intervals over examples. The paper's account predicts ρ < 0."""

    layer: int
    metric: str
    n_points: int
    spearman_rho: float | None
    spearman_ci: tuple[float, float] | None
    pearson_r: float | None
    pearson_ci: tuple[float, float] | None
    n_examples: int

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "spearman_ci": None if self.spearman_ci is None else list(self.spearman_ci),
                "pearson_ci": None if self.pearson_ci is None else list(self.pearson_ci)}

    def sentence(self, label: str) -> str:
        if self.spearman_rho is None or self.spearman_ci is None:
            return f"{label} at layer {self.layer}: correlation undefined (a constant series or too few multipliers)"
        low, high = self.spearman_ci
        verdict = ("utility falls where activations leave the manifold, as the paper argues" if high < -0.5
                   else "distance and utility rise together, against the manifold account" if low > 0.5
                   else "no clear monotone relation")
        return (f"{label} at layer {self.layer} against utility across {self.n_points} multipliers: Spearman ρ = "
                f"{self.spearman_rho:.2f} [{low:.2f}, {high:.2f}] ({verdict})")


def manifold_tracking(distance: ExampleGrid, utility: ExampleGrid, *, layer: int, metric: str, n_boot: int = 1000,
                      level: float = 0.95, seed: int = 0) -> ManifoldTracking:
    """Correlate per-m mean distance with per-m mean utility on the examples both grids share."""
    common_m = np.intersect1d(distance.m, utility.m)
    common_ids = np.intersect1d(distance.ids, utility.ids)
    x, y = distance.select(common_ids, common_m), utility.select(common_ids, common_m)
    n = int(common_ids.size)
    if n < 2 or common_m.size < 3:
        return ManifoldTracking(layer, metric, common_m.size, None, None, None, None, n)
    point = correlate(x.mean(axis=0), y.mean(axis=0))
    if point.spearman_rho is None:
        return ManifoldTracking(layer, metric, common_m.size, None, None, None, None, n)
    resamples = bootstrap_indices(n, n_boot, seed)
    rho, r = [], []
    for index in resamples:
        result = correlate(x[index].mean(axis=0), y[index].mean(axis=0))
        if result.spearman_rho is not None:
            rho.append(result.spearman_rho)
            r.append(result.pearson_r)
    return ManifoldTracking(layer, metric, common_m.size, point.spearman_rho, _interval(np.array(rho), level),
                            point.pearson_r, _interval(np.array(r), level), n)
