"""Stage ``sft_pairs``: ``documents`` x ``programs`` (distilled) -> ``sft_pairs``.

One example per chunk of every document with a distilled program of the chosen version:
the prompt is the instruction plus the chunk's ``[NNN]``-numbered lines, the target the
chunk's part of the program (``keep_all()`` when nothing in it is deleted); see
``refinex.model.sft.build_sft_pairs``, which runs inside ``mapInPandas``. Chunks are cut
with the base's tokenizer and ``chunking.max_tokens`` (the refine stage cuts documents the
same way). The split is by document (a hash of the doc id, ``sft.validation_fraction``),
so it is the same on every run and no document straddles it.

The base checkpoint is prepared on the driver (``refinex.model.bases.prepare_base``; the
``tiny`` base's tokenizer is also trained on up to ``model.tokenizer_corpus_docs``
training documents); its tokenizer files travel to the workers inside the task closure and
are loaded once per worker process. The table is rebuilt as a whole: it holds exactly the
pairs of the latest build (one program version, one tokenizer), written with an
idempotent MERGE that also deletes pairs the build no longer has.
"""
from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from refinex.config import Config
from refinex.spark.stage import Param, Stage, StageContext
from refinex.spark.tables import DOCUMENTS, ORIGIN_DISTILLED, PROGRAMS, SFT_PAIRS, TABLES, TableResolver, read_table

log = logging.getLogger(__name__)

STAGE = "sft_pairs"

PAIRS_SCHEMA = TABLES[SFT_PAIRS].project(exclude=("origin_version", "base_tokenizer", "prompt_version", "created_at"))
"""What the workers return: the ``sft_pairs`` columns less those the driver adds."""
_COLUMNS = [f.name for f in PAIRS_SCHEMA.fields]

# Files of a checkpoint that are never needed to load its tokenizer.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx", ".png")
_MAX_TOKENIZER_FILE_BYTES = 64 << 20

# Per worker process: tokenizer id -> loaded tokenizer (see ``cached_tokenizer``).
_TOKENIZERS: dict[str, Any] = {}


def _counter_spec(files: Mapping[str, bytes]) -> Optional[dict[str, Any]]:
    """The ``counter`` of a base without a tokenizer (``refinex_base.json``), if any."""
    import json

    from refinex.model.bases import BASE_INFO_FILE

    data = files.get(BASE_INFO_FILE)
    if data is None:
        return None
    counter = json.loads(data.decode("utf-8")).get("counter")
    return dict(counter) if isinstance(counter, dict) else None


def tokenizer_files(checkpoint: Path) -> dict[str, bytes]:
    """The files of ``checkpoint`` a tokenizer loads from (everything but weights); for a
    base without a tokenizer (the fast tier's), the ``refinex_base.json`` naming its counter."""
    files: dict[str, bytes] = {}
    for path in sorted(Path(checkpoint).iterdir()):
        if not path.is_file() or path.suffix in _WEIGHT_SUFFIXES or path.name.startswith("."):
            continue
        if path.stat().st_size > _MAX_TOKENIZER_FILE_BYTES:
            continue
        files[path.name] = path.read_bytes()
    if not any(name.startswith("tokenizer") for name in files) and _counter_spec(files) is None:
        raise FileNotFoundError(f"{checkpoint} has no tokenizer files")
    return files


def tokenizer_id(checkpoint: Path) -> str:
    """``<checkpoint dir name>:<sha256 of its tokenizer files, 12 hex>`` (content-based)."""
    import json

    digest = hashlib.sha256()
    files = tokenizer_files(checkpoint)
    for name, data in files.items():
        if name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "added_tokens")):
            digest.update(name.encode("utf-8") + b"\0" + hashlib.sha256(data).digest())
    counter = _counter_spec(files)
    if counter is not None and not any(name.startswith("tokenizer") for name in files):
        digest.update(json.dumps(counter, sort_keys=True).encode("utf-8"))
    return f"{Path(checkpoint).name}:{digest.hexdigest()[:12]}"


def token_counter(key: str, files: Mapping[str, bytes]) -> Callable[[str], int]:
    """How the checkpoint of ``files`` counts a chunk's tokens: its Hugging Face tokenizer,
    or the counter its ``refinex_base.json`` names (``whitespace``: words)."""
    from refinex.chunking import hf_token_counter, whitespace_token_count

    if any(name.startswith("tokenizer") for name in files):
        return hf_token_counter(cached_tokenizer(key, files))
    counter = _counter_spec(files) or {}
    if counter.get("kind") != "whitespace":
        raise ValueError(f"{key}: unknown token counter {counter!r}")
    return whitespace_token_count


def chunk_budget(files: Mapping[str, bytes], default: int) -> int:
    """Tokens per chunk: the counter's own ``max_tokens`` where it has one (the fast tier
    reads whole documents), else ``default`` (``chunking.max_tokens``)."""
    counter = _counter_spec(files) if not any(name.startswith("tokenizer") for name in files) else None
    budget = (counter or {}).get("max_tokens")
    return int(budget) if budget else int(default)


def cached_tokenizer(key: str, files: Mapping[str, bytes]) -> Any:
    """The tokenizer ``key``, loaded once per process from ``files``.

    The files are written once per machine to ``<tmp>/refinex-tokenizers/<hash of key>``
    (into a temporary sibling, then renamed, so concurrent workers never see half a folder).
    """
    cached = _TOKENIZERS.get(key)
    if cached is not None:
        return cached
    from transformers import AutoTokenizer

    root = Path(tempfile.gettempdir()) / "refinex-tokenizers"
    directory = root / hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    if not directory.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
        for name, data in files.items():
            (staging / name).write_bytes(data)
        try:
            staging.rename(directory)
        except OSError:  # another worker got there first
            shutil.rmtree(staging, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    tokenizer.model_max_length = 1 << 30  # counting only: no "sequence too long" warnings
    _TOKENIZERS[key] = tokenizer
    return tokenizer


def resolve_sft_version(spark: SparkSession, config: Config, tables: "TableResolver | str", origin_version: Optional[str] = None) -> str:
    """The distilled program version to build pairs from (argument, ``sft.origin_version``,
    else the newest distilled version of the configured expert)."""
    from refinex.spark.origins import default_origin_version

    chosen = origin_version or config.sft.origin_version
    return chosen or default_origin_version(spark, config, tables, ORIGIN_DISTILLED)


SPLITS = ("train", "validation")


def split_filter(fraction: float) -> Any:
    """A UDF: the SFT split (``refinex.model.sft.assign_split``) of a doc id."""
    from pyspark.sql.types import StringType

    def split_of(doc_id: str) -> str:
        from refinex.model.sft import assign_split

        return assign_split(doc_id, fraction)

    return F.udf(split_of, StringType())


def _sample_filter(validation_fraction: float, sample: float) -> Any:
    """A UDF: whether a document stays (every validation document; training documents in
    the training sample, ``refinex.model.sft.in_train_sample``)."""
    from pyspark.sql.types import BooleanType

    def keep(doc_id: str) -> bool:
        from refinex.model.sft import VALIDATION, assign_split, in_train_sample

        return assign_split(doc_id, validation_fraction) == VALIDATION or in_train_sample(doc_id, sample)

    return F.udf(keep, BooleanType())


def _labelled_documents(
    spark: SparkSession, tables: "TableResolver | str", origin_version: str, validation_fraction: float = 0.0,
    sample: float = 1.0,
) -> Any:
    """``documents`` joined with the version's distilled programs: doc_id, text, program
    (training documents outside a ``sample`` < 1 left out)."""
    programs = (
        read_table(spark, tables, PROGRAMS)
        .where((F.col("origin") == ORIGIN_DISTILLED) & (F.col("origin_version") == origin_version))
        .where(F.col("program").isNotNull())
        .select("doc_id", "program")
    )
    labelled = read_table(spark, tables, DOCUMENTS).select("doc_id", "text").join(programs, "doc_id")
    if sample < 1.0:
        labelled = labelled.where(_sample_filter(validation_fraction, sample)(F.col("doc_id")))
    return labelled


def prepare_sft_base(
    spark: SparkSession, config: Config, tables: "TableResolver | str", base: str, origin_version: str
) -> Path:
    """The base checkpoint (on the driver) whose tokenizer cuts the chunks.

    A ``tiny`` base gets its tokenizer trained on the seed texts plus the text of the first
    ``model.tokenizer_corpus_docs`` training-split documents (by doc_id) of the version, so
    the same tables always give the same (cached) base.
    """
    from refinex.model.bases import list_profiles, load_profile, prepare_base
    from refinex.model.sft import TRAIN, assign_split

    corpus: list[str] = []
    limit = config.model.tokenizer_corpus_docs
    if limit and base in list_profiles() and load_profile(base).kind == "tiny":
        labelled = _labelled_documents(spark, tables, origin_version)
        fraction = float(config.sft.validation_fraction)
        ids = sorted(
            doc_id for (doc_id,) in labelled.select("doc_id").collect() if assign_split(doc_id, fraction) == TRAIN
        )[:limit]
        if ids:
            wanted = spark.createDataFrame([(i,) for i in ids], "doc_id string")
            texts = dict(labelled.join(F.broadcast(wanted), "doc_id").select("doc_id", "text").collect())
            corpus = [texts[i] for i in ids if i in texts]
    return prepare_base(base, corpus_texts=corpus)


def _pairs_partition(
    key: str, files: Mapping[str, bytes], max_tokens: int, validation_fraction: float
) -> Callable[[Iterator[Any]], Iterator[Any]]:
    """The ``mapInPandas`` function: (doc_id, text, program) -> ``PAIRS_SCHEMA`` rows."""

    def run(batches: Iterator[Any]) -> Iterator[Any]:
        import pandas as pd

        from refinex.model.sft import InvalidProgramError, build_sft_pairs

        count = token_counter(key, files)
        for batch in batches:
            rows: list[dict[str, Any]] = []
            for doc_id, text, program in zip(batch["doc_id"], batch["text"], batch["program"]):
                try:
                    pairs = build_sft_pairs(
                        doc_id, text, program, count, max_tokens=max_tokens, validation_fraction=validation_fraction
                    )
                except InvalidProgramError as exc:
                    log.warning("no SFT pairs for %s: %s", doc_id, exc)
                    continue
                for pair in pairs:
                    row = pair.to_row()
                    row["n_chunks"] = len(pairs)
                    rows.append({c: row[c] for c in _COLUMNS})
            frame = pd.DataFrame.from_records(rows, columns=_COLUMNS)
            yield frame

    return run


def build_sft_pairs(ctx: StageContext, origin_version: Optional[str] = None, base: Optional[str] = None) -> dict[str, Any]:
    """Rebuild ``sft_pairs`` from the distilled programs of one version; returns statistics."""
    from refinex.model.prompts import PROMPT_VERSION

    spark, config, workdir = ctx.spark, ctx.config, ctx.tables
    version = resolve_sft_version(spark, config, workdir, origin_version)
    base_name = base or config.model.base
    checkpoint = prepare_sft_base(spark, config, workdir, base_name, version)
    key = tokenizer_id(checkpoint)
    files = tokenizer_files(checkpoint)
    labelled = _labelled_documents(spark, workdir, version, float(config.sft.validation_fraction),
                                   float(config.sft.train_sample))
    n_documents = labelled.count()
    partitions = max(1, min(config.spark.partitions * 4, -(-n_documents // 50)))
    pairs = (
        labelled.repartition(partitions, "doc_id")
        .mapInPandas(
            _pairs_partition(key, files, chunk_budget(files, config.chunking.max_tokens),
                             float(config.sft.validation_fraction)),
            PAIRS_SCHEMA,
        )
        .withColumns({
            "origin_version": F.lit(version),
            "base_tokenizer": F.lit(key),
            "prompt_version": F.lit(PROMPT_VERSION),
            "created_at": F.current_timestamp(),
        })
    )
    metrics = ctx.merge(SFT_PAIRS, pairs, delete_missing=True)
    summary = {
        r["split"]: r
        for r in ctx.read(SFT_PAIRS)
        .groupBy("split")
        .agg(
            F.count(F.lit(1)).alias("pairs"),
            F.countDistinct("doc_id").alias("documents"),
            F.max("n_prompt_tokens").alias("max_tokens"),
            F.avg("n_prompt_tokens").alias("mean_tokens"),
            F.count(F.when(F.col("target") == "keep_all()\n", 1)).alias("keep_all"),
        )
        .collect()
    }

    def total(column: str) -> int:
        return sum(int(r[column] or 0) for r in summary.values())

    stats: dict[str, Any] = {
        "origin_version": version,
        "base": base_name,
        "base_tokenizer": key,
        "max_tokens": chunk_budget(files, config.chunking.max_tokens),
        "validation_fraction": float(config.sft.validation_fraction),
        "train_sample": float(config.sft.train_sample),
        "documents": n_documents,
        "documents_with_pairs": total("documents"),
        "invalid_programs": n_documents - total("documents"),
        "pairs": total("pairs"),
        "keep_all_targets": total("keep_all"),
        "max_prompt_tokens": max((int(r["max_tokens"] or 0) for r in summary.values()), default=0),
        **{f"{split}_pairs": int(summary[split]["pairs"]) if split in summary else 0 for split in ("train", "validation")},
        **{
            f"{split}_documents": int(summary[split]["documents"]) if split in summary else 0
            for split in ("train", "validation")
        },
        "table_version": ctx.version(SFT_PAIRS),
        "rows_deleted": metrics.get("deleted", 0),
    }
    ctx.record(
        origin_version=version, base=base_name, base_tokenizer=key, base_path=str(checkpoint),
        max_tokens=chunk_budget(files, config.chunking.max_tokens),
        validation_fraction=float(config.sft.validation_fraction), tokenizer_corpus_docs=config.model.tokenizer_corpus_docs,
    )
    return stats


BASE_PARAM = Param(
    "base", "Base of the refine model: tiny, smollm2-135m-l12, smollm2-135m, qwen3-0.6b-base or a checkpoint "
    "folder (default: model.base of the profile).",
)

SFT_PAIRS_STAGE = Stage(
    name=STAGE,
    help="Rebuild sft_pairs: one (prompt, target) pair per chunk of every distilled program.",
    reads=(DOCUMENTS, PROGRAMS),
    writes=(SFT_PAIRS,),
    transform=build_sft_pairs,
    params=(
        Param("origin_version", "Distilled program version (default: the newest of the expert)."),
        BASE_PARAM,
    ),
    describe=lambda s: (f"{s['origin_version']}: {s['pairs']} pairs ({s['train_pairs']} train, "
                        f"{s['validation_pairs']} validation) from {s['documents_with_pairs']} documents"),
)
