"""Free space of the audit store, watched so the disk never fills under the audit log.

Every admitted request writes at least two records; a disk that fills would make the appliance
fail closed at an unpredictable point, mid-request. Instead, below ``min_free_bytes`` of free space
in the data directory new requests are refused up front with 503 ``audit_storage_low`` (the
message says how much is free and what the minimum is), and the free space is a metric
(``appliance_audit_free_bytes``) for alerting long before. The filesystem is asked at most once
per ``interval_s``, so the check costs nothing per request.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path


class DiskGuard:
    def __init__(self, path: Path, min_free_bytes: int, interval_s: float = 1.0,
                 on_reading: Callable[[int], None] | None = None,
                 statvfs: Callable[[str], os.statvfs_result] = os.statvfs) -> None:
        if min_free_bytes < 0:
            raise ValueError(f"min_free_bytes must be >= 0, found {min_free_bytes}")
        self.path = path
        self.min_free_bytes = min_free_bytes
        self.interval_s = interval_s
        self._on_reading = on_reading
        self._statvfs = statvfs
        self._lock = threading.Lock()
        self._checked_at = float("-inf")
        self._free = 0

    def free_bytes(self) -> int:
        now = time.monotonic()
        with self._lock:
            if now - self._checked_at >= self.interval_s:
                stat = self._statvfs(str(self.path))
                self._free = stat.f_bavail * stat.f_frsize
                self._checked_at = now
                if self._on_reading is not None:
                    self._on_reading(self._free)
            return self._free

    def problem(self) -> str | None:
        """Why new requests must be refused now, or None."""
        free = self.free_bytes()
        if free >= self.min_free_bytes:
            return None
        return (f"the audit store at {self.path} has {free // 2**20} MiB free; expected at least "
                f"{self.min_free_bytes // 2**20} MiB (audit.min_free_bytes): requests are refused until space is freed")
