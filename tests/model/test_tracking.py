"""MLflow: log a training run, register, alias, resolve back to a checkpoint, same generation."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest
import torch

mlflow = pytest.importorskip("mlflow")

from refinex.model.bases import load_checkpoint  # noqa: E402
from refinex.model.prompts import PROMPT_VERSION, build_prompt  # noqa: E402
from refinex.tracking import (  # noqa: E402
    REGISTERED_MODEL_NAME,
    get_alias_version,
    log_training_run,
    resolve_model_uri,
    resolve_tracking_uri,
    safe_params,
    set_alias,
)

CHUNK = "[000] Home\n[001] The river city has a long history.\n[002] Share this article"


@pytest.fixture(autouse=True)
def _isolated_mlflow_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    yield


def greedy_ids(checkpoint: Path, n_tokens: int = 12, stop_at_eos: bool = False) -> list[int]:
    model, tok = load_checkpoint(checkpoint)
    ids = tok(build_prompt(CHUNK), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **ids, max_new_tokens=n_tokens, min_new_tokens=None if stop_at_eos else n_tokens,
            do_sample=False, pad_token_id=tok.pad_token_id,
        )
    return out[0, ids["input_ids"].shape[1] :].tolist()


def test_tracking_uri_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_tracking_uri(workdir=tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert resolve_tracking_uri("http://mlflow:5000", workdir=tmp_path) == "http://mlflow:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "databricks")
    assert resolve_tracking_uri(workdir=tmp_path) == "databricks"


def test_safe_params_never_log_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "a-very-private-value")
    params = {
        "api_key": "abc", "hf_token": "x", "expert.password": "p", "note": "ok", "lr": 0.1,
        "leak": "a-very-private-value", "looks_like_key": "sk-live-123456", "max_new_tokens": 512,
        "endpoint": "https://user:pw@host.example:8443/v1", "nested": {"auth": "x", "depth": 2},
        "skip": None, "long": "y" * 7000, "ids": [1, 2],
    }
    out = safe_params(params)
    assert out == {
        "note": "ok", "lr": "0.1", "max_new_tokens": "512",
        "endpoint": "https://host.example:8443/v1", "nested.depth": "2",
        "long": "y" * 5997 + "...", "ids": "[1, 2]",
    }


def test_log_register_alias_resolve_and_generate(tiny_trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    monkeypatch.setenv("SERVICE_TOKEN", "tok-1234567890")
    result = tiny_trained
    before = greedy_ids(result.out_dir)
    workdir = tmp_path / "work"
    logged = log_training_run(
        result,
        params={"api_key": "sk-secret", "leak": "tok-1234567890", "spark.app": "refinex-train"},
        data_version=3,
        workdir=workdir,
        run_name="tiny-test",
    )
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the process setting is restored
    uri = logged.tracking_uri
    assert uri == f"sqlite:///{workdir.resolve()}/mlflow.db"
    assert (workdir / "mlflow.db").is_file() and (workdir / "mlruns").is_dir()
    assert logged.registered_name == REGISTERED_MODEL_NAME and logged.version == "1"

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(logged.run_id)
    params = run.data.params
    assert params["train.lr"] == str(result.config.lr) and params["train_data_version"] == "3"
    assert params["prompt_version"] == PROMPT_VERSION and params["spark.app"] == "refinex-train"
    assert "api_key" not in params and "leak" not in params
    assert "sk-secret" not in str(run.data) and "tok-1234567890" not in str(run.data)
    history = client.get_metric_history(logged.run_id, "train_loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(1, 31))
    val = sorted(client.get_metric_history(logged.run_id, "validation_loss"), key=lambda m: m.step)
    assert [m.step for m in val] == [0, 10, 20, 30]
    assert run.data.metrics["validation_loss"] == pytest.approx(result.validation_loss)
    assert "plots/loss_curve.png" in [a.path for a in client.list_artifacts(logged.run_id, "plots")]

    version = client.get_model_version(REGISTERED_MODEL_NAME, "1")
    assert version.tags["train_data_version"] == "3"
    assert version.tags["prompt_version"] == PROMPT_VERSION
    assert float(version.tags["validation_loss"]) == pytest.approx(result.validation_loss, rel=1e-5)

    second = log_training_run(result, data_version="4", workdir=workdir)
    assert second.version == "2"
    set_alias(REGISTERED_MODEL_NAME, "champion", 1, workdir=workdir)
    assert get_alias_version(REGISTERED_MODEL_NAME, "champion", workdir=workdir) == "1"
    set_alias(REGISTERED_MODEL_NAME, "champion", second.version, workdir=workdir)
    assert get_alias_version(REGISTERED_MODEL_NAME, "champion", workdir=workdir) == "2"
    assert get_alias_version(REGISTERED_MODEL_NAME, "challenger", workdir=workdir) is None

    champion = resolve_model_uri(f"models:/{REGISTERED_MODEL_NAME}@champion", tmp_path / "dl1", workdir=workdir)
    assert champion.is_relative_to(tmp_path / "dl1")
    assert (champion / "model.safetensors").read_bytes() == (result.out_dir / "model.safetensors").read_bytes()
    assert greedy_ids(champion) == before

    for model_uri in (f"models:/{REGISTERED_MODEL_NAME}/1", f"runs:/{logged.run_id}/model", logged.model_uri):
        path = resolve_model_uri(model_uri, tmp_path / "dl2" / str(abs(hash(model_uri))), tracking_uri=uri)
        assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
    assert resolve_model_uri(str(result.out_dir), tmp_path / "unused") == result.out_dir.resolve()
    assert resolve_model_uri(result.out_dir.as_uri(), tmp_path / "unused") == result.out_dir.resolve()
    with pytest.raises(FileNotFoundError):
        resolve_model_uri(str(tmp_path / "missing"), tmp_path / "unused")

    # The registered model also loads back as a pyfunc and generates the same program text.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    try:
        model_dir = mlflow.artifacts.download_artifacts(
            f"models:/{REGISTERED_MODEL_NAME}@champion", dst_path=str(tmp_path / "pyfunc")
        )
    finally:
        mlflow.set_tracking_uri(None)
    assert resolve_model_uri(model_dir, tmp_path / "unused") == Path(model_dir) / "artifacts" / result.out_dir.name
    import pandas as pd

    pyfunc = mlflow.pyfunc.load_model(model_dir, model_config={"max_new_tokens": 12})
    _, tok = load_checkpoint(champion)
    expected = tok.decode(greedy_ids(result.out_dir, stop_at_eos=True), skip_special_tokens=True)
    assert pyfunc.predict([CHUNK]) == [expected]
    assert list(pyfunc.predict(pd.DataFrame({"chunk": [CHUNK, CHUNK]}))) == [expected, expected]
