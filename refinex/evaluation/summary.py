"""One document's evaluation counts, and the ``evaluations`` figures of summed counts (pure).

The ``evaluate`` stage computes :func:`document_counts` per document on the workers, sums
the counts per scope in Spark (every count is additive), and turns each scope's sums into
the metric columns of an ``evaluations`` row with :func:`scope_metrics`. Both halves are
plain Python so that tests, notebooks and the promotion gates get the same numbers without
Spark.

Gold decides the score families by its shape, which is the shared README's rule by source:
``{"with": [...], "without": [...]}`` (``trafilatura-eval``) scores snippets,
``{"article_body": ...}`` (``scrapinghub-aeb``) scores bag-of-words, and a page with both
(``wcxb``) counts in both.
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Optional, Union

from refinex.evaluation.reliability import (
    DeletionAgreement,
    Reliability,
    deletion_mask,
    new_words,
    reliability_flags,
)
from refinex.evaluation.scores import Counts, bow_counts, bow_scores, snippet_counts, snippet_scores

SNIPPET = "snippet"
BOW = "bow"

COUNT_COLUMNS: tuple[str, ...] = (
    "documents", "gold_documents",
    # gold: refined output (score family by the gold's shape) and the raw text (baseline)
    "snippet_pages", "snippet_tp", "snippet_fp", "snippet_tn", "snippet_fn",
    "raw_snippet_tp", "raw_snippet_fp", "raw_snippet_tn", "raw_snippet_fn",
    "bow_pages", "bow_overlap", "bow_output_tokens", "bow_gold_tokens",
    "raw_bow_overlap", "raw_bow_output_tokens",
    # deletions against the expert (documents with an expert reference)
    "compared", "model_deleted", "expert_deleted", "both_deleted",
    # reliability
    "new_words", "untouched", "emptied", "fallback", "invalid",
)
"""The additive per-document counts, in the order the stage's worker schema lists them."""

METRIC_COLUMNS: tuple[str, ...] = (
    "documents", "gold_pages", "snippet_precision", "snippet_recall", "snippet_f1", "snippet_accuracy",
    "bow_pages", "bow_precision", "bow_recall", "bow_f1", "raw_snippet_recall", "raw_snippet_f1", "raw_bow_f1",
    "deletion_precision", "deletion_recall", "deletion_f1", "new_words", "untouched_share", "emptied_share",
    "fallback_share", "invalid_share", "deletion_ratio_mean", "deletion_ratio_p50", "deletion_ratio_p90",
)
"""The figures of one ``evaluations`` row (its columns, less the keys and bookkeeping)."""

Gold = Mapping[str, Any]


def parse_gold(value: Union[str, Gold, None]) -> Optional[Gold]:
    """A page's gold as a mapping (from its JSON text), None when there is none, it is not
    JSON, or it has neither shape (data, never code: only ``json.loads``)."""
    if value is None:
        return None
    try:
        gold = json.loads(value) if isinstance(value, str) else value
    except ValueError:  # not JSON (a pages file whose gold is a bare string): no gold
        return None
    return gold if isinstance(gold, Mapping) and gold_families(gold) else None


def gold_families(gold: Optional[Gold]) -> tuple[str, ...]:
    """The score families of a page's gold: ``snippet``, ``bow``, both, or none (see the
    module docstring)."""
    if not gold:
        return ()
    families = []
    if isinstance(gold.get("with"), list) or isinstance(gold.get("without"), list):
        families.append(SNIPPET)
    if isinstance(gold.get("article_body"), str):
        families.append(BOW)
    return tuple(families)


def document_counts(
    raw: str,
    refined_text: Optional[str],
    status: str,
    parse_errors: Optional[int] = None,
    program: Optional[str] = None,
    expert_program: Optional[str] = None,
    gold: Optional[Gold] = None,
    guardrails: Any = None,
) -> dict[str, int]:
    """The :data:`COUNT_COLUMNS` of one document.

    ``refined_text``/``status``/``parse_errors`` are the origin's ``refined_documents`` row
    (a missing output scores as ``""``); ``program`` is the program it executed and
    ``expert_program`` the distilled expert's (None: no deletion comparison for this
    document); ``guardrails`` are those the expert's program is executed under.
    """
    counts = dict.fromkeys(COUNT_COLUMNS, 0)
    counts["documents"] = 1
    output = refined_text if refined_text is not None else ""
    families = gold_families(gold)
    counts["gold_documents"] = int(bool(families))
    if SNIPPET in families:
        assert gold is not None
        for prefix, text in (("snippet", output), ("raw_snippet", raw)):
            c = snippet_counts(text, gold)
            counts.update({f"{prefix}_tp": c.tp, f"{prefix}_fp": c.fp, f"{prefix}_tn": c.tn, f"{prefix}_fn": c.fn})
        counts["snippet_pages"] = 1
    if BOW in families:
        assert gold is not None
        overlap, out, gold_tokens = bow_counts(output, gold["article_body"])
        raw_overlap, raw_out, _ = bow_counts(raw, gold["article_body"])
        counts.update(bow_pages=1, bow_overlap=overlap, bow_output_tokens=out, bow_gold_tokens=gold_tokens,
                      raw_bow_overlap=raw_overlap, raw_bow_output_tokens=raw_out)
    if expert_program is not None:
        agreement = DeletionAgreement.of(
            deletion_mask(program, raw, status), deletion_mask(expert_program, raw, None, guardrails)
        )
        counts.update(compared=1, model_deleted=agreement.model_deleted, expert_deleted=agreement.expert_deleted,
                      both_deleted=agreement.both_deleted)
    counts["new_words"] = new_words(raw, refined_text)
    flags = reliability_flags(status, refined_text, parse_errors)
    counts.update(untouched=int(flags.untouched), emptied=int(flags.emptied), fallback=int(flags.fallback),
                  invalid=int(flags.invalid))
    return counts


def scope_metrics(totals: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`METRIC_COLUMNS` of one scope from its summed counts.

    ``totals`` holds the summed :data:`COUNT_COLUMNS` and, computed in Spark, the
    ``deletion_ratio_mean``/``_p50``/``_p90``. A score family without pages, and the
    deletion figures without compared documents, are None (not 0: nothing was measured).
    """
    def n(key: str) -> int:
        return int(totals.get(key) or 0)

    out: dict[str, Any] = dict.fromkeys(METRIC_COLUMNS)
    out["documents"] = n("documents")
    out["gold_pages"] = n("gold_documents")
    out["bow_pages"] = n("bow_pages")
    if n("snippet_pages"):
        refined = snippet_scores([Counts(n("snippet_tp"), n("snippet_fp"), n("snippet_tn"), n("snippet_fn"))])
        raw = snippet_scores([Counts(n("raw_snippet_tp"), n("raw_snippet_fp"), n("raw_snippet_tn"),
                                     n("raw_snippet_fn"))])
        out.update(snippet_precision=refined.precision, snippet_recall=refined.recall, snippet_f1=refined.f1,
                   snippet_accuracy=refined.accuracy, raw_snippet_recall=raw.recall, raw_snippet_f1=raw.f1)
    if n("bow_pages"):
        refined_bow = bow_scores([(n("bow_overlap"), n("bow_output_tokens"), n("bow_gold_tokens"))])
        raw_bow = bow_scores([(n("raw_bow_overlap"), n("raw_bow_output_tokens"), n("bow_gold_tokens"))])
        out.update(bow_precision=refined_bow.precision, bow_recall=refined_bow.recall, bow_f1=refined_bow.f1,
                   raw_bow_f1=raw_bow.f1)
    if n("compared"):
        agreement = DeletionAgreement(n("model_deleted"), n("expert_deleted"), n("both_deleted"), n("compared"))
        out.update(deletion_precision=agreement.precision, deletion_recall=agreement.recall,
                   deletion_f1=agreement.f1)
    out["new_words"] = n("new_words")
    out.update(Reliability(n("documents"), n("untouched"), n("emptied"), n("fallback"), n("invalid")).shares())
    for key in ("deletion_ratio_mean", "deletion_ratio_p50", "deletion_ratio_p90"):
        value = totals.get(key)
        out[key] = None if value is None else float(value)
    return out
