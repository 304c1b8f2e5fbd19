"""A direct measurement of the "activation manifold" (SPEC §4, beyond the paper, which only assumes it).

The paper explains the utility curve by steered activations leaving the manifold of valid generations, but
never measures that distance. Here the unsteered model's hidden states on the same data (at the output of a
decoder layer after the update's layer L) are the reference sample of the manifold, and a steered hidden
state x is measured against it in two ways:

- **off-subspace residual**: ‖(x − μ) − U_k U_kᵀ(x − μ)‖, the part of x outside the top-k principal subspace
  of the reference (μ its mean, k the smallest rank explaining `variance` of the reference's variance);
- **nearest-neighbour distance**: the distance from x to the closest reference point of *another* example
  (points of the same example are excluded, so that m = 0 measures the natural spacing rather than zero).

Both are divided by their natural scale, the mean over reference examples of the per-example mean value of
the unsteered points themselves. A value of 1 therefore means "as close to the manifold as the unsteered
model", and the m = 0 average over the reference examples is exactly 1.

Which points: per example, the hidden state at the last prompt token and at every completion token of both
polarities — the positions whose outputs give the scored log-likelihoods (see `unisteer.analysis`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import ManifoldError

METRICS: tuple[str, ...] = ("off_subspace", "nearest_neighbour")


# Distances are computed in float64 blocks of this many query points (keeps the [query, reference] matrix small).
_QUERY_BLOCK = 1024


@dataclass
class ManifoldReference:
    """The unsteered reference sample of one layer and the scales that make distances relative."""

    layer: int
    mean: torch.Tensor  # [d] float64
    basis: torch.Tensor  # [d, k] float64, orthonormal columns
    points: torch.Tensor  # [n, d] float64
    point_examples: torch.Tensor  # [n] long: the example each reference point belongs to
    explained_variance: float  # share of the reference variance inside the top-k subspace
    residual_scale: float
    neighbour_scale: float

    @property
    def rank(self) -> int:
        return int(self.basis.shape[1])

    @property
    def n_examples(self) -> int:
        return int(torch.unique(self.point_examples).numel())

    def raw_distances(self, points: torch.Tensor, point_examples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Absolute (off-subspace residual, nearest-neighbour distance) per point, float64."""
        points = _as_float64(points, "points")
        if points.shape[1] != self.mean.shape[0]:
            raise ManifoldError(f"layer {self.layer}: points have width {points.shape[1]}, the reference "
                                f"{self.mean.shape[0]}")
        centred = points - self.mean
        residual = torch.linalg.vector_norm(centred - (centred @ self.basis) @ self.basis.T, dim=1)
        neighbour = torch.empty(points.shape[0], dtype=torch.float64)
        examples = point_examples.to(torch.long)
        for start in range(0, points.shape[0], _QUERY_BLOCK):
            block = slice(start, start + _QUERY_BLOCK)
            dist = torch.cdist(points[block], self.points)
            same = examples[block, None] == self.point_examples[None, :]
            dist = dist.masked_fill(same, math.inf)
            neighbour[block] = dist.min(dim=1).values
        if not torch.isfinite(neighbour).all():
            raise ManifoldError(f"layer {self.layer}: the reference has no point of another example")
        return residual, neighbour

    def relative_distances(self, points: torch.Tensor, point_examples: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per point, both metrics divided by their natural (unsteered) scale."""
        residual, neighbour = self.raw_distances(points, point_examples)
        return {"off_subspace": residual / self.residual_scale, "nearest_neighbour": neighbour / self.neighbour_scale}

    def describe(self) -> dict[str, Any]:
        return {"layer": self.layer, "rank": self.rank, "explained_variance": self.explained_variance,
                "n_points": int(self.points.shape[0]), "n_examples": self.n_examples,
                "residual_scale": self.residual_scale, "neighbour_scale": self.neighbour_scale}


def build_reference(layer: int, points: torch.Tensor, point_examples: torch.Tensor, *,
                    variance: float = 0.9) -> ManifoldReference:
    """Fit the reference of one layer from unsteered points (rows of `points`, grouped by example).

    The rank k is the smallest explaining `variance` of the variance, capped at half the number of points
    (and below the width) so that the reference points keep a non-trivial residual to scale by.
    """
    if not 0.0 < variance < 1.0:
        raise ManifoldError(f"manifold variance must be in (0, 1), got {variance!r}")
    points = _as_float64(points, "reference points")
    examples = point_examples.to(torch.long).reshape(-1)
    if examples.numel() != points.shape[0]:
        raise ManifoldError(f"{examples.numel()} example ids for {points.shape[0]} reference points")
    if torch.unique(examples).numel() < 2:
        raise ManifoldError(f"layer {layer}: the reference needs points of at least 2 examples")
    mean = points.mean(dim=0)
    centred = points - mean
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    energy = singular.square()
    total = float(energy.sum())
    if total == 0.0:
        raise ManifoldError(f"layer {layer}: all reference points are identical")
    cumulative = torch.cumsum(energy, 0) / total
    k = int(torch.searchsorted(cumulative, torch.tensor(variance, dtype=torch.float64)).item()) + 1
    k = max(1, min(k, points.shape[0] // 2, points.shape[1] - 1))
    reference = ManifoldReference(layer=layer, mean=mean, basis=vh[:k].T.contiguous(), points=points,
                                  point_examples=examples, explained_variance=float(cumulative[k - 1]),
                                  residual_scale=1.0, neighbour_scale=1.0)
    residual, neighbour = reference.raw_distances(points, examples)
    reference.residual_scale = _scale(per_example_means(residual, examples), "off-subspace residual", layer)
    reference.neighbour_scale = _scale(per_example_means(neighbour, examples), "nearest-neighbour distance", layer)
    return reference


def per_example_means(values: torch.Tensor, point_examples: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over the points of each example, in order of the sorted distinct example ids."""
    ids, inverse = torch.unique(point_examples.to(torch.long), return_inverse=True)
    sums = torch.zeros(ids.numel(), dtype=torch.float64).index_add(0, inverse, values.to(torch.float64))
    counts = torch.zeros(ids.numel(), dtype=torch.float64).index_add(
        0, inverse, torch.ones_like(values, dtype=torch.float64))
    return sums / counts


@dataclass(frozen=True)
class Correlation:
    """How well a distance curve tracks the utility curve across multipliers (one point per m)."""

    n_points: int
    pearson_r: float | None
    pearson_p: float | None
    spearman_rho: float | None
    spearman_p: float | None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"n_points": self.n_points, "pearson_r": self.pearson_r, "pearson_p": self.pearson_p,
                "spearman_rho": self.spearman_rho, "spearman_p": self.spearman_p, "note": self.note}


def correlate(distance: Any, utility: Any) -> Correlation:
    """Pearson and Spearman correlation of per-m mean distance against per-m mean UtilOdds.

    Undefined (None, with a note) for fewer than 3 points or a constant series; never NaN.
    """
    from scipy.stats import pearsonr, spearmanr

    x = np.asarray(distance, dtype=np.float64).reshape(-1)
    y = np.asarray(utility, dtype=np.float64).reshape(-1)
    if x.size != y.size:
        raise ManifoldError(f"correlate: {x.size} distances for {y.size} utilities")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ManifoldError("correlate: distances or utilities contain NaN or inf")
    if x.size < 3:
        return Correlation(int(x.size), None, None, None, None, "fewer than 3 multipliers")
    if np.ptp(x) == 0.0 or np.ptp(y) == 0.0:
        return Correlation(int(x.size), None, None, None, None, "a series is constant")
    pearson = pearsonr(x, y)
    spearman = spearmanr(x, y)
    return Correlation(int(x.size), float(pearson.statistic), float(pearson.pvalue),
                       float(spearman.statistic), float(spearman.pvalue))


def _scale(values: torch.Tensor, what: str, layer: int) -> float:
    scale = float(values.mean())
    if not math.isfinite(scale) or scale <= 0.0:
        raise ManifoldError(f"layer {layer}: the unsteered {what} is {scale}; cannot use it as a scale "
                            "(too few reference points or examples?)")
    return scale


def _as_float64(points: torch.Tensor, what: str) -> torch.Tensor:
    if points.dim() != 2:
        raise ManifoldError(f"{what} must be a [n, d] matrix, got shape {tuple(points.shape)}")
    out = points.detach().to("cpu", torch.float64)
    if not torch.isfinite(out).all():
        raise ManifoldError(f"{what} contain NaN or inf")
    return out
