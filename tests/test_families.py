"""The SPEC §5 reference rows as typed values (`PresetRow`), equal to the positional tuples they replaced."""

from __future__ import annotations

import dataclasses

import pytest

from unisteer.engine.updates import FORM_CLASSES, PresetRow
from unisteer.training import presets
from unisteer.training.presets import PRESET_DATA, preset, reference_row

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
