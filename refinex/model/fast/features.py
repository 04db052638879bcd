"""What the fast tier reads of a line: hashed n-grams and dense features (no torch).

* **n-grams**: lowercased word unigrams and bigrams (words and single punctuation marks)
  and character 3- and 4-grams inside word boundaries, each family hashed into the same
  ``n_features`` buckets and L2-normalised (scikit-learn's stateless ``HashingVectorizer``:
  no vocabulary to fit or ship). Lines are cut to :data:`WORD_CHARS` / :data:`CHAR_CHARS`
  characters first: a line's first few hundred characters tell boilerplate from content,
  and a 500,000-character line costs no more than a long one.
* **page words**: where the page HTML is known, the line's tag path and the class/id/role
  words around it (:class:`refinex.dom.PageStructure` ``tokens``), hashed into the same
  buckets (its own L2 norm): ``name:sidebar`` or ``path:nav/ul/li/a`` say more than any
  fixed list of keywords.
* **dense**: the line's layout features (length, position, character classes, repetition;
  :data:`refinex.model.tagger.LAYOUT_FEATURES` columns) and its page-structure features
  (:data:`refinex.dom.DOM_FEATURES` columns, zeros when the page HTML is unknown).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional, Sequence

import numpy as np

from refinex.dom import DOM_FEATURES, PageStructure
from refinex.model.tagger import LAYOUT_FEATURES, layout_features

__all__ = ["CHAR_CHARS", "DENSE_FEATURES", "WORD_CHARS", "LineFeatures", "line_features"]


WORD_CHARS = 300
CHAR_CHARS = 200
DENSE_FEATURES = LAYOUT_FEATURES + DOM_FEATURES


def _identity(tokens: Any) -> Any:
    return tokens


@lru_cache(maxsize=8)
def _vectorizers(n_features: int) -> tuple[Any, Any, Any]:
    from sklearn.feature_extraction.text import HashingVectorizer

    words = HashingVectorizer(n_features=n_features, analyzer="word", ngram_range=(1, 2), lowercase=True,
                              token_pattern=r"(?u)\b\w+\b|[^\w\s]", alternate_sign=False, norm="l2")
    chars = HashingVectorizer(n_features=n_features, analyzer="char_wb", ngram_range=(3, 4), lowercase=True,
                              alternate_sign=False, norm="l2")
    page = HashingVectorizer(n_features=n_features, analyzer=_identity, alternate_sign=False, norm="l2")
    return words, chars, page


@dataclass(frozen=True)
class LineFeatures:
    """One document's lines as model inputs: a CSR matrix of hashed n-gram weights and the
    dense features, one row per line."""

    indices: np.ndarray  # int64, the non-zero buckets of all lines, line after line
    offsets: np.ndarray  # int64 (lines + 1,), where each line's buckets start (CSR indptr)
    weights: np.ndarray  # float32, the bucket weights
    dense: np.ndarray  # float32 (lines, DENSE_FEATURES)

    @property
    def n_lines(self) -> int:
        return int(self.dense.shape[0])

    def rows(self, start: int, end: int) -> "LineFeatures":
        """Lines ``start .. end - 1`` (a training window)."""
        a, b = int(self.offsets[start]), int(self.offsets[end])
        return LineFeatures(self.indices[a:b], self.offsets[start : end + 1] - a, self.weights[a:b],
                            self.dense[start:end], None if self.text_only is None else self.text_only.rows(start, end))

    text_only: Optional["LineFeatures"] = None  # the same lines without their page (set when they have one)

    def without_structure(self) -> "LineFeatures":
        """The same lines as a text-only corpus would give them (no page words, page columns zero)."""
        return self if self.text_only is None else self.text_only


def _bag(lines: Sequence[str], n_features: int, tokens: Optional[Sequence[Sequence[str]]]) -> Any:
    words, chars, page = _vectorizers(int(n_features))
    bag = words.transform([line[:WORD_CHARS] for line in lines]) + chars.transform([line[:CHAR_CHARS] for line in lines])
    if tokens is not None:
        bag = bag + page.transform([list(t) for t in tokens])
    bag = bag.tocsr()
    bag.sort_indices()
    return bag


def line_features(
    lines: Sequence[str], n_features: int, structure: Optional[PageStructure] = None, keep_text_only: bool = False,
) -> LineFeatures:
    """The :class:`LineFeatures` of a document's ``lines``; ``structure`` is the lines'
    :func:`refinex.dom.page_structure` (``None``: unknown, no page words and zeros).
    ``keep_text_only`` also keeps the lines' text-only features (training's structure dropout)."""
    if n_features < 2:
        raise ValueError(f"n_features must be >= 2, got {n_features}")
    lines = list(lines)
    if structure is not None and len(structure) != len(lines):
        raise ValueError(f"structure of {len(structure)} lines for {len(lines)} lines")
    dense = np.zeros((len(lines), DENSE_FEATURES), dtype=np.float32)
    if lines:
        dense[:, :LAYOUT_FEATURES] = layout_features(lines)
    text_only = None
    if structure is None or keep_text_only:
        text = _bag(lines, n_features, None)
        text_only = LineFeatures(text.indices.astype(np.int64), text.indptr.astype(np.int64),
                                 text.data.astype(np.float32), dense)
    if structure is None:
        return text_only
    full = dense.copy()
    full[:, LAYOUT_FEATURES:] = structure.features
    bag = _bag(lines, n_features, structure.tokens)
    return LineFeatures(bag.indices.astype(np.int64), bag.indptr.astype(np.int64), bag.data.astype(np.float32), full,
                        text_only)
