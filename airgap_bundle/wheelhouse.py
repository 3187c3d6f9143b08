"""A wheelhouse for the target nodes, made with ``pip download`` on the vendor side of the gap.

Only wheels (``--only-binary=:all:``) for a named platform and Python version: nothing on the
far side of the air gap may need a compiler or the network, so a requirement that exists only
as a source distribution makes the download fail here, not during the install. The directory
this writes is what ``build_bundle(..., wheelhouse=DIR)`` signs and lists in the SBOM.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import BuildError
from .sbom import parse_wheel_name

DEFAULT_TIMEOUT_S = 1800


@dataclass(frozen=True)
class WheelTarget:
    """The interpreter and platform the wheels must install on, as ``pip download`` names them."""

    platform: str = "manylinux2014_x86_64"
    python_version: str = "3.11"
    implementation: str = "cp"

    def __post_init__(self) -> None:
        for name in ("platform", "python_version", "implementation"):
            value = getattr(self, name)
            if not value or any(c.isspace() for c in value) or value.startswith("-"):
                raise ValueError(f"{name} must be a non-empty word, got {value!r}")


def pip_download_command(requirements: Sequence[str], out: Path, target: WheelTarget, *,
                         requirement_files: Sequence[Path] = (), find_links: Sequence[Path] = (),
                         no_index: bool = False) -> list[str]:
    """The exact ``pip download`` command line (run with this interpreter's pip)."""
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-input",
           "--only-binary=:all:", "--platform", target.platform, "--python-version", target.python_version,
           "--implementation", target.implementation, "--dest", str(out)]
    for path in requirement_files:
        cmd += ["--requirement", str(path)]
    for path in find_links:
        cmd += ["--find-links", str(path)]
    if no_index:
        cmd.append("--no-index")
    return [*cmd, *requirements]


def download_wheelhouse(requirements: Sequence[str], out: Path, target: WheelTarget | None = None, *,
                        requirement_files: Sequence[Path] = (), find_links: Sequence[Path] = (),
                        no_index: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[Path]:
    """Download wheels for ``requirements`` (and their dependencies) into ``out``; return the wheel files.

    Raises BuildError when pip fails (its last lines are in the message) or when anything other
    than a wheel ends up in ``out``.
    """
    if not requirements and not requirement_files:
        raise ValueError("expected at least one requirement or requirements file, found none")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = pip_download_command(requirements, out, target or WheelTarget(), requirement_files=requirement_files,
                               find_links=find_links, no_index=no_index)
    env = {**os.environ, "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BuildError(f"pip download: expected to finish within {timeout_s} s, found it still running") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
        raise BuildError(f"pip download: expected wheels for {target or WheelTarget()}, found exit code "
                         f"{proc.returncode}:\n{tail}")
    others = sorted(p.name for p in out.iterdir() if p.is_file() and parse_wheel_name(p.name) is None)
    if others:
        raise BuildError(f"{out}: expected only wheel files, found {others}")
    return sorted(p for p in out.iterdir() if p.is_file())
