"""The distiller's entry points: ``distill`` and ``distill_report``.

Short cuts for texts that differ at most in whitespace or blank lines, then the main plan
(``refinex.distill.align``), then the exact solver (``refinex.distill.solver``) when the
main plan is not exact, each turned into a program by ``refinex.distill.emit``; the
report accounts for what the program captures of the expert's refinement.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from refinex.distill.align import main_plan
from refinex.distill.emit import finish
from refinex.distill.solver import exact_plan
from refinex.distill.units import content_lines, norm
from refinex.program.ops import KeepAll, Program, RemoveLines, RemoveStr

__all__ = ["Distillation", "distill", "distill_report"]


@dataclass(frozen=True)
class Distillation:
    """A distilled program and how much of the expert's refinement it captures.

    ``kept_chars`` and ``deleted_chars`` describe executing the program on ``raw``;
    ``inserted_chars`` counts the expert's text with no counterpart in ``raw`` (insertions
    and the new side of replacements: the part a deletion cannot express);
    ``replaced_chars`` counts raw characters kept although the expert rewrote them;
    ``exact`` tells whether executing the program yields the refined text's non-blank lines
    exactly (blank lines are layout, see step 7 of ``refinex.distill``'s description).
    """

    program: Program
    kept_chars: int
    deleted_chars: int
    inserted_chars: int
    replaced_chars: int
    unrepresentable_ratio: float
    exact: bool


def distill(raw: str, refined: str) -> Program:
    """The minimal deletion-only program that turns ``raw`` into (close to) ``refined``."""
    return distill_report(raw, refined).program


def distill_report(raw: str, refined: str) -> Distillation:
    """Distil ``refined`` against ``raw`` and account for what the program captures."""
    raw_lines = raw.split("\n")
    ref_content = content_lines(refined)
    if raw == refined:
        return _report(raw, refined, ref_content, Program((KeepAll(),)), raw, 0, 0)
    if not ref_content:  # nothing but blank lines is left: all of it goes
        return _report(raw, refined, ref_content, Program((RemoveLines(0, len(raw_lines) - 1),)), "", 0, 0)
    if content_lines(raw) == ref_content:  # blank lines differ at most
        return _report(raw, refined, ref_content, Program((KeepAll(),)), raw, 0, 0)
    if norm(raw) == norm(refined):  # only whitespace inside lines differs
        return _report(raw, refined, ref_content, Program((KeepAll(),)), raw, 0, 0)

    ref_lines = refined.split("\n")
    plan = main_plan(raw_lines, ref_lines)
    program, out = finish(raw_lines, plan)
    if content_lines(out) == ref_content:
        return _report(raw, refined, ref_content, program, out, plan.inserted, plan.replaced)
    exact = _exact_program(raw_lines, ref_content)
    if exact is not None:
        return _report(raw, refined, ref_content, *exact, 0, 0)
    return _report(raw, refined, ref_content, program, out, plan.inserted, plan.replaced)


def _exact_program(raw_lines: list[str], ref_content: list[str]) -> Optional[tuple[Program, str]]:
    """The exact solver's program and output, if it yields the refined non-blank lines
    (``ref_content``) with no whitespace-only op."""
    plan = exact_plan(raw_lines, ref_content)
    if plan is None:
        return None
    program, out = finish(raw_lines, plan)
    if content_lines(out) != ref_content:
        return None
    if any(isinstance(op, RemoveStr) and op.text.isspace() for op in program.ops):
        return None
    return program, out


def _report(
    raw: str, refined: str, ref_content: list[str], program: Program, out: str, inserted: int, replaced: int
) -> Distillation:
    """``ref_content``: the non-blank lines of ``refined`` (what ``exact`` compares)."""
    return Distillation(
        program=program,
        kept_chars=len(out),
        deleted_chars=len(raw) - len(out),
        inserted_chars=inserted,
        replaced_chars=replaced,
        unrepresentable_ratio=inserted / max(1, len(refined)),
        exact=content_lines(out) == ref_content,
    )
