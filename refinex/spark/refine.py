"""Stage ``refine``: ``documents`` -> the refine model -> ``programs`` (origin ``model``).

The model URI (``models:/refinex-refiner@champion``, ``models:/refinex-refiner/N``, any
MLflow model URI or a local checkpoint directory) is resolved to a checkpoint on the
driver. Inside ``mapInPandas`` each document is cut into chunks exactly as the SFT pairs
were (the checkpoint's tokenizer, ``chunking.max_tokens``), every chunk of an Arrow batch
goes to the backend in one ``generate`` call, each chunk's output is read with
``refinex.program.parse`` (never evaluated), operations that address lines outside their
chunk are dropped and counted, and the chunk programs are merged back into one document
program (``merge_chunk_programs``). Lines that did not parse are kept at the end of the
stored program text, so ``apply`` counts them as parse errors under the guardrails.

The backend is created once per executor Python process and reused by every batch and
task that process runs: a module-level cache keyed by (backend, checkpoint, options). Each
load appends the worker's pid to ``refine.load_log`` when it is set, and the stage
statistics report loads and distinct worker processes. Per document the raw chunk outputs
and the counts of invalid output go to ``model_outputs``.

``origin_version`` is ``<registered name>/<version>`` for registry models, the directory
name plus a weights digest for local checkpoints, with ``+unconstrained`` appended when
constrained decoding is off (``+minp<p>`` when ``refine.options.min_op_prob`` drops the
operations the model is unsure of, ``+vote<n>t<threshold>[b<below>]`` when
``refine.options.votes`` decides unsure chunks by a line vote over sampled programs), or
``+tag<threshold>`` for a tagging-head model (its head is read from the checkpoint's
``refinex_model.json``; the backend is then ``TagBackend``, one forward pass per chunk).
Documents that already have a program of that version are skipped unless ``force``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, IntegerType, StringType, StructField, StructType

from refinex.config import Config
from refinex.spark.session import persist_or_recompute
from refinex.spark.stage import Param, Stage, StageContext
from refinex.spark.staging import drop_staging, staging_path
from refinex.spark.tables import DOCUMENTS, MODEL_OUTPUTS, ORIGIN_MODEL, PROGRAMS, STAGE_RUNS
from refinex.locations import is_local, local_path
from refinex.spark.sft import SPLITS, split_filter
from refinex.spark.train import models_dir, tracking_uri_for
from refinex.model.train import read_model_info

log = logging.getLogger(__name__)

STAGE = "refine"
UNCONSTRAINED_SUFFIX = "+unconstrained"

REFINED_SCHEMA = StructType([
    StructField("doc_id", StringType(), False),
    StructField("program", StringType()),
    StructField("n_ops", IntegerType()),
    StructField("n_remove_lines", IntegerType()),
    StructField("n_remove_str", IntegerType()),
    StructField("n_keep_all", IntegerType()),
    StructField("n_chunks", IntegerType()),
    StructField("outputs", ArrayType(StringType())),
    StructField("parse_errors", IntegerType()),
    StructField("ops_out_of_chunk", IntegerType()),
    StructField("invalid_chunks", IntegerType()),
    StructField("worker_pid", IntegerType()),
    StructField("model_loads", IntegerType()),
])
_COLUMNS = [f.name for f in REFINED_SCHEMA.fields]
_INT_COLUMNS = [f.name for f in REFINED_SCHEMA.fields if isinstance(f.dataType, IntegerType)]

# Per worker process: (backend, checkpoint, options) -> a loaded backend. Module-level so
# that it outlives tasks (Spark reuses Python workers); see ``worker_backend``.
_BACKENDS: dict[tuple[str, str, str], Any] = {}
_MODEL_DIRS: dict[str, str] = {}


@dataclass(frozen=True)
class ResolvedModel:
    """A model URI resolved on the driver."""

    uri: str  # what the workers resolve when the driver's checkpoint is not visible to them
    checkpoint: Path
    origin_version: str
    registered_name: Optional[str] = None
    version: Optional[str] = None
    tracking_uri: Optional[str] = None  # the MLflow store of run URIs
    registry_uri: Optional[str] = None  # the MLflow model registry (None: the tracking store)


# --- model resolution (driver) ---------------------------------------------------------------


_SOURCE_FILE = ".refinex_source"  # the registry source a downloaded checkpoint came from
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[^/]+))/?$")


def _weights_digest(checkpoint: Path) -> str:
    """sha256 (12 hex) over the checkpoint's weight files (name, size and content)."""
    from refinex.model.train import weights_hash

    return str(weights_hash(checkpoint).hexdigest()[:12])


def decoding_suffix(config: Config, constrained: bool, model_info: Optional[Mapping[str, Any]] = None) -> str:
    """What ``origin_version`` appends for the decoding: ``+unconstrained``, ``+minp<p>``
    when operations under ``refine.options.min_op_prob`` are dropped, ``+vote<n>t<t>``
    (``b<below>`` when not every chunk is voted on) for line-vote decoding, else nothing.
    The sampling temperature and top_p of the votes are part of it when not 1. A tagging-head
    model (``model_info``: its ``refinex_model.json``) gets ``+tag<threshold>``: the threshold
    recorded at training or ``refine.options.threshold``."""
    options = config.refine.options
    if model_info and model_info.get("head") == "tag":
        threshold = options.get("threshold")
        from refinex.model.tiers import recorded_threshold

        chosen = recorded_threshold(model_info) if threshold is None else float(threshold)
        return f"+tag{chosen:g}"
    if not constrained:
        return UNCONSTRAINED_SUFFIX
    min_prob = float(options.get("min_op_prob") or 0.0)
    suffix = f"+minp{min_prob:g}" if min_prob > 0 else ""
    votes = int(options.get("votes") or 0)
    if votes > 0:
        suffix += f"+vote{votes}t{float(options.get('vote_threshold', 0.5)):g}"
        below = float(options.get("vote_below", 1.0))
        suffix += f"b{below:g}" if below < 1 else ""
        for key, tag in (("temperature", "T"), ("top_p", "p")):
            value = float(options.get(key, 1.0))
            suffix += f"{tag}{value:g}" if value != 1 else ""
    return suffix


def resolve_model(config: Config, workdir: str, model_uri: str, constrained: bool = True) -> ResolvedModel:
    """Resolve ``model_uri`` to a local checkpoint and the programs' ``origin_version``.

    Registry aliases are resolved to their version first, so the programs name the exact
    version (``refinex-refiner/3``). Registry checkpoints are downloaded once to
    ``<workdir>/models/<name>/<version>`` (downloaded again when the registry's version
    now points at another source, e.g. after the tracking store was recreated).
    """
    from refinex.tracking import resolve_model_uri

    def suffix(checkpoint: Path) -> str:
        return decoding_suffix(config, constrained, read_model_info(checkpoint))

    if is_local(model_uri):
        local = local_path(model_uri)
        if not local.is_dir():
            raise FileNotFoundError(f"model {model_uri}: not a directory, nor a models:/ URI")
        checkpoint = resolve_model_uri(str(local.resolve()), models_dir(workdir))
        return ResolvedModel(str(checkpoint), checkpoint,
                             f"{checkpoint.name}@{_weights_digest(checkpoint)}{suffix(checkpoint)}")
    tracking_uri = tracking_uri_for(config, workdir)
    match = _MODELS_URI.match(model_uri)
    if match is None:
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model_uri).strip("_")[:120]
        checkpoint = resolve_model_uri(model_uri, models_dir(workdir) / "uri" / safe, tracking_uri=tracking_uri)
        return ResolvedModel(model_uri, checkpoint, f"{model_uri}{suffix(checkpoint)}", tracking_uri=tracking_uri,
                             registry_uri=config.model.registry_uri)
    from mlflow import MlflowClient

    name = match["name"]
    registry_uri = config.model.registry_uri or tracking_uri
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)
    try:
        if match["version"] is not None:
            model_version = client.get_model_version(name, match["version"])
        else:
            model_version = client.get_model_version_by_alias(name, match["alias"])
    except Exception as exc:  # noqa: BLE001 - MLflow raises its own exception types
        raise LookupError(f"cannot resolve {model_uri}: {str(exc).splitlines()[0]}") from None
    version = str(model_version.version)
    pinned = f"models:/{name}/{version}"
    target = models_dir(workdir) / name / version
    checkpoint = _cached_checkpoint(target, str(model_version.source))
    if checkpoint is None:
        shutil.rmtree(target, ignore_errors=True)
        checkpoint = resolve_model_uri(pinned, target, tracking_uri=tracking_uri, registry_uri=registry_uri)
        (target / _SOURCE_FILE).write_text(str(model_version.source), encoding="utf-8")
    return ResolvedModel(pinned, checkpoint, f"{name}/{version}{suffix(checkpoint)}", name, version, tracking_uri,
                         registry_uri)


def _cached_checkpoint(target: Path, source: str) -> Optional[Path]:
    """The checkpoint downloaded to ``target`` from ``source`` before (or ``None``)."""
    from refinex.tracking.mlflow_utils import checkpoint_in

    marker = target / _SOURCE_FILE
    if not marker.is_file() or marker.read_text(encoding="utf-8") != source:
        return None
    try:
        return checkpoint_in(target)
    except FileNotFoundError:
        return None


# --- workers ---------------------------------------------------------------------------------


def _task_gpu() -> Optional[str]:
    """The GPU address Spark gave this task (``spark.task.resource.gpu.amount``), if any."""
    from pyspark import TaskContext

    context = TaskContext.get()
    if context is None:
        return None
    resource = context.resources().get("gpu")
    return resource.addresses[0] if resource is not None and resource.addresses else None


def _limit_cpu_threads() -> None:
    """CPU inference: as many torch threads as the task's cores (``spark.task.cpus``), so
    concurrent tasks on one executor do not oversubscribe its cores."""
    import torch
    from pyspark import TaskContext

    context = TaskContext.get()
    if context is not None:
        torch.set_num_threads(max(1, int(context.cpus())))


def _worker_checkpoint(checkpoint: str, uri: str, tracking_uri: Optional[str], registry_uri: Optional[str]) -> str:
    """The checkpoint on this worker: the driver's path when visible, else downloaded once."""
    if Path(checkpoint).is_dir():
        return checkpoint
    cached = _MODEL_DIRS.get(uri)
    if cached is None:
        from refinex.tracking import resolve_model_uri

        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", uri).strip("_")[:120]
        target = Path(tempfile.gettempdir()) / "refinex-models" / f"{safe}-{os.getpid()}"
        cached = str(resolve_model_uri(uri, target, tracking_uri=tracking_uri, registry_uri=registry_uri))
        _MODEL_DIRS[uri] = cached
    return cached


def worker_backend(
    kind: str,
    checkpoint: str,
    uri: str,
    tracking_uri: Optional[str],
    options_json: str,
    load_log: Optional[str],
    registry_uri: Optional[str] = None,
) -> tuple[Any, bool]:
    """``(backend, loaded_now)``: this process's backend for the key, created on first use.

    ``options_json`` holds the backend options and the decoding settings. A task given a
    GPU by Spark runs the transformers backend on that device unless a device is set; the
    vLLM engine is pinned to it through ``CUDA_VISIBLE_DEVICES`` before it starts.
    """
    key = (kind, checkpoint, options_json)
    backend = _BACKENDS.get(key)
    if backend is not None:
        return backend, False
    from refinex.model.backends import load_backend

    options = json.loads(options_json)
    gpu = _task_gpu()
    if gpu is None and kind == "transformers":
        _limit_cpu_threads()
    if gpu is not None and kind == "transformers":
        options.setdefault("device", f"cuda:{gpu}")
    if gpu is not None and kind == "vllm" and not _BACKENDS:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", gpu)
    if kind == "openai":
        target = options.pop("base_url", None)
        if not target:
            raise ValueError("the openai backend needs refine.options.base_url")
    else:
        target = _worker_checkpoint(checkpoint, uri, tracking_uri, registry_uri)
    backend = load_backend(kind, target, **options)
    _BACKENDS[key] = backend
    if load_log:
        with open(load_log, "a", encoding="utf-8") as fh:
            fh.write(f"{os.getpid()}\n")
    return backend, True


def loaded_backends() -> int:
    """How many backends this process holds (for tests and diagnostics)."""
    return len(_BACKENDS)


def program_text(program: Any) -> str:
    """Canonical program text plus the lines that did not parse (so parsing it again gives
    the same operations and the same number of errors)."""
    from refinex.program import render_program

    text = render_program(program) if program.ops else ""
    if program.errors:
        text = "\n".join([*([text.rstrip("\n")] if text else []), *(e.text for e in program.errors)])
    return text


def chunk_program(output: str, first_line: int, last_line: int) -> tuple[Any, int]:
    """``(program, ops dropped)``: the chunk output parsed, without ops outside its lines."""
    from refinex.program import KeepAll, Program, RemoveLines, RemoveStr, parse

    parsed = parse(output)
    kept = []
    for op in parsed.ops:
        if isinstance(op, RemoveLines) and not first_line <= op.start <= op.end <= last_line:
            continue
        if isinstance(op, RemoveStr) and not first_line <= op.line <= last_line:
            continue
        kept.append(op)
    dropped = len(parsed.ops) - len(kept)
    if not kept and not parsed.errors and dropped:
        kept = [KeepAll()]
    return Program(tuple(kept), parsed.errors), dropped


def refine_documents(
    backend: Any, count_tokens: Callable[[str], int], docs: Sequence[tuple[str, str]], max_tokens: int,
    pages: Optional[Sequence[Optional[str]]] = None,
) -> list[dict[str, Any]]:
    """Rows of ``REFINED_SCHEMA`` (without worker columns) for ``(doc_id, text)`` pairs.

    A backend that reads page structure (``reads_structure``) gets each chunk's slice of
    its document's :func:`refinex.dom.page_structure`, computed from the document's HTML (``pages``,
    in the order of ``docs``; ``None`` where a document has none).
    """
    from refinex.chunking import chunk_document, merge_chunk_programs
    from refinex.model.backends import GenerationRequest

    structured = bool(getattr(backend, "reads_structure", False))
    requests: list[Any] = []
    owners: list[int] = []
    for index, (_, text) in enumerate(docs):
        lines = text.split("\n")
        structure = None
        if structured and pages is not None and pages[index]:
            from refinex.dom import page_structure

            structure = page_structure(pages[index], lines)
        for chunk in chunk_document(text, count_tokens, max_tokens=max_tokens):
            request = GenerationRequest.for_chunk(chunk, lines)
            if structure is not None:
                request = request.with_structure(structure[chunk.start_line : chunk.end_line + 1])
            requests.append(request)
            owners.append(index)
    outputs = backend.generate(requests) if requests else []
    per_doc: list[list[tuple[Any, str]]] = [[] for _ in docs]
    for owner, request, output in zip(owners, requests, outputs):
        per_doc[owner].append((request, output))
    rows = []
    for (doc_id, _), chunks in zip(docs, per_doc):
        programs = []
        dropped_total = invalid = 0
        for request, output in chunks:
            program, dropped = chunk_program(output, request.first_line, request.last_line)
            programs.append(program)
            dropped_total += dropped
            invalid += int(bool(dropped or program.errors))
        merged = merge_chunk_programs(programs)
        names = [op.name for op in merged.ops]
        rows.append({
            "doc_id": doc_id,
            "program": program_text(merged),
            "n_ops": len(names),
            "n_remove_lines": names.count("remove_lines"),
            "n_remove_str": names.count("remove_str"),
            "n_keep_all": names.count("keep_all"),
            "n_chunks": len(chunks),
            "outputs": [output for _, output in chunks],
            "parse_errors": len(merged.errors),
            "ops_out_of_chunk": dropped_total,
            "invalid_chunks": invalid,
        })
    return rows


def _refine_partition(
    kind: str,
    checkpoint: str,
    uri: str,
    tracking_uri: Optional[str],
    options_json: str,
    tokenizer_key: str,
    tokenizer_files: Mapping[str, bytes],
    max_tokens: int,
    load_log: Optional[str],
    registry_uri: Optional[str] = None,
) -> Callable[[Iterator[Any]], Iterator[Any]]:
    """The ``mapInPandas`` function: (doc_id, text) -> ``REFINED_SCHEMA`` rows."""

    def run(batches: Iterator[Any]) -> Iterator[Any]:
        import pandas as pd

        from refinex.spark.refine import worker_backend
        from refinex.spark.sft import token_counter

        count = token_counter(tokenizer_key, tokenizer_files)
        pid = os.getpid()
        for batch in batches:
            if batch.empty:
                continue
            # Loaded on the first non-empty batch: an empty partition never loads a model.
            backend, loaded = worker_backend(kind, checkpoint, uri, tracking_uri, options_json, load_log, registry_uri)
            pages = list(batch["html"]) if "html" in batch.columns else None
            rows = refine_documents(backend, count, list(zip(batch["doc_id"], batch["text"])), max_tokens, pages)
            for index, row in enumerate(rows):
                row["worker_pid"] = pid
                row["model_loads"] = int(loaded and index == 0)
            frame = pd.DataFrame.from_records(rows, columns=_COLUMNS)
            for column in _INT_COLUMNS:
                frame[column] = frame[column].astype("Int64")
            yield frame

    return run


# --- the stage -------------------------------------------------------------------------------


def _select_documents(ctx: StageContext, split: Optional[str], limit: Optional[int], html: bool = False) -> DataFrame:
    config = ctx.config
    documents = ctx.read(DOCUMENTS).select("doc_id", "text", *(["html"] if html else []))
    if split is not None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        fraction = float(config.sft.validation_fraction)
        documents = documents.where(split_filter(fraction)(F.col("doc_id")) == split)
    if limit is not None:
        documents = documents.orderBy("doc_id").limit(limit)
    return documents


def decode_options(config: Config, constrained: bool, backend: str) -> dict[str, Any]:
    """Backend constructor options plus decoding settings, from ``refine`` of the config."""
    rc = config.refine
    options: dict[str, Any] = dict(rc.options)
    options.update(constrained=constrained, max_new_tokens=rc.max_new_tokens, batch_size=rc.batch_size)
    if not constrained:  # knobs of constrained decoding
        for key in ("min_op_prob", "votes", "vote_threshold", "vote_below"):
            options.pop(key, None)
    if backend != "openai":
        options.pop("base_url", None)
    return options


def champion_uri(config: Config) -> str:
    """``models:/<registered name>@<champion alias>``."""
    return f"models:/{config.model.registered_name}@{config.model.champion_alias}"


def trained_in_run(ctx: StageContext) -> Optional[str]:
    """The model the ``train`` stage of this run id registered (``stage_runs``), if any:
    a job whose tasks run as separate processes refines with the model it just trained,
    as ``refinex pipeline`` does, not with an older champion."""
    row = (
        ctx.read(STAGE_RUNS)
        .where((F.col("run_id") == ctx.run_id) & (F.col("stage") == "train"))
        .orderBy(F.col("ended_at").desc())
        .select("stats")
        .first()
    )
    return None if row is None else json.loads(row["stats"]).get("model_uri")


def refine_documents_with_model(
    ctx: StageContext,
    model: Optional[str] = None,
    backend: Optional[str] = None,
    unconstrained: bool = False,
    split: Optional[str] = None,
    limit: Optional[int] = None,
    force: bool = False,
) -> dict[str, Any]:
    """Refine documents with the model into ``programs`` and ``model_outputs``.

    ``model`` defaults to the model trained in this run (:func:`trained_in_run`), else the
    champion; ``unconstrained`` turns grammar-constrained decoding
    off (default: ``refine.constrained``). ``split`` restricts the documents to one SFT split
    (``train`` or ``validation``, by the hash of the doc id); ``limit`` to the first N doc
    ids. Returns statistics, among them ``origin``/``origin_version`` for ``apply`` and ``stats``.
    """
    from refinex.model.tiers import reads_structure, tier_of
    from refinex.spark.sft import chunk_budget, tokenizer_files, tokenizer_id

    config, workdir, run_id = ctx.config, ctx.workdir, ctx.run_id
    model_uri = model or trained_in_run(ctx) or champion_uri(config)
    constrained = False if unconstrained else None
    rc = config.refine
    kind = backend or rc.backend
    use_constraints = rc.constrained if constrained is None else constrained
    resolved = resolve_model(config, workdir, model_uri, use_constraints)
    origin_version = resolved.origin_version
    options_json = json.dumps(decode_options(config, use_constraints, kind), sort_keys=True)
    model_info = read_model_info(resolved.checkpoint)
    structured = reads_structure(model_info)
    files = tokenizer_files(resolved.checkpoint)
    max_tokens = chunk_budget(files, config.chunking.max_tokens)

    documents = _select_documents(ctx, split, limit, html=structured)
    before = ctx.version(PROGRAMS)
    todo = documents
    if not force:
        done = (
            ctx.read(PROGRAMS, version=before)
            .where((F.col("origin") == ORIGIN_MODEL) & (F.col("origin_version") == origin_version))
            .select("doc_id")
        )
        todo = documents.join(done, "doc_id", "left_anti")
    n_documents = documents.count()
    n_todo = todo.count()
    # About docs_per_partition documents per task, and at least spark.shuffle_partitions
    # tasks (small inputs still use every core).
    partitions = max(1, math.ceil(n_todo / rc.docs_per_partition), min(n_todo, config.spark.partitions))
    summary: dict[str, Any] = {}
    seconds = 0.0
    if n_todo:
        function = _refine_partition(
            kind, str(resolved.checkpoint), resolved.uri, resolved.tracking_uri, options_json,
            tokenizer_id(resolved.checkpoint), files, max_tokens, rc.load_log, resolved.registry_uri,
        )
        refined = todo.repartition(partitions, "doc_id").mapInPandas(function, REFINED_SCHEMA)
        refined, cached = persist_or_recompute(refined, "the model's output")
        staged = None
        clock = time.perf_counter()
        if cached:
            refined.count()
        else:
            # Where nothing can be cached (serverless), the model's output is staged once, so
            # that every write below reads the same rows from a single model pass (sampled
            # decoding would differ between passes, and each pass costs the model's time).
            staged = staging_path(workdir, STAGE, run_id)
            refined.write.mode("overwrite").parquet(staged)
            refined = ctx.spark.read.schema(REFINED_SCHEMA).parquet(staged)
        seconds = time.perf_counter() - clock
        try:
            # model_outputs first, programs last: a program is what a rerun skips, so a run
            # killed between the two writes is completed by the rerun.
            outputs = refined.select(
                "doc_id",
                F.lit(origin_version).alias("origin_version"),
                F.lit(run_id).alias("run_id"),
                F.lit(kind).alias("backend"),
                F.lit(use_constraints).alias("constrained"),
                "n_chunks", "outputs", "parse_errors", "ops_out_of_chunk", "invalid_chunks",
                F.current_timestamp().alias("created_at"),
            )
            ctx.merge(MODEL_OUTPUTS, outputs)
            programs = refined.select(
                "doc_id",
                F.lit(ORIGIN_MODEL).alias("origin"),
                F.lit(origin_version).alias("origin_version"),
                "program", "n_ops", "n_remove_lines", "n_remove_str", "n_keep_all",
                *[F.lit(None).alias(c) for c in ("kept_chars", "deleted_chars", "inserted_chars",
                                                 "unrepresentable_ratio", "exact")],
                F.current_timestamp().alias("created_at"),
            )
            ctx.merge(PROGRAMS, programs)
            row = refined.agg(
                F.count(F.lit(1)).alias("documents"),
                F.sum("n_chunks").alias("chunks"),
                F.sum("n_ops").alias("ops"),
                F.sum("parse_errors").alias("parse_errors"),
                F.count(F.when(F.col("parse_errors") > 0, 1)).alias("docs_with_parse_errors"),
                F.sum("ops_out_of_chunk").alias("ops_out_of_chunk"),
                F.sum("invalid_chunks").alias("invalid_chunks"),
                F.count(F.when((F.col("parse_errors") > 0) | (F.col("ops_out_of_chunk") > 0), 1)).alias("invalid_docs"),
                F.sum("model_loads").alias("model_loads"),
                F.countDistinct("worker_pid").alias("worker_processes"),
            ).first()
            summary = row.asDict() if row is not None else {}
        finally:
            if cached:
                refined.unpersist()
            if staged is not None:
                drop_staging(ctx.spark, staged, STAGE)
    stats: dict[str, Any] = {
        "model_uri": model_uri,
        "checkpoint": str(resolved.checkpoint),
        "origin": ORIGIN_MODEL,
        "origin_version": origin_version,
        "backend": kind,
        "tier": tier_of(model_info),
        "reads_structure": structured,
        "constrained": use_constraints,
        "split": split,
        "documents": n_documents,
        "skipped_existing": n_documents - n_todo,
        "processed": n_todo,
        "partitions": partitions if n_todo else 0,
        **{key: int(summary.get(key) or 0) for key in (
            "chunks", "ops", "parse_errors", "docs_with_parse_errors", "ops_out_of_chunk", "invalid_chunks",
            "invalid_docs", "model_loads", "worker_processes")},
        "generate_seconds": round(seconds, 3),
        "docs_per_s": round(n_todo / seconds, 3) if seconds > 0 else None,
    }
    ctx.record(
        model_uri=model_uri, resolved_uri=resolved.uri, origin_version=origin_version, backend=kind,
        options=json.loads(options_json), max_tokens=max_tokens,
        docs_per_partition=rc.docs_per_partition,
    )
    return stats


REFINE = Stage(
    name=STAGE,
    help="Refine documents with the refine model into programs of origin model (then apply and stats).",
    reads=(DOCUMENTS, PROGRAMS),
    writes=(PROGRAMS, MODEL_OUTPUTS),
    transform=refine_documents_with_model,
    params=(
        Param("model", "models:/refinex-refiner@champion, models:/refinex-refiner/N, any MLflow model URI or a "
              "checkpoint folder (default: the model trained in this run id, else the champion).", short="-m"),
        Param("backend", "transformers, vllm or openai (default: refine.backend)."),
        Param("unconstrained", "Plain decoding instead of grammar-constrained decoding.", kind="bool", default=False),
        Param("split", "Only the documents of this SFT split: train or validation."),
        Param("limit", "Only the first N documents (by doc_id).", kind="int", minimum=1),
        Param("force", "Refine again documents that already have a program of this model.", kind="bool",
              default=False),
    ),
    resources="gpu",
    describe=lambda s: (f"{s['origin_version']}: {s['processed']} documents ({s['chunks']} chunks) in "
                        f"{s['generate_seconds']}s, {s['invalid_chunks']} invalid chunks, {s['model_loads']} model "
                        f"load(s) in {s['worker_processes']} process(es)"),
)
