"""The consensus expert: a weighted vote of several experts' deletions over the raw text.

Every member expert refines the document; each member output is distilled onto the raw
text (``refinex.distill``) and executed as a deletion mask: per raw line, removed or kept,
and on kept lines the exact character spans deleted. Because programs only delete, all
members speak about the same raw characters, so the vote is exact: a character is deleted
when the weights of the members deleting it reach ``threshold`` of the weights of the
members that succeeded on the document (a failed member abstains). The output is the raw
text with the voted deletions applied - itself a pure deletion of the raw text - so
distilling it reproduces it exactly.

``refine_batch_with_members`` also returns every member's output and distilled program for
audit; ``ConsensusResult.members_json()`` is the JSON detail the Spark stage stores.
Members, weights and the threshold come from ``conf/experts/consensus.yaml`` (tuned on the
dev pages, see BENCHMARKS.md).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from bisect import insort
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import refinex.experts.rules  # noqa: F401 - registers the offline experts
from refinex.experts import get_expert, needs_html
from refinex.experts.base import FAILED, OK, Expert, ExpertInput, ExpertOutput
from refinex.experts.llm import resolve_conf_path  # importing it registers "llm"
from refinex.program.ops import Program, RemoveLines, RemoveStr

logger = logging.getLogger(__name__)

__all__ = [
    "ConsensusExpert",
    "ConsensusResult",
    "DeletionMask",
    "MemberResult",
    "MemberSpec",
    "VoteTable",
    "create_consensus_expert",
    "mask_from_program",
]

NAME = "consensus"
ALGORITHM_VERSION = "consensus-r1"
DEFAULT_CONFIG_PATH = "conf/experts/consensus.yaml"
DISTILL_FAILED = "distill_failed"


@dataclass(frozen=True)
class MemberSpec:
    """A member: registry name, vote weight and constructor options."""

    name: str
    weight: float = 1.0
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a member needs a name")
        if self.weight < 0:
            raise ValueError(f"member {self.name!r}: weight must be >= 0")

    @classmethod
    def parse(cls, value: Union["MemberSpec", str, Mapping[str, Any]]) -> "MemberSpec":
        """From a spec, a bare name, or a mapping with ``name``, ``weight``, ``options``."""
        if isinstance(value, MemberSpec):
            return value
        if isinstance(value, str):
            return cls(value)
        unknown = sorted(set(value) - {"name", "weight", "options"})
        if unknown:
            raise ValueError(f"unknown member settings: {', '.join(unknown)}")
        return cls(str(value["name"]), float(value.get("weight", 1.0)), dict(value.get("options") or {}))


# Deletion masks ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DeletionMask:
    """What a deletion-only program deletes from a raw text.

    ``removed``: ids of removed lines. ``spans``: per kept line, sorted disjoint half-open
    character spans deleted in it. A kept non-blank line whose deletions leave only
    whitespace counts as removed.
    """

    n_lines: int
    removed: frozenset[int]
    spans: Mapping[int, tuple[tuple[int, int], ...]]

    def apply(self, raw: str) -> str:
        """``raw`` with exactly these deletions (what ``execute`` returns, no guardrails)."""
        lines = raw.split("\n")
        kept = [
            _cut(line, self.spans[i]) if i in self.spans else line
            for i, line in enumerate(lines)
            if i not in self.removed
        ]
        return "\n".join(kept)

    def chars_deleted(self, raw_lines: Sequence[str]) -> int:
        """Characters deleted (line breaks of removed lines not counted)."""
        return sum(len(raw_lines[i]) for i in self.removed) + sum(
            e - s for spans in self.spans.values() for s, e in spans
        )


def _free_occurrence(line: str, needle: str, spans: list[tuple[int, int]]) -> Optional[int]:
    """First occurrence of ``needle`` in ``line`` not intersecting ``spans`` (execution's rule)."""
    position = line.find(needle)
    while position >= 0:
        end = position + len(needle)
        blocker = next((e for s, e in spans if s < end and e > position), None)
        if blocker is None:
            return position
        position = line.find(needle, max(blocker, position + 1))
    return None


def mask_from_program(program: Program, raw: str, blank_is_removed: bool = True) -> DeletionMask:
    """The deletions ``refinex.program.execute`` makes (without guardrails), as a mask.

    Same rules: ``remove_lines`` first (bad, out-of-range or overlapping ranges rejected),
    then ``remove_str`` in order on the first occurrence not intersecting a deleted span;
    rejected operations delete nothing. With ``blank_is_removed``, a non-blank line left
    with only whitespace counts as removed (the member deleted its content).
    """
    lines = raw.split("\n")
    n = len(lines)
    removed: set[int] = set()
    ranges: list[tuple[int, int]] = []
    for op in program.ops:
        if not isinstance(op, RemoveLines):
            continue
        if op.start > op.end or op.start < 0 or op.end >= n:
            continue
        if any(s <= op.end and op.start <= e for s, e in ranges):
            continue
        ranges.append((op.start, op.end))
        removed.update(range(op.start, op.end + 1))
    spans: dict[int, list[tuple[int, int]]] = {}
    for op in program.ops:
        if not isinstance(op, RemoveStr) or not op.text or not 0 <= op.line < n or op.line in removed:
            continue
        line_spans = spans.setdefault(op.line, [])
        position = _free_occurrence(lines[op.line], op.text, line_spans)
        if position is not None:
            insort(line_spans, (position, position + len(op.text)))
    final_spans: dict[int, tuple[tuple[int, int], ...]] = {}
    for i, line_spans in spans.items():
        if not line_spans:
            continue
        merged = _merge_spans(line_spans)
        if blank_is_removed and lines[i].strip() and not _cut(lines[i], merged).strip():
            removed.add(i)
        else:
            final_spans[i] = tuple(merged)
    return DeletionMask(n, frozenset(removed), final_spans)


def _merge_spans(spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for s, e in sorted(spans):
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def _cut(line: str, spans: Sequence[tuple[int, int]]) -> str:
    pieces: list[str] = []
    cursor = 0
    for s, e in spans:
        pieces.append(line[cursor:s])
        cursor = e
    pieces.append(line[cursor:])
    return "".join(pieces)


# The vote ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class VoteTable:
    """Who deletes what in one raw text, as member bitmasks (bit ``i`` = member ``i``).

    ``line_removed[j]``: members removing line ``j``. ``segments[j]``: for a line some
    member deletes partially, ``(start, end, members)`` pieces covering every character
    deleted by someone; the members of a piece include those removing the whole line.
    ``voters``: the members that succeeded (only they count).
    """

    lines: tuple[str, ...]
    n_members: int
    voters: int
    line_removed: tuple[int, ...]
    segments: Mapping[int, tuple[tuple[int, int, int], ...]]

    @classmethod
    def build(cls, raw: str, masks: Sequence[Optional[DeletionMask]]) -> "VoteTable":
        """Tabulate the masks of members ``0..len(masks)-1`` (``None``: the member abstains)."""
        lines = tuple(raw.split("\n"))
        voters = 0
        line_removed = [0] * len(lines)
        partial: dict[int, list[tuple[int, int, int]]] = {}
        for bit, mask in enumerate(masks):
            if mask is None:
                continue
            if mask.n_lines != len(lines):
                raise ValueError(f"member {bit}: mask has {mask.n_lines} lines, text has {len(lines)}")
            voters |= 1 << bit
            for j in mask.removed:
                line_removed[j] |= 1 << bit
            for j, spans in mask.spans.items():
                partial.setdefault(j, []).extend((s, e, 1 << bit) for s, e in spans)
        segments: dict[int, tuple[tuple[int, int, int], ...]] = {}
        for j, spans in partial.items():
            bounds = sorted({p for s, e, _ in spans for p in (s, e)})
            pieces: list[tuple[int, int, int]] = []
            for a, b in zip(bounds, bounds[1:]):
                members = 0
                for s, e, bit_mask in spans:
                    if s <= a and b <= e:
                        members |= bit_mask
                if not members:
                    continue
                members |= line_removed[j]
                if pieces and pieces[-1][1] == a and pieces[-1][2] == members:
                    pieces[-1] = (pieces[-1][0], b, members)
                else:
                    pieces.append((a, b, members))
            segments[j] = tuple(pieces)
        return cls(lines, len(masks), voters, tuple(line_removed), segments)

    def decide(self, weights: Sequence[float], threshold: float) -> Optional[str]:
        """The raw text with the voted deletions applied; ``None`` when nobody may vote.

        A character is deleted when ``sum(weights of voters deleting it) >= threshold *
        sum(weights of voters)``; a line is removed when all its characters are (or,
        for a blank line, when its removal is voted).
        """
        if len(weights) != self.n_members:
            raise ValueError(f"{len(weights)} weights for {self.n_members} members")
        total = sum(w for bit, w in enumerate(weights) if self.voters >> bit & 1)
        if total <= 0:
            return None
        need = threshold * total - 1e-9
        memo: dict[int, bool] = {}

        def deleted(members: int) -> bool:
            verdict = memo.get(members)
            if verdict is None:
                members &= self.voters
                verdict = sum(w for bit, w in enumerate(weights) if members >> bit & 1) >= need
                memo[members] = verdict
            return verdict

        kept: list[str] = []
        for j, line in enumerate(self.lines):
            if self.line_removed[j] and deleted(self.line_removed[j]):
                continue
            pieces = self.segments.get(j)
            if pieces:
                cut = [(s, e) for s, e, members in pieces if deleted(members)]
                if cut:
                    new = _cut(line, _merge_spans(cut))
                    if line.strip() and not new.strip():
                        continue
                    line = new
            kept.append(line)
        return "\n".join(kept)


# Results ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemberResult:
    """One member's output on one document, its distilled program and what it deletes."""

    name: str
    version: str
    weight: float
    output: ExpertOutput
    program: Optional[Program] = None
    mask: Optional[DeletionMask] = None
    error: Optional[str] = None  # member failure or distillation failure

    @property
    def voted(self) -> bool:
        return self.mask is not None

    def detail(self, raw_lines: Sequence[str]) -> dict[str, Any]:
        """JSON-ready audit record (the program text, not the member's full output)."""
        status = OK if self.voted else (FAILED if self.output.status != OK else DISTILL_FAILED)
        return {
            "name": self.name,
            "version": self.version,
            "weight": self.weight,
            "status": status,
            "error": self.error,
            "lines_removed": len(self.mask.removed) if self.mask else None,
            "chars_deleted": self.mask.chars_deleted(raw_lines) if self.mask else None,
            "program": str(self.program) if self.program is not None else None,
            "tokens_in": self.output.tokens_in,
            "tokens_out": self.output.tokens_out,
            "cached": self.output.cached,
        }


@dataclass(frozen=True)
class ConsensusResult:
    """The consensus output of one document and every member's contribution."""

    output: ExpertOutput
    members: tuple[MemberResult, ...]
    threshold: float
    raw: str

    def members_detail(self) -> dict[str, Any]:
        """Audit detail: threshold, voters and each member's status, program and counts."""
        raw_lines = self.raw.split("\n")
        return {
            "algorithm": ALGORITHM_VERSION,
            "threshold": self.threshold,
            "voters": sum(1 for m in self.members if m.voted),
            "chars_in": len(self.raw),
            "chars_out": len(self.output.refined_text) if self.output.refined_text is not None else None,
            "members": [m.detail(raw_lines) for m in self.members],
        }

    def members_json(self) -> str:
        """``members_detail()`` as compact JSON (a string column for the Spark stage)."""
        return json.dumps(self.members_detail(), ensure_ascii=False, separators=(",", ":"))


# The expert -------------------------------------------------------------------------------

Distiller = Callable[[str, str], Program]


def _default_distill(raw: str, refined: str) -> Program:
    from refinex.distill import distill

    return distill(raw, refined)


class ConsensusExpert:
    """Weighted vote of member experts' deletions (see the module docstring)."""

    name: str = NAME

    def __init__(
        self,
        members: Optional[Sequence[Union[MemberSpec, str, Mapping[str, Any]]]] = None,
        threshold: float = 0.5,
        min_voters: int = 1,
        experts: Optional[Sequence[tuple[Expert, float]]] = None,
        distiller: Optional[Distiller] = None,
    ) -> None:
        """Members come as specs (built with ``get_expert``) or as ready ``(expert, weight)``
        pairs in ``experts``; ``min_voters`` members must succeed on a document, else its
        output is FAILED."""
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        if min_voters < 1:
            raise ValueError("min_voters must be >= 1")
        pairs: list[tuple[Expert, float]] = list(experts or [])
        for spec in (MemberSpec.parse(m) for m in (members or [])):
            pairs.append((get_expert(spec.name, **dict(spec.options)), spec.weight))
        if not pairs:
            raise ValueError("the consensus expert needs at least one member")
        names = [e.name for e, _ in pairs]
        if len(set(names)) != len(names):
            raise ValueError(f"member names must be unique, got {names}")
        if min_voters > len(pairs):
            raise ValueError(f"min_voters={min_voters} but only {len(pairs)} members")
        self.members: tuple[tuple[Expert, float], ...] = tuple(pairs)
        # Without HTML only the members that refine text can vote.
        self.needs_html = all(needs_html(e) for e, _ in pairs)
        self.threshold = float(threshold)
        self.min_voters = min_voters
        self._distill = distiller or _default_distill
        spec = json.dumps(
            {"t": self.threshold, "min": min_voters, "m": [[e.name, e.version, w] for e, w in pairs]},
            sort_keys=True,
        )
        self.version = f"{ALGORITHM_VERSION}+{hashlib.sha256(spec.encode()).hexdigest()[:12]}"

    @classmethod
    def from_yaml(cls, path: Union[str, "os.PathLike[str]"] = DEFAULT_CONFIG_PATH, **overrides: Any) -> "ConsensusExpert":
        """An expert from ``conf/experts/consensus.yaml`` (the ``consensus:`` section)."""
        import yaml

        with open(resolve_conf_path(path), "r", encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
        section = dict(data.get("consensus", data))
        section.update({k: v for k, v in overrides.items() if v is not None})
        unknown = sorted(set(section) - {"members", "threshold", "min_voters"})
        if unknown:
            raise ValueError(f"unknown consensus settings: {', '.join(unknown)}")
        members = [m for m in section.pop("members", []) if not (isinstance(m, Mapping) and m.get("enabled") is False)]
        members = [{k: v for k, v in m.items() if k != "enabled"} if isinstance(m, Mapping) else m for m in members]
        return cls(members=members, **section)

    def describe(self) -> dict[str, Any]:
        """Members (name, version, weight) and the threshold, for logs and MLflow params."""
        return {
            "version": self.version,
            "threshold": self.threshold,
            "min_voters": self.min_voters,
            "members": [{"name": e.name, "version": e.version, "weight": w} for e, w in self.members],
        }

    def __repr__(self) -> str:
        members = ", ".join(f"{e.name}:{w:g}" for e, w in self.members)
        return f"ConsensusExpert({members}; threshold={self.threshold:g})"

    def _run_member(self, expert: Expert, docs: Sequence[ExpertInput]) -> list[ExpertOutput]:
        try:
            outputs = list(expert.refine_batch(docs))
            if len(outputs) != len(docs):
                raise RuntimeError(f"returned {len(outputs)} outputs for {len(docs)} documents")
            return outputs
        except Exception as exc:  # noqa: BLE001 - a broken member abstains, the batch goes on
            logger.warning("consensus member %s failed on a batch: %s", expert.name, exc)
            error = f"member raised {type(exc).__name__}: {exc}"
            return [ExpertOutput(d.doc_id, None, FAILED, error) for d in docs]

    def _run_members(self, docs: Sequence[ExpertInput]) -> list[list[ExpertOutput]]:
        """Every member's outputs; I/O-bound members (``io_bound = True``, e.g. the LLM)
        run in background threads while the CPU-bound ones run here in turn."""
        background = [i for i, (e, _) in enumerate(self.members) if getattr(e, "io_bound", False)]
        if not background:
            return [self._run_member(expert, docs) for expert, _ in self.members]
        results: dict[int, list[ExpertOutput]] = {}
        with ThreadPoolExecutor(max_workers=len(background), thread_name_prefix="consensus") as pool:
            futures = {i: pool.submit(self._run_member, self.members[i][0], docs) for i in background}
            for i, (expert, _) in enumerate(self.members):
                if i not in futures:
                    results[i] = self._run_member(expert, docs)
            for i, future in futures.items():
                results[i] = future.result()
        return [results[i] for i in range(len(self.members))]

    def _member_result(self, expert: Expert, weight: float, doc: ExpertInput, out: ExpertOutput) -> MemberResult:
        if out.status != OK or out.refined_text is None:
            return MemberResult(expert.name, expert.version, weight, out, error=out.error or "no output")
        try:
            program = self._distill(doc.text, out.refined_text)
            mask = mask_from_program(program, doc.text)
        except Exception as exc:  # noqa: BLE001 - the member abstains on this document
            return MemberResult(expert.name, expert.version, weight, out, error=f"distill: {type(exc).__name__}: {exc}")
        return MemberResult(expert.name, expert.version, weight, out, program, mask)

    def refine_batch_with_members(self, docs: Sequence[ExpertInput]) -> list[ConsensusResult]:
        """Consensus outputs with every member's output, program and mask (in input order)."""
        started = time.monotonic()
        member_outputs = self._run_members(docs)
        member_time = (time.monotonic() - started) / max(1, len(docs))
        weights = [w for _, w in self.members]
        results: list[ConsensusResult] = []
        for d, doc in enumerate(docs):
            vote_started = time.monotonic()
            members = tuple(
                self._member_result(expert, weight, doc, member_outputs[m][d])
                for m, (expert, weight) in enumerate(self.members)
            )
            voters = [m for m in members if m.voted]
            tokens_in = sum(m.output.tokens_in for m in members)
            tokens_out = sum(m.output.tokens_out for m in members)
            requests = sum(m.output.requests for m in members)
            text: Optional[str] = None
            if len(voters) >= self.min_voters:
                table = VoteTable.build(doc.text, [m.mask for m in members])
                text = table.decide(weights, self.threshold)
            latency = member_time + time.monotonic() - vote_started
            if text is None:
                errors = "; ".join(f"{m.name}: {m.error}" for m in members if not m.voted)
                error = f"{len(voters)} of {len(members)} members voted (need {self.min_voters}, positive weight): {errors}"
                output = ExpertOutput(doc.doc_id, None, FAILED, error, tokens_in, tokens_out, requests, latency)
            else:
                output = ExpertOutput(doc.doc_id, text, OK, None, tokens_in, tokens_out, requests, latency)
            results.append(ConsensusResult(output, members, self.threshold, doc.text))
        return results

    def refine_batch(self, docs: Sequence[ExpertInput]) -> list[ExpertOutput]:
        """One consensus output per input, in order; FAILED when too few members voted."""
        return [r.output for r in self.refine_batch_with_members(docs)]


def create_consensus_expert(
    config_path: Union[str, "os.PathLike[str]"] = DEFAULT_CONFIG_PATH, **overrides: Any
) -> ConsensusExpert:
    """Registry factory: ``get_expert("consensus", threshold=..., members=[...])``; settings
    not given come from ``conf/experts/consensus.yaml``."""
    return ConsensusExpert.from_yaml(config_path, **overrides)


