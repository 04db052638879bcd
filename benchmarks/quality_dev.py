"""Quality of the trafilatura expert and of its distilled programs on the dev pages.

For every page: text = ``html_to_text(html)``; the expert (``TrafilaturaExpert``) refines
the page from its HTML; its output is distilled onto the text and the program executed:
``execute(distill(text, expert_out), text).text``. Three outputs are scored against the
gold (snippet P/R/F1/accuracy on ``trafilatura-eval`` pages, bag-of-words P/R/F1 on
``scrapinghub-aeb`` pages):

    (a) the raw text, (b) the expert's output, (c) the distilled program applied to the text.

The goal: (c) loses at most 1 point of snippet F1 against (b). A page the expert fails on
scores as an empty output in (b) and (c). ``--show-losses N`` lists snippets that (b) gets
right and (c) gets wrong, to see what distillation loses::

    python benchmarks/quality_dev.py                      # table on stdout
    python benchmarks/quality_dev.py --write-benchmarks   # also update BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "benchmarks"):  # refinex, report
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from refinex.distill import Distillation, distill_report  # noqa: E402
from refinex.evaluation import load_pages, normalize_ws, score_outputs  # noqa: E402
from refinex.experts.base import OK, ExpertInput  # noqa: E402
from refinex.experts.html import TrafilaturaExpert  # noqa: E402
from refinex.program import RemoveLines, RemoveStr, Result, execute  # noqa: E402
from refinex.text import TEXT_EXTRACTOR_VERSION, html_to_text  # noqa: E402
from report import cpu_model, load_average, write_section  # noqa: E402

DEFAULT_PAGES = REPO.parent / "shared" / "data" / "webpages-dev.jsonl.gz"
SECTION = "## Expert and distillation quality (dev pages)"
GOAL_F1_LOSS = 0.01
# Expert option sets compared by ``--compare`` (scored after distillation, like the main run).
VARIANTS: dict[str, dict[str, bool]] = {
    "default": {},
    "favor_precision": {"favor_precision": True},
    "favor_recall": {"favor_recall": True},
    "fast (no fallback extractors)": {"fast": True},
    "include_comments": {"include_comments": True},
}


@dataclass(frozen=True)
class PageRun:
    """Everything measured on one page."""

    page_id: str
    text: str
    expert_text: Optional[str]  # None when the expert failed
    expert_error: Optional[str]
    distillation: Optional[Distillation]
    result: Optional[Result]
    text_s: float
    expert_s: float
    distill_s: float




def parse_option(text: str) -> tuple[str, Any]:
    """``key=value`` with ``true/false/1/0`` as booleans."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes"):
        return key.strip(), True
    if lowered in ("false", "0", "no"):
        return key.strip(), False
    raise argparse.ArgumentTypeError(f"expert options are booleans, got {text!r}")


def run_page(page: Mapping[str, Any], expert: TrafilaturaExpert, text: str, text_s: float) -> PageRun:
    """Expert output, distillation and execution of one page whose text is ``text``.

    Times are CPU seconds of this process, so they hold on a machine shared with others.
    """
    start = time.process_time()
    [out] = expert.refine_batch([ExpertInput(page["id"], text, page["html"])])
    expert_s = time.process_time() - start
    if out.status != OK or out.refined_text is None:
        return PageRun(page["id"], text, None, out.error, None, None, text_s, expert_s, 0.0)
    start = time.process_time()
    distillation = distill_report(text, out.refined_text)
    distill_s = time.process_time() - start
    result = execute(distillation.program, text)
    return PageRun(
        page["id"], text, out.refined_text, None, distillation, result, text_s, expert_s, distill_s
    )


def _fmt_scores(label: str, scores: Mapping[str, Any]) -> str:
    s, b = scores["snippet"], scores["bow"]
    return (
        f"| {label} | {s['precision']:.3f} | {s['recall']:.3f} | {s['f1']:.3f} | {s['accuracy']:.3f} "
        f"| {b['precision']:.3f} | {b['recall']:.3f} | {b['f1']:.3f} |"
    )


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(runs: Sequence[PageRun]) -> dict[str, Any]:
    """Aggregate statistics of the distillation and execution over ``runs``."""
    done = [r for r in runs if r.distillation is not None and r.result is not None]
    dist = [r.distillation for r in done if r.distillation is not None]
    results = [r.result for r in done if r.result is not None]
    distill_times = [r.distill_s for r in done]
    expert_chars = sum(len(r.expert_text or "") for r in done)
    ops = [len(d.program.ops) for d in dist]
    n_lines = sum(sum(isinstance(op, RemoveLines) for op in d.program.ops) for d in dist)
    n_str = sum(sum(isinstance(op, RemoveStr) for op in d.program.ops) for d in dist)
    return {
        "pages": len(runs),
        "expert_failed": len(runs) - len(done),
        "expert_errors": Counter(r.expert_error for r in runs if r.distillation is None).most_common(5),
        "mean_deletion_ratio": statistics.fmean(x.deletion_ratio for x in results) if results else 0.0,
        "char_deletion_ratio": (
            sum(x.chars_removed for x in results) / max(1, sum(x.chars_in for x in results))
        ),
        "mean_unrepresentable": statistics.fmean(d.unrepresentable_ratio for d in dist) if dist else 0.0,
        "char_unrepresentable": sum(d.inserted_chars for d in dist) / max(1, expert_chars),
        "char_replaced": sum(d.replaced_chars for d in dist) / max(1, expert_chars),
        "exact": sum(d.exact for d in dist),
        "statuses": dict(Counter(x.status for x in results)),
        "rejected_ops": sum(len(x.ops_rejected) for x in results),
        "ops_mean": statistics.fmean(ops) if ops else 0.0,
        "ops_max": max(ops, default=0),
        "remove_lines": n_lines,
        "remove_str": n_str,
        "distill_s_total": sum(distill_times),
        "distill_s_mean": statistics.fmean(distill_times) if distill_times else 0.0,
        "distill_s_p50": _percentile(distill_times, 0.50),
        "distill_s_p95": _percentile(distill_times, 0.95),
        "distill_s_max": max(distill_times, default=0.0),
        "text_s_mean": statistics.fmean(r.text_s for r in runs) if runs else 0.0,
        "expert_s_mean": statistics.fmean(r.expert_s for r in runs) if runs else 0.0,
    }


def snippet_losses(
    pages: Sequence[Mapping[str, Any]], expert: Mapping[str, str], distilled: Mapping[str, str]
) -> list[tuple[str, str, str]]:
    """``(page id, kind, snippet)`` where the expert is right and the distilled text is not.

    kind ``lost`` is a ``with`` snippet the expert has and the distilled text lacks; ``kept``
    is a ``without`` snippet the expert dropped and the distilled text still contains.
    """
    losses: list[tuple[str, str, str]] = []
    for page in pages:
        if page.get("source") != "trafilatura-eval":
            continue
        b = normalize_ws(expert.get(page["id"], ""))
        c = normalize_ws(distilled.get(page["id"], ""))
        for snippet in page["gold"].get("with", ()):
            s = normalize_ws(snippet)
            if s in b and s not in c:
                losses.append((page["id"], "lost", s))
        for snippet in page["gold"].get("without", ()):
            s = normalize_ws(snippet)
            if s not in b and s in c:
                losses.append((page["id"], "kept", s))
    return losses


def run_all(
    pages: Sequence[Mapping[str, Any]],
    texts: Mapping[str, tuple[str, float]],
    expert: TrafilaturaExpert,
    progress: bool,
    desc: str,
) -> list[PageRun]:
    """``run_page`` over ``pages`` with a progress bar."""
    return [
        run_page(page, expert, *texts[page["id"]])
        for page in tqdm(pages, desc=desc, unit="page", disable=not progress)
    ]


def score_runs(pages: Sequence[Mapping[str, Any]], runs: Sequence[PageRun]) -> dict[str, Any]:
    """Scores of the raw text, the expert output and the distilled text of ``runs``."""
    return {
        "raw": score_outputs(pages, {r.page_id: r.text for r in runs}),
        "expert": score_outputs(pages, {r.page_id: r.expert_text or "" for r in runs}),
        "distilled": score_outputs(
            pages, {r.page_id: r.result.text if r.result is not None else "" for r in runs}
        ),
    }


def render_comparison(rows: Sequence[tuple[str, str, Mapping[str, Any]]]) -> list[str]:
    """Markdown lines of the expert option comparison."""
    lines = [
        "",
        "Expert options (`--compare`), each distilled and executed like (c):",
        "",
        "| trafilatura options | (b) F1 | (c) F1 | (c) − (b) | (c) P / R | (b) bow F1 | (c) bow F1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, version, sc in rows:
        b, c = sc["expert"], sc["distilled"]
        lines.append(
            f"| {label} (`{version.split('[', 1)[1].split(']', 1)[0]}`) | {b['snippet']['f1']:.3f} "
            f"| {c['snippet']['f1']:.3f} | {100 * (c['snippet']['f1'] - b['snippet']['f1']):+.2f} "
            f"| {c['snippet']['precision']:.3f} / {c['snippet']['recall']:.3f} "
            f"| {b['bow']['f1']:.3f} | {c['bow']['f1']:.3f} |"
        )
    return lines


def render_section(
    args: argparse.Namespace,
    expert: TrafilaturaExpert,
    scores: Mapping[str, Mapping[str, Any]],
    summary: Mapping[str, Any],
    elapsed: float,
    comparison: Sequence[tuple[str, str, Mapping[str, Any]]] = (),
) -> str:
    """The BENCHMARKS.md section (markdown)."""
    command = "python benchmarks/quality_dev.py" + "".join(
        f" --expert-option {k}={str(v).lower()}" for k, v in args.expert_option
    )
    if args.limit:
        command += f" --limit {args.limit}"
    if args.compare:
        command += " --compare"
    delta = scores["distilled"]["snippet"]["f1"] - scores["expert"]["snippet"]["f1"]
    delta_bow = scores["distilled"]["bow"]["f1"] - scores["expert"]["bow"]["f1"]
    s = summary
    lines = [
        SECTION,
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}. "
        f"Command: `{command}` ({elapsed:.0f} s, one process; load average {load_average()}).",
        f"Pages: {s['pages']} of `{args.pages.name}` ({scores['raw']['snippet']['pages']} trafilatura-eval "
        f"pages for snippet scores, {scores['raw']['bow']['pages']} scrapinghub-aeb pages for bag-of-words). "
        f"Text: `{TEXT_EXTRACTOR_VERSION}`; expert: `{expert.version}`.",
        "",
        "| output | P | R | F1 | acc | bow P | bow R | bow F1 |",
        "|---|---|---|---|---|---|---|---|",
        _fmt_scores("(a) raw text, `html_to_text(html)`", scores["raw"]),
        _fmt_scores("(b) expert output (trafilatura)", scores["expert"]),
        _fmt_scores("(c) distilled program executed on (a)", scores["distilled"]),
        "",
        "Reference on the held-aside pages (shared data README): all visible text (inscriptis) "
        "snippet F1 0.694, bag-of-words F1 0.760; trafilatura snippet F1 0.921, bag-of-words 0.974.",
        "",
        f"(c) − (b): snippet F1 {100 * delta:+.2f} points, bag-of-words F1 {100 * delta_bow:+.2f} points "
        f"(goal: no worse than {-100 * GOAL_F1_LOSS:.0f} point of snippet F1: "
        f"{'met' if delta >= -GOAL_F1_LOSS else 'NOT met'}).",
        "",
        "| distillation | value |",
        "|---|---|",
        f"| expert failures (scored as empty) | {s['expert_failed']} |",
        f"| mean deletion ratio of the programs (per page / all characters) "
        f"| {s['mean_deletion_ratio']:.3f} / {s['char_deletion_ratio']:.3f} |",
        f"| expert text unrepresentable (`inserted_chars`, per page / all characters) "
        f"| {s['mean_unrepresentable']:.4f} / {s['char_unrepresentable']:.4f} |",
        f"| raw characters kept although the expert rewrote them (`replaced_chars` / expert chars) "
        f"| {s['char_replaced']:.4f} |",
        f"| programs reproducing the expert text exactly | {s['exact']} / {s['pages'] - s['expert_failed']} |",
        f"| ops per program (mean / max); remove_lines / remove_str in total "
        f"| {s['ops_mean']:.1f} / {s['ops_max']}; {s['remove_lines']} / {s['remove_str']} |",
        f"| execution statuses (default guardrails); rejected ops | "
        f"{', '.join(f'{k} {v}' for k, v in sorted(s['statuses'].items()))}; {s['rejected_ops']} |",
        f"| distill CPU time per page: mean / p50 / p95 / max | {1000 * s['distill_s_mean']:.1f} / "
        f"{1000 * s['distill_s_p50']:.1f} / {1000 * s['distill_s_p95']:.1f} / {1000 * s['distill_s_max']:.0f} ms "
        f"({s['distill_s_total']:.1f} s in total) |",
        f"| html_to_text / expert CPU time per page (mean) | {1000 * s['text_s_mean']:.1f} / "
        f"{1000 * s['expert_s_mean']:.1f} ms |",
    ]
    if comparison:
        lines += render_comparison(comparison)
    return "\n".join(lines) + "\n"



def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=Path, default=DEFAULT_PAGES, help="dev pages (.jsonl.gz)")
    parser.add_argument("--limit", type=int, default=None, help="first N pages only")
    parser.add_argument(
        "--expert-option",
        type=parse_option,
        action="append",
        default=[],
        metavar="KEY=BOOL",
        help="TrafilaturaExpert option, e.g. favor_precision=true (repeatable)",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown section here")
    parser.add_argument("--json", type=Path, default=None, help="write all scores and statistics as JSON")
    parser.add_argument("--write-benchmarks", action="store_true", help=f"update '{SECTION}' in BENCHMARKS.md")
    parser.add_argument("--show-losses", type=int, default=0, metavar="N", help="print N snippets (c) loses vs (b)")
    parser.add_argument(
        "--compare", action="store_true", help="also score the expert option sets of VARIANTS"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    expert = TrafilaturaExpert(**dict(args.expert_option))
    pages = list(load_pages(args.pages, args.limit))
    progress = not args.no_progress
    started = time.monotonic()
    texts: dict[str, tuple[str, float]] = {}
    for page in tqdm(pages, desc="html_to_text", unit="page", disable=not progress):
        start = time.process_time()
        text = html_to_text(page["html"])
        texts[page["id"]] = (text, time.process_time() - start)
    runs = run_all(pages, texts, expert, progress, "expert+distill")
    scores = score_runs(pages, runs)
    summary = summarize(runs)
    comparison: list[tuple[str, str, Mapping[str, Any]]] = []
    if args.compare:
        for label, options in VARIANTS.items():
            variant = TrafilaturaExpert(**options)
            if variant.version == expert.version:
                comparison.append((label, variant.version, scores))
                continue
            variant_runs = run_all(pages, texts, variant, progress, label)
            comparison.append((label, variant.version, score_runs(pages, variant_runs)))
    elapsed = time.monotonic() - started
    section = render_section(args, expert, scores, summary, elapsed, comparison)
    print(section)

    expert_out = {r.page_id: r.expert_text or "" for r in runs}
    distilled_out = {r.page_id: r.result.text if r.result is not None else "" for r in runs}
    if args.show_losses:
        losses = snippet_losses(pages, expert_out, distilled_out)
        print(f"{len(losses)} snippets where (b) is right and (c) is wrong:")
        for page_id, kind, snippet in losses[: args.show_losses]:
            print(f"  {page_id} {kind}: {snippet[:150]!r}")
    if args.out is not None:
        args.out.write_text(section, encoding="utf-8")
    if args.json is not None:
        payload = {
            "expert": expert.version,
            "text": TEXT_EXTRACTOR_VERSION,
            "scores": scores,
            "summary": summary,
            "comparison": {label: {"version": v, "scores": sc} for label, v, sc in comparison},
        }
        args.json.write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
    if args.write_benchmarks:
        write_section(REPO / "BENCHMARKS.md", section, SECTION)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
