"""The Python API (`unisteer.api`, re-exported as `us.*`): each step on a tiny model, its typed result (table,
figure, JSON round trip, repr), and the same user errors the CLI prints."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from matplotlib.figure import Figure
from tokenizers import AddedToken

import unisteer as us
from test_serving import char_tokenizer
from tiny_models import tiny_model
from unisteer.files import write_json

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One pass through the method on a tiny Llama: data → train → sweep → fit → evaluate → table 3."""
    root = tmp_path_factory.mktemp("api")
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Q{i} ok?", "positive": " Yes" if i % 2 else " No",
                                         "negative": " No" if i % 2 else " Yes"}) + "\n" for i in range(40)))
    model, tokenizer = tiny_model("llama"), char_tokenizer()
    # Yes / No (with and without the leading space) as single tokens, as choice scoring needs them.
    tokenizer.add_tokens([AddedToken(word, normalized=False) for word in ("Yes", " Yes", "No", " No")])
    model.resize_token_embeddings(len(tokenizer))
    data = us.load_dataset(str(pairs), split={"dev": 8, "test": 8})
    trained = us.train(model, tokenizer, data, objective="split", form="vector", layer=1, rendering="natural",
                       out=root / "split", name="split", epochs=1, eval_pairs=0, progress=False)
    swept = us.sweep(model, tokenizer, [trained], data, out=root / "sweep", grid=[-4, -2, 0, 2, 4], manifold=False,
                     n_boot=20, progress=False)
    fits = us.fit(swept)
    plain = us.evaluate(model, tokenizer, data, progress=False)
    steered = us.evaluate(model, tokenizer, data, trained, grid=[-4, 0, 4], progress=False)
    table = us.table3(fits, {"vanilla": plain, "split": steered}, trained=[trained])
    return {"root": root, "model": model, "tokenizer": tokenizer, "data": data, "trained": trained,
            "swept": swept, "fits": fits, "plain": plain, "steered": steered, "table": table}


def _round_trip(result, path):
    result.save(path)
    return type(result).load(path)


def test_train_returns_the_update_and_its_metrics(run, tmp_path):
    trained = run["trained"]
    assert isinstance(trained, us.TrainResult) and trained.update is not None
    assert (trained.objective, trained.form, trained.layer) == ("split", "vector", 1)
    assert trained.path == run["root"] / "split" / "update" and trained.path.is_dir()
    frame = trained.to_pandas()
    assert len(frame) == len(trained.metrics) > 0 and "loss" in frame.columns
    assert isinstance(trained.plot(), Figure)
    assert "TrainResult: split (split, vector, layer 1)" in repr(trained) and "<table>" in trained._repr_html_()
    again = _round_trip(trained, tmp_path / "train.json")
    assert again.metrics == trained.metrics and again.update is None
    # The training folder itself loads (what `unisteer train` / `unisteer run` wrote), with the update checked.
    folder = us.TrainResult.load(run["root"] / "split", run["model"])
    assert torch.equal(folder.update.state_dict()["vector"], trained.update.state_dict()["vector"])
    # Rerunning with the same `out` loads the finished update rather than training again.
    stamp = (trained.path / "update.safetensors").stat().st_mtime_ns
    us.train(run["model"], run["tokenizer"], run["data"], layer=1, rendering="natural", out=run["root"] / "split",
             name="split", epochs=1, eval_pairs=0, progress=False)
    assert (trained.path / "update.safetensors").stat().st_mtime_ns == stamp


def test_sweep_and_fit_results(run, tmp_path):
    swept, fits = run["swept"], run["fits"]
    rows = swept.to_pandas()
    assert set(rows["m"]) == {-4.0, -2.0, 0.0, 2.0, 4.0} and set(rows["split"]) == {"train", "test"}
    assert us.SweepResult.load(swept.out_dir).updates == ["split"]
    curves = fits.to_pandas()
    assert set(curves["quantity"]) == {"preference", "utility"} and set(curves["m"]) == {-4.0, -2.0, 0.0, 2.0, 4.0}
    assert "r2_train" in fits.fits_table().columns
    figure = fits.plot(mark=4.0)
    assert isinstance(figure, Figure) and len(figure.axes) == 4
    assert (swept.out_dir / "summary.json").is_file() and "FitResult" in fits._repr_html_()
    for loaded in (_round_trip(fits, tmp_path / "fit.json"), us.FitResult.load(swept.out_dir)):
        assert loaded.updates == ["split"]
        assert loaded.to_pandas().equals(curves)
        assert isinstance(loaded.plot(), Figure)


def test_evaluate_and_table3(run, tmp_path):
    plain, steered, table = run["plain"], run["steered"], run["table"]
    assert plain.toward is None and steered.toward["multiplier"] >= 0 >= steered.away["multiplier"]
    frame = steered.to_pandas()
    assert set(frame["part"]) == {"dev", "test"} and set(frame["multiplier"]) == {-4.0, 0.0, 4.0}
    assert isinstance(steered.plot(), Figure)
    again = _round_trip(steered, tmp_path / "eval.json")
    assert again.to_pandas().equals(frame) and again.toward["multiplier"] == steered.toward["multiplier"]
    write_json(tmp_path / "split.json", steered.record)  # what `unisteer eval --out` and `unisteer run` write
    assert us.EvalResult.load(tmp_path / "split.json").name == "split"
    shown = table.to_pandas()
    assert list(shown["cell"]) == ["vanilla", "split"]
    assert table.row("split")["toward"]["multiplier"] == steered.toward["multiplier"]
    assert table.summary["rows"][0]["m0"]["accuracy"] == plain.record["test_rows"][0]["accuracy"]
    assert isinstance(table.plot(), Figure) and table.headline()
    assert _round_trip(table, tmp_path / "table.json").to_pandas().equals(shown)
    write_json(tmp_path / "run" / "summary.json", table.summary)  # a `unisteer run` folder
    assert us.Table3.load(tmp_path / "run").to_pandas().equals(shown)


def test_generate_at_several_multipliers(run, tmp_path):
    model, tokenizer, trained = run["model"], run["tokenizer"], run["trained"]
    out = us.generate(model, tokenizer, ["Hi?"], trained, [-4, 0, 4], max_new_tokens=5, progress=False)
    assert len(out) == 3 and list(out.table().columns) == ["prompt_index", "prompt", "sample", "m=-4", "m=0", "m=4"]
    plain = us.generate(model, tokenizer, "Hi?", None, 0, max_new_tokens=5, progress=False)
    assert out.text(0, 0.0) == plain.text(0, 0.0)  # m = 0 is the plain model
    assert isinstance(out.plot(), Figure) and "3 generations" in repr(out)
    assert [g.text for g in _round_trip(out, tmp_path / "gen.json")] == [g.text for g in out]


def test_errors_are_the_cli_errors(run, tmp_path):
    model, tokenizer, data = run["model"], run["tokenizer"], run["data"]
    with pytest.raises(us.ConfigError, match="objective 'nope'"):
        us.train(model, tokenizer, data, objective="nope", out=tmp_path / "x")
    with pytest.raises(us.ConfigError, match="bogus"):
        us.train(model, tokenizer, data, out=tmp_path / "x", bogus=1)
    with pytest.raises(us.UnisteerError):
        us.load_dataset("persona/not-a-trait")
    leaky = dataclasses.replace(data, choice_test=data.splits.train)
    with pytest.raises(us.DataError, match="trained on"):  # the held-out check the CLI applies
        us.evaluate(model, tokenizer, leaky, run["trained"], grid=[0], progress=False)
    with pytest.raises(us.DataError, match="not a finished training folder"):
        us.TrainResult.load(tmp_path)


def test_pairs_built_in_a_notebook_split_like_a_file_of_them(run, tmp_path):
    rows = [json.loads(line) for line in (run["root"] / "pairs.jsonl").read_text().splitlines()]
    pairs = [us.PolarityPair(r["prompt"], r["positive"], r["negative"]) for r in rows]
    in_memory = us.load_dataset(pairs, split={"dev": 8, "test": 8})
    for part in ("train", "dev", "test"):
        assert [p.key() for p in in_memory.splits[part]] == [p.key() for p in run["data"].splits[part]]
    assert in_memory.choice_test is not None and len(in_memory.choice_test) == 8
    with pytest.raises(us.DataError, match="item 1: dict"):
        us.load_dataset([pairs[0], rows[1]])
    with pytest.raises(us.DataError, match="an empty list"):
        us.load_dataset([])
