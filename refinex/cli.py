"""The ``refinex`` command: one sub-command per stage, ``pipeline``, ``export`` and ``setup``.

Every Spark command takes ``--workdir`` (tables go to ``<workdir>/delta/<table>``),
``--config`` (a profile name in ``conf/`` or a YAML path) and repeatable
``--set section.key=value`` overrides. Failures print one line and exit with status 1
(``REFINEX_DEBUG=1`` re-raises Spark errors with their traceback); ``REFINEX_LOG_LEVEL``
sets the log level of the stages' progress messages (default INFO, on stderr).
"""
from __future__ import annotations

import importlib
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
BaseOpt = Annotated[
    Optional[str],
    typer.Option("--base", help="Base of the refine model: tiny, smollm2-135m, qwen3-0.6b-base or a checkpoint "
                 "folder (default: model.base of the profile)."),
]
ExpertNameOpt = Annotated[
    Optional[str],
    typer.Option(
        "--expert",
        help="Expert that refines documents: trafilatura, llm, consensus or any registered one "
        "(default: expert.name of the profile).",
    ),
]
ExpertBaseUrlOpt = Annotated[
    Optional[str],
    typer.Option(
        "--expert-base-url",
        help="OpenAI-compatible endpoint of the llm expert (or of consensus' llm member, which it enables), "
        "e.g. http://127.0.0.1:8000/v1. The API key is read from $REFINEX_EXPERT_API_KEY (Bearer).",
    ),
]
ExpertModelOpt = Annotated[Optional[str], typer.Option("--expert-model", help="Model name sent to that endpoint.")]
ExpertConcurrencyOpt = Annotated[
    Optional[int],
    typer.Option("--expert-max-concurrency", min=1, help="LLM requests in flight per Spark task."),
]


class CliError(Exception):
    """An error reported to the user as one line, with exit status 1."""


def _setup_logging() -> None:
    level = os.environ.get("REFINEX_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("py4j", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _config(config: Optional[str], overrides: Optional[list[str]]) -> Config:
    return load_config(config, overrides or [])


def _expert_config(
    config: Optional[str],
    overrides: Optional[list[str]],
    name: Optional[str],
    base_url: Optional[str],
    model: Optional[str],
    max_concurrency: Optional[int],
) -> Config:
    """The profile, then the --expert* choices (``refinex.spark.expert.configure_expert``),
    then the --set overrides, so ``--set expert.options.KEY=VALUE`` tunes the chosen expert."""
    from refinex.config import parse_override
    from refinex.spark.expert import configure_expert

    cfg = configure_expert(load_config(config), name, base_url=base_url, model=model, max_concurrency=max_concurrency)
    return cfg.with_overrides(dict(parse_override(o) for o in overrides)) if overrides else cfg


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


def _run_stage(target: str, config: Optional[str], set_: Optional[list[str]], workdir: Optional[str],
               *args: Any, **kwargs: Any) -> None:
    """Run the stage ``"module:function"`` as ``function(spark, cfg, workdir, *args, **kwargs)``
    and print its stats; the module is imported only now (the CLI starts without Spark)."""

    def body() -> None:
        module, _, name = target.partition(":")
        stage = getattr(importlib.import_module(module), name)
        cfg = _config(config, set_)
        wd = _workdir(cfg, workdir)
        _print_json(stage(_session(cfg, wd), cfg, wd, *args, **kwargs))

    _run(body)


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
    expert: ExpertNameOpt = None,
    expert_base_url: ExpertBaseUrlOpt = None,
    expert_model: ExpertModelOpt = None,
    expert_max_concurrency: ExpertConcurrencyOpt = None,
    base: BaseOpt = None,
    model: Annotated[
        Optional[str],
        typer.Option("--model", help="Refine with this model instead of training one: models:/NAME@ALIAS, "
                     "models:/NAME/N or a checkpoint folder."),
    ] = None,
    skip_train: Annotated[
        bool, typer.Option("--skip-train", help="Do not train: refine with the champion (models:/refinex-refiner@champion).")
    ] = False,
    skip_model: Annotated[
        bool, typer.Option("--skip-model", help="Stop after the distilled programs (no sft_pairs, train, refine).")
    ] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Run the whole flow and print both program origins side by side.

    ingest -> expert -> distill -> apply -> stats (the distilled oracle), then sft_pairs ->
    train -> refine -> apply -> stats with the refine model. The default trains model.base
    (tiny) on this run's distilled programs; --model or --skip-train reuse a model.
    """

    def body() -> None:
        from refinex.spark.pipeline import format_summary, run_pipeline

        cfg = _expert_config(config, set_, expert, expert_base_url, expert_model, expert_max_concurrency)
        wd = _workdir(cfg, workdir)
        result = run_pipeline(
            _session(cfg, wd), cfg, wd, inputs, limit=limit, base=base, model_uri=model,
            train=not skip_train, refine=not skip_model,
        )
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
    expert: ExpertNameOpt = None,
    expert_base_url: ExpertBaseUrlOpt = None,
    expert_model: ExpertModelOpt = None,
    expert_max_concurrency: ExpertConcurrencyOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="Refine again documents that already have an ok refinement.")
    ] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Refine documents with the expert into expert_refinements (LLM responses cached in expert_cache)."""

    def body() -> None:
        from refinex.spark.expert import run_expert

        cfg = _expert_config(config, set_, expert, expert_base_url, expert_model, expert_max_concurrency)
        wd = _workdir(cfg, workdir)
        _print_json(run_expert(_session(cfg, wd), cfg, wd, force=force))

    _run(body)


@app.command()
def distill(
    workdir: WorkdirOpt = None,
    expert: ExpertOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Distil the expert's refinements into deletion-only programs."""

    _run_stage("refinex.spark.distill:run_distill", config, set_, workdir, expert=expert)


@app.command()
def apply(
    workdir: WorkdirOpt = None,
    origin: OriginOpt = None,
    origin_version: OriginVersionOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Execute programs over every document into refined_documents."""

    _run_stage("refinex.spark.apply:run_apply", config, set_, workdir, origin=origin, origin_version=origin_version)


@app.command()
def stats(
    workdir: WorkdirOpt = None,
    origin: OriginOpt = None,
    origin_version: OriginVersionOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Write edit_stats (one row per document) and print the summary."""

    _run_stage("refinex.spark.stats:run_stats", config, set_, workdir, origin=origin, origin_version=origin_version)


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

    _run_stage("refinex.spark.apply:run_export", config, set_, workdir, output, origin=origin,
               origin_version=origin_version)


@app.command("sft-pairs")
def sft_pairs(
    workdir: WorkdirOpt = None,
    base: BaseOpt = None,
    origin_version: Annotated[
        Optional[str],
        typer.Option("--origin-version", help="Distilled program version (default: the newest of the expert)."),
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Rebuild sft_pairs: one (prompt, target) pair per chunk of every distilled program."""

    _run_stage("refinex.spark.sft:run_sft_pairs", config, set_, workdir, origin_version=origin_version, base=base)


@app.command()
def train(
    workdir: WorkdirOpt = None,
    base: BaseOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="Train even if a registered version has the same pairs and settings.")
    ] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Fine-tune the refine model on sft_pairs, log it to MLflow and register it.

    Settings: the base's defaults (conf/model/<base>.yaml) and the train section
    (--set train.max_steps=200). Tracking: model.tracking_uri, else $MLFLOW_TRACKING_URI,
    else sqlite:///WORKDIR/mlflow.db. The first registered version becomes @champion.
    """

    def body() -> None:
        from refinex.spark.train import run_train

        cfg = _config(config, set_)
        wd = _workdir(cfg, workdir)
        stats = run_train(_session(cfg, wd), cfg, wd, base=base, force=force)
        _print_json(stats)
        typer.echo(f"model: {stats['model_uri']} (champion: version {stats['champion_version']})")

    _run(body)


@app.command()
def refine(
    model: Annotated[
        str,
        typer.Option("--model", "-m", help="models:/refinex-refiner@champion, models:/refinex-refiner/N, "
                     "any MLflow model URI or a checkpoint folder."),
    ],
    workdir: WorkdirOpt = None,
    backend: Annotated[
        Optional[str], typer.Option("--backend", help="transformers, vllm or openai (default: refine.backend).")
    ] = None,
    unconstrained: Annotated[
        bool, typer.Option("--unconstrained", help="Plain decoding instead of grammar-constrained decoding.")
    ] = False,
    split: Annotated[
        Optional[str], typer.Option("--split", help="Only the documents of this SFT split: train or validation.")
    ] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Only the first N documents (by doc_id).")] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Refine again documents that already have a program of this model.")
    ] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Refine documents with the model (programs of origin model), then apply and stats."""

    def body() -> None:
        from refinex.spark.apply import run_apply
        from refinex.spark.refine import run_refine
        from refinex.spark.stats import run_stats

        cfg = _config(config, set_)
        wd = _workdir(cfg, workdir)
        spark = _session(cfg, wd)
        result = run_refine(
            spark, cfg, wd, model, backend=backend, constrained=False if unconstrained else None,
            split=split, limit=limit, force=force,
        )
        origin = {"origin": result["origin"], "origin_version": result["origin_version"]}
        applied = run_apply(spark, cfg, wd, run_id=result["run_id"], **origin)
        _print_json({"refine": result, "apply": applied, "stats": run_stats(spark, cfg, wd, run_id=result["run_id"], **origin)})

    _run(body)


@app.command()
def promote(
    version: Annotated[int, typer.Option("--version", min=1, help="Registered version to promote.")],
    workdir: WorkdirOpt = None,
    alias: Annotated[
        Optional[str], typer.Option("--alias", help="Alias to move (default: model.champion_alias, champion).")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Point models:/refinex-refiner@champion at version N of the registry."""

    def body() -> None:
        from refinex.spark.train import promote as promote_version

        cfg = _config(config, set_)
        wd = _workdir(cfg, workdir)
        result = promote_version(cfg, wd, version, alias)
        _print_json(result)
        typer.echo(f"{result['model_uri']} -> version {result['version']} (was {result['previous'] or 'unset'})")

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
