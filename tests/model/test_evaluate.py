"""Program-level validation metrics (no model: a backend that returns fixed outputs)."""
from __future__ import annotations

from typing import Sequence

import pytest

from refinex.model.backends import GenerationRequest
from refinex.model.evaluate import ChunkExample, program_metrics, removed_lines
from refinex.program import parse


class FixedBackend:
    """Returns the given outputs in order."""

    name = "fixed"

    def __init__(self, outputs: Sequence[str]) -> None:
        self.outputs = list(outputs)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[str]:
        return self.outputs[: len(requests)]


def _example(first: int, last: int, target: str) -> ChunkExample:
    lines = [f"line {i}" for i in range(first, last + 1)]
    return ChunkExample(GenerationRequest.for_lines(lines, first), target)


def test_removed_lines_are_clipped_to_the_chunk() -> None:
    assert removed_lines(parse("remove_lines(8, 12)\nremove_str(10, \"x\")\nkeep_all()"), 10, 20) == {10, 11, 12}


def test_program_metrics() -> None:
    examples = [
        _example(0, 9, "remove_lines(0, 1)\n"),  # predicted exactly
        _example(10, 19, "remove_lines(10, 13)\n"),  # half of it: 2 TP, 2 FN, 1 FP
        _example(20, 29, "keep_all()\n"),  # an invalid output: a parse error and a line outside
    ]
    outputs = ["remove_lines(0, 1)\n", "remove_lines(12, 14)\n", "remove_lines(40, 41)\nnot a program\n"]
    metrics = program_metrics(FixedBackend(outputs), examples)
    assert metrics.chunks == 3 and metrics.exact_match == pytest.approx(1 / 3)
    assert metrics.invalid_rate == pytest.approx(1 / 3)
    assert (metrics.line_precision, metrics.line_recall) == (pytest.approx(4 / 5), pytest.approx(4 / 6))
    assert metrics.as_dict()["val_line_f1"] == pytest.approx(2 * (4 / 5) * (4 / 6) / (4 / 5 + 4 / 6))
    # Lines are "line N": 6 characters below 10, 7 from 10 on.
    assert (metrics.char_precision, metrics.char_recall) == (pytest.approx(26 / 33), pytest.approx(26 / 40))
    empty = program_metrics(FixedBackend([]), [])
    assert (empty.chunks, empty.line_f1) == (0, 0.0)
