"""The refine model on the validation documents of the dev pages, through the Spark stages.

All dev pages are ingested into a workdir (reused between runs: every stage is idempotent,
training is reused when the pairs and settings are the same), refined by the trafilatura
expert and distilled; ``sft_pairs`` are built with a document-level split
(``--validation-fraction``), and each model variant (``--variant NAME:key=value,...``,
configuration overrides) is trained with ``refinex.spark.train.run_train`` and runs the
``refine`` stage on the validation documents, constrained and unconstrained, followed by
``apply`` and ``stats``. Scored on the validation documents only (snippet P/R/F1 on the
trafilatura-eval pages, bag-of-words P/R/F1 on the scrapinghub pages):

    raw text, the expert's output, the distilled programs (the oracle the model imitates),
    a linear line tagger trained on the training documents' distilled programs, and each
    refine model (constrained and unconstrained decoding).

Also reported: invalid programs (a chunk output with a line that does not parse or an
operation outside its chunk, or an operation ``execute`` rejects), mean deletion ratio,
refine-stage docs/s on this CPU, and, with ``--smollm2-probe-steps``, the measured time of
a SmolLM2-135M training step on these pairs (an epoch estimate)::

    python benchmarks/refine_model_dev.py --write-benchmarks
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from report import cpu_model, load_average, use_offline_environment, write_section  # noqa: E402

use_offline_environment()

from refinex.config import Config, load_config  # noqa: E402
from refinex.evaluation import load_pages, score_outputs  # noqa: E402

DEFAULT_PAGES = REPO.parent / "shared" / "data" / "webpages-dev.jsonl.gz"
SECTION = "## Refine model on dev validation documents"
DEFAULT_VARIANTS = (
    "tiny-1ep:train.epochs=1",
    "tiny-3ep:train.epochs=3",
    "tiny-3ep-c512:train.epochs=3,chunking.max_tokens=512",
    "smollm2-l12-2ep:model.base=smollm2-135m-l12,chunking.max_tokens=512,train.epochs=2,train.eval_max_pairs=256,"
    "refine.options.dtype=bfloat16,refine.batch_size=32,modes=constrained",
)
MODES = ("constrained", "unconstrained")


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME:key=value,key=value`` -> ``(NAME, overrides)`` (values parsed as YAML).

    ``modes=constrained`` (or ``unconstrained``) among them limits the decoding modes the
    variant is refined with (default: both)."""
    from refinex.config import parse_override

    name, _, rest = text.partition(":")
    if not name:
        raise argparse.ArgumentTypeError(f"expected NAME:key=value,..., got {text!r}")
    overrides = dict(parse_override(item) for item in rest.split(",") if item.strip())
    modes = overrides.get("modes", "+".join(MODES))
    if any(m not in MODES for m in str(modes).split("+")):
        raise argparse.ArgumentTypeError(f"modes must be {' or '.join(MODES)} (joined by '+'), got {modes!r}")
    return name, overrides


def prepare(spark: Any, config: Config, workdir: str, pages: Path) -> dict[str, Any]:
    """Ingest, expert, distill and the distilled programs' apply/stats (idempotent)."""
    from refinex.spark.registry import run_stage
    from refinex.spark.tables import read_table

    if read_table(spark, workdir, "documents").count() == 0:
        run_stage("ingest", spark, config, workdir, input=str(pages))
    expert = run_stage("expert", spark, config, workdir)
    run_stage("distill", spark, config, workdir, expert=expert["expert"])
    version = f"{expert['expert']}:{expert['expert_version']}"
    run_stage("apply", spark, config, workdir, origin="distilled", origin_version=version)
    run_stage("stats", spark, config, workdir, origin="distilled", origin_version=version)
    return {"expert": expert["expert"], "distilled_version": version}


def split_ids(spark: Any, workdir: str, fraction: float) -> tuple[list[str], list[str]]:
    """``(train ids, validation ids)`` of all documents (the SFT split)."""
    from refinex.model.sft import VALIDATION, assign_split
    from refinex.spark.tables import read_table

    ids = sorted(r[0] for r in read_table(spark, workdir, "documents").select("doc_id").collect())
    validation = [i for i in ids if assign_split(i, fraction) == VALIDATION]
    return [i for i in ids if assign_split(i, fraction) != VALIDATION], validation


def origin_outputs(spark: Any, workdir: str, origin: str, version: str, ids: set[str]) -> dict[str, Any]:
    """Texts, deletion ratios and invalid-program counts of one origin on ``ids``."""
    from pyspark.sql import functions as F

    from refinex.spark.tables import read_table

    where = (F.col("origin") == origin) & (F.col("origin_version") == version)
    refined = {r["doc_id"]: r for r in read_table(spark, workdir, "refined_documents").where(where).collect()
               if r["doc_id"] in ids}
    stats = {r["doc_id"]: r for r in read_table(spark, workdir, "edit_stats").where(where).collect()
             if r["doc_id"] in ids}
    texts = {doc_id: row["refined_text"] for doc_id, row in refined.items()}
    ratios = [r["deletion_ratio"] for r in stats.values() if r["deletion_ratio"] is not None]
    rejected = {doc_id for doc_id, r in stats.items() if (r["ops_rejected"] or 0) > 0 or (r["parse_errors"] or 0) > 0}
    result: dict[str, Any] = {
        "texts": texts,
        "mean_deletion_ratio": statistics.fmean(ratios) if ratios else None,
        "statuses": dict(sorted(_count(r["status"] for r in refined.values()).items())),
        "rejected_docs": len(rejected),
    }
    if origin == "model":
        outputs = {r["doc_id"]: r for r in read_table(spark, workdir, "model_outputs")
                   .where(F.col("origin_version") == version).collect() if r["doc_id"] in ids}
        bad_output = {d for d, r in outputs.items() if (r["parse_errors"] or 0) > 0 or (r["ops_out_of_chunk"] or 0) > 0}
        invalid = bad_output | rejected
        chunks = sum(r["n_chunks"] or 0 for r in outputs.values())
        result.update(
            documents=len(outputs),
            invalid_docs=len(invalid),
            invalid_rate=len(invalid) / len(outputs) if outputs else None,
            invalid_chunks=sum(r["invalid_chunks"] or 0 for r in outputs.values()),
            chunks=chunks,
            parse_error_docs=sum(1 for r in outputs.values() if (r["parse_errors"] or 0) > 0),
            out_of_chunk_docs=sum(1 for r in outputs.values() if (r["ops_out_of_chunk"] or 0) > 0),
        )
    return result


def _count(values: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


def line_tagger_outputs(
    spark: Any, config: Config, workdir: str, version: str, train_ids: set[str], ids: set[str]
) -> dict[str, Any]:
    """The line tagger trained on the training documents' distilled programs, run on ``ids``."""
    from pyspark.sql import functions as F

    from refinex.model.tagger import LineTagger
    from refinex.program import Guardrails, execute
    from refinex.spark.tables import read_table

    programs = dict(
        read_table(spark, workdir, "programs")
        .where((F.col("origin") == "distilled") & (F.col("origin_version") == version) & F.col("program").isNotNull())
        .select("doc_id", "program").collect()
    )
    texts = dict(read_table(spark, workdir, "documents").select("doc_id", "text").collect())
    started = time.process_time()
    tagger = LineTagger().fit([(texts[i], programs[i]) for i in sorted(train_ids) if i in programs])
    fit_s = time.process_time() - started
    guardrails = Guardrails(config.guardrails.max_error_ratio, config.guardrails.min_kept_chars)
    outputs, ratios = {}, []
    started = time.process_time()
    for doc_id in sorted(ids):
        result = execute(tagger.predict_program(texts[doc_id]), texts[doc_id], guardrails)
        outputs[doc_id] = result.text
        ratios.append(result.deletion_ratio)
    return {"texts": outputs, "mean_deletion_ratio": statistics.fmean(ratios), "fit_cpu_s": fit_s,
            "predict_cpu_s": time.process_time() - started,
            "train_docs": sum(1 for i in train_ids if i in programs)}


def measured_refine(spark: Any, workdir: str, origin_version: str) -> dict[str, Any]:
    """The statistics of the latest ``refine`` run of ``origin_version`` that refined documents."""
    from pyspark.sql import functions as F

    from refinex.spark.tables import read_table

    rows = (read_table(spark, workdir, "stage_runs").where(F.col("stage") == "refine")
            .orderBy(F.col("ended_at").desc()).select("params", "stats").collect())
    for row in rows:
        stats = json.loads(row["stats"])
        if stats.get("origin_version") == origin_version and stats.get("processed"):
            return stats
    raise LookupError(f"no refine run of {origin_version} in {workdir}")


def run_variant(
    spark: Any, config: Config, workdir: str, name: str, overrides: Mapping[str, Any], distilled: str,
    force_refine: bool,
) -> dict[str, Any]:
    """sft_pairs -> train -> refine (validation, constrained and not) -> apply -> stats.

    Without ``force_refine`` documents the model already refined are kept, and the speed
    reported is that of the run that refined them (``stage_runs``)."""
    from refinex.spark.registry import run_stage

    overrides = dict(overrides)
    modes = str(overrides.pop("modes", "+".join(MODES))).split("+")
    cfg = config.with_overrides(overrides)
    sft = run_stage("sft_pairs", spark, cfg, workdir, origin_version=distilled)
    train = run_stage("train", spark, cfg, workdir)
    if train["reused"]:
        train.update(_registered_metrics(cfg, workdir, train["version"]))
    if "val_char_f1" not in train:  # registered before the metric existed: measure it now
        from refinex.spark.refine import resolve_model
        from refinex.spark.train import evaluate_checkpoint

        checkpoint = resolve_model(cfg, workdir, train["model_uri"]).checkpoint
        train.update(evaluate_checkpoint(spark, cfg, workdir, checkpoint))
    runs = {}
    for constrained in (mode == "constrained" for mode in modes):
        refined = run_stage("refine", spark, cfg, workdir, model=train["model_uri"], unconstrained=not constrained, split="validation",
                             force=force_refine)
        origin = {"origin": "model", "origin_version": refined["origin_version"]}
        run_stage("apply", spark, cfg, workdir, **origin)
        run_stage("stats", spark, cfg, workdir, **origin)
        runs["constrained" if constrained else "unconstrained"] = (
            refined if refined["processed"] else measured_refine(spark, workdir, refined["origin_version"]))
    return {"name": name, "overrides": dict(overrides), "sft": sft, "train": train, "refine": runs}


def _registered_metrics(config: Config, workdir: str, version: str) -> dict[str, Any]:
    """Training metrics of a reused registry version (its tags)."""
    from mlflow import MlflowClient

    from refinex.spark.train import tracking_uri_for

    uri = tracking_uri_for(config, workdir)
    tags = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version(
        config.model.registered_name, version).tags
    out: dict[str, Any] = {}
    for key in ("steps", "train_seconds", "validation_loss", "final_train_loss", "n_train_pairs", "val_line_f1",
                "val_char_f1", "val_exact_match", "tag_threshold", "cv_kept_char_f1", "validation_kept_char_f1",
                "feature_seconds"):
        if key in tags:
            out[key] = float(tags[key])
    if "tag_threshold" in out:
        out["threshold"] = out.pop("tag_threshold")
    out["train_pairs"] = int(out.pop("n_train_pairs", 0))
    return out


def _probe_steps(pairs: Sequence[tuple[str, str]], steps: int) -> dict[str, Any]:
    """In a child process: time SmolLM2-135M training steps (batch 1) on median-length pairs,
    in fp32 and with bf16 autocast (``precision="bf16"``)."""
    import torch

    from refinex.model.bases import load_checkpoint, prepare_base
    from refinex.model.train import autocast_context, collate_batch, encode_pair, target_loss_sum

    torch.set_num_threads(os.cpu_count() or 1)
    model, tokenizer = load_checkpoint(prepare_base("smollm2-135m"))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    examples = [e for e in (encode_pair(tokenizer, p, t, 2048) for p, t in pairs) if e is not None]
    by_length = sorted(examples, key=lambda e: len(e.input_ids))
    middle = len(by_length) // 2
    chosen = by_length[max(0, middle - (steps + 1) // 2) : middle + steps // 2 + 1]
    total_tokens = sum(len(e.input_ids) for e in examples)
    cores = os.cpu_count() or 1
    result: dict[str, Any] = {"pairs": len(examples), "measured": len(chosen) - 1,
                              "mean_tokens": total_tokens / len(examples), "cores": cores}
    for precision in ("fp32", "bf16"):
        seconds = cpu_seconds = tokens = 0.0
        for index, example in enumerate(chosen):
            started, cpu_started = time.perf_counter(), time.process_time()
            with autocast_context(torch.device("cpu"), precision):
                loss_sum, n_tokens = target_loss_sum(model, *collate_batch([example], int(tokenizer.pad_token_id), "cpu"))
            (loss_sum / n_tokens).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if index:  # the first one warms up
                seconds += time.perf_counter() - started
                cpu_seconds += time.process_time() - cpu_started
                tokens += len(example.input_ids)
        # CPU time holds on a shared machine; the estimate assumes every core is free.
        tokens_per_s = tokens / cpu_seconds * cores
        key = "" if precision == "fp32" else "bf16_"
        result.update({f"{key}tokens_per_s": tokens_per_s, f"{key}wall_tokens_per_s": tokens / seconds,
                       f"{key}epoch_hours": total_tokens / tokens_per_s / 3600})
    return result


def train_pairs(spark: Any, workdir: str) -> list[tuple[str, str]]:
    """``(prompt, target)`` of the training split of ``sft_pairs`` as it is now."""
    from refinex.spark.tables import read_table

    rows = read_table(spark, workdir, "sft_pairs").where("split = 'train'").orderBy("doc_id", "chunk_idx")
    return [(r["prompt"], r["target"]) for r in rows.select("prompt", "target").collect()]


def smollm2_probe(pairs: Sequence[tuple[str, str]], steps: int) -> Optional[dict[str, Any]]:
    """SmolLM2-135M training speed on this CPU (in a child process: a failure or an
    out-of-memory kill there only loses the probe), extrapolated to one epoch of ``pairs``."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(_probe_steps, pairs, steps).result()
    except Exception as exc:  # noqa: BLE001 - a missing package or a killed child: report, do not fail
        print(f"smollm2 probe failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def _row(label: str, scores: Mapping[str, Any], ratio: Optional[float], invalid: str = "-") -> str:
    s, b = scores["snippet"], scores["bow"]
    ratio_text = "-" if ratio is None else f"{ratio:.3f}"
    return (f"| {label} | {s['precision']:.3f} | {s['recall']:.3f} | **{s['f1']:.3f}** | {b['precision']:.3f} "
            f"| {b['recall']:.3f} | **{b['f1']:.3f}** | {invalid} | {ratio_text} |")


def _metric(values: Mapping[str, Any], key: str, digits: int = 3) -> str:
    return f"{values[key]:.{digits}f}" if values.get(key) is not None else "-"


def reading(report: Mapping[str, Any], rates: Sequence[float], fallback: Sequence[int]) -> str:
    """The plain-words paragraph under the tables (what the rows say)."""
    scores = report["scores"]
    tiny = [v for v in report["variants"] if str(v["train"]["base"]).startswith("tiny")]
    pretrained = [v for v in report["variants"] if v not in tiny]
    text = "Reading it plainly: grammar-constrained decoding does what it promises (0 invalid chunks"
    text += (f", against {100 * min(rates):.0f}-{100 * max(rates):.0f}% of the chunks without it). " if rates
             else "; no variant ran without it here). ")
    if tiny:
        text += ("A ~1M-parameter model trained from scratch on a CPU has not learned *which* lines to delete: "
                 "forced to write valid programs, it deletes far too much (mean deletion ratio above the oracle's). "
                 "Without constraints the invalid outputs lose their deletions (lines that do not parse count as "
                 "errors, operations on lines outside the chunk are dropped) and where errors exceed the guardrail "
                 f"the raw text is kept ({min(fallback)}-{max(fallback)} of {report['validation_docs']} documents "
                 "`fallback_raw`), so the unconstrained rows sit closer to the raw text. ")
    voted: list[str] = []
    for variant in pretrained:
        key = f"{variant['name']}/constrained"
        if key not in scores:
            continue
        train = variant["train"]
        overrides = variant.get("overrides", {})
        if overrides.get("refine.options.votes"):
            decoding = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items() if k.startswith("refine.options.")
                                 and k.split(".")[-1] in ("votes", "vote_threshold", "vote_below", "temperature"))
            voted.append(f"{variant['name']} ({decoding}) snippet F1 {scores[key]['snippet']['f1']:.3f} "
                         f"(P {scores[key]['snippet']['precision']:.3f}, R {scores[key]['snippet']['recall']:.3f}) and "
                         f"bag-of-words F1 {scores[key]['bow']['f1']:.3f}, deleting "
                         f"{report['models'][key]['mean_deletion_ratio']:.3f} of the characters, at "
                         f"{variant['refine']['constrained'].get('docs_per_s', 0):.2f} documents/s")
            continue
        text += (f"The pretrained base ({train['base']}, {int(train['steps'])} steps in "
                 f"{train['train_seconds'] / 60:.0f} minutes on this CPU) is a different model: snippet F1 "
                 f"{scores[key]['snippet']['f1']:.3f} and bag-of-words F1 {scores[key]['bow']['f1']:.3f} against "
                 f"the tagger's {scores['tagger']['snippet']['f1']:.3f} and {scores['tagger']['bow']['f1']:.3f}, "
                 f"deleting {report['models'][key]['mean_deletion_ratio']:.3f} of the characters on average (the "
                 f"oracle {report['ratios']['distilled']:.3f}). ")
    if voted:
        text += ("Decoded with line votes (the chunks whose greedy program has an operation under vote_below "
                 "confidence are sampled `votes` times and keep every line fewer than vote_threshold of the samples "
                 "delete), the pretrained model scores: " + "; ".join(voted) + ". The samples are drawn at random, "
                 "so such a row moves by up to about 0.02 from one run to the next; the next section chooses the "
                 "settings by cross-validation. ")
    return text.rstrip()


def merge_reports(report: Mapping[str, Any], earlier: Mapping[str, Any], note: str = "") -> dict[str, Any]:
    """``report`` plus the variants of ``earlier`` it does not have (marked ``earlier_run``),
    and ``earlier``'s SmolLM2 probe when ``report`` has none; ``note`` says how the earlier
    run differs (rendered with the † footnote)."""
    merged = json.loads(json.dumps(report))
    names = {v["name"] for v in merged["variants"]}
    merged["superseded"] = {}
    for variant in earlier["variants"]:
        if variant["name"] in names:  # this run's replaces it; keep its headline for comparison
            key = f"{variant['name']}/constrained"
            if key in earlier["scores"]:
                merged["superseded"][variant["name"]] = {
                    "snippet_f1": earlier["scores"][key]["snippet"]["f1"], "bow_f1": earlier["scores"][key]["bow"]["f1"],
                    "docs_per_s": variant["refine"]["constrained"].get("docs_per_s")}
            continue
        merged["variants"].append({**variant, "earlier_run": True})
        for mode in variant["refine"]:
            key = f"{variant['name']}/{mode}"
            merged["scores"][key] = earlier["scores"][key]
            merged["models"][key] = earlier["models"][key]
    if not merged.get("smollm2") and earlier.get("smollm2"):
        merged["smollm2"] = {**earlier["smollm2"], "earlier_run": True}
    merged["earlier_command"] = earlier["command"]
    merged["earlier_note"] = note
    return merged


def render(report: Mapping[str, Any]) -> str:
    """The BENCHMARKS.md section."""
    scores, ratios = report["scores"], report["ratios"]
    lines = [
        SECTION,
        "",
        f"Machine: {report['machine']}. Command: `{report['command']}` ({report['wall_s']:.0f} s wall-clock; "
        f"load average {report['load']} at the end; the 2 cores were shared with other jobs).",
        f"Data: `webpages-dev.jsonl.gz`, all {report['documents']} pages ingested, refined by trafilatura and distilled; "
        f"SFT split by document with validation fraction {report['validation_fraction']}: "
        f"{report['train_docs']} training documents, **{report['validation_docs']} validation documents scored** "
        f"({scores['raw']['snippet']['pages']} trafilatura-eval pages for snippet scores, "
        f"{scores['raw']['bow']['pages']} scrapinghub pages for bag-of-words).",
        "",
        "| output (validation documents) | P | R | F1 | bow P | bow R | bow F1 | invalid programs | mean deletion ratio |",
        "|---|---|---|---|---|---|---|---|---|",
        _row("raw text (all visible text)", scores["raw"], 0.0),
        _row("expert output (trafilatura, not deletion-only)", scores["expert"], None),
        _row("distilled oracle (the programs the model learns)", scores["distilled"], ratios["distilled"]),
        _row(f"line tagger (logistic regression, {report['tagger']['train_docs']} training documents)",
             scores["tagger"], ratios["tagger"]),
    ]
    for variant in report["variants"]:
        for mode in variant["refine"]:
            key = f"{variant['name']}/{mode}"
            model = report["models"][key]
            invalid = f"{model['invalid_docs']}/{model['documents']} ({100 * (model['invalid_rate'] or 0):.1f}%)"
            mark = " (earlier run †)" if variant.get("earlier_run") else ""
            lines.append(_row(f"refine model {variant['name']}, {mode}{mark}", scores[key],
                              model["mean_deletion_ratio"], invalid))
    lines += [
        "",
        "| model | base, settings | train pairs | steps | train s | validation loss (start -> end) "
        "| val line F1 / char F1 | refine docs/s (constrained / unconstrained) | chunks | invalid chunks (c / u) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for variant in report["variants"]:
        train, runs = variant["train"], variant["refine"]
        start = train.get("initial_validation_loss")
        loss = f"{start:.3f} -> {train['validation_loss']:.3f}" if start is not None else f"{train['validation_loss']:.3f}"
        settings = ", ".join(f"{k}={v}" for k, v in variant["overrides"].items()) or "defaults"
        c, u = runs.get("constrained", {}), runs.get("unconstrained", {})
        lines.append(
            f"| {variant['name']}{' †' if variant.get('earlier_run') else ''} ({train['model_uri']}) "
            f"| {train['base']}, {settings} | {train['train_pairs']} "
            f"| {int(train['steps'])} | {train['train_seconds']:.0f} | {loss} | {_metric(train, 'val_line_f1')} / "
            f"{_metric(train, 'val_char_f1')} "
            f"| {_metric(c, 'docs_per_s', 2)} / {_metric(u, 'docs_per_s', 2)} | {c.get('chunks', u.get('chunks'))} "
            f"| {c.get('invalid_chunks', '-')} / {u.get('invalid_chunks', '-')} |"
        )
    if any(v.get("earlier_run") for v in report["variants"]):
        note = report.get("earlier_note")
        lines += ["", f"† Merged from an earlier run of this script (`{report['earlier_command']}`)"
                  + (f", {note}" if note else "") + "; the other rows are this run's"
                  + (", the SmolLM2 step timing below is the earlier run's." if
                     (report.get("smollm2") or {}).get("earlier_run") else ".")]
        for name, old in (report.get("superseded") or {}).items():
            speed = f" at {old['docs_per_s']:.2f} docs/s" if old.get("docs_per_s") else ""
            lines[-1] += (f" In that run, {name} trained on the earlier programs scored snippet F1 "
                          f"{old['snippet_f1']:.3f} and bag-of-words F1 {old['bow_f1']:.3f}{speed} (constrained).")
    probe = report.get("smollm2")
    lines.append("")
    if probe:
        bf16 = ""
        if probe.get("bf16_tokens_per_s"):
            bf16 = (f" ({probe['bf16_tokens_per_s']:.0f} tokens/s and about {probe['bf16_epoch_hours']:.1f} hours "
                    "with bf16 autocast)")
        lines.append(
            f"The full SmolLM2-135M (30 layers) was not trained here: its fp32 training (batch 1, {probe['measured']} "
            f"median-length pairs of the default 1500-token chunks) processes {probe['tokens_per_s']:.0f} tokens/s "
            f"with all {probe['cores']} cores free (from its CPU time; {probe['wall_tokens_per_s']:.0f} tokens/s "
            f"wall-clock in this shared run), so one epoch over the {probe['pairs']} training pairs (mean "
            f"{probe['mean_tokens']:.0f} SmolLM2 tokens) takes about **{probe['epoch_hours']:.1f} hours** on this "
            f"CPU{bf16}. `smollm2-135m-l12` keeps its first 12 decoder layers (layer pruning; embeddings, final norm "
            "and head kept) and trains with bf16 autocast: its two epochs over the 512-token chunks are in the table "
            "above, the pretrained base this CPU can afford. Train the full model on a GPU: `refinex train --workdir DIR --base "
            "smollm2-135m` (or the paper's `qwen3-0.6b-base` with `--config gpu`)."
        )
    unconstrained = [v for v in report["variants"] if "unconstrained" in v["refine"]]
    rates = [v["refine"]["unconstrained"]["invalid_chunks"] / max(1, v["refine"]["unconstrained"]["chunks"])
             for v in unconstrained]
    fallback = [report["models"][f"{v['name']}/unconstrained"]["statuses"].get("fallback_raw", 0)
                for v in unconstrained] or [0]
    lines += [
        "",
        reading(report, rates, fallback),
        "",
        "The workdir is reused between runs: a model already registered for the same pairs, base and settings "
        "is not trained again, and documents a model already refined are not refined again; their training "
        "time comes from the registry and their refine speed from `stage_runs` of the run that did the work "
        f"(from scratch: about 30 minutes for the tiny variants, about two hours more for smollm2-135m-l12). Validation loss and `val_*` are on the validation "
        f"chunks ({report['eval_chunks']} for `val_*`); the line F1 counts removed lines, the char F1 weighs them "
        "by length: pages have many short boilerplate lines, so deleting nearly everything still scores a high "
        "line F1 (tiny-1ep).",
        "",
        report["verdict"],
        "",
    ]
    return "\n".join(lines)


def verdict_of(name: str, model: Mapping[str, Any], tagger: Mapping[str, Any]) -> str:
    """The refine model against the line tagger, on each score family."""
    ms, ts = model["snippet"]["f1"], tagger["snippet"]["f1"]
    mb, tb = model["bow"]["f1"], tagger["bow"]["f1"]
    head = f"Verdict: the best CPU-trained refine model ({name}, constrained) "
    if ms > ts and mb > tb:
        return head + f"beats the line tagger on both scores (snippet F1 {ms:.3f} vs {ts:.3f}, bag-of-words F1 {mb:.3f} vs {tb:.3f})."
    if ms > ts:
        return head + (f"beats the line tagger on snippet F1 ({ms:.3f} vs {ts:.3f}), not on bag-of-words F1 "
                       f"({mb:.3f} vs {tb:.3f}).")
    if mb > tb:
        return head + (f"beats the line tagger on bag-of-words F1 ({mb:.3f} vs {tb:.3f}), not on snippet F1 "
                       f"({ms:.3f} vs {ts:.3f}).")
    return head + f"does **not** beat the line tagger (snippet F1 {ms:.3f} vs {ts:.3f}, bag-of-words F1 {mb:.3f} vs {tb:.3f})."


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=Path, default=DEFAULT_PAGES, help="dev pages (.jsonl.gz)")
    parser.add_argument("--workdir", default="/tmp/refinex_refine_dev", help="workdir (reused between runs)")
    parser.add_argument("--validation-fraction", type=float, default=0.2, help="sft.validation_fraction")
    parser.add_argument("--variant", action="append", type=parse_variant, default=None,
                        help="NAME:section.key=value,... (repeatable); default: " + " ".join(DEFAULT_VARIANTS))
    parser.add_argument("--smollm2-probe-steps", type=int, default=4, help="0 = no SmolLM2 step timing")
    parser.add_argument("--write-benchmarks", action="store_true", help="update BENCHMARKS.md")
    parser.add_argument("--force-refine", action="store_true",
                        help="refine the validation documents again (default: reuse the programs of earlier runs)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw report here")
    parser.add_argument("--render-json", type=Path, default=None,
                        help="only render the section from a report written by --json (no Spark, no models)")
    parser.add_argument("--merge-json", type=Path, default=None,
                        help="with --render-json: add the variants (and SmolLM2 timing) of this earlier report that "
                             "the rendered one lacks, marked as an earlier run's")
    parser.add_argument("--merge-note", default="",
                        help="with --merge-json: how the earlier run differs (goes into the footnote)")
    args = parser.parse_args(argv)
    if args.render_json:
        report = json.loads(args.render_json.read_text(encoding="utf-8"))
        if args.merge_json:
            report = merge_reports(report, json.loads(args.merge_json.read_text(encoding="utf-8")), args.merge_note)
        section = render(report)
        print(section)
        if args.write_benchmarks:
            write_section(REPO / "BENCHMARKS.md", section, SECTION)
        return 0

    from refinex.spark.session import get_spark

    started = time.perf_counter()
    overrides = ["spark.master=local[2]", "spark.ui_enabled=false", "spark.console_progress=false",
                 "spark.log_level=ERROR", f"sft.validation_fraction={args.validation_fraction}"]
    config = load_config("default", overrides)
    workdir = str(Path(args.workdir).resolve())
    spark = get_spark(config, workdir)
    prepared = prepare(spark, config, workdir, args.pages)
    train_ids, validation_ids = split_ids(spark, workdir, args.validation_fraction)
    ids = set(validation_ids)
    pages = [p for p in load_pages(args.pages) if p["id"] in ids]

    from refinex.spark.tables import read_table

    raw = {r["doc_id"]: r["text"] for r in read_table(spark, workdir, "documents").select("doc_id", "text").collect()
           if r["doc_id"] in ids}
    expert = {r["doc_id"]: r["refined_text"] for r in read_table(spark, workdir, "expert_refinements")
              .where(f"expert = '{prepared['expert']}'").select("doc_id", "refined_text").collect() if r["doc_id"] in ids}
    distilled = origin_outputs(spark, workdir, "distilled", prepared["distilled_version"], ids)
    tagger = line_tagger_outputs(spark, config, workdir, prepared["distilled_version"], set(train_ids), ids)
    scores = {
        "raw": score_outputs(pages, raw),
        "expert": score_outputs(pages, expert),
        "distilled": score_outputs(pages, distilled["texts"]),
        "tagger": score_outputs(pages, tagger["texts"]),
    }
    ratios = {"distilled": distilled["mean_deletion_ratio"], "tagger": tagger["mean_deletion_ratio"]}
    variants, models = [], {}
    probe_pairs: Optional[list[tuple[str, str]]] = None
    for name, variant_overrides in args.variant or [parse_variant(v) for v in DEFAULT_VARIANTS]:
        result = run_variant(spark, config, workdir, name, variant_overrides, prepared["distilled_version"],
                             args.force_refine)
        variants.append(result)
        for mode, refined in result["refine"].items():
            key = f"{name}/{mode}"
            models[key] = origin_outputs(spark, workdir, "model", refined["origin_version"], ids)
            scores[key] = score_outputs(pages, models[key]["texts"])
        print(json.dumps({k: v for k, v in result.items() if k != "sft"}, indent=1, default=str), flush=True)
        if probe_pairs is None and "chunking.max_tokens" not in variant_overrides and "model.base" not in variant_overrides:
            probe_pairs = train_pairs(spark, workdir)  # the default chunking's pairs
    probe = None
    if args.smollm2_probe_steps > 0:
        probe = smollm2_probe(probe_pairs or train_pairs(spark, workdir), args.smollm2_probe_steps)

    best = max(variants, key=lambda v: scores[f"{v['name']}/constrained"]["snippet"]["f1"])
    best_key = f"{best['name']}/constrained"
    verdict = verdict_of(best["name"], scores[best_key], scores["tagger"])
    report = {
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch "
                   f"{__import__('torch').__version__}",
        "command": " ".join(["python benchmarks/refine_model_dev.py", *(sys.argv[1:] if argv is None else argv)]),
        "wall_s": time.perf_counter() - started,
        "load": load_average(),
        "documents": len(train_ids) + len(validation_ids),
        "validation_fraction": args.validation_fraction,
        "train_docs": len(train_ids),
        "validation_docs": len(validation_ids),
        "scores": scores,
        "ratios": ratios,
        "tagger": {k: v for k, v in tagger.items() if k != "texts"},
        "variants": variants,
        "models": {k: {kk: vv for kk, vv in v.items() if kk != "texts"} for k, v in models.items()},
        "smollm2": probe,
        "eval_chunks": config.model.eval_chunks,
        "verdict": verdict,
    }
    section = render(report)
    print(section)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    if args.write_benchmarks:
        write_section(REPO / "BENCHMARKS.md", section, SECTION)
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
