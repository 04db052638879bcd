"""SFT pair construction: chunk targets, global line ids, merge invariant, split."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from refinex.chunking import (
    chunk_document,
    hf_token_counter,
    merge_chunk_programs,
    program_for_chunk,
    whitespace_token_count,
)
from refinex.model.prompts import build_prompt, build_target
from refinex.model.sft import (
    TRAIN,
    VALIDATION,
    InvalidProgramError,
    SftPair,
    assign_split,
    build_sft_pairs,
    sft_pair_fields,
    split_pairs,
)
from refinex.program import (
    Guardrails,
    KeepAll,
    Program,
    RemoveLines,
    RemoveStr,
    execute,
    parse,
    render_program,
)

LENIENT = Guardrails(max_error_ratio=1.0, min_kept_chars=0)

WORDS = "the a cookie share news article science city river data model line text".split()


def make_doc(rng: random.Random, n_lines: int) -> str:
    return "\n".join(
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 9))) for _ in range(n_lines)
    )


def make_program(rng: random.Random, raw: str) -> Program:
    """A random well-formed deletion program: disjoint line ranges plus substring removals."""
    lines = raw.split("\n")
    ops: list = []
    line = 0
    removed: set[int] = set()
    while line < len(lines):
        if rng.random() < 0.15:
            end = min(len(lines) - 1, line + rng.randint(0, 6))
            ops.append(RemoveLines(line, end))
            removed.update(range(line, end + 1))
            line = end + 2
        else:
            line += 1
    for i, text in enumerate(lines):
        if i not in removed and text and rng.random() < 0.2:
            words = text.split()
            ops.append(RemoveStr(i, rng.choice(words)))
    rng.shuffle(ops)
    return Program(tuple(ops))


def test_one_pair_per_chunk_with_the_chunks_part_of_the_program() -> None:
    rng = random.Random(7)
    raw = make_doc(rng, 120)
    program = make_program(rng, raw)
    pairs = build_sft_pairs("doc-a", raw, render_program(program), whitespace_token_count, max_tokens=60)
    chunks = chunk_document(raw, whitespace_token_count, max_tokens=60)
    assert len(chunks) > 3 and len(pairs) == len(chunks)
    for pair, chunk in zip(pairs, chunks):
        assert (pair.doc_id, pair.chunk_idx) == ("doc-a", chunk.index)
        assert (pair.start_line, pair.end_line) == (chunk.start_line, chunk.end_line)
        assert pair.prompt == build_prompt(chunk.text)
        expected = build_target(render_program(program_for_chunk(program, chunk)))
        assert pair.target == expected
        assert pair.target.endswith("\n") and not pair.target.endswith("\n\n")
        assert pair.n_prompt_tokens == whitespace_token_count(pair.prompt)
        target = parse(pair.target)
        assert not target.errors and target.ops
        for op in target.ops:  # line ids stay global and inside the chunk
            if isinstance(op, RemoveLines):
                assert chunk.start_line <= op.start <= op.end <= chunk.end_line
            elif isinstance(op, RemoveStr):
                assert chunk.contains(op.line)
                assert f"[{op.line:03d}] " in pair.prompt
    covered = [i for p in pairs for i in range(p.start_line, p.end_line + 1)]
    assert covered == list(range(len(raw.split("\n"))))


def test_chunk_without_deletions_gets_keep_all() -> None:
    raw = "\n".join(f"line {i} with words" for i in range(40))
    program = "remove_lines(2, 3)\nremove_str(5, \"words\")"
    pairs = build_sft_pairs("d", raw, program, whitespace_token_count, max_tokens=30)
    assert len(pairs) > 2
    assert pairs[0].target == 'remove_lines(2, 3)\nremove_str(5, "words")\n'
    assert all(p.target == "keep_all()\n" for p in pairs[1:])


def test_line_ids_are_global_in_later_chunks() -> None:
    raw = "\n".join(f"w{i} x y z" for i in range(50))
    pairs = build_sft_pairs("d", raw, "remove_lines(41, 44)\nremove_str(47, \"x \")", whitespace_token_count, max_tokens=25)
    last = [p for p in pairs if p.start_line <= 41 <= p.end_line][0]
    assert last.start_line > 0
    assert "remove_lines(41, " in last.target
    assert "[041] w41 x y z" in last.prompt


def test_range_spanning_chunks_is_clipped_per_chunk() -> None:
    raw = "\n".join(f"a{i} b c" for i in range(30))
    pairs = build_sft_pairs("d", raw, "remove_lines(3, 25)", whitespace_token_count, max_tokens=20)
    ranges = [op for p in pairs for op in parse(p.target).ops if isinstance(op, RemoveLines)]
    assert len(ranges) > 1
    assert merge_chunk_programs([parse(p.target) for p in pairs]).ops == (RemoveLines(3, 25),)


@pytest.mark.parametrize("seed", range(40))
def test_merged_chunk_targets_execute_like_the_document_program(seed: int) -> None:
    rng = random.Random(seed)
    raw = make_doc(rng, rng.randint(1, 150))
    program = make_program(rng, raw)
    max_tokens = rng.choice([12, 25, 60, 1500])
    pairs = build_sft_pairs(f"doc-{seed}", raw, program, whitespace_token_count, max_tokens=max_tokens)
    merged = merge_chunk_programs([parse(p.target) for p in pairs])
    expected = execute(program, raw, LENIENT)
    got = execute(merged, raw, LENIENT)
    assert got.text == expected.text
    assert len({p.split for p in pairs}) == 1


def test_empty_and_keep_all_programs() -> None:
    raw = "one\ntwo\nthree"
    for program in ("", "keep_all()", Program((KeepAll(),))):
        pairs = build_sft_pairs("d", raw, program, whitespace_token_count)
        assert [p.target for p in pairs] == ["keep_all()\n"]


def test_program_with_parse_errors_is_rejected() -> None:
    with pytest.raises(InvalidProgramError, match="parse error"):
        build_sft_pairs("d", "a\nb", "remove_lines(0, 1)\ndelete everything", whitespace_token_count)


def test_pairs_with_a_real_tokenizer(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    count = hf_token_counter(tokenizer)
    rng = random.Random(3)
    raw = make_doc(rng, 200)
    program = make_program(rng, raw)
    pairs = build_sft_pairs("doc-hf", raw, program, count, max_tokens=300)
    assert len(pairs) > 1
    for pair in pairs:
        assert pair.n_prompt_tokens == count(pair.prompt)
    merged = merge_chunk_programs([parse(p.target) for p in pairs])
    assert execute(merged, raw, LENIENT).text == execute(program, raw, LENIENT).text


def test_split_is_pinned_and_stable() -> None:
    # Pinned values: the split must not change across runs, machines or Python versions.
    assert [assign_split(f"doc-{i}") for i in range(12)] == [TRAIN] * 10 + [VALIDATION, TRAIN]
    assert [assign_split(f"doc-{i}", 0.5) for i in range(6)] == [
        VALIDATION, TRAIN, TRAIN, TRAIN, VALIDATION, TRAIN
    ]


def test_split_fraction_bounds_and_monotonicity() -> None:
    ids = [f"https://example.org/page/{i}" for i in range(10000)]
    share = sum(assign_split(d) == VALIDATION for d in ids) / len(ids)
    assert 0.085 < share < 0.115
    assert all(assign_split(d, 0.0) == TRAIN for d in ids[:200])
    assert all(assign_split(d, 1.0) == VALIDATION for d in ids[:200])
    small = {d for d in ids if assign_split(d, 0.05) == VALIDATION}
    large = {d for d in ids if assign_split(d, 0.2) == VALIDATION}
    assert small < large
    with pytest.raises(ValueError):
        assign_split("x", 1.5)


def test_split_pairs_by_document_and_rows_round_trip() -> None:
    pairs = []
    for i in range(60):
        raw = "\n".join(f"doc {i} line {j}" for j in range(20))
        pairs += build_sft_pairs(f"doc-{i}", raw, "remove_lines(0, 1)", whitespace_token_count, max_tokens=30, validation_fraction=0.3)
    train, validation = split_pairs(pairs)
    assert train and validation
    assert {p.doc_id for p in train}.isdisjoint({p.doc_id for p in validation})
    assert all(p.split == VALIDATION for p in validation)
    rows = [p.to_row() for p in pairs]
    assert list(rows[0]) == list(sft_pair_fields())
    assert [SftPair.from_row(r) for r in rows] == pairs
    re_train, re_validation = split_pairs(rows, validation_fraction=0.0)
    assert not re_validation and len(re_train) == len(pairs)
