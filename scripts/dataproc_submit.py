#!/usr/bin/env python3
"""Submit the pipeline's steps to Dataproc: one PySpark job (or serverless batch) per step.

The steps are the registry's ``PIPELINE_STEPS`` (or those named with ``--step``), submitted
in order, each waiting for the previous one (``gcloud ... submit`` waits for the job); the
first failure stops the run. Every step runs ``jobs/run_stage.py`` (the ``refinex`` CLI) with
the command line of :func:`refinex.bundle.stage_arguments`, the same builder as the Databricks
bundle's tasks, so both run the same arguments. Delta comes with ``spark.jars.packages``
(``refinex.spark.jars.delta_coordinate()``); stages declared ``resources="gpu"`` (train,
refine) go to ``--gpu-cluster`` with one Spark task per GPU.

The wheel goes along with ``--py-files``, under a ``.zip`` name: Dataproc takes .py, .zip
and .egg there, and PySpark puts only .zip/.egg/.jar files on its workers' path (a wheel is a
zip archive, so the copy imports as it is). ``--no-py-files`` ships nothing, for clusters
that have refinex pip-installed (an initialization action or a custom image): its
dependencies have to be installed there anyway, and the profiles (``conf/``) are read as
files, which an import from a zip does not give unless ``REFINEX_CONF_DIR`` names a copy.

    python -m pip wheel --no-deps --wheel-dir dist .
    python scripts/dataproc_submit.py --cluster refinex --gpu-cluster refinex-gpu \\
        --region europe-west4 --input 'gs://bucket/raw/*.jsonl.gz' [--dry-run]
    python scripts/dataproc_submit.py --mode batches --region europe-west4 \\
        --deps-bucket gs://bucket/deps --step ingest --input gs://bucket/raw/part-0.jsonl.gz

``--dry-run`` (the default when gcloud is not on PATH) prints the commands instead.
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from refinex.bundle import stage_arguments, wheel_filename  # noqa: E402
from refinex.spark.jars import delta_coordinate  # noqa: E402
from refinex.spark.registry import PIPELINE_STEPS, Step  # noqa: E402

PROFILE = "dataproc"
ENTRY = "jobs/run_stage.py"
MODES = ("jobs", "batches")
DELTA_SQL = {
    "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
    "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
}
GPU_PROPERTIES = {"spark.task.resource.gpu.amount": "1", "spark.executor.resource.gpu.amount": "1"}


@dataclass(frozen=True)
class Submission:
    """One step's gcloud command line."""

    step: Step
    command: list[str]

    @property
    def gpu(self) -> bool:
        return self.step.declaration.resources == "gpu"

    @property
    def stage_args(self) -> list[str]:
        """The ``refinex`` arguments (what follows ``--``)."""
        return self.command[self.command.index("--") + 1 :]


def wheel_path(args: argparse.Namespace) -> str:
    """The wheel, relative to the repository root unless given absolute."""
    return args.wheel or f"dist/{wheel_filename()}"


def py_files_archive(wheel: str) -> str:
    """The copy of the wheel that ``--py-files`` ships: the same path ending in ``.zip``."""
    return str(Path(wheel).with_suffix(".zip"))


def spark_properties(gpu: bool, extra: Sequence[str] = (), gpu_extra: Sequence[str] = ()) -> dict[str, str]:
    """Delta (package, SQL extension, catalog), one task per GPU for gpu steps, then the extras."""
    props = {"spark.jars.packages": delta_coordinate(), **DELTA_SQL}
    if gpu:
        props.update(GPU_PROPERTIES)
    for item in [*extra, *(gpu_extra if gpu else ())]:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"dataproc_submit: a property is KEY=VALUE, got {item!r}")
        props[key] = value
    return props


def format_properties(props: dict[str, str]) -> str:
    """gcloud's ``--properties`` value: ``k=v,k=v``, or ``^#^k=v#k=v`` when a value has a comma."""
    if any("," in v for v in props.values()):
        return "^#^" + "#".join(f"{k}={v}" for k, v in props.items())
    return ",".join(f"{k}={v}" for k, v in props.items())


def _select(keys: Sequence[str]) -> list[Step]:
    known = {s.key: s for s in PIPELINE_STEPS}
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise SystemExit(f"dataproc_submit: unknown step(s) {', '.join(unknown)} (steps: {', '.join(known)})")
    return [s for s in PIPELINE_STEPS if not keys or s.key in keys]


def submissions(args: argparse.Namespace) -> list[Submission]:
    """The gcloud command of every selected step, in pipeline order."""
    out: list[Submission] = []
    archive = None if args.no_py_files else py_files_archive(wheel_path(args))
    for step in _select(args.step or ()):
        gpu = step.declaration.resources == "gpu"
        if args.mode == "jobs":
            cluster = args.gpu_cluster if gpu else args.cluster
            if not cluster:
                raise SystemExit(f"dataproc_submit: step {step.key} needs {'--gpu-cluster' if gpu else '--cluster'}")
            command = ["gcloud", "dataproc", "jobs", "submit", "pyspark", ENTRY, f"--cluster={cluster}"]
        else:
            command = ["gcloud", "dataproc", "batches", "submit", "pyspark", ENTRY]
            if args.batch_version:
                command.append(f"--version={args.batch_version}")
            if args.deps_bucket:
                command.append(f"--deps-bucket={args.deps_bucket}")
        command.append(f"--region={args.region}")
        if args.project:
            command.append(f"--project={args.project}")
        if args.container_image:
            command.append(f"--container-image={args.container_image}")
        if archive:
            command.append(f"--py-files={archive}")
        command.append(f"--properties={format_properties(spark_properties(gpu, args.property, args.gpu_property))}")
        try:
            stage = stage_arguments(step, args.profile, args.workdir, args.run_id, args.set or (), args.input)
        except ValueError as exc:
            raise SystemExit(f"dataproc_submit: {exc}") from None
        out.append(Submission(step, [*command, "--", *stage]))
    return out


def _default_workdir(profile: str) -> Optional[str]:
    from refinex.config import load_config

    return load_config(profile).workdir


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=MODES, default="jobs",
                   help="jobs: gcloud dataproc jobs submit pyspark on clusters; batches: serverless (default: jobs)")
    p.add_argument("--cluster", help="cluster of the CPU steps (jobs mode)")
    p.add_argument("--gpu-cluster", help="cluster of the GPU steps, train and refine (jobs mode)")
    p.add_argument("--region", required=True)
    p.add_argument("--project", help="Google Cloud project (default: gcloud's)")
    p.add_argument("--workdir", help="run folder, gs://... (default: the profile's workdir)")
    p.add_argument("--input", help="corpus for ingest (gs://..., globs allowed)")
    p.add_argument("--run-id", help="one run id for all steps (default: a new one)")
    p.add_argument("--step", action="append", metavar="KEY",
                   help=f"only this step (repeatable; default all: {', '.join(s.key for s in PIPELINE_STEPS)})")
    p.add_argument("--profile", default=PROFILE, help=f"refinex profile (default: {PROFILE})")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="refinex override, every step")
    p.add_argument("--property", action="append", default=[], metavar="KEY=VALUE", help="Spark property, every step")
    p.add_argument("--gpu-property", action="append", default=[], metavar="KEY=VALUE",
                   help="Spark property of the GPU steps only (e.g. the serverless accelerator settings)")
    p.add_argument("--wheel", help=f"the wheel (default: dist/{wheel_filename()})")
    p.add_argument("--no-py-files", action="store_true",
                   help="ship no wheel: refinex is pip-installed on the cluster or in the container image")
    p.add_argument("--container-image", help="custom container image with refinex's dependencies (batches mode)")
    p.add_argument("--batch-version", help="serverless runtime version (batches mode; a Spark 4 runtime)")
    p.add_argument("--deps-bucket", help="bucket gcloud stages local files in (batches mode)")
    p.add_argument("--dry-run", action="store_true", help="print the commands (default when gcloud is absent)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    if args.workdir is None:
        args.workdir = _default_workdir(args.profile)
    if not args.workdir:
        raise SystemExit("dataproc_submit: no workdir: pass --workdir gs://...")
    if args.run_id is None:
        from refinex.spark.tables import new_run_id

        args.run_id = new_run_id()
    plan = submissions(args)
    if args.container_image and args.mode != "batches":
        raise SystemExit("dataproc_submit: --container-image is for --mode batches")
    wheel = wheel_path(args)
    dry = args.dry_run or shutil.which("gcloud") is None
    if dry:
        if not args.dry_run:
            print("# gcloud is not on PATH: printing the commands (dry run)", file=sys.stderr)
        if not args.no_py_files:
            print(f"# ship the wheel as a zip first: {shlex.join(['cp', wheel, py_files_archive(wheel)])}")
        for item in plan:
            print(f"# {item.step.key} ({item.step.stage}, {'gpu' if item.gpu else 'cpu'})")
            print(shlex.join(item.command))
        return 0
    if not args.no_py_files:
        built = ROOT / wheel
        if not built.is_file():
            raise SystemExit(f"dataproc_submit: {built} is missing: build it with "
                             "python -m pip wheel --no-deps --wheel-dir dist .")
        shutil.copyfile(built, ROOT / py_files_archive(wheel))
    for item in plan:
        print(f"dataproc_submit: {item.step.key}: {shlex.join(item.command)}", file=sys.stderr, flush=True)
        code = subprocess.run(item.command, cwd=ROOT, check=False).returncode
        if code != 0:
            print(f"dataproc_submit: step {item.step.key} failed (exit {code}); later steps not submitted",
                  file=sys.stderr)
            return code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
