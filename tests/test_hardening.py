"""Hostile input never gives a traceback, executes code, allocates unbounded memory or passes NaN on.

Each case here was a defect found by a hostile test of the CLI, library and server.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import stat
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from tiny_models import tiny_model
from unisteer.cli import EXIT_USER_ERROR, main
from unisteer.engine.storage import load_update, save_update
from unisteer.engine.updates import create_update
from unisteer.errors import UnisteerError


@pytest.fixture()
def saved(tmp_path):
    model = tiny_model("llama")
    update = create_update(model, "lora", 1, rank=2, seed=0)
    path = save_update(update, tmp_path / "u")
    return model, path


def _edit(path, change):
    meta = json.loads((path / "update.json").read_text())
    (path / "update.json").write_text(json.dumps(change(meta)))


@pytest.mark.parametrize("change,message", [
    (lambda m: [m], "expected a JSON object"),
    (lambda m: {**m, "format_version": "1"}, "format_version must be a positive integer"),
    (lambda m: {k: v for k, v in m.items() if k != "spec"}, "missing or malformed 'spec'"),
    (lambda m: {**m, "spec": {**m["spec"], "layer": "1"}}, "layer: expected an integer"),
    (lambda m: {**m, "spec": {**m["spec"], "layer": 1.0}}, "layer: expected an integer"),
    (lambda m: {**m, "spec": {**m["spec"], "layer": -1}}, "layer: expected an integer in"),
    (lambda m: {**m, "spec": {**m["spec"], "hidden_size": -32}}, "hidden_size: expected an integer in"),
    (lambda m: {**m, "spec": {**m["spec"], "rank": 10**9}}, "rank: expected an integer in"),
    (lambda m: {**m, "spec": {**m["spec"], "rank": 40}}, "rank: 40 exceeds"),
    (lambda m: {**m, "spec": {**m["spec"], "rank": 3}}, "has shape"),
    (lambda m: {**m, "spec": {**m["spec"], "training": "x"}}, "training: expected a mapping"),
])
def test_hand_edited_metadata_is_a_clear_error(saved, change, message):
    model, path = saved
    _edit(path, change)
    started = time.perf_counter()
    with pytest.raises(UnisteerError, match=message):
        load_update(path, model)
    assert time.perf_counter() - started < 5  # refused from the header, before any large allocation


def test_non_utf8_and_non_json_headers(saved, tmp_path):
    model, path = saved
    (path / "update.json").write_bytes(b"\xff\xfe{not json")
    with pytest.raises(UnisteerError, match="not UTF-8"):
        load_update(path)
    single = tmp_path / "single.safetensors"
    save_file({"vector": torch.zeros(32)}, str(single), metadata={"unisteer": "{broken"})
    with pytest.raises(UnisteerError, match="not valid JSON"):
        load_update(single)


def test_non_finite_tensors_are_refused_at_load(tmp_path):
    model = tiny_model("llama")
    update = create_update(model, "vector", 1, seed=0)
    path = save_update(update, tmp_path / "u")
    tensors = {"vector": torch.full((32,), float("nan"))}
    save_file(tensors, str(path / "update.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UnisteerError, match="NaN or infinite"):
        load_update(path, model)


def test_saved_updates_follow_the_umask(tmp_path):
    model = tiny_model("llama")
    old = os.umask(0o022)
    try:
        path = save_update(create_update(model, "vector", 1, seed=0), tmp_path / "u")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert stat.S_IMODE((path / "update.safetensors").stat().st_mode) == 0o644  # safetensors' writer: 0600
    assert stat.S_IMODE((path / "update.json").stat().st_mode) == 0o644


def test_cli_reports_broken_updates_in_one_line(saved, capsys):
    _, path = saved
    _edit(path, lambda m: [m])
    code = main(["generate", "--model", "smollm2-135m-instruct", "--update", str(path), "--prompt", "hi"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == EXIT_USER_ERROR and "Traceback" not in err
    assert errors == [f"error: {path / 'update.json'}: expected a JSON object, got list"]


def test_generation_that_overflows_is_an_error_not_empty_text():
    from test_serving import char_tokenizer
    from unisteer.generation.generate import SamplingConfig, generate_steered

    model = tiny_model("llama")
    update = create_update(model, "vector", 1, seed=0)
    with torch.no_grad():
        update.vector.fill_(3e38)
    with pytest.raises(UnisteerError, match="NaN or infinite at m = \\[2.0\\]"):
        generate_steered(model, char_tokenizer(), ["hi"], update.eval(), [0.0, 2.0], SamplingConfig(max_new_tokens=3),
                         progress=False)


# -- round two (#18) -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """Writes past `nbytes` fail with EFBIG, as on a full disk (SIGXFSZ ignored so that the write just fails)."""
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


@pytest.mark.parametrize("name", ["u", "u.safetensors"])
def test_a_full_disk_while_saving_is_one_error_and_leaves_nothing(tmp_path, name):
    """Was a SafetensorError traceback and a leftover temporary folder."""
    update = create_update(tiny_model("llama"), "local_weight", 1, seed=0)  # a few KiB of tensors
    with file_size_limit(1024), pytest.raises(UnisteerError, match=f"{name}: cannot save the update"):
        save_update(update, tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_while_exporting_leaves_no_partial_file(tmp_path):
    from unisteer.engine.control_vector import export_control_vector
    from unisteer.engine.storage import export_peft_adapter
    from unisteer.files import write_json

    model = tiny_model("llama")
    with file_size_limit(64), pytest.raises(OSError):
        write_json(tmp_path / "summary.json", {"x": "y" * 1000})
    with file_size_limit(64), pytest.raises(OSError):
        export_control_vector(create_update(model, "vector", 1, seed=0), tmp_path / "cv.gguf", model_name="llama")
    with file_size_limit(64), pytest.raises(OSError):
        export_peft_adapter(create_update(model, "lora", 1, rank=2, seed=0), model, tmp_path / "adapter")
    assert list(tmp_path.iterdir()) == []


def test_multiplier_validation_is_linear():
    """100 000 multipliers took about 5 minutes (list.count per value); 20 000 took seconds."""
    from unisteer.engine.updates import check_multipliers
    from unisteer.errors import ConfigError

    values = [i * 0.5 for i in range(20_000)]
    started = time.perf_counter()
    assert check_multipliers(values) == values
    assert time.perf_counter() - started < 1
    with pytest.raises(ConfigError, match=r"duplicated multiplier\(s\) \[3.0\]"):
        check_multipliers(values + [3.0])


def test_a_nan_split_in_a_run_config_is_refused_before_the_model_loads(tmp_path, capsys):
    """`split: {train: .nan}` passed every check and failed with a traceback after the model had loaded."""
    config = tmp_path / "run.yaml"
    config.write_text("data: pairs.jsonl\nmodel: /no/such/model\nsplit: {train: .nan}\n"
                      "cells: [{form: vector, objective: split}]\n")
    code = main(["run", str(config)])
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR and "Traceback" not in err
    assert err.strip() == f"error: {config}: split train=nan: counts must be >= 0, fractions in [0, 1]"


def test_a_ray_client_address_without_ray_client_is_one_error(tmp_path, monkeypatch):
    """`executor: ray` with a ray:// address and no `ray[client]` gave ray.init's ValueError traceback."""
    pytest.importorskip("ray")
    from unisteer.errors import ConfigError
    from unisteer.pipeline import RunConfig, run_pipeline

    monkeypatch.setitem(sys.modules, "grpc", None)  # as if ray[client] were not installed
    config = RunConfig(data="pairs.jsonl", cells=[{"form": "vector", "objective": "split"}], executor="ray",
                       ray={"address": "ray://127.0.0.1:1"}, out=str(tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"ray.address 'ray://127.0.0.1:1': .*pip install 'ray\[client\]'"):
        run_pipeline(config, progress=False)


def test_a_path_as_hub_repo_is_one_error(tmp_path, capsys):
    """`unisteer pull ../../etc` gave the hub client's HFValidationError traceback."""
    code = main(["pull", "../../etc", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("error: hub repo '../../etc': not a valid repo id")
    assert not (tmp_path / "out").exists()


def test_a_non_utf8_prompts_file_is_one_error(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"first prompt\nsecond \xff\xfe prompt\n")
    code = main(["generate", "--model", "/no/such/model", "--prompts-file", str(prompts)])
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR and "Traceback" not in err
    assert err.strip() == f"error: --prompts-file {prompts}:2: not UTF-8 text (invalid start byte at byte 20)"


def test_ctrl_c_while_the_commands_are_being_built_is_an_interrupt(monkeypatch, capsys):
    import unisteer.cli as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert main(["data"]) == cli.EXIT_INTERRUPTED
    assert "Traceback" not in capsys.readouterr().err


def test_ctrl_c_while_unisteer_imports_is_not_a_traceback():
    """The console script imported unisteer (torch: seconds) before any code could catch a Ctrl-C."""
    import subprocess
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    module, _, function = pyproject["project"]["scripts"]["unisteer"].partition(":")
    script = f"import sys\nfrom {module} import {function}\nsys.exit({function}())"  # what pip generates
    # Inside `import torch`, which takes seconds on a cold machine but can finish sooner on a warm, fast one:
    # try shorter delays until the signal lands before the command ends.
    for delay in (0.5, 0.2, 0.05, 0.01):
        # A terminal delivers Ctrl-C with SIGINT at its default; an ignored SIGINT left in this test process by
        # an earlier test would be inherited and make the child deaf to it.
        child = subprocess.Popen([sys.executable, "-c", script, "data"], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True,
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        time.sleep(delay)
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=60)
        assert "Traceback" not in err, err[-2000:]
        if child.returncode != 0:
            break
    assert child.returncode == 130, err[-2000:]
