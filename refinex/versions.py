"""Short, stable labels for program versions, so people can type them (pure).

A full ``origin_version`` such as
``trafilatura:trafilatura-2.3.1[comments=0,tables=1,precision=0,recall=0,fast=0]+label-r1``
is exact provenance but unreadable in a summary. Its label is the version's leading name
(the expert, or the registered model with its number) and the first six hex digits of the
string's SHA-1: ``trafilatura@3f9a1c``, ``refinex-refiner/3@9c0d1e``. The label is computed,
never stored, by the same rule in Python (:func:`version_label`) and in SQL
(:func:`label_sql`, for views on Spark and Databricks SQL), so both always agree.
"""
from __future__ import annotations

import hashlib
import re
from typing import Iterable, Optional

NAME_PATTERN = r"([A-Za-z0-9_-]+(/[0-9]+)?)([:\[+]|$)"
"""The leading name: a word (with ``/N`` for registry versions) ending at ``:``, ``[``, ``+`` or the end."""
HASH_DIGITS = 6
_NAME = re.compile(NAME_PATTERN)


def version_name(origin_version: str) -> str:
    """The name part of the label (``trafilatura``, ``refinex-refiner/3``; ``v`` if none)."""
    match = _NAME.search(origin_version)
    return match.group(1) if match else "v"


def version_label(origin_version: str) -> str:
    """``<name>@<first 6 hex digits of sha1(origin_version)>``."""
    digest = hashlib.sha1(origin_version.encode("utf-8")).hexdigest()[:HASH_DIGITS]
    return f"{version_name(origin_version)}@{digest}"


def label_sql(column: str = "origin_version") -> str:
    """A SQL expression equal to :func:`version_label` of ``column`` (Spark and Databricks SQL)."""
    pattern = NAME_PATTERN.replace("\\", "\\\\")
    name = f"regexp_extract({column}, '{pattern}', 1)"
    return (f"concat(CASE WHEN {name} = '' THEN 'v' ELSE {name} END, '@', "
            f"substr(sha1(CAST({column} AS BINARY)), 1, {HASH_DIGITS}))")


class VersionError(LookupError):
    """A version (full string or label) that matches no known version, or several."""


def resolve_version(wanted: str, versions: Iterable[str]) -> str:
    """The full version that ``wanted`` names: the full string itself, its label, or a
    prefix of exactly one label (``trafilatura@3f``)."""
    known = sorted(set(versions))
    if wanted in known:
        return wanted
    labels = {version_label(v): v for v in known}
    if wanted in labels:
        return labels[wanted]
    matches = sorted(v for label, v in labels.items() if label.startswith(wanted))
    if len(matches) == 1:
        return matches[0]
    shown = ", ".join(sorted(labels)) or "none"
    if matches:
        raise VersionError(f"version {wanted!r} is ambiguous: it starts {len(matches)} labels ({shown})")
    raise VersionError(f"no version {wanted!r} (known: {shown})")


def maybe_label(origin_version: Optional[str]) -> Optional[str]:
    """:func:`version_label`, or None for None."""
    return None if origin_version is None else version_label(origin_version)
