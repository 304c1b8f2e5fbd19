"""LLM judge: rubric-scored ratings from any OpenAI-compatible chat endpoint (SPEC §7).

A `Judge` renders each item with a `Rubric` into chat messages, sends them to `<base_url>/chat/completions`
through the `openai` client at temperature 0 with a fixed seed, and parses the final "Rating: [[score]]" line
of the reply.

Robustness choices, each because a long evaluation run must neither crash late nor pay twice:
- bounded retries on 408/409/429/5xx, timeouts and connection errors, done by the `openai` client
  (`max_retries = max_attempts - 1`, its exponential backoff with jitter, honouring the server's
  Retry-After up to the client's own limit); each try's HTTP request is counted (`n_requests`) by an httpx
  event hook on the client's connection pool; after the last try the item scores 0 and is counted as failed (paper: up to 3 tries,
  failure → 0). Other client errors (e.g. 400 prompt too long) fail the item at once;
- authentication errors (401/403) and a missing endpoint or model (404) stop the run at once with a clear
  error, since every further request would fail the same way;
- every successful reply is appended to a JSONL cache as soon as it arrives, keyed by a hash of the request
  (base URL, model, messages, temperature, seed, max_tokens), so an interrupted run resumes for free. Raw
  text is cached, not scores, so a better parser also improves cached answers. Failures are not cached, so
  a later run retries them;
- unparsable replies score 0 and are counted, never raised.

Every `JudgeReport` records the judge model, base URL, rubric, prompt templates (and their hash), seed and
temperature, so results can be reproduced and compared. The API key is never written anywhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import httpx
import openai
from tqdm.auto import tqdm

from ..errors import ConfigError, JudgeAuthError, JudgeError
from ..files import JsonlLog
from .rubrics import AXBENCH_CONCEPT, AXBENCH_FLUENCY, AXBENCH_INSTRUCTION, Rubric, get_rubric, harmonic_mean

ENV_BASE_URL = "UNISTEER_JUDGE_BASE_URL"


ENV_MODEL = "UNISTEER_JUDGE_MODEL"


ENV_API_KEY = "UNISTEER_JUDGE_API_KEY"


ENV_OPENAI_API_KEY = "OPENAI_API_KEY"


ENV_OPENAI_BASE_URL = "OPENAI_BASE_URL"


DEFAULT_BASE_URL = "https://api.openai.com/v1"


DEFAULT_MODEL = "gpt-4.1-mini"  # the paper's judge


ParseStatus = Literal["ok", "unparsable", "failed"]


@dataclass
class JudgeConfig:
    """Judge endpoint and request settings; build from a config section with `unisteer.config.from_dict`.

    `base_url`, `model` and `api_key` left as None are taken from the environment by `resolved()`:
    UNISTEER_JUDGE_BASE_URL (then OPENAI_BASE_URL, then the OpenAI API), UNISTEER_JUDGE_MODEL (then
    gpt-4.1-mini, the paper's judge), UNISTEER_JUDGE_API_KEY (then OPENAI_API_KEY; none is fine for local
    servers). `cache_path` None means `$UNISTEER_CACHE/judge/responses.jsonl`.

    `max_attempts` and `timeout_s` (per try) go to the `openai` client, which also chooses the waits between
    tries. `backoff_initial_s` and `backoff_max_s` are still accepted so that existing configs load, but no
    longer used (a `Judge` warns when they are set).
    """

    base_url: str | None = None
    model: str | None = None
    api_key: str | None = field(default=None, repr=False)  # kept out of reprs and logs
    temperature: float = 0.0
    seed: int | None = 0
    max_tokens: int = 512
    max_attempts: int = 3
    backoff_initial_s: float = 1.0  # unused: the openai client waits between tries
    backoff_max_s: float = 30.0  # unused, like backoff_initial_s
    timeout_s: float = 60.0
    concurrency: int = 8
    cache_path: str | None = None
    use_cache: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.max_attempts < 1:
            problems.append(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.concurrency < 1:
            problems.append(f"concurrency must be >= 1, got {self.concurrency}")
        if self.max_tokens < 1:
            problems.append(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.timeout_s <= 0:
            problems.append(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.backoff_initial_s < 0 or self.backoff_max_s < 0:
            problems.append("backoff_initial_s and backoff_max_s must be >= 0")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0, got {self.temperature}")
        if problems:
            raise ConfigError("judge config: " + "; ".join(problems))

    def resolved(self, env: Mapping[str, str] | None = None) -> JudgeConfig:
        """A copy with endpoint, model and key filled from `env` (default: `os.environ`) where unset."""
        env = os.environ if env is None else env
        base_url = self.base_url or env.get(ENV_BASE_URL) or env.get(ENV_OPENAI_BASE_URL) or DEFAULT_BASE_URL
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"judge base_url {base_url!r} must start with http:// or https:// (e.g. http://127.0.0.1:8000/v1)"
            )
        return dataclasses.replace(
            self,
            base_url=base_url.rstrip("/"),
            model=self.model or env.get(ENV_MODEL) or DEFAULT_MODEL,
            api_key=self.api_key or env.get(ENV_API_KEY) or env.get(ENV_OPENAI_API_KEY) or None,
        )

    def resolved_cache_path(self) -> Path | None:
        if not self.use_cache:
            return None
        if self.cache_path:
            return Path(self.cache_path).expanduser()
        # Imported late: models pulls in torch, which a judge-only run never needs.
        from ..engine.models import cache_dir

        return cache_dir() / "judge" / "responses.jsonl"


def request_key(base_url: str, model: str, messages: Sequence[Mapping[str, str]], temperature: float,
                seed: int | None, max_tokens: int) -> str:
    """Cache key: everything in the request that can change the judge's reply (never the API key)."""
    payload = {
        "base_url": base_url.rstrip("/"),
        "model": model,
        "messages": list(messages),
        "temperature": temperature,
        "seed": seed,
        "max_tokens": max_tokens,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class ResponseCache:
    """Judge replies by request key, in memory and (when `path` is given) appended to a JSONL file.

    One JSON object per line, written with a single append as each reply arrives. A torn last line from an
    interrupted run is skipped on load (and a newline is written before the next record so the torn line
    does not swallow it).
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.skipped_lines = 0
        self._texts: dict[str, str] = {}
        self._lock = threading.Lock()
        if path is not None and path.exists():
            self._load(path)

    def _load(self, path: Path) -> None:
        cache = JsonlLog(path)
        for _, line in cache.lines():
            try:
                record = json.loads(line)
                self._texts[record["key"]] = record["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                self.skipped_lines += 1
        self.skipped_lines += cache.torn_tail

    def __len__(self) -> int:
        return len(self._texts)

    def get(self, key: str) -> str | None:
        with self._lock:
            return self._texts.get(key)

    def put(self, key: str, text: str, *, model: str, base_url: str) -> None:
        record = {
            "key": key,
            "text": text,
            "model": model,
            "base_url": base_url,
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        with self._lock:
            self._texts[key] = text
            if self.path is not None:
                # No fsync: a reply lost to a crash is asked again, and a judge run appends thousands.
                JsonlLog(self.path, fsync=False).append([record])


@dataclass
class JudgeResult:
    """One judged item: its score (0 when unparsable or failed), the judge's raw text and what happened."""

    index: int
    score: int
    status: ParseStatus
    raw_text: str | None
    error: str | None = None
    cached: bool = False
    request_hash: str = ""


@dataclass
class JudgeReport:
    """All items judged with one rubric, with everything needed to reproduce the judgement."""

    rubric: str
    min_score: int
    max_score: int
    judge_model: str
    base_url: str
    temperature: float
    seed: int | None
    max_tokens: int
    system_prompt: str
    prompt_template: str
    prompt_hash: str
    results: list[JudgeResult]
    n_requests: int  # HTTP requests this run sent, retries included
    mean: float = field(init=False)
    n_ok: int = field(init=False)
    n_unparsable: int = field(init=False)
    n_failed: int = field(init=False)
    n_cached: int = field(init=False)

    def __post_init__(self) -> None:
        self.mean = math.fsum(self.scores) / len(self.scores) if self.scores else float("nan")
        self.n_ok = sum(r.status == "ok" for r in self.results)
        self.n_unparsable = sum(r.status == "unparsable" for r in self.results)
        self.n_failed = sum(r.status == "failed" for r in self.results)
        self.n_cached = sum(r.cached for r in self.results)

    @property
    def scores(self) -> list[int]:
        return [r.score for r in self.results]

    def summary(self) -> dict[str, Any]:
        """The report without per-item results and prompt texts: what a results table needs."""
        return {
            "rubric": self.rubric,
            "mean": self.mean,
            "n_items": len(self.results),
            "n_ok": self.n_ok,
            "n_unparsable": self.n_unparsable,
            "n_failed": self.n_failed,
            "n_cached": self.n_cached,
            "n_requests": self.n_requests,
            "judge_model": self.judge_model,
            "base_url": self.base_url,
            "temperature": self.temperature,
            "seed": self.seed,
            "prompt_hash": self.prompt_hash,
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class AxBenchReport:
    """AxBench's three ratings per answer and their harmonic mean (SPEC §7)."""

    concept: JudgeReport
    instruction: JudgeReport
    fluency: JudgeReport
    harmonic_means: list[float] = field(init=False)
    mean_harmonic: float = field(init=False)

    def __post_init__(self) -> None:
        triples = zip(self.concept.scores, self.instruction.scores, self.fluency.scores, strict=True)
        self.harmonic_means = [harmonic_mean(t) for t in triples]
        n = len(self.harmonic_means)
        self.mean_harmonic = math.fsum(self.harmonic_means) / n if n else float("nan")

    def summary(self) -> dict[str, Any]:
        return {
            "mean_concept": self.concept.mean,
            "mean_instruction": self.instruction.mean,
            "mean_fluency": self.fluency.mean,
            "mean_harmonic": self.mean_harmonic,
            "n_items": len(self.harmonic_means),
            "concept": self.concept.summary(),
            "instruction": self.instruction.summary(),
            "fluency": self.fluency.summary(),
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class _Reply:
    text: str | None  # None when every try failed
    error: str | None
    attempts: int


def _reply_text(completion: Any) -> str:
    """The assistant text of a chat completion; raises AttributeError/IndexError/TypeError when malformed."""
    content = completion.choices[0].message.content
    if content is None:  # e.g. a refusal: a real answer that just has no rating in it
        return ""
    if not isinstance(content, str):
        raise TypeError(f"message content is {type(content).__name__}, expected a string")
    return content


class Judge:
    """Scores items with rubrics against one OpenAI-compatible endpoint. Use as a context manager or call
    `close()`; safe to reuse across many `score` calls (the cache and connection pool are shared).

    Requests go through one `openai.OpenAI` client, which retries and waits between tries. `sleep` is no
    longer used (accepted for compatibility; passing it warns).
    """

    def __init__(self, config: JudgeConfig | None = None, *, sleep: Callable[[float], None] | None = None) -> None:
        self.config = (config or JudgeConfig()).resolved()
        self.base_url: str = self.config.base_url or DEFAULT_BASE_URL  # resolved() always sets both
        self.model: str = self.config.model or DEFAULT_MODEL
        self.cache = ResponseCache(self.config.resolved_cache_path())
        if sleep is not None:
            warnings.warn("Judge(sleep=...) is ignored: the openai client waits between retries",
                          DeprecationWarning, stacklevel=2)
        if (self.config.backoff_initial_s, self.config.backoff_max_s) != (JudgeConfig.backoff_initial_s,
                                                                         JudgeConfig.backoff_max_s):
            warnings.warn("judge config: backoff_initial_s and backoff_max_s are no longer used; the openai "
                          "client chooses the waits between tries (honouring Retry-After)",
                          DeprecationWarning, stacklevel=2)
        self._tries = threading.local()  # HTTP requests sent for the item this thread is fetching
        self._http = httpx.Client(
            timeout=httpx.Timeout(self.config.timeout_s),
            limits=httpx.Limits(
                max_connections=self.config.concurrency, max_keepalive_connections=self.config.concurrency
            ),
            event_hooks={"request": [self._on_request]},
        )
        self._client = openai.OpenAI(
            base_url=self.base_url,
            api_key=self.config.api_key or "none",  # the client needs one; _on_request drops a placeholder
            max_retries=self.config.max_attempts - 1,
            timeout=self.config.timeout_s,
            http_client=self._http,
        )
        self._url = f"{self.base_url}/chat/completions"

    def __enter__(self) -> Judge:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()
        self._http.close()

    # -- public ---------------------------------------------------------------------------------------

    def score(self, rubric: str | Rubric, items: Sequence[Mapping[str, Any]], *, desc: str | None = None) -> JudgeReport:
        """Judge every item with `rubric`; items are dicts holding the rubric's fields (extra keys ignored).

        Raises `JudgeAuthError` / `JudgeError` when the endpoint refuses the key or does not exist; any
        other failure only zeroes the items it hits.
        """
        rubric = get_rubric(rubric)
        messages = [rubric.messages(item, where=f"judge item {i}") for i, item in enumerate(items)]
        keys = [self._key(m) for m in messages]
        replies, n_requests, fetched = self._fetch_all(dict(zip(keys, messages, strict=True)),
                                                       desc or f"judge {rubric.name}")
        results = [self._result(i, key, replies[key], rubric, cached=key not in fetched)
                   for i, key in enumerate(keys)]
        return JudgeReport(
            rubric=rubric.name,
            min_score=rubric.min_score,
            max_score=rubric.max_score,
            judge_model=self.model,
            base_url=self.base_url,
            temperature=self.config.temperature,
            seed=self.config.seed,
            max_tokens=self.config.max_tokens,
            system_prompt=rubric.system_prompt,
            prompt_template=rubric.template,
            prompt_hash=rubric.prompt_hash,
            results=results,
            n_requests=n_requests,
        )

    def score_axbench(self, items: Sequence[Mapping[str, Any]]) -> AxBenchReport:
        """AxBench's concept relevance, instruction relevance and fluency for items with `concept`,
        `instruction` and `answer`, and the per-answer harmonic mean."""
        return AxBenchReport(
            concept=self.score(AXBENCH_CONCEPT, items),
            instruction=self.score(AXBENCH_INSTRUCTION, items),
            fluency=self.score(AXBENCH_FLUENCY, items),
        )

    # -- internals ------------------------------------------------------------------------------------

    def _key(self, messages: Sequence[Mapping[str, str]]) -> str:
        return request_key(self.base_url, self.model, messages, self.config.temperature, self.config.seed,
                           self.config.max_tokens)

    def _result(self, index: int, key: str, reply: _Reply, rubric: Rubric, *, cached: bool) -> JudgeResult:
        if reply.text is None:
            return JudgeResult(index=index, score=0, status="failed", raw_text=None, error=reply.error,
                               cached=cached, request_hash=key)
        score = rubric.parse(reply.text)
        status: ParseStatus = "ok" if score is not None else "unparsable"
        return JudgeResult(index=index, score=score or 0, status=status, raw_text=reply.text, cached=cached,
                           request_hash=key)

    def _fetch_all(self, messages_by_key: dict[str, list[dict[str, str]]], desc: str
                   ) -> tuple[dict[str, _Reply], int, set[str]]:
        """Replies for every distinct request (identical requests are sent once), the number of HTTP
        requests sent, and the keys that were not already cached."""
        replies: dict[str, _Reply] = {}
        for key in messages_by_key:
            text = self.cache.get(key)
            if text is not None:
                replies[key] = _Reply(text, None, 0)
        todo = [key for key in messages_by_key if key not in replies]
        stop = threading.Event()  # set on a fatal error so queued requests are not sent
        pool = ThreadPoolExecutor(max_workers=self.config.concurrency, thread_name_prefix="unisteer-judge")
        bar = tqdm(total=len(messages_by_key), initial=len(replies), desc=desc, unit="req",
                   disable=not self.config.progress)
        finished = False
        try:
            futures: dict[Future[_Reply], str] = {
                pool.submit(self._fetch, key, messages_by_key[key], stop): key for key in todo
            }
            for future in as_completed(futures):
                replies[futures[future]] = future.result()
                bar.update(1)
            finished = True
        finally:
            bar.close()
            if not finished:
                # Fatal error or Ctrl-C: drop queued requests; those in flight finish and land in the cache.
                stop.set()
            pool.shutdown(wait=finished, cancel_futures=not finished)
        n_requests = sum(replies[key].attempts for key in todo)
        return replies, n_requests, set(todo)

    def _fetch(self, key: str, messages: list[dict[str, str]], stop: threading.Event) -> _Reply:
        if stop.is_set():
            return _Reply(None, "cancelled", 0)
        try:
            reply = self._request(messages)
        except JudgeError:
            # Set here, in the worker, so it cannot pick up the next queued request before the caller reacts.
            stop.set()
            raise
        if reply.text is not None:
            self.cache.put(key, reply.text, model=self.model, base_url=self.base_url)
        return reply

    def _payload(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": self.config.temperature,
            "max_tokens": self.config.max_tokens,
        }
        if self.config.seed is not None:
            payload["seed"] = self.config.seed
        return payload

    def _on_request(self, request: httpx.Request) -> None:
        """Called by httpx in the sending thread before every try, retries included."""
        self._tries.count = getattr(self._tries, "count", 0) + 1
        if not self.config.api_key:
            request.headers.pop("Authorization", None)  # no key: send none, as a keyless local server expects

    def _request(self, messages: list[dict[str, str]]) -> _Reply:
        """One item's reply; the client retries 408/409/429/5xx, timeouts and connection errors."""
        self._tries.count = 0
        try:
            completion = self._client.chat.completions.create(**self._payload(messages))
        except openai.APIStatusError as exc:
            self._raise_if_fatal(exc)
            error = f"HTTP {exc.status_code}: {_body_excerpt(exc.response)}"  # e.g. 400 prompt too long
        except openai.APITimeoutError:
            error = f"timeout after {self.config.timeout_s:g} s"
        except openai.APIConnectionError as exc:  # connection refused/reset, protocol errors
            cause = exc.__cause__ or exc
            error = f"connection error: {type(cause).__name__}: {cause}"
        except (openai.APIResponseValidationError, json.JSONDecodeError) as exc:
            error = f"malformed response: {type(exc).__name__}: {exc}"
        else:
            try:
                return _Reply(_reply_text(completion), None, self._tries.count)
            except (AttributeError, IndexError, KeyError, TypeError) as exc:
                error = f"malformed response: {type(exc).__name__}: {exc}"
        tries = self._tries.count
        return _Reply(None, f"{error} (after {tries} tries)" if tries > 1 else error, tries)

    def _raise_if_fatal(self, exc: openai.APIStatusError) -> None:
        status, response = exc.status_code, exc.response
        if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
            key_hint = (
                f"set {ENV_API_KEY} (or {ENV_OPENAI_API_KEY}) or api_key in the judge config"
                if not self.config.api_key
                else f"check the key given by {ENV_API_KEY}, {ENV_OPENAI_API_KEY} or the judge config"
            )
            raise JudgeAuthError(
                f"judge endpoint {self._url} refused the request with HTTP {status} "
                f"({_body_excerpt(response)}); {key_hint}"
            ) from None
        if isinstance(exc, openai.NotFoundError):
            raise JudgeError(
                f"judge endpoint {self._url} answered HTTP 404 ({_body_excerpt(response)}); check the base "
                f"URL ({ENV_BASE_URL}, usually ending in /v1) and the model name {self.model!r} ({ENV_MODEL})"
            ) from None


def _body_excerpt(response: httpx.Response, limit: int = 300) -> str:
    text = " ".join(response.text.split())
    return text if len(text) <= limit else text[:limit] + "…"
