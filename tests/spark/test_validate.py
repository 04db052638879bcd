"""Stage validate: the Great Expectations gates on small hand-made tables."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import pytest
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from refinex.config import Config, QualityConfig
from refinex.errors import StageFailed
from refinex.program import Guardrails, execute as run_program, parse
from refinex.quality import checks
from refinex.quality.checks import gate_catalogue
from refinex.quality.gx_gates import run_gates
from refinex.spark import tables
from refinex.spark.stage import context, execute
from refinex.spark.tables import TABLES, merge_into, read_table
from refinex.spark.validate import VALIDATE, edit_stats_frame, programs_frame, refined_frame, report_dir
from refinex.versions import version_label

NOW = datetime(2025, 1, 1, tzinfo=timezone.utc)
DISTILLED = "distilled"
VERSION = "trafilatura:test-1"
LENIENT = Guardrails(max_error_ratio=1.0, min_kept_chars=0)


def _stats(chars_in: Optional[int], chars_out: Optional[int], ratio: Optional[float]) -> Optional[tuple]:
    """An ``exec_stats`` struct with the fields the gates read (the counts zero)."""
    if chars_in is None:
        return None
    return (chars_in, chars_out, chars_in - (chars_out or 0), 1, 1, 0, 1, 1, 0, 1, 0, 0, 0, {}, ratio)


def _text(doc_id: str) -> str:
    return f"{doc_id} title\nmenu home about\n{doc_id} body text that stays"


def _documents(spark: SparkSession, ids: list[str]) -> DataFrame:
    data = [(d, "test", None, _text(d), None, None, 0, "file:/in.jsonl", i, len(_text(d)), 3, NOW)
            for i, d in enumerate(ids)]
    return spark.createDataFrame(data, TABLES["documents"].schema)


def _applied(doc_id: str, program: str = "remove_lines(1, 1)") -> dict[str, Any]:
    """A document's row as apply writes it: the program really executed on its text."""
    result = run_program(parse(program), _text(doc_id), LENIENT)
    return {"doc_id": doc_id, "status": result.status, "refined_text": result.text,
            "stats": _stats(result.chars_in, result.chars_out, float(result.deletion_ratio))}


def _refined(spark: SparkSession, rows: list[dict[str, Any]], nullable: bool = False) -> DataFrame:
    schema = TABLES["refined_documents"].project(nullable=True) if nullable else TABLES["refined_documents"].schema
    data = [(r["doc_id"], DISTILLED, VERSION, "run-1", r["refined_text"], r["status"], r["stats"], NOW) for r in rows]
    return spark.createDataFrame(data, schema)


def _edit_stats(spark: SparkSession, rows: list[dict[str, Any]], nullable: bool = False) -> DataFrame:
    schema = TABLES["edit_stats"].project(nullable=True) if nullable else TABLES["edit_stats"].schema
    data = [(r["doc_id"], DISTILLED, VERSION, "run-1", "test", 0, r["status"],
             *(r["stats"] or (None,) * len(tables.EXEC_STATS_FIELDS)), NOW) for r in rows]
    return spark.createDataFrame(data, schema)


def _programs(spark: SparkSession, rows: list[tuple[Optional[str], str]], nullable: bool = False) -> DataFrame:
    schema = TABLES["programs"].project(nullable=True) if nullable else TABLES["programs"].schema
    data = [(d, DISTILLED, VERSION, p, 1, 1, 0, 0, None, None, None, None, None, NOW) for d, p in rows]
    return spark.createDataFrame(data, schema)


def _row(doc_id: Optional[str], status: str, refined_text: Optional[str], stats: Optional[tuple]) -> dict[str, Any]:
    return {"doc_id": doc_id, "status": status, "refined_text": refined_text, "stats": stats}


TEN_PERCENT = QualityConfig(max_fallback_share=0.1, max_dropped_share=0.1, max_expert_failed_share=0.1,
                            max_no_program_share=0.1, extreme_deletion_ratio=0.95, max_extreme_share=0.1)
DOCS = [f"d{i:02d}" for i in range(20)]


def test_table_names_match_the_spark_tables() -> None:
    assert (checks.REFINED_DOCUMENTS, checks.EDIT_STATS, checks.PROGRAMS) == (
        tables.REFINED_DOCUMENTS, tables.EDIT_STATS, tables.PROGRAMS)
    assert report_dir(Path("/w"), "model", "refinex-refiner/3") == Path(
        f"/w/reports/validation/model-{version_label('refinex-refiner/3').replace('/', '_')}")


def test_each_gate_fails_on_a_bad_frame_and_passes_on_a_good_one(spark: SparkSession, tmp_path: Path) -> None:
    documents = _documents(spark, DOCS).select("doc_id", "text")
    gates = gate_catalogue(TEN_PERCENT, DISTILLED, len(DOCS))

    # Good: 20 rows, 2 dropped (a share of 0.1: at the ceiling passes), 1 extreme deletion.
    good = [_applied(d) for d in DOCS[:17]]
    good += [_row(d, "dropped", "", _stats(len(_text(d)), 0, 1.0)) for d in DOCS[17:19]]
    good.append(_row(DOCS[19], "refined", "stays", _stats(len(_text(DOCS[19])), 5, 0.97)))
    frames = {
        checks.REFINED_DOCUMENTS: refined_frame(_refined(spark, good), documents, 0.95),
        checks.EDIT_STATS: edit_stats_frame(_edit_stats(spark, good), documents),
        checks.PROGRAMS: programs_frame(_programs(spark, [(d, "remove_lines(1, 1)\nkeep_all()") for d in DOCS])),
    }
    passed = run_gates(frames, gates, run_name="run-good", data_docs_dir=tmp_path / "docs")
    assert [r.gate.key for r in passed.results] == [g.key for g in gates]
    assert [r.gate.key for r in passed.results if not r.passed] == []
    shares = {r.gate.name: r.observed_value for r in passed.results if r.gate.kind == checks.SHARE_AT_MOST}
    assert shares["dropped_share"] == pytest.approx(0.1) and shares["extreme_deletion_share"] == pytest.approx(0.05)
    assert sorted(passed.validations) == sorted(checks.GATED_TABLES)
    assert all(v["success"] for v in passed.validations.values())
    assert passed.data_docs == tmp_path / "docs" / "index.html" and passed.data_docs.is_file()
    pages = sorted(p.name for p in (tmp_path / "docs" / "validations").rglob("*.html"))
    assert pages == sorted(f"refinex-{t}.html" for t in checks.GATED_TABLES)

    # Bad: every gate has rows that break it (18 rows for 20 documents).
    ok = _applied(DOCS[0])
    bad = [
        {**ok, "doc_id": None},  # doc_id_not_null (and not a known document)
        ok, ok,  # the key twice
        {**_applied(DOCS[1]), "status": "weird"},
        {**ok, "doc_id": "ghost"},  # no such document
        {**_applied(DOCS[2]), "status": "unchanged", "stats": _stats(10, 5, 1.5)},  # ratio out of range
        {**_applied(DOCS[3]), "stats": _stats(10, 50, 0.0)},  # more characters out than in
        {**_applied(DOCS[4]), "refined_text": _text(DOCS[4]) + " and more"},  # inserted text
        *[_row(d, "fallback_raw", _text(d), _stats(len(_text(d)), len(_text(d)), 0.0)) for d in DOCS[5:7]],
        *[_row(d, "dropped", "", _stats(len(_text(d)), 0, 1.0)) for d in DOCS[7:9]],
        *[_row(d, "expert_failed", None, None) for d in DOCS[9:11]],
        *[_row(d, "no_program", None, None) for d in DOCS[11:13]],
        *[_row(d, "refined", "stays", _stats(len(_text(d)), 5, 0.99)) for d in DOCS[13:15]],
    ]
    frames = {
        checks.REFINED_DOCUMENTS: refined_frame(_refined(spark, bad, nullable=True), documents, 0.95),
        checks.EDIT_STATS: edit_stats_frame(_edit_stats(spark, bad, nullable=True), documents),
        checks.PROGRAMS: programs_frame(_programs(spark, [
            (None, "keep_all()"), (DOCS[0], "keep_all()"), (DOCS[0], "keep_all()"),
            (DOCS[1], "remove_lines(1,\nrm -rf /"), (DOCS[2], "remove_lines(0, 0)"),
        ], nullable=True)),
    }
    failed = run_gates(frames, gates, run_name="run-bad", cap=50)
    results = {r.gate.key: r for r in failed.results}
    assert [k for k, r in results.items() if r.passed] == []
    offenders = {key: {o.doc_id for o in r.offenders} for key, r in results.items()}
    for table in (checks.REFINED_DOCUMENTS, checks.EDIT_STATS):
        assert offenders[f"{table}.doc_id_not_null"] == {None}
        assert offenders[f"{table}.key_unique"] == {DOCS[0]}
        assert offenders[f"{table}.status_known"] == {DOCS[1]}
        assert offenders[f"{table}.known_document"] == {None, "ghost"}
        assert offenders[f"{table}.deletion_ratio_in_range"] == {DOCS[2]}
        assert offenders[f"{table}.chars_out_at_most_chars_in"] == {DOCS[3]}
        assert results[f"{table}.row_count"].observed == "18 rows"
    assert results["refined_documents.status_known"].offenders[0].observed == "status=weird"
    assert offenders["refined_documents.deletion_only"] == {DOCS[4]}
    for status, ids in (("fallback_raw", DOCS[5:7]), ("dropped", DOCS[7:9]), ("expert_failed", DOCS[9:11]),
                        ("no_program", DOCS[11:13])):
        share = results[f"refined_documents.{status}_share"]
        assert offenders[share.gate.key] == {None, *ids} and share.observed == "0.1111 (2 of 18 rows)"
        assert share.failed
    extreme = results["refined_documents.extreme_deletion_share"]
    assert offenders[extreme.gate.key] == {None, *DOCS[13:15]} and extreme.warned and not extreme.failed
    assert offenders["programs.doc_id_not_null"] == {None} and offenders["programs.key_unique"] == {DOCS[0]}
    parse_gate = results["programs.program_parses"]
    assert offenders[parse_gate.gate.key] == {DOCS[1]} and parse_gate.offenders[0].observed == "parse_errors=2"
    assert not failed.validations[checks.REFINED_DOCUMENTS]["success"] and failed.data_docs is None


def _failure_rows(spark: SparkSession, workdir: str) -> list[tuple]:
    return sorted(
        ((r["table_name"], r["expectation"], r["doc_id"] or "", r["severity"])
         for r in read_table(spark, workdir, "gate_failures").collect()),
    )


def test_expert_failed_on_every_document_fails_with_a_clear_message(
    spark: SparkSession, spark_config: Config, workdir: str
) -> None:
    ids = ["a", "b", "c"]
    merge_into(spark, workdir, "documents", _documents(spark, ids))
    merge_into(spark, workdir, "refined_documents", _refined(spark, [_row(d, "expert_failed", None, None) for d in ids]))
    error = "no html: the trafilatura expert needs the page HTML"
    merge_into(spark, workdir, "expert_refinements", spark.createDataFrame(
        [(d, "trafilatura", "test-1", None, "failed", error, 0, 0, 0, 0.0, NOW) for d in ids],
        TABLES["expert_refinements"].schema))
    ctx = context(spark, spark_config, workdir, "run-nohtml")
    with pytest.raises(StageFailed) as raised:
        execute(VALIDATE, ctx, origin=DISTILLED, origin_version=version_label(VERSION))
    message = str(raised.value)
    assert message.startswith(f"validate distilled {version_label(VERSION)} (3 documents): FAILED: 1 of ")
    assert ("[error] refined_documents.expert_failed_share (share of documents with status expert_failed): "
            "observed 1 (3 of 3 rows), threshold share <= 0.05") in message
    assert "the expert failed on every document" in message and f'"{error}" (3 documents)' in message
    assert "examples: a, b, c" in message
    assert "edit_stats has no rows for" in message and "programs has no rows for" in message
    assert "refinex.gate_failures where run_id = 'run-nohtml'" in message
    assert _failure_rows(spark, workdir) == [("refined_documents", "expert_failed_share", d, "error")
                                             for d in ("", "a", "b", "c")]
    stats = raised.value.stats
    assert stats["failed"] is True and stats["passed"] is False
    assert stats["failed_expectations"] == ["refined_documents.expert_failed_share"]
    assert stats["gates"]["refined_documents.expert_failed_share"]["observed"] == 1.0
    run = read_table(spark, workdir, "stage_runs").where(F.col("run_id") == "run-nohtml").first()
    assert run is not None and json.loads(run["stats"])["failed"] is True


def test_failed_and_warning_gates_write_their_offending_rows(
    spark: SparkSession, spark_config: Config, workdir: str
) -> None:
    ids = ["d1", "d2", "d3", "d4", "d5"]
    merge_into(spark, workdir, "documents", _documents(spark, ids))
    good = [_applied(d) for d in ids[:3]]
    inserted = {**_applied("d4"), "refined_text": "d4 title\nd4 body text that stays, rewritten"}
    extreme = _row("d5", "refined", "stays", _stats(len(_text("d5")), 5, 0.99))
    merge_into(spark, workdir, "refined_documents", _refined(spark, [*good, inserted, extreme]))
    merge_into(spark, workdir, "edit_stats", _edit_stats(spark, good))  # stats has not seen d4, d5
    merge_into(spark, workdir, "programs", _programs(spark, [(d, "remove_lines(1, 1)") for d in ids]))
    with pytest.raises(StageFailed) as raised:
        execute(VALIDATE, context(spark, spark_config, workdir, "run-bad"), origin=DISTILLED)
    message = str(raised.value)
    assert "[error] refined_documents.deletion_only" in message and "examples: d4\n" in message
    assert "[error] edit_stats.row_count" in message and "observed 3 rows, threshold rows == 5" in message
    assert "[warning] refined_documents.extreme_deletion_share" in message
    assert "observed 0.2 (1 of 5 rows), threshold share <= 0.1" in message
    assert _failure_rows(spark, workdir) == [
        ("edit_stats", "row_count", "", "error"),
        ("edit_stats", "row_count", "d4", "error"),
        ("edit_stats", "row_count", "d5", "error"),
        ("refined_documents", "deletion_only", "d4", "error"),
        ("refined_documents", "extreme_deletion_share", "", "warning"),
        ("refined_documents", "extreme_deletion_share", "d5", "warning"),
    ]
    rows = {(r["table_name"], r["expectation"], r["doc_id"]): r
            for r in read_table(spark, workdir, "gate_failures").collect()}
    assert rows[("edit_stats", "row_count", None)]["observed"] == "3"
    assert rows[("edit_stats", "row_count", "d4")]["observed"] == "no row for this document"
    assert rows[("refined_documents", "deletion_only", "d4")]["observed"] == "deletion_only=False"
    assert rows[("refined_documents", "deletion_only", "d4")]["threshold"] == "deletion_only all true"
    assert {r["run_id"] for r in rows.values()} == {"run-bad"}
    assert raised.value.stats["warned_expectations"] == ["refined_documents.extreme_deletion_share"]


def test_a_clean_run_passes_and_writes_its_reports(spark: SparkSession, spark_config: Config, workdir: str) -> None:
    from mlflow import MlflowClient

    ids = ["d1", "d2", "d3"]
    merge_into(spark, workdir, "documents", _documents(spark, ids))
    applied = [_applied(d) for d in ids]
    merge_into(spark, workdir, "refined_documents", _refined(spark, applied))
    merge_into(spark, workdir, "edit_stats", _edit_stats(spark, applied))
    merge_into(spark, workdir, "programs", _programs(spark, [(d, "remove_lines(1, 1)") for d in ids]))
    config = spark_config.with_overrides({"stages.mlflow": True})
    stats = execute(VALIDATE, context(spark, config, workdir, "run-clean"), origin=DISTILLED)
    assert stats["passed"] is True and (stats["expectations_failed"], stats["warnings"]) == (0, 0)
    assert stats["expectations"] == len(gate_catalogue(config.quality, DISTILLED, 3)) and stats["notes"] == []
    assert stats["gates"]["refined_documents.row_count"] == {"passed": True, "observed": 3.0}
    assert read_table(spark, workdir, "gate_failures").count() == 0
    folder = report_dir(Path(workdir), DISTILLED, VERSION)
    assert stats["report"] == str(folder)
    report = json.loads((folder / "validation.json").read_text())
    assert report["passed"] is True and report["run_id"] == "run-clean"
    assert sorted(report["validations"]) == sorted(checks.GATED_TABLES)
    assert (folder / "summary.txt").read_text().startswith(f"validate distilled {version_label(VERSION)}")
    assert stats["data_docs"] == str(folder / "data_docs" / "index.html")
    assert "refined_documents" in (folder / "data_docs" / "index.html").read_text()
    page = (folder / "gates.html").read_text()
    assert "passed" in page and "refined_documents" in page and "http" not in page  # self-contained
    client = MlflowClient(tracking_uri=f"sqlite:///{Path(workdir) / 'mlflow.db'}")
    artifacts = {a.path for a in client.list_artifacts(stats["mlflow_report_run_id"], "validation")}
    assert {"validation/validation.json", "validation/summary.txt", "validation/gates.html",
            "validation/data_docs"} <= artifacts
    assert client.get_run(stats["stage_mlflow_run_id"]).data.metrics["passed"] == 1.0


def test_cli_exits_non_zero_on_a_failed_gate(spark: SparkSession, workdir: str) -> None:
    from typer.testing import CliRunner

    from refinex.cli import app

    ids = ["a", "b"]
    merge_into(spark, workdir, "documents", _documents(spark, ids))
    merge_into(spark, workdir, "refined_documents", _refined(spark, [_row(d, "expert_failed", None, None) for d in ids]))
    result = CliRunner().invoke(app, ["validate", "--workdir", workdir, "--config", "test", "--origin", DISTILLED,
                                      "--origin-version", VERSION, "--run-id", "cli-gate"])
    assert result.exit_code == 1, result.output
    assert "refined_documents.expert_failed_share" in result.output and "threshold share <= 0.05" in result.output
    rows = read_table(spark, workdir, "gate_failures").where(F.col("run_id") == "cli-gate")
    assert {r["doc_id"] for r in rows.where(F.col("expectation") == "expert_failed_share").collect()} == {None, "a", "b"}
