"""Execution semantics, guardrails and accounting of programs."""
from __future__ import annotations

import time
from typing import Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refinex import status
from refinex.program import (
    BAD_RANGE,
    EMPTY_STRING,
    LINE_OUT_OF_RANGE,
    LINE_REMOVED,
    OVERLAP,
    REJECT_REASONS,
    STRING_NOT_FOUND,
    Guardrails,
    KeepAll,
    Op,
    ParseError,
    Program,
    RejectedOp,
    RemoveLines,
    RemoveStr,
    execute,
    execute_text,
    parse,
)

LENIENT = Guardrails(max_error_ratio=1.0, min_kept_chars=0)
BODY = "This paragraph is the actual content of the page and it is long enough to keep."


def run(ops: list[Op], raw: str, guardrails: Guardrails = LENIENT) -> tuple[str, list[Optional[str]]]:
    """The text and, per op, the rejection reason (None when applied)."""
    result = execute(Program(tuple(ops)), raw, guardrails)
    reasons: dict[int, str] = {}
    for rejected in result.ops_rejected:
        index = next(i for i, op in enumerate(ops) if op is rejected.op and i not in reasons)
        reasons[index] = rejected.reason
    return result.text, [reasons.get(i) for i in range(len(ops))]


# --- remove_lines -------------------------------------------------------------------------


def test_remove_lines_removes_inclusive_ranges_with_their_breaks() -> None:
    raw = "l0\nl1\nl2\nl3\nl4"
    assert run([RemoveLines(1, 2)], raw) == ("l0\nl3\nl4", [None])
    assert run([RemoveLines(0, 0), RemoveLines(4, 4)], raw) == ("l1\nl2\nl3", [None, None])
    assert run([RemoveLines(0, 4)], raw) == ("", [None])


@pytest.mark.parametrize(
    "op, reason",
    [
        (RemoveLines(3, 2), BAD_RANGE),
        (RemoveLines(2, 5), LINE_OUT_OF_RANGE),
        (RemoveLines(5, 5), LINE_OUT_OF_RANGE),
        (RemoveLines(-1, 1), LINE_OUT_OF_RANGE),
        (RemoveLines(9, 3), BAD_RANGE),
    ],
)
def test_remove_lines_rejections(op: RemoveLines, reason: str) -> None:
    raw = "l0\nl1\nl2\nl3\nl4"
    assert run([op], raw) == (raw, [reason])


def test_remove_lines_overlap_is_judged_against_accepted_ranges_only() -> None:
    raw = "\n".join(f"l{i}" for i in range(10))
    ops: list[Op] = [
        RemoveLines(2, 4),
        RemoveLines(4, 6),  # overlaps the first: rejected
        RemoveLines(5, 20),  # out of range: rejected, blocks nothing
        RemoveLines(5, 6),  # accepted: the rejected ops above do not count
        RemoveLines(1, 1),  # adjacent is not overlapping
        RemoveLines(0, 9),  # covers everything accepted: overlap
    ]
    text, reasons = run(ops, raw)
    assert reasons == [None, OVERLAP, LINE_OUT_OF_RANGE, None, None, OVERLAP]
    assert text == "l0\nl7\nl8\nl9"


# --- remove_str -----------------------------------------------------------------------------


def test_remove_str_deletes_the_first_occurrence() -> None:
    assert run([RemoveStr(1, "ab")], "ab\nxxabyyab") == ("ab\nxxyyab", [None])


def test_remove_str_always_refers_to_the_original_line() -> None:
    # After deleting "b", "ac" is adjacent in the output but not a substring of the original.
    assert run([RemoveStr(0, "b"), RemoveStr(0, "ac")], "abc") == ("ac", [None, STRING_NOT_FOUND])


def test_remove_str_skips_occurrences_overlapping_deleted_spans() -> None:
    assert run([RemoveStr(0, "ab"), RemoveStr(0, "ab")], "abab") == ("", [None, None])
    assert run([RemoveStr(0, "aa"), RemoveStr(0, "aa")], "aaaa") == ("", [None, None])
    assert run([RemoveStr(0, "aa"), RemoveStr(0, "aa")], "aaa") == ("a", [None, OVERLAP])
    assert run([RemoveStr(0, "bc"), RemoveStr(0, "abc")], "abc abc") == ("a ", [None, None])
    assert run([RemoveStr(0, "b"), RemoveStr(0, "abc")], "abc") == ("ac", [None, OVERLAP])


@pytest.mark.parametrize(
    "op, reason",
    [
        (RemoveStr(3, "x"), LINE_OUT_OF_RANGE),
        (RemoveStr(-1, "x"), LINE_OUT_OF_RANGE),
        (RemoveStr(3, ""), LINE_OUT_OF_RANGE),
        (RemoveStr(0, ""), EMPTY_STRING),
        (RemoveStr(1, ""), EMPTY_STRING),
        (RemoveStr(1, "zzz"), LINE_REMOVED),
        (RemoveStr(1, "one"), LINE_REMOVED),
        (RemoveStr(2, "nope"), STRING_NOT_FOUND),
        (RemoveStr(2, "TWO"), STRING_NOT_FOUND),
    ],
)
def test_remove_str_rejections(op: RemoveStr, reason: str) -> None:
    raw = "zero\none\ntwo"
    # remove_str is evaluated after remove_lines wherever it appears in the source.
    text, reasons = run([op, RemoveLines(1, 1)], raw)
    assert reasons == [reason, None]
    assert text == "zero\ntwo"


def test_keep_all_is_a_no_op_alone_or_mixed() -> None:
    assert run([KeepAll()], "a\nb") == ("a\nb", [None])
    assert run([KeepAll(), RemoveLines(0, 0), KeepAll()], "a\nb") == ("b", [None, None, None])


def test_rejections_are_reported_in_source_order() -> None:
    ops: list[Op] = [RemoveStr(0, "zz"), RemoveLines(5, 6), RemoveStr(9, "a"), RemoveLines(2, 1)]
    result = execute(Program(tuple(ops)), "abc\ndef", LENIENT)
    assert result.ops_rejected == (
        RejectedOp(ops[0], STRING_NOT_FOUND),
        RejectedOp(ops[1], LINE_OUT_OF_RANGE),
        RejectedOp(ops[2], LINE_OUT_OF_RANGE),
        RejectedOp(ops[3], BAD_RANGE),
    )
    assert result.rejected_by_reason() == {STRING_NOT_FOUND: 1, LINE_OUT_OF_RANGE: 2, BAD_RANGE: 1}


# --- statuses and accounting --------------------------------------------------------------------


def test_refined_result_accounting() -> None:
    raw = f"Home | News | Login\n{BODY}\nShare this article on Facebook\n{BODY}"
    program = parse('remove_lines(0, 0)\nremove_str(2, " on Facebook")\nkeep_all()\nbogus')
    result = execute(program, raw)
    expected = f"{BODY}\nShare this article\n{BODY}"
    assert result.status == status.REFINED
    assert result.text == expected
    assert (result.ops_total, result.ops_applied, result.ops_rejected) == (3, 3, ())
    assert (result.n_remove_lines, result.n_remove_str, result.n_keep_all) == (1, 1, 1)
    assert result.parse_errors == 1 and result.n_errors == 1
    assert (result.chars_in, result.chars_out) == (len(raw), len(expected))
    assert result.chars_removed == len(raw) - len(expected)
    assert (result.lines_in, result.lines_out, result.lines_removed) == (4, 3, 1)
    assert result.deletion_ratio == pytest.approx((len(raw) - len(expected)) / len(raw))
    assert result.rejected_by_reason() == {}


def test_unchanged_when_nothing_is_deleted() -> None:
    result = execute(parse("keep_all()"), BODY)
    assert (result.status, result.text, result.chars_removed, result.deletion_ratio) == (
        status.UNCHANGED, BODY, 0, 0.0,
    )
    # A tolerated minority of errors that deletes nothing is still "unchanged".
    result = execute(parse('keep_all()\nkeep_all()\nremove_str(0, "absent")'), BODY)
    assert result.status == status.UNCHANGED
    assert result.rejected_by_reason() == {STRING_NOT_FOUND: 1}


def test_empty_program_and_empty_document() -> None:
    result = execute(Program(), BODY)
    assert (result.status, result.text, result.ops_total) == (status.UNCHANGED, BODY, 0)
    result = execute(Program(), "")
    assert (result.status, result.text, result.chars_in, result.deletion_ratio) == (
        status.UNCHANGED, "", 0, 0.0,
    )
    assert result.lines_in == 1


def test_fallback_raw_when_errors_exceed_the_ratio() -> None:
    raw = f"nav\n{BODY}\nfooter"
    # 1 applied op, 1 rejected op, 1 parse error: 2 / 3 > 0.5.
    program = parse("remove_lines(0, 0)\nremove_lines(7, 9)\nremove_lines(x)")
    result = execute(program, raw)
    assert result.status == status.FALLBACK_RAW
    assert result.text == raw
    assert (result.ops_total, result.ops_applied, result.parse_errors) == (2, 1, 1)
    assert result.rejected_by_reason() == {LINE_OUT_OF_RANGE: 1}
    assert (result.chars_out, result.chars_removed, result.deletion_ratio) == (len(raw), 0, 0.0)
    assert (result.lines_out, result.lines_removed) == (3, 0)


def test_error_ratio_at_the_limit_is_tolerated() -> None:
    raw = f"nav\n{BODY}"
    result = execute(Program((RemoveLines(0, 0), RemoveLines(5, 5))), raw)  # 1 / 2 == 0.5
    assert result.status == status.REFINED
    assert result.text == BODY
    strict = Guardrails(max_error_ratio=0.49)
    assert execute(Program((RemoveLines(0, 0), RemoveLines(5, 5))), raw, strict).status == (
        status.FALLBACK_RAW
    )


def test_only_parse_errors_fall_back() -> None:
    result = execute_text("garbage\nmore garbage", BODY)
    assert result.status == status.FALLBACK_RAW
    assert (result.ops_total, result.parse_errors, result.text) == (0, 2, BODY)
    zero_tolerance = Guardrails(max_error_ratio=0.0)
    assert execute_text("keep_all()", BODY, zero_tolerance).status == status.UNCHANGED


def test_dropped_when_too_little_is_left() -> None:
    raw = "Home\nAbout\nContact\n  short text  "
    result = execute(Program((RemoveLines(0, 2),)), raw)
    assert result.status == status.DROPPED
    assert result.text == ""
    assert (result.chars_out, result.chars_removed, result.deletion_ratio) == (0, len(raw), 1.0)
    assert (result.lines_out, result.lines_removed) == (0, 4)
    # Exactly min_kept_chars non-whitespace characters are enough.
    kept = " ".join(["x" * 10] * 5)
    assert execute(Program((RemoveLines(0, 0),)), f"nav\n{kept}").status == status.REFINED
    assert execute(Program((RemoveLines(0, 0),)), f"nav\n{kept[:-1]}").status == status.DROPPED


def test_short_documents_are_not_dropped_when_nothing_was_deleted() -> None:
    assert execute(Program((KeepAll(),)), "tiny").status == status.UNCHANGED
    assert execute(Program((RemoveStr(0, "zz"),)), "tiny", Guardrails(max_error_ratio=1.0)).status == (
        status.UNCHANGED
    )


def test_guardrails_validate_their_values() -> None:
    assert Guardrails() == Guardrails(max_error_ratio=0.5, min_kept_chars=50)
    with pytest.raises(ValueError):
        Guardrails(max_error_ratio=1.5)
    with pytest.raises(ValueError):
        Guardrails(min_kept_chars=-1)


def test_statuses_are_from_the_closed_set() -> None:
    assert {status.REFINED, status.UNCHANGED, status.DROPPED, status.FALLBACK_RAW} <= set(
        status.ALL_STATUSES
    )
    assert set(REJECT_REASONS) == {
        LINE_OUT_OF_RANGE, BAD_RANGE, STRING_NOT_FOUND, OVERLAP, EMPTY_STRING, LINE_REMOVED,
    }


def test_parse_errors_are_counted_even_without_ops() -> None:
    program = Program((), (ParseError(0, "x", "bad"),))
    assert execute(program, BODY, LENIENT).parse_errors == 1


# --- reference model and properties -----------------------------------------------------------


def reference_execute(ops: tuple[Op, ...], raw: str) -> tuple[str, list[Optional[str]]]:
    """A slow, obviously-correct model of the semantics using per-character masks."""
    lines = raw.split("\n")
    n = len(lines)
    line_gone = [False] * n
    reasons: list[Optional[str]] = [None] * len(ops)
    for i, op in enumerate(ops):
        if isinstance(op, RemoveLines):
            if op.start > op.end:
                reasons[i] = BAD_RANGE
            elif op.start < 0 or op.end >= n:
                reasons[i] = LINE_OUT_OF_RANGE
            elif any(line_gone[op.start : op.end + 1]):
                reasons[i] = OVERLAP
            else:
                for j in range(op.start, op.end + 1):
                    line_gone[j] = True
    deleted = [[False] * len(line) for line in lines]
    for i, op in enumerate(ops):
        if isinstance(op, RemoveStr):
            if not 0 <= op.line < n:
                reasons[i] = LINE_OUT_OF_RANGE
                continue
            if op.text == "":
                reasons[i] = EMPTY_STRING
                continue
            if line_gone[op.line]:
                reasons[i] = LINE_REMOVED
                continue
            line, mask, width = lines[op.line], deleted[op.line], len(op.text)
            starts = [p for p in range(len(line) - width + 1) if line[p : p + width] == op.text]
            free = [p for p in starts if not any(mask[p : p + width])]
            if not starts:
                reasons[i] = STRING_NOT_FOUND
            elif not free:
                reasons[i] = OVERLAP
            else:
                for p in range(free[0], free[0] + width):
                    mask[p] = True
    kept = [
        "".join(c for c, gone in zip(line, deleted[j]) if not gone)
        for j, line in enumerate(lines)
        if not line_gone[j]
    ]
    return "\n".join(kept), reasons


@st.composite
def documents_and_programs(draw: st.DrawFn) -> tuple[str, tuple[Op, ...]]:
    lines = draw(st.lists(st.text(alphabet="ab \t…", max_size=8), min_size=1, max_size=8))
    raw = "\n".join(lines)
    n = len(lines)
    line_id = st.integers(min_value=-1, max_value=n + 1)
    needle = st.one_of(
        st.text(alphabet="ab…", max_size=3),
        st.builds(
            lambda i, a, b: lines[i % n][min(a, b) : max(a, b)],
            line_id, st.integers(0, 8), st.integers(0, 8),
        ),
    )
    op = st.one_of(
        st.builds(RemoveLines, line_id, line_id),
        st.builds(RemoveStr, line_id, needle),
        st.just(KeepAll()),
    )
    return raw, tuple(draw(st.lists(op, max_size=12)))


@settings(max_examples=600)
@given(documents_and_programs())
def test_execution_matches_the_reference_model(case: tuple[str, tuple[Op, ...]]) -> None:
    raw, ops = case
    text, reasons = reference_execute(ops, raw)
    result = execute(Program(ops), raw, LENIENT)
    assert result.text == text
    assert [r.reason for r in result.ops_rejected] == [r for r in reasons if r is not None]
    assert [r.op for r in result.ops_rejected] == [op for op, r in zip(ops, reasons) if r is not None]


def is_subsequence(small: str, big: str) -> bool:
    chars = iter(big)
    return all(c in chars for c in small)


@settings(max_examples=400)
@given(documents_and_programs(), st.floats(0.0, 1.0), st.integers(0, 20))
def test_result_is_a_subsequence_and_accounting_is_consistent(
    case: tuple[str, tuple[Op, ...]], max_error_ratio: float, min_kept_chars: int
) -> None:
    raw, ops = case
    guardrails = Guardrails(max_error_ratio, min_kept_chars)
    result = execute(Program(ops), raw, guardrails)
    assert is_subsequence(result.text, raw)
    assert result.status in status.ALL_STATUSES
    assert result.ops_total == len(ops) == result.ops_applied + len(result.ops_rejected)
    assert result.n_remove_lines + result.n_remove_str + result.n_keep_all == len(ops)
    assert result.chars_in == len(raw) and result.chars_out == len(result.text)
    assert result.chars_removed == result.chars_in - result.chars_out >= 0
    assert result.lines_removed == result.lines_in - result.lines_out >= 0
    assert sum(result.rejected_by_reason().values()) == len(result.ops_rejected)
    assert set(result.rejected_by_reason()) <= set(REJECT_REASONS)
    if result.status == status.FALLBACK_RAW:
        assert result.text == raw and result.n_errors > 0
    elif result.status == status.DROPPED:
        assert result.text == "" and raw != ""
    elif result.status == status.UNCHANGED:
        assert result.text == raw
    else:
        assert result.text != raw
        assert len("".join(result.text.split())) >= min_kept_chars


@settings(max_examples=200)
@given(st.text(), st.text(max_size=200))
def test_execute_text_never_raises(program_text: str, raw: str) -> None:
    result = execute_text(program_text, raw)
    assert is_subsequence(result.text, raw)


# --- performance -------------------------------------------------------------------------------


def test_large_document_with_thousands_of_ops_is_fast() -> None:
    lines = [f"line {i} " + "lorem ipsum dolor sit amet " * 6 for i in range(30_000)]
    raw = "\n".join(lines)
    assert len(raw) > 5_000_000
    ops: list[Op] = [RemoveLines(i, i + 1) for i in range(0, 30_000, 10)]
    ops += [RemoveStr(i, "ipsum") for i in range(5, 30_000, 10) for _ in range(3)]
    ops += [RemoveStr(i, "nowhere") for i in range(7, 30_000, 30)]
    single_line = "a" * 1_000_000
    started = time.perf_counter()
    result = execute(Program(tuple(ops)), raw)
    many_on_one_line = execute(Program(tuple(RemoveStr(0, "a") for _ in range(3000))), single_line)
    elapsed = time.perf_counter() - started
    assert result.status == status.REFINED
    assert result.ops_applied == 3000 + 9000
    assert result.rejected_by_reason() == {STRING_NOT_FOUND: 1000}
    assert result.lines_out == 24_000
    assert many_on_one_line.chars_out == 1_000_000 - 3000
    assert elapsed < 20
