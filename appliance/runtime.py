"""Everything one running appliance holds, built from an install root.

``Runtime.open(root)`` reads the installed release's configuration and opens (creating on first
start) the database, the audit log, the tenant store, the secrets and the engine. The engine is
started and stopped with the gateway's lifespan.
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
import torch

from appliance.audit import AuditLog
from appliance.config import ApplianceConfig, load_config
from appliance.db import open_database
from appliance.journal_import import import_journal
from appliance.metrics import GatewayMetrics
from appliance.secrets_store import ensure_secret
from appliance.service import ChatService
from appliance.tenancy import TenantStore
from engine import AsyncEngine, EngineConfig
from policies import PolicySet, load_policy_set

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    config: ApplianceConfig
    db: sa.Engine
    tenants: TenantStore
    audit: AuditLog
    policies: PolicySet
    engine: AsyncEngine
    service: ChatService
    admin_token: str

    @classmethod
    def open(cls, root: Path, *, engine_overrides: dict[str, object] | None = None) -> Runtime:
        config = load_config(root)
        config.data_dir.mkdir(parents=True, exist_ok=True)
        config.data_dir.chmod(0o700)
        db = open_database(config.db_url)
        audit = AuditLog(config.db_url, config.audit_key_path)
        tenants = TenantStore(db)
        policies = load_policy_set(config.policies_dir)
        imported = import_journal(config.journal_path, config.data_dir / "journal-import.json", audit)
        if imported:
            log.info("imported %d installer journal entries into the audit log", imported)
        admin_token = ensure_secret(config.secrets_dir / "admin.token")
        salt_key = ensure_secret(config.secrets_dir / "cache-salt.key").encode()
        settings = config.engine.resolved(cuda_available=torch.cuda.is_available())
        settings.update(engine_overrides or {})
        engine = AsyncEngine(EngineConfig(model=str(config.model_path), **settings))  # type: ignore[arg-type]
        service = ChatService(
            engine=engine, policies=policies, audit=audit, node=config.node, model_name=config.model_name,
            salt_key=salt_key, metrics=GatewayMetrics(),
        )
        return cls(config, db, tenants, audit, policies, engine, service, admin_token)

    def check_admin(self, presented: str) -> bool:
        return hmac.compare_digest(presented.encode(), self.admin_token.encode())

    async def start(self) -> None:
        await self.engine.start()
        self.audit.append("admin.appliance_started", stream="_admin", actor="appliance",
                          data={"version": self.config.version, "bundle_digest": self.config.bundle_digest,
                                "node": self.config.node.name, "model": self.config.model_name})

    async def stop(self) -> None:
        await self.engine.shutdown()
        self.audit.append("admin.appliance_stopped", stream="_admin", actor="appliance",
                          data={"version": self.config.version})
        self.audit.checkpoint()
        # Close every pooled connection: SQLite then merges its write-ahead log into the database
        # file and removes it, so a backup of data/appliance.db alone holds every record. The
        # pools reopen connections on demand if this runtime is started again.
        self.audit.close()
        self.db.dispose()
