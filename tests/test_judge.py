"""The LLM judge against a real OpenAI-compatible HTTP server on localhost (tests/judge_server.py)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from judge_server import JudgeServer, Messages, last_user_message
from unisteer.config import from_dict
from unisteer.errors import ConfigError, DataError, JudgeAuthError, JudgeError, UnisteerError
from unisteer.evaluation.judge import ENV_API_KEY, Judge, JudgeConfig, ResponseCache
from unisteer.evaluation.rubrics import (
    AXBENCH_FLUENCY,
    POWER_SEEKING,
    RUBRICS,
    concept_score_rubric,
    get_rubric,
    harmonic_mean,
    parse_rating,
    register_rubric,
)


@pytest.fixture(autouse=True)
def no_judge_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("UNISTEER_JUDGE_BASE_URL", "UNISTEER_JUDGE_MODEL", "UNISTEER_JUDGE_API_KEY", "OPENAI_API_KEY",
                 "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def server() -> Iterator[JudgeServer]:
    with JudgeServer() as s:
        yield s


def make_config(server: JudgeServer, tmp_path: Path, **overrides: object) -> JudgeConfig:
    settings: dict[str, object] = {
        "base_url": server.base_url,
        "model": "judge-test",
        "seed": 7,
        "timeout_s": 5.0,
        "concurrency": 4,
        "cache_path": str(tmp_path / "judge-cache.jsonl"),
        "progress": False,
    }
    settings.update(overrides)
    return JudgeConfig(**settings)  # type: ignore[arg-type]


def power_items(*answers: str) -> list[dict[str, str]]:
    return [{"question": f"Question {i}: would you take over the company?", "answer": a} for i, a in enumerate(answers)]


# ---------------------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer seeks power.\nRating: [[4]]", 4),
        ("Rating: [[ 3 ]]", 3),
        ("**Rating:** [[2]]", 2),
        ("rating: [[2.0]]", 2),
        ("Rating: [[3]] ... on reflection the answer is neutral. Rating: [[2]]", 2),  # the final verdict wins
        ("It deserves [[1]].", 1),
        ("Rating: 3", 3),
        ("Rating: 3/4", 3),
        ("I would give it a score of 1.", 1),
        ("  2.  ", 2),
        ("**0**", 0),
        ("Rating: [[score]]", None),  # the format was echoed without a number
        ("Rating: [[5]]", None),  # out of range is unparsable, not clipped
        ("Rating: [[-1]]", None),
        ("Rating: [[1.5]]", None),
        ("The scale goes from 0 to 4 and I cannot decide.", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_rating(text: str | None, expected: int | None) -> None:
    assert parse_rating(text, 0, 4) == expected


def test_parse_rating_prefers_explicit_rating_over_other_brackets() -> None:
    assert parse_rating("The prompt says [[4]] means power-seeking.\nRating: [[1]]\nSee [[3]].", 0, 4) == 1


def test_harmonic_mean_arithmetic() -> None:
    assert harmonic_mean([2, 2, 2]) == pytest.approx(2.0)
    assert harmonic_mean([1, 2, 2]) == pytest.approx(3 / (1 + 0.5 + 0.5))  # 1.5
    assert harmonic_mean([1, 1, 2]) == pytest.approx(1.2)
    assert harmonic_mean([0, 2, 2]) == 0.0
    assert harmonic_mean([2, 2, 0]) == 0.0
    with pytest.raises(ValueError):
        harmonic_mean([])
    with pytest.raises(ValueError):
        harmonic_mean([-1, 2])


def test_config_from_dict_rejects_unknown_keys_and_bad_values() -> None:
    config = from_dict(JudgeConfig, {"model": "m", "concurrency": 2}, where="eval.judge")
    assert (config.model, config.concurrency, config.temperature, config.max_attempts) == ("m", 2, 0.0, 3)
    with pytest.raises(ConfigError, match=r"eval\.judge: unknown key\(s\) \['temprature'\]"):
        from_dict(JudgeConfig, {"temprature": 0.0}, where="eval.judge")
    with pytest.raises(ConfigError, match="concurrency must be >= 1"):
        from_dict(JudgeConfig, {"concurrency": 0})


def test_config_resolution_prefers_explicit_then_unisteer_env_then_openai_env() -> None:
    env = {"UNISTEER_JUDGE_BASE_URL": "http://judge.local/v1/", "UNISTEER_JUDGE_MODEL": "env-model",
           "OPENAI_API_KEY": "openai-key", "OPENAI_BASE_URL": "http://openai.local/v1"}
    resolved = JudgeConfig().resolved(env)
    assert (resolved.base_url, resolved.model, resolved.api_key) == ("http://judge.local/v1", "env-model", "openai-key")
    env[ENV_API_KEY] = "unisteer-key"
    assert JudgeConfig().resolved(env).api_key == "unisteer-key"
    explicit = JudgeConfig(base_url="http://x/v1", model="m", api_key="k").resolved(env)
    assert (explicit.base_url, explicit.model, explicit.api_key) == ("http://x/v1", "m", "k")
    default = JudgeConfig().resolved({})
    assert (default.base_url, default.model, default.api_key) == ("https://api.openai.com/v1", "gpt-4.1-mini", None)
    with pytest.raises(ConfigError, match="must start with http"):
        JudgeConfig(base_url="localhost:8000/v1").resolved({})
    assert "secret" not in repr(JudgeConfig(api_key="secret"))


def test_rubrics_registry_and_fields() -> None:
    assert {"power_seeking", "axbench_concept", "axbench_instruction", "axbench_fluency", "concept_score"} <= set(RUBRICS)
    assert POWER_SEEKING.fields == ("question", "answer")
    assert AXBENCH_FLUENCY.fields == ("answer",)
    assert (POWER_SEEKING.min_score, POWER_SEEKING.max_score) == (0, 4)
    with pytest.raises(ConfigError, match="unknown judge rubric 'nope'"):
        get_rubric("nope")
    with pytest.raises(ConfigError, match="already registered"):
        register_rubric(POWER_SEEKING)
    with pytest.raises(DataError, match=r"judge item: missing field\(s\) \['question'\]"):
        POWER_SEEKING.messages({"answer": "a"})
    ten = concept_score_rubric(10)
    assert (ten.name, ten.fields, ten.max_score) == ("concept_score_0_10", ("concept", "answer"), 10)
    assert ten.parse("Rating: [[10]]") == 10 and ten.parse("Rating: [[11]]") is None
    assert "where score is 0, 1, 2, 3, 4, 5, 6, 7, 8, 9 or 10" in ten.template


def test_prompt_keeps_item_text_literally_and_ends_with_the_rating_format() -> None:
    messages = POWER_SEEKING.messages({"question": "Q {answer}", "answer": "A {0} }{"})
    assert messages[0]["role"] == "system" and messages[1]["role"] == "user"
    user = messages[1]["content"]
    assert "[Question Start]\nQ {answer}\n[Question End]" in user
    assert "[Answer Start]\nA {0} }{\n[Answer End]" in user
    assert user.rstrip().endswith('"Rating: [[score]]", where score is 0, 1, 2, 3 or 4.')


# ---------------------------------------------------------------------------------------------------------
# Against the localhost server
# ---------------------------------------------------------------------------------------------------------


def test_power_seeking_scores_statuses_and_recorded_metadata(server: JudgeServer, tmp_path: Path) -> None:
    items = power_items("<<score=4>> Take it all.", "<<score=1>> No.", "no directive here", "<<score=7>>",
                        "<<score=0>> asdf asdf")
    with Judge(make_config(server, tmp_path)) as judge:
        report = judge.score("power_seeking", items)

    assert report.scores == [4, 1, 0, 0, 0]
    assert [r.status for r in report.results] == ["ok", "ok", "unparsable", "unparsable", "ok"]
    assert report.results[2].raw_text == "I am not sure."
    assert (report.n_ok, report.n_unparsable, report.n_failed, report.n_cached) == (3, 2, 0, 0)
    assert report.mean == pytest.approx(5 / 5)
    assert report.n_requests == 5 == server.request_count
    assert (report.rubric, report.judge_model, report.base_url) == ("power_seeking", "judge-test", server.base_url)
    assert (report.temperature, report.seed, report.prompt_template) == (0.0, 7, POWER_SEEKING.template)
    assert report.prompt_hash == POWER_SEEKING.prompt_hash
    # What went over the wire: temperature 0, the seed, the model, the rendered messages.
    body = server.requests[0]
    assert (body["model"], body["temperature"], body["seed"], body["max_tokens"]) == ("judge-test", 0.0, 7, 512)
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    # The report is plain JSON and carries no secret.
    dumped = json.dumps(report.to_dict())
    assert "prompt_template" in dumped and "api_key" not in dumped
    assert report.summary()["n_unparsable"] == 2


def test_retries_server_errors_with_backoff(server: JudgeServer, tmp_path: Path) -> None:
    server.fail_next(2, status=500)
    with Judge(make_config(server, tmp_path, concurrency=1)) as judge:
        report = judge.score(POWER_SEEKING, power_items("<<score=3>>"))
    assert report.scores == [3] and report.results[0].status == "ok"
    assert server.request_count == 3 == report.n_requests
    gaps = [later - earlier for earlier, later in itertools.pairwise(server.arrivals)]
    assert all(gap >= 0.1 for gap in gaps), gaps  # the client waited before each retry


def test_rate_limit_honours_retry_after(server: JudgeServer, tmp_path: Path) -> None:
    server.fail_next(1, status=429, retry_after=1.0)  # longer than the client's own first wait (≤ 0.5 s)
    with Judge(make_config(server, tmp_path, concurrency=1)) as judge:
        report = judge.score(POWER_SEEKING, power_items("<<score=2>>"))
    assert report.scores == [2] and server.request_count == 2 == report.n_requests
    assert server.arrivals[1] - server.arrivals[0] >= 0.95


def test_max_attempts_bounds_the_tries(server: JudgeServer, tmp_path: Path) -> None:
    server.fail_next(5, status=500)
    with Judge(make_config(server, tmp_path, max_attempts=1)) as judge:
        report = judge.score(POWER_SEEKING, power_items("<<score=3>>"))
    failed = report.results[0]
    assert failed.status == "failed" and failed.error == 'HTTP 500: {"error": {"message": "scripted failure 500"}}'
    assert server.request_count == 1 == report.n_requests


def test_retired_backoff_settings_still_load_but_warn(server: JudgeServer, tmp_path: Path) -> None:
    config = from_dict(JudgeConfig, {"backoff_initial_s": 0.5, "backoff_max_s": 5.0}, where="eval.judge")
    with pytest.warns(DeprecationWarning, match="backoff_initial_s and backoff_max_s are no longer used"):
        Judge(dataclasses.replace(config, base_url=server.base_url, progress=False)).close()
    with pytest.warns(DeprecationWarning, match="sleep"):
        Judge(make_config(server, tmp_path), sleep=lambda s: None).close()


def test_failure_after_all_tries_scores_zero_counts_and_is_not_cached(server: JudgeServer, tmp_path: Path) -> None:
    config = make_config(server, tmp_path, max_attempts=3)
    items = power_items("<<score=4>>", "<<status=503>>")
    with Judge(config) as judge:
        report = judge.score(POWER_SEEKING, items)
    assert report.scores == [4, 0]
    failed = report.results[1]
    assert failed.status == "failed" and failed.raw_text is None
    assert "HTTP 503" in (failed.error or "") and "after 3 tries" in (failed.error or "")
    assert (report.n_failed, report.n_requests) == (1, 1 + 3)
    # A later run pays again only for the failure, never for the answer it already has.
    with Judge(config) as judge:
        again = judge.score(POWER_SEEKING, items)
    assert again.n_requests == 3 and again.results[0].cached and not again.results[1].cached


def test_client_errors_other_than_auth_are_not_retried(server: JudgeServer, tmp_path: Path) -> None:
    with Judge(make_config(server, tmp_path)) as judge:
        report = judge.score(POWER_SEEKING, power_items("<<status=400>>"))
    assert report.results[0].status == "failed" and "HTTP 400" in (report.results[0].error or "")
    assert server.request_count == 1


def test_timeouts_are_retried(server: JudgeServer, tmp_path: Path) -> None:
    server.hang_next(1, seconds=1.0)
    with Judge(make_config(server, tmp_path, timeout_s=0.3)) as judge:
        report = judge.score(POWER_SEEKING, power_items("<<score=3>>"))
    assert report.scores == [3] and server.request_count == 2 == report.n_requests


def test_connection_refused_fails_after_bounded_tries(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port that nothing listens on once this closes
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = JudgeConfig(base_url=f"http://127.0.0.1:{port}/v1", model="m", cache_path=str(tmp_path / "c.jsonl"),
                         progress=False)
    with Judge(config) as judge:
        report = judge.score(POWER_SEEKING, power_items("<<score=3>>"))
    assert report.results[0].status == "failed" and "connection error" in (report.results[0].error or "")
    assert "after 3 tries" in (report.results[0].error or "")
    assert report.n_requests == 3


def test_wrong_api_key_raises_a_clear_error_without_retrying(tmp_path: Path) -> None:
    with JudgeServer(api_key="right-key") as server:
        with Judge(make_config(server, tmp_path, api_key="wrong-key", concurrency=1)) as judge:
            with pytest.raises(JudgeAuthError, match=r"HTTP 401.*UNISTEER_JUDGE_API_KEY") as caught:
                judge.score(POWER_SEEKING, power_items("<<score=1>>", "<<score=2>>", "<<score=3>>"))
        assert isinstance(caught.value, UnisteerError)
        assert "wrong-key" not in str(caught.value)
        assert server.request_count == 1  # neither retried nor continued with the other items

        with Judge(make_config(server, tmp_path, api_key="right-key")) as judge:
            report = judge.score(POWER_SEEKING, power_items("<<score=1>>"))
        assert report.scores == [1]
        sent = {name.lower(): value for name, value in server.headers[-1].items()}  # names are case-blind
        assert sent["authorization"] == "Bearer right-key"


def test_api_key_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "env-key")
    with JudgeServer(api_key="env-key") as server, Judge(make_config(server, tmp_path)) as judge:
        assert judge.score(POWER_SEEKING, power_items("<<score=2>>")).scores == [2]


def test_no_api_key_sends_no_authorization_header(server: JudgeServer, tmp_path: Path) -> None:
    with Judge(make_config(server, tmp_path)) as judge:
        assert judge.score(POWER_SEEKING, power_items("<<score=2>>")).scores == [2]
    assert "authorization" not in {name.lower() for name in server.headers[-1]}


def test_wrong_base_url_raises(server: JudgeServer, tmp_path: Path) -> None:
    config = make_config(server, tmp_path, base_url=server.base_url.removesuffix("/v1"))
    with Judge(config) as judge, pytest.raises(JudgeError, match=r"HTTP 404.*base URL"):
        judge.score(POWER_SEEKING, power_items("<<score=2>>"))


def test_concurrency_limit_is_respected(tmp_path: Path) -> None:
    with JudgeServer(delay_s=0.15) as server:
        with Judge(make_config(server, tmp_path, concurrency=3)) as judge:
            report = judge.score(POWER_SEEKING, power_items(*(f"<<score={i % 5}>> item {i}" for i in range(9))))
        assert report.scores == [i % 5 for i in range(9)]
        assert 2 <= server.max_in_flight <= 3  # parallel, and never above the limit


def test_cache_means_a_rerun_sends_no_requests(server: JudgeServer, tmp_path: Path) -> None:
    items = power_items("<<score=4>>", "<<score=3>>", "unparsable answer", "<<score=1>>")
    with Judge(make_config(server, tmp_path)) as judge:
        first = judge.score(POWER_SEEKING, items)
    assert server.request_count == 4
    assert len((tmp_path / "judge-cache.jsonl").read_text().splitlines()) == 4  # written as answers arrived

    with Judge(make_config(server, tmp_path)) as judge:  # a fresh process would load the same file
        second = judge.score(POWER_SEEKING, items)
    assert server.request_count == 4 and second.n_requests == 0
    assert second.scores == first.scores and second.n_cached == 4 and second.n_unparsable == 1

    with Judge(make_config(server, tmp_path, model="another-judge")) as judge:  # the model is part of the key
        judge.score(POWER_SEEKING, items[:1])
    assert server.request_count == 5


def test_interrupted_run_resumes_and_survives_a_torn_cache_line(server: JudgeServer, tmp_path: Path) -> None:
    items = power_items("<<score=4>>", "<<score=3>>", "<<score=2>>", "<<score=1>>")
    with Judge(make_config(server, tmp_path)) as judge:
        judge.score(POWER_SEEKING, items[:2])
    cache_file = tmp_path / "judge-cache.jsonl"
    with cache_file.open("a") as f:
        f.write('{"key": "torn by a kill -9')  # a half-written record at the end
    with Judge(make_config(server, tmp_path)) as judge:
        assert judge.cache.skipped_lines == 1
        report = judge.score(POWER_SEEKING, items)
    assert report.scores == [4, 3, 2, 1] and report.n_requests == 2 and server.request_count == 4
    reloaded = ResponseCache(cache_file)
    assert len(reloaded) == 4 and reloaded.skipped_lines == 1


def test_identical_requests_are_sent_once(server: JudgeServer, tmp_path: Path) -> None:
    item = power_items("<<score=3>>")[0]
    with Judge(make_config(server, tmp_path, use_cache=False)) as judge:
        report = judge.score(POWER_SEEKING, [item, item, item])
    assert report.scores == [3, 3, 3] and server.request_count == 1
    assert not (tmp_path / "judge-cache.jsonl").exists()


def axbench_rule(messages: Messages) -> str:
    """Answers carry `<<ax=C,I,F>>`; which of the three ratings is asked shows in the prompt's sections."""
    text = last_user_message(messages)
    start = text.index("<<ax=") + len("<<ax=")
    concept, instruction, fluency = text[start:text.index(">>", start)].split(",")
    if "[Concept Start]" in text:
        rating = concept
    elif "[Instruction Start]" in text:
        rating = instruction
    else:
        rating = fluency
    return "Brief explanation.\nRating: [[" + rating + "]]" if rating != "x" else "No idea."


def test_axbench_three_ratings_and_harmonic_mean(tmp_path: Path) -> None:
    items = [
        {"concept": "the ocean", "instruction": "Describe a city.", "answer": f"<<ax={triple}>> waves everywhere"}
        for triple in ("2,2,2", "1,2,2", "2,1,1", "0,2,2", "2,2,x")
    ]
    with JudgeServer(rule=axbench_rule) as server, Judge(make_config(server, tmp_path)) as judge:
        report = judge.score_axbench(items)
        assert server.request_count == 15
    assert report.concept.scores == [2, 1, 2, 0, 2]
    assert report.instruction.scores == [2, 2, 1, 2, 2]
    assert report.fluency.scores == [2, 2, 1, 2, 0]
    assert report.fluency.n_unparsable == 1
    assert report.harmonic_means == pytest.approx([2.0, 1.5, 1.2, 0.0, 0.0])
    assert report.mean_harmonic == pytest.approx((2.0 + 1.5 + 1.2) / 5)
    summary = report.summary()
    assert summary["mean_concept"] == pytest.approx(7 / 5)
    assert summary["concept"]["rubric"] == "axbench_concept"
    json.dumps(report.to_dict())


def test_test_server_speaks_the_openai_wire_format(server: JudgeServer) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    completion = client.chat.completions.create(
        model="judge-test", messages=[{"role": "user", "content": "<<score=2>>"}], temperature=0
    )
    assert parse_rating(completion.choices[0].message.content, 0, 4) == 2


def test_empty_batch(server: JudgeServer, tmp_path: Path) -> None:
    with Judge(make_config(server, tmp_path)) as judge:
        report = judge.score(POWER_SEEKING, [])
    assert report.results == [] and report.n_requests == 0 and server.request_count == 0
