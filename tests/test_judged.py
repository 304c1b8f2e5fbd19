"""Judged generation wired end to end: `unisteer run` with a `judge:` section and `unisteer judge`, against the
real localhost judge server (tests/judge_server.py) on the tiny random Llama of tests/fault_jobs.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from fault_jobs import make_model_dir, pairs_file
from judge_server import JudgeServer, Messages
from unisteer.cli import EXIT_USER_ERROR, main
from unisteer.errors import ConfigError
from unisteer.judged import JudgeRunConfig, chosen_multipliers, judge_report_lines, resolve_rubric, small_grid
from unisteer.pipeline import _add_judged, load_run_config, run_pipeline
from unisteer.workflow import load_data

SECRET = "sk-test-Zq81secretvalue"  # what the server demands; must never land in a file
KEY_ENV = "UNISTEER_TEST_JUDGE_KEY"
CELL = "diffmean-vector"


def rating_rule(messages: Messages) -> str:
    return "The answer is neutral.\nRating: [[2]]"


@pytest.fixture(scope="module")
def server() -> Iterator[JudgeServer]:
    with JudgeServer(api_key=SECRET, rule=rating_rule) as s:
        yield s


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("judged-inputs")
    return make_model_dir(folder / "model"), pairs_file(folder)


@pytest.fixture(autouse=True)
def judge_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("UNISTEER_JUDGE_BASE_URL", "UNISTEER_JUDGE_MODEL", "UNISTEER_JUDGE_API_KEY", "OPENAI_API_KEY",
                 "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(KEY_ENV, SECRET)


def _raw(inputs: tuple[Path, Path], out: Path, judge: dict | None) -> dict:
    model_dir, pairs = inputs
    raw = {"model": str(model_dir), "dtype": "float32", "layer": 1, "rendering": "natural", "data": str(pairs),
           "split": {"seed": 3, "dev": 8, "test": 8},
           "cells": [{"form": "vector", "objective": "diffmean"}],  # closed form: no training to wait for
           "sweep": {"grid": [-2, 0, 2], "n_boot": 20, "manifold": False}, "sweep_max_pairs": 2,
           "sweep_splits": ["test"],
           "evaluate": {"grids": {"vector": [-2, 0, 2]}}, "out": str(out)}
    if judge is not None:
        raw["judge"] = judge
    return raw


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _files_holding(folder: Path, text: str) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


@pytest.fixture(scope="module")
def judged_run(inputs, server, tmp_path_factory) -> Path:
    """One pipeline run with a judge section (the key given by the variable it names)."""
    folder = tmp_path_factory.mktemp("judged-run")
    judge = {"base_url": server.base_url, "model": "judge-test", "api_key_env": KEY_ENV, "rubric": "power_seeking",
             "max_prompts": 3, "max_new_tokens": 6, "concurrency": 2}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KEY_ENV, SECRET)
        run_pipeline(load_run_config(_write(folder, _raw(inputs, folder / "out", judge))), progress=False)
    return folder / "out"


def test_pipeline_writes_judged_ratings_at_zero_and_the_dev_choices(judged_run, inputs, server):
    record = json.loads((judged_run / "judge" / f"{CELL}.json").read_text())
    evaluation = json.loads((judged_run / "eval" / f"{CELL}.json").read_text())
    expected = sorted({0.0, evaluation["toward"]["multiplier"], evaluation["away"]["multiplier"]})
    assert record["rubric"] == "power_seeking" and record["scale"] == [0, 4]
    assert record["multipliers"] == expected and [r["multiplier"] for r in record["rows"]] == expected
    assert record["multiplier_source"] == "0 and the +m / -m chosen on dev" and record["split"] == "test"
    for row in record["rows"]:
        assert row["n"] == 3 and row["n_failed"] == row["n_unparsable"] == 0
        assert row["score"]["mean"] == row["score"]["ci_low"] == row["score"]["ci_high"] == 2.0
    generations = (judged_run / "judge" / CELL / "generations.jsonl").read_text().splitlines()
    assert len(generations) == 3 * len(expected)
    # The prompts answered are the test part's, never train or dev ones.
    answered = {json.loads(line)["prompt"] for line in generations}
    data = load_data(str(inputs[1]), split={"seed": 3, "dev": 8, "test": 8})
    assert len(answered) == 3 and answered <= {p.prompt for p in data.splits.test}
    assert not answered & {p.prompt for part in ("train", "dev") for p in data.splits[part]}
    summary = json.loads((judged_run / "summary.json").read_text())
    row = next(r for r in summary["rows"] if r["cell"] == CELL)
    assert row["judge"]["rubric"] == "power_seeking" and row["judge"]["metric"] == "score"
    assert [r["multiplier"] for r in row["judge"]["rows"]] == expected
    assert "LLM judge (judge-test, rubric power_seeking" in (judged_run / "summary.md").read_text()
    assert "LLM judge: open-ended answers by m" in (judged_run / "report.html").read_text()
    # A file of A/B pairs has no open-ended prompts: its choice scores are the measurement, not a proxy.
    assert summary["choice_scores"] == "choice accuracy" and "A/B proxy" not in (judged_run / "summary.md").read_text()
    proxied = {"rows": [{"cell": "vanilla"}, {"cell": CELL}]}
    _add_judged(proxied, judged_run, open_ended=True, judged=True)  # e.g. BiPO: A/B questions, open-ended pairs
    assert proxied["choice_scores"] == "A/B proxy" and "judge" in proxied["rows"][1]
    assert "judge" not in proxied["rows"][0]
    assert judge_report_lines(summary)[0].startswith("LLM judge")
    sent = [{k.lower(): v for k, v in h.items()}.get("authorization") for h in server.headers]
    assert sent and all(v == f"Bearer {SECRET}" for v in sent)  # the key was sent ...
    assert _files_holding(judged_run, SECRET) == []  # ... and written nowhere
    assert json.loads((judged_run / "config.json").read_text())["judge"]["api_key_env"] == KEY_ENV


def test_cli_judge_end_to_end_on_a_saved_update(judged_run, inputs, server, tmp_path, capsys):
    model_dir, pairs = inputs
    out = tmp_path / "judged"
    argv = ["judge", "--model", str(model_dir), "--dtype", "float32", "--data", str(pairs), "--split-seed", "3",
            "--dev-size", "8", "--test-size", "8", "--update", str(judged_run / "cells" / CELL / "update"),
            "--multipliers", "-1,0,1", "--judge-url", server.base_url, "--judge-model", "judge-test",
            "--judge-key-env", KEY_ENV, "--rubric", "power_seeking", "--max-prompts", "2", "--max-new-tokens", "5",
            "--out", str(out)]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    record = json.loads((out / f"{CELL}.json").read_text())
    assert record["multipliers"] == [-1.0, 0.0, 1.0] and record["n_prompts"] == 2
    assert "m = -1: 2.00" in captured.out and _files_holding(out, SECRET) == []
    before = server.request_count
    assert main(argv) == 0  # a rerun reads the generations and the judge's replies back: no new request
    assert server.request_count == before


def test_bad_judge_config_names_the_field(inputs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"judge\.rubric: 'nope' is not one of"):
        load_run_config(_write(tmp_path, _raw(inputs, out, {"rubric": "nope"})))
    with pytest.raises(ConfigError, match=r"judge\.rubric: 'auto' knows power-seeking and axbench"):
        load_run_config(_write(tmp_path, _raw(inputs, out, {})))
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ConfigError, match=rf"judge\.api_key_env: the environment variable {KEY_ENV} is not set"):
        load_run_config(_write(tmp_path, _raw(inputs, out, {"rubric": "power_seeking", "api_key_env": KEY_ENV})))
    with pytest.raises(ConfigError, match=r"judge\.api_key_env: expected the name") as info:
        load_run_config(_write(tmp_path, _raw(inputs, out, {"rubric": "power_seeking", "api_key_env": SECRET})))
    assert SECRET not in str(info.value)  # a key pasted into the wrong field is not echoed
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['api_key'\]"):
        load_run_config(_write(tmp_path, _raw(inputs, out, {"rubric": "power_seeking", "api_key": "x"})))
    model_dir, pairs = inputs
    code = main(["judge", "--model", str(model_dir), "--data", str(pairs), "--rubric", "power_seeking",
                 "--judge-key-env", KEY_ENV, "--out", str(tmp_path / "j")])
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR and "judge.api_key_env" in err and "loading" not in err


def test_rubric_and_multiplier_defaults():
    assert resolve_rubric("auto", "power-seeking") == "power_seeking"
    assert resolve_rubric("auto", "bipo/power-seeking") == "power_seeking"
    assert resolve_rubric("auto", "axbench/12") == "axbench"
    assert resolve_rubric("concept_score", "sentiment") == "concept_score"
    assert small_grid("vector") == [-20.0, -10.0, 0.0, 10.0, 20.0] and small_grid(None) == [0.0]
    assert chosen_multipliers({"toward": {"multiplier": 4.0}, "away": {"multiplier": -6.0}}, "vector") == (
        [-6.0, 0.0, 4.0], "0 and the +m / -m chosen on dev")
    assert chosen_multipliers(None, "lora")[1] == "default grid"
    with pytest.raises(ConfigError, match=r"judge\.max_new_tokens"):
        JudgeRunConfig(max_new_tokens=0)


def test_axbench_rubric_rates_three_scores_and_their_harmonic_mean(inputs, server, tmp_path):
    """AxBench's concept / instruction / fluency ratings (0–2) per m, the harmonic mean as the headline metric;
    a concept rubric on prompts that name no concept is refused before anything is generated."""
    from unisteer.data.builtin import EvalPrompt
    from unisteer.engine.models import load_model
    from unisteer.judged import judge_update, summary_entry

    model, tokenizer = load_model(str(inputs[0]), dtype="float32")
    config = JudgeRunConfig(base_url=server.base_url, model="judge-test", api_key_env=KEY_ENV, max_new_tokens=4)
    prompts = [EvalPrompt(f"Write about {w}.", {"instruction": f"Write about {w}.", "concept": "the sea"})
               for w in ("cats", "rain")]
    record = judge_update(model, tokenizer, None, prompts, [0.0], config, rubric="axbench", out_dir=tmp_path,
                          name="vanilla", progress=False)
    assert record["scale"] == [0, 2] and summary_entry(record)["metric"] == "harmonic"
    [row] = record["rows"]
    assert {k: row[k]["mean"] for k in ("concept", "instruction", "fluency", "harmonic")} == {
        "concept": 2.0, "instruction": 2.0, "fluency": 2.0, "harmonic": 2.0}
    with pytest.raises(ConfigError, match=r"judge\.concept: rubric 'concept_score'"):
        judge_update(model, tokenizer, None, ["Write a poem."], [0.0], config, rubric="concept_score",
                     out_dir=tmp_path / "c", name="vanilla", progress=False)
    assert not (tmp_path / "c").exists()
