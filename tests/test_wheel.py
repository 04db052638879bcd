"""The wheel carries what it needs: built from a clean copy of the sources, installed with
``--no-deps`` into a fresh venv that sees the current environment's dependencies but not
the editable refinex, it answers ``refinex --help``, loads every profile, the prompt and
the base cards from its own package data (cwd outside the repository, no
``$REFINEX_CONF_DIR``), and its metadata keeps pyspark, delta-spark and mlflow behind the
``local`` extra (a cluster's runtime provides them)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("setup.py", "setup.cfg", "pyproject.toml", "MANIFEST.in", "requirements.lock", "README.md", "refinex", "conf")
PROFILES = ("default", "test", "gpu", "databricks", "dataproc")
RUNTIME = ("pyspark", "delta-spark", "mlflow")

_CHECK = r"""
import json, sys
from pathlib import Path
import refinex
from refinex.config import conf_dir, load_config
from refinex.experts.llm import DEFAULT_CONFIG_PATH, load_prompt, resolve_conf_path
from refinex.model.bases import list_profiles, load_profile

profiles = {name: load_config(name).profile for name in sys.argv[1:]}
prompt = load_prompt()
cards = {name: load_profile(name).name for name in list_profiles()}
print(json.dumps({
    "refinex": refinex.__file__,
    "conf_dir": str(conf_dir()),
    "profiles": profiles,
    "prompt": prompt.version,
    "llm_config": str(resolve_conf_path(DEFAULT_CONFIG_PATH)),
    "cards": cards,
    "databricks_registry": load_config("databricks").model.registry_uri,
}))
"""

_REQUIRES = r"""
import importlib.metadata, json
from packaging.requirements import Requirement
out = []
for text in importlib.metadata.requires("refinex") or []:
    req = Requirement(text)
    extras = [e for e in ("", "local", "dev", "vllm") if req.marker is None or req.marker.evaluate({"extra": e})]
    out.append({"name": req.name.lower(), "specifier": str(req.specifier), "extras": extras})
print(json.dumps(out))
"""


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _lock() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, version = line.split("==", 1)
            pins[name.strip().lower().replace("_", "-")] = version.split(";")[0].strip()
    return pins


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The wheel built from a copy of the sources and a fresh venv with it installed."""
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    root = tmp_path_factory.mktemp("wheel")
    src, dist, venv, outside = root / "src", root / "dist", root / "venv", root / "elsewhere"
    src.mkdir()
    outside.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        elif path.is_file():
            shutil.copy2(path, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "REFINEX_CONF_DIR", "REFINEX_CONFIG")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    # No build isolation: the current environment's setuptools builds it (nothing downloaded).
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), "."], src, env)
    wheels = sorted(dist.glob("refinex-*.whl"))
    assert len(wheels) == 1, wheels
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], root, env)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheels[0])],
         root, env)
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     outside, env).stdout.strip())
    # The current environment's packages as plain path lines: appended to sys.path, while
    # the .pth files in there (the editable refinex among them) are not processed.
    ours = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (site / "zz_refinex_test_deps.pth").write_text("".join(f"{path}\n" for path in ours), encoding="utf-8")
    return {"wheel": wheels[0], "venv": venv, "python": python, "site": site, "outside": outside,
            "env": env}  # type: ignore[dict-item]


def test_wheel_ships_conf(installed: dict[str, Path]) -> None:
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    expected = {f"refinex/conf/{p.relative_to(REPO / 'conf')}" for p in (REPO / "conf").rglob("*")
                if p.is_file() and p.suffix in (".yaml", ".txt")}
    assert expected and expected <= names, sorted(expected - names)
    assert {"refinex/conf/databricks.yaml", "refinex/conf/prompts/refine_v1.txt", "refinex/conf/model/tiny.yaml",
            "refinex/conf/experts/llm.yaml", "refinex/sql/views.sql"} <= names
    assert not any(name.startswith(("conf/", "tests/")) for name in names)


def test_console_script_answers(installed: dict[str, Path]) -> None:
    done = _run([str(installed["venv"] / "bin" / "refinex"), "--help"], installed["outside"], installed["env"])  # type: ignore[arg-type]
    assert "pipeline" in done.stdout and "Usage" in done.stdout


def test_installed_wheel_loads_profiles_and_prompt_from_its_package_data(installed: dict[str, Path]) -> None:
    done = _run([str(installed["python"]), "-c", _CHECK, *PROFILES], installed["outside"], installed["env"])  # type: ignore[arg-type]
    info = json.loads(done.stdout.strip().splitlines()[-1])
    venv = installed["venv"].resolve()
    assert Path(info["refinex"]).resolve().is_relative_to(venv), info["refinex"]
    assert Path(info["conf_dir"]).resolve() == (installed["site"] / "refinex" / "conf").resolve()
    assert info["profiles"] == {name: name for name in PROFILES}
    assert info["prompt"].startswith("refine_v1-")
    assert Path(info["llm_config"]).resolve().is_relative_to(venv)
    assert {"tiny", "smollm2-135m", "qwen3-0.6b-base"} <= set(info["cards"])
    assert info["databricks_registry"] == "databricks-uc"


def test_runtime_packages_only_behind_the_local_extra(installed: dict[str, Path]) -> None:
    done = _run([str(installed["python"]), "-c", _REQUIRES], installed["outside"], installed["env"])  # type: ignore[arg-type]
    requires = json.loads(done.stdout.strip().splitlines()[-1])
    pins = _lock()
    for name in RUNTIME:
        entries = [r for r in requires if r["name"] == name]
        assert entries, f"{name} is not in the metadata"
        assert all(r["extras"] == ["local"] for r in entries), entries
        assert [r["specifier"] for r in entries] == [f"=={pins[name]}"]
    base = {r["name"] for r in requires if "" in r["extras"]}
    assert base and not base & set(RUNTIME)
    # every version in the metadata is the lock's
    for r in requires:
        if r["specifier"].startswith("=="):
            assert r["specifier"] == f"=={pins[r['name']]}", r
