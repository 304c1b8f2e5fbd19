"""The frozen-prefix cache: hidden states entering layer L are the same for every multiplier and epoch.

The base model is frozen and every update sits at layer L or above, so everything below L depends only on
the tokens. `capture_layer_input` runs the model up to layer L once (stopping there); `run_from_layer`
re-runs only layers ≥ L from those hidden states. It does so through the model's own forward — the layers
below L are swapped for pass-throughs and layer L's input is replaced — so masks, rotary embeddings and
sliding windows are built exactly as in a full forward, for any architecture.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .architecture import check_layer_index, model_structure
from .scoring import final_hidden


class _StopForward(Exception):
    """Raised by the capture hook to end a forward pass once layer L's input is known."""


class _PassThrough(nn.Module):
    """Stands in for a decoder layer below L: returns its input hidden states unchanged."""

    def __init__(self, original: nn.Module):
        super().__init__()
        # Stack loops read plain attributes of their layers (Gemma's attention_type, layer_idx, ...).
        for key, value in vars(original).items():
            if not key.startswith("_") and isinstance(value, (bool, int, float, str, type(None))):
                setattr(self, key, value)

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@contextmanager
def recording(module: nn.Module, capture: str = "output", *, stop: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """While active, `record["value"]` holds `module`'s latest first input or first output; with `stop`, the
    forward pass ends there (by an exception `run_until` catches)."""
    if capture not in ("input", "output"):
        raise ValueError(f"capture: expected 'input' or 'output', got {capture!r}")
    record: dict[str, torch.Tensor] = {}

    def on_input(mod, args, kwargs):
        record["value"] = args[0] if args else kwargs["hidden_states"]
        if stop:
            raise _StopForward

    def on_output(mod, args, output):
        record["value"] = output[0] if isinstance(output, tuple) else output
        if stop:
            raise _StopForward

    handle = (module.register_forward_pre_hook(on_input, with_kwargs=True) if capture == "input"
              else module.register_forward_hook(on_output))
    try:
        yield record
    finally:
        handle.remove()


@torch.no_grad()
def run_until(model: nn.Module, module: nn.Module, input_ids: torch.Tensor,
              attention_mask: torch.Tensor | None = None, *, capture: str = "output") -> torch.Tensor:
    """Run `model` only until `module` is reached and return that module's first input or first output.

    Nothing after `module` runs: the forward pass is stopped by an exception from the hook.
    """
    with recording(module, capture, stop=True) as record:
        try:
            final_hidden(model, input_ids, attention_mask)
        except _StopForward:
            pass
    if "value" not in record:
        raise RuntimeError(f"the forward pass never reached {type(module).__name__}")
    return record["value"]


def capture_layer_input(model: nn.Module, layer: int, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Hidden states entering decoder layer `layer` ([batch, seq, d]), computed without running layers ≥ L."""
    structure = model_structure(model)
    check_layer_index(layer, structure.num_layers)
    return run_until(model, structure.layers[layer], input_ids, attention_mask, capture="input")


@contextmanager
def layers_from(model: nn.Module, layer: int, hidden_in: torch.Tensor) -> Iterator[None]:
    """While active, a forward pass skips layers < `layer` and feeds `hidden_in` into layer `layer`."""
    structure = model_structure(model)
    check_layer_index(layer, structure.num_layers)
    originals = [structure.layers[i] for i in range(layer)]

    def replace_input(module, args, kwargs):
        if args:
            return (hidden_in, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden_in}

    handle = structure.layers[layer].register_forward_pre_hook(replace_input, with_kwargs=True)
    for i, original in enumerate(originals):
        structure.layers[i] = _PassThrough(original)
    try:
        yield
    finally:
        handle.remove()
        for i, original in enumerate(originals):
            structure.layers[i] = original


def run_from_layer(model: nn.Module, layer: int, hidden_in: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Final-norm hidden states of a forward that starts at layer `layer` from `hidden_in`.

    `input_ids` and `attention_mask` must be those `hidden_in` was captured with: they still define the
    attention masks and positions. Attached `Steering` hooks apply as in a full forward.
    """
    with layers_from(model, layer, hidden_in):
        return final_hidden(model, input_ids, attention_mask)
