#!/usr/bin/env python
"""Every tier of the refine model timed in one run: the fast tier, the tagging head, generation.

On a Qwen2.5-0.5B-shaped model with random weights (``gpu_generate.QWEN25_05B``), at
``--doc-tokens`` tokens per document (default 1024):

* the tagging head: the base's forward pass over length-sorted batches of documents (lines
  of about ``--line-tokens`` tokens, each ended by a newline token) and the line head
  (:mod:`refinex.model.tagging.model`), exactly the work ``TagBackend`` does per chunk;
* generation: ``gpu_generate.run`` in ``teacher`` mode (constrained greedy decoding of
  ``--new-tokens``-token programs, as a trained model writes them) on the same shape.

* the fast tier (:mod:`refinex.model.fast`, its default architecture, random weights):
  ``FastBackend.probabilities`` on synthetic documents of ``--fast-lines`` lines with page
  words, featurisation included, on the CPU (all cores) and on the GPU (the network there,
  the hashing on the CPU): the number a CPU cluster and a GPU node would see.

docs/s = documents / wall time after a warm-up call, per batch size.

GPU:  python benchmarks/gpu_tag.py --write-benchmarks
CPU smoke test:  python benchmarks/gpu_tag.py --tiny
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

for _path in (Path(__file__).resolve().parents[1], Path(__file__).resolve().parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import gpu_generate  # noqa: E402
from refinex.model.tagger import LAYOUT_FEATURES  # noqa: E402
from refinex.model.tagging.model import EncodedChunk, TagArchitecture, TagHead, chunk_vectors  # noqa: E402
from report import write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Refine model: tagging head against generation (GPU)"


def synthetic_chunks(n: int, doc_tokens: int, line_tokens: int, vocab: int, seed: int) -> list[EncodedChunk]:
    """Documents of ``doc_tokens`` tokens cut into lines of ~``line_tokens`` tokens."""
    rng = random.Random(seed)
    newline = 198  # any id: the weights are random
    chunks = []
    for _ in range(n):
        window: list[int] = [1]
        spans = []
        while len(window) < doc_tokens:
            size = max(1, min(doc_tokens - len(window) - 1, rng.randint(line_tokens // 2, 2 * line_tokens)))
            start = len(window)
            window += [rng.randrange(300, vocab - 300) for _ in range(size)] + [newline]
            spans.append((0, start, len(window) - 1))
        layout = np.zeros((len(spans), LAYOUT_FEATURES), dtype=np.float32)
        chunks.append(EncodedChunk((tuple(window),), tuple(spans), layout))
    return chunks


def time_tagging(args: argparse.Namespace) -> list[dict[str, Any]]:
    from transformers import Qwen2Config, Qwen2Model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    shape = dict(gpu_generate.TINY if args.tiny else gpu_generate.QWEN25_05B)
    config = Qwen2Config(**shape)
    config._attn_implementation = args.attn
    torch.manual_seed(0)
    with torch.device(device):
        base = Qwen2Model(config)
    base = base.to(dtype).eval()
    architecture = TagArchitecture(hidden_size=shape["hidden_size"], window_tokens=max(args.doc_tokens + 8, 64))
    head = TagHead(architecture, LAYOUT_FEATURES).to(device).eval()
    results = []
    for batch in args.batch_sizes:
        chunks = synthetic_chunks(batch, args.doc_tokens, args.line_tokens, shape["vocab_size"], args.seed)
        layouts = [torch.from_numpy(c.layout).to(device) for c in chunks]

        def once() -> None:
            with torch.inference_mode():
                vectors = chunk_vectors(base, chunks, 0, device, batch, batch * (args.doc_tokens + 8))
                head(vectors, layouts)
            gpu_generate._sync(device)

        once()  # warm-up
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            once()
            times.append(time.perf_counter() - started)
        best = min(times)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
        results.append({"head": "tag", "batch": batch, "docs_per_s": batch / best, "s_per_batch": best,
                        "lines_per_doc": sum(c.n_lines for c in chunks) / batch, "peak_gib": peak})
        print(json.dumps(results[-1]), flush=True)
    return results


def synthetic_documents(n: int, lines: int, seed: int) -> list[Any]:
    """Requests of ``n`` documents of ``lines`` lines of random words, with page words."""
    from refinex.dom import DOM_FEATURES, PageStructure
    from refinex.model.backends import GenerationRequest

    rng = random.Random(seed)
    words = [f"w{i}" for i in range(5000)]
    names = ["nav", "menu", "footer", "content", "article", "sidebar", "post", "comment"]
    out = []
    for _ in range(n):
        text = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 25))) for _ in range(lines)]
        page = PageStructure(np.zeros((lines, DOM_FEATURES), dtype=np.float32),
                             tuple((f"tag:{rng.choice(['p', 'li', 'div'])}", f"name:{rng.choice(names)}")
                                   for _ in range(lines)))
        out.append(GenerationRequest.for_lines(text).with_structure(page))
    return out


def time_fast(args: argparse.Namespace) -> list[dict[str, Any]]:
    from refinex.model.fast.backend import FastBackend
    from refinex.model.fast.network import FastArchitecture, FastTagger
    from refinex.model.fast.train import FastTrainConfig

    torch.manual_seed(0)
    config = FastTrainConfig.from_dict({k: v for k, v in _fast_defaults().items()})
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and not args.tiny else [])
    results = []
    for device in devices:
        network = FastTagger(config.architecture()).to(device).eval()
        for batch in args.batch_sizes:
            backend = FastBackend(network, 0.5, True)
            backend.config = backend.config.__class__(batch_size=batch)
            requests = synthetic_documents(batch, args.fast_lines, args.seed)
            backend.probabilities(requests)  # warm-up
            times = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                backend.probabilities(requests)
                gpu_generate._sync(device)
                times.append(time.perf_counter() - started)
            best = min(times)
            results.append({"head": f"fast ({device}, {torch.get_num_threads()} threads)", "batch": batch,
                            "docs_per_s": batch / best, "s_per_batch": best, "lines_per_doc": args.fast_lines,
                            "feature_share": backend.last_stats["feature_seconds"] / backend.last_stats["seconds"],
                            "peak_gib": None})
            print(json.dumps(results[-1]), flush=True)
    return results


def _fast_defaults() -> dict[str, Any]:
    from refinex.model.bases import tag_defaults

    return tag_defaults("fast")


def time_generation(args: argparse.Namespace) -> list[dict[str, Any]]:
    argv = ["--modes", "teacher", "--prompt-tokens", str(args.doc_tokens), "--new-tokens", str(args.new_tokens),
            "--batch-sizes", ",".join(str(b) for b in args.batch_sizes), "--repeats", str(args.repeats),
            "--no-prefill"]
    if args.tiny:
        argv.append("--tiny")
    if args.device:
        argv += ["--device", args.device]
    if args.dtype:
        argv += ["--dtype", args.dtype]
    return [{"head": "generate", "batch": r["batch"], "docs_per_s": r["docs_per_s"], "s_per_batch": r["batch_s"],
             "new_tokens": r.get("new_tokens_per_doc"), "peak_gib": r.get("peak_gib")}
            for r in gpu_generate.run(gpu_generate.parse_args(argv))]


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| head | batch | docs/s | s/batch | peak GiB |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        peak = "-" if r.get("peak_gib") is None else f"{r['peak_gib']:.1f}"
        lines.append(f"| {r['head']} | {r['batch']} | {r['docs_per_s']:.1f} | {r['s_per_batch']:.3f} | {peak} |")
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shape (CPU smoke test)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated (default 32,64,128,256)")
    parser.add_argument("--doc-tokens", type=int, default=None)
    parser.add_argument("--line-tokens", type=int, default=12)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-generation", dest="generation", action="store_false")
    parser.add_argument("--fast-lines", type=int, default=200, help="lines per document of the fast tier's run")
    parser.add_argument("--json", default=None)
    parser.add_argument("--write-benchmarks", action="store_true")
    args = parser.parse_args(argv)
    default_batches = "2,4" if args.tiny else "32,64,128,256"
    args.batch_sizes = [int(b) for b in (args.batch_sizes or default_batches).split(",")]
    args.doc_tokens = args.doc_tokens or (128 if args.tiny else 1024)
    if args.tiny:
        args.new_tokens = min(args.new_tokens, 16)
        args.repeats = min(args.repeats, 1)
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    rows = time_fast(args)
    rows += time_tagging(args)
    if args.generation:
        rows += time_generation(args)
    table = markdown(rows)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    if args.write_benchmarks:
        command = "python benchmarks/gpu_tag.py " + " ".join(argv if argv is not None else sys.argv[1:])
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        header = (f"Machine: {device}, torch {torch.__version__}. Command: `{command.strip()}`. Random weights, "
                  f"{'tiny shape' if args.tiny else 'Qwen2.5-0.5B shape'}, {args.doc_tokens}-token documents; "
                  f"generation writes {args.new_tokens}-token programs (constrained, teacher-forced top-1).")
        write_section(REPO / "BENCHMARKS.md", f"{SECTION}\n\n{header}\n\n{table}", SECTION)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
