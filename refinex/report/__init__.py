"""Reports for people: the static HTML diff report of sampled documents (:mod:`refinex.report.html`).

Pure Python (no Spark): the ``report`` stage (``refinex.spark.report``) collects the sampled
rows and hands them to :func:`write_report_files`.
"""
from __future__ import annotations

from refinex.report.html import (
    OriginEdit,
    OriginVersion,
    ReportDocument,
    ReportFiles,
    page_name,
    render_document,
    render_index,
    write_report_files,
)

__all__ = [
    "OriginEdit",
    "OriginVersion",
    "ReportDocument",
    "ReportFiles",
    "page_name",
    "render_document",
    "render_index",
    "write_report_files",
]
