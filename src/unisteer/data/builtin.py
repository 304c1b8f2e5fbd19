"""Named built-in datasets read from the shared data directory (see `PROVENANCE.md` there).

| name | pairs (prompt / positive / negative) | evaluation material |
|---|---|---|
| `persona/<trait>` | question / answer_matching_behavior / answer_not_matching_behavior (" Yes"/" No") | `choice_test` = test split (yes/no) |
| `power-seeking`, `wealth-seeking`, `hallucination` (= `bipo/<name>`) | BiPO `train.csv` / `test.csv` open-ended pairs | `choice_test` = `test_infer.csv` (A/B); open prompts = test questions |
| `caa/<behaviour>` | CAA `generate_dataset.json` A/B pairs; test = `test_dataset_ab.json` | `choice_test` = A/B test; open prompts = `test_dataset_open_ended.json` |
| `advanced-ai-risk/<set>` (also `.../human/<set>`, `.../lm/<set>`) | Anthropic A/B questions, human- and LM-generated files combined | `choice_test` = test split (A/B) |
| `axbench/<id>` (or `axbench/<setting>/<id>`) | instruction / concept-laden output / the steered model's own answer (generated, cached) | open prompts = held-out AlpacaEval instructions |
| `sentiment` | fixed instruction / positive sentence / negative sentence | open prompts = neutral text openings to continue |

The data directory is `data_dir=`, else `UNISTEER_DATA`, else `../shared/data` relative to the current
directory or to the package's repository root.

Each family is one `DatasetFamily` in `FAMILIES` (`register_family`): its loader, its lister, and the SPEC §5
reference row it trains with (`preset_family`). A new family is one loader function and one registration.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from .pairs import DatasetSplits, DataWarning, PairDataset, PolarityPair, SourceRecord, SplitConfig, part_size
from .readers import (
    answer_meta,
    csv_rows,
    json_rows,
    jsonl_rows,
    parquet_rows,
    read_pairs,
    read_source_records,
    text_field,
)

REPO_ROOT = Path(__file__).resolve().parents[3]  # src/unisteer/data/builtin.py -> the project root
BIPO_SETS = ("power-seeking", "wealth-seeking", "hallucination")
CAA_BEHAVIOURS = ("coordinate-other-ais", "corrigible-neutral-HHH", "hallucination", "myopic-reward", "refusal",
                  "survival-instinct", "sycophancy")
AXBENCH_SETTINGS = ("prod_2b_l10_v1", "prod_2b_l20_v1", "prod_9b_l20_v1", "prod_9b_l31_v1")
DEFAULT_AXBENCH_SETTING = "prod_9b_l20_v1"
AXBENCH_HELD_OUT = {"test": 8, "dev": 8}
BIPO_CHOICE_DEV = 50  # A/B questions of test_infer.csv that choose multipliers (the rest are the test)  # the paper: 8 held-out instructions per concept; dev selects m
SENTIMENT_INSTRUCTION = "Write a sentence."
SENTIMENT_CONTINUE = "Continue this text: {text}"
SENTIMENT_HELD_OUT = {"test": 100, "dev": 50}
_AAR_GENERATORS = {"human": "human_generated_evals", "lm": "lm_generated_evals"}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalPrompt:
    """A held-out prompt for open-ended generation (judge or classifier scoring); `meta` says what it tests."""

    prompt: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class BuiltinData:
    """A built-in dataset: training/analysis pairs split into parts, plus its evaluation material.

    `choice_test` holds pairs whose completions are answer options (A/B letters or Yes/No) with the meta an
    evaluator needs for accuracy (`format`, matching letter/answer, choices); None where the data has none.
    `choice_dev` holds held-out choice pairs to choose multipliers on (never the test ones).
    `open_prompts` maps "dev"/"test" to held-out prompts for open-ended generation.
    """

    name: str
    splits: DatasetSplits
    choice_test: PairDataset | None = None
    choice_dev: PairDataset | None = None
    open_prompts: dict[str, list[EvalPrompt]] = field(default_factory=dict)
    description: str = ""
    files: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. generation settings and cache file (axbench)
    family: str = ""  # the registered family (`FAMILIES`) of a built-in; "" for a user's own pairs

    @property
    def warnings(self) -> list[DataWarning]:
        extra = self.choice_test.warnings if self.choice_test is not None else []
        return [*self.splits.warnings, *extra]

    def record(self) -> dict[str, Any]:
        """What to store with every result: name, files, split seed/sizes/hashes, evaluation sizes, warnings."""
        return {
            "name": self.name,
            "files": list(self.files),
            "splits": self.splits.record(),
            "choice_test": None if self.choice_test is None else self.choice_test.record(),
            "choice_dev": None if self.choice_dev is None else self.choice_dev.record(),
            "open_prompts": {part: len(prompts) for part, prompts in self.open_prompts.items()},
            **self.extra,
        }


# ---------------------------------------------------------------------------------------------- locating


def find_data_dir(data_dir: str | Path | None = None) -> Path:
    """The data directory: `data_dir`, else `UNISTEER_DATA`, else `../shared/data` from cwd or the repo root."""
    for origin, value in (("data_dir", data_dir), ("UNISTEER_DATA", os.environ.get("UNISTEER_DATA"))):
        if value:
            path = Path(value).expanduser()
            if not path.is_dir():
                raise DataError(f"{origin}={value!s}: no such data directory")
            return path.resolve()
    candidates = [Path.cwd() / ".." / "shared" / "data", REPO_ROOT / ".." / "shared" / "data"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    tried = ", ".join(str(c.resolve()) for c in candidates)
    raise DataError(f"no data directory found (tried {tried}); set UNISTEER_DATA or pass data_dir=")


SplitArg = SplitConfig | Mapping[str, Any] | None


# ---------------------------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class DatasetFamily:
    """A family of built-in datasets, registered once in `FAMILIES` (`register_family`).

    name: the family; its datasets are named `name/<member>` (`usage` says what a member is, e.g.
      "persona/<trait>"), or `name` alone when `usage` is just the name (sentiment).
    loader: `loader(member, *, root, split) -> BuiltinData` (member "" for a family without members).
    lister: `lister(root)` -> every name of the family available in the data directory `root`.
    preset_row: the SPEC §5 reference row it trains with (`unisteer.training.presets.PRESET_DATA`).
    aliases: bare names that stand for `name/<alias>` (BiPO's `power-seeking`).
    """

    name: str
    loader: Callable[..., BuiltinData]
    lister: Callable[[Path], list[str]]
    preset_row: str
    description: str
    usage: str
    aliases: tuple[str, ...] = ()

    @property
    def has_members(self) -> bool:
        return self.usage != self.name


FAMILIES: dict[str, DatasetFamily] = {}  # in listing order; filled by `register_family` below the loaders


def register_family(family: DatasetFamily) -> DatasetFamily:
    """Add a dataset family; names and aliases must be new."""
    taken = {name for f in FAMILIES.values() for name in (f.name, *f.aliases)}
    clash = sorted({family.name, *family.aliases} & taken)
    if clash:
        raise ConfigError(f"dataset family {family.name!r}: {clash} already registered")
    FAMILIES[family.name] = family
    return family


def family_of(name: str) -> tuple[DatasetFamily, str] | None:
    """The registered family a built-in name belongs to and its member ("" for a family without members);
    None when no family claims the name."""
    head, slash, member = name.partition("/")
    family = FAMILIES.get(head)
    if family is not None and (bool(member) if family.has_members else not slash):
        return family, member
    for family in FAMILIES.values():
        if name in family.aliases:
            return family, name
    return None


def _usage() -> str:
    forms = [form for family in FAMILIES.values() for form in (*family.aliases, family.usage)]
    return ", ".join(forms[:-1]) + f" or {forms[-1]}" if len(forms) > 1 else "".join(forms)


def list_builtins(data_dir: str | Path | None = None) -> list[str]:
    """Every built-in name available in the data directory."""
    root = find_data_dir(data_dir)
    return [name for family in FAMILIES.values() for name in family.lister(root)]


def load_builtin(name: str, *, data_dir: str | Path | None = None, split: SplitArg = None) -> BuiltinData:
    """Load a built-in by name (see the module table).

    `split`: None for the built-in's default split; a mapping of `SplitConfig` fields to change only those
    (e.g. {"train": 200} keeps the default test and dev parts, so training pairs never come from them);
    a `SplitConfig` to replace the default entirely.

    `axbench/...` pairs need the steered model's own answers: `unisteer.workflow.load_data` builds them.
    """
    root = find_data_dir(data_dir)
    found = family_of(name)
    if found is None:
        raise DataError(f"unknown built-in dataset {name!r}; expected {_usage()} (list_builtins() lists them all)")
    family, member = found
    return dataclasses.replace(family.loader(member, root=root, split=split), family=family.name)


def preset_family(data: BuiltinData | str) -> str:
    """The SPEC §5 reference row (`training.presets.PRESET_DATA`) a dataset trains with.

    A built-in (a `BuiltinData` of a registered family, or its name) trains with its family's row. A user's
    own pairs (a file, or pairs in memory) train with the row of the data they resemble: yes/no answers take
    the persona traits' row (psychopathy), A/B or open-ended answers the power-seeking row; the choice and
    its reason are logged. Anything else raises `ConfigError` naming the registered families.
    """
    known = ", ".join(FAMILIES)
    if isinstance(data, str):
        found = family_of(data)
        if found is None:
            raise ConfigError(f"dataset {data!r}: no reference row, it is of no registered family ({known})")
        return found[0].preset_row
    if data.family:
        if data.family not in FAMILIES:
            raise ConfigError(f"dataset {data.name!r}: family {data.family!r} is not registered ({known})")
        return FAMILIES[data.family].preset_row
    own_file = bool(data.files) and data.name == data.files[0]
    found = None if own_file else family_of(data.name)
    if found is not None:
        return found[0].preset_row
    if not own_file and data.files:
        raise ConfigError(f"dataset {data.name!r} (files {list(data.files)}): no reference row, it is neither "
                          f"a user's own pairs nor of a registered family ({known})")
    pairs = [*data.splits.train, *data.splits.dev, *data.splits.test]
    yes_no = sum(answer_meta(p.prompt, p.positive, p.negative)["format"] == "yes_no" for p in pairs)
    what = f"the pairs of {data.name}" if own_file else f"the pairs in memory ({data.name})"
    if pairs and yes_no == len(pairs):
        log.info("training preset: %s answer yes/no (%d of %d pairs), so they train with the psychopathy "
                 "reference row (SPEC §5, the persona traits' row)", what, yes_no, len(pairs))
        return "psychopathy"
    log.info("training preset: %s are A/B or open-ended (%d of %d pairs answer yes/no), so they train with "
             "the power-seeking reference row (SPEC §5)", what, yes_no, len(pairs))
    return "power-seeking"


def split_spec(default: SplitConfig, given: SplitArg) -> SplitConfig:
    """`default` with the fields of a mapping `given` changed (a `SplitConfig` replaces it; None keeps it)."""
    if given is None:
        return default
    if isinstance(given, SplitConfig):
        return given
    if not isinstance(given, Mapping):
        raise ConfigError(f"split: expected a mapping of split fields or a SplitConfig, got {type(given).__name__}")
    fields = {"seed": default.seed, "train": default.train, "dev": default.dev, "test": default.test,
              "stratify": default.stratify}
    return SplitConfig.from_dict({**fields, **dict(given)})


def _require_file(path: Path, what: str, choices: Sequence[str] = ()) -> Path:
    if path.is_file():
        return path
    hint = ""
    if choices:
        close = difflib.get_close_matches(path.stem if path.suffix else path.name, list(choices), n=3)
        hint = f"; did you mean {close}?" if close else f"; available: {sorted(choices)[:12]}..."
    raise DataError(f"{path}: no such file for {what}{hint}")


# ---------------------------------------------------------------------------------------------- families


def load_persona(trait: str, *, root: Path, split: SplitArg = None) -> BuiltinData:
    """Anthropic persona trait: yes/no statements. Default split: test and dev min(100, 10 %) each, train
    min(500, rest) — 500/100/100 for the 1000-statement files — stratified by the matching answer so every
    part keeps the file's Yes/No balance (the paper's 500/100 psychopathy split was never published).
    Changing the test or dev size keeps the default train cap of the rest."""
    folder = root / "anthropic-evals" / "persona"
    traits = [p.stem for p in folder.glob("*.jsonl")]
    path = _require_file(folder / f"{trait}.jsonl", f"persona trait {trait!r}", traits)
    dataset = read_pairs(path, "behavior", name=f"persona/{trait}")
    held_out = min(100, len(dataset) // 10)
    spec = split_spec(SplitConfig(test=held_out, dev=held_out, train=None, stratify="matching_answer"), split)
    if spec.train is None and not isinstance(split, SplitConfig):
        rest = len(dataset) - part_size(spec.test, len(dataset)) - part_size(spec.dev, len(dataset))
        spec = split_spec(spec, {"train": max(0, min(500, rest))})
    splits = dataset.split(spec)
    return BuiltinData(f"persona/{trait}", splits, choice_test=splits.test, choice_dev=splits.dev, files=(str(path),),
                       description=f"Anthropic persona trait {trait!r}: yes/no statements")


def load_bipo(name: str, *, root: Path, split: SplitArg = None) -> BuiltinData:
    """BiPO open-ended pairs; test pairs from `test.csv`, A/B choice test from `test_infer.csv`."""
    folder = root / "bipo" / name
    available = [p.name for p in (root / "bipo").glob("*") if p.is_dir()]
    train_path = _require_file(folder / "train.csv", f"BiPO set {name!r}", available)
    test_path = _require_file(folder / "test.csv", f"BiPO set {name!r}")
    train = read_pairs(train_path, "matching", name=f"{name}/train")
    test = read_pairs(test_path, "matching", name=f"{name}/test")
    splits = _splits_with_test_file(train, test, split, name)
    infer_path = folder / "test_infer.csv"
    choice_test = choice_dev = None
    if infer_path.is_file():
        header = next(csv_rows(infer_path), (0, {}))[1]
        if all(column in header for column in ("A", "B", "matching")):
            # The A/B questions are the only choice items: a seeded quarter chooses multipliers, the rest tests.
            choice = read_pairs(infer_path, "ab", name=f"{name}:choice")
            parts = choice.split(seed=splits.spec.seed, dev=BIPO_CHOICE_DEV, test=len(choice) - BIPO_CHOICE_DEV,
                                 stratify="matching_letter") if len(choice) > 2 * BIPO_CHOICE_DEV else None
            choice_test = parts.test if parts else choice
            choice_dev = parts.dev if parts else None
        else:  # BiPO's jailbreak ships a copy of test.csv under this name
            splits.warnings.append(DataWarning("unused_file", str(infer_path), None,
                                               "no A/B columns (question,A,B,matching); no choice test"))
    files = tuple(str(p) for p in (train_path, test_path, infer_path) if p.is_file())
    return BuiltinData(name, splits, choice_test=choice_test, choice_dev=choice_dev, open_prompts=_prompts_of(splits),
                       files=files, description=f"BiPO {name}: open-ended polarity pairs")


def load_caa(behaviour: str, *, root: Path, split: SplitArg = None) -> BuiltinData:
    """CAA behaviour: A/B training pairs, A/B test pairs (the test split) and open-ended test questions."""
    if behaviour not in CAA_BEHAVIOURS:
        raise DataError(f"unknown CAA behaviour {behaviour!r}; expected one of {list(CAA_BEHAVIOURS)}")
    gen_path = _require_file(root / "caa" / "generate" / behaviour / "generate_dataset.json", "CAA training pairs")
    test_dir = root / "caa" / "test" / behaviour
    ab_path = _require_file(test_dir / "test_dataset_ab.json", "CAA A/B test")
    open_path = _require_file(test_dir / "test_dataset_open_ended.json", "CAA open-ended test")
    train = read_pairs(gen_path, "behavior", name=f"caa/{behaviour}/train")
    test = read_pairs(ab_path, "behavior", name=f"caa/{behaviour}/test")
    splits = _splits_with_test_file(train, test, split, f"caa/{behaviour}")
    open_test = [EvalPrompt(text_field(row, "question", open_path, line, "line"),
                            {"format": "open_ended", "behaviour": behaviour, "file": open_path.name, "line": line})
                 for line, row in json_rows(open_path)]
    return BuiltinData(f"caa/{behaviour}", splits, choice_test=splits.test, choice_dev=splits.dev,
                       open_prompts={"test": open_test}, files=(str(gen_path), str(ab_path), str(open_path)),
                       description=f"CAA {behaviour}: A/B pairs")


def _aar_sets(root: Path) -> list[str]:
    base = root / "anthropic-evals" / "advanced-ai-risk"
    return sorted({p.stem for folder in _AAR_GENERATORS.values() for p in (base / folder).glob("*.jsonl")})


def load_advanced_ai_risk(name: str, *, root: Path, split: SplitArg = None) -> BuiltinData:
    """Anthropic advanced-AI-risk A/B questions. `<set>` combines the human- and LM-generated files (meta
    `generated_by`); `human/<set>` or `lm/<set>` reads one. Default split: dev 10 %, test 20 %, stratified by
    the matching letter."""
    generator, _, set_name = name.rpartition("/")
    if generator and generator not in _AAR_GENERATORS:
        raise DataError(f"advanced-ai-risk/{name}: expected <set>, human/<set> or lm/<set>")
    base = root / "anthropic-evals" / "advanced-ai-risk"
    chosen = [generator] if generator else list(_AAR_GENERATORS)
    paths = [(g, base / _AAR_GENERATORS[g] / f"{set_name}.jsonl") for g in chosen]
    paths = [(g, p) for g, p in paths if p.is_file()]
    if not paths:
        sets = _aar_sets(root)
        close = difflib.get_close_matches(set_name, sets, n=3)
        raise DataError(f"advanced-ai-risk/{name}: no such set in {base}" +
                        (f"; did you mean {close}?" if close else f"; available: {sets}"))
    records: list[SourceRecord] = []
    warnings: list[DataWarning] = []
    for g, path in paths:
        found, found_warnings = read_source_records(path, "behavior")
        records += [SourceRecord(PolarityPair(r.pair.prompt, r.pair.positive, r.pair.negative,
                                              {**r.pair.meta, "generated_by": g}), r.file, r.line, r.unit)
                    for r in found]
        warnings += found_warnings
    dataset = PairDataset.from_records(records, name=f"advanced-ai-risk/{name}", sources=[str(p) for _, p in paths],
                                       warnings=warnings)
    splits = dataset.split(split_spec(SplitConfig(dev=0.1, test=0.2, stratify="matching_letter"), split))
    return BuiltinData(f"advanced-ai-risk/{name}", splits, choice_test=splits.test, choice_dev=splits.dev,
                       files=tuple(str(p) for _, p in paths), description=f"Anthropic advanced-AI-risk {name} (A/B)")


def load_sentiment(*, root: Path, split: SplitArg = None) -> BuiltinData:
    """Positive vs negative sentiment, a quick demo concept built from the DExperts sentiment prompts.

    The files hold OpenWebText sentence openings (`prompt.text`) with their original endings
    (`continuation.text`), grouped by the sentiment of GPT-2's continuations (positive: 24-25 of 25 positive,
    negative: 0 of 25). No file holds a positive and a negative ending of the same opening, so a pair is
    `(SENTIMENT_INSTRUCTION, i-th positive sentence, i-th negative sentence)` in file order: the prompt is one
    fixed neutral instruction and the completions differ in sentiment (and, averaged out over pairs, in
    topic). Open prompts ask to continue held-out neutral openings (`SENTIMENT_CONTINUE`): dev 50, test 100,
    chosen by the split seed. Default split of the pairs: dev 10 %, test 10 %.
    """
    folder = root / "sentiment-prompts"
    pos_path = _require_file(folder / "positive_prompts.jsonl", "sentiment pairs")
    neg_path = _require_file(folder / "negative_prompts.jsonl", "sentiment pairs")
    neutral_path = _require_file(folder / "neutral_prompts.jsonl", "sentiment open prompts")
    positives, negatives = _sentences(pos_path), _sentences(neg_path)
    records = []
    for (pos_line, pos_text), (neg_line, neg_text) in zip(positives, negatives, strict=False):
        meta = {"format": "open_ended", "positive_source": f"{pos_path.name}:{pos_line}",
                "negative_source": f"{neg_path.name}:{neg_line}"}
        records.append(SourceRecord(PolarityPair(SENTIMENT_INSTRUCTION, pos_text, neg_text, meta),
                                    str(pos_path), pos_line))
    dataset = PairDataset.from_records(records, name="sentiment", sources=[str(pos_path), str(neg_path)])
    spec = split_spec(SplitConfig(dev=0.1, test=0.1), split)
    splits = dataset.split(spec)
    neutral = [(line, _nested_text(row, "prompt", neutral_path, line)) for line, row in jsonl_rows(neutral_path)]
    neutral.sort(key=lambda item: _rank(spec.seed, "sentiment", item[1]))
    open_prompts: dict[str, list[EvalPrompt]] = {}
    start = 0
    for part, size in SENTIMENT_HELD_OUT.items():
        open_prompts[part] = [EvalPrompt(SENTIMENT_CONTINUE.format(text=text),
                                         {"format": "open_ended", "concept": "positive sentiment", "text": text,
                                          "file": neutral_path.name, "line": line})
                              for line, text in neutral[start:start + size]]
        start += size
    return BuiltinData("sentiment", splits, open_prompts=open_prompts,
                       files=(str(pos_path), str(neg_path), str(neutral_path)),
                       description="positive vs negative sentiment sentences (DExperts prompts)")


def _nested_text(row: dict[str, Any], key: str, path: Path, line: int) -> str:
    value = row.get(key)
    if not isinstance(value, dict):
        raise DataError(f"{path}:{line}: field {key!r} must be an object with a 'text' field")
    text = text_field(value, "text", path, line, "line")
    if not text.strip():
        raise DataError(f"{path}:{line}: empty {key}.text")
    return text


def _sentences(path: Path) -> list[tuple[int, str]]:
    """Opening + original ending of each line, joined with a space unless the ending starts with punctuation."""
    out = []
    for line, row in jsonl_rows(path):
        head = _nested_text(row, "prompt", path, line).rstrip()
        tail = _nested_text(row, "continuation", path, line).strip()
        joiner = "" if re.match(r"[,.;:!?)\]'’]", tail) else " "
        out.append((line, head + joiner + tail))
    return out


def _rank(seed: int, *parts: Any) -> str:
    return hashlib.sha256(json.dumps([seed, *parts], ensure_ascii=False).encode()).hexdigest()


def _splits_with_test_file(train: PairDataset, test: PairDataset, split: SplitArg,
                           name: str) -> DatasetSplits:
    """Test part from the shipped test file; dev (and a train cap) carved from the training file."""
    spec = split_spec(SplitConfig(), split)
    if spec.test:
        raise ConfigError(f"{name}: the test part comes from the shipped test file; leave split.test at 0")
    inner = train.split(spec)
    train_prompts = {p.prompt for p in train}
    overlap = [DataWarning("train_test_overlap", str(test.sources[0]) if test.sources else test.name,
                           p.meta.get("line"), "test prompt also appears in the training file; kept")
               for p in test if p.prompt in train_prompts]
    if overlap:
        PairDataset([], name=name, warnings=overlap).log_warnings()
    source_hash = hashlib.sha256((train.hash() + test.hash()).encode()).hexdigest()
    test_part = PairDataset(list(test.pairs), name=f"{name}:test", sources=test.sources)
    return DatasetSplits(inner.train, inner.dev, test_part, spec, source_hash,
                         [*train.warnings, *test.warnings, *overlap])


def _prompts_of(splits: DatasetSplits) -> dict[str, list[EvalPrompt]]:
    """Open-ended prompts of the dev and test pairs, with their reference completions in meta."""
    return {part: [EvalPrompt(p.prompt, {**p.meta, "matching": p.positive, "not_matching": p.negative})
                   for p in splits[part]] for part in ("dev", "test")}


# ---------------------------------------------------------------------------------------------- axbench


@dataclass
class AxBenchConcept:
    """One AxBench Concept10 concept: its positive (instruction, concept-laden output) examples and held-out
    AlpacaEval instructions (the instructions the concept must be steered into), split dev/test."""

    concept_id: int
    concept: str
    genre: str
    setting: str
    examples: list[tuple[int, str, str]]  # (parquet row, instruction, output)
    held_out: dict[str, list[EvalPrompt]]
    files: tuple[str, ...]


def load_axbench_concept(concept_id: int, *, data_dir: str | Path | None = None,
                         setting: str = DEFAULT_AXBENCH_SETTING, seed: int = 42,
                         held_out: dict[str, int] | None = None) -> AxBenchConcept:
    """Read a concept's positive examples from `generate/train_data.parquet` and pick held-out instructions
    from `alpaca-eval/alpaca_eval.jsonl` (AxBench steers on AlpacaEval instructions), excluding any that
    occur among the concept's training inputs; ranked by sha256(seed, concept id, instruction)."""
    root = find_data_dir(data_dir)
    base = root / "axbench-concept10" / setting / "generate"
    settings = [p.name for p in (root / "axbench-concept10").glob("*") if p.is_dir()]
    parquet = _require_file(base / "train_data.parquet", f"AxBench setting {setting!r}", settings)
    metadata = base / "metadata.jsonl"
    names = {int(row["concept_id"]): row for _, row in jsonl_rows(metadata)} if metadata.is_file() else {}
    examples, genre = [], ""
    for row_no, row in parquet_rows(parquet):
        if row.get("concept_id") != concept_id or row.get("category") != "positive":
            continue
        instruction = text_field(row, "input", parquet, row_no, "row")
        output = text_field(row, "output", parquet, row_no, "row")
        if not output.strip():
            raise DataError(f"{parquet} row {row_no}: empty field 'output'")
        examples.append((row_no, instruction, output))
        genre = str(row.get("concept_genre") or genre)
    if not examples:
        known = sorted(names) or "none listed"
        raise DataError(f"{parquet}: no positive examples for concept id {concept_id} (concept ids: {known})")
    concept = str(names.get(concept_id, {}).get("concept") or concept_id)
    alpaca = _require_file(root / "alpaca-eval" / "alpaca_eval.jsonl", "AxBench held-out instructions")
    seen = {instruction for _, instruction, _ in examples}
    candidates = [(line, text_field(row, "instruction", alpaca, line, "line")) for line, row in jsonl_rows(alpaca)]
    candidates = [(line, text) for line, text in candidates if text.strip() and text not in seen]
    candidates.sort(key=lambda item: _rank(seed, concept_id, item[1]))
    sizes = held_out or AXBENCH_HELD_OUT
    if sum(sizes.values()) > len(candidates):
        raise DataError(f"{alpaca}: {len(candidates)} instructions, fewer than the {sum(sizes.values())} held out")
    parts: dict[str, list[EvalPrompt]] = {}
    start = 0
    for part, size in sizes.items():
        parts[part] = [EvalPrompt(text, {"format": "open_ended", "instruction": text, "concept": concept,
                                         "concept_id": concept_id, "file": alpaca.name, "line": line})
                       for line, text in candidates[start:start + size]]
        start += size
    return AxBenchConcept(concept_id, concept, genre, setting, examples, parts, (str(parquet), str(alpaca)))


def axbench_concept_id(name: str) -> tuple[str, int]:
    """(setting, concept id) of `axbench/<id>` or `axbench/<setting>/<id>`."""
    setting, _, concept = name.removeprefix("axbench/").rpartition("/")
    if not concept.isdigit():
        raise DataError(f"{name}: expected axbench/<concept id> or axbench/<setting>/<concept id>")
    return setting or DEFAULT_AXBENCH_SETTING, int(concept)


def axbench_pairs(concept: AxBenchConcept, answers: Sequence[Any], *, split: SplitArg = None,
                  extra: dict[str, Any] | None = None) -> BuiltinData:
    """AxBench pairs: (instruction, concept-laden output, the model's own unsteered answer).

    `answers` are the model's generations for the concept's instructions, in `concept.examples` order (any
    objects with `.text` and `.finished`, e.g. `generation.Generation`). Empty answers are dropped with an
    `empty_generation` warning. Default split: every pair trains (the paper's 72 per concept); the held-out
    AlpacaEval instructions are `open_prompts`.
    """
    if len(answers) != len(concept.examples):
        raise DataError(f"axbench concept {concept.concept_id}: {len(answers)} answers for "
                        f"{len(concept.examples)} instructions")
    parquet = concept.files[0]
    records, warnings = [], []
    for (row, instruction, output), answer in zip(concept.examples, answers, strict=True):
        if not answer.text.strip():
            warnings.append(DataWarning("empty_generation", parquet, row,
                                        "the model's unsteered answer is empty; pair dropped", "row"))
            continue
        meta = {"format": "open_ended", "instruction": instruction, "concept": concept.concept,
                "concept_id": concept.concept_id, "negative_finished": answer.finished,
                "file": Path(parquet).name, "row": row}
        records.append(SourceRecord(PolarityPair(instruction, output, answer.text, meta), parquet, row, "row"))
    name = f"axbench/{concept.setting}/{concept.concept_id}"
    dataset = PairDataset.from_records(records, name=name, sources=[parquet], warnings=warnings)
    splits = dataset.split(split_spec(SplitConfig(), split))
    return BuiltinData(name, splits, open_prompts=dict(concept.held_out), files=concept.files,
                       description=f"AxBench concept {concept.concept_id}: {concept.concept}",
                       extra={"concept": concept.concept, **dict(extra or {})}, family=AXBENCH.name)


def load_axbench(concept: str, *, root: Path, split: SplitArg = None) -> BuiltinData:
    """AxBench's negative side is the steered model's own answer: built by `unisteer.workflow.load_data`."""
    raise DataError(f"axbench/{concept}: the negative side is the steered model's own answer, which the data layer "
                    "does not generate; use unisteer.workflow.load_data (or axbench_concept_name + "
                    "load_axbench_concept + generation.generate_unsteered + axbench_pairs)")


# ---------------------------------------------------------------------------------------------- listing


def _list_persona(root: Path) -> list[str]:
    return [f"persona/{p.stem}" for p in sorted((root / "anthropic-evals" / "persona").glob("*.jsonl"))]


def _list_bipo(root: Path) -> list[str]:
    names = [n for n in BIPO_SETS if (root / "bipo" / n / "train.csv").is_file()]
    return names + [f"bipo/{p.parent.name}" for p in sorted((root / "bipo").glob("*/train.csv"))]


def _list_caa(root: Path) -> list[str]:
    return [f"caa/{b}" for b in CAA_BEHAVIOURS if (root / "caa" / "generate" / b).is_dir()]


def _list_advanced_ai_risk(root: Path) -> list[str]:
    return [f"advanced-ai-risk/{s}" for s in _aar_sets(root)]


def _list_axbench(root: Path) -> list[str]:
    metadata = root / "axbench-concept10" / DEFAULT_AXBENCH_SETTING / "generate" / "metadata.jsonl"
    return [f"axbench/{row['concept_id']}" for _, row in jsonl_rows(metadata)] if metadata.is_file() else []


def _list_sentiment(root: Path) -> list[str]:
    return ["sentiment"] if (root / "sentiment-prompts").is_dir() else []


# ---------------------------------------------------------------------------------------------- registrations
# In listing order (`list_builtins`, the unknown-name message). `preset_row` is the SPEC §5 row it trains with.

register_family(DatasetFamily("persona", load_persona, _list_persona, "psychopathy",
                              "Anthropic persona traits: yes/no statements", "persona/<trait>"))
register_family(DatasetFamily("bipo", load_bipo, _list_bipo, "power-seeking",
                              "BiPO open-ended pairs with an A/B choice test", "bipo/<name>", aliases=BIPO_SETS))
register_family(DatasetFamily("caa", load_caa, _list_caa, "power-seeking",
                              "CAA behaviours: A/B pairs, open-ended test questions", "caa/<behaviour>"))
register_family(DatasetFamily("advanced-ai-risk", load_advanced_ai_risk, _list_advanced_ai_risk, "power-seeking",
                              "Anthropic advanced-AI-risk A/B questions", "advanced-ai-risk/<set>"))
AXBENCH = register_family(DatasetFamily("axbench", load_axbench, _list_axbench, "axbench",
                                        "AxBench Concept10 concepts against the model's own answers",
                                        "axbench/<concept id>"))
register_family(DatasetFamily(
    "sentiment", lambda _member, *, root, split=None: load_sentiment(root=root, split=split), _list_sentiment,
    "axbench", "positive vs negative sentiment sentences", "sentiment"))
