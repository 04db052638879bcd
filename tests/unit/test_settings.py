"""Settings dataclasses from mappings: unknown keys are named, known ones reach the fields."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from refinex.settings import settings_from_mapping


@dataclass
class _Knobs:
    size: int = 1
    name: str = "a"


def test_known_keys_become_fields() -> None:
    assert settings_from_mapping(_Knobs, {"size": 3}, "knob") == _Knobs(size=3)


def test_unknown_keys_are_all_named_sorted() -> None:
    with pytest.raises(ValueError, match=r"^unknown knob settings: colour, sise$"):
        settings_from_mapping(_Knobs, {"sise": 3, "colour": "red", "name": "b"}, "knob")
