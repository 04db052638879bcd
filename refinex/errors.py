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


class TableWriteConflict(RuntimeError):
    """Other writers kept committing to a Delta table while this one tried to (every attempt
    lost Delta's optimistic-concurrency check): the message names the table and the attempts."""


def one_line(exc: BaseException) -> tuple[str, str]:
    """(name, first line of the message) of an error, for one-line reports. A Py4JJavaError
    (a Java exception PySpark does not convert, such as Delta's) is named by its Java
    exception: its own first line is only "An error occurred while calling o123.execute"."""
    name, text = type(exc).__name__, str(exc).strip()
    java = getattr(exc, "java_exception", None)
    if java is not None and name == "Py4JJavaError":
        try:
            described = str(java.toString()).strip()
        except Exception:  # noqa: BLE001 - the JVM may be gone: keep Python's text
            described = ""
        head, _, rest = described.partition(": ")
        if head:
            name, text = head.rsplit(".", 1)[-1], rest.strip() or head
    return name, text.splitlines()[0] if text else name
