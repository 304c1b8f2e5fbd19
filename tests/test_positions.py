"""Position tracking under a KV cache: the steered tokens are the same whether a sequence is run at once or
token by token, with or without an attention mask, whatever keyword the cache arrives under.

A position-restricted update that is silently dropped (or applied to the wrong tokens) on cached steps
changes the logits by the whole steering effect, so every test compares against a teacher-forced full
forward and also checks that steering had an effect at all.
"""

from __future__ import annotations

import pytest
import torch

from tiny_models import tiny_model
from unisteer.engine.hf_compat import CACHE_KEYWORDS, cache_kwargs, call_positions, new_cache, output_cache
from unisteer.engine.steering import Steering
from unisteer.engine.updates import create_update
from unisteer.errors import PositionError, UnisteerError

ARCHS = ["llama", "qwen3", "gemma3", "gpt2", "gpt_neox", "opt", "phi3"]
POSITIONS = ["from:5", "generated", "prompt"]
STEPS = 10


def _model_and_update(arch: str, positions: str):
    model = tiny_model(arch)
    update = create_update(model, "local_weight", 1, positions=positions, seed=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in update.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model, update.eval()


def _padded(rows, side):
    longest = max(map(len, rows))
    ids = torch.zeros((len(rows), longest), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        sl = slice(longest - len(row), longest) if side == "left" else slice(0, len(row))
        ids[i, sl], mask[i, sl] = torch.tensor(row), 1
    return ids, mask


def _full_forward(model, steering, sequences, mask, prompt_lengths):
    steering.set_prompt_lengths(prompt_lengths)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=sequences, attention_mask=mask, position_ids=positions).logits


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("keyword", ["native", "past_key_values"])
def test_manual_cached_decoding_without_mask_equals_full_forward(arch, positions, keyword):
    """Prompt, then STEPS single-token calls with the cache and no attention mask (the case that silently
    dropped a from:K update when the cache keyword was renamed). The cache goes in under the keyword this
    transformers names, and under the older `past_key_values` that newer releases still accept."""
    model, update = _model_and_update(arch, positions)
    prompt = torch.tensor([[5, 6, 7, 8]])
    tokens = torch.tensor([[9 + i for i in range(STEPS)]])
    sequence = torch.cat([prompt, tokens], dim=1)
    with Steering(model, update, multiplier=1.3) as steering:
        cache = new_cache(model)
        passed = cache_kwargs(model, cache) if keyword == "native" else {keyword: cache}
        step_logits = [model(input_ids=prompt, use_cache=True, **passed).logits[:, -1]]
        for i in range(STEPS - 1):
            out = model(input_ids=tokens[:, i:i + 1], use_cache=True, **passed)
            step_logits.append(out.logits[:, -1])
        cached = torch.stack(step_logits, dim=1)
        steering.set_prompt_lengths([prompt.shape[1]])
        full = model(input_ids=sequence).logits[:, prompt.shape[1] - 1:-1]
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)
    plain = model(input_ids=sequence).logits[:, prompt.shape[1] - 1:-1]
    if positions != "prompt":
        assert (full - plain).abs().max() > 1e-2, "steering had an effect on the generated tokens"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_masked_cached_decoding_with_padding_equals_full_forward(arch, positions, side):
    """A padded batch decoded token by token with a growing 2-D mask and padding-aware position ids (as the
    server does), against one full forward. model.generate with left padding is covered in test_engine;
    generate() with right padding numbers new tokens by its own convention, so it is no oracle here."""
    model, update = _model_and_update(arch, positions)
    rows = [[5, 6, 7, 8], [11, 12, 13, 14, 15, 16]]
    input_ids, mask = _padded(rows, side)
    new_tokens = torch.tensor([[20 + i, 40 + i] for i in range(STEPS)]).t()  # [batch, STEPS]
    with Steering(model, update, multiplier=1.3) as steering:
        cache = new_cache(model)
        kwargs = cache_kwargs(model, cache)
        positions_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions_ids, use_cache=True, **kwargs)
        last_real = mask.sum(-1) - 1 if side == "right" else torch.full((2,), input_ids.shape[1] - 1)
        step_logits = [out.logits[torch.arange(2), last_real]]
        step_mask = mask
        for i in range(STEPS - 1):
            step_mask = torch.cat([step_mask, torch.ones((2, 1), dtype=torch.long)], dim=1)
            out = model(input_ids=new_tokens[:, i:i + 1], attention_mask=step_mask,
                        position_ids=step_mask.sum(-1, keepdim=True) - 1, use_cache=True, **kwargs)
            step_logits.append(out.logits[:, -1])
        cached = torch.stack(step_logits, dim=1)
        sequences = torch.cat([input_ids, new_tokens], dim=1)
        full_mask = torch.cat([mask, torch.ones_like(new_tokens)], dim=1)
        full = _full_forward(model, steering, sequences, full_mask, [len(r) for r in rows])
    # Each step's logits come from the last real token before it.
    for b in range(2):
        columns = full_mask[b].nonzero().flatten()
        sources = columns[len(rows[b]) - 1:len(rows[b]) - 1 + STEPS]
        torch.testing.assert_close(cached[b], full[b, sources], atol=1e-4, rtol=1e-4)
    if positions != "prompt":
        plain = model(input_ids=sequences, attention_mask=full_mask,
                      position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0)).logits
        assert (plain - full).abs().max() > 1e-2, "steering had an effect"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_without_mask_equals_full_forward(arch):
    model, update = _model_and_update(arch, "from:6")
    prompt = torch.tensor([[5, 6, 7, 8]])
    with Steering(model, update, multiplier=1.3):
        out = model.generate(input_ids=prompt, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        full = model(input_ids=out.sequences).logits[:, prompt.shape[1] - 1:-1]
    torch.testing.assert_close(torch.stack(out.logits, dim=1), full, atol=1e-4, rtol=1e-4)


def test_inconsistent_signals_refuse_position_restricted_steering():
    """A mask that does not cover cached + new tokens: refuse rather than guess; 'all' needs no positions."""
    model, update = _model_and_update("llama", "from:2")
    prompt = torch.tensor([[5, 6, 7, 8]])
    with Steering(model, update, multiplier=1.0):
        cache = new_cache(model)
        model(input_ids=prompt, use_cache=True, **cache_kwargs(model, cache))
        wrong_mask = torch.ones((1, 2), dtype=torch.long)  # cache holds 4, one new token: should be 5 columns
        with pytest.raises(UnisteerError, match="disagree on how many tokens are already cached"):
            model(input_ids=torch.tensor([[9]]), attention_mask=wrong_mask, use_cache=True,
                  **cache_kwargs(model, cache))


class _OpaqueCache:
    """A cache type that does not report its length."""


def test_call_positions_reads_every_signal():
    ids = torch.zeros((2, 3), dtype=torch.long)
    model = tiny_model("llama")
    cache = new_cache(model)
    model(input_ids=torch.zeros((2, 4), dtype=torch.long), use_cache=True, **cache_kwargs(model, cache))
    for key in CACHE_KEYWORDS:
        assert call_positions({"input_ids": ids, key: cache}).past_length == 4
    assert call_positions({"input_ids": ids}).past_length == 0
    assert call_positions({"input_ids": ids, "cache_position": torch.arange(7, 10)}).past_length is None
    mask = torch.ones((2, 7), dtype=torch.long)
    assert call_positions({"input_ids": ids, "cache": cache, "attention_mask": mask}).past_length == 4
    opaque = _OpaqueCache()
    assert call_positions({"input_ids": ids, "cache": opaque, "attention_mask": mask}).past_length == 4
    assert call_positions({"input_ids": ids, "cache": opaque,
                           "position_ids": torch.arange(5, 8).expand(2, -1)}).past_length == 5
    assert call_positions({"input_ids": ids, "cache": opaque, "cache_position": torch.arange(6, 9)}).past_length == 6
    unknown = call_positions({"input_ids": ids, "cache": opaque})
    assert unknown.past_length is None and "_OpaqueCache" in unknown.problem
    bad = call_positions({"input_ids": ids, "cache": cache, "attention_mask": torch.ones((2, 9))})
    assert bad.past_length is None and "get_seq_length() = 4" in bad.problem
    with pytest.raises(PositionError):
        call_positions({"attention_mask": mask})


def test_output_cache_reads_either_name():
    model = tiny_model("llama")
    out = model(input_ids=torch.tensor([[5, 6]]), use_cache=True)
    assert output_cache(out).get_seq_length() == 2
