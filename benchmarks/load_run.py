"""Load: a generated corpus through the data stages and the refine model's stages.

The corpus is ``--docs`` pages drawn in turn from the dev pages (their real HTML, so real
page sizes; each copy gets its own id and URL), written as ``--shards`` JSONL.gz files. One
``refinex pipeline`` runs over it (quality gates and evaluation off: this measures the
stages): ingest -> expert (trafilatura) -> distill -> apply -> stats, then, unless
``--skip-model``, the fast tier's ``sft_pairs`` and ``train`` on a sample of the documents
(``--train-sample``, with a small validation split) and ``refine`` -> ``apply`` -> ``stats``
over all of them, while a sampler records, every half second, the resident memory of the
driver (the ``refinex`` Python process), its JVM and the Python workers. Then:

* docs/s per stage: the documents over the stage's wall time in ``stage_runs``;
* peak memory per stage: the highest sample inside the stage's time window;
* Spark's overhead: the same per-document work done by a plain Python loop, in this process,
  on the first ``--loop-docs`` documents (the stage's pure functions, as
  ``stage_overhead.py`` times them; for ``refine``, the trained model's backend on the
  documents' text and page structure), against the stage's wall time per document. The
  ratio is given per wall second and per core second (the stage had every core, the loop
  one). ``sft_pairs`` and ``train`` have no loop: training is one process either way.

    python benchmarks/load_run.py --docs 100000 --workdir /tmp/load [--json out.json] [--write-benchmarks]
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from report import load_average, machine, use_offline_environment, write_section  # noqa: E402

use_offline_environment()

DEFAULT_PAGES = REPO.parent / "shared" / "data" / "webpages-dev.jsonl.gz"
DATA_STAGES = ("ingest", "expert", "distill", "apply", "stats")
MODEL_STAGES = ("sft_pairs", "train", "refine", "apply_model", "stats_model")
RUN_ID = "load"
MODEL_RUN_ID = f"{RUN_ID}+model"
SECTION = "## Load: a generated corpus through the pipeline (data stages and the fast tier)"


# --- the corpus ----------------------------------------------------------------------------


def generate_corpus(pages: Path, n_docs: int, out: Path, shards: int) -> dict[str, Any]:
    """``n_docs`` records ``id, url, source, html`` (the dev pages in turn) in ``shards`` files."""
    with gzip.open(pages, "rt", encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    out.mkdir(parents=True, exist_ok=True)
    handles = [gzip.open(out / f"part-{s:03d}.jsonl.gz", "wt", encoding="utf-8", compresslevel=1)
               for s in range(shards)]
    html_bytes = 0
    try:
        for i in range(n_docs):
            page = records[i % len(records)]
            html = page.get("html") or ""
            html_bytes += len(html.encode("utf-8"))
            record = {"id": f"load-{i:07d}", "url": f"{page.get('url') or 'https://example.invalid/'}#copy-{i}",
                      "source": page.get("source"), "html": html}
            handles[i % shards].write(json.dumps(record, ensure_ascii=False) + "\n")
    finally:
        for handle in handles:
            handle.close()
    on_disk = sum(p.stat().st_size for p in out.glob("*.jsonl.gz"))
    return {"docs": n_docs, "distinct_pages": len(records), "shards": shards,
            "html_mib": round(html_bytes / 2**20, 1), "gzip_mib": round(on_disk / 2**20, 1)}


# --- memory sampling ---------------------------------------------------------------------------


class Sampler(threading.Thread):
    """Resident memory (MiB) of a command's driver, JVM and Python workers, every ``every`` s."""

    def __init__(self, pid: int, every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.samples: list[dict[str, float]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self.stopped.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            driver = jvm = workers = worker_max = 0.0
            n_workers = 0
            for process in tree:
                try:
                    rss = process.memory_info().rss / 2**20
                    name = process.name()
                    cmdline = " ".join(process.cmdline())
                except psutil.NoSuchProcess:
                    continue
                if process.pid == self.pid:
                    driver = rss
                elif name == "java" or "java" in cmdline.split(" ")[0]:
                    jvm += rss
                elif "python" in name or "pyspark" in cmdline:
                    workers += rss
                    worker_max = max(worker_max, rss)
                    n_workers += 1
            self.samples.append({"t": time.time(), "driver": driver, "jvm": jvm, "workers": workers,
                                 "worker_max": worker_max, "n_workers": n_workers})
            self.stopped.wait(self.every)


def peaks(samples: list[dict[str, float]], start: float, end: float) -> dict[str, float]:
    inside = [s for s in samples if start <= s["t"] <= end] or samples
    return {key: round(max(s[key] for s in inside), 1) for key in ("driver", "jvm", "workers", "worker_max")}


# --- the run -------------------------------------------------------------------------------------


def run_pipeline(corpus: Path, workdir: Path, logs: Path, model: bool, train_sample: float
                 ) -> tuple[float, list[dict[str, float]], int]:
    env = dict(os.environ, SPARK_LOCAL_IP=os.environ.get("SPARK_LOCAL_IP", "127.0.0.1"))
    command = [sys.executable, "-m", "refinex", "pipeline", "--input", str(corpus), "--workdir", str(workdir),
               "--run-id", RUN_ID, "--set", "quality.enabled=false",
               "--set", "evaluate.enabled=false", "--set", "expert.mlflow=false"]
    if model:
        command += ["--set", f"sft.train_sample={train_sample}", "--set", "sft.validation_fraction=0.01",
                    "--set", "model.base=fast", "--set", "model.head=tag", "--set", "tag.progress=false"]
    else:
        command.append("--skip-model")
    logs.mkdir(parents=True, exist_ok=True)
    clock = time.monotonic()
    with (logs / "pipeline.out").open("wb") as out, (logs / "pipeline.err").open("wb") as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err, cwd=REPO, env=env)
        sampler = Sampler(proc.pid)
        sampler.start()
        code = proc.wait()
        sampler.stopped.set()
        sampler.join(timeout=5)
    return time.monotonic() - clock, sampler.samples, code


def stage_rows(spark: Any, workdir: Path) -> dict[str, dict[str, Any]]:
    """Each step's ``stage_runs`` row by step key (the model's apply/stats as ``*_model``)."""
    rows = (spark.read.format("delta").load(str(workdir / "delta" / "stage_runs"))
            .where(f"run_id in ('{RUN_ID}', '{MODEL_RUN_ID}')"))
    found = {}
    for row in rows.collect():
        key = row["stage"] + ("_model" if row["run_id"] == MODEL_RUN_ID and row["stage"] in ("apply", "stats") else "")
        found[key] = {"start": row["started_at"].timestamp(), "end": row["ended_at"].timestamp(),
                      "stats": json.loads(row["stats"] or "{}"), "params": json.loads(row["params"] or "{}")}
    return found


def plain_loop(spark: Any, workdir: Path, corpus: Path, stages: dict[str, dict[str, Any]], n: int,
               tmp: Path) -> dict[str, dict[str, float]]:
    """Seconds per document of each stage's own work, done in this process on ``n`` documents."""
    import stage_overhead as so
    from pyspark.sql import functions as F

    from refinex.spark.ingest import parse_record
    from refinex.text import html_to_text

    params = stages["ingest"]["params"]
    shards = sorted(corpus.glob("*.jsonl.gz"))
    per_shard = -(-n // len(shards))  # ids go to the shards in turn: these are the first n ids
    lines: list[tuple[str, str, int]] = []
    for shard in shards:
        with gzip.open(shard, "rt", encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if number > per_shard:
                    break
                lines.append((line.rstrip("\n"), shard.resolve().as_uri(), number))
    limits = (int(params.get("n_shards", 8)), int(params.get("max_text_chars", 1_000_000)),
              int(params.get("max_html_chars", 10_000_000)))
    clock = time.perf_counter()
    for text, uri, number in lines:
        parse_record(text, uri, number, None, None, *limits, html_to_text)
    ingest_s = time.perf_counter() - clock

    ids = [json.loads(text)["id"] for text, _, _ in lines]
    docs = (spark.read.format("delta").load(str(workdir / "delta" / "documents"))
            .where(F.col("doc_id").isin(ids)).select("doc_id", "text", "html").toPandas())
    expert, refined = so.work_expert(docs, stages["expert"]["params"])
    distill, programs = so.work_distill(docs, refined, expert.pop("version"))
    apply, results = so.work_apply(docs, programs, stages["apply"]["params"])
    stats = so.work_stats(results, tmp, by_plot=False)
    per_doc = {"ingest": ingest_s / max(1, len(lines))}
    works = [("expert", expert), ("distill", distill), ("apply", apply), ("stats", stats)]
    if "refine" in stages:
        refine, model_programs = work_refine(docs, stages["refine"]["stats"]["checkpoint"])
        model_apply, model_results = so.work_apply(docs, model_programs, stages["apply_model"]["params"])
        works += [("refine", refine), ("apply_model", model_apply),
                  ("stats_model", so.work_stats(model_results, tmp, by_plot=False))]
    for name, work in works:
        per_doc[name] = work["work_s"] / max(1, work["items"])
    return {name: {"loop_s_per_doc": value, "loop_docs": len(docs) if name != "ingest" else len(lines)}
            for name, value in per_doc.items()}


def work_refine(docs: Any, checkpoint: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The refine stage's per-document work in this process: chunking, page structure, the
    model's backend and the merge of chunk programs (``refine_documents``), one thread."""
    import torch

    from refinex.model.backends import load_backend
    from refinex.spark.refine import refine_documents
    from refinex.spark.sft import chunk_budget, token_counter, tokenizer_files, tokenizer_id

    torch.set_num_threads(1)
    backend = load_backend("transformers", checkpoint)
    files = tokenizer_files(Path(checkpoint))
    count = token_counter(tokenizer_id(Path(checkpoint)), files)
    pairs = list(zip(docs["doc_id"], docs["text"]))
    pages = [h if isinstance(h, str) else None for h in docs["html"]]
    clock = time.perf_counter()
    rows = refine_documents(backend, count, pairs, chunk_budget(files, 1500), pages)
    work = time.perf_counter() - clock
    return {"work_s": work, "items": len(rows)}, {r["doc_id"]: r["program"] for r in rows}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from refinex.config import load_config
    from refinex.spark.session import get_spark

    workdir = Path(args.workdir).resolve()
    corpus, runs = workdir / "corpus", workdir / "runs"
    if runs.exists():
        raise SystemExit(f"load_run: {runs} exists; use a fresh --workdir")
    print(f"generating {args.docs} documents from {args.pages} ...", flush=True)
    made = generate_corpus(Path(args.pages), args.docs, corpus, args.shards)
    print(f"corpus: {made}", flush=True)
    steps = DATA_STAGES + (() if args.skip_model else MODEL_STAGES)
    print(f"running the pipeline ({' -> '.join(steps)}) ...", flush=True)
    wall, samples, code = run_pipeline(corpus, runs, workdir / "logs", not args.skip_model, args.train_sample)
    if code != 0:
        tail = (workdir / "logs" / "pipeline.err").read_text(encoding="utf-8", errors="replace")[-3000:]
        raise SystemExit(f"load_run: the pipeline failed (exit {code}):\n{tail}")
    print(f"pipeline done in {wall:.0f}s; measuring the plain loop on {args.loop_docs} documents ...", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="load-run-"))
    spark = get_spark(load_config("default"), str(tmp))
    try:
        stages = stage_rows(spark, runs)
        missing = [s for s in steps if s not in stages]
        if missing:
            raise SystemExit(f"load_run: no stage_runs rows for {missing}")
        loop = plain_loop(spark, runs, corpus, stages, args.loop_docs, tmp)
        counts = {t: spark.read.format("delta").load(str(runs / "delta" / t)).count()
                  for t in ("documents", "quarantine", "refined_documents", "edit_stats")}
    finally:
        spark.stop()
    cores = os.cpu_count() or 1
    table = []
    for name in steps:
        row = stages[name]
        seconds = row["end"] - row["start"]
        docs = int(row["stats"].get("documents_with_pairs") or row["stats"].get("train_pairs") or args.docs) \
            if name in ("sft_pairs", "train") else args.docs
        spark_per_doc = seconds / max(1, docs)
        loop_per_doc = (loop.get(name) or {}).get("loop_s_per_doc")
        table.append({
            "stage": name, "documents": docs, "wall_s": round(seconds, 1), "docs_per_s": round(docs / seconds, 1),
            "spark_ms_per_doc": round(1000 * spark_per_doc, 3),
            "loop_ms_per_doc": round(1000 * loop_per_doc, 3) if loop_per_doc else None,
            "ratio_wall": round(spark_per_doc / loop_per_doc, 2) if loop_per_doc else None,
            "ratio_core_s": round(cores * spark_per_doc / loop_per_doc, 2) if loop_per_doc else None,
            "peak_mib": peaks(samples, row["start"], row["end"]),
        })
    looped = [r for r in table if r["loop_ms_per_doc"] is not None]
    total_spark = sum(r["wall_s"] for r in looped)
    total_loop = sum(loop[r["stage"]]["loop_s_per_doc"] for r in looped) * args.docs
    return {
        "date": time.strftime("%Y-%m-%d"), "cpu": machine(), "cores": cores, "load_average": load_average(),
        "model": not args.skip_model, "train_sample": args.train_sample,
        "refine": {k: stages["refine"]["stats"].get(k) for k in ("origin_version", "tier", "docs_per_s", "chunks",
                                                                 "model_loads", "worker_processes")}
        if "refine" in stages else None,
        "train": {k: stages["train"]["stats"].get(k) for k in ("train_pairs", "train_seconds", "steps", "model_uri")}
        if "train" in stages else None,
        "corpus": made, "pipeline_wall_s": round(wall, 1), "tables": counts, "loop_docs": args.loop_docs,
        "stages": table, "stages_wall_s": round(total_spark, 1),
        "loop_s_extrapolated": round(total_loop, 1),
        "ratio_wall": round(total_spark / total_loop, 2) if total_loop else None,
        "ratio_core_s": round(cores * total_spark / total_loop, 2) if total_loop else None,
        "peak_mib": peaks(samples, 0, float("inf")),
        "samples": len(samples),
    }


def render(results: list[dict[str, Any]]) -> str:
    """The BENCHMARKS.md section: one table per corpus size, smallest first."""
    results = sorted(results, key=lambda r: r["corpus"]["docs"])
    first = results[0]
    sizes = " and ".join(f"{r['corpus']['docs']:,}" for r in results)
    lines = [
        SECTION, "",
        f"Machine: {first['cpu']}; {first['date']}.",
        f"Command: `python benchmarks/load_run.py --docs N --workdir <fresh dir> --json <file>` for N = {sizes}, "
        f"then `--render-json <files> --reading benchmarks/results/load-reading.md --write-benchmarks` (the results: "
        f"`benchmarks/results/load-<N>.json`).",
        "Corpus: N documents drawn in turn from the dev pages (real HTML: real page sizes; each copy has its own id "
        "and URL) in 16 gzip files, through one `refinex pipeline` (gates and evaluation off): the five data stages, "
        "then the fast tier trained on a sample of the documents (`sft.train_sample`, validation split 1%) and "
        "refine -> apply -> stats over all of them. Peak memory is the resident size sampled every 0.5 s: the driver "
        "(the `refinex` Python process), its JVM (in local mode also the only executor; heap a quarter of the machine) "
        "and the Python workers together. The plain loop is each stage's pure per-document work in one Python process "
        "on the first 1,000 documents (`stage_overhead.py`'s functions; for refine the model's backend through "
        "`refine_documents`); ratio = the stage's wall time per document over the loop's, and per core second (the "
        "stage had both cores, the loop one).",
        "",
    ]
    for result in results:
        c, peak = result["corpus"], result["peak_mib"]
        lines += [
            f"**{c['docs']:,} documents** ({c['html_mib']:,} MiB of HTML, {c['gzip_mib']:,} MiB gzipped; load "
            f"average {result['load_average']} at the end): pipeline {result['pipeline_wall_s']:,} s; tables "
            f"{', '.join(f'{k} {v:,}' for k, v in result['tables'].items())}; peak driver {peak['driver']:,} MiB, "
            f"JVM {peak['jvm']:,} MiB, workers {peak['workers']:,} MiB (largest one {peak['worker_max']:,} MiB)."
            + (f" The model: {result['train']['model_uri']} trained on {result['train']['train_pairs']:,} documents "
               f"(sample {result['train_sample']}) in {result['train']['train_seconds']} s; refine "
               f"{result['refine']['origin_version']} ({result['refine']['tier']} tier), loaded "
               f"{result['refine']['model_loads']}x in {result['refine']['worker_processes']} worker process(es)."
               if result.get("train") else ""),
            "",
            "| stage | documents | wall s | docs/s | Spark ms/doc | loop ms/doc | ratio (wall) | ratio (core-s) "
            "| peak MiB driver / JVM / workers |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result["stages"]:
            p = r["peak_mib"]
            lines.append(f"| {r['stage']} | {r.get('documents', c['docs']):,} | {r['wall_s']:,} | {r['docs_per_s']:,} "
                         f"| {r['spark_ms_per_doc']} | {r['loop_ms_per_doc'] if r['loop_ms_per_doc'] is not None else '-'} "
                         f"| {r['ratio_wall'] if r['ratio_wall'] is not None else '-'} "
                         f"| {r['ratio_core_s'] if r['ratio_core_s'] is not None else '-'} "
                         f"| {p['driver']:,} / {p['jvm']:,} / {p['workers']:,} |")
        lines += [f"| **stages with a loop** | | **{result['stages_wall_s']:,}** | "
                  f"| | | **{result['ratio_wall']}** | **{result['ratio_core_s']}** | |", ""]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--loop-docs", type=int, default=1000, help="documents of the plain-loop comparison")
    ap.add_argument("--pages", default=str(DEFAULT_PAGES))
    ap.add_argument("--skip-model", action="store_true", help="the five data stages only")
    ap.add_argument("--train-sample", type=float, default=0.02,
                    help="share of the training documents the fast tier trains on (sft.train_sample)")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--json", dest="json_out", default=None)
    ap.add_argument("--render-json", nargs="+", default=None, help="only render saved --json results")
    ap.add_argument("--write-benchmarks", action="store_true", help="replace the section in BENCHMARKS.md")
    ap.add_argument("--reading", default=None, help="a Markdown file appended to the section (what the numbers say)")
    args = ap.parse_args(argv)
    if args.render_json:
        results = [json.loads(Path(path).read_text(encoding="utf-8")) for path in args.render_json]
    else:
        results = [measure(args)]
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(results[0], indent=2) + "\n", encoding="utf-8")
    text = render(results)
    if args.reading:
        text = text.rstrip("\n") + "\n\n" + Path(args.reading).read_text(encoding="utf-8").strip() + "\n"
    print(text)
    if args.write_benchmarks:
        write_section(REPO / "BENCHMARKS.md", text, SECTION)
    for result in results:
        print(f"summary: {result['corpus']['docs']:,} docs, stages with a loop {result['stages_wall_s']} s, "
              f"Spark/loop ratio {result['ratio_wall']} (wall), {result['ratio_core_s']} (core-s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
