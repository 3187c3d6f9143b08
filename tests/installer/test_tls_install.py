"""TLS from the installer's internal CA, through real installs (ansible-playbook on localhost):
the node's tls/ holds what ROOT/state/pki issued, a second install changes nothing, a node whose
names changed gets a new certificate, a damaged CA key stops the install with a clear error, and
no private key ever reaches the ansible event stream, its output, the journal or stdout."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

import installer.install as install_module
from installer import install_bundle, read_entries
from installer.ansible_runner import run_playbook
from tests.installer.conftest import run_cli

pytestmark = pytest.mark.slow

TLS_FILES = {"ca.pem": 0o644, "server.pem": 0o644, "server.key": 0o600, "issuer.json": 0o644,
             "engine/ca.pem": 0o644, "engine/server.pem": 0o644, "engine/server.key": 0o600,
             "engine/client.pem": 0o644, "engine/client.key": 0o600}


def inventory_file(path: Path, gateway_host: str = "127.0.0.1") -> Path:
    path.write_text(f"gateway: {{host: {gateway_host}, port: 8443}}\n"
                    "firewall: {mode: render}\n"
                    "nodes:\n  - name: local\n    connection: local\n"
                    "    labels: {region: local, site: local, classification: internal}\n")
    return path


def key_fragments(root: Path) -> dict[str, list[str]]:
    """Distinctive pieces of every private key under ROOT: base64 lines of the PEM body and the
    raw key bytes' hex, so a leak in any encoding is caught."""
    found: dict[str, list[str]] = {}
    for key in sorted(root.rglob("*.key")):
        text = key.read_text()
        if "PRIVATE KEY" not in text:
            continue
        body = [ln for ln in text.splitlines() if ln and not ln.startswith("-----")]
        raw = base64.b64decode("".join(body))
        found[str(key.relative_to(root))] = [ln for ln in body if len(ln) >= 40] + [raw[-32:].hex()]
    return found


@pytest.fixture(scope="module")
def captured(tmp_path_factory: pytest.TempPathFactory, bundle_v1: Path, trusted_root: Path) -> dict[str, Any]:
    """One in-process install whose ansible run is recorded in full: every event line, ansible's own
    output and stderr, and every file of its work directory (vars, inventory) before it is removed."""
    root = tmp_path_factory.mktemp("tls") / "root"
    record: dict[str, Any] = {"events": [], "texts": []}

    def recording_run(playbook: str, **kwargs: Any) -> Any:
        user_on_event = kwargs.pop("on_event", None)

        def on_event(event: dict[str, Any]) -> None:
            record["events"].append(json.dumps(event))
            if user_on_event is not None:
                user_on_event(event)

        result = run_playbook(playbook, on_event=on_event, **kwargs)
        record["texts"] += [*result.output, result.stderr, json.dumps(result.to_dict())]
        for path in sorted(Path(kwargs["work_dir"]).rglob("*")):
            if path.is_file():
                record["texts"].append(f"{path}\n" + path.read_text(errors="replace"))
        return result

    mp = pytest.MonkeyPatch()
    mp.setattr(install_module, "run_playbook", recording_run)
    try:
        result = install_bundle(bundle_v1, trusted_root, root, inventory_file(root.parent / "inv.yaml"))
    finally:
        mp.undo()
    record.update(root=root, result=result)
    return record


def test_the_node_serves_what_the_installation_ca_issued(captured: dict[str, Any]) -> None:
    root: Path = captured["root"]
    tls, pki = root / "tls", root / "state" / "pki"
    for name, mode in TLS_FILES.items():
        assert stat.S_IMODE((tls / name).stat().st_mode) == mode, name
    assert stat.S_IMODE((tls / "engine").stat().st_mode) == 0o700
    assert (tls / "ca.pem").read_bytes() == (pki / "ca.pem").read_bytes() == (tls / "engine" / "ca.pem").read_bytes()
    assert (tls / "server.key").read_bytes() == (pki / "nodes" / "local" / "server.key").read_bytes()
    assert (tls / "engine" / "client.pem").read_bytes() == (pki / "nodes" / "local" / "engine-client.pem").read_bytes()
    assert not (tls / "ca.key").exists() and not list(tls.rglob("ca.key"))  # the CA key never leaves state/pki
    ca = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    marker = json.loads((tls / "issuer.json").read_text())
    assert marker["issuer"] == "sovereign-installer" and marker["node"] == "local"
    assert marker["ca_fingerprint"] == "sha256:" + ca.fingerprint(hashes.SHA256()).hex()
    notes = captured["result"].notes
    assert any("created the installation CA " + marker["ca_fingerprint"] in n for n in notes)
    assert any(n.startswith("local: WARN egress firewall NOT enforced (firewall.mode is render)") for n in notes)


def test_no_key_material_in_ansible_output_journal_or_stdout(captured: dict[str, Any]) -> None:
    root: Path = captured["root"]
    fragments = key_fragments(root)
    assert set(fragments) >= {"state/pki/ca.key", "state/pki/nodes/local/server.key", "tls/server.key",
                              "tls/engine/client.key", "tls/engine/server.key"}
    haystacks = {"ansible events": "\n".join(captured["events"]),
                 "ansible output, stderr and work files": "\n".join(captured["texts"]),
                 "journal": (root / "journal" / "installer.jsonl").read_text(),
                 "install result (--json stdout)": json.dumps(captured["result"].to_dict(), default=str)}
    # and every other file under ROOT (logs, state, README, release, firewall...)
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix != ".key" and "model" not in path.parts:
            haystacks[str(path.relative_to(root))] = path.read_text(errors="replace")
    assert len(captured["events"]) > 20  # the recording saw the play
    assert any("Copy the node's private keys" in e for e in captured["events"])
    for key, pieces in fragments.items():
        for where, text in haystacks.items():
            assert not any(piece in text for piece in pieces), f"material of {key} found in {where}"
        assert "PRIVATE KEY" not in "\n".join(captured["events"] + captured["texts"])


def test_second_install_reuses_the_ca_and_changes_nothing(captured: dict[str, Any], bundle_v1: Path,
                                                         trusted_root: Path) -> None:
    root: Path = captured["root"]
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted((root / "tls").rglob("*")) if p.is_file()}
    pki_before = {p: p.read_bytes() for p in sorted((root / "state" / "pki").rglob("*")) if p.is_file()}
    proc = run_cli("install", "--bundle", str(bundle_v1), "--trusted-root", str(trusted_root), "--root", str(root),
                   "-i", str(root.parent / "inv.yaml"), "--skip-preflight", "--no-start", "--json")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    out = json.loads(proc.stdout)
    assert out["changed"] == 0 and out["playbook"]["hosts"]["local"]["changed"] == 0
    assert not any("issued" in note or "created the installation CA" in note for note in out["notes"])
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in before} == before
    assert {p: p.read_bytes() for p in pki_before} == pki_before
    for pieces in key_fragments(root).values():
        assert not any(piece in proc.stdout + proc.stderr for piece in pieces)

    status = run_cli("status", "--root", str(root), "--json")
    pki = json.loads(status.stdout)["pki"]
    marker = json.loads((root / "tls" / "issuer.json").read_text())
    assert pki["ca_fingerprint"] == marker["ca_fingerprint"]
    assert {(c["node"], c["certificate"]) for c in pki["certificates"]} == {
        ("local", "server"), ("local", "engine-server"), ("local", "engine-client")}
    assert all(c["days_left"] > 300 for c in pki["certificates"])
    table = run_cli("status", "--root", str(root), env={"COLUMNS": "200"})
    assert f"internal CA: {marker['ca_fingerprint']}" in table.stdout
    assert "engine-client" in table.stdout and pki["certificates"][0]["not_after"] in table.stdout


def test_a_changed_gateway_host_gets_a_new_certificate(tmp_path: Path, bundle_v1: Path, trusted_root: Path) -> None:
    root = tmp_path / "root"
    args = ["install", "--bundle", str(bundle_v1), "--trusted-root", str(trusted_root), "--root", str(root),
            "--skip-preflight", "--no-start", "--json"]
    assert run_cli(*args, "-i", str(inventory_file(tmp_path / "a.yaml"))).returncode == 0
    old = (root / "tls" / "server.pem").read_bytes()
    ca = (root / "tls" / "ca.pem").read_bytes()
    proc = run_cli(*args, "-i", str(inventory_file(tmp_path / "b.yaml", gateway_host="gw.test.internal")))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    out = json.loads(proc.stdout)
    assert out["changed"] > 0
    assert any("issued server, engine-server, engine-client certificate(s) (host names changed: "
               "+gw.test.internal)" in n for n in out["notes"]), out["notes"]
    new = x509.load_pem_x509_certificate((root / "tls" / "server.pem").read_bytes())
    assert (root / "tls" / "server.pem").read_bytes() != old and (root / "tls" / "ca.pem").read_bytes() == ca
    names = new.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "gw.test.internal" in names.get_values_for_type(x509.DNSName)


def test_a_corrupt_ca_key_stops_the_install(tmp_path: Path, bundle_v1: Path, bundle_factory: Any,
                                            trusted_root: Path) -> None:
    root = tmp_path / "root"
    inv = str(inventory_file(tmp_path / "inv.yaml"))
    assert run_cli("install", "--bundle", str(bundle_v1), "--trusted-root", str(trusted_root), "--root", str(root),
                   "-i", inv, "--skip-preflight", "--no-start").returncode == 0
    key = root / "state" / "pki" / "ca.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\nnot a key at all\n-----END PRIVATE KEY-----\n")
    key.chmod(0o600)
    tls_before = {p: p.read_bytes() for p in sorted((root / "tls").rglob("*")) if p.is_file()}
    newer = bundle_factory("0.2.0")
    proc = run_cli("upgrade", "--bundle", str(newer), "--trusted-root", str(trusted_root), "--root", str(root),
                   "-i", inv, "--skip-preflight", "--no-start", "--json")
    assert proc.returncode == 1, proc.stderr + proc.stdout
    out = json.loads(proc.stdout)
    assert out["error"] == "PkiError" and out["exit_code"] == 1
    assert out["message"].startswith(f"{key}: expected an unencrypted PEM ECDSA P-256 private key")
    assert "not a key at all" not in proc.stdout + proc.stderr
    assert not (root / "releases" / "0.2.0").exists() and (root / "current").resolve().name == "0.1.0"
    assert {p: p.read_bytes() for p in tls_before} == tls_before
    last = read_entries(root / "journal" / "installer.jsonl")[-1]
    assert (last["action"], last["result"], last["version"]) == ("upgrade", "refused", "0.2.0")
    assert str(key) in last["detail"]
    plain = run_cli("upgrade", "--bundle", str(newer), "--trusted-root", str(trusted_root), "--root", str(root),
                    "-i", inv, "--skip-preflight", "--no-start", env={"COLUMNS": "300"})
    assert plain.returncode == 1 and "error (PkiError)" in plain.stderr and str(key) in " ".join(plain.stderr.split())
