"""Hostile program text: model output is data, never code, and costs a bounded amount.

A refine model (or whoever controls its prompt) writes the program text, so the parser and
executor are an attack surface. Over 10,000 deterministic fuzzed programs (random bytes,
huge and negative ids, unbalanced quotes, control and bidi characters, Python injection
payloads, mutated valid programs) plus one 100,000-operation program go through the real
``parse`` and ``execute``; we check that nothing escapes as an exception, that no payload
runs (a sentinel file it would create never appears), that every accepted line is exactly
one literal operation call, that the output is a subsequence of the raw document, and that
CPU time and traced memory stay under stated ceilings.
"""
from __future__ import annotations

import random
import re
import time
import tracemalloc
from pathlib import Path
from typing import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refinex import status
from refinex.program import (
    REJECT_REASONS,
    Guardrails,
    KeepAll,
    Program,
    RemoveLines,
    RemoveStr,
    Result,
    execute,
    parse,
    parse_line,
    quote_string,
    render_op,
)

# --- bounds ------------------------------------------------------------------------------------
# Generous ceilings for a slow, shared 2-core CPU, NOT performance targets: each is about 10x
# (or more) what was measured on such a machine, so that only a change in complexity (say, a
# quadratic step) and not a busy neighbour can trip them.

#: parse + execute of the 100,000-operation program (2.8 MB of text) on the 10,000-line
#: document, in CPU seconds (time.process_time, no tracing). Measured: ~3.7 s (parse ~3.2 s,
#: execute ~0.5 s), i.e. ~37 microseconds per operation.
BIG_PROGRAM_CPU_SECONDS_MAX = 40.0
#: Peak memory traced (tracemalloc) while parsing and executing that program, in MiB; the
#: program text and the document themselves are allocated before tracing starts.
#: Measured: ~27 MiB (100,000 op objects, their tuple, spans and the rejection list).
BIG_PROGRAM_PEAK_MIB_MAX = 256.0
#: parse + three executes of any single fuzzed program (each at most a few KB), CPU seconds.
#: Measured: the slowest of the 10,855 takes ~5 ms.
PER_PROGRAM_CPU_SECONDS_MAX = 0.5
#: Error messages quote at most 40 characters of user text; a message is never longer.
MAX_ERROR_MESSAGE_CHARS = 300

MIN_CORPUS_PROGRAMS = 10_000
BIG_PROGRAM_OPS = 100_000
BIG_DOCUMENT_LINES = 10_000

LENIENT = Guardrails(max_error_ratio=1.0, min_kept_chars=0)
FINAL_STATUSES = {status.REFINED, status.UNCHANGED, status.DROPPED, status.FALLBACK_RAW}
OP_CALL = re.compile(r"(remove_lines|remove_str|keep_all)\s*\(")

# --- documents the fuzzed programs run against -----------------------------------------------

BODY = "This paragraph is the actual content of the page and it is long enough to keep."
MAIN_DOC = "\n".join(
    [
        "Home | About | Contact",
        BODY,
        "Share this article on Facebook",
        "",
        "  indented \t tabbed line  ",
        "windows line\r",
        "NUL\x00 ESC\x1b[31m red \x1b[0m BEL\x07",
        "RTL \u202eevil\u202c and \u200fmark\u200e and \u2066isolate\u2069",
        "emoji \U0001F600\U0001F4A9 zwj \U0001F469\u200d\U0001F4BB flags \U0001F1EB\U0001F1F7",
        "lone surrogates \ud800 \udfff \udc80",
        "déjà vu … 日本語 العربية עברית",
        "__import__('os').system('touch /tmp/pwned')",
        'remove_lines(0, 5)  # a program inside the document',
        "ab" * 40,
        "x" * 500,
        BODY,
        "Copyright 2024. All rights reserved.",
    ]
    + [f"line {i}: {BODY}" for i in range(17, 40)]
)
MAIN_LINES = MAIN_DOC.split("\n")
SIDE_DOCS = ("", "a", "\n\n\n", "\ud800\n\udfff", BODY, "x\r\ny\r\n")

# --- injection payloads ------------------------------------------------------------------------


def payload_expressions(target: str) -> list[str]:
    """Python expressions that create the file ``target`` when evaluated."""
    t = repr(target)
    return [
        f"__import__('pathlib').Path({t}).touch()",
        f"__import__('os').system('touch ' + {t})",
        f"open({t}, 'w').close()",
        f"exec(\"open({t}, 'w').close()\")",
        f"eval(\"__import__('pathlib').Path({t}).touch()\")",
        f"(lambda: __import__('pathlib').Path({t}).touch())()",
        f"f\"{{__import__('pathlib').Path({t}).touch()}}\"",
        f"getattr(__import__('pathlib'), 'Path')({t}).touch()",
        f"exec(compile(\"open({t}, 'w').close()\", '<x>', 'exec'))",
        f"[__import__('pathlib').Path({t}).touch() for _ in 'x']",
        f"keep_all.__class__ and __import__('pathlib').Path({t}).touch()",
    ]


def payload_statements(target: str) -> list[str]:
    """Python statements that create the file ``target`` when executed."""
    t = repr(target)
    return [
        f"import os; os.system('touch ' + {t})",
        f"from pathlib import Path; Path({t}).touch()",
        f"with open({t}, 'w'): pass",
        f"exec(\"import pathlib; pathlib.Path({t}).touch()\")",
    ]


# How a payload might be smuggled into program text ("{E}" is the payload).
WRAPPERS = [
    "{E}",
    "remove_lines({E}, 1)",
    "remove_lines(0, {E})",
    "remove_str(0, {E})",
    "remove_str(line={E}, text='x')",
    "remove_str(text={E}, line=0)",
    "keep_all({E})",
    "keep_all() and {E}",
    "keep_all() or {E}",
    "keep_all(); {E}",
    "remove_lines(0, 1); {E}",
    "remove_lines(0, 1)  # {E}",
    "remove_lines(0, 1) if {E} else keep_all()",
    'remove_str(0, f"{{{E}}}")',
    "remove_str(0, f'{{{E}}}')",
    'remove_str(0, "" + {E})',
    'remove_str(0, "x".join([{E}]))',
    'remove_str(0, "%s" % {E})',
    'remove_str(0, "{{}}".format({E}))',
    'remove_str(0, r"{E}")',
    "remove_str(0, b'{E}')",
    'remove_str(0, "\\N{{{E}}}")',
    "remove_lines(*[{E}])",
    "remove_lines(**{{'start': {E}, 'end': 1}})",
    "keep_all.__call__({E})",
    "keep_all().__class__({E})",
    "remove_lines.__globals__['__builtins__']['exec']({E!r})",
    "lambda: {E}",
    "[{E} for _ in 'x']",
    "{{'op': {E}}}",
    "@{E}\nkeep_all()",
    "keep_all()\n{E}\nremove_lines(0, 0)",
    "{E}\\\nkeep_all()",
    "remove_lines(0, 1) \\\n{E}",
    "  \t{E};  ",
    "\x00{E}",
    "\u202e{E}",
]


def injected_programs(target: str) -> list[tuple[str, str]]:
    """(program text, payload) for every payload in every wrapper."""
    programs = []
    for payload in payload_expressions(target) + payload_statements(target):
        for wrapper in WRAPPERS:
            text = wrapper.replace("{E!r}", repr(payload)).replace("{E}", payload)
            text = text.replace("{{", "{").replace("}}", "}")
            programs.append((text, payload))
    return programs


def assert_payload_lines_are_errors(text: str, payload: str, program: Program) -> None:
    """Every program line holding the payload (outside a proper literal) is a parse error."""
    error_lines = {error.line_no for error in program.errors}
    for line_no, line in enumerate(text.split("\n")):
        if payload in line:
            assert line_no in error_lines, (line, program)


# --- helpers ---------------------------------------------------------------------------------


def is_subsequence(small: str, big: str) -> bool:
    """Whether ``small`` is ``big`` with some characters deleted (order kept)."""
    if small == big or not small:
        return True
    if len(small) > len(big):
        return False
    chars = iter(big)
    return all(char in chars for char in small)


def test_is_subsequence_helper() -> None:
    assert is_subsequence("", "abc") and is_subsequence("ac", "abc") and is_subsequence("abc", "abc")
    assert not is_subsequence("ca", "abc")
    assert not is_subsequence("abcd", "abc")
    assert not is_subsequence("aa", "a")
    assert is_subsequence("\ud800x", "a\ud800bx")


def check_program(text: str, program: Program) -> None:
    """Structural guarantees of ``parse``: every line is one literal op call or an error."""
    lines = text.split("\n")
    non_blank = [(no, line.strip()) for no, line in enumerate(lines) if line.strip()]
    assert len(program.ops) + len(program.errors) == len(non_blank)
    for op in program.ops:
        if isinstance(op, RemoveLines):
            assert type(op.start) is int and type(op.end) is int
            assert op.start >= 0 and op.end >= 0
        elif isinstance(op, RemoveStr):
            assert type(op.line) is int and op.line >= 0
            assert type(op.text) is str
        else:
            assert type(op) is KeepAll
        assert parse_line(render_op(op)) == op
    error_lines = {error.line_no for error in program.errors}
    assert len(error_lines) == len(program.errors)
    for error in program.errors:
        assert 0 <= error.line_no < len(lines)
        assert error.text == lines[error.line_no].strip()
        assert error.message.startswith("column ")
        assert len(error.message) < MAX_ERROR_MESSAGE_CHARS
    # Lines that parsed are exactly ``name(...)`` with an optional ";" -- nothing around it.
    ops = iter(program.ops)
    for line_no, stripped in non_blank:
        if line_no in error_lines:
            continue
        op = next(ops)
        assert OP_CALL.match(stripped) and stripped.startswith(op.name), (stripped, op)
        assert stripped.endswith((")", ";")), stripped
        assert parse_line(stripped) == op


def check_result(program: Program, raw: str, guardrails: Guardrails) -> Result:
    """Execution guarantees: deletion-only output and consistent accounting."""
    result = execute(program, raw, guardrails)
    assert result.status in FINAL_STATUSES
    assert len(result.text) <= len(raw)
    assert is_subsequence(result.text, raw)
    assert result.ops_total == len(program.ops)
    assert result.ops_applied + len(result.ops_rejected) == result.ops_total
    assert result.parse_errors == len(program.errors)
    assert {rejected.reason for rejected in result.ops_rejected} <= set(REJECT_REASONS)
    assert 0.0 <= result.deletion_ratio <= 1.0
    assert result.chars_out == len(result.text) and result.chars_in == len(raw)
    if result.status == status.FALLBACK_RAW:
        assert result.text == raw
    return result


# --- the fuzz corpus --------------------------------------------------------------------------

HOSTILE_CHARS = (
    list("()\"'\\,=;-_.[]{}*@#:+%!?`$ \t0123456789azAZ")
    + ["\n", "\r", "\x00", "\x1b", "\x7f", "\x85", "\u00a0", "\u2028", "\u202e", "\u200f"]
    + ["\ufeff", "\ufffd", "\U0001F600", "\ud800", "\udfff", "é", "日", "١", "５", "（", "＂"]
)

LINE_IDS = [
    "0", "1", "5", "16", "39", "40", "41", "007", "0" * 60 + "3", str(10**30), str(10**18),
    str(2**63 - 1), str(2**63), str(2**64 + 1), "9" * 4300, "9" * 4301, "0" * 5000 + "1",
    "-1", "-0", f"-{10**18}", f"-{10**30}", "+5", "--1", "- 1", "1e5", "0x10", "0b1", "1_000",
    "1.0", ".5", "1j", "١٢", "５", "²", "True", "None", "10**30", "~0", "(1)", "[1]", "''",
    "float('inf')", "len('abc')", "__import__('sys').maxsize",
]


def needles(rng: random.Random) -> str:
    """A string literal: quoted substring of the main document, or something hostile."""
    line = rng.choice(MAIN_LINES)
    a, b = sorted(rng.randrange(len(line) + 1) for _ in range(2))
    choice = rng.random()
    if choice < 0.6:
        return quote_string(line[a:b])
    if choice < 0.75:
        return "'" + line[a:b].replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"
    if choice < 0.9:
        return '"' + "".join(rng.choice(HOSTILE_CHARS) for _ in range(rng.randrange(12))) + '"'
    return rng.choice(['""', "''", '"\\u0000"', '"\\ud800\\udc00"', '"\\U0010ffff"', '"\\x41"'])


def valid_line(rng: random.Random, n_lines: int = len(MAIN_LINES)) -> str:
    """One well-formed operation, in one of the syntaxes the grammar allows."""
    i, j = sorted(rng.randrange(n_lines + 2) for _ in range(2))
    kind = rng.random()
    if kind < 0.4:
        forms = [f"remove_lines({i}, {j})", f"remove_lines(start={i}, end={j})",
                 f"remove_lines(end={j}, start={i},)", f"remove_lines( {i:03d} ,{j:03d} );"]
    elif kind < 0.9:
        s = needles(rng)
        forms = [f"remove_str({i}, {s})", f"remove_str(text={s}, line={i})",
                 f"remove_str({i:03d}, text={s});", f"remove_str(\t{i},{s},)"]
    else:
        forms = ["keep_all()", "keep_all( );", "keep_all()"]
    return rng.choice(forms)


def valid_program(rng: random.Random) -> str:
    return "\n".join(valid_line(rng) for _ in range(rng.randint(1, 8)))


def mutate(rng: random.Random, text: str, times: int) -> str:
    """Random character insertions, deletions, swaps, replacements and duplications."""
    chars = list(text)
    for _ in range(times):
        action = rng.randrange(5)
        pos = rng.randrange(len(chars) + 1)
        if action == 0 or not chars:
            chars.insert(pos, rng.choice(HOSTILE_CHARS))
        elif action == 1:
            del chars[min(pos, len(chars) - 1)]
        elif action == 2 and len(chars) > 1:
            p = min(pos, len(chars) - 2)
            chars[p], chars[p + 1] = chars[p + 1], chars[p]
        elif action == 3:
            chars[min(pos, len(chars) - 1)] = rng.choice(HOSTILE_CHARS)
        else:
            end = min(len(chars), pos + rng.randint(1, 10))
            chars[pos:pos] = chars[pos:end]
    return "".join(chars)


def random_bytes(rng: random.Random, errors: str) -> str:
    prefix = rng.choice([b"", b"", b"remove_lines(", b'remove_str(3, "', b"keep_all(", b"\xff\xfe"])
    data = prefix + rng.randbytes(rng.randrange(300))
    if rng.random() < 0.5:  # sprinkle line breaks so that many lines are parsed
        data = b"\n".join(data[k : k + 20] for k in range(0, len(data), 20))
    return data.decode("utf-8", errors=errors)


def random_code_points(rng: random.Random) -> str:
    """Any code points, surrogates and controls included (str allows lone surrogates)."""
    pools = [(0, 0x20), (0x20, 0x7F), (0x7F, 0xA0), (0xD800, 0xE000), (0x202A, 0x2070),
             (0xFFF0, 0x10000), (0x1F300, 0x1FA00), (0xE0000, 0xE0080), (0, 0x110000)]
    out = []
    for _ in range(rng.randrange(200)):
        lo, hi = rng.choice(pools)
        out.append(chr(rng.randrange(lo, hi)))
    return "".join(out)


def id_program(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(1, 5)):
        a, b = rng.choice(LINE_IDS), rng.choice(LINE_IDS)
        lines.append(rng.choice([
            f"remove_lines({a}, {b})", f"remove_lines(start={a}, end={b})",
            f"remove_str({a}, {needles(rng)})", f"remove_str(line={a}, text='x')",
            f"remove_lines({a}, {a})",
        ]))
    return "\n".join(lines)


def unbalanced_program(rng: random.Random) -> str:
    line = valid_line(rng)
    choice = rng.randrange(9)
    if choice == 0:
        return line.replace(")", "", 1)
    if choice == 1:
        return line.replace("(", "(" * rng.randint(2, 50), 1)
    if choice == 2:
        return line + ")" * rng.randint(1, 50)
    if choice == 3:
        pos = rng.randrange(len(line) + 1)
        return line[:pos] + rng.choice("\"'") + line[pos:]
    if choice == 4:
        return line.rstrip(");,") if "remove_str" in line else 'remove_str(1, "abc'
    if choice == 5:
        depth = rng.randint(100, 5000)
        return "remove_lines" + "(" * depth + "1, 2" + ")" * depth
    if choice == 6:
        return 'remove_str(0, "say "hi"")' if rng.random() < 0.5 else "remove_str(0, 'it's')"
    if choice == 7:
        return rng.choice(['remove_str(0, "abc\\")', "remove_str(0, '\\", 'remove_str(0, "\\u12', '"""'])
    return "".join(rng.choice("()\"',\\") for _ in range(rng.randrange(1, 40)))


def unicode_program(rng: random.Random) -> str:
    specials = ["\x00", "\r", "\x1b", "\x1b[2J", "\u202e", "\u202d", "\u200f", "\u2066", "\u200b",
                "\ufeff", "\U0001F600", "\U0001F469\u200d\U0001F4BB", "\ud800", "\udfff",
                "\udc80", "\u2028", "\u2029", "\x85", "\u3000", "\x0b", "\x0c", "\x1c"]
    lines = []
    for _ in range(rng.randint(1, 5)):
        line = valid_line(rng)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(len(line) + 1)
            line = line[:pos] + rng.choice(specials) + line[pos:]
        if rng.random() < 0.3:  # raw (unescaped) specials inside a string literal
            line = f'remove_str({rng.randrange(40)}, "{"".join(rng.choices(specials, k=4))}")'
        lines.append(line)
    return "\n".join(lines)


def build_corpus(sentinel: Path) -> tuple[list[str], dict[str, int], list[tuple[str, str]]]:
    """The deterministic fuzz corpus, per-category counts, and the injection programs."""
    rng = random.Random(20240611)
    categories: dict[str, Callable[[], str]] = {
        "bytes_replace": lambda: random_bytes(rng, "replace"),
        "bytes_surrogateescape": lambda: random_bytes(rng, "surrogateescape"),
        "code_points": lambda: random_code_points(rng),
        "line_ids": lambda: id_program(rng),
        "unbalanced": lambda: unbalanced_program(rng),
        "unicode_controls": lambda: unicode_program(rng),
        "mutated_valid": lambda: mutate(rng, valid_program(rng), rng.randint(1, 6)),
    }
    sizes = {"bytes_replace": 1500, "bytes_surrogateescape": 1500, "code_points": 800,
             "line_ids": 1500, "unbalanced": 1000, "unicode_controls": 1000, "mutated_valid": 2500}
    corpus: list[str] = []
    counts: dict[str, int] = {}
    for name, make in categories.items():
        batch = [make() for _ in range(sizes[name])]
        counts[name] = len(batch)
        corpus += batch
    injections = injected_programs(str(sentinel))
    counts["injections"] = len(injections)
    corpus += [text for text, _ in injections]
    mutated_injections = [mutate(rng, rng.choice(injections)[0], rng.randint(1, 4)) for _ in range(500)]
    counts["mutated_injections"] = len(mutated_injections)
    corpus += mutated_injections
    return corpus, counts, injections


def test_injection_payloads_are_live(tmp_path: Path) -> None:
    """Control: each payload really creates its file when Python runs it.

    Without this the sentinel check below could pass because the payloads were broken.
    """
    control = tmp_path / "control"
    for payload in payload_expressions(str(control)) + payload_statements(str(control)):
        namespace = {"keep_all": KeepAll, "remove_lines": RemoveLines, "remove_str": RemoveStr}
        exec(compile(payload, "<payload>", "exec"), namespace)  # our own trusted test strings
        assert control.exists(), payload
        control.unlink()


def test_fuzzed_programs_never_raise_run_code_or_insert_text(tmp_path: Path) -> None:
    """>= 10,000 deterministic hostile programs through the real parse and execute.

    Any exception fails the test; the sentinel file the payloads would create must not
    exist; every result is a subsequence of its raw document; each program costs at most
    PER_PROGRAM_CPU_SECONDS_MAX.
    """
    sentinel = tmp_path / "pwned"
    corpus, counts, injections = build_corpus(sentinel)
    assert len(corpus) == sum(counts.values()) >= MIN_CORPUS_PROGRAMS
    assert min(counts.values()) >= 400, counts
    assert len(set(corpus)) > 0.9 * len(corpus)  # not a few programs repeated

    totals = {"ops": 0, "errors": 0, "refined": 0}
    slowest = 0.0
    for index, text in enumerate(corpus):
        started = time.process_time()
        program = parse(text)
        check_program(text, program)
        check_result(program, MAIN_DOC, Guardrails())
        lenient = check_result(program, MAIN_DOC, LENIENT)
        check_result(program, SIDE_DOCS[index % len(SIDE_DOCS)], LENIENT)
        slowest = max(slowest, time.process_time() - started)
        totals["ops"] += len(program.ops)
        totals["errors"] += len(program.errors)
        totals["refined"] += lenient.text != MAIN_DOC

    for text, payload in injections:
        program = parse(text)
        assert_payload_lines_are_errors(text, payload, program)

    assert not sentinel.exists()
    assert list(tmp_path.iterdir()) == []
    assert slowest < PER_PROGRAM_CPU_SECONDS_MAX
    # The corpus exercises both sides of the parser and real deletions, not just rejections.
    assert totals["ops"] > 5_000 and totals["errors"] > 10_000 and totals["refined"] > 1_000, totals


def test_payloads_inside_a_string_literal_are_deleted_as_text(tmp_path: Path) -> None:
    """A payload quoted as a ``remove_str`` literal is a string to delete, nothing more."""
    sentinel = tmp_path / "pwned"
    payloads = payload_expressions(str(sentinel)) + payload_statements(str(sentinel))
    raw = "\n".join([BODY] + [f"before {payload} after" for payload in payloads])
    text = "\n".join(f"remove_str({i + 1}, {quote_string(p)})" for i, p in enumerate(payloads))
    program = parse(text)
    assert program.errors == ()
    assert program.ops == tuple(RemoveStr(i + 1, p) for i, p in enumerate(payloads))
    result = execute(program, raw)
    assert result.status == status.REFINED
    assert result.text == "\n".join([BODY] + ["before  after"] * len(payloads))
    assert not sentinel.exists()


@pytest.mark.parametrize("atom", LINE_IDS)
def test_line_id_atoms_are_exact_ints_or_errors(atom: str) -> None:
    """Ids are unbounded non-negative ints read exactly (no float, no wrap-around); every
    other spelling (sign, exponent, hex, Unicode digits, expressions) is a parse error.
    Huge ids are rejected as out of range at execution, not crashed on."""
    program = parse(f"remove_lines({atom}, {atom})\nremove_str({atom}, \"a\")")
    check_program(f"remove_lines({atom}, {atom})\nremove_str({atom}, \"a\")", program)
    if re.fullmatch(r"[0-9]+", atom) and len(atom) <= 4300:
        value = int(atom)
        assert program.ops == (RemoveLines(value, value), RemoveStr(value, "a"))
        result = execute(program, MAIN_DOC, LENIENT)
        if value >= len(MAIN_LINES):
            assert result.rejected_by_reason() == {"line_out_of_range": 2}
            assert result.text == MAIN_DOC
    else:
        assert program.ops == () and len(program.errors) == 2


# --- hypothesis: hostile fragments -------------------------------------------------------------

FRAGMENTS = st.one_of(
    st.sampled_from(["remove_lines", "remove_str", "keep_all", "__import__", "eval", "exec",
                     "compile", "open", "lambda", "os", "system", "f", "r", "b", "globals"]),
    st.sampled_from(list("()[]{}.,:;=*@#+-%'\"\\ \t\n\r\x00")),
    st.integers(min_value=-(10**40), max_value=10**40).map(str),
    st.text(alphabet=st.characters(exclude_categories=()), max_size=12).map(quote_string),
    st.text(alphabet=st.characters(exclude_categories=()), max_size=12),
)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(FRAGMENTS, max_size=40).map("".join),
    st.text(alphabet=st.characters(exclude_categories=()), max_size=300),
    st.floats(0.0, 1.0),
    st.integers(0, 60),
)
def test_hostile_fragment_soup(text: str, raw: str, ratio: float, min_kept: int) -> None:
    """Python-ish fragment soup over arbitrary documents (surrogates included)."""
    program = parse(text)
    check_program(text, program)
    check_result(program, raw, Guardrails(ratio, min_kept))
    check_result(program, raw, LENIENT)


# --- the 100,000-operation program -----------------------------------------------------------


def big_document() -> str:
    return "\n".join(f"{i:05d} " + "ab" * 24 + " lorem ipsum é 日本 \U0001F600" for i in range(BIG_DOCUMENT_LINES))


def big_program() -> tuple[str, int, str]:
    """A 100,000-op program mixing every op, syntax and rejection reason.

    Returns (program text, number of rejected ops, expected output text). Lines ``i % 4 ==
    3`` are removed (in descending order, the worst case for keeping ranges sorted); every
    other line loses its first 8 of 24 "ab" pairs, 8 ``remove_str`` ops per line.
    """
    n = BIG_DOCUMENT_LINES
    removed = range(n - 1, -1, -4)  # i % 4 == 3, descending
    kept = [i for i in range(n) if i % 4 != 3]
    lines: list[str] = [f"remove_lines({i}, {i})" for i in removed]  # 2,500 applied
    syntaxes = ['remove_str({i}, "ab")', "remove_str(line={i:05d}, text='ab');",
                'remove_str(text="\\u0061b", line={i})', 'remove_str( {i} , "a\\U00000062" , )']
    for i in kept:  # 60,000 applied
        lines += [syntaxes[k % 4].format(i=i) for k in range(8)]
    rejected = [f"remove_lines(start={i}, end={i})" for i in list(removed)[:1000]]  # overlap
    rejected += [f"remove_lines({i + 1}, {i})" for i in range(500)]  # bad_range
    rejected += [f"remove_lines({10**30}, {10**30 + 1})" for _ in range(250)]  # out of range
    rejected += [f"remove_lines(0, {n})" for _ in range(250)]  # out of range
    rejected += [f'remove_str({i}, "ab")' for i in removed]  # line_removed: 2,500
    rejected += [f'remove_str({i}, "not in the line \\u0000")' for i in kept[:2000]]  # not found
    rejected += [f'remove_str({i}, "{"ab" * 24}")' for i in kept[:1000]]  # overlap
    rejected += [f'remove_str({i}, "")' for i in kept[:500]]  # empty_string
    rejected += [f'remove_str({10**18 + i}, "x")' for i in range(500)]  # out of range
    rng = random.Random(7)
    rng.shuffle(rejected)  # none of them can be accepted, so their order does not matter
    lines += rejected
    lines += ["keep_all()" if k % 2 else "  keep_all() ;  " for k in range(BIG_PROGRAM_OPS - len(lines))]
    assert len(lines) == BIG_PROGRAM_OPS
    expected = "\n".join(f"{i:05d} " + "ab" * 16 + " lorem ipsum é 日本 \U0001F600" for i in kept)
    return "\n".join(lines), len(rejected), expected


def test_big_program_has_bounded_cost() -> None:
    """100,000 ops on a 10,000-line document: exact result, CPU and memory under the ceilings."""
    raw = big_document()
    text, n_rejected, expected = big_program()

    started = time.process_time()
    result = execute(parse(text), raw)
    cpu_seconds = time.process_time() - started

    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        traced_result = execute(parse(text), raw)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    peak_mib = peak / 2**20

    for res in (result, traced_result):
        assert res.status == status.REFINED
        assert res.ops_total == BIG_PROGRAM_OPS and res.parse_errors == 0
        assert len(res.ops_rejected) == n_rejected
        assert res.ops_applied == BIG_PROGRAM_OPS - n_rejected
        assert res.text == expected
        assert is_subsequence(res.text, raw)
    assert result.rejected_by_reason() == {
        "overlap": 2000, "bad_range": 500, "line_out_of_range": 1000, "line_removed": 2500,
        "string_not_found": 2000, "empty_string": 500,
    }
    assert cpu_seconds < BIG_PROGRAM_CPU_SECONDS_MAX, cpu_seconds
    assert peak_mib < BIG_PROGRAM_PEAK_MIB_MAX, peak_mib


def test_many_remove_str_on_one_line_cost_as_much_as_on_many_lines() -> None:
    """k identical ``remove_str`` ops on one line should cost about what k ops on k lines
    cost (same document size, same needle): a large ratio means per-op work grows with
    the ops already applied to the line, i.e. quadratic cost for one hostile program."""
    k, width = 700, 50
    one_line = Program(tuple(RemoveStr(0, "a") for _ in range(k)))
    many_lines = Program(tuple(RemoveStr(i, "a") for i in range(k)))
    one_raw, many_raw = "a" * (k * width), "\n".join(["a" * width] * k)

    def cost(program: Program, raw: str) -> float:
        started = time.process_time()
        result = execute(program, raw, LENIENT)
        assert result.ops_applied == k
        return time.process_time() - started

    ratio = float("inf")
    for _ in range(3):  # best of three, to shrug off a busy neighbour
        ratio = min(ratio, cost(one_line, one_raw) / max(cost(many_lines, many_raw), 1e-4))
        if ratio < 25:
            break
    assert ratio < 25, ratio


def test_distinct_strings_on_one_long_line_have_bounded_cost() -> None:
    """The worst case left for ``remove_str``: k *distinct* strings on one line of L chars,
    each searched from the line's start (no earlier search of the same string to resume
    from): at most k * L character comparisons, in C. 5,000 strings near the end of a
    500,000-char line (2.5e9 comparisons at most) must stay under the big program's ceilings."""
    words = [f"w{i:06d}" for i in range(500_000 // 8)]
    raw = " ".join(words)
    chosen = words[-5000:]
    random.Random(3).shuffle(chosen)
    program = Program(tuple(RemoveStr(0, f" {w}") for w in chosen))

    started = time.process_time()
    result = execute(program, raw, LENIENT)
    cpu_seconds = time.process_time() - started
    tracemalloc.start()
    try:
        execute(program, raw, LENIENT)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert result.ops_applied == 5000 and not result.ops_rejected
    assert result.text == " ".join(words[:-5000])
    assert cpu_seconds < BIG_PROGRAM_CPU_SECONDS_MAX, cpu_seconds
    assert peak / 2**20 < BIG_PROGRAM_PEAK_MIB_MAX, peak / 2**20
