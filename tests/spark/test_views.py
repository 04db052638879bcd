"""The SQL views (refinex/sql/views.sql) and ``sql_command`` on a small workdir with both
origins: every view answers, at the latest versions, with the numbers ``refinex.program``
gives; labels agree with Python; outputs are written; bad queries fail in one line."""
from __future__ import annotations

import csv
import json
import math
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from pyspark.sql import SparkSession

from refinex.config import Config
from refinex.evaluation.reliability import deletion_marks
from refinex.program import Guardrails, RemoveStr, execute, parse
from refinex.spark.stage import StageContext, context
from refinex.spark.views import (
    SCHEMA_PLACEHOLDER,
    format_table,
    register_views,
    sql_command,
    split_statements,
    view_names,
    views_file,
    views_sql,
)
from refinex.versions import label_sql, version_label

from .edits_workdir import DISTILLED, MODEL, OLD_DISTILLED, EditsWorkdir, edits_workdir  # noqa: F401

LATEST = {"distilled": DISTILLED, "model": MODEL}


@pytest.fixture()
def ctx(spark: SparkSession, spark_config: Config, edits_workdir: EditsWorkdir) -> StageContext:  # noqa: F811
    return context(spark, spark_config, edits_workdir.workdir)


def records(ctx: StageContext, query: str) -> list[dict[str, Any]]:
    result = sql_command(ctx, query, limit=1000)
    assert not result["truncated"]
    return [dict(zip(result["columns"], row)) for row in result["rows"]]


_VIEWS: dict[str, list[dict[str, Any]]] = {}


def view(ctx: StageContext, name: str, **where: Any) -> list[dict[str, Any]]:
    """Every row of a view (queried once per test session through ``sql_command``), those
    whose columns equal ``where``."""
    if name not in _VIEWS:
        _VIEWS[name] = records(ctx, f"SELECT * FROM {name}")
    return [r for r in _VIEWS[name] if all(r[k] == v for k, v in where.items())]


def executed(config: Config, w: EditsWorkdir, version: str) -> dict[str, Any]:
    """doc_id -> the execution result of its program (None without one), as apply ran it."""
    g = Guardrails(max_error_ratio=float(config.guardrails.max_error_ratio),
                   min_kept_chars=int(config.guardrails.min_kept_chars))
    return {doc_id: (execute(parse(w.programs[version][doc_id]), text, g) if doc_id in w.programs[version] else None)
            for doc_id, (_, _, text) in w.documents.items()}


def test_every_view_answers_at_the_latest_versions(ctx: StageContext) -> None:
    names = view_names()
    assert names == register_views(ctx.spark, ctx.tables)
    assert {"edit_stats_latest", "stats_by_source", "stats_by_status", "stats_by_shard", "deletion_ratio_percentiles",
            "top_removed_strings", "top_removed_lines", "model_vs_oracle"} <= set(names)
    for name in names:
        rows = view(ctx, name)
        assert rows, name
        assert {"origin", "origin_version", "version_label"} <= set(rows[0]), name
        versions = {r["origin_version"] for r in rows}
        if name == "edit_stats_versions":
            assert versions == {OLD_DISTILLED, DISTILLED, MODEL}
            assert {r["origin_version"]: r["is_latest"] for r in rows} == {
                OLD_DISTILLED: False, DISTILLED: True, MODEL: True}
        elif name == "model_vs_oracle":
            assert versions == {MODEL} and {r["oracle_version"] for r in rows} == {DISTILLED}
        else:
            assert versions == {DISTILLED, MODEL}, name
        for row in rows:
            assert row["version_label"] == version_label(row["origin_version"])
            if name != "edit_stats_versions":
                assert row["origin_version"] == LATEST[row["origin"]], name
    label = version_label(MODEL)
    by_label = records(ctx, f"SELECT count(*) AS n FROM edit_stats_latest WHERE version_label = '{label}'")
    assert by_label == [{"n": 6}]


def test_statistics_views_match_execution(
    ctx: StageContext, spark_config: Config, edits_workdir: EditsWorkdir  # noqa: F811
) -> None:
    w = edits_workdir
    for origin, version in LATEST.items():
        results = executed(spark_config, w, version)
        with_program = {d: r for d, r in results.items() if r is not None}
        ratios = [r.deletion_ratio for r in with_program.values()]

        [overview] = view(ctx, "stats_by_origin", origin=origin)
        assert overview["documents"] == len(w.documents)
        assert overview["mean_deletion_ratio"] == pytest.approx(statistics.mean(ratios))
        assert overview["refined"] == sum(r.status == "refined" for r in with_program.values())
        assert overview["other_status"] == len(w.documents) - len(with_program)

        statuses = Counter(r.status if r is not None else "no_program" for r in results.values())
        by_status = view(ctx, "stats_by_status", origin=origin)
        assert {r["status"]: r["documents"] for r in by_status} == dict(statuses)
        assert sum(r["share"] for r in by_status) == pytest.approx(1.0)

        for source in ("news", "blog"):
            ids = [d for d, r in with_program.items() if w.documents[d][0] == source]
            [row] = view(ctx, "stats_by_source", origin=origin, source=source)
            assert row["documents"] == len(ids)
            mean = statistics.mean(with_program[d].deletion_ratio for d in ids)
            assert row["mean_deletion_ratio"] == pytest.approx(mean)
            assert row["corpus_deletion_ratio"] == pytest.approx(
                sum(with_program[d].chars_removed for d in ids) / sum(with_program[d].chars_in for d in ids))
        by_shard = view(ctx, "stats_by_shard", origin=origin)
        assert {r["shard"]: r["documents"] for r in by_shard} == dict(Counter(w.documents[d][1] for d in with_program))

        histogram = view(ctx, "ops_per_document", origin=origin)
        assert {(r["n_ops"], r["documents"]) for r in histogram if r["op"] == "ops_total"} == set(
            Counter(r.ops_total for r in with_program.values()).items())
        assert sum(r["n_ops"] * r["documents"] for r in histogram if r["op"] == "remove_str") == sum(
            r.n_remove_str for r in with_program.values())

        [q] = view(ctx, "deletion_ratio_percentiles", origin=origin)
        ordered = sorted(ratios)
        assert (q["documents"], q["min_deletion_ratio"], q["max_deletion_ratio"]) == (
            len(ratios), pytest.approx(ordered[0]), pytest.approx(ordered[-1]))
        for name, p in (("p10", 0.1), ("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
            assert q[name] == pytest.approx(ordered[max(math.ceil(p * len(ordered)) - 1, 0)]), name

    oracle, model = executed(spark_config, w, DISTILLED), executed(spark_config, w, MODEL)
    compared = {r["doc_id"]: r for r in view(ctx, "model_vs_oracle")}
    assert set(compared) == set(w.documents)
    for doc_id, row in compared.items():
        o, m = oracle[doc_id], model[doc_id]
        assert row["oracle_status"] == (o.status if o else "no_program") and row["model_status"] == m.status
        assert row["same_status"] == (row["oracle_status"] == row["model_status"])
        assert row["model_chars_out"] == m.chars_out and row["chars_in"] == len(w.documents[doc_id][2])
        if o is not None:
            assert row["deletion_ratio_difference"] == pytest.approx(m.deletion_ratio - o.deletion_ratio)
            assert row["oracle_chars_out"] == o.chars_out


def test_top_removed_strings_decode_like_the_parser(
    ctx: StageContext, edits_workdir: EditsWorkdir  # noqa: F811
) -> None:
    for origin, version in LATEST.items():
        strings: Counter[str] = Counter()
        documents: dict[str, set[str]] = {}
        for doc_id, program in edits_workdir.programs[version].items():
            for op in parse(program).ops:
                if isinstance(op, RemoveStr):
                    strings[op.text] += 1
                    documents.setdefault(op.text, set()).add(doc_id)
        rows = sorted(view(ctx, "top_removed_strings", origin=origin), key=lambda r: r["rank"])
        assert {r["string"]: (r["times"], r["documents"]) for r in rows} == {
            s: (n, len(documents[s])) for s, n in strings.items()}
        assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    model_strings = {r["string"] for r in view(ctx, "top_removed_strings", origin="model")}
    assert {"Posted\u00a0", "\U0001F600", "Tags: 'a', \"b\\\" \t\u200b\U000e0001", "Home | "} <= model_strings
    assert "OLD STRING" not in {r["string"] for r in view(ctx, "top_removed_strings")}


def test_top_removed_lines_follow_execution(ctx: StageContext, edits_workdir: EditsWorkdir) -> None:  # noqa: F811
    for origin, version in LATEST.items():
        documents: dict[str, set[str]] = {}
        times: Counter[str] = Counter()
        for doc_id, program in edits_workdir.programs[version].items():
            marks = deletion_marks(program, edits_workdir.documents[doc_id][2])
            for index in sorted(marks.removed):
                line = marks.lines[index].strip()
                if line:
                    times[line] += 1
                    documents.setdefault(line, set()).add(doc_id)
        rows = view(ctx, "top_removed_lines", origin=origin)
        assert {r["line"]: (r["times"], r["documents"]) for r in rows} == {
            line: (n, len(documents[line])) for line, n in times.items()}
    distilled = {r["line"] for r in view(ctx, "top_removed_lines", origin="distilled")}
    assert "Share this" in distilled
    assert "Footer \u00a9 2024" not in distilled  # doc-a's remove_lines(5, 6) overlaps (4, 5): rejected
    assert "Footer \u00a9 2024" in {r["line"] for r in view(ctx, "top_removed_lines", origin="model")}


def test_version_label_in_sql_equals_python(spark: SparkSession, ctx: StageContext) -> None:
    assert label_sql("origin_version") in views_file()  # the views compute the label as versions.py says
    versions = [DISTILLED, MODEL, OLD_DISTILLED, "refinex-refiner/12", "++weird", "", "naïve:ü", "a[b]", "x+y"]
    values = ", ".join("('" + v.replace("'", "''") + "')" for v in versions)
    rows = spark.sql(f"SELECT origin_version, {label_sql('origin_version')} AS label "
                     f"FROM VALUES {values} AS t(origin_version)").collect()
    assert {r["origin_version"]: r["label"] for r in rows} == {v: version_label(v) for v in versions}
    listed = view(ctx, "edit_stats_versions")
    assert all(r["version_label"] == version_label(r["origin_version"]) for r in listed)


def test_outputs_are_written_and_readable(ctx: StageContext, tmp_path: Path) -> None:
    query = "SELECT origin, version_label, status, documents, share FROM stats_by_status ORDER BY origin, status"
    shown = sql_command(ctx, query)
    expected = [dict(zip(shown["columns"], row)) for row in shown["rows"]]
    assert "origin" in shown["text"].splitlines()[0] and shown["text"].endswith(f"({len(expected)} rows)")

    csv_out = sql_command(ctx, query, output=str(tmp_path / "out" / "stats.csv"))
    assert (csv_out["format"], csv_out["rows_written"]) == ("csv", len(expected))
    with open(csv_out["output"], newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["origin"], r["status"], int(r["documents"])) for r in rows] == [
        (e["origin"], e["status"], e["documents"]) for e in expected]

    jsonl_out = sql_command(ctx, query, output=str(tmp_path / "stats.jsonl"))
    lines = Path(jsonl_out["output"]).read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [
        {**e, "share": pytest.approx(e["share"])} for e in expected]

    parquet_out = sql_command(ctx, query, output=str(tmp_path / "stats.parquet"))
    table = pq.read_table(parquet_out["output"]).to_pylist()
    assert sorted((r["origin"], r["status"], r["documents"]) for r in table) == [
        (e["origin"], e["status"], e["documents"]) for e in expected]
    assert parquet_out["rows_written"] == len(expected)

    nested = sql_command(ctx, "SELECT doc_id, rejected_by_reason, created_at FROM edit_stats_latest "
                              "WHERE ops_rejected > 0 ORDER BY doc_id", output=str(tmp_path / "nested.jsonl"))
    first = json.loads(Path(nested["output"]).read_text(encoding="utf-8").splitlines()[0])
    assert isinstance(first["rejected_by_reason"], dict) and isinstance(first["created_at"], str)
    with pytest.raises(ValueError, match="must end with"):
        sql_command(ctx, query, output=str(tmp_path / "stats.xlsx"))


@pytest.mark.parametrize("query, start", [
    ("SELECT no_such_column FROM edit_stats_latest", "[UNRESOLVED_COLUMN"),
    ("SELECT * FROM no_such_view", "[TABLE_OR_VIEW_NOT_FOUND]"),
    ("SELECT * FROM (SELECT 1", "[PARSE_SYNTAX_ERROR]"),
    ("SELECT 1 / 0", "[DIVIDE_BY_ZERO]"),
    ("DROP TABLE edit_stats", "refinex sql runs one query"),
    ("SELECT 1; SELECT 2", "one statement"),
])
def test_bad_query_is_one_readable_line(ctx: StageContext, query: str, start: str) -> None:
    with pytest.raises(ValueError) as raised:
        sql_command(ctx, query)
    message = str(raised.value)
    assert message.startswith(start) and "\n" not in message and "at org.apache" not in message


def test_views_sql_for_databricks() -> None:
    rendered = views_sql("main.refinex")
    assert SCHEMA_PLACEHOLDER not in rendered
    statements = split_statements(rendered)
    assert len(statements) == len(view_names())
    for statement, name in zip(statements, view_names()):
        assert f"CREATE OR REPLACE VIEW main.refinex.{name} AS" in statement
    with pytest.raises(ValueError):
        views_sql("main; DROP TABLE x")
    assert split_statements("SELECT ';' AS a; -- c;\nSELECT r'\\' AS b /* ; */; ") == [
        "SELECT ';' AS a", "-- c;\nSELECT r'\\' AS b /* ; */"]


def test_format_table_cuts_and_aligns() -> None:
    table = format_table([("distilled", 12, 0.123456789, None), ("a\nb" + "x" * 40, 3, 1.0, True)],
                         ["origin", "n", "ratio", "flag"], max_width=10)
    assert table.splitlines() == [
        "origin     | n  | ratio    | flag",
        "-----------+----+----------+-----",
        "distilled  | 12 | 0.123457 | NULL",
        "a\\nbxxxxx… |  3 |        1 | true",
    ]
