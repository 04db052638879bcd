"""scripts/dataproc_submit.py: the dry-run commands, checked offline (no gcloud, no Spark).

What follows ``--`` must parse with the CLI's own parser (the same builder as the Databricks
tasks: ``refinex.bundle.stage_arguments``); GPU steps go to the GPU cluster with one task
per GPU; Delta is ``delta_coordinate()``.
"""
from __future__ import annotations

import importlib.util
import shlex
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from refinex.bundle import stage_arguments, wheel_filename
from refinex.spark.jars import delta_coordinate
from refinex.spark.registry import PIPELINE_STEPS

from .test_bundle import UsageError, parse

ROOT = Path(__file__).resolve().parents[2]
RUN_ID = "20250101T000000Z-test"
BASE = ["--cluster", "cpu-c", "--gpu-cluster", "gpu-c", "--region", "europe-west4", "--workdir", "gs://b/work",
        "--input", "gs://b/raw/*.jsonl.gz", "--run-id", RUN_ID, "--dry-run"]


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dataproc_submit", ROOT / "scripts" / "dataproc_submit.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["dataproc_submit"] = module
    spec.loader.exec_module(module)
    return module


def _plan(script: ModuleType, *extra: str) -> list[Any]:
    return script.submissions(script.parser().parse_args([*BASE, *extra]))


def _properties(command: list[str]) -> dict[str, str]:
    value = next(a for a in command if a.startswith("--properties=")).split("=", 1)[1]
    sep = ","
    if value.startswith("^"):
        sep, value = value[1], value[3:]
    return dict(item.split("=", 1) for item in value.split(sep))


def _option(command: list[str], name: str) -> str:
    return next(a for a in command[: command.index("--")] if a.startswith(f"--{name}=")).split("=", 1)[1]


def test_every_step_in_order_and_its_arguments_parse(script: ModuleType) -> None:
    plan = _plan(script)
    assert [p.step.key for p in plan] == [s.key for s in PIPELINE_STEPS]
    for item in plan:
        assert item.command[:6] == ["gcloud", "dataproc", "jobs", "submit", "pyspark", "jobs/run_stage.py"]
        args = item.stage_args
        assert args == stage_arguments(item.step, "dataproc", "gs://b/work", RUN_ID, (), "gs://b/raw/*.jsonl.gz")
        params = parse(args)
        assert params["config"] == "dataproc" and params["workdir"] == "gs://b/work"
        assert params["run_id"] == RUN_ID + item.step.run_suffix
        for name, value in item.step.params.items():
            assert params[name] == value
        if item.step.stage == "ingest":
            assert params["input"] == ["gs://b/raw/*.jsonl.gz"]
        if item.step.stage == "refine":
            assert params["no_apply"] is True
        assert _option(item.command, "py-files") == "dist/" + wheel_filename().replace(".whl", ".zip")
        assert _option(item.command, "region") == "europe-west4"


def test_gpu_steps_go_to_the_gpu_cluster(script: ModuleType) -> None:
    for item in _plan(script):
        gpu = item.step.declaration.resources == "gpu"
        assert _option(item.command, "cluster") == ("gpu-c" if gpu else "cpu-c"), item.step.key
        props = _properties(item.command)
        for key in ("spark.task.resource.gpu.amount", "spark.executor.resource.gpu.amount"):
            assert (props.get(key) == "1") is gpu, (item.step.key, key)
    assert {p.step.key for p in _plan(script) if p.gpu} == {"train", "refine"}


def test_delta_package_is_the_one_coordinate(script: ModuleType) -> None:
    for item in _plan(script):
        props = _properties(item.command)
        assert props["spark.jars.packages"] == delta_coordinate()
        assert props["spark.sql.extensions"] == "io.delta.sql.DeltaSparkSessionExtension"
        assert props["spark.sql.catalog.spark_catalog"] == "org.apache.spark.sql.delta.catalog.DeltaCatalog"


def test_batches_mode_and_extras(script: ModuleType) -> None:
    plan = _plan(script, "--mode", "batches", "--step", "refine", "--step", "ingest", "--deps-bucket", "gs://b/deps",
                 "--set", "refine.batch_size=8", "--gpu-property", "spark.executor.instances=2",
                 "--property", "spark.jars.excludes=a:b,c:d")
    assert [p.step.key for p in plan] == ["ingest", "refine"]  # pipeline order, whatever the flag order
    for item in plan:
        assert item.command[:6] == ["gcloud", "dataproc", "batches", "submit", "pyspark", "jobs/run_stage.py"]
        assert not any(a.startswith("--cluster=") for a in item.command)
        assert _option(item.command, "deps-bucket") == "gs://b/deps"
        props = _properties(item.command)
        assert props["spark.jars.excludes"] == "a:b,c:d"  # a comma in a value: gcloud's ^#^ delimiter
        assert ("spark.executor.instances" in props) is item.gpu
        assert parse(item.stage_args)["set_"] == ["refine.batch_size=8"]


def test_no_py_files_and_container_image(script: ModuleType) -> None:
    plan = _plan(script, "--no-py-files", "--mode", "batches", "--container-image", "gcr.io/p/refinex:1")
    for item in plan:
        assert not any(a.startswith("--py-files") for a in item.command)
        assert _option(item.command, "container-image") == "gcr.io/p/refinex:1"
    with pytest.raises(SystemExit, match="batches"):
        script.main([*BASE, "--container-image", "gcr.io/p/refinex:1"])


def test_dry_run_prints_the_commands(script: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    assert script.main([*BASE, "--step", "apply_model"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert len(lines) == 1
    command = shlex.split(lines[0])
    assert parse(command[command.index("--") + 1 :])["origin"] == "model"


def test_bad_requests_are_refused(script: ModuleType) -> None:
    with pytest.raises(SystemExit, match="--gpu-cluster"):
        script.submissions(script.parser().parse_args(["--cluster", "c", "--region", "r", "--workdir", "gs://b/w",
                                                       "--run-id", "r1", "--step", "train"]))
    with pytest.raises(SystemExit, match="--input"):
        script.submissions(script.parser().parse_args(["--cluster", "c", "--region", "r", "--workdir", "gs://b/w",
                                                       "--run-id", "r1", "--step", "ingest"]))
    with pytest.raises(SystemExit, match="unknown step"):
        _plan(script, "--step", "no_such_step")
    item = _plan(script, "--step", "stats")[0]
    with pytest.raises(UsageError):
        parse([*item.stage_args, "--no-such-flag"])


def test_runs_in_order_and_stops_at_the_first_failure(script: ModuleType, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "calls.log"
    fake = tmp_path / "bin" / "gcloud"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$*" >> {log}\ncase "$*" in *"-- distill "*) exit 3;; esac\nexit 0\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:/usr/bin:/bin")
    wheel = tmp_path / wheel_filename()
    wheel.write_bytes(b"PK\x05\x06" + b"\x00" * 18)  # an empty zip archive
    argv = [a for a in BASE if a != "--dry-run"] + ["--wheel", str(wheel)]
    assert script.main(argv) == 3
    calls = log.read_text().splitlines()
    assert [c.split(" -- ")[1].split()[0] for c in calls] == ["ingest", "expert", "distill"]
    assert (tmp_path / wheel_filename().replace(".whl", ".zip")).is_file()
