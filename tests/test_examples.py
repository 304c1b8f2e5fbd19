"""examples/tutorial.py runs as a script on the default model (its small setting: a slice of persona/psychopathy)
and ends with a Table-3 row and steered generations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.real_model
def test_tutorial_runs_from_pairs_to_table3_and_generations(tmp_path, default_model):
    env = {**os.environ, "UNISTEER_TUTORIAL_SMALL": "1", "UNISTEER_TUTORIAL_OUT": str(tmp_path / "tutorial"),
           "MPLBACKEND": "Agg"}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "tutorial.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "TrainResult: split (split, vector, layer 21)" in done.stdout
    assert "Table3: persona/psychopathy" in done.stdout and "m=0" in done.stdout
    out = tmp_path / "tutorial"
    assert (out / "fit.png").stat().st_size > 10_000
    table = json.loads((out / "table3.json").read_text())["summary"]
    assert [row["cell"] for row in table["rows"]] == ["vanilla", "split"]
    assert table["rows"][1]["toward"]["multiplier"] >= 0 >= table["rows"][1]["away"]["multiplier"]
