"""refinex: deletion-only refinement of LLM pre-training corpora (RefineX) on Spark + Delta.

Versions are pinned in one place, ``requirements.lock`` (the whole resolved environment);
this file names the direct dependencies and takes their pins from there.
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


def pinned(*names: str) -> list[str]:
    """``name==version`` for each direct dependency, the version taken from the lock."""
    out = []
    for name in names:
        key = name.lower().replace("_", "-")
        if key not in PINS:
            raise SystemExit(f"{name} is not pinned in requirements.lock")
        out.append(f"{name}=={PINS[key]}")
    return out


setup(
    name="refinex",
    version=re.search(r'__version__ = "([^"]+)"', (HERE / "refinex" / "__init__.py").read_text()).group(1),
    description="Deletion-only refinement programs for LLM pre-training corpora, on Spark + Delta",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.13",
    packages=find_packages(include=["refinex", "refinex.*"]),
    include_package_data=True,
    package_data={"refinex": ["py.typed"]},
    install_requires=pinned(
        "pyspark",
        "delta-spark",
        "pandas",
        "pyarrow",
        "numpy",
        "pyyaml",
        "typer",
        "tqdm",
        "matplotlib",
        "httpx",
        "trafilatura",
        "lxml-html-clean",
        "inscriptis",
        "resiliparse",
        "justext",
        "mlflow",
        "great-expectations",
        "torch",
        "transformers",
        "tokenizers",
        "safetensors",
        "accelerate",
        "gguf",
        "scikit-learn",
        "joblib",
    ),
    extras_require={
        "dev": pinned("pytest", "pytest-timeout", "hypothesis", "chispa"),
        # GPU inference with vLLM; not pinned in the lock (its CUDA build must match the cluster).
        "vllm": ["vllm>=0.8"],
    },
    entry_points={"console_scripts": ["refinex=refinex.cli:main"]},
)
