"""Models spread over devices (accelerate's device_map, with disk offload) steer exactly like undispatched ones.

On CPU the offload path is real: a layer mapped to "disk" keeps its weights on `meta` between calls and its
dispatch hook loads them for the call, so "the first parameter's device" is wrong there — the bug peers had
with steering tensors on the wrong GPU. Each test compares a dispatched model with an undispatched copy of the
same weights (the independent computation). The CUDA variant runs only where a GPU exists.
"""

from __future__ import annotations

import copy

import pytest
import torch

from test_training import CharTokenizer, small_config, toy_pairs
from tiny_models import VOCAB, tiny_model
from unisteer.engine.architecture import model_structure
from unisteer.engine.devices import input_device, is_offloaded, module_device
from unisteer.engine.merge import merge
from unisteer.engine.scoring import completion_nll
from unisteer.engine.steering import Steering
from unisteer.engine.updates import FORMS, create_update
from unisteer.errors import UnisteerError
from unisteer.training.trainer import train_update

accelerate = pytest.importorskip("accelerate")

OFFLOADED = 1  # the steered layer is the offloaded one: the hard case
ARCHS = ["llama", "qwen2", "gpt2", "gemma3"]


def device_map(model, offloaded: set[int], other: str = "cpu", head: str | None = None) -> dict[str, str]:
    """Every decoder layer on `other` except `offloaded` on disk; the rest of the stack on `other`."""
    structure = model_structure(model)
    owner = structure.layers_path.rsplit(".", 1)[0]
    mapping: dict[str, str] = {}
    for name, _ in model.get_submodule(owner).named_children():
        path = f"{owner}.{name}"
        if path == structure.layers_path:
            for i in range(structure.num_layers):
                mapping[f"{path}.{i}"] = "disk" if i in offloaded else other
        else:
            mapping[path] = other
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    for name, _ in model.named_children():
        if name != owner.split(".")[0]:
            mapping[name] = other if tied else (head or "disk")
    return mapping


def dispatched(model, tmp_path, offloaded=frozenset({OFFLOADED}), **kwargs):
    twin = copy.deepcopy(model)
    return accelerate.dispatch_model(twin, device_map=device_map(twin, set(offloaded), **kwargs),
                                     offload_dir=str(tmp_path / "offload"), force_hooks=True)


def randomized(update, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in update.parameters():
            p.copy_(torch.randn(p.shape, generator=g).to(p.device) * 0.5)
    return update.eval()


def inputs(batch=3, length=8):
    ids = torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in one row
    return ids, mask


def test_the_offload_map_really_offloads(tmp_path):
    model = tiny_model("llama")
    spread = dispatched(model, tmp_path)
    down_proj = model_structure(spread).down_proj(OFFLOADED)
    assert is_offloaded(down_proj) and not is_offloaded(model_structure(spread).down_proj(0))
    assert module_device(down_proj).type == "cpu" and input_device(spread).type == "cpu"
    update = create_update(spread, "lora", OFFLOADED, rank=2)
    assert all(p.device.type == "cpu" for p in update.parameters())  # beside its layer, never on meta


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("form", FORMS)
def test_steered_logits_match_the_undispatched_model(tmp_path, arch, form):
    model = tiny_model(arch)
    update = randomized(create_update(model, form, OFFLOADED, rank=2, positions="from:4"))
    spread = dispatched(model, tmp_path)
    ids, mask = inputs()
    m = torch.tensor([2.0, -1.0, 0.5])  # per row
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        assert torch.allclose(spread(input_ids=ids, attention_mask=mask).logits, plain, atol=1e-5)
        with Steering(model, update, multiplier=m):
            expected = model(input_ids=ids, attention_mask=mask).logits
        with Steering(spread, update, multiplier=m):
            got = spread(input_ids=ids, attention_mask=mask).logits
    assert (expected - plain).abs().max() > 1e-3  # the update does something
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cached_generation_and_completion_scores_match(tmp_path, arch):
    model = tiny_model(arch)
    update = randomized(create_update(model, "vector", OFFLOADED, positions="generated"))
    spread = dispatched(model, tmp_path)
    ids, mask = inputs()
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=mask)
    outputs = []
    for net in (model, spread):
        with torch.no_grad(), Steering(net, update, multiplier=3.0):
            outputs.append(net.generate(ids, **settings))
    torch.testing.assert_close(outputs[1], outputs[0])
    labels = ids.clone()
    labels[:, :5] = -100
    scores = []
    for net in (model, spread):  # the dense lm-head path, with the head offloaded on the dispatched model
        with torch.no_grad(), Steering(net, update, multiplier=3.0, positions="all"):
            scores.append(completion_nll(net, ids, mask, labels).nll_sum)
    torch.testing.assert_close(scores[1], scores[0], atol=1e-5, rtol=1e-5)


def test_merge_refuses_offloaded_weights_and_merges_resident_ones(tmp_path):
    model = tiny_model("llama")
    spread = dispatched(model, tmp_path)
    offloaded = randomized(create_update(spread, "vector", OFFLOADED))
    with pytest.raises(UnisteerError, match="offloaded by the device_map"):
        merge(spread, offloaded, 1.0)
    resident = randomized(create_update(spread, "local_weight", 0))
    ids, mask = inputs()
    with torch.no_grad():
        with Steering(spread, resident, multiplier=1.5):
            hooked = spread(input_ids=ids, attention_mask=mask).logits
        handle = merge(spread, resident, 1.5)
        merged = spread(input_ids=ids, attention_mask=mask).logits
        handle.restore()
    torch.testing.assert_close(merged, hooked, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("form", ["vector", "lora"])
def test_training_on_a_dispatched_model_matches(tmp_path, form):
    model = tiny_model("llama")
    spread = dispatched(model, tmp_path, offloaded={0, OFFLOADED})  # layers below the update offloaded too
    config = small_config("split", form, batch_size=2, epochs=1, layer=OFFLOADED)
    runs = [train_update(net, CharTokenizer(), toy_pairs(6), config, out_dir=tmp_path / name, progress=False)
            for net, name in ((model, "plain"), (spread, "spread"))]
    losses = [[r["loss"] for r in run.metrics] for run in runs]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4, abs=1e-6)
    for a, b in zip(runs[0].update.parameters(), runs[1].update.parameters(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: layers split between cuda:0 and the CPU")
@pytest.mark.parametrize("form", FORMS)
def test_layers_split_between_gpu_and_cpu(tmp_path, form):
    model = tiny_model("llama")
    update = randomized(create_update(model, form, OFFLOADED, rank=2, positions="from:4"))
    spread = dispatched(model, tmp_path, other="cuda:0", head="cpu")
    ids, mask = inputs()
    with torch.no_grad():
        with Steering(model, update, multiplier=2.0):
            expected = model(input_ids=ids, attention_mask=mask).logits
        with Steering(spread, update.to("cuda:0"), multiplier=torch.tensor([2.0, 2.0, 2.0])):
            got = spread(input_ids=ids.cuda(), attention_mask=mask.cuda()).logits
    torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-4)
