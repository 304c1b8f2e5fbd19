"""LLM-judge scores of steered generations, grouped by multiplier (power-seeking 0–4, AxBench's three ratings).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import DataError
from ..generation.generate import Generation


@dataclass
class JudgeScoresByM:
    """Judge ratings of generations grouped by multiplier; `scores[metric][j]` lists the item ratings at m_j.

    Metrics: `score` for single-rubric judging; `concept`, `instruction`, `fluency` and `harmonic` (the
    per-answer harmonic mean, 0 if any rating is 0) for AxBench. `report` is the judge's full report
    (judge model, prompts, seed, raw replies) for the record.
    """

    rubric: str
    multipliers: list[float]
    scores: dict[str, list[list[float]]]
    statuses: list[list[str]]  # worst status per item over the rubrics: ok, unparsable or failed
    report: Any
    update_id: str | None = None

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for j, m in enumerate(self.multipliers):
            row: dict[str, Any] = {"multiplier": m, "n": len(self.statuses[j])}
            for metric, per_m in self.scores.items():
                values = np.asarray(per_m[j], dtype=np.float64)
                row[f"mean_{metric}"] = float(values.mean())
                row[f"sem_{metric}"] = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None
            counts = Counter(self.statuses[j])
            row["n_unparsable"], row["n_failed"] = counts.get("unparsable", 0), counts.get("failed", 0)
            out.append(row)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"rubric": self.rubric, "update_id": self.update_id, "rows": self.rows(), "scores": self.scores,
                "statuses": self.statuses, "report": self.report.to_dict()}


def judge_generations(generations: Sequence[Generation], judge: Any, rubric: Any = "power_seeking", *,
                      concept: str | None = None, desc: str | None = None) -> JudgeScoresByM:
    """Judge every generation once and report the ratings per multiplier.

    `rubric` is "axbench" (concept relevance, instruction relevance, fluency and their harmonic mean), a
    registered rubric name ("power_seeking", "concept_score", ...) or a `unisteer.evaluation.rubrics.Rubric`. Items are
    built from each generation: `question` = `instruction` = the prompt (or `meta["instruction"]`),
    `concept` = `concept` or `meta["concept"]`, `answer` = the generated text.
    """
    if not generations:
        raise DataError("no generations to judge")
    update_ids = {g.update_id for g in generations}
    if len(update_ids) > 1:
        raise DataError(f"generations of several updates {sorted(map(str, update_ids))}; judge one update at a time")
    items = []
    for g in generations:
        item = {"question": g.prompt, "instruction": g.meta.get("instruction", g.prompt), "answer": g.text}
        if concept is not None or "concept" in g.meta:
            item["concept"] = concept if concept is not None else g.meta["concept"]
        items.append(item)
    if rubric == "axbench":
        report = judge.score_axbench(items)
        reports = [report.concept, report.instruction, report.fluency]
        per_item = {"concept": report.concept.scores, "instruction": report.instruction.scores,
                    "fluency": report.fluency.scores, "harmonic": report.harmonic_means}
        name = "axbench"
    else:
        report = judge.score(rubric, items, desc=desc)
        reports = [report]
        per_item = {"score": report.scores}
        name = report.rubric
    severity = {"ok": 0, "unparsable": 1, "failed": 2}
    status = [max((r.results[i].status for r in reports), key=severity.__getitem__) for i in range(len(items))]
    grid = sorted({float(g.multiplier) for g in generations})
    groups = [[i for i, g in enumerate(generations) if float(g.multiplier) == m] for m in grid]
    scores = {metric: [[float(values[i]) for i in group] for group in groups] for metric, values in per_item.items()}
    return JudgeScoresByM(name, grid, scores, [[status[i] for i in group] for group in groups], report,
                          next(iter(update_ids)))
