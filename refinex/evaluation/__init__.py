"""Scores of refined text against the gold annotations of the dev/eval web pages."""
from __future__ import annotations

from refinex.evaluation.dev import load_pages, score_outputs
from refinex.evaluation.scores import (
    BowScores,
    Counts,
    SnippetScores,
    bow_counts,
    bow_scores,
    normalize_ws,
    snippet_counts,
    snippet_scores,
    tokens,
)

__all__ = [
    "BowScores",
    "Counts",
    "SnippetScores",
    "bow_counts",
    "bow_scores",
    "load_pages",
    "normalize_ws",
    "score_outputs",
    "snippet_counts",
    "snippet_scores",
    "tokens",
]
