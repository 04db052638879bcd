"""The deletion-only program language: operations and programs as plain data.

A program is a sequence of operations over a document's lines. Lines are the pieces of
``raw.split("\\n")`` and are addressed by 0-based, document-global ids (the ``[000]``
prefixes the model sees). Every operation can only delete characters from the raw text.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union


@dataclass(frozen=True)
class RemoveLines:
    """Delete lines ``start`` .. ``end`` (inclusive) together with their line breaks."""

    start: int
    end: int

    @property
    def name(self) -> str:
        return "remove_lines"


@dataclass(frozen=True)
class RemoveStr:
    """Delete one occurrence of ``text`` inside line ``line``."""

    line: int
    text: str

    @property
    def name(self) -> str:
        return "remove_str"


@dataclass(frozen=True)
class KeepAll:
    """Keep the document as it is."""

    @property
    def name(self) -> str:
        return "keep_all"


Op = Union[RemoveLines, RemoveStr, KeepAll]
OP_NAMES = ("remove_lines", "remove_str", "keep_all")


@dataclass(frozen=True)
class ParseError:
    """One line of program text that is not a well-formed operation."""

    line_no: int  # 0-based line of the program text
    text: str  # the offending source line
    message: str


@dataclass(frozen=True)
class Program:
    """Parsed program: the well-formed operations in source order, plus parse errors."""

    ops: tuple[Op, ...] = ()
    errors: tuple[ParseError, ...] = field(default=(), compare=False)

    def __str__(self) -> str:  # canonical text; parse(str(p)) == p
        from refinex.program.render import render_program

        return render_program(self)
