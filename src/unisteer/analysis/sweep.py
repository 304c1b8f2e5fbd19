"""Preference–utility sweeps over the multiplier m (SPEC §3–4): scoring, incremental files, fits.

For every update, split and multiplier m the sweep scores each pair's positive and negative completion
(`L_p`, `L_n`: teacher-forced completion NLL with the update active at m, sums and token counts), and can
measure how far the steered hidden states at later layers fall from the unsteered ones (`unisteer.analysis.manifold`).
`fit_sweep` turns the stored numbers into log-odds curves per m (mean, standard error, bootstrap CI, clamped
counts), validity-decay fits (fitted on one split, scored on every split) and manifold correlations;
`unisteer.analysis.report.write_report` draws and writes the report.

    config = SweepConfig(grid=None)          # default grid per form (`default_grid`)
    run_sweep(model, tokenizer, {"diffmean": u1, "split-lora": u2}, {"train": tr, "test": te}, config, "out/")
    fit_sweep("out/")
    write_report("out/")

Files (resumable: rows already on disk are skipped; a changed model, dataset, update or manifold setting is
refused rather than mixed in):

    out_dir/sweep.json                      settings, updates (with fingerprints), grids, split records
    out_dir/scores/<update>/<split>.jsonl   one row per (example, m): L_p, L_n, T_p, T_n, manifold metrics
    out_dir/manifold_reference.json         per split and layer: rank, explained variance, scales
    out_dir/.sweep.lock                     held while sweep.json is read and rewritten

Sweeps of *different* updates may write one folder at the same time (`unisteer run` with `executor: ray`):
each update has its own scores files, and every change to sweep.json is a read-merge-write under an exclusive
lock (`fcntl.lockf`; on storage shared between machines this needs the filesystem's lock support, e.g. NFSv4).

The scoring itself is `analysis.paired`; the aggregation and fits of a finished sweep, `analysis.fits`.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import from_dict, to_dict
from ..data.pairs import PairDataset
from ..data.rendering import EncodedPair, PairEncoder
from ..engine.architecture import model_structure
from ..engine.fingerprint import update_fingerprint
from ..engine.steering import Steering
from ..engine.updates import Positions, Update, check_multipliers, default_grid, eval_mode
from ..errors import ConfigError, DataError
from ..files import JsonlLog, read_json, write_json
from .logodds import VARIANTS
from .manifold import METRICS, ManifoldReference, build_reference
from .paired import (
    Chunk,
    PairScore,
    PassResult,
    base_rows,
    length_sorted_chunks,
    make_chunk,
    paired_pass,
    sliding_window,
    steered_pass,
    zero_steering,
)

log = logging.getLogger(__name__)


FORMAT_VERSION = 1


SWEEP_FILE = "sweep.json"


SCORES_DIR = "scores"


REFERENCE_FILE = "manifold_reference.json"


LOCK_FILE = ".sweep.lock"


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


@dataclass
class SweepConfig:
    """How to sweep, aggregate and fit (build from a dict with `SweepConfig.from_dict`, unknown keys rejected).

    grid: multipliers for every update (None: `default_grid` of each update's form); grids: per-update-name
    overrides. batch_rows: prompt rows (example × multiplier) per forward (the completion pass has twice as
    many). chunk_examples: examples per incremental write. variant: the log-odds variant the report shows
    ("sum" is SPEC §3's exact definition, "mean" the per-token variant; both are always computed). fit_split:
    the split the curves are fitted on (the others are scored with that fit). positions: override of every
    update's positions ("all", "prompt", "generated", "from:K"; None: each update's own). manifold_layers:
    decoder layers whose outputs are measured (None: L+1, the midpoint to the last layer, and the last).
    """

    grid: list[float] | None = None
    grids: dict[str, list[float]] = field(default_factory=dict)
    batch_rows: int = 64
    chunk_examples: int = 32
    variant: str = "sum"
    eps: float = 1e-6
    n_boot: int = 1000
    ci_level: float = 0.95
    seed: int = 0
    fit_split: str = "train"
    positions: str | None = None
    max_length: int = 512
    manifold: bool = True
    manifold_layers: list[int] | None = None
    manifold_variance: float = 0.9
    manifold_max_examples: int = 500
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("batch_rows", "chunk_examples", "n_boot", "max_length", "manifold_max_examples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"sweep.{name}: expected a positive integer, got {value!r}")
        if self.manifold_max_examples < 2:
            raise ConfigError("sweep.manifold_max_examples: the reference needs at least 2 examples")
        if self.variant not in VARIANTS:
            raise ConfigError(f"sweep.variant: {self.variant!r} is not one of {VARIANTS}")
        if not 0.0 < self.eps < 1.0:
            raise ConfigError(f"sweep.eps: expected a value in (0, 1), got {self.eps!r}")
        if not 0.0 < self.ci_level < 1.0:
            raise ConfigError(f"sweep.ci_level: expected a value in (0, 1), got {self.ci_level!r}")
        if not 0.0 < self.manifold_variance < 1.0:
            raise ConfigError(f"sweep.manifold_variance: expected a value in (0, 1), got {self.manifold_variance!r}")
        if self.positions is not None:
            Positions.parse(self.positions)
        if self.grid is not None:
            self.grid = check_multipliers(self.grid, "sweep.grid", sort=True)
        self.grids = {name: check_multipliers(values, f"sweep.grids.{name}", sort=True) for name, values in self.grids.items()}
        if self.manifold_layers is not None:
            if not self.manifold_layers or any(isinstance(v, bool) or not isinstance(v, int) or v < 0
                                               for v in self.manifold_layers):
                raise ConfigError(f"sweep.manifold_layers: expected non-negative layer indices, got "
                                  f"{self.manifold_layers!r}")
            self.manifold_layers = sorted(set(self.manifold_layers))

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "sweep") -> SweepConfig:
        return from_dict(cls, data, where=where)


def grid_for(name: str, update: Update, config: SweepConfig) -> list[float]:
    """The multipliers swept for update `name`: its override, else the common grid, else the form's default."""
    if name in config.grids:
        return list(config.grids[name])
    if config.grid is not None:
        return list(config.grid)
    return default_grid(update.spec.form)


def manifold_layers_for(num_layers: int, update_layers: Sequence[int], config: SweepConfig) -> list[int]:
    """Decoder layers whose outputs are measured (empty when the manifold measurement is off)."""
    if not config.manifold:
        return []
    if config.manifold_layers is not None:
        bad = [v for v in config.manifold_layers if v >= num_layers]
        if bad:
            raise ConfigError(f"sweep.manifold_layers: {bad} out of range; the model has layers 0..{num_layers - 1}")
        return list(config.manifold_layers)
    top = max(update_layers)
    first = min(top + 1, num_layers - 1)
    return sorted({first, (first + num_layers - 1) // 2, num_layers - 1})


@dataclass
class SweepResult:
    """What `run_sweep` did: rows computed now, rows found on disk, and where everything is."""

    out_dir: Path
    updates: list[str]
    splits: list[str]
    rows_computed: int
    rows_reused: int
    seconds: float
    base_seconds: float
    steered_seconds: float

    @property
    def rows_per_second(self) -> float:
        return self.rows_computed / self.seconds if self.seconds > 0 else float("nan")


def run_sweep(model: nn.Module, tokenizer: Any, updates: Mapping[str, Update], splits: Mapping[str, PairDataset],
              config: SweepConfig | None = None, out_dir: str | Path = "sweep", *,
              encoder: PairEncoder | None = None, settings: Mapping[str, Any] | None = None) -> SweepResult:
    """Score every update on every split at every multiplier of its grid; write and resume `out_dir`.

    `updates`: name → update (names become folder names: letters, digits, '.', '_', '+', '-'). `splits`:
    name → pairs (e.g. {"train": ..., "test": ...}; the fit uses `config.fit_split`). `settings`: anything
    JSON-like to record and show in the report (e.g. {"model": alias, "dtype": "bfloat16",
    "dataset": BuiltinData.record()}). `encoder` defaults to `PairEncoder(tokenizer, max_length=...)`.
    """
    config = config or SweepConfig()
    started = time.perf_counter()
    if not updates:
        raise ConfigError("run_sweep: no updates given")
    if not splits:
        raise ConfigError("run_sweep: no splits given")
    for kind, names in (("update", updates), ("split", splits)):
        for name in names:
            if not isinstance(name, str) or not _NAME.match(name):
                raise ConfigError(f"{kind} name {name!r}: use letters, digits, '.', '_', '+' or '-' (it names files)")
    unknown = sorted(set(config.grids) - set(updates))
    if unknown:
        raise ConfigError(f"sweep.grids: no update named {unknown}; updates are {sorted(updates)}")
    for name, dataset in splits.items():
        if len(dataset) == 0:
            raise DataError(f"split {name!r} ({dataset.name}) has no pairs")
    encoder = encoder or PairEncoder(tokenizer, max_length=config.max_length)
    structure = model_structure(model)
    steerings = {name: zero_steering(model, update, config.positions) for name, update in updates.items()}
    layers = manifold_layers_for(structure.num_layers, [u.layer for u in updates.values()], config)
    out = Path(out_dir)
    grids = {name: grid_for(name, update, config) for name, update in updates.items()}
    info = _merge_sweep_file(out, _sweep_record(model, encoder, updates, splits, grids, config, layers, settings))

    encoded = {name: encoder.encode_all(dataset.pairs) for name, dataset in splits.items()}
    done = {(u, s): _load_done(scores_path(out, u, s)) for u in updates for s in splits}
    todo = {(u, s): [(i, m) for m in grids[u] for i in range(len(encoded[s])) if (i, m) not in done[(u, s)]]
            for u in updates for s in splits}
    total = sum(len(rows) for rows in todo.values())
    reused = sum(len(grids[u]) * len(encoded[s]) for u in updates for s in splits) - total
    base_seconds = steered_seconds = 0.0
    references: dict[str, dict[int, dict[str, Any]]] = info.get("manifold_reference", {})
    progress = tqdm(total=total, unit="row", desc="sweep", disable=not config.progress)
    with eval_mode(model, *updates.values()), progress:
        for split, pairs in encoded.items():
            if not any(todo[(u, split)] for u in updates):
                continue
            tick = time.perf_counter()
            chunks, reference = _base_passes(model, encoder.pad_token_id, pairs, updates, layers, config)
            if reference:
                # Kept at once: a split finished before an interruption is skipped on resume, so its reference
                # must already be on disk.
                references[split] = {layer: ref.describe() for layer, ref in reference.items()}
                _store_references(out, references)
            base_seconds += time.perf_counter() - tick
            for name, update in updates.items():
                measured = [layer for layer in layers if layer >= update.layer]
                path = scores_path(out, name, split)
                pending = {(i, m) for i, m in todo[(name, split)]}
                for chunk, base in chunks:
                    rows = []
                    if any((i, 0.0) in pending for i in chunk.examples):
                        rows += [s for s in _with_manifold(base.scores(chunk.examples, [0.0] * len(chunk.examples)),
                                                           chunk.examples, base, measured, reference)
                                 if (s.example, 0.0) in pending]
                    tick = time.perf_counter()
                    rows += _steered_rows(model, chunk, update, steerings[name], pending, grids[name], measured,
                                          reference, config.batch_rows)
                    steered_seconds += time.perf_counter() - tick
                    _append_rows(path, rows)
                    progress.update(len(rows))
    if references:
        _store_references(out, references)
    return SweepResult(out, list(updates), list(splits), total, reused, time.perf_counter() - started,
                       base_seconds, steered_seconds)


def _base_passes(model: nn.Module, pad_token_id: int, encoded: Sequence[EncodedPair],
                 updates: Mapping[str, Update], layers: Sequence[int], config: SweepConfig
                 ) -> tuple[list[tuple[Chunk, PassResult]], dict[int, ManifoldReference]]:
    """Unsteered passes over a split: layer inputs, m = 0 scores, and the manifold reference per layer."""
    input_layers = sorted({u.layer for u in updates.values()})
    chunks = []
    for examples in length_sorted_chunks(encoded, config.chunk_examples):
        chunk = make_chunk(encoded, examples, pad_token_id, sliding_window(model))
        base = paired_pass(model, base_rows(chunk), input_layers=input_layers, output_layers=layers)
        chunk.inputs = base.inputs
        chunks.append((chunk, base))
    reference: dict[int, ManifoldReference] = {}
    if layers:
        chosen = _reference_examples(len(encoded), config.manifold_max_examples, config.seed)
        for layer in layers:
            points, owners = [], []
            for chunk, base in chunks:
                layer_points, rows = base.points[layer]
                example_ids = torch.as_tensor(chunk.examples)[rows]
                keep = torch.as_tensor([int(e) in chosen for e in example_ids.tolist()], dtype=torch.bool)
                points.append(layer_points[keep])
                owners.append(example_ids[keep])
            reference[layer] = build_reference(layer, torch.cat(points), torch.cat(owners),
                                               variance=config.manifold_variance)
    return chunks, reference


def _reference_examples(n: int, limit: int, seed: int) -> set[int]:
    if n <= limit:
        return set(range(n))
    generator = torch.Generator().manual_seed(seed)
    return set(torch.randperm(n, generator=generator)[:limit].tolist())


def _steered_rows(model: nn.Module, chunk: Chunk, update: Update, steering: Steering,
                  pending: set[tuple[int, float]], grid: Sequence[float], layers: Sequence[int],
                  reference: Mapping[int, ManifoldReference], batch_rows: int) -> list[PairScore]:
    """Scores of the chunk's pending (example, m) rows.

    Batches are cut from the chunk's *full* row list in a fixed order and a batch runs whole whenever any of
    its rows is pending: each row is always computed alongside the same rows, so a resumed sweep gives the
    same numbers as an uninterrupted one even in bf16, where a row's result depends on its batch's shape.
    """
    rows = [(pos, m) for m in grid if m != 0.0 for pos in range(len(chunk.examples))]
    out = []
    for start in range(0, len(rows), batch_rows):
        part = rows[start:start + batch_rows]
        if not any((chunk.examples[pos], m) in pending for pos, m in part):
            continue
        result = steered_pass(model, chunk, part, update, steering, layers)
        examples = [chunk.examples[p] for p, _ in part]
        scores = _with_manifold(result.scores(examples, [m for _, m in part]), examples, result, layers, reference)
        out += [score for score in scores if (score.example, score.m) in pending]
    return out


def _with_manifold(scores: list[PairScore], examples: Sequence[int], result: PassResult, layers: Sequence[int],
                   reference: Mapping[int, ManifoldReference]) -> list[PairScore]:
    """Attach per-row manifold metrics (mean over the row's points) to each score."""
    if not layers:
        return scores
    per_row: list[dict[str, dict[str, float]]] = [{} for _ in scores]
    for layer in layers:
        points, rows = result.points[layer]
        owners = torch.as_tensor(examples, dtype=torch.long)[rows]
        distances = reference[layer].relative_distances(points, owners)
        counts = torch.zeros(len(scores), dtype=torch.float64).index_add(0, rows, torch.ones(rows.numel(),
                                                                                              dtype=torch.float64))
        for metric, values in distances.items():
            means = torch.zeros(len(scores), dtype=torch.float64).index_add(0, rows, values) / counts
            for r, value in enumerate(means.tolist()):
                per_row[r].setdefault(str(layer), {})[metric] = value
    return [dataclasses.replace(s, manifold=m) for s, m in zip(scores, per_row, strict=True)]


def scores_path(out: Path, update: str, split: str) -> Path:
    return out / SCORES_DIR / update / f"{split}.jsonl"


def _sweep_record(model: nn.Module, encoder: PairEncoder, updates: Mapping[str, Update],
                  splits: Mapping[str, PairDataset], grids: Mapping[str, list[float]], config: SweepConfig,
                  layers: Sequence[int], settings: Mapping[str, Any] | None) -> dict[str, Any]:
    from ..engine.models import config_hash, model_id

    structure = model_structure(model)
    return {
        "format": FORMAT_VERSION,
        "model": {"id": model_id(model), "config_hash": config_hash(model),
                  "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                  "num_layers": structure.num_layers, "hidden_size": structure.hidden_size},
        "encoder": encoder.describe(),
        "splits": {name: dataset.record() for name, dataset in splits.items()},
        "updates": {name: {"form": u.spec.form, "layer": u.layer, "insertion": u.insertion,
                           "positions": config.positions or u.spec.positions, "rank": u.spec.rank,
                           "fingerprint": update_fingerprint(u), "spec": dataclasses.asdict(u.spec)}
                    for name, u in updates.items()},
        "grids": {name: list(grid) for name, grid in grids.items()},
        "manifold": {"layers": list(layers), "variance": config.manifold_variance,
                     "max_examples": config.manifold_max_examples, "seed": config.seed,
                     "metrics": list(METRICS) if layers else []},
        "config": to_dict(config),
        "settings": dict(settings or {}),
    }


@contextmanager
def _sweep_file_lock(out: Path) -> Iterator[None]:
    """Exclusive lock over sweep.json's read-modify-write (other sweeps of other updates may share `out`)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_FILE, "w", encoding="utf-8") as fh:  # empty: only the lock on it matters
        fcntl.lockf(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(fh, fcntl.LOCK_UN)


def _change_sweep_file(out: Path, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Apply `change` to the sweep.json on disk now (not to a copy read earlier) and write it back, locked."""
    with _sweep_file_lock(out):
        info = read_sweep_info(out)
        change(info)
        write_json(out / SWEEP_FILE, info)
        return info


def _store_references(out: Path, references: Mapping[str, Any]) -> None:
    """Record the manifold references of the splits done so far (merged with those other sweeps stored)."""
    def change(info: dict[str, Any]) -> None:
        info["manifold_reference"] = {**info.get("manifold_reference", {}), **references}

    info = _change_sweep_file(out, change)
    write_json(out / REFERENCE_FILE, info["manifold_reference"])


def order_updates(out_dir: str | Path, names: Sequence[str]) -> None:
    """Put `names` first, in this order, in sweep.json's updates and grids (fits and reports follow that order;
    sweeps of one update each, finishing in any order, then list them as a joint sweep would)."""
    out = Path(out_dir)

    def change(info: dict[str, Any]) -> None:
        for key in ("updates", "grids"):
            stored = info[key]
            info[key] = {**{n: stored[n] for n in names if n in stored}, **stored}

    if list(read_sweep_info(out)["updates"])[:len(names)] != list(names):
        _change_sweep_file(out, change)


def _merge_sweep_file(out: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Create `sweep.json`, or check that a resumed sweep is comparable and merge the new parts in."""
    with _sweep_file_lock(out):
        return _merge_sweep_file_locked(out, record)


def _merge_sweep_file_locked(out: Path, record: dict[str, Any]) -> dict[str, Any]:
    path = out / SWEEP_FILE
    if not path.exists():
        if any(p.name != LOCK_FILE for p in out.iterdir()):
            raise ConfigError(f"{out}: the folder is not empty and holds no {SWEEP_FILE}; choose a new or empty "
                              "folder for the sweep")
        out.mkdir(parents=True, exist_ok=True)
        write_json(path, record)
        return record
    old = read_sweep_info(out)
    problems = []
    for key in ("id", "config_hash", "dtype"):
        if old["model"].get(key) != record["model"][key]:
            problems.append(f"model {key}: stored {old['model'].get(key)!r}, now {record['model'][key]!r}")
    if old["encoder"] != record["encoder"]:
        problems.append(f"prompt rendering: stored {old['encoder']}, now {record['encoder']}")
    for name, split in record["splits"].items():
        if name in old["splits"] and old["splits"][name]["hash"] != split["hash"]:
            problems.append(f"split {name!r}: the pairs differ (content hash)")
    for name, update in record["updates"].items():
        stored = old["updates"].get(name)
        if stored is not None and (stored["fingerprint"], stored["positions"]) != (update["fingerprint"],
                                                                                   update["positions"]):
            problems.append(f"update {name!r}: a different update (or positions) under the same name")
    for key in ("layers", "variance", "max_examples", "seed"):
        if old["manifold"].get(key) != record["manifold"][key]:
            problems.append(f"manifold {key}: stored {old['manifold'].get(key)!r}, now {record['manifold'][key]!r}")
    if problems:
        raise ConfigError(f"{path}: cannot resume this sweep with different inputs — " + "; ".join(problems)
                          + ". Use a new output folder (or delete this one) to start over.")
    merged = dict(old)
    merged["splits"] = {**old["splits"], **record["splits"]}
    merged["updates"] = {**old["updates"], **record["updates"]}
    merged["grids"] = {name: sorted(set(old["grids"].get(name, [])) | set(grid))
                       for name, grid in {**old["grids"], **record["grids"]}.items()}
    merged["config"] = record["config"]
    merged["settings"] = {**old.get("settings", {}), **record["settings"]}
    write_json(path, merged)
    return merged


def read_sweep_info(out_dir: str | Path) -> dict[str, Any]:
    path = Path(out_dir) / SWEEP_FILE
    if not path.is_file():
        raise DataError(f"{path}: no sweep here (run a sweep into this folder first)")
    info = read_json(path, what="sweep file")
    if not isinstance(info, dict) or info.get("format") != FORMAT_VERSION:
        raise DataError(f"{path}: not a sweep file of format {FORMAT_VERSION}")
    return info


def _append_rows(path: Path, rows: Sequence[PairScore]) -> None:
    JsonlLog(path).append([row.to_json() for row in rows])


def _load_done(path: Path) -> set[tuple[int, float]]:
    return {(row.example, row.m) for row in read_scores(path, repair=True)}


def read_scores(path: str | Path, *, repair: bool = False) -> list[PairScore]:
    """Rows of one scores file. A final line cut short by an interrupted write is dropped (and, with
    `repair`, removed from the file so that appending continues cleanly); any other bad line is an error."""
    scores = JsonlLog(path)
    if repair and scores.repair():
        log.warning("%s: dropped an incomplete last line (interrupted write); its rows are scored again", path)
    rows, seen = [], set()
    for number, line in scores.lines():
        try:
            data = json.loads(line)
            row = PairScore(int(data["example"]), float(data["m"]), float(data["L_p"]), float(data["L_n"]),
                            int(data["T_p"]), int(data["T_n"]), data.get("manifold", {}))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{path}:{number}: malformed score row ({exc})") from exc
        key = (row.example, row.m)
        if key in seen:
            raise DataError(f"{path}:{number}: duplicate row for example {row.example} at m={row.m} "
                            "(two sweeps writing the same folder?)")
        seen.add(key)
        rows.append(row)
    return rows
