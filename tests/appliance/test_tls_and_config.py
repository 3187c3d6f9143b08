from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest

from appliance.config import load_config
from appliance.errors import ConfigError, PortInUseError
from appliance.server import check_port_free
from appliance.tls import ensure_tls


def test_tls_material_is_private_valid_and_reused(tmp_path: Path) -> None:
    files = ensure_tls(tmp_path / "tls", ["localhost", "127.0.0.1"])
    assert files.key.stat().st_mode & 0o777 == 0o600
    ctx = ssl.create_default_context(cafile=str(files.ca_cert))
    ctx.load_cert_chain(str(files.cert), str(files.key))  # key matches certificate
    first = files.cert.read_bytes()
    assert ensure_tls(tmp_path / "tls", ["localhost", "127.0.0.1"]).cert.read_bytes() == first
    # A host name the certificate does not cover makes a new one.
    assert ensure_tls(tmp_path / "tls", ["localhost", "127.0.0.1", "gw.internal"]).cert.read_bytes() != first


def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"port {port} on 127.0.0.1 is already in use"):
            check_port_free("127.0.0.1", port)


def test_missing_install_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no installed release"):
        load_config(tmp_path)


def test_bad_config_values_name_the_field(tmp_path: Path) -> None:
    (tmp_path / "current").mkdir()
    cfg = tmp_path / "current" / "appliance.yaml"
    cfg.write_text("version: '1'\nmodel: {name: m, path: /x}\npolicies_dir: /p\ngateway: {port: 70000}\n")
    with pytest.raises(ConfigError, match=r"gateway.port must be an integer in 1..65535, found 70000"):
        load_config(tmp_path)
    cfg.write_text("version: '1'\npolicies_dir: /p\n")
    with pytest.raises(ConfigError, match="missing key 'model'"):
        load_config(tmp_path)
    cfg.write_text("- not a mapping\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(tmp_path)


def test_engine_section_is_validated_and_resolved(tmp_path: Path) -> None:
    (tmp_path / "current").mkdir()
    cfg = tmp_path / "current" / "appliance.yaml"
    base = "version: '1'\nmodel: {name: m, path: /x}\npolicies_dir: /p\n"
    cfg.write_text(base)
    settings = load_config(tmp_path).engine
    assert settings.resolved(cuda_available=False) == {"device": "cpu", "dtype": "float32"}
    assert settings.resolved(cuda_available=True) == {"device": "cuda", "dtype": "bfloat16"}
    cfg.write_text(base + "engine: {device: tpu}\n")
    with pytest.raises(ConfigError, match=r"engine.device must be one of auto, cpu, cuda; found 'tpu'"):
        load_config(tmp_path)
    cfg.write_text(base + "engine: {kv_cache_bytes: -5}\n")
    with pytest.raises(ConfigError, match=r"engine.kv_cache_bytes must be a positive integer"):
        load_config(tmp_path)
    cfg.write_text(base + "engine: {colour: blue}\n")
    with pytest.raises(ConfigError, match="engine must be a mapping of device"):
        load_config(tmp_path)


def _installer_tls(tmp_path: Path, gateway_host: str = "127.0.0.1") -> tuple[Path, Path]:
    """What the installer's sovereign_tls role leaves on a node: ROOT/tls with the files issued by
    the installation CA and the issuer.json marker. Returns (tls dir, the CA's pki dir)."""
    import json
    import shutil

    from installer import Inventory, InventoryNode, RootLayout
    from installer.inventory import GatewaySettings
    from installer.pki import prepare_pki, tls_vars

    inv = Inventory(gateway=GatewaySettings(host=gateway_host), nodes=[
        InventoryNode(name="local", labels={"region": "r", "site": "s", "classification": "c"})])
    result = prepare_pki(RootLayout(tmp_path / "root"), inv)
    tls = tmp_path / "root" / "tls"
    for entry in tls_vars(result)["sovereign_tls_files"]["local"]:
        dest = tls / entry["dest"]
        dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        shutil.copyfile(entry["src"], dest)
        dest.chmod(0o600 if entry["secret"] else 0o644)
    (tls / "issuer.json").write_text(json.dumps({"issuer": "sovereign-installer",
                                                 "ca_fingerprint": result.ca_fingerprint, "node": "local"}))
    return tls, result.pki_dir


def test_installer_issued_tls_is_used_as_it_is(tmp_path: Path) -> None:
    from appliance.tls import installer_tls

    tls, pki = _installer_tls(tmp_path)
    before = {p.name: p.read_bytes() for p in tls.iterdir() if p.is_file()}
    files = installer_tls(tls, "127.0.0.1")
    assert files is not None and files.cert == tls / "server.pem"
    # ensure_tls is not reached, and nothing was regenerated
    assert {p.name: p.read_bytes() for p in tls.iterdir() if p.is_file()} == before
    # what clients trust is the installation CA kept by the installer
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    ctx.load_cert_chain(str(files.cert), str(files.key))
    assert installer_tls(tmp_path / "bare", "127.0.0.1") is None  # no marker: the dev path applies


def test_installer_tls_that_does_not_fit_fails_at_start(tmp_path: Path) -> None:
    from appliance.errors import TlsError
    from appliance.tls import installer_tls

    tls, _ = _installer_tls(tmp_path)
    with pytest.raises(TlsError) as info:
        installer_tls(tls, "gw.example.internal")
    message = str(info.value)
    assert str(tls / "server.pem") in message and "expected a certificate for gw.example.internal" in message
    assert "run `sovereign-installer install` again" in message
    before = (tls / "server.pem").read_bytes()
    assert installer_tls(tls, "0.0.0.0") is not None  # a wildcard listens on names the certificate has
    (tls / "server.key").chmod(0o644)
    with pytest.raises(TlsError, match=r"server.key: expected mode 0600 \(private\), found 0644"):
        installer_tls(tls, "127.0.0.1")
    (tls / "server.key").chmod(0o600)
    (tls / "ca.pem").write_bytes(ensure_tls(tmp_path / "other", ["localhost"]).ca_cert.read_bytes())
    with pytest.raises(TlsError, match=r"ca.pem: expected the CA sha256:[0-9a-f]{64} named in .*issuer.json"):
        installer_tls(tls, "127.0.0.1")
    assert (tls / "server.pem").read_bytes() == before  # never replaced silently


def test_expired_installer_tls_fails_at_start(tmp_path: Path) -> None:
    import datetime as dt
    from unittest import mock

    from appliance.errors import TlsError
    from appliance.tls import installer_tls

    tls, _ = _installer_tls(tmp_path)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=800)
    with mock.patch("appliance.tls.dt") as fake_dt:
        fake_dt.datetime.now.return_value = later
        fake_dt.UTC = dt.UTC
        with pytest.raises(TlsError, match=r"server.pem: expected a certificate valid now .*run `sovereign-installer "
                                           r"install` again"):
            installer_tls(tls, "127.0.0.1")
