"""The tagging head against the other refiners on the dev validation documents.

Same data and path as ``refine_model_dev.py`` (its workdir is reused): all dev pages
ingested, refined by trafilatura and distilled, ``sft_pairs`` on ``smollm2-135m-l12`` at
512-token chunks with a document split at validation fraction 0.2 (524 training, 170
validation documents). Each ``--variant`` (``NAME:key=value,...``; default: the tagging
head on ``smollm2-135m-l12``) is trained by the ``train`` stage with ``model.head=tag``,
refines the validation documents with the ``refine`` stage, then ``apply`` and ``stats``.
Scores: snippet P/R/F1 (trafilatura-eval pages) and bag-of-words P/R/F1 (scrapinghub
pages), mean deletion ratio, the refine stage's docs/s, training time.

Speed against generation, on the same cores and in one process (``--speed-docs N``
validation documents, best of ``--speed-repeats``): the tagging backend's docs/s, and the
docs/s of the *prefill alone* of the generative prompts (instruction + numbered chunk) on
the same base: an upper bound of greedy decoding's speed, which adds a decoding loop.

    python benchmarks/tag_head_dev.py --write-benchmarks
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

from refine_model_dev import (  # noqa: E402
    DEFAULT_PAGES,
    line_tagger_outputs,
    origin_outputs,
    parse_variant,
    prepare,
    run_variant,
    split_ids,
)
from report import cpu_model, load_average, use_offline_environment, write_section  # noqa: E402

use_offline_environment()

from refinex.config import load_config  # noqa: E402
from refinex.evaluation import load_pages, score_outputs  # noqa: E402

SECTION = "## Refine model: the tagging head (dev validation documents)"
DEFAULT_VARIANT = ("smollm2-l12-tag:model.base=smollm2-135m-l12,chunking.max_tokens=512,model.head=tag,"
                   "tag.feature_cache=/tmp/refinex_tag_features,modes=constrained")


def speed(checkpoint: str, base: str, texts: Sequence[str], max_tokens: int, repeats: int) -> dict[str, Any]:
    """docs/s of the tagging backend and of the generative prompts' prefill, same documents."""
    import torch
    from transformers import AutoModelForCausalLM

    from refinex.chunking import chunk_document, hf_token_counter
    from refinex.model.backends import GenerationRequest, load_backend
    from refinex.model.bases import prepare_base

    torch.set_num_threads(os.cpu_count() or 1)
    tagger = load_backend("transformers", checkpoint, batch_size=16)
    count = hf_token_counter(tagger.tokenizer)
    requests = []
    for text in texts:
        lines = text.split("\n")
        requests += [GenerationRequest.for_chunk(c, lines) for c in chunk_document(text, count, max_tokens=max_tokens)]
    tag_times = []
    for _ in range(repeats):
        started = time.perf_counter()
        tagger.generate(requests)
        tag_times.append(time.perf_counter() - started)
    tag_tokens = int(tagger.last_stats["tokens"])
    del tagger
    model = AutoModelForCausalLM.from_pretrained(str(prepare_base(base)), dtype=torch.float32).eval()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(prepare_base(base)))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts = [tokenizer(r.prompt)["input_ids"] for r in requests]
    prefill_times = []
    for _ in range(repeats):
        started = time.perf_counter()
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        with torch.inference_mode():
            for start in range(0, len(order), 16):
                rows = [prompts[i] for i in order[start : start + 16]]
                width = max(len(r) for r in rows)
                ids = torch.full((len(rows), width), int(tokenizer.pad_token_id), dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for j, row in enumerate(rows):  # left padding, as generation does
                    ids[j, width - len(row):] = torch.tensor(row)
                    mask[j, width - len(row):] = 1
                model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        prefill_times.append(time.perf_counter() - started)
    tag_s, prefill_s = min(tag_times), min(prefill_times)
    return {
        "docs": len(texts), "chunks": len(requests), "repeats": repeats, "threads": torch.get_num_threads(),
        "tag_s": tag_s, "tag_docs_per_s": len(texts) / tag_s, "tag_tokens": tag_tokens,
        "prefill_s": prefill_s, "prefill_docs_per_s": len(texts) / prefill_s,
        "prefill_tokens": sum(len(p) for p in prompts), "ratio": prefill_s / tag_s,
    }


def _row(label: str, scores: Mapping[str, Any], ratio: Optional[float], extra: str = "-") -> str:
    s, b = scores["snippet"], scores["bow"]
    ratio_text = "-" if ratio is None else f"{ratio:.3f}"
    return (f"| {label} | {s['precision']:.3f} | {s['recall']:.3f} | **{s['f1']:.3f}** | {b['precision']:.3f} "
            f"| {b['recall']:.3f} | **{b['f1']:.3f}** | {ratio_text} | {extra} |")


def render(report: Mapping[str, Any]) -> str:
    """The BENCHMARKS.md section of a report."""
    scores, ratios = report["scores"], report["ratios"]
    lines = [
        SECTION,
        "",
        f"Machine: {report['machine']}. Command: `{report['command']}` ({report['wall_s']:.0f} s wall-clock; load "
        f"average {report['load']} at the end). Date: {report['date']}.",
        f"Data: as in the section above: {report['documents']} dev pages, {report['train_docs']} training and "
        f"**{report['validation_docs']} validation documents scored**; the tagging head trains on the training "
        "documents' `sft_pairs` chunks (512 tokens on smollm2-135m-l12) and its threshold is cross-validated on them.",
        "",
        "| output (validation documents) | P | R | F1 | bow P | bow R | bow F1 | mean deletion ratio | refine docs/s |",
        "|---|---|---|---|---|---|---|---|---|",
        _row("raw text (all visible text)", scores["raw"], 0.0),
        _row("distilled oracle (what the models learn)", scores["distilled"], ratios["distilled"]),
        _row("line tagger (logistic regression)", scores["tagger"], ratios["tagger"]),
    ]
    for variant in report["variants"]:
        key = f"{variant['name']}/constrained"
        refine = variant["refine"]["constrained"]
        lines.append(_row(f"tagging head {variant['name']} ({refine['origin_version']})", scores[key],
                          report["models"][key]["mean_deletion_ratio"], f"{refine['docs_per_s']:.2f}"))
    lines += ["", "| model | settings | train chunks | train s (base forward s) | threshold (cross-validated "
              "kept-char F1) | validation kept-char F1 | invalid programs |", "|---|---|---|---|---|---|---|"]
    for variant in report["variants"]:
        train = variant["train"]
        model = report["models"][f"{variant['name']}/constrained"]
        lines.append(
            f"| {variant['name']} ({train['model_uri']}) | {', '.join(f'{k}={v}' for k, v in variant['overrides'].items())} "
            f"| {train.get('train_pairs', '-')} | {train.get('train_seconds', '-')} ({train.get('feature_seconds', '-')}) "
            f"| {train.get('threshold', '-')} ({_num(train.get('cv_kept_char_f1'))}) "
            f"| {_num(train.get('validation_kept_char_f1'))} | {model.get('invalid_docs', '-')}/{model.get('documents', '-')} |")
    probe = report.get("speed")
    if probe:
        lines += [
            "",
            f"Speed on the same {probe['threads']} threads, one process, {probe['docs']} validation documents "
            f"({probe['chunks']} chunks; best of {probe['repeats']}): the tagging backend "
            f"**{probe['tag_docs_per_s']:.2f} docs/s** ({probe['tag_tokens']} tokens); the prefill alone of the "
            f"generative prompts on the same base {probe['prefill_docs_per_s']:.2f} docs/s ({probe['prefill_tokens']} "
            f"tokens): the tagger is **{probe['ratio']:.1f}x** faster than the prefill that greedy decoding starts "
            "with, before it writes a single token.",
        ]
    lines += ["", report.get("reading", ""), ""]
    return "\n".join(lines)


def _num(value: Any) -> str:
    return "-" if value is None else f"{float(value):.3f}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=Path, default=DEFAULT_PAGES)
    parser.add_argument("--workdir", default="/tmp/refinex_refine_dev")
    parser.add_argument("--validation-fraction", type=float, default=0.2)
    parser.add_argument("--variant", action="append", type=parse_variant, default=None)
    parser.add_argument("--speed-docs", type=int, default=40, help="0 = no speed comparison")
    parser.add_argument("--speed-repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--render-json", type=Path, default=None, help="render a saved report instead")
    parser.add_argument("--reading", default="", help="the paragraph under the tables")
    parser.add_argument("--write-benchmarks", action="store_true")
    args = parser.parse_args(argv)
    if args.render_json:
        report = json.loads(args.render_json.read_text(encoding="utf-8"))
        if args.reading:
            report["reading"] = args.reading
        section = render(report)
        print(section)
        if args.write_benchmarks:
            write_section(REPO / "BENCHMARKS.md", section, SECTION)
        return 0

    from refinex.spark.session import get_spark
    from refinex.spark.tables import read_table

    started = time.perf_counter()
    config = load_config("default", ["spark.master=local[2]", "spark.ui_enabled=false", "spark.console_progress=false",
                                     "spark.log_level=ERROR", f"sft.validation_fraction={args.validation_fraction}"])
    workdir = str(Path(args.workdir).resolve())
    spark = get_spark(config, workdir)
    prepared = prepare(spark, config, workdir, args.pages)
    train_ids, validation_ids = split_ids(spark, workdir, args.validation_fraction)
    ids = set(validation_ids)
    pages = [p for p in load_pages(args.pages) if p["id"] in ids]
    texts = dict(read_table(spark, workdir, "documents").select("doc_id", "text").collect())
    distilled = origin_outputs(spark, workdir, "distilled", prepared["distilled_version"], ids)
    tagger = line_tagger_outputs(spark, config, workdir, prepared["distilled_version"], set(train_ids), ids)
    scores = {
        "raw": score_outputs(pages, {i: texts[i] for i in ids}),
        "distilled": score_outputs(pages, distilled["texts"]),
        "tagger": score_outputs(pages, tagger["texts"]),
    }
    ratios = {"distilled": distilled["mean_deletion_ratio"], "tagger": tagger["mean_deletion_ratio"]}
    variants, models = [], {}
    for name, overrides in args.variant or [parse_variant(DEFAULT_VARIANT)]:
        result = run_variant(spark, config, workdir, name, overrides, prepared["distilled_version"], False)
        variants.append(result)
        key = f"{name}/constrained"
        models[key] = origin_outputs(spark, workdir, "model", result["refine"]["constrained"]["origin_version"], ids)
        scores[key] = score_outputs(pages, models[key]["texts"])
        print(json.dumps({k: v for k, v in result.items() if k != "sft"}, indent=1, default=str), flush=True)
    spark.stop()
    probe = None
    if args.speed_docs > 0:
        from refinex.spark.refine import resolve_model

        variant = variants[0]
        cfg = config.with_overrides({k: v for k, v in variant["overrides"].items()})
        checkpoint = resolve_model(cfg, workdir, variant["train"]["model_uri"]).checkpoint
        chosen = sorted(ids)[: args.speed_docs]
        probe = speed(str(checkpoint), cfg.model.base, [texts[i] for i in chosen], cfg.chunking.max_tokens,
                      args.speed_repeats)
    report = {
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch "
                   f"{__import__('torch').__version__}",
        "command": " ".join(["python benchmarks/tag_head_dev.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": time.strftime("%Y-%m-%d"),
        "wall_s": time.perf_counter() - started,
        "load": load_average(),
        "documents": len(train_ids) + len(validation_ids),
        "train_docs": len(train_ids),
        "validation_docs": len(validation_ids),
        "scores": scores,
        "ratios": ratios,
        "variants": variants,
        "models": {k: {kk: vv for kk, vv in v.items() if kk != "texts"} for k, v in models.items()},
        "speed": probe,
        "reading": args.reading,
    }
    section = render(report)
    print(section)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    if args.write_benchmarks:
        write_section(REPO / "BENCHMARKS.md", section, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
