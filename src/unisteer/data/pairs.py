"""Polarity pairs (SPEC §2), validated datasets, and the one seeded split every command uses.

An example is `(q, A_p, A_n)` — a prompt, a concept-positive and a concept-negative completion — held in a
`PolarityPair`. A `PairDataset` is a validated list of pairs with the warnings raised while reading it and a
content `hash()`; `PairDataset.split` makes deterministic, seeded train/dev/test parts whose seed and sizes
are recorded (`DatasetSplits.record()`), and `provenance()` is what an update keeps of its training pairs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..config import from_dict
from ..errors import ConfigError, DataError

Side = Literal["positive", "negative"]


log = logging.getLogger(__name__)


SIDES: tuple[Side, Side] = ("positive", "negative")


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
        check_side(side)
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
        return f"{source_place(self.file, self.line, self.unit)}: {self.message}"


@dataclass(frozen=True)
class SourceRecord:
    """A pair together with the place it was read from, before dataset-level validation."""

    pair: PolarityPair
    file: str
    line: int | None
    unit: str = "line"


def source_place(file: str, line: int | None, unit: str = "line") -> str:
    if line is None:
        return file
    return f"{file}:{line}" if unit == "line" else f"{file} {unit} {line}"


def check_side(side: str) -> None:
    if side not in SIDES:
        raise ValueError(f"side must be 'positive' or 'negative', got {side!r}")


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
                                         f"{source_place(first.file, first.line, first.unit)}; removed", rec.unit))
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
            places = ", ".join(source_place(w.file, w.line, w.unit) for w in items[:5])
            more = f" and {len(items) - 5} more" if len(items) > 5 else ""
            log.warning("%s: %d %s warning(s) at %s%s", self.name, len(items), kind, places, more)

    def select(self, indices: Sequence[int], *, name: str) -> PairDataset:
        """A subset in the given order. Warnings stay with the source dataset (see `DatasetSplits.warnings`)."""
        return PairDataset([self.pairs[i] for i in indices], name=name, sources=self.sources)

    def split(self, spec: SplitConfig | None = None, **overrides: Any) -> DatasetSplits:
        """Deterministic train/dev/test parts; see `SplitConfig`. `overrides` replace fields of `spec`."""
        spec = _spec_with(spec, overrides)
        order = _split_order(self.pairs, spec.seed)
        n = len(self.pairs)
        n_test = part_size(spec.test, n)
        n_dev = part_size(spec.dev, n)
        n_train = max(0, n - n_test - n_dev) if spec.train is None else part_size(spec.train, n)
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
class SplitConfig:
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
            # `not 0 <= value <= 1`: NaN fails every comparison, so it is refused too
            if value < 0 or (isinstance(value, float) and not 0 <= value <= 1):
                raise ConfigError(f"split {name}={value!r}: counts must be >= 0, fractions in [0, 1]")

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "split") -> SplitConfig:
        return from_dict(cls, data, where=where)


@dataclass
class DatasetSplits:
    """Train/dev/test parts with the spec that made them; `record()` is stored with every result."""

    train: PairDataset
    dev: PairDataset
    test: PairDataset
    spec: SplitConfig
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


def _spec_with(spec: SplitConfig | None, overrides: Mapping[str, Any]) -> SplitConfig:
    base = {} if spec is None else {k: getattr(spec, k) for k in ("seed", "train", "dev", "test", "stratify")}
    return SplitConfig.from_dict({**base, **overrides})


def _split_order(pairs: Sequence[PolarityPair], seed: int) -> list[int]:
    def rank(i: int) -> bytes:
        text = "\x00".join((str(seed), *pairs[i].key()))
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()

    return sorted(range(len(pairs)), key=lambda i: (rank(i), i))


def part_size(value: int | float, n: int) -> int:
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
