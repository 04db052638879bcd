"""Deletion masks, agreement with the expert, new words, reliability and the per-document
evaluation counts (refinex.evaluation.reliability and .summary), on hand-made documents."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refinex.evaluation import score_outputs, tokens
from refinex.evaluation.reliability import (
    DeletionAgreement,
    DeletionMask,
    Reliability,
    deletion_agreement,
    deletion_mask,
    deletion_marks,
    deletion_ratio_summary,
    is_subsequence,
    marks_mask,
    nearest_rank,
    new_words,
    reliability,
    reliability_flags,
)
from refinex.evaluation.summary import COUNT_COLUMNS, METRIC_COLUMNS, document_counts, parse_gold, scope_metrics
from refinex.program import Guardrails, KeepAll, Program, RemoveLines, RemoveStr, execute, parse, render_program

RAW = "aa\nbb\ncc"  # offsets: "aa" 0-1, "\n" 2, "bb" 3-4, "\n" 5, "cc" 6-7
LENIENT = Guardrails(max_error_ratio=1.0, min_kept_chars=0)


# --- masks --------------------------------------------------------------------------------------


@pytest.mark.parametrize("program, spans", [
    ("remove_lines(1, 1)", ((3, 6),)),  # the line and the break after it
    ("remove_lines(2, 2)", ((5, 8),)),  # the last line takes the break before it
    ("remove_lines(1, 2)", ((2, 8),)),
    ("remove_lines(0, 0)\nremove_lines(2, 2)", ((0, 3), (5, 8))),
    ("remove_lines(0, 2)", ((0, 8),)),
    ('remove_str(0, "a")\nremove_str(0, "a")', ((0, 2),)),  # two occurrences, merged
    ('remove_lines(0, 0)\nremove_str(1, "b")', ((0, 4),)),  # adjacent spans merge
    ("keep_all()", ()),
    ("remove_lines(5, 6)", ()),  # rejected: deletes nothing
])
def test_mask_of_lines_and_spans(program: str, spans: tuple[tuple[int, int], ...]) -> None:
    mask = deletion_mask(program, RAW, guardrails=LENIENT)
    assert mask.spans == spans and mask.length == len(RAW)
    assert mask.apply(RAW) == execute(parse(program), RAW, LENIENT).text


def test_mask_follows_the_status() -> None:
    program = "remove_lines(0, 0)"
    assert deletion_mask(program, RAW, "refined").deleted == 3
    assert deletion_mask(program, RAW, "fallback_raw").deleted == 0
    assert deletion_mask(program, RAW, "dropped").deleted == len(RAW)
    for missing in ("no_program", "expert_failed"):
        assert deletion_mask(None, RAW, missing) == DeletionMask.everything(len(RAW))
    # Without a status the execution decides: the default guardrails drop what is left of RAW.
    assert deletion_mask(program, RAW).deleted == len(RAW)
    # A program of only parse errors falls back to the raw text.
    strict = Guardrails(max_error_ratio=0.5, min_kept_chars=0)
    mostly_errors = "nonsense\nremove_lines(0\nremove_lines(0, 1)"
    assert deletion_marks(mostly_errors, RAW, strict).status == "fallback_raw"
    assert deletion_mask(mostly_errors, RAW, guardrails=strict).deleted == 0
    with pytest.raises(ValueError, match="unknown status"):
        deletion_mask(program, RAW, "sideways")


def test_overlap_of_masks() -> None:
    a = DeletionMask(20, ((0, 5), (8, 12), (15, 20)))
    b = DeletionMask(20, ((3, 9), (11, 16)))
    # [3,5) + [8,9) + [11,12) + [15,16)
    assert a.overlap(b) == b.overlap(a) == 2 + 1 + 1 + 1
    assert a.overlap(DeletionMask.nothing(20)) == 0
    assert a.overlap(DeletionMask.everything(20)) == a.deleted == 14
    with pytest.raises(ValueError):
        a.overlap(DeletionMask(19))


# --- agreement ----------------------------------------------------------------------------------


def test_agreement_hand_computed() -> None:
    raw = "menu\nbody one\nbody two\nfooter"  # 4 + 1 + 8 + 1 + 8 + 1 + 6 = 29
    expert = deletion_mask("remove_lines(0, 0)\nremove_lines(3, 3)", raw, "refined")  # 5 + 7
    model = deletion_mask("remove_lines(0, 1)", raw, "refined")  # 5 + 9
    agreement = deletion_agreement([model], [expert])
    assert (agreement.model_deleted, agreement.expert_deleted, agreement.both_deleted) == (14, 12, 5)
    assert agreement.precision == pytest.approx(5 / 14) and agreement.recall == pytest.approx(5 / 12)
    assert agreement.f1 == pytest.approx(2 * 5 / 26)
    # A model that deletes everything finds all the expert deleted, at its precision.
    everything = deletion_agreement([DeletionMask.everything(len(raw))], [expert])
    assert everything.recall == 1.0 and everything.precision == pytest.approx(12 / 29)
    # One that deletes nothing has no precision to speak of and recall 0.
    nothing = deletion_agreement([DeletionMask.nothing(len(raw))], [expert])
    assert nothing.precision is None and nothing.recall == 0.0 and nothing.f1 == 0.0
    assert DeletionAgreement().f1 is None


def test_agreement_is_micro_summed() -> None:
    short = "x\n" + "y" * 8  # the model agrees on a small document ...
    long = "z" * 90 + "\nkeep this line"  # ... and misses the expert's long deletion
    model = [deletion_mask("remove_lines(0, 0)", short, "refined"), DeletionMask.nothing(len(long))]
    expert = [deletion_mask("remove_lines(0, 0)", short, "refined"),
              deletion_mask("remove_lines(0, 0)", long, "refined")]
    total = deletion_agreement(model, expert)
    assert total.documents == 2 and total.precision == 1.0
    assert total.recall == pytest.approx(2 / (2 + 91))  # not the mean of 1.0 and 0.0
    with pytest.raises(ValueError):
        deletion_agreement(model, expert[:1])


# --- new words ----------------------------------------------------------------------------------


def test_new_words() -> None:
    raw = "The quick brown fox\njumps over foo-bar"
    assert new_words(raw, "The quick fox\nover foo-bar") == 0
    assert new_words(raw, "The quick fox\nover foobar") == 0  # a deletion joined two words
    assert new_words(raw, "The quick red fox") == 1  # "red" was written in
    assert new_words(raw, "The the the quick fox") == 2  # more "the" than the raw text has
    assert new_words(raw, None) == 0 and new_words(raw, "") == 0
    # The token multiset alone would count the joined word: the subsequence test is what spares it.
    assert "foobar" not in tokens(raw)


def test_is_subsequence() -> None:
    assert is_subsequence("", "abc") and is_subsequence("ac", "abc") and is_subsequence("abc", "abc")
    assert not is_subsequence("ca", "abc") and not is_subsequence("abcd", "abc")
    long = "lorem ipsum " * 5000
    assert is_subsequence(long[: len(long) // 2] + long[-100:], long)
    assert not is_subsequence(long[:1000] + "Z" + long[2000:], long)


@st.composite
def texts_and_programs(draw: st.DrawFn) -> tuple[str, str]:
    lines = draw(st.lists(st.text(alphabet="ab -…", max_size=10), min_size=1, max_size=8))
    n = len(lines)
    line_id = st.integers(min_value=0, max_value=n)  # n: out of range
    needle = st.one_of(
        st.text(alphabet="ab -", min_size=1, max_size=3),
        st.builds(lambda i, a, b: lines[i % n][min(a, b):max(a, b)], line_id, st.integers(0, 10), st.integers(0, 10)),
    )
    op = st.one_of(st.builds(RemoveLines, line_id, line_id), st.builds(RemoveStr, line_id, needle), st.just(KeepAll()))
    garbage = st.sampled_from(["oops", "remove_lines(1", 'remove_str(0, "a)', "keep_all(1)"])
    program_lines = draw(st.lists(st.one_of(op.map(lambda o: render_program(Program((o,)))), garbage), max_size=10))
    return "\n".join(lines), "\n".join(program_lines)


@settings(max_examples=400, deadline=None)
@given(texts_and_programs(), st.floats(0.0, 1.0), st.integers(0, 12))
def test_any_program_on_any_text_adds_no_words_and_its_mask_rebuilds_the_output(
    case: tuple[str, str], max_error_ratio: float, min_kept_chars: int
) -> None:
    raw, program = case
    guardrails = Guardrails(max_error_ratio, min_kept_chars)
    result = execute(parse(program), raw, guardrails)
    assert new_words(raw, result.text) == 0
    mask = deletion_mask(program, raw, guardrails=guardrails)
    assert mask.apply(raw) == result.text and mask.deleted == result.chars_removed
    assert deletion_mask(program, raw, result.status, guardrails) == mask


@settings(max_examples=300, deadline=None)
@given(texts_and_programs())
def test_identical_programs_agree_completely(case: tuple[str, str]) -> None:
    raw, program = case
    model = deletion_mask(program, raw, guardrails=LENIENT)
    expert = deletion_mask(program, raw, guardrails=LENIENT)
    agreement = DeletionAgreement.of(model, expert)
    if model.deleted:
        assert agreement.precision == agreement.recall == agreement.f1 == 1.0
    else:
        assert agreement.precision is None and agreement.recall is None and agreement.f1 is None


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="abc \n", max_size=40), st.data())
def test_subsequence_of_random_deletions(text: str, data: st.DataObject) -> None:
    keep = data.draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
    kept = "".join(c for c, k in zip(text, keep) if k)
    assert is_subsequence(kept, text)
    assert not is_subsequence(kept + "Z", text)


def test_marks_mask_matches_the_marks() -> None:
    raw = "one two\nthree four\nfive"
    marks = deletion_marks('remove_lines(2, 2)\nremove_str(0, "two")\nremove_str(1, "four")', raw, LENIENT)
    assert marks_mask(marks).apply(raw) == marks.text == "one \nthree "


# --- reliability --------------------------------------------------------------------------------


def test_reliability_flags_and_shares() -> None:
    rows = [
        ("unchanged", "raw text", 0),
        ("refined", "some text", 1),  # parse errors: invalid
        ("fallback_raw", "raw text", 3),  # invalid and fell back
        ("dropped", "", 0),
        ("refined", "", 0),  # emptied although not dropped
        ("no_program", None, None),
    ]
    assert reliability_flags("fallback_raw", "x", None).invalid
    total = reliability(rows)
    assert total == Reliability(documents=6, untouched=1, emptied=2, fallback=1, invalid=2)
    assert total.shares() == {"untouched_share": 1 / 6, "emptied_share": 2 / 6, "fallback_share": 1 / 6,
                              "invalid_share": 2 / 6}
    assert Reliability().shares()["invalid_share"] is None


def test_deletion_ratio_summary() -> None:
    assert nearest_rank([0.1, 0.2, 0.3, 0.4], 0.5) == 0.2 and nearest_rank([0.1, 0.2, 0.3, 0.4], 0.9) == 0.4
    assert nearest_rank([0.7], 0.0) == 0.7
    summary = deletion_ratio_summary([0.4, None, 0.1, 0.3, 0.2])
    assert summary == {"deletion_ratio_mean": pytest.approx(0.25), "deletion_ratio_p50": 0.2,
                       "deletion_ratio_p90": 0.4}
    assert deletion_ratio_summary([None]) == dict.fromkeys(summary)
    with pytest.raises(ValueError):
        nearest_rank([], 0.5)


# --- per-document counts and scope figures ------------------------------------------------------

PAGE = ("Home | News | Contact\nRivers of the north carry cold water from the mountains to the sea in spring.\n"
        "Subscribe to our newsletter")
SNIPPETS = {"with": ["Rivers of the north"], "without": ["Home | News", "Subscribe to our newsletter"]}


def test_kept_with_and_removed_without_score_one() -> None:
    refined = execute(parse("remove_lines(0, 0)\nremove_lines(2, 2)"), PAGE, LENIENT).text
    counts = document_counts(PAGE, refined, "refined", 0, gold=SNIPPETS)
    metrics = scope_metrics(counts)
    assert metrics["snippet_precision"] == metrics["snippet_recall"] == metrics["snippet_f1"] == 1.0
    assert metrics["snippet_accuracy"] == 1.0 and metrics["gold_pages"] == 1 and metrics["bow_pages"] == 0
    # The raw text keeps the boilerplate: recall 1, precision 1/3.
    assert metrics["raw_snippet_recall"] == 1.0 and metrics["raw_snippet_f1"] == pytest.approx(0.5)
    assert metrics["bow_f1"] is None and metrics["raw_bow_f1"] is None and metrics["deletion_f1"] is None


def test_deleting_everything_recalls_nothing() -> None:
    counts = document_counts(PAGE, "", "dropped", 0, program="remove_lines(0, 2)", gold=SNIPPETS,
                             expert_program="remove_lines(0, 0)\nremove_lines(2, 2)")
    metrics = scope_metrics(counts)
    assert metrics["snippet_recall"] == 0.0 and metrics["snippet_precision"] == 0.0
    assert metrics["emptied_share"] == 1.0
    assert metrics["deletion_recall"] == 1.0  # it did delete everything the expert deleted
    assert metrics["deletion_precision"] == pytest.approx((22 + 28) / len(PAGE))
    bow = document_counts(PAGE, None, "no_program", gold={"article_body": "Rivers of the north"})
    assert scope_metrics(bow)["bow_recall"] == 0.0 and scope_metrics(bow)["bow_f1"] == 0.0


def test_scope_metrics_equal_score_outputs() -> None:
    """Summed per-document counts give what refinex.evaluation.dev.score_outputs gives."""
    pages = [
        {"id": "a", "source": "trafilatura-eval", "gold": SNIPPETS},
        {"id": "b", "source": "trafilatura-eval", "gold": {"with": ["cold water", "absent"], "without": ["News"]}},
        {"id": "c", "source": "scrapinghub-aeb", "gold": {"article_body": "Rivers of the north carry cold water."}},
        {"id": "d", "source": "scrapinghub-aeb", "gold": {"article_body": "Contact the sea"}},
    ]
    outputs = {"a": "Rivers of the north carry", "b": PAGE, "c": "carry cold water to the sea", "d": None}
    totals = dict.fromkeys(COUNT_COLUMNS, 0)
    for page in pages:
        output = outputs[page["id"]]
        counts = document_counts(PAGE, output, "refined" if output is not None else "no_program", 0,
                                 gold=parse_gold(json.dumps(page["gold"])))
        totals = {k: totals[k] + counts[k] for k in COUNT_COLUMNS}
    metrics = scope_metrics(totals)
    expected = score_outputs(pages, outputs)
    for name in ("precision", "recall", "f1", "accuracy"):
        assert metrics[f"snippet_{name}"] == pytest.approx(expected["snippet"][name])
    for name in ("precision", "recall", "f1"):
        assert metrics[f"bow_{name}"] == pytest.approx(expected["bow"][name])
    assert metrics["gold_pages"] == 4 and metrics["bow_pages"] == 2 and metrics["documents"] == 4
    assert set(metrics) == set(METRIC_COLUMNS)


def test_parse_gold_takes_only_known_shapes() -> None:
    assert parse_gold('{"with": ["a"], "without": []}') == {"with": ["a"], "without": []}
    assert parse_gold({"article_body": "x"}) == {"article_body": "x"}
    for unknown in (None, "null", "[1, 2]", '{"label": "spam"}', '{"article_body": 3}', "plain words {"):
        assert parse_gold(unknown) is None


def test_without_gold_only_the_other_figures() -> None:
    metrics = scope_metrics(document_counts(PAGE, PAGE, "unchanged", 0, program="keep_all()"))
    assert metrics["gold_pages"] == 0 and metrics["untouched_share"] == 1.0 and metrics["new_words"] == 0
    scores = [name for name in METRIC_COLUMNS if name.endswith(("precision", "recall", "f1", "accuracy"))]
    assert len(scores) == 13 and metrics["bow_pages"] == 0
    # Deletion figures need an expert; every score needs gold.
    assert all(metrics[name] is None for name in scores)


@pytest.mark.parametrize("module", ["refinex.evaluation.reliability", "refinex.evaluation.summary",
                                    "refinex.evaluation.plots"])
def test_metrics_import_no_heavy_framework(module: str) -> None:
    check = ("import importlib, sys; importlib.import_module(sys.argv[1]); "
             "print(','.join(m for m in ('pyspark', 'mlflow', 'torch', 'transformers', 'matplotlib') "
             "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", check, module], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""
