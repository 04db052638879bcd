"""Program text -> :class:`Program`: a hand-written tokenizer and recursive-descent parser.

Grammar (one operation per line of text; blank lines are ignored)::

    line      := call [";"]
    call      := NAME "(" [args [","]] ")"
    args      := arg ("," arg)*
    arg       := [NAME "="] (INT | STRING)
    INT       := [0-9]+                      (leading zeros allowed; no sign)
    STRING    := '"' chars '"' | "'" chars "'"

Operations: ``remove_lines(start, end)``, ``remove_str(line, text)``, ``keep_all()``.
Arguments may be passed by position or by keyword (positional ones first, as in Python).

String escapes: ``\\\\ \\" \\' \\n \\t \\r \\uXXXX \\UXXXXXXXX``. ``\\uXXXX`` is one UTF-16 code
unit: a high/low surrogate pair written as two ``\\u`` escapes (JSON style) decodes to one
character; ``\\UXXXXXXXX`` is exactly one code point and never combines, which is what the
renderer uses for surrogates and non-printable astral characters so that every string
round-trips.

:func:`parse` never raises on a ``str``: every line that is not exactly one well-formed
operation becomes a :class:`ParseError`. Parsing is linear in the length of the text.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator, Optional, Union

from refinex.program.ops import KeepAll, Op, ParseError, Program, RemoveLines, RemoveStr

__all__ = ["parse", "parse_line", "PARAMETERS"]

# Token kinds.
_NAME = "name"
_INT = "int"
_STRING = "string"
_LPAREN = "("
_RPAREN = ")"
_COMMA = ","
_EQUALS = "="
_SEMI = ";"
_MINUS = "-"
_END = "end of line"

_PUNCTUATION = {"(": _LPAREN, ")": _RPAREN, ",": _COMMA, "=": _EQUALS, ";": _SEMI, "-": _MINUS}
_SIMPLE_ESCAPES = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t", "r": "\r"}
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_DIGITS = frozenset("0123456789")
_NAME_START = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_NAME_CHARS = _NAME_START | _DIGITS
# Runs of characters that need no attention inside a string literal, per quote character.
_PLAIN_RUN = {'"': re.compile(r'[^"\\]+'), "'": re.compile(r"[^'\\]+")}
_NAME_RUN = re.compile(r"[A-Za-z0-9_]+")
_INT_RUN = re.compile(r"[0-9]+")
_MAX_SHOWN = 40  # longest excerpt of user text quoted in an error message

#: Parameters of each operation, in positional order, with the expected token kind.
PARAMETERS: dict[str, tuple[tuple[str, str], ...]] = {
    "remove_lines": (("start", _INT), ("end", _INT)),
    "remove_str": (("line", _INT), ("text", _STRING)),
    "keep_all": (),
}


class _SyntaxError(Exception):
    """Internal: a malformed line (always caught and turned into a ParseError)."""

    def __init__(self, col: int, message: str) -> None:
        super().__init__(message)
        self.col = col
        self.message = message


@dataclass(frozen=True)
class _Token:
    kind: str
    value: Union[str, int, None]
    col: int  # 0-based column in the stripped line


def _shown(text: str) -> str:
    """A short, quoted excerpt of user text for an error message."""
    if len(text) > _MAX_SHOWN:
        text = text[:_MAX_SHOWN] + "…"
    return repr(text)


def _read_hex(line: str, pos: int, width: int, escape_col: int) -> int:
    digits = line[pos : pos + width]
    if len(digits) != width or not all(c in _HEX_DIGITS for c in digits):
        marker = "\\u" if width == 4 else "\\U"
        raise _SyntaxError(escape_col, f"{marker} escape needs {width} hex digits")
    return int(digits, 16)


def _read_string(line: str, start: int) -> tuple[str, int]:
    """Decode the string literal whose opening quote is at ``start``; return (value, end)."""
    quote = line[start]
    plain = _PLAIN_RUN[quote]
    parts: list[str] = []
    pos = start + 1
    n = len(line)
    while True:
        run = plain.match(line, pos)
        if run is not None:
            parts.append(run.group())
            pos = run.end()
        if pos >= n:
            raise _SyntaxError(start, "unterminated string")
        char = line[pos]
        if char == quote:
            return "".join(parts), pos + 1
        # A backslash escape.
        escape_col = pos
        if pos + 1 >= n:
            raise _SyntaxError(start, "unterminated string")
        code = line[pos + 1]
        pos += 2
        simple = _SIMPLE_ESCAPES.get(code)
        if simple is not None:
            parts.append(simple)
        elif code == "u":
            unit = _read_hex(line, pos, 4, escape_col)
            pos += 4
            if 0xD800 <= unit <= 0xDBFF and line.startswith("\\u", pos):
                try:
                    low = _read_hex(line, pos + 2, 4, pos)
                except _SyntaxError:
                    low = -1  # reported when the next escape is decoded on its own
                if 0xDC00 <= low <= 0xDFFF:
                    unit = 0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00)
                    pos += 6
            parts.append(chr(unit))
        elif code == "U":
            point = _read_hex(line, pos, 8, escape_col)
            if point > 0x10FFFF:
                raise _SyntaxError(escape_col, "\\U escape is beyond U+10FFFF")
            pos += 8
            parts.append(chr(point))
        else:
            shown = f"\\{code}" if code.isprintable() else repr("\\" + code)
            raise _SyntaxError(escape_col, f"unknown escape {shown}")


def _tokenize(line: str) -> Iterator[_Token]:
    """Tokens of one stripped line of program text, lazily, ending with an END token.

    Being lazy, a lexical error is only reported when the parser reaches it, so the first
    problem of a line (in reading order) is the one reported.
    """
    pos = 0
    n = len(line)
    while pos < n:
        char = line[pos]
        if char.isspace():
            pos += 1
        elif char in _NAME_START:
            run = _NAME_RUN.match(line, pos)
            assert run is not None  # char itself matches
            yield _Token(_NAME, run.group(), pos)
            pos = run.end()
        elif char in _DIGITS:
            run = _INT_RUN.match(line, pos)
            assert run is not None
            digits = run.group()
            end = run.end()
            if end < n and line[end] in _NAME_CHARS:
                raise _SyntaxError(pos, f"malformed number {_shown(line[pos:end + 1])}")
            try:
                value = int(digits)
            except ValueError:  # beyond the interpreter's integer-string limit
                raise _SyntaxError(pos, "integer too large") from None
            yield _Token(_INT, value, pos)
            pos = end
        elif char == '"' or char == "'":
            value_str, end = _read_string(line, pos)
            yield _Token(_STRING, value_str, pos)
            pos = end
        elif char in _PUNCTUATION:
            yield _Token(_PUNCTUATION[char], char, pos)
            pos += 1
        else:
            raise _SyntaxError(pos, f"unexpected character {char!r}")
    yield _Token(_END, None, n)


def _describe(token: _Token) -> str:
    if token.kind == _NAME:
        return f"name {_shown(str(token.value))}"
    if token.kind == _INT:
        return f"number {token.value}"
    if token.kind == _STRING:
        return "string"
    if token.kind == _END:
        return "end of line"
    return repr(token.kind)


class _LineParser:
    """Recursive-descent parser over the tokens of one line."""

    def __init__(self, tokens: Iterator[_Token]) -> None:
        self._tokens = tokens
        self._lookahead: list[_Token] = []  # at most two tokens

    def _peek(self, offset: int = 0) -> _Token:
        while len(self._lookahead) <= offset:
            if self._lookahead and self._lookahead[-1].kind == _END:
                return self._lookahead[-1]
            self._lookahead.append(next(self._tokens))
        return self._lookahead[offset]

    def _next(self) -> _Token:
        token = self._peek()
        if token.kind != _END:
            self._lookahead.pop(0)
        return token

    def _expect(self, kind: str, what: str) -> _Token:
        token = self._next()
        if token.kind != kind:
            raise _SyntaxError(token.col, f"expected {what}, got {_describe(token)}")
        return token

    def line(self) -> Op:
        """``line := call [";"]`` followed by the end of the line."""
        op = self.call()
        if self._peek().kind == _SEMI:
            self._next()
        token = self._next()
        if token.kind != _END:
            raise _SyntaxError(token.col, f"unexpected {_describe(token)} after the operation")
        return op

    def call(self) -> Op:
        """``call := NAME "(" [args [","]] ")"``."""
        name_token = self._expect(_NAME, "an operation name")
        name = str(name_token.value)
        if name not in PARAMETERS:
            raise _SyntaxError(
                name_token.col,
                f"unknown operation {_shown(name)} (expected one of {', '.join(PARAMETERS)})",
            )
        self._expect(_LPAREN, "'('")
        args = self.args()
        self._expect(_RPAREN, "')'")
        return _bind(name, name_token.col, args)

    def args(self) -> list[tuple[Optional[str], _Token]]:
        """``args := arg ("," arg)*`` with an optional trailing comma; may be empty."""
        args: list[tuple[Optional[str], _Token]] = []
        while self._peek().kind != _RPAREN:
            args.append(self.arg())
            if self._peek().kind == _COMMA:
                self._next()
            elif self._peek().kind != _RPAREN:
                token = self._peek()
                raise _SyntaxError(token.col, f"expected ',' or ')', got {_describe(token)}")
        return args

    def arg(self) -> tuple[Optional[str], _Token]:
        """``arg := [NAME "="] value``."""
        keyword: Optional[str] = None
        if self._peek().kind == _NAME and self._peek(1).kind == _EQUALS:
            keyword = str(self._next().value)
            self._next()
        return keyword, self.value()

    def value(self) -> _Token:
        """``value := INT | STRING``; a minus sign is reported as a negative number."""
        token = self._next()
        if token.kind in (_INT, _STRING):
            return token
        if token.kind == _MINUS and self._peek().kind == _INT:
            raise _SyntaxError(token.col, "negative numbers are not allowed")
        raise _SyntaxError(token.col, f"expected a number or a string, got {_describe(token)}")


def _bind(name: str, col: int, args: list[tuple[Optional[str], _Token]]) -> Op:
    """Match positional and keyword arguments to the operation's parameters."""
    params = PARAMETERS[name]
    names = [param for param, _ in params]
    bound: dict[str, _Token] = {}
    seen_keyword = False
    for index, (keyword, token) in enumerate(args):
        if keyword is None:
            if seen_keyword:
                raise _SyntaxError(token.col, "positional argument after a keyword argument")
            if index >= len(params):
                raise _SyntaxError(
                    token.col, f"{name}() takes {len(params)} argument(s), got {len(args)}"
                )
            param = names[index]
        else:
            seen_keyword = True
            if keyword not in names:
                raise _SyntaxError(
                    token.col, f"{name}() has no parameter {_shown(keyword)}"
                )
            param = keyword
        if param in bound:
            raise _SyntaxError(token.col, f"{name}() got argument {param!r} twice")
        bound[param] = token
    missing = [param for param in names if param not in bound]
    if missing:
        raise _SyntaxError(col, f"{name}() is missing argument(s): {', '.join(missing)}")
    for param, kind in params:
        if bound[param].kind != kind:
            expected = "a number" if kind == _INT else "a string"
            raise _SyntaxError(bound[param].col, f"argument {param!r} of {name}() must be {expected}")
    if name == "remove_lines":
        return RemoveLines(_int(bound["start"]), _int(bound["end"]))
    if name == "remove_str":
        return RemoveStr(_int(bound["line"]), str(bound["text"].value))
    return KeepAll()


def _int(token: _Token) -> int:
    assert isinstance(token.value, int)
    return token.value


def _located(err: _SyntaxError) -> str:
    return f"column {err.col + 1}: {err.message}"


def parse_line(line: str) -> Op:
    """Parse one line holding exactly one operation; raise ``ValueError`` if it is malformed.

    Surrounding whitespace is ignored; the column in the message counts from the first
    non-blank character.
    """
    try:
        return _LineParser(_tokenize(line.strip())).line()
    except _SyntaxError as err:
        raise ValueError(_located(err)) from None


def parse(text: str) -> Program:
    """Parse program text: one operation per line, malformed lines collected as errors."""
    ops: list[Op] = []
    errors: list[ParseError] = []
    for line_no, line in enumerate(text.split("\n")):
        stripped = line.strip()
        if not stripped:
            continue
        try:
            ops.append(_LineParser(_tokenize(stripped)).line())
        except _SyntaxError as err:
            errors.append(ParseError(line_no, stripped, _located(err)))
    return Program(tuple(ops), tuple(errors))
