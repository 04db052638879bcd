"""Run a program over a document's raw text (see "Execution semantics" in ARCHITECTURE.md).

Lines are ``raw.split("\\n")`` and every operation refers to the *original* lines:

1. ``remove_lines`` ops, in source order: rejected as ``bad_range`` (start > end),
   ``line_out_of_range`` (outside ``[0, n)``) or ``overlap`` (intersects a range accepted
   earlier); accepted ranges are removed together with their line breaks.
2. ``remove_str`` ops, in source order: rejected as ``line_out_of_range``, ``empty_string``,
   ``line_removed`` (the line is gone), ``string_not_found`` or ``overlap`` (every
   occurrence intersects a span already deleted in that line); otherwise the first
   occurrence that does not intersect a deleted span is deleted.
3. ``keep_all`` is a no-op and always accepted.

The output is always a subsequence of ``raw``. Work is linear in the document plus, per
operation, ``O(log k)`` lookups (``k`` accepted ranges or spans) and for ``remove_str`` a
search of its line that resumes where the same string's last search on that line stopped,
so a multi-megabyte document with thousands of operations is cheap: deletions are recorded
as spans and the text is assembled once at the end.
"""
from __future__ import annotations

from bisect import bisect_right, insort
from collections import Counter
from dataclasses import dataclass
from typing import Optional

from refinex.program.ops import KeepAll, Op, Program, RemoveLines, RemoveStr
from refinex.program.parse import parse
from refinex.status import DROPPED, FALLBACK_RAW, REFINED, UNCHANGED

__all__ = [
    "Guardrails",
    "RejectedOp",
    "Result",
    "execute",
    "execute_text",
    "find_free",
    "LINE_OUT_OF_RANGE",
    "BAD_RANGE",
    "STRING_NOT_FOUND",
    "OVERLAP",
    "EMPTY_STRING",
    "LINE_REMOVED",
    "REJECT_REASONS",
]

LINE_OUT_OF_RANGE = "line_out_of_range"
BAD_RANGE = "bad_range"
STRING_NOT_FOUND = "string_not_found"
OVERLAP = "overlap"
EMPTY_STRING = "empty_string"
LINE_REMOVED = "line_removed"
REJECT_REASONS = (LINE_OUT_OF_RANGE, BAD_RANGE, STRING_NOT_FOUND, OVERLAP, EMPTY_STRING, LINE_REMOVED)

_NON_WS_BLOCK = 4096  # characters inspected at a time when counting non-whitespace


@dataclass(frozen=True)
class Guardrails:
    """Limits that decide a document's status after execution.

    ``max_error_ratio`` (default 0.5): when errors (parse errors + rejected ops) are more
    than this fraction of ``ops_total + parse_errors``, the raw text is kept unchanged with
    status ``fallback_raw``. ``min_kept_chars`` (default 50): when the program deleted
    something and fewer than this many non-whitespace characters remain, the document is
    ``dropped`` (text ``""``).
    """

    max_error_ratio: float = 0.5
    min_kept_chars: int = 50

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_error_ratio <= 1.0:
            raise ValueError(f"max_error_ratio must be in [0, 1], got {self.max_error_ratio}")
        if self.min_kept_chars < 0:
            raise ValueError(f"min_kept_chars must be >= 0, got {self.min_kept_chars}")


@dataclass(frozen=True)
class RejectedOp:
    """An operation that changed nothing, with the reason (one of ``REJECT_REASONS``)."""

    op: Op
    reason: str


@dataclass(frozen=True)
class Result:
    """The refined text, its status and the accounting of one execution.

    Op counts are over the parsed program (``ops_applied + len(ops_rejected) == ops_total``;
    ``keep_all`` counts as applied). Character and line counts describe the final ``text``:
    for ``fallback_raw`` nothing is removed, for ``dropped`` everything is.
    """

    text: str
    status: str
    ops_total: int
    ops_applied: int
    ops_rejected: tuple[RejectedOp, ...]
    parse_errors: int
    n_remove_lines: int
    n_remove_str: int
    n_keep_all: int
    chars_in: int
    chars_out: int
    chars_removed: int
    lines_in: int
    lines_out: int
    lines_removed: int
    deletion_ratio: float

    @property
    def n_errors(self) -> int:
        """Parse errors plus rejected operations."""
        return self.parse_errors + len(self.ops_rejected)

    def rejected_by_reason(self) -> dict[str, int]:
        """How many operations were rejected for each reason (reasons with none omitted)."""
        return dict(Counter(rejected.reason for rejected in self.ops_rejected))


class _Ranges:
    """Disjoint, sorted, inclusive line ranges with O(log k) overlap queries."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def overlaps(self, start: int, end: int) -> bool:
        index = bisect_right(self.starts, end) - 1
        return index >= 0 and self.ends[index] >= start

    def add(self, start: int, end: int) -> None:
        index = bisect_right(self.starts, start)
        self.starts.insert(index, start)
        self.ends.insert(index, end)


def _spans_overlap(spans: list[tuple[int, int]], start: int, end: int) -> Optional[int]:
    """End of a deleted half-open span of ``spans`` intersecting ``[start, end)``, if any."""
    index = bisect_right(spans, (end,)) - 1  # last span starting before ``end``
    if index >= 0 and spans[index][1] > start:
        return spans[index][1]
    return None


def find_free(
    line: str, needle: str, spans: list[tuple[int, int]], start: int = 0
) -> tuple[Optional[int], bool]:
    """First occurrence of ``needle`` in ``line`` not intersecting ``spans``: ``(position,
    found_any)``.

    ``spans`` are the half-open character spans already deleted from the line, sorted and
    disjoint. ``position`` is ``None`` when every occurrence overlaps one of them;
    ``found_any`` tells whether ``needle`` occurs in ``line`` at all (``string_not_found``
    versus ``overlap``). This is how ``execute`` places a ``remove_str``; line voting
    (``refinex.model.voting``) places its strings the same way. ``start`` > 0 says that
    every occurrence before it is known to be blocked (and that one exists).
    """
    width = len(needle)
    position = line.find(needle, start)
    found_any = position >= 0 or start > 0
    while position >= 0:
        blocker_end = _spans_overlap(spans, position, position + width)
        if blocker_end is None:
            return position, True
        # Every occurrence starting before the blocking span's end also intersects it.
        position = line.find(needle, max(blocker_end, position + 1))
    return None, found_any


def _has_non_ws(text: str, at_least: int) -> bool:
    """Whether ``text`` has at least ``at_least`` non-whitespace characters."""
    if at_least <= 0:
        return True
    count = 0
    for offset in range(0, len(text), _NON_WS_BLOCK):
        count += sum(len(word) for word in text[offset : offset + _NON_WS_BLOCK].split())
        if count >= at_least:
            return True
    return False


def _assemble(lines: list[str], removed: bytearray, spans: dict[int, list[tuple[int, int]]]) -> list[str]:
    """The surviving lines with their deleted spans cut out."""
    kept: list[str] = []
    for index, line in enumerate(lines):
        if removed[index]:
            continue
        line_spans = spans.get(index)
        if line_spans:
            pieces: list[str] = []
            cursor = 0
            for start, end in line_spans:
                pieces.append(line[cursor:start])
                cursor = end
            pieces.append(line[cursor:])
            line = "".join(pieces)
        kept.append(line)
    return kept


def execute(program: Program, raw: str, guardrails: Guardrails = Guardrails()) -> Result:
    """Apply ``program`` to ``raw`` and decide the status under ``guardrails``."""
    lines = raw.split("\n")
    n = len(lines)
    rejected: list[tuple[int, RejectedOp]] = []  # (source index, rejection)
    removed = bytearray(n)
    accepted = _Ranges()
    counts = Counter(type(op) for op in program.ops)

    for index, op in enumerate(program.ops):
        if not isinstance(op, RemoveLines):
            continue
        reason: Optional[str] = None
        if op.start > op.end:
            reason = BAD_RANGE
        elif op.start < 0 or op.end >= n:
            reason = LINE_OUT_OF_RANGE
        elif accepted.overlaps(op.start, op.end):
            reason = OVERLAP
        if reason is not None:
            rejected.append((index, RejectedOp(op, reason)))
            continue
        accepted.add(op.start, op.end)
        removed[op.start : op.end + 1] = b"\x01" * (op.end - op.start + 1)

    spans: dict[int, list[tuple[int, int]]] = {}
    # Per (line, string): where the next search starts. Deleted spans only grow, so an
    # occurrence passed over once stays blocked: k ops on one line cost O(k), not O(k^2).
    cursors: dict[tuple[int, str], int] = {}
    for index, op in enumerate(program.ops):
        if not isinstance(op, RemoveStr):
            continue
        reason = None
        if not 0 <= op.line < n:
            reason = LINE_OUT_OF_RANGE
        elif not op.text:
            reason = EMPTY_STRING
        elif removed[op.line]:
            reason = LINE_REMOVED
        else:
            line_spans = spans.setdefault(op.line, [])
            key = (op.line, op.text)
            cursor = cursors.get(key, 0)
            if cursor < 0:  # searched before: the string is not in the line
                position, found_any = None, False
            else:
                position, found_any = find_free(lines[op.line], op.text, line_spans, cursor)
            if position is None:
                reason = OVERLAP if found_any else STRING_NOT_FOUND
                cursors[key] = len(lines[op.line]) + 1 if found_any else -1
            else:
                insort(line_spans, (position, position + len(op.text)))
                cursors[key] = position + 1
        if reason is not None:
            rejected.append((index, RejectedOp(op, reason)))

    rejected.sort(key=lambda item: item[0])
    ops_rejected = tuple(rejection for _, rejection in rejected)
    ops_total = len(program.ops)
    parse_errors = len(program.errors)
    errors = parse_errors + len(ops_rejected)

    kept = _assemble(lines, removed, spans)
    text = "\n".join(kept)
    lines_out = len(kept)
    if errors > 0 and errors / (ops_total + parse_errors) > guardrails.max_error_ratio:
        status, text, lines_out = FALLBACK_RAW, raw, n
    elif text != raw and not _has_non_ws(text, guardrails.min_kept_chars):
        status, text, lines_out = DROPPED, "", 0
    else:
        status = REFINED if text != raw else UNCHANGED

    chars_in = len(raw)
    chars_removed = chars_in - len(text)
    return Result(
        text=text,
        status=status,
        ops_total=ops_total,
        ops_applied=ops_total - len(ops_rejected),
        ops_rejected=ops_rejected,
        parse_errors=parse_errors,
        n_remove_lines=counts[RemoveLines],
        n_remove_str=counts[RemoveStr],
        n_keep_all=counts[KeepAll],
        chars_in=chars_in,
        chars_out=len(text),
        chars_removed=chars_removed,
        lines_in=n,
        lines_out=lines_out,
        lines_removed=n - lines_out,
        deletion_ratio=chars_removed / chars_in if chars_in else 0.0,
    )


def execute_text(program_text: str, raw: str, guardrails: Guardrails = Guardrails()) -> Result:
    """Parse ``program_text`` and execute it on ``raw``."""
    return execute(parse(program_text), raw, guardrails)
