"""Server defects found by a hostile test: authentication, per-row failure isolation, disconnects detected
while tokens flow, requests the JSON parser cannot take, multiplier spellings, and counters that add up."""

from __future__ import annotations

import json
import os
import select
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import prometheus_client
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from test_serving import TINY, Served, start_tiny, user, wait_until, write_tiny_updates
from tiny_models import tiny_model
from unisteer.engine.storage import save_update
from unisteer.engine.updates import create_update
from unisteer.serving.app import ServerConfig, load_updates_dir

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def updates_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("updates")
    model = tiny_model("llama")
    write_tiny_updates(model, folder)
    overflowing = create_update(model, "vector", 1, seed=0)
    with torch.no_grad():
        overflowing.vector.fill_(3e38)  # finite, so it loads; h + v overflows to inf inside the model
    save_update(overflowing.eval(), folder / "overflow")
    broken = folder / "broken"
    save_update(create_update(model, "vector", 1, seed=0), broken)
    (broken / "update.json").write_text("[1, 2]")
    return folder


@pytest.fixture(scope="module")
def served(updates_dir):
    server, stack = start_tiny(updates_dir, api_key="s3cret", max_batch_size=16, max_queue=64, max_choices=4)
    with stack:
        yield server


AUTH = {"Authorization": "Bearer s3cret"}


def post(served: Served, path: str, body, *, key: str | None = "s3cret", timeout: float = 60) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    content = body if isinstance(body, bytes) else json.dumps(body)
    return httpx.post(served.server.base_url + path, content=content, headers=headers, timeout=timeout)


def test_a_broken_update_file_is_skipped_not_fatal(updates_dir):
    skipped = {}
    updates = load_updates_dir(updates_dir, tiny_model("llama"), skipped)
    assert "broken" in skipped and "expected a JSON object" in skipped["broken"]
    assert {"up", "down", "overflow"} <= set(updates) and "broken" not in updates


def test_api_key_is_required_on_v1_and_metrics(served):
    body = {"model": TINY, "messages": user("hi"), "max_tokens": 2}
    for key in (None, "wrong"):
        reply = post(served, "/chat/completions", body, key=key)
        assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(served.server.url + "/metrics").status_code == 401
    assert httpx.get(served.server.url + "/metrics?format=json").status_code == 401
    assert httpx.get(served.server.url + "/metrics", headers=AUTH).status_code == 200
    assert httpx.get(served.server.url + "/health").status_code == 200  # liveness stays open
    assert post(served, "/chat/completions", body).status_code == 200
    assert ServerConfig(host="0.0.0.0").loopback_only is False and ServerConfig().loopback_only


def test_one_overflowing_request_fails_alone(served):
    """Once, one NaN-steered request made all 16 concurrent requests fail with HTTP 500."""
    def ask(model):
        return post(served, "/chat/completions", {"model": model, "messages": user("hello"), "max_tokens": 6,
                                                   "temperature": 0})

    models = [f"{TINY}+overflow@2"] + [TINY, f"{TINY}+up@2"] * 6
    with ThreadPoolExecutor(len(models)) as pool:
        replies = list(pool.map(ask, models))
    assert replies[0].status_code == 500 and "NaN or infinite" in replies[0].json()["error"]["message"]
    assert all(r.status_code == 200 for r in replies[1:])
    texts = {m: r.json()["choices"][0]["message"]["content"] for m, r in zip(models[1:], replies[1:], strict=True)}
    alone = post(served, "/chat/completions", {"model": TINY, "messages": user("hello"), "max_tokens": 6,
                                               "temperature": 0}).json()["choices"][0]["message"]["content"]
    assert texts[TINY] == alone


@pytest.mark.parametrize("body,fragment", [
    (b"[" * 100_000 + b"]" * 100_000, "too deeply"),
    ({"model": f"{TINY}+up@1_0", "messages": user("x")}, "not a plain decimal"),
    ({"model": f"{TINY}+up@\uff11", "messages": user("x")}, "not a plain decimal"),
])
def test_requests_the_parser_cannot_take_are_400s(served, body, fragment):
    reply = post(served, "/chat/completions", body)
    assert reply.status_code == 400 and fragment in reply.json()["error"]["message"]


def test_non_streaming_disconnect_is_seen_while_tokens_flow(updates_dir):
    server, stack = start_tiny(updates_dir)
    slow = threading.Event()

    def pace(module, args):  # ~50 ms per decode step: 120 tokens would take ~6 s
        if slow.is_set():
            time.sleep(0.05)

    hook = server.model.register_forward_pre_hook(pace)
    try:
        with stack:
            slow.set()
            stats = server.state.generator.stats
            before = stats.completion_tokens
            # Greedy from "The", the tiny model writes all 120 tokens (no end of sequence).
            body = {"model": TINY, "prompt": "The", "max_tokens": 120, "temperature": 0}
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(server.server.base_url + "/completions", json=body, timeout=1.0)
            wait_until(lambda: server.state.in_flight == 0, timeout=10)
            assert stats.completion_tokens - before < 60, "decoding went on for a client that had left"
            assert server.state.counters.errors_by_status.get("499") == 1
            assert server.state.counters.succeeded == 0
    finally:
        hook.remove()


def test_counters_add_up(served):
    post(served, "/chat/completions", {"model": TINY, "messages": user("x"), "max_tokens": 2})
    post(served, "/chat/completions", {"model": "nope", "messages": user("x")})
    httpx.get(served.server.base_url + "/models/nope", headers=AUTH)
    with httpx.stream("POST", served.server.base_url + "/chat/completions", headers=AUTH,
                      json={"model": TINY, "messages": user("go"), "max_tokens": 50, "stream": True}) as response:
        next(response.iter_lines())  # then hang up mid-stream
    wait_until(lambda: served.state.in_flight == 0)
    metrics = httpx.get(served.server.url + "/metrics?format=json", headers=AUTH).json()
    requests = metrics["requests"]
    assert requests["received"] == requests["succeeded"] + sum(requests["errors_by_status"].values()) \
        + metrics["requests_in_flight"]
    assert requests["other_errors_by_status"].get("404", 0) >= 1  # GET /v1/models/nope is not a completion


def scrape(served: Served) -> dict[tuple[str, frozenset], float]:
    """The Prometheus text of /metrics, parsed: (sample name, labels) → value."""
    reply = httpx.get(served.server.url + "/metrics", headers=AUTH)
    assert reply.status_code == 200 and reply.headers["content-type"] == prometheus_client.CONTENT_TYPE_LATEST
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(reply.text) for sample in family.samples}


def total(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    """The sum of `name` over the samples whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(value for (sample, got), value in samples.items() if sample == name and wanted <= got)


def test_prometheus_text_counts_add_up(served):
    chat, completions = "/v1/chat/completions", "/v1/completions"
    before = scrape(served)
    plain = post(served, "/chat/completions", {"model": TINY, "messages": user("x"), "max_tokens": 3})
    assert plain.status_code == 200
    assert post(served, "/chat/completions", {"model": "nope", "messages": user("x")}).status_code == 404
    assert post(served, "/completions", b"{not json").status_code == 400
    assert post(served, "/chat/completions", {"model": TINY, "messages": user("x")}, key="wrong").status_code == 401
    with httpx.stream("POST", served.server.base_url + "/completions", headers=AUTH, timeout=60,
                      json={"model": f"{TINY}+up@1", "prompt": "ab", "max_tokens": 4, "stream": True,
                            "stream_options": {"include_usage": True}}) as response:
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    streamed_usage = json.loads(events[-2])["usage"]
    wait_until(lambda: served.state.in_flight == 0)
    after = scrape(served)

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert delta("unisteer_requests_received_total", endpoint=chat) == 2
    assert delta("unisteer_requests_received_total", endpoint=completions) == 2
    assert delta("unisteer_requests_total", endpoint=chat, status="200") == 1
    assert delta("unisteer_requests_total", endpoint=chat, status="404") == 1
    assert delta("unisteer_requests_total", endpoint=completions, status="400") == 1
    assert delta("unisteer_requests_total", endpoint=completions, status="200") == 1
    assert delta("unisteer_other_errors_total", status="401") == 1  # refused before it reached an endpoint
    for endpoint in (chat, completions):  # every ended request was timed
        assert delta("unisteer_request_duration_seconds_count", endpoint=endpoint) == 2
    assert delta("unisteer_completion_tokens_total") == plain.json()["usage"]["completion_tokens"] \
        + streamed_usage["completion_tokens"]
    assert delta("unisteer_prompt_tokens_total") == plain.json()["usage"]["prompt_tokens"] \
        + streamed_usage["prompt_tokens"]
    assert delta("unisteer_tokens_generated_total") >= delta("unisteer_completion_tokens_total")
    # Since the server started: received = ended + in flight, and the JSON view holds the same numbers.
    assert total(after, "unisteer_requests_in_flight") == 0
    assert total(after, "unisteer_requests_received_total") == total(after, "unisteer_requests_total")
    assert total(after, "unisteer_request_duration_seconds_count") == total(after, "unisteer_requests_total")
    assert total(after, "unisteer_queue_rows") == 0 and total(after, "unisteer_batches_total") >= 1
    requests = httpx.get(served.server.url + "/metrics?format=json", headers=AUTH).json()["requests"]
    assert requests["received"] == total(after, "unisteer_requests_received_total")
    assert requests["succeeded"] == total(after, "unisteer_requests_total", status="200")
    assert requests["completion_tokens"] == total(after, "unisteer_completion_tokens_total")


# -- round two (#18): a server one client cannot stall or bloat ---------------------------------------------
def _chunked_upload(served: Served, total_bytes: int) -> tuple[bytes, int]:
    """POST a chunked (no Content-Length) body of spaces; stop once the server answers. Returns the answer's
    first bytes and how many body bytes were sent by then."""
    sock = socket.create_connection((served.server.host, served.server.port), timeout=5)
    with sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer s3cret\r\n"
                     b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        piece = b" " * (64 << 10)
        frame = b"%x\r\n" % len(piece) + piece + b"\r\n"
        sent = 0
        while sent < total_bytes:
            if select.select([sock], [], [], 0)[0]:
                break  # the server answered mid-upload
            try:
                sock.sendall(frame)
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                break
            sent += len(piece)
        return sock.recv(4096), sent


def test_a_chunked_upload_is_cut_at_the_limit_not_buffered(served):
    """A body without Content-Length was read whole (256 MiB) before the 413."""
    limit = served.state.config.max_request_bytes
    answer, sent = _chunked_upload(served, 16 * limit)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < 4 * limit, f"the server read {sent} bytes of a body limited to {limit}"


def test_many_prompts_are_refused_before_tokenising(served):
    """200 000 one-word prompts were tokenised on the event loop (16.7 s) before the count limit refused them."""
    started = time.perf_counter()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post, served, "/completions", {"model": TINY, "prompt": ["hi"] * 200_000})
        health = httpx.get(served.server.url + "/health", timeout=10)
        reply = pending.result()
    assert health.status_code == 200
    assert reply.status_code == 400 and "200000 prompts" in reply.json()["error"]["message"]
    assert time.perf_counter() - started < 5


def test_prompts_are_tokenised_off_the_event_loop(served, monkeypatch):
    renderer = served.state.renderer
    threads = []
    original = renderer.text

    def spy(prompt):
        threads.append(threading.current_thread().name)
        return original(prompt)

    monkeypatch.setattr(renderer, "text", spy)
    reply = post(served, "/completions", {"model": TINY, "prompt": "ab", "max_tokens": 2})
    assert reply.status_code == 200
    assert threads and "unisteer-http" not in threads  # the event loop runs in BackgroundServer's thread


@pytest.mark.parametrize("body", [
    b'{"model": "tiny-llama", "prompt": "a\\ud800b", "max_tokens": 2}',
    b'{"model": "tiny-llama+\\udfff", "messages": [{"role": "user", "content": "x"}]}',
    b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "\\ud83d"}], "stream": true}',
])
def test_a_lone_surrogate_is_a_400_not_a_500(served, body):
    reply = post(served, "/completions" if b'"prompt"' in body else "/chat/completions", body)
    assert reply.status_code == 400, reply.text
    assert "lone UTF-16 surrogate" in reply.json()["error"]["message"]


def test_a_client_gone_during_its_upload_is_a_499_not_a_500(served):
    counters = served.state.counters
    before = dict(counters.errors_by_status)
    sock = socket.create_connection((served.server.host, served.server.port), timeout=5)
    with sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer s3cret\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\": ")
        time.sleep(0.2)  # let the server start reading the body
    wait_until(lambda: counters.errors_by_status.get("499", 0) > before.get("499", 0), timeout=10)
    assert counters.errors_by_status.get("500", 0) == before.get("500", 0)


def test_an_api_key_also_guards_the_docs_and_hides_paths_on_health(served, updates_dir, monkeypatch):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(served.server.url + path).status_code == 401, path
        assert httpx.get(served.server.url + path, headers=AUTH).status_code == 200, path
    skipped = {}
    load_updates_dir(updates_dir, served.model, skipped)
    assert str(updates_dir) in skipped["broken"]
    monkeypatch.setattr(served.state, "skipped_updates", skipped)  # as `serve` records them
    health = httpx.get(served.server.url + "/health").json()
    assert health["skipped_updates"] == ["broken"]  # the name, not the server-side path in the reason
    assert "/" not in json.dumps(health["skipped_updates"])


def test_the_api_key_comes_from_a_file_or_the_environment(tmp_path):
    from unisteer.errors import ConfigError
    from unisteer.serving.app import api_key_from

    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert api_key_from("", str(key_file), "from-env") == "from-file"
    assert api_key_from("", None, "from-env") == "from-env"
    assert api_key_from("flag", None, "from-env") == "flag"
    with pytest.raises(ConfigError, match="not both"):
        api_key_from("flag", str(key_file), "")
    os.mkfifo(tmp_path / "fifo")
    for bad, message in ((tmp_path / "fifo", "not a file"), (tmp_path / "missing", "not a file")):
        with pytest.raises(ConfigError, match=message):
            api_key_from("", str(bad), "")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="first line is empty"):
        api_key_from("", str(tmp_path / "empty"), "")


def test_updates_the_server_cannot_read_are_skipped_without_hanging(tmp_path):
    """A deeply nested or folder update.json kept the server from starting; a FIFO one hung it forever."""
    model = tiny_model("llama")
    write_tiny_updates(model, tmp_path)
    for name in ("nested", "folder", "fifo", "fifo_tensors"):
        save_update(create_update(model, "vector", 1, seed=0), tmp_path / name)
    (tmp_path / "nested" / "update.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "folder" / "update.json").unlink()
    (tmp_path / "folder" / "update.json").mkdir()
    (tmp_path / "fifo" / "update.json").unlink()
    os.mkfifo(tmp_path / "fifo" / "update.json")
    (tmp_path / "fifo_tensors" / "update.safetensors").unlink()
    os.mkfifo(tmp_path / "fifo_tensors" / "update.safetensors")
    os.mkfifo(tmp_path / "pipe.safetensors")
    skipped: dict[str, str] = {}
    loading = threading.Thread(target=load_updates_dir, args=(tmp_path, model, skipped), daemon=True)
    loading.start()
    loading.join(20)
    assert not loading.is_alive(), "loading the updates hung"
    assert set(skipped) == {"nested", "folder", "fifo", "fifo_tensors", "pipe"}
    assert "nests too deeply" in skipped["nested"] and "found a folder" in skipped["folder"]
    assert "named pipe" in skipped["fifo"] and "named pipe" in skipped["pipe"]
    server, stack = start_tiny(tmp_path)
    with stack:
        assert httpx.get(server.server.url + "/health").json()["updates"] == ["down", "late", "lora", "up"]
