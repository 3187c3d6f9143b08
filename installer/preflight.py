"""Preflight: can this machine take an appliance install? Each check passes, warns or fails,
and says how to fix what it found. Checks run on the controller, which is the local node;
remote (ssh) nodes are listed as not checked.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from installer.inventory import Inventory, default_inventory
from installer.layout import RootLayout, nearest_existing

PASS, WARN, FAIL = "pass", "warn", "fail"
GIB = 1 << 30


@dataclass(frozen=True)
class PreflightConfig:
    """Thresholds; every limit is configuration."""

    min_python: tuple[int, int] = (3, 11)
    min_glibc: tuple[int, int] = (2, 28)
    min_free_bytes: int = 2 * GIB  # without a bundle to size from
    bundle_space_factor: float = 2.0  # unpacked staging + installed release
    # a runtime built from wheels takes ~4.6x their size (1.1 GB from 238 MB measured); 5x to be safe
    runtime_space_factor: float = 5.0
    space_margin_bytes: int = 512 << 20
    min_memory_bytes: int = 4 * GIB
    recommended_memory_bytes: int = 16 * GIB
    nvidia_smi_timeout_s: float = 20.0


@dataclass(frozen=True)
class PreflightCheck:
    name: str
    status: str  # pass | warn | fail
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class PreflightReport:
    checks: list[PreflightCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.status != FAIL for c in self.checks)

    @property
    def failures(self) -> list[PreflightCheck]:
        return [c for c in self.checks if c.status == FAIL]

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": [asdict(c) for c in self.checks]}


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def check_python(interpreter: str, cfg: PreflightConfig) -> PreflightCheck:
    want = ".".join(map(str, cfg.min_python))
    fix = f"install Python >= {want} on the node and name it in the inventory (python: /path/to/python3)"
    try:
        out = subprocess.run([interpreter, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
                             capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return PreflightCheck("python3", FAIL, f"expected a runnable {interpreter}, found {exc}", fix)
    found = _version(out)
    if found[:2] < cfg.min_python:
        return PreflightCheck("python3", FAIL, f"expected Python >= {want}, found {out} ({interpreter})", fix)
    return PreflightCheck("python3", PASS, f"Python {out} ({interpreter})")


def check_os(cfg: PreflightConfig) -> PreflightCheck:
    system = platform.system()
    if system != "Linux":
        return PreflightCheck("os", FAIL, f"expected Linux, found {system}", "install on a Linux node")
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        libc = ""
    want = ".".join(map(str, cfg.min_glibc))
    distro = _os_release()
    if not libc.startswith("glibc"):
        return PreflightCheck("os", WARN, f"{distro}: expected glibc >= {want}, found {libc or 'unknown libc'}",
                              "use a glibc-based distribution (the bundled wheels are manylinux)")
    if _version(libc)[:2] < cfg.min_glibc:
        return PreflightCheck("os", FAIL, f"{distro}: expected glibc >= {want}, found {libc}",
                              f"upgrade to a distribution with glibc >= {want}")
    return PreflightCheck("os", PASS, f"{distro}, {libc}, kernel {platform.release()}")


def _os_release() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return "Linux"


def bundle_wheel_bytes(bundle: Path) -> int:
    """Bytes of the wheels a bundle carries, from its tar headers (nothing verified or unpacked:
    only used to size the disk the runtime will take)."""
    from airgap_bundle.layout import TARGETS_DIR, Limits
    from airgap_bundle.tar_reader import StructureProblem, scan_members

    try:
        members = scan_members(bundle, Limits())
    except (StructureProblem, OSError):
        return 0  # verification will say what is wrong with the bundle
    return sum(m.size for name, m in members.items() if name.startswith(f"{TARGETS_DIR}wheels/"))


def check_disk(root: Path, bundle_bytes: int | None, cfg: PreflightConfig, wheel_bytes: int = 0) -> PreflightCheck:
    where = nearest_existing(root)
    free = shutil.disk_usage(where).free
    if bundle_bytes is None:
        need, why = cfg.min_free_bytes, "minimum without a bundle"
    else:
        need = int(bundle_bytes * cfg.bundle_space_factor) + cfg.space_margin_bytes
        why = f"{cfg.bundle_space_factor:g} x bundle {bundle_bytes / GIB:.2f} GiB + margin"
        if wheel_bytes:
            need += int(wheel_bytes * cfg.runtime_space_factor)
            why += f" + runtime {cfg.runtime_space_factor:g} x {wheel_bytes / GIB:.2f} GiB of wheels"
    detail = f"{free / GIB:.1f} GiB free at {where}, need {need / GIB:.1f} GiB ({why})"
    if free < need:
        return PreflightCheck("disk", FAIL, f"expected >= {need / GIB:.1f} GiB free at {where}, found {free / GIB:.1f}"
                              " GiB", f"free space on {where} or choose another --root")
    if not os.access(where, os.W_OK):
        return PreflightCheck("disk", FAIL, f"expected {where} to be writable, found it read-only for this user",
                              f"run as a user who can write {where}, or choose another --root")
    return PreflightCheck("disk", PASS, detail)


def check_venv(interpreter: str, wheels: bool) -> PreflightCheck:
    """The runtime is a virtual environment made by the node's python3 with pip from ensurepip
    (Debian and Ubuntu ship those in python3-venv); a bundle with wheels cannot install without."""
    fix = "install the distribution's venv package (Debian/Ubuntu: apt install python3-venv) from local media"
    try:
        proc = subprocess.run([interpreter, "-c", "import venv, ensurepip; print(ensurepip.version())"],
                              capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return PreflightCheck("python3 venv", FAIL if wheels else WARN, f"expected a runnable {interpreter}, "
                              f"found {exc}", fix)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        what = ("the bundle carries wheels, so the runtime cannot be built" if wheels
                else "needed for bundles with wheels")
        return PreflightCheck("python3 venv", FAIL if wheels else WARN,
                              f"expected venv and ensurepip in {interpreter}, found {last} ({what})", fix)
    return PreflightCheck("python3 venv", PASS, f"venv with pip {proc.stdout.strip()} ({interpreter})")


def check_memory(cfg: PreflightConfig) -> PreflightCheck:
    total = _meminfo_bytes("MemTotal")
    if total is None:
        return PreflightCheck("memory", WARN, "expected /proc/meminfo, found none", "check memory by hand")
    gib = total / GIB
    if total < cfg.min_memory_bytes:
        return PreflightCheck("memory", FAIL, f"expected >= {cfg.min_memory_bytes / GIB:.0f} GiB RAM, found {gib:.1f}"
                              " GiB", "use a node with more memory")
    if total < cfg.recommended_memory_bytes:
        return PreflightCheck("memory", WARN, f"{gib:.1f} GiB RAM, below the recommended "
                              f"{cfg.recommended_memory_bytes / GIB:.0f} GiB", "add memory for larger models")
    return PreflightCheck("memory", PASS, f"{gib:.1f} GiB RAM")


def _meminfo_bytes(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_port(host: str, port: int, *, in_service: bool) -> PreflightCheck:
    name = f"port {port}"
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        if in_service:
            return PreflightCheck(name, WARN, f"{host}:{port} is in use, probably by the installed appliance")
        return PreflightCheck(name, FAIL, f"expected {host}:{port} free, found it in use ({exc.strerror})",
                              "stop what listens there or set gateway.port in the inventory")
    return PreflightCheck(name, PASS, f"{host}:{port} is free")


def check_gpus(cfg: PreflightConfig, *, allow_cpu: bool, expected: int | None) -> PreflightCheck:
    smi = shutil.which("nvidia-smi")
    cpu_fix = "install the NVIDIA driver (nvidia-smi), or pass --allow-cpu to serve on CPU"
    if smi is None:
        if allow_cpu:
            return PreflightCheck("gpu", WARN, "no NVIDIA GPU (nvidia-smi not found): serving on CPU (--allow-cpu)")
        return PreflightCheck("gpu", FAIL, "expected an NVIDIA GPU, found no nvidia-smi", cpu_fix)
    try:
        proc = subprocess.run([smi, "--query-gpu=index,name,memory.total,driver_version",
                               "--format=csv,noheader,nounits"], capture_output=True, text=True,
                              timeout=cfg.nvidia_smi_timeout_s)
    except (OSError, subprocess.SubprocessError) as exc:
        return PreflightCheck("gpu", WARN if allow_cpu else FAIL, f"expected nvidia-smi to answer, found {exc}",
                              cpu_fix)
    gpus = [[p.strip() for p in line.split(",")] for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not gpus:
        err = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        return PreflightCheck("gpu", WARN if allow_cpu else FAIL, f"expected at least one GPU from nvidia-smi, "
                              f"found none ({err[0]})", "check the NVIDIA driver (nvidia-smi) or pass --allow-cpu")
    names = ", ".join(f"{g[1]} ({g[2]} MiB)" if len(g) > 2 else g[-1] for g in gpus)
    driver = gpus[0][3] if len(gpus[0]) > 3 else "?"
    detail = f"{len(gpus)} GPU(s): {names}; driver {driver}"
    if expected is not None and expected != len(gpus):
        return PreflightCheck("gpu", WARN, f"inventory expects {expected} GPU(s), found {len(gpus)}: {detail}",
                              "correct gpus: in the inventory")
    return PreflightCheck("gpu", PASS, detail)


def check_firewall(inventory: Inventory, layout: RootLayout) -> PreflightCheck:
    """Whether the egress firewall will be enforced on this machine (the local node)."""
    from installer.firewall import FIX_NOT_ENFORCED, RULESET_FILE, TABLE, can_enforce_here

    name, mode = "egress firewall", inventory.firewall.mode
    where = layout.root / RULESET_FILE
    if mode == "render":
        return PreflightCheck(name, WARN, f"egress is NOT enforced (firewall.mode: render): {where} is written, "
                              "not applied", f"set firewall.mode: enforce in the inventory, or apply it with "
                              f"`nft -f {where}`")
    ok, detail = can_enforce_here()
    if ok:
        return PreflightCheck(name, PASS, f"{detail}: table {TABLE} will be enforced (firewall.mode: {mode})")
    if mode == "enforce":
        return PreflightCheck(name, FAIL, f"firewall.mode enforce: expected nftables usable as root, found {detail}",
                              "install nftables (apt-get install nftables) and run the installer as root, or set "
                              "firewall.mode: render")
    return PreflightCheck(name, WARN, f"egress will NOT be enforced ({detail}): {where} is only rendered",
                          FIX_NOT_ENFORCED.replace("ROOT/", f"{layout.root}/"))


def check_database(inventory: Inventory) -> PreflightCheck | None:
    """The gateways' shared database (inventory database:): a TCP connection from this machine when
    it is a gateway node; remote gateway nodes check it themselves at the start of install, before
    any node changes (installer/playbooks/install.yml). None without a database."""
    database = inventory.database
    if database is None:
        return None
    name, where = "database", f"{database.host}:{database.port}"
    local = inventory.local_node()
    remote = [n.name for n in inventory.gateway_nodes if n.connection != "local"]
    later = f"; gateway nodes {remote} check it at the start of install" if remote else ""
    if local is None or not local.is_gateway:
        return PreflightCheck(name, WARN, f"not checked from here (no gateway on this machine){later}")
    try:
        with socket.create_connection((database.host, database.port), timeout=database.connect_timeout_s):
            pass
    except OSError as exc:
        return PreflightCheck(name, FAIL, f"expected the database server at {where} to accept a connection, found "
                              f"{exc.strerror or exc}", "check database.url in the inventory, the route and the "
                              "server's firewall")
    return PreflightCheck(name, PASS, f"the database server at {where} accepts connections from {local.name}"
                          f"{later}")


def check_ansible() -> PreflightCheck:
    try:
        from ansible.release import __version__ as version
    except ImportError as exc:
        return PreflightCheck("ansible", FAIL, f"expected ansible-core importable, found {exc}",
                              "reinstall sovereign-installer")
    return PreflightCheck("ansible", PASS, f"ansible-core {version} (in-process, no network)")


def run_preflight(
    root: Path,
    *,
    inventory: Inventory | None = None,
    bundle: Path | None = None,
    allow_cpu: bool = False,
    cfg: PreflightConfig | None = None,
) -> PreflightReport:
    """Run every check; never raises for a failed check (the report says)."""
    cfg = cfg or PreflightConfig()
    inventory = inventory or default_inventory()
    layout = RootLayout(root)
    local = inventory.local_node()
    checks: list[PreflightCheck] = []
    interpreter = local.interpreter() if local else sys.executable
    checks.append(check_python(interpreter, cfg))
    has_bundle = bundle is not None and bundle.is_file()
    wheel_bytes = bundle_wheel_bytes(bundle) if bundle is not None and has_bundle else 0
    checks.append(check_venv(interpreter, wheels=wheel_bytes > 0))
    checks.append(check_os(cfg))
    bundle_bytes = bundle.stat().st_size if bundle is not None and has_bundle else None
    checks.append(check_disk(layout.root, bundle_bytes, cfg, wheel_bytes))
    checks.append(check_memory(cfg))
    checks.append(check_port(inventory.gateway.host, inventory.gateway.port,
                             in_service=layout.current_version() is not None))
    checks.append(check_gpus(cfg, allow_cpu=allow_cpu, expected=local.gpus if local else None))
    checks.append(check_ansible())
    if bundle is not None and has_bundle:
        from installer.node_models import check_node_models  # here: node_models imports this module
        checks.append(check_node_models(inventory, bundle))
    database = check_database(inventory)
    if database is not None:
        checks.append(database)
    if local is not None:
        checks.append(check_firewall(inventory, layout))
    for node in inventory.nodes:
        if node.connection != "local":
            checks.append(PreflightCheck(f"node {node.name}", WARN,
                                         f"remote node ({node.host}) not checked from here",
                                         "run sovereign-installer preflight on that node"))
    return PreflightReport(checks)
