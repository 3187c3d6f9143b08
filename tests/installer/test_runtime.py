"""The appliance runtime built from the bundle's wheelhouse with ``pip --no-index``: real wheels
(`make wheelhouse`), real venv and pip, real ansible runs, the real model served over HTTPS by
the runtime's own `appliance serve`. One runtime is built for the module and reused by its tests
(about half a minute on two cores); the failure cases use a few small wheels."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import openai
import pytest

from airgap_bundle import build_bundle
from installer import Inventory, RuntimeBuildFailed, install_bundle, read_entries, read_status, rollback
from installer.errors import EXIT_ANSIBLE, AnsibleFailed, BundleContentError
from installer.runtime import plan_runtime, runtime_id
from installer.service import control_service
from installer.status import PLAYBOOK_DIR
from policies import default_policy_dir
from tests.appliance.support import free_port
from tests.installer.conftest import make_model

pytestmark = pytest.mark.slow

RUNTIMECTL = PLAYBOOK_DIR / "roles" / "sovereign_runtime" / "files" / "runtimectl.py"
# httpx and its dependencies: small wheels for the failure cases
SMALL = ("httpx-", "httpcore-", "anyio-", "certifi-", "h11-", "idna-", "typing_extensions-")


def inventory(port: int) -> Inventory:
    return Inventory.model_validate({
        "gateway": {"host": "127.0.0.1", "port": port},
        "service": {"start_timeout_s": 240, "stop_timeout_s": 30},
        "firewall": {"mode": "render"},
        "nodes": [{"name": "local", "connection": "local",
                   "labels": {"region": "eu-test", "site": "lab", "classification": "internal"}}]})


def bundle(work: Path, keys: Path, version: str, model: Path, wheels: Path | None, n: int) -> Path:
    return build_bundle(work / f"appliance-{version}.tar", keys, version, datetime.now(UTC) + timedelta(days=30),
                        model_dir=model, policies_dir=default_policy_dir(), wheelhouse=wheels,
                        metadata_version=int(time.time()) + n)


def small_wheelhouse(src: Path, dest: Path, leave_out: str = "") -> Path:
    dest.mkdir(parents=True)
    for wheel in src.glob("*.whl"):
        if wheel.name.startswith(SMALL) and not (leave_out and wheel.name.startswith(leave_out)):
            shutil.copy(wheel, dest / wheel.name)
    assert len(list(dest.iterdir())) == len(SMALL) - bool(leave_out)
    return dest


def cmdline(pid: int) -> list[str]:
    return [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]


def serving_pid(root: Path) -> int:
    return int((root / "run" / "appliance.pid").read_text())


def chat(root: Path, port: int) -> str:
    ctx = ssl.create_default_context(cafile=str(root / "tls" / "ca.pem"))
    url = f"https://localhost:{port}"
    token = (root / "secrets" / "admin.key").read_text().strip()
    with httpx.Client(base_url=url, verify=ctx, timeout=120) as admin:
        headers = {"Authorization": f"Bearer {token}"}
        tenant = {"name": "runtime", "models": ["SmolLM2-135M-Instruct"]}
        admin.post("/admin/v1/tenants", json=tenant, headers=headers).raise_for_status()
        key = admin.post("/admin/v1/tenants/runtime/keys", json={}, headers=headers).json()["key"]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0,
                           http_client=httpx.Client(verify=ctx, timeout=120))
    reply = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", max_tokens=24, temperature=0,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    return str(reply.choices[0].message.content)


class Served:
    def __init__(self, root: Path, port: int, bundles: dict[str, Path], trusted_root: Path, first: object) -> None:
        self.root, self.port, self.bundles, self.trusted_root, self.first = root, port, bundles, trusted_root, first

    @property
    def inv(self) -> Inventory:
        return inventory(self.port)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, keys: Path, trusted_root: Path, model_dir: Path,
           wheelhouse: Path) -> Iterator[Served]:
    """Release 0.1.0 with the real model and the whole wheelhouse, installed and started."""
    work = tmp_path_factory.mktemp("runtime")
    bundles = {v: bundle(work, keys, v, model_dir, wheelhouse, n) for n, v in enumerate(("0.1.0", "0.2.0"), 1)}
    root, port = work / "root", free_port()
    from installer.first_admin import issue_first_admin_key

    first = install_bundle(bundles["0.1.0"], trusted_root, root, inventory(port), start=True)
    # as the CLI does after a first install (the appliance it started has no admin yet): the key, once
    assert issue_first_admin_key(root, ran_before=False)
    served = Served(root, port, bundles, trusted_root, first)
    try:
        yield served
    finally:
        try:
            control_service(root, "stop", served.inv)
        except Exception:  # test hygiene: never leave an appliance running
            pid_file = root / "run" / "appliance.pid"
            if pid_file.exists():
                os.kill(int(pid_file.read_text()), 9)


def test_install_builds_the_runtime_and_serves_from_it(served: Served, wheelhouse: Path) -> None:
    root, result = served.root, served.first
    wheels = sorted(p.name for p in wheelhouse.glob("*.whl"))
    release = root / "releases" / "0.1.0"
    # the wheels are part of the release, checked against the signed hashes like the model
    assert sorted(p.name for p in (release / "wheels").iterdir()) == wheels
    record = json.loads((release / "release.json").read_text())
    rid = record["runtime"]
    assert rid == runtime_id({f["dest"].removeprefix("wheels/"): f["sha256"] for f in record["files"]
                              if f["dest"].startswith("wheels/")})
    assert sorted(p.name for p in (root / "runtimes").iterdir()) == [rid]  # no temporary build left
    runtime = root / "runtimes" / rid
    info = json.loads((runtime / "runtime.json").read_text())
    assert [w["file"] for w in info["wheels"]] == wheels and info["python"].startswith("3.")
    requirements = (release / "runtime-requirements.txt").read_text()
    assert "torch==2.13.0+cpu --hash=sha256:" in requirements and "sovereign-appliance==" in requirements
    assert any(f"runtime {rid} built from {len(wheels)} wheels with pip --no-index" in n for n in result.notes)
    assert result.timings["runtime"] > 0 and result.started

    assert "Paris" in chat(root, served.port)
    pid = serving_pid(root)
    argv = cmdline(pid)  # the shebang's interpreter, then the runtime's console script
    assert argv[:3] == [str(runtime / "bin" / "python"), str(runtime / "bin" / "appliance"), "serve"], argv
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert f"{runtime}/lib/" in maps and "libtorch" in maps  # torch is loaded from the runtime
    assert str(Path(sys.prefix)) + "/lib" not in maps  # not from the test's own environment
    status = read_status(root)
    assert [(r.version, r.runtime, r.runtime_present) for r in status.releases] == [("0.1.0", rid, True)]


def test_second_install_of_the_same_bundle_changes_nothing(served: Served) -> None:
    pid = serving_pid(served.root)
    again = install_bundle(served.bundles["0.1.0"], served.trusted_root, served.root, served.inv, start=True)
    assert again.changed == 0, again.playbook.changed_tasks
    assert any("reused" in n for n in again.notes), again.notes
    assert serving_pid(served.root) == pid  # left running
    assert read_entries(served.root / "journal" / "installer.jsonl")[-1]["detail"].endswith("no changes")


def test_upgrade_with_the_same_wheels_reuses_the_runtime(served: Served) -> None:
    root = served.root
    (rid,) = [p.name for p in (root / "runtimes").iterdir()]
    built = (root / "runtimes" / rid / "runtime.json").stat().st_mtime_ns
    result = install_bundle(served.bundles["0.2.0"], served.trusted_root, root, served.inv, upgrade=True, start=True)
    assert result.switched and result.previous == "0.1.0"
    assert [p.name for p in (root / "runtimes").iterdir()] == [rid]  # no second venv
    assert (root / "runtimes" / rid / "runtime.json").stat().st_mtime_ns == built
    assert any(f"runtime {rid} reused" in n for n in result.notes), result.notes
    assert result.timings["runtime"] < 10
    assert json.loads((root / "releases" / "0.2.0" / "release.json").read_text())["runtime"] == rid
    argv = cmdline(serving_pid(root))
    assert argv[1] == str(root / "runtimes" / rid / "bin" / "appliance")
    ctx = ssl.create_default_context(cafile=str(root / "tls" / "ca.pem"))
    assert httpx.get(f"https://localhost:{served.port}/health", verify=ctx, timeout=10).json()["version"] == "0.2.0"
    assert [(r.version, r.runtime) for r in read_status(root).releases] == [("0.1.0", rid), ("0.2.0", rid)]


def test_rollback_keeps_the_runtime_and_needs_it(served: Served) -> None:
    root = served.root
    (rid,) = [p.name for p in (root / "runtimes").iterdir()]
    back = rollback(root, inventory=served.inv, start=True)
    assert back.version == "0.1.0" and back.previous == "0.2.0"
    assert cmdline(serving_pid(root))[1] == str(root / "runtimes" / rid / "bin" / "appliance")
    aside = root / "runtimes" / f".{rid}.aside"
    (root / "runtimes" / rid).rename(aside)  # as if someone deleted the runtime
    try:
        with pytest.raises(AnsibleFailed, match=f"runs on runtime {rid}: expected .*runtime.json, found none"):
            rollback(root, to="0.2.0", inventory=served.inv, start=True)
        assert os.readlink(root / "current") == "releases/0.1.0"  # refused before anything changed
    finally:
        aside.rename(root / "runtimes" / rid)


def test_a_missing_dependency_fails_clearly_and_nothing_is_switched(
        tmp_path: Path, keys: Path, trusted_root: Path, wheelhouse: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pip may only use the release's wheels: idna is missing, and every way pip could find it
    elsewhere is offered (the environment's PIP_* variables and a pip.conf pointing at the full
    wheelhouse, on top of this machine's global pip.conf with its extra index): none is used."""
    wheels = small_wheelhouse(wheelhouse, tmp_path / "wheels", leave_out="idna-")
    conf = tmp_path / "pip.conf"
    conf.write_text(f"[global]\nfind-links = {wheelhouse}\n")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheelhouse))
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    monkeypatch.setenv("PIP_NO_INDEX", "0")
    root = tmp_path / "root"
    made = bundle(tmp_path, keys, "0.1.0", make_model(tmp_path / "SmolLM2-tiny"), wheels, 1)
    with pytest.raises(RuntimeBuildFailed) as caught:
        install_bundle(made, trusted_root, root, inventory(free_port()))
    message = str(caught.value)
    assert caught.value.exit_code == EXIT_ANSIBLE
    assert "could not be built (nothing was switched)" in message
    assert "pip install --no-index from the release's wheels" in message
    assert "No matching distribution found for idna" in message, message
    assert not (root / "current").exists()
    assert [p.name for p in (root / "runtimes").iterdir()] == []  # no half-built runtime
    assert read_entries(root / "journal" / "installer.jsonl")[-1]["result"] == "failed"


def test_a_wheel_for_another_platform_is_named(tmp_path: Path, keys: Path, trusted_root: Path,
                                              wheelhouse: Path) -> None:
    wheels = small_wheelhouse(wheelhouse, tmp_path / "wheels", leave_out="idna-")
    idna = next(wheelhouse.glob("idna-*.whl"))
    alien = "idna-" + idna.name.split("-")[1] + "-cp39-cp39-win_amd64.whl"
    shutil.copy(idna, wheels / alien)
    root = tmp_path / "root"
    made = bundle(tmp_path, keys, "0.1.0", make_model(tmp_path / "SmolLM2-tiny"), wheels, 1)
    with pytest.raises(RuntimeBuildFailed) as caught:
        install_bundle(made, trusted_root, root, inventory(free_port()))
    assert f"wheels that do not fit this node (Python 3.{sys.version_info.minor}" in str(caught.value)
    assert f"found {alien}" in str(caught.value)
    assert not (root / "current").exists() and [p.name for p in (root / "runtimes").iterdir()] == []


def test_appliancectl_exec_runs_the_runtime_of_the_release_in_service(tmp_path: Path) -> None:
    """The systemd unit's ExecStart: the release's runtime when release.json names one, else the
    node's appliance; a missing runtime is named."""
    root = tmp_path / "root"
    release = root / "releases" / "1.0"
    release.mkdir(parents=True)
    (root / "current").symlink_to("releases/1.0")
    exe = root / "runtimes" / "0123456789abcdef" / "bin" / "appliance"
    ctl = [sys.executable, str(PLAYBOOK_DIR / "roles" / "sovereign_service" / "files" / "appliancectl.py"), "exec",
           "--root", str(root), "--exe", str(tmp_path / "node" / "appliance")]
    for script in (exe, tmp_path / "node" / "appliance"):
        script.parent.mkdir(parents=True)
        script.write_text(f"#!{sys.executable}\nimport os, sys\nprint(sys.argv[0], *sys.argv[1:], os.getcwd())\n")
        script.chmod(0o755)
    (release / "release.json").write_text(json.dumps({"version": "1.0", "runtime": None}))
    out = subprocess.run(ctl, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == [str(tmp_path / "node" / "appliance"), "serve", "--root", str(root), str(root)]
    (release / "release.json").write_text(json.dumps({"version": "1.0", "runtime": "0123456789abcdef"}))
    out = subprocess.run(ctl, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == [str(exe), "serve", "--root", str(root), str(root)], out.stderr
    exe.unlink()
    out = subprocess.run(ctl, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and f"expected the release's runtime 0123456789abcdef at {exe}" in out.stderr


def test_plan_needs_wheels_and_one_version_per_project() -> None:
    def files(*names: str) -> list[dict[str, str]]:
        return [{"src": f"wheels/{n}", "dest": f"wheels/{n}", "sha256": f"{i:064x}"} for i, n in enumerate(names)]

    assert plan_runtime([{"src": "model/x", "dest": "model/x", "sha256": "0" * 64}], "b.tar") is None
    plan = plan_runtime(files("A_b-1.0-py3-none-any.whl", "c-2-py3-none-any.whl"), "b.tar")
    assert plan is not None and [w.name for w in plan.wheels] == ["a-b", "c"]
    assert plan.id == runtime_id({"A_b-1.0-py3-none-any.whl": f"{0:064x}", "c-2-py3-none-any.whl": f"{1:064x}"})
    with pytest.raises(BundleContentError, match="expected a wheel file"):
        plan_runtime(files("README.txt"), "b.tar")
    with pytest.raises(BundleContentError, match="one version of each project, found c 1, 2"):
        plan_runtime(files("c-1-py3-none-any.whl", "c-2-py3-none-any.whl"), "b.tar")


def test_runtime_id_is_the_same_on_both_sides() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("runtimectl", RUNTIMECTL)
    assert spec is not None and spec.loader is not None
    ctl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ctl)
    wheels = {"b-1-py3-none-any.whl": "f" * 64, "a-1-py3-none-any.whl": "e" * 64}
    assert ctl.runtime_id(wheels) == runtime_id(wheels) and len(runtime_id(wheels)) == 16
    assert ctl.wheel_tags("x-1-cp311.cp312-abi3-manylinux_2_17_x86_64.manylinux2014_x86_64.whl") >= {
        "cp311-abi3-manylinux_2_17_x86_64", "cp312-abi3-manylinux2014_x86_64"}
