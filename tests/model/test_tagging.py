"""The tagging head on the tiny base: training, batching, saving, MLflow and the backend."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from refinex.model.backends import GenerationRequest, load_backend
from refinex.model.tagging.train import TagExample, TagTrainConfig, train_tagger
from refinex.program import parse

from .conftest import synthetic_documents


def _examples(n_docs: int, seed: int = 3) -> list[TagExample]:
    examples = []
    for i, (doc_id, raw, program) in enumerate(synthetic_documents(n_docs, seed=seed)):
        examples.append(TagExample(doc_id, tuple(raw.split("\n")), 0, program,
                                   "validation" if i % 6 == 0 else "train"))
    return examples


@pytest.fixture(scope="module")
def tagged(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("tag") / "checkpoint"
    config = TagTrainConfig(epochs=12, batch_size=8, head_size=64, cv_folds=2, progress=False, lr=3e-3)
    result = train_tagger(_examples(48), str(tiny_model_dir), out, config)
    return {"result": result, "out": out}


def test_training_lowers_the_loss_and_records_the_head(tagged: dict[str, Any]) -> None:
    from refinex.model.train import read_model_info

    result = tagged["result"]
    first, last = result.train_losses[:3], result.train_losses[-3:]
    assert sum(last) / 3 < 0.8 * (sum(first) / 3)
    (start_step, start), (end_step, end) = result.eval_losses[0], result.eval_losses[-1]
    assert start_step == 0 and end_step == result.steps and end < start
    assert result.threshold_source == "cross-validation" and 0 < result.threshold < 1
    assert result.precision in ("fp32", "bf16") and result.precision_reason
    info = read_model_info(tagged["out"])
    assert info["head"] == "tag" and info["tag"]["threshold"] == result.threshold
    assert info["tag"]["architecture"]["head_size"] == 64
    assert (tagged["out"] / "tag_head.safetensors").is_file() and (tagged["out"] / "config.json").is_file()
    assert result.precision_reason in result.summary() and "threshold" in result.summary()


def test_batched_equals_unbatched(tagged: dict[str, Any]) -> None:
    requests = [GenerationRequest.for_lines(list(e.lines), 4 * i) for i, e in enumerate(_examples(10, seed=9))]
    batched = load_backend("transformers", str(tagged["out"]), batch_size=8)
    single = load_backend("transformers", str(tagged["out"]), batch_size=1)
    many = batched.probabilities(requests)
    one = [single.probabilities([r])[0] for r in requests]
    for a, b in zip(many, one):
        assert a == pytest.approx(b, abs=1e-5)
    assert batched.generate(requests) == single.generate(requests)


def test_programs_parse_and_address_only_their_chunk(tagged: dict[str, Any]) -> None:
    from refinex.program import RemoveLines

    backend = load_backend("transformers", str(tagged["out"]), threshold=0.05)
    requests = [GenerationRequest.for_lines(list(e.lines), 100) for e in _examples(6, seed=11)]
    for request, text in zip(requests, backend.generate(requests)):
        program = parse(text)
        assert not program.errors
        for op in program.ops:
            if isinstance(op, RemoveLines):
                assert request.first_line <= op.start <= op.end <= request.last_line
    with pytest.raises(ValueError, match="raw lines"):
        backend.generate([GenerationRequest("prompt only", 0, 0)])


def test_decoding_options_of_generated_programs_are_refused(tagged: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="threshold"):
        load_backend("transformers", str(tagged["out"]), votes=4)
    with pytest.raises(ValueError, match="transformers backend"):
        load_backend("vllm", str(tagged["out"]))


def test_save_mlflow_load_round_trip(tagged: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    from refinex.tracking import log_training_run, resolve_model_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logged = log_training_run(tagged["result"], params={"head": "tag"}, tracking_uri=uri, workdir=tmp_path,
                              model_name="tagger-test")
    assert logged.version == "1"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert float(client.get_model_version("tagger-test", "1").tags["tag_threshold"]) == tagged["result"].threshold
    params = client.get_run(logged.run_id).data.params
    assert params["precision"] == tagged["result"].precision and params["precision_reason"]
    loaded_dir = resolve_model_uri("models:/tagger-test/1", tmp_path / "download", tracking_uri=uri)
    requests = [GenerationRequest.for_lines(list(e.lines), 0) for e in _examples(5, seed=5)]
    original = load_backend("transformers", str(tagged["out"]))
    loaded = load_backend("transformers", str(loaded_dir))
    assert type(loaded).__name__ == "TagBackend"
    assert loaded.generate(requests) == original.generate(requests)
    for a, b in zip(loaded.probabilities(requests), original.probabilities(requests)):
        assert a == pytest.approx(b)


def test_a_fixed_threshold_skips_cross_validation(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = TagTrainConfig(epochs=1, head_size=16, threshold=0.7, context_layers=0, layout_features=False,
                            progress=False, plot=False)
    result = train_tagger(_examples(12), str(tiny_model_dir), tmp_path / "ck", config)
    assert (result.threshold, result.threshold_source) == (0.7, "fixed")
    backend = load_backend("transformers", str(tmp_path / "ck"))
    assert backend.threshold == 0.7


def test_fine_tuning_the_top_layers(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    config = TagTrainConfig(epochs=2, head_size=16, train_layers=1, cv_folds=0, progress=False, plot=False,
                            base_lr=1e-2)
    train_tagger(_examples(12), str(tiny_model_dir), tmp_path / "ck", config)
    tuned = load_file(str(tmp_path / "ck" / "model.safetensors"))
    original = {k.removeprefix("model."): v for k, v in load_file(str(tiny_model_dir / "model.safetensors")).items()}
    changed = {k for k, v in tuned.items() if k in original and not torch.equal(v, original[k])}
    assert changed and all(k.startswith(("layers.1.", "norm.")) for k in changed)


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="cv_folds"):
        TagTrainConfig(cv_folds=1)
    with pytest.raises(ValueError, match="window_tokens"):
        TagTrainConfig(max_line_tokens=64, window_tokens=32)
    with pytest.raises(ValueError, match="unknown tag settings"):
        TagTrainConfig.from_dict({"epochz": 1})


def test_structure_features_and_soft_labels(tiny_model_dir: Path, tmp_path: Path) -> None:
    import numpy as np

    from refinex.dom import DOM_FEATURES, PageStructure
    from refinex.model.tagger import LAYOUT_FEATURES, line_labels
    from refinex.model.tiers import reads_structure
    from refinex.model.train import read_model_info

    examples = []
    for e in _examples(24, seed=5):
        removed = line_labels("\n".join(e.lines), e.target)
        page = np.zeros((len(e.lines), DOM_FEATURES), dtype=np.float32)
        page[[i for i, gone in enumerate(removed) if gone], 9] = 1.0  # boilerplate sits in a <nav>
        soft = tuple(None if not line.strip() else (0.8 if gone else 0.1) for line, gone in zip(e.lines, removed))
        examples.append(TagExample(e.doc_id, e.lines, e.first_line, e.target, e.split,
                                   PageStructure(page, ((),) * len(e.lines)), soft))
    config = TagTrainConfig(epochs=6, batch_size=8, head_size=32, cv_folds=0, progress=False, lr=3e-3,
                            structure_features=True, labels="soft")
    result = train_tagger(examples, str(tiny_model_dir), tmp_path / "m", config)
    info = read_model_info(tmp_path / "m")
    assert reads_structure(info) and info["tag"]["layout_features"] == LAYOUT_FEATURES + DOM_FEATURES
    assert result.train_losses[-1] < result.train_losses[0]
    backend = load_backend("transformers", str(tmp_path / "m"))
    assert backend.reads_structure
    request = GenerationRequest.for_lines(list(examples[0].lines)).with_structure(examples[0].structure)
    with_page, text_only = backend.probabilities([request, GenerationRequest.for_lines(list(examples[0].lines))])
    assert with_page != text_only  # the structure columns are read; without HTML they are zeros
    with pytest.raises(ValueError, match="labels"):
        TagTrainConfig(labels="fuzzy")
