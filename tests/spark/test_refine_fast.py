"""The fast tier on Spark: real pages through the experts, train (base fast), refine, apply.

The sample's real pages are ingested (with their HTML), refined by the consensus expert
(whose members' votes are the soft labels) and distilled; the fast tier is trained on the
whole documents, registered with its tier, picked from the model by ``refine`` with the
pages' structure features, and scored. The tests check the path and its bookkeeping, and
that the model beats the raw text on the documents it learnt from (not its quality on
unseen pages: BENCHMARKS.md measures that).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import pytest
from chispa import assert_df_equality
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from refinex.config import Config
from refinex.spark.tables import read_table

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample" / "pages-sample.jsonl.gz"
FAST_SETTINGS = {
    "model.base": "fast", "model.head": "tag", "tag.epochs": 4, "tag.cv_folds": 2, "tag.hidden_size": 32,
    "tag.embedding_size": 16, "tag.n_features": 4096, "tag.progress": False, "tag.labels": "soft",
    "tag.cv_min_documents": 10, "tag.min_steps": 120,
    "sft.validation_fraction": 0.2, "expert.name": "consensus", "expert.mlflow": False,
}


@pytest.fixture(scope="module")
def fast_trained(spark: SparkSession, spark_config: Config, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[dict[str, Any]]:
    """A workdir of the sample's pages with consensus programs and a registered fast-tier model."""
    from refinex.spark.registry import run_stage

    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("MLFLOW_REGISTRY_URI", raising=False)
        patch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        patch.setenv("REFINEX_CACHE", str(tmp_path_factory.mktemp("refinex-cache")))
        config = spark_config.with_overrides(FAST_SETTINGS)
        workdir = str(tmp_path_factory.mktemp("refine-fast") / "work")
        run_stage("ingest", spark, config, workdir, input=str(SAMPLE))
        run_stage("expert", spark, config, workdir)
        run_stage("distill", spark, config, workdir)
        sft = run_stage("sft_pairs", spark, config, workdir)
        train = run_stage("train", spark, config, workdir)
        yield {"workdir": workdir, "sft": sft, "train": train, "config": config}


def test_train_registers_the_fast_tier(fast_trained: dict[str, Any]) -> None:
    from mlflow import MlflowClient

    from refinex.spark.train import tracking_uri_for

    train, config, sft = fast_trained["train"], fast_trained["config"], fast_trained["sft"]
    assert sft["max_tokens"] == 20000 and sft["pairs"] == sft["documents_with_pairs"]  # whole documents
    assert train["tier"] == "fast" and train["head"] == "tag" and train["version"] == "1"
    assert train["threshold_source"] == "cross-validation" and 0 < train["threshold"] < 1
    assert train["train_pairs"] == sft["train_documents"]  # documents, not chunks
    from refinex.model.train import read_model_info
    from refinex.spark.refine import resolve_model

    checkpoint = resolve_model(config, fast_trained["workdir"], train["model_uri"]).checkpoint
    assert read_model_info(checkpoint)["fast"]["labels"] == "soft"
    uri = tracking_uri_for(config, fast_trained["workdir"])
    version = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version("refinex-refiner", "1")
    assert version.tags["tier"] == "fast" and version.tags["head"] == "tag"
    assert float(version.tags["tag_threshold"]) == train["threshold"]


def test_refine_reads_the_pages_structure_and_writes_valid_programs(
    spark: SparkSession, fast_trained: dict[str, Any], tmp_path: Path
) -> None:
    from refinex.model.backends import load_backend
    from refinex.program import parse
    from refinex.spark.refine import refine_documents
    from refinex.spark.registry import run_stage

    workdir, threshold = fast_trained["workdir"], fast_trained["train"]["threshold"]
    log = tmp_path / "loads.txt"
    config = fast_trained["config"].with_overrides({"refine.load_log": str(log), "refine.docs_per_partition": 5})
    stats = run_stage("refine", spark, config, workdir, model="models:/refinex-refiner/1")
    version = f"refinex-refiner/1+tag{threshold:g}"
    assert stats["origin_version"] == version and stats["tier"] == "fast" and stats["reads_structure"]
    assert stats["processed"] == 40 and stats["chunks"] == 40  # one chunk per page
    assert stats["invalid_chunks"] == stats["parse_errors"] == stats["ops_out_of_chunk"] == 0
    pids = log.read_text().split()
    assert len(pids) == len(set(pids)) == stats["model_loads"] == stats["worker_processes"] < stats["partitions"]

    # The stage's programs are the pure core's with the same model and the pages' structure.
    documents = {r["doc_id"]: r for r in read_table(spark, workdir, "documents").collect()}
    backend = load_backend("transformers", stats["checkpoint"])
    ids = sorted(documents)
    rows = refine_documents(backend, lambda text: len(text.split()), [(i, documents[i]["text"]) for i in ids],
                            20000, [documents[i]["html"] for i in ids])
    expected = spark.createDataFrame([(r["doc_id"], version, r["program"]) for r in rows],
                                     "doc_id string, origin_version string, program string")
    programs = read_table(spark, workdir, "programs").where(F.col("origin_version") == version)
    assert_df_equality(programs.select(*expected.columns), expected, ignore_row_order=True, ignore_nullable=True)
    assert all(not parse(r["program"]).errors for r in programs.collect())
    text_only = refine_documents(backend, lambda text: len(text.split()), [(i, documents[i]["text"]) for i in ids],
                                 20000)
    assert [r["program"] for r in text_only] != [r["program"] for r in rows]  # the structure is read

    run_stage("apply", spark, config, workdir, origin="model", origin_version=version)
    run_stage("stats", spark, config, workdir, origin="model", origin_version=version)
    scores = run_stage("evaluate", spark, config, workdir, origin="model", origin_version=version)
    assert scores["new_words"] == 0 and scores["documents"] == 40
    assert scores["snippet_f1"] > scores["raw_snippet_f1"] and scores["bow_f1"] > scores["raw_bow_f1"]


def test_soft_labels_need_the_consensus_members(
    spark: SparkSession, fast_trained: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> None:
    from refinex.spark.registry import run_stage
    from refinex.spark.train import NoSoftLabelsError

    workdir = str(tmp_path_factory.mktemp("refine-fast-hard") / "work")
    config = fast_trained["config"].with_overrides({"expert.name": "trafilatura"})
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        run_stage("ingest", spark, config, workdir, input=str(SAMPLE))
        run_stage("expert", spark, config, workdir)
        run_stage("distill", spark, config, workdir)
        run_stage("sft_pairs", spark, config, workdir)
        with pytest.raises(NoSoftLabelsError, match="expert consensus"):
            run_stage("train", spark, config, workdir)
        auto = run_stage("train", spark, config.with_overrides({"tag.labels": "auto", "tag.cv_folds": 0}), workdir)
    assert auto["tier"] == "fast" and auto["threshold_source"] == "default"
    from refinex.spark.refine import resolve_model
    from refinex.model.train import read_model_info

    checkpoint = resolve_model(config, workdir, auto["model_uri"]).checkpoint
    assert read_model_info(checkpoint)["fast"]["labels"] == "hard"  # auto: no member votes, hard labels
