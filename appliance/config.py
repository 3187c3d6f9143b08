"""Runtime configuration of an installed appliance, read from ``ROOT/current/appliance.yaml``.

The installer templates that file; the appliance only reads it. Paths inside it are absolute.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from appliance.errors import ConfigError

ROLES = ("gateway", "engine")
MAX_WORKERS = 64  # gateway.workers


@dataclass(frozen=True)
class NodeConfig:
    """This host: its name, placement labels, roles and the model names its engine serves
    (empty: the release's model)."""

    name: str
    labels: dict[str, str] = field(default_factory=dict)
    roles: tuple[str, ...] = ROLES
    models: tuple[str, ...] = ()


@dataclass(frozen=True)
class EngineNodeSettings:
    """The ``engine_node:`` section: where this host's engine node server (mutual TLS) listens."""

    host: str = "127.0.0.1"
    port: int = 9443


@dataclass(frozen=True)
class FleetNode:
    """One engine node the gateway routes to (``fleet.nodes[]``), as the installer wrote it."""

    name: str
    url: str
    labels: dict[str, str]
    models: tuple[str, ...]


@dataclass(frozen=True)
class FleetSettings:
    """The ``fleet:`` section. ``nodes`` empty: the engine runs in-process (single node).
    Timeouts and intervals are seconds; every one is configuration."""

    nodes: tuple[FleetNode, ...] = ()
    health_interval_s: float = 1.0
    health_backoff_max_s: float = 5.0
    connect_timeout_s: float = 5.0
    # Longest wait for any byte from a node: for its first token (its queue included) and between
    # two tokens. A node that stays silent longer fails the request (``read_timeout``).
    read_timeout_s: float = 120.0


@dataclass(frozen=True)
class EngineSettings:
    """The ``engine:`` section (optional). ``auto`` picks CUDA + bfloat16 when a GPU is present."""

    device: str = "auto"
    dtype: str = "auto"
    kv_cache_bytes: int | None = None
    max_num_seqs: int | None = None
    scheduling: str = "sla"  # "sla" (classes, deadlines, fair share) | "fcfs" (arrival order: a baseline)
    max_wait_s: float | None = None  # aging step of the lowest classes; None: the engine's default
    quantization: str | None = None  # weight-only "int8" | "int4" at load; None: as the model is stored
    speculative_tokens: int = 0  # prompt-lookup speculative decoding: drafted tokens per step (0: off)

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"engine.device must be one of auto, cpu, cuda; found {self.device!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"engine.dtype must be one of auto, float32, bfloat16, float16; found {self.dtype!r}")
        for name in ("kv_cache_bytes", "max_num_seqs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"engine.{name} must be a positive integer, found {value!r}")
        if self.scheduling not in ("sla", "fcfs"):
            raise ConfigError(f"engine.scheduling must be sla or fcfs, found {self.scheduling!r}")
        if self.max_wait_s is not None and (isinstance(self.max_wait_s, bool)
                                            or not isinstance(self.max_wait_s, int | float) or self.max_wait_s <= 0):
            raise ConfigError(f"engine.max_wait_s must be a number of seconds > 0, found {self.max_wait_s!r}")
        if self.quantization not in (None, "int8", "int4"):
            raise ConfigError(f"engine.quantization must be int8 or int4 (or absent), found {self.quantization!r}")
        if (isinstance(self.speculative_tokens, bool) or not isinstance(self.speculative_tokens, int)
                or not 0 <= self.speculative_tokens <= 16):
            raise ConfigError(
                f"engine.speculative_tokens must be an integer from 0 (off) to 16, found {self.speculative_tokens!r}")

    def resolved(self, cuda_available: bool) -> dict[str, object]:
        device = ("cuda" if cuda_available else "cpu") if self.device == "auto" else self.device
        dtype = ("bfloat16" if device == "cuda" else "float32") if self.dtype == "auto" else self.dtype
        out: dict[str, object] = {"device": device, "dtype": dtype}
        if self.kv_cache_bytes is not None:
            out["kv_cache_bytes"] = self.kv_cache_bytes
        if self.max_num_seqs is not None:
            out["max_num_seqs"] = self.max_num_seqs
        if self.scheduling != "sla":
            out["scheduling"] = self.scheduling
        if self.max_wait_s is not None:
            out["max_wait_s"] = float(self.max_wait_s)
        if self.quantization is not None:
            out["quantization"] = self.quantization
        if self.speculative_tokens:
            out["speculative_tokens"] = self.speculative_tokens
        return out


@dataclass(frozen=True)
class AuditAnchorSettings:
    """``audit:`` keys for anchors off the box (appliance/audit/anchoring.py); all off when absent."""

    publish_dir: Path | None = None  # every signed checkpoint is written here as a C2SP note file
    witness_url: str | None = None  # http(s)://host:port of a tlog-witness (loopback or LAN)
    witness_key: str | None = None  # the witness's verifier key, name+id+base64
    witness_interval_s: float = 10.0  # at most one submission per tree this often
    witness_timeout_s: float = 10.0
    witness_streams: bool = False  # also each tenant stream's tree, not only the appliance-wide _all
    witness_ca: Path | None = None  # CA of the witness's TLS certificate (https)
    witness_client_cert: Path | None = None  # client certificate and key for mutual TLS
    witness_client_key: Path | None = None


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
    engine_node: EngineNodeSettings = field(default_factory=EngineNodeSettings)
    fleet: FleetSettings = field(default_factory=FleetSettings)
    edge: Any = None  # appliance.gateway.edge.EdgeLimits from gateway.limits (defaults when absent)
    audit_min_free_bytes: int = 256 << 20  # below this free space in data/ requests are refused (503)
    audit_anchors: AuditAnchorSettings = field(default_factory=AuditAnchorSettings)
    database_url: str = ""  # database.url: tenants, keys, nodes, usage and audit; empty: data/appliance.db
    gateway_workers: int = 1  # gateway.workers: gateway processes sharing the port (appliance/workers.py)

    @property
    def served_models(self) -> tuple[str, ...]:
        """The model names this host's engine serves."""
        return self.node.models or (self.model_name,)

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
        return self.database_url or f"sqlite:///{self.data_dir / 'appliance.db'}"

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
    workers = gateway.get("workers", 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= MAX_WORKERS:
        raise ConfigError(f"{path}: gateway.workers must be an integer in 1..{MAX_WORKERS} (gateway processes "
                          f"sharing the port), found {workers!r}")
    engine = doc.get("engine") or {}
    known = [f.name for f in dataclasses.fields(EngineSettings)]
    if not isinstance(engine, dict) or set(engine) - set(known):
        raise ConfigError(f"{path}: engine must be a mapping of {', '.join(known)}; found {engine!r}")
    return ApplianceConfig(
        root=root,
        version=str(_require(doc, "version", str, path)),
        bundle_digest=str(doc.get("bundle_digest", "")),
        model_name=str(_require(model, "name", str, path)),
        model_path=Path(_require(model, "path", str, path)),
        policies_dir=Path(_require(doc, "policies_dir", str, path)),
        node=_node(node, path),
        host=str(gateway.get("host", "127.0.0.1")),
        port=port,
        engine=EngineSettings(**engine),
        engine_node=_engine_node(doc.get("engine_node") or {}, path),
        fleet=_fleet(doc.get("fleet") or {}, path),
        edge=_edge(gateway.get("limits"), path),
        audit_min_free_bytes=_min_free(doc.get("audit") or {}, path),
        audit_anchors=_audit_anchors(doc.get("audit") or {}, path),
        database_url=_database_url(doc.get("database") or {}, path),
        gateway_workers=workers,
    )


def _database_url(doc: Any, path: Path) -> str:
    """``database: {url: ...}``: a PostgreSQL URL shared by several gateways (empty: the SQLite file)."""
    if not isinstance(doc, dict) or set(doc) - {"url"}:
        raise ConfigError(f"{path}: database: expected a mapping with url, found {str(doc)[:80]!r}")
    url = doc.get("url") or ""
    if not isinstance(url, str) or (url and not url.startswith(("sqlite:///", "postgresql+psycopg://"))):
        shown = url.split("://", 1)[0] + "://..." if isinstance(url, str) else type(url).__name__
        raise ConfigError(f"{path}: database.url: expected sqlite:///PATH or "
                          f"postgresql+psycopg://USER@HOST:PORT/DB, found {shown}")
    return url


def _edge(doc: Any, path: Path) -> Any:
    from appliance.gateway.edge import EdgeLimits  # here, not at import: the gateway imports this module

    if doc is not None and not isinstance(doc, dict):
        raise ConfigError(f"{path}: gateway.limits must be a mapping of limit names to numbers, found {doc!r}")
    try:
        return EdgeLimits.from_mapping(doc)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: gateway.limits: {exc}") from None


_AUDIT_PATHS = ("publish_dir", "witness_ca", "witness_client_cert", "witness_client_key")
_AUDIT_KEYS = {"min_free_bytes", "witness_url", "witness_key", "witness_interval_s", "witness_timeout_s",
               "witness_streams", *_AUDIT_PATHS}


def _min_free(doc: Any, path: Path) -> int:
    if not isinstance(doc, dict) or set(doc) - _AUDIT_KEYS:
        raise ConfigError(f"{path}: audit must be a mapping of {', '.join(sorted(_AUDIT_KEYS))}; found {doc!r}")
    value = doc.get("min_free_bytes", 256 << 20)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{path}: audit.min_free_bytes must be an integer >= 0, found {value!r}")
    return value


def _audit_anchors(doc: dict[str, Any], path: Path) -> AuditAnchorSettings:
    values: dict[str, Any] = {}
    for name in _AUDIT_PATHS:
        given = doc.get(name)
        if given is not None and not (isinstance(given, str) and given.startswith("/")):
            raise ConfigError(f"{path}: audit.{name} must be an absolute path, found {given!r}")
        values[name] = None if given is None else Path(given)
    for name in ("witness_interval_s", "witness_timeout_s"):
        seconds = doc.get(name, 10.0)
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 < seconds <= 86400:
            raise ConfigError(f"{path}: audit.{name} must be a number of seconds in (0, 86400], found {seconds!r}")
        values[name] = float(seconds)
    streams = doc.get("witness_streams", False)
    if not isinstance(streams, bool):
        raise ConfigError(f"{path}: audit.witness_streams must be true or false, found {streams!r}")
    url, key = doc.get("witness_url"), doc.get("witness_key")
    for name, value in (("witness_url", url), ("witness_key", key)):
        if value is not None and not (isinstance(value, str) and value.strip()):
            raise ConfigError(f"{path}: audit.{name} must be a non-empty string, found {value!r}")
    if (url is None) != (key is None):
        raise ConfigError(f"{path}: audit.witness_url and audit.witness_key go together (a cosignature is only "
                          f"worth keeping once checked with the witness's key); found only "
                          f"{'witness_url' if key is None else 'witness_key'}")
    if url is not None and not url.startswith(("http://", "https://")):
        raise ConfigError(f"{path}: audit.witness_url must be http://host:port or https://host:port, found {url!r}")
    if (values["witness_client_cert"] is None) != (values["witness_client_key"] is None):
        raise ConfigError(f"{path}: audit.witness_client_cert and audit.witness_client_key go together, found one")
    return AuditAnchorSettings(witness_url=url, witness_key=None if key is None else key.strip(),
                               witness_streams=streams, **values)


def _str_list(value: Any, where: str, path: Path) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{path}: {where} must be a list of non-empty strings, found {value!r}")
    return tuple(value)


def _labels(value: Any, where: str, path: Path) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ConfigError(f"{path}: {where} must be a mapping of strings to strings, found {value!r}")
    return dict(value)


def _node(node: Any, path: Path) -> NodeConfig:
    if not isinstance(node, dict):
        raise ConfigError(f"{path}: node must be a mapping, found {node!r}")
    roles = _str_list(node.get("roles", list(ROLES)), "node.roles", path)
    unknown = sorted(set(roles) - set(ROLES))
    if unknown or not roles:
        raise ConfigError(f"{path}: node.roles must be a non-empty subset of {list(ROLES)}, found {list(roles)}")
    labels = _labels(node.get("labels") or {}, "node.labels", path)
    return NodeConfig(name=str(node.get("name", "local")), labels=labels, roles=roles,
                      models=_str_list(node.get("models", []), "node.models", path))


def _engine_node(doc: Any, path: Path) -> EngineNodeSettings:
    if not isinstance(doc, dict) or set(doc) - {"host", "port"}:
        raise ConfigError(f"{path}: engine_node must be a mapping of host, port; found {doc!r}")
    port = doc.get("port", 9443)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"{path}: engine_node.port must be an integer in 1..65535, found {port!r}")
    return EngineNodeSettings(host=str(doc.get("host", "127.0.0.1")), port=port)


FLEET_NUMBERS = ("health_interval_s", "health_backoff_max_s", "connect_timeout_s", "read_timeout_s")


def _fleet(doc: Any, path: Path) -> FleetSettings:
    if not isinstance(doc, dict) or set(doc) - {"nodes", *FLEET_NUMBERS}:
        raise ConfigError(f"{path}: fleet must be a mapping of nodes and {', '.join(FLEET_NUMBERS)}; found {doc!r}")
    numbers: dict[str, float] = {}
    for key in FLEET_NUMBERS:
        if key in doc:
            value = doc[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ConfigError(f"{path}: fleet.{key} must be a positive number of seconds, found {value!r}")
            numbers[key] = float(value)
    nodes: list[FleetNode] = []
    raw = doc.get("nodes") or []
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: fleet.nodes must be a list, found {raw!r}")
    for i, entry in enumerate(raw):
        where = f"fleet.nodes[{i}]"
        if not isinstance(entry, dict) or set(entry) - {"name", "url", "labels", "models"}:
            raise ConfigError(f"{path}: {where} must be a mapping of name, url, labels, models; found {entry!r}")
        name, url = entry.get("name"), entry.get("url")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{path}: {where}.name must be a non-empty string, found {name!r}")
        if not isinstance(url, str) or not url.startswith("https://"):
            raise ConfigError(f"{path}: {where}.url must be an https:// URL (mutual TLS), found {url!r}")
        nodes.append(FleetNode(name, url, _labels(entry.get("labels") or {}, f"{where}.labels", path),
                               _str_list(entry.get("models") or [], f"{where}.models", path)))
    names = [n.name for n in nodes]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{path}: fleet.nodes: each name once, found {dupes} more than once")
    return FleetSettings(nodes=tuple(nodes), **numbers)
