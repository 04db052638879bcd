"""Stage ``ingest``: input files -> ``documents`` (+ ``quarantine``).

Input is JSON Lines (optionally gzipped) or Parquet, a file, a folder or a glob, one
record per line/row with ``text`` and/or ``html`` (the pages format: ``id``, ``url``,
``source``, ``html``, ``gold``). Only the DataFrame API is used (no RDDs), so the stage
also runs on Spark Connect.

* Every record keeps its ``input_file`` and 1-based ``line_no``, exact within each file
  (for JSONL: the physical line, counted across file splits; for Parquet: the row index).
* ``doc_id`` is the record's ``id`` (as a string) when present, else the sha256 of its
  content (``text``, or ``html`` when there is no text).
* When only ``html`` is given, the text is ``refinex.text.html_to_text(html)``.
* Rejected records go to ``quarantine`` with a reason: ``invalid_utf8``, ``too_large``,
  ``malformed_json``, ``not_an_object``, ``bad_field_type``, ``missing_text``,
  ``extraction_failed``, ``empty_text``, ``duplicate_doc_id`` (later occurrences of an id;
  the first by ``(input_file, line_no)`` is kept), ``truncated_input`` (a gzip file that
  ends mid-stream: its readable lines are ingested, the file gets this one row, the other
  files go on). Blank lines are not records and are only counted. Nothing is dropped
  silently: ``read = accepted + quarantined``.
* Local inputs are checked before any work: a path or glob that matches nothing is a
  one-line ``FileNotFoundError``; an input without a single record is a warning and an
  empty result. ``.gz`` files are read by a Python reader, one task per file (gzip does not
  split), which keeps what it read when the stream is cut short: local ones from the path,
  remote ones (listed by Spark, folders and globs included) as ``binaryFile`` bytes; other
  files go through Spark's text reader.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.types import IntegerType, LongType, StringType, StructField, StructType

from refinex.spark.session import persist_or_recompute
from refinex.spark.stage import Param, Stage, StageContext
from refinex.spark.tables import DOCUMENTS, QUARANTINE, utf8_encodable

log = logging.getLogger(__name__)

STAGE = "ingest"
RECORD_PREVIEW_CHARS = 2000

INVALID_UTF8 = "invalid_utf8"
TOO_LARGE = "too_large"
MALFORMED_JSON = "malformed_json"
NOT_AN_OBJECT = "not_an_object"
BAD_FIELD_TYPE = "bad_field_type"
MISSING_TEXT = "missing_text"
EXTRACTION_FAILED = "extraction_failed"
EMPTY_TEXT = "empty_text"
DUPLICATE_DOC_ID = "duplicate_doc_id"
TRUNCATED_INPUT = "truncated_input"
QUARANTINE_REASONS = (
    INVALID_UTF8, TOO_LARGE, MALFORMED_JSON, NOT_AN_OBJECT, BAD_FIELD_TYPE, MISSING_TEXT,
    EXTRACTION_FAILED, EMPTY_TEXT, DUPLICATE_DOC_ID, TRUNCATED_INPUT,
)

KIND_DOC = "doc"
KIND_QUARANTINE = "quarantine"
KIND_BLANK = "blank"
RESERVED_FIELDS = ("id", "url", "source", "text", "html")

PARSED_SCHEMA = StructType([
    StructField("kind", StringType(), False),
    StructField("doc_id", StringType()),
    StructField("source", StringType()),
    StructField("url", StringType()),
    StructField("text", StringType()),
    StructField("html", StringType()),
    StructField("metadata", StringType()),
    StructField("shard", IntegerType()),
    StructField("input_file", StringType(), False),
    StructField("line_no", LongType(), False),
    StructField("n_chars", LongType()),
    StructField("n_lines", IntegerType()),
    StructField("record", StringType()),
    StructField("reason", StringType()),
    StructField("detail", StringType()),
])
_PARSED_COLUMNS = [f.name for f in PARSED_SCHEMA.fields]
BLANK_LINE_REGEX = r"^[ \t\n\x0B\f\r]*$"
"""A line of only ASCII whitespace is blank (the same class in Java and Python regexes)."""


def _blank() -> Column:
    return F.col("value").rlike(BLANK_LINE_REGEX)


def detect_format(paths: Sequence[str], configured: str = "auto") -> str:
    """``jsonl`` or ``parquet``: the configured format, or guessed from the paths."""
    if configured != "auto":
        return configured
    for path in paths:
        stripped = path.rstrip("/")
        if stripped.endswith(".parquet") or stripped.endswith(".parquet/*"):
            return "parquet"
        if "://" not in stripped and os.path.isdir(stripped):
            names = os.listdir(stripped)
            if any(n.endswith(".parquet") for n in names) and not any(
                n.endswith((".jsonl", ".json", ".gz")) for n in names
            ):
                return "parquet"
    return "jsonl"


def shard_of(doc_id: str, n_shards: int) -> int:
    """Stable shard of a document: sha256(doc_id) mod ``n_shards``."""
    import hashlib

    return int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big") % n_shards


def _metadata_json(metadata: dict[str, Any]) -> str:
    """The extra fields as JSON (ASCII-escaped only if they hold lone surrogates)."""
    import json

    text = json.dumps(metadata, ensure_ascii=False, sort_keys=True)
    return text if utf8_encodable(text) else json.dumps(metadata, ensure_ascii=True, sort_keys=True)


def parse_record(
    line: Optional[str],
    input_file: str,
    line_no: int,
    pre_reason: Optional[str],
    pre_detail: Optional[str],
    n_shards: int,
    max_text_chars: int,
    max_html_chars: int,
    html_to_text: Callable[[str], str],
) -> dict[str, Any]:
    """One input line -> one row of ``PARSED_SCHEMA`` (a document, a rejection or a blank)."""
    import hashlib
    import json
    import re

    record = (line or "")[:RECORD_PREVIEW_CHARS]
    out: dict[str, Any] = {c: None for c in _PARSED_COLUMNS}
    out.update(kind=KIND_QUARANTINE, input_file=input_file, line_no=int(line_no), record=record)

    def reject(reason: str, detail: str, doc_id: Optional[str] = None) -> dict[str, Any]:
        out.update(reason=reason, detail=detail, doc_id=doc_id)
        return out

    if pre_reason is not None:
        return reject(pre_reason, pre_detail or pre_reason)
    assert line is not None
    if re.match(BLANK_LINE_REGEX, line):
        out.update(kind=KIND_BLANK, record=None)
        return out
    if line_no == 1 and line.startswith("\ufeff"):
        line = line[1:]
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as exc:
        return reject(MALFORMED_JSON, f"{type(exc).__name__}: {exc}"[:500])
    if not isinstance(obj, dict):
        return reject(NOT_AN_OBJECT, f"a record must be a JSON object, got {type(obj).__name__}")

    raw_id = obj.get("id")
    if raw_id is not None and (isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or raw_id == ""):
        return reject(BAD_FIELD_TYPE, f"id must be a non-empty string or an integer, got {json.dumps(raw_id)[:100]}")
    given_id = str(raw_id) if raw_id is not None else None
    for name in ("text", "html", "url", "source"):
        value = obj.get(name)
        if value is not None and not isinstance(value, str):
            return reject(BAD_FIELD_TYPE, f"{name} must be a string, got {type(value).__name__}", given_id)
    for name in ("id", "text", "html", "url", "source"):
        value = obj.get(name)
        if isinstance(value, str) and not utf8_encodable(value):
            return reject(INVALID_UTF8, f"{name} contains an unpaired surrogate escape (\\ud800-\\udfff)")
    text: Optional[str] = obj.get("text")
    html: Optional[str] = obj.get("html")
    if text is None and html is None:
        return reject(MISSING_TEXT, "the record has neither text nor html", given_id)
    if html is not None and len(html) > max_html_chars:
        return reject(TOO_LARGE, f"html has {len(html)} characters (limit {max_html_chars})", given_id)
    if text is not None and len(text) > max_text_chars:
        return reject(TOO_LARGE, f"text has {len(text)} characters (limit {max_text_chars})", given_id)
    content = text if text is not None else html
    assert content is not None
    doc_id = given_id or hashlib.sha256(content.encode("utf-8")).hexdigest()
    if text is None:
        assert html is not None
        try:
            text = html_to_text(html)
        except Exception as exc:  # noqa: BLE001 - any extractor failure is a rejection
            return reject(EXTRACTION_FAILED, f"{type(exc).__name__}: {exc}"[:500], doc_id)
        if len(text) > max_text_chars:
            return reject(TOO_LARGE, f"extracted text has {len(text)} characters (limit {max_text_chars})", doc_id)
    if not text.strip():
        what = "the text extracted from html" if obj.get("text") is None else "text"
        return reject(EMPTY_TEXT, f"{what} is empty or whitespace", doc_id)
    metadata = {k: v for k, v in obj.items() if k not in RESERVED_FIELDS}
    source = obj.get("source") or Path(input_file).name.split(".")[0] or None
    out.update(
        kind=KIND_DOC,
        doc_id=doc_id,
        source=source,
        url=obj.get("url"),
        text=text,
        html=html,
        metadata=_metadata_json(metadata) if metadata else None,
        shard=shard_of(doc_id, n_shards),
        n_chars=len(text),
        n_lines=text.count("\n") + 1,
    )
    return out


def _parse_partition(
    n_shards: int, max_text_chars: int, max_html_chars: int
) -> Callable[[Iterator[Any]], Iterator[Any]]:
    """The ``mapInPandas`` function that parses lines into ``PARSED_SCHEMA`` rows."""

    def parse_batches(batches: Iterator[Any]) -> Iterator[Any]:
        import pandas as pd

        from refinex.text import html_to_text

        for batch in batches:
            rows = [
                parse_record(
                    line, input_file, line_no, pre_reason, pre_detail,
                    n_shards, max_text_chars, max_html_chars, html_to_text,
                )
                for line, input_file, line_no, pre_reason, pre_detail in zip(
                    batch["value"], batch["input_file"], batch["line_no"], batch["pre_reason"], batch["pre_detail"]
                )
            ]
            frame = pd.DataFrame.from_records(rows, columns=_PARSED_COLUMNS)
            for column in ("shard", "n_lines", "n_chars", "line_no"):
                frame[column] = frame[column].astype("Int64")
            yield frame

    return parse_batches


_HIDDEN_PREFIXES = ("_", ".")  # what Spark's file sources skip in a folder


def expand_local_inputs(paths: Sequence[str]) -> list[str]:
    """The input files a list of locations names, for the local ones (remote ones unchanged).

    A local file is itself, a folder its visible files (Spark skips names starting with
    ``_`` or ``.``), a glob its matches. A local location that names nothing raises
    ``FileNotFoundError`` with the location, before Spark is asked to read it.
    """
    import glob as globbing

    from refinex.locations import is_local, local_path

    files: list[str] = []
    for location in paths:
        if not is_local(location):
            files.append(location)
            continue
        text = str(local_path(location)) if not globbing.has_magic(location) else os.path.expanduser(location)
        matches = sorted(globbing.glob(text)) if globbing.has_magic(text) else ([text] if os.path.exists(text) else [])
        if not matches:
            raise FileNotFoundError(f"input not found: {location} (no such file, folder or glob match)")
        for match in matches:
            if os.path.isdir(match):
                files.extend(sorted(
                    os.path.join(match, name) for name in os.listdir(match)
                    if not name.startswith(_HIDDEN_PREFIXES) and os.path.isfile(os.path.join(match, name))
                ))
            else:
                files.append(match)
    return files


def check_inputs(values: Any) -> None:
    """The ``ingest`` parameters checked before Spark starts (a missing local input)."""
    inputs = values.get("input") if hasattr(values, "get") else None
    if inputs:
        expand_local_inputs([inputs] if isinstance(inputs, str) else list(inputs))


@dataclass(frozen=True)
class InputCounts:
    """What the input holds: physical lines, blank lines, characters of all lines."""

    lines: int
    blank: int
    chars: int

    def __add__(self, other: "InputCounts") -> "InputCounts":
        return InputCounts(self.lines + other.lines, self.blank + other.blank, self.chars + other.chars)


PARSE_PARTITION_CHARS = 64 * 2**20
"""About this many input characters per parse task: a partition is parsed, windowed by
doc_id and cached as one block, so its size must not grow with the corpus (10,000 dev pages,
1.4 GB of HTML, in two partitions ran the local JVM out of heap)."""


def parse_partitions(chars: int, minimum: int) -> int:
    """Partitions for parsing ``chars`` characters: at least ``minimum`` (the cores)."""
    return max(minimum, -(-chars // PARSE_PARTITION_CHARS))


READ_SCHEMA = StructType([
    StructField("value", StringType()),
    StructField("input_file", StringType(), False),
    StructField("line_no", LongType(), False),
    StructField("read_reason", StringType()),
    StructField("read_detail", StringType()),
])
_GZIP_BATCH_LINES = 2000
_GZIP_BATCH_BYTES = 32 * 2**20
"""A pandas batch of gzip lines ends at whichever comes first: the lines or their bytes
(2,000 typical pages are ~300 MB of HTML; a worker holds a batch and its Arrow copy)."""


def _gzip_rows(handle: Any, uri: str) -> Iterator[list[tuple[Any, ...]]]:
    """Batches of ``READ_SCHEMA`` rows of one gzip stream, lines numbered from 1: a stream
    cut short ends with one ``truncated_input`` row (its readable lines kept); undecodable
    lines are flagged ``invalid_utf8`` (their text replaced for the preview)."""
    import gzip
    import zlib

    rows: list[tuple[Any, ...]] = []
    line_no = batch_bytes = 0
    try:
        with gzip.GzipFile(fileobj=handle, mode="rb") as stream:
            for raw in stream:
                line_no += 1
                data = raw[:-1] if raw.endswith(b"\n") else raw
                if data.endswith(b"\r"):
                    data = data[:-1]
                try:
                    rows.append((data.decode("utf-8"), uri, line_no, None, None))
                except UnicodeDecodeError:
                    preview = data[: 4 * RECORD_PREVIEW_CHARS].decode("utf-8", errors="replace")
                    rows.append((preview[:RECORD_PREVIEW_CHARS], uri, line_no, INVALID_UTF8,
                                 "the line is not valid UTF-8"))
                batch_bytes += len(data)
                if len(rows) >= _GZIP_BATCH_LINES or batch_bytes >= _GZIP_BATCH_BYTES:
                    yield rows
                    rows, batch_bytes = [], 0
    except (EOFError, OSError, zlib.error) as exc:
        rows.append((None, uri, line_no + 1, TRUNCATED_INPUT,
                     f"the gzip stream is cut short or corrupt after {line_no} readable lines "
                     f"({type(exc).__name__}: {exc}); those lines were ingested"[:500]))
    if rows:
        yield rows


def _read_frame(rows: list[tuple[Any, ...]]) -> Any:
    import pandas as pd

    out = pd.DataFrame.from_records(rows, columns=[f.name for f in READ_SCHEMA.fields])
    out["line_no"] = out["line_no"].astype("int64")
    return out


def _read_gzip_files(paths: Iterator[Any]) -> Iterator[Any]:
    """``mapInPandas``: the lines of each local gzip file (:func:`_gzip_rows`)."""
    from pathlib import Path as _Path

    for batch in paths:
        for path in batch["path"]:
            with open(path, "rb") as handle:
                for rows in _gzip_rows(handle, _Path(path).resolve().as_uri()):
                    yield _read_frame(rows)


def _read_gzip_blobs(files: Iterator[Any]) -> Iterator[Any]:
    """``mapInPandas`` over ``binaryFile`` rows: the lines of each gzip file's bytes
    (:func:`_gzip_rows`), for files only the cluster's file system can open."""
    import io

    for batch in files:
        for path, content in zip(batch["path"], batch["content"]):
            for rows in _gzip_rows(io.BytesIO(content), str(path)):
                yield _read_frame(rows)


def _gzip_lines(spark: SparkSession, files: Sequence[str]) -> DataFrame:
    """The lines of local gzip ``files`` (one task per file)."""
    listing = spark.createDataFrame([(f,) for f in files], "path string").repartition(max(1, len(files)))
    return listing.mapInPandas(_read_gzip_files, READ_SCHEMA)


def _remote_gzip_lines(spark: SparkSession, files: Sequence[str]) -> DataFrame:
    """The lines of gzip ``files`` on the cluster's file system (``gs://``, ``s3://``,
    ``dbfs:``, ...), read whole through Spark's ``binaryFile`` source and decompressed in
    Python, so that a file cut short is a ``truncated_input`` row, as for local files,
    instead of the error that aborts Spark's text reader. A gzip file is one task either way
    (gzip is not splittable); here a task holds its compressed file in memory (at most 2 GiB,
    the ``binaryFile`` limit)."""
    blobs = spark.read.format("binaryFile").load(list(files)).select("path", "content")
    return blobs.mapInPandas(_read_gzip_blobs, READ_SCHEMA)


def remote_files(spark: SparkSession, locations: Sequence[str]) -> list[str]:
    """The files remote ``locations`` (files, folders, globs) name, listed by Spark's own file
    source (no content read), sorted; a location that names nothing raises Spark's error."""
    if not locations:
        return []
    listing = spark.read.format("binaryFile").load(list(locations)).select("path").collect()
    return sorted({str(r["path"]) for r in listing})


def _jsonl_lines(spark: SparkSession, paths: Sequence[str]) -> tuple[DataFrame, InputCounts]:
    """``value, input_file, line_no, read_reason, read_detail`` for every physical line of
    the JSONL input, with its counts: local gzip files through :func:`_read_gzip_files`,
    remote ones through :func:`_remote_gzip_lines`, the rest through Spark's text reader
    (:func:`_text_lines`)."""
    from refinex.locations import is_local

    files = expand_local_inputs(paths)
    remote = [f for f in files if not is_local(f)]
    if any(not f.endswith(".gz") for f in remote):  # folders and globs: list them to find the gzip files
        remote = remote_files(spark, remote)
    gzipped = [f for f in files if is_local(f) and f.endswith(".gz")]
    remote_gzipped = [f for f in remote if f.endswith(".gz")]
    others = [f for f in files if is_local(f) and not f.endswith(".gz")] + [f for f in remote if not f.endswith(".gz")]
    parts: list[DataFrame] = []
    counts = InputCounts(0, 0, 0)
    if others:
        text, found = _text_lines(spark, others)
        parts.append(text.withColumns({"read_reason": F.lit(None).cast("string"),
                                       "read_detail": F.lit(None).cast("string")}))
        counts = counts + found
    for lines in ([_gzip_lines(spark, gzipped)] if gzipped else []) + (
            [_remote_gzip_lines(spark, remote_gzipped)] if remote_gzipped else []):
        row = lines.agg(F.count(F.lit(1)).alias("n"), F.count(F.when(_blank(), F.lit(1))).alias("blank"),
                        F.sum(F.length("value")).alias("chars")).first()
        parts.append(lines)
        counts = counts + InputCounts(int(row["n"]), int(row["blank"]), int(row["chars"] or 0))
    if not parts:
        return spark.createDataFrame([], READ_SCHEMA), counts
    combined = parts[0]
    for part in parts[1:]:
        combined = combined.unionByName(part)
    return combined, counts


def _text_lines(spark: SparkSession, paths: Sequence[str]) -> tuple[DataFrame, InputCounts]:
    """``value, input_file, line_no`` for every physical line of the JSONL input files.

    Also returns the numbers of lines, blank lines and characters. A line's number is its position
    within its split plus the number of lines in the file's earlier splits (splits are
    ordered by byte offset; a split's rows are consecutive ``monotonically_increasing_id``
    values within one task).
    """
    raw = spark.read.text(list(paths)).select(
        F.col("value"),
        F.col("_metadata.file_path").alias("input_file"),
        F.col("_metadata.file_block_start").alias("block_start"),
        F.monotonically_increasing_id().alias("row_id"),
    )
    splits = (
        raw.groupBy("input_file", "block_start")
        .agg(
            F.min("row_id").alias("first_row"),
            F.count(F.lit(1)).alias("n"),
            F.count(F.when(_blank(), F.lit(1))).alias("blank"),
            F.sum(F.length("value")).alias("chars"),
        )
        .collect()
    )
    offsets: list[tuple[str, int, int, int]] = []
    running: dict[str, int] = {}
    for split in sorted(splits, key=lambda r: (r["input_file"], r["block_start"])):
        before = running.get(split["input_file"], 0)
        offsets.append((split["input_file"], int(split["block_start"]), int(split["first_row"]), before))
        running[split["input_file"]] = before + int(split["n"])
    schema = StructType([
        StructField("input_file", StringType(), False),
        StructField("block_start", LongType(), False),
        StructField("first_row", LongType(), False),
        StructField("lines_before", LongType(), False),
    ])
    offsets_df = spark.createDataFrame(offsets, schema)
    lines = raw.join(F.broadcast(offsets_df), ["input_file", "block_start"]).select(
        "value",
        "input_file",
        (F.col("lines_before") + F.col("row_id") - F.col("first_row") + 1).alias("line_no"),
    )
    return lines, InputCounts(sum(int(r["n"]) for r in splits), sum(int(r["blank"]) for r in splits),
                              sum(int(r["chars"] or 0) for r in splits))


def _parquet_lines(spark: SparkSession, paths: Sequence[str]) -> tuple[DataFrame, InputCounts]:
    """Parquet rows as JSON lines: ``value, input_file, line_no`` (1-based row index)."""
    df = spark.read.parquet(*expand_local_inputs(paths))
    lines = df.select(
        F.to_json(F.struct(*[F.col(f"`{c}`") for c in df.columns])).alias("value"),
        F.col("_metadata.file_path").alias("input_file"),
        (F.col("_metadata.row_index") + 1).alias("line_no"),
        F.lit(None).cast("string").alias("read_reason"),
        F.lit(None).cast("string").alias("read_detail"),
    )
    row = lines.agg(F.count(F.lit(1)).alias("n"), F.sum(F.length("value")).alias("chars")).first()
    return lines, InputCounts(int(row["n"]), 0, int(row["chars"] or 0))


def read_lines(spark: SparkSession, paths: Sequence[str], fmt: str) -> tuple[DataFrame, InputCounts]:
    """The input as ``value, input_file, line_no, read_reason, read_detail`` rows, with its
    counts."""
    return _parquet_lines(spark, paths) if fmt == "parquet" else _jsonl_lines(spark, paths)


def ingest_documents(
    ctx: StageContext,
    input: str | Sequence[str],
    limit: Optional[int] = None,
) -> dict[str, Any]:
    """Ingest the input into ``documents`` and ``quarantine``; returns the stage statistics."""
    spark, config = ctx.spark, ctx.config
    input_paths = input
    paths = [input_paths] if isinstance(input_paths, str) else list(input_paths)
    ic = config.ingest
    fmt = detect_format(paths, ic.format)
    lines, counts_in = read_lines(spark, paths, fmt)
    n_blank = counts_in.blank
    records_in = counts_in.lines - n_blank
    if records_in == 0:
        log.warning("ingest: no input records in %s (%d blank lines): nothing to ingest", ", ".join(paths), n_blank)
        ctx.record(input=paths, format=fmt)
        return {"format": fmt, "read": 0, "accepted": 0, "quarantined": 0, "quarantined_by_reason": {},
                "blank_lines": n_blank, "documents_inserted": 0, "documents_updated": 0,
                "quarantine_inserted": 0, "quarantine_updated": 0, "empty_input": True}
    if limit is not None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        lines = lines.where(~_blank()).orderBy("input_file", "line_no").limit(limit)
        records_in = min(limit, records_in)
    valid = F.is_valid_utf8("value")
    length = F.length("value")
    flagged = F.col("read_reason").isNotNull()
    lines = lines.select(
        F.when(flagged, F.col("value"))
        .when(~valid, F.substring(F.make_valid_utf8("value"), 1, RECORD_PREVIEW_CHARS))
        .when(length > ic.max_record_chars, F.substring("value", 1, RECORD_PREVIEW_CHARS))
        .otherwise(F.col("value"))
        .alias("value"),
        "input_file",
        "line_no",
        F.when(flagged, F.col("read_reason")).when(~valid, F.lit(INVALID_UTF8))
        .when(length > ic.max_record_chars, F.lit(TOO_LARGE)).alias("pre_reason"),
        F.when(flagged, F.col("read_detail"))
        .when(~valid, F.lit("the line is not valid UTF-8"))
        .when(
            length > ic.max_record_chars,
            F.format_string(f"the record has %d characters (limit {ic.max_record_chars})", length),
        )
        .alias("pre_detail"),
    ).repartition(parse_partitions(counts_in.chars, config.spark.partitions), "input_file", "line_no")
    parsed = lines.mapInPandas(_parse_partition(ic.n_shards, ic.max_text_chars, ic.max_html_chars), PARSED_SCHEMA)
    by_id = Window.partitionBy("doc_id").orderBy("input_file", "line_no")
    parsed = parsed.withColumn(
        "dup_rank", F.when(F.col("kind") == KIND_DOC, F.row_number().over(by_id))
    ).withColumn(
        "first_seen",
        F.when(
            F.col("kind") == KIND_DOC,
            F.first(F.concat_ws(":", "input_file", F.col("line_no").cast("string"))).over(by_id),
        ),
    )
    parsed, cached = persist_or_recompute(parsed, "the parsed input")
    try:
        outcome = (
            F.when(F.col("kind") == KIND_BLANK, F.lit(KIND_BLANK))
            .when((F.col("kind") == KIND_DOC) & (F.col("dup_rank") == 1), F.lit("accepted"))
            .when(F.col("kind") == KIND_DOC, F.lit(DUPLICATE_DOC_ID))
            .otherwise(F.col("reason"))
        )
        grouped = parsed.groupBy(outcome.alias("outcome")).agg(F.count(F.lit(1)).alias("n"))
        counts = {r["outcome"]: int(r["n"]) for r in grouped.collect()}
        n_accepted = counts.get("accepted", 0)
        n_quarantined = sum(v for k, v in counts.items() if k not in ("accepted", KIND_BLANK))
        now = F.current_timestamp()
        doc_metrics = q_metrics = {"inserted": 0, "updated": 0}
        if n_accepted:
            first = (F.col("kind") == KIND_DOC) & (F.col("dup_rank") == 1)
            documents = parsed.where(first).withColumn("ingested_at", now)
            doc_metrics = ctx.merge(DOCUMENTS, documents)
        if n_quarantined:
            duplicates = parsed.where((F.col("kind") == KIND_DOC) & (F.col("dup_rank") > 1)).select(
                "input_file", "line_no", "doc_id", "record",
                F.lit(DUPLICATE_DOC_ID).alias("reason"),
                F.concat(F.lit("doc_id already seen at "), F.col("first_seen")).alias("detail"),
            )
            rejected = parsed.where(F.col("kind") == KIND_QUARANTINE).select(
                "input_file", "line_no", "doc_id", "record", "reason", "detail"
            )
            quarantine = rejected.unionByName(duplicates).withColumns({"stage": F.lit(STAGE), "quarantined_at": now})
            q_metrics = ctx.merge(QUARANTINE, quarantine)
    finally:
        if cached:
            parsed.unpersist()
    blank_lines = counts.pop(KIND_BLANK, 0)
    accepted = counts.pop("accepted", 0)
    by_reason = dict(sorted(counts.items()))
    quarantined = sum(by_reason.values())
    read = accepted + quarantined
    if read != records_in:
        raise RuntimeError(
            f"ingest lost records: {records_in} non-blank input lines, "
            f"but {read} = {accepted} accepted + {quarantined} quarantined"
        )
    stats: dict[str, Any] = {
        "format": fmt,
        "read": read,
        "accepted": accepted,
        "quarantined": quarantined,
        "quarantined_by_reason": by_reason,
        "blank_lines": blank_lines,
        "documents_inserted": doc_metrics["inserted"],
        "documents_updated": doc_metrics["updated"],
        "quarantine_inserted": q_metrics["inserted"],
        "quarantine_updated": q_metrics["updated"],
    }
    limits = ("n_shards", "max_text_chars", "max_html_chars", "max_record_chars")
    ctx.record(input=paths, format=fmt, **{k: getattr(ic, k) for k in limits})
    return stats


INGEST = Stage(
    name=STAGE,
    help="Read input records into the documents table (rejects go to quarantine with a reason).",
    reads=(),
    writes=(DOCUMENTS, QUARANTINE),
    transform=ingest_documents,
    params=(
        Param("input", "Input JSONL(.gz)/Parquet file, folder or glob (repeatable).", kind="list", required=True,
              short="-i"),
        Param("limit", "Only the first N input records.", kind="int", minimum=0),
    ),
    describe=lambda s: f"read {s['read']} = accepted {s['accepted']} + quarantined {s['quarantined']}",
    check=check_inputs,
)
