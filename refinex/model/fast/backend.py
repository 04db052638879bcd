"""The fast tier as a refine backend: the same ``generate(requests)`` as every backend.

(CPU by default; on a GPU task the network runs on the task's GPU, see ``from_pretrained``.)

Each request is one chunk's raw lines (the fast tier's chunks are whole documents up to its
counter's budget, see :func:`refinex.model.fast.base.counter_budget`) with, when the page
HTML was known, their page-structure features (``GenerationRequest.structure``). Lines are
hashed, the network runs over the chunks of a call in batches of ``DecodeConfig.batch_size``,
and each line's deletion probability is compared with the threshold recorded at training
(``threshold`` overrides it). Programs are the runs of deleted lines: valid by construction.
"""
from __future__ import annotations

import os
import time
from typing import Any, Optional, Sequence

from refinex.model.backends.base import DecodeConfig, GenerationRequest
from refinex.model.tagging.labels import decide_lines, program_for_lines

__all__ = ["FastBackend", "is_fast_checkpoint"]


def is_fast_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a fast-tier model (its ``refinex_model.json`` says so)."""
    from refinex.model.fast import ENCODER
    from refinex.model.train import read_model_info

    info = read_model_info(path)
    return info.get("head") == "tag" and info.get("encoder") == ENCODER


class FastBackend:
    """Refine-model inference with the fast tier (CPU; no transformer)."""

    name = "transformers"  # the kind it is loaded by: no separate engine
    reads_structure = True  # the refine stage passes each chunk's page-structure features

    def __init__(self, network: Any, threshold: float, structure: bool, config: DecodeConfig = DecodeConfig()) -> None:
        if not 0.0 < float(threshold) <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.network = network.eval()
        self.threshold = float(threshold)
        self.structure = bool(structure)
        self.config = config
        #: Counters of the last ``generate`` call (for benchmarks and logs).
        self.last_stats: dict[str, float] = {}

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        config: DecodeConfig = DecodeConfig(),
        *,
        threshold: Optional[float] = None,
        device: Optional[str] = None,
        dtype: Any = None,
        **_ignored: Any,
    ) -> "FastBackend":
        """Load a fast-tier checkpoint, in fp32 (``dtype`` is accepted and ignored: a network
        this small gains nothing from bf16), on the CPU unless ``device`` names another (a
        Spark task given a GPU passes its own); the hashing always runs on the CPU."""
        from refinex.model.fast.network import WEIGHTS_FILE, FastArchitecture, load_network
        from refinex.model.train import read_model_info

        info = read_model_info(path)
        if not is_fast_checkpoint(path):
            raise ValueError(f"{path} is not a fast-tier model (refinex_model.json has no encoder 'hashed')")
        fast = info["fast"]
        network = load_network(os.path.join(str(path), WEIGHTS_FILE), FastArchitecture.from_dict(fast["architecture"]),
                               device or "cpu")
        chosen = float(fast["threshold"]) if threshold is None else float(threshold)
        return cls(network, chosen, bool(fast.get("structure", True)), config)

    def close(self) -> None:
        self.network = None

    def probabilities(self, requests: Sequence[GenerationRequest]) -> list[list[float]]:
        """The deletion probability of every line of every request, in input order."""
        import torch

        from refinex.model.fast.features import line_features

        if self.network is None:
            raise RuntimeError("the backend is closed")
        for request in requests:
            if not request.lines:
                raise ValueError("the fast tier needs the chunk's raw lines (GenerationRequest.lines)")
        started = time.perf_counter()
        n_features = self.network.architecture.n_features
        features = [line_features(r.lines, n_features, r.structure if self.structure else None) for r in requests]
        featured = time.perf_counter()
        out: list[list[float]] = [[] for _ in requests]
        group = max(1, self.config.batch_size)
        order = sorted(range(len(features)), key=lambda i: -features[i].n_lines)
        with torch.inference_mode():
            for start in range(0, len(order), group):
                indices = order[start : start + group]
                for i, logits in zip(indices, self.network([features[i] for i in indices])):
                    out[i] = torch.sigmoid(logits.float()).tolist()
        self.last_stats = {"rows": float(len(requests)), "lines": float(sum(f.n_lines for f in features)),
                           "feature_seconds": featured - started, "seconds": time.perf_counter() - started}
        return out

    def generate(self, requests: Sequence[GenerationRequest]) -> list[str]:
        """Program text per request: the runs of lines at or above the threshold."""
        from refinex.program import render_program

        texts = []
        for request, probabilities in zip(requests, self.probabilities(requests)):
            removed = decide_lines(probabilities, request.lines, self.threshold)
            texts.append(render_program(program_for_lines(removed, request.first_line)))
        return texts
