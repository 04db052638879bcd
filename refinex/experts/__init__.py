"""Expert registry: ``get_expert(name, **options)`` builds a configured expert.

``EXPERT_FACTORIES`` maps an expert name to its factory: either a callable returning an
``Expert``, or a lazy ``"package.module:attribute"`` path imported only when that expert is
first requested, so ``import refinex.experts`` never pulls in trafilatura, HTTP clients or
other heavy dependencies. Modules add their experts with ``register_expert`` at import time
(or by adding a path to the dict)::

    register_expert("llm", "refinex.experts.llm:create_llm_expert")

A name that is not registered yet makes ``get_expert`` import the modules listed in
``EXPERT_MODULES`` (those that exist), so their registrations run without the caller having
to import them first.
"""
from __future__ import annotations

from importlib import import_module
from importlib.util import find_spec
from typing import Any, Callable, Union

from refinex.experts.base import FAILED, OK, Expert, ExpertInput, ExpertOutput

ExpertFactory = Callable[..., Expert]

EXPERT_FACTORIES: dict[str, Union[str, ExpertFactory]] = {
    "trafilatura": "refinex.experts.html:TrafilaturaExpert",
}

# Modules that register experts when imported; imported on demand by ``get_expert``.
EXPERT_MODULES: list[str] = [
    "refinex.experts.html",
    "refinex.experts.llm",
    "refinex.experts.rules",
    "refinex.experts.consensus",
]

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
    """Names of all experts (after importing ``EXPERT_MODULES``), sorted."""
    _import_expert_modules()
    return sorted(EXPERT_FACTORIES)


def _import_expert_modules() -> None:
    for module_name in EXPERT_MODULES:
        if find_spec(module_name) is not None:
            import_module(module_name)


def _resolve(name: str) -> ExpertFactory:
    if name not in EXPERT_FACTORIES:
        _import_expert_modules()
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
    "EXPERT_MODULES",
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
