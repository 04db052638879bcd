"""The tagging head on Spark: train (model.head=tag, MLflow registry), refine, apply.

The same synthetic documents as ``test_refine``; the base is the tiny one. The tests check
that the tagging head is trained, registered with its head and threshold, picked from the
model itself by ``refine`` and run once per executor process, not the model's quality.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import pytest
from chispa import assert_df_equality
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from refinex.config import Config
from refinex.spark.tables import read_table

from .test_refine import DOCS, _seed

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TAG_SETTINGS = {"model.head": "tag", "tag.epochs": 3, "tag.cv_folds": 2, "tag.head_size": 32, "tag.progress": False}


@pytest.fixture(scope="module")
def tag_trained(spark: SparkSession, spark_config: Config, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[dict[str, Any]]:
    """A workdir with sft_pairs and a registered tiny tagging-head model (version 1)."""
    from refinex.spark.registry import run_stage

    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("MLFLOW_REGISTRY_URI", raising=False)
        patch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        patch.setenv("REFINEX_CACHE", str(tmp_path_factory.mktemp("refinex-cache")))
        config = spark_config.with_overrides(TAG_SETTINGS)
        workdir = str(tmp_path_factory.mktemp("refine-tag") / "work")
        _seed(spark, workdir)
        sft = run_stage("sft_pairs", spark, config, workdir)
        train = run_stage("train", spark, config, workdir)
        yield {"workdir": workdir, "sft": sft, "train": train, "config": config}


def test_train_registers_the_head_and_threshold(tag_trained: dict[str, Any]) -> None:
    from mlflow import MlflowClient

    from refinex.spark.train import tracking_uri_for

    train, config = tag_trained["train"], tag_trained["config"]
    assert train["head"] == "tag" and train["version"] == "1" and not train["reused"]
    assert train["threshold_source"] == "cross-validation" and 0 < train["threshold"] <= 1
    uri = tracking_uri_for(config, tag_trained["workdir"])
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version("refinex-refiner", "1")
    assert version.tags["head"] == "tag" and float(version.tags["tag_threshold"]) == train["threshold"]
    run = client.get_run(version.run_id)
    assert run.data.params["head"] == "tag" and run.data.params["precision"] in ("fp32", "bf16")
    assert run.data.params["precision_reason"]
    assert run.data.tags["refinex.head"] == "tag"


def test_refine_stage_runs_the_tagging_head(
    spark: SparkSession, tag_trained: dict[str, Any], tmp_path: Path
) -> None:
    from refinex.chunking import hf_token_counter
    from refinex.model.backends import load_backend
    from refinex.model.tagging.backend import TagBackend
    from refinex.program import parse
    from refinex.spark.refine import refine_documents
    from refinex.spark.registry import run_stage

    workdir, threshold = tag_trained["workdir"], tag_trained["train"]["threshold"]
    log = tmp_path / "loads.txt"
    config = tag_trained["config"].with_overrides({"refine.load_log": str(log), "refine.docs_per_partition": 1})
    stats = run_stage("refine", spark, config, workdir, model="models:/refinex-refiner/1")
    version = f"refinex-refiner/1+tag{threshold:g}"
    assert stats["origin_version"] == version and stats["processed"] == len(DOCS)
    assert stats["invalid_chunks"] == stats["parse_errors"] == stats["ops_out_of_chunk"] == 0
    assert stats["chunks"] == tag_trained["sft"]["pairs"]  # chunked exactly as the pairs it learnt from
    pids = log.read_text().split()
    assert len(pids) == len(set(pids)) == stats["model_loads"] == stats["worker_processes"]
    assert 1 <= len(pids) < stats["partitions"] == len(DOCS)  # one model per executor process, reused

    # The stage's programs are those of the pure core with the same model.
    rc = config.refine
    backend = load_backend("transformers", stats["checkpoint"], max_new_tokens=rc.max_new_tokens,
                           batch_size=rc.batch_size)
    assert isinstance(backend, TagBackend)
    rows = refine_documents(backend, hf_token_counter(backend.tokenizer), [(d, t) for d, t, _ in DOCS],
                            config.chunking.max_tokens)
    expected = spark.createDataFrame([(r["doc_id"], "model", version, r["program"]) for r in rows],
                                     "doc_id string, origin string, origin_version string, program string")
    programs = read_table(spark, workdir, "programs").where(F.col("origin_version") == version)
    assert_df_equality(programs.select(*expected.columns), expected, ignore_row_order=True, ignore_nullable=True)
    assert all(not parse(r["program"]).errors for r in programs.collect())

    applied = run_stage("apply", spark, config, workdir, origin="model", origin_version=version)
    summary = run_stage("stats", spark, config, workdir, origin="model", origin_version=version)
    assert applied["documents"] == summary["documents"] == len(DOCS)
    stats_rows = read_table(spark, workdir, "edit_stats").where(F.col("origin_version") == version).collect()
    assert len(stats_rows) == len(DOCS) and all((r["ops_rejected"] or 0) == 0 for r in stats_rows)

    override = config.with_overrides({"refine.options": {"threshold": 0.99}})
    strict = run_stage("refine", spark, override, workdir, model="models:/refinex-refiner/1", limit=2)
    assert strict["origin_version"] == "refinex-refiner/1+tag0.99" and strict["processed"] == 2


def test_pyfunc_of_a_tagging_model_writes_programs(tag_trained: dict[str, Any]) -> None:
    import mlflow

    from refinex.model.backends import GenerationRequest, load_backend
    from refinex.program.render import number_lines
    from refinex.spark.refine import resolve_model
    from refinex.spark.train import tracking_uri_for

    config, workdir = tag_trained["config"], tag_trained["workdir"]
    mlflow.set_tracking_uri(tracking_uri_for(config, workdir))
    mlflow.set_registry_uri(tracking_uri_for(config, workdir))
    model = mlflow.pyfunc.load_model("models:/refinex-refiner/1")
    lines = DOCS[0][1].split("\n")[:6]
    predicted = model.predict([number_lines(lines, 3)])
    checkpoint = resolve_model(config, workdir, "models:/refinex-refiner/1").checkpoint
    backend = load_backend("transformers", str(checkpoint))
    assert predicted == backend.generate([GenerationRequest.for_lines(lines, 3)])
    info = json.loads((checkpoint / "refinex_model.json").read_text())
    assert info["head"] == "tag" and info["tag"]["threshold"] == tag_trained["train"]["threshold"]
