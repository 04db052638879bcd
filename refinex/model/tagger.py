"""Baseline line tagger: logistic regression on hashed word n-grams and line features.

Each line of a document is classified as kept or removed. Training labels come from
programs (distilled or expert): a line is removed when an in-range ``remove_lines`` covers
it; ``remove_str`` edits count as kept. Features are the line's hashed word 1-2 grams
(``HashingVectorizer``, stateless) plus a few dense layout features (length, position,
character classes, neighbours' lengths, repetition within the document). Blank lines are
layout, as for the distiller: the tagger neither learns from them nor classifies them; each
follows the nearest non-blank line above it (``refinex.distill.settle_blank_lines``).
Predictions turn into a program: each run of consecutive removed lines becomes one
``remove_lines``; nothing removed is ``keep_all()``. The refine model must beat this baseline.
"""
from __future__ import annotations

import math
import os
import string
from pathlib import Path
from collections import Counter
from typing import Any, Optional, Sequence, Union

import numpy as np

from refinex.distill import settle_blank_lines
from refinex.evaluation.scores import ratio
from refinex.program import parse
from refinex.program.ops import KeepAll, Program, RemoveLines

__all__ = ["LAYOUT_FEATURES", "LineTagger", "LineTaggerBackend", "layout_features", "line_labels",
           "program_from_labels", "save_checkpoint"]

FORMAT = "refinex-line-tagger"
FORMAT_VERSION = 1
_PUNCT = frozenset(string.punctuation) | frozenset("«»“”‘’•·–—…|›‹")
_SENTENCE_END = tuple(".!?:;\"'”’)")
_SEPARATORS = frozenset("|•·»›/>")
LAYOUT_FEATURES = 20  # columns of layout_features
_URL_MARKERS = ("http://", "https://", "www.", ".com", ".html", "@")

ProgramLike = Union[Program, str]


def line_labels(raw: str, program: ProgramLike) -> list[bool]:
    """Per line of ``raw``: ``True`` when an in-range ``remove_lines`` of ``program`` covers it."""
    if isinstance(program, str):
        program = parse(program)
    n = len(raw.split("\n"))
    removed = [False] * n
    for op in program.ops:
        if isinstance(op, RemoveLines) and 0 <= op.start <= op.end < n:
            for i in range(op.start, op.end + 1):
                removed[i] = True
    return removed


def program_from_labels(removed: Sequence[bool]) -> Program:
    """``remove_lines`` for each run of removed lines; ``keep_all()`` when there is none."""
    ops: list[RemoveLines] = []
    start: Optional[int] = None
    for i, flag in enumerate(list(removed) + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            ops.append(RemoveLines(start, i - 1))
            start = None
    return Program(tuple(ops)) if ops else Program((KeepAll(),))


def layout_features(lines: Sequence[str]) -> np.ndarray:
    """Layout features of every line of one document (roughly scaled to [0, 1])."""
    n = len(lines)
    lengths = [len(line) for line in lines]
    counts = Counter(line.strip() for line in lines)
    rows = np.zeros((n, LAYOUT_FEATURES), dtype=np.float64)
    for i, line in enumerate(lines):
        stripped = line.strip()
        size = len(line)
        words = line.split()
        n_words = len(words)
        rows[i] = (
            math.log1p(size) / 8.0,
            math.log1p(n_words) / 6.0,
            i / (n - 1) if n > 1 else 0.0,
            math.log1p(i) / 8.0,
            math.log1p(n - 1 - i) / 8.0,
            float(not stripped),
            float(size < 30),
            ratio(sum(c.isdigit() for c in line), size),
            ratio(sum(c.isupper() for c in line), size),
            ratio(sum(c.isalpha() for c in line), size),
            ratio(sum(c in _PUNCT for c in line), size),
            ratio(sum(c.isspace() for c in line), size),
            float(stripped.endswith(_SENTENCE_END)),
            float(any(marker in line for marker in _URL_MARKERS)),
            ratio(sum(c in _SEPARATORS for c in line), max(n_words, 1)),
            ratio(sum(w[:1].isupper() for w in words), n_words),
            math.log1p(lengths[i - 1]) / 8.0 if i > 0 else 0.0,
            math.log1p(lengths[i + 1]) / 8.0 if i + 1 < n else 0.0,
            math.log1p(counts[stripped] - 1) / 3.0 if stripped else 0.0,
            float(n_words > 0 and n_words <= 3 and not stripped.endswith(_SENTENCE_END)),
        )
    return rows


class LineTagger:
    """Keep/remove classifier of document lines.

    ``n_features``: hashed n-gram dimensions; ``C``: inverse regularisation strength;
    ``threshold``: removal probability above which a line is removed; ``class_weight``:
    passed to ``LogisticRegression`` (``"balanced"`` for rare removals).
    """

    def __init__(
        self,
        *,
        n_features: int = 2**18,
        C: float = 4.0,
        threshold: float = 0.5,
        class_weight: Optional[str] = None,
        max_iter: int = 2000,
        dense_weight: float = 1.0,
    ) -> None:
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        self.n_features = int(n_features)
        self.C = float(C)
        self.threshold = float(threshold)
        self.class_weight = class_weight
        self.max_iter = int(max_iter)
        self.dense_weight = float(dense_weight)
        self.classifier: Any = None
        self.constant: Optional[bool] = None  # the label when training saw only one class

    def params(self) -> dict[str, Any]:
        """Constructor arguments (saved with the model)."""
        return {
            "n_features": self.n_features,
            "C": self.C,
            "threshold": self.threshold,
            "class_weight": self.class_weight,
            "max_iter": self.max_iter,
            "dense_weight": self.dense_weight,
        }

    def _vectorizer(self) -> Any:
        from sklearn.feature_extraction.text import HashingVectorizer

        return HashingVectorizer(
            n_features=self.n_features,
            analyzer="word",
            ngram_range=(1, 2),
            lowercase=True,
            token_pattern=r"(?u)\b\w+\b|[^\w\s]",
            alternate_sign=False,
            norm="l2",
        )

    def features(self, docs_lines: Sequence[Sequence[str]]) -> Any:
        """The sparse feature matrix of all lines of ``docs_lines`` (documents in order)."""
        from scipy import sparse

        flat = [line for lines in docs_lines for line in lines]
        text = self._vectorizer().transform(flat)
        dense = np.vstack([layout_features(lines) for lines in docs_lines if lines]) if flat else np.zeros((0, LAYOUT_FEATURES))
        return sparse.hstack([text, sparse.csr_matrix(dense * self.dense_weight)], format="csr")

    def fit(self, docs: Sequence[tuple[str, ProgramLike]]) -> "LineTagger":
        """Train on ``(raw, program)`` pairs."""
        from sklearn.linear_model import LogisticRegression

        if not docs:
            raise ValueError("no training documents")
        docs_lines = [raw.split("\n") for raw, _ in docs]
        labels = np.array([flag for raw, program in docs for flag in line_labels(raw, program)], dtype=np.int64)
        filled = np.array([bool(line.strip()) for lines in docs_lines for line in lines], dtype=bool)
        if not filled.any():
            raise ValueError("no non-blank line in the training documents")
        labels = labels[filled]
        classes = set(labels.tolist())
        if len(classes) == 1:
            self.classifier, self.constant = None, bool(labels[0])
            return self
        classifier = LogisticRegression(
            C=self.C, solver="liblinear", max_iter=self.max_iter, class_weight=self.class_weight
        )
        classifier.fit(self.features(docs_lines)[filled], labels)
        self.classifier, self.constant = classifier, None
        return self

    def _check_fitted(self) -> None:
        if self.classifier is None and self.constant is None:
            raise RuntimeError("the tagger is not fitted")

    def predict_proba(self, raw: str) -> np.ndarray:
        """Removal probability of every line of ``raw``."""
        self._check_fitted()
        lines = raw.split("\n")
        if self.classifier is None:
            return np.full(len(lines), 1.0 if self.constant else 0.0)
        return self.classifier.predict_proba(self.features([lines]))[:, 1]

    def predict_lines(self, raw: str) -> list[bool]:
        """Per line of ``raw``: whether it is removed (blank lines follow the line above)."""
        removed = [bool(p > self.threshold) for p in self.predict_proba(raw)]
        settle_blank_lines(raw.split("\n"), removed)
        return removed

    def predict_program(self, raw: str) -> Program:
        """The tagger's program for ``raw`` (only ``remove_lines``, or ``keep_all()``)."""
        return program_from_labels(self.predict_lines(raw))

    def save(self, path: Union[str, os.PathLike[str]]) -> None:
        """Write the tagger with joblib."""
        import joblib

        self._check_fitted()
        joblib.dump(
            {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "params": self.params(),
                "classifier": self.classifier,
                "constant": self.constant,
            },
            str(path),
        )

    @classmethod
    def load(cls, path: Union[str, os.PathLike[str]]) -> "LineTagger":
        """Read a tagger written by :meth:`save` (only load trusted files: joblib unpickles)."""
        import joblib

        data = joblib.load(str(path))
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path} is not a saved LineTagger")
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported LineTagger version {data.get('version')!r}")
        tagger = cls(**data["params"])
        tagger.classifier = data["classifier"]
        tagger.constant = data["constant"]
        return tagger


CHECKPOINT_FILE = "line_tagger.joblib"
ENCODER = "linear"


def save_checkpoint(tagger: LineTagger, out_dir: Union[str, os.PathLike[str]], max_tokens: int = 20000) -> None:
    """The tagger as a refine-model checkpoint (the ``linear`` tier of :mod:`refinex.model.tiers`):
    ``line_tagger.joblib``, a ``refinex_model.json`` naming it, and a whitespace chunk counter
    (whole documents up to ``max_tokens`` words), so ``refinex refine --model <dir>`` runs it
    through the same stage as every model."""
    import json

    from refinex.model.bases import BASE_INFO_FILE
    from refinex.model.train import MODEL_INFO_FILE, MODEL_INFO_FORMAT

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tagger.save(out / CHECKPOINT_FILE)
    (out / BASE_INFO_FILE).write_text(json.dumps({"base": "line-tagger", "kind": "hashed", "counter": {
        "kind": "whitespace", "max_tokens": int(max_tokens)}}, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    info = {"format": MODEL_INFO_FORMAT, "head": "tag", "encoder": ENCODER, "tier": ENCODER,
            "linear": {"params": tagger.params(), "threshold": tagger.threshold}}
    (out / MODEL_INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")


class LineTaggerBackend:
    """The line tagger as a refine backend (``generate(requests)``): each chunk's lines are
    classified alone (no page structure, no context beyond the layout features)."""

    name = "transformers"

    def __init__(self, tagger: LineTagger, config: Any = None) -> None:
        self.tagger = tagger
        self.config = config

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike[str]], config: Any = None, *, threshold: Optional[float] = None,
                        **_ignored: Any) -> "LineTaggerBackend":
        """Load a checkpoint written by :func:`save_checkpoint` (a trusted file: joblib unpickles)."""
        tagger = LineTagger.load(Path(path) / CHECKPOINT_FILE)
        if threshold is not None:
            tagger.threshold = float(threshold)
        return cls(tagger, config)

    def close(self) -> None:
        self.tagger = None  # type: ignore[assignment]

    def generate(self, requests: Sequence[Any]) -> list[str]:
        from refinex.program import render_program

        out = []
        for request in requests:
            if not request.lines:
                raise ValueError("the line tagger needs the chunk's raw lines (GenerationRequest.lines)")
            removed = self.tagger.predict_lines("\n".join(request.lines))
            program = program_from_labels(removed)
            ops = tuple(RemoveLines(op.start + request.first_line, op.end + request.first_line)
                        if isinstance(op, RemoveLines) else op for op in program.ops)
            out.append(render_program(Program(ops)))
        return out
