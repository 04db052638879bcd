"""The tagging head's pure core: labels from distilled programs, programs from probabilities."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refinex.chunking import chunk_document, program_for_chunk, whitespace_token_count
from refinex.distill import distill
from refinex.model.tagging import (
    LabelledLines,
    choose_threshold,
    chunk_labels,
    decide_lines,
    kept_char_f1,
    program_for_lines,
)
from refinex.program import KeepAll, RemoveLines, execute, parse, render_program

WORDS = "alpha beta gamma delta river stone cloud market garden winter paper light".split()


@st.composite
def documents_with_deletions(draw: st.DrawFn) -> tuple[list[str], list[bool]]:
    """Unique non-blank lines (some blank lines between) and which ones an expert deleted."""
    n = draw(st.integers(1, 30))
    lines, deleted = [], []
    for i in range(n):
        if i and draw(st.integers(0, 5)) == 0:
            lines.append("")
            deleted.append(False)
        words = draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=8))
        lines.append(f"line{i} " + " ".join(words))
        deleted.append(draw(st.booleans()))
    return lines, deleted


@settings(max_examples=150, deadline=None)
@given(documents_with_deletions(), st.integers(4, 40))
def test_labels_are_exactly_the_distilled_deletions(doc: tuple[list[str], list[bool]], max_tokens: int) -> None:
    lines, deleted = doc
    raw = "\n".join(lines)
    refined = "\n".join(line for line, gone in zip(lines, deleted) if line and not gone)
    program = distill(raw, refined)
    labels: list = []
    for chunk in chunk_document(raw, whitespace_token_count, max_tokens=max_tokens):
        part = program_for_chunk(program, chunk)
        labels.extend(chunk_labels(lines[chunk.start_line : chunk.end_line + 1], chunk.start_line,
                                   render_program(part)))
    assert len(labels) == len(lines)
    for line, gone, label in zip(lines, deleted, labels):
        if line:
            assert label is gone, (line, gone, label)
        else:
            assert label is None


def test_labels_count_remove_lines_only_and_clip_to_the_chunk() -> None:
    lines = ["a menu", "", "some text here", "more text"]
    labels = chunk_labels(lines, 10, 'remove_lines(8, 11)\nremove_str(12, "text")\n')
    assert labels == [True, None, False, False]
    with pytest.raises(ValueError, match="parse error"):
        chunk_labels(lines, 10, "remove_lines(10, \n")


@st.composite
def tagged_chunks(draw: st.DrawFn) -> tuple[list[str], list[float], int, float]:
    n = draw(st.integers(1, 60))
    text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n"), max_size=30)
    lines = draw(st.lists(st.one_of(st.just(""), st.just("   "), text), min_size=n, max_size=n))
    probabilities = draw(st.lists(st.floats(0.0, 1.0), min_size=n, max_size=n))
    first = draw(st.integers(0, 5000))
    threshold = draw(st.floats(0.01, 1.0))
    return lines, probabilities, first, threshold


@settings(max_examples=300, deadline=None)
@given(tagged_chunks(), st.integers(0, 20))
def test_programs_from_any_probabilities_parse_and_execute_cleanly(
    chunk: tuple[list[str], list[float], int, float], after: int
) -> None:
    lines, probabilities, first, threshold = chunk
    removed = decide_lines(probabilities, lines, threshold)
    text = render_program(program_for_lines(removed, first))
    parsed = parse(text)
    assert not parsed.errors
    document = ["context"] * first + lines + ["tail"] * after
    result = execute(parsed, "\n".join(document))
    assert result.ops_rejected == () and result.ops_applied == result.ops_total == len(parsed.ops)


def test_blank_lines_follow_the_line_above() -> None:
    lines = ["", "menu", "", "  ", "content", ""]
    removed = decide_lines([0.0, 0.9, 0.99, 0.0, 0.1, 0.9], lines, 0.5)
    assert removed == [True, True, True, True, False, False]  # leading blanks follow the first line below
    assert program_for_lines(removed, 7).ops == (RemoveLines(7, 10),)
    assert program_for_lines([False, False]).ops == (KeepAll(),)


@given(st.lists(st.tuples(st.floats(0, 1), st.booleans(), st.text(min_size=1, max_size=20).filter(str.strip)),
                min_size=1, max_size=30), st.floats(0.05, 0.95), st.floats(0.05, 0.95))
def test_a_stricter_threshold_deletes_a_subset(rows: list, low: float, high: float) -> None:
    low, high = min(low, high), max(low, high)
    lines = [r[2] for r in rows]
    probabilities = [r[0] for r in rows]
    loose = decide_lines(probabilities, lines, low)
    strict = decide_lines(probabilities, lines, high)
    assert all(a or not b for a, b in zip(loose, strict))


def test_threshold_choice_on_out_of_fold_probabilities() -> None:
    lines = ("Home | News", "A long paragraph of real content that matters.", "Share", "Another real sentence here.")
    labels = (True, False, True, False)
    chunk = LabelledLines(lines, labels, (0.7, 0.3, 0.65, 0.4))
    choice = choose_threshold([chunk])
    assert 0.4 < choice.threshold <= 0.65 and choice.f1 == pytest.approx(1.0)
    assert kept_char_f1([chunk], 0.2) < 1.0
    assert choose_threshold([]).threshold == 0.5
