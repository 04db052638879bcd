"""Grammar-constrained decoding: automaton, token table, trie walk, logits processor, regex."""
from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path
from typing import Optional

import pytest

torch = pytest.importorskip("torch")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from refinex.model.backends.base import GenerationRequest  # noqa: E402
from refinex.model.constrained import (  # noqa: E402
    NewlineStopCriteria,
    ProgramAutomaton,
    ProgramLogitsProcessor,
    TokenTable,
    complete_prefix,
    drop_unsure_ops,
    escape_char,
    int_range_regex,
    op_confidences,
    program_regex,
    token_table_for,
)
from refinex.program import execute, parse, render_program  # noqa: E402
from refinex.program.ops import Program, RemoveLines, RemoveStr  # noqa: E402

LINES = [
    "Home | About | Contact",
    "Share on Facebook",
    'Real text, with "quotes" and a \\ backslash\tand a tab\rand CR',
    "",
    "café ünïcode 😀 end\u200b\x00",
]
FIRST = 10
RAW = "\n".join(["filler"] * FIRST + LINES + ["after"])


def _valid_for(text: str, raw: str) -> bool:
    program = parse(text)
    return not program.errors and not execute(program, raw).ops_rejected


@pytest.fixture(scope="module")
def automaton() -> ProgramAutomaton:
    return ProgramAutomaton(FIRST, FIRST + len(LINES) - 1, LINES)


# -- automaton -------------------------------------------------------------------------

VALID = [
    "",
    "keep_all()",
    "keep_all()\n",
    "keep_all()\n\n",
    "remove_lines(10, 11)\n",
    'remove_lines(10, 11)\nremove_str(12, "\\"quotes\\"")\n',
    'remove_str(12, "\\t")\n',
    'remove_str(12, " \\\\ ")\n',
    'remove_str(12, "\\r")\n',
    'remove_str(14, "😀")\n',
    'remove_str(14, "\\u200b\\u0000")\n',
    'remove_str(14, "é")\nremove_str(14, "ü")\n',
    "remove_lines(13, 13)\n\n",
    'remove_str(10, "Home")\nremove_lines(11, 11)',
    'remove_str(10, "Home")\nremove_str(10, " | ")\nremove_str(10, " | ")\n',
    "remove_lines(14, 14)\nremove_lines(10, 13)\n",
]

INVALID = [
    "keep_all()\nremove_lines(10, 10)\n",  # keep_all only alone
    "remove_lines(10, 10)\nkeep_all()\n",
    "remove_lines(11, 10)\n",  # start > end
    "remove_lines(9, 10)\n",  # outside the chunk
    "remove_lines(15, 15)\n",
    "remove_lines(010, 11)\n",  # leading zero
    "remove_lines(10, 11)\nremove_lines(11, 12)\n",  # overlap
    'remove_str(13, "x")\n',  # empty line
    'remove_str(12, "")\n',  # empty string
    'remove_str(12, "\tand")\n',  # tab must be escaped
    'remove_str(14, "\\u00e9")\n',  # printable characters are not escaped
    'remove_str(10, "Home")\nremove_lines(10, 11)\n',  # remove_lines runs first: line_removed
    'remove_lines(10, 10)\nremove_str(10, "Home")\n',
    'remove_str(10, "Home")\nremove_str(10, "Home")\n',  # only one occurrence
    'remove_str(10, "Home")\nremove_str(10, "e |")\n',  # overlaps the deleted span
    'remove_str(11, "Facebook Home")\n',  # not in the line
    "remove_lines(10,10)\n",  # not canonical spacing
    "\nremove_lines(10, 10)",
    "remove_lines(10, 10)\n\nremove_lines(11, 11)\n",  # nothing after a blank line
    "remove_lines(10, 10))",
    "keep_all",
]


@pytest.mark.parametrize("text", VALID)
def test_automaton_accepts_valid_programs(automaton: ProgramAutomaton, text: str) -> None:
    assert automaton.matches(text)
    assert _valid_for(text, RAW)


@pytest.mark.parametrize("text", INVALID)
def test_automaton_rejects_invalid_programs(automaton: ProgramAutomaton, text: str) -> None:
    assert not automaton.matches(text)


def test_automaton_accepts_rendered_programs(automaton: ProgramAutomaton) -> None:
    program = Program(
        (RemoveLines(10, 11), RemoveStr(12, '"quotes"'), RemoveStr(12, "\t"), RemoveStr(14, "\x00"))
    )
    text = render_program(program) + "\n"
    assert automaton.matches(text)
    assert parse(text) == program


def test_allowed_bytes_are_exact(automaton: ProgramAutomaton) -> None:
    rng = random.Random(3)
    for _ in range(40):
        state: Optional[tuple] = automaton.initial()
        for _ in range(60):
            assert state is not None
            allowed = automaton.allowed_bytes(state)
            brute = tuple(b for b in range(256) if automaton.step(state, b) is not None)
            assert allowed == brute
            if not allowed:
                break
            state = automaton.step(state, rng.choice(allowed))


def test_every_reachable_state_can_finish(automaton: ProgramAutomaton) -> None:
    """No dead ends: from every state reached by allowed bytes, eos is reachable."""
    rng = random.Random(5)
    for _ in range(60):
        state: Optional[tuple] = automaton.initial()
        for _ in range(80):
            assert state is not None
            allowed = automaton.allowed_bytes(state)
            assert allowed or automaton.accepts_eos(state)
            if not allowed:
                break
            state = automaton.step(state, rng.choice(allowed))


def test_without_lines_remove_str_is_not_allowed() -> None:
    automaton = ProgramAutomaton(3, 5)
    assert automaton.matches("remove_lines(3, 5)\n")
    assert not automaton.matches('remove_str(3, "x")\n')


def test_complete_prefix_drops_a_cut_off_op(automaton: ProgramAutomaton) -> None:
    data = b'remove_lines(10, 10)\nremove_str(11, "Sha'
    assert complete_prefix(automaton, data) == b"remove_lines(10, 10)\n"
    assert complete_prefix(automaton, b"remove_lin") == b""


def test_escape_char_matches_renderer() -> None:
    assert escape_char("\t") == "\\t"
    assert escape_char('"') == '\\"'
    assert escape_char("é") == "é"
    assert escape_char("\x00") == "\\u0000"


# -- token table -----------------------------------------------------------------------


def _adversarial_table() -> TokenTable:
    """Single bytes, tokens spanning several grammar elements, split UTF-8, and eos."""
    pieces = [bytes((b,)) for b in range(256)]
    pieces += [
        b")\nremove_lines(", b")\nremove_str(", b")\n", b'")\n', b'")', b', "', b", ", b"\n\n",
        b"keep_all()\n", b"keep_all()", b"remove_", b"lines(", b"str(", b"remove_lines(1",
        b"12", b"123", b"1", b"10, 1", b"14, \"", b"\\\"", b"\\u", b"\\u00", b"00", b"200b",
        b"\\t", b"\\\\", b"caf", b"\xc3", b"\xa9", b"\xc3\xa9", b"\xf0\x9f", b"\x98\x80", b" end",
        b"Home", b" |", b"Share on", b" Facebook", b"quotes\\\"", b"\")\n\n", b"e ",
    ]
    eos = len(pieces)
    return TokenTable(pieces + [None], [eos])


@pytest.fixture(scope="module")
def tiny_table(tiny_model_dir: Path) -> TokenTable:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir), local_files_only=True)
    return token_table_for(tokenizer)


def test_byte_level_table_round_trips(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir), local_files_only=True)
    table = TokenTable.from_tokenizer(tokenizer)
    assert table.token_bytes[tokenizer.eos_token_id] is None  # special tokens have no bytes
    assert table.token_bytes[tokenizer.pad_token_id] is None
    for text in ['remove_str(12, "Share this")\n', "café 😀\t\\ \"x\"\n\n", " leading space"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert table.decode(ids) == text


def test_metaspace_byte_fallback_table() -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"], show_progress=False)
    corpus = ["remove_lines(3, 7)", 'remove_str(12, "Share this")', "keep_all()"] * 20
    trained.train_from_iterator(corpus, trainer=trainer)
    # SentencePiece conversions keep the <0xNN> byte pieces in the model vocabulary.
    model_json = json.loads(trained.to_str())["model"]
    vocab = dict(model_json["vocab"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model_json["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")
    table = TokenTable.from_tokenizer(tokenizer)
    assert table.token_bytes[tok.token_to_id("<0x0A>")] == b"\n"
    assert table.token_bytes[tok.token_to_id("<0xC3>")] == b"\xc3"
    text = 'remove_str(12, "Share é")\nkeep_all()'
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert table.decode(ids) == text
    assert table.eos_ids == (tok.token_to_id("</s>"),)


def _brute_force(table: TokenTable, automaton: ProgramAutomaton, state: tuple) -> set[int]:
    return {
        token_id
        for token_id, data in enumerate(table.token_bytes)
        if data is not None
        and token_id not in table.eos_ids
        and automaton.feed(state, data) is not None
    }


def _random_states(automaton: ProgramAutomaton, rng: random.Random, n: int) -> list[tuple]:
    states = []
    for _ in range(n):
        state: Optional[tuple] = automaton.initial()
        for _ in range(rng.randint(0, 50)):
            assert state is not None
            allowed = automaton.allowed_bytes(state)
            if not allowed:
                break
            state = automaton.step(state, rng.choice(allowed))
        assert state is not None
        states.append(state)
    return states


def test_trie_walk_equals_brute_force_adversarial(automaton: ProgramAutomaton) -> None:
    table = _adversarial_table()
    for state in _random_states(automaton, random.Random(11), 80):
        assert set(table.walk(automaton, state)) == _brute_force(table, automaton, state)


def test_trie_walk_equals_brute_force_tiny(automaton: ProgramAutomaton, tiny_table: TokenTable) -> None:
    for state in _random_states(automaton, random.Random(12), 25):
        assert set(tiny_table.walk(automaton, state)) == _brute_force(tiny_table, automaton, state)


# -- logits processor fuzzing ----------------------------------------------------------

_ALPHABET = list("abcXYZ 019|,.()\"'\\\t\r") + ["é", "ü", "😀", "\u200b", "\x00", "漢"]


@st.composite
def chunks(draw: st.DrawFn) -> tuple[int, list[str]]:
    first = draw(st.integers(min_value=0, max_value=1500))
    n = draw(st.integers(min_value=1, max_value=6))
    lines = [
        "".join(draw(st.lists(st.sampled_from(_ALPHABET), min_size=0, max_size=14)))
        for _ in range(n)
    ]
    return first, lines


def _decode_random(
    table: TokenTable,
    requests: list[GenerationRequest],
    seed: int,
    mode: str,
    eos_bias: float,
    steps: int = 48,
) -> list[tuple[list[int], bool]]:
    """Decode every request with random logits through the processor; (ids, ended)."""
    generator = torch.Generator().manual_seed(seed)
    automata = [r.automaton() for r in requests]
    processor = ProgramLogitsProcessor(automata, table, mode=mode, top_k=4)
    rows = len(requests)
    input_ids = torch.zeros((rows, 3), dtype=torch.long)
    ended = [False] * rows
    generated: list[list[int]] = [[] for _ in range(rows)]
    eos = table.eos_ids[0]
    for _ in range(steps):
        scores = torch.randn((rows, table.vocab_size), generator=generator) * 4.0
        scores[:, eos] += eos_bias
        processed = processor(input_ids, scores)
        if mode == "greedy":
            tokens = processed.argmax(dim=-1)
        else:
            probs = torch.softmax(processed, dim=-1)
            tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        for row, token in enumerate(tokens.tolist()):
            if ended[row]:
                continue
            if token == eos:
                ended[row] = True
            else:
                generated[row].append(token)
        if all(ended):
            break
        input_ids = torch.cat([input_ids, tokens[:, None]], dim=1)
    return list(zip(generated, ended))


def _check_outputs(
    table: TokenTable, requests: list[GenerationRequest], raws: list[str], results: list
) -> None:
    for request, raw, (ids, ended) in zip(requests, raws, results):
        automaton = request.automaton()
        data = table.decode_bytes(ids)
        if ended:  # eos was only allowed where the program may end
            assert automaton.accepts_eos(automaton.feed(automaton.initial(), data)), data
        else:  # every generated byte was allowed
            assert automaton.feed(automaton.initial(), data) is not None, data
        text = complete_prefix(automaton, data).decode("utf-8")
        program = parse(text)
        assert program.errors == (), (text, program.errors)
        assert execute(program, raw).ops_rejected == (), text


def _requests(drawn: list[tuple[int, list[str]]]) -> tuple[list[GenerationRequest], list[str]]:
    requests, raws = [], []
    for first, lines in drawn:
        requests.append(GenerationRequest(f"prompt {first}", first, first + len(lines) - 1, tuple(lines)))
        raws.append("\n".join(["x"] * first + lines + ["tail"]))
    return requests, raws


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    drawn=st.lists(chunks(), min_size=1, max_size=4),
    seed=st.integers(0, 2**31 - 1),
    mode=st.sampled_from(["greedy", "mask"]),
    eos_bias=st.sampled_from([-30.0, -4.0, 0.0, 4.0]),
)
def test_fuzz_adversarial_table_never_yields_invalid_programs(
    drawn: list[tuple[int, list[str]]], seed: int, mode: str, eos_bias: float
) -> None:
    table = _adversarial_table()
    requests, raws = _requests(drawn)
    _check_outputs(table, requests, raws, _decode_random(table, requests, seed, mode, eos_bias))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    drawn=st.lists(chunks(), min_size=1, max_size=4),
    seed=st.integers(0, 2**31 - 1),
    mode=st.sampled_from(["greedy", "mask"]),
    eos_bias=st.sampled_from([-30.0, 0.0]),
)
def test_fuzz_tiny_tokenizer_never_yields_invalid_programs(
    tiny_table: TokenTable, drawn: list[tuple[int, list[str]]], seed: int, mode: str, eos_bias: float
) -> None:
    requests, raws = _requests(drawn)
    _check_outputs(tiny_table, requests, raws, _decode_random(tiny_table, requests, seed, mode, eos_bias))


def test_random_logits_are_mostly_invalid_without_constraints(tiny_table: TokenTable) -> None:
    """The same random logits, unconstrained, almost never spell a valid program."""
    generator = torch.Generator().manual_seed(0)
    first, lines = 40, ["Share on Facebook", "Body text here."]
    raw = "\n".join(["x"] * first + lines)
    invalid = 0
    for _ in range(20):
        ids = torch.randn((24, tiny_table.vocab_size), generator=generator).argmax(-1).tolist()
        text = tiny_table.decode(i for i in ids if i not in tiny_table.eos_ids)
        invalid += not _valid_for(text, raw)
    assert invalid >= 18


def test_greedy_processor_follows_the_model_and_falls_back(automaton: ProgramAutomaton) -> None:
    table = _adversarial_table()
    processor = ProgramLogitsProcessor([automaton], table, mode="greedy", top_k=4)
    input_ids = torch.zeros((1, 1), dtype=torch.long)
    picks = []
    for preferences in ({"r": 10.0, "k": 9.0}, {"x": 10.0, "e": 9.0}, {"q": 10.0, "m": -5.0}):
        scores = torch.zeros((1, table.vocab_size))
        for char, value in preferences.items():
            scores[0, ord(char)] = value
        processed = processor(input_ids, scores)
        token = int(processed.argmax())
        assert int((processed > torch.finfo(processed.dtype).min).sum()) == 1
        picks.append(chr(token))
        input_ids = torch.cat([input_ids, torch.tensor([[token]])], dim=1)
    # the model's choice when valid, the best valid top-k candidate, then the trie walk
    assert picks == ["r", "e", "m"]
    assert processor.fallbacks == 1


def test_newline_stop_criteria_stops_rows_independently() -> None:
    table = TokenTable([b"a", b"\n", b"\n\n", b"b\n", b"\nc"], [])
    criteria = NewlineStopCriteria(table, "cpu")
    rows = [[0, 1, 1], [3, 1, 0], [0, 2, 0], [4, 1, 0]]
    stops = []
    ids = torch.zeros((4, 1), dtype=torch.long)
    for step in range(3):
        ids = torch.cat([ids, torch.tensor([[r[step]] for r in rows])], dim=1)
        stops.append(criteria(ids, None).tolist())
    assert stops == [
        [False, False, False, False],
        [False, True, True, False],
        [True, True, True, False],  # stopped rows stay stopped
    ]


# -- regex -----------------------------------------------------------------------------


def test_int_range_regex_exhaustive() -> None:
    for lo in range(0, 130, 7):
        for hi in list(range(lo, 1300, 41)) + [lo, 999, 1000]:
            if hi < lo:
                continue
            pattern = re.compile(int_range_regex(lo, hi))
            for value in range(0, 1400):
                assert bool(pattern.fullmatch(str(value))) == (lo <= value <= hi), (lo, hi, value)
            assert not pattern.fullmatch("0" + str(max(lo, 1)))


@pytest.mark.parametrize("with_lines", [True, False])
def test_program_regex_matches_valid_programs(with_lines: bool) -> None:
    lines = LINES if with_lines else ()
    pattern = re.compile(program_regex(FIRST, FIRST + len(LINES) - 1, lines))
    for text in VALID:
        if not text.strip():
            continue
        assert pattern.fullmatch(text.rstrip("\n") + "\n"), text


@pytest.mark.parametrize(
    "text",
    [
        "keep_all()\nremove_lines(10, 10)\n",
        "remove_lines(9, 10)\n",
        "remove_lines(15, 15)\n",
        "remove_lines(010, 11)\n",
        'remove_str(13, "x")\n',
        'remove_str(12, "")\n',
        'remove_str(12, "\tand")\n',
        "remove_lines(10,10)\n",
        "remove_lines(10, 10)",
        "remove_lines(10, 10)\n\n",
        'remove_str(11, "Sharq")\n',  # "q" is not a character of line 11
        "",
    ],
)
def test_program_regex_rejects_invalid_programs(text: str) -> None:
    pattern = re.compile(program_regex(FIRST, FIRST + len(LINES) - 1, LINES))
    assert not pattern.fullmatch(text)


def test_program_regex_of_request() -> None:
    request = GenerationRequest.for_lines(["a b", "c"], 998)
    pattern = re.compile(request.regex())
    assert pattern.fullmatch('remove_lines(998, 999)\nremove_str(999, "c")\n')
    assert not pattern.fullmatch("remove_lines(1000, 1000)\n")


def test_op_confidences_take_the_least_likely_token_of_each_line() -> None:
    pieces = [b"remove_lines(", b"3", b", 4", b")\nremove_", b"str(5, \"a", b"\")\n"]
    logprobs = [math.log(0.9), math.log(0.5), math.log(0.8), math.log(0.7), math.log(0.2), math.log(0.95)]
    program = b"".join(pieces)
    lines = op_confidences(pieces, logprobs, program)
    assert [line for line, _ in lines] == [b"remove_lines(3, 4)\n", b'remove_str(5, "a")\n']
    # ")\nremove_" (0.7) counts for both lines
    assert [round(p, 6) for _, p in lines] == [0.5, 0.2]
    # a kept prefix (complete_prefix dropped a cut-off op) keeps the confidences of its lines
    cut = op_confidences(pieces[:5], logprobs[:5], b"remove_lines(3, 4)\n")
    assert [(line, round(p, 6)) for line, p in cut] == [(b"remove_lines(3, 4)\n", 0.5)]
    assert drop_unsure_ops(lines, 0.3) == (b"remove_lines(3, 4)\n", 1)
    assert drop_unsure_ops(lines, 0.1) == (program, 0)
    assert drop_unsure_ops(lines, 0.6) == (b"", 2)
    assert drop_unsure_ops([(b"keep_all()\n", 0.9), (b"\n", 0.01)], 0.5) == (b"keep_all()\n\n", 0)
    with pytest.raises(ValueError):
        op_confidences(pieces, logprobs[:2], program)


def test_greedy_processor_records_the_models_probabilities(automaton: ProgramAutomaton) -> None:
    table = _adversarial_table()
    processor = ProgramLogitsProcessor([automaton, automaton], table, mode="greedy", top_k=4, record=True)
    scores = torch.zeros((2, table.vocab_size))
    scores[0, ord("r")] = 3.0  # valid first byte of remove_...: chosen, with its softmax probability
    scores[1, ord("x")] = 5.0  # invalid: the valid fallback's (lower) probability is recorded
    processor(torch.zeros((2, 1), dtype=torch.long), scores.clone())
    expected = scores.log_softmax(-1)
    recorded = processor.token_logprobs()
    assert recorded[0] == [pytest.approx(float(expected[0, ord("r")]), abs=1e-5)]
    assert recorded[1][0] < float(expected[1, ord("x")])
    with pytest.raises(ValueError):
        ProgramLogitsProcessor([automaton], table, mode="mask", record=True)
