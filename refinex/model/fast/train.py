"""Training the fast tier on whole documents and their line labels.

A document's targets are per line: 1 removed, 0 kept (hard labels: the distilled
program's ``remove_lines``), or the weighted share of the consensus experts that remove the
line (soft labels); blank lines carry none (``None``) and follow the line above, as in the
distiller. The loss is binary cross-entropy on labelled lines, each weighted by
``log(2 + characters)`` (as the tagging head's). Documents longer than ``window_lines`` are
read through a random window of that many lines per step; ``structure_dropout`` of the
training documents are read without their page-structure features in each epoch, so the
model also serves corpora without HTML.

The deletion threshold is 0.5 by default (the targets' scale: a line most teachers delete).
With ``cv_folds`` >= 2 it is chosen like the tagging head's: that many models (folds by a
hash of the doc id) predict the training documents they did not see, and the threshold with
the best kept-character F1 on those out-of-fold probabilities is stored with the model
(``threshold`` fixes it); below ``cv_min_documents`` training documents the folds are too
small to choose on and 0.5 is kept. The model records which. The final model is trained on
all training documents; validation documents give the validation loss and kept-character F1.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from refinex.model.fast import ENCODER, TIER_FAST
from refinex.model.fast.features import LineFeatures, line_features
from refinex.model.tagging.labels import DEFAULT_THRESHOLD, LabelledLines, choose_threshold, kept_char_f1
from refinex.settings import settings_from_mapping

__all__ = ["LABELS", "FastDocument", "FastTrainConfig", "document_targets", "train_fast"]

logger = logging.getLogger(__name__)

LABELS = ("auto", "hard", "soft")


@dataclass(frozen=True)
class FastTrainConfig:
    """Architecture and training settings of the fast tier (the ``tag`` section when the
    base is a ``hashed`` profile, over its defaults in ``conf/model/<base>.yaml``)."""

    n_features: int = 2**18
    embedding_size: int = 64
    hidden_size: int = 128
    context: str = "gru"
    context_layers: int = 2
    context_width: int = 5
    dilated: bool = False
    dropout: float = 0.1
    structure: bool = True  # page-structure features where the document has HTML
    structure_dropout: float = 0.2  # share of training documents read without them, per epoch
    labels: str = "auto"  # hard: the distilled programs; soft: the consensus members' weighted vote; auto: soft where they exist
    epochs: int = 6
    min_steps: int = 0  # at least this many optimizer steps: more epochs over a small corpus
    lr: float = 2.0e-3
    weight_decay: float = 0.01
    batch_size: int = 8  # documents per optimizer step
    window_lines: int = 400  # a longer training document is read through a random window of this many lines
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    cv_folds: int = 0  # 0: the fixed default threshold (conf/model/fast.yaml says why)
    cv_min_documents: int = 100  # fewer training documents: no cross-validation, the default threshold
    threshold: Optional[float] = None  # a fixed deletion threshold (no cross-validation)
    seed: int = 0
    threads: Optional[int] = None  # torch threads (None: torch's default)
    progress: bool = True
    plot: bool = True
    train_data_version: Optional[str] = None

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "window_lines"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.min_steps < 0:
            raise ValueError(f"min_steps must be >= 0, got {self.min_steps}")
        if self.lr <= 0:
            raise ValueError("lr must be > 0")
        if self.labels not in LABELS:
            raise ValueError(f"labels must be one of {LABELS}, got {self.labels!r}")
        if not 0.0 <= self.structure_dropout < 1.0:
            raise ValueError(f"structure_dropout must be in [0, 1), got {self.structure_dropout}")
        if self.cv_min_documents < 0:
            raise ValueError(f"cv_min_documents must be >= 0, got {self.cv_min_documents}")
        if self.cv_folds < 0 or self.cv_folds == 1:
            raise ValueError(f"cv_folds must be 0 (no cross-validation) or >= 2, got {self.cv_folds}")
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        self.architecture()  # validates the architecture settings

    def architecture(self) -> Any:
        from refinex.model.fast.network import FastArchitecture

        return FastArchitecture(
            n_features=self.n_features, embedding_size=self.embedding_size, hidden_size=self.hidden_size,
            context=self.context, context_layers=self.context_layers, context_width=self.context_width,
            dilated=self.dilated, dropout=self.dropout,
        )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "FastTrainConfig":
        return settings_from_mapping(cls, values, "tag")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FastDocument:
    """One document to learn from: its lines, page structure (a
    :class:`refinex.dom.PageStructure`; ``None``: no HTML), per-line targets (``None`` on
    blank lines) and split."""

    doc_id: str
    lines: tuple[str, ...]
    targets: tuple[Optional[float], ...]
    structure: Any = None
    split: str = "train"

    def __post_init__(self) -> None:
        if len(self.targets) != len(self.lines):
            raise ValueError(f"{self.doc_id}: {len(self.targets)} targets for {len(self.lines)} lines")


def document_targets(
    lines: Sequence[str], removed: Optional[Sequence[bool]] = None,
    votes: Optional[Sequence[tuple[float, Sequence[bool]]]] = None,
) -> tuple[Optional[float], ...]:
    """Per line: the hard label (``removed``) or the weighted share of ``votes`` (``(weight,
    removed lines)`` per voting member) that remove it; ``None`` on blank lines."""
    if (removed is None) == (votes is None):
        raise ValueError("give either removed (hard labels) or votes (soft labels)")
    if removed is not None:
        if len(removed) != len(lines):
            raise ValueError(f"{len(removed)} labels for {len(lines)} lines")
        values = [float(bool(flag)) for flag in removed]
    else:
        total = sum(float(w) for w, _ in votes or ())
        if total <= 0:
            raise ValueError("soft labels need at least one member with a positive weight")
        values = [0.0] * len(lines)
        for weight, member in votes or ():
            if len(member) != len(lines):
                raise ValueError(f"a member labels {len(member)} lines of {len(lines)}")
            for i, flag in enumerate(member):
                if flag:
                    values[i] += float(weight) / total
    return tuple(min(1.0, v) if line.strip() else None for line, v in zip(lines, values))


@dataclass
class _Item:
    doc: FastDocument
    full: LineFeatures
    text_only: LineFeatures
    targets: np.ndarray  # float32, 0 where unlabelled
    weights: np.ndarray  # float32, 0 on blank lines


def _prepare(docs: Sequence[FastDocument], config: FastTrainConfig) -> list[_Item]:
    items = []
    for doc in docs:
        if not doc.lines or not any(t is not None for t in doc.targets):
            continue
        structure = doc.structure if config.structure else None
        full = line_features(doc.lines, config.n_features, structure, keep_text_only=config.structure_dropout > 0)
        text_only = full.without_structure()
        targets = np.array([0.0 if t is None else float(t) for t in doc.targets], dtype=np.float32)
        weights = np.array([0.0 if t is None else math.log(2.0 + len(line.strip()))
                            for line, t in zip(doc.lines, doc.targets)], dtype=np.float32)
        items.append(_Item(doc, full, text_only, targets, weights))
    return items


def _fold(doc_id: str, folds: int) -> int:
    digest = hashlib.sha256(f"refinex-fast-cv\x00{doc_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % folds


def _loss(logits: Sequence[Any], targets: Sequence[np.ndarray], weights: Sequence[np.ndarray]) -> tuple[Any, float]:
    import torch
    import torch.nn.functional as F

    flat = torch.cat(list(logits))
    y = torch.from_numpy(np.concatenate(targets)).to(flat.device)
    w = torch.from_numpy(np.concatenate(weights)).to(flat.device)
    total = float(w.sum().item())
    losses = F.binary_cross_entropy_with_logits(flat.float(), y, reduction="none")
    return (losses * w).sum() / max(total, 1e-9), total


def epochs_for(config: FastTrainConfig, n_documents: int) -> int:
    """``epochs``, or more when that many would take fewer than ``min_steps`` steps."""
    steps_per_epoch = max(1, math.ceil(n_documents / config.batch_size))
    return max(config.epochs, math.ceil(config.min_steps / steps_per_epoch))


@dataclass
class _Fit:
    network: Any
    losses: list[float]
    rates: list[float]
    evals: list[tuple[int, float]]
    steps: int
    labelled: int


def _fit(items: Sequence[_Item], config: FastTrainConfig, desc: str, validation: Sequence[_Item] = ()) -> _Fit:
    import torch
    from tqdm.auto import tqdm

    from refinex.model.fast.network import FastTagger

    torch.manual_seed(config.seed)
    network = FastTagger(config.architecture())
    dense = torch.optim.AdamW(network.dense_parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sparse = torch.optim.SparseAdam(network.sparse_parameters(), lr=config.lr)
    steps_per_epoch = math.ceil(len(items) / config.batch_size)
    epochs = epochs_for(config, len(items))
    total = steps_per_epoch * epochs
    warmup = round(config.warmup_ratio * total)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    schedules = [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in (dense, sparse)]
    rng = random.Random(config.seed)
    fit = _Fit(network, [], [], [], 0, 0)
    if validation:
        loss, _ = _evaluate(network, validation)
        if loss is not None:
            fit.evals.append((0, loss))
    bar = tqdm(total=total, desc=desc, unit="step", disable=not config.progress, file=sys.stderr)
    network.train()
    for _epoch in range(epochs):
        order = list(range(len(items)))
        rng.shuffle(order)
        for start in range(0, len(order), config.batch_size):
            batch = [items[i] for i in order[start : start + config.batch_size]]
            inputs, targets, weights = [], [], []
            for item in batch:
                features = item.text_only if rng.random() < config.structure_dropout else item.full
                n = features.n_lines
                first = rng.randint(0, n - config.window_lines) if n > config.window_lines else 0
                last = min(n, first + config.window_lines)
                inputs.append(features.rows(first, last) if (first, last) != (0, n) else features)
                targets.append(item.targets[first:last])
                weights.append(item.weights[first:last])
            dense.zero_grad(set_to_none=True)
            sparse.zero_grad(set_to_none=True)
            loss, _ = _loss(network(inputs), targets, weights)
            loss.backward()
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(network.dense_parameters(), config.max_grad_norm)
            fit.rates.append(float(schedules[0].get_last_lr()[0]))
            dense.step()
            sparse.step()
            for schedule in schedules:
                schedule.step()
            fit.steps += 1
            fit.losses.append(float(loss.item()))
            fit.labelled += int(sum(int((w > 0).sum()) for w in weights))
            bar.set_postfix({"loss": f"{fit.losses[-1]:.4f}"}, refresh=False)
            bar.update(1)
    bar.close()
    network.eval()
    return fit


def _probabilities(network: Any, features: Sequence[LineFeatures], batch: int = 16) -> list[np.ndarray]:
    import torch

    out: list[np.ndarray] = []
    with torch.inference_mode():
        for start in range(0, len(features), batch):
            for logits in network(list(features[start : start + batch])):
                out.append(torch.sigmoid(logits.float()).cpu().numpy())
    return out


def _labelled(items: Sequence[_Item], probabilities: Sequence[np.ndarray]) -> list[LabelledLines]:
    return [LabelledLines(item.doc.lines, tuple(None if t is None else t >= 0.5 for t in item.doc.targets),
                          tuple(float(p) for p in probs)) for item, probs in zip(items, probabilities)]


def _evaluate(network: Any, items: Sequence[_Item]) -> tuple[Optional[float], list[LabelledLines]]:
    import torch

    if not items:
        return None, []
    was_training = network.training
    network.eval()
    probabilities = _probabilities(network, [item.full for item in items])
    with torch.inference_mode():
        logits = [torch.logit(torch.from_numpy(p).clamp(1e-6, 1 - 1e-6)) for p in probabilities]
        loss, _ = _loss(logits, [i.targets for i in items], [i.weights for i in items])
    network.train(was_training)
    return float(loss.item()), _labelled(items, probabilities)


def train_fast(
    docs: Sequence[FastDocument],
    base_path: Union[str, Path],
    out_dir: Union[str, Path],
    config: FastTrainConfig = FastTrainConfig(),
    base: str = "fast",
) -> Any:
    """Train the fast tier on ``docs`` into ``out_dir``; a
    :class:`~refinex.model.tagging.train.TagTrainResult` (the fields MLflow logging reads)."""
    import torch

    from refinex.model.tagging.train import TagTrainResult

    started = time.perf_counter()
    if config.threads:
        torch.set_num_threads(int(config.threads))
    feature_started = time.perf_counter()
    train_items = _prepare([d for d in docs if d.split != "validation"], config)
    val_items = _prepare([d for d in docs if d.split == "validation"], config)
    feature_seconds = time.perf_counter() - feature_started
    if not train_items:
        raise ValueError("no training document with a labelled line")
    skipped = len(docs) - len(train_items) - len(val_items)

    threshold, source, cv_f1, scores = DEFAULT_THRESHOLD, "default", None, []
    if config.threshold is not None:
        threshold, source = float(config.threshold), "fixed"
    elif config.cv_folds >= 2 and len(train_items) < config.cv_min_documents:
        source = f"default (fewer than {config.cv_min_documents} training documents to cross-validate on)"
    elif config.cv_folds >= 2:
        out_of_fold: list[LabelledLines] = []
        for fold in range(config.cv_folds):
            held = [i for i in train_items if _fold(i.doc.doc_id, config.cv_folds) == fold]
            rest = [i for i in train_items if _fold(i.doc.doc_id, config.cv_folds) != fold]
            if not held or not rest:
                continue
            network = _fit(rest, config, f"refinex fast: fold {fold + 1}/{config.cv_folds}").network
            out_of_fold.extend(_evaluate(network, held)[1])
        if out_of_fold:
            chosen = choose_threshold(out_of_fold)
            threshold, source, cv_f1, scores = chosen.threshold, "cross-validation", chosen.f1, list(chosen.scores)

    fit = _fit(train_items, config, "refinex fast: train", validation=val_items)
    validation_loss, validation_probs = _evaluate(fit.network, val_items)
    if validation_loss is not None:
        fit.evals.append((fit.steps, validation_loss))
    result = TagTrainResult(
        out_dir=Path(out_dir), base=str(base), base_path=Path(base_path), steps=fit.steps,
        epochs_completed=float(epochs_for(config, len(train_items))), train_losses=fit.losses, learning_rates=fit.rates,
        eval_losses=fit.evals, validation_loss=validation_loss, n_train_pairs=len(train_items),
        n_validation_pairs=len(val_items), n_skipped=skipped, n_truncated=0, train_target_tokens=fit.labelled,
        seconds=0.0, device="cpu", precision="fp32", precision_reason="the fast tier runs in fp32",
        config=config, threshold=threshold, threshold_source=source, cv_kept_char_f1=cv_f1,
        validation_kept_char_f1=kept_char_f1(validation_probs, threshold) if validation_probs else None,
        feature_seconds=feature_seconds, train_data_version=config.train_data_version, threshold_scores=scores,
    )
    save_fast(fit.network, Path(base_path), result)
    if config.plot:
        from refinex.model.train import plot_loss_curve

        result.plot_path = plot_loss_curve(result, result.out_dir / "loss_curve.png")
    result.seconds = time.perf_counter() - started
    write_fast_info(result, fit.network.architecture)
    summary = result.summary().replace("(tag head)", "(fast tier)")
    logger.info(summary)
    if config.progress:
        print(summary, file=sys.stderr, flush=True)
    return result


def save_fast(network: Any, base_path: Path, result: Any) -> None:
    """The network's weights and the base's counter file (how ``refine`` cuts chunks)."""
    from safetensors.torch import save_file

    from refinex.model.bases import BASE_INFO_FILE
    from refinex.model.fast.network import WEIGHTS_FILE

    out = Path(result.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in network.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    if (base_path / BASE_INFO_FILE).is_file():
        shutil.copyfile(base_path / BASE_INFO_FILE, out / BASE_INFO_FILE)


def write_fast_info(result: Any, architecture: Any) -> None:
    """``refinex_model.json``: head ``tag``, encoder ``hashed``, tier ``fast``, the
    architecture and threshold, metrics, versions."""
    import torch

    from refinex import __version__
    from refinex.model.bases import read_base_info
    from refinex.model.train import MODEL_INFO_FILE, MODEL_INFO_FORMAT

    config = result.config
    info = {
        "format": MODEL_INFO_FORMAT,
        "head": "tag",
        "encoder": ENCODER,
        "tier": TIER_FAST,
        "fast": {
            "architecture": architecture.to_dict(),
            "structure": bool(config.structure),
            "labels": config.labels,
            "threshold": result.threshold,
            "threshold_source": result.threshold_source,
            "threshold_scores": [[t, f] for t, f in result.threshold_scores],
        },
        "base": result.base,
        "base_path": str(result.base_path),
        "base_info": read_base_info(result.base_path),
        "train_data_version": result.train_data_version,
        "metrics": result.metrics(),
        "eval_losses": [[s, v] for s, v in result.eval_losses],
        "config": config.to_dict(),
        "device": result.device,
        "precision": result.precision,
        "versions": {"refinex": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (Path(result.out_dir) / MODEL_INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n",
                                                        encoding="utf-8")


def with_overrides(config: FastTrainConfig, **changes: Any) -> FastTrainConfig:
    """``config`` with ``changes`` (validated)."""
    return replace(config, **changes)
