"""The program explorer's HTML: which lines and spans a program deletes, rendered side by side
with the refined text and the program.

Pure rendering over ``refinex.program`` (no Spark), so the page can be built and tested
anywhere. Every document field is untrusted and escaped; only ``http(s)`` URLs become links.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional, Sequence

# The deletion marks live with the evaluation metrics (refinex.evaluation.reliability), which
# measure agreement with the same marks; they are re-exported here for the explorer's users.
from refinex.evaluation.reliability import DeletionMarks, deletion_marks
from refinex.report.html import escape, mark_spans

__all__ = ["DeletionMarks", "deletion_marks", "render_explorer"]

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


def _safe_href(url: Any) -> Optional[str]:
    text = "" if url is None else str(url).strip()
    return text if re.match(r"^https?://", text, re.IGNORECASE) else None


def _more(hidden: int) -> str:
    return f'<div class="empty">… {hidden:,} more line{"s" if hidden != 1 else ""} not shown</div>' if hidden > 0 else ""


def _raw_table(marks: Optional[DeletionMarks], raw: str, max_lines: Optional[int] = None) -> str:
    lines = marks.lines if marks is not None else tuple(raw.split("\n"))
    shown = lines if max_lines is None else lines[:max_lines]
    rows = []
    for index, line in enumerate(shown):
        spans = marks.spans.get(index, ()) if marks is not None else ()
        css = "del" if marks is not None and index in marks.removed else ("part" if spans else "")
        rows.append(f'<tr class="{css}"><td class="n">{index}</td><td class="t">{mark_spans(line, spans, "span", "cut")}</td></tr>')
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
    rows = [f'<tr><td class="n">{n}</td><td class="t">{escape(line)}</td></tr>' for n, line in zip(numbers, shown)]
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
        '<html><head><meta charset="utf-8"><title>', escape(title), "</title><style>", _EXPLORER_CSS,
        "</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f'<div class="sub">{escape(subtitle)}</div>' if subtitle else "",
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
            items.append(f'<a href="#{escape(doc.get("doc_id"))}">{escape(doc.get("doc_id"))}</a>'
                         f'<span class="meta"> {escape(doc.get("status") or "")}{escape(extra)}</span>')
        parts.append(f'<div class="index">{"".join(f"<span>{item}</span>" for item in items)}</div>')
    for doc in docs:
        raw = doc.get("text") or ""
        program = doc.get("program")
        marks = deletion_marks(program, raw) if program is not None else None
        status = str(doc.get("status") or (marks.status if marks else ""))
        meta = [f'<span class="id">{escape(doc.get("doc_id"))}</span>',
                f'<span class="badge {escape(re.sub(r"[^a-z_]", "", status))}">{escape(status)}</span>']
        details = [str(doc[k]) for k in ("origin", "origin_version") if doc.get(k)]
        if doc.get("source"):
            details.append(f"source {doc['source']}")
        if doc.get("shard") is not None:
            details.append(f"shard {doc['shard']}")
        for key, label, fmt in _STAT_KEYS:
            if doc.get(key) is not None:
                details.append(f"{label} {fmt.format(doc[key])}")
        meta.append(f'<span class="meta">{escape(" · ".join(details))}</span>')
        href = _safe_href(doc.get("url"))
        if doc.get("url"):
            link = (f'<a href="{escape(href)}" target="_blank" rel="noopener noreferrer nofollow">{escape(doc["url"])}</a>'
                    if href else escape(doc["url"]))
            meta.append(f"<div>{link}</div>")
        notes = []
        if marks is not None and marks.status == "fallback_raw":
            notes.append("fallback_raw: too many invalid operations, the raw text was kept (marks show what the "
                         "program asked for)")
        if marks is not None and marks.status == "dropped":
            notes.append("dropped: too little text was left, the document was dropped")
        if marks is not None and (marks.rejected or marks.parse_errors):
            notes.append("invalid operations: " + "; ".join([*marks.rejected, *marks.parse_errors]))
        note_html = "".join(f'<div class="note">{escape(n)}</div>' for n in notes)
        n_lines = len(marks.lines) if marks else len(raw.split("\n"))
        removed = len(marks.removed) if marks else 0
        ids = _kept_ids(marks, doc.get("refined_text"))
        program_html = (f'<pre class="program">{escape(program)}</pre>' if program is not None
                        else '<div class="empty">no program</div>')
        parts.append(
            f'<div class="doc" id="{escape(doc.get("doc_id"))}"><div class="head">{"".join(meta)}</div>{note_html}'
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
