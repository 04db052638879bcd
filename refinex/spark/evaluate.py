"""Stage ``evaluate``: one program origin's results, scored -> ``evaluations`` (+ MLflow).

For one ``(origin, origin_version)`` (default: the latest ``apply`` run's) and every
document, the workers compute (``refinex.evaluation.summary.document_counts``):

- snippet and bag-of-words counts of ``refined_text`` against the page's gold (the
  documents' ``metadata.gold``, or a pages file: ``--gold`` / ``evaluate.gold``), and of the
  raw text as the baseline; a missing ``refined_text`` scores as an empty output;
- deleted-character counts of the origin and of the distilled expert (its newest version)
  on the same raw text, for deletion precision/recall/F1 (not for ``distilled`` itself);
- new words and the reliability flags (untouched, emptied, fallback, invalid).

Counts are summed in Spark per scope (``all``, each source, and each ``<source>/<page
type>`` where the documents' metadata has a ``page_type``), with the deletion-ratio
mean and quantiles and the plots' histograms (from ``edit_stats``, the figures ``validate``
and ``report`` show too, where the ``stats`` stage ran for the version; else the same
figures of ``refined_documents.exec_stats``); only those few rows reach the driver,
which turns them into ``evaluations`` rows (``scope_metrics``). Without gold the non-gold
figures are still written (``gold_pages`` 0, score columns null).

The run is recorded in MLflow (experiment ``evaluate.mlflow_experiment``: params, metrics
named like the ``evaluations`` columns, ``<scope>.<metric>`` per source and page type, the plots as
artifacts); for a registry model version (``<registered name>/<N>``) the scope-``all``
figures are also set as ``refinex.eval.<metric>`` tags on that version, which gated
promotion reads. MLflow being unreachable is a warning, never a failure.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import DoubleType, IntegerType, LongType, StringType, StructField, StructType

from refinex.evaluation.summary import COUNT_COLUMNS, METRIC_COLUMNS, scope_metrics
from refinex.locations import is_local, local_path, spark_location
from refinex.spark.apply import ORIGIN_PARAMS
from refinex.spark.origins import newest_program_version, resolve_origin
from refinex.spark.stage import Param, Stage, StageContext
from refinex.spark.tables import (
    DOCUMENTS,
    EDIT_STATS,
    EVALUATIONS,
    ORIGIN_DISTILLED,
    ORIGIN_MODEL,
    PROGRAMS,
    REFINED_DOCUMENTS,
    TABLES,
)
from refinex.status import NO_PROGRAM
from refinex.versions import version_label

log = logging.getLogger(__name__)

STAGE = "evaluate"
SCOPE_ALL = "all"
UNKNOWN_SOURCE = "unknown"
RATIO_BINS = 20
TAG_PREFIX = "refinex.eval."
GOLD_FROM_DOCUMENTS = "documents"

_PASSED_THROUGH = (
    StructField("deletion_ratio", DoubleType()),
    StructField("ops_total", IntegerType()),
    StructField("n_remove_lines", IntegerType()),
    StructField("n_remove_str", IntegerType()),
)
DOCUMENT_SCHEMA = StructType([
    StructField("doc_id", StringType(), False),
    StructField("source", StringType(), False),
    StructField("page_type", StringType()),
    *[StructField(name, LongType(), False) for name in COUNT_COLUMNS],
    StructField("expert_deletion_ratio", DoubleType()),
    *_PASSED_THROUGH,
])
"""One evaluated document: its counts, plus what the plots and quantiles need."""

_MODEL_VERSION = re.compile(r"^(?P<name>[^/@+\[:]+)/(?P<version>[0-9]+)(?=$|[+:\[])")


def registry_version(origin: str, origin_version: str) -> Optional[tuple[str, str]]:
    """``(registered name, version number)`` of a model origin's ``<name>/<N>[suffix]``."""
    if origin != ORIGIN_MODEL:
        return None
    match = _MODEL_VERSION.match(origin_version)
    return (match["name"], match["version"]) if match else None


# --- per document (workers) -------------------------------------------------------------------


def _evaluate_partition(max_error_ratio: float, min_kept_chars: int) -> Callable[[Iterator[Any]], Iterator[Any]]:
    """The ``mapInPandas`` function: one joined row per document -> ``DOCUMENT_SCHEMA``."""

    def run(batches: Iterator[Any]) -> Iterator[Any]:
        import pandas as pd

        from refinex.evaluation.summary import document_counts, parse_gold
        from refinex.program import Guardrails

        guardrails = Guardrails(max_error_ratio=max_error_ratio, min_kept_chars=min_kept_chars)

        def value(x: Any) -> Any:
            return None if x is None or (isinstance(x, float) and x != x) or x is pd.NA else x

        for batch in batches:
            rows = []
            for record in batch.to_dict("records"):
                raw = record["text"]
                parse_errors = value(record["parse_errors"])
                counts = document_counts(
                    raw, value(record["refined_text"]), record["status"],
                    None if parse_errors is None else int(parse_errors),
                    value(record["program"]), value(record["expert_program"]),
                    parse_gold(value(record["gold"])), guardrails,
                )
                expert_ratio = counts["expert_deleted"] / len(raw) if counts["compared"] and raw else None
                rows.append({"doc_id": record["doc_id"], "source": record["source"],
                             "page_type": value(record["page_type"]), **counts,
                             "expert_deletion_ratio": expert_ratio,
                             **{f.name: value(record[f.name]) for f in _PASSED_THROUGH}})
            frame = pd.DataFrame.from_records(rows, columns=DOCUMENT_SCHEMA.fieldNames())
            for name in COUNT_COLUMNS:
                frame[name] = frame[name].astype("int64")
            for field in (DOCUMENT_SCHEMA["expert_deletion_ratio"], *_PASSED_THROUGH):
                frame[field.name] = frame[field.name].astype("Float64" if field.dataType == DoubleType() else "Int64")
            yield frame

    return run


# --- inputs (driver: a plan, nothing collected) -----------------------------------------------


def gold_frame(ctx: StageContext, gold: Optional[str]) -> DataFrame:
    """``doc_id, gold`` (gold as JSON text): a pages file's ``id``/``gold``, else the
    documents' ``metadata.gold``."""
    if gold is None:
        return ctx.read(DOCUMENTS).select("doc_id", F.get_json_object("metadata", "$.gold").alias("gold"))
    if is_local(gold) and not local_path(gold).is_file():
        raise FileNotFoundError(f"gold pages file {gold} does not exist")
    # A string field keeps a JSON object as its JSON text; the html is never materialised.
    pages = ctx.spark.read.schema("id string, gold string").json(spark_location(gold))
    return pages.where(F.col("gold").isNotNull()).select(F.col("id").alias("doc_id"), "gold").dropDuplicates(["doc_id"])


def gold_available(ctx: StageContext, gold: Optional[str] = None) -> bool:
    """Whether there is gold to score against: a pages file (``gold``, else ``evaluate.gold``)
    or at least one document carrying ``metadata.gold`` (the pipeline's test before it runs
    ``evaluate``)."""
    if gold or ctx.config.evaluate.gold:
        return True
    with_gold = ctx.read(DOCUMENTS).where(F.get_json_object("metadata", "$.gold").isNotNull())
    return with_gold.limit(1).count() > 0


def _version(df: DataFrame, origin: str, origin_version: str) -> DataFrame:
    return df.where((F.col("origin") == origin) & (F.col("origin_version") == origin_version))


def document_frame(
    ctx: StageContext, origin: str, origin_version: str, expert_version: Optional[str], gold: Optional[str],
    split: Optional[str] = None,
) -> DataFrame:
    """Every document (of one SFT ``split``, when given) with this version's result and
    program, the expert's program and gold."""
    documents = ctx.read(DOCUMENTS)
    if split is not None:
        from refinex.spark.sft import SPLITS, split_filter

        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        documents = documents.where(split_filter(float(ctx.config.sft.validation_fraction))(F.col("doc_id")) == split)
    documents = documents.select(
        "doc_id", F.coalesce(F.col("source"), F.lit(UNKNOWN_SOURCE)).alias("source"),
        F.get_json_object("metadata", "$.page_type").alias("page_type"), "text"
    )
    refined = _version(ctx.read(REFINED_DOCUMENTS), origin, origin_version).select(
        "doc_id", "refined_text", "status", "exec_stats.parse_errors",
        *[F.col(f"exec_stats.{f.name}").alias(f"exec_{f.name}") for f in _PASSED_THROUGH],
    )
    edit = _version(ctx.read(EDIT_STATS), origin, origin_version).select(
        "doc_id", *[F.col(f.name).alias(f"edit_{f.name}") for f in _PASSED_THROUGH]
    )
    programs = _version(ctx.read(PROGRAMS), origin, origin_version).select("doc_id", "program")
    joined = (documents.join(refined, "doc_id", "left").join(edit, "doc_id", "left")
              .join(programs, "doc_id", "left").join(gold_frame(ctx, gold), "doc_id", "left"))
    if expert_version is not None:
        expert = _version(ctx.read(PROGRAMS), ORIGIN_DISTILLED, expert_version).select(
            "doc_id", F.col("program").alias("expert_program"))
        joined = joined.join(expert, "doc_id", "left")
    else:
        joined = joined.withColumn("expert_program", F.lit(None).cast("string"))
    return joined.select(
        "doc_id", "source", "page_type", "text", "refined_text",
        F.coalesce(F.col("status"), F.lit(NO_PROGRAM)).alias("status"),
        "parse_errors", "program", "expert_program", "gold",
        *[F.coalesce(F.col(f"edit_{f.name}"), F.col(f"exec_{f.name}")).alias(f.name) for f in _PASSED_THROUGH],
    )


# --- aggregation --------------------------------------------------------------------------------


def _ratio_bin(column: str) -> Any:
    return F.least(F.floor(F.col(column) * RATIO_BINS), F.lit(RATIO_BINS - 1)).cast("int")


def _operation_bucket(column: str) -> Any:
    from refinex.evaluation.plots import OPERATION_BUCKETS

    expr = F.lit(None).cast("int")
    for index, (low, high) in reversed(list(enumerate(OPERATION_BUCKETS))):
        expr = F.when(F.col(column).between(low, high), F.lit(index)).otherwise(expr)
    return expr


HISTOGRAMS: tuple[tuple[str, str, int], ...] = (
    ("deletion_ratio", "ratio", RATIO_BINS),
    ("expert_deletion_ratio", "ratio", RATIO_BINS),
    ("ops_total", "operations", 0),
    ("n_remove_lines", "operations", 0),
    ("n_remove_str", "operations", 0),
)
"""(column, binning, bins) of the per-document histograms the plots show (0: one bin per
operation bucket)."""


def _bins(kind: str, n: int) -> int:
    from refinex.evaluation.plots import OPERATION_BUCKETS

    return n if kind == "ratio" else len(OPERATION_BUCKETS)


def scope_totals(per_document: DataFrame) -> dict[str, dict[str, Any]]:
    """Per scope (``all``, each source, and ``<source>/<page type>`` for documents whose
    metadata has a ``page_type``), in one Spark job: the summed counts, the deletion-ratio mean and p50/p90
    (``percentile_approx``) and the histogram bin counts (``<column>_bin_<i>``)."""
    binned = per_document.select(
        "*", *[(_ratio_bin(column) if kind == "ratio" else _operation_bucket(column)).alias(f"{column}_bin")
               for column, kind, _ in HISTOGRAMS])
    by_type = F.when(F.col("page_type").isNotNull(), F.concat_ws("/", "source", "page_type"))
    scoped = (binned.withColumn("scope", F.explode(F.array(F.lit(SCOPE_ALL), F.col("source"), by_type)))
              .where(F.col("scope").isNotNull()))
    bin_counts = [
        F.sum(F.when(F.col(f"{column}_bin") == i, 1).otherwise(0)).alias(f"{column}_bin_{i}")
        for column, kind, n in HISTOGRAMS for i in range(_bins(kind, n))
    ]
    rows = scoped.groupBy("scope").agg(
        *[F.sum(name).alias(name) for name in COUNT_COLUMNS],
        F.avg("deletion_ratio").alias("deletion_ratio_mean"),
        F.percentile_approx("deletion_ratio", [0.5, 0.9]).alias("quantiles"),
        *bin_counts,
    ).collect()
    totals: dict[str, dict[str, Any]] = {}
    for row in rows:
        values = row.asDict()
        q = values.pop("quantiles") or [None, None]
        values["deletion_ratio_p50"], values["deletion_ratio_p90"] = q[0], q[1]
        totals[values.pop("scope")] = values
    return totals


def histograms(totals: Mapping[str, Any]) -> dict[str, Any]:
    """The plots' bin counts from one scope's totals."""
    counts = {column: [int(totals.get(f"{column}_bin_{i}") or 0) for i in range(_bins(kind, n))]
              for column, kind, n in HISTOGRAMS}
    return {
        "deletion_ratio": counts["deletion_ratio"],
        "expert_deletion_ratio": counts["expert_deletion_ratio"],
        "operations": {"all operations": counts["ops_total"], "remove_lines": counts["n_remove_lines"],
                       "remove_str": counts["n_remove_str"]},
    }


# --- outputs ------------------------------------------------------------------------------------


def plot_dir(ctx: StageContext, origin: str, origin_version: str) -> Optional[Path]:
    """``<workdir>/reports/evaluation/<origin>-<label>/`` on the driver (None on object stores)."""
    local = ctx.driver_dir
    if local is None:
        return None
    safe = re.sub(r"[^A-Za-z0-9_.@-]+", "_", f"{origin}-{version_label(origin_version)}")
    return local / "reports" / "evaluation" / safe


def write_plots(
    ctx: StageContext, origin: str, origin_version: str, totals: Mapping[str, Any], rows: list[dict[str, Any]],
) -> list[str]:
    """The three PNGs (deletion ratios, operations per document, scores per source)."""
    folder = plot_dir(ctx, origin, origin_version)
    if folder is None:
        log.info("evaluate: no plots for the remote workdir %s", ctx.workdir)
        return []
    from refinex.evaluation.plots import plot_deletion_ratios, plot_operations, plot_scores_by_source

    bins = histograms(totals)
    compared = int(totals.get("compared") or 0) > 0
    title = f"{origin} {version_label(origin_version)} ({origin_version})"
    return [str(path) for path in (
        plot_deletion_ratios(bins["deletion_ratio"], folder / "deletion_ratio.png", title,
                             bins["expert_deletion_ratio"] if compared else None),
        plot_operations(bins["operations"], folder / "operations.png", title),
        plot_scores_by_source(rows, folder / "scores_by_source.png", title),
    )]


def _metric_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\- /]+", "_", name)


def mlflow_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Scope ``all`` as ``<column>``, every source as ``<source>.<column>`` (null figures left out)."""
    metrics: dict[str, float] = {}
    for row in rows:
        prefix = "" if row["scope"] == SCOPE_ALL else f"{_metric_name(row['scope'])}."
        metrics.update({f"{prefix}{name}": float(row[name]) for name in METRIC_COLUMNS if row[name] is not None})
    return metrics


def tag_value(value: Any) -> str:
    """A figure as tag text: counts as integers (``"0"``), shares and scores as Python's
    shortest round-tripping float (``float(tag)`` gives the ``evaluations`` value back)."""
    return str(int(value)) if isinstance(value, int) and not isinstance(value, bool) else repr(float(value))


def record_in_mlflow(
    ctx: StageContext, origin: str, origin_version: str, rows: list[dict[str, Any]], plots: list[str],
    params: Mapping[str, Any],
) -> dict[str, Any]:
    """Log the evaluation run and tag the model version; ``{}`` (and a warning) when MLflow
    cannot be reached, so that a finished evaluation is never lost to tracking."""
    try:
        return _record_in_mlflow(ctx, origin, origin_version, rows, plots, params)
    except Exception as exc:  # noqa: BLE001 - tracking must never fail a finished evaluation
        log.warning("evaluate: could not record in MLflow: %s", (str(exc).splitlines() or [type(exc).__name__])[0])
        return {}


def _record_in_mlflow(
    ctx: StageContext, origin: str, origin_version: str, rows: list[dict[str, Any]], plots: list[str],
    params: Mapping[str, Any],
) -> dict[str, Any]:
    import time

    from mlflow.entities import Metric
    from mlflow.entities import Param as MlflowParam

    from refinex.spark.train import registry_client, tracking_uri_for
    from refinex.tracking.mlflow_utils import artifact_root, experiment_id_for, safe_params

    config = ctx.config
    uri = tracking_uri_for(config, ctx.workdir)
    client = registry_client(uri, config.model.registry_uri)
    experiment_id = experiment_id_for(client, config.evaluate.mlflow_experiment,
                                      artifact_root(uri, ctx.driver_dir))
    label = version_label(origin_version)
    run = client.create_run(experiment_id, run_name=f"evaluate {origin} {label}",
                            tags={"refinex.stage": STAGE, "refinex.run_id": ctx.run_id, "refinex.origin": origin})
    mlflow_run_id = str(run.info.run_id)
    try:
        now = int(time.time() * 1000)
        logged = safe_params({**params, "origin": origin, "origin_version": origin_version, "version_label": label})
        metrics = mlflow_metrics(rows)
        client.log_batch(mlflow_run_id, params=[MlflowParam(k, v) for k, v in sorted(logged.items())],
                         synchronous=True)
        items = [Metric(k, v, now, 0) for k, v in sorted(metrics.items())]
        for start in range(0, len(items), 1000):
            client.log_batch(mlflow_run_id, metrics=items[start:start + 1000], synchronous=True)
        for plot in plots:
            client.log_artifact(mlflow_run_id, plot, artifact_path="plots")
    except BaseException:
        client.set_terminated(mlflow_run_id, "FAILED")
        raise
    client.set_terminated(mlflow_run_id, "FINISHED")
    recorded: dict[str, Any] = {"mlflow_run_id": mlflow_run_id}
    registered = registry_version(origin, origin_version)
    if registered is not None and registered[0] == config.model.registered_name:
        name, number = registered
        overall = next(row for row in rows if row["scope"] == SCOPE_ALL)
        tags = {f"{TAG_PREFIX}{metric}": tag_value(overall[metric]) for metric in METRIC_COLUMNS
                if overall[metric] is not None}
        tags.update({f"{TAG_PREFIX}run_id": ctx.run_id, f"{TAG_PREFIX}origin_version": origin_version,
                     f"{TAG_PREFIX}mlflow_run_id": mlflow_run_id})
        for key, text in sorted(tags.items()):
            client.set_model_version_tag(name, number, key, text)
        recorded["model_version_tagged"] = f"{name}/{number}"
    return recorded


# --- the stage ----------------------------------------------------------------------------------


def evaluate_outputs(
    ctx: StageContext, origin: Optional[str] = None, origin_version: Optional[str] = None, gold: Optional[str] = None,
    split: Optional[str] = None,
) -> dict[str, Any]:
    """Score one origin version's results into ``evaluations`` (see the module docstring);
    ``split`` scores only the documents of that SFT split (``validation``: the pages no
    model of this workdir trained on); its scopes then cover those documents."""
    config = ctx.config
    origin, origin_version = resolve_origin(ctx.spark, config, ctx.tables, origin, origin_version,
                                            prefer_latest_apply=True)
    if _version(ctx.read(REFINED_DOCUMENTS), origin, origin_version).limit(1).count() == 0:
        raise LookupError(f"no refined_documents of {origin} {origin_version}: run apply for it first")
    gold = gold or config.evaluate.gold
    expert_version = None if origin == ORIGIN_DISTILLED else newest_program_version(
        ctx.spark, ctx.tables, ORIGIN_DISTILLED)
    g = config.guardrails
    per_document = (
        document_frame(ctx, origin, origin_version, expert_version, gold, split)
        .repartition(config.spark.partitions, "doc_id")
        .mapInPandas(_evaluate_partition(float(g.max_error_ratio), int(g.min_kept_chars)), DOCUMENT_SCHEMA)
    )
    totals = scope_totals(per_document)
    model = registry_version(origin, origin_version)
    rows = [
        {"run_id": ctx.run_id, "origin": origin, "origin_version": origin_version, "scope": scope,
         "model_name": model[0] if model else None, "model_version": model[1] if model else None,
         **scope_metrics(values)}
        for scope, values in sorted(totals.items(), key=lambda item: (item[0] != SCOPE_ALL, item[0]))
    ]
    overall = rows[0]
    plots = write_plots(ctx, origin, origin_version, totals[SCOPE_ALL], rows) if config.evaluate.plots else []
    frame = ctx.spark.createDataFrame(
        [tuple(row.get(name) for name in TABLES[EVALUATIONS].columns if name != "created_at") for row in rows],
        TABLES[EVALUATIONS].project(exclude=("created_at",)),
    ).withColumn("created_at", F.current_timestamp())
    ctx.merge(EVALUATIONS, frame)
    gold_source = gold or (GOLD_FROM_DOCUMENTS if overall["gold_pages"] else None)
    if not overall["gold_pages"]:
        log.warning("evaluate: no gold for %s %s (%s): scores are null, the other figures are written",
                    origin, version_label(origin_version),
                    f"no page of {gold} is a document" if gold else "the documents carry none and no --gold")
    recorded = record_in_mlflow(ctx, origin, origin_version, rows, plots,
                                {"gold": gold_source, "expert_version": expert_version, "run_id": ctx.run_id,
                                 "split": split})
    ctx.record(origin=origin, origin_version=origin_version, gold=gold_source, expert_version=expert_version,
               split=split)
    return {
        "origin": origin,
        "origin_version": origin_version,
        "version_label": version_label(origin_version),
        "expert_version": expert_version,
        "gold": gold_source,
        "split": split,
        **{name: overall[name] for name in METRIC_COLUMNS},
        "by_source": {row["scope"]: {name: row[name] for name in METRIC_COLUMNS if row[name] is not None}
                      for row in rows[1:]},
        "plots": plots,
        **recorded,
    }


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def describe(stats: Mapping[str, Any]) -> str:
    """The log line: headline scores next to their raw-text baselines, then one line per
    source and page type."""
    split = f" ({stats['split']} split)" if stats.get("split") else ""
    head = (f"{stats['origin']} {stats['version_label']}: {stats['documents']} documents{split}, "
            f"{stats['gold_pages']} with gold; snippet F1 {_fmt(stats['snippet_f1'])} "
            f"(raw {_fmt(stats['raw_snippet_f1'])}), recall {_fmt(stats['snippet_recall'])} "
            f"(raw {_fmt(stats['raw_snippet_recall'])}); bag-of-words F1 {_fmt(stats['bow_f1'])} "
            f"(raw {_fmt(stats['raw_bow_f1'])}); deletion F1 vs expert {_fmt(stats['deletion_f1'])}; "
            f"new words {stats['new_words']}, invalid {_fmt(stats['invalid_share'])}")
    lines = [head]
    for scope, values in (stats.get("by_source") or {}).items():
        if not values.get("gold_pages"):
            continue
        lines.append(f"  {scope}: {values.get('documents')} documents; snippet F1 {_fmt(values.get('snippet_f1'))} "
                     f"(raw {_fmt(values.get('raw_snippet_f1'))}); bag-of-words F1 {_fmt(values.get('bow_f1'))} "
                     f"(raw {_fmt(values.get('raw_bow_f1'))})")
    return "\n".join(lines)


EVALUATE = Stage(
    name=STAGE,
    help="Score one program origin against gold pages and the distilled expert into evaluations (+ MLflow).",
    reads=(DOCUMENTS, PROGRAMS, REFINED_DOCUMENTS, EDIT_STATS),
    writes=(EVALUATIONS,),
    transform=evaluate_outputs,
    params=(
        *ORIGIN_PARAMS,
        Param("gold", "Pages file (JSON Lines, .gz allowed, with id and gold) to score against "
              "(default: evaluate.gold, else the gold the documents carry)."),
        Param("split", "Only the documents of this SFT split: train or validation (held-out scores)."),
    ),
    describe=describe,
)
