"""The consensus expert: exact deletion masks, the weighted vote, and the expert end to end."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refinex.experts import get_expert
from refinex.experts.base import FAILED, OK, ExpertInput, ExpertOutput
from refinex.experts.consensus import (
    ConsensusExpert,
    DeletionMask,
    MemberSpec,
    VoteTable,
    mask_from_program,
)
from refinex.experts.llm import LLMConfig, LLMExpert
from refinex.program import Guardrails, KeepAll, Program, RemoveLines, RemoveStr, execute

from .chat_stub_server import INVENTED_SENTENCE, ChatStubServer

PERMISSIVE = Guardrails(max_error_ratio=1.0, min_kept_chars=0)
DEV_PAGES = Path(__file__).resolve().parents[3] / "shared" / "data" / "webpages-dev.jsonl.gz"

RAW = "\n".join(
    [
        "Home | News | Sport | Contact",  # 0 navigation
        "Cookie notice: we use cookies. Accept",  # 1
        "",  # 2
        "Storm hits the coast",  # 3 title
        "The storm reached the coast on Monday. Share this article",  # 4 content + share
        "Residents were told to stay indoors.",  # 5
        "Related: Ten tips for winter",  # 6
        "© 2024 Example News",  # 7
    ]
)


class FuncExpert:
    """A member whose refinement is a function of the document (or an exception)."""

    def __init__(self, name: str, fn: Callable[[ExpertInput], Optional[str]], version: str = "1") -> None:
        self.name = name
        self.version = version
        self.fn = fn
        self.calls = 0

    def refine_batch(self, docs: Sequence[ExpertInput]) -> list[ExpertOutput]:
        self.calls += 1
        outs = []
        for doc in docs:
            text = self.fn(doc)
            outs.append(ExpertOutput(doc.doc_id, text) if text is not None else ExpertOutput(doc.doc_id, None, FAILED, "nope"))
        return outs


def keep_lines(*ids: int) -> Callable[[ExpertInput], str]:
    return lambda doc: "\n".join(line for i, line in enumerate(doc.text.split("\n")) if i in ids)


def is_subsequence(small: str, big: str) -> bool:
    it = iter(big)
    return all(ch in it for ch in small)


# -- masks ---------------------------------------------------------------------------------


@st.composite
def raw_and_program(draw: st.DrawFn) -> tuple[str, Program]:
    lines = draw(st.lists(st.text(alphabet="ab |", max_size=12), min_size=1, max_size=8))
    n = len(lines)
    ops: list = []
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["lines", "str", "keep"]))
        if kind == "lines":
            a = draw(st.integers(-1, n))
            ops.append(RemoveLines(a, draw(st.integers(a - 1, n))))
        elif kind == "str":
            line = draw(st.integers(-1, n))
            source = lines[line] if 0 <= line < n else "ab"
            start = draw(st.integers(0, len(source)))
            text = source[start : start + draw(st.integers(0, 4))] or draw(st.sampled_from(["a", "zz", ""]))
            ops.append(RemoveStr(line, text))
        else:
            ops.append(KeepAll())
    return "\n".join(lines), Program(tuple(ops))


@settings(max_examples=400, deadline=None)
@given(raw_and_program())
def test_mask_reproduces_execution_exactly(case: tuple[str, Program]) -> None:
    raw, program = case
    mask = mask_from_program(program, raw, blank_is_removed=False)
    assert mask.apply(raw) == execute(program, raw, PERMISSIVE).text
    single = VoteTable.build(raw, [mask_from_program(program, raw)]).decide([1.0], 1.0)
    assert single is not None and is_subsequence(single, raw)


def test_mask_marks_lines_left_blank_as_removed() -> None:
    raw = "keep me\n  Share  \nend"
    mask = mask_from_program(Program((RemoveStr(1, "Share"),)), raw)
    assert mask.removed == frozenset({1}) and not mask.spans
    assert mask.chars_deleted(raw.split("\n")) == len("  Share  ")


# -- the vote ------------------------------------------------------------------------------


def _mask(raw: str, *ops) -> DeletionMask:
    return mask_from_program(Program(tuple(ops)), raw)


def test_line_votes_follow_weights_and_threshold() -> None:
    raw = "a\nb\nc"
    masks = [_mask(raw, RemoveLines(0, 1)), _mask(raw, RemoveLines(0, 0)), _mask(raw, KeepAll())]
    table = VoteTable.build(raw, masks)
    assert table.decide([1, 1, 1], 0.5) == "b\nc"  # line 0: 2/3, line 1: 1/3
    assert table.decide([1, 1, 1], 0.3) == "c"
    assert table.decide([1, 1, 1], 1.0) == "a\nb\nc"
    assert table.decide([3, 1, 1], 0.5) == "c"  # the heavy member decides alone
    assert table.decide([0, 0, 1], 0.5) == "a\nb\nc"


def test_span_votes_are_exact_within_a_line() -> None:
    raw = "Storm news | Share this | Tweet\nbody"
    a = _mask(raw, RemoveStr(0, " | Share this | Tweet"))
    b = _mask(raw, RemoveStr(0, " | Share this"))
    c = _mask(raw, RemoveStr(0, " | Tweet"))
    table = VoteTable.build(raw, [a, b, c])
    # " | Share this": a and b (2/3); " | Tweet": a and c (2/3)
    assert table.decide([1, 1, 1], 0.6) == "Storm news\nbody"
    assert table.decide([1, 1, 1], 0.7) == raw
    assert table.decide([1, 2, 0], 0.6) == "Storm news | Tweet\nbody"


def test_abstaining_members_do_not_count() -> None:
    raw = "nav\ncontent"
    table = VoteTable.build(raw, [_mask(raw, RemoveLines(0, 0)), None, None])
    assert table.decide([1, 5, 5], 0.5) == "content"
    assert VoteTable.build(raw, [None, None]).decide([1, 1], 0.5) is None


def test_line_removal_and_spans_combine() -> None:
    raw = "x | menu\ny"
    table = VoteTable.build(raw, [_mask(raw, RemoveLines(0, 0)), _mask(raw, RemoveStr(0, " | menu"))])
    assert table.decide([1, 1], 0.5) == "y"  # half the weight removes the line
    assert table.decide([1, 1], 0.6) == "x\ny"  # the span has both votes, "x" only one
    assert table.decide([1, 1], 1.0) == "x\ny"
    assert table.decide([2, 1], 0.6) == "y"


# -- the expert ----------------------------------------------------------------------------


def _unshare(fn: Callable[[ExpertInput], str]) -> Callable[[ExpertInput], str]:
    return lambda doc: fn(doc).replace(" Share this article", "")


def _experts() -> list[tuple[FuncExpert, float]]:
    return [
        (FuncExpert("a", _unshare(keep_lines(3, 4, 5))), 1.0),
        (FuncExpert("b", keep_lines(3, 4, 5, 6)), 1.0),
        (FuncExpert("c", _unshare(keep_lines(3, 4, 5, 7))), 1.0),
    ]


def test_consensus_output_is_a_pure_deletion_that_distills_exactly() -> None:
    from refinex.distill import distill

    expert = ConsensusExpert(experts=_experts(), threshold=0.5)
    [result] = expert.refine_batch_with_members([ExpertInput("d", RAW)])
    out = result.output
    assert out.status == OK
    text = out.refined_text or ""
    assert text.split("\n") == [
        "Storm hits the coast",
        "The storm reached the coast on Monday.",
        "Residents were told to stay indoors.",
    ]
    assert is_subsequence(text, RAW)
    assert execute(distill(RAW, text), RAW, PERMISSIVE).text == text
    assert [m.name for m in result.members] == ["a", "b", "c"] and all(m.voted for m in result.members)


def test_members_detail_records_every_member() -> None:
    experts = _experts() + [(FuncExpert("broken", lambda d: None), 2.0)]
    expert = ConsensusExpert(experts=experts, threshold=0.5)
    [result] = expert.refine_batch_with_members([ExpertInput("d", RAW)])
    detail = json.loads(result.members_json())
    assert detail["voters"] == 3 and detail["threshold"] == 0.5
    by_name = {m["name"]: m for m in detail["members"]}
    assert by_name["broken"]["status"] == FAILED and by_name["broken"]["program"] is None
    assert by_name["a"]["status"] == OK and "remove_lines" in by_name["a"]["program"]
    assert by_name["a"]["lines_removed"] >= 4 and by_name["a"]["chars_deleted"] > 0
    assert result.output.status == OK  # the failing heavy member abstained


def test_member_exceptions_and_min_voters() -> None:
    class Exploding:
        name = "boom"
        version = "1"

        def refine_batch(self, docs: Sequence[ExpertInput]) -> list[ExpertOutput]:
            raise RuntimeError("kaput")

    one = FuncExpert("one", keep_lines(3))
    expert = ConsensusExpert(experts=[(Exploding(), 1.0), (one, 1.0)], threshold=0.5, min_voters=2)
    [out] = expert.refine_batch([ExpertInput("d", RAW)])
    assert out.status == FAILED and "boom" in (out.error or "") and "kaput" in (out.error or "")
    relaxed = ConsensusExpert(experts=[(Exploding(), 1.0), (one, 1.0)], threshold=0.5)
    [out] = relaxed.refine_batch([ExpertInput("d", RAW)])
    assert out.status == OK and out.refined_text == "Storm hits the coast"


def test_batch_order_and_single_call_per_member() -> None:
    experts = _experts()
    expert = ConsensusExpert(experts=experts)
    docs = [ExpertInput(f"d{i}", RAW.replace("Monday", f"day {i}")) for i in range(4)]
    outs = expert.refine_batch(docs)
    assert [o.doc_id for o in outs] == [d.doc_id for d in docs]
    assert all(f"day {i}" in (o.refined_text or "") for i, o in enumerate(outs))
    assert all(e.calls == 1 for e, _ in experts)


def test_llm_member_insertions_never_reach_the_output() -> None:
    with ChatStubServer() as server:
        llm = LLMExpert(LLMConfig(base_url=server.base_url, model="stub", trust_env=False))
        raw = RAW.replace("Monday", "Monday; the sky turned a strange colour")
        expert = ConsensusExpert(experts=[(llm, 1.0), (FuncExpert("a", keep_lines(3, 4, 5)), 1.0)], threshold=0.5)
        [result] = expert.refine_batch_with_members([ExpertInput("d", raw)])
    text = result.output.refined_text or ""
    assert result.output.status == OK and result.output.requests == 1 and result.output.tokens_in > 0
    assert INVENTED_SENTENCE not in text and "color " not in text
    assert "colour" in text and "Cookie" not in text
    assert not Counter(re.findall(r"\w+", text)) - Counter(re.findall(r"\w+", raw))
    assert INVENTED_SENTENCE in (result.members[0].output.refined_text or "")


def test_version_tracks_members_weights_and_threshold() -> None:
    base = ConsensusExpert(experts=_experts(), threshold=0.5)
    assert base.version == ConsensusExpert(experts=_experts(), threshold=0.5).version
    assert base.version != ConsensusExpert(experts=_experts(), threshold=0.6).version
    heavier = [(e, 2.0 if e.name == "a" else w) for e, w in _experts()]
    assert base.version != ConsensusExpert(experts=heavier, threshold=0.5).version
    assert base.describe()["members"][0] == {"name": "a", "version": "1", "weight": 1.0}


def test_configuration_validation() -> None:
    with pytest.raises(ValueError):
        ConsensusExpert(experts=_experts(), threshold=0.0)
    with pytest.raises(ValueError):
        ConsensusExpert()
    with pytest.raises(ValueError, match="unique"):
        ConsensusExpert(experts=[(FuncExpert("a", keep_lines(0)), 1.0)] * 2)
    with pytest.raises(ValueError):
        MemberSpec.parse({"name": "x", "wieght": 2})
    assert MemberSpec.parse("justext") == MemberSpec("justext")


def test_registry_builds_the_configured_consensus() -> None:
    expert = get_expert("consensus")
    assert isinstance(expert, ConsensusExpert)
    names = [e.name for e, _ in expert.members]
    assert "trafilatura" in names and "llm" not in names  # the LLM member is disabled by default
    assert expert.min_voters == 2 and 0 < expert.threshold <= 1
    custom = get_expert("consensus", threshold=0.7, members=[{"name": "line_rules", "weight": 2}], min_voters=1)
    assert isinstance(custom, ConsensusExpert)
    assert custom.threshold == 0.7 and [(e.name, w) for e, w in custom.members] == [("line_rules", 2.0)]
    with pytest.raises(ValueError, match="min_voters"):
        get_expert("consensus", members=["line_rules"])  # the file's min_voters is 2
    with pytest.raises(ValueError, match="unknown consensus settings"):
        get_expert("consensus", treshold=0.6)


@pytest.fixture(scope="module")
def dev_pages() -> Iterator[list[dict]]:
    if not DEV_PAGES.exists():
        pytest.skip(f"{DEV_PAGES} not available")
    from refinex.evaluation import load_pages

    yield list(load_pages(DEV_PAGES, limit=4))


def test_default_consensus_on_real_pages(dev_pages: list[dict]) -> None:
    from refinex.distill import distill
    from refinex.text import html_to_text

    expert = get_expert("consensus")
    docs = [ExpertInput(p["id"], html_to_text(p["html"]), p["html"]) for p in dev_pages]
    results = expert.refine_batch_with_members(docs)  # type: ignore[attr-defined]
    for doc, result in zip(docs, results):
        text = result.output.refined_text
        assert result.output.status == OK and text is not None
        assert len(text) < len(doc.text) and is_subsequence(text, doc.text)
        assert execute(distill(doc.text, text), doc.text, PERMISSIVE).text == text
        assert json.loads(result.members_json())["voters"] >= 5


# -- offline member experts ----------------------------------------------------------------

PAGE = """<html><head><title>t</title></head><body>
<nav><ul><li><a href="/">Home</a></li><li><a href="/news">News</a></li></ul></nav>
<div class="cookie-banner">We use cookies. Accept</div>
<article><h1>Storm hits the coast</h1>
<p>The storm reached the coast on Monday, and the wind brought down many old trees along the
promenade. Residents were told to stay indoors while the emergency services cleared the roads,
and the schools in the region stayed closed for the whole day because of the danger.</p>
<p>The weather service expects the wind to calm down by Wednesday, although more rain is likely
in the north of the country for the rest of the week, and it has asked people to keep away
from the beaches and the cliffs until the storm has passed completely.</p></article>
<div class="share-buttons">Share on Facebook | Tweet</div>
<footer>© 2024 Example News</footer>
</body></html>"""


@pytest.mark.parametrize("name", ["justext", "resiliparse", "readability", "dom_prune", "trafilatura_precision"])
def test_html_members_extract_the_article_and_need_html(name: str) -> None:
    from refinex.text import html_to_text

    expert = get_expert(name)
    text = html_to_text(PAGE)
    ok, missing = expert.refine_batch([ExpertInput("p", text, PAGE), ExpertInput("q", text)])
    assert ok.status == OK and "Residents were told to stay indoors" in (ok.refined_text or "")
    assert "© 2024" not in (ok.refined_text or "")
    assert missing.status == FAILED and missing.refined_text is None


def test_dom_prune_output_is_line_aligned_with_the_page_text() -> None:
    from refinex.text import html_to_text

    text = html_to_text(PAGE)
    [out] = get_expert("dom_prune").refine_batch([ExpertInput("p", text, PAGE)])
    kept = (out.refined_text or "").split("\n")
    assert is_subsequence(out.refined_text or "", text)
    assert not any(word in line for line in kept for word in ("Home", "cookies", "Tweet", "© 2024"))


def test_line_rules_delete_boilerplate_lines_only() -> None:
    raw = "\n".join(
        [
            "Home", "News", "Sport", "Weather",  # a run of menu-like lines
            "A big storm hits the coast",
            "The storm reached the coast on Monday and residents were told to stay indoors.",
            "Share on Facebook",
            "|  ·  |",
            "© 2024 Example News. All rights reserved.",
            "It is expected to calm down by Wednesday.",
        ]
    )
    [out] = get_expert("line_rules").refine_batch([ExpertInput("d", raw)])
    assert (out.refined_text or "").split("\n") == [
        "A big storm hits the coast",
        "The storm reached the coast on Monday and residents were told to stay indoors.",
        "It is expected to calm down by Wednesday.",
    ]
