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
