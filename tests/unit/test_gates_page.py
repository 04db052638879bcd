"""The offline gates page: verdict, failures first, everything escaped, nothing fetched."""
from __future__ import annotations

from refinex.quality.gates_page import render_gates_page


def _gate(name: str, passed: bool, severity: str = "error", **extra: object) -> dict[str, object]:
    return {"expectation": name, "table": "refined_documents", "severity": severity, "passed": passed,
            "description": f"what {name} checks", "threshold": "share <= 0.05", "observed": "0.5",
            "offending": 0 if passed else 2, "examples": [] if passed else ["<b>doc</b>", "d2"], "note": "", **extra}


def test_failures_come_first_and_the_verdict_says_failed() -> None:
    payload = {"origin": "model", "version_label": "m/1@abc", "origin_version": "m/1", "run_id": "r1",
               "passed": False, "gates": [_gate("a_ok", True), _gate("b_warn", False, "warning"), _gate("c_bad", False)]}
    page = render_gates_page(payload, "validate model: FAILED")
    assert "FAILED" in page and "3 expectations, 1 failed, 1 warnings" in page
    assert page.index("c_bad") < page.index("b_warn") < page.index("a_ok")
    assert "<b>doc</b>" not in page and "&lt;b&gt;doc&lt;/b&gt;" in page
    assert "<script" not in page and "http" not in page and "<link" not in page


def test_a_clean_run_renders_passed() -> None:
    payload = {"origin": "distilled", "version_label": "t@1", "origin_version": "t:1", "run_id": "r2",
               "passed": True, "gates": [_gate("a_ok", True, note="a <note>")]}
    page = render_gates_page(payload, "validate distilled: passed")
    assert "class='verdict passed'" in page and "a &lt;note&gt;" in page
