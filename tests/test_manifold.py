"""Manifold distances against brute-force numpy computations on synthetic point clouds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unisteer.analysis.manifold import build_reference, correlate, per_example_means
from unisteer.errors import ManifoldError


def cloud(n_examples=12, per_example=3, d=10, rank=3, noise=1e-3, seed=0):
    """Points near a `rank`-dimensional subspace of R^d, offset from the origin, grouped by example."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(d, rank)))[0]
    coords = rng.normal(size=(n_examples * per_example, rank)) * np.array([5.0, 3.0, 2.0])[:rank]
    points = 4.0 + coords @ basis.T + noise * rng.normal(size=(n_examples * per_example, d))
    examples = np.repeat(np.arange(n_examples), per_example)
    return torch.tensor(points), torch.tensor(examples), basis


def test_off_subspace_residual_separates_in_plane_from_orthogonal_points():
    points, examples, basis = cloud()
    reference = build_reference(5, points, examples, variance=0.9)
    assert reference.rank <= 3 and reference.explained_variance >= 0.9
    inside = points[:2] + torch.tensor(basis @ np.array([1.0, -2.0, 0.5])[: basis.shape[1]])
    orthogonal_direction = torch.tensor(np.linalg.svd(basis, full_matrices=True)[0][:, -1])
    outside = points[:2] + 3.0 * orthogonal_direction
    residual_in, _ = reference.raw_distances(inside, torch.tensor([100, 101]))
    residual_out, _ = reference.raw_distances(outside, torch.tensor([100, 101]))
    if reference.rank == 3:
        assert residual_in.max() < 0.01
    assert residual_out.min() == pytest.approx(3.0, abs=0.05)


def test_nearest_neighbour_excludes_the_same_example_and_matches_brute_force():
    points, examples, _ = cloud(seed=1)
    reference = build_reference(0, points, examples)
    rng = np.random.default_rng(2)
    queries = torch.tensor(rng.normal(size=(7, points.shape[1]))) + 4.0
    owners = torch.tensor([0, 0, 3, 5, 5, 40, 11])
    _, neighbour = reference.raw_distances(queries, owners)
    p, q = points.numpy(), queries.numpy()
    for i in range(q.shape[0]):
        others = examples.numpy() != owners[i].item()
        expected = np.sqrt(((p[others] - q[i]) ** 2).sum(1)).min()
        assert neighbour[i].item() == pytest.approx(expected, rel=1e-9)


def test_relative_distances_of_the_reference_average_exactly_one():
    points, examples, _ = cloud(n_examples=9, per_example=4, seed=3)
    reference = build_reference(2, points, examples, variance=0.8)
    relative = reference.relative_distances(points, examples)
    for metric, values in relative.items():
        assert per_example_means(values, examples).mean().item() == pytest.approx(1.0, abs=1e-12), metric
    # Scales are the unsteered per-example means, computed here by hand for the residual.
    centred = points.numpy() - points.numpy().mean(0)
    u = reference.basis.numpy()
    residual = np.linalg.norm(centred - centred @ u @ u.T, axis=1)
    per_example = [residual[examples.numpy() == e].mean() for e in range(9)]
    assert reference.residual_scale == pytest.approx(np.mean(per_example), rel=1e-9)


def test_rank_is_capped_for_small_references():
    points, examples, _ = cloud(n_examples=2, per_example=2, d=10, noise=1.0, seed=4)
    reference = build_reference(0, points, examples, variance=0.999)
    assert reference.rank <= 2 and reference.residual_scale > 0


def test_reference_rejects_bad_input():
    points, examples, _ = cloud()
    with pytest.raises(ManifoldError, match="at least 2 examples"):
        build_reference(0, points, torch.zeros(points.shape[0], dtype=torch.long))
    bad = points.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ManifoldError, match="NaN"):
        build_reference(0, bad, examples)
    with pytest.raises(ManifoldError, match="variance"):
        build_reference(0, points, examples, variance=1.0)
    with pytest.raises(ManifoldError, match="identical"):
        build_reference(0, torch.ones(6, 4, dtype=torch.float64), torch.tensor([0, 0, 1, 1, 2, 2]))
    reference = build_reference(0, points, examples)
    with pytest.raises(ManifoldError, match="width"):
        reference.raw_distances(points[:, :5], examples)


def test_per_example_means():
    values = torch.tensor([1.0, 3.0, 10.0, 2.0])
    assert per_example_means(values, torch.tensor([7, 7, 2, 7])).tolist() == [10.0, 2.0]


def test_correlate_matches_independent_formulas():
    rng = np.random.default_rng(5)
    x = rng.normal(size=11)
    y = -2.0 * x + rng.normal(size=11) * 0.3
    result = correlate(x, y)
    assert result.pearson_r == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-10)
    ranks_x, ranks_y = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    assert result.spearman_rho == pytest.approx(np.corrcoef(ranks_x, ranks_y)[0, 1], rel=1e-10)
    assert result.pearson_r < -0.9 and 0.0 <= result.pearson_p < 1e-3


def test_correlate_is_undefined_rather_than_nan():
    assert correlate([1.0, 2.0], [3.0, 4.0]).pearson_r is None
    flat = correlate([1.0, 1.0, 1.0, 1.0], [3.0, 4.0, 5.0, 1.0])
    assert flat.spearman_rho is None and "constant" in flat.note
    with pytest.raises(ManifoldError, match="NaN"):
        correlate([1.0, np.nan, 2.0], [1.0, 2.0, 3.0])
