"""Stage ``promote``: move ``@champion`` to a registered refine model only when it is better.

The candidate's latest evaluation (the ``evaluations`` row of ``model`` programs written by
that version, scope ``all``; else the ``refinex.eval.*`` tags ``evaluate`` put on the model
version) and the verdict of the latest ``validate`` run of those programs (``stage_runs``; its
offending rows are in ``gate_failures``) go through the gates of ``refinex.promotion``,
against the current champion's evaluation.
Passing: ``@champion`` points at it. Failing: ``@challenger`` does, and the reason is given.
The decision, its reason and every gate are recorded as model-version tags
(``refinex.promotion.*``); ``--force --reason TEXT`` promotes anyway and is recorded as such.

The registry is the configured one (``model.tracking_uri`` / ``model.registry_uri``: a local
sqlite store, or Unity Catalog by URI; aliases work the same there). A local workdir without
an ``mlflow.db`` is an error, not a new empty store.
"""
from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any, Mapping, Optional
from urllib.parse import urlsplit

from pyspark.sql import functions as F

from refinex.config import Config
from refinex.promotion import CHALLENGER, CHAMPION, Decision, decide
from refinex.spark.stage import Param, Stage, StageContext
from refinex.spark.tables import EVALUATIONS, GATE_FAILURES, ORIGIN_MODEL, STAGE_RUNS, TABLES

log = logging.getLogger(__name__)

STAGE = "promote"
TAG_PREFIX = "refinex.promotion."
EVAL_TAG_PREFIX = "refinex.eval."


class RegistryMissing(LookupError):
    """The workdir has no MLflow registry (a mistyped ``--workdir``, or nothing trained)."""


def registry_of(config: Config, workdir: str) -> tuple[str, Optional[str]]:
    """``(tracking URI, registry URI)`` of an existing registry; :class:`RegistryMissing`
    when the local sqlite store it would use does not exist (creating one would hide a typo)."""
    from refinex.spark.train import tracking_uri_for

    uri = tracking_uri_for(config, workdir)
    registry = config.model.registry_uri
    for candidate in (uri, registry):
        if candidate and candidate.startswith("sqlite:///"):
            path = urlsplit(candidate).path
            from pathlib import Path

            if not Path(path).is_file():
                raise RegistryMissing(
                    f"no MLflow registry at {path}: is --workdir {workdir} the workdir of the run that trained the "
                    "model? (or set model.tracking_uri to the registry's URI)"
                )
    return uri, registry


def _version_of(model_uri: Optional[str], name: str) -> Optional[str]:
    prefix = f"models:/{name}/"
    if model_uri and model_uri.startswith(prefix) and model_uri[len(prefix):].isdigit():
        return model_uri[len(prefix):]
    return None


def latest_evaluation(ctx: StageContext, client: Any, name: str, version: str) -> Optional[dict[str, Any]]:
    """The newest ``evaluations`` row (scope ``all``) of the programs ``name/version`` wrote
    (any decoding suffix), else the evaluation tags on the model version; None if neither."""
    if ctx.exists(EVALUATIONS):
        exact = f"{name}/{version}"
        row = (
            ctx.read(EVALUATIONS)
            .where((F.col("origin") == ORIGIN_MODEL) & (F.col("scope") == "all")
                   & ((F.col("origin_version") == exact) | F.col("origin_version").startswith(f"{exact}+")))
            .orderBy(F.col("created_at").desc(), F.col("run_id").desc())
            .first()
        )
        if row is not None:
            return row.asDict()
    tags = client.get_model_version(name, version).tags
    metrics = {key[len(EVAL_TAG_PREFIX):]: value for key, value in tags.items() if key.startswith(EVAL_TAG_PREFIX)}
    if not metrics:
        return None
    numeric = {c.name for c in TABLES[EVALUATIONS].schema.fields if c.dataType.typeName() in ("double", "long")}
    return {k: (float(v) if k in numeric and v not in ("", "None") else v) for k, v in metrics.items()}


def latest_validation(ctx: StageContext, origin_version: str) -> Optional[dict[str, Any]]:
    """``passed`` and ``failed_expectations`` of the newest ``validate`` run of the model
    programs ``origin_version`` (from ``stage_runs``), or None when they were never validated."""
    if not ctx.exists(STAGE_RUNS):
        return None
    rows = (
        ctx.read(STAGE_RUNS).where(F.col("stage") == "validate")
        .orderBy(F.col("ended_at").desc()).select("params", "stats").limit(500).collect()
    )
    for row in rows:
        params = json.loads(row["params"])
        if params.get("origin") == ORIGIN_MODEL and params.get("origin_version") == origin_version:
            stats = json.loads(row["stats"])
            return {"passed": bool(stats.get("passed")) and not stats.get("failed"),
                    "failed_expectations": stats.get("failed_expectations") or []}
    return None


def _drop_alias_if_at(client: Any, name: str, alias: str, version: str) -> None:
    import mlflow

    try:
        if str(client.get_model_version_by_alias(name, alias).version) == version:
            client.delete_registered_model_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        pass


def _record(client: Any, name: str, version: str, decision: Decision, run_id: str, reason: Optional[str]) -> None:
    tags = {
        "decision": decision.outcome, "reason": decision.reason, "gates": decision.gates_json(),
        "forced": str(decision.forced).lower(), "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_id": run_id,
    }
    if decision.forced:
        tags["force_reason"] = reason or ""
    for key, value in tags.items():
        client.set_model_version_tag(name, version, f"{TAG_PREFIX}{key}", value[:5000])


def promote_model(
    ctx: StageContext,
    version: Optional[int] = None,
    alias: Optional[str] = None,
    force: bool = False,
    reason: Optional[str] = None,
) -> dict[str, Any]:
    """Gate version ``version`` (default: the one ``train`` registered under this run id)
    and point ``@champion`` (or ``alias``) at it, else ``@challenger``."""
    import mlflow

    from refinex.spark.refine import trained_in_run
    from refinex.spark.train import registry_client

    config = ctx.config
    name = config.model.registered_name
    uri, registry = registry_of(config, ctx.workdir)
    chosen = str(version) if version is not None else _version_of(trained_in_run(ctx), name)
    if chosen is None:
        raise LookupError("promote: pass --version N (no model was trained under this run id)")
    client = registry_client(uri, registry)
    try:
        client.get_model_version(name, chosen)
    except mlflow.exceptions.MlflowException as exc:
        raise LookupError(f"no version {chosen} of {name} in {registry or uri}: {str(exc).splitlines()[0]}") from None
    champion_alias = alias or config.model.champion_alias
    try:
        champion: Optional[str] = str(client.get_model_version_by_alias(name, champion_alias).version)
    except mlflow.exceptions.MlflowException:
        champion = None
    candidate_eval = latest_evaluation(ctx, client, name, chosen)
    champion_eval = latest_evaluation(ctx, client, name, champion) if champion not in (None, chosen) else None
    evaluated_version = (candidate_eval or {}).get("origin_version") or f"{name}/{chosen}"
    validation = latest_validation(ctx, str(evaluated_version))
    decision = decide(chosen, candidate_eval, champion, champion_eval, config.promote, force, reason, validation)
    if decision.outcome == CHAMPION:
        client.set_registered_model_alias(name, champion_alias, chosen)
        _drop_alias_if_at(client, name, config.promote.challenger_alias, chosen)  # no longer a challenger
    elif decision.outcome == CHALLENGER:
        client.set_registered_model_alias(name, config.promote.challenger_alias, chosen)
    if decision.gates or decision.forced:
        _record(client, name, chosen, decision, ctx.run_id, reason)
    moved_to = {CHAMPION: champion_alias, CHALLENGER: config.promote.challenger_alias}.get(decision.outcome)
    log.info("promote: %s/%s -> %s (%s)", name, chosen, moved_to or "no change", decision.reason)
    ctx.record(version=chosen, alias=champion_alias, force=force, reason=reason)
    return {
        "model": name, "version": chosen, "decision": decision.outcome, "reason": decision.reason,
        "alias": moved_to, "forced": decision.forced, "previous_champion": champion,
        "champion_version": chosen if decision.outcome == CHAMPION else champion,
        "gates": [{"name": g.name, "passed": g.passed, "observed": g.observed, "threshold": g.threshold,
                   "detail": g.detail} for g in decision.gates],
        "gates_passed": decision.passed, "evaluated": candidate_eval is not None,
        "model_uri": f"models:/{name}@{moved_to}" if moved_to else f"models:/{name}/{chosen}",
        "tracking_uri": uri,
    }


def format_decision(stats: Mapping[str, Any]) -> str:
    """The decision and every gate, a line each (the CLI's and the pipeline's summary)."""
    where = {CHAMPION: f"-> @{stats['alias']}", CHALLENGER: f"-> @{stats['alias']} (not champion)"}
    head = f"{stats['model']} version {stats['version']} {where.get(stats['decision'], 'unchanged')}"
    lines = [f"{head}: {stats['reason']}"]
    lines += [f"  {'pass' if g['passed'] else 'FAIL'}  {g['name']}: {g['detail']}" for g in stats["gates"]]
    return "\n".join(lines)


PROMOTE = Stage(
    name=STAGE,
    help="Move @champion to a registered model version if its latest evaluation passes the promote gates "
    "(else @challenger); --force --reason overrides.",
    reads=(EVALUATIONS, GATE_FAILURES),
    writes=(),
    transform=promote_model,
    params=(
        Param("version", "Registered version to promote (default: the one trained under this run id).", kind="int",
              minimum=1),
        Param("alias", "Alias to move when the gates pass (default: model.champion_alias, champion)."),
        Param("force", "Promote even if gates fail (needs --reason; recorded).", kind="bool", default=False),
        Param("reason", "Why a forced promotion is made (recorded as a model-version tag)."),
    ),
    describe=format_decision,
)


def decision_tags(client: Any, name: str, version: str) -> dict[str, Any]:
    """The ``refinex.promotion.*`` tags of a version (``gates`` parsed)."""
    tags = client.get_model_version(name, version).tags
    out: dict[str, Any] = {k[len(TAG_PREFIX):]: v for k, v in tags.items() if k.startswith(TAG_PREFIX)}
    if "gates" in out:
        out["gates"] = json.loads(out["gates"])
    return out
