"""The benchmark's processes on this machine: the fake node, the fake OpenAI upstream, and gateway
install roots (SQLite or PostgreSQL, one or more workers) routing to the node over mutual TLS.

The node's mutual-TLS material comes from a throwaway CA made here (the installer's PKI is the
installer's; the appliance package may not import it): a server certificate for 127.0.0.1 and the
gateway's client certificate, laid out under ROOT/tls/engine as the installer lays them out.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

MODEL = "SmolLM2-135M-Instruct"
TENANT = "bench"
NODE_LABELS = {"region": "eu", "site": "a", "classification": "internal"}
CHILD_ENV = {"OMP_NUM_THREADS": "1", "LC_ALL": "C.UTF-8", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
             "PYTHONUNBUFFERED": "1"}
# Limits on, and high enough that the benchmark measures their cost, not their refusals: the batch
# SLA class (admission control still runs, against a 60 s TTFT target instead of 5 s, which 200
# streams on an overloaded 2-core machine can approach), a refusal budget per client that one
# refusal wave cannot exhaust (the load generator is one address), and a node connect timeout that
# a busy node on the same cores still meets (a timeout marks the node down: 503 for every request).
TENANT_POLICY = {"tenants": {TENANT: {"allowed_models": ["*"], "rate_limit_rpm": 100_000_000, "sla_class": "batch",
                                      "max_tokens_per_minute": 2_000_000_000, "max_tokens_per_request": 64}}}
EDGE_LIMITS = {"refusals_per_minute": 1_000_000}
FLEET_TIMEOUTS = {"connect_timeout_s": 30.0}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o600 if private else 0o644)


def make_node_pki(out: Path) -> None:
    """ca.pem, server.pem/.key (127.0.0.1, localhost) and client.pem/.key (the gateway's) in ``out``."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench node CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    _write(out / "ca.pem", ca.public_bytes(serialization.Encoding.PEM))
    for name, usage in (("server", ExtendedKeyUsageOID.SERVER_AUTH), ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"bench {name}")]))
                   .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if name == "server":
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        _write(out / f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM))
        _write(out / f"{name}.key", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()), private=True)


def node_client_ssl(pki: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    ctx.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
    return ctx


def spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    out = log.open("ab")
    return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env={**os.environ, **CHILD_ENV, **(env or {})}, start_new_session=True)


def tree_cpu_seconds(root_pid: int) -> float:
    """User + system CPU seconds of ``root_pid`` and its live descendants (a server and its workers),
    from /proc; 0.0 where /proc is absent."""
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    cpu: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        pid = int(stat.parent.name)
        parent[pid] = int(fields[1])  # fields[0] is the state, then ppid; utime and stime are 11 and 12
        cpu[pid] = int(fields[11]) + int(fields[12])
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        total += cpu.get(pid, 0)
        todo.extend(children.get(pid, ()))
    return total / tick


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM to the process group, SIGKILL after 20 s."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def wait_http(proc: subprocess.Popen[bytes], url: str, verify: ssl.SSLContext | bool, log: Path,
              timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with code {proc.returncode} before it was healthy; "
                               f"its log ({log}) ends:\n{log.read_text(errors='replace')[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, verify=verify, timeout=3).status_code == 200:
                return
        time.sleep(0.3)
    raise RuntimeError(f"{url}: expected 200 within {timeout_s:.0f} s; log {log}:\n"
                       f"{log.read_text(errors='replace')[-3000:]}")


def appliance_command() -> list[str]:
    exe = Path(sys.executable).with_name("appliance")
    return [str(exe)] if exe.exists() else [sys.executable, "-c", "from appliance.cli import main; main()"]


def serve_supports_workers() -> bool:
    """Whether this checkout's ``appliance serve`` has ``--workers`` (being added for issue 17)."""
    done = subprocess.run([*appliance_command(), "serve", "--help"], capture_output=True, text=True,
                          env={**os.environ, **CHILD_ENV, "COLUMNS": "200"}, timeout=120)
    return "--workers" in done.stdout


@dataclass
class Gateway:
    """One gateway install root and its ``appliance serve`` process."""

    root: Path
    port: int
    db_url: str
    workers: int
    proc: subprocess.Popen[bytes] | None = None
    key: str = ""

    @property
    def ca(self) -> Path:
        return self.root / "tls" / "ca.pem"

    def ssl(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


def lay_out_gateway(root: Path, model_dir: Path, node_pki: Path, node_url: str, db_url: str | None,
                    workers: int) -> Gateway:
    """An install root like the installer's: appliance.yaml with the fleet, policies with the bench
    tenant's limits, the engine client certificate; ``db_url`` None: the embedded SQLite file."""
    from policies import default_policy_dir

    release = root / "releases" / "1.0.0"
    policies = release / "policies"
    shutil.copytree(default_policy_dir(), policies)
    (policies / "site.yaml").write_text(yaml.safe_dump(TENANT_POLICY))
    port = free_port()
    doc: dict[str, object] = {
        "version": "1.0.0", "bundle_digest": "sha256:bench", "model": {"name": MODEL, "path": str(model_dir)},
        "policies_dir": str(policies),
        "node": {"name": "gw", "labels": {"region": "x", "site": "x", "classification": "x"}, "roles": ["gateway"]},
        "gateway": {"host": "127.0.0.1", "port": port, "limits": EDGE_LIMITS},
        "fleet": {"nodes": [{"name": "n1", "url": node_url, "labels": NODE_LABELS, "models": [MODEL]}],
                  **FLEET_TIMEOUTS}}
    if db_url is not None:
        doc["database"] = {"url": db_url}
    (release / "appliance.yaml").write_text(yaml.safe_dump(doc))
    (root / "current").symlink_to(release)
    engine_tls = root / "tls" / "engine"
    engine_tls.mkdir(parents=True)
    for name in ("ca.pem", "client.pem", "client.key"):
        shutil.copy(node_pki / name, engine_tls / name)
        (engine_tls / name).chmod(0o600 if name.endswith(".key") else 0o644)
    return Gateway(root, port, db_url or f"sqlite:///{root / 'data' / 'appliance.db'}", workers)


def start_gateway(gw: Gateway, workers_flag: bool) -> None:
    """``appliance serve`` (with ``--workers N`` when ``workers_flag``), then the bench tenant's key."""
    args = [*appliance_command(), "serve", "--root", str(gw.root)]
    if workers_flag:
        args += ["--workers", str(gw.workers)]
    log = gw.root / "gateway.log"
    gw.proc = spawn(args, log)
    deadline = time.monotonic() + 180
    while not gw.ca.exists() and time.monotonic() < deadline and gw.proc.poll() is None:
        time.sleep(0.2)
    wait_http(gw.proc, f"https://127.0.0.1:{gw.port}/health", gw.ssl() if gw.ca.exists() else False, log)
    from appliance.db import open_database
    from appliance.tenancy import TenantStore

    engine = open_database(gw.db_url)
    try:
        store = TenantStore(engine)
        if store.get_tenant(TENANT) is None:
            store.create_tenant(TENANT, [MODEL])
        gw.key = store.issue_key(TENANT, label="benchmark").secret
    finally:
        engine.dispose()
