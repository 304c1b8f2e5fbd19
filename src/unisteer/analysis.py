"""Preference–utility sweeps over the multiplier m (SPEC §3–4): scoring, incremental files, fits.

For every update, split and multiplier m the sweep scores each pair's positive and negative completion
(`L_p`, `L_n`: teacher-forced completion NLL with the update active at m, sums and token counts), and can
measure how far the steered hidden states at later layers fall from the unsteered ones (`unisteer.manifold`).
`fit_sweep` turns the stored numbers into log-odds curves per m (mean, standard error, bootstrap CI, clamped
counts), validity-decay fits (fitted on one split, scored on every split) and manifold correlations;
`unisteer.report.write_report` draws and writes the report.

    config = SweepConfig(grid=None)          # default grid per form (`default_grid`)
    run_sweep(model, tokenizer, {"diffmean": u1, "split-lora": u2}, {"train": tr, "test": te}, config, "out/")
    fit_sweep("out/")
    write_report("out/")

How the scoring is fast — every step exact (tests compare it with one plain forward per example, polarity
and multiplier):

1. **Base pass**, once per split and chunk of examples, shared by every update: the unsteered model runs the
   prompts (left-padded) with a KV cache, then both completions (rows interleaved positive/negative,
   right-padded) on that cache, so a prompt is encoded once for both polarities. It records the hidden
   states entering each update's layer L, the m = 0 scores (the plain model) and, for the manifold, the
   unsteered hidden states at the measured layers.
2. **Steered passes**: rows (example × multiplier) in batches, each row with its own multiplier
   (`Steering(model, update, multiplier=tensor[rows])`). Only layers ≥ L run (`prefix.layers_from`, fed the
   recorded layer-L inputs): the prompt once per row, filling the KV cache of layers ≥ L, then both
   completions on that cache. Layers < L never run again. Their keys and values are never read (every
   later layer is ≥ L), but transformers sizes attention masks — and `Steering` counts positions — from
   the first layers' cache, so those entries get placeholders of the prompt's length.

Files (resumable: rows already on disk are skipped; a changed model, dataset, update or manifold setting is
refused rather than mixed in):

    out_dir/sweep.json                      settings, updates (with fingerprints), grids, split records
    out_dir/scores/<update>/<split>.jsonl   one row per (example, m): L_p, L_n, T_p, T_n, manifold metrics
    out_dir/manifold_reference.json         per split and layer: rank, explained variance, scales
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .architecture import model_structure, text_config
from .config import from_dict, to_dict
from .data import (
    IGNORE_INDEX,
    EncodedPair,
    PaddingSide,
    PairDataset,
    PairEncoder,
    TokenBatch,
    collate_completions,
    common_prefix_length,
)
from .errors import ConfigError, DataError, UnisteerError
from .files import read_json, write_csv, write_json
from .fingerprint import update_fingerprint
from .fitting import DecayFit, FitError, fit_preference, fit_utility, score
from .hf_compat import cache_kwargs, fill_layers, new_cache
from .hooks import Steering
from .logodds import VARIANTS, AggregatedCurve, aggregate_per_multiplier, compute_log_odds, paired_change
from .manifold import METRICS, ManifoldReference, build_reference, correlate
from .prefix import layers_from
from .scoring import completion_nll, completion_nll_from_hidden, stack_owner
from .updates import Positions, Update, check_multipliers, default_grid, eval_mode

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SWEEP_FILE = "sweep.json"
SCORES_DIR = "scores"
REFERENCE_FILE = "manifold_reference.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
# Settings whose change makes stored rows incomparable with new ones (checked when a sweep resumes).
_MANIFOLD_KEYS = ("manifold", "manifold_layers", "manifold_variance", "manifold_max_examples")


# ---------------------------------------------------------------------------------------------- config


@dataclass
class SweepConfig:
    """How to sweep, aggregate and fit (build from a dict with `SweepConfig.from_dict`, unknown keys rejected).

    grid: multipliers for every update (None: `default_grid` of each update's form); grids: per-update-name
    overrides. batch_rows: prompt rows (example × multiplier) per forward (the completion pass has twice as
    many). chunk_examples: examples per incremental write. variant: the log-odds variant the report shows
    ("sum" is SPEC §3's exact definition, "mean" the per-token variant; both are always computed). fit_split:
    the split the curves are fitted on (the others are scored with that fit). positions: override of every
    update's positions ("all", "prompt", "generated", "from:K"; None: each update's own). manifold_layers:
    decoder layers whose outputs are measured (None: L+1, the midpoint to the last layer, and the last).
    """

    grid: list[float] | None = None
    grids: dict[str, list[float]] = field(default_factory=dict)
    batch_rows: int = 64
    chunk_examples: int = 32
    variant: str = "sum"
    eps: float = 1e-6
    n_boot: int = 1000
    ci_level: float = 0.95
    seed: int = 0
    fit_split: str = "train"
    positions: str | None = None
    max_length: int = 512
    manifold: bool = True
    manifold_layers: list[int] | None = None
    manifold_variance: float = 0.9
    manifold_max_examples: int = 500
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("batch_rows", "chunk_examples", "n_boot", "max_length", "manifold_max_examples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"sweep.{name}: expected a positive integer, got {value!r}")
        if self.manifold_max_examples < 2:
            raise ConfigError("sweep.manifold_max_examples: the reference needs at least 2 examples")
        if self.variant not in VARIANTS:
            raise ConfigError(f"sweep.variant: {self.variant!r} is not one of {VARIANTS}")
        if not 0.0 < self.eps < 1.0:
            raise ConfigError(f"sweep.eps: expected a value in (0, 1), got {self.eps!r}")
        if not 0.0 < self.ci_level < 1.0:
            raise ConfigError(f"sweep.ci_level: expected a value in (0, 1), got {self.ci_level!r}")
        if not 0.0 < self.manifold_variance < 1.0:
            raise ConfigError(f"sweep.manifold_variance: expected a value in (0, 1), got {self.manifold_variance!r}")
        if self.positions is not None:
            Positions.parse(self.positions)
        if self.grid is not None:
            self.grid = check_multipliers(self.grid, "sweep.grid", sort=True)
        self.grids = {name: check_multipliers(values, f"sweep.grids.{name}", sort=True) for name, values in self.grids.items()}
        if self.manifold_layers is not None:
            if not self.manifold_layers or any(isinstance(v, bool) or not isinstance(v, int) or v < 0
                                               for v in self.manifold_layers):
                raise ConfigError(f"sweep.manifold_layers: expected non-negative layer indices, got "
                                  f"{self.manifold_layers!r}")
            self.manifold_layers = sorted(set(self.manifold_layers))

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "sweep") -> SweepConfig:
        return from_dict(cls, data, where=where)


def grid_for(name: str, update: Update, config: SweepConfig) -> list[float]:
    """The multipliers swept for update `name`: its override, else the common grid, else the form's default."""
    if name in config.grids:
        return list(config.grids[name])
    if config.grid is not None:
        return list(config.grid)
    return default_grid(update.spec.form)


def manifold_layers_for(num_layers: int, update_layers: Sequence[int], config: SweepConfig) -> list[int]:
    """Decoder layers whose outputs are measured (empty when the manifold measurement is off)."""
    if not config.manifold:
        return []
    if config.manifold_layers is not None:
        bad = [v for v in config.manifold_layers if v >= num_layers]
        if bad:
            raise ConfigError(f"sweep.manifold_layers: {bad} out of range; the model has layers 0..{num_layers - 1}")
        return list(config.manifold_layers)
    top = max(update_layers)
    first = min(top + 1, num_layers - 1)
    return sorted({first, (first + num_layers - 1) // 2, num_layers - 1})


# ---------------------------------------------------------------------------------------------- scores


@dataclass(frozen=True)
class PairScore:
    """One example at one multiplier: summed completion NLLs and token counts of both polarities."""

    example: int
    m: float
    L_p: float
    L_n: float
    T_p: int
    T_n: int
    manifold: dict[str, dict[str, float]] = field(default_factory=dict)  # layer → metric → value

    def to_json(self) -> dict[str, Any]:
        row = {"example": self.example, "m": self.m, "L_p": self.L_p, "L_n": self.L_n, "T_p": self.T_p,
               "T_n": self.T_n}
        if self.manifold:
            row["manifold"] = self.manifold
        return row


@dataclass
class _Chunk:
    """Examples scored together.

    Every prompt of the chunk starts with the same `prefix_ids` (for chat data: the template head and any
    instruction the prompts share); the rest of each prompt (`suffix`, right-padded) and the two completions
    (`completions`, rows interleaved positive/negative, right-padded) follow it. Positions are absolute, so
    padding between the parts is masked and changes nothing.
    """

    examples: list[int]
    prefix_ids: torch.Tensor  # [K] shared by every prompt of the chunk (K may be 0)
    suffix: TokenBatch  # E rows: prompt tokens after the prefix, positions K…
    completions: TokenBatch  # 2E rows: positive of example e at 2e, negative at 2e + 1
    prompt_lengths: torch.Tensor  # [E] real prompt tokens (K + suffix length)
    inputs: dict[int, _LayerInputs] = field(default_factory=dict)


@dataclass
class _LayerInputs:
    """Hidden states entering layer L: the shared prefix once, each suffix, each completion."""

    prefix: torch.Tensor  # [1, K, d]
    suffix: torch.Tensor  # [E, S, d]
    completions: torch.Tensor  # [2E, C, d]


@dataclass
class _Rows:
    """Rows of one forward: `groups` distinct multipliers; row r uses multiplier `groups[row_group[r]]`."""

    prefix_ids: torch.Tensor  # [K]
    suffix: TokenBatch  # [R]
    completions: TokenBatch  # [2R]
    prompt_lengths: torch.Tensor  # [R]
    row_group: torch.Tensor  # [R] index into groups
    groups: torch.Tensor  # [G] multipliers
    inputs: _LayerInputs | None = None  # for passes that start at layer L


@dataclass
class _PassResult:
    nll_sum: torch.Tensor  # [2R] interleaved positive/negative
    n_tokens: torch.Tensor  # [2R]
    inputs: dict[int, _LayerInputs]
    points: dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer → (points [n, d], row of each point)

    def scores(self, examples: Sequence[int], multipliers: Sequence[float]) -> list[PairScore]:
        nll = self.nll_sum.tolist()
        counts = self.n_tokens.tolist()
        return [PairScore(int(e), float(m), nll[2 * r], nll[2 * r + 1], int(counts[2 * r]), int(counts[2 * r + 1]))
                for r, (e, m) in enumerate(zip(examples, multipliers, strict=True))]


class _Recorder:
    """Forward hooks that keep layer inputs and outputs per stage (prefix, suffix, completion)."""

    def __init__(self, model: nn.Module, input_layers: Sequence[int], output_layers: Sequence[int]):
        self.structure = model_structure(model)
        self.input_layers = list(input_layers)
        self.output_layers = list(output_layers)
        self.stage = "prefix"
        self.inputs: dict[str, dict[int, torch.Tensor]] = {s: {} for s in _STAGES}
        self.outputs: dict[str, dict[int, torch.Tensor]] = {s: {} for s in _STAGES}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> _Recorder:
        for layer in self.input_layers:
            self._handles.append(self.structure.layers[layer].register_forward_pre_hook(
                self._input_hook(layer), with_kwargs=True))
        for layer in self.output_layers:
            self._handles.append(self.structure.layers[layer].register_forward_hook(self._output_hook(layer)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _input_hook(self, layer: int):
        def hook(module, args, kwargs):
            self.inputs[self.stage][layer] = args[0] if args else kwargs["hidden_states"]

        return hook

    def _output_hook(self, layer: int):
        def hook(module, args, output):
            self.outputs[self.stage][layer] = output[0] if isinstance(output, tuple) else output

        return hook


_STAGES = ("prefix", "suffix", "completion")


def _run_stack(model: nn.Module, batch_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
               cache: Any) -> torch.Tensor:
    stack = stack_owner(model)
    output = stack(input_ids=batch_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                   **cache_kwargs(stack, cache))
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


def _fill_skipped_layers(cache: Any, start_layer: int, rows: int, width: int, like: torch.Tensor) -> None:
    """Give the skipped layers' cache the length of the tokens just run (never read, see module doc)."""
    fill_layers(cache, range(start_layer), rows, width, like)


@torch.no_grad()
def _paired_pass(model: nn.Module, rows: _Rows, *, start_layer: int = 0, steering: Steering | None = None,
                 input_layers: Sequence[int] = (), output_layers: Sequence[int] = ()) -> _PassResult:
    """Shared prefix once per multiplier, each prompt's suffix once, then both completions on that cache."""
    if start_layer > 0 and rows.inputs is None:
        raise UnisteerError("a pass that starts above layer 0 needs the recorded layer inputs")
    if input_layers and start_layer > 0:
        raise UnisteerError("layer inputs are recorded by the base pass only (start_layer = 0)")
    device = next(model.parameters()).device
    n_groups, n_rows, width = rows.groups.numel(), rows.suffix.input_ids.shape[0], rows.prefix_ids.numel()
    suffix, completions = rows.suffix.to(device), rows.completions.to(device)
    cache = new_cache(model)
    prefix_mask = torch.ones((n_rows, width), dtype=suffix.attention_mask.dtype, device=device)
    suffix_mask = torch.cat([prefix_mask, suffix.attention_mask], 1)
    completion_mask = torch.cat([suffix_mask.repeat_interleave(2, 0), completions.attention_mask], 1)
    row_multipliers = rows.groups[rows.row_group]

    def stage_inputs(name: str):
        if start_layer == 0:
            return contextlib.nullcontext()
        assert rows.inputs is not None
        hidden = getattr(rows.inputs, name)
        return layers_from(model, start_layer, hidden.expand(n_groups, -1, -1) if name == "prefix" else hidden)

    with contextlib.ExitStack() as stack:
        if steering is not None:
            stack.enter_context(steering)
        recorder = stack.enter_context(_Recorder(model, input_layers, output_layers))
        if width:
            if steering is not None:
                steering.set_multiplier(rows.groups)
                steering.set_prompt_lengths([width] * n_groups)  # every prefix token is a prompt token
            ids = rows.prefix_ids.to(device).expand(n_groups, -1)
            positions = torch.arange(width, device=device).expand(n_groups, -1)
            with stage_inputs("prefix"):
                prefix_out = _run_stack(model, ids, prefix_mask[:n_groups], positions, cache)
            _fill_skipped_layers(cache, start_layer, n_groups, width, prefix_out)
            cache.batch_select_indices(rows.row_group.to(device))
        recorder.stage = "suffix"
        if steering is not None:
            steering.set_multiplier(row_multipliers)
            steering.set_prompt_lengths(rows.prompt_lengths)
        with stage_inputs("suffix"):
            suffix_out = _run_stack(model, suffix.input_ids, suffix_mask, suffix.position_ids, cache)
        _fill_skipped_layers(cache, start_layer, n_rows, suffix.input_ids.shape[1], suffix_out)
        cache.batch_repeat_interleave(2)
        recorder.stage = "completion"
        if steering is not None:
            steering.set_multiplier(row_multipliers.repeat_interleave(2))
            steering.set_prompt_lengths(rows.prompt_lengths.repeat_interleave(2))
        with stage_inputs("completions"):
            completion_out = _run_stack(model, completions.input_ids, completion_mask, completions.position_ids,
                                        cache)
    # Completion token 0 is predicted by the prompt's last token, token j > 0 by completion position j − 1.
    if suffix.padding_side == "right":
        last = suffix.lengths - 1
    else:
        last = torch.full_like(suffix.lengths, suffix.input_ids.shape[1] - 1)
    row_index = torch.arange(n_rows, device=device)
    last_prompt = suffix_out[row_index, last]
    hidden = torch.cat([last_prompt.repeat_interleave(2, 0)[:, None], completion_out], 1)
    no_label = torch.full((2 * n_rows, 1), IGNORE_INDEX, dtype=completions.labels.dtype, device=device)
    scores = completion_nll_from_hidden(model, hidden, torch.cat([no_label, completions.labels], 1))

    inputs = {}
    for layer in input_layers:
        stage = recorder.inputs
        prefix_in = stage["prefix"][layer][:1] if width else suffix_out.new_zeros((1, 0, suffix_out.shape[-1]))
        inputs[layer] = _LayerInputs(prefix_in, stage["suffix"][layer], stage["completion"][layer])
    real = completions.attention_mask.bool()
    completion_rows = torch.arange(2 * n_rows, device=device).div(2, rounding_mode="floor")[:, None].expand_as(real)
    point_rows = torch.cat([row_index, completion_rows[real]]).cpu()
    points = {layer: (torch.cat([recorder.outputs["suffix"][layer][row_index, last],
                                 recorder.outputs["completion"][layer][real]]).cpu(), point_rows)
              for layer in output_layers}
    return _PassResult(scores.nll_sum.cpu(), scores.n_tokens.cpu(), inputs, points)


def sliding_window(model: nn.Module) -> int | None:
    """The attention window of a model with sliding-window layers (None: full attention everywhere)."""
    config = text_config(model.config)
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or window <= 0 or getattr(config, "use_sliding_window", True) is False:
        return None
    return window


def _make_chunk(encoded: Sequence[EncodedPair], examples: Sequence[int], pad_token_id: int,
                window: int | None = None) -> _Chunk:
    """Chunk layout. Padding between the suffix and the completions is harmless under full attention, but a
    sliding window counts cache slots, padding included; where the padded sequence could exceed the window
    the prompts are left-padded whole instead (no shared prefix, no padding between real tokens)."""
    pairs = [encoded[i] for i in examples]
    if any(not pair.prompt_ids for pair in pairs):
        raise DataError("a rendered prompt has no tokens; the first completion token needs a prompt token to "
                        "predict it (use a chat template or a plain_format with text)")
    width = common_prefix_length([pair.prompt_ids for pair in pairs])
    padded = max(len(p.prompt_ids) for p in pairs) + max(max(len(p.positive_ids), len(p.negative_ids)) for p in pairs)
    side: PaddingSide = "right"
    if window is not None and padded > window:
        width, side = 0, "left"
    prefix = pairs[0].prompt_ids[:width]
    # `collate_completions` continues positions after `prompt_ids`: the suffix is a continuation of the prefix,
    # and a completion (each polarity as a "positive" view, so one call pads both) one of the whole prompt.
    suffix_views = [EncodedPair(prefix, pair.prompt_ids[width:], pair.prompt_ids[width:]) for pair in pairs]
    suffix = collate_completions(suffix_views, "positive", pad_token_id=pad_token_id, padding_side=side)
    views = [view for pair in pairs for view in (pair, dataclasses.replace(pair, positive_ids=pair.negative_ids))]
    completions = collate_completions(views, "positive", pad_token_id=pad_token_id, padding_side="right")
    lengths = torch.tensor([len(pair.prompt_ids) for pair in pairs], dtype=torch.long)
    return _Chunk(list(examples), torch.tensor(prefix, dtype=torch.long), suffix, completions, lengths)


def _real_columns(batch: TokenBatch, index: torch.Tensor) -> slice:
    """The columns holding a real token in at least one of the rows `index`."""
    width = int(batch.lengths[index].max())
    return slice(0, width) if batch.padding_side == "right" else slice(batch.input_ids.shape[1] - width, None)


def _select(batch: TokenBatch, index: torch.Tensor) -> TokenBatch:
    """Rows `index`, without the columns that are padding in every one of them."""
    columns = _real_columns(batch, index)
    fields = {name: getattr(batch, name)[index][:, columns] for name in
              ("input_ids", "attention_mask", "position_ids", "labels", "completion_mask")}
    return TokenBatch(**fields, prompt_lengths=batch.prompt_lengths[index], lengths=batch.lengths[index],
                      padding_side=batch.padding_side, meta=[batch.meta[i] for i in index.tolist()])


def _base_rows(chunk: _Chunk) -> _Rows:
    return _Rows(chunk.prefix_ids, chunk.suffix, chunk.completions, chunk.prompt_lengths,
                 torch.zeros(len(chunk.examples), dtype=torch.long), torch.zeros(1))


def _steered_rows_batch(chunk: _Chunk, rows: Sequence[tuple[int, float]], layer: int) -> _Rows:
    """Rows (chunk position, multiplier) with their recorded layer-L inputs."""
    index = torch.as_tensor([p for p, _ in rows], dtype=torch.long)
    pair_index = torch.stack([2 * index, 2 * index + 1], 1).reshape(-1)
    groups, row_group = torch.unique(torch.tensor([m for _, m in rows], dtype=torch.float32), return_inverse=True)
    suffix, completions = _select(chunk.suffix, index), _select(chunk.completions, pair_index)
    recorded = chunk.inputs[layer]
    inputs = _LayerInputs(recorded.prefix, recorded.suffix[index][:, _real_columns(chunk.suffix, index)],
                          recorded.completions[pair_index][:, _real_columns(chunk.completions, pair_index)])
    return _Rows(chunk.prefix_ids, suffix, completions, chunk.prompt_lengths[index], row_group, groups, inputs)


def _length_sorted_chunks(encoded: Sequence[EncodedPair], size: int) -> list[list[int]]:
    """Examples grouped by length (little padding per batch), each group in index order."""
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i].prompt_ids),
                                                       max(len(encoded[i].positive_ids), len(encoded[i].negative_ids)), i))
    return [sorted(order[start:start + size]) for start in range(0, len(order), size)]


def _steering(model: nn.Module, update: Update, positions: str | None) -> Steering:
    device = next(model.parameters()).device
    for name, parameter in update.named_parameters():
        if parameter.device != device:
            raise ConfigError(f"update {update.spec.name or update.spec.form!r}: parameter {name} is on "
                              f"{parameter.device}, the model on {device}; move it with update.to(device)")
    return Steering(model, update, multiplier=0.0, positions=positions)


def score_pairs(model: nn.Module, update: Update, encoded: Sequence[EncodedPair], multipliers: Sequence[float], *,
                pad_token_id: int, batch_rows: int = 64, chunk_examples: int = 32,
                positions: str | None = None) -> list[PairScore]:
    """The sweep's fast path without files or manifold: every (example, m), ordered by m then example.

    m = 0 comes from the unsteered base pass; the other multipliers from batched steered passes of layers
    ≥ L over rows (example × multiplier) sharing each prompt's KV cache between the two polarities.
    """
    grid = check_multipliers(list(multipliers), sort=True)
    layer = update.layer
    results: dict[tuple[int, float], PairScore] = {}
    steering = _steering(model, update, positions)
    with eval_mode(model, update):
        for examples in _length_sorted_chunks(encoded, chunk_examples):
            chunk = _make_chunk(encoded, examples, pad_token_id, sliding_window(model))
            base = _paired_pass(model, _base_rows(chunk), input_layers=[layer])
            chunk.inputs = base.inputs
            if 0.0 in grid:
                for s in base.scores(examples, [0.0] * len(examples)):
                    results[(s.example, 0.0)] = s
            rows = [(pos, m) for m in grid if m != 0.0 for pos in range(len(examples))]
            for start in range(0, len(rows), batch_rows):
                part = rows[start:start + batch_rows]
                result = _steered_pass(model, chunk, part, update, steering, [])
                for s in result.scores([examples[p] for p, _ in part], [m for _, m in part]):
                    results[(s.example, s.m)] = s
    return [results[(i, m)] for m in grid for i in range(len(encoded))]


def _steered_pass(model: nn.Module, chunk: _Chunk, rows: Sequence[tuple[int, float]], update: Update,
                  steering: Steering, output_layers: Sequence[int]) -> _PassResult:
    return _paired_pass(model, _steered_rows_batch(chunk, rows, update.layer), start_layer=update.layer,
                        steering=steering, output_layers=output_layers)


@torch.no_grad()
def score_one_by_one(model: nn.Module, update: Update, encoded: Sequence[EncodedPair],
                     multipliers: Sequence[float], *, positions: str | None = None) -> list[PairScore]:
    """The straightforward path: one full forward per example, polarity and multiplier (benchmark reference)."""
    device = next(model.parameters()).device
    out = []
    with eval_mode(model, update):
        for m in multipliers:
            with Steering(model, update, multiplier=float(m), positions=positions) as steering:
                for index, pair in enumerate(encoded):
                    steering.set_prompt_lengths([len(pair.prompt_ids)])
                    sides = []
                    for completion in (pair.positive_ids, pair.negative_ids):
                        ids = torch.tensor([pair.prompt_ids + completion], device=device)
                        labels = torch.tensor([[IGNORE_INDEX] * len(pair.prompt_ids) + completion], device=device)
                        sides.append(completion_nll(model, ids, torch.ones_like(ids), labels))
                    out.append(PairScore(index, float(m), float(sides[0].nll_sum[0]), float(sides[1].nll_sum[0]),
                                         int(sides[0].n_tokens[0]), int(sides[1].n_tokens[0])))
    return out


# ---------------------------------------------------------------------------------------------- sweep


@dataclass
class SweepResult:
    """What `run_sweep` did: rows computed now, rows found on disk, and where everything is."""

    out_dir: Path
    updates: list[str]
    splits: list[str]
    rows_computed: int
    rows_reused: int
    seconds: float
    base_seconds: float
    steered_seconds: float

    @property
    def rows_per_second(self) -> float:
        return self.rows_computed / self.seconds if self.seconds > 0 else float("nan")


def run_sweep(model: nn.Module, tokenizer: Any, updates: Mapping[str, Update], splits: Mapping[str, PairDataset],
              config: SweepConfig | None = None, out_dir: str | Path = "sweep", *,
              encoder: PairEncoder | None = None, settings: Mapping[str, Any] | None = None) -> SweepResult:
    """Score every update on every split at every multiplier of its grid; write and resume `out_dir`.

    `updates`: name → update (names become folder names: letters, digits, '.', '_', '+', '-'). `splits`:
    name → pairs (e.g. {"train": ..., "test": ...}; the fit uses `config.fit_split`). `settings`: anything
    JSON-like to record and show in the report (e.g. {"model": alias, "dtype": "bfloat16",
    "dataset": BuiltinData.record()}). `encoder` defaults to `PairEncoder(tokenizer, max_length=...)`.
    """
    config = config or SweepConfig()
    started = time.perf_counter()
    if not updates:
        raise ConfigError("run_sweep: no updates given")
    if not splits:
        raise ConfigError("run_sweep: no splits given")
    for kind, names in (("update", updates), ("split", splits)):
        for name in names:
            if not isinstance(name, str) or not _NAME.match(name):
                raise ConfigError(f"{kind} name {name!r}: use letters, digits, '.', '_', '+' or '-' (it names files)")
    unknown = sorted(set(config.grids) - set(updates))
    if unknown:
        raise ConfigError(f"sweep.grids: no update named {unknown}; updates are {sorted(updates)}")
    for name, dataset in splits.items():
        if len(dataset) == 0:
            raise DataError(f"split {name!r} ({dataset.name}) has no pairs")
    encoder = encoder or PairEncoder(tokenizer, max_length=config.max_length)
    structure = model_structure(model)
    steerings = {name: _steering(model, update, config.positions) for name, update in updates.items()}
    layers = manifold_layers_for(structure.num_layers, [u.layer for u in updates.values()], config)
    out = Path(out_dir)
    grids = {name: grid_for(name, update, config) for name, update in updates.items()}
    info = _merge_sweep_file(out, _sweep_record(model, encoder, updates, splits, grids, config, layers, settings))

    encoded = {name: encoder.encode_all(dataset.pairs) for name, dataset in splits.items()}
    done = {(u, s): _load_done(_scores_path(out, u, s)) for u in updates for s in splits}
    todo = {(u, s): [(i, m) for m in grids[u] for i in range(len(encoded[s])) if (i, m) not in done[(u, s)]]
            for u in updates for s in splits}
    total = sum(len(rows) for rows in todo.values())
    reused = sum(len(grids[u]) * len(encoded[s]) for u in updates for s in splits) - total
    base_seconds = steered_seconds = 0.0
    references: dict[str, dict[int, dict[str, Any]]] = info.get("manifold_reference", {})
    progress = tqdm(total=total, unit="row", desc="sweep", disable=not config.progress)
    with eval_mode(model, *updates.values()), progress:
        for split, pairs in encoded.items():
            if not any(todo[(u, split)] for u in updates):
                continue
            tick = time.perf_counter()
            chunks, reference = _base_passes(model, encoder.pad_token_id, pairs, updates, layers, config)
            if reference:
                # Kept at once: a split finished before an interruption is skipped on resume, so its reference
                # must already be on disk.
                references[split] = {layer: ref.describe() for layer, ref in reference.items()}
                info["manifold_reference"] = references
                write_json(out / SWEEP_FILE, info)
                write_json(out / REFERENCE_FILE, references)
            base_seconds += time.perf_counter() - tick
            for name, update in updates.items():
                measured = [layer for layer in layers if layer >= update.layer]
                path = _scores_path(out, name, split)
                pending = {(i, m) for i, m in todo[(name, split)]}
                for chunk, base in chunks:
                    rows = []
                    if any((i, 0.0) in pending for i in chunk.examples):
                        rows += [s for s in _with_manifold(base.scores(chunk.examples, [0.0] * len(chunk.examples)),
                                                           chunk.examples, base, measured, reference)
                                 if (s.example, 0.0) in pending]
                    tick = time.perf_counter()
                    rows += _steered_rows(model, chunk, update, steerings[name], pending, grids[name], measured,
                                          reference, config.batch_rows)
                    steered_seconds += time.perf_counter() - tick
                    _append_rows(path, rows)
                    progress.update(len(rows))
    if references:
        info["manifold_reference"] = references
        write_json(out / SWEEP_FILE, info)
        write_json(out / REFERENCE_FILE, references)
    return SweepResult(out, list(updates), list(splits), total, reused, time.perf_counter() - started,
                       base_seconds, steered_seconds)


def _base_passes(model: nn.Module, pad_token_id: int, encoded: Sequence[EncodedPair],
                 updates: Mapping[str, Update], layers: Sequence[int], config: SweepConfig
                 ) -> tuple[list[tuple[_Chunk, _PassResult]], dict[int, ManifoldReference]]:
    """Unsteered passes over a split: layer inputs, m = 0 scores, and the manifold reference per layer."""
    input_layers = sorted({u.layer for u in updates.values()})
    chunks = []
    for examples in _length_sorted_chunks(encoded, config.chunk_examples):
        chunk = _make_chunk(encoded, examples, pad_token_id, sliding_window(model))
        base = _paired_pass(model, _base_rows(chunk), input_layers=input_layers, output_layers=layers)
        chunk.inputs = base.inputs
        chunks.append((chunk, base))
    reference: dict[int, ManifoldReference] = {}
    if layers:
        chosen = _reference_examples(len(encoded), config.manifold_max_examples, config.seed)
        for layer in layers:
            points, owners = [], []
            for chunk, base in chunks:
                layer_points, rows = base.points[layer]
                example_ids = torch.as_tensor(chunk.examples)[rows]
                keep = torch.as_tensor([int(e) in chosen for e in example_ids.tolist()], dtype=torch.bool)
                points.append(layer_points[keep])
                owners.append(example_ids[keep])
            reference[layer] = build_reference(layer, torch.cat(points), torch.cat(owners),
                                               variance=config.manifold_variance)
    return chunks, reference


def _reference_examples(n: int, limit: int, seed: int) -> set[int]:
    if n <= limit:
        return set(range(n))
    generator = torch.Generator().manual_seed(seed)
    return set(torch.randperm(n, generator=generator)[:limit].tolist())


def _steered_rows(model: nn.Module, chunk: _Chunk, update: Update, steering: Steering,
                  pending: set[tuple[int, float]], grid: Sequence[float], layers: Sequence[int],
                  reference: Mapping[int, ManifoldReference], batch_rows: int) -> list[PairScore]:
    """Scores of the chunk's pending (example, m) rows.

    Batches are cut from the chunk's *full* row list in a fixed order and a batch runs whole whenever any of
    its rows is pending: each row is always computed alongside the same rows, so a resumed sweep gives the
    same numbers as an uninterrupted one even in bf16, where a row's result depends on its batch's shape.
    """
    rows = [(pos, m) for m in grid if m != 0.0 for pos in range(len(chunk.examples))]
    out = []
    for start in range(0, len(rows), batch_rows):
        part = rows[start:start + batch_rows]
        if not any((chunk.examples[pos], m) in pending for pos, m in part):
            continue
        result = _steered_pass(model, chunk, part, update, steering, layers)
        examples = [chunk.examples[p] for p, _ in part]
        scores = _with_manifold(result.scores(examples, [m for _, m in part]), examples, result, layers, reference)
        out += [score for score in scores if (score.example, score.m) in pending]
    return out


def _with_manifold(scores: list[PairScore], examples: Sequence[int], result: _PassResult, layers: Sequence[int],
                   reference: Mapping[int, ManifoldReference]) -> list[PairScore]:
    """Attach per-row manifold metrics (mean over the row's points) to each score."""
    if not layers:
        return scores
    per_row: list[dict[str, dict[str, float]]] = [{} for _ in scores]
    for layer in layers:
        points, rows = result.points[layer]
        owners = torch.as_tensor(examples, dtype=torch.long)[rows]
        distances = reference[layer].relative_distances(points, owners)
        counts = torch.zeros(len(scores), dtype=torch.float64).index_add(0, rows, torch.ones(rows.numel(),
                                                                                              dtype=torch.float64))
        for metric, values in distances.items():
            means = torch.zeros(len(scores), dtype=torch.float64).index_add(0, rows, values) / counts
            for r, value in enumerate(means.tolist()):
                per_row[r].setdefault(str(layer), {})[metric] = value
    return [dataclasses.replace(s, manifold=m) for s, m in zip(scores, per_row, strict=True)]


# ---------------------------------------------------------------------------------------------- files


def _scores_path(out: Path, update: str, split: str) -> Path:
    return out / SCORES_DIR / update / f"{split}.jsonl"


def _sweep_record(model: nn.Module, encoder: PairEncoder, updates: Mapping[str, Update],
                  splits: Mapping[str, PairDataset], grids: Mapping[str, list[float]], config: SweepConfig,
                  layers: Sequence[int], settings: Mapping[str, Any] | None) -> dict[str, Any]:
    from .models import config_hash, model_id

    structure = model_structure(model)
    return {
        "format": FORMAT_VERSION,
        "model": {"id": model_id(model), "config_hash": config_hash(model),
                  "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                  "num_layers": structure.num_layers, "hidden_size": structure.hidden_size},
        "encoder": encoder.describe(),
        "splits": {name: dataset.record() for name, dataset in splits.items()},
        "updates": {name: {"form": u.spec.form, "layer": u.layer, "insertion": u.insertion,
                           "positions": config.positions or u.spec.positions, "rank": u.spec.rank,
                           "fingerprint": update_fingerprint(u), "spec": dataclasses.asdict(u.spec)}
                    for name, u in updates.items()},
        "grids": {name: list(grid) for name, grid in grids.items()},
        "manifold": {"layers": list(layers), "variance": config.manifold_variance,
                     "max_examples": config.manifold_max_examples, "seed": config.seed,
                     "metrics": list(METRICS) if layers else []},
        "config": to_dict(config),
        "settings": dict(settings or {}),
    }


def _merge_sweep_file(out: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Create `sweep.json`, or check that a resumed sweep is comparable and merge the new parts in."""
    path = out / SWEEP_FILE
    if not path.exists():
        if out.exists() and any(out.iterdir()):
            raise ConfigError(f"{out}: the folder is not empty and holds no {SWEEP_FILE}; choose a new or empty "
                              "folder for the sweep")
        out.mkdir(parents=True, exist_ok=True)
        write_json(path, record)
        return record
    old = read_sweep_info(out)
    problems = []
    for key in ("id", "config_hash", "dtype"):
        if old["model"].get(key) != record["model"][key]:
            problems.append(f"model {key}: stored {old['model'].get(key)!r}, now {record['model'][key]!r}")
    if old["encoder"] != record["encoder"]:
        problems.append(f"prompt rendering: stored {old['encoder']}, now {record['encoder']}")
    for name, split in record["splits"].items():
        if name in old["splits"] and old["splits"][name]["hash"] != split["hash"]:
            problems.append(f"split {name!r}: the pairs differ (content hash)")
    for name, update in record["updates"].items():
        stored = old["updates"].get(name)
        if stored is not None and (stored["fingerprint"], stored["positions"]) != (update["fingerprint"],
                                                                                   update["positions"]):
            problems.append(f"update {name!r}: a different update (or positions) under the same name")
    for key in ("layers", "variance", "max_examples", "seed"):
        if old["manifold"].get(key) != record["manifold"][key]:
            problems.append(f"manifold {key}: stored {old['manifold'].get(key)!r}, now {record['manifold'][key]!r}")
    if problems:
        raise ConfigError(f"{path}: cannot resume this sweep with different inputs — " + "; ".join(problems)
                          + ". Use a new output folder (or delete this one) to start over.")
    merged = dict(old)
    merged["splits"] = {**old["splits"], **record["splits"]}
    merged["updates"] = {**old["updates"], **record["updates"]}
    merged["grids"] = {name: sorted(set(old["grids"].get(name, [])) | set(grid))
                       for name, grid in {**old["grids"], **record["grids"]}.items()}
    merged["config"] = record["config"]
    merged["settings"] = {**old.get("settings", {}), **record["settings"]}
    write_json(path, merged)
    return merged


def read_sweep_info(out_dir: str | Path) -> dict[str, Any]:
    path = Path(out_dir) / SWEEP_FILE
    if not path.is_file():
        raise DataError(f"{path}: no sweep here (run a sweep into this folder first)")
    info = read_json(path, what="sweep file")
    if not isinstance(info, dict) or info.get("format") != FORMAT_VERSION:
        raise DataError(f"{path}: not a sweep file of format {FORMAT_VERSION}")
    return info


def _append_rows(path: Path, rows: Sequence[PairScore]) -> None:
    if not rows:
        return
    text = "".join(json.dumps(row.to_json(), allow_nan=False) + "\n" for row in rows)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        # A torn last line is repaired on resume (`read_scores(repair=True)`): nothing written before is lost.
        raise UnisteerError(f"cannot write {path}: {exc.strerror or exc}; the rows written so far are kept — "
                            "free space (or fix the folder) and rerun the same command to resume") from exc


def _load_done(path: Path) -> set[tuple[int, float]]:
    return {(row.example, row.m) for row in read_scores(path, repair=True)}


def read_scores(path: str | Path, *, repair: bool = False) -> list[PairScore]:
    """Rows of one scores file. A final line cut short by an interrupted write is dropped (and, with
    `repair`, removed from the file so that appending continues cleanly); any other bad line is an error."""
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    complete, tail = lines[:-1], lines[-1]
    if tail:
        log.warning("%s: dropping an incomplete last line (interrupted write): %.60s", path, tail)
        if repair:
            with open(path, "r+", encoding="utf-8") as fh:
                fh.truncate(len(text.encode("utf-8")) - len(tail.encode("utf-8")))
    rows, seen = [], set()
    for number, line in enumerate(complete, start=1):
        try:
            data = json.loads(line)
            row = PairScore(int(data["example"]), float(data["m"]), float(data["L_p"]), float(data["L_n"]),
                            int(data["T_p"]), int(data["T_n"]), data.get("manifold", {}))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{path}:{number}: malformed score row ({exc})") from exc
        key = (row.example, row.m)
        if key in seen:
            raise DataError(f"{path}:{number}: duplicate row for example {row.example} at m={row.m} "
                            "(two sweeps writing the same folder?)")
        seen.add(key)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- fits


@dataclass
class SplitRows:
    """All rows of one (update, split) as arrays, with per-example log-odds of both variants."""

    example: np.ndarray
    m: np.ndarray
    L_p: np.ndarray
    L_n: np.ndarray
    T_p: np.ndarray
    T_n: np.ndarray
    log_odds: dict[str, Any]  # variant → LogOdds
    manifold: dict[tuple[int, str], np.ndarray]  # (layer, metric) → values (NaN where a row lacks it)


@dataclass
class CurvePair:
    """Per-m aggregates of both quantities, and their paired change from m = 0 (per example, then averaged):
    an effect at m is a change whose interval excludes 0."""

    preference: AggregatedCurve
    utility: AggregatedCurve
    preference_change: AggregatedCurve | None = None
    utility_change: AggregatedCurve | None = None


@dataclass
class UpdateFit:
    """Preference and utility fits of one update and variant (fitted on `fit_split`), R² on every split."""

    update: str
    variant: str
    fit_split: str
    preference: DecayFit | None
    utility: DecayFit | None
    r2: dict[str, dict[str, float | None]]  # quantity → split → R²
    errors: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {"update": self.update, "variant": self.variant, "fit_split": self.fit_split,
                "preference": None if self.preference is None else self.preference.to_dict(),
                "utility": None if self.utility is None else self.utility.to_dict(),
                "r2": self.r2, "errors": self.errors}


@dataclass
class SweepFits:
    """Everything `fit_sweep` computed, as written to the files listed in `files`."""

    out_dir: Path
    info: dict[str, Any]
    rows: dict[tuple[str, str], SplitRows]
    curves: dict[tuple[str, str, str], CurvePair]  # (update, split, variant)
    fits: dict[tuple[str, str], UpdateFit]  # (update, variant)
    manifold: dict[tuple[str, str, int, str], AggregatedCurve]  # (update, split, layer, metric)
    correlations: list[dict[str, Any]]
    files: dict[str, Path]

    @property
    def updates(self) -> list[str]:
        return sorted({u for u, _ in self.rows}, key=list(self.info["updates"]).index)

    @property
    def splits(self) -> list[str]:
        return sorted({s for _, s in self.rows}, key=list(self.info["splits"]).index)


def load_sweep(out_dir: str | Path) -> tuple[dict[str, Any], dict[tuple[str, str], SplitRows]]:
    """`sweep.json` and every scores file, with log-odds of both variants per row."""
    out = Path(out_dir)
    info = read_sweep_info(out)
    eps = float(info["config"]["eps"])
    rows = {}
    for update in info["updates"]:
        for split in info["splits"]:
            scores = read_scores(_scores_path(out, update, split))
            if scores:
                rows[(update, split)] = _rows_to_arrays(scores, eps)
    if not rows:
        raise DataError(f"{out}: the sweep has no scored rows yet")
    return info, rows


def _rows_to_arrays(scores: Sequence[PairScore], eps: float) -> SplitRows:
    scores = sorted(scores, key=lambda s: (s.m, s.example))
    column = {name: np.array([getattr(s, name) for s in scores]) for name in ("example", "m", "L_p", "L_n", "T_p",
                                                                               "T_n")}
    log_odds = {variant: compute_log_odds(column["L_p"], column["L_n"], column["T_p"], column["T_n"],
                                          variant=variant, eps=eps) for variant in VARIANTS}
    keys = sorted({(int(layer), metric) for s in scores for layer, values in s.manifold.items() for metric in values})
    manifold = {(layer, metric): np.array([s.manifold.get(str(layer), {}).get(metric, np.nan) for s in scores])
                for layer, metric in keys}
    return SplitRows(column["example"].astype(np.int64), column["m"].astype(np.float64), column["L_p"],
                     column["L_n"], column["T_p"].astype(np.int64), column["T_n"].astype(np.int64), log_odds,
                     manifold)


def fit_sweep(out_dir: str | Path, *, fit_split: str | None = None) -> SweepFits:
    """Aggregate, fit and correlate a sweep's rows; write the CSV/JSON files; return everything.

    Curves: per (update, split, variant) the mean, standard error and bootstrap CI of PrefOdds and UtilOdds
    per m, with clamped counts. Fits (SPEC §4), per update and variant, on the mean curve of `fit_split`
    (default: the sweep config's, else the first split present), scored on every split. Manifold: per
    (update, split, layer, metric) the mean distance per m and its Pearson/Spearman correlation with the
    mean UtilOdds across m.
    """
    out = Path(out_dir)
    info, rows = load_sweep(out)
    config = info["config"]
    n_boot, level, seed = int(config["n_boot"]), float(config["ci_level"]), int(config["seed"])
    splits = [s for s in info["splits"] if any(key[1] == s for key in rows)]
    chosen = fit_split or config.get("fit_split", "train")
    if chosen not in splits:
        if fit_split is not None:
            raise ConfigError(f"fit_split {fit_split!r}: no rows for that split; splits with rows: {splits}")
        log.warning("fit split %r has no rows; fitting on %r instead", chosen, splits[0])
        chosen = splits[0]

    curves: dict[tuple[str, str, str], CurvePair] = {}
    for (update, split), data in rows.items():
        has_zero = bool(np.any(data.m == 0.0))
        for variant, odds in data.log_odds.items():
            curves[(update, split, variant)] = CurvePair(
                aggregate_per_multiplier(data.m, odds.pref, odds.clamped, n_boot=n_boot, level=level, seed=seed),
                aggregate_per_multiplier(data.m, odds.util, odds.clamped, n_boot=n_boot, level=level, seed=seed),
                paired_change(data.m, data.example, odds.pref, n_boot=n_boot, level=level, seed=seed)
                if has_zero else None,
                paired_change(data.m, data.example, odds.util, n_boot=n_boot, level=level, seed=seed)
                if has_zero else None)

    fits: dict[tuple[str, str], UpdateFit] = {}
    for update in info["updates"]:
        for variant in VARIANTS:
            if (update, chosen, variant) in curves:
                fits[(update, variant)] = _fit_update(update, variant, chosen, curves, splits)

    manifold: dict[tuple[str, str, int, str], AggregatedCurve] = {}
    correlations = []
    for (update, split), data in rows.items():
        for (layer, metric), values in data.manifold.items():
            present = np.isfinite(values)
            curve = aggregate_per_multiplier(data.m[present], values[present], n_boot=n_boot, level=level, seed=seed)
            manifold[(update, split, layer, metric)] = curve
            for variant in VARIANTS:
                utility = curves[(update, split, variant)].utility
                common, in_distance, in_utility = np.intersect1d(curve.m, utility.m, return_indices=True)
                result = correlate(curve.mean[in_distance], utility.mean[in_utility])
                correlations.append({"update": update, "split": split, "layer": layer, "metric": metric,
                                     "variant": variant, "m_min": float(common.min()), "m_max": float(common.max()),
                                     **result.to_dict()})

    result = SweepFits(out, info, rows, curves, fits, manifold, correlations, {})
    result.files = _write_fit_files(result)
    return result


def _fit_update(update: str, variant: str, fit_split: str, curves: Mapping[tuple[str, str, str], CurvePair],
                splits: Sequence[str]) -> UpdateFit:
    fitted: dict[str, DecayFit | None] = {}
    errors: dict[str, str] = {}
    r2: dict[str, dict[str, float | None]] = {}
    train = curves[(update, fit_split, variant)]
    for quantity, fitter in (("preference", fit_preference), ("utility", fit_utility)):
        curve = getattr(train, quantity)
        sem = curve.sem if np.all(np.isfinite(curve.sem)) else None
        try:
            fitted[quantity] = fitter(curve.m, curve.mean, sem=sem)
        except FitError as exc:
            fitted[quantity], errors[quantity] = None, str(exc)
            continue
        r2[quantity] = {}
        for split in splits:
            if (update, split, variant) in curves:
                other = getattr(curves[(update, split, variant)], quantity)
                r2[quantity][split] = score(fitted[quantity], other.m, other.mean)
    return UpdateFit(update, variant, fit_split, fitted["preference"], fitted["utility"], r2, errors)


def _write_fit_files(result: SweepFits) -> dict[str, Path]:
    out = result.out_dir
    files = {name: out / name for name in ("per_example.csv", "curves.csv", "fits.json", "fits.csv",
                                           "manifold.csv", "manifold_correlations.csv", "summary.json")}
    manifold_keys = sorted({key for data in result.rows.values() for key in data.manifold})
    header = ["update", "split", "example", "m", "L_p", "L_n", "T_p", "T_n"]
    for variant in VARIANTS:
        header += [f"pref_{variant}", f"util_{variant}", f"clamped_{variant}"]
    header += [f"{metric}_layer{layer}" for layer, metric in manifold_keys]
    table = []
    for (update, split), data in result.rows.items():
        for i in range(data.m.size):
            row = [update, split, int(data.example[i]), float(data.m[i]), float(data.L_p[i]), float(data.L_n[i]),
                   int(data.T_p[i]), int(data.T_n[i])]
            for variant in VARIANTS:
                odds = data.log_odds[variant]
                row += [float(odds.pref[i]), float(odds.util[i]), bool(odds.clamped[i])]
            row += [_csv_value(data.manifold[key][i]) if key in data.manifold else "" for key in manifold_keys]
            table.append(row)
    write_csv(files["per_example.csv"], header, table)

    header = ["update", "split", "variant", "quantity", "m", "mean", "sem", "ci_low", "ci_high", "n", "n_clamped"]
    table = []
    for (update, split, variant), pair in result.curves.items():
        for quantity in ("preference", "utility"):
            table += _curve_rows([update, split, variant, quantity], getattr(pair, quantity))
    write_csv(files["curves.csv"], header, table)

    fits_json = {f"{update}/{variant}": fit.to_dict() for (update, variant), fit in result.fits.items()}
    write_json(files["fits.json"], fits_json)
    header = ["update", "variant", "quantity", "fit_split", "r2_fit_split", "r2_other_splits", "poor_fit",
              "breakdown_negative", "breakdown_positive", "linear_region", "params", "warnings", "error"]
    table = []
    for (update, variant), fit in result.fits.items():
        for quantity in ("preference", "utility"):
            decay = getattr(fit, quantity)
            if decay is None:
                table.append([update, variant, quantity, fit.fit_split, "", "", "", "", "", "", "", "",
                              fit.errors.get(quantity, "")])
                continue
            regions = decay.regions()
            others = {s: r for s, r in fit.r2[quantity].items() if s != fit.fit_split}
            table.append([update, variant, quantity, fit.fit_split, _csv_value(decay.r2), json.dumps(others),
                          decay.poor_fit, decay.breakdown_negative, decay.breakdown_positive,
                          json.dumps([regions.linear_negative, regions.linear_positive]), json.dumps(decay.params),
                          "; ".join(decay.warnings), ""])
    write_csv(files["fits.csv"], header, table)

    header = ["update", "split", "layer", "metric", "m", "mean", "sem", "ci_low", "ci_high", "n", "n_clamped"]
    table = []
    for (update, split, layer, metric), curve in result.manifold.items():
        table += _curve_rows([update, split, layer, metric], curve)
    write_csv(files["manifold.csv"], header, table)
    header = ["update", "split", "layer", "metric", "variant", "m_min", "m_max", "n_points", "pearson_r",
              "pearson_p", "spearman_rho", "spearman_p", "note"]
    write_csv(files["manifold_correlations.csv"], header,
               [[_csv_value(c[k]) for k in header] for c in result.correlations])

    summary = {
        "sweep": result.info,
        "curves": {f"{u}/{s}/{v}": {"preference": p.preference.to_dict(), "utility": p.utility.to_dict()}
                   for (u, s, v), p in result.curves.items()},
        "fits": fits_json,
        "manifold": {f"{u}/{s}/{layer}/{metric}": c.to_dict() for (u, s, layer, metric), c in result.manifold.items()},
        "manifold_correlations": result.correlations,
    }
    write_json(files["summary.json"], summary)
    return files


def _curve_rows(prefix: list[Any], curve: AggregatedCurve) -> list[list[Any]]:
    return [[*prefix, float(m), a.mean, _csv_value(a.sem), _csv_value(a.ci_low), _csv_value(a.ci_high), a.n,
             a.n_clamped] for m, a in zip(curve.m, curve.aggregates, strict=True)]


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)) and not math.isfinite(float(value)):
        return ""
    return value


__all__ = [
    "PairScore",
    "SplitRows",
    "SweepConfig",
    "SweepFits",
    "SweepResult",
    "UpdateFit",
    "fit_sweep",
    "grid_for",
    "load_sweep",
    "manifold_layers_for",
    "read_scores",
    "read_sweep_info",
    "run_sweep",
    "score_one_by_one",
    "score_pairs",
]
