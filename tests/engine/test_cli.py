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


def test_serve_refuses_a_readable_key_and_missing_ca(tmp_path: Path) -> None:
    from tests.engine.tls_certs import make_tls_set

    tls = make_tls_set(tmp_path)
    args = ["serve", "--model", str(tmp_path), "--tls-cert", str(tls.server.cert), "--tls-key",
            str(tls.server.key), "--port", "18999"]
    tls.server.key.chmod(0o644)
    result = CliRunner().invoke(app, [*args, "--client-ca", str(tls.ca)])
    assert result.exit_code == 2 and "expected file mode 0600" in result.output
    tls.server.key.chmod(0o600)
    result = CliRunner().invoke(app, [*args, "--client-ca", str(tmp_path / "missing.crt")])
    assert result.exit_code == 2 and "client_ca: expected a PEM file" in result.output
