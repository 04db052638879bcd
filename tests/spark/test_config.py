"""Configuration profiles and overrides (no Spark)."""
from __future__ import annotations

from pathlib import Path

import pytest

from refinex.config import Config, ConfigError, dump_config, load_config, parse_override


def test_default_profile_matches_dataclass_defaults() -> None:
    config = load_config()
    defaults = Config()
    assert config.profile == "default"
    assert config.spark == defaults.spark
    assert config.ingest == defaults.ingest
    assert config.expert == defaults.expert
    assert config.guardrails == defaults.guardrails
    assert config.chunking == defaults.chunking
    assert (config.ingest.n_shards, config.ingest.max_text_chars, config.ingest.max_html_chars) == (8, 1_000_000, 10_000_000)
    assert (config.guardrails.max_error_ratio, config.guardrails.min_kept_chars) == (0.5, 50)
    assert config.chunking.max_tokens == 1500 and config.expert.name == "trafilatura"


@pytest.mark.parametrize("profile", ["test", "databricks", "dataproc"])
def test_profiles_load(profile: str) -> None:
    config = load_config(profile)
    assert config.profile == profile
    if profile == "test":
        assert config.spark.master == "local[2]" and config.spark.shuffle_partitions == 2
        assert config.spark.ui_enabled is False
    else:
        assert config.spark.master is None and config.spark.delta == "cluster"
        assert config.workdir and config.workdir.startswith(("dbfs:/Volumes", "gs://"))


def test_overrides_are_typed_and_reach_free_form_maps() -> None:
    config = load_config(
        "test",
        ["ingest.n_shards=4", "guardrails.max_error_ratio=0.25", "spark.conf.spark.sql.ansi.enabled=true",
         "expert.options.favor_precision=true", "workdir=/tmp/somewhere"],
    )
    assert config.ingest.n_shards == 4
    assert config.guardrails.max_error_ratio == 0.25
    assert config.spark.conf["spark.sql.ansi.enabled"] == "true"
    assert config.spark.conf["spark.default.parallelism"] == "2"  # the profile's conf is kept
    assert config.expert.options == {"favor_precision": True}
    assert config.workdir == "/tmp/somewhere"


@pytest.mark.parametrize(
    "override",
    ["ingest.nope=1", "ingest.n_shards=0", "spark.delta=elsewhere", "guardrails.max_error_ratio=2", "nosuchsection.x=1", "n_shards"],
)
def test_bad_overrides_are_errors(override: str) -> None:
    with pytest.raises(ConfigError):
        load_config("test", [override])


def test_yaml_file_profile_and_safe_load(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("expert:\n  name: llm\nspark:\n  shuffle_partitions: 3\n")
    config = load_config(str(path))
    assert config.profile == "mine" and config.expert.name == "llm" and config.spark.shuffle_partitions == 3
    assert config.spark.master == "local[*]"  # defaults still apply
    evil = tmp_path / "evil.yaml"
    evil.write_text("spark: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError):
        load_config(str(evil))
    assert load_config(str(path)) == config
    assert "shuffle_partitions: 3" in dump_config(config)


def test_unknown_profile_lists_available() -> None:
    with pytest.raises(ConfigError, match="available"):
        load_config("no-such-profile")


def test_parse_override() -> None:
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a.b=x=y") == ("a.b", "x=y")
    assert parse_override("a.b=") == ("a.b", "")
    with pytest.raises(ConfigError):
        parse_override("a.b")
