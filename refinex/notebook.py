"""Helpers for the notebooks in ``notebooks/`` (Databricks source format), and a local runner.

The notebooks call :func:`attach` first. On Databricks it takes the notebook's ``spark`` and
the ``databricks`` profile; elsewhere it builds a local Spark + Delta session with
``get_spark(load_config(profile or "default"), workdir)``. Either way it resolves where the
tables live (``resolver_for``), registers path tables as ``refinex.<table>``, makes the
tables' schema the session's current one (so SQL cells say ``FROM edit_stats``), registers
two SQL functions over the real program parser and executor (never ``eval``):

- ``refinex_removed_strings(program)``: the texts of the program's ``remove_str`` operations;
- ``refinex_removed_lines(program, text)``: the lines its accepted ``remove_lines`` delete,

and finds the MLflow tracking URI of the run (``sqlite:///<workdir>/mlflow.db`` locally).

:func:`widget` reads a parameter: ``dbutils.widgets`` when there is one (creating the widget
with its default), else ``$REFINEX_NB_<NAME>``, else the default. :func:`show` displays a
DataFrame, a matplotlib figure or HTML on Databricks and prints or saves it locally.

:func:`run_notebook` executes a Databricks-source notebook top to bottom in one namespace:
Python cells as code, ``%md`` cells skipped, ``%sql`` cells through ``spark.sql`` with
widget parameters substituted as Databricks does (``${name}``: the widget's value as text;
``:name``: a named parameter marker bound to the value, a string), the last SQL result
bound to ``_sqldf``; ``spark``, ``dbutils`` (widgets only), ``display`` and ``displayHTML``
are provided. A failing cell raises :class:`NotebookError` with its number and source.
"""
from __future__ import annotations

import html
import io
import os
import re
import sys
import time
from bisect import insort
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional, Sequence

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from refinex.config import Config
    from refinex.spark.tables import TableResolver

__all__ = [
    "Cell",
    "DeletionMarks",
    "NotebookContext",
    "NotebookError",
    "attach",
    "deletion_marks",
    "env_name",
    "on_databricks",
    "parse_notebook",
    "register_functions",
    "render_explorer",
    "run_notebook",
    "show",
    "sql_parameters",
    "widget",
]

DATABRICKS_PROFILE = "databricks"
LOCAL_PROFILE = "default"
LOCAL_WORKDIR = "work/demo"
REPORTS_SUBDIR = ("reports", "notebooks")
ENV_PREFIX = "REFINEX_NB_"
HEADER = "# Databricks notebook source"
SEPARATOR = "# COMMAND ----------"
MAGIC = "# MAGIC"


class NotebookError(RuntimeError):
    """A notebook cell failed (or the notebook is not in Databricks source format)."""


def on_databricks() -> bool:
    """True inside a Databricks Runtime (notebooks and jobs)."""
    return "DATABRICKS_RUNTIME_VERSION" in os.environ


def env_name(name: str) -> str:
    """``REFINEX_NB_<NAME>``: the environment variable a widget falls back on."""
    return ENV_PREFIX + re.sub(r"[^A-Za-z0-9]", "_", name).upper()


# --- the notebook's globals: the runner's stand-ins, else IPython's user namespace ----------

_RUNNER: Optional["_Runner"] = None
"""The local runner executing a notebook now (its dbutils and display stand-ins)."""


def _user_namespace() -> Mapping[str, Any]:
    """The interactive namespace (Databricks notebooks run in IPython), else ``{}``."""
    try:
        from IPython import get_ipython  # type: ignore[import-not-found]
    except ImportError:
        return {}
    shell = get_ipython()
    return getattr(shell, "user_ns", None) or {}


def _global(name: str) -> Any:
    if _RUNNER is not None:
        return _RUNNER.namespace.get(name)
    return _user_namespace().get(name)


# --- widgets --------------------------------------------------------------------------------


def widget(name: str, default: str = "", choices: Optional[Sequence[str]] = None, label: Optional[str] = None) -> str:
    """The value of parameter ``name`` (a string).

    With ``dbutils`` (Databricks, or the local runner's stand-in) the widget is created
    (a dropdown when ``choices`` is given, else a text box) and its value read; without it,
    ``$REFINEX_NB_<NAME>``, else ``default``.
    """
    dbutils = _global("dbutils")
    if dbutils is not None:
        try:
            if choices:
                dbutils.widgets.dropdown(name, default, list(choices), label or name)
            else:
                dbutils.widgets.text(name, default, label or name)
        except Exception:  # noqa: BLE001 - a widget that already exists keeps its value
            pass
        return str(dbutils.widgets.get(name))
    value = os.environ.get(env_name(name), default)
    if choices and value not in choices:
        raise ValueError(f"widget {name}: {value!r} is not one of {list(choices)}")
    return value


class _Widgets:
    """``dbutils.widgets`` for the local runner: values from the run's parameters, else
    ``$REFINEX_NB_<NAME>``, else the default the notebook gave when it created the widget."""

    def __init__(self, params: Mapping[str, Any]) -> None:
        self._params = {str(k): "" if v is None else str(v) for k, v in params.items()}
        self._defaults: dict[str, str] = {}
        self._choices: dict[str, list[str]] = {}

    def _define(self, name: str, default: str, choices: Optional[Sequence[str]] = None) -> None:
        if choices is not None:
            choices = [str(c) for c in choices]
            if str(default) not in choices:
                raise ValueError(f"widget {name}: default {default!r} is not one of {choices}")
            self._choices[name] = choices
        self._defaults.setdefault(name, str(default))
        value = self.get(name)
        if choices is not None and value not in choices:
            raise ValueError(f"widget {name}: {value!r} is not one of {choices}")

    def text(self, name: str, defaultValue: str = "", label: Optional[str] = None) -> None:  # noqa: N803
        self._define(name, defaultValue)

    def dropdown(self, name: str, defaultValue: str, choices: Sequence[str], label: Optional[str] = None) -> None:  # noqa: N803
        self._define(name, defaultValue, choices)

    def combobox(self, name: str, defaultValue: str, choices: Sequence[str], label: Optional[str] = None) -> None:  # noqa: N803
        self._define(name, defaultValue)

    def multiselect(self, name: str, defaultValue: str, choices: Sequence[str], label: Optional[str] = None) -> None:  # noqa: N803
        self._define(name, defaultValue)

    def get(self, name: str) -> str:
        if name in self._params:
            return self._params[name]
        env = os.environ.get(env_name(name))
        if env is not None:
            return env
        if name in self._defaults:
            return self._defaults[name]
        raise NotebookError(f"InputWidgetNotDefined: no widget named {name!r} (and no parameter of that name)")

    def getAll(self) -> dict[str, str]:  # noqa: N802 - Databricks' name
        names = {*self._defaults, *self._params}
        return {name: self.get(name) for name in sorted(names)}

    def remove(self, name: str) -> None:
        self._defaults.pop(name, None)
        self._choices.pop(name, None)

    def removeAll(self) -> None:  # noqa: N802 - Databricks' name
        self._defaults.clear()
        self._choices.clear()

    def has(self, name: str) -> bool:
        return name in self._params or name in self._defaults or env_name(name) in os.environ


class _DBUtils:
    """The part of ``dbutils`` the notebooks use: ``widgets``."""

    def __init__(self, params: Mapping[str, Any]) -> None:
        self.widgets = _Widgets(params)


# --- the context ----------------------------------------------------------------------------


@dataclass
class NotebookContext:
    """What a notebook works with, from :func:`attach`."""

    spark: "SparkSession"
    config: "Config"
    tables: "TableResolver"
    workdir: str
    tracking_uri: Optional[str]
    local: bool
    registered: list[str] = field(default_factory=list)

    def sql_name(self, table: str) -> str:
        """The quoted SQL name of a table (``\\`refinex\\`.\\`edit_stats\\``` locally, three
        parts in Unity Catalog), for SQL built in Python cells."""
        return self.tables.name(table)

    @property
    def schema_name(self) -> str:
        """The quoted schema the tables are in (what :func:`attach` makes current)."""
        if self.tables.catalog:
            return f"`{self.tables.catalog}`.`{self.tables.schema}`"
        return f"`{self.tables.schema}`"

    def table(self, table: str) -> "DataFrame":
        """The Delta table as a DataFrame."""
        from refinex.spark.tables import read_table

        return read_table(self.spark, self.tables, table)

    @property
    def registry_uri(self) -> Optional[str]:
        """``model.registry_uri``, else the tracking URI."""
        return self.config.model.registry_uri or self.tracking_uri

    @property
    def reports_dir(self) -> Optional[Path]:
        """``<workdir>/reports/notebooks`` on this machine when running locally (created on
        first use); None on Databricks, where results are displayed instead."""
        from refinex.locations import driver_path

        if not self.local:
            return None
        root = driver_path(self.workdir)
        return None if root is None else root.joinpath(*REPORTS_SUBDIR)

    def report_path(self, name: str) -> Optional[Path]:
        """Where a local report file goes (None on Databricks)."""
        folder = self.reports_dir
        if folder is None:
            return None
        folder.mkdir(parents=True, exist_ok=True)
        return folder / name

    def show(self, obj: Any, name: Optional[str] = None) -> Optional[Path]:
        """:func:`show`, saving files under :attr:`reports_dir` locally."""
        return show(obj, name, folder=self.reports_dir)


def attach(
    workdir: Optional[str] = None,
    profile: Optional[str] = None,
    spark: Optional["SparkSession"] = None,
    use_schema: bool = True,
    functions: bool = True,
    overrides: "str | Sequence[str] | None" = None,
) -> NotebookContext:
    """Connect a notebook to a refinex workdir (see the module docstring).

    ``workdir`` empty: the profile's ``workdir``, else ``work/demo``. ``profile`` empty:
    ``databricks`` on Databricks, else ``default``. ``overrides``: ``section.key=value``
    settings on top of the profile, as a list or one string (split like a shell line:
    ``"tables.catalog=dev model.registered_name=dev.refinex.refinex_refiner"``). ``spark``:
    the session to use (the notebook's); otherwise the active one on Databricks, a local one
    elsewhere. ``use_schema`` makes the tables' schema the current one; ``functions``
    registers the SQL functions.
    """
    from refinex.config import load_config
    from refinex.locations import is_local
    from refinex.spark.tables import register_tables, resolver_for

    databricks = on_databricks()
    if isinstance(overrides, str):
        import shlex

        overrides = shlex.split(overrides)
    config = load_config(profile or (DATABRICKS_PROFILE if databricks else LOCAL_PROFILE), list(overrides or ()) or None)
    chosen = workdir or config.workdir or LOCAL_WORKDIR
    if spark is None:
        from refinex.spark.session import get_spark

        spark = get_spark(config, chosen)
    resolver = resolver_for(config, chosen)
    tracking_uri = _tracking_uri(config, chosen, databricks)
    if tracking_uri and not config.model.tracking_uri and not is_local(chosen):
        # promote() and the registry helpers read it from the configuration.
        config = config.with_overrides({"model.tracking_uri": tracking_uri})
    registered = register_tables(spark, resolver)
    if use_schema:
        if resolver.catalog:
            spark.sql(f"USE CATALOG `{resolver.catalog}`")
            spark.sql(f"USE SCHEMA `{resolver.schema}`")
        else:
            spark.sql(f"CREATE DATABASE IF NOT EXISTS `{resolver.schema}`")
            spark.sql(f"USE `{resolver.schema}`")
    if functions:
        register_functions(spark)
    return NotebookContext(spark, config, resolver, chosen, tracking_uri, not databricks, registered)


def _tracking_uri(config: "Config", workdir: str, databricks: bool) -> Optional[str]:
    from refinex.spark.train import tracking_uri_for

    try:
        return tracking_uri_for(config, workdir)
    except ValueError:
        return "databricks" if databricks else None


# --- display --------------------------------------------------------------------------------


def _is_html(obj: Any) -> bool:
    return isinstance(obj, str) and obj.lstrip()[:1] == "<"


def show(obj: Any, name: Optional[str] = None, folder: Optional[Path] = None) -> Optional[Path]:
    """Display ``obj``: a Spark or pandas DataFrame, a matplotlib figure, or HTML text.

    On Databricks (or under the runner) with the notebook's ``display``/``displayHTML``;
    otherwise DataFrames are printed. With ``folder`` and ``name`` a figure is saved as PNG
    and HTML as a file there; returns the file written, if any.
    """
    path: Optional[Path] = None
    if folder is not None and name:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        if hasattr(obj, "savefig"):
            obj.savefig(path, dpi=110, bbox_inches="tight")
        elif isinstance(obj, str):
            path.write_text(obj, encoding="utf-8")
        else:
            path = None
    if _is_html(obj):
        display_html = _global("displayHTML")
        if display_html is not None:
            display_html(obj)
        elif path is None:
            print(obj)
    else:
        display = _global("display")
        if display is not None and (on_databricks() or _RUNNER is not None):
            display(obj)
        else:
            print(_text_of(obj))
    if path is not None and not on_databricks():
        print(f"wrote {path}")
    return path


def _text_of(obj: Any, rows: int = 20) -> str:
    if hasattr(obj, "limit") and hasattr(obj, "toPandas"):  # Spark DataFrame
        obj = obj.limit(rows).toPandas()
    if hasattr(obj, "to_string"):
        import pandas as pd

        with pd.option_context("display.max_colwidth", 60, "display.width", 200):
            return str(obj.head(rows).to_string())
    if hasattr(obj, "savefig"):
        return f"<figure {getattr(obj, 'number', '')}>"
    return str(obj)


# --- deletions: which lines and spans a program deletes --------------------------------------


@dataclass(frozen=True)
class DeletionMarks:
    """What executing a program deletes from each line of ``raw.split("\\n")``.

    ``removed``: line ids deleted whole (accepted ``remove_lines``); ``spans``: per line,
    the sorted half-open character spans its accepted ``remove_str`` delete. ``status`` and
    ``text`` are those of ``refinex.program.execute`` (``fallback_raw`` keeps the raw
    text, ``dropped`` deletes all of it: the marks still say what the program asked for).
    """

    lines: tuple[str, ...]
    removed: frozenset[int]
    spans: Mapping[int, tuple[tuple[int, int], ...]]
    status: str
    text: str
    rejected: tuple[str, ...]
    parse_errors: tuple[str, ...]


def deletion_marks(program_text: str, raw: str, guardrails: Any = None) -> DeletionMarks:
    """The deletions of ``program_text`` on ``raw``, with the semantics of
    ``refinex.program.execute`` (accepted ``remove_lines`` first, then ``remove_str`` on
    the first free occurrence)."""
    from refinex.program import Guardrails, RemoveLines, RemoveStr, execute, parse
    from refinex.program.execute import find_free

    program = parse(program_text or "")
    result = execute(program, raw, guardrails or Guardrails())
    lines = raw.split("\n")
    n = len(lines)
    removed: set[int] = set()
    ranges: list[tuple[int, int]] = []
    for op in program.ops:
        if isinstance(op, RemoveLines) and 0 <= op.start <= op.end < n:
            if not any(start <= op.end and op.start <= end for start, end in ranges):
                ranges.append((op.start, op.end))
                removed.update(range(op.start, op.end + 1))
    spans: dict[int, list[tuple[int, int]]] = {}
    for op in program.ops:
        if isinstance(op, RemoveStr) and 0 <= op.line < n and op.text and op.line not in removed:
            line_spans = spans.setdefault(op.line, [])
            position, _ = find_free(lines[op.line], op.text, line_spans)
            if position is not None:
                insort(line_spans, (position, position + len(op.text)))
    from refinex.program import render_op

    return DeletionMarks(
        lines=tuple(lines),
        removed=frozenset(removed),
        spans={k: tuple(v) for k, v in spans.items() if v},
        status=result.status,
        text=result.text,
        rejected=tuple(f"{render_op(r.op)}: {r.reason}" for r in result.ops_rejected),
        parse_errors=tuple(f"line {e.line_no}: {e.message}" for e in program.errors),
    )


def _removed_strings(program: Optional[str]) -> list[str]:
    from refinex.program import RemoveStr, parse

    if not program:
        return []
    return [op.text for op in parse(program).ops if isinstance(op, RemoveStr)]


def _removed_lines(program: Optional[str], text: Optional[str]) -> list[str]:
    if not program or text is None:
        return []
    marks = deletion_marks(program, text)
    return [marks.lines[i] for i in sorted(marks.removed)]


def register_functions(spark: "SparkSession") -> list[str]:
    """Register ``refinex_removed_strings(program)`` and ``refinex_removed_lines(program,
    text)`` (Python UDFs over the real parser) for SQL cells; returns their names."""
    from pyspark.sql.types import ArrayType, StringType

    strings = ArrayType(StringType())
    spark.udf.register("refinex_removed_strings", _removed_strings, strings)
    spark.udf.register("refinex_removed_lines", _removed_lines, strings)
    return ["refinex_removed_strings", "refinex_removed_lines"]


# --- the program explorer's HTML ------------------------------------------------------------

_EXPLORER_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 16px; color: #1f2328; }
h1 { font-size: 20px; margin: 0 0 4px 0; }
.sub { color: #57606a; font-size: 13px; margin-bottom: 16px; }
.doc { border: 1px solid #d0d7de; border-radius: 6px; margin: 0 0 24px 0; }
.head { background: #f6f8fa; padding: 8px 12px; border-bottom: 1px solid #d0d7de; font-size: 13px; }
.head .id { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-weight: 600; font-size: 14px; }
.head .meta { color: #57606a; margin-left: 8px; }
.head a { color: #0969da; text-decoration: none; word-break: break-all; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; font-weight: 600;
         margin-left: 8px; background: #ddf4ff; color: #0550ae; }
.badge.refined { background: #dafbe1; color: #116329; }
.badge.unchanged { background: #eaeef2; color: #57606a; }
.badge.dropped, .badge.fallback_raw, .badge.expert_failed, .badge.no_program { background: #ffebe9; color: #a40e26; }
.grid { display: grid; grid-template-columns: minmax(0, 5fr) minmax(0, 4fr) minmax(0, 3fr); gap: 0; }
.col { min-width: 0; border-right: 1px solid #d0d7de; }
.col:last-child { border-right: none; }
.col h3 { font-size: 12px; text-transform: uppercase; letter-spacing: .04em; color: #57606a; margin: 0;
          padding: 6px 10px; border-bottom: 1px solid #d0d7de; background: #fbfcfd; }
.scroll { max-height: 560px; overflow: auto; }
table.lines { border-collapse: collapse; width: 100%; font-family: ui-monospace, SFMono-Regular, Menlo, Consolas,
              monospace; font-size: 12px; }
table.lines td { padding: 0 8px; vertical-align: top; white-space: pre-wrap; word-break: break-word; }
table.lines td.n { color: #8c959f; text-align: right; user-select: none; width: 1%; white-space: nowrap;
                   border-right: 1px solid #eaeef2; }
tr.del td.t { background: #ffebe9; color: #82071e; text-decoration: line-through; text-decoration-color: #cf222e88; }
tr.del td.n { background: #ffd7d5; color: #a40e26; }
tr.part td.n { background: #fff8c5; }
span.cut { background: #ffcecb; color: #82071e; text-decoration: line-through; }
pre.program { margin: 0; padding: 8px 10px; font-size: 12px; white-space: pre-wrap; word-break: break-word;
              font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.note { padding: 6px 10px; font-size: 12px; color: #9a6700; background: #fff8c5; border-bottom: 1px solid #d0d7de; }
.legend { font-size: 12px; color: #57606a; margin-bottom: 12px; }
.legend span { padding: 0 6px; margin-right: 8px; }
.index { font-size: 12px; margin-bottom: 16px; display: flex; flex-wrap: wrap; gap: 4px 16px; }
.index a { color: #0969da; text-decoration: none; font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.index .meta { color: #57606a; }
.empty { padding: 8px 10px; color: #8c959f; font-style: italic; font-size: 12px; }
"""

_STAT_KEYS = (("deletion_ratio", "deletion ratio", "{:.3f}"), ("ops_total", "ops", "{}"),
              ("lines_removed", "lines removed", "{}"), ("chars_removed", "chars removed", "{:,}"))


def _e(value: Any) -> str:
    """Escaped text (every document field is untrusted HTML)."""
    return html.escape("" if value is None else str(value), quote=True)


def _safe_href(url: Any) -> Optional[str]:
    text = "" if url is None else str(url).strip()
    return text if re.match(r"^https?://", text, re.IGNORECASE) else None


def _line_cells(line: str, spans: Sequence[tuple[int, int]]) -> str:
    if not spans:
        return _e(line)
    pieces, cursor = [], 0
    for start, end in spans:
        pieces.append(_e(line[cursor:start]))
        pieces.append(f'<span class="cut">{_e(line[start:end])}</span>')
        cursor = end
    pieces.append(_e(line[cursor:]))
    return "".join(pieces)


def _more(hidden: int) -> str:
    return f'<div class="empty">… {hidden:,} more line{"s" if hidden != 1 else ""} not shown</div>' if hidden > 0 else ""


def _raw_table(marks: Optional[DeletionMarks], raw: str, max_lines: Optional[int] = None) -> str:
    lines = marks.lines if marks is not None else tuple(raw.split("\n"))
    shown = lines if max_lines is None else lines[:max_lines]
    rows = []
    for index, line in enumerate(shown):
        spans = marks.spans.get(index, ()) if marks is not None else ()
        css = "del" if marks is not None and index in marks.removed else ("part" if spans else "")
        rows.append(f'<tr class="{css}"><td class="n">{index}</td><td class="t">{_line_cells(line, spans)}</td></tr>')
    return f'<table class="lines">{"".join(rows)}</table>{_more(len(lines) - len(shown))}'


def _kept_ids(marks: Optional[DeletionMarks], text: Optional[str]) -> Optional[list[int]]:
    """The raw line id of each line of the refined text, when it is the program's output."""
    if marks is None or text is None or text != marks.text or marks.status not in ("refined", "unchanged"):
        return None
    return [i for i in range(len(marks.lines)) if i not in marks.removed]


def _plain_table(text: Optional[str], max_lines: Optional[int] = None, ids: Optional[Sequence[int]] = None) -> str:
    if text is None:
        return '<div class="empty">no refined text</div>'
    if text == "":
        return '<div class="empty">(empty: everything deleted)</div>'
    lines = text.split("\n")
    shown = lines if max_lines is None else lines[:max_lines]
    numbers = ids if ids is not None and len(ids) == len(lines) else range(len(lines))
    rows = [f'<tr><td class="n">{n}</td><td class="t">{_e(line)}</td></tr>' for n, line in zip(numbers, shown)]
    return f'<table class="lines">{"".join(rows)}</table>{_more(len(lines) - len(shown))}'


def render_explorer(
    docs: Sequence[Mapping[str, Any]], title: str = "Program explorer", subtitle: str = "",
    max_lines: Optional[int] = None,
) -> str:
    """A self-contained HTML page: per document, the raw text with deleted lines and spans
    marked, the refined text and the program side by side.

    Each doc maps ``doc_id``, ``text`` (raw), ``refined_text``, ``program``, ``status`` and
    optionally ``source``, ``url``, ``origin``, ``origin_version`` and edit statistics
    (``deletion_ratio``, ``ops_total``, ``lines_removed``, ``chars_removed``). All of them
    are escaped. ``max_lines`` caps the lines shown per text (the marks are computed on all).
    """
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8"><title>', _e(title), "</title><style>", _EXPLORER_CSS,
        "</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<div class="sub">{_e(subtitle)}</div>' if subtitle else "",
        '<div class="legend"><span style="background:#ffebe9;color:#82071e;text-decoration:line-through">'
        'deleted line</span><span class="cut">deleted string</span>'
        '<span style="background:#fff8c5">line with a deleted string</span></div>',
    ]
    if not docs:
        parts.append('<div class="empty">no documents</div>')
    else:
        items = []
        for doc in docs:
            ratio = doc.get("deletion_ratio")
            extra = f" · {float(ratio):.3f}" if ratio is not None else ""
            items.append(f'<a href="#{_e(doc.get("doc_id"))}">{_e(doc.get("doc_id"))}</a>'
                         f'<span class="meta"> {_e(doc.get("status") or "")}{_e(extra)}</span>')
        parts.append(f'<div class="index">{"".join(f"<span>{item}</span>" for item in items)}</div>')
    for doc in docs:
        raw = doc.get("text") or ""
        program = doc.get("program")
        marks = deletion_marks(program, raw) if program is not None else None
        status = str(doc.get("status") or (marks.status if marks else ""))
        meta = [f'<span class="id">{_e(doc.get("doc_id"))}</span>',
                f'<span class="badge {_e(re.sub(r"[^a-z_]", "", status))}">{_e(status)}</span>']
        details = [str(doc[k]) for k in ("origin", "origin_version") if doc.get(k)]
        if doc.get("source"):
            details.append(f"source {doc['source']}")
        if doc.get("shard") is not None:
            details.append(f"shard {doc['shard']}")
        for key, label, fmt in _STAT_KEYS:
            if doc.get(key) is not None:
                details.append(f"{label} {fmt.format(doc[key])}")
        meta.append(f'<span class="meta">{_e(" · ".join(details))}</span>')
        href = _safe_href(doc.get("url"))
        if doc.get("url"):
            link = (f'<a href="{_e(href)}" target="_blank" rel="noopener noreferrer nofollow">{_e(doc["url"])}</a>'
                    if href else _e(doc["url"]))
            meta.append(f"<div>{link}</div>")
        notes = []
        if marks is not None and marks.status == "fallback_raw":
            notes.append("fallback_raw: too many invalid operations, the raw text was kept (marks show what the "
                         "program asked for)")
        if marks is not None and marks.status == "dropped":
            notes.append("dropped: too little text was left, the document was dropped")
        if marks is not None and (marks.rejected or marks.parse_errors):
            notes.append("invalid operations: " + "; ".join([*marks.rejected, *marks.parse_errors]))
        note_html = "".join(f'<div class="note">{_e(n)}</div>' for n in notes)
        n_lines = len(marks.lines) if marks else len(raw.split("\n"))
        removed = len(marks.removed) if marks else 0
        ids = _kept_ids(marks, doc.get("refined_text"))
        program_html = (f'<pre class="program">{_e(program)}</pre>' if program is not None
                        else '<div class="empty">no program</div>')
        parts.append(
            f'<div class="doc" id="{_e(doc.get("doc_id"))}"><div class="head">{"".join(meta)}</div>{note_html}'
            '<div class="grid">'
            f'<div class="col"><h3>Raw ({n_lines} lines, {removed} deleted)</h3>'
            f'<div class="scroll">{_raw_table(marks, raw, max_lines)}</div></div>'
            f'<div class="col"><h3>Refined{" (raw line ids)" if ids is not None else ""}</h3>'
            f'<div class="scroll">{_plain_table(doc.get("refined_text"), max_lines, ids)}</div></div>'
            f'<div class="col"><h3>Program</h3><div class="scroll">{program_html}</div></div>'
            "</div></div>"
        )
    parts.append("</body></html>")
    return "".join(parts)


# --- the local runner -----------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One cell of a Databricks-source notebook: ``kind`` is python, sql, md or another magic."""

    index: int  # 1-based, as Databricks numbers them
    kind: str
    source: str  # without the ``# MAGIC`` prefixes and the magic line
    title: Optional[str] = None


_MAGIC_LINE = re.compile(r"^%(\S+)\s*(.*)$", re.DOTALL)


def parse_notebook(text: str) -> list[Cell]:
    """The cells of a notebook in Databricks source format."""
    lines = text.replace("\r\n", "\n").split("\n")
    if not lines or lines[0].strip() != HEADER:
        raise NotebookError(f"not a Databricks source notebook (first line is not {HEADER!r})")
    chunks: list[list[str]] = [[]]
    for line in lines[1:]:
        if line.strip() == SEPARATOR:
            chunks.append([])
        else:
            chunks[-1].append(line)
    cells = []
    for number, chunk in enumerate(chunks, start=1):
        title = None
        body = list(chunk)
        while body and not body[0].strip():
            body.pop(0)
        if body and body[0].startswith("# DBTITLE"):
            title = body.pop(0).split(",", 1)[-1].strip()
        while body and not body[-1].strip():
            body.pop()
        if not body:
            continue
        if all(line.startswith(MAGIC) for line in body):
            stripped = [line[len(MAGIC) + 1 :] if line.startswith(MAGIC + " ") else line[len(MAGIC) :] for line in body]
            match = _MAGIC_LINE.match(stripped[0].strip())
            if match is None:
                raise NotebookError(f"cell {number}: a # MAGIC cell must start with a %magic")
            kind = match.group(1)
            rest = [match.group(2)] if match.group(2) else []
            cells.append(Cell(number, "python" if kind == "python" else kind, "\n".join(rest + stripped[1:]), title))
        else:
            cells.append(Cell(number, "python", "\n".join(body), title))
    return cells


def _scan_sql(sql: str) -> Iterator[tuple[str, str]]:
    """``(kind, text)`` pieces of SQL: ``code``, ``string`` (quoted, backticks included),
    ``comment``; quotes honour backslash escapes as Spark SQL does."""
    i, n, start = 0, len(sql), 0
    while i < n:
        ch = sql[i]
        if ch in "'\"`":
            if i > start:
                yield "code", sql[start:i]
            j = i + 1
            while j < n and sql[j] != ch:
                j += 2 if sql[j] == "\\" and ch != "`" else 1
            yield "string", sql[i : j + 1]
            i = start = j + 1
        elif sql.startswith("--", i):
            if i > start:
                yield "code", sql[start:i]
            j = sql.find("\n", i)
            j = n if j < 0 else j
            yield "comment", sql[i:j]
            i = start = j
        elif sql.startswith("/*", i):
            if i > start:
                yield "code", sql[start:i]
            j = sql.find("*/", i + 2)
            j = n if j < 0 else j + 2
            yield "comment", sql[i:j]
            i = start = j
        else:
            i += 1
    if start < n:
        yield "code", sql[start:]


def _split_statements(sql: str) -> list[str]:
    """Statements of a SQL cell (``;`` outside quotes and comments), empty ones dropped."""
    statements, current = [], []
    for kind, piece in _scan_sql(sql):
        if kind != "code":
            current.append(piece)
            continue
        parts = piece.split(";")
        for index, part in enumerate(parts):
            if index > 0:
                statements.append("".join(current))
                current = []
            current.append(part)
    statements.append("".join(current))
    out = []
    for statement in statements:
        code = "".join(p for k, p in _scan_sql(statement) if k != "comment").strip()
        if code:
            out.append(statement.strip())
    return out


_DOLLAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_.]*)\}")
_MARKER = re.compile(r"(?<![A-Za-z0-9_:\]\)`.]):([A-Za-z_][A-Za-z0-9_]*)")


def sql_parameters(sql: str) -> list[str]:
    """The named parameter markers (``:name``) of a statement, outside quotes and comments
    and not ``::`` casts or ``col:path`` JSON paths."""
    names: list[str] = []
    for kind, piece in _scan_sql(sql):
        if kind == "code":
            for match in _MARKER.finditer(piece):
                if match.group(1) not in names:
                    names.append(match.group(1))
    return names


def _substitute(sql: str, widgets: _Widgets) -> tuple[str, dict[str, str]]:
    """Databricks' widget substitution: ``${name}`` textually (everywhere in the cell),
    then ``:name`` markers bound as string parameters."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if not widgets.has(name):
            if "." in name:  # ${spark.conf.key}: left to Spark's own variable substitution
                return match.group(0)
            raise NotebookError(f"${{{name}}}: no widget named {name!r}")
        return widgets.get(name)

    text = _DOLLAR.sub(value, sql)
    args = {}
    for name in sql_parameters(text):
        if not widgets.has(name):
            raise NotebookError(f":{name}: no widget named {name!r}")
        args[name] = widgets.get(name)
    return text, args


class _Runner:
    def __init__(self, path: Path, namespace: dict[str, Any], dbutils: _DBUtils, out: Any) -> None:
        self.path = path
        self.namespace = namespace
        self.dbutils = dbutils
        self.out = out
        self.displays: list[dict[str, Any]] = []

    def display(self, obj: Any = None, *args: Any, **kwargs: Any) -> None:
        kind = type(obj).__name__
        rows = None
        if hasattr(obj, "limit") and hasattr(obj, "toPandas"):
            frame = obj.limit(20).toPandas()
            rows = len(frame)
            text = _text_of(frame)
        elif hasattr(obj, "savefig"):
            text = f"<matplotlib figure: {len(obj.axes)} axes>"
        else:
            text = _text_of(obj)
        self.displays.append({"kind": kind, "rows": rows})
        print(text, file=self.out)

    def display_html(self, text: str) -> None:
        self.displays.append({"kind": "html", "chars": len(text)})
        print(f"<displayHTML: {len(text):,} characters>", file=self.out)

    def run_sql(self, cell: Cell) -> Any:
        spark = self.namespace["spark"]
        result = None
        for statement in _split_statements(cell.source):
            text, args = _substitute(statement, self.dbutils.widgets)
            result = spark.sql(text, args=args) if args else spark.sql(text)
        if result is not None:
            self.namespace["_sqldf"] = result
            self.display(result)
        return result


@contextmanager
def _active(runner: _Runner) -> Iterator[None]:
    global _RUNNER
    previous, _RUNNER = _RUNNER, runner
    try:
        yield
    finally:
        _RUNNER = previous


def run_notebook(
    path: "str | os.PathLike[str]",
    params: Optional[Mapping[str, Any]] = None,
    spark: Optional["SparkSession"] = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Execute the notebook at ``path`` top to bottom; returns its namespace.

    ``params`` are the widgets' values (as a job would pass them). ``spark``: the session
    the notebook gets as ``spark`` (default: the active one, else a local session for the
    ``profile`` and ``workdir`` parameters). The namespace also holds ``__cells__`` (what
    ran, with seconds) and ``__displays__`` (what was displayed). ``quiet`` discards the
    printed output. matplotlib draws off screen (Agg).
    """
    path = Path(path)
    cells = parse_notebook(path.read_text(encoding="utf-8"))
    params = dict(params or {})
    if spark is None:
        from pyspark.sql import SparkSession

        spark = SparkSession.getActiveSession()
        if spark is None:
            from refinex.config import load_config
            from refinex.spark.session import get_spark

            profile = str(params.get("profile") or LOCAL_PROFILE)
            config = load_config(profile)
            spark = get_spark(config, str(params.get("workdir") or config.workdir or LOCAL_WORKDIR))
    os.environ.setdefault("MPLBACKEND", "Agg")
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        pass
    dbutils = _DBUtils(params)
    out = io.StringIO() if quiet else sys.stdout
    namespace: dict[str, Any] = {"__name__": "__main__", "__file__": str(path)}
    runner = _Runner(path, namespace, dbutils, out)
    namespace.update(spark=spark, dbutils=dbutils, display=runner.display, displayHTML=runner.display_html)
    ran: list[dict[str, Any]] = []
    namespace["__cells__"] = ran
    namespace["__displays__"] = runner.displays
    with _active(runner):
        for cell in cells:
            started = time.perf_counter()
            if cell.kind in ("md", "md-sandbox"):
                continue
            try:
                if cell.kind == "python":
                    code = compile(cell.source, f"{path}:cell{cell.index}", "exec")
                    if quiet:
                        from contextlib import redirect_stdout

                        with redirect_stdout(out):
                            exec(code, namespace)  # noqa: S102 - the notebook's own code
                    else:
                        exec(code, namespace)  # noqa: S102 - the notebook's own code
                elif cell.kind == "sql":
                    runner.run_sql(cell)
                elif cell.kind == "pip":
                    continue  # the local environment has the requirements already
                else:
                    raise NotebookError(f"%{cell.kind} cells are not supported by the local runner")
            except Exception as exc:
                raise NotebookError(
                    f"{path.name}: cell {cell.index} ({cell.kind}) failed: {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}\n--- cell {cell.index} ---\n{cell.source}"
                ) from exc
            ran.append({"cell": cell.index, "kind": cell.kind, "seconds": round(time.perf_counter() - started, 2)})
    return namespace
