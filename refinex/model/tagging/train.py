"""Training the tagging head on the ``sft_pairs`` chunks (their raw lines and target programs).

Labels are the chunk programs' ``remove_lines`` deletions (:func:`~refinex.model.tagging.labels.chunk_labels`);
the loss is binary cross-entropy on labelled (non-blank) lines only, each line weighted by
``log(2 + characters)`` so long content lines count more than menu items. With
``train_layers = 0`` the base is frozen: every chunk goes through it once and the head
trains on the cached line vectors, which makes several epochs and the threshold's
cross-validation cheap. With ``train_layers = N`` the top N decoder layers (and the final
norm) are fine-tuned too, at ``base_lr``, and the base runs in every step.

The deletion threshold is cross-validated on the training documents: ``cv_folds`` heads
(folds by a hash of the doc id) each predict the documents they did not see, and the
threshold with the best kept-character F1 on those out-of-fold probabilities is stored with
the model (``threshold`` fixes it instead). The final head is then trained on all training
chunks. Validation chunks (the pairs' ``validation`` split, at most ``eval_max_chunks`` of
them, evenly spaced) only give the validation loss and kept-character F1.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from refinex.model.tagging.labels import (
    DEFAULT_THRESHOLD,
    LabelledLines,
    choose_threshold,
    chunk_labels,
    kept_char_f1,
)
from refinex.model.train import MODEL_INFO_FORMAT, SCHEDULES  # one checkpoint format, one set of schedules
from refinex.settings import settings_from_mapping

__all__ = ["HEAD_TAG", "TagExample", "TagTrainConfig", "TagTrainResult", "tag_examples", "train_tagger"]

logger = logging.getLogger(__name__)

HEAD_TAG = "tag"


@dataclass(frozen=True)
class TagTrainConfig:
    """Architecture and training settings of the tagging head (the ``tag`` config section)."""

    max_line_tokens: int = 32
    window_tokens: int = 1024
    head_size: int = 128
    context_layers: int = 2
    context: str = "conv"
    context_width: int = 5
    dropout: float = 0.1
    layout_features: bool = True
    structure_features: bool = False  # the lines' page-structure features where the page HTML is known
    labels: str = "hard"  # hard: the chunk programs' remove_lines; soft: the consensus members' weighted vote; auto: soft where they exist
    train_layers: int = 0
    epochs: int = 6
    lr: float = 1.0e-3
    base_lr: float = 5.0e-5
    weight_decay: float = 0.01
    batch_size: int = 32  # chunks per optimizer step
    warmup_ratio: float = 0.05
    lr_schedule: str = "cosine"
    max_grad_norm: float = 1.0
    cv_folds: int = 3
    eval_max_chunks: Optional[int] = 256  # validation chunks scored (evenly spaced); None = all
    threshold: Optional[float] = None  # a fixed deletion threshold (no cross-validation)
    forward_batch: int = 16  # windows per base forward pass
    forward_tokens: int = 8192  # padded tokens per base forward pass
    feature_cache: Optional[str] = None  # a folder keeping a frozen base's line vectors between runs
    seed: int = 0
    device: Optional[str] = None
    precision: str = "auto"
    progress: bool = True
    plot: bool = True
    train_data_version: Optional[str] = None

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "forward_batch", "forward_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.train_layers < 0:
            raise ValueError(f"train_layers must be >= 0, got {self.train_layers}")
        if self.lr <= 0 or self.base_lr <= 0:
            raise ValueError("lr and base_lr must be > 0")
        if self.eval_max_chunks is not None and self.eval_max_chunks < 1:
            raise ValueError(f"eval_max_chunks must be >= 1, got {self.eval_max_chunks}")
        if self.cv_folds < 0 or self.cv_folds == 1:
            raise ValueError(f"cv_folds must be 0 (no cross-validation) or >= 2, got {self.cv_folds}")
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.labels not in ("auto", "hard", "soft"):
            raise ValueError(f"labels must be one of ('auto', 'hard', 'soft'), got {self.labels!r}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}")
        from refinex.model.precision import PRECISIONS

        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        self.architecture(1)  # validates the architecture settings

    def architecture(self, hidden_size: int) -> Any:
        from refinex.model.tagging.model import TagArchitecture

        return TagArchitecture(
            hidden_size=hidden_size, max_line_tokens=self.max_line_tokens, window_tokens=self.window_tokens,
            head_size=self.head_size, context_layers=self.context_layers, dropout=self.dropout,
            layout_features=self.layout_features, structure_features=self.structure_features, context=self.context,
            context_width=self.context_width,
        )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TagTrainConfig":
        return settings_from_mapping(cls, values, "tag")

    @classmethod
    def for_base(cls, base: Union[str, Any], overrides: Optional[Mapping[str, Any]] = None) -> "TagTrainConfig":
        """The base profile's ``tag`` defaults (``conf/model/<base>.yaml``), then ``overrides``."""
        from refinex.model.bases import tag_defaults

        return cls.from_dict({**tag_defaults(base), **dict(overrides or {})})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TagExample:
    """One chunk to learn from: its raw lines, first global id, target program and split;
    optionally its lines' page-structure features and soft targets (the share of the
    consensus weight that removes each line, ``None`` on blank lines), which then replace the
    program's labels in the loss."""

    doc_id: str
    lines: tuple[str, ...]
    first_line: int
    target: str
    split: str = "train"
    structure: Any = field(default=None, compare=False, repr=False)
    soft: Optional[tuple[Optional[float], ...]] = None


def tag_examples(
    rows: Sequence[Mapping[str, Any]], texts: Mapping[str, str], structures: Optional[Mapping[str, Any]] = None,
    soft: Optional[Mapping[str, Sequence[Optional[float]]]] = None,
) -> list[TagExample]:
    """:class:`TagExample` of ``sft_pairs`` rows whose document text is in ``texts``, with
    the chunk's slice of its document's page structure (``structures``: doc id ->
    :class:`refinex.dom.PageStructure`) and soft targets (``soft``: doc id -> one per line) where given."""
    examples = []
    for row in rows:
        doc_id = str(row["doc_id"])
        text = texts.get(doc_id)
        if text is None:
            continue
        start, end = int(row["start_line"]), int(row["end_line"])
        lines = tuple(text.split("\n")[start : end + 1])
        if not lines:
            continue
        page = (structures or {}).get(doc_id)
        targets = (soft or {}).get(doc_id)
        examples.append(TagExample(
            doc_id, lines, start, str(row["target"]), str(row.get("split") or "train"),
            None if page is None else page[start : start + len(lines)],
            None if targets is None else tuple(targets[start : start + len(lines)]),
        ))
    return examples


@dataclass
class TagTrainResult:
    """What a tagging-head training run produced (the fields MLflow logging reads)."""

    out_dir: Path
    base: str
    base_path: Path
    steps: int
    epochs_completed: float
    train_losses: list[float]
    learning_rates: list[float]
    eval_losses: list[tuple[int, float]]
    validation_loss: Optional[float]
    n_train_pairs: int
    n_validation_pairs: int
    n_skipped: int
    n_truncated: int
    train_target_tokens: int  # labelled lines seen over the run
    seconds: float
    device: str
    precision: str
    config: TagTrainConfig
    threshold: float
    threshold_source: str  # "cross-validation", "fixed" or "default"
    cv_kept_char_f1: Optional[float] = None
    validation_kept_char_f1: Optional[float] = None
    feature_seconds: float = 0.0
    plot_path: Optional[Path] = None
    train_data_version: Optional[str] = None
    precision_reason: str = ""
    threshold_scores: list[tuple[float, float]] = field(default_factory=list)
    head: str = HEAD_TAG

    @property
    def final_train_loss(self) -> Optional[float]:
        tail = self.train_losses[-10:]
        return sum(tail) / len(tail) if tail else None

    def metrics(self) -> dict[str, float]:
        out = {
            "steps": float(self.steps),
            "epochs_completed": float(self.epochs_completed),
            "train_seconds": float(self.seconds),
            "feature_seconds": float(self.feature_seconds),
            "n_train_pairs": float(self.n_train_pairs),
            "n_validation_pairs": float(self.n_validation_pairs),
            "n_skipped": float(self.n_skipped),
            "train_labelled_lines": float(self.train_target_tokens),
            "tag_threshold": float(self.threshold),
        }
        for name in ("final_train_loss", "validation_loss", "cv_kept_char_f1", "validation_kept_char_f1"):
            value = getattr(self, name)
            if value is not None and not math.isnan(value):
                out[name] = float(value)
        return out

    def summary(self) -> str:
        val = "n/a" if self.validation_loss is None else f"{self.validation_loss:.4f}"
        f1 = "n/a" if self.validation_kept_char_f1 is None else f"{self.validation_kept_char_f1:.3f}"
        return (
            f"refinex train (tag head): {self.steps} steps, {self.epochs_completed:.2f} epochs, "
            f"{self.n_train_pairs} train / {self.n_validation_pairs} validation chunks, threshold "
            f"{self.threshold:g} ({self.threshold_source}), validation loss {val}, kept-char F1 {f1}, "
            f"{self.seconds:.1f}s on {self.device} ({self.precision}"
            f"{': ' + self.precision_reason if self.precision_reason else ''}) -> {self.out_dir}"
        )


@dataclass
class _Prepared:
    """A chunk encoded for the base, with its labels and loss weights."""

    example: TagExample
    encoded: Any  # EncodedChunk
    labels: Any  # float tensor (lines,): 1 removed, 0 kept
    weights: Any  # float tensor (lines,): 0 for blank lines
    vectors: Any = None  # cached line vectors (frozen base only)


def _fold(doc_id: str, folds: int) -> int:
    digest = hashlib.sha256(f"refinex-tag-cv\x00{doc_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % folds


def _prepare(encoder: Any, examples: Sequence[TagExample]) -> tuple[list[_Prepared], int]:
    import torch

    prepared, skipped = [], 0
    for example in examples:
        try:
            labels = chunk_labels(example.lines, example.first_line, example.target)
        except ValueError:
            skipped += 1
            continue
        targets: Sequence[Optional[float]] = [None if label is None else float(label) for label in labels]
        if example.soft is not None:
            targets = [None if not line.strip() else (float(t) if t is not None else 0.0)
                       for line, t in zip(example.lines, example.soft)]
        weights = [0.0 if t is None else math.log(2.0 + len(line.strip())) for line, t in zip(example.lines, targets)]
        prepared.append(_Prepared(
            example, encoder.encode(example.lines, example.structure),
            torch.tensor([0.0 if t is None else t for t in targets]), torch.tensor(weights),
        ))
    return prepared, skipped


class _Tagger:
    """The base and the head being trained (or used) together."""

    def __init__(self, base: Any, head: Any, pad_id: int, device: Any, config: TagTrainConfig, autocast: Any) -> None:
        self.base, self.head, self.pad_id, self.device = base, head, pad_id, device
        self.config, self.autocast = config, autocast

    def vectors(self, items: Sequence[_Prepared]) -> list[Any]:
        from refinex.model.tagging.model import chunk_vectors

        if all(item.vectors is not None for item in items):
            return [item.vectors.to(self.device) for item in items]
        return chunk_vectors(self.base, [item.encoded for item in items], self.pad_id, self.device,
                             self.config.forward_batch, self.config.forward_tokens, self.autocast)

    def logits(self, items: Sequence[_Prepared]) -> list[Any]:
        import torch

        layouts = [torch.from_numpy(item.encoded.layout).to(self.device) for item in items]
        return self.head(self.vectors(items), layouts)


def _loss(logits: Sequence[Any], items: Sequence[_Prepared], device: Any) -> tuple[Any, float]:
    import torch
    import torch.nn.functional as F

    flat = torch.cat(list(logits))
    labels = torch.cat([item.labels for item in items]).to(device)
    weights = torch.cat([item.weights for item in items]).to(device)
    total = float(weights.sum().item())
    losses = F.binary_cross_entropy_with_logits(flat.float(), labels, reduction="none")
    return (losses * weights).sum() / max(total, 1e-9), total


def _cache_vectors(tagger: _Tagger, items: Sequence[_Prepared], progress: bool, label: str) -> None:
    """Run the frozen base once over every chunk and keep the line vectors (CPU, fp32)."""
    import torch
    from tqdm.auto import tqdm

    group = 32
    bar = tqdm(total=len(items), desc=label, unit="chunk", disable=not progress, file=sys.stderr)
    order = sorted(range(len(items)), key=lambda i: -items[i].encoded.n_tokens)
    with torch.no_grad():
        for start in range(0, len(order), group):
            batch = [items[i] for i in order[start : start + group]]
            for item, vectors in zip(batch, tagger.vectors(batch)):
                item.vectors = vectors.detach().to("cpu", torch.float32)
            bar.update(len(batch))
    bar.close()


class _FeatureStore:
    """Line vectors of a frozen base kept on disk (``feature_cache``), keyed by the base's
    weights, the encoder settings, the precision and each chunk's lines; fp16 on disk."""

    def __init__(self, folder: Optional[str], base_path: Path, architecture: Any, precision: str) -> None:
        self.path: Optional[Path] = None
        self.vectors: dict[str, Any] = {}
        if folder is None:
            return
        from refinex.model.train import weights_hash

        digest = weights_hash(base_path)
        digest.update(json.dumps({"max_line_tokens": architecture.max_line_tokens,
                                  "window_tokens": architecture.window_tokens, "precision": precision},
                                 sort_keys=True).encode())
        self.path = Path(folder) / f"tag-vectors-{digest.hexdigest()[:16]}.pt"
        if self.path.is_file():
            import torch

            self.vectors = torch.load(self.path, map_location="cpu", weights_only=True)

    @staticmethod
    def key(item: _Prepared) -> str:
        return hashlib.sha256("\n".join(item.example.lines).encode("utf-8")).hexdigest()

    def fill(self, items: Sequence[_Prepared]) -> list[_Prepared]:
        """Give ``items`` their stored vectors; the ones still to compute."""
        import torch

        missing = []
        for item in items:
            stored = self.vectors.get(self.key(item))
            if stored is not None and stored.shape[0] == item.encoded.n_lines:
                item.vectors = stored.to(torch.float32)
            else:
                missing.append(item)
        return missing

    def save(self, computed: Sequence[_Prepared]) -> None:
        import torch

        if self.path is None or not computed:
            return
        for item in computed:
            self.vectors[self.key(item)] = item.vectors.to(torch.float16)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".tmp")
        torch.save(self.vectors, partial)
        partial.replace(self.path)


def _hard_labels(example: TagExample) -> tuple[Optional[bool], ...]:
    """Removed/kept per line (the soft targets' majority where the example has them)."""
    if example.soft is not None:
        return tuple(None if not line.strip() else (t or 0.0) >= 0.5 for line, t in zip(example.lines, example.soft))
    return tuple(chunk_labels(example.lines, example.first_line, example.target))


def _evaluate(tagger: _Tagger, items: Sequence[_Prepared]) -> tuple[Optional[float], list[LabelledLines]]:
    """Weighted validation loss and the probabilities of ``items``."""
    import torch

    if not items:
        return None, []
    was_training = tagger.head.training
    tagger.head.eval()
    tagger.base.eval()
    total = weight = 0.0
    out: list[LabelledLines] = []
    with torch.no_grad():
        for start in range(0, len(items), 32):
            batch = list(items[start : start + 32])
            logits = tagger.logits(batch)
            loss, w = _loss(logits, batch, tagger.device)
            total += float(loss.item()) * w
            weight += w
            for item, row in zip(batch, logits):
                out.append(LabelledLines(item.example.lines, _hard_labels(item.example),
                                         tuple(float(p) for p in torch.sigmoid(row.float()).cpu().tolist())))
    tagger.head.train(was_training)
    return (total / weight if weight else None), out


def _trainable_base(base: Any, layers: int) -> list[Any]:
    """Freeze the base except its top ``layers`` decoder layers and final norm; their params."""
    for parameter in base.parameters():
        parameter.requires_grad_(False)
    if layers == 0:
        return []
    blocks = getattr(base, "layers", None)
    if blocks is None or len(blocks) < layers:
        raise ValueError(f"train_layers={layers}: the base has {0 if blocks is None else len(blocks)} decoder layers")
    modules = list(blocks[len(blocks) - layers :])
    norm = getattr(base, "norm", None)
    if norm is not None:
        modules.append(norm)
    params = [p for m in modules for p in m.parameters()]
    for parameter in params:
        parameter.requires_grad_(True)
    return params


def _schedule(optimizer: Any, config: TagTrainConfig, total_steps: int) -> Any:
    import torch

    warmup = round(config.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if config.lr_schedule == "constant_with_warmup":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if config.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _fit(
    base: Any, items: Sequence[_Prepared], config: TagTrainConfig, hidden_size: int, n_layout: int, pad_id: int,
    device: Any, autocast: Any, desc: str, validation: Sequence[_Prepared] = (),
) -> tuple[_Tagger, list[float], list[float], list[tuple[int, float]], int, int]:
    """Train a fresh head (and the base's top layers) on ``items``."""
    import torch
    from tqdm.auto import tqdm

    from refinex.model.tagging.model import TagHead

    torch.manual_seed(config.seed)
    head = TagHead(config.architecture(hidden_size), n_layout).to(device)
    base_params = _trainable_base(base, config.train_layers)
    groups = [{"params": list(head.parameters()), "lr": config.lr}]
    if base_params:
        groups.append({"params": base_params, "lr": config.base_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(items) / config.batch_size)
    total = steps_per_epoch * config.epochs
    scheduler = _schedule(optimizer, config, total)
    tagger = _Tagger(base, head, pad_id, device, config, autocast)
    losses: list[float] = []
    rates: list[float] = []
    evals: list[tuple[int, float]] = []
    labelled = 0
    if validation:
        start_loss, _ = _evaluate(tagger, validation)
        if start_loss is not None:
            evals.append((0, start_loss))
    rng = random.Random(config.seed)
    bar = tqdm(total=total, desc=desc, unit="step", disable=not config.progress, file=sys.stderr)
    head.train()
    base.train(bool(base_params))
    step = 0
    for _epoch in range(config.epochs):
        order = list(range(len(items)))
        rng.shuffle(order)
        for start in range(0, len(order), config.batch_size):
            batch = [items[i] for i in order[start : start + config.batch_size]]
            optimizer.zero_grad(set_to_none=True)
            loss, _ = _loss(tagger.logits(batch), batch, device)
            loss.backward()
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], config.max_grad_norm)
            rates.append(float(scheduler.get_last_lr()[0]))
            optimizer.step()
            scheduler.step()
            step += 1
            losses.append(float(loss.item()))
            labelled += int(sum(int((item.weights > 0).sum().item()) for item in batch))
            bar.set_postfix({"loss": f"{losses[-1]:.4f}"}, refresh=False)
            bar.update(1)
    bar.close()
    head.eval()
    base.eval()
    return tagger, losses, rates, evals, step, labelled


def train_tagger(
    examples: Sequence[TagExample],
    base: Union[str, Any],
    out_dir: Union[str, Any],
    config: TagTrainConfig = TagTrainConfig(),
) -> TagTrainResult:
    """Train a tagging head on ``base`` (profile name or checkpoint path) into ``out_dir``."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from refinex.model.bases import prepare_base
    from refinex.model.precision import resolve_precision
    from refinex.model.tagging.model import LineEncoder, n_layout_columns
    from refinex.model.train import autocast_context, plot_loss_curve

    started = time.perf_counter()
    base_path = prepare_base(base)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    choice = resolve_precision(config.precision, device)
    autocast = autocast_context(device, choice.precision)
    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(base_path), local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModel.from_pretrained(str(base_path), local_files_only=True, dtype=torch.float32).to(device)
    model.eval()
    hidden_size = int(model.config.hidden_size)
    architecture = config.architecture(hidden_size)
    n_layout = n_layout_columns(architecture)
    encoder = LineEncoder(tokenizer, architecture)
    pad_id = int(tokenizer.pad_token_id)

    train_items, skipped = _prepare(encoder, [e for e in examples if e.split != "validation"])
    from refinex.model.train import evenly_spaced

    validation = evenly_spaced([e for e in examples if e.split == "validation"], config.eval_max_chunks)
    val_items, val_skipped = _prepare(encoder, validation)
    if not train_items:
        raise ValueError(f"no training chunk with a valid program ({skipped} skipped)")

    feature_seconds = 0.0
    if config.train_layers == 0:
        feature_started = time.perf_counter()
        probe = _Tagger(model, None, pad_id, device, config, autocast)
        _trainable_base(model, 0)
        store = _FeatureStore(config.feature_cache, base_path, architecture, choice.precision)
        missing = store.fill(train_items + val_items)
        _cache_vectors(probe, missing, config.progress, "refinex tag: base forward")
        store.save(missing)
        feature_seconds = time.perf_counter() - feature_started
    initial_state = copy.deepcopy(model.state_dict()) if config.train_layers else None

    threshold, source, cv_f1, scores = DEFAULT_THRESHOLD, "default", None, []
    if config.threshold is not None:
        threshold, source = float(config.threshold), "fixed"
    elif config.cv_folds >= 2:
        out_of_fold: list[LabelledLines] = []
        for fold in range(config.cv_folds):
            held = [i for i in train_items if _fold(i.example.doc_id, config.cv_folds) == fold]
            rest = [i for i in train_items if _fold(i.example.doc_id, config.cv_folds) != fold]
            if not held or not rest:
                continue
            if initial_state is not None:
                model.load_state_dict(initial_state)
            fold_tagger = _fit(model, rest, config, hidden_size, n_layout, pad_id, device, autocast,
                               f"refinex tag: fold {fold + 1}/{config.cv_folds}")[0]
            out_of_fold.extend(_evaluate(fold_tagger, held)[1])
        if out_of_fold:
            chosen = choose_threshold(out_of_fold)
            threshold, source, cv_f1, scores = chosen.threshold, "cross-validation", chosen.f1, list(chosen.scores)
        if initial_state is not None:
            model.load_state_dict(initial_state)

    tagger, losses, rates, evals, steps, labelled = _fit(
        model, train_items, config, hidden_size, n_layout, pad_id, device, autocast, "refinex tag: train",
        validation=val_items)
    validation_loss, validation_probs = _evaluate(tagger, val_items)
    if validation_loss is not None:
        evals.append((steps, validation_loss))
    result = TagTrainResult(
        out_dir=Path(out_dir), base=str(base), base_path=Path(base_path), steps=steps,
        epochs_completed=float(config.epochs), train_losses=losses, learning_rates=rates, eval_losses=evals,
        validation_loss=validation_loss, n_train_pairs=len(train_items), n_validation_pairs=len(val_items),
        n_skipped=skipped + val_skipped, n_truncated=0, train_target_tokens=labelled, seconds=0.0,
        device=str(device), precision=choice.precision, precision_reason=choice.reason, config=config,
        threshold=threshold, threshold_source=source, cv_kept_char_f1=cv_f1,
        validation_kept_char_f1=kept_char_f1(validation_probs, threshold) if validation_probs else None,
        feature_seconds=feature_seconds, train_data_version=config.train_data_version, threshold_scores=scores,
    )
    save_tagger(tagger, tokenizer, architecture, n_layout, result)
    if config.plot:
        result.plot_path = plot_loss_curve(result, result.out_dir / "loss_curve.png")
    result.seconds = time.perf_counter() - started
    write_tag_info(result, architecture, n_layout)
    summary = result.summary()
    logger.info(summary)
    if config.progress:
        print(summary, file=sys.stderr, flush=True)
    return result


def save_tagger(tagger: _Tagger, tokenizer: Any, architecture: Any, n_layout: int, result: TagTrainResult) -> None:
    """The base (``save_pretrained``), the tokenizer and the head's weights."""
    from safetensors.torch import save_file

    from refinex.model.tagging.model import HEAD_FILE

    out = result.out_dir
    out.mkdir(parents=True, exist_ok=True)
    for parameter in tagger.base.parameters():
        parameter.requires_grad_(False)
    tagger.base.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    state = {k: v.detach().to("cpu").contiguous() for k, v in tagger.head.state_dict().items()}
    save_file(state, str(out / HEAD_FILE))


def write_tag_info(result: TagTrainResult, architecture: Any, n_layout: int) -> None:
    """``refinex_model.json``: the head, its architecture and threshold, metrics, versions."""
    import torch
    import transformers

    from refinex import __version__
    from refinex.model.bases import read_base_info
    from refinex.model.train import MODEL_INFO_FILE

    info = {
        "format": MODEL_INFO_FORMAT,
        "head": HEAD_TAG,
        "tag": {
            "architecture": architecture.to_dict(),
            "layout_features": n_layout,
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
        "config": result.config.to_dict(),
        "device": result.device,
        "precision": result.precision,
        "precision_reason": result.precision_reason,
        "versions": {"refinex": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (result.out_dir / MODEL_INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
