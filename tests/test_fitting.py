"""Validity-decay fits: recovery from synthetic curves, the continuity constraint, degenerate inputs."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from unisteer.analysis.fitting import (
    PARAM_NAMES,
    DecayFit,
    DecaySide,
    ValidityDecay,
    fit_preference,
    fit_utility,
    r2_score,
    score,
)
from unisteer.errors import FitError, UnisteerError

M = np.linspace(-10.0, 10.0, 21)
# Preference rises ~linearly, then saturates/decays back; the two sides decay differently.
PREF_DECAY = ValidityDecay(plus=DecaySide(0.0, 16.0, 0.6), minus=DecaySide(0.0, 25.0, 0.7))
PREF_TRUE = {"alpha": 1.2, "beta": 0.3, "b": -0.5}
# Utility peaks slightly right of 0; the negative centre is solved so that continuity holds exactly.
_UTIL_PLUS = DecaySide(1.0, 9.0, 1.2)
_UTIL_MINUS_LENGTH, _UTIL_MINUS_POWER = 16.0, 0.9
UTIL_DECAY = ValidityDecay(
    plus=_UTIL_PLUS,
    minus=DecaySide(
        -math.sqrt(_UTIL_MINUS_LENGTH * (float(_UTIL_PLUS(0.0)) ** (-1.0 / _UTIL_MINUS_POWER) - 1.0)),
        _UTIL_MINUS_LENGTH,
        _UTIL_MINUS_POWER,
    ),
)
UTIL_TRUE = {"beta": 6.0, "b": -8.0}


def pref_curve(m: np.ndarray) -> np.ndarray:
    return (PREF_TRUE["alpha"] * m + PREF_TRUE["beta"]) * PREF_DECAY(m) + PREF_TRUE["b"]


def util_curve(m: np.ndarray) -> np.ndarray:
    return UTIL_TRUE["beta"] * UTIL_DECAY(m) + UTIL_TRUE["b"]


def _noisy(y: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    return y + np.random.default_rng(seed).normal(0.0, sigma, y.size)


def test_true_utility_decay_is_continuous() -> None:
    assert UTIL_DECAY.continuity_gap < 1e-14


def test_preference_noise_free_recovers_parameters() -> None:
    fit = fit_preference(M, pref_curve(M))
    true = {
        **PREF_TRUE,
        "m_plus": 0.0,
        "L_plus": 16.0,
        "p_plus": 0.6,
        "m_minus": 0.0,
        "L_minus": 25.0,
        "p_minus": 0.7,
    }
    for name, value in true.items():
        assert fit.params[name] == pytest.approx(value, abs=1e-3), name
    assert fit.r2 == pytest.approx(1.0, abs=1e-9)
    assert fit.breakdown_positive == pytest.approx(PREF_DECAY.breakdown_positive, abs=1e-3)
    assert fit.breakdown_negative == pytest.approx(PREF_DECAY.breakdown_negative, abs=1e-3)
    assert not fit.poor_fit


def test_utility_noise_free_recovers_parameters() -> None:
    fit = fit_utility(M, util_curve(M))
    assert fit.alpha is None
    assert fit.beta == pytest.approx(UTIL_TRUE["beta"], rel=1e-3)
    assert fit.b == pytest.approx(UTIL_TRUE["b"], rel=1e-3)
    assert fit.decay.plus.center == pytest.approx(1.0, abs=1e-3)
    assert fit.decay.minus.center == pytest.approx(UTIL_DECAY.minus.center, abs=1e-3)
    assert fit.breakdown_positive == pytest.approx(UTIL_DECAY.breakdown_positive, abs=1e-3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noisy_utility_recovers_curve_and_breakdown(seed: int) -> None:
    y = _noisy(util_curve(M), 0.1, seed)
    fit = fit_utility(M, y)
    assert fit.r2 > 0.99
    assert score(fit, M, util_curve(M)) > 0.995
    assert fit.breakdown_positive == pytest.approx(UTIL_DECAY.breakdown_positive, abs=0.5)
    assert fit.breakdown_negative == pytest.approx(UTIL_DECAY.breakdown_negative, abs=0.5)
    # The optimum is at least as good as the generating parameters on the same noisy data.
    assert fit.rss <= float(np.sum((y - util_curve(M)) ** 2)) * (1 + 1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noisy_preference_recovers_curve(seed: int) -> None:
    y = _noisy(pref_curve(M), 0.1, seed)
    fit = fit_preference(M, y)
    assert fit.r2 > 0.99
    assert score(fit, M, pref_curve(M)) > 0.995
    assert fit.rss <= float(np.sum((y - pref_curve(M)) ** 2)) * (1 + 1e-9)
    # α·m and the decay trade off against each other, so the preference breakdown is only loosely
    # identified by noisy data; it still lands in the right part of the sweep.
    assert fit.breakdown_positive == pytest.approx(PREF_DECAY.breakdown_positive, abs=2.5)
    assert fit.breakdown_negative == pytest.approx(PREF_DECAY.breakdown_negative, abs=2.5)


def test_continuity_and_bounds_hold_at_the_solution() -> None:
    fit = fit_preference(M, _noisy(pref_curve(M), 0.2, 7))
    d0 = float(fit.decay.plus(0.0))
    assert fit.continuity_gap <= 1e-6 * d0 + 1e-12
    r = fit.multiplier_range
    assert r == 10.0
    for side in (fit.decay.plus, fit.decay.minus):
        assert 0.01 * (1 - 1e-9) <= side.length <= 100 * r**2 * (1 + 1e-9)
        assert 0.01 * (1 - 1e-9) <= side.power <= 10 * (1 + 1e-9)
    assert -r / 4 - 1e-9 <= fit.decay.plus.center <= r + 1e-9
    assert -r - 1e-9 <= fit.decay.minus.center <= r / 4 + 1e-9


def test_train_fit_scores_on_test_curve() -> None:
    train = _noisy(util_curve(M), 0.1, 10)
    test = _noisy(util_curve(M), 0.1, 11)
    fit = fit_utility(M, train)
    test_r2 = score(fit, M, test)
    assert test_r2 is not None and 0.98 < test_r2 <= 1.0
    assert score(fit, M, np.full(M.size, 2.0)) is None


def test_regions_and_breakdown_are_consistent() -> None:
    fit = fit_utility(M, util_curve(M))
    regions = fit.regions()
    assert regions.linear_negative < 0 < regions.linear_positive
    assert regions.linear_positive < fit.breakdown_positive < regions.convergence_positive
    assert regions.convergence_negative < fit.breakdown_negative < regions.linear_negative
    # D at the boundaries equals the thresholds.
    assert float(fit.decay(regions.linear_positive)) == pytest.approx(0.9, rel=1e-9)
    assert float(fit.decay(regions.convergence_negative)) == pytest.approx(0.1, rel=1e-9)
    assert float(fit.decay(fit.breakdown_positive)) == pytest.approx(0.5, rel=1e-9)
    peak = fit.decay.plus.center
    probe = np.array([peak, (regions.linear_positive + regions.convergence_positive) / 2, 1e3, -1e3])
    assert fit.decay.region_of(probe).tolist() == ["linear", "transitional", "convergence", "convergence"]
    # D(0) ≈ 0.88 here (the peak is at m ≈ 1): m = 0 is transitional although it lies between the outer
    # linear crossings, which is why region_of, not the boundaries, is authoritative.
    assert fit.decay.region_of(0.0).tolist() == "transitional"
    with pytest.raises(FitError, match="thresholds"):
        fit.regions(linear_threshold=0.1, convergence_threshold=0.9)


def test_to_dict_is_json_and_round_trips() -> None:
    fit = fit_preference(M, _noisy(pref_curve(M), 0.1, 3))
    data = json.loads(json.dumps(fit.to_dict()))
    assert set(data["params"]) == set(PARAM_NAMES["preference"])
    assert data["range_definition"] == "max|m|"
    assert data["breakdown"]["positive"] == pytest.approx(fit.breakdown_positive)
    rebuilt = DecayFit.from_dict(data)
    np.testing.assert_allclose(rebuilt.predict(M), fit.predict(M), rtol=1e-12)
    assert rebuilt.r2 == fit.r2
    with pytest.raises(FitError, match="missing"):
        DecayFit.from_dict({**data, "params": {"alpha": 1.0}})


def test_fit_is_fast() -> None:
    y = _noisy(pref_curve(M), 0.1, 0)
    start = time.perf_counter()
    fit_preference(M, y)
    assert time.perf_counter() - start < 2.0


def test_scale_invariance() -> None:
    # The optimiser works in normalised units, so rescaling m and y rescales the fit and keeps R².
    y = _noisy(util_curve(M), 0.1, 4)
    base = fit_utility(M, y)
    scaled = fit_utility(M / 20.0, y * 1000.0 + 5.0)
    assert scaled.r2 == pytest.approx(base.r2, abs=1e-6)
    assert scaled.breakdown_positive == pytest.approx(base.breakdown_positive / 20.0, rel=1e-3)


def test_tiny_multiplier_range_has_valid_bounds() -> None:
    # The spec's L ≥ 0.01 would exceed its own upper bound 100·range² here; the bound scales instead.
    fit = fit_utility(M * 1e-4, util_curve(M))
    assert fit.r2 > 0.999
    assert fit.breakdown_positive == pytest.approx(UTIL_DECAY.breakdown_positive * 1e-4, rel=1e-2)


def test_flat_curve_gives_undefined_r2_without_crashing() -> None:
    fit = fit_utility(M, np.full(M.size, -3.0))
    assert fit.r2 is None
    assert fit.poor_fit
    assert any("flat" in w for w in fit.warnings)
    np.testing.assert_allclose(fit.predict(M), -3.0, atol=1e-9)
    json.dumps(fit.to_dict())


def test_underdetermined_fit_is_flagged() -> None:
    m = np.linspace(-5.0, 5.0, 6)
    fit = fit_preference(m, pref_curve(m))
    assert fit.poor_fit
    assert any("underdetermined" in w for w in fit.warnings)


def test_one_sided_sweep_is_fitted_and_flagged() -> None:
    m = np.linspace(0.0, 10.0, 11)
    fit = fit_utility(m, util_curve(m))
    assert fit.r2 > 0.999
    assert any("no negative multipliers" in w for w in fit.warnings)


def test_poor_fit_is_flagged_for_structureless_data() -> None:
    y = np.random.default_rng(0).normal(size=M.size) * np.where(np.arange(M.size) % 2 == 0, 1.0, -1.0)
    fit = fit_utility(M, y, poor_fit_r2=0.95)
    assert fit.poor_fit == (fit.r2 is None or fit.r2 < 0.95)


def test_degenerate_inputs_raise_fit_error() -> None:
    with pytest.raises(FitError, match=r"y is NaN .*\[2, 5\]"):
        y = pref_curve(M)
        y[[2, 5]] = np.nan
        fit_preference(M, y)
    with pytest.raises(FitError, match=r"m is NaN .*\[0\]"):
        fit_utility(np.concatenate([[np.inf], M[1:]]), util_curve(M))
    with pytest.raises(FitError, match="at least 5 points"):
        fit_utility(M[:4], util_curve(M[:4]))
    with pytest.raises(FitError, match="distinct multipliers"):
        fit_utility(np.array([0.0, 1.0, 0.0, 1.0, 1.0]), np.arange(5.0))
    with pytest.raises(UnisteerError, match="same length"):
        fit_utility(M, util_curve(M)[:-1])
    with pytest.raises(FitError, match="same length"):
        score(fit_utility(M, util_curve(M)), M, np.ones(3))


def test_r2_score_definition() -> None:
    y = np.array([1.0, 2.0, 4.0])
    assert r2_score(y, y) == 1.0
    assert r2_score(y, np.full(3, y.mean())) == pytest.approx(0.0)
    assert r2_score(np.ones(3), np.zeros(3)) is None


@pytest.mark.parametrize("seed", range(6))
def test_fitted_curve_never_leaves_the_data_between_multipliers(seed: int) -> None:
    """Structureless or spiky data tempt the rational-quadratic into dips where no point is (a utility fit
    once reached -70 between points measured around -3); the envelope keeps it within 5 % of the range."""
    rng = np.random.default_rng(seed)
    y = rng.normal(0.0, 1.0, M.size)
    y[rng.integers(0, M.size)] -= 4.0  # one low outlier
    dense = np.linspace(M.min(), M.max(), 2001)
    for fit in (fit_utility(M, y), fit_preference(M, y)):
        curve = fit.predict(dense)
        slack = 0.05 * np.ptp(y) + 1e-6
        assert curve.min() >= y.min() - slack and curve.max() <= y.max() + slack, fit.warnings


def test_noise_level_data_are_flagged_undetermined_whatever_the_r2() -> None:
    y = pref_curve(M) * 0.05  # a faint version of a real curve ...
    sem = np.full(M.size, 0.5)  # ... far below its noise
    fit = fit_preference(M, y, sem=sem)
    assert fit.r2 is not None and fit.r2 > 0.9  # R² alone would call it good
    assert fit.undetermined and fit.poor_fit
    assert any("not determined by the data" in w for w in fit.warnings)
    clear = fit_preference(M, pref_curve(M), sem=np.full(M.size, 0.05))
    assert not clear.undetermined and not clear.poor_fit
    assert DecayFit.from_dict(json.loads(json.dumps(fit.to_dict()))).undetermined
    with pytest.raises(FitError, match="one value per point"):
        fit_preference(M, y, sem=[0.1, 0.2])
