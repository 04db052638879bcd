"""The inference-backend interface of the refine model.

A backend turns prompts (one per chunk, see :mod:`refinex.model.prompts`) into raw program
text, one string per request, in input order. The text is data: callers always read it
with :func:`refinex.program.parse`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

from refinex.model.constrained import ProgramAutomaton, program_regex
from refinex.model.prompts import build_prompt
from refinex.program.render import number_lines

__all__ = [
    "BACKEND_KINDS",
    "DEFAULT_STOP",
    "BackendError",
    "BackendUnavailable",
    "DecodeConfig",
    "GenerationRequest",
    "RefineBackend",
    "cut_at_stop",
    "finish_program",
    "load_backend",
]

BACKEND_KINDS = ("transformers", "vllm", "openai")
#: A blank line ends a program (the training targets never contain one).
DEFAULT_STOP: tuple[str, ...] = ("\n\n",)
#: What an empty constrained generation (eos right away) means.
EMPTY_PROGRAM = "keep_all()\n"


class BackendError(RuntimeError):
    """A backend could not produce programs (after its retries, where it has any)."""


class BackendUnavailable(BackendError):
    """The backend's engine is not installed or cannot run here."""


@dataclass(frozen=True)
class GenerationRequest:
    """One chunk to refine.

    ``prompt`` is the full model input; ``first_line .. last_line`` are the chunk's
    document-global line ids; ``lines`` its raw lines (for constraints; may be empty, then
    constrained decoding never allows ``remove_str``). ``structure`` holds the lines'
    page structure (a slice of :func:`refinex.dom.page_structure`) when the page HTML is
    known and the model reads it (``None`` otherwise).
    """

    prompt: str
    first_line: int
    last_line: int
    lines: tuple[str, ...] = ()
    structure: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.lines, tuple):
            object.__setattr__(self, "lines", tuple(self.lines))
        if self.first_line < 0 or self.last_line < self.first_line:
            raise ValueError(f"bad line range [{self.first_line}, {self.last_line}]")
        if self.lines and len(self.lines) != self.last_line - self.first_line + 1:
            raise ValueError(
                f"{len(self.lines)} lines for the range [{self.first_line}, {self.last_line}]"
            )
        if self.structure is not None and len(self.structure) != self.last_line - self.first_line + 1:
            raise ValueError(f"structure features of {len(self.structure)} lines for the range "
                             f"[{self.first_line}, {self.last_line}]")

    def with_structure(self, structure: Any) -> "GenerationRequest":
        """This request with the page-structure features of its lines."""
        return dataclasses.replace(self, structure=structure)

    @classmethod
    def for_lines(cls, lines: Sequence[str], first_line: int = 0) -> "GenerationRequest":
        """The request for raw ``lines`` whose first id is ``first_line`` (standard prompt)."""
        if not lines:
            raise ValueError("a chunk has at least one line")
        prompt = build_prompt(number_lines(lines, first_line))
        return cls(prompt, first_line, first_line + len(lines) - 1, tuple(lines))

    @classmethod
    def for_chunk(cls, chunk: Any, doc_lines: Sequence[str]) -> "GenerationRequest":
        """The request of a :class:`refinex.chunking.Chunk` of a document whose raw lines
        are ``doc_lines`` (the prompt shows ``chunk.text``, as in the SFT pairs)."""
        start, end = int(chunk.start_line), int(chunk.end_line)
        if end >= len(doc_lines):
            raise ValueError(f"chunk lines {start}..{end} beyond the document's {len(doc_lines)} lines")
        return cls(build_prompt(chunk.text), start, end, tuple(doc_lines[start : end + 1]))

    def automaton(self) -> ProgramAutomaton:
        """The byte automaton of this chunk's valid programs."""
        return ProgramAutomaton(self.first_line, self.last_line, self.lines)

    def regex(self) -> str:
        """The structured-output regex of this chunk's programs."""
        return program_regex(self.first_line, self.last_line, self.lines)


@dataclass(frozen=True)
class DecodeConfig:
    """Decoding settings shared by all backends.

    ``greedy`` (temperature 0) is the production setting; ``temperature``/``top_p``/``seed``
    only apply when it is off (or to the samples of ``votes``). ``constrained`` turns on grammar-constrained decoding (exact
    automaton for transformers, regex structured outputs for vLLM/OpenAI-compatible servers).
    ``min_op_prob`` > 0 drops every generated operation whose least likely token had a lower
    probability under the model (the transformers backend, greedy constrained decoding): a
    precision/recall knob, like a tagger's threshold, that trades deletions the model is
    unsure of for kept text.

    ``votes`` > 0 turns on line-vote decoding (the transformers backend, greedy constrained
    decoding): a chunk whose greedy program has an operation with confidence below
    ``vote_below`` is decoded again ``votes`` times by sampling (``temperature``, ``top_p``)
    from the same constrained distribution, and a line is deleted where at least
    ``vote_threshold`` of the samples delete it (:func:`refinex.model.voting.vote_program`).
    Chunks the model is sure of keep their greedy program.
    """

    max_new_tokens: int = 256
    batch_size: int = 32
    constrained: bool = True
    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = field(default=DEFAULT_STOP)
    min_op_prob: float = 0.0
    votes: int = 0
    vote_threshold: float = 0.5
    vote_below: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_op_prob < 1.0:
            raise ValueError(f"min_op_prob must be in [0, 1), got {self.min_op_prob}")
        if self.min_op_prob > 0 and not (self.constrained and self.greedy):
            raise ValueError("min_op_prob needs greedy constrained decoding")
        if self.votes < 0:
            raise ValueError(f"votes must be >= 0, got {self.votes}")
        if not 0.0 < self.vote_threshold <= 1.0:
            raise ValueError(f"vote_threshold must be in (0, 1], got {self.vote_threshold}")
        if not 0.0 < self.vote_below <= 1.0:
            raise ValueError(f"vote_below must be in (0, 1], got {self.vote_below}")
        if self.votes > 0:
            if not (self.constrained and self.greedy):
                raise ValueError("votes need greedy constrained decoding (the greedy pass finds the unsure chunks)")
            if self.min_op_prob > 0:
                raise ValueError("votes and min_op_prob are two ways to decode unsure operations: choose one")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.greedy and self.temperature <= 0:
            raise ValueError("sampling needs temperature > 0 (or greedy=True)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop))

    @classmethod
    def split_options(cls, options: dict[str, Any]) -> tuple["DecodeConfig", dict[str, Any]]:
        """``(config, rest)``: the config fields of ``options`` (or its ``config``) and the rest."""
        rest = dict(options)
        base = rest.pop("config", None) or cls()
        if not isinstance(base, cls):
            raise TypeError(f"config must be a DecodeConfig, got {type(base).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        changes = {k: rest.pop(k) for k in list(rest) if k in names}
        return dataclasses.replace(base, **changes), rest


@runtime_checkable
class RefineBackend(Protocol):
    """Generates raw program text for chunks."""

    name: str
    config: DecodeConfig

    def generate(self, requests: Sequence[GenerationRequest]) -> list[str]:
        """Raw program text per request, in input order."""
        ...

    def close(self) -> None:
        """Release the engine's resources (idempotent)."""
        ...


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (without) the earliest stop string."""
    cut = len(text)
    for marker in stop:
        if marker:
            index = text.find(marker)
            if 0 <= index < cut:
                cut = index
    return text[:cut]


def finish_program(text: str, stop: Sequence[str], constrained: bool) -> str:
    """The program text of a raw continuation: cut at the stop strings, newline-terminated.

    An empty constrained continuation (eos right away) is ``keep_all()``.
    """
    text = cut_at_stop(text, stop)
    if text and not text.endswith("\n"):
        text += "\n"
    if constrained and not text.strip():
        return EMPTY_PROGRAM
    return text


def _checkpoint_info(path: str) -> dict[str, Any]:
    import os

    from refinex.model.train import read_model_info

    return read_model_info(path) if os.path.isdir(path) else {}


def load_backend(kind: str, model_path_or_url: str, **options: Any) -> RefineBackend:
    """Create a backend: ``transformers`` (checkpoint dir), ``vllm`` (checkpoint dir or
    model name the engine resolves locally) or ``openai`` (server base URL).

    :class:`DecodeConfig` fields (or ``config=``) set decoding; the other options go to the
    backend's constructor. A checkpoint of a tagging tier (its ``refinex_model.json`` names
    the ``tag`` head: the ``tag`` or ``fast`` tier, :mod:`refinex.model.tiers`) gets that
    tier's backend: the model decides its decoder.
    """
    from refinex.model.tiers import TIER_GENERATE, tagging_backend, tier_of

    config, rest = DecodeConfig.split_options(options)
    if config.min_op_prob > 0 and kind != "transformers":
        raise ValueError(f"min_op_prob is implemented by the transformers backend only, not {kind!r}")
    if config.votes > 0 and kind != "transformers":
        raise ValueError(f"votes are implemented by the transformers backend only, not {kind!r}")
    info = _checkpoint_info(model_path_or_url) if kind != "openai" else {}
    tier = tier_of(info)
    if tier != TIER_GENERATE:
        if kind != "transformers":
            raise ValueError(
                f"{model_path_or_url} is a {tier}-tier model (the tag head): it runs on the transformers backend "
                f"(one forward pass per chunk, no decoding loop), not {kind!r}")
        if config.votes > 0 or config.min_op_prob > 0:
            raise ValueError("votes and min_op_prob decode generated programs; a tagging-head model has a "
                             "threshold instead (option threshold)")
        return tagging_backend(model_path_or_url, info, config, **rest)
    if kind == "transformers":
        from refinex.model.backends.hf import HFBackend

        return HFBackend.from_pretrained(model_path_or_url, config, **rest)
    if kind == "vllm":
        from refinex.model.backends.vllm import VLLMBackend

        return VLLMBackend(model_path_or_url, config, **rest)
    if kind == "openai":
        from refinex.model.backends.openai import OpenAIBackend

        return OpenAIBackend(model_path_or_url, config, **rest)
    raise ValueError(f"unknown backend kind {kind!r} (expected one of {BACKEND_KINDS})")
