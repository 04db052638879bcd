"""Settings dataclasses built from mappings (a YAML section, ``--set`` overrides).

A key that is not a field of the dataclass is an error naming it: a typo in a config file
must fail loudly, not fall back to a default without a word.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


def settings_from_mapping(cls: type[T], values: Mapping[str, Any], what: str) -> T:
    """``cls(**values)``; unknown keys raise ``ValueError("unknown <what> settings: a, b")``."""
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(str(key) for key in values if key not in known)
    if unknown:
        raise ValueError(f"unknown {what} settings: {', '.join(unknown)}")
    return cls(**dict(values))
