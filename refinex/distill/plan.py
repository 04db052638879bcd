"""What to delete, before it becomes a program, and the rule for blank lines.

The line/token alignment (``refinex.distill.align``) and the exact solver
(``refinex.distill.solver``) both fill in a :class:`Plan`; the emitter
(``refinex.distill.emit``) turns one into a program. :func:`settle_blank_lines` is the
distiller's rule for blank lines (step 7 of ``refinex.distill``'s description), shared
with the line tagger and line voting.
"""
from __future__ import annotations

from collections.abc import MutableSequence, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Plan", "Span", "settle_blank_lines"]

Span = tuple[int, int]  # half-open character span inside one line


@dataclass
class Plan:
    """What to delete: whole lines, and character spans of the lines that stay."""

    removed: bytearray
    spans: dict[int, list[Span]] = field(default_factory=dict)
    inserted: int = 0
    replaced: int = 0


def settle_blank_lines(lines: Sequence[str], removed: MutableSequence[Any]) -> None:
    """Give each blank (whitespace-only) line the removal flag of the nearest non-blank line
    above it (below it, for the blank lines that open the document), in place; in a
    document without a non-blank line they all stay. The distiller's rule for blank lines
    (step 7 of ``refinex.distill``'s description), shared with the line tagger."""
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
