"""Distillation of an expert's refinement into a minimal deletion-only program."""
from __future__ import annotations

import random
import re
import unicodedata
from collections import Counter
from dataclasses import FrozenInstanceError
from typing import Optional

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from refinex.distill import Distillation, distill, distill_report
from refinex.distill.lcs import align as _align
from refinex.program import KeepAll, Program, RemoveLines, RemoveStr, execute, parse
from refinex.program.execute import Guardrails

LENIENT = Guardrails(max_error_ratio=1.0, min_kept_chars=0)

WORDS = [
    "the", "cat", "sat", "on", "mat", "News", "Home", "share", "x1", "_id", "2024", "a",
    "café", "cafe\u0301", "naïve", "Straße", "ñandú", "日本語", "हिन्दी", "Ωmega", "über",
]
# Words no other word contains: with unique tokens per line, every deletion then has a
# remove_str text that occurs once in its line ("a" would also be found inside "cat").
DISTINCT_WORDS = [w for w in WORDS if not any(w != other and w in other for other in WORDS)]
PUNCT = list(",.!?-()'\":;/|€—…«»&#*\\[]") + ["\u2019", "\U0001f600"]
SEPARATORS = [" ", " ", " ", " ", "  ", "\t", "\u00a0", " \t"]
WORD_RE = re.compile(r"\w+")

LineParts = tuple[str, list[str], list[str], str]  # lead, tokens, separators, trail
Line = Optional[LineParts]  # None: a blank line


# --- helpers -------------------------------------------------------------------------------


def run(program: Program, raw: str) -> str:
    """Execute with lenient guardrails; the program must be clean and round-trip as text."""
    assert program.errors == ()
    assert parse(str(program)) == program
    result = execute(program, raw, LENIENT)
    assert result.ops_rejected == ()
    assert result.parse_errors == 0
    return result.text


def is_subsequence(small: str, big: str) -> bool:
    remaining = iter(big)
    return all(char in remaining for char in small)


def deletions(line: str, text: str) -> set[str]:
    """The lines that deleting each occurrence of ``text`` in ``line`` would give."""
    results = set()
    found = line.find(text)
    while found >= 0:
        results.add(line[:found] + line[found + len(text) :])
        found = line.find(text, found + 1)
    return results


def content(text: str) -> list[str]:
    """The non-blank lines of ``text`` (blank lines are layout to the distiller)."""
    return [line for line in text.split("\n") if line.strip()]


def check_blank_lines_follow_content(raw: str, program: Program) -> None:
    """No operation is spent on blank lines: each blank line goes or stays with the nearest
    non-blank line above it (below it, at the top of the document)."""
    lines = raw.split("\n")
    removed = set()
    for op in program.ops:
        if isinstance(op, RemoveLines):
            removed.update(range(op.start, op.end + 1))
    filled = [i for i, line in enumerate(lines) if line.strip()]
    if not filled:
        return
    for i, line in enumerate(lines):
        if not line.strip():
            above = [j for j in filled if j < i]
            anchor = above[-1] if above else filled[0]
            assert (i in removed) == (anchor in removed), (i, raw, program)
    assert not any(isinstance(op, RemoveStr) and not lines[op.line].strip() for op in program.ops)


def check_invariants(raw: str, refined: str) -> tuple[Distillation, str]:
    """Invariants that hold for every input; returns the report and the program's output."""
    report = distill_report(raw, refined)
    assert distill(raw, refined) == report.program
    out = run(report.program, raw)
    # (1) deletion only
    assert is_subsequence(out, raw)
    # (2) no new word, in the spec's (lower-cased) sense and case-sensitively, as a multiset
    for fold in (str.lower, lambda s: s):
        raw_words = Counter(WORD_RE.findall(fold(raw)))
        out_words = Counter(WORD_RE.findall(fold(out)))
        assert not out_words - raw_words, (out_words - raw_words, raw, refined, out)
    # ops sorted by line; remove_str unambiguous in its raw line (found once, or only where
    # deleting it gives the same line) and never on a removed line; ranges merged
    lines = raw.split("\n")
    ops = report.program.ops
    if ops == (KeepAll(),):
        assert out == raw
    else:
        assert all(not isinstance(op, KeepAll) for op in ops)
        keys = [op.start if isinstance(op, RemoveLines) else op.line for op in ops]
        assert keys == sorted(keys)
        removed: set[int] = set()
        for op in ops:
            if isinstance(op, RemoveLines):
                removed.update(range(op.start, op.end + 1))
        for op in ops:
            if isinstance(op, RemoveStr):
                assert op.line not in removed
                assert not op.text.isspace()
                assert len(deletions(lines[op.line], op.text)) == 1, "ambiguous remove_str"
        ranges = [op for op in ops if isinstance(op, RemoveLines)]
        for before, after in zip(ranges, ranges[1:]):
            assert before.end + 1 < after.start, "consecutive removed lines are merged"
    # accounting
    assert report.kept_chars == len(out)
    assert report.deleted_chars == len(raw) - len(out)
    assert report.exact == (content(out) == content(refined))
    check_blank_lines_follow_content(raw, report.program)
    assert report.inserted_chars >= 0 and report.replaced_chars >= 0
    assert report.unrepresentable_ratio == report.inserted_chars / max(1, len(refined))
    return report, out


# --- document strategies -------------------------------------------------------------------


def is_word(token: str) -> bool:
    return bool(re.match(r"\w", token))


@st.composite
def line_tokens(draw: st.DrawFn, unique: bool) -> LineParts:
    """(leading whitespace, tokens, separators between them, trailing whitespace)."""
    pool = st.sampled_from(DISTINCT_WORDS if unique else WORDS) | st.sampled_from(PUNCT)
    tokens = draw(st.lists(pool, min_size=1, max_size=9, unique=unique))
    seps = []
    for left, right in zip(tokens, tokens[1:]):
        choices = SEPARATORS if is_word(left) and is_word(right) else SEPARATORS + ["", ""]
        seps.append(draw(st.sampled_from(choices)))
    lead = draw(st.sampled_from(["", "", "", " ", "\t"]))
    trail = draw(st.sampled_from(["", "", "", " ", "\r"]))
    return lead, tokens, seps, trail


def render_line(line: LineParts) -> str:
    lead, tokens, seps, trail = line
    return lead + "".join(t + s for t, s in zip(tokens, seps + [""])) + trail


@st.composite
def documents(draw: st.DrawFn, unique: bool = False) -> list[Line]:
    """Lines of words and punctuation, blank lines, and lines repeated verbatim."""
    pool = draw(st.lists(line_tokens(unique), min_size=1, max_size=6))
    picks = st.one_of(
        st.sampled_from(pool),
        st.just(None),
        line_tokens(unique),
    )
    return draw(st.lists(picks, min_size=1, max_size=14))


def render(doc: list[Line], blanks: list[str]) -> str:
    """The document's text; blank lines take their text from ``blanks`` in turn."""
    return "\n".join(
        render_line(line) if line is not None else blanks[i % len(blanks)]
        for i, line in enumerate(doc)
    )


def delete_run(line: LineParts, p: int, q: int, keep_left: bool) -> Optional[LineParts]:
    """Delete tokens p..q with the whitespace on one side; None if that would glue words."""
    lead, tokens, seps, trail = line
    if p == 0 and q == len(tokens) - 1:
        return None
    if p == 0:
        return lead, tokens[q + 1 :], seps[q + 1 :], trail
    if q == len(tokens) - 1:
        return lead, tokens[:p], seps[: p - 1], trail
    kept_sep = seps[p - 1] if keep_left else seps[q]
    if kept_sep == "" and is_word(tokens[p - 1]) and is_word(tokens[q + 1]):
        return None
    return lead, tokens[:p] + tokens[q + 1 :], seps[: p - 1] + [kept_sep] + seps[q + 1 :], trail


@st.composite
def pure_deletions(draw: st.DrawFn) -> tuple[str, str]:
    """A document with unique tokens per line and a refinement that only deletes whole
    lines and whole-word token runs together with their separating whitespace.

    Unique tokens make every deletion expressible by a remove_str that occurs once in its
    line; with repeats it may not be (see the test of an ambiguous deletion)."""
    doc = draw(documents(unique=True))
    blanks = draw(st.lists(st.sampled_from(["", "", " ", "\t "]), min_size=1, max_size=3))
    raw = render(doc, blanks)
    out_lines = []
    for index, line in enumerate(doc):
        action = draw(st.sampled_from(["keep", "keep", "drop", "cut", "cut"]))
        if action == "drop":
            continue
        if line is None or action == "keep":
            out_lines.append(render_line(line) if line is not None else blanks[index % len(blanks)])
            continue
        for _ in range(draw(st.integers(1, 2))):
            n = len(line[1])
            p = draw(st.integers(0, n - 1))
            q = draw(st.integers(p, n - 1))
            line = delete_run(line, p, q, draw(st.booleans())) or line
        out_lines.append(render_line(line))
    return raw, "\n".join(out_lines)


def split_units(line: str) -> list[str]:
    """Words (with their combining marks), single symbols (with theirs), single spaces."""
    units: list[str] = []
    for char in line:
        mark = unicodedata.category(char).startswith("M") or char in "\u200c\u200d"
        wordish = bool(re.match(r"\w", char)) or mark
        if units and mark and not units[-1].isspace():
            units[-1] += char
        elif units and wordish and re.match(r"\w", units[-1][0]):
            units[-1] += char
        else:
            units.append(char)
    return units


@st.composite
def unit_deletions(draw: st.DrawFn) -> tuple[str, str]:
    """A refinement deleting any units (words, punctuation or whitespace characters) as long
    as every deleted run holds a word or punctuation, no words get glued and each kept line
    keeps some content."""
    doc = draw(documents(unique=True))
    raw = render(doc, [""])
    out_lines = []
    for line in raw.split("\n"):
        action = draw(st.sampled_from(["keep", "drop", "cut", "cut"]))
        if action == "drop":
            continue
        units = split_units(line)
        if action == "keep" or not units:
            out_lines.append(line)
            continue
        mask = draw(st.lists(st.booleans(), min_size=len(units), max_size=len(units)))
        kept = [u for u, m in zip(units, mask) if m]
        runs, current = [], []
        for u, m in zip(units, mask):
            if m:
                if current:
                    runs.append(current)
                current = []
            else:
                current.append(u)
        if current:
            runs.append(current)
        text = "".join(kept)
        whitespace_only = any(all(u.isspace() for u in run) for run in runs)
        if whitespace_only or not text.strip() or split_units(text) != kept:
            text = line  # not a clean deletion: whitespace edits, emptied line, glued words
        out_lines.append(text)
    return raw, "\n".join(out_lines)


EDIT_ACTIONS = ["keep", "drop", "cut", "insert", "rewrite", "glue", "merge", "split"]


@st.composite
def edits(draw: st.DrawFn) -> tuple[str, str]:
    """Arbitrary expert output: deletions plus insertions, rewrites, merges, splits, moves."""
    doc = draw(documents())
    raw = render(doc, ["", " "])
    lines = raw.split("\n")
    out: list[str] = []
    for line in lines:
        action = draw(st.sampled_from(EDIT_ACTIONS))
        words = line.split(" ")
        if action == "drop":
            continue
        if action == "cut" and len(words) > 1:
            k = draw(st.integers(0, len(words) - 1))
            line = " ".join(words[:k] + words[k + 1 :])
        elif action == "insert":
            k = draw(st.integers(0, len(words)))
            new = draw(st.sampled_from(["zzz", "Inserted text!", "color", "#", "mat"]))
            line = " ".join(words[:k] + [new] + words[k:])
        elif action == "rewrite":
            line = line.replace("colour", "color").replace("a", "o").replace("é", "e")
        elif action == "glue":
            line = line.replace(" ", "", 1)
        elif action == "merge" and out:
            line = out.pop() + " " + line
        elif action == "split" and len(words) > 1:
            k = draw(st.integers(1, len(words) - 1))
            line = " ".join(words[:k]) + "\n" + " ".join(words[k:])
        out.append(line)
    if len(out) > 1 and draw(st.booleans()):
        i, j = draw(st.integers(0, len(out) - 1)), draw(st.integers(0, len(out) - 1))
        out[i], out[j] = out[j], out[i]
    return raw, "\n".join(out)


# --- invariants ----------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits())
def test_any_refinement_gives_a_clean_deletion_of_raw(pair: tuple[str, str]) -> None:
    check_invariants(*pair)


@settings(max_examples=200, deadline=None)
@given(documents(), st.text(max_size=60))
def test_unrelated_expert_text_keeps_invariants(doc: list[Line], refined: str) -> None:
    check_invariants(render(doc, [""]), refined)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pure_deletions())
def test_pure_deletions_are_reproduced_exactly(pair: tuple[str, str]) -> None:
    raw, refined = pair
    report, out = check_invariants(raw, refined)
    assert content(out) == content(refined)
    assert report.exact and report.inserted_chars == 0 and report.replaced_chars == 0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(unit_deletions())
def test_unit_level_deletions_are_reproduced_exactly(pair: tuple[str, str]) -> None:
    raw, refined = pair
    report, out = check_invariants(raw, refined)
    assert content(out) == content(refined) and report.exact


SMALL_ALPHABET = "ab \n.,-|éx\u0301"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=SMALL_ALPHABET, max_size=40), st.text(alphabet=SMALL_ALPHABET, max_size=40))
def test_highly_repetitive_texts_keep_invariants(raw: str, refined: str) -> None:
    check_invariants(raw, refined)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from("abcab"), max_size=25), st.lists(st.sampled_from("abc"), max_size=25)
)
def test_alignment_is_a_longest_common_subsequence(a: list[str], b: list[str]) -> None:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            best = max(table[i][j + 1], table[i + 1][j])
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else best
    for late in (True, False):
        pairs = _align(a, b, late=late)
        assert len(pairs) == table[len(a)][len(b)]
        assert all(a[i] == b[j] for i, j in pairs)
        assert all(p < q and r < s for (p, r), (q, s) in zip(pairs, pairs[1:]))


@settings(max_examples=200, deadline=None)
@given(documents())
def test_identity_is_keep_all_and_empty_removes_everything(doc: list[Line]) -> None:
    raw = render(doc, ["", " "])
    assert distill(raw, raw) == Program((KeepAll(),))
    assume(raw)  # distill("", "") is the identity
    n = len(raw.split("\n"))
    assert distill(raw, "") == Program((RemoveLines(0, n - 1),))
    assert run(distill(raw, ""), raw) == ""
    report = distill_report(raw, raw)
    assert report.exact and report.kept_chars == len(raw) and report.deleted_chars == 0


# --- realistic examples --------------------------------------------------------------------

PAGE = """Home | News | Sport | Contact
Sign in

Scientists discover a new species of frog
The frog was found in the rainforest of Peru. Share this article It is bright blue.
Researchers say the discovery matters for conservation.
Related: Ten amazing animals
Copyright 2024 Example Media. All rights reserved."""


def test_navigation_share_button_and_footer_are_removed() -> None:
    refined = (
        "Scientists discover a new species of frog\n"
        "The frog was found in the rainforest of Peru. It is bright blue.\n"
        "Researchers say the discovery matters for conservation."
    )
    report = distill_report(PAGE, refined)
    assert report.program == Program(
        (
            RemoveLines(0, 2),
            RemoveStr(4, "Share this article "),
            RemoveLines(6, 7),
        )
    )
    assert run(report.program, PAGE) == refined
    assert report.exact and report.unrepresentable_ratio == 0.0
    assert report.deleted_chars == len(PAGE) - len(refined)


def test_trafilatura_style_output_gives_line_removals_only() -> None:
    raw = "  Title  \n\nNav | Links\n  Body   text here.  \n"
    refined = "Title\nBody text here."
    report, out = check_invariants(raw, refined)
    assert report.program == Program((RemoveLines(2, 2),))
    assert out == "  Title  \n\n  Body   text here.  \n" and report.inserted_chars == 0


def test_repeated_boilerplate_lines_go_with_their_context() -> None:
    raw = (
        "Advertisement\nFirst paragraph text here.\nAdvertisement\n"
        "Second paragraph, edited later.\nAdvertisement"
    )
    refined = "First paragraph text here.\nSecond paragraph edited."
    report, out = check_invariants(raw, refined)
    assert report.program == Program(
        (
            RemoveLines(0, 0),
            RemoveLines(2, 2),
            RemoveStr(3, ","),
            RemoveStr(3, " later"),
            RemoveLines(4, 4),
        )
    )
    assert report.exact


def test_share_button_inside_a_content_line() -> None:
    raw = "Prices rose 5% in May. Tweet Share Analysts expect more."
    refined = "Prices rose 5% in May. Analysts expect more."
    assert distill(raw, refined) == Program((RemoveStr(0, "Tweet Share "),))


def test_expert_rewrites_are_not_representable() -> None:
    raw = "The colour of the sky is blue.\nIt is nice."
    refined = "The color of the sky is blue.\nIt is nice."
    report = distill_report(raw, refined)
    assert report.program == Program((KeepAll(),))
    assert "color" not in run(report.program, raw)
    assert report.inserted_chars == len("color") and report.replaced_chars == len("colour")
    assert not report.exact and report.unrepresentable_ratio == pytest.approx(5 / len(refined))


def test_rewrite_next_to_a_deletion_keeps_the_raw_word() -> None:
    raw = "Menu: The colour of the sky is blue. Subscribe now"
    refined = "The color of the sky is blue."
    report = distill_report(raw, refined)
    assert run(report.program, raw) == "The colour of the sky is blue."


def test_glued_words_are_never_glued_by_the_program() -> None:
    for raw, refined in [("foo bar\nbaz qux", "foobar\nbaz qux"), ("a foo bar b", "a foobar b")]:
        report, out = check_invariants(raw, refined)
        assert "foobar" not in out and "foo bar" in out


def test_words_are_never_cut() -> None:
    raw = "unbelievable results today"
    report, out = check_invariants(raw, "believable results today")
    assert out == raw and report.program == Program((KeepAll(),))
    _, out = check_invariants("cafe\u0301 noir", "cafe noir")  # no combining mark is cut off
    assert out == "cafe\u0301 noir"


def test_whitespace_only_differences_give_keep_all() -> None:
    raw = "Title  here\n\tIndented   line \nLast line"
    refined = "Title here\nIndented line\nLast line"
    report = distill_report(raw, refined)
    assert report.program == Program((KeepAll(),))
    assert report.inserted_chars == 0 and not report.exact


def test_whitespace_noise_in_edited_lines_gives_no_whitespace_ops() -> None:
    raw = "Ad:  The   text stays here.\nFooter"
    refined = "The text stays here."
    program = distill(raw, refined)
    assert program == Program((RemoveStr(0, "Ad:  "), RemoveLines(1, 1)))


def test_dropped_blank_lines_cost_no_operation() -> None:
    raw = "Para one.\n\nPara two.\n"
    report = distill_report(raw, "Para one.\nPara two.")
    assert report.program == Program((KeepAll(),)) and report.exact


def test_deleted_blocks_take_their_blank_lines_and_merge_across_them() -> None:
    raw = "\nNav\n\nFirst para.\n\nAd\n\n \nSecond para.\n\nFooter\n\nCopyright\n"
    report, out = check_invariants(raw, "First para.\nSecond para.")
    assert report.program == Program((RemoveLines(0, 2), RemoveLines(5, 7), RemoveLines(10, 13)))
    assert out == "First para.\n\nSecond para.\n" and report.exact


def test_alternating_blank_lines_give_one_range_per_deleted_block() -> None:
    paras = [f"Paragraph {i} of the story." for i in range(6)]
    menu = [f"Menu item {i}" for i in range(4)]
    raw = "\n\n".join(menu + paras + menu)
    report, out = check_invariants(raw, "\n".join(paras))
    assert report.program == Program((RemoveLines(0, 7), RemoveLines(20, 26)))
    assert content(out) == paras


def test_merged_and_split_lines_keep_raw_lines() -> None:
    raw = "Breaking\nnews from the city\nNav link"
    report, out = check_invariants(raw, "Breaking news from the city")
    assert out == "Breaking\nnews from the city"
    assert report.program == Program((RemoveLines(2, 2),))
    raw = "One long sentence here. Another one."
    _, out = check_invariants(raw, "One long sentence here.\nAnother one.")
    assert out == raw


def test_reordered_lines_are_kept_in_place() -> None:
    raw = "Alpha line one\nBeta line two\nGamma line three\nFooter"
    refined = "Beta line two\nAlpha line one\nGamma line three"
    report, out = check_invariants(raw, refined)
    assert out == "Alpha line one\nBeta line two\nGamma line three"
    assert report.inserted_chars == 0


def test_inserted_text_is_counted_as_unrepresentable() -> None:
    raw = "Body text of the page.\nFooter"
    refined = "# Heading\nBody text of the page."
    report = distill_report(raw, refined)
    assert report.program == Program((RemoveLines(1, 1),))
    assert report.inserted_chars == len("# Heading")
    assert report.unrepresentable_ratio == pytest.approx(len("# Heading") / len(refined))


def test_nav_replaced_by_a_heading_is_still_removed() -> None:
    raw = "Home About Contact Login\nArticle body text."
    refined = "# Title\nArticle body text."
    assert distill(raw, refined) == Program((RemoveLines(0, 0),))


def test_repeated_text_is_removed_at_an_unambiguous_position() -> None:
    raw = "a b a b a"
    report, out = check_invariants(raw, "a b a")
    assert out == "a b a" and report.exact
    raw = "Share | Share | Article body"
    report, out = check_invariants(raw, "Share | Article body")
    assert report.exact


def test_ambiguous_deletion_is_given_up_rather_than_deleting_a_kept_word() -> None:
    # The second "Share" has the same context as the first one: no remove_str text can
    # point at it alone without also deleting a word the expert kept.
    raw = "x Share y Share z"
    report, out = check_invariants(raw, "x Share y z")
    assert out == raw and not report.exact


def test_line_emptied_by_the_expert_is_removed_whole() -> None:
    raw = "keep me\nall of this goes\nand me"
    report, out = check_invariants(raw, "keep me\n\nand me")
    assert out == "keep me\nand me" and report.exact  # the blank line it left is layout


def test_blank_and_empty_edge_cases() -> None:
    assert distill("", "") == Program((KeepAll(),))
    assert distill("", "new text") == Program((KeepAll(),))
    assert distill("   ", "") == Program((RemoveLines(0, 0),))
    assert distill("a\n\nb", "\n") == Program((RemoveLines(0, 2),))
    assert distill("a\n\nb", "   \n") == Program((RemoveLines(0, 2),))
    report, out = check_invariants("only nav", "completely different")
    assert out == "" and report.inserted_chars == len("completely different")


def test_special_characters_round_trip_through_program_text() -> None:
    raw = 'He said "hi" \\ bye\tnow "quoted" end\nFoot'
    refined = 'He said "hi" end'
    report, out = check_invariants(raw, refined)
    assert out == refined


def test_distillation_is_frozen() -> None:
    report = distill_report("a", "a")
    with pytest.raises(FrozenInstanceError):
        report.exact = False  # type: ignore[misc]


# --- scale ---------------------------------------------------------------------------------


def synthetic_document(target_chars: int, seed: int) -> tuple[str, str, int]:
    """A page of sentences with boilerplate, and an expert version that drops about 30% of
    the lines, cuts words out of some and rewrites or inserts words in others; also the
    number of characters of the words the expert rewrote or inserted."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(5000)] + ["the", "of", "and", "a", "to", "in", "is"]
    raw_lines: list[str] = []
    ref_lines: list[str] = []
    size = new_chars = 0
    while size < target_chars:
        if rng.random() < 0.05:
            line = rng.choice(["Home | News | Sport", "Share this", "", "Advertisement"])
        else:
            line = " ".join(rng.choice(vocab) for _ in range(rng.randint(3, 14))) + "."
        raw_lines.append(line)
        size += len(line) + 1
        roll = rng.random()
        if roll < 0.3:
            continue
        words = line.split(" ")
        if roll < 0.36 and len(words) > 3:
            k = rng.randint(0, len(words) - 2)
            words = words[:k] + words[k + 2 :]
        elif roll < 0.40:
            words.insert(rng.randint(0, len(words)), "inserted")
            new_chars += len("inserted")
        elif roll < 0.43:
            new_chars += sum(len(w.rstrip(".")) for w in words if "1" in w)
            words = [w.replace("1", "7") for w in words]
        ref_lines.append(" ".join(words))
    return "\n".join(raw_lines), "\n".join(ref_lines), new_chars


def test_multi_megabyte_document() -> None:
    raw, refined, new_chars = synthetic_document(5_000_000, seed=7)
    report, out = check_invariants(raw, refined)
    removed = sum(op.end - op.start + 1 for op in report.program.ops if isinstance(op, RemoveLines))
    assert 0.25 < removed / len(raw.split("\n")) < 0.35
    # what is not representable is what the expert wrote (plus spaces inside rewritten runs)
    assert new_chars <= report.inserted_chars <= 1.2 * new_chars
    assert 0 < report.replaced_chars <= new_chars


def test_large_pure_deletion_is_exact() -> None:
    raw, _, _ = synthetic_document(300_000, seed=3)
    lines = raw.split("\n")
    rng = random.Random(5)
    kept = []
    for line in lines:
        if rng.random() < 0.3:
            continue
        words = line.split(" ")
        if len(words) > 4 and rng.random() < 0.2:
            k = rng.randint(1, len(words) - 3)
            if line.count(words[k]) == 1:  # else it may have no unique remove_str
                words = words[:k] + words[k + 1 :]
        kept.append(" ".join(words))
    refined = "\n".join(kept)
    report, out = check_invariants(raw, refined)
    assert report.exact
