"""Steered generation: many prompts × many multipliers in one batched run, stored as resumable JSONL.

    gens = generate_steered(model, tokenizer, prompts, update, multipliers=[-4, 0, 4],
                            settings=SamplingConfig(max_new_tokens=64), out_path="gens.jsonl")

(`SamplingConfig` and the token choice live in `unisteer.generation.sampling`, shared with the server.)

Rows are (prompt, sample) × multiplier; one `model.generate` call serves a batch of rows with a per-row
multiplier tensor (`Steering(model, update, multiplier=tensor[B])`), left padding and the chat template of
`PairEncoder`. Decoding stops at eos or the template's end-of-turn token.

Sampling is reproducible independently of batching: each row draws from its own `torch.Generator`, seeded
from (settings.seed, the prompt's tokens, sample index) by `sampling.row_seed`. The seed deliberately ignores
the multiplier, so every multiplier of a prompt sees the same random numbers (common random numbers:
differences between multipliers are not sampling noise), and a resumed run produces exactly what an
uninterrupted run would have.

Storage: with `out_path`, every finished batch is appended to the JSONL file at once. Each line holds the
prompt, multiplier, sample index, update name and fingerprint, settings and a `run_key` (model, update,
settings, rendering). Re-running with the same `out_path` reuses stored rows and generates only the missing
ones; a file written by a different run (other model, update, settings or rendering) is refused rather than
mixed or overwritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from ..data.batches import collate_prompts
from ..data.rendering import PairEncoder
from ..engine.devices import input_device
from ..engine.fingerprint import model_fingerprint, update_fingerprint
from ..engine.steering import Steering
from ..engine.updates import Update, check_multipliers, eval_mode
from ..errors import ConfigError, DataError, UnisteerError
from ..files import JsonlLog
from .sampling import SamplingConfig, cut_at_stop, next_tokens, row_seed, stop_token_ids

GENERATION_FORMAT = "unisteer-generation"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptInput:
    """A prompt to generate from, with metadata carried into each `Generation` (e.g. a judge's concept)."""

    prompt: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Generation:
    """One generated answer. `finished` is True when the model ended its turn within max_new_tokens."""

    prompt_index: int
    prompt: str
    multiplier: float
    sample: int
    text: str
    finished: bool
    n_new_tokens: int
    update_name: str | None
    update_id: str | None
    seed: int | None  # the row's sampling seed; None for greedy decoding
    settings: dict[str, Any]
    run_key: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def row_key(self) -> tuple[str, float, int]:
        return (_text_hash(self.prompt), float(self.multiplier), self.sample)

    def to_record(self) -> dict[str, Any]:
        return {"format": GENERATION_FORMAT, **asdict(self)}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Generation:
        fields = {k: v for k, v in record.items() if k != "format"}
        return cls(**fields)


# ------------------------------------------------------------------------------------------------ public


def generate_steered(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str | PromptInput | Any],
    update: Update | None,
    multipliers: Sequence[float] = (0.0,),
    settings: SamplingConfig | dict[str, Any] | None = None,
    out_path: str | Path | None = None,
    *,
    samples: int = 1,
    batch_size: int = 16,
    encoder: PairEncoder | None = None,
    progress: bool = True,
) -> list[Generation]:
    """Generate an answer for every prompt × multiplier (× sample); see the module docstring.

    `prompts` are strings, `PromptInput`s or any objects with `.prompt` and `.meta` (e.g. the data module's
    `EvalPrompt`). `update=None` generates with the plain model (multipliers must then be 0). `samples`
    draws several answers per prompt (sampling only); `batch_size` rows share a `generate` call (speed only,
    never the results). Results come back ordered by prompt, then sample, then multiplier (as given).
    """
    settings = _settings(settings)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ConfigError(f"samples must be a positive integer, got {samples!r}")
    if samples > 1 and settings.greedy:
        raise ConfigError("samples > 1 needs a temperature above 0 (greedy samples would all be identical)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    inputs = _prompt_inputs(prompts)
    multiplier_list = check_multipliers(multipliers, with_update=update is not None)
    encoder = encoder or PairEncoder(tokenizer)
    update_name, update_id = (update.spec.name or update.spec.form, update_fingerprint(update)) if update else (None, None)
    run = {"model": model_fingerprint(model), "update_id": update_id, "settings": settings.key(),
           "rendering": encoder.describe()}
    run_key = hashlib.sha256(json.dumps(run, sort_keys=True, default=str).encode()).hexdigest()[:16]
    store = GenerationStore(Path(out_path), run_key) if out_path is not None else None
    done: dict[tuple[str, float, int], Generation] = dict(store.load()) if store else {}

    rows = [(i, s, m) for i in range(len(inputs)) for s in range(samples) for m in multiplier_list]
    missing, seen = [], set(done)
    for i, s, m in rows:
        key = (_text_hash(inputs[i].prompt), m, s)
        if key not in seen:  # a prompt listed twice is generated once
            seen.add(key)
            missing.append((i, s, m))
    prompt_ids = {i: encoder.encode_prompt(inputs[i].prompt) for i in {r[0] for r in missing}}
    # Rows of similar length share a batch, so little compute goes into padding.
    missing.sort(key=lambda r: (len(prompt_ids[r[0]]), r[0], r[1], r[2]))
    stop_ids = stop_token_ids(tokenizer, encoder.turn_end, model)
    bar = tqdm(total=len(missing), desc="generate", unit="row", disable=not progress)
    try:
        for start in range(0, len(missing), batch_size):
            chunk = missing[start:start + batch_size]
            seeds = [None if settings.greedy else row_seed(settings.seed, prompt_ids[i], s) for i, s, _ in chunk]
            outputs = _generate_batch(model, update, [prompt_ids[i] for i, _, _ in chunk], [m for _, _, m in chunk],
                                      seeds, settings, encoder.pad_token_id, stop_ids)
            batch_generations = []
            for (i, s, m), seed, (new_ids, finished) in zip(chunk, seeds, outputs, strict=True):
                text, stopped = cut_at_stop(tokenizer.decode(new_ids, skip_special_tokens=True), settings.stop)
                generation = Generation(
                    prompt_index=i, prompt=inputs[i].prompt, multiplier=m, sample=s,
                    text=text, finished=finished or stopped,
                    n_new_tokens=len(new_ids), update_name=update_name, update_id=update_id, seed=seed,
                    settings=settings.key(), run_key=run_key, meta=dict(inputs[i].meta))
                done[generation.row_key] = generation
                batch_generations.append(generation)
            if store:
                store.append(batch_generations)
            bar.update(len(chunk))
    finally:
        bar.close()
    return [_with_index(done[(_text_hash(inputs[i].prompt), m, s)], i, inputs[i].meta) for i, s, m in rows]


def generate_unsteered(model: nn.Module, tokenizer: Any, prompts: Sequence[str], *, cache_dir: str | Path,
                       settings: SamplingConfig | dict[str, Any] | None = None,
                       encoder: PairEncoder | None = None, progress: bool = True) -> list[Generation]:
    """The plain model's own answers to `prompts` (AxBench's negative side), generated once and cached.

    The cache file under `cache_dir/unsteered-generations/` is named by the model (id, config hash and a probe
    of its weights), the sampling settings and the rendering; only prompts not yet stored are generated.
    """
    settings = _settings(settings if settings is not None else SamplingConfig(max_new_tokens=256))
    encoder = encoder or PairEncoder(tokenizer)
    fingerprint = model_fingerprint(model)
    key = json.dumps({"model": fingerprint, "settings": settings.key(), "rendering": encoder.describe()},
                     sort_keys=True, default=str)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", fingerprint["model_id"])[-60:]
    path = Path(cache_dir) / "unsteered-generations" / f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.jsonl"
    return generate_steered(model, tokenizer, list(prompts), None, [0.0], settings, path, encoder=encoder,
                            progress=progress)


def read_generations(path: str | Path) -> list[Generation]:
    """All generations stored in a JSONL file written by `generate_steered` (a torn last line is skipped)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such generations file")
    return [g for _, g in _read_store(path)]


class GenerationStore:
    """Append-only JSONL of the generations of one run (`run_key`); see the module docstring."""

    def __init__(self, path: Path, run_key: str) -> None:
        self.path = path
        self.run_key = run_key

    def load(self) -> Iterator[tuple[tuple[str, float, int], Generation]]:
        if not self.path.exists():
            return
        self._drop_torn_tail()
        for line_no, generation in _read_store(self.path):
            if generation.run_key != self.run_key:
                raise UnisteerError(
                    f"{self.path}:{line_no}: holds generations of another run (run_key {generation.run_key}, "
                    f"this run {self.run_key}: model, update, settings or rendering differ); choose another "
                    "out_path, or delete the file to regenerate")
            yield generation.row_key, generation

    def _drop_torn_tail(self) -> None:
        dropped = JsonlLog(self.path).repair()
        if dropped:
            log.warning("%s: dropped a torn last line (%d bytes) left by an interrupted run; its rows are redone",
                        self.path, dropped)

    def append(self, generations: Sequence[Generation]) -> None:
        JsonlLog(self.path).append([g.to_record() for g in generations])


# ------------------------------------------------------------------------------------------------ internals


class FiniteLogits(LogitsProcessor):
    """Stops generation with a clear error when steering drives a row's logits to NaN or infinity (otherwise
    `generate` would pick token 0 and print empty or garbled text as if nothing were wrong)."""

    def __init__(self, multipliers: Sequence[float]) -> None:
        self.multipliers = list(multipliers)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        bad = ~torch.isfinite(scores).all(dim=-1)
        if bool(bad.any()):
            rows = sorted({self.multipliers[i] for i in bad.nonzero().flatten().tolist()})
            raise UnisteerError(f"generation: the steered model's logits became NaN or infinite at m = {rows}; "
                                "use a smaller |m| (or float32 instead of a 16-bit dtype)")
        return scores


class PerRowSampler(LogitsProcessor):
    """Samples each row with its own generator (`sampling.next_tokens`) and forces that token, so that
    `generate` runs its cache handling greedily while the randomness is per row."""

    def __init__(self, seeds: Sequence[int], settings: SamplingConfig, device: torch.device) -> None:
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.settings = settings

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != len(self.generators):
            raise UnisteerError(f"sampler: {scores.shape[0]} rows but {len(self.generators)} generators")
        chosen = next_tokens(scores, [self.settings] * len(self.generators), self.generators)
        forced = torch.full_like(scores, float("-inf"))
        forced.scatter_(1, chosen.unsqueeze(1), 0.0)
        return forced


def _generate_batch(model: nn.Module, update: Update | None, prompt_ids: Sequence[list[int]],
                    multipliers: Sequence[float], seeds: Sequence[int | None], settings: SamplingConfig,
                    pad_token_id: int, stop_ids: list[int]) -> list[tuple[list[int], bool]]:
    device = input_device(model)
    batch = collate_prompts(list(prompt_ids), pad_token_id=pad_token_id, padding_side="left").to(device)
    # A fresh config: results depend on `settings` only, never on a model's shipped generation defaults.
    config = GenerationConfig(max_new_tokens=settings.max_new_tokens, do_sample=False, num_beams=1,
                              pad_token_id=pad_token_id, eos_token_id=stop_ids or None)
    processors = LogitsProcessorList([FiniteLogits(multipliers)])
    if not settings.greedy:
        processors.append(PerRowSampler([int(s) for s in seeds if s is not None], settings, device))
    with torch.no_grad(), _steering(model, update, multipliers, device):
        output = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                generation_config=config, logits_processor=processors)
    results = []
    for row in output[:, batch.input_ids.shape[1]:].tolist():
        cut = next((k for k, token in enumerate(row) if token in stop_ids), None)
        results.append((row if cut is None else row[:cut], cut is not None))
    return results


@contextmanager
def _steering(model: nn.Module, update: Update | None, multipliers: Sequence[float],
              device: torch.device) -> Iterator[None]:
    if update is None:
        yield
        return
    with eval_mode(update), Steering(model, update, multiplier=torch.tensor(multipliers, dtype=torch.float32,
                                                                           device=device)):
        yield


def _settings(value: SamplingConfig | dict[str, Any] | None) -> SamplingConfig:
    if value is None:
        return SamplingConfig()
    if isinstance(value, dict):
        return SamplingConfig.from_dict(value)
    if not isinstance(value, SamplingConfig):
        raise ConfigError(f"generation settings: expected SamplingConfig or a dict, got {type(value).__name__}")
    return value


def _prompt_inputs(prompts: Sequence[str | PromptInput | Any]) -> list[PromptInput]:
    if isinstance(prompts, str):
        raise ConfigError("prompts: expected a list of prompts, got a single string")
    inputs = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            inputs.append(PromptInput(p))
        elif isinstance(getattr(p, "prompt", None), str):
            inputs.append(PromptInput(p.prompt, dict(getattr(p, "meta", None) or {})))
        else:
            raise ConfigError(f"prompts[{i}]: expected a string or an object with a .prompt string, got {p!r:.80}")
    if not inputs:
        raise ConfigError("prompts: no prompts given")
    return inputs


def _read_store(path: Path) -> Iterator[tuple[int, Generation]]:
    for line_no, line in JsonlLog(path).lines():  # a torn last line is left out: its rows are redone
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{line_no}: malformed JSON line in a generations file ({exc.msg})") from exc
        if not isinstance(record, dict) or record.get("format") != GENERATION_FORMAT:
            raise DataError(f"{path}:{line_no}: not a unisteer generation record")
        try:
            yield line_no, Generation.from_record(record)
        except TypeError as exc:
            raise DataError(f"{path}:{line_no}: generation record with wrong fields ({exc})") from exc


def _with_index(generation: Generation, prompt_index: int, meta: dict[str, Any]) -> Generation:
    """A stored row under this call's prompt numbering (a resumed call may list prompts differently)."""
    if generation.prompt_index == prompt_index and generation.meta == meta:
        return generation
    record = asdict(generation)
    record.update(prompt_index=prompt_index, meta=dict(meta))
    return Generation(**record)


def _text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]
