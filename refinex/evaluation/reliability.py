"""How faithfully a program origin deletes: agreement with the expert, and reliability (pure).

- **Deletion masks**: the characters of a raw text that a document's output lacks, as
  sorted spans of raw offsets. Whole lines take their line break with them (exactly what
  ``refinex.program.execute`` removes), in-line ``remove_str`` spans are cut out, and the
  status decides the rest: ``fallback_raw`` deletes nothing, ``dropped`` and a missing
  output (``no_program``, ``expert_failed``) delete everything.
- **Deletion agreement** of a model with the expert, micro-summed over documents:
  precision is the share of what the model deleted that the expert deleted too, recall the
  share of what the expert deleted that the model deleted too.
- **New words**: words of the refined text that the raw text cannot have supplied; zero
  for any deletion-only output.
- **Reliability**: shares of untouched, emptied, fallen-back and invalid documents, and the
  deletion-ratio mean and quantiles.

No Spark, no MLflow: the ``evaluate`` stage runs these per document on the workers, and
notebooks and tests call them directly.
"""
from __future__ import annotations

import math
from bisect import insort
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

from refinex.evaluation.scores import tokens
from refinex.status import DROPPED, EXPERT_FAILED, FALLBACK_RAW, NO_PROGRAM, REFINED, UNCHANGED

__all__ = [
    "DeletionAgreement",
    "DeletionMarks",
    "DeletionMask",
    "Reliability",
    "ReliabilityFlags",
    "deletion_agreement",
    "deletion_marks",
    "deletion_mask",
    "deletion_ratio_summary",
    "is_subsequence",
    "marks_mask",
    "nearest_rank",
    "new_words",
    "reliability",
    "reliability_flags",
]

Span = tuple[int, int]


# --- deletion marks: which lines and in-line spans a program deletes ------------------------


@dataclass(frozen=True)
class DeletionMarks:
    """What executing a program deletes from each line of ``raw.split("\\n")``.

    ``removed``: line ids deleted whole (accepted ``remove_lines``); ``spans``: per line,
    the sorted half-open character spans its accepted ``remove_str`` delete. ``status`` and
    ``text`` are those of ``refinex.program.execute`` (``fallback_raw`` keeps the raw
    text, ``dropped`` deletes all of it: the marks still say what the program asked for).
    """

    lines: tuple[str, ...]
    removed: frozenset[int]
    spans: Mapping[int, tuple[tuple[int, int], ...]]
    status: str
    text: str
    rejected: tuple[str, ...]
    parse_errors: tuple[str, ...]


def deletion_marks(program_text: str, raw: str, guardrails: Any = None) -> DeletionMarks:
    """The deletions of ``program_text`` on ``raw``, with the semantics of
    ``refinex.program.execute`` (accepted ``remove_lines`` first, then ``remove_str`` on
    the first free occurrence)."""
    from refinex.program import Guardrails, RemoveLines, RemoveStr, execute, parse, render_op
    from refinex.program.execute import find_free

    program = parse(program_text or "")
    result = execute(program, raw, guardrails or Guardrails())
    lines = raw.split("\n")
    n = len(lines)
    removed: set[int] = set()
    ranges: list[tuple[int, int]] = []
    for op in program.ops:
        if isinstance(op, RemoveLines) and 0 <= op.start <= op.end < n:
            if not any(start <= op.end and op.start <= end for start, end in ranges):
                ranges.append((op.start, op.end))
                removed.update(range(op.start, op.end + 1))
    spans: dict[int, list[tuple[int, int]]] = {}
    for op in program.ops:
        if isinstance(op, RemoveStr) and 0 <= op.line < n and op.text and op.line not in removed:
            line_spans = spans.setdefault(op.line, [])
            position, _ = find_free(lines[op.line], op.text, line_spans)
            if position is not None:
                insort(line_spans, (position, position + len(op.text)))
    return DeletionMarks(
        lines=tuple(lines),
        removed=frozenset(removed),
        spans={k: tuple(v) for k, v in spans.items() if v},
        status=result.status,
        text=result.text,
        rejected=tuple(f"{render_op(r.op)}: {r.reason}" for r in result.ops_rejected),
        parse_errors=tuple(f"line {e.line_no}: {e.message}" for e in program.errors),
    )


# --- deletion masks ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DeletionMask:
    """The deleted characters of a raw text of ``length`` characters: sorted, disjoint,
    non-adjacent half-open ``spans`` of raw offsets (intervals, not a set of positions, so a
    multi-megabyte document costs a few tuples)."""

    length: int
    spans: tuple[Span, ...] = ()

    @classmethod
    def nothing(cls, length: int) -> "DeletionMask":
        return cls(length, ())

    @classmethod
    def everything(cls, length: int) -> "DeletionMask":
        return cls(length, ((0, length),) if length else ())

    @property
    def deleted(self) -> int:
        """How many characters are deleted."""
        return sum(end - start for start, end in self.spans)

    def overlap(self, other: "DeletionMask") -> int:
        """How many characters both masks delete (a linear merge of the two span lists)."""
        if self.length != other.length:
            raise ValueError(f"masks of different texts ({self.length} and {other.length} characters)")
        both, i, j = 0, 0, 0
        a, b = self.spans, other.spans
        while i < len(a) and j < len(b):
            start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
            if start < end:
                both += end - start
            if a[i][1] <= b[j][1]:
                i += 1
            else:
                j += 1
        return both

    def apply(self, raw: str) -> str:
        """``raw`` without the deleted characters."""
        if len(raw) != self.length:
            raise ValueError(f"mask of a {self.length}-character text applied to {len(raw)} characters")
        pieces, cursor = [], 0
        for start, end in self.spans:
            pieces.append(raw[cursor:start])
            cursor = end
        pieces.append(raw[cursor:])
        return "".join(pieces)


def _merged(spans: Iterable[Span]) -> tuple[Span, ...]:
    out: list[list[int]] = []
    for start, end in sorted(s for s in spans if s[0] < s[1]):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return tuple((start, end) for start, end in out)


def marks_mask(marks: DeletionMarks) -> DeletionMask:
    """The characters the program's accepted operations delete (status not applied).

    A run of removed lines ``s..e`` takes the line break after each of its lines; a run that
    ends at the last line takes the break before each line instead (there is none after),
    and a run of every line takes the whole text: the mask's size is exactly what
    ``execute`` removes.
    """
    lines = marks.lines
    starts, offset = [], 0
    for line in lines:
        starts.append(offset)
        offset += len(line) + 1
    length = offset - 1
    n = len(lines)
    spans: list[Span] = []
    run_start: Optional[int] = None
    for index in range(n + 1):
        if index < n and index in marks.removed:
            if run_start is None:
                run_start = index
            continue
        if run_start is not None:
            first, last = run_start, index - 1
            if last < n - 1:
                spans.append((starts[first], starts[last + 1]))
            elif first > 0:
                spans.append((starts[first] - 1, length))
            else:
                spans.append((0, length))
            run_start = None
    for line_id, line_spans in marks.spans.items():
        spans.extend((starts[line_id] + a, starts[line_id] + b) for a, b in line_spans)
    return DeletionMask(length, _merged(spans))


_DELETES_NOTHING = (FALLBACK_RAW,)
_DELETES_EVERYTHING = (DROPPED, NO_PROGRAM, EXPERT_FAILED)


def deletion_mask(
    program_text: Optional[str], raw: str, status: Optional[str] = None, guardrails: Any = None
) -> DeletionMask:
    """The characters of ``raw`` that the document's output lacks.

    ``status`` is the document's (from ``refined_documents``); None takes the status of
    executing the program under ``guardrails``. ``refined`` and ``unchanged`` delete what
    the accepted operations delete, ``fallback_raw`` nothing, ``dropped`` everything, and a
    document without output (no program, ``no_program``, ``expert_failed``) everything: it
    scores as an empty output.
    """
    if program_text is None or status in _DELETES_EVERYTHING:
        return DeletionMask.everything(len(raw))
    if status in _DELETES_NOTHING:
        return DeletionMask.nothing(len(raw))
    marks = deletion_marks(program_text, raw, guardrails)
    effective = status or marks.status
    if effective in (REFINED, UNCHANGED):
        return marks_mask(marks)
    if effective == FALLBACK_RAW:
        return DeletionMask.nothing(len(raw))
    if effective == DROPPED:
        return DeletionMask.everything(len(raw))
    raise ValueError(f"unknown status {effective!r}")


# --- agreement with the expert ----------------------------------------------------------------


@dataclass(frozen=True)
class DeletionAgreement:
    """Deleted-character counts of a model and the expert, summed over ``documents``.

    ``precision`` = both / model_deleted, ``recall`` = both / expert_deleted, each None
    when its denominator is 0 (nothing to be right or wrong about); ``f1`` =
    2·both / (model_deleted + expert_deleted), their harmonic mean when both exist, 0 when
    only one side deleted anything and None when neither did.
    """

    model_deleted: int = 0
    expert_deleted: int = 0
    both_deleted: int = 0
    documents: int = 0

    def __add__(self, other: "DeletionAgreement") -> "DeletionAgreement":
        return DeletionAgreement(
            self.model_deleted + other.model_deleted, self.expert_deleted + other.expert_deleted,
            self.both_deleted + other.both_deleted, self.documents + other.documents,
        )

    @classmethod
    def of(cls, model: DeletionMask, expert: DeletionMask) -> "DeletionAgreement":
        """The counts of one document."""
        return cls(model.deleted, expert.deleted, model.overlap(expert), 1)

    @property
    def precision(self) -> Optional[float]:
        return self.both_deleted / self.model_deleted if self.model_deleted else None

    @property
    def recall(self) -> Optional[float]:
        return self.both_deleted / self.expert_deleted if self.expert_deleted else None

    @property
    def f1(self) -> Optional[float]:
        total = self.model_deleted + self.expert_deleted
        return 2 * self.both_deleted / total if total else None


def deletion_agreement(
    model_masks: Iterable[DeletionMask], expert_masks: Iterable[DeletionMask]
) -> DeletionAgreement:
    """Micro-summed agreement of paired masks (one model and one expert mask per document)."""
    model_list, expert_list = list(model_masks), list(expert_masks)
    if len(model_list) != len(expert_list):
        raise ValueError(f"{len(model_list)} model masks but {len(expert_list)} expert masks")
    total = DeletionAgreement()
    for model, expert in zip(model_list, expert_list):
        total = total + DeletionAgreement.of(model, expert)
    return total


# --- new words --------------------------------------------------------------------------------


def is_subsequence(short: str, long: str) -> bool:
    """Whether ``short`` is ``long`` with characters deleted (greedy leftmost matching,
    which is exact for this question; equal runs are compared in C, not per character)."""
    if len(short) > len(long):
        return False
    i = j = 0
    while i < len(short):
        j = long.find(short[i], j)
        if j < 0:
            return False
        # Gallop: the longest run short[i:i+k] == long[j:j+k] (both advance through it).
        step = 1
        while i + step <= len(short) and long.startswith(short[i:i + step], j):
            step *= 2
        low, high = step // 2, min(step, len(short) - i)
        while low < high:  # the largest k in [low, high] with equal prefixes
            middle = (low + high + 1) // 2
            if long.startswith(short[i:i + middle], j):
                low = middle
            else:
                high = middle - 1
        i, j = i + low, j + low
    return True


def new_words(raw: str, refined: Optional[str]) -> int:
    """Words (``refinex.evaluation.scores.tokens``) of ``refined`` that ``raw`` did not supply.

    A deletion-only output (``refined`` is ``raw`` with characters deleted) has none, even
    where a deletion joins two words (``"foo-bar"`` -> ``"foobar"``). Any other text counts
    the tokens it has beyond the raw text's (multiset difference), so written-in words show
    up whatever else changed. A missing output has none.
    """
    if not refined or is_subsequence(refined, raw):
        return 0
    extra = Counter(tokens(refined)) - Counter(tokens(raw))
    return sum(extra.values())


# --- reliability ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReliabilityFlags:
    """What one document's result was: untouched (``unchanged``), emptied (``dropped`` or an
    empty refined text), fell back (``fallback_raw``), invalid (parse errors or fell back)."""

    untouched: bool
    emptied: bool
    fallback: bool
    invalid: bool


def reliability_flags(status: str, refined_text: Optional[str], parse_errors: Optional[int]) -> ReliabilityFlags:
    """The flags of one ``refined_documents`` row (``parse_errors`` null without a program)."""
    fallback = status == FALLBACK_RAW
    return ReliabilityFlags(
        untouched=status == UNCHANGED,
        emptied=status == DROPPED or refined_text == "",
        fallback=fallback,
        invalid=fallback or (parse_errors or 0) > 0,
    )


@dataclass(frozen=True)
class Reliability:
    """Flag counts over ``documents``; the shares are those counts over ``documents``
    (None without documents)."""

    documents: int = 0
    untouched: int = 0
    emptied: int = 0
    fallback: int = 0
    invalid: int = 0

    def __add__(self, other: "Reliability") -> "Reliability":
        return Reliability(*(getattr(self, f) + getattr(other, f) for f in
                             ("documents", "untouched", "emptied", "fallback", "invalid")))

    @classmethod
    def of(cls, flags: ReliabilityFlags) -> "Reliability":
        return cls(1, int(flags.untouched), int(flags.emptied), int(flags.fallback), int(flags.invalid))

    def shares(self) -> dict[str, Optional[float]]:
        """``untouched_share``, ``emptied_share``, ``fallback_share``, ``invalid_share``."""
        return {
            f"{name}_share": (getattr(self, name) / self.documents if self.documents else None)
            for name in ("untouched", "emptied", "fallback", "invalid")
        }


def reliability(rows: Iterable[tuple[str, Optional[str], Optional[int]]]) -> Reliability:
    """Counts over ``(status, refined_text, parse_errors)`` rows."""
    total = Reliability()
    for status, refined_text, parse_errors in rows:
        total = total + Reliability.of(reliability_flags(status, refined_text, parse_errors))
    return total


def nearest_rank(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` quantile as the nearest-rank value: the smallest value with at least a
    ``q`` share of the values at or below it (what Spark's ``percentile_approx`` returns
    exactly on small inputs)."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, math.ceil(q * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def deletion_ratio_summary(ratios: Iterable[Optional[float]]) -> dict[str, Optional[float]]:
    """``deletion_ratio_mean``/``_p50``/``_p90`` of the documents that have a ratio (those
    with a program); None for all three without any."""
    values = sorted(float(r) for r in ratios if r is not None)
    if not values:
        return {"deletion_ratio_mean": None, "deletion_ratio_p50": None, "deletion_ratio_p90": None}
    return {
        "deletion_ratio_mean": sum(values) / len(values),
        "deletion_ratio_p50": nearest_rank(values, 0.5),
        "deletion_ratio_p90": nearest_rank(values, 0.9),
    }
