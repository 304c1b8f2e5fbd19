"""Where a model computes, including models spread over devices with a `device_map`.

A model loaded with `device_map=` (accelerate's dispatch) has layers on different devices, and offloaded
layers ("cpu" under a GPU, or "disk") hold their weights on the `meta` device between calls, loaded by the
layer's accelerate hook only while it runs. So "the first parameter's device" says nothing about where
inputs go or where a layer computes. Everything in unisteer that places a tensor asks here instead:

- `input_device(model)`: where token ids and masks go (the input embedding's execution device);
- `module_device(module)`: where a layer computes, so an update lives beside the layer it steers;
- `is_offloaded(module)`: weights not resident (merge refuses there rather than write into `meta`).

The steering hooks themselves never assume a device: Δ, per-row multipliers and position masks are moved to
the hooked tensor's device and dtype on every call (a no-op on one device).
"""

from __future__ import annotations

import torch
from torch import nn


def _hook_execution_device(module: nn.Module) -> torch.device | None:
    # accelerate's AlignDevicesHook (possibly inside a SequentialHook) records where its module runs.
    hook = getattr(module, "_hf_hook", None)
    for candidate in (hook, *getattr(hook, "hooks", ())):
        device = getattr(candidate, "execution_device", None)
        if device is not None:
            return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    return None


def module_device(module: nn.Module) -> torch.device:
    """The device `module` computes on: its dispatch hook's execution device, else its resident weights'."""
    for sub in module.modules():
        device = _hook_execution_device(sub)
        if device is not None:
            return device
    for parameter in module.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where a forward call's input ids, masks and positions belong."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return module_device(embeddings if embeddings is not None else model)


def is_offloaded(module: nn.Module) -> bool:
    """True when some of `module`'s weights are not in memory (accelerate keeps them on `meta` between calls)."""
    return any(parameter.device.type == "meta" for parameter in module.parameters())
