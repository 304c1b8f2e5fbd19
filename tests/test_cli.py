"""The `unisteer` command end to end on the default model (tiny workloads) and its user-error handling."""

from __future__ import annotations

import json

import pytest
import yaml

from unisteer.cli import EXIT_USER_ERROR, main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_user_errors_exit_2_without_traceback(capsys, tmp_path):
    code, out, err = run_cli(capsys, "data", "--data", "persona/not-a-trait")
    assert code == EXIT_USER_ERROR and err.startswith("error: ") and "Traceback" not in err
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"data": "persona/psychopathy", "cells": [{"form": "vector",
                                                                            "objective": "split", "lr": 1}]}))
    code, out, err = run_cli(capsys, "run", str(bad))
    assert code == EXIT_USER_ERROR and "unknown key(s) ['lr']" in err
    code, out, err = run_cli(capsys, "report", str(tmp_path / "missing"))
    assert code == EXIT_USER_ERROR and "Traceback" not in err
    # Every section is checked before anything runs: a bad sweep key once surfaced only after training.
    bad.write_text(yaml.safe_dump({"data": "persona/psychopathy", "cells": [{"form": "vector", "objective": "split"}],
                                   "sweep": {"gird": [0, 1]}}))
    code, out, err = run_cli(capsys, "run", str(bad))
    assert code == EXIT_USER_ERROR and "unknown key(s) ['gird']" in err and "loading" not in err
    with pytest.raises(SystemExit) as exit_info:  # argparse's own usage error, also exit code 2
        main(["eval", "--data", "persona/psychopathy", "--train-size", "nan"])
    assert exit_info.value.code == EXIT_USER_ERROR and "--train-size" in capsys.readouterr().err
    code, out, err = run_cli(capsys, "eval", "--data", "x.jsonl", "--fields", "{oops")
    assert code == EXIT_USER_ERROR and "--fields: not valid JSON" in err and "loading" not in err


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("models", "data", "train", "sweep", "fit", "generate", "eval", "run", "report", "serve"):
        assert command in out


@pytest.mark.real_model
def test_pipeline_end_to_end_tiny(capsys, tmp_path, default_model):
    """`unisteer run` on a tiny slice: every stage writes its artefacts, and a rerun resumes from disk."""
    config = {
        "data": "persona/psychopathy", "dtype": "float32", "layer": 15,
        "split": {"seed": 42, "train": 8, "dev": 4, "test": 8},
        "cells": [{"form": "vector", "objective": "diffmean"},
                  {"form": "vector", "objective": "split", "train": {"epochs": 1, "batch_size": 4}}],
        "sweep_max_pairs": 4, "sweep": {"grid": [-8, 0, 8], "n_boot": 50, "manifold": False},
        "evaluate": {"grids": {"vector": [-8, 0, 8]}, "max_pairs": 4},
        "out": str(tmp_path / "run"),
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    code, out, err = run_cli(capsys, "run", str(path), "--no-progress")
    assert code == 0, err
    run = tmp_path / "run"
    assert (run / "sweep" / "report.html").is_file() and (run / "summary.md").is_file()
    report = (run / "report.html").read_text()
    assert report.index("Finding") < report.index("Table 3") < report.index("Settings")  # show, then tell
    summary = json.loads((run / "summary.json").read_text())
    assert [row["cell"] for row in summary["rows"]] == ["vanilla", "diffmean-vector", "split-vector"]
    assert 0.0 <= summary["rows"][0]["m0"]["accuracy"] <= 1.0
    for row in summary["rows"][1:]:
        assert row["toward"]["multiplier"] >= 0 >= row["away"]["multiplier"]
        assert 0.0 <= row["toward"]["accuracy"] <= 1.0 and "balanced_accuracy" in row["toward"]
    assert "(F3)" in report.split("Table 3")[0]  # where utility peaks, stated in the finding
    assert summary["matched_utility_by_form"].keys() <= {"vector"}
    rendering = json.loads((run / "rendering.json").read_text())
    assert rendering["chosen_by"] == "measurement" and rendering["rendering"]["completion_space"] == "join"
    # The instruction is measured and recorded, not appended (it cost steering: docs/FIDELITY.md).
    assert "instruction" not in rendering["rendering"]
    assert {c["instruction"] for c in rendering["candidates"]} == {"", "Answer with Yes or No."}
    finding = report.split("Table 3")[0]  # the demo says why it renders as it does
    assert "Rendering (measurement): the questions as written" in finding
    assert "Answer with Yes or No." in finding.split("Rendering (measurement)")[1]
    trained = json.loads((run / "cells" / "split-vector" / "update" / "update.json").read_text())["spec"]["training"]
    assert len(trained["data"]["pair_ids"]) == 8 and trained["encoder"]["rendering"]["name"] == "measured"
    stamp = (run / "cells" / "split-vector" / "update" / "update.safetensors").stat().st_mtime_ns
    code, out, err = run_cli(capsys, "run", str(path), "--no-progress")
    assert code == 0, err
    assert (run / "cells" / "split-vector" / "update" / "update.safetensors").stat().st_mtime_ns == stamp


def test_matched_utility_compares_objectives_within_each_form():
    from types import SimpleNamespace

    import numpy as np

    from unisteer.pipeline import CellConfig, _matched_utility

    def curve(utility_by_m):
        m = np.array(sorted(utility_by_m), dtype=float)
        mean = np.array([utility_by_m[k] for k in sorted(utility_by_m)], dtype=float)
        return SimpleNamespace(utility=SimpleNamespace(m=m, mean=mean, ci_low=mean - 0.1, ci_high=mean + 0.1))

    def evaluation(toward, rows):
        return {"toward": {"multiplier": toward, "balanced_accuracy": dict(rows)[toward]},
                "test_rows": [{"multiplier": m, "balanced_accuracy": b} for m, b in rows]}

    cells = [CellConfig("lora", "split"), CellConfig("lora", "sft"), CellConfig("vector", "split")]
    fits = SimpleNamespace(curves={("split-lora", "test", "sum"): curve({0.0: 1.0, 1.0: 0.5}),
                                   ("sft-lora", "test", "sum"): curve({0.0: 1.0, 1.0: 0.2, 2.0: 0.6}),
                                   ("split-vector", "test", "sum"): curve({0.0: 1.0, 8.0: 0.9})})
    evaluations = {"split-lora": evaluation(1.0, [(0.0, 0.5), (1.0, 0.8)]),
                   "sft-lora": evaluation(1.0, [(0.0, 0.5), (1.0, 0.7), (2.0, 0.9)]),
                   "split-vector": evaluation(8.0, [(0.0, 0.5), (8.0, 0.95)])}
    lora = _matched_utility(cells[:2], evaluations, fits, "sum")
    # The level is that of the best cell at its chosen +m (split-lora: 0.8 at utility 0.5); sft-lora's m = 2
    # keeps utility 0.6 ≥ 0.5, so it is admitted, while its m = 1 (utility 0.2) is not. The vector cell plays no part.
    assert lora["reference_cell"] == "split-lora" and lora["utility_at_least"] == 0.5
    assert lora["cells"] == {"split-lora": {"balanced_accuracy": 0.8, "multiplier": 1.0},
                             "sft-lora": {"balanced_accuracy": 0.9, "multiplier": 2.0}}
    every = _matched_utility(cells, evaluations, fits, "sum")
    assert every["reference_cell"] == "split-vector" and every["utility_at_least"] == 0.9
    assert every["cells"]["sft-lora"] == {"balanced_accuracy": 0.5, "multiplier": 0.0}
