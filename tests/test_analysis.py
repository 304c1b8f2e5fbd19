"""The sweep: fast path against one plain forward per example/polarity/multiplier, files, resume, fits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tiny_models import ARCHITECTURES, VOCAB, tiny_model
from unisteer.analysis.fits import fit_sweep
from unisteer.analysis.logodds import compute_log_odds
from unisteer.analysis.paired import score_one_by_one, score_pairs, sliding_window
from unisteer.analysis.sweep import SweepConfig, read_scores, run_sweep
from unisteer.data.pairs import PairDataset, PolarityPair
from unisteer.data.rendering import EncodedPair, PairEncoder
from unisteer.engine.steering import Steering
from unisteer.engine.updates import FORMS, create_update, default_grid
from unisteer.errors import ConfigError, DataError

LAYER = 1
GRID = [-2.0, 0.0, 1.5]


def randomized(update, seed=1, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in update.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return update


def make_pairs(n, seed=0, head=6, prompt=(3, 12), completion=(1, 5)):
    """Pairs sharing a `head`-token prefix, with prompts and completions of varied length (padding)."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(3, VOCAB, (head,), generator=g).tolist()

    def tokens(low, high):
        return torch.randint(3, VOCAB, (int(torch.randint(low, high + 1, (1,), generator=g)),), generator=g).tolist()

    return [EncodedPair(shared + tokens(*prompt), tokens(*completion), tokens(*completion)) for _ in range(n)]


def reference_nll(model, update, encoded, grid, positions=None):
    """Independent: full-vocabulary log-softmax of one unpadded forward per example, polarity and m."""
    out = {}
    with torch.no_grad():
        for m in grid:
            with Steering(model, update, multiplier=m, positions=positions) as steering:
                for i, pair in enumerate(encoded):
                    steering.set_prompt_lengths([len(pair.prompt_ids)])
                    for side, completion in (("p", pair.positive_ids), ("n", pair.negative_ids)):
                        ids = torch.tensor([pair.prompt_ids + completion])
                        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
                        token_nll = -logp.gather(-1, ids[0, 1:, None])[:, 0]
                        out[(i, m, side)] = (float(token_nll[len(pair.prompt_ids) - 1:].sum()), len(completion))
    return out


def assert_matches_reference(fast, expected, grid, n):
    assert [(s.example, s.m) for s in fast] == [(i, m) for m in grid for i in range(n)]
    for s in fast:
        for side, nll, count in (("p", s.L_p, s.T_p), ("n", s.L_n, s.T_n)):
            want, want_count = expected[(s.example, s.m, side)]
            assert count == want_count
            assert nll == pytest.approx(want, abs=2e-4, rel=1e-5), (s.example, s.m, side)


CASES = [("llama", form) for form in FORMS] + [(arch, "lora") for arch in ARCHITECTURES if arch != "llama"]


@pytest.mark.parametrize("arch,form", CASES)
def test_fast_path_matches_one_forward_per_example(arch, form):
    model = tiny_model(arch)
    update = randomized(create_update(model, form, LAYER, rank=2, seed=0).eval())
    encoded = make_pairs(5)
    # 5 examples in chunks of 3 and 4-row batches: several chunks, batches mixing multipliers, padding.
    fast = score_pairs(model, update, encoded, GRID, pad_token_id=0, batch_rows=4, chunk_examples=3)
    expected = reference_nll(model, update, encoded, GRID)
    assert_matches_reference(fast, expected, GRID, len(encoded))
    moved = max(abs(expected[(i, 1.5, "p")][0] - expected[(i, 0.0, "p")][0]) for i in range(len(encoded)))
    assert moved > 1e-3, "the update must change the scores, or the comparison proves nothing"


@pytest.mark.parametrize("positions", ["from:8", "generated", "prompt"])
def test_fast_path_respects_positions(positions):
    model = tiny_model("llama")
    update = randomized(create_update(model, "vector", LAYER, seed=0).eval())
    encoded = make_pairs(4, seed=3)
    fast = score_pairs(model, update, encoded, GRID, pad_token_id=0, batch_rows=3, chunk_examples=4,
                       positions=positions)
    assert_matches_reference(fast, reference_nll(model, update, encoded, GRID, positions), GRID, len(encoded))


@pytest.mark.parametrize("prompt", [(1, 3), (12, 18)], ids=["shared-prefix-within-window", "beyond-window"])
def test_sliding_window_layouts(prompt):
    """Gemma-2's window is 16 here: short chunks share the prefix (padding between parts), long ones fall
    back to whole left-padded prompts; both must equal plain forwards."""
    model = tiny_model("gemma2")
    assert sliding_window(model) == 16
    update = randomized(create_update(model, "lora", LAYER, rank=2, seed=0).eval())
    encoded = make_pairs(4, seed=5, head=4, prompt=prompt, completion=(1, 4))
    fast = score_pairs(model, update, encoded, GRID, pad_token_id=0, batch_rows=8, chunk_examples=4)
    assert_matches_reference(fast, reference_nll(model, update, encoded, GRID), GRID, len(encoded))


def test_straightforward_path_matches_reference():
    model = tiny_model("qwen2")
    update = randomized(create_update(model, "local_weight", LAYER, seed=0).eval(), scale=0.1)
    encoded = make_pairs(2, seed=7)
    slow = score_one_by_one(model, update, encoded, GRID)
    expected = reference_nll(model, update, encoded, GRID)
    for s in slow:
        assert s.L_p == pytest.approx(expected[(s.example, s.m, "p")][0], abs=2e-4)
        assert s.L_n == pytest.approx(expected[(s.example, s.m, "n")][0], abs=2e-4)


def test_default_grids_are_symmetric_and_exact_in_bfloat16():
    for form, top in (("vector", 20.0), ("lora", 2.5), ("local_weight", 2.5)):
        grid = default_grid(form)
        assert len(grid) == 21 and grid[0] == -top and grid[-1] == top and 0.0 in grid
        assert grid == [-v for v in reversed(grid)]
        assert torch.tensor(grid).bfloat16().float().tolist() == grid
    with pytest.raises(ConfigError, match="form"):
        default_grid("adapter")


def test_sweep_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="unknown key"):
        SweepConfig.from_dict({"grid": [0, 1], "multipliers": [1]})
    with pytest.raises(ConfigError, match="duplicated"):
        SweepConfig(grid=[0.0, 1.0, 1.0])
    with pytest.raises(ConfigError, match="batch_rows"):
        SweepConfig(batch_rows=0)
    with pytest.raises(ConfigError, match="variant"):
        SweepConfig(variant="median")
    with pytest.raises(ConfigError, match="finite"):
        SweepConfig(grids={"u": [0.0, float("nan")]})
    assert SweepConfig.from_dict({"grid": [2, -1, 0]}).grid == [-1.0, 0.0, 2.0]


# ---------------------------------------------------------------------------------------------- files


class CharTokenizer:
    """Characters as ids 3..100; no chat template, so prompts are plain text with a BOS token."""

    chat_template = None
    eos_token = "</s>"
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __call__(self, text, add_special_tokens=True):
        ids = [3 + ord(c) % (VOCAB - 3) for c in text]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


def dataset(n, seed):
    rng = np.random.default_rng(seed)
    words = ["calm", "cruel", "kind", "cold", "warm", "sharp"]
    pairs = [PolarityPair(f"Say it: {' '.join(rng.choice(words, size=rng.integers(1, 4)))}?",
                          " Yes" + "!" * int(rng.integers(0, 3)), " No") for _ in range(n)]
    return PairDataset.from_pairs(pairs, name=f"toy{seed}")


@pytest.fixture(scope="module")
def toy():
    model = tiny_model("llama")
    vector = randomized(create_update(model, "vector", LAYER, seed=0), scale=0.8).eval()
    lora = randomized(create_update(model, "lora", LAYER, rank=2, seed=0), scale=0.5).eval()
    splits = {"train": dataset(6, 1), "test": dataset(4, 2)}
    return model, {"vec": vector, "lora": lora}, splits


def config(**overrides):
    values = dict(grid=[-2.0, -1.0, 0.0, 1.0, 2.0], batch_rows=6, chunk_examples=4, n_boot=50, progress=False,
                  manifold_layers=[1, 2])
    return SweepConfig(**{**values, **overrides})


def test_run_sweep_writes_resumes_and_fits(tmp_path, toy):
    model, updates, splits = toy
    out = tmp_path / "sweep"
    result = run_sweep(model, CharTokenizer(), updates, splits, config(), out, settings={"model": "tiny-llama"})
    assert result.rows_computed == 2 * 10 * 5 and result.rows_reused == 0

    # The files hold exactly the fast path's numbers.
    encoder = PairEncoder(CharTokenizer())
    expected = score_pairs(model, updates["lora"], encoder.encode_all(splits["test"].pairs), config().grid,
                           pad_token_id=0)
    stored = {(s.example, s.m): s for s in read_scores(out / "scores" / "lora" / "test.jsonl")}
    assert len(stored) == len(expected)
    for s in expected:
        assert stored[(s.example, s.m)].L_p == pytest.approx(s.L_p, abs=1e-5)
        assert stored[(s.example, s.m)].T_n == s.T_n

    # Manifold: layers ≥ the update's layer only; m = 0 averages exactly 1 (all examples are the reference).
    rows = read_scores(out / "scores" / "vec" / "train.jsonl")
    at_zero = [r for r in rows if r.m == 0.0]
    for metric in ("off_subspace", "nearest_neighbour"):
        assert np.mean([r.manifold["1"][metric] for r in at_zero]) == pytest.approx(1.0, abs=1e-9)
        far = np.mean([r.manifold["1"][metric] for r in rows if r.m == 2.0])
        assert far > 1.5, "a large vector added at layer 1's output moves its hidden states away"
    assert set(at_zero[0].manifold) == {"1", "2"}

    # Resume: nothing left to do; an interrupted write is repaired; a larger grid adds only the new m.
    assert run_sweep(model, CharTokenizer(), updates, splits, config(), out).rows_computed == 0
    path = out / "scores" / "vec" / "test.jsonl"
    intact = path.read_text()
    path.write_text(intact + '{"example": 0, "m": 3.0, "L_')
    more = run_sweep(model, CharTokenizer(), updates, splits, config(grid=[-2.0, -1.0, 0.0, 1.0, 2.0, 3.0]), out)
    assert more.rows_computed == 2 * 10 and more.rows_reused == 2 * 10 * 5
    assert path.read_text().startswith(intact) and all(json.loads(line) for line in path.read_text().splitlines())
    assert json.loads((out / "sweep.json").read_text())["grids"]["vec"][-1] == 3.0

    # A different update under a stored name is refused, not mixed in.
    other = randomized(create_update(model, "vector", LAYER, seed=0), seed=9).eval()
    with pytest.raises(ConfigError, match="different update"):
        run_sweep(model, CharTokenizer(), {"vec": other}, splits, config(), out)

    fits = fit_sweep(out)
    for name in ("per_example.csv", "curves.csv", "fits.json", "fits.csv", "manifold.csv",
                 "manifold_correlations.csv", "summary.json"):
        assert (out / name).stat().st_size > 0
    # Curves are the per-m means of the stored rows' log-odds (an independent recomputation).
    vec_test = read_scores(out / "scores" / "vec" / "test.jsonl")
    at = [r for r in vec_test if r.m == 1.0]
    odds = compute_log_odds([r.L_p for r in at], [r.L_n for r in at], [r.T_p for r in at], [r.T_n for r in at],
                            variant="mean")
    curve = fits.curves[("vec", "test", "mean")]
    index = list(curve.preference.m).index(1.0)
    assert curve.preference.mean[index] == pytest.approx(odds.pref.mean())
    assert curve.utility.mean[index] == pytest.approx(odds.util.mean())
    assert curve.utility.aggregates[index].n_clamped == int(odds.clamped.sum())
    fit = fits.fits[("vec", "sum")]
    assert fit.fit_split == "train" and fit.preference is not None and set(fit.r2["preference"]) == {"train", "test"}
    assert {(c["update"], c["layer"]) for c in fits.correlations} == {("vec", 1), ("vec", 2), ("lora", 1), ("lora", 2)}


def test_run_sweep_refuses_bad_inputs(tmp_path, toy):
    model, updates, splits = toy
    with pytest.raises(ConfigError, match="name"):
        run_sweep(model, CharTokenizer(), {"a/b": updates["vec"]}, splits, config(), tmp_path / "a")
    with pytest.raises(ConfigError, match="no update named"):
        run_sweep(model, CharTokenizer(), updates, splits, config(grids={"other": [0.0, 1.0]}), tmp_path / "b")
    with pytest.raises(DataError, match="no pairs"):
        run_sweep(model, CharTokenizer(), updates, {"test": PairDataset([], name="empty")}, config(), tmp_path / "c")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        run_sweep(model, CharTokenizer(), updates, splits, config(), tmp_path / "d")
    with pytest.raises(ConfigError, match="manifold_layers"):
        run_sweep(model, CharTokenizer(), updates, splits, config(manifold_layers=[7]), tmp_path / "e")


def test_read_scores_rejects_corruption(tmp_path):
    path = tmp_path / "s.jsonl"
    row = {"example": 0, "m": 1.0, "L_p": 1.0, "L_n": 2.0, "T_p": 1, "T_n": 1}
    path.write_text(json.dumps(row) + "\nnot json\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match="s.jsonl:2: malformed"):
        read_scores(path)
    path.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match="duplicate row"):
        read_scores(path)


@pytest.mark.real_model
def test_fast_path_matches_on_default_model():
    from unisteer.data.builtin import load_builtin
    from unisteer.engine.models import load_model

    model, tokenizer = load_model("smollm2-135m-instruct", dtype="float32")
    encoder = PairEncoder(tokenizer)
    encoded = encoder.encode_all(load_builtin("persona/psychopathy").splits.test.pairs[:2])
    update = randomized(create_update(model, "vector", 15, seed=0), scale=0.3).eval()
    grid = [-4.0, 0.0, 4.0]
    fast = score_pairs(model, update, encoded, grid, pad_token_id=encoder.pad_token_id)
    slow = {(s.example, s.m): s for s in score_one_by_one(model, update, encoded, grid)}
    for s in fast:
        assert s.L_p == pytest.approx(slow[(s.example, s.m)].L_p, abs=1e-3)
        assert s.L_n == pytest.approx(slow[(s.example, s.m)].L_n, abs=1e-3)
    assert abs(slow[(0, 4.0)].L_p - slow[(0, 0.0)].L_p) > 0.05
