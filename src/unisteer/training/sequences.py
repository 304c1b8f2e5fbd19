"""The frozen-prefix cache of a training run and the scorer built on it.

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
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.batches import IGNORE_INDEX, common_prefix_length
from ..data.pairs import PairDataset, PolarityPair
from ..data.rendering import EncodedPair, PairEncoder, Rendering
from ..engine.architecture import model_structure
from ..engine.devices import input_device
from ..engine.hf_compat import cache_kwargs, output_cache, repeat_rows
from ..engine.prefix import layers_from, recording, run_until
from ..engine.scoring import (
    CompletionScores,
    completion_nll,
    completion_nll_from_hidden,
    final_hidden,
    stack_owner,
)
from ..engine.steering import Steering
from ..engine.updates import Positions, Update, eval_mode
from ..errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingExample:
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
        self.device = input_device(model)
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
        repeat_rows(past, rows)
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
    device = input_device(model)
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


def preference_rows(scorer: _Scorer, steering: Steering, pairs: Sequence[int], multipliers: Sequence[float],
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
    encoder = encoder or encoder_for(tokenizer, 512)
    sequences = _Sequences(encoder.encode_all(list(pairs)))
    if not len(sequences):
        raise DataError("evaluate_preference: no pairs")
    with eval_mode(update):
        scorer = _Scorer(model, update.layer, sequences, pad_id=encoder.pad_token_id, store=None, prefix_ids=None)
        steering = Steering(model, update, multiplier=0.0)
        return preference_rows(scorer, steering, range(len(sequences) // 2), multipliers, batch_size)


def encoder_for(tokenizer: Any, max_length: int, rendering: Rendering | str | None = None) -> PairEncoder:
    if tokenizer is None:
        raise ConfigError("pass tokenizer= or encoder=")
    return PairEncoder(tokenizer, rendering, max_length=max_length)


@dataclass
class TrainingData:
    """A run's encoded pairs with their caches and scorers (training and evaluation), ready to step."""

    sequences: _Sequences
    scorer: _Scorer
    eval_scorer: _Scorer
    eval_pairs: list[int]
    eval_name: str
    ref_logp: torch.Tensor | None
    cache_record: dict[str, Any]
    train_positions: Positions
    after_prefix: bool
    n_pairs: int
    truncated: int


def prepare_training_data(model: nn.Module, encoder: PairEncoder, train: PairDataset, dev: PairDataset | None,
                          config: Any, cache_dir: Path, *, progress: bool) -> TrainingData:
    """Encode the pairs, fill the frozen-prefix cache (and the reference log-probs where the objective needs
    them), and build the scorers; evaluation uses the first `eval_pairs` dev pairs, else as many train pairs."""
    from .objectives import OBJECTIVES

    cfg = config
    encoded = encoder.encode_all(train.pairs)
    sequences = _Sequences(encoded)
    reference = OBJECTIVES[cfg.objective].needs_reference
    after_prefix = cfg.train_positions == "after_prefix"
    k = encoder.common_prefix_length
    store = _store_for(model, sequences, cfg, cache_dir / "train")
    ref_logp = _fill_cache(model, cfg.layer, sequences, pad_id=encoder.pad_token_id, store=store, reference=reference,
                           batch_size=cfg.cache_batch_size, progress=progress, desc=f"caching layer-{cfg.layer} inputs")
    prefix = _shared_prefix(sequences, k) if (after_prefix and store is not None) else None
    scorer = _Scorer(model, cfg.layer, sequences, pad_id=encoder.pad_token_id, store=store, prefix_ids=prefix)
    cache_record = {"enabled": store is not None, "storage": None if store is None else
                    ("disk" if store.on_disk else "memory"),
                    "bytes": 0 if store is None else store.nbytes, "shared_prefix_tokens": len(prefix or [])}
    log.info("training cache: %s", cache_record)
    if dev is not None and len(dev) and cfg.eval_pairs:
        dev_sequences = _Sequences(encoder.encode_all(dev.pairs[:cfg.eval_pairs]))
        dev_store = _store_for(model, dev_sequences, cfg, cache_dir / "dev")
        _fill_cache(model, cfg.layer, dev_sequences, pad_id=encoder.pad_token_id, store=dev_store, reference=False,
                    batch_size=cfg.cache_batch_size, progress=progress, desc="caching dev inputs")
        eval_scorer = _Scorer(model, cfg.layer, dev_sequences, pad_id=encoder.pad_token_id, store=dev_store,
                              prefix_ids=None)
        eval_pairs = list(range(len(dev_sequences) // 2))
        eval_name = f"{dev.name} (first {len(eval_pairs)} pairs)"
    else:
        eval_scorer = scorer
        eval_pairs = list(range(min(cfg.eval_pairs, len(encoded))))
        eval_name = f"{train.name} (first {len(eval_pairs)} training pairs)"
    return TrainingData(sequences, scorer, eval_scorer, eval_pairs, eval_name, ref_logp, cache_record,
                        Positions("from", k) if after_prefix else Positions("all"), after_prefix, len(encoded),
                        sum(p.truncated for p in encoded))


def _store_for(model: nn.Module, sequences: _Sequences, config: Any, disk_dir: Path) -> _LayerInputStore | None:
    if not config.prefix_cache:
        return None
    structure = model_structure(model)
    dtype = next(model.parameters()).dtype
    return _LayerInputStore([len(ids) for ids in sequences.ids], structure.hidden_size, dtype,
                            memory_limit_bytes=config.cache_memory_mb * 2**20, disk_dir=disk_dir)
