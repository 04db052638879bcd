"""Supervised fine-tuning of the refine model on SFT pairs (chunk prompt -> program).

The loss is on the program tokens only: the prompt is tokenised as at inference time
(``tokenizer(prompt)``, special tokens included), the target without special tokens and
followed by eos, and prompt positions get the label ``-100``. An example longer than
``max_seq_len`` never loses target tokens: it is skipped (default) or its prompt is
left-truncated (``truncation="left"``), and both are counted. Micro-batches are grouped by
length; AdamW with warmup and cosine/linear decay, gradient accumulation (the loss is a
token mean over the whole accumulated batch), seeded. ``precision="auto"`` trains with bf16 autocast
where bf16 is native (a CUDA GPU with bf16, a CPU with AVX512-BF16/AMX:
:mod:`refinex.model.precision`), otherwise in fp32; the choice is in the summary and the params.

``train`` writes a safetensors checkpoint + tokenizer to ``out_dir`` with
``refinex_model.json`` (base, prompt version, train data version, metrics, config) and
``loss_curve.png``, and returns a :class:`TrainResult`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, TypeVar, Union

from refinex.model.bases import prepare_base, read_base_info, train_defaults
from refinex.model.prompts import PROMPT_VERSION
from refinex.model.sft import SftPair, split_pairs
from refinex.settings import settings_from_mapping

__all__ = [
    "MODEL_INFO_FILE",
    "LOSS_CURVE_FILE",
    "TrainConfig",
    "TrainResult",
    "EncodedExample",
    "encode_pair",
    "plot_loss_curve",
    "read_model_info",
    "train",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

MODEL_INFO_FILE = "refinex_model.json"
LOSS_CURVE_FILE = "loss_curve.png"
MODEL_INFO_FORMAT = "refinex-model-v1"
IGNORE_INDEX = -100
SCHEDULES = ("cosine", "linear", "constant_with_warmup")
PRECISIONS = ("auto", "bf16", "fp32")
TRUNCATIONS = ("skip", "left")
# Causal LMs whose logits are exactly ``lm_head(decoder(x))``: for them the loss is computed
# from the hidden states of target positions only (no full-vocabulary logits for the prompt).
_PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})

PairLike = Union[SftPair, Mapping[str, Any]]


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters and run settings of :func:`train`."""

    epochs: int = 1
    max_steps: Optional[int] = None  # optimizer steps; overrides ``epochs`` when set
    lr: float = 2e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    batch_size: int = 8  # micro-batch size
    grad_accum: int = 1
    max_seq_len: int = 2048
    truncation: str = "skip"  # "skip" or "left" (left-truncate the prompt)
    warmup_ratio: float = 0.03
    warmup_steps: Optional[int] = None  # overrides ``warmup_ratio`` when set
    lr_schedule: str = "cosine"
    max_grad_norm: float = 1.0
    eval_every: int = 0  # optimizer steps between validation evals; 0 = only at start and end
    eval_batch_size: Optional[int] = None
    eval_max_pairs: Optional[int] = None  # validation loss on an evenly spaced subset of this size
    length_grouping: bool = True
    seed: int = 0
    device: Optional[str] = None  # default: "cuda" when available, else "cpu"
    precision: str = "auto"  # "auto" (bf16 where native: refinex.model.precision), "bf16", "fp32"
    gradient_checkpointing: bool = False
    validation_fraction: Optional[float] = None  # re-split by doc id; None = the pairs' split
    train_data_version: Optional[str] = None
    progress: bool = True
    plot: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        for name in ("batch_size", "grad_accum", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.eval_max_pairs is not None and self.eval_max_pairs < 1:
            raise ValueError(f"eval_max_pairs must be >= 1, got {self.eval_max_pairs}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.truncation not in TRUNCATIONS:
            raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {self.truncation!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        """Build from a mapping (e.g. a YAML section); unknown keys are an error."""
        return settings_from_mapping(cls, values, "training")

    @classmethod
    def for_base(
        cls, base: Union[str, os.PathLike[str]], overrides: Optional[Mapping[str, Any]] = None
    ) -> "TrainConfig":
        """The base profile's ``train`` defaults (``conf/model/<base>.yaml``), then ``overrides``."""
        return cls.from_dict({**train_defaults(base), **dict(overrides or {})})

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict."""
        return asdict(self)


@dataclass
class TrainResult:
    """What a training run produced and measured."""

    out_dir: Path
    base: str
    base_path: Path
    steps: int
    epochs_completed: float
    train_losses: list[float]  # token-mean loss of each optimizer step
    learning_rates: list[float]  # learning rate used at each optimizer step
    eval_losses: list[tuple[int, float]]  # (optimizer steps done, validation loss)
    validation_loss: Optional[float]
    n_train_pairs: int
    n_validation_pairs: int
    n_skipped: int  # pairs dropped because even the target did not fit, or skip truncation
    n_truncated: int  # pairs whose prompt was left-truncated
    train_target_tokens: int  # supervised tokens seen over the run
    seconds: float
    device: str
    precision: str
    config: TrainConfig
    plot_path: Optional[Path] = None
    train_data_version: Optional[str] = None
    precision_reason: str = ""  # why ``precision`` was chosen (refinex.model.precision)

    @property
    def final_train_loss(self) -> Optional[float]:
        """Mean training loss of the last (up to) 10 steps."""
        tail = self.train_losses[-10:]
        return sum(tail) / len(tail) if tail else None

    def metrics(self) -> dict[str, float]:
        """Scalar metrics (for ``refinex_model.json`` and MLflow)."""
        out: dict[str, float] = {
            "steps": float(self.steps),
            "epochs_completed": float(self.epochs_completed),
            "train_seconds": float(self.seconds),
            "n_train_pairs": float(self.n_train_pairs),
            "n_validation_pairs": float(self.n_validation_pairs),
            "n_skipped": float(self.n_skipped),
            "n_truncated": float(self.n_truncated),
            "train_target_tokens": float(self.train_target_tokens),
        }
        if self.final_train_loss is not None:
            out["final_train_loss"] = float(self.final_train_loss)
        if self.validation_loss is not None:
            out["validation_loss"] = float(self.validation_loss)
        return out

    def summary(self) -> str:
        """One human-readable line."""
        val = "n/a" if self.validation_loss is None else f"{self.validation_loss:.4f}"
        train_loss = "n/a" if self.final_train_loss is None else f"{self.final_train_loss:.4f}"
        return (
            f"refinex train: {self.steps} steps, {self.epochs_completed:.2f} epochs, "
            f"{self.n_train_pairs} train / {self.n_validation_pairs} validation pairs "
            f"({self.n_skipped} skipped, {self.n_truncated} truncated), train loss {train_loss}, "
            f"validation loss {val}, {self.seconds:.1f}s on {self.device} "
            f"({self.precision}{': ' + self.precision_reason if self.precision_reason else ''}) "
            f"-> {self.out_dir}"
        )


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of prompt + target (+ eos) and how many leading ids are prompt."""

    input_ids: tuple[int, ...]
    n_prompt: int
    truncated: bool = False

    @property
    def n_target(self) -> int:
        return len(self.input_ids) - self.n_prompt


def encode_pair(
    tokenizer: Any, prompt: str, target: str, max_seq_len: int, truncation: str = "skip"
) -> Optional[EncodedExample]:
    """Tokenise one pair for training; ``None`` when it cannot fit without cutting the target.

    The prompt is encoded as inference encodes it (``tokenizer(prompt)``); the target is
    encoded without special tokens and followed by eos.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token")
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    target_ids = list(tokenizer(target, add_special_tokens=False)["input_ids"])
    target_ids.append(int(tokenizer.eos_token_id))
    if len(prompt_ids) + len(target_ids) <= max_seq_len:
        return EncodedExample(tuple(prompt_ids + target_ids), len(prompt_ids))
    room = max_seq_len - len(target_ids)
    if truncation != "left" or room < 1:
        return None
    head: list[int] = []
    bos = tokenizer.bos_token_id
    if bos is not None and prompt_ids and prompt_ids[0] == bos and room > 1:
        head, prompt_ids = [bos], prompt_ids[1:]
    kept = head + prompt_ids[len(prompt_ids) - (room - len(head)) :]
    return EncodedExample(tuple(kept + target_ids), len(kept), truncated=True)


def _encode_all(
    tokenizer: Any, pairs: Sequence[SftPair], config: TrainConfig
) -> tuple[list[EncodedExample], int, int]:
    encoded: list[EncodedExample] = []
    skipped = truncated = 0
    for pair in pairs:
        example = encode_pair(tokenizer, pair.prompt, pair.target, config.max_seq_len, config.truncation)
        if example is None:
            skipped += 1
            continue
        truncated += int(example.truncated)
        encoded.append(example)
    return encoded, skipped, truncated


def evenly_spaced(items: Sequence[T], limit: Optional[int]) -> list[T]:
    """At most ``limit`` of ``items``, evenly spaced and in order (all of them for ``None``)."""
    items = list(items)
    if limit is None or len(items) <= limit:
        return items
    return [items[(i * len(items)) // limit] for i in range(limit)]


def _batches(lengths: Sequence[int], batch_size: int, rng: random.Random, group: bool) -> list[list[int]]:
    """Shuffled micro-batches of indices; with ``group``, similar lengths share a batch.

    Length grouping sorts within shuffled mega-batches of 50 micro-batches (so the order is
    still random) and puts the batch with the longest example first (memory errors show at
    once).
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not group:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    mega = batch_size * 50
    batches: list[list[int]] = []
    for start in range(0, len(order), mega):
        block = sorted(order[start : start + mega], key=lambda i: -lengths[i])
        batches.extend(block[i : i + batch_size] for i in range(0, len(block), batch_size))
    rng.shuffle(batches)
    longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
    batches.insert(0, batches.pop(longest))
    return batches


def collate_batch(examples: Sequence[EncodedExample], pad_id: int, device: Any) -> tuple[Any, Any, Any]:
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        mask[row, :n] = 1
        labels[row, example.n_prompt : n] = ids[row, example.n_prompt : n]
    return ids.to(device), mask.to(device), labels.to(device)


def target_loss_sum(model: Any, input_ids: Any, attention_mask: Any, labels: Any) -> tuple[Any, int]:
    """``(sum of token losses on labelled positions, number of such tokens)`` for one batch."""
    import torch.nn.functional as F

    shift_labels = labels[:, 1:]
    keep = shift_labels != IGNORE_INDEX
    n_tokens = int(keep.sum().item())
    if getattr(model.config, "model_type", None) in _PLAIN_HEAD_MODEL_TYPES:
        hidden = model.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        logits = model.get_output_embeddings()(hidden[:, :-1][keep])
    else:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        logits = out.logits[:, :-1][keep]
    loss = F.cross_entropy(logits.float(), shift_labels[keep], reduction="sum")
    return loss, n_tokens


def _resolve_device_and_precision(config: TrainConfig) -> tuple[Any, str, str]:
    import torch

    from refinex.model.precision import resolve_precision

    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    choice = resolve_precision(config.precision, device)
    return device, choice.precision, choice.reason


def evaluate_loss(
    model: Any, examples: Sequence[EncodedExample], batch_size: int, pad_id: int, device: Any, precision: str
) -> Optional[float]:
    """Token-mean target loss over ``examples`` (``None`` when there are none)."""
    import torch

    if not examples:
        return None
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    total, tokens = 0.0, 0
    with torch.no_grad(), autocast_context(device, precision):
        for start in range(0, len(order), batch_size):
            batch = [examples[i] for i in order[start : start + batch_size]]
            loss_sum, n = target_loss_sum(model, *collate_batch(batch, pad_id, device))
            total += float(loss_sum.item())
            tokens += n
    model.train(was_training)
    return total / max(tokens, 1)


def autocast_context(device: Any, precision: str) -> Any:
    import contextlib

    import torch

    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _optimizer(model: Any, config: TrainConfig) -> Any:
    import torch

    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps
    )


def train(
    pairs: Iterable[PairLike],
    base: Union[str, os.PathLike[str]],
    out_dir: Union[str, os.PathLike[str]],
    config: TrainConfig = TrainConfig(),
) -> TrainResult:
    """Fine-tune ``base`` (profile name or checkpoint path) on ``pairs`` into ``out_dir``.

    Pairs whose ``split`` is ``"validation"`` (or, with ``config.validation_fraction``, whose
    doc id hashes there) are only used for the validation loss.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from refinex.model.bases import load_checkpoint

    started = time.perf_counter()
    train_pairs, validation_pairs = split_pairs(pairs, config.validation_fraction)
    base_path = prepare_base(base)
    device, precision, precision_reason = _resolve_device_and_precision(config)
    torch.manual_seed(config.seed)
    model, tokenizer = load_checkpoint(base_path)
    model.to(device)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    pad_id = int(tokenizer.pad_token_id)

    train_examples, skipped, truncated = _encode_all(tokenizer, train_pairs, config)
    validation_pairs = evenly_spaced(validation_pairs, config.eval_max_pairs)
    val_examples, val_skipped, val_truncated = _encode_all(tokenizer, validation_pairs, config)
    if not train_examples:
        raise ValueError(
            f"no training example fits max_seq_len={config.max_seq_len} "
            f"({len(train_pairs)} train pairs, {skipped} skipped)"
        )
    if skipped or val_skipped:
        logger.warning(
            "skipped %d train and %d validation pairs longer than max_seq_len=%d",
            skipped, val_skipped, config.max_seq_len,
        )
    lengths = [len(e.input_ids) for e in train_examples]
    micro_per_epoch = math.ceil(len(train_examples) / config.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / config.grad_accum)
    total_steps = config.max_steps or steps_per_epoch * config.epochs
    warmup = config.warmup_steps if config.warmup_steps is not None else round(config.warmup_ratio * total_steps)
    optimizer = _optimizer(model, config)
    scheduler = get_scheduler(
        config.lr_schedule, optimizer, num_warmup_steps=min(warmup, total_steps), num_training_steps=total_steps
    )
    eval_batch = config.eval_batch_size or config.batch_size

    train_losses: list[float] = []
    learning_rates: list[float] = []
    eval_losses: list[tuple[int, float]] = []
    target_tokens = 0
    micro_done = 0

    def run_eval(step: int) -> Optional[float]:
        loss = evaluate_loss(model, val_examples, eval_batch, pad_id, device, precision)
        if loss is not None:
            eval_losses.append((step, loss))
        return loss

    run_eval(0)
    model.train()
    bar = tqdm(total=total_steps, desc="refinex train", unit="step", disable=not config.progress, file=sys.stderr)
    step = 0
    epoch = 0
    while step < total_steps:
        batches = _batches(lengths, config.batch_size, random.Random(config.seed * 1_000_003 + epoch), config.length_grouping)
        for group_start in range(0, len(batches), config.grad_accum):
            if step >= total_steps:
                break
            group = [[train_examples[i] for i in b] for b in batches[group_start : group_start + config.grad_accum]]
            group_tokens = sum(e.n_target for batch in group for e in batch)
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for batch in group:
                with autocast_context(device, precision):
                    loss_sum, _ = target_loss_sum(model, *collate_batch(batch, pad_id, device))
                loss = loss_sum / group_tokens
                loss.backward()
                step_loss += float(loss.item())
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            learning_rates.append(float(scheduler.get_last_lr()[0]))
            optimizer.step()
            scheduler.step()
            step += 1
            micro_done += len(group)
            target_tokens += group_tokens
            train_losses.append(step_loss)
            postfix = {"loss": f"{step_loss:.4f}", "lr": f"{learning_rates[-1]:.2e}"}
            if config.eval_every and step % config.eval_every == 0 and step < total_steps:
                val = run_eval(step)
                model.train()
                if val is not None:
                    postfix["val"] = f"{val:.4f}"
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
        epoch += 1
    bar.close()
    validation_loss = run_eval(step)
    model.eval()

    out = Path(out_dir)
    result = TrainResult(
        out_dir=out,
        base=str(base),
        base_path=Path(base_path),
        steps=step,
        epochs_completed=micro_done / micro_per_epoch,
        train_losses=train_losses,
        learning_rates=learning_rates,
        eval_losses=eval_losses,
        validation_loss=validation_loss,
        n_train_pairs=len(train_examples),
        n_validation_pairs=len(val_examples),
        n_skipped=skipped + val_skipped,
        n_truncated=truncated + val_truncated,
        train_target_tokens=target_tokens,
        seconds=0.0,
        device=str(device),
        precision=precision,
        precision_reason=precision_reason,
        config=config,
        train_data_version=config.train_data_version,
    )
    result.seconds = time.perf_counter() - started
    _save(model, tokenizer, out, result)
    if config.plot:
        result.plot_path = plot_loss_curve(result, out / LOSS_CURVE_FILE)
    result.seconds = time.perf_counter() - started
    _write_model_info(out, result)
    summary = result.summary()
    logger.info(summary)
    if config.progress:
        print(summary, file=sys.stderr, flush=True)
    return result


def _save(model: Any, tokenizer: Any, out: Path, result: TrainResult) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.config.use_cache = True
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    gen = model.generation_config
    gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


def _write_model_info(out: Path, result: TrainResult) -> None:
    import torch
    import transformers

    from refinex import __version__

    info = {
        "format": MODEL_INFO_FORMAT,
        "base": result.base,
        "base_path": str(result.base_path),
        "base_info": read_base_info(result.base_path),
        "prompt_version": PROMPT_VERSION,
        "train_data_version": result.train_data_version,
        "metrics": result.metrics(),
        "eval_losses": [[s, v] for s, v in result.eval_losses],
        "config": result.config.to_dict(),
        "device": result.device,
        "precision": result.precision,
        "precision_reason": result.precision_reason,
        "versions": {
            "refinex": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (out / MODEL_INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_model_info(path: Union[str, os.PathLike[str]]) -> dict[str, Any]:
    """The ``refinex_model.json`` of a trained checkpoint, or ``{}`` when there is none."""
    info = Path(path) / MODEL_INFO_FILE
    return json.loads(info.read_text(encoding="utf-8")) if info.is_file() else {}


def weights_hash(checkpoint: Union[str, os.PathLike[str]]) -> Any:
    """A sha256 (hashlib object, to extend or finish) over a checkpoint's weight files
    (``*.safetensors``, ``*.bin``; name, size and content, in name order): what identifies
    its weights in a model version and in caches of features computed from them."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(Path(checkpoint).iterdir()):
        if path.is_file() and path.suffix in (".safetensors", ".bin"):
            digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
            with path.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    digest.update(block)
    return digest


def plot_loss_curve(result: TrainResult, path: Union[str, os.PathLike[str]]) -> Path:
    """Plot training loss per step and validation loss to a PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    losses = list(result.train_losses)
    steps = list(range(1, len(losses) + 1))
    if steps:
        ax.plot(steps, losses, label="train loss", linewidth=0.8, alpha=0.35)
        window = max(1, len(losses) // 50)
        if window > 1:  # the trend, which per-step noise hides
            ax.plot(steps, _moving_average(losses, window), label=f"train loss, mean of {window} steps",
                    linewidth=1.5)
    every = list(losses)
    if result.eval_losses:
        xs, ys = zip(*result.eval_losses)
        ax.plot(xs, ys, marker="o", linestyle="--", label="validation loss", linewidth=1.0)
        every += ys
    # a fresh model starts one or two orders of magnitude above where it ends
    if every and min(every) > 0 and max(every) / min(every) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (program tokens)")
    base_name = read_base_info(result.base_path).get("base") or Path(result.base).name
    ax.set_title(f"refinex SFT on {base_name}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(target), format="png")
    return target


def _moving_average(values: list[float], window: int) -> list[float]:
    """Mean of the last ``window`` values at each position (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out
