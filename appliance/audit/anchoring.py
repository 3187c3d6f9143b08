"""Anchors off the box for a running appliance: publication and witness cosignatures, wired once.

Use (the runtime)::

    anchoring = Anchoring.from_config(config)              # nothing configured: does nothing
    audit = AuditLog(url, key, on_checkpoints=anchoring.on_checkpoints)
    anchoring.start(audit)
    ...
    audit.checkpoint(); anchoring.stop(); audit.close()

``on_checkpoints`` runs on the audit writer thread and only queues; the publisher and the
witness submitter each write on a thread of their own.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.audit.checkpoint import GLOBAL_TREE, Checkpoint
from appliance.audit.checkpointing import latest_checkpoint, stream_names
from appliance.audit.publish import CheckpointPublisher
from appliance.audit.witness_client import WitnessClient, WitnessSubmitter
from appliance.config import ApplianceConfig, AuditAnchorSettings

if TYPE_CHECKING:
    from appliance.audit.log import AuditLog

log = logging.getLogger("appliance.audit")


class Anchoring:
    def __init__(self, *, publish_dir: Path | None = None, witness: WitnessClient | None = None,
                 witness_interval_s: float = 10.0, witness_streams: bool = False) -> None:
        self.publisher = None if publish_dir is None else CheckpointPublisher(publish_dir)
        self.witness = witness
        self.witness_interval_s = witness_interval_s
        self.witness_streams = witness_streams
        self.submitter: WitnessSubmitter | None = None

    @classmethod
    def from_config(cls, config: ApplianceConfig | AuditAnchorSettings,
                    audit_log: AuditLog | None = None) -> Anchoring:
        """From the ``audit:`` section; ``audit_log``, if given, starts it at once."""
        settings = config.audit_anchors if isinstance(config, ApplianceConfig) else config
        witness = None
        if settings.witness_url is not None and settings.witness_key is not None:
            witness = WitnessClient(settings.witness_url, settings.witness_key, ca=settings.witness_ca,
                                    client_cert=settings.witness_client_cert,
                                    client_key=settings.witness_client_key, timeout_s=settings.witness_timeout_s)
        anchoring = cls(publish_dir=settings.publish_dir, witness=witness,
                        witness_interval_s=settings.witness_interval_s, witness_streams=settings.witness_streams)
        if audit_log is not None:
            anchoring.start(audit_log)
        return anchoring

    @property
    def enabled(self) -> bool:
        return self.publisher is not None or self.witness is not None

    def on_checkpoints(self, checkpoints: list[Checkpoint]) -> None:
        """The ``AuditLog(on_checkpoints=...)`` hook: queue only, never wait."""
        if self.publisher is not None:
            self.publisher(checkpoints)
        if self.submitter is not None:
            self.submitter.notify(checkpoints)

    def start(self, audit_log: AuditLog) -> None:
        if self.publisher is not None:
            self.publisher.start()
            # the newest checkpoint of each tree signed before this process hooked in (the last
            # run's, or the CLI's): one query per tree, never the whole history
            with audit_log.engine.connect() as conn, conn.begin():
                newest = [latest_checkpoint(conn, tree) for tree in [GLOBAL_TREE, *stream_names(conn)]]
            self.publisher([cp for cp in newest if cp is not None])
        if self.witness is not None and self.submitter is None:
            on_cosigned = None if self.publisher is None else self.publisher.publish_cosigned
            self.submitter = WitnessSubmitter(audit_log.engine, self.witness, interval_s=self.witness_interval_s,
                                              trees=None if self.witness_streams else (GLOBAL_TREE,),
                                              on_cosigned=on_cosigned)
            self.submitter.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Last witness submission, then the last publication (each bounded by ``timeout_s``)."""
        if self.submitter is not None:
            self.submitter.stop(timeout_s)
        if self.publisher is not None:
            self.publisher.stop(timeout_s)
