"""The quality gates of ``refinex validate``, without Spark or Great Expectations (pure).

A :class:`Gate` is one expectation on one table of one ``(origin, origin_version)``: its
name, what it checks (``kind`` and the columns), its severity and its threshold, taken from
``config.quality``. :func:`gate_catalogue` lists them all; :mod:`refinex.quality.gx_gates`
turns each into a Great Expectations expectation and each GX result back into a
:class:`GateResult`; :func:`format_summary` writes what a person reads when a gate fails.

The deletion-only property, the core promise of the programs (the refined text is the raw
text with characters deleted, nothing inserted or reordered), is :func:`is_deletion_only`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence

from refinex.status import ALL_STATUSES

if TYPE_CHECKING:
    from refinex.config import QualityConfig

ERROR = "error"  # a failed gate fails the stage (and the job)
WARNING = "warning"  # reported and recorded, never fails the stage
SEVERITIES = (ERROR, WARNING)

# The tables the gates look at (the names of refinex.spark.tables, restated to stay pure).
REFINED_DOCUMENTS = "refined_documents"
EDIT_STATS = "edit_stats"
PROGRAMS = "programs"
GATED_TABLES = (REFINED_DOCUMENTS, EDIT_STATS, PROGRAMS)
ORIGIN_DISTILLED = "distilled"
KEY_COLUMNS = ("doc_id", "origin", "origin_version")

OFFENDING_ROWS_CAP = 1000
"""Offending rows kept per expectation (in ``gate_failures`` and the validation JSON)."""

# What a gate checks. The columns it names exist in the DataFrame the stage validates.
NOT_NULL = "not_null"  # column has no null
UNIQUE = "unique"  # the columns together are unique
IN_SET = "in_set"  # column's non-null values are in values
BETWEEN = "between"  # column's non-null values are in [minimum, maximum]
ROW_COUNT = "row_count"  # the table has exactly `expected` rows
AT_MOST_COLUMN = "at_most_column"  # columns[0] <= columns[1] where both are set
ALL_TRUE = "all_true"  # column's non-null values are all true
SHARE_AT_MOST = "share_at_most"  # mean of the 0/1 column is at most maximum
KINDS = (NOT_NULL, UNIQUE, IN_SET, BETWEEN, ROW_COUNT, AT_MOST_COLUMN, ALL_TRUE, SHARE_AT_MOST)

# Computed columns of the validated DataFrames (refinex.spark.validate builds them).
DELETION_ONLY = "deletion_only"  # refined_text is raw text with characters deleted (null: no output)
KNOWN_DOCUMENT = "known_document"  # the doc_id is a row of `documents`
EXTREME_DELETION = "extreme_deletion"  # 1: status refined with deletion_ratio >= extreme_deletion_ratio
PARSE_ERRORS = "parse_errors"  # malformed lines of the program text
SHARE_CEILINGS = {
    "fallback_raw": "max_fallback_share",
    "dropped": "max_dropped_share",
    "expert_failed": "max_expert_failed_share",
    "no_program": "max_no_program_share",
}
"""Statuses whose share of an origin's documents has a ceiling: the ``quality`` field of it."""
SHARE_STATUSES = tuple(SHARE_CEILINGS)


def share_column(status: str) -> str:
    """The 0/1 indicator column of ``status`` (``is_fallback_raw``)."""
    return f"is_{status}"


def is_deletion_only(raw: Optional[str], refined: Optional[str]) -> bool:
    """Whether ``refined`` is ``raw`` with characters deleted (a subsequence of it).

    ``None`` (no output: no program, the expert failed) and ``""`` (a dropped document) are
    deletion-only; ``raw`` None counts as empty. Greedy matching is exact for subsequences,
    and runs of kept text are matched in galloping steps (``str.startswith`` with doubling
    lengths) so the work stays linear in ``len(raw) + len(refined)`` but runs in C on the
    long kept stretches that programs leave.
    """
    if not refined:
        return True
    raw = raw or ""
    n, m = len(refined), len(raw)
    i = p = 0
    step = 1
    while i < n:
        if n - i > m - p:
            return False
        chunk = refined[i : i + step]
        if raw.startswith(chunk, p):
            i += len(chunk)
            p += len(chunk)
            step *= 2
        elif step > 1:
            step //= 2
        else:  # raw[p] differs from refined[i]: delete raw up to its next occurrence
            p = raw.find(refined[i], p + 1)
            if p < 0:
                return False
    return True


@dataclass(frozen=True)
class Gate:
    """One expectation: ``kind`` over ``column``/``columns`` of ``table``, at ``severity``.

    ``values`` are the allowed values (in_set), ``minimum``/``maximum`` the range (between)
    or the ceiling (share_at_most, ``maximum``), ``expected`` the row count (row_count).
    ``shows`` are the columns reported with each offending row of a share gate (whose
    0/1 column alone says nothing).
    """

    name: str
    table: str
    kind: str
    severity: str
    description: str
    column: Optional[str] = None
    columns: tuple[str, ...] = ()
    values: tuple[Any, ...] = ()
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    expected: Optional[int] = None
    shows: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"gate {self.name}: kind must be one of {KINDS}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"gate {self.name}: severity must be one of {SEVERITIES}")

    @property
    def key(self) -> str:
        """``<table>.<name>``: unique over the catalogue."""
        return f"{self.table}.{self.name}"

    @property
    def threshold(self) -> str:
        """The threshold as a person reads it (also the ``threshold`` of ``gate_failures``)."""
        if self.kind == NOT_NULL:
            return f"{self.column} not null"
        if self.kind == UNIQUE:
            return f"({', '.join(self.columns)}) unique"
        if self.kind == IN_SET:
            if len(self.values) == 1:
                return f"{self.column} == {self.values[0]}"
            return f"{self.column} in {{{', '.join(str(v) for v in self.values)}}}"
        if self.kind == BETWEEN:
            return f"{self.column} in [{_number(self.minimum)}, {_number(self.maximum)}]"
        if self.kind == ROW_COUNT:
            return f"rows == {self.expected} (rows of documents)"
        if self.kind == AT_MOST_COLUMN:
            return f"{self.columns[0]} <= {self.columns[1]}"
        if self.kind == ALL_TRUE:
            return f"{self.column} all true"
        return f"share <= {_number(self.maximum)}"


def _number(value: Optional[float]) -> str:
    return "none" if value is None else f"{value:g}"


def gate_catalogue(quality: "QualityConfig", origin: str, documents: int) -> tuple[Gate, ...]:
    """Every gate of one ``(origin, origin_version)``; ``documents`` is the row count of
    ``documents`` (``apply`` writes one row per document and version).

    ``refined_documents`` and ``edit_stats`` get the structural gates (key, status, row
    count, ranges); ``refined_documents`` also the deletion-only check and the status
    shares. Programs of distilled origins must all parse (the distiller renders them, so
    a parse error is a bug); a model's malformed lines are its own quality, measured by
    ``evaluate`` and handled by the guardrails (``fallback_raw``), so for model origins
    the parse gate is a warning.
    """
    gates: list[Gate] = []
    for table in (REFINED_DOCUMENTS, EDIT_STATS):
        gates += [
            Gate("doc_id_not_null", table, NOT_NULL, ERROR, "every row has a doc_id", column="doc_id"),
            Gate("key_unique", table, UNIQUE, ERROR, "one row per document and version", columns=KEY_COLUMNS),
            Gate("status_known", table, IN_SET, ERROR, "the status is one of refinex.status",
                 column="status", values=tuple(ALL_STATUSES)),
            Gate("row_count", table, ROW_COUNT, ERROR, "one row per document", expected=int(documents)),
            Gate("known_document", table, ALL_TRUE, ERROR, "the doc_id is a row of documents",
                 column=KNOWN_DOCUMENT),
            Gate("deletion_ratio_in_range", table, BETWEEN, ERROR, "a deletion ratio is a fraction",
                 column="deletion_ratio", minimum=0.0, maximum=1.0),
            Gate("chars_out_at_most_chars_in", table, AT_MOST_COLUMN, ERROR, "deleting never adds characters",
                 columns=("chars_out", "chars_in")),
        ]
    gates.append(Gate(DELETION_ONLY, REFINED_DOCUMENTS, ALL_TRUE, ERROR,
                      "the refined text is the raw text with characters deleted", column=DELETION_ONLY))
    for status, ceiling in SHARE_CEILINGS.items():
        gates.append(Gate(f"{status}_share", REFINED_DOCUMENTS, SHARE_AT_MOST, ERROR,
                          f"share of documents with status {status}", column=share_column(status),
                          maximum=float(getattr(quality, ceiling)), shows=("status",)))
    gates.append(Gate("extreme_deletion_share", REFINED_DOCUMENTS, SHARE_AT_MOST, WARNING,
                      f"share of documents refined with deletion_ratio >= {quality.extreme_deletion_ratio:g}",
                      column=EXTREME_DELETION, maximum=float(quality.max_extreme_share),
                      shows=("status", "deletion_ratio")))
    gates += [
        Gate("doc_id_not_null", PROGRAMS, NOT_NULL, ERROR, "every program has a doc_id", column="doc_id"),
        Gate("key_unique", PROGRAMS, UNIQUE, ERROR, "one program per document and version", columns=KEY_COLUMNS),
        Gate("program_parses", PROGRAMS, IN_SET, ERROR if origin == ORIGIN_DISTILLED else WARNING,
             "every line of the program is a well-formed operation", column=PARSE_ERRORS, values=(0,)),
    ]
    return tuple(gates)


@dataclass(frozen=True)
class Offender:
    """One offending row: its doc_id (None for whole-table gates or a null doc_id) and
    the value that broke the gate."""

    doc_id: Optional[str]
    observed: str


@dataclass(frozen=True)
class GateResult:
    """What one gate found: ``observed`` as a person reads it, ``observed_value`` as a
    number (the share, the row count, or the count of offending rows), ``offending`` the
    number of rows concerned and ``offenders`` up to :data:`OFFENDING_ROWS_CAP` of them.
    ``note`` adds what the stage knows about the cause (e.g. the expert's error)."""

    gate: Gate
    passed: bool
    observed: str
    observed_value: Optional[float]
    offending: int = 0
    offenders: tuple[Offender, ...] = ()
    note: str = ""

    @property
    def failed(self) -> bool:
        """Failed at error level: the stage fails."""
        return not self.passed and self.gate.severity == ERROR

    @property
    def warned(self) -> bool:
        """Failed at warning level: reported, the stage passes."""
        return not self.passed and self.gate.severity == WARNING

    def examples(self, limit: int) -> list[str]:
        """Up to ``limit`` distinct offending doc ids, in the order found."""
        seen: list[str] = []
        for offender in self.offenders:
            if len(seen) >= limit:
                break
            if offender.doc_id is not None and offender.doc_id not in seen:
                seen.append(offender.doc_id)
        return seen


def share_observed(count: int, total: int) -> tuple[str, Optional[float]]:
    """``("0.25 (10 of 40 rows)", 0.25)``; no share for an empty table."""
    if total <= 0:
        return f"{count} of 0 rows", None
    share = count / total
    return f"{share:.4g} ({count} of {total} rows)", share


def hint(result: GateResult) -> Optional[str]:
    """What a failed gate usually means, for the summary (None when nothing useful)."""
    name, value = result.gate.name, result.observed_value
    everything = value is not None and value >= 1.0
    if name == "expert_failed_share":
        if everything:
            return ("the expert failed on every document: HTML experts (trafilatura) need each document's "
                    "HTML, which a corpus of plain id/text records lacks; use a text expert, or ingest the HTML")
        return "the expert could not refine these documents (expert_refinements.error says why)"
    if name == "no_program_share":
        if everything:
            return "no document has a program of this version: run distill (distilled) or refine (model) first"
        return "these documents have no program of this version"
    if name == "dropped_share":
        return "(almost) nothing was left of these documents: programs that delete too much, or pages of boilerplate"
    if name == "fallback_raw_share":
        return "too many rejected operations: the guardrails kept the raw text (programs do not fit the documents)"
    if name == "row_count":
        return "apply writes one row per document: rerun apply (then stats) for this version"
    if name == DELETION_ONLY:
        return "the refined text is not the raw text with characters deleted (inserted or reordered text)"
    if name == "program_parses":
        return "programs with malformed lines (parse errors)"
    return None


def format_summary(
    results: Sequence[GateResult],
    title: str = "validate",
    example_ids: int = 5,
    notes: Iterable[str] = (),
) -> str:
    """The readable summary: a verdict line, then one block per failed expectation (error
    or warning): the expectation and its table, observed value against the threshold, a
    hint, and up to ``example_ids`` offending doc ids."""
    failed = [r for r in results if r.failed]
    warned = [r for r in results if r.warned]
    verdict = "FAILED" if failed else "passed"
    warnings = f"{len(warned)} warning{'' if len(warned) == 1 else 's'}"
    lines = [f"{title}: {verdict}: {len(failed)} of {len(results)} expectations failed, {warnings}"]
    for result in (*failed, *warned):
        gate = result.gate
        lines.append(f"  [{gate.severity}] {gate.key} ({gate.description}): observed {result.observed}, "
                     f"threshold {gate.threshold}")
        explained = hint(result)
        if explained:
            lines.append(f"      {explained}")
        if result.note:
            lines.append(f"      {result.note}")
        shown = result.examples(example_ids)
        if shown:
            more = result.offending - len(shown)
            lines.append(f"      examples: {', '.join(shown)}" + (f" (+{more} more)" if more > 0 else ""))
    lines += [f"  note: {note}" for note in notes]
    return "\n".join(lines)
