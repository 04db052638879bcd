"""Quality scores against the gold annotations of the dev/eval pages (pure Python).

Two families, exactly as defined in ``shared/data/README.md``:

* **Snippet scores** (``trafilatura-eval`` pages). Output and snippets are
  whitespace-normalised (``re.sub(r"\\s+", " ", s).strip()``). A ``with`` snippet found as a
  substring of the output is a true positive, otherwise a false negative; a ``without``
  snippet found is a false positive, otherwise a true negative. Counts are summed over pages
  (micro average) before precision, recall, F1 and accuracy are computed.
* **Bag-of-words scores** (``scrapinghub-aeb`` pages). Tokens are
  ``re.findall(r"\\w+", s.lower())``; the overlap is the multiset intersection of output and
  gold tokens. Overlap, output and gold token counts are summed over pages; precision is
  overlap / output tokens, recall overlap / gold tokens.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

_WS = re.compile(r"\s+")
_WORD = re.compile(r"\w+")


def normalize_ws(text: str) -> str:
    """Collapse every run of whitespace to one space and strip the ends."""
    return _WS.sub(" ", text).strip()


def tokens(text: str) -> list[str]:
    """Lower-cased word tokens used by the bag-of-words scores."""
    return _WORD.findall(text.lower())


@dataclass(frozen=True)
class Counts:
    """Snippet confusion counts of one page (or summed over pages)."""

    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0

    def __add__(self, other: "Counts") -> "Counts":
        return Counts(
            self.tp + other.tp, self.fp + other.fp, self.tn + other.tn, self.fn + other.fn
        )


@dataclass(frozen=True)
class SnippetScores:
    """Micro-averaged snippet scores with the summed counts they come from."""

    precision: float
    recall: float
    f1: float
    accuracy: float
    counts: Counts
    pages: int


@dataclass(frozen=True)
class BowScores:
    """Micro-averaged bag-of-words scores with the summed token counts."""

    precision: float
    recall: float
    f1: float
    overlap: int
    output_tokens: int
    gold_tokens: int
    pages: int


def ratio(num: float, den: float) -> float:
    """``num / den``, or 0.0 when ``den`` is 0 (an empty count scores 0, not an error)."""
    return num / den if den else 0.0


def f1_score(precision: float, recall: float) -> float:
    """Harmonic mean of ``precision`` and ``recall`` (0.0 when both are 0)."""
    return ratio(2 * precision * recall, precision + recall)


def snippet_counts(output: str, gold: Mapping[str, Sequence[str]]) -> Counts:
    """Count found/missing ``with`` and ``without`` snippets of one page in ``output``."""
    text = normalize_ws(output)
    tp = fn = fp = tn = 0
    for snippet in gold.get("with", ()):
        if normalize_ws(snippet) in text:
            tp += 1
        else:
            fn += 1
    for snippet in gold.get("without", ()):
        if normalize_ws(snippet) in text:
            fp += 1
        else:
            tn += 1
    return Counts(tp=tp, fp=fp, tn=tn, fn=fn)


def bow_counts(output: str, article_body: str) -> tuple[int, int, int]:
    """``(overlap, output_tokens, gold_tokens)`` of one page (multiset intersection)."""
    out = Counter(tokens(output))
    gold = Counter(tokens(article_body))
    overlap = sum((out & gold).values())
    return overlap, sum(out.values()), sum(gold.values())


def snippet_scores(counts: Iterable[Counts]) -> SnippetScores:
    """Micro precision, recall, F1 and accuracy over per-page snippet counts."""
    total = Counts()
    pages = 0
    for c in counts:
        total = total + c
        pages += 1
    precision = ratio(total.tp, total.tp + total.fp)
    recall = ratio(total.tp, total.tp + total.fn)
    accuracy = ratio(total.tp + total.tn, total.tp + total.fp + total.tn + total.fn)
    return SnippetScores(precision, recall, f1_score(precision, recall), accuracy, total, pages)


def bow_scores(counts: Iterable[tuple[int, int, int]]) -> BowScores:
    """Micro precision, recall and F1 over per-page ``bow_counts`` triples."""
    overlap = out = gold = pages = 0
    for o, n_out, n_gold in counts:
        overlap += o
        out += n_out
        gold += n_gold
        pages += 1
    precision = ratio(overlap, out)
    recall = ratio(overlap, gold)
    return BowScores(precision, recall, f1_score(precision, recall), overlap, out, gold, pages)
