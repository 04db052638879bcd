"""Shared fixtures of the model tests: an offline Hugging Face setup and a tiny base."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import torch  # noqa: E402

# One intra-op thread: the tiny models gain nothing from more, and on a shared 2-core
# machine oversubscribed threads make the runs several times slower.
torch.set_num_threads(int(os.environ.get("REFINEX_TEST_TORCH_THREADS", "1")))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly built ``tiny`` base (random weights, local BPE tokenizer), built once."""
    from refinex.model.bases import prepare_base

    return prepare_base("tiny", cache_dir=tmp_path_factory.mktemp("bases"))


_BOILERPLATE = (
    "Share this article",
    "Subscribe to our newsletter",
    "Accept all cookies",
    "Related articles",
    "Log in",
    "Privacy Policy",
    "Advertisement",
)
_WORDS = (
    "the river city data model energy school music garden winter science history market "
    "travel forest ocean light bridge story"
).split()


def synthetic_documents(n_docs: int, seed: int = 0, lines: tuple[int, int] = (6, 20)) -> list[tuple[str, str, str]]:
    """``(doc_id, raw, program_text)`` triples: prose with boilerplate lines and tails to delete."""
    import random

    rng = random.Random(seed)
    docs = []
    for d in range(n_docs):
        raw_lines, ops = [], []
        for i in range(rng.randint(*lines)):
            roll = rng.random()
            if roll < 0.25:
                raw_lines.append(rng.choice(_BOILERPLATE))
                ops.append(f"remove_lines({i}, {i})")
            elif roll < 0.35:
                tail = rng.choice(_BOILERPLATE)
                words = " ".join(rng.choice(_WORDS) for _ in range(6))
                raw_lines.append(f"{words}. {tail}")
                ops.append(f'remove_str({i}, " {tail}")')
            else:
                words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12)))
                raw_lines.append(words.capitalize() + ".")
        docs.append((f"doc-{seed}-{d}", "\n".join(raw_lines), "\n".join(ops)))
    return docs


@pytest.fixture(scope="session")
def tiny_sft_pairs(tiny_model_dir: Path) -> list:
    """SFT pairs of 24 synthetic documents, chunked with the tiny tokenizer (some validation)."""
    from transformers import AutoTokenizer

    from refinex.chunking import hf_token_counter
    from refinex.model.sft import build_sft_pairs

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir), local_files_only=True)
    count = hf_token_counter(tokenizer)
    pairs = []
    for doc_id, raw, program in synthetic_documents(24, seed=11):
        pairs += build_sft_pairs(doc_id, raw, program, count, max_tokens=120, validation_fraction=0.25)
    return pairs


@pytest.fixture(scope="session")
def tiny_trained(tiny_model_dir: Path, tiny_sft_pairs: list, tmp_path_factory: pytest.TempPathFactory):
    """A short, seeded fine-tuning run of the tiny base (a ``TrainResult``)."""
    from refinex.model.train import TrainConfig, train

    config = TrainConfig(
        max_steps=30, lr=3e-3, batch_size=8, max_seq_len=1024, eval_every=10, seed=5,
        warmup_steps=2, progress=False, train_data_version="sft_pairs@3", precision="fp32",
    )
    return train(tiny_sft_pairs, str(tiny_model_dir), tmp_path_factory.mktemp("trained") / "model", config)
