"""The portable saved format of an update, and export of LoRA updates as PEFT adapters.

A saved update is either
- a folder holding `update.safetensors` (the tensors) and `update.json` (the metadata), or
- a single `.safetensors` file whose header metadata holds the same JSON under the key `unisteer`.

Metadata: format version, the full `UpdateSpec` (form, layer, insertion, component, positions, model id and
config hash, hidden sizes, polarity, training summary). Loading checks the metadata against the model the
update is attached to and refuses mismatches with a message that says which field differs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from ..config import from_dict
from ..errors import ConfigError, UnisteerError
from ..files import check_regular_file, read_json, write_bytes, write_json, write_text, writing_folder
from .architecture import model_structure
from .devices import module_device
from .updates import LoRAUpdate, Update, UpdateSpec, check_compatible, update_from_spec

FORMAT_VERSION = 1
TENSORS_FILE = "update.safetensors"
METADATA_FILE = "update.json"
_log = logging.getLogger(__name__)


def save_update(update: Update, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write `update` to a folder (default) or to a single file when `path` ends in `.safetensors`.

    An existing target is never replaced unless `overwrite=True`; writes go to a temporary name first.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise UnisteerError(f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    metadata = {"format": "unisteer-update", "format_version": FORMAT_VERSION,
                "spec": dataclasses.asdict(update.spec)}
    tensors = {name: p.detach().to(torch.float32).contiguous().cpu() for name, p in update.named_parameters()}
    try:
        if path.suffix == ".safetensors":
            write_safetensors(path, tensors, {"unisteer": json.dumps(metadata)})
            return path
        if path.is_file():  # replaced by a folder (overwrite=True)
            path.unlink()
        # replace=overwrite: a folder another process saved since the check above is refused, not replaced
        with writing_folder(path, replace=overwrite) as tmp:
            write_safetensors(tmp / TENSORS_FILE, tensors, {"format": "pt"})
            write_text(tmp / METADATA_FILE, json.dumps(metadata, indent=2, default=str))
    except OSError as exc:  # a full disk or a missing permission: nothing half-written is left
        raise UnisteerError(f"{path}: cannot save the update ({exc.strerror or exc})") from exc
    return path


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Tensors as a safetensors file, written through `unisteer.files`: safetensors' own writer makes the
    file 0600 whatever the umask, and leaves a SafetensorError and a half file when the disk is full."""
    write_bytes(path, save(tensors, metadata=metadata))


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a saved update, validated as far as it can be without the tensors."""
    path = Path(path)
    if not path.exists():
        raise UnisteerError(f"{path}: no such update file or folder")
    if not path.is_dir():
        check_regular_file(path, "update file")
    if path.is_dir():
        meta_path = path / METADATA_FILE
        if not meta_path.exists():
            raise UnisteerError(f"{path}: not an update folder (missing {METADATA_FILE})")
        metadata = read_json(meta_path, what="update metadata")
        where = str(meta_path)
    else:
        header = _safetensors_header(path)
        if "unisteer" not in header:
            raise UnisteerError(f"{path}: safetensors file without unisteer metadata")
        try:
            metadata = json.loads(header["unisteer"])
        except json.JSONDecodeError as exc:
            raise UnisteerError(f"{path}: the 'unisteer' header metadata is not valid JSON ({exc})") from exc
        where = f"{path} (header)"
    if not isinstance(metadata, dict):
        raise UnisteerError(f"{where}: expected a JSON object, got {type(metadata).__name__}")
    if metadata.get("format") != "unisteer-update":
        raise UnisteerError(f"{where}: not a unisteer update (format={metadata.get('format')!r})")
    version = metadata.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise UnisteerError(f"{where}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise UnisteerError(f"{where}: format version {version} is newer than this unisteer (reads up to "
                            f"{FORMAT_VERSION}); upgrade unisteer")
    if not isinstance(metadata.get("spec"), dict):
        raise UnisteerError(f"{where}: missing or malformed 'spec' (expected an object of UpdateSpec fields)")
    return metadata


def _safetensors_header(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return fh.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise UnisteerError(f"{path}: not a readable safetensors file ({exc})") from exc


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes stored in a safetensors file, read from its header only."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return {name: tuple(fh.get_slice(name).get_shape()) for name in fh.keys()}
    except (SafetensorError, OSError) as exc:
        raise UnisteerError(f"{path}: cannot read tensors ({exc})") from exc


def load_update(path: str | Path, model: nn.Module | None = None, *, strict_model_id: bool = False) -> Update:
    """Load an update; with `model`, check that it fits and move it to the model's device.

    Everything is checked before anything large is allocated: the spec's types and bounds, its fit to the
    model, and the tensor shapes in the file header; the values must be finite.
    """
    path = Path(path)
    metadata = read_metadata(path)
    try:
        spec = from_dict(UpdateSpec, metadata["spec"], where=f"{path}: spec")
    except ConfigError as exc:
        raise UnisteerError(str(exc)) from exc
    if model is not None:
        check_compatible(spec, model, source=str(path), strict_model_id=strict_model_id)
    tensor_path = path / TENSORS_FILE if path.is_dir() else path
    if not tensor_path.exists():
        raise UnisteerError(f"{tensor_path}: missing (the update's tensors)")
    check_regular_file(tensor_path, "tensor file")
    stored, expected = _tensor_shapes(tensor_path), spec.tensor_shapes()
    if set(stored) != set(expected):
        raise UnisteerError(f"{tensor_path}: tensors {sorted(stored)} do not match form {spec.form!r} "
                            f"(expected {sorted(expected)})")
    for name, shape in expected.items():
        if stored[name] != shape:
            raise UnisteerError(f"{tensor_path}: tensor {name!r} has shape {stored[name]}, expected {shape} "
                                "from the spec")
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError) as exc:
        raise UnisteerError(f"{tensor_path}: cannot read tensors ({exc})") from exc
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise UnisteerError(f"{tensor_path}: tensor {name!r} holds {bad} NaN or infinite value(s); refusing "
                                "an update that would turn every steered output into NaN")
    update = update_from_spec(spec, seed=0)
    with torch.no_grad():
        for name, param in update.named_parameters():
            param.copy_(tensors[name])
    if model is not None:
        update.to(module_device(model_structure(model).layer(spec.layer)))
    update.eval()
    return update


def export_peft_adapter(update: Update, model: nn.Module, folder: str | Path, *, multiplier: float = 1.0,
                        overwrite: bool = False) -> Path:
    """Write a LoRA update as a PEFT adapter folder, with the multiplier folded into `lora_alpha`.

    PEFT scales B·A by lora_alpha / r, so lora_alpha = m·r reproduces the update at multiplier m.
    """
    from .merge import block_output_equals_down_proj

    if not isinstance(update, LoRAUpdate):
        raise UnisteerError(f"only LoRA updates export as PEFT adapters (this one is {update.spec.form!r})")
    if update.insertion == "block_output" and not block_output_equals_down_proj(model, update.layer):
        raise UnisteerError("a block_output LoRA on this architecture is not a down_proj LoRA; PEFT cannot express it")
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise UnisteerError(f"{folder} already exists; pass overwrite=True to replace it")
    if update.spec.positions != "all":
        raise UnisteerError(f"positions={update.spec.positions}: a PEFT adapter acts on every position")
    structure = model_structure(model)
    module_path = f"{structure.layers_path}.{update.layer}.{update.spec.component}"
    rank = update.spec.rank
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": multiplier * rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": [module_path],
        "fan_in_fan_out": not isinstance(structure.down_proj(update.layer), nn.Linear),
        "base_model_name_or_path": update.spec.model_id,
        "inference_mode": True,
    }
    prefix = f"base_model.model.{module_path}"
    tensors = {f"{prefix}.lora_A.weight": update.lora_A.detach().float().contiguous().cpu(),
               f"{prefix}.lora_B.weight": update.lora_B.detach().float().contiguous().cpu()}
    with writing_folder(folder, replace=True) as tmp:
        write_safetensors(tmp / "adapter_model.safetensors", tensors, {"format": "pt"})
        write_json(tmp / "adapter_config.json", config)
    return folder
