"""The quickstart: vendor side and customer side of the whole product on one machine.

1. vendor: signing keys and a signed bundle holding the model and the default policies;
2. IT admin: ``sovereign-installer install`` (a real ansible-playbook run) into the install root,
   which verifies the bundle before touching anything;
3. appliance: engine in-process, HTTPS gateway with the certificate the installer issued from the
   installation's internal CA (ROOT/state/pki), SQLite, audit log;
4. the first admin (key in ROOT/secrets/admin.key), a demo tenant granted the model and its key,
   and ready-to-paste ``curl`` and ``openai`` snippets.

With ``--wheelhouse DIR`` (``make run`` passes .cache/wheelhouse) the bundle also carries the
appliance's wheels: the installer builds the runtime ROOT/runtimes/<id> from them with
``pip --no-index``, and the appliance is served by that runtime's ``appliance serve`` in a child
process (Ctrl-C is passed on to it), not by the Python environment running the quickstart.

A second run reuses the keys, bundle, install, runtime, tenant and key it finds.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml
from rich.console import Console

import appliance
from airgap_bundle import build_bundle, import_gguf, init_keys
from airgap_bundle.testmodel import find_smollm2_gguf
from appliance.admins import ensure_first_admin
from appliance.audit import AuditLog
from appliance.config import load_config
from appliance.db import open_database
from appliance.errors import ApplianceError
from appliance.runtime import Runtime
from appliance.secrets_store import write_secret
from appliance.tenancy import TenantStore
from policies import default_policy_dir

DEMO_TENANT = "demo"
# Variables a child `appliance serve` from the runtime must not inherit (they would put this
# environment's modules on its path), and the offline switches it gets, set, never assumed.
CHILD_DROP_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "PYTHONUNBUFFERED": "1", "NO_PROXY": "*", "no_proxy": "*"}
START_TIMEOUT_S = 300.0
STOP_GRACE_S = 20.0  # per signal: the appliance's graceful shutdown takes at most ~10 s plus the engine's stop


@dataclass(frozen=True)
class VendorArtifacts:
    bundle: Path
    trusted_root: Path


def ensure_model(model_dir: Path, console: Console) -> Path:
    if (model_dir / "config.json").exists():
        return model_dir
    gguf = find_smollm2_gguf()
    console.print(f"[bold]model[/]: importing {gguf.name} into {model_dir}")
    import_gguf(gguf, model_dir)
    return model_dir


def ensure_vendor_bundle(root: Path, model_dir: Path, version: str, console: Console,
                         wheelhouse: Path | None = None) -> VendorArtifacts:
    """The vendor's half: keys and a signed bundle (kept under ROOT/vendor for the demo), with
    the wheelhouse's wheels when one is given."""
    keydir = root / "vendor" / "keys"
    if not (keydir / "root.json").exists():
        console.print(f"[bold]vendor[/]: creating signing keys in {keydir}")
        init_keys(keydir)
    bundle = root / "vendor" / "bundles" / f"sovereign-appliance-{version}.tar"
    if not bundle.exists():
        console.print(f"[bold]vendor[/]: building signed bundle {bundle}")
        bundle.parent.mkdir(parents=True, exist_ok=True)
        build_bundle(
            bundle, keydir, version, dt.datetime.now(dt.UTC) + dt.timedelta(days=365),
            model_dir=model_dir, policies_dir=default_policy_dir(), wheelhouse=wheelhouse,
        )
    return VendorArtifacts(bundle=bundle, trusted_root=keydir / "root.json")


def installer_command() -> list[str]:
    exe = Path(sys.executable).with_name("sovereign-installer")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("sovereign-installer")
    if found:
        return [found]
    return [sys.executable, "-m", "installer"]


def write_inventory(root: Path, host: str, port: int) -> Path:
    """The quickstart's inventory: this machine as the one node, serving on the chosen port. The
    egress firewall is rendered, not enforced: an evaluation must not cut this machine's network."""
    path = root / "inventory.yaml"
    doc = {
        "gateway": {"host": host, "port": port},
        "firewall": {"mode": "render"},
        "nodes": [{"name": "local", "connection": "local", "python": sys.executable,
                   "labels": {"region": "local", "site": "local", "classification": "internal"}}],
    }
    root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    os.replace(tmp, path)
    return path


def run_installer(artifacts: VendorArtifacts, root: Path, inventory: Path, console: Console) -> None:
    console.print("[bold]installer[/]: verifying the bundle and installing with ansible-playbook")
    # --allow-cpu: the quickstart is an evaluation on whatever machine it runs on, GPU or not.
    # --no-start: the quickstart serves in the foreground itself, so Ctrl-C stops it.
    cmd = [*installer_command(), "install", "--bundle", str(artifacts.bundle),
           "--trusted-root", str(artifacts.trusted_root), "--root", str(root), "--inventory", str(inventory),
           "--allow-cpu", "--no-start"]
    proc = subprocess.run(cmd, text=True, capture_output=True, env={**os.environ, "LC_ALL": "C.UTF-8"})
    if proc.returncode != 0:
        raise ApplianceError(
            f"installer failed with exit code {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    console.print(proc.stdout.strip()[-2000:])


def ensure_demo_key(runtime: Runtime) -> str:
    ensure_first_admin(runtime.tenants.admins, runtime.audit, runtime.config.secrets_dir, "quickstart")
    return demo_key(runtime.tenants, runtime.audit, runtime.config.secrets_dir, runtime.config.model_name)


def demo_key(tenants: TenantStore, audit: AuditLog, secrets_dir: Path, model: str) -> str:
    """The demo tenant, granted ``model`` (the shipped policy grants none), and its key, kept in
    secrets/demo-tenant.key (0600) and reused while it stays valid."""
    key_file = secrets_dir / "demo-tenant.key"
    tenant = tenants.get_tenant(DEMO_TENANT)
    if tenant is None:
        tenants.create_tenant(DEMO_TENANT, [model])
        audit.append("admin.tenant_created", stream="_admin", actor="quickstart",
                     data={"tenant": DEMO_TENANT, "models": [model]})
    elif model not in tenant.models or tenant.disabled:
        granted = tenants.update_tenant(DEMO_TENANT, models=[*tenant.models, model], disabled=False)
        audit.append("admin.tenant_updated", stream="_admin", actor="quickstart",
                     data={"tenant": DEMO_TENANT, "models": list(granted.models), "disabled": False})
    if key_file.exists():
        stored = key_file.read_text().strip()
        if tenants.authenticate(stored) is not None:
            return stored
    issued = tenants.issue_key(DEMO_TENANT, label="quickstart demo key", created_by="quickstart")
    audit.append("admin.key_issued", stream="_admin", actor="quickstart",
                 data={"tenant": DEMO_TENANT, "key_id": issued.key_id})
    write_secret(key_file, issued.secret)
    return issued.secret


def installed_runtime(root: Path) -> Path | None:
    """The runtime the release in service runs on (ROOT/runtimes/<id>, named by the installer in
    current/release.json), or None: the bundle had no wheels."""
    try:
        record = json.loads((root / "current" / "release.json").read_text())
    except (OSError, ValueError):
        return None
    runtime = record.get("runtime") if isinstance(record, dict) else None
    if not isinstance(runtime, str) or not runtime or "/" in runtime or runtime.startswith("."):
        return None
    return root / "runtimes" / runtime


def snippets(base_url: str, ca: Path, key: str, model: str) -> str:
    body = json.dumps({"model": model, "temperature": 0,
                       "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    return f"""
curl --cacert {ca} {base_url}/v1/chat/completions \\
  -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\
  -d '{body}'

python - <<'PY'
import httpx, openai, ssl
client = openai.OpenAI(base_url="{base_url}/v1", api_key="{key}",
                       http_client=httpx.Client(verify=ssl.create_default_context(cafile="{ca}")))
r = client.chat.completions.create(model="{model}", temperature=0,
        messages=[{{"role": "user", "content": "What is the capital of France?"}}])
print(r.choices[0].message.content)
PY
"""


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, ca: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ApplianceError(f"the appliance exited with code {proc.returncode} before it was healthy "
                                 "(its output is above)")
        if ca.is_file():
            try:
                reply = httpx.get(f"{url}/health", verify=ssl.create_default_context(cafile=str(ca)), timeout=5)
                if reply.status_code == 200:
                    return
                last = f"HTTP {reply.status_code}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.5)
    raise ApplianceError(f"expected {url}/health to answer within {timeout_s:.0f} s, last: {last}")


def _stop(proc: subprocess.Popen[bytes], sig: int) -> None:
    """sig, then SIGTERM if the child is still up after STOP_GRACE_S, then SIGKILL: the quickstart
    never exits leaving an orphaned appliance holding the port, whatever the child does."""
    for attempt in (sig, signal.SIGTERM):
        if proc.poll() is not None:
            return
        proc.send_signal(attempt)
        try:
            proc.wait(timeout=STOP_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue
    proc.kill()
    proc.wait()


def serve_from_runtime(root: Path, runtime_dir: Path, host: str, port: int, console: Console) -> None:
    """Serve with the runtime's own `appliance serve` in a child process (its own session, so the
    terminal's Ctrl-C reaches only us and is passed on once); the demo tenant and key are made here."""
    exe = runtime_dir / "bin" / "appliance"
    if not exe.is_file():
        raise ApplianceError(f"expected the runtime's appliance at {exe}, found none; run the quickstart again "
                             "after removing the root, or reinstall the bundle")
    config = load_config(root)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    config.data_dir.chmod(0o700)
    tenants, audit = TenantStore(open_database(config.db_url)), AuditLog(config.db_url, config.audit_key_path)
    ensure_first_admin(tenants.admins, audit, config.secrets_dir, "quickstart")
    key = demo_key(tenants, audit, config.secrets_dir, config.model_name)
    env = {k: v for k, v in os.environ.items() if k not in CHILD_DROP_ENV}
    env.update(OFFLINE_ENV)
    console.print(f"[bold]runtime[/]: serving with {exe}")
    proc = subprocess.Popen([str(exe), "serve", "--root", str(root), "--host", host, "--port", str(port)],
                            stdin=subprocess.DEVNULL, cwd=root, env=env, start_new_session=True)
    previous = signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
    # Ctrl-C raises KeyboardInterrupt here even when this process was started with SIGINT ignored
    # (a background job of a non-interactive shell), as the in-process server's handler does.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        base = f"https://{'localhost' if host in ('127.0.0.1', '0.0.0.0') else host}:{port}"
        ca = config.tls_dir / "ca.pem"
        _wait_healthy(proc, base, ca, START_TIMEOUT_S)
        console.print(f"\n[bold green]appliance {config.version} serving {config.model_name} at {base}[/]"
                      f"  (runtime {runtime_dir.name}, pid {proc.pid}; Ctrl-C to stop)\n"
                      f"demo tenant key stored in {config.secrets_dir / 'demo-tenant.key'} (0600); "
                      f"admin key in {config.secrets_dir / 'admin.key'} (0600)")
        console.print(snippets(base, ca, key, config.model_name), markup=False, highlight=False, soft_wrap=True)
        code = proc.wait()
        if code != 0:
            raise ApplianceError(f"the appliance exited with code {code} (its output is above)")
    except KeyboardInterrupt:
        _stop(proc, signal.SIGINT)
    except BaseException:
        _stop(proc, signal.SIGTERM)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    console.print("[bold]appliance stopped[/]")


def quickstart(root: Path, model_dir: Path, host: str, port: int, console: Console,
               wheelhouse: Path | None = None) -> None:
    from appliance.server import build_server, check_port_free

    root = root.resolve()
    check_port_free(host, port)  # fail in a second, not after building a bundle
    model_dir = ensure_model(model_dir.resolve(), console)
    if wheelhouse is not None and not any(Path(wheelhouse).glob("*.whl")):
        raise ApplianceError(f"--wheelhouse: expected a directory of wheels, found none at {wheelhouse} "
                             "(`make wheelhouse` builds .cache/wheelhouse)")
    artifacts = ensure_vendor_bundle(root, model_dir, appliance.__version__, console,
                                     Path(wheelhouse).resolve() if wheelhouse is not None else None)
    run_installer(artifacts, root, write_inventory(root, host, port), console)
    runtime_dir = installed_runtime(root)
    if runtime_dir is not None:
        serve_from_runtime(root, runtime_dir, host, port, console)
        return
    if wheelhouse is not None:
        console.print(f"[yellow]note[/]: {artifacts.bundle} was built earlier without wheels, so the appliance "
                      "runs in this Python environment; remove the root to rebuild the bundle with them")
    runtime = Runtime.open(root)
    key = ensure_demo_key(runtime)
    server = build_server(runtime, host, port)
    base = f"https://{'localhost' if host in ('127.0.0.1', '0.0.0.0') else host}:{port}"
    console.print(f"\n[bold green]appliance {runtime.config.version} serving {runtime.config.model_name}"
                  f" at {base}[/]  (Ctrl-C to stop)\n"
                  f"demo tenant key stored in {runtime.config.secrets_dir / 'demo-tenant.key'} (0600); "
                  f"admin key in {runtime.config.secrets_dir / 'admin.key'} (0600)")
    console.print(snippets(base, runtime.config.tls_dir / "ca.pem", key, runtime.config.model_name),
                  markup=False, highlight=False, soft_wrap=True)
    server.run()
    console.print("[bold]appliance stopped[/]")
