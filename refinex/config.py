"""Typed configuration: YAML profiles in ``conf/`` plus overrides from the command line.

A profile is a YAML file with the sections of :class:`Config`. ``load_config("test")``
reads ``conf/default.yaml`` and then ``conf/test.yaml`` on top of it (a deep merge), so a
profile only states what differs from the defaults; a path to any YAML file works the same
way. Overrides are ``section.key=value`` strings whose values are parsed as YAML scalars
(``spark.shuffle_partitions=4``, ``expert.options.timeout=30``). Files are read with
``yaml.safe_load`` only.

Every key is checked at load time: unknown keys, the type of every scalar (from the
dataclass annotations; ``Optional`` fields take ``null``, others do not) and each section's
``validate``. Errors name the key and where its value came from:
``<file>: <section.key>: <problem>`` for a profile file, ``--set section.key=value: ...`` for
an override.

The profiles, prompts (``prompts/``), expert settings (``experts/``) and base cards
(``model/``) live in ``conf/`` at the repository root; the wheel ships the same files as the
package data ``refinex/conf`` (see :func:`conf_dir`).
"""
from __future__ import annotations

import copy
import difflib
import os
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import yaml

CONF_DIR_ENV = "REFINEX_CONF_DIR"
"""Environment variable naming the folder of profiles (default: the shipped ``conf/``)."""

DEFAULT_PROFILE = "default"
PROFILE_ENV = "REFINEX_CONFIG"
"""Environment variable naming the profile used when none is given (jobs on a cluster)."""

DELTA_LOCAL = "local"
DELTA_CLUSTER = "cluster"
DELTA_MODES = (DELTA_LOCAL, DELTA_CLUSTER)

JAR_RESOLVERS = ("auto", "spark", "maven")
INPUT_FORMATS = ("auto", "jsonl", "parquet")
REFINE_BACKENDS = ("transformers", "vllm", "openai")
MODEL_HEADS = ("generate", "tag")  # the refine model writes programs token by token, or tags lines


class ConfigError(ValueError):
    """A profile or override is missing, malformed or out of range.

    ``key`` is the dotted setting (``spark.shuffle_partitions``) and ``source`` the file or
    ``--set`` override its value came from, when known; the message is
    ``<source>: <key>: <problem>``.
    """

    def __init__(self, problem: str, key: Optional[str] = None, source: Optional[str] = None) -> None:
        self.problem, self.key, self.source = problem, key, source
        text = f"{key}: {problem}" if key else problem
        super().__init__(f"{source}: {text}" if source else text)


@dataclass(frozen=True)
class SparkConfig:
    """How the Spark session is built (see ``refinex.spark.session``)."""

    master: Optional[str] = "local[*]"
    app_name: str = "refinex"
    shuffle_partitions: Optional[int] = None  # None: the local master's cores, else 200
    arrow_max_records_per_batch: int = 128
    ui_enabled: bool = True
    console_progress: bool = True
    log_level: str = "WARN"
    delta: str = DELTA_LOCAL
    jar_resolver: str = "auto"
    quick_jit: bool = True  # local sessions: the JVM's quick (C1) compiler only
    remote: Optional[str] = None  # a Spark Connect URL (sc://host:port); else $SPARK_REMOTE; else none
    conf: dict[str, str] = field(default_factory=dict)

    @property
    def partitions(self) -> int:
        """``shuffle_partitions``, else one per core of a local master (``local[N]``,
        ``local[*]`` = this machine's), else 200."""
        if self.shuffle_partitions is not None:
            return self.shuffle_partitions
        match = re.fullmatch(r"local(?:\[(\d+|\*)(?:,\s*\d+)?\])?", (self.master or "").strip())
        if match is None:
            return 200
        cores = match.group(1)
        return int(cores) if cores and cores != "*" else max(1, os.cpu_count() or 1)

    def validate(self) -> None:
        if self.delta not in DELTA_MODES:
            raise ConfigError(f"spark.delta must be one of {DELTA_MODES}, got {self.delta!r}")
        if self.jar_resolver not in JAR_RESOLVERS:
            raise ConfigError(f"spark.jar_resolver must be one of {JAR_RESOLVERS}, got {self.jar_resolver!r}")
        if self.shuffle_partitions is not None:
            _positive("spark.shuffle_partitions", self.shuffle_partitions)
        _positive("spark.arrow_max_records_per_batch", self.arrow_max_records_per_batch)


@dataclass(frozen=True)
class IngestConfig:
    """Limits and layout of the ``documents`` table."""

    n_shards: int = 8
    max_text_chars: int = 1_000_000
    max_html_chars: int = 10_000_000
    max_record_chars: int = 32_000_000
    format: str = "auto"

    def validate(self) -> None:
        _positive("ingest.n_shards", self.n_shards)
        _positive("ingest.max_text_chars", self.max_text_chars)
        _positive("ingest.max_html_chars", self.max_html_chars)
        _positive("ingest.max_record_chars", self.max_record_chars)
        if self.format not in INPUT_FORMATS:
            raise ConfigError(f"ingest.format must be one of {INPUT_FORMATS}, got {self.format!r}")


@dataclass(frozen=True)
class ExpertConfig:
    """Which expert refines documents, and how work is cut for it."""

    name: str = "trafilatura"
    options: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 16
    docs_per_partition: int = 200
    mlflow: bool = True  # log each expert stage run to MLflow
    mlflow_experiment: str = "refinex-expert"
    mlflow_tracking_uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI, else <workdir>/mlflow.db

    def validate(self) -> None:
        if not self.name:
            raise ConfigError("expert.name must not be empty")
        _positive("expert.batch_size", self.batch_size)
        _positive("expert.docs_per_partition", self.docs_per_partition)
        if not isinstance(self.mlflow, bool):
            raise ConfigError(f"expert.mlflow must be true or false, got {self.mlflow!r}")
        if not self.mlflow_experiment:
            raise ConfigError("expert.mlflow_experiment must not be empty")


@dataclass(frozen=True)
class GuardrailsConfig:
    """Execution guardrails (``refinex.program.Guardrails``)."""

    max_error_ratio: float = 0.5
    min_kept_chars: int = 50

    def validate(self) -> None:
        if not 0.0 <= float(self.max_error_ratio) <= 1.0:
            raise ConfigError(f"guardrails.max_error_ratio must be in [0, 1], got {self.max_error_ratio}")
        if self.min_kept_chars < 0:
            raise ConfigError(f"guardrails.min_kept_chars must be >= 0, got {self.min_kept_chars}")


@dataclass(frozen=True)
class ChunkingConfig:
    """Token budget of one model chunk (``refinex.chunking``)."""

    max_tokens: int = 1500

    def validate(self) -> None:
        _positive("chunking.max_tokens", self.max_tokens)


@dataclass(frozen=True)
class ApplyConfig:
    """Which programs ``apply`` and ``stats`` use by default."""

    origin: str = "distilled"
    origin_version: Optional[str] = None

    def validate(self) -> None:
        if self.origin not in ("distilled", "model"):
            raise ConfigError(f"apply.origin must be 'distilled' or 'model', got {self.origin!r}")


@dataclass(frozen=True)
class ModelConfig:
    """The refine model: its base, the tiny tokenizer's corpus and MLflow tracking/registry."""

    base: str = "fast"
    tokenizer_corpus_docs: int = 1000
    tracking_uri: Optional[str] = None
    registry_uri: Optional[str] = None
    experiment: str = "refinex-train"
    registered_name: str = "refinex-refiner"
    champion_alias: str = "champion"
    eval_chunks: int = 32
    head: str = "tag"

    def validate(self) -> None:
        if self.head not in MODEL_HEADS:
            raise ConfigError(f"model.head must be one of {MODEL_HEADS}, got {self.head!r}")
        if not isinstance(self.eval_chunks, int) or self.eval_chunks < 0:
            raise ConfigError(f"model.eval_chunks must be >= 0, got {self.eval_chunks!r}")
        if self.head == "generate" and self.base in ("fast",):
            raise ConfigError("model.base fast is a tagging model (no language model to generate with): "
                              "use model.head: tag, or a transformer base for the generative head")
        if not self.base:
            raise ConfigError("model.base must not be empty")
        if not isinstance(self.tokenizer_corpus_docs, int) or self.tokenizer_corpus_docs < 0:
            raise ConfigError(f"model.tokenizer_corpus_docs must be >= 0, got {self.tokenizer_corpus_docs!r}")
        for name in ("experiment", "registered_name", "champion_alias"):
            if not getattr(self, name):
                raise ConfigError(f"model.{name} must not be empty")


@dataclass(frozen=True)
class SftConfig:
    """Which distilled programs become SFT pairs, and the document-level split."""

    origin_version: Optional[str] = None
    validation_fraction: float = 0.1
    train_sample: float = 1.0

    def validate(self) -> None:
        if not 0.0 <= float(self.validation_fraction) <= 1.0:
            raise ConfigError(f"sft.validation_fraction must be in [0, 1], got {self.validation_fraction}")
        if not 0.0 < float(self.train_sample) <= 1.0:
            raise ConfigError(f"sft.train_sample must be in (0, 1], got {self.train_sample}")


@dataclass(frozen=True)
class RefineConfig:
    """How the refine stage runs the model (``refinex.spark.refine``)."""

    backend: str = "transformers"
    constrained: bool = True
    max_new_tokens: int = 256
    batch_size: int = 16
    docs_per_partition: int = 64
    options: dict[str, Any] = field(default_factory=dict)
    load_log: Optional[str] = None

    def validate(self) -> None:
        if self.backend not in REFINE_BACKENDS:
            raise ConfigError(f"refine.backend must be one of {REFINE_BACKENDS}, got {self.backend!r}")
        _positive("refine.max_new_tokens", self.max_new_tokens)
        _positive("refine.batch_size", self.batch_size)
        _positive("refine.docs_per_partition", self.docs_per_partition)


@dataclass(frozen=True)
class TablesConfig:
    """Where tables live (``refinex.spark.tables.TableResolver``).

    ``catalog`` unset: path tables under ``<workdir>/delta/``, registered in the session
    catalog as ``<schema>.<name>`` when ``register``; set: ``<catalog>.<schema>.<name>``.
    """

    catalog: Optional[str] = None
    schema: str = "refinex"
    register: bool = True

    def validate(self) -> None:
        for name in ("catalog", "schema"):
            value = getattr(self, name)
            if value is None and name == "catalog":
                continue
            if not isinstance(value, str) or not _IDENTIFIER.match(value):
                raise ConfigError(f"tables.{name} must be a SQL identifier (letters, digits, _), got {value!r}")
        if not isinstance(self.register, bool):
            raise ConfigError(f"tables.register must be true or false, got {self.register!r}")


_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class StagesConfig:
    """What the stage envelope records besides ``stage_runs`` (``refinex.spark.stage``)."""

    mlflow: bool = True  # log each stage's numeric statistics as metrics of an MLflow run
    mlflow_experiment: str = "refinex-stages"

    def validate(self) -> None:
        if not isinstance(self.mlflow, bool):
            raise ConfigError(f"stages.mlflow must be true or false, got {self.mlflow!r}")
        if not self.mlflow_experiment:
            raise ConfigError("stages.mlflow_experiment must not be empty")


@dataclass(frozen=True)
class QualityConfig:
    """The Great Expectations gates of ``refinex validate`` (``refinex.quality``).

    Share ceilings are fractions of one origin's documents. A gate at level ``error`` fails
    the stage (and the job); the extreme-deletion check is a warning only.
    """

    enabled: bool = True  # the pipeline runs validate after each apply -> stats
    max_fallback_share: float = 0.05  # status fallback_raw
    max_dropped_share: float = 0.5  # status dropped
    max_expert_failed_share: float = 0.05  # status expert_failed
    max_no_program_share: float = 0.05  # status no_program
    extreme_deletion_ratio: float = 0.95  # warning: status refined although this much was deleted
    max_extreme_share: float = 0.1  # ... on more than this share of the documents
    example_ids: int = 5  # offending ids shown per failed expectation
    data_docs: bool = True  # build the Data Docs HTML site under <workdir>/reports/

    def validate(self) -> None:
        for name in ("max_fallback_share", "max_dropped_share", "max_expert_failed_share",
                     "max_no_program_share", "extreme_deletion_ratio", "max_extreme_share"):
            value = getattr(self, name)
            if not 0.0 <= float(value) <= 1.0:
                raise ConfigError(f"quality.{name} must be in [0, 1], got {value!r}")
        if self.example_ids < 0:
            raise ConfigError(f"quality.example_ids must be >= 0, got {self.example_ids!r}")


@dataclass(frozen=True)
class EvaluateConfig:
    """``refinex evaluate``: scores against gold pages and against the expert."""

    enabled: bool = True  # the pipeline evaluates each origin when the documents carry gold
    gold: Optional[str] = None  # a pages file (id, source, gold); None: the documents' own gold
    plots: bool = True  # PNGs under <workdir>/reports/ (and MLflow artifacts)
    mlflow_experiment: str = "refinex-evaluate"

    def validate(self) -> None:
        if not self.mlflow_experiment:
            raise ConfigError("evaluate.mlflow_experiment must not be empty")


@dataclass(frozen=True)
class PromoteConfig:
    """Gates ``refinex promote`` checks before moving ``@champion`` (else ``@challenger``)."""

    max_new_words: int = 0  # words in the refined text that are not in the raw text
    max_invalid_share: float = 0.01  # documents whose program had parse errors or fell back
    recall_margin: float = 0.2  # snippet recall >= the raw text's recall - this margin
    require_better_f1: bool = True  # snippet F1 above the current champion's (when there is one)
    challenger_alias: str = "challenger"

    def validate(self) -> None:
        if self.max_new_words < 0:
            raise ConfigError(f"promote.max_new_words must be >= 0, got {self.max_new_words!r}")
        for name in ("max_invalid_share", "recall_margin"):
            value = getattr(self, name)
            if not 0.0 <= float(value) <= 1.0:
                raise ConfigError(f"promote.{name} must be in [0, 1], got {value!r}")
        if not self.challenger_alias:
            raise ConfigError("promote.challenger_alias must not be empty")


def _validate_tag(settings: Mapping[str, Any], base: str) -> None:
    """``tag`` holds the tagging settings of ``model.base``'s tier
    (:func:`refinex.model.tiers.tag_config_class`)."""
    from refinex.model.tiers import tag_config_class

    _validate_settings(tag_config_class(base), settings, "tag")


def _validate_train(settings: Mapping[str, Any]) -> None:
    """``train`` holds :class:`refinex.model.train.TrainConfig` fields: keys and types checked."""
    from refinex.model.train import TrainConfig

    _validate_settings(TrainConfig, settings, "train")


def _validate_settings(cls: Any, settings: Mapping[str, Any], section: str) -> None:
    """A free-form section of ``cls`` fields: keys, scalar types and ``cls.from_dict`` checked."""
    known = {f.name for f in fields(cls)}
    hints = _hints(cls)
    for name, value in settings.items():
        if name not in known:
            raise ConfigError(_unknown(str(name), known), key=f"{section}.{name}")
        _check_scalar(hints[name], value, f"{section}.{name}")
    try:
        cls.from_dict(settings)
    except (TypeError, ValueError) as exc:
        word, _, rest = str(exc).partition(" ")
        if word in known and rest:  # "truncation must be one of ...": name the setting
            raise ConfigError(rest, key=f"{section}.{word}") from exc
        raise ConfigError(str(exc), key=section) from exc


@dataclass(frozen=True)
class Config:
    """The whole configuration of a run."""

    profile: str = DEFAULT_PROFILE
    workdir: Optional[str] = None
    spark: SparkConfig = field(default_factory=SparkConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    guardrails: GuardrailsConfig = field(default_factory=GuardrailsConfig)
    chunking: ChunkingConfig = field(default_factory=ChunkingConfig)
    apply: ApplyConfig = field(default_factory=ApplyConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    train: dict[str, Any] = field(default_factory=dict)
    tag: dict[str, Any] = field(default_factory=dict)
    refine: RefineConfig = field(default_factory=RefineConfig)
    tables: TablesConfig = field(default_factory=TablesConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    promote: PromoteConfig = field(default_factory=PromoteConfig)

    def validate(self) -> "Config":
        for section in (
            self.spark, self.ingest, self.expert, self.guardrails, self.chunking, self.apply,
            self.model, self.sft, self.refine, self.tables, self.stages, self.quality, self.evaluate,
            self.promote,
        ):
            section.validate()
        _validate_train(self.train)
        _validate_tag(self.tag, self.model.base)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON/YAML serialisable)."""
        return asdict(self)

    def with_overrides(self, overrides: Mapping[str, Any]) -> "Config":
        """A copy with dotted ``section.key`` overrides applied (values already typed).

        Errors name the override as ``--set section.key=value``."""
        return _apply_overrides(self, [(k, v, f"--set {k}={_show(v)}") for k, v in overrides.items()])


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def conf_dir() -> Path:
    """The folder holding the YAML profiles (and ``prompts/``, ``experts/``, ``model/``).

    ``$REFINEX_CONF_DIR`` when set; else the package data ``refinex/conf`` of an installed
    wheel; else ``conf/`` at the root of the source checkout (editable installs included).
    """
    env = os.environ.get(CONF_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return _shipped_conf_dir()


def _shipped_conf_dir() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / f"{DEFAULT_PROFILE}.yaml").is_file():
            return candidate
    return here / "conf"


def find_conf_file(*parts: str) -> Path:
    """``<conf>/<parts...>`` (e.g. ``find_conf_file("prompts", "refine_v1.txt")``):
    under ``$REFINEX_CONF_DIR`` when it has the file, else the shipped one (returned even
    when missing, so the caller's error names it)."""
    shipped = _shipped_conf_dir().joinpath(*parts)
    env = os.environ.get(CONF_DIR_ENV)
    if env:
        in_env = Path(env).expanduser().joinpath(*parts)
        if in_env.exists() or not shipped.exists():
            return in_env
    return shipped


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", source=str(path)) from exc
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", source=str(path)) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"a profile must be a mapping of sections, got {_describe(data)}", source=str(path))
    return data


_FREE_MAPS = ("conf", "options")  # free-form maps: merged one level deep, keys may contain dots


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in top.items():
        if value is None and isinstance(merged.get(key), dict) and key not in _FREE_MAPS:
            continue  # an empty section (every key commented out) changes nothing
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict) and key not in _FREE_MAPS:
            merged[key] = _deep_merge(merged[key], value)
        elif isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# --- where each value came from -------------------------------------------------------------

_KeyPath = tuple[str, ...]


class _Sources:
    """Which file or override set each key of the merged data (the last one wins)."""

    def __init__(self, fallback: Optional[str] = None) -> None:
        self.by_path: dict[_KeyPath, str] = {}
        self.fallback = fallback

    def record(self, data: Mapping[str, Any], source: str, prefix: _KeyPath = ()) -> None:
        for key, value in data.items():
            path = (*prefix, str(key))
            self.by_path[path] = source
            if isinstance(value, Mapping):
                self.record(value, source, path)

    def source_of(self, path: _KeyPath) -> Optional[str]:
        for n in range(len(path), 0, -1):
            if path[:n] in self.by_path:
                return self.by_path[path[:n]]
        return self.fallback

    def error(self, path: _KeyPath, problem: str) -> ConfigError:
        return ConfigError(problem, key=".".join(path), source=self.source_of(path))


_KEYED_MESSAGE = re.compile(r"^(?P<key>[a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)+):? (?P<problem>.+)$", re.DOTALL)


def _located(exc: ConfigError, sources: _Sources) -> ConfigError:
    """``exc`` (from a ``validate``) with the source of its key added."""
    if exc.source is not None:
        return exc
    key, problem = exc.key, exc.problem
    if key is None:
        match = _KEYED_MESSAGE.match(problem)
        if match is not None:
            key, problem = match["key"], match["problem"]
    if key is None:
        return ConfigError(problem, source=sources.fallback)
    return ConfigError(problem, key=key, source=sources.source_of(tuple(key.split("."))))


# --- types from the annotations -------------------------------------------------------------

_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {'true' if value else 'false'}"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a {type(value).__name__}"


_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _split_optional(hint: Any) -> tuple[Any, bool]:
    """``Optional[X]`` -> ``(X, True)``; ``X`` -> ``(X, False)``."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        return (args[0] if len(args) == 1 else Union[tuple(args)]), optional
    return hint, False


def _is_mapping_hint(hint: Any) -> bool:
    origin = typing.get_origin(hint) or hint
    return isinstance(origin, type) and issubclass(origin, Mapping) or origin is dict


def _check_scalar(hint: Any, value: Any, key: str) -> Any:
    """``value`` if it fits the annotation ``hint`` (ints are taken for floats), else ConfigError."""
    inner, optional = _split_optional(hint)
    if value is None:
        if optional or inner is Any:
            return None
        raise ConfigError(f"missing value (expected {_expected(inner)})", key=key)
    if inner is Any:
        return value
    if inner is bool:
        if isinstance(value, bool):
            return value
    elif inner is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif inner is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif inner is str:
        if isinstance(value, str):
            return value
    elif _is_mapping_hint(inner):
        if isinstance(value, Mapping):
            return dict(value)
    elif typing.get_origin(inner) in (Union, types.UnionType):
        for option in typing.get_args(inner):
            try:
                return _check_scalar(option, value, key)
            except ConfigError:
                continue
    else:
        return value  # an annotation this checker does not know: the section's validate decides
    raise ConfigError(f"expected {_expected(inner)}{' or null' if optional else ''}, got {_describe(value)}", key=key)


def _expected(hint: Any) -> str:
    if hint in _EXPECTED:
        return _EXPECTED[hint]
    if _is_mapping_hint(hint):
        return "a mapping"
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_expected(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint))


def _unknown(name: str, known: Sequence[str] | set[str]) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key ({hint}known: {', '.join(sorted(known))})"


def _section_type(hint: Any) -> Optional[type]:
    inner, _ = _split_optional(hint)
    return inner if isinstance(inner, type) and is_dataclass(inner) else None


def _build(cls: type, data: Mapping[str, Any], path: _KeyPath, sources: _Sources) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise sources.error((*path, unknown[0]), _unknown(unknown[0], known))
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = (*path, name)
        section = _section_type(hints[name])
        if section is not None:
            if value is None:
                value = {}
            if not isinstance(value, Mapping):
                raise sources.error(key, f"must be a section (a mapping), got {_describe(value)}")
            kwargs[name] = _build(section, value, key, sources)
        elif _is_mapping_hint(_split_optional(hints[name])[0]):
            if value is None:
                value = {}
            if not isinstance(value, Mapping):
                raise sources.error(key, f"must be a mapping, got {_describe(value)}")
            kwargs[name] = dict(value)
        else:
            try:
                kwargs[name] = _check_scalar(hints[name], value, ".".join(key))
            except ConfigError as exc:
                raise sources.error(key, exc.problem) from None
    return cls(**kwargs)


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """A validated :class:`Config` from a plain mapping (unknown keys are errors)."""
    return _config_from(data, _Sources())


def _config_from(data: Mapping[str, Any], sources: _Sources) -> Config:
    config: Config = _build(Config, data, (), sources)
    if config.spark.conf:
        config = _replace_spark_conf(config, {str(k): _conf_value(v) for k, v in config.spark.conf.items()})
    try:
        return config.validate()
    except ConfigError as exc:
        raise _located(exc, sources) from None


def _conf_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _replace_spark_conf(config: Config, conf: dict[str, str]) -> Config:
    return replace(config, spark=replace(config.spark, conf=conf))


_TOP_LEVEL_KEYS = ("workdir", "profile")


def _sections() -> dict[str, type]:
    """The sections of :class:`Config` that are dataclasses, by name."""
    hints = _hints(Config)
    return {f.name: section for f in fields(Config) if (section := _section_type(hints[f.name])) is not None}


def _set_dotted(data: dict[str, Any], dotted: str, value: Any, label: Optional[str] = None) -> _KeyPath:
    """Set ``section.key`` (or ``section.conf.<any.dotted.key>``) in ``data``; the key path set."""
    parts = dotted.split(".")
    if len(parts) < 2 and parts[0] not in _TOP_LEVEL_KEYS:
        candidates = [f"{name}.{parts[0]}" for name, section in _sections().items()
                      if parts[0] in {f.name for f in fields(section)}]
        hint = f" ({', '.join(candidates)}?)" if candidates else ""
        raise ConfigError(f"expected section.key{hint}", key=dotted, source=label)
    node = data
    for index, part in enumerate(parts[:-1]):
        if part not in node:
            where = ".".join(parts[: index + 1])
            raise ConfigError(_unknown(part, set(node)), key=where, source=label)
        if not isinstance(node[part], dict):
            raise ConfigError(f"{'.'.join(parts[: index + 1])} is not a section", key=dotted, source=label)
        if part in _FREE_MAPS and index < len(parts) - 2:
            # keys of free-form maps may themselves contain dots (spark.sql.x)
            rest = ".".join(parts[index + 1 :])
            node[part][rest] = value
            return (*parts[: index + 1], rest)
        node = node[part]
    node[parts[-1]] = value
    return tuple(parts)


def _show(value: Any) -> str:
    """An override's value as it would be typed after ``--set key=``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        try:
            plain = yaml.safe_load(value) == value
        except yaml.YAMLError:
            plain = False
        return value if plain else yaml.safe_dump(value, default_style="'").splitlines()[0]
    if isinstance(value, (int, float)):
        return str(value)
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 16).strip()


def _apply_overrides(config: Config, items: Sequence[tuple[str, Any, str]]) -> Config:
    """``config`` with ``(dotted key, typed value, label)`` overrides; errors name the label."""
    data = config.to_dict()
    sources = _Sources(fallback=items[0][2] if len(items) == 1 else None)
    for dotted, value, label in items:
        path = _set_dotted(data, dotted, value, label)
        sources.by_path[path] = label
        if isinstance(value, Mapping):
            sources.record(value, label, path)
    return _config_from(data, sources)


def parse_override(text: str) -> tuple[str, Any]:
    """``"section.key=value"`` -> ``("section.key", value)`` with the value parsed as YAML."""
    label = f"--set {text}"
    if "=" not in text:
        raise ConfigError("expected section.key=value", source=label)
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError("empty key", source=label)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"bad value: {exc}", key=key, source=label) from exc
    return key, value


def resolve_profile(profile_or_path: Optional[str]) -> Path:
    """The YAML file of a profile name (``conf/<name>.yaml``) or an explicit path."""
    name = profile_or_path or os.environ.get(PROFILE_ENV) or DEFAULT_PROFILE
    candidate = Path(name).expanduser()
    if candidate.suffix in (".yaml", ".yml") or "/" in name or os.sep in name:
        if not candidate.is_file():
            raise ConfigError(f"config file not found: {candidate}")
        return candidate
    folder = conf_dir()
    path = folder / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in folder.glob("*.yaml"))
        raise ConfigError(f"unknown profile {name!r} in {folder} (available: {', '.join(available)})")
    return path


def load_config(
    profile_or_path: Optional[str] = None,
    overrides: Optional[Mapping[str, Any] | Sequence[str]] = None,
) -> Config:
    """Defaults, then ``conf/default.yaml``, then the profile, then the overrides.

    ``overrides`` is a mapping of dotted keys to typed values, or a sequence of
    ``section.key=value`` strings. Errors name the key and the file (or override) it came from.
    """
    data = Config().to_dict()
    default_file = conf_dir() / f"{DEFAULT_PROFILE}.yaml"
    path = resolve_profile(profile_or_path)
    sources = _Sources(fallback=str(path))
    layers = [default_file] if default_file.is_file() else []
    if not layers or path.resolve() != default_file.resolve():
        layers.append(path)
    for layer_path in layers:
        layer = _read_yaml(layer_path)
        data = _deep_merge(data, layer)
        sources.record(layer, str(layer_path))
    data["profile"] = path.stem
    config = _config_from(data, sources)
    if overrides:
        if _is_str_seq(overrides):
            items = [(*parse_override(o), f"--set {o}") for o in overrides]  # type: ignore[union-attr]
        else:
            items = [(k, v, f"--set {k}={_show(v)}") for k, v in dict(overrides).items()]  # type: ignore[arg-type]
        config = _apply_overrides(config, items)
    return config


def _is_str_seq(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


def dump_config(config: Config) -> str:
    """The configuration as YAML (what a run actually used)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
