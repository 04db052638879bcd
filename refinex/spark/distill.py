"""Stage ``distill``: ``documents`` x ``expert_refinements`` -> ``programs`` (origin distilled).

Each successful refinement of the chosen expert is distilled against the document's raw
text into a deletion-only program (``refinex.distill.distill_report``) inside
``mapInPandas``. The program's ``origin_version`` is ``"<expert>:<expert_version>"``, so a
new expert version adds programs next to the old ones instead of replacing them.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, Optional

from pyspark.sql import functions as F
from pyspark.sql.types import IntegerType, LongType

from refinex.spark.stage import Param, Stage, StageContext
from refinex.spark.tables import DOCUMENTS, EXPERT_REFINEMENTS, ORIGIN_DISTILLED, PROGRAMS, TABLES

log = logging.getLogger(__name__)

STAGE = "distill"

DISTILLED_SCHEMA = TABLES[PROGRAMS].project(exclude=("origin", "created_at"))
"""What the workers return: the ``programs`` columns less those the driver adds."""
_COLUMNS = [f.name for f in DISTILLED_SCHEMA.fields]
_INT_COLUMNS = [f.name for f in DISTILLED_SCHEMA.fields if isinstance(f.dataType, (IntegerType, LongType))]


def distill_row(doc_id: str, origin_version: str, raw: str, refined: str) -> dict[str, Any]:
    """One ``DISTILLED_SCHEMA`` row: the distilled program of one refinement and its counts.

    Should distillation raise (it is not expected to), the row has no program, which
    ``apply`` reports as ``no_program`` and the stage statistics count as ``failed``.
    """
    from refinex.distill import distill_report

    try:
        report = distill_report(raw, refined)
    except Exception:  # noqa: BLE001 - one pathological document must not stop the job
        log.exception("distillation failed for %s", doc_id)
        return dict(doc_id=doc_id, origin_version=origin_version)
    names = [op.name for op in report.program.ops]
    return dict(
        doc_id=doc_id,
        origin_version=origin_version,
        program=str(report.program),
        n_ops=len(names),
        n_remove_lines=names.count("remove_lines"),
        n_remove_str=names.count("remove_str"),
        n_keep_all=names.count("keep_all"),
        kept_chars=int(report.kept_chars),
        deleted_chars=int(report.deleted_chars),
        inserted_chars=int(report.inserted_chars),
        unrepresentable_ratio=float(report.unrepresentable_ratio),
        exact=bool(report.exact),
    )


def _distill_partition() -> Callable[[Iterator[Any]], Iterator[Any]]:
    """The ``mapInPandas`` function: (doc_id, text, refined_text) -> ``DISTILLED_SCHEMA``."""

    def run(batches: Iterator[Any]) -> Iterator[Any]:
        import pandas as pd

        for batch in batches:
            rows = [
                distill_row(doc_id, version, raw, refined)
                for doc_id, version, raw, refined in zip(
                    batch["doc_id"], batch["origin_version"], batch["text"], batch["refined_text"]
                )
            ]
            frame = pd.DataFrame.from_records(rows, columns=_COLUMNS)
            for column in _INT_COLUMNS:
                frame[column] = frame[column].astype("Int64")
            yield frame

    return run


def distill_programs(ctx: StageContext, expert: Optional[str] = None) -> dict[str, Any]:
    """Distil every ``ok`` refinement of the expert into ``programs``; returns statistics."""
    config = ctx.config
    name = expert or config.expert.name
    refinements = (
        ctx.read(EXPERT_REFINEMENTS)
        .where((F.col("expert") == name) & (F.col("status") == "ok"))
        .select("doc_id", F.concat_ws(":", "expert", "expert_version").alias("origin_version"), "refined_text")
    )
    documents = ctx.read(DOCUMENTS).select("doc_id", "text")
    pairs = documents.join(refinements, "doc_id")
    versions = sorted(r[0] for r in pairs.select("origin_version").distinct().collect())
    if versions:
        distilled = (
            pairs.repartition(config.spark.partitions, "doc_id")
            .mapInPandas(_distill_partition(), DISTILLED_SCHEMA)
            .withColumns({"origin": F.lit(ORIGIN_DISTILLED), "created_at": F.current_timestamp()})
        )
        ctx.merge(PROGRAMS, distilled)
    summary = (
        ctx.read(PROGRAMS)
        .where((F.col("origin") == ORIGIN_DISTILLED) & F.col("origin_version").isin(versions))
        .join(pairs.select("doc_id", "origin_version"), ["doc_id", "origin_version"], "left_semi")
        .agg(
            F.count(F.lit(1)).alias("programs"),
            F.count(F.when(F.col("program").isNull(), 1)).alias("failed"),
            F.count(F.when(F.col("exact"), 1)).alias("exact"),
            F.sum("n_ops").alias("ops"),
            F.avg("unrepresentable_ratio").alias("unrep"),
            F.sum("deleted_chars").alias("deleted"),
            F.sum("kept_chars").alias("kept"),
        )
        .first()
    ) if versions else None
    stats: dict[str, Any] = {
        "expert": name,
        "origin": ORIGIN_DISTILLED,
        "origin_versions": versions,
        "programs": int(summary["programs"]) if summary else 0,
        "exact": int(summary["exact"]) if summary else 0,
        "failed": int(summary["failed"]) if summary else 0,
        "ops": int(summary["ops"] or 0) if summary else 0,
        "mean_unrepresentable_ratio": float(summary["unrep"]) if summary and summary["unrep"] is not None else None,
        "deleted_chars": int(summary["deleted"] or 0) if summary else 0,
        "kept_chars": int(summary["kept"] or 0) if summary else 0,
    }
    ctx.record(expert=name)
    return stats


DISTILL = Stage(
    name=STAGE,
    help="Distil the expert's refinements into deletion-only programs.",
    reads=(DOCUMENTS, EXPERT_REFINEMENTS),
    writes=(PROGRAMS,),
    transform=distill_programs,
    params=(Param("expert", "Expert whose refinements are distilled (default: expert.name of the profile)."),),
    describe=lambda s: f"{s['expert']}: {s['programs']} programs ({s['exact']} exact, {s['failed']} failed)",
)
