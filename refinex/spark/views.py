"""SQL views over the edit statistics, and what ``refinex sql`` runs.

The views are defined once, in the package file ``refinex/sql/views.sql`` (Databricks SQL,
``${schema}`` standing for the tables' schema): :func:`views_sql` renders it for a schema
(to create the views in Unity Catalog), :func:`register_views` creates the same views on a
session as temporary views (no catalog writes, no privileges needed; path tables are read
through their registered names ``refinex.<table>``, or their Delta paths without
registration). :func:`run_query` registers them and runs one query; :func:`sql_command` is
the command behind ``refinex sql``: a readable one-line error for a bad query, the first
rows as a terminal table (:func:`format_table`) or every row to a file (:func:`write_output`).
"""
from __future__ import annotations

import base64
import csv
import json
import logging
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional, Sequence, TypeVar

from pyspark.sql import DataFrame, Row, SparkSession

from refinex.locations import driver_path, spark_location
from refinex.spark.tables import TABLES, TableResolver, as_resolver, register_tables, table_exists

if TYPE_CHECKING:
    from refinex.spark.stage import StageContext

log = logging.getLogger(__name__)

SCHEMA_PLACEHOLDER = "${schema}"
VIEWS_PACKAGE, VIEWS_FILE = "refinex.sql", "views.sql"
"""The views' SQL: package data of ``refinex.sql``."""
DEFAULT_LIMIT = 100
DEFAULT_MAX_WIDTH = 48
OUTPUT_FORMATS = (".csv", ".jsonl", ".parquet")
QUERY_KEYWORDS = ("SELECT", "WITH", "VALUES", "TABLE", "FROM", "SHOW", "DESCRIBE", "DESC", "EXPLAIN")
"""What a ``refinex sql`` statement may start with: it reads, it never writes."""

_REFERENCE = re.compile(re.escape(SCHEMA_PLACEHOLDER) + r"\.(\w+)")
_CREATE = re.compile(r"^\s*CREATE\s+OR\s+REPLACE\s+VIEW\s+" + re.escape(SCHEMA_PLACEHOLDER) + r"\.(\w+)",
                     re.IGNORECASE)
T = TypeVar("T")


# --- the views' SQL ----------------------------------------------------------------------------


def sql_segments(sql: str) -> Iterator[tuple[str, str]]:
    """``(kind, text)`` pieces of a SQL script: ``code``, ``quoted`` (string literals and
    quoted identifiers) and ``comment`` (``--`` and ``/* */``). Backslash escapes apply in
    ``'...'`` and ``"..."``, not in raw ``r'...'`` literals nor in backquoted identifiers."""
    i = start = 0
    n = len(sql)
    while i < n:
        char = sql[i]
        if sql.startswith("--", i) or sql.startswith("/*", i):
            if i > start:
                yield "code", sql[start:i]
            if char == "-":
                end = sql.find("\n", i)  # the line break stays code
                end = n if end < 0 else end
            else:
                end = sql.find("*/", i + 2)
                end = n if end < 0 else end + 2
            yield "comment", sql[i:end]
            i = start = end
        elif char in "'\"`":
            if i > start:
                yield "code", sql[start:i]
            prefix = sql[i - 1] if i > 0 else ""
            before = sql[i - 2] if i > 1 else ""
            raw = char != "`" and prefix in ("r", "R") and not (before.isalnum() or before == "_")
            j = i + 1
            while j < n and sql[j] != char:
                j += 2 if sql[j] == "\\" and char != "`" and not raw else 1
            end = min(j + 1, n)
            yield "quoted", sql[i:end]
            i = start = end
        else:
            i += 1
    if start < n:
        yield "code", sql[start:]


def strip_comments(sql: str) -> str:
    """``sql`` without its comments (literals left as they are)."""
    return "".join(text for kind, text in sql_segments(sql) if kind != "comment")


def split_statements(sql: str) -> list[str]:
    """The statements of a SQL script, split at semicolons outside literals, quoted
    identifiers and comments; comments are kept, statements of comments only dropped."""
    statements: list[str] = []
    current: list[str] = []
    for kind, text in sql_segments(sql):
        if kind != "code":
            current.append(text)
            continue
        pieces = text.split(";")
        for piece in pieces[:-1]:
            current.append(piece)
            statements.append("".join(current))
            current = []
        current.append(pieces[-1])
    statements.append("".join(current))
    return [s.strip() for s in statements if strip_comments(s).strip()]


@dataclass(frozen=True)
class ViewDefinition:
    """One ``CREATE OR REPLACE VIEW ${schema}.<name>`` of the views file, with the tables
    and the other views it reads."""

    name: str
    statement: str
    tables: tuple[str, ...]
    views: tuple[str, ...]


@lru_cache(maxsize=1)
def views_file() -> str:
    """The text of ``refinex/sql/views.sql``."""
    return resources.files(VIEWS_PACKAGE).joinpath(VIEWS_FILE).read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def view_definitions() -> tuple[ViewDefinition, ...]:
    """The views of the file, in file order (a view only reads views defined before it)."""
    definitions: list[ViewDefinition] = []
    for statement in (strip_comments(s).strip() for s in split_statements(views_file())):
        match = _CREATE.match(statement)
        if match is None:
            raise ValueError(
                f"{VIEWS_FILE}: not a CREATE OR REPLACE VIEW {SCHEMA_PLACEHOLDER}.<name>: {statement[:80]!r}")
        name = match.group(1)
        known = {d.name for d in definitions}
        referenced = [r for r in dict.fromkeys(_REFERENCE.findall(statement)) if r != name]
        unknown = [r for r in referenced if r not in known and r not in TABLES]
        if unknown:
            raise ValueError(f"{VIEWS_FILE}: view {name} reads {unknown}, neither a table nor an earlier view")
        definitions.append(ViewDefinition(
            name=name, statement=statement,
            tables=tuple(r for r in referenced if r in TABLES),
            views=tuple(r for r in referenced if r in known),
        ))
    return tuple(definitions)


def view_names() -> list[str]:
    """The views' names, in file order."""
    return [d.name for d in view_definitions()]


def views_sql(schema: str) -> str:
    """The views file with ``${schema}`` replaced (e.g. ``main.refinex``): the script that
    creates the views beside the tables in Databricks SQL."""
    if not re.fullmatch(r"[`\w.-]+", schema):
        raise ValueError(f"not a schema name: {schema!r}")
    return views_file().replace(SCHEMA_PLACEHOLDER, schema)


# --- session views -----------------------------------------------------------------------------


def _table_sql(resolver: TableResolver, table: str) -> str:
    """How a session view names a table: its SQL name, or ``delta.`<path>``` for path
    tables that are not registered."""
    if resolver.catalog or resolver.register:
        return resolver.name(table)
    location = resolver.location(table)
    assert location is not None
    return "delta.`" + location.replace("`", "``") + "`"


def session_statement(definition: ViewDefinition, resolver: TableResolver) -> str:
    """The view's statement as a temporary view over the resolver's tables."""
    names = {d.name for d in view_definitions()}
    statement = _CREATE.sub(lambda m: f"CREATE OR REPLACE TEMPORARY VIEW {m.group(1)}", definition.statement, count=1)
    return _REFERENCE.sub(lambda m: m.group(1) if m.group(1) in names else _table_sql(resolver, m.group(1)), statement)


_REGISTERED: dict[tuple[str, TableResolver], tuple[frozenset[str], tuple[str, ...]]] = {}
"""(Spark application id, resolver) -> (the tables that existed, the views created): a
session's views are created again only when a table has appeared since (temporary views
keep their SQL, so they always read the tables' current data)."""


def register_views(spark: SparkSession, tables: "TableResolver | str") -> list[str]:
    """Create every view of the file as a temporary view of this session; returns their names.

    Path tables are registered first (``register_tables``). A view whose tables do not
    exist yet (or that reads such a view) is skipped and logged: querying it then says the
    view cannot be found.
    """
    resolver = as_resolver(tables)
    register_tables(spark, resolver)
    existing = {t for t in {t for d in view_definitions() for t in d.tables} if table_exists(spark, resolver, t)}
    from refinex.spark.session import session_id

    key = (session_id(spark), resolver, frozenset(existing))
    registered = _REGISTERED.get(key[:2])
    if registered is not None and registered[0] == key[2] and all(
        spark.catalog.tableExists(name) for name in registered[1]
    ):
        return list(registered[1])
    created: list[str] = []
    for definition in view_definitions():
        missing = [t for t in definition.tables if t not in existing]
        missing += [v for v in definition.views if v not in created]
        if missing:
            log.info("view %s not created: %s missing", definition.name, ", ".join(missing))
            spark.catalog.dropTempView(definition.name)
            continue
        spark.sql(session_statement(definition, resolver))
        created.append(definition.name)
    _REGISTERED[key[:2]] = (key[2], tuple(created))
    return created


def _use_schema(spark: SparkSession, resolver: TableResolver) -> None:
    """Make the tables' schema current, so queries may name tables unqualified."""
    if resolver.catalog:
        spark.catalog.setCurrentCatalog(resolver.catalog)
        spark.catalog.setCurrentDatabase(resolver.schema)
    elif resolver.register and spark.catalog.databaseExists(resolver.schema):
        spark.catalog.setCurrentDatabase(resolver.schema)


# --- queries -----------------------------------------------------------------------------------


def error_line(exc: BaseException) -> str:
    """The first non-blank line of a Spark error (its class and message, no stack trace)."""
    from py4j.protocol import Py4JJavaError

    text = str(exc.java_exception.getMessage()) if isinstance(exc, Py4JJavaError) else str(exc)
    return next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)


def _spark_errors() -> tuple[type[BaseException], ...]:
    from py4j.protocol import Py4JJavaError
    from pyspark.errors import PySparkException

    return (PySparkException, Py4JJavaError)


QUERY_CONTEXT_LOGGERS = ("SQLQueryContextLogger", "DataFrameQueryContextLogger")
"""PySpark's loggers that print every failed query's error with its JVM stack trace (as
JSON, at ERROR): silenced while a user's query runs, whose error is raised in one line."""


@contextmanager
def _quiet_query_errors() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in QUERY_CONTEXT_LOGGERS]
    saved = [logger.disabled for logger in loggers]
    for logger in loggers:
        logger.disabled = True
    try:
        yield
    finally:
        for logger, disabled in zip(loggers, saved):
            logger.disabled = disabled


def _readable(action: Callable[[], T]) -> T:
    """``action()`` with Spark's errors turned into ``ValueError(<first line>)``."""
    try:
        with _quiet_query_errors():
            return action()
    except _spark_errors() as exc:
        raise ValueError(error_line(exc)) from None


def check_query(query: str) -> str:
    """The query, stripped; ``ValueError`` unless it is one statement that reads
    (starts with one of ``QUERY_KEYWORDS``)."""
    text = query.strip().rstrip(";").strip()
    if not text:
        raise ValueError("empty query")
    if len(split_statements(text)) > 1:
        raise ValueError("one statement at a time")
    first = re.match(r"\(*\s*(\w+)", strip_comments(text).strip())
    if first is None or first.group(1).upper() not in QUERY_KEYWORDS:
        word = first.group(1) if first is not None else text[:20]
        raise ValueError(f"refinex sql runs one query, a statement starting with {', '.join(QUERY_KEYWORDS)}; "
                         f"not {word!r}")
    return text


def run_query(spark: SparkSession, tables: "TableResolver | str", query: str) -> DataFrame:
    """Register the views, make the tables' schema current and run one query.

    Tables and views can be named unqualified (``SELECT * FROM stats_by_source``). A bad
    query raises ``ValueError`` with Spark's one-line message.
    """
    resolver = as_resolver(tables)
    text = check_query(query)
    register_views(spark, resolver)
    _use_schema(spark, resolver)
    return _readable(lambda: spark.sql(text))


# --- output ------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A JSON-ready value: rows and maps as objects, times as ISO text, decimals as numbers,
    bytes as base64, non-finite floats as null."""
    if isinstance(value, Row):
        return {k: _plain(v) for k, v in value.asDict().items()}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _csv_value(value: Any) -> Any:
    plain = _plain(value)
    if plain is None:
        return ""
    if isinstance(plain, bool):
        return "true" if plain else "false"
    if isinstance(plain, (dict, list)):
        return json.dumps(plain, ensure_ascii=False, sort_keys=True)
    return plain


def write_output(df: DataFrame, path: str) -> dict[str, Any]:
    """Write every row of ``df`` to ``path``; the suffix picks the format.

    - ``.csv`` (with a header) and ``.jsonl`` (one object per row): one file on the driver,
      streamed partition by partition (``toLocalIterator``), so any size fits in memory;
      nested values are JSON in CSV cells.
    - ``.parquet``: written by Spark (a folder of part files, replaced if it exists), on the
      driver or an object store; pandas, pyarrow and Spark read the folder as one table.

    Returns the path, format and number of rows.
    """
    suffix = next((s for s in OUTPUT_FORMATS if path.lower().endswith(s)), None)
    if suffix is None:
        raise ValueError(f"output must end with {', '.join(OUTPUT_FORMATS)}: {path!r}")
    if suffix == ".parquet":
        location = spark_location(path)
        df.write.mode("overwrite").parquet(location)
        rows = df.sparkSession.read.parquet(location).count()
        return {"output": location, "format": "parquet", "rows": rows}
    local = driver_path(path)
    if local is None:
        raise ValueError(f"{suffix} output is one file on the driver; {path!r} is on an object store (use .parquet)")
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.tmp")
    columns = df.columns
    rows = 0
    with tmp.open("w", encoding="utf-8", newline="") as handle:
        if suffix == ".csv":
            writer = csv.writer(handle)
            writer.writerow(columns)
            for row in df.toLocalIterator(prefetchPartitions=True):
                writer.writerow([_csv_value(v) for v in row])
                rows += 1
        else:
            for row in df.toLocalIterator(prefetchPartitions=True):
                record = {c: _plain(v) for c, v in zip(columns, row)}
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                rows += 1
    tmp.replace(local)
    return {"output": str(local), "format": suffix[1:], "rows": rows}


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (Row, dict, list, tuple)):
        text = json.dumps(_plain(value), ensure_ascii=False, sort_keys=True)
    else:
        text = str(value)
    return text.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float, Decimal)) and not isinstance(value, bool)


def format_table(rows: Iterable[Sequence[Any]], columns: Sequence[str], max_width: int = DEFAULT_MAX_WIDTH) -> str:
    """A plain text table: a header, a rule and one line per row; numbers right-aligned,
    NULL for nulls, line breaks shown as ``\\n``, values longer than ``max_width`` cut with …."""
    if max_width < 2:
        raise ValueError("max_width must be at least 2")

    def cut(text: str) -> str:
        return text if len(text) <= max_width else text[: max_width - 1] + "…"

    header = [cut(str(c)) for c in columns]
    body = [[(cut(_cell(v)), _numeric(v)) for v in row] for row in rows]
    widths = [len(h) for h in header]
    for row in body:
        for i, (text, _) in enumerate(row):
            widths[i] = max(widths[i], len(text))
    lines = [" | ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(),
             "-+-".join("-" * w for w in widths)]
    for row in body:
        cells = [text.rjust(w) if numeric else text.ljust(w) for (text, numeric), w in zip(row, widths)]
        lines.append(" | ".join(cells).rstrip())
    return "\n".join(lines)


def sql_command(
    ctx: "StageContext", query: str, output: Optional[str] = None, limit: int = DEFAULT_LIMIT,
    max_width: int = DEFAULT_MAX_WIDTH,
) -> dict[str, Any]:
    """``refinex sql QUERY [--output FILE]`` over the context's tables (its ``spark`` and
    ``tables``).

    Without ``output``: the first ``limit`` rows, as values (``columns``, ``rows``) and as a
    terminal table; with it: every row written by :func:`write_output`. ``text`` is what to
    print either way. A bad query raises ``ValueError`` with one readable line.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    df = run_query(ctx.spark, ctx.tables, query)
    columns = list(df.columns)
    if output is not None:
        written = _readable(lambda: write_output(df, output))
        return {"query": query, "columns": columns, "output": written["output"], "format": written["format"],
                "rows_written": written["rows"],
                "text": f"{written['rows']:,} rows written to {written['output']} ({written['format']})"}
    fetched = _readable(lambda: df.limit(limit + 1).collect())
    shown = [list(row) for row in fetched[:limit]]
    truncated = len(fetched) > limit
    footer = f"(first {limit:,} rows; more exist: add LIMIT or --output)" if truncated else f"({len(shown):,} rows)"
    return {"query": query, "columns": columns, "rows": shown, "truncated": truncated,
            "text": format_table(shown, columns, max_width) + "\n" + footer}
