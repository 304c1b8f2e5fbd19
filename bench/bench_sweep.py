"""Sweep scoring: the fast path (`unisteer.analysis.paired.score_pairs`) against the straightforward one.

The straightforward path runs one full forward per example, polarity and multiplier. The fast path runs
an unsteered base pass once (layer-L inputs, m = 0), then, per batch of rows (example × multiplier), only
layers ≥ L: the prompts' shared prefix once per multiplier, each prompt's remainder once, both completions
on that KV cache. Both run in this one process, one after the other (the machine is shared: only the ratio
is meaningful), on the same pairs and update, and the script prints the speed-up and the largest
difference of the completion NLLs.

    .venv/bin/python bench/bench_sweep.py                       # default model, 12 psychopathy test pairs
    .venv/bin/python bench/bench_sweep.py --pairs 24 --dtype bfloat16 --forms vector,lora,local_weight
"""

from __future__ import annotations

import argparse
import time

import torch

from unisteer.analysis.paired import score_one_by_one, score_pairs
from unisteer.data.builtin import load_builtin
from unisteer.data.rendering import PairEncoder
from unisteer.engine.models import DEFAULT_MODEL, load_model
from unisteer.engine.updates import create_update, default_grid

SWEEP_PAIRS, SWEEP_MULTIPLIERS = 500, 21  # the sweep size the projection is for


def random_update(model, form: str, layer: int, seed: int):
    """An update with random, non-trivial parameters (LoRA B and local weights start at zero)."""
    update = create_update(model, form, layer, rank=4, seed=seed).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in update.parameters():
            # Scaled so that m of the default grid moves the outputs without destroying them.
            scale = {"vector": 0.15, "lora": 0.02, "local_weight": 0.002}[form]
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return update


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--dataset", default="persona/psychopathy")
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--forms", default="vector")
    parser.add_argument("--multipliers", type=int, default=5, help="points taken evenly from the form's default grid")
    parser.add_argument("--batch-rows", type=int, default=64)
    args = parser.parse_args()

    model, tokenizer = load_model(args.model, dtype=args.dtype)
    encoder = PairEncoder(tokenizer)
    pairs = encoder.encode_all(load_builtin(args.dataset).splits.test.pairs[: args.pairs])
    tokens = sum(len(p.prompt_ids) + len(p.positive_ids) + len(p.negative_ids) for p in pairs) / len(pairs)
    print(f"model {args.model} ({args.dtype}, {torch.get_num_threads()} threads), {len(pairs)} pairs of "
          f"{args.dataset} (mean {tokens:.0f} tokens: prompt + both completions), layer {args.layer}")
    for form in args.forms.split(","):
        full = default_grid(form)
        step = max(1, (len(full) - 1) // max(1, args.multipliers - 1))
        grid = sorted({*full[::step], 0.0})
        update = random_update(model, form, args.layer, seed=0)

        start = time.perf_counter()
        slow = score_one_by_one(model, update, pairs, grid)
        slow_seconds = time.perf_counter() - start
        start = time.perf_counter()
        fast = score_pairs(model, update, pairs, grid, pad_token_id=encoder.pad_token_id,
                           batch_rows=args.batch_rows, chunk_examples=args.batch_rows)
        fast_seconds = time.perf_counter() - start

        keyed = {(s.example, s.m): s for s in slow}
        diff = max(max(abs(f.L_p - keyed[(f.example, f.m)].L_p), abs(f.L_n - keyed[(f.example, f.m)].L_n))
                   for f in fast)
        same_counts = all((f.T_p, f.T_n) == (keyed[(f.example, f.m)].T_p, keyed[(f.example, f.m)].T_n)
                          for f in fast)
        scale = max(max(s.L_p, s.L_n) for s in slow)
        units = len(pairs) * len(grid)
        projected = fast_seconds / units * SWEEP_PAIRS * SWEEP_MULTIPLIERS
        print(f"\n[{form}] multipliers {grid}")
        print(f"  straightforward: {slow_seconds:8.2f} s  ({units / slow_seconds:6.2f} pair·m/s)")
        print(f"  fast path:       {fast_seconds:8.2f} s  ({units / fast_seconds:6.2f} pair·m/s)")
        print(f"  speed-up:        {slow_seconds / fast_seconds:8.2f}x")
        print(f"  max |ΔL| = {diff:.3g} nats (largest L = {scale:.3g}); token counts equal: {same_counts}")
        print(f"  projected fast sweep of {SWEEP_PAIRS} pairs × {SWEEP_MULTIPLIERS} multipliers: "
              f"{projected / 60:.1f} min (conservative: the base pass is shared by fewer multipliers here)")


if __name__ == "__main__":
    main()
