"""Orthogonality and balance checks: are a sweep's scores explained by how long or how surprising the
completions are, rather than by the concept?

The load-bearing objection to scoring steering by likelihoods is that PrefOdds may track the length
difference of the two completions, or how unlikely the plain model finds each, and UtilOdds their mean
length or plain perplexity. Per (update, split, variant) we report, with bootstrap intervals over examples:

- balance: the paired difference positive − negative of completion length (tokens) and of the plain model's
  per-token NLL (m = 0), with a standardised mean difference;
- orthogonality: Spearman ρ across examples against the length difference (PrefOdds) or the mean length
  (UtilOdds) of the score at m = 0, of its change from m = 0 over the positive and over the negative
  multipliers, and of the contrast (mean over +m) − (mean over −m); and of that contrast against the plain
  NLL difference (PrefOdds) or mean plain NLL (UtilOdds). Nothing that contains the m = 0 row is set against
  the plain NLLs: the scores at m = 0 are computed from them (ρ = ±1 by definition), and a change from
  m = 0 inherits that row's noise (regression to the mean), so either would be flagged on any dataset.

A check is flagged when its interval excludes 0 and its size is not small (|ρ| ≥ 0.3, |SMD| ≥ 0.2).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import rankdata

from .tradeoff import ExampleGrid, bootstrap_indices

FLAG_RHO = 0.3
FLAG_SMD = 0.2


@dataclass(frozen=True)
class Check:
    """One statistic with its bootstrap interval; `flagged` when it is clearly away from 0 and not small."""

    name: str
    value: float | None
    ci: tuple[float, float] | None
    threshold: float
    n_examples: int
    note: str = ""
    always_flagged: bool = False  # every pair differs by the same non-zero amount: no interval needed

    @property
    def flagged(self) -> bool:
        if self.always_flagged:
            return True
        if self.value is None or self.ci is None:
            return False
        return (self.ci[0] > 0 or self.ci[1] < 0) and abs(self.value) >= self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ci": None if self.ci is None else list(self.ci), "flagged": self.flagged}


@dataclass(frozen=True)
class ConfoundReport:
    """Balance and orthogonality checks of one (update, split, variant)."""

    balance: list[Check]
    orthogonality: list[Check]

    @property
    def flagged(self) -> list[Check]:
        return [c for c in (*self.balance, *self.orthogonality) if c.flagged]

    def to_dict(self) -> dict[str, Any]:
        return {"balance": [c.to_dict() for c in self.balance],
                "orthogonality": [c.to_dict() for c in self.orthogonality],
                "flagged": [c.name for c in self.flagged]}

    def sentence(self) -> str:
        flagged = self.flagged
        if not flagged:
            return ("scores are not explained by completion length or plain-model NLL (no balance or "
                    "orthogonality check flagged)")
        parts = [c.note or f"{c.name} {c.value:+.2f} [{c.ci[0]:+.2f}, {c.ci[1]:+.2f}]" for c in flagged]
        return "NOT balanced or orthogonal: " + "; ".join(parts)


def _spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman ρ of the columns of x and y, row by row (x, y: [k, n]); None where a row is constant."""
    rx, ry = rankdata(x, axis=-1), rankdata(y, axis=-1)
    rx -= rx.mean(axis=-1, keepdims=True)
    ry -= ry.mean(axis=-1, keepdims=True)
    denominator = np.sqrt((rx * rx).sum(axis=-1) * (ry * ry).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (rx * ry).sum(axis=-1) / denominator, np.nan)


def _interval(samples: np.ndarray, level: float) -> tuple[float, float] | None:
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return None
    tail = (1.0 - level) / 2.0
    return float(np.quantile(samples, tail)), float(np.quantile(samples, 1.0 - tail))


def _correlation_check(name: str, score: np.ndarray, feature: np.ndarray, resamples: np.ndarray,
                       level: float) -> Check:
    point = float(_spearman(score[None], feature[None])[0])
    boot = _spearman(score[resamples], feature[resamples])
    value = point if np.isfinite(point) else None
    return Check(name, value, _interval(boot, level) if value is not None else None, FLAG_RHO, score.size)


def _balance_check(name: str, difference: np.ndarray, resamples: np.ndarray, level: float) -> Check:
    spread = float(difference.std())
    if spread == 0.0:
        # Every pair has the same difference: exactly balanced when it is 0, otherwise wholly unbalanced.
        constant = float(difference[0])
        if constant == 0.0:
            return Check(name, 0.0, (0.0, 0.0), FLAG_SMD, difference.size, "equal in every pair")
        return Check(name, None, None, FLAG_SMD, difference.size, f"{name}: every pair differs by {constant:+g}",
                     always_flagged=True)
    boot = difference[resamples].mean(axis=1) / spread
    return Check(name, float(difference.mean()) / spread, _interval(boot, level), FLAG_SMD, difference.size)


def confound_checks(examples: np.ndarray, multipliers: np.ndarray, L_p: np.ndarray, L_n: np.ndarray,
                    T_p: np.ndarray, T_n: np.ndarray, pref: np.ndarray, util: np.ndarray, *, n_boot: int = 1000,
                    level: float = 0.95, seed: int = 0) -> ConfoundReport | None:
    """The checks of one (update, split, variant) from its long-format rows; None without rows at m = 0."""
    if not np.any(multipliers == 0.0):
        return None
    grids = {name: ExampleGrid.pivot(examples, multipliers, values) for name, values in
             (("pref", pref), ("util", util), ("L_p", L_p), ("L_n", L_n), ("T_p", T_p), ("T_n", T_n))}
    ids = grids["pref"].ids
    for grid in grids.values():
        ids = np.intersect1d(ids, grid.ids)
    if ids.size < 3:
        return None
    m = grids["pref"].m
    zero = np.flatnonzero(m == 0.0)[0]
    table = {name: grid.select(ids, m) for name, grid in grids.items()}
    lengths_p, lengths_n = table["T_p"][:, zero], table["T_n"][:, zero]
    nll_p = table["L_p"][:, zero] / np.maximum(lengths_p, 1)
    nll_n = table["L_n"][:, zero] / np.maximum(lengths_n, 1)
    resamples = bootstrap_indices(ids.size, n_boot, seed)
    balance = [_balance_check("length positive − negative (SMD)", lengths_p - lengths_n, resamples, level),
               _balance_check("plain per-token NLL positive − negative (SMD)", nll_p - nll_n, resamples, level)]
    features = {"pref": {"length difference": lengths_p - lengths_n, "plain NLL difference": nll_p - nll_n},
                "util": {"mean length": (lengths_p + lengths_n) / 2, "mean plain NLL": (nll_p + nll_n) / 2}}
    orthogonality = []
    positive, negative = m > 0, m < 0
    for quantity, label in (("pref", "PrefOdds"), ("util", "UtilOdds")):
        values = table[quantity]
        length_feature, nll_feature = features[quantity].items()
        # Against length (not computed from the scores): the level at m = 0 and the change from it on each side.
        scores = {f"{label} at m = 0": values[:, zero]}
        for side, mask in (("+m", positive), ("−m", negative)):
            if mask.any():
                scores[f"{label} change over {side}"] = values[:, mask].mean(axis=1) - values[:, zero]
        checks = [(name, score, length_feature) for name, score in scores.items()]
        # Against the plain NLLs only a quantity that leaves the m = 0 row out: the scores at m = 0 are computed
        # from those NLLs (ρ = ±1 by definition), and a change from m = 0 inherits its noise (regression to the
        # mean). The +m − −m contrast is the steering effect without the baseline.
        if positive.any() and negative.any():
            contrast = values[:, positive].mean(axis=1) - values[:, negative].mean(axis=1)
            checks += [(f"{label} +m − −m", contrast, feature) for feature in (length_feature, nll_feature)]
        for score_name, score, (feature_name, feature) in checks:
            orthogonality.append(_correlation_check(f"ρ({score_name}, {feature_name})", score, feature,
                                                    resamples, level))
    return ConfoundReport(balance, orthogonality)
