"""From a plan to a program: ``remove_lines`` ranges and unambiguous ``remove_str`` texts.

Steps 5 and 7 of ``refinex.distill``'s description: blank lines follow the line above
them, removed lines become ranges, and each deleted span becomes a ``remove_str`` text
the executor finds where the plan meant it (shifted along a repetition or extended over
whitespace and punctuation when needed, given up otherwise), within a per-document search
budget.
"""
from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from typing import Optional

from refinex.distill.plan import Plan, Span, settle_blank_lines
from refinex.distill.units import UNIT_RE, WORDISH_RE, glues
from refinex.program.ops import KeepAll, Op, Program, RemoveLines, RemoveStr

__all__ = ["finish"]

_SHIFT_LIMIT = 256  # equivalent positions tried for a non-unique remove_str
_SEARCH_WORK = 1_000_000_000  # characters remove_str uniqueness searches may scan per document
_EXTEND_UNITS = 16  # whitespace/punctuation units tried on each side when extending one


def finish(raw_lines: list[str], plan: Plan) -> tuple[Program, str]:
    """The program for ``plan`` (ops sorted by line) and the text it leaves.

    Each occurrence search scans a whole line, so their total per document is bounded
    (``_SEARCH_WORK``): on a line too long to check all its deletions (a megabyte-long
    line), only the longest ones are kept.
    """
    ops: list[Op] = []
    kept: list[str] = []
    n = len(raw_lines)
    settle_blank_lines(raw_lines, plan.removed)
    for i in [i for i in plan.spans if not raw_lines[i].strip()]:  # blank lines keep no spans
        del plan.spans[i]
    budget = _Budget(_SEARCH_WORK)
    i = 0
    while i < n:
        if plan.removed[i]:
            end = i
            while end + 1 < n and plan.removed[end + 1]:
                end += 1
            ops.append(RemoveLines(i, end))
            i = end + 1
            continue
        line = raw_lines[i]
        spans = plan.spans.get(i)
        if spans:
            cost = len(line) + 1
            if len(spans) * cost > budget.left:  # keep the longest deletions it can afford
                affordable = max(0, budget.left // cost // 2)
                spans = sorted(sorted(spans, key=lambda span: span[0] - span[1])[:affordable])
            pieces = []
            cursor = 0
            for start, end in _unique_spans(_Finder(line, budget), spans):
                ops.append(RemoveStr(i, line[start:end]))
                pieces.append(line[cursor:start])
                cursor = end
            pieces.append(line[cursor:])
            line = "".join(pieces)
        kept.append(line)
        i += 1
    out = "\n".join(kept)
    if len(out) == sum(map(len, raw_lines)) + n - 1:  # a subsequence that long is the raw
        ops = []  # (only removing the single line of an empty document gets here)
    return Program(tuple(ops) if ops else (KeepAll(),)), out


def _occurs_once(line: str, text: str) -> bool:
    first = line.find(text)
    return first >= 0 and line.find(text, first + 1) < 0


def _occurrences_within(line: str, text: str, first: int, last: int) -> bool:
    """Whether every occurrence of ``text`` in ``line`` starts within ``[first, last]``."""
    found = line.find(text)
    while found >= 0:
        if not first <= found <= last:
            return False
        found = line.find(text, found + 1)
    return True


@dataclass
class _Budget:
    """Characters that occurrence searches may still scan (one document)."""

    left: int


class _Finder:
    """Occurrence tests in one line, each charged the line's length to a budget (a test
    fails once the budget is spent), plus the line's unit boundaries."""

    def __init__(self, line: str, budget: _Budget) -> None:
        self.line = line
        self.budget = budget
        self._units: Optional[list[Span]] = None

    def _charge(self) -> bool:
        self.budget.left -= len(self.line) + 1
        return self.budget.left >= 0

    def once(self, text: str) -> bool:
        """Whether ``text`` occurs exactly once in the line."""
        return self._charge() and _occurs_once(self.line, text)

    def within(self, text: str, first: int, last: int) -> bool:
        """Whether every occurrence of ``text`` starts within ``[first, last]``."""
        return self._charge() and _occurrences_within(self.line, text, first, last)

    @property
    def units(self) -> list[Span]:
        if self._units is None:
            self._units = [(m.start(), m.end()) for m in UNIT_RE.finditer(self.line)]
        return self._units


def _unique_spans(finder: _Finder, spans: list[Span]) -> list[Span]:
    """``spans`` made unambiguous in the line (see ``_unique_span``), merged when touching."""
    line = finder.line
    out: list[Span] = []
    for k, (start, end) in enumerate(spans):
        lo = out[-1][1] if out else 0
        hi = spans[k + 1][0] if k + 1 < len(spans) else len(line)
        span = _unique_span(finder, (start, end), lo, hi)
        if span is None:
            continue
        if out and out[-1][1] == span[0] and finder.once(line[out[-1][0] : span[1]]):
            out[-1] = (out[-1][0], span[1])
        else:
            out.append(span)
    return out


def _unique_span(finder: _Finder, span: Span, lo: int, hi: int) -> Optional[Span]:
    """A span within ``[lo, hi)`` whose text, wherever the executor finds it, deletes what
    ``line[span]`` deletes.

    That is a text found once in the line, or one whose every occurrence is an equivalent
    position (the same line results: a doubled word, a run of "-"); the span may shift
    along such a repetition, on unit boundaries. Failing that, the shortest extension over
    adjacent whitespace and punctuation that occurs once and glues no words. Words the
    expert kept are never deleted to get there: ``None`` (the deletion is given up) when
    neither exists or the search budget is spent.
    """
    line = finder.line
    start, end = span
    if finder.once(line[start:end]):
        return span
    size = end - start
    first = last = start  # equivalent starts: deleting line[s:s+size] gives the same line
    while first > lo and start - first < _SHIFT_LIMIT and line[first - 1] == line[first - 1 + size]:
        first -= 1
    while last + size < hi and last - start < _SHIFT_LIMIT and line[last] == line[last + size]:
        last += 1
    units = finder.units
    starts = [a for a, _ in units]
    if first < last:
        bounds = set(starts[bisect_left(starts, first) : bisect_left(starts, last + size + 1)])
        bounds.add(len(line))
        for shift in sorted(range(first - start, last - start + 1), key=abs):
            a = start + shift
            text = line[a : a + size]
            if a in bounds and a + size in bounds and not text.isspace():
                if finder.within(text, first, last):
                    return a, a + size

    lefts = [start]
    k = bisect_left(starts, start) - 1
    while k >= 0 and len(lefts) <= _EXTEND_UNITS and units[k][0] >= lo:
        if WORDISH_RE.match(line, units[k][0]):
            break
        lefts.append(units[k][0])
        k -= 1
    rights = [end]
    k = bisect_left(starts, end)
    while k < len(units) and len(rights) <= _EXTEND_UNITS and units[k][1] <= hi:
        if WORDISH_RE.match(line, units[k][0]):
            break
        rights.append(units[k][1])
        k += 1
    best: Optional[tuple[int, int, int]] = None
    for a in lefts:
        for b in rights:
            grow = (start - a) + (b - end)
            if grow == 0 or (best is not None and grow >= best[0]) or glues(line, a, b):
                continue
            if finder.once(line[a:b]):
                best = (grow, a, b)
    return None if best is None else (best[1], best[2])
