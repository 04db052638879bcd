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
from typing import Any, Optional

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from refinex.spark.apply import ORIGIN_PARAMS
from refinex.spark.origins import resolve_origin
from refinex.spark.stage import Stage, StageContext
from refinex.spark.tables import DOCUMENTS, EDIT_STATS, EXEC_STATS_FIELDS, REFINED_DOCUMENTS, TableResolver, read_table

log = logging.getLogger(__name__)

STAGE = "stats"
HIST_BINS = 20


def write_report_plot(ctx: StageContext, origin: str, origin_version: str, by_status: dict[str, int]) -> Optional[str]:
    """PNG of the deletion-ratio histogram and statuses under ``<workdir>/reports/``.

    The histogram is computed in Spark; only the bin counts reach the driver. Workdirs on
    object stores get no plot (the numbers are in ``edit_stats`` and ``stage_runs``).
    """
    local = ctx.driver_dir
    if local is None:
        log.info("stats: no plot for the remote workdir %s", ctx.workdir)
        return None
    from refinex.evaluation.plots import plot_edit_stats

    rows = ctx.read(EDIT_STATS).where(
        (F.col("origin") == origin) & (F.col("origin_version") == origin_version)
        & F.col("deletion_ratio").isNotNull()
    )
    bins = F.least(F.floor(F.col("deletion_ratio") * HIST_BINS), F.lit(HIST_BINS - 1)).cast("int")
    counts = {int(r["bin"]): int(r["n"]) for r in rows.groupBy(bins.alias("bin")).count().withColumnRenamed("count", "n").collect()}
    hist = [counts.get(i, 0) for i in range(HIST_BINS)]
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{origin}-{origin_version}")[:120]
    out = plot_edit_stats(hist, by_status, local / "reports" / f"edit_stats-{safe}.png", f"{origin} {origin_version}")
    return str(out)


def summarize(spark: SparkSession, tables: "TableResolver | str", origin: str, origin_version: str) -> dict[str, Any]:
    """Documents per status, mean deletion ratio and total characters of one origin's rows."""
    rows = read_table(spark, tables, EDIT_STATS).where(
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


def edit_statistics(
    ctx: StageContext, origin: Optional[str] = None, origin_version: Optional[str] = None
) -> dict[str, Any]:
    """Write ``edit_stats`` for one program origin (default: the latest ``apply`` run's)."""
    spark, run_id = ctx.spark, ctx.run_id
    origin, origin_version = resolve_origin(spark, ctx.config, ctx.tables, origin, origin_version,
                                            prefer_latest_apply=True)
    refined = ctx.read(REFINED_DOCUMENTS).where(
        (F.col("origin") == origin) & (F.col("origin_version") == origin_version)
    )
    documents = ctx.read(DOCUMENTS).select("doc_id", "source", "shard", "n_chars", "n_lines")
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
    ctx.merge(EDIT_STATS, rows)
    stats: dict[str, Any] = {
        "origin": origin,
        "origin_version": origin_version,
        **summarize(spark, ctx.tables, origin, origin_version),
    }
    stats["plot"] = write_report_plot(ctx, origin, origin_version, stats["by_status"])
    ctx.record(origin=origin, origin_version=origin_version)
    return stats


STATS = Stage(
    name=STAGE,
    help="Write edit_stats (one row per document) for one program origin and print the summary.",
    reads=(DOCUMENTS, REFINED_DOCUMENTS),
    writes=(EDIT_STATS,),
    transform=edit_statistics,
    params=ORIGIN_PARAMS,
    describe=lambda s: f"{s['origin']}/{s['origin_version']}: {s['by_status']}",
)
