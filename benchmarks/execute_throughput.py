"""Program execution throughput on the dev pages (single process, one core).

Programs are distilled first (text = ``html_to_text(html)``, the trafilatura expert's
output distilled onto it), then only execution is timed, over all pages, several times:

* ``execute(program, text)``: a parsed ``Program`` (what the Spark apply stage runs);
* ``execute_text(program_text, text)``: parsing the program's text as well (what runs on a
  model's generated output).

Reported: the median over repetitions of documents and MB of page text (UTF-8) per
second of this process's CPU time (``time.process_time``: per-core throughput, unaffected by
other processes sharing the machine), and of wall-clock time::

    python benchmarks/execute_throughput.py                      # table on stdout
    python benchmarks/execute_throughput.py --write-benchmarks   # also update BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "benchmarks"):  # refinex, report
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from refinex.distill import distill  # noqa: E402
from refinex.evaluation import load_pages  # noqa: E402
from refinex.experts.base import OK, ExpertInput  # noqa: E402
from refinex.experts.html import TrafilaturaExpert  # noqa: E402
from refinex.program import Program, execute, execute_text  # noqa: E402
from refinex.text import html_to_text  # noqa: E402
from report import cpu_model, load_average, write_section  # noqa: E402

DEFAULT_PAGES = REPO.parent / "shared" / "data" / "webpages-dev.jsonl.gz"
SECTION = "## Program execution throughput"




def prepare(pages: Sequence[dict[str, Any]], progress: bool) -> list[tuple[str, Program]]:
    """``(text, distilled program)`` of every page the expert refines."""
    expert = TrafilaturaExpert()
    work: list[tuple[str, Program]] = []
    for page in tqdm(pages, desc="distilling", unit="page", disable=not progress):
        text = html_to_text(page["html"])
        [out] = expert.refine_batch([ExpertInput(page["id"], text, page["html"])])
        if out.status == OK and out.refined_text is not None:
            work.append((text, distill(text, out.refined_text)))
    return work


def time_runs(run: Callable[[], None], repeats: int) -> tuple[list[float], list[float]]:
    """CPU and wall-clock seconds of ``repeats`` calls of ``run`` (after one warm-up call)."""
    run()
    cpu: list[float] = []
    wall: list[float] = []
    for _ in range(repeats):
        gc.collect()
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        run()
        cpu.append(time.process_time() - cpu_start)
        wall.append(time.perf_counter() - wall_start)
    return cpu, wall


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=Path, default=DEFAULT_PAGES, help="dev pages (.jsonl.gz)")
    parser.add_argument("--limit", type=int, default=None, help="first N pages only")
    parser.add_argument("--repeats", type=int, default=7, help="timed passes over all documents")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown section here")
    parser.add_argument("--write-benchmarks", action="store_true", help=f"update '{SECTION}' in BENCHMARKS.md")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    pages = list(load_pages(args.pages, args.limit))
    work = prepare(pages, progress=not args.no_progress)
    texts = [text for text, _ in work]
    sources = [(str(program), text) for text, program in work]
    n_docs = len(work)
    megabytes = sum(len(text.encode("utf-8")) for text in texts) / 1e6
    n_ops = sum(len(program.ops) for _, program in work)

    def run_programs() -> None:
        for text, program in work:
            execute(program, text)

    def run_program_texts() -> None:
        for source, text in sources:
            execute_text(source, text)

    rows = []
    for label, run in (
        ("`execute(program, text)`", run_programs),
        ("`execute_text(program_text, text)` (parse + execute)", run_program_texts),
    ):
        cpu, wall = time_runs(run, args.repeats)
        cpu_median, wall_median = statistics.median(cpu), statistics.median(wall)
        rows.append(
            f"| {label} | {n_docs / cpu_median:,.0f} | {megabytes / cpu_median:.1f} "
            f"| {1e6 * cpu_median / n_docs:.0f} | {n_docs / wall_median:,.0f} "
            f"| {min(cpu):.3f} / {cpu_median:.3f} / {max(cpu):.3f} |"
        )

    command = "python benchmarks/execute_throughput.py" + (f" --limit {args.limit}" if args.limit else "")
    if args.repeats != 7:
        command += f" --repeats {args.repeats}"
    lines = [
        SECTION,
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores (one used: single process), "
        f"Python {platform.python_version()}, load average {load_average()} at the end. Command: `{command}`.",
        f"Workload: the distilled trafilatura programs of {n_docs} dev pages "
        f"({megabytes:.1f} MB of page text, {n_ops:,} operations, {n_ops / max(1, n_docs):.1f} per program); "
        f"each pass executes every program once; {args.repeats} timed passes after one warm-up; "
        "medians. Per-core figures use the process's CPU time, so they hold on a shared machine; "
        "the wall-clock rate is what this run got.",
        "",
        "| what is timed | docs/s per core | MB/s per core | CPU µs per doc | docs/s wall-clock "
        "| CPU s per pass min / median / max |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    section = "\n".join(lines) + "\n"
    print(section)
    if args.out is not None:
        args.out.write_text(section, encoding="utf-8")
    if args.write_benchmarks:
        write_section(REPO / "BENCHMARKS.md", section, SECTION)
    return 0



if __name__ == "__main__":
    raise SystemExit(main())
