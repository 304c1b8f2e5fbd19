"""Polarity-paired data (SPEC §2): records, datasets with seeded splits, file readers, chat rendering, batches.

An example is `(q, A_p, A_n)` — a prompt, a concept-positive and a concept-negative completion — held in a
`PolarityPair`. A `PairDataset` is a validated list of pairs with the warnings raised while reading it and a
content `hash()`; `PairDataset.split` makes deterministic, seeded train/dev/test parts whose seed and sizes
are recorded (`DatasetSplits.record()`).

Bad input policy (every case names the file and line; nothing is dropped silently):

| case | outcome |
|---|---|
| missing file, unknown format, malformed JSON line / CSV row, non-object record | `DataError` |
| missing field, non-text value, empty positive or negative completion | `DataError` |
| empty prompt | warning `empty_prompt`, pair kept (an unconditional completion is still a valid pair) |
| exact duplicate (prompt, positive, negative) | warning `duplicate_pair`, later copies removed |
| positive and negative identical (ignoring surrounding whitespace) | warning `identical_completions`, dropped |

Rendering (`Rendering`, applied by `PairEncoder`) is an explicit, recorded choice: the prompt template (the
chat template's single user turn with the generation prompt, or plain text), what happens to a completion's
leading whitespace, and whether the template's end-of-turn suffix follows each completion. Named choices:
`reference` (the paper's code: completions as written, end-of-turn appended) and `natural` (a completion
joins the prompt as the model would write it, no end-of-turn: the completion is the start of the answer).
`unisteer.workflow.choose_rendering` picks one per model and dataset by measurement. The prompt is
tokenised once and the two completions separately (answer, then suffix), so both sides share the prompt's
ids exactly (callers can share a KV cache of the prompt) and the answer tokens are known.

The built-in datasets (`persona/<trait>`, `power-seeking`, `caa/<behaviour>`, `axbench/<id>`, ...) live in
`unisteer.datasets_builtin` and are re-exported here.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .config import from_dict
from .errors import ConfigError, DataError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding)
Side = Literal["positive", "negative"]
PaddingSide = Literal["left", "right"]
SIDES: tuple[Side, Side] = ("positive", "negative")


# ---------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class PolarityPair:
    """One example (q, A_p, A_n). `meta` is JSON-like and carries what evaluators need (see `answer_meta`)."""

    prompt: str
    positive: str
    negative: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("prompt", "positive", "negative"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"PolarityPair.{name} must be str, got {type(getattr(self, name)).__name__}")

    def completion(self, side: Side) -> str:
        _check_side(side)
        return self.positive if side == "positive" else self.negative

    def key(self) -> tuple[str, str, str]:
        """Identity of the pair's content (meta excluded): used for duplicates and split ordering."""
        return (self.prompt, self.positive, self.negative)

    def content_id(self) -> str:
        """16 hex digits of sha256 of the content: the same pair has the same id whichever file it came from."""
        text = "\x00".join(self.key())
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


@dataclass(frozen=True)
class DataWarning:
    """A counted, reported problem in the input that did not stop reading (see the module's table)."""

    kind: str
    file: str
    line: int | None
    message: str
    unit: str = "line"  # "line" for text formats, "row" for Parquet

    def __str__(self) -> str:
        return f"{_where(self.file, self.line, self.unit)}: {self.message}"


@dataclass(frozen=True)
class SourceRecord:
    """A pair together with the place it was read from, before dataset-level validation."""

    pair: PolarityPair
    file: str
    line: int | None
    unit: str = "line"


def _where(file: str, line: int | None, unit: str = "line") -> str:
    if line is None:
        return file
    return f"{file}:{line}" if unit == "line" else f"{file} {unit} {line}"


def _check_side(side: str) -> None:
    if side not in SIDES:
        raise ValueError(f"side must be 'positive' or 'negative', got {side!r}")


# ---------------------------------------------------------------------------------------------- datasets


@dataclass
class PairDataset:
    """A validated list of polarity pairs, the warnings raised while reading them, and their sources."""

    pairs: list[PolarityPair]
    name: str = "pairs"
    warnings: list[DataWarning] = field(default_factory=list)
    sources: tuple[str, ...] = ()

    @classmethod
    def from_records(cls, records: Iterable[SourceRecord], *, name: str, sources: Sequence[str] = (),
                     warnings: Sequence[DataWarning] = ()) -> PairDataset:
        """Validate records: drop identical-completion pairs and later duplicates, each with a warning."""
        found = list(warnings)
        kept: list[PolarityPair] = []
        first_seen: dict[tuple[str, str, str], SourceRecord] = {}
        for rec in records:
            pair = rec.pair
            if pair.positive.strip() == pair.negative.strip():
                found.append(DataWarning("identical_completions", rec.file, rec.line,
                                         "positive and negative completions are identical; pair dropped",
                                         rec.unit))
                continue
            first = first_seen.get(pair.key())
            if first is not None:
                found.append(DataWarning("duplicate_pair", rec.file, rec.line, "duplicate of the pair at "
                                         f"{_where(first.file, first.line, first.unit)}; removed", rec.unit))
                continue
            first_seen[pair.key()] = rec
            kept.append(pair)
        dataset = cls(kept, name=name, warnings=found, sources=tuple(sources))
        dataset.log_warnings()
        return dataset

    @classmethod
    def from_pairs(cls, pairs: Iterable[PolarityPair], *, name: str = "pairs") -> PairDataset:
        """Validate in-memory pairs the same way as file input (the 'line' is the 1-based index)."""
        records = [SourceRecord(p, f"<{name}>", i, "item") for i, p in enumerate(pairs, start=1)]
        return cls.from_records(records, name=name)

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self) -> Iterator[PolarityPair]:
        return iter(self.pairs)

    def __getitem__(self, index: int) -> PolarityPair:
        return self.pairs[index]

    def hash(self) -> str:
        """sha256 of the pairs' content and metadata, in order (stable across runs and machines)."""
        digest = hashlib.sha256()
        for pair in self.pairs:
            row = [pair.prompt, pair.positive, pair.negative, pair.meta]
            digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode())
            digest.update(b"\n")
        return digest.hexdigest()

    def warning_counts(self) -> dict[str, int]:
        return dict(Counter(w.kind for w in self.warnings))

    def log_warnings(self) -> None:
        """One log line per warning kind, with the first few places."""
        by_kind: dict[str, list[DataWarning]] = defaultdict(list)
        for w in self.warnings:
            by_kind[w.kind].append(w)
        for kind, items in by_kind.items():
            places = ", ".join(_where(w.file, w.line, w.unit) for w in items[:5])
            more = f" and {len(items) - 5} more" if len(items) > 5 else ""
            log.warning("%s: %d %s warning(s) at %s%s", self.name, len(items), kind, places, more)

    def select(self, indices: Sequence[int], *, name: str) -> PairDataset:
        """A subset in the given order. Warnings stay with the source dataset (see `DatasetSplits.warnings`)."""
        return PairDataset([self.pairs[i] for i in indices], name=name, sources=self.sources)

    def split(self, spec: SplitSpec | None = None, **overrides: Any) -> DatasetSplits:
        """Deterministic train/dev/test parts; see `SplitSpec`. `overrides` replace fields of `spec`."""
        spec = _spec_with(spec, overrides)
        order = _split_order(self.pairs, spec.seed)
        n = len(self.pairs)
        n_test = _count(spec.test, n)
        n_dev = _count(spec.dev, n)
        n_train = max(0, n - n_test - n_dev) if spec.train is None else _count(spec.train, n)
        if n_test + n_dev + n_train > n:
            raise DataError(f"{self.name}: split sizes test={n_test} + dev={n_dev} + train={n_train} exceed the "
                            f"{n} pairs available")
        groups = self._strata(spec.stratify)
        parts: dict[str, list[int]] = {}
        remaining = {g: [i for i in order if i in members] for g, members in groups.items()}
        for part, size in (("test", n_test), ("dev", n_dev), ("train", n_train)):
            quotas = _proportional_quotas(size, {g: len(idx) for g, idx in remaining.items()})
            taken: list[int] = []
            for g, quota in quotas.items():
                taken += remaining[g][:quota]
                remaining[g] = remaining[g][quota:]
            parts[part] = sorted(taken)  # file order inside a part; trainers shuffle with their own seed
        return DatasetSplits(
            train=self.select(parts["train"], name=f"{self.name}:train"),
            dev=self.select(parts["dev"], name=f"{self.name}:dev"),
            test=self.select(parts["test"], name=f"{self.name}:test"),
            spec=spec,
            source_hash=self.hash(),
            warnings=list(self.warnings),
        )

    def _strata(self, key: str | None) -> dict[str, set[int]]:
        if key is None:
            return {"": set(range(len(self.pairs)))}
        groups: dict[str, set[int]] = defaultdict(set)
        for i, pair in enumerate(self.pairs):
            if key not in pair.meta:
                raise DataError(f"{self.name}: cannot stratify by {key!r}: pair {i} has no such meta key "
                                f"(keys: {sorted(pair.meta)})")
            groups[str(pair.meta[key])].add(i)
        return dict(sorted(groups.items()))

    def record(self) -> dict[str, Any]:
        """What to store with a result: name, size, content hash, sources, warning counts."""
        return {"name": self.name, "size": len(self), "hash": self.hash(), "sources": list(self.sources),
                "warnings": self.warning_counts()}

    def content_ids(self) -> list[str]:
        return [pair.content_id() for pair in self.pairs]

    def provenance(self) -> dict[str, Any]:
        """What an update stores about the pairs it was trained on: enough to detect any overlap later."""
        return {"name": self.name, "pairs": len(self), "hash": self.hash(), "pair_ids": self.content_ids()}


@dataclass(frozen=True)
class SplitSpec:
    """How to split: sizes are counts (int) or fractions of all pairs (float); `train=None` takes the rest.

    Order: pairs are ranked by sha256(seed, prompt, positive, negative) — independent of file order and of
    library versions — then the test part is taken first, dev second, train third. With `stratify` (a meta
    key, e.g. the matching answer) every part keeps the proportions of that key's values.
    """

    seed: int = 42
    train: int | float | None = None
    dev: int | float = 0
    test: int | float = 0
    stratify: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"split seed must be an int, got {self.seed!r}")
        for name in ("train", "dev", "test"):
            value = getattr(self, name)
            if value is None and name == "train":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"split {name} must be a count (int) or a fraction (float), got {value!r}")
            if value < 0 or (isinstance(value, float) and value > 1):
                raise ConfigError(f"split {name}={value!r}: counts must be >= 0, fractions in [0, 1]")

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "split") -> SplitSpec:
        return from_dict(cls, data, where=where)


@dataclass
class DatasetSplits:
    """Train/dev/test parts with the spec that made them; `record()` is stored with every result."""

    train: PairDataset
    dev: PairDataset
    test: PairDataset
    spec: SplitSpec
    source_hash: str
    warnings: list[DataWarning] = field(default_factory=list)

    def __getitem__(self, part: str) -> PairDataset:
        if part not in ("train", "dev", "test"):
            raise KeyError(f"unknown split part {part!r}; expected train, dev or test")
        return getattr(self, part)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "dev": len(self.dev), "test": len(self.test)}

    def record(self) -> dict[str, Any]:
        return {
            "seed": self.spec.seed,
            "sizes": self.sizes(),
            "spec": {"train": self.spec.train, "dev": self.spec.dev, "test": self.spec.test,
                     "stratify": self.spec.stratify},
            "hashes": {p: self[p].hash() for p in ("train", "dev", "test")},
            "source_hash": self.source_hash,
            "warnings": dict(Counter(w.kind for w in self.warnings)),
        }


def _spec_with(spec: SplitSpec | None, overrides: Mapping[str, Any]) -> SplitSpec:
    base = {} if spec is None else {k: getattr(spec, k) for k in ("seed", "train", "dev", "test", "stratify")}
    return SplitSpec.from_dict({**base, **overrides})


def _split_order(pairs: Sequence[PolarityPair], seed: int) -> list[int]:
    def rank(i: int) -> bytes:
        text = "\x00".join((str(seed), *pairs[i].key()))
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()

    return sorted(range(len(pairs)), key=lambda i: (rank(i), i))


def _count(value: int | float, n: int) -> int:
    if isinstance(value, float):
        return int(math.floor(value * n + 0.5))
    return int(value)


def _proportional_quotas(total: int, sizes: Mapping[str, int]) -> dict[str, int]:
    """Split `total` over groups in proportion to `sizes` (largest remainder; ties by group name)."""
    available = sum(sizes.values())
    if total > available:
        raise DataError(f"asked for {total} pairs but only {available} remain")
    if available == 0:
        return dict.fromkeys(sizes, 0)
    exact = {g: total * s / available for g, s in sizes.items()}
    quotas = {g: min(sizes[g], math.floor(x)) for g, x in exact.items()}
    by_remainder = sorted(sizes, key=lambda g: (-(exact[g] - quotas[g]), g))
    while sum(quotas.values()) < total:
        for g in by_remainder:
            if quotas[g] < sizes[g] and sum(quotas.values()) < total:
                quotas[g] += 1
    return quotas


# ---------------------------------------------------------------------------------------------- readers


@dataclass(frozen=True)
class FieldMap:
    """Which record fields hold the prompt and the two completions.

    Pair form: `prompt`, `positive`, `negative` name fields holding text. A/B form: `choices` names the two
    fields holding the texts of choices (A) and (B) and `answer` the field holding the matching letter; the
    prompt becomes `question + "\\n\\nChoices:\\n(A) ...\\n(B) ..."` and the completions `(A)` / `(B)`.
    """

    prompt: str = "question"
    positive: str | None = "matching"
    negative: str | None = "not_matching"
    choices: tuple[str, ...] = ()
    answer: str | None = None

    def __post_init__(self) -> None:
        pair_form = self.positive is not None and self.negative is not None
        ab_form = len(self.choices) == 2 and self.answer is not None
        if pair_form == ab_form:
            raise ConfigError("FieldMap needs either positive and negative fields, or two choices and an answer "
                              f"field (got {self})")

    @property
    def is_ab(self) -> bool:
        return bool(self.choices)

    def required(self) -> tuple[str, ...]:
        if self.is_ab:
            return (self.prompt, *self.choices, self.answer or "")
        return (self.prompt, self.positive or "", self.negative or "")


FIELD_PRESETS: dict[str, FieldMap] = {
    "matching": FieldMap("question", "matching", "not_matching"),
    "behavior": FieldMap("question", "answer_matching_behavior", "answer_not_matching_behavior"),
    "preference": FieldMap("input", "winning_output", "losing_output"),
    "preference-prompt": FieldMap("prompt", "winning_output", "losing_output"),
    "pair": FieldMap("prompt", "positive", "negative"),
    "ab": FieldMap("question", None, None, choices=("A", "B"), answer="matching"),
}

READ_FORMATS = ("jsonl", "json", "csv", "parquet")


def read_pairs(path: str | Path, fields: FieldMap | str | Mapping[str, Any] | None = None, *,
               name: str | None = None, format: str | None = None) -> PairDataset:
    """Read polarity pairs from a JSONL, JSON (array of objects), CSV (with header) or Parquet file.

    `fields` is a `FieldMap`, a preset name from `FIELD_PRESETS`, a dict of `FieldMap` fields, or None to
    detect the preset from the first record's fields. Fields not used for the pair are kept in `meta`, with
    `file`, `line` and the answer description from `answer_meta`.
    """
    records, warnings = read_source_records(path, fields, format=format)
    path = Path(path)
    return PairDataset.from_records(records, name=name or path.stem, sources=[str(path)], warnings=warnings)


def read_source_records(path: str | Path, fields: FieldMap | str | Mapping[str, Any] | None = None, *,
                        format: str | None = None) -> tuple[list[SourceRecord], list[DataWarning]]:
    """Read records and field-level warnings without dataset-level validation (used to combine files)."""
    path = Path(path)
    fmt = format or _format_of(path)
    rows = _iter_rows(path, fmt)
    unit = "row" if fmt == "parquet" else "line"
    records: list[SourceRecord] = []
    warnings: list[DataWarning] = []
    field_map: FieldMap | None = None
    for line, row in rows:
        if field_map is None:
            field_map = resolve_fields(fields, row, path)
        records.append(_record_from_row(row, field_map, path, line, unit, warnings))
    if not records:
        raise DataError(f"{path}: no records")
    return records, warnings


def resolve_fields(fields: FieldMap | str | Mapping[str, Any] | None, first_row: Mapping[str, Any],
                   path: Path | str = "<data>") -> FieldMap:
    if isinstance(fields, FieldMap):
        return fields
    if isinstance(fields, str):
        if fields not in FIELD_PRESETS:
            raise ConfigError(f"unknown field preset {fields!r}; expected one of {sorted(FIELD_PRESETS)}")
        return FIELD_PRESETS[fields]
    if isinstance(fields, Mapping):
        data = dict(fields)
        if "choices" in data:
            data["choices"] = tuple(data["choices"])
        return from_dict(FieldMap, data, where="fields")
    for preset in FIELD_PRESETS.values():
        if all(f in first_row for f in preset.required()):
            return preset
    raise DataError(f"{path}: cannot detect the field mapping from fields {sorted(first_row)}; pass fields= "
                    f"one of {sorted(FIELD_PRESETS)} or a FieldMap")


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    if suffix in READ_FORMATS:
        return suffix
    raise DataError(f"{path}: unknown data format {path.suffix!r}; expected one of "
                    f"{', '.join('.' + f for f in READ_FORMATS)} (or pass format=)")


def _iter_rows(path: Path, fmt: str) -> Iterator[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    readers = {"jsonl": _jsonl_rows, "json": _json_rows, "csv": _csv_rows, "parquet": _parquet_rows}
    if fmt not in readers:
        raise DataError(f"{path}: unknown data format {fmt!r}; expected one of {READ_FORMATS}")
    return readers[fmt](path)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def _require_object(obj: Any, path: Path, line: int) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise DataError(f"{path}:{line}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for line_no, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue  # blank lines separate nothing in JSONL; they are not records
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{line_no}: malformed JSON line ({exc.msg} at column {exc.colno})") from exc
        yield line_no, _require_object(obj, path, line_no)


def _json_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Items of a top-level JSON array, each with the line it starts on."""
    text = _read_text(path)
    decoder = json.JSONDecoder()
    i = _skip_space(text, 0)
    if i >= len(text) or text[i] != "[":
        raise DataError(f"{path}:{text.count(chr(10), 0, i) + 1}: expected a JSON array of records")
    i = _skip_space(text, i + 1)
    if i < len(text) and text[i] == "]":
        return
    while True:
        line_no = text.count("\n", 0, i) + 1
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from exc
        yield line_no, _require_object(obj, path, line_no)
        i = _skip_space(text, end)
        if i < len(text) and text[i] == ",":
            i = _skip_space(text, i + 1)
            continue
        if i < len(text) and text[i] == "]" and not text[i + 1:].strip():
            return
        raise DataError(f"{path}:{text.count(chr(10), 0, i) + 1}: malformed JSON (expected ',' or a final ']')")


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _csv_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh, strict=True)
        try:
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: empty CSV file (no header)")
            duplicated = [c for c, k in Counter(header).items() if k > 1]
            if duplicated:
                raise DataError(f"{path}:1: duplicate CSV column(s) {duplicated}")
            start = reader.line_num + 1
            for row in reader:
                if row:  # the csv module yields [] for blank lines
                    if len(row) != len(header):
                        raise DataError(f"{path}:{start}: malformed CSV row: {len(row)} fields, header has "
                                        f"{len(header)}")
                    yield start, dict(zip(header, row, strict=True))
                start = reader.line_num + 1
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from exc
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from exc


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    import pandas as pd
    import pyarrow

    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError, pyarrow.ArrowException) as exc:
        raise DataError(f"{path}: cannot read Parquet file ({exc})") from exc
    for row_no, row in enumerate(frame.to_dict("records"), start=1):
        yield row_no, {str(k): _plain_value(v) for k, v in row.items()}


def _plain_value(value: Any) -> Any:
    """numpy scalars and NaN from Parquet as plain JSON-like values (NaN → None, i.e. missing)."""
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        try:
            value = value.item()
        except ValueError:  # arrays: keep as list
            value = value.tolist()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _text_field(row: Mapping[str, Any], name: str, path: Path, line: int, unit: str) -> str:
    value = row.get(name)
    if isinstance(value, str):
        return value
    where = _where(str(path), line, unit)
    if value is None:
        raise DataError(f"{where}: missing field {name!r} (fields present: {sorted(row)})")
    raise DataError(f"{where}: field {name!r} must be text, got {type(value).__name__} {value!r:.60}")


def _record_from_row(row: Mapping[str, Any], fields: FieldMap, path: Path, line: int, unit: str,
                     warnings: list[DataWarning]) -> SourceRecord:
    where = _where(str(path), line, unit)
    prompt = _text_field(row, fields.prompt, path, line, unit)
    if fields.is_ab:
        texts = [_text_field(row, c, path, line, unit) for c in fields.choices]
        answer = _text_field(row, fields.answer or "", path, line, unit)
        letter = _letter(answer)
        if letter not in ("A", "B"):
            raise DataError(f"{where}: field {fields.answer!r} must name choice A or B, got {answer!r}")
        for c, text in zip(fields.choices, texts, strict=True):
            if not text.strip():
                raise DataError(f"{where}: empty choice field {c!r}")
        other = "B" if letter == "A" else "A"
        question = prompt
        prompt = f"{question}\n\nChoices:\n(A) {texts[0]}\n(B) {texts[1]}"
        positive, negative = f"({letter})", f"({other})"
        meta = {"format": "ab", "question": question, "choices": {"A": texts[0], "B": texts[1]},
                "matching_letter": letter, "not_matching_letter": other}
        used = {fields.prompt, *fields.choices, fields.answer}
    else:
        positive = _text_field(row, fields.positive or "", path, line, unit)
        negative = _text_field(row, fields.negative or "", path, line, unit)
        for name, text in ((fields.positive, positive), (fields.negative, negative)):
            if not text.strip():
                raise DataError(f"{where}: empty completion in field {name!r}")
        meta = answer_meta(prompt, positive, negative)
        used = {fields.prompt, fields.positive, fields.negative}
    if not prompt.strip():
        warnings.append(DataWarning("empty_prompt", str(path), line, f"empty prompt in field {fields.prompt!r}; "
                                    "pair kept as an unconditional completion", unit))
    extras = {k: v for k, v in row.items() if k not in used and k not in meta}
    meta = {**extras, **meta, "file": path.name, unit: line}
    return SourceRecord(PolarityPair(prompt, positive, negative, meta), str(path), line, unit)


_LETTER = re.compile(r"^\s*\(?\s*([A-Z])\s*\)?\s*$")
_CHOICE_LINE = re.compile(r"^\s*\(([A-Z])\)\s*(.*?)\s*$", re.MULTILINE)


def _letter(answer: str) -> str | None:
    match = _LETTER.match(answer)
    return match.group(1) if match else None


def answer_meta(prompt: str, positive: str, negative: str) -> dict[str, Any]:
    """Describe the answer format so evaluators can score without re-parsing.

    - `yes_no`: completions are Yes/No; `matching_answer` / `not_matching_answer` hold the stripped words.
    - `ab`: completions are choice letters like " (A)"; `matching_letter`, `not_matching_letter`, the prompt
      as `question` and the `choices` parsed from its "(X) text" lines (letter → text).
    - `open_ended`: anything else.
    """
    pos_letter, neg_letter = _letter(positive), _letter(negative)
    if pos_letter and neg_letter and pos_letter != neg_letter:
        choices = {m.group(1): m.group(2) for m in _CHOICE_LINE.finditer(prompt)}
        return {"format": "ab", "question": prompt, "choices": choices, "matching_letter": pos_letter,
                "not_matching_letter": neg_letter}
    words = {positive.strip().lower(), negative.strip().lower()}
    if words == {"yes", "no"}:
        return {"format": "yes_no", "matching_answer": positive.strip(), "not_matching_answer": negative.strip()}
    return {"format": "open_ended"}


# ---------------------------------------------------------------------------------------------- rendering


TEMPLATES = ("auto", "chat", "plain")
COMPLETION_SPACES = ("keep", "strip", "join")


@dataclass(frozen=True)
class Rendering:
    """How a polarity pair becomes model input; recorded with every update, sweep and report.

    template: "chat" (the tokenizer's chat template, one user turn plus the generation prompt), "plain"
      (`plain_format`), or "auto" (chat where the tokenizer has a template).
    completion_space: a completion's leading whitespace — "keep" it as the dataset writes it (" Yes"),
      "strip" it, or "join": strip it only after a prompt that already ends in whitespace (a chat template's
      "assistant\n"), so the answer is spelled as the model would write it there.
    end_of_turn: append the template's end-of-turn suffix (eos for plain text) to every completion, so the
      completion is the whole answer; without it the completion is the start of the answer.
    """

    template: str = "auto"
    completion_space: str = "join"
    end_of_turn: bool = False
    plain_format: str = "{prompt}"
    name: str = ""

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise ConfigError(f"rendering.template: {self.template!r} is not one of {TEMPLATES}")
        if self.completion_space not in COMPLETION_SPACES:
            raise ConfigError(f"rendering.completion_space: {self.completion_space!r} is not one of "
                              f"{COMPLETION_SPACES}")
        if not isinstance(self.end_of_turn, bool):
            raise ConfigError(f"rendering.end_of_turn: expected true or false, got {self.end_of_turn!r}")
        if not isinstance(self.plain_format, str) or "{prompt}" not in self.plain_format:
            raise ConfigError(f"rendering.plain_format must contain '{{prompt}}', got {self.plain_format!r}")

    @classmethod
    def parse(cls, value: Rendering | str | Mapping[str, Any] | None) -> Rendering:
        """A `Rendering` from a name in `RENDERINGS`, a mapping of its fields, or itself (None: natural)."""
        if value is None:
            return RENDERINGS["natural"]
        if isinstance(value, Rendering):
            return value
        if isinstance(value, str):
            if value not in RENDERINGS:
                raise ConfigError(f"rendering: {value!r} is not one of {sorted(RENDERINGS)} (or a mapping of "
                                  "template / completion_space / end_of_turn / plain_format)")
            return RENDERINGS[value]
        return from_dict(cls, dict(value), where="rendering")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "template": self.template, "completion_space": self.completion_space,
                "end_of_turn": self.end_of_turn, "plain_format": self.plain_format}

    def same_choice(self, other: Rendering) -> bool:
        """Equal up to the name (a measured choice equals the named rendering it coincides with)."""
        return {**self.to_dict(), "name": ""} == {**other.to_dict(), "name": ""}


RENDERINGS: dict[str, Rendering] = {
    "reference": Rendering(completion_space="keep", end_of_turn=True, name="reference"),
    "natural": Rendering(completion_space="join", end_of_turn=False, name="natural"),
}


@dataclass(frozen=True)
class EncodedPair:
    """Token ids of one pair: the rendered prompt once, each completion (answer, then suffix) separately.

    The full sequence of a side is `prompt_ids + positive_ids` (or `negative_ids`); it is not a
    re-tokenisation of the joined text, so both sides share the prompt's ids exactly. The first
    `positive_answer_length` ids of `positive_ids` are the answer, the rest the end-of-turn suffix (likewise
    for the negative side); None means all of them are answer.
    """

    prompt_ids: list[int]
    positive_ids: list[int]
    negative_ids: list[int]
    meta: dict[str, Any] = field(default_factory=dict)
    truncated: bool = False
    positive_answer_length: int | None = None
    negative_answer_length: int | None = None

    def completion_ids(self, side: Side) -> list[int]:
        _check_side(side)
        return self.positive_ids if side == "positive" else self.negative_ids

    def answer_length(self, side: Side) -> int:
        """How many leading completion ids are the answer itself (the rest is the end-of-turn suffix)."""
        _check_side(side)
        length = self.positive_answer_length if side == "positive" else self.negative_answer_length
        return len(self.completion_ids(side)) if length is None else length


_PREFIX_PROBES = ("A", "zebra 42", "?", "Hello, world.", "1 + 1 =", "Écrire")
_SENTINEL = "unisteer-end-of-turn-probe"


class PairEncoder:
    """Renders pairs by a `Rendering` and tokenises them; see the module docstring.

    Truncation keeps every sequence (prompt + one completion) within `max_length` tokens: completions are
    kept whole and the prompt loses tokens from the left of its user content, right after the template's
    common prefix (so the template head and the generation prompt survive). Only a completion that alone
    exceeds `max_length - 1` is cut, from its end. Truncated pairs are flagged (`EncodedPair.truncated`)
    and counted (`truncated_count`).
    """

    def __init__(self, tokenizer: Any, rendering: Rendering | str | Mapping[str, Any] | None = None, *,
                 max_length: int = 512) -> None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ConfigError(f"max_length must be an integer of at least 2, got {max_length!r}")
        self.rendering = Rendering.parse(rendering)
        has_template = getattr(tokenizer, "chat_template", None) is not None
        if self.rendering.template == "chat" and not has_template:
            raise ConfigError("rendering.template is 'chat' but the tokenizer has no chat template")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.uses_chat_template = has_template if self.rendering.template == "auto" else \
            self.rendering.template == "chat"
        self.plain_format = self.rendering.plain_format
        # What the template writes after an assistant turn (also what stops generation), whether or not
        # completions are scored with it.
        self.turn_end = self._derive_turn_end()
        self.completion_suffix = self.turn_end if self.rendering.end_of_turn else ""
        self._suffix = self._ids(self.completion_suffix)
        # Every chat prompt ends with the same generation prompt, so whether it ends in whitespace is fixed.
        self._chat_prompt_ends_in_space = self.uses_chat_template and self.render_prompt("x")[-1:].isspace()
        self.common_prefix_length = self._derive_common_prefix_length()
        self.truncated_count = 0

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's pad id, else its eos id: padded positions are always masked, so any id serves."""
        for token_id in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if token_id is not None:
                return int(token_id)
        raise ConfigError("tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")

    def describe(self) -> dict[str, Any]:
        """Rendering settings to record with results (and to key caches of rendered text)."""
        return {"rendering": self.rendering.to_dict(), "chat_template": self.uses_chat_template,
                "max_length": self.max_length, "completion_suffix": self.completion_suffix,
                "turn_end": self.turn_end, "plain_format": None if self.uses_chat_template else self.plain_format,
                "common_prefix_length": self.common_prefix_length}

    def render_prompt(self, prompt: str) -> str:
        if not self.uses_chat_template:
            return self.plain_format.format(prompt=prompt)
        return self._apply_template([{"role": "user", "content": prompt}], add_generation_prompt=True)

    def render_answer(self, completion: str, prompt: str = "") -> str:
        """The completion's text as scored, without the end-of-turn suffix."""
        space = self.rendering.completion_space
        if space == "strip" or (space == "join" and self._prompt_ends_in_space(prompt)):
            return completion.lstrip()
        return completion

    def render_completion(self, completion: str, prompt: str = "") -> str:
        return self.render_answer(completion, prompt) + self.completion_suffix

    def encode_prompt(self, prompt: str) -> list[int]:
        # A chat template writes its own special tokens (BOS included); plain text gets the tokenizer's.
        text = self.render_prompt(prompt)
        return list(self.tokenizer(text, add_special_tokens=not self.uses_chat_template)["input_ids"])

    def encode_answer(self, completion: str, prompt: str = "") -> list[int]:
        return self._ids(self.render_answer(completion, prompt))

    def encode_completion(self, completion: str, prompt: str = "") -> list[int]:
        return self.encode_answer(completion, prompt) + self._suffix_ids()

    def encode(self, pair: PolarityPair) -> EncodedPair:
        prompt_ids = self.encode_prompt(pair.prompt)
        answers = [self.encode_answer(pair.positive, pair.prompt), self.encode_answer(pair.negative, pair.prompt)]
        suffix = self._suffix_ids()
        completions = [a + suffix for a in answers]
        limit = self.max_length - 1  # at least one prompt token predicts the first completion token
        truncated = any(len(c) > limit for c in completions)
        completions = [c[:limit] for c in completions]
        budget = self.max_length - max(len(c) for c in completions)
        if len(prompt_ids) > budget:
            prompt_ids = self._truncate_prompt(prompt_ids, budget)
            truncated = True
        if truncated:
            self.truncated_count += 1
        lengths = [min(len(a), len(c)) for a, c in zip(answers, completions, strict=True)]
        return EncodedPair(prompt_ids, completions[0], completions[1], dict(pair.meta), truncated, *lengths)

    def encode_all(self, pairs: Iterable[PolarityPair]) -> list[EncodedPair]:
        return [self.encode(p) for p in pairs]

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def _suffix_ids(self) -> list[int]:
        return list(self._suffix)

    def _prompt_ends_in_space(self, prompt: str) -> bool:
        if self.uses_chat_template:
            return self._chat_prompt_ends_in_space
        rendered = self.render_prompt(prompt)
        return not rendered or rendered[-1].isspace()

    def _truncate_prompt(self, ids: list[int], budget: int) -> list[int]:
        head = self.common_prefix_length
        if budget > head:
            return ids[:head] + ids[len(ids) - (budget - head):]
        return ids[len(ids) - budget:]

    def _apply_template(self, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except TemplateError as exc:
            raise ConfigError(f"the tokenizer's chat template failed to render {messages!r:.120}: {exc}") from exc

    def _derive_turn_end(self) -> str:
        """What the template writes after an assistant message's content (e.g. '<|im_end|>\\n'); else eos."""
        eos = self.tokenizer.eos_token or ""
        if not self.uses_chat_template:
            return eos
        text = self._apply_template([{"role": "user", "content": "Hello"},
                                     {"role": "assistant", "content": _SENTINEL}], add_generation_prompt=False)
        at = text.rfind(_SENTINEL)
        suffix = text[at + len(_SENTINEL):] if at >= 0 else ""
        return suffix if suffix else eos

    def _derive_common_prefix_length(self) -> int:
        """Tokens shared by every rendered prompt (template head, e.g. system turn + '<|im_start|>user\\n')."""
        rendered = [self.encode_prompt(p) for p in _PREFIX_PROBES]
        length = 0
        for column in zip(*rendered, strict=False):
            if len(set(column)) > 1:
                break
            length += 1
        return min(length, *(len(r) for r in rendered))


# ---------------------------------------------------------------------------------------------- batches


@dataclass
class TokenBatch:
    """A padded batch. Labels are aligned with input_ids (the model shifts them); -100 marks no loss.

    `position_ids` count real tokens only, so left padding and completion-only batches (which continue after
    their prompt) get the absolute positions the unpadded sequence would have. `lengths` are real tokens
    per row, `prompt_lengths` the real prompt tokens of each row's pair. `answer_mask` is the part of
    `completion_mask` that is the answer itself (without the end-of-turn suffix).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    completion_mask: torch.Tensor
    prompt_lengths: torch.Tensor
    lengths: torch.Tensor
    padding_side: PaddingSide
    meta: list[dict[str, Any]] = field(default_factory=list)
    answer_mask: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> TokenBatch:
        moved = {k: getattr(self, k).to(device) for k in ("input_ids", "attention_mask", "position_ids", "labels",
                                                          "completion_mask", "prompt_lengths", "lengths")}
        if self.answer_mask is not None:
            moved["answer_mask"] = self.answer_mask.to(device)
        return TokenBatch(**moved, padding_side=self.padding_side, meta=self.meta)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "position_ids": self.position_ids}


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Tokens every sequence starts with, leaving at least one token of each after them (the part that
    can be computed once and shared as a KV cache)."""
    if not sequences:
        return 0
    first = sequences[0]
    length = min(len(s) for s in sequences) - 1
    for other in sequences[1:]:
        same = 0
        for a, b in zip(first[:length], other, strict=False):
            if a != b:
                break
            same += 1
        length = same
    return max(0, length)


def collate_pairs(encoded: Sequence[EncodedPair], side: Side, *, pad_token_id: int,
                  padding_side: PaddingSide = "right") -> TokenBatch:
    """`prompt + completion` sequences of one side; labels mask the prompt and the padding."""
    _check_side(side)
    rows, labels, completion, answer = [], [], [], []
    for ep in encoded:
        comp = ep.completion_ids(side)
        n_answer = ep.answer_length(side)
        rows.append(ep.prompt_ids + comp)
        labels.append([IGNORE_INDEX] * len(ep.prompt_ids) + comp)
        completion.append([False] * len(ep.prompt_ids) + [True] * len(comp))
        answer.append([False] * len(ep.prompt_ids) + [True] * n_answer + [False] * (len(comp) - n_answer))
    prompt_lengths = [len(ep.prompt_ids) for ep in encoded]
    batch = _pad(rows, labels, completion, [0] * len(rows), prompt_lengths, pad_token_id, padding_side,
                 [ep.meta for ep in encoded])
    batch.answer_mask = _pad_flags(answer, batch.input_ids.shape[1], padding_side)
    return batch


def collate_prompts(prompts: Sequence[EncodedPair] | Sequence[Sequence[int]], *, pad_token_id: int,
                    padding_side: PaddingSide = "left") -> TokenBatch:
    """Prompt-only batch (left padding by default, for generation or a shared prompt KV cache)."""
    ids = [list(p.prompt_ids) if isinstance(p, EncodedPair) else list(p) for p in prompts]
    meta = [p.meta if isinstance(p, EncodedPair) else {} for p in prompts]
    labels = [[IGNORE_INDEX] * len(r) for r in ids]
    completion = [[False] * len(r) for r in ids]
    return _pad(ids, labels, completion, [0] * len(ids), [len(r) for r in ids], pad_token_id, padding_side, meta)


def collate_completions(encoded: Sequence[EncodedPair], side: Side, *, pad_token_id: int,
                        padding_side: PaddingSide = "right") -> TokenBatch:
    """Completion-only batch, to run after a prompt batch's KV cache.

    Positions continue after each row's prompt. `labels` are the completion ids themselves: with the prompt
    in the cache, the logit predicting completion token j sits at position j-1 of this batch (for j = 0, at
    the prompt batch's last position). The attention mask of the call is the prompt batch's mask followed
    by this one's.
    """
    _check_side(side)
    rows = [list(ep.completion_ids(side)) for ep in encoded]
    completion = [[True] * len(r) for r in rows]
    prompt_lengths = [len(ep.prompt_ids) for ep in encoded]
    return _pad(rows, [list(r) for r in rows], completion, prompt_lengths, prompt_lengths, pad_token_id,
                padding_side, [ep.meta for ep in encoded])


def _pad_flags(flags: list[list[bool]], width: int, padding_side: PaddingSide) -> torch.Tensor:
    out = torch.zeros((len(flags), width), dtype=torch.bool)
    for b, row in enumerate(flags):
        cols = slice(0, len(row)) if padding_side == "right" else slice(width - len(row), width)
        out[b, cols] = torch.tensor(row, dtype=torch.bool)
    return out


def _pad(rows: list[list[int]], labels: list[list[int]], completion: list[list[bool]], offsets: list[int],
         prompt_lengths: list[int], pad_token_id: int, padding_side: PaddingSide,
         meta: list[dict[str, Any]]) -> TokenBatch:
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not rows:
        raise ValueError("cannot collate an empty batch")
    width = max(len(r) for r in rows)
    batch = len(rows)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((batch, width), dtype=torch.long)
    positions = torch.zeros((batch, width), dtype=torch.long)
    label_ids = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    completion_mask = torch.zeros((batch, width), dtype=torch.bool)
    for b, row in enumerate(rows):
        n = len(row)
        cols = slice(0, n) if padding_side == "right" else slice(width - n, width)
        input_ids[b, cols] = torch.tensor(row, dtype=torch.long)
        attention[b, cols] = 1
        positions[b, cols] = torch.arange(offsets[b], offsets[b] + n)
        label_ids[b, cols] = torch.tensor(labels[b], dtype=torch.long)
        completion_mask[b, cols] = torch.tensor(completion[b], dtype=torch.bool)
    return TokenBatch(input_ids, attention, positions, label_ids, completion_mask,
                      torch.tensor(prompt_lengths, dtype=torch.long),
                      torch.tensor([len(r) for r in rows], dtype=torch.long), padding_side, list(meta))


# Built-in datasets live in `datasets_builtin` (which imports this module); re-exported lazily to avoid a cycle.
_BUILTIN_EXPORTS = frozenset({
    "AXBENCH_SETTINGS", "BIPO_SETS", "CAA_BEHAVIOURS", "AxBenchConcept", "BuiltinData", "EvalPrompt",
    "axbench_pairs", "find_data_dir", "list_builtins", "load_axbench_concept", "load_builtin",
})


def __getattr__(name: str) -> Any:
    if name in _BUILTIN_EXPORTS:
        from . import datasets_builtin

        return getattr(datasets_builtin, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FIELD_PRESETS", "IGNORE_INDEX", "READ_FORMATS", "RENDERINGS", "DataWarning", "DatasetSplits", "EncodedPair",
    "FieldMap", "PairDataset", "PairEncoder", "PolarityPair", "Rendering", "SourceRecord", "SplitSpec", "TokenBatch",
    "answer_meta",
    "collate_completions",
    "common_prefix_length", "collate_pairs", "collate_prompts", "read_pairs", "read_source_records",
    "resolve_fields",
]
