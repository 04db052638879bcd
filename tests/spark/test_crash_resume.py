"""Reliability, proven: stages killed with SIGKILL mid-run lose nothing.

Each stage runs as ``python -m refinex <stage>`` in a process group of its own, over a copy
of a workdir prepared in-process (the repository's 40 sample pages: ingested, refined by the
offline ``trafilatura`` expert, distilled, and a tiny tagging-head model trained and
registered). The test waits until the stage is visibly working (task output on disk, a
worker that loaded the model, a commit in the Delta log), then SIGKILLs the whole process
tree: the driver, its JVM and the Python workers (PySpark's daemon puts its workers in a
process group of their own, so they are killed by pid too). A kill that lands after the
stage recorded its run does not count: the attempt is repeated with an earlier kill point.

After the kill every Delta table must be readable with a readable, gap-free history and no
duplicate key, and the stage's output must hold either none or all of its rows (a commit is
atomic). A plain rerun must then finish the work and leave exactly the tables of an
uninterrupted run (compared with chispa, bookkeeping columns aside).

The kill points: ``expert`` right after its table's commit (before the run is recorded),
``refine`` while the workers run the model (before any write), ``apply`` while its tasks
write data files into ``refined_documents`` (before the commit).

Two more faults: a Python worker SIGKILLed mid-task (a master that allows task failures,
``local[2,3]``: Spark retries the task, the staged output has each document once), and two
pipelines started at once on one empty workdir (both finish: creation races and conflicting
MERGEs are retried, and a failure would have to be one line, ``refinex: <Error>: <message>``;
the tables hold each document once). Last, the table writers under concurrency in one
process: racing creators, a first write after another writer's, two MERGEs at once.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import psutil
import pytest
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from refinex.config import Config
from refinex.spark.tables import TABLES

from .table_checks import assert_same_table, delta_dir as _delta_dir, load

REPO_ROOT = Path(__file__).resolve().parents[2]
PAGES = REPO_ROOT / "data" / "sample" / "pages-sample.jsonl.gz"
MODEL = "models:/refinex-refiner/1"
SETTINGS = {"expert.mlflow": False, "model.head": "tag", "tag.epochs": 1, "tag.cv_folds": 0, "tag.head_size": 32,
            "tag.progress": False}
"""The in-process runs; the subprocesses get the same through ``--set`` (``SET_FLAGS``)."""
SET_FLAGS = ("--set", "expert.mlflow=false")
REFINED = 12  # documents the refine test runs the model on (--limit)
START_TIMEOUT_S = 240  # from launch to the kill point, on a loaded 2-core machine
RUN_TIMEOUT_S = 420

pytestmark = pytest.mark.skipif(not PAGES.is_file(), reason=f"no sample pages at {PAGES}")


# --- processes -------------------------------------------------------------------------------


def _env(cache: Path) -> dict[str, str]:
    """The environment of a ``refinex`` subprocess: offline, MLflow in the workdir, the
    repository importable, Spark's scratch space its own."""
    drop = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "SPARK_LOCAL_DIRS", "REFINEX_CONFIG")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    paths = [str(REPO_ROOT), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false",
               SPARK_LOCAL_IP="127.0.0.1", REFINEX_CACHE=str(cache), PYTHONPATH=os.pathsep.join(paths))
    return env


@dataclass
class Launched:
    """A ``refinex`` command running in a session (process group) of its own."""

    proc: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path
    started: float

    def alive(self) -> bool:
        return self.proc.poll() is None

    def err(self) -> str:
        return self.stderr.read_text(encoding="utf-8", errors="replace")

    def out(self) -> str:
        return self.stdout.read_text(encoding="utf-8", errors="replace")

    def tree(self) -> list[psutil.Process]:
        """The command and every process under it (JVM, PySpark daemon, Python workers)."""
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def wait(self, timeout: float = RUN_TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running after {timeout}s; stderr:\n{self.err()[-3000:]}") from None

    def kill(self) -> int:
        """SIGKILL the process group and every process of the tree (PySpark's daemon runs its
        workers in a group of their own); returns how many processes were killed."""
        tree = self.tree()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for process in tree[1:]:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(timeout=60)  # the command is reaped here, so that its exit status is kept
        _, alive = psutil.wait_procs(tree[1:], timeout=60)
        assert not alive, f"processes survived SIGKILL: {alive}"
        return len(tree)


def launch(args: Sequence[str], logs: Path, name: str, cache: Path) -> Launched:
    logs.mkdir(parents=True, exist_ok=True)
    stdout, stderr = logs / f"{name}.out", logs / f"{name}.err"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "refinex", *args], stdout=out, stderr=err, cwd=REPO_ROOT,
                                env=_env(cache), start_new_session=True)
    return Launched(proc, stdout, stderr, time.monotonic())


def wait_for(run: Launched, condition: Callable[[], bool], timeout: float = START_TIMEOUT_S) -> bool:
    """True as soon as ``condition()`` holds while the command still runs; False when the
    command ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not run.alive():
            return False
        if condition():
            return run.alive()
        time.sleep(0.1)
    run.kill()
    raise AssertionError(f"no kill point within {timeout}s; stderr:\n{run.err()[-3000:]}")


# --- tables ----------------------------------------------------------------------------------


def _committed(workdir: Path, table: str) -> bool:
    """Whether the table has at least its creation commit."""
    return any((_delta_dir(workdir, table) / "_delta_log").glob("*.json"))


def assert_tables_sound(spark: SparkSession, workdir: Path) -> dict[str, int]:
    """Every table with a commit: readable data, a readable history without gaps, one row
    per key. Returns the row count of each."""
    from delta.tables import DeltaTable

    counts: dict[str, int] = {}
    for folder in sorted((workdir / "delta").iterdir()):
        table = folder.name
        if not _committed(workdir, table):
            continue  # killed before its creation commit: the table does not exist yet
        versions = sorted(r[0] for r in DeltaTable.forPath(spark, str(folder)).history().select("version").collect())
        assert versions == list(range(len(versions))), f"{table}: history has gaps: {versions}"
        row = load(spark, workdir, table).agg(F.count(F.lit(1)), F.countDistinct(F.struct(*TABLES[table].keys))).first()
        assert row is not None and row[0] == row[1], f"{table}: {row[0]} rows but {row[1]} keys"
        counts[table] = int(row[0])
    return counts


def stage_run_ids(spark: SparkSession, workdir: Path, stage: str) -> set[str]:
    """The run ids ``stage_runs`` holds for ``stage`` (a stage records its run at its end)."""
    if not _committed(workdir, "stage_runs"):
        return set()
    rows = load(spark, workdir, "stage_runs").where(F.col("stage") == stage).select("run_id").collect()
    return {r["run_id"] for r in rows}


def stage_stats(spark: SparkSession, workdir: Path, stage: str, run_id: str) -> dict[str, Any]:
    row = load(spark, workdir, "stage_runs").where((F.col("stage") == stage) & (F.col("run_id") == run_id)).first()
    assert row is not None, f"no stage_runs row for {stage} {run_id}"
    return dict(json.loads(row["stats"]))


# --- the prepared workdirs -------------------------------------------------------------------


@dataclass
class Prepared:
    """Snapshots of one workdir before each stage under test, and the finished reference."""

    reference: Path
    ingested: Path  # documents
    distilled: Path  # + expert_refinements, programs (distilled)
    trained: Path  # + sft_pairs, the registered tagging-head model
    documents: int
    distilled_version: str
    model_version: str
    config: Config
    cache: Path
    root: Path


@pytest.fixture(scope="module")
def prepared(spark: SparkSession, spark_config: Config, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[Prepared]:
    from refinex.spark.registry import run_stage

    root = tmp_path_factory.mktemp("crash")
    cache = root / "refinex-cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("MLFLOW_REGISTRY_URI", raising=False)
        patch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        patch.setenv("REFINEX_CACHE", str(cache))
        config = spark_config.with_overrides(SETTINGS)
        ref = root / "reference"

        def snapshot(name: str) -> Path:
            target = root / name
            shutil.copytree(ref, target)
            return target

        ingest = run_stage("ingest", spark, config, str(ref), input=[str(PAGES)])
        with gzip.open(PAGES, "rt", encoding="utf-8") as fh:
            pages = sum(1 for line in fh if line.strip())
        assert ingest["accepted"] == pages
        ingested = snapshot("ingested")
        expert = run_stage("expert", spark, config, str(ref))
        assert expert["processed"] == pages
        run_stage("distill", spark, config, str(ref))
        distilled = snapshot("distilled")
        applied = run_stage("apply", spark, config, str(ref), origin="distilled",
                            origin_version=expert["origin_version"])
        assert applied["documents"] == pages
        run_stage("sft_pairs", spark, config, str(ref))
        train = run_stage("train", spark, config, str(ref))
        assert train["head"] == "tag" and train["version"] == "1"
        trained = snapshot("trained")
        refine = run_stage("refine", spark, config, str(ref), model=MODEL, limit=REFINED)
        assert refine["processed"] == REFINED
        yield Prepared(ref, ingested, distilled, trained, pages, expert["origin_version"], refine["origin_version"],
                       config, cache, root)


# --- SIGKILL of the driver -------------------------------------------------------------------


@dataclass
class Kill:
    """Where a kill landed."""

    workdir: Path
    run_id: str
    point: str  # the kill point that fired
    seconds: float  # from launch to the kill
    processes: int  # killed (command, JVM, daemon, workers)
    tables: dict[str, int]  # row counts right after the kill
    log_tail: str


def kill_mid_stage(spark: SparkSession, prepared: Prepared, stage: str, source: Path,
                   command: Callable[[Path, str], list[str]],
                   points: Sequence[tuple[str, Callable[[Path], bool]]]) -> Kill:
    """Run ``command`` on a copy of ``source`` and SIGKILL it at the first kill point that
    fires while it is still working; a kill that lands after the stage recorded its run (or a
    stage that ended first) is repeated on a fresh copy with the next, earlier, point."""
    misses = []
    for attempt, (point, fired) in enumerate(points):
        label = f"{stage}-kill-{attempt}"
        workdir = prepared.root / label
        shutil.copytree(source, workdir)
        run_id = f"crash-{label}"
        run = launch(command(workdir, run_id), prepared.root / "logs", label, prepared.cache)
        if not wait_for(run, lambda: fired(workdir)):
            misses.append(f"{point}: the stage ended first (rc {run.wait()})")
            continue
        assert run.alive(), "the command must still run when it is killed"
        seconds = time.monotonic() - run.started
        processes = run.kill()
        assert run.proc.returncode == -signal.SIGKILL
        if run_id in stage_run_ids(spark, workdir, stage):
            misses.append(f"{point}: killed after the stage recorded its run")
            continue
        tables = assert_tables_sound(spark, workdir)
        lines = [line for line in run.err().splitlines() if line.strip()]
        kill = Kill(workdir, run_id, point, round(seconds, 1), processes, tables, "\n".join(lines[-3:]))
        print(f"\n{stage}: killed at '{point}' after {kill.seconds}s ({processes} processes); rows {tables}")
        return kill
    pytest.fail(f"{stage}: no kill landed mid-run: {misses}")


def _parts(folder: Path) -> bool:
    """A task has written output under ``folder`` (Spark's attempt files included)."""
    return folder.is_dir() and any(p.name.startswith("part-") for p in folder.rglob("*"))


def _after(seconds: float) -> Callable[[Path], bool]:
    """The earliest kill point: ``seconds`` after the attempt started watching."""
    start: list[float] = []

    def fired(_: Path) -> bool:
        if not start:
            start.append(time.monotonic())
        return time.monotonic() - start[0] >= seconds

    return fired


def _committed_after_creation(table: str) -> Callable[[Path], bool]:
    return lambda w: (_delta_dir(w, table) / "_delta_log" / f"{1:020d}.json").is_file()


def _data_file(table: str) -> Callable[[Path], bool]:
    return lambda w: _delta_dir(w, table).is_dir() and any(_delta_dir(w, table).glob("*.parquet"))


@pytest.mark.slow
def test_sigkill_mid_expert_then_rerun_completes(spark: SparkSession, prepared: Prepared) -> None:
    """Killed right after expert_refinements' commit, before the run is recorded (earlier
    points if that one is missed: the staged rows being written, 2 s after launch)."""
    from refinex.spark.registry import run_stage

    def command(workdir: Path, run_id: str) -> list[str]:
        return ["expert", "--workdir", str(workdir), "--config", "test", *SET_FLAGS,
                "--set", "expert.docs_per_partition=1", "--run-id", run_id]

    committed = "expert_refinements committed"
    kill = kill_mid_stage(spark, prepared, "expert", prepared.ingested, command, [
        (committed, _committed_after_creation("expert_refinements")),
        ("expert tasks wrote staged rows", lambda w: _parts(w / "staging" / "expert")),
        ("2 s after launch", _after(2.0)),
    ])
    n = prepared.documents
    before = kill.tables.get("expert_refinements", 0)
    assert kill.tables["documents"] == n and before in (0, n)  # a write commits all its rows or none
    if kill.point == committed:
        assert before == n  # committed, yet killed before the run was recorded in stage_runs

    stats = run_stage("expert", spark, prepared.config, str(kill.workdir))
    assert (stats["processed"], stats["skipped_existing"], stats["ok"] + stats["failed"]) == (n - before, before,
                                                                                               n - before)
    assert assert_tables_sound(spark, kill.workdir)["expert_refinements"] == n
    assert assert_same_table(spark, kill.workdir, prepared.reference, "expert_refinements") == n


@pytest.mark.slow
def test_sigkill_mid_refine_then_rerun_completes(spark: SparkSession, prepared: Prepared) -> None:
    from refinex.spark.registry import run_stage

    def command(workdir: Path, run_id: str) -> list[str]:
        return ["refine", "--workdir", str(workdir), "--config", "test", *SET_FLAGS, "--model", MODEL, "--no-apply",
                "--limit", str(REFINED), "--set", "refine.docs_per_partition=1",
                "--set", f"refine.load_log={workdir / 'loads.txt'}", "--run-id", run_id]

    kill = kill_mid_stage(spark, prepared, "refine", prepared.trained, command, [
        ("a worker loaded the model", lambda w: (w / "loads.txt").is_file()),
        ("2 s after launch", _after(2.0)),
    ])
    n, version = REFINED, prepared.model_version
    mine = F.col("origin_version") == version
    programs = load(spark, kill.workdir, "programs").where(mine).count() if kill.tables.get("programs") else 0
    outputs = kill.tables.get("model_outputs", 0)
    # Each write commits all rows or none; model_outputs is written before programs.
    assert programs in (0, n) and outputs in (0, n) and programs <= outputs

    stats = run_stage("refine", spark, prepared.config, str(kill.workdir), model=MODEL, limit=REFINED)
    assert stats["origin_version"] == version and stats["processed"] == n - programs
    counts = assert_tables_sound(spark, kill.workdir)
    assert counts["model_outputs"] == n
    assert assert_same_table(spark, kill.workdir, prepared.reference, "programs", mine) == n
    assert assert_same_table(spark, kill.workdir, prepared.reference, "model_outputs") == n


@pytest.mark.slow
def test_sigkill_mid_apply_then_rerun_completes(spark: SparkSession, prepared: Prepared) -> None:
    """Killed while tasks write refined_documents' data files into the table (not committed
    yet; 2 s after launch if that is missed)."""
    from refinex.spark.registry import run_stage

    version = prepared.distilled_version

    def command(workdir: Path, run_id: str) -> list[str]:
        return ["apply", "--workdir", str(workdir), "--config", "test", *SET_FLAGS, "--origin", "distilled",
                "--origin-version", version, "--set", "spark.shuffle_partitions=16", "--run-id", run_id]

    kill = kill_mid_stage(spark, prepared, "apply", prepared.distilled, command, [
        ("refined_documents data files being written", _data_file("refined_documents")),
        ("2 s after launch", _after(2.0)),
    ])
    n = prepared.documents
    before = kill.tables.get("refined_documents", 0)
    assert before in (0, n)  # the write commits all its rows or none: the files written so far are not in it
    orphans = len(list(_delta_dir(kill.workdir, "refined_documents").glob("*.parquet")))
    print(f"apply: {before} rows committed, {orphans} data files on disk at the kill")

    stats = run_stage("apply", spark, prepared.config, str(kill.workdir), origin="distilled", origin_version=version)
    assert stats["documents"] == n
    counts = assert_tables_sound(spark, kill.workdir)
    assert counts["refined_documents"] == n
    assert assert_same_table(spark, kill.workdir, prepared.reference, "refined_documents") == n


# --- a Python worker killed mid-task ---------------------------------------------------------


def _workers(run: Launched) -> list[psutil.Process]:
    """Python workers: processes forked by a ``pyspark.daemon`` under the command."""
    found = []
    for process in run.tree():
        try:
            parent = process.parent()
            if parent is not None and "pyspark.daemon" in " ".join(parent.cmdline()):
                found.append(process)
        except psutil.NoSuchProcess:
            continue
    return found


LOST_TASK = re.compile(r"Lost task (\d+)\.(\d+) in stage [\d.]+ \(TID \d+\)")


@pytest.mark.slow
def test_python_worker_killed_mid_task_is_retried(spark: SparkSession, prepared: Prepared) -> None:
    workdir = prepared.root / "worker-kill"
    shutil.copytree(prepared.ingested, workdir)
    run_id = "worker-kill"
    run = launch(["expert", "--workdir", str(workdir), "--config", "test", *SET_FLAGS,
                  "--set", "expert.docs_per_partition=1", "--set", "spark.master=local[2,3]",
                  "--set", "spark.log_level=WARN", "--run-id", run_id], prepared.root / "logs", "worker-kill",
                 prepared.cache)
    assert wait_for(run, lambda: _parts(workdir / "staging" / "expert") and bool(_workers(run))), \
        "the expert ended before its tasks could be disturbed"
    killed: list[int] = []
    # Kill a busy worker (the one that used most CPU), until Spark reports a lost task.
    while run.alive() and not LOST_TASK.search(run.err()) and len(killed) < 2:
        workers = sorted(_workers(run), key=lambda p: sum(p.cpu_times()[:2]), reverse=True)
        if workers:
            workers[0].send_signal(signal.SIGKILL)
            killed.append(workers[0].pid)
        deadline = time.monotonic() + 15
        while run.alive() and not LOST_TASK.search(run.err()) and time.monotonic() < deadline:
            time.sleep(0.2)
    assert run.wait() == 0, run.err()[-3000:]
    err = run.err()
    lost = LOST_TASK.findall(err)
    assert killed and lost, f"no task was lost after killing workers {killed}:\n{err[-3000:]}"
    assert "Python worker exited unexpectedly" in err or "crashed" in err
    print(f"\nworker kill: killed {killed}; lost tasks (index, attempt): {lost}")

    n = prepared.documents
    stats = stage_stats(spark, workdir, "expert", run_id)
    # The staged output (before any MERGE deduplicates) has each document exactly once.
    assert (stats["processed"], stats["ok"] + stats["failed"]) == (n, n)
    assert assert_tables_sound(spark, workdir)["expert_refinements"] == n
    assert assert_same_table(spark, workdir, prepared.reference, "expert_refinements") == n


# --- two pipelines at once -------------------------------------------------------------------


ONE_LINE_ERROR = re.compile(r"^refinex: [A-Za-z_]\w*: \S.*$")


@pytest.mark.slow
def test_two_pipelines_at_once_on_one_workdir(spark: SparkSession, prepared: Prepared) -> None:
    workdir = prepared.root / "concurrent"
    runs = [
        launch(["pipeline", "--input", str(PAGES), "--workdir", str(workdir), "--skip-model", "--config", "test",
                *SET_FLAGS, "--set", "quality.enabled=false", "--set", "evaluate.enabled=false",
                "--run-id", f"concurrent-{i}"], prepared.root / "logs", f"pipeline-{i}", prepared.cache)
        for i in range(2)
    ]
    codes = [run.wait() for run in runs]
    for code, run in zip(codes, runs):
        lines = [line for line in run.err().splitlines() if line.strip()]
        if code != 0:
            assert code == 1 and lines and ONE_LINE_ERROR.match(lines[-1]), "\n".join(lines[-20:])
            assert not lines[-1].lstrip().startswith("at ")
    assert codes == [0, 0], "conflicting writes are retried: both pipelines finish"
    print(f"\npipelines: exit codes {codes}; "
          f"conflicts retried: {sum(run.err().count('a concurrent writer committed first') for run in runs)}")

    n, version = prepared.documents, prepared.distilled_version
    counts = assert_tables_sound(spark, workdir)
    assert counts["documents"] == counts["expert_refinements"] == n
    mine = (F.col("origin") == "distilled") & (F.col("origin_version") == version)
    for table in ("programs", "refined_documents", "edit_stats"):
        assert load(spark, workdir, table).where(mine).count() == n, table
    assert assert_same_table(spark, workdir, prepared.reference, "expert_refinements") == n
    assert assert_same_table(spark, workdir, prepared.reference, "refined_documents", mine) == n
    finished = {f"concurrent-{i}" for i, code in enumerate(codes) if code == 0}
    assert finished <= stage_run_ids(spark, workdir, "apply")


# --- concurrent writers in one process: the table writers themselves ---------------------------


def _program_rows(spark: SparkSession, ids: Sequence[int], program: str = "remove_lines(0, 0)") -> DataFrame:
    from datetime import datetime, timezone

    now = datetime(2025, 1, 1, tzinfo=timezone.utc)
    rows = [(f"doc-{i:03d}", "distilled", "v1", program, 1, 1, 0, 0, None, None, None, None, None, now) for i in ids]
    return spark.createDataFrame(rows, TABLES["programs"].schema)


def test_racing_creators_both_succeed(spark: SparkSession, workdir: str) -> None:
    """Two writers creating one table at once: one creates it, the other finds it made
    (Delta's ProtocolChangedException of the loser is not an error)."""
    import threading

    from delta.tables import DeltaTable

    from refinex.spark.tables import TableResolver, ensure_table, table_path

    # Not registered in the session catalog: that catalog is per process, the table is shared.
    resolver = TableResolver(workdir=workdir, register=False)
    barrier, errors = threading.Barrier(2), []

    def create() -> None:
        barrier.wait()
        try:
            ensure_table(spark, resolver, "programs")
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors, [str(e).splitlines()[0] for e in errors]
    history = DeltaTable.forPath(spark, table_path(workdir, "programs")).history().collect()
    assert [(r["version"], r["operation"]) for r in history] == [(0, "CREATE TABLE")]


def test_first_write_after_another_writer_is_a_merge(spark: SparkSession, workdir: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast first write into a table this process created (no MERGE) must not duplicate
    the keys another writer committed meanwhile: before it (it becomes a MERGE), or inside
    its window (its overwrite replaced them: they are merged back)."""
    from delta.tables import DeltaTable

    from refinex.spark import tables
    from refinex.spark.tables import ensure_table, merge_into, read_table, table_path

    def other_writer(where: str, ids: Sequence[int]) -> None:  # not refinex's writer: another process's
        target = DeltaTable.forPath(spark, table_path(where, "programs")).alias("t")
        target.merge(_program_rows(spark, ids).alias("s"), "t.doc_id = s.doc_id").whenNotMatchedInsertAll().execute()

    ensure_table(spark, workdir, "programs")  # created here: the next write may skip the MERGE
    other_writer(workdir, range(0, 6))
    assert merge_into(spark, workdir, "programs", _program_rows(spark, range(3, 9)))["inserted"] == 3
    assert read_table(spark, workdir, "programs").count() == 9

    second = str(Path(workdir) / "second")
    ensure_table(spark, second, "programs")
    other_writer(second, range(0, 6))
    # The other writer commits between this writer's check and its snapshot: the check is
    # made to miss it, as a commit landing in that window would.
    monkeypatch.setattr(tables, "table_version", lambda *args: 0)
    merge_into(spark, second, "programs", _program_rows(spark, range(3, 9)))
    frame = read_table(spark, second, "programs")
    assert frame.count() == frame.select("doc_id").distinct().count() == 9
    operations = [r["operation"] for r in DeltaTable.forPath(spark, table_path(second, "programs")).history()
                  .orderBy("version").collect()]
    assert operations == ["CREATE TABLE", "MERGE", "WRITE", "MERGE"]  # the overwrite, then the merge-back


def test_concurrent_merges_retry_and_keep_each_key_once(spark: SparkSession, workdir: str,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """Two MERGEs into one table at once: the one that commits second loses Delta's check
    (ConcurrentAppendException), runs again on the new snapshot, and every key is there once."""
    import logging
    import threading

    from refinex.spark.tables import merge_into, read_table

    merge_into(spark, workdir, "programs", _program_rows(spark, [999]))  # exists and written: MERGEs only

    @F.udf("string")
    def slowly(program: str) -> str:
        time.sleep(0.4)
        return program

    # One partition, one core: the other MERGE runs on the second core while this one reads.
    slow = _program_rows(spark, range(0, 12)).coalesce(1).withColumn("program", slowly("program"))
    errors: list[BaseException] = []

    def write(frame: DataFrame, delay: float) -> None:
        time.sleep(delay)
        try:
            merge_into(spark, workdir, "programs", frame)
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    caplog.set_level(logging.WARNING, logger="refinex.spark.tables")
    threads = [threading.Thread(target=write, args=(slow, 0.0)),
               threading.Thread(target=write, args=(_program_rows(spark, range(6, 18)), 1.0))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors, errors
    frame = read_table(spark, workdir, "programs")
    assert frame.count() == frame.select("doc_id").distinct().count() == 19
    assert any("a concurrent writer committed first" in r.getMessage() for r in caplog.records)


def test_an_unconverted_java_error_is_one_readable_line(spark: SparkSession) -> None:
    """The CLI names a Java exception PySpark leaves as a Py4JJavaError by its Java class (its
    own first line is only "An error occurred while calling ...")."""
    from py4j.protocol import Py4JJavaError

    from refinex.errors import one_line

    with pytest.raises(Py4JJavaError) as caught:
        spark.sparkContext._jvm.java.lang.Class.forName("no.such.Refiner")
    assert str(caught.value).startswith("An error occurred while calling")
    assert one_line(caught.value) == ("ClassNotFoundException", "no.such.Refiner")


def test_a_creation_caught_half_way_waits_for_the_other_writer(spark: SparkSession, workdir: str) -> None:
    """Another process is creating the table: its folder exists but holds no commit yet, so
    Delta refuses a CREATE there ("not empty and also not a Delta table"). The writer waits
    for the other's commit instead of failing (a run of the two-pipelines test hit this)."""
    import threading

    from delta.tables import DeltaTable

    from refinex.spark.tables import TableResolver, ensure_table, table_path

    resolver = TableResolver(workdir=workdir, register=False)
    location = Path(table_path(workdir, "programs"))
    location.mkdir(parents=True)
    (location / "part-being-written.tmp").write_text("another writer's file")

    def other_writer() -> None:  # lands its creation commit after this writer's CREATE failed
        time.sleep(6.0)
        (location / "part-being-written.tmp").unlink()
        DeltaTable.create(spark).location(str(location)).addColumns(TABLES["programs"].schema).execute()

    thread = threading.Thread(target=other_writer)
    thread.start()
    try:
        ensure_table(spark, resolver, "programs")
    finally:
        thread.join()
    history = DeltaTable.forPath(spark, str(location)).history().collect()
    assert [(r["version"], r["operation"]) for r in history] == [(0, "CREATE TABLE")]
