"""The trafilatura expert and the expert registry."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import trafilatura

from refinex.evaluation import load_pages
from refinex.experts import (
    EXPERT_FACTORIES,
    FAILED,
    OK,
    Expert,
    ExpertInput,
    available_experts,
    get_expert,
    register_expert,
)
from refinex.experts.html import TrafilaturaExpert, clean_label
from refinex.text import html_to_text

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "sample" / "pages-sample.jsonl.gz"

ARTICLE = (
    "<html><body><nav><a href='/'>Home</a> <a href='/news'>News</a></nav><article>"
    "<h1>A long article title</h1>"
    + "".join(
        f"<p>Paragraph {i} of the article has enough words to be recognised as main content "
        f"by the extractor, which needs a few sentences.</p>"
        for i in range(6)
    )
    + "</article><footer>Copyright 2024 Example Corp</footer></body></html>"
)


def test_expert_protocol_name_and_version() -> None:
    expert = TrafilaturaExpert()
    assert isinstance(expert, Expert)
    assert expert.name == "trafilatura"
    assert expert.version.startswith(f"trafilatura-{trafilatura.__version__}[")
    assert "comments=0" in expert.version and "tables=1" in expert.version
    assert TrafilaturaExpert(favor_precision=True).version != expert.version


def test_clean_label_drops_blank_lines_and_normalises() -> None:
    raw = "Title\r\n02.02.2022\n\n            \u2022\n\n   \n    Presse  \nWer\u00adbung\n"
    assert clean_label(raw) == "Title\n02.02.2022\n            \u2022\n    Presse\nWerbung"


def test_conflicting_options_are_rejected() -> None:
    with pytest.raises(ValueError):
        TrafilaturaExpert(favor_precision=True, favor_recall=True)


def test_refines_a_handcrafted_article() -> None:
    [out] = TrafilaturaExpert().refine_batch([ExpertInput("a", "", ARTICLE)])
    assert out.status == OK and out.error is None
    assert out.refined_text is not None
    assert "Paragraph 5 of the article" in out.refined_text
    assert "Copyright" not in out.refined_text
    assert out.latency_s > 0


def test_refines_a_real_sample_page() -> None:
    page = next(p for p in load_pages(SAMPLE) if p["source"] == "scrapinghub-aeb")
    text = html_to_text(page["html"])
    [out] = get_expert("trafilatura").refine_batch([ExpertInput(page["id"], text, page["html"])])
    assert out.status == OK, out.error
    assert out.refined_text
    assert 0 < len(out.refined_text) < len(text)
    assert "\r" not in out.refined_text


@pytest.mark.parametrize("html", [None, "", "   "])
def test_missing_html_fails_cleanly(html: str | None) -> None:
    [out] = TrafilaturaExpert().refine_batch([ExpertInput("d", "some text", html)])
    assert out.status == FAILED
    assert out.refined_text is None
    assert out.error and "no html" in out.error


@pytest.mark.parametrize("html", ["<<<>>>", "\x00\x01\x02", "<html><body></body></html>", "x" * 5])
def test_garbage_html_fails_cleanly(html: str) -> None:
    [out] = TrafilaturaExpert().refine_batch([ExpertInput("g", "", html)])
    assert out.status == FAILED
    assert out.refined_text is None
    assert out.error


def test_exceptions_inside_trafilatura_become_failed_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_args: object, **_kwargs: object) -> str:
        raise RuntimeError("parser exploded")

    monkeypatch.setattr(trafilatura, "extract", boom)
    [out] = TrafilaturaExpert().refine_batch([ExpertInput("e", "", ARTICLE)])
    assert out.status == FAILED
    assert out.error == "trafilatura raised RuntimeError: parser exploded"


def test_batch_keeps_order_and_isolates_failures() -> None:
    docs = [ExpertInput("ok1", "", ARTICLE), ExpertInput("bad", "", None), ExpertInput("ok2", "", ARTICLE)]
    outs = TrafilaturaExpert().refine_batch(docs)
    assert [o.doc_id for o in outs] == ["ok1", "bad", "ok2"]
    assert [o.status for o in outs] == [OK, FAILED, OK]
    assert TrafilaturaExpert().refine_batch([]) == []


def test_registry_builds_and_registers_experts() -> None:
    assert "trafilatura" in available_experts()
    expert = get_expert("trafilatura", favor_recall=True)
    assert isinstance(expert, TrafilaturaExpert) and expert.options.favor_recall
    with pytest.raises(ValueError, match="unknown expert"):
        get_expert("no-such-expert")
    with pytest.raises(ValueError):
        register_expert("broken", "no_colon_path")
    with pytest.raises(ValueError, match="already registered"):
        register_expert("trafilatura", lambda: TrafilaturaExpert())


def test_registry_accepts_callables_and_checks_the_protocol() -> None:
    try:
        register_expert("tmp-callable", lambda **kw: TrafilaturaExpert(**kw))
        assert isinstance(get_expert("tmp-callable", fast=True), TrafilaturaExpert)
        register_expert("tmp-not-expert", lambda: object())
        with pytest.raises(TypeError):
            get_expert("tmp-not-expert")
    finally:
        EXPERT_FACTORIES.pop("tmp-callable", None)
        EXPERT_FACTORIES.pop("tmp-not-expert", None)


def test_every_builtin_expert_path_resolves() -> None:
    import refinex.experts as registry

    for name in ("llm", "consensus", "justext", "resiliparse", "line_rules"):
        assert callable(registry._resolve(name))


def test_unknown_names_and_lazy_registration() -> None:
    with pytest.raises(ValueError, match="unknown expert 'nope'"):
        get_expert("nope")
    register_expert("tmp-lazy", "refinex.experts.html:TrafilaturaExpert")
    try:
        assert get_expert("tmp-lazy").name == "trafilatura"
        register_expert("tmp-lazy", "refinex.experts.html:TrafilaturaExpert")  # idempotent
    finally:
        EXPERT_FACTORIES.pop("tmp-lazy", None)


def test_importing_the_registry_is_light() -> None:
    code = (
        "import sys, refinex.experts; "
        "heavy = [m for m in ('trafilatura', 'inscriptis', 'lxml') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert result.stdout.strip() == ""
