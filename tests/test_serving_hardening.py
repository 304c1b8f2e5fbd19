"""Server defects found by a hostile test: authentication, per-row failure isolation, disconnects detected
while tokens flow, requests the JSON parser cannot take, multiplier spellings, and counters that add up."""

from __future__ import annotations

import json
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


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
