"""One rule for where a location lives: this machine's file system, or a remote store.

Workdirs, inputs and model folders are written as plain paths (``work/demo``, ``/abs``),
``file:`` URIs, Databricks locations (``dbfs:/…``, ``/Volumes/…``) or object-store URIs
(``gs://``, ``s3a://``, ``abfss://``, ``hdfs://``). Spark takes all of them; Python's own
file APIs (checkpoints, plots, reports, the MLflow sqlite store) need a local folder.

- :func:`is_local` is True for plain paths and ``file:`` URIs.
- :func:`driver_path` gives the folder Python can write on the driver: the path itself when
  local, the FUSE mount for Databricks locations (``dbfs:/Volumes/x`` -> ``/Volumes/x``,
  ``dbfs:/x`` -> ``/dbfs/x``), None for object stores.
- :func:`spark_location` gives what Spark is handed (local paths made absolute).

Pure: no Spark import, no file-system access except ``Path.resolve``.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")
DBFS = "dbfs"
VOLUMES_PREFIX = "/Volumes/"


def scheme(location: str) -> str:
    """The URI scheme (``gs``, ``dbfs``, ``file``), ``""`` for a plain path.

    A one-letter "scheme" is a Windows drive (``C:\\x``), not a URI.
    """
    match = _SCHEME.match(location)
    if match is None or len(match.group(1)) == 1:
        return ""
    return match.group(1).lower()


def is_local(location: str) -> bool:
    """True for plain paths (relative or absolute, ``/Volumes/…`` included) and ``file:`` URIs."""
    return scheme(location) in ("", "file")


def _strip_file(location: str) -> str:
    if location.startswith("file://"):
        return location[len("file://") :]
    if location.startswith("file:"):
        return location[len("file:") :]
    return location


def local_path(location: str) -> Path:
    """A local location as an absolute ``Path``; ValueError for a remote one."""
    if not is_local(location):
        raise ValueError(f"{location!r} is not a local path")
    return Path(_strip_file(location)).expanduser().resolve()


def driver_path(location: str) -> Optional[Path]:
    """The folder Python can read and write on the driver for this location, or None.

    Local paths as they are; ``dbfs:/Volumes/…`` as ``/Volumes/…`` and other ``dbfs:/…``
    as ``/dbfs/…`` (the Databricks FUSE mounts); None for object stores.
    """
    if is_local(location):
        return local_path(location)
    if scheme(location) == DBFS:
        rest = location[len("dbfs:") :]
        rest = "/" + rest.lstrip("/")
        return Path(rest) if rest.startswith(VOLUMES_PREFIX) else Path("/dbfs") / rest.lstrip("/")
    return None


def spark_location(location: str) -> str:
    """What Spark is handed: local paths absolute (no trailing slash), URIs as they are."""
    if is_local(location):
        return str(local_path(location))
    return location.rstrip("/")


def join(location: str, *parts: str) -> str:
    """``location/part/...`` with one slash between parts, for paths and URIs alike."""
    out = location.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out
