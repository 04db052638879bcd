"""Stage ``expert``: ``documents`` -> ``expert_refinements`` (+ ``expert_members``, ``expert_cache``).

The expert (``refinex.experts.get_expert(expert.name, **expert.options)``) is built once on
the driver and runs inside ``mapInPandas``, ``expert.batch_size`` documents per
``refine_batch`` call, about ``expert.docs_per_partition`` documents per task. Documents that
already have an ``ok`` refinement from the same expert version are skipped (experts can be
slow and paid) unless ``force``; failed ones are retried. Failures are rows with
``status = 'failed'`` and the last error, never exceptions; ``apply`` turns them into
``expert_failed``.

LLM experts (``llm``, and the LLM members of ``consensus``):

* the API key is resolved on the driver (``LLMExpert.resolve_api_key``: the Databricks secret
  scope, else ``$REFINEX_EXPERT_API_KEY``) and reaches the executors only inside the pickled
  expert - never a DataFrame, a table, ``stage_runs``, a log line or MLflow;
* response cache: documents are left-joined with ``expert_cache`` on the cache key (computed
  in Spark exactly as ``refinex.experts.cache.cache_key``), every task preloads its hits, and
  the new successful responses are MERGEd (insert-only) into ``expert_cache`` before
  anything else is written: a rerun never pays twice.

The consensus expert also fills ``expert_members`` (the consensus text is what ``distill``
uses). The ``mapInPandas`` output is written once, as Parquet under
``<workdir>/staging/expert/<run id>-<random>`` (a folder per run: two runs on one workdir
never read or delete each other's rows), and every table write reads it back, so no
document is sent to an endpoint twice by the writes. Each run logs an MLflow run
(``expert.mlflow_experiment``) with the expert's secret-free params and the run's metrics
(tokens, requests, retries, failures, cache hits, latency, estimated cost).

Layout: this module is the driver side (``refine_with_expert``, ``EXPERT``: cache hits join,
staging, merges, usage metrics, MLflow); ``refinex.spark.expert_config`` chooses, builds and
describes the expert (``--expert*`` flags); ``refinex.spark.expert_worker`` is the executor
side (the ``mapInPandas`` function, its per-task caches and usage, the staged schema). The
names other code imports from here are re-exported.
"""
from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from refinex.config import Config
from refinex.experts.cache import CACHE_COLUMNS
from refinex.spark.expert_config import (
    CONSENSUS,
    EXPERT_PARAMS,
    LLM,
    build_expert,
    configure_expert,
    configure_from_params,
    expert_params,
    expert_version,
    is_consensus,
    llm_experts,
)
from refinex.spark.expert_worker import (
    CACHE_JSON_TYPE,
    FAILED,
    MEMBERS_JSON_TYPE,
    OK,
    REFINED_SCHEMA,
    STAGED_SCHEMA,
    USAGE_FIELDS,
    ExpertSource,
    refine_partition,
)
from refinex.spark.stage import Param, Stage, StageContext
from refinex.spark.staging import STAGING_ROOT, drop_staging, staging_path
from refinex.spark.tables import DOCUMENTS, EXPERT_CACHE, EXPERT_MEMBERS, EXPERT_REFINEMENTS

if TYPE_CHECKING:
    from refinex.experts.llm import LLMExpert

__all__ = [
    "CACHE_JSON_TYPE",
    "CONSENSUS",
    "EXPERT",
    "EXPERT_PARAMS",
    "FAILED",
    "LLM",
    "MEMBERS_JSON_TYPE",
    "OK",
    "REFINED_SCHEMA",
    "STAGE",
    "STAGED_SCHEMA",
    "STAGING_DIR",
    "USAGE_FIELDS",
    "build_expert",
    "cache_key_column",
    "configure_expert",
    "configure_from_params",
    "expert_params",
    "expert_version",
    "llm_experts",
    "refine_with_expert",
]

log = logging.getLogger(__name__)

STAGE = "expert"
STAGING_DIR = f"{STAGING_ROOT}/{STAGE}"
"""Where the stage's ``mapInPandas`` output is staged, relative to the workdir."""


def cache_key_column(llm: "LLMExpert", text: Column) -> Column:
    """``refinex.experts.cache.cache_key(model, prompt version, doc_hash(text))`` in Spark."""
    return F.sha2(
        F.concat_ws("\x1f", F.lit(llm.config.model), F.lit(llm.prompt.version), F.sha2(text, 256)), 256
    )


def _with_cache_hits(
    ctx: StageContext, todo: DataFrame, llms: Sequence[tuple[Optional[int], "LLMExpert"]]
) -> tuple[DataFrame, list[str]]:
    """``todo`` with one column per LLM expert: its cached row as JSON, or null."""
    if not llms:
        return todo, []
    cache = ctx.read(EXPERT_CACHE)
    columns = []
    for i, (_, llm) in enumerate(llms):
        key, hit = f"_key{i}", f"_hit{i}"
        hits = cache.where(
            (F.col("model") == llm.config.model) & (F.col("prompt_version") == llm.prompt.version)
        ).select(F.col("key").alias(key), F.to_json(F.struct(*CACHE_COLUMNS)).alias(hit))
        todo = todo.withColumn(key, cache_key_column(llm, F.col("text"))).join(hits, key, "left").drop(key)
        columns.append(hit)
    return todo, columns


def _merge_outputs(ctx: StageContext, staged: DataFrame, llm: bool, consensus: bool) -> dict[str, int]:
    """Write the staged rows: ``expert_cache`` first (paid answers), then the members, then the
    refinements last: an ``ok`` refinement is what a rerun skips, so a run killed between two
    of these writes leaves nothing that a rerun would not complete. Returns the rows
    inserted/updated per table."""
    now = F.current_timestamp()
    counts: dict[str, int] = {"cache_rows_inserted": 0, "member_rows_inserted": 0, "member_rows_updated": 0}
    if llm:
        cache_rows = (
            staged.where(F.col("new_cache").isNotNull())
            .select(F.explode(F.from_json("new_cache", CACHE_JSON_TYPE)).alias("c"))
            .select("c.*")
            .withColumn("created_at", now)
        )
        counts["cache_rows_inserted"] = ctx.merge(EXPERT_CACHE, cache_rows)["inserted"]
    if consensus:
        members = (
            staged.where(F.col("members").isNotNull())
            .select("doc_id", "expert", "expert_version", F.explode(F.from_json("members", MEMBERS_JSON_TYPE)).alias("m"))
            .select("doc_id", "expert", "expert_version", "m.*")
            .withColumn("created_at", now)
        )
        metrics = ctx.merge(EXPERT_MEMBERS, members)
        counts["member_rows_inserted"], counts["member_rows_updated"] = metrics["inserted"], metrics["updated"]
    refined = staged.select(*[f.name for f in REFINED_SCHEMA.fields]).withColumn("created_at", now)
    metrics = ctx.merge(EXPERT_REFINEMENTS, refined)
    counts["rows_inserted"], counts["rows_updated"] = metrics["inserted"], metrics["updated"]
    return counts


def _usage_metrics(totals: Mapping[str, Any], processed: int) -> dict[str, float]:
    """The run's LLM metrics (``LLMStats.as_metrics`` names; cost summed per expert's prices)."""
    from refinex.experts.llm import LLMStats

    def total(name: str) -> Any:
        return totals.get(f"llm_{name}") or 0

    stats = LLMStats(
        docs=processed, docs_requested=int(total("requested")), cache_hits=int(total("cache_hits")),
        failures=int(total("failures")), chunks=int(total("chunks")), requests=int(total("requests")),
        retries=int(total("retries")), tokens_in=int(total("tokens_in")), tokens_out=int(total("tokens_out")),
        latency_s=float(total("latency_s")),
    )
    metrics = stats.as_metrics(prefix="")
    cost = float(total("cost_usd"))
    metrics["cost_usd"] = cost
    metrics["cost_per_1k_docs"] = 1000.0 * cost / stats.docs_requested if stats.docs_requested else 0.0
    metrics["llm_failures"] = metrics.pop("failures")
    metrics.pop("docs")
    return metrics


class ExpertInputMismatch(ValueError):
    """The chosen expert cannot work on these documents (an HTML expert, no HTML)."""


def check_input_fits_expert(expert: Any, documents: Any, n_documents: int) -> None:
    """Refuse, before any work, an expert that needs page HTML on a corpus without any (plain
    ``id, text``), naming the experts that work on text; warn when only some documents lack
    HTML (those become ``expert_failed``)."""
    from refinex.experts import needs_html

    if not needs_html(expert):
        return
    without = documents.where(F.col("html").isNull() | (F.length(F.trim(F.col("html"))) == 0)).count()
    if without == n_documents:
        raise ExpertInputMismatch(
            f"expert {expert.name} needs the page HTML, but none of the {n_documents} documents has any "
            "(the input has no `html` field). Choose an expert that refines text: --expert llm (an "
            "OpenAI-compatible endpoint: --expert-base-url URL --expert-model NAME), --expert line_rules "
            "(line heuristics, offline), or a consensus whose members include one of them"
        )
    if without:
        log.warning("expert %s needs the page HTML: %d of %d documents have none and will be expert_failed",
                    expert.name, without, n_documents)


def refine_with_expert(ctx: StageContext, force: bool = False) -> dict[str, Any]:
    """Refine the documents with the expert into ``expert_refinements``; returns statistics."""
    spark, config, workdir, run_id = ctx.spark, ctx.config, ctx.workdir, ctx.run_id
    ec = config.expert
    name = ec.name
    built = build_expert(name, ec.options)
    version = str(built.version)
    llms = llm_experts(built)
    for _, llm in llms:
        llm.resolve_api_key()  # on the driver: executors get the key inside the pickled expert
    consensus = is_consensus(built)
    documents = ctx.read(DOCUMENTS).select("doc_id", "text", "html")
    # The refinements as they were before this run: ``todo`` must not change under the merge.
    before = ctx.version(EXPERT_REFINEMENTS)
    existing = ctx.read(EXPERT_REFINEMENTS, version=before)
    todo = documents
    if not force:
        done = existing.where(
            (F.col("expert") == name) & (F.col("expert_version") == version) & (F.col("status") == OK)
        ).select("doc_id")
        todo = documents.join(done, "doc_id", "left_anti")
    n_documents = documents.count()
    n_todo = todo.count()
    if n_todo:
        check_input_fits_expert(built, documents, n_documents)
    counts: dict[str, int] = {"rows_inserted": 0, "rows_updated": 0, "cache_rows_inserted": 0,
                              "member_rows_inserted": 0, "member_rows_updated": 0}
    totals: dict[str, Any] = {}
    if n_todo:
        source = ExpertSource(name, dict(ec.options), built if llms else None)
        inputs, hit_columns = _with_cache_hits(ctx, todo, llms)
        partitions = max(1, math.ceil(n_todo / ec.docs_per_partition))
        refined = inputs.repartition(partitions, "doc_id").mapInPandas(
            refine_partition(source, ec.batch_size, hit_columns), STAGED_SCHEMA
        )
        path = staging_path(workdir, STAGE, run_id)
        try:
            refined.write.mode("overwrite").parquet(path)
            staged = spark.read.schema(STAGED_SCHEMA).parquet(path)
            row = staged.agg(
                F.count(F.when(F.col("status") == OK, 1)).alias("ok"),
                F.count(F.when(F.col("status") == FAILED, 1)).alias("failed"),
                *[F.sum(f.name).alias(f.name) for f in USAGE_FIELDS],
            ).first()
            totals = row.asDict() if row is not None else {}
            counts.update(_merge_outputs(ctx, staged, bool(llms), consensus))
        finally:
            drop_staging(spark, path, STAGE)
    metrics = _usage_metrics(totals, n_todo)
    stats: dict[str, Any] = {
        "expert": name,
        "expert_version": version,
        "origin_version": f"{name}:{version}",
        "documents": n_documents,
        "skipped_existing": n_documents - n_todo,
        "processed": n_todo,
        "ok": int(totals.get("ok") or 0),
        "failed": int(totals.get("failed") or 0),
        "tokens_in": int(metrics["tokens_in"]),
        "tokens_out": int(metrics["tokens_out"]),
        "requests": int(metrics["requests"]),
        "retries": int(metrics["retries"]),
        "cache_hits": int(metrics["cache_hits"]),
        "llm_failures": int(metrics["llm_failures"]),
        "cost_usd": metrics["cost_usd"],
        **counts,
    }
    stats["mlflow_run_id"] = _log_mlflow(config, workdir, built, run_id, force, stats, metrics)
    ctx.record(expert=name, expert_version=version, options=dict(ec.options), force=force,
               batch_size=ec.batch_size, docs_per_partition=ec.docs_per_partition)
    return stats


EXPERT = Stage(
    name=STAGE,
    help="Refine documents with the expert into expert_refinements (LLM answers cached in expert_cache).",
    reads=(DOCUMENTS, EXPERT_REFINEMENTS, EXPERT_CACHE),
    writes=(EXPERT_REFINEMENTS, EXPERT_CACHE, EXPERT_MEMBERS),
    transform=refine_with_expert,
    params=(*EXPERT_PARAMS, Param("force", "Refine again documents that already have an ok refinement.", kind="bool",
                                  default=False)),
    configure=configure_from_params,
    describe=lambda s: (f"{s['expert']}: {s['processed']} processed ({s['ok']} ok, {s['failed']} failed), "
                        f"{s['requests']} requests, {s['cache_hits']} cache hits"),
)


def _log_mlflow(
    config: Config, workdir: str, expert: Any, run_id: str, force: bool,
    stats: Mapping[str, Any], metrics: Mapping[str, float],
) -> Optional[str]:
    """Log the stage run to MLflow; its id, or ``None`` when disabled or MLflow failed (the
    tables are written by then: tracking problems never fail the stage)."""
    ec = config.expert
    if not ec.mlflow:
        return None
    params = {
        **expert_params(expert, ec.name, ec.options),
        "stage.force": force,
        "stage.batch_size": ec.batch_size,
        "stage.docs_per_partition": ec.docs_per_partition,
    }
    all_metrics = {
        **metrics,
        "documents": float(stats["processed"]),
        "documents_total": float(stats["documents"]),
        "skipped_existing": float(stats["skipped_existing"]),
        "ok": float(stats["ok"]),
        "failed": float(stats["failed"]),
    }
    tags = {"refinex.stage": STAGE, "refinex.run_id": run_id, "refinex.expert": ec.name,
            "refinex.expert_version": stats["expert_version"]}
    try:
        from refinex.tracking.expert_runs import log_expert_run

        return log_expert_run(
            params, all_metrics, workdir=workdir, tracking_uri=ec.mlflow_tracking_uri,
            experiment=ec.mlflow_experiment, run_name=f"{STAGE}-{ec.name}-{run_id}", tags=tags,
        )
    except Exception as exc:  # noqa: BLE001 - observability must not undo a paid stage
        log.warning("expert %s: MLflow run not logged (%s: %s)", ec.name, type(exc).__name__, exc)
        return None
