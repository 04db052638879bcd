"""The program-grammar automaton of one chunk: which bytes may come next in a valid program.

:class:`ProgramAutomaton` is a byte-level automaton accepting exactly the *canonical*
programs (as ``render_program`` writes them, one op per line, each line ending in ``\\n``)
that ``execute`` accepts without rejecting an operation, for one chunk: line ids within
``[first_line, last_line]``, ``start <= end``, no ``remove_lines`` range that overlaps an
earlier one or a line edited by ``remove_str``, ``remove_str`` only on lines no
``remove_lines`` removes, with a non-empty string that occurs in the raw line outside the
spans deleted before (escaped as ``quote_string`` escapes), ``keep_all()`` only as the sole
operation. It works on UTF-8 bytes, so tokens that end inside a multi-byte character or
span several grammar elements (``")\\nremove_"``) need no special case.

Pure Python (no torch, no transformers): the decoders of every backend, and the tests,
share it.
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence

from refinex.program.render import quote_string

if TYPE_CHECKING:
    from refinex.model.constrained.tokens import TokenTable

__all__ = ["ProgramAutomaton", "State", "complete_prefix", "escape_char"]

_KW = 0  # reading an op keyword; (KW, ctx, prefix). prefix "" is the start of a program line
_NUM = 1  # reading a line id; (NUM, ctx, kind, digits, start)
_LIT = 2  # reading fixed text; (LIT, remaining, next_state)
_STR = 3  # inside remove_str's string; (STR, ctx, line, text, pending_bytes)
_AFTER = 4  # after an op's ")"; (AFTER, ctx)
_KEEP = 5  # after "keep_all()"; (KEEP, newlines_seen)
_DONE = 6  # after a blank line: only eos; (DONE,)

# Kinds of line id.
_LINES_START = 0
_LINES_END = 1
_STR_LINE = 2

_KW_LINES = "remove_lines("
_KW_STR = "remove_str("
_KW_KEEP = "keep_all()"
_DIGITS = frozenset(b"0123456789")
_NL = 0x0A
_QUOTE = 0x22
_BACKSLASH = 0x5C
# ASCII bytes that stand for themselves inside a canonical string literal.
_PLAIN_ASCII = frozenset(b for b in range(0x20, 0x7F) if b not in (_QUOTE, _BACKSLASH))
_DONE_STATE: tuple = (_DONE,)
_CACHE_LIMIT = 8192  # cached states per automaton before the caches are reset

State = tuple  # opaque, hashable automaton state


def escape_char(char: str) -> str:
    """The canonical program-text spelling of one character inside a string literal."""
    return quote_string(char)[1:-1]


_ESC_CACHE: dict[str, bytes] = {}


def _esc_bytes(char: str) -> bytes:
    cached = _ESC_CACHE.get(char)
    if cached is None:
        cached = escape_char(char).encode("utf-8", "surrogatepass")
        if len(_ESC_CACHE) < 65536:
            _ESC_CACHE[char] = cached
    return cached


class _Intervals:
    """Sorted, disjoint, inclusive integer intervals with prefix queries on decimal ids."""

    __slots__ = ("starts", "ends", "max_digits")

    def __init__(self, intervals: Iterable[tuple[int, int]]) -> None:
        items = sorted((a, b) for a, b in intervals if a <= b)
        self.starts = [a for a, _ in items]
        self.ends = [b for _, b in items]
        self.max_digits = len(str(self.ends[-1])) if items else 0

    def __bool__(self) -> bool:
        return bool(self.starts)

    def intersects(self, lo: int, hi: int) -> bool:
        index = bisect_right(self.starts, hi) - 1
        return index >= 0 and self.ends[index] >= lo

    def __contains__(self, value: int) -> bool:
        return self.intersects(value, value)

    def minus(self, lo: int, hi: int) -> "_Intervals":
        """These intervals without ``lo .. hi``."""
        if not self.intersects(lo, hi):
            return self
        out: list[tuple[int, int]] = []
        for a, b in zip(self.starts, self.ends):
            if b < lo or a > hi:
                out.append((a, b))
                continue
            if a < lo:
                out.append((a, lo - 1))
            if b > hi:
                out.append((hi + 1, b))
        return _Intervals(out)

    def prefix_viable(self, digits: str) -> bool:
        """Whether some member's decimal spelling (no leading zeros) starts with ``digits``."""
        if len(digits) > 1 and digits[0] == "0":
            return False
        value = int(digits)
        width = len(digits)
        if digits == "0":
            return 0 in self
        for length in range(width, self.max_digits + 1):
            scale = 10 ** (length - width)
            if self.intersects(value * scale, (value + 1) * scale - 1):
                return True
        return False


class _Ctx:
    """What the operations so far did: removed ranges, edited lines and deleted spans."""

    __slots__ = (
        "n_ops", "removed", "blocked", "spans", "_lines_start", "_str_lines", "_keywords", "_lines_end"
    )

    def __init__(
        self,
        n_ops: int,
        removed: tuple[tuple[int, int], ...],
        blocked: tuple[tuple[int, int], ...],
        spans: dict[int, tuple[tuple[int, int], ...]],
    ) -> None:
        self.n_ops = n_ops
        self.removed = removed  # accepted remove_lines ranges, sorted
        self.blocked = blocked  # removed ranges + lines edited by remove_str, sorted
        self.spans = spans  # line -> deleted (start, end) character spans, sorted
        self._lines_start: Optional[_Intervals] = None
        self._str_lines: Optional[_Intervals] = None
        self._keywords: Optional[tuple[str, ...]] = None
        self._lines_end: dict[int, _Intervals] = {}


def _insert_sorted(items: tuple, item: Any) -> tuple:
    index = bisect_left(items, item)
    return items[:index] + (item,) + items[index:]


class ProgramAutomaton:
    """Byte-level automaton of the valid canonical programs of one chunk.

    ``lines`` are the raw lines ``first_line .. last_line`` (empty: ``remove_str`` is never
    allowed). States are opaque hashable tuples; ``None`` is the dead state.
    """

    def __init__(self, first_line: int, last_line: int, lines: Sequence[str] = ()) -> None:
        if first_line < 0 or last_line < first_line:
            raise ValueError(f"bad line range [{first_line}, {last_line}]")
        if lines and len(lines) != last_line - first_line + 1:
            raise ValueError(
                f"{len(lines)} lines given for the range [{first_line}, {last_line}]"
            )
        self.first_line = first_line
        self.last_line = last_line
        self.lines = tuple(lines)
        self._segments: dict[tuple[int, tuple[tuple[int, int], ...]], tuple[str, ...]] = {}
        self._next_chars: dict[tuple[tuple[str, ...], str], frozenset[str]] = {}
        self._allowed_bytes: dict[State, tuple[int, ...]] = {}
        self._allowed_ids: dict[tuple[int, State], list[int]] = {}
        self._initial: State = (_KW, _Ctx(0, (), (), {}), "")

    # -- public API --------------------------------------------------------------------

    def initial(self) -> State:
        """The state before the first byte of the program."""
        return self._initial

    def accepts_eos(self, state: Optional[State]) -> bool:
        """Whether the program may end in ``state`` (an empty program means keep_all)."""
        if state is None:
            return False
        mode = state[0]
        return (mode == _KW and state[2] == "") or mode in (_AFTER, _KEEP, _DONE)

    def is_done(self, state: Optional[State]) -> bool:
        """Whether only eos can follow (a blank line ended the program)."""
        return state is not None and state[0] == _DONE

    def feed(self, state: Optional[State], data: bytes) -> Optional[State]:
        """The state after ``data``, or ``None`` when some byte is not allowed."""
        step = self.step
        for byte in data:
            if state is None:
                return None
            state = step(state, byte)
        return state

    def matches(self, text: str) -> bool:
        """Whether ``text`` is a complete valid program for this chunk."""
        return self.accepts_eos(self.feed(self.initial(), text.encode("utf-8", "surrogatepass")))

    def step(self, state: State, byte: int) -> Optional[State]:
        """The state after one byte, or ``None``."""
        mode = state[0]
        if mode == _STR:
            return self._step_str(state, byte)
        if mode == _NUM:
            return self._step_num(state, byte)
        if mode == _LIT:
            remaining = state[1]
            if byte != ord(remaining[0]):
                return None
            return state[2] if len(remaining) == 1 else (_LIT, remaining[1:], state[2])
        if mode == _KW:
            return self._step_kw(state, byte)
        if mode == _AFTER:
            return (_KW, state[1], "") if byte == _NL else None
        if mode == _KEEP:
            if byte != _NL:
                return None
            return (_KEEP, 1) if state[1] == 0 else _DONE_STATE
        return None

    def allowed_bytes(self, state: State) -> tuple[int, ...]:
        """Exactly the bytes that ``step`` accepts in ``state``, sorted."""
        cached = self._allowed_bytes.get(state)
        if cached is not None:
            return cached
        mode = state[0]
        result: Iterable[int]
        if mode == _STR:
            result = self._str_allowed_bytes(state)
        elif mode == _NUM:
            result = [b for b in b"0123456789,)" if self._step_num(state, b) is not None]
        elif mode == _LIT:
            result = (ord(state[1][0]),)
        elif mode == _KW:
            result = [b for b in self._kw_first_bytes(state) if self._step_kw(state, b) is not None]
        elif mode in (_AFTER, _KEEP):
            result = (_NL,)
        else:
            result = ()
        out = tuple(sorted(set(result)))
        self._remember(self._allowed_bytes, state, out)
        return out

    def allowed_token_ids(self, state: State, table: "TokenTable") -> list[int]:
        """Ids of the tokens of ``table`` whose bytes keep ``state`` alive (eos included)."""
        key = (id(table), state)
        cached = self._allowed_ids.get(key)
        if cached is not None:
            return cached
        out = table.walk(self, state)
        if self.accepts_eos(state):
            out.extend(table.eos_ids)
        self._remember(self._allowed_ids, key, out)
        return out

    # -- context -----------------------------------------------------------------------

    def _segments_of(self, ctx: _Ctx, line: int) -> tuple[str, ...]:
        """The raw line's parts outside the spans deleted so far (non-empty parts only)."""
        spans = ctx.spans.get(line, ())
        key = (line, spans)
        cached = self._segments.get(key)
        if cached is not None:
            return cached
        text = self.lines[line - self.first_line]
        parts: list[str] = []
        cursor = 0
        for start, end in spans:
            if start > cursor:
                parts.append(text[cursor:start])
            cursor = max(cursor, end)
        if cursor < len(text):
            parts.append(text[cursor:])
        out = tuple(parts)
        self._segments[key] = out
        return out

    def _lines_start_set(self, ctx: _Ctx) -> _Intervals:
        if ctx._lines_start is None:
            free: list[tuple[int, int]] = []
            cursor = self.first_line
            for start, end in ctx.blocked:
                if start > cursor:
                    free.append((cursor, min(start - 1, self.last_line)))
                cursor = max(cursor, end + 1)
            if cursor <= self.last_line:
                free.append((cursor, self.last_line))
            ctx._lines_start = _Intervals(free)
        return ctx._lines_start

    def _lines_end_set(self, ctx: _Ctx, start: int) -> _Intervals:
        cached = ctx._lines_end.get(start)
        if cached is None:
            index = bisect_right(ctx.blocked, (start, float("inf")))
            limit = self.last_line
            if index < len(ctx.blocked):
                limit = min(limit, ctx.blocked[index][0] - 1)
            cached = ctx._lines_end[start] = _Intervals([(start, limit)])
        return cached

    def _str_lines_set(self, ctx: _Ctx) -> _Intervals:
        if ctx._str_lines is None:
            ok: list[tuple[int, int]] = []
            if self.lines:
                removed = ctx.removed
                for line in range(self.first_line, self.last_line + 1):
                    index = bisect_right(removed, (line, float("inf"))) - 1
                    if index >= 0 and removed[index][1] >= line:
                        continue
                    if self._segments_of(ctx, line):
                        if ok and ok[-1][1] == line - 1:
                            ok[-1] = (ok[-1][0], line)
                        else:
                            ok.append((line, line))
            ctx._str_lines = _Intervals(ok)
        return ctx._str_lines

    def _after_remove_lines(self, ctx: _Ctx, start: int, end: int) -> _Ctx:
        new = _Ctx(
            ctx.n_ops + 1,
            _insert_sorted(ctx.removed, (start, end)),
            _insert_sorted(ctx.blocked, (start, end)),
            ctx.spans,
        )
        if ctx._lines_start is not None:
            new._lines_start = ctx._lines_start.minus(start, end)
        if ctx._str_lines is not None:
            new._str_lines = ctx._str_lines.minus(start, end)
        return new

    def _after_remove_str(self, ctx: _Ctx, line: int, text: str) -> _Ctx:
        # The first occurrence outside the deleted spans, as ``execute`` picks it.
        raw = self.lines[line - self.first_line]
        spans = ctx.spans.get(line, ())
        cursor = 0
        position = -1
        for start, end in spans + ((len(raw) + 1, len(raw) + 1),):
            found = raw.find(text, cursor, max(cursor, min(start, len(raw))))
            if found >= 0:
                position = found
                break
            cursor = max(cursor, end)
        if position < 0:  # unreachable: the automaton only lets viable strings through
            raise AssertionError(f"{text!r} is not free in line {line}")
        new_spans = dict(ctx.spans)
        new_spans[line] = _insert_sorted(spans, (position, position + len(text)))
        blocked = ctx.blocked
        index = bisect_right(blocked, (line, float("inf"))) - 1
        if not (index >= 0 and blocked[index][0] <= line <= blocked[index][1]):
            blocked = _insert_sorted(blocked, (line, line))
        new = _Ctx(ctx.n_ops + 1, ctx.removed, blocked, new_spans)
        if ctx._lines_start is not None:
            new._lines_start = ctx._lines_start.minus(line, line)
        if ctx._str_lines is not None:
            exhausted = not self._segments_of(new, line)
            new._str_lines = ctx._str_lines.minus(line, line) if exhausted else ctx._str_lines
        return new

    # -- keywords ----------------------------------------------------------------------

    def _keywords(self, ctx: _Ctx) -> tuple[str, ...]:
        if ctx._keywords is None:
            out = []
            if self._lines_start_set(ctx):
                out.append(_KW_LINES)
            if self._str_lines_set(ctx):
                out.append(_KW_STR)
            if ctx.n_ops == 0:
                out.append(_KW_KEEP)
            ctx._keywords = tuple(out)
        return ctx._keywords

    def _kw_first_bytes(self, state: State) -> set[int]:
        ctx, prefix = state[1], state[2]
        out = {ord(kw[len(prefix)]) for kw in self._keywords(ctx) if kw.startswith(prefix)}
        if prefix == "" and ctx.n_ops > 0:
            out.add(_NL)
        return out

    def _step_kw(self, state: State, byte: int) -> Optional[State]:
        ctx, prefix = state[1], state[2]
        if byte == _NL:
            return _DONE_STATE if prefix == "" and ctx.n_ops > 0 else None
        if byte >= 0x80:
            return None
        candidate = prefix + chr(byte)
        for keyword in self._keywords(ctx):
            if keyword.startswith(candidate):
                if len(candidate) < len(keyword):
                    return (_KW, ctx, candidate)
                if keyword == _KW_LINES:
                    return (_NUM, ctx, _LINES_START, "", -1)
                if keyword == _KW_STR:
                    return (_NUM, ctx, _STR_LINE, "", -1)
                return (_KEEP, 0)
        return None

    # -- line ids ----------------------------------------------------------------------

    def _id_set(self, ctx: _Ctx, kind: int, start: int) -> _Intervals:
        if kind == _LINES_START:
            return self._lines_start_set(ctx)
        if kind == _STR_LINE:
            return self._str_lines_set(ctx)
        return self._lines_end_set(ctx, start)

    def _step_num(self, state: State, byte: int) -> Optional[State]:
        _, ctx, kind, digits, start = state
        if byte in _DIGITS:
            candidate = digits + chr(byte)
            if self._id_set(ctx, kind, start).prefix_viable(candidate):
                return (_NUM, ctx, kind, candidate, start)
            return None
        if not digits:
            return None
        value = int(digits)
        if kind == _LINES_END:
            if byte != 0x29 or value not in self._id_set(ctx, kind, start):
                return None
            return (_AFTER, self._after_remove_lines(ctx, start, value))
        if byte != 0x2C or value not in self._id_set(ctx, kind, start):
            return None
        if kind == _LINES_START:
            return (_LIT, " ", (_NUM, ctx, _LINES_END, "", value))
        return (_LIT, ' "', (_STR, ctx, value, "", b""))

    # -- strings -----------------------------------------------------------------------

    def _free(self, segments: tuple[str, ...], text: str) -> bool:
        return any(text in segment for segment in segments)

    def _chars_after(self, segments: tuple[str, ...], text: str) -> frozenset[str]:
        """Characters ``c`` such that ``text + c`` occurs in one of the segments."""
        key = (segments, text)
        cached = self._next_chars.get(key)
        if cached is not None:
            return cached
        found: set[str] = set()
        if not text:
            for segment in segments:
                found.update(segment)
        else:
            width = len(text)
            for segment in segments:
                position = segment.find(text)
                while 0 <= position < len(segment) - width:
                    found.add(segment[position + width])
                    position = segment.find(text, position + 1)
        out = frozenset(found)
        self._remember(self._next_chars, key, out)
        return out

    def _step_str(self, state: State, byte: int) -> Optional[State]:
        _, ctx, line, text, pending = state
        if not pending:
            if byte == _QUOTE:
                if not text:
                    return None
                after = (_AFTER, self._after_remove_str(ctx, line, text))
                return (_LIT, ")", after)
            if byte in _PLAIN_ASCII:
                candidate = text + chr(byte)
                if self._free(self._segments_of(ctx, line), candidate):
                    return (_STR, ctx, line, candidate, b"")
                return None
        data = pending + bytes((byte,))
        partial = False
        for char in self._chars_after(self._segments_of(ctx, line), text):
            spelled = _esc_bytes(char)
            if spelled == data:
                return (_STR, ctx, line, text + char, b"")
            if not partial and len(spelled) > len(data) and spelled.startswith(data):
                partial = True
        return (_STR, ctx, line, text, data) if partial else None

    def _str_allowed_bytes(self, state: State) -> set[int]:
        _, ctx, line, text, pending = state
        out: set[int] = set()
        if not pending and text:
            out.add(_QUOTE)
        width = len(pending)
        for char in self._chars_after(self._segments_of(ctx, line), text):
            spelled = _esc_bytes(char)
            if len(spelled) > width and spelled.startswith(pending):
                out.add(spelled[width])
        return out

    @staticmethod
    def _remember(cache: dict, key: Any, value: Any) -> None:
        if len(cache) >= _CACHE_LIMIT:
            cache.clear()
        cache[key] = value


def complete_prefix(automaton: ProgramAutomaton, data: bytes) -> bytes:
    """The longest prefix of ``data`` at which the program may end (drops a cut-off op)."""
    state: Optional[State] = automaton.initial()
    best = 0
    for index, byte in enumerate(data):
        assert state is not None
        state = automaton.step(state, byte)
        if state is None:
            break
        if automaton.accepts_eos(state):
            best = index + 1
    return data[:best]
