"""The exact solver: embed each refined line into its own raw line by deleting whole units.

Step 6 of ``refinex.distill``'s description. It only runs when the main plan
(``refinex.distill.align``) does not reproduce the expert's text, and wins when its plan
does without a whitespace-only deletion: whenever ``refined`` is ``raw`` minus whole
lines and whole-unit runs within lines, the program reproduces it exactly.
"""
from __future__ import annotations

from typing import Optional

from refinex.distill.plan import Plan, Span
from refinex.distill.units import UNIT_RE, norm

__all__ = ["exact_plan"]

_PROBES = 8  # exact solver: longest tokens of a refined line looked up in a raw line first
_EMBED_CELLS = 40_000  # fewest-runs DP for one line of the exact solver up to this size
_EMBED_BUDGET = 400_000  # DP cells for all lines of one document
_WS_RUN = 1 << 20  # DP cost of a whitespace-only deletion run (avoided unless unavoidable)


def _unit_texts(text: str) -> list[str]:
    return UNIT_RE.findall(text)


def exact_plan(raw_lines: list[str], ref_lines: list[str]) -> Optional[Plan]:
    """Embed each refined line, in order, into its own raw line by deleting whole units.

    Each refined line goes to the first raw line after the previous one that yields it
    without a whitespace-only deletion (the earliest choice is optimal for existence);
    lines that differ only in whitespace never do. ``None`` when some refined line cannot
    be placed.
    """
    n = len(raw_lines)
    plan = Plan(removed=bytearray(b"\x01" * n))
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
                    and norm(line) != norm(target)
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
    found = [(m.start(), m.end()) for m in UNIT_RE.finditer(line)]
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
