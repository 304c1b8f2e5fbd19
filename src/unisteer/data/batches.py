"""Padded batches of encoded pairs: full sequences, prompts alone (for generation or a shared prompt cache),
and completions alone (to run after a prompt's KV cache), with labels that mask the prompt and padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .pairs import Side, check_side
from .rendering import EncodedPair

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding)


PaddingSide = Literal["left", "right"]


@dataclass
class TokenBatch:
    """A padded batch. Labels are aligned with input_ids (the model shifts them); -100 marks no loss.

    `position_ids` count real tokens only, so left padding and completion-only batches (which continue after
    their prompt) get the absolute positions the unpadded sequence would have. `lengths` are real tokens
    per row, `prompt_lengths` the real prompt tokens of each row's pair. `answer_mask` is the part of
    `completion_mask` that is the answer itself (without the end-of-turn suffix).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    completion_mask: torch.Tensor
    prompt_lengths: torch.Tensor
    lengths: torch.Tensor
    padding_side: PaddingSide
    meta: list[dict[str, Any]] = field(default_factory=list)
    answer_mask: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> TokenBatch:
        moved = {k: getattr(self, k).to(device) for k in ("input_ids", "attention_mask", "position_ids", "labels",
                                                          "completion_mask", "prompt_lengths", "lengths")}
        if self.answer_mask is not None:
            moved["answer_mask"] = self.answer_mask.to(device)
        return TokenBatch(**moved, padding_side=self.padding_side, meta=self.meta)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "position_ids": self.position_ids}


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Tokens every sequence starts with, leaving at least one token of each after them (the part that
    can be computed once and shared as a KV cache)."""
    if not sequences:
        return 0
    first = sequences[0]
    length = min(len(s) for s in sequences) - 1
    for other in sequences[1:]:
        same = 0
        for a, b in zip(first[:length], other, strict=False):
            if a != b:
                break
            same += 1
        length = same
    return max(0, length)


def collate_pairs(encoded: Sequence[EncodedPair], side: Side, *, pad_token_id: int,
                  padding_side: PaddingSide = "right") -> TokenBatch:
    """`prompt + completion` sequences of one side; labels mask the prompt and the padding."""
    check_side(side)
    rows, labels, completion, answer = [], [], [], []
    for ep in encoded:
        comp = ep.completion_ids(side)
        n_answer = ep.answer_length(side)
        rows.append(ep.prompt_ids + comp)
        labels.append([IGNORE_INDEX] * len(ep.prompt_ids) + comp)
        completion.append([False] * len(ep.prompt_ids) + [True] * len(comp))
        answer.append([False] * len(ep.prompt_ids) + [True] * n_answer + [False] * (len(comp) - n_answer))
    prompt_lengths = [len(ep.prompt_ids) for ep in encoded]
    batch = _pad(rows, labels, completion, [0] * len(rows), prompt_lengths, pad_token_id, padding_side,
                 [ep.meta for ep in encoded])
    batch.answer_mask = _pad_flags(answer, batch.input_ids.shape[1], padding_side)
    return batch


def collate_prompts(prompts: Sequence[EncodedPair] | Sequence[Sequence[int]], *, pad_token_id: int,
                    padding_side: PaddingSide = "left") -> TokenBatch:
    """Prompt-only batch (left padding by default, for generation or a shared prompt KV cache)."""
    ids = [list(p.prompt_ids) if isinstance(p, EncodedPair) else list(p) for p in prompts]
    meta = [p.meta if isinstance(p, EncodedPair) else {} for p in prompts]
    labels = [[IGNORE_INDEX] * len(r) for r in ids]
    completion = [[False] * len(r) for r in ids]
    return _pad(ids, labels, completion, [0] * len(ids), [len(r) for r in ids], pad_token_id, padding_side, meta)


def collate_completions(encoded: Sequence[EncodedPair], side: Side, *, pad_token_id: int,
                        padding_side: PaddingSide = "right") -> TokenBatch:
    """Completion-only batch, to run after a prompt batch's KV cache.

    Positions continue after each row's prompt. `labels` are the completion ids themselves: with the prompt
    in the cache, the logit predicting completion token j sits at position j-1 of this batch (for j = 0, at
    the prompt batch's last position). The attention mask of the call is the prompt batch's mask followed
    by this one's.
    """
    check_side(side)
    rows = [list(ep.completion_ids(side)) for ep in encoded]
    completion = [[True] * len(r) for r in rows]
    prompt_lengths = [len(ep.prompt_ids) for ep in encoded]
    return _pad(rows, [list(r) for r in rows], completion, prompt_lengths, prompt_lengths, pad_token_id,
                padding_side, [ep.meta for ep in encoded])


def _pad_flags(flags: list[list[bool]], width: int, padding_side: PaddingSide) -> torch.Tensor:
    out = torch.zeros((len(flags), width), dtype=torch.bool)
    for b, row in enumerate(flags):
        cols = slice(0, len(row)) if padding_side == "right" else slice(width - len(row), width)
        out[b, cols] = torch.tensor(row, dtype=torch.bool)
    return out


def _pad(rows: list[list[int]], labels: list[list[int]], completion: list[list[bool]], offsets: list[int],
         prompt_lengths: list[int], pad_token_id: int, padding_side: PaddingSide,
         meta: list[dict[str, Any]]) -> TokenBatch:
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not rows:
        raise ValueError("cannot collate an empty batch")
    width = max(len(r) for r in rows)
    batch = len(rows)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((batch, width), dtype=torch.long)
    positions = torch.zeros((batch, width), dtype=torch.long)
    label_ids = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    completion_mask = torch.zeros((batch, width), dtype=torch.bool)
    for b, row in enumerate(rows):
        n = len(row)
        cols = slice(0, n) if padding_side == "right" else slice(width - n, width)
        input_ids[b, cols] = torch.tensor(row, dtype=torch.long)
        attention[b, cols] = 1
        positions[b, cols] = torch.arange(offsets[b], offsets[b] + n)
        label_ids[b, cols] = torch.tensor(labels[b], dtype=torch.long)
        completion_mask[b, cols] = torch.tensor(completion[b], dtype=torch.bool)
    return TokenBatch(input_ids, attention, positions, label_ids, completion_mask,
                      torch.tensor(prompt_lengths, dtype=torch.long),
                      torch.tensor([len(r) for r in rows], dtype=torch.long), padding_side, list(meta))
