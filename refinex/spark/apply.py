"""Stage ``apply``: ``documents`` LEFT JOIN ``programs`` -> ``refined_documents``; and export.

Every document gets exactly one row per ``(origin, origin_version)``. With a program, it
is executed (``refinex.program.execute``) under the configured guardrails and the status is
the execution's (``refined``, ``unchanged``, ``dropped`` with text ``""``, ``fallback_raw``).
Without one, ``refined_text`` is null and the status is ``expert_failed`` when the expert
failed on the document, else ``no_program``. The execution's counts travel to the
``stats`` stage in the ``exec_stats`` struct column.
"""
from __future__ import annotations

import gzip
import io
import json
import logging
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Optional

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import DoubleType, IntegerType, LongType, StringType, StructField, StructType

from refinex.locations import driver_path
from refinex.status import NO_PROGRAM
from refinex.versions import version_label
from refinex.spark.origins import resolve_origin
from refinex.spark.stage import Param, Stage, StageContext
from refinex.spark.tables import (
    DOCUMENTS,
    EXEC_STATS_FIELDS,
    EXPERT_REFINEMENTS,
    ORIGIN_DISTILLED,
    PROGRAMS,
    REFINED_DOCUMENTS,
    TableResolver,
    read_table,
)

log = logging.getLogger(__name__)

STAGE = "apply"

_COUNT_FIELDS = [f for f in EXEC_STATS_FIELDS if f.name not in ("rejected_by_reason", "deletion_ratio")]
APPLIED_SCHEMA = StructType([
    StructField("doc_id", StringType(), False),
    StructField("refined_text", StringType()),
    StructField("status", StringType(), False),
    *[StructField(f.name, LongType() if isinstance(f.dataType, LongType) else IntegerType()) for f in _COUNT_FIELDS],
    StructField("deletion_ratio", DoubleType()),
    StructField("rejected_json", StringType()),
])
_COLUMNS = [f.name for f in APPLIED_SCHEMA.fields]


def _apply_partition(max_error_ratio: float, min_kept_chars: int) -> Callable[[Iterator[Any]], Iterator[Any]]:
    """The ``mapInPandas`` function: (doc_id, text, program, expert_status) -> ``APPLIED_SCHEMA``."""

    def run(batches: Iterator[Any]) -> Iterator[Any]:
        import pandas as pd

        from refinex.program import Guardrails, execute, parse
        from refinex.status import EXPERT_FAILED, NO_PROGRAM

        guardrails = Guardrails(max_error_ratio=max_error_ratio, min_kept_chars=min_kept_chars)
        for batch in batches:
            rows: list[dict[str, Any]] = []
            for doc_id, text, program, expert_status in zip(
                batch["doc_id"], batch["text"], batch["program"], batch["expert_status"]
            ):
                if not isinstance(program, str):
                    status = EXPERT_FAILED if expert_status == "failed" else NO_PROGRAM
                    rows.append({"doc_id": doc_id, "refined_text": None, "status": status})
                    continue
                result = execute(parse(program), text, guardrails)
                rows.append({
                    "doc_id": doc_id,
                    "refined_text": result.text,
                    "status": result.status,
                    "chars_in": result.chars_in,
                    "chars_out": result.chars_out,
                    "chars_removed": result.chars_removed,
                    "lines_in": result.lines_in,
                    "lines_out": result.lines_out,
                    "lines_removed": result.lines_removed,
                    "ops_total": result.ops_total,
                    "ops_applied": result.ops_applied,
                    "ops_rejected": len(result.ops_rejected),
                    "n_remove_lines": result.n_remove_lines,
                    "n_remove_str": result.n_remove_str,
                    "n_keep_all": result.n_keep_all,
                    "parse_errors": result.parse_errors,
                    "deletion_ratio": float(result.deletion_ratio),
                    "rejected_json": json.dumps(result.rejected_by_reason(), sort_keys=True),
                })
            frame = pd.DataFrame.from_records(rows, columns=_COLUMNS)
            for field in _COUNT_FIELDS:
                frame[field.name] = frame[field.name].astype("Int64")
            frame["deletion_ratio"] = frame["deletion_ratio"].astype("float64")
            # In a batch without any program these are all missing: None, not pandas' float NaN.
            for column in ("refined_text", "rejected_json"):
                frame[column] = frame[column].astype(object).where(frame[column].notna(), None)
            yield frame

    return run


def _exec_stats_column() -> Any:
    """The ``exec_stats`` struct built from the flat columns (null without a program)."""
    rejected = F.from_json("rejected_json", "map<string,int>")
    fields = [
        rejected.alias(f.name) if f.name == "rejected_by_reason" else F.col(f.name).cast(f.dataType).alias(f.name)
        for f in EXEC_STATS_FIELDS
    ]
    return F.when(F.col("ops_total").isNull(), F.lit(None)).otherwise(F.struct(*fields))


def apply_programs(
    ctx: StageContext, origin: Optional[str] = None, origin_version: Optional[str] = None
) -> dict[str, Any]:
    """Execute the chosen programs over every document into ``refined_documents``."""
    spark, config, tables, run_id = ctx.spark, ctx.config, ctx.tables, ctx.run_id
    origin, origin_version = resolve_origin(spark, config, tables, origin, origin_version)
    documents = read_table(spark, tables, DOCUMENTS).select("doc_id", "text")
    programs = (
        read_table(spark, tables, PROGRAMS)
        .where((F.col("origin") == origin) & (F.col("origin_version") == origin_version))
        .select("doc_id", "program")
    )
    joined = documents.join(programs, "doc_id", "left")
    if origin == ORIGIN_DISTILLED:
        expert = origin_version.split(":", 1)[0]
        failures = (
            read_table(spark, tables, EXPERT_REFINEMENTS)
            .where(F.col("expert") == expert)
            .select("doc_id", F.col("status").alias("expert_status"))
        )
        joined = joined.join(failures, "doc_id", "left")
    else:
        joined = joined.withColumn("expert_status", F.lit(None).cast("string"))
    g = config.guardrails
    applied = (
        joined.repartition(config.spark.partitions, "doc_id")
        .mapInPandas(_apply_partition(float(g.max_error_ratio), int(g.min_kept_chars)), APPLIED_SCHEMA)
        .select(
            "doc_id",
            F.lit(origin).alias("origin"),
            F.lit(origin_version).alias("origin_version"),
            F.lit(run_id).alias("run_id"),
            "refined_text",
            "status",
            _exec_stats_column().alias("exec_stats"),
            F.current_timestamp().alias("created_at"),
        )
    )
    ctx.merge(REFINED_DOCUMENTS, applied)
    by_status = {
        r["status"]: int(r["n"])
        for r in read_table(spark, tables, REFINED_DOCUMENTS)
        .where((F.col("origin") == origin) & (F.col("origin_version") == origin_version))
        .groupBy("status")
        .agg(F.count(F.lit(1)).alias("n"))
        .collect()
    }
    stats: dict[str, Any] = {
        "origin": origin,
        "origin_version": origin_version,
        "documents": sum(by_status.values()),
        "by_status": dict(sorted(by_status.items())),
    }
    ctx.record(origin=origin, origin_version=origin_version,
               guardrails={"max_error_ratio": g.max_error_ratio, "min_kept_chars": g.min_kept_chars})
    return stats


def export_frame(spark: SparkSession, tables: "TableResolver | str", origin: str, origin_version: str) -> DataFrame:
    """One row per document: doc_id, text, refined_text, status (``no_program`` for a
    document this version never reached: every row has a status)."""
    refined = (
        read_table(spark, tables, REFINED_DOCUMENTS)
        .where((F.col("origin") == origin) & (F.col("origin_version") == origin_version))
        .select("doc_id", "refined_text", "status")
    )
    documents = read_table(spark, tables, DOCUMENTS).select("doc_id", "text")
    return documents.join(refined, "doc_id", "left").select(
        "doc_id", "text", "refined_text", F.coalesce(F.col("status"), F.lit(NO_PROGRAM)).alias("status")
    )


def _open_output(path: Path) -> IO[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "wb"), encoding="utf-8", newline="\n")
    return path.open("w", encoding="utf-8", newline="\n")


def export_documents(
    ctx: StageContext, output: str, origin: Optional[str] = None, origin_version: Optional[str] = None
) -> dict[str, Any]:
    """Write one JSON line per document (sorted by doc_id) to ``output`` (``.gz`` compresses).

    The default origin is that of the most recent ``apply`` run. ``output`` is a file on the
    driver (``dbfs:/Volumes/…`` through its FUSE path).
    """
    spark = ctx.spark
    origin, origin_version = resolve_origin(spark, ctx.config, ctx.tables, origin, origin_version,
                                            prefer_latest_apply=True)
    frame = export_frame(spark, ctx.tables, origin, origin_version).orderBy("doc_id")
    local = driver_path(output)
    if local is None:
        raise ValueError(f"export writes a file on the driver; {output!r} is on an object store")
    path = local
    tmp = path.with_name(f".{path.name}.tmp")
    counts: dict[str, int] = {}
    n = 0
    with _open_output(tmp) as handle:
        for row in frame.toLocalIterator(prefetchPartitions=True):
            record = {key: row[key] for key in ("doc_id", "text", "refined_text", "status")}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            key = row["status"]
            counts[key] = counts.get(key, 0) + 1
            n += 1
    tmp.replace(path)
    ctx.record(origin=origin, origin_version=origin_version)
    return {"output": str(path), "origin": origin, "origin_version": origin_version,
            "version_label": version_label(origin_version), "documents": n,
            "by_status": dict(sorted(counts.items()))}


ORIGIN_PARAMS = (
    Param("origin", "Program origin: distilled or model."),
    Param("origin_version", "Program version: the full string or its label, e.g. trafilatura@4f778c "
          "(default: the latest this workdir's runs produced)."),
)

APPLY = Stage(
    name=STAGE,
    help="Execute programs over every document into refined_documents (guardrails from the profile).",
    reads=(DOCUMENTS, PROGRAMS, EXPERT_REFINEMENTS),
    writes=(REFINED_DOCUMENTS,),
    transform=apply_programs,
    params=ORIGIN_PARAMS,
    describe=lambda s: f"{s['origin']}/{s['origin_version']}: {s['by_status']}",
)

EXPORT = Stage(
    name="export",
    help="Write one JSON line per document: doc_id, text, refined_text, status (default origin: the latest apply).",
    reads=(DOCUMENTS, REFINED_DOCUMENTS),
    writes=(),
    transform=export_documents,
    params=(Param("output", "Output JSONL file (.gz compresses).", required=True, short="-o"), *ORIGIN_PARAMS),
    describe=lambda s: f"{s['documents']} documents to {s['output']}",
)
