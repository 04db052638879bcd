"""A stage is a declaration; one envelope runs every stage.

A :class:`Stage` says what it is: its name, the tables it reads and writes, its parameters
(each a :class:`Param`, from which the CLI, the jobs and the bundle build their flags) and
one ``transform(ctx, **params) -> stats``. It receives one :class:`StageContext` (session,
configuration, table resolver, run id) instead of threading ``spark, config, workdir``.

:func:`execute` is the envelope, the only place that
- gives the run its id and times it;
- counts the rows each table gained or changed (every write goes through ``ctx.merge``);
- makes sure every declared output table exists afterwards (empty when nothing was written);
- writes the log line and the ``stage_runs`` row (its stats name the Spark session: the
  application id, or ``connect:<session id>`` on Spark Connect);
- logs the run's numeric statistics as MLflow metrics (``stages.mlflow``).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from pyspark.sql import DataFrame, SparkSession

from refinex.config import Config
from refinex.errors import StageFailed
from refinex.locations import driver_path
from refinex.spark.session import session_id
from refinex.spark.tables import (
    TABLES,
    TableResolver,
    ensure_table,
    merge_into,
    new_run_id,
    read_table,
    record_stage_run,
    resolver_for,
    table_exists,
    table_version,
)

log = logging.getLogger(__name__)

PARAM_KINDS = ("str", "int", "float", "bool", "list")


@dataclass(frozen=True)
class Param:
    """One parameter of a stage: the transform's keyword and the CLI's ``--flag``.

    ``kind`` is str, int, float, bool (a switch) or list (repeatable). ``configures`` marks
    parameters that shape the configuration before the stage runs (the ``--expert*`` flags)
    rather than reaching the transform.
    """

    name: str
    help: str
    kind: str = "str"
    default: Any = None
    required: bool = False
    minimum: Optional[int] = None
    short: Optional[str] = None
    configures: bool = False

    def __post_init__(self) -> None:
        if self.kind not in PARAM_KINDS:
            raise ValueError(f"param {self.name}: kind must be one of {PARAM_KINDS}")

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


Transform = Callable[..., dict[str, Any]]
Configure = Callable[[Config, Mapping[str, Any]], Config]


@dataclass(frozen=True)
class Stage:
    """A stage's declaration (see the module docstring).

    ``resources`` is ``cpu`` or ``gpu`` (the bundle puts gpu stages on the GPU cluster);
    ``describe`` turns the statistics into the log line; ``configure`` applies the
    ``configures`` parameters to the configuration; ``check`` validates the parameters
    before Spark starts (a missing input file: one line, not a Java trace 25 s later).
    """

    name: str
    help: str
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    transform: Transform
    params: tuple[Param, ...] = ()
    resources: str = "cpu"
    describe: Optional[Callable[[Mapping[str, Any]], str]] = None
    configure: Optional[Configure] = None
    check: Optional[Callable[[Mapping[str, Any]], None]] = None

    def __post_init__(self) -> None:
        unknown = [t for t in (*self.reads, *self.writes) if t not in TABLES]
        if unknown:
            raise ValueError(f"stage {self.name}: unknown table(s) {unknown}")
        if self.resources not in ("cpu", "gpu"):
            raise ValueError(f"stage {self.name}: resources must be cpu or gpu")

    @property
    def command(self) -> str:
        """The CLI sub-command (``sft_pairs`` -> ``sft-pairs``)."""
        return self.name.replace("_", "-")

    def param(self, name: str) -> Param:
        for param in self.params:
            if param.name == name:
                return param
        raise KeyError(f"stage {self.name} has no parameter {name!r}")

    def bind(self, values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(transform keywords, configuring values), defaults filled; unknown names are errors."""
        known = {p.name: p for p in self.params}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise TypeError(f"stage {self.name}: unknown parameter(s) {', '.join(unknown)}")
        kwargs: dict[str, Any] = {}
        configuring: dict[str, Any] = {}
        for param in self.params:
            value = values.get(param.name, param.default)
            if param.required and (value is None or value == []):
                raise ValueError(f"{self.name} needs {param.flag}")
            (configuring if param.configures else kwargs)[param.name] = value
        return kwargs, configuring

    def configured(self, config: Config, configuring: Mapping[str, Any]) -> Config:
        """``config`` with the configuring parameters applied (unchanged without any)."""
        if self.configure is None or all(v is None for v in configuring.values()):
            return config
        return self.configure(config, configuring)


@dataclass
class StageContext:
    """What a transform works with: session, configuration, tables, run id and workdir.

    Reads and writes go through it so the envelope can count them; ``record`` adds values
    to the ``stage_runs`` params (e.g. an origin version the stage resolved itself).
    """

    spark: SparkSession
    config: Config
    tables: TableResolver
    workdir: str
    run_id: str
    rows: dict[str, dict[str, int]] = field(default_factory=dict)
    recorded: dict[str, Any] = field(default_factory=dict)

    def read(self, table: str, version: Optional[int] = None) -> DataFrame:
        return read_table(self.spark, self.tables, table, version)

    def exists(self, table: str) -> bool:
        return table_exists(self.spark, self.tables, table)

    def version(self, table: str) -> int:
        return table_version(self.spark, self.tables, table)

    def merge(self, table: str, df: DataFrame, **options: Any) -> dict[str, int]:
        """``merge_into`` (content-aware idempotent MERGE), counted for the envelope."""
        counts = merge_into(self.spark, self.tables, table, df, **options)
        total = self.rows.setdefault(table, {})
        for key, value in counts.items():
            total[key] = total.get(key, 0) + value
        return counts

    def record(self, **params: Any) -> None:
        self.recorded.update(params)

    @property
    def driver_dir(self) -> Optional[Path]:
        """The workdir as a folder on the driver (FUSE path on Databricks), None on object stores."""
        return driver_path(self.workdir)

    def with_run_id(self, run_id: str) -> "StageContext":
        return StageContext(self.spark, self.config, self.tables, self.workdir, run_id)


def context(
    spark: SparkSession,
    config: Config,
    workdir: str,
    run_id: Optional[str] = None,
    tables: Optional[TableResolver] = None,
) -> StageContext:
    """A context over ``workdir`` with the configuration's table resolver."""
    return StageContext(spark, config, tables or resolver_for(config, workdir), workdir, run_id or new_run_id())


def flat_metrics(stats: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric leaves of the statistics (nested keys joined with ``.``); bools as 0/1."""
    out: dict[str, float] = {}
    for key, value in stats.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            out[name] = float(value)
        elif isinstance(value, (int, float)):
            out[name] = float(value)
        elif isinstance(value, Mapping):
            out.update(flat_metrics(value, f"{name}."))
    return {k: v for k, v in out.items() if v == v and abs(v) != float("inf")}


def _log_mlflow(ctx: StageContext, stage: Stage, params: Mapping[str, Any], stats: Mapping[str, Any]) -> Optional[str]:
    if not ctx.config.stages.mlflow:
        return None
    from refinex.tracking.expert_runs import log_expert_run

    try:
        return log_expert_run(
            {k: v for k, v in params.items() if v is not None}, flat_metrics(stats),
            workdir=ctx.workdir, tracking_uri=ctx.config.model.tracking_uri,
            experiment=ctx.config.stages.mlflow_experiment, run_name=f"{stage.name} {ctx.run_id}",
            tags={"refinex.stage": stage.name, "refinex.run_id": ctx.run_id},
        )
    except Exception as exc:  # noqa: BLE001 - tracking must never fail a finished stage
        log.warning("%s: could not log the run to MLflow: %s", stage.name, str(exc).splitlines()[0])
        return None


def _default_describe(stats: Mapping[str, Any]) -> str:
    shown = [f"{k} {v}" for k, v in stats.items() if isinstance(v, int) and not isinstance(v, bool)][:6]
    return ", ".join(shown)


def execute(stage: Stage, ctx: StageContext, **params: Any) -> dict[str, Any]:
    """Run one stage inside the envelope (see the module docstring); returns its statistics."""
    kwargs, configuring = stage.bind(params)
    # A context of its own: row counts and recorded values are this stage's alone.
    ctx = StageContext(ctx.spark, stage.configured(ctx.config, configuring), ctx.tables, ctx.workdir, ctx.run_id)
    started = datetime.now(timezone.utc)
    clock = time.perf_counter()
    failure: Optional[StageFailed] = None
    try:
        stats = dict(stage.transform(ctx, **kwargs))
    except StageFailed as exc:
        failure = exc
        stats = {**exc.stats, "failed": True}
    for table in stage.writes:
        ensure_table(ctx.spark, ctx.tables, table)
    rows = {table: dict(ctx.rows.get(table, {"inserted": 0, "updated": 0})) for table in stage.writes}
    primary = rows.get(stage.writes[0], {}) if stage.writes else {}
    stats.setdefault("rows_inserted", int(primary.get("inserted", 0)))
    stats.setdefault("rows_updated", int(primary.get("updated", 0)))
    stats = {"run_id": ctx.run_id, **stats, "rows": rows, "seconds": round(time.perf_counter() - clock, 3),
             "spark_session": session_id(ctx.spark)}
    recorded = {**{k: v for k, v in kwargs.items()}, **configuring, **ctx.recorded}
    record_stage_run(ctx.spark, ctx.tables, ctx.run_id, stage.name, started, datetime.now(timezone.utc),
                     recorded, stats)
    mlflow_run = _log_mlflow(ctx, stage, recorded, stats)
    if mlflow_run:
        stats["stage_mlflow_run_id"] = mlflow_run
    if failure is not None:
        log.error("%s failed (%.1fs)", stage.name, stats["seconds"])
        failure.stats = stats
        raise failure
    describe = stage.describe or _default_describe
    log.info("%s: %s (%.1fs)", stage.name, describe(stats), stats["seconds"])
    return stats
