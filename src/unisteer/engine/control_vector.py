"""Vector updates as llama.cpp / Ollama GGUF control vectors, and control vectors back as vector updates.

The conventions below were read in llama.cpp's source (ggml-org/llama.cpp), not guessed:

- File layout (writer: `tools/cvector-generator/cvector-generator.cpp`, `export_gguf`): a GGUF whose
  `general.architecture` is "controlvector", with the string `controlvector.model_hint` (the generator writes
  the model GGUF's own `general.architecture`, e.g. "llama", "qwen2") and the int32 `controlvector.layer_count`
  (the number of direction tensors written); one float32 1-D tensor of n_embd values per layer, named
  `direction.<il>` (`mean.hpp` / `pca.hpp`: `ggml_format_name(ctrl_out, "direction.%zu", il+1)`).
- Reader (`common/common.cpp`, `common_control_vector_load_one`): every tensor must be named
  `direction.<int>`, with index > 0 ("invalid (zero) direction tensor layer index"), type F32 and 1-D, all of
  one length; it neither checks `general.architecture` nor reads `model_hint`/`layer_count`. Each value is
  multiplied by the file's strength: `dst[j] += src[j] * load_info.strength`, where the strength is SCALE of
  `--control-vector-scaled FNAME SCALE` (newer builds: `FNAME:SCALE,...`; `--control-vector FNAME` uses 1.0,
  `common/arg.cpp`). Several files, or several directions for one layer, are summed.
- Where it is added (`src/llama-adapter.cpp`, `llama_adapter_cvec::apply_to` / `tensor_for`, called as
  `build_cvec(cur, il)` in each model graph, e.g. `src/models/llama.cpp`, `src/models/gemma2-iswa.cpp`):
  `cur = ggml_add(cur, direction[il])` right after the layer's residual sum `cur = ffn_out + ffn_inp`, before
  `cb(cur, "l_out", il)`, with `il` the 0-based decoder-layer index of the graph loop. So `direction.<il>` is
  added to the output hidden state of decoder layer `il` (Hugging Face `model.layers[il]`'s output), at every
  token position. Layer 0 is never steered: `llama_adapter_cvec::init` pushes no tensor for it ("there's
  never a tensor for layer 0") and `apply` copies data for `il` in 1..n_layer-1 only, so indices >= n_layer are
  silently dropped. The default `--control-vector-layer-range` is 1..n_layer (`common_init_from_params`).

Mapping: unisteer's layer L is llama.cpp's `il` = L, and the multiplier m is folded into the stored vector
(m·Δb), so `--control-vector-scaled FILE s` applies (s·m)·Δb. A `block_output` vector update is added to
layer L's output, which is exactly llama.cpp's rule on every architecture. A `down_proj` vector update is
added to the MLP output; that equals adding it to the layer output only where the MLP output goes straight
into the residual sum (Llama, Mistral, Qwen2/3, SmolLM2, Phi-3): Gemma 2/3 (`post_feedforward_layernorm`),
OLMo 2 and Granite transform it first, so such an export is refused. (The generator's own vectors are
computed from `l_out` of layer il-1 and written as `direction.<il>`; what a file *does* is what the reader
and `apply_to` define, and that is what an import reproduces.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import from_dict
from ..errors import ConfigError, UnisteerError, UpdateMismatchError
from ..files import partial_path
from .architecture import model_structure, text_config
from .updates import MAX_DIMENSION, Positions, Update, UpdateSpec, VectorUpdate, check_compatible

ARCHITECTURE = "controlvector"
KEY_ARCHITECTURE = "general.architecture"
KEY_MODEL_HINT = "controlvector.model_hint"
KEY_LAYER_COUNT = "controlvector.layer_count"
TENSOR_PREFIX = "direction."
# unisteer's provenance keys (llama.cpp ignores keys it does not read).
KEY_FINGERPRINT = "unisteer.fingerprint"
KEY_LAYER = "unisteer.layer"
KEY_MULTIPLIER = "unisteer.multiplier"
KEY_INSERTION = "unisteer.insertion"
KEY_SPEC = "unisteer.spec"

# Hugging Face model types whose MLP output reaches the residual sum unchanged (down_proj == block_output) ...
MLP_INTO_RESIDUAL_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3"})
# ... and those that transform it first (a norm after the MLP, or a residual multiplier).
MLP_TRANSFORMED_MODEL_TYPES = frozenset({"gemma2", "gemma3", "gemma3_text", "gemma3n", "gemma3n_text", "olmo2",
                                         "olmo3", "granite", "granitemoe"})
_DIRECTION = re.compile(r"direction\.(\d+)", re.ASCII)  # int() would also read other scripts' digits


def export_control_vector(update: Update, path: str | Path, *, model_name: str, multiplier: float = 1.0,
                          model: nn.Module | None = None, model_type: str | None = None,
                          overwrite: bool = False) -> Path:
    """Write a vector update at `multiplier` as a llama.cpp control vector GGUF (one `direction.<layer>`).

    `model_name` goes to `controlvector.model_hint` (llama.cpp's generator writes the model's GGUF
    architecture there, e.g. "llama"). `model` (the model the update belongs to) or `model_type` (its
    `config.model_type`) is needed only for a `down_proj` update, to check that the architecture adds the MLP
    output straight to the residual stream; with `model`, the update's fit to it is checked too.
    """
    from .fingerprint import update_fingerprint

    path = Path(path)
    spec = update.spec
    if not isinstance(update, VectorUpdate):
        raise UnisteerError(f"only vector updates export as control vectors (this one is {spec.form!r}): a "
                            "control vector adds one fixed vector to a layer's output")
    if Positions.parse(spec.positions).kind != "all":
        raise UnisteerError(f"positions={spec.positions}: a llama.cpp control vector is added at every token "
                            "position; only updates with positions='all' export")
    if spec.layer == 0:
        raise UnisteerError("layer 0: llama.cpp never steers decoder layer 0 (it loads no direction.0 and holds "
                            "no control tensor for layer 0); use a later layer")
    if isinstance(multiplier, bool) or not isinstance(multiplier, int | float) or not math.isfinite(multiplier):
        raise ConfigError(f"multiplier: expected a finite number, got {multiplier!r}")
    if not isinstance(model_name, str) or not model_name.strip():
        raise ConfigError("model_name: expected a non-empty string (written to controlvector.model_hint, e.g. "
                          "'llama' or the model's id)")
    if model is not None:
        check_compatible(spec, model, source="update")
    if spec.insertion == "down_proj":
        _check_down_proj_is_layer_output(spec, model, model_type)
    vector = update.vector.detach().to("cpu", torch.float32) * float(multiplier)
    if not torch.isfinite(vector).all():
        raise UnisteerError(f"the vector at multiplier {multiplier} holds NaN or infinite values; refusing to "
                            "write a control vector that would turn every output into NaN")
    if path.exists() and not overwrite:
        raise UnisteerError(f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    _write_gguf(path, {spec.layer: vector.numpy().astype(np.float32)}, model_hint=model_name, provenance={
        KEY_FINGERPRINT: update_fingerprint(update), KEY_LAYER: spec.layer, KEY_MULTIPLIER: float(multiplier),
        KEY_INSERTION: spec.insertion, KEY_SPEC: json.dumps(dataclasses.asdict(spec), default=str)})
    return path


def _check_down_proj_is_layer_output(spec: UpdateSpec, model: nn.Module | None, model_type: str | None) -> None:
    where = (f"a down_proj update (layer {spec.layer}) adds its vector to the MLP output, llama.cpp adds it to "
             "the layer output")
    if model is not None:
        from .merge import block_output_equals_down_proj

        if not block_output_equals_down_proj(model, spec.layer):
            kind = getattr(text_config(model.config), "model_type", "?")
            raise UnisteerError(f"{where}; on this architecture ({kind!r}) the MLP output is transformed before "
                                "the residual sum (e.g. Gemma's post_feedforward_layernorm), so the control "
                                "vector would steer differently; refusing")
        return
    if model_type is None:
        raise UnisteerError(f"{where}; these are the same only where the MLP output goes straight into the "
                            "residual stream: pass model_type= (CLI: --model-type, e.g. llama) or model= (CLI: "
                            "--model) to check the architecture, or use a block_output update")
    if model_type in MLP_TRANSFORMED_MODEL_TYPES:
        raise UnisteerError(f"{where}; {model_type!r} transforms the MLP output before the residual sum (a "
                            "post-feed-forward norm or a residual multiplier), so the control vector would "
                            "steer differently; refusing (a block_output update exports on any architecture)")
    if model_type not in MLP_INTO_RESIDUAL_MODEL_TYPES:
        raise UnisteerError(f"{where}; model_type {model_type!r} is not one unisteer knows to add the MLP output "
                            f"straight to the residual ({sorted(MLP_INTO_RESIDUAL_MODEL_TYPES)}): pass model= "
                            "(CLI: --model) to check it numerically")


def _write_gguf(path: Path, directions: dict[int, np.ndarray], *, model_hint: str,
                provenance: dict[str, Any]) -> None:
    """The file llama.cpp's cvector-generator writes (architecture, model_hint, layer_count, direction.<il>),
    plus unisteer's keys; written to a temporary name and renamed into place."""
    import gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    writer = gguf.GGUFWriter(tmp, ARCHITECTURE)  # writes general.architecture = "controlvector"
    try:
        writer.add_string(KEY_MODEL_HINT, model_hint)
        writer.add_int32(KEY_LAYER_COUNT, len(directions))
        for key, value in provenance.items():
            if isinstance(value, str):
                writer.add_string(key, value)
            elif isinstance(value, float):
                writer.add_float64(key, value)
            else:
                writer.add_int32(key, int(value))
        for layer, values in sorted(directions.items()):
            writer.add_tensor(f"{TENSOR_PREFIX}{layer}", np.ascontiguousarray(values, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except BaseException:
        with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
            writer.close()
        tmp.unlink(missing_ok=True)
        raise
    writer.close()
    tmp.replace(path)


@dataclass
class ControlVectorFile:
    """A control vector GGUF as read: its model hint, one direction per layer index, and unisteer's keys."""

    path: Path
    model_hint: str
    directions: dict[int, np.ndarray]  # llama.cpp layer index il -> float32 [n_embd]
    metadata: dict[str, Any] = field(default_factory=dict)  # the unisteer.* keys, if any

    @property
    def hidden_size(self) -> int:
        return len(next(iter(self.directions.values())))

    def nonzero_layers(self) -> list[int]:
        return sorted(il for il, values in self.directions.items() if np.any(values != 0))


def read_control_vector(path: str | Path) -> ControlVectorFile:
    """Read and check a control vector GGUF (unisteer's or llama.cpp's cvector-generator's, many layers).

    Refused, with the file and field named: not a GGUF, `general.architecture` other than "controlvector",
    tensors not named `direction.<il>` with il >= 1, not float32 or not 1-D, of unequal lengths, none at all,
    or holding NaN/infinite values.
    """
    import gguf

    path = Path(path)
    if not path.is_file():
        raise UnisteerError(f"{path}: no such control vector file")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, KeyError, IndexError, TypeError, OSError) as exc:
        raise UnisteerError(f"{path}: not a readable GGUF file ({exc})") from exc
    arch = _field(reader, KEY_ARCHITECTURE, path)
    if arch is None:
        raise UnisteerError(f"{path}: missing {KEY_ARCHITECTURE} (a control vector has 'controlvector')")
    if arch != ARCHITECTURE:
        raise UnisteerError(f"{path}: {KEY_ARCHITECTURE} is {arch!r}, expected {ARCHITECTURE!r}: this is not a "
                            "llama.cpp control vector (a model or LoRA adapter GGUF?)")
    hint = _field(reader, KEY_MODEL_HINT, path)
    if hint is not None and not isinstance(hint, str):
        raise UnisteerError(f"{path}: {KEY_MODEL_HINT} should be a string, got {hint!r}")
    directions: dict[int, np.ndarray] = {}
    names: dict[int, str] = {}
    for tensor in reader.tensors:
        where = f"{path}: tensor {tensor.name!r}"
        match = _DIRECTION.fullmatch(tensor.name)
        if match is None:
            raise UnisteerError(f"{where}: expected only tensors named direction.<layer> (llama.cpp refuses others)")
        il = int(match.group(1))
        if il == 0:
            raise UnisteerError(f"{where}: layer 0 is never steered by llama.cpp (it refuses direction.0)")
        if il > MAX_DIMENSION:
            raise UnisteerError(f"{where}: layer {il} is beyond any model (at most {MAX_DIMENSION})")
        if il in names:  # e.g. direction.15 and direction.015: one would silently replace the other
            raise UnisteerError(f"{where}: layer {il} already has tensor {names[il]!r}; expected one direction "
                                "per layer")
        names[il] = tensor.name
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            raise UnisteerError(f"{where}: type {tensor.tensor_type.name}, expected F32")
        dims = [int(d) for d in tensor.shape]
        if not dims or any(d != 1 for d in dims[1:]):
            raise UnisteerError(f"{where}: shape {dims}, expected a 1-D vector")
        if not 1 <= dims[0] <= MAX_DIMENSION:
            raise UnisteerError(f"{where}: {dims[0]} values (n_embd), expected between 1 and {MAX_DIMENSION}")
        values = np.array(tensor.data, dtype=np.float32).reshape(-1)
        if directions and len(values) != len(next(iter(directions.values()))):
            raise UnisteerError(f"{where}: {len(values)} values, but the file's other directions have "
                                f"{len(next(iter(directions.values())))}")
        bad = int((~np.isfinite(values)).sum())
        if bad:
            raise UnisteerError(f"{where}: holds {bad} NaN or infinite value(s); refusing a vector that would "
                                "turn every steered output into NaN")
        directions[il] = values
    if not directions:
        raise UnisteerError(f"{path}: no direction.<layer> tensors (an empty control vector)")
    metadata = {}
    for key in (KEY_FINGERPRINT, KEY_LAYER, KEY_MULTIPLIER, KEY_INSERTION, KEY_SPEC):
        value = _field(reader, key, path)
        if value is not None:
            metadata[key] = value
    return ControlVectorFile(path=path, model_hint=hint or "", directions=directions, metadata=metadata)


def _field(reader, key: str, path: Path) -> Any:
    """A scalar or string metadata value (None when absent)."""
    found = reader.get_field(key)
    if found is None:
        return None
    try:
        return found.contents()
    except (ValueError, IndexError, UnicodeDecodeError) as exc:
        raise UnisteerError(f"{path}: metadata {key} is unreadable ({exc})") from exc


def import_control_vector(path: str | Path, *, layer: int | None = None, model: nn.Module | None = None,
                          input_size: int | None = None, name: str | None = None,
                          scale: float = 1.0) -> VectorUpdate:
    """A `block_output` vector update that does what llama.cpp does with `--control-vector-scaled FILE scale`.

    `layer` picks one direction (default: the only nonzero one); the vector is that direction times `scale`
    (a file exported at multiplier m holds m·Δb). The update's remaining spec fields come from `model` when
    given (which is also checked to fit), else from the file's unisteer metadata, else `input_size` (the MLP
    width, which a saved update records) is required.
    """
    cv = read_control_vector(path)
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise ConfigError(f"scale: expected a finite number, got {scale!r}")
    if layer is None:
        nonzero = cv.nonzero_layers()
        if not nonzero:
            raise UnisteerError(f"{cv.path}: every direction is zero; nothing to import")
        if len(nonzero) > 1:
            raise UnisteerError(f"{cv.path}: holds nonzero directions for layers {nonzero}; choose one with "
                                "layer= (CLI: --layer)")
        layer = nonzero[0]
    elif isinstance(layer, bool) or not isinstance(layer, int) or layer not in cv.directions:
        raise UnisteerError(f"{cv.path}: no tensor direction.{layer}; the file has layers {sorted(cv.directions)}")
    base = _spec_from_metadata(cv)
    fields: dict[str, Any] = {"model_id": base.model_id, "config_hash": base.config_hash,
                              "component": base.component, "polarity": base.polarity, "name": base.name}
    size = input_size if input_size is not None else base.input_size
    if model is not None:
        from .models import config_hash, model_id

        structure = model_structure(model)
        if layer >= structure.num_layers:
            raise UpdateMismatchError(f"{cv.path}: direction.{layer} is beyond the model's layers "
                                      f"0..{structure.num_layers - 1} (llama.cpp would ignore it)")
        if cv.hidden_size != structure.hidden_size:
            raise UpdateMismatchError(f"{cv.path}: directions have {cv.hidden_size} values, the model's hidden "
                                      f"size is {structure.hidden_size}")
        size = structure.intermediate_size
        fields.update(model_id=model_id(model), config_hash=config_hash(model),
                      component=structure.down_proj_names[layer])
    if size is None:
        raise UnisteerError(f"{cv.path}: the MLP width (input_size) of the model is not in the file; pass "
                            "input_size= (CLI: --input-size) or model=")
    if name is not None:
        fields["name"] = name
    try:
        spec = UpdateSpec(form="vector", layer=layer, hidden_size=cv.hidden_size, input_size=size,
                          insertion="block_output", dropout=0.0, positions="all",
                          training={"imported_from": "gguf-control-vector", "file": cv.path.name,
                                    "model_hint": cv.model_hint, "layer": layer, "scale": float(scale),
                                    "fingerprint": cv.metadata.get(KEY_FINGERPRINT, "")}, **fields)
    except ConfigError as exc:
        raise UnisteerError(f"{cv.path}: {exc}") from exc
    with np.errstate(over="ignore"):  # an overflow is reported below, as an error
        vector = (cv.directions[layer].astype(np.float64) * float(scale)).astype(np.float32)
    if not np.isfinite(vector).all():
        raise UnisteerError(f"{cv.path}: direction.{layer} times scale {scale:g} overflows float32 (NaN or "
                            "infinite values); use a smaller scale")
    update = VectorUpdate(spec)
    with torch.no_grad():
        update.vector.copy_(torch.from_numpy(vector))
    if model is not None:
        update.to(next(model.parameters()).device)
    return update.eval()


@dataclass
class _BaseFields:
    model_id: str = ""
    config_hash: str = ""
    component: str = "mlp.down_proj"
    polarity: str = UpdateSpec.polarity
    name: str = ""
    input_size: int | None = None


def _spec_from_metadata(cv: ControlVectorFile) -> _BaseFields:
    """Spec fields recorded by a unisteer export (none for other files)."""
    text = cv.metadata.get(KEY_SPEC)
    if not isinstance(text, str):
        return _BaseFields()
    try:
        spec = from_dict(UpdateSpec, json.loads(text), where=f"{cv.path}: {KEY_SPEC}")
    except (json.JSONDecodeError, ConfigError) as exc:
        raise UnisteerError(f"{cv.path}: metadata {KEY_SPEC} is not a valid update spec ({exc})") from exc
    return _BaseFields(model_id=spec.model_id, config_hash=spec.config_hash, component=spec.component,
                       polarity=spec.polarity, name=spec.name, input_size=spec.input_size)
