"""The ``transformers`` backend: batched greedy decoding with ``model.generate``.

Prompts are tokenized once, sorted by length (longest first, so batches hold similar
lengths and the largest batch fails fast on memory), left-padded per batch and decoded with
the KV cache under ``torch.inference_mode``; outputs are put back in input order. Each row
stops on its own at eos or a blank line (a device-side stopping criterion, no host sync),
and ``generate`` ends a batch as soon as every row has stopped. On CUDA the model runs in
bfloat16 by default; ``cache_implementation="static"`` + ``compile=True`` turn on
``generate``'s compiled decoding step (CUDA graphs), best with ``pad_to_multiple_of`` so
that few prompt shapes occur.

Two ways to decode the chunks the model is unsure of (constrained greedy decoding records
each chosen token's probability): ``min_op_prob`` drops the unsure operations;
``votes`` samples the unsure chunks again (the prompts run once, their KV cache repeated per
sample) and keeps a line unless enough samples delete it (:mod:`refinex.model.voting`).
"""
from __future__ import annotations

import inspect
import os
from typing import Any, Optional, Sequence

from refinex.model.backends.base import (
    EMPTY_PROGRAM,
    DecodeConfig,
    GenerationRequest,
    finish_program,
)
from refinex.model.constrained import (
    NewlineStopCriteria,
    ProgramLogitsProcessor,
    TokenTable,
    complete_prefix,
    drop_unsure_ops,
    op_confidences,
    token_table_for,
)
from refinex.model.voting import vote_program

__all__ = ["HFBackend", "eos_token_ids"]

_STAT_KEYS = ("batches", "rows", "generated_tokens", "fallback_rows", "steps", "constraint_seconds", "dropped_ops")


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The eos ids of the model's generation config and of the tokenizer."""
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    value = getattr(gen, "eos_token_id", None) if gen is not None else None
    for source in (value, getattr(tokenizer, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(v) for v in source)
    return sorted(ids)


def _output_width(model: Any) -> int:
    """Number of logits the model produces per position."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is not None:
        return int(weight.shape[0])
    return int(model.config.vocab_size)


def load_checkpoint(
    path: str | os.PathLike[str],
    auto_class: Any,
    device: Optional[str] = None,
    dtype: Optional[Any] = None,
    attn_implementation: Optional[str] = None,
) -> tuple[Any, Any, Any]:
    """(model, tokenizer, torch dtype) of a local checkpoint, offline, through ``auto_class``
    (``AutoModelForCausalLM``, ``AutoModel``): on CUDA when present unless ``device`` says,
    in the dtype :func:`refinex.model.precision.torch_dtype_for` picks for it."""
    import torch
    from transformers import AutoTokenizer

    from refinex.model.precision import torch_dtype_for

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = torch_dtype_for(dtype, str(device))
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "local_files_only": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = auto_class.from_pretrained(str(path), **kwargs).to(device)
    return model, tokenizer, torch_dtype


class HFBackend:
    """Refine-model inference with a ``transformers`` causal LM.

    Options: ``add_special_tokens`` (tokenize prompts as training did; default True),
    ``pad_to_multiple_of`` (round batch lengths up, fewer shapes for compiled decoding),
    ``cache_implementation`` (e.g. ``"static"``), ``compile`` (let ``generate`` compile the
    decoding step; needs a compileable cache such as static), ``top_k_check`` (candidates
    checked per row before the constrained decoder walks the token trie), ``token_table``
    (a prebuilt :class:`TokenTable`; default: built from the tokenizer).
    """

    name = "transformers"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        config: DecodeConfig = DecodeConfig(),
        *,
        add_special_tokens: bool = True,
        pad_to_multiple_of: Optional[int] = None,
        cache_implementation: Optional[str] = None,
        compile: bool = False,
        top_k_check: int = 8,
        token_table: Optional[TokenTable] = None,
    ) -> None:
        import torch

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config
        self.add_special_tokens = add_special_tokens
        self.pad_to_multiple_of = pad_to_multiple_of
        self.cache_implementation = cache_implementation
        self.compile = compile
        self.top_k_check = top_k_check
        self.device = next(model.parameters()).device
        self.eos_ids = eos_token_ids(model, tokenizer)
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = self.eos_ids[0] if self.eos_ids else 0
        self.pad_id = int(pad)
        self.table: TokenTable = token_table or token_table_for(tokenizer, _output_width(model), self.eos_ids)
        if config.constrained and not self.table.eos_ids:
            raise ValueError("constrained decoding needs a tokenizer with an eos token")
        self._generator = torch.Generator(device="cpu").manual_seed(config.seed)
        # generate's keyword for a prefilled KV cache (`past_key_values` in older transformers)
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        #: Decoding counters of the last ``generate`` call (for benchmarks and logs).
        self.last_stats: dict[str, float] = {}

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        config: DecodeConfig = DecodeConfig(),
        *,
        device: Optional[str] = None,
        dtype: Optional[Any] = None,
        attn_implementation: Optional[str] = None,
        **options: Any,
    ) -> "HFBackend":
        """Load a local checkpoint directory (offline). Defaults: CUDA + bfloat16 (float16 on
        GPUs without bf16) when a GPU is present, else CPU + float32; ``dtype="auto"`` is
        bfloat16 wherever it is native (:func:`refinex.model.precision.torch_dtype_for`)."""
        from transformers import AutoModelForCausalLM

        model, tokenizer, _ = load_checkpoint(path, AutoModelForCausalLM, device, dtype, attn_implementation)
        return cls(model, tokenizer, config, **options)

    def close(self) -> None:
        """Drop the model (frees accelerator memory once unreferenced)."""
        self.model = None

    # -- generation --------------------------------------------------------------------

    def _encode(self, prompts: Sequence[str]) -> list[list[int]]:
        encoded = self.tokenizer(
            list(prompts), add_special_tokens=self.add_special_tokens, padding=False
        )["input_ids"]
        return [list(ids) for ids in encoded]

    def _generation_config(self, sample: bool) -> Any:
        from transformers import GenerationConfig

        cfg = self.config
        kwargs: dict[str, Any] = {
            "max_new_tokens": cfg.max_new_tokens,
            "do_sample": sample,
            "num_beams": 1,
            "pad_token_id": self.pad_id,
            "eos_token_id": list(self.eos_ids) or None,
            "use_cache": True,
            "disable_compile": not self.compile,
        }
        if sample:
            kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=0)
        if self.cache_implementation:
            kwargs["cache_implementation"] = self.cache_implementation
        return GenerationConfig(**kwargs)

    def _pad_batch(self, rows: list[list[int]]) -> tuple[Any, Any]:
        import torch

        width = max(len(r) for r in rows)
        multiple = self.pad_to_multiple_of
        if multiple:
            width = -(-width // multiple) * multiple
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, ids in enumerate(rows):
            if ids:
                input_ids[i, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                attention[i, width - len(ids):] = 1
        return input_ids.to(self.device), attention.to(self.device)

    def _logits_processors(
        self, requests: Sequence[GenerationRequest], rows: Sequence[Sequence[int]]
    ) -> list[Any]:
        """Processors applied before the grammar constraint (none; a subclass hook)."""
        return []

    def generate(self, requests: Sequence[GenerationRequest]) -> list[str]:
        """Raw program text per request, in input order."""
        if self.model is None:
            raise RuntimeError("backend is closed")
        if not requests:
            return []
        return self.generate_from_ids(requests, self._encode([r.prompt for r in requests]))

    def generate_with_confidence(
        self, requests: Sequence[GenerationRequest]
    ) -> list[list[tuple[str, float]]]:
        """Per request, the program's operation lines with their confidences (greedy
        constrained decoding; no ``min_op_prob`` filtering): what ``min_op_prob`` acts on,
        for choosing it."""
        if not (self.config.constrained and self.config.greedy):
            raise ValueError("operation confidences need greedy constrained decoding")
        if self.model is None:
            raise RuntimeError("backend is closed")
        if not requests:
            return []
        return self._run(requests, self._encode([r.prompt for r in requests]), scored=True)

    def sample_programs(self, requests: Sequence[GenerationRequest], n: int) -> list[list[str]]:
        """``n`` programs per request sampled from the constrained distribution
        (``temperature``, ``top_p``), the prompt run once per request: what line-vote
        decoding (``votes``) votes on."""
        if not self.config.constrained:
            raise ValueError("sampled programs for votes need constrained decoding")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if self.model is None:
            raise RuntimeError("backend is closed")
        if not requests:
            return []
        samples, self.last_stats = self._sample(requests, [list(ids) for ids in self._encode([r.prompt for r in requests])], n)
        return samples

    def generate_from_ids(
        self, requests: Sequence[GenerationRequest], encoded: Sequence[Sequence[int]]
    ) -> list[str]:
        """Like :meth:`generate` with the prompts already tokenized (``encoded[i]`` is the
        prompt of ``requests[i]``; the requests still give the constraints)."""
        if self.model is None:
            raise RuntimeError("backend is closed")
        if len(encoded) != len(requests):
            raise ValueError(f"{len(encoded)} token lists for {len(requests)} requests")
        if not requests:
            return []
        return self._run(requests, encoded, scored=False)

    def _run(self, requests: Sequence[GenerationRequest], encoded: Sequence[Sequence[int]], scored: bool) -> list[Any]:
        encoded = [list(ids) for ids in encoded]
        if self.config.votes and not scored:
            return self._run_votes(requests, encoded)
        outputs, self.last_stats = self._run_batches(requests, encoded, scored)
        return outputs

    def _run_batches(
        self,
        requests: Sequence[GenerationRequest],
        encoded: Sequence[list[int]],
        scored: bool,
        copies: int = 1,
        sample: Optional[bool] = None,
    ) -> tuple[list[Any], dict[str, float]]:
        """Outputs in input order (``copies`` > 1: a list of that many samples per request)
        and the summed decoding counters. ``sample`` defaults to ``not config.greedy``."""
        sample = not self.config.greedy if sample is None else sample
        order = sorted(range(len(requests)), key=lambda i: (-len(encoded[i]), i))
        outputs: list[Any] = [""] * len(requests)
        stats: dict[str, float] = dict.fromkeys(_STAT_KEYS, 0)
        # With copies, a batch holds ``batch_size`` rows after the prompts are repeated.
        size = max(1, self.config.batch_size // copies)
        for begin in range(0, len(order), size):
            batch = order[begin : begin + size]
            texts, batch_stats = self._generate_batch(
                [requests[i] for i in batch], [encoded[i] for i in batch], scored, copies, sample
            )
            for index, text in zip(batch, texts):
                outputs[index] = text
            for key, value in batch_stats.items():
                stats[key] += value
        return outputs, stats

    def _run_votes(self, requests: Sequence[GenerationRequest], encoded: Sequence[list[int]]) -> list[str]:
        """Greedy programs, with the unsure chunks' programs replaced by line votes over
        ``votes`` samples (see :class:`DecodeConfig`)."""
        cfg = self.config
        scored, stats = self._run_batches(requests, encoded, scored=True)
        outputs = ["".join(line + "\n" for line, _ in lines) for lines in scored]
        unsure = [i for i, lines in enumerate(scored) if min(p for _, p in lines) < cfg.vote_below]
        if unsure:
            samples, sample_stats = self._sample([requests[i] for i in unsure], [encoded[i] for i in unsure], cfg.votes)
            for key, value in sample_stats.items():
                stats[key] += value
            for i, texts in zip(unsure, samples):
                request = requests[i]
                lines = request.lines or ("x",) * (request.last_line - request.first_line + 1)
                outputs[i] = vote_program(texts, request.first_line, lines, cfg.vote_threshold)
        stats["vote_chunks"] = len(unsure)
        stats["vote_samples"] = len(unsure) * cfg.votes
        self.last_stats = stats
        return outputs

    def _sample(
        self, requests: Sequence[GenerationRequest], encoded: Sequence[list[int]], n: int
    ) -> tuple[list[list[str]], dict[str, float]]:
        """``n`` sampled programs per request, and the decoding counters."""
        samples, stats = self._run_batches(requests, encoded, scored=False, copies=n, sample=True)
        return (samples if n > 1 else [[text] for text in samples]), stats

    def _prefill(self, input_ids: Any, attention: Any, copies: int) -> Optional[dict[str, Any]]:
        """The KV cache of all prompt tokens but the last, each row repeated ``copies``
        times, as ``generate``'s cache argument (None where the prompts are one token wide)."""
        if input_ids.shape[1] < 2:
            return None
        positions = (attention.long().cumsum(-1) - 1).masked_fill(attention == 0, 0)
        out = self.model(
            input_ids=input_ids[:, :-1], attention_mask=attention[:, :-1], position_ids=positions[:, :-1], use_cache=True
        )
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        if cache is None:
            return None
        cache.batch_repeat_interleave(copies)
        return {self._cache_arg: cache}

    def _generate_batch(
        self,
        requests: list[GenerationRequest],
        rows: list[list[int]],
        scored: bool = False,
        copies: int = 1,
        sample: bool = False,
    ) -> tuple[list[Any], dict[str, float]]:
        """Decode one batch. ``copies`` > 1 samples that many programs per request: the
        prompts are run once and their KV cache is repeated (or, with a static cache, the
        prompts are repeated), and each request gets the list of its samples."""
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        unique = len(rows)
        share = copies > 1 and self.cache_implementation is None
        if copies > 1 and not share:
            rows = [row for row in rows for _ in range(copies)]
            requests = [request for request in requests for _ in range(copies)]
        real = len(rows)
        if self.compile and real < self.config.batch_size:
            # Keep one batch shape for the compiled step: repeat the last row (discarded).
            rows = rows + [rows[-1]] * (self.config.batch_size - real)
            requests = requests + [requests[-1]] * (self.config.batch_size - real)
        input_ids, attention = self._pad_batch(rows)
        if sample:  # generate samples from the global generator
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=self._generator)))
        cache_kwargs: dict[str, Any] = {}
        with torch.inference_mode():
            if share:
                cache_kwargs = self._prefill(input_ids, attention, copies) or {}
                input_ids = input_ids.repeat_interleave(copies, dim=0)
                attention = attention.repeat_interleave(copies, dim=0)
                requests = [request for request in requests for _ in range(copies)]
                rows = [row for row in rows for _ in range(copies)]
                real = len(requests)
            automata = [r.automaton() for r in requests] if self.config.constrained else []
            processors = LogitsProcessorList(self._logits_processors(requests, rows))
            processor: Optional[ProgramLogitsProcessor] = None
            min_prob = self.config.min_op_prob
            if self.config.constrained:
                processor = ProgramLogitsProcessor(
                    automata,
                    self.table,
                    mode="mask" if sample else "greedy",
                    top_k=self.top_k_check,
                    record=not sample and (scored or min_prob > 0),
                )
                processors.append(processor)
            criteria = StoppingCriteriaList([NewlineStopCriteria(self.table, self.device)])
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                generation_config=self._generation_config(sample),
                logits_processor=processors,
                stopping_criteria=criteria,
                **cache_kwargs,
            )
        new_tokens = out[:real, input_ids.shape[1]:].tolist()
        eos = set(self.eos_ids)
        if 0 <= self.pad_id < self.table.vocab_size and self.table.token_bytes[self.pad_id] is None:
            eos.add(self.pad_id)  # finished rows are filled with the pad token
        texts: list[Any] = []
        generated = dropped = 0
        logprobs = processor.token_logprobs() if processor is not None and processor.record else None
        for i, ids in enumerate(new_tokens):
            end = next((j for j, t in enumerate(ids) if t in eos), len(ids))
            ids = ids[:end]
            generated += len(ids)
            if not self.config.constrained:
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                texts.append(finish_program(text, self.config.stop, False))
                continue
            data = complete_prefix(automata[i], self.table.decode_bytes(ids))
            if logprobs is not None:
                pieces = [self.table.token_bytes[t] or b"" for t in ids]
                lines = op_confidences(pieces, logprobs[i][: len(ids)], data)
                if scored:
                    texts.append(_scored_lines(lines))
                    continue
                data, n = drop_unsure_ops(lines, min_prob)
                dropped += n
            texts.append(finish_program(data.decode("utf-8", "replace"), self.config.stop, True))
        if copies > 1:
            texts = [texts[k * copies : (k + 1) * copies] for k in range(unique)]
        stats = {
            "batches": 1,
            "rows": real,
            "generated_tokens": generated,
            "fallback_rows": processor.fallbacks if processor is not None else 0,
            "steps": int(out.shape[1] - input_ids.shape[1]),
            "constraint_seconds": processor.seconds if processor is not None else 0.0,
            "dropped_ops": dropped,
        }
        return texts, stats


def _scored_lines(lines: Sequence[tuple[bytes, float]]) -> list[tuple[str, float]]:
    """The operation lines up to the program's end (a blank line) with their confidences;
    an empty program is ``keep_all()``, which the model did not write (confidence 1)."""
    out: list[tuple[str, float]] = []
    for line, prob in lines:
        text = line.decode("utf-8", "replace").rstrip("\n")
        if not text.strip():
            break
        out.append((text, prob))
    return out or [(EMPTY_PROGRAM.strip(), 1.0)]
