"""Profiles: every file in conf/ loads, broken ones fail naming the key and the file (or the
--set override), the shipped conf/ is found, and model.registry_uri reaches MLflow's clients."""
from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import pytest
import yaml

from refinex.config import (
    CONF_DIR_ENV,
    ConfigError,
    conf_dir,
    find_conf_file,
    load_config,
)

REPO_CONF = Path(__file__).resolve().parents[2] / "conf"
PROFILES = sorted(p.stem for p in REPO_CONF.glob("*.yaml"))


@pytest.fixture(autouse=True)
def _shipped_conf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONF_DIR_ENV, raising=False)
    monkeypatch.delenv("REFINEX_CONFIG", raising=False)


# --- the shipped profiles --------------------------------------------------------------------


def test_conf_dir_is_the_repository_conf_in_a_checkout() -> None:
    assert conf_dir().resolve() == REPO_CONF.resolve()
    assert {"default", "test", "gpu", "databricks", "dataproc"} <= set(PROFILES)


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_parses(profile: str) -> None:
    config = load_config(profile)
    assert config.profile == profile
    # the same file loaded by path gives the same configuration
    assert load_config(str(REPO_CONF / f"{profile}.yaml")) == config


def test_model_cards_and_expert_settings_parse() -> None:
    from refinex.model.bases import conf_dir as bases_conf_dir
    from refinex.model.bases import list_profiles, load_profile

    assert bases_conf_dir() == conf_dir()
    cards = list_profiles()
    assert {"tiny", "smollm2-135m", "qwen3-0.6b-base"} <= set(cards)
    for name in cards:
        assert load_profile(name).name == name
    for path in sorted((REPO_CONF / "experts").glob("*.yaml")):
        assert isinstance(yaml.safe_load(path.read_text(encoding="utf-8")), dict), path


def test_where_the_cluster_profiles_put_tables_and_models() -> None:
    databricks = load_config("databricks")
    assert (databricks.tables.catalog, databricks.tables.schema) == ("main", "refinex")
    assert databricks.model.tracking_uri == "databricks"
    assert databricks.model.registry_uri == "databricks-uc"
    assert databricks.model.registered_name == "main.refinex.refinex_refiner"
    assert databricks.workdir == "dbfs:/Volumes/main/refinex/work"
    dataproc = load_config("dataproc")
    assert dataproc.workdir is not None and dataproc.workdir.startswith("gs://")
    assert dataproc.tables.catalog is None and dataproc.tables.register is True
    assert dataproc.spark.delta == "cluster"
    default = load_config()
    assert default.model.registry_uri is None and default.tables.catalog is None


def test_prompt_and_expert_files_resolve_through_conf_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from refinex.experts.llm import DEFAULT_CONFIG_PATH, DEFAULT_PROMPT_PATH, load_prompt, resolve_conf_path

    monkeypatch.chdir(tmp_path)  # no conf/ here: the shipped one is used
    assert resolve_conf_path(DEFAULT_PROMPT_PATH) == REPO_CONF / "prompts" / "refine_v1.txt"
    assert resolve_conf_path(DEFAULT_CONFIG_PATH) == REPO_CONF / "experts" / "llm.yaml"
    assert load_prompt().version.startswith("refine_v1-")
    # $REFINEX_CONF_DIR wins for the files it has; the others come from the shipped conf/
    mine = tmp_path / "myconf"
    (mine / "prompts").mkdir(parents=True)
    (mine / "prompts" / "refine_v1.txt").write_text("Delete the boilerplate lines.\n")
    shutil.copy(REPO_CONF / "default.yaml", mine / "default.yaml")
    (mine / "site.yaml").write_text("ingest:\n  n_shards: 3\n")
    monkeypatch.setenv(CONF_DIR_ENV, str(mine))
    assert conf_dir() == mine
    assert load_config("site").ingest.n_shards == 3
    with pytest.raises(ConfigError, match="available: default, site"):
        load_config("databricks")
    assert resolve_conf_path(DEFAULT_PROMPT_PATH) == mine / "prompts" / "refine_v1.txt"
    assert find_conf_file("experts", "llm.yaml") == REPO_CONF / "experts" / "llm.yaml"


# --- broken profiles: the key and the file ---------------------------------------------------


def _broken(tmp_path: Path, section: str, key: str, value: Any, name: str = "broken") -> Path:
    """conf/test.yaml with ``section.key`` set to ``value``, written to tmp_path."""
    data = yaml.safe_load((REPO_CONF / "test.yaml").read_text(encoding="utf-8"))
    data.setdefault(section, {})[key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _error(target: str, overrides: Optional[list[str]] = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(target, overrides)
    return str(info.value)


@pytest.mark.parametrize(
    ("section", "key", "value", "problem"),
    [
        # unknown keys
        ("spark", "shuffle_partition", 3, "unknown key (did you mean 'shuffle_partitions'?"),
        ("train", "epoch", 3, "unknown key (did you mean 'epochs'?"),
        # wrong types
        ("spark", "shuffle_partitions", "eight", "expected an integer or null, got the string 'eight'"),
        ("spark", "ui_enabled", "yes", "expected true or false, got the string 'yes'"),
        ("ingest", "n_shards", 2.5, "expected an integer, got the number 2.5"),
        ("guardrails", "max_error_ratio", "half", "expected a number, got the string 'half'"),
        ("model", "registry_uri", 5, "expected a string or null, got the integer 5"),
        ("expert", "options", "fast", "must be a mapping, got the string 'fast'"),
        ("train", "max_steps", "three", "expected an integer or null, got the string 'three'"),
        # missing values
        ("spark", "app_name", None, "missing value (expected a string)"),
        ("ingest", "n_shards", None, "missing value (expected an integer)"),
        # invalid values
        ("spark", "delta", "elsewhere", "must be one of ('local', 'cluster'), got 'elsewhere'"),
        ("ingest", "n_shards", 0, "must be a positive integer, got 0"),
        ("guardrails", "max_error_ratio", 2, "must be in [0, 1]"),
        ("tables", "catalog", "my-catalog", "must be a SQL identifier"),
        ("refine", "backend", "onnx", "must be one of"),
        ("train", "truncation", "middle", "must be one of ('skip', 'left'), got 'middle'"),
    ],
)
def test_broken_profile_names_the_file_and_the_key(
    tmp_path: Path, section: str, key: str, value: Any, problem: str
) -> None:
    path = _broken(tmp_path, section, key, value)
    message = _error(str(path))
    assert message.startswith(f"{path}: {section}.{key}: "), message
    assert problem in message, message


def test_a_section_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "flat.yaml"
    path.write_text("spark: 8\n")
    assert _error(str(path)) == f"{path}: spark: must be a section (a mapping), got the integer 8"
    path.write_text("- spark\n")
    assert _error(str(path)).startswith(f"{path}: a profile must be a mapping")
    path.write_text("nosuch:\n  x: 1\n")
    assert _error(str(path)).startswith(f"{path}: nosuch: unknown key")


def test_an_empty_section_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("model:\nspark:\n  shuffle_partitions: 3\n")
    config = load_config(str(path))
    assert config.model == load_config().model and config.spark.shuffle_partitions == 3


def test_bad_default_value_is_reported_in_default_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file that set the value takes the blame, even when another profile is loaded;
    a profile that sets the key itself replaces the bad value."""
    mine = tmp_path / "conf"
    shutil.copytree(REPO_CONF, mine)
    default = mine / "default.yaml"
    text = default.read_text(encoding="utf-8")
    assert "  max_tokens: 1500\n" in text
    default.write_text(text.replace("  max_tokens: 1500\n", "  max_tokens: lots\n"), encoding="utf-8")
    monkeypatch.setenv(CONF_DIR_ENV, str(mine))
    message = _error("dataproc")  # dataproc.yaml does not set chunking.max_tokens
    assert message == f"{default}: chunking.max_tokens: expected an integer, got the string 'lots'"
    assert load_config("test").chunking.max_tokens == 400  # test.yaml overrides the bad value


# --- overrides: the --set that is wrong --------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "problem"),
    [
        ("ingest.n_shards=0", "ingest.n_shards: must be a positive integer, got 0"),
        ("ingest.n_shards=2.5", "ingest.n_shards: expected an integer, got the number 2.5"),
        ("spark.ui_enabled=maybe", "spark.ui_enabled: expected true or false, got the string 'maybe'"),
        ("ingest.nope=1", "ingest.nope: unknown key"),
        ("nosuchsection.x=1", "nosuchsection: unknown key"),
        ("spark.app_name=null", "spark.app_name: missing value (expected a string)"),
        ("n_shards=3", "n_shards: expected section.key (ingest.n_shards?)"),
        ("n_shards", "expected section.key=value"),
    ],
)
def test_override_error_names_the_override(override: str, problem: str) -> None:
    message = _error("test", ["spark.shuffle_partitions=4", override])
    assert message.startswith(f"--set {override}: {problem}"), message


def test_typed_overrides_name_themselves_as_set() -> None:
    config = load_config("test")
    with pytest.raises(ConfigError) as info:
        config.with_overrides({"ingest.n_shards": "4"})
    assert str(info.value) == "--set ingest.n_shards='4': ingest.n_shards: expected an integer, got the string '4'"
    assert config.with_overrides({"ingest.n_shards": 4, "model.registry_uri": "databricks-uc"}).model.registry_uri == (
        "databricks-uc"
    )


# --- model.registry_uri reaches every MLflow client --------------------------------------------


class _Recorder:
    """Stands in for ``mlflow.MlflowClient``: records the URIs it was made with."""

    made: list[tuple[Optional[str], Optional[str]]] = []

    def __init__(self, tracking_uri: Optional[str] = None, registry_uri: Optional[str] = None) -> None:
        type(self).made.append((tracking_uri, registry_uri))

    def set_registered_model_alias(self, name: str, alias: str, version: str) -> None:
        pass

    def get_model_version_by_alias(self, name: str, alias: str) -> Any:
        return SimpleNamespace(version="2", source="models:/m-abc")

    def get_model_version(self, name: str, version: str) -> Any:
        return SimpleNamespace(version=version, source="models:/m-abc")


@pytest.fixture()
def recorder(monkeypatch: pytest.MonkeyPatch) -> type[_Recorder]:
    mlflow = pytest.importorskip("mlflow")
    import refinex.tracking.mlflow_utils as mlflow_utils

    _Recorder.made = []
    monkeypatch.setattr(mlflow_utils, "MlflowClient", _Recorder)
    monkeypatch.setattr(mlflow, "MlflowClient", _Recorder)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    return _Recorder


def test_tracking_helpers_use_the_registry_uri(recorder: type[_Recorder], tmp_path: Path) -> None:
    from refinex.tracking.mlflow_utils import get_alias_version, set_alias

    tracking, registry = f"sqlite:///{tmp_path / 'runs.db'}", f"sqlite:///{tmp_path / 'registry.db'}"
    set_alias("m", "champion", 1, tracking_uri=tracking, registry_uri=registry)
    assert get_alias_version("m", "champion", tracking_uri=tracking, registry_uri=registry) == "2"
    set_alias("m", "champion", 1, tracking_uri=tracking)  # default: the tracking store's registry
    get_alias_version("m", "champion", workdir=tmp_path)
    assert recorder.made == [
        (tracking, registry), (tracking, registry), (tracking, tracking),
        (f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}",) * 2,
    ]


def test_fluent_registry_uri_is_set_and_restored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mlflow = pytest.importorskip("mlflow")
    from refinex.tracking.mlflow_utils import _tracking_at

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    tracking, registry = f"sqlite:///{tmp_path / 'runs.db'}", f"sqlite:///{tmp_path / 'registry.db'}"
    with _tracking_at(tracking, registry):
        assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == (tracking, registry)
    with _tracking_at(tracking):
        assert mlflow.get_registry_uri() == tracking
    assert "MLFLOW_REGISTRY_URI" not in __import__("os").environ


def test_registry_client_and_promote_registry_use_model_registry_uri(recorder: type[_Recorder], tmp_path: Path) -> None:
    from refinex.spark.promote import RegistryMissing, registry_of
    from refinex.spark.train import registry_client

    tracking, registry = f"sqlite:///{tmp_path / 'runs.db'}", f"sqlite:///{tmp_path / 'registry.db'}"
    registry_client(tracking, registry)
    assert recorder.made == [(tracking, registry)]
    registry_client(tracking)
    assert recorder.made[-1] == (tracking, tracking)  # no registry_uri: the tracking URI
    config = load_config("test", [f"model.tracking_uri={tracking}", f"model.registry_uri={registry}"])
    # promote never creates a store: a missing sqlite file is an error naming it
    with pytest.raises(RegistryMissing, match="runs.db"):
        registry_of(config, str(tmp_path))
    (tmp_path / "runs.db").touch()
    (tmp_path / "registry.db").touch()
    assert registry_of(config, str(tmp_path)) == (tracking, registry)
    with pytest.raises(RegistryMissing, match="is --workdir .*typo"):
        registry_of(load_config("test"), str(tmp_path / "typo"))
    assert not (tmp_path / "typo").exists()


def test_refine_resolves_registry_models_in_the_registry_uri(
    recorder: type[_Recorder], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import refinex.tracking as tracking_pkg
    from refinex.spark.refine import resolve_model

    downloads: list[dict[str, Any]] = []

    def fake_resolve_model_uri(uri: str, dst: Any, **kwargs: Any) -> Path:
        downloads.append({"uri": uri, **kwargs})
        Path(dst).mkdir(parents=True, exist_ok=True)
        return Path(dst)

    monkeypatch.setattr(tracking_pkg, "resolve_model_uri", fake_resolve_model_uri)
    tracking = f"sqlite:///{tmp_path / 'runs.db'}"
    config = load_config("test", [f"model.tracking_uri={tracking}", "model.registry_uri=databricks-uc"])
    resolved = resolve_model(config, str(tmp_path / "work"), "models:/main.refinex.refinex_refiner@champion")
    assert recorder.made == [(tracking, "databricks-uc")]
    assert resolved.version == "2" and resolved.uri == "models:/main.refinex.refinex_refiner/2"
    assert downloads == [{"uri": "models:/main.refinex.refinex_refiner/2", "tracking_uri": tracking,
                          "registry_uri": "databricks-uc"}]
