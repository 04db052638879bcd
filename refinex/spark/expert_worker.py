"""Executor side of the ``expert`` stage: the ``mapInPandas`` function that refines documents.

``refine_partition`` builds the expert in each Spark task (``ExpertSource``: the driver's
pickled instance for LLM experts, else the registry name and options) and calls its
``refine_batch`` with ``expert.batch_size`` documents at a time; the stage sizes the tasks at
about ``expert.docs_per_partition`` documents. Failures are rows with ``status = 'failed'``
and the last error, never exceptions; ``apply`` turns them into ``expert_failed``.

LLM experts (``llm``, and the LLM members of ``consensus``):

* their ``max_concurrency`` bounds the requests in flight per Spark task;
* response cache: every task preloads its hits (the ``expert_cache`` rows the driver joined
  to the documents, as JSON, one column per LLM expert) into an ``InMemoryResponseCache``
  and records the new successful responses, which travel in the ``new_cache`` column for
  the driver to MERGE into ``expert_cache``;
* ``tokens_in``/``tokens_out`` of a row are what its refinement cost (read from the cache on a
  hit); ``requests`` counts the HTTP attempts this run made for it; the ``llm_*`` columns
  (``USAGE_FIELDS``) are the document's LLM usage in this run.

The consensus expert also fills ``members``: per document and member, the member's output,
its distilled program and whether it voted (rows of ``expert_members``).

The output rows follow ``STAGED_SCHEMA``. This module is what the executors unpickle and
import; it never imports the driver-side stage (``refinex.spark.expert``).
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Optional, Sequence

from pyspark.sql.types import (
    ArrayType,
    DoubleType,
    IntegerType,
    LongType,
    StringType,
    StructField,
    StructType,
)

from refinex.experts.cache import CachedResponse, InMemoryResponseCache
from refinex.spark.expert_config import build_expert, is_consensus, llm_experts
from refinex.spark.tables import EXPERT_CACHE, EXPERT_MEMBERS, EXPERT_REFINEMENTS, TABLES, utf8_encodable

if TYPE_CHECKING:
    from refinex.experts.base import Expert, ExpertInput, ExpertOutput
    from refinex.experts.llm import LLMExpert

OK = "ok"
FAILED = "failed"

REFINED_SCHEMA = TABLES[EXPERT_REFINEMENTS].project(exclude=("created_at",))
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
MEMBERS_JSON_TYPE = ArrayType(TABLES[EXPERT_MEMBERS].project(exclude=_MEMBER_SKIP))
CACHE_JSON_TYPE = ArrayType(TABLES[EXPERT_CACHE].project(exclude=("created_at",)))
_MAX_ERROR_CHARS = 2000
_SELF = -1  # the position of an LLM expert that is the stage's expert itself (not a member)


def _clean(value: str) -> str:
    """``value`` with anything UTF-8 cannot hold replaced (error messages echo input)."""
    return value.encode("utf-8", "replace").decode("utf-8")


def _error_text(value: Optional[str]) -> Optional[str]:
    return _clean(str(value)[:_MAX_ERROR_CHARS]) if value else None



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
class ExpertSource:
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
        return is_consensus(self.expert)


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


def refine_partition(
    source: ExpertSource, batch_size: int, hit_columns: Sequence[str]
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
