"""refinex: deletion-only refinement of LLM pre-training corpora (RefineX) on Spark + Delta.

Versions are pinned in one place, ``requirements.lock`` (the whole resolved environment);
this file names the direct dependencies and takes their pins from there.

Installing the wheel on a cluster must not replace what the runtime already provides:

- ``RUNTIME`` (pyspark, delta-spark, mlflow) are the cluster's own (Databricks Runtime;
  Spark and Delta on Dataproc); they are only installed, pinned, by the ``local`` extra.
- ``SHARED`` (numpy, pandas, pyarrow, torch, transformers, ...) come with a Databricks ML
  runtime, built and tested against its Spark and CUDA; the wheel requires them unpinned (a
  version already there is kept), the ``local`` extra pins them.
- everything else is pinned by the wheel itself.

``pip install -c requirements.lock -e ".[dev,local]"`` (scripts/install.sh) gives the
exact locked environment. The profiles, prompts and base cards in ``conf/`` are shipped as
the package data ``refinex.conf`` (``conf/`` stays the one copy, mapped with package_dir).
"""
from __future__ import annotations

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent


def _pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (HERE / "requirements.lock").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line.strip())
        if match:
            pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    return pins


PINS = _pins()


def _lock_key(name: str) -> str:
    key = name.lower().replace("_", "-")
    if key not in PINS:
        raise SystemExit(f"{name} is not pinned in requirements.lock")
    return key


def unpinned(*names: str) -> list[str]:
    """The bare names (each still has to be in the lock, so both lists stay in step)."""
    return [name for name in names if _lock_key(name)]


def pinned(*names: str) -> list[str]:
    """``name==version`` for each direct dependency, the version taken from the lock."""
    return [f"{name}=={PINS[_lock_key(name)]}" for name in names]


# Provided by the cluster runtime; replacing them breaks it. Only in the ``local`` extra.
RUNTIME = ("pyspark", "delta-spark", "mlflow")
# Provided by a Databricks ML runtime (ABI/CUDA-matched): required unpinned, pinned by ``local``.
SHARED = (
    "numpy", "pandas", "pyarrow", "pyyaml", "tqdm", "matplotlib", "scikit-learn", "joblib",
    "torch", "transformers", "tokenizers", "safetensors", "accelerate",
)
# Spark Connect's client (pyspark's ``connect`` extra): a runtime that speaks Connect has it.
CONNECT = ("grpcio", "grpcio-status", "googleapis-common-protos")
# Ours: pinned wherever refinex is installed.
OWN = (
    "typer", "httpx", "trafilatura", "lxml-html-clean", "inscriptis", "resiliparse", "justext",
    "great-expectations", "gguf",
)

# conf/ (repository root) is the package refinex.conf in the wheel.
CONF_PACKAGES = ["refinex.conf", "refinex.conf.experts", "refinex.conf.model", "refinex.conf.prompts"]


setup(
    name="refinex",
    version=re.search(r'__version__ = "([^"]+)"', (HERE / "refinex" / "__init__.py").read_text()).group(1),
    description="Deletion-only refinement programs for LLM pre-training corpora, on Spark + Delta",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.13",
    packages=find_packages(include=["refinex", "refinex.*"]) + CONF_PACKAGES,
    package_dir={"refinex.conf": "conf"},
    include_package_data=True,
    package_data={
        "refinex": ["py.typed", "sql/*.sql"],
        "refinex.conf": ["*.yaml"],
        "refinex.conf.experts": ["*.yaml"],
        "refinex.conf.model": ["*.yaml"],
        "refinex.conf.prompts": ["*.txt"],
    },
    install_requires=pinned(*OWN) + unpinned(*SHARED),
    extras_require={
        # A machine without a cluster runtime: Spark, Delta, MLflow and the ML stack, pinned.
        "local": pinned(*RUNTIME, *SHARED, *CONNECT),
        "dev": pinned("pytest", "pytest-timeout", "hypothesis", "chispa", "databricks-bundles"),
        # GPU inference with vLLM; not pinned in the lock (its CUDA build must match the cluster).
        "vllm": ["vllm>=0.8"],
    },
    entry_points={"console_scripts": ["refinex=refinex.cli:main"]},
)
