from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from airgap_bundle.cli import app
from tests.airgap_bundle.conftest import Inputs, repack

runner = CliRunner()


def _build(tmp_path: Path, inputs: Inputs, keys: Path) -> Path:
    result = runner.invoke(app, ["build", "--keys", str(keys), "--model", str(inputs.model), "--policies",
                                 str(inputs.policies), "--wheelhouse", str(inputs.wheelhouse), "--version", "0.2.0",
                                 "--created", "2025-06-01T00:00:00Z", "--expires-days", "3650",
                                 "--out", str(tmp_path / "cli.tar"), "--json"])
    assert result.exit_code == 0, result.output
    return Path(json.loads(result.stdout)["bundle"])


def test_keys_build_verify_unpack_inspect(tmp_path: Path, inputs: Inputs) -> None:
    keys = tmp_path / "keys"
    result = runner.invoke(app, ["keys", "init", str(keys), "--root-threshold", "2", "--root-keys", "3", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["thresholds"]["root"] == 2
    bundle = _build(tmp_path, inputs, keys)

    result = runner.invoke(app, ["verify", str(bundle), "--root", str(keys / "root.json"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and report["version"] == "0.2.0" and len(report["checks"]) == 8

    result = runner.invoke(app, ["verify", str(bundle), "--root", str(keys / "root.json")])
    assert result.exit_code == 0 and "verified" in result.stdout

    state = tmp_path / "state"
    result = runner.invoke(app, ["unpack", str(bundle), "--root", str(keys / "root.json"), "--dest",
                                 str(tmp_path / "rel"), "--state", str(state), "--json"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "rel" / "manifest.json").is_file() and (state / "trusted_state.json").is_file()

    result = runner.invoke(app, ["inspect", str(bundle), "--json"])
    assert result.exit_code == 0
    info = json.loads(result.stdout)
    assert info["verified"] is False and "model/model.safetensors" in info["targets"]
    assert info["digest"] == report["digest"]  # the same identity, with or without trust
    assert info["sbom"]["wheels"] == ["pyyaml==6.0.2"] and info["sbom"]["models"][0]["licenses"] == ["Apache-2.0"]
    text = runner.invoke(app, ["inspect", str(bundle)])
    assert text.exit_code == 0 and "(unverified)" in text.stdout and "SBOM CycloneDX 1.5" in text.stdout


def test_verify_failure_exits_1_and_names_the_check(tmp_path: Path, inputs: Inputs) -> None:
    keys = tmp_path / "keys"
    assert runner.invoke(app, ["keys", "init", str(keys)]).exit_code == 0
    bundle = _build(tmp_path, inputs, keys)

    def tamper(members: list) -> None:
        for i, (info, data) in enumerate(members):
            if info.name == "targets/model/model.safetensors":
                members[i] = (info, b"\xff" + data[1:])

    bad = repack(bundle, tmp_path / "bad.tar", tamper)
    result = runner.invoke(app, ["verify", str(bad), "--root", str(keys / "root.json")])
    assert result.exit_code == 1
    assert "check 8 target files" in result.output
    result = runner.invoke(app, ["unpack", str(bad), "--root", str(keys / "root.json"), "--dest",
                                 str(tmp_path / "rel")])
    assert result.exit_code == 1 and not (tmp_path / "rel").exists()


def test_usage_and_input_errors_exit_2(tmp_path: Path) -> None:
    assert runner.invoke(app, ["verify"]).exit_code == 2
    assert runner.invoke(app, ["import-model", "--out", str(tmp_path / "m")]).exit_code == 2
    result = runner.invoke(app, ["import-model", "--hf", str(tmp_path / "missing"), "--out", str(tmp_path / "m")])
    assert result.exit_code == 2 and "expected a Hugging Face model directory" in result.output
    result = runner.invoke(app, ["build", "--keys", str(tmp_path / "nokeys"), "--version", "1", "--out",
                                 str(tmp_path / "x.tar"), "--policies", str(tmp_path)])
    assert result.exit_code == 2


def test_build_can_also_split_into_parts_that_join_and_verify(tmp_path: Path, inputs: Inputs) -> None:
    keys = tmp_path / "keys"
    assert runner.invoke(app, ["keys", "init", str(keys)]).exit_code == 0
    result = runner.invoke(app, ["build", "--keys", str(keys), "--model", str(inputs.model), "--version", "1.0.0",
                                 "--out", str(tmp_path / "b.tar"), "--split-size", "8K", "--json"])
    assert result.exit_code == 0, result.output
    index = Path(json.loads(result.stdout)["parts_index"])
    assert index.parent.name == "b.tar.parts" and len(list(index.parent.glob("b.tar.part-*"))) > 1
    result = runner.invoke(app, ["join", str(index), "--out", str(tmp_path / "joined.tar")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["verify", str(tmp_path / "joined.tar"), "--root", str(keys / "root.json")])
    assert result.exit_code == 0, result.output
