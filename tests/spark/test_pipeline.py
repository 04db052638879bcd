"""End to end on real pages: pipeline, rerun idempotency (through the CLI), export."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from chispa import assert_df_equality
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import DataType, MapType, StructType
from typer.testing import CliRunner

from refinex.cli import app
from refinex.config import Config
from refinex.spark.pipeline import format_summary, run_pipeline
from refinex.spark.tables import STAGE_RUNS, TABLES, read_table, table_version
from refinex.status import ALL_STATUSES

# Run records (one row per run id) grow with every run; the data tables must not change.
RUN_RECORDS = (STAGE_RUNS, "evaluations", "gate_failures")
DATA_TABLES = [name for name in TABLES if name not in RUN_RECORDS]


def _comparable(df: DataFrame) -> DataFrame:
    """Map-typed columns (and structs holding maps) as JSON, so rows can be sorted."""
    def has_map(dtype: DataType) -> bool:
        return isinstance(dtype, MapType) or (isinstance(dtype, StructType) and any(has_map(f.dataType) for f in dtype.fields))

    return df.select([F.to_json(f.name).alias(f.name) if has_map(f.dataType) else F.col(f.name) for f in df.schema.fields])


@pytest.fixture(scope="module")
def runs(spark: SparkSession, spark_config: Config, sample_pages: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The pipeline run twice on the same pages: once from Python, once from the CLI."""
    workdir = str(tmp_path_factory.mktemp("e2e") / "work")
    first = run_pipeline(spark, spark_config, workdir, str(sample_pages))
    versions = {name: table_version(spark, workdir, name) for name in DATA_TABLES}
    cli = CliRunner().invoke(
        app, ["pipeline", "--input", str(sample_pages), "--workdir", workdir, "--config", "test"], catch_exceptions=False
    )
    return {"workdir": workdir, "first": first, "versions": versions, "cli": cli}


def test_pipeline_end_to_end(spark: SparkSession, runs: dict[str, Any]) -> None:
    workdir, first = runs["workdir"], runs["first"]
    assert (first["ingest"]["read"], first["ingest"]["accepted"], first["ingest"]["quarantined"]) == (5, 5, 0)
    assert first["expert"]["processed"] == 5 and first["expert"]["ok"] + first["expert"]["failed"] == 5
    assert first["stats"]["documents"] == 5 and set(first["stats"]["by_status"]) <= set(ALL_STATUSES)
    assert sum(first["apply"]["by_status"].values()) == 5
    for name in DATA_TABLES:
        spec = TABLES[name]
        table = read_table(spark, workdir, name)
        assert table.count() == table.select(*spec.keys).distinct().count(), f"duplicate keys in {name}"
    # One row per document and origin: the distilled oracle and the refine model.
    for table in ("refined_documents", "edit_stats"):
        counts = {r["origin"]: r["count"] for r in read_table(spark, workdir, table).groupBy("origin").count().collect()}
        assert counts == {"distilled": 5, "model": 5}
    assert first["refine"]["origin_version"] == first["train"]["model_uri"].removeprefix("models:/")
    assert first["stats_model"]["documents"] == 5 and first["refine"]["invalid_chunks"] == 0
    stages = read_table(spark, workdir, "stage_runs").where(F.col("run_id") == first["run_id"])
    assert sorted(r["stage"] for r in stages.collect()) == [
        "apply", "distill", "evaluate", "expert", "ingest", "pipeline", "promote", "refine", "sft_pairs", "stats",
        "train", "validate"]
    model_stages = read_table(spark, workdir, "stage_runs").where(F.col("run_id") == first["run_id"] + "+model")
    assert sorted(r["stage"] for r in model_stages.collect()) == ["apply", "evaluate", "stats", "validate"]
    # the gates, the scores against the pages' gold and the promotion decision
    assert first["failures"] == [] and first["validate"]["passed"] and first["validate_model"]["passed"]
    assert first["evaluate"]["gold_pages"] == 5 and first["evaluate"]["new_words"] == 0
    assert first["evaluate_model"]["new_words"] == 0
    evaluations = read_table(spark, workdir, "evaluations").where(F.col("scope") == "all")
    assert {r["origin"] for r in evaluations.collect()} == {"distilled", "model"}
    assert first["promote"]["decision"] in ("champion", "challenger") and first["promote"]["gates"]
    for row in stages.where(F.col("stage") != "pipeline").collect():
        assert json.loads(row["stats"])["run_id"] == first["run_id"] and row["ended_at"] >= row["started_at"]
    pipeline_row = stages.where(F.col("stage") == "pipeline").first()
    assert json.loads(pipeline_row["params"])["config"]["profile"] == "test"
    assert json.loads(pipeline_row["stats"])["ingest"]["read"] == 5
    refined = read_table(spark, workdir, "refined_documents").where(F.col("status") == "refined").first()
    if refined is not None:  # a deletion-only refinement is a subsequence of the raw text
        raw = read_table(spark, workdir, "documents").where(F.col("doc_id") == refined["doc_id"]).first()["text"]
        it = iter(raw)
        assert all(ch in it for ch in refined["refined_text"])
    summary = format_summary(first)
    assert "read 5 = accepted 5 + quarantined 0" in summary and f"{workdir}/delta/<table>" in summary
    assert "distilled oracle vs refine model" in summary and first["refine"]["origin_version"] in summary
    assert "quality gates (Great Expectations):" in summary and "scores against gold (5 pages with gold" in summary
    assert "promotion: refinex-refiner version 1 -> @" in summary


def test_a_failed_gate_fails_the_pipeline_after_writing_everything(
    spark: SparkSession, sample_pages: Path, tmp_path: Path
) -> None:
    """Every document dropped (a guardrail no page meets): the dropped-share gate fails, the
    evaluation still runs, the summary is printed and the command exits 1."""
    workdir = str(tmp_path / "work")
    result = CliRunner().invoke(app, [
        "pipeline", "--input", str(sample_pages), "--workdir", workdir, "--config", "test", "--skip-model",
        "--set", "guardrails.min_kept_chars=100000000"])
    assert result.exit_code == 1, result.output
    assert "distilled  trafilatura@" in result.output and "FAILED refined_documents.dropped_share" in result.output
    assert "quality gates failed (everything else was written)" in result.output
    assert read_table(spark, workdir, "evaluations").where(F.col("origin") == "distilled").count() >= 1
    failures = read_table(spark, workdir, "gate_failures").where(F.col("expectation") == "dropped_share")
    assert failures.where(F.col("doc_id").isNotNull()).count() == 5


def test_rerun_changes_nothing(spark: SparkSession, runs: dict[str, Any]) -> None:
    cli = runs["cli"]
    assert cli.exit_code == 0, cli.output
    assert "read 5 = accepted 5 + quarantined 0" in cli.output
    assert "0 refined now" in cli.output and "5 already done" in cli.output
    workdir = runs["workdir"]
    for name in DATA_TABLES:
        before = read_table(spark, workdir, name, version=runs["versions"][name])
        after = read_table(spark, workdir, name)
        assert after.count() == before.count()
        assert_df_equality(_comparable(after), _comparable(before), ignore_row_order=True, ignore_nullable=True)
    assert "train: reused models:/refinex-refiner/1" in cli.output
    run_ids = {r["run_id"] for r in read_table(spark, workdir, "stage_runs").select("run_id").distinct().collect()}
    assert len({run_id.removesuffix("+model") for run_id in run_ids}) == 2


def test_export_writes_one_line_per_document(spark: SparkSession, runs: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "export" / "refined.jsonl"
    result = CliRunner().invoke(app, ["export", "--workdir", runs["workdir"], "--output", str(out), "--config", "test"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 5 and all(set(r) == {"doc_id", "text", "refined_text", "status"} for r in records)
    assert [r["doc_id"] for r in records] == sorted(r["doc_id"] for r in records)
    expected = {  # the default origin is the latest apply's: the refine model's
        r["doc_id"]: (r["status"], r["refined_text"])
        for r in read_table(spark, runs["workdir"], "refined_documents").where(F.col("origin") == "model").collect()
    }
    assert {r["doc_id"]: (r["status"], r["refined_text"]) for r in records} == expected
    assert all(r["status"] in ALL_STATUSES and r["text"] for r in records)
