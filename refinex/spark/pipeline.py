"""The whole flow: ingest -> expert -> distill -> apply -> stats, under one run id.

Every stage reads its inputs from Delta, writes its output idempotently and records its
``stage_runs`` row, so rerunning the pipeline on the same input leaves every table as it
was (``stage_runs`` gains the rows of the new run).
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any, Optional, Sequence

from pyspark.sql import SparkSession

from refinex.config import Config
from refinex.spark.apply import run_apply
from refinex.spark.distill import run_distill
from refinex.spark.expert import run_expert
from refinex.spark.ingest import run_ingest
from refinex.spark.stats import run_stats
from refinex.spark.tables import TABLES, new_run_id, record_stage_run, table_path

log = logging.getLogger(__name__)

STAGES = ("ingest", "expert", "distill", "apply", "stats")
PIPELINE = "pipeline"
"""``stage_runs.stage`` of the whole run: its params hold the full configuration."""


def run_pipeline(
    spark: SparkSession,
    config: Config,
    workdir: str,
    input_paths: str | Sequence[str],
    limit: Optional[int] = None,
    run_id: Optional[str] = None,
) -> dict[str, Any]:
    """Run every stage; returns ``{"run_id", "workdir", <stage>: stats, ...}``.

    Besides each stage's row, ``stage_runs`` gets a ``pipeline`` row whose params hold the
    input and the whole configuration of the run.
    """
    started = datetime.now(timezone.utc)
    run_id = run_id or new_run_id()
    result: dict[str, Any] = {"run_id": run_id, "workdir": workdir}
    result["ingest"] = run_ingest(spark, config, workdir, input_paths, limit=limit, run_id=run_id)
    result["expert"] = run_expert(spark, config, workdir, run_id=run_id)
    result["distill"] = run_distill(spark, config, workdir, expert=result["expert"]["expert"], run_id=run_id)
    origin_version = f"{result['expert']['expert']}:{result['expert']['expert_version']}"
    origin = "distilled"
    if config.apply.origin_version is not None:
        origin, origin_version = config.apply.origin, config.apply.origin_version
    result["apply"] = run_apply(spark, config, workdir, origin=origin, origin_version=origin_version, run_id=run_id)
    result["stats"] = run_stats(spark, config, workdir, origin=origin, origin_version=origin_version, run_id=run_id)
    paths = [input_paths] if isinstance(input_paths, str) else list(input_paths)
    params = {"input": paths, "limit": limit, "config": config.to_dict()}
    summary = {stage: result[stage] for stage in STAGES}
    record_stage_run(spark, workdir, run_id, PIPELINE, started, datetime.now(timezone.utc), params, summary)
    return result


def format_summary(result: dict[str, Any]) -> str:
    """A short human summary of a pipeline run."""
    ingest, expert, stats = result["ingest"], result["expert"], result["stats"]
    lines = [
        f"run {result['run_id']}",
        f"documents: read {ingest['read']} = accepted {ingest['accepted']} + quarantined {ingest['quarantined']}"
        + (f" (blank lines skipped: {ingest['blank_lines']})" if ingest.get("blank_lines") else ""),
    ]
    if ingest["quarantined_by_reason"]:
        reasons = ", ".join(f"{k} {v}" for k, v in ingest["quarantined_by_reason"].items())
        lines.append(f"  quarantined: {reasons}")
    lines.append(
        f"expert {expert['expert']} ({expert['expert_version']}): {expert['processed']} refined now "
        f"({expert['ok']} ok, {expert['failed']} failed), {expert['skipped_existing']} already done"
    )
    lines.append(f"programs: {stats['origin']} {stats['origin_version']}")
    statuses = ", ".join(f"{k} {v}" for k, v in stats["by_status"].items()) or "none"
    lines.append(f"statuses ({stats['documents']} documents): {statuses}")
    ratio = stats["mean_deletion_ratio"]
    lines.append(
        "mean deletion ratio: " + ("n/a" if ratio is None else f"{ratio:.3f}")
        + f"; chars in {stats['chars_in']:,} -> out {stats['chars_out']:,}"
    )
    lines.append(f"tables: {table_path(result['workdir'], 'documents').rsplit('/', 1)[0]}/<table>")
    lines.append("  " + ", ".join(TABLES))
    return "\n".join(lines)
