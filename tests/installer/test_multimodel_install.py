"""Installing bundles that carry several models: each SSH engine node receives only the model its
inventory entry names (verified against the signed digests) and an appliance.yaml that loads it
(the installer's own machine keeps every model: the base for delta bundles),
the gateway lists every engine node with its model, a node naming a model the bundle lacks is a
preflight error, and a single-model bundle built by the previous release still installs."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from airgap_bundle import build_bundle, verify_bundle
from installer import PreflightFailed, install_bundle, load_inventory
from installer.inventory import Inventory
from installer.node_models import check_node_models
from installer.preflight import run_preflight
from policies import default_policy_dir
from tests.airgap_bundle.test_multimodel import same_weights_other_name
from tests.installer.conftest import REPO, make_model
from tests.installer.sshhosts import ssh_hosts, ssh_unavailable

pytestmark = pytest.mark.slow

LABELS = {"region": "eu", "site": "a", "classification": "internal"}
# The last commit before bundles carried several models: its airgap_bundle builds "an old bundle".
PREVIOUS_RELEASE = "47901b6803b4cdf45216ff1788f9326a0cfddb1d"


def named_model(path: Path, name: str, marker: bytes) -> Path:
    make_model(path, marker)
    (path / "airgap_model.json").write_text(json.dumps({"name": name, "license": "Apache-2.0"}))
    return path


@pytest.fixture(scope="module")
def two_model_bundle(tmp_path_factory: pytest.TempPathFactory, keys: Path) -> Path:
    """Placeholder weights (the installer never loads a model): Alpha is the default, Beta the second."""
    work = tmp_path_factory.mktemp("two-models")
    alpha = named_model(work / "alpha", "Alpha", b"ALPHA-WEIGHTS")
    beta = named_model(work / "beta", "Beta", b"BETA-WEIGHTS")
    return build_bundle(work / "two.tar", keys, "2.0.0", datetime.now(UTC) + timedelta(days=30), model_dir=alpha,
                        model_dirs=[beta], policies_dir=default_policy_dir(), metadata_version=int(time.time()))


def inventory(tmp: Path, *nodes: dict[str, object]) -> Path:
    path = tmp / "inventory.yaml"
    path.write_text(yaml.safe_dump({"firewall": {"mode": "render"}, "nodes": list(nodes)}))
    return path


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_a_node_naming_a_model_the_bundle_lacks_is_a_preflight_error(
        tmp_path: Path, two_model_bundle: Path, trusted_root: Path) -> None:
    inv = inventory(tmp_path, {"name": "gpu-x", "labels": LABELS, "models": ["Gamma-7B"]})
    root = tmp_path / "root"
    with pytest.raises(PreflightFailed) as info:
        install_bundle(two_model_bundle, trusted_root, root, inv)
    assert ("models: node gpu-x serves model 'Gamma-7B': expected one of the models the bundle carries (Alpha, "
            "Beta), found no model of that name") in str(info.value)
    assert info.value.exit_code == 1 and not root.exists()  # refused before anything is written
    check = check_node_models(load_inventory(inv), two_model_bundle)
    assert check.status == "fail" and "gpu-x" in check.detail and "Gamma-7B" in check.detail
    # and `sovereign-installer preflight --bundle` shows the same check among its others
    report = run_preflight(root, inventory=load_inventory(inv), bundle=two_model_bundle, allow_cpu=True)
    assert [c.detail for c in report.checks if c.name == check.name] == [check.detail]
    two = inventory(tmp_path, {"name": "gpu-y", "labels": LABELS, "models": ["Alpha", "Beta"]})
    with pytest.raises(PreflightFailed, match=r"node gpu-y: expected one model \(its engine loads one model; give "
                                              r"each model its own engine node\), found \['Alpha', 'Beta'\]"):
        install_bundle(two_model_bundle, trusted_root, root, two)
    assert check_node_models(load_inventory(None), two_model_bundle).status == "pass"


def test_the_local_node_loads_its_model_keeps_every_model_and_takes_a_delta(
        tmp_path: Path, two_model_bundle: Path, trusted_root: Path, keys: Path) -> None:
    """The installer's own machine keeps every model of the release (hard links of the verified
    files), so a later delta bundle that leaves out an unchanged model verifies against it."""
    root = tmp_path / "root"
    inv = inventory(tmp_path, {"name": "gpu-b", "labels": LABELS, "models": ["Beta"]})
    install_bundle(two_model_bundle, trusted_root, root, inv)
    release = root / "releases" / "2.0.0"
    installed = files_under(release)
    assert {"models/Beta/model.safetensors", "model/model.safetensors", "manifest.json"} <= installed
    report = verify_bundle(two_model_bundle, trusted_root)
    assert installed - {"release.json", "appliance.yaml"} == set(report.targets)
    for path in installed & set(report.targets):
        assert hashlib.sha256((release / path).read_bytes()).hexdigest() == report.targets[path].sha256, path
    config = yaml.safe_load((root / "current" / "appliance.yaml").read_text())
    assert config["model"] == {"name": "Beta", "path": str(release / "models" / "Beta")}
    assert config["node"]["models"] == ["Beta"]

    work = tmp_path / "v2.1"
    alpha = named_model(work / "alpha", "Alpha", b"ALPHA-WEIGHTS")  # unchanged
    beta = named_model(work / "beta", "Beta", b"BETA-WEIGHTS-v2")  # changed
    delta = build_bundle(work / "delta.tar", keys, "2.1.0", datetime.now(UTC) + timedelta(days=30), model_dir=alpha,
                         model_dirs=[beta], policies_dir=default_policy_dir(), metadata_version=int(time.time()) + 1,
                         base_manifest=release / "manifest.json")
    omitted = json.loads(tarfile.open(delta).extractfile("targets/manifest.json").read())["delta"]["omitted"]  # type: ignore[union-attr]
    assert "model/model.safetensors" in omitted and "models/Beta/model.safetensors" not in omitted
    install_bundle(delta, trusted_root, root, inv, upgrade=True)
    new = root / "releases" / "2.1.0"
    assert (new / "models" / "Beta" / "model.safetensors").read_bytes().startswith(b"BETA-WEIGHTS-v2")
    assert (new / "model" / "model.safetensors").read_bytes() == (release / "model" / "model.safetensors").read_bytes()
    assert yaml.safe_load((root / "current" / "appliance.yaml").read_text())["model"]["name"] == "Beta"


def test_without_models_a_node_serves_the_default_model(
        tmp_path: Path, two_model_bundle: Path, trusted_root: Path) -> None:
    root = tmp_path / "root"
    install_bundle(two_model_bundle, trusted_root, root)
    release = root / "releases" / "2.0.0"
    assert {"model/model.safetensors", "models/Beta/model.safetensors"} <= files_under(release)  # the local node
    config = yaml.safe_load((root / "current" / "appliance.yaml").read_text())
    assert config["model"] == {"name": "Alpha", "path": str(release / "model")} and config["node"]["models"] == [
        "Alpha"]


def old_airgap_bundle(tmp: Path) -> Path:
    """airgap_bundle as the previous release shipped it (git archive of PREVIOUS_RELEASE)."""
    if shutil.which("git") is None:
        pytest.skip("needs git to take the previous release's airgap_bundle")
    proc = subprocess.run(["git", "-C", str(REPO), "archive", PREVIOUS_RELEASE, "airgap_bundle"],
                          capture_output=True, timeout=120)
    if proc.returncode != 0:
        pytest.skip(f"the previous release {PREVIOUS_RELEASE[:12]} is not in this checkout's history")
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
        tar.extractall(tmp, filter="data")
    assert not (tmp / "airgap_bundle" / "bundle_models.py").exists()  # really the old code
    return tmp


def test_a_single_model_bundle_built_by_the_previous_release_still_installs(
        tmp_path: Path, keys: Path, trusted_root: Path) -> None:
    old = old_airgap_bundle(tmp_path / "old-code")
    model = named_model(tmp_path / "model", "Legacy-1B", b"LEGACY-WEIGHTS")
    bundle = tmp_path / "old.tar"
    script = ("import sys, time; from datetime import UTC, datetime, timedelta; from pathlib import Path\n"
              "import airgap_bundle; from airgap_bundle import build_bundle\n"
              "assert Path(airgap_bundle.__file__).is_relative_to(Path(sys.argv[1]))\n"
              "build_bundle(Path(sys.argv[2]), Path(sys.argv[3]), '1.0.0', datetime.now(UTC) + timedelta(days=30), "
              "model_dir=Path(sys.argv[4]), policies_dir=Path(sys.argv[5]), metadata_version=int(time.time()))\n")
    proc = subprocess.run([sys.executable, "-c", script, str(old), str(bundle), str(keys), str(model),
                           str(default_policy_dir())], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(old)}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads(tarfile.open(bundle).extractfile("targets/manifest.json").read())  # type: ignore[union-attr]
    assert "models" not in manifest and manifest["model"]["name"] == "Legacy-1B"
    root = tmp_path / "root"
    install_bundle(bundle, trusted_root, root)
    release = root / "releases" / "1.0.0"
    assert (release / "model" / "model.safetensors").read_bytes().startswith(b"LEGACY-WEIGHTS")
    config = yaml.safe_load((root / "current" / "appliance.yaml").read_text())
    assert config["model"] == {"name": "Legacy-1B", "path": str(release / "model")}


@pytest.fixture
def real_two_model_bundle(tmp_path: Path, keys: Path) -> Iterator[Path]:
    real = Path(os.environ.get("SOVEREIGN_MODEL_DIR", ""))
    if not (real / "model.safetensors").is_file():
        pytest.skip("SOVEREIGN_MODEL_DIR does not name the converted SmolLM2 model directory")
    second = same_weights_other_name(real, tmp_path / "copy", "SmolLM2-135M-Copy")
    yield build_bundle(tmp_path / "real-two.tar", keys, "3.0.0", datetime.now(UTC) + timedelta(days=30),
                       model_dirs=[real, second], policies_dir=default_policy_dir(),
                       metadata_version=int(time.time()))


def test_a_fleet_over_ssh_gives_each_engine_node_only_its_model(
        tmp_path: Path, real_two_model_bundle: Path, trusted_root: Path) -> None:
    """Real SSH hosts (network namespaces, own sshd, own roots); installed without starting the
    services: what is checked is where the models go and what each appliance.yaml says."""
    reason = ssh_unavailable()
    if reason:
        pytest.skip(reason)
    names = ["gw-1", "gpu-1", "gpu-2"]
    with ssh_hosts(tmp_path / "ssh", names) as hosts:
        nodes = [hosts.inventory_node(hosts.by_name("gw-1"), roles=["gateway"], labels=LABELS),
                 hosts.inventory_node(hosts.by_name("gpu-1"), roles=["engine"], labels=LABELS),
                 hosts.inventory_node(hosts.by_name("gpu-2"), roles=["engine"], labels=LABELS,
                                      models=["SmolLM2-135M-Copy"])]
        inv = Inventory.model_validate({"firewall": {"mode": "render"}, "nodes": nodes})
        result = install_bundle(real_two_model_bundle, trusted_root, tmp_path / "controller", inv, allow_cpu=True)
        assert result.changed > 0
        report = verify_bundle(real_two_model_bundle, trusted_root)
        placed = {}
        for name in names:
            release = hosts.by_name(name).root / "releases" / "3.0.0"
            placed[name] = {p.split("/")[0] + ("/" + p.split("/")[1] if p.startswith("models/") else "")
                            for p in files_under(release) if p.startswith(("model/", "models/"))}
            config = yaml.safe_load((release / "appliance.yaml").read_text())
            if name != "gw-1":
                weights = Path(config["model"]["path"]) / "model.safetensors"
                rel = weights.relative_to(release).as_posix()
                assert hashlib.sha256(weights.read_bytes()).hexdigest() == report.targets[rel].sha256
        assert placed == {"gw-1": set(), "gpu-1": {"model"}, "gpu-2": {"models/SmolLM2-135M-Copy"}}
        gpu2 = yaml.safe_load((hosts.by_name("gpu-2").root / "current" / "appliance.yaml").read_text())
        assert gpu2["model"]["name"] == "SmolLM2-135M-Copy" and gpu2["node"]["models"] == ["SmolLM2-135M-Copy"]
        gateway = yaml.safe_load((hosts.by_name("gw-1").root / "current" / "appliance.yaml").read_text())
        assert [(n["name"], n["models"]) for n in gateway["fleet"]["nodes"]] == [
            ("gpu-1", ["SmolLM2-135M-Instruct"]), ("gpu-2", ["SmolLM2-135M-Copy"])]
