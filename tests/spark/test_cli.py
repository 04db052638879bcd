"""The refinex command: help on every command, errors as one line (no Spark)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from refinex.cli import app

COMMANDS = ["pipeline", "ingest", "expert", "distill", "apply", "stats", "export", "setup"]


@pytest.mark.parametrize("command", [[], *[[c] for c in COMMANDS]])
def test_help(command: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_pipeline_help_lists_the_relied_upon_options() -> None:
    output = CliRunner().invoke(app, ["pipeline", "--help"]).output
    for option in ("--input", "--workdir", "--limit", "--config"):
        assert option in output
    output = CliRunner().invoke(app, ["export", "--help"]).output
    for option in ("--workdir", "--output", "--origin", "--origin-version"):
        assert option in output


def test_bad_profile_is_a_one_line_error(tmp_path: object) -> None:
    result = CliRunner().invoke(app, ["stats", "--workdir", str(tmp_path), "--config", "no-such-profile"])
    assert result.exit_code == 1
    assert "unknown profile" in result.output


def test_python_dash_m() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "refinex", "--help"], capture_output=True, text=True, timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 0 and "pipeline" in proc.stdout
