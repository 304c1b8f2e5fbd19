"""DiffMean (CAA), the closed-form baseline vector: the mean layer output over the answer tokens of q+A_p minus
the same for q+A_n, averaged over pairs (SPEC §6).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.batches import collate_pairs
from ..data.pairs import PairDataset, PolarityPair
from ..data.rendering import PairEncoder, Rendering
from ..engine.architecture import check_layer_index, model_structure
from ..engine.devices import input_device
from ..engine.prefix import run_until
from ..engine.updates import INSERTIONS, Update, create_update
from ..errors import ConfigError, DataError
from .sequences import encoder_for

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
    encoder = encoder or encoder_for(tokenizer, max_length, rendering)
    pair_list = list(pairs)
    encoded = encoder.encode_all(pair_list)
    if not encoded:
        raise DataError("diffmean_update: no pairs")
    structure = model_structure(model)
    check_layer_index(layer, structure.num_layers)
    target = structure.layer(layer) if insertion == "block_output" else structure.down_proj(layer)
    device = input_device(model)
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
