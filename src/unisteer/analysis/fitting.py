"""The validity-decay model of the preference/utility dynamics (SPEC §4) and its least-squares fits.

Two-sided rational-quadratic validity decay along the steering line::

    D(m) = (1 + (m − m₊)²/L₊)^(−p₊)   for m ≥ 0
    D(m) = (1 + (m − m₋)²/L₋)^(−p₋)   for m < 0

    preference:  PrefOdds(m) = (α·m + β)·D_p(m) + b      (9 parameters)
    utility:     UtilOdds(m) = β_u·D_u(m) + b_u          (8 parameters)

Fitting: least squares with SLSQP under the continuity constraint D₊(0) = D₋(0), imposed in the
equivalent log form ``p₊·log1p(m₊²/L₊) = p₋·log1p(m₋²/L₋)`` (better scaled when D(0) is small).

Bounds, with ``range = max|m|`` over the fitted multipliers (so a symmetric sweep −R…R and a one-sided sweep
0…R both have range R) and the data scale ``s = (max y − min y)/2`` around ``c = (max y + min y)/2``:
``L± ∈ [0.01, 100·range²]``, ``p± ∈ [0.01, 10]``, ``m₊ ∈ [−range/4, range]``, ``m₋ ∈ [−range, range/4]``,
``|α|·range ≤ 100·s``, ``|β| ≤ 100·s``, ``|b − c| ≤ 100·s``. For ``range < 1`` the lower bound of L
becomes ``0.01·range²`` (otherwise it would exceed the upper bound below range = 0.01 and forbid any decay
within the sweep well before that). The optimiser works in units where m/range and
(y − c)/s are of order 1, which keeps SLSQP well conditioned for any multiplier or log-odds scale.

Fits you can trust (beyond SPEC §4): the fitted curve must stay within the data's range widened by
``ENVELOPE_SLACK`` (5 %) of it everywhere between the smallest and largest multiplier, and no decay side may
have a curvature width ``sqrt(L/p)`` below the smallest gap between multipliers — together they forbid dips
or peaks that no measured point supports. Given per-point standard errors (``sem``), a curve whose whole
variation is below ``MIN_SIGNAL_HALF_WIDTHS`` typical 95 % half-widths is flagged ``undetermined`` (and
``poor_fit``): a high R² there is a fit to noise.

Starts: a fixed grid of symmetric decays centred at 0 (which satisfy continuity exactly) plus seeded random
decays whose negative centre is solved from the continuity constraint; for every start the linear
parameters (α, β, b) are initialised by linear least squares given the start's decay.

Derived quantities, per side:

- **breakdown** multipliers where D = 1/2 (the paper's formula): ``m₊ + sqrt(L₊·(2^{1/p₊} − 1))`` and
  ``m₋ − sqrt(L₋·(2^{1/p₋} − 1))``.
- **regions** by the value of D: *linear* where ``D ≥ 0.9`` (the update acts almost undamped, preference
  is ≈ linear in m), *transitional* where ``0.9 > D ≥ 0.1``, *convergence* where ``D < 0.1`` (the output has
  nearly converged to the asymptote b). ``ValidityDecay.region_of`` classifies multipliers by D itself;
  ``Regions`` reports the outer crossings ``m± ± sqrt(L±·(t^{−1/p±} − 1))`` of the thresholds t on each
  side (with the default thresholds, the breakdown point lies between the two crossings of its side)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy.optimize import minimize

from ..errors import FitError
from .arrays import as_vector

KINDS: tuple[str, ...] = ("preference", "utility")


DECAY_PARAM_NAMES: tuple[str, ...] = ("m_plus", "L_plus", "p_plus", "m_minus", "L_minus", "p_minus")


PARAM_NAMES: dict[str, tuple[str, ...]] = {
    "preference": ("alpha", "beta", "b", *DECAY_PARAM_NAMES),
    "utility": ("beta", "b", *DECAY_PARAM_NAMES),
}


RANGE_DEFINITION = "max|m|"


MIN_POINTS = 5


MIN_DISTINCT_MULTIPLIERS = 3


POOR_FIT_R2 = 0.9


LINEAR_THRESHOLD = 0.9


CONVERGENCE_THRESHOLD = 0.1


# Normalised bounds (m in units of range, y in units of the data scale s); see the module docstring.
_LINEAR_BOUND = 100.0


_L_MIN, _L_MAX_FACTOR = 0.01, 100.0


_P_MIN, _P_MAX = 0.01, 10.0


_CONTINUITY_TOL = 1e-6  # on the log form, i.e. a relative gap of D₊(0) vs D₋(0)


_BOUND_TOL = 1e-6


_ENVELOPE_TOL = 1e-6


_SCREEN_ITERATIONS = 40


_SCREEN_CONTINUITY_TOL = 1e-3


_REFINED_STARTS = 3


_REFINE_ITERATIONS = 400


# The fitted curve must stay within the data's range widened by this share of it on each side, everywhere
# between the smallest and largest multiplier: no dips or peaks that no measured point supports.
ENVELOPE_SLACK = 0.05


_POINTS_PER_GAP = 3  # envelope points strictly between consecutive multipliers


# A curve whose whole variation is below this many typical 95 % half-widths is noise, whatever its R².
MIN_SIGNAL_HALF_WIDTHS = 2.0


# Start grid: half-widths (D = 1/2) in units of range, and powers.
_START_HALF_WIDTHS = (0.15, 0.4, 1.0, 3.0)


_START_POWERS = (0.5, 1.5)


_START_CENTER_OFFSET = 0.02


@dataclass(frozen=True)
class DecaySide:
    """One side of the decay: ``(1 + (m − center)²/length)^(−power)``."""

    center: float
    length: float
    power: float

    def __call__(self, m: Any) -> np.ndarray:
        diff = np.asarray(m, dtype=np.float64) - self.center
        return np.exp(-self.power * np.log1p(diff * diff / self.length))

    def half_width(self, level: float) -> float:
        """Distance from the centre at which D falls to ``level`` (0 < level < 1)."""
        return math.sqrt(self.length * (level ** (-1.0 / self.power) - 1.0))


@dataclass(frozen=True)
class ValidityDecay:
    """The two-sided decay D(m): ``plus`` for m ≥ 0, ``minus`` for m < 0."""

    plus: DecaySide
    minus: DecaySide

    def __call__(self, m: Any) -> np.ndarray:
        m = np.asarray(m, dtype=np.float64)
        return np.where(m >= 0, self.plus(m), self.minus(m))

    @property
    def continuity_gap(self) -> float:
        """``|D₊(0) − D₋(0)|``: zero when the continuity constraint holds."""
        return abs(float(self.plus(0.0)) - float(self.minus(0.0)))

    def crossing_positive(self, level: float) -> float:
        """Outer multiplier where the positive-side decay falls to ``level``."""
        return self.plus.center + self.plus.half_width(level)

    def crossing_negative(self, level: float) -> float:
        """Outer multiplier where the negative-side decay falls to ``level``."""
        return self.minus.center - self.minus.half_width(level)

    @property
    def breakdown_positive(self) -> float:
        return self.crossing_positive(0.5)

    @property
    def breakdown_negative(self) -> float:
        return self.crossing_negative(0.5)

    def region_of(
        self,
        m: Any,
        linear_threshold: float = LINEAR_THRESHOLD,
        convergence_threshold: float = CONVERGENCE_THRESHOLD,
    ) -> np.ndarray:
        """'linear' / 'transitional' / 'convergence' per multiplier, by the value of D(m)."""
        d = self(m)
        return np.where(
            d >= linear_threshold,
            "linear",
            np.where(d >= convergence_threshold, "transitional", "convergence"),
        )

    def regions(
        self, linear_threshold: float = LINEAR_THRESHOLD, convergence_threshold: float = CONVERGENCE_THRESHOLD
    ) -> Regions:
        if not 0.0 < convergence_threshold < linear_threshold < 1.0:
            raise FitError(
                "region thresholds must satisfy 0 < convergence_threshold < linear_threshold < 1, got "
                f"{convergence_threshold} and {linear_threshold}"
            )
        return Regions(
            linear_threshold=linear_threshold,
            convergence_threshold=convergence_threshold,
            linear_negative=self.crossing_negative(linear_threshold),
            linear_positive=self.crossing_positive(linear_threshold),
            convergence_negative=self.crossing_negative(convergence_threshold),
            convergence_positive=self.crossing_positive(convergence_threshold),
        )


@dataclass(frozen=True)
class Regions:
    """Outer threshold crossings of D on each side.

    Linear region ``[linear_negative, linear_positive]``; transitional between each linear and convergence
    boundary; convergence beyond ``convergence_negative`` / ``convergence_positive``. Exact when D peaks
    inside ``[linear_negative, linear_positive]``; ``ValidityDecay.region_of`` is authoritative otherwise.
    """

    linear_threshold: float
    convergence_threshold: float
    linear_negative: float
    linear_positive: float
    convergence_negative: float
    convergence_positive: float


@dataclass(frozen=True)
class DecayFit:
    """A fitted preference or utility curve. ``alpha`` is None for utility fits.

    ``r2`` is None when the fitted data are flat (SS_tot = 0). ``poor_fit`` is True when R² is undefined or
    below the threshold, the continuity constraint is not met, there are fewer points than parameters, or
    the data do not determine the curve (``undetermined``: given per-point standard errors, the whole
    variation is within ``MIN_SIGNAL_HALF_WIDTHS`` typical 95 % half-widths — a high R² there fits noise);
    ``warnings`` says why, and also lists parameters that ended at a bound.
    """

    kind: str
    alpha: float | None
    beta: float
    b: float
    decay: ValidityDecay
    r2: float | None
    rss: float
    n_points: int
    multiplier_range: float
    poor_fit: bool
    warnings: tuple[str, ...] = field(default_factory=tuple)
    undetermined: bool = False

    def predict(self, m: Any) -> np.ndarray:
        m = np.asarray(m, dtype=np.float64)
        d = self.decay(m)
        if self.kind == "preference":
            assert self.alpha is not None
            return (self.alpha * m + self.beta) * d + self.b
        return self.beta * d + self.b

    @property
    def params(self) -> dict[str, float]:
        """Parameters by name (``PARAM_NAMES[kind]``), in original units."""
        decay = self.decay
        values = {
            "alpha": self.alpha,
            "beta": self.beta,
            "b": self.b,
            "m_plus": decay.plus.center,
            "L_plus": decay.plus.length,
            "p_plus": decay.plus.power,
            "m_minus": decay.minus.center,
            "L_minus": decay.minus.length,
            "p_minus": decay.minus.power,
        }
        return {name: float(values[name]) for name in PARAM_NAMES[self.kind]}  # type: ignore[arg-type]

    @property
    def breakdown_positive(self) -> float:
        return self.decay.breakdown_positive

    @property
    def breakdown_negative(self) -> float:
        return self.decay.breakdown_negative

    @property
    def continuity_gap(self) -> float:
        return self.decay.continuity_gap

    def regions(
        self, linear_threshold: float = LINEAR_THRESHOLD, convergence_threshold: float = CONVERGENCE_THRESHOLD
    ) -> Regions:
        return self.decay.regions(linear_threshold, convergence_threshold)

    def to_dict(self) -> dict[str, Any]:
        regions = self.regions()
        return {
            "kind": self.kind,
            "params": self.params,
            "r2": self.r2,
            "rss": self.rss,
            "n_points": self.n_points,
            "multiplier_range": self.multiplier_range,
            "range_definition": RANGE_DEFINITION,
            "continuity_gap": self.continuity_gap,
            "poor_fit": self.poor_fit,
            "undetermined": self.undetermined,
            "warnings": list(self.warnings),
            "breakdown": {"negative": self.breakdown_negative, "positive": self.breakdown_positive},
            "regions": {
                "linear_threshold": regions.linear_threshold,
                "convergence_threshold": regions.convergence_threshold,
                "linear": [regions.linear_negative, regions.linear_positive],
                "convergence_below": regions.convergence_negative,
                "convergence_above": regions.convergence_positive,
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecayFit:
        """Rebuild a fit from ``to_dict`` output (derived entries are recomputed, not read)."""
        kind = data.get("kind")
        if kind not in KINDS:
            raise FitError(f"fit dict: kind must be one of {KINDS}, got {kind!r}")
        params = data.get("params", {})
        missing = sorted(set(PARAM_NAMES[kind]) - set(params))
        if missing:
            raise FitError(f"fit dict: missing parameter(s) {missing} for a {kind} fit")
        decay = ValidityDecay(
            plus=DecaySide(params["m_plus"], params["L_plus"], params["p_plus"]),
            minus=DecaySide(params["m_minus"], params["L_minus"], params["p_minus"]),
        )
        return cls(
            kind=kind,
            alpha=params["alpha"] if kind == "preference" else None,
            beta=params["beta"],
            b=params["b"],
            decay=decay,
            r2=data["r2"],
            rss=data["rss"],
            n_points=data["n_points"],
            multiplier_range=data["multiplier_range"],
            poor_fit=data["poor_fit"],
            warnings=tuple(data.get("warnings", ())),
            undetermined=bool(data.get("undetermined", False)),
        )


def fit_preference(
    m: Any, y: Any, *, sem: Any = None, n_random_starts: int = 12, seed: int = 0, poor_fit_r2: float = POOR_FIT_R2
) -> DecayFit:
    """Fit ``PrefOdds(m) = (α·m + β)·D_p(m) + b`` to points (m, y); `sem` are their standard errors."""
    return _fit("preference", m, y, sem, n_random_starts=n_random_starts, seed=seed, poor_fit_r2=poor_fit_r2)


def fit_utility(
    m: Any, y: Any, *, sem: Any = None, n_random_starts: int = 12, seed: int = 0, poor_fit_r2: float = POOR_FIT_R2
) -> DecayFit:
    """Fit ``UtilOdds(m) = β_u·D_u(m) + b_u`` to points (m, y); `sem` are their standard errors."""
    return _fit("utility", m, y, sem, n_random_starts=n_random_starts, seed=seed, poor_fit_r2=poor_fit_r2)


def score(fit: DecayFit, m: Any, y: Any) -> float | None:
    """R² of ``fit`` on other points (e.g. a train-fitted curve on the test curve); None if y is flat."""
    m_arr, y_arr = _validated_points(m, y)
    return r2_score(y_arr, fit.predict(m_arr))


def r2_score(y: np.ndarray, predicted: np.ndarray) -> float | None:
    """``1 − SS_res/SS_tot``; None when SS_tot = 0 (R² is undefined for flat data)."""
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    if ss_tot == 0.0:
        return None
    return 1.0 - float(np.sum((y - predicted) ** 2)) / ss_tot


@dataclass(frozen=True)
class _Problem:
    kind: str
    x: np.ndarray  # m / range
    t: np.ndarray  # (y − c) / s
    positive: np.ndarray  # m ≥ 0
    bounds: tuple[tuple[float, float], ...]
    dense_x: np.ndarray = field(default_factory=lambda: np.zeros(0))  # where the envelope is enforced
    min_width: float = 0.0  # smallest gap between multipliers: no decay may be narrower (normalised units)

    @property
    def n_linear(self) -> int:
        return 3 if self.kind == "preference" else 2


@dataclass(frozen=True)
class _Solution:
    theta: np.ndarray
    loss: float
    continuity: float
    envelope: float  # the smallest envelope margin (≥ 0: inside), normalised units


def _between(x: np.ndarray) -> np.ndarray:
    """The data's multipliers and `_POINTS_PER_GAP` evenly spaced points inside every gap between them."""
    fractions = np.arange(1, _POINTS_PER_GAP + 1) / (_POINTS_PER_GAP + 1)
    inside = (x[:-1, None] + (x[1:] - x[:-1])[:, None] * fractions[None, :]).reshape(-1)
    return np.union1d(x, inside)


def _fit(kind: str, m: Any, y: Any, sem: Any, *, n_random_starts: int, seed: int, poor_fit_r2: float) -> DecayFit:
    m_arr, y_arr = _validated_points(m, y)
    n_params = len(PARAM_NAMES[kind])
    notes = _input_warnings(m_arr, n_params)
    undetermined = _noise_note(y_arr, sem, notes)

    m_range = float(np.max(np.abs(m_arr)))
    y_center = (float(y_arr.max()) + float(y_arr.min())) / 2.0
    y_scale = (float(y_arr.max()) - float(y_arr.min())) / 2.0
    if y_scale == 0.0:
        y_scale = 1.0  # flat data: any scale works; R² is reported as undefined below
    x = m_arr / m_range
    problem = _Problem(
        kind=kind,
        x=x,
        t=(y_arr - y_center) / y_scale,
        positive=m_arr >= 0,
        bounds=_normalised_bounds(kind, m_range),
        dense_x=_between(np.unique(x)),
        min_width=float(np.min(np.diff(np.unique(x)))),
    )

    # Screen every start with a short run (continuity only), then refine the most promising ones to
    # convergence under the envelope too.
    screened = [
        _solve(problem, start, _SCREEN_ITERATIONS, envelope=False) for start in _starts(problem, n_random_starts, seed)
    ]
    screened.sort(key=lambda s: (abs(s.continuity) > _SCREEN_CONTINUITY_TOL, s.loss))
    refined = [_solve(problem, s.theta, _REFINE_ITERATIONS, envelope=True) for s in screened[:_REFINED_STARTS]]
    solutions = refined + screened
    feasible = [s for s in solutions if abs(s.continuity) <= _CONTINUITY_TOL and s.envelope >= -_ENVELOPE_TOL]
    if feasible:
        best = min(feasible, key=lambda s: s.loss)
    else:
        best = min(solutions, key=lambda s: (abs(s.continuity) > _CONTINUITY_TOL, -min(s.envelope, 0.0), s.loss))
        if abs(best.continuity) > _CONTINUITY_TOL:
            notes.append(f"continuity constraint not met at any start (log-gap {best.continuity:.3g})")
        if best.envelope < -_ENVELOPE_TOL:
            notes.append(f"the curve leaves the data's range between multipliers by "
                         f"{-best.envelope * y_scale:.3g} (no start kept it inside)")
    notes.extend(_at_bound_warnings(problem, best.theta))

    fit = _to_original_units(kind, best.theta, m_range, y_center, y_scale, n_points=int(m_arr.size))
    predicted = fit.predict(m_arr)
    r2 = r2_score(y_arr, predicted)
    if r2 is None:
        notes.append("data are flat (SS_tot = 0): R² is undefined")
    elif r2 < poor_fit_r2:
        notes.append(f"R² = {r2:.3f} is below {poor_fit_r2}")
    poor = r2 is None or r2 < poor_fit_r2 or not feasible or m_arr.size < n_params or undetermined
    return replace(
        fit,
        r2=r2,
        rss=float(np.sum((y_arr - predicted) ** 2)),
        poor_fit=bool(poor),
        warnings=tuple(notes),
        undetermined=undetermined,
    )


def _noise_note(y: np.ndarray, sem: Any, notes: list[str]) -> bool:
    """Whether the points vary less than their noise; appends the reason to `notes`."""
    if sem is None:
        return False
    errors = as_vector(sem, "sem", FitError)
    if errors.size != y.size:
        raise FitError(f"sem must have one value per point, got {errors.size} for {y.size}")
    if not np.all(np.isfinite(errors)) or np.any(errors < 0):
        raise FitError("sem must be finite and non-negative")
    half_width = 1.96 * float(np.median(errors))
    spread = float(np.ptp(y))
    if spread < MIN_SIGNAL_HALF_WIDTHS * half_width:
        notes.append(f"not determined by the data: the points vary by {spread:.3g}, less than "
                     f"{MIN_SIGNAL_HALF_WIDTHS:g} typical 95 % half-widths ({half_width:.3g}) of their noise")
        return True
    return False


def _validated_points(m: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    m_arr = as_vector(m, "m", FitError)
    y_arr = as_vector(y, "y", FitError)
    if m_arr.size != y_arr.size:
        raise FitError(f"m and y must have the same length, got {m_arr.size} and {y_arr.size}")
    for name, arr in (("m", m_arr), ("y", y_arr)):
        bad = np.flatnonzero(~np.isfinite(arr))
        if bad.size:
            raise FitError(f"{name} is NaN or infinite at index(es) {bad[:10].tolist()}")
    return m_arr, y_arr


def _input_warnings(m: np.ndarray, n_params: int) -> list[str]:
    if m.size < MIN_POINTS:
        raise FitError(f"need at least {MIN_POINTS} points to fit, got {m.size}")
    n_distinct = np.unique(m).size
    if n_distinct < MIN_DISTINCT_MULTIPLIERS:
        raise FitError(f"need at least {MIN_DISTINCT_MULTIPLIERS} distinct multipliers, got {n_distinct}")
    notes = []
    if m.size < n_params:
        notes.append(f"underdetermined: {m.size} points for {n_params} parameters")
    if not np.any(m < 0):
        notes.append("no negative multipliers: the negative side is set by the continuity constraint only")
    if not np.any(m > 0):
        notes.append("no positive multipliers: the positive side is set by the continuity constraint only")
    return notes


def _normalised_bounds(kind: str, m_range: float) -> tuple[tuple[float, float], ...]:
    linear = (-_LINEAR_BOUND, _LINEAR_BOUND)
    length = (_L_MIN / max(m_range, 1.0) ** 2, _L_MAX_FACTOR)
    power = (_P_MIN, _P_MAX)
    decay = ((-0.25, 1.0), length, power, (-1.0, 0.25), length, power)
    n_linear = 3 if kind == "preference" else 2
    return (linear,) * n_linear + decay


def _side_with_jacobian(
    x: np.ndarray, center: float, length: float, power: float
) -> tuple[np.ndarray, np.ndarray]:
    diff = x - center
    u = diff * diff / length
    log1p_u = np.log1p(u)
    d = np.exp(-power * log1p_u)
    d_over = d / (1.0 + u)
    jac = np.column_stack([2.0 * power * diff / length * d_over, power * u / length * d_over, -log1p_u * d])
    return d, jac


def _model_with_jacobian(problem: _Problem, theta: np.ndarray,
                         x: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The model and its Jacobian at the data points (or at `x`, in normalised units)."""
    if x is None:
        x, pos = problem.x, problem.positive
    else:
        pos = x >= 0
    n_lin = problem.n_linear
    d = np.empty_like(x)
    d_jac = np.zeros((x.size, 6))
    d[pos], d_jac[pos, 0:3] = _side_with_jacobian(x[pos], *theta[n_lin : n_lin + 3])
    d[~pos], d_jac[~pos, 3:6] = _side_with_jacobian(x[~pos], *theta[n_lin + 3 : n_lin + 6])
    if problem.kind == "preference":
        alpha, beta, b = theta[:3]
        amplitude = alpha * x + beta
        value = amplitude * d + b
        jac = np.column_stack([x * d, d, np.ones_like(x), amplitude[:, None] * d_jac])
    else:
        beta, b = theta[:2]
        value = beta * d + b
        jac = np.column_stack([d, np.ones_like(x), beta * d_jac])
    return value, jac


def _loss_and_grad(theta: np.ndarray, problem: _Problem) -> tuple[float, np.ndarray]:
    value, jac = _model_with_jacobian(problem, theta)
    residual = value - problem.t
    n = problem.x.size
    return float(residual @ residual) / n, 2.0 * (residual @ jac) / n


def _log_continuity(theta: np.ndarray, n_lin: int) -> float:
    mp, lp, pp, mm, lm, pm = theta[n_lin : n_lin + 6]
    return float(pp * np.log1p(mp * mp / lp) - pm * np.log1p(mm * mm / lm))


def _log_continuity_grad(theta: np.ndarray, n_lin: int) -> np.ndarray:
    mp, lp, pp, mm, lm, pm = theta[n_lin : n_lin + 6]
    up, um = mp * mp / lp, mm * mm / lm
    grad = np.zeros_like(theta)
    grad[n_lin : n_lin + 6] = [
        pp * 2.0 * mp / lp / (1.0 + up),
        -pp * up / lp / (1.0 + up),
        np.log1p(up),
        -pm * 2.0 * mm / lm / (1.0 + um),
        pm * um / lm / (1.0 + um),
        -np.log1p(um),
    ]
    return grad


def _envelope(theta: np.ndarray, problem: _Problem) -> np.ndarray:
    """≥ 0 where the curve stays inside the widened data range at every dense point (normalised units)."""
    value, _ = _model_with_jacobian(problem, theta, problem.dense_x)
    limit = 1.0 + 2.0 * ENVELOPE_SLACK
    return np.concatenate([limit - value, value + limit])


def _width(theta: np.ndarray, problem: _Problem) -> np.ndarray:
    """≥ 0 where each side's curvature width sqrt(L/p) is at least the smallest gap between multipliers.

    A narrower decay is not determined by the data: it could hide a spike between two measured points.
    """
    n_lin = problem.n_linear
    _, lp, pp, _, lm, pm = theta[n_lin:n_lin + 6]
    w2 = problem.min_width ** 2
    return np.array([lp - pp * w2, lm - pm * w2])


def _width_jacobian(theta: np.ndarray, problem: _Problem) -> np.ndarray:
    n_lin = problem.n_linear
    w2 = problem.min_width ** 2
    jac = np.zeros((2, theta.size))
    jac[0, n_lin + 1], jac[0, n_lin + 2] = 1.0, -w2
    jac[1, n_lin + 4], jac[1, n_lin + 5] = 1.0, -w2
    return jac


def _envelope_jacobian(theta: np.ndarray, problem: _Problem) -> np.ndarray:
    _, jac = _model_with_jacobian(problem, theta, problem.dense_x)
    return np.vstack([-jac, jac])


def _solve(problem: _Problem, start: np.ndarray, max_iterations: int, *, envelope: bool) -> _Solution:
    n_lin = problem.n_linear
    constraints = [{
        "type": "eq",
        "fun": _log_continuity,
        "jac": _log_continuity_grad,
        "args": (n_lin,),
    }]
    if envelope and problem.dense_x.size:
        constraints.append({"type": "ineq", "fun": _envelope, "jac": _envelope_jacobian, "args": (problem,)})
        constraints.append({"type": "ineq", "fun": _width, "jac": _width_jacobian, "args": (problem,)})
    result = minimize(
        _loss_and_grad,
        start,
        args=(problem,),
        jac=True,
        method="SLSQP",
        bounds=problem.bounds,
        constraints=constraints,
        options={"maxiter": max_iterations, "ftol": 1e-12},
    )
    theta = _clip(np.asarray(result.x, dtype=np.float64), problem.bounds)
    theta = _polish_linear(problem, theta)
    loss, _ = _loss_and_grad(theta, problem)
    if not np.isfinite(loss):
        return _Solution(theta, math.inf, math.inf, -math.inf)
    inside = float(min(_envelope(theta, problem).min(), _width(theta, problem).min())) if problem.dense_x.size \
        else 0.0
    return _Solution(theta, loss, _log_continuity(theta, n_lin), inside)


def _polish_linear(problem: _Problem, theta: np.ndarray) -> np.ndarray:
    """Re-solve the linear parameters exactly at the found decay; continuity does not involve them."""
    n_lin = problem.n_linear
    candidate = theta.copy()
    candidate[:n_lin] = _best_linear(problem, theta[n_lin:])
    if not _within(candidate, problem.bounds):
        return theta
    before, _ = _loss_and_grad(theta, problem)
    after, _ = _loss_and_grad(candidate, problem)
    if problem.dense_x.size and _envelope(candidate, problem).min() < min(0.0, _envelope(theta, problem).min()):
        return theta  # the exact linear solution would leave the envelope the optimiser kept
    return candidate if after < before else theta


def _best_linear(problem: _Problem, decay: np.ndarray) -> np.ndarray:
    d = _decay_values(problem, decay)
    ones = np.ones_like(problem.x)
    if problem.kind == "preference":
        design = np.column_stack([problem.x * d, d, ones])
    else:
        design = np.column_stack([d, ones])
    coef, *_ = np.linalg.lstsq(design, problem.t, rcond=None)
    return coef


def _decay_values(problem: _Problem, decay: np.ndarray) -> np.ndarray:
    plus = DecaySide(*decay[0:3])
    minus = DecaySide(*decay[3:6])
    return np.where(problem.positive, plus(problem.x), minus(problem.x))


def _starts(problem: _Problem, n_random: int, seed: int) -> list[np.ndarray]:
    bounds = problem.bounds
    n_lin = problem.n_linear
    l_low = bounds[n_lin + 1][0]
    decays = []
    for half_width in _START_HALF_WIDTHS:
        for power in _START_POWERS:
            length = max(l_low, half_width**2 / (2.0 ** (1.0 / power) - 1.0))
            # Centres slightly off 0: at m₊ = m₋ = 0 the constraint's gradient vanishes and SLSQP stalls.
            decays.append(_continuous_decay(_START_CENTER_OFFSET, length, power, length, power))
    rng = np.random.default_rng(seed)
    for _ in range(n_random):
        center_plus = rng.uniform(-0.25, 1.0)
        length_plus, length_minus = np.exp(rng.uniform(math.log(max(l_low, 1e-3)), math.log(10.0), size=2))
        power_plus, power_minus = np.exp(rng.uniform(math.log(0.2), math.log(5.0), size=2))
        decays.append(_continuous_decay(center_plus, length_plus, power_plus, length_minus, power_minus))
    starts = []
    for decay in decays:
        decay = _clip(decay, bounds[n_lin:])
        theta = np.concatenate([_best_linear(problem, decay), decay])
        starts.append(_clip(theta, bounds))
    return starts


def _continuous_decay(
    center_plus: float, length_plus: float, power_plus: float, length_minus: float, power_minus: float
) -> np.ndarray:
    """Decay parameters whose negative centre (≤ 0) is solved from the continuity constraint."""
    log_d0 = power_plus * math.log1p(center_plus**2 / length_plus)
    center_minus = -math.sqrt(length_minus * math.expm1(log_d0 / power_minus))
    return np.array([center_plus, length_plus, power_plus, center_minus, length_minus, power_minus])


def _clip(theta: np.ndarray, bounds: Sequence[tuple[float, float]]) -> np.ndarray:
    low = np.array([b[0] for b in bounds])
    high = np.array([b[1] for b in bounds])
    return np.clip(theta, low, high)


def _within(theta: np.ndarray, bounds: Sequence[tuple[float, float]]) -> bool:
    return all(lo <= v <= hi for v, (lo, hi) in zip(theta, bounds, strict=True))


def _at_bound_warnings(problem: _Problem, theta: np.ndarray) -> list[str]:
    names = PARAM_NAMES[problem.kind]
    at_bound = [
        name
        for name, value, (lo, hi) in zip(names, theta, problem.bounds, strict=True)
        if min(value - lo, hi - value) <= _BOUND_TOL * (hi - lo)
    ]
    if not at_bound:
        return []
    return [f"parameter(s) at a bound: {', '.join(at_bound)}"]


def _to_original_units(
    kind: str, theta: np.ndarray, m_range: float, y_center: float, y_scale: float, *, n_points: int
) -> DecayFit:
    """The fit in original units; quality fields are placeholders that the caller fills in."""
    n_lin = 3 if kind == "preference" else 2
    mp, lp, pp, mm, lm, pm = (float(v) for v in theta[n_lin:])
    decay = ValidityDecay(
        plus=DecaySide(mp * m_range, lp * m_range**2, pp),
        minus=DecaySide(mm * m_range, lm * m_range**2, pm),
    )
    if kind == "preference":
        alpha_n, beta_n, b_n = (float(v) for v in theta[:3])
        alpha: float | None = y_scale * alpha_n / m_range
    else:
        beta_n, b_n = (float(v) for v in theta[:2])
        alpha = None
    return DecayFit(
        kind=kind,
        alpha=alpha,
        beta=y_scale * beta_n,
        b=y_center + y_scale * b_n,
        decay=decay,
        r2=None,
        rss=math.nan,
        n_points=n_points,
        multiplier_range=m_range,
        poor_fit=True,
    )
