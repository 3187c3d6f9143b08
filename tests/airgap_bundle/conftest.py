"""Fixtures for bundle tests: small synthetic inputs (fast), keys, and a tar re-packer for attacks."""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from tuf.api.metadata import Metadata, MetaFile, Snapshot, Targets, Timestamp

from airgap_bundle import build_bundle, init_keys
from airgap_bundle.keys import load_root, load_signers

CREATED = datetime(2025, 1, 1, tzinfo=UTC)
EXPIRES = CREATED + timedelta(days=3650)


@dataclass
class Inputs:
    model: Path
    policies: Path
    playbooks: Path
    wheelhouse: Path


def make_inputs(base: Path, model_bytes: bytes = b"\x00" * 4096) -> Inputs:
    model = base / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"model_type": "llama"}\n')
    (model / "model.safetensors").write_bytes(model_bytes)
    (model / "tokenizer.json").write_text("{}\n")
    (model / "airgap_model.json").write_text('{"name": "Tiny", "license": "Apache-2.0"}\n')
    policies = base / "policies"
    policies.mkdir()
    (policies / "tenants.yaml").write_text("tenants: {}\n")
    playbooks = base / "playbooks"
    (playbooks / "roles" / "app" / "tasks").mkdir(parents=True)
    (playbooks / "site.yml").write_text("- hosts: all\n")
    (playbooks / "roles" / "app" / "tasks" / "main.yml").write_text("- name: Do nothing\n")
    wheelhouse = base / "wheels"
    wheelhouse.mkdir()
    (wheelhouse / "PyYAML-6.0.2-cp311-cp311-manylinux_2_17_x86_64.whl").write_bytes(b"PK\x03\x04wheel")
    return Inputs(model, policies, playbooks, wheelhouse)


@pytest.fixture
def inputs(tmp_path: Path) -> Inputs:
    return make_inputs(tmp_path / "inputs")


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    init_keys(tmp_path / "keys", root_expires=CREATED + timedelta(days=3650))
    return tmp_path / "keys"


@pytest.fixture
def build(tmp_path: Path, inputs: Inputs, keydir: Path) -> Callable[..., Path]:
    """build(name="b.tar", created=CREATED, keys=keydir, **overrides) -> bundle path."""

    def _build(out: str = "b.tar", *, created: datetime = CREATED, keys: Path | None = None,
               expires: datetime | None = None, **kw: object) -> Path:
        args: dict[str, object] = {"model_dir": inputs.model, "policies_dir": inputs.policies,
                                   "playbooks_dir": inputs.playbooks, "wheelhouse": inputs.wheelhouse}
        args.update(kw)
        return build_bundle(tmp_path / out, keys or keydir, "0.1.0", expires or created + timedelta(days=3650),
                            created=created, **args)  # type: ignore[arg-type]

    return _build


@pytest.fixture
def bundle(build: Callable[..., Path]) -> Path:
    return build()


def read_members(bundle: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    out = []
    with tarfile.open(bundle, "r:") as tar:
        for info in tar.getmembers():
            data = tar.extractfile(info).read() if info.isfile() else b""  # type: ignore[union-attr]
            out.append((info, data))
    return out


def write_members(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            info.size = len(data) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return path


def repack(src: Path, dst: Path, edit: Callable[[list[tuple[tarfile.TarInfo, bytes]]], None]) -> Path:
    """Copy a bundle tar member by member, letting ``edit`` change the list in place."""
    members = read_members(src)
    edit(members)
    return write_members(dst, members)


def member_data(bundle: Path, name: str) -> bytes:
    for info, data in read_members(bundle):
        if info.name == name:
            return data
    raise KeyError(name)


def resign(src: Path, dst: Path, keydir: Path, *, edit: dict[str, Callable[[Any], None]] | None = None,
           signers: dict[str, list[Any]] | None = None) -> Path:
    """Re-sign targets, snapshot and timestamp of ``src`` after ``edit[role](signed)`` changed them.

    The hash chain (snapshot -> targets, timestamp -> snapshot) is recomputed, so the only defect
    left is the one the edit or ``signers[role]`` (keys replacing the role's real ones) put in.
    """
    edit, signers = edit or {}, signers or {}
    members = read_members(src)
    data = {info.name: d for info, d in members}
    root = load_root(keydir).signed

    def finish(role: str, md: Metadata[Any]) -> bytes:
        edit.get(role, lambda signed: None)(md.signed)
        md.signatures.clear()
        for signer in signers.get(role) or load_signers(keydir, role, root):
            md.sign(signer, append=True)
        return md.to_bytes()

    def meta(raw: bytes, version: int) -> MetaFile:
        return MetaFile(version=version, length=len(raw), hashes={"sha256": hashlib.sha256(raw).hexdigest()})

    targets = Metadata[Targets].from_bytes(data["metadata/targets.json"])
    new = {"metadata/targets.json": finish("targets", targets)}
    snapshot = Metadata[Snapshot].from_bytes(data["metadata/snapshot.json"])
    snapshot.signed.meta["targets.json"] = meta(new["metadata/targets.json"], targets.signed.version)
    new["metadata/snapshot.json"] = finish("snapshot", snapshot)
    timestamp = Metadata[Timestamp].from_bytes(data["metadata/timestamp.json"])
    timestamp.signed.snapshot_meta = meta(new["metadata/snapshot.json"], snapshot.signed.version)
    new["metadata/timestamp.json"] = finish("timestamp", timestamp)
    return write_members(dst, [(info, new.get(info.name, d)) for info, d in members])


def replace_members(src: Path, dst: Path, replacements: dict[str, bytes]) -> Path:
    """Copy ``src`` with the data of the named members replaced (other members unchanged)."""
    return write_members(dst, [(info, replacements.get(info.name, d)) for info, d in read_members(src)])
