"""The promotion gates (refinex.promotion), without a registry."""
from __future__ import annotations

import json

import pytest

from refinex.config import PromoteConfig
from refinex.promotion import CHALLENGER, CHAMPION, UNCHANGED, decide

GOOD = {"new_words": 0, "invalid_share": 0.0, "snippet_recall": 0.95, "raw_snippet_recall": 0.99, "snippet_f1": 0.90}
VALID = {"passed": True, "failed_expectations": []}


def _names(gates) -> dict[str, bool]:
    return {g.name: g.passed for g in gates}


def test_every_gate_passes_for_a_good_first_model() -> None:
    decision = decide("1", GOOD, None, None, PromoteConfig(), validation=VALID)
    assert decision.outcome == CHAMPION and decision.passed and not decision.forced
    assert _names(decision.gates) == {"quality_gates": True, "new_words": True, "invalid_share": True, "snippet_recall": True,
                                      "beats_champion": True}
    assert [g["name"] for g in json.loads(decision.gates_json())] == list(_names(decision.gates))


@pytest.mark.parametrize(("change", "gate"), [
    ({"new_words": 1}, "new_words"),
    ({"invalid_share": 0.02}, "invalid_share"),
    ({"snippet_recall": 0.78}, "snippet_recall"),  # below 0.99 - 0.2
    ({"snippet_recall": None}, "snippet_recall"),  # no gold: cannot be checked, so it fails
])
def test_each_gate_refuses(change: dict, gate: str) -> None:
    decision = decide("2", {**GOOD, **change}, None, None, PromoteConfig(), validation=VALID)
    assert decision.outcome == CHALLENGER and not _names(decision.gates)[gate]
    assert [g.name for g in decision.gates if not g.passed] == [gate]
    assert decision.reason == next(g.detail for g in decision.gates if g.name == gate)


def test_it_must_beat_the_champion() -> None:
    worse = decide("2", {**GOOD, "snippet_f1": 0.85}, "1", GOOD, PromoteConfig(), validation=VALID)
    assert worse.outcome == CHALLENGER and "champion version 1: 0.900" in worse.reason
    better = decide("3", {**GOOD, "snippet_f1": 0.91}, "1", GOOD, PromoteConfig(), validation=VALID)
    assert better.outcome == CHAMPION
    equal = decide("3", GOOD, "1", GOOD, PromoteConfig(), validation=VALID)
    assert equal.outcome == CHALLENGER  # strictly better
    unchecked = decide("2", {**GOOD, "snippet_f1": 0.1}, "1", GOOD, PromoteConfig(require_better_f1=False),
                       validation=VALID)
    assert unchecked.outcome == CHAMPION and "beats_champion" not in _names(unchecked.gates)
    no_gold_champion = decide("2", GOOD, "1", {"snippet_f1": None}, PromoteConfig(), validation=VALID)
    assert no_gold_champion.outcome == CHAMPION and "not compared" in no_gold_champion.gates[-1].detail


@pytest.mark.parametrize(("validation", "detail"), [
    (None, "never validated"),
    ({"passed": False, "failed_expectations": ["refined_documents.dropped_share"]}, "dropped_share"),
])
def test_programs_must_have_passed_validation(validation: dict, detail: str) -> None:
    decision = decide("2", GOOD, None, None, PromoteConfig(), validation=validation)
    assert decision.outcome == CHALLENGER and [g.name for g in decision.gates if not g.passed] == ["quality_gates"]
    assert detail in decision.reason


def test_unevaluated_versions_fail_and_force_needs_a_reason() -> None:
    decision = decide("4", None, None, None, PromoteConfig())
    assert decision.outcome == CHALLENGER and "no evaluation" in decision.reason
    with pytest.raises(ValueError, match="--force needs --reason"):
        decide("4", None, None, None, PromoteConfig(), force=True)
    forced = decide("4", None, None, None, PromoteConfig(), force=True, reason="hotfix")
    assert forced.outcome == CHAMPION and forced.forced and forced.reason == "forced: hotfix (failed gates: evaluated)"


def test_the_champion_itself_is_left_alone() -> None:
    decision = decide("1", GOOD, "1", GOOD, PromoteConfig())
    assert decision.outcome == UNCHANGED and decision.gates == ()
