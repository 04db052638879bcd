"""Expert configuration for the ``expert`` stage: which expert runs, how it is built and described.

The expert is ``refinex.experts.get_expert(expert.name, **expert.options)`` (``build_expert``);
the stage builds it once on the driver, and ``expert_version`` is what its refinements are
keyed on (``apply`` uses it for ``origin_version``). The ``--expert*`` flags
(``EXPERT_PARAMS``) choose and configure it (``configure_expert``): ``--expert`` replaces
``expert.name``, the endpoint flags configure the ``llm`` expert or the llm member of
``consensus``.

LLM experts are ``llm`` and the LLM members of ``consensus`` (``llm_experts``).
``expert_params`` describes the expert for MLflow with secret-free params only.

Kept apart from the stage so that the CLI, other stages and the executors (which rebuild the
expert from its name and options) can use it without the driver-side stage code.
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Mapping, Optional

from refinex.config import Config, ConfigError
from refinex.spark.stage import Param

if TYPE_CHECKING:
    from refinex.experts.base import Expert
    from refinex.experts.llm import LLMExpert

LLM = "llm"
CONSENSUS = "consensus"
_ENDPOINT_FLAGS = "--expert-base-url, --expert-model and --expert-max-concurrency"


def configure_expert(
    config: Config,
    name: Optional[str] = None,
    base_url: Optional[str] = None,
    model: Optional[str] = None,
    max_concurrency: Optional[int] = None,
) -> Config:
    """``config`` with a command-line expert choice applied.

    ``name`` replaces ``expert.name`` (the profile's ``expert.options`` are kept only when it
    names the same expert). ``base_url``/``model``/``max_concurrency`` configure the ``llm``
    expert, or the llm member of ``consensus`` (which they enable, adding it if absent).
    """
    ec = config.expert
    chosen = name or ec.name
    options: dict[str, Any] = dict(ec.options) if chosen == ec.name else {}
    endpoint = {
        key: value
        for key, value in (("base_url", base_url), ("model", model), ("max_concurrency", max_concurrency))
        if value is not None
    }
    if endpoint:
        if chosen == LLM:
            options.update(endpoint)
        elif chosen == CONSENSUS:
            options["members"] = _members_with_llm(options, endpoint)
        else:
            raise ConfigError(f"{_ENDPOINT_FLAGS} apply to the llm and consensus experts, not {chosen!r}")
    if chosen == ec.name and options == ec.options:
        return config
    return config.with_overrides({"expert.name": chosen, "expert.options": options})


def _members_with_llm(options: Mapping[str, Any], endpoint: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The consensus members (from ``options`` or the consensus YAML) with the llm member
    enabled and pointed at ``endpoint``."""
    members = options.get("members")
    if members is None:
        import yaml

        from refinex.experts.consensus import DEFAULT_CONFIG_PATH
        from refinex.experts.llm import resolve_conf_path

        path = resolve_conf_path(options.get("config_path", DEFAULT_CONFIG_PATH))
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        members = dict(data.get(CONSENSUS, data) or {}).get("members") or []
    result: list[dict[str, Any]] = []
    found = False
    for member in members:
        spec = {"name": member} if isinstance(member, str) else dict(member)
        if spec.get("name") == LLM:
            found = True
            spec.pop("enabled", None)
            spec["options"] = {**dict(spec.get("options") or {}), **endpoint}
        result.append(spec)
    if not found:
        result.append({"name": LLM, "weight": 1.0, "options": dict(endpoint)})
    return result


def build_expert(name: str, options: Mapping[str, Any]) -> "Expert":
    """The registered expert ``name`` built with ``options``."""
    from refinex.experts import get_expert

    return get_expert(name, **dict(options))


def expert_version(name: str, options: Mapping[str, Any]) -> str:
    """The version string of the configured expert (built once on the driver)."""
    return str(build_expert(name, options).version)


def is_consensus(expert: Any) -> bool:
    module = sys.modules.get("refinex.experts.consensus")
    return module is not None and isinstance(expert, module.ConsensusExpert)


def llm_experts(expert: Any) -> list[tuple[Optional[int], "LLMExpert"]]:
    """The LLM experts inside ``expert``: ``(None, expert)`` for an LLM expert, ``(i, member)``
    for the LLM members of a consensus (``i`` = the member's position)."""
    module = sys.modules.get("refinex.experts.llm")
    if module is None:
        return []
    if isinstance(expert, module.LLMExpert):
        return [(None, expert)]
    if is_consensus(expert):
        return [(i, member) for i, (member, _) in enumerate(expert.members) if isinstance(member, module.LLMExpert)]
    return []


def _llm_params(llm: "LLMExpert", prefix: str) -> dict[str, str]:
    params = {}
    for key, value in llm.params().items():
        key = key.replace("expert.api_key_source", "expert.key_source")  # safe_params drops "*api_key*"
        params[prefix + key.removeprefix("expert.")] = value
    return params


def expert_params(expert: Any, name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """MLflow params of the expert: name, version, options and, for LLM experts, their
    ``params()`` (never a secret; ``safe_params`` filters once more when logging)."""
    params: dict[str, Any] = {"expert.name": name, "expert.version": str(expert.version), "expert.options": dict(options)}
    if is_consensus(expert):
        described = expert.describe()
        params["consensus.threshold"] = described["threshold"]
        params["consensus.min_voters"] = described["min_voters"]
        params["consensus.members"] = ",".join(f"{m['name']}:{m['weight']:g}" for m in described["members"])
    for position, llm in llm_experts(expert):
        params.update(_llm_params(llm, "expert." if position is None else f"member.{llm.name}."))
    return params



EXPERT_PARAMS = (
    Param("expert", "Expert that refines documents: trafilatura, llm, consensus or any registered one "
          "(default: expert.name of the profile).", configures=True),
    Param("expert_base_url", "OpenAI-compatible endpoint of the llm expert (or of consensus' llm member, which "
          "it enables), e.g. http://127.0.0.1:8000/v1. The API key is read from $REFINEX_EXPERT_API_KEY (Bearer).",
          configures=True),
    Param("expert_model", "Model name sent to that endpoint.", configures=True),
    Param("expert_max_concurrency", "LLM requests in flight per Spark task.", kind="int", minimum=1,
          configures=True),
)
"""The ``--expert*`` flags: they choose and configure the expert (``configure_expert``)."""


def configure_from_params(config: Config, values: Mapping[str, Any]) -> Config:
    """``configure_expert`` from the ``EXPERT_PARAMS`` values."""
    return configure_expert(
        config, values.get("expert"), base_url=values.get("expert_base_url"), model=values.get("expert_model"),
        max_concurrency=values.get("expert_max_concurrency"),
    )
