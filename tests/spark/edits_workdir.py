"""A small workdir with both program origins, shared by the report and views tests.

Six documents (two sources, two shards, hostile markup, non-ASCII text) with programs of
origin ``distilled`` at an old version (dated 2020) and the current one, and of origin
``model``, applied and measured. The programs exercise every status and the program syntax
the SQL views parse: keywords, single quotes, ``\\u``/``\\U`` escapes and a JSON-style
surrogate pair, overlapping and out-of-range ranges, a malformed line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest
from pyspark.sql import SparkSession

from refinex.config import Config
from refinex.spark.tables import TABLES, append_rows

OLD_DISTILLED = "trafilatura:v1"
DISTILLED = "trafilatura:v2[tables=1]+label-r1"
MODEL = "refinex-refiner/1"
KEEP = "This sentence is long enough to stay above the minimum number of kept characters."
OLD = datetime(2020, 1, 1, tzinfo=timezone.utc)
NOW = datetime(2025, 1, 1, tzinfo=timezone.utc)

DOCUMENTS: dict[str, tuple[str, int, str]] = {
    "doc-a": ("news", 0, "\n".join([
        "Menu", "Home | About", "<script>alert('x')</script> Title & more", KEEP, "Share this", "  ",
        "Footer \u00a9 2024",
    ])),
    "doc-b": ("blog", 1, "\n".join([
        "Posted\u00a0by admin", f"Real content \U0001F600 with an emoji. {KEEP}", "Tags: a, b", "Copyright",
    ])),
    "doc-c": ("news", 1, f"Only {KEEP}"),
    "doc-d": ("blog", 0, "Menu\nFooter"),
    "doc-e": ("news", 0, f"{KEEP}\nsecond line"),
    "doc-f": ("blog", 1, f"{KEEP}\nShare this"),
}

PROGRAMS: dict[str, dict[str, str]] = {
    DISTILLED: {
        "doc-a": "\n".join([
            "remove_lines(0, 1)",
            "remove_str(2, \"<script>alert('x')</script> \")",
            "remove_lines(4, 5)",
            "remove_lines(5, 6)",  # overlaps the range before: rejected, line 6 stays
        ]),
        "doc-b": "remove_str(0, \"\\u00a0by admin\")\nremove_str(1, \" \\U0001f600\")\nremove_lines(2, 3)",
        "doc-c": "keep_all()",
        "doc-d": "remove_lines(0, 1)",  # everything: dropped
        "doc-e": "remove_lines(9, 9)\nremove_str(0, \"absent\")\nnot an operation",  # fallback_raw
        # doc-f: no program
    },
    MODEL: {
        "doc-a": "remove_lines(0, 0)\nremove_str(line=1, text=\"Home | \");\n  remove_lines(start=6, end=6,)",
        "doc-b": "\n".join([
            "remove_str(0, 'Posted\\u00a0')",
            "remove_str(1, \"\\ud83d\\ude00\")",
            "remove_lines(3, 3)",
            "remove_str(2, 'Tags: \\'a\\', \"b\\\\\" \\t\\u200b\\U000e0001')",  # not in the text: rejected
        ]),
        "doc-c": "remove_str(0, \"Only \")",
        "doc-d": "keep_all()",
        "doc-e": "remove_lines(0, 0)",
        "doc-f": "remove_lines(1, 1)",
    },
    OLD_DISTILLED: {
        "doc-a": "remove_lines(2, 2)\nremove_str(0, \"OLD STRING\")",
        "doc-b": "remove_lines(0, 0)",
    },
}


@dataclass(frozen=True)
class EditsWorkdir:
    workdir: str
    documents: dict[str, tuple[str, int, str]]
    programs: dict[str, dict[str, str]]


_BUILT: dict[str, EditsWorkdir] = {}


def _programs_rows(version: str, created_at: datetime) -> list[tuple]:
    origin = "model" if version == MODEL else "distilled"
    return [(d, origin, version, p, None, None, None, None, None, None, None, None, None, created_at)
            for d, p in PROGRAMS[version].items()]


def _applied(config: Config, version: str, created_at: datetime) -> tuple[list[tuple], list[tuple]]:
    """``refined_documents`` and ``edit_stats`` rows of one version, as apply and stats write
    them: every document, executed under the profile's guardrails (``no_program`` without one)."""
    from refinex.program import Guardrails, execute, parse

    g = Guardrails(max_error_ratio=float(config.guardrails.max_error_ratio),
                   min_kept_chars=int(config.guardrails.min_kept_chars))
    origin = "model" if version == MODEL else "distilled"
    refined, stats = [], []
    for doc_id, (source, shard, text) in DOCUMENTS.items():
        program = PROGRAMS[version].get(doc_id)
        if program is None:
            measured: tuple = (len(text), None, None, text.count("\n") + 1) + (None,) * 11
            refined.append((doc_id, origin, version, "run-apply", None, "no_program", None, created_at))
            stats.append((doc_id, origin, version, "run-stats", source, shard, "no_program", *measured, created_at))
            continue
        r = execute(parse(program), text, g)
        measured = (r.chars_in, r.chars_out, r.chars_removed, r.lines_in, r.lines_out, r.lines_removed, r.ops_total,
                    r.ops_applied, len(r.ops_rejected), r.n_remove_lines, r.n_remove_str, r.n_keep_all,
                    r.parse_errors, r.rejected_by_reason(), r.deletion_ratio)
        refined.append((doc_id, origin, version, "run-apply", r.text, r.status, measured, created_at))
        stats.append((doc_id, origin, version, "run-stats", source, shard, r.status, *measured, created_at))
    return refined, stats


def build(spark: SparkSession, config: Config, root: Path) -> EditsWorkdir:
    """The workdir under ``root`` (built once per test session). The tables are written as
    the stages leave them (rows from ``refinex.program.execute``, one ``apply`` run per
    current version in ``stage_runs``), without running the stages themselves."""
    key = spark.sparkContext.applicationId
    if key in _BUILT:
        return _BUILT[key]
    workdir = str(root / "edits")
    documents = [
        (doc_id, source, f"https://example.org/{doc_id}?a=1&b=<2>", text, None, None, shard, "file:/in.jsonl",
         i + 1, len(text), text.count("\n") + 1, NOW)
        for i, (doc_id, (source, shard, text)) in enumerate(DOCUMENTS.items())
    ]
    programs = _programs_rows(OLD_DISTILLED, OLD) + _programs_rows(DISTILLED, NOW) + _programs_rows(MODEL, NOW)
    refined, stats = [], []
    for version, created_at in ((OLD_DISTILLED, OLD), (DISTILLED, NOW), (MODEL, NOW)):
        rows = _applied(config, version, created_at)
        refined += rows[0]
        stats += rows[1]
    runs = [
        (f"run-apply-{origin}", "apply", NOW, NOW, json.dumps({"origin": origin, "origin_version": version}), "{}")
        for origin, version in (("distilled", DISTILLED), ("model", MODEL))
    ]
    for table, rows in (("documents", documents), ("programs", programs), ("refined_documents", refined),
                        ("edit_stats", stats), ("stage_runs", runs)):
        append_rows(spark, workdir, table, spark.createDataFrame(rows, TABLES[table].schema), count=False)
    built = EditsWorkdir(workdir, DOCUMENTS, PROGRAMS)
    _BUILT[key] = built
    return built


@pytest.fixture(scope="session")
def edits_workdir(spark: SparkSession, spark_config: Config, tmp_path_factory: pytest.TempPathFactory) -> EditsWorkdir:
    return build(spark, spark_config, tmp_path_factory.mktemp("edits"))
