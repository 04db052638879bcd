"""The pure part of the quality gates: deletion-only check, gate catalogue, summary."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from typing import Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refinex.config import QualityConfig
from refinex.program import execute, parse
from refinex.program.execute import Guardrails
from refinex.quality.checks import (
    ERROR,
    GATED_TABLES,
    PROGRAMS,
    REFINED_DOCUMENTS,
    ROW_COUNT,
    SHARE_AT_MOST,
    WARNING,
    Gate,
    GateResult,
    Offender,
    format_summary,
    gate_catalogue,
    hint,
    is_deletion_only,
    share_observed,
)


def naive_subsequence(raw: str, refined: str) -> bool:
    """The textbook greedy check, one character at a time (the reference)."""
    position = 0
    for char in refined:
        position = raw.find(char, position)
        if position < 0:
            return False
        position += 1
    return True


@pytest.mark.parametrize(("raw", "refined", "expected"), [
    ("abc", "ac", True),
    ("abc", "abc", True),
    ("abc", "ca", False),
    ("abc", "abcd", False),
    ("aaa", "aaaa", False),
    ("abc", "", True),
    ("abc", None, True),
    ("", "", True),
    (None, "x", False),
    ("line one\nline two\nline three", "line one\nline three", True),
    ("keep this", "keep  this", False),
])
def test_deletion_only_examples(raw: Optional[str], refined: Optional[str], expected: bool) -> None:
    assert is_deletion_only(raw, refined) is expected


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_deleting_random_characters_is_always_deletion_only(data: st.DataObject) -> None:
    raw = data.draw(st.text(max_size=200))
    keep = data.draw(st.lists(st.booleans(), min_size=len(raw), max_size=len(raw)))
    refined = "".join(char for char, kept in zip(raw, keep) if kept)
    assert is_deletion_only(raw, refined)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_inserting_a_character_not_in_raw_is_not_deletion_only(data: st.DataObject) -> None:
    raw = data.draw(st.text(max_size=200))
    keep = data.draw(st.lists(st.booleans(), min_size=len(raw), max_size=len(raw)))
    kept = "".join(char for char, k in zip(raw, keep) if k)
    new = data.draw(st.characters().filter(lambda c: c not in raw))
    at = data.draw(st.integers(min_value=0, max_value=len(kept)))
    assert not is_deletion_only(raw, kept[:at] + new + kept[at:])


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="ab\n", max_size=60), st.text(alphabet="ab\n", max_size=40))
def test_deletion_only_agrees_with_the_reference(raw: str, refined: str) -> None:
    assert is_deletion_only(raw, refined) is naive_subsequence(raw, refined)


def test_long_kept_runs_and_late_mismatches() -> None:
    raw = "\n".join(f"line {i} with some words" for i in range(5000))
    lines = raw.split("\n")
    kept = "\n".join(lines[:2000] + lines[2500:])
    assert is_deletion_only(raw, kept)
    assert not is_deletion_only(raw, kept + "!")
    assert not is_deletion_only(raw, kept[:-1] + "Z")  # the very last character differs
    assert is_deletion_only("ab" * 10000, "ab" * 5000 + "b" + "ab" * 4000)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(alphabet="abc xyz", max_size=12), min_size=1, max_size=12), st.data())
def test_program_outputs_are_deletion_only(lines: list[str], data: st.DataObject) -> None:
    raw = "\n".join(lines)
    start = data.draw(st.integers(min_value=0, max_value=len(lines) - 1))
    end = data.draw(st.integers(min_value=start, max_value=len(lines) - 1))
    word = data.draw(st.sampled_from(["a", "b c", "xyz", " "]))
    program = parse(f'remove_lines({start}, {end})\nremove_str({len(lines) - 1}, "{word}")')
    result = execute(program, raw, Guardrails(max_error_ratio=1.0, min_kept_chars=0))
    assert is_deletion_only(raw, result.text)


def test_catalogue_takes_thresholds_from_the_quality_config() -> None:
    quality = QualityConfig(max_fallback_share=0.01, max_dropped_share=0.3, max_expert_failed_share=0.2,
                            max_no_program_share=0.0, extreme_deletion_ratio=0.9, max_extreme_share=0.25)
    gates = {g.key: g for g in gate_catalogue(quality, "distilled", 17)}
    assert len(gates) == len(gate_catalogue(quality, "distilled", 17))  # keys are unique
    assert {g.table for g in gates.values()} == set(GATED_TABLES)
    shares = {k: g.maximum for k, g in gates.items() if g.kind == SHARE_AT_MOST}
    assert shares == {
        "refined_documents.fallback_raw_share": 0.01, "refined_documents.dropped_share": 0.3,
        "refined_documents.expert_failed_share": 0.2, "refined_documents.no_program_share": 0.0,
        "refined_documents.extreme_deletion_share": 0.25,
    }
    assert gates["refined_documents.dropped_share"].threshold == "share <= 0.3"
    assert "0.9" in gates["refined_documents.extreme_deletion_share"].description
    assert gates["edit_stats.row_count"].expected == 17 and gates["refined_documents.row_count"].kind == ROW_COUNT
    assert gates["edit_stats.row_count"].threshold == "rows == 17 (rows of documents)"
    assert gates["refined_documents.status_known"].threshold.startswith("status in {refined, unchanged")
    severities = {k: g.severity for k, g in gates.items()}
    assert severities.pop("refined_documents.extreme_deletion_share") == WARNING
    assert set(severities.values()) == {ERROR}
    model = {g.key: g for g in gate_catalogue(quality, "model", 17)}
    assert model[f"{PROGRAMS}.program_parses"].severity == WARNING
    assert model[f"{PROGRAMS}.program_parses"].threshold == "parse_errors == 0"


def test_gates_reject_unknown_kinds_and_severities() -> None:
    with pytest.raises(ValueError, match="kind"):
        Gate("g", REFINED_DOCUMENTS, "roughly", ERROR, "?")
    with pytest.raises(ValueError, match="severity"):
        Gate("g", REFINED_DOCUMENTS, ROW_COUNT, "fatal", "?")


def _gates() -> dict[str, Gate]:
    return {g.key: g for g in gate_catalogue(QualityConfig(), "distilled", 40)}


def test_summary_names_expectation_observed_threshold_and_examples() -> None:
    gates = _gates()
    observed, share = share_observed(40, 40)
    failed = GateResult(gates["refined_documents.expert_failed_share"], False, observed, share, 40,
                        (Offender(None, observed), *(Offender(f"d{i}", "status=expert_failed") for i in range(40))),
                        note='most common error of expert trafilatura: "no html" (40 documents)')
    status = GateResult(gates["edit_stats.status_known"], False, "1 of 40 rows", 1.0, 1,
                        (Offender("d7", "status=weird"),))
    warned = GateResult(gates["refined_documents.extreme_deletion_share"], False, "0.2 (8 of 40 rows)", 0.2, 8,
                        (Offender("d3", "status=refined, deletion_ratio=0.99"),))
    passed = GateResult(gates["refined_documents.row_count"], True, "40 rows", 40.0)
    text = format_summary([passed, failed, status, warned], title="validate distilled trafilatura@4f778c",
                          example_ids=3, notes=["edit_stats has no rows yet"])
    lines = text.splitlines()
    assert lines[0] == "validate distilled trafilatura@4f778c: FAILED: 2 of 4 expectations failed, 1 warning"
    assert "[error] refined_documents.expert_failed_share" in text
    assert "observed 1 (40 of 40 rows), threshold share <= 0.05" in text
    assert "the expert failed on every document" in text and '"no html"' in text
    assert "examples: d0, d1, d2 (+37 more)" in text
    assert "[error] edit_stats.status_known" in text and "examples: d7" in text
    assert "[warning] refined_documents.extreme_deletion_share" in text and "threshold share <= 0.1" in text
    assert "row_count" not in text  # passed gates are not listed
    assert lines[-1] == "  note: edit_stats has no rows yet"
    assert text.index("[error]") < text.index("[warning]")


def test_summary_of_a_passing_run_and_of_warnings_only() -> None:
    gates = _gates()
    ok = [GateResult(g, True, "0 of 40 rows", 0.0) for g in gates.values()]
    assert format_summary(ok).startswith(f"validate: passed: 0 of {len(ok)} expectations failed, 0 warnings")
    warned = replace(ok[0], gate=gates["refined_documents.extreme_deletion_share"], passed=False)
    assert format_summary([warned]).startswith("validate: passed: 0 of 1 expectations failed, 1 warning")
    assert not warned.failed and warned.warned


def test_examples_are_distinct_doc_ids() -> None:
    gate = _gates()["refined_documents.key_unique"]
    result = GateResult(gate, False, "4 of 9 rows", 4.0, 4,
                        (Offender(None, "x"), Offender("a", "x"), Offender("a", "y"), Offender("b", "x")))
    assert result.examples(5) == ["a", "b"] and result.examples(1) == ["a"] and result.examples(0) == []


def test_hints_explain_the_common_failures() -> None:
    gates = _gates()
    some = GateResult(gates["refined_documents.expert_failed_share"], False, "", 0.5)
    assert "every document" not in (hint(some) or "")
    assert "every document" in (hint(replace(some, observed_value=1.0)) or "")
    assert "distill" in (hint(GateResult(gates["refined_documents.no_program_share"], False, "", 1.0)) or "")
    assert hint(GateResult(gates["edit_stats.key_unique"], False, "", 2.0)) is None


def test_checks_import_neither_spark_nor_great_expectations() -> None:
    code = ("import sys, refinex.quality.checks; "
            "print([m for m in ('pyspark', 'great_expectations', 'mlflow') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
