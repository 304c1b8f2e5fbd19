"""Every option of a training run (`TrainConfig`), validated; per-form defaults come from the form classes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..data.rendering import Rendering
from ..engine.architecture import check_layer_index
from ..engine.updates import FORMS, INSERTIONS, form_class
from ..errors import ConfigError
from .objectives import OBJECTIVES

PAIR_MODES = ("add", "add+sub", "random")


TRAIN_POSITIONS = ("after_prefix", "all")


REPS_LENGTHS = ("completion", "sequence")


HINGES = ("batch", "example")


@dataclass
class TrainConfig:
    """Every option of a training run. Fields left None take the form's default (see `resolved`).

    Reference values per form and dataset: `unisteer.training.presets.preset(objective, form)`.
    """

    objective: str = "split"
    form: str = "vector"
    layer: int | None = None  # None: the middle layer (num_layers // 2), the paper's choice
    insertion: str = "block_output"
    rank: int = 4
    dropout: float = 0.1
    pairs: str = "add+sub"  # add | add+sub | random (one random direction per pair, BiPO)
    factors: tuple[float, ...] | None = None  # None: vector 2..20 step 2; LoRA / local weight 0.2..2.0
    share_factor: bool = False  # one factor per example for both sides (reference: one per sequence)
    batch_size: int = 4
    grad_accum: int = 1
    epochs: int = 2
    lr: float | None = None  # None: vector 0.08, LoRA / local weight 0.01
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    lambda_p: float = 1.0  # SPLIT weights; `sft` uses λ_p only (λ_n = γ = 0 whatever is set here)
    lambda_n: float = 0.5
    gamma: float = 5.0
    theta: float = 0.4
    hinge: str = "batch"  # SPLIT's hinge on minibatch means (reference) | per pair, then averaged ("example")
    beta: float = 0.1  # DPO
    reps_scaler: float = 1.0  # RePS: weight = max(scaler·(r_l − r_w), 1)
    reps_length: str = "completion"  # RePS |w|, |l|: completion tokens, or whole sequences (reference code)
    train_positions: str | None = None  # after_prefix | all; None: vector after_prefix, others all
    rendering: Rendering | None = None  # how pairs become tokens (`unisteer.data.rendering.Rendering`); None: natural
    seed: int = 42
    max_length: int = 512
    prefix_cache: bool = True  # frozen-prefix activation cache (same losses, several times faster)
    cache_memory_mb: float = 1024.0  # above this the cached activations live in a memory-mapped file
    cache_batch_size: int = 16  # sequences per forward while filling the cache and evaluating
    eval_multiplier: float | None = None  # None: the mean of the factor set
    eval_pairs: int = 32  # pairs (dev, else train) scored at −m, 0, +m before/after training; 0: no evaluation
    checkpoint_every: int = 50  # optimizer steps between checkpoints (and at every epoch end)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective: {self.objective!r} is not one of {tuple(OBJECTIVES)}")
        if self.form not in FORMS:
            raise ConfigError(f"form: {self.form!r} is not one of {FORMS}")
        if self.insertion not in INSERTIONS:
            raise ConfigError(f"insertion: {self.insertion!r} is not one of {INSERTIONS}")
        if self.pairs not in PAIR_MODES:
            raise ConfigError(f"pairs: {self.pairs!r} is not one of {PAIR_MODES}")
        if self.train_positions is not None and self.train_positions not in TRAIN_POSITIONS:
            raise ConfigError(f"train_positions: {self.train_positions!r} is not one of {TRAIN_POSITIONS}")
        if self.rendering is not None and not isinstance(self.rendering, Rendering):
            self.rendering = Rendering.parse(self.rendering)
        if self.hinge not in HINGES:
            raise ConfigError(f"hinge: {self.hinge!r} is not one of {HINGES}")
        if self.reps_length not in REPS_LENGTHS:
            raise ConfigError(f"reps_length: {self.reps_length!r} is not one of {REPS_LENGTHS}")
        for name in ("rank", "batch_size", "grad_accum", "epochs", "max_length", "cache_batch_size",
                     "checkpoint_every", "eval_pairs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "eval_pairs" else 1):
                raise ConfigError(f"{name}: expected a positive integer, got {value!r}")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)):
            raise ConfigError(f"layer: expected an integer or null, got {self.layer!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps: expected a non-negative integer, got {self.warmup_steps!r}")
        for name in ("weight_decay", "max_grad_norm", "lambda_p", "lambda_n", "gamma", "theta", "beta",
                     "reps_scaler", "cache_memory_mb", "dropout", "lr", "eval_multiplier"):
            value = getattr(self, name)
            if value is None and name in ("lr", "eval_multiplier"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{name}: expected a finite number, got {value!r}")
            setattr(self, name, float(value))
        for name in ("weight_decay", "max_grad_norm", "lambda_p", "lambda_n", "gamma", "beta", "cache_memory_mb"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: expected a value >= 0, got {getattr(self, name)!r}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"lr: expected a positive learning rate, got {self.lr!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: expected a value in [0, 1), got {self.dropout!r}")
        if self.factors is not None:
            if isinstance(self.factors, (str, bytes)) or not isinstance(self.factors, (list, tuple)):
                raise ConfigError(f"factors: expected a list of positive numbers, got {self.factors!r}")
            if not self.factors:
                raise ConfigError("factors: the factor set is empty")
            for value in self.factors:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                        math.isfinite(value) and value > 0):
                    raise ConfigError(f"factors: every factor must be a positive finite number (the sign comes "
                                      f"from the pair direction), got {value!r}")
            self.factors = tuple(float(v) for v in self.factors)

    def resolved(self, num_layers: int | None = None) -> TrainConfig:
        """A copy with the form defaults filled in (and the layer, when `num_layers` is given)."""
        values = dataclasses.asdict(self)
        if values["factors"] is None:
            values["factors"] = form_class(self.form).train_factors
        if values["lr"] is None:
            values["lr"] = form_class(self.form).learning_rate
        if values["train_positions"] is None:
            values["train_positions"] = "after_prefix" if self.form == "vector" else "all"
        if values["eval_multiplier"] is None:
            values["eval_multiplier"] = round(sum(values["factors"]) / len(values["factors"]), 6)
        if num_layers is not None:
            if values["layer"] is None:
                values["layer"] = num_layers // 2
            check_layer_index(values["layer"], num_layers)
        return TrainConfig(**values)

    @property
    def pair_types(self) -> tuple[str, ...]:
        return {"add": ("add",), "add+sub": ("add", "sub"), "random": ("random",)}[self.pairs]
