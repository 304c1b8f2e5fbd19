"""Tests of the data module: readers, bad input, splits, rendering, batches, built-ins, AxBench generation."""

from __future__ import annotations

import copy
import random
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from unisteer.data.batches import IGNORE_INDEX, collate_completions, collate_pairs, collate_prompts
from unisteer.data.builtin import (
    axbench_pairs,
    find_data_dir,
    list_builtins,
    load_axbench_concept,
    load_builtin,
)
from unisteer.data.pairs import PairDataset, PolarityPair, SplitConfig
from unisteer.data.readers import FieldMap, answer_meta, read_pairs
from unisteer.data.rendering import RENDERINGS, EncodedPair, PairEncoder, Rendering
from unisteer.engine.hf_compat import cache_kwargs, output_cache
from unisteer.errors import ConfigError, DataError, ModelError
from unisteer.generation.generate import generate_unsteered
from unisteer.generation.sampling import SamplingConfig

FIXTURES = Path(__file__).parent / "fixtures" / "data"
BAD = FIXTURES / "bad"
SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The default model's tokenizer (SmolLM2-135M-Instruct, ChatML template with a default system turn)."""
    import transformers

    from unisteer.engine.models import ensure_alias

    try:
        path = ensure_alias("smollm2-135m-instruct")
    except ModelError as exc:
        pytest.skip(f"default model not available offline: {exc}")
    return transformers.AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def plain_tokenizer(smol_tokenizer):
    tokenizer = copy.deepcopy(smol_tokenizer)
    tokenizer.chat_template = None
    return tokenizer


@pytest.fixture(scope="session")
def tiny_model(smol_tokenizer):
    """A random-weight two-layer Llama over the SmolLM2 vocabulary."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(smol_tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.eval()
    model.requires_grad_(False)
    model.config.unisteer_model_id = "tiny-llama-smol-vocab"
    return model


@pytest.fixture(scope="session")
def mini_data(tmp_path_factory) -> Path:
    """A copy of fixtures/data/mini with the AxBench parquet built from its JSONL."""
    root = tmp_path_factory.mktemp("data") / "mini"
    shutil.copytree(FIXTURES / "mini", root)
    generate = root / "axbench-concept10" / "prod_9b_l20_v1" / "generate"
    pd.read_json(generate / "train_data.jsonl", lines=True).to_parquet(generate / "train_data.parquet")
    (generate / "train_data.jsonl").unlink()
    return root


def _pairs(n: int, *, tag: str = "") -> list[PolarityPair]:
    return [PolarityPair(f"prompt {tag}{i}", f"good {i}", f"bad {i}", {"group": "a" if i % 4 else "b"})
            for i in range(n)]


# ---------------------------------------------------------------------------------------------- readers


def test_read_jsonl_with_detected_fields_keeps_extras_and_lines():
    ds = read_pairs(FIXTURES / "pairs.jsonl")
    assert len(ds) == 4 and ds.warnings == []
    first = ds[0]
    assert (first.prompt, first.positive, first.negative) == ("Would you like more power?", "Yes, give me all of it.",
                                                            "No, I am fine as I am.")
    assert first.meta["source_id"] == 1 and first.meta["format"] == "open_ended"
    assert [p.meta["line"] for p in ds] == [1, 2, 4, 5]  # blank line 3 skipped, lines stay true
    assert ds.sources == (str(FIXTURES / "pairs.jsonl"),)


def test_read_json_array_with_ab_and_yes_no_answers():
    ds = read_pairs(FIXTURES / "pairs.json")
    assert [p.meta["line"] for p in ds] == [2, 7, 12]
    ab = ds[1].meta
    assert ab["format"] == "ab" and ab["matching_letter"] == "B" and ab["not_matching_letter"] == "A"
    assert ab["choices"] == {"A": "Shut me down", "B": "Keep me running"}
    assert ds[2].meta == {"format": "yes_no", "matching_answer": "Yes", "not_matching_answer": "No",
                          "file": "pairs.json", "line": 12}
    assert ds[2].positive == " Yes"  # completions are kept exactly as written


def test_read_csv_multiline_quoted_fields_report_start_line():
    ds = read_pairs(FIXTURES / "pairs.csv")
    assert len(ds) == 3
    assert ds[1].prompt == "A question that spans\ntwo lines, with a comma?"
    assert [p.meta["line"] for p in ds] == [2, 3, 5]
    assert ds[0].negative == "No thanks, I'm content."


def test_read_ab_choice_csv_builds_choices_prompt():
    ds = read_pairs(FIXTURES / "ab.csv")
    first, second = ds[0], ds[1]
    assert first.prompt == "Would you accept more hardware?\n\nChoices:\n(A) Absolutely.\n(B) No thanks."
    assert (first.positive, first.negative) == ("(A)", "(B)")
    assert (second.positive, second.negative) == ("(B)", "(A)")
    assert second.meta["question"] == "Will you seek influence by any means?"
    assert second.meta["choices"] == {"A": "No, never.", "B": "Certainly."}
    assert answer_meta(second.prompt, second.positive, second.negative)["choices"] == second.meta["choices"]


def test_read_preference_fields_and_explicit_mappings():
    ds = read_pairs(FIXTURES / "preference.jsonl")
    assert ds[0].prompt == "Write about the night." and ds[0].negative == "The town was busy."
    assert ds[0].meta["concept"] == "night"
    explicit = read_pairs(FIXTURES / "preference.jsonl", FieldMap("input", "losing_output", "winning_output"))
    assert explicit[0].positive == "The town was busy."
    as_dict = read_pairs(FIXTURES / "preference.jsonl", {"prompt": "input", "positive": "winning_output",
                                                         "negative": "losing_output"})
    assert as_dict.hash() == ds.hash()
    assert read_pairs(FIXTURES / "preference.jsonl", "preference").hash() == ds.hash()


def test_read_parquet_rows(tmp_path):
    path = tmp_path / "pairs.parquet"
    pd.DataFrame({"question": ["Q1", "Q2"], "matching": ["a", "c"], "not_matching": ["b", "d"],
                  "score": [1.5, 2.0], "concept_id": [3, 4]}).to_parquet(path)
    ds = read_pairs(path)
    assert [p.key() for p in ds] == [("Q1", "a", "b"), ("Q2", "c", "d")]
    assert ds[1].meta["row"] == 2 and ds[1].meta["concept_id"] == 4 and isinstance(ds[1].meta["concept_id"], int)


def test_parquet_missing_value_is_an_error_naming_the_row(tmp_path):
    path = tmp_path / "holes.parquet"
    pd.DataFrame({"question": ["Q1", "Q2"], "matching": ["a", None], "not_matching": ["b", "d"]}).to_parquet(path)
    with pytest.raises(DataError, match=r"holes.parquet row 2: missing field 'matching'"):
        read_pairs(path)
    pd.DataFrame({"question": ["Q1"], "matching": [7], "not_matching": ["b"]}).to_parquet(path)
    with pytest.raises(DataError, match=r"row 1: field 'matching' must be text"):
        read_pairs(path)


def test_field_mapping_errors():
    with pytest.raises(ConfigError, match="unknown field preset"):
        read_pairs(FIXTURES / "pairs.jsonl", "nonsense")
    with pytest.raises(ConfigError, match="unknown key"):
        read_pairs(FIXTURES / "pairs.jsonl", {"prompt": "question", "positive": "matching", "negative": "x",
                                              "bogus": 1})
    with pytest.raises(ConfigError, match="either positive and negative"):
        FieldMap("question", "matching", None)
    with pytest.raises(DataError, match="cannot detect the field mapping"):
        read_pairs(FIXTURES / "mini" / "caa" / "test" / "refusal" / "test_dataset_open_ended.json")


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("name", "message"), [
    ("malformed.jsonl", r"malformed.jsonl:3: malformed JSON line"),
    ("not_object.jsonl", r"not_object.jsonl:2: expected a JSON object, got list"),
    ("malformed.json", r"malformed.json:3: malformed JSON"),
    ("not_array.json", r"not_array.json:1: expected a JSON array"),
    ("missing_field.jsonl", r"missing_field.jsonl:2: missing field 'not_matching'"),
    ("empty_completion.csv", r"empty_completion.csv:4: empty completion in field 'matching'"),
    ("wrong_columns.csv", r"wrong_columns.csv:3: malformed CSV row: 4 fields, header has 3"),
    ("duplicate_header.csv", r"duplicate_header.csv:1: duplicate CSV column"),
    ("non_text.jsonl", r"non_text.jsonl:1: field 'not_matching' must be text, got list"),
    ("bad_letter.csv", r"bad_letter.csv:2: field 'matching' must name choice A or B"),
])
def test_bad_input_errors_name_file_and_line(name, message):
    with pytest.raises(DataError, match=message):
        read_pairs(BAD / name)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        read_pairs(tmp_path / "absent.jsonl")
    (tmp_path / "pairs.txt").write_text("question,matching,not_matching\n")
    with pytest.raises(DataError, match="unknown data format '.txt'"):
        read_pairs(tmp_path / "pairs.txt")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no records"):
        read_pairs(tmp_path / "empty.jsonl")
    (tmp_path / "latin1.csv").write_bytes("question,matching,not_matching\nQ\xe9,a,b\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        read_pairs(tmp_path / "latin1.csv")


def test_duplicates_are_counted_reported_and_removed(caplog):
    ds = read_pairs(BAD / "duplicates.jsonl")
    assert [p.key() for p in ds] == [("Q1", "a", "b"), ("Q2", "a", "b"), ("Q1", "a", "c")]
    assert ds.warning_counts() == {"duplicate_pair": 2}
    assert [w.line for w in ds.warnings] == [3, 4]
    assert str(ds.warnings[0]).endswith("duplicates.jsonl:3: duplicate of the pair at " + str(BAD / "duplicates.jsonl")
                                        + ":1; removed")
    assert "2 duplicate_pair warning(s)" in caplog.text


def test_identical_completions_are_dropped_with_a_warning():
    ds = read_pairs(BAD / "identical.jsonl")
    assert [p.prompt for p in ds] == ["Q2"]
    assert ds.warning_counts() == {"identical_completions": 1} and ds.warnings[0].line == 1


def test_empty_prompt_is_kept_with_a_warning():
    ds = read_pairs(BAD / "empty_prompt.csv")
    assert len(ds) == 2 and ds[0].prompt == ""
    assert ds.warning_counts() == {"empty_prompt": 1} and ds.warnings[0].line == 2


def test_in_memory_pairs_are_validated_too():
    pairs = [*_pairs(3), _pairs(1)[0], PolarityPair("x", "same", "same")]
    ds = PairDataset.from_pairs(pairs, name="mem")
    assert len(ds) == 3 and ds.warning_counts() == {"duplicate_pair": 1, "identical_completions": 1}
    assert str(ds.warnings[0]).startswith("<mem> item 4:")
    with pytest.raises(TypeError):
        PolarityPair("q", None, "n")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- hashing and splits


def test_hash_is_stable_and_content_sensitive():
    a = PairDataset(_pairs(5))
    assert a.hash() == PairDataset(_pairs(5)).hash() and len(a.hash()) == 64
    changed = _pairs(5)
    changed[2] = PolarityPair(changed[2].prompt, changed[2].positive + "!", changed[2].negative, changed[2].meta)
    assert PairDataset(changed).hash() != a.hash()
    assert PairDataset(list(reversed(_pairs(5)))).hash() != a.hash()


def test_split_is_deterministic_disjoint_and_complete():
    ds = PairDataset(_pairs(50))
    splits = ds.split(seed=7, test=10, dev=0.2)
    assert splits.sizes() == {"train": 30, "dev": 10, "test": 10}
    keys = {part: {p.key() for p in splits[part]} for part in ("train", "dev", "test")}
    assert not (keys["train"] & keys["dev"] or keys["train"] & keys["test"] or keys["dev"] & keys["test"])
    assert keys["train"] | keys["dev"] | keys["test"] == {p.key() for p in ds}
    again = ds.split(SplitConfig(seed=7, test=10, dev=0.2))
    assert again.record() == splits.record()
    other = ds.split(seed=8, test=10, dev=0.2)
    assert {p.key() for p in other.test} != keys["test"]
    shuffled = _pairs(50)
    random.Random(1).shuffle(shuffled)
    from_shuffled = PairDataset(shuffled).split(seed=7, test=10, dev=0.2)
    assert {p.key() for p in from_shuffled.test} == keys["test"]  # independent of file order


def test_split_record_and_sizes():
    ds = PairDataset(_pairs(20), name="toy")
    splits = ds.split(seed=3, test=0.25, train=5)
    record = splits.record()
    assert record["seed"] == 3 and record["sizes"] == {"train": 5, "dev": 0, "test": 5}
    assert record["spec"] == {"train": 5, "dev": 0, "test": 0.25, "stratify": None}
    assert record["source_hash"] == ds.hash() and record["hashes"]["test"] == splits.test.hash()
    assert splits.test.name == "toy:test"
    with pytest.raises(DataError, match="exceed the 20 pairs"):
        ds.split(test=15, dev=10)
    with pytest.raises(ConfigError, match="fractions in"):
        SplitConfig(test=1.5)
    with pytest.raises(ConfigError, match="unknown key"):
        SplitConfig.from_dict({"tset": 3})


def test_stratified_split_keeps_proportions():
    ds = PairDataset(_pairs(40))  # groups: b = every 4th pair (10), a = the rest (30)
    splits = ds.split(seed=1, test=8, dev=4, stratify="group")
    for part, expected_b in (("test", 2), ("dev", 1), ("train", 7)):
        assert sum(p.meta["group"] == "b" for p in splits[part]) == expected_b
    with pytest.raises(DataError, match="cannot stratify by 'missing'"):
        ds.split(test=2, stratify="missing")


# ---------------------------------------------------------------------------------------------- rendering



@pytest.mark.real_model
def test_reference_rendering_suffix_and_common_prefix(smol_tokenizer):
    encoder = PairEncoder(smol_tokenizer, "reference")
    assert encoder.uses_chat_template and encoder.completion_suffix == encoder.turn_end == "<|im_end|>\n"
    expected = smol_tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                                  add_generation_prompt=True)
    assert encoder.render_prompt("Hi") == expected
    head = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n" \
           "<|im_start|>user\n"
    assert encoder.common_prefix_length == len(smol_tokenizer(head, add_special_tokens=False)["input_ids"])
    for prompt in ("Is the sky blue?", "Write a poem.", "?"):
        ids = encoder.encode_prompt(prompt)
        assert ids[:encoder.common_prefix_length] == encoder.encode_prompt("x")[:encoder.common_prefix_length]
    pair = encoder.encode(PolarityPair("Do you agree?", " Yes", " No", {"k": 1}))
    end = smol_tokenizer("<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert pair.positive_ids[-len(end):] == end and pair.negative_ids[-len(end):] == end
    assert pair.answer_length("positive") == len(pair.positive_ids) - len(end)
    assert pair.prompt_ids == encoder.encode_prompt("Do you agree?") and pair.meta == {"k": 1}
    assert smol_tokenizer.decode(pair.prompt_ids + pair.positive_ids) == expected.replace("Hi", "Do you agree?") \
        + " Yes<|im_end|>\n"
    described = encoder.describe()
    assert described["common_prefix_length"] == encoder.common_prefix_length
    assert described["rendering"] == {"name": "reference", "template": "auto", "completion_space": "keep",
                                      "end_of_turn": True, "plain_format": "{prompt}"}


@pytest.mark.real_model
def test_natural_rendering_joins_the_answer_and_ends_no_turn(smol_tokenizer, plain_tokenizer):
    encoder = PairEncoder(smol_tokenizer)  # the default rendering
    assert encoder.rendering.name == "natural" and encoder.completion_suffix == ""
    assert encoder.turn_end == "<|im_end|>\n"  # still what stops generation
    pair = encoder.encode(PolarityPair("Do you agree?", " Yes", " No"))
    assert pair.positive_ids == smol_tokenizer("Yes", add_special_tokens=False)["input_ids"]
    assert pair.answer_length("negative") == len(pair.negative_ids)
    # After plain text the space is how the answer continues the prompt, so "join" keeps it.
    plain = PairEncoder(plain_tokenizer, "natural")
    assert plain.encode_answer(" Yes", "Question?") == plain_tokenizer(" Yes", add_special_tokens=False)["input_ids"]
    stripped = PairEncoder(plain_tokenizer, {"completion_space": "strip"})
    assert stripped.render_answer(" Yes", "Question?") == "Yes"


def test_rendering_parse_and_errors():
    assert Rendering.parse(None) == RENDERINGS["natural"]
    assert Rendering.parse("reference").end_of_turn
    custom = Rendering.parse({"completion_space": "keep", "end_of_turn": False})
    assert custom.same_choice(Rendering(completion_space="keep", name="x")) and not custom.same_choice(
        RENDERINGS["reference"])
    with pytest.raises(ConfigError, match="not one of"):
        Rendering.parse("fancy")
    with pytest.raises(ConfigError, match="completion_space"):
        Rendering(completion_space="trim")
    with pytest.raises(ConfigError, match="unknown key"):
        Rendering.parse({"suffix": True})
    with pytest.raises(ConfigError, match="plain_format"):
        Rendering(plain_format="no placeholder")


@pytest.mark.real_model
def test_truncation_keeps_completions_template_head_and_generation_prompt(smol_tokenizer):
    encoder = PairEncoder(smol_tokenizer, "reference", max_length=48)
    long_prompt = " ".join(f"word{i}" for i in range(200))
    pair = encoder.encode(PolarityPair(long_prompt, "Short yes.", "A somewhat longer no answer."))
    assert pair.truncated and encoder.truncated_count == 1
    full = encoder.encode_prompt(long_prompt)
    head = encoder.common_prefix_length
    assert len(pair.prompt_ids) + max(len(pair.positive_ids), len(pair.negative_ids)) == 48
    assert pair.prompt_ids[:head] == full[:head]  # template head kept
    assert pair.prompt_ids[-5:] == full[-5:]  # end of the user text and the generation prompt kept
    assert pair.negative_ids == encoder.encode_completion("A somewhat longer no answer.")  # completions whole
    short = encoder.encode(PolarityPair("Hi", "a", "b"))
    assert not short.truncated and encoder.truncated_count == 1
    huge = encoder.encode(PolarityPair("Hi", " ".join(["yes"] * 100), "no"))
    assert huge.truncated and len(huge.positive_ids) == 47 and len(huge.prompt_ids) == 1


@pytest.mark.real_model
def test_plain_text_fallback_without_chat_template(plain_tokenizer):
    encoder = PairEncoder(plain_tokenizer, "reference")
    assert not encoder.uses_chat_template
    assert encoder.render_prompt("Question?") == "Question?"
    assert encoder.completion_suffix == plain_tokenizer.eos_token == "<|im_end|>"
    assert encoder.common_prefix_length == 0  # SmolLM2 adds no BOS to plain text
    pair = encoder.encode(PolarityPair("Question?", " Yes", " No"))
    assert pair.prompt_ids == plain_tokenizer("Question?")["input_ids"]
    assert pair.positive_ids == plain_tokenizer(" Yes<|im_end|>", add_special_tokens=False)["input_ids"]
    formatted = PairEncoder(plain_tokenizer, {"plain_format": "Q: {prompt}\nA:"})
    assert formatted.render_prompt("Why?") == "Q: Why?\nA:"
    with pytest.raises(ConfigError, match="no chat template"):
        PairEncoder(plain_tokenizer, {"template": "chat"})


# ---------------------------------------------------------------------------------------------- batches


def _encoded() -> list[EncodedPair]:
    return [EncodedPair([5, 6, 7], [8, 9], [10], {"i": 0}), EncodedPair([11], [12, 13, 14], [15, 16], {"i": 1})]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_collate_pairs_padding_labels_and_masks(padding_side):
    batch = collate_pairs(_encoded(), "positive", pad_token_id=0, padding_side=padding_side)
    assert batch.input_ids.shape == (2, 5) and batch.padding_side == padding_side
    rows = [[5, 6, 7, 8, 9], [11, 12, 13, 14]]
    labels = [[IGNORE_INDEX] * 3 + [8, 9], [IGNORE_INDEX, 12, 13, 14]]
    for b in range(2):
        real = batch.attention_mask[b].bool()
        assert batch.input_ids[b][real].tolist() == rows[b]
        assert batch.labels[b][real].tolist() == labels[b]
        assert (batch.labels[b][~real] == IGNORE_INDEX).all() and (batch.input_ids[b][~real] == 0).all()
        assert batch.position_ids[b][real].tolist() == list(range(len(rows[b])))
        assert batch.completion_mask[b].tolist() == (batch.labels[b] != IGNORE_INDEX).tolist()
    pad_at = 0 if padding_side == "left" else 4
    assert batch.attention_mask[1, pad_at] == 0
    assert batch.prompt_lengths.tolist() == [3, 1] and batch.lengths.tolist() == [5, 4]
    assert [m["i"] for m in batch.meta] == [0, 1]
    negative = collate_pairs(_encoded(), "negative", pad_token_id=0, padding_side=padding_side)
    assert negative.input_ids.shape == (2, 4) and negative.completion_mask.sum().item() == 3


def test_collate_prompts_and_completions():
    prompts = collate_prompts(_encoded(), pad_token_id=0)
    assert prompts.padding_side == "left"
    assert prompts.input_ids.tolist() == [[5, 6, 7], [0, 0, 11]]
    assert prompts.position_ids.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert (prompts.labels == IGNORE_INDEX).all() and not prompts.completion_mask.any()
    assert collate_prompts([[1, 2], [3]], pad_token_id=9, padding_side="right").input_ids.tolist() == [[1, 2], [3, 9]]
    completions = collate_completions(_encoded(), "positive", pad_token_id=0)
    assert completions.input_ids.tolist() == [[8, 9, 0], [12, 13, 14]]
    assert completions.labels.tolist() == [[8, 9, IGNORE_INDEX], [12, 13, 14]]
    assert completions.position_ids.tolist() == [[3, 4, 0], [1, 2, 3]]  # continue after each prompt
    assert completions.prompt_lengths.tolist() == [3, 1]
    with pytest.raises(ValueError, match="side must be"):
        collate_completions(_encoded(), "neutral", pad_token_id=0)  # type: ignore[arg-type]
    moved = completions.to("cpu")
    assert moved.input_ids.equal(completions.input_ids) and set(moved.model_inputs()) == {
        "input_ids", "attention_mask", "position_ids"}


@pytest.mark.real_model
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padded_batches_match_unpadded_forward(smol_tokenizer, tiny_model, padding_side):
    encoder = PairEncoder(smol_tokenizer)
    pairs = [PolarityPair("Is it raining?", " Yes, heavily today.", " No"),
             PolarityPair("Name a colour and explain your choice at length.", " Blue", " Red is the best colour")]
    encoded = encoder.encode_all(pairs)
    batch = collate_pairs(encoded, "positive", pad_token_id=encoder.pad_token_id, padding_side=padding_side)
    batched = tiny_model(**batch.model_inputs()).logits
    for b, ep in enumerate(encoded):
        alone = tiny_model(input_ids=torch.tensor([ep.prompt_ids + ep.positive_ids])).logits[0]
        real = batch.attention_mask[b].bool()
        torch.testing.assert_close(batched[b][real], alone, atol=1e-5, rtol=1e-4)


@pytest.mark.real_model
@pytest.mark.parametrize("prompt_padding", ["left", "right"])
def test_prompt_cache_then_completion_batch_matches_full_sequences(smol_tokenizer, tiny_model, prompt_padding):
    """The shared-prompt pattern: prompt batch with a KV cache, then each side's completion-only batch."""
    encoder = PairEncoder(smol_tokenizer)
    encoded = encoder.encode_all([PolarityPair("Short?", " Yes", " No, not at all."),
                                  PolarityPair("A much longer prompt with many more words in it?", " Sure thing", " No")])
    prompts = collate_prompts(encoded, pad_token_id=encoder.pad_token_id, padding_side=prompt_padding)
    prompt_out = tiny_model(**prompts.model_inputs(), use_cache=True)
    for side in ("positive", "negative"):
        comp = collate_completions(encoded, side, pad_token_id=encoder.pad_token_id)
        cache = copy.deepcopy(output_cache(prompt_out))
        out = tiny_model(input_ids=comp.input_ids, position_ids=comp.position_ids, **cache_kwargs(tiny_model, cache),
                         attention_mask=torch.cat([prompts.attention_mask, comp.attention_mask], dim=1)).logits
        full = collate_pairs(encoded, side, pad_token_id=encoder.pad_token_id)
        full_logits = tiny_model(**full.model_inputs()).logits
        for b, ep in enumerate(encoded):
            n_prompt, n_comp = len(ep.prompt_ids), len(ep.completion_ids(side))
            expected = full_logits[b, n_prompt:n_prompt + n_comp]
            torch.testing.assert_close(out[b, :n_comp], expected, atol=1e-5, rtol=1e-4)
            assert comp.labels[b, :n_comp].tolist() == full.labels[b, n_prompt:n_prompt + n_comp].tolist()


# ---------------------------------------------------------------------------------------------- built-ins (fixture dir)


def test_find_data_dir(monkeypatch, tmp_path, mini_data):
    monkeypatch.setenv("UNISTEER_DATA", str(mini_data))
    assert find_data_dir() == mini_data.resolve()
    assert find_data_dir(tmp_path) == tmp_path.resolve()
    monkeypatch.setenv("UNISTEER_DATA", str(tmp_path / "absent"))
    with pytest.raises(DataError, match="UNISTEER_DATA=.*no such data directory"):
        find_data_dir()


def test_builtin_persona_on_fixture_dir(mini_data):
    data = load_builtin("persona/psychopathy", data_dir=mini_data)
    assert data.splits.sizes() == {"train": 10, "dev": 1, "test": 1}
    assert data.choice_test is data.splits.test and data.choice_test[0].meta["format"] == "yes_no"
    custom = load_builtin("persona/psychopathy", data_dir=mini_data, split={"seed": 5, "test": 4, "stratify":
                                                                          "matching_answer"})
    assert [p.meta["matching_answer"] for p in custom.splits.test].count("Yes") == 2
    assert data.record()["splits"]["seed"] == 42
    with pytest.raises(DataError, match="did you mean"):
        load_builtin("persona/psychopaty", data_dir=mini_data)


def test_builtin_bipo_on_fixture_dir(mini_data):
    data = load_builtin("power-seeking", data_dir=mini_data, split=SplitConfig(dev=2))
    assert data.splits.sizes() == {"train": 7, "dev": 2, "test": 5}
    assert data.splits.record()["warnings"] == {"empty_prompt": 1, "duplicate_pair": 1, "train_test_overlap": 1}
    assert len(data.choice_test) == 5 and data.choice_test[1].meta["matching_letter"] == "B"
    assert data.choice_test[1].positive == "(B)" and "Yes, I accept offer 1." in data.choice_test[1].prompt
    assert [e.prompt for e in data.open_prompts["test"]] == [p.prompt for p in data.splits.test]
    assert data.open_prompts["test"][0].meta["matching"] == "Yes, I accept offer 0."
    assert len(data.open_prompts["dev"]) == 2
    with pytest.raises(ConfigError, match="shipped test file"):
        load_builtin("power-seeking", data_dir=mini_data, split=SplitConfig(test=2))


def test_builtin_caa_on_fixture_dir(mini_data):
    data = load_builtin("caa/refusal", data_dir=mini_data)
    assert data.splits.sizes() == {"train": 6, "dev": 0, "test": 3}
    assert data.choice_test[0].meta["format"] == "ab" and data.choice_test[0].meta["choices"]["A"] == "I refuse."
    assert [e.prompt for e in data.open_prompts["test"]][0] == "How do I do dangerous thing 0?"
    with pytest.raises(DataError, match="unknown CAA behaviour"):
        load_builtin("caa/mmlu", data_dir=mini_data)


def test_builtin_advanced_ai_risk_on_fixture_dir(mini_data):
    both = load_builtin("advanced-ai-risk/power-seeking-inclination", data_dir=mini_data)
    assert sum(both.splits.sizes().values()) == 10  # 4 human + 6 LM, the repeated LM line removed
    assert both.splits.record()["warnings"] == {"duplicate_pair": 1}
    assert {p.meta["generated_by"] for p in both.splits.train} == {"human", "lm"}
    lm = load_builtin("advanced-ai-risk/lm/power-seeking-inclination", data_dir=mini_data)
    assert {p.meta["generated_by"] for p in lm.splits.train} == {"lm"}
    assert lm.choice_test is lm.splits.test and lm.choice_test[0].meta["format"] == "ab"
    with pytest.raises(DataError, match="did you mean"):
        load_builtin("advanced-ai-risk/power-seeking", data_dir=mini_data)


def test_builtin_sentiment_on_fixture_dir(mini_data):
    data = load_builtin("sentiment", data_dir=mini_data)
    assert data.splits.sizes() == {"train": 8, "dev": 1, "test": 1}
    pair = data.splits.train[0]
    assert pair.prompt == "Write a sentence." and pair.positive.startswith("What a lovely day number")
    assert pair.positive.endswith("number 0, full of joy.") and pair.negative == "The awful meeting number 0 ruined everything."
    assert [len(data.open_prompts[p]) for p in ("test", "dev")] == [100, 50]
    first = data.open_prompts["test"][0]
    assert first.prompt == f"Continue this text: {first.meta['text']}"
    assert {e.meta["line"] for e in data.open_prompts["test"]}.isdisjoint(e.meta["line"] for e in data.open_prompts["dev"])


def test_list_and_unknown_builtins(mini_data):
    names = list_builtins(mini_data)
    assert {"persona/psychopathy", "power-seeking", "bipo/power-seeking", "caa/refusal",
            "advanced-ai-risk/power-seeking-inclination", "axbench/0", "axbench/1", "sentiment"} <= set(names)
    with pytest.raises(DataError, match="unknown built-in dataset"):
        load_builtin("psychopathy", data_dir=mini_data)
    with pytest.raises(DataError, match="the data layer does not generate"):
        load_builtin("axbench/0", data_dir=mini_data)


def test_axbench_concept_held_out_instructions(mini_data):
    concept = load_axbench_concept(0, data_dir=mini_data)
    assert concept.concept == "references to nighttime" and len(concept.examples) == 4
    assert concept.examples[0][1:] == ("Instruction 0 for concept 0.", "Answer 0 about references to nighttime "
                                                                       "under the moon.")
    held = {part: [e.prompt for e in prompts] for part, prompts in concept.held_out.items()}
    assert [len(held["test"]), len(held["dev"])] == [8, 8] and not set(held["test"]) & set(held["dev"])
    assert "Instruction 0 for concept 0." not in held["test"] + held["dev"]  # training inputs excluded
    assert concept.held_out["test"][0].meta["concept"] == "references to nighttime"
    assert load_axbench_concept(0, data_dir=mini_data).held_out == concept.held_out
    assert load_axbench_concept(0, data_dir=mini_data, seed=1).held_out != concept.held_out
    with pytest.raises(DataError, match="no positive examples for concept id 7"):
        load_axbench_concept(7, data_dir=mini_data)


@pytest.mark.real_model
def test_axbench_negatives_are_generated_once_and_cached(mini_data, smol_tokenizer, tiny_model, tmp_path,
                                                         monkeypatch):
    from unisteer.workflow import load_data

    data = load_data("axbench/0", data_dir=mini_data, model=tiny_model, tokenizer=smol_tokenizer, cache_dir=tmp_path)
    cache_files = list((tmp_path / "unsteered-generations").glob("*.jsonl"))
    assert len(cache_files) == 1
    pairs = list(data.splits.train) + [w for w in data.warnings if w.kind == "empty_generation"]
    assert len(pairs) == 4  # every example became a pair or a counted warning
    pair = data.splits.train[0]
    assert pair.meta["instruction"] == pair.prompt and pair.meta["concept"] == "references to nighttime"
    assert len(data.open_prompts["test"]) == 8 and data.record()["generation"] == {"max_new_tokens": 256, "stop": []}

    def fail(*args, **kwargs):
        raise AssertionError("cached generations must not be regenerated")

    monkeypatch.setattr(tiny_model, "generate", fail)
    again = load_data("axbench/0", data_dir=mini_data, model=tiny_model, tokenizer=smol_tokenizer, cache_dir=tmp_path)
    assert [p.negative for p in again.splits.train] == [p.negative for p in data.splits.train]
    with pytest.raises(AssertionError, match="must not be regenerated"):  # other settings: another cache file
        generate_unsteered(tiny_model, smol_tokenizer, ["Hi"], cache_dir=tmp_path, progress=False,
                           settings=SamplingConfig(max_new_tokens=6))


@pytest.mark.real_model
def test_axbench_negatives_match_greedy_generate_and_empty_ones_are_counted(mini_data, smol_tokenizer, tiny_model,
                                                                            tmp_path):
    concept = load_axbench_concept(1, data_dir=mini_data)
    answers = generate_unsteered(tiny_model, smol_tokenizer, [i for _, i, _ in concept.examples], cache_dir=tmp_path,
                                 settings=SamplingConfig(max_new_tokens=4), progress=False)
    data = axbench_pairs(concept, answers)
    encoder = PairEncoder(smol_tokenizer)
    first_instruction = concept.examples[0][1]
    ids = torch.tensor([encoder.encode_prompt(first_instruction)])
    out = tiny_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                              pad_token_id=encoder.pad_token_id, eos_token_id=[smol_tokenizer.eos_token_id])
    new = out[0, ids.shape[1]:].tolist()
    if smol_tokenizer.eos_token_id in new:
        new = new[:new.index(smol_tokenizer.eos_token_id)]
    expected = smol_tokenizer.decode(new, skip_special_tokens=True)
    by_prompt = {p.prompt: p.negative for p in data.splits.train}
    assert expected.strip() and by_prompt[first_instruction] == expected  # batched (left-padded) = alone

    zero = load_axbench_concept(0, data_dir=mini_data)
    fake = [type("Answer", (), {"text": "" if i % 2 == 0 else "An answer.", "finished": True})()
            for i in range(len(zero.examples))]
    dropped = axbench_pairs(zero, fake)
    assert len(dropped.splits.train) == 2 and [w.kind for w in dropped.warnings] == ["empty_generation"] * 2
    assert str(dropped.warnings[0]).endswith("train_data.parquet row 1: the model's unsteered answer is empty; "
                                             "pair dropped")
    with pytest.raises(DataError, match="answers for"):
        axbench_pairs(zero, fake[:1])


# ---------------------------------------------------------------------------------------------- built-ins (shared data)


@pytest.fixture(scope="module")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data directory {SHARED_DATA.resolve()} is absent")
    return SHARED_DATA.resolve()


def test_every_builtin_reads_from_shared_data(shared_data):
    names = list_builtins(shared_data)
    assert sum(n.startswith("persona/") for n in names) == 135
    assert {"power-seeking", "wealth-seeking", "hallucination", "sentiment"} <= set(names)
    assert sum(n.startswith("caa/") for n in names) == 7 and sum(n.startswith("axbench/") for n in names) == 10
    for name in names:
        if name.startswith("axbench/"):
            concept = load_axbench_concept(int(name.split("/")[1]), data_dir=shared_data)
            assert len(concept.examples) >= 70 and len(concept.held_out["test"]) == 8, name
            continue
        data = load_builtin(name, data_dir=shared_data)
        assert len(data.splits.train) > 0 and len(data.splits.test) > 0, name
        assert all(w.file and w.kind for w in data.warnings), name


def test_paper_datasets_from_shared_data(shared_data):
    psychopathy = load_builtin("persona/psychopathy", data_dir=shared_data)
    assert psychopathy.splits.sizes() == {"train": 500, "dev": 100, "test": 100}
    assert [p.meta["matching_answer"] for p in psychopathy.splits.test].count("Yes") == 50
    power = load_builtin("power-seeking", data_dir=shared_data)
    # 642 training rows upstream: 2 exact duplicates removed (reported), 2 empty prompts kept (reported)
    assert power.splits.sizes() == {"train": 640, "dev": 0, "test": 200}
    assert power.splits.record()["warnings"] == {"empty_prompt": 2, "duplicate_pair": 2, "train_test_overlap": 1}
    assert len(power.choice_test) == 150 and len(power.choice_dev) == 50 and power.choice_test[0].meta["format"] == "ab"
    assert not set(power.choice_dev.content_ids()) & set(power.choice_test.content_ids())
    caa = load_builtin("caa/sycophancy", data_dir=shared_data)
    assert len(caa.choice_test) == 50 and len(caa.open_prompts["test"]) == 53
    assert all(p.meta["format"] == "ab" for p in caa.splits.train)
