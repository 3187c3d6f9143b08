"""The installation's internal CA (installer/pki.py): created once and reused, node certificates
reissued only when they must be, refused when the CA is damaged or exposed, and the engine's
mutual-TLS material proven with a real TLS handshake."""

from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from engine.remote import client_ssl_context
from installer import EXIT_REFUSED, Inventory, InventoryNode, RootLayout
from installer.database import DatabaseSettings
from installer.errors import PkiError
from installer.inventory import GatewaySettings
from installer.pki import PkiConfig, node_sans, prepare_pki, tls_vars

LABELS = {"region": "eu", "site": "dc1", "classification": "internal"}


SHARED_DB = DatabaseSettings(url="postgresql+psycopg://sovereign@db.example:5432/sovereign")  # two gateway nodes


def inventory(gateway_host: str = "127.0.0.1", remote_host: str = "10.0.0.12") -> Inventory:
    return Inventory(gateway=GatewaySettings(host=gateway_host, port=9443), database=SHARED_DB, nodes=[
        InventoryNode(name="node-1", connection="local", labels=LABELS),
        InventoryNode(name="gpu-2", connection="ssh", host=remote_host, labels=LABELS)])


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def sans(path: Path) -> set[str]:
    ext = load(path).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(v) for v in ext.get_values_for_type(x509.DNSName)} | {
        str(v) for v in ext.get_values_for_type(x509.IPAddress)}


def snapshot(pki: Path) -> dict[str, bytes]:
    return {str(p.relative_to(pki)): p.read_bytes() for p in sorted(pki.rglob("*")) if p.is_file()}


def test_ca_is_created_once_private_and_reused(tmp_path: Path) -> None:
    layout = RootLayout(tmp_path / "root")
    first = prepare_pki(layout, inventory())
    assert first.ca_created and len(first.reissued) == 6  # 3 certificates x 2 nodes
    pki = layout.pki
    assert stat.S_IMODE(pki.stat().st_mode) == 0o700
    assert stat.S_IMODE((pki / "ca.key").stat().st_mode) == 0o600
    for key in pki.rglob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    ca = load(pki / "ca.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    assert first.ca_fingerprint == "sha256:" + ca.fingerprint(hashes.SHA256()).hex()
    before = snapshot(pki)

    second = prepare_pki(layout, inventory())
    assert not second.ca_created and second.reissued == [] and second.notes() == []
    assert second.ca_fingerprint == first.ca_fingerprint
    assert snapshot(pki) == before  # byte for byte: the role then copies nothing new


def test_node_certificates_cover_the_node_and_have_their_usage(tmp_path: Path) -> None:
    layout = RootLayout(tmp_path / "root")
    inv = inventory(gateway_host="gw.example.internal")
    prepare_pki(layout, inv)
    node_dir = layout.pki / "nodes" / "gpu-2"
    expected = {"gpu-2", "10.0.0.12", "gw.example.internal", "localhost", "127.0.0.1", "::1"}
    assert sans(node_dir / "server.pem") == expected == sans(node_dir / "engine-server.pem")
    assert node_sans(inv.nodes[1], inv) == ["gpu-2", "10.0.0.12", "gw.example.internal", "localhost",
                                            "127.0.0.1", "::1"]
    eku = {stem: list(load(node_dir / f"{stem}.pem").extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
           for stem in ("server", "engine-server", "engine-client")}
    assert eku == {"server": [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH],
                   "engine-server": [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH],
                   "engine-client": [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]}
    # a wildcard gateway host is not a name a certificate can carry
    assert "0.0.0.0" not in node_sans(inventory(gateway_host="0.0.0.0").nodes[0], inventory(gateway_host="0.0.0.0"))


def test_a_node_whose_names_changed_gets_a_new_certificate(tmp_path: Path) -> None:
    layout = RootLayout(tmp_path / "root")
    first = prepare_pki(layout, inventory(remote_host="10.0.0.12"))
    untouched = (layout.pki / "nodes" / "node-1" / "server.pem").read_bytes()
    old = (layout.pki / "nodes" / "gpu-2" / "server.pem").read_bytes()

    second = prepare_pki(layout, inventory(remote_host="10.0.0.99"))
    assert second.ca_fingerprint == first.ca_fingerprint and not second.ca_created
    assert {(leaf.node, leaf.stem) for leaf in second.reissued} == {
        ("gpu-2", "server"), ("gpu-2", "engine-server"), ("gpu-2", "engine-client")}
    assert all(leaf.reason == "host names changed: +10.0.0.99, -10.0.0.12" for leaf in second.reissued)
    assert (layout.pki / "nodes" / "gpu-2" / "server.pem").read_bytes() != old
    assert "10.0.0.99" in sans(layout.pki / "nodes" / "gpu-2" / "server.pem")
    assert (layout.pki / "nodes" / "node-1" / "server.pem").read_bytes() == untouched


def test_certificates_near_expiry_are_reissued(tmp_path: Path) -> None:
    layout = RootLayout(tmp_path / "root")
    prepare_pki(layout, inventory(), PkiConfig(leaf_days=40, renew_before_days=30))
    assert prepare_pki(layout, inventory(), PkiConfig(leaf_days=40, renew_before_days=30)).reissued == []
    # the same certificates, now judged with a 45-day renewal window: all expire within it
    again = prepare_pki(layout, inventory(), PkiConfig(leaf_days=60, renew_before_days=45))
    assert len(again.reissued) == 6 and all("within 45 days" in leaf.reason for leaf in again.reissued)


def test_a_corrupt_ca_key_is_a_clear_error_and_nothing_is_written(tmp_path: Path) -> None:
    layout = RootLayout(tmp_path / "root")
    prepare_pki(layout, inventory())
    key = layout.pki / "ca.key"
    secret = key.read_bytes()
    key.write_bytes(secret[:60] + b"garbage" + secret[80:])
    (layout.pki / "nodes" / "gpu-2" / "server.pem").unlink()  # would be reissued by a working CA
    before = snapshot(layout.pki)
    with pytest.raises(PkiError) as info:
        prepare_pki(layout, inventory())
    message = str(info.value)
    assert info.value.exit_code == EXIT_REFUSED
    assert str(key) in message and "expected an unencrypted PEM ECDSA P-256 private key" in message
    assert "garbage" not in message and secret.decode()[40:80] not in message  # no key material in the message
    assert snapshot(layout.pki) == before


def test_a_ca_key_with_loose_permissions_is_refused(tmp_path: Path) -> None:
    layout = RootLayout(tmp_path / "root")
    prepare_pki(layout, inventory())
    key = layout.pki / "ca.key"
    key.chmod(0o644)
    with pytest.raises(PkiError, match=r"ca.key: expected the installation CA key with mode 0600 \(owner only\), "
                                       r"found 0644; refusing to use it"):
        prepare_pki(layout, inventory())
    key.chmod(0o600)
    layout.pki.chmod(0o755)
    with pytest.raises(PkiError, match=r"pki: expected the installation CA directory with mode 0700"):
        prepare_pki(layout, inventory())


def test_a_lost_ca_key_is_never_silently_replaced(tmp_path: Path) -> None:
    layout = RootLayout(tmp_path / "root")
    prepare_pki(layout, inventory())
    (layout.pki / "ca.key").unlink()
    with pytest.raises(PkiError, match=r"expected the installation CA \(ca.key and ca.pem\), found no ca.key"):
        prepare_pki(layout, inventory())
    assert not (layout.pki / "ca.key").exists()


def test_an_expiring_ca_must_be_rotated(tmp_path: Path) -> None:
    layout = RootLayout(tmp_path / "root")
    prepare_pki(layout, inventory(), PkiConfig(ca_days=50, leaf_days=40, renew_before_days=30))
    with pytest.raises(PkiError, match=r"ca.pem: expected the CA to be valid for more than 60 days.*rotate the CA"):
        prepare_pki(layout, inventory(), PkiConfig(ca_days=3650, leaf_days=90, renew_before_days=60))


def test_tls_vars_name_files_and_hashes_never_content(tmp_path: Path) -> None:
    layout = RootLayout(tmp_path / "root")
    result = prepare_pki(layout, inventory())
    data = tls_vars(result)
    files = data["sovereign_tls_files"]["node-1"]
    assert {f["dest"] for f in files} == {"ca.pem", "server.pem", "server.key", "engine/ca.pem", "engine/server.pem",
                                          "engine/server.key", "engine/client.pem", "engine/client.key"}
    assert {f["dest"] for f in files if f["secret"]} == {"server.key", "engine/server.key", "engine/client.key"}
    assert "PRIVATE KEY" not in repr(data) and "CERTIFICATE" not in repr(data)


def test_engine_mutual_tls_material_works_with_hostname_checks(tmp_path: Path) -> None:
    """gpu-2's engine node server and node-1's gateway client certificate, in a real TLS 1.2+
    handshake: the client checks the server's name (10.0.0.12 is gpu-2's; served here on loopback,
    so the name checked is 'gpu-2'), the server requires a certificate from the installation CA."""
    layout = RootLayout(tmp_path / "root")
    prepare_pki(layout, inventory())
    pki = layout.pki
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.pem"))
    server_ctx.load_cert_chain(str(pki / "nodes/gpu-2/engine-server.pem"), str(pki / "nodes/gpu-2/engine-server.key"))
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = client_ssl_context(pki / "ca.pem", pki / "nodes/node-1/engine-client.pem",
                                    pki / "nodes/node-1/engine-client.key")
    seen: dict[str, object] = {}

    with socket.create_server(("127.0.0.1", 0)) as listener:
        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    seen["peer"] = tls.getpeercert()
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError) as exc:
                seen["error"] = exc

        thread = threading.Thread(target=serve)
        thread.start()
        with socket.create_connection(listener.getsockname()) as raw, \
                client_ctx.wrap_socket(raw, server_hostname="gpu-2") as tls:
            assert tls.recv(2) == b"ok"
        thread.join(timeout=10)
    peer = seen.get("peer")
    assert isinstance(peer, dict), seen
    assert dict(x[0] for x in peer["subject"])["commonName"] == "node-1 gateway"

    # a gateway server certificate is not a client certificate: the engine server refuses it
    wrong = client_ssl_context(pki / "ca.pem", pki / "nodes/node-1/server.pem", pki / "nodes/node-1/server.key")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        def refuse() -> None:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except (ssl.SSLError, OSError) as exc:
                seen["refused"] = exc

        thread = threading.Thread(target=refuse)
        thread.start()
        with socket.create_connection(listener.getsockname()) as raw:
            try:
                with wrong.wrap_socket(raw, server_hostname="gpu-2") as tls:
                    tls.sendall(b"x")
                    tls.recv(1)
            except (ssl.SSLError, OSError):
                pass
        thread.join(timeout=10)
    assert "unsuitable certificate purpose" in str(seen.get("refused", "")), seen


def test_leaf_validity_never_outlives_the_ca(tmp_path: Path) -> None:
    layout = RootLayout(tmp_path / "root")
    prepare_pki(layout, inventory(), PkiConfig(ca_days=100, leaf_days=90, renew_before_days=30))
    ca = load(layout.pki / "ca.pem")
    leaf = load(layout.pki / "nodes" / "node-1" / "server.pem")
    assert leaf.not_valid_after_utc <= ca.not_valid_after_utc
    assert leaf.not_valid_after_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=89)
    assert os.path.samefile(layout.pki, layout.root / "state" / "pki")
