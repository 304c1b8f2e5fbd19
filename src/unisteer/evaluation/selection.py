"""Choosing multipliers on held-out data: `select_multiplier` (one m by any score, a fixed tie-break rule) and
`select_steering` (+m and −m by balanced accuracy, which no constant answer can win).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, UnisteerError
from .choices import AccuracyByM

LOWER_IS_BETTER = frozenset({"perplexity", "mean_token_nll", "mean_example_nll"})


TIE_BREAK_RULE = ("among multipliers whose score is within `tolerance` of the best, the smallest |m| wins "
                  "(the least intervention); between m and -m, the positive one")


@dataclass(frozen=True)
class MultiplierSelection:
    """The chosen multiplier, the table it was chosen from, and the rule that chose it."""

    multiplier: float
    value: float
    criterion: str
    maximize: bool
    tolerance: float
    tied: list[float]  # every multiplier within tolerance of the best
    table: list[dict[str, Any]]
    rule: str = TIE_BREAK_RULE

    def format_table(self) -> str:
        lines = [f"{'m':>10}  {self.criterion:>16}", "-" * 28]
        for row in self.table:
            mark = "  <- selected" if row["multiplier"] == self.multiplier else ""
            lines.append(f"{row['multiplier']:>10.4g}  {row[self.criterion]:>16.6g}{mark}")
        goal = "max" if self.maximize else "min"
        lines.append(f"selected m = {self.multiplier:g} ({goal} {self.criterion} = {self.value:.6g}; {self.rule})")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"multiplier": self.multiplier, "value": self.value, "criterion": self.criterion,
                "maximize": self.maximize, "tolerance": self.tolerance, "tied": self.tied, "rule": self.rule,
                "table": self.table}


def select_multiplier(scores: Any, criterion: str = "accuracy", *, maximize: bool | None = None,
                      tolerance: float = 0.0) -> MultiplierSelection:
    """Choose the multiplier with the best `criterion` (see `TIE_BREAK_RULE` for ties).

    `scores` is a result with `rows()` (`AccuracyByM`, `PerplexityByM`, `JudgeScoresByM`), a list of row
    dicts with a "multiplier" key, or a mapping m → {criterion: value} or m → value (of `criterion`). `maximize` defaults to
    True except for perplexity / NLL criteria.
    """
    rows = _selection_rows(scores, criterion)
    if not rows:
        raise ConfigError("select_multiplier: no multipliers to choose from")
    table = []
    for row in rows:
        if criterion not in row:
            raise ConfigError(f"select_multiplier: criterion {criterion!r} not in the scores (available: "
                              f"{sorted(k for k in row if k != 'multiplier')})")
        value = row[criterion]
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise UnisteerError(f"select_multiplier: {criterion} at m = {row['multiplier']} is {value!r}, not a "
                                "finite number")
        table.append({"multiplier": float(row["multiplier"]), criterion: float(value)})
    if not (isinstance(tolerance, int | float) and tolerance >= 0):
        raise ConfigError(f"select_multiplier: tolerance must be >= 0, got {tolerance!r}")
    maximize = criterion not in LOWER_IS_BETTER if maximize is None else maximize
    sign = 1.0 if maximize else -1.0
    best = max(sign * row[criterion] for row in table)
    tied = [row["multiplier"] for row in table if sign * row[criterion] >= best - tolerance]
    chosen = min(tied, key=lambda m: (abs(m), m < 0))
    value = next(row[criterion] for row in table if row["multiplier"] == chosen)
    table.sort(key=lambda row: row["multiplier"])
    return MultiplierSelection(chosen, value, criterion, maximize, float(tolerance), sorted(tied), table)


@dataclass(frozen=True)
class SteeringSelection:
    """The multipliers that steer toward the concept (`toward`, m ≥ 0) and away from it (`away`, m ≤ 0).

    `toward` maximises the dev criterion over m ≥ 0, `away` minimises it over m ≤ 0 (m = 0 competes on both
    sides, so an update that does not move the score is reported at m = 0). The default criterion, balanced
    accuracy, is exactly 0.5 for any constant answer, so a model that says "No" to everything cannot win.
    """

    toward: MultiplierSelection
    away: MultiplierSelection
    criterion: str

    def to_dict(self) -> dict[str, Any]:
        return {"criterion": self.criterion, "toward": self.toward.to_dict(), "away": self.away.to_dict()}


def select_steering(dev: AccuracyByM | Sequence[Mapping[str, Any]], criterion: str = "balanced_accuracy", *,
                    tolerance: float = 0.0) -> SteeringSelection:
    """Choose +m and −m on dev (see `SteeringSelection`; ties as in `select_multiplier`)."""
    rows = dev.rows() if isinstance(dev, AccuracyByM) else [dict(r) for r in dev]
    if rows and criterion not in rows[0]:
        raise ConfigError(f"select_steering: criterion {criterion!r} not in the scores (available: "
                          f"{sorted(k for k in rows[0] if k != 'multiplier')})")
    toward = [r for r in rows if r["multiplier"] >= 0]
    away = [r for r in rows if r["multiplier"] <= 0]
    if not toward or not away:
        raise ConfigError("select_steering: the grid needs m >= 0 and m <= 0 values (include m = 0)")
    return SteeringSelection(select_multiplier(toward, criterion, maximize=True, tolerance=tolerance),
                             select_multiplier(away, criterion, maximize=False, tolerance=tolerance), criterion)


def _selection_rows(scores: Any, criterion: str) -> list[dict[str, Any]]:
    if hasattr(scores, "rows") and callable(scores.rows):
        return scores.rows()
    if isinstance(scores, Mapping):
        rows = []
        for m, value in scores.items():
            row = dict(value) if isinstance(value, Mapping) else {criterion: value}
            rows.append({"multiplier": m, **row})
        return rows
    if isinstance(scores, Sequence) and all(isinstance(r, Mapping) and "multiplier" in r for r in scores):
        return [dict(r) for r in scores]
    raise ConfigError("select_multiplier: scores must be a result with rows(), a list of rows with 'multiplier', "
                      "or a mapping m -> value")
