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
* their ``max_concurrency`` bounds the requests in flight per Spark task;
* response cache: documents are left-joined with ``expert_cache`` on the cache key (computed
  in Spark exactly as ``refinex.experts.cache.cache_key``), every task preloads its hits into
  an ``InMemoryResponseCache``, and the new successful responses are MERGEd (insert-only)
  into ``expert_cache`` before anything else is written: a rerun never pays twice;
* ``tokens_in``/``tokens_out`` of a row are what its refinement cost (read from the cache on a
  hit); ``requests`` counts the HTTP attempts this run made for it.

The consensus expert also fills ``expert_members``: per document and member, the member's
output, its distilled program and whether it voted (the consensus text is what ``distill``
uses). The ``mapInPandas`` output is written once, as Parquet under
``<workdir>/staging/expert``, and every table write reads it back, so no document is sent to
an endpoint twice by the writes. Each run logs an MLflow run (``expert.mlflow_experiment``)
with the expert's secret-free params and the run's metrics (tokens, requests, retries,
failures, cache hits, latency, estimated cost).
"""
from __future__ import annotations

import json
import logging
import math
import re
import shutil
import sys
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Optional, Sequence

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import (
    ArrayType,
    DoubleType,
    IntegerType,
    LongType,
    StringType,
    StructField,
    StructType,
)

from refinex.config import Config, ConfigError
from refinex.experts.cache import CACHE_COLUMNS, CachedResponse, InMemoryResponseCache
from refinex.spark.tables import (
    DOCUMENTS,
    EXPERT_CACHE,
    EXPERT_MEMBERS,
    EXPERT_REFINEMENTS,
    TABLES,
    merge_into,
    new_run_id,
    read_table,
    record_stage_run,
    table_version,
    utf8_encodable,
)

if TYPE_CHECKING:
    from refinex.experts.base import Expert, ExpertInput, ExpertOutput
    from refinex.experts.llm import LLMExpert

log = logging.getLogger(__name__)

STAGE = "expert"
OK = "ok"
FAILED = "failed"
LLM = "llm"
CONSENSUS = "consensus"
STAGING_DIR = "staging/expert"
"""Where the stage's ``mapInPandas`` output is staged, relative to the workdir."""

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
USAGE_FIELDS: tuple[StructField, ...] = (
    StructField("llm_requested", IntegerType()),  # LLM experts that sent requests for the document
    StructField("llm_cache_hits", IntegerType()),
    StructField("llm_failures", IntegerType()),
    StructField("llm_requests", IntegerType()),
    StructField("llm_retries", IntegerType()),
    StructField("llm_chunks", IntegerType()),
    StructField("llm_tokens_in", LongType()),  # spent by this run (0 on a cache hit)
    StructField("llm_tokens_out", LongType()),
    StructField("llm_latency_s", DoubleType()),
    StructField("llm_cost_usd", DoubleType()),
)
"""Per-document LLM usage of this run, summed into the stage statistics and MLflow metrics."""
STAGED_SCHEMA = StructType([
    *REFINED_SCHEMA.fields,
    StructField("members", StringType()),  # JSON list of expert_members rows (consensus)
    StructField("new_cache", StringType()),  # JSON list of new expert_cache rows
    *USAGE_FIELDS,
])
_STAGED_COLUMNS = [f.name for f in STAGED_SCHEMA.fields]
_INT_COLUMNS = [f.name for f in STAGED_SCHEMA.fields if isinstance(f.dataType, (IntegerType, LongType))]
_FLOAT_COLUMNS = [f.name for f in STAGED_SCHEMA.fields if isinstance(f.dataType, DoubleType)]
_STRING_COLUMNS = [f.name for f in STAGED_SCHEMA.fields if isinstance(f.dataType, StringType)]
_MEMBER_SKIP = ("doc_id", "expert", "expert_version", "created_at")
MEMBERS_JSON_TYPE = ArrayType(StructType([f for f in TABLES[EXPERT_MEMBERS].schema.fields if f.name not in _MEMBER_SKIP]))
CACHE_JSON_TYPE = ArrayType(StructType([f for f in TABLES[EXPERT_CACHE].schema.fields if f.name != "created_at"]))
_MAX_ERROR_CHARS = 2000
_SELF = -1  # the position of an LLM expert that is the stage's expert itself (not a member)
_REMOTE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+:")  # dbfs:/, gs://, s3a://, abfss://
_ENDPOINT_FLAGS = "--expert-base-url, --expert-model and --expert-max-concurrency"


def _clean(value: str) -> str:
    """``value`` with anything UTF-8 cannot hold replaced (error messages echo input)."""
    return value.encode("utf-8", "replace").decode("utf-8")


def _error_text(value: Optional[str]) -> Optional[str]:
    return _clean(str(value)[:_MAX_ERROR_CHARS]) if value else None


# -- configuration -----------------------------------------------------------------------------


def configure_expert(
    config: Config,
    name: Optional[str] = None,
    base_url: Optional[str] = None,
    model: Optional[str] = None,
    max_concurrency: Optional[int] = None,
) -> Config:
    """``config`` with a command-line expert choice applied.

    ``name`` replaces ``expert.name`` (the profile's ``expert.options`` are kept only when it
    names the same expert). ``base_url``/``model``/``max_concurrency`` configure the ``llm``
    expert, or the llm member of ``consensus`` (which they enable, adding it if absent).
    """
    ec = config.expert
    chosen = name or ec.name
    options: dict[str, Any] = dict(ec.options) if chosen == ec.name else {}
    endpoint = {
        key: value
        for key, value in (("base_url", base_url), ("model", model), ("max_concurrency", max_concurrency))
        if value is not None
    }
    if endpoint:
        if chosen == LLM:
            options.update(endpoint)
        elif chosen == CONSENSUS:
            options["members"] = _members_with_llm(options, endpoint)
        else:
            raise ConfigError(f"{_ENDPOINT_FLAGS} apply to the llm and consensus experts, not {chosen!r}")
    if chosen == ec.name and options == ec.options:
        return config
    return config.with_overrides({"expert.name": chosen, "expert.options": options})


def _members_with_llm(options: Mapping[str, Any], endpoint: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The consensus members (from ``options`` or the consensus YAML) with the llm member
    enabled and pointed at ``endpoint``."""
    members = options.get("members")
    if members is None:
        import yaml

        from refinex.experts.consensus import DEFAULT_CONFIG_PATH
        from refinex.experts.llm import resolve_conf_path

        path = resolve_conf_path(options.get("config_path", DEFAULT_CONFIG_PATH))
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        members = dict(data.get(CONSENSUS, data) or {}).get("members") or []
    result: list[dict[str, Any]] = []
    found = False
    for member in members:
        spec = {"name": member} if isinstance(member, str) else dict(member)
        if spec.get("name") == LLM:
            found = True
            spec.pop("enabled", None)
            spec["options"] = {**dict(spec.get("options") or {}), **endpoint}
        result.append(spec)
    if not found:
        result.append({"name": LLM, "weight": 1.0, "options": dict(endpoint)})
    return result


def build_expert(name: str, options: Mapping[str, Any]) -> "Expert":
    """The registered expert ``name`` built with ``options``."""
    from refinex.experts import get_expert

    return get_expert(name, **dict(options))


def expert_version(name: str, options: Mapping[str, Any]) -> str:
    """The version string of the configured expert (built once on the driver)."""
    return str(build_expert(name, options).version)


def _is_consensus(expert: Any) -> bool:
    module = sys.modules.get("refinex.experts.consensus")
    return module is not None and isinstance(expert, module.ConsensusExpert)


def llm_experts(expert: Any) -> list[tuple[Optional[int], "LLMExpert"]]:
    """The LLM experts inside ``expert``: ``(None, expert)`` for an LLM expert, ``(i, member)``
    for the LLM members of a consensus (``i`` = the member's position)."""
    module = sys.modules.get("refinex.experts.llm")
    if module is None:
        return []
    if isinstance(expert, module.LLMExpert):
        return [(None, expert)]
    if _is_consensus(expert):
        return [(i, member) for i, (member, _) in enumerate(expert.members) if isinstance(member, module.LLMExpert)]
    return []


def _llm_params(llm: "LLMExpert", prefix: str) -> dict[str, str]:
    params = {}
    for key, value in llm.params().items():
        key = key.replace("expert.api_key_source", "expert.key_source")  # safe_params drops "*api_key*"
        params[prefix + key.removeprefix("expert.")] = value
    return params


def expert_params(expert: Any, name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """MLflow params of the expert: name, version, options and, for LLM experts, their
    ``params()`` (never a secret; ``safe_params`` filters once more when logging)."""
    params: dict[str, Any] = {"expert.name": name, "expert.version": str(expert.version), "expert.options": dict(options)}
    if _is_consensus(expert):
        described = expert.describe()
        params["consensus.threshold"] = described["threshold"]
        params["consensus.min_voters"] = described["min_voters"]
        params["consensus.members"] = ",".join(f"{m['name']}:{m['weight']:g}" for m in described["members"])
    for position, llm in llm_experts(expert):
        params.update(_llm_params(llm, "expert." if position is None else f"member.{llm.name}."))
    return params


# -- executors ---------------------------------------------------------------------------------


class _RecordingCache(InMemoryResponseCache):
    """A task's response cache: the Delta hits preloaded, the expert's new rows recorded."""

    def __init__(self) -> None:
        self._added: dict[str, CachedResponse] = {}
        self._added_lock = threading.Lock()
        super().__init__()

    def preload(self, rows: Sequence[CachedResponse]) -> None:
        """Insert rows read from ``expert_cache`` (not recorded as new)."""
        super().put_many(rows)

    def put_many(self, rows: Sequence[CachedResponse]) -> None:
        super().put_many(rows)
        with self._added_lock:
            for row in rows:
                self._added.setdefault(row.key, row)

    def drain(self) -> dict[str, CachedResponse]:
        """The rows added since the last call, by key."""
        with self._added_lock:
            added, self._added = self._added, {}
        return added


@dataclass(frozen=True)
class _Source:
    """How a task gets its expert: the driver's instance (LLM experts carry the API key the
    driver resolved) or the registry name and options."""

    name: str
    options: Mapping[str, Any]
    instance: Optional[Any] = None

    def build(self) -> "Expert":
        return self.instance if self.instance is not None else build_expert(self.name, self.options)


@dataclass
class _Task:
    """One task's expert, its LLM experts and their caches."""

    expert: Any
    llms: list[tuple[Optional[int], "LLMExpert"]]
    caches: list[_RecordingCache] = field(default_factory=list)

    @property
    def consensus(self) -> bool:
        return _is_consensus(self.expert)


@dataclass
class _Usage:
    """LLM usage of one document in this run (summed over its LLM experts)."""

    requested: int = 0
    cache_hits: int = 0
    failures: int = 0
    requests: int = 0
    retries: int = 0
    chunks: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    latency_s: float = 0.0
    cost_usd: float = 0.0

    def add(self, llm: "LLMExpert", doc: "ExpertInput", out: "ExpertOutput") -> None:
        from refinex.experts.llm import LLMStats, split_for_budget

        if out.requests > 0:
            chunks = len(split_for_budget(doc.text, llm.max_chunk_chars))
            self.requested += 1
            self.chunks += chunks
            self.retries += max(0, out.requests - chunks)
        self.cache_hits += int(out.cached)
        self.failures += int(out.status != OK)
        self.requests += out.requests
        self.tokens_in += out.tokens_in
        self.tokens_out += out.tokens_out
        self.latency_s += out.latency_s
        c = llm.config
        self.cost_usd += LLMStats(
            tokens_in=out.tokens_in, tokens_out=out.tokens_out,
            price_input_per_1m=c.price_input_per_1m, price_output_per_1m=c.price_output_per_1m,
        ).cost_usd

    def columns(self) -> dict[str, Any]:
        return {f"llm_{name}": value for name, value in vars(self).items()}


def _cost_tokens(out: "ExpertOutput", key: str, known: Mapping[str, CachedResponse]) -> tuple[int, int]:
    """What the output's refinement cost: its own tokens, or the cached row's on a hit."""
    row = known.get(key) if out.cached else None
    return (row.tokens_in, row.tokens_out) if row is not None else (out.tokens_in, out.tokens_out)


def _member_rows(
    result: Any, cost: Mapping[int, tuple[int, int]]
) -> list[dict[str, Any]]:
    """``expert_members`` rows (without doc_id/expert) of one consensus result."""
    raw_lines = result.raw.split("\n")
    rows = []
    for position, member in enumerate(result.members):
        detail = member.detail(raw_lines)
        out = member.output
        tokens_in, tokens_out = cost.get(position, (out.tokens_in, out.tokens_out))
        text = out.refined_text
        rows.append({
            "member": detail["name"],
            "member_version": detail["version"],
            "weight": float(detail["weight"]),
            "status": detail["status"],
            "voted": bool(member.voted),
            "error": _error_text(detail["error"]),
            "refined_text": _clean(text) if isinstance(text, str) else None,
            "program": detail["program"],
            "lines_removed": detail["lines_removed"],
            "chars_deleted": detail["chars_deleted"],
            "tokens_in": int(tokens_in),
            "tokens_out": int(tokens_out),
            "requests": int(out.requests),
            "cached": bool(out.cached),
            "latency_s": float(out.latency_s),
        })
    return rows


def _refine_items(task: _Task, items: list[tuple["ExpertInput", list[Optional[str]]]]) -> list[dict[str, Any]]:
    """Refine one batch: documents with their cache hits (JSON per LLM expert) ->
    ``STAGED_SCHEMA`` rows (``expert``/``expert_version`` added by ``_frame``)."""
    from refinex.experts.cache import cache_key, doc_hash

    docs = [doc for doc, _ in items]
    known: list[dict[str, CachedResponse]] = []
    for m, cache in enumerate(task.caches):
        hits = [CachedResponse.from_row(json.loads(h[m])) for _, h in items if h[m] is not None]
        cache.preload(hits)
        known.append({row.key: row for row in hits})
    outputs: list[Any] = []
    results: Optional[list[Any]] = None
    failure: Optional[str] = None
    try:
        if task.consensus:
            results = list(task.expert.refine_batch_with_members(docs))
            outputs = [r.output for r in results]
        else:
            outputs = list(task.expert.refine_batch(docs))
        if len(outputs) != len(docs):
            raise RuntimeError(f"refine_batch returned {len(outputs)} outputs for {len(docs)} documents")
    except Exception as exc:  # noqa: BLE001 - a failed batch is failed rows
        failure = _error_text(f"{type(exc).__name__}: {exc}")
    new = [cache.drain() for cache in task.caches]
    for m in range(len(task.caches)):
        known[m].update(new[m])
    attached: set[tuple[int, str]] = set()
    rows: list[dict[str, Any]] = []
    for d, doc in enumerate(docs):
        keys = [cache_key(llm.config.model, llm.prompt.version, doc_hash(doc.text)) for _, llm in task.llms]
        fresh = []
        for m, key in enumerate(keys):
            answer = new[m].get(key)
            if answer is not None and (m, key) not in attached and utf8_encodable(answer.refined_text):
                attached.add((m, key))
                fresh.append({c: v for c, v in answer.to_row().items() if c != "created_at"})
        row: dict[str, Any] = {"doc_id": doc.doc_id, "new_cache": json.dumps(fresh, ensure_ascii=False) if fresh else None}
        if failure is not None:
            rows.append({**row, "status": FAILED, "error": failure})
            continue
        out = outputs[d]
        usage = _Usage()
        cost: dict[int, tuple[int, int]] = {}
        tokens = (int(out.tokens_in), int(out.tokens_out))
        for m, (position, llm) in enumerate(task.llms):
            llm_out = out if position is None else results[d].members[position].output  # type: ignore[index]
            usage.add(llm, doc, llm_out)
            cost[_SELF if position is None else position] = _cost_tokens(llm_out, keys[m], known[m])
        if task.consensus:
            members = _member_rows(results[d], cost)  # type: ignore[index]
            row["members"] = json.dumps(members, ensure_ascii=False)
            tokens = (sum(r["tokens_in"] for r in members), sum(r["tokens_out"] for r in members))
        elif _SELF in cost:
            tokens = cost[_SELF]
        status = OK if out.status == OK and out.refined_text is not None else FAILED
        error = out.error
        if status == FAILED and not error:
            error = "the expert returned no text"
        if status == OK and not utf8_encodable(out.refined_text):
            status, error = FAILED, "the expert returned text with unpaired surrogates"
        rows.append({
            **row,
            "refined_text": out.refined_text if status == OK else None,
            "status": status,
            "error": _error_text(error),
            "tokens_in": tokens[0],
            "tokens_out": tokens[1],
            "requests": int(out.requests),
            "latency_s": float(out.latency_s),
            **usage.columns(),
        })
    return rows


def _frame(rows: list[dict[str, Any]], name: str, version: str) -> Any:
    import pandas as pd

    frame = pd.DataFrame.from_records(rows, columns=_STAGED_COLUMNS)
    frame["expert"] = name
    frame["expert_version"] = version
    for column in _INT_COLUMNS:
        frame[column] = frame[column].astype("Int64")
    for column in _FLOAT_COLUMNS:
        frame[column] = frame[column].astype("float64")
    for column in _STRING_COLUMNS:  # an all-null column would come out as float NaN
        frame[column] = frame[column].astype(object).where(frame[column].notna(), None)
    return frame


def _refine_partition(
    source: _Source, batch_size: int, hit_columns: Sequence[str]
) -> Callable[[Iterator[Any]], Iterator[Any]]:
    """The ``mapInPandas`` function: documents (+ cache hits) -> ``STAGED_SCHEMA`` rows."""

    def refine(batches: Iterator[Any]) -> Iterator[Any]:
        from refinex.experts.base import ExpertInput

        expert = source.build()
        task = _Task(expert, llm_experts(expert))
        if len(task.llms) != len(hit_columns):
            raise RuntimeError(f"expert {source.name}: {len(task.llms)} LLM experts, {len(hit_columns)} cache columns")
        for _, llm in task.llms:
            cache = _RecordingCache()
            llm.cache = cache
            task.caches.append(cache)
        version = str(expert.version)
        pending: list[tuple[ExpertInput, list[Optional[str]]]] = []
        try:
            for batch in batches:
                columns = [batch["doc_id"], batch["text"], batch["html"], *(batch[c] for c in hit_columns)]
                for doc_id, text, html, *hits in zip(*columns):
                    doc = ExpertInput(doc_id=doc_id, text=text, html=html if isinstance(html, str) else None)
                    pending.append((doc, [h if isinstance(h, str) else None for h in hits]))
                    if len(pending) >= batch_size:
                        yield _frame(_refine_items(task, pending), source.name, version)
                        pending = []
            if pending:
                yield _frame(_refine_items(task, pending), source.name, version)
        finally:
            for _, llm in task.llms:
                llm.close()

    return refine


# -- driver ------------------------------------------------------------------------------------


def cache_key_column(llm: "LLMExpert", text: Column) -> Column:
    """``refinex.experts.cache.cache_key(model, prompt version, doc_hash(text))`` in Spark."""
    return F.sha2(
        F.concat_ws("\x1f", F.lit(llm.config.model), F.lit(llm.prompt.version), F.sha2(text, 256)), 256
    )


def _with_cache_hits(
    spark: SparkSession, workdir: str, todo: DataFrame, llms: Sequence[tuple[Optional[int], "LLMExpert"]]
) -> tuple[DataFrame, list[str]]:
    """``todo`` with one column per LLM expert: its cached row as JSON, or null."""
    if not llms:
        return todo, []
    cache = read_table(spark, workdir, EXPERT_CACHE)
    columns = []
    for i, (_, llm) in enumerate(llms):
        key, hit = f"_key{i}", f"_hit{i}"
        hits = cache.where(
            (F.col("model") == llm.config.model) & (F.col("prompt_version") == llm.prompt.version)
        ).select(F.col("key").alias(key), F.to_json(F.struct(*CACHE_COLUMNS)).alias(hit))
        todo = todo.withColumn(key, cache_key_column(llm, F.col("text"))).join(hits, key, "left").drop(key)
        columns.append(hit)
    return todo, columns


def _staging_path(workdir: str) -> str:
    return f"{workdir.rstrip('/')}/{STAGING_DIR}"


def _drop_staging(workdir: str) -> None:
    """Remove the staged rows of a local workdir (remote ones are overwritten by the next run)."""
    from refinex.spark.session import local_path

    if _REMOTE.match(workdir) and not workdir.startswith("file://"):
        return
    shutil.rmtree(local_path(_staging_path(workdir)), ignore_errors=True)


def _merge_outputs(spark: SparkSession, workdir: str, staged: DataFrame, llm: bool, consensus: bool) -> dict[str, int]:
    """Write the staged rows: ``expert_cache`` first (paid answers), then the refinements and
    the members; returns the rows inserted/updated per table."""
    now = F.current_timestamp()
    counts: dict[str, int] = {"cache_rows_inserted": 0, "member_rows_inserted": 0, "member_rows_updated": 0}
    if llm:
        cache_rows = (
            staged.where(F.col("new_cache").isNotNull())
            .select(F.explode(F.from_json("new_cache", CACHE_JSON_TYPE)).alias("c"))
            .select("c.*")
            .withColumn("created_at", now)
        )
        counts["cache_rows_inserted"] = merge_into(spark, workdir, EXPERT_CACHE, cache_rows)["inserted"]
    refined = staged.select(*[f.name for f in REFINED_SCHEMA.fields]).withColumn("created_at", now)
    metrics = merge_into(spark, workdir, EXPERT_REFINEMENTS, refined)
    counts["rows_inserted"], counts["rows_updated"] = metrics["inserted"], metrics["updated"]
    if consensus:
        members = (
            staged.where(F.col("members").isNotNull())
            .select("doc_id", "expert", "expert_version", F.explode(F.from_json("members", MEMBERS_JSON_TYPE)).alias("m"))
            .select("doc_id", "expert", "expert_version", "m.*")
            .withColumn("created_at", now)
        )
        metrics = merge_into(spark, workdir, EXPERT_MEMBERS, members)
        counts["member_rows_inserted"], counts["member_rows_updated"] = metrics["inserted"], metrics["updated"]
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
    if expert is not None and expert != config.expert.name:
        config = configure_expert(config, expert)
    ec = config.expert
    name = ec.name
    built = build_expert(name, ec.options)
    version = str(built.version)
    llms = llm_experts(built)
    for _, llm in llms:
        llm.resolve_api_key()  # on the driver: executors get the key inside the pickled expert
    consensus = _is_consensus(built)
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
    counts: dict[str, int] = {"rows_inserted": 0, "rows_updated": 0, "cache_rows_inserted": 0,
                              "member_rows_inserted": 0, "member_rows_updated": 0}
    totals: dict[str, Any] = {}
    if n_todo:
        source = _Source(name, dict(ec.options), built if llms else None)
        inputs, hit_columns = _with_cache_hits(spark, workdir, todo, llms)
        partitions = max(1, math.ceil(n_todo / ec.docs_per_partition))
        refined = inputs.repartition(partitions, "doc_id").mapInPandas(
            _refine_partition(source, ec.batch_size, hit_columns), STAGED_SCHEMA
        )
        path = _staging_path(workdir)
        refined.write.mode("overwrite").parquet(path)
        try:
            staged = spark.read.schema(STAGED_SCHEMA).parquet(path)
            row = staged.agg(
                F.count(F.when(F.col("status") == OK, 1)).alias("ok"),
                F.count(F.when(F.col("status") == FAILED, 1)).alias("failed"),
                *[F.sum(f.name).alias(f.name) for f in USAGE_FIELDS],
            ).first()
            totals = row.asDict() if row is not None else {}
            counts.update(_merge_outputs(spark, workdir, staged, bool(llms), consensus))
        finally:
            _drop_staging(workdir)
    metrics = _usage_metrics(totals, n_todo)
    stats: dict[str, Any] = {
        "run_id": run_id,
        "expert": name,
        "expert_version": version,
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
    log.info(
        "expert %s: %d processed (%d ok, %d failed), %d requests, %d cache hits",
        name, n_todo, stats["ok"], stats["failed"], stats["requests"], stats["cache_hits"],
    )
    stats["mlflow_run_id"] = _log_mlflow(config, workdir, built, run_id, force, stats, metrics)
    params = {"expert": name, "expert_version": version, "options": dict(ec.options), "force": force,
              "batch_size": ec.batch_size, "docs_per_partition": ec.docs_per_partition}
    record_stage_run(spark, workdir, run_id, STAGE, started, datetime.now(timezone.utc), params, stats)
    return stats


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
