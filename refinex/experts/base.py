"""The expert interface: something that refines a whole document end to end.

An expert's output is only a *label*: it is distilled into a deletion-only program
(``refinex.distill``) before anything is trained on or applied to it, so an expert that
paraphrases or inserts text can never add words to the corpus.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence, runtime_checkable

OK = "ok"
FAILED = "failed"


@dataclass(frozen=True)
class ExpertInput:
    doc_id: str
    text: str  # the document's raw text, one line per block
    html: Optional[str] = None  # the page HTML when the document came from a web page


@dataclass(frozen=True)
class ExpertOutput:
    doc_id: str
    refined_text: Optional[str]  # None when status is FAILED
    status: str = OK  # OK or FAILED
    error: Optional[str] = None
    tokens_in: int = 0
    tokens_out: int = 0
    requests: int = 0
    latency_s: float = 0.0
    cached: bool = False


@runtime_checkable
class Expert(Protocol):
    """Refines documents. ``name`` and ``version`` are recorded with every output."""

    name: str
    version: str

    def refine_batch(self, docs: Sequence[ExpertInput]) -> list[ExpertOutput]:
        """One output per input, in order; failures are outputs with status FAILED."""
        ...
