"""Preference and utility log-odds (SPEC §3), computed stably, with clamped points reported.

With the intervention active at multiplier m, ``L_p`` and ``L_n`` are the negative log-likelihoods of the
concept-positive and concept-negative completions. Then

    PrefOdds = L_n − L_p
    UtilOdds = log S − log(1 − S),      S = e^{−L_p} + e^{−L_n}

``log S`` comes from ``logaddexp`` and ``log(1 − S)`` from ``log1mexp(log S)``, so neither underflows for very
large L nor loses digits when S is close to 1. When ``1 − S < eps`` (S ≥ 1 happens with per-token means, and
with sums when the two completions are not disjoint events) ``1 − S`` is replaced by ``eps`` and the point is
flagged in ``LogOdds.clamped``; the same rule applies to both variants so that the two are comparable.

Everything is computed in float64 numpy; torch tensors are accepted as input and converted."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ..errors import LogOddsError
from .arrays import as_vector

Variant = Literal["sum", "mean"]


VARIANTS: tuple[str, ...] = ("sum", "mean")


# Rows of bootstrap resamples drawn per chunk are limited so that the index matrix stays near this size.
_BOOTSTRAP_CHUNK_ELEMENTS = 2_000_000


_MAX_LISTED_INDICES = 10


@dataclass(frozen=True)
class LogOdds:
    """Per-example preference and utility log-odds.

    ``clamped[i]`` is True where ``1 − S`` fell below ``eps`` and was replaced by it, i.e. ``util[i]`` is the
    cap ``log S − log eps`` rather than the exact value.
    """

    pref: np.ndarray
    util: np.ndarray
    clamped: np.ndarray
    log_s: np.ndarray
    variant: str
    eps: float

    @property
    def n_clamped(self) -> int:
        return int(self.clamped.sum())

    def to_dict(self) -> dict[str, Any]:
        return {
            "pref": self.pref.tolist(),
            "util": self.util.tolist(),
            "clamped": self.clamped.tolist(),
            "log_s": self.log_s.tolist(),
            "variant": self.variant,
            "eps": self.eps,
        }


@dataclass(frozen=True)
class Aggregate:
    """Mean of one quantity over examples, with its standard error and a percentile bootstrap CI.

    ``sem``, ``ci_low`` and ``ci_high`` are None when there is a single example (no spread to estimate).
    """

    mean: float
    sem: float | None
    ci_low: float | None
    ci_high: float | None
    n: int
    n_clamped: int
    level: float
    n_boot: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": self.mean,
            "sem": self.sem,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "n": self.n,
            "n_clamped": self.n_clamped,
            "level": self.level,
            "n_boot": self.n_boot,
        }


@dataclass(frozen=True)
class AggregatedCurve:
    """Per-multiplier aggregates of one quantity, sorted by multiplier (one entry per distinct m)."""

    m: np.ndarray
    aggregates: tuple[Aggregate, ...]

    @property
    def mean(self) -> np.ndarray:
        return np.array([a.mean for a in self.aggregates], dtype=np.float64)

    @property
    def sem(self) -> np.ndarray:
        return _optional_column(self.aggregates, "sem")

    @property
    def ci_low(self) -> np.ndarray:
        return _optional_column(self.aggregates, "ci_low")

    @property
    def ci_high(self) -> np.ndarray:
        return _optional_column(self.aggregates, "ci_high")

    @property
    def n(self) -> np.ndarray:
        return np.array([a.n for a in self.aggregates], dtype=np.int64)

    @property
    def n_clamped(self) -> np.ndarray:
        return np.array([a.n_clamped for a in self.aggregates], dtype=np.int64)

    def to_dict(self) -> dict[str, Any]:
        return {"m": self.m.tolist(), "aggregates": [a.to_dict() for a in self.aggregates]}


def compute_log_odds(
    L_p: Any,
    L_n: Any,
    T_p: Any = None,
    T_n: Any = None,
    variant: Variant = "sum",
    eps: float = 1e-6,
) -> LogOdds:
    """Preference and utility log-odds per example.

    ``L_p``/``L_n``: summed completion negative log-likelihoods (≥ 0), 1-D, one entry per example (torch
    tensors, numpy arrays or sequences). ``variant="sum"`` uses them as they are (the exact definition);
    ``variant="mean"`` divides by the completion token counts ``T_p``/``T_n`` (scalars or per-example, > 0).
    Token counts are not used by the ``"sum"`` variant.
    """
    if variant not in VARIANTS:
        raise LogOddsError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if not (isinstance(eps, (int, float)) and 0.0 < eps < 1.0):
        raise LogOddsError(f"eps must be a number in (0, 1), got {eps!r}")
    nll_p = as_vector(L_p, "L_p", LogOddsError, scalar_ok=True)
    nll_n = as_vector(L_n, "L_n", LogOddsError, scalar_ok=True)
    if nll_p.shape != nll_n.shape:
        raise LogOddsError(f"L_p and L_n must have the same length, got {nll_p.size} and {nll_n.size}")
    _require_finite(nll_p, "L_p")
    _require_finite(nll_n, "L_n")
    # A negative NLL means a probability above 1: almost always log-probabilities passed by mistake.
    _require(nll_p >= 0, "L_p", "is negative (expected negative log-likelihoods ≥ 0, not log-probabilities)")
    _require(nll_n >= 0, "L_n", "is negative (expected negative log-likelihoods ≥ 0, not log-probabilities)")

    if variant == "mean":
        if T_p is None or T_n is None:
            raise LogOddsError('variant="mean" needs the token counts T_p and T_n')
        nll_p = nll_p / _token_counts(T_p, "T_p", nll_p.size)
        nll_n = nll_n / _token_counts(T_n, "T_n", nll_n.size)

    pref = nll_n - nll_p
    log_s = np.logaddexp(-nll_p, -nll_n)
    clamped = log_s > math.log1p(-eps)  # exactly "1 − S < eps"
    log_one_minus_s = np.full_like(log_s, math.log(eps))
    log_one_minus_s[~clamped] = log1mexp(log_s[~clamped])
    util = log_s - log_one_minus_s
    return LogOdds(pref=pref, util=util, clamped=clamped, log_s=log_s, variant=variant, eps=float(eps))


def log1mexp(x: np.ndarray) -> np.ndarray:
    """``log(1 − e^x)`` for x < 0, accurate over the whole range.

    ``log(−expm1(x))`` near 0 (where ``1 − e^x`` cancels) and ``log1p(−e^x)`` for very negative x (where
    ``e^x`` is tiny); the switch at −log 2 is the standard one (Mächler 2012).
    """
    x = np.asarray(x, dtype=np.float64)
    if np.any(x >= 0):
        raise LogOddsError("log1mexp needs x < 0 (1 − e^x must be positive)")
    near_zero = x > -math.log(2.0)
    out = np.empty_like(x)
    out[near_zero] = np.log(-np.expm1(x[near_zero]))
    out[~near_zero] = np.log1p(-np.exp(x[~near_zero]))
    return out


def aggregate(
    values: Any,
    clamped: Any = None,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> Aggregate:
    """Mean over examples, standard error (ddof=1) and a percentile bootstrap CI of the mean.

    The bootstrap draws ``n_boot`` resamples with ``numpy.random.default_rng(seed)``, so equal inputs and
    seed give equal intervals. ``clamped`` (a boolean mask, e.g. ``LogOdds.clamped``) is only counted.
    """
    data = as_vector(values, "values", LogOddsError, scalar_ok=True)
    if data.size == 0:
        raise LogOddsError("cannot aggregate an empty set of values")
    _require_finite(data, "values")
    if not (isinstance(n_boot, int) and n_boot >= 1):
        raise LogOddsError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not (0.0 < level < 1.0):
        raise LogOddsError(f"level must be in (0, 1), got {level!r}")
    n_clamped = 0
    if clamped is not None:
        mask = np.asarray(clamped, dtype=bool).reshape(-1)
        if mask.size != data.size:
            raise LogOddsError(f"clamped has {mask.size} entries but values has {data.size}")
        n_clamped = int(mask.sum())

    mean = float(data.mean())
    if data.size == 1:
        return Aggregate(mean, None, None, None, 1, n_clamped, level, n_boot)
    sem = float(data.std(ddof=1) / math.sqrt(data.size))
    boot_means = _bootstrap_means(data, n_boot, seed)
    tail = (1.0 - level) / 2.0
    ci_low, ci_high = np.quantile(boot_means, [tail, 1.0 - tail])
    return Aggregate(mean, sem, float(ci_low), float(ci_high), int(data.size), n_clamped, level, n_boot)


def aggregate_per_multiplier(
    multipliers: Any,
    values: Any,
    clamped: Any = None,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> AggregatedCurve:
    """Group per-example ``values`` by their multiplier (long format: one m per value) and aggregate each.

    Every group uses the same ``seed``, so a group's interval does not depend on which other m were swept.
    """
    m = as_vector(multipliers, "multipliers", LogOddsError, scalar_ok=True)
    data = as_vector(values, "values", LogOddsError, scalar_ok=True)
    if m.size != data.size:
        raise LogOddsError(f"multipliers has {m.size} entries but values has {data.size}")
    _require_finite(m, "multipliers")
    mask = None
    if clamped is not None:
        mask = np.asarray(clamped, dtype=bool).reshape(-1)
        if mask.size != data.size:
            raise LogOddsError(f"clamped has {mask.size} entries but values has {data.size}")
    distinct = np.unique(m)
    aggregates = []
    for m_value in distinct:
        rows = m == m_value
        aggregates.append(
            aggregate(
                data[rows],
                None if mask is None else mask[rows],
                n_boot=n_boot,
                level=level,
                seed=seed,
            )
        )
    return AggregatedCurve(m=distinct, aggregates=tuple(aggregates))


def paired_change(
    multipliers: Any,
    examples: Any,
    values: Any,
    *,
    reference: float = 0.0,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> AggregatedCurve:
    """Per m, the mean over examples of value(m) − value(reference) for the same example, with its CI.

    Pairing by example removes the spread between examples that the per-m intervals carry, so "the update
    moved this quantity at m" is read from whether this interval excludes 0 — not from overlapping
    per-m intervals or from curve endpoints. Examples without a value at `reference` are left out.
    """
    m = as_vector(multipliers, "multipliers", LogOddsError, scalar_ok=True)
    data = as_vector(values, "values", LogOddsError, scalar_ok=True)
    ids = np.asarray(examples).reshape(-1)
    if not (m.size == data.size == ids.size):
        raise LogOddsError(f"multipliers, examples and values differ in length ({m.size}, {ids.size}, {data.size})")
    _require_finite(data, "values")
    at_reference = {ids[i]: data[i] for i in np.flatnonzero(m == reference)}
    if not at_reference:
        raise LogOddsError(f"no values at the reference multiplier {reference:g}")
    aggregates, distinct = [], []
    for m_value in np.unique(m):
        rows = [i for i in np.flatnonzero(m == m_value) if ids[i] in at_reference]
        if not rows:
            continue
        change = np.array([data[i] - at_reference[ids[i]] for i in rows])
        aggregates.append(aggregate(change, n_boot=n_boot, level=level, seed=seed))
        distinct.append(m_value)
    return AggregatedCurve(m=np.asarray(distinct, dtype=np.float64), aggregates=tuple(aggregates))


def _bootstrap_means(data: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows_per_chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // data.size)
    means = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, rows_per_chunk):
        stop = min(n_boot, start + rows_per_chunk)
        idx = rng.integers(0, data.size, size=(stop - start, data.size))
        means[start:stop] = data[idx].mean(axis=1)
    return means


def _token_counts(t: Any, name: str, size: int) -> np.ndarray:
    counts = as_vector(t, name, LogOddsError, scalar_ok=True)
    if counts.size == 1:
        counts = np.full(size, counts[0])
    if counts.size != size:
        raise LogOddsError(f"{name} has {counts.size} entries but there are {size} examples")
    _require_finite(counts, name)
    _require(counts > 0, name, "is not positive (token counts must be ≥ 1)")
    return counts


def _require_finite(arr: np.ndarray, name: str) -> None:
    _require(np.isfinite(arr), name, "is NaN or infinite")


def _require(ok: np.ndarray, name: str, problem: str) -> None:
    bad = np.flatnonzero(~ok)
    if bad.size:
        raise LogOddsError(f"{name} {problem} at example index(es) {_list_indices(bad)}")


def _list_indices(indices: np.ndarray) -> str:
    shown = ", ".join(str(int(i)) for i in indices[:_MAX_LISTED_INDICES])
    more = indices.size - _MAX_LISTED_INDICES
    return f"[{shown}{f', … ({more} more)' if more > 0 else ''}]"


def _optional_column(aggregates: Sequence[Aggregate], field: str) -> np.ndarray:
    # None (single-example groups) becomes NaN here: these arrays feed plots, which skip NaN error bars.
    return np.array(
        [np.nan if getattr(a, field) is None else getattr(a, field) for a in aggregates], dtype=np.float64
    )
