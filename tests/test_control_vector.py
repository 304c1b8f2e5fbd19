"""Vector updates as llama.cpp GGUF control vectors: the file, its round trip, and that llama.cpp's rule
("add direction.<il> to layer il's output, times the scale") steers a model exactly as unisteer does."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers

from tiny_models import LAYERS, VOCAB, tiny_model
from unisteer.cli import EXIT_USER_ERROR, main
from unisteer.engine.architecture import model_structure
from unisteer.engine.control_vector import export_control_vector, import_control_vector, read_control_vector
from unisteer.engine.fingerprint import update_fingerprint
from unisteer.engine.steering import Steering
from unisteer.engine.storage import load_update, save_update
from unisteer.engine.updates import create_update
from unisteer.errors import UnisteerError, UpdateMismatchError


def vector_update(model, layer=1, insertion="block_output", positions="all", seed=1, scale=0.5):
    update = create_update(model, "vector", layer, insertion=insertion, positions=positions, seed=0)
    with torch.no_grad():
        update.vector.copy_(torch.randn(update.vector.shape, generator=torch.Generator().manual_seed(seed)) * scale)
    return update.eval()


def ids(batch=2, length=6):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(0))


def llama_cpp_logits(model, path, input_ids, scale=1.0):
    """llama.cpp's rule, computed independently of unisteer: every direction.<il> in the file, times `scale`,
    added to decoder layer il's output hidden state at every position (`build_cvec` after the residual sum)."""
    reader = gguf.GGUFReader(path)
    layers = model_structure(model).layers
    handles = []
    for tensor in reader.tensors:
        il = int(tensor.name.split(".")[1])
        vector = torch.from_numpy(np.array(tensor.data, dtype=np.float32)) * scale

        def hook(module, args, output, vector=vector):
            if isinstance(output, tuple):
                return (output[0] + vector.to(output[0].dtype), *output[1:])
            return output + vector.to(output.dtype)

        handles.append(layers[il].register_forward_hook(hook))
    try:
        with torch.no_grad():
            return model(input_ids).logits
    finally:
        for handle in handles:
            handle.remove()


def steered_logits(model, update, multiplier, input_ids):
    with torch.no_grad(), Steering(model, update, multiplier=multiplier):
        return model(input_ids).logits


def write_file(path, arch="controlvector", directions=None, dtype=np.float32, hint="llama"):
    """A control vector as llama.cpp's cvector-generator writes it (int32 layer_count, direction.<il>)."""
    writer = gguf.GGUFWriter(path, arch)
    if hint is not None:
        writer.add_string("controlvector.model_hint", hint)
    writer.add_int32("controlvector.layer_count", len(directions or {}))
    for name, values in (directions or {}).items():
        writer.add_tensor(name, np.asarray(values, dtype=dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ------------------------------------------------------------------------------------------------ the file


def test_export_writes_llama_cpp_layout_and_provenance(tmp_path):
    model = tiny_model("llama")
    update = vector_update(model, layer=2)
    path = export_control_vector(update, tmp_path / "v.gguf", model_name="llama", multiplier=-3.0)
    reader = gguf.GGUFReader(path)
    assert reader.get_field("general.architecture").contents() == "controlvector"
    assert reader.get_field("controlvector.model_hint").contents() == "llama"
    layer_count = reader.get_field("controlvector.layer_count")
    assert layer_count.types == [gguf.GGUFValueType.INT32] and layer_count.contents() == 1
    assert [t.name for t in reader.tensors] == ["direction.2"]
    tensor = reader.tensors[0]
    assert tensor.tensor_type == gguf.GGMLQuantizationType.F32 and list(tensor.shape) == [32]
    np.testing.assert_array_equal(np.array(tensor.data), (update.vector.detach() * -3.0).numpy())
    assert reader.get_field("unisteer.fingerprint").contents() == update_fingerprint(update)
    assert reader.get_field("unisteer.layer").contents() == 2
    assert reader.get_field("unisteer.multiplier").contents() == -3.0
    assert json.loads(reader.get_field("unisteer.spec").contents())["model_id"] == "tiny-llama"
    with pytest.raises(UnisteerError, match="already exists"):
        export_control_vector(update, path, model_name="llama")
    export_control_vector(update, path, model_name="llama", overwrite=True)
    assert not list(tmp_path.glob(".*partial"))


def test_import_gives_back_the_vector_and_spec(tmp_path):
    model = tiny_model("llama")
    update = vector_update(model, layer=1)
    path = export_control_vector(update, tmp_path / "v.gguf", model_name="llama")
    back = import_control_vector(path)
    assert torch.equal(back.vector, update.vector)
    assert (back.layer, back.spec.hidden_size, back.spec.input_size, back.spec.model_id, back.insertion) == \
        (1, 32, 48, "tiny-llama", "block_output")
    assert back.spec.training["fingerprint"] == update_fingerprint(update)
    # Saved and loaded onto the model, it steers like the original.
    save_update(back, tmp_path / "back")
    loaded = load_update(tmp_path / "back", model)
    assert torch.allclose(steered_logits(model, loaded, 2.0, ids()), steered_logits(model, update, 2.0, ids()))
    scaled = import_control_vector(export_control_vector(update, tmp_path / "m.gguf", model_name="llama",
                                                         multiplier=4.0), scale=0.5)
    assert torch.allclose(scaled.vector, update.vector * 2.0)


# ------------------------------------------------------------------------------- llama.cpp's rule == unisteer


@pytest.mark.parametrize("arch,insertion,layer", [("llama", "block_output", 1), ("llama", "down_proj", 1),
                                                  ("llama", "block_output", LAYERS - 1), ("qwen2", "down_proj", 2),
                                                  ("gemma2", "block_output", 1), ("gemma3", "block_output", 2)])
def test_llama_cpp_rule_equals_unisteer_steering(tmp_path, arch, insertion, layer):
    model = tiny_model(arch)
    update = vector_update(model, layer=layer, insertion=insertion)
    input_ids = ids()
    m = 3.0
    folded = export_control_vector(update, tmp_path / "m.gguf", model_name=arch, multiplier=m, model=model)
    unit = export_control_vector(update, tmp_path / "1.gguf", model_name=arch, model=model)
    expected = steered_logits(model, update, m, input_ids)
    plain = steered_logits(model, update, 0.0, input_ids)
    assert (expected - plain).abs().max() > 1e-3  # the vector does something
    assert torch.allclose(llama_cpp_logits(model, folded, input_ids), expected, atol=1e-5)
    # --control-vector-scaled FILE m on the m = 1 export is the same.
    assert torch.allclose(llama_cpp_logits(model, unit, input_ids, scale=m), expected, atol=1e-5)


# ------------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_down_proj_update_on_gemma_is_refused(tmp_path, arch):
    model = tiny_model(arch)
    update = vector_update(model, insertion="down_proj")
    with pytest.raises(UnisteerError, match="post_feedforward_layernorm"):
        export_control_vector(update, tmp_path / "v.gguf", model_name=arch, model=model)
    with pytest.raises(UnisteerError, match="transforms the MLP output"):
        export_control_vector(update, tmp_path / "v.gguf", model_name=arch, model_type=model.config.model_type)
    with pytest.raises(UnisteerError, match="model_type="):
        export_control_vector(update, tmp_path / "v.gguf", model_name=arch)
    assert not (tmp_path / "v.gguf").exists()


def test_what_llama_cpp_cannot_express_is_refused(tmp_path):
    model = tiny_model("llama")
    out = tmp_path / "v.gguf"
    with pytest.raises(UnisteerError, match="only vector updates"):
        export_control_vector(create_update(model, "lora", 1), out, model_name="llama")
    with pytest.raises(UnisteerError, match="every token position"):
        export_control_vector(vector_update(model, positions="generated"), out, model_name="llama")
    with pytest.raises(UnisteerError, match="layer 0"):
        export_control_vector(vector_update(model, layer=0), out, model_name="llama")
    with pytest.raises(UnisteerError, match="model_name"):
        export_control_vector(vector_update(model), out, model_name=" ")
    with pytest.raises(UnisteerError, match="multiplier"):
        export_control_vector(vector_update(model), out, model_name="llama", multiplier=float("nan"))
    with pytest.raises(UnisteerError, match="not one unisteer knows"):
        export_control_vector(vector_update(model, insertion="down_proj"), out, model_name="x", model_type="odd")
    with pytest.raises(UpdateMismatchError, match="hidden_size"):
        export_control_vector(vector_update(model), out, model_name="llama", model=_wider_llama())
    assert not out.exists()


def _wider_llama():
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=LAYERS,
                            num_attention_heads=4, num_key_value_heads=2)
    return tf.AutoModelForCausalLM.from_config(config).eval()


def test_generator_files_with_many_layers(tmp_path):
    rng = np.random.default_rng(0)
    rows = {f"direction.{il}": rng.standard_normal(32) for il in range(1, LAYERS)}
    path = write_file(tmp_path / "gen.gguf", directions=rows)
    cv = read_control_vector(path)
    assert cv.model_hint == "llama" and sorted(cv.directions) == [1, 2] and cv.hidden_size == 32
    with pytest.raises(UnisteerError, match=r"nonzero directions for layers \[1, 2\].*--layer"):
        import_control_vector(path, input_size=48)
    with pytest.raises(UnisteerError, match="input_size"):
        import_control_vector(path, layer=2)
    update = import_control_vector(path, layer=2, input_size=48, name="gen")
    np.testing.assert_array_equal(update.vector.detach().numpy(), rows["direction.2"].astype(np.float32))
    assert (update.spec.name, update.spec.training["model_hint"]) == ("gen", "llama")
    model = tiny_model("llama")
    on_model = import_control_vector(path, layer=1, model=model)
    assert on_model.spec.model_id == "tiny-llama" and on_model.spec.input_size == 48
    # One nonzero layer among zero ones is picked without --layer.
    sparse = write_file(tmp_path / "sparse.gguf", directions={"direction.1": np.zeros(32),
                                                              "direction.2": rows["direction.2"]})
    assert import_control_vector(sparse, input_size=48).layer == 2
    with pytest.raises(UpdateMismatchError, match="beyond the model's layers"):
        import_control_vector(write_file(tmp_path / "far.gguf", directions={"direction.7": np.ones(32)}),
                              model=model)


@pytest.mark.parametrize("case,match", [
    ("arch", r"general.architecture is 'llama'"),
    ("nan", r"tensor 'direction.1'.*NaN"),
    ("missing", r"no tensor direction.2; the file has layers \[1\]"),
    ("name", r"tensor 'token_embd.weight'.*direction.<layer>"),
    ("zero_index", r"direction.0.*layer 0"),
    ("f16", r"type F16, expected F32"),
    ("lengths", r"tensor 'direction.2': 16 values"),
    ("empty", r"no direction.<layer> tensors"),
    ("all_zero", r"every direction is zero"),
    ("not_gguf", r"not a readable GGUF file"),
    ("absent", r"no such control vector file"),
    ("duplicate", r"tensor 'direction.015': layer 15 already has tensor 'direction.15'"),
    ("far_layer", r"layer 2000000 is beyond any model"),
    ("no_values", r"0 values \(n_embd\), expected between 1"),
    ("other_digits", r"expected only tensors named direction.<layer>"),
    ("overflow", r"times scale 1e\+39 overflows float32"),
])
def test_bad_files_are_refused_naming_file_and_field(tmp_path, case, match):
    path = tmp_path / f"{case}.gguf"
    ones = {"direction.1": np.ones(32)}
    if case == "arch":
        write_file(path, arch="llama", directions=ones)
    elif case == "nan":
        write_file(path, directions={"direction.1": np.array([np.nan] + [0.0] * 31)})
    elif case in ("missing", "all_zero"):
        write_file(path, directions=ones if case == "missing" else {"direction.1": np.zeros(32)})
    elif case == "name":
        write_file(path, directions={"token_embd.weight": np.ones(32)})
    elif case == "zero_index":
        write_file(path, directions={"direction.0": np.ones(32)})
    elif case == "f16":
        write_file(path, directions=ones, dtype=np.float16)
    elif case == "lengths":
        write_file(path, directions={"direction.1": np.ones(32), "direction.2": np.ones(16)})
    elif case == "empty":
        write_file(path, directions={})
    elif case == "not_gguf":
        path.write_bytes(b"not a gguf file at all")
    elif case == "duplicate":  # two spellings of layer 15: one used to replace the other silently
        write_file(path, directions={"direction.15": np.ones(32), "direction.015": np.full(32, 2.0)})
    elif case == "far_layer":
        write_file(path, directions={"direction.2000000": np.ones(32)})
    elif case == "no_values":
        write_file(path, directions={"direction.1": np.ones(0)})
    elif case == "other_digits":
        write_file(path, directions={"direction.\u0661\u0665": np.ones(32)})  # Arabic-Indic "15"
    elif case == "overflow":
        write_file(path, directions=ones)
    with pytest.raises(UnisteerError, match=match) as info:
        import_control_vector(path, layer=2 if case == "missing" else None, input_size=48,
                              scale=1e39 if case == "overflow" else 1.0)
    assert str(path) in str(info.value)


# ------------------------------------------------------------------------------------------------ the CLI


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def model_folder(folder):
    """The tiny Llama saved with a one-token-per-character tokenizer: a folder `--model` can load."""
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", *[chr(c) for c in range(32, 32 + VOCAB - 3)]])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(" ", behavior="isolated")
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                           eos_token="</s>")
    model = tiny_model("llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_cli_export_and_import(capsys, tmp_path):
    model = tiny_model("llama")
    update = vector_update(model, layer=2)
    save_update(update, tmp_path / "up")
    out = tmp_path / "up.gguf"
    code, stdout, err = run_cli(capsys, "export", str(tmp_path / "up"), str(out), "--format", "gguf-control-vector",
                                "--multiplier", "-2", "--model-name", "llama")
    assert code == 0 and stdout.strip() == str(out) and "--control-vector-scaled" in err
    assert np.allclose(read_control_vector(out).directions[2], update.vector.detach().numpy() * -2)
    code, stdout, err = run_cli(capsys, "import-control-vector", str(out), str(tmp_path / "back"))
    assert code == 0 and "layer 2" in err
    back = load_update(tmp_path / "back", model)
    assert torch.allclose(back.vector, update.vector * -2)
    # User errors: one line, exit 2.
    code, _, err = run_cli(capsys, "export", str(tmp_path / "up"), str(out), "--format", "gguf-control-vector")
    assert code == EXIT_USER_ERROR and "already exists" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "export", str(tmp_path / "up"), str(tmp_path / "p"), "--format", "peft")
    assert code == EXIT_USER_ERROR and "--model" in err
    code, _, err = run_cli(capsys, "import-control-vector", str(out), str(tmp_path / "b2"), "--layer", "1")
    assert code == EXIT_USER_ERROR and "no tensor direction.1" in err


def test_cli_export_peft(capsys, tmp_path):
    folder = model_folder(tmp_path / "model")
    model = tiny_model("llama")
    lora = create_update(model, "lora", 1, rank=2, seed=0)
    save_update(lora, tmp_path / "lora")
    code, stdout, err = run_cli(capsys, "export", str(tmp_path / "lora"), str(tmp_path / "adapter"), "--format",
                                "peft", "--multiplier", "2", "--model", str(folder))
    assert code == 0, err
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["lora_alpha"] == 4.0 and (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    code, _, err = run_cli(capsys, "export", str(tmp_path / "lora"), str(tmp_path / "x.gguf"), "--format",
                           "gguf-control-vector", "--model-name", "llama")
    assert code == EXIT_USER_ERROR and "only vector updates" in err
