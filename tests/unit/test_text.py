"""Page HTML -> visible text (refinex.text)."""
from __future__ import annotations

import time
from importlib.metadata import version
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refinex.evaluation import load_pages
from refinex.text import TEXT_EXTRACTOR_VERSION, html_to_text, normalize_text

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample" / "pages-sample.jsonl.gz"


def _assert_normalised(text: str) -> None:
    assert "\r" not in text
    assert "\n\n\n" not in text
    assert text == text.strip("\n")
    for line in text.split("\n"):
        assert line == line.rstrip()


def test_blocks_become_lines_and_inline_elements_join() -> None:
    html = (
        "<html><body><div>first block</div><div>a<span>b</span> c<b>d</b></div>"
        "<section>sec</section><article>art</article><nav>nav</nav></body></html>"
    )
    assert html_to_text(html) == "first block\nab cd\nsec\nart\nnav"


def test_paragraphs_and_headings_are_separated_by_one_blank_line() -> None:
    html = "<h1>Title</h1><p>one</p><p>two</p><div>three</div>"
    assert html_to_text(html) == "Title\n\none\n\ntwo\n\nthree"


def test_br_breaks_the_line() -> None:
    assert html_to_text("<div>line one<br>line two<br/>line three</div>") == (
        "line one\nline two\nline three"
    )


def test_invisible_content_is_hidden() -> None:
    html = (
        "<html><head><title>Head title</title><style>p{color:red}</style>"
        "<script>var inHead = 1;</script></head><body>"
        "<script>document.write('x')</script><style>.a{}</style><template>tpl</template>"
        "<noscript>Please enable JavaScript</noscript><select><option>opt</option></select>"
        "<div style='display: none'>styled hidden</div><div hidden>attr hidden</div>"
        "<span style='visibility:hidden'>invisible</span><p style='DISPLAY:None !important'>x</p>"
        "<ruby>漢<rp>(</rp><rt>kan</rt><rp>)</rp></ruby><p>visible</p></body></html>"
    )
    assert html_to_text(html) == "漢\n\nvisible"


def test_unclosed_tag_inside_noscript_does_not_swallow_the_page() -> None:
    html = "<body><noscript><div id='nojs'></noscript><div><p>Article text</p></div></body>"
    assert html_to_text(html) == "Article text"


def test_entities_are_decoded_and_whitespace_collapsed() -> None:
    html = "<p>Fish &amp; chips &eacute;t&eacute; &#8212; &lt;tag&gt;   spaced\n\tout&nbsp;x</p>"
    assert html_to_text(html) == "Fish & chips été — <tag> spaced out x"


def test_invisible_characters_are_removed() -> None:
    assert html_to_text("<p>Wer\u00adbung zero\u200bwidth\ufeff</p>") == "Werbung zerowidth"


def test_lists_tables_and_pre() -> None:
    html = (
        "<ul><li>one</li><li>two<ul><li>nested</li></ul></li><li></li></ul>"
        "<ol><li>first</li><li><p>second</p></li></ol>"
        "<table><tr><th>Name</th><th>Value</th></tr><tr><td>alpha</td><td>1</td></tr></table>"
        "<pre>def f():\n    return 1</pre>"
    )
    assert html_to_text(html) == (
        "- one\n- two\n- nested\n1. first\n\n2. second\n\nName Value\nalpha 1\n"
        "def f():\n    return 1"
    )


def test_layout_table_cells_are_not_interleaved() -> None:
    html = (
        "<table><tr><td><p>Menu one</p><p>Menu two</p></td>"
        "<td><p>Para one</p><p>Para two</p></td></tr></table>"
    )
    assert html_to_text(html) == "Menu one\n\nMenu two\n\nPara one\n\nPara two"


def test_no_indentation_from_nesting_or_inline_styles() -> None:
    html = "<div><div style='padding-left: 80px; margin-top: 5em'><blockquote>q</blockquote></div></div>"
    assert html_to_text(html) == "q"


@pytest.mark.parametrize(
    "html", [None, "", "   \n\t ", "<!-- only a comment -->", "<html></html>", "<script>x</script>"]
)
def test_empty_input_gives_empty_text(html: str | None) -> None:
    assert html_to_text(html) == ""


@pytest.mark.parametrize(
    "html,expected",
    [
        ("plain text without tags", "plain text without tags"),
        ("<<<>>>&&&", "<<<>>>&&&"),
        ("\x00\x01<p>nul\x00 bytes</p>", "nul bytes"),
        ("<p>lone \ud800 surrogate</p>", "lone \ufffd surrogate"),
        ("<?xml version='1.0' encoding='utf-8'?><html><p>xml decl</p></html>", "xml decl"),
        ("<div><p>unclosed <b>bold</div></span>&bogus; <p>tail", "unclosed bold\n\n&bogus;\n\ntail"),
        ("a\r\nb\rc", "a b c"),
    ],
)
def test_garbage_does_not_crash(html: str, expected: str) -> None:
    assert html_to_text(html) == expected


@pytest.mark.parametrize("depth", [300, 1500, 3000])
def test_deeply_nested_documents_keep_their_text(depth: int) -> None:
    html = "<div>" * depth + "deep<script>hidden()</script>" + "</div>" * depth + "<p>after &amp; more</p>"
    text = html_to_text(html)
    assert text.split() == ["deep", "after", "&", "more"]


def test_huge_document_is_handled_quickly() -> None:
    html = "<html><body>" + "".join(f"<div><p>paragraph {i} text</p></div>" for i in range(60_000))
    start = time.perf_counter()
    text = html_to_text(html)
    assert time.perf_counter() - start < 30
    assert text.count("\n") == 2 * 60_000 - 2
    assert text.startswith("paragraph 0 text\n\nparagraph 1 text")


_HTML_PIECES = st.sampled_from(
    list("<>/ab p=\"'&;#x\n\r\t\x00\u00a0\ud800")
    + ["<p>", "</div>", "<br>", "<li>", "<pre>", "<table>", "<td>", "<noscript>", "&amp;", "<!--"]
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_HTML_PIECES, max_size=60).map("".join))
def test_never_raises_and_output_is_normalised(html: str) -> None:
    _assert_normalised(html_to_text(html))


@given(st.text())
def test_normalize_text_is_idempotent_and_normalised(text: str) -> None:
    once = normalize_text(text)
    _assert_normalised(once)
    assert normalize_text(once) == once


def test_extractor_version_records_the_library() -> None:
    assert TEXT_EXTRACTOR_VERSION.startswith(f"inscriptis-{version('inscriptis')}+")


def test_real_sample_pages() -> None:
    pages = list(load_pages(SAMPLE, limit=3))
    assert len(pages) == 3
    for page in pages:
        text = html_to_text(page["html"])
        _assert_normalised(text)
        lines = [line for line in text.split("\n") if line]
        assert len(lines) >= 20, page["id"]
        assert len(text) < len(page["html"])
        assert "<script" not in text.lower()
