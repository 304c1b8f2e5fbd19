"""Kill a training run, a sweep and a whole `unisteer run` at seeded random points with SIGKILL, rerun the
same command, and require exactly the results of an uninterrupted run — in float32 and in bfloat16.

The jobs are in tests/fault_jobs.py and run in subprocesses on a tiny random model; a kill lands at a seeded
random fraction of the measured uninterrupted working time (after imports and model load).
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fault_jobs import make_model_dir

# Minutes of subprocesses; what they check (kill, rerun, compare) is stack-independent.
pytestmark = pytest.mark.pinned_only

JOBS = Path(__file__).with_name("fault_jobs.py")
TIME_KEYS = {"time_s", "elapsed_s", "seconds", "train_seconds"}
KILLS = {"train": 1, "sweep": 1, "run": 2}  # a run has more stages to land in


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny-model") / "model")


def _launch(job: str, model_dir: Path, out: Path, dtype: str, kill_after: float | None) -> tuple[int, float]:
    """Run the job; SIGKILL it `kill_after` seconds after it is ready. Returns (exit code, working seconds)."""
    process = subprocess.Popen([sys.executable, str(JOBS), job, str(model_dir), str(out), dtype],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    if line.strip() != "ready":
        process.kill()
        raise AssertionError(f"{job} did not start: {line!r} {process.stderr.read()[-3000:]}")
    started = time.monotonic()
    if kill_after is not None:
        try:
            process.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
    code = process.wait(timeout=600)
    if code not in (0, -signal.SIGKILL):
        raise AssertionError(f"{job} failed with {code}: {process.stderr.read()[-3000:]}")
    return code, time.monotonic() - started


def _tear_last_rows(out: Path, lines: int = 3) -> None:
    """As if the kill had landed while a chunk's rows were being written: drop the last rows of each file,
    so that a rerun must compute part of a chunk (whose other rows are already on disk)."""
    for path in (out / "scores").rglob("*.jsonl") if (out / "scores").exists() else []:
        kept = path.read_text().splitlines()[:-lines]
        path.write_text("".join(line + "\n" for line in kept))


def _strip_times(value):
    if isinstance(value, dict):
        return {k: _strip_times(v) for k, v in value.items() if k not in TIME_KEYS}
    if isinstance(value, list):
        return [_strip_times(v) for v in value]
    return value


def _tensors(folder: Path) -> dict[str, list]:
    return {name: t.tolist() for name, t in load_file(str(folder / "update.safetensors")).items()}


def _jsonl(path: Path) -> list:
    return sorted((_strip_times(json.loads(line)) for line in path.read_text().splitlines()),
                  key=lambda r: json.dumps(r, sort_keys=True))


def _results(job: str, out: Path) -> dict:
    if job == "train":
        return {"update": _tensors(out / "update"), "metrics": _jsonl(out / "metrics.jsonl")}
    if job == "sweep":
        rows = {str(p.relative_to(out)): _jsonl(p) for p in sorted((out / "scores").rglob("*.jsonl"))}
        return {"rows": rows, "reference": json.loads((out / "manifold_reference.json").read_text())}
    cells = sorted(p.name for p in (out / "cells").iterdir())
    return {"updates": {c: _tensors(out / "cells" / c / "update") for c in cells},
            "summary": _strip_times(json.loads((out / "summary.json").read_text())),
            "eval": {p.name: json.loads(p.read_text()) for p in sorted((out / "eval").glob("*.json"))},
            "sweep": {str(p.relative_to(out)): _jsonl(p) for p in sorted((out / "sweep" / "scores").rglob("*.jsonl"))}}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("job", ["train", "sweep", "run"])
def test_killed_and_rerun_equals_uninterrupted(job, dtype, model_dir, tmp_path):
    rng = random.Random(zlib.crc32(f"{job}-{dtype}".encode()))
    code, working = _launch(job, model_dir, tmp_path / "whole", dtype, None)
    assert code == 0
    out = tmp_path / "killed"
    wanted = KILLS[job]
    kills = 0
    for _ in range(6):  # kills at random points, then a run to the end
        fraction = rng.uniform(0.15, 0.85) if kills < wanted else None
        code, _ = _launch(job, model_dir, out, dtype, None if fraction is None else fraction * working)
        if code == 0:
            if fraction is None:
                break
            continue  # finished before the kill (a late point after a resume): draw again
        kills += 1
        if job == "sweep":
            _tear_last_rows(out)
    assert kills == wanted and code == 0, f"expected {wanted} kill(s) and a finished rerun, got {kills}, code {code}"
    assert _results(job, out) == _results(job, tmp_path / "whole")
    assert not list(out.rglob(".layer-cache-*")), "killed runs leave no cache folders behind"
    torch.manual_seed(0)  # the subprocesses did not touch this process's RNG; keep later tests independent
