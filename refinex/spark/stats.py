"""Stage ``stats``: ``refined_documents`` x ``documents`` -> ``edit_stats`` (one row per document).

``edit_stats`` is flat and typed for SQL: the document's ``source`` and ``shard``, its
status, character/line counts in and out, operations by type, parse errors, rejected
operations (total and ``rejected_by_reason`` map) and the deletion ratio. Documents without
a program (``no_program``, ``expert_failed``) have their ``chars_in``/``lines_in`` and null
for everything an execution would have measured.
"""
from __future__ import annotations

import logging
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from refinex.config import Config
from refinex.spark.apply import resolve_origin
from refinex.spark.tables import (
    DOCUMENTS,
    EDIT_STATS,
    EXEC_STATS_FIELDS,
    REFINED_DOCUMENTS,
    merge_into,
    new_run_id,
    read_table,
    record_stage_run,
)

log = logging.getLogger(__name__)

STAGE = "stats"
HIST_BINS = 20


def _local_dir(workdir: str) -> Optional[Path]:
    """``workdir`` as a local folder, or None for remote stores (dbfs:/, gs://, s3://, ...)."""
    parsed = urlparse(workdir)
    if parsed.scheme in ("", "file"):
        return Path(parsed.path if parsed.scheme == "file" else workdir)
    return None


def write_report_plot(
    spark: SparkSession, workdir: str, origin: str, origin_version: str, by_status: dict[str, int]
) -> Optional[str]:
    """PNG of the deletion-ratio histogram and statuses under ``<workdir>/reports/``.

    The histogram is computed in Spark; only the bin counts reach the driver. Remote
    workdirs get no plot (the numbers are in ``edit_stats`` and ``stage_runs``).
    """
    local = _local_dir(workdir)
    if local is None:
        log.info("stats: no plot for the remote workdir %s", workdir)
        return None
    from refinex.evaluation.plots import plot_edit_stats

    rows = read_table(spark, workdir, EDIT_STATS).where(
        (F.col("origin") == origin) & (F.col("origin_version") == origin_version)
        & F.col("deletion_ratio").isNotNull()
    )
    bins = F.least(F.floor(F.col("deletion_ratio") * HIST_BINS), F.lit(HIST_BINS - 1)).cast("int")
    counts = {int(r["bin"]): int(r["n"]) for r in rows.groupBy(bins.alias("bin")).count().withColumnRenamed("count", "n").collect()}
    hist = [counts.get(i, 0) for i in range(HIST_BINS)]
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{origin}-{origin_version}")[:120]
    out = plot_edit_stats(hist, by_status, local / "reports" / f"edit_stats-{safe}.png", f"{origin} {origin_version}")
    return str(out)


def summarize(spark: SparkSession, workdir: str, origin: str, origin_version: str) -> dict[str, Any]:
    """Documents per status, mean deletion ratio and total characters of one origin's rows."""
    rows = read_table(spark, workdir, EDIT_STATS).where(
        (F.col("origin") == origin) & (F.col("origin_version") == origin_version)
    )
    by_status = {
        r["status"]: int(r["n"])
        for r in rows.groupBy("status").agg(F.count(F.lit(1)).alias("n")).collect()
    }
    totals = rows.agg(
        F.avg("deletion_ratio").alias("mean_deletion_ratio"),
        F.sum("chars_in").alias("chars_in"),
        F.sum("chars_out").alias("chars_out"),
        F.sum("ops_rejected").alias("ops_rejected"),
        F.sum("parse_errors").alias("parse_errors"),
    ).first()
    assert totals is not None
    return {
        "documents": sum(by_status.values()),
        "by_status": dict(sorted(by_status.items())),
        "mean_deletion_ratio": None if totals["mean_deletion_ratio"] is None else float(totals["mean_deletion_ratio"]),
        "chars_in": int(totals["chars_in"] or 0),
        "chars_out": int(totals["chars_out"] or 0),
        "ops_rejected": int(totals["ops_rejected"] or 0),
        "parse_errors": int(totals["parse_errors"] or 0),
    }


def run_stats(
    spark: SparkSession,
    config: Config,
    workdir: str,
    origin: Optional[str] = None,
    origin_version: Optional[str] = None,
    run_id: Optional[str] = None,
) -> dict[str, Any]:
    """Write ``edit_stats`` for one program origin (default: the latest ``apply`` run's)."""
    started = datetime.now(timezone.utc)
    run_id = run_id or new_run_id()
    origin, origin_version = resolve_origin(spark, config, workdir, origin, origin_version, prefer_latest_apply=True)
    refined = read_table(spark, workdir, REFINED_DOCUMENTS).where(
        (F.col("origin") == origin) & (F.col("origin_version") == origin_version)
    )
    documents = read_table(spark, workdir, DOCUMENTS).select("doc_id", "source", "shard", "n_chars", "n_lines")
    joined = refined.join(documents, "doc_id")
    measured = {
        f.name: F.col(f"exec_stats.{f.name}")
        for f in EXEC_STATS_FIELDS
    }
    measured["chars_in"] = F.coalesce(F.col("exec_stats.chars_in"), F.col("n_chars"))
    measured["lines_in"] = F.coalesce(F.col("exec_stats.lines_in"), F.col("n_lines"))
    rows = joined.select(
        "doc_id", "origin", "origin_version",
        F.lit(run_id).alias("run_id"),
        "source", "shard", "status",
        *[column.alias(name) for name, column in measured.items()],
        F.current_timestamp().alias("created_at"),
    )
    metrics = merge_into(spark, workdir, EDIT_STATS, rows)
    stats: dict[str, Any] = {
        "run_id": run_id,
        "origin": origin,
        "origin_version": origin_version,
        **summarize(spark, workdir, origin, origin_version),
        "rows_inserted": metrics["inserted"],
        "rows_updated": metrics["updated"],
    }
    stats["plot"] = write_report_plot(spark, workdir, origin, origin_version, stats["by_status"])
    log.info("stats %s/%s: %s", origin, origin_version, stats["by_status"])
    record_stage_run(
        spark, workdir, run_id, STAGE, started, datetime.now(timezone.utc),
        {"origin": origin, "origin_version": origin_version}, stats,
    )
    return stats
