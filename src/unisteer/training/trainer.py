"""The trainer: SPLIT, SFT, RePS and DPO/BiPO for every update form.

Reference semantics (SPEC §5), each an option of `TrainConfig`:
- An epoch shuffles the pairs (seeded) and cuts them into batches of `batch_size` pairs. Each pair becomes
  one preference example per pair type — `add` = (A_p wins, A_n loses, factor +s), `sub` = (A_n wins, A_p
  loses, factor −s), `random` = one of the two by a coin flip (BiPO) — ordered pair by pair, then cut into
  minibatches of `batch_size` examples. The factor s is drawn from the form's factor set independently for
  every sequence (winning and losing alike) unless `share_factor`.
- The loss of a minibatch is the objective on token-weighted minibatch means (`unisteer.training.objectives`); the
  minibatch losses of `grad_accum` batches are averaged into one AdamW step (weight decay 0) on the update's
  fp32 parameters, with gradient clipping at `max_grad_norm` and a linear decay without warm-up. Dropout of
  the update is on during training only.
- Vectors act at positions after the chat template's common prefix during training (all positions at
  inference: the saved spec says `all`); LoRA / local weight act on all positions.
- RePS for vectors: the `sub` direction projects the positive component out (`objectives.ProjectingVector`).

Outputs: `OUT/update` (the trained update), `OUT/metrics.jsonl` (a line per step, written as training goes),
`OUT/checkpoint/` (safetensors + JSON, `training.checkpoint`) and `OUT/summary.json`; a resumed run ends
with the same parameters as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import to_dict
from ..data.pairs import PairDataset
from ..data.rendering import PairEncoder
from ..engine.architecture import model_structure
from ..engine.devices import input_device
from ..engine.scoring import (
    CompletionScores,
)
from ..engine.steering import Steering
from ..engine.storage import save_update
from ..engine.updates import Update, create_update, eval_mode
from ..errors import DataError, TrainingError, UnisteerError
from ..files import RunLock
from .checkpoint import (
    STATE,
    load_checkpoint,
    restore_training_state,
    save_checkpoint,
    training_state,
)
from .config import TrainConfig
from .objectives import OBJECTIVES, LossTerms, ObjectiveInputs, ProjectingVector
from .run_folder import RunFolder
from .sequences import (
    TrainingExample,
    encoder_for,
    preference_rows,
    prepare_training_data,
)

log = logging.getLogger(__name__)












def _jsonable(value: Any) -> Any:
    """JSON for the few non-JSON values a config or scheduler holds (tuples become lists anyway)."""
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint")


@dataclass
class TrainResult:
    """The trained update (eval mode), where it was saved, the training summary and the step metrics."""

    update: Update
    path: Path
    summary: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)


def train_update(model: nn.Module, tokenizer: Any, train: PairDataset, config: TrainConfig, *, out_dir: str | Path,
                 dev: PairDataset | None = None, resume: bool = False, progress: bool = True, overwrite: bool = False,
                 split_record: dict[str, Any] | None = None, encoder: PairEncoder | None = None,
                 callback: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train an update on `train` with `config`; write metrics, checkpoints and the final update to `out_dir`.

    `out_dir/update` (the engine's format, `spec.training` = the summary), `out_dir/metrics.jsonl` (one line
    per optimizer step, written as training goes), `out_dir/checkpoint/` (every `checkpoint_every` steps
    and at epoch ends; removed once the update is saved), `out_dir/summary.json`. `resume=True` continues
    from the checkpoint and ends with the same parameters as an uninterrupted run. An existing final update
    is never replaced unless `overwrite=True`. `callback` gets every step's metrics.
    """
    trainer = _Trainer(model, tokenizer, train, config, out_dir=Path(out_dir), dev=dev, resume=resume,
                       progress=progress, overwrite=overwrite, split_record=split_record, encoder=encoder,
                       callback=callback)
    return trainer.run()


def _checkpoint_position(where: Path, state: dict[str, Any], epochs: int, steps_per_epoch: int
                         ) -> tuple[int, int, int]:
    """(step, epoch, next_group) of a checkpoint, checked against the run: an edited `epoch: 99` would
    otherwise skip the remaining epochs and save a partly trained update as finished."""
    position = []
    for key in ("step", "epoch", "next_group"):
        value = state.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise TrainingError(f"{where}: {key}: expected a non-negative integer, got {value!r}")
        position.append(value)
    step, epoch, group = position
    if (epoch > epochs or group >= steps_per_epoch or (epoch == epochs and group)
            or step != epoch * steps_per_epoch + group):
        raise TrainingError(f"{where}: step {step}, epoch {epoch}, next_group {group} do not fit this run "
                            f"({epochs} epoch(s) of {steps_per_epoch} step(s); step = epoch x {steps_per_epoch} + "
                            "next_group): the checkpoint was edited or belongs to another run; start over with "
                            "overwrite=True")
    return step, epoch, group


class _Trainer:
    def __init__(self, model, tokenizer, train, config, *, out_dir, dev, resume, progress, overwrite, split_record,
                 encoder, callback):
        structure = model_structure(model)
        self.model, self.train_data, self.dev_data = model, train, dev
        self.config = config.resolved(structure.num_layers)
        self.out_dir, self.resume, self.progress, self.overwrite = out_dir, resume, progress, overwrite
        self.split_record, self.callback = split_record, callback
        self.encoder = encoder or encoder_for(tokenizer, self.config.max_length, self.config.rendering)
        self.device = input_device(model)
        self.folder = RunFolder(out_dir)
        if not isinstance(train, PairDataset):
            raise DataError(f"train: expected a PairDataset, got {type(train).__name__}")
        if not len(train):
            raise DataError(f"{train.name}: no training pairs")

    def _create_update(self) -> None:
        cfg = self.config
        self.update = create_update(self.model, cfg.form, cfg.layer, insertion=cfg.insertion, rank=cfg.rank,
                                    dropout=cfg.dropout, positions="all", seed=cfg.seed,
                                    name=f"{cfg.objective}-{cfg.form}-L{cfg.layer}")
        self.projecting = cfg.objective == "reps" and cfg.form == "vector"
        self.applied: Update = ProjectingVector(self.update) if self.projecting else self.update
        self.train_steering = Steering(self.model, self.applied, multiplier=0.0, positions=self.data.train_positions)
        self.eval_steering = Steering(self.model, self.update, multiplier=0.0, positions="all")
        params = [p for p in self.update.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.batches_per_epoch = math.ceil(self.data.n_pairs / cfg.batch_size)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.grad_accum)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        total, warmup = self.total_steps, cfg.warmup_steps

        def schedule(step: int) -> float:  # transformers' "linear" schedule
            if step < warmup:
                return step / max(1, warmup)
            return max(0.0, (total - step) / max(1, total - warmup))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)

    # -- examples ------------------------------------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.config.seed * 1000 + epoch)
        return torch.randperm(self.data.n_pairs, generator=generator).tolist()

    def _examples(self, pairs: Sequence[int]) -> list[TrainingExample]:
        cfg, rng = self.config, self.factor_rng
        examples = []
        for pair in pairs:
            for kind in cfg.pair_types:
                direction = (1 if kind == "add" else -1) if kind != "random" else rng.choice((1, -1))
                win = rng.choice(cfg.factors)
                lose = win if cfg.share_factor else rng.choice(cfg.factors)
                project = self.projecting and direction < 0
                examples.append(TrainingExample(pair, direction, direction * win, direction * lose, project))
        return examples

    def _batch_loss(self, examples: list[TrainingExample]) -> list[LossTerms]:
        """One forward over every sequence of the batch (winning then losing rows); a loss per minibatch."""
        sequences = [e.win_sequence for e in examples] + [e.lose_sequence for e in examples]
        multipliers = torch.tensor([e.win_multiplier for e in examples] + [e.lose_multiplier for e in examples],
                                   dtype=torch.float32)
        if self.projecting:
            self.applied.project_rows = torch.tensor([e.project for e in examples] * 2)
        scores = self.data.scorer.scores(sequences, self.train_steering, multipliers, after_prefix=self.data.after_prefix)
        n = len(examples)
        terms = []
        for start in range(0, n, self.config.batch_size):
            win_rows = list(range(start, min(start + self.config.batch_size, n)))
            lose_rows = [n + r for r in win_rows]
            terms.append(self._objective(scores, win_rows, lose_rows, [sequences[r] for r in win_rows],
                                         [sequences[r] for r in lose_rows]))
        return terms

    def _objective(self, scores: CompletionScores, win_rows: list[int], lose_rows: list[int],
                   win_sequences: list[int], lose_sequences: list[int]) -> LossTerms:
        objective = OBJECTIVES[self.config.objective]
        device = scores.nll_sum.device
        inputs = ObjectiveInputs(CompletionScores(scores.nll_sum[win_rows], scores.n_tokens[win_rows]),
                                 CompletionScores(scores.nll_sum[lose_rows], scores.n_tokens[lose_rows]))
        if objective.needs_reference:
            inputs.ref_win = self.data.ref_logp[win_sequences].to(device)
            inputs.ref_lose = self.data.ref_logp[lose_sequences].to(device)
            inputs.win_sequence_lengths = torch.tensor([float(len(self.data.sequences.ids[s])) for s in win_sequences],
                                                       device=device)
            inputs.lose_sequence_lengths = torch.tensor([float(len(self.data.sequences.ids[s])) for s in lose_sequences],
                                                        device=device)
        return objective.loss(inputs, self.config)

    # -- evaluation ----------------------------------------------------------------------------------------
    def _evaluate(self, unsteered: dict[str, float] | None = None) -> list[dict[str, float]] | None:
        """Preference and NLLs at −m, 0, +m; the m = 0 row (the frozen base model) is reused when given."""
        if not self.data.eval_pairs:
            return None
        m = self.config.eval_multiplier
        with eval_mode(self.update):
            multipliers = [-m, m] if unsteered is not None else [-m, 0.0, m]
            rows = preference_rows(self.data.eval_scorer, self.eval_steering, self.data.eval_pairs, multipliers,
                                    self.config.cache_batch_size)
        return rows if unsteered is None else [rows[0], unsteered, rows[1]]

    # -- checkpoints ---------------------------------------------------------------------------------------
    def _save_checkpoint(self, step: int, epoch: int, next_group: int) -> None:
        tensors, state = training_state(self.update, self.optimizer, self.scheduler, self.factor_rng, self.device)
        state.update({"step": step, "epoch": epoch, "next_group": next_group, "config": to_dict(self.config),
                      "data_hash": self.data_hash, "elapsed_s": self._elapsed(), "eval_before": self.eval_before})
        save_checkpoint(self.folder.checkpoint, tensors, json.loads(json.dumps(state, default=_jsonable)))

    def _load_checkpoint(self) -> tuple[int, int, int]:
        path = self.folder.checkpoint
        try:
            tensors, state = load_checkpoint(path)
        except UnisteerError as exc:
            raise TrainingError(str(exc)) from exc
        saved = state.get("config", {})
        if not isinstance(saved, dict):
            raise TrainingError(f"{path / STATE}: config: expected an object of TrainConfig fields, got "
                                f"{type(saved).__name__}")
        current = json.loads(json.dumps(to_dict(self.config), default=_jsonable))
        # A field added since the checkpoint was written counts as its default there.
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
        changed = sorted(k for k in set(saved) | set(current) if saved.get(k, defaults.get(k)) != current.get(k)
                         and k not in ("checkpoint_every",))
        if changed:
            raise TrainingError(f"{path}: the checkpoint was written with a different config ({', '.join(changed)} "
                                "differ); resume with the same config or start over with overwrite=True")
        if state.get("data_hash") != self.data_hash:
            raise TrainingError(f"{path}: the checkpoint was trained on different data (hash "
                                f"{state.get('data_hash')!r}, now {self.data_hash!r})")
        step, epoch, next_group = _checkpoint_position(path / STATE, state, self.config.epochs,
                                                       self.steps_per_epoch)
        try:
            restore_training_state(tensors, state, self.update, self.optimizer, self.scheduler, self.factor_rng,
                                   self.device)
            self.elapsed_before = float(state.get("elapsed_s", 0.0))
        except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as exc:
            # What a hand-edited state.json breaks inside torch's and random's own loaders.
            raise TrainingError(f"{path / STATE}: the checkpoint does not restore ({type(exc).__name__}: {exc}); "
                                "start over with overwrite=True") from exc
        self.eval_before = state.get("eval_before")
        self.folder.truncate_metrics(step)
        return step, epoch, next_group

    def _elapsed(self) -> float:
        return self.elapsed_before + (time.perf_counter() - self.started)

    # -- the loop ------------------------------------------------------------------------------------------
    def setup(self, cache_dir: Path) -> None:
        """Seeded state, encoded data, caches, the fresh update, optimizer and schedule (under a forked RNG)."""
        torch.manual_seed(self.config.seed)
        self.started, self.elapsed_before = time.perf_counter(), 0.0
        self.data = prepare_training_data(self.model, self.encoder, self.train_data, self.dev_data, self.config,
                                          cache_dir, progress=self.progress)
        self._create_update()
        self.factor_rng = random.Random(self.config.seed)
        self.eval_before = None

    def epoch_groups(self, epoch: int) -> list[list[list[int]]]:
        """The epoch's optimizer steps: `grad_accum` batches of `batch_size` pair indices each."""
        cfg = self.config
        order = self._epoch_order(epoch)
        batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        return [batches[i:i + cfg.grad_accum] for i in range(0, len(batches), cfg.grad_accum)]

    def run(self) -> TrainResult:
        # Two trainings into one folder would log every step twice and leave a stale checkpoint: one at a time.
        with RunLock(self.out_dir):
            return self._run_locked()

    def _run_locked(self) -> TrainResult:
        self.folder.prepare(resume=self.resume, overwrite=self.overwrite)
        self.data_hash = self.train_data.hash()
        devices = [self.device] if self.device.type == "cuda" else []
        cache_dir = self.folder.new_cache_dir()
        try:
            with torch.random.fork_rng(devices=devices):
                self.setup(cache_dir)
                start = (0, 0, 0)
                if self.resume:
                    start = self._load_checkpoint()
                if self.eval_before is None:
                    self.eval_before = self._evaluate()
                metrics = self._loop(*start)
                eval_after = self._evaluate(self.eval_before[1] if self.eval_before else None)
                return self._finish(metrics, eval_after)
        finally:
            shutil.rmtree(cache_dir, ignore_errors=True)

    def _loop(self, step: int, start_epoch: int, start_group: int) -> list[dict[str, Any]]:
        cfg = self.config
        metrics: list[dict[str, Any]] = []
        self.update.train()
        bar = tqdm(total=self.total_steps, initial=step, disable=not self.progress,
                   desc=f"{cfg.objective}-{cfg.form} L{cfg.layer}")
        try:
            for epoch in range(start_epoch, cfg.epochs):
                groups = self.epoch_groups(epoch)
                for group_index in range(start_group if epoch == start_epoch else 0, len(groups)):
                    record = self.step(groups[group_index], step, epoch)
                    step += 1
                    metrics.append(record)
                    self.folder.log(record)
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", margin=f"{record['margin']:+.3f}",
                                    win=f"{record['win_nll']:.3f}", lose=f"{record['lose_nll']:.3f}")
                    last_of_epoch = group_index == len(groups) - 1
                    if step % cfg.checkpoint_every == 0 or last_of_epoch:
                        next_epoch, next_group = (epoch + 1, 0) if last_of_epoch else (epoch, group_index + 1)
                        self._save_checkpoint(step, next_epoch, next_group)
                    if self.callback is not None:
                        self.callback(record)
        finally:
            bar.close()
        self.update.eval()
        return metrics

    def step(self, group: list[list[int]], step: int, epoch: int) -> dict[str, Any]:
        """One optimizer step over `group` (its batches' gradients accumulated); returns the step's metrics."""
        cfg = self.config
        examples = [self._examples(batch) for batch in group]
        n_minibatches = sum(math.ceil(len(e) / cfg.batch_size) for e in examples)
        lr = self.optimizer.param_groups[0]["lr"]
        collected: list[LossTerms] = []
        for batch_examples in examples:
            terms = self._batch_loss(batch_examples)
            loss = torch.stack([t.loss for t in terms]).sum() / n_minibatches
            if not torch.isfinite(loss):
                self._diverged(step, epoch, f"loss is {float(loss.detach())}")
            loss.backward()
            collected += terms
        params = [p for p in self.update.parameters() if p.requires_grad]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        if not math.isfinite(grad_norm):
            self._diverged(step, epoch, f"gradient norm is {grad_norm}")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

        def mean(values: list[torch.Tensor]) -> float:
            return float(torch.stack(values).float().mean())

        record = {"kind": "step", "step": step + 1, "epoch": epoch, "lr": lr, "grad_norm": grad_norm,
                  "loss": mean([t.loss.detach() for t in collected]),
                  "win_nll": mean([t.win_nll for t in collected]), "lose_nll": mean([t.lose_nll for t in collected]),
                  "margin": mean([t.margin for t in collected]), "time_s": round(self._elapsed(), 3)}
        for key in collected[0].extra:
            record[key] = mean([t.extra[key] for t in collected])
        return record

    def _diverged(self, step: int, epoch: int, what: str) -> None:
        checkpoint = self.folder.checkpoint
        where = f"the checkpoint {checkpoint} holds the last good state" if checkpoint.exists() else "no checkpoint"
        raise TrainingError(f"training stopped at step {step + 1} (epoch {epoch}): {what}; {where}. Lower lr "
                            f"(now {self.config.lr}) or the factor range, or check the data.")

    def _finish(self, metrics: list[dict[str, Any]], eval_after: list[dict[str, float]] | None) -> TrainResult:
        cfg = self.config
        steps = self.folder.steps()
        last_epoch = [r for r in steps if r["epoch"] == cfg.epochs - 1] or steps
        keys = ("loss", "win_nll", "lose_nll", "margin")
        final = {k: sum(r[k] for r in last_epoch) / len(last_epoch) for k in keys} if last_epoch else {}
        summary = {
            "objective": cfg.objective, "form": cfg.form, "layer": cfg.layer, "config": to_dict(cfg),
            "data": {**self.train_data.provenance(), "truncated_pairs": self.data.truncated},
            "split": self.split_record, "encoder": self.encoder.describe(),
            "train_positions": str(self.data.train_positions), "steps": len(steps), "epochs": cfg.epochs,
            "time_s": round(self._elapsed(), 2), "final": final, "last_step": steps[-1] if steps else None,
            "eval": {"set": self.data.eval_name, "pairs": len(self.data.eval_pairs), "before": self.eval_before,
                     "after": eval_after},
            "cache": self.data.cache_record, "model_dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
        }
        self.update.spec.training = summary
        self.update.spec.positions = "all"
        path = save_update(self.update, self.folder.update, overwrite=self.overwrite)
        self.folder.finish(summary)
        self.update.eval()
        return TrainResult(self.update, path, summary, steps)
