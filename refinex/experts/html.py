"""The trafilatura expert: main-content extraction from the page HTML.

Its output is only a label: ``refinex.distill`` turns it into a deletion-only program over
the page text (``refinex.text.html_to_text``), so formatting trafilatura adds (``- `` list
bullets, ``|`` table borders) never reaches the corpus.

Default options, chosen by snippet F1 *after distillation* on the 694 dev pages
(``benchmarks/quality_dev.py --compare``, BENCHMARKS.md): comments excluded (the gold treats
reader comments as boilerplate), tables included, neither ``favor_precision`` nor
``favor_recall``, fallback extractors enabled (``fast=False``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence

import trafilatura

from refinex.experts.base import FAILED, OK, ExpertInput, ExpertOutput
from refinex.text import normalize_text

NAME = "trafilatura"
# Bumped whenever ``clean_label`` changes (the same extraction yields a different label).
LABEL_REVISION = "1"


def clean_label(text: str) -> str:
    """trafilatura's text normalised like the page text, without blank lines.

    trafilatura writes one line per element and no blank lines, except where it copies a
    text node with the page source's own line breaks (e.g. a byline spread over indented
    source lines). Such blank lines carry no content, and aligning them against the page
    text's blank lines can outweigh real paragraphs, so they are dropped.
    """
    return "\n".join(line for line in normalize_text(text).split("\n") if line.strip())


@dataclass(frozen=True)
class TrafilaturaOptions:
    """The ``trafilatura.extract`` options the expert exposes (all recorded in its version)."""

    include_comments: bool = False
    include_tables: bool = True
    favor_precision: bool = False
    favor_recall: bool = False
    fast: bool = False

    def __post_init__(self) -> None:
        if self.favor_precision and self.favor_recall:
            raise ValueError("favor_precision and favor_recall are mutually exclusive")

    def tag(self) -> str:
        """Compact, stable rendering for version strings, e.g. ``comments=0,tables=1,...``."""
        flags = (
            ("comments", self.include_comments),
            ("tables", self.include_tables),
            ("precision", self.favor_precision),
            ("recall", self.favor_recall),
            ("fast", self.fast),
        )
        return ",".join(f"{key}={int(value)}" for key, value in flags)


class TrafilaturaExpert:
    """Expert whose refinement of a page is trafilatura's main-content text of its HTML.

    The extracted text gets ``clean_label``: ``refinex.text.normalize_text`` (no ``\\r``,
    control or invisible characters, no trailing whitespace; the page text's normalisation)
    and no blank lines.
    """

    name: str = NAME
    needs_html: bool = True  # documents without HTML fail (expert_failed)

    def __init__(
        self,
        include_comments: bool = False,
        include_tables: bool = True,
        favor_precision: bool = False,
        favor_recall: bool = False,
        fast: bool = False,
    ) -> None:
        self.options = TrafilaturaOptions(
            include_comments=include_comments,
            include_tables=include_tables,
            favor_precision=favor_precision,
            favor_recall=favor_recall,
            fast=fast,
        )
        self.version: str = (
            f"trafilatura-{trafilatura.__version__}[{self.options.tag()}]+label-r{LABEL_REVISION}"
        )

    def extract(self, html: str) -> Optional[str]:
        """trafilatura's normalised main text of ``html``; ``None`` when it finds none."""
        o = self.options
        text = trafilatura.extract(
            html,
            output_format="txt",
            include_comments=o.include_comments,
            include_tables=o.include_tables,
            favor_precision=o.favor_precision,
            favor_recall=o.favor_recall,
            fast=o.fast,
            deduplicate=False,  # trafilatura's cache spans documents: order-dependent output
            include_images=False,
            include_links=False,
            include_formatting=False,
            with_metadata=False,
        )
        if text is None:
            return None
        return clean_label(text)

    def refine_one(self, doc: ExpertInput) -> ExpertOutput:
        """Refine one document; every failure becomes a FAILED output."""
        if doc.html is None or not doc.html.strip():
            return ExpertOutput(doc.doc_id, None, FAILED, "no html: the trafilatura expert needs the page HTML")
        start = time.perf_counter()
        try:
            text = self.extract(doc.html)
        except Exception as exc:  # trafilatura/lxml raise many types on hostile input
            return ExpertOutput(
                doc.doc_id,
                None,
                FAILED,
                f"trafilatura raised {type(exc).__name__}: {exc}",
                latency_s=time.perf_counter() - start,
            )
        latency = time.perf_counter() - start
        if not text:
            return ExpertOutput(
                doc.doc_id, None, FAILED, "trafilatura extracted no main text", latency_s=latency
            )
        return ExpertOutput(doc.doc_id, text, OK, latency_s=latency)

    def refine_batch(self, docs: Sequence[ExpertInput]) -> list[ExpertOutput]:
        """One output per input, in order; never raises for a bad document."""
        return [self.refine_one(doc) for doc in docs]

    def __repr__(self) -> str:
        return f"TrafilaturaExpert({self.version})"
