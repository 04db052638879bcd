"""Bad input at ingest: every case ends in a quarantine row with a reason or a documented
limit, the rest of the batch is unaffected, and ``read = accepted + quarantined`` holds.

Cases: invalid JSON, missing and wrong-typed fields, null text, binary content, non-UTF-8
bytes, a 50 MB document, a 100,000-line document, HTML nested 10,000 levels deep, a gzip
file cut short (its readable records kept), an empty input folder, a Parquet file with the
wrong schema, and a missing input path (a one-line error before Spark starts).
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

import pytest
from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from typer.testing import CliRunner

from refinex.config import Config
from refinex.spark.ingest import check_inputs, expand_local_inputs
from refinex.spark.registry import run_stage
from refinex.spark.tables import read_table


def _jsonl(path: Path, records: list[Any]) -> Path:
    with path.open("wb") as handle:
        for record in records:
            if isinstance(record, bytes):
                handle.write(record + b"\n")
            else:
                handle.write(json.dumps(record).encode("utf-8") + b"\n")
    return path


def _quarantine(spark: SparkSession, workdir: str) -> dict[tuple[str, int], Any]:
    rows = read_table(spark, workdir, "quarantine").collect()
    return {(Path(r["input_file"]).name, r["line_no"]): r for r in rows}


def test_a_batch_of_bad_records_leaves_the_good_ones(
    spark: SparkSession, spark_config: Config, workdir: str, tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    nested = "<div>" * 10_000 + "deep content here" + "</div>" * 10_000
    _jsonl(folder / "a.jsonl", [
        {"id": "good-1", "text": "a good document"},
        b'{"id": "broken", "text": "no end',  # invalid JSON
        {"id": "no-text"},  # missing field
        {"id": "null-text", "text": None},  # null text (and no html)
        {"id": "int-text", "text": 42},  # wrong type
        {"id": ["a"], "text": "list id"},  # wrong-typed id
        b"\x89PNG\x1a\x00\x00\x00IHDR\x00\xff\xfe\x00",  # binary content (a line without line breaks)
        b'{"id": "latin1", "text": "caf\xe9 cr\xe8me"}',  # not UTF-8
        {"id": "long-lines", "text": "\n".join(f"line {i}" for i in range(100_000))},
        {"id": "nested", "html": f"<html><body>{nested}</body></html>"},
        {"id": "good-2", "text": "another good document"},
    ])
    config = spark_config.with_overrides({"ingest.max_text_chars": 2_000_000})
    stats = run_stage("ingest", spark, config, workdir, input=str(folder))
    assert stats["read"] == stats["accepted"] + stats["quarantined"] == 11
    assert stats["quarantined_by_reason"] == {
        "bad_field_type": 2, "invalid_utf8": 2, "malformed_json": 1, "missing_text": 2,
    }
    docs = {r["doc_id"]: r for r in read_table(spark, workdir, "documents").collect()}
    assert set(docs) == {"good-1", "good-2", "long-lines", "nested"}
    assert docs["long-lines"]["n_lines"] == 100_000
    assert "deep content here" in docs["nested"]["text"]
    rows = _quarantine(spark, workdir)
    assert {reason for reason in (r["reason"] for r in rows.values())} <= {
        "bad_field_type", "invalid_utf8", "malformed_json", "missing_text"}
    assert rows[("a.jsonl", 7)]["reason"] == "invalid_utf8" and rows[("a.jsonl", 4)]["reason"] == "missing_text"
    assert all(r["detail"] for r in rows.values())


def test_a_50_mb_document_is_quarantined_as_too_large(
    spark: SparkSession, spark_config: Config, workdir: str, tmp_path: Path
) -> None:
    path = _jsonl(tmp_path / "big.jsonl", [{"id": "huge", "text": "word " * 10_000_000}, {"id": "ok", "text": "fine"}])
    assert path.stat().st_size > 50_000_000
    stats = run_stage("ingest", spark, spark_config, workdir, input=str(path))
    assert (stats["accepted"], stats["quarantined_by_reason"]) == (1, {"too_large": 1})
    row = read_table(spark, workdir, "quarantine").first()
    assert row["line_no"] == 1 and "limit" in row["detail"] and len(row["record"]) == 2000  # a preview, not 50 MB


def test_a_gzip_file_cut_short_keeps_its_readable_records(
    spark: SparkSession, spark_config: Config, workdir: str, tmp_path: Path
) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    with gzip.open(folder / "whole.jsonl.gz", "wt", encoding="utf-8") as handle:
        for i in range(50):
            handle.write(json.dumps({"id": f"w{i}", "text": f"whole shard document {i}"}) + "\n")
    with gzip.open(tmp_path / "full.jsonl.gz", "wt", encoding="utf-8") as handle:
        for i in range(2000):
            handle.write(json.dumps({"id": f"c{i}", "text": f"cut shard document {i} " + "x" * (i % 97)}) + "\n")
    data = (tmp_path / "full.jsonl.gz").read_bytes()
    (folder / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    _jsonl(folder / "plain.jsonl", [{"id": "p1", "text": "plain file"}])

    stats = run_stage("ingest", spark, spark_config, workdir, input=str(folder / "*"))
    assert stats["read"] == stats["accepted"] + stats["quarantined"]
    assert stats["quarantined_by_reason"] == {"truncated_input": 1}
    ids = {r["doc_id"] for r in read_table(spark, workdir, "documents").select("doc_id").collect()}
    assert {f"w{i}" for i in range(50)} | {"p1"} <= ids
    cut = sorted(int(i[1:]) for i in ids if i.startswith("c"))
    assert 100 < len(cut) < 2000 and cut == list(range(len(cut)))  # every readable record, in order
    row = read_table(spark, workdir, "quarantine").where(F.col("reason") == "truncated_input").first()
    assert row["input_file"].endswith("cut.jsonl.gz") and row["line_no"] == len(cut) + 1
    assert f"after {len(cut)} readable lines" in row["detail"]
    numbered = read_table(spark, workdir, "documents").where(F.col("doc_id") == "c10").first()
    assert numbered["line_no"] == 11  # gzip lines numbered like any other file's


def test_a_remote_gzip_file_cut_short_is_a_row_too(
    spark: SparkSession, spark_config: Config, workdir: str, tmp_path: Path
) -> None:
    """Through a file system that is not ``file:`` (Hadoop's ViewFs, mounted on a local
    folder): the folder is listed by Spark, the cut gzip file is read as bytes and ends with
    its ``truncated_input`` row, the whole one and the plain file are ingested."""
    folder = tmp_path / "remote-shards"
    folder.mkdir()
    with gzip.open(folder / "whole.jsonl.gz", "wt", encoding="utf-8") as handle:
        for i in range(30):
            handle.write(json.dumps({"id": f"rw{i}", "text": f"whole remote document {i}"}) + "\n")
    data = gzip.compress("".join(json.dumps({"id": f"rc{i}", "text": f"cut remote document {i} " + "y" * (i % 89)})
                                 + "\n" for i in range(2000)).encode("utf-8"))
    (folder / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    _jsonl(folder / "plain.jsonl", [{"id": "rp1", "text": "plain remote file"}])
    mount = "fs.viewfs.mounttable.refinextest.link./shards"
    spark.conf.set(mount, folder.resolve().as_uri())
    try:
        stats = run_stage("ingest", spark, spark_config, workdir, input="viewfs://refinextest/shards")
    finally:
        spark.conf.unset(mount)
    assert stats["read"] == stats["accepted"] + stats["quarantined"]
    assert stats["quarantined_by_reason"] == {"truncated_input": 1}
    ids = {r["doc_id"] for r in read_table(spark, workdir, "documents").select("doc_id").collect()}
    assert {f"rw{i}" for i in range(30)} | {"rp1"} <= ids
    cut = sorted(int(i[2:]) for i in ids if i.startswith("rc"))
    assert 100 < len(cut) < 2000 and cut == list(range(len(cut)))
    row = read_table(spark, workdir, "quarantine").where(F.col("reason") == "truncated_input").first()
    assert row["input_file"].startswith("viewfs://refinextest/shards/") and row["input_file"].endswith("cut.jsonl.gz")
    assert row["line_no"] == len(cut) + 1


def test_an_empty_folder_warns_and_ingests_nothing(
    spark: SparkSession, spark_config: Config, workdir: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "_SUCCESS").write_text("")  # a marker file, not input
    stats = run_stage("ingest", spark, spark_config, workdir, input=str(folder))
    assert stats["empty_input"] and stats["read"] == stats["accepted"] == 0
    assert "no input records" in caplog.text


def test_a_parquet_file_with_the_wrong_schema_is_quarantined(
    spark: SparkSession, spark_config: Config, workdir: str, tmp_path: Path
) -> None:
    import pandas as pd

    path = tmp_path / "wrong.parquet"
    pd.DataFrame({"title": ["a", "b"], "body_html_len": [3, 4]}).to_parquet(path)
    stats = run_stage("ingest", spark, spark_config, workdir, input=str(path))
    assert stats["read"] == 2 and stats["quarantined_by_reason"] == {"missing_text": 2}
    typed = tmp_path / "typed.parquet"
    pd.DataFrame({"id": ["t1", "t2"], "text": [1.5, 2.5]}).to_parquet(typed)
    stats = run_stage("ingest", spark, spark_config, workdir, input=str(typed))
    assert stats["quarantined_by_reason"] == {"bad_field_type": 2}


def test_a_missing_input_is_one_line_before_spark_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from refinex import cli

    with pytest.raises(FileNotFoundError, match="input not found: .*nope.jsonl"):
        check_inputs({"input": [str(tmp_path / "nope.jsonl")]})
    with pytest.raises(FileNotFoundError, match="no such file, folder or glob match"):
        expand_local_inputs([str(tmp_path / "*.jsonl.gz")])
    assert expand_local_inputs(["gs://bucket/pages/*.jsonl.gz"]) == ["gs://bucket/pages/*.jsonl.gz"]

    def no_spark(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("Spark was started for a missing input")

    monkeypatch.setattr("refinex.spark.session.get_spark", no_spark)
    runner = CliRunner()
    for command in (["ingest", "--input"], ["pipeline", "--input"]):
        result = runner.invoke(cli.app, [*command, str(tmp_path / "nope.jsonl"), "--workdir", str(tmp_path / "w")])
        assert result.exit_code == 1
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert lines == [f"refinex: error: input not found: {tmp_path / 'nope.jsonl'} "
                         "(no such file, folder or glob match)"], result.output


def test_an_empty_input_stops_the_pipeline_after_ingest(
    spark: SparkSession, spark_config: Config, workdir: str, tmp_path: Path
) -> None:
    from refinex.spark.pipeline import run_pipeline

    path = tmp_path / "blank.jsonl"
    path.write_text("\n  \n")
    result = run_pipeline(spark, spark_config, workdir, str(path))
    assert "no input records" in result["stopped"] and "expert" not in result
    assert result["ingest"]["blank_lines"] == 2
    stages = {r["stage"] for r in read_table(spark, workdir, "stage_runs").collect()}
    assert "expert" not in stages and {"ingest", "pipeline"} <= stages
    assert os.path.isdir(workdir)


def test_gzip_batches_are_bounded_by_bytes_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Large pages end a batch before the line count does; lines stay numbered in order, and a
    cut file still ends with its truncated_input row after the batches."""
    import pandas as pd

    from refinex.spark import ingest

    monkeypatch.setattr(ingest, "_GZIP_BATCH_BYTES", 10_000)
    records = [json.dumps({"id": f"d{i}", "text": "x" * 3000}) for i in range(10)]
    path = tmp_path / "big.jsonl.gz"
    path.write_bytes(gzip.compress(("\n".join(records) + "\n").encode("utf-8"))[:-12])  # cut short
    frames = list(ingest._read_gzip_files(iter([pd.DataFrame({"path": [str(path)]})])))
    assert len(frames) >= 3 and all(len(f) <= 4 for f in frames)  # ~3 KB per line, 10 KB per batch
    rows = pd.concat(frames)
    assert list(rows["line_no"]) == list(range(1, len(rows) + 1))
    assert rows["read_reason"].iloc[-1] == "truncated_input" and rows["read_reason"].iloc[:-1].isna().all()


def test_parse_partitions_grow_with_the_input_not_the_cores() -> None:
    from refinex.spark.ingest import PARSE_PARTITION_CHARS, parse_partitions

    assert parse_partitions(0, 2) == parse_partitions(PARSE_PARTITION_CHARS, 2) == 2
    assert parse_partitions(10 * PARSE_PARTITION_CHARS + 1, 2) == 11


def test_the_local_heap_is_sized_to_the_machine_unless_configured(spark: SparkSession) -> None:
    from refinex.spark.session import local_driver_memory

    assert 1024 <= int(local_driver_memory().rstrip("m")) <= 16 * 1024
    assert spark.sparkContext.getConf().get("spark.driver.memory") == "2g"  # conf/test.yaml's spark.conf
