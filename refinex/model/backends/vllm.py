"""The vLLM offline backend (``vllm.LLM``), imported lazily.

All requests of a call go to the engine at once (continuous batching does the rest) with
greedy ``SamplingParams`` stopping at a blank line. With ``constrained`` each request
carries its chunk's :func:`~refinex.model.constrained.program_regex` as structured output
(``StructuredOutputsParams`` in vLLM >= 0.10, ``GuidedDecodingParams`` before). Prefix
caching is on by default: every prompt starts with the same instruction.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Optional, Sequence

from refinex.model.backends.base import (
    BackendUnavailable,
    DecodeConfig,
    GenerationRequest,
    finish_program,
)

__all__ = ["VLLMBackend", "import_vllm", "structured_output_kwargs"]


def import_vllm() -> ModuleType:
    """The ``vllm`` module, or :class:`BackendUnavailable` when it is not installed."""
    try:
        return importlib.import_module("vllm")
    except ImportError as exc:
        raise BackendUnavailable(
            "the vllm backend needs the 'vllm' package (GPU nodes only); "
            "use the 'transformers' or 'openai' backend instead"
        ) from exc


def structured_output_kwargs(vllm: ModuleType, regex: str) -> dict[str, Any]:
    """``SamplingParams`` keyword arguments restricting the output to ``regex``."""
    try:
        params = importlib.import_module(f"{vllm.__name__}.sampling_params")
    except ImportError:
        params = vllm
    structured = getattr(params, "StructuredOutputsParams", None)
    if structured is not None:
        return {"structured_outputs": structured(regex=regex)}
    guided = getattr(params, "GuidedDecodingParams", None)
    if guided is not None:
        return {"guided_decoding": guided(regex=regex)}
    raise BackendUnavailable("this vLLM has no structured outputs: use constrained=False")


class VLLMBackend:
    """Refine-model inference with vLLM's offline engine.

    ``model`` is a local checkpoint directory. ``llm_kwargs`` go to ``vllm.LLM`` unchanged
    (after the named options), ``llm`` injects a ready engine.
    """

    name = "vllm"

    def __init__(
        self,
        model: str,
        config: DecodeConfig = DecodeConfig(),
        *,
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        max_model_len: Optional[int] = None,
        enable_prefix_caching: bool = True,
        llm_kwargs: Optional[dict[str, Any]] = None,
        llm: Any = None,
    ) -> None:
        self._vllm = import_vllm()
        self.config = config
        self.model_path = str(model)
        if llm is None:
            kwargs: dict[str, Any] = {
                "model": self.model_path,
                "dtype": dtype,
                "tensor_parallel_size": tensor_parallel_size,
                "gpu_memory_utilization": gpu_memory_utilization,
                "enable_prefix_caching": enable_prefix_caching,
                "seed": config.seed,
            }
            if max_model_len is not None:
                kwargs["max_model_len"] = max_model_len
            kwargs.update(llm_kwargs or {})
            llm = self._vllm.LLM(**kwargs)
        self._llm = llm

    def sampling_params(self, request: GenerationRequest) -> Any:
        """The ``SamplingParams`` of one request."""
        cfg = self.config
        kwargs: dict[str, Any] = {
            "n": 1,
            "max_tokens": cfg.max_new_tokens,
            "stop": list(cfg.stop),
            "temperature": 0.0 if cfg.greedy else cfg.temperature,
        }
        if not cfg.greedy:
            kwargs.update(top_p=cfg.top_p, seed=cfg.seed)
        if cfg.constrained:
            kwargs.update(structured_output_kwargs(self._vllm, request.regex()))
        return self._vllm.SamplingParams(**kwargs)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[str]:
        """Raw program text per request, in input order."""
        if self._llm is None:
            raise RuntimeError("backend is closed")
        if not requests:
            return []
        params = [self.sampling_params(r) for r in requests]
        outputs = self._llm.generate([r.prompt for r in requests], params, use_tqdm=False)
        if len(outputs) != len(requests):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(requests)} prompts")
        return [
            finish_program(out.outputs[0].text if out.outputs else "", self.config.stop, self.config.constrained)
            for out in outputs
        ]

    def close(self) -> None:
        """Drop the engine (vLLM frees the GPU when it is garbage-collected)."""
        self._llm = None
