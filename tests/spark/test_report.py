"""Stage ``report`` on a small workdir with both origins: a seeded, deterministic sample;
every applied origin at the version its latest apply run used; pages whose struck text is
what apply produced."""
from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from pyspark.sql import SparkSession

from refinex.config import Config
from refinex.program import Guardrails, execute_text
from refinex.report.html import page_name
from refinex.spark.report import REPORT, sample_key
from refinex.spark.stage import context, execute
from refinex.spark.tables import read_table
from refinex.versions import version_label

from .edits_workdir import DISTILLED, MODEL, EditsWorkdir, edits_workdir  # noqa: F401


class Columns(HTMLParser):
    """Per origin column of a document page: each line as (text, struck) pieces in order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.cells: dict[str, list[dict[str, Any]]] = {}
        self.cell: Any = None
        self.deleted = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, Any]]) -> None:
        values = dict(attrs)
        if tag == "td" and "t" in (values.get("class") or "").split():
            self.cell = {"pieces": [], "whole": False}
            self.cells.setdefault(values["data-origin"], []).append(self.cell)
        elif tag == "del" and self.cell is not None:
            self.deleted += 1
            self.cell["whole"] = self.cell["whole"] or "line" in (values.get("class") or "").split()

    def handle_endtag(self, tag: str) -> None:
        if tag == "del" and self.cell is not None:
            self.deleted -= 1
        elif tag == "td":
            self.cell = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell["pieces"].append((data, self.deleted > 0))

    def refined(self, origin: str) -> str:
        """The raw text minus the struck text (a line struck whole leaves with its break)."""
        return "\n".join("".join(t for t, struck in c["pieces"] if not struck)
                         for c in self.cells[origin] if not c["whole"])

    def raw(self, origin: str) -> str:
        return "\n".join("".join(t for t, _ in c["pieces"]) for c in self.cells[origin])


def test_report_stage_samples_and_renders_both_origins(
    spark: SparkSession, spark_config: Config, edits_workdir: EditsWorkdir, tmp_path: Path  # noqa: F811
) -> None:
    w = edits_workdir
    out = tmp_path / "report"
    stats = execute(REPORT, context(spark, spark_config, w.workdir), sample=4, seed=3, output=str(out))
    assert stats["origins"] == {"distilled": DISTILLED, "model": MODEL}  # the latest apply runs', not trafilatura:v1
    assert stats["version_labels"] == {"distilled": version_label(DISTILLED), "model": version_label(MODEL)}
    expected = sorted(sorted(w.documents, key=lambda d: sample_key(3, d))[:4])
    assert (stats["documents"], stats["applied_documents"], stats["pages"]) == (4, len(w.documents), 4)
    pages = sorted(p.name for p in (out / "docs").iterdir())
    assert pages == sorted(page_name(d) for d in expected)
    index = Path(stats["index"]).read_text(encoding="utf-8")
    for doc_id in expected:
        assert f'href="docs/{page_name(doc_id)}"' in index

    applied = {
        (r["doc_id"], r["origin"]): (r["status"], r["refined_text"])
        for r in read_table(spark, w.workdir, "refined_documents").collect()
        if r["origin_version"] in (DISTILLED, MODEL)
    }
    asked = Guardrails(max_error_ratio=1.0, min_kept_chars=0)  # what a program asks for, before the guardrails
    statuses = set()
    for doc_id in expected:
        raw = w.documents[doc_id][2]
        columns = Columns()
        columns.feed((out / "docs" / page_name(doc_id)).read_text(encoding="utf-8"))
        assert set(columns.cells) == {"distilled", "model"}
        for origin, version in (("distilled", DISTILLED), ("model", MODEL)):
            assert columns.raw(origin) == raw
            status, stored = applied[(doc_id, origin)]
            statuses.add(status)
            program = w.programs[version].get(doc_id)
            if status in ("refined", "unchanged"):
                assert columns.refined(origin) == stored
            else:  # no_program: unmarked; dropped, fallback_raw: the program's deletions, marked all the same
                assert columns.refined(origin) == (raw if program is None else execute_text(program, raw, asked).text)
    assert "refined" in statuses

    model_only = execute(REPORT, context(spark, spark_config, w.workdir), sample=2, seed=9, output=str(out),
                         origin="model")
    drawn = sorted(sorted(w.documents, key=lambda d: sample_key(9, d))[:2])
    assert model_only["origins"] == {"model": MODEL} and model_only["documents"] == 2
    assert sorted(p.name for p in (out / "docs").iterdir()) == sorted(page_name(d) for d in drawn)
    assert model_only["removed_stale_pages"] == len(set(expected) - set(drawn))
    page = (out / "docs" / page_name(drawn[0])).read_text(encoding="utf-8")
    assert 'data-origin="model"' in page and 'data-origin="distilled"' not in page
