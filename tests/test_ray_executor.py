"""`unisteer run` with `executor: ray`: the same folders and the same summary as the local executor, the same
resume, the same one-line errors. Two cells on the tiny random Llama of tests/fault_jobs.py, on a local Ray."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from fault_jobs import make_model_dir, pairs_file
from unisteer.errors import ConfigError, DataError
from unisteer.pipeline import RunConfig, run_pipeline

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="ray is not installed (pip install 'unisteer[ray]')")
# Starting a local Ray costs tens of seconds; the executor does not touch transformers.
pytestmark = pytest.mark.pinned_only
TIME_KEYS = {"train_seconds", "seconds", "time_s", "elapsed_s"}


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray with 2 CPUs for the module (the pipeline joins a Ray that is already running)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("ray-inputs")
    return make_model_dir(folder / "model"), pairs_file(folder)


def _config(inputs: tuple[Path, Path], out: Path, **extra) -> RunConfig:
    model_dir, pairs = inputs
    raw = {"model": str(model_dir), "dtype": "float32", "layer": 1, "rendering": "natural", "data": str(pairs),
           "split": {"seed": 3, "dev": 8, "test": 8},
           "cells": [{"form": "vector", "objective": "split",
                      "train": {"epochs": 1, "batch_size": 8, "checkpoint_every": 2, "eval_pairs": 0}},
                     {"form": "lora", "objective": "sft",
                      "train": {"epochs": 1, "batch_size": 8, "checkpoint_every": 2, "eval_pairs": 0}}],
           "sweep": {"grid": [-2, -1, 0, 1, 2], "n_boot": 20, "chunk_examples": 8, "batch_rows": 24,
                     "manifold": True, "manifold_max_examples": 8}, "sweep_max_pairs": 12,
           "evaluate": {"grids": {"vector": [-2, 0, 2], "lora": [-1, 0, 1]}}, "out": str(out), **extra}
    return RunConfig(**raw)


def _files(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}


def _close(a, b, where: str = "") -> None:
    """Equal structures, numbers equal to 1e-6 (times left out)."""
    if isinstance(a, dict):
        a = {k: v for k, v in a.items() if k not in TIME_KEYS}
        b = {k: v for k, v in b.items() if k not in TIME_KEYS}
        assert a.keys() == b.keys(), where
        for key in a:
            _close(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and not isinstance(a, bool):
        assert isinstance(b, (int, float)) and (math.isnan(a) and math.isnan(b) or abs(a - b) <= 1e-6), \
            f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _stamps(out: Path, *parts: str) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(out)): (p.stat().st_mtime_ns, p.read_bytes())
            for part in parts for p in (out / part).rglob("*") if p.is_file()}


@pytest.fixture
def one_thread():
    """Float sums depend on how many threads share them; a Ray task given 1 CPU runs torch on 1 thread
    (OMP_NUM_THREADS=1), so the local run does too, and every number comes out bit for bit the same."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rows(out: Path) -> dict[str, list[str]]:
    return {str(p.relative_to(out)): sorted(p.read_text().splitlines()) for p in (out / "sweep").rglob("*.jsonl")}


@needs_ray
def test_ray_executor_matches_local_and_resumes(ray_local, inputs, tmp_path, capsys, one_thread):
    local, remote = tmp_path / "local", tmp_path / "ray"
    run_pipeline(_config(inputs, local), progress=False)
    run_pipeline(_config(inputs, remote, executor="ray", ray={"num_cpus_per_cell": 1}), progress=True)
    err = capsys.readouterr().err
    for name in ("split-vector", "sft-lora"):  # per-cell progress, in whichever order the tasks finish
        assert f"cell {name}: trained" in err and f"cell {name}: swept and evaluated" in err, err
    assert "swept and evaluated (2/2)" in err and "vanilla: evaluated" in err, err

    assert _files(local) == _files(remote)
    assert _rows(local) == _rows(remote)  # one sweep task per cell scores exactly what the joint local sweep does
    _close(json.loads((local / "summary.json").read_text()), json.loads((remote / "summary.json").read_text()),
           "summary")
    for name in ("vanilla", "split-vector", "sft-lora"):
        _close(json.loads((local / "eval" / f"{name}.json").read_text()),
               json.loads((remote / "eval" / f"{name}.json").read_text()), f"eval/{name}")
    sweep = {k: v for k, v in json.loads((remote / "sweep" / "sweep.json").read_text()).items()}
    assert list(sweep["updates"]) == ["split-vector", "sft-lora"]  # config order, whichever task ended first
    assert set(sweep["manifold_reference"]) == {"train", "test"}  # both cells' sweeps merged, none lost

    # A rerun resumes: nothing is trained, swept or evaluated again (the files stay as they were).
    before = _stamps(remote, "cells", "sweep/scores", "eval")
    run_pipeline(_config(inputs, remote, executor="ray"), progress=False)
    assert _stamps(remote, "cells", "sweep/scores", "eval") == before
    _close(json.loads((local / "summary.json").read_text()), json.loads((remote / "summary.json").read_text()),
           "summary after resume")


@needs_ray
def test_a_user_error_inside_a_task_is_the_same_one_line_error(ray_local, inputs, tmp_path):
    config = _config(inputs, tmp_path / "bad", executor="ray")
    config.data = str(tmp_path / "missing.jsonl")  # only the tasks read the data
    with pytest.raises(DataError) as caught:
        run_pipeline(config, progress=False)
    assert type(caught.value) is DataError and "missing.jsonl" in str(caught.value)
    assert "Traceback" not in str(caught.value) and "\n" not in str(caught.value)


def test_a_bad_executor_or_ray_key_names_the_field(inputs, tmp_path):
    with pytest.raises(ConfigError, match=r"executor: 'dask' is not one of \('local', 'ray'\)"):
        _config(inputs, tmp_path, executor="dask")
    with pytest.raises(ConfigError, match=r"ray: unknown key\(s\) \['gpus'\]"):
        _config(inputs, tmp_path, executor="ray", ray={"gpus": 1})
    with pytest.raises(ConfigError, match="ray.num_gpus_per_cell"):
        _config(inputs, tmp_path, executor="ray", ray={"num_gpus_per_cell": -1})


def test_ray_missing_says_how_to_install_it(inputs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    with pytest.raises(ConfigError, match=r"pip install 'unisteer\[ray\]'"):
        run_pipeline(_config(inputs, tmp_path / "out", executor="ray"), progress=False)
