"""`python -m engine generate` prints the completion."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.cli import app

pytestmark = pytest.mark.slow


def test_generate_prints_paris(engine_model_dir: Path) -> None:
    result = CliRunner().invoke(
        app, ["generate", "--model", str(engine_model_dir), "--prompt", "What is the capital of France?"]
    )
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "The capital of France is Paris."


def test_generate_bad_model_dir_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["generate", "--model", str(tmp_path), "--prompt", "hi"])
    assert result.exit_code == 2
    assert "config.json" in result.output
