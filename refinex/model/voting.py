"""Line-vote decoding: one chunk program from several sampled ones.

Greedy decoding commits to the single most likely token at every step. Where a refine model
is unsure (a ``remove_lines`` range whose end it cannot place, a chunk of prose it half
takes for boilerplate) the greedy program can delete much more than most of the model's
probability mass would: the argmax of the end id may be the far end of a split
distribution. Sampling several programs from the same constrained distribution and
deleting a line only where at least a ``threshold`` share of the samples delete it turns
the model's sequence distribution into per-line decisions (a minimum-risk choice under a
line-level loss: ``threshold`` > 0.5 weighs a wrongly deleted line above a wrongly kept
one).

Pure Python: samples are program texts, parsed by the program parser (never evaluated);
the result is a canonical, deletion-only program for the chunk.
"""
from __future__ import annotations

from bisect import insort
from typing import Optional, Sequence

from refinex.distill import settle_blank_lines
from refinex.program import parse
from refinex.program.execute import find_free
from refinex.program.ops import RemoveLines, RemoveStr
from refinex.program.render import render_op

__all__ = ["vote_program"]


def vote_program(
    samples: Sequence[str],
    first_line: int,
    lines: Sequence[str],
    threshold: float,
    weights: Optional[Sequence[float]] = None,
) -> str:
    """The chunk program that deletes what at least ``threshold`` of the (weighted) samples
    delete.

    ``samples`` are program texts for the chunk whose raw lines are ``lines`` (ids
    ``first_line`` ..). A non-blank line is removed when the weighted share of samples whose
    ``remove_lines`` cover it is ``>= threshold``; blank lines follow the nearest non-blank
    line above them, as in distilled programs (``distill.settle_blank_lines``); a
    ``remove_str(line, text)`` is kept when that share of samples has it, its line stays and
    it does not overlap a ``remove_str`` with more votes on the same line (so the program
    executes without a rejected operation).
    Lines that do not parse and ids outside the chunk count as no deletion. Returns program
    text, one operation per line (``keep_all()`` when nothing is deleted).
    """
    if not samples:
        raise ValueError("no samples to vote on")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    weights = [1.0] * len(samples) if weights is None else list(weights)
    if len(weights) != len(samples) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError("weights: one non-negative weight per sample, not all zero")
    last_line = first_line + len(lines) - 1
    votes = [0.0] * len(lines)
    str_votes: dict[tuple[int, str], float] = {}
    str_order: list[tuple[int, str]] = []
    for text, weight in zip(samples, weights):
        covered: set[int] = set()
        seen: set[tuple[int, str]] = set()
        for op in parse(text).ops:
            if isinstance(op, RemoveLines):
                covered.update(range(max(op.start, first_line), min(op.end, last_line) + 1))
            elif isinstance(op, RemoveStr) and first_line <= op.line <= last_line:
                key = (op.line, op.text)
                if key in seen:
                    continue
                seen.add(key)
                if key not in str_votes:
                    str_order.append(key)
                str_votes[key] = str_votes.get(key, 0.0) + weight
        for line_id in covered:
            votes[line_id - first_line] += weight
    total = sum(weights)
    removed = [bool(line.strip()) and votes[i] / total >= threshold for i, line in enumerate(lines)]
    settle_blank_lines(lines, removed)
    ops: list[tuple[int, str]] = []
    i = 0
    while i < len(lines):
        if removed[i]:
            j = i
            while j + 1 < len(lines) and removed[j + 1]:
                j += 1
            ops.append((first_line + i, render_op(RemoveLines(first_line + i, first_line + j))))
            i = j + 1
        else:
            i += 1
    spans: dict[int, list[tuple[int, int]]] = {}
    for key in sorted(str_order, key=lambda k: (k[0], -str_votes[k])):  # by line, surest first
        line_id, text = key
        if str_votes[key] / total < threshold or removed[line_id - first_line]:
            continue
        taken = spans.setdefault(line_id, [])
        position, _ = find_free(lines[line_id - first_line], text, taken)
        if position is None:  # overlaps a surer deletion on the line: executing it would fail
            continue
        insort(taken, (position, position + len(text)))
        ops.append((line_id, render_op(RemoveStr(line_id, text))))
    if not ops:
        return "keep_all()\n"
    ops.sort(key=lambda item: item[0])  # stable: a line's remove_str keep their order
    return "".join(op + "\n" for _, op in ops)
