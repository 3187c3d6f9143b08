"""Real SSH hosts for installer tests: network namespaces on one bridge, each with Debian's sshd.

``ssh_hosts(tmp, n)`` makes, for one test run (every name carries a tag unique to the run):

* a bridge ``sbr<tag>`` in this (the controller's) network namespace with 10.77.K.1/24, K the
  first subnet 10.77.K.0/24 this machine does not use yet, so two runs at once never collide;
* N namespaces ``sovssh<tag>-<i>``, each with loopback up and a veth pair to the bridge
  holding 10.77.K.(i+2)/24;
* in each namespace its own ``sshd`` (Debian's openssh-server) with its own ed25519 host key
  and config, listening on the namespace's address only, key-only root login with one test key
  (no password, no keyboard-interactive, no PAM);
* a known_hosts file with every host key, so that ``ssh -i KEY -o UserKnownHostsFile=KNOWN
  -o StrictHostKeyChecking=yes root@10.77.K.2`` works with host keys checked.

Everything is removed on exit, also after a failure: the processes still running in each
namespace (sshd and whatever the test started over SSH there, e.g. appliance services), the
namespaces (their veth ends go with them) and the bridge. The namespaces share this machine's
filesystem: a test gives each host its own directory (``SshHost.root``) to install into.

``ssh_unavailable()`` says why these hosts cannot be made here (not root, no sshd or ip, no
network namespaces); the caller skips with that reason.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SSHD = next((p for p in ("/usr/sbin/sshd", "/sbin/sshd") if os.access(p, os.X_OK)), None)
SSH = shutil.which("ssh")
SSH_KEYGEN = shutil.which("ssh-keygen")
IP = shutil.which("ip") or next((p for p in ("/usr/sbin/ip", "/sbin/ip") if os.access(p, os.X_OK)), None)
NODE_PYTHON = "/usr/bin/python3"  # Debian's python3 (3.11, with venv): the nodes' interpreter
READY_TIMEOUT_S = 30.0

SSHD_CONFIG = """\
# sshd of test host {name} (namespace {ns}); written by tests/installer/sshhosts.py
ListenAddress {address}
Port 22
HostKey {host_key}
PidFile {pid_file}
AuthorizedKeysFile {authorized_keys}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
# the test files lie under /tmp (world-writable with the sticky bit), which StrictModes refuses
# for files outside a home directory; they are root's own, mode 0600
StrictModes no
PrintMotd no
Subsystem sftp internal-sftp
MaxStartups 64
LogLevel VERBOSE
"""


def _run(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=check)


def ssh_unavailable() -> str | None:
    """Why real SSH hosts cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root (ip netns, a bridge, sshd in each namespace)"
    if SSHD is None:
        return "needs Debian's sshd (apt-get install openssh-server; .ci/run installs it)"
    if SSH is None or SSH_KEYGEN is None:
        return "needs ssh and ssh-keygen (openssh-client)"
    if IP is None:
        return "needs ip (iproute2)"
    if not os.access(NODE_PYTHON, os.X_OK):
        return f"needs the nodes' python at {NODE_PYTHON}"
    probe = f"sovsshprobe{os.getpid()}"
    made = subprocess.run([IP, "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"ip netns add refused here: {made.stderr.strip()}"
    subprocess.run([IP, "netns", "del", probe], capture_output=True)
    return None


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.77.0.0/16 that no address or route of this machine touches."""
    used = _run(IP or "ip", "-o", "-4", "addr", "show").stdout + _run(IP or "ip", "-4", "route", "show").stdout
    start = os.getpid() % 250
    for k in [*range(start, 250), *range(0, start)]:
        if f"10.77.{k}." not in used:
            return ipaddress.IPv4Network(f"10.77.{k}.0/24")
    raise RuntimeError("no free 10.77.K.0/24 subnet on this machine")


@dataclass
class SshHost:
    """One namespace with its sshd; ``root`` is the directory a test installs into on it."""

    name: str
    ns: str
    address: str
    dir: Path
    root: Path
    sshd: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.dir / "sshd.log"


@dataclass
class SshHosts:
    tag: str
    subnet: ipaddress.IPv4Network
    bridge: str
    dir: Path
    key: Path
    known_hosts: Path
    hosts: list[SshHost] = field(default_factory=list)

    @property
    def controller_address(self) -> str:
        return str(self.subnet.network_address + 1)

    def ssh_args(self, host: SshHost) -> list[str]:
        assert SSH is not None
        return [SSH, "-i", str(self.key), "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                "-o", "ConnectTimeout=10", f"root@{host.address}"]

    def ssh(self, host: SshHost, *argv: str, timeout: float = 120,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` on ``host`` over real SSH (quoted for the remote shell)."""
        return subprocess.run([*self.ssh_args(host), shlex.join(argv)], capture_output=True, text=True,
                              timeout=timeout, check=check)

    def inventory_node(self, host: SshHost, **fields: object) -> dict[str, object]:
        """An inventory entry (see installer/inventory.py) that reaches ``host`` over SSH with
        the test key, checks its host key against the known_hosts file, and installs into its root."""
        return {"name": host.name, "connection": "ssh", "host": host.address, "user": "root",
                "python": NODE_PYTHON, "ssh_key": str(self.key), "known_hosts": str(self.known_hosts),
                "root": str(host.root), **fields}

    def by_name(self, name: str) -> SshHost:
        return next(h for h in self.hosts if h.name == name)


def _keygen(path: Path, comment: str) -> str:
    assert SSH_KEYGEN is not None
    _run(SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path))
    path.chmod(0o600)
    return path.with_suffix(".pub").read_text().strip()


def _wait_listening(host: SshHost) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if host.sshd is not None and host.sshd.poll() is not None:
            raise RuntimeError(f"sshd of {host.name} exited with {host.sshd.returncode}: "
                               f"{host.log.read_text(errors='replace')[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection((host.address, 22), timeout=1) as sock:
            if sock.recv(4).startswith(b"SSH-"):
                return
        time.sleep(0.1)
    raise RuntimeError(f"sshd of {host.name} did not listen on {host.address}:22 within {READY_TIMEOUT_S:.0f} s")


def _up(hosts: SshHosts, names: list[str]) -> None:
    assert IP is not None and SSHD is not None
    _run(IP, "link", "add", hosts.bridge, "type", "bridge")
    _run(IP, "addr", "add", f"{hosts.controller_address}/24", "dev", hosts.bridge)
    _run(IP, "link", "set", hosts.bridge, "up")
    client_pub = _keygen(hosts.key, f"sovereign-test-{hosts.tag}")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    known: list[str] = []
    for i, name in enumerate(names):
        address = str(hosts.subnet.network_address + 2 + i)
        host_dir = hosts.dir / name
        host_dir.mkdir(mode=0o700)
        host = SshHost(name=name, ns=f"sovssh{hosts.tag}-{i}", address=address, dir=host_dir,
                       root=hosts.dir / "roots" / name)
        hosts.hosts.append(host)
        outer, inner = f"vso{hosts.tag}x{i}", f"vsi{hosts.tag}x{i}"
        _run(IP, "netns", "add", host.ns)
        _run(IP, "link", "add", outer, "type", "veth", "peer", "name", inner, "netns", host.ns)
        _run(IP, "link", "set", outer, "master", hosts.bridge, "up")
        _run(IP, "-n", host.ns, "addr", "add", f"{address}/24", "dev", inner)
        _run(IP, "-n", host.ns, "link", "set", inner, "up")
        _run(IP, "-n", host.ns, "link", "set", "lo", "up")
        host_pub = _keygen(host_dir / "ssh_host_ed25519_key", f"{name}-host")
        known.append(f"{address} {' '.join(host_pub.split()[:2])}")
        (host_dir / "authorized_keys").write_text(client_pub + "\n")
        (host_dir / "authorized_keys").chmod(0o600)
        config = host_dir / "sshd_config"
        config.write_text(SSHD_CONFIG.format(name=name, ns=host.ns, address=address,
                                             host_key=host_dir / "ssh_host_ed25519_key",
                                             pid_file=host_dir / "sshd.pid",
                                             authorized_keys=host_dir / "authorized_keys"))
        _run(SSHD, "-t", "-f", str(config))  # the config is valid before anything runs
        with host.log.open("ab") as log:
            host.sshd = subprocess.Popen([IP, "netns", "exec", host.ns, SSHD, "-D", "-e", "-f", str(config)],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    hosts.known_hosts.write_text("\n".join(known) + "\n")
    for host in hosts.hosts:
        _wait_listening(host)
        hosts.ssh(host, "true", timeout=30)  # key auth and host key check work end to end


def _namespace_pids(ns: str) -> list[int]:
    listed = subprocess.run([IP or "ip", "netns", "pids", ns], capture_output=True, text=True)
    return [int(p) for p in listed.stdout.split() if p.isdigit()]


def _down(hosts: SshHosts) -> None:
    """Stop everything this run started in its namespaces, then remove them and the bridge."""
    for host in hosts.hosts:
        if host.sshd is not None and host.sshd.poll() is None:
            host.sshd.terminate()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [pid for host in hosts.hosts for pid in _namespace_pids(host.ns)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while pids and time.monotonic() < deadline:
            pids = [pid for host in hosts.hosts for pid in _namespace_pids(host.ns)]
            time.sleep(0.1)
    for host in hosts.hosts:
        if host.sshd is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                host.sshd.wait(timeout=10)
        subprocess.run([IP or "ip", "netns", "del", host.ns], capture_output=True)
    subprocess.run([IP or "ip", "link", "del", hosts.bridge], capture_output=True)


@contextlib.contextmanager
def ssh_hosts(tmp: Path, names: list[str]) -> Iterator[SshHosts]:
    """One SSH host per name (see the module docstring); removed on exit, also after a failure."""
    tag = f"{os.getpid() % 100000}{len(names)}"[-6:]
    tmp.mkdir(parents=True, exist_ok=True)
    tmp.chmod(0o700)
    hosts = SshHosts(tag=tag, subnet=_free_subnet(), bridge=f"sbr{tag}", dir=tmp, key=tmp / "id_ed25519",
                     known_hosts=tmp / "known_hosts")
    try:
        _up(hosts, names)
        yield hosts
    finally:
        _down(hosts)
