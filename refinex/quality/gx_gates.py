"""Run the quality gates as Great Expectations suites over Spark DataFrames.

One ephemeral GX context per call (nothing is read from or written to a GX project): a
Spark data source, one DataFrame asset with a whole-DataFrame batch definition and one
suite per table, one validation definition per suite. Each :class:`~refinex.quality.checks.Gate`
becomes one expectation (tagged with the gate's key in its ``meta``); each GX result becomes a
:class:`~refinex.quality.checks.GateResult` with the offending doc ids GX returns
(``unexpected_index_list`` on ``doc_id``, at most ``cap`` per expectation). For share gates,
judged by the mean of a 0/1 column, the offending rows are those with a 1.

Results are asked for in GX's SUMMARY format, so no more than ``cap`` offending rows ever
reach the driver however large the table. With ``data_docs_dir`` the Data Docs HTML site of
the run is built there.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from refinex.quality.checks import (
    ALL_TRUE,
    AT_MOST_COLUMN,
    BETWEEN,
    ERROR,
    IN_SET,
    NOT_NULL,
    OFFENDING_ROWS_CAP,
    ROW_COUNT,
    SHARE_AT_MOST,
    UNIQUE,
    Gate,
    GateResult,
    Offender,
    share_observed,
)
from refinex.spark.session import persist_or_recompute

log = logging.getLogger(__name__)
# GX logs its context set-up at INFO (data sources loaded, stores created): noise in a stage's
# log, so it is quiet unless someone chose a level for it.
if logging.getLogger("great_expectations").level == logging.NOTSET:
    logging.getLogger("great_expectations").setLevel(logging.WARNING)

DATA_SOURCE = "refinex"
DOCS_SITE = "refinex"
GATE_META = "refinex_gate"
INDEX_COLUMN = "doc_id"


@dataclass
class GxRun:
    """The outcome of one call: gate results (in the order of the gates given), GX's
    validation result of each table as a JSON dict, and the Data Docs index (if built)."""

    results: list[GateResult]
    validations: dict[str, dict[str, Any]] = field(default_factory=dict)
    data_docs: Optional[Path] = None

    def to_json(self) -> str:
        return json.dumps(self.validations, indent=1, sort_keys=True, default=str, ensure_ascii=False)


def expectation(gate: Gate) -> Any:
    """The GX expectation that checks ``gate``."""
    import great_expectations.expectations as gxe

    common: dict[str, Any] = {
        "meta": {GATE_META: gate.key},
        "severity": "critical" if gate.severity == ERROR else "warning",
        "description": f"{gate.name}: {gate.description} ({gate.threshold})",
    }
    if gate.kind == NOT_NULL:
        return gxe.ExpectColumnValuesToNotBeNull(column=gate.column, **common)
    if gate.kind == UNIQUE:
        return gxe.ExpectCompoundColumnsToBeUnique(column_list=list(gate.columns), **common)
    if gate.kind == IN_SET:
        return gxe.ExpectColumnValuesToBeInSet(column=gate.column, value_set=list(gate.values), **common)
    if gate.kind == ALL_TRUE:
        return gxe.ExpectColumnValuesToBeInSet(column=gate.column, value_set=[True], **common)
    if gate.kind == BETWEEN:
        return gxe.ExpectColumnValuesToBeBetween(column=gate.column, min_value=gate.minimum,
                                                 max_value=gate.maximum, **common)
    if gate.kind == ROW_COUNT:
        return gxe.ExpectTableRowCountToEqual(value=gate.expected, **common)
    if gate.kind == AT_MOST_COLUMN:
        smaller, larger = gate.columns
        return gxe.ExpectColumnPairValuesAToBeGreaterThanB(
            column_A=larger, column_B=smaller, or_equal=True, ignore_row_if="either_value_is_missing", **common)
    if gate.kind == SHARE_AT_MOST:
        return gxe.ExpectColumnMeanToBeBetween(column=gate.column, min_value=0.0, max_value=gate.maximum, **common)
    raise ValueError(f"gate {gate.key}: no expectation for kind {gate.kind!r}")


def _context(data_docs_dir: Optional[Path]) -> Any:
    """An in-memory GX context without analytics or progress bars; with a Data Docs site
    in ``data_docs_dir`` (emptied first: the site shows this run only)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    context = gx.get_context(mode="ephemeral", project_config=config)
    if data_docs_dir is not None:
        if data_docs_dir.exists():
            shutil.rmtree(data_docs_dir)
        context.add_data_docs_site(DOCS_SITE, {
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(data_docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        })
    return context


def run_gates(
    frames: Mapping[str, DataFrame],
    gates: Sequence[Gate],
    run_name: str,
    cap: int = OFFENDING_ROWS_CAP,
    data_docs_dir: Optional[Path] = None,
) -> GxRun:
    """Validate each table's DataFrame in ``frames`` against its gates (gates of tables
    not in ``frames`` are not evaluated). ``run_name`` names the GX run (the stage's run id)."""
    from great_expectations.core.run_identifier import RunIdentifier

    context = _context(data_docs_dir)
    source = context.data_sources.add_spark(DATA_SOURCE)
    run_id = RunIdentifier(run_name=run_name, run_time=datetime.now(timezone.utc))
    by_key: dict[str, GateResult] = {}
    validations: dict[str, dict[str, Any]] = {}
    for table, frame in frames.items():
        table_gates = [g for g in gates if g.table == table]
        if table_gates:
            results, validations[table] = _validate_table(context, source, table, frame, table_gates, run_id, cap)
            by_key.update((r.gate.key, r) for r in results)
    index = None
    if data_docs_dir is not None:
        context.build_data_docs(site_names=[DOCS_SITE])
        index = data_docs_dir / "index.html"
    return GxRun([by_key[g.key] for g in gates if g.key in by_key], validations, index)


def _validate_table(
    context: Any, source: Any, table: str, frame: DataFrame, gates: Sequence[Gate], run_id: Any, cap: int,
) -> tuple[list[GateResult], dict[str, Any]]:
    """One table's suite run over its (cached) frame: gate results and GX's result as JSON."""
    import great_expectations as gx

    batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe(f"{table} whole")
    suite = context.suites.add(gx.ExpectationSuite(name=table))
    for gate in gates:
        suite.add_expectation(expectation(gate))
    if len(suite.expectations) != len(gates):  # GX keeps one of expectations it deems equal
        raise ValueError(f"{table}: two gates check the same thing; every gate needs its own expectation")
    definition = context.validation_definitions.add(gx.ValidationDefinition(data=batch, suite=suite, name=table))
    result_format = {
        "result_format": "SUMMARY",  # counts, and at most `cap` offending rows collected
        "unexpected_index_column_names": [INDEX_COLUMN],
        "partial_unexpected_count": max(1, int(cap)),
        "return_unexpected_index_query": False,
    }
    frame, cached = persist_or_recompute(frame, "a validated frame")
    try:
        validation = definition.run(batch_parameters={"dataframe": frame}, result_format=result_format,
                                    run_id=run_id)
        gate_of = {g.key: g for g in gates}
        rows = _row_count(validation.results, frame)
        results = [_gate_result(gate_of[o.expectation_config.meta[GATE_META]], o, frame, rows, cap)
                   for o in validation.results]
    finally:
        if cached:
            frame.unpersist()
    return results, validation.to_json_dict()


def _row_count(outcomes: Sequence[Any], frame: DataFrame) -> int:
    """The rows of the validated frame: GX counted them for every row-level expectation
    (``element_count``); counted here only for a suite without one."""
    for outcome in outcomes:
        counted = (outcome.result or {}).get("element_count")
        if counted is not None:
            return int(counted)
    return frame.count()


def _gate_result(gate: Gate, outcome: Any, frame: DataFrame, rows: int, cap: int) -> GateResult:
    """One GX expectation result as a gate result (offending rows included)."""
    info = outcome.exception_info or {}
    if info.get("raised_exception"):
        message = str(info.get("exception_message") or "unknown error").splitlines()[0]
        return GateResult(gate, False, f"not evaluated: {message}", None)
    passed = bool(outcome.success)
    result = outcome.result or {}
    if gate.kind == ROW_COUNT:
        count = int(result.get("observed_value") or 0)
        offenders = () if passed else (Offender(None, str(count)),)
        return GateResult(gate, passed, f"{count} rows", float(count), abs(count - int(gate.expected or 0)),
                          offenders)
    if gate.kind == SHARE_AT_MOST:
        return _share_result(gate, passed, result.get("observed_value"), frame, rows, cap)
    unexpected = int(result.get("unexpected_count") or 0)
    elements = int(result.get("element_count") or 0)
    offenders = tuple(_offender(entry) for entry in result.get("partial_unexpected_index_list") or [])
    return GateResult(gate, passed, f"{unexpected} of {elements} rows", float(unexpected), unexpected,
                      offenders[:cap])


def _offender(entry: Mapping[str, Any]) -> Offender:
    """An entry of GX's unexpected index list (``doc_id`` and the checked columns)."""
    doc_id = entry.get(INDEX_COLUMN)
    shown = ", ".join(f"{k}={v}" for k, v in entry.items() if k != INDEX_COLUMN)
    return Offender(None if doc_id is None else str(doc_id), shown or f"{INDEX_COLUMN}=None")


def _share_result(gate: Gate, passed: bool, mean: Any, frame: DataFrame, rows: int, cap: int) -> GateResult:
    """A share gate: the rows with a 1 are the offending ones (read only when it failed)."""
    count = round(float(mean) * rows) if mean is not None else 0
    observed, share = share_observed(count, rows)
    if passed:
        return GateResult(gate, True, observed, share, count)
    marked = frame.where(F.col(gate.column) == 1)
    shown = [c for c in gate.shows if c in frame.columns]
    offenders = [
        Offender(row[INDEX_COLUMN], ", ".join(f"{c}={row[c]}" for c in shown) or f"{gate.column}=1")
        for row in marked.select(INDEX_COLUMN, *shown).limit(cap).collect()
    ]
    whole_table = Offender(None, observed)
    return GateResult(gate, False, observed, share, count, (whole_table, *offenders))
