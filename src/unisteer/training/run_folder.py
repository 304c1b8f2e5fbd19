"""A training run's output folder: what is in it, what may be replaced, and how it is written.

    OUT/update/          the trained update (the engine's format; `spec.training` = the summary)
    OUT/metrics.jsonl    one line per optimizer step, appended as training goes
    OUT/checkpoint/      safetensors + JSON (`training.checkpoint`), every `checkpoint_every` steps
    OUT/summary.json     the training summary
    OUT/.layer-cache-*/  the frozen-prefix activations of a running run (removed after it, and before the
                         next run when a killed run left one)
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import TrainingError
from ..files import JsonlLog, write_json, write_text
from .checkpoint import LEGACY_PICKLE, load_checkpoint

UPDATE_FOLDER = "update"
CHECKPOINT_FILE = "checkpoint"  # a folder: safetensors + JSON (unisteer.training.checkpoint)
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
LAYER_CACHE_PREFIX = ".layer-cache-"


class RunFolder:
    def __init__(self, out_dir: Path):
        self.root = out_dir
        self.update = out_dir / UPDATE_FOLDER
        self.checkpoint = out_dir / CHECKPOINT_FILE
        self.metrics = out_dir / METRICS_FILE
        self.summary = out_dir / SUMMARY_FILE

    def prepare(self, *, resume: bool, overwrite: bool) -> None:
        """Refuse to replace a finished or started run unless asked; clear what a fresh start replaces."""
        if self.update.exists() and not overwrite:
            raise TrainingError(f"{self.update} already exists (a finished run); pass overwrite=True "
                                "(CLI: --overwrite) to train again into this folder, or choose another out_dir")
        legacy = self.root / LEGACY_PICKLE
        previous = [p for p in (self.checkpoint, self.metrics, legacy) if p.exists()]
        if resume:
            if not self.checkpoint.exists():
                if legacy.exists():
                    load_checkpoint(self.checkpoint)  # raises the explanation
                raise TrainingError(f"resume: no checkpoint at {self.checkpoint}")
        elif previous:
            if not overwrite:
                raise TrainingError(f"{self.root} holds a previous run ({', '.join(p.name for p in previous)}); "
                                    "pass resume=True to continue it or overwrite=True to start over")
            for path in previous:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        self.root.mkdir(parents=True, exist_ok=True)

    def new_cache_dir(self) -> Path:
        for stale in self.root.glob(f"{LAYER_CACHE_PREFIX}*"):  # left by a run that was killed
            shutil.rmtree(stale, ignore_errors=True)
        return Path(tempfile.mkdtemp(prefix=LAYER_CACHE_PREFIX, dir=self.root))

    def log(self, record: dict[str, Any]) -> None:
        # No fsync per step: the checkpoint, not this log, is what a resume trusts (lines after it are redone).
        JsonlLog(self.metrics, fsync=False).append([record])

    def truncate_metrics(self, step: int) -> None:
        """Drop metric lines written after the checkpoint (they will be written again), and a torn last line."""
        if not self.metrics.exists():
            return
        kept = [line for _, line in JsonlLog(self.metrics).lines() if json.loads(line).get("step", 0) <= step]
        write_text(self.metrics, "".join(line + "\n" for line in kept))

    def steps(self) -> list[dict[str, Any]]:
        records = [json.loads(line) for _, line in JsonlLog(self.metrics).lines()]
        return [r for r in records if r.get("kind") == "step"]

    def finish(self, summary: dict[str, Any]) -> None:
        write_json(self.summary, summary)
        shutil.rmtree(self.checkpoint, ignore_errors=True)
