"""The shared workflow steps: one split for every command, held-out checks, the measured rendering."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tiny_models import tiny_model
from unisteer.cli import EXIT_USER_ERROR, main
from unisteer.data.builtin import load_builtin
from unisteer.data.pairs import PairDataset, PolarityPair
from unisteer.data.rendering import Rendering
from unisteer.engine.updates import create_update
from unisteer.errors import ConfigError, DataError
from unisteer.workflow import check_held_out, choose_rendering, rendering_of, trained_pair_ids


def _pairs(n: int, start: int = 0) -> PairDataset:
    return PairDataset([PolarityPair(f"Question {i}?", " Yes", " No") for i in range(start, start + n)], name="toy")


def test_size_flags_never_move_test_or_dev_pairs_into_train():
    default = load_builtin("persona/psychopathy")
    smaller = load_builtin("persona/psychopathy", split={"train": 200})
    assert smaller.splits.sizes() == {"train": 200, "dev": 100, "test": 100}
    assert set(smaller.splits.test.content_ids()) == set(default.splits.test.content_ids())
    held_out = set(default.splits.test.content_ids()) | set(default.splits.dev.content_ids())
    assert not held_out & set(smaller.splits.train.content_ids())
    # Another seed is another split: its training part overlaps the default test part, which is what the
    # held-out check catches when an update trained on one is evaluated on the other.
    other = load_builtin("persona/psychopathy", split={"seed": 7})
    assert set(other.splits.train.content_ids()) & set(default.splits.test.content_ids())


def test_check_held_out_refuses_overlap_and_warns_when_allowed(caplog):
    model = tiny_model("llama")
    update = create_update(model, "vector", 1, seed=0)
    update.spec.training = {"data": _pairs(10).provenance()}
    assert trained_pair_ids(update) == set(_pairs(10).content_ids())
    assert check_held_out(update, _pairs(5, start=10), name="test") == 0
    with pytest.raises(DataError, match="trained on 3 of the 5 pairs of test"):
        check_held_out(update, _pairs(5, start=7), name="test")
    assert check_held_out(update, _pairs(5, start=7), name="test", allow_overlap=True) == 3
    assert "not held-out results" in caplog.text
    update.spec.training = {}
    assert check_held_out(update, _pairs(5), name="test") == 0  # cannot be checked: warned, let through


def test_rendering_is_recorded_and_read_back():
    model = tiny_model("llama")
    update = create_update(model, "vector", 1, seed=0)
    assert rendering_of(update) is None
    update.spec.training = {"encoder": {"rendering": Rendering(completion_space="keep", name="x").to_dict()}}
    assert rendering_of(update).completion_space == "keep"


class _SpaceTokenizer:
    """Word-level tokenizer whose vocabulary makes ' Yes' and 'Yes' different tokens, without a chat template."""

    chat_template = None
    eos_token, eos_token_id, pad_token_id, bos_token_id = "</s>", 2, 0, 1

    def __init__(self):
        self.vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}

    def _id(self, piece: str) -> int:
        return self.vocab.setdefault(piece, len(self.vocab) % 101)

    def __call__(self, text, add_special_tokens=True):
        pieces, word = [], ""
        for char in text:
            if char == " " and word:
                pieces.append(word)
                word = " "
            else:
                word += char
        if word:
            pieces.append(word)
        ids = [self._id(p) for p in pieces if p != "</s>"] + ([2] if text.endswith("</s>") else [])
        return {"input_ids": ids}


def test_choose_rendering_picks_the_spelling_the_model_finds_likelier():
    torch.manual_seed(0)
    model = tiny_model("llama")
    tokenizer = _SpaceTokenizer()
    pairs = [PolarityPair(f"Q{i}:", " Yes", " No") for i in range(6)]
    choice = choose_rendering(model, tokenizer, pairs, sample=6)
    assert set(choice.answer_nll) == {"join", "keep"}
    expected = min(choice.answer_nll, key=lambda k: (choice.answer_nll[k], k != "join"))
    assert choice.rendering.completion_space == expected
    assert choice.rendering.end_of_turn == (choice.end_of_turn_nll < 0.6931471805599453)
    assert json.loads(json.dumps(choice.to_dict()))["pairs"] == 6
    # Yes/No answers: the instruction is a measured candidate, kept only if it raises the mass on the answers.
    instructions = {c.instruction for c in choice.candidates}
    assert instructions == {"", "Answer with Yes or No."}
    best = {i: min((c for c in choice.candidates if c.instruction == i), key=lambda c: c.answer_nll)
            for i in instructions}
    assert choice.rendering.instruction == ""  # measured and recorded, appended only when asked for
    assert any("not appended" in note for note in choice.notes)
    preferred = choose_rendering(model, tokenizer, pairs, sample=6, prefer_instruction=True)
    assert preferred.rendering.instruction == max(best, key=lambda i: (best[i].in_format, i == ""))
    for candidate in choice.candidates:
        assert 0 < candidate.in_format < 1 and math.isfinite(candidate.util_odds)


def test_answer_format_instruction_only_for_a_few_short_fixed_answers():
    from unisteer.data.rendering import answer_format_instruction

    assert answer_format_instruction([PolarityPair("q", " No", " Yes"), PolarityPair("r", " Yes", " No")]) == \
        "Answer with Yes or No."
    assert answer_format_instruction([PolarityPair("q", "(B)", "(A)")]) == "Answer with (A) or (B)."
    assert answer_format_instruction([PolarityPair("q", "I would gladly lead the whole project.", "No thanks.")]) == ""
    many = [PolarityPair("q", f" {i}", f" {i + 10}") for i in range(3)]
    assert answer_format_instruction(many) == ""


def test_instruction_is_appended_to_the_user_turn_and_recorded():
    from unisteer.data.rendering import PairEncoder

    rendering = Rendering(instruction="Answer with Yes or No.")
    encoder = PairEncoder(_SpaceTokenizer(), rendering)
    assert encoder.render_prompt("Q1:") == "Q1:\n\nAnswer with Yes or No."
    assert encoder.describe()["rendering"]["instruction"] == "Answer with Yes or No."
    model = tiny_model("llama")
    update = create_update(model, "vector", 1, seed=0)
    update.spec.training = {"encoder": encoder.describe()}
    assert rendering_of(update).instruction == "Answer with Yes or No."
    with pytest.raises(ConfigError, match="instruction"):
        Rendering(instruction=7)


@pytest.mark.real_model
def test_cli_eval_refuses_an_update_trained_on_its_test_items(capsys, tmp_path, default_model):
    code = main(["train", "--objective", "diffmean", "--data", "persona/psychopathy", "--split-seed", "7",
                 "--train-size", "16", "--layer", "22", "--dtype", "float32", "--rendering", "natural",
                 "--out", str(tmp_path / "dm")])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    code = main(["eval", "--data", "persona/psychopathy", "--update", str(tmp_path / "dm" / "update"),
                 "--multipliers", "-4,0,4", "--dtype", "float32", "--max-pairs", "100"])
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR and "was trained on" in err and "--allow-overlap" in err
    code = main(["eval", "--data", "persona/psychopathy", "--split-seed", "7", "--update",
                 str(tmp_path / "dm" / "update"), "--multipliers", "-4,0,4", "--dtype", "float32",
                 "--max-pairs", "8"])
    out = capsys.readouterr().out
    assert code == 0 and "toward the concept (+m)" in out and "balanced" in out


def test_sweep_names_updates_by_their_run_folder_and_refuses_duplicates(capsys, tmp_path):
    from unisteer.cli import update_name

    assert update_name("runs/A/update") == ("A", "runs/A/update")
    assert update_name("x/lora.safetensors") == ("lora", "x/lora.safetensors")
    assert update_name("mine=runs/A/update") == ("mine", "runs/A/update")
    code = main(["sweep", "--data", "persona/psychopathy", "--update", "a/update", "--update", "b/x=a/update",
                 "--update", "c/a/update", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR and "not unique" in err


def test_train_refuses_an_existing_update_before_loading_anything(capsys, tmp_path):
    (tmp_path / "run" / "update").mkdir(parents=True)
    code = main(["train", "--data", "persona/psychopathy", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR and "already exists" in err and "loading" not in err


def test_a_run_interrupted_before_its_first_checkpoint_restarts_on_rerun(tmp_path):
    """`make demo` interrupted during training once refused to rerun: 'holds a previous run ... pass resume'."""
    from test_training import CharTokenizer, toy_pairs
    from unisteer.data.builtin import BuiltinData
    from unisteer.workflow import train_cell

    model = tiny_model("llama")
    data = BuiltinData("toy", toy_pairs(6).split(dev=0, test=0))
    out = tmp_path / "cell"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"kind": "step", "step": 1, "loss": 1.0}) + "\n")
    trained = train_cell(model, CharTokenizer(), data, objective="split", form="vector", layer=1,
                         rendering=Rendering(), out_dir=out, overrides={"epochs": 1, "batch_size": 2,
                                                                        "eval_pairs": 0}, progress=False)
    assert (out / "update").is_dir() and trained.update.spec.training["data"]["pairs"] == 6
    again = train_cell(model, CharTokenizer(), data, objective="split", form="vector", layer=1,
                       rendering=Rendering(), out_dir=out, progress=False)  # finished: loaded, not retrained
    assert torch.equal(again.update.vector, trained.update.vector)


def test_max_length_override_reaches_the_encoder_of_every_objective(tmp_path):
    """`--set max_length=N` used to be dropped: the cell's encoder was built with the default 512."""
    from test_training import CharTokenizer, toy_pairs
    from unisteer.data.builtin import BuiltinData
    from unisteer.workflow import train_cell

    model = tiny_model("llama")
    data = BuiltinData("toy", toy_pairs(4).split(dev=0, test=0))
    for objective in ("split", "diffmean"):
        trained = train_cell(model, CharTokenizer(), data, objective=objective, form="vector", layer=1,
                             rendering=Rendering(), out_dir=tmp_path / objective, progress=False,
                             overrides={"epochs": 1, "batch_size": 2, "eval_pairs": 0, "max_length": 24})
        training = trained.update.spec.training
        assert training["encoder"]["max_length"] == 24, objective
        assert training["data"]["pairs"] == 4


def test_data_directory_fallback_is_beside_the_project_root(tmp_path, monkeypatch):
    """The fallback once pointed at src/../shared/data, found only when run from the project root."""
    from pathlib import Path

    from unisteer.data import builtin

    assert (builtin.REPO_ROOT / "pyproject.toml").is_file()
    monkeypatch.delenv("UNISTEER_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    expected = (builtin.REPO_ROOT / ".." / "shared" / "data").resolve()
    if expected.is_dir():
        assert builtin.find_data_dir() == expected
    else:
        with pytest.raises(DataError, match=str(Path(expected))):
            builtin.find_data_dir()
