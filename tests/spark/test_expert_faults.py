"""The expert stage survives endpoint faults: failed documents, never a failed stage.

A local chat server (``tests/experts/chat_stub_server.py``) has an outage for some documents
(HTTP 500 for every request whose text contains ``FLAKY``), then comes back at the same
address but dies after answering one request, then comes back healthy. Each run completes,
every document keeps exactly one ``expert_refinements`` row, failures carry their error and
become ``expert_failed`` in ``refined_documents``, and each rerun sends requests only for the
documents that failed before (the server counts them).
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from refinex.config import Config
from refinex.spark.expert import configure_expert
from refinex.spark.registry import run_stage
from refinex.spark.tables import TABLES, merge_into, read_table
from refinex.status import ALL_STATUSES, EXPERT_FAILED

# tests/experts, importable as the package ``experts`` (pytest puts tests/ on sys.path).
from experts.chat_stub_server import ChatStubServer

NOW = datetime(2025, 1, 1, tzinfo=timezone.utc)
MAX_ATTEMPTS = 3
LLM_OPTIONS: dict[str, Any] = {
    "model": "stub-model", "max_tokens": 1024, "timeout_s": 5.0, "max_attempts": MAX_ATTEMPTS,
    "backoff_base_s": 0.01, "backoff_max_s": 0.05, "trust_env": False, "max_concurrency": 4,
}
BODY = "The northern rivers carry cold water from the mountains to the sea, and they freeze every winter."


def page(title: str) -> str:
    return f"{title}\nWelcome to the colour guide\nCookie notice: we use cookies\n{BODY}"


def documents(spark: SparkSession, texts: dict[str, str]) -> DataFrame:
    data = [
        (doc_id, "test", None, text, None, None, 0, "file:/in.jsonl", i + 1, len(text), text.count("\n") + 1, NOW)
        for i, (doc_id, text) in enumerate(texts.items())
    ]
    return spark.createDataFrame(data, TABLES["documents"].schema)


def expert_rows(spark: SparkSession, workdir: str, n_docs: int) -> dict[str, Any]:
    """The ``expert_refinements`` rows by document: exactly one per document, a known status."""
    rows = read_table(spark, workdir, "expert_refinements").collect()
    by_id = {r["doc_id"]: r for r in rows}
    assert len(rows) == len(by_id) == n_docs
    assert {r["status"] for r in rows} <= {"ok", "failed"}
    for r in rows:
        assert (r["refined_text"] is None) == (r["status"] == "failed")
        assert (r["error"] is None) == (r["status"] == "ok")
    return by_id


def refined_statuses(spark: SparkSession, config: Config, workdir: str) -> dict[str, str]:
    """distill + apply, then ``refined_documents``' status by document (one row each)."""
    run_stage("distill", spark, config, workdir, expert="llm")
    run_stage("apply", spark, config, workdir)
    rows = read_table(spark, workdir, "refined_documents").where(F.col("origin") == "distilled").collect()
    statuses = {r["doc_id"]: r["status"] for r in rows}
    assert len(rows) == len(statuses) and set(statuses.values()) <= set(ALL_STATUSES)
    return statuses


def asked(server: Any) -> list[str]:
    """The document texts the server received, sorted."""
    return sorted(r.body["messages"][1]["content"] for r in server.requests)


@pytest.mark.slow  # seven stage runs: about 2.5 min on 2 busy cores
def test_endpoint_faults_fail_documents_and_reruns_retry_only_them(
    spark: SparkSession, spark_config: Config, workdir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REFINEX_EXPERT_API_KEY", raising=False)
    texts = {f"doc{i}": page(f"Doc {i}") for i in range(4)}
    texts.update({f"flaky{i}": page(f"Flaky {i} FLAKY") for i in range(2)})
    flaky = sorted(d for d in texts if d.startswith("flaky"))
    merge_into(spark, workdir, "documents", documents(spark, texts))

    # 1. An outage for the FLAKY documents: retried, then failed with the HTTP error.
    with ChatStubServer() as server:
        server.failing["FLAKY"] = 500
        port = server.port
        config = configure_expert(spark_config, "llm", base_url=server.base_url)
        config = config.with_overrides({"expert.options": {**config.expert.options, **LLM_OPTIONS},
                                        "expert.mlflow": False})
        first = run_stage("expert", spark, config, workdir)
    assert (first["processed"], first["ok"], first["failed"]) == (6, 4, 2)
    assert first["requests"] == len(server.requests) == 4 + 2 * MAX_ATTEMPTS
    assert asked(server) == sorted([texts[d] for d in texts if d not in flaky] + [texts[d] for d in flaky] * MAX_ATTEMPTS)
    rows = expert_rows(spark, workdir, len(texts))
    assert sorted(d for d, r in rows.items() if r["status"] == "failed") == flaky
    assert all(rows[d]["error"].startswith("HTTP 500") and rows[d]["requests"] == MAX_ATTEMPTS for d in flaky)
    statuses = refined_statuses(spark, config, workdir)
    assert set(statuses) == set(texts)
    assert sorted(d for d, s in statuses.items() if s == EXPERT_FAILED) == flaky
    assert all(statuses[d] == "refined" for d in texts if d not in flaky)

    # 2. Back at the same address, but it dies after one answer: only the failed documents
    #    are asked for; one is refined, the other fails with the connection error.
    with ChatStubServer(port=port, die_after=1) as server:
        second = run_stage("expert", spark, config, workdir)
    assert (second["processed"], second["skipped_existing"], second["ok"], second["failed"]) == (2, 4, 1, 1)
    assert server.dead and asked(server) == sorted(texts[d] for d in flaky)  # one answered, one killed it
    rows = expert_rows(spark, workdir, len(texts))
    [still_failed] = [d for d, r in rows.items() if r["status"] == "failed"]
    assert still_failed in flaky and rows[still_failed]["error"].startswith("connection error")

    # 3. Healthy again: exactly one request, for the one document still failed.
    with ChatStubServer(port=port) as server:
        third = run_stage("expert", spark, config, workdir)
    assert (third["processed"], third["skipped_existing"], third["ok"], third["failed"]) == (1, 5, 1, 0)
    assert asked(server) == [texts[still_failed]]
    rows = expert_rows(spark, workdir, len(texts))
    assert all(r["status"] == "ok" for r in rows.values())
    assert all(s == "refined" for s in refined_statuses(spark, config, workdir).values())
