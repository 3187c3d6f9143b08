"""The README's quickstart as a user runs it: twice, stopped with Ctrl-C each time."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from tests.appliance.support import BIN, children, free_port, interrupt, start, tls_ctx, wait_healthy

pytestmark = pytest.mark.slow


def _ask(url: str, ca: Path, key: str) -> str:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0,
                           http_client=httpx.Client(verify=tls_ctx(ca), timeout=120))
    reply = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", max_tokens=32, temperature=0,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    return reply.choices[0].message.content or ""


def test_quickstart_serves_paris_and_restarts(tmp_path: Path, model_dir: Path) -> None:
    root = tmp_path / "var"
    port = free_port()
    url = f"https://localhost:{port}"
    cmd = [str(BIN / "appliance"), "quickstart", "--root", str(root), "--model-dir", str(model_dir),
           "--port", str(port)]
    proc = start(cmd, url, root / "tls" / "ca.pem")
    key = (root / "secrets" / "demo-tenant.key").read_text().strip()
    assert "Paris" in _ask(url, root / "tls" / "ca.pem", key)
    assert httpx.post(f"{url}/v1/chat/completions", verify=tls_ctx(root / "tls" / "ca.pem"),
                      json={"model": "x", "messages": []}).status_code == 401
    # the first admin (its key shown by the installer and kept 0600) sees the demo tenant and its grant
    admin_key = (root / "secrets" / "admin.key").read_text().strip()
    assert (root / "secrets" / "admin.key").stat().st_mode & 0o777 == 0o600
    tenants = httpx.get(f"{url}/admin/v1/tenants", verify=tls_ctx(root / "tls" / "ca.pem"),
                        headers={"Authorization": f"Bearer {admin_key}"})
    assert tenants.status_code == 200, tenants.text
    assert [(t["name"], t["models"]) for t in tenants.json()["data"]] == [("demo", ["SmolLM2-135M-Instruct"])]
    code, out = interrupt(proc)
    assert code == 0, out
    assert f"curl --cacert {root / 'tls' / 'ca.pem'}" in out and key in out and "openai.OpenAI" in out
    bundle_bytes = next((root / "vendor" / "bundles").iterdir()).stat().st_mtime_ns

    proc = start(cmd, url, root / "tls" / "ca.pem")  # second run reuses keys, bundle, install and key
    # served with the certificate the installer issued: the installation CA in state/pki verifies it
    assert (root / "tls" / "issuer.json").is_file()
    assert "Paris" in _ask(url, root / "state" / "pki" / "ca.pem", key)
    code, out = interrupt(proc)
    assert code == 0, out
    assert next((root / "vendor" / "bundles").iterdir()).stat().st_mtime_ns == bundle_bytes


def test_quickstart_with_a_wheelhouse_serves_from_the_installed_runtime(tmp_path: Path, model_dir: Path,
                                                                        wheelhouse: Path) -> None:
    """`make run`: the bundle carries the wheels, the installer builds ROOT/runtimes/<id> with pip
    --no-index, and the appliance is that runtime's `appliance serve`, not this environment."""
    root = tmp_path / "var"
    port = free_port()
    url = f"https://localhost:{port}"
    cmd = [str(BIN / "appliance"), "quickstart", "--root", str(root), "--model-dir", str(model_dir),
           "--port", str(port), "--wheelhouse", str(wheelhouse)]
    proc = subprocess.Popen(cmd, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_healthy(proc, url, root / "tls" / "ca.pem", timeout_s=900)
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    (runtime,) = (root / "runtimes").iterdir()
    (child,) = children(proc.pid)
    argv = [a.decode() for a in Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0") if a]
    assert argv[1:3] == [str(runtime / "bin" / "appliance"), "serve"], argv
    key = (root / "secrets" / "demo-tenant.key").read_text().strip()
    assert "Paris" in _ask(url, root / "tls" / "ca.pem", key)
    code, out = interrupt(proc)
    assert code == 0, out
    flat = "".join(out.split())  # rich folds long paths over lines
    assert f"servingwith{runtime / 'bin' / 'appliance'}" in flat
    assert f"runtime{runtime.name}" in flat and "appliance stopped" in out and key in out
    assert not Path(f"/proc/{child}").exists()  # Ctrl-C reached the runtime's appliance too


def test_quickstart_port_in_use_is_a_clear_error(tmp_path: Path, model_dir: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = subprocess.run(
            [str(BIN / "appliance"), "quickstart", "--root", str(tmp_path / "var"), "--model-dir", str(model_dir),
             "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert f"port {port} on 127.0.0.1 is already in use" in proc.stderr
    assert not (tmp_path / "var" / "vendor").exists()  # failed before doing anything


@pytest.mark.parametrize(("ignored", "expected"), [
    ((), -signal.SIGINT), (("SIGINT",), -signal.SIGTERM), (("SIGINT", "SIGTERM"), -signal.SIGKILL)])
def test_quickstart_stop_escalates_when_the_child_does_not_act_on_a_signal(
    monkeypatch: pytest.MonkeyPatch, ignored: tuple[str, ...], expected: int
) -> None:
    """Ctrl-C is passed on; a child still up after the grace period gets SIGTERM, then SIGKILL,
    so the quickstart never leaves an orphaned appliance holding the port."""
    from appliance import quickstart

    monkeypatch.setattr(quickstart, "STOP_GRACE_S", 1.0)
    # every disposition set explicitly: this test may itself run with SIGINT ignored (a background job)
    code = "".join(f"signal.signal(signal.{name}, signal.{'SIG_IGN' if name in ignored else 'SIG_DFL'}); "
                   for name in ("SIGINT", "SIGTERM"))
    child = subprocess.Popen([sys.executable, "-c", f"import signal, sys, time; {code}print('up', flush=True); "
                              "time.sleep(60)"], stdout=subprocess.PIPE)
    assert child.stdout is not None and child.stdout.readline() == b"up\n"  # handlers are in place
    quickstart._stop(child, signal.SIGINT)
    assert child.returncode == expected
