"""Inference backends of the refine model: transformers, vLLM and OpenAI-compatible servers.

Engines are imported lazily: importing this package needs neither torch nor vLLM.
"""
from __future__ import annotations

from refinex.model.backends.base import (
    BACKEND_KINDS,
    DEFAULT_STOP,
    BackendError,
    BackendUnavailable,
    DecodeConfig,
    GenerationRequest,
    RefineBackend,
    cut_at_stop,
    finish_program,
    load_backend,
)

__all__ = [
    "BACKEND_KINDS",
    "DEFAULT_STOP",
    "BackendError",
    "BackendUnavailable",
    "DecodeConfig",
    "GenerationRequest",
    "RefineBackend",
    "cut_at_stop",
    "finish_program",
    "load_backend",
]
