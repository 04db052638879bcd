"""Gated promotion of a refine model version (pure: no MLflow, no Spark).

``refinex promote`` moves ``@champion`` only to a version whose latest evaluation passes
every gate of ``PromoteConfig``: its programs passed the quality gates (``validate``), no new
words, few invalid programs, snippet recall not below the raw text's minus a margin, and a
snippet F1 above the current champion's (or no champion). Otherwise the version becomes ``@challenger``. :func:`decide` takes the two
evaluations as plain mappings (``evaluations`` rows: the metric names are its columns), so
the rules are tested without a registry; the stage in ``refinex.spark.promote`` reads the
rows and writes the aliases and tags.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional

from refinex.config import PromoteConfig

CHAMPION = "champion"
CHALLENGER = "challenger"
UNCHANGED = "unchanged"


@dataclass(frozen=True)
class Gate:
    """One promotion gate: what it compares, the candidate's value and whether it passed."""

    name: str
    passed: bool
    observed: Optional[float]
    threshold: Optional[float]
    detail: str

    def line(self) -> str:
        mark = "pass" if self.passed else "FAIL"
        return f"{mark}  {self.name}: {self.detail}"


@dataclass(frozen=True)
class Decision:
    """Where the candidate goes (``champion``, ``challenger``, or ``unchanged`` when it is the
    champion already), why, and every gate's result."""

    outcome: str
    reason: str
    gates: tuple[Gate, ...]
    forced: bool = False

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def gates_json(self) -> str:
        return json.dumps([asdict(g) for g in self.gates], sort_keys=True)


def _number(row: Optional[Mapping[str, Any]], key: str) -> Optional[float]:
    if row is None:
        return None
    value = row.get(key)
    return None if value is None else float(value)


def check_gates(
    candidate: Optional[Mapping[str, Any]],
    champion: Optional[Mapping[str, Any]],
    config: PromoteConfig,
    champion_version: Optional[str] = None,
    validation: Optional[Mapping[str, Any]] = None,
) -> tuple[Gate, ...]:
    """Every gate on the candidate's evaluation (``None``: never evaluated, so all fail).

    ``validation``: the latest ``validate`` result of the evaluated programs (``passed``,
    ``failed_expectations``); ``None`` when they were never validated (that gate fails)."""
    if candidate is None:
        return (Gate("evaluated", False, None, None, "the version has no evaluation: run `refinex evaluate` first"),)
    gates = []
    if validation is None:
        gates.append(Gate("quality_gates", False, None, None,
                          "its programs were never validated: run `refinex validate --origin model` first"))
    elif not validation.get("passed"):
        failed = ", ".join(validation.get("failed_expectations") or []) or "see gate_failures"
        gates.append(Gate("quality_gates", False, None, None, f"its programs failed the quality gates ({failed})"))
    else:
        gates.append(Gate("quality_gates", True, None, None, "its programs passed the quality gates"))
    new_words = _number(candidate, "new_words")
    gates.append(Gate(
        "new_words", new_words is not None and new_words <= config.max_new_words, new_words,
        float(config.max_new_words), f"{_show(new_words, 0)} new words (at most {config.max_new_words})",
    ))
    invalid = _number(candidate, "invalid_share")
    gates.append(Gate(
        "invalid_share", invalid is not None and invalid <= config.max_invalid_share, invalid,
        config.max_invalid_share, f"invalid programs {_pct(invalid)} (at most {_pct(config.max_invalid_share)})",
    ))
    recall, raw_recall = _number(candidate, "snippet_recall"), _number(candidate, "raw_snippet_recall")
    if recall is None or raw_recall is None:
        gates.append(Gate("snippet_recall", False, recall, None,
                          "no gold snippet scores: evaluate on pages with gold (`refinex evaluate --gold PAGES`)"))
    else:
        floor = raw_recall - config.recall_margin
        gates.append(Gate("snippet_recall", recall >= floor, recall, floor,
                          f"snippet recall {recall:.3f} (at least raw {raw_recall:.3f} - {config.recall_margin:g} "
                          f"= {floor:.3f})"))
    if config.require_better_f1:
        f1, best = _number(candidate, "snippet_f1"), _number(champion, "snippet_f1")
        if champion_version is None:
            gates.append(Gate("beats_champion", True, f1, None, "no champion yet"))
        elif best is None:
            gates.append(Gate("beats_champion", True, f1, None,
                              f"champion version {champion_version} has no gold evaluation: not compared"))
        else:
            gates.append(Gate("beats_champion", f1 is not None and f1 > best, f1, best,
                              f"snippet F1 {_show(f1, 3)} (champion version {champion_version}: {best:.3f})"))
    return tuple(gates)


def decide(
    candidate_version: str,
    candidate: Optional[Mapping[str, Any]],
    champion_version: Optional[str],
    champion: Optional[Mapping[str, Any]],
    config: PromoteConfig,
    force: bool = False,
    reason: Optional[str] = None,
    validation: Optional[Mapping[str, Any]] = None,
) -> Decision:
    """The promotion decision for ``candidate_version`` (see the module docstring).

    ``force`` promotes whatever the gates say and needs a ``reason``; both are recorded.
    """
    if force and not (reason or "").strip():
        raise ValueError("--force needs --reason TEXT: a forced promotion is recorded with its reason")
    if champion_version is not None and str(champion_version) == str(candidate_version):
        return Decision(UNCHANGED, f"version {candidate_version} is the champion already", ())
    gates = check_gates(candidate, champion, config, champion_version, validation)
    failed = [g for g in gates if not g.passed]
    if force:
        why = f"forced: {reason}" + (f" (failed gates: {', '.join(g.name for g in failed)})" if failed else "")
        return Decision(CHAMPION, why, gates, forced=True)
    if failed:
        return Decision(CHALLENGER, "; ".join(g.detail for g in failed), gates)
    return Decision(CHAMPION, "every gate passed", gates)


def _pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _show(value: Optional[float], digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
