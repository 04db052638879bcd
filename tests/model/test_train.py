"""Fine-tuning: target-only loss, truncation, batching, determinism and a loss that drops."""
from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import pytest
import torch

from refinex.model import train as train_module
from refinex.model.bases import load_checkpoint
from refinex.model.prompts import PROMPT_VERSION, build_prompt, build_target
from refinex.model.precision import cpu_has_native_bf16
from refinex.model.sft import SftPair, split_pairs
from refinex.model.train import (
    IGNORE_INDEX,
    LOSS_CURVE_FILE,
    MODEL_INFO_FILE,
    TrainConfig,
    _batches,
    collate_batch,
    _moving_average,
    _resolve_device_and_precision,
    encode_pair,
    evenly_spaced,
    evaluate_loss,
    read_model_info,
    target_loss_sum,
    train,
)

PROMPT = build_prompt("[000] Home\n[001] The river is long.\n[002] Share this article")
TARGET = build_target("remove_lines(0, 0)\nremove_lines(2, 2)")


def test_encode_pair_supervises_target_plus_eos_only(tiny_model_dir: Path) -> None:
    _, tok = load_checkpoint(tiny_model_dir)
    example = encode_pair(tok, PROMPT, TARGET, 4096)
    assert example is not None and not example.truncated
    prompt_ids = tok(PROMPT)["input_ids"]
    target_ids = tok(TARGET, add_special_tokens=False)["input_ids"]
    assert list(example.input_ids) == prompt_ids + target_ids + [tok.eos_token_id]
    assert example.n_prompt == len(prompt_ids)
    ids, mask, labels = collate_batch([example, encode_pair(tok, "x", "keep_all()\n", 64)], tok.pad_token_id, "cpu")
    row = labels[0].tolist()
    assert row[: example.n_prompt] == [IGNORE_INDEX] * example.n_prompt
    assert row[example.n_prompt :] == list(example.input_ids[example.n_prompt :])
    short = labels[1].tolist()
    assert short.count(IGNORE_INDEX) == ids.shape[1] - (len(tok("keep_all()\n", add_special_tokens=False)["input_ids"]) + 1)
    assert mask[1].sum().item() < ids.shape[1] and ids[1, -1].item() == tok.pad_token_id


def test_truncation_never_cuts_the_target(tiny_model_dir: Path) -> None:
    _, tok = load_checkpoint(tiny_model_dir)
    n_target = len(tok(TARGET, add_special_tokens=False)["input_ids"]) + 1
    limit = n_target + 10
    assert encode_pair(tok, PROMPT, TARGET, limit, "skip") is None
    left = encode_pair(tok, PROMPT, TARGET, limit, "left")
    assert left is not None and left.truncated and len(left.input_ids) == limit
    assert left.n_prompt == 10 and left.n_target == n_target
    assert list(left.input_ids[: left.n_prompt]) == tok(PROMPT)["input_ids"][-10:]
    assert encode_pair(tok, PROMPT, TARGET, n_target - 1, "left") is None


@pytest.mark.parametrize("plain_head", [True, False])
def test_target_loss_matches_transformers_loss(
    tiny_model_dir: Path, plain_head: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not plain_head:
        monkeypatch.setattr(train_module, "_PLAIN_HEAD_MODEL_TYPES", frozenset())
    model, tok = load_checkpoint(tiny_model_dir)
    examples = [encode_pair(tok, PROMPT, TARGET, 4096), encode_pair(tok, "[000] a b", "keep_all()\n", 4096)]
    ids, mask, labels = collate_batch(examples, tok.pad_token_id, "cpu")
    with torch.no_grad():
        loss_sum, n_tokens = target_loss_sum(model, ids, mask, labels)
        reference = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert n_tokens == sum(e.n_target for e in examples)
    assert torch.allclose(loss_sum / n_tokens, reference, atol=1e-5)


def test_length_grouped_batches() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(10, 1000) for _ in range(1000)]
    batches = _batches(lengths, 8, random.Random(1), group=True)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert max(lengths[i] for i in batches[0]) == max(lengths)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    plain = _batches(lengths, 8, random.Random(1), group=False)
    plain_spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in plain) / len(plain)
    assert spread < plain_spread / 10
    assert batches == _batches(lengths, 8, random.Random(1), group=True)


def test_training_lowers_the_loss_and_writes_a_checkpoint(tiny_trained, tiny_model_dir: Path, tiny_sft_pairs: list) -> None:
    result = tiny_trained
    train_pairs, validation_pairs = split_pairs(tiny_sft_pairs)
    assert result.steps == 30 and len(result.train_losses) == 30 and len(result.learning_rates) == 30
    assert result.n_train_pairs == len(train_pairs) and result.n_validation_pairs == len(validation_pairs) > 0
    assert [s for s, _ in result.eval_losses] == [0, 10, 20, 30]
    assert result.validation_loss == result.eval_losses[-1][1] < result.eval_losses[0][1]
    assert sum(result.train_losses[-5:]) < sum(result.train_losses[:5])

    # The loss on a small fixed set of training pairs is lower with the trained weights.
    fixed = train_pairs[:12]
    losses = []
    for checkpoint in (tiny_model_dir, result.out_dir):
        model, tok = load_checkpoint(checkpoint)
        examples = [encode_pair(tok, p.prompt, p.target, 1024) for p in fixed]
        losses.append(evaluate_loss(model, examples, 4, tok.pad_token_id, torch.device("cpu"), "fp32"))
    assert losses[1] < 0.6 * losses[0]

    out = result.out_dir
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert (out / LOSS_CURVE_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and result.plot_path == out / LOSS_CURVE_FILE
    info = read_model_info(out)
    assert info == json.loads((out / MODEL_INFO_FILE).read_text())
    assert info["prompt_version"] == PROMPT_VERSION
    assert info["train_data_version"] == "sft_pairs@3"
    assert info["base"] == str(tiny_model_dir) and info["base_info"]["base"] == "tiny"
    assert info["metrics"]["validation_loss"] == pytest.approx(result.validation_loss)
    assert info["config"]["max_steps"] == 30
    assert result.device == "cpu" and result.precision == "fp32"
    assert "30 steps" in result.summary()


def test_training_is_deterministic(tiny_model_dir: Path, tiny_sft_pairs: list, tmp_path: Path) -> None:
    config = TrainConfig(max_steps=3, lr=1e-3, batch_size=4, max_seq_len=1024, progress=False, plot=False,
                         precision="fp32")
    first = train(tiny_sft_pairs, str(tiny_model_dir), tmp_path / "a", config)
    second = train(tiny_sft_pairs, str(tiny_model_dir), tmp_path / "b", config)
    assert first.train_losses == second.train_losses
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert first.plot_path is None and not (tmp_path / "a" / LOSS_CURVE_FILE).exists()


def test_gradient_accumulation_is_a_token_mean_over_the_step(tiny_model_dir: Path, tiny_sft_pairs: list, tmp_path: Path) -> None:
    common = dict(max_steps=2, lr=1e-3, max_seq_len=1024, progress=False, plot=False, length_grouping=False, warmup_steps=0,
                  precision="fp32")
    whole = train(tiny_sft_pairs, str(tiny_model_dir), tmp_path / "a", TrainConfig(batch_size=8, grad_accum=1, **common))
    split = train(tiny_sft_pairs, str(tiny_model_dir), tmp_path / "b", TrainConfig(batch_size=4, grad_accum=2, **common))
    assert split.train_losses == pytest.approx(whole.train_losses, rel=1e-4)


def test_too_long_pairs_are_skipped_or_prompt_truncated(tiny_model_dir: Path, tiny_sft_pairs: list, tmp_path: Path) -> None:
    train_pairs, _ = split_pairs(tiny_sft_pairs)
    long_prompt = build_prompt("\n".join(f"[{i:03d}] some words on this line" for i in range(300)))
    extra = SftPair("long-doc", 0, 0, 299, long_prompt, "remove_lines(0, 3)\n", 0)
    pairs = train_pairs[:6] + [extra]
    config = dict(max_steps=1, batch_size=4, max_seq_len=256, progress=False, plot=False)
    skipped = train(pairs, str(tiny_model_dir), tmp_path / "a", TrainConfig(**config))
    assert (skipped.n_skipped, skipped.n_truncated, skipped.n_train_pairs) == (1, 0, 6)
    truncated = train(pairs, str(tiny_model_dir), tmp_path / "b", TrainConfig(truncation="left", **config))
    assert (truncated.n_skipped, truncated.n_truncated, truncated.n_train_pairs) == (0, 1, 7)
    with pytest.raises(ValueError, match="no training example"):
        train([extra], str(tiny_model_dir), tmp_path / "c", TrainConfig(**config))


def test_rows_and_revalidation_split(tiny_model_dir: Path, tiny_sft_pairs: list, tmp_path: Path) -> None:
    rows = [p.to_row() for p in tiny_sft_pairs[:10]]
    result = train(rows, str(tiny_model_dir), tmp_path / "m", TrainConfig(
        max_steps=1, batch_size=4, progress=False, plot=False, validation_fraction=0.0))
    assert result.n_validation_pairs == 0 and result.validation_loss is None
    assert result.n_train_pairs == 10


def test_config_validation() -> None:
    assert TrainConfig.from_dict({"lr": 1e-4, "epochs": 2}).epochs == 2
    assert TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()
    tiny = TrainConfig.for_base("tiny", {"max_steps": 7})
    assert (tiny.lr, tiny.max_steps, tiny.batch_size) == (1e-3, 7, 8)
    assert TrainConfig.for_base("/some/checkpoint") == TrainConfig()
    with pytest.raises(ValueError, match="unknown"):
        TrainConfig.from_dict({"learning_rate": 1e-4})
    for bad in ({"epochs": 0}, {"lr": 0.0}, {"lr_schedule": "step"}, {"precision": "fp16"},
                {"truncation": "right"}, {"batch_size": 0}, {"warmup_ratio": 1.0}):
        with pytest.raises(ValueError):
            TrainConfig(**bad)
    with pytest.raises(ValueError):
        TrainConfig(eval_max_pairs=0)
    with warnings.catch_warnings():  # bf16 is emulated (and warns) on CPUs without AVX512-BF16/AMX
        warnings.simplefilter("ignore", RuntimeWarning)
        assert _resolve_device_and_precision(TrainConfig(precision="bf16", device="cpu"))[1] == "bf16"
    native = "bf16" if cpu_has_native_bf16() else "fp32"
    assert _resolve_device_and_precision(TrainConfig(device="cpu"))[1] == native


def test_evenly_spaced_subset() -> None:
    assert evenly_spaced(list(range(10)), 3) == [0, 3, 6]
    assert evenly_spaced([1, 2], 5) == [1, 2] and evenly_spaced([1, 2], None) == [1, 2]


def test_bf16_autocast_training_on_cpu(tiny_model_dir: Path, tiny_sft_pairs: list, tmp_path: Path) -> None:
    """bf16 on the CPU: the loss still falls, master weights stay fp32, the subset bounds eval."""
    config = TrainConfig(max_steps=12, lr=1e-3, batch_size=4, max_seq_len=1024, precision="bf16", eval_max_pairs=3,
                         progress=False, plot=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # bf16 emulated on CPUs without it
        result = train(tiny_sft_pairs, str(tiny_model_dir), tmp_path / "m", config)
    assert result.precision == "bf16" and result.device == "cpu"
    assert result.n_validation_pairs == 3
    assert result.validation_loss < result.eval_losses[0][1]
    model, _ = load_checkpoint(result.out_dir)
    assert next(model.parameters()).dtype == torch.float32


def test_moving_average_of_the_loss_curve() -> None:
    assert _moving_average([4.0, 2.0, 6.0, 0.0], 2) == [4.0, 3.0, 4.0, 3.0]
    assert _moving_average([1.0, 2.0], 1) == [1.0, 2.0]
    assert _moving_average([], 3) == []
