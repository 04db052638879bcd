"""Precision chosen by the hardware's capability (the probes mocked)."""
from __future__ import annotations

import warnings

import pytest

from refinex.model.precision import choose_precision, cpu_bf16_capability


def _choose(requested: str, device: str, cuda: bool = False, cpu: str = "") -> tuple[str, str]:
    choice = choose_precision(requested, device, cuda_bf16=lambda: cuda, cpu_bf16=lambda: cpu)
    return choice.precision, choice.reason


@pytest.mark.parametrize(
    ("capability", "flags", "expected"),
    [
        ("AVX2", frozenset({"avx2", "fma"}), ""),
        ("DEFAULT", frozenset(), ""),
        ("AVX512", frozenset({"avx512f", "avx512bw"}), ""),
        ("AVX512", frozenset({"avx512f", "avx512_bf16"}), "AVX512_BF16"),
        ("AVX512", frozenset({"avx512f", "avx512_bf16", "amx_bf16"}), "AMX"),
        ("AVX512_BF16", frozenset(), "AVX512_BF16"),
        ("AMX_BF16", frozenset(), "AMX"),
        ("AVX2", frozenset({"avx512_bf16"}), ""),  # what torch dispatches to decides
    ],
)
def test_cpu_capability(capability: str, flags: frozenset, expected: str) -> None:
    assert cpu_bf16_capability(capability, flags) == expected


def test_auto_uses_bf16_only_where_it_is_native() -> None:
    assert _choose("auto", "cpu", cpu="AVX512_BF16") == ("bf16", "the CPU has AVX512_BF16")
    assert _choose("auto", "cpu", cpu="AMX")[0] == "bf16"
    assert _choose("auto", "cpu", cpu="") == ("fp32", "no native bf16 on this cpu")
    assert _choose("auto", "cuda", cuda=True)[0] == "bf16"
    assert _choose("auto", "cuda", cuda=False)[0] == "fp32"
    assert _choose("fp32", "cuda", cuda=True)[0] == "fp32"


def test_explicit_bf16_on_a_cpu_without_it_warns_and_is_kept() -> None:
    with pytest.warns(RuntimeWarning, match="emulated"):
        assert _choose("bf16", "cpu", cpu="")[0] == "bf16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _choose("bf16", "cpu", cpu="AMX")[0] == "bf16"
    with pytest.raises(ValueError, match="bf16 support"):
        _choose("bf16", "cuda", cuda=False)
    with pytest.raises(ValueError, match="precision must be"):
        _choose("fp16", "cpu")


def test_training_and_inference_follow_the_capability(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    from refinex.model import precision
    from refinex.model.train import TrainConfig, _resolve_device_and_precision

    config = TrainConfig(device="cpu")  # precision "auto"
    monkeypatch.setattr(precision, "cpu_bf16_capability", lambda *a, **k: "AVX512_BF16")
    assert _resolve_device_and_precision(config)[1:] == ("bf16", "the CPU has AVX512_BF16")
    assert precision.torch_dtype_for("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(precision, "cpu_bf16_capability", lambda *a, **k: "")
    assert _resolve_device_and_precision(config)[1] == "fp32"
    assert precision.torch_dtype_for("auto", "cpu") == torch.float32
    assert precision.torch_dtype_for(None, "cpu") == torch.float32
    with pytest.warns(RuntimeWarning, match="emulated"):
        assert precision.torch_dtype_for("bfloat16", "cpu") == torch.bfloat16
