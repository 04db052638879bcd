"""Per-operation confidences of a generated program, and dropping the unsure operations.

Pure Python: works on the token bytes and log-probabilities a decoder recorded (see
``ProgramLogitsProcessor(record=True)`` in ``refinex.model.constrained.processor``).
"""
from __future__ import annotations

import math
from typing import Sequence

__all__ = ["drop_unsure_ops", "op_confidences"]

_NL = 0x0A


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
