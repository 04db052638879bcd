"""The whole flow, under one run id: ingest -> expert -> distill -> apply -> stats ->
validate -> evaluate for the distilled programs (the oracle), then sft_pairs -> train ->
refine -> apply -> stats -> validate -> evaluate for the refine model's programs, and promote
of the model trained (``model_uri`` skips training and promotion and uses that model;
``refine=False`` stops after the distilled programs). The model's steps carry the run id
``<run id>+model`` in ``stage_runs``. A failed quality gate does not stop the run: its summary
is collected in ``result["failures"]`` and the CLI exits non-zero after everything is written.

The steps are ``refinex.spark.registry.pipeline_steps``: the same registry and stage
envelope as the CLI's stage commands and the bundle's tasks. Every stage reads its inputs
from Delta, writes its output idempotently and records its ``stage_runs`` row, so rerunning
the pipeline on the same input leaves every table as it was (``stage_runs`` gains the rows
of the new run).
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any, Mapping, Optional, Sequence

from pyspark.sql import SparkSession

from refinex.config import Config
from refinex.spark.registry import REGISTERED_MODEL, pipeline_steps, run_steps
from refinex.spark.stage import context
from refinex.spark.tables import TABLES, new_run_id, record_stage_run
from refinex.versions import version_label

log = logging.getLogger(__name__)

PIPELINE = "pipeline"
"""``stage_runs.stage`` of the whole run: its params hold the full configuration."""


def run_pipeline(
    spark: SparkSession,
    config: Config,
    workdir: str,
    input_paths: str | Sequence[str],
    limit: Optional[int] = None,
    run_id: Optional[str] = None,
    base: Optional[str] = None,
    model_uri: Optional[str] = None,
    train: bool = True,
    refine: bool = True,
) -> dict[str, Any]:
    """Run every step (``refinex.spark.registry.pipeline_steps``); returns ``{"run_id",
    "workdir", "tables", <step key>: stats, ...}``.

    The model part: ``base`` overrides ``model.base``; ``model_uri`` (or ``train=False``,
    which means ``models:/<registered name>@<champion alias>``) refines with an existing
    model instead of training one; ``refine=False`` leaves the model part out. Besides each
    stage's row, ``stage_runs`` gets a ``pipeline`` row whose params hold the input and the
    whole configuration of the run.
    """
    started = datetime.now(timezone.utc)
    ctx = context(spark, config, workdir, run_id or new_run_id())
    training = train and model_uri is None
    steps = pipeline_steps(train=training, refine=refine, validate=config.quality.enabled,
                           evaluate=config.evaluate.enabled)
    paths = [input_paths] if isinstance(input_paths, str) else list(input_paths)
    params: dict[str, dict[str, Any]] = {"ingest": {"input": paths, "limit": limit}}
    if base is not None:
        params["sft_pairs"] = params["train"] = {"base": base}
    if model_uri is not None:
        params["refine"] = {"model": model_uri}
    result: dict[str, Any] = {"run_id": ctx.run_id, "workdir": workdir, "tables": ctx.tables.describe()}
    run_steps(ctx, steps, params, results=result, external=() if training else (REGISTERED_MODEL,),
              stop=_stop_on_empty_input)
    run_params = {"input": paths, "limit": limit, "config": ctx.config.to_dict(), "base": base,
                  "model_uri": model_uri, "train": train, "refine": refine}
    summary = {step.key: result[step.key] for step in steps if step.key in result}
    summary["failures"] = result["failures"]
    record_stage_run(spark, ctx.tables, ctx.run_id, PIPELINE, started, datetime.now(timezone.utc), run_params, summary)
    return result


def _stop_on_empty_input(key: str, stats: Mapping[str, Any]) -> Optional[str]:
    """An input without a single record ends the run after ingest (nothing to refine)."""
    if key == "ingest" and stats.get("empty_input"):
        return (f"no input records (0 read, {stats.get('blank_lines', 0)} blank lines): stopped after ingest; "
                "check --input")
    return None


def format_origins(rows: list[dict[str, Any]]) -> list[str]:
    """The ``stats`` summaries of several origins side by side, one line each (versions by
    their short labels; the full strings follow)."""
    statuses = sorted({status for row in rows for status in row["by_status"]})
    header = ["origin", "version", "documents", *statuses, "deletion ratio", "chars out"]
    table = [header]
    for row in rows:
        ratio = row["mean_deletion_ratio"]
        table.append([
            row["origin"], version_label(row["origin_version"]), str(row["documents"]),
            *[str(row["by_status"].get(status, 0)) for status in statuses],
            "n/a" if ratio is None else f"{ratio:.3f}", f"{row['chars_out']:,}",
        ])
    lines = _columns(table)
    lines += [f"  {version_label(row['origin_version'])} = {row['origin_version']}" for row in rows]
    return lines


def _columns(table: list[list[str]]) -> list[str]:
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    return ["  " + "  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in table]


def _f(value: Optional[float], digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_gates(result: dict[str, Any]) -> list[str]:
    """One line per validated origin: passed, or which expectations failed."""
    lines = []
    for key in ("validate", "validate_model"):
        gate = result.get(key)
        if not gate:
            continue
        head = f"  {gate['origin']:<9}  {gate['version_label']}: "
        if gate.get("passed") and not gate.get("failed"):
            warn = f", {gate['warnings']} warning(s): {', '.join(gate['warned_expectations'])}" if gate["warnings"] else ""
            lines.append(f"{head}passed ({gate['expectations']} expectations{warn})")
        else:
            lines.append(f"{head}FAILED {', '.join(gate.get('failed_expectations') or [])}")
    return ["quality gates (Great Expectations):", *lines] if lines else []


def format_scores(result: dict[str, Any]) -> list[str]:
    """The evaluations side by side, with the raw text's scores as the baseline."""
    evaluated = [result[k] for k in ("evaluate", "evaluate_model") if result.get(k)]
    if not evaluated:
        return []
    first = evaluated[0]
    gold = first.get("gold_pages") or 0
    header = ["", "snippet P", "snippet R", "snippet F1", "bow F1", "deletion F1 vs expert", "new words", "invalid"]
    table = [header]
    if gold:
        table.append(["raw text", "-", _f(first.get("raw_snippet_recall")), _f(first.get("raw_snippet_f1")),
                      _f(first.get("raw_bow_f1")), "-", "-", "-"])
    for ev in evaluated:
        table.append([
            f"{ev['origin']} {ev['version_label']}", _f(ev.get("snippet_precision")), _f(ev.get("snippet_recall")),
            _f(ev.get("snippet_f1")), _f(ev.get("bow_f1")), _f(ev.get("deletion_f1")), str(ev.get("new_words")),
            _f(ev.get("invalid_share")),
        ])
    title = (f"scores against gold ({gold} pages with gold; snippet scores on pages with snippet gold, "
             "bag-of-words on pages with a main-content gold):" if gold else "evaluation (the documents carry no gold):")
    return [title, *_columns(table), *_scored_on(result)]


def _scored_on(result: dict[str, Any]) -> list[str]:
    """Which documents the model learnt from and which it is scored on, said plainly."""
    sft, model = result.get("sft_pairs"), result.get("evaluate_model")
    if not sft or not model or not sft.get("train_documents"):
        return []
    seen, held = int(sft["train_documents"]), int(sft.get("validation_documents") or 0)
    return [f"  the model learnt from {seen} training documents and is scored on all {model['documents']}: "
            f"{seen} of them seen in training, {held} held out (validation split); on a corpus this small the row "
            "measures how well it fits its teacher, not how it does on unseen pages (BENCHMARKS.md measures that)"]


def _decoder(refine: Mapping[str, Any]) -> str:
    """How the refine stage decoded: the tier of a tagging model, else backend and constraints."""
    tier = refine.get("tier")
    if tier in ("tag", "fast"):
        return f"{tier} tier{', page structure' if refine.get('reads_structure') else ''}"
    return f"{refine['backend']}{', constrained' if refine['constrained'] else ''}"


def _model_lines(result: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    sft = result.get("sft_pairs")
    if sft:
        lines.append(
            f"sft pairs: {sft['pairs']} ({sft['train_pairs']} train / {sft['validation_pairs']} validation) from "
            f"{sft['documents_with_pairs']} documents of {version_label(sft['origin_version'])}"
        )
    train = result.get("train")
    if train:
        if train["reused"]:
            lines.append(f"train: reused {train['model_uri']} (same pairs, base and settings)")
        else:
            loss = train.get("validation_loss")
            first = train.get("initial_validation_loss")
            lines.append(
                f"train: {train['model_uri']} ({train['base']}"
                + (f", {train['tier']} tier" if train.get("tier") else "")
                + f", {train['steps']} steps, {train['train_seconds']}s); "
                f"validation loss {'n/a' if first is None else f'{first:.3f}'} -> "
                f"{'n/a' if loss is None else f'{loss:.3f}'}"
                + (f"; validation chunks: removed-character F1 {train['val_char_f1']:.3f}, line F1 "
                   f"{train['val_line_f1']:.3f}" if "val_char_f1" in train else "")
            )
        lines.append(f"  tracking {train['tracking_uri']}")
    refine = result.get("refine")
    if refine:
        rate = refine["docs_per_s"]
        lines.append(
            f"refine: {refine['processed']} documents ({refine['chunks']} chunks) with {refine['model_uri']} "
            f"[{_decoder(refine)}] in {refine['generate_seconds']}s"
            + ("" if rate is None else f" ({rate:.2f} docs/s)")
            + f", {refine['skipped_existing']} already done; invalid chunks {refine['invalid_chunks']}; "
            f"model loaded {refine['model_loads']}x in {refine['worker_processes']} worker process(es)"
        )
    return lines


def format_summary(result: dict[str, Any]) -> str:
    """A short human summary of a pipeline run."""
    ingest, expert, stats = result["ingest"], result["expert"], result["stats"]
    lines = [
        f"run {result['run_id']}",
        f"documents: read {ingest['read']} = accepted {ingest['accepted']} + quarantined {ingest['quarantined']}"
        + (f" (blank lines skipped: {ingest['blank_lines']})" if ingest.get("blank_lines") else ""),
    ]
    if ingest["quarantined_by_reason"]:
        reasons = ", ".join(f"{k} {v}" for k, v in ingest["quarantined_by_reason"].items())
        lines.append(f"  quarantined: {reasons}")
    lines.append(
        f"expert {expert['expert']} ({expert['expert_version']}): {expert['processed']} refined now "
        f"({expert['ok']} ok, {expert['failed']} failed), {expert['skipped_existing']} already done"
    )
    if expert.get("requests") or expert.get("cache_hits"):
        lines.append(
            f"  endpoint: {expert['requests']} requests ({expert['retries']} retries), "
            f"{expert['cache_hits']} cache hits, tokens in {expert['tokens_in']:,} / out {expert['tokens_out']:,}"
        )
    lines.extend(_model_lines(result))
    origins = [stats, *([result["stats_model"]] if "stats_model" in result else [])]
    lines.append(f"programs by origin ({'distilled oracle vs refine model' if len(origins) > 1 else stats['origin']}):")
    lines.extend(format_origins(origins))
    lines.append(f"chars in {stats['chars_in']:,}")
    lines.extend(format_gates(result))
    lines.extend(format_scores(result))
    if result.get("promote"):
        from refinex.spark.promote import format_decision

        lines.append("promotion: " + format_decision(result["promote"]))
    lines.append(f"tables: {result['tables']}")
    lines.append("  " + ", ".join(TABLES))
    return "\n".join(lines)
