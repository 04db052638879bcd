"""The refine model's tiers: which one a checkpoint is, what it reads, what runs it.

A trained checkpoint's ``refinex_model.json`` says how it writes programs, so ``refine``
and the registry never ask the user:

* ``generate``: a language model writes each chunk's program token by token (the
  generative head, :mod:`refinex.model.backends`);
* ``tag``: a pretrained transformer reads each chunk's lines once and a small head tags
  the lines to delete (:mod:`refinex.model.tagging`);
* ``fast``: no transformer: hashed n-grams, layout and page-structure features with
  convolutions over the document's lines (:mod:`refinex.model.fast`), for CPU executors;
* ``linear``: the line-tagger baseline (logistic regression on each line alone,
  :mod:`refinex.model.tagger`), runnable through the same stage to be measured beside them.

Backends of the tagging tiers are found here by name (imported when used), so the backend
interface (:mod:`refinex.model.backends.base`) does not import them.
"""
from __future__ import annotations

import importlib
import os
from typing import Any, Mapping

__all__ = [
    "TIERS", "TIER_FAST", "TIER_GENERATE", "TIER_LINEAR", "TIER_TAG", "reads_structure", "recorded_threshold",
    "tag_config_class", "tagging_backend", "tier_of",
]

TIER_GENERATE = "generate"
TIER_TAG = "tag"
TIER_FAST = "fast"
TIER_LINEAR = "linear"
TIERS = (TIER_GENERATE, TIER_TAG, TIER_FAST, TIER_LINEAR)

# tier -> "module:class" of its backend (a class with ``from_pretrained(path, config, **options)``)
_TAGGING_BACKENDS = {
    TIER_TAG: "refinex.model.tagging.backend:TagBackend",
    TIER_FAST: "refinex.model.fast.backend:FastBackend",
    TIER_LINEAR: "refinex.model.tagger:LineTaggerBackend",
}


def tier_of(info: Mapping[str, Any]) -> str:
    """The tier of a checkpoint's ``refinex_model.json`` (``{}``: a generative checkpoint)."""
    if info.get("head") != "tag":
        return TIER_GENERATE
    return {"hashed": TIER_FAST, "linear": TIER_LINEAR}.get(str(info.get("encoder")), TIER_TAG)


def reads_structure(info: Mapping[str, Any]) -> bool:
    """Whether the model uses the pages' HTML (their page-structure features) when it has it."""
    tier = tier_of(info)
    if tier == TIER_FAST:
        return bool((info.get("fast") or {}).get("structure", False))
    if tier == TIER_TAG:
        return bool(((info.get("tag") or {}).get("architecture") or {}).get("structure_features", False))
    return False


def recorded_threshold(info: Mapping[str, Any]) -> float:
    """The deletion threshold a tagging tier's model chose at training."""
    section = info.get({TIER_FAST: "fast", TIER_LINEAR: "linear"}.get(tier_of(info), "tag"))
    if not section or "threshold" not in section:
        raise ValueError("the model records no deletion threshold (not a tagging-tier model?)")
    return float(section["threshold"])


def tagging_backend(path: str | os.PathLike[str], info: Mapping[str, Any], config: Any, **options: Any) -> Any:
    """The backend of a tagging-tier checkpoint (``tag`` or ``fast``)."""
    tier = tier_of(info)
    target = _TAGGING_BACKENDS.get(tier)
    if target is None:
        raise ValueError(f"{path} is a {tier!r} model: it has no tagging backend")
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name).from_pretrained(path, config, **options)


def tag_config_class(base: str | os.PathLike[str]) -> Any:
    """The settings class of the ``tag`` section for ``base``: the fast tier's
    (:class:`refinex.model.fast.train.FastTrainConfig`) on a ``hashed`` base, else the
    transformer tagging head's (:class:`refinex.model.tagging.train.TagTrainConfig`)."""
    from refinex.model.bases import is_hashed_base

    if is_hashed_base(base):
        from refinex.model.fast.train import FastTrainConfig

        return FastTrainConfig
    from refinex.model.tagging.train import TagTrainConfig

    return TagTrainConfig
