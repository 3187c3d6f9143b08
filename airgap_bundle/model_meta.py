"""Provenance of an imported model directory (``airgap_model.json``): name, licence, source."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

MODEL_INFO_FILE = "airgap_model.json"

# GGUF general.license values as seen in the wild -> SPDX identifiers.
_SPDX = {
    "apache-2.0": "Apache-2.0",
    "mit": "MIT",
    "llama2": "LicenseRef-llama2",
    "llama3": "LicenseRef-llama3",
    "llama3.1": "LicenseRef-llama3.1",
    "gemma": "LicenseRef-gemma",
    "cc-by-4.0": "CC-BY-4.0",
    "cc-by-sa-4.0": "CC-BY-SA-4.0",
    "bsd-3-clause": "BSD-3-Clause",
}
_QUANT_SUFFIX = re.compile(r"[.-](I?Q\d\w*|F16|F32|BF16)$", re.IGNORECASE)


def spdx_license(raw: str) -> str:
    """SPDX id for a licence string; "NOASSERTION" when empty."""
    raw = raw.strip()
    if not raw:
        return "NOASSERTION"
    return _SPDX.get(raw.lower(), raw)


def model_name_from_file(file_name: str) -> str:
    """"SmolLM2-135M-Instruct.Q4_1.gguf" -> "SmolLM2-135M-Instruct"."""
    stem = file_name[: -len(".gguf")] if file_name.lower().endswith(".gguf") else file_name
    return _QUANT_SUFFIX.sub("", stem)


def read_model_info(model_dir: Path) -> dict[str, Any]:
    """The provenance file written by the importers, or {} when absent or unreadable."""
    path = Path(model_dir) / MODEL_INFO_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
