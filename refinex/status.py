"""The closed set of per-document statuses written to ``refined_documents`` and ``edit_stats``."""
from __future__ import annotations

REFINED = "refined"  # the program deleted something and enough text is left
UNCHANGED = "unchanged"  # the program deleted nothing
DROPPED = "dropped"  # (almost) nothing is left: the whole document is boilerplate
FALLBACK_RAW = "fallback_raw"  # too many invalid operations: the raw text is kept
EXPERT_FAILED = "expert_failed"  # the expert could not refine the document
NO_PROGRAM = "no_program"  # no program of the requested origin exists for the document

ALL_STATUSES = (REFINED, UNCHANGED, DROPPED, FALLBACK_RAW, EXPERT_FAILED, NO_PROGRAM)
