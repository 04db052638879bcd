"""The one place that finds Delta Lake's jars for a local Spark session.

Delta's Python package (``delta-spark``) ships no jars. Two resolvers fetch the same
artifacts from Maven Central into a cache folder (``~/.cache/refinex/jars`` or
``$REFINEX_JAR_CACHE``):

1. **Spark's own resolution** (Ivy), exactly as ``delta.configure_spark_with_delta_pip``
   asks for it: ``spark.jars.packages=io.delta:delta-spark_2.13:<delta-spark version>``.
   For ``delta-spark`` 4.0.1 Ivy pulls ``io.delta:delta-spark_2.13:4.0.1``,
   ``io.delta:delta-storage:4.0.1`` and ``org.antlr:antlr4-runtime:4.13.1`` (Scala and Spark
   themselves are provided by pyspark).
2. **Maven** (``mvn dependency:copy``), when Spark's resolver cannot reach the repository:
   the same artifacts, found by reading the ``compile``/``runtime`` dependencies of each
   POM, minus those Spark provides.

The resolved jars are copied to ``<cache>/delta-spark_2.13-<version>/`` with a
``manifest.json`` written last; a complete folder is used as it is (``spark.jars``), with
no network. ``ensure_delta_jars()`` (``refinex setup``) pre-warms it.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Mapping, Optional
from urllib.parse import unquote, urlparse

log = logging.getLogger(__name__)

JAR_CACHE_ENV = "REFINEX_JAR_CACHE"
SCALA_BINARY_VERSION = "2.13"
DELTA_GROUP = "io.delta"
DELTA_ARTIFACT = f"delta-spark_{SCALA_BINARY_VERSION}"
MAVEN_DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.6.1"
PROVIDED_GROUPS = ("org.scala-lang", "org.apache.spark")
"""Dependencies Spark itself puts on the classpath: never fetched."""

MANIFEST = "manifest.json"
RESOLVER_SPARK = "spark"
RESOLVER_MAVEN = "maven"
_POM_NS = {"m": "http://maven.apache.org/POM/4.0.0"}
_RESOLVE_TIMEOUT_S = 600


class DeltaJarsError(RuntimeError):
    """Delta's jars could not be resolved by any resolver."""


@dataclass(frozen=True)
class DeltaJars:
    """Resolved Delta jars in the cache."""

    version: str
    resolver: str  # "spark" (Ivy) or "maven"
    directory: Path
    jars: tuple[Path, ...]
    coordinates: tuple[str, ...]

    @property
    def spark_jars(self) -> str:
        """Value for the ``spark.jars`` property."""
        return ",".join(str(p) for p in self.jars)


def delta_version() -> str:
    """Version of the installed ``delta-spark`` Python package (= the jars' version)."""
    try:
        return version("delta-spark")
    except PackageNotFoundError as exc:  # pragma: no cover - delta-spark is a hard dependency
        raise DeltaJarsError("the delta-spark Python package is not installed") from exc


def delta_coordinate(delta: Optional[str] = None) -> str:
    """``io.delta:delta-spark_2.13:<version>``, as ``configure_spark_with_delta_pip`` writes it."""
    return f"{DELTA_GROUP}:{DELTA_ARTIFACT}:{delta or delta_version()}"


def jar_cache_dir() -> Path:
    """Root of the jar cache (``$REFINEX_JAR_CACHE`` or ``~/.cache/refinex/jars``)."""
    env = os.environ.get(JAR_CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "refinex" / "jars"


def ivy_home(cache: Optional[Path] = None) -> Path:
    """Ivy's home for Spark's resolver (``spark.jars.ivy``), inside the jar cache."""
    return (cache or jar_cache_dir()) / "ivy"


def _delta_dir(cache: Path, delta: str) -> Path:
    return cache / f"{DELTA_ARTIFACT}-{delta}"


def cached_delta_jars(delta: Optional[str] = None, cache: Optional[Path] = None) -> Optional[DeltaJars]:
    """The cached jars of this Delta version when the cache folder is complete, else None."""
    delta = delta or delta_version()
    folder = _delta_dir(cache or jar_cache_dir(), delta)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        jars = tuple(folder / name for name in data["jars"])
        if data.get("version") != delta or not jars or not all(p.is_file() for p in jars):
            return None
        return DeltaJars(delta, str(data["resolver"]), folder, jars, tuple(data.get("coordinates", ())))
    except (ValueError, KeyError, TypeError):
        return None


def _staging_dir(cache: Path) -> Path:
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=cache))
    staging.chmod(0o755)
    return staging


def _publish(staging: Path, folder: Path, delta: str, resolver: str, coordinates: list[str]) -> DeltaJars:
    """Write the manifest and move the staging folder into place (atomic for readers)."""
    jars = sorted(p.name for p in staging.glob("*.jar"))
    (staging / MANIFEST).write_text(
        json.dumps({"version": delta, "resolver": resolver, "coordinates": coordinates, "jars": jars}, indent=2),
        encoding="utf-8",
    )
    if folder.exists():
        shutil.rmtree(folder, ignore_errors=True)
    try:
        os.replace(staging, folder)
    except OSError:
        # Another process published the same folder first; use theirs if complete.
        shutil.rmtree(staging, ignore_errors=True)
    result = cached_delta_jars(delta, folder.parent)
    if result is None:
        raise DeltaJarsError(f"could not publish Delta jars into {folder}")
    return result


def _jar_conf(spark_conf: Optional[Mapping[str, str]]) -> dict[str, str]:
    """The resolver-related Spark properties of ``spark_conf`` (``spark.jars.*``)."""
    keep = ("spark.jars.ivySettings", "spark.jars.repositories", "spark.jars.excludes")
    return {k: v for k, v in (spark_conf or {}).items() if k in keep}


def resolve_with_spark(
    delta: Optional[str] = None,
    cache: Optional[Path] = None,
    spark_conf: Optional[Mapping[str, str]] = None,
) -> DeltaJars:
    """Spark's own Ivy resolution of ``delta-spark``, run in a short-lived JVM, into the cache.

    The JVM is Spark's launcher (``spark-submit``, as pyspark starts it) with the property
    that ``configure_spark_with_delta_pip`` sets; after resolving it reports the jar list
    (``spark.jars``) and is shut down.
    """
    from pyspark import SparkConf
    from pyspark.java_gateway import launch_gateway

    delta = delta or delta_version()
    cache = cache or jar_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    coordinate = delta_coordinate(delta)
    conf = SparkConf(loadDefaults=False)
    conf.set("spark.jars.packages", coordinate)
    conf.set("spark.jars.ivy", str(ivy_home(cache)))
    for key, value in _jar_conf(spark_conf).items():
        conf.set(key, value)
    env_port = os.environ.pop("PYSPARK_GATEWAY_PORT", None)
    env_secret = os.environ.pop("PYSPARK_GATEWAY_SECRET", None)
    with tempfile.TemporaryFile(mode="w+b") as output:
        try:
            gateway = launch_gateway(conf, popen_kwargs={"stdout": output, "stderr": subprocess.STDOUT})
        except Exception as exc:
            output.seek(0)
            tail = output.read().decode("utf-8", "replace")[-2000:]
            raise DeltaJarsError(f"Spark's resolver could not fetch {coordinate}: {exc}\n{tail}") from exc
        finally:
            if env_port is not None:
                os.environ["PYSPARK_GATEWAY_PORT"] = env_port
            if env_secret is not None:
                os.environ["PYSPARK_GATEWAY_SECRET"] = env_secret
        try:
            resolved = str(gateway.jvm.java.lang.System.getProperty("spark.jars") or "")
        finally:
            _stop_gateway(gateway)
    paths = [Path(unquote(urlparse(u).path)) for u in resolved.split(",") if u.strip()]
    if not paths or not all(p.is_file() for p in paths):
        raise DeltaJarsError(f"Spark's resolver reported no usable jars for {coordinate}: {resolved!r}")
    staging = _staging_dir(cache)
    for path in paths:
        shutil.copy2(path, staging / path.name)
    return _publish(staging, _delta_dir(cache, delta), delta, RESOLVER_SPARK, [coordinate])


def _stop_gateway(gateway: object) -> None:
    proc = getattr(gateway, "proc", None)
    try:
        gateway.shutdown()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - best effort: the JVM may be gone already
        pass
    if proc is not None:
        try:
            if proc.stdin:
                proc.stdin.close()  # PythonGatewayServer exits when its stdin closes
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _pom_dependencies(pom: Path) -> list[str]:
    """``group:artifact:version`` of the compile/runtime dependencies Spark does not provide."""
    root = ET.parse(pom).getroot()
    deps: list[str] = []
    for dep in root.findall("m:dependencies/m:dependency", _POM_NS):
        group = (dep.findtext("m:groupId", "", _POM_NS) or "").strip()
        artifact = (dep.findtext("m:artifactId", "", _POM_NS) or "").strip()
        ver = (dep.findtext("m:version", "", _POM_NS) or "").strip()
        scope = (dep.findtext("m:scope", "compile", _POM_NS) or "compile").strip()
        optional = (dep.findtext("m:optional", "false", _POM_NS) or "false").strip() == "true"
        classifier = dep.findtext("m:classifier", None, _POM_NS)
        if scope not in ("compile", "runtime") or optional or classifier or group in PROVIDED_GROUPS:
            continue
        if not ver or "${" in ver:
            raise DeltaJarsError(f"{pom.name}: cannot resolve the version of {group}:{artifact} ({ver!r})")
        deps.append(f"{group}:{artifact}:{ver}")
    return deps


def _mvn_copy(mvn: str, coordinate: str, out_dir: Path, repo: Path) -> None:
    cmd = [
        mvn, "-B", "-q", f"-Dmaven.repo.local={repo}",
        f"{MAVEN_DEPENDENCY_PLUGIN}:copy", f"-Dartifact={coordinate}:jar",
        f"-DoutputDirectory={out_dir}", "-Dmdep.overWriteReleases=true",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_RESOLVE_TIMEOUT_S, check=False)
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr)[-2000:]
        raise DeltaJarsError(f"mvn dependency:copy {coordinate} failed ({proc.returncode}):\n{output}")


def resolve_with_maven(delta: Optional[str] = None, cache: Optional[Path] = None) -> DeltaJars:
    """Fetch ``delta-spark_2.13`` and its runtime dependencies with ``mvn dependency:copy``."""
    mvn = shutil.which("mvn")
    if mvn is None:
        raise DeltaJarsError("mvn is not on PATH")
    delta = delta or delta_version()
    cache = cache or jar_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    staging = _staging_dir(cache)
    todo = [delta_coordinate(delta)]
    done: list[str] = []
    try:
        while todo:
            coordinate = todo.pop(0)
            if coordinate in done:
                continue
            _mvn_copy(mvn, coordinate, staging, cache / "m2")
            done.append(coordinate)
            group, artifact, ver = coordinate.split(":")
            # Resolving the jar put its POM in the local repository (standard Maven layout).
            pom = cache / "m2" / Path(*group.split(".")) / artifact / ver / f"{artifact}-{ver}.pom"
            if not pom.is_file():
                raise DeltaJarsError(f"mvn resolved {coordinate} but its POM is missing: {pom}")
            todo.extend(d for d in _pom_dependencies(pom) if d not in done)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return _publish(staging, _delta_dir(cache, delta), delta, RESOLVER_MAVEN, done)


def ensure_delta_jars(
    resolver: str = "auto",
    spark_conf: Optional[Mapping[str, str]] = None,
    force: bool = False,
) -> DeltaJars:
    """Delta's jars in the cache, resolving them first if needed.

    ``resolver``: ``auto`` (Spark's Ivy, then Maven), ``spark`` or ``maven``. ``force``
    re-resolves even when the cache is complete.
    """
    if resolver not in ("auto", RESOLVER_SPARK, RESOLVER_MAVEN):
        raise ValueError(f"unknown resolver {resolver!r}")
    delta = delta_version()
    cache = jar_cache_dir()
    if not force:
        cached = cached_delta_jars(delta, cache)
        if cached is not None and resolver in ("auto", cached.resolver):
            return cached
    errors: list[str] = []
    if resolver in ("auto", RESOLVER_SPARK):
        try:
            return resolve_with_spark(delta, cache, spark_conf)
        except DeltaJarsError as exc:
            if resolver == RESOLVER_SPARK:
                raise
            log.warning("Spark's resolver failed, falling back to mvn: %s", str(exc).splitlines()[0])
            errors.append(str(exc))
    try:
        return resolve_with_maven(delta, cache)
    except (DeltaJarsError, OSError, subprocess.SubprocessError) as exc:
        errors.append(str(exc))
    raise DeltaJarsError("could not resolve Delta's jars:\n" + "\n".join(errors))
