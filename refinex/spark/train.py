"""Stage ``train``: ``sft_pairs`` -> a fine-tuned refine model in the MLflow registry.

The pairs are read from Delta (train and validation splits) and the model is trained on the
driver (``refinex.model.train.train``: one process, CUDA when present, the loss on the
program tokens only). The base is ``model.base`` (or the ``base`` argument): a profile in
``conf/model/`` or a checkpoint path, prepared exactly as the ``sft_pairs`` stage prepared
it; training settings are the base's defaults overridden by the ``train`` section.

With ``model.head: tag`` the tagging head is trained instead
(``refinex.model.tagging.train.train_tagger`` on the pairs' chunks; settings from the
``tag`` section over the base's ``tag`` defaults), and the registry version is tagged
``head=tag`` with its cross-validated ``tag_threshold``.

The run is logged to MLflow (``refinex.tracking.log_training_run``: params, loss curve,
validation loss, the model) with the training data version ``sft_pairs@<Delta version>``,
plus program-level validation metrics from generation on ``model.eval_chunks`` validation
chunks, and registered as ``model.registered_name`` (``refinex-refiner``). No alias is set
here: ``@champion`` moves only through the gated ``promote`` stage, after evaluation.

Training is skipped when a registered version was trained on the same pairs, base and
settings (its ``train_fingerprint`` tag), so rerunning the pipeline reuses the model.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from refinex.config import Config
from refinex.locations import driver_path, is_local, local_path
from refinex.spark.sft import BASE_PARAM
from refinex.spark.stage import Param, Stage, StageContext
from refinex.spark.tables import DOCUMENTS, PROGRAMS, SFT_PAIRS, TableResolver, read_table

log = logging.getLogger(__name__)

STAGE = "train"
FINGERPRINT_TAG = "train_fingerprint"
HEAD_VERSION_TAG = "head"  # registry version tag: generate or tag
TIER_VERSION_TAG = "tier"  # registry version tag: generate, tag or fast (refinex.model.tiers)
HEAD_TAG = "tag"
# Settings that do not change the trained weights (left out of the fingerprint).
_NON_MODEL_SETTINGS = ("progress", "plot", "train_data_version", "eval_every", "eval_batch_size", "eval_max_pairs",
                       "device", "eval_max_chunks", "forward_batch", "forward_tokens", "feature_cache")
_PAIR_COLUMNS = (
    "doc_id", "chunk_idx", "split", "prompt", "target", "start_line", "end_line", "n_prompt_tokens",
    "truncated_lines", "origin_version", "base_tokenizer",
)


class NoTrainingDataError(LookupError):
    """``sft_pairs`` is empty (or has no training split)."""


def tracking_uri_for(config: Config, workdir: str) -> str:
    """``model.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<workdir>/mlflow.db``."""
    from refinex.tracking import resolve_tracking_uri

    if config.model.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return resolve_tracking_uri(config.model.tracking_uri)
    local = _local_workdir(workdir)
    if local is None:
        raise ValueError(
            f"workdir {workdir} is not local: set model.tracking_uri (or $MLFLOW_TRACKING_URI) for MLflow"
        )
    return resolve_tracking_uri(None, local)


def _local_workdir(workdir: str) -> Optional[str]:
    """The workdir on this machine's file system (``refinex.locations.is_local``), else None."""
    return str(local_path(workdir)) if is_local(workdir) else None


def models_dir(workdir: str) -> Path:
    """Where checkpoints are trained and downloaded: ``<workdir>/models`` on the driver
    (``dbfs:/Volumes/…`` through its FUSE path), a temp folder for object-store workdirs."""
    local = driver_path(workdir)
    return local / "models" if local is not None else Path(tempfile.gettempdir()) / "refinex-models"


def registry_client(uri: str, registry_uri: Optional[str] = None) -> Any:
    """An MLflow client of the tracking ``uri`` and ``registry_uri`` (``model.registry_uri``;
    None: the tracking URI)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=registry_uri or uri)


def fingerprint(rows: Sequence[Any], base_identity: str, settings: dict[str, Any]) -> str:
    """sha256 of the pairs' content, the base and the weight-relevant training settings."""
    digest = hashlib.sha256()
    kept = {k: v for k, v in sorted(settings.items()) if k not in _NON_MODEL_SETTINGS}
    digest.update(json.dumps({"base": base_identity, "settings": kept}, sort_keys=True, default=str).encode())
    for row in rows:
        for column in ("doc_id", "chunk_idx", "split", "prompt", "target"):
            digest.update(str(row[column]).encode("utf-8") + b"\0")
    return digest.hexdigest()


def find_version(uri: str, name: str, fingerprint_value: str, registry_uri: Optional[str] = None) -> Optional[str]:
    """The newest registered version of ``name`` tagged with ``fingerprint_value``."""
    import mlflow

    try:
        versions = registry_client(uri, registry_uri).search_model_versions(f"name='{name}'")
    except mlflow.exceptions.MlflowException:
        return None
    matching = [int(v.version) for v in versions if v.tags.get(FINGERPRINT_TAG) == fingerprint_value]
    return str(max(matching)) if matching else None


def _eval_examples(spark: SparkSession, tables: "TableResolver | str", rows: Sequence[Any], limit: int) -> list[Any]:
    """Generation examples of the first ``limit`` validation pairs (by doc id, chunk)."""
    from refinex.model.backends import GenerationRequest
    from refinex.model.evaluate import ChunkExample

    chosen = [r for r in rows if r["split"] == "validation"][:limit]
    if not chosen:
        return []
    ids = sorted({r["doc_id"] for r in chosen})
    wanted = spark.createDataFrame([(i,) for i in ids], "doc_id string")
    texts = dict(
        read_table(spark, tables, DOCUMENTS).join(F.broadcast(wanted), "doc_id").select("doc_id", "text").collect()
    )
    examples = []
    for row in chosen:
        text = texts.get(row["doc_id"])
        if text is None:
            continue
        lines = tuple(text.split("\n")[row["start_line"] : row["end_line"] + 1])
        request = GenerationRequest(row["prompt"], row["start_line"], row["end_line"], lines)
        examples.append(ChunkExample(request, row["target"]))
    return examples


def _validation_metrics(config: Config, checkpoint: Path, examples: Sequence[Any]) -> dict[str, float]:
    from refinex.model.backends import load_backend
    from refinex.model.evaluate import program_metrics

    if not examples:
        return {}
    rc = config.refine
    backend = load_backend(
        "transformers", str(checkpoint), constrained=rc.constrained, max_new_tokens=rc.max_new_tokens,
        batch_size=rc.batch_size,
    )
    try:
        return program_metrics(backend, examples).as_dict()
    finally:
        backend.close()


def evaluate_checkpoint(spark: SparkSession, config: Config, tables: "TableResolver | str", checkpoint: Path) -> dict[str, float]:
    """The ``val_*`` program metrics of a checkpoint on the first ``model.eval_chunks``
    validation pairs of ``sft_pairs`` (as logged by :func:`run_train`)."""
    rows = read_table(spark, tables, SFT_PAIRS).where(F.col("split") == "validation").select(*_PAIR_COLUMNS)
    ordered = rows.orderBy("doc_id", "chunk_idx").limit(config.model.eval_chunks).collect()
    return _validation_metrics(config, checkpoint, _eval_examples(spark, tables, ordered, config.model.eval_chunks))


def _train_tag_head(
    ctx: StageContext, rows: Sequence[Any], checkpoint: Path, out_dir: Path, settings: dict[str, Any],
    data_version: str, sft_version: str,
) -> Any:
    """The tagging head trained on the pairs' chunks (their documents' raw lines, with their
    page-structure features and soft labels when the settings ask for them)."""
    from refinex.model.tagging.train import TagTrainConfig, tag_examples, train_tagger

    tag_settings = {k: v for k, v in settings.items() if k != "head"}
    config = TagTrainConfig.from_dict({**tag_settings, "train_data_version": data_version})
    wanted, pages = _labelled_pages(ctx, rows, sft_version, html=config.structure_features)
    texts = {doc_id: row["text"] or "" for doc_id, row in pages.items()}
    structures = _structures(pages) if config.structure_features else None
    soft = _label_votes(ctx, wanted, sft_version, texts, config.labels)
    config = replace(config, labels="hard" if soft is None else "soft")
    examples = tag_examples([r.asDict() for r in rows], texts, structures, soft)
    if soft is not None:
        examples = [e for e in examples if e.soft is not None]
    return train_tagger(examples, str(checkpoint), out_dir, config)


class NoSoftLabelsError(LookupError):
    """``tag.labels: soft`` but the programs' expert left no member votes (``expert_members``)."""


def _soft_targets(ctx: StageContext, wanted: Any, sft_version: str, texts: Mapping[str, str]
                  ) -> dict[str, tuple[Optional[float], ...]]:
    """Per document, the weighted share of the consensus members behind ``sft_version`` that
    remove each line (``expert_members``; ``None`` on blank lines). Raises
    :class:`NoSoftLabelsError` when that expert left no member votes."""
    from refinex.model.fast.train import document_targets
    from refinex.model.tagger import line_labels
    from refinex.spark.tables import EXPERT_MEMBERS

    expert, _, expert_version = sft_version.partition(":")
    members = (ctx.read(EXPERT_MEMBERS).join(F.broadcast(wanted), "doc_id")
               .where((F.col("expert") == expert) & (F.col("expert_version") == expert_version)
                      & F.col("voted") & F.col("program").isNotNull())
               .select("doc_id", "weight", "program").collect())
    votes: dict[str, list[tuple[float, str]]] = {}
    for member in members:
        votes.setdefault(member["doc_id"], []).append((float(member["weight"]), member["program"]))
    if not votes:
        raise NoSoftLabelsError(
            f"tag.labels=soft needs the member votes of a consensus expert, but "
            f"{ctx.tables.display_name(EXPERT_MEMBERS)} has none for {sft_version}: run `refinex expert --expert "
            "consensus` (then distill and sft-pairs), or train with hard labels")
    out = {}
    for doc_id, cast in votes.items():
        text = texts.get(doc_id)
        if text is not None and any(w > 0 for w, _ in cast):
            out[doc_id] = document_targets(text.split("\n"), votes=[(w, line_labels(text, p)) for w, p in cast])
    return out


def _label_votes(ctx: StageContext, wanted: Any, sft_version: str, texts: Mapping[str, str], labels: str
                 ) -> Optional[dict[str, tuple[Optional[float], ...]]]:
    """The soft targets ``labels`` asks for: ``soft`` (they must exist), ``auto`` (where the
    programs' expert left member votes, else hard labels: ``None``), ``hard`` (``None``)."""
    if labels == "hard":
        return None
    try:
        return _soft_targets(ctx, wanted, sft_version, texts)
    except NoSoftLabelsError:
        if labels == "soft":
            raise
        log.info("train: no consensus member votes for %s: hard labels (tag.labels=auto)", sft_version)
        return None


def _labelled_pages(ctx: StageContext, rows: Sequence[Any], sft_version: str, html: bool) -> tuple[Any, dict[str, Any]]:
    """``(wanted doc ids frame, doc id -> row of text, html and the sft version's program)``."""
    ids = sorted({r["doc_id"] for r in rows})
    wanted = ctx.spark.createDataFrame([(i,) for i in ids], "doc_id string")
    documents = ctx.read(DOCUMENTS).join(F.broadcast(wanted), "doc_id").select(
        "doc_id", "text", *(["html"] if html else []))
    programs = (ctx.read(PROGRAMS)
                .where((F.col("origin") == "distilled") & (F.col("origin_version") == sft_version))
                .select("doc_id", "program"))
    return wanted, {r["doc_id"]: r for r in documents.join(programs, "doc_id").collect()}


def _structures(pages: Mapping[str, Any]) -> dict[str, Any]:
    """Per document with HTML, its lines' :class:`refinex.dom.PageStructure`."""
    from refinex.dom import page_structure

    return {doc_id: page_structure(row["html"], (row["text"] or "").split("\n"))
            for doc_id, row in pages.items() if row["html"]}


def _fast_documents(ctx: StageContext, rows: Sequence[Any], sft_version: str, labels: str, structure: bool
                    ) -> tuple[list[Any], bool]:
    """The whole documents of the pairs (text, page HTML) with their line targets: the
    distilled programs' ``remove_lines`` (hard) or the weighted vote of the consensus
    members behind them (soft, from ``expert_members``; documents nobody voted on are left out);
    and whether the labels are soft."""
    from refinex.model.fast.train import FastDocument, document_targets
    from refinex.model.tagger import line_labels

    splits = {r["doc_id"]: r["split"] for r in rows}
    wanted, pages = _labelled_pages(ctx, rows, sft_version, html=structure)
    votes = _label_votes(ctx, wanted, sft_version, {i: r["text"] or "" for i, r in pages.items()}, labels)
    soft = votes or {}
    structures = _structures(pages) if structure else {}
    out = []
    for doc_id in sorted(pages):
        text = pages[doc_id]["text"] or ""
        lines = text.split("\n")
        if votes is not None:
            if doc_id not in soft:
                continue
            targets = soft[doc_id]
        else:
            targets = document_targets(lines, removed=line_labels(text, pages[doc_id]["program"]))
        out.append(FastDocument(doc_id, tuple(lines), targets, structures.get(doc_id), splits[doc_id]))
    return out, votes is not None


def _train_fast(
    ctx: StageContext, rows: Sequence[Any], checkpoint: Path, out_dir: Path, settings: dict[str, Any],
    data_version: str, sft_version: str, base_name: str,
) -> Any:
    """The fast tier trained on the pairs' whole documents."""
    from refinex.model.fast.train import FastTrainConfig, train_fast

    config = FastTrainConfig.from_dict({**{k: v for k, v in settings.items() if k != "head"},
                                        "train_data_version": data_version})
    docs, soft = _fast_documents(ctx, rows, sft_version, config.labels, config.structure)
    return train_fast(docs, checkpoint, out_dir, replace(config, labels="soft" if soft else "hard"), base=base_name)


def tag_settings(base_name: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The tagging head's settings for ``base_name``: the fast tier's on a ``hashed`` base,
    else the transformer tagging head's (base defaults, then ``overrides``)."""
    from refinex.model.bases import tag_defaults
    from refinex.model.tiers import tag_config_class

    return tag_config_class(base_name).from_dict({**tag_defaults(base_name), **dict(overrides)}).to_dict()


def train_model(ctx: StageContext, base: Optional[str] = None, force: bool = False) -> dict[str, Any]:
    """Train, log and register a refine model from ``sft_pairs``; returns statistics with
    ``model_uri`` = ``models:/<name>/<version>``."""
    from refinex.model.bases import read_base_info
    from refinex.model.tiers import tier_of
    from refinex.model.train import TrainConfig, read_model_info, train
    from refinex.spark.sft import prepare_sft_base, tokenizer_id
    from refinex.tracking import get_alias_version, log_training_run

    spark, config, workdir, run_id = ctx.spark, ctx.config, ctx.workdir, ctx.run_id
    data_version = ctx.version(SFT_PAIRS)
    rows = ctx.read(SFT_PAIRS).select(*_PAIR_COLUMNS).orderBy("doc_id", "chunk_idx").collect()
    if not any(r["split"] == "train" for r in rows):
        raise NoTrainingDataError(
            f"no training pairs in {ctx.tables.display_name(SFT_PAIRS)}: run the sft_pairs stage first")
    sft_version = rows[0]["origin_version"]
    pairs_tokenizer = rows[0]["base_tokenizer"]
    base_name = base or config.model.base
    checkpoint = prepare_sft_base(spark, config, ctx.tables, base_name, sft_version)
    base_tokenizer = tokenizer_id(checkpoint)
    if base_tokenizer != pairs_tokenizer:
        log.warning(
            "sft_pairs were cut with tokenizer %s but the base %s has %s: chunk budgets differ from what "
            "`refine` will use; rebuild them with `refinex sft-pairs --base %s`",
            pairs_tokenizer, base_name, base_tokenizer, base_name,
        )
    name = config.model.registered_name
    data_version_text = f"{SFT_PAIRS}@{data_version}"
    head = config.model.head
    fast = False
    if head == HEAD_TAG:
        from refinex.model.bases import is_hashed_base

        fast = is_hashed_base(checkpoint)
        settings = {"head": head, **tag_settings(base_name, config.tag)}
    else:
        settings = TrainConfig.for_base(base_name, config.train).to_dict()
    base_identity = json.dumps({"dir": checkpoint.name, "info": read_base_info(checkpoint), "tok": base_tokenizer},
                               sort_keys=True)
    fp = fingerprint(rows, base_identity, settings)
    uri = tracking_uri_for(config, workdir)
    registry_uri = config.model.registry_uri
    reused = None if force else find_version(uri, name, fp, registry_uri)
    stats: dict[str, Any] = {
        "base": base_name, "base_tokenizer": base_tokenizer, "sft_origin_version": sft_version,
        "train_data_version": data_version_text, "tracking_uri": uri, "registered_name": name,
        "train_fingerprint": fp, "reused": reused is not None, "head": head,
    }
    if reused is not None:
        log.info("train: version %s of %s was trained on the same pairs and settings; reusing it", reused, name)
        stats.update(version=reused, model_uri=f"models:/{name}/{reused}", mlflow_run_id=None)
    else:
        run_dir = models_dir(workdir) / "train" / run_id
        out_dir = run_dir / "checkpoint"  # also the artifact's folder name in MLflow
        try:
            if fast:
                result = _train_fast(ctx, rows, checkpoint, out_dir, settings, data_version_text, sft_version,
                                     base_name)
            elif head == HEAD_TAG:
                result = _train_tag_head(ctx, rows, checkpoint, out_dir, settings, data_version_text, sft_version)
            else:
                train_config = TrainConfig.from_dict({**settings, "train_data_version": data_version_text})
                result = train([r.asDict() for r in rows], str(checkpoint), out_dir, train_config)
            examples = _eval_examples(spark, ctx.tables, rows, config.model.eval_chunks)
            val_metrics = _validation_metrics(config, out_dir, examples)
            tier = tier_of(read_model_info(out_dir))
            logged = log_training_run(
                result,
                params={"base_name": base_name, "base_tokenizer": base_tokenizer, "sft_origin_version": sft_version,
                        FINGERPRINT_TAG: fp, "workdir": workdir, "max_tokens": config.chunking.max_tokens,
                        "head": head},
                data_version=data_version_text,
                tracking_uri=uri,
                workdir=_local_workdir(workdir),
                experiment=config.model.experiment,
                model_name=name,
                tags={"refinex.train_fingerprint": fp, "refinex.base_name": base_name, "refinex.head": head},
                registry_uri=registry_uri,
            )
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
        client = registry_client(uri, registry_uri)
        for key, value in val_metrics.items():
            client.log_metric(logged.run_id, key, value, step=result.steps)
        assert logged.version is not None
        extra_tags = {FINGERPRINT_TAG: fp, "base_name": base_name, "sft_origin_version": sft_version,
                      HEAD_VERSION_TAG: head, TIER_VERSION_TAG: tier,
                      **{k: f"{v:.6g}" for k, v in val_metrics.items()}}
        if head == HEAD_TAG:
            extra_tags["tag_threshold"] = f"{result.threshold:g}"
        for key, value in extra_tags.items():
            client.set_model_version_tag(name, logged.version, key, value)
        stats.update(
            version=logged.version, model_uri=f"models:/{name}/{logged.version}", mlflow_run_id=logged.run_id,
            steps=result.steps, train_pairs=result.n_train_pairs, validation_pairs=result.n_validation_pairs,
            skipped_pairs=result.n_skipped, final_train_loss=result.final_train_loss,
            initial_validation_loss=result.eval_losses[0][1] if result.eval_losses else None,
            validation_loss=result.validation_loss, train_seconds=round(result.seconds, 1),
            device=result.device, precision=result.precision, precision_reason=result.precision_reason,
            **val_metrics,
        )
        stats["tier"] = tier
        if head == HEAD_TAG:
            stats.update(threshold=result.threshold, threshold_source=result.threshold_source,
                         cv_kept_char_f1=result.cv_kept_char_f1,
                         validation_kept_char_f1=result.validation_kept_char_f1)
    stats["champion_version"] = get_alias_version(name, config.model.champion_alias, tracking_uri=uri,
                                                  registry_uri=registry_uri)
    ctx.record(base=base_name, force=force, train=settings, tracking_uri=uri)
    return stats


HEAD_PARAM = Param(
    "head", "generate (the program written token by token) or tag (one forward pass tags the lines to delete); "
    "default: model.head of the profile.", configures=True)


def _configure_head(config: Config, values: Mapping[str, Any]) -> Config:
    """``--head`` sets ``model.head``."""
    head = values.get("head")
    return config if head is None else config.with_overrides({"model.head": head})


TRAIN = Stage(
    name=STAGE,
    help="Fine-tune the refine model on sft_pairs, log it to MLflow and register it (promote moves @champion).",
    reads=(SFT_PAIRS, DOCUMENTS, PROGRAMS),
    writes=(),
    transform=train_model,
    params=(BASE_PARAM, HEAD_PARAM, Param("force", "Train even if a registered version has the same pairs and settings.",
                                          kind="bool", default=False)),
    resources="gpu",
    configure=_configure_head,
    describe=lambda s: f"{s['model_uri']} (champion: {'version ' + s['champion_version'] if s['champion_version'] else 'none'})",
)
