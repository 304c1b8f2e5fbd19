"""The fast paired scoring engine of a sweep: every pair's two completions at many multipliers.

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
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..data.batches import IGNORE_INDEX, PaddingSide, TokenBatch, collate_completions, common_prefix_length
from ..data.rendering import EncodedPair
from ..engine.architecture import model_structure, text_config
from ..engine.devices import input_device
from ..engine.hf_compat import cache_kwargs, fill_layers, new_cache, repeat_rows, select_rows
from ..engine.prefix import layers_from
from ..engine.scoring import completion_nll, completion_nll_from_hidden, stack_owner
from ..engine.steering import Steering
from ..engine.updates import Update, check_multipliers, eval_mode
from ..errors import DataError, UnisteerError


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
class Chunk:
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
class PassResult:
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
def paired_pass(model: nn.Module, rows: _Rows, *, start_layer: int = 0, steering: Steering | None = None,
                 input_layers: Sequence[int] = (), output_layers: Sequence[int] = ()) -> PassResult:
    """Shared prefix once per multiplier, each prompt's suffix once, then both completions on that cache."""
    if start_layer > 0 and rows.inputs is None:
        raise UnisteerError("a pass that starts above layer 0 needs the recorded layer inputs")
    if input_layers and start_layer > 0:
        raise UnisteerError("layer inputs are recorded by the base pass only (start_layer = 0)")
    device = input_device(model)
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
            select_rows(cache, rows.row_group.to(device))
        recorder.stage = "suffix"
        if steering is not None:
            steering.set_multiplier(row_multipliers)
            steering.set_prompt_lengths(rows.prompt_lengths)
        with stage_inputs("suffix"):
            suffix_out = _run_stack(model, suffix.input_ids, suffix_mask, suffix.position_ids, cache)
        _fill_skipped_layers(cache, start_layer, n_rows, suffix.input_ids.shape[1], suffix_out)
        repeat_rows(cache, 2)
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
    return PassResult(scores.nll_sum.cpu(), scores.n_tokens.cpu(), inputs, points)


def sliding_window(model: nn.Module) -> int | None:
    """The attention window of a model with sliding-window layers (None: full attention everywhere)."""
    config = text_config(model.config)
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or window <= 0 or getattr(config, "use_sliding_window", True) is False:
        return None
    return window


def make_chunk(encoded: Sequence[EncodedPair], examples: Sequence[int], pad_token_id: int,
                window: int | None = None) -> Chunk:
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
    return Chunk(list(examples), torch.tensor(prefix, dtype=torch.long), suffix, completions, lengths)


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


def base_rows(chunk: Chunk) -> _Rows:
    return _Rows(chunk.prefix_ids, chunk.suffix, chunk.completions, chunk.prompt_lengths,
                 torch.zeros(len(chunk.examples), dtype=torch.long), torch.zeros(1))


def _steered_rows_batch(chunk: Chunk, rows: Sequence[tuple[int, float]], layer: int) -> _Rows:
    """Rows (chunk position, multiplier) with their recorded layer-L inputs."""
    index = torch.as_tensor([p for p, _ in rows], dtype=torch.long)
    pair_index = torch.stack([2 * index, 2 * index + 1], 1).reshape(-1)
    groups, row_group = torch.unique(torch.tensor([m for _, m in rows], dtype=torch.float32), return_inverse=True)
    suffix, completions = _select(chunk.suffix, index), _select(chunk.completions, pair_index)
    recorded = chunk.inputs[layer]
    inputs = _LayerInputs(recorded.prefix, recorded.suffix[index][:, _real_columns(chunk.suffix, index)],
                          recorded.completions[pair_index][:, _real_columns(chunk.completions, pair_index)])
    return _Rows(chunk.prefix_ids, suffix, completions, chunk.prompt_lengths[index], row_group, groups, inputs)


def length_sorted_chunks(encoded: Sequence[EncodedPair], size: int) -> list[list[int]]:
    """Examples grouped by length (little padding per batch), each group in index order."""
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i].prompt_ids),
                                                       max(len(encoded[i].positive_ids), len(encoded[i].negative_ids)), i))
    return [sorted(order[start:start + size]) for start in range(0, len(order), size)]


def zero_steering(model: nn.Module, update: Update, positions: str | None) -> Steering:
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
    steering = zero_steering(model, update, positions)
    with eval_mode(model, update):
        for examples in length_sorted_chunks(encoded, chunk_examples):
            chunk = make_chunk(encoded, examples, pad_token_id, sliding_window(model))
            base = paired_pass(model, base_rows(chunk), input_layers=[layer])
            chunk.inputs = base.inputs
            if 0.0 in grid:
                for s in base.scores(examples, [0.0] * len(examples)):
                    results[(s.example, 0.0)] = s
            rows = [(pos, m) for m in grid if m != 0.0 for pos in range(len(examples))]
            for start in range(0, len(rows), batch_rows):
                part = rows[start:start + batch_rows]
                result = steered_pass(model, chunk, part, update, steering, [])
                for s in result.scores([examples[p] for p, _ in part], [m for _, m in part]):
                    results[(s.example, s.m)] = s
    return [results[(i, m)] for m in grid for i in range(len(encoded))]


def steered_pass(model: nn.Module, chunk: Chunk, rows: Sequence[tuple[int, float]], update: Update,
                  steering: Steering, output_layers: Sequence[int]) -> PassResult:
    return paired_pass(model, _steered_rows_batch(chunk, rows, update.layer), start_layer=update.layer,
                        steering=steering, output_layers=output_layers)


@torch.no_grad()
def score_one_by_one(model: nn.Module, update: Update, encoded: Sequence[EncodedPair],
                     multipliers: Sequence[float], *, positions: str | None = None) -> list[PairScore]:
    """The straightforward path: one full forward per example, polarity and multiplier (benchmark reference)."""
    device = input_device(model)
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
