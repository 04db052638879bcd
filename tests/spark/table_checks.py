"""Table comparisons of the Spark tests: a workdir's path tables against a reference run's,
keys and content columns only (timestamps, run ids and latencies are bookkeeping)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from chispa import assert_df_equality
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from refinex.spark.tables import TABLES


def delta_dir(workdir: Path, table: str) -> Path:
    """A path table's folder in a local workdir."""
    return Path(workdir) / "delta" / table


def load(spark: SparkSession, workdir: Path, table: str) -> DataFrame:
    """A table as it is (never created by reading it, unlike ``read_table``)."""
    return spark.read.format("delta").load(str(delta_dir(workdir, table)))


def comparable(frame: DataFrame, table: str) -> DataFrame:
    """Keys and content columns (no timestamps, run ids, latencies), maps as JSON."""
    spec = TABLES[table]
    columns = [*spec.keys, *spec.content_columns]
    types = {f.name: f.dataType.typeName() for f in spec.schema.fields}
    return frame.select(*[F.to_json(c).alias(c) if types[c] in ("map", "struct") else F.col(c) for c in columns])


def assert_same_table(spark: SparkSession, workdir: Path, reference: Path, table: str,
                      where: Optional[Any] = None) -> int:
    """The table equals the reference run's (restricted by ``where``); returns its rows."""
    actual, expected = load(spark, workdir, table), load(spark, reference, table)
    if where is not None:
        actual, expected = actual.where(where), expected.where(where)
    assert_df_equality(comparable(actual, table), comparable(expected, table), ignore_row_order=True,
                       ignore_nullable=True)
    return expected.count()
