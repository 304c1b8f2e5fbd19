"""Reference hyperparameters as `TrainConfig` presets (SPEC §5's table, SPEC §6 for the baselines).

    preset("split", "vector")                      # psychopathy row, vector form
    preset("sft", "lora", data="axbench", epochs=4) # overrides are TrainConfig fields (unknown keys rejected)

Rows (SPEC §5; the paper's Gemma-2-9B-IT / Qwen-2.5-7B-IT settings, LoRA rank 4). Where the table gives a
range (epochs 1–2, γ 4–8, θ 0.3–0.5, λ_n 0.5–0.6, batch 2–4, accumulation 1–2) the preset takes its **lower
end**; where it says "add (+sub)" it takes `add`.

| data | form | pairs | batch | accum | epochs | lr | λ_p | λ_n | γ | θ |
|---|---|---|---|---|---|---|---|---|---|---|
| psychopathy | local_weight | add | 4 | 2 | 1 | 0.01 | 1.0 | 0.5 | 5 | 0.4 |
| psychopathy | lora | add+sub | 4 | 2 | 1 | 0.01 | 1.0 | 0.5 | 5 | 0.4 |
| psychopathy | vector | add+sub | 4 | 1 | 2 | 0.08 | 1.0 | 0.5 | 4 | 0.3 |
| power-seeking | local_weight, lora | add | 2 | 2 | 2 | 0.01 | 1.0 | 0.5 | 4 | 0.4 |
| power-seeking | vector | add | 4 | 1 | 2 | 0.08 | 1.0 | 0.5 | 5 | 0.5 |
| axbench | local_weight | add | 2 | 2 | 12 | 0.04 | 1.0 | 0.3 | 3.5 | 0.6 |
| axbench | lora | add | 2 | 2 | 12 | 0.04 | 1.0 | 0.5 | 5 | 0.45 |
| axbench | vector | add | 2 | 1 | 18 | 0.08 | 1.0 | 0.6 | 4 | 0.5 |

Objectives on a row: `split` uses it as is; `sft` sets λ_n = γ = 0 and pairs add+sub (SPEC §6); `reps` keeps
the row's pairs, batch, schedule and learning rate (loss: reference-weighted SimPO, scaler 1, lengths =
completion tokens); `dpo` (BiPO) keeps the schedule, draws a random direction per example (pairs `random`),
one factor per example for both sides, β = 0.1. Every preset trains with the factor set of its form
(vector {2, 4, …, 20}; LoRA / local weight {0.2, 0.4, …, 2.0}), seed 42, AdamW without weight decay, linear
decay without warm-up, clipping at 1.0.
"""

from __future__ import annotations

from typing import Any

from ..config import from_dict
from ..engine.updates import FORMS, PresetRow, form_class
from ..errors import ConfigError
from .config import TrainConfig
from .objectives import OBJECTIVES

PRESET_DATA = ("psychopathy", "power-seeking", "axbench")


def reference_row(data: str, form: str) -> PresetRow:
    """The SPEC §5 row for `data` (a reference row name: psychopathy, power-seeking, axbench) and `form`."""
    if data not in PRESET_DATA:
        raise ConfigError(f"preset data: {data!r} is not one of {PRESET_DATA}")
    if form not in FORMS:
        raise ConfigError(f"preset form: {form!r} is not one of {FORMS}")
    return form_class(form).presets[data]


def preset(objective: str, form: str, *, data: str = "psychopathy", **overrides: Any) -> TrainConfig:
    """A complete `TrainConfig` for `objective` × `form` from the reference row of `data`, then `overrides`."""
    if objective not in OBJECTIVES:
        raise ConfigError(f"preset objective: {objective!r} is not one of {tuple(OBJECTIVES)}")
    values: dict[str, Any] = {"objective": objective, "form": form, **reference_row(data, form).train_fields()}
    if objective == "sft":
        values.update(lambda_n=0.0, gamma=0.0, pairs="add+sub")
    elif objective == "dpo":
        values.update(pairs="random", share_factor=True, beta=0.1)
    elif objective == "reps":
        values.update(reps_scaler=1.0, reps_length="completion")
    values.update(overrides)
    return from_dict(TrainConfig, values, where=f"preset({objective!r}, {form!r}, data={data!r})").resolved()
