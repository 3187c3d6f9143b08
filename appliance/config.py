"""Runtime configuration of an installed appliance, read from ``ROOT/current/appliance.yaml``.

The installer templates that file; the appliance only reads it. Paths inside it are absolute.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from appliance.errors import ConfigError


@dataclass(frozen=True)
class NodeConfig:
    name: str
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class EngineSettings:
    """The ``engine:`` section (optional). ``auto`` picks CUDA + bfloat16 when a GPU is present."""

    device: str = "auto"
    dtype: str = "auto"
    kv_cache_bytes: int | None = None
    max_num_seqs: int | None = None

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"engine.device must be one of auto, cpu, cuda; found {self.device!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"engine.dtype must be one of auto, float32, bfloat16, float16; found {self.dtype!r}")
        for name in ("kv_cache_bytes", "max_num_seqs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"engine.{name} must be a positive integer, found {value!r}")

    def resolved(self, cuda_available: bool) -> dict[str, object]:
        device = ("cuda" if cuda_available else "cpu") if self.device == "auto" else self.device
        dtype = ("bfloat16" if device == "cuda" else "float32") if self.dtype == "auto" else self.dtype
        out: dict[str, object] = {"device": device, "dtype": dtype}
        if self.kv_cache_bytes is not None:
            out["kv_cache_bytes"] = self.kv_cache_bytes
        if self.max_num_seqs is not None:
            out["max_num_seqs"] = self.max_num_seqs
        return out


@dataclass(frozen=True)
class ApplianceConfig:
    root: Path
    version: str
    bundle_digest: str
    model_name: str
    model_path: Path
    policies_dir: Path
    node: NodeConfig
    host: str = "127.0.0.1"
    port: int = 8443
    engine: EngineSettings = field(default_factory=EngineSettings)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def tls_dir(self) -> Path:
        return self.root / "tls"

    @property
    def secrets_dir(self) -> Path:
        return self.root / "secrets"

    @property
    def journal_path(self) -> Path:
        return self.root / "journal" / "installer.jsonl"

    @property
    def db_url(self) -> str:
        return f"sqlite:///{self.data_dir / 'appliance.db'}"

    @property
    def audit_key_path(self) -> Path:
        return self.secrets_dir / "audit-signing.key"


def _require(doc: dict[str, Any], key: str, kind: type, where: Path) -> Any:
    if key not in doc:
        raise ConfigError(f"{where}: missing key {key!r} (expected a {kind.__name__})")
    value = doc[key]
    if not isinstance(value, kind):
        raise ConfigError(
            f"{where}: key {key!r} must be a {kind.__name__}, found {type(value).__name__} {value!r}"
        )
    return value


def load_config(root: Path) -> ApplianceConfig:
    """Read the current release's appliance.yaml under ``root`` (the install root)."""
    root = root.resolve()
    path = root / "current" / "appliance.yaml"
    if not path.is_file():
        raise ConfigError(
            f"no installed release at {root}: expected {path} "
            "(run `sovereign-installer install` or `appliance quickstart` first)"
        )
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping at top level, found {type(doc).__name__}")
    model = _require(doc, "model", dict, path)
    node = doc.get("node") or {"name": "local", "labels": {}}
    gateway = doc.get("gateway") or {}
    port = gateway.get("port", 8443)
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"{path}: gateway.port must be an integer in 1..65535, found {port!r}")
    engine = doc.get("engine") or {}
    if not isinstance(engine, dict) or set(engine) - {"device", "dtype", "kv_cache_bytes", "max_num_seqs"}:
        raise ConfigError(f"{path}: engine must be a mapping of device, dtype, kv_cache_bytes, max_num_seqs; "
                          f"found {engine!r}")
    return ApplianceConfig(
        root=root,
        version=str(_require(doc, "version", str, path)),
        bundle_digest=str(doc.get("bundle_digest", "")),
        model_name=str(_require(model, "name", str, path)),
        model_path=Path(_require(model, "path", str, path)),
        policies_dir=Path(_require(doc, "policies_dir", str, path)),
        node=NodeConfig(name=str(node.get("name", "local")), labels=dict(node.get("labels") or {})),
        host=str(gateway.get("host", "127.0.0.1")),
        port=port,
        engine=EngineSettings(**engine),
    )
