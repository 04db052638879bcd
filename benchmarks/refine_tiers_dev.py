"""Refine-model variants on the held-out pages of both dev files, through the Spark stages.

Both page files of ``../shared/data`` (``webpages-dev``: trafilatura-eval and scrapinghub;
``wcxb-dev``: seven page types) are ingested into one workdir (reused between runs: every
stage is idempotent and training is reused when the pairs and settings are the same). Two
teachers refine and are distilled: ``trafilatura`` (hard labels) and ``consensus`` (its
members' weighted votes are the soft labels). The split is by document
(``--validation-fraction``, both files alike). Each ``--variant NAME:key=value,...``
(configuration overrides; ``teacher=trafilatura|consensus`` picks the programs the pairs are
built from) runs the real path: ``sft_pairs`` -> ``train`` -> ``refine --split validation``
-> ``apply`` -> ``stats`` -> ``evaluate --split validation``. The raw text and both teachers'
distilled programs (the oracles) are evaluated on the same documents.

Scores (the shared README's definitions): the 170 dev validation documents as before
(snippet scores on the trafilatura-eval pages, bag-of-words on the scrapinghub pages) and the
WCXB validation documents (both families) overall and per page type. Also: training
documents, training time, threshold, the refine stage's documents/s (its own clock, one
Spark stage on this machine's cores), invalid programs and new words.

``--curve NAME`` marks variants as points of the learning curve (``sft.train_sample``): the
curve is plotted against training chunks (``--plot``).

    python benchmarks/refine_tiers_dev.py --variant fast-soft:teacher=consensus,tag.labels=soft \\
        --json benchmarks/results/tiers.json --write-benchmarks
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from refine_model_dev import parse_variant  # noqa: E402
from report import load_average, machine, use_offline_environment, write_section  # noqa: E402

use_offline_environment()

from refinex.config import Config, load_config  # noqa: E402

DATA = REPO.parent / "shared" / "data"
PAGES = (DATA / "webpages-dev.jsonl.gz", DATA / "wcxb-dev.jsonl.gz")
GUARD = REPO.parent / "shared" / "heldout-guard" / "check_pages.py"
SECTION = "## Refine model tiers on the held-out dev pages (both files)"
TEACHERS = ("trafilatura", "consensus")
DEV_SNIPPET, DEV_BOW, WCXB = "trafilatura-eval", "scrapinghub-aeb", "wcxb"
PAGE_TYPES = ("article", "service", "forum", "listing", "product", "collection", "documentation")


def guard(paths: Sequence[Path]) -> dict[str, Any]:
    """The held-back-pages check of every corpus trained or tuned on (must find 0)."""
    done = subprocess.run([sys.executable, str(GUARD), *map(str, paths)], capture_output=True, text=True)
    return {"command": f"python ../shared/heldout-guard/check_pages.py {' '.join(p.name for p in paths)}",
            "exit_code": done.returncode, "output": (done.stdout + done.stderr).strip().splitlines()[-1:]}


def prepare(spark: Any, config: Config, workdir: str) -> dict[str, str]:
    """Ingest both files, both teachers, distill (all idempotent); the teachers' versions."""
    from refinex.spark.origins import newest_program_version  # noqa: F401 - documented entry point
    from refinex.spark.registry import run_stage
    from refinex.spark.tables import read_table

    run_stage("ingest", spark, config, workdir, input=[str(p) for p in PAGES])
    versions = {}
    for teacher in TEACHERS:
        cfg = config.with_overrides({"expert.name": teacher})
        run_stage("expert", spark, cfg, workdir)
        stats = run_stage("distill", spark, cfg, workdir)
        versions[teacher] = next(v for v in stats["origin_versions"] if v.startswith(f"{teacher}:"))
    for teacher, version in versions.items():
        applied = read_table(spark, workdir, "refined_documents").where(f"origin_version = '{version}'").limit(1).count()
        if not applied:
            run_stage("apply", spark, config, workdir, origin="distilled", origin_version=version)
            run_stage("stats", spark, config, workdir, origin="distilled", origin_version=version)
    return versions


def scores_of(evaluation: Mapping[str, Any]) -> dict[str, Any]:
    """The figures the tables show, from an ``evaluate`` stage's statistics."""
    scopes = evaluation.get("by_source", {})

    def pick(scope: str, *names: str) -> dict[str, Any]:
        values = scopes.get(scope, {})
        return {name: values.get(name) for name in names}

    out = {
        "dev_snippet": pick(DEV_SNIPPET, "snippet_precision", "snippet_recall", "snippet_f1", "raw_snippet_f1"),
        "dev_bow": pick(DEV_BOW, "bow_precision", "bow_recall", "bow_f1", "raw_bow_f1"),
        "wcxb": pick(WCXB, "snippet_recall", "snippet_f1", "bow_f1", "raw_snippet_f1", "raw_bow_f1"),
        "page_types": {t: pick(f"{WCXB}/{t}", "snippet_f1", "bow_f1", "raw_snippet_f1", "raw_bow_f1", "documents")
                       for t in PAGE_TYPES},
        "documents": evaluation.get("documents"),
        "new_words": evaluation.get("new_words"),
        "invalid_share": evaluation.get("invalid_share"),
        "deletion_ratio_mean": evaluation.get("deletion_ratio_mean"),
    }
    return out


def evaluate(spark: Any, config: Config, workdir: str, origin: str, version: str) -> dict[str, Any]:
    from refinex.spark.registry import run_stage

    return run_stage("evaluate", spark, config, workdir, origin=origin, origin_version=version, split="validation")


def train_line_tagger(spark: Any, config: Config, workdir: str, version: str) -> dict[str, Any]:
    """The line-tagger baseline fitted on the training documents' distilled programs and
    saved as a ``linear``-tier checkpoint (the refine stage runs it like any model)."""
    from pyspark.sql import functions as F

    from refinex.model.sft import TRAIN, assign_split
    from refinex.model.tagger import LineTagger, save_checkpoint
    from refinex.spark.tables import read_table

    programs = (read_table(spark, workdir, "programs")
                .where((F.col("origin") == "distilled") & (F.col("origin_version") == version)
                       & F.col("program").isNotNull()).select("doc_id", "program"))
    rows = read_table(spark, workdir, "documents").select("doc_id", "text").join(programs, "doc_id").collect()
    fraction = float(config.sft.validation_fraction)
    train = [(r["text"], r["program"]) for r in sorted(rows, key=lambda r: r["doc_id"])
             if assign_split(r["doc_id"], fraction) == TRAIN]
    started = time.perf_counter()
    tagger = LineTagger().fit(train)
    seconds = time.perf_counter() - started
    out = Path(workdir) / "models" / "line-tagger"
    save_checkpoint(tagger, out)
    return {"model_uri": str(out), "tier": "linear", "train_pairs": len(train), "train_seconds": round(seconds, 1),
            "threshold": tagger.threshold, "threshold_source": "fixed", "reused": False}


def run_variant(spark: Any, config: Config, workdir: str, name: str, overrides: Mapping[str, Any],
                teachers: Mapping[str, str]) -> dict[str, Any]:
    """sft_pairs -> train -> refine (validation) -> apply -> stats -> evaluate (validation);
    ``tier=linear`` fits the line tagger instead of the train stage."""
    from refinex.spark.registry import run_stage

    settings = dict(overrides)
    teacher = str(settings.pop("teacher", "trafilatura"))
    linear = settings.pop("tier", None) == "linear"
    settings.pop("modes", None)
    cfg = config.with_overrides(settings)
    started = time.perf_counter()
    sft = {} if linear else run_stage("sft_pairs", spark, cfg, workdir, origin_version=teachers[teacher])
    train = (train_line_tagger(spark, cfg, workdir, teachers[teacher]) if linear
             else run_stage("train", spark, cfg, workdir))
    refine = run_stage("refine", spark, cfg, workdir, model=train["model_uri"], split="validation", force=True)
    version = refine["origin_version"]
    run_stage("apply", spark, cfg, workdir, origin="model", origin_version=version)
    run_stage("stats", spark, cfg, workdir, origin="model", origin_version=version)
    from refinex.errors import StageFailed

    try:
        gates = run_stage("validate", spark, cfg, workdir, origin="model", origin_version=version, split="validation")
    except StageFailed as failed:
        gates = dict(failed.stats or {}, passed=False)
    scores = scores_of(evaluate(spark, cfg, workdir, "model", version))
    keep = ("model_uri", "tier", "train_pairs", "validation_pairs", "steps", "train_seconds", "threshold",
            "threshold_source", "cv_kept_char_f1", "validation_kept_char_f1", "reused")
    return {
        "name": name, "teacher": teacher, "overrides": dict(overrides), "wall_s": time.perf_counter() - started,
        "sft": {k: sft.get(k) for k in ("pairs", "train_pairs", "train_documents", "validation_documents",
                                        "max_tokens", "train_sample")},
        "train": {k: train.get(k) for k in keep},
        "refine": {k: refine.get(k) for k in ("origin_version", "processed", "chunks", "generate_seconds",
                                              "docs_per_s", "invalid_chunks", "partitions", "worker_processes")},
        "scores": scores,
        "gates": {"passed": gates.get("passed"), "failed": gates.get("failed_expectations")},
    }


def promote_in_order(spark: Any, config: Config, workdir: str, variants: Sequence[Mapping[str, Any]],
                     names: Sequence[str]) -> list[dict[str, Any]]:
    """``promote`` of each named variant's registered version, in order, by the gates."""
    from refinex.spark.registry import run_stage

    decisions = []
    by_name = {v["name"]: v for v in variants}
    for name in names:
        version = str(by_name[name]["train"]["model_uri"]).rsplit("/", 1)[-1]
        stats = run_stage("promote", spark, config, workdir, version=int(version))
        decisions.append({"name": name, "version": version, "decision": stats["decision"], "reason": stats["reason"],
                          "gates": [(g["name"], g["passed"], g["detail"]) for g in stats["gates"]]})
        print(json.dumps(decisions[-1], default=str), flush=True)
    return decisions


def _f(value: Optional[float]) -> str:
    return "-" if value is None else f"{float(value):.3f}"


def _score_cells(scores: Mapping[str, Any]) -> list[str]:
    d, b, w = scores["dev_snippet"], scores["dev_bow"], scores["wcxb"]
    return [_f(d.get("snippet_precision")), _f(d.get("snippet_recall")), f"**{_f(d.get('snippet_f1'))}**",
            f"**{_f(b.get('bow_f1'))}**", f"**{_f(w.get('snippet_f1'))}**", f"**{_f(w.get('bow_f1'))}**"]


def render(report: Mapping[str, Any]) -> str:
    """The BENCHMARKS.md section of a report."""
    lines = [
        SECTION, "",
        f"Machine: {report['machine']}, Python {report['python']}, torch {report['torch']}. Date: {report['date']}. "
        f"Command: `{report['command']}` ({report['wall_s']:.0f} s wall-clock; load average {report['load']} at the end).",
        f"Data: {report['documents']} pages of both dev files, split by document at validation fraction "
        f"{report['validation_fraction']}: {report['validation']['dev']} dev validation documents "
        f"({report['validation']['dev_snippet']} trafilatura-eval pages for snippet scores, "
        f"{report['validation']['dev_bow']} scrapinghub pages for bag-of-words) and {report['validation']['wcxb']} "
        f"WCXB validation documents (both score families); models train on the other documents. Held-back check: "
        f"`{report['guard']['command']}` -> {' '.join(report['guard']['output'])} (exit {report['guard']['exit_code']}).",
        "",
        "| output (validation documents) | teacher | dev snippet P | dev snippet R | dev snippet F1 | dev bow F1 "
        "| WCXB snippet F1 | WCXB bow F1 | refine docs/s | train docs | train s | threshold |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    raw = report["baselines"]["trafilatura"]
    raw_cells = ["-", "-", f"**{_f(raw['dev_snippet']['raw_snippet_f1'])}**", f"**{_f(raw['dev_bow']['raw_bow_f1'])}**",
                 f"**{_f(raw['wcxb']['raw_snippet_f1'])}**", f"**{_f(raw['wcxb']['raw_bow_f1'])}**"]
    lines.append("| raw text (all visible text) | - | " + " | ".join(raw_cells) + " | - | - | - | - |")
    for teacher, scores in report["baselines"].items():
        lines.append(f"| distilled oracle ({teacher}) | - | " + " | ".join(_score_cells(scores)) + " | - | - | - | - |")
    for v in report["variants"]:
        t, r = v["train"], v["refine"]
        rate = "-" if r.get("docs_per_s") is None else f"{r['docs_per_s']:.1f}"
        lines.append(
            f"| {v['name']} ({t.get('tier')}, {r['origin_version']}) | {v['teacher']} | "
            + " | ".join(_score_cells(v["scores"]))
            + f" | {rate} | {t.get('train_pairs') if t.get('tier') in ('fast', 'linear') else v['sft'].get('train_documents')} "
            f"| {t.get('train_seconds', '-')} | {t.get('threshold', '-')} |")
    lines += ["", "Per WCXB page type (validation documents; snippet F1 / bag-of-words F1):", "",
              "| output | " + " | ".join(f"{p} (n)" for p in PAGE_TYPES) + " |",
              "|---|" + "---|" * len(PAGE_TYPES)]
    types = raw["page_types"]
    lines.append("| raw text | " + " | ".join(
        f"{_f(types[p]['raw_snippet_f1'])} / {_f(types[p]['raw_bow_f1'])} ({types[p].get('documents') or 0})"
        for p in PAGE_TYPES) + " |")
    rows = [(f"oracle ({t})", s) for t, s in report["baselines"].items()]
    rows += [(v["name"], v["scores"]) for v in report["variants"]]
    for label, scores in rows:
        pt = scores["page_types"]
        lines.append(f"| {label} | " + " | ".join(f"{_f(pt[p]['snippet_f1'])} / {_f(pt[p]['bow_f1'])}"
                                                 for p in PAGE_TYPES) + " |")
    lines += ["", "| variant | settings | sft pairs (train documents) | steps | threshold (source; cross-validated "
              "kept-char F1) | invalid share | new words | refine chunks, partitions, s |", "|---|---|---|---|---|---|---|---|"]
    for v in report["variants"]:
        t, r, s = v["train"], v["refine"], v["scores"]
        settings = ", ".join(f"{k}={val}" for k, val in v["overrides"].items())
        lines.append(
            f"| {v['name']} | {settings} | {v['sft'].get('train_pairs')} ({v['sft'].get('train_documents')}) "
            f"| {t.get('steps', '-')} | {t.get('threshold', '-')} ({t.get('threshold_source', '-')}; "
            f"{_f(t.get('cv_kept_char_f1'))}) | {_f(s.get('invalid_share'))} | {s.get('new_words')} "
            f"| {r.get('chunks')}, {r.get('partitions')}, {r.get('generate_seconds')} |")
    lines += render_pareto(report)
    if report.get("promotions"):
        lines += ["", "Promotion on the validation documents (`refinex promote --version N`, the existing gates, "
                  "in this order):", ""]
        for d in report["promotions"]:
            failed = [g for g in d["gates"] if not g[1]]
            lines.append(f"- {d['name']} (version {d['version']}): **{d['decision']}**: {d['reason']}"
                         + (f" (failed: {'; '.join(g[2] for g in failed)})" if failed else "")
                         + f"; beats_champion: {next((g[2] for g in d['gates'] if g[0] == 'beats_champion'), '-')}")
    if report.get("plot"):
        lines += ["", f"![learning curve]({report['plot']})"]
    lines += ["", report.get("reading", ""), ""]
    return "\n".join(lines)


def plot_curve(report: Mapping[str, Any], names: Sequence[str], path: Path) -> Optional[str]:
    """Validation snippet and bag-of-words F1 against training chunks (the ``--curve`` variants)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    points = [v for v in report["variants"] if v["name"] in names]
    if len(points) < 2:
        return None
    points.sort(key=lambda v: v["sft"]["train_pairs"] or 0)
    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    xs = [v["sft"]["train_pairs"] for v in points]
    series = [("dev snippet F1", lambda s: s["dev_snippet"]["snippet_f1"]),
              ("dev bag-of-words F1", lambda s: s["dev_bow"]["bow_f1"]),
              ("WCXB snippet F1", lambda s: s["wcxb"]["snippet_f1"]),
              ("WCXB bag-of-words F1", lambda s: s["wcxb"]["bow_f1"])]
    for label, get in series:
        ax.plot(xs, [get(v["scores"]) for v in points], marker="o", label=label)
    oracle = report["baselines"]["trafilatura"]
    for label, value, style in (("dev snippet oracle", oracle["dev_snippet"]["snippet_f1"], ":"),
                                ("dev bow oracle", oracle["dev_bow"]["bow_f1"], "--")):
        ax.axhline(value, linestyle=style, color="grey", linewidth=1.0, label=f"{label} (trafilatura)")
    ax.set_xscale("log")
    ax.set_xlabel("training chunks (sft_pairs, train split; a chunk is a whole page for the fast tier)")
    ax.set_ylabel("F1 on the validation documents")
    ax.set_title("refine model learning curve (" + ", ".join(v["name"] for v in points) + ")", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path))
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def pareto_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every variant's quality against its refine-stage speed per core, fastest first."""
    cores = int(report.get("cores") or os.cpu_count() or 1)
    rows = []
    for v in report["variants"]:
        rate = v["refine"].get("docs_per_s")
        if rate is None:
            continue
        s = v["scores"]
        rows.append({"name": v["name"], "tier": v["train"].get("tier"), "docs_per_s": rate,
                     "docs_per_s_per_core": rate / cores, "dev_snippet_f1": s["dev_snippet"]["snippet_f1"],
                     "dev_bow_f1": s["dev_bow"]["bow_f1"], "wcxb_snippet_f1": s["wcxb"]["snippet_f1"],
                     "wcxb_bow_f1": s["wcxb"]["bow_f1"]})
    return sorted(rows, key=lambda r: -r["docs_per_s"])


def render_pareto(report: Mapping[str, Any]) -> list[str]:
    """The Pareto table (and its plot) of a report."""
    rows = pareto_rows(report)
    if not rows:
        return []
    lines = ["", f"Quality against speed ({report.get('cores') or os.cpu_count()} cores; refine-stage documents/s on "
             "the validation documents, the stage's own clock: model loads included):", "",
             "| variant | tier | refine docs/s | docs/s per core | dev snippet F1 | dev bow F1 | WCXB snippet F1 "
             "| WCXB bow F1 | on the Pareto front |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        dominated = any(o["docs_per_s"] >= row["docs_per_s"] and (o["dev_snippet_f1"] or 0) >= (row["dev_snippet_f1"] or 0)
                        and (o["dev_bow_f1"] or 0) >= (row["dev_bow_f1"] or 0) and o is not row
                        and (o["docs_per_s"], o["dev_snippet_f1"], o["dev_bow_f1"])
                        != (row["docs_per_s"], row["dev_snippet_f1"], row["dev_bow_f1"]) for o in rows)
        lines.append(f"| {row['name']} | {row['tier']} | {row['docs_per_s']:.2f} | {row['docs_per_s_per_core']:.2f} "
                     f"| {_f(row['dev_snippet_f1'])} | {_f(row['dev_bow_f1'])} | {_f(row['wcxb_snippet_f1'])} "
                     f"| {_f(row['wcxb_bow_f1'])} | {'no' if dominated else 'yes'} |")
    if report.get("pareto_plot"):
        lines += ["", f"![quality against speed]({report['pareto_plot']})"]
    return lines


def plot_pareto(report: Mapping[str, Any], path: Path) -> Optional[str]:
    """Dev snippet and bag-of-words F1 against refine-stage docs/s per core (log scale)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    rows = pareto_rows(report)
    if not rows:
        return None
    fig = Figure(figsize=(8, 5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for key, marker, label in (("dev_snippet_f1", "o", "dev snippet F1"), ("dev_bow_f1", "s", "dev bag-of-words F1")):
        ax.scatter([r["docs_per_s_per_core"] for r in rows], [r[key] for r in rows], marker=marker, label=label)
        for r in rows:
            ax.annotate(r["name"], (r["docs_per_s_per_core"], r[key]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    oracle = report["baselines"]["trafilatura"]
    ax.axhline(oracle["dev_snippet"]["snippet_f1"], linestyle=":", color="grey", label="oracle snippet F1 (trafilatura)")
    ax.axhline(oracle["dev_bow"]["bow_f1"], linestyle="--", color="grey", label="oracle bow F1 (trafilatura)")
    ax.set_xscale("log")
    ax.set_xlabel("refine-stage documents/s per core (log)")
    ax.set_ylabel("F1 on the 170 dev validation documents")
    ax.set_title("refine model tiers: quality against speed", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path))
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/refinex_tiers_dev")
    parser.add_argument("--validation-fraction", type=float, default=0.2)
    parser.add_argument("--variant", action="append", type=parse_variant, default=[])
    parser.add_argument("--curve", action="append", default=[], help="variant names of the learning curve")
    parser.add_argument("--promote", action="append", default=[],
                        help="promote these variants' registered versions in this order (by the gates)")
    parser.add_argument("--plot", type=Path, default=REPO / "benchmarks" / "results" / "learning_curve.png")
    parser.add_argument("--pareto-plot", type=Path, default=REPO / "benchmarks" / "results" / "tiers_pareto.png")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--merge-json", type=Path, action="append", default=[],
                        help="earlier reports whose variants are kept (this run's win on a name clash)")
    parser.add_argument("--render-json", type=Path, default=None, help="render a saved report instead")
    parser.add_argument("--reading", default="", help="the paragraph under the tables (a file's path or text)")
    parser.add_argument("--write-benchmarks", action="store_true")
    args = parser.parse_args(argv)
    reading = Path(args.reading).read_text(encoding="utf-8") if args.reading and Path(args.reading).is_file() \
        else args.reading
    if args.render_json:
        report = json.loads(args.render_json.read_text(encoding="utf-8"))
    else:
        import torch

        from refinex.spark.session import get_spark

        started = time.perf_counter()
        config = load_config("default", ["spark.master=local[2]", "spark.ui_enabled=false",
                                         "spark.console_progress=false", "spark.log_level=ERROR",
                                         f"sft.validation_fraction={args.validation_fraction}",
                                         "stages.mlflow=false", "evaluate.plots=false"])
        workdir = str(Path(args.workdir).resolve())
        spark = get_spark(config, workdir)
        checked = guard(PAGES)
        if checked["exit_code"] != 0:
            raise SystemExit(f"held-back pages in the training corpus: {checked['output']}")
        teachers = prepare(spark, config, workdir)
        baselines = {t: scores_of(evaluate(spark, config, workdir, "distilled", v)) for t, v in teachers.items()}
        variants = []
        for name, overrides in args.variant:
            result = run_variant(spark, config, workdir, name, overrides, teachers)
            print(json.dumps(result, default=str), flush=True)
            variants.append(result)
        decisions = promote_in_order(spark, config, workdir, variants, args.promote) if args.promote else []
        from refinex.model.sft import VALIDATION, assign_split
        from refinex.spark.tables import read_table

        docs = read_table(spark, workdir, "documents").select("doc_id", "source").collect()
        held = [r for r in docs if assign_split(r["doc_id"], args.validation_fraction) == VALIDATION]
        spark.stop()
        report = {
            "machine": machine(), "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__,
            "command": " ".join(["python benchmarks/refine_tiers_dev.py", *(sys.argv[1:] if argv is None else argv)]),
            "date": time.strftime("%Y-%m-%d"), "wall_s": time.perf_counter() - started, "load": load_average(),
            "documents": len(docs), "validation_fraction": args.validation_fraction,
            "validation": {"dev": sum(r["source"] != WCXB for r in held),
                           "dev_snippet": sum(r["source"] == DEV_SNIPPET for r in held),
                           "dev_bow": sum(r["source"] == DEV_BOW for r in held),
                           "wcxb": sum(r["source"] == WCXB for r in held)},
            "guard": checked, "teachers": teachers, "baselines": baselines, "variants": variants,
            "promotions": decisions,
        }
    for earlier in args.merge_json:
        old = json.loads(earlier.read_text(encoding="utf-8"))
        names = {v["name"] for v in report["variants"]}
        report["variants"] = [v for v in old["variants"] if v["name"] not in names] + report["variants"]
    if args.curve:
        report["plot"] = plot_curve(report, args.curve, args.plot)
    report["pareto_plot"] = plot_pareto(report, args.pareto_plot)
    if reading:
        report["reading"] = reading
    section = render(report)
    print(section)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    if args.write_benchmarks:
        write_section(REPO / "BENCHMARKS.md", section, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
