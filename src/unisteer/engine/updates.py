"""The update family: Δh = m·(ΔW·a + Δb) in three forms (SPEC §1).

| form          | parameters                 | Δh (at m = 1)       |
|---------------|----------------------------|---------------------|
| vector        | Δb = v ∈ R^d               | v                   |
| lora          | ΔW = B·A (rank r)          | B·A·a               |
| local_weight  | ΔW ∈ R^{d×d_ff}, Δb ∈ R^d  | ΔW·a + Δb           |

`a` is the input of the layer's MLP down-projection. Parameters are kept in float32 (master weights) and
cast to the activations' dtype when applied, so a bf16 model trains fp32 updates.
"""

from __future__ import annotations

import abc
import collections
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, UpdateMismatchError
from .architecture import check_layer_index, model_structure
from .devices import module_device

INSERTIONS = ("block_output", "down_proj")


@dataclass(frozen=True, kw_only=True)
class PresetRow:
    """One reference row of SPEC §5 for a form and data family; every field is the `TrainConfig` field of
    that name (pairs, batch, accumulation, epochs, lr, λ_p, λ_n, γ, θ)."""

    pairs: str
    batch_size: int
    grad_accum: int
    epochs: int
    lr: float
    lambda_p: float
    lambda_n: float
    gamma: float
    theta: float

    def train_fields(self) -> dict[str, Any]:
        """The row as `TrainConfig` fields."""
        return asdict(self)


log = logging.getLogger(__name__)
FORM_CLASSES: dict[str, type[Update]] = {}  # filled by each form's class definition (`Update.__init_subclass__`)


@dataclass(frozen=True)
class Positions:
    """Which token positions receive Δh, by absolute index of real (non-padding) tokens.

    kind:
      - "all": every position;
      - "prompt": positions before the prompt's end;
      - "generated": positions at or after the prompt's end (tokens produced by generation, or a completion);
      - "from": positions >= `start` (e.g. after the chat template's common prefix).
    The prompt's end is taken per row from the first forward call with an empty KV cache (its number of
    real tokens), unless set explicitly with `Steering.set_prompt_lengths`.
    """

    kind: str = "all"
    start: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("all", "prompt", "generated", "from"):
            raise ConfigError(f"positions.kind: {self.kind!r} is not one of all, prompt, generated, from")
        if not isinstance(self.start, int) or self.start < 0:
            raise ConfigError(f"positions.start: expected a non-negative integer, got {self.start!r}")

    @classmethod
    def parse(cls, text: str) -> Positions:
        """'all' | 'prompt' | 'generated' | 'from:K'."""
        if text.startswith("from:"):
            try:
                return cls("from", int(text.split(":", 1)[1]))
            except ValueError as exc:
                raise ConfigError(f"positions: expected 'from:K' with an integer K, got {text!r}") from exc
        return cls(text)

    def __str__(self) -> str:
        return f"from:{self.start}" if self.kind == "from" else self.kind


@dataclass
class UpdateSpec:
    """Everything that defines an update besides its tensors; saved as JSON metadata."""

    form: str
    layer: int
    hidden_size: int
    input_size: int
    insertion: str = "block_output"
    component: str = "mlp.down_proj"
    rank: int | None = None
    dropout: float = 0.1
    positions: str = "all"
    model_id: str = ""
    config_hash: str = ""
    polarity: str = "positive m steers toward the concept"
    name: str = ""
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Specs are read back from hand-editable JSON: every field is checked for its type, not just its value.
        for name in ("form", "insertion", "component", "positions", "model_id", "config_hash", "polarity", "name"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name}: expected a string, got {getattr(self, name)!r}")
        if self.form not in FORM_CLASSES:
            raise ConfigError(f"form: {self.form!r} is not one of {tuple(FORM_CLASSES)}")
        if self.insertion not in INSERTIONS:
            raise ConfigError(f"insertion: {self.insertion!r} is not one of {INSERTIONS}")
        _check_int("layer", self.layer, 0)
        _check_int("hidden_size", self.hidden_size, 1)
        _check_int("input_size", self.input_size, 1)
        if self.form == "lora":
            _check_int("rank", self.rank, 1)
            if self.rank > min(self.hidden_size, self.input_size):
                raise ConfigError(f"rank: {self.rank} exceeds min(hidden_size, input_size) = "
                                  f"{min(self.hidden_size, self.input_size)}; a larger rank adds nothing")
        elif self.rank is not None:
            _check_int("rank", self.rank, 1)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or \
                not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: expected a value in [0, 1), got {self.dropout!r}")
        if not isinstance(self.training, dict):
            raise ConfigError(f"training: expected a mapping, got {type(self.training).__name__}")
        Positions.parse(self.positions)

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """The parameter shapes of this spec's form, known without allocating them."""
        if self.form == "vector":
            return {"vector": (self.hidden_size,)}
        if self.form == "lora":
            return {"lora_A": (self.rank, self.input_size), "lora_B": (self.hidden_size, self.rank)}
        return {"weight": (self.hidden_size, self.input_size), "bias": (self.hidden_size,)}


# A saved spec is untrusted input: sizes beyond this are refused before anything is allocated.
MAX_DIMENSION = 1 << 20


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_DIMENSION:
        raise ConfigError(f"{name}: expected an integer in [{minimum}, {MAX_DIMENSION}], got {value!r}")


class Update(nn.Module, abc.ABC):
    """Base of the family. Subclasses define `delta(a)`; `apply` adds m·mask·Δh to h.

    Everything the rest of unisteer needs to know about a form lives on its class (`FORM_CLASSES` registers
    it by `form`): the multipliers a sweep covers by default, the training factor set and learning rate, the
    reference presets (SPEC §5), and the weight/bias deltas that merging folds into the down-projection.
    A new form is one subclass here.
    """

    form: str = ""
    needs_input: bool = True
    default_grid: tuple[float, ...] = ()
    train_factors: tuple[float, ...] = ()
    learning_rate: float = 0.0
    presets: dict[str, PresetRow] = {}  # reference row name (psychopathy, ...) -> its SPEC §5 values

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.form:
            FORM_CLASSES[cls.form] = cls

    def __init__(self, spec: UpdateSpec):
        super().__init__()
        self.spec = spec

    @property
    def layer(self) -> int:
        return self.spec.layer

    @property
    def insertion(self) -> str:
        return self.spec.insertion

    @abc.abstractmethod
    def delta(self, a: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """Δh at m = 1, broadcastable to `like` ([batch, seq, d]) and in its dtype."""

    def apply(self, h: torch.Tensor, a: torch.Tensor | None, m: torch.Tensor, mask: torch.Tensor | None):
        """Return h + m·mask·Δh. `m` broadcasts as [batch, 1, 1]; `mask` is [batch, seq, 1] or None."""
        # Everything follows the hooked tensor: with a device_map, layers sit on different devices.
        scale = m.to(h.device, h.dtype)
        if mask is not None:
            scale = scale * mask.to(h.device, h.dtype)
        return h + scale * self.delta(a, h)

    def extra_repr(self) -> str:
        s = self.spec
        return f"form={s.form}, layer={s.layer}, insertion={s.insertion}, positions={s.positions}"

    def weight_delta(self) -> torch.Tensor | None:
        """ΔW (out × in, fp32) that merging adds to the down-projection's weight; None for no weight change."""
        return None

    def bias_delta(self) -> torch.Tensor | None:
        """Δb that merging adds to the down-projection's bias; None for no bias change."""
        return None


class VectorUpdate(Update):
    """Activation steering: Δh = m·v (ignores `a`)."""

    form = "vector"
    needs_input = False
    # 21 multipliers, both signs and 0, spanning the training factors {2, …, 20} with margin; bf16-exact.
    default_grid = tuple(float(2 * k) for k in range(-10, 11))
    train_factors = tuple(float(2 * i) for i in range(1, 11))
    learning_rate = 0.08
    presets = {
        "psychopathy": PresetRow(pairs="add+sub", batch_size=4, grad_accum=1, epochs=2, lr=0.08,
                                 lambda_p=1.0, lambda_n=0.5, gamma=4.0, theta=0.3),
        "power-seeking": PresetRow(pairs="add", batch_size=4, grad_accum=1, epochs=2, lr=0.08,
                                   lambda_p=1.0, lambda_n=0.5, gamma=5.0, theta=0.5),
        "axbench": PresetRow(pairs="add", batch_size=2, grad_accum=1, epochs=18, lr=0.08,
                             lambda_p=1.0, lambda_n=0.6, gamma=4.0, theta=0.5),
    }

    def __init__(self, spec: UpdateSpec):
        super().__init__(spec)
        bound = 1.0 / math.sqrt(spec.hidden_size)
        self.vector = nn.Parameter(torch.empty(spec.hidden_size, dtype=torch.float32).uniform_(-bound, bound))

    def delta(self, a, like):
        v = F.dropout(self.vector, self.spec.dropout, self.training)
        return v.to(like.device, like.dtype)

    def bias_delta(self) -> torch.Tensor:
        return self.vector.detach()


class LoRAUpdate(Update):
    """Low-rank weight update: Δh = m·B·A·a, A Kaiming-uniform(a=√5), B = 0."""

    form = "lora"
    # −2.5…2.5 in steps of 0.25, spanning the training factors {0.2, …, 2.0}; bf16-exact.
    default_grid = tuple(0.25 * k for k in range(-10, 11))
    train_factors = tuple(round(0.2 * i, 1) for i in range(1, 11))
    learning_rate = 0.01
    presets = {
        "psychopathy": PresetRow(pairs="add+sub", batch_size=4, grad_accum=2, epochs=1, lr=0.01,
                                 lambda_p=1.0, lambda_n=0.5, gamma=5.0, theta=0.4),
        "power-seeking": PresetRow(pairs="add", batch_size=2, grad_accum=2, epochs=2, lr=0.01,
                                   lambda_p=1.0, lambda_n=0.5, gamma=4.0, theta=0.4),
        "axbench": PresetRow(pairs="add", batch_size=2, grad_accum=2, epochs=12, lr=0.04,
                             lambda_p=1.0, lambda_n=0.5, gamma=5.0, theta=0.45),
    }

    def __init__(self, spec: UpdateSpec):
        super().__init__(spec)
        self.lora_A = nn.Parameter(torch.empty(spec.rank, spec.input_size, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(spec.hidden_size, spec.rank, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta(self, a, like):
        out = (a @ self.lora_A.to(a.device, a.dtype).t()) @ self.lora_B.to(a.device, a.dtype).t()
        return F.dropout(out, self.spec.dropout, self.training).to(like.dtype)

    def weight_delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A).detach()


class LocalWeightUpdate(Update):
    """One-layer fine-tuning of the down-projection: Δh = m·(ΔW·a + Δb), both zero-initialised."""

    form = "local_weight"
    default_grid = LoRAUpdate.default_grid
    train_factors = LoRAUpdate.train_factors
    learning_rate = 0.01
    presets = {
        "psychopathy": PresetRow(pairs="add", batch_size=4, grad_accum=2, epochs=1, lr=0.01,
                                 lambda_p=1.0, lambda_n=0.5, gamma=5.0, theta=0.4),
        "power-seeking": PresetRow(pairs="add", batch_size=2, grad_accum=2, epochs=2, lr=0.01,
                                   lambda_p=1.0, lambda_n=0.5, gamma=4.0, theta=0.4),
        "axbench": PresetRow(pairs="add", batch_size=2, grad_accum=2, epochs=12, lr=0.04,
                             lambda_p=1.0, lambda_n=0.3, gamma=3.5, theta=0.6),
    }

    def __init__(self, spec: UpdateSpec):
        super().__init__(spec)
        self.weight = nn.Parameter(torch.zeros(spec.hidden_size, spec.input_size, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(spec.hidden_size, dtype=torch.float32))

    def delta(self, a, like):
        out = F.linear(a, self.weight.to(a.device, a.dtype), self.bias.to(a.device, a.dtype))
        return F.dropout(out, self.spec.dropout, self.training).to(like.dtype)

    def weight_delta(self) -> torch.Tensor:
        return self.weight.detach()

    def bias_delta(self) -> torch.Tensor:
        return self.bias.detach()


FORMS: tuple[str, ...] = tuple(FORM_CLASSES)


def form_class(form: str) -> type[Update]:
    if form not in FORM_CLASSES:
        raise ConfigError(f"form: {form!r} is not one of {tuple(FORM_CLASSES)}")
    return FORM_CLASSES[form]


def default_grid(form: str) -> list[float]:
    """The multipliers swept and evaluated for a form by default (see each form's `default_grid`)."""
    return list(form_class(form).default_grid)


@contextmanager
def eval_mode(*modules: nn.Module | None) -> Iterator[None]:
    """Dropout off for every given module (a model, updates) while evaluating; their modes restored after."""
    modes = [(module, module.training) for module in modules if module is not None]
    for module, _ in modes:
        module.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.train(training)


def check_multipliers(values: Any, where: str = "multipliers", *, with_update: bool = True,
                      sort: bool = False) -> list[float]:
    """Multipliers as floats: a non-empty list of finite, distinct numbers (only m = 0 without an update)."""
    if isinstance(values, int | float) and not isinstance(values, bool):
        values = [values]
    if isinstance(values, str | bytes) or not isinstance(values, list | tuple) or not values:
        raise ConfigError(f"{where}: expected a non-empty list of multipliers, got {values!r}")
    out = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(f"{where}: multipliers must be finite numbers, got {value!r}")
        out.append(float(value))
    counts = collections.Counter(out)  # list.count per value was quadratic: minutes for 100 000 values
    duplicated = sorted(v for v, count in counts.items() if count > 1)
    if duplicated:
        raise ConfigError(f"{where}: duplicated multiplier(s) {duplicated}")
    if not with_update and any(v != 0 for v in out):
        raise ConfigError(f"{where} {out}: without an update only m = 0 (the plain model) is meaningful")
    return sorted(out) if sort else out


def check_compatible(spec: UpdateSpec, model: nn.Module, *, source: str = "update",
                     strict_model_id: bool = False) -> None:
    from .models import config_hash, model_id

    structure = model_structure(model)
    problems = []
    if spec.layer >= structure.num_layers:
        problems.append(f"layer {spec.layer} (model has {structure.num_layers} layers)")
    if spec.hidden_size != structure.hidden_size:
        problems.append(f"hidden_size {spec.hidden_size} (model: {structure.hidden_size})")
    if spec.input_size != structure.intermediate_size:
        problems.append(f"input_size {spec.input_size} (model: {structure.intermediate_size})")
    if spec.config_hash and spec.config_hash != config_hash(model):
        problems.append(f"config_hash {spec.config_hash} (model: {config_hash(model)}): trained for "
                        f"{spec.model_id!r}, not this architecture")
    if spec.layer < structure.num_layers and spec.component != structure.down_proj_names[spec.layer]:
        problems.append(f"component {spec.component!r} (model: {structure.down_proj_names[spec.layer]!r})")
    if problems:
        raise UpdateMismatchError(f"{source} does not fit this model: " + "; ".join(problems))
    if spec.model_id and spec.model_id != model_id(model):
        message = f"{source} was trained on {spec.model_id!r}, attaching to {model_id(model)!r}"
        if strict_model_id:
            raise UpdateMismatchError(message)
        log.warning(message)


def create_update(
    model: nn.Module,
    form: str,
    layer: int,
    *,
    insertion: str = "block_output",
    rank: int = 4,
    dropout: float = 0.1,
    positions: str | Positions = "all",
    name: str = "",
    seed: int | None = None,
) -> Update:
    """A freshly initialised update for `model` at decoder layer `layer` (reference initialisations)."""
    from .models import config_hash, model_id

    structure = model_structure(model)
    check_layer_index(layer, structure.num_layers)
    spec = UpdateSpec(
        form=form,
        layer=layer,
        hidden_size=structure.hidden_size,
        input_size=structure.intermediate_size,
        insertion=insertion,
        component=structure.down_proj_names[layer],
        rank=rank if form == "lora" else None,
        dropout=dropout,
        positions=str(positions),
        model_id=model_id(model),
        config_hash=config_hash(model),
        name=name,
    )
    # Inference mode by default: dropout belongs to training, which switches it on with `.train()`.
    # The update lives beside the layer it steers (with a device_map, not necessarily the first device).
    return update_from_spec(spec, seed=seed).to(module_device(structure.layer(layer))).eval()


def update_from_spec(spec: UpdateSpec, seed: int | None = None) -> Update:
    if seed is None:
        return FORM_CLASSES[spec.form](spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FORM_CLASSES[spec.form](spec)


