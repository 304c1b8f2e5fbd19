"""The trainer: SPLIT, SFT, RePS and DPO/BiPO for every update form, and the closed-form DiffMean vector.

Reference semantics (SPEC §5), each an option of `TrainConfig`:
- An epoch shuffles the pairs (seeded) and cuts them into batches of `batch_size` pairs. Each pair becomes
  one preference example per pair type — `add` = (A_p wins, A_n loses, factor +s), `sub` = (A_n wins, A_p
  loses, factor −s), `random` = one of the two by a coin flip (BiPO) — ordered pair by pair, then cut into
  minibatches of `batch_size` examples. The factor s is drawn from the form's factor set independently for
  every sequence (winning and losing alike) unless `share_factor`.
- The loss of a minibatch is the objective on token-weighted minibatch means (`unisteer.objectives`); the
  minibatch losses of `grad_accum` batches are averaged into one AdamW step (weight decay 0) on the update's
  fp32 parameters, with gradient clipping at `max_grad_norm` and a linear decay without warm-up. Dropout of
  the update is on during training only.
- Vectors act at positions after the chat template's common prefix during training (all positions at
  inference: the saved spec says `all`); LoRA / local weight act on all positions.
- RePS for vectors: the `sub` direction projects the positive component out (`objectives.ProjectingVector`).

Speed (the frozen-prefix cache, default): the base model is frozen and the update sits at layer L, so the
hidden states entering layer L depend only on the tokens. They are computed once per sequence (in memory,
or memory-mapped from disk above `cache_memory_mb`) and every step runs only layers ≥ L from them, with the
lm-head applied to completion rows only. The reference log-probs of RePS/DPO come from the same single pass.
For vectors trained after the common prefix, the prefix's keys/values are also identical for every sequence
and multiplier, so they are computed once and the steps run only the tokens after it. All sequences of a
batch (winning and losing, add and sub) go through one forward with per-row multipliers.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .architecture import check_layer_index, model_structure
from .checkpoint import (
    LEGACY_PICKLE,
    load_checkpoint,
    optimizer_from_parts,
    optimizer_to_parts,
    save_checkpoint,
)
from .config import to_dict
from .data import (
    IGNORE_INDEX,
    EncodedPair,
    PairDataset,
    PairEncoder,
    PolarityPair,
    Rendering,
    collate_pairs,
    common_prefix_length,
)
from .errors import ConfigError, DataError, UnisteerError
from .files import write_json, write_text
from .hf_compat import cache_kwargs, output_cache
from .hooks import Steering
from .objectives import (
    OBJECTIVES,
    LossTerms,
    ObjectiveInputs,
    ProjectingVector,
)
from .prefix import layers_from, recording, run_until
from .scoring import CompletionScores, completion_nll, completion_nll_from_hidden, final_hidden, stack_owner
from .storage import save_update
from .updates import FORMS, INSERTIONS, Positions, Update, create_update, eval_mode, form_class

log = logging.getLogger(__name__)

PAIR_MODES = ("add", "add+sub", "random")
TRAIN_POSITIONS = ("after_prefix", "all")
REPS_LENGTHS = ("completion", "sequence")
UPDATE_FOLDER = "update"
CHECKPOINT_FILE = "checkpoint"  # a folder: safetensors + JSON (unisteer.checkpoint)
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
LAYER_CACHE_PREFIX = ".layer-cache-"


def _jsonable(value: Any) -> Any:
    """JSON for the few non-JSON values a config or scheduler holds (tuples become lists anyway)."""
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint")


class TrainingError(UnisteerError):
    """Training cannot go on (a NaN loss, a checkpoint that does not match, an output folder in use)."""


# ---------------------------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    """Every option of a training run. Fields left None take the form's default (see `resolved`).

    Reference values per form and dataset: `unisteer.presets.preset(objective, form)`.
    """

    objective: str = "split"
    form: str = "vector"
    layer: int | None = None  # None: the middle layer (num_layers // 2), the paper's choice
    insertion: str = "block_output"
    rank: int = 4
    dropout: float = 0.1
    pairs: str = "add+sub"  # add | add+sub | random (one random direction per pair, BiPO)
    factors: tuple[float, ...] | None = None  # None: vector 2..20 step 2; LoRA / local weight 0.2..2.0
    share_factor: bool = False  # one factor per example for both sides (reference: one per sequence)
    batch_size: int = 4
    grad_accum: int = 1
    epochs: int = 2
    lr: float | None = None  # None: vector 0.08, LoRA / local weight 0.01
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    lambda_p: float = 1.0  # SPLIT weights; `sft` uses λ_p only (λ_n = γ = 0 whatever is set here)
    lambda_n: float = 0.5
    gamma: float = 5.0
    theta: float = 0.4
    beta: float = 0.1  # DPO
    reps_scaler: float = 1.0  # RePS: weight = max(scaler·(r_l − r_w), 1)
    reps_length: str = "completion"  # RePS |w|, |l|: completion tokens, or whole sequences (reference code)
    train_positions: str | None = None  # after_prefix | all; None: vector after_prefix, others all
    rendering: Rendering | None = None  # how pairs become tokens (`unisteer.data.Rendering`); None: natural
    seed: int = 42
    max_length: int = 512
    prefix_cache: bool = True  # frozen-prefix activation cache (same losses, several times faster)
    cache_memory_mb: float = 1024.0  # above this the cached activations live in a memory-mapped file
    cache_batch_size: int = 16  # sequences per forward while filling the cache and evaluating
    eval_multiplier: float | None = None  # None: the mean of the factor set
    eval_pairs: int = 32  # pairs (dev, else train) scored at −m, 0, +m before/after training; 0: no evaluation
    checkpoint_every: int = 50  # optimizer steps between checkpoints (and at every epoch end)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective: {self.objective!r} is not one of {tuple(OBJECTIVES)}")
        if self.form not in FORMS:
            raise ConfigError(f"form: {self.form!r} is not one of {FORMS}")
        if self.insertion not in INSERTIONS:
            raise ConfigError(f"insertion: {self.insertion!r} is not one of {INSERTIONS}")
        if self.pairs not in PAIR_MODES:
            raise ConfigError(f"pairs: {self.pairs!r} is not one of {PAIR_MODES}")
        if self.train_positions is not None and self.train_positions not in TRAIN_POSITIONS:
            raise ConfigError(f"train_positions: {self.train_positions!r} is not one of {TRAIN_POSITIONS}")
        if self.rendering is not None and not isinstance(self.rendering, Rendering):
            self.rendering = Rendering.parse(self.rendering)
        if self.reps_length not in REPS_LENGTHS:
            raise ConfigError(f"reps_length: {self.reps_length!r} is not one of {REPS_LENGTHS}")
        for name in ("rank", "batch_size", "grad_accum", "epochs", "max_length", "cache_batch_size",
                     "checkpoint_every", "eval_pairs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "eval_pairs" else 1):
                raise ConfigError(f"{name}: expected a positive integer, got {value!r}")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)):
            raise ConfigError(f"layer: expected an integer or null, got {self.layer!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps: expected a non-negative integer, got {self.warmup_steps!r}")
        for name in ("weight_decay", "max_grad_norm", "lambda_p", "lambda_n", "gamma", "theta", "beta",
                     "reps_scaler", "cache_memory_mb", "dropout", "lr", "eval_multiplier"):
            value = getattr(self, name)
            if value is None and name in ("lr", "eval_multiplier"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{name}: expected a finite number, got {value!r}")
            setattr(self, name, float(value))
        for name in ("weight_decay", "max_grad_norm", "lambda_p", "lambda_n", "gamma", "beta", "cache_memory_mb"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: expected a value >= 0, got {getattr(self, name)!r}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"lr: expected a positive learning rate, got {self.lr!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: expected a value in [0, 1), got {self.dropout!r}")
        if self.factors is not None:
            if isinstance(self.factors, (str, bytes)) or not isinstance(self.factors, (list, tuple)):
                raise ConfigError(f"factors: expected a list of positive numbers, got {self.factors!r}")
            if not self.factors:
                raise ConfigError("factors: the factor set is empty")
            for value in self.factors:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                        math.isfinite(value) and value > 0):
                    raise ConfigError(f"factors: every factor must be a positive finite number (the sign comes "
                                      f"from the pair direction), got {value!r}")
            self.factors = tuple(float(v) for v in self.factors)

    def resolved(self, num_layers: int | None = None) -> TrainConfig:
        """A copy with the form defaults filled in (and the layer, when `num_layers` is given)."""
        values = dataclasses.asdict(self)
        if values["factors"] is None:
            values["factors"] = form_class(self.form).train_factors
        if values["lr"] is None:
            values["lr"] = form_class(self.form).learning_rate
        if values["train_positions"] is None:
            values["train_positions"] = "after_prefix" if self.form == "vector" else "all"
        if values["eval_multiplier"] is None:
            values["eval_multiplier"] = round(sum(values["factors"]) / len(values["factors"]), 6)
        if num_layers is not None:
            if values["layer"] is None:
                values["layer"] = num_layers // 2
            check_layer_index(values["layer"], num_layers)
        return TrainConfig(**values)

    @property
    def pair_types(self) -> tuple[str, ...]:
        return {"add": ("add",), "add+sub": ("add", "sub"), "random": ("random",)}[self.pairs]


@dataclass
class TrainResult:
    """The trained update (eval mode), where it was saved, the training summary and the step metrics."""

    update: Update
    path: Path
    summary: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- sequences


@dataclass(frozen=True)
class _Example:
    """One preference example: which pair, which direction, the signed multiplier of each side."""

    pair: int
    direction: int  # +1: add (A_p wins), -1: sub (A_n wins)
    win_multiplier: float
    lose_multiplier: float
    project: bool = False  # RePS vector `sub`: project the positive component out instead of adding

    @property
    def win_sequence(self) -> int:
        return 2 * self.pair + (0 if self.direction > 0 else 1)

    @property
    def lose_sequence(self) -> int:
        return 2 * self.pair + (1 if self.direction > 0 else 0)


class _Sequences:
    """Token ids of every sequence: index 2·pair is `prompt + A_p`, 2·pair + 1 is `prompt + A_n`."""

    def __init__(self, encoded: Sequence[EncodedPair]):
        self.ids: list[list[int]] = []
        self.prompt_lengths: list[int] = []
        for pair in encoded:
            for completion in (pair.positive_ids, pair.negative_ids):
                self.ids.append(list(pair.prompt_ids) + list(completion))
                self.prompt_lengths.append(len(pair.prompt_ids))

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, indices: Sequence[int], start: int = 0, pad_id: int = 0) -> dict[str, torch.Tensor]:
        """Right-padded ids / mask / labels of tokens from absolute position `start` on."""
        lengths = [len(self.ids[i]) - start for i in indices]
        width = max(lengths)
        ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(indices), width), dtype=torch.long)
        labels = torch.full((len(indices), width), IGNORE_INDEX, dtype=torch.long)
        for row, (i, n) in enumerate(zip(indices, lengths, strict=True)):
            tokens = torch.tensor(self.ids[i][start:], dtype=torch.long)
            ids[row, :n] = tokens
            mask[row, :n] = 1
            first_label = self.prompt_lengths[i] - start
            labels[row, first_label:n] = tokens[first_label:]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "lengths": torch.tensor(lengths)}


class _LayerInputStore:
    """Hidden states entering layer L for every sequence ([length, d] each), in memory or memory-mapped."""

    def __init__(self, lengths: Sequence[int], width: int, dtype: torch.dtype, *, memory_limit_bytes: float,
                 disk_dir: Path):
        self.lengths = list(lengths)
        self.offsets = [0]
        for n in self.lengths:
            self.offsets.append(self.offsets[-1] + n)
        self.width, self.dtype = width, dtype
        element = torch.empty((), dtype=dtype).element_size()
        self.nbytes = self.offsets[-1] * width * element
        self.on_disk = self.nbytes > memory_limit_bytes
        self.path: Path | None = None
        if self.on_disk:
            disk_dir.mkdir(parents=True, exist_ok=True)
            self.path = disk_dir / "layer_inputs.bin"
            self._file = open(self.path, "wb")  # written at offsets by put(), closed by finish()
            self._file.truncate(self.nbytes)
            self._flat: torch.Tensor | None = None
        else:
            self._flat = torch.empty((self.offsets[-1], width), dtype=dtype)

    def put(self, index: int, rows: torch.Tensor) -> None:
        if rows.shape != (self.lengths[index], self.width):
            raise ValueError(f"sequence {index}: expected {(self.lengths[index], self.width)}, got {tuple(rows.shape)}")
        rows = rows.detach().to("cpu", self.dtype).contiguous()
        if self._flat is not None:
            self._flat[self.offsets[index]:self.offsets[index + 1]] = rows
            return
        self._file.seek(self.offsets[index] * self.width * rows.element_size())
        self._file.write(rows.view(torch.uint8).numpy().tobytes())

    def finish(self) -> None:
        if self.on_disk and self._flat is None:
            self._file.close()
            numel = self.offsets[-1] * self.width
            self._flat = torch.from_file(str(self.path), shared=False, size=numel, dtype=self.dtype)
            self._flat = self._flat.view(self.offsets[-1], self.width)

    def get(self, index: int) -> torch.Tensor:
        return self._flat[self.offsets[index]:self.offsets[index + 1]]

    def padded(self, indices: Sequence[int], start: int, device: torch.device) -> torch.Tensor:
        width = max(self.lengths[i] for i in indices) - start
        out = torch.zeros((len(indices), width, self.width), dtype=self.dtype)
        for row, i in enumerate(indices):
            rows = self.get(i)[start:]
            out[row, :rows.shape[0]] = rows
        return out.to(device)


class _Scorer:
    """Completion NLLs of sequences under the update at per-row multipliers: cached or full forwards."""

    def __init__(self, model: nn.Module, layer: int, sequences: _Sequences, *, pad_id: int,
                 store: _LayerInputStore | None, prefix_ids: list[int] | None):
        self.model, self.layer, self.sequences, self.pad_id = model, layer, sequences, pad_id
        self.store = store
        self.device = next(model.parameters()).device
        self.prefix_length = len(prefix_ids) if prefix_ids else 0
        self.prefix_cache = None
        if store is not None and prefix_ids:
            with torch.no_grad():
                ids = torch.tensor([prefix_ids], device=self.device)
                output = stack_owner(model)(input_ids=ids, attention_mask=torch.ones_like(ids),
                                            position_ids=torch.arange(ids.shape[1], device=self.device)[None],
                                            use_cache=True)
            self.prefix_cache = output_cache(output)

    def scores(self, indices: Sequence[int], steering: Steering | None, multipliers: torch.Tensor | None, *,
               after_prefix: bool) -> CompletionScores:
        """NLL of each sequence's completion with `steering` attached at `multipliers` (None: unsteered).

        `after_prefix`: the update acts only after the common prefix, so (with the cache) the prefix's
        keys/values are shared and only the tokens after it are run.
        """
        if steering is not None:
            steering.set_multiplier(multipliers)
            steering.attach()
        try:
            if self.store is None:
                batch = self.sequences.batch(indices, pad_id=self.pad_id)
                return completion_nll(self.model, batch["input_ids"].to(self.device),
                                      batch["attention_mask"].to(self.device), batch["labels"].to(self.device))
            if after_prefix and self.prefix_cache is not None:
                return self._scores_after_prefix(indices)
            batch = self.sequences.batch(indices, pad_id=self.pad_id)
            hidden_in = self.store.padded(indices, 0, self.device)
            mask = batch["attention_mask"].to(self.device)
            with layers_from(self.model, self.layer, hidden_in):
                hidden = final_hidden(self.model, batch["input_ids"].to(self.device), mask)
            return completion_nll_from_hidden(self.model, hidden, batch["labels"].to(self.device))
        finally:
            if steering is not None:
                steering.remove()

    def _scores_after_prefix(self, indices: Sequence[int]) -> CompletionScores:
        k = self.prefix_length
        batch = self.sequences.batch(indices, start=k, pad_id=self.pad_id)
        rows = len(indices)
        hidden_in = self.store.padded(indices, k, self.device)
        new_mask = batch["attention_mask"].to(self.device)
        mask = torch.cat([torch.ones((rows, k), dtype=new_mask.dtype, device=self.device), new_mask], dim=1)
        positions = torch.arange(k, k + new_mask.shape[1], device=self.device).expand(rows, -1)
        past = copy.deepcopy(self.prefix_cache)
        past.batch_repeat_interleave(rows)
        with layers_from(self.model, self.layer, hidden_in):
            hidden = final_hidden(self.model, batch["input_ids"].to(self.device), mask, position_ids=positions,
                                  **cache_kwargs(stack_owner(self.model), past))
        return completion_nll_from_hidden(self.model, hidden, batch["labels"].to(self.device))


@torch.no_grad()
def _fill_cache(model: nn.Module, layer: int, sequences: _Sequences, *, pad_id: int,
                store: _LayerInputStore | None, reference: bool, batch_size: int, progress: bool,
                desc: str) -> torch.Tensor | None:
    """One pass over every sequence: store the hidden states entering `layer` and/or return the unsteered
    completion log-probs (summed) when `reference`."""
    if store is None and not reference:
        return None
    device = next(model.parameters()).device
    structure = model_structure(model)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences.ids[i]))  # little padding per batch
    ref_logp = torch.zeros(len(sequences), dtype=torch.float32) if reference else None
    block = structure.layers[layer]
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
        chunk = order[start:start + batch_size]
        batch = sequences.batch(chunk, pad_id=pad_id)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        if reference:  # the whole forward is needed; layer L's input is recorded on the way
            with recording(block, "input") as record:
                hidden = final_hidden(model, ids, mask)
            scores = completion_nll_from_hidden(model, hidden, batch["labels"].to(device))
            ref_logp[chunk] = -scores.nll_sum.cpu()
            layer_input = record.get("value")
        else:
            layer_input = run_until(model, block, ids, mask, capture="input")
        if store is not None:
            for row, i in enumerate(chunk):
                store.put(i, layer_input[row, :len(sequences.ids[i])])
    if store is not None:
        store.finish()
    return ref_logp


def _shared_prefix(sequences: _Sequences, length: int) -> list[int] | None:
    """The template's common prefix (`length` tokens) if every prompt starts with it and goes on after it."""
    if length < 1 or not len(sequences):
        return None
    prompts = [ids[:n] for ids, n in zip(sequences.ids, sequences.prompt_lengths, strict=True)]
    return sequences.ids[0][:length] if common_prefix_length(prompts) >= length else None


# ---------------------------------------------------------------------------------------------- evaluation


def _preference_rows(scorer: _Scorer, steering: Steering, pairs: Sequence[int], multipliers: Sequence[float],
                     batch_size: int) -> list[dict[str, float]]:
    """Per multiplier: mean over pairs of PrefOdds (L̄_n − L̄_p, per-token and summed) and the two NLLs."""
    rows = [(2 * p + side, m) for m in multipliers for p in pairs for side in (0, 1)]
    nll_sum = torch.zeros(len(rows))
    n_tokens = torch.zeros(len(rows))
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            scores = scorer.scores([i for i, _ in chunk], steering, torch.tensor([m for _, m in chunk]),
                                   after_prefix=False)
            nll_sum[start:start + len(chunk)] = scores.nll_sum.float().cpu()
            n_tokens[start:start + len(chunk)] = scores.n_tokens.float().cpu()
    nll_sum = nll_sum.view(len(multipliers), len(pairs), 2)
    nll_mean = nll_sum / n_tokens.view(len(multipliers), len(pairs), 2).clamp(min=1)
    results = []
    for j, m in enumerate(multipliers):
        results.append({
            "multiplier": float(m),
            "preference": float((nll_mean[j, :, 1] - nll_mean[j, :, 0]).mean()),
            "preference_sum": float((nll_sum[j, :, 1] - nll_sum[j, :, 0]).mean()),
            "nll_positive": float(nll_mean[j, :, 0].mean()),
            "nll_negative": float(nll_mean[j, :, 1].mean()),
        })
    return results


def evaluate_preference(model: nn.Module, update: Update, pairs: PairDataset | Sequence[PolarityPair],
                        multipliers: Sequence[float], *, tokenizer: Any = None, encoder: PairEncoder | None = None,
                        batch_size: int = 16) -> list[dict[str, float]]:
    """Preference PrefOdds = L_n − L_p (per-token means, and sums) of `pairs` under `update` at each multiplier,
    applied as at inference (the update's saved positions). Teacher-forced, full forwards."""
    encoder = encoder or _encoder_for(tokenizer, 512)
    sequences = _Sequences(encoder.encode_all(list(pairs)))
    if not len(sequences):
        raise DataError("evaluate_preference: no pairs")
    with eval_mode(update):
        scorer = _Scorer(model, update.layer, sequences, pad_id=encoder.pad_token_id, store=None, prefix_ids=None)
        steering = Steering(model, update, multiplier=0.0)
        return _preference_rows(scorer, steering, range(len(sequences) // 2), multipliers, batch_size)


def _encoder_for(tokenizer: Any, max_length: int, rendering: Rendering | str | None = None) -> PairEncoder:
    if tokenizer is None:
        raise ConfigError("pass tokenizer= or encoder=")
    return PairEncoder(tokenizer, rendering, max_length=max_length)


# ---------------------------------------------------------------------------------------------- DiffMean


DIFFMEAN_TOKENS = ("answer", "completion")


@torch.no_grad()
def diffmean_update(model: nn.Module, tokenizer: Any, pairs: PairDataset | Sequence[PolarityPair], layer: int, *,
                    insertion: str = "block_output", encoder: PairEncoder | None = None,
                    rendering: Rendering | str | None = None, tokens: str = "answer", max_length: int = 512,
                    batch_size: int = 16, progress: bool = False, name: str = "") -> Update:
    """DiffMean (CAA): per pair, the mean layer-L output over the answer tokens of q+A_p minus the same for
    q+A_n, averaged over pairs; a vector update (positions "all").

    `tokens="answer"` is the paper's and CAA's definition; `"completion"` also averages over the rendering's
    end-of-turn suffix (what reusing the SPLIT encoder gives). For `insertion="down_proj"` the output of
    the layer's down-projection is averaged instead of the block output."""
    if insertion not in INSERTIONS:
        raise ConfigError(f"insertion: {insertion!r} is not one of {INSERTIONS}")
    if tokens not in DIFFMEAN_TOKENS:
        raise ConfigError(f"tokens: {tokens!r} is not one of {DIFFMEAN_TOKENS}")
    encoder = encoder or _encoder_for(tokenizer, max_length, rendering)
    pair_list = list(pairs)
    encoded = encoder.encode_all(pair_list)
    if not encoded:
        raise DataError("diffmean_update: no pairs")
    structure = model_structure(model)
    check_layer_index(layer, structure.num_layers)
    target = structure.layer(layer) if insertion == "block_output" else structure.down_proj(layer)
    device = next(model.parameters()).device
    side_means = {}
    for side in ("positive", "negative"):
        means = []
        for start in tqdm(range(0, len(encoded), batch_size), desc=f"diffmean {side}", disable=not progress,
                          leave=False):
            batch = collate_pairs(encoded[start:start + batch_size], side, pad_token_id=encoder.pad_token_id)
            out = run_until(model, target, batch.input_ids.to(device), batch.attention_mask.to(device)).float()
            out = out.view(batch.input_ids.shape[0], batch.input_ids.shape[1], -1)
            mask = batch.answer_mask if tokens == "answer" else batch.completion_mask
            weights = mask.to(device).float().unsqueeze(-1)
            means.append((out * weights).sum(1) / weights.sum(1).clamp(min=1))
        side_means[side] = torch.cat(means)
    vector = (side_means["positive"] - side_means["negative"]).mean(0)
    update = create_update(model, "vector", layer, insertion=insertion, positions="all",
                           name=name or f"diffmean-vector-L{layer}", seed=0)
    update.vector.data.copy_(vector.to(update.vector.device))
    dataset = pairs if isinstance(pairs, PairDataset) else PairDataset(pair_list)
    update.spec.training = {"objective": "diffmean", "form": "vector", "layer": layer, "data": dataset.provenance(),
                            "tokens": tokens, "encoder": encoder.describe(), "vector_norm": float(vector.norm())}
    update.eval()
    return update


# ---------------------------------------------------------------------------------------------- trainer


def train_update(model: nn.Module, tokenizer: Any, train: PairDataset, config: TrainConfig, *, out_dir: str | Path,
                 dev: PairDataset | None = None, resume: bool = False, progress: bool = True, overwrite: bool = False,
                 split_record: dict[str, Any] | None = None, encoder: PairEncoder | None = None,
                 callback: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train an update on `train` with `config`; write metrics, checkpoints and the final update to `out_dir`.

    `out_dir/update` (the engine's format, `spec.training` = the summary), `out_dir/metrics.jsonl` (one line
    per optimizer step, written as training goes), `out_dir/checkpoint/` (every `checkpoint_every` steps
    and at epoch ends; removed once the update is saved), `out_dir/summary.json`. `resume=True` continues
    from the checkpoint and ends with the same parameters as an uninterrupted run. An existing final update
    is never replaced unless `overwrite=True`. `callback` gets every step's metrics.
    """
    trainer = _Trainer(model, tokenizer, train, config, out_dir=Path(out_dir), dev=dev, resume=resume,
                       progress=progress, overwrite=overwrite, split_record=split_record, encoder=encoder,
                       callback=callback)
    return trainer.run()


class _Trainer:
    def __init__(self, model, tokenizer, train, config, *, out_dir, dev, resume, progress, overwrite, split_record,
                 encoder, callback):
        structure = model_structure(model)
        self.model, self.train_data, self.dev_data = model, train, dev
        self.config = config.resolved(structure.num_layers)
        self.out_dir, self.resume, self.progress, self.overwrite = out_dir, resume, progress, overwrite
        self.split_record, self.callback = split_record, callback
        self.encoder = encoder or _encoder_for(tokenizer, self.config.max_length, self.config.rendering)
        self.device = next(model.parameters()).device
        self.paths = {"update": out_dir / UPDATE_FOLDER, "checkpoint": out_dir / CHECKPOINT_FILE,
                      "metrics": out_dir / METRICS_FILE, "summary": out_dir / SUMMARY_FILE}
        if not isinstance(train, PairDataset):
            raise DataError(f"train: expected a PairDataset, got {type(train).__name__}")
        if not len(train):
            raise DataError(f"{train.name}: no training pairs")

    # -- output folder -------------------------------------------------------------------------------------
    def _check_out_dir(self) -> None:
        if self.paths["update"].exists() and not self.overwrite:
            raise TrainingError(f"{self.paths['update']} already exists (a finished run); pass overwrite=True "
                                "(CLI: --overwrite) to train again into this folder, or choose another out_dir")
        legacy = self.out_dir / LEGACY_PICKLE
        previous = [p for p in (self.paths["checkpoint"], self.paths["metrics"], legacy) if p.exists()]
        if self.resume:
            if not self.paths["checkpoint"].exists():
                if legacy.exists():
                    load_checkpoint(self.paths["checkpoint"])  # raises the explanation
                raise TrainingError(f"resume: no checkpoint at {self.paths['checkpoint']}")
        elif previous:
            if not self.overwrite:
                raise TrainingError(f"{self.out_dir} holds a previous run ({', '.join(p.name for p in previous)}); "
                                    "pass resume=True to continue it or overwrite=True to start over")
            for path in previous:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        self.out_dir.mkdir(parents=True, exist_ok=True)

    # -- data and caches -----------------------------------------------------------------------------------
    def _prepare(self, cache_dir: Path) -> None:
        cfg = self.config
        encoded = self.encoder.encode_all(self.train_data.pairs)
        self.sequences = _Sequences(encoded)
        self.n_pairs = len(encoded)
        self.truncated = sum(p.truncated for p in encoded)
        self.reference = OBJECTIVES[cfg.objective].needs_reference
        self.after_prefix = cfg.train_positions == "after_prefix"
        k = self.encoder.common_prefix_length
        self.train_positions = Positions("from", k) if self.after_prefix else Positions("all")
        store = self._store(self.sequences, cache_dir / "train")
        self.ref_logp = _fill_cache(self.model, cfg.layer, self.sequences, pad_id=self.encoder.pad_token_id,
                                    store=store, reference=self.reference, batch_size=cfg.cache_batch_size,
                                    progress=self.progress, desc=f"caching layer-{cfg.layer} inputs")
        prefix = _shared_prefix(self.sequences, k) if (self.after_prefix and store is not None) else None
        self.scorer = _Scorer(self.model, cfg.layer, self.sequences, pad_id=self.encoder.pad_token_id, store=store,
                              prefix_ids=prefix)
        self.cache_record = {"enabled": store is not None, "storage": None if store is None else
                             ("disk" if store.on_disk else "memory"),
                             "bytes": 0 if store is None else store.nbytes, "shared_prefix_tokens": len(prefix or [])}
        log.info("training cache: %s", self.cache_record)
        # Evaluation: the first `eval_pairs` dev pairs, else as many training pairs (already cached).
        if self.dev_data is not None and len(self.dev_data) and cfg.eval_pairs:
            dev_sequences = _Sequences(self.encoder.encode_all(self.dev_data.pairs[:cfg.eval_pairs]))
            dev_store = self._store(dev_sequences, cache_dir / "dev")
            _fill_cache(self.model, cfg.layer, dev_sequences, pad_id=self.encoder.pad_token_id, store=dev_store,
                        reference=False, batch_size=cfg.cache_batch_size, progress=self.progress,
                        desc="caching dev inputs")
            self.eval_scorer = _Scorer(self.model, cfg.layer, dev_sequences, pad_id=self.encoder.pad_token_id,
                                       store=dev_store, prefix_ids=None)
            self.eval_pairs = list(range(len(dev_sequences) // 2))
            self.eval_name = f"{self.dev_data.name} (first {len(self.eval_pairs)} pairs)"
        else:
            self.eval_scorer = self.scorer
            self.eval_pairs = list(range(min(cfg.eval_pairs, self.n_pairs)))
            self.eval_name = f"{self.train_data.name} (first {len(self.eval_pairs)} training pairs)"

    def _store(self, sequences: _Sequences, disk_dir: Path) -> _LayerInputStore | None:
        if not self.config.prefix_cache:
            return None
        structure = model_structure(self.model)
        dtype = next(self.model.parameters()).dtype
        return _LayerInputStore([len(ids) for ids in sequences.ids], structure.hidden_size, dtype,
                                memory_limit_bytes=self.config.cache_memory_mb * 2**20, disk_dir=disk_dir)

    def _create_update(self) -> None:
        cfg = self.config
        self.update = create_update(self.model, cfg.form, cfg.layer, insertion=cfg.insertion, rank=cfg.rank,
                                    dropout=cfg.dropout, positions="all", seed=cfg.seed,
                                    name=f"{cfg.objective}-{cfg.form}-L{cfg.layer}")
        self.projecting = cfg.objective == "reps" and cfg.form == "vector"
        self.applied: Update = ProjectingVector(self.update) if self.projecting else self.update
        self.train_steering = Steering(self.model, self.applied, multiplier=0.0, positions=self.train_positions)
        self.eval_steering = Steering(self.model, self.update, multiplier=0.0, positions="all")
        params = [p for p in self.update.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.batches_per_epoch = math.ceil(self.n_pairs / cfg.batch_size)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.grad_accum)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        total, warmup = self.total_steps, cfg.warmup_steps

        def schedule(step: int) -> float:  # transformers' "linear" schedule
            if step < warmup:
                return step / max(1, warmup)
            return max(0.0, (total - step) / max(1, total - warmup))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)

    # -- examples ------------------------------------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.config.seed * 1000 + epoch)
        return torch.randperm(self.n_pairs, generator=generator).tolist()

    def _examples(self, pairs: Sequence[int]) -> list[_Example]:
        cfg, rng = self.config, self.factor_rng
        examples = []
        for pair in pairs:
            for kind in cfg.pair_types:
                direction = (1 if kind == "add" else -1) if kind != "random" else rng.choice((1, -1))
                win = rng.choice(cfg.factors)
                lose = win if cfg.share_factor else rng.choice(cfg.factors)
                project = self.projecting and direction < 0
                examples.append(_Example(pair, direction, direction * win, direction * lose, project))
        return examples

    def _batch_loss(self, examples: list[_Example]) -> list[LossTerms]:
        """One forward over every sequence of the batch (winning then losing rows); a loss per minibatch."""
        sequences = [e.win_sequence for e in examples] + [e.lose_sequence for e in examples]
        multipliers = torch.tensor([e.win_multiplier for e in examples] + [e.lose_multiplier for e in examples],
                                   dtype=torch.float32)
        if self.projecting:
            self.applied.project_rows = torch.tensor([e.project for e in examples] * 2)
        scores = self.scorer.scores(sequences, self.train_steering, multipliers, after_prefix=self.after_prefix)
        n = len(examples)
        terms = []
        for start in range(0, n, self.config.batch_size):
            win_rows = list(range(start, min(start + self.config.batch_size, n)))
            lose_rows = [n + r for r in win_rows]
            terms.append(self._objective(scores, win_rows, lose_rows, [sequences[r] for r in win_rows],
                                         [sequences[r] for r in lose_rows]))
        return terms

    def _objective(self, scores: CompletionScores, win_rows: list[int], lose_rows: list[int],
                   win_sequences: list[int], lose_sequences: list[int]) -> LossTerms:
        objective = OBJECTIVES[self.config.objective]
        device = scores.nll_sum.device
        inputs = ObjectiveInputs(CompletionScores(scores.nll_sum[win_rows], scores.n_tokens[win_rows]),
                                 CompletionScores(scores.nll_sum[lose_rows], scores.n_tokens[lose_rows]))
        if objective.needs_reference:
            inputs.ref_win = self.ref_logp[win_sequences].to(device)
            inputs.ref_lose = self.ref_logp[lose_sequences].to(device)
            inputs.win_sequence_lengths = torch.tensor([float(len(self.sequences.ids[s])) for s in win_sequences],
                                                       device=device)
            inputs.lose_sequence_lengths = torch.tensor([float(len(self.sequences.ids[s])) for s in lose_sequences],
                                                        device=device)
        return objective.loss(inputs, self.config)

    # -- evaluation ----------------------------------------------------------------------------------------
    def _evaluate(self, unsteered: dict[str, float] | None = None) -> list[dict[str, float]] | None:
        """Preference and NLLs at −m, 0, +m; the m = 0 row (the frozen base model) is reused when given."""
        if not self.eval_pairs:
            return None
        m = self.config.eval_multiplier
        with eval_mode(self.update):
            multipliers = [-m, m] if unsteered is not None else [-m, 0.0, m]
            rows = _preference_rows(self.eval_scorer, self.eval_steering, self.eval_pairs, multipliers,
                                    self.config.cache_batch_size)
        return rows if unsteered is None else [rows[0], unsteered, rows[1]]

    # -- checkpoints ---------------------------------------------------------------------------------------
    def _save_checkpoint(self, step: int, epoch: int, next_group: int) -> None:
        tensors = {f"update.{k}": v for k, v in self.update.state_dict().items()}
        optimizer_tensors, optimizer_record = optimizer_to_parts(self.optimizer)
        tensors.update(optimizer_tensors)
        tensors["rng.torch"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        version, internal, gauss = self.factor_rng.getstate()
        state = {
            "step": step, "epoch": epoch, "next_group": next_group, "optimizer": optimizer_record,
            "scheduler": self.scheduler.state_dict(), "factor_rng": [version, list(internal), gauss],
            "config": to_dict(self.config), "data_hash": self.data_hash, "elapsed_s": self._elapsed(),
            "eval_before": self.eval_before,
        }
        save_checkpoint(self.paths["checkpoint"], tensors, json.loads(json.dumps(state, default=_jsonable)))

    def _load_checkpoint(self) -> tuple[int, int, int]:
        path = self.paths["checkpoint"]
        try:
            tensors, state = load_checkpoint(path)
        except UnisteerError as exc:
            raise TrainingError(str(exc)) from exc
        saved = state.get("config", {})
        current = json.loads(json.dumps(to_dict(self.config), default=_jsonable))
        changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k)
                         and k not in ("checkpoint_every",))
        if changed:
            raise TrainingError(f"{path}: the checkpoint was written with a different config ({', '.join(changed)} "
                                "differ); resume with the same config or start over with overwrite=True")
        if state.get("data_hash") != self.data_hash:
            raise TrainingError(f"{path}: the checkpoint was trained on different data (hash "
                                f"{state.get('data_hash')!r}, now {self.data_hash!r})")
        self.update.load_state_dict({k.removeprefix("update."): v for k, v in tensors.items()
                                     if k.startswith("update.")})
        optimizer_from_parts(self.optimizer, tensors, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        version, internal, gauss = state["factor_rng"]
        self.factor_rng.setstate((version, tuple(internal), gauss))
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        self.eval_before = state.get("eval_before")
        step = int(state["step"])
        self._truncate_metrics(step)
        return step, int(state["epoch"]), int(state["next_group"])

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines written after the checkpoint (they will be written again)."""
        path = self.paths["metrics"]
        if not path.exists():
            return
        kept = []
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get("step", 0) <= step:
                kept.append(line)
        write_text(path, "".join(line + "\n" for line in kept))

    def _elapsed(self) -> float:
        return self.elapsed_before + (time.perf_counter() - self.started)

    def _log(self, record: dict[str, Any]) -> None:
        with open(self.paths["metrics"], "a") as fh:
            fh.write(json.dumps(record) + "\n")

    # -- the loop ------------------------------------------------------------------------------------------
    def setup(self, cache_dir: Path) -> None:
        """Seeded state, encoded data, caches, the fresh update, optimizer and schedule (under a forked RNG)."""
        torch.manual_seed(self.config.seed)
        self.started, self.elapsed_before = time.perf_counter(), 0.0
        self._prepare(cache_dir)
        self._create_update()
        self.factor_rng = random.Random(self.config.seed)
        self.eval_before = None

    def epoch_groups(self, epoch: int) -> list[list[list[int]]]:
        """The epoch's optimizer steps: `grad_accum` batches of `batch_size` pair indices each."""
        cfg = self.config
        order = self._epoch_order(epoch)
        batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        return [batches[i:i + cfg.grad_accum] for i in range(0, len(batches), cfg.grad_accum)]

    def run(self) -> TrainResult:
        self._check_out_dir()
        self.data_hash = self.train_data.hash()
        devices = [self.device] if self.device.type == "cuda" else []
        for stale in self.out_dir.glob(f"{LAYER_CACHE_PREFIX}*"):  # left by a run that was killed
            shutil.rmtree(stale, ignore_errors=True)
        cache_dir = Path(tempfile.mkdtemp(prefix=LAYER_CACHE_PREFIX, dir=self.out_dir))
        try:
            with torch.random.fork_rng(devices=devices):
                self.setup(cache_dir)
                start = (0, 0, 0)
                if self.resume:
                    start = self._load_checkpoint()
                if self.eval_before is None:
                    self.eval_before = self._evaluate()
                metrics = self._loop(*start)
                eval_after = self._evaluate(self.eval_before[1] if self.eval_before else None)
                return self._finish(metrics, eval_after)
        finally:
            shutil.rmtree(cache_dir, ignore_errors=True)

    def _loop(self, step: int, start_epoch: int, start_group: int) -> list[dict[str, Any]]:
        cfg = self.config
        metrics: list[dict[str, Any]] = []
        self.update.train()
        bar = tqdm(total=self.total_steps, initial=step, disable=not self.progress,
                   desc=f"{cfg.objective}-{cfg.form} L{cfg.layer}")
        try:
            for epoch in range(start_epoch, cfg.epochs):
                groups = self.epoch_groups(epoch)
                for group_index in range(start_group if epoch == start_epoch else 0, len(groups)):
                    record = self.step(groups[group_index], step, epoch)
                    step += 1
                    metrics.append(record)
                    self._log(record)
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", margin=f"{record['margin']:+.3f}",
                                    win=f"{record['win_nll']:.3f}", lose=f"{record['lose_nll']:.3f}")
                    last_of_epoch = group_index == len(groups) - 1
                    if step % cfg.checkpoint_every == 0 or last_of_epoch:
                        next_epoch, next_group = (epoch + 1, 0) if last_of_epoch else (epoch, group_index + 1)
                        self._save_checkpoint(step, next_epoch, next_group)
                    if self.callback is not None:
                        self.callback(record)
        finally:
            bar.close()
        self.update.eval()
        return metrics

    def step(self, group: list[list[int]], step: int, epoch: int) -> dict[str, Any]:
        """One optimizer step over `group` (its batches' gradients accumulated); returns the step's metrics."""
        cfg = self.config
        examples = [self._examples(batch) for batch in group]
        n_minibatches = sum(math.ceil(len(e) / cfg.batch_size) for e in examples)
        lr = self.optimizer.param_groups[0]["lr"]
        collected: list[LossTerms] = []
        for batch_examples in examples:
            terms = self._batch_loss(batch_examples)
            loss = torch.stack([t.loss for t in terms]).sum() / n_minibatches
            if not torch.isfinite(loss):
                self._diverged(step, epoch, f"loss is {float(loss.detach())}")
            loss.backward()
            collected += terms
        params = [p for p in self.update.parameters() if p.requires_grad]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        if not math.isfinite(grad_norm):
            self._diverged(step, epoch, f"gradient norm is {grad_norm}")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

        def mean(values: list[torch.Tensor]) -> float:
            return float(torch.stack(values).float().mean())

        record = {"kind": "step", "step": step + 1, "epoch": epoch, "lr": lr, "grad_norm": grad_norm,
                  "loss": mean([t.loss.detach() for t in collected]),
                  "win_nll": mean([t.win_nll for t in collected]), "lose_nll": mean([t.lose_nll for t in collected]),
                  "margin": mean([t.margin for t in collected]), "time_s": round(self._elapsed(), 3)}
        for key in collected[0].extra:
            record[key] = mean([t.extra[key] for t in collected])
        return record

    def _diverged(self, step: int, epoch: int, what: str) -> None:
        checkpoint = self.paths["checkpoint"]
        where = f"the checkpoint {checkpoint} holds the last good state" if checkpoint.exists() else "no checkpoint"
        raise TrainingError(f"training stopped at step {step + 1} (epoch {epoch}): {what}; {where}. Lower lr "
                            f"(now {self.config.lr}) or the factor range, or check the data.")

    def _finish(self, metrics: list[dict[str, Any]], eval_after: list[dict[str, float]] | None) -> TrainResult:
        cfg = self.config
        all_metrics = [json.loads(line) for line in self.paths["metrics"].read_text().splitlines()]
        steps = [r for r in all_metrics if r.get("kind") == "step"]
        last_epoch = [r for r in steps if r["epoch"] == cfg.epochs - 1] or steps
        keys = ("loss", "win_nll", "lose_nll", "margin")
        final = {k: sum(r[k] for r in last_epoch) / len(last_epoch) for k in keys} if last_epoch else {}
        summary = {
            "objective": cfg.objective, "form": cfg.form, "layer": cfg.layer, "config": to_dict(cfg),
            "data": {**self.train_data.provenance(), "truncated_pairs": self.truncated},
            "split": self.split_record, "encoder": self.encoder.describe(),
            "train_positions": str(self.train_positions), "steps": len(steps), "epochs": cfg.epochs,
            "time_s": round(self._elapsed(), 2), "final": final, "last_step": steps[-1] if steps else None,
            "eval": {"set": self.eval_name, "pairs": len(self.eval_pairs), "before": self.eval_before,
                     "after": eval_after},
            "cache": self.cache_record, "model_dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
        }
        self.update.spec.training = summary
        self.update.spec.positions = "all"
        path = save_update(self.update, self.paths["update"], overwrite=self.overwrite)
        write_json(self.paths["summary"], summary)
        shutil.rmtree(self.paths["checkpoint"], ignore_errors=True)
        self.update.eval()
        return TrainResult(self.update, path, summary, steps)
