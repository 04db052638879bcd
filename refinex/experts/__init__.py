"""Expert registry: ``get_expert(name, **options)`` builds a configured expert.

``EXPERT_FACTORIES`` maps an expert name to its factory: either a callable returning an
``Expert``, or a lazy ``"package.module:attribute"`` path imported only when that expert is
first requested, so ``import refinex.experts`` never pulls in trafilatura, HTTP clients or
other heavy dependencies. Every built-in expert is listed below; plug-ins add theirs with::

    register_expert("my_expert", "my_package.experts:create")
"""
from __future__ import annotations

from importlib import import_module
from typing import Any, Callable, Union

from refinex.experts.base import FAILED, OK, Expert, ExpertInput, ExpertOutput

ExpertFactory = Callable[..., Expert]

EXPERT_FACTORIES: dict[str, Union[str, ExpertFactory]] = {
    "trafilatura": "refinex.experts.html:TrafilaturaExpert",
    "trafilatura_recall": "refinex.experts.rules:trafilatura_recall",
    "trafilatura_precision": "refinex.experts.rules:trafilatura_precision",
    "justext": "refinex.experts.rules:JustextExpert",
    "resiliparse": "refinex.experts.rules:ResiliparseExpert",
    "dom_prune": "refinex.experts.rules:DomPruneExpert",
    "readability": "refinex.experts.rules:ReadabilityExpert",
    "line_rules": "refinex.experts.rules:LineRulesExpert",
    "llm": "refinex.experts.llm:create_llm_expert",
    "consensus": "refinex.experts.consensus:create_consensus_expert",
}

_RESOLVED: dict[str, ExpertFactory] = {}  # lazy path -> imported factory


def register_expert(
    name: str, factory: Union[str, ExpertFactory], *, replace: bool = False
) -> None:
    """Register ``factory`` (a callable or a lazy ``"module:attribute"`` path) as ``name``."""
    if not name:
        raise ValueError("an expert name must be non-empty")
    if isinstance(factory, str) and ":" not in factory:
        raise ValueError(f"lazy expert path must look like 'module:attribute', got {factory!r}")
    current = EXPERT_FACTORIES.get(name)
    if current is not None and current != factory and not replace:
        raise ValueError(f"expert {name!r} is already registered (pass replace=True)")
    EXPERT_FACTORIES[name] = factory


def available_experts() -> list[str]:
    """Names of all registered experts, sorted."""
    return sorted(EXPERT_FACTORIES)


def _resolve(name: str) -> ExpertFactory:
    try:
        factory = EXPERT_FACTORIES[name]
    except KeyError:
        known = ", ".join(available_experts()) or "none"
        raise ValueError(f"unknown expert {name!r} (registered: {known})") from None
    if not isinstance(factory, str):
        return factory
    resolved = _RESOLVED.get(factory)
    if resolved is None:
        module_name, _, attribute = factory.partition(":")
        resolved = getattr(import_module(module_name), attribute)
        _RESOLVED[factory] = resolved
    return resolved


def get_expert(name: str, **options: Any) -> Expert:
    """Build the expert registered as ``name`` with ``options`` passed to its factory."""
    expert = _resolve(name)(**options)
    if not isinstance(expert, Expert):
        raise TypeError(f"factory of expert {name!r} returned {type(expert).__name__}, not an Expert")
    return expert


__all__ = [
    "EXPERT_FACTORIES",
    "FAILED",
    "OK",
    "Expert",
    "ExpertFactory",
    "ExpertInput",
    "ExpertOutput",
    "available_experts",
    "get_expert",
    "register_expert",
]


def needs_html(expert: Any) -> bool:
    """Whether ``expert`` fails on documents without page HTML (its ``needs_html``; experts
    that do not say are taken to work on text)."""
    return bool(getattr(expert, "needs_html", False))

