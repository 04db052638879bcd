"""Grammar-constrained decoding of refine programs.

Three layers, all pure Python (torch is only needed by :class:`ProgramLogitsProcessor`):

* :class:`ProgramAutomaton`: a byte-level automaton accepting exactly the *canonical* programs
  (as ``render_program`` writes them, one op per line, each line ending in ``\\n``) that
  ``execute`` accepts without rejecting an operation, for one chunk: line ids within
  ``[first_line, last_line]``, ``start <= end``, no ``remove_lines`` range that overlaps an
  earlier one or a line edited by ``remove_str``, ``remove_str`` only on lines no
  ``remove_lines`` removes, with a non-empty string that occurs in the raw line outside the
  spans deleted before (escaped as ``quote_string`` escapes), ``keep_all()`` only as the sole
  operation. It works on UTF-8 bytes, so tokens that end inside a multi-byte character or
  span several grammar elements (``")\\nremove_``) need no special case.
* :class:`TokenTable`: the byte string of every token id of a Hugging Face tokenizer
  (byte-level BPE, SentencePiece ``▁``/byte-fallback, added tokens), special tokens
  excluded, stored sorted so that the allowed tokens of a state are found by walking the
  implicit trie of token byte strings (``bisect`` ranges) against the automaton instead of
  testing all 50k-150k tokens.
* :class:`ProgramLogitsProcessor`: a ``transformers`` logits processor with one automaton per
  batch row. Greedy mode checks the top-k candidates of each row first (a trained model's
  choice is nearly always valid) and only walks the trie when none is; ``mask`` mode masks
  the full distribution (sampling).

:func:`program_regex` builds the equivalent (looser) regular expression for engines with
their own structured-output support (vLLM, OpenAI-compatible servers).
"""
from __future__ import annotations

import json
import math
import re
import time
import weakref
from bisect import bisect_left, bisect_right
from typing import Any, Iterable, Optional, Sequence

from refinex.program.render import quote_string

__all__ = [
    "ProgramAutomaton",
    "TokenTable",
    "ProgramLogitsProcessor",
    "NewlineStopCriteria",
    "token_table_for",
    "program_regex",
    "int_range_regex",
    "escape_char",
    "complete_prefix",
    "op_confidences",
    "drop_unsure_ops",
]

# Automaton modes (first element of every state tuple).
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


# -- token table -----------------------------------------------------------------------


def _byte_level_alphabet() -> dict[str, int]:
    """The printable stand-in character of each byte in byte-level BPE vocabularies."""
    direct = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    mapping = {chr(b): b for b in direct}
    shifted = 0
    for b in range(256):
        if b not in direct:
            mapping[chr(256 + shifted)] = b
            shifted += 1
    return mapping


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _decoder_spec(tokenizer: Any) -> str:
    """The JSON of the fast tokenizer's decoder ("" when unknown)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None:
        return ""
    try:
        state = decoder.__getstate__()
        return state.decode("utf-8") if isinstance(state, bytes) else str(state)
    except Exception:  # noqa: BLE001 - an opaque decoder: fall back to the full dump
        try:
            return json.dumps(json.loads(backend.to_str()).get("decoder"))
        except Exception:  # noqa: BLE001
            return ""


class TokenTable:
    """Byte strings of a vocabulary, sorted for trie walks, plus the eos ids.

    ``token_bytes[i]`` is ``None`` for ids that must never be generated inside a program
    (special tokens, unknown, ids past the tokenizer's vocabulary).
    """

    def __init__(self, token_bytes: Sequence[Optional[bytes]], eos_ids: Iterable[int]) -> None:
        self.token_bytes: list[Optional[bytes]] = [b if b else None for b in token_bytes]
        self.vocab_size = len(self.token_bytes)
        self.eos_ids: tuple[int, ...] = tuple(sorted({int(i) for i in eos_ids if 0 <= int(i) < self.vocab_size}))
        by_bytes: dict[bytes, list[int]] = {}
        for token_id, data in enumerate(self.token_bytes):
            if data is not None and token_id not in self.eos_ids:
                by_bytes.setdefault(data, []).append(token_id)
        self.keys: list[bytes] = sorted(by_bytes)
        self.key_ids: list[tuple[int, ...]] = [tuple(by_bytes[k]) for k in self.keys]

    @classmethod
    def from_tokenizer(
        cls,
        tokenizer: Any,
        vocab_size: Optional[int] = None,
        eos_ids: Optional[Iterable[int]] = None,
    ) -> "TokenTable":
        """Build the table of a ``transformers`` tokenizer (``vocab_size``: the model's)."""
        n_tokens = len(tokenizer)
        size = max(n_tokens, vocab_size or 0)
        pieces = tokenizer.convert_ids_to_tokens(list(range(n_tokens)))
        spec = _decoder_spec(tokenizer)
        byte_level = '"ByteLevel"' in spec
        metaspace = '"Metaspace"' in spec or "\u2581" in spec or "\\u2581" in spec
        byte_fallback = '"ByteFallback"' in spec
        alphabet = _byte_level_alphabet() if byte_level else {}
        special: set[int] = set(getattr(tokenizer, "all_special_ids", ()) or ())
        added: dict[int, Any] = dict(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        for token_id, token in added.items():
            if getattr(token, "special", False):
                special.add(int(token_id))
        unk = getattr(tokenizer, "unk_token_id", None)
        if unk is not None:
            special.add(int(unk))
        table: list[Optional[bytes]] = [None] * size
        for token_id, piece in enumerate(pieces):
            if token_id in special or piece is None:
                continue
            if token_id in added:  # added tokens are stored as plain text
                table[token_id] = str(getattr(added[token_id], "content", piece)).encode("utf-8")
                continue
            table[token_id] = _piece_bytes(tokenizer, piece, alphabet, metaspace, byte_fallback)
        if eos_ids is None:
            eos = getattr(tokenizer, "eos_token_id", None)
            eos_ids = [] if eos is None else [eos]
        return cls(table, eos_ids)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids`` (tokens without bytes, eos included, are skipped)."""
        return self.decode_bytes(ids).decode("utf-8", "replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes of ``ids`` (tokens without bytes are skipped)."""
        table = self.token_bytes
        return b"".join(table[i] or b"" for i in ids if 0 <= i < self.vocab_size)

    def walk(self, automaton: ProgramAutomaton, state: State) -> list[int]:
        """Ids (eos excluded) of the tokens the automaton accepts from ``state``.

        Walks the implicit trie of the sorted byte strings: a subtree is entered only for
        bytes the automaton allows, and small subtrees are checked token by token.
        """
        keys, key_ids = self.keys, self.key_ids
        out: list[int] = []
        stack: list[tuple[int, int, bytes, State]] = [(0, len(keys), b"", state)]
        while stack:
            lo, hi, prefix, current = stack.pop()
            depth = len(prefix)
            if lo < hi and len(keys[lo]) == depth:  # the token equal to the prefix
                if depth:
                    out.extend(key_ids[lo])
                lo += 1
            if lo >= hi:
                continue
            if hi - lo <= 12:
                for index in range(lo, hi):
                    if automaton.feed(current, keys[index][depth:]) is not None:
                        out.extend(key_ids[index])
                continue
            for byte in automaton.allowed_bytes(current):
                child = prefix + bytes((byte,))
                start = bisect_left(keys, child, lo, hi)
                if start >= hi or not keys[start].startswith(child):
                    continue
                end = bisect_left(keys, prefix + bytes((byte + 1,)), start, hi) if byte < 255 else hi
                nxt = automaton.step(current, byte)
                if nxt is not None:
                    stack.append((start, end, child, nxt))
        return out


def _piece_bytes(
    tokenizer: Any, piece: str, alphabet: dict[str, int], metaspace: bool, byte_fallback: bool
) -> Optional[bytes]:
    if alphabet and all(ch in alphabet for ch in piece):
        return bytes(alphabet[ch] for ch in piece)
    if byte_fallback:
        match = _BYTE_FALLBACK.fullmatch(piece)
        if match:
            return bytes((int(match.group(1), 16),))
    if metaspace:
        return piece.replace("\u2581", " ").encode("utf-8")
    if alphabet:  # a byte-level vocabulary entry outside the alphabet: keep its text
        return piece.encode("utf-8")
    try:
        text = tokenizer.convert_tokens_to_string([piece])
    except Exception:  # noqa: BLE001 - unusable entry
        return None
    return None if "\ufffd" in text else text.encode("utf-8")


_TABLES: "weakref.WeakKeyDictionary[Any, dict[tuple, TokenTable]]" = weakref.WeakKeyDictionary()


def token_table_for(
    tokenizer: Any, vocab_size: Optional[int] = None, eos_ids: Optional[Iterable[int]] = None
) -> TokenTable:
    """:meth:`TokenTable.from_tokenizer`, cached per tokenizer object."""
    key = (vocab_size, None if eos_ids is None else tuple(sorted(eos_ids)))
    try:
        per_tokenizer = _TABLES.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable
        return TokenTable.from_tokenizer(tokenizer, vocab_size, eos_ids)
    table = per_tokenizer.get(key)
    if table is None:
        table = TokenTable.from_tokenizer(tokenizer, vocab_size, eos_ids)
        per_tokenizer[key] = table
    return table


# -- transformers integration ----------------------------------------------------------


def _logits_processor_base() -> type:
    try:
        from transformers import LogitsProcessor
    except ImportError:  # pragma: no cover - transformers is a dependency of this module's users
        return object
    return LogitsProcessor


def _stopping_criteria_base() -> type:
    try:
        from transformers import StoppingCriteria
    except ImportError:  # pragma: no cover
        return object
    return StoppingCriteria


class ProgramLogitsProcessor(_logits_processor_base()):  # type: ignore[misc]
    """Restricts each batch row to the valid programs of its own chunk.

    ``mode="greedy"``: each row gets exactly one allowed token, the best-scoring valid one:
    the ``top_k`` best tokens are checked first, the trie walk only runs when none is valid.
    ``mode="mask"``: every invalid token gets ``-inf`` (for sampling). A row that reached
    eos (or whose state cannot continue) is pinned to eos.

    ``record=True`` (greedy mode) keeps, for every step, the log-probability the model gave
    the token chosen for each row, under its own distribution before the constraint
    (:meth:`token_logprobs`): the confidence behind each generated token.
    """

    def __init__(
        self,
        automata: Sequence[ProgramAutomaton],
        table: TokenTable,
        *,
        mode: str = "greedy",
        top_k: int = 8,
        record: bool = False,
    ) -> None:
        if mode not in ("greedy", "mask"):
            raise ValueError(f"mode must be 'greedy' or 'mask', got {mode!r}")
        if record and mode != "greedy":
            raise ValueError("token log-probabilities are recorded in greedy mode only")
        if not table.eos_ids:
            raise ValueError("constrained decoding needs an eos token")
        self.automata = list(automata)
        self.table = table
        self.mode = mode
        self.top_k = max(1, int(top_k))
        self.states: list[Optional[State]] = [a.initial() for a in self.automata]
        self.finished = [False] * len(self.automata)
        self._eos = set(table.eos_ids)
        self._next: list[dict[int, Optional[State]]] = [{} for _ in self.automata]
        self._seen: Optional[int] = None
        self.record = record
        self._logprobs: list[Any] = []  # per step: (rows, 1) log-probabilities of the chosen tokens
        self.fallbacks = 0  # rows that needed a trie walk (greedy mode)
        self.calls = 0
        self.seconds = 0.0  # wall time spent in this processor

    def _advance(self, tokens: Sequence[int]) -> None:
        for row, token in enumerate(tokens):
            if self.finished[row]:
                continue
            if token in self._eos:
                self.finished[row] = True
                continue
            memo = self._next[row]
            if token in memo:
                state = memo[token]
            else:
                data = self.table.token_bytes[token] if 0 <= token < self.table.vocab_size else None
                current = self.states[row]
                state = None if data is None or current is None else self.automata[row].feed(current, data)
            self.states[row] = state
            if state is None:  # cannot happen for tokens this processor allowed
                self.finished[row] = True
            memo.clear()

    def _valid(self, row: int, token: int) -> bool:
        state = self.states[row]
        if state is None:
            return False
        automaton = self.automata[row]
        if token in self._eos:
            return automaton.accepts_eos(state)
        if not 0 <= token < self.table.vocab_size:
            return False
        data = self.table.token_bytes[token]
        if data is None:
            return False
        memo = self._next[row]
        nxt = memo.get(token, False)
        if nxt is False:
            nxt = automaton.feed(state, data)
            memo[token] = nxt
        return nxt is not None

    def _allowed(self, row: int) -> list[int]:
        state = self.states[row]
        if self.finished[row] or state is None:
            return []
        return self.automata[row].allowed_token_ids(state, self.table)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        started = time.perf_counter()
        try:
            return self._process(input_ids, scores)
        finally:
            self.seconds += time.perf_counter() - started

    def _process(self, input_ids: Any, scores: Any) -> Any:
        import torch

        self.calls += 1
        length = int(input_ids.shape[1])
        if self._seen is not None and length > self._seen:
            self._advance(input_ids[:, -1].tolist())
        self._seen = length
        rows = scores.shape[0]
        if rows != len(self.automata):
            raise ValueError(f"{rows} score rows for {len(self.automata)} automata")
        eos = self.table.eos_ids[0]
        neg_inf = torch.finfo(scores.dtype).min
        if self.mode == "mask":
            mask = torch.ones_like(scores, dtype=torch.bool)
            for row in range(rows):
                allowed = self._allowed(row) or [eos]
                index = torch.tensor(allowed, dtype=torch.long, device=scores.device)
                index = index[index < scores.shape[1]]
                mask[row, index] = False
            return scores.masked_fill(mask, neg_inf)

        chosen: list[int] = [eos] * rows
        pending: list[int] = []
        k = min(self.top_k, scores.shape[1])
        top = scores.topk(k, dim=-1).indices.tolist()
        for row in range(rows):
            if self.finished[row] or self.states[row] is None:
                continue
            for token in top[row]:
                if self._valid(row, token):
                    chosen[row] = token
                    break
            else:
                pending.append(row)
        if pending:
            self.fallbacks += len(pending)
            lists = [[t for t in self._allowed(row) if t < scores.shape[1]] for row in pending]
            width = max(1, max(len(ids) for ids in lists))
            index = torch.full((len(pending), width), eos, dtype=torch.long)
            valid = torch.zeros((len(pending), width), dtype=torch.bool)
            for i, ids in enumerate(lists):
                if ids:
                    index[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                    valid[i, : len(ids)] = True
            index = index.to(scores.device)
            valid = valid.to(scores.device)
            rows_index = torch.tensor(pending, dtype=torch.long, device=scores.device)
            picked = scores[rows_index[:, None], index].masked_fill(~valid, neg_inf).argmax(dim=-1)
            best = index.gather(1, picked[:, None]).squeeze(1).tolist()
            for row, ids, token in zip(pending, lists, best):
                chosen[row] = token if ids else eos
        chosen_index = torch.tensor(chosen, dtype=torch.long, device=scores.device)[:, None]
        kept = scores.gather(1, chosen_index)
        if self.record:  # before the fill below overwrites the model's distribution
            self._logprobs.append(kept - scores.logsumexp(dim=-1, keepdim=True))
        # In place: generate hands processors a fresh float32 copy of the logits.
        return scores.fill_(neg_inf).scatter_(1, chosen_index, kept)

    def token_logprobs(self) -> list[list[float]]:
        """Per row, the recorded log-probability of each generated token (``record=True``)."""
        if not self._logprobs:
            return [[] for _ in self.automata]
        import torch

        return torch.cat(self._logprobs, dim=1).float().cpu().tolist()


def op_confidences(pieces: Sequence[bytes], logprobs: Sequence[float], program: bytes) -> list[tuple[bytes, float]]:
    """Each operation line of ``program`` with its confidence: the lowest probability of the
    generated tokens that wrote part of it.

    ``pieces`` are the bytes of the generated tokens, ``logprobs`` their log-probabilities;
    ``program`` is what was kept of their concatenation (a prefix, plus nothing else). A
    token that ends one line and starts the next (``")\nremove_"``) counts for both.
    """
    if len(pieces) != len(logprobs):
        raise ValueError(f"{len(pieces)} tokens for {len(logprobs)} log-probabilities")
    lines: list[tuple[bytes, float]] = []
    start = 0
    low = 0.0  # lowest log-probability of the tokens touching the current line
    token, token_end = 0, 0  # the token covering byte position ``token_end - 1``
    for pos, byte in enumerate(program):
        while token_end <= pos and token < len(pieces):
            token_end += len(pieces[token])
            low = min(low, float(logprobs[token]))
            token += 1
        if byte == _NL:
            lines.append((program[start : pos + 1], math.exp(low)))
            start = pos + 1
            # the token holding this newline may go on into the next line
            low = float(logprobs[token - 1]) if token_end > pos + 1 and token > 0 else 0.0
    if start < len(program):
        lines.append((program[start:], math.exp(low)))
    return lines


def drop_unsure_ops(lines: Sequence[tuple[bytes, float]], min_prob: float) -> tuple[bytes, int]:
    """The program without the operation lines whose confidence is below ``min_prob``, and
    how many were dropped. Blank lines (the program's end) are kept as they are. Dropping
    whole operations keeps a program deletion-only and executable."""
    kept: list[bytes] = []
    dropped = 0
    for line, prob in lines:
        if line.strip() and prob < min_prob:
            dropped += 1
        else:
            kept.append(line)
    return b"".join(kept), dropped


_NEWLINE_TABLES: "weakref.WeakKeyDictionary[TokenTable, dict[str, tuple[Any, ...]]]" = weakref.WeakKeyDictionary()


def _newline_tables(table: TokenTable, device: Any) -> tuple[Any, ...]:
    """Per token: leading / trailing newline counts (capped at 2), all-newlines, has a blank
    line; built once per table and device."""
    import torch

    per_device = _NEWLINE_TABLES.setdefault(table, {})
    key = str(device)
    cached = per_device.get(key)
    if cached is None:
        lead = torch.zeros(table.vocab_size, dtype=torch.int32)
        trail = torch.zeros(table.vocab_size, dtype=torch.int32)
        every = torch.zeros(table.vocab_size, dtype=torch.bool)
        blank = torch.zeros(table.vocab_size, dtype=torch.bool)
        for token_id, data in enumerate(table.token_bytes):
            if not data or b"\n" not in data:
                continue
            lead[token_id] = min(2, len(data) - len(data.lstrip(b"\n")))
            trail[token_id] = min(2, len(data) - len(data.rstrip(b"\n")))
            every[token_id] = not data.strip(b"\n")
            blank[token_id] = b"\n\n" in data
        cached = tuple(t.to(device) for t in (lead, trail, every, blank))
        per_device[key] = cached
    return cached


class NewlineStopCriteria(_stopping_criteria_base()):  # type: ignore[misc]
    """Stops each row independently once its generated text contains a blank line.

    Vectorised on the device (no host synchronisation): per-token tables of leading and
    trailing newline counts are looked up with the last generated token of every row.
    """

    def __init__(self, table: TokenTable, device: Any) -> None:
        self._lead, self._trail, self._every, self._blank = _newline_tables(table, device)
        self._run: Any = None  # newlines at the end of each row's text so far
        self._stopped: Any = None

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        last = input_ids[:, -1].clamp(0, self._lead.shape[0] - 1)
        if self._run is None or self._run.shape[0] != last.shape[0]:
            self._run = torch.zeros(last.shape[0], dtype=torch.int32, device=last.device)
            self._stopped = torch.zeros(last.shape[0], dtype=torch.bool, device=last.device)
        lead = self._lead[last]
        self._stopped = self._stopped | self._blank[last] | (self._run + lead >= 2)
        self._run = torch.where(self._every[last], (self._run + lead).clamp(max=2), self._trail[last])
        return self._stopped


# -- regular expressions ---------------------------------------------------------------


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
