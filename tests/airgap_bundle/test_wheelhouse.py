"""Wheelhouse: real ``pip download`` runs, offline (``--no-index`` with a local find-links directory)."""

from __future__ import annotations

import base64
import hashlib
import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from airgap_bundle import BuildError
from airgap_bundle.cli import app
from airgap_bundle.wheelhouse import WheelTarget, download_wheelhouse, pip_download_command
from tests.airgap_bundle.conftest import member_data


def make_wheel(directory: Path, name: str, version: str, tag: str = "py3-none-any", requires: str = "") -> Path:
    """A minimal valid wheel: one module, METADATA, WHEEL and RECORD."""
    directory.mkdir(parents=True, exist_ok=True)
    dist = f"{name.replace('-', '_')}-{version}"
    files = {
        f"{name.replace('-', '_')}/__init__.py": b"VALUE = 1\n",
        f"{dist}.dist-info/METADATA": (f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                                       + (f"Requires-Dist: {requires}\n" if requires else "")).encode(),
        f"{dist}.dist-info/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n".encode(),
    }
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
              f"{len(data)}" for path, data in files.items()]
    files[f"{dist}.dist-info/RECORD"] = ("\n".join([*record, f"{dist}.dist-info/RECORD,,"]) + "\n").encode()
    wheel = directory / f"{dist}-{tag}.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return wheel


@pytest.fixture
def index(tmp_path: Path) -> Path:
    links = tmp_path / "links"
    make_wheel(links, "demo-app", "1.0", requires="demo-dep>=2")
    make_wheel(links, "demo-dep", "2.1")
    (links / "sdist_only-1.0.tar.gz").write_bytes(b"not a wheel")
    return links


def test_download_fetches_the_requirement_and_its_dependencies_as_wheels(index: Path, tmp_path: Path) -> None:
    wheels = download_wheelhouse(["demo-app==1.0"], tmp_path / "wh", WheelTarget("manylinux2014_x86_64", "3.11"),
                                 find_links=[index], no_index=True)
    assert [w.name for w in wheels] == ["demo_app-1.0-py3-none-any.whl", "demo_dep-2.1-py3-none-any.whl"]


def test_a_source_only_requirement_is_refused_before_the_gap(index: Path, tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="pip download: expected wheels"):
        download_wheelhouse(["sdist-only==1.0"], tmp_path / "wh", find_links=[index], no_index=True)


def test_wheel_for_another_python_is_refused(tmp_path: Path) -> None:
    links = tmp_path / "links"
    make_wheel(links, "old-only", "1.0", tag="cp27-cp27mu-manylinux1_x86_64")
    with pytest.raises(BuildError, match="exit code"):
        download_wheelhouse(["old-only"], tmp_path / "wh", WheelTarget("manylinux2014_x86_64", "3.11"),
                            find_links=[links], no_index=True)


def test_command_names_platform_and_python() -> None:
    cmd = pip_download_command(["x==1"], Path("/w"), WheelTarget("manylinux_2_28_aarch64", "3.12"))
    assert cmd[1:4] == ["-m", "pip", "download"] and "--only-binary=:all:" in cmd
    assert cmd[cmd.index("--platform") + 1] == "manylinux_2_28_aarch64"
    assert cmd[cmd.index("--python-version") + 1] == "3.12"
    with pytest.raises(ValueError):
        WheelTarget("--index-url=http://evil", "3.11")


def test_cli_wheelhouse_then_build_lists_the_wheels_in_the_sbom(index: Path, tmp_path: Path,
                                                                build: Callable[..., Path]) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["wheelhouse", "--out", str(tmp_path / "wh"), "--find-links", str(index),
                                 "--no-index", "--python-version", "3.11", "demo-app==1.0", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["wheels"] == ["demo_app-1.0-py3-none-any.whl", "demo_dep-2.1-py3-none-any.whl"]
    bundle = build("wh.tar", wheelhouse=tmp_path / "wh")
    sbom = json.loads(member_data(bundle, "targets/sbom.cdx.json"))
    libraries = {(c["name"], c["version"]) for c in sbom["components"] if c["type"] == "library"}
    assert libraries == {("demo-app", "1.0"), ("demo-dep", "2.1")}
