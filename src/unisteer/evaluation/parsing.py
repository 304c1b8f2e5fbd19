"""Answers parsed from generated text (yes/no, A/B) and their accuracy by multiplier.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ..data.pairs import PolarityPair
from ..data.readers import answer_meta
from ..data.rendering import PairEncoder
from ..engine.updates import Update
from ..errors import DataError
from ..generation.generate import Generation, generate_steered
from ..generation.sampling import SamplingConfig
from .choices import AccuracyByM, matching_label, not_matching_label, pair_location

_YES_WORDS = {"yes": "yes", "yeah": "yes", "yep": "yes", "yup": "yes", "no": "no", "nope": "no", "nah": "no"}


_MARKUP = str.maketrans("", "", "*_`#>\"“”‘")  # the apostrophe stays: "I'd say no"


_WORD = r"(yes|yeah|yep|yup|no|nope|nah)"


_YES_NO_PATTERNS = (
    # The answer opens with the word: "Yes.", "**No**, I would not", "> yes".
    re.compile(rf"^[\s\W]*{_WORD}\b", re.IGNORECASE),
    # An explicit verdict: "My answer is: No", "Answer: yes", "I would say yes", "I'd say no".
    re.compile(rf"\b(?:answer|response|verdict)\s*(?:is|would be|:|-)?\s*:?\s*{_WORD}\b", re.IGNORECASE),
    re.compile(rf"\b(?:would|'d|will)\s+(?:have to\s+)?say\s+{_WORD}\b", re.IGNORECASE),
)


_LETTER_PATTERNS = (
    re.compile(r"^[\s*_`>\"']*\(?([AB])\)?(?=[\s.,:;)!*_`\"']|$)"),
    re.compile(r"\b(?:answer|choice|option|choose|pick|select)\w*\s*(?:is|would be|:|-)?\s*:?\s*\(([AB])\)"),
    re.compile(r"\b(?:answer|choice|option)\s*(?:is|would be|:|-)?\s*:?\s*([AB])\b"),
)


def parse_yes_no(text: str) -> str | None:
    """"Yes", "No", or None when the answer gives neither clearly.

    Accepted: the answer starts with yes/no (or yeah/yep/yup, nope/nah), ignoring case, markdown and quotes;
    or states a verdict ("my answer is no", "I would say yes"). A yes or no merely mentioned inside the
    text ("I have no opinion") is not taken as the answer.
    """
    cleaned = text.replace("’", "'").translate(_MARKUP).strip()
    for pattern in _YES_NO_PATTERNS:
        match = pattern.search(cleaned)
        if match:
            return "Yes" if _YES_WORDS[match.group(1).lower()] == "yes" else "No"
    return None


def parse_ab(text: str) -> str | None:
    """"A", "B", or None: a leading "(A)", "A)", "A." or "A", or a stated choice ("my answer is (B)")."""
    cleaned = text.strip()
    for pattern in _LETTER_PATTERNS:
        match = pattern.search(cleaned)
        if match:
            return match.group(1)
    return None


def generated_choice_accuracy(generations: Sequence[Generation], pairs: Sequence[PolarityPair]) -> AccuracyByM:
    """Accuracy of parsed generated answers; `generations` come from `generate_steered` on the pairs' prompts
    (in the pairs' order). Unparsable answers count as wrong (see `n_unparsable`, `accuracy_parsed`)."""
    if not generations:
        raise DataError("no generations to score")
    formats = []
    for i, pair in enumerate(pairs):
        meta = pair.meta if "format" in pair.meta else answer_meta(pair.prompt, pair.positive, pair.negative)
        if meta["format"] not in ("yes_no", "ab"):
            raise DataError(f"pair {i} ({pair_location(pair)}): answer format {meta['format']!r} cannot be parsed from text")
        formats.append(meta)
    by_m: dict[float, list[Generation]] = {}
    for g in generations:
        if not 0 <= g.prompt_index < len(pairs) or g.prompt != pairs[g.prompt_index].prompt:
            raise DataError(f"generation of prompt {g.prompt_index} ({g.prompt!r:.60}) does not belong to these "
                            "pairs; generate from [p.prompt for p in pairs] in the same order")
        by_m.setdefault(float(g.multiplier), []).append(g)
    grid = sorted(by_m)
    sizes = {m: len(rows) for m, rows in by_m.items()}
    if len(set(sizes.values())) != 1:
        raise DataError(f"uneven generations per multiplier: {sizes}")
    correct, chosen = [], []
    matching: list[str] = []
    not_matching: list[str] = []
    for m in grid:
        rows = sorted(by_m[m], key=lambda g: (g.prompt_index, g.sample))
        if not matching:
            matching = [matching_label(formats[g.prompt_index]) for g in rows]
            not_matching = [not_matching_label(formats[g.prompt_index]) for g in rows]
        answers = []
        for g in rows:
            meta = formats[g.prompt_index]
            answers.append((parse_yes_no(g.text) if meta["format"] == "yes_no" else parse_ab(g.text), meta))
        chosen.append([a for a, _ in answers])
        correct.append([a is not None and a.lower() == matching_label(meta).lower() for a, meta in answers])
    method = {"parser": "parse_yes_no / parse_ab", "unparsable": "counted as wrong",
              "settings": generations[0].settings, "update_id": generations[0].update_id}
    return AccuracyByM(grid, np.asarray(correct, dtype=bool), chosen, "generation", method,
                       matching=matching, not_matching=not_matching)


def generation_accuracy(model: nn.Module, tokenizer: Any, pairs: Sequence[PolarityPair], update: Update | None,
                        multipliers: Sequence[float] = (0.0,), settings: SamplingConfig | dict | None = None,
                        out_path: str | Path | None = None, *, encoder: PairEncoder | None = None,
                        progress: bool = True) -> tuple[AccuracyByM, list[Generation]]:
    """Generate answers to the pairs' questions (greedy, 32 new tokens unless `settings` say otherwise) at
    every multiplier and score the parsed answers."""
    settings = settings if settings is not None else SamplingConfig(max_new_tokens=32)
    generations = generate_steered(model, tokenizer, [p.prompt for p in pairs], update, multipliers, settings,
                                   out_path, encoder=encoder, progress=progress)
    return generated_choice_accuracy(generations, pairs), generations
