"""The recipe: the settings one run shares, built once and handed to every step.

A `Recipe` holds the model, its dtype, the steering layer, the rendering with its `max_length`, the split and
the training seed. The CLI builds one from its flags (`cli.recipe_from_args`), `unisteer run` from the YAML
(`Recipe.from_run_config`), the Python API from its arguments; `workflow.resolve_recipe` then fixes it against
the loaded model and data (layer "default" → the model's measured layer, rendering "auto" → measured on the
training pairs, the split → every field the data was split with, dtype → the loaded one), and `to_dict` is
recorded with the results (the update's metadata, sweep.json's settings, the evaluation JSON, the run summary).

The recipe owns the encoder: `recipe.encoder(tokenizer)` is the one `PairEncoder` with the recipe's rendering
and max_length that training, the sweep, the choice evaluation and judged generation use. A setting given in
two places (`--layer` and `--set layer=`, `max_length:` and `train: {max_length: }`) must agree: nothing a
user writes is dropped, and nothing is silently overruled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .config import from_dict
from .data.pairs import SplitConfig
from .data.rendering import PairEncoder, Rendering
from .engine.models import DEFAULT_DTYPE, DEFAULT_MODEL
from .errors import ConfigError

DEFAULT_MAX_LENGTH = 512
DEFAULT_SEED = 42
# The TrainConfig fields that are the recipe's, not one cell's: `--set` / `train:` may name them, and they are
# taken into the recipe (where they must agree with the recipe's own flags / keys).
RECIPE_TRAIN_KEYS = ("layer", "rendering", "max_length", "seed")


@dataclass(frozen=True)
class Recipe:
    """What one run trains and scores with.

    layer: an index, "default" (the model's measured layer), or None where the updates bring their own
      (sweep, evaluation, judge). rendering: a `Rendering` (or a name / mapping of one), "auto" (measured on
      the training pairs), or None: the one the updates were trained with. max_length: the longest sequence
      (prompt + completion) in tokens; longer pairs lose prompt tokens (`PairEncoder`). split: fields of the
      dataset's default split (seed, train, dev, test, stratify), None for the dataset's own. seed: the
      training seed, None where nothing is trained. `rendering_choice`: how `workflow.resolve_recipe` chose the
      rendering (kept with the training record, not part of the recipe's identity).
    """

    model: str = DEFAULT_MODEL
    dtype: str = DEFAULT_DTYPE
    layer: int | str | None = "default"
    rendering: Rendering | str | Mapping[str, Any] | None = "auto"
    max_length: int = DEFAULT_MAX_LENGTH
    split: Mapping[str, Any] | None = None
    seed: int | None = DEFAULT_SEED
    rendering_choice: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError(f"model: expected an alias, a folder or a hub id, got {self.model!r}")
        if not isinstance(self.dtype, str):
            raise ConfigError(f"dtype: expected a name such as 'auto' or 'float32', got {self.dtype!r}")
        layer = self.layer
        if layer is not None and layer != "default" and (isinstance(layer, bool) or not isinstance(layer, int)
                                                         or layer < 0):
            raise ConfigError(f"layer: expected a layer index (from 0) or 'default', got {layer!r}")
        if self.rendering is not None and self.rendering != "auto" and not isinstance(self.rendering, Rendering):
            object.__setattr__(self, "rendering", Rendering.parse(self.rendering))
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2:
            raise ConfigError(f"max_length: expected an integer of at least 2, got {self.max_length!r}")
        if self.split is not None:
            if isinstance(self.split, SplitConfig):
                object.__setattr__(self, "split", dataclasses.asdict(self.split))
            if not isinstance(self.split, Mapping):
                raise ConfigError(f"split: expected a mapping of split fields, got {self.split!r}")
            from_dict(SplitConfig, dict(self.split), where="split")  # each field, before anything loads
            object.__setattr__(self, "split", dict(self.split))
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ConfigError(f"seed: expected an integer, got {self.seed!r}")

    # ------------------------------------------------------------------------------------------ building

    @classmethod
    def from_run_config(cls, config: Any) -> Recipe:
        """The recipe of a `pipeline.RunConfig` (the YAML of `unisteer run`).

        Top-level keys give it; a recipe key in the run-wide `train:` section (layer, rendering, max_length,
        seed) or `sweep: {max_length: }` says the same thing and is taken when the top-level key is unset (at
        its default); two values that differ are refused. Of the per-cell `cells[].train` keys only `seed` may
        differ from the run's (`cell_recipe`).
        """
        train, sweep = dict(config.train or {}), dict(config.sweep or {})
        layer = None if config.layer in (None, "default") else config.layer
        rendering = None if config.rendering in (None, "auto") else config.rendering
        seed = None if config.seed == DEFAULT_SEED else config.seed
        recipe = cls(
            model=config.model, dtype=config.dtype, split=config.split,
            layer=agreed("layer", [("layer", layer), ("train.layer", train.get("layer"))], "default"),
            rendering=agreed("rendering", [("rendering", rendering), ("train.rendering", train.get("rendering"))],
                             "auto"),
            max_length=agreed("max_length", [("max_length", getattr(config, "max_length", None)),
                                             ("train.max_length", train.get("max_length")),
                                             ("sweep.max_length", sweep.get("max_length"))], DEFAULT_MAX_LENGTH),
            seed=agreed("seed", [("seed", seed), ("train.seed", train.get("seed"))], DEFAULT_SEED))
        for cell in config.cells:
            recipe.cell_recipe(cell.train, where=f"cells[{cell.name}].train")
        return recipe

    def cell_recipe(self, overrides: Mapping[str, Any] | None, *, where: str = "train") -> Recipe:
        """This recipe for one cell whose own TrainConfig keys are `overrides`: its `seed` may differ (it touches
        that cell's training alone); layer, rendering and max_length are the run's, since every cell is swept
        and evaluated one way, and a cell that names another value is refused."""
        given = dict(overrides or {})
        for key in ("layer", "rendering", "max_length"):
            if key in given and not _same(key, given[key], getattr(self, key)):
                raise ConfigError(f"{where}.{key}: {given[key]!r} differs from the run's {key} "
                                  f"({_shown(getattr(self, key))}); the run has one {key} for every cell (set it at "
                                  "the top level), or run the cell separately")
        return self if given.get("seed") is None else dataclasses.replace(self, seed=given["seed"])

    def absorb(self, overrides: Mapping[str, Any] | None, *, where: str = "overrides") -> dict[str, Any]:
        """The TrainConfig `overrides` without the recipe's keys, each of which must equal the recipe's (the
        recipe was built from those settings: a different value here would be overruled, so it is refused)."""
        rest = dict(overrides or {})
        for key in RECIPE_TRAIN_KEYS:
            if key in rest and not _same(key, value := rest.pop(key), getattr(self, key)):
                raise ConfigError(f"{where}.{key}: {value!r} differs from the recipe's {key} "
                                  f"({_shown(getattr(self, key))}); give it once")
        return rest

    # ------------------------------------------------------------------------------------------ using

    @property
    def resolved_rendering(self) -> Rendering:
        if not isinstance(self.rendering, Rendering):
            raise ConfigError(f"recipe: the rendering is {self.rendering!r}; resolve the recipe first "
                              "(workflow.resolve_recipe)")
        return self.rendering

    def encoder(self, tokenizer: Any) -> PairEncoder:
        """The one encoder of this recipe: its rendering, its max_length."""
        return PairEncoder(tokenizer, self.resolved_rendering, max_length=self.max_length)

    def train_settings(self) -> dict[str, Any]:
        """The TrainConfig fields this recipe sets (over a preset and a cell's overrides)."""
        if not isinstance(self.layer, int):
            raise ConfigError(f"recipe: the layer is {self.layer!r}; resolve the recipe first "
                              "(workflow.resolve_recipe)")
        if self.seed is None:
            raise ConfigError("recipe: training needs a seed")
        return {"layer": self.layer, "rendering": self.resolved_rendering, "max_length": self.max_length,
                "seed": self.seed}

    def to_dict(self) -> dict[str, Any]:
        """The record kept with results."""
        rendering = self.rendering.to_dict() if isinstance(self.rendering, Rendering) else self.rendering
        record = {"model": self.model, "dtype": self.dtype, "layer": self.layer, "rendering": rendering,
                  "max_length": self.max_length, "split": None if self.split is None else dict(self.split),
                  "seed": self.seed}
        if self.rendering_choice and self.rendering_choice.get("chosen_by"):
            record["rendering_chosen_by"] = self.rendering_choice["chosen_by"]
        return record


def agreed(name: str, given: list[tuple[str, Any]], default: Any) -> Any:
    """The one value of a setting given (not None) in any of several places; the places must agree."""
    present = [(where, value) for where, value in given if value is not None]
    for where, value in present[1:]:
        if not _same(name, value, present[0][1]):
            raise ConfigError(f"{name}: {present[0][0]} says {_shown(present[0][1])} and {where} says "
                              f"{_shown(value)}; give it once")
    return present[0][1] if present else default


def _same(name: str, a: Any, b: Any) -> bool:
    if name == "rendering":
        return _rendering_key(a) == _rendering_key(b)
    if name == "layer":
        return (None if a == "default" else a) == (None if b == "default" else b)
    return a == b


def _rendering_key(value: Any) -> Any:
    if value is None or value == "auto":
        return value
    return Rendering.parse(value)


def _shown(value: Any) -> str:
    return repr(value.to_dict() if isinstance(value, Rendering) else value)


__all__ = ["DEFAULT_MAX_LENGTH", "DEFAULT_SEED", "RECIPE_TRAIN_KEYS", "Recipe", "agreed"]
