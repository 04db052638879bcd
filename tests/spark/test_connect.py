"""The whole pipeline through Spark Connect, against a real local Spark Connect server.

What Databricks serverless and standard-access-mode clusters give refinex is a Spark Connect
session: no ``sparkContext``, no JVM handle, no RDD. A ``refinex pipeline`` subprocess with
``SPARK_REMOTE`` pointing at the session's server (``connect_server``, pyspark's own
``SparkConnectServer`` with Delta's jars) runs every stage, the tiny model's training,
refine, the Great Expectations gates, evaluation and promotion included; the same pipeline
in this process on ``local[2]`` is the reference. The Connect client runs in its own process
because a Connect session switches pyspark's functions to Connect process-wide.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from refinex.config import Config
from refinex.spark.pipeline import run_pipeline
from refinex.spark.tables import ORIGIN_DISTILLED, ORIGIN_MODEL

from .table_checks import assert_same_table, load

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(1800)]  # the first test starts the server and both runs

REPO_ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 720


def connect_env(url: str) -> dict[str, str]:
    """A ``refinex`` subprocess that talks to ``url``: offline, the repository importable."""
    drop = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "SPARK_LOCAL_DIRS", "REFINEX_CONFIG")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    paths = [str(REPO_ROOT), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
    env.update(SPARK_REMOTE=url, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false", PYTHONPATH=os.pathsep.join(paths))
    return env


@pytest.fixture(scope="module")
def runs(spark: SparkSession, spark_config: Config, sample_pages: Path, connect_server: Any,
         tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The pipeline on the same pages through Spark Connect and on local[2]."""
    root = tmp_path_factory.mktemp("connect")
    remote, local = root / "remote", root / "local"
    done = subprocess.run(
        [sys.executable, "-m", "refinex", "pipeline", "--input", str(sample_pages), "--workdir", str(remote),
         "--config", "test"],
        cwd=REPO_ROOT, env=connect_env(connect_server.url), capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )
    assert done.returncode == 0, f"pipeline through Spark Connect failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    reference = run_pipeline(spark, spark_config, str(local), str(sample_pages))
    return {"remote": remote, "local": local, "stdout": done.stdout, "stderr": done.stderr, "reference": reference}


def test_the_session_was_a_connect_session(runs: dict[str, Any], spark: SparkSession) -> None:
    """Every stage ran, each recorded under the Connect session's key, not an application id."""
    rows = load(spark, runs["remote"], "stage_runs").select("stage", "stats").collect()
    stages = {r["stage"] for r in rows}
    assert {"ingest", "expert", "distill", "apply", "stats", "validate", "evaluate", "sft_pairs", "train",
            "refine", "promote"} <= stages, sorted(stages)
    sessions = {json.loads(r["stats"]).get("spark_session") for r in rows} - {None}
    assert sessions and all(str(s).startswith("connect:") for s in sessions), sessions


def test_expert_path_tables_equal_local(runs: dict[str, Any], spark: SparkSession) -> None:
    remote, local = runs["remote"], runs["local"]
    n = assert_same_table(spark, remote, local, "documents")
    assert n == 5
    assert assert_same_table(spark, remote, local, "quarantine") == 0
    assert assert_same_table(spark, remote, local, "expert_refinements") == n
    distilled = F.col("origin") == ORIGIN_DISTILLED
    assert assert_same_table(spark, remote, local, "programs", distilled) == n
    assert assert_same_table(spark, remote, local, "refined_documents", distilled) == n
    assert assert_same_table(spark, remote, local, "edit_stats", distilled) == n
    assert assert_same_table(spark, remote, local, "sft_pairs") > 0


def test_model_path_accounts_for_every_document(runs: dict[str, Any], spark: SparkSession) -> None:
    """The model trained in the client, ran on the server's Python workers, was applied,
    gated and scored, and promotion decided: one program per document, none invalid."""
    remote = runs["remote"]
    model = F.col("origin") == ORIGIN_MODEL
    programs = load(spark, remote, "programs").where(model)
    assert programs.select("doc_id").distinct().count() == 5
    assert load(spark, remote, "refined_documents").where(model).count() == 5
    assert load(spark, remote, "edit_stats").where(model).count() == 5
    evaluations = load(spark, remote, "evaluations").select("origin").distinct().collect()
    assert {r["origin"] for r in evaluations} >= {ORIGIN_DISTILLED, ORIGIN_MODEL}
    assert "promotion: refinex-refiner version 1" in runs["stdout"], runs["stdout"][-2000:]


def test_model_programs_equal_a_local_refine_of_the_same_model(runs: dict[str, Any], spark: SparkSession,
                                                               spark_config: Config) -> None:
    """The registered model refined on local[2] gives the programs it gave through Connect."""
    from refinex.spark.registry import run_stage

    remote = str(runs["remote"])
    model = F.col("origin") == ORIGIN_MODEL
    before = {r["doc_id"]: r["program"] for r in load(spark, remote, "programs").where(model).collect()}
    stats = run_stage("refine", spark, spark_config, remote, model="models:/refinex-refiner/1", force=True)
    after = {r["doc_id"]: r["program"]
             for r in load(spark, remote, "programs").where(model & (F.col("origin_version") == stats["origin_version"])).collect()}
    assert after == before
