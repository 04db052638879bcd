"""Per-line page-structure features (refinex.dom)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from refinex.dom import DOM_FEATURE_NAMES, DOM_FEATURES, dom_line_features
from refinex.evaluation import load_pages
from refinex.text import html_to_text

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample" / "pages-sample.jsonl.gz"
COLUMN = {name: i for i, name in enumerate(DOM_FEATURE_NAMES)}

PAGE = """<html><body>
<nav class="main-menu"><ul><li><a href="/">Home</a></li><li><a href="/news">News</a></li></ul></nav>
<article class="post-content"><h1>The council votes</h1>
<p>The city council approved the new budget on Tuesday after a long debate.</p>
<p>Members said the <a href="/x">plan</a> would take effect next year.</p></article>
<div id="comments" class="comment-list"><p>Great article, thanks!</p></div>
<footer><p>Copyright 2026 Example News</p></footer>
</body></html>"""


def _features(html: str) -> tuple[list[str], np.ndarray]:
    lines = html_to_text(html).split("\n")
    return lines, dom_line_features(html, lines)


def _row(lines: list[str], features: np.ndarray, text: str) -> dict[str, float]:
    index = next(i for i, line in enumerate(lines) if text in line)
    return {name: float(features[index, column]) for name, column in COLUMN.items()}


def test_every_line_finds_its_element() -> None:
    lines, features = _features(PAGE)
    assert features.shape == (len(lines), DOM_FEATURES)
    for line, row in zip(lines, features):
        assert row[COLUMN["has_dom"]] == (1.0 if line.strip() else 0.0)


def test_the_features_say_where_a_line_sits() -> None:
    lines, features = _features(PAGE)
    home = _row(lines, features, "Home")
    assert home["in_nav"] == 1.0 and home["in_list"] == 1.0 and home["block_li"] == 1.0
    assert home["kw_nav"] == 1.0 and home["link_share"] == 1.0
    title = _row(lines, features, "The council votes")
    assert title["in_article"] == 1.0 and title["block_h1"] == 1.0 and title["in_nav"] == 0.0
    assert title["kw_content"] == 1.0
    body = _row(lines, features, "approved the new budget")
    assert body["block_p"] == 1.0 and body["link_share"] == 0.0
    linked = _row(lines, features, "would take effect")
    assert 0.0 < linked["link_share"] < 0.2  # "plan" of a long sentence
    comment = _row(lines, features, "Great article")
    assert comment["kw_comment"] == 1.0 and comment["in_article"] == 0.0
    footer = _row(lines, features, "Copyright")
    assert footer["in_footer"] == 1.0
    assert home["position"] < title["position"] < footer["position"]


def test_no_html_gives_zeros_and_the_text_only_path_works() -> None:
    lines = ["Home", "", "Some text"]
    for html in (None, "", "   "):
        features = dom_line_features(html, lines)
        assert features.shape == (3, DOM_FEATURES) and not features.any()
    assert dom_line_features(PAGE, []).shape == (0, DOM_FEATURES)


def test_lines_that_are_not_the_page_text_get_no_element() -> None:
    features = dom_line_features(PAGE, ["nothing like the page at all, zzzz qqqq", "Home"])
    assert features[0, COLUMN["has_dom"]] == 0.0


def test_hidden_content_is_not_matched() -> None:
    html = "<body><div style='display:none'>Secret words here</div><p>Visible words here</p></body>"
    lines, features = _features(html)
    assert lines == ["Visible words here"]
    assert features[0, COLUMN["has_dom"]] == 1.0 and features[0, COLUMN["block_p"]] == 1.0


def test_real_pages_match_nearly_every_line() -> None:
    found = lines_total = 0
    for page in load_pages(SAMPLE, limit=10):
        lines = html_to_text(page["html"]).split("\n")
        features = dom_line_features(page["html"], lines)
        filled = [i for i, line in enumerate(lines) if line.strip()]
        lines_total += len(filled)
        found += int(features[filled, COLUMN["has_dom"]].sum())
        assert 0.0 <= features.min() and features.max() <= 1.0
    assert found >= 0.99 * lines_total


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("<>/ab divpnavli=\"'x&;#\n")), max_size=300),
       st.lists(st.text(max_size=30), max_size=8))
def test_any_input_gives_bounded_features_and_never_raises(html: str, lines: list[str]) -> None:
    features = dom_line_features(html, lines)
    assert features.shape == (len(lines), DOM_FEATURES)
    assert np.isfinite(features).all() and ((features >= 0.0) & (features <= 1.0)).all()
