"""Canonical program text and the numbered-line view of a document.

``parse(render_program(p)) == p`` holds for every program whose line ids are non-negative
integers: strings are double-quoted, ``\\`` ``"`` and line breaks are escaped, and every
non-printable character (control, separator, surrogate, unassigned...) is written as a
``\\uXXXX`` (BMP) or ``\\UXXXXXXXX`` (surrogates and astral characters) escape. Printable
non-ASCII text is kept as it is, so the model sees the document's own characters.
"""
from __future__ import annotations

from typing import Sequence

from refinex.program.ops import KeepAll, Op, Program, RemoveLines, RemoveStr

__all__ = ["render_op", "render_program", "quote_string", "line_tag", "number_lines"]

_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escape_char(char: str) -> str:
    simple = _ESCAPES.get(char)
    if simple is not None:
        return simple
    point = ord(char)
    if point <= 0xFFFF and not 0xD800 <= point <= 0xDFFF:
        return f"\\u{point:04x}"
    # Surrogates use \U so that two adjacent lone surrogates never read back as one pair.
    return f"\\U{point:08x}"


def quote_string(text: str) -> str:
    """``text`` as a double-quoted program string literal (linear in its length)."""
    if text.isprintable() and "\\" not in text and '"' not in text:
        return f'"{text}"'
    parts = ['"']
    for char in text:
        if char in _ESCAPES or not char.isprintable():
            parts.append(_escape_char(char))
        else:
            parts.append(char)
    parts.append('"')
    return "".join(parts)


def _line_id(value: int, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a non-negative int, got {value!r}")
    return str(value)


def render_op(op: Op) -> str:
    """One operation as canonical text, e.g. ``remove_lines(3, 7)``.

    Raises ``ValueError`` for a line id that is not a non-negative ``int`` (no program text
    could express it) and ``TypeError`` for an object that is not an operation.
    """
    if isinstance(op, RemoveLines):
        return f"remove_lines({_line_id(op.start, 'start')}, {_line_id(op.end, 'end')})"
    if isinstance(op, RemoveStr):
        if not isinstance(op.text, str):
            raise ValueError(f"text must be a str, got {op.text!r}")
        return f"remove_str({_line_id(op.line, 'line')}, {quote_string(op.text)})"
    if isinstance(op, KeepAll):
        return "keep_all()"
    raise TypeError(f"not a program operation: {op!r}")


def render_program(program: Program) -> str:
    """Canonical program text: one operation per line, no trailing newline ("" when empty).

    Parse errors are not rendered: the text is that of the well-formed operations.
    """
    return "\n".join(render_op(op) for op in program.ops)


def line_tag(i: int) -> str:
    """The id prefix the model sees for line ``i``: ``[007]``, ``[1234]``."""
    if i < 0:
        raise ValueError(f"line ids are non-negative, got {i}")
    return f"[{i:03d}]"


def number_lines(lines: Sequence[str], start: int = 0) -> str:
    """``[000] first\\n[001] second...`` with document-global ids starting at ``start``."""
    return "\n".join(f"{line_tag(start + offset)} {line}" for offset, line in enumerate(lines))
