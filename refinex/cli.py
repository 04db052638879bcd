"""The ``refinex`` command: one sub-command per stage, ``pipeline``, ``export`` and ``setup``.

Every Spark command takes ``--workdir`` (tables go to ``<workdir>/delta/<table>``),
``--config`` (a profile name in ``conf/`` or a YAML path) and repeatable
``--set section.key=value`` overrides. Failures print one line and exit with status 1
(``REFINEX_DEBUG=1`` re-raises Spark errors with their traceback); ``REFINEX_LOG_LEVEL``
sets the log level of the stages' progress messages (default INFO, on stderr).
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional, TypeVar

import typer

from refinex.config import Config, ConfigError, load_config
from refinex.spark.jars import DeltaJarsError

app = typer.Typer(
    name="refinex",
    help="Deletion-only refinement of LLM pre-training corpora (RefineX) on Spark + Delta.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

T = TypeVar("T")

WorkdirOpt = Annotated[
    Optional[str],
    typer.Option(
        "--workdir", "-w", help="Run folder: tables in WORKDIR/delta/<table> (default: the profile's workdir)."
    ),
]
ConfigOpt = Annotated[
    Optional[str],
    typer.Option("--config", "-c", help="Profile name in conf/ (default, test, databricks, dataproc) or a YAML file."),
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a setting: section.key=value (repeatable), e.g. spark.master=local[4]."),
]
OriginOpt = Annotated[Optional[str], typer.Option("--origin", help="Program origin: distilled or model.")]
OriginVersionOpt = Annotated[
    Optional[str],
    typer.Option("--origin-version", help="Program version, e.g. trafilatura:<expert version>."),
]
InputOpt = Annotated[
    list[str],
    typer.Option("--input", "-i", help="Input JSONL(.gz)/Parquet file, folder or glob (repeatable)."),
]
LimitOpt = Annotated[Optional[int], typer.Option("--limit", min=0, help="Only the first N input records.")]
ExpertOpt = Annotated[Optional[str], typer.Option("--expert", help="Expert name (default: expert.name of the profile).")]


class CliError(Exception):
    """An error reported to the user as one line, with exit status 1."""


def _setup_logging() -> None:
    level = os.environ.get("REFINEX_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("py4j", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _config(config: Optional[str], overrides: Optional[list[str]]) -> Config:
    return load_config(config, overrides or [])


def _workdir(cfg: Config, workdir: Optional[str]) -> str:
    chosen = workdir or cfg.workdir
    if not chosen:
        raise CliError("no workdir: pass --workdir DIR (or set workdir in the profile)")
    if "://" in chosen and not chosen.startswith("file://"):
        return chosen.rstrip("/")
    path = Path(chosen[len("file://") :] if chosen.startswith("file://") else chosen).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def _session(cfg: Config, workdir: str) -> Any:
    from refinex.spark.session import get_spark

    return get_spark(cfg, workdir)


def _print_json(stats: dict[str, Any]) -> None:
    typer.echo(json.dumps(stats, indent=2, sort_keys=False, default=str))


def _run(action: Callable[[], T]) -> T:
    """Run a command body, turning expected failures into one-line errors (exit 1)."""
    _setup_logging()
    try:
        return action()
    except (CliError, ConfigError, DeltaJarsError, FileNotFoundError, ValueError, LookupError) as exc:
        typer.echo(f"refinex: error: {exc}", err=True)
        raise typer.Exit(1) from None
    except Exception as exc:  # noqa: BLE001 - Spark errors: one readable line, then exit 1
        name = type(exc).__name__
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else name
        if "JAVA_GATEWAY_EXITED" in str(exc):
            message += " (is Java 17 installed and JAVA_HOME set?)"
        typer.echo(f"refinex: {name}: {message}", err=True)
        if os.environ.get("REFINEX_DEBUG"):
            raise
        raise typer.Exit(1) from None


@app.command()
def pipeline(
    inputs: InputOpt,
    workdir: WorkdirOpt = None,
    limit: LimitOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Run ingest -> expert -> distill -> apply -> stats and print a summary."""

    def body() -> None:
        from refinex.spark.pipeline import format_summary, run_pipeline

        cfg = _config(config, set_)
        wd = _workdir(cfg, workdir)
        result = run_pipeline(_session(cfg, wd), cfg, wd, inputs, limit=limit)
        typer.echo(format_summary(result))

    _run(body)


@app.command()
def ingest(
    inputs: InputOpt,
    workdir: WorkdirOpt = None,
    limit: LimitOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Read input records into the documents table (rejects go to quarantine)."""

    def body() -> None:
        from refinex.spark.ingest import run_ingest

        cfg = _config(config, set_)
        wd = _workdir(cfg, workdir)
        stats = run_ingest(_session(cfg, wd), cfg, wd, inputs, limit=limit)
        _print_json(stats)
        typer.echo(f"read {stats['read']} = accepted {stats['accepted']} + quarantined {stats['quarantined']}")

    _run(body)


@app.command()
def expert(
    workdir: WorkdirOpt = None,
    expert: ExpertOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="Refine again documents that already have an ok refinement.")
    ] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Refine documents with the expert into expert_refinements."""

    def body() -> None:
        from refinex.spark.expert import run_expert

        cfg = _config(config, set_)
        wd = _workdir(cfg, workdir)
        _print_json(run_expert(_session(cfg, wd), cfg, wd, expert=expert, force=force))

    _run(body)


@app.command()
def distill(
    workdir: WorkdirOpt = None,
    expert: ExpertOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Distil the expert's refinements into deletion-only programs."""

    def body() -> None:
        from refinex.spark.distill import run_distill

        cfg = _config(config, set_)
        wd = _workdir(cfg, workdir)
        _print_json(run_distill(_session(cfg, wd), cfg, wd, expert=expert))

    _run(body)


@app.command()
def apply(
    workdir: WorkdirOpt = None,
    origin: OriginOpt = None,
    origin_version: OriginVersionOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Execute programs over every document into refined_documents."""

    def body() -> None:
        from refinex.spark.apply import run_apply

        cfg = _config(config, set_)
        wd = _workdir(cfg, workdir)
        _print_json(run_apply(_session(cfg, wd), cfg, wd, origin=origin, origin_version=origin_version))

    _run(body)


@app.command()
def stats(
    workdir: WorkdirOpt = None,
    origin: OriginOpt = None,
    origin_version: OriginVersionOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Write edit_stats (one row per document) and print the summary."""

    def body() -> None:
        from refinex.spark.stats import run_stats

        cfg = _config(config, set_)
        wd = _workdir(cfg, workdir)
        _print_json(run_stats(_session(cfg, wd), cfg, wd, origin=origin, origin_version=origin_version))

    _run(body)


@app.command()
def export(
    output: Annotated[str, typer.Option("--output", "-o", help="Output JSONL file (.gz compresses).")],
    workdir: WorkdirOpt = None,
    origin: OriginOpt = None,
    origin_version: OriginVersionOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Write one JSON line per document: doc_id, text, refined_text, status.

    The default origin is that of the most recent apply run.
    """

    def body() -> None:
        from refinex.spark.apply import run_export

        cfg = _config(config, set_)
        wd = _workdir(cfg, workdir)
        _print_json(run_export(_session(cfg, wd), cfg, wd, output, origin=origin, origin_version=origin_version))

    _run(body)


@app.command()
def setup(
    resolver: Annotated[
        Optional[str],
        typer.Option("--resolver", help="auto (Spark's Ivy, then mvn), spark or maven (default: spark.jar_resolver)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Resolve again even if the cache is complete.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Pre-warm the Delta jar cache and print where the jars are."""

    def body() -> None:
        from refinex.spark.jars import ensure_delta_jars

        cfg = _config(config, set_)
        chosen = resolver or cfg.spark.jar_resolver
        if chosen not in ("auto", "spark", "maven"):
            raise CliError(f"--resolver must be auto, spark or maven, got {chosen!r}")
        jars = ensure_delta_jars(chosen, spark_conf=cfg.spark.conf, force=force)
        typer.echo(f"Delta {jars.version} jars ({jars.resolver} resolver) in {jars.directory}:")
        for jar in jars.jars:
            typer.echo(f"  {jar}")

    _run(body)


def main() -> None:
    """Console-script entry point (``refinex=refinex.cli:main``)."""
    app()


if __name__ == "__main__":
    main()
