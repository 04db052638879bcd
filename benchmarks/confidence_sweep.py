"""Choose how a trained refine model decodes the chunks it is unsure of, cross-validated:
``refine.options.min_op_prob`` (drop unsure operations) and, with ``--votes N``,
``refine.options.votes`` / ``vote_threshold`` / ``vote_below`` (line votes over N sampled
programs).

The model refines the validation documents of a ``refine_model_dev.py`` workdir once, with
greedy constrained decoding, keeping every generated operation's confidence (the lowest
model probability of its tokens: ``HFBackend.generate_with_confidence``). Each threshold is
then replayed without generating again: operations under it are dropped, chunk programs are
merged per document exactly as the refine stage merges them (``refine_documents``),
executed with the default guardrails and scored (snippet P/R/F1, bag-of-words F1).

With ``--votes N``, every chunk whose greedy program has an operation under the largest
``--vote-below`` is also sampled N times (``HFBackend.sample_programs``, the prompt run once)
and each (``vote_below``, ``vote_threshold``) pair is replayed: chunks under ``vote_below``
get ``vote_program`` over their samples, the others keep the greedy program; exactly what
the backend does with those options, up to the samples' random draws.

Each knob's setting is chosen by 2-fold cross-validation over the documents (folds by a hash
of the doc id): each fold is refined with the setting that scored best on the other fold
(objective: 0.75 snippet F1 + 0.25 bag-of-words F1, the consensus benchmark's), so the
reported score never saw its own documents' gold::

    python benchmarks/confidence_sweep.py --model models:/refinex-refiner/5 --votes 8 --write-benchmarks
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
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

from refinex.evaluation import load_pages, score_outputs  # noqa: E402

DEFAULT_PAGES = REPO.parent / "shared" / "data" / "webpages-dev.jsonl.gz"
SECTION = "## Refine model: decoding the chunks it is unsure of (dev validation documents)"
THRESHOLDS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
VOTE_THRESHOLDS = (0.4, 0.5, 0.6, 0.7, 0.8)
VOTE_BELOW = (0.5, 0.7, 0.9, 0.95, 1.0)


class RecordingBackend:
    """Generates through ``backend`` and keeps each chunk's operations with confidences."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.scored: dict[tuple[str, int], list[tuple[str, float]]] = {}
        self.requests: list[Any] = []

    def generate(self, requests: Sequence[Any]) -> list[str]:
        out = []
        for request, ops in zip(requests, self.backend.generate_with_confidence(requests)):
            self.scored[(request.prompt, request.first_line)] = ops
            self.requests.append(request)
            out.append("".join(line + "\n" for line, _ in ops))
        return out


class ReplayBackend:
    """Returns the recorded programs without the operations under ``min_prob``, filtered
    by the backend's own ``drop_unsure_ops`` and ``finish_program``."""

    def __init__(self, scored: Mapping[tuple[str, int], list[tuple[str, float]]], min_prob: float) -> None:
        self.scored = scored
        self.min_prob = min_prob

    def generate(self, requests: Sequence[Any]) -> list[str]:
        from refinex.model.backends import DEFAULT_STOP, finish_program
        from refinex.model.constrained import drop_unsure_ops

        out = []
        for request in requests:
            lines = [((line + "\n").encode("utf-8"), p) for line, p in self.scored[(request.prompt, request.first_line)]]
            data, _ = drop_unsure_ops(lines, self.min_prob)
            out.append(finish_program(data.decode("utf-8"), DEFAULT_STOP, True))
        return out


class VoteReplayBackend:
    """The recorded greedy programs, with the chunks under ``below`` replaced by
    ``vote_program`` over their recorded samples."""

    def __init__(
        self,
        scored: Mapping[tuple[str, int], list[tuple[str, float]]],
        samples: Mapping[tuple[str, int], list[str]],
        below: float,
        threshold: float,
    ) -> None:
        self.scored, self.samples, self.below, self.threshold = scored, samples, below, threshold

    def generate(self, requests: Sequence[Any]) -> list[str]:
        from refinex.model.voting import vote_program

        out = []
        for request in requests:
            key = (request.prompt, request.first_line)
            ops = self.scored[key]
            if min(p for _, p in ops) < self.below:
                out.append(vote_program(self.samples[key], request.first_line, request.lines, self.threshold))
            else:
                out.append("".join(line + "\n" for line, _ in ops))
        return out


def fold_of(doc_id: str) -> int:
    return hashlib.sha256(doc_id.encode("utf-8")).digest()[0] & 1


def objective(scores: Mapping[str, Any]) -> float:
    return 0.75 * scores["snippet"]["f1"] + 0.25 * scores["bow"]["f1"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model URI (models:/refinex-refiner/N or a checkpoint dir)")
    parser.add_argument("--render-json", type=Path, default=None,
                        help="render an earlier --json report instead of running (with --write-benchmarks: update it)")
    parser.add_argument("--workdir", default="/tmp/refinex_refine_dev", help="refine_model_dev.py's workdir")
    parser.add_argument("--pages", type=Path, default=DEFAULT_PAGES, help="dev pages (.jsonl.gz)")
    parser.add_argument("--validation-fraction", type=float, default=0.2)
    parser.add_argument("--max-tokens", type=int, default=512, help="chunking.max_tokens the model was trained with")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLDS))
    parser.add_argument("--votes", type=int, default=0, help="also sweep line-vote decoding with this many samples")
    parser.add_argument("--vote-thresholds", type=float, nargs="+", default=list(VOTE_THRESHOLDS))
    parser.add_argument("--vote-below", type=float, nargs="+", default=list(VOTE_BELOW))
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the votes")
    parser.add_argument("--limit", type=int, default=None, help="first N validation documents only (a smoke run)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw report here")
    parser.add_argument("--write-benchmarks", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args(argv)
    if args.render_json:
        section = render(json.loads(args.render_json.read_text(encoding="utf-8")))
        print(section)
        if args.write_benchmarks:
            write_section(REPO / "BENCHMARKS.md", section, SECTION)
        return 0
    if not args.model:
        parser.error("--model is required (unless --render-json)")

    from tqdm import tqdm

    from refinex.chunking import hf_token_counter
    from refinex.config import load_config
    from refinex.model.backends import DecodeConfig
    from refinex.model.backends.hf import HFBackend
    from refinex.model.sft import VALIDATION, assign_split
    from refinex.program import Guardrails, execute, parse
    from refinex.spark.refine import refine_documents, resolve_model
    from refinex.spark.session import get_spark
    from refinex.spark.tables import read_table

    started = time.perf_counter()
    config = load_config("default", ["spark.master=local[2]", "spark.ui_enabled=false", "spark.log_level=ERROR",
                                     f"sft.validation_fraction={args.validation_fraction}"])
    workdir = str(Path(args.workdir).resolve())
    spark = get_spark(config, workdir)
    texts = {r["doc_id"]: r["text"] for r in read_table(spark, workdir, "documents").select("doc_id", "text").collect()
             if assign_split(r["doc_id"], args.validation_fraction) == VALIDATION}
    checkpoint = resolve_model(config, workdir, args.model).checkpoint
    spark.stop()
    backend = HFBackend.from_pretrained(checkpoint, DecodeConfig(max_new_tokens=config.refine.max_new_tokens,
                                                                 batch_size=args.batch_size), dtype=args.dtype)
    count = hf_token_counter(backend.tokenizer)
    recorder = RecordingBackend(backend)
    docs = sorted(texts.items())[: args.limit]
    texts = dict(docs)
    pages = [p for p in load_pages(args.pages) if p["id"] in texts]
    generate_started = time.perf_counter()
    for begin in tqdm(range(0, len(docs), 16), desc="refine (recording confidences)", unit="16 docs"):
        refine_documents(recorder, count, docs[begin : begin + 16], args.max_tokens)
    generate_s = time.perf_counter() - generate_started

    samples: dict[tuple[str, int], list[str]] = {}
    sample_s = 0.0
    if args.votes:
        sampler = HFBackend(backend.model, backend.tokenizer, DecodeConfig(
            max_new_tokens=config.refine.max_new_tokens, batch_size=args.batch_size, temperature=args.temperature))
        requests = {(r.prompt, r.first_line): r for r in recorder.requests}
        unsure = sorted((key for key, ops in recorder.scored.items() if min(p for _, p in ops) < max(args.vote_below)),
                        key=lambda key: min(p for _, p in recorder.scored[key]))
        sample_started = time.perf_counter()
        step = max(1, args.batch_size // args.votes) * 8
        for begin in tqdm(range(0, len(unsure), step), desc=f"sample {args.votes} programs per unsure chunk",
                          unit=f"{step} chunks"):
            keys = unsure[begin : begin + step]
            for key, texts_ in zip(keys, sampler.sample_programs([requests[k] for k in keys], args.votes)):
                samples[key] = texts_
        sample_s = time.perf_counter() - sample_started

    guardrails = Guardrails(config.guardrails.max_error_ratio, config.guardrails.min_kept_chars)

    def replay(replay_backend: Any) -> tuple[dict[str, str], dict[str, Any]]:
        refined = refine_documents(replay_backend, count, docs, args.max_tokens)
        out: dict[str, str] = {}
        ratios, ops = [], 0
        for row in refined:
            result = execute(parse(row["program"]), texts[row["doc_id"]], guardrails)
            out[row["doc_id"]] = result.text
            ratios.append(result.deletion_ratio)
            ops += row["n_ops"] - row["n_keep_all"]
        folds = [score_outputs([p for p in pages if fold_of(p["id"]) == k], out) for k in (0, 1)]
        return out, {"scores": score_outputs(pages, out), "folds": folds,
                     "mean_deletion_ratio": statistics.fmean(ratios), "ops": ops}

    def cross_validate(rows: list[dict[str, Any]], outputs: list[dict[str, str]], key: Any) -> tuple[list[Any], Any]:
        """Per fold, the setting best on the other fold (ties: ``key``'s smallest), and the
        scores of the documents each refined with its fold's setting."""
        chosen = []
        for k in (0, 1):
            chosen.append(max(range(len(rows)), key=lambda i: (objective(rows[i]["folds"][1 - k]), key(rows[i]))))
        cv_texts = {doc_id: outputs[chosen[fold_of(doc_id)]][doc_id] for doc_id in texts}
        return chosen, score_outputs(pages, cv_texts)

    rows, outputs = [], []
    for threshold in args.thresholds:
        out, row = replay(ReplayBackend(recorder.scored, threshold))
        rows.append({"threshold": threshold, **row})
        outputs.append(out)
    chosen_rows, cross_validated = cross_validate(rows, outputs, lambda r: -r["threshold"])
    chosen = [rows[i]["threshold"] for i in chosen_rows]
    vote_rows: list[dict[str, Any]] = []
    vote_cv: Optional[dict[str, Any]] = None
    if args.votes:
        vote_outputs = []
        for below in args.vote_below:
            n_voted = sum(1 for ops in recorder.scored.values() if min(p for _, p in ops) < below)
            for threshold in args.vote_thresholds:
                out, row = replay(VoteReplayBackend(recorder.scored, samples, below, threshold))
                vote_rows.append({"below": below, "threshold": threshold, "voted_chunks": n_voted, **row})
                vote_outputs.append(out)
        # ties: fewer voted chunks (cheaper), then the lower threshold
        picked, scores = cross_validate(vote_rows, vote_outputs, lambda r: (-r["below"], -r["threshold"]))
        vote_cv = {"chosen": [{"below": vote_rows[i]["below"], "threshold": vote_rows[i]["threshold"]} for i in picked],
                   "scores": scores}
    report = {
        "machine": f"{cpu_model()}, {os.cpu_count()} cores",
        "command": " ".join(["python benchmarks/confidence_sweep.py", *(sys.argv[1:] if argv is None else argv)]),
        "model": args.model,
        "documents": len(docs),
        "chunks": len(recorder.scored),
        "generate_s": generate_s,
        "votes": args.votes,
        "temperature": args.temperature,
        "sampled_chunks": len(samples),
        "sample_s": sample_s,
        "wall_s": time.perf_counter() - started,
        "load": load_average(),
        "rows": rows,
        "chosen": chosen,
        "cross_validated": cross_validated,
        "vote_rows": vote_rows,
        "vote_cross_validated": vote_cv,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=1), encoding="utf-8")
    section = render(report)
    print(section)
    if args.write_benchmarks:
        write_section(REPO / "BENCHMARKS.md", section, SECTION)
    return 0


def _score_cells(row: Mapping[str, Any]) -> str:
    """A sweep row's score cells: snippet P, R, F1, bag-of-words F1, mean deletion ratio."""
    s, b = row["scores"]["snippet"], row["scores"]["bow"]
    return (f"{s['precision']:.3f} | {s['recall']:.3f} | **{s['f1']:.3f}** | {b['f1']:.3f} | "
            f"{row['mean_deletion_ratio']:.3f} |")


def render(report: Mapping[str, Any]) -> str:
    lines = [
        SECTION,
        "",
        f"Machine: {report['machine']}. Command: `{report['command']}` ({report['wall_s']:.0f} s wall-clock, of which "
        f"{report['generate_s']:.0f} s generating; load average {report['load']} at the end).",
        f"Model `{report['model']}` on the {report['documents']} validation documents ({report['chunks']} chunks), "
        "greedy constrained decoding, generated once; each threshold drops the operations whose least likely token "
        "had a lower probability, then the programs are merged, executed and scored like the refine stage's.",
        "",
        "| min_op_prob | operations | snippet P | snippet R | snippet F1 | bow F1 | mean deletion ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        lines.append(f"| {row['threshold']:g} | {row['ops']} | {_score_cells(row)}")
    cv = report["cross_validated"]
    lines += [
        "",
        f"2-fold cross-validated (each half of the documents refined with the threshold chosen on the other half: "
        f"{report['chosen'][0]:g} / {report['chosen'][1]:g}): snippet P {cv['snippet']['precision']:.3f}, "
        f"R {cv['snippet']['recall']:.3f}, **F1 {cv['snippet']['f1']:.3f}**, bag-of-words F1 {cv['bow']['f1']:.3f}. "
        "The rows above are scored on all validation documents, so the best row is an optimistic figure; the "
        "cross-validated one is not.",
    ]
    vote_cv = report.get("vote_cross_validated")
    if report.get("votes") and vote_cv:
        lines += [
            "",
            f"Line-vote decoding (`refine.options.votes={report['votes']}`): the {report['sampled_chunks']} chunks whose "
            f"greedy program has an operation under the largest `vote_below` were each sampled {report['votes']} times "
            f"(temperature {report['temperature']:g}, constrained; {report['sample_s']:.0f} s); a chunk under "
            "`vote_below` gets the lines that at least `vote_threshold` of its samples delete, the others keep their "
            "greedy program.",
            "",
            "| vote_below | voted chunks | vote_threshold | snippet P | snippet R | snippet F1 | bow F1 | mean deletion ratio |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in report["vote_rows"]:
            lines.append(f"| {row['below']:g} | {row['voted_chunks']} | {row['threshold']:g} | {_score_cells(row)}")
        chosen = " / ".join(f"vote_below {c['below']:g}, vote_threshold {c['threshold']:g}" for c in vote_cv["chosen"])
        v = vote_cv["scores"]
        lines += [
            "",
            f"2-fold cross-validated ({chosen}): snippet P {v['snippet']['precision']:.3f}, "
            f"R {v['snippet']['recall']:.3f}, **F1 {v['snippet']['f1']:.3f}**, bag-of-words F1 {v['bow']['f1']:.3f}.",
            "",
            "Reading it: dropping an unsure operation (min_op_prob) also drops the right part of it — a "
            "`remove_lines` range whose end the model cannot place is usually right about its start — so it trades "
            "precision for recall almost one for one. A line vote keeps what most samples agree on and cuts only "
            "the contested lines: the greedy end id is the mode of a split distribution, the vote its "
            "`vote_threshold` quantile. Thresholds above 0.5 ask for more agreement to delete than to keep, which "
            "is where the model's errors are (it deletes content more often than it keeps boilerplate). The "
            f"price is decoding time: the samples took {report['sample_s']:.0f} s on top of the "
            f"{report['generate_s']:.0f} s greedy pass here (all chunks under the largest vote_below; the prompt "
            "runs once per chunk and its KV cache is shared by the samples). The vote rows move with the samples' "
            "random draws: another draw (an earlier ad-hoc run of the same procedure) scored the same settings up to "
            "0.02 snippet F1 apart.",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
