"""The expert stage with the llm and consensus experts against a real local chat server.

The server (``tests/experts/chat_stub_server.py``) rejects requests without
``Authorization: Bearer <SECRET>``; the key is only ever in the driver's environment, so a
passing run shows that the driver resolved it and shipped it to the Python workers.
"""
from __future__ import annotations

import gzip
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import pytest
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from typer.testing import CliRunner

from refinex.cli import app
from refinex.config import Config
from refinex.distill import distill_report
from refinex.experts.cache import cache_key, doc_hash
from refinex.experts.llm import load_prompt
from refinex.spark.registry import run_stage
from refinex.spark.expert import configure_expert
from refinex.spark.tables import TABLES, merge_into, read_table

# tests/experts, importable as the package ``experts`` (pytest puts tests/ on sys.path).
from experts.chat_stub_server import INVENTED_SENTENCE, ChatStubServer

SECRET = "sk-refinex-leakcheck-4e9b1c07d2a8f635"
KEY_ENV = "REFINEX_EXPERT_API_KEY"
NOW = datetime(2025, 1, 1, tzinfo=timezone.utc)
BODY = (
    "The northern rivers carry cold water from the mountains to the sea, and they freeze for "
    "several months every winter."
)
# Fast retries, short timeouts, no proxies from the environment.
LLM_OPTIONS: dict[str, Any] = {
    "model": "stub-model", "max_tokens": 1024, "timeout_s": 5.0, "max_attempts": 3,
    "backoff_base_s": 0.01, "backoff_max_s": 0.05, "trust_env": False, "max_concurrency": 4,
}


def page(title: str, marker: str = "") -> str:
    """A document the stub refines by deleting its Cookie line (and rewriting/inventing)."""
    return f"{title} {marker}\nWelcome to the colour guide\nCookie notice: we use cookies\n{BODY}"


def is_subsequence(small: str, big: str) -> bool:
    it = iter(big)
    return all(ch in it for ch in small)


def documents(spark: SparkSession, rows: list[tuple[str, str]]) -> DataFrame:
    data = [
        (doc_id, "test", None, text, None, None, 0, "file:/in.jsonl", i + 1, len(text), text.count("\n") + 1, NOW)
        for i, (doc_id, text) in enumerate(rows)
    ]
    return spark.createDataFrame(data, TABLES["documents"].schema)


@pytest.fixture()
def stub(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv(KEY_ENV, SECRET)
    with ChatStubServer(expected_key=SECRET) as server:
        yield server


def llm_config(base: Config, server: Any, **options: Any) -> Config:
    config = configure_expert(base, "llm", base_url=server.base_url)
    return config.with_overrides({"expert.options": {**config.expert.options, **LLM_OPTIONS, **options}})


def by_id(df: DataFrame) -> dict[str, Any]:
    return {r["doc_id"]: r for r in df.collect()}


def test_llm_stage_requests_cache_failures_and_distill(
    spark: SparkSession, spark_config: Config, workdir: str, stub: Any
) -> None:
    texts = {"a": page("Alpha"), "b": page("Beta"), "c": page("Gamma"), "bad": page("Broken", "[[fail500:99]]")}
    merge_into(spark, workdir, "documents", documents(spark, list(texts.items())))
    config = llm_config(spark_config, stub, price_input_per_1m=2.0, price_output_per_1m=10.0)

    stats = run_stage("expert", spark, config, workdir)

    prompt = load_prompt()
    assert (stats["processed"], stats["ok"], stats["failed"]) == (4, 3, 1)
    assert (stats["requests"], stats["retries"], stats["cache_hits"], stats["llm_failures"]) == (6, 2, 0, 1)
    assert stats["expert_version"] == f"stub-model+{prompt.version}" and stats["mlflow_run_id"]
    assert len(stub.requests) == 6
    for request in stub.requests:  # the request format
        assert request.path == "/v1/chat/completions"
        assert request.headers["Authorization"] == f"Bearer {SECRET}"
        body = request.body
        assert (body["model"], body["temperature"], body["max_tokens"]) == ("stub-model", 0.0, 1024)
        assert [m["role"] for m in body["messages"]] == ["system", "user"]
        assert body["messages"][0]["content"] == prompt.text
        assert body["messages"][1]["content"] in texts.values()

    rows = by_id(read_table(spark, workdir, "expert_refinements"))
    for doc_id in ("a", "b", "c"):
        row = rows[doc_id]
        assert (row["status"], row["requests"], row["error"]) == ("ok", 1, None)
        assert row["tokens_in"] > 0 and row["tokens_out"] > 0 and row["latency_s"] > 0
        assert INVENTED_SENTENCE in row["refined_text"]  # the raw expert answer, inventions included
    bad = rows["bad"]
    assert (bad["status"], bad["refined_text"], bad["requests"]) == ("failed", None, 3)
    assert "HTTP 500" in bad["error"]
    cost = sum(r["tokens_in"] * 2.0 + r["tokens_out"] * 10.0 for r in rows.values()) / 1e6
    assert stats["cost_usd"] == pytest.approx(cost) and cost > 0

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}")
    metrics = client.get_run(stats["mlflow_run_id"]).data.metrics
    assert (metrics["documents"], metrics["docs_requested"], metrics["requests"], metrics["retries"]) == (4, 4, 6, 2)
    assert (metrics["failed"], metrics["llm_failures"], metrics["cache_hits"]) == (1, 1, 0)
    assert metrics["tokens_in"] == sum(r["tokens_in"] for r in rows.values()) and metrics["mean_latency_s"] > 0
    assert metrics["cost_per_1k_docs"] == pytest.approx(1000 * cost / 4)

    cache = by_id(read_table(spark, workdir, "expert_cache").withColumnRenamed("key", "doc_id"))
    expected_keys = {cache_key("stub-model", prompt.version, doc_hash(texts[d])) for d in ("a", "b", "c")}
    assert set(cache) == expected_keys  # successful answers only, keyed like the pure cache
    assert all(r["model"] == "stub-model" and r["prompt_version"] == prompt.version for r in cache.values())

    # distill + apply: the expert's rewrites and inventions are discarded, failures kept
    run_stage("distill", spark, config, workdir, expert="llm")
    applied = run_stage("apply", spark, config, workdir)
    assert applied["origin_version"] == f"llm:{stats['expert_version']}"
    refined = by_id(read_table(spark, workdir, "refined_documents"))
    assert refined["bad"]["status"] == "expert_failed" and refined["bad"]["refined_text"] is None
    for doc_id in ("a", "b", "c"):
        text = refined[doc_id]["refined_text"]
        assert refined[doc_id]["status"] == "refined"
        assert is_subsequence(text, texts[doc_id]) and BODY in text
        assert INVENTED_SENTENCE not in text and "Cookie" not in text and "color " not in text


def test_rerun_is_served_by_the_delta_cache(
    spark: SparkSession, spark_config: Config, workdir: str, stub: Any
) -> None:
    texts = {f"d{i}": page(f"Doc {i}") for i in range(3)}
    merge_into(spark, workdir, "documents", documents(spark, list(texts.items())))
    config = llm_config(spark_config, stub).with_overrides({"expert.mlflow": False})
    first = run_stage("expert", spark, config, workdir)
    assert (first["requests"], first["cache_rows_inserted"]) == (3, 3)
    tokens = {d: (r["tokens_in"], r["tokens_out"]) for d, r in by_id(read_table(spark, workdir, "expert_refinements")).items()}

    skipped = run_stage("expert", spark, config, workdir)  # ok refinements are not redone
    assert (skipped["processed"], skipped["requests"]) == (0, 0)
    forced = run_stage("expert", spark, config, workdir, force=True)  # redone from expert_cache
    assert len(stub.requests) == 3
    assert (forced["processed"], forced["ok"], forced["requests"], forced["cache_hits"]) == (3, 3, 0, 3)
    assert forced["cache_rows_inserted"] == 0 and read_table(spark, workdir, "expert_cache").count() == 3
    rows = by_id(read_table(spark, workdir, "expert_refinements"))
    assert {d: (r["tokens_in"], r["tokens_out"]) for d, r in rows.items()} == tokens  # cost kept from the cache
    assert all(r["requests"] == 0 and r["status"] == "ok" for r in rows.values())


def test_concurrency_is_bounded_per_partition(
    spark: SparkSession, spark_config: Config, workdir: str, stub: Any
) -> None:
    texts = {f"slow{i}": page(f"Slow {i}", "[[delay:0.3]]") for i in range(6)}
    merge_into(spark, workdir, "documents", documents(spark, list(texts.items())))
    config = configure_expert(spark_config, "llm", base_url=stub.base_url, max_concurrency=2)
    config = config.with_overrides({
        "expert.options": {**LLM_OPTIONS, **config.expert.options},
        "expert.docs_per_partition": 100,  # one task
        "expert.mlflow": False,
    })
    assert config.expert.options["max_concurrency"] == 2
    stats = run_stage("expert", spark, config, workdir)
    assert (stats["ok"], stats["requests"]) == (6, 6)
    assert stub.max_in_flight == 2


def test_consensus_stage_keeps_every_member(
    spark: SparkSession, spark_config: Config, workdir: str, stub: Any, sample_pages: Path
) -> None:
    run_stage("ingest", spark, spark_config, workdir, input=str(sample_pages), limit=3)
    config = configure_expert(spark_config, "consensus", base_url=stub.base_url, model="stub-model")
    members = [
        {**m, "options": {**m["options"], **LLM_OPTIONS}} if m["name"] == "llm" else m
        for m in config.expert.options["members"]
    ]
    config = config.with_overrides({"expert.options": {"members": members}, "expert.mlflow": False})

    stats = run_stage("expert", spark, config, workdir)

    assert (stats["processed"], stats["ok"], stats["member_rows_inserted"]) == (3, 3, 21)
    assert stats["requests"] >= 3 and stats["cache_rows_inserted"] == 3
    raw = {r["doc_id"]: r["text"] for r in read_table(spark, workdir, "documents").collect()}
    consensus = by_id(read_table(spark, workdir, "expert_refinements").where(F.col("expert") == "consensus"))
    assert set(consensus) == set(raw)
    for doc_id, row in consensus.items():  # the consensus is a pure deletion of the raw text
        report = distill_report(raw[doc_id], row["refined_text"])
        assert report.exact and report.inserted_chars == 0
        assert INVENTED_SENTENCE not in row["refined_text"]
    table = read_table(spark, workdir, "expert_members")
    assert table.select("doc_id", "member").distinct().count() == 21
    llm_rows = table.where(F.col("member") == "llm").collect()
    assert all(r["status"] == "ok" and r["voted"] and r["tokens_in"] > 0 for r in llm_rows)
    assert all(INVENTED_SENTENCE in r["refined_text"] for r in llm_rows)  # the member's own output, for audit
    assert all(r["expert_version"] == stats["expert_version"] for r in table.collect())
    voted = spark.sql(
        f"SELECT member, count_if(voted) AS voted FROM delta.`{workdir}/delta/expert_members` GROUP BY member"
    )
    assert {r["member"] for r in voted.collect()} == {
        "trafilatura", "trafilatura_precision", "justext", "resiliparse", "dom_prune", "line_rules", "llm",
    }

    n_requests = len(stub.requests)
    again = run_stage("expert", spark, config, workdir, force=True)
    assert len(stub.requests) == n_requests and again["cache_hits"] == 3
    assert (again["member_rows_inserted"], again["member_rows_updated"]) == (0, 0)  # same content, from the cache
    refined_again = by_id(read_table(spark, workdir, "expert_refinements").where(F.col("expert") == "consensus"))
    assert {d: r["refined_text"] for d, r in refined_again.items()} == {d: r["refined_text"] for d, r in consensus.items()}
    tokens = {r["doc_id"]: r["tokens_in"] for r in llm_rows}
    again_rows = read_table(spark, workdir, "expert_members").where(F.col("member") == "llm").collect()
    assert {r["doc_id"]: r["tokens_in"] for r in again_rows} == tokens  # the cost, read from the cache


def test_endpoint_flags_need_an_llm_expert(spark_config: Config) -> None:
    from refinex.config import ConfigError

    with pytest.raises(ConfigError, match="llm and consensus"):
        configure_expert(spark_config, "trafilatura", base_url="http://127.0.0.1:9/v1")
    llm = configure_expert(spark_config, "llm", base_url="http://h/v1", model="m", max_concurrency=3)
    assert (llm.expert.name, llm.expert.options) == ("llm", {"base_url": "http://h/v1", "model": "m", "max_concurrency": 3})


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record) + "\n")
    return path


def test_cli_pipeline_with_the_llm_expert(
    spark: SparkSession, workdir: str, stub: Any, tmp_path: Path
) -> None:
    texts = {"one": page("One"), "two": page("Two"), "three": page("Three")}
    source = write_jsonl(tmp_path / "docs.jsonl.gz", [{"id": k, "text": v} for k, v in texts.items()])
    args = [
        "pipeline", "--input", str(source), "--workdir", workdir, "--config", "test",
        "--expert", "llm", "--expert-base-url", stub.base_url, "--expert-model", "stub-model",
        "--expert-max-concurrency", "2", "--set", "expert.options.trust_env=false",
        "--skip-model",  # the refine model's part is tested elsewhere; this is about the expert
    ]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "3 refined now (3 ok, 0 failed)" in result.output and "3 requests" in result.output
    assert all(r.headers["Authorization"] == f"Bearer {SECRET}" for r in stub.requests)
    refined = by_id(read_table(spark, workdir, "refined_documents").where(F.col("origin") == "distilled"))
    assert {d: r["status"] for d, r in refined.items()} == {d: "refined" for d in texts}
    for doc_id, row in refined.items():
        assert is_subsequence(row["refined_text"], texts[doc_id]) and INVENTED_SENTENCE not in row["refined_text"]
    params = json.loads(
        read_table(spark, workdir, "stage_runs").where(F.col("stage") == "expert").first()["params"]
    )
    assert params["expert"] == "llm" and params["options"]["max_concurrency"] == 2

    again = CliRunner().invoke(app, args, catch_exceptions=False)
    assert again.exit_code == 0 and "3 already done" in again.output and len(stub.requests) == 3


def test_the_key_never_leaks(
    spark: SparkSession, spark_config: Config, workdir: str, stub: Any,
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level("DEBUG")
    # [[echo-key]]: the server answers HTTP 400 quoting the Authorization header it got.
    texts = {"ok": page("Fine"), "echo": page("Echo", "[[echo-key]]"), "down": page("Down", "[[fail500:99]]")}
    merge_into(spark, workdir, "documents", documents(spark, list(texts.items())))
    config = llm_config(spark_config, stub)
    stats = run_stage("expert", spark, config, workdir)
    assert (stats["ok"], stats["failed"]) == (1, 2) and stats["mlflow_run_id"]
    errors = by_id(read_table(spark, workdir, "expert_refinements"))
    assert "Bearer ***" in errors["echo"]["error"]  # redacted by the client

    for name in TABLES:  # every string column of every table
        table = read_table(spark, workdir, name)
        strings = [f.name for f in table.schema.fields if f.dataType.simpleString() == "string"]
        if strings:
            hits = table.where(F.concat_ws("\n", *strings).contains(SECRET)).count()
            assert hits == 0, f"the key is in {name}"
    for path in Path(workdir).rglob("*"):  # Delta logs, Parquet files, mlflow.db, anything else
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"the key is in {path}"

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}")
    run = client.get_run(stats["mlflow_run_id"])
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "refinex-expert"
    assert run.data.params["expert.model"] == "stub-model" and run.data.params["expert.key_source"] == f"env:{KEY_ENV}"
    assert run.data.metrics["requests"] == stats["requests"] and run.data.metrics["llm_failures"] == 2
    assert run.data.metrics["cost_per_1k_docs"] == 0.0 and "tokens_in" in run.data.metrics
    everything = json.dumps([run.data.params, run.data.tags, run.data.metrics, run.info.run_name])
    assert SECRET not in everything

    out, err = capfd.readouterr()
    assert SECRET not in caplog.text and SECRET not in out and SECRET not in err


def test_cli_expert_flags(tmp_path: Path) -> None:
    for command in ("pipeline", "expert"):
        output = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "240"}).output
        for option in ("--expert", "--expert-base-url", "--expert-model", "--expert-max-concurrency"):
            assert option in output
    wrong = CliRunner().invoke(
        app, ["expert", "--workdir", str(tmp_path), "--expert", "trafilatura", "--expert-base-url", "http://h/v1"]
    )
    assert wrong.exit_code == 1 and "apply to the llm and consensus experts" in wrong.output
