"""The token table: the byte string of every token id of a Hugging Face tokenizer.

:class:`TokenTable` covers byte-level BPE, SentencePiece ``▁``/byte-fallback and added
tokens, special tokens excluded, stored sorted so that the allowed tokens of an automaton
state are found by walking the implicit trie of token byte strings (``bisect`` ranges)
against the automaton instead of testing all 50k-150k tokens.

Pure Python: it reads a tokenizer object it is given but imports neither torch nor
transformers.
"""
from __future__ import annotations

import json
import re
import weakref
from bisect import bisect_left
from typing import Any, Iterable, Optional, Sequence

from refinex.model.constrained.automaton import ProgramAutomaton, State

__all__ = ["TokenTable", "token_table_for"]


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
