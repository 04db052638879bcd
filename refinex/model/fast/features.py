"""What the fast tier reads of a line: hashed n-grams and dense features (no torch).

* **n-grams**: lowercased word unigrams and bigrams (words and single punctuation marks)
  and character 3- and 4-grams inside word boundaries, each family hashed into the same
  ``n_features`` buckets and L2-normalised (scikit-learn's stateless ``HashingVectorizer``:
  no vocabulary to fit or ship). Lines are cut to :data:`WORD_CHARS` / :data:`CHAR_CHARS`
  characters first: a line's first few hundred characters tell boilerplate from content,
  and a 500,000-character line costs no more than a long one.
* **dense**: the line's layout features (length, position, character classes, repetition;
  :data:`refinex.model.tagger.LAYOUT_FEATURES` columns) and its page-structure features
  (:data:`refinex.dom.DOM_FEATURES` columns, zeros when the page HTML is unknown).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional, Sequence

import numpy as np

from refinex.dom import DOM_FEATURES
from refinex.model.tagger import LAYOUT_FEATURES, layout_features

__all__ = ["CHAR_CHARS", "DENSE_FEATURES", "WORD_CHARS", "LineFeatures", "line_features"]

WORD_CHARS = 300
CHAR_CHARS = 200
DENSE_FEATURES = LAYOUT_FEATURES + DOM_FEATURES


@lru_cache(maxsize=8)
def _vectorizers(n_features: int) -> tuple[Any, Any]:
    from sklearn.feature_extraction.text import HashingVectorizer

    words = HashingVectorizer(n_features=n_features, analyzer="word", ngram_range=(1, 2), lowercase=True,
                              token_pattern=r"(?u)\b\w+\b|[^\w\s]", alternate_sign=False, norm="l2")
    chars = HashingVectorizer(n_features=n_features, analyzer="char_wb", ngram_range=(3, 4), lowercase=True,
                              alternate_sign=False, norm="l2")
    return words, chars


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
                            self.dense[start:end])

    def without_structure(self) -> "LineFeatures":
        """The same lines as a text-only corpus would give them (page-structure columns zero)."""
        dense = self.dense.copy()
        dense[:, LAYOUT_FEATURES:] = 0.0
        return LineFeatures(self.indices, self.offsets, self.weights, dense)


def line_features(lines: Sequence[str], n_features: int, structure: Optional[np.ndarray] = None) -> LineFeatures:
    """The :class:`LineFeatures` of a document's ``lines``; ``structure`` is the lines'
    :func:`refinex.dom.dom_line_features` (``None``: unknown, zeros)."""
    if n_features < 2:
        raise ValueError(f"n_features must be >= 2, got {n_features}")
    lines = list(lines)
    if structure is not None and structure.shape != (len(lines), DOM_FEATURES):
        raise ValueError(f"structure has shape {structure.shape}, expected {(len(lines), DOM_FEATURES)}")
    words, chars = _vectorizers(int(n_features))
    bag = (words.transform([line[:WORD_CHARS] for line in lines])
           + chars.transform([line[:CHAR_CHARS] for line in lines])).tocsr()
    bag.sort_indices()
    dense = np.zeros((len(lines), DENSE_FEATURES), dtype=np.float32)
    if lines:
        dense[:, :LAYOUT_FEATURES] = layout_features(lines)
        if structure is not None:
            dense[:, LAYOUT_FEATURES:] = structure
    return LineFeatures(bag.indices.astype(np.int64), bag.indptr.astype(np.int64), bag.data.astype(np.float32), dense)
