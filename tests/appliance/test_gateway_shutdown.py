"""Ctrl-C stops the gateway cleanly although a client keeps an idle keep-alive TLS connection: such
a client never answers the server's close_notify, and the gateway must not wait for it past its
graceful-shutdown timeout (which ended in an ERROR line and a 10 s wait)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.appliance.fleet_lab import MODEL, FleetLab


def test_ctrl_c_with_an_idle_keep_alive_client_stops_cleanly(tmp_path: Path, model_dir: Path) -> None:
    lab = FleetLab(tmp_path, model_dir)
    lab.build_single({"tenants": {"t": {"allowed_models": ["*"]}}})
    try:
        lab.start_gateway()
        client = lab.client(lab.tenant_key("t"))  # left open: its pooled connection stays idle
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert lab.gateway is not None
        os.killpg(lab.gateway.pid, signal.SIGINT)
        assert lab.gateway.wait(60) == 0
    finally:
        lab.close()
    log = (lab.gateway_root / "gateway.log").read_text()
    if "timeout graceful shutdown exceeded" in log or "Traceback" in log:
        pytest.fail(log[-2000:])
