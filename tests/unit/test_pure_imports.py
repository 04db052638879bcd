"""The pure core imports none of the heavy frameworks (Spark, torch, transformers, MLflow).

Each module is imported in a fresh interpreter, so what another test imported before cannot
hide (or cause) a heavy import.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("pyspark", "torch", "transformers", "mlflow")

PURE_MODULES = (
    "refinex.program",
    "refinex.program.ops",
    "refinex.program.parse",
    "refinex.program.render",
    "refinex.program.execute",
    "refinex.chunking",
    "refinex.distill",
    "refinex.distill.units",
    "refinex.distill.plan",
    "refinex.distill.lcs",
    "refinex.distill.align",
    "refinex.distill.solver",
    "refinex.distill.emit",
    "refinex.distill.distillation",
    "refinex.model.voting",
    "refinex.model.tagging",
    "refinex.model.tagging.labels",
    "refinex.model.precision",
    "refinex.model.constrained",
    "refinex.model.constrained.automaton",
    "refinex.model.constrained.tokens",
    "refinex.model.constrained.regex",
    "refinex.model.constrained.confidence",
    "refinex.text",
    "refinex.dom",
    "refinex.model.tiers",
    "refinex.model.fast",
    "refinex.model.fast.features",
    "refinex.evaluation.scores",
    "refinex.evaluation.reliability",
    "refinex.evaluation.summary",
    "refinex.evaluation.plots",
    "refinex.quality.checks",
    "refinex.quality.gates_page",
    "refinex.report.html",
    "refinex.promotion",
    "refinex.versions",
    "refinex.errors",
)

_CHECK = """
import importlib, sys
importlib.import_module(sys.argv[1])
print(",".join(name for name in sys.argv[2:] if name in sys.modules))
"""


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_module_imports_no_heavy_framework(module: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _CHECK, module, *HEAVY], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    heavy = [name for name in done.stdout.strip().split(",") if name]
    assert not heavy, f"importing {module} imports {heavy}"
