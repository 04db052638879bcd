"""Token-budget chunking and per-chunk programs."""
from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refinex.chunking import (
    TRUNCATION_MARKER,
    Chunk,
    chunk_document,
    hf_token_counter,
    merge_chunk_programs,
    program_for_chunk,
    whitespace_token_count,
)
from refinex.program import (
    KeepAll,
    Op,
    ParseError,
    Program,
    RemoveLines,
    RemoveStr,
    execute,
    line_tag,
    number_lines,
)
from refinex.program.execute import Guardrails

LENIENT = Guardrails(max_error_ratio=1.0, min_kept_chars=0)


def check_partition(raw: str, chunks: list[Chunk], count: Any, max_tokens: int) -> None:
    """Every line in exactly one chunk, in order, numbered with global ids, within budget."""
    lines = raw.split("\n")
    assert chunks, "a document always has at least one chunk"
    assert chunks[0].start_line == 0 and chunks[-1].end_line == len(lines) - 1
    for position, chunk in enumerate(chunks):
        assert chunk.index == position
        assert chunk.start_line <= chunk.end_line
        if position:
            assert chunk.start_line == chunks[position - 1].end_line + 1
        assert chunk.n_tokens == count(chunk.text) <= max_tokens
        if chunk.truncated_lines:
            assert chunk.truncated_lines == (chunk.start_line,) == (chunk.end_line,)
            assert chunk.text.startswith(line_tag(chunk.start_line) + " ")
            assert chunk.text.endswith(TRUNCATION_MARKER)
        else:
            shown = lines[chunk.start_line : chunk.end_line + 1]
            assert chunk.text == number_lines(shown, start=chunk.start_line)


# --- chunking ---------------------------------------------------------------------------------


def test_small_document_is_one_chunk() -> None:
    raw = "Title\n\nFirst paragraph.\nSecond one."
    (chunk,) = chunk_document(raw)
    assert chunk == Chunk(0, 0, 3, number_lines(raw.split("\n")), 9, ())
    assert chunk.n_lines == 4
    assert chunk.contains(3) and not chunk.contains(4)


def test_empty_document_has_one_chunk_with_one_line() -> None:
    assert chunk_document("") == [Chunk(0, 0, 0, "[000] ", 1, ())]


def test_greedy_packing_with_global_ids() -> None:
    raw = "\n".join(["a b c"] * 10)  # each numbered line is 4 whitespace tokens
    chunks = chunk_document(raw, max_tokens=9)
    assert [(c.start_line, c.end_line) for c in chunks] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    assert chunks[2].text == "[004] a b c\n[005] a b c"
    check_partition(raw, chunks, whitespace_token_count, 9)


def test_packing_is_greedy() -> None:
    raw = "\n".join("w " * (i % 7) for i in range(200))
    chunks = chunk_document(raw, max_tokens=20)
    check_partition(raw, chunks, whitespace_token_count, 20)
    lines = raw.split("\n")
    for chunk in chunks[:-1]:
        grown = number_lines(lines[chunk.start_line : chunk.end_line + 2], start=chunk.start_line)
        assert whitespace_token_count(grown) > 20


def test_ids_grow_past_999() -> None:
    raw = "\n".join(f"line {i}" for i in range(1200))
    chunks = chunk_document(raw, max_tokens=300)
    check_partition(raw, chunks, whitespace_token_count, 300)
    last = chunks[-1]
    assert last.text.endswith("[1199] line 1199")


def test_over_long_line_gets_its_own_truncated_chunk() -> None:
    long_line = " ".join(f"w{i}" for i in range(100))
    raw = f"short\n{long_line}\nafter"
    chunks = chunk_document(raw, max_tokens=10)
    assert [(c.start_line, c.end_line, c.truncated_lines) for c in chunks] == [
        (0, 0, ()), (1, 1, (1,)), (2, 2, ()),
    ]
    truncated = chunks[1]
    # Tag (1) + 8 words + marker (1) = 10 tokens: the longest prefix that fits.
    assert truncated.text == "[001] w0 w1 w2 w3 w4 w5 w6 w7 " + TRUNCATION_MARKER
    assert truncated.n_tokens == 10
    check_partition(raw, chunks, whitespace_token_count, 10)


def test_truncated_prefix_is_the_longest_that_fits() -> None:
    line = "abcdefghij" * 50
    chunks = chunk_document(line, count_tokens=len, max_tokens=100)
    (chunk,) = chunks
    prefix_len = 100 - len("[000] ") - len(TRUNCATION_MARKER)
    assert chunk.text == f"[000] {line[:prefix_len]}{TRUNCATION_MARKER}"
    assert len(chunk.text) == 100
    assert chunk.truncated_lines == (0,)


def test_budget_too_small_for_a_tag_is_an_error() -> None:
    with pytest.raises(ValueError):
        chunk_document("a b c d e", max_tokens=1)  # "[000]  …[truncated]" is 2 tokens
    assert chunk_document("a b c d e", max_tokens=2)[0].text == "[000]  …[truncated]"
    with pytest.raises(ValueError):
        chunk_document("x", max_tokens=0)


def test_counter_that_is_not_additive_across_line_breaks() -> None:
    def count(text: str) -> int:  # joining lines costs more than the sum of the parts
        breaks = text.count("\n")
        return len(text.split()) + 3 * breaks * breaks

    raw = "\n".join("a b" for _ in range(40))
    chunks = chunk_document(raw, count_tokens=count, max_tokens=30)
    check_partition(raw, chunks, count, 30)
    assert len(chunks) > 1


def test_hf_token_counter_uses_encode_without_special_tokens() -> None:
    calls: list[tuple[str, Any]] = []

    class FakeTokenizer:
        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            calls.append((text, add_special_tokens))
            return [0] * (len(text) // 2 + (1 if add_special_tokens else 0))

    count = hf_token_counter(FakeTokenizer())
    assert count("abcdef") == 3
    assert calls == [("abcdef", False)]
    chunks = chunk_document("abcdefgh\nij", count_tokens=count, max_tokens=8)
    check_partition("abcdefgh\nij", chunks, count, 8)


def test_chunking_does_not_import_transformers() -> None:
    code = "import sys, refinex.chunking; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@settings(max_examples=300)
@given(
    st.lists(st.text(alphabet="ab \t…", max_size=30), min_size=1, max_size=40).map("\n".join),
    st.integers(min_value=3, max_value=40),
)
def test_chunks_partition_any_document(raw: str, max_tokens: int) -> None:
    check_partition(raw, chunk_document(raw, max_tokens=max_tokens), whitespace_token_count, max_tokens)


@settings(max_examples=150)
@given(
    st.lists(st.text(alphabet="ab \n", max_size=60), min_size=1, max_size=20).map("\n".join),
    st.integers(min_value=20, max_value=120),
)
def test_chunks_partition_with_a_character_counter(raw: str, max_tokens: int) -> None:
    check_partition(raw, chunk_document(raw, count_tokens=len, max_tokens=max_tokens), len, max_tokens)


# --- per-chunk programs ---------------------------------------------------------------------


def chunk_at(start: int, end: int) -> Chunk:
    return Chunk(0, start, end, "", 0)


def test_program_for_chunk_clips_and_filters() -> None:
    program = Program(
        (RemoveLines(0, 12), RemoveStr(14, "x"), RemoveStr(25, "y"), RemoveLines(18, 30), KeepAll())
    )
    assert program_for_chunk(program, chunk_at(10, 19)).ops == (
        RemoveLines(10, 12), RemoveStr(14, "x"), RemoveLines(18, 19),
    )
    assert program_for_chunk(program, chunk_at(20, 29)).ops == (RemoveStr(25, "y"), RemoveLines(20, 29))
    assert program_for_chunk(program, chunk_at(40, 49)).ops == (KeepAll(),)
    assert program_for_chunk(Program(), chunk_at(0, 9)).ops == (KeepAll(),)


def test_program_for_chunk_leaves_out_ranges_execution_rejects() -> None:
    program = Program((RemoveLines(5, 6), RemoveLines(3, 7), RemoveLines(9, 8), RemoveLines(2, 3)))
    # (3, 7) overlaps (5, 6) and (9, 8) is a bad range: neither would delete anything.
    assert program_for_chunk(program, chunk_at(0, 4)).ops == (RemoveLines(2, 3),)
    assert program_for_chunk(program, chunk_at(7, 9)).ops == (KeepAll(),)


def test_program_for_chunk_drops_parse_errors() -> None:
    program = Program((RemoveLines(1, 1),), (ParseError(0, "x", "bad"),))
    assert program_for_chunk(program, chunk_at(0, 5)).errors == ()


def test_merge_concatenates_drops_keep_all_and_coalesces() -> None:
    error = ParseError(3, "oops", "bad")
    merged = merge_chunk_programs(
        [
            Program((RemoveLines(0, 1), KeepAll(), RemoveStr(3, "a"), RemoveLines(8, 9))),
            Program((KeepAll(),), (error,)),
            Program((RemoveLines(10, 12), RemoveStr(11, "b"), RemoveLines(12, 14), RemoveLines(20, 20))),
            Program((RemoveLines(5, 4), RemoveLines(2, 2))),
        ]
    )
    assert merged.ops == (
        RemoveLines(0, 2),  # (0, 1) and the later (2, 2) touch
        RemoveStr(3, "a"),
        RemoveLines(8, 14),  # (8, 9), (10, 12) and (12, 14)
        RemoveStr(11, "b"),
        RemoveLines(20, 20),
        RemoveLines(5, 4),  # ill-formed: left for execution to reject
    )
    assert merged.errors == (error,)


def test_merge_of_keep_all_only_and_of_nothing() -> None:
    assert merge_chunk_programs([Program((KeepAll(),)), Program((KeepAll(),))]).ops == (KeepAll(),)
    assert merge_chunk_programs([Program(), Program()]).ops == ()
    assert merge_chunk_programs([]).ops == ()


@st.composite
def documents_and_programs(draw: st.DrawFn) -> tuple[str, Program, int]:
    lines = draw(st.lists(st.text(alphabet="ab c", max_size=12), min_size=1, max_size=25))
    raw = "\n".join(lines)
    n = len(lines)
    line_id = st.integers(min_value=0, max_value=n - 1)
    needle = st.one_of(
        st.text(alphabet="abc", max_size=2),
        st.builds(
            lambda i, a, b: lines[i][min(a, b) : max(a, b)],
            line_id, st.integers(0, 12), st.integers(0, 12),
        ),
    )
    op = st.one_of(
        st.builds(RemoveLines, line_id, line_id),
        st.builds(lambda a, k: RemoveLines(a, min(a + k, n - 1)), line_id, st.integers(0, 6)),
        st.builds(RemoveStr, line_id, needle),
        st.just(KeepAll()),
    )
    program = Program(tuple(draw(st.lists(op, max_size=15))))
    return raw, program, draw(st.integers(min_value=4, max_value=30))


@settings(max_examples=500)
@given(documents_and_programs())
def test_merging_per_chunk_programs_preserves_execution(case: tuple[str, Program, int]) -> None:
    raw, program, max_tokens = case
    chunks = chunk_document(raw, max_tokens=max_tokens)
    per_chunk = [program_for_chunk(program, chunk) for chunk in chunks]
    for chunk, chunk_program in zip(chunks, per_chunk):
        for op in chunk_program.ops:
            if isinstance(op, RemoveLines):
                assert chunk.start_line <= op.start <= op.end <= chunk.end_line
            elif isinstance(op, RemoveStr):
                assert chunk.contains(op.line)
    merged = merge_chunk_programs(per_chunk)
    assert execute(merged, raw, LENIENT).text == execute(program, raw, LENIENT).text
    ranges = sorted((op.start, op.end) for op in merged.ops if isinstance(op, RemoveLines))
    assert all(prev[1] + 1 < nxt[0] for prev, nxt in zip(ranges, ranges[1:]))


def test_merge_round_trip_on_a_realistic_document() -> None:
    lines = ["Home | News | Sport", "Cookie notice: we use cookies"]
    lines += [f"Paragraph {i} of the article, with several words in it." for i in range(30)]
    lines += ["Share this article", "Copyright 2024"]
    raw = "\n".join(lines)
    ops: tuple[Op, ...] = (
        RemoveLines(0, 1),
        RemoveStr(10, " with several words"),
        RemoveLines(31, 33),
        KeepAll(),
    )
    program = Program(ops)
    chunks = chunk_document(raw, max_tokens=40)
    assert len(chunks) > 3
    merged = merge_chunk_programs([program_for_chunk(program, chunk) for chunk in chunks])
    assert merged.ops == ops[:3]
    assert execute(merged, raw).text == execute(program, raw).text
