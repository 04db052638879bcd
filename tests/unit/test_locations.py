"""One local/remote rule for workdirs, inputs and model folders (refinex.locations)."""
from __future__ import annotations

from pathlib import Path

import pytest

from refinex.locations import driver_path, is_local, join, scheme, spark_location

CASES = [
    # location, local?, driver path (None: only Spark can reach it)
    ("work/demo", True, str(Path("work/demo").resolve())),
    ("/abs/work", True, "/abs/work"),
    ("file:/abs/work", True, "/abs/work"),
    ("file:///abs/work", True, "/abs/work"),
    ("/Volumes/main/refinex/work", True, "/Volumes/main/refinex/work"),
    ("dbfs:/Volumes/main/refinex/work", False, "/Volumes/main/refinex/work"),  # the regression: never <cwd>/dbfs:/
    ("dbfs:/tmp/refinex", False, "/dbfs/tmp/refinex"),
    ("gs://bucket/refinex", False, None),
    ("s3a://bucket/refinex", False, None),
    ("abfss://c@account.dfs.core.windows.net/refinex", False, None),
]


@pytest.mark.parametrize(("location", "local", "driver"), CASES)
def test_one_rule(location: str, local: bool, driver: str | None) -> None:
    assert is_local(location) is local
    found = driver_path(location)
    assert (None if found is None else str(found)) == driver
    if driver is not None:
        assert "dbfs:" not in str(found)


def test_spark_location_makes_local_paths_absolute_and_keeps_uris() -> None:
    assert spark_location("work/demo") == str(Path("work/demo").resolve())
    assert spark_location("dbfs:/Volumes/main/refinex/work/") == "dbfs:/Volumes/main/refinex/work"
    assert spark_location("gs://bucket/w") == "gs://bucket/w"
    assert join("gs://bucket/w/", "delta", "/edit_stats") == "gs://bucket/w/delta/edit_stats"


def test_scheme() -> None:
    assert scheme("C:\\data") == ""  # a drive letter is not a URI scheme
    assert scheme("ABFSS://x") == "abfss"
    assert scheme("relative/path:with-colon") == ""
