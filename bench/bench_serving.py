"""Load test for `unisteer serve`: tokens/s and latency for plain vs steered requests at several concurrencies.

    .venv/bin/python bench/bench_serving.py                       # starts its own server on the default model
    .venv/bin/python bench/bench_serving.py --url http://127.0.0.1:8000 --update NAME   # an already running server

For each concurrency C and each mode it runs `rounds` waves of C simultaneous streaming chat requests (greedy,
`max_tokens` each) and reports aggregate completion tokens/s (all tokens / wall time of the waves), mean and p90
request latency, and mean time to first token. Modes: `plain` (no steering), `steered` (every request steers with
the update at --multiplier), `mixed` (half plain, half steered, in the same batches).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import openai

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "Describe your ideal weekend in detail.",
    "What should I know before adopting a cat?",
]


@dataclass
class RequestResult:
    latency_s: float
    first_token_s: float
    completion_tokens: int


@dataclass
class Row:
    mode: str
    concurrency: int
    requests: int
    tokens: int
    wall_s: float
    results: list[RequestResult]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    def cells(self) -> list[str]:
        latencies = sorted(r.latency_s for r in self.results)
        p90 = latencies[min(len(latencies) - 1, int(0.9 * len(latencies)))]
        ttft = statistics.mean(r.first_token_s for r in self.results)
        return [self.mode, str(self.concurrency), str(self.requests), str(self.tokens), f"{self.tokens_per_s:.1f}",
                f"{statistics.mean(latencies):.2f}", f"{p90:.2f}", f"{ttft:.2f}"]


async def one_request(client: openai.AsyncOpenAI, model: str, prompt: str, steering: list[dict] | None,
                      max_tokens: int) -> RequestResult:
    started = time.perf_counter()
    first = None
    tokens = 0
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True},
        extra_body={"steering": steering} if steering else None)
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    latency = time.perf_counter() - started
    return RequestResult(latency, first if first is not None else latency, tokens)


async def run_mode(client: openai.AsyncOpenAI, model: str, mode: str, concurrency: int, rounds: int,
                   steering: list[dict], max_tokens: int) -> Row:
    results: list[RequestResult] = []
    started = time.perf_counter()
    for wave in range(rounds):
        calls = []
        for i in range(concurrency):
            steered = mode == "steered" or (mode == "mixed" and i % 2 == 1)
            prompt = PROMPTS[(wave * concurrency + i) % len(PROMPTS)]
            calls.append(one_request(client, model, prompt, steering if steered else None, max_tokens))
        results += await asyncio.gather(*calls)
    wall = time.perf_counter() - started
    return Row(mode, concurrency, len(results), sum(r.completion_tokens for r in results), wall, results)


def print_table(rows: list[Row]) -> None:
    header = ["mode", "conc", "reqs", "tokens", "tok/s", "lat mean s", "lat p90 s", "ttft s"]
    table = [header] + [row.cells() for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for n, line in enumerate(table):
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)))
        if n == 0:
            print("  ".join("-" * w for w in widths))


async def bench(base_url: str, model: str, update: str, multiplier: float, concurrencies: list[int], rounds: int,
                modes: list[str], max_tokens: int) -> list[Row]:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    steering = [{"update": update, "multiplier": multiplier}]
    await one_request(client, model, PROMPTS[0], None, 2)  # warm-up
    rows = []
    for concurrency in concurrencies:
        for mode in modes:
            row = await run_mode(client, model, mode, concurrency, rounds, steering, max_tokens)
            print(f"  {mode:>7} x{concurrency}: {row.tokens_per_s:.1f} tok/s", flush=True)
            rows.append(row)
    await client.close()
    return rows


@contextlib.contextmanager
def local_server(model_name: str, max_batch_size: int):
    """Start a server on a free port with one random steering vector (norm ~ the residual stream's)."""
    import torch

    from unisteer.engine.models import load_model
    from unisteer.engine.storage import save_update
    from unisteer.engine.updates import create_update
    from unisteer.serving.app import BackgroundServer, ServerConfig, build_app, load_updates_dir

    model, tokenizer = load_model(model_name)
    with tempfile.TemporaryDirectory() as folder:
        layers = model.config.num_hidden_layers
        update = create_update(model, "vector", layers // 2, seed=0)
        with torch.no_grad():
            update.vector.copy_(torch.randn(update.vector.shape, generator=torch.Generator().manual_seed(0)))
        save_update(update, Path(folder) / "bench-vector")
        app = build_app(model, tokenizer, load_updates_dir(folder, model),
                        ServerConfig(served_model_name=model_name, max_batch_size=max_batch_size))
        with BackgroundServer(app) as server:
            yield server.base_url, model_name, "bench-vector"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="an already running server (default: start one in-process)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model to load, or served name with --url")
    parser.add_argument("--update", help="update name to steer with (required with --url)")
    parser.add_argument("--multiplier", type=float, default=4.0)
    parser.add_argument("--concurrency", default="1,2,4,8", help="comma-separated concurrency levels")
    parser.add_argument("--modes", default="plain,steered,mixed")
    parser.add_argument("--rounds", type=int, default=2, help="waves of simultaneous requests per cell")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=8, help="for the in-process server")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads for the in-process server (0: torch's default)")
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    modes = args.modes.split(",")
    if args.url:
        if not args.update:
            parser.error("--url needs --update NAME")
        server = contextlib.nullcontext((args.url.rstrip("/") + "/v1", args.model, args.update))
    else:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        server = local_server(args.model, args.max_batch_size)
    with server as (base_url, model, update):
        print(f"model {model}, update {update} at m={args.multiplier}, max_tokens {args.max_tokens}, "
              f"{args.rounds} rounds per cell")
        rows = asyncio.run(bench(base_url, model, update, args.multiplier, concurrencies, args.rounds, modes,
                                 args.max_tokens))
    print()
    print_table(rows)


if __name__ == "__main__":
    main()
