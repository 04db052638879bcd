"""Helpers for the notebooks in ``notebooks/`` (Databricks source format), and a local runner.

- :mod:`refinex.notebook.context`: :func:`attach` and :class:`NotebookContext` (the Spark
  session, tables, tracking URI and SQL functions a notebook works with), :func:`widget`
  and :func:`show`;
- :mod:`refinex.notebook.explorer`: the program explorer's HTML (:func:`render_explorer`)
  and the deletions it marks (:func:`deletion_marks`), without Spark;
- :mod:`refinex.notebook.runner`: :func:`run_notebook`, which executes a notebook top to
  bottom off Databricks, with a ``dbutils.widgets`` stand-in.
"""
from __future__ import annotations

from refinex.notebook.context import (
    NotebookContext,
    attach,
    env_name,
    on_databricks,
    register_functions,
    show,
    widget,
)
from refinex.notebook.explorer import DeletionMarks, deletion_marks, render_explorer
from refinex.notebook.runner import Cell, NotebookError, parse_notebook, run_notebook, sql_parameters

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
