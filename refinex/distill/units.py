"""What the distiller cuts texts into, and how it compares them.

Words (with the combining marks Python's ``\\w`` leaves out), single punctuation
characters and single whitespace characters: the line/token alignment
(``refinex.distill.align``), the exact solver (``refinex.distill.solver``) and the
program emitter (``refinex.distill.emit``) must agree on these units, so they are defined
here once, with the whitespace-insensitive comparisons of lines.
"""
from __future__ import annotations

import re
import unicodedata
from itertools import chain

__all__ = ["CONTENT_RE", "GROUPED_RE", "UNIT_RE", "WORDISH_RE", "content_lines", "glues", "norm"]


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
CONTENT_RE = re.compile(f"{_WORD}|{_PUNCT}")  # tokens that take part in alignment
GROUPED_RE = re.compile(f"({_WORD})|({_PUNCT})")  # the same, telling words apart
UNIT_RE = re.compile(rf"{_WORD}|{_PUNCT}|\s")  # smallest deletable pieces of a line
WORDISH_RE = re.compile(rf"[\w{_MARKS}]")


def norm(text: str) -> str:
    """``text`` with whitespace runs made single spaces and its edges trimmed: the key
    lines are compared on."""
    return " ".join(text.split())


def content_lines(text: str) -> list[str]:
    """The non-blank lines of ``text``: what the distiller compares (step 7 of
    ``refinex.distill``'s description)."""
    return [line for line in text.split("\n") if line.strip()]


def glues(line: str, start: int, end: int) -> bool:
    """Whether deleting ``line[start:end]`` would join two words into one."""
    return (
        0 < start
        and end < len(line)
        and WORDISH_RE.match(line[start - 1]) is not None
        and WORDISH_RE.match(line[end]) is not None
    )
