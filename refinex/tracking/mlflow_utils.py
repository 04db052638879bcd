"""MLflow tracking of refine-model training runs and the ``refinex-refiner`` registry.

Tracking URI: an explicit argument, else ``$MLFLOW_TRACKING_URI``, else a local SQLite
store ``sqlite:///<workdir>/mlflow.db`` with artifacts under ``<workdir>/mlruns``. Registry
URI (``model.registry_uri``, e.g. ``databricks-uc`` for Unity Catalog): an explicit
argument, else the tracking URI; every client and registry call of this module uses it.

A trained checkpoint is logged as an MLflow pyfunc model whose artifact ``checkpoint`` is
the Hugging Face checkpoint directory itself (safetensors + tokenizer +
``refinex_model.json``), so it loads back offline either as a pyfunc (greedy generation of
programs for numbered chunks) or, via :func:`resolve_model_uri`, as a plain directory for
``AutoModelForCausalLM``. Parameters are filtered so that secrets never reach MLflow.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional, Union
from urllib.parse import urlsplit, urlunsplit

import mlflow
import mlflow.pyfunc
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.models import Model

from refinex.model.prompts import PROMPT_VERSION, build_prompt

if TYPE_CHECKING:
    from refinex.model.train import TrainResult

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
    "resolve_registry_uri",
    "resolve_tracking_uri",
    "safe_params",
    "set_alias",
]

REGISTERED_MODEL_NAME = "refinex-refiner"
DEFAULT_EXPERIMENT = "refinex-train"
MODEL_ARTIFACT = "model"
CHECKPOINT_ARTIFACT = "checkpoint"
MAX_PARAM_LENGTH = 6000
DEFAULT_MAX_NEW_TOKENS = 512
_METRIC_BATCH = 1000
_SECRET_KEY = re.compile(
    r"(?i)(^|[_.\-])(secret|secrets|password|passwd|token|api_?key|apikey|credentials?|auth|"
    r"authorization|private_?key|access_?key|session_?key|cookie)($|[_.\-])"
)
_SECRET_VALUE = re.compile(r"^(sk-|hf_|ghp_|gho_|github_pat_|xox[abpr]-|AKIA|ASIA|AIza)")


@dataclass(frozen=True)
class LoggedRun:
    """Where a training run went in MLflow."""

    run_id: str
    experiment_id: str
    tracking_uri: str
    model_uri: str  # the logged model (``models:/m-...``) or ``runs:/<run>/model``
    registered_name: Optional[str]
    version: Optional[str]
    registry_uri: Optional[str] = None  # where ``registered_name`` lives (None: tracking_uri)

    @property
    def registered_model_uri(self) -> Optional[str]:
        """``models:/<name>/<version>`` when the model was registered."""
        if self.registered_name is None or self.version is None:
            return None
        return f"models:/{self.registered_name}/{self.version}"


# --- tracking URI ---------------------------------------------------------------------------


def resolve_tracking_uri(
    tracking_uri: Optional[str] = None, workdir: Optional[Union[str, os.PathLike[str]]] = None
) -> str:
    """``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<workdir>/mlflow.db``."""
    if tracking_uri:
        return tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    root = Path(workdir) if workdir is not None else Path.cwd()
    return f"sqlite:///{root.resolve() / 'mlflow.db'}"


def resolve_registry_uri(registry_uri: Optional[str], tracking_uri: str) -> str:
    """``registry_uri`` (e.g. ``databricks-uc``), else the tracking URI."""
    return registry_uri or tracking_uri


def configure_tracking(
    tracking_uri: Optional[str] = None,
    workdir: Optional[Union[str, os.PathLike[str]]] = None,
    registry_uri: Optional[str] = None,
) -> str:
    """Point MLflow (process-wide) at the resolved tracking URI and the registry at
    ``registry_uri`` (default: the same URI); returns the tracking URI."""
    uri = resolve_tracking_uri(tracking_uri, workdir)
    registry = resolve_registry_uri(registry_uri, uri)
    _ensure_sqlite_dir(uri)
    _ensure_sqlite_dir(registry)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(registry)
    return uri


def _ensure_sqlite_dir(uri: str) -> None:
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def _tracking_at(uri: str, registry_uri: Optional[str] = None) -> Iterator[None]:
    """Use ``uri`` for MLflow's fluent API inside the block, and ``registry_uri`` (default:
    ``uri``) for its registry.

    ``mlflow.set_tracking_uri``/``set_registry_uri`` mirror themselves into
    ``$MLFLOW_TRACKING_URI``/``$MLFLOW_REGISTRY_URI``, which are therefore what is restored.
    """
    previous_tracking = os.environ.get("MLFLOW_TRACKING_URI")
    previous_registry = os.environ.get("MLFLOW_REGISTRY_URI")
    registry = resolve_registry_uri(registry_uri, uri)
    _ensure_sqlite_dir(uri)
    _ensure_sqlite_dir(registry)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(registry)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous_tracking)
        mlflow.set_registry_uri(previous_registry)  # type: ignore[arg-type]
        if previous_registry is None:
            os.environ.pop("MLFLOW_REGISTRY_URI", None)


def artifact_root(uri: str, workdir: Optional[Union[str, os.PathLike[str]]]) -> Optional[str]:
    """``<workdir>/mlruns`` (as a file URI) for a local SQLite store; the server's otherwise."""
    if not uri.startswith("sqlite:///"):
        return None
    root = Path(workdir) if workdir is not None else Path(uri[len("sqlite:///") :]).parent
    return (root.resolve() / "mlruns").as_uri()


def experiment_id_for(client: MlflowClient, name: str, artifact_location: Optional[str]) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return str(experiment.experiment_id)
    try:
        return str(client.create_experiment(name, artifact_location=artifact_location))
    except mlflow.exceptions.MlflowException:
        experiment = client.get_experiment_by_name(name)  # created concurrently
        if experiment is None:
            raise
        return str(experiment.experiment_id)


# --- secrets --------------------------------------------------------------------------------


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _strip_userinfo(text: str) -> str:
    """Remove ``user:password@`` from URLs."""
    if "://" not in text or "@" not in text:
        return text
    try:
        parts = urlsplit(text)
    except ValueError:
        return text
    if parts.username is None and parts.password is None:
        return text
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def safe_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Flatten ``params`` to strings and leave out anything that may be a secret.

    Dropped: keys that name a secret (``api_key``, ``token``, ``password``, ...), values that
    look like credentials (``sk-...``, ``hf_...``), and values equal to the value of a
    secret-named environment variable. Credentials in URLs are stripped; ``None`` is left out.
    """
    secret_env_values = {
        value for key, value in os.environ.items() if _SECRET_KEY.search(key) and len(value) >= 6
    }
    out: dict[str, str] = {}
    for key, value in _flatten(params).items():
        if value is None or _SECRET_KEY.search(key):
            continue
        text = value if isinstance(value, str) else json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
        if _SECRET_VALUE.match(text.strip()) or text in secret_env_values:
            continue
        text = _strip_userinfo(text)
        out[key] = text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."
    return out


# --- the pyfunc model -----------------------------------------------------------------------


class RefinerPyfunc(mlflow.pyfunc.PythonModel):
    """Pyfunc wrapper: numbered chunk texts -> program texts (greedy decoding).

    ``model_config`` (at logging or ``mlflow.pyfunc.load_model(..., model_config=...)``)
    sets ``max_new_tokens`` (default 512). The input and output schemas come from the
    type hints of :meth:`predict` (a list of strings, or a one-column DataFrame).
    """

    def load_context(self, context: Any) -> None:
        from refinex.model.backends import load_backend
        from refinex.model.bases import load_checkpoint
        from refinex.model.tiers import TIER_GENERATE, tier_of
        from refinex.model.train import read_model_info

        path = context.artifacts[CHECKPOINT_ARTIFACT]
        config = dict(getattr(context, "model_config", None) or {})
        self._max_new_tokens = int(config.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        tagging = tier_of(read_model_info(path)) != TIER_GENERATE
        self._tagger = load_backend("transformers", path) if tagging else None
        if self._tagger is None:
            self._model, self._tokenizer = load_checkpoint(path)
            self._model.eval()

    def predict(
        self, context: Any, model_input: list[str], params: Optional[dict[str, Any]] = None
    ) -> list[str]:
        """Program text for each numbered chunk (``params`` is not used): greedy decoding,
        or the deletions of a tagging tier's model (``tag`` or ``fast``; text only: the
        page HTML is not part of the input)."""
        import torch

        if self._tagger is not None:
            return self._tagger.generate([_numbered_chunk_request(str(chunk)) for chunk in model_input])
        tokenizer = self._tokenizer
        outputs = []
        for chunk in model_input:
            ids = tokenizer(build_prompt(str(chunk)), return_tensors="pt")
            with torch.no_grad():
                generated = self._model.generate(
                    **ids,
                    max_new_tokens=self._max_new_tokens,
                    do_sample=False,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                )
            new = generated[0, ids["input_ids"].shape[1] :]
            outputs.append(tokenizer.decode(new, skip_special_tokens=True))
        return outputs


_NUMBERED_LINE = re.compile(r"^\[(\d+)\] ?(.*)$")


def _numbered_chunk_request(chunk: str) -> Any:
    """The request of a numbered chunk text (``[012] line`` per line; ids consecutive)."""
    from refinex.model.backends import GenerationRequest

    rows = chunk.split("\n")
    first = _NUMBERED_LINE.match(rows[0])
    start = int(first.group(1)) if first else 0
    lines = []
    for offset, row in enumerate(rows):
        match = _NUMBERED_LINE.match(row)
        if match is None or int(match.group(1)) != start + offset:
            raise ValueError(f"line {offset} of the chunk is not numbered [{start + offset:03d}]: {row[:40]!r}")
        lines.append(match.group(2))
    return GenerationRequest("", start, start + len(lines) - 1, tuple(lines))


def _pip_requirements() -> list[str]:
    reqs = []
    for dist in ("torch", "transformers", "tokenizers", "safetensors", "mlflow", "pandas"):
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        reqs.append(f"{dist}=={version.split('+')[0]}")
    return reqs


# --- logging --------------------------------------------------------------------------------


def _log_metrics(client: MlflowClient, run_id: str, result: "TrainResult") -> None:
    now = int(time.time() * 1000)
    metrics = [Metric("train_loss", float(v), now, i + 1) for i, v in enumerate(result.train_losses)]
    metrics += [Metric("learning_rate", float(v), now, i + 1) for i, v in enumerate(result.learning_rates)]
    metrics += [Metric("validation_loss", float(v), now, int(s)) for s, v in result.eval_losses]
    metrics += [
        Metric(name, float(v), now, result.steps)
        for name, v in result.metrics().items()
        if name != "validation_loss"
    ]
    for start in range(0, len(metrics), _METRIC_BATCH):
        client.log_batch(run_id, metrics=metrics[start : start + _METRIC_BATCH], synchronous=True)


def log_training_run(
    result: "TrainResult",
    params: Optional[Mapping[str, Any]] = None,
    data_version: Optional[Union[str, int]] = None,
    *,
    tracking_uri: Optional[str] = None,
    workdir: Optional[Union[str, os.PathLike[str]]] = None,
    experiment: str = DEFAULT_EXPERIMENT,
    run_name: Optional[str] = None,
    register: bool = True,
    model_name: str = REGISTERED_MODEL_NAME,
    tags: Optional[Mapping[str, Any]] = None,
    registry_uri: Optional[str] = None,
) -> LoggedRun:
    """Log a :class:`~refinex.model.train.TrainResult` and (by default) register its model
    (in ``registry_uri``, default: the tracking URI; Unity Catalog: ``databricks-uc`` with a
    ``catalog.schema.model`` name).

    Logs the training config and ``params`` (secret-filtered), the loss and learning-rate
    curves as step metrics, the validation losses, the final metrics, the loss-curve PNG
    and the checkpoint as a pyfunc model; the new registry version is tagged with the
    training data version, prompt version, base and metrics.
    """
    uri = resolve_tracking_uri(tracking_uri, workdir)
    registry = resolve_registry_uri(registry_uri, uri)
    with _tracking_at(uri, registry):
        return _log_training_run(
            result, params, data_version, uri, workdir, experiment, run_name, register, model_name, tags, registry
        )


def _log_training_run(
    result: "TrainResult",
    params: Optional[Mapping[str, Any]],
    data_version: Optional[Union[str, int]],
    uri: str,
    workdir: Optional[Union[str, os.PathLike[str]]],
    experiment: str,
    run_name: Optional[str],
    register: bool,
    model_name: str,
    tags: Optional[Mapping[str, Any]],
    registry_uri: str,
) -> LoggedRun:
    client = MlflowClient(tracking_uri=uri, registry_uri=registry_uri)
    experiment_id = experiment_id_for(client, experiment, artifact_root(uri, workdir))
    data_version_text = None if data_version is None else str(data_version)
    if data_version_text is None and result.train_data_version is not None:
        data_version_text = str(result.train_data_version)
    all_params: dict[str, Any] = {
        **{f"train.{k}": v for k, v in result.config.to_dict().items()},
        "base": result.base,
        "prompt_version": PROMPT_VERSION,
        "train_data_version": data_version_text,
        "n_train_pairs": result.n_train_pairs,
        "n_validation_pairs": result.n_validation_pairs,
        "device": result.device,
        "precision": result.precision,
        "precision_reason": getattr(result, "precision_reason", ""),
    }
    all_params.update(dict(params or {}))
    run_tags = {
        "refinex.prompt_version": PROMPT_VERSION,
        "refinex.base": result.base,
        "refinex.train_data_version": data_version_text,
        **dict(tags or {}),
    }
    nested = mlflow.active_run() is not None
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, nested=nested) as run:
        run_id = run.info.run_id
        client.log_batch(
            run_id,
            params=[Param(k, v) for k, v in safe_params(all_params).items()],
            tags=[RunTag(k, v) for k, v in safe_params(run_tags).items()],
            synchronous=True,
        )
        _log_metrics(client, run_id, result)
        if result.plot_path is not None and Path(result.plot_path).is_file():
            mlflow.log_artifact(str(result.plot_path), artifact_path="plots")
        info_file = Path(result.out_dir) / "refinex_model.json"
        if info_file.is_file():
            mlflow.log_artifact(str(info_file))
        with warnings.catch_warnings():
            # No input example on purpose: MLflow would run generation to validate it.
            warnings.filterwarnings("ignore", message=".*input example was not provided.*")
            model_info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT,
                python_model=RefinerPyfunc(),
                artifacts={CHECKPOINT_ARTIFACT: str(result.out_dir)},
                pip_requirements=_pip_requirements(),
                model_config={"max_new_tokens": DEFAULT_MAX_NEW_TOKENS},
                metadata={"prompt_version": PROMPT_VERSION, "train_data_version": data_version_text},
            )
    version: Optional[str] = None
    registered: Optional[str] = None
    if register:
        model_version = mlflow.register_model(model_info.model_uri, model_name, await_registration_for=60)
        version, registered = str(model_version.version), model_name
        version_tags = {
            "train_data_version": data_version_text,
            "prompt_version": PROMPT_VERSION,
            "base": result.base,
            "run_id": run_id,
            **{k: f"{v:.6g}" for k, v in result.metrics().items()},
        }
        for key, value in safe_params(version_tags).items():
            client.set_model_version_tag(model_name, version, key, value)
    return LoggedRun(
        run_id=run_id,
        experiment_id=experiment_id,
        tracking_uri=uri,
        model_uri=model_info.model_uri,
        registered_name=registered,
        version=version,
        registry_uri=registry_uri if registered is not None else None,
    )


# --- registry -------------------------------------------------------------------------------


def set_alias(
    name: str,
    alias: str,
    version: Union[str, int],
    *,
    tracking_uri: Optional[str] = None,
    workdir: Optional[Union[str, os.PathLike[str]]] = None,
    registry_uri: Optional[str] = None,
) -> None:
    """Point ``models:/<name>@<alias>`` (e.g. ``@champion``) at ``version``."""
    uri = resolve_tracking_uri(tracking_uri, workdir)
    client = MlflowClient(tracking_uri=uri, registry_uri=resolve_registry_uri(registry_uri, uri))
    client.set_registered_model_alias(name, alias, str(version))


def get_alias_version(
    name: str,
    alias: str,
    *,
    tracking_uri: Optional[str] = None,
    workdir: Optional[Union[str, os.PathLike[str]]] = None,
    registry_uri: Optional[str] = None,
) -> Optional[str]:
    """The version ``alias`` points at, or ``None`` when the alias is not set."""
    uri = resolve_tracking_uri(tracking_uri, workdir)
    client = MlflowClient(tracking_uri=uri, registry_uri=resolve_registry_uri(registry_uri, uri))
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except mlflow.exceptions.MlflowException:
        return None


def _is_checkpoint(directory: Path) -> bool:
    """A Hugging Face checkpoint, or a refine model without one (the fast tier: its
    ``refinex_model.json`` and weights)."""
    return (directory / "config.json").is_file() or (directory / "refinex_model.json").is_file()


def checkpoint_in(directory: Path) -> Path:
    """The checkpoint directory inside a downloaded MLflow model (or the directory itself)."""
    if _is_checkpoint(directory):
        return directory
    mlmodel = directory / "MLmodel"
    if mlmodel.is_file():
        flavor = Model.load(str(mlmodel)).flavors.get("python_function", {})
        artifact = flavor.get("artifacts", {}).get(CHECKPOINT_ARTIFACT, {})
        relative = artifact.get("path") if isinstance(artifact, Mapping) else None
        if relative and _is_checkpoint(directory / relative):
            return directory / relative
    found = sorted(p.parent for p in directory.rglob("config.json") if (p.parent / "tokenizer_config.json").is_file())
    found = found or sorted(p.parent for p in directory.rglob("refinex_model.json"))
    if not found:
        raise FileNotFoundError(f"no refine-model checkpoint in {directory}")
    return found[0]


def resolve_model_uri(
    uri: Union[str, os.PathLike[str]],
    dst: Union[str, os.PathLike[str]],
    *,
    tracking_uri: Optional[str] = None,
    workdir: Optional[Union[str, os.PathLike[str]]] = None,
    registry_uri: Optional[str] = None,
) -> Path:
    """A local checkpoint directory for ``models:/name@alias``, ``models:/name/N``,
    ``runs:/<run>/model``, ``models:/m-...``, any artifact URI or a local path.

    Remote models are downloaded under ``dst``; local checkpoints (or local MLflow model
    directories) are used where they are. ``models:/<name>...`` is looked up in
    ``registry_uri`` (default: the tracking URI).
    """
    text = str(uri)
    scheme = urlsplit(text).scheme if "://" in text or text.startswith(("models:", "runs:")) else ""
    if scheme in ("", "file"):
        local = Path(urlsplit(text).path if scheme == "file" else text).expanduser()
        if local.is_dir():
            return checkpoint_in(local.resolve())
        if scheme == "":
            raise FileNotFoundError(f"{text} is not a directory")
    resolved = resolve_tracking_uri(tracking_uri, workdir)
    registry = resolve_registry_uri(registry_uri, resolved)
    target = Path(dst)
    target.mkdir(parents=True, exist_ok=True)
    # The models:/ artifact repository reads the process-wide registry URI: set it too.
    with _tracking_at(resolved, registry):
        downloaded = mlflow.artifacts.download_artifacts(
            artifact_uri=text, dst_path=str(target), tracking_uri=resolved, registry_uri=registry
        )
    return checkpoint_in(Path(downloaded))
