"""Reading pairs from JSONL, JSON, CSV and Parquet files, with field presets.

Bad input policy (every case names the file and line; nothing is dropped silently):

| case | outcome |
|---|---|
| missing file, unknown format, malformed JSON line / CSV row, non-object record | `DataError` |
| missing field, non-text value, empty positive or negative completion | `DataError` |
| empty prompt | warning `empty_prompt`, pair kept (an unconditional completion is still a valid pair) |
| exact duplicate (prompt, positive, negative) | warning `duplicate_pair`, later copies removed |
| positive and negative identical (ignoring surrounding whitespace) | warning `identical_completions`, dropped |

The row readers (`jsonl_rows`, `csv_rows`, ...) and `text_field` are public: the built-in datasets use them.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import from_dict
from ..errors import ConfigError, DataError
from .pairs import DataWarning, PairDataset, PolarityPair, SourceRecord, source_place


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
    readers = {"jsonl": jsonl_rows, "json": json_rows, "csv": csv_rows, "parquet": parquet_rows}
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


def jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for line_no, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue  # blank lines separate nothing in JSONL; they are not records
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{line_no}: malformed JSON line ({exc.msg} at column {exc.colno})") from exc
        yield line_no, _require_object(obj, path, line_no)


def json_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
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


def csv_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
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


def parquet_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
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


def text_field(row: Mapping[str, Any], name: str, path: Path, line: int, unit: str) -> str:
    value = row.get(name)
    if isinstance(value, str):
        return value
    where = source_place(str(path), line, unit)
    if value is None:
        raise DataError(f"{where}: missing field {name!r} (fields present: {sorted(row)})")
    raise DataError(f"{where}: field {name!r} must be text, got {type(value).__name__} {value!r:.60}")


def _record_from_row(row: Mapping[str, Any], fields: FieldMap, path: Path, line: int, unit: str,
                     warnings: list[DataWarning]) -> SourceRecord:
    where = source_place(str(path), line, unit)
    prompt = text_field(row, fields.prompt, path, line, unit)
    if fields.is_ab:
        texts = [text_field(row, c, path, line, unit) for c in fields.choices]
        answer = text_field(row, fields.answer or "", path, line, unit)
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
        positive = text_field(row, fields.positive or "", path, line, unit)
        negative = text_field(row, fields.negative or "", path, line, unit)
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
