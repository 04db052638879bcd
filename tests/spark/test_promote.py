"""The promote stage against a real MLflow sqlite registry: it refuses a worse model (which
becomes @challenger), accepts a better one, and records every decision and a forced one."""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from pyspark.sql import SparkSession

from refinex.config import Config
from refinex.spark.tables import EVALUATIONS, TABLES, merge_into, record_stage_run

NAME = "refinex-refiner"


def _evaluation(version: int, f1: float, **extra: Any) -> dict[str, Any]:
    row = {f.name: None for f in TABLES[EVALUATIONS].schema.fields}
    row.update(run_id=f"eval-{version}", origin="model", origin_version=f"{NAME}/{version}", scope="all",
               new_words=0, invalid_share=0.0, snippet_recall=0.95, raw_snippet_recall=0.98, snippet_f1=f1,
               created_at=datetime.now(timezone.utc))
    row.update(extra)
    return row


@pytest.fixture()
def registry(spark: SparkSession, workdir: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{Path(workdir) / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model(NAME)
    for _ in range(4):
        client.create_model_version(NAME, source=str(Path(workdir) / "model"))
    rows = [_evaluation(1, 0.80), _evaluation(2, 0.70), _evaluation(3, 0.85),
            _evaluation(4, 0.99, new_words=3)]
    merge_into(spark, workdir, EVALUATIONS, spark.createDataFrame(rows, TABLES[EVALUATIONS].schema))
    now = datetime.now(timezone.utc)
    for version in (1, 2, 3, 4):  # each version's programs passed validate
        record_stage_run(spark, workdir, f"validate-{version}", "validate", now, now,
                         {"origin": "model", "origin_version": f"{NAME}/{version}"},
                         {"passed": True, "failed_expectations": []})
    return client


def _alias(client: Any, alias: str) -> str:
    return str(client.get_model_version_by_alias(NAME, alias).version)


def test_promotion_is_gated_on_evaluation(spark: SparkSession, spark_config: Config, workdir: str,
                                          registry: Any) -> None:
    from refinex.spark.promote import decision_tags
    from refinex.spark.registry import run_stage

    first = run_stage("promote", spark, spark_config, workdir, version=1)
    assert (first["decision"], first["previous_champion"], _alias(registry, "champion")) == ("champion", None, "1")

    worse = run_stage("promote", spark, spark_config, workdir, version=2)
    assert worse["decision"] == "challenger" and _alias(registry, "champion") == "1"
    assert _alias(registry, "challenger") == "2" and "champion version 1: 0.800" in worse["reason"]
    tags = decision_tags(registry, NAME, "2")
    assert tags["decision"] == "challenger" and tags["forced"] == "false" and tags["reason"] == worse["reason"]
    assert {g["name"]: g["passed"] for g in tags["gates"]}["beats_champion"] is False

    better = run_stage("promote", spark, spark_config, workdir, version=3)
    assert better["decision"] == "champion" and _alias(registry, "champion") == "3"
    assert better["previous_champion"] == "1" and decision_tags(registry, NAME, "3")["decision"] == "champion"

    new_words = run_stage("promote", spark, spark_config, workdir, version=4)
    assert new_words["decision"] == "challenger" and "3 new words" in new_words["reason"]

    # programs that failed their quality gates are never promoted by the gates
    now = datetime.now(timezone.utc)
    record_stage_run(spark, workdir, "validate-5", "validate", now, now,
                     {"origin": "model", "origin_version": f"{NAME}/4"},
                     {"passed": False, "failed": True, "failed_expectations": ["refined_documents.dropped_share"]})
    assert "failed the quality gates (refined_documents.dropped_share)" in run_stage(
        "promote", spark, spark_config, workdir, version=4)["reason"]

    forced = run_stage("promote", spark, spark_config, workdir, version=2, force=True, reason="rollback drill")
    assert forced["decision"] == "champion" and _alias(registry, "champion") == "2"
    assert _alias(registry, "challenger") == "4"
    tags = decision_tags(registry, NAME, "2")
    assert (tags["forced"], tags["force_reason"]) == ("true", "rollback drill")
    assert tags["reason"].startswith("forced: rollback drill (failed gates: beats_champion)")
    # a challenger that becomes champion is no longer the challenger
    run_stage("promote", spark, spark_config, workdir, version=4, force=True, reason="drill")
    assert set(registry.get_registered_model(NAME).aliases) == {"champion"} and _alias(registry, "champion") == "4"


def test_promote_without_a_registry_is_an_error(spark: SparkSession, spark_config: Config, workdir: str) -> None:
    from refinex.spark.promote import RegistryMissing
    from refinex.spark.registry import run_stage

    with pytest.raises(RegistryMissing, match="no MLflow registry at .*mlflow.db"):
        run_stage("promote", spark, spark_config, workdir, version=1)
    assert not (Path(workdir) / "mlflow.db").exists()
