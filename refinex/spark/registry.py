"""The one registry of stages, and the pipeline as steps over it.

``STAGES`` serves the ``refinex`` CLI (one sub-command per stage, flags from the declared
parameters), ``jobs/``, ``refinex pipeline`` and the Databricks bundle. A :class:`Step` is
one use of a stage in the pipeline (``apply`` runs twice: for the distilled programs and for
the model's). Step dependencies are derived from what the stages declare they read and write
(:func:`dependencies`); the bundle's ``depends_on`` is exactly that graph, and
:func:`check_order` refuses a step order in which a stage reads a table no earlier step wrote.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

from refinex.config import Config
from refinex.spark.apply import APPLY, EXPORT
from refinex.spark.distill import DISTILL
from refinex.spark.evaluate import EVALUATE
from refinex.spark.expert import EXPERT
from refinex.spark.ingest import INGEST
from refinex.spark.promote import PROMOTE
from refinex.spark.refine import REFINE
from refinex.spark.report import REPORT
from refinex.spark.sft import SFT_PAIRS_STAGE
from refinex.errors import StageFailed
from refinex.spark.stage import Stage, StageContext, execute
from refinex.spark.stats import STATS
from refinex.spark.tables import ORIGIN_DISTILLED, ORIGIN_MODEL
from refinex.spark.train import TRAIN
from refinex.spark.validate import VALIDATE

STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (INGEST, EXPERT, DISTILL, APPLY, STATS, VALIDATE, EVALUATE, REPORT, EXPORT, SFT_PAIRS_STAGE, TRAIN,
                  REFINE, PROMOTE)
}

REGISTERED_MODEL = "registered_model"
"""Not a table: what ``train`` produces and ``refine`` consumes (the MLflow registry)."""
_MAKES_MODEL = ("train",)
_USES_MODEL = ("refine", "promote")
MODEL_RUN_SUFFIX = "+model"


def get_stage(name: str) -> Stage:
    """The stage ``name`` (``sft-pairs`` and ``sft_pairs`` alike)."""
    key = name.replace("-", "_")
    if key not in STAGES:
        raise LookupError(f"unknown stage {name!r} (stages: {', '.join(STAGES)})")
    return STAGES[key]


Bind = Callable[[Config, Mapping[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class Step:
    """One use of a stage in the pipeline.

    ``params`` are fixed values (``origin: model``); ``bind`` adds values taken from the
    results of earlier steps when the steps run in one process (the bundle's tasks resolve
    the same values from the tables instead). ``run_suffix`` keeps the ``stage_runs`` key
    ``(run_id, stage)`` apart when a stage runs twice in one run. A ``gate`` step (validate)
    that fails does not stop the steps after it: :func:`run_steps` records the failure and
    the run ends non-zero after writing everything it can.
    """

    key: str
    stage: str
    params: Mapping[str, Any] = field(default_factory=dict)
    bind: Optional[Bind] = None
    run_suffix: str = ""
    gate: bool = False

    @property
    def declaration(self) -> Stage:
        return get_stage(self.stage)


def _oracle_version(config: Config, results: Mapping[str, Any]) -> dict[str, Any]:
    if config.apply.origin_version is not None or "expert" not in results:
        return {}
    return {"origin_version": results["expert"]["origin_version"]}


def _sft_version(config: Config, results: Mapping[str, Any]) -> dict[str, Any]:
    if config.sft.origin_version is not None or "expert" not in results:
        return {}
    return {"origin_version": results["expert"]["origin_version"]}


def _trained_model(config: Config, results: Mapping[str, Any]) -> dict[str, Any]:
    return {"model": results["train"]["model_uri"]} if "train" in results else {}


def _refined_version(config: Config, results: Mapping[str, Any]) -> dict[str, Any]:
    return {"origin_version": results["refine"]["origin_version"]} if "refine" in results else {}


def _trained_version(config: Config, results: Mapping[str, Any]) -> dict[str, Any]:
    return {"version": int(results["train"]["version"])} if "train" in results else {}


ORACLE_STEPS: tuple[Step, ...] = (
    Step("ingest", "ingest"),
    Step("expert", "expert"),
    Step("distill", "distill"),
    Step("apply", "apply", {"origin": ORIGIN_DISTILLED}, _oracle_version),
    Step("stats", "stats", {"origin": ORIGIN_DISTILLED}, _oracle_version),
)
"""The distilled oracle: the expert's edits as deletion-only programs, applied and measured."""

ORACLE_CHECKS: tuple[Step, ...] = (
    Step("validate", "validate", {"origin": ORIGIN_DISTILLED}, _oracle_version, gate=True),
    Step("evaluate", "evaluate", {"origin": ORIGIN_DISTILLED}, _oracle_version),
)
"""The oracle's quality gates and scores (against gold, when the documents carry it)."""

TRAIN_STEPS: tuple[Step, ...] = (
    Step("sft_pairs", "sft_pairs", bind=_sft_version),
    Step("train", "train"),
)

MODEL_CHAIN: tuple[Step, ...] = (
    Step("refine", "refine", bind=_trained_model),
    Step("apply_model", "apply", {"origin": ORIGIN_MODEL}, _refined_version, MODEL_RUN_SUFFIX),
    Step("stats_model", "stats", {"origin": ORIGIN_MODEL}, _refined_version, MODEL_RUN_SUFFIX),
)
"""refine -> apply -> stats of the model's programs: the CLI's ``refine`` and the pipeline's end."""

MODEL_CHECKS: tuple[Step, ...] = (
    Step("validate_model", "validate", {"origin": ORIGIN_MODEL}, _refined_version, MODEL_RUN_SUFFIX, gate=True),
    Step("evaluate_model", "evaluate", {"origin": ORIGIN_MODEL}, _refined_version, MODEL_RUN_SUFFIX),
)

PROMOTE_STEPS: tuple[Step, ...] = (Step("promote", "promote", bind=_trained_version),)
"""The model just trained goes through the promotion gates (@champion or @challenger)."""

PIPELINE_STEPS: tuple[Step, ...] = (
    *ORACLE_STEPS, *ORACLE_CHECKS, *TRAIN_STEPS, *MODEL_CHAIN, *MODEL_CHECKS, *PROMOTE_STEPS,
)


def _reads(step: Step) -> tuple[str, ...]:
    stage = step.declaration
    return (*stage.reads, *((REGISTERED_MODEL,) if stage.name in _USES_MODEL else ()))


def _writes(step: Step) -> tuple[str, ...]:
    stage = step.declaration
    return (*stage.writes, *((REGISTERED_MODEL,) if stage.name in _MAKES_MODEL else ()))


def dependencies(steps: Sequence[Step] = PIPELINE_STEPS) -> dict[str, tuple[str, ...]]:
    """Step key -> the keys of the steps it depends on: for every table (or the registered
    model) it reads, the latest earlier step that wrote it."""
    writers: dict[str, str] = {}
    graph: dict[str, tuple[str, ...]] = {}
    for step in steps:
        graph[step.key] = tuple(sorted({writers[r] for r in _reads(step) if r in writers}))
        for resource in _writes(step):
            writers[resource] = step.key
    return graph


def check_order(steps: Sequence[Step], external: Sequence[str] = ()) -> None:
    """ValueError unless every table a step reads was written by an earlier step (or by the
    step itself, as ``expert`` reads and extends ``expert_cache``); ``external`` names
    resources that exist before the run (the registered model when none is trained)."""
    keys = [s.key for s in steps]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate step keys in {keys}")
    produced: set[str] = set(external)
    for step in steps:
        missing = [r for r in _reads(step) if r not in produced and r not in _writes(step)]
        if missing:
            raise ValueError(f"step {step.key} ({step.stage}) reads {', '.join(missing)}, which no earlier step writes")
        produced.update(_writes(step))


def pipeline_steps(train: bool = True, refine: bool = True, validate: bool = True,
                   evaluate: bool = True) -> tuple[Step, ...]:
    """The steps of ``refinex pipeline``: the oracle and its checks, then (unless ``refine``
    is off) the model part, with or without training, its checks, and the promotion of the
    model it trained. ``validate`` / ``evaluate`` off leave those checks out (and promotion,
    which needs an evaluation)."""
    def checks(steps: tuple[Step, ...]) -> tuple[Step, ...]:
        return tuple(s for s in steps if (s.stage != "validate" or validate) and (s.stage != "evaluate" or evaluate))

    oracle = (*ORACLE_STEPS, *checks(ORACLE_CHECKS))
    if not refine:
        return oracle
    promote = PROMOTE_STEPS if train and evaluate else ()
    return (*oracle, *(TRAIN_STEPS if train else ()), *MODEL_CHAIN, *checks(MODEL_CHECKS), *promote)


def run_steps(
    ctx: StageContext,
    steps: Sequence[Step],
    params: Optional[Mapping[str, Mapping[str, Any]]] = None,
    results: Optional[dict[str, Any]] = None,
    external: Sequence[str] = (),
    stop: Optional[Callable[[str, Mapping[str, Any]], Optional[str]]] = None,
) -> dict[str, Any]:
    """Run the steps in order, each inside the envelope; returns ``{step key: stats}``.

    ``params`` gives extra values per step key (``{"train": {"base": ...}}``). A failing
    ``gate`` step's statistics are kept (with ``failed: true``) and its summary is appended
    to ``results["failures"]``; the caller decides how the run ends (the CLI exits 1).
    ``stop(step key, stats)`` may return a reason to end the run after that step (it is
    kept in ``results["stopped"]``).
    """
    check_order(steps, external)
    results = {} if results is None else results
    failures: list[str] = results.setdefault("failures", [])
    for step in steps:
        values: dict[str, Any] = dict(step.params)
        if step.bind is not None:
            values.update(step.bind(ctx.config, results))
        values.update((params or {}).get(step.key, {}))
        step_ctx = ctx.with_run_id(f"{ctx.run_id}{step.run_suffix}") if step.run_suffix else ctx
        try:
            results[step.key] = execute(step.declaration, step_ctx, **values)
        except StageFailed as exc:
            if not step.gate:
                raise
            results[step.key] = exc.stats
            failures.append(str(exc))
        reason = stop(step.key, results[step.key]) if stop is not None else None
        if reason:
            results["stopped"] = reason
            break
    return results


def run_stage(
    name: str,
    spark: Any,
    config: Config,
    workdir: str,
    run_id: Optional[str] = None,
    **params: Any,
) -> dict[str, Any]:
    """Run one registered stage over ``workdir`` (the Python API of ``refinex <stage>``)."""
    from refinex.spark.stage import context

    return execute(get_stage(name), context(spark, config, workdir, run_id), **params)
