"""Training: objective formulas by hand, the trainer's losses against an independent steered forward, preference
going up for every objective × form, DiffMean, cached = uncached, resume = uninterrupted, presets and errors."""

from __future__ import annotations

import json
import math
import os
import time

import pytest
import torch
import torch.nn.functional as F

from tiny_models import ARCHITECTURES, tiny_model
from unisteer.config import from_dict
from unisteer.data.pairs import PairDataset, PolarityPair
from unisteer.data.rendering import PairEncoder
from unisteer.engine.architecture import model_structure
from unisteer.engine.scoring import CompletionScores
from unisteer.engine.storage import load_update
from unisteer.engine.updates import create_update
from unisteer.errors import ConfigError, TrainingError, UnisteerError
from unisteer.training.checkpoint import load_checkpoint
from unisteer.training.config import TrainConfig
from unisteer.training.diffmean import diffmean_update
from unisteer.training.objectives import ProjectingVector, dpo_loss, reps_loss, split_loss
from unisteer.training.presets import preset
from unisteer.training.sequences import evaluate_preference
from unisteer.training.trainer import train_update

LAYER = 1
FORMS = ("vector", "lora", "local_weight")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread. On a shared machine, OpenMP threads spinning for descheduled peers
    made these tests ~10x slower with two threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class CharTokenizer:
    """One token per character (ids 3..100, inside the tiny models' vocabulary) and a small chat template."""

    chat_template = "char-template"
    eos_token = "</s>"
    pad_token_id = 0
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=True):
        ids = [3 + (ord(c) % 98) for c in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        text = "SYS helpful;"
        for message in messages:
            text += ("U:" if message["role"] == "user" else "A:") + message["content"] + ";"
        return text + ("A:" if add_generation_prompt else "")


WORDS = ["cat", "dog", "sun", "sea", "red", "car", "owl", "fig", "map", "ink", "jar", "kit"]


def toy_pairs(n=8):
    return PairDataset.from_pairs([PolarityPair(f"is {w} ok?", " yes", " no") for w in WORDS[:n]], name="toy")


def small_config(objective="split", form="vector", **overrides):
    values = dict(objective=objective, form=form, layer=LAYER, batch_size=4, epochs=1, lr=0.05, eval_pairs=4)
    values.update(overrides)
    return TrainConfig(**values)


# ---------------------------------------------------------------------------------------------- formulas


def scores(nll_sums, counts):
    return CompletionScores(torch.tensor(nll_sums, dtype=torch.float32), torch.tensor(counts))


def test_split_loss_by_hand():
    win, lose = scores([3.0, 5.0], [2, 3]), scores([4.0, 1.0], [1, 2])
    terms = split_loss(win, lose, lambda_p=1.0, lambda_n=0.5, gamma=5.0, theta=0.4)
    lw, ll = 8 / 5, 5 / 3  # token-weighted: (3 + 5) / (2 + 3), (4 + 1) / (1 + 2)
    expected = 1.0 * lw + 0.5 * ll + 5.0 * max(0.0, 0.4 - (ll - lw))
    assert float(terms.loss) == pytest.approx(expected, rel=1e-6)
    assert float(terms.margin) == pytest.approx(ll - lw, rel=1e-6)
    # Hinge inactive once the margin exceeds theta.
    far = split_loss(win, scores([40.0, 10.0], [1, 2]), lambda_p=1.0, lambda_n=0.0, gamma=5.0, theta=0.4)
    assert float(far.loss) == pytest.approx(lw, rel=1e-6)


def test_split_per_pair_hinge_by_hand():
    # Pair 0 is far past theta, pair 1 on the wrong side: the batch means satisfy the hinge, the pairs do not.
    win, lose = scores([1.0, 4.0], [1, 1]), scores([9.0, 2.0], [1, 1])
    batch = split_loss(win, lose, lambda_p=1.0, lambda_n=0.5, gamma=5.0, theta=0.4)
    example = split_loss(win, lose, lambda_p=1.0, lambda_n=0.5, gamma=5.0, theta=0.4, hinge="example")
    assert float(batch.extra["hinge"]) == 0.0
    assert float(example.extra["hinge"]) == pytest.approx((0.0 + (0.4 - (2.0 - 4.0))) / 2, rel=1e-6)
    assert float(example.loss - batch.loss) == pytest.approx(5.0 * 2.4 / 2, rel=1e-6)
    # Per pair, each margin is that pair's mean token NLL difference; one pair: the same as the batch hinge.
    one_w, one_l = scores([3.0], [2]), scores([2.0], [1])
    assert float(split_loss(one_w, one_l, lambda_p=1.0, lambda_n=0.5, gamma=5.0, theta=0.4, hinge="example").loss) \
        == pytest.approx(float(split_loss(one_w, one_l, lambda_p=1.0, lambda_n=0.5, gamma=5.0, theta=0.4).loss))


def test_per_pair_hinge_trains_and_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="hinge"):
        TrainConfig(hinge="pair")
    model = tiny_model("llama")
    result = train_update(model, CharTokenizer(), toy_pairs(4), small_config(hinge="example"), out_dir=tmp_path / "r",
                          progress=False)
    assert result.update.spec.training["config"]["hinge"] == "example"


def test_reps_and_dpo_losses_by_hand():
    win, lose = scores([2.0, 6.0], [2, 3]), scores([3.0, 1.0], [3, 1])
    ref_w, ref_l = torch.tensor([-2.5, -4.0]), torch.tensor([-1.0, -9.0])
    terms = reps_loss(win, lose, ref_w, ref_l, win_length=torch.tensor([2.0, 3.0]),
                      lose_length=torch.tensor([3.0, 1.0]), scaler=1.0)
    expected = []
    for lw, ll, rw, rl, nw, nl in [(-2.0, -3.0, -2.5, -1.0, 2, 3), (-6.0, -1.0, -4.0, -9.0, 3, 1)]:
        weight = max(rl - rw, 1.0)
        expected.append(-math.log(1 / (1 + math.exp(-(weight / nw * lw - ll / nl)))))
    assert float(terms.loss) == pytest.approx(sum(expected) / 2, rel=1e-6)
    terms = dpo_loss(win, lose, ref_w, ref_l, beta=0.1)
    expected = [-math.log(1 / (1 + math.exp(-0.1 * ((lw - rw) - (ll - rl)))))
                for lw, ll, rw, rl in [(-2.0, -3.0, -2.5, -1.0), (-6.0, -1.0, -4.0, -9.0)]]
    assert float(terms.loss) == pytest.approx(sum(expected) / 2, rel=1e-6)


def test_projecting_vector_projects_out_the_positive_component():
    model = tiny_model("llama")
    inner = create_update(model, "vector", LAYER, dropout=0.0, seed=0)
    wrapper = ProjectingVector(inner)
    v = inner.vector.detach()
    h = torch.randn(3, 5, v.shape[0])
    h[1] += 3 * v  # a row with a positive component along v
    wrapper.project_rows = torch.tensor([False, True, True])
    m = torch.tensor([2.0, 7.0, 7.0]).view(-1, 1, 1)
    mask = torch.ones(3, 5, 1, dtype=torch.bool)
    mask[:, :2] = False
    out = wrapper.apply(h, None, m, mask)
    expected = h.clone()
    expected[0, 2:] += 2.0 * v
    for row in (1, 2):
        for t in range(2, 5):
            dot = float(h[row, t] @ v)
            expected[row, t] -= max(dot, 0.0) / float(v @ v) * v
    torch.testing.assert_close(out, expected)
    projected = out[1, 2:] @ v
    assert (projected <= 1e-5).all()


# ---------------------------------------------------------------------------------------------- trainer vs hand


def manual_completion_nll(model, ids, prompt_length, *, layer, k, edit):
    """Sum of completion NLLs from full-vocabulary logits, with `edit(h, a)` applied to layer L's output."""
    structure = model_structure(model)
    captured = {}
    handles = [structure.down_proj(layer).register_forward_pre_hook(lambda mod, args: captured.update(a=args[0]))]
    if edit is not None:
        def on_output(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden.clone()
            hidden[:, k:] = edit(hidden[:, k:], captured["a"][:, k:])
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        handles.append(structure.layer(layer).register_forward_hook(on_output))
    try:
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    finally:
        for handle in handles:
            handle.remove()
    logp = F.log_softmax(logits[:-1], -1)
    targets = torch.tensor(ids[1:])
    token_nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return float(token_nll[prompt_length - 1:].sum()), len(ids) - prompt_length


def edit_for(form, state, multiplier, project=False):
    if form == "vector":
        v = state["vector"]
        if project:
            return lambda h, a: h - torch.relu(h @ v).unsqueeze(-1) / (v @ v) * v
        return lambda h, a: h + multiplier * v
    if form == "lora":
        return lambda h, a: h + multiplier * (a @ state["lora_A"].t() @ state["lora_B"].t())
    return lambda h, a: h + multiplier * (a @ state["weight"].t() + state["bias"])


@pytest.mark.parametrize("objective", ["split", "sft", "reps", "dpo"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("pairs", ["add", "add+sub"])
def test_step_loss_matches_hand_computation(tmp_path, objective, form, pairs):
    """The loss logged at step 2 (after one update, so LoRA / local weight are non-zero) equals SPEC's formula on
    NLLs from an independent full-vocabulary forward with the update applied by hand."""
    model = tiny_model("llama")
    factor = 3.0 if form == "vector" else 0.7
    data = toy_pairs(4 if pairs == "add" else 2)
    # 'add': one batch of all pairs is one minibatch. 'add+sub': batches of one pair, two accumulated, so a step
    # holds every (pair, direction) example as its own minibatch. Either way the loss is order-independent.
    batch, accum = (4, 1) if pairs == "add" else (1, 2)
    config = small_config(objective, form, pairs=pairs, factors=[factor], batch_size=batch, grad_accum=accum,
                          epochs=2, dropout=0.0, checkpoint_every=1, lambda_n=0.6, gamma=3.0, theta=0.5)
    states = []

    def grab_state(record):
        if record["step"] == 1:
            tensors, _ = load_checkpoint(tmp_path / "run" / "checkpoint")
            states.append({k.removeprefix("update."): v for k, v in tensors.items() if k.startswith("update.")})

    result = train_update(model, CharTokenizer(), data, config, out_dir=tmp_path / "run", progress=False,
                          callback=grab_state)
    logged = result.metrics[1]["loss"]
    state = states[0]
    encoder = PairEncoder(CharTokenizer())
    k = encoder.common_prefix_length if form == "vector" else 0
    directions = [1] if pairs == "add" else [1, -1]
    minibatch_losses = []
    minibatches = [[(p, d) for p in range(len(data))] for d in directions] if pairs == "add" else \
        [[(p, d)] for p in range(len(data)) for d in directions]
    for minibatch in minibatches:
        rows = {"win": [], "lose": []}
        for p, d in minibatch:
            ep = encoder.encode(data[p])
            win_ids, lose_ids = (ep.positive_ids, ep.negative_ids) if d > 0 else (ep.negative_ids, ep.positive_ids)
            project = objective == "reps" and form == "vector" and d < 0
            for side, completion in (("win", win_ids), ("lose", lose_ids)):
                ids = ep.prompt_ids + completion
                n = len(ep.prompt_ids)
                steered = manual_completion_nll(model, ids, n, layer=LAYER, k=k,
                                                edit=edit_for(form, state, d * factor, project))
                reference = manual_completion_nll(model, ids, n, layer=LAYER, k=k, edit=None)
                rows[side].append((*steered, -reference[0]))
        if objective in ("split", "sft"):
            lw = sum(r[0] for r in rows["win"]) / sum(r[1] for r in rows["win"])
            ll = sum(r[0] for r in rows["lose"]) / sum(r[1] for r in rows["lose"])
            lambda_n, gamma = (0.6, 3.0) if objective == "split" else (0.0, 0.0)
            minibatch_losses.append(lw + lambda_n * ll + gamma * max(0.0, 0.5 - (ll - lw)))
            continue
        per_example = []
        for (nll_w, n_w, r_w), (nll_l, n_l, r_l) in zip(rows["win"], rows["lose"], strict=True):
            if objective == "dpo":
                z = 0.1 * ((-nll_w - r_w) - (-nll_l - r_l))
            else:
                z = max(r_l - r_w, 1.0) / n_w * -nll_w - (-nll_l) / n_l
            per_example.append(math.log1p(math.exp(-z)))
        minibatch_losses.append(sum(per_example) / len(per_example))
    assert logged == pytest.approx(sum(minibatch_losses) / len(minibatch_losses), rel=2e-4, abs=1e-5)


# ---------------------------------------------------------------------------------------------- learning


@pytest.mark.parametrize("objective", ["split", "sft", "reps", "dpo"])
@pytest.mark.parametrize("form", FORMS)
def test_training_drives_preference_up(tmp_path, objective, form):
    model = tiny_model("llama")
    config = small_config(objective, form, epochs=3, lr=0.05 if form == "vector" else 0.03)
    data = toy_pairs(12)
    dev = PairDataset.from_pairs(data.pairs[8:], name="dev") if objective == "split" else None
    train = PairDataset.from_pairs(data.pairs[:8], name="train")
    result = train_update(model, CharTokenizer(), train, config, out_dir=tmp_path / "run", progress=False, dev=dev)
    before, after = result.summary["eval"]["before"], result.summary["eval"]["after"]
    m = config.resolved().eval_multiplier
    assert [r["multiplier"] for r in after] == [-m, 0.0, m]
    assert after[2]["preference"] > before[2]["preference"] + 0.05
    # The cached evaluation equals full forwards with the saved update applied as at inference.
    eval_pairs = dev.pairs if dev is not None else train.pairs[:config.eval_pairs]
    direct = evaluate_preference(model, result.update, eval_pairs, [-m, 0.0, m], encoder=PairEncoder(CharTokenizer()))
    for cached_row, direct_row in zip(after, direct, strict=True):
        assert cached_row == pytest.approx(direct_row, rel=1e-4, abs=1e-5)


# ---------------------------------------------------------------------------------------------- DiffMean


@pytest.mark.parametrize("insertion", ["block_output", "down_proj"])
def test_diffmean_equals_explicit_mean_difference(insertion):
    model = tiny_model("llama")
    data = toy_pairs(5)
    update = diffmean_update(model, CharTokenizer(), data, LAYER, insertion=insertion, batch_size=2)
    encoder = PairEncoder(CharTokenizer())
    structure = model_structure(model)
    differences = []
    for pair in data:
        ep = encoder.encode(pair)
        means = []
        for completion in (ep.positive_ids, ep.negative_ids):
            ids = torch.tensor([ep.prompt_ids + completion])
            if insertion == "block_output":
                hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[LAYER + 1][0]
            else:
                hidden = down_proj_output(model, structure.down_proj(LAYER), ids)[0]
            means.append(hidden[len(ep.prompt_ids):].mean(0))
        differences.append(means[0] - means[1])
    torch.testing.assert_close(update.vector.detach(), torch.stack(differences).mean(0), atol=1e-5, rtol=1e-4)
    assert update.spec.positions == "all" and update.spec.training["objective"] == "diffmean"


def down_proj_output(model, module, ids):
    captured = {}
    handle = module.register_forward_hook(lambda mod, args, out: captured.update(out=out))
    try:
        model(input_ids=ids)
    finally:
        handle.remove()
    return captured["out"]


# ---------------------------------------------------------------------------------------------- cache


def run_losses(tmp_path, name, model, config, data=None):
    result = train_update(model, CharTokenizer(), data or toy_pairs(6), config, out_dir=tmp_path / name,
                          progress=False)
    return result, [r["loss"] for r in result.metrics]


@pytest.mark.parametrize("objective,form", [("split", "vector"), ("split", "lora"), ("split", "local_weight"),
                                            ("reps", "vector"), ("dpo", "lora"), ("sft", "local_weight")])
def test_cached_and_uncached_training_give_equal_losses(tmp_path, objective, form):
    model = tiny_model("llama")
    config = small_config(objective, form, batch_size=2, epochs=1)  # dropout 0.1 on: same masks both ways
    cached, cached_losses = run_losses(tmp_path, "cached", model, config)
    plain, plain_losses = run_losses(tmp_path, "plain", model, dataclass_replace(config, prefix_cache=False))
    assert cached.summary["cache"]["enabled"] and not plain.summary["cache"]["enabled"]
    if form == "vector":
        assert cached.summary["cache"]["shared_prefix_tokens"] == PairEncoder(CharTokenizer()).common_prefix_length
    assert cached_losses == pytest.approx(plain_losses, rel=1e-4, abs=1e-6)
    for (name, a), b in zip(cached.update.state_dict().items(), plain.update.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cached_vector_training_matches_uncached_on_every_architecture(tmp_path, arch):
    model = tiny_model(arch)
    config = small_config("split", "vector", batch_size=3, epochs=1)
    cached, cached_losses = run_losses(tmp_path, "cached", model, config)
    _, plain_losses = run_losses(tmp_path, "plain", model, dataclass_replace(config, prefix_cache=False))
    assert cached_losses == pytest.approx(plain_losses, rel=1e-4, abs=1e-6)


def test_disk_cache_equals_memory_cache(tmp_path):
    model = tiny_model("llama")
    config = small_config("split", "lora", batch_size=2, epochs=1)
    memory, memory_losses = run_losses(tmp_path, "memory", model, config)
    disk, disk_losses = run_losses(tmp_path, "disk", model, dataclass_replace(config, cache_memory_mb=0.0))
    assert memory.summary["cache"]["storage"] == "memory" and disk.summary["cache"]["storage"] == "disk"
    assert disk_losses == memory_losses
    assert not list((tmp_path / "disk").glob(".layer-cache-*"))  # the temporary cache is removed


def dataclass_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


# ---------------------------------------------------------------------------------------------- resume, output


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("form", ["vector", "lora"])
def test_resume_continues_identically(tmp_path, form):
    model = tiny_model("llama")
    config = small_config("split", form, batch_size=2, epochs=2, checkpoint_every=2)  # 6 steps
    full = train_update(model, CharTokenizer(), toy_pairs(6), config, out_dir=tmp_path / "full", progress=False)

    def stop_at_step_5(record):  # after step 4's checkpoint: step 5 is redone after resuming
        if record["step"] == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_update(model, CharTokenizer(), toy_pairs(6), config, out_dir=tmp_path / "cut", progress=False,
                     callback=stop_at_step_5)
    assert (tmp_path / "cut" / "checkpoint").is_dir() and not (tmp_path / "cut" / "update").exists()
    resumed = train_update(model, CharTokenizer(), toy_pairs(6), config, out_dir=tmp_path / "cut", progress=False,
                           resume=True)
    for a, b in zip(full.update.state_dict().values(), resumed.update.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    lines = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in lines] == [r["loss"] for r in full.metrics]
    assert not (tmp_path / "cut" / "checkpoint").exists()


def test_resume_never_unpickles_a_checkpoint(tmp_path):
    """A crafted `checkpoint.pt` once ran a shell command on `--resume`; pickles are refused unread."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "run"
    folder.mkdir()
    torch.save({"x": Payload()}, folder / "checkpoint.pt")
    model = tiny_model("llama")
    with pytest.raises(UnisteerError, match="pickle"):
        train_update(model, CharTokenizer(), toy_pairs(6), small_config("split", "vector"), out_dir=folder,
                     progress=False, resume=True)
    assert not marker.exists()


def test_saved_update_loads_with_training_summary(tmp_path):
    model = tiny_model("llama")
    data = toy_pairs(4)
    result = train_update(model, CharTokenizer(), data, small_config("split", "lora"), out_dir=tmp_path / "run",
                          progress=False, split_record={"seed": 42, "sizes": {"train": 4}})
    loaded = load_update(result.path, model)
    assert loaded.spec.positions == "all" and loaded.spec.form == "lora" and loaded.spec.layer == LAYER
    training = loaded.spec.training
    assert training["objective"] == "split" and training["data"]["hash"] == data.hash()
    assert training["split"] == {"seed": 42, "sizes": {"train": 4}}
    assert training["config"]["factors"] == [0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0]
    assert training["steps"] == 1 and set(training["final"]) == {"loss", "win_nll", "lose_nll", "margin"}
    for a, b in zip(result.update.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    json.loads((tmp_path / "run" / "summary.json").read_text())


def test_refuses_to_overwrite_a_finished_or_started_run(tmp_path):
    model = tiny_model("llama")
    config = small_config()
    train_update(model, CharTokenizer(), toy_pairs(4), config, out_dir=tmp_path / "run", progress=False)
    with pytest.raises(TrainingError, match="already exists"):
        train_update(model, CharTokenizer(), toy_pairs(4), config, out_dir=tmp_path / "run", progress=False)
    train_update(model, CharTokenizer(), toy_pairs(4), config, out_dir=tmp_path / "run", progress=False,
                 overwrite=True)
    with pytest.raises(TrainingError, match="no checkpoint"):
        train_update(model, CharTokenizer(), toy_pairs(4), config, out_dir=tmp_path / "fresh", progress=False,
                     resume=True)


def interrupted_after_one_step(out_dir):
    """A tiny Llama and the config of a run stopped after its first step (checkpointed every step)."""
    model = tiny_model("llama")
    config = small_config(batch_size=2, epochs=2, checkpoint_every=1)

    def stop(record):
        raise Interrupt

    with pytest.raises(Interrupt):
        train_update(model, CharTokenizer(), toy_pairs(4), config, out_dir=out_dir, progress=False, callback=stop)
    return model, config


def test_resume_refuses_a_different_config(tmp_path):
    model, config = interrupted_after_one_step(tmp_path / "run")
    with pytest.raises(TrainingError, match="lr"):
        train_update(model, CharTokenizer(), toy_pairs(4), dataclass_replace(config, lr=0.5),
                     out_dir=tmp_path / "run", progress=False, resume=True)


def test_resume_reads_a_field_added_since_the_checkpoint_as_its_default(tmp_path):
    model, config = interrupted_after_one_step(tmp_path / "run")
    state_path = tmp_path / "run" / "checkpoint" / "state.json"
    state = json.loads(state_path.read_text())
    del state["config"]["hinge"]  # a checkpoint written before the option existed
    state_path.write_text(json.dumps(state))
    train_update(model, CharTokenizer(), toy_pairs(4), config, out_dir=tmp_path / "run", progress=False, resume=True)
    # Set to anything but its default, the field is a changed config like any other.
    model, config = interrupted_after_one_step(tmp_path / "other")
    with pytest.raises(TrainingError, match="hinge"):
        train_update(model, CharTokenizer(), toy_pairs(4), dataclass_replace(config, hinge="example"),
                     out_dir=tmp_path / "other", progress=False, resume=True)


def test_nan_loss_stops_with_a_clear_message(tmp_path):
    model = tiny_model("llama")
    # A learning rate near the float32 limit puts ±3e37 in the vector after one step; at multiplier 20 the
    # residual stream overflows to inf and RMSNorm turns inf·0 into NaN.
    config = small_config(factors=[20.0], dropout=0.0, lr=3e37, epochs=2)
    with pytest.raises(TrainingError, match=r"step 2 .*(nan|inf)"):
        train_update(model, CharTokenizer(), toy_pairs(4), config, out_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "update").exists()


# ---------------------------------------------------------------------------------------------- config, presets


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(TrainConfig, {"objective": "split", "learning_rate": 0.1})
    for bad in ({"objective": "ppo"}, {"form": "adapter"}, {"pairs": "sub"}, {"factors": []},
                {"factors": [2, -1]}, {"batch_size": 0}, {"lr": float("nan")}, {"train_positions": "prompt"}):
        with pytest.raises(ConfigError):
            from_dict(TrainConfig, bad)
    config = from_dict(TrainConfig, {"form": "lora", "factors": [0.5, 1]})
    assert config.factors == (0.5, 1.0)
    resolved = TrainConfig(form="lora").resolved(num_layers=30)
    assert resolved.layer == 15 and resolved.lr == 0.01 and resolved.train_positions == "all"
    assert resolved.factors == (0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0)
    assert TrainConfig().resolved().train_positions == "after_prefix"


def test_presets_follow_the_reference_table():
    vector = preset("split", "vector")
    assert (vector.pairs, vector.batch_size, vector.grad_accum, vector.epochs, vector.lr) == ("add+sub", 4, 1, 2, 0.08)
    assert (vector.lambda_p, vector.lambda_n, vector.gamma, vector.theta) == (1.0, 0.5, 4.0, 0.3)
    assert vector.factors == tuple(float(x) for x in range(2, 21, 2))
    local = preset("split", "local_weight")
    assert (local.pairs, local.grad_accum, local.lr, local.gamma, local.theta) == ("add", 2, 0.01, 5.0, 0.4)
    sft = preset("sft", "lora")
    assert (sft.lambda_n, sft.gamma, sft.pairs) == (0.0, 0.0, "add+sub")
    dpo = preset("dpo", "vector")
    assert (dpo.pairs, dpo.beta, dpo.share_factor) == ("random", 0.1, True)
    assert preset("split", "vector", data="axbench").epochs == 18
    assert preset("split", "vector", epochs=5).epochs == 5
    with pytest.raises(ConfigError, match="unknown key"):
        preset("split", "vector", learning_rate=1.0)
    with pytest.raises(ConfigError):
        preset("split", "vector", data="gsm8k")


# ---------------------------------------------------------------------------------------------- real model


@pytest.mark.real_model
def test_real_model_split_vector_step_saves_a_loadable_update(tmp_path, default_model):
    from unisteer.data.builtin import load_builtin

    model, tokenizer = default_model
    data = load_builtin("persona/psychopathy").splits.train
    pairs = data.select(range(4), name="psychopathy:4")
    config = preset("split", "vector", epochs=1, eval_pairs=2)
    result = train_update(model, tokenizer, pairs, config, out_dir=tmp_path / "run", progress=False)
    assert result.summary["layer"] == 15 and result.summary["steps"] == 1
    assert result.summary["cache"]["shared_prefix_tokens"] > 0
    assert math.isfinite(result.metrics[0]["loss"])
    loaded = load_update(result.path, model)
    torch.testing.assert_close(loaded.vector, result.update.vector)


# ---------------------------------------------------------------------------------------------- hardening (#18)


def test_a_second_training_into_one_folder_is_refused_at_once(tmp_path):
    """Two `unisteer train --out X` both ran to the end, logging every step twice and leaving a stale
    checkpoint beside the update."""
    import os

    from unisteer.files import RunLock

    model = tiny_model("llama")
    with RunLock(tmp_path / "run"):  # what a first, still running training holds
        started = time.perf_counter()
        with pytest.raises(UnisteerError, match=f"in use by another unisteer process \\(PID {os.getpid()}\\)"):
            train_update(model, CharTokenizer(), toy_pairs(4), small_config(), out_dir=tmp_path / "run",
                         progress=False)
        assert time.perf_counter() - started < 5
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    train_update(model, CharTokenizer(), toy_pairs(4), small_config(), out_dir=tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "update").is_dir()  # released when the holder ended


@pytest.mark.parametrize("edit,message", [
    (lambda s: {**s, "epoch": 99}, "do not fit this run"),
    (lambda s: {**s, "step": 0}, "do not fit this run"),
    (lambda s: {**s, "next_group": "1"}, "next_group: expected a non-negative integer"),
    (lambda s: {k: v for k, v in s.items() if k != "optimizer"}, "does not restore \\(KeyError"),
    (lambda s: {**s, "factor_rng": [3, [1, 2], None]}, "does not restore \\(ValueError"),
    (lambda s: {**s, "config": []}, "config: expected an object"),
])
def test_an_edited_checkpoint_is_a_clear_error_not_a_finished_update(tmp_path, edit, message):
    model, config = interrupted_after_one_step(tmp_path / "run")
    state_path = tmp_path / "run" / "checkpoint" / "state.json"
    state_path.write_text(json.dumps(edit(json.loads(state_path.read_text()))))
    with pytest.raises(TrainingError, match=message):
        train_update(model, CharTokenizer(), toy_pairs(4), config, out_dir=tmp_path / "run", progress=False,
                     resume=True)
    assert not (tmp_path / "run" / "update").exists()


def test_the_lock_names_another_process_and_ends_with_it(tmp_path):
    import signal
    import subprocess
    import sys

    from unisteer.files import RunLock

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom unisteer.files import RunLock\n"
                               f"with RunLock({str(tmp_path / 'run')!r}):\n    print('held', flush=True)\n"
                               "    time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UnisteerError, match=f"in use by another unisteer process \\(PID {holder.pid}\\)"):
            RunLock(tmp_path / "run").__enter__()
        holder.send_signal(signal.SIGKILL)  # a killed holder leaves no stale lock
        holder.wait(timeout=30)
        with RunLock(tmp_path / "run"):
            assert (tmp_path / "run" / ".lock").read_text().strip() == str(os.getpid())
    finally:
        holder.kill()
        holder.wait(timeout=30)
