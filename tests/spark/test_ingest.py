"""Stage ingest: documents, line numbers, quarantine reasons, idempotency."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterator

import pytest
from chispa import assert_df_equality
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from refinex.config import Config
from refinex.spark.registry import run_stage
from refinex.spark.ingest import shard_of
from refinex.spark.tables import read_table
from refinex.text import html_to_text

HTML = (
    "<html><body><nav><a href='/'>Home</a></nav><article><h1>Title</h1>"
    "<p>A paragraph of real content.</p></article></body></html>"
)


def _write_lines(path: Path, lines: list[bytes | str | dict[str, Any] | list[Any]]) -> Path:
    with path.open("wb") as handle:
        for line in lines:
            if isinstance(line, (dict, list)):
                line = json.dumps(line)
            handle.write((line.encode("utf-8") if isinstance(line, str) else line) + b"\n")
    return path


@pytest.fixture()
def small_conf(spark: SparkSession) -> Iterator[None]:
    """Tiny file splits, so one file is read by several tasks."""
    old = {k: spark.conf.get(k) for k in ("spark.sql.files.maxPartitionBytes", "spark.sql.files.openCostInBytes")}
    spark.conf.set("spark.sql.files.maxPartitionBytes", "4096")
    spark.conf.set("spark.sql.files.openCostInBytes", "1024")
    yield
    for key, value in old.items():
        spark.conf.set(key, value)


def test_ingest_documents(spark: SparkSession, spark_config: Config, workdir: str, tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "docs.jsonl", [
        {"id": "a1", "url": "https://example.org/a", "source": "s1", "text": "line one\nline two", "gold": {"k": 1}},
        {"id": 42, "text": "numeric id"},
        "",
        {"html": HTML, "source": "s2"},
        {"id": "a4", "text": "given text wins", "html": "<p>ignored</p>"},
    ])
    stats = run_stage("ingest", spark, spark_config, workdir, input=str(path))
    assert (stats["read"], stats["accepted"], stats["quarantined"], stats["blank_lines"]) == (4, 4, 0, 1)

    html_id = hashlib.sha256(HTML.encode()).hexdigest()
    html_text = html_to_text(HTML)
    n = spark_config.ingest.n_shards
    expected = spark.createDataFrame(
        [
            ("a1", "s1", "https://example.org/a", "line one\nline two", '{"gold": {"k": 1}}', 1, 17, 2),
            ("42", "docs", None, "numeric id", None, 2, 10, 1),
            (html_id, "s2", None, html_text, None, 4, len(html_text), html_text.count("\n") + 1),
            ("a4", "docs", None, "given text wins", None, 5, 15, 1),
        ],
        "doc_id string, source string, url string, text string, metadata string, line_no bigint, n_chars bigint, n_lines int",
    ).withColumn("shard", F.udf(lambda d: shard_of(d, n), "int")("doc_id"))
    documents = read_table(spark, workdir, "documents")
    actual = documents.select(*expected.columns)
    assert_df_equality(actual, expected, ignore_row_order=True, ignore_nullable=True, ignore_column_order=True)
    assert documents.where(F.col("input_file").endswith("/docs.jsonl")).count() == 4
    assert documents.where(F.col("doc_id") == html_id).first()["html"] == HTML

    again = run_stage("ingest", spark, spark_config, workdir, input=str(path))
    assert (again["documents_inserted"], again["documents_updated"]) == (0, 0)
    assert read_table(spark, workdir, "documents").count() == 4


def test_bad_input_is_quarantined(spark: SparkSession, spark_config: Config, workdir: str, tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "bad.jsonl", [
        {"id": "g1", "text": "good document"},
        '{"id": "m1", "text": ',
        {"id": "e1", "text": "   \n  "},
        b'{"id": "u1", "text": "caf\xe9"}',
        {"id": "big", "text": "x" * 5_000_000},
        {"id": "g1", "text": "same id again"},
        {"id": "n1", "url": "https://example.org/n"},
        [1, 2, 3],
        {"id": True, "text": "boolean id"},
        {"id": "t1", "text": 5},
        "   ",
        {"html": "<html><script>var x = 1;</script></html>"},
        '{"id": "s1", "text": "lone \\ud800 surrogate"}',
    ])
    stats = run_stage("ingest", spark, spark_config, workdir, input=str(path))
    assert stats["read"] == stats["accepted"] + stats["quarantined"] == 12
    assert stats["accepted"] == 1 and stats["blank_lines"] == 1
    assert stats["quarantined_by_reason"] == {
        "bad_field_type": 2, "duplicate_doc_id": 1, "empty_text": 2, "invalid_utf8": 2,
        "malformed_json": 1, "missing_text": 1, "not_an_object": 1, "too_large": 1,
    }
    quarantine = read_table(spark, workdir, "quarantine")
    expected = spark.createDataFrame(
        [
            (2, "malformed_json", None), (3, "empty_text", "e1"), (4, "invalid_utf8", None),
            (5, "too_large", "big"), (6, "duplicate_doc_id", "g1"), (7, "missing_text", "n1"),
            (8, "not_an_object", None), (9, "bad_field_type", None), (10, "bad_field_type", "t1"),
            (12, "empty_text", hashlib.sha256(b"<html><script>var x = 1;</script></html>").hexdigest()),
            (13, "invalid_utf8", None),
        ],
        "line_no bigint, reason string, doc_id string",
    )
    assert_df_equality(quarantine.select("line_no", "reason", "doc_id"), expected, ignore_row_order=True, ignore_nullable=True)
    rows = {r["line_no"]: r for r in quarantine.collect()}
    assert all(r["stage"] == "ingest" and r["detail"] for r in rows.values())
    assert "caf" in rows[4]["record"] and len(rows[5]["record"]) == 2000
    assert rows[6]["detail"].endswith("bad.jsonl:1")
    docs = read_table(spark, workdir, "documents").collect()
    assert [(d["doc_id"], d["text"]) for d in docs] == [("g1", "good document")]


def test_line_numbers_are_exact_across_splits_and_files(
    spark: SparkSession, spark_config: Config, workdir: str, tmp_path: Path, small_conf: None
) -> None:
    import gzip

    lines_a: list[Any] = []
    for i in range(1, 301):
        lines_a.append("" if i % 50 == 0 else {"id": f"a-{i}", "text": f"document {i} " + "w" * (i % 90)})
    lines_a[99] = {"id": "a-100", "text": "y" * 400}  # longer than max_record_chars below
    (tmp_path / "in").mkdir()
    _write_lines(tmp_path / "in" / "a.jsonl", lines_a)
    _write_lines(tmp_path / "in" / "b.jsonl", [{"id": f"b-{i}", "text": f"b {i}"} for i in range(1, 41)])
    with gzip.open(tmp_path / "in" / "c.jsonl.gz", "wt") as handle:
        for i in range(1, 21):
            handle.write(json.dumps({"id": f"c-{i}", "text": f"c {i}"}) + "\n")
    config = spark_config.with_overrides({"ingest.max_record_chars": 300})
    assert (tmp_path / "in" / "a.jsonl").stat().st_size > 4 * 4096  # several splits
    stats = run_stage("ingest", spark, config, workdir, input=str(tmp_path / "in"))
    assert stats["blank_lines"] == 5 and stats["quarantined_by_reason"] == {"too_large": 1}
    assert stats["read"] == 295 + 40 + 20 == stats["accepted"] + 1
    documents = read_table(spark, workdir, "documents")
    got = {(r["doc_id"], r["line_no"]) for r in documents.select("doc_id", "line_no").collect()}
    assert all(int(doc_id.split("-")[1]) == line_no for doc_id, line_no in got)
    assert len(got) == 354
    quarantined = read_table(spark, workdir, "quarantine").first()
    assert quarantined["line_no"] == 100 and quarantined["reason"] == "too_large" and quarantined["doc_id"] is None


def test_limit_takes_the_first_records(spark: SparkSession, spark_config: Config, workdir: str, tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "many.jsonl", ["", *[{"id": f"d{i}", "text": f"t{i}"} for i in range(1, 11)]])
    stats = run_stage("ingest", spark, spark_config, workdir, input=str(path), limit=3)
    assert stats["read"] == 3
    ids = sorted(r["doc_id"] for r in read_table(spark, workdir, "documents").collect())
    assert ids == ["d1", "d2", "d3"]


def test_parquet_input(spark: SparkSession, spark_config: Config, workdir: str, tmp_path: Path) -> None:
    import pandas as pd

    path = tmp_path / "pages.parquet"
    pd.DataFrame({"id": ["p1", "p2", "p3"], "text": ["one", None, "three"], "lang": ["en", "de", "fr"]}).to_parquet(path)
    stats = run_stage("ingest", spark, spark_config, workdir, input=str(path))
    assert (stats["format"], stats["accepted"], stats["quarantined_by_reason"]) == ("parquet", 2, {"missing_text": 1})
    rows = {r["doc_id"]: r for r in read_table(spark, workdir, "documents").collect()}
    assert rows["p3"]["line_no"] == 3 and json.loads(rows["p3"]["metadata"]) == {"lang": "fr"}
