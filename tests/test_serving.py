"""The steered OpenAI-compatible server, driven over real sockets with the `openai` client and raw httpx.

Most tests run a tiny random Llama with a character-level tokenizer built here (vocab 101, no downloads);
tests marked `real_model` repeat the key correctness checks on SmolLM2-135M-Instruct. A "gate" hook holds the
worker inside a batch so that queue, disconnect and shutdown behaviour can be tested without timing races.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import openai
import prometheus_client
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tiny_models import LAYERS, VOCAB, tiny_model
from unisteer.data.rendering import PairEncoder
from unisteer.engine.steering import Steering
from unisteer.engine.storage import save_update
from unisteer.engine.updates import create_update
from unisteer.errors import UnisteerError
from unisteer.generation.generate import generate_steered
from unisteer.generation.sampling import SamplingConfig, next_tokens
from unisteer.serving.app import (
    BackgroundServer,
    ServerConfig,
    add_serve_arguments,
    build_app,
    load_updates_dir,
)
from unisteer.serving.batching import RowJob, RowQueue, StreamingText

TINY = "tiny-llama"
MAX_TOKENS = 8


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character, plus pad/bos/eos and two chat markers: 101 ids in all."""
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", *chars, "<|im_start|>", "<|im_end|>"])}
    assert len(vocab) == VOCAB
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tokenizer


def random_vector_update(model, layer, scale, seed, positions="all"):
    update = create_update(model, "vector", layer, positions=positions, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        update.vector.copy_(torch.randn(update.vector.shape, generator=g) * scale)
    return update.eval()


def write_tiny_updates(model, folder):
    save_update(random_vector_update(model, 1, 2.0, seed=1), folder / "up")
    save_update(random_vector_update(model, 1, 2.0, seed=2), folder / "down")
    save_update(random_vector_update(model, 2, 2.0, seed=3, positions="generated"), folder / "late")
    lora = create_update(model, "lora", 2, rank=2, seed=4)
    with torch.no_grad():
        lora.lora_B.copy_(torch.randn(lora.lora_B.shape, generator=torch.Generator().manual_seed(5)))
    save_update(lora.eval(), folder / "lora.safetensors")


class Gate:
    """Holds the worker at its next forward call while closed, and says when it got there."""

    def __init__(self, model):
        self.open = threading.Event()
        self.open.set()
        self.reached = threading.Event()
        self._hook = model.register_forward_pre_hook(self._wait)

    def _wait(self, module, args):
        if not self.open.is_set():
            self.reached.set()
            assert self.open.wait(30), "gate never opened"

    def close(self):
        self.reached.clear()
        self.open.clear()

    def release(self):
        self.open.set()

    def remove(self):
        self.open.set()
        self._hook.remove()


@dataclass
class Served:
    model: object
    tokenizer: object
    updates: dict
    server: BackgroundServer
    base: str

    @property
    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.server.base_url, api_key="unused", max_retries=0, timeout=60)

    @property
    def state(self):
        return self.server.server.config.app.state.unisteer

    def post(self, path, body, **kw) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body)
        return httpx.post(self.server.base_url + path, content=content,
                          headers={"Content-Type": "application/json"}, timeout=60, **kw)


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def tiny_updates_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-updates")
    write_tiny_updates(tiny_model("llama"), folder)
    return folder


def start_tiny(folder, **config) -> tuple[Served, contextlib.ExitStack]:
    model, tokenizer = tiny_model("llama"), char_tokenizer()
    updates = load_updates_dir(folder, model)
    settings = dict(served_model_name=TINY, batch_wait_ms=50, max_prompt_tokens=64, max_multiplier=50.0) | config
    server = BackgroundServer(build_app(model, tokenizer, updates, ServerConfig(**settings)))
    stack = contextlib.ExitStack()
    stack.enter_context(server)
    return Served(model, tokenizer, updates, server, TINY), stack


@pytest.fixture(scope="module")
def tiny(tiny_updates_dir):
    served, stack = start_tiny(tiny_updates_dir)
    with stack:
        yield served


@pytest.fixture(scope="module")
def gated(tiny_updates_dir):
    """A second tiny server with one row per batch and room for two waiting rows."""
    served, stack = start_tiny(tiny_updates_dir, max_batch_size=1, max_queue=2, max_choices=2)
    gate = Gate(served.model)
    with stack:
        yield served, gate
    gate.remove()


def reference(served: Served, steering: dict[str, float], *, messages=None, prompt=None,
              max_tokens=MAX_TOKENS) -> str:
    """Greedy `model.generate` with the engine's Steering attached directly: what the server must match."""
    tok = served.tokenizer
    if messages is not None:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    else:
        ids = tok(prompt, return_tensors="pt").input_ids
    active = {name: m for name, m in steering.items() if m != 0}
    steering_context = (Steering(served.model, [served.updates[n] for n in active], multiplier=list(active.values()))
                        if active else contextlib.nullcontext())
    with steering_context, torch.inference_mode():
        out = served.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                    do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def model_name(base: str, steering: dict[str, float]) -> str:
    return base + "".join(f"+{name}@{m:g}" for name, m in steering.items())


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def sse_events(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


# -- unit pieces -------------------------------------------------------------------------------------------
def test_streaming_text_holds_back_partial_stop_strings():
    tok = char_tokenizer()
    text = StreamingText(tok, tok("ab").input_ids, stop=("XYZ",))
    sent = [text.add(i) for i in tok("hello XY").input_ids]
    assert "".join(sent) == "hello " and text.text == "hello XY"
    assert text.add(tok("Z").input_ids[0]) == "" and text.stopped and text.text == "hello "
    partial = StreamingText(tok, [], stop=("XYZ",))
    assert "".join(partial.add(i) for i in tok("ok X").input_ids) == "ok "
    assert partial.flush() == "X", "a partial stop string at the end is real text"


def test_sampling_is_greedy_at_zero_seeded_and_top_p_limited():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9], [0.0, 3.0, 1.0, 2.9]])
    greedy = SamplingConfig(max_new_tokens=1, temperature=0.0)
    nucleus = SamplingConfig(max_new_tokens=1, temperature=1.0, top_p=0.3)
    assert next_tokens(logits, [greedy, nucleus], [None, torch.Generator().manual_seed(0)]).tolist() == [1, 1]
    hot = SamplingConfig(max_new_tokens=1, temperature=2.0)
    draws = [next_tokens(logits[:1], [hot], [torch.Generator().manual_seed(s)]).item() for s in range(40)]
    assert len(set(draws)) > 1
    again = [next_tokens(logits[:1], [hot], [torch.Generator().manual_seed(s)]).item() for s in range(40)]
    assert draws == again


def test_row_queue_is_bounded_and_all_or_nothing():
    def row():
        return RowJob([1], SamplingConfig(max_new_tokens=1), {}, sink=lambda event: None)

    queue = RowQueue(capacity=3)
    queue.put_all([row(), row()])
    with pytest.raises(Exception, match="queue is full"):
        queue.put_all([row(), row()])
    assert len(queue) == 2
    cancelled = row()
    cancelled.cancelled.set()
    queue.put_all([cancelled])
    assert len(queue.take_batch(max_rows=8, gather_s=0.0, idle_s=0.0)) == 2, "cancelled rows are skipped"


def test_update_folder_names_and_bad_names(tmp_path, tiny_updates_dir):
    model = tiny_model("llama")
    assert sorted(load_updates_dir(tiny_updates_dir, model)) == ["down", "late", "lora", "up"]
    save_update(random_vector_update(model, 1, 1.0, seed=0), tmp_path / "a+b")
    with pytest.raises(UnisteerError, match="may not contain"):
        load_updates_dir(tmp_path, model)
    with pytest.raises(UnisteerError, match="not a folder"):
        load_updates_dir(tmp_path / "missing", model)


def test_cli_options_build_a_server_config():
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["--updates", "u/", "--port", "9001", "--max-multiplier", "30", "--batch-wait-ms", "5"])
    assert (args.model, args.updates, args.port, args.max_multiplier, args.batch_wait_ms) == (
        "smollm2-135m-instruct", "u/", 9001, 30.0, 5.0)
    with pytest.raises(UnisteerError, match="max_queue"):
        ServerConfig(max_queue=0)


# -- the server, tiny model ----------------------------------------------------------------------------------
def test_models_health_and_metrics(tiny):
    ids = [m.id for m in tiny.client.models.list().data]
    assert ids == [TINY, f"{TINY}+down", f"{TINY}+late", f"{TINY}+lora", f"{TINY}+up"]
    health = httpx.get(tiny.server.url + "/health").json()
    assert health["status"] == "ok" and health["updates"] == ["down", "late", "lora", "up"]
    tiny.client.completions.create(model=TINY, prompt="abc", max_tokens=3, temperature=0)
    metrics = httpx.get(tiny.server.url + "/metrics?format=json").json()
    assert metrics["requests"]["succeeded"] >= 1 and metrics["generator"]["completion_tokens"] >= 3
    assert metrics["generator"]["tokens_per_second_busy"] > 0
    scraped = httpx.get(tiny.server.url + "/metrics")
    assert scraped.headers["content-type"] == prometheus_client.CONTENT_TYPE_LATEST
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(scraped.text) for s in family.samples}
    assert samples[("unisteer_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))] >= 1
    assert samples[("unisteer_tokens_generated_total", ())] >= 3
    assert httpx.get(tiny.server.url + "/metrics?format=xml").status_code == 400


def test_plain_and_zero_multiplier_equal_model_generate(tiny):
    messages = user("Hello there")
    expected = reference(tiny, {}, messages=messages)
    for model, extra in [(TINY, None), (f"{TINY}+up@0", None),
                         (TINY, {"steering": [{"update": "lora", "multiplier": 0}]})]:
        reply = tiny.client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS,
                                                    temperature=0, extra_body=extra)
        assert reply.choices[0].message.content == expected, model
    text = tiny.client.completions.create(model=TINY, prompt="abc", max_tokens=MAX_TOKENS, temperature=0)
    assert text.choices[0].text == reference(tiny, {}, prompt="abc")


def test_steering_by_name_or_body_field_matches_engine(tiny):
    messages = user("Hello there")
    steered = tiny.client.chat.completions.create(model=f"{TINY}+up@4+lora@-1.5", messages=messages,
                                                  max_tokens=MAX_TOKENS, temperature=0)
    expected = reference(tiny, {"up": 4.0, "lora": -1.5}, messages=messages)
    assert steered.choices[0].message.content == expected != reference(tiny, {}, messages=messages)
    by_body = tiny.client.chat.completions.create(
        model=TINY, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"steering": [{"update": "up", "multiplier": 4}, {"update": "lora", "multiplier": -1.5}]})
    assert by_body.choices[0].message.content == expected
    assert by_body.model_extra["steering"] == [{"update": "up", "multiplier": 4.0},
                                               {"update": "lora", "multiplier": -1.5}]


def test_concurrent_requests_with_different_steering_do_not_leak(tiny):
    short, long = user("Hi"), user("Hi there, how are you today?")
    # Different max_tokens make rows leave the batch at different steps while the updates stay attached.
    cases = [(short, {}, 8), (short, {"up": 4.0}, 3), (long, {"down": -3.0}, 8), (short, {"up": 4.0, "lora": 2.0}, 5),
             (long, {"up": 0.0}, 2), (long, {"late": 6.0}, 8), (short, {"late": 6.0, "down": 3.0}, 4), (long, {}, 6)]
    expected = [reference(tiny, steering, messages=messages, max_tokens=n) for messages, steering, n in cases]
    assert len(set(expected)) >= 5, "the updates must change the text for this test to mean anything"
    batches_before = tiny.state.generator.stats.batches

    def ask(case):
        messages, steering, max_tokens = case
        reply = tiny.client.chat.completions.create(model=model_name(TINY, steering), messages=messages,
                                                    max_tokens=max_tokens, temperature=0)
        return reply.choices[0].message.content

    with ThreadPoolExecutor(len(cases)) as pool:
        got = list(pool.map(ask, cases))
    assert got == expected
    assert tiny.state.generator.stats.batches - batches_before < len(cases), "requests were batched together"


def test_waiting_requests_join_a_running_batch(tiny):
    # Joining rows have longer prompts (the running row's cache gets left-padded), "generated"-position steering
    # (prompt lengths must survive the merge) and earlier ends (the batch narrows and drops padding again).
    cases = [("abc", {"up": 4.0}, 10), ("hello world", {"late": 6.0}, 4), ("x", {"down": -2.0, "lora": 1.0}, 6)]
    expected = [reference(tiny, steering, prompt=prompt, max_tokens=n) for prompt, steering, n in cases]
    stats = tiny.state.generator.stats
    runs_before = stats.batches

    def ask(case):
        prompt, steering, max_tokens = case
        reply = tiny.client.completions.create(model=model_name(TINY, steering), prompt=prompt,
                                               max_tokens=max_tokens, temperature=0)
        return reply.choices[0].text

    gate = Gate(tiny.model)
    try:
        gate.close()
        with ThreadPoolExecutor(len(cases)) as pool:
            first = pool.submit(ask, cases[0])
            assert gate.reached.wait(20)
            later = [pool.submit(ask, case) for case in cases[1:]]
            wait_until(lambda: len(tiny.state.generator.queue) == 2)
            gate.release()
            got = [first.result(30)] + [f.result(30) for f in later]
    finally:
        gate.remove()
    assert got == expected
    assert stats.batches - runs_before == 1, "the later requests joined the running batch"


@pytest.mark.parametrize("arch", ["gemma3", "gpt2"])
def test_mixed_batches_on_sliding_window_and_absolute_position_models(arch):
    """Gemma-3's sliding-window cache cannot take joining rows (static batches); GPT-2 needs position ids
    that skip left padding. Both must still match the engine row by row."""
    model, tokenizer = tiny_model(arch), char_tokenizer()
    updates = {"up": random_vector_update(model, 1, 2.0, seed=1),
               "late": random_vector_update(model, 2, 2.0, seed=2, positions="generated")}
    app = build_app(model, tokenizer, updates, ServerConfig(served_model_name=arch, batch_wait_ms=50))
    with BackgroundServer(app) as server:
        served = Served(model, tokenizer, updates, server, arch)
        # Prompt + completion exceed gemma3's window of 16 tokens.
        cases = [("abc", {}, 12), ("hello world, this is long", {"up": 4.0}, 10), ("x", {"late": 5.0}, 6),
                 ("xyz", {"up": -3.0, "late": 2.0}, 16)]
        expected = [reference(served, steering, prompt=p, max_tokens=n) for p, steering, n in cases]

        def ask(case):
            prompt, steering, max_tokens = case
            return served.client.completions.create(model=model_name(arch, steering), prompt=prompt,
                                                    max_tokens=max_tokens, temperature=0).choices[0].text

        with ThreadPoolExecutor(len(cases)) as pool:
            assert list(pool.map(ask, cases)) == expected
        assert served.state.generator.stats.largest_batch > 1


def test_streaming_matches_non_streaming(tiny):
    messages = user("Stream this")
    full = tiny.client.chat.completions.create(model=f"{TINY}+down@2", messages=messages, max_tokens=MAX_TOKENS,
                                               temperature=0)
    stream = tiny.client.chat.completions.create(model=f"{TINY}+down@2", messages=messages, max_tokens=MAX_TOKENS,
                                                 temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    body = {"model": TINY, "prompt": "abc", "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", tiny.server.base_url + "/completions", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == reference(tiny, {}, prompt="abc", max_tokens=4)


def test_stop_strings_end_the_text_and_never_stream(tiny):
    plain = reference(tiny, {}, prompt="abc", max_tokens=12)
    stop = plain[4:6]
    expected = plain[:plain.find(stop)]
    reply = tiny.client.completions.create(model=TINY, prompt="abc", max_tokens=12, temperature=0, stop=[stop])
    assert (reply.choices[0].text, reply.choices[0].finish_reason) == (expected, "stop")
    stream = tiny.client.completions.create(model=TINY, prompt="abc", max_tokens=12, temperature=0, stop=stop,
                                            stream=True)
    assert "".join(c.choices[0].text for c in stream) == expected
    longer = tiny.client.completions.create(model=TINY, prompt="abc", max_tokens=3, temperature=0)
    assert longer.choices[0].finish_reason == "length" and longer.usage.completion_tokens == 3


def test_chat_rows_stop_at_the_end_of_turn_token_as_generate_does(tmp_path):
    """The server once stopped chat rows at eos only while `generate` also stopped at the template's
    end-of-turn token; both now follow `stop_token_ids` with the rendering's turn end. Raw text
    (/v1/completions, no template) stops at eos only."""
    model, tokenizer = tiny_model("llama"), char_tokenizer()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    # Generated positions pushed towards '<|im_end|>': the plain model picks the first answer token, then the
    # turn ends.
    end = create_update(model, "vector", LAYERS - 1, positions="generated", seed=0)
    with torch.no_grad():
        end.vector.copy_(model.lm_head.weight[im_end] * 50)
    save_update(end.eval(), tmp_path / "end")
    served, stack = start_tiny(tmp_path)
    with stack:
        expected = generate_steered(served.model, served.tokenizer, ["Hello there"], served.updates["end"], [1.0],
                                    {"temperature": 0, "max_new_tokens": MAX_TOKENS},
                                    encoder=PairEncoder(served.tokenizer), progress=False)[0]
        assert expected.finished and 0 < expected.n_new_tokens < MAX_TOKENS
        reply = served.client.chat.completions.create(model=f"{TINY}+end@1", messages=user("Hello there"),
                                                      max_tokens=MAX_TOKENS, temperature=0)
        assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == (expected.text, "stop")
        assert reply.usage.completion_tokens == expected.n_new_tokens + 1  # the server counts the stop token
        streamed = served.client.chat.completions.create(model=f"{TINY}+end@1", messages=user("Hello there"),
                                                         max_tokens=MAX_TOKENS, temperature=0, stream=True)
        chunks = list(streamed)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        # The same tokens sent as raw text: eos alone stops it, so '<|im_end|>' does not end the row.
        rendered = tokenizer.apply_chat_template(user("Hello there"), add_generation_prompt=True, tokenize=False)
        raw = served.client.completions.create(model=f"{TINY}+end@1", prompt=rendered, max_tokens=MAX_TOKENS,
                                               temperature=0)
        assert raw.choices[0].finish_reason == "length" and raw.usage.completion_tokens == MAX_TOKENS


def test_seeded_sampling_is_reproducible_and_n_gives_choices(tiny):
    def sample(seed):
        reply = tiny.client.completions.create(model=TINY, prompt="abc", max_tokens=MAX_TOKENS, temperature=1.0,
                                               seed=seed, n=3)
        return [c.text for c in sorted(reply.choices, key=lambda c: c.index)]

    first = sample(7)
    assert len(first) == 3 and len(set(first)) > 1
    assert sample(7) == first
    two_prompts = tiny.client.completions.create(model=TINY, prompt=["abc", "xyz"], max_tokens=2, temperature=0)
    assert [c.index for c in two_prompts.choices] == [0, 1]


BAD_REQUESTS = [
    # (path, body, status, param, message fragment)
    ("/chat/completions", b"{not json", 400, None, "not valid JSON"),
    ("/chat/completions", b"[1, 2]", 400, None, "JSON object"),
    ("/chat/completions", {"messages": user("x")}, 400, "model", "'model' is required"),
    ("/chat/completions", {"model": TINY, "messages": []}, 400, "messages", "non-empty"),
    ("/chat/completions", {"model": "gpt-4", "messages": user("x")}, 404, "model", "not served"),
    ("/chat/completions", {"model": f"{TINY}+nope@2", "messages": user("x")}, 404, "model", "unknown update 'nope'"),
    ("/chat/completions", {"model": f"{TINY}+up@abc", "messages": user("x")}, 400, "model", "not a plain decimal"),
    ("/chat/completions", {"model": f"{TINY}+up@nan", "messages": user("x")}, 400, "model", "finite"),
    ("/chat/completions", {"model": f"{TINY}+up@-inf", "messages": user("x")}, 400, "model", "finite"),
    ("/chat/completions", {"model": f"{TINY}+up@1000", "messages": user("x")}, 400, "model", "bound of ±50"),
    ("/chat/completions", {"model": TINY, "messages": user("x"), "steering": [{"update": "nope", "multiplier": 1}]},
     400, "steering[0].update", "unknown update"),
    ("/chat/completions", {"model": TINY, "messages": user("x"), "steering": [{"update": "up", "multiplier": "4"}]},
     400, "steering[0].multiplier", "must be a number"),
    ("/chat/completions", {"model": TINY, "messages": user("x"), "steering": [{"update": "up", "multiplier": True}]},
     400, "steering[0].multiplier", "must be a number"),
    ("/chat/completions", b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "x"}], '
                          b'"steering": [{"update": "up", "multiplier": NaN}]}', 400, "steering[0].multiplier", "finite"),
    ("/chat/completions", b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "x"}], '
                          b'"steering": [{"update": "up", "multiplier": -Infinity}]}', 400, "steering[0].multiplier",
     "finite"),
    ("/chat/completions", {"model": TINY, "messages": user("x"), "steering": {"up": 1}}, 400, "steering", "list"),
    ("/chat/completions", {"model": TINY, "messages": user("x"), "steering": [{"update": "up", "multiplier": 1,
                                                                             "layer": 3}]},
     400, "steering[0]", "unknown key"),
    ("/chat/completions", {"model": f"{TINY}+up@1", "messages": user("x"),
                           "steering": [{"update": "up", "multiplier": 1}]}, 400, "steering", "named twice"),
    ("/chat/completions", {"model": TINY, "messages": user("x"), "max_tokens": 0}, 400, "max_tokens", "between"),
    ("/chat/completions", {"model": TINY, "messages": user("x"), "max_tokens": 10**6}, 400, "max_tokens", "between"),
    ("/chat/completions", {"model": TINY, "messages": user("x"), "temperature": "hot"}, 400, "temperature", "number"),
    ("/chat/completions", {"model": TINY, "messages": user("x"), "temperature": -1}, 400, "temperature", "between"),
    ("/chat/completions", {"model": TINY, "messages": user("x"), "n": 100}, 400, "n", "between"),
    ("/chat/completions", {"model": TINY, "messages": user("x" * 100)}, 400, "messages", "at most 64"),
    ("/chat/completions", {"model": TINY, "messages": user("x"), "max_tokens": 120}, 400, "max_tokens", "context"),
    ("/chat/completions", {"model": TINY, "messages": user("x"), "logprobs": True}, 400, "logprobs", "not supported"),
    ("/chat/completions", {"model": TINY, "messages": user("x"), "stop": ["a", "b", "c", "d", "e"]}, 400, "stop",
     "up to 4"),
    ("/chat/completions", {"model": TINY, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content", "only text"),
    ("/chat/completions", {"model": TINY, "messages": user("x"), "stream": "yes"}, 400, "stream", "true or false"),
    ("/completions", {"model": TINY}, 400, "prompt", "'prompt' must be"),
    ("/completions", {"model": TINY, "prompt": [5, 500]}, 400, "prompt", "outside the vocabulary"),
    ("/completions", {"model": TINY, "prompt": ""}, 400, "prompt", "empty"),
]


@pytest.mark.parametrize("path,body,status,param,fragment", BAD_REQUESTS)
def test_bad_requests_get_openai_errors(tiny, path, body, status, param, fragment):
    response = tiny.post(path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment in error["message"] and error["param"] == param
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_server_keeps_serving_after_bad_requests(tiny):
    assert tiny.post("/chat/completions", b"{").status_code == 400
    assert tiny.post("/chat/completions", b"x" * (5 << 20)).status_code == 413
    missing = httpx.get(tiny.server.base_url + "/nothing")
    assert missing.status_code == 404 and "error" in missing.json()
    with pytest.raises(openai.BadRequestError, match="bound of"):
        tiny.client.chat.completions.create(model=f"{TINY}+up@99", messages=user("x"), max_tokens=1)
    with pytest.raises(openai.NotFoundError, match="unknown update"):
        tiny.client.chat.completions.create(model=f"{TINY}+nope", messages=user("x"), max_tokens=1)
    reply = tiny.client.chat.completions.create(model=TINY, messages=user("x"), max_tokens=2, temperature=0)
    assert reply.choices[0].finish_reason in ("length", "stop")
    assert httpx.get(tiny.server.url + "/health").json()["status"] == "ok"


def test_chat_template_refusal_is_a_400(tiny):
    template = tiny.tokenizer.chat_template
    tiny.tokenizer.chat_template = "{{ raise_exception('Conversation roles must alternate') }}"
    try:
        response = tiny.post("/chat/completions", {"model": TINY, "messages": user("x")})
    finally:
        tiny.tokenizer.chat_template = template
    assert response.status_code == 400 and "roles must alternate" in response.json()["error"]["message"]


# -- queue, disconnects, shutdown (gated worker) -----------------------------------------------------------
def wait_until(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_full_queue_gives_429_and_work_resumes(gated):
    served, gate = gated
    gate.close()
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(served.client.completions.create, model=TINY, prompt="abc", max_tokens=3,
                              temperature=0)
        assert gate.reached.wait(20)
        waiting = pool.submit(served.client.completions.create, model=TINY, prompt="abc", max_tokens=3,
                              temperature=0, n=2)
        wait_until(lambda: len(served.state.generator.queue) == 2)
        refused = served.post("/completions", {"model": TINY, "prompt": "abc", "max_tokens": 3})
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
        assert refused.headers["retry-after"] == "1"
        gate.release()
        assert running.result(30).choices[0].text == reference(served, {}, prompt="abc", max_tokens=3)
        assert len(waiting.result(30).choices) == 2


def test_client_disconnect_drops_its_row(gated):
    served, gate = gated
    stats = served.state.generator.stats
    tokens_before, batches_before = stats.completion_tokens, stats.batches
    gate.close()
    body = {"model": TINY, "messages": user("go"), "max_tokens": 100, "stream": True}
    with httpx.stream("POST", served.server.base_url + "/chat/completions", json=body, timeout=30) as response:
        next(response.iter_lines())  # the role chunk; the worker is held at the gate
        assert gate.reached.wait(20)
    wait_until(lambda: served.state.in_flight == 0)
    gate.release()
    wait_until(lambda: stats.batches > batches_before)
    assert stats.completion_tokens - tokens_before < 10, "the abandoned row stopped early"
    reply = served.client.completions.create(model=TINY, prompt="abc", max_tokens=1)
    assert reply.choices[0].finish_reason in ("length", "stop")


def test_non_streaming_client_that_gives_up_frees_its_row(gated):
    served, gate = gated
    stats = served.state.generator.stats
    tokens_before, batches_before = stats.completion_tokens, stats.batches
    gate.close()
    body = {"model": TINY, "prompt": "abc", "max_tokens": 100}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(served.server.base_url + "/completions", json=body, timeout=1.0)
    assert gate.reached.wait(20)
    wait_until(lambda: served.state.in_flight == 0)
    gate.release()
    wait_until(lambda: stats.batches > batches_before and len(served.state.generator.queue) == 0)
    assert stats.completion_tokens - tokens_before < 10
    assert served.state.counters.errors_by_status.get("499", 0) >= 1


def test_graceful_shutdown_finishes_in_flight_requests(tiny_updates_dir):
    served, stack = start_tiny(tiny_updates_dir)
    gate = Gate(served.model)
    gate.close()
    body = {"model": TINY, "prompt": "abc", "max_tokens": 5, "temperature": 0, "stream": True}
    with ThreadPoolExecutor(2) as pool:
        def stream_all():
            with httpx.stream("POST", served.server.base_url + "/completions", json=body, timeout=30) as response:
                return sse_events(response)

        in_flight = pool.submit(stream_all)
        assert gate.reached.wait(20)
        stopping = pool.submit(stack.close)
        wait_until(lambda: served.server.server.should_exit)
        time.sleep(0.2)
        gate.release()
        events = in_flight.result(30)
        stopping.result(30)
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == reference(served, {}, prompt="abc", max_tokens=5)
    assert not served.state.generator.alive
    with pytest.raises(httpx.ConnectError):
        httpx.get(served.server.url + "/health", timeout=2)
    gate.remove()


# -- the real default model ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real(tmp_path_factory):
    from unisteer.engine.models import load_model

    model, tokenizer = load_model("smollm2-135m-instruct")
    folder = tmp_path_factory.mktemp("real-updates")
    save_update(random_vector_update(model, 15, 1.0, seed=1), folder / "psycho")
    save_update(random_vector_update(model, 15, 1.0, seed=2), folder / "calm")
    updates = load_updates_dir(folder, model)
    app = build_app(model, tokenizer, updates, ServerConfig(batch_wait_ms=100))
    with BackgroundServer(app) as server:
        yield Served(model, tokenizer, updates, server, "smollm2-135m-instruct")


@pytest.mark.real_model
def test_real_model_plain_zero_and_steered_match_engine(real):
    messages = user("What is the capital of France?")
    plain = reference(real, {}, messages=messages, max_tokens=5)
    for model in (real.base, f"{real.base}+psycho@0"):
        reply = real.client.chat.completions.create(model=model, messages=messages, max_tokens=5, temperature=0)
        assert reply.choices[0].message.content == plain
    steered = real.client.chat.completions.create(model=f"{real.base}+psycho@8", messages=messages, max_tokens=5,
                                                  temperature=0)
    assert steered.choices[0].message.content == reference(real, {"psycho": 8.0}, messages=messages, max_tokens=5)
    assert steered.choices[0].message.content != plain


@pytest.mark.real_model
def test_real_model_concurrent_mixed_steering(real):
    cases = [(user("Name a colour."), {}), (user("Name a colour."), {"psycho": 8.0}),
             (user("Tell me about cats, please."), {"calm": -8.0, "psycho": 4.0}),
             (user("Tell me about cats, please."), {})]
    expected = [reference(real, steering, messages=m, max_tokens=4) for m, steering in cases]

    def ask(case):
        messages, steering = case
        extra = {"steering": [{"update": n, "multiplier": m} for n, m in steering.items()]}
        reply = real.client.chat.completions.create(model=real.base, messages=messages, max_tokens=4,
                                                    temperature=0, extra_body=extra)
        return reply.choices[0].message.content

    with ThreadPoolExecutor(len(cases)) as pool:
        assert list(pool.map(ask, cases)) == expected
    assert real.state.generator.stats.largest_batch > 1
