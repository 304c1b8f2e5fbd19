"""Steered generation against plain one-by-one `model.generate`, sampling reproducibility, resumable storage."""

from __future__ import annotations

import json

import pytest
import torch

from tiny_models import CONFIGS
from unisteer.data.rendering import PairEncoder
from unisteer.engine.steering import Steering
from unisteer.engine.updates import create_update
from unisteer.errors import ConfigError, DataError, ModelError, UnisteerError
from unisteer.generation.generate import PerRowSampler, PromptInput, generate_steered, read_generations
from unisteer.generation.sampling import SamplingConfig, cut_at_stop, stop_token_ids, top_p_filter

PROMPTS = ["Hi", "Tell me a long story about a dragon who learned to fly again.", "Is 7 prime?",
           "What is the capital of France and why is it famous?"]


@pytest.fixture(scope="session")
def smol_tokenizer():
    import transformers

    from unisteer.engine.models import ensure_alias

    try:
        path = ensure_alias("smollm2-135m-instruct")
    except ModelError as exc:
        pytest.skip(f"default model's tokenizer not available offline: {exc}")
    return transformers.AutoTokenizer.from_pretrained(path)


def tiny_over_vocab(arch: str, tokenizer, seed: int = 0, scale: float = 1.0):
    """A random tiny model of `arch` over the real tokenizer's vocabulary, with weights scaled up so that
    next-token distributions are peaked (greedy choices are then far from ties)."""
    import transformers

    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    config.vocab_size = len(tokenizer)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 2
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    model.eval()
    model.requires_grad_(False)
    model.config.unisteer_model_id = f"tiny-{arch}-smol-vocab"
    return model


def random_update(model, form="vector", layer=1, seed=3, scale=1.0):
    update = create_update(model, form, layer, rank=2, seed=0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in update.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return update.eval()


def reference_generate(model, tokenizer, prompt, update, m, max_new_tokens):
    """Plain one-prompt `model.generate` (no padding) with a scalar multiplier, cut at the stop tokens."""
    encoder = PairEncoder(tokenizer)
    ids = torch.tensor([encoder.encode_prompt(prompt)])
    stop = stop_token_ids(tokenizer, encoder.turn_end, model)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop, pad_token_id=encoder.pad_token_id)
    with torch.no_grad():
        if update is None:
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        else:
            with Steering(model, update, multiplier=m):
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    new = out[0, ids.shape[1]:].tolist()
    cut = next((k for k, t in enumerate(new) if t in stop), len(new))
    return new[:cut]


# ------------------------------------------------------------------------------------------ greedy equality


@pytest.mark.parametrize("arch,form", [("llama", "vector"), ("qwen2", "lora"), ("gpt2", "local_weight")])
def test_batched_greedy_equals_one_by_one_under_steering(smol_tokenizer, arch, form):
    model = tiny_over_vocab(arch, smol_tokenizer, scale=8.0)
    update = random_update(model, form, scale=0.5)
    multipliers = [-3.0, 0.0, 2.0]
    settings = SamplingConfig(max_new_tokens=6)
    gens = generate_steered(model, smol_tokenizer, PROMPTS, update, multipliers, settings, progress=False,
                            batch_size=5)  # batches mix prompts and multipliers
    assert [(g.prompt_index, g.multiplier) for g in gens] == [(i, m) for i in range(len(PROMPTS)) for m in multipliers]
    differs = False
    for g in gens:
        expected = reference_generate(model, smol_tokenizer, PROMPTS[g.prompt_index], update, g.multiplier, 6)
        assert g.text == smol_tokenizer.decode(expected, skip_special_tokens=True), (g.prompt_index, g.multiplier)
        assert g.n_new_tokens == len(expected)
        differs |= g.multiplier != 0 and g.text != gens[g.prompt_index * 3 + 1].text
    assert differs, "steering should change at least one generation"


def test_zero_multiplier_equals_plain_model(smol_tokenizer):
    model = tiny_over_vocab("llama", smol_tokenizer, scale=8.0)
    update = random_update(model, "vector", scale=2.0)
    gens = generate_steered(model, smol_tokenizer, PROMPTS, update, [0.0, 5.0],
                            SamplingConfig(max_new_tokens=5), progress=False, batch_size=8)
    plain = generate_steered(model, smol_tokenizer, PROMPTS, None, [0.0],
                             SamplingConfig(max_new_tokens=5), progress=False)
    for g in gens:
        expected = reference_generate(model, smol_tokenizer, g.prompt, None, 0.0, 5)
        if g.multiplier == 0.0:
            assert g.text == smol_tokenizer.decode(expected, skip_special_tokens=True)
            assert g.text == plain[g.prompt_index].text
    assert plain[0].update_id is None and gens[0].update_id is not None
    assert any(g.text != plain[g.prompt_index].text for g in gens if g.multiplier == 5.0)


# ------------------------------------------------------------------------------------------ sampling


def test_sampling_reproduces_and_does_not_depend_on_batching(smol_tokenizer):
    model = tiny_over_vocab("llama", smol_tokenizer, scale=3.0)
    update = random_update(model)
    settings = dict(max_new_tokens=6, temperature=1.3, top_p=0.95, seed=11)

    def run(batch_size=8, **over):
        return generate_steered(model, smol_tokenizer, PROMPTS[:2], update, [0.0, 1.0], {**settings, **over},
                                progress=False, samples=2, batch_size=batch_size)

    first, again, rebatched = run(batch_size=8), run(batch_size=8), run(batch_size=3)
    texts = [g.text for g in first]
    assert texts == [g.text for g in again] == [g.text for g in rebatched]
    assert len(first) == 2 * 2 * 2 and {g.sample for g in first} == {0, 1}
    # The two samples of a prompt differ, and another seed gives other samples.
    assert any(a.text != b.text for a, b in zip(first[0::4], first[2::4], strict=True))
    assert texts != [g.text for g in run(batch_size=8, seed=12)]
    # Common random numbers: every multiplier of a (prompt, sample) uses the same seed.
    assert all(first[k].seed == first[k + 1].seed for k in range(0, len(first), 2))


def test_per_row_sampler_follows_temperature_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    temperature = 2.0
    sampler = PerRowSampler([5], SamplingConfig(temperature=temperature), torch.device("cpu"))
    counts = torch.zeros(4)
    draws = 4000
    for _ in range(draws):
        forced = sampler(torch.zeros(1, 1, dtype=torch.long), logits.clone())
        assert (forced[0] == 0).sum() == 1 and torch.isinf(forced[0]).sum() == 3
        counts[forced[0].argmax()] += 1
    expected = torch.softmax(logits[0] / temperature, -1)
    assert torch.allclose(counts / draws, expected, atol=0.03), (counts / draws, expected)


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    torch.testing.assert_close(top_p_filter(probs, 0.7), torch.tensor([[0.0, 0.625, 0.0, 0.375]]))
    torch.testing.assert_close(top_p_filter(probs, 0.81), torch.tensor([[0.15, 0.5, 0.0, 0.3]]) / 0.95)
    torch.testing.assert_close(top_p_filter(probs, 0.3), torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    torch.testing.assert_close(top_p_filter(probs, 1.0), probs)


def test_stop_strings_cut_the_text():
    assert cut_at_stop("Yes. And then", [". ", "then"]) == ("Yes", True)
    assert cut_at_stop("No stop here", ["!"]) == ("No stop here", False)


# ------------------------------------------------------------------------------------------ storage


def test_results_are_stored_incrementally_and_resume(smol_tokenizer, tmp_path):
    model = tiny_over_vocab("llama", smol_tokenizer, scale=8.0)
    update = random_update(model)
    update.spec.name = "demo"
    path = tmp_path / "gens.jsonl"
    prompts = [PromptInput(p, {"concept": "dragons", "k": i}) for i, p in enumerate(PROMPTS)]
    settings = SamplingConfig(max_new_tokens=4)
    full = generate_steered(model, smol_tokenizer, prompts, update, [-1.0, 2.0], settings, path, progress=False,
                            batch_size=3)
    lines = path.read_text().splitlines()
    assert len(lines) == 8
    record = json.loads(lines[0])
    assert {"prompt", "multiplier", "update_name", "update_id", "settings", "text", "run_key", "meta"} <= set(record)
    assert record["update_name"] == "demo" and record["settings"] == {"max_new_tokens": 4, "stop": []}
    assert full[1].meta == {"concept": "dragons", "k": 0}

    # An interrupted run: three rows lost, the last line torn mid-write.
    path.write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])
    calls = []
    handle = model.register_forward_pre_hook(lambda *args: calls.append(1))
    resumed = generate_steered(model, smol_tokenizer, prompts, update, [-1.0, 2.0], settings, path, progress=False,
                               batch_size=3)
    handle.remove()
    assert [g.text for g in resumed] == [g.text for g in full]
    assert 1 <= len(calls) <= 4, "only the three missing rows (one batch, 4 decoding steps) are generated"
    assert len(read_generations(path)) == 8
    # A grown grid generates only the new multiplier.
    grown = generate_steered(model, smol_tokenizer, prompts, update, [-1.0, 2.0, 0.0], settings, path,
                             progress=False, batch_size=3)
    assert len(grown) == 12 and len(read_generations(path)) == 12

    # Another update or other settings never mix into this file.
    with pytest.raises(UnisteerError, match="another run"):
        generate_steered(model, smol_tokenizer, prompts, random_update(model, seed=9), [2.0], settings, path,
                         progress=False)
    with pytest.raises(UnisteerError, match="another run"):
        generate_steered(model, smol_tokenizer, prompts, update, [2.0], SamplingConfig(max_new_tokens=5), path,
                         progress=False)
    (tmp_path / "bad.jsonl").write_text('{"format": "something else"}\n{"x": 1}\n')
    with pytest.raises(DataError, match="bad.jsonl:1: not a unisteer generation record"):
        read_generations(tmp_path / "bad.jsonl")


# ------------------------------------------------------------------------------------------ validation


def test_settings_and_inputs_are_validated(smol_tokenizer):
    assert SamplingConfig.from_dict({"max_new_tokens": 8}).max_new_tokens == 8
    with pytest.raises(ConfigError, match="unknown key"):
        SamplingConfig.from_dict({"max_tokens": 8})
    model = tiny_over_vocab("llama", smol_tokenizer)
    with pytest.raises(ConfigError, match="samples > 1 needs a temperature"):
        generate_steered(model, smol_tokenizer, ["Hi"], None, [0.0], samples=2, progress=False)
    with pytest.raises(ConfigError, match="temperature"):
        SamplingConfig(temperature=-1.0)
    with pytest.raises(ConfigError, match="top_p"):
        SamplingConfig(top_p=1.5)
    assert SamplingConfig(top_p=0.5).key() == SamplingConfig().key()  # greedy ignores top_p and seed
    with pytest.raises(ConfigError, match="without an update only m = 0"):
        generate_steered(model, smol_tokenizer, ["Hi"], None, [1.0], progress=False)
    with pytest.raises(ConfigError, match="single string"):
        generate_steered(model, smol_tokenizer, "Hi", None, progress=False)
    with pytest.raises(ConfigError, match="duplicated multiplier"):
        generate_steered(model, smol_tokenizer, ["Hi"], random_update(model), [1.0, 1.0], progress=False)
