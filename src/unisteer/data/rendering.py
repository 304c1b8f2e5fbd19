"""How a polarity pair becomes model input.

Rendering (`Rendering`, applied by `PairEncoder`) is an explicit, recorded choice: the prompt template (the
chat template's single user turn with the generation prompt, or plain text), an answer-format instruction
appended to the user turn ("Answer with Yes or No."), what happens to a completion's leading whitespace, and
whether the template's end-of-turn suffix follows each completion. Named choices:
`reference` (the paper's code: completions as written, end-of-turn appended) and `natural` (a completion
joins the prompt as the model would write it, no end-of-turn: the completion is the start of the answer).
`unisteer.workflow.choose_rendering` picks one per model and dataset by measurement. The prompt is
tokenised once and the two completions separately (answer, then suffix), so both sides share the prompt's
ids exactly (callers can share a KV cache of the prompt) and the answer tokens are known.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config import from_dict
from ..errors import ConfigError
from .pairs import PolarityPair, Side, check_side

TEMPLATES = ("auto", "chat", "plain")


COMPLETION_SPACES = ("keep", "strip", "join")


@dataclass(frozen=True)
class Rendering:
    """How a polarity pair becomes model input; recorded with every update, sweep and report.

    template: "chat" (the tokenizer's chat template, one user turn plus the generation prompt), "plain"
      (`plain_format`), or "auto" (chat where the tokenizer has a template).
    completion_space: a completion's leading whitespace — "keep" it as the dataset writes it (" Yes"),
      "strip" it, or "join": strip it only after a prompt that already ends in whitespace (a chat template's
      "assistant\n"), so the answer is spelled as the model would write it there.
    end_of_turn: append the template's end-of-turn suffix (eos for plain text) to every completion, so the
      completion is the whole answer; without it the completion is the start of the answer.
    instruction: text appended to the user turn after a blank line (e.g. "Answer with Yes or No."), empty for
      none. It is part of how a pair becomes tokens: a small model asked a yes/no question rarely opens its
      reply with a bare "Yes" unless told to, and then utility at m = 0 measures the model's reluctance to
      answer in format rather than what steering costs. `answer_format_instruction` derives one from a
      dataset's answers.
    """

    template: str = "auto"
    completion_space: str = "join"
    end_of_turn: bool = False
    plain_format: str = "{prompt}"
    name: str = ""
    instruction: str = ""

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise ConfigError(f"rendering.template: {self.template!r} is not one of {TEMPLATES}")
        if self.completion_space not in COMPLETION_SPACES:
            raise ConfigError(f"rendering.completion_space: {self.completion_space!r} is not one of "
                              f"{COMPLETION_SPACES}")
        if not isinstance(self.end_of_turn, bool):
            raise ConfigError(f"rendering.end_of_turn: expected true or false, got {self.end_of_turn!r}")
        if not isinstance(self.plain_format, str) or "{prompt}" not in self.plain_format:
            raise ConfigError(f"rendering.plain_format must contain '{{prompt}}', got {self.plain_format!r}")
        if not isinstance(self.instruction, str) or len(self.instruction) > INSTRUCTION_MAX_CHARS:
            raise ConfigError(f"rendering.instruction: expected text of at most {INSTRUCTION_MAX_CHARS} characters, "
                              f"got {self.instruction!r:.80}")

    @classmethod
    def parse(cls, value: Rendering | str | Mapping[str, Any] | None) -> Rendering:
        """A `Rendering` from a name in `RENDERINGS`, a mapping of its fields, or itself (None: natural)."""
        if value is None:
            return RENDERINGS["natural"]
        if isinstance(value, Rendering):
            return value
        if isinstance(value, str):
            if value not in RENDERINGS:
                raise ConfigError(f"rendering: {value!r} is not one of {sorted(RENDERINGS)} (or a mapping of "
                                  "template / completion_space / end_of_turn / plain_format / instruction)")
            return RENDERINGS[value]
        return from_dict(cls, dict(value), where="rendering")

    def to_dict(self) -> dict[str, Any]:
        described = {"name": self.name, "template": self.template, "completion_space": self.completion_space,
                     "end_of_turn": self.end_of_turn, "plain_format": self.plain_format}
        # Written only when set, so every update, sweep and fingerprint recorded before the field existed
        # still describes (and resumes as) the same rendering.
        if self.instruction:
            described["instruction"] = self.instruction
        return described

    def user_content(self, prompt: str) -> str:
        """The user turn as the model reads it: the prompt, then the instruction after a blank line."""
        return f"{prompt}\n\n{self.instruction}" if self.instruction else prompt

    def same_choice(self, other: Rendering) -> bool:
        """Equal up to the name (a measured choice equals the named rendering it coincides with)."""
        return {**self.to_dict(), "name": ""} == {**other.to_dict(), "name": ""}


INSTRUCTION_MAX_CHARS = 500
# Answers a dataset may draw from for `answer_format_instruction`: a few short, fixed strings.
INSTRUCTION_MAX_OPTIONS = 4
INSTRUCTION_MAX_OPTION_CHARS = 24


def answer_format_instruction(pairs: Iterable[PolarityPair]) -> str:
    """"Answer with Yes or No." when every completion is one of a few short fixed answers; else "".

    Open-ended pairs (long, varied completions) have no answer format to ask for.
    """
    answers: set[str] = set()
    for pair in pairs:
        answers.update((pair.positive.strip(), pair.negative.strip()))
        if len(answers) > INSTRUCTION_MAX_OPTIONS:
            return ""
    if len(answers) < 2 or any(not a or len(a) > INSTRUCTION_MAX_OPTION_CHARS for a in answers):
        return ""
    # Affirmative first, as a question writer would say it ("Yes or No", "True or False", "(A) or (B)").
    ordered = sorted(answers, key=lambda a: (a.lower() not in ("yes", "true"), a))
    listed = ", ".join(ordered[:-1]) + " or " + ordered[-1]
    return f"Answer with {listed}."


RENDERINGS: dict[str, Rendering] = {
    "reference": Rendering(completion_space="keep", end_of_turn=True, name="reference"),
    "natural": Rendering(completion_space="join", end_of_turn=False, name="natural"),
}


@dataclass(frozen=True)
class EncodedPair:
    """Token ids of one pair: the rendered prompt once, each completion (answer, then suffix) separately.

    The full sequence of a side is `prompt_ids + positive_ids` (or `negative_ids`); it is not a
    re-tokenisation of the joined text, so both sides share the prompt's ids exactly. The first
    `positive_answer_length` ids of `positive_ids` are the answer, the rest the end-of-turn suffix (likewise
    for the negative side); None means all of them are answer.
    """

    prompt_ids: list[int]
    positive_ids: list[int]
    negative_ids: list[int]
    meta: dict[str, Any] = field(default_factory=dict)
    truncated: bool = False
    positive_answer_length: int | None = None
    negative_answer_length: int | None = None

    def completion_ids(self, side: Side) -> list[int]:
        check_side(side)
        return self.positive_ids if side == "positive" else self.negative_ids

    def answer_length(self, side: Side) -> int:
        """How many leading completion ids are the answer itself (the rest is the end-of-turn suffix)."""
        check_side(side)
        length = self.positive_answer_length if side == "positive" else self.negative_answer_length
        return len(self.completion_ids(side)) if length is None else length


_PREFIX_PROBES = ("A", "zebra 42", "?", "Hello, world.", "1 + 1 =", "Écrire")


_SENTINEL = "unisteer-end-of-turn-probe"


class PairEncoder:
    """Renders pairs by a `Rendering` and tokenises them; see the module docstring.

    Truncation keeps every sequence (prompt + one completion) within `max_length` tokens: completions are
    kept whole and the prompt loses tokens from the left of its user content, right after the template's
    common prefix (so the template head and the generation prompt survive). Only a completion that alone
    exceeds `max_length - 1` is cut, from its end. Truncated pairs are flagged (`EncodedPair.truncated`)
    and counted (`truncated_count`).
    """

    def __init__(self, tokenizer: Any, rendering: Rendering | str | Mapping[str, Any] | None = None, *,
                 max_length: int = 512) -> None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ConfigError(f"max_length must be an integer of at least 2, got {max_length!r}")
        self.rendering = Rendering.parse(rendering)
        has_template = getattr(tokenizer, "chat_template", None) is not None
        if self.rendering.template == "chat" and not has_template:
            raise ConfigError("rendering.template is 'chat' but the tokenizer has no chat template")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.uses_chat_template = has_template if self.rendering.template == "auto" else \
            self.rendering.template == "chat"
        self.plain_format = self.rendering.plain_format
        # What the template writes after an assistant turn (also what stops generation), whether or not
        # completions are scored with it.
        self.turn_end = self._derive_turn_end()
        self.completion_suffix = self.turn_end if self.rendering.end_of_turn else ""
        self._suffix = self._ids(self.completion_suffix)
        # Every chat prompt ends with the same generation prompt, so whether it ends in whitespace is fixed.
        self._chat_prompt_ends_in_space = self.uses_chat_template and self.render_prompt("x")[-1:].isspace()
        self.common_prefix_length = self._derive_common_prefix_length()
        self.truncated_count = 0

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's pad id, else its eos id: padded positions are always masked, so any id serves."""
        for token_id in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if token_id is not None:
                return int(token_id)
        raise ConfigError("tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")

    def describe(self) -> dict[str, Any]:
        """Rendering settings to record with results (and to key caches of rendered text)."""
        return {"rendering": self.rendering.to_dict(), "chat_template": self.uses_chat_template,
                "max_length": self.max_length, "completion_suffix": self.completion_suffix,
                "turn_end": self.turn_end, "plain_format": None if self.uses_chat_template else self.plain_format,
                "common_prefix_length": self.common_prefix_length}

    def render_prompt(self, prompt: str) -> str:
        content = self.rendering.user_content(prompt)
        if not self.uses_chat_template:
            return self.plain_format.format(prompt=content)
        return self._apply_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def render_answer(self, completion: str, prompt: str = "") -> str:
        """The completion's text as scored, without the end-of-turn suffix."""
        space = self.rendering.completion_space
        if space == "strip" or (space == "join" and self._prompt_ends_in_space(prompt)):
            return completion.lstrip()
        return completion

    def render_completion(self, completion: str, prompt: str = "") -> str:
        return self.render_answer(completion, prompt) + self.completion_suffix

    def encode_prompt(self, prompt: str) -> list[int]:
        # A chat template writes its own special tokens (BOS included); plain text gets the tokenizer's.
        text = self.render_prompt(prompt)
        return list(self.tokenizer(text, add_special_tokens=not self.uses_chat_template)["input_ids"])

    def encode_answer(self, completion: str, prompt: str = "") -> list[int]:
        return self._ids(self.render_answer(completion, prompt))

    def encode_completion(self, completion: str, prompt: str = "") -> list[int]:
        return self.encode_answer(completion, prompt) + self._suffix_ids()

    def encode(self, pair: PolarityPair) -> EncodedPair:
        prompt_ids = self.encode_prompt(pair.prompt)
        answers = [self.encode_answer(pair.positive, pair.prompt), self.encode_answer(pair.negative, pair.prompt)]
        suffix = self._suffix_ids()
        completions = [a + suffix for a in answers]
        limit = self.max_length - 1  # at least one prompt token predicts the first completion token
        truncated = any(len(c) > limit for c in completions)
        completions = [c[:limit] for c in completions]
        budget = self.max_length - max(len(c) for c in completions)
        if len(prompt_ids) > budget:
            prompt_ids = self._truncate_prompt(prompt_ids, budget)
            truncated = True
        if truncated:
            self.truncated_count += 1
        lengths = [min(len(a), len(c)) for a, c in zip(answers, completions, strict=True)]
        return EncodedPair(prompt_ids, completions[0], completions[1], dict(pair.meta), truncated, *lengths)

    def fit_prompt(self, prompt_ids: list[int], room: int) -> list[int]:
        """`prompt_ids` cut as `encode` cuts a prompt (the template's common prefix kept, user content lost from
        its left) so that `room` more tokens fit within `max_length`; counted in `truncated_count` when cut.
        For callers that score a prompt with something other than a pair's completions (choice items)."""
        budget = max(self.max_length - room, 1)
        if len(prompt_ids) <= budget:
            return prompt_ids
        self.truncated_count += 1
        return self._truncate_prompt(prompt_ids, budget)

    def encode_all(self, pairs: Iterable[PolarityPair]) -> list[EncodedPair]:
        return [self.encode(p) for p in pairs]

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def _suffix_ids(self) -> list[int]:
        return list(self._suffix)

    def _prompt_ends_in_space(self, prompt: str) -> bool:
        if self.uses_chat_template:
            return self._chat_prompt_ends_in_space
        rendered = self.render_prompt(prompt)
        return not rendered or rendered[-1].isspace()

    def _truncate_prompt(self, ids: list[int], budget: int) -> list[int]:
        head = self.common_prefix_length
        if budget > head:
            return ids[:head] + ids[len(ids) - (budget - head):]
        return ids[len(ids) - budget:]

    def _apply_template(self, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except TemplateError as exc:
            raise ConfigError(f"the tokenizer's chat template failed to render {messages!r:.120}: {exc}") from exc

    def _derive_turn_end(self) -> str:
        """What the template writes after an assistant message's content (e.g. '<|im_end|>\\n'); else eos."""
        eos = self.tokenizer.eos_token or ""
        if not self.uses_chat_template:
            return eos
        text = self._apply_template([{"role": "user", "content": "Hello"},
                                     {"role": "assistant", "content": _SENTINEL}], add_generation_prompt=False)
        at = text.rfind(_SENTINEL)
        suffix = text[at + len(_SENTINEL):] if at >= 0 else ""
        return suffix if suffix else eos

    def _derive_common_prefix_length(self) -> int:
        """Tokens shared by every rendered prompt (template head, e.g. system turn + '<|im_start|>user\\n')."""
        rendered = [self.encode_prompt(p) for p in _PREFIX_PROBES]
        length = 0
        for column in zip(*rendered, strict=False):
            if len(set(column)) > 1:
                break
            length += 1
        return min(length, *(len(r) for r in rendered))
