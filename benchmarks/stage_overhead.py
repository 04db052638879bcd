"""Where a pipeline run's wall time goes: each stage's wall time against its own work.

Given a finished workdir, reads ``<workdir>/delta/stage_runs`` (run_id, stage, started_at,
ended_at, params JSON, stats JSON) and, for the latest ``pipeline`` run (or ``--run-id``),
prints per stage

* wall: ``ended_at - started_at`` of the stage's row;
* work: the stage's own computation, without Spark, Delta or MLflow:
  - train: ``stats.train_seconds``; refine: ``stats.generate_seconds`` (both as recorded);
  - ingest, expert, distill, apply, sft_pairs, apply_model: the pure per-document functions
    run here, in this process, on the same documents (``documents`` is read once);
  - stats, stats_model: the per-document part is a Spark aggregation with no Python
    function, so work is the same aggregation done in pandas here (plus, separately shown,
    the report plot, which the stage also draws);
* overhead = wall - work.

It also prints the pipeline's wall (``pipeline`` row), the time between stages (each stage
writes its own ``stage_runs`` row *after* its ``ended_at``), and, with ``--time-log`` (the
output of ``/usr/bin/time -v``), the whole command's wall time and what came before the
pipeline started (interpreter, imports, JVM/Spark session).

Only the ``stage_runs`` layout, the Delta tables ``documents`` and ``programs`` (read by
path) and pure functions are used, so this also measures refactored code; a function that
has moved makes it stop with a message naming it.

    python benchmarks/stage_overhead.py --workdir work/demo [--json out.json] [--time-log time.txt]
"""
from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional

MODEL_SUFFIX = "+model"
ORDER = ("ingest", "expert", "distill", "apply", "stats", "sft_pairs", "train", "refine", "apply_model",
         "stats_model")


class Moved(SystemExit):
    pass


def need(module: str, name: str) -> Any:
    """``module.name``, or stop with a clear message when it has moved."""
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise Moved(f"stage_overhead: cannot import {module} (needed for {name}): {exc}") from None
    if not hasattr(mod, name):
        raise Moved(f"stage_overhead: {module}.{name} is gone (moved or renamed); update benchmarks/stage_overhead.py")
    return getattr(mod, name)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    clock = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - clock


def seconds(a: datetime, b: datetime) -> float:
    return (b - a).total_seconds()


def parse_time_log(path: str) -> Optional[float]:
    """Wall seconds from ``/usr/bin/time -v`` output (``Elapsed (wall clock) time``)."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    match = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\):\s*([\d:.]+)", text)
    if not match:
        return None
    total = 0.0
    for part in match.group(1).split(":"):
        total = total * 60 + float(part)
    return total


# --- reading the run ----------------------------------------------------------------------


def load_runs(spark: Any, workdir: str, run_id: Optional[str]) -> tuple[str, dict[str, dict[str, Any]]]:
    path = f"{workdir.rstrip('/')}/delta/stage_runs"
    if not Path(path, "_delta_log").is_dir():
        raise SystemExit(f"stage_overhead: no stage_runs table at {path}")
    rows = [r.asDict() for r in spark.read.format("delta").load(path).collect()]
    pipelines = [r for r in rows if r["stage"] == "pipeline" and (run_id is None or r["run_id"] == run_id)]
    if not pipelines:
        raise SystemExit(f"stage_overhead: no finished pipeline run{' ' + run_id if run_id else ''} in {path}")
    chosen = max(pipelines, key=lambda r: r["ended_at"])["run_id"]
    stages: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["run_id"] == chosen:
            name = r["stage"]
        elif r["run_id"] == chosen + MODEL_SUFFIX:
            name = f"{r['stage']}_model"
        else:
            continue
        r = dict(r, params=json.loads(r["params"] or "{}"), stats=json.loads(r["stats"] or "{}"))
        stages[name] = r
    return chosen, stages


def read_delta(spark: Any, workdir: str, table: str) -> Any:
    return spark.read.format("delta").load(f"{workdir.rstrip('/')}/delta/{table}")


# --- the stages' own work -------------------------------------------------------------------


def work_ingest(docs: Any, params: dict[str, Any]) -> dict[str, Any]:
    """``refinex.spark.ingest.parse_record`` (with ``refinex.text.html_to_text``) on every input line."""
    import gzip

    (parse_record, imp1) = timed(lambda: need("refinex.spark.ingest", "parse_record"))
    (html_to_text, imp2) = timed(lambda: need("refinex.text", "html_to_text"))
    files = sorted({f for f in docs["input_file"]})
    lines: list[tuple[str, str, int]] = []
    for uri in files:
        local = uri[len("file:"):] if uri.startswith("file:") else uri
        local = re.sub(r"^/+", "/", local)
        opener = gzip.open if local.endswith(".gz") else open
        with opener(local, "rt", encoding="utf-8") as fh:  # type: ignore[operator]
            lines.extend((line.rstrip("\n"), uri, i) for i, line in enumerate(fh, 1))
    args = (int(params.get("n_shards", 8)), int(params.get("max_text_chars", 1_000_000)),
            int(params.get("max_html_chars", 10_000_000)))
    _, work = timed(lambda: [parse_record(text, f, n, None, None, *args, html_to_text) for text, f, n in lines])
    return {"work_s": work, "import_s": imp1 + imp2, "items": len(lines)}


def work_expert(docs: Any, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The expert's ``refine_batch`` in batches of the stage's ``batch_size``."""
    build_expert = need("refinex.spark.expert", "build_expert")
    ExpertInput = need("refinex.experts.base", "ExpertInput")
    expert, build = timed(lambda: build_expert(params["expert"], params.get("options") or {}))
    batch = int(params.get("batch_size", 16))
    inputs = [ExpertInput(doc_id=d, text=t, html=h if isinstance(h, str) else None)
              for d, t, h in zip(docs["doc_id"], docs["text"], docs["html"])]
    outputs: list[Any] = []
    clock = time.perf_counter()
    for i in range(0, len(inputs), batch):
        outputs.extend(expert.refine_batch(inputs[i : i + batch]))
    work = time.perf_counter() - clock
    refined = {o.doc_id: o.refined_text for o in outputs if o.status == "ok" and o.refined_text is not None}
    version = f"{params['expert']}:{expert.version}"
    return {"work_s": work, "import_s": build, "items": len(inputs), "ok": len(refined), "version": version}, refined


def work_distill(docs: Any, refined: dict[str, str], version: str) -> tuple[dict[str, Any], dict[str, str]]:
    distill_row = need("refinex.spark.distill", "distill_row")
    texts = dict(zip(docs["doc_id"], docs["text"]))
    items = [(d, texts[d], r) for d, r in refined.items() if d in texts]
    rows, work = timed(lambda: [distill_row(d, version, raw, ref) for d, raw, ref in items])
    programs = {r["doc_id"]: r["program"] for r in rows if r.get("program") is not None}
    return {"work_s": work, "items": len(items)}, programs


def work_apply(docs: Any, programs: dict[str, str], params: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
    """``refinex.program.execute(parse(program), text, guardrails)`` per document with a program."""
    execute = need("refinex.program", "execute")
    parse = need("refinex.program", "parse")
    Guardrails = need("refinex.program", "Guardrails")
    g = params.get("guardrails") or {}
    guardrails = Guardrails(**{k: g[k] for k in ("max_error_ratio", "min_kept_chars") if k in g})
    texts = dict(zip(docs["doc_id"], docs["text"]))
    items = [(texts[d], p) for d, p in programs.items() if d in texts]
    results, work = timed(lambda: [execute(parse(p), t, guardrails) for t, p in items])
    return {"work_s": work, "items": len(items)}, results


def work_stats(results: list[Any], workdir_tmp: Path, by_plot: bool = True) -> dict[str, Any]:
    """The stage's aggregation in plain Python (statuses, histogram, totals) and its plot."""
    def aggregate() -> tuple[dict[str, int], list[int]]:
        by_status: dict[str, int] = {}
        hist = [0] * 20
        for r in results:
            by_status[r.status] = by_status.get(r.status, 0) + 1
            hist[min(int(r.deletion_ratio * 20), 19)] += 1
        sum(r.chars_in for r in results), sum(r.chars_out for r in results)
        return by_status, hist

    (by_status, hist), work = timed(aggregate)
    out: dict[str, Any] = {"work_s": work, "items": len(results)}
    if by_plot:
        plot = need("refinex.evaluation.plots", "plot_edit_stats")
        _, plot_s = timed(lambda: plot(hist, by_status, workdir_tmp / f"plot-{time.time_ns()}.png", "x"))
        out["plot_s"] = plot_s
    return out


def work_sft(docs: Any, programs: dict[str, str], params: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """Preparing the base (a fresh cache: the tiny base trains its tokenizer) and
    ``refinex.model.sft.build_sft_pairs`` per document."""
    prepare_base = need("refinex.model.bases", "prepare_base")
    list_profiles = need("refinex.model.bases", "list_profiles")
    load_profile = need("refinex.model.bases", "load_profile")
    assign_split = need("refinex.model.sft", "assign_split")
    build_sft_pairs = need("refinex.model.sft", "build_sft_pairs")
    hf_token_counter = need("refinex.chunking", "hf_token_counter")
    from transformers import AutoTokenizer

    base = params.get("base", "tiny")
    fraction = float(params.get("validation_fraction", 0.1))
    limit = int(params.get("tokenizer_corpus_docs", 1000))
    texts = dict(zip(docs["doc_id"], docs["text"]))
    corpus: list[str] = []
    if limit and base in list_profiles() and load_profile(base).kind == "tiny":
        ids = sorted(d for d in programs if d in texts and assign_split(d, fraction) == "train")[:limit]
        corpus = [texts[d] for d in ids]
    checkpoint, base_s = timed(lambda: prepare_base(base, cache_dir=tmp / "bases", corpus_texts=corpus))
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)
    tokenizer.model_max_length = 1 << 30
    count = hf_token_counter(tokenizer)
    max_tokens = int(params.get("max_tokens", 1500))
    items = [(d, texts[d], p) for d, p in programs.items() if d in texts]
    pairs, pairs_s = timed(lambda: [build_sft_pairs(d, t, p, count, max_tokens=max_tokens,
                                                    validation_fraction=fraction) for d, t, p in items])
    return {"work_s": base_s + pairs_s, "base_s": base_s, "pairs_s": pairs_s, "items": len(items),
            "pairs": sum(len(p) for p in pairs)}


def measure_work(spark: Any, workdir: str, stages: dict[str, dict[str, Any]], pandas_docs: Any,
                 tmp: Path) -> dict[str, dict[str, Any]]:
    """Each stage's own work (see the module docstring), in stage order."""
    work: dict[str, dict[str, Any]] = {}
    if "ingest" in stages:
        work["ingest"] = work_ingest(pandas_docs, stages["ingest"]["params"])
    refined: dict[str, str] = {}
    version = ""
    if "expert" in stages:
        work["expert"], refined = work_expert(pandas_docs, stages["expert"]["params"])
        version = work["expert"].pop("version")
    programs: dict[str, str] = {}
    if "distill" in stages:
        work["distill"], programs = work_distill(pandas_docs, refined, version)
    results: list[Any] = []
    if "apply" in stages:
        work["apply"], results = work_apply(pandas_docs, programs, stages["apply"]["params"])
    if "stats" in stages:
        work["stats"] = work_stats(results, tmp)
    if "sft_pairs" in stages:
        work["sft_pairs"] = work_sft(pandas_docs, programs, stages["sft_pairs"]["params"], tmp)
    if "train" in stages:
        work["train"] = {"work_s": float(stages["train"]["stats"].get("train_seconds") or 0.0), "recorded": True}
    if "refine" in stages:
        work["refine"] = {"work_s": float(stages["refine"]["stats"].get("generate_seconds") or 0.0), "recorded": True}
    if "apply_model" in stages:
        version_m = stages["apply_model"]["params"]["origin_version"]
        F = need("pyspark.sql.functions", "col")
        rows = (read_delta(spark, workdir, "programs").where((F("origin") == "model") & (F("origin_version") == version_m))
                .select("doc_id", "program").collect())
        model_programs = {r["doc_id"]: r["program"] for r in rows if r["program"] is not None}
        work["apply_model"], results_m = work_apply(pandas_docs, model_programs, stages["apply_model"]["params"])
        if "stats_model" in stages:
            work["stats_model"] = work_stats(results_m, tmp)

    return work


# --- main -----------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--run-id", default=None, help="a pipeline run id (default: the latest)")
    ap.add_argument("--json", dest="json_out", default=None, help="also save the numbers here")
    ap.add_argument("--time-log", default=None, help="/usr/bin/time -v output of the pipeline command")
    args = ap.parse_args(argv)

    workdir = str(Path(args.workdir).expanduser().resolve())
    load_config = need("refinex.config", "load_config")
    get_spark = need("refinex.spark.session", "get_spark")
    config = load_config("default")
    tmp = Path(tempfile.mkdtemp(prefix="stage-overhead-"))
    # Spark's own folders go to a scratch workdir, not into the measured one.
    spark, session_s = timed(lambda: get_spark(config, str(tmp)))
    run_id, stages = load_runs(spark, workdir, args.run_id)
    pandas_docs = read_delta(spark, workdir, "documents").select("doc_id", "text", "html", "input_file").toPandas()

    try:
        work = measure_work(spark, workdir, stages, pandas_docs, tmp)
    except (TypeError, AttributeError, KeyError) as exc:
        raise Moved(f"stage_overhead: a pure function's interface changed ({type(exc).__name__}: {exc}); "
                    "update benchmarks/stage_overhead.py") from exc
    table = []
    for name in ORDER:
        if name not in stages:
            continue
        row = stages[name]
        wall = seconds(row["started_at"], row["ended_at"])
        own = work.get(name, {}).get("work_s", 0.0)
        table.append({"stage": name, "wall_s": round(wall, 3), "work_s": round(own, 3),
                      "overhead_s": round(wall - own, 3),
                      **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in work.get(name, {}).items()
                         if k != "work_s"}})
    pipe = stages["pipeline"]
    pipeline_wall = seconds(pipe["started_at"], pipe["ended_at"])
    stage_sum = sum(r["wall_s"] for r in table)
    total = parse_time_log(args.time_log) if args.time_log else None
    summary = {
        "run_id": run_id,
        "workdir": workdir,
        "pipeline_wall_s": round(pipeline_wall, 3),
        "stages_wall_s": round(stage_sum, 3),
        "between_stages_s": round(pipeline_wall - stage_sum, 3),
        "work_s": round(sum(r["work_s"] for r in table), 3),
        "overhead_s": round(pipeline_wall - sum(r["work_s"] for r in table), 3),
        "command_wall_s": total,
        "before_pipeline_s": round(total - pipeline_wall, 3) if total is not None else None,
        "spark_session_start_s_here": round(session_s, 3),
        "stages": table,
    }

    print(f"run {run_id} in {workdir}")
    print(f"{'stage':<12} {'wall s':>8} {'work s':>8} {'overhead s':>10}  notes")
    for r in table:
        notes = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("stage", "wall_s", "work_s", "overhead_s"))
        print(f"{r['stage']:<12} {r['wall_s']:>8.1f} {r['work_s']:>8.1f} {r['overhead_s']:>10.1f}  {notes}")
    print(f"{'(stages)':<12} {stage_sum:>8.1f} {summary['work_s']:>8.1f} {stage_sum - summary['work_s']:>10.1f}")
    print(f"between stages (stage_runs writes, origin lookups): {summary['between_stages_s']:.1f}s")
    print(f"pipeline wall: {pipeline_wall:.1f}s, of which work {summary['work_s']:.1f}s, overhead {summary['overhead_s']:.1f}s")
    if total is not None:
        print(f"command wall: {total:.1f}s; before the pipeline started (imports, JVM, Spark session): "
              f"{summary['before_pipeline_s']:.1f}s")
    print(f"(a Spark session took {session_s:.1f}s to start in this process)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
