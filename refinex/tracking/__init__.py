"""MLflow tracking: training runs, model logging and the ``refinex-refiner`` registry."""
from __future__ import annotations

from refinex.tracking.mlflow_utils import (
    CHECKPOINT_ARTIFACT,
    DEFAULT_EXPERIMENT,
    REGISTERED_MODEL_NAME,
    LoggedRun,
    RefinerPyfunc,
    configure_tracking,
    get_alias_version,
    log_training_run,
    resolve_model_uri,
    resolve_tracking_uri,
    safe_params,
    set_alias,
)

__all__ = [
    "CHECKPOINT_ARTIFACT",
    "DEFAULT_EXPERIMENT",
    "REGISTERED_MODEL_NAME",
    "LoggedRun",
    "RefinerPyfunc",
    "configure_tracking",
    "get_alias_version",
    "log_training_run",
    "resolve_model_uri",
    "resolve_tracking_uri",
    "safe_params",
    "set_alias",
]
