"""The ``refinex`` command: one sub-command per registered stage, ``pipeline``, ``sql``, ``setup``.

The stage commands are built from the stage declarations (``refinex.spark.registry.STAGES``):
their flags are the stages' parameters, so the CLI, ``jobs/`` and the bundle's tasks take
the same flags. Every Spark command takes ``--workdir`` (path tables go to
``<workdir>/delta/<table>``), ``--config`` (a profile name in ``conf/`` or a YAML path;
default ``$REFINEX_CONFIG``, else ``default``), repeatable ``--set section.key=value``
overrides and ``--run-id`` (one id for the tasks of one job run). Failures print one line and exit with status 1
(``REFINEX_DEBUG=1`` re-raises Spark errors with their traceback); ``REFINEX_LOG_LEVEL``
sets the log level of the stages' progress messages (default INFO, on stderr).
"""
from __future__ import annotations

import inspect
import json
import logging
import os
import sys
from typing import TYPE_CHECKING, Annotated, Any, Callable, Optional, Sequence, TypeVar

import typer

from refinex.config import Config, ConfigError, load_config
from refinex.errors import StageFailed, one_line
from refinex.spark.jars import DeltaJarsError

if TYPE_CHECKING:
    from refinex.spark.stage import Param, Stage

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
    typer.Option("--config", "-c", help="Profile name in conf/ (default, test, gpu, databricks, dataproc) or a "
                 "YAML file (default: $REFINEX_CONFIG, else default)."),
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a setting: section.key=value (repeatable), e.g. spark.master=local[4]."),
]
RunIdOpt = Annotated[
    Optional[str],
    typer.Option("--run-id", help="Run id recorded in stage_runs (default: a new one); the bundle passes the job run's."),
]

_TYPES: dict[str, Any] = {"str": Optional[str], "int": Optional[int], "float": Optional[float], "bool": bool,
                          "list": Optional[list[str]]}
_COMMON = ("workdir", "config", "set_", "run_id")


def _typer_parameter(param: "Param") -> inspect.Parameter:
    """A stage parameter as a typer option (default-value style)."""
    names = [param.flag, *([param.short] if param.short else [])]
    default: Any = ... if param.required else (param.default if param.kind != "list" else None)
    extra: dict[str, Any] = {}
    if param.minimum is not None:
        extra["min"] = param.minimum
    option = typer.Option(default, *names, help=param.help, **extra)
    return inspect.Parameter(param.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                             annotation=list[str] if param.kind == "list" and param.required else _TYPES[param.kind])


def _command(name: str, help_text: str, params: Sequence["Param"], body: Callable[..., None],
             extra: Sequence[tuple[str, Any, Any]] = ()) -> None:
    """Register ``name`` with the stage parameters, ``extra`` (name, annotation, typer
    option) ones and the common options; ``body(values, workdir, config, set_, run_id)``."""
    common = {"workdir": WorkdirOpt, "config": ConfigOpt, "set_": SetOpt, "run_id": RunIdOpt}
    parameters = [_typer_parameter(p) for p in params]
    for extra_name, annotation, option in extra:
        parameters.append(inspect.Parameter(extra_name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                            annotation=annotation))
    for common_name, annotation in common.items():
        parameters.append(inspect.Parameter(common_name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                            annotation=annotation))

    def command(**values: Any) -> None:
        options = {k: values.pop(k) for k in _COMMON}
        body(values, **options)

    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    command.__doc__ = help_text
    command.__name__ = name.replace("-", "_")
    app.command(name)(command)


class CliError(Exception):
    """An error reported to the user as one line, with exit status 1."""


def _setup_logging() -> None:
    level = os.environ.get("REFINEX_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("py4j", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _config(config: Optional[str], overrides: Optional[list[str]], stage: Optional["Stage"] = None,
            configuring: Optional[dict[str, Any]] = None) -> Config:
    """The profile, then the stage's configuring flags (``--expert*``), then the --set
    overrides, so ``--set expert.options.KEY=VALUE`` tunes the chosen expert."""
    from refinex.config import parse_override

    cfg = load_config(config)
    if stage is not None and configuring:
        cfg = stage.configured(cfg, configuring)
    return cfg.with_overrides(dict(parse_override(o) for o in overrides)) if overrides else cfg


def _workdir(cfg: Config, workdir: Optional[str]) -> str:
    """The workdir: local ones are created and made absolute, remote ones kept as given."""
    from refinex.locations import is_local, local_path

    chosen = workdir or cfg.workdir
    if not chosen:
        raise CliError("no workdir: pass --workdir DIR (or set workdir in the profile)")
    if not is_local(chosen):
        return chosen.rstrip("/")
    path = local_path(chosen)
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def _require_workdir(cfg: Config, workdir: Optional[str]) -> None:
    """A stage that reads tables needs an existing local workdir: a missing one is a typo,
    not a place to create (nor to create an empty MLflow store in)."""
    from refinex.locations import is_local, local_path

    chosen = workdir or cfg.workdir
    if chosen and is_local(chosen) and not local_path(chosen).is_dir():
        raise CliError(f"no workdir at {local_path(chosen)}: run `refinex ingest` or `refinex pipeline` there first, "
                       "or check the path")


def _context(cfg: Config, workdir: Optional[str], run_id: Optional[str]) -> Any:
    from refinex.spark.session import get_spark
    from refinex.spark.stage import context

    wd = _workdir(cfg, workdir)
    return context(get_spark(cfg, wd), cfg, wd, run_id)


def _print_json(stats: dict[str, Any]) -> None:
    typer.echo(json.dumps(stats, indent=2, sort_keys=False, default=str))


def _split(stage: "Stage", values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(transform values, configuring values) of a command's parsed flags."""
    configuring = {p.name: values.pop(p.name) for p in stage.params if p.configures and p.name in values}
    return values, configuring


def _stage_body(stage: "Stage") -> Callable[..., None]:
    def body(values: dict[str, Any], workdir: Optional[str], config: Optional[str], set_: Optional[list[str]],
             run_id: Optional[str]) -> None:
        def action() -> None:
            from refinex.spark.stage import execute

            kwargs, configuring = _split(stage, dict(values))
            cfg = _config(config, set_, stage, configuring)
            if stage.reads:
                _require_workdir(cfg, workdir)
            if stage.check is not None:
                stage.check(kwargs)
            ctx = _context(cfg, workdir, run_id)
            stats = execute(stage, ctx, **kwargs)
            _print_json(stats)
            if stage.describe is not None:
                typer.echo(f"{stage.name}: {stage.describe(stats)}")

        _run(action)

    return body


def _refine_body(values: dict[str, Any], workdir: Optional[str], config: Optional[str], set_: Optional[list[str]],
                 run_id: Optional[str]) -> None:
    """``refine``: the model chain (refine -> apply -> stats), or the refine stage alone."""

    def action() -> None:
        from refinex.spark.registry import MODEL_CHAIN, REGISTERED_MODEL, get_stage, run_steps
        from refinex.spark.stage import execute
        from refinex.spark.tables import TABLES

        only = values.pop("no_apply")
        cfg = _config(config, set_)
        _require_workdir(cfg, workdir)
        ctx = _context(cfg, workdir, run_id)
        if only:
            _print_json(execute(get_stage("refine"), ctx, **values))
            return
        # The chain runs on a finished workdir: every table and the registry exist before it.
        results = run_steps(ctx, MODEL_CHAIN, {"refine": values}, external=(*TABLES, REGISTERED_MODEL))
        _print_json({"refine": results["refine"], "apply": results["apply_model"], "stats": results["stats_model"]})

    _run(action)


def _run(action: Callable[[], T]) -> T:
    """Run a command body, turning expected failures into one-line errors (exit 1)."""
    _setup_logging()
    try:
        return action()
    except (CliError, ConfigError, DeltaJarsError, FileNotFoundError, ValueError, LookupError) as exc:
        typer.echo(f"refinex: error: {exc}", err=True)
        raise typer.Exit(1) from None
    except StageFailed as exc:  # a failed gate: its whole summary, then exit 1
        typer.echo(f"refinex: {exc}", err=True)
        raise typer.Exit(1) from None
    except Exception as exc:  # noqa: BLE001 - Spark errors: one readable line, then exit 1
        name, message = one_line(exc)
        if "JAVA_GATEWAY_EXITED" in str(exc):
            message += " (is Java 17 installed and JAVA_HOME set?)"
        typer.echo(f"refinex: {name}: {message}", err=True)
        if os.environ.get("REFINEX_DEBUG"):
            raise
        raise typer.Exit(1) from None


def _pipeline_body(values: dict[str, Any], workdir: Optional[str], config: Optional[str], set_: Optional[list[str]],
                   run_id: Optional[str]) -> None:
    def action() -> None:
        from refinex.spark.expert import EXPERT
        from refinex.spark.pipeline import format_summary, run_pipeline

        from refinex.spark.ingest import check_inputs

        kwargs, configuring = _split(EXPERT, dict(values))
        check_inputs(kwargs)
        ctx = _context(_config(config, set_, EXPERT, configuring), workdir, run_id)
        result = run_pipeline(
            ctx.spark, ctx.config, ctx.workdir, kwargs["input"], limit=kwargs["limit"], run_id=ctx.run_id,
            base=kwargs["base"], model_uri=kwargs["model"], train=not kwargs["skip_train"],
            refine=not kwargs["skip_model"],
        )
        if result.get("stopped"):
            typer.echo(f"refinex: warning: {result['stopped']}", err=True)
            return
        typer.echo(format_summary(result))
        if result["failures"]:
            raise StageFailed("quality gates failed (everything else was written):\n\n"
                              + "\n\n".join(result["failures"]), {})

    _run(action)


def _register_commands() -> None:
    """One command per registered stage (``refine`` runs its chain), plus ``pipeline``."""
    from refinex.spark.expert import EXPERT_PARAMS
    from refinex.spark.ingest import INGEST
    from refinex.spark.registry import STAGES
    from refinex.spark.sft import BASE_PARAM
    from refinex.spark.stage import Param

    _command(
        "pipeline",
        "Run the whole flow and print both program origins side by side.\n\n"
        "ingest -> expert -> distill -> apply -> stats -> validate -> evaluate (the distilled oracle), then "
        "sft_pairs -> train -> refine -> apply -> stats -> validate -> evaluate with the refine model, and promote "
        "(gated). The default trains model.base (tiny) on this run's distilled programs; --model or --skip-train "
        "reuse a model (no promotion). Exits 1 when a quality gate fails, after writing everything else.",
        (*INGEST.params, *EXPERT_PARAMS, BASE_PARAM,
         Param("model", "Refine with this model instead of training one: models:/NAME@ALIAS, models:/NAME/N or a "
               "checkpoint folder."),
         Param("skip_train", "Do not train: refine with the champion (models:/refinex-refiner@champion).",
               kind="bool", default=False),
         Param("skip_model", "Stop after the distilled programs (no sft_pairs, train, refine).", kind="bool",
               default=False)),
        _pipeline_body,
    )
    for stage in STAGES.values():
        if stage.name == "refine":
            no_apply = typer.Option(False, "--no-apply", help="Only write the programs (apply and stats run as "
                                    "their own stages, as in the bundle's tasks).")
            _command(stage.command, stage.help, stage.params, _refine_body, extra=(("no_apply", bool, no_apply),))
        else:
            _command(stage.command, stage.help, stage.params, _stage_body(stage))


@app.command()
def sql(
    query: Annotated[str, typer.Argument(help="One SELECT (or WITH/SHOW/DESCRIBE) over the tables and views.")],
    workdir: WorkdirOpt = None,
    output: Annotated[
        Optional[str], typer.Option("--output", "-o", help="Write every row to FILE.csv, FILE.jsonl or FILE.parquet.")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Rows shown on the terminal.")] = 100,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Query the tables and the edit-statistics views in SQL (views: refinex/sql/views.sql).

    Tables are refinex.<table> (catalog tables by their full names); views: edit_stats_versions
    (every version, is_latest), edit_stats_latest, stats_by_origin, stats_by_source,
    stats_by_status, stats_by_shard, ops_per_document, deletion_ratio_percentiles,
    top_removed_strings, top_removed_lines, model_vs_oracle (the latest version of each
    origin, with its short version_label)."""

    def body() -> None:
        from refinex.spark.views import sql_command

        cfg = _config(config, set_)
        _require_workdir(cfg, workdir)
        ctx = _context(cfg, workdir, None)
        typer.echo(sql_command(ctx, query, output=output, limit=limit)["text"])

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


_register_commands()


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console-script entry point (``refinex=refinex.cli:main``); ``argv`` for ``jobs/``."""
    app(args=list(argv) if argv is not None else None)


if __name__ == "__main__":
    main()
