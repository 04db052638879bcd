"""The ``transformers`` side of constrained decoding: a logits processor and a stopping criterion.

:class:`ProgramLogitsProcessor` keeps one automaton per batch row. Greedy mode checks the
top-k candidates of each row first (a trained model's choice is nearly always valid) and
only walks the token trie when none is; ``mask`` mode masks the full distribution
(sampling). :class:`NewlineStopCriteria` stops each row at its blank line.

The only module of ``refinex.model.constrained`` that needs torch and transformers, kept
apart so that the automaton, the token table and the regex import without them.
"""
from __future__ import annotations

import time
import weakref
from typing import Any, Optional, Sequence

from refinex.model.constrained.automaton import ProgramAutomaton, State
from refinex.model.constrained.tokens import TokenTable

__all__ = ["NewlineStopCriteria", "ProgramLogitsProcessor"]


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
