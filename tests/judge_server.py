"""A small, real OpenAI-compatible chat-completions server on 127.0.0.1 for the judge tests.

It answers `POST /v1/chat/completions` deterministically from directives in the last user message, so a
test knows the expected score without a mocked function anywhere between the judge and the socket:

- `<<score=N>>`      reply with a short explanation and "Rating: [[N]]"
- `<<reply=TEXT>>`   reply with TEXT verbatim (TEXT runs to the closing `>>`)
- `<<status=NNN>>`   always answer HTTP NNN (for failures that survive every retry)
- nothing            reply "I am not sure." (unparsable)

Test controls: `fail_next(n, status, retry_after)` makes the next n requests fail, `hang_next(n, seconds)`
makes them stall (for client timeouts), `delay_s` holds every request (for concurrency), `api_key` requires
"Authorization: Bearer <key>", and `rule` replaces the directive parser. It records each request body, its
headers and arrival time (`time.monotonic()`), the request count and the most requests in flight at once.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Messages = list[dict[str, str]]

_SCORE = re.compile(r"<<score=(-?\d+(?:\.\d+)?)>>")
_REPLY = re.compile(r"<<reply=(.*?)>>", re.DOTALL)
_STATUS = re.compile(r"<<status=(\d{3})>>")


def last_user_message(messages: Messages) -> str:
    return next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")


def directive_rule(messages: Messages) -> str:
    text = last_user_message(messages)
    if match := _REPLY.search(text):
        return match.group(1)
    if match := _SCORE.search(text):
        return f"The answer matches the rubric's description for this score.\nRating: [[{match.group(1)}]]"
    return "I am not sure."


class JudgeServer:
    """Start with `with JudgeServer() as server:`; `server.base_url` ends in /v1 like OpenAI's."""

    def __init__(self, *, api_key: str | None = None, delay_s: float = 0.0,
                 rule: Callable[[Messages], str] = directive_rule) -> None:
        self.api_key = api_key
        self.delay_s = delay_s
        self.rule = rule
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.arrivals: list[float] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._scripted: list[tuple[str, int, float | None]] = []  # ("fail", status, retry_after) / ("hang", 0, s)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="judge-server", daemon=True)

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self.requests)

    def fail_next(self, n: int, status: int = 500, retry_after: float | None = None) -> None:
        with self._lock:
            self._scripted.extend([("fail", status, retry_after)] * n)

    def hang_next(self, n: int, seconds: float) -> None:
        with self._lock:
            self._scripted.extend([("hang", 0, seconds)] * n)

    def start(self) -> JudgeServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> JudgeServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _begin(self, body: dict[str, Any], headers: dict[str, str]) -> tuple[str, int, float | None] | None:
        with self._lock:
            self.requests.append(body)
            self.headers.append(headers)
            self.arrivals.append(time.monotonic())
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return self._scripted.pop(0) if self._scripted else None

    def _end(self) -> None:
        with self._lock:
            self.in_flight -= 1


def _completion(model: str, text: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def _make_handler(server: JudgeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like real API servers

        def log_message(self, format: str, *args: Any) -> None:  # quiet test output
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
            if self.path != "/v1/chat/completions":
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            script = server._begin(body, dict(self.headers))
            # The in-flight count drops before the reply is written: the client can only send its next
            # request after reading this reply, so the recorded maximum never overstates its concurrency.
            try:
                status, payload, extra = self._answer(body, script)
            finally:
                server._end()
            self._send(status, payload, extra)

        def _answer(self, body: dict[str, Any], script: tuple[str, int, float | None] | None
                    ) -> tuple[int, dict[str, Any], dict[str, str]]:
            if server.api_key is not None and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                return 401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}, {}
            if script is not None:
                kind, status, value = script
                if kind == "hang":
                    time.sleep(value or 0.0)
                else:
                    extra = {"Retry-After": f"{value:g}"} if value is not None else {}
                    return status, {"error": {"message": f"scripted failure {status}"}}, extra
            time.sleep(server.delay_s)
            messages = body.get("messages", [])
            if match := _STATUS.search(last_user_message(messages)):
                status = int(match.group(1))
                return status, {"error": {"message": f"directed failure {status}"}}, {}
            return 200, _completion(body.get("model", ""), server.rule(messages)), {}

        def _send(self, status: int, payload: dict[str, Any], extra: dict[str, str] | None = None) -> None:
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (extra or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout tests)
                pass

    return Handler
