"""Typed configuration: YAML profiles in ``conf/`` plus overrides from the command line.

A profile is a YAML file with the sections of :class:`Config`. ``load_config("test")``
reads ``conf/default.yaml`` and then ``conf/test.yaml`` on top of it (a deep merge), so a
profile only states what differs from the defaults; a path to any YAML file works the same
way. Overrides are ``section.key=value`` strings whose values are parsed as YAML scalars
(``spark.shuffle_partitions=4``, ``expert.options.timeout=30``). Files are read with
``yaml.safe_load`` only.
"""
from __future__ import annotations

import copy
import os
from dataclasses import MISSING, Field, asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml

CONF_DIR_ENV = "REFINEX_CONF_DIR"
"""Environment variable naming the folder of profiles (default: ``conf/`` of the repository)."""

DEFAULT_PROFILE = "default"

DELTA_LOCAL = "local"
DELTA_CLUSTER = "cluster"
DELTA_MODES = (DELTA_LOCAL, DELTA_CLUSTER)

JAR_RESOLVERS = ("auto", "spark", "maven")
INPUT_FORMATS = ("auto", "jsonl", "parquet")
REFINE_BACKENDS = ("transformers", "vllm", "openai")


class ConfigError(ValueError):
    """A profile or override is missing, malformed or out of range."""


@dataclass(frozen=True)
class SparkConfig:
    """How the Spark session is built (see ``refinex.spark.session``)."""

    master: Optional[str] = "local[*]"
    app_name: str = "refinex"
    shuffle_partitions: int = 8
    arrow_max_records_per_batch: int = 128
    ui_enabled: bool = True
    console_progress: bool = True
    log_level: str = "WARN"
    delta: str = DELTA_LOCAL
    jar_resolver: str = "auto"
    conf: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        if self.delta not in DELTA_MODES:
            raise ConfigError(f"spark.delta must be one of {DELTA_MODES}, got {self.delta!r}")
        if self.jar_resolver not in JAR_RESOLVERS:
            raise ConfigError(f"spark.jar_resolver must be one of {JAR_RESOLVERS}, got {self.jar_resolver!r}")
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

    base: str = "tiny"
    tokenizer_corpus_docs: int = 1000
    tracking_uri: Optional[str] = None
    experiment: str = "refinex-train"
    registered_name: str = "refinex-refiner"
    champion_alias: str = "champion"
    eval_chunks: int = 32

    def validate(self) -> None:
        if not isinstance(self.eval_chunks, int) or self.eval_chunks < 0:
            raise ConfigError(f"model.eval_chunks must be >= 0, got {self.eval_chunks!r}")
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

    def validate(self) -> None:
        if not 0.0 <= float(self.validation_fraction) <= 1.0:
            raise ConfigError(f"sft.validation_fraction must be in [0, 1], got {self.validation_fraction}")


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


def _validate_train(settings: Mapping[str, Any]) -> None:
    from refinex.model.train import TrainConfig

    try:
        TrainConfig.from_dict(settings)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"train: {exc}") from exc


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
    refine: RefineConfig = field(default_factory=RefineConfig)

    def validate(self) -> "Config":
        for section in (
            self.spark, self.ingest, self.expert, self.guardrails, self.chunking, self.apply,
            self.model, self.sft, self.refine,
        ):
            section.validate()
        _validate_train(self.train)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON/YAML serialisable)."""
        return asdict(self)

    def with_overrides(self, overrides: Mapping[str, Any]) -> "Config":
        """A copy with dotted ``section.key`` overrides applied (values already typed)."""
        data = self.to_dict()
        for dotted, value in overrides.items():
            _set_dotted(data, dotted, value)
        return config_from_dict(data)


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def conf_dir() -> Path:
    """The folder holding the YAML profiles."""
    env = os.environ.get(CONF_DIR_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "conf"


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a profile must be a mapping, got {type(data).__name__}")
    return data


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict) and key not in ("conf", "options"):
            merged[key] = _deep_merge(merged[key], value)
        elif isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _build(cls: type, data: Mapping[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown key(s) in {where or 'config'}: {', '.join(unknown)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        default = _field_default(known[name])
        label = f"{where}.{name}" if where else name
        if is_dataclass(default):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{label} must be a mapping")
            kwargs[name] = _build(type(default), value, label)
        elif isinstance(default, dict):
            if value is None:
                value = {}
            if not isinstance(value, Mapping):
                raise ConfigError(f"{label} must be a mapping")
            kwargs[name] = dict(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _field_default(f: Field[Any]) -> Any:
    if f.default_factory is not MISSING:
        return f.default_factory()
    return f.default


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """A validated :class:`Config` from a plain mapping (unknown keys are errors)."""
    config: Config = _build(Config, data, "")
    if config.spark.conf:
        config = _replace_spark_conf(config, {str(k): _conf_value(v) for k, v in config.spark.conf.items()})
    return config.validate()


def _conf_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _replace_spark_conf(config: Config, conf: dict[str, str]) -> Config:
    return replace(config, spark=replace(config.spark, conf=conf))


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if len(parts) < 2 and parts[0] not in ("workdir", "profile"):
        raise ConfigError(f"override {dotted!r}: expected section.key")
    node = data
    for index, part in enumerate(parts[:-1]):
        if part not in node:
            raise ConfigError(f"override {dotted!r}: unknown key {part!r}")
        if not isinstance(node[part], dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        if part in ("conf", "options") and index < len(parts) - 2:
            # keys of free-form maps may themselves contain dots (spark.sql.x)
            node[part][".".join(parts[index + 1 :])] = value
            return
        node = node[part]
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"section.key=value"`` -> ``("section.key", value)`` with the value parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: bad value: {exc}") from exc
    return key, value


def resolve_profile(profile_or_path: Optional[str]) -> Path:
    """The YAML file of a profile name (``conf/<name>.yaml``) or an explicit path."""
    name = profile_or_path or DEFAULT_PROFILE
    candidate = Path(name).expanduser()
    if candidate.suffix in (".yaml", ".yml") or "/" in name or os.sep in name:
        if not candidate.is_file():
            raise ConfigError(f"config file not found: {candidate}")
        return candidate
    path = conf_dir() / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in conf_dir().glob("*.yaml"))
        raise ConfigError(f"unknown profile {name!r} (available: {', '.join(available)})")
    return path


def load_config(
    profile_or_path: Optional[str] = None,
    overrides: Optional[Mapping[str, Any] | Sequence[str]] = None,
) -> Config:
    """Defaults, then ``conf/default.yaml``, then the profile, then the overrides.

    ``overrides`` is a mapping of dotted keys to typed values, or a sequence of
    ``section.key=value`` strings.
    """
    data = Config().to_dict()
    default_file = conf_dir() / f"{DEFAULT_PROFILE}.yaml"
    if default_file.is_file():
        data = _deep_merge(data, _read_yaml(default_file))
    path = resolve_profile(profile_or_path)
    if path.resolve() != default_file.resolve():
        data = _deep_merge(data, _read_yaml(path))
    data["profile"] = path.stem
    config = config_from_dict(data)
    if overrides:
        if _is_str_seq(overrides):
            pairs = dict(parse_override(o) for o in overrides)  # type: ignore[union-attr]
        else:
            pairs = dict(overrides)  # type: ignore[arg-type]
        config = config.with_overrides(pairs)
    return config


def _is_str_seq(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


def dump_config(config: Config) -> str:
    """The configuration as YAML (what a run actually used)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
