"""Finding decoder layers and MLP down-projections by structure, not by model name.

A decoder stack is the `nn.ModuleList` whose length equals the configured number of layers. In each layer
the MLP down-projection is the unique linear map (nn.Linear or GPT-2's Conv1D) from the intermediate width
to the hidden width. This covers Llama, Mistral, Qwen2/3, Gemma2/3, Phi-3, GPT-2, GPT-NeoX, OPT and most
dense decoder-only models; mixtures of experts (several candidates) are refused with what was found.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import ModelError

_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model")
_INTERMEDIATE_KEYS = ("intermediate_size", "n_inner", "ffn_dim")


@dataclass(frozen=True)
class LinearShape:
    in_features: int
    out_features: int


@dataclass
class ModelStructure:
    """Where the parts unisteer touches live in a model."""

    layers: nn.ModuleList
    layers_path: str
    down_proj_names: list[str]  # per layer, relative to the layer
    hidden_size: int
    intermediate_size: int

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer(self, index: int) -> nn.Module:
        check_layer_index(index, self.num_layers)
        return self.layers[index]

    def down_proj(self, index: int) -> nn.Module:
        layer = self.layer(index)
        return layer.get_submodule(self.down_proj_names[index])


def check_layer_index(index: int, num_layers: int) -> None:
    if not isinstance(index, int) or not 0 <= index < num_layers:
        raise ModelError(f"layer {index!r} is out of range: the model has layers 0..{num_layers - 1}")


def text_config(config):
    """The decoder's config (multimodal configs nest it as `text_config`)."""
    return getattr(config, "text_config", None) or config


def _config_int(config, keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def linear_shape(module: nn.Module) -> LinearShape | None:
    """(in, out) of a linear map; GPT-2's Conv1D stores its weight transposed."""
    if isinstance(module, nn.Linear):
        return LinearShape(module.in_features, module.out_features)
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return LinearShape(module.weight.shape[0], module.nf)
    return None


_STRUCTURE_CACHE_ATTR = "_unisteer_structure"


def model_structure(model: nn.Module) -> ModelStructure:
    """Locate the decoder layers and their down-projections (cached on the model)."""
    cached = getattr(model, _STRUCTURE_CACHE_ATTR, None)
    if cached is not None:
        return cached
    structure = _find_structure(model)
    object.__setattr__(model, _STRUCTURE_CACHE_ATTR, structure)
    return structure


def _find_structure(model: nn.Module) -> ModelStructure:
    config = text_config(model.config)
    num_layers = _config_int(config, _LAYER_COUNT_KEYS)
    hidden = _config_int(config, _HIDDEN_KEYS)
    if num_layers is None or hidden is None:
        raise ModelError(
            f"cannot read the layer count / hidden size from config of type {type(config).__name__} "
            f"(looked for {_LAYER_COUNT_KEYS} and {_HIDDEN_KEYS})"
        )
    lists = [(name, mod) for name, mod in model.named_modules()
             if isinstance(mod, nn.ModuleList) and len(mod) == num_layers]
    if not lists:
        found = [(n, len(m)) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
        raise ModelError(f"no module list of {num_layers} decoder layers found; module lists present: {found}")
    layers_path, layers = lists[0]
    intermediate = _config_int(config, _INTERMEDIATE_KEYS)
    names = [_find_down_proj(layer, hidden, intermediate, i) for i, layer in enumerate(layers)]
    shape = linear_shape(layers[0].get_submodule(names[0]))
    return ModelStructure(layers=layers, layers_path=layers_path, down_proj_names=names, hidden_size=hidden,
                          intermediate_size=shape.in_features)


def _find_down_proj(layer: nn.Module, hidden: int, intermediate: int | None, index: int) -> str:
    linears = [(name, linear_shape(mod)) for name, mod in layer.named_modules() if linear_shape(mod) is not None]
    # The MLP's output map: hidden width out, a wider input in (attention output maps are hidden -> hidden).
    candidates = [(n, s) for n, s in linears if s.out_features == hidden and s.in_features != hidden]
    if intermediate is not None:
        exact = [(n, s) for n, s in candidates if s.in_features == intermediate]
        candidates = exact or candidates
    if len(candidates) != 1:
        listing = ", ".join(f"{n} ({s.in_features}->{s.out_features})" for n, s in linears) or "none"
        raise ModelError(
            f"layer {index}: expected exactly one MLP down-projection (intermediate -> hidden={hidden}), "
            f"found {len(candidates)}; linear maps in this layer: {listing}. "
            "Mixture-of-experts and unusual blocks are not supported."
        )
    return candidates[0][0]


def final_logit_softcap(model: nn.Module) -> float | None:
    """Gemma-2 style tanh soft-capping of the final logits, if the model uses it."""
    value = getattr(text_config(model.config), "final_logit_softcapping", None)
    return float(value) if value else None
