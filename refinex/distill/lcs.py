"""Alignment of two sequences of hashable elements (lines, tokens): index pairs of equal
elements, in order.

:func:`anchor` is a patience alignment on elements unique to both sides (the distiller's
line anchors); :func:`align` is an exact longest common subsequence (bit-parallel) for
every sub-problem small enough, anchored on unique elements or runs and greedy only for
huge anchorless gaps (the token alignment). Generic and independent of text, so the
alignment's guarantees can be tested on their own.
"""
from __future__ import annotations

from bisect import bisect_left
from collections.abc import Hashable, Sequence

__all__ = ["align", "anchor"]

_LCS_CELLS = 16_000_000  # bit-parallel LCS when len(a) * len(b) is at most this ...
_LCS_SIDE = 20_000  # ... and neither side is longer than this
_PATIENCE_WORK = 20  # patience recursion may visit this many times the input size
_ANCHOR_WIDTHS = (1, 4)  # anchor huge gaps on unique elements, else on unique 4-runs
_GREEDY_WINDOW = 256  # last resort: match the next occurrence within this many elements


def anchor(a: Sequence[Hashable], b: Sequence[Hashable]) -> list[tuple[int, int]]:
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


def align(
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
        return [(n - 1 - i, m - 1 - j) for i, j in reversed(align(a[::-1], b[::-1]))]
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
