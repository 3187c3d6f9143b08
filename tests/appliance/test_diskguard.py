"""The audit store's free space: requests are refused with a clear 503 before the disk fills, the
free space is a metric, and the filesystem is asked at most once per interval."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from appliance.diskguard import DiskGuard
from appliance.errors import ConfigError
from appliance.gateway import create_app
from appliance.runtime import Runtime
from policies import default_policy_dir

MODEL = "SmolLM2-135M-Instruct"


class FakeStat:
    def __init__(self, free: int) -> None:
        self.f_bavail, self.f_frsize = free // 4096, 4096


def test_guard_reads_the_filesystem_once_per_interval_and_says_what_is_wrong(tmp_path: Path) -> None:
    calls: list[str] = []
    readings: list[int] = []
    free = [10 * 2**20]

    def statvfs(path: str) -> os.statvfs_result:
        calls.append(path)
        return FakeStat(free[0])  # type: ignore[return-value]

    guard = DiskGuard(tmp_path, 64 * 2**20, interval_s=3600, on_reading=readings.append, statvfs=statvfs)
    problem = guard.problem()
    assert problem is not None and "10 MiB free" in problem and "at least 64 MiB" in problem
    free[0] = 2**30
    assert guard.problem() is not None  # cached: not asked again within the interval
    assert len(calls) == 1 and readings == [10 * 2**20]
    assert DiskGuard(tmp_path, 1, interval_s=0).problem() is None  # the real filesystem has a byte


def _root(base: Path, model_dir: Path, audit: dict[str, object]) -> Path:
    release = base / "releases" / "1.0.0"
    policies = release / "policies"
    shutil.copytree(default_policy_dir(), policies)
    (policies / "site.yaml").write_text(yaml.safe_dump({"tenants": {"acme": {"allowed_models": ["*"]}}}))
    (release / "appliance.yaml").write_text(yaml.safe_dump({
        "version": "1.0.0", "model": {"name": MODEL, "path": str(model_dir)}, "policies_dir": str(policies),
        "node": {"name": "n", "labels": {"region": "r", "site": "s", "classification": "c"}}, "audit": audit}))
    (base / "current").symlink_to(release)
    return base


@pytest.fixture(scope="module")
def full_disk(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[tuple[Runtime, TestClient]]:
    # more free space than any disk has: the appliance must behave as on a disk about to fill
    runtime = Runtime.open(_root(tmp_path_factory.mktemp("root"), model_dir, {"min_free_bytes": 2**62}))
    runtime.tenants.create_tenant("acme")
    with TestClient(create_app(runtime)) as client:
        yield runtime, client


def test_requests_are_refused_before_the_audit_store_fills(full_disk: tuple[Runtime, TestClient]) -> None:
    runtime, client = full_disk
    key = runtime.tenants.issue_key("acme").secret
    before = len(runtime.audit.query("acme", None, None))
    resp = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                       json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert resp.status_code == 503, resp.text
    error = resp.json()["error"]
    assert error["code"] == "audit_storage_low" and "audit.min_free_bytes" in error["message"]
    assert resp.headers["retry-after"]
    assert len(runtime.audit.query("acme", None, None)) == before  # nothing written for it
    assert runtime.service.metrics.audit_free_bytes._value.get() > 0  # the reading is exported


def test_bad_audit_settings_are_refused_by_name(tmp_path: Path, model_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"audit\.min_free_bytes must be an integer"):
        Runtime.open(_root(tmp_path, model_dir, {"min_free_bytes": "lots"}))


def test_gateway_limits_come_from_appliance_yaml(tmp_path: Path, model_dir: Path) -> None:
    from appliance.config import load_config

    root = _root(tmp_path, model_dir, {})
    path = root / "current" / "appliance.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["gateway"] = {"port": 9443, "limits": {"max_body_bytes": 1024, "refusals_per_minute": 5}}
    path.write_text(yaml.safe_dump(doc))
    edge = load_config(root).edge
    assert edge.max_body_bytes == 1024 and edge.refusals_per_minute == 5 and edge.max_messages == 2048
    doc["gateway"]["limits"] = {"max_body_megabytes": 1}
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="unknown edge limits"):
        load_config(root)
