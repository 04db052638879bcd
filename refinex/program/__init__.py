"""The deletion-only program language: operations, parser, renderer and executor.

``refinex.program.parse`` and ``refinex.program.execute`` are the functions (they shadow
their submodules' names on the package); import other names from the submodules with
``from refinex.program.execute import ...``.
"""
from __future__ import annotations

from refinex.program.ops import OP_NAMES, KeepAll, Op, ParseError, Program, RemoveLines, RemoveStr
from refinex.program.render import line_tag, number_lines, quote_string, render_op, render_program
from refinex.program.parse import parse, parse_line
from refinex.program.execute import (
    BAD_RANGE,
    EMPTY_STRING,
    LINE_OUT_OF_RANGE,
    LINE_REMOVED,
    OVERLAP,
    REJECT_REASONS,
    STRING_NOT_FOUND,
    Guardrails,
    RejectedOp,
    Result,
    execute,
    execute_text,
)

__all__ = [
    "OP_NAMES",
    "KeepAll",
    "Op",
    "ParseError",
    "Program",
    "RemoveLines",
    "RemoveStr",
    "line_tag",
    "number_lines",
    "quote_string",
    "render_op",
    "render_program",
    "parse",
    "parse_line",
    "BAD_RANGE",
    "EMPTY_STRING",
    "LINE_OUT_OF_RANGE",
    "LINE_REMOVED",
    "OVERLAP",
    "REJECT_REASONS",
    "STRING_NOT_FOUND",
    "Guardrails",
    "RejectedOp",
    "Result",
    "execute",
    "execute_text",
]
