"""Stage ``expert``: ``documents`` -> ``expert_refinements`` (one row per document x expert).

The expert (``refinex.experts.get_expert(name, **options)``) runs inside ``mapInPandas``,
``expert.batch_size`` documents per ``refine_batch`` call, about
``expert.docs_per_partition`` documents per task. Documents that already have an ``ok``
refinement from the same expert version are skipped (experts can be slow and paid), unless
``force``; failed ones are retried. Failures are rows with ``status = 'failed'`` and the
error, never exceptions.
"""
from __future__ import annotations

import logging
import math
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, Mapping, Optional

from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import DoubleType, IntegerType, LongType, StringType, StructField, StructType

from refinex.config import Config
from refinex.spark.tables import (
    DOCUMENTS,
    EXPERT_REFINEMENTS,
    merge_into,
    new_run_id,
    read_table,
    record_stage_run,
    table_version,
)

log = logging.getLogger(__name__)

STAGE = "expert"
OK = "ok"
FAILED = "failed"

REFINED_SCHEMA = StructType([
    StructField("doc_id", StringType(), False),
    StructField("expert", StringType(), False),
    StructField("expert_version", StringType()),
    StructField("refined_text", StringType()),
    StructField("status", StringType(), False),
    StructField("error", StringType()),
    StructField("tokens_in", LongType()),
    StructField("tokens_out", LongType()),
    StructField("requests", IntegerType()),
    StructField("latency_s", DoubleType()),
])
_COLUMNS = [f.name for f in REFINED_SCHEMA.fields]
_MAX_ERROR_CHARS = 2000


def _utf8_encodable(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _clean(value: str) -> str:
    """``value`` with anything UTF-8 cannot hold replaced (error messages echo input)."""
    return value.encode("utf-8", "replace").decode("utf-8")


def expert_version(name: str, options: Mapping[str, Any]) -> str:
    """The version string of the configured expert (built once on the driver)."""
    from refinex.experts import get_expert

    return str(get_expert(name, **dict(options)).version)


def _refine_partition(
    name: str, options: Mapping[str, Any], batch_size: int
) -> Callable[[Iterator[Any]], Iterator[Any]]:
    """The ``mapInPandas`` function: documents -> ``REFINED_SCHEMA`` rows."""
    options = dict(options)

    def refine(batches: Iterator[Any]) -> Iterator[Any]:
        import pandas as pd

        from refinex.experts import get_expert
        from refinex.experts.base import ExpertInput

        expert = get_expert(name, **options)

        def run(docs: list[ExpertInput]) -> Any:
            rows: list[dict[str, Any]] = []
            try:
                outputs = list(expert.refine_batch(docs))
                if len(outputs) != len(docs):
                    raise RuntimeError(f"refine_batch returned {len(outputs)} outputs for {len(docs)} documents")
            except Exception as exc:  # noqa: BLE001 - a failed batch is failed rows
                error = _clean(f"{type(exc).__name__}: {exc}"[:_MAX_ERROR_CHARS])
                rows = [dict(doc_id=d.doc_id, status=FAILED, error=error) for d in docs]
            else:
                for doc, out in zip(docs, outputs):
                    status = OK if out.status == OK and out.refined_text is not None else FAILED
                    error = out.error
                    if status == FAILED and not error:
                        error = "the expert returned no text"
                    if status == OK and not _utf8_encodable(out.refined_text):
                        status, error = FAILED, "the expert returned text with unpaired surrogates"
                    rows.append(dict(
                        doc_id=doc.doc_id,
                        refined_text=out.refined_text if status == OK else None,
                        status=status,
                        error=_clean(str(error)[:_MAX_ERROR_CHARS]) if error else None,
                        tokens_in=int(out.tokens_in),
                        tokens_out=int(out.tokens_out),
                        requests=int(out.requests),
                        latency_s=float(out.latency_s),
                    ))
            frame = pd.DataFrame.from_records(rows, columns=_COLUMNS)
            frame["expert"] = name
            frame["expert_version"] = str(expert.version)
            for column in ("tokens_in", "tokens_out", "requests"):
                frame[column] = frame[column].astype("Int64")
            frame["latency_s"] = frame["latency_s"].astype("float64")
            return frame

        pending: list[ExpertInput] = []
        for batch in batches:
            for doc_id, text, html in zip(batch["doc_id"], batch["text"], batch["html"]):
                pending.append(ExpertInput(doc_id=doc_id, text=text, html=html if isinstance(html, str) else None))
                if len(pending) >= batch_size:
                    yield run(pending)
                    pending = []
        if pending:
            yield run(pending)

    return refine


def run_expert(
    spark: SparkSession,
    config: Config,
    workdir: str,
    expert: Optional[str] = None,
    force: bool = False,
    run_id: Optional[str] = None,
) -> dict[str, Any]:
    """Refine the documents with the expert into ``expert_refinements``; returns statistics."""
    started = datetime.now(timezone.utc)
    run_id = run_id or new_run_id()
    ec = config.expert
    name = expert or ec.name
    version = expert_version(name, ec.options)
    documents = read_table(spark, workdir, DOCUMENTS).select("doc_id", "text", "html")
    # The refinements as they were before this run: ``todo`` must not change under the merge.
    before = table_version(spark, workdir, EXPERT_REFINEMENTS)
    existing = read_table(spark, workdir, EXPERT_REFINEMENTS, version=before)
    todo = documents
    if not force:
        done = existing.where(
            (F.col("expert") == name) & (F.col("expert_version") == version) & (F.col("status") == OK)
        ).select("doc_id")
        todo = documents.join(done, "doc_id", "left_anti")
    n_documents = documents.count()
    n_todo = todo.count()
    metrics = {"inserted": 0, "updated": 0}
    if n_todo:
        partitions = max(1, math.ceil(n_todo / ec.docs_per_partition))
        refined = (
            todo.repartition(partitions, "doc_id")
            .mapInPandas(_refine_partition(name, ec.options, ec.batch_size), REFINED_SCHEMA)
            .withColumn("created_at", F.current_timestamp())
        )
        metrics = merge_into(spark, workdir, EXPERT_REFINEMENTS, refined)
    outcome = (
        read_table(spark, workdir, EXPERT_REFINEMENTS)
        .where(F.col("expert") == name)
        .join(todo.select("doc_id"), "doc_id", "left_semi")
        .groupBy("status")
        .agg(F.count(F.lit(1)).alias("n"), F.sum("tokens_in").alias("tin"), F.sum("tokens_out").alias("tout"))
        .collect()
    ) if n_todo else []
    by_status = {r["status"]: int(r["n"]) for r in outcome}
    stats: dict[str, Any] = {
        "run_id": run_id,
        "expert": name,
        "expert_version": version,
        "documents": n_documents,
        "skipped_existing": n_documents - n_todo,
        "processed": n_todo,
        "ok": by_status.get(OK, 0),
        "failed": by_status.get(FAILED, 0),
        "tokens_in": sum(int(r["tin"] or 0) for r in outcome),
        "tokens_out": sum(int(r["tout"] or 0) for r in outcome),
        "rows_inserted": metrics["inserted"],
        "rows_updated": metrics["updated"],
    }
    log.info("expert %s: %d processed (%d ok, %d failed)", name, n_todo, stats["ok"], stats["failed"])
    params = {"expert": name, "expert_version": version, "options": dict(ec.options), "force": force,
              "batch_size": ec.batch_size, "docs_per_partition": ec.docs_per_partition}
    record_stage_run(spark, workdir, run_id, STAGE, started, datetime.now(timezone.utc), params, stats)
    return stats
