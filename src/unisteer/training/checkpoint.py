"""Training checkpoints that cannot execute code: tensors in safetensors, everything else in JSON.

A checkpoint is a folder `checkpoint/` with `tensors.safetensors` (the update's parameters, the optimizer's
moment tensors, the torch RNG states) and `state.json` (step, epoch, optimizer hyper-parameters, scheduler,
the Python RNG of the factor draws, the config and data hash it belongs to). It is written to a temporary
folder and swapped in whole, so a kill at any moment leaves the previous checkpoint or the new one.
Older `checkpoint.pt` files were pickles, which run code when loaded; they are refused, never read.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..engine.storage import write_safetensors
from ..errors import UnisteerError
from ..files import read_json, write_json, writing_folder

TENSORS = "tensors.safetensors"
STATE = "state.json"
LEGACY_PICKLE = "checkpoint.pt"


def save_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    with writing_folder(folder, replace=True) as tmp:
        write_safetensors(tmp / TENSORS, {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                          {"format": "unisteer-checkpoint"})
        write_json(tmp / STATE, state, indent=1)


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    legacy = folder.parent / LEGACY_PICKLE
    if legacy.exists() and not folder.exists():
        raise UnisteerError(f"{legacy}: a pickle checkpoint from an older unisteer; pickles can execute code when "
                            "loaded, so it is not read. Start the run over (--overwrite)")
    try:
        tensors = load_file(str(folder / TENSORS))
    except (OSError, SafetensorError) as exc:
        raise UnisteerError(f"{folder}: cannot read the checkpoint ({exc})") from exc
    state = read_json(folder / STATE, what="checkpoint state")
    if not isinstance(state, dict):
        raise UnisteerError(f"{folder / STATE}: expected a JSON object")
    return tensors, state


def optimizer_to_parts(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's state as named tensors plus JSON (param groups, and non-tensor per-parameter values)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_parts(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                         record: dict[str, Any]) -> None:
    per_param: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            per_param.setdefault(int(index), {})[key] = tensor
    for name, value in record.get("scalars", {}).items():
        index, key = name.split(".", 1)
        per_param.setdefault(int(index), {})[key] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in group.items()} for group in record["param_groups"]]
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})


def training_state(update: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, factor_rng: random.Random,
                   device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Everything a resumed run needs to continue identically: parameters, optimizer moments, schedule and
    every random generator, as named tensors plus a JSON record."""
    tensors = {f"update.{k}": v for k, v in update.state_dict().items()}
    optimizer_tensors, optimizer_record = optimizer_to_parts(optimizer)
    tensors.update(optimizer_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    version, internal, gauss = factor_rng.getstate()
    return tensors, {"optimizer": optimizer_record, "scheduler": scheduler.state_dict(),
                     "factor_rng": [version, list(internal), gauss]}


def restore_training_state(tensors: dict[str, torch.Tensor], state: dict[str, Any], update: torch.nn.Module,
                           optimizer: torch.optim.Optimizer, scheduler: Any, factor_rng: random.Random,
                           device: torch.device) -> None:
    update.load_state_dict({k.removeprefix("update."): v for k, v in tensors.items() if k.startswith("update.")})
    optimizer_from_parts(optimizer, tensors, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    version, internal, gauss = state["factor_rng"]
    factor_rng.setstate((version, tuple(internal), gauss))
