"""Benchmark: SPLIT training steps with the frozen-prefix cache, without it, and a straightforward loop.

    .venv/bin/python bench/bench_training.py                     # vector, LoRA, local weight; 3 timed steps each
    .venv/bin/python bench/bench_training.py --forms vector --steps 5 --threads 1

Workload (the reference's timing setup): the default model, layer 15, psychopathy training pairs, the
`preset("split", form)` schedule — vector: batch 4, add+sub pairs (16 sequences per optimizer step); LoRA:
batch 4, add+sub, 2 accumulated batches (32); local weight: batch 4, add, 2 accumulated batches (16).

Variants, run interleaved step by step so that load from other processes hits them alike:
- `cached`   — the trainer's default: layer-L inputs computed once, layers ≥ L only, completion rows only
               through the lm-head, shared template-prefix keys/values for vectors;
- `uncached` — the trainer with `prefix_cache=False`: full forwards, completion rows only through the lm-head;
- `naive`    — a straightforward loop: `model(...).logits` for the winning and the losing side separately,
               log-softmax over the whole vocabulary, one backward per minibatch.
All three use the same initial update, pair order and factor draws with dropout off, so their losses must agree.

Printed: the bf16 / fp32 matmul peak of this machine (measured here; the model runs in the faster dtype
unless --dtype is given), the time to fill the cache, per-step times and their ratios, executed FLOPs per
step (torch's FlopCounterMode: matmuls and attention) and the achieved FLOP/s against the measured peak.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from unisteer.data.builtin import load_builtin
from unisteer.engine.models import load_model
from unisteer.engine.scoring import CompletionScores
from unisteer.training.objectives import split_loss
from unisteer.training.presets import preset
from unisteer.training.trainer import _Trainer

VARIANTS = ("cached", "uncached", "naive")


def matmul_peak(dtype: torch.dtype, size: int = 1024, seconds: float = 1.5) -> float:
    """Best-of GFLOP/s of a square matmul in `dtype`."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    a @ b
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - start) / 1e9)
    return best


def naive_step(trainer: _Trainer, group: list[list[int]]) -> float:
    """The reference-style step: each side of each minibatch through the full model and the full lm-head."""
    cfg, model = trainer.config, trainer.model
    examples = [trainer._examples(batch) for batch in group]
    n_minibatches = sum(math.ceil(len(e) / cfg.batch_size) for e in examples)
    losses = []
    for batch_examples in examples:
        for start in range(0, len(batch_examples), cfg.batch_size):
            minibatch = batch_examples[start:start + cfg.batch_size]
            side_scores = []
            for winning in (True, False):
                sequences = [e.win_sequence if winning else e.lose_sequence for e in minibatch]
                multipliers = torch.tensor([e.win_multiplier if winning else e.lose_multiplier for e in minibatch])
                batch = trainer.sequences.batch(sequences, pad_id=trainer.encoder.pad_token_id)
                trainer.train_steering.set_multiplier(multipliers)
                positions = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
                with trainer.train_steering:
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   position_ids=positions).logits
                logp = logits[:, :-1].float().log_softmax(-1)
                labels = batch["labels"][:, 1:]
                keep = labels != -100
                token_logp = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
                side_scores.append(CompletionScores(-token_logp.sum(-1), keep.sum(-1)))
            terms = split_loss(*side_scores, lambda_p=cfg.lambda_p, lambda_n=cfg.lambda_n, gamma=cfg.gamma,
                               theta=cfg.theta)
            (terms.loss / n_minibatches).backward()
            losses.append(float(terms.loss.detach()))
    params = [p for p in trainer.update.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    trainer.optimizer.step()
    trainer.scheduler.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return sum(losses) / len(losses)


def run_step(variant: str, trainer: _Trainer, group: list[list[int]], index: int) -> float:
    if variant == "naive":
        return naive_step(trainer, group)
    return trainer.step(group, index, 0)["loss"]


def bench_form(form: str, model, tokenizer, data, args, work: Path) -> dict:
    trainers, setup_s = {}, {}
    for variant in VARIANTS:
        config = preset("split", form, layer=args.layer, epochs=1, dropout=0.0,
                        prefix_cache=variant == "cached")
        trainer = _Trainer(model, tokenizer, data, config, out_dir=work / f"{form}-{variant}", dev=None,
                           resume=False, progress=False, overwrite=False, split_record=None, encoder=None,
                           callback=None)
        start = time.perf_counter()
        trainer.setup(work / f"{form}-{variant}-cache")
        setup_s[variant] = time.perf_counter() - start
        trainer.update.train()
        trainers[variant] = trainer
    groups = trainers["cached"].epoch_groups(0)
    needed = args.steps + 2
    if len(groups) < needed:
        raise SystemExit(f"{form}: {len(groups)} steps per epoch with {len(data)} pairs; need {needed} "
                         "(raise --pairs)")
    times = {v: [] for v in VARIANTS}
    losses = {v: [] for v in VARIANTS}
    for index in range(args.steps + 1):  # step 0 warms up and is not timed
        for variant in VARIANTS:
            start = time.perf_counter()
            losses[variant].append(run_step(variant, trainers[variant], groups[index], index))
            if index > 0:
                times[variant].append(time.perf_counter() - start)
    flops = {}
    for variant in VARIANTS:
        with FlopCounterMode(display=False) as counter:
            losses[variant].append(run_step(variant, trainers[variant], groups[args.steps + 1], args.steps + 1))
        flops[variant] = counter.get_total_flops()
    sequences = sum(len(batch) for batch in groups[0]) * len(trainers["cached"].config.pair_types) * 2
    return {"form": form, "setup_s": setup_s, "times": times, "losses": losses, "flops": flops,
            "sequences_per_step": sequences, "cache": trainers["cached"].cache_record,
            "cached_sequences": len(trainers["cached"].sequences)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--pairs", type=int, default=48, help="psychopathy training pairs (the cache covers them)")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per variant (after 1 warm-up)")
    parser.add_argument("--forms", default="vector,lora,local_weight")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f} (shared machine: compare ratios, not absolute times)")
    peaks = {"bfloat16": matmul_peak(torch.bfloat16), "float32": matmul_peak(torch.float32)}
    print(f"matmul peak (1024^3): bf16 {peaks['bfloat16']:.1f} GFLOP/s, fp32 {peaks['float32']:.1f} GFLOP/s")
    dtype = max(peaks, key=peaks.get) if args.dtype == "auto" else args.dtype
    print(f"model dtype: {dtype}" + (" (the faster matmul here)" if args.dtype == "auto" else ""))
    model, tokenizer = load_model(args.model, dtype=dtype)
    data = load_builtin("persona/psychopathy").splits.train
    data = data.select(range(min(args.pairs, len(data))), name=f"psychopathy:{args.pairs}")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        for form in args.forms.split(","):
            result = bench_form(form, model, tokenizer, data, args, Path(tmp))
            results.append(result)
            report(result, peaks[dtype], args)
    print("\nsummary (median s/step; speed-up of the cached trainer):")
    for r in results:
        median = {v: statistics.median(r["times"][v]) for v in VARIANTS}
        print(f"  {r['form']:<13} cached {median['cached']:.3f}  uncached {median['uncached']:.3f}  "
              f"naive {median['naive']:.3f}  ->  {median['naive'] / median['cached']:.2f}x vs naive, "
              f"{median['uncached'] / median['cached']:.2f}x vs uncached")


def report(result: dict, peak: float, args) -> None:
    form = result["form"]
    print(f"\n== SPLIT-{form}, layer {args.layer}, {result['sequences_per_step']} sequences per optimizer step")
    cache = result["cache"]
    print(f"cache fill: {result['setup_s']['cached']:.2f} s for {result['cached_sequences']} sequences "
          f"({cache['bytes'] / 2**20:.1f} MiB in {cache['storage']}, shared prefix {cache['shared_prefix_tokens']} "
          "tokens); computed once per run")
    median_cached = statistics.median(result["times"]["cached"])
    for variant in VARIANTS:
        times = result["times"][variant]
        median = statistics.median(times)
        flops = result["flops"][variant]
        print(f"  {variant:<9} steps {', '.join(f'{t:.3f}' for t in times)} s  median {median:.3f} s  "
              f"({median / median_cached:.2f}x cached)  {flops / 1e9:.1f} GFLOP/step  "
              f"{flops / median / 1e9:.1f} GFLOP/s = {100 * flops / median / 1e9 / peak:.0f}% of peak")
    reference = result["losses"]["cached"]
    for variant in ("uncached", "naive"):
        diff = max(abs(a - b) for a, b in zip(reference, result["losses"][variant], strict=True))
        print(f"  losses {variant} vs cached: max |diff| {diff:.2e} over {len(reference)} steps "
              f"(cached: {', '.join(f'{x:.4f}' for x in reference)})")


if __name__ == "__main__":
    main()
