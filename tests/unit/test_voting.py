"""Line-vote decoding: one chunk program from sampled ones."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refinex.model.voting import vote_program
from refinex.program import Guardrails, execute, parse
from refinex.program.render import quote_string

STRICT = Guardrails(max_error_ratio=0.0, min_kept_chars=0)
LINES = ["Home | News", "", "The cat sat on the mat.", "Share on Facebook", "", "It was warm.", "", "(c) 2024"]
FIRST = 40  # chunk ids start here: document-global


def removed_lines(program: str, lines: list[str], first: int) -> set[int]:
    """Global ids of the lines ``program`` removes whole (checked by executing it)."""
    raw = "\n".join(["pad"] * first + lines)
    result = execute(parse(program), raw, STRICT)
    assert not result.ops_rejected and not parse(program).errors, program
    out = set()
    for op in parse(program).ops:
        if op.name == "remove_lines":
            out.update(range(op.start, op.end + 1))
    return out


def test_majority_decides_each_line_and_blank_lines_follow_the_line_above() -> None:
    samples = [
        "remove_lines(40, 41)\nremove_lines(43, 44)\n",
        "remove_lines(40, 41)\nremove_lines(43, 45)\n",  # overshoots into the prose
        "remove_lines(40, 41)\n",
    ]
    program = vote_program(samples, FIRST, LINES, 0.5)
    # 43 has 2 of 3 votes, 45 only 1; blank 41 follows 40, blank 44 follows 43
    assert program == "remove_lines(40, 41)\nremove_lines(43, 44)\n"
    assert vote_program(samples, FIRST, LINES, 0.7) == "remove_lines(40, 41)\n"
    assert vote_program(samples, FIRST, LINES, 0.3) == "remove_lines(40, 41)\nremove_lines(43, 46)\n"


def test_weights_and_keep_all() -> None:
    samples = ["keep_all()\n", "remove_lines(47, 47)\n"]
    assert vote_program(samples, FIRST, LINES, 0.5) == "remove_lines(47, 47)\n"  # 1 of 2 >= 0.5
    assert vote_program(samples, FIRST, LINES, 0.5, weights=[2.0, 1.0]) == "keep_all()\n"
    assert vote_program(["keep_all()\n"] * 3, FIRST, LINES, 0.1) == "keep_all()\n"


def test_remove_str_votes_skip_removed_lines_and_overlaps() -> None:
    samples = [
        'remove_str(42, "The cat ")\nremove_lines(47, 47)\n',
        'remove_str(42, "The cat ")\nremove_str(42, "cat sat")\n',
        'remove_str(42, "cat sat")\nremove_str(45, "It ")\nremove_lines(45, 46)\n',
    ]
    # "The cat " (2 votes) wins line 42; "cat sat" (2 votes, later) overlaps it and is dropped
    program = vote_program(samples, FIRST, LINES, 0.6)
    assert program == 'remove_str(42, "The cat ")\n'
    # at 1/3 line 45 goes whole, so its remove_str goes with it; 47 goes too
    program = vote_program(samples, FIRST, LINES, 0.3)
    assert program == 'remove_str(42, "The cat ")\nremove_lines(45, 47)\n'
    removed_lines(program, LINES, FIRST)  # executes with no rejected operation


def test_garbage_and_out_of_chunk_ids_count_as_no_deletion() -> None:
    samples = ["remove_lines(0, 39)\nremove_lines(40, 99)\n", "this is not a program\n", "remove_lines(40, 40)\n"]
    # line 40 has 2 votes (the range is clipped to the chunk), the rest 1
    assert vote_program(samples, FIRST, LINES, 0.6) == "remove_lines(40, 41)\n"


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        vote_program([], FIRST, LINES, 0.5)
    for threshold in (0.0, 1.2):
        with pytest.raises(ValueError):
            vote_program(["keep_all()\n"], FIRST, LINES, threshold)
    with pytest.raises(ValueError):
        vote_program(["keep_all()\n"], FIRST, LINES, 0.5, weights=[1.0, 1.0])
    with pytest.raises(ValueError):
        vote_program(["keep_all()\n"], FIRST, LINES, 0.5, weights=[0.0])


@st.composite
def chunks_and_samples(draw: st.DrawFn) -> tuple[list[str], int, list[str]]:
    words = st.sampled_from(["a", "ab", "b a", "Home", "é", "x y", " ", ""])
    lines = draw(st.lists(st.builds(lambda ws: "".join(ws), st.lists(words, max_size=4)), min_size=1, max_size=9))
    first = draw(st.integers(0, 30))
    samples = []
    for _ in range(draw(st.integers(1, 6))):
        ops = []
        for _ in range(draw(st.integers(0, 4))):
            if draw(st.booleans()):
                a = draw(st.integers(first - 2, first + len(lines) + 1))
                b = draw(st.integers(a, first + len(lines) + 2))
                ops.append(f"remove_lines({max(a, 0)}, {b})")
            else:
                line = draw(st.integers(first, first + len(lines) - 1))
                text = lines[line - first]
                lo = draw(st.integers(0, len(text)))
                hi = draw(st.integers(lo, len(text)))
                if text[lo:hi]:
                    ops.append(f"remove_str({line}, {quote_string(text[lo:hi])})")
        samples.append("".join(op + "\n" for op in ops) or "keep_all()\n")
    return lines, first, samples


@settings(max_examples=300, deadline=None)
@given(chunks_and_samples(), st.floats(0.05, 1.0))
def test_votes_always_give_a_valid_program_and_higher_thresholds_delete_less(
    case: tuple[list[str], int, list[str]], threshold: float
) -> None:
    lines, first, samples = case
    program = vote_program(samples, first, lines, threshold)
    removed = removed_lines(program, lines, first)  # parses, executes without rejection
    assert all(first <= i < first + len(lines) for i in removed)
    stricter = removed_lines(vote_program(samples, first, lines, min(1.0, threshold + 0.25)), lines, first)
    content = {first + i for i, line in enumerate(lines) if line.strip()}
    assert stricter & content <= removed & content
    # unanimous deletions of non-blank lines always survive
    unanimous = set.intersection(*(removed_lines(s, lines, first) if not parse(s).errors else set()
                                   for s in [vote_program([s], first, lines, 1.0) for s in samples]))
    assert unanimous & content <= removed
