"""The run's recipe (`unisteer.recipe`): every setting a user writes — a CLI flag, `--set`, a run YAML key —
reaches what is trained and scored and is recorded with the results, on the tiny random Llama of
tests/fault_jobs.py. Before the recipe, `unisteer train --set seed=N` / `--set layer=N` were overruled by the
defaults, and a run's `train: {max_length: N}` reached training only: the sweep and the choice evaluation
scored whole 56-token sequences."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fault_jobs import make_model_dir, pairs_file
from unisteer.cli import EXIT_USER_ERROR, main
from unisteer.data.rendering import Rendering
from unisteer.errors import ConfigError
from unisteer.pipeline import load_run_config
from unisteer.recipe import Recipe

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

MAX = 24  # every pair of pairs_file is longer (about 56 tokens under the character tokenizer's chat template)
SPLIT_FLAGS = ["--split-seed", "3", "--train-size", "12", "--dev-size", "8", "--test-size", "8"]
SPLIT = {"seed": 3, "train": 12, "dev": 8, "test": 8, "stratify": None}
NATURAL = Rendering.parse("natural").to_dict()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("recipe-inputs")
    return make_model_dir(folder / "model"), pairs_file(folder)


@pytest.fixture
def seen(monkeypatch) -> list[int]:
    """The length of every sequence the loaded model is fed (its input embeddings' input), per forward."""
    import unisteer.engine.models as models

    lengths: list[int] = []
    load = models.load_model

    def spying_load(*args, **kwargs):
        model, tokenizer = load(*args, **kwargs)
        model.get_input_embeddings().register_forward_pre_hook(lambda _, inputs: lengths.append(inputs[0].shape[-1]))
        return model, tokenizer

    monkeypatch.setattr(models, "load_model", spying_load)
    return lengths


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def training_record(folder: Path) -> dict:
    return json.loads((folder / "update" / "update.json").read_text())["spec"]


def test_no_sequence_pair_fits_the_chosen_max_length(inputs):
    """The premise of the truncation checks below: every pair is longer than MAX tokens."""
    from test_serving import char_tokenizer
    from unisteer.workflow import load_data

    encoder = Recipe(rendering="natural").encoder(char_tokenizer())
    pairs = load_data(str(inputs[1]), split=SPLIT).splits.train
    assert min(len(e.prompt_ids) + len(e.positive_ids) for e in encoder.encode_all(pairs)) > MAX


@pytest.mark.parametrize("spelling", ["flags", "set"])
def test_cli_train_sweep_eval_honour_and_record_every_recipe_setting(inputs, seen, capsys, tmp_path, spelling):
    model_dir, pairs = inputs
    recipe_args = {"flags": ["--layer", "2", "--rendering", "natural", "--seed", "7", "--max-length", MAX],
                   "set": ["--set", "layer=2", "--set", "rendering=natural", "--set", "seed=7", "--set",
                           f"max_length={MAX}"]}
    code, out, err = run_cli(capsys, "train", "--model", model_dir, "--dtype", "float32", "--data", pairs, *SPLIT_FLAGS,
                             *recipe_args[spelling], "--set", "epochs=1", "--set", "batch_size=4", "--set",
                             "eval_pairs=0", "--out", tmp_path / "train")
    assert code == 0, err
    spec = training_record(tmp_path / "train")
    training = spec["training"]
    assert training["config"]["seed"] == 7 and training["config"]["max_length"] == MAX
    assert spec["layer"] == training["config"]["layer"] == 2
    assert training["encoder"]["max_length"] == MAX and training["encoder"]["rendering"] == NATURAL
    assert training["split"]["seed"] == 3 and training["split"]["sizes"] == {"train": 12, "dev": 8, "test": 8}
    assert training["model_dtype"] == "float32"
    assert training["recipe"] == {"model": str(model_dir), "dtype": "float32", "layer": 2, "rendering": NATURAL,
                                  "max_length": MAX, "split": SPLIT, "seed": 7, "rendering_chosen_by": "configuration"}
    assert training["data"]["truncated_pairs"] == 12  # every training pair was cut ...
    assert seen and max(seen) <= MAX  # ... and nothing longer reached the model
    seen.clear()

    update = tmp_path / "train" / "update"
    code, out, err = run_cli(capsys, "sweep", "--model", model_dir, "--dtype", "float32", "--data", pairs, *SPLIT_FLAGS,
                             "--update", update, "--splits", "test", "--max-pairs", "4", "--grid", "-2,0,2",
                             "--no-manifold", "--max-length", MAX, "--out", tmp_path / "sweep")
    assert code == 0, err
    info = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert info["encoder"]["max_length"] == info["config"]["max_length"] == MAX
    assert info["settings"]["recipe"] == {"model": str(model_dir), "dtype": "float32", "layer": 2,
                                          "rendering": NATURAL, "max_length": MAX, "split": SPLIT, "seed": None,
                                          "rendering_chosen_by": "the updates"}
    assert seen and max(seen) <= MAX
    seen.clear()

    code, out, err = run_cli(capsys, "eval", "--model", model_dir, "--dtype", "bfloat16", "--data", pairs,
                             *SPLIT_FLAGS, "--update", update, "--multipliers", "-2,0,2", "--max-pairs", "4",
                             "--max-length", MAX, "--out", tmp_path / "eval.json")
    assert code == 0, err
    evaluation = json.loads((tmp_path / "eval.json").read_text())
    assert evaluation["rendering"] == NATURAL
    assert evaluation["recipe"] == {"model": str(model_dir), "dtype": "bfloat16", "layer": 2, "rendering": NATURAL,
                                    "max_length": MAX, "split": SPLIT, "seed": None,
                                    "rendering_chosen_by": "the updates"}
    assert seen and max(seen) <= MAX  # the choice items' prompts were cut too


def test_a_setting_given_twice_must_agree(inputs, capsys, tmp_path):
    model_dir, pairs = inputs
    for given in (["--layer", "1", "--set", "layer=2"], ["--seed", "1", "--set", "seed=2"],
                  ["--max-length", "30", "--set", "max_length=40"], ["--rendering", "natural", "--set",
                                                                      "rendering=reference"]):
        code, out, err = run_cli(capsys, "train", "--model", model_dir, "--data", pairs, *given, "--out",
                                 tmp_path / "never")
        assert code == EXIT_USER_ERROR and "give it once" in err and "loading" not in err, given
    code, out, err = run_cli(capsys, "eval", "--model", model_dir, "--data", pairs, "--max-length", "1")
    assert code == EXIT_USER_ERROR and "max_length" in err and "loading" not in err


def _run_yaml(inputs, out: Path, **changes) -> dict:
    model_dir, pairs = inputs
    raw = {"model": str(model_dir), "dtype": "float32", "layer": 2, "rendering": "natural", "data": str(pairs),
           "split": {"seed": 3, "train": 12, "dev": 8, "test": 8},
           "cells": [{"form": "vector", "objective": "diffmean"},
                     {"form": "vector", "objective": "split", "train": {"batch_size": 4, "eval_pairs": 0}}],
           "train": {"epochs": 1}, "sweep": {"grid": [-2, 0, 2], "n_boot": 20, "manifold": False},
           "sweep_max_pairs": 4, "sweep_splits": ["test"],
           "evaluate": {"grids": {"vector": [-2, 0, 2]}, "max_pairs": 4}, "out": str(out)}
    for key, value in changes.items():
        raw[key] = {**raw[key], **value} if isinstance(raw.get(key), dict) else value
    return raw


@pytest.mark.parametrize("spelling", ["train-section", "top-level"])
def test_run_yaml_honours_and_records_every_recipe_setting(inputs, seen, capsys, tmp_path, spelling):
    """max_length and seed written at the top level or in `train:` reach training, the sweep and the evaluation.
    The old code trained at `train.max_length` and swept and evaluated at 512; it refused a top-level
    `max_length` and trained at seed 42 whatever `train.seed` said."""
    changes = {"train-section": {"train": {"max_length": MAX, "seed": 7}},
               "top-level": {"max_length": MAX, "seed": 7}}[spelling]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_run_yaml(inputs, tmp_path / "out", **changes)))
    code, out, err = run_cli(capsys, "run", path, "--no-progress")
    assert code == 0, err
    run = tmp_path / "out"
    info = json.loads((run / "sweep" / "sweep.json").read_text())
    assert info["encoder"]["max_length"] == MAX
    assert seen and max(seen) <= MAX  # training, sweep and evaluation alike
    recipe = {"model": str(inputs[0]), "dtype": "float32", "layer": 2, "rendering": NATURAL, "max_length": MAX,
              "split": SPLIT, "seed": 7, "rendering_chosen_by": "configuration"}
    for cell in ("diffmean-vector", "split-vector"):
        spec = training_record(run / "cells" / cell)
        assert spec["layer"] == 2 and spec["training"]["encoder"]["max_length"] == MAX, cell
        assert spec["training"]["encoder"]["rendering"] == NATURAL and spec["training"]["recipe"] == recipe, cell
        assert spec["training"]["split"]["seed"] == 3, cell
    assert training_record(run / "cells" / "split-vector")["training"]["config"]["seed"] == 7
    assert info["settings"]["recipe"] == recipe
    for name in ("vanilla", "diffmean-vector", "split-vector"):
        assert json.loads((run / "eval" / f"{name}.json").read_text())["recipe"] == recipe, name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["recipe"] == recipe and summary["layer"] == 2 and summary["dtype"] == "float32"
    assert "max length 24" in (run / "report.html").read_text()


def test_run_yaml_refuses_a_setting_said_two_ways(inputs, tmp_path):
    def load(**changes):
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(_run_yaml(inputs, tmp_path / "out", **changes)))
        return load_run_config(path)

    with pytest.raises(ConfigError, match=r"seed: seed says 5 and train.seed says 7; give it once"):
        load(seed=5, train={"seed": 7})
    with pytest.raises(ConfigError, match=r"max_length: train.max_length says 24 and sweep.max_length says 64"):
        load(train={"max_length": 24}, sweep={"max_length": 64})
    with pytest.raises(ConfigError, match=r"layer: layer says 2 and train.layer says 1"):
        load(train={"layer": 1})
    cells = [{"form": "vector", "objective": "split", "train": {"max_length": 64}}]
    with pytest.raises(ConfigError, match=r"cells\[split-vector\]\.train\.max_length: 64 differs from the run's"):
        load(cells=cells)
    # The same value twice is one setting; a cell may train with its own seed.
    config = load(max_length=24, train={"max_length": 24, "layer": 2},
                  cells=[{"form": "vector", "objective": "split", "train": {"seed": 3}}])
    recipe = Recipe.from_run_config(config)
    assert (recipe.max_length, recipe.layer, recipe.seed) == (24, 2, 42)
    assert recipe.cell_recipe(config.cells[0].train).seed == 3


def test_recipe_owns_the_encoder_and_refuses_what_it_cannot_hold():
    from test_serving import char_tokenizer

    recipe = Recipe(rendering={"completion_space": "keep", "end_of_turn": True}, max_length=40, layer=1)
    encoder = recipe.encoder(char_tokenizer())
    assert encoder.max_length == 40 and encoder.rendering == recipe.rendering and encoder.rendering.end_of_turn
    with pytest.raises(ConfigError, match="resolve the recipe first"):
        Recipe().encoder(char_tokenizer())  # "auto" is measured on a model and data first
    for bad in ({"max_length": 1}, {"layer": -1}, {"seed": "x"}, {"split": {"sead": 3}}, {"rendering": "nope"}):
        with pytest.raises(ConfigError):
            Recipe(**bad)
    assert recipe.absorb({"epochs": 2, "max_length": 40, "layer": 1}) == {"epochs": 2}
    with pytest.raises(ConfigError, match=r"train\.max_length: 64 differs from the recipe's max_length \(40\)"):
        recipe.absorb({"max_length": 64}, where="train")
