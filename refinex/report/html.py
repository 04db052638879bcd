"""The static HTML diff report: an index of sampled documents and one page per document.

A document page shows the raw text line by line with what each origin's program deletes
struck through: ``<del class="line">`` around a line deleted whole, ``<del class="str">``
around each string a ``remove_str`` deletes inside a kept line (the marks of
``refinex.evaluation.reliability.deletion_marks``: ``refinex.program.execute``'s
semantics), so the raw text minus the struck text is the program's output. With two origins (the
distilled oracle and the model) their columns stand side by side, line by line, with the
status and edit statistics of each above and the programs beside. The index lists the
documents with status, source and deletion ratio per origin; its headers sort the table
(a few lines of inline script; without it the table is in document order).

Pure rendering (no Spark). Every document field is untrusted: all text is escaped and only
``http(s)`` URLs become links. Pages are self-contained HTML5 (inline style), UTF-8.
"""
from __future__ import annotations

import hashlib
import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from refinex.evaluation.reliability import DeletionMarks, deletion_marks
from refinex.versions import version_label

DOCS_FOLDER = "docs"
INDEX_FILE = "index.html"
PAGE_PATTERN = re.compile(r"^[0-9a-f]{16}\.html$")
"""The file names of document pages (:func:`page_name`): stale ones are removed on rewrite."""

_STATUS_CLASS = re.compile(r"[^a-z_]")


@dataclass(frozen=True)
class OriginVersion:
    """A program origin at one version: one column of the report."""

    origin: str
    origin_version: str

    @property
    def label(self) -> str:
        """The short version label (``trafilatura@4f778c``)."""
        return version_label(self.origin_version)


@dataclass(frozen=True)
class OriginEdit:
    """What one origin did to one document: the stored status, program and refined text,
    and the edit statistics (``edit_stats`` / ``exec_stats`` fields such as ``chars_in``,
    ``chars_out``, ``deletion_ratio``, ``ops_total``)."""

    origin: OriginVersion
    status: str
    program: Optional[str] = None
    refined_text: Optional[str] = None
    stats: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ReportDocument:
    """One sampled document with the edits of each origin that reached it."""

    doc_id: str
    text: str
    source: Optional[str] = None
    url: Optional[str] = None
    shard: Optional[int] = None
    edits: tuple[OriginEdit, ...] = ()

    def edit(self, origin: OriginVersion) -> Optional[OriginEdit]:
        return next((e for e in self.edits if e.origin == origin), None)


@dataclass(frozen=True)
class ReportFiles:
    """What :func:`write_report_files` wrote."""

    index: Path
    pages: tuple[Path, ...]
    removed_stale: int


def page_name(doc_id: str) -> str:
    """The document page's file name: a hash of the id (ids are untrusted, any length)."""
    return hashlib.sha1(doc_id.encode("utf-8")).hexdigest()[:16] + ".html"


# --- pieces ------------------------------------------------------------------------------------


def escape(value: Any) -> str:
    """Escaped text (every document field is untrusted)."""
    return html.escape("" if value is None else str(value), quote=True)


def mark_spans(line: str, spans: Sequence[tuple[int, int]], tag: str, css_class: str) -> str:
    """``line`` escaped, each ``(start, end)`` span wrapped in ``<tag class="css_class">``."""
    pieces, cursor = [], 0
    for start, end in spans:
        pieces.append(escape(line[cursor:start]))
        pieces.append(f'<{tag} class="{css_class}">{escape(line[start:end])}</{tag}>')
        cursor = end
    pieces.append(escape(line[cursor:]))
    return "".join(pieces)


def _safe_href(url: Any) -> Optional[str]:
    text = "" if url is None else str(url).strip()
    return text if re.match(r"^https?://", text, re.IGNORECASE) else None


def _status_badge(status: Optional[str]) -> str:
    text = status or "not applied"
    return f'<span class="badge {_STATUS_CLASS.sub("", text)}">{escape(text)}</span>'


def _int(value: Any) -> str:
    return "—" if value is None else f"{int(value):,}"


def _ratio(value: Any) -> str:
    return "—" if value is None else f"{float(value):.3f}"


def _bar(value: Any) -> str:
    if value is None:
        return ""
    width = min(max(float(value), 0.0), 1.0) * 100
    return f'<span class="bar" aria-hidden="true"><span style="width:{width:.1f}%"></span></span>'


_CSS = """
:root { --fg: #1f2328; --muted: #57606a; --line: #d0d7de; --soft: #f6f8fa; --del-bg: #ffebe9;
        --del-fg: #82071e; --cut-bg: #ffcecb; --part: #fff8c5; --link: #0969da;
        --mono: ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace; }
* { box-sizing: border-box; }
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 16px 20px;
       color: var(--fg); font-size: 14px; line-height: 1.4; }
a { color: var(--link); text-decoration: none; }
a:hover { text-decoration: underline; }
h1 { font-size: 20px; margin: 4px 0; word-break: break-all; }
h1.doc-id { font-family: var(--mono); font-size: 18px; }
h2 { font-size: 13px; text-transform: uppercase; letter-spacing: .04em; color: var(--muted); margin: 0;
     padding: 6px 10px; background: var(--soft); border-bottom: 1px solid var(--line); }
nav.top { display: flex; gap: 16px; font-size: 13px; margin-bottom: 8px; }
.meta { color: var(--muted); font-size: 13px; margin-bottom: 12px; word-break: break-all; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; font-weight: 600;
         background: #ddf4ff; color: #0550ae; white-space: nowrap; }
.badge.refined { background: #dafbe1; color: #116329; }
.badge.unchanged { background: #eaeef2; color: var(--muted); }
.badge.dropped, .badge.fallback_raw, .badge.expert_failed, .badge.no_program, .badge.notapplied {
  background: var(--del-bg); color: #a40e26; }
.label { font-family: var(--mono); font-size: 12px; color: var(--muted); font-weight: normal; text-transform: none;
         letter-spacing: 0; }
table.stats, table.summary, table.docs { border-collapse: collapse; font-size: 13px; margin-bottom: 14px; }
table.stats th, table.stats td, table.summary th, table.summary td, table.docs th, table.docs td {
  border: 1px solid var(--line); padding: 4px 10px; text-align: left; vertical-align: top; }
table.stats thead th, table.summary thead th, table.docs thead th { background: var(--soft); }
table.stats tbody th, table.summary tbody th { font-weight: 600; color: var(--muted); background: #fbfcfd; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.bar { display: inline-block; width: 60px; height: 8px; background: #eaeef2; border-radius: 4px;
       margin-left: 6px; vertical-align: middle; overflow: hidden; }
.bar span { display: block; height: 100%; background: #cf222e; }
.note { padding: 6px 10px; margin: 0 0 8px 0; font-size: 13px; color: #7d4e00; background: var(--part);
        border: 1px solid #eac54f; border-radius: 6px; }
.legend { font-size: 12px; color: var(--muted); margin: 0 0 8px 0; }
.legend span { padding: 0 6px; margin-right: 8px; border-radius: 3px; }
.diff { display: grid; grid-template-columns: minmax(0, 1fr) minmax(240px, 28%); gap: 12px; align-items: start; }
.pane { border: 1px solid var(--line); border-radius: 6px; min-width: 0; overflow: hidden; }
table.lines { border-collapse: collapse; width: 100%; table-layout: fixed; font-family: var(--mono);
              font-size: 12px; }
table.lines thead th { position: sticky; top: 0; background: var(--soft); text-align: left; font-size: 12px;
                       padding: 5px 8px; border-bottom: 1px solid var(--line); font-family: -apple-system,
                       "Segoe UI", Roboto, Helvetica, Arial, sans-serif; }
table.lines th.n, table.lines td.n { width: 4.5em; }
table.lines td { padding: 0 8px; vertical-align: top; white-space: pre-wrap; word-break: break-word;
                 tab-size: 4; }
table.lines td.n { color: #8c959f; text-align: right; user-select: none; border-right: 1px solid #eaeef2; }
table.lines td.t + td.t { border-left: 1px solid var(--line); }
table.lines td.gone { background: var(--del-bg); }
table.lines td.part { background: var(--part); }
del { color: var(--del-fg); text-decoration: line-through; text-decoration-color: #cf222e99; }
del.str { background: var(--cut-bg); }
td.gone del.line:empty::after { content: "\\21B5"; color: #cf222e99; display: inline-block; }
aside.programs { position: sticky; top: 8px; max-height: calc(100vh - 16px); overflow: auto;
                 display: flex; flex-direction: column; gap: 12px; }
pre { margin: 0; padding: 8px 10px; font-family: var(--mono); font-size: 12px; white-space: pre-wrap;
      word-break: break-word; }
details summary { cursor: pointer; padding: 6px 10px; font-size: 12px; color: var(--muted);
                  border-top: 1px solid var(--line); }
.empty { padding: 8px 10px; color: #8c959f; font-style: italic; font-size: 12px; }
table.docs th[data-sort] { cursor: pointer; user-select: none; white-space: nowrap; }
table.docs th[data-sort]::after { content: " \\2195"; color: #8c959f; }
table.docs th[aria-sort="ascending"]::after { content: " \\2191"; color: var(--fg); }
table.docs th[aria-sort="descending"]::after { content: " \\2193"; color: var(--fg); }
table.docs td.id { font-family: var(--mono); font-size: 12px; word-break: break-all; max-width: 360px; }
table.docs tbody tr:hover { background: var(--soft); }
.hint { color: var(--muted); font-size: 12px; margin-bottom: 6px; }
"""

_SORT_SCRIPT = """
(function () {
  var table = document.getElementById("documents");
  if (!table || !table.tBodies.length) { return; }
  var body = table.tBodies[0];
  Array.prototype.forEach.call(table.querySelectorAll("th[data-sort]"), function (th) {
    th.tabIndex = 0;
    function sort() {
      var column = Number(th.getAttribute("data-column"));
      var numeric = th.getAttribute("data-sort") === "num";
      var current = th.getAttribute("aria-sort");
      var descending = current ? current === "ascending" : numeric;
      Array.prototype.forEach.call(table.querySelectorAll("th[aria-sort]"), function (other) {
        other.removeAttribute("aria-sort");
      });
      th.setAttribute("aria-sort", descending ? "descending" : "ascending");
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[column].getAttribute("data-value"), y = b.cells[column].getAttribute("data-value");
        if (x === "" || y === "") { return (x === "") - (y === ""); }
        var order = numeric ? Number(x) - Number(y) : x.localeCompare(y);
        return descending ? -order : order;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    }
    th.addEventListener("click", sort);
    th.addEventListener("keydown", function (event) {
      if (event.key === "Enter" || event.key === " ") { event.preventDefault(); sort(); }
    });
  });
})();
"""


def _page(title: str, body: Sequence[str], script: str = "") -> str:
    head = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>"
    )
    tail = f"<script>{script}</script>" if script else ""
    return head + "".join(body) + tail + "</body></html>\n"


# --- the document page -------------------------------------------------------------------------


def _marks(edit: Optional[OriginEdit], raw: str, guardrails: Any) -> Optional[DeletionMarks]:
    if edit is None or edit.program is None:
        return None
    return deletion_marks(edit.program, raw, guardrails)


def _line_cell(line: str, index: int, marks: Optional[DeletionMarks], origin: str) -> str:
    """One origin's cell of a raw line: the line struck whole, or its deleted strings struck."""
    data = f' data-origin="{escape(origin)}"'
    if marks is not None and index in marks.removed:
        return f'<td class="t gone"{data}><del class="line">{escape(line)}</del></td>'
    spans = marks.spans.get(index, ()) if marks is not None else ()
    if not spans:
        return f'<td class="t"{data}>{escape(line)}</td>'
    return f'<td class="t part"{data}>{mark_spans(line, spans, "del", "str")}</td>'


def _stats_table(doc: ReportDocument, origins: Sequence[OriginVersion]) -> str:
    edits = [doc.edit(origin) for origin in origins]
    header = "".join(
        f'<th scope="col">{escape(o.origin)}<br>'
        f'<span class="label" title="{escape(o.origin_version)}">{escape(o.label)}</span></th>'
        for o in origins
    )

    def row(name: str, render: Any) -> str:
        cells = "".join(f"<td>{render(e)}</td>" if e is not None else "<td>—</td>" for e in edits)
        return f'<tr><th scope="row">{escape(name)}</th>{cells}</tr>'

    def stat(e: OriginEdit, key: str) -> Any:
        return e.stats.get(key)

    rows = [
        row("status", lambda e: _status_badge(e.status)),
        row("chars in → out", lambda e: f"{_int(stat(e, 'chars_in'))} → {_int(stat(e, 'chars_out'))}"),
        row("deletion ratio", lambda e: _ratio(stat(e, "deletion_ratio")) + _bar(stat(e, "deletion_ratio"))),
        row("lines in → out", lambda e: f"{_int(stat(e, 'lines_in'))} → {_int(stat(e, 'lines_out'))}"),
        row("operations", lambda e: (
            f"{_int(stat(e, 'ops_total'))} (remove_lines {_int(stat(e, 'n_remove_lines'))}, "
            f"remove_str {_int(stat(e, 'n_remove_str'))}, keep_all {_int(stat(e, 'n_keep_all'))})")),
        row("rejected / parse errors", lambda e: f"{_int(stat(e, 'ops_rejected'))} / {_int(stat(e, 'parse_errors'))}"),
    ]
    return f'<table class="stats"><thead><tr><th></th>{header}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _notes(origin: OriginVersion, edit: Optional[OriginEdit], marks: Optional[DeletionMarks]) -> list[str]:
    name = f"{origin.origin} ({origin.label})"
    if edit is None:
        return [f"{name}: this version was not applied to the document."]
    if marks is None:
        return [f"{name}: no program ({edit.status}); the raw text is shown unmarked."]
    notes = []
    if edit.status == "fallback_raw":
        notes.append(f"{name}: fallback_raw, too many invalid operations: the raw text was kept "
                     "(the marks show what the program asked for).")
    elif edit.status == "dropped":
        notes.append(f"{name}: dropped, too little text was left: the document was dropped "
                     "(the marks show what the program asked for).")
    if marks.rejected or marks.parse_errors:
        notes.append(f"{name}: invalid operations: " + "; ".join([*marks.rejected, *marks.parse_errors]))
    if edit.refined_text is not None and edit.refined_text != marks.text:
        notes.append(f"{name}: the stored refined text is not what this program gives under the current "
                     "guardrails (they or the program changed after apply).")
    return notes


def render_document(
    doc: ReportDocument,
    origins: Sequence[OriginVersion],
    guardrails: Any = None,
    index_href: str = f"../{INDEX_FILE}",
    prev_href: Optional[str] = None,
    next_href: Optional[str] = None,
    title: str = "refinex diff report",
) -> str:
    """One document's page: statistics per origin, the raw lines with each origin's deletions
    struck through (one column per origin, side by side), the programs and refined texts.

    ``guardrails`` (a ``refinex.program.Guardrails``; default ones if None) decide the
    recomputed status the page compares with the stored refined text.
    """
    raw = doc.text or ""
    lines = raw.split("\n")
    edits = [doc.edit(origin) for origin in origins]
    marks = [_marks(edit, raw, guardrails) for edit in edits]

    nav = [f'<a href="{escape(index_href)}">All documents</a>']
    if prev_href:
        nav.append(f'<a rel="prev" href="{escape(prev_href)}">← previous</a>')
    if next_href:
        nav.append(f'<a rel="next" href="{escape(next_href)}">next →</a>')
    meta = []
    if doc.source:
        meta.append(f"source {escape(doc.source)}")
    if doc.shard is not None:
        meta.append(f"shard {escape(doc.shard)}")
    meta.append(f"{len(raw):,} chars, {len(lines):,} lines")
    href = _safe_href(doc.url)
    if href:
        meta.append(f'<a href="{escape(href)}" rel="noopener noreferrer nofollow">{escape(doc.url)}</a>')
    elif doc.url:
        meta.append(escape(doc.url))
    notes = [n for origin, edit, m in zip(origins, edits, marks) for n in _notes(origin, edit, m)]

    def deleted(m: Optional[DeletionMarks]) -> str:
        n = len(m.removed) if m is not None else 0
        return f"{n:,} line{'' if n == 1 else 's'} deleted"

    head = "".join(
        f'<th scope="col">{escape(o.origin)} <span class="label" title="{escape(o.origin_version)}">{escape(o.label)}</span>'
        f" · {deleted(m)}</th>"
        for o, m in zip(origins, marks)
    )
    rows = []
    for index, line in enumerate(lines):
        cells = "".join(_line_cell(line, index, m, o.origin) for o, m in zip(origins, marks))
        rows.append(f'<tr data-line="{index}"><td class="n">{index}</td>{cells}</tr>')
    text_table = (f'<table class="lines"><thead><tr><th class="n">line</th>{head}</tr></thead>'
                  f'<tbody>{"".join(rows)}</tbody></table>')

    programs = []
    for origin, edit in zip(origins, edits):
        program = (f'<pre class="program">{escape(edit.program)}</pre>' if edit is not None and edit.program is not None
                   else '<div class="empty">no program</div>')
        refined = ""
        if edit is not None and edit.refined_text is not None:
            shown = escape(edit.refined_text) if edit.refined_text else '<span class="empty">(empty)</span>'
            refined = (f"<details><summary>refined text ({len(edit.refined_text):,} chars)</summary>"
                       f'<pre class="refined">{shown}</pre></details>')
        programs.append(
            f'<section class="pane" data-origin="{escape(origin.origin)}"><h2>Program · {escape(origin.origin)} '
            f'<span class="label">{escape(origin.label)}</span></h2>{program}{refined}</section>'
        )

    body = [
        f'<nav class="top">{"".join(nav)}</nav>',
        f'<h1 class="doc-id">{escape(doc.doc_id)}</h1>',
        f'<div class="meta">{" · ".join(meta)}</div>',
        _stats_table(doc, origins),
        "".join(f'<div class="note">{escape(n)}</div>' for n in notes),
        '<div class="legend"><span style="background:#ffebe9;color:#82071e;text-decoration:line-through">'
        'deleted line</span><span style="background:#ffcecb;color:#82071e;text-decoration:line-through">'
        'deleted string</span><span style="background:#fff8c5">line with a deleted string</span></div>',
        f'<div class="diff"><div class="pane">{text_table}</div>'
        f'<aside class="programs">{"".join(programs)}</aside></div>',
    ]
    return _page(f"{doc.doc_id} · {title}", body)


# --- the index ---------------------------------------------------------------------------------


def render_index(
    docs: Sequence[ReportDocument],
    origins: Sequence[OriginVersion],
    summary: Sequence[tuple[str, str]] = (),
    title: str = "refinex diff report",
) -> str:
    """The index page: the origins compared, then one row per document (linked to its page)
    with source, size and per origin status, deletion ratio and operations.

    Each sortable header has ``data-sort`` (``num`` or ``text``) and ``data-column``; each
    cell a ``data-value`` the script sorts by (blank values last).
    """
    origin_rows = []
    for origin in origins:
        statuses: dict[str, int] = {}
        for doc in docs:
            edit = doc.edit(origin)
            key = edit.status if edit is not None else "not applied"
            statuses[key] = statuses.get(key, 0) + 1
        shown = " ".join(f"{_status_badge(k)} {n}" for k, n in sorted(statuses.items()))
        origin_rows.append(
            f"<tr><td>{escape(origin.origin)}</td><td class=\"label\">{escape(origin.label)}</td>"
            f"<td class=\"label\">{escape(origin.origin_version)}</td><td>{shown}</td></tr>"
        )
    origins_table = (
        '<table class="summary"><thead><tr><th>origin</th><th>version</th><th>full version</th>'
        f'<th>sampled documents by status</th></tr></thead><tbody>{"".join(origin_rows)}</tbody></table>'
    )
    summary_table = ""
    if summary:
        summary_rows = "".join(f'<tr><th scope="row">{escape(k)}</th><td>{escape(v)}</td></tr>' for k, v in summary)
        summary_table = f'<table class="summary"><tbody>{summary_rows}</tbody></table>'

    columns: list[tuple[str, str]] = [("document", "text"), ("source", "text"), ("chars", "num")]
    for _ in origins:
        columns += [("status", "text"), ("deletion ratio", "num"), ("ops", "num")]
    top = '<th colspan="3" scope="colgroup">document</th>' + "".join(
        f'<th colspan="3" scope="colgroup">{escape(o.origin)} <span class="label">{escape(o.label)}</span></th>'
        for o in origins
    )
    sub = "".join(
        f'<th scope="col" data-sort="{kind}" data-column="{i}">{escape(name)}</th>'
        for i, (name, kind) in enumerate(columns)
    )
    body_rows = []
    for doc in docs:
        href = f"{DOCS_FOLDER}/{page_name(doc.doc_id)}"
        cells = [
            f'<td class="id" data-value="{escape(doc.doc_id)}"><a href="{escape(href)}">{escape(doc.doc_id)}</a></td>',
            f'<td data-value="{escape(doc.source or "")}">{escape(doc.source or "")}</td>',
            f'<td class="num" data-value="{len(doc.text or "")}">{len(doc.text or ""):,}</td>',
        ]
        for origin in origins:
            edit = doc.edit(origin)
            status = edit.status if edit is not None else ""
            ratio = edit.stats.get("deletion_ratio") if edit is not None else None
            ops = edit.stats.get("ops_total") if edit is not None else None
            cells += [
                f'<td data-value="{escape(status)}">{_status_badge(status) if edit is not None else "—"}</td>',
                f'<td class="num" data-value="{"" if ratio is None else repr(float(ratio))}">'
                f"{_ratio(ratio)}{_bar(ratio)}</td>",
                f'<td class="num" data-value="{"" if ops is None else int(ops)}">{_int(ops)}</td>',
            ]
        body_rows.append(f"<tr>{''.join(cells)}</tr>")
    docs_table = (
        f'<table class="docs" id="documents"><thead><tr>{top}</tr><tr>{sub}</tr></thead>'
        f'<tbody>{"".join(body_rows)}</tbody></table>'
    )
    body = [
        f"<h1>{escape(title)}</h1>",
        summary_table,
        origins_table,
        f'<div class="hint">{len(docs):,} documents. Click a column header to sort.</div>',
        docs_table if docs else '<div class="empty">no documents</div>',
    ]
    return _page(title, body, _SORT_SCRIPT)


# --- files -------------------------------------------------------------------------------------


def write_report_files(
    folder: Path,
    docs: Sequence[ReportDocument],
    origins: Sequence[OriginVersion],
    summary: Sequence[tuple[str, str]] = (),
    guardrails: Any = None,
    title: str = "refinex diff report",
) -> ReportFiles:
    """Write ``index.html`` and ``docs/<page>.html`` (UTF-8) under ``folder``.

    Document pages link to their neighbours in ``docs`` order. Pages of an earlier report
    in the same folder that this one no longer has are removed (only files named like
    pages), so the folder is exactly this report.
    """
    pages_dir = folder / DOCS_FOLDER
    pages_dir.mkdir(parents=True, exist_ok=True)
    names = [page_name(doc.doc_id) for doc in docs]
    written = []
    for i, (doc, name) in enumerate(zip(docs, names)):
        page = render_document(
            doc, origins, guardrails,
            prev_href=names[i - 1] if i > 0 else None,
            next_href=names[i + 1] if i + 1 < len(names) else None,
            title=title,
        )
        path = pages_dir / name
        path.write_text(page, encoding="utf-8")
        written.append(path)
    keep = set(names)
    stale = [p for p in pages_dir.iterdir() if PAGE_PATTERN.match(p.name) and p.name not in keep]
    for path in stale:
        path.unlink()
    index = folder / INDEX_FILE
    index.write_text(render_index(docs, origins, summary, title), encoding="utf-8")
    return ReportFiles(index=index, pages=tuple(written), removed_stale=len(stale))
