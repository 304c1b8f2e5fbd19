"""The generation side of the server: a bounded row queue and one worker thread that owns the model.

Every choice of every request is one *row*. The worker takes up to `max_batch_size` waiting rows at once
(after gathering for a few milliseconds) and decodes them together in one KV-cached loop:

- Rows may ask for different steering. All updates named by any row are attached once, each with a per-row
  multiplier tensor that is 0 for rows that do not use it (m = 0 leaves a row's hidden states untouched,
  bit for bit), so a plain row and a steered row can share a forward pass without leaking into each other.
- Rows may ask for different sampling settings: temperature, top-p and seed are applied per row, so every
  row is compatible with every other and one batch serves them all.
- A row leaves the batch as soon as it stops (eos, or for a chat row the template's end-of-turn token, as
  `generate` stops; a stop string, max_tokens, client gone); the cache, masks, multipliers and prompt lengths
  are narrowed to the rows still running.

Text is streamed to each request through a callback (`RowJob.sink`) that the HTTP layer makes thread-safe.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..engine.devices import input_device
from ..engine.hf_compat import (
    cache_is_joinable,
    cache_kwargs,
    drop_leading_columns,
    join_left_padded,
    new_cache,
    select_rows,
)
from ..engine.steering import Steering
from ..engine.updates import Update
from ..errors import UnisteerError
from ..generation.sampling import SamplingConfig, next_tokens, row_generator, stop_token_ids

_log = logging.getLogger(__name__)

# Prompt tokens decoded in front of the generated ones, so that the first generated token gets the
# leading space (or merge) it would have in context.
_DETOKENIZE_CONTEXT = 5


@dataclass(frozen=True)
class RowEvent:
    """What the worker reports about one row: new text, and at the end a finish reason or an error."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None
    error_status: int = 500


@dataclass
class RowJob:
    """One sequence to generate: a prompt, how to sample, which updates at which multipliers.

    `sample` is the row's index among the choices of its prompt (its sampling seed depends on it);
    `seeded` is False when the request sent no seed (the row then draws a fresh one). `turn_end` is the chat
    template's end-of-turn text for a prompt rendered with it ("" for raw text): with eos it decides which
    tokens stop the row (`generation.sampling.stop_token_ids`, the rule `generate` follows).
    """

    prompt_ids: list[int]
    sampling: SamplingConfig
    multipliers: dict[str, float]  # update name -> multiplier; names absent here get m = 0
    sink: Callable[[RowEvent], None]
    index: int = 0
    sample: int = 0
    seeded: bool = True
    turn_end: str = ""
    cancelled: threading.Event = field(default_factory=threading.Event)


class QueueFullError(Exception):
    """The waiting queue cannot take the rows of another request."""


class ServerClosingError(Exception):
    """The generator is shutting down and takes no more rows."""


class RowQueue:
    """A bounded FIFO of rows; a request's rows enter together or not at all."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._rows: deque[RowJob] = deque()
        self._changed = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        with self._changed:
            return len(self._rows)

    def put_all(self, rows: Sequence[RowJob]) -> None:
        with self._changed:
            if self._closed:
                raise ServerClosingError("the server is shutting down")
            if len(self._rows) + len(rows) > self.capacity:
                raise QueueFullError(
                    f"the request queue is full ({len(self._rows)} of {self.capacity} rows waiting); retry later"
                )
            self._rows.extend(rows)
            self._changed.notify_all()

    def take_batch(self, max_rows: int, gather_s: float, idle_s: float) -> list[RowJob]:
        """Wait up to `idle_s` for a first row, then up to `gather_s` for more; return at most `max_rows`."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._rows or self._closed, timeout=idle_s):
                return []
            deadline = time.monotonic() + gather_s
            while len(self._rows) < max_rows and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._changed.wait(timeout=remaining):
                    break
            return self.take_waiting(max_rows)

    def take_waiting(self, max_rows: int) -> list[RowJob]:
        """Up to `max_rows` rows that are waiting now, without blocking."""
        with self._changed:
            taken: list[RowJob] = []
            while self._rows and len(taken) < max_rows:
                row = self._rows.popleft()
                if not row.cancelled.is_set():
                    taken.append(row)
            return taken

    def close(self) -> list[RowJob]:
        """Refuse new rows and hand back the ones still waiting."""
        with self._changed:
            self._closed = True
            waiting = list(self._rows)
            self._rows.clear()
            self._changed.notify_all()
            return waiting


class StreamingText:
    """Turns generated token ids into text deltas, cut at the first stop string.

    Decodes a sliding window of ids (the vLLM scheme) so each step costs O(1), holds back text while it ends
    in an incomplete UTF-8 sequence, and holds back any tail that could still grow into a stop string, so a
    stop string never reaches a streaming client.
    """

    def __init__(self, tokenizer, prompt_ids: Sequence[int], stop: Sequence[str] = ()):
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-_DETOKENIZE_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stop = tuple(s for s in stop if s)
        self.text = ""  # all decoded completion text so far (cut at a stop string once one is found)
        self.sent = 0  # how much of `text` has been handed out
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Take one token; return the text that is now safe to send (maybe empty)."""
        self._ids.append(token_id)
        self.text += self._decode_new()
        if self._stop:
            cut = _first_stop(self.text, self._stop, search_from=max(0, self.sent - _longest(self._stop)))
            if cut is not None:
                self.text = self.text[:cut]
                self.stopped = True
                return self._take(len(self.text))
            return self._take(len(self.text) - _stop_prefix_tail(self.text, self._stop))
        return self._take(len(self.text))

    def flush(self) -> str:
        """All text not yet sent (at the end of generation, a held-back partial stop string is real text)."""
        if not self.stopped:
            rest = self._decode(self._ids[self._prefix_offset:])
            already = self._decode(self._ids[self._prefix_offset:self._read_offset])
            self.text += rest[len(already):]
        return self._take(len(self.text))

    def _decode_new(self) -> str:
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            return full[len(prefix):]
        return ""

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def _take(self, end: int) -> str:
        end = max(end, self.sent)
        chunk = self.text[self.sent:end]
        self.sent = end
        return chunk


def _longest(stops: Sequence[str]) -> int:
    return max(len(s) for s in stops)


def _first_stop(text: str, stops: Sequence[str], search_from: int) -> int | None:
    found = [i for i in (text.find(s, search_from) for s in stops) if i >= 0]
    return min(found) if found else None


def _stop_prefix_tail(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:size]):
                best = size
                break
    return best


@dataclass
class GeneratorStats:
    """Counters the worker updates; read through `snapshot()`."""

    batches: int = 0
    rows: int = 0
    largest_batch: int = 0
    completion_tokens: int = 0
    busy_s: float = 0.0
    recent: deque = field(default_factory=lambda: deque(maxlen=100_000))  # (time, tokens) per decode step

    def add_rows(self, rows: int, batch_size: int) -> None:
        self.rows += rows
        self.largest_batch = max(self.largest_batch, batch_size)

    def add_step(self, tokens: int, seconds: float) -> None:
        self.completion_tokens += tokens
        self.busy_s += seconds
        self.recent.append((time.monotonic(), tokens))

    def snapshot(self, window_s: float = 60.0) -> dict[str, float]:
        now = time.monotonic()
        recent_tokens = sum(tokens for at, tokens in list(self.recent) if now - at <= window_s)
        return {
            "batches": self.batches,
            "rows": self.rows,
            "mean_batch_size": self.rows / self.batches if self.batches else 0.0,
            "largest_batch": self.largest_batch,
            "completion_tokens": self.completion_tokens,
            "busy_seconds": round(self.busy_s, 3),
            "tokens_per_second_busy": round(self.completion_tokens / self.busy_s, 2) if self.busy_s else 0.0,
            f"tokens_per_second_last_{int(window_s)}s": round(recent_tokens / window_s, 2),
        }


@dataclass(frozen=True)
class GeneratorConfig:
    max_batch_size: int = 8
    batch_wait_s: float = 0.01
    max_queue_rows: int = 64


class BatchGenerator:
    """Owns the model in one worker thread and serves rows from a bounded queue in batches."""

    def __init__(self, model: nn.Module, tokenizer, updates: dict[str, Update], config: GeneratorConfig,
                 tokenizer_lock: threading.Lock | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.updates = updates
        self.config = config
        self.queue = RowQueue(config.max_queue_rows)
        self.stats = GeneratorStats()
        self.tokenizer_lock = tokenizer_lock or threading.Lock()
        self.device = input_device(model)
        self._stop_ids: dict[str, frozenset[int]] = {}  # a row's turn end -> the ids that stop it
        self.pad_id = _pad_token_id(model, tokenizer)
        self.accepts_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._stop_requested = threading.Event()
        self._thread: threading.Thread | None = None
        self.failure: str | None = None  # set when the worker died; the server then reports unhealthy

    def stop_ids(self, turn_end: str) -> frozenset[int]:
        """The token ids that end a row: eos, plus the end-of-turn token of a chat row (`stop_token_ids`)."""
        if turn_end not in self._stop_ids:
            with self.tokenizer_lock:
                self._stop_ids[turn_end] = frozenset(stop_token_ids(self.tokenizer, turn_end, self.model))
        return self._stop_ids[turn_end]

    # -- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="unisteer-generator", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Refuse new rows, fail the waiting ones, let the running batch see the stop and end, join."""
        for row in self.queue.close():
            row.sink(RowEvent(row.index, error="the server is shutting down", error_status=503))
        self._stop_requested.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def stopping(self) -> bool:
        return self._stop_requested.is_set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop_requested.is_set()

    def submit(self, rows: Sequence[RowJob]) -> None:
        if not self.alive:
            raise ServerClosingError(self.failure or "the generator is not running")
        self.queue.put_all(rows)

    # -- worker --------------------------------------------------------------------------------------------
    def _work(self) -> None:
        try:
            while not self._stop_requested.is_set():
                batch = self.queue.take_batch(self.config.max_batch_size, self.config.batch_wait_s, idle_s=0.2)
                if batch:
                    self._serve_batch(batch)
        except BaseException as exc:
            # Record why the worker died (health turns 503) and re-raise: this is not handled, only reported.
            self.failure = f"the generator stopped: {type(exc).__name__}: {exc}"
            _log.exception("generator worker died")
            for row in self.queue.close():
                row.sink(RowEvent(row.index, error=self.failure, error_status=503))
            raise

    def _serve_batch(self, rows: list[RowJob]) -> None:
        self.stats.batches += 1
        run = _BatchRun(self, rows)
        try:
            run.decode()
        except (RuntimeError, ValueError, IndexError, UnisteerError) as exc:
            # torch reports out-of-memory and shape problems as these; fail this batch, keep serving.
            _log.exception("generation failed for a batch of %d rows", len(rows))
            run.fail_unfinished(f"generation failed: {type(exc).__name__}: {exc}")
        finally:
            run.fail_unfinished("generation ended without a result")

    def steering_for(self, rows: Sequence[RowJob]) -> Steering | None:
        """One Steering with every update any row names, each with a per-row multiplier (0 elsewhere)."""
        names = sorted({name for row in rows for name, m in row.multipliers.items() if m != 0})
        if not names:
            return None
        multipliers = [torch.tensor([row.multipliers.get(name, 0.0) for row in rows], dtype=torch.float32,
                                    device=self.device) for name in names]
        return Steering(self.model, [self.updates[name] for name in names], multiplier=multipliers)


class _RowState:
    def __init__(self, job: RowJob, tokenizer, device: torch.device, stop_ids: frozenset[int]):
        self.job = job
        self.stop_ids = stop_ids
        self.text = StreamingText(tokenizer, job.prompt_ids, job.sampling.stop)
        self.generator = row_generator(job.sampling, job.prompt_ids, job.sample, device, seeded=job.seeded)
        self.prompt_length = len(job.prompt_ids)
        self.generated = 0
        self.finished = False

    def finish(self, reason: str) -> None:
        tail = self.text.flush()
        if tail:
            self.job.sink(RowEvent(self.job.index, text=tail))
        self.job.sink(RowEvent(self.job.index, finish_reason=reason, completion_tokens=self.generated))
        self.finished = True

    def fail(self, message: str, status: int = 500) -> None:
        self.job.sink(RowEvent(self.job.index, error=message, error_status=status))
        self.finished = True


@dataclass
class _Live:
    """The rows being decoded and their shared KV cache, attention mask and pending next-token logits."""

    states: list[_RowState]
    cache: Any  # a transformers KV cache (see hf_compat)
    mask: torch.Tensor  # [rows, cached + pending tokens], left-padded
    logits: torch.Tensor  # [rows, vocab]: each row's next token is chosen from these


class _BatchRun:
    """One KV-cached decode loop. Rows leave when they stop; rows waiting in the queue join between steps
    (prefilled on their own, then left-padded into the shared cache) where the cache layout allows it."""

    def __init__(self, owner: BatchGenerator, rows: list[RowJob]):
        self.owner = owner
        self.states: list[_RowState] = []  # every row this run has served
        self.first_rows = rows
        self._steering: Steering | None = None
        self._clock = time.monotonic()  # start of the work not yet counted in the stats

    def fail_unfinished(self, message: str) -> None:
        for state in self.states:
            if not state.finished:
                state.fail(message)

    def decode(self) -> None:
        try:
            with torch.inference_mode():
                live = self._prefill(self.first_rows)
                while True:
                    live = self._admit_waiting(live)
                    # A row whose steering overflowed fails alone; the others in the batch go on unaffected.
                    finite = torch.isfinite(live.logits).all(dim=-1)
                    logits = live.logits if bool(finite.all()) else live.logits.masked_fill(~finite[:, None], 0.0)
                    chosen = next_tokens(logits, [s.job.sampling for s in live.states],
                                         [s.generator for s in live.states])
                    keep, produced = self._advance(live.states, chosen.tolist(), finite.tolist())
                    self._count_step(produced)
                    if not keep:
                        return
                    if len(keep) < len(live.states):
                        index = torch.tensor(keep, device=self.owner.device)
                        live, chosen = self._narrowed(live, index), chosen[index]
                    live = self._stepped(live, chosen)
        finally:
            self._detach()

    # -- steps ---------------------------------------------------------------------------------------------
    def _prefill(self, rows: list[RowJob]) -> _Live:
        states = [_RowState(row, self.owner.tokenizer, self.owner.device, self.owner.stop_ids(row.turn_end))
                  for row in rows]
        self.states += states
        input_ids, mask = _left_padded([s.job.prompt_ids for s in states], self.owner.pad_id, self.owner.device)
        self._resteer(states)
        model = self.owner.model
        cache = new_cache(model)
        extra = {"logits_to_keep": 1} if self.owner.accepts_logits_to_keep else {}
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    **cache_kwargs(model, cache), **extra)
        self.owner.stats.add_rows(len(states), len(states))
        return _Live(states, cache, mask, out.logits[:, -1, :])

    def _stepped(self, live: _Live, tokens: torch.Tensor) -> _Live:
        mask = torch.cat([live.mask, live.mask.new_ones(live.mask.shape[0], 1)], dim=1)
        positions = mask.sum(-1, keepdim=True) - 1
        model = self.owner.model
        out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions, use_cache=True,
                    **cache_kwargs(model, live.cache))
        return _Live(live.states, live.cache, mask, out.logits[:, -1, :])

    def _narrowed(self, live: _Live, index: torch.Tensor) -> _Live:
        select_rows(live.cache, index)
        mask = live.mask[index]
        if cache_is_joinable(live.cache):
            # Columns that are padding in every remaining row (a long row left) are dropped from the cache.
            padding = int((mask.cumsum(-1) == 0).sum(-1).min())
            if padding:
                mask = mask[:, padding:]
                drop_leading_columns(live.cache, padding)
        states = [live.states[i] for i in index.tolist()]
        self._resteer(states)
        return _Live(states, live.cache, mask, live.logits[index])

    def _admit_waiting(self, live: _Live) -> _Live:
        room = self.owner.config.max_batch_size - len(live.states)
        if room <= 0 or not cache_is_joinable(live.cache) or self.owner.stopping:
            return live
        rows = self.owner.queue.take_waiting(room)
        if not rows:
            return live
        newcomers = self._prefill(rows)
        if not cache_is_joinable(newcomers.cache):
            raise RuntimeError("the prefill cache of joining rows has an unexpected layout")
        width = max(live.mask.shape[1], newcomers.mask.shape[1])
        join_left_padded(live.cache, newcomers.cache, width)
        mask = torch.cat([_pad_left(live.mask, width), _pad_left(newcomers.mask, width)])
        states = live.states + newcomers.states
        self._resteer(states)
        self.owner.stats.add_rows(0, len(states))
        return _Live(states, live.cache, mask, torch.cat([live.logits, newcomers.logits]))

    def _count_step(self, tokens: int) -> None:
        now = time.monotonic()
        self.owner.stats.add_step(tokens, now - self._clock)
        self._clock = now

    # -- steering ------------------------------------------------------------------------------------------
    def _resteer(self, states: list[_RowState]) -> None:
        """Attach one Steering for exactly these rows (cheap: well under a millisecond)."""
        self._detach()
        steering = self.owner.steering_for([s.job for s in states])
        if steering is not None:
            steering.set_prompt_lengths([s.prompt_length for s in states])
            self._steering = steering.attach()

    def _detach(self) -> None:
        if self._steering is not None:
            self._steering.remove()
            self._steering = None

    def _advance(self, active: list[_RowState], tokens: list[int], finite: list[bool]) -> tuple[list[int], int]:
        """Hand each row its token; return the positions (in `active`) of rows that go on, and the tokens used."""
        keep = []
        produced = 0
        with self.owner.tokenizer_lock:
            for position, (state, token, ok) in enumerate(zip(active, tokens, finite, strict=True)):
                if state.job.cancelled.is_set() or self.owner.stopping:
                    state.fail("the request was cancelled" if state.job.cancelled.is_set()
                               else "the server is shutting down", status=503)
                    continue
                if not ok:
                    state.fail("the steered model's logits became NaN or infinite for this request's updates and "
                               "multipliers; try a smaller multiplier")
                    continue
                state.generated += 1
                produced += 1
                if token in state.stop_ids:
                    state.finish("stop")
                    continue
                delta = state.text.add(token)
                if delta:
                    state.job.sink(RowEvent(state.job.index, text=delta))
                if state.text.stopped:
                    state.finish("stop")
                elif state.generated >= state.job.sampling.max_new_tokens:
                    state.finish("length")
                else:
                    keep.append(position)
        return keep, produced


def _pad_left(mask: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad a 2-D attention mask on the left to `width` columns."""
    return torch.nn.functional.pad(mask, [width - mask.shape[1], 0])


def _left_padded(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device):
    longest = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, longest - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, longest - len(prompt):] = 1
    return input_ids.to(device), mask.to(device)


def _pad_token_id(model: nn.Module, tokenizer) -> int:
    # Padding is always masked out, so any valid id works; prefer the tokenizer's own pad token.
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, getattr(model.config, "pad_token_id", None)):
        if isinstance(value, int):
            return value
    return 0
