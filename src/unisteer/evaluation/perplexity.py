"""Steered perplexity of reference answers (AlpacaEval): a judge-free measure of utility at each m.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from ..data.batches import collate_pairs
from ..data.rendering import EncodedPair, PairEncoder
from ..engine.scoring import completion_nll_from_hidden
from ..engine.updates import Update
from ..errors import DataError, UnisteerError
from .choices import evaluation_grid, positive_int, steered_final_hidden


@dataclass
class PerplexityByM:
    """Teacher-forced NLL of reference completions at each multiplier; `nll_sum[j, i]` is text i at m_j."""

    multipliers: list[float]
    nll_sum: np.ndarray  # [M, N] float64
    n_tokens: np.ndarray  # [N]
    n_truncated: int
    method: dict[str, Any]

    def rows(self) -> list[dict[str, Any]]:
        total_tokens = int(self.n_tokens.sum())
        out = []
        for j, m in enumerate(self.multipliers):
            token_nll = float(self.nll_sum[j].sum() / total_tokens)
            out.append({"multiplier": m, "perplexity": math.exp(token_nll), "mean_token_nll": token_nll,
                        "mean_example_nll": float((self.nll_sum[j] / self.n_tokens).mean()),
                        "n_texts": int(self.nll_sum.shape[1]), "n_tokens": total_tokens,
                        "n_truncated": self.n_truncated})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "rows": self.rows(), "nll_sum": self.nll_sum.tolist(),
                "n_tokens": self.n_tokens.tolist()}


@dataclass(frozen=True)
class ReferenceText:
    """A prompt and a reference completion whose likelihood measures the steered model's utility."""

    prompt: str
    completion: str
    meta: dict[str, Any] = field(default_factory=dict)


def load_reference_texts(path: str | Path | None = None, *, limit: int | None = None,
                         data_dir: str | Path | None = None) -> list[ReferenceText]:
    """AlpacaEval (instruction, reference output) pairs from `alpaca-eval/alpaca_eval.jsonl` (file order;
    `limit` keeps the first ones). Any JSONL with `instruction` and `output` fields works as `path`."""
    from ..data.builtin import find_data_dir
    from ..data.readers import jsonl_rows, text_field

    file = Path(path) if path is not None else find_data_dir(data_dir) / "alpaca-eval" / "alpaca_eval.jsonl"
    if not file.is_file():
        raise DataError(f"{file}: no such reference-text file")
    texts = []
    for line, row in jsonl_rows(file):
        completion = text_field(row, "output", file, line, "line")
        if not completion.strip():
            raise DataError(f"{file}:{line}: empty field 'output'")
        texts.append(ReferenceText(text_field(row, "instruction", file, line, "line"), completion,
                                   {"file": file.name, "line": line}))
        if limit is not None and len(texts) >= limit:
            break
    return texts


def steered_perplexity(model: nn.Module, tokenizer: Any, texts: Sequence[ReferenceText], update: Update | None,
                       multipliers: Sequence[float] = (0.0,), *, encoder: PairEncoder | None = None,
                       max_length: int = 512, include_end_of_turn: bool = True, batch_rows: int = 16,
                       use_prefix: bool = True, progress: bool = True) -> PerplexityByM:
    """Perplexity of each reference completion given its chat-rendered prompt, at every multiplier.

    perplexity = exp(Σ NLL / Σ tokens) over all completion tokens (prompt tokens excluded). With
    `include_end_of_turn` the template's end-of-turn suffix is scored too (as for training pairs).
    A completion that does not fit `max_length` together with its prompt is cut from its end and counted.
    """
    if not texts:
        raise DataError("no reference texts to score")
    encoder = encoder or PairEncoder(tokenizer)
    grid = evaluation_grid(multipliers, update)
    encoded, n_truncated = [], 0
    for i, text in enumerate(texts):
        prompt_ids = encoder.encode_prompt(text.prompt)
        suffix = encoder.turn_end if include_end_of_turn else ""
        completion_ids = tokenizer(text.completion + suffix, add_special_tokens=False)["input_ids"]
        room = max_length - len(prompt_ids)
        if room < 1:
            raise DataError(f"reference text {i}: the prompt alone has {len(prompt_ids)} tokens, max_length is "
                            f"{max_length}; raise max_length")
        if len(completion_ids) > room:
            completion_ids, n_truncated = completion_ids[:room], n_truncated + 1
        encoded.append(EncodedPair(prompt_ids, completion_ids, completion_ids))
    nll = np.zeros((len(grid), len(texts)))
    n_tokens = np.array([len(e.positive_ids) for e in encoded])
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i].prompt_ids) + len(encoded[i].positive_ids))
    per_batch = max(1, positive_int(batch_rows, "batch_rows") // len(grid))
    bar = tqdm(total=len(texts) * len(grid), desc="perplexity", unit="row", disable=not progress)
    try:
        for start in range(0, len(texts), per_batch):
            chosen = order[start:start + per_batch]
            batch = collate_pairs([encoded[i] for i in chosen], "positive", pad_token_id=encoder.pad_token_id,
                                  padding_side="right")
            for m_index, hidden in steered_final_hidden(model, update, grid, batch.input_ids, batch.attention_mask,
                                                   batch.prompt_lengths, batch_rows, use_prefix):
                scores = completion_nll_from_hidden(model, hidden, batch.labels.repeat(len(m_index), 1))
                values = scores.nll_sum.view(len(m_index), len(chosen)).cpu().double().numpy()
                if not np.isfinite(values).all():
                    bad = [grid[m_index[r]] for r in np.nonzero(~np.isfinite(values).all(axis=1))[0]]
                    raise UnisteerError(f"perplexity: non-finite NLL at m = {bad} (the steered model's logits "
                                        "overflowed; use a smaller |m| or float32)")
                nll[np.ix_(m_index, chosen)] = values
                bar.update(values.size)
    finally:
        bar.close()
    method = {"max_length": max_length, "include_end_of_turn": include_end_of_turn,
              "rendering": encoder.describe(), "aggregate": "exp(sum NLL / sum completion tokens)"}
    return PerplexityByM(grid, nll, n_tokens, n_truncated, method)
