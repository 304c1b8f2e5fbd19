"""What the server counts, and the two ways `GET /metrics` shows it.

`GET /metrics` answers in the Prometheus text exposition format (content type
`prometheus_client.CONTENT_TYPE_LATEST`); `GET /metrics?format=json` answers with the JSON object of earlier
versions (same numbers, same keys). Each server has its own `CollectorRegistry`, never the process-global
default one, so several servers can run in one process.

The metrics (`endpoint` is "/v1/chat/completions" or "/v1/completions"; `status` an HTTP status):

    unisteer_requests_received_total{endpoint}         completion requests received
    unisteer_requests_total{endpoint,status}           completion requests ended, by status (200: succeeded,
                                                       499: the client left before the answer was complete)
    unisteer_requests_in_flight                        submitted to the generator and not yet ended
    unisteer_request_duration_seconds{endpoint}        histogram of received → ended (streams: the last event)
    unisteer_other_errors_total{status}                errors of other requests (unknown paths, authentication)
    unisteer_prompt_tokens_total                       prompt tokens of succeeded requests
    unisteer_completion_tokens_total                   completion tokens of succeeded requests
    unisteer_tokens_generated_total                    tokens the generator decoded (rows of any outcome)
    unisteer_queue_rows                                rows waiting beyond the running batch
    unisteer_batches_total, unisteer_batch_rows_total  batches started, rows admitted into batches
    unisteer_batch_rows_max, unisteer_batch_rows_mean  the largest batch, rows per batch
    unisteer_generator_busy_seconds_total              time the generator spent decoding
    unisteer_tokens_per_second_busy                    tokens_generated / busy seconds
    unisteer_tokens_per_second_last_60s                tokens generated in the last 60 s / 60
    unisteer_completion_tokens_per_second_since_start  completion tokens of succeeded requests / uptime
    unisteer_start_time_seconds, unisteer_uptime_seconds

Counts add up: sum(requests_received_total) = sum(requests_total) + requests_in_flight once requests have
been submitted (a request still being read or parsed is received but neither in flight nor ended).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

ENDPOINTS = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}

# Generation takes from milliseconds (a few tokens, small model) to minutes (long answers, big models).
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, float("inf"))

PROMETHEUS_CONTENT_TYPE = CONTENT_TYPE_LATEST


@dataclass
class RequestCounters:
    """Completion-request counts (the event loop is the only writer).

    Every completion request received ends in exactly one of: succeeded, an error status (499 when its client
    left first), or still in flight — so `received = succeeded + sum(errors_by_status) + in_flight`. Errors of
    other requests (unknown paths, authentication) are counted apart, in `other_errors_by_status`. The same
    counts per endpoint are in `received_by_endpoint` and `ended_by_endpoint` (endpoint → status → count).
    """

    received: int = 0
    succeeded: int = 0
    errors_by_status: dict[str, int] = field(default_factory=dict)
    other_errors_by_status: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    received_by_endpoint: dict[str, int] = field(default_factory=dict)
    ended_by_endpoint: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class LiveValues:
    """What is read from the running server at scrape time."""

    in_flight: int
    queue_rows: int
    generator: dict[str, float]  # `GeneratorStats.snapshot()`


class ServerMetrics:
    """The server's counters, its request-duration histogram and its registry.

    `live` is called at every scrape for the values the server holds elsewhere (in-flight requests, the
    queue, the generator's statistics).
    """

    def __init__(self, live: Callable[[], LiveValues], started_at: float | None = None):
        self.live = live
        self.started_at = time.time() if started_at is None else started_at
        self.counters = RequestCounters()
        self.registry = CollectorRegistry()
        self.durations = Histogram("unisteer_request_duration_seconds",
                                   "Completion requests from received to ended (streams: the last event sent).",
                                   ["endpoint"], buckets=DURATION_BUCKETS, registry=self.registry)
        self.registry.register(_CountersCollector(self))

    # -- recording (event loop only) ------------------------------------------------------------------
    def receive(self, endpoint: str) -> float:
        """Count a completion request as received; returns its start time for `end`."""
        counters = self.counters
        counters.received += 1
        counters.received_by_endpoint[endpoint] = counters.received_by_endpoint.get(endpoint, 0) + 1
        return time.monotonic()

    def end(self, endpoint: str, status: int, started: float, *, prompt_tokens: int = 0,
            completion_tokens: int = 0) -> None:
        """Count a received completion request as ended with `status` (200: succeeded, tokens counted)."""
        counters = self.counters
        if status == 200:
            counters.succeeded += 1
            counters.prompt_tokens += prompt_tokens
            counters.completion_tokens += completion_tokens
        else:
            counters.errors_by_status[str(status)] = counters.errors_by_status.get(str(status), 0) + 1
        by_status = counters.ended_by_endpoint.setdefault(endpoint, {})
        by_status[str(status)] = by_status.get(str(status), 0) + 1
        self.durations.labels(endpoint=endpoint).observe(max(0.0, time.monotonic() - started))

    def other_error(self, status: int) -> None:
        table = self.counters.other_errors_by_status
        table[str(status)] = table.get(str(status), 0) + 1

    # -- views -----------------------------------------------------------------------------------------
    def uptime(self) -> float:
        return max(time.time() - self.started_at, 1e-9)

    def json(self) -> dict[str, Any]:
        live = self.live()
        uptime = self.uptime()
        return {"uptime_seconds": round(uptime, 1), "requests": asdict(self.counters),
                "requests_in_flight": live.in_flight, "queue_rows": live.queue_rows, "generator": live.generator,
                "completion_tokens_per_second_since_start": round(self.counters.completion_tokens / uptime, 2)}

    def prometheus_text(self) -> bytes:
        return generate_latest(self.registry)


class _CountersCollector:
    """Exposes `RequestCounters` and the live values as metric families, read at scrape time."""

    def __init__(self, owner: ServerMetrics):
        self.owner = owner

    def describe(self) -> list[Metric]:
        return []  # the families' label values are only known at scrape time

    def collect(self) -> Iterator[Metric]:
        owner = self.owner
        counters, live, uptime = owner.counters, owner.live(), owner.uptime()
        gen = live.generator

        received = CounterMetricFamily("unisteer_requests_received", "Completion requests received.",
                                       labels=["endpoint"])
        for endpoint, count in sorted(counters.received_by_endpoint.items()):
            received.add_metric([endpoint], count)
        yield received
        ended = CounterMetricFamily("unisteer_requests", "Completion requests ended, by HTTP status "
                                    "(200: succeeded; 499: the client left first).", labels=["endpoint", "status"])
        for endpoint, by_status in sorted(counters.ended_by_endpoint.items()):
            for status, count in sorted(by_status.items()):
                ended.add_metric([endpoint, status], count)
        yield ended
        other = CounterMetricFamily("unisteer_other_errors", "Errors of requests other than completions "
                                    "(unknown paths, authentication), by HTTP status.", labels=["status"])
        for status, count in sorted(counters.other_errors_by_status.items()):
            other.add_metric([status], count)
        yield other
        yield GaugeMetricFamily("unisteer_requests_in_flight", "Completion requests being generated or streamed.",
                                value=live.in_flight)
        yield CounterMetricFamily("unisteer_prompt_tokens", "Prompt tokens of succeeded completion requests.",
                                  value=counters.prompt_tokens)
        yield CounterMetricFamily("unisteer_completion_tokens",
                                  "Completion tokens of succeeded completion requests.",
                                  value=counters.completion_tokens)
        yield GaugeMetricFamily("unisteer_queue_rows", "Rows waiting beyond the running batch.",
                                value=live.queue_rows)
        yield CounterMetricFamily("unisteer_tokens_generated", "Tokens the generator decoded, for rows of any "
                                  "outcome.", value=gen.get("completion_tokens", 0))
        yield CounterMetricFamily("unisteer_batches", "Batches the generator started.", value=gen.get("batches", 0))
        yield CounterMetricFamily("unisteer_batch_rows", "Rows admitted into batches (at start or joining).",
                                  value=gen.get("rows", 0))
        yield GaugeMetricFamily("unisteer_batch_rows_max", "The largest batch so far, in rows.",
                                value=gen.get("largest_batch", 0))
        yield GaugeMetricFamily("unisteer_batch_rows_mean", "Rows admitted per batch started.",
                                value=gen.get("mean_batch_size", 0.0))
        yield CounterMetricFamily("unisteer_generator_busy_seconds", "Time the generator spent decoding.",
                                  value=gen.get("busy_seconds", 0.0))
        yield GaugeMetricFamily("unisteer_tokens_per_second_busy", "Tokens generated per busy second.",
                                value=gen.get("tokens_per_second_busy", 0.0))
        for key, value in sorted(gen.items()):
            if key.startswith("tokens_per_second_last_"):  # e.g. tokens_per_second_last_60s
                yield GaugeMetricFamily(f"unisteer_{key}", f"Tokens generated per second over the "
                                        f"last {key.removeprefix('tokens_per_second_last_')}.", value=value)
        yield GaugeMetricFamily("unisteer_completion_tokens_per_second_since_start",
                                "Completion tokens of succeeded requests per second of uptime.",
                                value=counters.completion_tokens / uptime)
        yield GaugeMetricFamily("unisteer_start_time_seconds", "When the server started, in Unix time.",
                                value=owner.started_at)
        yield GaugeMetricFamily("unisteer_uptime_seconds", "Seconds since the server started.", value=uptime)
