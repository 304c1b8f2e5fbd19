"""The OpenAI side of the server: request validation, steering selection, and response/chunk shapes.

Everything a client can get wrong is checked here and reported as an `ApiError`, which the app turns into
OpenAI-style error JSON: `{"error": {"message", "type", "param", "code"}}`.

Steering is chosen per request in either (or both) of two ways:
- an extra body field `"steering": [{"update": "NAME", "multiplier": 4.0}, ...]`;
- the model name `BASE+NAME@M+NAME2@M2` (`@M` may be left out for m = 1), for clients that cannot send
  extra fields. Multipliers written in a model name cannot use a `+` exponent (write 100, not 1e+2).
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jinja2

from ..data.rendering import PairEncoder
from ..errors import ConfigError, UnisteerError
from ..generation.sampling import SamplingConfig

_log = logging.getLogger(__name__)

MAX_STOP_SEQUENCES = 4
CHAT_ROLES = {"system", "developer", "user", "assistant", "tool"}

# Parameters this server does not implement: rejected unless they hold the value that means "off".
_UNSUPPORTED_UNLESS = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
}


class ApiError(UnisteerError):
    """A request the server refuses, with the HTTP status and OpenAI error fields to report."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 error_type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type or _default_error_type(status)

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, param=self.param, code=self.code)


def error_body(message: str, error_type: str, *, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def _default_error_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    if status == 404:
        return "not_found_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


@dataclass(frozen=True)
class SteeringTerm:
    update: str
    multiplier: float


@dataclass(frozen=True)
class Limits:
    """Bounds the server enforces on every request."""

    max_multiplier: float
    max_prompt_tokens: int
    max_context_tokens: int
    max_tokens_limit: int
    default_max_tokens: int
    default_temperature: float
    max_choices: int


@dataclass
class ParsedRequest:
    """A validated completion request: token prompts, sampling, steering, and how to answer."""

    kind: str  # "chat" or "completion"
    model: str  # the model name as the client sent it, echoed back
    prompts: list[list[int]]
    sampling: SamplingConfig
    n: int
    steering: list[SteeringTerm]
    stream: bool
    include_usage: bool
    seeded: bool = False  # the request sent a seed
    turn_end: str = ""  # what ends an assistant turn of the chat template (chat requests); stops the rows

    @property
    def multipliers(self) -> dict[str, float]:
        return {term.update: term.multiplier for term in self.steering if term.multiplier != 0}


class PromptRenderer:
    """Turns chat messages or completion prompts into token ids, under the lock shared with the worker.

    `turn_end` is what the chat template writes after an assistant turn (the tokenizer's eos text without a
    template), derived as `generate` derives it (`PairEncoder.turn_end`): chat rows stop at it as well as eos.
    """

    def __init__(self, tokenizer, lock: threading.Lock):
        self.tokenizer = tokenizer
        self.lock = lock
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        try:
            self.turn_end = PairEncoder(tokenizer).turn_end
        except ConfigError as exc:  # a template that refuses the probe conversation: chat stops at eos only
            _log.warning("no end-of-turn token for chat requests (they stop at eos only): %s", exc)
            self.turn_end = ""

    def chat(self, messages: list[dict[str, str]]) -> list[int]:
        with self.lock:
            if self.has_chat_template:
                try:
                    text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                except jinja2.TemplateError as exc:
                    # Templates reject some conversations themselves (e.g. roles that do not alternate).
                    raise ApiError(400, f"the model's chat template refused these messages: {exc}",
                                   param="messages") from exc
                return self.tokenizer(text, add_special_tokens=False).input_ids
            # No template: the plain concatenation of the turns (SPEC §2's rule for template-less models).
            text = "\n".join(m["content"] for m in messages)
            return self.tokenizer(text).input_ids

    def text(self, prompt: str) -> list[int]:
        with self.lock:
            return self.tokenizer(prompt).input_ids


# -- parsing -------------------------------------------------------------------------------------------------
_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)


def parse_json_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from exc
    except RecursionError:
        raise ApiError(400, "the request body nests JSON too deeply", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {_json_type(body)}", code="invalid_json")
    _reject_lone_surrogates(body)
    return body


def _reject_lone_surrogates(body: dict[str, Any]) -> None:
    """JSON may escape half a UTF-16 pair (`"\\ud800"`); such a string cannot be tokenised or even written back
    as UTF-8 (an error message echoing it would fail), so the whole request is refused here, once."""
    stack: list[Any] = [body]
    while stack:  # iterative: the parser accepted the nesting, a recursive walk might not
        item = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError as exc:
                    raise ApiError(400, f"the request body holds a lone UTF-16 surrogate "
                                        f"({ascii(item[exc.start])}); send valid Unicode text",
                                   code="invalid_json") from None
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def parse_request(kind: str, body: dict[str, Any], *, base_model: str, update_names: Sequence[str],
                  renderer: PromptRenderer, limits: Limits) -> ParsedRequest:
    _reject_unsupported(body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required: the served model name, optionally with +UPDATE@M terms",
                       param="model")
    steering = parse_model_name(model, base_model, update_names, limits.max_multiplier)
    steering += parse_steering_field(body.get("steering"), update_names, limits.max_multiplier)
    _reject_duplicates(steering)
    n = _integer(body, "n", default=1, low=1, high=limits.max_choices)
    # Counted before anything is tokenised: 200 000 one-word prompts would otherwise hold the tokenizer for
    # seconds only to be refused afterwards.
    count = 1 if kind == "chat" else _prompt_count(body.get("prompt"))
    if n * count > limits.max_choices:
        raise ApiError(400, f"{count} prompts x n={n} asks for {n * count} completions; this "
                            f"server allows at most {limits.max_choices} per request", param="n")
    if kind == "chat":
        prompts = [renderer.chat(parse_messages(body.get("messages")))]
    else:
        prompts = parse_completion_prompt(body.get("prompt"), renderer)
    sampling, seeded = parse_sampling(body, kind, prompts, limits)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"'stream' must be true or false, got {_json_type(stream)}", param="stream")
    include_usage = _include_usage(body.get("stream_options"), stream)
    return ParsedRequest(kind=kind, model=model, prompts=prompts, sampling=sampling, n=n, steering=steering,
                         stream=stream, include_usage=include_usage, seeded=seeded,
                         turn_end=renderer.turn_end if kind == "chat" else "")


def parse_model_name(model: str, base_model: str, update_names: Sequence[str],
                     max_multiplier: float) -> list[SteeringTerm]:
    if model == base_model:
        return []
    if not model.startswith(base_model + "+"):
        raise ApiError(404, f"model {model!r} is not served here; use {base_model!r}, optionally followed by "
                            f"+UPDATE@MULTIPLIER terms (see GET /v1/models)", param="model", code="model_not_found")
    terms = []
    for part in model[len(base_model) + 1:].split("+"):
        name, has_at, m_text = part.partition("@")
        where = f"model term {part!r}"
        if name not in update_names:
            raise ApiError(404, f"{where}: unknown update {name!r}; loaded updates: {sorted(update_names)}",
                           param="model", code="model_not_found")
        multiplier = 1.0
        if has_at:
            # float() also takes "1_0" (= 10) and full-width digits; a model name takes plain decimals only.
            if m_text.lower().lstrip("+-") in ("nan", "inf", "infinity"):
                raise ApiError(400, f"{where}: multiplier must be finite, got {m_text!r}", param="model",
                               code="invalid_multiplier")
            if not _DECIMAL.fullmatch(m_text):
                raise ApiError(400, f"{where}: multiplier {m_text!r} is not a plain decimal number (like 1.5, "
                                    "-2 or 1e-1)", param="model", code="invalid_multiplier")
            multiplier = float(m_text)
        terms.append(SteeringTerm(name, check_multiplier(multiplier, where, max_multiplier, param="model")))
    return terms


def parse_steering_field(value: Any, update_names: Sequence[str], max_multiplier: float) -> list[SteeringTerm]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ApiError(400, "'steering' must be a list of {\"update\": NAME, \"multiplier\": NUMBER} objects, got "
                            f"{_json_type(value)}", param="steering")
    terms = []
    for i, item in enumerate(value):
        where = f"steering[{i}]"
        if not isinstance(item, dict):
            raise ApiError(400, f"{where}: expected an object, got {_json_type(item)}", param=where)
        unknown = sorted(set(item) - {"update", "multiplier"})
        if unknown:
            raise ApiError(400, f"{where}: unknown key(s) {unknown}; allowed: update, multiplier", param=where)
        name = item.get("update")
        if not isinstance(name, str):
            raise ApiError(400, f"{where}.update: expected an update name, got {_json_type(name)}",
                           param=f"{where}.update")
        if name not in update_names:
            raise ApiError(400, f"{where}.update: unknown update {name!r}; loaded updates: {sorted(update_names)}",
                           param=f"{where}.update", code="update_not_found")
        if "multiplier" not in item:
            raise ApiError(400, f"{where}.multiplier is required", param=f"{where}.multiplier")
        multiplier = check_multiplier(item["multiplier"], where, max_multiplier, param=f"{where}.multiplier")
        terms.append(SteeringTerm(name, multiplier))
    return terms


def check_multiplier(value: Any, where: str, bound: float, *, param: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"{where}: multiplier must be a number, got {_json_type(value)}", param=param,
                       code="invalid_multiplier")
    if not math.isfinite(value):
        raise ApiError(400, f"{where}: multiplier must be finite, got {value}", param=param,
                       code="invalid_multiplier")
    if abs(value) > bound:
        raise ApiError(400, f"{where}: multiplier {value} is beyond this server's bound of ±{bound:g} "
                            "(--max-multiplier)", param=param, code="invalid_multiplier")
    return float(value)


def _reject_duplicates(terms: Sequence[SteeringTerm]) -> None:
    seen: set[str] = set()
    for term in terms:
        if term.update in seen:
            raise ApiError(400, f"update {term.update!r} is named twice (model name and/or 'steering'); name "
                                "each update once with its total multiplier", param="steering")
        seen.add(term.update)


def parse_messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    messages = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{where}: expected an object, got {_json_type(message)}", param=where)
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise ApiError(400, f"{where}.role: expected one of {sorted(CHAT_ROLES)}, got {role!r}",
                           param=f"{where}.role")
        content = _message_text(message.get("content"), f"{where}.content", allow_none=role == "assistant")
        messages.append({"role": "system" if role == "developer" else role, "content": content})
    return messages


def _message_text(content: Any, where: str, *, allow_none: bool) -> str:
    if content is None and allow_none:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"{where}[{j}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) are "
                                    "supported", param=where)
            texts.append(part["text"])
        return "".join(texts)
    raise ApiError(400, f"{where}: expected a string or a list of text parts, got {_json_type(content)}",
                   param=where)


def parse_completion_prompt(value: Any, renderer: PromptRenderer) -> list[list[int]]:
    """A string, a list of strings, a list of token ids, or a list of token-id lists."""
    if isinstance(value, str):
        return [_non_empty(renderer.text(value), "prompt")]
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value):
            return [_non_empty(renderer.text(p), f"prompt[{i}]") for i, p in enumerate(value)]
        if all(_is_token_id(t) for t in value):
            return [_checked_ids(value, renderer, "prompt")]
        if all(isinstance(p, list) and p and all(_is_token_id(t) for t in p) for p in value):
            return [_checked_ids(p, renderer, f"prompt[{i}]") for i, p in enumerate(value)]
    raise ApiError(400, "'prompt' must be a non-empty string, a list of strings, a list of token ids, or a list "
                        "of token-id lists", param="prompt")


def _prompt_count(value: Any) -> int:
    """How many prompts `parse_completion_prompt` would return, without tokenising (1 for a malformed value,
    which it then refuses)."""
    if isinstance(value, list) and value and all(isinstance(p, str | list) for p in value):
        return len(value)
    return 1


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _checked_ids(ids: list[int], renderer: PromptRenderer, where: str) -> list[int]:
    vocab = len(renderer.tokenizer)
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ApiError(400, f"{where}: token id(s) {bad[:5]} outside the vocabulary [0, {vocab})", param="prompt")
    return list(ids)


def _non_empty(ids: list[int], where: str) -> list[int]:
    if not ids:
        raise ApiError(400, f"{where}: the prompt is empty (0 tokens)", param="prompt")
    return ids


def parse_sampling(body: dict[str, Any], kind: str, prompts: list[list[int]], limits: Limits
                   ) -> tuple[SamplingConfig, bool]:
    """The request's sampling settings, and whether it sent a seed."""
    longest = max(len(p) for p in prompts)
    if longest > limits.max_prompt_tokens:
        raise ApiError(400, f"the prompt has {longest} tokens; this server accepts at most "
                            f"{limits.max_prompt_tokens} (--max-prompt-tokens)", param="messages" if kind == "chat"
                       else "prompt", code="context_length_exceeded")
    room = limits.max_context_tokens - longest
    if room < 1:
        raise ApiError(400, f"the prompt has {longest} tokens, which fills the model's context of "
                            f"{limits.max_context_tokens}", param="prompt", code="context_length_exceeded")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    requested = _integer(body, key, default=None, low=1, high=limits.max_tokens_limit)
    if requested is not None and requested > room:
        raise ApiError(400, f"{key}={requested} plus the prompt's {longest} tokens exceeds the model's context of "
                            f"{limits.max_context_tokens} tokens", param=key, code="context_length_exceeded")
    max_tokens = requested if requested is not None else min(limits.default_max_tokens, room)
    temperature = _number(body, "temperature", limits.default_temperature, low=0.0, high=2.0)
    top_p = _number(body, "top_p", 1.0, low=0.0, high=1.0)
    if top_p == 0.0:
        raise ApiError(400, "'top_p' must be greater than 0", param="top_p")
    seed = _integer(body, "seed", default=None, low=-(1 << 63), high=(1 << 63) - 1)
    settings = SamplingConfig(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                stop=_stop_sequences(body.get("stop")), seed=0 if seed is None else seed)
    return settings, seed is not None


def _stop_sequences(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if (not isinstance(value, list) or len(value) > MAX_STOP_SEQUENCES
            or not all(isinstance(s, str) and s for s in value)):
        raise ApiError(400, f"'stop' must be a non-empty string or a list of up to {MAX_STOP_SEQUENCES} non-empty "
                            "strings", param="stop")
    return tuple(value)


def _include_usage(value: Any, stream: bool) -> bool:
    if value is None:
        return False
    if not isinstance(value, dict) or not isinstance(value.get("include_usage", False), bool):
        raise ApiError(400, "'stream_options' must be an object like {\"include_usage\": true}",
                       param="stream_options")
    if not stream:
        raise ApiError(400, "'stream_options' is only allowed with stream=true", param="stream_options")
    return value.get("include_usage", False)


def _reject_unsupported(body: dict[str, Any]) -> None:
    for name, off_values in _UNSUPPORTED_UNLESS.items():
        if name in body and not any(body[name] == off and type(body[name]) is type(off) for off in off_values):
            raise ApiError(400, f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise ApiError(400, "'response_format' other than {\"type\": \"text\"} is not supported by this server",
                       param="response_format", code="unsupported_parameter")


def _integer(body: dict[str, Any], key: str, *, default: int | None, low: int, high: int) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"'{key}' must be an integer, got {_json_type(value)}", param=key)
    if not low <= value <= high:
        raise ApiError(400, f"'{key}' must be between {low} and {high}, got {value}", param=key)
    return value


def _number(body: dict[str, Any], key: str, default: float, *, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"'{key}' must be a finite number, got {_json_type(value)}", param=key)
    if not low <= value <= high:
        raise ApiError(400, f"'{key}' must be between {low:g} and {high:g}, got {value}", param=key)
    return float(value)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


# -- responses -----------------------------------------------------------------------------------------------
@dataclass
class Choice:
    index: int
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0


def new_response_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def steering_echo(request: ParsedRequest) -> list[dict[str, Any]]:
    return [{"update": t.update, "multiplier": t.multiplier} for t in request.steering]


def full_response(request: ParsedRequest, response_id: str, created: int, choices: list[Choice],
                  prompt_tokens: int) -> dict[str, Any]:
    if request.kind == "chat":
        shaped = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                   "finish_reason": c.finish_reason, "logprobs": None} for c in choices]
        obj = "chat.completion"
    else:
        shaped = [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
                  for c in choices]
        obj = "text_completion"
    return {"id": response_id, "object": obj, "created": created, "model": request.model, "choices": shaped,
            "usage": usage(prompt_tokens, sum(c.completion_tokens for c in choices)),
            "system_fingerprint": None, "steering": steering_echo(request)}


def chunk(request: ParsedRequest, response_id: str, created: int, index: int, *, text: str | None = None,
          finish_reason: str | None = None, role: bool = False) -> dict[str, Any]:
    if request.kind == "chat":
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        obj = "text_completion"
    return {"id": response_id, "object": obj, "created": created, "model": request.model, "choices": [choice]}


def usage_chunk(request: ParsedRequest, response_id: str, created: int, prompt_tokens: int,
                completion_tokens: int) -> dict[str, Any]:
    obj = "chat.completion.chunk" if request.kind == "chat" else "text_completion"
    return {"id": response_id, "object": obj, "created": created, "model": request.model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def now() -> int:
    return int(time.time())
