"""The quickstart: vendor side and customer side of the whole product on one machine.

1. vendor: signing keys and a signed bundle holding the model and the default policies;
2. IT admin: ``sovereign-installer install`` (a real ansible-playbook run) into the install root,
   which verifies the bundle before touching anything;
3. appliance: engine in-process, HTTPS gateway with a generated certificate, SQLite, audit log;
4. a demo tenant and key, and ready-to-paste ``curl`` and ``openai`` snippets.

A second run reuses the keys, bundle, install, tenant and key it finds.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml
from rich.console import Console

import appliance
from airgap_bundle import build_bundle, import_gguf, init_keys
from airgap_bundle.testmodel import find_smollm2_gguf
from appliance.errors import ApplianceError
from appliance.runtime import Runtime
from appliance.secrets_store import write_secret
from policies import default_policy_dir

DEMO_TENANT = "demo"


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


def ensure_vendor_bundle(root: Path, model_dir: Path, version: str, console: Console) -> VendorArtifacts:
    """The vendor's half: keys and a signed bundle (kept under ROOT/vendor for the demo)."""
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
            model_dir=model_dir, policies_dir=default_policy_dir(),
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
    """The quickstart's inventory: this machine as the one node, serving on the chosen port."""
    path = root / "inventory.yaml"
    doc = {
        "gateway": {"host": host, "port": port},
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
    key_file = runtime.config.secrets_dir / "demo-tenant.key"
    if runtime.tenants.get_tenant(DEMO_TENANT) is None:
        runtime.tenants.create_tenant(DEMO_TENANT)
        runtime.audit.append("admin.tenant_created", stream="_admin", actor="quickstart",
                             data={"tenant": DEMO_TENANT})
    if key_file.exists():
        stored = key_file.read_text().strip()
        if runtime.tenants.authenticate(stored) is not None:
            return stored
    issued = runtime.tenants.issue_key(DEMO_TENANT, label="quickstart demo key")
    runtime.audit.append("admin.key_issued", stream="_admin", actor="quickstart",
                         data={"tenant": DEMO_TENANT, "key_id": issued.key_id})
    write_secret(key_file, issued.secret)
    return issued.secret


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


def quickstart(root: Path, model_dir: Path, host: str, port: int, console: Console) -> None:
    from appliance.server import build_server, check_port_free

    root = root.resolve()
    check_port_free(host, port)  # fail in a second, not after building a bundle
    model_dir = ensure_model(model_dir.resolve(), console)
    artifacts = ensure_vendor_bundle(root, model_dir, appliance.__version__, console)
    run_installer(artifacts, root, write_inventory(root, host, port), console)
    runtime = Runtime.open(root)
    key = ensure_demo_key(runtime)
    server = build_server(runtime, host, port)
    base = f"https://{'localhost' if host in ('127.0.0.1', '0.0.0.0') else host}:{port}"
    console.print(f"\n[bold green]appliance {runtime.config.version} serving {runtime.config.model_name}"
                  f" at {base}[/]  (Ctrl-C to stop)\n"
                  f"demo tenant key stored in {runtime.config.secrets_dir / 'demo-tenant.key'} (0600)")
    console.print(snippets(base, runtime.config.tls_dir / "ca.pem", key, runtime.config.model_name),
                  markup=False, highlight=False, soft_wrap=True)
    server.run()
    console.print("[bold]appliance stopped[/]")
