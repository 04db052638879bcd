"""The Databricks asset bundle, checked offline (no Spark session, no workspace).

``databricks.yml`` and every ``resources/*.yml`` are read with ``yaml.safe_load``; ``${var.X}``
is replaced by the variable's default (the dev target's value where it sets one), Databricks'
own ``{{...}}`` references stay as they are. Then every job must load with the bundle
package's ``Job.from_dict`` (which rejects unknown fields), every task's parameters must parse
with the CLI's own parser, and the task graph must be the registry's.
"""
from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any, Mapping

import pytest
import typer
import yaml
from databricks.bundles.jobs import Job

from refinex import bundle
from refinex.cli import app
from refinex.spark.registry import PIPELINE_STEPS, Step, dependencies, get_stage

ROOT = Path(__file__).resolve().parents[2]
_VAR = re.compile(r"\$\{var\.([A-Za-z0-9_-]+)\}")


def _load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), f"{path} is not a mapping"
    return data


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return _load(ROOT / "databricks.yml")


@pytest.fixture(scope="module")
def variables(config: dict[str, Any]) -> dict[str, Any]:
    """Each variable's default, then the dev target's overrides."""
    values = {name: spec["default"] for name, spec in config["variables"].items()}
    for name, value in ((config.get("targets", {}).get("dev") or {}).get("variables") or {}).items():
        values[name] = value["default"] if isinstance(value, Mapping) else value
    return values


def substitute(node: Any, values: Mapping[str, Any]) -> Any:
    """``${var.X}`` -> the value (typed when it is the whole string); unknown names fail."""
    if isinstance(node, dict):
        return {k: substitute(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [substitute(v, values) for v in node]
    if isinstance(node, str):
        whole = _VAR.fullmatch(node)
        if whole:
            return values[whole.group(1)]
        return _VAR.sub(lambda m: str(values[m.group(1)]), node)
    return node


def _resource_files() -> list[Path]:
    files = sorted((ROOT / "resources").glob("*.yml"))
    assert files, "no resources/*.yml"
    return files


@pytest.fixture(scope="module")
def jobs(variables: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every job of every resources/*.yml, variables substituted."""
    found: dict[str, dict[str, Any]] = {}
    for path in _resource_files():
        for key, spec in (_load(path).get("resources", {}).get("jobs") or {}).items():
            assert key not in found, f"job {key} defined twice"
            found[key] = substitute(spec, variables)
    return found


@pytest.fixture(scope="module")
def pipeline(jobs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return jobs[bundle.JOB_KEY]


@pytest.fixture(scope="module")
def serverless(jobs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return jobs[bundle.SERVERLESS_JOB_KEY]


_GROUP = typer.main.get_command(app)
UsageError = importlib.import_module(_GROUP.context_class.__module__.rsplit(".", 1)[0] + ".exceptions").UsageError
"""The parser's own usage error (typer vendors click; this is whichever click built the group)."""


def parse(args: list[str]) -> dict[str, Any]:
    """The CLI's own parsing of ``refinex ARGS`` (UsageError on a bad command line)."""
    parent = _GROUP.context_class(_GROUP, info_name="refinex")
    command = _GROUP.get_command(parent, args[0])
    assert command is not None, f"no refinex command {args[0]!r}"
    with command.make_context(args[0], list(args[1:]), parent=parent) as ctx:
        return dict(ctx.params)


# --- the bundle configuration ----------------------------------------------------------


def test_bundle_configuration(config: dict[str, Any]) -> None:
    assert config["bundle"]["name"] == "refinex"
    assert config["include"] == ["resources/*.yml"]
    for name, spec in config["variables"].items():
        assert spec.get("description"), f"variable {name} has no description"
        assert "default" in spec, f"variable {name} has no default"
    artifact = config["artifacts"]["whl"]
    assert artifact["type"] == "whl" and artifact["path"] == "."
    assert "wheel" in artifact["build"] and "dist" in artifact["build"]
    targets = config["targets"]
    assert targets["dev"]["default"] is True and targets["dev"]["mode"] == "development"
    assert targets["prod"]["mode"] == "production"


def test_every_referenced_variable_is_declared(config: dict[str, Any]) -> None:
    declared = set(config["variables"])
    for path in [ROOT / "databricks.yml", *_resource_files()]:
        used = set(_VAR.findall(path.read_text(encoding="utf-8")))
        assert used <= declared, f"{path.name} uses undeclared variables {sorted(used - declared)}"


def test_workdir_matches_the_databricks_profile(variables: dict[str, Any]) -> None:
    profile = _load(ROOT / "conf" / "databricks.yaml")
    assert variables["workdir"] == profile["workdir"]
    assert variables["input"].startswith("dbfs:/Volumes/") == variables["workdir"].startswith("dbfs:/Volumes/")


def test_committed_resources_are_generated() -> None:
    files = bundle.resource_files()
    assert set(files) == {bundle.RESOURCE_FILE, bundle.SERVERLESS_RESOURCE_FILE}
    for path, text in files.items():
        assert path.read_text(encoding="utf-8") == text, (
            f"resources/{path.name} is stale: run python -m refinex.bundle --write"
        )
        assert text.startswith(bundle.HEADER)


# --- the job ----------------------------------------------------------------------------


def test_jobs_load_with_the_bundle_models(jobs: dict[str, dict[str, Any]]) -> None:
    for key, spec in jobs.items():
        loaded = Job.from_dict(spec)  # type: ignore[arg-type]
        assert loaded.name == spec["name"], key
        assert len(loaded.tasks) == len(spec["tasks"])


def test_the_model_check_rejects_unknown_fields(pipeline: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="Unexpected field"):
        Job.from_dict({**pipeline, "no_such_field": 1})  # type: ignore[arg-type]
    task = {**pipeline["tasks"][0], "no_such_field": 1}
    with pytest.raises(ValueError, match="Unexpected field"):
        Job.from_dict({**pipeline, "tasks": [task]})  # type: ignore[arg-type]


def test_job_settings(pipeline: dict[str, Any]) -> None:
    assert pipeline["max_concurrent_runs"] == 1
    assert pipeline["timeout_seconds"] > 0
    assert pipeline["email_notifications"]["on_failure"] == []  # nobody is mailed unless set
    assert {p["name"] for p in pipeline["parameters"]} == {bundle.INPUT_PARAMETER}


def test_tasks_are_the_pipeline_steps_in_order(pipeline: dict[str, Any]) -> None:
    assert [t["task_key"] for t in pipeline["tasks"]] == [s.key for s in PIPELINE_STEPS]


def test_depends_on_is_the_registry_graph(pipeline: dict[str, Any]) -> None:
    graph = {t["task_key"]: tuple(sorted(d["task_key"] for d in t.get("depends_on", []))) for t in pipeline["tasks"]}
    assert graph == {k: tuple(sorted(v)) for k, v in dependencies().items()}


def test_task_parameters_parse_with_the_cli(pipeline: dict[str, Any], variables: dict[str, Any]) -> None:
    steps = {s.key: s for s in PIPELINE_STEPS}
    for task in pipeline["tasks"]:
        wheel = task["python_wheel_task"]
        assert (wheel["package_name"], wheel["entry_point"]) == ("refinex", "refinex")
        args = wheel["parameters"]
        step = steps[task["task_key"]]
        assert args[0] == step.declaration.command
        params = parse(args)
        assert params["config"] == "databricks"
        assert params["workdir"] == variables["workdir"]
        assert params["run_id"] == "{{job.run_id}}" + step.run_suffix
        catalog, schema = variables["catalog"], variables["schema"]
        assert params["set_"] == [f"tables.catalog={catalog}", f"tables.schema={schema}",
                                  f"model.registered_name={catalog}.{schema}.{variables['model_name']}"]
        for name, value in step.params.items():
            assert params[name] == value, (step.key, name)
        if step.stage == "ingest":
            assert params["input"] == ["{{job.parameters.input}}"]
        if step.stage == "refine":
            assert params["no_apply"] is True


def test_the_parse_check_rejects_unknown_flags(pipeline: dict[str, Any]) -> None:
    args = pipeline["tasks"][0]["python_wheel_task"]["parameters"]
    with pytest.raises(UsageError):
        parse([*args, "--no-such-flag", "x"])
    with pytest.raises(UsageError):
        parse(["ingest", "--config", "databricks"])  # --input is required


def test_gpu_stages_run_on_the_gpu_cluster(pipeline: dict[str, Any]) -> None:
    clusters = {c["job_cluster_key"]: c["new_cluster"] for c in pipeline["job_clusters"]}
    assert set(clusters) == {bundle.CPU_CLUSTER, bundle.GPU_CLUSTER}
    gpu_conf = clusters[bundle.GPU_CLUSTER]["spark_conf"]
    assert gpu_conf["spark.task.resource.gpu.amount"] == "1"
    assert gpu_conf["spark.executor.resource.gpu.amount"] == "1"
    assert "gpu" in clusters[bundle.GPU_CLUSTER]["spark_version"]
    gpu_steps = {s.key for s in PIPELINE_STEPS if s.declaration.resources == "gpu"}
    assert gpu_steps == {"train", "refine"}
    for task in pipeline["tasks"]:
        on_gpu = task["task_key"] in gpu_steps
        assert task["job_cluster_key"] == (bundle.GPU_CLUSTER if on_gpu else bundle.CPU_CLUSTER), task["task_key"]
        libraries = task["libraries"]
        assert {"whl": f"../dist/{bundle.wheel_filename()}"} in libraries
        assert ({"pypi": {"package": bundle.VLLM_REQUIREMENT}} in libraries) is on_gpu


def test_both_jobs_are_in_the_bundle(jobs: dict[str, dict[str, Any]]) -> None:
    assert set(jobs) == {bundle.JOB_KEY, bundle.SERVERLESS_JOB_KEY}


def test_serverless_job_runs_cpu_steps_in_its_environment(pipeline: dict[str, Any], serverless: dict[str, Any]) -> None:
    gpu_steps = {s.key for s in PIPELINE_STEPS if s.declaration.resources == "gpu"}
    assert [c["job_cluster_key"] for c in serverless["job_clusters"]] == [bundle.GPU_CLUSTER]
    (environment,) = serverless["environments"]
    assert environment["environment_key"] == bundle.SERVERLESS_ENVIRONMENT
    dependencies_ = environment["spec"]["dependencies"]
    assert dependencies_[0] == f"../dist/{bundle.wheel_filename()}"
    lock = (ROOT / "requirements.lock").read_text(encoding="utf-8").splitlines()
    for pin in dependencies_[1:]:
        assert pin in lock, f"{pin} is not the locked version"
    assert not any(d.split("==")[0] in ("pyspark", "delta-spark", "numpy", "pandas", "pyarrow") for d in dependencies_)
    classic = {t["task_key"]: t for t in pipeline["tasks"]}
    for task in serverless["tasks"]:
        twin = classic[task["task_key"]]
        assert task["python_wheel_task"] == twin["python_wheel_task"]
        assert task.get("depends_on") == twin.get("depends_on")
        if task["task_key"] in gpu_steps:
            assert task["job_cluster_key"] == bundle.GPU_CLUSTER and task["libraries"] == twin["libraries"]
            assert "environment_key" not in task
        else:
            assert task["environment_key"] == bundle.SERVERLESS_ENVIRONMENT, task["task_key"]
            assert "job_cluster_key" not in task and "libraries" not in task, task["task_key"]


def test_locked_pins_fail_on_an_unpinned_name(tmp_path: Path) -> None:
    lock = tmp_path / "requirements.lock"
    lock.write_text("# comment\ntorch==2.0.0 ; python_version >= '3.11'\n", encoding="utf-8")
    assert bundle.locked(["torch"], lock) == ["torch==2.0.0"]
    with pytest.raises(ValueError, match="not pinned"):
        bundle.locked(["no-such-package"], lock)


def test_vllm_requirement_is_the_setup_extra() -> None:
    assert f'"vllm": ["{bundle.VLLM_REQUIREMENT}"]' in (ROOT / "setup.py").read_text(encoding="utf-8")


# --- the shared argument builder ---------------------------------------------------------


def test_stage_arguments_of_switches_and_lists_parse() -> None:
    step = Step("custom", "expert", {"force": True, "expert": "consensus"})
    args = bundle.stage_arguments(step, "test", "/tmp/w", "r1", ["spark.master=local[1]"])
    params = parse(args)
    assert params["force"] is True and params["expert"] == "consensus"
    assert params["set_"] == ["spark.master=local[1]"] and params["run_id"] == "r1"
    ingest = Step("many", "ingest", {"input": ["a.jsonl", "b.jsonl"]})
    assert parse(bundle.stage_arguments(ingest, "test", "/tmp/w", "r1"))["input"] == ["a.jsonl", "b.jsonl"]


def test_stage_arguments_need_the_input_of_ingest() -> None:
    with pytest.raises(ValueError, match="--input"):
        bundle.stage_arguments(Step("ingest", "ingest"), "test", "/tmp/w", "r1")
    assert get_stage("ingest").param("input").required
