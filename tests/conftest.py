"""Shared fixtures: one local Spark session (with Delta) for the whole test run.

The session is created lazily, only when a test asks for ``spark``: local[2], two shuffle
partitions, no UI, Delta's extension and catalog on, and its warehouse, Derby home and
scratch space under pytest's temporary folder. The ``cluster`` tests share one local Spark
Connect server (``connect_server``), started the first time one of them asks.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import pytest

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from refinex.config import Config
    from refinex.spark.local_servers import ConnectServer


@pytest.fixture(scope="session")
def spark_config() -> "Config":
    """The ``test`` profile."""
    from refinex.config import load_config

    return load_config("test")


@pytest.fixture(scope="session")
def spark(tmp_path_factory: pytest.TempPathFactory, spark_config: "Config") -> Iterator["SparkSession"]:
    """The test session (created once, stopped at the end of the run)."""
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from refinex.spark.session import get_spark

    home = tmp_path_factory.mktemp("spark-session")
    session = get_spark(spark_config, workdir=str(home))
    yield session
    session.stop()


@pytest.fixture(scope="session")
def connect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator["ConnectServer"]:
    """One local Spark Connect server with Delta for the whole run (started on first use)."""
    from refinex.spark.local_servers import start_connect_server

    server = start_connect_server(tmp_path_factory.mktemp("connect-server"), driver_memory="1g")
    yield server
    server.stop()


@pytest.fixture()
def workdir(tmp_path: Path) -> str:
    """A fresh workdir for one test."""
    path = tmp_path / "work"
    path.mkdir()
    return str(path)


REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def sample_pages(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five real web pages (JSONL.gz): the repository's sample, else the shared dev set."""
    import gzip

    candidates = [
        REPO_ROOT / "data" / "sample" / "pages-sample.jsonl.gz",
        REPO_ROOT / ".." / "shared" / "data" / "webpages-dev.jsonl.gz",
    ]
    source = next((p for p in candidates if p.is_file()), None)
    if source is None:
        pytest.skip("no sample pages (data/sample/pages-sample.jsonl.gz or ../shared/data/webpages-dev.jsonl.gz)")
    out = tmp_path_factory.mktemp("pages") / "pages-5.jsonl.gz"
    with gzip.open(source, "rt", encoding="utf-8") as src, gzip.open(out, "wt", encoding="utf-8") as dst:
        for index, line in enumerate(src):
            if index == 5:
                break
            dst.write(line)
    return out


@pytest.fixture(autouse=True)
def _isolated_mlflow_tracking() -> Iterator[None]:
    """Undo any process-wide MLflow tracking URI a test sets.

    ``mlflow.set_tracking_uri`` mirrors itself into ``$MLFLOW_TRACKING_URI``, which refinex
    honours as the user's choice; a test that leaves it behind would send later tests' runs
    to its temporary store.
    """
    saved = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    yield
    if any(os.environ.get(name) != value for name, value in saved.items()):
        import mlflow

        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])
        if saved["MLFLOW_TRACKING_URI"] is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])  # type: ignore[arg-type]
        if saved["MLFLOW_REGISTRY_URI"] is None:
            os.environ.pop("MLFLOW_REGISTRY_URI", None)
