"""Delta tables: names, explicit schemas, paths and idempotent writers.

Every table lives at ``<workdir>/delta/<name>`` and has a key. Writers MERGE on the key:
new keys are inserted, existing keys are updated only when a *content* column changed
(timestamps and run ids are bookkeeping, not content), so rerunning a stage on the same
input leaves the table exactly as it was. The source is deduplicated on the key first.
"""
from __future__ import annotations

import json
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

from refinex.experts.cache import CACHE_ROW_SCHEMA

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
    STAGE_RUNS: TableSpec(
        STAGE_RUNS,
        StructType([
            _f("run_id", S, False), _f("stage", S, False), _f("started_at", T), _f("ended_at", T),
            _f("params", S), _f("stats", S),
        ]),
        keys=("run_id", "stage"),
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


def table_path(workdir: str, table: str) -> str:
    """``<workdir>/delta/<table>``."""
    if table not in TABLES:
        raise KeyError(f"unknown table {table!r}")
    return f"{workdir.rstrip('/')}/delta/{table}"


def new_run_id() -> str:
    """A sortable, unique run id: ``20250101T120000Z-1a2b3c4d``."""
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def table_exists(spark: SparkSession, workdir: str, table: str) -> bool:
    """Whether the Delta table has been created."""
    from delta.tables import DeltaTable

    return bool(DeltaTable.isDeltaTable(spark, table_path(workdir, table)))


def ensure_table(spark: SparkSession, workdir: str, table: str) -> None:
    """Create the table (explicit schema, partitioning) unless it exists."""
    from delta.tables import DeltaTable

    spec = TABLES[table]
    path = table_path(workdir, table)
    if DeltaTable.isDeltaTable(spark, path):
        return
    builder = DeltaTable.createIfNotExists(spark).location(path).addColumns(spec.schema)
    if spec.partition_by:
        builder = builder.partitionedBy(*spec.partition_by)
    builder.execute()


def read_table(spark: SparkSession, workdir: str, table: str, version: Optional[int] = None) -> DataFrame:
    """The table (at ``version`` if given) as a DataFrame; created empty if never written."""
    ensure_table(spark, workdir, table)
    reader = spark.read.format("delta")
    if version is not None:
        reader = reader.option("versionAsOf", version)
    return reader.load(table_path(workdir, table))


def table_version(spark: SparkSession, workdir: str, table: str) -> int:
    """The table's current Delta version (created empty if never written)."""
    from delta.tables import DeltaTable

    ensure_table(spark, workdir, table)
    row = DeltaTable.forPath(spark, table_path(workdir, table)).history(1).select("version").first()
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
    workdir: str,
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
    from delta.tables import DeltaTable

    spec = TABLES[table]
    ensure_table(spark, workdir, table)
    source = dedupe_on_key(df, spec.keys, order_by) if order_by else df.dropDuplicates(list(spec.keys))
    source = conform(source, table)
    on = " AND ".join(f"t.`{c}` = s.`{c}`" for c in spec.keys)
    types = {f.name: f.dataType for f in spec.schema.fields}
    unchanged = " AND ".join(_same(c, types[c]) for c in spec.content_columns)
    target = DeltaTable.forPath(spark, table_path(workdir, table)).alias("t")
    merge = target.merge(source.alias("s"), on)
    merge = merge.whenMatchedUpdateAll(condition=f"NOT ({unchanged})") if unchanged else merge
    merge = merge.whenNotMatchedInsertAll()
    if delete_missing:
        merge = merge.whenNotMatchedBySourceDelete()
    result = merge.execute()
    row = result.first() if result is not None else None
    metrics = row.asDict() if row is not None else {}
    counts = {
        "inserted": int(metrics.get("num_inserted_rows", 0) or 0),
        "updated": int(metrics.get("num_updated_rows", 0) or 0),
    }
    if delete_missing:
        counts["deleted"] = int(metrics.get("num_deleted_rows", 0) or 0)
    return counts


def _json(value: Mapping[str, Any]) -> str:
    return json.dumps(value, sort_keys=True, default=str, ensure_ascii=False)


def record_stage_run(
    spark: SparkSession,
    workdir: str,
    run_id: str,
    stage: str,
    started_at: datetime,
    ended_at: datetime,
    params: Mapping[str, Any],
    stats: Mapping[str, Any],
) -> None:
    """Write the ``stage_runs`` row of one stage execution."""
    row = (run_id, stage, started_at, ended_at, _json(params), _json(stats))
    df = spark.createDataFrame([row], TABLES[STAGE_RUNS].schema)
    merge_into(spark, workdir, STAGE_RUNS, df)
