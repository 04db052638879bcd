"""The Spark session factory: local sessions with Delta, the cluster's own, or Spark Connect.

``get_spark(config, workdir)`` builds a local session (``spark.delta: local``) with Delta's
SQL extension and catalog, Delta's jars from ``refinex.spark.jars``, Arrow for the pandas
UDFs and everything Spark writes by itself (warehouse, Derby, scratch space) under
``<workdir>/spark/``. With ``spark.delta: cluster`` (Databricks, Dataproc) it returns the
active session, or the builder's, and only sets runtime SQL options on it: no jar logic.
With a Spark Connect URL (``spark.remote``, else ``$SPARK_REMOTE``: Databricks serverless
and standard access mode, a local Connect server) it connects to that server instead; the
server brings Delta. A session already active in the process is reused as it is in every
case (static options such as the warehouse folder stay those it was built with).

Stages use only what both kinds of session have: the DataFrame and SQL APIs, Delta through
SQL; :func:`is_connect` tells the few places (logging, file clean-up) that differ.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

from pyspark.sql import DataFrame, SparkSession

from refinex.config import DELTA_CLUSTER, Config
from refinex.locations import is_local, local_path
from refinex.spark.jars import ensure_delta_jars, ivy_home

log = logging.getLogger(__name__)

DELTA_EXTENSION = "io.delta.sql.DeltaSparkSessionExtension"
DELTA_CATALOG = "org.apache.spark.sql.delta.catalog.DeltaCatalog"
MATERIALIZE_MERGE_SOURCE = "spark.databricks.delta.merge.materializeSource"
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def runtime_conf(config: Config) -> dict[str, str]:
    """SQL options refinex sets on every session (runtime-settable ones only)."""
    conf = {
        "spark.sql.shuffle.partitions": str(config.spark.partitions),
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.execution.arrow.maxRecordsPerBatch": str(config.spark.arrow_max_records_per_batch),
        "spark.sql.session.timeZone": "UTC",
        # Every MERGE source is materialized once before Delta's two passes over it: model
        # output (a Python UDF) evaluated twice may differ, and Delta documents a source that
        # changes between its scans as a cause of wrong merge results.
        MATERIALIZE_MERGE_SOURCE: "all",
    }
    return conf


def remote_url(config: Config) -> Optional[str]:
    """The Spark Connect URL: ``spark.remote``, else ``$SPARK_REMOTE``, else none."""
    return config.spark.remote or os.environ.get("SPARK_REMOTE") or None


def is_connect(spark: object) -> bool:
    """Whether ``spark`` is a Spark Connect session (no ``sparkContext``, no JVM handle)."""
    return type(spark).__module__.startswith("pyspark.sql.connect")


def persist_or_recompute(df: DataFrame, what: str) -> tuple[DataFrame, bool]:
    """``df`` cached (memory and disk) where the platform allows it, else ``df`` itself:
    Databricks serverless refuses ``persist``. Ingest's parsed input and the gates' frames are
    deterministic, so recomputing them is correct, only slower; refine stages its model
    output instead (``refinex.spark.staging``). Returns the frame and whether it is cached."""
    from pyspark import StorageLevel

    try:
        return df.persist(StorageLevel.MEMORY_AND_DISK), True
    except Exception as exc:  # noqa: BLE001 - recompute instead
        log.warning("cannot persist %s (%s); it will be recomputed", what, str(exc).splitlines()[0] if str(exc) else exc)
        return df, False


def session_id(spark: object) -> str:
    """A key of this session: the application id (classic) or the Connect session id."""
    if is_connect(spark):
        return f"connect:{getattr(spark, 'session_id')}"
    return str(spark.sparkContext.applicationId)  # type: ignore[attr-defined]


def get_spark(config: Config, workdir: Optional[str] = None) -> SparkSession:
    """The session for this configuration (see the module docstring)."""
    remote = remote_url(config)
    if remote:
        return _connect_session(config, remote)
    if config.spark.delta == DELTA_CLUSTER:
        return _cluster_session(config)
    return _local_session(config, workdir)


def _connect_session(config: Config, remote: str) -> SparkSession:
    """A Spark Connect session to ``remote`` with refinex's runtime options."""
    active = SparkSession.getActiveSession()
    spark = active if active is not None and is_connect(active) else (
        SparkSession.builder.remote(remote).appName(config.spark.app_name).getOrCreate())
    sql_options = {k: v for k, v in config.spark.conf.items() if k.startswith("spark.sql.")}
    _set_runtime(spark, {**runtime_conf(config), **sql_options})
    return spark


def _cluster_session(config: Config) -> SparkSession:
    spark = SparkSession.getActiveSession()
    if spark is None:
        builder = SparkSession.builder.appName(config.spark.app_name)
        if config.spark.master:
            builder = builder.master(config.spark.master)
        spark = builder.getOrCreate()
    _set_runtime(spark, {**runtime_conf(config), **config.spark.conf})
    return spark


def _set_runtime(spark: SparkSession, conf: dict[str, str]) -> None:
    for key, value in conf.items():
        try:
            spark.conf.set(key, value)
        except Exception as exc:  # noqa: BLE001 - some platforms forbid setting some options
            log.warning("could not set %s=%s on this session: %s", key, value, str(exc).splitlines()[0])


def _prepare_local_env() -> None:
    """Environment the local JVM and its Python workers inherit."""
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    # Python workers must import the same refinex as the driver, installed or not.
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if _PACKAGE_ROOT not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([_PACKAGE_ROOT, *paths])


def local_driver_memory() -> str:
    """The local JVM's heap: a quarter of this machine's memory, 1-16 GiB. In local mode the
    driver JVM is also the only executor, and Spark's default heap (1 GiB) ran out on 10,000
    real pages; ``spark.conf`` ``spark.driver.memory`` overrides it."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):  # not POSIX: Spark's default
        return "1g"
    return f"{min(16 * 1024, max(1024, total // 4 // 2**20))}m"


def _local_session(config: Config, workdir: Optional[str]) -> SparkSession:
    active = SparkSession.getActiveSession()
    if active is not None:
        _set_runtime(active, {**runtime_conf(config), **config.spark.conf})
        return active
    _prepare_local_env()
    sc = config.spark
    builder = SparkSession.builder.master(sc.master or "local[*]").appName(sc.app_name)
    conf: dict[str, str] = {
        "spark.sql.extensions": DELTA_EXTENSION,
        "spark.sql.catalog.spark_catalog": DELTA_CATALOG,
        "spark.ui.enabled": "true" if sc.ui_enabled else "false",
        "spark.ui.showConsoleProgress": "true" if sc.console_progress else "false",
        "spark.driver.host": os.environ["SPARK_LOCAL_IP"],
        "spark.driver.bindAddress": os.environ["SPARK_LOCAL_IP"],
        # Delta reads its log with this many tasks (default 50: far too many on one machine).
        "spark.databricks.delta.snapshotPartitions": str(sc.partitions),
        "spark.driver.memory": local_driver_memory(),
        **runtime_conf(config),
    }
    # With the quick compiler only, the JVM reserves a 48 MB code cache, which a long run
    # (10,000 pages through every stage) fills, and then stops compiling: reserve more.
    java_options = ["-XX:TieredStopAtLevel=1", "-XX:ReservedCodeCacheSize=256m"] if sc.quick_jit else []
    if workdir is not None and is_local(workdir):
        spark_dir = local_path(workdir) / "spark"
        for sub in ("warehouse", "derby", "local"):
            (spark_dir / sub).mkdir(parents=True, exist_ok=True)
        conf["spark.sql.warehouse.dir"] = str(spark_dir / "warehouse")
        # Scratch space (shuffle, spills); the variable wins over spark.local.dir anyway.
        os.environ.setdefault("SPARK_LOCAL_DIRS", str(spark_dir / "local"))
        java_options.append(f"-Dderby.system.home={spark_dir / 'derby'}")
    if java_options:
        conf["spark.driver.extraJavaOptions"] = " ".join(java_options)
    if sc.jar_resolver == "spark":
        from delta import configure_spark_with_delta_pip

        builder = configure_spark_with_delta_pip(builder)
        conf["spark.jars.ivy"] = str(ivy_home())
    else:
        jars = ensure_delta_jars(sc.jar_resolver, spark_conf=sc.conf)
        log.info("Delta %s jars (%s) from %s", jars.version, jars.resolver, jars.directory)
        conf["spark.jars"] = jars.spark_jars
    conf.update(sc.conf)
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(sc.log_level)  # a local session is always classic
    return spark
