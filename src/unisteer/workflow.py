"""The steps every entry point shares (the CLI subcommands and `unisteer run` call these, never their own copy).

- `load_data`: a built-in or a file of pairs, with the one seeded split every command uses.
- `resolve_layer`, `resolve_rendering`: the measured defaults (layer per model, rendering per dataset);
  `resolve_recipe`: a `Recipe` fixed against the loaded model and data with them.
- `train_cell`: train or compute one update, recording its training pairs, split, rendering and recipe.
- `check_held_out`: refuse to evaluate an update on pairs it was trained on.
- `choose_rendering`: measure which rendering lets the plain model's own fluency show on a dataset.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .data.batches import collate_pairs
from .data.builtin import (
    BuiltinData,
    axbench_concept_id,
    axbench_pairs,
    load_axbench_concept,
    load_builtin,
    preset_family,
    split_spec,
)
from .data.pairs import PairDataset, PolarityPair, SplitConfig
from .data.readers import answer_meta, read_pairs
from .data.rendering import PairEncoder, Rendering, answer_format_instruction
from .engine.devices import input_device
from .engine.scoring import final_hidden, token_nll_from_hidden
from .engine.updates import Update
from .errors import ConfigError, DataError
from .evaluation.choices import AccuracyByM, calibrated_accuracy, change_from_zero, choice_accuracy
from .evaluation.selection import SteeringSelection, select_steering
from .files import read_json, write_json
from .recipe import DEFAULT_MAX_LENGTH, DEFAULT_SEED, Recipe, agreed

log = logging.getLogger(__name__)

# The end-of-turn suffix is part of the completion when the plain model more likely than not ends its turn
# right after the answer (its NLL below ln 2).
END_OF_TURN_MAX_NLL = math.log(2.0)
RENDERING_SAMPLE = 32


# ---------------------------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class RenderingCandidate:
    """One rendering `choose_rendering` measured, with what the plain model made of it."""

    instruction: str
    completion_space: str
    answer_nll: float  # mean summed NLL of an answer (nats per completion, both polarities)
    end_of_turn_nll: float  # mean NLL of the end-of-turn suffix right after the answer
    in_format: float  # mean P(positive) + P(negative): how much mass the plain model puts on either answer
    util_odds: float  # mean UtilOdds at m = 0, log S − log(1 − S) per pair

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RenderingChoice:
    """The measured rendering and the numbers that chose it (recorded with results)."""

    rendering: Rendering
    answer_nll: dict[str, float]  # completion_space -> mean answer NLL under the chosen instruction
    end_of_turn_nll: float  # mean NLL of the end-of-turn suffix after the chosen answers
    pairs: int
    notes: list[str] = field(default_factory=list)
    candidates: list[RenderingCandidate] = field(default_factory=list)

    @property
    def chosen(self) -> RenderingCandidate | None:
        return next((c for c in self.candidates if c.instruction == self.rendering.instruction and
                     c.completion_space == self.rendering.completion_space), None)

    def to_dict(self) -> dict[str, Any]:
        chosen = self.chosen
        return {"rendering": self.rendering.to_dict(), "answer_nll": self.answer_nll,
                "end_of_turn_nll": self.end_of_turn_nll, "end_of_turn_max_nll": END_OF_TURN_MAX_NLL,
                "pairs": self.pairs, "rule": RENDERING_RULE, "notes": self.notes,
                "candidates": [c.to_dict() for c in self.candidates],
                "in_format": None if chosen is None else chosen.in_format,
                "util_odds_at_zero": None if chosen is None else chosen.util_odds}


RENDERING_RULE = ("the completion_space with the lower mean answer NLL under the plain model, without an "
                  "instruction; an answer-format instruction the pairs share is measured beside it (P(positive) + "
                  "P(negative) with and without) but appended only when `prefer_instruction` is set: on two persona "
                  "traits it raised that mass from 0.08 to 0.6 yet cost steering (docs/FIDELITY.md); end-of-turn "
                  "appended when its mean NLL after the answer is below ln 2")


@torch.no_grad()
def choose_rendering(model: nn.Module, tokenizer: Any, pairs: PairDataset | Sequence[PolarityPair], *,
                     sample: int = RENDERING_SAMPLE, max_length: int = 512, batch_size: int = 16,
                     plain_format: str = "{prompt}", prefer_instruction: bool = False) -> RenderingChoice:
    """Pick the rendering under which the plain model finds the answers most natural.

    On the first `sample` pairs (train pairs: never the held-out ones), the plain model scores both
    completions under each candidate: without an instruction and, where every completion is one of a few
    short answers, with `answer_format_instruction` appended to the user turn; each with the completions'
    leading whitespace kept as written and joined to the prompt (see `Rendering`), followed by the
    end-of-turn suffix. Per instruction the spelling with the lower answer NLL wins. The instruction is
    measured and recorded but used only with `prefer_instruction` (then the candidate with more mass on the
    two answers wins): on SmolLM2 it lifts P(Yes) + P(No) on persona questions from 0.07 to about 0.6, and
    the vectors trained with it steered less on both traits measured (psychopathy 0.89 / 0.13 → 0.74 / 0.31,
    narcissism 0.69 / 0.22 → 0.46 / 0.33; their steered answers collapse onto the instruction's "Yes").
    " No" after "assistant\n" costs ~12.6 nats, "No" ~2.6.
    """
    chosen_pairs = list(pairs)[:sample]
    if not chosen_pairs:
        raise DataError("choose_rendering: no pairs to measure on")
    instructions = [""]
    derived = answer_format_instruction(pairs)
    if derived:
        instructions.append(derived)
    candidates: list[RenderingCandidate] = []
    best: dict[str, RenderingCandidate] = {}
    for instruction in instructions:
        measured = []
        for space in ("join", "keep"):
            encoder = PairEncoder(tokenizer, Rendering(completion_space=space, end_of_turn=True,
                                                       plain_format=plain_format, instruction=instruction),
                                  max_length=max_length)
            measured.append(_measure_candidate(model, encoder, chosen_pairs, batch_size))
        candidates.extend(measured)
        best[instruction] = min(measured, key=lambda c: (c.answer_nll, c.completion_space != "join"))
    winner = max(best.values(), key=lambda c: (c.in_format, c.instruction == "")) if prefer_instruction else best[""]
    end_of_turn = winner.end_of_turn_nll < END_OF_TURN_MAX_NLL
    rendering = Rendering(completion_space=winner.completion_space, end_of_turn=end_of_turn,
                          plain_format=plain_format, name="measured", instruction=winner.instruction)
    notes = []
    same_instruction = [c for c in candidates if c.instruction == winner.instruction]
    if len({c.answer_nll for c in same_instruction}) == 1:
        notes.append("the completions have no leading whitespace to join or keep")
    if derived and winner.instruction:
        plain = best[""]
        notes.append(f"{derived!r} appended: the plain model's mass on the two answers rises from "
                     f"{plain.in_format:.2f} to {winner.in_format:.2f} (UtilOdds at m = 0 {plain.util_odds:+.2f} → "
                     f"{winner.util_odds:+.2f})")
    elif derived and prefer_instruction:
        notes.append(f"{derived!r} measured and not used: it does not raise the mass on the two answers "
                     f"({best[derived].in_format:.2f} vs {winner.in_format:.2f} without)")
    elif derived:
        notes.append(f"{derived!r} measured and not appended: it would raise the plain model's mass on the two "
                     f"answers from {winner.in_format:.2f} to {best[derived].in_format:.2f}, but steering trained "
                     "with it was weaker on both persona traits measured (docs/FIDELITY.md); set rendering.instruction "
                     "to use it")
    else:
        notes.append("no answer-format instruction: the completions are not a few short fixed answers")
    answer_nll = {c.completion_space: c.answer_nll for c in same_instruction}
    return RenderingChoice(rendering, answer_nll, winner.end_of_turn_nll, len(chosen_pairs), notes, candidates)


def _measure_candidate(model: nn.Module, encoder: PairEncoder, pairs: Sequence[PolarityPair],
                       batch_size: int) -> RenderingCandidate:
    """Answer and suffix NLL per completion, and the mass on the two answers per pair (plain model)."""
    device = input_device(model)
    encoded = encoder.encode_all(pairs)
    answer_nll: dict[str, list[float]] = {}
    suffix_total = 0.0
    for side in ("positive", "negative"):
        answer_nll[side] = []
        for start in range(0, len(encoded), batch_size):
            batch = collate_pairs(encoded[start:start + batch_size], side, pad_token_id=encoder.pad_token_id)
            ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
            token_nll = token_nll_from_hidden(model, final_hidden(model, ids, mask), batch.labels.to(device))
            answer = batch.answer_mask.to(device)
            suffix = batch.completion_mask.to(device) & ~answer
            answer_nll[side].extend((token_nll * answer).sum(dim=1).double().tolist())
            suffix_total += float((token_nll * suffix).sum())
    positive, negative = np.asarray(answer_nll["positive"]), np.asarray(answer_nll["negative"])
    mass = np.exp(-positive) + np.exp(-negative)
    clipped = np.clip(mass, 1e-12, 1 - 1e-12)  # two answers can hold all the mass only up to rounding
    rendering = encoder.rendering
    return RenderingCandidate(rendering.instruction, rendering.completion_space,
                              float(np.concatenate([positive, negative]).mean()), suffix_total / (2 * len(encoded)),
                              float(mass.mean()), float(np.mean(np.log(clipped) - np.log1p(-clipped))))


# ---------------------------------------------------------------------------------------------- held-out


def trained_pair_ids(update: Update) -> set[str] | None:
    """Content ids of the pairs an update was trained on (None when its metadata does not say)."""
    data = update.spec.training.get("data") if isinstance(update.spec.training, dict) else None
    ids = data.get("pair_ids") if isinstance(data, dict) else None
    return set(ids) if isinstance(ids, list) else None


def check_held_out(update: Update, pairs: PairDataset, *, name: str, allow_overlap: bool = False) -> int:
    """Refuse (or, with `allow_overlap`, warn loudly) when `pairs` include pairs `update` was trained on.

    Returns the number of overlapping pairs. An update without training provenance is let through with a
    warning: its overlap cannot be checked.
    """
    trained = trained_pair_ids(update)
    label = update.spec.name or update.spec.form
    if trained is None:
        log.warning("update %s records no training pairs: cannot check that %s (%s) is held out", label, name,
                    pairs.name)
        return 0
    overlap = sum(pair_id in trained for pair_id in pairs.content_ids())
    if overlap:
        message = (f"update {label!r} was trained on {overlap} of the {len(pairs)} pairs of {name} ({pairs.name}); "
                   "scores on them are not held-out results. Use the split the update was trained with (same "
                   "--split-seed and sizes) or pass --allow-overlap")
        if not allow_overlap:
            raise DataError(message)
        log.warning("WARNING: %s", message)
    return overlap


# ---------------------------------------------------------------------------------------------- data


def load_data(name: str | Sequence[PolarityPair], *, data_dir: str | None = None, fields: Any = None,
              split: Mapping[str, Any] | None = None, model: nn.Module | None = None, tokenizer: Any = None,
              cache_dir: str | Path | None = None) -> BuiltinData:
    """A built-in dataset by name, one read from a JSONL/JSON/CSV/Parquet file of pairs, or pairs in memory
    (a list of `PolarityPair`, as a notebook builds them).

    `split` changes fields of the dataset's default split (`datasets_builtin.split_spec`): every command
    that is given the same values gets the same parts, and sizes never move test or dev pairs into train.
    """
    if not isinstance(name, str | Path):
        pairs = list(name)
        bad = next((i for i, p in enumerate(pairs) if not isinstance(p, PolarityPair)), None)
        if bad is not None or not pairs:
            what = "an empty list" if not pairs else f"item {bad}: {type(pairs[bad]).__name__}"
            raise DataError(f"pairs: expected a non-empty list of PolarityPair(prompt, positive, negative), got {what}")
        return _pairs_data(PairDataset.from_pairs(pairs, name="pairs"), split, files=())
    path = Path(name)
    if str(name).startswith("axbench/"):
        return _axbench(name, data_dir=data_dir, split=split, model=model, tokenizer=tokenizer, cache_dir=cache_dir)
    if path.suffix.lower() in (".jsonl", ".json", ".csv", ".parquet"):
        return _pairs_data(read_pairs(path, fields), split, files=(str(path),))
    return load_builtin(name, data_dir=data_dir, split=split)


def _pairs_data(dataset: PairDataset, split: Mapping[str, Any] | None, *, files: tuple[str, ...]) -> BuiltinData:
    """A user's own pairs (a file or a list), split 80 / 10 / 10 unless `split` says otherwise."""
    splits = dataset.split(split_spec(SplitConfig(dev=0.1, test=0.1), split))
    choice = _all_choice(splits.test)
    return BuiltinData(name=files[0] if files else dataset.name, splits=splits,
                       choice_test=splits.test if choice else None,
                       choice_dev=splits.dev if choice and _all_choice(splits.dev) else None, files=files)


def _axbench(name: str, *, data_dir: str | None, split: Mapping[str, Any] | None, model: nn.Module | None,
             tokenizer: Any, cache_dir: str | Path | None) -> BuiltinData:
    """AxBench pairs: the concept's examples against the plain model's own answers (generated once, cached)."""
    from .generation.generate import generate_unsteered

    if model is None or tokenizer is None or cache_dir is None:
        raise DataError(f"{name}: the negative side is the model's own answer; pass model=, tokenizer= and "
                        "cache_dir=")
    setting, concept_id = axbench_concept_id(name)
    seed = int((split or {}).get("seed", 42))
    concept = load_axbench_concept(concept_id, data_dir=data_dir, setting=setting, seed=seed)
    answers = generate_unsteered(model, tokenizer, [instruction for _, instruction, _ in concept.examples],
                                 cache_dir=cache_dir)
    return axbench_pairs(concept, answers, split=split, extra={"generation": answers[0].settings if answers else {}})


def _all_choice(dataset: PairDataset) -> bool:
    return len(dataset) > 0 and all(
        answer_meta(p.prompt, p.positive, p.negative)["format"] in ("yes_no", "ab") for p in dataset)


# ---------------------------------------------------------------------------------------------- layer


def resolve_layer(model: nn.Module, layer: int | str | None) -> int:
    """An explicit layer, else the model's measured default (`unisteer layers`), else the middle layer."""
    from .engine.architecture import check_layer_index, model_structure
    from .engine.models import ALIASES, model_id

    num_layers = model_structure(model).num_layers
    if layer is None or layer == "default":
        source = ALIASES.get(model_id(model))
        if source is not None and source.default_layer is not None:
            return source.default_layer
        log.warning("no measured default layer for %s; using the middle layer %d (run `unisteer layers` to "
                    "measure one)", model_id(model), num_layers // 2)
        return num_layers // 2
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ConfigError(f"layer: expected an integer, 'default' or null, got {layer!r}")
    check_layer_index(layer, num_layers)
    return layer


# ---------------------------------------------------------------------------------------------- rendering


def resolve_rendering(model: nn.Module, tokenizer: Any, rendering: Rendering | str | Mapping[str, Any] | None,
                      train: PairDataset, *, max_length: int = 512) -> tuple[Rendering, dict[str, Any]]:
    """`auto` (or None): measured on the training pairs by `choose_rendering` (sequences cut at `max_length`,
    as they will be trained and scored); a name or mapping: as given.

    Returns the rendering and the record to keep with results (how it was chosen, and the measurement).
    """
    if rendering is None or rendering == "auto":
        choice = choose_rendering(model, tokenizer, train, max_length=max_length)
        log.info("rendering measured on %s: %s", train.name, choice.rendering.to_dict())
        return choice.rendering, {"chosen_by": "measurement", **choice.to_dict()}
    chosen = Rendering.parse(rendering)
    return chosen, {"chosen_by": "configuration", "rendering": chosen.to_dict()}


def rendering_of(update: Update) -> Rendering | None:
    """The rendering an update was trained with, from its metadata (None when it does not say)."""
    training = update.spec.training if isinstance(update.spec.training, dict) else {}
    encoder = training.get("encoder")
    recorded = encoder.get("rendering") if isinstance(encoder, dict) else None
    if not isinstance(recorded, dict):
        return None
    return Rendering.parse({k: v for k, v in recorded.items() if k in
                            ("template", "completion_space", "end_of_turn", "plain_format", "name", "instruction")})


def common_rendering(updates: Mapping[str, Update]) -> Rendering | None:
    """The one rendering all updates were trained with; None if none records one; an error if they differ."""
    found = {name: r for name, r in ((n, rendering_of(u)) for n, u in updates.items()) if r is not None}
    if not found:
        return None
    first = next(iter(found.values()))
    different = [name for name, r in found.items() if not r.same_choice(first)]
    if different:
        raise ConfigError(f"updates {sorted(found)} were trained with different renderings ({different} differ "
                          f"from {first.to_dict()}); pass --rendering to score them all one way")
    return first


def resolve_recipe(recipe: Recipe, model: nn.Module, tokenizer: Any = None, data: BuiltinData | None = None, *,
                   updates: Mapping[str, Update] | None = None, rendering: Rendering | None = None,
                   rendering_choice: Mapping[str, Any] | None = None) -> Recipe:
    """`recipe` fixed against the loaded model and data.

    layer "default" → `resolve_layer`; None (the updates' own) → the one layer every update in `updates` sits
    at, else None. rendering: `rendering` when given (already resolved, e.g. read back from OUT/rendering.json,
    with its `rendering_choice`); "auto" or a name → `resolve_rendering` on `data`'s training pairs under the
    recipe's max_length; None → the one `updates` were trained with (`common_rendering`), else the default.
    split → every field of the split `data` was made with; dtype → the loaded model's.
    """
    layer = recipe.layer
    if layer is None:
        layers = {u.layer for u in (updates or {}).values()}
        layer = layers.pop() if len(layers) == 1 else None
    else:
        layer = resolve_layer(model, layer)
    choice = dict(rendering_choice) if rendering_choice else None
    if rendering is None:
        if recipe.rendering is None:
            found = common_rendering(updates or {})
            rendering = found or Rendering.parse(None)
            choice = {"chosen_by": "the updates" if found is not None else "default", "rendering": rendering.to_dict()}
        else:
            if recipe.rendering == "auto" and data is None:
                raise ConfigError("rendering 'auto' is measured on the training pairs: pass the data")
            rendering, choice = resolve_rendering(model, tokenizer, recipe.rendering,
                                                  data.splits.train if data is not None else None,
                                                  max_length=recipe.max_length)
    split = dataclasses.asdict(data.splits.spec) if data is not None else recipe.split
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return dataclasses.replace(recipe, layer=layer, rendering=rendering, rendering_choice=choice, split=split,
                               dtype=dtype)


# ---------------------------------------------------------------------------------------------- training


@dataclass
class TrainedCell:
    update: Update
    path: Path
    seconds: float | None  # None when a finished cell was loaded without its timing


def train_cell(model: nn.Module, tokenizer: Any, data: BuiltinData, *, objective: str, form: str,
               out_dir: str | Path, recipe: Recipe | None = None, layer: int | None = None,
               rendering: Rendering | None = None, overrides: Mapping[str, Any] | None = None,
               seed: int | None = None, name: str = "", resume: bool | None = None, overwrite: bool = False,
               progress: bool = True, extra_record: Mapping[str, Any] | None = None) -> TrainedCell:
    """Train (or compute) one update on `data`'s train split and save it to `out_dir/update`.

    `recipe` (resolved: `resolve_recipe`) gives the layer, the rendering, max_length and the seed, and its
    encoder is the one trained with; `overrides` are the other TrainConfig fields (a recipe key among them must
    agree with the recipe). A direct caller may give `layer=` and `rendering=` (and `seed=`, max_length among
    `overrides`) instead, and the recipe is built from them.

    `resume=None` continues from a checkpoint when `out_dir` holds one and restarts a run that stopped before
    its first checkpoint; True requires a checkpoint; False starts fresh. Already finished (`update` exists):
    the saved update is loaded, unless `overwrite`. The update records the training pairs (content ids), the
    split, the rendering and the recipe, so evaluation can refuse pairs it was trained on.
    """
    from .engine.storage import load_update, save_update
    from .training.diffmean import diffmean_update
    from .training.presets import preset
    from .training.run_folder import CHECKPOINT_FILE, METRICS_FILE
    from .training.trainer import train_update

    out = Path(out_dir)
    update_path = out / "update"
    timing_path = out / "timing.json"
    if update_path.exists() and not overwrite:
        seconds = read_json(timing_path)["seconds"] if timing_path.exists() else None
        return TrainedCell(load_update(update_path, model), update_path, seconds)
    recipe = _training_recipe(model, data, recipe, layer=layer, rendering=rendering, seed=seed, overrides=overrides)
    overrides = recipe.absorb(overrides, where="train")
    layer = recipe.train_settings()["layer"]
    # The one encoder of the recipe: its rendering and max_length reach the sequences trained on.
    encoder = recipe.encoder(tokenizer)
    train = data.splits.train
    started = time.perf_counter()
    record = {"split": data.splits.record(), "dataset": data.name, "recipe": recipe.to_dict(),
              **dict(extra_record or {})}
    if objective == "diffmean":
        if form != "vector":
            raise ConfigError("objective diffmean exists only for form vector")
        update = diffmean_update(model, tokenizer, train, layer, encoder=encoder, progress=progress,
                                 name=name or f"diffmean-vector-L{layer}")
        update.spec.training.update(record)
        out.mkdir(parents=True, exist_ok=True)
        save_update(update, update_path, overwrite=overwrite)
    else:
        config = preset(objective, form, data=preset_family(data), **{**overrides, **recipe.train_settings()})
        has_checkpoint = (out / CHECKPOINT_FILE).exists()
        if resume is None:
            # A run killed before its first checkpoint left only metrics: start it again from scratch.
            resume, restart = has_checkpoint, not has_checkpoint and (out / METRICS_FILE).exists()
        else:
            restart = False
        dev = data.splits.dev if len(data.splits.dev) else None
        result = train_update(model, tokenizer, train, config, out_dir=out, dev=dev, resume=resume,
                              overwrite=overwrite or restart, progress=progress, split_record=record["split"],
                              encoder=encoder)
        update = result.update
        update.spec.name = name or update.spec.name
        update.spec.training.update(record)
        save_update(update, update_path, overwrite=True)
    seconds = time.perf_counter() - started
    write_json(timing_path, {"seconds": seconds})
    # The saved copy is what a resumed run sees; use it now too so both runs name the same update.
    return TrainedCell(load_update(update_path, model), update_path, seconds)


def _training_recipe(model: nn.Module, data: BuiltinData, recipe: Recipe | None, *, layer: int | None,
                     rendering: Rendering | None, seed: int | None, overrides: Mapping[str, Any] | None) -> Recipe:
    """The given recipe, or one built from a direct caller's `layer`, `rendering`, `seed` and the recipe keys
    among its `overrides` (each given once, or the same in both places)."""
    if recipe is not None:
        if (layer, rendering, seed) != (None, None, None):
            raise ConfigError("train_cell: give the recipe, or layer= / rendering= / seed=, not both")
        return recipe
    from .engine.models import model_id

    given = dict(overrides or {})
    settings = {key: agreed(key, [(key, value), (f"overrides.{key}", given.get(key))], None)
                for key, value in (("layer", layer), ("rendering", rendering), ("seed", seed))}
    if settings["layer"] is None or settings["rendering"] is None:
        raise ConfigError("train_cell: give a recipe (workflow.resolve_recipe), or layer= and rendering=")
    built = Recipe(model=model_id(model), layer=settings["layer"], rendering=settings["rendering"],
                   seed=DEFAULT_SEED if settings["seed"] is None else settings["seed"],
                   max_length=given.get("max_length", DEFAULT_MAX_LENGTH))
    return resolve_recipe(built, model, data=data, rendering=built.rendering)


# ---------------------------------------------------------------------------------------------- evaluation


@dataclass
class ChoiceEvaluation:
    """Choice accuracy of one update (or the plain model) over a grid: chosen on dev, reported on test.

    `toward` / `away` are the test scores at the multipliers chosen on dev (`evaluation.select_steering`),
    with the paired change from m = 0; `calibrated` the accuracy after a dev-calibrated threshold per m.
    """

    grid: list[float]
    test: AccuracyByM
    dev: AccuracyByM | None = None
    selection: SteeringSelection | None = None
    calibrated: list[dict[str, Any]] | None = None
    overlap: dict[str, int] = field(default_factory=dict)
    rendering: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)

    def side(self, which: str) -> dict[str, Any] | None:
        if self.selection is None:
            return None
        chosen = getattr(self.selection, which)
        m = chosen.multiplier
        row = dict(self.test.rows()[self.test.index(m)])
        row["dev_value"] = chosen.value
        row["change"] = change_from_zero(self.test, m) if m != 0 else None
        if self.calibrated:
            row["calibrated"] = next((c for c in self.calibrated if c["multiplier"] == m), None)
        return row

    def to_dict(self) -> dict[str, Any]:
        return {"grid": self.grid, "rendering": self.rendering, "overlap": self.overlap,
                "selection": None if self.selection is None else self.selection.to_dict(),
                "toward": self.side("toward"), "away": self.side("away"),
                "dev_rows": None if self.dev is None else self.dev.rows(), "test_rows": self.test.rows(),
                "calibrated": self.calibrated, "test": self.test.to_dict(), "recipe": self.recipe}


def evaluate_choices(model: nn.Module, tokenizer: Any, data: BuiltinData, update: Update | None,
                     grid: Sequence[float], *, recipe: Recipe | None = None, rendering: Rendering | None = None,
                     max_pairs: int | None = None, allow_overlap: bool = False,
                     progress: bool = True) -> ChoiceEvaluation:
    """Score `data`'s choice items at every m of `grid` on dev and test; choose ±m on dev.

    The items are encoded by `recipe`'s encoder (its rendering and max_length); without a recipe, by
    `rendering` (None: the one the update was trained with) at the default max_length. Both parts are checked
    to be held out from the update's training pairs (`check_held_out`).
    """
    if data.choice_test is None:
        raise DataError(f"{data.name}: has no yes/no or A/B test items to score")
    if recipe is None:
        recipe = scoring_recipe(model, data, {} if update is None else {"update": update}, rendering=rendering)
    elif rendering is not None:
        raise ConfigError("evaluate_choices: give the recipe or a rendering, not both")
    rendering = recipe.resolved_rendering
    encoder = recipe.encoder(tokenizer)
    test = first_pairs(data.choice_test, max_pairs)
    dev = first_pairs(data.choice_dev, max_pairs) if data.choice_dev is not None and len(data.choice_dev) else None
    overlap = {}
    if update is not None:
        overlap["test"] = check_held_out(update, test, name="the test items", allow_overlap=allow_overlap)
        if dev is not None:
            overlap["dev"] = check_held_out(update, dev, name="the dev items", allow_overlap=allow_overlap)
    grid = sorted({0.0, *map(float, grid)}) if update is not None else [0.0]
    test_scores = choice_accuracy(model, tokenizer, test.pairs, update, grid, encoder=encoder, progress=progress)
    if update is None or dev is None:
        return ChoiceEvaluation(grid, test_scores, overlap=overlap, rendering=rendering.to_dict(),
                                recipe=recipe.to_dict())
    dev_scores = choice_accuracy(model, tokenizer, dev.pairs, update, grid, encoder=encoder, progress=progress)
    criterion = "balanced_accuracy" if "balanced_accuracy" in dev_scores.rows(n_boot=1)[0] else "accuracy"
    selection = select_steering(dev_scores, criterion)
    calibrated = calibrated_accuracy(dev_scores, test_scores) if test_scores.leans() is not None and \
        dev_scores.options == test_scores.options else None
    return ChoiceEvaluation(grid, test_scores, dev_scores, selection, calibrated, overlap, rendering.to_dict(),
                            recipe.to_dict())


def scoring_recipe(model: nn.Module, data: BuiltinData | None, updates: Mapping[str, Update], *,
                   rendering: Rendering | str | Mapping[str, Any] | None = None,
                   max_length: int = DEFAULT_MAX_LENGTH) -> Recipe:
    """The resolved recipe of scoring saved `updates` (a sweep, an evaluation) for a caller without one:
    `rendering` (None: the one the updates were trained with, else the default), the updates' layer."""
    from .engine.models import model_id

    recipe = Recipe(model=model_id(model), layer=None, rendering=rendering, max_length=max_length, seed=None)
    return resolve_recipe(recipe, model, data=data, updates=updates)


def first_pairs(dataset: PairDataset, limit: int | None) -> PairDataset:
    """The first `limit` pairs (all when None): a deterministic subset of a split part."""
    if limit is None or len(dataset) <= limit:
        return dataset
    return dataset.select(list(range(limit)), name=f"{dataset.name}[:{limit}]")


# ---------------------------------------------------------------------------------------------- layers

SCAN_GRIDS = {"diffmean": [-8.0, -4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0, 8.0],
              "split": [-16.0, -12.0, -8.0, -4.0, 0.0, 4.0, 8.0, 12.0, 16.0]}


@dataclass
class LayerScore:
    """How far an update at one layer moves the dev scores toward (m ≥ 0) and away (m ≤ 0)."""

    layer: int
    auc_toward: float  # highest dev AUC of the lean against the matching label at m >= 0
    auc_away: float  # lowest at m <= 0
    balanced_toward: float  # highest dev balanced accuracy at m >= 0
    balanced_away: float  # lowest at m <= 0
    seconds: float
    stage: str = "cheap"  # "cheap" (the screening update) or "full" (the dataset's full recipe)

    @property
    def spread(self) -> float:
        """The screening score: auc_toward − auc_away (0 = the update does not move the dev ranking at all).

        AUC, not accuracy: a cheap update reorders the items long before its answers cross the decision
        threshold, and a constant answer or a pure shift of the Yes/No lean leaves it unchanged."""
        return self.auc_toward - self.auc_away

    @property
    def balanced_spread(self) -> float:
        """The final score: balanced_toward − balanced_away, what multiplier selection itself optimises."""
        return self.balanced_toward - self.balanced_away


@dataclass
class LayerScan:
    screened: list[LayerScore]  # every layer, best screening spread first
    refined: list[LayerScore]  # the shortlist trained with the full recipe, best balanced spread first

    @property
    def best(self) -> LayerScore:
        if self.refined:
            return self.refined[0]
        return self.screened[0]


def scan_layers(model: nn.Module, tokenizer: Any, data: BuiltinData, layers: Sequence[int], *, out_dir: str | Path,
                objective: str = "split", pairs: int = 80, recipe: Recipe | None = None,
                rendering: Rendering | None = None, grid: Sequence[float] | None = None, dev_pairs: int = 60,
                refine: int = 0, refine_overrides: Mapping[str, Any] | None = None,
                callback: Callable[[LayerScore], None] | None = None) -> LayerScan:
    """Measure the steering layer: screen every layer cheaply, then train the full recipe on a shortlist.

    Screening, per layer: a vector trained on the first `pairs` training pairs (one epoch of SPLIT with the
    dataset's reference preset, or DiffMean), then dev AUC and balanced accuracy over `grid`; layers are ranked
    by `LayerScore.spread`. Refinement: the best `refine` layers are trained on the whole train split with the
    preset (and `refine_overrides`, e.g. the run's epochs) and ranked by dev balanced accuracy over the form's
    default grid — the score multiplier selection uses. Results go to `out_dir/layers.json` as they come; a
    rerun with the same settings skips what is done (and reuses the updates in `out_dir/<stage>-layer-K/`).
    Every update is trained and scored by `recipe` (its rendering, max_length and seed) at the layer scanned;
    a direct caller may give a resolved `rendering` instead.
    """
    from .engine.updates import default_grid

    if objective not in SCAN_GRIDS:
        raise ConfigError(f"scan objective: {objective!r} is not one of {sorted(SCAN_GRIDS)}")
    if data.choice_dev is None or not len(data.choice_dev):
        raise DataError(f"{data.name}: no held-out choice items (dev) to score layers on")
    if recipe is None:
        if rendering is None:
            raise ConfigError("scan_layers: give a recipe, or a rendering")
        recipe = _training_recipe(model, data, None, layer=0, rendering=rendering, seed=None, overrides=None)
    elif rendering is not None:
        raise ConfigError("scan_layers: give the recipe or a rendering, not both")
    encoder = recipe.encoder(tokenizer)
    out = Path(out_dir)
    settings = {"objective": objective, "pairs": pairs, "dev_pairs": dev_pairs,
                "rendering": recipe.resolved_rendering.to_dict(), "grid": list(grid or SCAN_GRIDS[objective]),
                "data": data.splits.record(), "scores": 2, "refine_overrides": dict(refine_overrides or {"epochs": 1})}
    if recipe.max_length != DEFAULT_MAX_LENGTH:  # only when set, so a scan saved before it was recorded resumes
        settings["max_length"] = recipe.max_length
    if recipe.seed != DEFAULT_SEED:
        settings["seed"] = recipe.seed
    path = out / "layers.json"
    done: dict[str, Any] = {"cheap": {}, "full": {}}
    if path.exists():
        previous = read_json(path)
        if previous.get("settings") == settings:
            done = {"cheap": previous.get("layers", {}), "full": previous.get("refined", {})}

    def save() -> None:
        write_json(path, {"settings": settings, "layers": done["cheap"], "refined": done["full"]})

    def score(stage: str, layer: int, subset: BuiltinData, overrides: Mapping[str, Any],
              stage_grid: Sequence[float]) -> LayerScore:
        if str(layer) not in done[stage]:
            started = time.perf_counter()
            folder = out / (f"layer-{layer}" if stage == "cheap" else f"full-layer-{layer}")
            trained = train_cell(model, tokenizer, subset, objective=objective, form="vector",
                                 recipe=dataclasses.replace(recipe, layer=layer), out_dir=folder,
                                 overrides=overrides, progress=False, name=f"scan-{objective}-L{layer}")
            dev = choice_accuracy(model, tokenizer, subset.choice_dev.pairs, trained.update, stage_grid,
                                  encoder=encoder, progress=False)
            grid_m = np.asarray(dev.multipliers)
            auc, balanced = dev.auc(), dev.balanced_accuracy()
            if auc is None:
                raise DataError(f"{data.name}: the dev items do not share two answer options; cannot rank layers")
            toward, away = grid_m >= 0, grid_m <= 0
            done[stage][str(layer)] = {"auc_toward": float(auc[toward].max()), "auc_away": float(auc[away].min()),
                                       "balanced_toward": float(balanced[toward].max()),
                                       "balanced_away": float(balanced[away].min()),
                                       "seconds": time.perf_counter() - started}
            save()
        result = LayerScore(layer, **done[stage][str(layer)], stage=stage)
        if callback is not None:
            callback(result)
        return result

    cheap = dataclasses.replace(data, splits=dataclasses.replace(
        data.splits, train=first_pairs(data.splits.train, pairs)), choice_dev=first_pairs(data.choice_dev, dev_pairs))
    screened = sorted((score("cheap", layer, cheap, {"epochs": 1}, settings["grid"]) for layer in layers),
                      key=lambda s: (-s.spread, s.layer))
    full_grid = default_grid("vector") if objective != "diffmean" else settings["grid"]
    refined = sorted((score("full", s.layer, data, settings["refine_overrides"], full_grid)
                      for s in screened[:refine]), key=lambda s: (-s.balanced_spread, -s.spread, s.layer))
    return LayerScan(screened, refined)
