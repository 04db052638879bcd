#!/usr/bin/env python
"""Refine-model generation throughput of the transformers backend.

Times :class:`refinex.model.backends.hf.HFBackend` on a Qwen2.5-0.5B-shaped model with
random weights (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864, vocab
151936) for ``--prompt-tokens`` prompts (default 1024) and ``--new-tokens`` generated
tokens (default 64) at several batch sizes, and prints a markdown table of docs/s and
generated tokens/s. Prompts are token ids (no tokenizer is needed); a synthetic byte-level
vocabulary of the model's size backs the constrained decoder.

Decoding modes (``--modes``):

* ``off``: unconstrained greedy decoding (random weights: every row runs to the limit).
* ``teacher``: constrained decoding while a "teacher" logits bias makes each row's top-1
  token follow a valid ~``--new-tokens``-token program, as a trained model's would: this
  measures the constraint's real per-step cost (top-k check, no trie walk).
* ``random``: constrained decoding of the random model: nearly every step of every row
  needs the token-trie walk (worst case; programs end early, see the token column).

Speed options: ``--dtype`` (bf16 default on GPU), ``--attn`` (sdpa / flash_attention_2 /
eager), ``--cache static`` and ``--compile`` (``generate`` compiles the decoding step into
CUDA graphs; each new batch shape compiles once in the untimed warm-up), ``--pad-multiple``.

``--validity N`` instead measures the invalid-program rate (parse errors or ops that
``execute`` rejects) with and without constrained decoding on N held-out synthetic chunks,
for the tiny base briefly fine-tuned on synthetic documents (``--train-steps``) on the CPU.

GPU:  python benchmarks/gpu_generate.py --cache static --compile
CPU smoke test:  python benchmarks/gpu_generate.py --tiny
Validity:  python benchmarks/gpu_generate.py --validity 64
``--write-benchmarks`` replaces this script's section of BENCHMARKS.md with the results.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

for _path in (Path(__file__).resolve().parents[1], Path(__file__).resolve().parent):  # refinex, report
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402

from refinex.model.backends.base import DecodeConfig, GenerationRequest  # noqa: E402
from refinex.model.backends.hf import HFBackend  # noqa: E402
from refinex.model.constrained import TokenTable  # noqa: E402
from report import write_section  # noqa: E402

QWEN25_05B = {
    "hidden_size": 896,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "intermediate_size": 4864,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rope_theta": 1_000_000.0,
    "tie_word_embeddings": True,
}
TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 4096,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
}
# Program pieces of the synthetic vocabulary (split roughly as Qwen's tokenizer splits them).
PROGRAM_PIECES = [
    "remove", "_lines", "_str", "(", ")", ", ", ",", " ", "\n", ")\n", '"', ' "', '")', '")\n',
    "keep", "_all", "()", "()\n", "\\", '\\"', "\\n", "\\t", "\\u",
]
N_SPECIAL = 293  # like Qwen2.5: the ids after the text vocabulary are special / unused


def synthetic_vocab(size: int, seed: int = 0) -> tuple[list[Optional[bytes]], int]:
    """A byte-level vocabulary of ``size`` ids: single bytes, program pieces, digits, random
    words (half with a leading space); then eos and unused special ids. Returns (bytes, eos)."""
    rng = random.Random(seed)
    n_text = max(300, size - N_SPECIAL) if size > 2 * N_SPECIAL else size - 2
    pieces: list[bytes] = [bytes((b,)) for b in range(256)]
    seen = set(pieces)
    for piece in PROGRAM_PIECES:
        data = piece.encode()
        if data not in seen:
            seen.add(data)
            pieces.append(data)
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    weights = [12, 9, 8, 8, 7, 7, 6, 6, 6, 4, 4, 3, 3, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1]
    while len(pieces) < n_text:
        word = "".join(rng.choices(letters, weights, k=rng.randint(2, 9)))
        if rng.random() < 0.15:
            word = word.capitalize()
        if rng.random() < 0.5:
            word = " " + word
        data = word.encode()
        if data not in seen:
            seen.add(data)
            pieces.append(data)
    table: list[Optional[bytes]] = list(pieces[:n_text])
    eos = len(table)
    table += [None] * (size - len(table))
    return table, eos


def longest_match_ids(text: str, lookup: dict[bytes, int], longest: int) -> list[int]:
    """Greedy longest-match tokenization of ``text`` with a synthetic vocabulary."""
    data = text.encode()
    ids: list[int] = []
    pos = 0
    while pos < len(data):
        for width in range(min(longest, len(data) - pos), 0, -1):
            token = lookup.get(data[pos : pos + width])
            if token is not None:
                ids.append(token)
                pos += width
                break
        else:
            raise ValueError(f"byte {data[pos]} is not in the vocabulary")
    return ids


class IdTokenizer:
    """The few tokenizer members the backend uses when prompts are given as ids."""

    def __init__(self, table: TokenTable, eos: int) -> None:
        self.table = table
        self.eos_token_id = eos
        self.pad_token_id = eos

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.table.decode(ids)


class TeacherBias:
    """Logits processor adding a large bonus to each row's next target token (then eos)."""

    def __init__(self, targets: Sequence[Sequence[int]], eos: int) -> None:
        self.targets = [list(t) for t in targets]
        self.eos = eos
        self.step = 0
        self._index: Any = None
        self._bonus: Any = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if self._index is None:
            width = max(len(t) for t in self.targets) + 1
            index = torch.full((len(self.targets), width), self.eos, dtype=torch.long)
            for row, target in enumerate(self.targets):
                index[row, : len(target)] = torch.tensor(target, dtype=torch.long)
            self._index = index.to(scores.device)
        column = min(self.step, self._index.shape[1] - 1)
        self.step += 1
        bonus = torch.zeros_like(scores)
        bonus.scatter_(1, self._index[:, column : column + 1], 1e4)
        return scores + bonus


class BenchBackend(HFBackend):
    """HFBackend with the optional teacher bias before the grammar constraint."""

    targets: dict[GenerationRequest, list[int]] = {}
    teacher = False

    def _logits_processors(self, requests: Sequence[GenerationRequest], rows: Sequence[Sequence[int]]) -> list[Any]:
        if not self.teacher:
            return []
        return [TeacherBias([self.targets[r] for r in requests], self.table.eos_ids[0])]


def make_workload(
    batch: int, prompt_tokens: int, new_tokens: int, table: list[Optional[bytes]], seed: int
) -> tuple[list[GenerationRequest], list[list[int]], dict[GenerationRequest, list[int]]]:
    """Requests (40-line chunks), prompt ids and teacher targets (valid programs)."""
    rng = random.Random(seed)
    lookup = {data: i for i, data in enumerate(table) if data is not None}
    longest = max(len(d) for d in lookup)
    word_ids = [i for i, data in enumerate(table) if data is not None and len(data) > 2]
    requests, prompts, targets = [], [], {}
    for row in range(batch):
        first = rng.randint(0, 5000)
        lines = tuple(
            "".join(table[rng.choice(word_ids)].decode() for _ in range(rng.randint(3, 12))).strip() or "x"
            for _ in range(40)
        )
        request = GenerationRequest(f"chunk {row}", first, first + 39, lines)
        ops: list[str] = []
        target: list[int] = []
        line = first
        while len(target) < new_tokens - 8 and line <= first + 38:
            if rng.random() < 0.5:
                op = f"remove_lines({line}, {line + 1})\n"
                line += 3
            else:
                word = lines[line - first].split(" ")[0]
                op = f'remove_str({line}, "{word}")\n'
                line += 2
            ops.append(op)
            target = longest_match_ids("".join(ops), lookup, longest)
        assert request.automaton().matches("".join(ops)), ops
        requests.append(request)
        targets[request] = target
        prompts.append([rng.choice(word_ids) for _ in range(prompt_tokens)])
    return requests, prompts, targets


def build_model(shape: dict[str, Any], dtype: Any, attn: Optional[str], device: str, eos: int) -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**shape, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    if attn:
        config._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    model = model.to(dtype).eval()
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = eos
    return model


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    shape = dict(TINY if args.tiny else QWEN25_05B)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    vocab, eos = synthetic_vocab(shape["vocab_size"], args.seed)
    table = TokenTable(vocab, [eos])
    tokenizer = IdTokenizer(table, eos)
    model = build_model(shape, dtype, args.attn, device, eos)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"# device={torch.cuda.get_device_name() if device.startswith('cuda') else platform.processor() or 'cpu'}"
        f" torch={torch.__version__} params={n_params / 1e6:.0f}M dtype={dtype} attn={model.config._attn_implementation}"
        f" cache={args.cache} compile={args.compile} prompt={args.prompt_tokens} new={args.new_tokens}",
        flush=True,
    )
    results: list[dict[str, Any]] = []
    for batch in args.batch_sizes:
        requests, prompts, targets = make_workload(batch, args.prompt_tokens, args.new_tokens, vocab, args.seed + batch)
        prefill_s: Optional[float] = None
        for mode in args.modes:
            config = DecodeConfig(
                max_new_tokens=args.new_tokens, batch_size=batch, constrained=mode != "off", greedy=True
            )
            backend = BenchBackend(
                model,
                tokenizer,
                config,
                cache_implementation=None if args.cache == "dynamic" else args.cache,
                compile=args.compile,
                pad_to_multiple_of=args.pad_multiple,
                top_k_check=args.top_k_check,
                token_table=table,
            )
            backend.teacher = mode == "teacher"
            backend.targets = targets
            row: dict[str, Any] = {"batch": batch, "mode": mode}
            try:
                if device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                backend.generate_from_ids(requests, prompts)  # warm-up (and compilation)
                if prefill_s is None and args.prefill:
                    prefill = BenchBackend(
                        model, tokenizer, DecodeConfig(max_new_tokens=1, batch_size=batch, constrained=False),
                        pad_to_multiple_of=args.pad_multiple, token_table=table,
                    )
                    _sync(device)
                    started = time.perf_counter()
                    prefill.generate_from_ids(requests, prompts)
                    _sync(device)
                    prefill_s = time.perf_counter() - started
                seconds, tokens, constraint_s, fallbacks = 0.0, 0, 0.0, 0
                for _ in range(args.repeats):
                    _sync(device)
                    started = time.perf_counter()
                    backend.generate_from_ids(requests, prompts)
                    _sync(device)
                    seconds += time.perf_counter() - started
                    stats = backend.last_stats
                    tokens += int(stats["generated_tokens"])
                    constraint_s += float(stats["constraint_seconds"])
                    fallbacks += int(stats["fallback_rows"])
                docs = batch * args.repeats
                row.update(
                    docs_per_s=docs / seconds,
                    tokens_per_s=tokens / seconds,
                    new_tokens_per_doc=tokens / docs,
                    batch_s=seconds / args.repeats,
                    prefill_s=prefill_s,
                    constraint_s=constraint_s / args.repeats,
                    fallback_rows=fallbacks / args.repeats,
                    peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None,
                )
            except torch.cuda.OutOfMemoryError:
                row["error"] = "OOM"
                torch.cuda.empty_cache()
            results.append(row)
            print(json.dumps(row), flush=True)
    return results


def markdown(results: list[dict[str, Any]]) -> str:
    """The results as a markdown table."""
    def fmt(value: Any, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [
        "| batch | mode | docs/s | gen tok/s | new tok/doc | s/batch | prefill s | constraint s/batch | fallback rows/batch | peak GiB |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['batch']} | {r['mode']} | {r['error']} | | | | | | | |")
            continue
        lines.append(
            f"| {r['batch']} | {r['mode']} | {fmt(r['docs_per_s'])} | {fmt(r['tokens_per_s'], 0)} |"
            f" {fmt(r['new_tokens_per_doc'])} | {fmt(r['batch_s'], 2)} | {fmt(r['prefill_s'], 2)} |"
            f" {fmt(r['constraint_s'], 2)} | {fmt(r['fallback_rows'], 0)} | {fmt(r['peak_gib'])} |"
        )
    return "\n".join(lines)


# -- invalid-program rate -------------------------------------------------------------

BOILER = [
    "Share on Facebook", "Share on Twitter", "Home | News | Sport | Contact", "Subscribe to our newsletter",
    "We use cookies to improve your experience.", "Accept all cookies", "All rights reserved.",
    "Privacy Policy | Terms of Use", "Advertisement", "Related articles", "Leave a comment",
]
TAILS = [" Read more »", " (Advertisement)", " Click here to subscribe."]
CONTENT = [
    "The council approved the new budget on Tuesday after a long debate.",
    "Researchers found that regular exercise improves memory and sleep quality.",
    "The museum opened an exhibition of early photographs of the harbour.",
    "Farmers reported higher yields from drought resistant wheat this year.",
    "A faster method to recycle batteries was described in the journal.",
    "In mathematics, a prime number is a natural number greater than 1.",
    "The river level rose by two metres after the storm on Sunday night.",
    "Students at the school built a small weather station on the roof.",
]


def synthetic_chunk(rng: random.Random) -> tuple[int, list[str], str]:
    """(first line id, raw lines, gold program text) of one synthetic chunk."""
    lines: list[str] = []
    ops: list[str] = []
    first = rng.choice([0, 0, rng.randint(1, 400)])

    def boiler(count: int) -> None:
        if count:
            start = first + len(lines)
            lines.extend(rng.sample(BOILER, count))
            ops.append(f"remove_lines({start}, {first + len(lines) - 1})")

    boiler(rng.randint(0, 3))
    for _ in range(rng.randint(2, 6)):
        line = rng.choice(CONTENT)
        if rng.random() < 0.25:
            tail = rng.choice(TAILS)
            ops.append(f'remove_str({first + len(lines)}, "{tail}")')
            line += tail
        lines.append(line)
        if rng.random() < 0.2:
            boiler(1)
    boiler(rng.randint(0, 2))
    return first, lines, ("\n".join(ops) if ops else "keep_all()") + "\n"


def validity(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Fine-tune the tiny base briefly, then compare invalid-program rates."""
    import tempfile

    from refinex.model.train import TrainConfig, train
    from refinex.program import execute, parse

    rng = random.Random(args.seed)
    pairs = []
    for i in range(args.train_docs):
        first, lines, target = synthetic_chunk(rng)
        request = GenerationRequest.for_lines(lines, first)
        pairs.append({
            "doc_id": f"doc{i}", "chunk_idx": 0, "start_line": first, "end_line": request.last_line,
            "prompt": request.prompt, "target": target, "n_prompt_tokens": 0, "split": "train",
        })
    held_out = [synthetic_chunk(rng) for _ in range(args.validity)]
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(
            max_steps=args.train_steps, lr=args.train_lr, batch_size=8, warmup_steps=10, device="cpu",
            progress=False, plot=False, max_seq_len=512, seed=args.seed,
        )
        started = time.perf_counter()
        train(pairs, "tiny", Path(tmp) / "model", config)
        print(f"# trained the tiny base for {args.train_steps} steps in {time.perf_counter() - started:.0f} s", flush=True)
        requests = [GenerationRequest.for_lines(lines, first) for first, lines, _ in held_out]
        raws = ["\n".join(["(earlier line)"] * first + lines) for first, lines, _ in held_out]
        for constrained in (False, True):
            backend = HFBackend.from_pretrained(
                Path(tmp) / "model",
                DecodeConfig(max_new_tokens=96, batch_size=16, constrained=constrained),
                device="cpu",
            )
            started = time.perf_counter()
            outputs = backend.generate(requests)
            seconds = time.perf_counter() - started
            parse_errors = rejected = invalid = exact = 0
            for text, raw, (_, _, gold) in zip(outputs, raws, held_out):
                program = parse(text)
                n_rejected = len(execute(program, raw).ops_rejected)
                parse_errors += bool(program.errors)
                rejected += bool(n_rejected)
                invalid += bool(program.errors or n_rejected)
                exact += program == parse(gold)
            n = len(held_out)
            row = {
                "constrained": constrained, "chunks": n, "invalid_rate": invalid / n,
                "parse_error_rate": parse_errors / n, "rejected_op_rate": rejected / n,
                "exact_match": exact / n, "seconds": seconds,
            }
            results.append(row)
            print(json.dumps(row), flush=True)
    return results


def validity_markdown(results: list[dict[str, Any]]) -> str:
    """The validity results as a markdown table."""
    lines = [
        "| decoding | chunks | invalid programs | with parse errors | with rejected ops | exact match | CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {'constrained' if r['constrained'] else 'unconstrained'} | {r['chunks']} | {r['invalid_rate']:.1%} |"
            f" {r['parse_error_rate']:.1%} | {r['rejected_op_rate']:.1%} | {r['exact_match']:.1%} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


SECTION = "## Refine-model generation throughput"
VALIDITY_SECTION = "## Refine-model constrained decoding: invalid-program rate"
REPO = Path(__file__).resolve().parents[1]



def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model shape and workload (CPU smoke test)")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda when present)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--attn", default="sdpa", help="attn implementation: sdpa, flash_attention_2, eager")
    parser.add_argument("--cache", default="dynamic", choices=["dynamic", "static"])
    parser.add_argument("--compile", action="store_true", help="compile the decoding step (needs --cache static)")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated (default 32,64,128,256,512)")
    parser.add_argument("--prompt-tokens", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--modes", default="off,teacher", help="comma-separated: off, teacher, random")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per configuration")
    parser.add_argument("--pad-multiple", type=int, default=None, help="round prompt lengths up to a multiple")
    parser.add_argument("--top-k-check", type=int, default=8)
    parser.add_argument("--no-prefill", dest="prefill", action="store_false", help="skip the prefill-only timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--validity", type=int, default=0, help="measure invalid-program rates on N chunks")
    parser.add_argument("--train-steps", type=int, default=300, help="fine-tuning steps of the tiny base (--validity)")
    parser.add_argument("--train-docs", type=int, default=2000, help="synthetic training chunks (--validity)")
    parser.add_argument("--train-lr", type=float, default=2e-3, help="learning rate (--validity)")
    parser.add_argument(
        "--write-benchmarks", action="store_true", help="update this script's section of BENCHMARKS.md"
    )
    args = parser.parse_args(argv)
    tiny = args.tiny
    args.batch_sizes = [int(b) for b in (args.batch_sizes or ("2,4" if tiny else "32,64,128,256,512")).split(",")]
    args.prompt_tokens = args.prompt_tokens or (48 if tiny else 1024)
    args.new_tokens = args.new_tokens or (16 if tiny else 64)
    args.repeats = args.repeats or (1 if tiny else 2)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(args.modes) - {"off", "teacher", "random"}
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}")
    if args.compile and args.cache != "static":
        parser.error("--compile needs --cache static")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/gpu_generate.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.validity:
        results = validity(args)
        table = validity_markdown(results)
        heading = VALIDITY_SECTION
        header = (
            f"Command: `{command.strip()}`; CPU, torch {torch.__version__}. The tiny base "
            f"fine-tuned for {args.train_steps} steps on {args.train_docs} synthetic chunks, greedy decoding of "
            f"{args.validity} held-out chunks (max 96 new tokens)."
        )
    else:
        results = run(args)
        table = markdown(results)
        heading = SECTION
        shape = "tiny Llama-like shape (smoke test only)" if args.tiny else "Qwen2.5-0.5B shape (494M parameters)"
        header = (
            f"Machine: {_machine(args)}. Command: `{command.strip()}`.\n"
            f"Transformers backend (`HFBackend`), random weights, {shape}, {args.prompt_tokens}-token prompts, "
            f"up to {args.new_tokens} new tokens, greedy. Modes: `off` unconstrained (random weights: every row "
            "runs to the limit); `teacher` constrained while a logits bias makes each row's top-1 token follow a "
            "valid program, as a trained model's would (the constraint's real per-step cost); `random` constrained "
            "decoding of the random model (worst case: a token-trie walk for nearly every row and step; programs "
            "end early). docs/s = batch / wall time of a whole `generate` call after one warm-up call; prefill s = "
            "the same batch with one new token."
        )
    print()
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    if args.write_benchmarks:
        write_section(REPO / "BENCHMARKS.md", f"{heading}\n\n{header}\n\n{table}", heading)
    return 0


def _machine(args: argparse.Namespace) -> str:
    if torch.cuda.is_available() and (args.device or "cuda").startswith("cuda"):
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}"


if __name__ == "__main__":
    raise SystemExit(main())
