from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from policies import default_policy_dir


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    """A writable copy of the shipped default policies."""
    dest = tmp_path / "policies"
    shutil.copytree(default_policy_dir(), dest)
    return dest


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
