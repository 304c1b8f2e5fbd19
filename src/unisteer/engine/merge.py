"""Folding an update at a fixed multiplier into the model's weights.

W ← W + m·ΔW and b ← b + m·Δb on the layer's down-projection. This equals the hooked update for
`down_proj` insertion, and for `block_output` insertion on blocks where nothing sits between the MLP's
output and the residual sum (Llama, Qwen, Mistral, Phi-3, GPT-2, GPT-NeoX, pre-norm OPT). Gemma-2/3 normalise
the MLP output after the down-projection, so a `block_output` update there cannot be merged; that is
checked numerically, not by model name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UnisteerError
from .architecture import model_structure
from .devices import input_device, is_offloaded
from .updates import Positions, Update, VectorUpdate


@dataclass
class MergedUpdate:
    """Handle of a merge; `restore()` puts the original down-projection parameters back."""

    module: nn.Module
    original_weight: torch.Tensor
    original_bias: torch.Tensor | None
    had_bias: bool

    def restore(self) -> None:
        with torch.no_grad():
            self.module.weight.copy_(self.original_weight)
            if self.had_bias:
                self.module.bias.copy_(self.original_bias)
            else:
                self.module.bias = None


def merge(model: nn.Module, update: Update, multiplier: float) -> MergedUpdate:
    """Merge `update` at `multiplier` into the weights of `model`, in place."""
    if Positions.parse(update.spec.positions).kind != "all":
        raise UnisteerError(
            f"cannot merge an update restricted to positions={update.spec.positions}: merged weights act on "
            "every position"
        )
    if update.insertion == "block_output" and not block_output_equals_down_proj(model, update.layer):
        raise UnisteerError(
            f"cannot merge a block_output update at layer {update.layer}: this architecture transforms the "
            "MLP output before the residual sum (e.g. Gemma's post-feed-forward norm); use insertion='down_proj'"
        )
    module = model_structure(model).down_proj(update.layer)
    if is_offloaded(module):
        raise UnisteerError(
            f"cannot merge into layer {update.layer}: its weights are offloaded by the device_map (they live on "
            "'meta' between calls); steer with hooks (Steering) instead, or load that layer onto a device"
        )
    handle = MergedUpdate(
        module=module,
        original_weight=module.weight.detach().clone(),
        original_bias=None if module.bias is None else module.bias.detach().clone(),
        had_bias=module.bias is not None,
    )
    weight_delta, bias_delta = update.weight_delta(), update.bias_delta()
    with torch.no_grad():
        if weight_delta is not None:
            w = weight_delta.to(module.weight.device, torch.float32) * multiplier
            # GPT-2's Conv1D stores (in, out); nn.Linear stores (out, in).
            w = w if isinstance(module, nn.Linear) else w.t()
            module.weight.copy_((module.weight.to(torch.float32) + w).to(module.weight.dtype))
        if bias_delta is not None:
            b = bias_delta.to(module.weight.device, torch.float32) * multiplier
            if module.bias is None:
                module.bias = nn.Parameter(b.to(module.weight.dtype), requires_grad=False)
            else:
                module.bias.copy_((module.bias.to(torch.float32) + b).to(module.bias.dtype))
    return handle


_EQUIVALENCE_ATTR = "_unisteer_block_equals_down_proj"


@torch.no_grad()
def block_output_equals_down_proj(model: nn.Module, layer: int) -> bool:
    """Whether adding Δh to layer `layer`'s output equals adding it to its down-projection's output.

    Probed once per model: a random vector as large as the layer's output is added at both points and the
    layer's outputs are compared. Where nothing sits between the MLP and the residual sum they differ only
    by rounding (~1e-2 of the effect in bf16); a norm after the MLP (Gemma) changes the vector entirely.
    """
    cache = getattr(model, _EQUIVALENCE_ATTR, None)
    if cache is None:
        cache = {}
        object.__setattr__(model, _EQUIVALENCE_ATTR, cache)
    if layer in cache:
        return cache[layer]
    from .prefix import run_until
    from .steering import Steering
    from .updates import UpdateSpec

    structure = model_structure(model)
    device = input_device(model)
    input_ids = torch.arange(1, 7, device=device).unsqueeze(0) % model.config.get_text_config().vocab_size
    block = structure.layer(layer)
    plain = run_until(model, block, input_ids).float()
    generator = torch.Generator().manual_seed(0)
    vector = torch.randn(structure.hidden_size, generator=generator)
    vector *= plain.pow(2).mean().sqrt().cpu() / vector.pow(2).mean().sqrt()
    outputs = []
    for insertion in ("block_output", "down_proj"):
        spec = UpdateSpec(form="vector", layer=layer, hidden_size=structure.hidden_size,
                          input_size=structure.intermediate_size, insertion=insertion, dropout=0.0,
                          component=structure.down_proj_names[layer])
        probe = VectorUpdate(spec).to(device)
        probe.vector.copy_(vector)
        with Steering(model, probe, multiplier=1.0):
            outputs.append(run_until(model, block, input_ids).float())
    effect = (outputs[0] - plain).abs().max()
    difference = (outputs[0] - outputs[1]).abs().max()
    cache[layer] = bool(difference <= 0.05 * max(float(effect), 1e-6))
    return cache[layer]
