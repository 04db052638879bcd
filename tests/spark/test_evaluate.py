"""Stage evaluate on hand-made pages: scores against gold and the expert, the evaluations
rows per scope, the MLflow run and the model-version tags in a real sqlite registry.

Six documents, each with a known outcome for the model origin (``refinex-refiner/1``) and
the distilled expert: a page whose expert keeps the ``with`` snippets and deletes the
``without`` ones, a page the model deletes entirely, a bag-of-words page, and three pages
without gold (fallback, no program, unchanged). Expected figures are counted by hand.
"""
from __future__ import annotations

import gzip
import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from refinex.config import Config
from refinex.evaluation import score_outputs, tokens
from refinex.evaluation.reliability import deletion_ratio_summary
from refinex.spark.evaluate import EVALUATE, TAG_PREFIX, gold_available
from refinex.spark.registry import run_stage
from refinex.spark.stage import context, execute
from refinex.spark.tables import TABLES, merge_into, read_table

NOW = datetime(2025, 1, 1, tzinfo=timezone.utc)
EXPERT = "trafilatura:test-v1"
MODEL = "refinex-refiner/1"
SNIPPETS, BOW, BLOG = "trafilatura-eval", "scrapinghub-aeb", "blog"

A = ["Home | News | Sport | Contact us",
     "Rivers of the north carry cold water from the mountains to the sea every single spring.",
     "Fishermen wait for the ice to break before the first boats leave the harbour again.",
     "Subscribe to our newsletter for weekly updates"]
B = ["Cookie settings: accept all cookies to continue",
     "The market opens at dawn and the traders set up their stalls along the old stone bridge.",
     "Related articles: Winter festivals, Summer markets"]
C = ["Menu Login Register",
     "Scientists measured the glacier and found it had shrunk by a third in ten years of study."]
LONG = "This paragraph is long enough to stay above the minimum number of kept characters."
D = ["Advertisement", LONG]
E = ["Nothing to see", LONG]
F_ = ["Sidebar links", LONG]

# doc_id -> (source, lines, gold, expert program, model program)
PAGES: dict[str, tuple[str, list[str], Optional[dict[str, Any]], str, Optional[str]]] = {
    "a": (SNIPPETS, A, {"with": ["Rivers of the north carry cold water", "the first boats leave the harbour"],
                        "without": ["Subscribe to our newsletter", "Home | News"]},
          "remove_lines(0, 0)\nremove_lines(3, 3)", "remove_lines(0, 1)\noops"),  # refined, one parse error
    "b": (SNIPPETS, B, {"with": ["The market opens at dawn"], "without": ["accept all cookies", "Related articles"]},
          "remove_lines(0, 0)\nremove_lines(2, 2)", "remove_lines(0, 2)"),  # the model deletes everything
    "c": (BOW, C, {"article_body": C[1]}, "remove_lines(0, 0)", 'remove_str(0, "Login ")'),
    "d": (BLOG, D, None, "remove_lines(0, 0)", "bad\nworse\nremove_lines(0, 0)"),  # falls back
    "e": (BLOG, E, None, "keep_all()", None),  # no program
    "f": (BLOG, F_, None, "remove_lines(0, 0)", "keep_all()"),  # unchanged
}


def _text(doc_id: str) -> str:
    return "\n".join(PAGES[doc_id][1])


def _seed(spark: SparkSession, workdir: str, with_gold: bool = True, programs: bool = True) -> None:
    documents = [
        (doc_id, source, None, _text(doc_id), None, json.dumps({"gold": gold}) if gold and with_gold else None, 0,
         "file:/in.jsonl", i + 1, len(_text(doc_id)), len(lines), NOW)
        for i, (doc_id, (source, lines, gold, _, _)) in enumerate(PAGES.items())
    ]
    merge_into(spark, workdir, "documents", spark.createDataFrame(documents, TABLES["documents"].schema))
    if not programs:
        return
    rows = [
        (doc_id, origin, version, program, None, None, None, None, None, None, None, None, None, NOW)
        for doc_id, (_, _, _, expert, model) in PAGES.items()
        for origin, version, program in (("distilled", EXPERT, expert), ("model", MODEL, model))
        if program is not None
    ]
    merge_into(spark, workdir, "programs", spark.createDataFrame(rows, TABLES["programs"].schema))


def _register_model(workdir: str) -> Any:
    from mlflow import MlflowClient

    uri = f"sqlite:///{workdir}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("refinex-refiner")
    client.create_model_version("refinex-refiner", source=f"{workdir}/models/refinex-refiner/1")
    return client


@pytest.fixture(autouse=True)
def _isolated_mlflow(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    yield


@pytest.fixture(scope="module")
def evaluated(spark: SparkSession, spark_config: Config, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Both origins applied and evaluated over the six pages, with a registered model version."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        workdir = str(tmp_path_factory.mktemp("evaluate") / "work")
        _seed(spark, workdir)
        client = _register_model(workdir)
        for origin, version in (("distilled", EXPERT), ("model", MODEL)):
            run_stage("apply", spark, spark_config, workdir, origin=origin, origin_version=version)
        # The model's ratios come from edit_stats, the expert's (no stats run) from exec_stats.
        run_stage("stats", spark, spark_config, workdir, origin="model", origin_version=MODEL)
        stats = {origin: execute(EVALUATE, context(spark, spark_config, workdir), origin=origin)
                 for origin in ("model", "distilled")}
    return {"workdir": workdir, "stats": stats, "client": client}


def _rows(spark: SparkSession, workdir: str, run_id: str) -> dict[str, dict[str, Any]]:
    table = read_table(spark, workdir, "evaluations").where(F.col("run_id") == run_id)
    return {r["scope"]: r.asDict() for r in table.collect()}


def _deleted(lines: list[str], removed: list[int]) -> int:
    """Characters removing whole lines deletes: each line with one line break."""
    return sum(len(lines[i]) + 1 for i in removed)


def test_model_scores_against_gold_and_the_expert(spark: SparkSession, evaluated: dict[str, Any]) -> None:
    stats = evaluated["stats"]["model"]
    rows = _rows(spark, evaluated["workdir"], stats["run_id"])
    assert set(rows) == {"all", SNIPPETS, BOW, BLOG}
    overall = rows["all"]
    assert (overall["origin"], overall["origin_version"]) == ("model", MODEL)
    assert (overall["model_name"], overall["model_version"]) == ("refinex-refiner", "1")
    assert (overall["documents"], overall["gold_pages"], overall["bow_pages"]) == (6, 3, 1)
    # a: TP 1 (boats), FN 1 (rivers), FP 1 (subscribe), TN 1 (home); b (deleted): FN 1, TN 2.
    assert overall["snippet_precision"] == pytest.approx(1 / 2) and overall["snippet_recall"] == pytest.approx(1 / 3)
    assert overall["snippet_f1"] == pytest.approx(0.4) and overall["snippet_accuracy"] == pytest.approx(4 / 7)
    # The raw text finds every snippet, with and without: TP 3, FP 4.
    assert overall["raw_snippet_recall"] == 1.0 and overall["raw_snippet_f1"] == pytest.approx(0.6)
    gold_tokens = len(tokens(C[1]))
    assert overall["bow_recall"] == 1.0 and overall["bow_precision"] == pytest.approx(gold_tokens / (gold_tokens + 2))
    raw_precision = gold_tokens / (gold_tokens + 3)
    assert overall["raw_bow_f1"] == pytest.approx(2 * raw_precision / (raw_precision + 1))
    # Deleted characters (model / expert / both) per document, by hand.
    model = {"a": _deleted(A, [0, 1]), "b": len(_text("b")), "c": len("Login "), "d": 0, "e": len(_text("e")), "f": 0}
    expert = {"a": _deleted(A, [0, 3]), "b": _deleted(B, [0, 2]), "c": _deleted(C, [0]), "d": _deleted(D, [0]),
              "e": 0, "f": _deleted(F_, [0])}
    both = {"a": _deleted(A, [0]), "b": expert["b"], "c": len("Login "), "d": 0, "e": 0, "f": 0}
    assert overall["deletion_precision"] == pytest.approx(sum(both.values()) / sum(model.values()))
    assert overall["deletion_recall"] == pytest.approx(sum(both.values()) / sum(expert.values()))
    n_model, n_expert, n_both = sum(model.values()), sum(expert.values()), sum(both.values())
    assert overall["deletion_f1"] == pytest.approx(2 * n_both / (n_model + n_expert))
    # Statuses: a refined (a parse error), b dropped, c refined, d fallback_raw, e no_program, f unchanged.
    assert overall["new_words"] == 0
    assert (overall["untouched_share"], overall["emptied_share"], overall["fallback_share"]) == (1 / 6, 1 / 6, 1 / 6)
    assert overall["invalid_share"] == pytest.approx(2 / 6)
    ratios = [r["exec_stats"]["deletion_ratio"] if r["exec_stats"] else None for r in
              read_table(spark, evaluated["workdir"], "refined_documents").where(F.col("origin") == "model").collect()]
    assert len([r for r in ratios if r is not None]) == 5  # e has no program
    expected_ratios = deletion_ratio_summary(ratios)
    for key, value in expected_ratios.items():
        assert overall[key] == pytest.approx(value)
    # Per source: each row holds only its own documents.
    assert rows[SNIPPETS]["documents"] == 2 and rows[SNIPPETS]["bow_f1"] is None
    assert rows[SNIPPETS]["snippet_f1"] == pytest.approx(0.4) and rows[SNIPPETS]["emptied_share"] == 0.5
    assert rows[BOW]["snippet_f1"] is None and rows[BOW]["bow_f1"] == overall["bow_f1"]
    assert rows[BOW]["deletion_recall"] == pytest.approx(len("Login ") / expert["c"])
    blog = rows[BLOG]
    assert (blog["documents"], blog["gold_pages"], blog["snippet_f1"], blog["raw_bow_f1"]) == (3, 0, None, None)
    assert blog["fallback_share"] == pytest.approx(1 / 3) and blog["untouched_share"] == pytest.approx(1 / 3)
    # The stage's statistics carry the headline figures of scope all.
    assert stats["snippet_f1"] == overall["snippet_f1"] and stats["expert_version"] == EXPERT
    assert stats["gold"] == "documents" and set(stats["by_source"]) == {SNIPPETS, BOW, BLOG}


def test_the_expert_scores_perfectly_and_has_no_deletion_figures(
    spark: SparkSession, evaluated: dict[str, Any]
) -> None:
    stats = evaluated["stats"]["distilled"]
    overall = _rows(spark, evaluated["workdir"], stats["run_id"])["all"]
    assert overall["origin_version"] == EXPERT and overall["model_name"] is None
    for name in ("snippet_precision", "snippet_recall", "snippet_f1", "snippet_accuracy", "bow_precision",
                 "bow_recall", "bow_f1"):
        assert overall[name] == 1.0, name
    assert overall["deletion_precision"] is overall["deletion_recall"] is overall["deletion_f1"] is None
    assert stats["expert_version"] is None and overall["untouched_share"] == pytest.approx(1 / 6)
    refined = read_table(spark, evaluated["workdir"], "refined_documents").where(F.col("origin") == "distilled")
    expected = deletion_ratio_summary(r["exec_stats"]["deletion_ratio"] for r in refined.collect())
    assert {key: overall[key] for key in expected} == pytest.approx(expected)


def test_gold_scores_equal_score_outputs(spark: SparkSession, spark_config: Config, evaluated: dict[str, Any]) -> None:
    """The distributed scores equal refinex.evaluation.dev.score_outputs on the same outputs."""
    workdir = evaluated["workdir"]
    assert gold_available(context(spark, spark_config, workdir))  # the documents' metadata.gold
    pages = [{"id": doc_id, "source": source, "gold": gold}
             for doc_id, (source, _, gold, _, _) in PAGES.items() if gold is not None]
    for origin, version in (("model", MODEL), ("distilled", EXPERT)):
        refined = read_table(spark, workdir, "refined_documents").where(F.col("origin_version") == version)
        outputs = {r["doc_id"]: r["refined_text"] for r in refined.collect()}
        expected = score_outputs(pages, outputs)
        overall = _rows(spark, workdir, evaluated["stats"][origin]["run_id"])["all"]
        for name in ("precision", "recall", "f1", "accuracy"):
            assert overall[f"snippet_{name}"] == pytest.approx(expected["snippet"][name])
        for name in ("precision", "recall", "f1"):
            assert overall[f"bow_{name}"] == pytest.approx(expected["bow"][name])


def test_mlflow_run_and_model_version_tags(
    spark: SparkSession, spark_config: Config, evaluated: dict[str, Any]
) -> None:
    client, stats = evaluated["client"], evaluated["stats"]["model"]
    overall = _rows(spark, evaluated["workdir"], stats["run_id"])["all"]
    assert stats["model_version_tagged"] == "refinex-refiner/1"
    tags = client.get_model_version("refinex-refiner", "1").tags
    assert float(tags[f"{TAG_PREFIX}snippet_f1"]) == overall["snippet_f1"]
    assert float(tags[f"{TAG_PREFIX}invalid_share"]) == overall["invalid_share"]
    assert tags[f"{TAG_PREFIX}new_words"] == "0" and tags[f"{TAG_PREFIX}documents"] == "6"
    assert tags[f"{TAG_PREFIX}run_id"] == stats["run_id"] and tags[f"{TAG_PREFIX}origin_version"] == MODEL
    run = client.get_run(stats["mlflow_run_id"])
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == spark_config.evaluate.mlflow_experiment
    assert run.data.params["origin"] == "model" and run.data.params["origin_version"] == MODEL
    assert run.data.params["version_label"] == stats["version_label"]
    metrics = run.data.metrics
    assert metrics["snippet_f1"] == overall["snippet_f1"] and metrics["deletion_f1"] == overall["deletion_f1"]
    assert metrics[f"{SNIPPETS}.snippet_recall"] == pytest.approx(1 / 3) and f"{BOW}.bow_f1" in metrics
    assert f"{BLOG}.snippet_f1" not in metrics  # null figures are not logged
    artifacts = sorted(Path(a.path).name for a in client.list_artifacts(stats["mlflow_run_id"], "plots"))
    assert artifacts == ["deletion_ratio.png", "operations.png", "scores_by_source.png"]
    # The expert's evaluation is logged but tags no model version.
    assert "model_version_tagged" not in evaluated["stats"]["distilled"]


def test_plots_are_written_under_reports(evaluated: dict[str, Any]) -> None:
    stats = evaluated["stats"]["model"]
    folder = Path(evaluated["workdir"]) / "reports" / "evaluation" / f"model-{stats['version_label'].replace('/', '_')}"
    assert sorted(p.name for p in folder.iterdir()) == ["deletion_ratio.png", "operations.png", "scores_by_source.png"]
    for plot in stats["plots"]:
        assert Path(plot).parent == folder and Path(plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _refined_rows(spark: SparkSession, workdir: str, written_in: dict[str, str]) -> None:
    """The expert's refined_documents, executed here (no apply run), with ``written_in``
    words appended to some refined texts: output no program could have produced."""
    from refinex.program import execute as run_program
    from refinex.program import parse

    rows = []
    for doc_id, (_, _, _, program, _) in PAGES.items():
        result = run_program(parse(program), _text(doc_id))
        stats = (result.chars_in, result.chars_out, result.chars_removed, result.lines_in, result.lines_out,
                 result.lines_removed, result.ops_total, result.ops_applied, len(result.ops_rejected),
                 result.n_remove_lines, result.n_remove_str, result.n_keep_all, result.parse_errors,
                 result.rejected_by_reason(), result.deletion_ratio)
        rows.append((doc_id, "distilled", EXPERT, "run-0", result.text + written_in.get(doc_id, ""), result.status,
                     stats, NOW))
    merge_into(spark, workdir, "refined_documents", spark.createDataFrame(rows, TABLES["refined_documents"].schema))


def test_without_gold_then_with_a_gold_file(
    spark: SparkSession, spark_config: Config, workdir: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _seed(spark, workdir, with_gold=False, programs=False)
    _refined_rows(spark, workdir, {"a": " zebra"})
    assert not gold_available(context(spark, spark_config, workdir))
    # MLflow cannot be reached: a warning, and the evaluation is still written.
    config = spark_config.with_overrides({"model.tracking_uri": "bogus://nowhere", "evaluate.plots": False})
    with caplog.at_level(logging.WARNING, logger="refinex.spark.evaluate"):
        stats = execute(EVALUATE, context(spark, config, workdir), origin="distilled", origin_version=EXPERT)
    assert "could not record in MLflow" in caplog.text and "no gold" in caplog.text
    assert "mlflow_run_id" not in stats and stats["plots"] == [] and stats["gold"] is None
    rows = _rows(spark, workdir, stats["run_id"])
    assert set(rows) == {"all", SNIPPETS, BOW, BLOG}
    overall = rows["all"]
    assert (overall["documents"], overall["gold_pages"], overall["bow_pages"]) == (6, 0, 0)
    for name in ("snippet_precision", "snippet_f1", "bow_f1", "raw_snippet_recall", "raw_bow_f1"):
        assert overall[name] is None, name
    assert overall["untouched_share"] == pytest.approx(1 / 6) and overall["deletion_ratio_mean"] > 0
    assert overall["new_words"] == 1  # "zebra"

    # The same documents scored against a pages file.
    pages = tmp_path / "gold.jsonl.gz"
    with gzip.open(pages, "wt", encoding="utf-8") as out:
        for doc_id, (source, _, gold, _, _) in PAGES.items():
            if gold is not None:
                out.write(json.dumps({"id": doc_id, "source": source, "html": "<p>x</p>", "gold": gold}) + "\n")
    assert gold_available(context(spark, spark_config, workdir), str(pages))
    stats = execute(EVALUATE, context(spark, config, workdir), origin="distilled", origin_version=EXPERT,
                    gold=str(pages))
    overall = _rows(spark, workdir, stats["run_id"])["all"]
    assert stats["gold"] == str(pages) and (overall["gold_pages"], overall["bow_pages"]) == (3, 1)
    assert overall["snippet_f1"] == overall["bow_f1"] == 1.0

    with pytest.raises(LookupError, match="run apply"):
        execute(EVALUATE, context(spark, config, workdir), origin="model", origin_version=MODEL)
    with pytest.raises(FileNotFoundError):
        execute(EVALUATE, context(spark, config, workdir), origin="distilled", origin_version=EXPERT,
                gold=str(tmp_path / "absent.jsonl"))


def test_both_gold_families_page_types_and_a_split(
    spark: SparkSession, spark_config: Config, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A page with snippet and main-content gold counts in both families; WCXB-like page types
    get scopes of their own; ``--split`` scores and validates one SFT split only."""
    from refinex.model.sft import VALIDATION, assign_split

    config = spark_config.with_overrides({"sft.validation_fraction": 0.5})
    ids = [f"w{i}" for i in range(40)]
    held = next(i for i in ids if assign_split(i, 0.5) == VALIDATION)
    seen = next(i for i in ids if assign_split(i, 0.5) != VALIDATION)
    lines = ["Menu Login Register", LONG, "Share this page"]
    gold = {"with": ["long enough to stay"], "without": ["Share this page"], "article_body": LONG}
    docs = [(doc_id, "wcxb", None, "\n".join(lines), None, json.dumps({"gold": gold, "page_type": kind}), 0,
             "file:/in.jsonl", n, 10, 3, NOW) for n, (doc_id, kind) in enumerate(((held, "forum"), (seen, "listing")))]
    workdir = str(tmp_path_factory.mktemp("evaluate-split") / "work")
    merge_into(spark, workdir, "documents", spark.createDataFrame(docs, TABLES["documents"].schema))
    programs = [(doc_id, "model", MODEL, "remove_lines(0, 0)\nremove_lines(2, 2)", *([None] * 9), NOW)
                for doc_id in (held, seen)]
    merge_into(spark, workdir, "programs", spark.createDataFrame(programs, TABLES["programs"].schema))
    run_stage("apply", spark, config, workdir, origin="model", origin_version=MODEL)
    run_stage("stats", spark, config, workdir, origin="model", origin_version=MODEL)

    every = run_stage("evaluate", spark, config, workdir, origin="model", origin_version=MODEL)
    assert set(every["by_source"]) == {"wcxb", "wcxb/forum", "wcxb/listing"}
    assert (every["documents"], every["gold_pages"]) == (2, 2)
    assert every["snippet_f1"] == 1.0 and every["bow_f1"] == 1.0  # both families scored on each page
    assert every["by_source"]["wcxb/forum"]["documents"] == 1 and every["by_source"]["wcxb/forum"]["bow_pages"] == 1
    assert "wcxb/listing: 1 documents" in EVALUATE.describe(every)

    only = run_stage("evaluate", spark, config, workdir, origin="model", origin_version=MODEL, split="validation")
    assert only["documents"] == 1 and set(only["by_source"]) == {"wcxb", "wcxb/forum"} and only["split"] == VALIDATION
    gates = run_stage("validate", spark, config, workdir, origin="model", origin_version=MODEL, split="validation")
    assert gates["passed"] and gates["documents"] == 1
    with pytest.raises(ValueError, match="split must be one of"):
        run_stage("evaluate", spark, config, workdir, origin="model", origin_version=MODEL, split="test")
