"""Dev/eval pages: loading and scoring refined outputs against their gold annotations.

Page files are gzip-compressed JSON lines with the fields ``id``, ``url``, ``source``,
``html`` and ``gold`` (see ``shared/data/README.md`` and ``data/sample/README.md``).
"""
from __future__ import annotations

import gzip
import json
import os
from dataclasses import asdict
from typing import Any, Iterable, Iterator, Mapping, Optional, Union

from refinex.evaluation.scores import (
    Counts,
    bow_counts,
    bow_scores,
    snippet_counts,
    snippet_scores,
)

SNIPPET_SOURCE = "trafilatura-eval"
BOW_SOURCE = "scrapinghub-aeb"

MISSING_EMPTY = "empty"  # a page without output is scored as an empty output
MISSING_SKIP = "skip"  # a page without output is left out of the scores


def load_pages(
    path: Union[str, "os.PathLike[str]"], limit: Optional[int] = None
) -> Iterator[dict[str, Any]]:
    """Yield the pages of a ``.jsonl`` or ``.jsonl.gz`` file in file order (at most ``limit``)."""
    if limit is not None and limit <= 0:
        return
    opener = gzip.open if os.fspath(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:  # type: ignore[operator]
        count = 0
        for line in fh:
            if not line.strip():
                continue
            yield json.loads(line)
            count += 1
            if limit is not None and count >= limit:
                return


def score_outputs(
    pages: Iterable[Mapping[str, Any]],
    outputs: Mapping[str, Optional[str]],
    missing: str = MISSING_EMPTY,
) -> dict[str, Any]:
    """Score ``outputs`` (page id -> text) on ``pages`` with both score families.

    Snippet scores come from ``trafilatura-eval`` pages, bag-of-words scores from
    ``scrapinghub-aeb`` pages; other sources are counted under ``other``. A page whose id is
    absent from ``outputs`` (or maps to ``None``) is scored as ``""`` by default, or left out
    with ``missing="skip"``; either way it is counted under ``missing``.
    """
    if missing not in (MISSING_EMPTY, MISSING_SKIP):
        raise ValueError(f"missing must be {MISSING_EMPTY!r} or {MISSING_SKIP!r}, not {missing!r}")
    snippet: list[Counts] = []
    bow: list[tuple[int, int, int]] = []
    n_pages = n_missing = n_other = 0
    for page in pages:
        n_pages += 1
        output = outputs.get(page["id"])
        if output is None:
            n_missing += 1
            if missing == MISSING_SKIP:
                continue
            output = ""
        gold = page["gold"]
        source = page.get("source")
        if source == SNIPPET_SOURCE:
            snippet.append(snippet_counts(output, gold))
        elif source == BOW_SOURCE:
            bow.append(bow_counts(output, gold["article_body"]))
        else:
            n_other += 1
    s = snippet_scores(snippet)
    b = bow_scores(bow)
    return {
        "pages": n_pages,
        "missing": n_missing,
        "other": n_other,
        "snippet": {
            "pages": s.pages,
            "precision": s.precision,
            "recall": s.recall,
            "f1": s.f1,
            "accuracy": s.accuracy,
            **asdict(s.counts),
        },
        "bow": {
            "pages": b.pages,
            "precision": b.precision,
            "recall": b.recall,
            "f1": b.f1,
            "overlap": b.overlap,
            "output_tokens": b.output_tokens,
            "gold_tokens": b.gold_tokens,
        },
    }
