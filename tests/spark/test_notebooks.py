"""The notebooks in ``notebooks/``: the local runner, the helpers, and each notebook top to
bottom against a demo workdir (the pipeline on six sample pages: distilled programs, a tiny
model registered as version 1 @champion, its programs)."""
from __future__ import annotations

import html
import importlib.util
import sys
from html.parser import HTMLParser
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

import pytest
from pyspark.sql import SparkSession

from refinex.config import Config
from refinex.notebook import deletion_marks, env_name, render_explorer, widget
from refinex.program import execute, parse

REPO_ROOT = Path(__file__).resolve().parents[2]


def _load_runner() -> ModuleType:
    """``scripts/run_notebook.py`` (a script, not a package module)."""
    spec = importlib.util.spec_from_file_location("run_notebook", REPO_ROOT / "scripts" / "run_notebook.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_notebook"] = module
    spec.loader.exec_module(module)
    return module


runner = _load_runner()
NotebookError = runner.NotebookError
parse_notebook = runner.parse_notebook
run_notebook = runner.run_notebook
sql_parameters = runner.sql_parameters
_split_statements = runner.split_statements
_substitute = runner._substitute
_Widgets = runner._Widgets
NOTEBOOKS = REPO_ROOT / "notebooks"
SAMPLE = REPO_ROOT / "data" / "sample" / "pages-sample.jsonl.gz"
EDIT_STATISTICS = NOTEBOOKS / "01_edit_statistics.py"
PROGRAM_EXPLORER = NOTEBOOKS / "02_program_explorer.py"
MODEL_REGISTRY = NOTEBOOKS / "03_model_registry.py"
CHARTS = ("deletion_by_source.png", "deletion_by_status.png", "deletion_by_shard.png", "ops_per_document.png",
          "removed_strings.png", "removed_lines.png", "oracle_vs_model.png")
EXPLORER_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h3", "div", "span", "a", "table", "tr",
                 "td", "pre"}


# --- without Spark ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", [EDIT_STATISTICS, PROGRAM_EXPLORER, MODEL_REGISTRY], ids=lambda p: p.name)
def test_notebooks_are_databricks_source(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# Databricks notebook source\n")
    cells = parse_notebook(text)
    kinds = [cell.kind for cell in cells]
    assert kinds[0] == "md" and "python" in kinds and set(kinds) <= {"md", "python", "sql"}
    for cell in cells:
        assert "# MAGIC" not in cell.source and "# COMMAND" not in cell.source
        if cell.kind == "python":
            compile(cell.source, f"{path.name}:cell{cell.index}", "exec")
    # Every notebook starts by attaching through the helper, with the notebook's spark.
    first = next(cell for cell in cells if cell.kind == "python")
    assert "attach(" in first.source and "spark=spark" in first.source
    if path == EDIT_STATISTICS:
        assert kinds.count("sql") >= 8


def test_parse_notebook_magics_and_titles() -> None:
    text = "\n".join([
        "# Databricks notebook source", "x = 1", "", "# COMMAND ----------", "",
        "# DBTITLE 1,A title", "# MAGIC %sql", "# MAGIC SELECT 1", "# MAGIC", "# MAGIC   AS one", "",
        "# COMMAND ----------", "# MAGIC %md # Heading", "# MAGIC text",
    ])
    cells = parse_notebook(text)
    assert [(c.index, c.kind) for c in cells] == [(1, "python"), (2, "sql"), (3, "md")]
    assert cells[1].source == "SELECT 1\n\n  AS one" and cells[1].title == "A title"
    assert cells[2].source == "# Heading\ntext"
    with pytest.raises(NotebookError):
        parse_notebook("print(1)\n")


def test_sql_statements_and_parameters() -> None:
    sql = "SELECT ';' AS a, `x;y` -- c;omment\n FROM t; /* ; */ SELECT :p, x::int, j:path, ':q', (:r);;"
    assert _split_statements(sql) == ["SELECT ';' AS a, `x;y` -- c;omment\n FROM t", "/* ; */ SELECT :p, x::int, j:path, ':q', (:r)"]
    assert sql_parameters(sql) == ["p", "r"]
    widgets = _Widgets({"n": 5, "origin": "model"})
    widgets.text("table", "edit_stats")
    text, args = _substitute("SELECT * FROM ${table} WHERE origin = :origin LIMIT ${n}", widgets)
    assert text == "SELECT * FROM edit_stats WHERE origin = :origin LIMIT 5" and args == {"origin": "model"}
    with pytest.raises(NotebookError, match="no widget named 'missing'"):
        _substitute("SELECT :missing", widgets)


def test_runner_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    not_a_notebook = tmp_path / "plain.py"
    not_a_notebook.write_text("print(1)\n", encoding="utf-8")
    assert runner.main([str(not_a_notebook), "workdir=x"]) == 1
    assert "Databricks notebook source" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        runner.main([str(not_a_notebook), "no-equals-sign"])


def test_widget_falls_back_on_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert env_name("promote_version") == "REFINEX_NB_PROMOTE_VERSION"
    assert widget("promote_version", "") == ""
    monkeypatch.setenv("REFINEX_NB_PROMOTE_VERSION", "3")
    assert widget("promote_version", "") == "3"
    widgets = _Widgets({"origin": "model"})
    widgets.dropdown("origin", "distilled", ["distilled", "model"])
    assert widgets.get("origin") == "model" and widgets.getAll() == {"origin": "model"}
    with pytest.raises(ValueError):
        _Widgets({"origin": "other"}).dropdown("origin", "distilled", ["distilled", "model"])


@pytest.mark.parametrize("program", [
    "remove_lines(0, 1)\nremove_str(3, \"tail\")\nremove_str(3, \"tail\")",
    "remove_lines(1, 1)\nremove_lines(1, 2)\nremove_str(1, \"b\")\nremove_str(9, \"x\")\nkeep_all()",
    "keep_all()",
    "remove_str(2, \"c\")\nremove_str(2, \"c\")\nremove_str(2, \"c\")",
    "not a program",
])
def test_deletion_marks_match_execution(program: str) -> None:
    raw = "first line\nsecond b line\nc c\nbody text with a tail and another tail, long enough to be kept"
    marks = deletion_marks(program, raw)
    result = execute(parse(program), raw)
    assert marks.text == result.text and marks.status == result.status
    if result.status in ("refined", "unchanged"):  # the marks rebuild exactly the executed text
        kept = []
        for index, line in enumerate(marks.lines):
            if index in marks.removed:
                continue
            cursor, pieces = 0, []
            for start, end in marks.spans.get(index, ()):
                pieces.append(line[cursor:start])
                cursor = end
            kept.append("".join(pieces) + line[cursor:])
        assert "\n".join(kept) == result.text


def test_explorer_escapes_everything() -> None:
    raw = "<nav>Menu</nav>\nTitle & <script>alert(1)</script>\nThe body stays, and it is long enough to keep. Share\n\"q\""
    program = 'remove_lines(0, 0)\nremove_str(2, " Share")\nremove_str(7, "<b>")'
    marks = deletion_marks(program, raw)
    page = render_explorer([
        {"doc_id": "doc-<1>", "text": raw, "program": program, "refined_text": marks.text, "status": marks.status,
         "url": "javascript:alert('x')", "source": "<src>", "deletion_ratio": 0.25},
        {"doc_id": "doc-2", "text": raw, "program": None, "refined_text": None, "status": "no_program",
         "url": "https://example.com/?a=1&b=\"2\""},
    ], title="<title>", subtitle="a & b")
    assert "<script>" not in page and "<nav>" not in page and "<src>" not in page and "doc-<1>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "doc-&lt;1&gt;" in page
    assert 'href="javascript' not in page and 'href="https://example.com/?a=1&amp;b=&quot;2&quot;"' in page
    assert 'class="del"' in page and '<span class="cut"> Share</span>' in page
    assert "line_out_of_range" in page  # the rejected remove_str is reported
    assert _tags(page) <= EXPLORER_TAGS


class _TagCollector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        self.tags.add(tag)


def _tags(page: str) -> set[str]:
    parser = _TagCollector()
    parser.feed(page)
    return parser.tags


# --- the runner, on the session -----------------------------------------------------------------


def test_runner_sql_cells_widgets_and_errors(spark: SparkSession, tmp_path: Path) -> None:
    notebook = tmp_path / "nb.py"
    notebook.write_text("\n".join([
        "# Databricks notebook source",
        "# MAGIC %md", "# MAGIC # Title", "",
        "# COMMAND ----------", "",
        'dbutils.widgets.text("n", "2")', 'dbutils.widgets.text("word", "hello")', "",
        "# COMMAND ----------", "",
        "# MAGIC %sql", "# MAGIC CREATE OR REPLACE TEMP VIEW nb_t AS SELECT id FROM range(10);",
        "# MAGIC SELECT id, :word AS word FROM nb_t WHERE id < ${n} ORDER BY id", "",
        "# COMMAND ----------", "",
        "rows = _sqldf.collect()", 'displayHTML("<p>hi</p>")', "display(_sqldf)",
    ]), encoding="utf-8")
    ns = run_notebook(notebook, {"n": 3}, spark=spark, quiet=True)
    assert [(r.id, r.word) for r in ns["rows"]] == [(0, "hello"), (1, "hello"), (2, "hello")]
    assert [c["kind"] for c in ns["__cells__"]] == ["python", "sql", "python"]
    assert [d["kind"] for d in ns["__displays__"]] == ["DataFrame", "html", "DataFrame"]
    broken = tmp_path / "broken.py"
    broken.write_text("# Databricks notebook source\nx = 1\n\n# COMMAND ----------\n\nraise ValueError('boom')\n")
    with pytest.raises(NotebookError, match=r"cell 2 \(python\) failed: ValueError: boom") as caught:
        run_notebook(broken, spark=spark, quiet=True)
    assert "raise ValueError('boom')" in str(caught.value)


# --- the notebooks on a demo workdir ------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(spark: SparkSession, spark_config: Config, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A workdir after the whole pipeline on six sample pages."""
    if not SAMPLE.is_file():
        pytest.skip(f"no sample pages at {SAMPLE}")
    from refinex.spark.pipeline import run_pipeline

    workdir = str(tmp_path_factory.mktemp("notebooks") / "work")
    result = run_pipeline(spark, spark_config, workdir, str(SAMPLE), limit=6)
    assert result["train"]["version"] == "1" and result["promote"]["decision"] in ("champion", "challenger")
    if result["promote"]["decision"] != "champion":  # the registry notebook shows a champion
        from refinex.spark.registry import run_stage

        run_stage("promote", spark, spark_config, workdir, version=1, force=True, reason="notebook demo")
    yield {"workdir": workdir, "result": result, "params": {"workdir": workdir, "profile": "test"}}
    spark.catalog.setCurrentDatabase("default")  # attach() made the tables' schema current


@pytest.mark.slow
def test_edit_statistics_notebook(spark: SparkSession, demo: dict[str, Any]) -> None:
    params = {**demo["params"], "overrides": "guardrails.min_kept_chars=7 spark.shuffle_partitions=2"}
    ns = run_notebook(EDIT_STATISTICS, params, spark=spark, quiet=True)
    reports = Path(demo["workdir"]) / "reports" / "notebooks"
    for name in CHARTS:
        path = reports / name
        assert path.is_file() and path.stat().st_size > 1000, name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(ns["by_status"]["origin"]) == {"distilled", "model"}
    assert len(ns["compare"]) == 6  # every document has an oracle and a model program
    assert ns["by_source"]["documents"].sum() == 12
    assert not ns["ops"].empty and ns["ctx"].local and ns["ctx"].config.guardrails.min_kept_chars == 7


@pytest.mark.slow
def test_program_explorer_notebook(spark: SparkSession, demo: dict[str, Any]) -> None:
    docs = spark.sql("SELECT doc_id, text FROM refinex.documents ORDER BY doc_id").collect()
    known = docs[0]["doc_id"]
    ns = run_notebook(PROGRAM_EXPLORER, {**demo["params"], "n": 10, "seed": 7}, spark=spark, quiet=True)
    path = Path(demo["workdir"]) / "reports" / "notebooks" / "program_explorer.html"
    page = path.read_text(encoding="utf-8")
    assert Path(ns["explorer_path"]).resolve() == path.resolve() and ns["version"] == demo["result"]["stats"]["origin_version"]
    assert len(ns["docs"]) == 6 and known in page
    assert _tags(page) <= EXPLORER_TAGS  # nothing of the documents became markup
    for row in docs:  # every raw line is there, escaped
        for line in row["text"].split("\n")[:50]:
            assert html.escape(line, quote=True) in page
    assert any("&" in row["text"] for row in docs) and "&amp;" in page
    assert 'class="del"' in page  # the distilled programs delete lines
    # One document of the model's programs, chosen by id.
    ns = run_notebook(PROGRAM_EXPLORER, {**demo["params"], "origin": "model", "doc_ids": known}, spark=spark,
                      quiet=True)
    assert [d["doc_id"] for d in ns["docs"]] == [known] and ns["version"] == "refinex-refiner/1"
    assert known in path.read_text(encoding="utf-8")


@pytest.mark.slow
def test_model_registry_notebook(spark: SparkSession, demo: dict[str, Any]) -> None:
    ns = run_notebook(MODEL_REGISTRY, demo["params"], spark=spark, quiet=True)
    versions = ns["versions"]
    assert list(versions["version"]) == ["1"]
    assert bool(versions.loc[0, "champion"]) and versions.loc[0, "aliases"] == "@champion"
    assert ns["champion"] == "1" and ns["promotion"] is None
    stats = ns["version_stats"]
    assert list(stats["origin_version"]) == ["refinex-refiner/1"] and int(stats["documents"][0]) == 6
    assert (Path(demo["workdir"]) / "reports" / "notebooks" / "model_versions.png").stat().st_size > 1000
    assert versions.loc[0, "decision"] == "champion"
    # Promoting the champion again is a no-op that works.
    ns = run_notebook(MODEL_REGISTRY, {**demo["params"], "promote_version": "1"}, spark=spark, quiet=True)
    assert ns["promotion"]["decision"] == "unchanged" and ns["promotion"]["previous_champion"] == "1"
    assert ns["versions"].loc[0, "champion"]
    with pytest.raises(NotebookError, match="no version 9"):
        run_notebook(MODEL_REGISTRY, {**demo["params"], "promote_version": "9"}, spark=spark, quiet=True)
