"""The diff report's HTML (refinex.report.html), without Spark: well-formed pages, struck
text that is exactly what the program deletes, escaping, the index's sort attributes and
two origins side by side."""
from __future__ import annotations

import random
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Optional

import pytest

from refinex.program import Guardrails, execute, parse, quote_string
from refinex.report.html import (
    OriginEdit,
    OriginVersion,
    ReportDocument,
    page_name,
    render_document,
    render_index,
    write_report_files,
)
from refinex.versions import version_label

DISTILLED = OriginVersion("distilled", "trafilatura:trafilatura-2.3.1[x=1]+label-r1")
MODEL = OriginVersion("model", "refinex-refiner/3")
VOID = {"meta", "br", "img", "hr", "input", "link", "col", "wbr"}
LONG = "This line is long enough to keep the document above the minimum number of kept characters."


class Tree(HTMLParser):
    """A minimal DOM: nested (tag, attrs, children) with text strings; fails on tags that do
    not close in order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root: dict[str, Any] = {"tag": "#root", "attrs": {}, "children": []}
        self.stack = [self.root]
        self.doctype: Optional[str] = None

    def handle_decl(self, decl: str) -> None:
        self.doctype = decl

    def handle_starttag(self, tag: str, attrs: list[tuple[str, Optional[str]]]) -> None:
        node = {"tag": tag, "attrs": dict(attrs), "children": []}
        self.stack[-1]["children"].append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack[-1]["tag"] == tag, f"</{tag}> closes <{self.stack[-1]['tag']}>"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.stack[-1]["children"].append(data)


def tree(page: str) -> Tree:
    parsed = Tree()
    parsed.feed(page)
    parsed.close()
    assert len(parsed.stack) == 1, f"unclosed: {[n['tag'] for n in parsed.stack[1:]]}"
    assert parsed.doctype is not None and parsed.doctype.lower() == "doctype html"
    return parsed


def find(
    node: dict[str, Any], tag: Optional[str] = None, cls: Optional[str] = None, **attrs: str
) -> list[dict[str, Any]]:
    found = []
    for child in node["children"]:
        if isinstance(child, str):
            continue
        classes = (child["attrs"].get("class") or "").split()
        if (tag is None or child["tag"] == tag) and (cls is None or cls in classes) and all(
            child["attrs"].get(k.replace("_", "-")) == v for k, v in attrs.items()
        ):
            found.append(child)
        found.extend(find(child, tag, cls, **attrs))
    return found


def text(node: Any, skip_del: bool = False) -> str:
    if isinstance(node, str):
        return node
    if skip_del and node["tag"] == "del":
        return ""
    return "".join(text(child, skip_del) for child in node["children"])


def document(
    raw: str, *programs: tuple[OriginVersion, Optional[str]], doc_id: str = "doc-1", **fields: Any
) -> ReportDocument:
    edits = []
    for origin, program in programs:
        if program is None:
            edits.append(OriginEdit(origin, "no_program"))
            continue
        result = execute(parse(program), raw)
        edits.append(OriginEdit(origin, result.status, program, result.text, {
            "chars_in": result.chars_in, "chars_out": result.chars_out, "deletion_ratio": result.deletion_ratio,
            "ops_total": result.ops_total, "lines_in": result.lines_in, "lines_out": result.lines_out,
        }))
    return ReportDocument(doc_id=doc_id, text=raw, edits=tuple(edits), **fields)


def kept_text(page: str, origin: str) -> tuple[str, str]:
    """(raw, raw minus struck text) of one origin's column: lines joined with line breaks,
    a line struck whole leaving with its break (as ``execute`` deletes it)."""
    rows = find(tree(page).root, "tr")
    raw_lines, kept_lines = [], []
    for row in rows:
        if "data-line" not in row["attrs"]:
            continue
        cells = find(row, "td", "t", data_origin=origin)
        assert len(cells) == 1
        cell = cells[0]
        raw_lines.append(text(cell))
        whole = [d for d in find(cell, "del") if "line" in d["attrs"].get("class", "").split()]
        if whole:
            assert text(whole[0]) == text(cell), "a struck line is struck whole"
        else:
            kept_lines.append(text(cell, skip_del=True))
    return "\n".join(raw_lines), "\n".join(kept_lines)


RAW = "\n".join([
    "Menu | Home | About",
    LONG,
    "Share this article on social media",
    "",
    "Posted by admin on Monday",
    LONG + " Read more",
    "Footer",
])


@pytest.mark.parametrize("program", [
    "remove_lines(0, 0)\nremove_lines(2, 3)\nremove_str(4, 'Posted ')\nremove_str(5, ' Read more')\nremove_lines(6, 6)",
    "keep_all()",
    "remove_lines(6, 6)",  # the last line: its preceding break goes with it
    "remove_lines(0, 2)\nremove_lines(1, 1)\nremove_str(4, 'admin')\nremove_str(4, 'admin')",  # overlap, string taken
    "remove_str(4, 'o')\nremove_str(4, 'o')\nremove_str(4, 'o')",  # repeated string: successive free occurrences
])
def test_struck_text_is_exactly_what_the_program_deletes(program: str) -> None:
    doc = document(RAW, (DISTILLED, program))
    page = render_document(doc, [DISTILLED])
    raw, kept = kept_text(page, "distilled")
    assert raw == RAW
    assert kept == execute(parse(program), RAW).text


def test_struck_text_matches_execute_on_random_programs() -> None:
    rng = random.Random(7)
    words = ["alpha", "beta", "gamma", " ", "<b>", "&amp;", "é", "日本", "delta", "--"]
    checked = 0
    for _ in range(60):
        lines = ["".join(rng.choice(words) for _ in range(rng.randint(0, 8))) for _ in range(rng.randint(1, 12))]
        raw = "\n".join(lines)
        ops = []
        for _ in range(rng.randint(0, 6)):
            if rng.random() < 0.5:
                start = rng.randint(0, len(lines))
                ops.append(f"remove_lines({start}, {start + rng.randint(0, 2)})")
            else:
                line = rng.randint(0, len(lines) - 1)
                source = lines[line] or "x"
                a = rng.randint(0, len(source) - 1)
                ops.append(f"remove_str({line}, {quote_string(source[a:a + rng.randint(1, 6)])})")
        program = "\n".join(ops)
        guardrails = Guardrails(max_error_ratio=1.0, min_kept_chars=0)
        result = execute(parse(program), raw, guardrails)
        doc = ReportDocument("r", raw, edits=(OriginEdit(DISTILLED, result.status, program, result.text),))
        page_raw, kept = kept_text(render_document(doc, [DISTILLED], guardrails), "distilled")
        assert page_raw == raw
        assert kept == result.text
        checked += 1
    assert checked == 60


def test_everything_is_escaped() -> None:
    hostile = '<script>alert("x")</script>'
    raw = f"{hostile} & <b>bold</b>\n{LONG}"
    program = f"remove_str(0, {quote_string(hostile)})"
    doc = document(raw, (DISTILLED, program), doc_id=f"id{hostile}", source=f"src{hostile}",
                   url="javascript:alert(1)")
    page = render_document(doc, [DISTILLED])
    index = render_index([doc], [DISTILLED], summary=[("note", hostile)], title=f"t{hostile}")
    for html_text in (page, index):
        assert "<script>alert" not in html_text and "<b>bold" not in html_text
        assert 'href="javascript:' not in html_text
        parsed = tree(html_text)
        scripts = find(parsed.root, "script")
        assert all("alert" not in text(s) for s in scripts)  # only the page's own sort script
    assert len(find(tree(page).root, "script")) == 0
    cell = find(tree(page).root, "td", "t", data_origin="distilled")[0]
    assert text(find(cell, "del", "str")[0]) == hostile
    assert text(cell) == f"{hostile} & <b>bold</b>"
    assert hostile in text(find(tree(page).root, "h1")[0])
    safe = render_document(document(raw, (DISTILLED, program), url="https://example.org/a?b=1&c=<2>"), [DISTILLED])
    links = [a["attrs"]["href"] for a in find(tree(safe).root, "a")]
    assert "https://example.org/a?b=1&c=<2>" in links


def test_two_origins_side_by_side() -> None:
    doc = document(RAW, (DISTILLED, "remove_lines(0, 0)\nremove_str(4, 'Posted ')"),
                   (MODEL, "remove_lines(2, 3)\nremove_lines(6, 6)"), source="news", shard=3)
    page = render_document(doc, [DISTILLED, MODEL])
    parsed = tree(page)
    line_rows = [r for r in find(parsed.root, "tr") if "data-line" in r["attrs"]]
    assert len(line_rows) == RAW.count("\n") + 1
    for row in line_rows:
        assert [c["attrs"]["data-origin"] for c in find(row, "td", "t")] == ["distilled", "model"]
    for origin, edit in (("distilled", doc.edits[0]), ("model", doc.edits[1])):
        raw, kept = kept_text(page, origin)
        assert raw == RAW and kept == edit.refined_text
    stats = find(parsed.root, "table", "stats")[0]
    header = text(find(stats, "thead")[0])
    assert DISTILLED.label in header and MODEL.label in header
    assert version_label(MODEL.origin_version) == MODEL.label
    programs = find(parsed.root, "section", data_origin="model")
    assert text(find(programs[0], "pre", "program")[0]) == "remove_lines(2, 3)\nremove_lines(6, 6)"
    assert "source news" in text(find(parsed.root, "div", "meta")[0])


def test_missing_program_and_status_notes() -> None:
    dropped = "remove_lines(0, 6)"
    doc = document(RAW, (DISTILLED, None), (MODEL, dropped))
    parsed = tree(render_document(doc, [DISTILLED, MODEL]))
    notes = " ".join(text(n) for n in find(parsed.root, "div", "note"))
    assert "no program (no_program)" in notes and "dropped" in notes
    distilled_cells = find(parsed.root, "td", "t", data_origin="distilled")
    assert len(distilled_cells) == RAW.count("\n") + 1
    assert all(c["attrs"]["class"] == "t" and not find(c, "del") for c in distilled_cells)  # unmarked
    # the model's marks still show what its program asked for: every line struck
    raw, kept = kept_text(render_document(doc, [DISTILLED, MODEL]), "model")
    assert raw == RAW and kept == ""
    stale = OriginEdit(DISTILLED, "refined", "remove_lines(0, 0)", "something else")
    notes = text(tree(render_document(ReportDocument("x", RAW, edits=(stale,)), [DISTILLED])).root)
    assert "not what this program gives" in notes


def test_index_sorts_by_attributes() -> None:
    docs = [
        document(RAW, (DISTILLED, "remove_lines(0, 0)"), (MODEL, "remove_lines(0, 2)"), doc_id="b", source="news"),
        document(RAW, (DISTILLED, "keep_all()"), doc_id="a", source=None),
    ]
    parsed = tree(render_index(docs, [DISTILLED, MODEL], summary=[("sample", "2 of 2")]))
    table = find(parsed.root, "table", id="documents")[0]
    header_rows = find(find(table, "thead")[0], "tr")
    sortable = find(header_rows[1], "th")
    assert [th["attrs"]["data-column"] for th in sortable] == [str(i) for i in range(9)]
    kinds = [th["attrs"]["data-sort"] for th in sortable]
    assert kinds == ["text", "text", "num"] + ["text", "num", "num"] * 2
    assert [text(th) for th in sortable][4] == "deletion ratio"
    body_rows = find(find(table, "tbody")[0], "tr")
    assert len(body_rows) == 2
    for row in body_rows:
        cells = find(row, "td")
        assert len(cells) == 9
        for cell, kind in zip(cells, kinds):
            value = cell["attrs"]["data-value"]
            if kind == "num" and value != "":
                float(value)
    first = find(body_rows[0], "td")
    assert first[0]["attrs"]["data-value"] == "b"
    assert find(first[0], "a")[0]["attrs"]["href"] == f"docs/{page_name('b')}"
    assert float(first[4]["attrs"]["data-value"]) == pytest.approx(docs[0].edits[0].stats["deletion_ratio"])
    assert find(body_rows[1], "td")[7]["attrs"]["data-value"] == ""  # no model edit: sorts last
    script = text(find(parsed.root, "script")[0])
    assert "data-sort" in script and "data-value" in script and "data-column" in script


def test_write_report_files_links_pages_and_removes_stale_ones(tmp_path: Path) -> None:
    other = tmp_path / "docs" / "notes.txt"
    other.parent.mkdir(parents=True)
    other.write_text("mine")
    stale = tmp_path / "docs" / page_name("gone")
    stale.write_text("old page")
    docs = [document(RAW, (DISTILLED, "remove_lines(0, 0)"), doc_id=d) for d in ("a", "b", "c")]
    files = write_report_files(tmp_path, docs, [DISTILLED], summary=[("seed", "0")])
    assert files.index == tmp_path / "index.html" and files.removed_stale == 1
    assert not stale.exists() and other.read_text() == "mine"
    assert [p.name for p in files.pages] == [page_name(d) for d in ("a", "b", "c")]
    middle = tree(files.pages[1].read_text(encoding="utf-8"))
    hrefs = {a["attrs"].get("rel"): a["attrs"]["href"] for a in find(middle.root, "a")}
    assert hrefs == {None: "../index.html", "prev": page_name("a"), "next": page_name("c")}
    assert re.fullmatch(r"[0-9a-f]{16}\.html", page_name("../../etc/passwd"))
    assert '<meta charset="utf-8">' in files.index.read_text(encoding="utf-8")
