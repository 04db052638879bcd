"""Which program versions a command works on: those the workdir's runs produced.

Every stage that reads programs or their results (apply, stats, export, validate, evaluate,
report, sql) names one ``(origin, origin_version)``. Explicit values win (a full version, or
its short label: ``refinex.versions``); otherwise the version comes from what was run here:
the latest ``apply`` run of that origin in ``stage_runs``, then the newest programs of that
origin, whichever expert or model made them. The configured expert's version is used only
when no programs exist at all (``apply`` then writes ``expert_failed`` / ``no_program``
rows). The choice is logged, so a user sees which version was picked.
"""
from __future__ import annotations

import json
import logging
from typing import Optional

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from refinex.config import Config
from refinex.spark.tables import (
    ORIGIN_DISTILLED,
    PROGRAMS,
    REFINED_DOCUMENTS,
    STAGE_RUNS,
    TableResolver,
    read_table,
    table_exists,
)
from refinex.versions import VersionError, resolve_version, version_label

log = logging.getLogger(__name__)

APPLY_STAGE = "apply"


class OriginError(LookupError):
    """No program origin could be determined."""


def latest_applied_origin(
    spark: SparkSession, tables: "TableResolver | str", origin: Optional[str] = None
) -> Optional[tuple[str, str]]:
    """``(origin, origin_version)`` of the most recent ``apply`` run (of ``origin``, if given)."""
    if not table_exists(spark, tables, STAGE_RUNS):
        return None
    rows = (
        read_table(spark, tables, STAGE_RUNS)
        .where(F.col("stage") == APPLY_STAGE)
        .orderBy(F.col("ended_at").desc(), F.col("run_id").desc())
        .select("params")
        .limit(200)
        .collect()
    )
    for row in rows:
        params = json.loads(row["params"])
        if "origin" in params and "origin_version" in params and origin in (None, params["origin"]):
            return str(params["origin"]), str(params["origin_version"])
    return None


def known_versions(spark: SparkSession, tables: "TableResolver | str", origin: str) -> list[str]:
    """Every version of ``origin`` with programs or applied documents."""
    versions: set[str] = set()
    for table in (PROGRAMS, REFINED_DOCUMENTS):
        if table_exists(spark, tables, table):
            rows = read_table(spark, tables, table).where(F.col("origin") == origin).select("origin_version").distinct()
            versions.update(str(r[0]) for r in rows.collect())
    return sorted(versions)


def newest_program_version(spark: SparkSession, tables: "TableResolver | str", origin: str) -> Optional[str]:
    """The version of ``origin`` whose programs were written last."""
    if not table_exists(spark, tables, PROGRAMS):
        return None
    row = (
        read_table(spark, tables, PROGRAMS)
        .where(F.col("origin") == origin)
        .groupBy("origin_version")
        .agg(F.max("created_at").alias("newest"))
        .orderBy(F.col("newest").desc(), F.col("origin_version").desc())
        .first()
    )
    return None if row is None else str(row["origin_version"])


def default_origin_version(spark: SparkSession, config: Config, tables: "TableResolver | str", origin: str) -> str:
    """The newest program version of ``origin``; without programs, for ``distilled``, the
    configured expert's current version (so that every document still gets a row)."""
    newest = newest_program_version(spark, tables, origin)
    if newest is not None:
        return newest
    if origin == ORIGIN_DISTILLED:
        from refinex.spark.expert import expert_version

        return f"{config.expert.name}:{expert_version(config.expert.name, config.expert.options)}"
    raise OriginError(f"no programs of origin {origin!r} in {tables}; run refine first, or pass --origin-version")


def resolve_origin(
    spark: SparkSession,
    config: Config,
    tables: "TableResolver | str",
    origin: Optional[str] = None,
    origin_version: Optional[str] = None,
    prefer_latest_apply: bool = False,
) -> tuple[str, str]:
    """The ``(origin, origin_version)`` to use (see the module docstring).

    ``origin_version`` may be a full version or a label (prefix) of a known one. Order:
    explicit values, then ``apply.origin_version`` of the configuration; then, with
    ``prefer_latest_apply`` (stages that read applied results), the latest ``apply`` run
    of the origin; finally the newest programs of the origin.
    """
    if origin_version is not None:
        chosen = origin or config.apply.origin
        return chosen, _full_version(spark, tables, chosen, origin_version)
    if origin is None and config.apply.origin_version is not None:
        return config.apply.origin, config.apply.origin_version
    if prefer_latest_apply:
        latest = latest_applied_origin(spark, tables, origin)
        if latest is not None:
            log.info("origin %s, version %s (%s): the latest apply run's", latest[0], version_label(latest[1]), latest[1])
            return latest
    chosen = origin or config.apply.origin
    version = default_origin_version(spark, config, tables, chosen)
    log.info("origin %s, version %s (%s): the newest programs", chosen, version_label(version), version)
    return chosen, version


def _full_version(spark: SparkSession, tables: "TableResolver | str", origin: str, wanted: str) -> str:
    known = known_versions(spark, tables, origin)
    if wanted in known or not known:
        return wanted
    try:
        return resolve_version(wanted, known)
    except VersionError as exc:
        if "@" in wanted:  # meant as a label: say so
            raise OriginError(f"origin {origin}: {exc}") from None
        return wanted  # a new full version (apply of programs written under it later)
