"""One self-contained HTML page of a validation run's gates (pure: no Spark, no GX).

Great Expectations' Data Docs load Bootstrap, jQuery and Font Awesome from CDNs and render
as unstyled text where there is no internet (an air-gapped cluster, a laptop on a train).
This page needs nothing but itself: inline CSS, no script, every value escaped. It shows
the verdict, then one row per expectation (table, severity, what it checks, observed against
threshold, offending rows and example ids), failures first.
"""
from __future__ import annotations

from html import escape
from typing import Any, Mapping, Sequence

GATES_HTML = "gates.html"

_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem;color:#1d2430}
h1{font-size:1.35rem;margin:0 0 .3rem} .meta{color:#5a6372;margin-bottom:1rem}
.verdict{display:inline-block;padding:.15rem .6rem;border-radius:.3rem;font-weight:600;color:#fff}
.passed{background:#2f7d32} .failed{background:#b3261e}
table{border-collapse:collapse;width:100%} th,td{border-bottom:1px solid #dde1e6;padding:.35rem .5rem;
text-align:left;vertical-align:top} th{background:#f3f5f8;font-weight:600}
tr.fail td{background:#fdecea} tr.warn td{background:#fff6e0} code{font-size:.9em}
.note{color:#5a6372;font-size:.9em} pre{background:#f3f5f8;padding:.75rem;white-space:pre-wrap}
"""


def _row_class(gate: Mapping[str, Any]) -> str:
    if gate.get("passed"):
        return "pass"
    return "fail" if gate.get("severity") == "error" else "warn"


def _order(gates: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    rank = {"fail": 0, "warn": 1, "pass": 2}
    return sorted(gates, key=lambda g: (rank[_row_class(g)], str(g.get("table")), str(g.get("expectation"))))


def render_gates_page(payload: Mapping[str, Any], summary: str) -> str:
    """The page of one ``validate`` run (``payload``: the validation JSON's head and gates)."""
    gates = list(payload.get("gates") or [])
    passed = bool(payload.get("passed"))
    failed = sum(1 for g in gates if _row_class(g) == "fail")
    warned = sum(1 for g in gates if _row_class(g) == "warn")
    title = f"refinex validate: {payload.get('origin')} {payload.get('version_label')}"
    rows = []
    for gate in _order(gates):
        examples = ", ".join(str(e) for e in (gate.get("examples") or []))
        note = f"<div class='note'>{escape(str(gate['note']))}</div>" if gate.get("note") else ""
        rows.append(
            f"<tr class='{_row_class(gate)}'><td>{'pass' if gate.get('passed') else escape(str(gate.get('severity')))}</td>"
            f"<td><code>{escape(str(gate.get('table')))}</code></td>"
            f"<td><code>{escape(str(gate.get('expectation')))}</code><div class='note'>"
            f"{escape(str(gate.get('description') or ''))}</div>{note}</td>"
            f"<td>{escape(str(gate.get('observed')))}</td><td>{escape(str(gate.get('threshold')))}</td>"
            f"<td>{escape(str(gate.get('offending', 0)))}</td><td>{escape(examples)}</td></tr>")
    return "\n".join([
        "<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f"<div class='meta'>run <code>{escape(str(payload.get('run_id')))}</code> &middot; version "
        f"<code>{escape(str(payload.get('origin_version')))}</code></div>",
        f"<p><span class='verdict {'passed' if passed else 'failed'}'>{'passed' if passed else 'FAILED'}</span> "
        f"{len(gates)} expectations, {failed} failed, {warned} warnings</p>",
        "<table><thead><tr><th>result</th><th>table</th><th>expectation</th><th>observed</th><th>threshold</th>"
        "<th>offending rows</th><th>examples</th></tr></thead><tbody>",
        *rows,
        "</tbody></table>",
        f"<h2>Summary</h2><pre>{escape(summary)}</pre>",
        "</body></html>",
    ]) + "\n"
