"""Run a Databricks-source notebook (``notebooks/*.py``) top to bottom off Databricks, in
tests and on a laptop, as a job would on a cluster::

    python scripts/run_notebook.py notebooks/01_edit_statistics.py workdir=work/demo

A development tool kept outside the ``refinex`` package: it executes the notebook's own
Python cells, and nothing in the package that runs on clusters executes code it reads.

:func:`run_notebook` executes a notebook in one namespace: Python cells as code, ``%md``
cells skipped, ``%sql`` cells through ``spark.sql`` with widget parameters substituted as
Databricks does (``${name}``: the widget's value as text; ``:name``: a named parameter
marker bound to the value, a string), the last SQL result bound to ``_sqldf``; ``spark``,
``dbutils`` (widgets only), ``display`` and ``displayHTML`` are provided. A failing cell
raises :class:`NotebookError` with its number and source.
"""
from __future__ import annotations

import io
import os
import re
import sys
import time
from contextlib import nullcontext, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

from refinex.notebook.context import LOCAL_PROFILE, LOCAL_WORKDIR, env_name, running, text_of
from refinex.spark.views import split_statements, sql_segments

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

HEADER = "# Databricks notebook source"
SEPARATOR = "# COMMAND ----------"
MAGIC = "# MAGIC"


class NotebookError(RuntimeError):
    """A notebook cell failed (or the notebook is not in Databricks source format)."""


# --- dbutils ---------------------------------------------------------------------------------


class _Widgets:
    """``dbutils.widgets`` for the local runner: values from the run's parameters, else
    ``$REFINEX_NB_<NAME>``, else the default the notebook gave when it created the widget."""

    def __init__(self, params: Mapping[str, Any]) -> None:
        self._params = {str(k): "" if v is None else str(v) for k, v in params.items()}
        self._defaults: dict[str, str] = {}

    def _define(self, name: str, default: str, choices: Optional[Sequence[str]] = None) -> None:
        if choices is not None:
            choices = [str(c) for c in choices]
            if str(default) not in choices:
                raise ValueError(f"widget {name}: default {default!r} is not one of {choices}")
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

    def removeAll(self) -> None:  # noqa: N802 - Databricks' name
        self._defaults.clear()

    def has(self, name: str) -> bool:
        return name in self._params or name in self._defaults or env_name(name) in os.environ


class _DBUtils:
    """The part of ``dbutils`` the notebooks use: ``widgets``."""

    def __init__(self, params: Mapping[str, Any]) -> None:
        self.widgets = _Widgets(params)


# --- cells and SQL ---------------------------------------------------------------------------


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


_DOLLAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_.]*)\}")
_MARKER = re.compile(r"(?<![A-Za-z0-9_:\]\)`.]):([A-Za-z_][A-Za-z0-9_]*)")


def sql_parameters(sql: str) -> list[str]:
    """The named parameter markers (``:name``) of a statement, outside quotes and comments
    and not ``::`` casts or ``col:path`` JSON paths."""
    names: list[str] = []
    for kind, piece in sql_segments(sql):
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


# --- the local runner -----------------------------------------------------------------------


class _Runner:
    """One run's ``display``/``displayHTML`` stand-ins and its SQL cells."""

    def __init__(self, namespace: dict[str, Any], dbutils: _DBUtils, out: Any) -> None:
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
            text = text_of(frame)
        elif hasattr(obj, "savefig"):
            text = f"<matplotlib figure: {len(obj.axes)} axes>"
        else:
            text = text_of(obj)
        self.displays.append({"kind": kind, "rows": rows})
        print(text, file=self.out)

    def display_html(self, text: str) -> None:
        self.displays.append({"kind": "html", "chars": len(text)})
        print(f"<displayHTML: {len(text):,} characters>", file=self.out)

    def run_sql(self, cell: Cell) -> Any:
        spark = self.namespace["spark"]
        result = None
        for statement in split_statements(cell.source):
            text, args = _substitute(statement, self.dbutils.widgets)
            result = spark.sql(text, args=args) if args else spark.sql(text)
        if result is not None:
            self.namespace["_sqldf"] = result
            self.display(result)
        return result


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
    runner = _Runner(namespace, dbutils, out)
    namespace.update(spark=spark, dbutils=dbutils, display=runner.display, displayHTML=runner.display_html)
    ran: list[dict[str, Any]] = []
    namespace["__cells__"] = ran
    namespace["__displays__"] = runner.displays
    with running(namespace):
        for cell in cells:
            started = time.perf_counter()
            if cell.kind in ("md", "md-sandbox"):
                continue
            try:
                if cell.kind == "python":
                    code = compile(cell.source, f"{path}:cell{cell.index}", "exec")
                    with redirect_stdout(out) if quiet else nullcontext():
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``run_notebook.py NOTEBOOK [name=value ...]``: the widgets' values as ``name=value``."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebook", help="a notebook in Databricks source format")
    parser.add_argument("params", nargs="*", metavar="name=value", help="widget values")
    args = parser.parse_args(argv)
    params: dict[str, str] = {}
    for item in args.params:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"widget values are name=value, not {item!r}")
        params[name] = value
    try:
        namespace = run_notebook(args.notebook, params)
    except (NotebookError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    seconds = sum(cell["seconds"] for cell in namespace["__cells__"])
    print(f"{args.notebook}: {len(namespace['__cells__'])} cells ran in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
