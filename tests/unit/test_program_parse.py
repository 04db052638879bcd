"""Parser and renderer of the program language."""
from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refinex.program import (
    KeepAll,
    ParseError,
    Program,
    RemoveLines,
    RemoveStr,
    line_tag,
    number_lines,
    parse,
    parse_line,
    quote_string,
    render_op,
    render_program,
)

# --- strategies -------------------------------------------------------------------------

line_ids = st.integers(min_value=0, max_value=10**12)
# Every code point, surrogates and controls included.
any_text = st.text(alphabet=st.characters(exclude_categories=()), max_size=40)
ops = st.one_of(
    st.builds(RemoveLines, line_ids, line_ids),
    st.builds(RemoveStr, line_ids, any_text),
    st.just(KeepAll()),
)
programs = st.lists(ops, max_size=12).map(lambda items: Program(tuple(items)))

TOKENS = [
    "remove_lines", "remove_str", "keep_all", "(", ")", ",", ";", "=", "-", "start", "end",
    "line", "text", "0", "007", "42", '"', "'", '"a b"', "'x'", "\\", '\\"', "\\u00e9", "\\u",
    "\\q", "\n", " ", "\t", "\r", "é", "…", "[003]", "#", "\x00",
]


# --- well-formed programs -----------------------------------------------------------------


def test_parses_the_three_operations() -> None:
    program = parse('remove_lines(3, 7)\nremove_str(12, "Share this article")\nkeep_all()')
    assert program.ops == (RemoveLines(3, 7), RemoveStr(12, "Share this article"), KeepAll())
    assert program.errors == ()


def test_blank_lines_whitespace_crlf_and_semicolons_are_tolerated() -> None:
    text = '\n\n   remove_lines( 3 ,7 ) ;  \r\n\t\n keep_all();\r\nremove_str(1,"x")\n\n'
    program = parse(text)
    assert program.ops == (RemoveLines(3, 7), KeepAll(), RemoveStr(1, "x"))
    assert program.errors == ()


def test_leading_zeros_as_copied_from_line_tags() -> None:
    assert parse("remove_lines(007, 010)").ops == (RemoveLines(7, 10),)
    assert parse('remove_str(000, "a")').ops == (RemoveStr(0, "a"),)


@pytest.mark.parametrize(
    "text, op",
    [
        ("remove_lines(start=3, end=5)", RemoveLines(3, 5)),
        ("remove_lines(end=5, start=3)", RemoveLines(3, 5)),
        ("remove_lines(3, end=5)", RemoveLines(3, 5)),
        ('remove_str(line=2, text="x")', RemoveStr(2, "x")),
        ('remove_str(text="x", line=2)', RemoveStr(2, "x")),
        ('remove_str(2, text="x")', RemoveStr(2, "x")),
        ("remove_lines(3, 5,)", RemoveLines(3, 5)),
        ("keep_all( )", KeepAll()),
    ],
)
def test_keyword_arguments_and_trailing_comma(text: str, op: object) -> None:
    program = parse(text)
    assert program.ops == (op,)
    assert program.errors == ()


@pytest.mark.parametrize(
    "literal, value",
    [
        ('"plain"', "plain"),
        ("'single'", "single"),
        ("'it\\'s'", "it's"),
        ("'say \"hi\"'", 'say "hi"'),
        ('"say \\"hi\\""', 'say "hi"'),
        ('"it\'s"', "it's"),
        ('"a\\\\b"', "a\\b"),
        ('"tab\\there"', "tab\there"),
        ('"cr\\rlf\\n"', "cr\rlf\n"),
        ('"\\u00e9\\u00C9"', "éÉ"),
        ('"\\ud83d\\ude00"', "\U0001F600"),  # JSON-style surrogate pair
        ('"\\U0001F600"', "\U0001F600"),
        ('"\\U0000d83d\\U0000de00"', "\ud83d\ude00"),  # two lone surrogates stay two
        ('"\\ud83d"', "\ud83d"),
        ('"\\ud83d\\u0041"', "\ud83dA"),
        ('"déjà vu … 日本"', "déjà vu … 日本"),
        ('""', ""),
        ('"  spaces  "', "  spaces  "),
    ],
)
def test_string_literals(literal: str, value: str) -> None:
    program = parse(f"remove_str(4, {literal})")
    assert program.errors == ()
    assert program.ops == (RemoveStr(4, value),)


# --- malformed lines -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, fragment",
    [
        ("remove_lines(-1, 3)", "negative"),
        ("remove_lines(1, -3)", "negative"),
        ('remove_str(1, "a\\q")', "unknown escape \\q"),
        ('remove_str(1, "abc)', "unterminated string"),
        ("remove_str(1, 'abc)", "unterminated string"),
        ('remove_str(1, "abc\\', "unterminated string"),
        ('remove_str(1, "\\u12")', "4 hex digits"),
        ('remove_str(1, "\\u12G4")', "4 hex digits"),
        ('remove_str(1, "\\U0011FFFF")', "beyond"),
        ("remove_line(1, 2)", "unknown operation"),
        ("Remove_Lines(1, 2)", "unknown operation"),
        ("remove_lines(1)", "missing"),
        ("remove_lines()", "missing"),
        ("remove_lines(1, 2, 3)", "takes 2"),
        ("keep_all(1)", "takes 0"),
        ('remove_lines(1, "2")', "must be a number"),
        ("remove_str(1, 2)", "must be a string"),
        ('remove_str("1", "x")', "must be a number"),
        ("remove_lines(start=1, start=2)", "twice"),
        ("remove_lines(1, start=2)", "twice"),
        ("remove_lines(first=1, end=2)", "no parameter"),
        ("remove_lines(start=1, 2)", "positional argument after"),
        ("remove_lines(1, 2) x", "after the operation"),
        ("remove_lines(1, 2);;", "after the operation"),
        ("remove_lines(1, 2) remove_lines(3, 4)", "after the operation"),
        ("remove_lines(1 2)", "expected ',' or ')'"),
        ("remove_lines(1, 2", "expected ',' or ')', got end of line"),
        ("remove_lines 1, 2", "expected '('"),
        ("remove_lines(1,, 2)", "expected a number or a string"),
        ("remove_lines(3a, 4)", "malformed number"),
        ("remove_lines(1.5, 2)", "unexpected character '.'"),
        ("remove_lines(١, 2)", "unexpected character"),
        ("remove_lines(" + "9" * 5000 + ", 1)", "too large"),
        ("(1, 2)", "expected an operation name"),
        ("[003] remove_lines(1, 2)", "unexpected character '['"),
        ("```", "unexpected character"),
        ("Program:", "unknown operation 'Program'"),
        ("foo(1, 2) \\q", "unknown operation 'foo'"),
        ("keep_all() ?", "unexpected character '?'"),
        (";", "expected an operation name"),
    ],
)
def test_malformed_lines_become_parse_errors(line: str, fragment: str) -> None:
    program = parse(f"keep_all()\n  {line}  \nremove_lines(0, 0)")
    assert program.ops == (KeepAll(), RemoveLines(0, 0))
    assert len(program.errors) == 1
    error = program.errors[0]
    assert isinstance(error, ParseError)
    assert error.line_no == 1
    assert error.text == line.strip()
    assert fragment in error.message
    assert error.message.startswith("column ")
    with pytest.raises(ValueError):
        parse_line(line)


def test_error_messages_are_short_even_for_huge_lines() -> None:
    program = parse("x" * 100_000 + "(1, 2)")
    assert len(program.errors) == 1
    assert len(program.errors[0].message) < 200


def test_error_column_points_at_the_problem() -> None:
    (error,) = parse('  remove_str(1, "a\\qb")').errors
    assert error.message.startswith("column 17:")  # the backslash, counted after stripping


def test_parse_line_returns_the_operation() -> None:
    assert parse_line("  remove_lines(1, 2);  ") == RemoveLines(1, 2)


def test_errors_do_not_take_part_in_program_equality() -> None:
    assert parse("keep_all()\nnonsense") == Program((KeepAll(),))


# --- never raises, linear time -------------------------------------------------------------


@settings(max_examples=500)
@given(st.text())
def test_parse_never_raises_on_any_text(text: str) -> None:
    program = parse(text)
    non_blank = [line for line in text.split("\n") if line.strip()]
    assert len(program.ops) + len(program.errors) == len(non_blank)


@settings(max_examples=500)
@given(st.lists(st.sampled_from(TOKENS), max_size=30).map("".join))
def test_parse_never_raises_on_token_soup(text: str) -> None:
    program = parse(text)
    non_blank = [line for line in text.split("\n") if line.strip()]
    assert len(program.ops) + len(program.errors) == len(non_blank)
    for error in program.errors:
        assert 0 <= error.line_no < len(text.split("\n"))


def test_long_inputs_parse_in_linear_time() -> None:
    body = "ab\\\"c\\\\d\\u00e9 " * 400_000  # ~6 MB string literal full of escapes
    many_lines = "remove_lines(1, 2)\n" * 100_000
    started = time.perf_counter()
    program = parse(f'remove_str(1, "{body}")\n{many_lines}' + "(" * 1_000_000)
    elapsed = time.perf_counter() - started
    assert program.ops[0] == RemoveStr(1, 'ab"c\\dé ' * 400_000)
    assert len(program.ops) == 100_001
    assert len(program.errors) == 1
    assert elapsed < 30


# --- rendering ---------------------------------------------------------------------------------


def test_canonical_rendering() -> None:
    program = Program((RemoveLines(3, 7), RemoveStr(12, "Share this article"), KeepAll()))
    text = 'remove_lines(3, 7)\nremove_str(12, "Share this article")\nkeep_all()'
    assert render_program(program) == text
    assert str(program) == text
    assert render_program(Program()) == ""
    assert render_op(RemoveStr(0, "…")) == 'remove_str(0, "…")'


@pytest.mark.parametrize(
    "value, literal",
    [
        ('a"b', '"a\\"b"'),
        ("a\\b", '"a\\\\b"'),
        ("it's", '"it\'s"'),
        ("l1\nl2\r\t", '"l1\\nl2\\r\\t"'),
        ("\x00\x1b", '"\\u0000\\u001b"'),
        ("\u00a0\u2028", '"\\u00a0\\u2028"'),
        ("\ud800", '"\\U0000d800"'),
        ("\U000E0001", '"\\U000e0001"'),
        ("déjà 日本 \U0001F600", '"déjà 日本 \U0001F600"'),
    ],
)
def test_string_quoting(value: str, literal: str) -> None:
    assert quote_string(value) == literal


def test_render_rejects_ids_no_text_can_express() -> None:
    with pytest.raises(ValueError):
        render_op(RemoveLines(-1, 2))
    with pytest.raises(ValueError):
        render_op(RemoveStr(True, "x"))
    with pytest.raises(TypeError):
        render_op("remove_lines(1, 2)")  # type: ignore[arg-type]


@settings(max_examples=400)
@given(programs)
def test_render_then_parse_round_trips(program: Program) -> None:
    text = render_program(program)
    parsed = parse(text)
    assert parsed.errors == ()
    assert parsed == program
    assert render_program(parsed) == text
    assert len(text.split("\n")) == max(len(program.ops), 1)


@given(any_text)
def test_round_trip_survives_surrounding_program_text(value: str) -> None:
    text = f"\n  {render_op(RemoveStr(5, value))} ;\r\n\nkeep_all()"
    assert parse(text).ops == (RemoveStr(5, value), KeepAll())


# --- numbered lines ----------------------------------------------------------------------------


def test_line_tags() -> None:
    assert line_tag(0) == "[000]"
    assert line_tag(7) == "[007]"
    assert line_tag(999) == "[999]"
    assert line_tag(1000) == "[1000]"
    with pytest.raises(ValueError):
        line_tag(-1)


def test_number_lines() -> None:
    assert number_lines(["first", "second"]) == "[000] first\n[001] second"
    assert number_lines(["", "x"], start=998) == "[998] \n[999] x"
    assert number_lines(["a", "b"], start=999) == "[999] a\n[1000] b"
    assert number_lines([]) == ""
