"""Distil an expert's end-to-end refinement into a minimal deletion-only program.

An expert (an LLM or trafilatura) rewrites a document freely; RefineX (arXiv 2507.03253)
keeps only the part of that rewrite a deletion can express, so that a small model can learn
to emit it as a program (``refinex.program``). ``distill(raw, refined)`` computes that
program; ``distill_report`` adds the accounting.

How the alignment works (all of it linear or near-linear on real documents):

1. Non-blank lines (``raw.split("\\n")``) are compared on their whitespace-normalised
   text, so lines that differ only in whitespace are kept whole. Lines found once on
   each side anchor the alignment (patience diff, recursively inside the gaps); repeated
   lines ("Share", "Advertisement") are left to the next step, which sees their context.
2. Every gap left is aligned at token level (words and single punctuation characters;
   whitespace only separates; a blank line is one token), by a longest common
   subsequence (bit-parallel, exact; anchored on unique tokens and then greedy only for
   huge gaps), which finds
   partial-line deletions and copes with lines the expert merged, split or edited. Words
   are aligned first: a raw line whose aligned words are under 30% of its word characters
   (a line the expert deleted, lending its "the" or "." to the alignment) is left out and
   the gap aligned again, punctuation included, without it. Of equally long alignments,
   the one keeping each raw line's matches on one refined line wins.
3. Raw tokens with no counterpart are deleted. When the expert *replaced* raw text, the
   replacement is not representable: the raw side is kept (and counted in
   ``replaced_chars``) when it resembles the replacement (character similarity >= 0.6) or
   has at most twice as many tokens plus one; otherwise it is treated as deleted. This is
   judged per raw line, against the part of the replacement on refined lines aligned with
   that raw line, so a line's tail the expert dropped stays a deletion even when the next
   line was rewritten. A raw line with no aligned token is removed whole (blank lines
   included), unless all of it is a close rewrite (a fixed typo, words the expert glued).
   A removed line whose text reappears unaligned elsewhere in the expert's output (the
   expert moved it) is kept.
4. A deleted token run inside a kept line goes together with the whitespace on one side,
   chosen to reproduce the expert's whitespace when it is known, so words stay separated
   and no word is ever cut or glued to another: the output's words are raw words.
5. Every ``remove_str`` text is unambiguous in its raw line: found once, or (a doubled
   word, a run of dashes) found only at positions whose deletion gives the same line.
   When the natural text is neither, it is shifted along a repetition or minimally
   extended over adjacent whitespace and punctuation; failing both, that deletion is
   given up rather than deleting a word the expert kept. (Searches are bounded per
   document: a megabyte-long line keeps only its longest deletions.)
6. When the result is not exactly the expert's text, an exact solver tries to embed every
   refined line, in order, into its own raw line by deleting whole units (words,
   punctuation characters, single whitespace characters); it wins when it reproduces the
   refined text without any whitespace-only deletion. So whenever ``refined`` is obtained
   from ``raw`` by deleting whole lines and whole-unit runs within lines, the program
   reproduces it exactly. It cannot when the expert joined lines (a line break survives
   unless its whole line is removed), emptied a line it kept, cut or glued words, or only
   changed whitespace inside lines (never worth a ``remove_str``: when only whitespace
   differs the program is ``keep_all()``).
7. Blank (whitespace-only) lines are layout, not content: the program never spends an
   operation on them. A blank line shares the fate of the nearest non-blank line above it
   (below it, for the blank lines that open the document), so a deleted block takes the
   blank lines that follow it along, deleted blocks separated only by blank lines become
   one ``remove_lines`` range, and blank lines between kept paragraphs stay. Texts are
   compared the same way: the program is ``exact`` when it yields the expert's non-blank
   lines, whatever the expert did with blank lines. (Distilling every dropped blank line
   made three quarters of the operations on the dev pages blank-line deletions, and made
   models trained on them lose count of alternating blank lines.)
"""
from __future__ import annotations

import re
import unicodedata
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from itertools import chain, repeat
from operator import itemgetter
from collections.abc import Hashable, MutableSequence, Sequence
from typing import Any, Optional

from refinex.program.ops import KeepAll, Op, Program, RemoveLines, RemoveStr

__all__ = ["Distillation", "distill", "distill_report", "settle_blank_lines"]

Span = tuple[int, int]  # half-open character span inside one line

_LCS_CELLS = 16_000_000  # bit-parallel LCS when len(a) * len(b) is at most this ...
_LCS_SIDE = 20_000  # ... and neither side is longer than this
_PATIENCE_WORK = 20  # patience recursion may visit this many times the input size
_ANCHOR_WIDTHS = (1, 4)  # anchor huge gaps on unique elements, else on unique 4-runs
_GREEDY_WINDOW = 256  # last resort: match the next occurrence within this many elements
_SHIFT_LIMIT = 256  # equivalent positions tried for a non-unique remove_str
_SEARCH_WORK = 1_000_000_000  # characters remove_str uniqueness searches may scan per document
_EXTEND_UNITS = 16  # whitespace/punctuation units tried on each side when extending one
_PROBES = 8  # exact solver: longest tokens of a refined line looked up in a raw line first
_EMBED_CELLS = 40_000  # fewest-runs DP for one line of the exact solver up to this size
_EMBED_BUDGET = 400_000  # DP cells for all lines of one document
_WS_RUN = 1 << 20  # DP cost of a whitespace-only deletion run (avoided unless unavoidable)
_SIMILAR = 0.6  # a replacement at least this similar to the raw text is a rewrite of it
_SIMILAR_CHARS = 4_000  # longer replacements are compared by character counts only
_WEAK = 0.3  # a line whose aligned words are a smaller share of it is realigned without it
_ALIGN_ROUNDS = 3  # full alignments of one region at most (each leaves weak lines out)
_CLOSERS = frozenset(",.;:!?)]}%\u00bb\u2026\u201d\u2019")  # no space needed before these

_BLANK = "\n"  # the token of a blank line (no real token contains a line break)
_DEL, _KEEP, _MATCH = 0, 1, 2  # status of a raw token inside an unaligned region


def _mark_class() -> str:
    """Character-class body: combining marks (category M) plus ZWNJ and ZWJ.

    Python's ``\\w`` excludes marks, so without them a word such as "हिन्दी" or a decomposed
    "café" would fall apart into pieces that could be deleted separately.
    """
    ranges: list[tuple[int, int]] = []
    for point in chain(range(0x300, 0x20000), range(0xE0000, 0xE1000)):
        if unicodedata.category(chr(point))[0] != "M":
            continue
        if ranges and ranges[-1][1] == point - 1:
            ranges[-1] = (ranges[-1][0], point)
        else:
            ranges.append((point, point))
    ranges.append((0x200C, 0x200D))
    return "".join(chr(lo) if lo == hi else f"{chr(lo)}-{chr(hi)}" for lo, hi in ranges)


_MARKS = _mark_class()
_WORD = rf"[\w{_MARKS}]+"
_PUNCT = rf"[^\w\s{_MARKS}][{_MARKS}]*"  # one symbol with the marks that decorate it
_CONTENT_RE = re.compile(f"{_WORD}|{_PUNCT}")  # tokens that take part in alignment
_GROUPED_RE = re.compile(f"({_WORD})|({_PUNCT})")  # the same, telling words apart
_UNIT_RE = re.compile(rf"{_WORD}|{_PUNCT}|\s")  # smallest deletable pieces of a line
_WORDISH_RE = re.compile(rf"[\w{_MARKS}]")


@dataclass(frozen=True)
class Distillation:
    """A distilled program and how much of the expert's refinement it captures.

    ``kept_chars`` and ``deleted_chars`` describe executing the program on ``raw``;
    ``inserted_chars`` counts the expert's text with no counterpart in ``raw`` (insertions
    and the new side of replacements: the part a deletion cannot express);
    ``replaced_chars`` counts raw characters kept although the expert rewrote them;
    ``exact`` tells whether executing the program yields the refined text's non-blank lines
    exactly (blank lines are layout, see step 7 of the module's description).
    """

    program: Program
    kept_chars: int
    deleted_chars: int
    inserted_chars: int
    replaced_chars: int
    unrepresentable_ratio: float
    exact: bool


@dataclass
class _Plan:
    """What to delete: whole lines, and character spans of the lines that stay."""

    removed: bytearray
    spans: dict[int, list[Span]] = field(default_factory=dict)
    inserted: int = 0
    replaced: int = 0


def distill(raw: str, refined: str) -> Program:
    """The minimal deletion-only program that turns ``raw`` into (close to) ``refined``."""
    return distill_report(raw, refined).program


def distill_report(raw: str, refined: str) -> Distillation:
    """Distil ``refined`` against ``raw`` and account for what the program captures."""
    raw_lines = raw.split("\n")
    ref_content = _content_lines(refined)
    if raw == refined:
        return _report(raw, refined, ref_content, Program((KeepAll(),)), raw, 0, 0)
    if not ref_content:  # nothing but blank lines is left: all of it goes
        return _report(raw, refined, ref_content, Program((RemoveLines(0, len(raw_lines) - 1),)), "", 0, 0)
    if _content_lines(raw) == ref_content:  # blank lines differ at most
        return _report(raw, refined, ref_content, Program((KeepAll(),)), raw, 0, 0)
    if _norm(raw) == _norm(refined):  # only whitespace inside lines differs
        return _report(raw, refined, ref_content, Program((KeepAll(),)), raw, 0, 0)

    ref_lines = refined.split("\n")
    plan = _main_plan(raw_lines, ref_lines)
    program, out = _finish(raw_lines, plan)
    if _content_lines(out) == ref_content:
        return _report(raw, refined, ref_content, program, out, plan.inserted, plan.replaced)
    exact = _exact_program(raw_lines, ref_content)
    if exact is not None:
        return _report(raw, refined, ref_content, *exact, 0, 0)
    return _report(raw, refined, ref_content, program, out, plan.inserted, plan.replaced)


def _exact_program(raw_lines: list[str], ref_content: list[str]) -> Optional[tuple[Program, str]]:
    """The exact solver's program and output, if it yields the refined non-blank lines
    (``ref_content``) with no whitespace-only op."""
    plan = _exact_plan(raw_lines, ref_content)
    if plan is None:
        return None
    program, out = _finish(raw_lines, plan)
    if _content_lines(out) != ref_content:
        return None
    if any(isinstance(op, RemoveStr) and op.text.isspace() for op in program.ops):
        return None
    return program, out


def _report(
    raw: str, refined: str, ref_content: list[str], program: Program, out: str, inserted: int, replaced: int
) -> Distillation:
    """``ref_content``: the non-blank lines of ``refined`` (what ``exact`` compares)."""
    return Distillation(
        program=program,
        kept_chars=len(out),
        deleted_chars=len(raw) - len(out),
        inserted_chars=inserted,
        replaced_chars=replaced,
        unrepresentable_ratio=inserted / max(1, len(refined)),
        exact=_content_lines(out) == ref_content,
    )


def _norm(text: str) -> str:
    return " ".join(text.split())


def _content_lines(text: str) -> list[str]:
    """The non-blank lines of ``text``: what the distiller compares (step 7)."""
    return [line for line in text.split("\n") if line.strip()]


def settle_blank_lines(lines: Sequence[str], removed: MutableSequence[Any]) -> None:
    """Give each blank (whitespace-only) line the removal flag of the nearest non-blank line
    above it (below it, for the blank lines that open the document), in place; in a
    document without a non-blank line they all stay. The distiller's rule for blank lines
    (step 7 of the module's description), shared with the line tagger."""
    leading: list[int] = []
    previous: Any = None  # removal flag of the last non-blank line
    for i, line in enumerate(lines):
        if line.strip():
            for j in leading:
                removed[j] = removed[i]
            leading = []
            previous = removed[i]
        elif previous is None:
            leading.append(i)
        else:
            removed[i] = previous
    for j in leading:
        removed[j] = False


# --- sequence alignment ---------------------------------------------------------------------


def _anchor(a: Sequence[Hashable], b: Sequence[Hashable]) -> list[tuple[int, int]]:
    """Patience alignment: increasing pairs of elements unique to both sides, found again
    inside each gap between them. Repeated elements are never paired: what they belong to
    is decided by the token alignment of the gap, with the text around them."""
    pairs: list[tuple[int, int]] = []
    budget = _PATIENCE_WORK * (len(a) + len(b) + 1)
    stack = [(0, len(a), 0, len(b))]
    while stack and budget > 0:
        a0, a1, b0, b1 = stack.pop()
        if a0 == a1 or b0 == b1:
            continue
        budget -= (a1 - a0) + (b1 - b0)
        prev_a, prev_b = a0, b0
        for i, j in _unique_anchors(a, a0, a1, b, b0, b1):
            stack.append((prev_a, i, prev_b, j))
            pairs.append((i, j))
            prev_a, prev_b = i + 1, j + 1
        if prev_a > a0:
            stack.append((prev_a, a1, prev_b, b1))
    pairs.sort()
    return pairs


def _align(
    a: Sequence[Hashable], b: Sequence[Hashable], late: bool = True
) -> list[tuple[int, int]]:
    """Increasing index pairs ``(i, j)`` with ``a[i] == b[j]``.

    A longest common subsequence whenever every sub-problem left after trimming a common
    suffix and anchoring on elements (else runs of four) unique to both sides is small
    enough for the bit-parallel LCS; huge anchorless gaps are matched greedily.
    Among equally long alignments it takes the latest matches, or the earliest when not
    ``late``.
    """
    if not late:
        n, m = len(a), len(b)
        return [(n - 1 - i, m - 1 - j) for i, j in reversed(_align(a[::-1], b[::-1]))]
    pairs: list[tuple[int, int]] = []
    budget = _PATIENCE_WORK * (len(a) + len(b) + 1)
    stack = [(0, len(a), 0, len(b))]
    while stack:
        a0, a1, b0, b1 = stack.pop()
        while a0 < a1 and b0 < b1 and a[a1 - 1] == b[b1 - 1]:
            a1 -= 1
            b1 -= 1
            pairs.append((a1, b1))
        if a0 == a1 or b0 == b1:
            continue
        n, m = a1 - a0, b1 - b0
        if n * m <= _LCS_CELLS and max(n, m) <= _LCS_SIDE:
            pairs.extend(_lcs(a, a0, a1, b, b0, b1))
            continue
        anchors: list[tuple[int, int]] = []
        width = 1
        for width in _ANCHOR_WIDTHS:  # single elements, else short runs (repetitive input)
            if budget <= 0:
                break
            budget -= n + m
            anchors = _unique_anchors(a, a0, a1, b, b0, b1, width)
            if anchors:
                break
        if not anchors:
            pairs.extend(_greedy(a, a0, a1, b, b0, b1))
            continue
        prev_a, prev_b = a0, b0
        for i, j in anchors:
            stack.append((prev_a, i, prev_b, j))
            pairs.extend((i + k, j + k) for k in range(width))
            prev_a, prev_b = i + width, j + width
        stack.append((prev_a, a1, prev_b, b1))
    pairs.sort()
    return pairs


def _lcs(
    a: Sequence[Hashable], a0: int, a1: int, b: Sequence[Hashable], b0: int, b1: int
) -> list[tuple[int, int]]:
    """A longest common subsequence of ``a[a0:a1]`` and ``b[b0:b1]`` (bit-parallel rows).

    Row ``i`` is a bit vector over ``b`` whose zero bits mark where the LCS length of
    ``a[:i]`` against a growing prefix of ``b`` increases, so ``L(i, j)`` is ``j`` minus the
    set bits below ``j``. The shorter side indexes the rows.
    """
    if b1 - b0 > a1 - a0:
        return [(i, j) for j, i in _lcs(b, b0, b1, a, a0, a1)]
    rows_seq, cols_seq = b, a  # iterate the shorter sequence
    r0, r1, c0, c1 = b0, b1, a0, a1
    width = c1 - c0
    wanted = {rows_seq[k] for k in range(r0, r1)}
    positions: dict[Hashable, list[int]] = {}
    for k in range(c0, c1):
        x = cols_seq[k]
        if x in wanted:
            positions.setdefault(x, []).append(k - c0)
    masks: dict[Hashable, int] = {}
    for x, spots in positions.items():
        bits = bytearray((width + 7) // 8)
        for p in spots:
            bits[p >> 3] |= 1 << (p & 7)
        masks[x] = int.from_bytes(bits, "little")
    full = (1 << width) - 1
    vector = full
    rows = [vector]
    for k in range(r0, r1):
        mask = masks.get(rows_seq[k], 0)
        if mask:
            low = vector & mask
            vector = ((vector + low) | (vector - low)) & full
        rows.append(vector)

    pairs: list[tuple[int, int]] = []
    i, j = r1 - r0, width
    length = width - rows[i].bit_count()
    while length > 0:
        if rows_seq[r0 + i - 1] == cols_seq[c0 + j - 1]:
            i -= 1
            j -= 1
            length -= 1
            pairs.append((c0 + j, r0 + i))
        elif j - (rows[i - 1] & ((1 << j) - 1)).bit_count() == length:
            i -= 1
        else:
            j -= 1
    pairs.reverse()
    return pairs


def _unique_anchors(
    a: Sequence[Hashable],
    a0: int,
    a1: int,
    b: Sequence[Hashable],
    b0: int,
    b1: int,
    width: int = 1,
) -> list[tuple[int, int]]:
    """Longest increasing chain of runs of ``width`` elements found once on each side,
    as start positions of runs that do not overlap."""

    def key(seq: Sequence[Hashable], i: int) -> Hashable:
        return seq[i] if width == 1 else tuple(seq[i : i + width])

    once_a: dict[Hashable, int] = {}
    for i in range(a0, a1 - width + 1):
        x = key(a, i)
        once_a[x] = -1 if x in once_a else i
    once_b: dict[Hashable, int] = {}
    for j in range(b0, b1 - width + 1):
        x = key(b, j)
        if x in once_a:
            once_b[x] = -1 if x in once_b else j
    candidates = sorted(
        (i, once_b[x]) for x, i in once_a.items() if i >= 0 and once_b.get(x, -1) >= 0
    )
    tails: list[int] = []  # smallest last b-index of an increasing chain of each length
    tail_at: list[int] = []
    previous = [-1] * len(candidates)
    for k, (_, j) in enumerate(candidates):
        depth = bisect_left(tails, j)
        if depth:
            previous[k] = tail_at[depth - 1]
        if depth == len(tails):
            tails.append(j)
            tail_at.append(k)
        else:
            tails[depth] = j
            tail_at[depth] = k
    chain_: list[tuple[int, int]] = []
    k = tail_at[-1] if tail_at else -1
    while k >= 0:
        i, j = candidates[k]
        if not chain_ or (chain_[-1][0] >= i + width and chain_[-1][1] >= j + width):
            chain_.append((i, j))
        k = previous[k]
    chain_.reverse()
    return chain_


def _greedy(
    a: Sequence[Hashable], a0: int, a1: int, b: Sequence[Hashable], b0: int, b1: int
) -> list[tuple[int, int]]:
    """Match each element of ``b`` to its next occurrence in ``a`` if that is near."""
    where: dict[Hashable, list[int]] = {}
    for i in range(a0, a1):
        where.setdefault(a[i], []).append(i)
    pairs: list[tuple[int, int]] = []
    cursor = a0
    for j in range(b0, b1):
        spots = where.get(b[j])
        if not spots:
            continue
        k = bisect_left(spots, cursor)
        if k < len(spots) and spots[k] - cursor <= _GREEDY_WINDOW:
            pairs.append((spots[k], j))
            cursor = spots[k] + 1
    return pairs


# --- the main plan: line alignment, then token alignment of the gaps -----------------------


def _main_plan(raw_lines: list[str], ref_lines: list[str]) -> _Plan:
    """Anchor on non-blank lines unique to both sides, then align each gap by tokens."""
    raw_keys = [_norm(line) for line in raw_lines]
    ref_keys = [_norm(line) for line in ref_lines]
    raw_ids = [i for i, key in enumerate(raw_keys) if key]
    ref_ids = [j for j, key in enumerate(ref_keys) if key]
    aligned = _anchor([raw_keys[i] for i in raw_ids], [ref_keys[j] for j in ref_ids])
    plan = _Plan(removed=bytearray(len(raw_lines)))
    orphans: dict[str, list[int]] = {}  # refined lines with nothing aligned: key -> inserted
    prev_r = prev_f = -1
    for x, y in chain(aligned, [(len(raw_ids), len(ref_ids))]):
        r = raw_ids[x] if x < len(raw_ids) else len(raw_lines)
        f = ref_ids[y] if y < len(ref_ids) else len(ref_lines)
        gap = r > prev_r + 1 or f > prev_f + 1
        if gap and raw_lines[prev_r + 1 : r] != ref_lines[prev_f + 1 : f]:
            _region(raw_lines, ref_lines, (prev_r + 1, r), (prev_f + 1, f), plan, orphans)
        prev_r, prev_f = r, f
    for i, key in enumerate(raw_keys):  # lines the expert moved are kept where they are
        moved = orphans.get(key) if plan.removed[i] else None
        if moved:
            plan.removed[i] = 0
            plan.inserted -= moved.pop()
    return plan


class _Tokens:
    """The words and punctuation of some lines, in order; positions computed on demand.

    A blank (or whitespace-only) line counts as one token, ``_BLANK``, so that blank lines
    are aligned in order with the text around them.
    """

    def __init__(self, lines: list[str], lo: int = 0, hi: int = 0) -> None:
        self.lines = lines
        self.text: list[str] = []
        self.word = bytearray()  # 1 for a word, 0 for punctuation
        self.line: list[int] = []
        self.nth: list[int] = []  # index of the token within its line
        self._spans: dict[int, list[Span]] = {}
        for i in range(lo, hi):
            found = _GROUPED_RE.findall(lines[i])
            if found:
                self.text.extend(map("".join, found))
                self.word.extend(map(bool, map(itemgetter(0), found)))
                self.line.extend(repeat(i, len(found)))
                self.nth.extend(range(len(found)))
            else:  # a blank (or whitespace-only) line is one token of its own
                self.text.append(_BLANK)
                self.word.append(0)
                self.line.append(i)
                self.nth.append(-1)

    def __len__(self) -> int:
        return len(self.text)

    def pick(self, chosen: Sequence[int]) -> _Tokens:
        """The tokens at ``chosen`` (increasing), sharing the position cache."""
        subset = _Tokens(self.lines)
        subset._spans = self._spans
        subset.text = [self.text[k] for k in chosen]
        subset.word = bytearray(self.word[k] for k in chosen)
        subset.line = [self.line[k] for k in chosen]
        subset.nth = [self.nth[k] for k in chosen]
        return subset

    def span(self, k: int) -> Span:
        """Character span of token ``k`` in its line (empty for a blank line's token)."""
        if self.nth[k] < 0:
            return 0, 0
        i = self.line[k]
        spans = self._spans.get(i)
        if spans is None:
            spans = self._spans[i] = [m.span() for m in _CONTENT_RE.finditer(self.lines[i])]
        return spans[self.nth[k]]

    def starts_line(self, k: int) -> bool:
        return k == 0 or self.line[k - 1] != self.line[k]

    def ends_line(self, k: int) -> bool:
        return k == len(self.line) - 1 or self.line[k + 1] != self.line[k]


def _region(
    raw_lines: list[str],
    ref_lines: list[str],
    raw_range: tuple[int, int],
    ref_range: tuple[int, int],
    plan: _Plan,
    orphans: dict[str, list[int]],
) -> None:
    """Token-level alignment of one unaligned region; records deletions in ``plan``.

    Words are aligned first, alone: a raw line whose aligned words are a small part of it
    (typically a line the expert deleted, which would otherwise lend its "the" or "." to
    the alignment) is left out, and the region is aligned again, punctuation included,
    without it; lines that turn out weak then are left out in turn, a bounded number of
    times.
    """
    r0, r1 = raw_range
    if ref_range[0] == ref_range[1]:  # the expert kept nothing of these lines
        plan.removed[r0:r1] = b"\x01" * (r1 - r0)
        return
    ref = _Tokens(ref_lines, *ref_range)
    raw = _Tokens(raw_lines, r0, r1)
    left_out: set[int] = set()
    if r1 - r0 > 1:
        words = raw.pick([k for k, w in enumerate(raw.word) if w])
        ref_words = ref.pick([k for k, w in enumerate(ref.word) if w])
        status, close, _, _ = _classify(words, ref_words)
        left_out = _weak_lines(words, status, close, aligned_only=False)
    tokens = raw
    for round_ in range(_ALIGN_ROUNDS):
        if left_out:
            tokens = raw.pick([k for k, i in enumerate(raw.line) if i not in left_out])
        status, close, partner, ref_hit = _classify(tokens, ref)
        if round_ + 1 == _ALIGN_ROUNDS:
            break
        weak = _weak_lines(tokens, status, close, aligned_only=True)
        if not weak:
            break
        left_out |= weak

    inserted_by_line: dict[int, int] = {}
    aligned_lines: set[int] = set()
    k = 0
    while k < len(ref):
        line = ref.line[k]
        if ref_hit[k]:
            aligned_lines.add(line)
            k += 1
            continue
        end = k
        while end + 1 < len(ref) and not ref_hit[end + 1] and ref.line[end + 1] == line:
            end += 1
        inserted_by_line[line] = inserted_by_line.get(line, 0) + ref.span(end)[1] - ref.span(k)[0]
        k = end + 1
    plan.inserted += sum(inserted_by_line.values())
    for line, count in inserted_by_line.items():
        if line not in aligned_lines and count:
            orphans.setdefault(_norm(ref_lines[line]), []).append(count)

    k = 0
    for i in range(r0, r1):
        first = k
        while k < len(tokens) and tokens.line[k] == i:
            k += 1
        if _MATCH not in status[first:k] and (first == k or 0 in close[first:k]):
            plan.removed[i] = 1
            continue
        spans = []
        t = first
        while t < k:
            if status[t] != _DEL:
                if status[t] == _KEEP:
                    start, end = tokens.span(t)
                    plan.replaced += end - start
                t += 1
                continue
            end = t
            while end + 1 < k and status[end + 1] == _DEL:
                end += 1
            left = t - 1 if t > first else -1
            right = end + 1 if end + 1 < k else -1
            line = raw_lines[i]
            cut = _cut(
                line,
                tokens.span(left)[1] if left >= 0 else 0,
                tokens.span(t)[0],
                tokens.span(end)[1],
                tokens.span(right)[0] if right >= 0 else len(line),
                _target_gap(
                    partner[left] if left >= 0 and status[left] == _MATCH else -1,
                    partner[right] if right >= 0 and status[right] == _MATCH else -1,
                    left < 0,
                    right < 0,
                    ref,
                ),
            )
            if cut is not None:
                spans.append(cut)
            t = end + 1
        if spans:
            plan.spans[i] = spans


def _classify(raw: _Tokens, ref: _Tokens) -> tuple[bytearray, bytearray, list[int], bytearray]:
    """Align raw tokens with refined ones: per raw token its status (``_DEL``, ``_KEEP``,
    ``_MATCH``), whether it is a close rewrite, its partner; per refined token, whether
    it is aligned.

    When the raw tokens span several lines, the latest and the earliest of the longest
    alignments are both computed and the one that keeps lines together wins (see
    ``_coherence``): a repeated word or "." then goes with the rest of its line. Between
    two matches, raw and refined tokens that both remain form a replacement; it is judged
    line by line (see ``_judge``).
    """
    n_raw, n_ref = len(raw), len(ref)
    pairs = _align(raw.text, ref.text) if n_raw and n_ref else []
    if pairs and raw.line[0] != raw.line[-1]:
        early = _align(raw.text, ref.text, late=False)
        if _coherence(early, raw, ref) > _coherence(pairs, raw, ref):
            pairs = early
    counterparts: dict[int, set[int]] = {}  # raw line -> refined lines it is aligned with
    for x, y in pairs:
        counterparts.setdefault(raw.line[x], set()).add(ref.line[y])
    status = bytearray(n_raw)  # _DEL unless matched or kept as the raw side of a rewrite
    close = bytearray(n_raw)  # kept rewrite that closely resembles its replacement
    partner = [-1] * n_raw
    ref_hit = bytearray(n_ref)
    px = py = -1
    for x, y in chain(pairs, [(n_raw, n_ref)]):
        if x > px + 1 and y > py + 1:
            _judge(raw, ref, (px + 1, x), (py + 1, y), counterparts, status, close)
        if x < n_raw:
            status[x] = _MATCH
            partner[x] = y
            ref_hit[y] = 1
        px, py = x, y
    return status, close, partner, ref_hit


def _judge(
    raw: _Tokens,
    ref: _Tokens,
    raw_range: tuple[int, int],
    ref_range: tuple[int, int],
    counterparts: dict[int, set[int]],
    status: bytearray,
    close: bytearray,
) -> None:
    """Decide which raw tokens of a replacement to keep.

    Each raw line's share of it is compared with the refined tokens of the replacement
    that lie on refined lines aligned with that raw line (all of them when the raw line
    has no aligned token): nothing there means a plain deletion; otherwise the raw share
    is kept when it resembles its replacement or has at most twice as many tokens plus
    one (a rewrite: not representable), and deleted when it is much longer.
    """
    by_line: dict[int, list[str]] = {}  # the replacement's tokens per refined line, in order
    for k in range(*ref_range):
        by_line.setdefault(ref.line[k], []).append(ref.text[k])
    everything = ref.text[ref_range[0] : ref_range[1]]
    start, stop = raw_range
    while start < stop:
        line = raw.line[start]
        end = start
        while end + 1 < stop and raw.line[end + 1] == line:
            end += 1
        aligned = counterparts.get(line)
        if aligned is None:
            new = everything
        else:
            new = [text for j in sorted(aligned) for text in by_line.get(j, ())]
        if new:
            share = raw.text[start : end + 1]
            similar = _similar(share, new)
            if similar or len(share) <= 2 * len(new) + 1:
                status[start : end + 1] = bytes([_KEEP]) * len(share)
                close[start : end + 1] = bytes([similar]) * len(share)
        start = end + 1


def _coherence(pairs: list[tuple[int, int]], raw: _Tokens, ref: _Tokens) -> tuple[int, int, int]:
    """How well an alignment keeps lines together: its matches; those that go to the
    refined line most of their raw line's matches go to; the sum of squared match counts
    per (raw line, refined line)."""
    per_pair = Counter((raw.line[x], ref.line[y]) for x, y in pairs)
    best: dict[int, int] = {}
    for (line, _), count in per_pair.items():
        best[line] = max(best.get(line, 0), count)
    return len(pairs), sum(best.values()), sum(count * count for count in per_pair.values())


def _weak_lines(
    tokens: _Tokens, status: bytearray, close: bytearray, aligned_only: bool
) -> set[int]:
    """Lines (with an aligned token, if ``aligned_only``) whose aligned or closely
    rewritten words make up less than ``_WEAK`` of their words' characters."""
    words: dict[int, int] = {}
    good: dict[int, int] = {}
    aligned: set[int] = set()
    for k, text in enumerate(tokens.text):
        line = tokens.line[k]
        if status[k] == _MATCH:
            aligned.add(line)
        if tokens.word[k]:
            words[line] = words.get(line, 0) + len(text)
            if status[k] == _MATCH or close[k]:
                good[line] = good.get(line, 0) + len(text)
    lines = aligned if aligned_only else words.keys()
    return {line for line in lines if good.get(line, 0) < _WEAK * words.get(line, 0)}


def _similar(raw_side: list[str], ref_side: list[str]) -> bool:
    """Whether a replacement is a light rewrite of the raw text (character similarity)."""
    a, b = " ".join(raw_side), " ".join(ref_side)
    matcher = SequenceMatcher(None, a, b, autojunk=False)
    if matcher.real_quick_ratio() < _SIMILAR or matcher.quick_ratio() < _SIMILAR:
        return False
    return len(a) + len(b) > _SIMILAR_CHARS or matcher.ratio() >= _SIMILAR


def _target_gap(r1: int, r2: int, at_start: bool, at_end: bool, ref: _Tokens) -> Optional[str]:
    """The refined text that replaces the gap around a deleted run, when it is known.

    ``r1``/``r2`` are the refined partners of the kept tokens left and right of the run
    (``-1``: none or not aligned); ``at_start``/``at_end`` mean the run starts/ends its
    line. Known when both partners are adjacent tokens of one refined line, or when the
    run starts (ends) its raw line and its partner starts (ends) its refined line.
    """
    if at_start:
        if r2 >= 0 and ref.starts_line(r2):
            return ref.lines[ref.line[r2]][: ref.span(r2)[0]]
        return None
    if at_end:
        if r1 >= 0 and ref.ends_line(r1):
            return ref.lines[ref.line[r1]][ref.span(r1)[1] :]
        return None
    if r1 >= 0 and r2 == r1 + 1 and ref.line[r1] == ref.line[r2]:
        return ref.lines[ref.line[r1]][ref.span(r1)[1] : ref.span(r2)[0]]
    return None


def _glues(line: str, start: int, end: int) -> bool:
    """Whether deleting ``line[start:end]`` would join two words into one."""
    return (
        0 < start
        and end < len(line)
        and _WORDISH_RE.match(line[start - 1]) is not None
        and _WORDISH_RE.match(line[end]) is not None
    )


def _cut(line: str, g0: int, c0: int, c1: int, g1: int, target: Optional[str]) -> Optional[Span]:
    """The span to delete for the token run ``line[c0:c1]`` lying in the gap ``[g0, g1)``.

    The gap holds the run and the whitespace around it, up to the neighbouring kept tokens
    (or the line's edges). The span covers the run plus whitespace from one or both sides:
    what reproduces ``target`` (the expert's text for the gap) when possible; otherwise all
    of it at a line edge or before closing punctuation, else the run and the whitespace
    after it (before it when there is none after). ``None`` when any deletion would glue
    two words together.
    """
    if target is not None:
        size = len(target)
        for x in range(min(c0 - g0, size), -1, -1):  # x chars of the left whitespace stay
            y = size - x
            if y > g1 - c1:
                break
            if line[g0 : g0 + x] == target[:x] and line[g1 - y : g1] == target[x:]:
                if not _glues(line, g0 + x, g1 - y):
                    return g0 + x, g1 - y
    if g0 == 0 or g1 == len(line) or (line[g1] in _CLOSERS and not _glues(line, g0, g1)):
        return g0, g1
    if c0 > g0:
        return c0, g1
    if g1 > c1:
        return g0, c1
    return None if _glues(line, g0, g1) else (g0, g1)


# --- the exact solver ----------------------------------------------------------------------


def _unit_texts(text: str) -> list[str]:
    return _UNIT_RE.findall(text)


def _exact_plan(raw_lines: list[str], ref_lines: list[str]) -> Optional[_Plan]:
    """Embed each refined line, in order, into its own raw line by deleting whole units.

    Each refined line goes to the first raw line after the previous one that yields it
    without a whitespace-only deletion (the earliest choice is optimal for existence);
    lines that differ only in whitespace never do. ``None`` when some refined line cannot
    be placed.
    """
    n = len(raw_lines)
    plan = _Plan(removed=bytearray(b"\x01" * n))
    budget = _EMBED_BUDGET
    cursor = 0
    for target in ref_lines:
        units: Optional[list[str]] = None
        probes: list[str] = []
        blank = not target.strip()
        i = cursor
        while i < n:
            line = raw_lines[i]
            if line == target:
                break
            if not blank:
                if units is None:
                    units = _unit_texts(target)
                    content = {unit for unit in units if not unit.isspace()}
                    probes = sorted(content, key=len, reverse=True)[:_PROBES]
                if (
                    all(p in line for p in probes)
                    and _subsequence(_unit_texts(line), units)
                    and _norm(line) != _norm(target)
                ):
                    spans, budget = _embed(line, target, budget)
                    if spans is not None:
                        plan.spans[i] = spans
                        break
            i += 1
        else:
            return None
        plan.removed[i] = 0
        cursor = i + 1
    return plan


def _subsequence(units: list[str], wanted: list[str]) -> bool:
    remaining = iter(units)
    return all(unit in remaining for unit in wanted)


def _embed(line: str, target: str, budget: int) -> tuple[Optional[list[Span]], int]:
    """Spans of ``line`` whose deletion leaves ``target`` (a unit subsequence of it).

    Fewest deletion runs (whitespace-only runs only when unavoidable) by dynamic
    programming within ``budget`` cells, leftmost matching beyond. Returns the spans, or
    ``None`` when a whitespace-only run remains, and the budget left.
    """
    found = [(m.start(), m.end()) for m in _UNIT_RE.finditer(line)]
    units = [line[a:b] for a, b in found]
    wanted = _unit_texts(target)
    cells = len(units) * (len(wanted) + 1)
    if cells <= min(_EMBED_CELLS, budget):
        kept = _fewest_runs(units, wanted)
        budget -= cells
    else:
        kept = _leftmost(units, wanted)
    spans: list[Span] = []
    k = 0
    while k < len(units):
        if kept[k]:
            k += 1
            continue
        end = k
        while end + 1 < len(units) and not kept[end + 1]:
            end += 1
        if all(units[u].isspace() for u in range(k, end + 1)):
            return None, budget
        spans.append((found[k][0], found[end][1]))
        k = end + 1
    return spans, budget


def _leftmost(units: list[str], wanted: list[str]) -> list[bool]:
    kept = [False] * len(units)
    j = 0
    for k, unit in enumerate(units):
        if j < len(wanted) and unit == wanted[j]:
            kept[k] = True
            j += 1
    return kept


def _fewest_runs(units: list[str], wanted: list[str]) -> list[bool]:
    """Which units to keep so that ``wanted`` remains with the fewest deletion runs.

    States per (units seen, wanted matched): 0 after a kept unit, 1 inside a run of only
    whitespace so far, 2 inside a run holding a token; closing a state-1 run costs
    ``_WS_RUN``, opening any run costs 1.
    """
    n, m = len(units), len(wanted)
    inf = 1 << 62
    cost = [inf] * (3 * (m + 1))
    cost[0] = 0
    back: list[list[int]] = []
    for k in range(n):
        unit = units[k]
        space = unit.isspace()
        new = [inf] * (3 * (m + 1))
        pred = [-1] * (3 * (m + 1))
        for j in range(max(0, m - (n - k)), min(k, m) + 1):
            for state in range(3):
                here = cost[3 * j + state]
                if here >= inf:
                    continue
                if state == 0:
                    nxt, step = (1 if space else 2), here + 1
                else:
                    nxt, step = (1 if state == 1 and space else 2), here
                if step < new[3 * j + nxt]:
                    new[3 * j + nxt] = step
                    pred[3 * j + nxt] = 3 * j + state
                if j < m and unit == wanted[j]:
                    step = here + (_WS_RUN if state == 1 else 0)
                    if step < new[3 * (j + 1)]:
                        new[3 * (j + 1)] = step
                        pred[3 * (j + 1)] = 3 * j + state
        back.append(pred)
        cost = new
    final = [cost[3 * m], cost[3 * m + 1] + _WS_RUN, cost[3 * m + 2]]
    if min(final) >= inf:  # not a unit subsequence (callers check first)
        return _leftmost(units, wanted)
    index = 3 * m + min(range(3), key=final.__getitem__)
    kept = [False] * n
    for k in range(n - 1, -1, -1):
        kept[k] = index % 3 == 0
        index = back[k][index]
    return kept


# --- from a plan to a program --------------------------------------------------------------


def _finish(raw_lines: list[str], plan: _Plan) -> tuple[Program, str]:
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
            self._units = [(m.start(), m.end()) for m in _UNIT_RE.finditer(self.line)]
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
        if _WORDISH_RE.match(line, units[k][0]):
            break
        lefts.append(units[k][0])
        k -= 1
    rights = [end]
    k = bisect_left(starts, end)
    while k < len(units) and len(rights) <= _EXTEND_UNITS and units[k][1] <= hi:
        if _WORDISH_RE.match(line, units[k][0]):
            break
        rights.append(units[k][1])
        k += 1
    best: Optional[tuple[int, int, int]] = None
    for a in lefts:
        for b in rights:
            grow = (start - a) + (b - end)
            if grow == 0 or (best is not None and grow >= best[0]) or _glues(line, a, b):
                continue
            if finder.once(line[a:b]):
                best = (grow, a, b)
    return None if best is None else (best[1], best[2])
