"""Errors shared by the stages and the CLI (pure: the CLI imports them without Spark)."""
from __future__ import annotations

from typing import Any, Mapping


class StageFailed(RuntimeError):
    """A stage that ran to its end but judged its result a failure (a failed quality gate).

    The envelope still records the run (``stage_runs``, MLflow) with ``stats`` and
    ``failed: true``, then re-raises; the message is the readable summary for the user.
    """

    def __init__(self, message: str, stats: Mapping[str, Any]):
        super().__init__(message)
        self.stats = dict(stats)
