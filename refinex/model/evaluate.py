"""Program-level validation metrics of the refine model on SFT pairs (generation included).

For each chunk the model's program (greedy, through any backend) is compared with the
target program: exact match of the parsed operations, and precision/recall/F1 of the lines
that ``remove_lines`` deletes inside the chunk, counted per line and weighted by the
line's characters. Web pages have many short boilerplate lines and few long content lines,
so a model that deletes nearly everything still scores a high line F1; the character F1
shows it. A chunk output is invalid when a line does not parse or an operation addresses a
line outside the chunk.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from refinex.evaluation.scores import f1_score, ratio
from refinex.program import Program, RemoveLines, RemoveStr, parse

__all__ = ["ChunkExample", "ProgramMetrics", "program_metrics", "removed_lines"]


@dataclass(frozen=True)
class ChunkExample:
    """One validation chunk: its generation request and the target program text."""

    request: Any  # refinex.model.backends.GenerationRequest
    target: str


@dataclass(frozen=True)
class ProgramMetrics:
    """Micro-averaged program metrics over validation chunks."""

    chunks: int
    exact_match: float
    invalid_rate: float
    line_precision: float
    line_recall: float
    line_f1: float
    char_precision: float
    char_recall: float
    char_f1: float

    def as_dict(self, prefix: str = "val_") -> dict[str, float]:
        """The metrics as ``{prefix + name: value}`` (MLflow metric names)."""
        return {f"{prefix}{name}": float(value) for name, value in self.__dict__.items()}


def removed_lines(program: Program, first_line: int, last_line: int) -> set[int]:
    """Lines in ``first_line .. last_line`` that the program's ``remove_lines`` cover."""
    lines: set[int] = set()
    for op in program.ops:
        if isinstance(op, RemoveLines) and op.start <= op.end:
            lines.update(range(max(op.start, first_line), min(op.end, last_line) + 1))
    return lines


def _outside(program: Program, first_line: int, last_line: int) -> bool:
    for op in program.ops:
        if isinstance(op, RemoveLines) and not first_line <= op.start <= op.end <= last_line:
            return True
        if isinstance(op, RemoveStr) and not first_line <= op.line <= last_line:
            return True
    return False


def program_metrics(backend: Any, examples: Sequence[ChunkExample]) -> ProgramMetrics:
    """Generate a program for every example with ``backend`` and score it."""
    outputs = backend.generate([e.request for e in examples]) if examples else []
    exact = invalid = 0
    lines = [0, 0, 0]  # true positives, false positives, false negatives
    chars = [0, 0, 0]
    for example, output in zip(examples, outputs):
        first, last = example.request.first_line, example.request.last_line
        predicted, target = parse(output), parse(example.target)
        exact += int(not predicted.errors and predicted == target)
        invalid += int(bool(predicted.errors) or _outside(predicted, first, last))
        got, want = removed_lines(predicted, first, last), removed_lines(target, first, last)
        width = {i: len(text) for i, text in enumerate(example.request.lines, start=first)}
        for index, part in enumerate((got & want, got - want, want - got)):
            lines[index] += len(part)
            chars[index] += sum(width.get(i, 0) for i in part)
    n = len(examples)
    line_p, line_r, line_f1 = _scores(*lines)
    char_p, char_r, char_f1 = _scores(*chars)
    return ProgramMetrics(
        chunks=n,
        exact_match=ratio(exact, n),
        invalid_rate=ratio(invalid, n),
        line_precision=line_p,
        line_recall=line_r,
        line_f1=line_f1,
        char_precision=char_p,
        char_recall=char_r,
        char_f1=char_f1,
    )


def _scores(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    return precision, recall, f1_score(precision, recall)
