"""A steered OpenAI-compatible HTTP server: `unisteer serve --model M --updates DIR`.

Endpoints: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions` (both streaming over SSE and
not), `GET /health`, the steering playground `GET /playground` and `GET /v1/updates/{name}/sweep`
(`serving.playground`: the page is static and open, its data comes from /v1 with the key), and
`GET /metrics`: Prometheus text exposition format, or the JSON counts with
`GET /metrics?format=json` (names and meanings in `serving.metrics`). With an API key set, /v1, /metrics
and the API docs require it; /health stays open (docs/SECURITY.md). Each request may steer with any
loaded updates at its own multipliers (see `serving_protocol` for the two ways to ask); requests with different steering share batches without
affecting each other (see `serving_engine`).

Use from Python:

    model, tokenizer = load_model("smollm2-135m-instruct")
    app = build_app(model, tokenizer, load_updates_dir("updates/", model), ServerConfig())
    with BackgroundServer(app) as server:      # or: serve("smollm2-135m-instruct", "updates/")
        openai.OpenAI(base_url=server.base_url, api_key="-").chat.completions.create(...)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from torch import nn

from ..engine.models import DEFAULT_DTYPE, DTYPE_CHOICES, DTYPE_HELP
from ..engine.storage import load_update
from ..engine.updates import Update
from ..errors import ConfigError, UnisteerError
from .batching import BatchGenerator, GeneratorConfig, QueueFullError, RowEvent, RowJob, ServerClosingError
from .metrics import ENDPOINTS, PROMETHEUS_CONTENT_TYPE, LiveValues, RequestCounters, ServerMetrics
from .playground import add_playground, update_paths
from .protocol import (
    ApiError,
    Choice,
    Limits,
    ParsedRequest,
    PromptRenderer,
    chunk,
    error_body,
    full_response,
    new_response_id,
    now,
    parse_json_body,
    parse_request,
    usage_chunk,
)

_log = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    """Everything about serving besides the model and the updates. Bounds are enforced per request."""

    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str = ""  # the base name clients send as "model"; default: the model's alias/path
    max_batch_size: int = 8  # rows decoded together
    batch_wait_ms: float = 10.0  # how long the worker gathers requests before starting a batch
    max_queue: int = 64  # rows waiting beyond the running batch; more gets HTTP 429
    max_multiplier: float = 100.0  # |m| above this is refused
    max_prompt_tokens: int = 4096
    max_tokens_limit: int = 2048  # the largest max_tokens a request may ask for
    default_max_tokens: int = 256
    default_temperature: float = 1.0  # OpenAI's default; requests send temperature=0 for greedy
    max_choices: int = 8  # n × prompts per request
    max_request_bytes: int = 4 << 20
    shutdown_timeout_s: float = 30.0  # how long in-flight requests may finish after SIGINT/SIGTERM
    log_level: str = "info"
    threads: int = 0  # torch CPU threads for `serve` (0: torch's default); 1 is fastest on a busy small machine
    api_key: str = ""  # clients must send "Authorization: Bearer <key>"; empty: no authentication

    def __post_init__(self) -> None:
        positive = ["max_batch_size", "max_queue", "max_multiplier", "max_prompt_tokens", "max_tokens_limit",
                    "default_max_tokens", "max_choices", "max_request_bytes"]
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"serve: {name} must be positive, got {getattr(self, name)!r}")
        if self.batch_wait_ms < 0 or self.shutdown_timeout_s < 0 or self.threads < 0:
            raise ConfigError("serve: batch_wait_ms, shutdown_timeout_s and threads must not be negative")
        if not 0.0 <= self.default_temperature <= 2.0:
            raise ConfigError(f"serve: default_temperature must be in [0, 2], got {self.default_temperature}")
        if self.max_choices > self.max_queue:
            raise ConfigError(f"serve: max_choices ({self.max_choices}) cannot exceed max_queue ({self.max_queue})")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"serve: port must be in [0, 65535], got {self.port}")

    @property
    def loopback_only(self) -> bool:
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"


# -- updates -------------------------------------------------------------------------------------------------
def load_updates_dir(directory: str | Path | None, model: nn.Module,
                     skipped: dict[str, str] | None = None) -> dict[str, Update]:
    """Every subfolder and `.safetensors` file of `directory` is one update, named by its stem.

    An entry that cannot be loaded (a hand-edited or corrupt file) is skipped with a warning, and recorded in
    `skipped` (name → reason) when given: one bad file does not keep the server from starting.
    """
    if directory is None:
        return {}
    directory = Path(directory)
    if not directory.is_dir():
        raise UnisteerError(f"--updates {directory}: not a folder")
    updates: dict[str, Update] = {}
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") or not (path.is_dir() or path.suffix == ".safetensors"):
            continue
        name = path.name if path.is_dir() else path.stem  # a FIFO x.safetensors is named x too
        if "+" in name or "@" in name:
            raise UnisteerError(f"{path}: update names may not contain '+' or '@' (they separate update terms "
                                "in model names); rename it")
        if name in updates:
            raise UnisteerError(f"{path}: two updates are named {name!r} (a folder and a .safetensors file)")
        try:
            updates[name] = load_update(path, model)
        except UnisteerError as exc:
            _log.warning("skipping update %r: %s", name, exc)
            if skipped is not None:
                skipped[name] = str(exc)
    return updates


# -- the app -------------------------------------------------------------------------------------------------
class ServerState:
    """What the route handlers share: the generator, the limits, the names, the counters."""

    def __init__(self, model: nn.Module, tokenizer, updates: dict[str, Update], config: ServerConfig,
                 skipped_updates: dict[str, str] | None = None):
        self.config = config
        self.skipped_updates = dict(skipped_updates or {})
        self.base_model = config.served_model_name or _default_model_name(model)
        self.updates = updates
        lock = threading.Lock()
        self.renderer = PromptRenderer(tokenizer, lock)
        self.generator = BatchGenerator(
            model, tokenizer, updates,
            GeneratorConfig(max_batch_size=config.max_batch_size, batch_wait_s=config.batch_wait_ms / 1000,
                            max_queue_rows=config.max_queue),
            tokenizer_lock=lock,
        )
        self.limits = Limits(
            max_multiplier=config.max_multiplier,
            max_prompt_tokens=config.max_prompt_tokens,
            max_context_tokens=_context_length(model),
            max_tokens_limit=config.max_tokens_limit,
            default_max_tokens=config.default_max_tokens,
            default_temperature=config.default_temperature,
            max_choices=config.max_choices,
        )
        self.started_at = time.time()
        self.in_flight = 0
        self.telemetry = ServerMetrics(self._live_values, self.started_at)

    @property
    def counters(self) -> RequestCounters:
        return self.telemetry.counters

    def _live_values(self) -> LiveValues:
        return LiveValues(in_flight=self.in_flight, queue_rows=len(self.generator.queue),
                          generator=self.generator.stats.snapshot())

    def model_cards(self) -> list[dict[str, Any]]:
        created = int(self.started_at)
        cards = [{"id": self.base_model, "object": "model", "created": created, "owned_by": "unisteer"}]
        for name, update in sorted(self.updates.items()):
            spec = update.spec
            cards.append({"id": f"{self.base_model}+{name}", "object": "model", "created": created,
                          "owned_by": "unisteer", "parent": self.base_model,
                          "update": {"name": name, "form": spec.form, "layer": spec.layer,
                                     "insertion": spec.insertion, "positions": spec.positions,
                                     "polarity": spec.polarity}})
        return cards

    def metrics(self) -> dict[str, Any]:
        """The JSON of `GET /metrics?format=json`."""
        return self.telemetry.json()

    def end_request(self, request: Request, status: int) -> None:
        """Count an error answer to `request`: as the end of a completion request if `_complete` received it
        (and nothing ended it yet), else as an error of another request."""
        received = getattr(request.state, "unisteer_completion", None)
        if received is None:
            self.telemetry.other_error(status)
        else:
            received.end(self, status)


@dataclass
class _Received:
    """A completion request counted as received; `end` counts how it ended, once (later calls do nothing)."""

    endpoint: str
    started: float
    prompt_tokens: int = 0
    ended: bool = False

    def end(self, state: ServerState, status: int, *, completion_tokens: int = 0) -> None:
        if not self.ended:
            self.ended = True
            state.telemetry.end(self.endpoint, status, self.started, prompt_tokens=self.prompt_tokens,
                                completion_tokens=completion_tokens)


# With an API key, these need it too: the schema pages describe every route and parameter.
_PROTECTED_PATHS = frozenset({"/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


class _BearerAuth:
    """OpenAI-style `Authorization: Bearer <key>` on /v1, /metrics and the API docs when the server has a key.

    A plain ASGI middleware: Starlette's BaseHTTPMiddleware would hide client disconnects from the routes.
    """

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        key = self.state.config.api_key
        path = scope.get("path", "")
        if scope["type"] == "http" and key and (path.startswith("/v1/") or path in _PROTECTED_PATHS):
            header = dict(scope.get("headers", [])).get(b"authorization", b"").decode("latin-1")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
                self.state.telemetry.other_error(401)
                response = JSONResponse(error_body("missing or wrong API key: send 'Authorization: Bearer <key>'",
                                                   "invalid_request_error", code="invalid_api_key"), status_code=401)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(model: nn.Module, tokenizer, updates: dict[str, Update] | None = None,
              config: ServerConfig | None = None, *, skipped_updates: dict[str, str] | None = None,
              update_sources: dict[str, Path] | None = None) -> FastAPI:
    """The FastAPI app. The generator thread starts and stops with the app's lifespan.

    `update_sources` (name → the update's folder) lets the playground find a sweep in an update's folder."""
    state = ServerState(model, tokenizer, updates or {}, config or ServerConfig(), skipped_updates)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.generator.start()
        try:
            yield
        finally:
            # Uvicorn has already let in-flight requests finish (up to its graceful timeout) by now.
            await asyncio.to_thread(state.generator.stop, state.config.shutdown_timeout_s)

    app = FastAPI(title="unisteer", lifespan=lifespan)
    app.state.unisteer = state

    app.add_middleware(_BearerAuth, state=state)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        state.end_request(request, exc.status)
        headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        state.end_request(request, exc.status_code)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(error_body(message, kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not the client's fault: still an OpenAI-style JSON error, and counted.
        _log.exception("unexpected error serving %s %s", request.method, request.url.path)
        state.end_request(request, 500)
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)

    @app.get("/health")
    async def health() -> JSONResponse:
        healthy = state.generator.alive
        body = {"status": "ok" if healthy else "unavailable", "model": state.base_model,
                "updates": sorted(state.updates), "queue_rows": len(state.generator.queue),
                "requests_in_flight": state.in_flight}
        if state.skipped_updates:
            # The reasons name server-side paths; /health is open even with a key, so it then gives names only
            # (the reasons are in the server's log).
            skipped = state.skipped_updates
            body["skipped_updates"] = sorted(skipped) if state.config.api_key else skipped
        if not healthy:
            body["reason"] = state.generator.failure or "the generator is not running"
        return JSONResponse(body, status_code=200 if healthy else 503)

    @app.get("/metrics")
    async def metrics(format: str = "prometheus") -> Response:
        if format == "json":
            return JSONResponse(state.metrics())
        if format != "prometheus":
            raise ApiError(400, f"GET /metrics: format must be 'prometheus' (the default) or 'json', got {format!r}",
                           param="format")
        return Response(state.telemetry.prometheus_text(), media_type=PROMETHEUS_CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": state.model_cards()})

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> JSONResponse:
        for card in state.model_cards():
            if card["id"] == model_id:
                return JSONResponse(card)
        raise ApiError(404, f"model {model_id!r} is not served here", param="model", code="model_not_found")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _complete(state, "chat", request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _complete(state, "completion", request)

    add_playground(app, state, update_sources or {})
    return app


async def _complete(state: ServerState, kind: str, request: Request) -> Response:
    endpoint = ENDPOINTS[kind]
    received = _Received(endpoint, state.telemetry.receive(endpoint))
    request.state.unisteer_completion = received  # so that the error handlers count its end
    try:
        raw = await _read_body(request, state.config.max_request_bytes)
    except _ClientGone:
        received.end(state, _CLIENT_CLOSED_REQUEST)
        return Response(status_code=_CLIENT_CLOSED_REQUEST)
    # Parsing and tokenising take seconds for a large body: in a thread, so that other requests (and /health)
    # are answered meanwhile. The count and size limits are checked before any tokenising.
    parsed = await asyncio.to_thread(_parse, state, kind, raw)
    submission = _Submission(parsed, received)
    try:
        state.generator.submit(submission.rows)
    except QueueFullError as exc:
        raise ApiError(429, str(exc), code="queue_full") from exc
    except ServerClosingError as exc:
        raise ApiError(503, str(exc), code="server_unavailable") from exc
    state.in_flight += 1
    if parsed.stream:
        return StreamingResponse(_stream(state, submission), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        choices = await submission.collect(request)
    except _ClientGone:
        received.end(state, _CLIENT_CLOSED_REQUEST)
        return Response(status_code=_CLIENT_CLOSED_REQUEST)  # nobody reads it; the connection is gone
    finally:
        submission.cancel()
        state.in_flight -= 1
    received.end(state, 200, completion_tokens=sum(c.completion_tokens for c in choices))
    return JSONResponse(full_response(parsed, submission.response_id, submission.created, choices,
                                      submission.prompt_tokens))


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, read chunk by chunk and refused (413) as soon as it passes `limit` bytes, whether or not the
    client declared a Content-Length: a chunked upload is never buffered beyond the limit."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body has {declared} bytes; this server accepts at most {limit}")
    body = bytearray()
    try:
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                raise ApiError(413, f"the request body exceeds {limit} bytes, the most this server accepts")
    except ClientDisconnect as exc:
        raise _ClientGone() from exc
    return bytes(body)


def _parse(state: ServerState, kind: str, raw: bytes) -> ParsedRequest:
    return parse_request(kind, parse_json_body(raw), base_model=state.base_model,
                         update_names=list(state.updates), renderer=state.renderer, limits=state.limits)


_DISCONNECT_POLL_S = 0.5
_CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client closed the connection before the answer"


class _ClientGone(Exception):
    """The client of a non-streaming request disconnected before its answer was ready."""


class _Submission:
    """The rows of one request and the asyncio queue their events arrive on from the worker thread."""

    def __init__(self, parsed: ParsedRequest, received: _Received):
        self.parsed, self.received = parsed, received
        self.response_id = new_response_id(parsed.kind)
        self.created = now()
        self.events: asyncio.Queue[RowEvent] = asyncio.Queue()
        sink = _thread_safe_sink(asyncio.get_running_loop(), self.events)
        multipliers = parsed.multipliers
        self.rows = [RowJob(prompt_ids=prompt, sampling=parsed.sampling, multipliers=multipliers, sink=sink,
                            index=p * parsed.n + j, sample=j, seeded=parsed.seeded, turn_end=parsed.turn_end)
                     for p, prompt in enumerate(parsed.prompts) for j in range(parsed.n)]
        self.prompt_tokens = received.prompt_tokens = sum(len(p) for p in parsed.prompts)

    def cancel(self) -> None:
        """Let the worker drop rows nobody waits for any more (a no-op for finished rows)."""
        for row in self.rows:
            row.cancelled.set()

    async def collect(self, request: Request) -> list[Choice]:
        choices = [Choice(index=row.index) for row in self.rows]
        pending = len(choices)
        checked = time.monotonic()
        while pending:
            # A client that gave up (e.g. its timeout) should not keep a batch slot busy: look at the
            # connection on a clock, whether or not tokens are arriving.
            if time.monotonic() - checked >= _DISCONNECT_POLL_S:
                checked = time.monotonic()
                if await request.is_disconnected():
                    raise _ClientGone()
            try:
                event = await asyncio.wait_for(self.events.get(), timeout=_DISCONNECT_POLL_S)
            except TimeoutError:
                continue
            _raise_row_error(event)
            choice = choices[event.index]
            choice.text += event.text
            if event.finish_reason is not None:
                choice.finish_reason, choice.completion_tokens = event.finish_reason, event.completion_tokens
                pending -= 1
        return choices


def _thread_safe_sink(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> Callable[[RowEvent], None]:
    def deliver(event: RowEvent) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, event)
        except RuntimeError:
            pass  # the event loop is closed (server gone): nobody is left to tell

    return deliver


def _raise_row_error(event: RowEvent) -> None:
    if event.error is not None:
        code = "server_unavailable" if event.error_status == 503 else "generation_failed"
        raise ApiError(event.error_status, event.error, code=code)


async def _stream(state: ServerState, submission: _Submission) -> AsyncIterator[str]:
    parsed, rid, created = submission.parsed, submission.response_id, submission.created
    pending = {row.index for row in submission.rows}
    completion_tokens = 0
    try:
        if parsed.kind == "chat":
            for index in sorted(pending):
                yield _sse(chunk(parsed, rid, created, index, text="", role=True))
        while pending:
            event = await submission.events.get()
            if event.error is not None:
                submission.received.end(state, event.error_status)
                yield _sse(error_body(event.error, "server_error", code="generation_failed"))
                return
            if event.text:
                yield _sse(chunk(parsed, rid, created, event.index, text=event.text))
            if event.finish_reason is not None:
                pending.discard(event.index)
                completion_tokens += event.completion_tokens
                yield _sse(chunk(parsed, rid, created, event.index, finish_reason=event.finish_reason,
                                 text=None if parsed.kind == "chat" else ""))
        if parsed.include_usage:
            yield _sse(usage_chunk(parsed, rid, created, submission.prompt_tokens, completion_tokens))
        yield "data: [DONE]\n\n"
        submission.received.end(state, 200, completion_tokens=completion_tokens)
    finally:
        # Runs on normal end and when the client disconnects (the generator is closed then); a request that
        # ended above is not counted again.
        submission.received.end(state, _CLIENT_CLOSED_REQUEST)
        submission.cancel()
        state.in_flight -= 1


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _default_model_name(model: nn.Module) -> str:
    return str(getattr(model.config, "unisteer_model_id", "") or getattr(model.config, "name_or_path", "")
               or "model")


def _context_length(model: nn.Module) -> int:
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


# -- running -------------------------------------------------------------------------------------------------
class BackgroundServer:
    """Runs an app with uvicorn in a thread on a free local port (for tests, benchmarks, notebooks)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self._socket = _listening_socket(host, port)
        self.host, self.port = self._socket.getsockname()[:2]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on",
                                                    timeout_graceful_shutdown=10))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]},
                                        name="unisteer-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI client's base_url (ends in /v1)."""
        return f"{self.url}/v1"

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise UnisteerError("the HTTP server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(30)
        self._socket.close()


def serve(model_name_or_path: str, updates_dir: str | Path | None = None, *, dtype: str = DEFAULT_DTYPE,
          device: str = "cpu", config: ServerConfig | None = None, device_map: str | dict | None = None,
          offload_folder: str | None = None) -> None:
    """Load the model and updates and serve until SIGINT/SIGTERM (graceful: in-flight requests finish)."""
    import uvicorn

    from ..engine.models import load_model

    config = config or ServerConfig()
    listener = _listening_socket(config.host, config.port)  # fail before the model loads if the port is taken
    if config.threads:
        torch.set_num_threads(config.threads)
    if not config.api_key and not config.loopback_only:
        _log.warning("serving on %s without an API key: anyone who can reach this address can use the model; "
                     "set --api-key or UNISTEER_API_KEY", config.host)
        print(f"warning: listening on {config.host} without --api-key / UNISTEER_API_KEY", file=sys.stderr)
    model, tokenizer = load_model(model_name_or_path, dtype=dtype, device=device, device_map=device_map,
                                  offload_folder=offload_folder)
    skipped: dict[str, str] = {}
    updates = load_updates_dir(updates_dir, model, skipped)
    for name, reason in skipped.items():
        print(f"warning: skipped update {name!r}: {reason}", file=sys.stderr)
    app = build_app(model, tokenizer, updates, config, skipped_updates=skipped,
                    update_sources=update_paths(updates_dir, updates))
    base = app.state.unisteer.base_model
    host, port = listener.getsockname()[:2]
    print(f"unisteer: serving {base!r} with {len(updates)} update(s) at http://{host}:{port}/v1; playground at "
          f"http://{host}:{port}/playground", flush=True)
    for name in sorted(updates):
        print(f"  model {base}+{name}@M  (or body field \"steering\": [{{\"update\": \"{name}\", \"multiplier\": M}}])",
              flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=config.log_level, lifespan="on",
                                           timeout_graceful_shutdown=int(config.shutdown_timeout_s)))
    with listener:
        server.run(sockets=[listener])


def _listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
        listener.listen(2048)  # claim the port now; connections wait in the backlog until the app starts
    except OSError as exc:
        listener.close()
        raise UnisteerError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return listener


# -- command line --------------------------------------------------------------------------------------------
def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `unisteer serve`; pair with `serve_from_args`."""
    defaults = ServerConfig()
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="model alias, local folder or hub id (default: %(default)s)")
    parser.add_argument("--updates", default=None, metavar="DIR",
                        help="folder of saved updates; each subfolder or .safetensors file is one update")
    parser.add_argument("--dtype", default=DEFAULT_DTYPE, choices=DTYPE_CHOICES, help=DTYPE_HELP)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: %(default)s)")
    parser.add_argument("--device-map", default=None,
                        help="spread the model over devices with accelerate instead of --device: 'auto', "
                             "'balanced', or a JSON object of module -> device ('cpu'/'disk' offload)")
    parser.add_argument("--offload-folder", default=None, help="where a --device-map puts 'disk' layers")
    helps = {
        "host": "address to listen on", "port": "port to listen on",
        "served_model_name": "the base model name clients send (empty: the --model value)",
        "max_batch_size": "rows decoded together", "batch_wait_ms": "how long to gather requests into a batch",
        "max_queue": "rows allowed to wait; more get HTTP 429", "max_multiplier": "largest |multiplier| accepted",
        "max_prompt_tokens": "longest prompt accepted", "max_tokens_limit": "largest max_tokens accepted",
        "default_max_tokens": "max_tokens when a request sets none",
        "default_temperature": "temperature when a request sets none (OpenAI: 1.0)",
        "max_choices": "most completions (n x prompts) per request", "max_request_bytes": "largest request body",
        "shutdown_timeout_s": "seconds in-flight requests get to finish on shutdown",
        "log_level": "uvicorn log level",
        "threads": "torch CPU threads (0: torch's default)",
        "api_key": "require 'Authorization: Bearer KEY' on /v1, /metrics and the API docs; visible to other users "
                   "in `ps`, so prefer $UNISTEER_API_KEY or --api-key-file",
    }
    for f in fields(ServerConfig):
        value = getattr(defaults, f.name)
        shown = "" if f.name == "api_key" else " (default: %(default)s)"
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(value), default=value,
                            help=f"{helps[f.name]}{shown}")
    parser.add_argument("--api-key-file", default=None, metavar="FILE",
                        help="read the API key from FILE (its first line) instead of the command line")


def api_key_from(option: str, key_file: str | None, environment: str) -> str:
    """The key from --api-key, else --api-key-file, else $UNISTEER_API_KEY; giving both options is an error."""
    if option and key_file:
        raise ConfigError("serve: give --api-key or --api-key-file, not both")
    if not key_file:
        return option or environment
    path = Path(key_file)
    if not path.is_file():  # also refuses a FIFO, which would block the read
        raise ConfigError(f"--api-key-file {path}: not a file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--api-key-file {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    key = lines[0].strip() if lines else ""
    if not key:
        raise ConfigError(f"--api-key-file {path}: the first line is empty; expected the API key")
    return key


def serve_from_args(args: argparse.Namespace) -> None:
    values = {f.name: getattr(args, f.name) for f in fields(ServerConfig)}
    values["api_key"] = api_key_from(args.api_key, args.api_key_file, os.environ.get("UNISTEER_API_KEY", ""))
    config = ServerConfig(**values)
    from ..engine.models import parse_device_map

    serve(args.model, args.updates, dtype=args.dtype, device=args.device, config=config,
          device_map=parse_device_map(args.device_map), offload_folder=args.offload_folder)
