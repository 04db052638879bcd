"""SFT pairs: one (prompt, target) example per chunk of a document with a distilled program.

The prompt is :func:`~refinex.model.prompts.build_prompt` of the chunk's numbered lines and
the target is the document program restricted to the chunk (``keep_all()`` when nothing in
the chunk is deleted), so line ids stay document-global and the per-chunk targets merge back
into the document program. The train/validation split is by document: a SHA-256 of the
doc id, so it is the same on every run and machine and no document straddles the split.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

from refinex.chunking import chunk_document, program_for_chunk
from refinex.model.prompts import build_prompt, build_target
from refinex.program import Program, parse, render_program

__all__ = [
    "DEFAULT_VALIDATION_FRACTION",
    "SPLIT_SALT",
    "TRAIN",
    "VALIDATION",
    "InvalidProgramError",
    "SftPair",
    "assign_split",
    "build_sft_pairs",
    "sft_pair_fields",
    "split_pairs",
]

TRAIN = "train"
VALIDATION = "validation"
DEFAULT_VALIDATION_FRACTION = 0.1
# Part of the split hash: changing it reshuffles every document between the splits.
SPLIT_SALT = "refinex-sft-split-v1"

TokenCounter = Callable[[str], int]


class InvalidProgramError(ValueError):
    """A distilled program text that does not parse cleanly (no pair is built from it)."""


@dataclass(frozen=True)
class SftPair:
    """One supervised example: a chunk's prompt and the chunk's part of the program."""

    doc_id: str
    chunk_idx: int
    start_line: int  # global id of the chunk's first line
    end_line: int  # global id of the chunk's last line (inclusive)
    prompt: str
    target: str
    n_prompt_tokens: int
    split: str = TRAIN
    truncated_lines: tuple[int, ...] = ()  # lines whose display was cut in the prompt

    def to_row(self) -> dict[str, Any]:
        """A plain dict (lists instead of tuples), e.g. for a DataFrame or Delta row."""
        row = asdict(self)
        row["truncated_lines"] = list(self.truncated_lines)
        return row

    @classmethod
    def from_row(cls, row: Union["SftPair", Mapping[str, Any]]) -> "SftPair":
        """Build from a mapping with this class's fields (extra keys are ignored)."""
        if isinstance(row, SftPair):
            return row
        return cls(
            doc_id=str(row["doc_id"]),
            chunk_idx=int(row["chunk_idx"]),
            start_line=int(row["start_line"]),
            end_line=int(row["end_line"]),
            prompt=str(row["prompt"]),
            target=str(row["target"]),
            n_prompt_tokens=int(row.get("n_prompt_tokens") or 0),
            split=str(row.get("split") or TRAIN),
            truncated_lines=tuple(int(i) for i in (row.get("truncated_lines") or ())),
        )


def _check_fraction(validation_fraction: float) -> None:
    if not 0.0 <= validation_fraction <= 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1], got {validation_fraction}")


def assign_split(doc_id: str, validation_fraction: float = DEFAULT_VALIDATION_FRACTION) -> str:
    """``"validation"`` for about ``validation_fraction`` of doc ids, else ``"train"``.

    Monotone in the fraction: a document in validation stays there when it grows.
    """
    _check_fraction(validation_fraction)
    digest = hashlib.sha256(f"{SPLIT_SALT}\x00{doc_id}".encode("utf-8")).digest()
    position = int.from_bytes(digest[:8], "big") / 2.0**64
    return VALIDATION if position < validation_fraction else TRAIN


SAMPLE_SALT = "refinex-train-sample"


def in_train_sample(doc_id: str, sample: float) -> bool:
    """Whether a training document is in the training sample of share ``sample`` (a hash of
    the doc id, independent of the split's): nested, so a document of the 25 % sample is also
    in the 50 % one, and the same on every run."""
    if not 0.0 < sample <= 1.0:
        raise ValueError(f"sample must be in (0, 1], got {sample}")
    if sample >= 1.0:
        return True
    digest = hashlib.sha256(f"{SAMPLE_SALT}\x00{doc_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < sample


def build_sft_pairs(
    doc_id: str,
    raw: str,
    program: Union[str, Program],
    count_tokens: TokenCounter,
    *,
    max_tokens: int = 1500,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
) -> list[SftPair]:
    """One pair per chunk of ``raw`` (chunked with ``count_tokens`` and ``max_tokens``).

    ``program`` is the document's distilled program (text or parsed). A program text with
    parse errors raises :class:`InvalidProgramError`: a partial label would teach the model
    to keep what the expert deleted.
    """
    parsed = parse(program) if isinstance(program, str) else program
    if parsed.errors:
        first = parsed.errors[0]
        raise InvalidProgramError(
            f"{doc_id}: {len(parsed.errors)} parse error(s) in the program, first at "
            f"line {first.line_no}: {first.message}"
        )
    split = assign_split(doc_id, validation_fraction)
    pairs = []
    for chunk in chunk_document(raw, count_tokens, max_tokens=max_tokens):
        prompt = build_prompt(chunk.text)
        target = build_target(render_program(program_for_chunk(parsed, chunk)))
        pairs.append(
            SftPair(
                doc_id=doc_id,
                chunk_idx=chunk.index,
                start_line=chunk.start_line,
                end_line=chunk.end_line,
                prompt=prompt,
                target=target,
                n_prompt_tokens=count_tokens(prompt),
                split=split,
                truncated_lines=tuple(chunk.truncated_lines),
            )
        )
    return pairs


def split_pairs(
    pairs: Iterable[Union[SftPair, Mapping[str, Any]]],
    validation_fraction: Optional[float] = None,
) -> tuple[list[SftPair], list[SftPair]]:
    """``(train, validation)``: by each pair's ``split``, or re-split by doc id at a fraction."""
    if validation_fraction is not None:
        _check_fraction(validation_fraction)
    train: list[SftPair] = []
    validation: list[SftPair] = []
    for item in pairs:
        pair = SftPair.from_row(item)
        split = pair.split if validation_fraction is None else assign_split(pair.doc_id, validation_fraction)
        (validation if split == VALIDATION else train).append(pair)
    return train, validation


def sft_pair_fields() -> Sequence[str]:
    """Column names of :meth:`SftPair.to_row`, in order."""
    return tuple(SftPair.__dataclass_fields__)
