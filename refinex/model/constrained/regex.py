"""The regular expression of a chunk's programs, for engines with their own structured outputs.

:func:`program_regex` is the (looser) regex equivalent of the automaton
(``refinex.model.constrained.automaton``) for vLLM and OpenAI-compatible servers. Pure
Python.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

from refinex.model.constrained.automaton import escape_char

__all__ = ["int_range_regex", "program_regex"]


def int_range_regex(lo: int, hi: int) -> str:
    """A regex matching the decimal spellings (no leading zeros) of ``lo .. hi``."""
    if lo < 0 or hi < lo:
        raise ValueError(f"bad range [{lo}, {hi}]")
    parts: list[str] = []
    for a, b in _split_same_length(lo, hi):
        parts.extend(_same_length_patterns(str(a), str(b)))
    return parts[0] if len(parts) == 1 else "(" + "|".join(parts) + ")"


def _split_same_length(lo: int, hi: int) -> list[tuple[int, int]]:
    out = []
    while lo <= hi:
        top = min(hi, 10 ** len(str(lo)) - 1)
        out.append((lo, top))
        lo = top + 1
    return out


def _digit_class(a: str, b: str) -> str:
    if a == b:
        return a
    if a == "0" and b == "9":
        return "[0-9]"
    return f"[{a}-{b}]"


def _same_length_patterns(a: str, b: str) -> list[str]:
    """Patterns for all numbers between ``a`` and ``b`` (equal lengths, a <= b)."""
    if len(a) == 1:
        return [_digit_class(a, b)]
    if a[0] == b[0]:
        return [a[0] + p for p in _same_length_patterns(a[1:], b[1:])]
    rest = len(a) - 1
    out: list[str] = []
    low_tail_full = a[1:] == "0" * rest
    high_tail_full = b[1:] == "9" * rest
    first_full = a[0] if low_tail_full else str(int(a[0]) + 1)
    last_full = b[0] if high_tail_full else str(int(b[0]) - 1)
    if not low_tail_full:
        out.extend(a[0] + p for p in _same_length_patterns(a[1:], "9" * rest))
    if int(first_full) <= int(last_full):
        out.append(_digit_class(first_full, last_full) + ("[0-9]" if rest == 1 else f"[0-9]{{{rest}}}"))
    if not high_tail_full:
        out.extend(b[0] + p for p in _same_length_patterns("0" * rest, b[1:]))
    return out


# Any canonical string-literal character: printable ASCII except quote and backslash, any
# non-ASCII character (the renderer keeps printable ones), or one of the renderer's escapes.
_ANY_CHAR = r'([^"\\\x00-\x1f\x7f]|\\["\\ntr]|\\u[0-9a-f]{4}|\\U[0-9a-f]{8})'


def _line_chars_regex(text: str) -> Optional[str]:
    """A regex for one character of ``text``'s canonical spelling (None if empty)."""
    plain: set[str] = set()
    escaped: set[str] = set()
    for char in set(text):
        spelled = escape_char(char)
        (plain if spelled == char else escaped).add(spelled)
    options = []
    if plain:
        klass = "".join(re.escape(c) if c in "\\]^-[" else c for c in sorted(plain))
        options.append(f"[{klass}]")
    options.extend(re.escape(s) for s in sorted(escaped))
    if not options:
        return None
    return options[0] if len(options) == 1 else "(" + "|".join(options) + ")"


def program_regex(first_line: int, last_line: int, lines: Sequence[str] = ()) -> str:
    """The regular expression of the chunk's programs, for engines' structured outputs.

    Looser than :class:`ProgramAutomaton` (a regex cannot track ``start <= end``, overlaps
    or substrings): line ids are limited to ``[first_line, last_line]``; with ``lines``,
    ``remove_str`` only names lines that have characters and its string only uses
    characters of that line. Programs end with a newline, like the training targets.
    """
    ids = int_range_regex(first_line, last_line)
    ops = [rf"remove_lines\({ids}, {ids}\)"]
    if lines:
        if len(lines) != last_line - first_line + 1:
            raise ValueError(f"{len(lines)} lines given for the range [{first_line}, {last_line}]")
        per_line = []
        for offset, text in enumerate(lines):
            chars = _line_chars_regex(text)
            if chars is not None:
                per_line.append(f'{first_line + offset}, "{chars}+"')
        if per_line:
            ops.append(r"remove_str\((" + "|".join(per_line) + r")\)")
    else:
        ops.append(rf'remove_str\({ids}, "{_ANY_CHAR}+"\)')
    op = "(" + "|".join(ops) + ")"
    return rf"(keep_all\(\)\n|({op}\n)+)"
