"""Snippet and bag-of-words scores (refinex.evaluation)."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from refinex.evaluation import (
    Counts,
    bow_counts,
    bow_scores,
    load_pages,
    normalize_ws,
    score_outputs,
    snippet_counts,
    snippet_scores,
    tokens,
)

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample" / "pages-sample.jsonl.gz"


def test_normalize_ws_and_tokens() -> None:
    assert normalize_ws("  a \n\t b\u00a0 c  ") == "a b c"
    assert tokens("Don't STOP-me, 2 times_x!") == ["don", "t", "stop", "me", "2", "times_x"]


def test_snippet_counts_hand_computed() -> None:
    output = "Title of the article\nFirst   paragraph\nof the body.\nShare this"
    gold = {
        "with": ["First paragraph of the body.", "Title of the", "missing sentence"],
        "without": ["Share this", "Cookie notice"],
    }
    # "First paragraph of the body." matches only after whitespace normalisation.
    assert snippet_counts(output, gold) == Counts(tp=2, fp=1, tn=1, fn=1)


def test_snippet_normalises_the_snippet_too() -> None:
    assert snippet_counts("a b c", {"with": ["  a\n b  "], "without": []}) == Counts(tp=1)
    assert snippet_counts("", {"with": ["x"], "without": ["y"]}) == Counts(tn=1, fn=1)


def test_snippet_scores_are_micro_averaged() -> None:
    scores = snippet_scores([Counts(tp=2, fp=1, tn=1, fn=1), Counts(tp=1, fp=0, tn=3, fn=2)])
    assert scores.counts == Counts(tp=3, fp=1, tn=4, fn=3)
    assert scores.pages == 2
    assert scores.precision == pytest.approx(3 / 4)
    assert scores.recall == pytest.approx(3 / 6)
    assert scores.f1 == pytest.approx(2 * 0.75 * 0.5 / 1.25)
    assert scores.accuracy == pytest.approx(7 / 11)


def test_empty_aggregates_are_zero() -> None:
    s = snippet_scores([])
    assert (s.precision, s.recall, s.f1, s.accuracy, s.pages) == (0.0, 0.0, 0.0, 0.0, 0)
    b = bow_scores([])
    assert (b.precision, b.recall, b.f1, b.pages) == (0.0, 0.0, 0.0, 0)


def test_bow_counts_use_multiset_intersection() -> None:
    # output: the x3, cat, sat, on, mat, end (8 tokens)
    # gold: the x2, cat x2, sat x1 (5 tokens) -> overlap the 2 + cat 1 + sat 1 = 4
    assert bow_counts("The cat sat on the mat, the end", "the CAT the cat sat") == (4, 8, 5)
    assert bow_counts("", "gold words") == (0, 0, 2)


def test_bow_scores_sum_over_pages() -> None:
    scores = bow_scores([(4, 8, 5), (1, 2, 5)])
    assert (scores.overlap, scores.output_tokens, scores.gold_tokens) == (5, 10, 10)
    assert scores.precision == pytest.approx(0.5)
    assert scores.recall == pytest.approx(0.5)
    assert scores.f1 == pytest.approx(0.5)


def _pages() -> list[dict[str, object]]:
    return [
        {"id": "t1", "source": "trafilatura-eval", "gold": {"with": ["keep me"], "without": ["drop me"]}},
        {"id": "t2", "source": "trafilatura-eval", "gold": {"with": ["other"], "without": []}},
        {"id": "s1", "source": "scrapinghub-aeb", "gold": {"article_body": "a b c d"}},
        {"id": "x1", "source": "elsewhere", "gold": {}},
    ]


def test_score_outputs_both_families() -> None:
    result = score_outputs(_pages(), {"t1": "keep me\ndrop me", "s1": "a b z", "x1": "?"})
    assert (result["pages"], result["missing"], result["other"]) == (4, 1, 1)
    snippet = result["snippet"]
    assert (snippet["tp"], snippet["fp"], snippet["tn"], snippet["fn"]) == (1, 1, 0, 1)
    assert snippet["pages"] == 2
    assert snippet["precision"] == pytest.approx(0.5)
    bow = result["bow"]
    assert (bow["overlap"], bow["output_tokens"], bow["gold_tokens"], bow["pages"]) == (2, 3, 4, 1)
    assert bow["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))


def test_score_outputs_can_skip_missing_pages() -> None:
    result = score_outputs(_pages(), {"t1": "keep me"}, missing="skip")
    assert result["missing"] == 3  # t2, s1 and x1
    assert result["snippet"]["pages"] == 1
    assert result["bow"]["pages"] == 0
    with pytest.raises(ValueError):
        score_outputs(_pages(), {}, missing="ignore")


def test_load_pages_plain_gzip_and_limit(tmp_path: Path) -> None:
    rows = [{"id": str(i), "source": "s", "html": "", "gold": {}} for i in range(3)]
    plain = tmp_path / "p.jsonl"
    plain.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    packed = tmp_path / "p.jsonl.gz"
    with gzip.open(packed, "wt", encoding="utf-8") as fh:
        fh.write(plain.read_text(encoding="utf-8"))
    assert [p["id"] for p in load_pages(plain)] == ["0", "1", "2"]
    assert [p["id"] for p in load_pages(packed, limit=2)] == ["0", "1"]
    assert list(load_pages(packed, limit=0)) == []


def test_sample_file_scores_gold_as_perfect() -> None:
    pages = list(load_pages(SAMPLE))
    assert len(pages) == 40
    assert {p["source"] for p in pages} == {"trafilatura-eval", "scrapinghub-aeb"}
    gold_text = {
        p["id"]: "\n".join(p["gold"]["with"]) if "with" in p["gold"] else p["gold"]["article_body"]
        for p in pages
    }
    result = score_outputs(pages, gold_text)
    assert result["snippet"]["recall"] == 1.0
    assert result["bow"]["f1"] == 1.0
