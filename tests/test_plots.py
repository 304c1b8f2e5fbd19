"""Plots: PNG files are written without a display, from the dataclasses the sweep module will feed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from unisteer.analysis.fitting import fit_preference, fit_utility
from unisteer.analysis.logodds import aggregate_per_multiplier, compute_log_odds
from unisteer.analysis.plots import (
    Curve,
    Reference,
    TradeoffCurve,
    UpdateDynamics,
    plot_dynamics,
    plot_metric,
    plot_tradeoff,
)
from unisteer.errors import PlotError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
M = np.linspace(-10.0, 10.0, 21)


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 5_000
    image = imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 200


def _synthetic_curves(seed: int, slope: float) -> tuple[Curve, Curve]:
    """Preference/utility curves aggregated from per-example NLLs, as the sweep module will produce them."""
    rng = np.random.default_rng(seed)
    n_examples = 12
    m_long = np.repeat(M, n_examples)
    decay = (1 + m_long**2 / 20.0) ** -0.7
    pref = slope * m_long * decay + rng.normal(0, 0.4, m_long.size)
    nll_p = 20.0 + 3.0 * (1 - decay) * 10 - pref / 2 + rng.normal(0, 0.5, m_long.size)
    nll_p = np.abs(nll_p)
    nll_n = np.abs(nll_p + pref)
    odds = compute_log_odds(nll_p, nll_n)
    pref_curve = aggregate_per_multiplier(m_long, odds.pref, odds.clamped, n_boot=200, seed=seed)
    util_curve = aggregate_per_multiplier(m_long, odds.util, odds.clamped, n_boot=200, seed=seed)
    return Curve.from_aggregated("pref", pref_curve), Curve.from_aggregated("util", util_curve)


def _dynamics(label: str, slope: float) -> UpdateDynamics:
    train_pref, train_util = _synthetic_curves(1, slope)
    test_pref, test_util = _synthetic_curves(2, slope)
    return UpdateDynamics(
        label=label,
        preference={"train": train_pref, "test": test_pref},
        utility={"train": train_util, "test": test_util},
        preference_fit=fit_preference(train_pref.m, train_pref.mean),
        utility_fit=fit_utility(train_util.m, train_util.mean),
    )


@pytest.fixture(scope="module")
def two_updates() -> list[UpdateDynamics]:
    return [_dynamics("SPLIT vector", 1.0), _dynamics("SFT vector", 0.6)]


def test_dynamics_single_update(tmp_path: Path, two_updates: list[UpdateDynamics]) -> None:
    out = plot_dynamics(tmp_path / "nested" / "dynamics.png", two_updates[:1], title="SPLIT, layer 14")
    assert out == tmp_path / "nested" / "dynamics.png"
    _assert_png(out)


def test_dynamics_several_updates_and_missing_fits(tmp_path: Path, two_updates: list[UpdateDynamics]) -> None:
    no_fit = UpdateDynamics("DiffMean", two_updates[1].preference, {"train": two_updates[1].utility["train"]})
    _assert_png(plot_dynamics(tmp_path / "many.png", [*two_updates, no_fit]))
    _assert_png(plot_dynamics(tmp_path / "train.png", [no_fit], splits=("train",)))


def test_tradeoff(tmp_path: Path, two_updates: list[UpdateDynamics]) -> None:
    curves = [
        TradeoffCurve.from_curves(u.label, u.preference["test"], u.utility["test"]) for u in two_updates
    ]
    _assert_png(plot_tradeoff(tmp_path / "tradeoff.png", curves, annotate=5))


def test_metric(tmp_path: Path) -> None:
    mean = 0.5 + 0.4 * np.tanh(M / 4)
    ci_low, ci_high = mean - 0.05, mean + 0.05
    ci_low[3] = ci_high[3] = np.nan  # a multiplier with one example: no interval, still plotted
    accuracy = Curve("accuracy", M, mean, ci_low, ci_high)
    single = Curve("distance", M, np.abs(M) + 1.0)
    out = plot_metric(
        tmp_path / "metric.png",
        [accuracy, single],
        ylabel="value",
        references=[Reference(0.5, "vanilla")],
        log_y=True,
    )
    _assert_png(out)


def test_pyplot_is_never_imported(tmp_path: Path) -> None:
    # pyplot would pick an interactive backend on a desktop and keep global figure state.
    code = (
        "import sys, numpy as np\n"
        "from unisteer.analysis.plots import Curve, plot_metric\n"
        f"plot_metric({str(tmp_path / 'm.png')!r}, [Curve('x', np.arange(3.0), np.arange(3.0))], ylabel='y')\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    _assert_png(tmp_path / "m.png")


def test_invalid_inputs(tmp_path: Path, two_updates: list[UpdateDynamics]) -> None:
    with pytest.raises(PlotError, match="expected 21"):
        Curve("bad", M, np.ones(3))
    with pytest.raises(PlotError, match="both ci_low and ci_high"):
        Curve("bad", M, M, ci_low=M)
    with pytest.raises(PlotError, match="different multipliers"):
        TradeoffCurve.from_curves("x", Curve("p", M, M), Curve("u", M[:-1], M[:-1]))
    with pytest.raises(PlotError, match="split 'dev'"):
        plot_dynamics(tmp_path / "x.png", two_updates, splits=("dev",))
    with pytest.raises(PlotError, match=".png"):
        plot_metric(tmp_path / "x.pdf", [Curve("x", M, M)], ylabel="y")
    with pytest.raises(PlotError, match="at least one"):
        plot_tradeoff(tmp_path / "x.png", [])
