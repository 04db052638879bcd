"""Helpers for the notebooks in ``notebooks/`` (Databricks source format).

- :mod:`refinex.notebook.context`: :func:`attach` and :class:`NotebookContext` (the Spark
  session, tables, tracking URI and SQL functions a notebook works with), :func:`widget`
  and :func:`show`;
- :mod:`refinex.notebook.explorer`: the program explorer's HTML (:func:`render_explorer`)
  and the deletions it marks (:func:`deletion_marks`), without Spark;

The local runner that executes a notebook top to bottom off Databricks is a development tool,
``scripts/run_notebook.py``, not part of the package.
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

__all__ = [
    "DeletionMarks",
    "NotebookContext",
    "attach",
    "deletion_marks",
    "env_name",
    "on_databricks",
    "register_functions",
    "render_explorer",
    "show",
    "widget",
]
