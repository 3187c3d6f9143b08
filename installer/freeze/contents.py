"""What the frozen executable leaves out, and how to check that the installer never needs it.

The installer imports only ``airgap_bundle`` and ``policies`` of ours; ``airgap_bundle`` imports
its heavy dependencies (torch, gguf, transformers, numpy) only inside ``import_gguf``, which the
installer never calls. PyInstaller follows imports inside functions too, so they are excluded
by name here, and ``heavy_modules_loaded()`` proves (in a test) that importing every installer
module does not load any of them.
"""

from __future__ import annotations

import subprocess
import sys

EXCLUDED_MODULES = (
    # ML stack: only the appliance and model import need it
    "torch", "torchvision", "torchaudio", "triton", "transformers", "accelerate", "tokenizers",
    "safetensors", "sentencepiece", "gguf", "numpy", "scipy", "sympy", "networkx", "pandas",
    "matplotlib", "PIL", "google.protobuf",
    # our own packages the installer may not import
    "engine", "appliance",
    # the appliance's web and database stack
    "fastapi", "starlette", "uvicorn", "sqlalchemy", "psycopg", "psycopg2", "openai", "prometheus_client",
    # development tools
    "pytest", "_pytest", "mypy", "ruff", "IPython", "tkinter", "PyInstaller",
)

INSTALLER_MODULES = (
    "installer.cli", "installer.install", "installer.rollback", "installer.service", "installer.uninstall",
    "installer.status", "installer.preflight", "installer.ansible_runner",
)

_PROBE = (
    "import importlib, json, sys\n"
    "for name in sys.argv[2:]:\n"
    "    importlib.import_module(name)\n"
    "heavy = json.loads(sys.argv[1])\n"
    "print(json.dumps(sorted(m for m in sys.modules if any(m == h or m.startswith(h + '.') for h in heavy))))\n"
)


def heavy_modules_loaded(python: str = sys.executable) -> list[str]:
    """Excluded modules that a fresh interpreter has loaded after importing every installer module."""
    import json

    names = sorted(set(EXCLUDED_MODULES) - {"PyInstaller"})
    proc = subprocess.run([python, "-c", _PROBE, json.dumps(names), *INSTALLER_MODULES], capture_output=True,
                          text=True, check=True, timeout=120)
    return list(json.loads(proc.stdout))
