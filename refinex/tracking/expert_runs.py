"""MLflow runs of the expert stage: one run per stage execution, params and metrics only.

Tracking URI: ``expert.mlflow_tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else
``sqlite:///<workdir>/mlflow.db`` for a local workdir, else MLflow's own default (on
Databricks the workspace). Params and tags go through ``safe_params``, which leaves out
secret-named keys and credential-looking values, on top of the experts' own ``params()``
that never contain a key.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping, Optional

from refinex.locations import is_local, local_path
from refinex.tracking.mlflow_utils import artifact_root, experiment_id_for, resolve_tracking_uri, safe_params

__all__ = ["DEFAULT_EXPERT_EXPERIMENT", "expert_tracking_uri", "log_expert_run"]

DEFAULT_EXPERT_EXPERIMENT = "refinex-expert"
_PARAM_BATCH = 100  # MLflow's limit of params per log_batch call
_METRIC_BATCH = 1000


def _local_dir(workdir: str) -> Optional[Path]:
    """The workdir as a local folder (``refinex.locations.is_local``), else None: remote
    workdirs, FUSE-mounted ones included, use MLflow's default (the workspace's) tracking."""
    return local_path(workdir) if is_local(workdir) else None


def expert_tracking_uri(tracking_uri: Optional[str], workdir: str) -> str:
    """The tracking URI of the expert stage (see the module docstring)."""
    if tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return resolve_tracking_uri(tracking_uri)
    local = _local_dir(workdir)
    if local is not None:
        return resolve_tracking_uri(None, local)
    import mlflow

    return str(mlflow.get_tracking_uri())


def log_expert_run(
    params: Mapping[str, Any],
    metrics: Mapping[str, float],
    *,
    workdir: str,
    tracking_uri: Optional[str] = None,
    experiment: str = DEFAULT_EXPERT_EXPERIMENT,
    run_name: Optional[str] = None,
    tags: Optional[Mapping[str, Any]] = None,
) -> str:
    """Log one finished run (secret-filtered params and tags, metrics at step 0); its id."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    uri = expert_tracking_uri(tracking_uri, workdir)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=uri)
    experiment_id = experiment_id_for(client, experiment, artifact_root(uri, _local_dir(workdir)))
    run = client.create_run(experiment_id, run_name=run_name, tags=safe_params(dict(tags or {})))
    run_id = str(run.info.run_id)
    try:
        now = int(time.time() * 1000)
        param_items = [Param(k, v) for k, v in sorted(safe_params(params).items())]
        metric_items = [Metric(k, float(v), now, 0) for k, v in sorted(metrics.items())]
        for start in range(0, len(param_items), _PARAM_BATCH):
            client.log_batch(run_id, params=param_items[start : start + _PARAM_BATCH], synchronous=True)
        for start in range(0, len(metric_items), _METRIC_BATCH):
            client.log_batch(run_id, metrics=metric_items[start : start + _METRIC_BATCH], synchronous=True)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id
