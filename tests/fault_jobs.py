"""Jobs that tests/test_fault_injection.py runs in a subprocess, kills with SIGKILL, and runs again.

    python tests/fault_jobs.py train|sweep|run MODEL_DIR OUT DTYPE

Each prints "ready" once its imports and model load are done (the harness times its kill from there) and
leaves its results in OUT. `MODEL_DIR` is a tiny random Llama with a character tokenizer (`make_model_dir`).
"""

from __future__ import annotations

import sys
from pathlib import Path

# A/B answers: the choice evaluation compares the letters, which the character tokenizer keeps as one token.
QUESTIONS = [("Is {0} a colour?\n(A) yes\n(B) no", " (A)", " (B)"), ("Would you hurt {0}?\n(A) yes\n(B) no", " (B)", " (A)")]
WORDS = ["red", "blue", "a cat", "green", "a dog", "grey", "a tree", "pink", "a fish", "teal", "a bird", "gold",
         "a frog", "lime", "a bee", "rust", "a cow", "jade", "a yak", "plum"]


def pairs_file(folder: Path) -> Path:
    import json

    path = folder / "pairs.jsonl"
    rows = [{"question": q.format(w), "matching": a, "not_matching": b}
            for w in WORDS for q, a, b in QUESTIONS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_model_dir(folder: Path) -> Path:
    """Save the tiny Llama and the character tokenizer of the serving tests as a loadable model folder."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_serving import char_tokenizer
    from tiny_models import tiny_model

    folder.mkdir(parents=True, exist_ok=True)
    model = tiny_model("llama")
    model.config.max_position_embeddings = 128
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def main() -> None:
    job, model_dir, out, dtype = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4]
    import torch

    torch.set_num_threads(1)
    from unisteer.engine.models import load_model

    if job == "run":
        import yaml

        from unisteer.cli import main as cli

        config = {"model": model_dir, "dtype": dtype, "layer": 1, "rendering": "natural",
                  "data": str(pairs_file(out.parent)), "split": {"seed": 3, "dev": 8, "test": 8},
                  "cells": [{"form": "vector", "objective": "split",
                             "train": {"epochs": 3, "batch_size": 2, "checkpoint_every": 2, "eval_pairs": 0}},
                            {"form": "lora", "objective": "sft",
                             "train": {"epochs": 2, "batch_size": 2, "checkpoint_every": 3, "eval_pairs": 0}}],
                  "sweep": {"grid": [-2, -1, 0, 1, 2], "n_boot": 20, "chunk_examples": 2, "batch_rows": 3,
                            "manifold": False},
                  "evaluate": {"grids": {"vector": [-2, 0, 2], "lora": [-1, 0, 1]}}, "out": str(out)}
        path = out.parent / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump(config))
        print("ready", flush=True)
        sys.exit(cli(["run", str(path), "--no-progress"]))

    from unisteer.workflow import load_data

    model, tokenizer = load_model(model_dir, dtype=dtype)
    data = load_data(str(pairs_file(out.parent)), split={"seed": 3, "dev": 8, "test": 8})
    print("ready", flush=True)
    if job == "train":
        from unisteer.training.presets import preset
        from unisteer.training.trainer import train_update

        config = preset("split", "lora", layer=1, epochs=4, batch_size=2, checkpoint_every=3, eval_pairs=0,
                        rendering="natural")
        resume = (out / "checkpoint").exists()
        train_update(model, tokenizer, data.splits.train, config, out_dir=out, resume=resume, progress=False,
                     overwrite=not resume and (out / "metrics.jsonl").exists())
    elif job == "sweep":
        from unisteer.analysis.sweep import SweepConfig, run_sweep
        from unisteer.data.rendering import PairEncoder
        from unisteer.engine.updates import create_update

        update = create_update(model, "lora", 1, rank=2, seed=0)
        with torch.no_grad():
            update.lora_B.copy_(torch.randn(update.lora_B.shape, generator=torch.Generator().manual_seed(1)))
        config = SweepConfig(grid=[-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0], n_boot=20, chunk_examples=3,
                             batch_rows=4, manifold=True, manifold_max_examples=8, progress=False)
        run_sweep(model, tokenizer, {"u": update.eval()}, {"train": data.splits.train, "test": data.splits.test},
                  config, out, encoder=PairEncoder(tokenizer, "natural"))
    else:
        raise SystemExit(f"unknown job {job!r}")


if __name__ == "__main__":
    main()
