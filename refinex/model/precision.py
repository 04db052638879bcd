"""Which floating-point precision to train and run a model in, from what the hardware does fast.

bf16 autocast is fast on CUDA GPUs with bf16 support and on CPUs with AVX512-BF16 or AMX;
elsewhere a CPU emulates bf16 matmuls, tens of times slower than fp32 (BENCHMARKS.md).
``auto`` therefore picks bf16 only where it is native; an explicit ``bf16`` is honoured but
warns on a CPU without it. The chooser is pure: the capability probes are passed in, so
tests can mock them.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = [
    "PRECISIONS",
    "PrecisionChoice",
    "choose_precision",
    "cpu_bf16_capability",
    "cpu_has_native_bf16",
    "resolve_precision",
    "torch_dtype_for",
]

PRECISIONS = ("auto", "bf16", "fp32")
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision chosen and why (for summaries, logs and MLflow params)."""

    precision: str  # "bf16" or "fp32"
    requested: str  # "auto", "bf16" or "fp32"
    device: str  # "cpu", "cuda", ...
    reason: str

    def describe(self) -> str:
        return f"{self.precision} on {self.device} ({self.reason})"


def cpu_bf16_capability(capability: Optional[str] = None, cpu_flags: Optional[frozenset[str]] = None) -> str:
    """What the CPU offers for bf16: ``"AMX"``, ``"AVX512_BF16"`` or ``""`` (emulated).

    ``capability`` is ``torch.backends.cpu.get_cpu_capability()`` (``"AVX512"``, ``"AVX2"``,
    ``"DEFAULT"``; some builds report ``"AVX512_BF16"`` or ``"AMX_BF16"``). That string does
    not say whether an AVX512 CPU has the BF16 extension, so the kernel's CPU flags decide then.
    """
    if capability is None:
        import torch

        capability = str(torch.backends.cpu.get_cpu_capability())
    text = capability.upper()
    if "AMX" in text:
        return "AMX"
    if "BF16" in text:
        return "AVX512_BF16"
    if "AVX512" not in text:
        return ""
    flags = _cpu_flags() if cpu_flags is None else cpu_flags
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX512_BF16"
    return ""


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    """The CPU flags of ``/proc/cpuinfo`` (empty where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (AVX512-BF16 or AMX)."""
    return bool(cpu_bf16_capability())


def choose_precision(
    requested: str,
    device_type: str,
    *,
    cuda_bf16: Callable[[], bool],
    cpu_bf16: Callable[[], str],
) -> PrecisionChoice:
    """The precision for ``requested`` (``auto``/``bf16``/``fp32``) on ``device_type``.

    ``cuda_bf16()`` says whether the GPU supports bf16, ``cpu_bf16()`` names the CPU's native
    bf16 support (``""``: none). An explicit ``bf16`` on a CPU without it warns
    (``RuntimeWarning``); on a GPU without it, it is an error.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {requested!r}")
    if requested == "fp32":
        return PrecisionChoice("fp32", requested, device_type, "asked for")
    if device_type == "cuda":
        if cuda_bf16():
            return PrecisionChoice("bf16", requested, device_type, "the GPU supports bf16")
        if requested == "bf16":
            raise ValueError("precision 'bf16' needs a CUDA device with bf16 support")
        return PrecisionChoice("fp32", requested, device_type, "the GPU has no bf16")
    native = cpu_bf16() if device_type == "cpu" else ""
    if native:
        return PrecisionChoice("bf16", requested, device_type, f"the CPU has {native}")
    if requested == "bf16":
        warnings.warn(
            f"precision bf16 on a {device_type} without native bf16 (no AVX512-BF16/AMX): bf16 matmuls are "
            "emulated there, tens of times slower than fp32; use precision auto or fp32",
            RuntimeWarning,
            stacklevel=3,
        )
        return PrecisionChoice("bf16", requested, device_type, "asked for, emulated on this CPU")
    return PrecisionChoice("fp32", requested, device_type, f"no native bf16 on this {device_type}")


def resolve_precision(requested: str, device: Any) -> PrecisionChoice:
    """:func:`choose_precision` with this machine's probes (``device``: a torch device or name)."""
    import torch

    device_type = getattr(device, "type", None) or str(device).split(":")[0]
    return choose_precision(
        requested,
        device_type,
        cuda_bf16=lambda: bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()),
        cpu_bf16=cpu_bf16_capability,
    )


def torch_dtype_for(dtype: Any, device: str) -> Any:
    """The torch dtype of an inference ``dtype`` option on ``device``.

    ``None`` keeps the backends' defaults (bf16 on CUDA, fp32 on CPU); ``"auto"`` is bf16
    wherever it is native (:func:`resolve_precision`), else fp32 (fp16 on a GPU without
    bf16); a dtype or its name is taken as given, warning for bf16 on a CPU without it.
    """
    import torch

    device_type = str(device).split(":")[0]
    if dtype is None:
        if device_type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, str):
        if dtype == "auto":
            choice = resolve_precision("auto", device_type)
            if choice.precision == "bf16":
                return torch.bfloat16
            return torch.float16 if device_type == "cuda" else torch.float32
        dtype = getattr(torch, dtype)
    if dtype == torch.bfloat16 and device_type == "cpu":
        resolve_precision("bf16", "cpu")  # warns where bf16 is emulated
    return dtype
