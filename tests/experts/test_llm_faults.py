"""The LLM expert survives endpoint faults (a real local server, ``chat_stub_server``).

Every fault is retried up to ``max_attempts``; when it persists, the document's output is
``FAILED`` with the error (the stage's ``expert_failed``), the batch still completes and a
rerun requests only the failed documents (successes are in the response cache). Faults
already proven in ``test_llm.py`` are not repeated here: a persistent 500 and a persistent
timeout, 500/429/truncated-JSON/no-choices answers that recover, connection refused.
"""
from __future__ import annotations

import re
import time
from typing import Callable, Iterator, Optional

import pytest

from refinex.experts.base import FAILED, OK, ExpertInput
from refinex.experts.cache import InMemoryResponseCache
from refinex.experts.llm import LLMConfig, LLMExpert

from .chat_stub_server import ChatStubServer, refine

MAX_ATTEMPTS = 3


class Sleep:
    """Stands in for ``time.sleep``: records the delays, and really waits when ``real``."""

    def __init__(self, real: bool = False) -> None:
        self.real = real
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        if self.real:
            time.sleep(seconds)


@pytest.fixture()
def server() -> Iterator[ChatStubServer]:
    with ChatStubServer(hang_s=1.0) as stub:
        yield stub


def make_expert(
    base_url: str, sleep: Optional[Callable[[float], None]] = None, cache=None, **overrides
) -> LLMExpert:
    settings = dict(
        base_url=base_url, model="stub-model", max_tokens=1024, timeout_s=0.3, max_attempts=MAX_ATTEMPTS,
        backoff_base_s=0.01, backoff_max_s=5.0, max_concurrency=4, trust_env=False,
    )
    settings.update(overrides)
    return LLMExpert(LLMConfig(**settings), cache=cache, sleep=sleep or Sleep())


# A fault the server keeps answering with (N=99), and the error the document fails with.
PERSISTENT = {
    "503": ("[[fail503:99]]", r"^HTTP 503: "),
    "429": ("[[rate429:99]]", r"^HTTP 429: "),
    "html body": ("[[notjson:99]]", r"^malformed response: not JSON$"),
    "truncated JSON": ("[[malformed:99]]", r"^malformed response: not JSON$"),
    "body cut short": ("[[truncated:99]]", r"^connection error \(RemoteProtocolError: peer closed connection without sending complete"),
    "undecodable body": ("[[badgzip:99]]", r"^malformed response: undecodable body"),
    "no choices": ("[[nochoices:99]]", r"^malformed response: no choices$"),
    "empty choices": ("[[emptychoices:99]]", r"^malformed response: no choices$"),
    "null content": ("[[nullcontent:99]]", r"^malformed response: no message content$"),
}


@pytest.mark.parametrize("marker, error", list(PERSISTENT.values()), ids=list(PERSISTENT))
def test_a_persistent_fault_is_retried_then_fails_the_document_only(
    server: ChatStubServer, marker: str, error: str
) -> None:
    sleep = Sleep()
    cache = InMemoryResponseCache()
    expert = make_expert(server.base_url, sleep, cache)
    bad_text, good_text = f"{marker}\nbody text", "a healthy document\nCookie banner"
    bad, good = expert.refine_batch([ExpertInput("bad", bad_text), ExpertInput("good", good_text)])
    assert bad.status == FAILED and bad.refined_text is None
    assert bad.error is not None and re.search(error, bad.error), bad.error
    assert bad.requests == MAX_ATTEMPTS and len(server.requests_for(marker)) == MAX_ATTEMPTS
    assert len(sleep.delays) == MAX_ATTEMPTS - 1  # a backoff before every retry
    assert good.status == OK and good.refined_text == refine(good_text) and good.requests == 1
    stats = expert.stats()
    assert (stats.failures, stats.retries, stats.requests) == (1, MAX_ATTEMPTS - 1, MAX_ATTEMPTS + 1)
    assert len(cache) == 1  # the failure is not cached: a rerun asks again


# A fault the server answers the first two requests with; the third attempt succeeds.
TRANSIENT = {
    "503": "[[fail503:2]]",
    "html body": "[[notjson:2]]",
    "body cut short": "[[truncated:2]]",
    "undecodable body": "[[badgzip:2]]",
    "empty choices": "[[emptychoices:2]]",
    "null content": "[[nullcontent:2]]",
    "timeout": "[[hang:2]]",  # the server waits 1 s, the client 0.3 s
}


@pytest.mark.parametrize("marker", list(TRANSIENT.values()), ids=list(TRANSIENT))
def test_a_transient_fault_is_retried_until_it_succeeds(server: ChatStubServer, marker: str) -> None:
    sleep = Sleep()
    expert = make_expert(server.base_url, sleep)
    text = f"{marker}\nWelcome to the colour guide\nCookie notice"
    [out] = expert.refine_batch([ExpertInput("d", text)])
    assert out.status == OK and out.error is None and out.refined_text == refine(text)
    assert out.requests == 3 and len(server.requests_for(marker)) == 3 and len(sleep.delays) == 2
    assert expert.stats().retries == 2


def test_a_timeout_is_the_clients_own_limit(server: ChatStubServer) -> None:
    expert = make_expert(server.base_url, timeout_s=0.2, max_attempts=2)
    started = time.monotonic()
    [out] = expert.refine_batch([ExpertInput("d", "[[hang:5]]\nbody")])
    elapsed = time.monotonic() - started
    assert out.status == FAILED and (out.error or "").startswith("timeout after 0.2s")
    assert 0.4 <= elapsed < 1.5  # two attempts of 0.2 s each, not the server's 1 s each


@pytest.mark.parametrize("marker", ["[[rate429:1]]", "[[fail503:1]]"])
def test_retry_after_is_honoured_in_real_time(server: ChatStubServer, marker: str) -> None:
    sleep = Sleep(real=True)
    expert = make_expert(server.base_url, sleep, backoff_base_s=0.001)  # own backoff: <= 1 ms
    text = f"{marker}[[retry-after:0.4]]\nbody"
    [out] = expert.refine_batch([ExpertInput("d", text)])
    assert out.status == OK and out.requests == 2
    assert sleep.delays == [0.4]
    first, second = server.requests_for(marker)
    assert 0.4 <= second.at - first.at < 1.5  # the server saw the client wait


def test_retry_after_as_an_http_date(server: ChatStubServer) -> None:
    sleep = Sleep()
    [out] = make_expert(server.base_url, sleep).refine_batch([ExpertInput("d", "[[rate429:1]][[retry-after-date:3]]\nx")])
    assert out.status == OK and out.requests == 2
    [delay] = sleep.delays
    assert 1.5 < delay <= 3.0  # the date has a one-second resolution; jitter would be <= 0.01


@pytest.mark.parametrize("cap", [0.2, 0.0])
def test_retry_after_is_bounded_by_the_clients_max_wait(server: ChatStubServer, cap: float) -> None:
    sleep = Sleep(real=cap > 0)  # cap 0: a regression fails at once instead of waiting 30 s
    expert = make_expert(server.base_url, sleep, backoff_max_s=cap)
    marker = "[[rate429:2]][[retry-after:30]]"
    started = time.monotonic()
    [out] = expert.refine_batch([ExpertInput("d", f"{marker}\nbody")])
    assert out.status == OK and out.requests == 3
    assert sleep.delays == [cap, cap]  # not the server's 30 s
    assert time.monotonic() - started < 2 * cap + 1.5
    arrivals = [r.at for r in server.requests_for(marker)]
    assert all(cap <= b - a < cap + 0.8 for a, b in zip(arrivals, arrivals[1:]))


def test_a_persistent_429_waits_retry_after_each_time_then_fails(server: ChatStubServer) -> None:
    sleep = Sleep()
    [out] = make_expert(server.base_url, sleep).refine_batch([ExpertInput("d", "[[rate429:99]]\nbody")])
    assert out.status == FAILED and (out.error or "").startswith("HTTP 429")
    assert out.requests == MAX_ATTEMPTS and sleep.delays == [1.0] * (MAX_ATTEMPTS - 1)


def test_an_empty_answer_is_the_prompts_all_noise_answer_by_default(server: ChatStubServer) -> None:
    """``refine_v1`` asks for nothing when the whole input is noise: that is an answer."""
    [out] = make_expert(server.base_url).refine_batch([ExpertInput("d", "[[empty:99]]\nShare | Like | Follow")])
    assert out.status == OK and out.refined_text == "" and out.requests == 1


def test_an_empty_answer_is_retried_then_failed_when_not_ok(server: ChatStubServer) -> None:
    sleep = Sleep()
    expert = make_expert(server.base_url, sleep, empty_answer_ok=False)
    assert expert.params()["expert.empty_answer_ok"] == "False"
    recovers, stays = expert.refine_batch(
        [ExpertInput("recovers", "[[empty:2]]\nbody"), ExpertInput("stays", "[[empty:99]]\nbody")]
    )
    assert recovers.status == OK and recovers.refined_text == refine("[[empty:2]]\nbody") and recovers.requests == 3
    assert stays.status == FAILED and stays.refined_text is None and stays.requests == MAX_ATTEMPTS
    assert (stays.error or "").startswith("empty answer")
    assert len(server.requests_for("[[empty:99]]")) == MAX_ATTEMPTS


def test_a_batch_mixing_every_fault_completes(server: ChatStubServer) -> None:
    faults = {**{name: marker for name, (marker, _) in PERSISTENT.items()},
              "500": "[[fail500:99]]", "timeout": "[[slow:1]]", "truncated answer": "[[length]]"}
    docs = [ExpertInput(name, f"{marker}\nbody of {name}") for name, marker in faults.items()]
    docs += [ExpertInput(f"ok{i}", f"healthy {i}\nCookie line {i}") for i in range(3)]
    expert = make_expert(server.base_url, Sleep(real=True), backoff_max_s=0.05)
    started = time.monotonic()
    outs = expert.refine_batch(docs)
    assert time.monotonic() - started < 10
    assert [o.doc_id for o in outs] == [d.doc_id for d in docs]
    by_id = {o.doc_id: o for o in outs}
    for name in faults:
        out = by_id[name]
        assert out.status == FAILED and out.refined_text is None and out.error, name
        assert out.requests == (1 if name == "truncated answer" else MAX_ATTEMPTS), name  # finish_reason=length: final
    for name, (_, error) in PERSISTENT.items():
        assert re.search(error, by_id[name].error or ""), name
    assert by_id["timeout"].error.startswith("timeout") and by_id["500"].error.startswith("HTTP 500")
    assert all(by_id[f"ok{i}"].status == OK and by_id[f"ok{i}"].requests == 1 for i in range(3))
    assert expert.stats().failures == len(faults)


def test_a_server_dying_mid_run_fails_the_rest_and_a_rerun_retries_only_them() -> None:
    docs = [ExpertInput(f"d{i}", f"document {i}\nCookie {i}") for i in range(6)]
    cache = InMemoryResponseCache()
    dying = ChatStubServer(die_after=3).start()
    port = dying.port
    expert = make_expert(dying.base_url, cache=cache, max_concurrency=1)  # one at a time: a known order
    try:
        first = expert.refine_batch(docs)
    finally:
        dying.stop()
    assert [o.status for o in first] == [OK] * 3 + [FAILED] * 3
    assert all("connection error" in (o.error or "") and o.requests == MAX_ATTEMPTS for o in first[3:])
    assert len(dying.requests) == 4 and dying.dead  # 3 answered, the 4th killed it unanswered
    assert len(cache) == 3

    with ChatStubServer(port=port) as back:  # the endpoint is back at the same address
        second = expert.refine_batch(docs)
    assert all(o.status == OK for o in second)
    assert [o.cached for o in second] == [True] * 3 + [False] * 3
    assert [o.requests for o in second] == [0] * 3 + [1] * 3
    assert sorted(r.body["messages"][1]["content"] for r in back.requests) == [d.text for d in docs[3:]]


def test_refused_connections_fail_and_a_rerun_succeeds_once_the_endpoint_is_up() -> None:
    with ChatStubServer() as gone:
        url = gone.base_url
        port = gone.port
    sleep = Sleep()
    expert = make_expert(url, sleep)
    docs = [ExpertInput(f"d{i}", f"text {i}") for i in range(3)]
    first = expert.refine_batch(docs)
    assert all(o.status == FAILED and "connection error" in (o.error or "") for o in first)
    assert all(o.requests == MAX_ATTEMPTS for o in first) and len(sleep.delays) == 3 * (MAX_ATTEMPTS - 1)
    with ChatStubServer(port=port) as up:
        second = expert.refine_batch(docs)
    assert all(o.status == OK and o.requests == 1 for o in second) and len(up.requests) == 3
