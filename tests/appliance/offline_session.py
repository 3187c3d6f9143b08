"""Run inside a network namespace that has nothing but loopback (see test_offline_netns.py).

Installs a bundle, serves it, asks the real openai client, verifies the audit log, and prints one
JSON line with what it saw. Exits non-zero on any failure.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import openai

from tests.appliance.support import BIN, VendorBundle, free_port, interrupt, run_installer, start, tls_ctx


def _no_route_out() -> bool:
    try:
        socket.create_connection(("192.0.2.1", 443), timeout=2).close()  # TEST-NET-1, never routed
    except OSError:
        return True
    return False


def main(bundle: str, trusted_root: str, root: str) -> int:
    interfaces = sorted(name for _index, name in socket.if_nameindex())  # this namespace's, via netlink
    port = free_port()
    installed = run_installer(VendorBundle(Path(bundle), Path(trusted_root)), Path(root), port)
    if installed.returncode != 0:
        print(installed.stdout, installed.stderr, file=sys.stderr)
        return 1
    url = f"https://localhost:{port}"
    ca = Path(root) / "tls" / "ca.pem"
    proc = start([str(BIN / "appliance"), "serve", "--root", root, "--port", str(port)], url, ca)
    try:
        admin = httpx.Client(base_url=url, verify=tls_ctx(ca), timeout=30, headers={
            "Authorization": f"Bearer {(Path(root) / 'secrets' / 'admin.key').read_text().strip()}"})
        grant = {"name": "offline", "models": ["SmolLM2-135M-Instruct"]}  # the shipped policy grants none
        admin.post("/admin/v1/tenants", json=grant).raise_for_status()
        key = admin.post("/admin/v1/tenants/offline/keys", json={}).json()["key"]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0,
                               http_client=httpx.Client(verify=tls_ctx(ca), timeout=120))
        reply = client.chat.completions.create(
            model="SmolLM2-135M-Instruct", max_tokens=32, temperature=0,
            messages=[{"role": "user", "content": "What is the capital of France?"}])
    finally:
        code, _ = interrupt(proc)
    db = f"sqlite:///{Path(root) / 'data' / 'appliance.db'}"
    verify = subprocess.run([str(BIN / "appliance"), "audit", "verify", "--db", db, "--key",
                             str(Path(root) / "secrets" / "audit-signing.key")], capture_output=True, text=True)
    print(json.dumps({
        "interfaces": interfaces, "no_route_out": _no_route_out(), "answer": reply.choices[0].message.content,
        "server_exit": code, "audit_verify_exit": verify.returncode,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
