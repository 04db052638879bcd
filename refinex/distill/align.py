"""The distiller's main plan: align raw and refined lines, then the tokens of the gaps.

Steps 1 to 4 of ``refinex.distill``'s description: non-blank lines unique to both sides
anchor the alignment; each gap is aligned by tokens (words first, then punctuation,
leaving out lines the expert deleted); raw tokens without a counterpart are deleted unless
they are the raw side of a rewrite, and each deleted run goes with the whitespace that
reproduces the expert's. The result is a :class:`~refinex.distill.plan.Plan`.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from difflib import SequenceMatcher
from itertools import chain, repeat
from operator import itemgetter
from typing import Optional

from refinex.distill.lcs import align, anchor
from refinex.distill.plan import Plan, Span
from refinex.distill.units import CONTENT_RE, GROUPED_RE, glues, norm

__all__ = ["main_plan"]

_SIMILAR = 0.6  # a replacement at least this similar to the raw text is a rewrite of it
_SIMILAR_CHARS = 4_000  # longer replacements are compared by character counts only
_WEAK = 0.3  # a line whose aligned words are a smaller share of it is realigned without it
_ALIGN_ROUNDS = 3  # full alignments of one region at most (each leaves weak lines out)
_CLOSERS = frozenset(",.;:!?)]}%\u00bb\u2026\u201d\u2019")  # no space needed before these

_BLANK = "\n"  # the token of a blank line (no real token contains a line break)
_DEL, _KEEP, _MATCH = 0, 1, 2  # status of a raw token inside an unaligned region


def main_plan(raw_lines: list[str], ref_lines: list[str]) -> Plan:
    """Anchor on non-blank lines unique to both sides, then align each gap by tokens."""
    raw_keys = [norm(line) for line in raw_lines]
    ref_keys = [norm(line) for line in ref_lines]
    raw_ids = [i for i, key in enumerate(raw_keys) if key]
    ref_ids = [j for j, key in enumerate(ref_keys) if key]
    aligned = anchor([raw_keys[i] for i in raw_ids], [ref_keys[j] for j in ref_ids])
    plan = Plan(removed=bytearray(len(raw_lines)))
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
            found = GROUPED_RE.findall(lines[i])
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
            spans = self._spans[i] = [m.span() for m in CONTENT_RE.finditer(self.lines[i])]
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
    plan: Plan,
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
            orphans.setdefault(norm(ref_lines[line]), []).append(count)

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
    pairs = align(raw.text, ref.text) if n_raw and n_ref else []
    if pairs and raw.line[0] != raw.line[-1]:
        early = align(raw.text, ref.text, late=False)
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
                if not glues(line, g0 + x, g1 - y):
                    return g0 + x, g1 - y
    if g0 == 0 or g1 == len(line) or (line[g1] in _CLOSERS and not glues(line, g0, g1)):
        return g0, g1
    if c0 > g0:
        return c0, g1
    if g1 > c1:
        return g0, c1
    return None if glues(line, g0, g1) else (g0, g1)
