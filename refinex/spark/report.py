"""Stage ``report``: a static HTML diff report of a seeded sample of documents.

The sample is deterministic: the documents applied under the chosen versions, ordered by
``sha256("<seed>:<doc_id>")``, the first ``sample`` of them; the same seed over the same
documents gives the same report. Only the sampled rows reach the driver. The origins are
every origin with applied documents, each at the version this workdir's runs produced
(``resolve_origin`` per origin: the latest ``apply`` run's), unless ``origin`` /
``origin_version`` name one. The pages are written by ``refinex.report.html`` under
``<workdir>/reports/diff`` (or ``output``, a folder on the driver).
"""
from __future__ import annotations

import hashlib
import logging
from datetime import datetime, timezone
from functools import reduce
from typing import Any, Optional

from pyspark.sql import Column
from pyspark.sql import functions as F

from refinex.locations import driver_path
from refinex.report.html import OriginEdit, OriginVersion, ReportDocument, write_report_files
from refinex.spark.apply import ORIGIN_PARAMS
from refinex.spark.origins import resolve_origin
from refinex.spark.stage import Param, Stage, StageContext
from refinex.spark.tables import DOCUMENTS, EDIT_STATS, EXEC_STATS_FIELDS, PROGRAMS, REFINED_DOCUMENTS

log = logging.getLogger(__name__)

STAGE = "report"
DEFAULT_SAMPLE = 50
REPORT_SUBDIR = ("reports", "diff")
_STAT_FIELDS = [f.name for f in EXEC_STATS_FIELDS if f.name != "rejected_by_reason"]


def sample_key(seed: int, doc_id: str) -> str:
    """The sort key that draws the sample: ``sha256("<seed>:<doc_id>")`` in hex (as Spark's
    ``sha2(concat(...), 256)`` computes it)."""
    return hashlib.sha256(f"{seed}:{doc_id}".encode("utf-8")).hexdigest()


def report_origins(
    ctx: StageContext, origin: Optional[str] = None, origin_version: Optional[str] = None
) -> list[OriginVersion]:
    """The (origin, version) columns: the named one, else each applied origin at its resolved version."""
    if origin is not None or origin_version is not None:
        chosen = resolve_origin(ctx.spark, ctx.config, ctx.tables, origin, origin_version, prefer_latest_apply=True)
        return [OriginVersion(*chosen)]
    applied = sorted(str(r[0]) for r in ctx.read(REFINED_DOCUMENTS).select("origin").distinct().collect())
    if not applied:
        raise ValueError(f"no applied documents in {ctx.tables.describe()}: run apply first")
    return [
        OriginVersion(*resolve_origin(ctx.spark, ctx.config, ctx.tables, name, None, prefer_latest_apply=True))
        for name in applied
    ]


def _of(origins: list[OriginVersion]) -> Column:
    return reduce(lambda a, b: a | b, [
        (F.col("origin") == o.origin) & (F.col("origin_version") == o.origin_version) for o in origins
    ])


def _stats(row: Any) -> dict[str, Any]:
    """Edit statistics of one row: ``edit_stats``' when the stats stage ran, else ``exec_stats``."""
    source = row["edit"] if row["edit"] is not None else row["exec_stats"]
    if source is None:
        return {}
    return {name: source[name] for name in _STAT_FIELDS if source[name] is not None}


def write_report(
    ctx: StageContext,
    sample: int = DEFAULT_SAMPLE,
    seed: int = 0,
    output: Optional[str] = None,
    origin: Optional[str] = None,
    origin_version: Optional[str] = None,
) -> dict[str, Any]:
    """Sample documents, collect their rows and write the report's pages; returns the index
    path and counts."""
    if sample < 1:
        raise ValueError(f"--sample must be at least 1, got {sample}")
    folder = driver_path(output) if output is not None else ctx.driver_dir
    if folder is None:
        where = output if output is not None else ctx.workdir
        raise ValueError(f"report writes files on the driver; {where!r} is on an object store: pass --output")
    if output is None:
        folder = folder.joinpath(*REPORT_SUBDIR)
    origins = report_origins(ctx, origin, origin_version)

    refined = ctx.read(REFINED_DOCUMENTS).where(_of(origins))
    population = refined.select("doc_id").distinct()
    total = population.count()
    key = F.sha2(F.concat(F.lit(f"{seed}:"), F.col("doc_id")), 256)
    ids = [str(r["doc_id"]) for r in population.orderBy(key, "doc_id").limit(sample).collect()]
    chosen = ctx.spark.createDataFrame([(doc_id,) for doc_id in ids], "doc_id string")

    # Every table is cut down to the sampled ids (a broadcast join, no shuffle of the
    # table) before the rows of one document are joined.
    keys = ["doc_id", "origin", "origin_version"]
    sampled = F.broadcast(chosen)
    documents = ctx.read(DOCUMENTS).join(sampled, "doc_id").select("doc_id", "text", "source", "url", "shard")
    programs = ctx.read(PROGRAMS).where(_of(origins)).join(sampled, "doc_id").select(*keys, "program")
    edit_stats = (ctx.read(EDIT_STATS).where(_of(origins)).join(sampled, "doc_id")
                  .select(*keys, F.struct(*_STAT_FIELDS).alias("edit")))
    rows = (
        refined.join(sampled, "doc_id")
        .join(documents, "doc_id")
        .join(programs, keys, "left")
        .join(edit_stats, keys, "left")
        .select(*keys, "text", "source", "url", "shard", "status", "refined_text", "program", "exec_stats", "edit")
        .collect()
    )
    texts: dict[str, Any] = {}
    by_doc: dict[str, dict[OriginVersion, OriginEdit]] = {}
    for row in rows:
        texts[row["doc_id"]] = row
        version = OriginVersion(row["origin"], row["origin_version"])
        by_doc.setdefault(row["doc_id"], {})[version] = OriginEdit(
            version, row["status"], row["program"], row["refined_text"], _stats(row)
        )
    docs = [
        ReportDocument(
            doc_id=doc_id, text=texts[doc_id]["text"], source=texts[doc_id]["source"], url=texts[doc_id]["url"],
            shard=texts[doc_id]["shard"], edits=tuple(by_doc[doc_id][o] for o in origins if o in by_doc[doc_id]),
        )
        for doc_id in sorted(by_doc)  # a sampled id no longer in documents has no row
    ]

    from refinex.program import Guardrails

    g = ctx.config.guardrails
    summary = [
        ("workdir", ctx.workdir),
        ("sample", f"{len(docs):,} of {total:,} applied documents (seed {seed})"),
        ("guardrails", f"max_error_ratio {g.max_error_ratio}, min_kept_chars {g.min_kept_chars}"),
        ("run", f"{ctx.run_id}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"),
    ]
    files = write_report_files(
        folder, docs, origins, summary,
        guardrails=Guardrails(max_error_ratio=float(g.max_error_ratio), min_kept_chars=int(g.min_kept_chars)),
    )
    by_status: dict[str, dict[str, int]] = {}
    for doc in docs:
        for edit in doc.edits:
            counts = by_status.setdefault(edit.origin.origin, {})
            counts[edit.status] = counts.get(edit.status, 0) + 1
    ctx.record(origins={o.origin: o.origin_version for o in origins})
    return {
        "index": str(files.index),
        "output": str(folder),
        "documents": len(docs),
        "applied_documents": total,
        "pages": len(files.pages),
        "removed_stale_pages": files.removed_stale,
        "origins": {o.origin: o.origin_version for o in origins},
        "version_labels": {o.origin: o.label for o in origins},
        "by_status": {name: dict(sorted(counts.items())) for name, counts in sorted(by_status.items())},
    }


REPORT = Stage(
    name=STAGE,
    help="Write a static HTML diff report of a seeded sample of documents (deletions struck through, "
         "every applied origin side by side).",
    reads=(DOCUMENTS, PROGRAMS, REFINED_DOCUMENTS, EDIT_STATS),
    writes=(),
    transform=write_report,
    params=(
        Param("sample", "Documents in the report (a seeded sample).", kind="int", default=DEFAULT_SAMPLE, minimum=1),
        Param("seed", "Seed of the sample (the same seed gives the same documents).", kind="int", default=0),
        Param("output", "Folder of the report (default <workdir>/reports/diff).", short="-o"),
        *ORIGIN_PARAMS,
    ),
    describe=lambda s: (f"{s['documents']} documents, "
                        f"{', '.join(f'{k} {v}' for k, v in s['version_labels'].items())}: {s['index']}"),
)
