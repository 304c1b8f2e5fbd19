"""Completion scoring and the frozen-prefix path against plain full forwards."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tiny_models import ARCHITECTURES, VOCAB, tiny_model
from unisteer.engine.prefix import capture_layer_input, run_from_layer
from unisteer.engine.scoring import completion_nll, final_hidden
from unisteer.engine.steering import Steering
from unisteer.engine.updates import create_update


def padded_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding
    mask[2, :2] = 0  # left padding
    labels = ids.clone()
    labels[:, :5] = -100
    labels[mask == 0] = -100
    return ids, mask, labels


def reference_nll(model, ids, mask, labels):
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits.float()
    logp = F.log_softmax(logits[:, :-1], -1)
    targets = labels[:, 1:]
    keep = targets != -100
    token = -logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
    return token.sum(-1), keep.sum(-1)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_completion_nll_matches_full_logits(arch):
    model = tiny_model(arch)
    ids, mask, labels = padded_batch()
    scores = completion_nll(model, ids, mask, labels)
    expected_sum, expected_n = reference_nll(model, ids, mask, labels)
    torch.testing.assert_close(scores.nll_sum, expected_sum, atol=1e-4, rtol=1e-5)
    assert torch.equal(scores.n_tokens, expected_n)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("form", ["vector", "lora"])
def test_run_from_layer_equals_full_forward_under_steering(arch, form):
    model = tiny_model(arch)
    update = create_update(model, form, 1, rank=2, seed=0)
    with torch.no_grad():
        for p in update.parameters():
            p.normal_(0, 0.5)
    update.eval()
    ids, mask, labels = padded_batch()
    plain_before = final_hidden(model, ids, mask)
    hidden_in = capture_layer_input(model, 1, ids, mask)
    for m in (0.0, 2.0):
        with Steering(model, update, multiplier=m):
            full = final_hidden(model, ids, mask)
            skipped = run_from_layer(model, 1, hidden_in, ids, mask)
        torch.testing.assert_close(skipped, full, atol=1e-5, rtol=1e-5)
    # The pass-throughs are gone afterwards.
    assert torch.equal(final_hidden(model, ids, mask), plain_before)
    assert all(type(layer).__name__ != "_PassThrough" for layer in model.modules())
