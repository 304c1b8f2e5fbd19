"""Picking the next token — one way for everything in unisteer that generates text.

Steered generation (`generate_steered`, `unisteer generate`), the server and the model's own answers that
AxBench pairs use as their negative side all decode with these settings and functions, so the same
settings, prompt and seed give the same text everywhere:

- `temperature == 0` is greedy decoding (argmax), as in the OpenAI API; otherwise a token is drawn from
  softmax(logits / temperature) restricted to the nucleus: the most likely tokens until their mass reaches
  `top_p` (the token that crosses it included).
- Every row draws from its own `torch.Generator`, seeded from (seed, the prompt's token ids, the sample
  index), so a row's text does not depend on which rows share its batch, on the multiplier, or on resuming.
- Decoding ends at eos or the chat template's end-of-turn token (`stop_token_ids`); `stop` strings cut the
  text where they first appear (they are not part of the answer).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..config import from_dict
from ..errors import ConfigError


@dataclass(frozen=True)
class SamplingConfig:
    """How one sequence is decoded. The default is greedy."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 42
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, int | float) or \
                not math.isfinite(self.temperature) or self.temperature < 0:
            problems.append(f"temperature must be a finite number >= 0 (0: greedy), got {self.temperature!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, int | float) or not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            problems.append(f"seed must be an integer, got {self.seed!r}")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            problems.append(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if problems:
            raise ConfigError("sampling settings: " + "; ".join(problems))
        object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "sampling") -> SamplingConfig:
        return from_dict(cls, data, where=where)

    def key(self) -> dict[str, Any]:
        """The settings that determine the output (greedy decoding ignores temperature, top_p and seed)."""
        settings = asdict(self)
        settings["stop"] = list(self.stop)
        if self.greedy:
            for name in ("temperature", "top_p", "seed"):
                del settings[name]
        return settings


def row_seed(seed: int, prompt_ids: Sequence[int], sample: int) -> int:
    """The sampling seed of one row: the run seed, the prompt's tokens and the sample index; never the
    multiplier, so every multiplier of a prompt sees the same random numbers (common random numbers)."""
    text = f"{seed}\x00{sample}\x00" + ",".join(str(int(t)) for t in prompt_ids)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "big")


def row_generator(settings: SamplingConfig, prompt_ids: Sequence[int], sample: int, device: torch.device,
                  *, seeded: bool = True) -> torch.Generator | None:
    """The row's random generator (None when greedy); `seeded=False` draws a fresh seed (a server request
    that sent none)."""
    if settings.greedy:
        return None
    seed = row_seed(settings.seed, prompt_ids, sample) if seeded else int.from_bytes(os.urandom(7), "big")
    return torch.Generator(device=device).manual_seed(seed)


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the nucleus: the most likely tokens until their mass reaches `top_p`
    (the token that crosses it included), renormalised."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    keep_sorted = mass_before < top_p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    kept = probs * keep
    return kept / kept.sum(-1, keepdim=True)


def next_tokens(logits: torch.Tensor, settings: Sequence[SamplingConfig],
                generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One next token per row of `logits` [rows, vocab], each row by its own settings and generator."""
    chosen = logits.argmax(dim=-1)
    for row, row_settings in enumerate(settings):
        if row_settings.greedy:
            continue
        probs = torch.softmax(logits[row].float() / row_settings.temperature, dim=-1)
        if row_settings.top_p < 1.0:
            probs = top_p_filter(probs, row_settings.top_p)
        chosen[row] = torch.multinomial(probs, 1, generator=generators[row])[0]
    return chosen


def stop_token_ids(tokenizer: Any, turn_end: str = "", model: Any = None) -> list[int]:
    """Token ids that end an answer: eos (the tokenizer's and the model's generation config's) and the
    template's end-of-turn token (e.g. '<|im_end|>') when it is a special token."""
    ids: set[int] = set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, config_eos):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    if turn_end:
        turn = tokenizer(turn_end, add_special_tokens=False)["input_ids"]
        # Only a special token can mark the end reliably; a plain-text suffix would also stop mid-answer.
        if turn and turn[0] in set(getattr(tokenizer, "all_special_ids", [])):
            ids.add(int(turn[0]))
    return sorted(ids)


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the first stop string (excluded), and whether one was found."""
    positions = [text.find(s) for s in stop if s in text]
    if not positions:
        return text, False
    return text[:min(positions)], True
