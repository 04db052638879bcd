"""Delta jar resolution: cache manifest, POM reading, resolver choice (offline)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from refinex.spark import jars
from refinex.spark.jars import (
    DeltaJarsError,
    _pom_dependencies,
    cached_delta_jars,
    delta_coordinate,
    delta_version,
    ensure_delta_jars,
)

POM = """<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <dependencies>
    <dependency><groupId>org.scala-lang</groupId><artifactId>scala-library</artifactId><version>2.13.13</version></dependency>
    <dependency><groupId>io.delta</groupId><artifactId>delta-storage</artifactId><version>4.0.1</version></dependency>
    <dependency><groupId>org.antlr</groupId><artifactId>antlr4-runtime</artifactId><version>4.13.1</version></dependency>
    <dependency><groupId>org.apache.spark</groupId><artifactId>spark-sql_2.13</artifactId><version>4.0.1</version><scope>provided</scope></dependency>
    <dependency><groupId>junit</groupId><artifactId>junit</artifactId><version>4.13.2</version><scope>test</scope></dependency>
    <dependency><groupId>x</groupId><artifactId>opt</artifactId><version>1</version><optional>true</optional></dependency>
  </dependencies>
</project>
"""


def _fake_cache(root: Path, resolver: str) -> Path:
    folder = root / f"delta-spark_2.13-{delta_version()}"
    folder.mkdir(parents=True)
    names = ["io.delta_delta-spark_2.13.jar", "io.delta_delta-storage.jar"]
    for name in names:
        (folder / name).write_bytes(b"PK")
    manifest = {"version": delta_version(), "resolver": resolver, "coordinates": [delta_coordinate()], "jars": names}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_coordinate_matches_installed_delta() -> None:
    assert delta_coordinate() == f"io.delta:delta-spark_2.13:{delta_version()}"


def test_pom_dependencies_keep_runtime_deps_spark_does_not_provide(tmp_path: Path) -> None:
    pom = tmp_path / "delta-spark.pom"
    pom.write_text(POM)
    assert _pom_dependencies(pom) == ["io.delta:delta-storage:4.0.1", "org.antlr:antlr4-runtime:4.13.1"]


def test_pom_with_unresolved_property_is_an_error(tmp_path: Path) -> None:
    pom = tmp_path / "x.pom"
    pom.write_text(POM.replace("<version>4.13.1</version>", "<version>${antlr.version}</version>"))
    with pytest.raises(DeltaJarsError):
        _pom_dependencies(pom)


def test_complete_cache_is_used_without_resolving(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(jars.JAR_CACHE_ENV, str(tmp_path))
    folder = _fake_cache(tmp_path, "maven")

    def no_network(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("must not resolve")

    monkeypatch.setattr(jars, "resolve_with_spark", no_network)
    monkeypatch.setattr(jars, "resolve_with_maven", no_network)
    found = ensure_delta_jars("auto")
    assert found.directory == folder and found.resolver == "maven" and len(found.jars) == 2
    assert found.spark_jars.split(",") == [str(p) for p in found.jars]


def test_incomplete_cache_is_ignored(tmp_path: Path) -> None:
    folder = _fake_cache(tmp_path, "spark")
    assert cached_delta_jars(cache=tmp_path) is not None
    next(folder.glob("*.jar")).unlink()
    assert cached_delta_jars(cache=tmp_path) is None


def test_auto_falls_back_to_maven_when_spark_resolver_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(jars.JAR_CACHE_ENV, str(tmp_path))
    calls: list[str] = []

    def spark_fails(*_args: object, **_kwargs: object) -> None:
        calls.append("spark")
        raise DeltaJarsError("repository unreachable")

    def maven_works(delta: str, cache: Path) -> jars.DeltaJars:
        calls.append("maven")
        _fake_cache(cache, "maven")
        found = cached_delta_jars(delta, cache)
        assert found is not None
        return found

    monkeypatch.setattr(jars, "resolve_with_spark", spark_fails)
    monkeypatch.setattr(jars, "resolve_with_maven", maven_works)
    assert ensure_delta_jars("auto").resolver == "maven"
    assert calls == ["spark", "maven"]
    with pytest.raises(DeltaJarsError):
        ensure_delta_jars("spark", force=True)
    with pytest.raises(ValueError):
        ensure_delta_jars("gradle")
