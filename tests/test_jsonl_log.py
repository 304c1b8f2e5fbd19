"""The one append-only JSON-lines log behind generations, sweep rows, judge replies and training metrics."""

from __future__ import annotations

import json
import math

import pytest

from unisteer.errors import UnisteerError
from unisteer.files import JsonlLog


def test_append_then_read_back_in_order(tmp_path):
    log = JsonlLog(tmp_path / "sub" / "log.jsonl")
    log.append([{"a": 1}, {"a": 2}])
    log.append([])
    log.append([{"a": 3, "nan": math.nan}])
    assert [json.loads(line) for _, line in log.lines()] == [{"a": 1}, {"a": 2}, {"a": 3, "nan": None}]
    assert [number for number, _ in log.lines()] == [1, 2, 3]


def test_a_torn_last_line_is_left_out_then_cut_and_never_swallows_a_record(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"a": 1}\n{"a": 2')  # killed mid-write
    log = JsonlLog(path)
    assert [line for _, line in log.lines()] == ['{"a": 1}'] and log.torn_tail
    log.append([{"a": 3}])  # before any repair: starts on a fresh line
    assert path.read_text() == '{"a": 1}\n{"a": 2\n{"a": 3}\n'
    path.write_text('{"a": 1}\n{"a": 2')
    assert log.repair() == len('{"a": 2') and path.read_text() == '{"a": 1}\n'
    assert log.repair() == 0


def test_a_complete_record_without_its_newline_is_kept(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}')
    log = JsonlLog(path)
    assert log.repair() == 0 and len(log.lines()) == 2 and not log.torn_tail
    log.append([{"a": 3}])
    assert [json.loads(line)["a"] for _, line in log.lines()] == [1, 2, 3]


def test_a_write_that_fails_names_the_file(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(UnisteerError, match="cannot write .*rerun the same command to resume"):
        JsonlLog(blocked / "log.jsonl").append([{"a": 1}])


def test_training_metrics_survive_a_torn_line_on_resume(tmp_path):
    from unisteer.training.run_folder import RunFolder

    folder = RunFolder(tmp_path)
    folder.log({"kind": "step", "step": 1})
    folder.log({"kind": "step", "step": 2})
    with open(folder.metrics, "a", encoding="utf-8") as fh:
        fh.write('{"kind": "step", "st')  # killed mid-write
    folder.truncate_metrics(1)
    assert folder.steps() == [{"kind": "step", "step": 1}]
