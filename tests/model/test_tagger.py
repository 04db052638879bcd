"""The baseline line tagger on synthetic documents."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

pytest.importorskip("sklearn")

from refinex.model.tagger import LineTagger, line_labels, program_from_labels  # noqa: E402
from refinex.program import execute, parse, render_program  # noqa: E402
from refinex.program.ops import KeepAll, Program, RemoveLines, RemoveStr  # noqa: E402

BOILERPLATE = [
    "Share on Facebook",
    "Share on Twitter",
    "Home | About | Contact",
    "Subscribe to our newsletter",
    "We use cookies to improve your experience. Accept all cookies",
    "Copyright 2024 Example Media. All rights reserved.",
    "Privacy Policy | Terms of Use",
    "Advertisement",
    "Related articles",
    "Leave a comment",
]
SUBJECTS = ["The council", "Researchers", "The company", "Local farmers", "The museum", "Students"]
VERBS = ["announced", "discovered", "reported", "described", "planned", "measured"]
OBJECTS = [
    "a new budget for public schools",
    "that the river level rose after the storm",
    "an exhibition of early photographs",
    "higher yields from drought resistant wheat",
    "a faster method to recycle batteries",
    "the results of a ten year study",
]


def _sentence(rng: random.Random) -> str:
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}, officials said on {rng.choice(['Monday', 'Friday'])}."


def _doc(rng: random.Random) -> tuple[str, str]:
    """A raw document and its program text (boilerplate lines removed)."""
    lines: list[tuple[str, bool]] = []
    lines += [(b, True) for b in rng.sample(BOILERPLATE, rng.randint(0, 3))]
    lines += [(_sentence(rng), False) for _ in range(rng.randint(2, 6))]
    if rng.random() < 0.5:
        lines.append((rng.choice(BOILERPLATE), True))
    lines += [(_sentence(rng), False) for _ in range(rng.randint(0, 3))]
    lines += [(b, True) for b in rng.sample(BOILERPLATE, rng.randint(0, 3))]
    raw = "\n".join(text for text, _ in lines)
    return raw, render_program(program_from_labels([removed for _, removed in lines]))


@pytest.fixture(scope="module")
def corpus() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    rng = random.Random(0)
    docs = [_doc(rng) for _ in range(240)]
    return docs[:180], docs[180:]


@pytest.fixture(scope="module")
def tagger(corpus: tuple[list[tuple[str, str]], list[tuple[str, str]]]) -> LineTagger:
    return LineTagger(n_features=2**16).fit(corpus[0])


def test_line_labels_follow_remove_lines_only() -> None:
    raw = "a\nb\nc\nd"
    program = Program((RemoveLines(1, 2), RemoveStr(3, "d"), RemoveLines(2, 9), KeepAll()))
    assert line_labels(raw, program) == [False, True, True, False]
    assert line_labels(raw, "remove_lines(0, 0)\nnot an op") == [True, False, False, False]


def test_program_from_labels_runs() -> None:
    assert program_from_labels([True, True, False, True]) == Program((RemoveLines(0, 1), RemoveLines(3, 3)))
    assert program_from_labels([False, False]) == Program((KeepAll(),))


def test_tagger_learns_boilerplate(corpus: tuple[list, list], tagger: LineTagger) -> None:
    _, validation = corpus
    correct = total = 0
    for raw, program in validation:
        predicted = tagger.predict_lines(raw)
        expected = line_labels(raw, program)
        correct += sum(p == e for p, e in zip(predicted, expected))
        total += len(expected)
    assert correct / total >= 0.95
    raw = "Share on Facebook\nThe museum planned a new wing for modern art, officials said on Monday."
    assert tagger.predict_lines(raw) == [True, False]
    assert tagger.predict_program(raw) == Program((RemoveLines(0, 0),))


def test_predicted_programs_execute_cleanly(corpus: tuple[list, list], tagger: LineTagger) -> None:
    for raw, _ in corpus[1][:20]:
        program = tagger.predict_program(raw)
        assert parse(render_program(program)) == program
        assert execute(program, raw).ops_rejected == ()


def test_save_and_load_round_trip(tmp_path: Path, corpus: tuple[list, list], tagger: LineTagger) -> None:
    path = tmp_path / "tagger.joblib"
    tagger.save(path)
    loaded = LineTagger.load(path)
    assert loaded.params() == tagger.params()
    for raw, _ in corpus[1][:10]:
        assert loaded.predict_program(raw) == tagger.predict_program(raw)
        assert (loaded.predict_proba(raw) == tagger.predict_proba(raw)).all()


def test_load_rejects_foreign_files(tmp_path: Path) -> None:
    import joblib

    path = tmp_path / "other.joblib"
    joblib.dump({"format": "something-else"}, path)
    with pytest.raises(ValueError):
        LineTagger.load(path)


def test_single_class_training_and_unfitted_use() -> None:
    with pytest.raises(RuntimeError):
        LineTagger().predict_program("x")
    tagger = LineTagger().fit([("a\nb", "keep_all()"), ("c", Program((KeepAll(),)))])
    assert tagger.predict_program("anything\nat all") == Program((KeepAll(),))
    with pytest.raises(ValueError):
        LineTagger().fit([])
    with pytest.raises(ValueError):
        LineTagger(threshold=1.5)


def test_blank_lines_follow_the_line_above(tagger: LineTagger) -> None:
    raw = ("\nShare on Facebook\n\n"
           "The museum planned a new wing for modern art, officials said on Monday.\n\n \nShare on Facebook")
    assert tagger.predict_lines(raw) == [True, True, True, False, False, False, True]
    assert tagger.predict_program(raw) == Program((RemoveLines(0, 2), RemoveLines(6, 6)))
    with pytest.raises(ValueError, match="no non-blank line"):
        LineTagger().fit([("\n  \n", "remove_lines(0, 1)")])


def test_a_saved_tagger_runs_as_the_linear_tier(tmp_path: Path, corpus: tuple[list, list], tagger: LineTagger) -> None:
    from refinex.model.backends import GenerationRequest, load_backend
    from refinex.model.tagger import LineTaggerBackend, save_checkpoint
    from refinex.model.tiers import TIER_LINEAR, tier_of
    from refinex.model.train import read_model_info
    from refinex.spark.sft import chunk_budget, tokenizer_files

    _, test = corpus
    save_checkpoint(tagger, tmp_path / "linear")
    assert tier_of(read_model_info(tmp_path / "linear")) == TIER_LINEAR
    assert chunk_budget(tokenizer_files(tmp_path / "linear"), 512) == 20000
    backend = load_backend("transformers", str(tmp_path / "linear"))
    assert isinstance(backend, LineTaggerBackend)
    for raw, _program in test[:5]:
        lines = raw.split("\n")
        text = backend.generate([GenerationRequest.for_lines(lines, 10)])[0]
        shifted = [RemoveLines(op.start + 10, op.end + 10) if isinstance(op, RemoveLines) else op
                   for op in tagger.predict_program(raw).ops]
        assert parse(text) == Program(tuple(shifted))
