"""The tagging head as a refine backend: one forward pass per chunk, programs by construction.

It serves the same interface as the generative backends (:class:`~refinex.model.backends.RefineBackend`):
requests in, program text out, so the refine stage, ``apply`` and the guardrails treat both
heads alike. The prompt is not used: the chunk's raw lines are encoded as in training
(:class:`~refinex.model.tagging.model.LineEncoder`), every window of a call goes through
the base in length-sorted batches (``DecodeConfig.batch_size`` windows, ``max_tokens``
padded tokens), and each line's deletion probability is compared with the threshold
recorded at training (``threshold`` overrides it). On a GPU the base runs in bf16 by default;
a prefill-only model needs no KV cache and no decoding loop.
"""
from __future__ import annotations

import os
import time
from typing import Any, Optional, Sequence

from refinex.model.backends.base import DecodeConfig, GenerationRequest
from refinex.model.tagging.labels import decide_lines, program_for_lines

__all__ = ["TagBackend", "is_tag_checkpoint"]


def is_tag_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a tagging-head model (its ``refinex_model.json`` says so)."""
    from refinex.model.train import read_model_info

    return read_model_info(path).get("head") == "tag"


class TagBackend:
    """Refine-model inference with a tagging head."""

    name = "transformers"

    def __init__(
        self,
        base: Any,
        head: Any,
        tokenizer: Any,
        architecture: Any,
        threshold: float,
        config: DecodeConfig = DecodeConfig(),
        *,
        max_tokens: int = 16384,
        dtype: Any = None,
    ) -> None:
        from refinex.model.tagging.model import LineEncoder

        if not 0.0 < float(threshold) <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.base = base.eval()
        self.head = head.eval()
        self.tokenizer = tokenizer
        self.encoder = LineEncoder(tokenizer, architecture)
        self.threshold = float(threshold)
        self.config = config
        self.max_tokens = int(max_tokens)
        #: The refine stage passes each chunk's page-structure features when the head reads them.
        self.reads_structure = bool(architecture.structure_features)
        self.device = next(base.parameters()).device
        self.dtype = dtype
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad or 0)
        #: Counters of the last ``generate`` call (for benchmarks and logs).
        self.last_stats: dict[str, float] = {}

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        config: DecodeConfig = DecodeConfig(),
        *,
        device: Optional[str] = None,
        dtype: Any = None,
        threshold: Optional[float] = None,
        max_tokens: int = 16384,
        attn_implementation: Optional[str] = None,
    ) -> "TagBackend":
        """Load a tagging checkpoint (offline). Defaults: CUDA + bf16 when present, else CPU +
        fp32 (``dtype="auto"``: bf16 where the CPU has it natively)."""
        from transformers import AutoModel

        from refinex.model.backends.hf import load_checkpoint
        from refinex.model.tagging.model import HEAD_FILE, TagArchitecture, load_head
        from refinex.model.train import read_model_info

        info = read_model_info(path)
        if info.get("head") != "tag":
            raise ValueError(f"{path} is not a tagging-head model (refinex_model.json has no head 'tag')")
        tag = info["tag"]
        base, tokenizer, torch_dtype = load_checkpoint(path, AutoModel, device, dtype, attn_implementation)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        device = str(next(base.parameters()).device)
        architecture = TagArchitecture.from_dict(tag["architecture"])
        head = load_head(os.path.join(str(path), HEAD_FILE), architecture, int(tag["layout_features"]), device)
        chosen = float(tag["threshold"]) if threshold is None else float(threshold)
        return cls(base, head, tokenizer, architecture, chosen, config, max_tokens=max_tokens, dtype=torch_dtype)

    def close(self) -> None:
        """Drop the model (frees accelerator memory once unreferenced)."""
        self.base = None
        self.head = None

    def probabilities(self, requests: Sequence[GenerationRequest]) -> list[list[float]]:
        """The deletion probability of every line of every request, in input order."""
        import torch

        from refinex.model.tagging.model import chunk_vectors

        if self.base is None:
            raise RuntimeError("the backend is closed")
        for request in requests:
            if not request.lines:
                raise ValueError("the tagging head needs the chunk's raw lines (GenerationRequest.lines)")
        started = time.perf_counter()
        encoded = [self.encoder.encode(request.lines, request.structure if self.reads_structure else None)
                   for request in requests]
        out: list[list[float]] = []
        tokens = sum(chunk.n_tokens for chunk in encoded)
        group = max(1, self.config.batch_size)
        with torch.inference_mode():
            order = sorted(range(len(encoded)), key=lambda i: -encoded[i].n_tokens)
            by_index: dict[int, list[float]] = {}
            for start in range(0, len(order), group):
                indices = order[start : start + group]
                chunks = [encoded[i] for i in indices]
                vectors = chunk_vectors(self.base, chunks, self.pad_id, self.device, group, self.max_tokens)
                layouts = [torch.from_numpy(c.layout).to(self.device) for c in chunks]
                for i, logits in zip(indices, self.head(vectors, layouts)):
                    by_index[i] = torch.sigmoid(logits.float()).cpu().tolist()
            out = [by_index[i] for i in range(len(encoded))]
        self.last_stats = {"rows": float(len(requests)), "tokens": float(tokens),
                           "seconds": time.perf_counter() - started}
        return out

    def generate(self, requests: Sequence[GenerationRequest]) -> list[str]:
        """Program text per request: the runs of lines at or above the threshold."""
        from refinex.program import render_program

        texts = []
        for request, probabilities in zip(requests, self.probabilities(requests)):
            removed = decide_lines(probabilities, request.lines, self.threshold)
            texts.append(render_program(program_for_lines(removed, request.first_line)))
        return texts
