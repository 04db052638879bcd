"""Staged rows of one stage run: Parquet under ``<workdir>/staging/<stage>/<run id>-<random>``.

A stage stages what must be computed exactly once and written to several tables: the
expert's answers (paid LLM calls), and the refine model's output where the platform refuses
to cache it (Databricks serverless), so that ``model_outputs`` and ``programs`` come from
one model pass even with sampled decoding. Each run gets its own folder (two runs on one
workdir never share one); nothing reads a folder after its run, and the run removes it.
"""
from __future__ import annotations

import logging
import shutil
import uuid
from typing import Any

from refinex.locations import driver_path, join, spark_location

log = logging.getLogger(__name__)

STAGING_ROOT = "staging"


def staging_path(workdir: str, stage: str, run_id: str) -> str:
    """This run's own staging folder (a run killed before its end leaves it; nothing reads it)."""
    return join(spark_location(workdir), STAGING_ROOT, stage, f"{run_id}-{uuid.uuid4().hex[:8]}")


def drop_staging(spark: Any, path: str, stage: str) -> None:
    """Remove the staged rows: on the driver's file system (local, FUSE: ``/Volumes`` on
    Databricks), else through the JVM's Hadoop file system; a Spark Connect session has no
    JVM here, so staged rows on an object store are left (a warning names them: nothing reads
    them again; a lifecycle rule on ``<workdir>/staging/`` removes them)."""
    from refinex.spark.session import is_connect

    local = driver_path(path)
    if local is not None:
        shutil.rmtree(local, ignore_errors=True)
        return
    if is_connect(spark):
        log.warning("%s: staged rows left in %s (a Spark Connect session cannot delete files on the "
                    "workdir's object store; nothing reads them again)", stage, path)
        return
    try:
        jvm = spark.sparkContext._jvm
        hadoop_path = jvm.org.apache.hadoop.fs.Path(path)
        hadoop_path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()).delete(hadoop_path, True)
    except Exception as exc:  # noqa: BLE001 - leftover staged rows are harmless
        log.warning("%s: staged rows left in %s (%s)", stage, path, str(exc).splitlines()[0] if str(exc) else exc)
