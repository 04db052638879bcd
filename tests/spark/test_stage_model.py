"""The stage model: declarations, the one envelope, the registry's order and the table resolver."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from refinex.config import Config
from refinex.spark.registry import (
    PIPELINE_STEPS,
    REGISTERED_MODEL,
    STAGES,
    Step,
    check_order,
    dependencies,
    pipeline_steps,
    run_stage,
)
from refinex.spark.stage import Param, Stage, StageContext, context, execute, flat_metrics
from refinex.spark.tables import (
    DOCUMENTS,
    QUARANTINE,
    STAGE_RUNS,
    TABLES,
    TableResolver,
    read_table,
    register_tables,
    table_exists,
)

REPO = Path(__file__).resolve().parents[2]


def test_every_stage_declares_known_tables_and_flags() -> None:
    assert set(STAGES) == {"ingest", "expert", "distill", "apply", "stats", "validate", "evaluate", "report", "export",
                           "sft_pairs", "train", "refine", "promote"}
    for stage in STAGES.values():
        assert set(stage.reads) <= set(TABLES) and set(stage.writes) <= set(TABLES)
        flags = [p.flag for p in stage.params]
        assert len(flags) == len(set(flags)), stage.name
    assert STAGES["refine"].resources == STAGES["train"].resources == "gpu"


def test_dependencies_follow_the_declared_tables() -> None:
    graph = dependencies()
    assert graph["ingest"] == ()
    assert graph["expert"] == ("ingest",)
    assert set(graph["distill"]) == {"ingest", "expert"}
    assert set(graph["apply"]) == {"ingest", "expert", "distill"}
    assert set(graph["stats"]) == {"ingest", "apply"}
    assert "train" in graph["refine"]  # through the registered model
    assert set(graph["apply_model"]) == {"ingest", "expert", "refine"}
    assert set(graph["stats_model"]) == {"ingest", "apply_model"}
    assert {"stats", "apply"} <= set(graph["validate"]) and {"stats", "apply"} <= set(graph["evaluate"])
    assert {"stats_model", "apply_model"} <= set(graph["validate_model"])
    assert set(graph["promote"]) == {"train", "evaluate_model", "validate_model"}
    assert [s.key for s in PIPELINE_STEPS] == list(graph)


def test_an_order_that_reads_before_writing_is_refused() -> None:
    check_order(PIPELINE_STEPS)
    check_order(pipeline_steps(train=False), external=(REGISTERED_MODEL,))
    with pytest.raises(ValueError, match="apply .*reads programs"):
        check_order([Step("ingest", "ingest"), Step("expert", "expert"), Step("apply", "apply")])
    with pytest.raises(ValueError, match="registered_model"):
        check_order(pipeline_steps(train=False))
    with pytest.raises(ValueError, match="duplicate"):
        check_order([Step("ingest", "ingest"), Step("ingest", "ingest")])


def test_no_stage_module_repeats_the_envelope() -> None:
    """Only the envelope (and the pipeline's own row) write stage_runs or make run ids."""
    for path in sorted((REPO / "refinex" / "spark").glob("*.py")):
        text = path.read_text(encoding="utf-8")
        if path.name in ("stage.py", "tables.py", "pipeline.py"):
            continue
        assert "record_stage_run(" not in text, path.name
        assert "new_run_id()" not in text, path.name
        assert not re.search(r"merge_into\(spark", text), f"{path.name} writes around ctx.merge"


def test_jobs_are_thin() -> None:
    for path in (REPO / "jobs").glob("*.py"):
        code = [l for l in path.read_text().splitlines() if l.strip() and not l.lstrip().startswith("#")]
        assert "from refinex.cli import main" in path.read_text()
        assert len(code) < 15, path.name


def _echo_transform(ctx: StageContext, rows: int = 2, fail: bool = False) -> dict[str, Any]:
    if fail:
        raise RuntimeError("boom")
    schema = TABLES[QUARANTINE].schema
    data = [(f"in-{i}.jsonl", i, None, "{}", "malformed_json", "test row", "echo", None) for i in range(rows)]
    counts = ctx.merge(QUARANTINE, ctx.spark.createDataFrame(data, schema))
    ctx.record(resolved="yes")
    return {"rows_written": counts["inserted"], "by_kind": {"a": 1, "b": 2}, "flag": True, "name": "x"}


ECHO = Stage(
    name="echo",
    help="test stage",
    reads=(),
    writes=(QUARANTINE, DOCUMENTS),
    transform=_echo_transform,
    params=(Param("rows", "rows to write", kind="int", default=2), Param("fail", "raise", kind="bool", default=False)),
)


def test_the_envelope_records_counts_tables_and_the_run(spark: SparkSession, spark_config: Config,
                                                        tmp_path: Path) -> None:
    workdir = str(tmp_path)
    stats = execute(ECHO, context(spark, spark_config, workdir, "run-echo"), rows=3)
    assert stats["run_id"] == "run-echo" and stats["rows_written"] == 3
    assert stats["rows"] == {QUARANTINE: {"inserted": 3, "updated": 0}, DOCUMENTS: {"inserted": 0, "updated": 0}}
    assert (stats["rows_inserted"], stats["rows_updated"]) == (3, 0) and stats["seconds"] >= 0
    # every declared output exists afterwards, empty when nothing was written
    assert table_exists(spark, workdir, DOCUMENTS) and read_table(spark, workdir, DOCUMENTS).count() == 0
    row = read_table(spark, workdir, STAGE_RUNS).where(F.col("stage") == "echo").first()
    assert row is not None and row["run_id"] == "run-echo"
    assert json.loads(row["params"]) == {"rows": 3, "fail": False, "resolved": "yes"}
    assert json.loads(row["stats"])["rows_written"] == 3
    shared = context(spark, spark_config, workdir, "run-echo-2")
    again = execute(ECHO, shared, rows=3)
    assert again["rows"][QUARANTINE] == {"inserted": 0, "updated": 0}  # the MERGE is idempotent
    more = execute(ECHO, shared, rows=5)  # the same context: counts are the stage's own
    assert more["rows"][QUARANTINE] == {"inserted": 2, "updated": 0}
    with pytest.raises(TypeError, match="unknown parameter"):
        execute(ECHO, context(spark, spark_config, workdir), colour="red")
    with pytest.raises(RuntimeError, match="boom"):
        execute(ECHO, context(spark, spark_config, workdir, "run-fail"), fail=True)
    assert read_table(spark, workdir, STAGE_RUNS).where(F.col("run_id") == "run-fail").count() == 0


def test_the_envelope_logs_stage_metrics_to_mlflow(spark: SparkSession, spark_config: Config, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    config = spark_config.with_overrides({"stages.mlflow": True})
    stats = execute(ECHO, context(spark, config, str(tmp_path), "run-ml"))
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(stats["stage_mlflow_run_id"])
    assert run.data.metrics["rows_written"] == 2 and run.data.metrics["by_kind.b"] == 2
    assert run.data.tags["refinex.stage"] == "echo" and run.data.tags["refinex.run_id"] == "run-ml"
    assert flat_metrics({"a": {"b": 1.5}, "ok": False, "s": "text", "n": float("nan")}) == {"a.b": 1.5, "ok": 0.0}


def test_path_tables_are_registered_for_sql(spark: SparkSession, spark_config: Config, tmp_path: Path) -> None:
    first, second = tmp_path / "one", tmp_path / "two"
    for workdir, rows in ((first, 1), (second, 4)):
        execute(ECHO, context(spark, spark_config, str(workdir)), rows=rows)
    # the names follow the session's latest workdir
    assert spark.sql("SELECT count(*) AS n FROM refinex.quarantine").first()["n"] == 4
    names = register_tables(spark, str(first))
    assert "refinex.quarantine" in names and "refinex.stage_runs" in names
    assert spark.sql("SELECT count(*) AS n FROM refinex.quarantine").first()["n"] == 1
    assert spark.sql("SELECT count(*) AS n FROM refinex.documents").first()["n"] == 0


def test_catalog_tables(spark: SparkSession, spark_config: Config, tmp_path: Path) -> None:
    resolver = TableResolver(workdir=str(tmp_path), catalog="spark_catalog", schema="refinex_catalog_test")
    assert resolver.kind == "catalog" and resolver.location(DOCUMENTS) is None
    assert resolver.display_name(DOCUMENTS) == "spark_catalog.refinex_catalog_test.documents"
    ctx = StageContext(spark, spark_config, resolver, str(tmp_path), "run-cat")
    stats = execute(ECHO, ctx, rows=2)
    assert stats["rows"][QUARANTINE]["inserted"] == 2
    assert spark.sql("SELECT count(*) AS n FROM spark_catalog.refinex_catalog_test.quarantine").first()["n"] == 2
    assert spark.sql("SELECT count(*) AS n FROM spark_catalog.refinex_catalog_test.stage_runs").first()["n"] == 1
    assert not (tmp_path / "delta").exists()
    # the configuration chooses the kind
    config = spark_config.with_overrides({"tables.catalog": "main", "tables.schema": "corpus"})
    assert context(spark, config, str(tmp_path)).tables.display_name("edit_stats") == "main.corpus.edit_stats"


def test_a_clean_ingest_still_has_a_quarantine_table(spark: SparkSession, spark_config: Config,
                                                     tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": "a", "text": "hello world"}\n', encoding="utf-8")
    stats = run_stage("ingest", spark, spark_config, str(tmp_path / "wd"), input=str(path))
    assert stats["quarantined"] == 0 and stats["rows"][QUARANTINE] == {"inserted": 0, "updated": 0}
    assert spark.sql("SELECT count(*) AS n FROM refinex.quarantine").first()["n"] == 0


def test_merge_matches_nullable_keys_null_safely(spark: SparkSession, workdir: str) -> None:
    """A retried validate writes its table-level gate_failures rows (doc_id null) once."""
    from datetime import datetime, timezone

    from refinex.spark.tables import GATE_FAILURES, merge_into

    row = ("run-1", "refined_documents", "distilled", "v1", "row_count", None, "error", "39", "40",
           datetime.now(timezone.utc))
    frame = spark.createDataFrame([row], TABLES[GATE_FAILURES].schema)
    merge_into(spark, workdir, GATE_FAILURES, frame)
    again = merge_into(spark, workdir, GATE_FAILURES, frame)
    assert again == {"inserted": 0, "updated": 0}
    assert read_table(spark, workdir, GATE_FAILURES).count() == 1


def test_merge_sources_are_materialized_before_delta_scans_them(spark: SparkSession, spark_config: Config) -> None:
    """Model output computed twice may differ: Delta must materialize every MERGE source
    once (a source that changes between Delta's two scans gives wrong merge results)."""
    from refinex.spark.session import MATERIALIZE_MERGE_SOURCE, runtime_conf

    assert runtime_conf(spark_config)[MATERIALIZE_MERGE_SOURCE] == "all"
    assert spark.conf.get(MATERIALIZE_MERGE_SOURCE) == "all"
