"""Line labels of the tagging head and the programs it writes: pure, no torch.

Training labels come from a chunk's distilled program: a line is *removed* when an
in-range ``remove_lines`` covers it. Blank lines are layout, as for the distiller: they
carry no label and, when decoding, follow the nearest non-blank line above them
(:func:`refinex.distill.settle_blank_lines`). A program is the runs of removed lines as
``remove_lines`` over document-global ids (``keep_all()`` when there is none), so it is
valid by construction: ranges inside the chunk, disjoint, ascending.

The deletion threshold is chosen on out-of-fold probabilities of the training documents,
maximising the F1 of the characters kept against the labels' kept characters: the text a
refined document keeps is what the extraction scores judge.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

from refinex.distill import settle_blank_lines
from refinex.evaluation.scores import f1_score, ratio
from refinex.program import parse
from refinex.program.ops import KeepAll, Program, RemoveLines

__all__ = [
    "DEFAULT_THRESHOLD",
    "THRESHOLD_GRID",
    "LabelledLines",
    "ThresholdChoice",
    "chunk_labels",
    "choose_threshold",
    "decide_lines",
    "kept_char_f1",
    "program_for_lines",
]

DEFAULT_THRESHOLD = 0.5
THRESHOLD_GRID: tuple[float, ...] = tuple(round(0.05 + 0.025 * i, 3) for i in range(37))  # 0.05 .. 0.95


def chunk_labels(
    lines: Sequence[str], first_line: int, program: Union[Program, str]
) -> list[Optional[bool]]:
    """Per line of a chunk (global ids ``first_line ..``): removed (``True``), kept
    (``False``) or no label (``None``, a blank line).

    Only ``remove_lines`` counts; ranges are clipped to the chunk. A program with parse
    errors raises ``ValueError``: a partial label would teach keeping what was deleted.
    """
    parsed = parse(program) if isinstance(program, str) else program
    if parsed.errors:
        raise ValueError(f"the program has {len(parsed.errors)} parse error(s): {parsed.errors[0].message}")
    last_line = first_line + len(lines) - 1
    removed = [False] * len(lines)
    for op in parsed.ops:
        if not isinstance(op, RemoveLines) or op.start < 0 or op.start > op.end:
            continue
        for line_id in range(max(op.start, first_line), min(op.end, last_line) + 1):
            removed[line_id - first_line] = True
    return [flag if line.strip() else None for line, flag in zip(lines, removed)]


def decide_lines(probabilities: Sequence[float], lines: Sequence[str], threshold: float) -> list[bool]:
    """Removed lines: non-blank lines with probability >= ``threshold``; blank lines follow
    the nearest non-blank line above them."""
    if len(probabilities) != len(lines):
        raise ValueError(f"{len(probabilities)} probabilities for {len(lines)} lines")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    removed = [bool(line.strip()) and float(p) >= threshold for p, line in zip(probabilities, lines)]
    settle_blank_lines(lines, removed)
    return removed


def program_for_lines(removed: Sequence[bool], first_line: int = 0) -> Program:
    """``remove_lines`` for each run of removed lines (global ids), else ``keep_all()``."""
    ops: list[RemoveLines] = []
    start: Optional[int] = None
    for index, flag in enumerate(list(removed) + [False]):
        if flag and start is None:
            start = index
        elif not flag and start is not None:
            ops.append(RemoveLines(first_line + start, first_line + index - 1))
            start = None
    return Program(tuple(ops)) if ops else Program((KeepAll(),))


@dataclass(frozen=True)
class LabelledLines:
    """One chunk's lines, their labels (:func:`chunk_labels`) and predicted probabilities."""

    lines: tuple[str, ...]
    labels: tuple[Optional[bool], ...]
    probabilities: tuple[float, ...]


def _weight(line: str) -> int:
    return len(line.strip()) + 1


def kept_char_f1(chunks: Iterable[LabelledLines], threshold: float) -> float:
    """F1 of the characters kept at ``threshold`` against those the labels keep
    (labelled lines only, micro-averaged; 1.0 when both keep nothing)."""
    both = predicted = wanted = 0
    for chunk in chunks:
        removed = decide_lines(chunk.probabilities, chunk.lines, threshold)
        for line, label, gone in zip(chunk.lines, chunk.labels, removed):
            if label is None:
                continue
            weight = _weight(line)
            predicted += weight * (not gone)
            wanted += weight * (not label)
            both += weight * (not gone and not label)
    if predicted == 0 and wanted == 0:
        return 1.0
    return f1_score(ratio(both, predicted), ratio(both, wanted))


@dataclass(frozen=True)
class ThresholdChoice:
    """The chosen threshold and the kept-character F1 of every candidate."""

    threshold: float
    f1: float
    scores: tuple[tuple[float, float], ...]


def choose_threshold(
    chunks: Sequence[LabelledLines], grid: Sequence[float] = THRESHOLD_GRID
) -> ThresholdChoice:
    """The threshold of ``grid`` with the best :func:`kept_char_f1` (ties: the one nearest
    0.5); :data:`DEFAULT_THRESHOLD` when there is nothing to choose on."""
    if not chunks or not any(label is not None for c in chunks for label in c.labels):
        return ThresholdChoice(DEFAULT_THRESHOLD, float("nan"), ())
    scores = tuple((float(t), kept_char_f1(chunks, t)) for t in grid)
    best = max(scores, key=lambda item: (round(item[1], 9), -abs(item[0] - 0.5)))
    return ThresholdChoice(best[0], best[1], scores)
