"""Token-budget chunks of whole lines with document-global line ids.

A document is cut into chunks of consecutive whole lines, each shown to the model as
numbered text (``[012] line``) of at most ``max_tokens`` tokens. Ids stay global, so a
program written for a chunk addresses the document directly, and the per-chunk programs
merge back into one document program.

Over-long lines: a line whose numbered form alone exceeds the budget gets a chunk of its
own, and only its *display* is truncated: the longest prefix that fits (binary search over
the prefix length), followed by ``" …[truncated]"``. The raw line is never altered and its
id stays addressable, so the model can still keep or delete it whole; its id is listed in
:attr:`Chunk.truncated_lines`.
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from refinex.program.ops import KeepAll, Op, ParseError, Program, RemoveLines, RemoveStr
from refinex.program.render import line_tag

__all__ = [
    "Chunk",
    "TRUNCATION_MARKER",
    "chunk_document",
    "whitespace_token_count",
    "hf_token_counter",
    "program_for_chunk",
    "merge_chunk_programs",
]

TokenCounter = Callable[[str], int]

TRUNCATION_MARKER = " …[truncated]"


@dataclass(frozen=True)
class Chunk:
    """Lines ``start_line`` .. ``end_line`` (inclusive, global ids) as numbered text."""

    index: int
    start_line: int
    end_line: int
    text: str  # the numbered lines joined by "\n" (over-long lines truncated for display)
    n_tokens: int  # count_tokens(text)
    truncated_lines: tuple[int, ...] = ()

    @property
    def n_lines(self) -> int:
        return self.end_line - self.start_line + 1

    def contains(self, line: int) -> bool:
        """Whether global line id ``line`` belongs to this chunk."""
        return self.start_line <= line <= self.end_line


def whitespace_token_count(text: str) -> int:
    """Number of whitespace-separated words: a cheap, dependency-free token estimate."""
    return len(text.split())


def hf_token_counter(tokenizer: Any) -> TokenCounter:
    """A counter using a Hugging Face tokenizer's ``encode(text, add_special_tokens=False)``."""

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    return count


def _numbered(line_id: int, line: str) -> str:
    return f"{line_tag(line_id)} {line}"


def _truncated_display(line_id: int, line: str, count_tokens: TokenCounter, max_tokens: int) -> str:
    """The longest ``[id] prefix …[truncated]`` within ``max_tokens`` (binary search)."""

    def display(length: int) -> str:
        return f"{_numbered(line_id, line[:length])}{TRUNCATION_MARKER}"

    if count_tokens(display(0)) > max_tokens:
        raise ValueError(
            f"max_tokens={max_tokens} cannot hold even the tag of line {line_id} and the "
            f"truncation marker ({count_tokens(display(0))} tokens)"
        )
    fits, too_long = 0, len(line)  # invariant: display(fits) fits, display(too_long) does not
    while too_long - fits > 1:
        middle = (fits + too_long) // 2
        if count_tokens(display(middle)) <= max_tokens:
            fits = middle
        else:
            too_long = middle
    return display(fits)


def chunk_document(
    raw: str,
    count_tokens: TokenCounter = whitespace_token_count,
    max_tokens: int = 1500,
) -> list[Chunk]:
    """Pack the lines of ``raw`` greedily into chunks of at most ``max_tokens`` tokens.

    Every line of ``raw.split("\\n")`` is in exactly one chunk, in order (so a document
    always has at least one chunk). The cost of a candidate chunk is estimated as the sum
    of its numbered lines' counts plus one ``"\\n"`` count per join, and each finished chunk
    is counted exactly; a chunk that turns out over budget (a tokenizer that merges across
    line breaks) gives back lines from its end. With an additive counter such as
    :func:`whitespace_token_count` the packing is exactly greedy.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    lines = raw.split("\n")
    numbered = [_numbered(line_id, line) for line_id, line in enumerate(lines)]
    costs = [count_tokens(text) for text in numbered]
    separator = count_tokens("\n")
    chunks: list[Chunk] = []
    start = 0
    while start < len(lines):
        if costs[start] > max_tokens:
            display = _truncated_display(start, lines[start], count_tokens, max_tokens)
            chunks.append(Chunk(len(chunks), start, start, display, count_tokens(display), (start,)))
            start += 1
            continue
        end = start  # inclusive
        estimate = costs[start]
        while end + 1 < len(lines) and estimate + separator + costs[end + 1] <= max_tokens:
            end += 1
            estimate += separator + costs[end]
        while True:
            text = "\n".join(numbered[start : end + 1])
            n_tokens = count_tokens(text)
            if n_tokens <= max_tokens or end == start:
                break
            end -= 1
        chunks.append(Chunk(len(chunks), start, end, text, n_tokens))
        start = end + 1
    return chunks


def _accepted_line_ranges(ops: Sequence[Op]) -> list[Optional[tuple[int, int]]]:
    """Per op, the range a ``remove_lines`` op would remove, judged on line ids alone.

    Mirrors execution: ill-formed ranges (start > end, negative) and ranges overlapping an
    earlier accepted one are rejected (``None``). Only the document's end is unknown here.
    """
    starts: list[int] = []
    ends: list[int] = []
    result: list[Optional[tuple[int, int]]] = []
    for op in ops:
        if not isinstance(op, RemoveLines) or op.start > op.end or op.start < 0:
            result.append(None)
            continue
        index = bisect_right(starts, op.end) - 1
        if index >= 0 and ends[index] >= op.start:
            result.append(None)
            continue
        insert_at = bisect_right(starts, op.start)
        starts.insert(insert_at, op.start)
        ends.insert(insert_at, op.end)
        result.append((op.start, op.end))
    return result


def program_for_chunk(program: Program, chunk: Chunk) -> Program:
    """The document ``program`` restricted to the lines of ``chunk``.

    ``remove_lines`` ops are clipped to the chunk (those execution would reject for a bad
    range or an overlap are left out), ``remove_str`` ops on the chunk's lines are kept in
    order, and ``keep_all`` is implied: a chunk with nothing to delete gets
    ``Program((KeepAll(),))``. Parse errors belong to the document and are not carried.
    """
    ops: list[Op] = []
    for op, accepted in zip(program.ops, _accepted_line_ranges(program.ops)):
        if isinstance(op, RemoveLines):
            if accepted is None:
                continue
            start, end = max(accepted[0], chunk.start_line), min(accepted[1], chunk.end_line)
            if start <= end:
                ops.append(RemoveLines(start, end))
        elif isinstance(op, RemoveStr) and chunk.contains(op.line):
            ops.append(op)
    return Program(tuple(ops) if ops else (KeepAll(),))


def merge_chunk_programs(programs: Sequence[Program]) -> Program:
    """One document program from per-chunk programs (in chunk order).

    Ops are concatenated in order; ``keep_all`` is dropped when any other op exists (and
    kept once otherwise); well-formed ``remove_lines`` ranges that overlap or touch are
    coalesced into one range, placed where the first of them was; parse errors are carried
    in order.
    """
    ops: list[Op] = [op for program in programs for op in program.ops]
    errors: tuple[ParseError, ...] = tuple(error for program in programs for error in program.errors)
    deleting = [op for op in ops if not isinstance(op, KeepAll)]
    if not deleting:
        return Program((KeepAll(),) if ops else (), errors)
    return Program(tuple(_coalesce_line_ranges(deleting)), errors)


def _coalesce_line_ranges(ops: list[Op]) -> list[Op]:
    """Replace each group of touching/overlapping ranges by their union, at the group's first op."""
    ranged = sorted(
        (op.start, op.end, index)
        for index, op in enumerate(ops)
        if isinstance(op, RemoveLines) and op.start <= op.end
    )
    union_at: dict[int, RemoveLines] = {}  # index of a group's first op -> the group's union
    absorbed: set[int] = set()
    group: list[int] = []
    group_start = group_end = 0
    for start, end, index in ranged:
        if group and start <= group_end + 1:
            group.append(index)
            group_end = max(group_end, end)
            continue
        if group:
            _close_group(group, group_start, group_end, union_at, absorbed)
        group, group_start, group_end = [index], start, end
    if group:
        _close_group(group, group_start, group_end, union_at, absorbed)
    merged: list[Op] = []
    for index, op in enumerate(ops):
        if index in union_at:
            merged.append(union_at[index])
        elif index not in absorbed:
            merged.append(op)
    return merged


def _close_group(
    group: list[int], start: int, end: int, union_at: dict[int, RemoveLines], absorbed: set[int]
) -> None:
    first = min(group)
    union_at[first] = RemoveLines(start, end)
    absorbed.update(index for index in group if index != first)
