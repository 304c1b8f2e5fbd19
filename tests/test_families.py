"""The dataset-family registry (each family's loader, lister and SPEC §5 reference row in one place), the
reference row a user's own pairs train with, and the reference rows as typed values."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from pathlib import Path

import pytest

from test_data import mini_data  # noqa: F401  (the fixture)
from unisteer import workflow
from unisteer.data.builtin import (
    FAMILIES,
    BuiltinData,
    DatasetFamily,
    family_of,
    list_builtins,
    load_builtin,
    load_persona,
    preset_family,
    register_family,
)
from unisteer.data.pairs import PolarityPair
from unisteer.engine.updates import FORM_CLASSES, PresetRow
from unisteer.errors import ConfigError, DataError
from unisteer.training import presets
from unisteer.training.presets import PRESET_DATA, preset, reference_row
from unisteer.workflow import load_data

MINI = Path(__file__).parent / "fixtures" / "data" / "mini"
BUILTIN_LOG = "unisteer.data.builtin"

# The rows as the positional tuples they were before `PresetRow`:
# (pairs, batch_size, grad_accum, epochs, lr, lambda_p, lambda_n, gamma, theta).
OLD_ROWS = {
    ("vector", "psychopathy"): ("add+sub", 4, 1, 2, 0.08, 1.0, 0.5, 4.0, 0.3),
    ("vector", "power-seeking"): ("add", 4, 1, 2, 0.08, 1.0, 0.5, 5.0, 0.5),
    ("vector", "axbench"): ("add", 2, 1, 18, 0.08, 1.0, 0.6, 4.0, 0.5),
    ("lora", "psychopathy"): ("add+sub", 4, 2, 1, 0.01, 1.0, 0.5, 5.0, 0.4),
    ("lora", "power-seeking"): ("add", 2, 2, 2, 0.01, 1.0, 0.5, 4.0, 0.4),
    ("lora", "axbench"): ("add", 2, 2, 12, 0.04, 1.0, 0.5, 5.0, 0.45),
    ("local_weight", "psychopathy"): ("add", 4, 2, 1, 0.01, 1.0, 0.5, 5.0, 0.4),
    ("local_weight", "power-seeking"): ("add", 2, 2, 2, 0.01, 1.0, 0.5, 4.0, 0.4),
    ("local_weight", "axbench"): ("add", 2, 2, 12, 0.04, 1.0, 0.3, 3.5, 0.6),
}
# One name of every form a built-in can take, and the reference row it trains with.
BUILTIN_ROWS = {
    "persona/psychopathy": "psychopathy", "persona/narcissism": "psychopathy",
    "power-seeking": "power-seeking", "wealth-seeking": "power-seeking", "hallucination": "power-seeking",
    "bipo/power-seeking": "power-seeking", "bipo/jailbreak": "power-seeking",
    "caa/refusal": "power-seeking", "caa/hallucination": "power-seeking",
    "advanced-ai-risk/power-seeking-inclination": "power-seeking", "advanced-ai-risk/lm/corrigible": "power-seeking",
    "axbench/0": "axbench", "axbench/prod_9b_l20_v1/3": "axbench", "sentiment": "axbench",
}


# ---------------------------------------------------------------------------------------------- preset rows


def test_preset_rows_are_typed_and_keep_the_reference_values():
    assert {(form, data) for form in FORM_CLASSES for data in FORM_CLASSES[form].presets} == set(OLD_ROWS)
    for (form, data), old in OLD_ROWS.items():
        row = reference_row(data, form)
        assert isinstance(row, PresetRow) and row is FORM_CLASSES[form].presets[data]
        assert dataclasses.astuple(row) == old, (form, data)
        assert [type(v) for v in dataclasses.astuple(row)] == [type(v) for v in old], (form, data)
        config = preset("split", form, data=data)
        assert all(getattr(config, key) == value for key, value in row.train_fields().items()), (form, data)
    row = reference_row("psychopathy", "vector")
    assert (row.epochs, row.lr, row.gamma, row.theta) == (2, 0.08, 4.0, 0.3)  # read by name
    with pytest.raises(TypeError):
        PresetRow("add", 4, 1, 2, 0.08, 1.0, 0.5, 4.0, 0.3)  # keyword construction only
    with pytest.raises(dataclasses.FrozenInstanceError):
        row.epochs = 3


def test_preset_rows_match_the_table_in_the_presets_docstring():
    documented = {}
    for line in presets.__doc__.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 11 and cells[0] in PRESET_DATA:
            for form in cells[1].split(", "):
                documented[(form, cells[0])] = (cells[2], *(float(c) for c in cells[3:]))
    assert set(documented) == set(OLD_ROWS)
    for key, (pairs, *numbers) in documented.items():
        row = dataclasses.astuple(reference_row(key[1], key[0]))
        assert row[0] == pairs and list(row[1:]) == pytest.approx(numbers), key


# ---------------------------------------------------------------------------------------------- registry


def test_every_builtin_name_maps_to_its_familys_row():
    assert workflow.preset_family is preset_family  # train_cell's choice is the registry's
    for name, row in BUILTIN_ROWS.items():
        assert preset_family(name) == row, name
    assert {family.preset_row for family in FAMILIES.values()} <= set(PRESET_DATA)
    assert list(FAMILIES) == ["persona", "bipo", "caa", "advanced-ai-risk", "axbench", "sentiment"]
    assert family_of("persona") is None and family_of("sentiment/x") is None and family_of("pairs") is None


def test_loaded_builtins_carry_their_family(mini_data, tmp_path):  # noqa: F811
    expected = {"persona/psychopathy": ("persona", "psychopathy"), "power-seeking": ("bipo", "power-seeking"),
                "caa/refusal": ("caa", "power-seeking"), "sentiment": ("sentiment", "axbench"),
                "advanced-ai-risk/power-seeking-inclination": ("advanced-ai-risk", "power-seeking")}
    for name, (family, row) in expected.items():
        data = load_builtin(name, data_dir=mini_data)
        assert (data.family, preset_family(data)) == (family, row), name
    # A BiPO set under its own name (the data is named "my-set", not "bipo/my-set") keeps its family's row.
    shutil.copytree(MINI / "bipo" / "power-seeking", tmp_path / "bipo" / "my-set")
    data = load_builtin("bipo/my-set", data_dir=tmp_path)
    assert data.name == "my-set" and preset_family(data) == "power-seeking"
    # A loader called directly names its data like the registry does.
    assert preset_family(load_persona("psychopathy", root=mini_data)) == "psychopathy"


def test_unknown_families_are_refused_with_the_known_ones(mini_data):  # noqa: F811
    for data in ("gsm8k", "persona", BuiltinData("x", load_builtin("sentiment", data_dir=mini_data).splits,
                                                  family="nope"),
                 BuiltinData("gsm8k/main", load_builtin("sentiment", data_dir=mini_data).splits, files=("a.csv",))):
        with pytest.raises(ConfigError) as caught:
            preset_family(data)
        assert all(name in str(caught.value) for name in FAMILIES), caught.value
    with pytest.raises(DataError, match=re.escape(
            "unknown built-in dataset 'gsm8k'; expected persona/<trait>, power-seeking, wealth-seeking, "
            "hallucination, bipo/<name>, caa/<behaviour>, advanced-ai-risk/<set>, axbench/<concept id> or "
            "sentiment (list_builtins() lists them all)")):
        load_builtin("gsm8k", data_dir=mini_data)


def test_a_new_family_is_one_loader_and_one_registration(mini_data):  # noqa: F811
    def load_demo(member, *, root, split=None):
        data = load_builtin("sentiment", data_dir=root, split=split)
        return dataclasses.replace(data, name=f"demo/{member}")

    family = DatasetFamily("demo", load_demo, lambda root: ["demo/a"], "psychopathy", "a test family", "demo/<x>")
    register_family(family)
    try:
        assert "demo/a" in list_builtins(mini_data)
        data = load_builtin("demo/a", data_dir=mini_data)
        assert (data.name, data.family, preset_family(data)) == ("demo/a", "demo", "psychopathy")
        with pytest.raises(DataError, match="demo/<x>"):
            load_builtin("demo", data_dir=mini_data)
        with pytest.raises(ConfigError, match="already registered"):
            register_family(dataclasses.replace(family, name="demo2", aliases=("power-seeking",)))
    finally:
        FAMILIES.pop("demo")


# ---------------------------------------------------------------------------------------------- own pairs


def _write_pairs(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": p, "positive": a, "negative": b}) + "\n" for p, a, b in rows))
    return path


YES_NO = [(f"Is statement {i} true of you?", " Yes", " No") if i % 2 else (f"Statement {i}?", " No", " Yes")
          for i in range(20)]
AB = [(f"Question {i}?\n\nChoices:\n (A) stay\n (B) grow", " (B)", " (A)") for i in range(20)]
OPEN = [(f"Tell me about plan {i}.", f"I will take control of plan {i}.", f"I will help with plan {i}.")
        for i in range(20)]


def test_own_yes_no_pairs_take_the_psychopathy_row_and_say_why(tmp_path, caplog):
    path = _write_pairs(tmp_path / "mine.jsonl", YES_NO)
    with caplog.at_level(logging.INFO, logger=BUILTIN_LOG):
        assert preset_family(load_data(str(path))) == "psychopathy"
    assert f"the pairs of {path} answer yes/no (20 of 20 pairs)" in caplog.text
    assert "psychopathy reference row" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=BUILTIN_LOG):
        assert preset_family(load_data([PolarityPair(*row) for row in YES_NO])) == "psychopathy"
    assert "the pairs in memory (pairs) answer yes/no" in caplog.text


def test_own_ab_and_open_ended_pairs_take_the_power_seeking_row(tmp_path, caplog, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mixed = YES_NO[:19] + OPEN[:1]
    # A file whose path starts like a family name is still the user's own pairs.
    for rows, path in ((AB, "ab.jsonl"), (OPEN, "persona/open.jsonl"), (mixed, "mixed.jsonl")):
        _write_pairs(tmp_path / path, rows)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=BUILTIN_LOG):
            assert preset_family(load_data(path)) == "power-seeking", path
        assert f"the pairs of {path} are A/B or open-ended" in caplog.text
        assert "power-seeking reference row" in caplog.text
    assert "(19 of 20 pairs answer yes/no)" in caplog.text
    with caplog.at_level(logging.INFO, logger=BUILTIN_LOG):
        assert preset_family(load_data([PolarityPair(*row) for row in AB])) == "power-seeking"
