"""Stage ``validate``: the Great Expectations quality gates of one program origin.

For one ``(origin, origin_version)`` it validates ``refined_documents``, ``edit_stats`` and
``programs`` (the gates: :func:`refinex.quality.checks.gate_catalogue`), with the columns
the gates need computed first: the ``exec_stats`` struct flattened, whether each row's
document exists, whether the refined text is deletion-only against the raw text (a pandas
UDF over ``documents.text``), 0/1 status indicators for the share ceilings and the parse
errors of each program (``refinex.program.parse``; programs are data, never code).

Every run writes the offending rows of failed and warning gates to ``gate_failures``, the
validation result JSON, a text summary, ``gates.html`` (one self-contained page: it renders
offline, unlike the Data Docs, whose styles come from CDNs) and (``quality.data_docs``) the
Data Docs site to ``<workdir>/reports/validation/<origin>-<label>/``, and logs them as MLflow
artifacts when
``stages.mlflow`` is on. A failed error-level gate then fails the stage with the summary
(:class:`~refinex.errors.StageFailed`); warnings never do. Tables without rows for the
version yet (``edit_stats`` before ``stats``) are not validated, and the summary says so.
"""
from __future__ import annotations

import json
import logging
import re
import tempfile
from dataclasses import replace
from functools import reduce
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import BooleanType, IntegerType

from refinex.errors import StageFailed
from refinex.quality.checks import (
    DELETION_ONLY,
    EXTREME_DELETION,
    KNOWN_DOCUMENT,
    OFFENDING_ROWS_CAP,
    PARSE_ERRORS,
    ROW_COUNT,
    SHARE_AT_MOST,
    SHARE_STATUSES,
    GateResult,
    Offender,
    format_summary,
    gate_catalogue,
    share_column,
)
from refinex.quality.gates_page import GATES_HTML, render_gates_page
from refinex.spark.apply import ORIGIN_PARAMS
from refinex.spark.origins import resolve_origin
from refinex.spark.stage import Param, Stage, StageContext, flat_metrics
from refinex.spark.tables import (
    DOCUMENTS,
    EDIT_STATS,
    EXPERT_REFINEMENTS,
    GATE_FAILURES,
    ORIGIN_DISTILLED,
    PROGRAMS,
    REFINED_DOCUMENTS,
    TABLES,
)
from refinex.status import EXPERT_FAILED, REFINED
from refinex.versions import version_label

log = logging.getLogger(__name__)

STAGE = "validate"
REPORTS = ("reports", "validation")
VALIDATION_JSON = "validation.json"
SUMMARY_TXT = "summary.txt"
DATA_DOCS = "data_docs"
MLFLOW_ARTIFACTS = "validation"


def _deletion_only_udf() -> Any:
    """pandas UDF (raw text, refined text) -> deletion-only (null when the document is missing)."""

    @F.pandas_udf(BooleanType())  # type: ignore[call-overload]
    def deletion_only(raw: pd.Series, refined: pd.Series) -> pd.Series:
        from refinex.quality.checks import is_deletion_only

        values = [
            is_deletion_only(r, o if isinstance(o, str) else None) if isinstance(r, str) else None
            for r, o in zip(raw, refined)
        ]
        return pd.Series(values, dtype="boolean")

    return deletion_only


def _parse_errors_udf() -> Any:
    """pandas UDF program text -> number of malformed lines (null without a program)."""

    @F.pandas_udf(IntegerType())  # type: ignore[call-overload]
    def parse_errors(program: pd.Series) -> pd.Series:
        from refinex.program import parse

        return pd.Series([len(parse(p).errors) if isinstance(p, str) else None for p in program], dtype="Int32")

    return parse_errors


def _of_version(df: DataFrame, origin: str, origin_version: str) -> DataFrame:
    return df.where((F.col("origin") == origin) & (F.col("origin_version") == origin_version))


def _known(df: DataFrame, documents: DataFrame) -> DataFrame:
    """``df`` with ``known_document``: its doc_id is a row of ``documents``."""
    ids = documents.select("doc_id", F.lit(True).alias("_known"))
    return df.join(ids, "doc_id", "left").withColumn(KNOWN_DOCUMENT, F.coalesce(F.col("_known"), F.lit(False)))


def refined_frame(refined: DataFrame, documents: DataFrame, extreme_deletion_ratio: float) -> DataFrame:
    """``refined_documents`` rows as the gates read them (see the module docstring)."""
    raw = documents.select("doc_id", F.col("text").alias("raw_text"), F.lit(True).alias("_known"))
    ratio = F.col("exec_stats.deletion_ratio")
    extreme = (F.col("status") == REFINED) & (ratio >= F.lit(float(extreme_deletion_ratio)))
    return refined.join(raw, "doc_id", "left").select(
        "doc_id", "origin", "origin_version", "status",
        ratio.alias("deletion_ratio"),
        F.col("exec_stats.chars_in").alias("chars_in"),
        F.col("exec_stats.chars_out").alias("chars_out"),
        F.coalesce(F.col("_known"), F.lit(False)).alias(KNOWN_DOCUMENT),
        _deletion_only_udf()(F.col("raw_text"), F.col("refined_text")).alias(DELETION_ONLY),
        *[(F.col("status") == status).cast("int").alias(share_column(status)) for status in SHARE_STATUSES],
        F.coalesce(extreme, F.lit(False)).cast("int").alias(EXTREME_DELETION),
    )


def edit_stats_frame(edit_stats: DataFrame, documents: DataFrame) -> DataFrame:
    """``edit_stats`` rows as the gates read them."""
    columns = ("doc_id", "origin", "origin_version", "status", "deletion_ratio", "chars_in", "chars_out")
    return _known(edit_stats.select(*columns), documents).select(*columns, KNOWN_DOCUMENT)


def programs_frame(programs: DataFrame) -> DataFrame:
    """``programs`` rows with the parse errors of each program text."""
    return programs.select("doc_id", "origin", "origin_version",
                           _parse_errors_udf()(F.col("program")).alias(PARSE_ERRORS))


def _tables_with_rows(frames: dict[str, DataFrame]) -> set[str]:
    """The names of the non-empty frames (one Spark job for all of them)."""
    if not frames:
        return set()
    probes = [df.select(F.lit(name).alias("table")).limit(1) for name, df in frames.items()]
    return {r["table"] for r in reduce(DataFrame.unionByName, probes).collect()}


def report_dir(root: Path, origin: str, origin_version: str) -> Path:
    """``<root>/reports/validation/<origin>-<label>`` (unsafe characters of the label as ``_``)."""
    name = re.sub(r"[^A-Za-z0-9_.@-]+", "_", f"{origin}-{version_label(origin_version)}")
    return root.joinpath(*REPORTS, name)


def _missing_documents(documents: DataFrame, frame: DataFrame) -> list[Offender]:
    """Documents without a row in ``frame`` (the offending rows of a failed row count)."""
    missing = documents.select("doc_id").join(frame.select("doc_id"), "doc_id", "left_anti")
    return [Offender(r["doc_id"], "no row for this document")
            for r in missing.limit(OFFENDING_ROWS_CAP).collect()]


def _expert_errors(ctx: StageContext, frame: DataFrame, origin_version: str) -> str:
    """The expert's most common error on this version's ``expert_failed`` documents."""
    if not ctx.exists(EXPERT_REFINEMENTS):
        return ""
    expert = origin_version.split(":", 1)[0]
    failed = frame.where(F.col("status") == EXPERT_FAILED).select("doc_id")
    top = (
        ctx.read(EXPERT_REFINEMENTS).where(F.col("expert") == expert).join(failed, "doc_id")
        .groupBy("error").count().orderBy(F.col("count").desc(), F.col("error")).first()
    )
    if top is None or top["error"] is None:
        return ""
    return f'most common error of expert {expert}: "{str(top["error"])[:200]}" ({top["count"]} documents)'


def _explain(
    ctx: StageContext, results: list[GateResult], frames: dict[str, DataFrame], documents: DataFrame,
    origin: str, origin_version: str,
) -> list[GateResult]:
    """Failed gates completed with what the stage knows: the documents a short table
    misses, the expert's own error message."""
    explained = []
    for result in results:
        gate = result.gate
        if not result.passed and gate.kind == ROW_COUNT:
            result = replace(result, offenders=(*result.offenders, *_missing_documents(documents, frames[gate.table])))
        if not result.passed and gate.name == "expert_failed_share" and origin == ORIGIN_DISTILLED:
            result = replace(result, note=_expert_errors(ctx, frames[gate.table], origin_version))
        explained.append(result)
    return explained


def _failure_rows(ctx: StageContext, results: Sequence[GateResult], origin: str, origin_version: str) -> list[tuple]:
    """``gate_failures`` rows: every offending row of every failed or warning gate."""
    now = datetime.now(timezone.utc)
    rows = []
    for result in results:
        if result.passed:
            continue
        gate = result.gate
        offenders = result.offenders or (Offender(None, result.observed),)
        for offender in offenders:
            rows.append((ctx.run_id, gate.table, origin, origin_version, gate.name, offender.doc_id,
                         gate.severity, offender.observed, gate.threshold, now))
    return rows


def _write_reports(
    folder: Path, payload: dict[str, Any], summary: str, validations_json: str,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    document = {**payload, "summary": summary, "validations": json.loads(validations_json)}
    path = folder / VALIDATION_JSON
    path.write_text(json.dumps(document, indent=1, sort_keys=True, default=str, ensure_ascii=False), encoding="utf-8")
    (folder / SUMMARY_TXT).write_text(summary + "\n", encoding="utf-8")
    (folder / GATES_HTML).write_text(render_gates_page(payload, summary), encoding="utf-8")
    return path


def _log_artifacts(ctx: StageContext, folder: Path, params: dict[str, Any], stats: dict[str, Any]) -> Optional[str]:
    """An MLflow run (experiment ``stages.mlflow_experiment``) holding the reports as
    artifacts; None (and a warning) when tracking fails: it never fails the stage."""
    from refinex.tracking.expert_runs import expert_tracking_uri, log_expert_run

    try:
        from mlflow import MlflowClient

        run = log_expert_run(
            params, flat_metrics(stats), workdir=ctx.workdir, tracking_uri=ctx.config.model.tracking_uri,
            experiment=ctx.config.stages.mlflow_experiment, run_name=f"{STAGE} report {ctx.run_id}",
            tags={"refinex.stage": STAGE, "refinex.run_id": ctx.run_id, "refinex.artifacts": MLFLOW_ARTIFACTS},
        )
        client = MlflowClient(tracking_uri=expert_tracking_uri(ctx.config.model.tracking_uri, ctx.workdir))
        client.log_artifacts(run, str(folder), MLFLOW_ARTIFACTS)
        return run
    except Exception as exc:  # noqa: BLE001 - the gates decided; tracking must not change that
        log.warning("%s: could not log the reports to MLflow: %s", STAGE, str(exc).splitlines()[0])
        return None


def _frames(
    ctx: StageContext, documents: DataFrame, origin: str, origin_version: str, extreme_deletion_ratio: float,
    split: Optional[str] = None,
) -> tuple[dict[str, DataFrame], set[str], list[str]]:
    """The frames to validate, the tables with rows for the version, and notes on those without
    (with a ``split``, only the rows of its documents)."""
    label = version_label(origin_version)
    of_version = {table: _of_version(ctx.read(table), origin, origin_version)
                  for table in (REFINED_DOCUMENTS, EDIT_STATS, PROGRAMS) if ctx.exists(table)}
    if split is not None:
        ids = documents.select("doc_id")
        of_version = {table: frame.join(ids, "doc_id", "left_semi") for table, frame in of_version.items()}
    present = _tables_with_rows(of_version)
    notes: list[str] = []
    refined = of_version.get(REFINED_DOCUMENTS)
    if refined is None:  # never applied: validated empty, so that the row count fails
        refined = ctx.read(REFINED_DOCUMENTS)
    frames = {REFINED_DOCUMENTS: refined_frame(refined, documents, extreme_deletion_ratio)}
    if REFINED_DOCUMENTS not in present:
        notes.append(f"refined_documents has no rows for {label}: apply has not run for it "
                     f"(status shares not evaluated)")
    if EDIT_STATS in present:
        frames[EDIT_STATS] = edit_stats_frame(of_version[EDIT_STATS], documents)
    else:
        notes.append(f"edit_stats has no rows for {label} yet (run stats): its expectations were not evaluated")
    if PROGRAMS in present:
        frames[PROGRAMS] = programs_frame(of_version[PROGRAMS])
    else:
        notes.append(f"programs has no rows for {label}: its expectations were not evaluated")
    return frames, present, notes


def _statistics(
    origin: str, origin_version: str, documents: int, frames: dict[str, DataFrame],
    results: Sequence[GateResult], failure_rows: int, notes: list[str],
) -> dict[str, Any]:
    failed = [r.gate.key for r in results if r.failed]
    warned = [r.gate.key for r in results if r.warned]
    return {
        "origin": origin,
        "origin_version": origin_version,
        "version_label": version_label(origin_version),
        "passed": not failed,
        "documents": documents,
        "tables": sorted(frames),
        "expectations": len(results),
        "expectations_failed": len(failed),
        "warnings": len(warned),
        "failed_expectations": failed,
        "warned_expectations": warned,
        "gates": {r.gate.key: {"passed": r.passed, "observed": r.observed_value} for r in results},
        "gate_failure_rows": failure_rows,
        "notes": notes,
        "report": None,
        "validation_json": None,
        "data_docs": None,
    }


def validate_outputs(
    ctx: StageContext, origin: Optional[str] = None, origin_version: Optional[str] = None,
    split: Optional[str] = None,
) -> dict[str, Any]:
    """Run the quality gates of one program origin (default: the latest ``apply`` run's);
    ``split`` checks only the documents of that SFT split (a model refined with
    ``refine --split``: one row per document of the split)."""
    from refinex.quality.gx_gates import run_gates  # GX loads in seconds: only when validating

    config, quality = ctx.config, ctx.config.quality
    origin, origin_version = resolve_origin(ctx.spark, config, ctx.tables, origin, origin_version,
                                            prefer_latest_apply=True)
    label = version_label(origin_version)
    ctx.record(origin=origin, origin_version=origin_version, split=split)
    documents = ctx.read(DOCUMENTS).select("doc_id", "text")
    if split is not None:
        from refinex.spark.sft import SPLITS, split_filter

        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        documents = documents.where(split_filter(float(config.sft.validation_fraction))(F.col("doc_id")) == split)
    n_documents = documents.count()
    frames, present, notes = _frames(ctx, documents, origin, origin_version, quality.extreme_deletion_ratio, split)
    gates = gate_catalogue(quality, origin, n_documents)
    if REFINED_DOCUMENTS not in present:  # an empty table has no shares
        gates = tuple(g for g in gates if not (g.table == REFINED_DOCUMENTS and g.kind == SHARE_AT_MOST))

    local = ctx.driver_dir
    scratch = None
    if local is not None:
        folder: Optional[Path] = report_dir(local, origin, origin_version)
    elif config.stages.mlflow:  # an object-store workdir: the reports travel as MLflow artifacts only
        scratch = tempfile.TemporaryDirectory(prefix="refinex-validate-")
        folder = report_dir(Path(scratch.name), origin, origin_version)
    else:
        folder = None
    try:
        docs_dir = folder / DATA_DOCS if folder is not None and quality.data_docs else None
        run = run_gates(frames, gates, run_name=ctx.run_id, cap=OFFENDING_ROWS_CAP, data_docs_dir=docs_dir)
        results = _explain(ctx, run.results, frames, documents, origin, origin_version)
        rows = _failure_rows(ctx, results, origin, origin_version)
        if rows:
            ctx.merge(GATE_FAILURES, ctx.spark.createDataFrame(rows, TABLES[GATE_FAILURES].schema))
        stats = _statistics(origin, origin_version, n_documents, frames, results, len(rows), notes)
        title = f"{STAGE} {origin} {label} ({n_documents} documents)"
        summary = format_summary(results, title=title, example_ids=quality.example_ids, notes=notes)
        if folder is not None:
            payload = {"run_id": ctx.run_id, "origin": origin, "origin_version": origin_version,
                       "version_label": label, "passed": stats["passed"],
                       "gates": [_gate_json(r) for r in results]}
            path = _write_reports(folder, payload, summary, run.to_json())
            if local is not None:
                stats.update(report=str(folder), validation_json=str(path),
                             data_docs=None if run.data_docs is None else str(run.data_docs))
            if config.stages.mlflow:
                metrics = {k: stats[k] for k in ("passed", "documents", "expectations", "expectations_failed",
                                                 "warnings", "gates")}
                stats["mlflow_report_run_id"] = _log_artifacts(
                    ctx, folder, {"origin": origin, "origin_version": origin_version, "version_label": label},
                    metrics)
    finally:
        if scratch is not None:
            scratch.cleanup()

    if not stats["passed"]:
        where = [f"offending rows: {ctx.tables.display_name(GATE_FAILURES)} where run_id = '{ctx.run_id}'"]
        if stats["report"]:
            where.append(f"report: {stats['validation_json']}"
                         + (f", {stats['data_docs']}" if stats["data_docs"] else ""))
        raise StageFailed("\n".join([summary, *where]), stats)
    if stats["warnings"]:
        log.warning("%s", summary)
    return stats


def _gate_json(result: GateResult) -> dict[str, Any]:
    gate = result.gate
    return {
        "expectation": gate.name, "table": gate.table, "severity": gate.severity, "passed": result.passed,
        "description": gate.description, "threshold": gate.threshold, "observed": result.observed,
        "observed_value": result.observed_value, "offending": result.offending,
        "examples": result.examples(OFFENDING_ROWS_CAP), "note": result.note,
    }


def _describe(stats: dict[str, Any]) -> str:
    verdict = "passed" if stats["passed"] else "FAILED"
    return (f"{stats['origin']} {stats['version_label']}: {verdict} ({stats['expectations']} expectations, "
            f"{stats['expectations_failed']} failed, {stats['warnings']} warnings)")


VALIDATE = Stage(
    name=STAGE,
    help="Great Expectations quality gates of one program origin: offending rows to gate_failures, "
         "reports under reports/validation/; fails when an error-level gate fails.",
    reads=(DOCUMENTS, PROGRAMS, REFINED_DOCUMENTS, EDIT_STATS, EXPERT_REFINEMENTS),
    writes=(GATE_FAILURES,),
    transform=validate_outputs,
    params=(*ORIGIN_PARAMS, Param("split", "Only the documents of this SFT split: train or validation.")),
    describe=_describe,
)
