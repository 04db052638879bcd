"""Response cache of expert refinements, keyed by (model, prompt version, document hash).

The cache is an interface (``ResponseCache``) so that the same expert code runs with an
in-memory cache in tests, a local JSON-lines file in a notebook or on one machine, and a
Delta table in the Spark layer. Every implementation stores rows of ``CACHE_ROW_SCHEMA``.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, Optional, Protocol, Sequence, Union, runtime_checkable

# The row schema of every cache store, as (column, Spark SQL type) pairs, in column order.
# ``created_at`` is a UTC timestamp; ``refined_text`` is the whole reassembled document.
CACHE_ROW_SCHEMA: tuple[tuple[str, str], ...] = (
    ("key", "string"),
    ("model", "string"),
    ("prompt_version", "string"),
    ("doc_hash", "string"),
    ("refined_text", "string"),
    ("tokens_in", "bigint"),
    ("tokens_out", "bigint"),
    ("created_at", "timestamp"),
)
CACHE_COLUMNS: tuple[str, ...] = tuple(name for name, _ in CACHE_ROW_SCHEMA)
CACHE_DDL = ", ".join(f"{name} {sql_type}" for name, sql_type in CACHE_ROW_SCHEMA)


def doc_hash(text: str) -> str:
    """SHA-256 (hex) of a document's raw text in UTF-8."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cache_key(model: str, prompt_version: str, document_hash: str) -> str:
    """SHA-256 (hex) of the endpoint model, the prompt version and the document hash."""
    material = "\x1f".join((model, prompt_version, document_hash))
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class CachedResponse:
    """One cache row (see ``CACHE_ROW_SCHEMA``)."""

    key: str
    model: str
    prompt_version: str
    doc_hash: str
    refined_text: str
    tokens_in: int = 0
    tokens_out: int = 0
    created_at: datetime = field(default_factory=_utcnow)

    def to_row(self) -> dict[str, Any]:
        """The row as a plain dict in schema order (``created_at`` stays a ``datetime``)."""
        return {name: getattr(self, name) for name in CACHE_COLUMNS}

    def to_json(self) -> str:
        """One JSON line (``created_at`` as ISO-8601)."""
        row = asdict(self)
        row["created_at"] = self.created_at.isoformat()
        return json.dumps(row, ensure_ascii=False, sort_keys=False)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "CachedResponse":
        """Build from a dict/Spark row with the schema's columns (timestamps or ISO strings)."""
        created = row.get("created_at")
        if isinstance(created, str):
            created = datetime.fromisoformat(created)
        elif created is None:
            created = _utcnow()
        if isinstance(created, datetime) and created.tzinfo is None:
            created = created.replace(tzinfo=timezone.utc)
        return cls(
            key=str(row["key"]),
            model=str(row["model"]),
            prompt_version=str(row["prompt_version"]),
            doc_hash=str(row["doc_hash"]),
            refined_text=str(row["refined_text"]),
            tokens_in=int(row.get("tokens_in") or 0),
            tokens_out=int(row.get("tokens_out") or 0),
            created_at=created,
        )


@runtime_checkable
class ResponseCache(Protocol):
    """Batch lookup and insert of cached refinements. Implementations must be thread-safe."""

    def get_many(self, keys: Sequence[str]) -> dict[str, CachedResponse]:
        """The cached rows among ``keys`` (absent keys are simply missing from the result)."""
        ...

    def put_many(self, rows: Sequence[CachedResponse]) -> None:
        """Insert rows; a key that is already present keeps its first row."""
        ...


class InMemoryResponseCache:
    """A dict-backed cache for tests and single-process runs."""

    def __init__(self, rows: Iterable[CachedResponse] = ()) -> None:
        self._rows: dict[str, CachedResponse] = {}
        self._lock = threading.Lock()
        self.put_many(list(rows))

    def get_many(self, keys: Sequence[str]) -> dict[str, CachedResponse]:
        with self._lock:
            return {k: self._rows[k] for k in keys if k in self._rows}

    def put_many(self, rows: Sequence[CachedResponse]) -> None:
        with self._lock:
            for row in rows:
                self._rows.setdefault(row.key, row)

    def __len__(self) -> int:
        with self._lock:
            return len(self._rows)

    def __repr__(self) -> str:
        return f"InMemoryResponseCache(rows={len(self)})"


class JsonlResponseCache:
    """A local append-only JSON-lines file; loaded once, appended per ``put_many``.

    Meant for one process (threads are fine). A torn last line (e.g. after a crash) is
    skipped on load. Not for Spark executors: use the Delta-backed cache there.
    """

    def __init__(self, path: Union[str, "os.PathLike[str]"]) -> None:
        self.path = os.fspath(path)
        self._rows: Optional[dict[str, CachedResponse]] = None
        self._lock = threading.Lock()

    def _load(self) -> dict[str, CachedResponse]:
        if self._rows is None:
            rows: dict[str, CachedResponse] = {}
            if os.path.exists(self.path):
                with open(self.path, "r", encoding="utf-8") as fh:
                    for line in fh:
                        if not line.strip():
                            continue
                        try:
                            row = CachedResponse.from_row(json.loads(line))
                        except (ValueError, KeyError, TypeError):
                            continue
                        rows.setdefault(row.key, row)
            self._rows = rows
        return self._rows

    def get_many(self, keys: Sequence[str]) -> dict[str, CachedResponse]:
        with self._lock:
            rows = self._load()
            return {k: rows[k] for k in keys if k in rows}

    def put_many(self, rows: Sequence[CachedResponse]) -> None:
        with self._lock:
            stored = self._load()
            new = [r for r in rows if r.key not in stored]
            if not new:
                return
            directory = os.path.dirname(self.path)
            if directory:
                os.makedirs(directory, exist_ok=True)
            payload = "".join(r.to_json() + "\n" for r in new)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(payload)
                fh.flush()
            for r in new:
                stored.setdefault(r.key, r)

    def __len__(self) -> int:
        with self._lock:
            return len(self._load())

    def __repr__(self) -> str:
        return f"JsonlResponseCache(path={self.path!r})"
