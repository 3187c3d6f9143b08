"""Everything one running appliance holds, built from an install root.

``Runtime.open(root)`` reads the installed release's configuration and opens (creating on first
start) the database, the audit log, the tenant store, the secrets, the node registry and the
fleet. Without a ``fleet:`` section (a single-node install, the quickstart) the engine runs in
this process and is registered as the one node ``inprocess://<node name>``; with one, the
registry is synced from it (source ``inventory``) and every node is reached over mutual TLS with
the installer-issued gateway client certificate (ROOT/tls/engine/client.pem). Either way requests
go through the same router. The engine and the fleet are started and stopped with the gateway's
lifespan.

Each run has an id (``run_id``, uuid4 hex) carried by ``admin.appliance_started`` / ``stopped`` and
by every ``accepted`` record, and a run marker in the data directory (``runmarker.py``). The first
thing a run writes to the audit log is the reconciliation of a previous run that did not stop
cleanly (``reconcile.py``); the journal import, the admin bootstrap and the node sync come after.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
import torch

from appliance import loopguard
from appliance.admins import bootstrap_admins
from appliance.audit import AuditIntegrityError, AuditLog
from appliance.audit.anchoring import Anchoring
from appliance.audit.content import MASTER_KEY_FILE, ContentSealer
from appliance.audit.retention import Pruner
from appliance.config import ApplianceConfig, load_config
from appliance.db import open_database
from appliance.diskguard import DiskGuard
from appliance.errors import ConfigError
from appliance.fleet import EngineClient, Fleet
from appliance.journal_import import import_journal
from appliance.limit_leases import SharedRateLimiter
from appliance.loopguard import LoopGuard
from appliance.metrics import GatewayMetrics
from appliance.nodes import INPROCESS, Node, NodeRegistry
from appliance.policy_audit import record_policy_load
from appliance.reconcile import begin_run
from appliance.router import Router
from appliance.runmarker import RunMarker, marker_path, remove_marker
from appliance.secrets_store import ensure_secret
from appliance.service import ChatService
from appliance.tenancy import TenantStore
from appliance.usage import UsageStore
from engine import AsyncEngine, EngineConfig, RemoteEngine
from policies import PolicySet
from policies.effective import applied_policy_dir, load_in_force

log = logging.getLogger(__name__)
PRUNE_INTERVAL_S = 3600.0  # retention runs hourly (each run bounded: see audit/retention.py)


@dataclass
class Runtime:
    config: ApplianceConfig
    db: sa.Engine
    tenants: TenantStore
    audit: AuditLog
    policies: PolicySet
    engine: AsyncEngine | None  # the in-process engine of a single-node install
    service: ChatService
    usage: UsageStore
    nodes: NodeRegistry
    fleet: Fleet
    run: RunMarker  # this run's id, pid and start, as written to DATA_DIR/appliance.run
    pruner: Pruner | None = None  # retention: prunes old tenant record bodies every hour while serving
    prune_task: asyncio.Task[None] | None = None
    anchoring: Anchoring = field(default_factory=Anchoring)  # checkpoints published / witnessed off the box
    loop_guard: LoopGuard | None = None  # SOVEREIGN_LOOP_GUARD=1: database calls on the loop reported
    marker_file: Path | None = None  # this process's run marker (a gateway worker has its own)

    @property
    def run_id(self) -> str:
        return self.run.run_id

    @classmethod
    def open(cls, root: Path, *, engine_overrides: dict[str, object] | None = None, worker: int = 0) -> Runtime:
        """The runtime of ``root``; ``worker``: the index of this gateway worker (its own run marker)."""
        from appliance.gateway_roles import worker_marker_name

        config = load_config(root)
        config.data_dir.mkdir(parents=True, exist_ok=True)
        config.data_dir.chmod(0o700)
        db = open_database(config.db_url)
        anchoring = Anchoring.from_config(config)
        audit = AuditLog(config.db_url, config.audit_key_path, on_checkpoints=anchoring.on_checkpoints)
        anchoring.start(audit)
        tenants = TenantStore(db)
        policies = load_in_force(config.policies_dir, applied_policy_dir(config.data_dir))  # release + applied
        run = RunMarker.new()
        marker = config.data_dir / worker_marker_name(worker)
        # the first records of this run: the reconciliation of a previous one that did not stop cleanly
        begin_run(audit, lambda: [t.name for t in tenants.list_tenants(include_deleted=True)],
                  marker, run)
        try:  # whatever is still unsigned (an admin command's records, a crash's tail) is signed now
            audit.checkpoint()
        except AuditIntegrityError as exc:  # the tree stays unsigned: verify names it; serving goes on
            log.error("audit log: a tree does not verify and was not signed at start: %s", exc)
        try:
            runtime = cls._build(config, db, audit, tenants, policies, run, engine_overrides)
        except BaseException:
            # nothing was served: the next start is no unclean shutdown of this one
            anchoring.stop(5)
            remove_marker(marker, run)
            raise
        runtime.anchoring = anchoring
        runtime.marker_file = marker
        if anchoring.publisher is not None:
            anchoring.publisher.on_error = runtime.service.metrics.audit_publish_errors.inc
        return runtime

    @classmethod
    def _build(cls, config: ApplianceConfig, db: sa.Engine, audit: AuditLog, tenants: TenantStore,
               policies: PolicySet, run: RunMarker, engine_overrides: dict[str, object] | None) -> Runtime:
        record_policy_load(audit, policies, config.data_dir, run.run_id, "appliance")
        imported = import_journal(config.journal_path, config.data_dir / "journal-import.json", audit)
        if imported:
            log.info("imported %d installer journal entries into the audit log", imported)
        log.info("admins: %s", bootstrap_admins(tenants.admins, audit, config.secrets_dir))
        salt_key = ensure_secret(config.secrets_dir / "cache-salt.key").encode()
        nodes = NodeRegistry(db)
        metrics = GatewayMetrics()
        engine: AsyncEngine | None = None
        if config.fleet.nodes:
            wanted = [Node(n.name, n.url, n.labels, n.models or (config.model_name,)) for n in config.fleet.nodes]
            _sync_nodes(nodes, audit, wanted, "inventory")
            _sync_nodes(nodes, audit, [], "local")
        else:
            settings = config.engine.resolved(cuda_available=torch.cuda.is_available())
            settings.update(engine_overrides or {})
            engine = AsyncEngine(EngineConfig(model=str(config.model_path), **settings))  # type: ignore[arg-type]
            local = Node(config.node.name, INPROCESS + config.node.name, dict(config.node.labels),
                         config.served_models)
            _sync_nodes(nodes, audit, [local], "local")
            _sync_nodes(nodes, audit, [], "inventory")

        def audit_fleet(event: str, data: dict[str, object]) -> None:
            audit.append(f"admin.{event}", stream="_admin", actor="gateway", data=data)

        fleet = Fleet(nodes, config.fleet, _client_factory(config, engine), audit_fleet, metrics)
        metrics.sla.watch_nodes(lambda: [(h.name, h.stats) for h in fleet.handles()])
        usage = UsageStore(db)
        disk = DiskGuard(config.data_dir, config.audit_min_free_bytes, on_reading=metrics.audit_free_bytes.set)
        service = ChatService(
            fleet=fleet, router=Router(fleet), policies=policies, audit=audit, salt_key=salt_key, metrics=metrics,
            usage=usage, disk=disk, run_id=run.run_id, limiter=SharedRateLimiter(db),
            sealer=ContentSealer(audit, config.secrets_dir / MASTER_KEY_FILE),
        )
        return cls(config, db, tenants, audit, policies, engine, service, usage, nodes, fleet, run,
                   Pruner(audit, policies))

    def replace_policies(self, new: PolicySet) -> PolicySet:
        """Put ``new`` in force for every request admitted from now on; returns the set it replaces.

        Call it on the event loop: the assignments below run in one step (nothing awaits between
        them), so no request sees one holder's set and another's. Requests already admitted keep
        the tenant policy and class they were admitted under. Holders: this runtime (the tenant
        API's reads), the chat service (admission, limits, residency, content sealing) and the
        retention pruner (its next run). The router and admission control take what they need
        from the service per request and hold no set.
        """
        old = self.policies
        self.policies = new
        self.service.policies = new
        if self.pruner is not None and not callable(self.pruner._policies):
            self.pruner._policies = new
        return old

    async def start(self) -> None:
        if self.engine is not None:
            await self.engine.start()
        await self.fleet.start()
        self.audit.append("admin.appliance_started", stream="_admin", actor="appliance",
                          data={"version": self.config.version, "bundle_digest": self.config.bundle_digest,
                                "node": self.config.node.name, "model": self.config.model_name,
                                "run_id": self.run_id, "pid": self.run.pid, "policy_digest": self.policies.digest})
        if self.pruner is not None:
            self.prune_task = asyncio.create_task(self.pruner.run_every(PRUNE_INTERVAL_S), name="audit-prune")
        if loopguard.enabled():  # armed once started: serving from here on
            self.loop_guard = LoopGuard([self.db, self.audit.engine], self.service.metrics.loop_db_calls.inc)
            self.loop_guard.arm(asyncio.get_running_loop())

    async def stop(self) -> None:
        if self.loop_guard is not None:  # the stop records are written from the loop, on purpose
            self.loop_guard.close()
            self.loop_guard = None
        await self.service.drain()
        await self.fleet.stop()
        if self.engine is not None:
            await self.engine.shutdown()
        self.service.close()
        if self.pruner is not None:
            self.pruner.stop()
        task, self.prune_task = self.prune_task, None
        if task is not None and not task.done() and task.get_loop() is asyncio.get_running_loop():
            await task  # ends after the batch in progress and its done record
        self.audit.append("admin.appliance_stopped", stream="_admin", actor="appliance",
                          data={"version": self.config.version, "run_id": self.run_id})
        self.audit.checkpoint()
        self.anchoring.stop()
        # after the final records: the next start sees a clean stop
        remove_marker(self.marker_file or marker_path(self.config.data_dir), self.run)
        # Close every pooled connection: SQLite then merges its write-ahead log into the database
        # file and removes it, so a backup of data/appliance.db alone holds every record. The
        # pools reopen connections on demand if this runtime is started again.
        self.usage.close()  # the usage counts still pending, before the pool closes
        self.audit.close()
        self.db.dispose()


def _sync_nodes(nodes: NodeRegistry, audit: AuditLog, wanted: list[Node], source: str) -> None:
    for change in nodes.sync(wanted, source):
        kind = change.pop("change")
        audit.append(f"admin.node_{kind}", stream="_admin", actor=f"config:{source}", data=change)


def _client_factory(config: ApplianceConfig, engine: AsyncEngine | None) -> Callable[[Node], EngineClient]:
    tls = config.root / "tls" / "engine"

    def make(node: Node) -> EngineClient:
        if node.url.startswith(INPROCESS):
            if engine is None or node.url != INPROCESS + config.node.name:
                raise ConfigError(f"node {node.name}: {node.url} names an in-process engine this gateway does not run")
            return engine
        for name in ("ca.pem", "client.pem", "client.key"):
            if not (tls / name).is_file():
                raise ConfigError(f"node {node.name}: the gateway's client certificate for mutual TLS is missing: "
                                  f"expected {tls / name} (issued by sovereign-installer)")
        return RemoteEngine(node.url, ca_cert=tls / "ca.pem", client_cert=tls / "client.pem",
                            client_key=tls / "client.key", timeout_s=config.fleet.connect_timeout_s,
                            read_timeout_s=config.fleet.read_timeout_s)

    return make
