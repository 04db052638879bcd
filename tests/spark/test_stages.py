"""Stages expert, distill, apply and stats on small hand-made tables."""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import pytest
from chispa import assert_df_equality
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from refinex.config import Config
from refinex.distill import distill
from refinex.spark.registry import run_stage
from refinex.spark.expert import expert_version
from refinex.spark.tables import TABLES, merge_into, read_table
from refinex.status import ALL_STATUSES
from refinex.text import html_to_text

ARTICLE_HTML = (
    "<html><head><title>T</title></head><body><nav><a href='/'>Home</a> <a href='/about'>About us</a></nav>"
    "<article><h1>Rivers of the north</h1><p>The northern rivers carry cold water from the mountains to the "
    "sea, and they freeze for several months every winter, which shapes the life of every town along their "
    "banks.</p><p>Fishermen wait for the ice to break in spring; the first boats leave the harbour as soon as "
    "the channel is open, and the markets fill with fresh fish within a week.</p></article>"
    "<footer>Copyright 2024 Example News. All rights reserved.</footer></body></html>"
)
LONG_LINE = "This sentence is long enough to stay above the minimum number of kept characters."
NOW = datetime(2025, 1, 1, tzinfo=timezone.utc)


def _documents(spark: SparkSession, rows: list[tuple[str, str, Optional[str]]]) -> DataFrame:
    data = [
        (doc_id, "test", None, text, html, None, 0, "file:/in.jsonl", i + 1, len(text), text.count("\n") + 1, NOW)
        for i, (doc_id, text, html) in enumerate(rows)
    ]
    return spark.createDataFrame(data, TABLES["documents"].schema)


def _programs(spark: SparkSession, origin_version: str, rows: list[tuple[str, str]]) -> DataFrame:
    data = [(d, "distilled", origin_version, p, None, None, None, None, None, None, None, None, None, NOW) for d, p in rows]
    return spark.createDataFrame(data, TABLES["programs"].schema)


def _refinements(spark: SparkSession, rows: list[tuple[str, str, str, Optional[str], str]]) -> DataFrame:
    data = [(d, e, v, text, status, None if status == "ok" else "boom", 0, 0, 0, 0.0, NOW) for d, e, v, text, status in rows]
    return spark.createDataFrame(data, TABLES["expert_refinements"].schema)


def test_expert_stage_refines_and_skips_done(spark: SparkSession, spark_config: Config, workdir: str) -> None:
    text = html_to_text(ARTICLE_HTML)
    merge_into(spark, workdir, "documents", _documents(spark, [("page", text, ARTICLE_HTML), ("plain", "only text", None)]))
    stats = run_stage("expert", spark, spark_config, workdir)
    version = expert_version("trafilatura", {})
    assert (stats["processed"], stats["ok"], stats["failed"], stats["expert_version"]) == (2, 1, 1, version)
    rows = {r["doc_id"]: r for r in read_table(spark, workdir, "expert_refinements").collect()}
    assert rows["page"]["status"] == "ok" and rows["page"]["refined_text"].startswith("Rivers of the north")
    assert "Home" not in rows["page"]["refined_text"] and rows["page"]["expert_version"] == version
    assert rows["plain"]["status"] == "failed" and rows["plain"]["refined_text"] is None and rows["plain"]["error"]

    again = run_stage("expert", spark, spark_config, workdir)
    assert (again["skipped_existing"], again["processed"], again["failed"]) == (1, 1, 1)
    assert (again["rows_inserted"], again["rows_updated"]) == (0, 0)
    assert read_table(spark, workdir, "expert_refinements").count() == 2


def test_expert_stage_refuses_an_html_expert_on_text_only_documents(
    spark: SparkSession, spark_config: Config, workdir: str
) -> None:
    merge_into(spark, workdir, "documents", _documents(spark, [("a", "plain text one", None), ("b", "two", None)]))
    with pytest.raises(ValueError, match=r"expert trafilatura needs the page HTML.*none of the 2 documents.*--expert llm"):
        run_stage("expert", spark, spark_config, workdir)
    assert read_table(spark, workdir, "expert_refinements").count() == 0  # refused before any work
    stats = run_stage("expert", spark, spark_config.with_overrides({"expert.name": "line_rules"}), workdir)
    assert (stats["processed"], stats["failed"]) == (2, 0)


def test_distill_stage_matches_the_pure_distiller(spark: SparkSession, spark_config: Config, workdir: str) -> None:
    raw = "Menu\nTitle\nBody text here. Share this\nFooter"
    refined = "Title\nBody text here."
    merge_into(spark, workdir, "documents", _documents(spark, [("d1", raw, None), ("d2", "same\ntext", None), ("d3", "x", None)]))
    merge_into(spark, workdir, "expert_refinements", _refinements(spark, [
        ("d1", "trafilatura", "v1", refined, "ok"),
        ("d2", "trafilatura", "v1", "same\ntext", "ok"),
        ("d3", "trafilatura", "v1", None, "failed"),
    ]))
    stats = run_stage("distill", spark, spark_config, workdir)
    assert (stats["programs"], stats["origin_versions"], stats["failed"]) == (2, ["trafilatura:v1"], 0)
    expected = spark.createDataFrame(
        [("d1", "distilled", "trafilatura:v1", str(distill(raw, refined))),
         ("d2", "distilled", "trafilatura:v1", str(distill("same\ntext", "same\ntext")))],
        "doc_id string, origin string, origin_version string, program string",
    )
    programs = read_table(spark, workdir, "programs")
    assert_df_equality(programs.select(*expected.columns), expected, ignore_row_order=True, ignore_nullable=True)
    d2 = programs.where(F.col("doc_id") == "d2").first()
    assert d2["n_keep_all"] == 1 and d2["exact"] and d2["deleted_chars"] == 0

    again = run_stage("distill", spark, spark_config, workdir)
    assert (again["rows_inserted"], again["rows_updated"]) == (0, 0)


@pytest.fixture()
def applied(spark: SparkSession, spark_config: Config, workdir: str) -> dict[str, Any]:
    """Documents covering every status, their programs, and one apply run."""
    version = "trafilatura:v1"
    merge_into(spark, workdir, "documents", _documents(spark, [
        ("refined", f"Menu\n{LONG_LINE}\nFooter", None),
        ("unchanged", LONG_LINE, None),
        ("fallback", f"{LONG_LINE}\nsecond line", None),
        ("dropped", "Menu\nFooter", None),
        ("failed", "Expert failed on this one", None),
        ("missing", "No program for this one", None),
    ]))
    merge_into(spark, workdir, "programs", _programs(spark, version, [
        ("refined", "remove_lines(0, 0)\nremove_lines(2, 2)"),
        ("unchanged", "keep_all()"),
        ("fallback", "remove_lines(7, 9)\nremove_str(0, \"absent\")\nnot an op"),
        ("dropped", "remove_lines(0, 1)"),
    ]))
    merge_into(spark, workdir, "expert_refinements", _refinements(spark, [
        ("refined", "trafilatura", "v1", LONG_LINE, "ok"),
        ("failed", "trafilatura", "v1", None, "failed"),
    ]))
    stats = run_stage("apply", spark, spark_config, workdir, run_id="run-1")
    return {"version": version, "stats": stats}


def test_apply_stage_gives_every_document_one_status(spark: SparkSession, workdir: str, applied: dict[str, Any]) -> None:
    version = applied["version"]
    assert applied["stats"]["origin_version"] == version  # the newest distilled programs
    assert applied["stats"]["by_status"] == {
        "dropped": 1, "expert_failed": 1, "fallback_raw": 1, "no_program": 1, "refined": 1, "unchanged": 1,
    }
    expected = spark.createDataFrame(
        [
            ("refined", "refined", LONG_LINE),
            ("unchanged", "unchanged", LONG_LINE),
            ("fallback", "fallback_raw", f"{LONG_LINE}\nsecond line"),
            ("dropped", "dropped", ""),
            ("failed", "expert_failed", None),
            ("missing", "no_program", None),
        ],
        "doc_id string, status string, refined_text string",
    )
    refined = read_table(spark, workdir, "refined_documents")
    assert_df_equality(refined.select("doc_id", "status", "refined_text"), expected, ignore_row_order=True, ignore_nullable=True)
    assert {r["origin_version"] for r in refined.collect()} == {version}
    fallback = refined.where(F.col("doc_id") == "fallback").first()["exec_stats"]
    assert (fallback["ops_total"], fallback["ops_rejected"], fallback["parse_errors"]) == (2, 2, 1)
    assert fallback["rejected_by_reason"] == {"line_out_of_range": 1, "string_not_found": 1}
    assert refined.where(F.col("doc_id") == "missing").first()["exec_stats"] is None


def test_stats_stage_one_row_per_document(
    spark: SparkSession, spark_config: Config, workdir: str, applied: dict[str, Any]
) -> None:
    stats = run_stage("stats", spark, spark_config, workdir)
    assert stats["origin_version"] == applied["version"]  # from the latest apply run
    assert stats["documents"] == 6 and set(stats["by_status"]) <= set(ALL_STATUSES)
    edit = read_table(spark, workdir, "edit_stats")
    expected = spark.createDataFrame(
        [
            ("refined", "refined", len(LONG_LINE) + 12, len(LONG_LINE), 3, 1, 2, 2, 0, 0),
            ("unchanged", "unchanged", len(LONG_LINE), len(LONG_LINE), 1, 1, 1, 0, 1, 0),
            ("fallback", "fallback_raw", len(LONG_LINE) + 12, len(LONG_LINE) + 12, 2, 2, 2, 1, 0, 1),
            ("dropped", "dropped", 11, 0, 2, 0, 1, 1, 0, 0),
            ("failed", "expert_failed", 25, None, 1, None, None, None, None, None),
            ("missing", "no_program", 23, None, 1, None, None, None, None, None),
        ],
        "doc_id string, status string, chars_in bigint, chars_out bigint, lines_in int, lines_out int, "
        "ops_total int, n_remove_lines int, n_keep_all int, parse_errors int",
    )
    assert_df_equality(edit.select(*expected.columns), expected, ignore_row_order=True, ignore_nullable=True)
    assert edit.select("doc_id").distinct().count() == edit.count() == 6
    row = edit.where(F.col("doc_id") == "refined").first()
    assert row["source"] == "test" and row["run_id"] == stats["run_id"] and 0 < row["deletion_ratio"] < 1
    by_sql = spark.sql(f"SELECT status, count(*) AS n FROM delta.`{workdir}/delta/edit_stats` GROUP BY status")
    assert {r["status"]: r["n"] for r in by_sql.collect()} == stats["by_status"]

    again = run_stage("stats", spark, spark_config, workdir)
    assert (again["rows_inserted"], again["rows_updated"]) == (0, 0)

    plot = Path(stats["plot"])
    assert plot.parent == Path(workdir) / "reports" and plot.suffix == ".png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_origins_resolve_from_what_was_run(spark: SparkSession, spark_config: Config, workdir: str,
                                           tmp_path: Path) -> None:
    """Programs of another expert than the configured one (a run with --expert llm): apply,
    stats and export pick that version, accept its label, and every exported row has a status."""
    import json

    from refinex.versions import version_label

    version = "llm:qwen-7b+refine_v1-abc"
    merge_into(spark, workdir, "documents", _documents(spark, [
        ("a", f"Menu\n{LONG_LINE}", None), ("b", LONG_LINE, None), ("c", "never refined", None)]))
    merge_into(spark, workdir, "programs", _programs(spark, version, [("a", "remove_lines(0, 0)"), ("b", "keep_all()")]))
    applied = run_stage("apply", spark, spark_config, workdir)  # configured expert: trafilatura
    assert applied["origin_version"] == version and applied["by_status"] == {
        "no_program": 1, "refined": 1, "unchanged": 1}
    stats = run_stage("stats", spark, spark_config, workdir, origin="distilled", origin_version=version_label(version))
    assert stats["origin_version"] == version
    merge_into(spark, workdir, "documents", _documents(spark, [("d", "ingested after apply", None)]))
    out = tmp_path / "export.jsonl"
    exported = run_stage("export", spark, spark_config, workdir, output=str(out), origin="distilled")
    assert exported["origin_version"] == version and exported["version_label"] == version_label(version)
    records = {r["doc_id"]: r["status"] for r in map(json.loads, out.read_text(encoding="utf-8").splitlines())}
    assert records == {"a": "refined", "b": "unchanged", "c": "no_program", "d": "no_program"}
    with pytest.raises(LookupError, match="no version 'llm@000000'"):
        run_stage("stats", spark, spark_config, workdir, origin="distilled", origin_version="llm@000000")
