"""Delta tables: names, explicit schemas, paths and idempotent writers.

Every table has a key and lives where :class:`TableResolver` says: ``<workdir>/delta/<name>``
(path tables, registered locally as ``refinex.<name>``) or ``catalog.schema.name``. Writers MERGE on the key:
new keys are inserted, existing keys are updated only when a *content* column changed
(timestamps and run ids are bookkeeping, not content), so rerunning a stage on the same
input leaves the table exactly as it was. The source is deduplicated on the key first.

Concurrent writers (two runs on one workdir) are safe: a table is created by exactly one of
them (the others find it made), a MERGE that loses Delta's optimistic-concurrency check is
run again on the new snapshot (it is idempotent), and the fast first write into a table this
process created is an overwrite that Delta checks against every other commit.
"""
from __future__ import annotations

import json
import logging
import random
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping, Optional, Sequence

from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.types import (
    ArrayType,
    BooleanType,
    DataType,
    DoubleType,
    IntegerType,
    LongType,
    MapType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from refinex.errors import TableWriteConflict, one_line
from refinex.experts.cache import CACHE_ROW_SCHEMA
from refinex.locations import join, spark_location

log = logging.getLogger(__name__)

DOCUMENTS = "documents"
QUARANTINE = "quarantine"
EXPERT_REFINEMENTS = "expert_refinements"
EXPERT_MEMBERS = "expert_members"
EXPERT_CACHE = "expert_cache"
PROGRAMS = "programs"
REFINED_DOCUMENTS = "refined_documents"
EDIT_STATS = "edit_stats"
STAGE_RUNS = "stage_runs"
SFT_PAIRS = "sft_pairs"
MODEL_OUTPUTS = "model_outputs"
GATE_FAILURES = "gate_failures"
EVALUATIONS = "evaluations"

_CACHE_TYPES: dict[str, DataType] = {"string": StringType(), "bigint": LongType(), "timestamp": TimestampType()}

ORIGIN_DISTILLED = "distilled"
ORIGIN_MODEL = "model"


def _f(name: str, dtype: DataType, nullable: bool = True) -> StructField:
    return StructField(name, dtype, nullable)


S, I, L, D, B, T = StringType(), IntegerType(), LongType(), DoubleType(), BooleanType(), TimestampType()

EXEC_STATS_FIELDS: tuple[StructField, ...] = (
    _f("chars_in", L),
    _f("chars_out", L),
    _f("chars_removed", L),
    _f("lines_in", I),
    _f("lines_out", I),
    _f("lines_removed", I),
    _f("ops_total", I),
    _f("ops_applied", I),
    _f("ops_rejected", I),
    _f("n_remove_lines", I),
    _f("n_remove_str", I),
    _f("n_keep_all", I),
    _f("parse_errors", I),
    _f("rejected_by_reason", MapType(S, I)),
    _f("deletion_ratio", D),
)
"""What one program execution measured (``refinex.program.Result``); null without a program."""

EXEC_STATS_TYPE = StructType(list(EXEC_STATS_FIELDS))


@dataclass(frozen=True)
class TableSpec:
    """A table: its schema, key, partitioning and bookkeeping (non-content) columns."""

    name: str
    schema: StructType
    keys: tuple[str, ...]
    partition_by: tuple[str, ...] = ()
    bookkeeping: tuple[str, ...] = ()

    @property
    def columns(self) -> list[str]:
        return [f.name for f in self.schema.fields]

    def project(
        self, include: Optional[Sequence[str]] = None, exclude: Sequence[str] = (), nullable: Optional[bool] = None
    ) -> StructType:
        """A schema derived from this table's (worker-side schemas are never restated):
        the ``include`` columns in that order (default: all), less ``exclude``; with
        ``nullable`` set, every field takes it."""
        by_name = {f.name: f for f in self.schema.fields}
        names = list(include) if include is not None else self.columns
        missing = [n for n in names if n not in by_name]
        if missing:
            raise KeyError(f"{self.name} has no column(s) {missing}")
        chosen = [by_name[n] for n in names if n not in exclude]
        if nullable is not None:
            chosen = [StructField(f.name, f.dataType, nullable) for f in chosen]
        return StructType(chosen)

    @property
    def content_columns(self) -> list[str]:
        skip = set(self.keys) | set(self.bookkeeping)
        return [c for c in self.columns if c not in skip]


TABLES: dict[str, TableSpec] = {
    DOCUMENTS: TableSpec(
        DOCUMENTS,
        StructType([
            _f("doc_id", S, False), _f("source", S), _f("url", S), _f("text", S, False), _f("html", S),
            _f("metadata", S), _f("shard", I, False), _f("input_file", S), _f("line_no", L),
            _f("n_chars", L), _f("n_lines", I), _f("ingested_at", T),
        ]),
        keys=("doc_id",), partition_by=("shard",), bookkeeping=("ingested_at",),
    ),
    QUARANTINE: TableSpec(
        QUARANTINE,
        StructType([
            _f("input_file", S, False), _f("line_no", L, False), _f("doc_id", S), _f("record", S),
            _f("reason", S, False), _f("detail", S), _f("stage", S, False), _f("quarantined_at", T),
        ]),
        keys=("input_file", "line_no", "stage", "reason"), bookkeeping=("quarantined_at",),
    ),
    EXPERT_REFINEMENTS: TableSpec(
        EXPERT_REFINEMENTS,
        StructType([
            _f("doc_id", S, False), _f("expert", S, False), _f("expert_version", S), _f("refined_text", S),
            _f("status", S, False), _f("error", S), _f("tokens_in", L), _f("tokens_out", L),
            _f("requests", I), _f("latency_s", D), _f("created_at", T),
        ]),
        keys=("doc_id", "expert"), bookkeeping=("latency_s", "created_at"),
    ),
    # One row per document x combining expert (consensus) x member: each member's output, its
    # distilled program and whether it voted, for audit (refinex.spark.expert).
    EXPERT_MEMBERS: TableSpec(
        EXPERT_MEMBERS,
        StructType([
            _f("doc_id", S, False), _f("expert", S, False), _f("member", S, False), _f("expert_version", S),
            _f("member_version", S), _f("weight", D), _f("status", S, False), _f("voted", B), _f("error", S),
            _f("refined_text", S), _f("program", S), _f("lines_removed", I), _f("chars_deleted", L),
            _f("tokens_in", L), _f("tokens_out", L), _f("requests", I), _f("cached", B), _f("latency_s", D),
            _f("created_at", T),
        ]),
        keys=("doc_id", "expert", "member"), bookkeeping=("requests", "cached", "latency_s", "created_at"),
    ),
    # The LLM response cache (refinex.experts.cache.CACHE_ROW_SCHEMA). Insert-only: every
    # column but the key is bookkeeping, so a key keeps its first row like every ResponseCache.
    EXPERT_CACHE: TableSpec(
        EXPERT_CACHE,
        StructType([_f(name, _CACHE_TYPES[sql_type], name != "key") for name, sql_type in CACHE_ROW_SCHEMA]),
        keys=("key",), bookkeeping=tuple(name for name, _ in CACHE_ROW_SCHEMA if name != "key"),
    ),
    PROGRAMS: TableSpec(
        PROGRAMS,
        StructType([
            _f("doc_id", S, False), _f("origin", S, False), _f("origin_version", S, False), _f("program", S),
            _f("n_ops", I), _f("n_remove_lines", I), _f("n_remove_str", I), _f("n_keep_all", I),
            _f("kept_chars", L), _f("deleted_chars", L), _f("inserted_chars", L),
            _f("unrepresentable_ratio", D), _f("exact", B), _f("created_at", T),
        ]),
        keys=("doc_id", "origin", "origin_version"), bookkeeping=("created_at",),
    ),
    REFINED_DOCUMENTS: TableSpec(
        REFINED_DOCUMENTS,
        StructType([
            _f("doc_id", S, False), _f("origin", S, False), _f("origin_version", S, False), _f("run_id", S),
            _f("refined_text", S), _f("status", S, False), _f("exec_stats", EXEC_STATS_TYPE),
            _f("created_at", T),
        ]),
        keys=("doc_id", "origin", "origin_version"), bookkeeping=("run_id", "created_at"),
    ),
    EDIT_STATS: TableSpec(
        EDIT_STATS,
        StructType([
            _f("doc_id", S, False), _f("origin", S, False), _f("origin_version", S, False), _f("run_id", S),
            _f("source", S), _f("shard", I), _f("status", S, False),
            *EXEC_STATS_FIELDS, _f("created_at", T),
        ]),
        keys=("doc_id", "origin", "origin_version"), bookkeeping=("run_id", "created_at"),
    ),
    SFT_PAIRS: TableSpec(
        SFT_PAIRS,
        StructType([
            _f("doc_id", S, False), _f("chunk_idx", I, False), _f("split", S, False), _f("prompt", S, False),
            _f("target", S, False), _f("start_line", I, False), _f("end_line", I, False),
            _f("n_prompt_tokens", I), _f("truncated_lines", ArrayType(I)), _f("n_chunks", I),
            _f("origin_version", S, False), _f("base_tokenizer", S, False), _f("prompt_version", S),
            _f("created_at", T),
        ]),
        keys=("doc_id", "chunk_idx"), bookkeeping=("created_at",),
    ),
    MODEL_OUTPUTS: TableSpec(
        MODEL_OUTPUTS,
        StructType([
            _f("doc_id", S, False), _f("origin_version", S, False), _f("run_id", S), _f("backend", S),
            _f("constrained", B), _f("n_chunks", I), _f("outputs", ArrayType(S)), _f("parse_errors", I),
            _f("ops_out_of_chunk", I), _f("invalid_chunks", I), _f("created_at", T),
        ]),
        keys=("doc_id", "origin_version"), bookkeeping=("run_id", "created_at"),
    ),
    # One row per offending row of a failed (or warning) expectation of `refinex validate`
    # (doc_id null for whole-table expectations such as the row count or a status share).
    GATE_FAILURES: TableSpec(
        GATE_FAILURES,
        StructType([
            _f("run_id", S, False), _f("table_name", S, False), _f("origin", S, False),
            _f("origin_version", S, False), _f("expectation", S, False), _f("doc_id", S),
            _f("severity", S, False), _f("observed", S), _f("threshold", S), _f("created_at", T),
        ]),
        keys=("run_id", "table_name", "origin", "origin_version", "expectation", "doc_id"),
        bookkeeping=("created_at",),
    ),
    # One row per `refinex evaluate` run x origin version x scope ("all" or one source).
    EVALUATIONS: TableSpec(
        EVALUATIONS,
        StructType([
            _f("run_id", S, False), _f("origin", S, False), _f("origin_version", S, False),
            _f("scope", S, False), _f("model_name", S), _f("model_version", S), _f("documents", L),
            _f("gold_pages", L), _f("snippet_precision", D), _f("snippet_recall", D), _f("snippet_f1", D),
            _f("snippet_accuracy", D), _f("bow_pages", L), _f("bow_precision", D), _f("bow_recall", D),
            _f("bow_f1", D), _f("raw_snippet_recall", D), _f("raw_snippet_f1", D), _f("raw_bow_f1", D),
            _f("deletion_precision", D), _f("deletion_recall", D), _f("deletion_f1", D),
            _f("new_words", L), _f("untouched_share", D), _f("emptied_share", D), _f("fallback_share", D),
            _f("invalid_share", D), _f("deletion_ratio_mean", D), _f("deletion_ratio_p50", D),
            _f("deletion_ratio_p90", D), _f("created_at", T),
        ]),
        keys=("run_id", "origin", "origin_version", "scope"), bookkeeping=("created_at",),
    ),
    STAGE_RUNS: TableSpec(
        STAGE_RUNS,
        StructType([
            _f("run_id", S, False), _f("stage", S, False), _f("started_at", T), _f("ended_at", T),
            _f("params", S), _f("stats", S),
        ]),
        # One row per attempt: a task retried under the same run id adds a row (appended,
        # never merged: the start time makes it new).
        keys=("run_id", "stage", "started_at"),
    ),
}


def utf8_encodable(value: str) -> bool:
    """False for strings with lone surrogates (JSON ``\\udXXX`` escapes): UTF-8, Arrow and
    Delta cannot hold them, so rows carrying them are quarantined or cleaned first."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class TableResolver:
    """Where each table lives: one resolver serves every stage.

    - **Path tables** (``catalog`` unset): ``<workdir>/delta/<name>`` for local, ``gs://``,
      ``s3a://``, ``abfss://`` and ``dbfs:/Volumes/…`` workdirs. With ``register`` each one
      is also registered in the session catalog as ``<schema>.<name>`` (an external table
      over that path), so ``SELECT … FROM refinex.edit_stats`` works after any run.
    - **Catalog tables** (``catalog`` set): ``<catalog>.<schema>.<name>`` on Unity Catalog
      (or any catalog Spark can create Delta tables in), managed by the metastore.
    """

    workdir: Optional[str] = None
    catalog: Optional[str] = None
    schema: str = "refinex"
    register: bool = True

    def __post_init__(self) -> None:
        if self.catalog is None and not self.workdir:
            raise ValueError("path tables need a workdir")

    @property
    def kind(self) -> str:
        """``catalog`` or ``path``."""
        return "catalog" if self.catalog else "path"

    def location(self, table: str) -> Optional[str]:
        """The Delta folder of a path table (None for catalog tables)."""
        _known(table)
        if self.catalog:
            return None
        assert self.workdir is not None
        return join(spark_location(self.workdir), "delta", table)

    def name(self, table: str) -> str:
        """The SQL name: ``catalog.schema.table``, or ``schema.table`` as registered locally."""
        _known(table)
        parts = [self.catalog, self.schema, table] if self.catalog else [self.schema, table]
        return ".".join(f"`{part}`" for part in parts)

    def display_name(self, table: str) -> str:
        """The SQL name without quotes, for messages and docs."""
        return self.name(table).replace("`", "")

    def describe(self) -> str:
        """One line saying where the tables are."""
        if self.catalog:
            return f"catalog tables {self.catalog}.{self.schema}.<table>"
        root = join(spark_location(self.workdir or ""), "delta")
        registered = f" (SQL: {self.schema}.<table>)" if self.register else ""
        return f"path tables {root}/<table>{registered}"


def resolver_for(config: Any, workdir: Optional[str]) -> TableResolver:
    """The resolver a configuration asks for (``tables`` section) over ``workdir``."""
    tables = config.tables
    return TableResolver(workdir=workdir, catalog=tables.catalog, schema=tables.schema, register=tables.register)


def as_resolver(tables: "TableResolver | str") -> TableResolver:
    """A resolver as it is; a workdir string names its path tables."""
    return tables if isinstance(tables, TableResolver) else TableResolver(workdir=tables)


def _known(table: str) -> None:
    if table not in TABLES:
        raise KeyError(f"unknown table {table!r}")


def table_path(workdir: str, table: str) -> str:
    """``<workdir>/delta/<table>`` (path tables)."""
    location = TableResolver(workdir=workdir).location(table)
    assert location is not None
    return location


def new_run_id() -> str:
    """A sortable, unique run id: ``20250101T120000Z-1a2b3c4d``."""
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


_EXISTING: set[tuple[str, str]] = set()
"""(Spark application id, table name or location) of tables known to exist in this process:
existence is checked once per session instead of replaying the Delta log on every access."""


def _session_key(spark: SparkSession, where: str) -> tuple[str, str]:
    from refinex.spark.session import session_id

    return (session_id(spark), where)


def sql_target(resolver: TableResolver, table: str) -> str:
    """The table in SQL: its catalog name, or ``delta.`<location>``` for a path table.

    Every Delta operation here is SQL (``CREATE TABLE``, ``MERGE INTO``, ``DESCRIBE
    HISTORY``) or the DataFrame API, never Delta's Python ``DeltaTable`` (a JVM handle), so
    the same code runs on a classic session and through Spark Connect."""
    location = resolver.location(table)
    return resolver.name(table) if location is None else f"delta.`{location.replace('`', '``')}`"


def _history(spark: SparkSession, resolver: TableResolver, table: str, limit: Optional[int] = None) -> DataFrame:
    """``DESCRIBE HISTORY`` of the table, newest commit first (``limit`` commits)."""
    return spark.sql(f"DESCRIBE HISTORY {sql_target(resolver, table)}" + (f" LIMIT {int(limit)}" if limit else ""))


def table_exists(spark: SparkSession, tables: "TableResolver | str", table: str) -> bool:
    """Whether the Delta table has been created."""
    resolver = as_resolver(tables)
    location = resolver.location(table)
    key = _session_key(spark, location or resolver.name(table))
    if key in _EXISTING:
        _register(spark, resolver, table)
        return True
    exists = _exists_now(spark, resolver, table)
    if exists:
        _EXISTING.add(key)
        _register(spark, resolver, table)
    return exists


_FRESH: set[tuple[str, str]] = set()
"""Tables this process created and has not written since (known to be empty)."""

_REGISTERED: dict[tuple[str, str], str] = {}
"""(Spark application id, registered name) -> the location it points at in this session."""


def _register(spark: SparkSession, resolver: TableResolver, table: str) -> None:
    """Path tables: make ``<schema>.<table>`` an external table over the path.

    Once per session and location; a name that points at another workdir (an earlier run in
    the same session) is re-pointed, so the names always follow the session's latest workdir.
    A *managed* table of that name is never dropped: that is an error.
    """
    location = resolver.location(table)
    if location is None or not resolver.register:
        return
    name = resolver.name(table)
    key = _session_key(spark, name)
    if _REGISTERED.get(key) == location:
        return
    spark.sql(f"CREATE DATABASE IF NOT EXISTS `{resolver.schema}`")
    display = resolver.display_name(table)
    if spark.catalog.tableExists(display):
        kind = spark.catalog.getTable(display).tableType
        if str(kind).upper() == "MANAGED":
            raise ValueError(
                f"{display} is a managed table in this session's catalog; refinex registers its path tables "
                f"under that name: set tables.schema to another database"
            )
        spark.sql(f"DROP TABLE {name}")
    escaped = location.replace("'", "\\'")
    spark.sql(f"CREATE TABLE {name} USING DELTA LOCATION '{escaped}'")
    _REGISTERED[key] = location


def ensure_table(spark: SparkSession, tables: "TableResolver | str", table: str) -> None:
    """Create the table (explicit schema, partitioning) unless it exists.

    A plain CREATE (not IF NOT EXISTS), so this process knows whether it made the table: only
    the creator may take :func:`merge_into`'s fast first write. Losing a creation race (another
    process created it first: "already exists" or Delta's ProtocolChangedException) is fine.
    """
    resolver = as_resolver(tables)
    if table_exists(spark, resolver, table):
        return
    spec = TABLES[table]
    location = resolver.location(table)
    key = _session_key(spark, location or resolver.name(table))
    try:
        if location is None:
            spark.sql(f"CREATE SCHEMA IF NOT EXISTS `{resolver.catalog}`.`{resolver.schema}`")
        columns = ", ".join(
            f"`{f.name}` {f.dataType.simpleString()}{'' if f.nullable else ' NOT NULL'}" for f in spec.schema.fields
        )
        partitioned = f" PARTITIONED BY ({', '.join(spec.partition_by)})" if spec.partition_by else ""
        spark.sql(f"CREATE TABLE {sql_target(resolver, table)} ({columns}) USING DELTA{partitioned}")
    except Exception as exc:
        if not _created_by_another(spark, resolver, table, wait=_lost_creation_race(exc)):
            raise
        log.debug("%s was created by another writer", resolver.display_name(table))
    else:
        _FRESH.add(key)
    _EXISTING.add(key)
    _register(spark, resolver, table)


CREATION_WAIT_S = 15.0
"""How long a failed CREATE waits for another writer's creation commit to appear: Delta
refuses a location that another process is creating ("not empty and also not a Delta
table") until that process's first commit lands."""


_CREATION_RACE_MARKERS = ("DELTA_CREATE_TABLE_WITH_NON_EMPTY_LOCATION", "ALREADY_EXISTS", "already exists")


def _lost_creation_race(exc: BaseException) -> bool:
    """Whether a CREATE failed the way it does when another writer creates the table too:
    the table is there already or half made, or Delta's conflict check (ProtocolChanged)."""
    return is_write_conflict(exc) or any(marker in str(exc) for marker in _CREATION_RACE_MARKERS)


def _created_by_another(spark: SparkSession, resolver: TableResolver, table: str, wait: bool) -> bool:
    """After a failed CREATE: whether another writer made the table (when ``wait``, up to
    :data:`CREATION_WAIT_S` for its commit to appear)."""
    deadline = time.monotonic() + (CREATION_WAIT_S if wait else 0.0)
    while True:
        if _exists_now(spark, resolver, table):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.25)


def _exists_now(spark: SparkSession, resolver: TableResolver, table: str) -> bool:
    """Whether the table exists, asking the catalog or the Delta log again: after a lost
    creation race this process's cached log still says "no table")."""
    location = resolver.location(table)
    if location is None:
        return bool(spark.catalog.tableExists(resolver.display_name(table)))
    try:
        spark.read.format("delta").load(location).schema  # noqa: B018 - reads the log anew
    except Exception:  # noqa: BLE001 - not a Delta table (yet)
        return False
    return True


def register_tables(spark: SparkSession, tables: "TableResolver | str") -> list[str]:
    """Register every existing path table in the session catalog; returns their SQL names.

    For notebooks and SQL users on a fresh session over a finished workdir.
    """
    resolver = as_resolver(tables)
    return [resolver.display_name(name) for name in TABLES if table_exists(spark, resolver, name)]


def read_table(
    spark: SparkSession, tables: "TableResolver | str", table: str, version: Optional[int] = None
) -> DataFrame:
    """The table (at ``version`` if given) as a DataFrame; created empty if never written."""
    resolver = as_resolver(tables)
    ensure_table(spark, resolver, table)
    reader = spark.read.format("delta")
    if version is not None:
        reader = reader.option("versionAsOf", version)
    location = resolver.location(table)
    return reader.table(resolver.display_name(table)) if location is None else reader.load(location)


def table_version(spark: SparkSession, tables: "TableResolver | str", table: str) -> int:
    """The table's current Delta version (created empty if never written)."""
    resolver = as_resolver(tables)
    ensure_table(spark, resolver, table)
    row = _history(spark, resolver, table, 1).select("version").first()
    return int(row[0]) if row is not None else 0


def conform(df: DataFrame, table: str) -> DataFrame:
    """``df``'s columns in the table's order, cast to the table's types."""
    spec = TABLES[table]
    missing = [c for c in spec.columns if c not in df.columns]
    if missing:
        raise ValueError(f"{table}: source lacks column(s) {', '.join(missing)}")
    return df.select([F.col(f.name).cast(f.dataType).alias(f.name) for f in spec.schema.fields])


def dedupe_on_key(df: DataFrame, keys: Sequence[str], order_by: Optional[Sequence[Column]] = None) -> DataFrame:
    """One row per key: the first by ``order_by`` (or any one when no order is given)."""
    if not order_by:
        return df.dropDuplicates(list(keys))
    window = Window.partitionBy(*keys).orderBy(*order_by)
    return df.withColumn("_rank", F.row_number().over(window)).where(F.col("_rank") == 1).drop("_rank")


def _same(column: str, dtype: DataType) -> str:
    """SQL: target and source values are equal (null-safe; maps compared as sorted entries)."""
    if isinstance(dtype, MapType):
        return f"array_sort(map_entries(t.`{column}`)) <=> array_sort(map_entries(s.`{column}`))"
    if isinstance(dtype, StructType) and any(isinstance(f.dataType, MapType) for f in dtype.fields):
        both_null = f"(t.`{column}` IS NULL) = (s.`{column}` IS NULL)"
        return " AND ".join([both_null, *(_same(f"{column}`.`{f.name}", f.dataType) for f in dtype.fields)])
    return f"t.`{column}` <=> s.`{column}`"


def merge_into(
    spark: SparkSession,
    tables: "TableResolver | str",
    table: str,
    df: DataFrame,
    order_by: Optional[Sequence[Column]] = None,
    delete_missing: bool = False,
) -> dict[str, int]:
    """Idempotent upsert of ``df`` into ``table``; returns Delta's merge metrics.

    The source is conformed to the schema and deduplicated on the key (keeping the first
    row by ``order_by``). Matched rows are rewritten only when a content column differs.
    With ``delete_missing`` the table becomes exactly the source: rows whose key is not in
    it are deleted (tables rebuilt as a whole, such as ``sft_pairs``).
    """
    spec = TABLES[table]
    resolver = as_resolver(tables)
    ensure_table(spark, resolver, table)
    source = dedupe_on_key(df, spec.keys, order_by) if order_by else df.dropDuplicates(list(spec.keys))
    source = conform(source, table)
    fresh = _session_key(spark, resolver.location(table) or resolver.name(table))
    if fresh in _FRESH:
        # Created empty by this process and not written since: the MERGE would insert every
        # (deduplicated) source row, so one write does the same without the join.
        _FRESH.discard(fresh)
        written = _first_write(spark, resolver, table, source)
        if written is not None:
            return {"inserted": written, "updated": 0, **({"deleted": 0} if delete_missing else {})}
    # Nullable key columns (gate_failures.doc_id) match null-safely: a rerun finds its rows.
    nullable = {f.name for f in spec.schema.fields if f.nullable}
    on = " AND ".join(f"t.`{c}` {'<=>' if c in nullable else '='} s.`{c}`" for c in spec.keys)
    types = {f.name: f.dataType for f in spec.schema.fields}
    unchanged = " AND ".join(_same(c, types[c]) for c in spec.content_columns)

    view = f"refinex_merge_source_{uuid.uuid4().hex[:12]}"
    statement = " ".join([
        f"MERGE INTO {sql_target(resolver, table)} AS t USING {view} AS s ON {on}",
        f"WHEN MATCHED AND NOT ({unchanged}) THEN UPDATE SET *" if unchanged else "",
        "WHEN NOT MATCHED THEN INSERT *",
        "WHEN NOT MATCHED BY SOURCE THEN DELETE" if delete_missing else "",
    ])

    def run_merge() -> Any:
        return spark.sql(statement).collect()

    source.createOrReplaceTempView(view)
    try:
        result = _retry_conflicts(resolver.display_name(table), run_merge)
    finally:
        spark.catalog.dropTempView(view)
    row = result[0] if result else None
    metrics = row.asDict() if row is not None else {}
    counts = {
        "inserted": int(metrics.get("num_inserted_rows", 0) or 0),
        "updated": int(metrics.get("num_updated_rows", 0) or 0),
    }
    if delete_missing:
        counts["deleted"] = int(metrics.get("num_deleted_rows", 0) or 0)
    return counts


WRITE_ATTEMPTS = 6
"""How many times a MERGE runs when other writers keep committing first (each run starts
from the table's newest snapshot, so a rerun is exact: every MERGE is idempotent)."""

_CONFLICT_MARKERS = ("[DELTA_CONCURRENT_", "[DELTA_METADATA_CHANGED", "[DELTA_PROTOCOL_CHANGED",
                     "io.delta.exceptions.Concurrent", "io.delta.exceptions.MetadataChanged",
                     "io.delta.exceptions.ProtocolChanged")


def is_write_conflict(exc: BaseException) -> bool:
    """Whether ``exc`` is Delta's optimistic-concurrency conflict: another writer committed
    to the table after this transaction read it (ConcurrentAppendException & co., typed or
    still wrapped in a Py4JJavaError, or as a Spark Connect error's message). Without the
    ``delta`` Python package (a serverless environment) the message markers decide."""
    try:
        from delta.exceptions import base
    except ImportError:
        return any(marker in str(exc) for marker in _CONFLICT_MARKERS)
    typed = (base.DeltaConcurrentModificationException, base.ConcurrentWriteException,
             base.MetadataChangedException, base.ProtocolChangedException, base.ConcurrentAppendException,
             base.ConcurrentDeleteReadException, base.ConcurrentDeleteDeleteException,
             base.ConcurrentTransactionException)
    return isinstance(exc, typed) or any(marker in str(exc) for marker in _CONFLICT_MARKERS)


def _retry_conflicts(name: str, write: Any) -> Any:
    """``write()``, run again (with a growing, jittered pause) while it loses to concurrent
    writers; after :data:`WRITE_ATTEMPTS` a :class:`TableWriteConflict` naming the table."""
    for attempt in range(1, WRITE_ATTEMPTS + 1):
        try:
            return write()
        except Exception as exc:  # noqa: BLE001 - only Delta conflicts are retried
            if not is_write_conflict(exc):
                raise
            reason = ": ".join(one_line(exc))
            if attempt == WRITE_ATTEMPTS:
                raise TableWriteConflict(
                    f"{name}: {attempt} attempts lost to concurrent writers (another run on this workdir?): "
                    f"{reason}") from None
            log.warning("%s: a concurrent writer committed first (%s); writing again (attempt %d of %d)",
                        name, reason, attempt + 1, WRITE_ATTEMPTS)
            time.sleep(min(8.0, 0.25 * 2 ** attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")


def _first_write(spark: SparkSession, resolver: TableResolver, table: str, source: DataFrame) -> Optional[int]:
    """The rows written into a table this process created empty, without a MERGE; ``None``
    when a MERGE must do it instead (another writer has committed to the table).

    An overwrite, not a blind append: Delta never checks a blind append against concurrent
    commits, so a writer that MERGEd the same keys meanwhile would leave them twice. The
    overwrite reads the table, so Delta rejects it when another commit landed after its
    snapshot, and its commit's ``readVersion`` (found by a unique ``userMetadata``) says
    whether that snapshot was still the empty table; if not, the rows it replaced are merged
    back.
    """
    if table_version(spark, resolver, table) != 0:
        return None
    tag = f"refinex-first-write-{uuid.uuid4().hex}"
    target = sql_target(resolver, table)
    try:
        source.writeTo(target).option("userMetadata", tag).overwrite(F.lit(True))
    except Exception as exc:  # noqa: BLE001 - a lost race falls back to the MERGE
        if is_write_conflict(exc):
            return None
        raise
    commit = _history(spark, resolver, table, 1).first()  # this write's commit, unless another one landed since
    if commit is None or commit["userMetadata"] != tag:
        commit = _history(spark, resolver, table).where(F.col("userMetadata") == tag).first()
    if commit is None:
        raise RuntimeError(f"{resolver.display_name(table)}: the commit of this write ({tag}) is not in the history")
    if commit["readVersion"] not in (None, 0):
        merge_into(spark, resolver, table, read_table(spark, resolver, table, version=int(commit["readVersion"])))
    return int((commit["operationMetrics"] or {}).get("numOutputRows", 0) or 0)


def append_rows(
    spark: SparkSession, tables: "TableResolver | str", table: str, df: DataFrame, count: bool = True
) -> int:
    """Append ``df`` (conformed to the table) without a MERGE; returns the rows written
    (read from the commit's metrics; -1 without ``count``, which saves that Delta read).

    For rows that are new by construction (``stage_runs``: one per stage attempt): a blind
    append, which Delta never finds in conflict with another writer's."""
    resolver = as_resolver(tables)
    ensure_table(spark, resolver, table)
    _FRESH.discard(_session_key(spark, resolver.location(table) or resolver.name(table)))
    writer = conform(df, table).write.format("delta").mode("append")
    location = resolver.location(table)
    if location is None:
        writer.saveAsTable(resolver.display_name(table))
    else:
        writer.save(location)
    if not count:
        return -1
    metrics = _history(spark, resolver, table, 1).select("operationMetrics").first()
    return int(((metrics[0] if metrics is not None else None) or {}).get("numOutputRows", 0) or 0)


def _json(value: Mapping[str, Any]) -> str:
    return json.dumps(value, sort_keys=True, default=str, ensure_ascii=False)


def record_stage_run(
    spark: SparkSession,
    tables: "TableResolver | str",
    run_id: str,
    stage: str,
    started_at: datetime,
    ended_at: datetime,
    params: Mapping[str, Any],
    stats: Mapping[str, Any],
) -> None:
    """Append the ``stage_runs`` row of one stage execution (attempt)."""
    row = (run_id, stage, started_at, ended_at, _json(params), _json(stats))
    append_rows(spark, tables, STAGE_RUNS, spark.createDataFrame([row], TABLES[STAGE_RUNS].schema), count=False)
