"""Log-odds against independent high-precision computations; clamping, bad inputs, aggregation."""

from __future__ import annotations

import json
import math

import mpmath
import numpy as np
import pytest
import torch

from unisteer.analysis.logodds import aggregate, aggregate_per_multiplier, compute_log_odds, log1mexp
from unisteer.errors import LogOddsError, UnisteerError

mpmath.mp.dps = 60


def _util_reference(nll_p: float, nll_n: float) -> float:
    """UtilOdds straight from the definition, with 60-digit arithmetic (needs S < 1)."""
    s = mpmath.exp(-mpmath.mpf(nll_p)) + mpmath.exp(-mpmath.mpf(nll_n))
    return float(mpmath.log(s) - mpmath.log(1 - s))


def test_sum_variant_matches_high_precision_reference() -> None:
    rng = np.random.default_rng(1)
    nll_p = np.concatenate([rng.uniform(0.05, 30.0, 40), [1e-3, 700.0, 5000.0, 0.7]])
    nll_n = np.concatenate([rng.uniform(0.05, 30.0, 40), [40.0, 800.0, 4000.0, 0.7]])
    odds = compute_log_odds(nll_p, nll_n, variant="sum", eps=1e-12)
    assert not odds.clamped.any()
    np.testing.assert_allclose(odds.pref, nll_n - nll_p, rtol=0, atol=1e-12)
    expected = [_util_reference(p, n) for p, n in zip(nll_p, nll_n, strict=True)]
    np.testing.assert_allclose(odds.util, expected, rtol=1e-12)


def test_plain_numpy_agrees_where_it_is_stable() -> None:
    nll_p = np.array([1.0, 2.5, 4.0])
    nll_n = np.array([3.0, 0.9, 6.0])
    s = np.exp(-nll_p) + np.exp(-nll_n)
    odds = compute_log_odds(nll_p, nll_n)
    np.testing.assert_allclose(odds.util, np.log(s) - np.log(1 - s), rtol=1e-13)


def test_very_large_nll_does_not_underflow() -> None:
    # e^{-1e4} is 0 in float64; util must still be log S (≈ −L_min − log1p(e^{−ΔL})), not −inf.
    odds = compute_log_odds([1e4, 2e4], [1e4 + 1.0, 2e4])
    assert np.all(np.isfinite(odds.util))
    np.testing.assert_allclose(odds.util[0], -1e4 + math.log1p(math.exp(-1.0)), rtol=1e-15)
    np.testing.assert_allclose(odds.util[1], -2e4 + math.log(2.0), rtol=1e-15)


def test_nll_near_zero_keeps_digits_without_clamping() -> None:
    # 1 − S ≈ 1e-9 here: naive 1 − S would lose about half of the digits.
    nll_p, nll_n = 1e-9, 60.0
    odds = compute_log_odds([nll_p], [nll_n], eps=1e-15)
    assert not odds.clamped[0]
    assert odds.util[0] == pytest.approx(_util_reference(nll_p, nll_n), rel=1e-12)


def test_mean_variant_divides_by_token_counts() -> None:
    nll_p = np.array([12.0, 30.0])
    nll_n = np.array([20.0, 15.0])
    t_p = np.array([4, 10])
    t_n = np.array([5, 3])
    odds = compute_log_odds(nll_p, nll_n, t_p, t_n, variant="mean")
    mean_p, mean_n = nll_p / t_p, nll_n / t_n
    np.testing.assert_allclose(odds.pref, mean_n - mean_p, rtol=1e-15)
    expected = [_util_reference(p, n) for p, n in zip(mean_p, mean_n, strict=True)]
    np.testing.assert_allclose(odds.util, expected, rtol=1e-12)


def test_scalar_token_counts_broadcast() -> None:
    a = compute_log_odds([3.0, 6.0], [9.0, 3.0], 3, 3, variant="mean")
    b = compute_log_odds([1.0, 2.0], [3.0, 1.0], variant="sum")
    np.testing.assert_allclose(a.util, b.util, rtol=1e-15)


def test_mean_variant_with_s_above_one_is_clamped_and_reported() -> None:
    # Per-token means 0.1 and 0.2 nats: S = e^-0.1 + e^-0.2 ≈ 1.72 > 1.
    eps = 1e-6
    odds = compute_log_odds([1.0, 50.0], [2.0, 60.0], 10, 10, variant="mean", eps=eps)
    assert odds.clamped.tolist() == [True, False]
    assert odds.n_clamped == 1
    log_s = math.log(math.exp(-0.1) + math.exp(-0.2))
    assert odds.util[0] == pytest.approx(log_s - math.log(eps), rel=1e-14)
    assert np.all(np.isfinite(odds.util))


def test_s_exactly_one_is_clamped() -> None:
    odds = compute_log_odds([math.log(2.0)], [math.log(2.0)], eps=1e-6)
    assert odds.clamped[0]
    assert np.isfinite(odds.util[0])


def test_clamp_threshold_is_one_minus_s_below_eps() -> None:
    # 1 − S = 1e-5 for an impossible-to-miss negative twin: clamped only when eps exceeds it.
    nll_p = -math.log1p(-1e-5)
    assert not compute_log_odds([nll_p], [800.0], eps=1e-6).clamped[0]
    assert compute_log_odds([nll_p], [800.0], eps=1e-4).clamped[0]


def test_torch_inputs_of_any_float_dtype() -> None:
    nll_p = torch.tensor([1.0, 2.0], dtype=torch.bfloat16, requires_grad=True)
    nll_n = torch.tensor([3.0, 0.5], dtype=torch.float32)
    odds = compute_log_odds(nll_p, nll_n, torch.tensor([2, 2]), torch.tensor([1, 1]), variant="mean")
    expected = compute_log_odds(np.array([1.0, 2.0]), np.array([3.0, 0.5]), 2, 1, variant="mean")
    np.testing.assert_allclose(odds.util, expected.util)
    assert odds.pref.dtype == np.float64


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs_name_the_indices(bad: float) -> None:
    nll_p = np.array([1.0, bad, 2.0, bad])
    with pytest.raises(LogOddsError, match=r"L_p .*index\(es\) \[1, 3\]"):
        compute_log_odds(nll_p, np.ones(4))
    with pytest.raises(UnisteerError, match=r"L_n .*\[0\]"):
        compute_log_odds(np.ones(4), np.array([bad, 1.0, 1.0, 1.0]))


def test_many_bad_indices_are_summarised() -> None:
    nll = np.full(25, np.nan)
    with pytest.raises(LogOddsError, match=r"15 more"):
        compute_log_odds(nll, np.ones(25))


def test_invalid_inputs_raise_clear_errors() -> None:
    with pytest.raises(LogOddsError, match="log-probabilities"):
        compute_log_odds([-1.0], [2.0])
    with pytest.raises(LogOddsError, match="same length"):
        compute_log_odds([1.0, 2.0], [1.0])
    with pytest.raises(LogOddsError, match="token counts"):
        compute_log_odds([1.0], [2.0], variant="mean")
    with pytest.raises(LogOddsError, match=r"T_n .*\[1\]"):
        compute_log_odds([1.0, 1.0], [2.0, 2.0], 3, [2, 0], variant="mean")
    with pytest.raises(LogOddsError, match="variant"):
        compute_log_odds([1.0], [2.0], variant="median")  # type: ignore[arg-type]
    with pytest.raises(LogOddsError, match="eps"):
        compute_log_odds([1.0], [2.0], eps=0.0)
    with pytest.raises(LogOddsError, match="1-D"):
        compute_log_odds(np.ones((2, 2)), np.ones((2, 2)))


def test_log1mexp_across_the_switch() -> None:
    x = np.array([-1e-30, -1e-12, -0.5, -math.log(2.0), -0.9, -40.0, -800.0])
    expected = [float(mpmath.log(1 - mpmath.exp(mpmath.mpf(v)))) for v in x]
    np.testing.assert_allclose(log1mexp(x), expected, rtol=1e-13)
    # log(1 − e^x) → log(−x) as x → 0⁻, even where 1 − e^x rounds to 0 in float64.
    assert log1mexp(np.array([-1e-300]))[0] == pytest.approx(math.log(1e-300), rel=1e-14)
    with pytest.raises(LogOddsError):
        log1mexp(np.array([0.0]))


def test_aggregate_mean_sem_and_bootstrap_ci() -> None:
    rng = np.random.default_rng(3)
    values = rng.normal(2.0, 1.0, size=200)
    agg = aggregate(values, np.arange(200) < 7, n_boot=2000, level=0.9, seed=5)
    assert agg.mean == pytest.approx(values.mean(), rel=1e-14)
    assert agg.sem == pytest.approx(values.std(ddof=1) / math.sqrt(200), rel=1e-12)
    assert agg.n == 200 and agg.n_clamped == 7
    assert agg.ci_low < agg.mean < agg.ci_high
    # A 90 % percentile interval of a mean is close to mean ± 1.645·sem for this much data.
    assert agg.ci_high - agg.ci_low == pytest.approx(2 * 1.645 * agg.sem, rel=0.1)
    json.dumps(agg.to_dict())


def test_bootstrap_is_deterministic_per_seed() -> None:
    values = np.random.default_rng(0).exponential(size=50)
    a = aggregate(values, n_boot=500, seed=11)
    b = aggregate(values, n_boot=500, seed=11)
    c = aggregate(values, n_boot=500, seed=12)
    assert (a.ci_low, a.ci_high) == (b.ci_low, b.ci_high)
    assert (a.ci_low, a.ci_high) != (c.ci_low, c.ci_high)


def test_bootstrap_chunking_matches_one_shot(monkeypatch: pytest.MonkeyPatch) -> None:
    import unisteer.analysis.logodds as logodds

    values = np.random.default_rng(0).normal(size=30)
    whole = aggregate(values, n_boot=300, seed=4)
    monkeypatch.setattr(logodds, "_BOOTSTRAP_CHUNK_ELEMENTS", 30 * 7)
    chunked = aggregate(values, n_boot=300, seed=4)
    # Different chunking draws a different stream; both must still be sensible intervals around the mean.
    assert chunked.ci_low < chunked.mean < chunked.ci_high
    assert chunked.ci_low == pytest.approx(whole.ci_low, abs=0.15)


def test_aggregate_single_value_and_bad_inputs() -> None:
    single = aggregate([3.0])
    assert single.mean == 3.0 and single.sem is None and single.ci_low is None and single.n == 1
    with pytest.raises(LogOddsError, match="empty"):
        aggregate([])
    with pytest.raises(LogOddsError, match=r"\[1\]"):
        aggregate([1.0, np.nan])
    with pytest.raises(LogOddsError, match="n_boot"):
        aggregate([1.0, 2.0], n_boot=0)
    with pytest.raises(LogOddsError, match="level"):
        aggregate([1.0, 2.0], level=1.0)
    with pytest.raises(LogOddsError, match="clamped"):
        aggregate([1.0, 2.0], [True])


def test_aggregate_per_multiplier_groups_and_sorts() -> None:
    m = np.array([2.0, -1.0, 2.0, 0.0, -1.0, 2.0])
    values = np.array([5.0, 1.0, 7.0, 3.0, 2.0, 6.0])
    clamped = np.array([True, False, False, False, False, True])
    curve = aggregate_per_multiplier(m, values, clamped, n_boot=200)
    assert curve.m.tolist() == [-1.0, 0.0, 2.0]
    np.testing.assert_allclose(curve.mean, [1.5, 3.0, 6.0])
    assert curve.n.tolist() == [2, 1, 3]
    assert curve.n_clamped.tolist() == [0, 0, 2]
    assert math.isnan(curve.sem[1]) and math.isnan(curve.ci_low[1])
    assert curve.aggregates[2] == aggregate(values[[0, 2, 5]], clamped[[0, 2, 5]], n_boot=200)
    json.dumps(curve.to_dict())


def test_paired_change_removes_between_example_spread():
    from unisteer.analysis.logodds import paired_change

    rng = np.random.default_rng(0)
    offsets = rng.normal(0, 10, 40)  # examples differ a lot ...
    m = np.repeat([-1.0, 0.0, 1.0], 40)
    examples = np.tile(np.arange(40), 3)
    values = np.concatenate([offsets - 0.5, offsets, offsets + 0.5]) + rng.normal(0, 0.05, 120)  # ... m moves a little
    change = paired_change(m, examples, values, n_boot=500)
    assert change.m.tolist() == [-1.0, 0.0, 1.0]
    assert change.mean[1] == 0.0 and change.ci_low[1] == 0.0
    assert change.ci_low[2] > 0.3 and change.ci_high[0] < -0.3  # separated from 0 although per-m CIs overlap
    with pytest.raises(LogOddsError, match="reference"):
        paired_change([1.0, 2.0], [0, 1], [0.0, 1.0])
