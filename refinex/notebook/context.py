"""The notebook context: what a notebook in ``notebooks/`` works with, and how it reads
parameters and shows results.

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
DataFrame, a matplotlib figure or HTML on Databricks and prints or saves it locally. Both
find ``dbutils``/``display`` in the notebook's globals: those of the notebook the local
runner executes (see :func:`running`), else IPython's user namespace.
"""
from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional, Sequence

from refinex.notebook.explorer import deletion_marks

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from refinex.config import Config
    from refinex.spark.tables import TableResolver

DATABRICKS_PROFILE = "databricks"
LOCAL_PROFILE = "default"
LOCAL_WORKDIR = "work/demo"
REPORTS_SUBDIR = ("reports", "notebooks")
ENV_PREFIX = "REFINEX_NB_"


def on_databricks() -> bool:
    """True inside a Databricks Runtime (notebooks and jobs)."""
    return "DATABRICKS_RUNTIME_VERSION" in os.environ


def env_name(name: str) -> str:
    """``REFINEX_NB_<NAME>``: the environment variable a widget falls back on."""
    return ENV_PREFIX + re.sub(r"[^A-Za-z0-9]", "_", name).upper()


# --- the notebook's globals: the runner's stand-ins, else IPython's user namespace ----------

_RUNNING: Optional[Mapping[str, Any]] = None
"""The namespace of the notebook the local runner is executing now (its dbutils and display
stand-ins)."""


@contextmanager
def running(namespace: Mapping[str, Any]) -> Iterator[None]:
    """Make ``namespace`` the notebook's globals while the local runner executes it."""
    global _RUNNING
    previous, _RUNNING = _RUNNING, namespace
    try:
        yield
    finally:
        _RUNNING = previous


def _user_namespace() -> Mapping[str, Any]:
    """The interactive namespace (Databricks notebooks run in IPython), else ``{}``."""
    try:
        from IPython import get_ipython  # type: ignore[import-not-found]
    except ImportError:
        return {}
    shell = get_ipython()
    return getattr(shell, "user_ns", None) or {}


def _global(name: str) -> Any:
    if _RUNNING is not None:
        return _RUNNING.get(name)
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
        if display is not None and (on_databricks() or _RUNNING is not None):
            display(obj)
        else:
            print(text_of(obj))
    if path is not None and not on_databricks():
        print(f"wrote {path}")
    return path


def text_of(obj: Any, rows: int = 20) -> str:
    """``obj`` as text: the first ``rows`` rows of a DataFrame, a placeholder for a figure."""
    if hasattr(obj, "limit") and hasattr(obj, "toPandas"):  # Spark DataFrame
        obj = obj.limit(rows).toPandas()
    if hasattr(obj, "to_string"):
        import pandas as pd

        with pd.option_context("display.max_colwidth", 60, "display.width", 200):
            return str(obj.head(rows).to_string())
    if hasattr(obj, "savefig"):
        return f"<figure {getattr(obj, 'number', '')}>"
    return str(obj)


# --- the SQL functions -----------------------------------------------------------------------


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
