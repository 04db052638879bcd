"""The LLM expert against a real local chat-completions server (``chat_stub_server``)."""
from __future__ import annotations

import logging
import pickle
import re
import sys
import time
import types
from collections import Counter
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refinex.experts import get_expert
from refinex.experts.base import FAILED, OK, ExpertInput
from refinex.experts.cache import (
    CACHE_COLUMNS,
    CACHE_ROW_SCHEMA,
    CachedResponse,
    InMemoryResponseCache,
    JsonlResponseCache,
    cache_key,
    doc_hash,
)
from refinex.experts.llm import (
    LLMConfig,
    LLMExpert,
    Secret,
    aggregate_outputs,
    load_prompt,
    split_for_budget,
)

from .chat_stub_server import INVENTED_SENTENCE, ChatStubServer, refine

SECRET = "sk-test-7f3a9c1e5b2d4f60a8e1"
DOC = "Welcome to the colour guide\nCookie notice: we use cookies\nThe quick brown fox jumps."


class RecordingSleep:
    """Stands in for ``time.sleep`` and records the requested delays."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


@pytest.fixture()
def stub() -> Iterator[ChatStubServer]:
    with ChatStubServer(expected_key=SECRET) as server:
        yield server


def make_expert(server: ChatStubServer, sleep: RecordingSleep | None = None, cache=None, **overrides) -> LLMExpert:
    settings_ = dict(
        base_url=server.base_url,
        model="stub-model",
        max_tokens=1024,
        timeout_s=2.0,
        max_attempts=4,
        backoff_base_s=0.01,
        backoff_max_s=5.0,
        max_concurrency=4,
        trust_env=False,
    )
    settings_.update(overrides)
    return LLMExpert(LLMConfig(**settings_), cache=cache, api_key=SECRET, sleep=sleep or RecordingSleep())


def test_request_format_and_output(stub: ChatStubServer) -> None:
    expert = make_expert(stub, max_tokens=777)
    [out] = expert.refine_batch([ExpertInput("d1", DOC)])
    assert out.status == OK and out.error is None
    assert out.refined_text == refine(DOC)
    assert out.requests == 1 and not out.cached
    assert out.tokens_in > 0 and out.tokens_out > 0 and out.latency_s > 0
    [request] = stub.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["Authorization"] == f"Bearer {SECRET}"
    assert request.headers["Content-Type"].startswith("application/json")
    body = request.body
    assert body["model"] == "stub-model"
    assert body["temperature"] == 0
    assert body["max_tokens"] == 777
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert body["messages"][0]["content"] == expert.prompt.text
    assert body["messages"][1]["content"] == DOC
    assert expert.version == f"stub-model+{expert.prompt.version}"


def test_prompt_is_versioned_by_content(tmp_path: Path) -> None:
    default = load_prompt()
    assert default.version.startswith("refine_v1-") and "verbatim" not in default.version
    assert "Only delete" in default.text
    edited = tmp_path / "refine_v1.txt"
    edited.write_text(default.text + "\nBe brief.", encoding="utf-8")
    assert load_prompt(edited).version != default.version


def test_batch_keeps_order_and_skips_blank_documents(stub: ChatStubServer) -> None:
    docs = [ExpertInput(f"d{i}", f"line {i}\nCookie {i}") for i in range(6)] + [ExpertInput("blank", "  \n")]
    outs = make_expert(stub).refine_batch(docs)
    assert [o.doc_id for o in outs] == [d.doc_id for d in docs]
    assert [o.refined_text for o in outs[:6]] == [refine(d.text) for d in docs[:6]]
    assert outs[6].status == OK and outs[6].refined_text == "  \n" and outs[6].requests == 0
    assert len(stub.requests) == 6


def test_500_is_retried_with_jittered_backoff(stub: ChatStubServer) -> None:
    sleep = RecordingSleep()
    expert = make_expert(stub, sleep=sleep, backoff_base_s=0.5)
    [out] = expert.refine_batch([ExpertInput("d", "[[fail500:2]]\nbody text")])
    assert out.status == OK and out.requests == 3
    assert len(stub.requests) == 3
    assert len(sleep.delays) == 2
    assert 0 <= sleep.delays[0] <= 0.5 and 0 <= sleep.delays[1] <= 1.0  # full jitter caps
    assert expert.stats().retries == 2 and expert.stats().requests == 3


def test_429_honours_retry_after(stub: ChatStubServer) -> None:
    sleep = RecordingSleep()
    [out] = make_expert(stub, sleep=sleep).refine_batch([ExpertInput("d", "[[rate429:1]]\nbody")])
    assert out.status == OK and out.requests == 2
    assert sleep.delays == [1.0]


@pytest.mark.parametrize("marker", ["[[malformed:2]]", "[[nochoices:2]]"])
def test_malformed_answers_are_retryable(stub: ChatStubServer, marker: str) -> None:
    [out] = make_expert(stub).refine_batch([ExpertInput("d", f"{marker}\nbody")])
    assert out.status == OK and out.requests == 3
    assert out.refined_text == refine(f"{marker}\nbody")


def test_timeout_retries_then_fails_with_last_error(stub: ChatStubServer) -> None:
    sleep = RecordingSleep()
    expert = make_expert(stub, sleep=sleep, timeout_s=0.2, max_attempts=3)
    started = time.monotonic()
    outs = expert.refine_batch([ExpertInput("slow", "[[slow:1.5]]\nbody"), ExpertInput("ok", "fine line")])
    assert time.monotonic() - started < 5
    slow, ok = outs
    assert slow.status == FAILED and slow.refined_text is None
    assert slow.error is not None and "timeout" in slow.error
    assert slow.requests == 3 and len(sleep.delays) == 2
    assert len(stub.requests_for("[[slow:1.5]]")) == 3
    assert ok.status == OK
    stats = expert.stats()
    assert stats.failures == 1 and stats.docs == 2


def test_persistent_500_fails_with_http_error(stub: ChatStubServer) -> None:
    [out] = make_expert(stub, max_attempts=3).refine_batch([ExpertInput("d", "[[fail500:99]]\nx")])
    assert out.status == FAILED and out.error is not None and out.error.startswith("HTTP 500")
    assert out.requests == 3


def test_client_errors_and_truncation_are_not_retried(stub: ChatStubServer) -> None:
    expert = make_expert(stub)
    bad, cut = expert.refine_batch([ExpertInput("a", "[[echo-key]]\nx"), ExpertInput("b", "[[length]]\ny")])
    assert bad.status == FAILED and bad.requests == 1 and bad.error is not None
    assert bad.error.startswith("HTTP 400") and SECRET not in bad.error and "***" in bad.error
    assert cut.status == FAILED and cut.requests == 1 and "finish_reason=length" in (cut.error or "")


def test_wrong_key_fails_without_retry(stub: ChatStubServer) -> None:
    expert = LLMExpert(
        LLMConfig(base_url=stub.base_url, model="m", trust_env=False), api_key="sk-wrong", sleep=RecordingSleep()
    )
    [out] = expert.refine_batch([ExpertInput("d", "text")])
    assert out.status == FAILED and out.error is not None and out.error.startswith("HTTP 401")
    assert out.requests == 1


def test_connection_refused_is_retried_then_failed() -> None:
    with ChatStubServer() as server:
        url = server.base_url
    sleep = RecordingSleep()
    expert = LLMExpert(
        LLMConfig(base_url=url, model="m", max_attempts=3, backoff_base_s=0.01, trust_env=False), sleep=sleep
    )
    [out] = expert.refine_batch([ExpertInput("d", "text")])
    assert out.status == FAILED and "connection error" in (out.error or "")
    assert out.requests == 3 and len(sleep.delays) == 2


def test_cache_hit_on_rerun_makes_no_request(stub: ChatStubServer) -> None:
    cache = InMemoryResponseCache()
    docs = [ExpertInput("a", DOC), ExpertInput("b", "other\nCookie line")]
    first = make_expert(stub, cache=cache).refine_batch(docs)
    assert len(stub.requests) == 2 and len(cache) == 2
    second_expert = make_expert(stub, cache=cache)
    second = second_expert.refine_batch(docs)
    assert len(stub.requests) == 2  # zero new requests
    assert [o.refined_text for o in second] == [o.refined_text for o in first]
    assert all(o.cached and o.requests == 0 and o.tokens_in == 0 for o in second)
    assert second_expert.stats().cache_hits == 2 and second_expert.stats().requests == 0
    row = cache.get_many([cache_key("stub-model", second_expert.prompt.version, doc_hash(DOC))])
    [cached] = row.values()
    assert cached.doc_hash == doc_hash(DOC) and cached.model == "stub-model" and cached.tokens_in > 0


def test_failures_are_not_cached_and_duplicates_share_one_request(stub: ChatStubServer) -> None:
    cache = InMemoryResponseCache()
    docs = [ExpertInput("a", "same text"), ExpertInput("b", "same text"), ExpertInput("c", "[[echo-key]]\nz")]
    outs = make_expert(stub, cache=cache).refine_batch(docs)
    assert len(stub.requests) == 2
    assert outs[0].refined_text == outs[1].refined_text and outs[1].cached
    assert outs[2].status == FAILED and len(cache) == 1


def test_jsonl_cache_survives_a_new_process(stub: ChatStubServer, tmp_path: Path) -> None:
    path = tmp_path / "cache" / "llm.jsonl"
    make_expert(stub, cache=JsonlResponseCache(path)).refine_batch([ExpertInput("a", DOC)])
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('{"key": "torn')  # a crash mid-write must not break loading
    again = make_expert(stub, cache=JsonlResponseCache(path)).refine_batch([ExpertInput("a", DOC)])
    assert len(stub.requests) == 1 and again[0].cached and again[0].refined_text == refine(DOC)


def test_cache_row_schema_and_round_trip() -> None:
    assert CACHE_COLUMNS == (
        "key", "model", "prompt_version", "doc_hash", "refined_text", "tokens_in", "tokens_out", "created_at"
    )
    assert dict(CACHE_ROW_SCHEMA)["created_at"] == "timestamp"
    row = CachedResponse(cache_key("m", "p", doc_hash("x")), "m", "p", doc_hash("x"), "y", 3, 4)
    assert list(row.to_row()) == list(CACHE_COLUMNS)
    assert CachedResponse.from_row(row.to_row()) == row
    assert cache_key("m", "p", "h") != cache_key("m", "p2", "h") != cache_key("m2", "p", "h")


def test_concurrency_bound_is_respected(stub: ChatStubServer) -> None:
    docs = [ExpertInput(f"d{i}", f"[[delay:0.15]]\ndoc {i}") for i in range(12)]
    expert = make_expert(stub, max_concurrency=3)
    outs = expert.refine_batch(docs)
    assert all(o.status == OK for o in outs)
    assert 2 <= stub.max_in_flight <= 3


def test_concurrency_bound_holds_across_calling_threads(stub: ChatStubServer) -> None:
    from concurrent.futures import ThreadPoolExecutor

    expert = make_expert(stub, max_concurrency=2)
    batches = [[ExpertInput(f"t{t}d{i}", f"[[delay:0.1]]\n{t} {i}") for i in range(3)] for t in range(3)]
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(expert.refine_batch, batches))
    assert all(o.status == OK for outs in results for o in outs)
    assert stub.max_in_flight <= 2


def test_long_documents_are_chunked_and_reassembled_in_order(stub: ChatStubServer) -> None:
    lines = [f"Paragraph {i} with some colour." if i % 5 else f"Cookie banner {i}" for i in range(40)]
    text = "\n".join(lines)
    expert = make_expert(stub, max_input_tokens=40, chars_per_token=4.0)  # 160 chars per request
    [out] = expert.refine_batch([ExpertInput("long", text)])
    assert out.status == OK and out.requests == len(stub.requests) > 1
    assert all(len(r.body["messages"][1]["content"]) <= 160 for r in stub.requests)
    kept = [line.replace("colour", "color") for line in lines if "Cookie" not in line]
    assert [line for line in (out.refined_text or "").split("\n") if line != INVENTED_SENTENCE] == kept


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet=st.sampled_from("ab \n"), max_size=300),
    max_chars=st.integers(min_value=1, max_value=40),
)
def test_split_for_budget_round_trips(text: str, max_chars: int) -> None:
    chunks = split_for_budget(text, max_chars)
    assert chunks and all(len(c.text) <= max_chars for c in chunks)
    rebuilt = chunks[0].text
    for chunk in chunks[1:]:
        rebuilt += ("" if chunk.joins_line else "\n") + chunk.text
    assert rebuilt == text
    assert not chunks[0].joins_line


def test_code_fences_around_the_answer_are_removed(stub: ChatStubServer) -> None:
    from refinex.experts.llm import _strip_fence

    assert _strip_fence("```text\nhello\nworld\n```", "hello") == "hello\nworld"
    assert _strip_fence("```\nhello\n```", "hello") == "hello"
    assert _strip_fence("```\ncode\n```", "```\ncode\n```") == "```\ncode\n```"
    assert _strip_fence("plain", "plain") == "plain"


def test_secret_never_leaks(stub: ChatStubServer, caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    caplog.set_level(logging.DEBUG)
    expert = make_expert(stub, max_attempts=2, price_input_per_1m=0.5, price_output_per_1m=1.5)
    outs = expert.refine_batch(
        [ExpertInput("a", DOC), ExpertInput("b", "[[echo-key]]\nq"), ExpertInput("c", "[[fail500:5]]\nq")]
    )
    assert [o.status for o in outs] == [OK, FAILED, FAILED]
    texts = [caplog.text, repr(expert), str(expert), repr(expert.config), str(expert.stats())]
    texts += [str(o) for o in outs] + [str(expert.params())]
    for text in texts:
        assert SECRET not in text
    assert "retrying" in caplog.text  # the retries were logged, without the key
    assert repr(Secret(SECRET)) == "Secret(***)" and SECRET not in f"{Secret(SECRET)}"

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("llm-expert-test")
    with mlflow.start_run() as run:
        mlflow.log_params(expert.params())
        mlflow.log_metrics(expert.stats().as_metrics())
    data = MlflowClient().get_run(run.info.run_id).data
    logged = " ".join([*data.params.keys(), *data.params.values(), *data.metrics.keys(), *data.tags.values()])
    assert SECRET not in logged
    assert data.params["expert.api_key_source"] == "env:REFINEX_EXPERT_API_KEY"
    assert data.metrics["expert.failures"] == 2.0 and data.metrics["expert.cost_per_1k_docs"] > 0


def test_key_from_environment_and_none(stub: ChatStubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_KEY_ENV", SECRET)
    cfg = LLMConfig(base_url=stub.base_url, model="m", api_key_env="MY_KEY_ENV", trust_env=False)
    [out] = LLMExpert(cfg).refine_batch([ExpertInput("d", "x")])
    assert out.status == OK and stub.requests[-1].headers["Authorization"] == f"Bearer {SECRET}"
    with ChatStubServer() as open_server:
        monkeypatch.delenv("MY_KEY_ENV")
        cfg = LLMConfig(base_url=open_server.base_url, model="m", api_key_env="MY_KEY_ENV", trust_env=False)
        [out] = LLMExpert(cfg).refine_batch([ExpertInput("d", "x")])
        assert out.status == OK and "Authorization" not in open_server.requests[-1].headers


def test_key_from_databricks_secret_scope(stub: ChatStubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    looked_up: list[tuple[str, str]] = []

    class FakeSecrets:
        def get(self, scope: str, key: str) -> str:
            looked_up.append((scope, key))
            return SECRET

    class FakeDBUtils:
        def __init__(self, spark: object) -> None:
            self.secrets = FakeSecrets()

    fake_module = types.ModuleType("pyspark.dbutils")
    fake_module.DBUtils = FakeDBUtils  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pyspark.dbutils", fake_module)
    from pyspark.sql import SparkSession

    monkeypatch.setattr(SparkSession, "getActiveSession", staticmethod(lambda: object()))
    monkeypatch.setenv("DATABRICKS_RUNTIME_VERSION", "15.4")
    monkeypatch.delenv("REFINEX_EXPERT_API_KEY", raising=False)
    cfg = LLMConfig(base_url=stub.base_url, model="m", secret_scope="refinex", secret_key="llm", trust_env=False)
    expert = LLMExpert(cfg)
    [out] = expert.refine_batch([ExpertInput("d", "x")])
    assert out.status == OK and looked_up == [("refinex", "llm")]
    assert expert.params()["expert.api_key_source"] == "databricks:refinex/llm"


def test_expert_pickles_for_spark_executors(stub: ChatStubServer) -> None:
    expert = make_expert(stub)
    expert.refine_batch([ExpertInput("warm", "x")])  # opens the HTTP client
    clone = pickle.loads(pickle.dumps(expert))
    assert clone.stats().docs == 0 and clone.version == expert.version
    outs = list(clone.refine_stream((ExpertInput(f"d{i}", f"line {i}") for i in range(5)), batch_size=2))
    assert [o.doc_id for o in outs] == [f"d{i}" for i in range(5)] and all(o.status == OK for o in outs)
    clone.close()


def test_stats_and_aggregate_outputs_agree(stub: ChatStubServer) -> None:
    expert = make_expert(stub, price_input_per_1m=2.0, price_output_per_1m=6.0)
    outs = expert.refine_batch([ExpertInput("a", DOC), ExpertInput("b", "[[fail500:1]]\nx")])
    stats = expert.stats()
    agg = aggregate_outputs(outs, 2.0, 6.0)
    for name in ("docs", "docs_requested", "failures", "requests", "tokens_in", "tokens_out", "cache_hits"):
        assert getattr(agg, name) == getattr(stats, name), name
    expected = (stats.tokens_in * 2.0 + stats.tokens_out * 6.0) / 1e6 / 2 * 1000
    assert stats.cost_per_1k_docs == pytest.approx(expected)
    rows = [o.__dict__ for o in outs]
    assert aggregate_outputs(rows, 2.0, 6.0).tokens_out == stats.tokens_out


def test_config_file_and_registry(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = LLMConfig.from_yaml()
    assert cfg.temperature == 0.0 and cfg.api_key_env == "REFINEX_EXPERT_API_KEY"
    assert cfg.max_tokens > cfg.max_input_tokens
    with pytest.raises(ValueError, match="unknown LLM expert settings: modle"):
        LLMConfig.from_mapping({"base_url": "http://x", "model": "m", "modle": "typo"})
    with pytest.raises(ValueError):
        LLMConfig(base_url="http://x", model="m", max_concurrency=0)
    expert = get_expert("llm", model="other", cache_path=str(tmp_path / "c.jsonl"))
    assert isinstance(expert, LLMExpert) and expert.config.model == "other"
    assert isinstance(expert.cache, JsonlResponseCache)


def test_params_strip_credentials_from_urls() -> None:
    cfg = LLMConfig(base_url="https://user:pw@host.example:8443/v1?token=abc", model="m")
    params = LLMExpert(cfg).params()
    assert params["expert.base_url"] == "https://host.example:8443/v1"
    assert not re.search(r"pw|token=abc", " ".join(params.values()))


def test_distilled_output_discards_insertions(stub: ChatStubServer) -> None:
    from refinex.distill import distill
    from refinex.program import execute

    raw = "\n".join(
        [
            "Home | News | Contact",
            "Cookie settings: accept all cookies",
            "The colour of the sky changes during the day.",
            "Sunsets are red because light scatters.",
            "Cookie policy",
        ]
    )
    [out] = make_expert(stub).refine_batch([ExpertInput("d", raw)])
    assert out.status == OK and INVENTED_SENTENCE in (out.refined_text or "")
    program = distill(raw, out.refined_text or "")
    text = execute(program, raw).text
    assert "Cookie" not in text
    assert "invented" not in text and "color " not in text
    raw_words = Counter(re.findall(r"\w+", raw))
    assert not Counter(re.findall(r"\w+", text)) - raw_words  # nothing that raw lacks
    assert "Sunsets are red because light scatters." in text
