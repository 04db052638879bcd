"""The fast tier: features, targets, training, the backend and its dispatch."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from refinex.dom import DOM_FEATURES, PageStructure
from refinex.model.backends import GenerationRequest, load_backend
from refinex.model.fast.features import DENSE_FEATURES, line_features
from refinex.model.fast.train import FastDocument, FastTrainConfig, document_targets, train_fast
from refinex.model.tagger import LAYOUT_FEATURES, line_labels
from refinex.program import RemoveLines, parse

from .conftest import synthetic_documents


def _documents(n_docs: int, seed: int = 3, structure: bool = True) -> list[FastDocument]:
    docs = []
    for i, (doc_id, raw, program) in enumerate(synthetic_documents(n_docs, seed=seed)):
        lines = raw.split("\n")
        removed = line_labels(raw, program)
        # a page-structure signal where the HTML is known: boilerplate lines sit in a <nav>
        page = None
        if structure:
            features = np.zeros((len(lines), DOM_FEATURES), dtype=np.float32)
            features[:, 0] = 1.0
            features[[j for j, gone in enumerate(removed) if gone], 9] = 1.0
            words = tuple(("tag:nav", "name:menu") if gone else ("tag:article",) for gone in removed)
            page = PageStructure(features, words)
        docs.append(FastDocument(doc_id, tuple(lines), document_targets(lines, removed=removed), page,
                                 "validation" if i % 6 == 0 else "train"))
    return docs


@pytest.fixture(scope="module")
def fast_model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from refinex.model.bases import prepare_base

    base = prepare_base("fast", cache_dir=tmp_path_factory.mktemp("bases"))
    out = tmp_path_factory.mktemp("fast") / "checkpoint"
    config = FastTrainConfig(n_features=2**12, embedding_size=16, hidden_size=32, epochs=8, batch_size=4,
                             cv_folds=2, cv_min_documents=10, lr=5e-3, progress=False, plot=False)
    result = train_fast(_documents(48), base, out, config)
    return {"result": result, "out": out, "base": base}


def test_targets_hard_soft_and_blank_lines() -> None:
    lines = ["Home", "", "Body text here."]
    assert document_targets(lines, removed=[True, True, False]) == (1.0, None, 0.0)
    soft = document_targets(lines, votes=[(2.0, [True, False, False]), (1.0, [False, False, False]),
                                          (1.0, [True, True, True])])
    assert soft == (pytest.approx(0.75), None, pytest.approx(0.25))
    with pytest.raises(ValueError, match="either"):
        document_targets(lines)
    with pytest.raises(ValueError, match="positive weight"):
        document_targets(lines, votes=[(0.0, [True, False, False])])
    with pytest.raises(ValueError, match="3 lines"):
        document_targets(lines, removed=[True])


def test_line_features_are_stateless_and_sliceable() -> None:
    lines = ["Home | News | Contact", "", "The council voted on the budget on Tuesday."]
    a = line_features(lines, 2**10)
    b = line_features(lines, 2**10)
    assert np.array_equal(a.indices, b.indices) and np.array_equal(a.weights, b.weights)
    assert a.dense.shape == (3, DENSE_FEATURES) and a.offsets[0] == 0 and a.offsets[-1] == len(a.indices)
    assert a.offsets[2] == a.offsets[1]  # a blank line has no n-grams
    assert (a.indices < 2**10).all() and (a.indices >= 0).all()
    window = a.rows(1, 3)
    assert window.n_lines == 2 and window.offsets[0] == 0
    assert np.array_equal(window.indices, a.indices[a.offsets[1]:])
    page = PageStructure(np.ones((3, DOM_FEATURES), dtype=np.float32), (("name:menu",), (), ("tag:p",)))
    with_page = line_features(lines, 2**10, page, keep_text_only=True)
    assert (with_page.dense[:, LAYOUT_FEATURES:] == 1).all()
    assert len(with_page.indices) == len(a.indices) + 2  # the page words join the n-grams
    assert not with_page.without_structure().dense[:, LAYOUT_FEATURES:].any()
    assert np.array_equal(with_page.without_structure().indices, a.indices)
    assert line_features(lines, 2**10, page).text_only is None  # inference keeps no text-only copy
    with pytest.raises(ValueError, match="structure of 2 lines"):
        line_features(lines, 2**10, page[0:2])
    long = line_features(["x" * 500_000], 2**10)  # a huge line costs no more than a long one
    assert long.offsets[-1] < 1000


def test_training_learns_and_records_the_tier(fast_model: dict[str, Any]) -> None:
    from refinex.model.tiers import TIER_FAST, reads_structure, tier_of
    from refinex.model.train import read_model_info

    result = fast_model["result"]
    first, last = result.train_losses[:3], result.train_losses[-3:]
    assert sum(last) / 3 < 0.6 * (sum(first) / 3)
    assert result.eval_losses[-1][1] < result.eval_losses[0][1]
    assert result.threshold_source == "cross-validation" and 0 < result.threshold < 1
    assert result.validation_kept_char_f1 > 0.9
    info = read_model_info(fast_model["out"])
    assert tier_of(info) == TIER_FAST and reads_structure(info)
    assert info["fast"]["threshold"] == result.threshold and info["fast"]["architecture"]["hidden_size"] == 32
    assert (fast_model["out"] / "fast_tagger.safetensors").is_file()
    assert (fast_model["out"] / "refinex_base.json").is_file()  # how refine counts its chunks


def test_the_backend_writes_valid_programs_that_delete_the_boilerplate(fast_model: dict[str, Any]) -> None:
    from refinex.model.fast.backend import FastBackend

    backend = load_backend("transformers", str(fast_model["out"]))
    assert isinstance(backend, FastBackend) and backend.reads_structure
    docs = _documents(12, seed=21)
    requests = [GenerationRequest.for_lines(list(d.lines), 7).with_structure(d.structure) for d in docs]
    correct = total = 0
    for doc, request, text in zip(docs, requests, backend.generate(requests)):
        program = parse(text)
        assert not program.errors
        removed = set()
        for op in program.ops:
            if isinstance(op, RemoveLines):
                assert request.first_line <= op.start <= op.end <= request.last_line
                removed.update(range(op.start - 7, op.end - 7 + 1))
        for j, target in enumerate(doc.targets):
            if target is not None:
                total += 1
                correct += (j in removed) == bool(target)
    assert correct / total > 0.95
    with pytest.raises(ValueError, match="raw lines"):
        backend.generate([GenerationRequest("prompt only", 0, 0)])


def test_batched_equals_unbatched_and_text_only_runs(fast_model: dict[str, Any]) -> None:
    docs = _documents(8, seed=9)
    requests = [GenerationRequest.for_lines(list(d.lines)).with_structure(d.structure) for d in docs]
    batched = load_backend("transformers", str(fast_model["out"]), batch_size=8)
    single = load_backend("transformers", str(fast_model["out"]), batch_size=1)
    for a, b in zip(batched.probabilities(requests), [single.probabilities([r])[0] for r in requests]):
        assert a == pytest.approx(b, abs=1e-5)
    text_only = [GenerationRequest.for_lines(list(d.lines)) for d in docs]
    assert all(not parse(t).errors for t in batched.generate(text_only))


def test_structure_must_match_the_chunk() -> None:
    with pytest.raises(ValueError, match="structure features of 2 lines"):
        GenerationRequest.for_lines(["a", "b", "c"]).with_structure(PageStructure.empty(2))


def test_decoding_options_of_generated_programs_are_refused(fast_model: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="threshold"):
        load_backend("transformers", str(fast_model["out"]), votes=4)
    with pytest.raises(ValueError, match="transformers backend"):
        load_backend("vllm", str(fast_model["out"]))


def test_small_corpora_keep_the_default_threshold_and_train_longer(tmp_path: Path) -> None:
    from refinex.model.bases import prepare_base
    from refinex.model.fast.train import epochs_for

    config = FastTrainConfig(n_features=2**10, embedding_size=8, hidden_size=16, epochs=1, min_steps=12,
                             batch_size=4, cv_folds=3, progress=False, plot=False)
    assert epochs_for(config, 8) == 6 and epochs_for(config, 400) == 1
    result = train_fast(_documents(10), prepare_base("fast", cache_dir=tmp_path / "bases"), tmp_path / "m", config)
    assert result.threshold == 0.5 and result.threshold_source.startswith("default (fewer than 100")
    assert result.steps == 12


def test_the_shipped_default_keeps_the_fixed_threshold(tmp_path: Path) -> None:
    from refinex.model.bases import prepare_base

    assert FastTrainConfig().cv_folds == 0
    config = FastTrainConfig(n_features=2**10, embedding_size=8, hidden_size=16, epochs=1, min_steps=4,
                             batch_size=4, cv_min_documents=2, progress=False, plot=False)
    result = train_fast(_documents(10), prepare_base("fast", cache_dir=tmp_path / "bases"), tmp_path / "m", config)
    assert (result.threshold, result.threshold_source) == (0.5, "default")


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="labels"):
        FastTrainConfig(labels="fuzzy")
    with pytest.raises(ValueError, match="context"):
        FastTrainConfig(context="lstm")
    with pytest.raises(ValueError, match="cv_folds"):
        FastTrainConfig(cv_folds=1)
    with pytest.raises(ValueError, match="unknown"):
        FastTrainConfig.from_dict({"max_line_tokens": 32})


def test_the_base_counts_words_and_reads_whole_documents(fast_model: dict[str, Any]) -> None:
    from refinex.model.bases import is_hashed_base
    from refinex.spark.sft import chunk_budget, token_counter, tokenizer_files, tokenizer_id

    assert is_hashed_base("fast") and not is_hashed_base("tiny")
    assert is_hashed_base(fast_model["base"])
    files = tokenizer_files(fast_model["out"])
    assert chunk_budget(files, 512) == 20000
    assert token_counter(tokenizer_id(fast_model["out"]), files)("three words here") == 3
    assert tokenizer_id(fast_model["out"]) != tokenizer_id(fast_model["base"])  # named by its folder
