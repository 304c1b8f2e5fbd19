"""The update engine's must-hold properties, over every form × insertion × architecture."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tiny_models import ARCHITECTURES, BLOCK_EQUALS_DOWN_PROJ, VOCAB, tiny_model
from unisteer.engine.architecture import model_structure
from unisteer.engine.merge import block_output_equals_down_proj, merge
from unisteer.engine.steering import Steering
from unisteer.engine.storage import export_peft_adapter, load_update, save_update
from unisteer.engine.updates import FORMS, INSERTIONS, LoRAUpdate, Positions, create_update
from unisteer.errors import ConfigError, ModelError, UnisteerError, UpdateMismatchError

LAYER = 1
MATRIX = [(arch, form, ins) for arch in ARCHITECTURES for form in FORMS for ins in INSERTIONS]


def randomized(update, seed=1, scale=0.5):
    """Give every parameter random values (LoRA B and local weights start at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in update.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return update.eval()


def make(arch, form, insertion="block_output", positions="all", seed=1):
    model = tiny_model(arch)
    update = create_update(model, form, LAYER, insertion=insertion, rank=3, positions=positions, seed=0)
    return model, randomized(update, seed)


def batch_ids(batch=3, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_structure_found(arch):
    structure = model_structure(tiny_model(arch))
    assert structure.num_layers == 3 and structure.hidden_size == 32 and structure.intermediate_size == 48


def test_unsupported_model_lists_what_was_found():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"num_hidden_layers": 2, "hidden_size": 8})()
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)) for _ in range(2)])

    with pytest.raises(ModelError, match=r"found 0; linear maps in this layer: 0 \(8->8\), 1 \(8->8\)"):
        model_structure(Odd())


@pytest.mark.parametrize("arch,form,insertion", MATRIX)
def test_zero_multiplier_is_plain_model_bit_for_bit(arch, form, insertion):
    model, update = make(arch, form, insertion)
    ids = batch_ids()
    plain = model(input_ids=ids).logits
    with Steering(model, update, multiplier=0.0):
        assert torch.equal(model(input_ids=ids).logits, plain)
    with Steering(model, update, multiplier=torch.zeros(ids.shape[0])):
        assert torch.equal(model(input_ids=ids).logits, plain)
    with Steering(model, update, multiplier=1.0):
        assert not torch.allclose(model(input_ids=ids).logits, plain)
    assert torch.equal(model(input_ids=ids).logits, plain), "removing the hooks restores the model"


@pytest.mark.parametrize("arch,form,insertion", MATRIX)
def test_merge_matches_hooks_where_spec_says(arch, form, insertion):
    model, update = make(arch, form, insertion)
    ids = batch_ids()
    m = 1.7
    with Steering(model, update, multiplier=m):
        hooked = model(input_ids=ids).logits
    mergeable = insertion == "down_proj" or arch in BLOCK_EQUALS_DOWN_PROJ
    assert block_output_equals_down_proj(model, LAYER) == (arch in BLOCK_EQUALS_DOWN_PROJ)
    if not mergeable:
        with pytest.raises(UnisteerError, match="cannot merge a block_output update"):
            merge(model, update, m)
        return
    plain = model(input_ids=ids).logits
    handle = merge(model, update, m)
    merged = model(input_ids=ids).logits
    torch.testing.assert_close(merged, hooked, atol=1e-4, rtol=1e-4)
    handle.restore()
    assert torch.equal(model(input_ids=ids).logits, plain)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_mergeability_probe_holds_in_bf16(arch):
    """bf16 rounding must not make a Llama-style block look unmergeable (it refused SmolLM2 in bf16)."""
    model = tiny_model(arch, dtype=torch.bfloat16)
    assert block_output_equals_down_proj(model, LAYER) == (arch in BLOCK_EQUALS_DOWN_PROJ)
    if arch in BLOCK_EQUALS_DOWN_PROJ:
        update = randomized(create_update(model, "vector", LAYER, seed=0))
        ids = batch_ids()
        with Steering(model, update, multiplier=1.0):
            hooked = model(input_ids=ids).logits.float()
        handle = merge(model, update, 1.0)
        merged = model(input_ids=ids).logits.float()
        handle.restore()
        assert (merged - hooked).abs().max() <= 0.05 * (hooked.abs().max() + 1)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("form", FORMS)
def test_per_row_multiplier_equals_separate_calls(arch, form):
    model, update = make(arch, form)
    ids = batch_ids()
    ms = torch.tensor([2.0, -1.0, 0.5])
    with Steering(model, update, multiplier=ms):
        together = model(input_ids=ids).logits
    for row, m in enumerate(ms.tolist()):
        with Steering(model, update, multiplier=m):
            alone = model(input_ids=ids[row:row + 1]).logits
        torch.testing.assert_close(together[row:row + 1], alone, atol=1e-5, rtol=1e-5)


def _padded(ids_list, side, pad_id=0):
    longest = max(len(x) for x in ids_list)
    input_ids = torch.full((len(ids_list), longest), pad_id)
    mask = torch.zeros((len(ids_list), longest), dtype=torch.long)
    for i, ids in enumerate(ids_list):
        sl = slice(longest - len(ids), longest) if side == "left" else slice(0, len(ids))
        input_ids[i, sl] = torch.tensor(ids)
        mask[i, sl] = 1
    return input_ids, mask


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3", "gpt_neox", "opt"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("positions", ["all", "from:2", "prompt"])
def test_batched_with_padding_equals_unbatched(arch, side, positions):
    model, update = make(arch, "lora", positions=positions)
    rows = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [20, 21, 22, 23]]
    input_ids, mask = _padded(rows, side)
    prompt_lengths = [4, 2, 3]
    steering = Steering(model, update, multiplier=1.5)
    with steering:
        steering.set_prompt_lengths(prompt_lengths)
        # Absolute-position models (GPT-2, OPT) need position ids that skip left padding, as generate() does.
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        batched = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids).logits
        for i, row in enumerate(rows):
            steering.set_prompt_lengths([prompt_lengths[i]])
            alone = model(input_ids=torch.tensor([row])).logits[0]
            got = batched[i][mask[i].bool()]
            torch.testing.assert_close(got, alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2", "gemma3", "gpt2", "gpt_neox", "opt", "phi3"])
@pytest.mark.parametrize("positions", ["all", "generated", "from:5", "prompt"])
def test_cached_generation_equals_uncached_recomputation(arch, positions):
    """Step logits of cached greedy generation equal one full forward over the final sequence."""
    model, update = make(arch, "local_weight", positions=positions)
    rows = [[5, 6, 7, 8], [11, 12, 13, 14, 15, 16]]
    input_ids, mask = _padded(rows, "left")
    steering = Steering(model, update, multiplier=1.3)
    with steering:
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        step_logits = torch.stack(out.logits, dim=1)  # [batch, new, vocab]
        full_mask = torch.cat([mask, torch.ones(2, 5, dtype=torch.long)], dim=1)
        steering.set_prompt_lengths([len(r) for r in rows])
        position_ids = (full_mask.cumsum(-1) - 1).clamp(min=0)
        full = model(input_ids=out.sequences, attention_mask=full_mask, position_ids=position_ids).logits
    recomputed = full[:, input_ids.shape[1] - 1:-1]
    torch.testing.assert_close(step_logits, recomputed, atol=1e-4, rtol=1e-4)
    if positions != "prompt":
        plain = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                               output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        assert not torch.allclose(torch.stack(plain.logits, 1), step_logits), "steering had an effect"


def test_generated_positions_leave_prompt_untouched():
    model, update = make("llama", "vector", positions="generated")
    ids = batch_ids(2, 6)
    plain = model(input_ids=ids).logits
    with Steering(model, update, multiplier=3.0) as steering:
        steering.set_prompt_lengths([4, 6])
        steered = model(input_ids=ids).logits
    assert torch.equal(steered[0, :4], plain[0, :4]) and torch.equal(steered[1], plain[1])
    assert not torch.allclose(steered[0, 4:], plain[0, 4:])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_several_updates_sum_at_same_and_different_layers(arch):
    model = tiny_model(arch)
    u1 = randomized(create_update(model, "vector", 1, seed=0), 1)
    u2 = randomized(create_update(model, "lora", 1, rank=2, seed=0), 2)
    u3 = randomized(create_update(model, "local_weight", 2, seed=0), 3)
    ids = batch_ids()
    with Steering(model, [u1, u2, u3], multiplier=[1.0, -2.0, 0.5]):
        together = model(input_ids=ids).logits
    with Steering(model, u1, 1.0), Steering(model, u2, -2.0), Steering(model, u3, 0.5):
        nested = model(input_ids=ids).logits
    torch.testing.assert_close(together, nested, atol=1e-5, rtol=1e-5)
    # Δh adds linearly at one layer: u1 at m plus u1 at m equals u1 at 2m.
    with Steering(model, [u1, u1], multiplier=1.5):
        twice = model(input_ids=ids).logits
    with Steering(model, u1, multiplier=3.0):
        double = model(input_ids=ids).logits
    torch.testing.assert_close(twice, double, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("form", FORMS)
def test_gradients_reach_only_update_parameters(form):
    model, update = make("llama", form)
    update.train()
    with Steering(model, update, multiplier=torch.tensor([1.0, 2.0, -1.0])):
        loss = model(input_ids=batch_ids()).logits.float().pow(2).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in update.parameters())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("form", ["lora", "local_weight"])
def test_analytic_gradient_of_down_proj_update(form):
    """dL/dΔW equals m · Σ_t g_t a_tᵀ with g the gradient at the down-projection output (autograd check)."""
    model, update = make("llama", form, insertion="down_proj")
    update.train()
    update.spec.dropout = 0.0
    captured = {}
    down = model_structure(model).down_proj(LAYER)
    m = 1.5
    with Steering(model, update, multiplier=m):
        # Registered after the steering hook, so it sees the steered output (which carries the graph).
        hook = down.register_forward_hook(lambda mod, args, out: captured.update(a=args[0], out=out))
        out = model(input_ids=batch_ids()).logits.float().pow(2).mean()
        captured["out"].retain_grad()
        out.backward()
    hook.remove()
    a, g = captured["a"], captured["out"].grad
    grad_w = m * torch.einsum("btd,bti->di", g, a)
    if form == "local_weight":
        torch.testing.assert_close(update.weight.grad, grad_w, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(update.bias.grad, m * g.sum((0, 1)), atol=1e-6, rtol=1e-4)
    else:
        torch.testing.assert_close(update.lora_B.grad, grad_w @ update.lora_A.t(), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("as_file", [False, True])
def test_save_load_round_trip_is_exact(tmp_path, form, as_file):
    model, update = make("qwen2", form, positions="from:3")
    update.spec.training = {"objective": "split", "steps": 3}
    path = tmp_path / ("u.safetensors" if as_file else "u")
    save_update(update, path)
    loaded = load_update(path, model)
    assert loaded.spec == update.spec
    for (n1, p1), (n2, p2) in zip(update.named_parameters(), loaded.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
    ids = batch_ids()
    with Steering(model, update, 2.0):
        a = model(input_ids=ids).logits
    with Steering(model, loaded, 2.0):
        b = model(input_ids=ids).logits
    assert torch.equal(a, b)
    with pytest.raises(UnisteerError, match="already exists"):
        save_update(update, path)


def test_load_refuses_other_architecture(tmp_path):
    model, update = make("llama", "lora")
    save_update(update, tmp_path / "u")
    with pytest.raises(UpdateMismatchError, match="config_hash"):
        load_update(tmp_path / "u", tiny_model("qwen2"))
    gpt2 = tiny_model("gpt2")
    with pytest.raises(UpdateMismatchError, match="component"):
        load_update(tmp_path / "u", gpt2)


def test_load_rejects_corrupt_and_unknown(tmp_path):
    model, update = make("llama", "vector")
    save_update(update, tmp_path / "u")
    meta = (tmp_path / "u" / "update.json")
    meta.write_text(meta.read_text().replace('"form": "vector"', '"form": "vector", "colour": "red"'))
    with pytest.raises(UnisteerError, match="unknown key"):
        load_update(tmp_path / "u", model)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UnisteerError, match="bad.safetensors"):
        load_update(tmp_path / "bad.safetensors")
    with pytest.raises(UnisteerError, match="no such update"):
        load_update(tmp_path / "missing")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_export_loads_to_same_outputs(tmp_path, arch):
    peft = pytest.importorskip("peft")
    model, update = make(arch, "lora", insertion="down_proj")
    assert isinstance(update, LoRAUpdate)
    ids = batch_ids()
    with Steering(model, update, 0.8):
        hooked = model(input_ids=ids).logits
    export_peft_adapter(update, model, tmp_path / "adapter", multiplier=0.8)
    peft_model = peft.PeftModel.from_pretrained(model, str(tmp_path / "adapter"))
    torch.testing.assert_close(peft_model(input_ids=ids).logits, hooked, atol=1e-5, rtol=1e-5)


def test_bad_inputs_give_clear_errors():
    model = tiny_model("llama")
    with pytest.raises(ModelError, match="layer 7 is out of range"):
        create_update(model, "vector", 7)
    with pytest.raises(ConfigError, match="form"):
        create_update(model, "adapter", 1)
    with pytest.raises(ConfigError, match="positions.kind"):
        Positions("middle")
    update = create_update(model, "vector", 1)
    with pytest.raises(ConfigError, match="NaN"):
        Steering(model, update, multiplier=torch.tensor([float("nan")]))
    with pytest.raises(ConfigError, match="finite"):
        Steering(model, update, multiplier=float("inf"))
    with Steering(model, update, multiplier=torch.ones(2)), pytest.raises(ConfigError, match="2 values but"):
        model(input_ids=batch_ids(3))
    with pytest.raises(UpdateMismatchError):
        Steering(tiny_model("gpt2"), create_update(tiny_model("llama"), "vector", 2))
