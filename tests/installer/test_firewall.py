"""The egress firewall (role sovereign_firewall, installer/firewall.py).

The ruleset is proved for real: the role runs (real ansible-playbook, mode enforce) inside a
network namespace joined to a peer namespace by a veth pair, and TCP connections show what it
lets through. The test machine's own network namespace is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jinja2
import pytest
import yaml

from installer import InventoryError, default_inventory, load_inventory
from installer.firewall import TEMPLATE, firewall_vars
from installer.inventory import Inventory
from installer.layout import RootLayout
from installer.preflight import FAIL, PASS, WARN, check_firewall
from tests.conftest import REPO_ROOT

LABELS = {"region": "eu", "site": "dc1", "classification": "internal"}
NFT = shutil.which("nft") or next((p for p in ("/usr/sbin/nft", "/sbin/nft") if os.access(p, os.X_OK)), None)


def make_inventory(firewall: dict[str, Any], peers: dict[str, str] | None = None) -> Inventory:
    nodes: list[dict[str, Any]] = [{"name": "fw", "connection": "local", "labels": LABELS}]
    # the peers are engine nodes: one gateway, as an inventory without a shared database must have
    nodes += [{"name": name, "connection": "ssh", "host": host, "labels": LABELS, "roles": ["engine"]}
              for name, host in (peers or {}).items()]
    return Inventory.model_validate({"firewall": firewall, "nodes": nodes})


def render(inv: Inventory, node: str = "fw") -> str:
    """The role's template rendered as ansible's template module does (trim_blocks; the template
    uses only built-in Jinja filters, so plain Jinja renders it the same)."""
    defaults = yaml.safe_load((TEMPLATE.parents[1] / "defaults" / "main.yml").read_text())
    env = jinja2.Environment(trim_blocks=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.from_string(TEMPLATE.read_text()).render({**defaults, **firewall_vars(inv), "inventory_hostname": node})


def rules(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


# ---- inventory ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("section", "message"), [
    ("{mode: off}", "firewall.mode: expected 'auto', 'enforce' or 'render', found False"),
    ("{mode: strict}", "firewall.mode: expected 'auto', 'enforce' or 'render', found 'strict'"),
    ("{allow_egress: [{cidr: 10.0.0.1/24}]}",
     "firewall.allow_egress[0].cidr: expected an IPv4 or IPv6 network like 10.0.0.0/24 or 10.0.0.53 (host bits "
     "zero), found '10.0.0.1/24'"),
    ("{allow_egress: [{cidr: ntp.example}]}", "firewall.allow_egress[0].cidr: expected an IPv4 or IPv6 network"),
    ("{allow_egress: [{cidr: 0.0.0.0/0}]}",
     "firewall.allow_egress[0].cidr: expected a network narrower than 0.0.0.0/0 (allowing every address defeats"),
    ("{allow_egress: [{cidr: '::/0'}]}", "firewall.allow_egress[0].cidr: expected a network narrower than ::/0"),
    ("{allow_egress: [{cidr: 10.0.0.0/24, ports: [70000]}]}",
     "firewall.allow_egress[0].ports[0]: expected less than or equal to 65535, found 70000"),
    ("{allow_egress: [{cidr: 10.0.0.0/24, ports: [53, 53]}]}",
     "firewall.allow_egress[0].ports: expected each port once, found [53] more than once"),
    ("{allow_egress: [{cidr: 10.0.0.0/24, protocol: icmp}]}",
     "firewall.allow_egress[0].protocol: expected 'tcp', 'udp' or 'any', found 'icmp'"),
    ("{allow_egress: [{cidr: 10.0.0.0/24, port: 53}]}",
     "firewall.allow_egress[0].port: expected only known fields, found unknown field 'port'"),
    ("{mode: render, allow: []}", "firewall.allow: expected only known fields, found unknown field 'allow'"),
])
def test_inventory_firewall_errors_say_where_what_and_found(tmp_path: Path, section: str, message: str) -> None:
    path = tmp_path / "inventory.yaml"
    node = "{name: a, labels: {region: x, site: y, classification: z}}"
    path.write_text(f"firewall: {section}\nnodes:\n  - {node}\n")
    with pytest.raises(InventoryError) as info:
        load_inventory(path)
    assert f"{path}: {message}" in str(info.value)
    assert info.value.exit_code == 2


def test_inventory_firewall_defaults() -> None:
    inv = make_inventory({})
    assert inv.firewall.mode == "auto" and inv.firewall.allow_egress == []
    # without an inventory file (an evaluation on this machine) the ruleset is only rendered
    assert default_inventory().firewall.mode == "render"
    rule = make_inventory({"allow_egress": [{"cidr": "10.0.0.53", "ports": [53, 5]}]}).firewall.allow_egress[0]
    assert rule.cidr == "10.0.0.53/32" and rule.ports == [5, 53] and rule.protocol == "any"


# ---- the rendered ruleset ------------------------------------------------------------------------

def test_rendered_ruleset() -> None:
    inv = make_inventory({"mode": "enforce", "allow_egress": [
        {"cidr": "10.0.0.0/24", "ports": [123], "protocol": "udp"},
        {"cidr": "10.9.0.53", "ports": [53]},
        {"cidr": "fd00:1::/64"},
        {"cidr": "192.168.7.0/24", "protocol": "tcp"}]}, peers={"gpu-2": "10.1.2.3", "gpu-3": "fd00::5"})
    text = render(inv)
    lines = rules(text)
    ruleset_id = firewall_vars(inv)["sovereign_firewall_ruleset_ids"]["fw"]
    # replaces its own table in one transaction, names no other
    assert lines[:3] == ["table inet sovereign_egress", "delete table inet sovereign_egress",
                         "table inet sovereign_egress {"]
    assert {ln.split("{")[0].strip() for ln in lines if ln.startswith(("table", "delete"))} == {
        "table inet sovereign_egress", "delete table inet sovereign_egress"}
    assert "flush ruleset" not in text
    chain = lines[lines.index("chain output {") + 1:]
    assert chain[:4] == [
        "type filter hook output priority filter; policy drop;",
        'oifname "lo" accept comment "loopback"',
        'ct state established,related accept comment "replies to inbound connections (SSH, HTTPS)"',
        'icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept comment "IPv6 neighbour discovery"']
    assert chain[4:10] == [
        'ip daddr { 10.1.2.3 } accept comment "other inventory nodes"',
        'ip6 daddr { fd00::5 } accept comment "other inventory nodes"',
        'ip daddr 10.0.0.0/24 udp dport { 123 } accept comment "allow_egress[0]"',
        'ip daddr 10.9.0.53/32 tcp dport { 53 } accept comment "allow_egress[1]"',
        'ip daddr 10.9.0.53/32 udp dport { 53 } accept comment "allow_egress[1]"',
        'ip6 daddr fd00:1::/64 accept comment "allow_egress[2]"']
    assert chain[10] == 'ip daddr 192.168.7.0/24 meta l4proto tcp accept comment "allow_egress[3]"'
    assert chain[11].startswith('limit rate 10/minute burst 20 packets log prefix "sovereign-egress drop: "')
    assert chain[12] == 'counter drop comment "everything else"'
    assert f'comment "sovereign-installer egress firewall {ruleset_id}"' in lines
    # DNS is not open unless the admin lists a resolver; a node never lists itself as a peer
    bare = render(make_inventory({}, peers={"gpu-2": "10.1.2.3"}), node="gpu-2")
    assert "dport { 53 }" not in bare and "10.1.2.3" not in bare and "daddr {" not in bare


def test_ruleset_identity_follows_the_inputs() -> None:
    base = firewall_vars(make_inventory({}, peers={"gpu-2": "10.1.2.3"}))["sovereign_firewall_ruleset_ids"]
    again = firewall_vars(make_inventory({}, peers={"gpu-2": "10.1.2.3"}))["sovereign_firewall_ruleset_ids"]
    moved = firewall_vars(make_inventory({}, peers={"gpu-2": "10.1.2.4"}))["sovereign_firewall_ruleset_ids"]
    assert base == again and base["fw"] != moved["fw"] and base["fw"] != base["gpu-2"]


def test_peer_host_names_are_resolved_on_the_controller() -> None:
    peers = firewall_vars(make_inventory({}, peers={"gpu-2": "localhost"}))["sovereign_firewall_peers"]
    assert "127.0.0.1" in peers["gpu-2"]
    with pytest.raises(InventoryError, match=r"firewall: expected node host 'gpu-9\.invalid' to resolve to an "
                                             r"address .* use an IP address or add the name to /etc/hosts"):
        firewall_vars(make_inventory({}, peers={"gpu-9": "gpu-9.invalid"}))


# ---- preflight ---------------------------------------------------------------------------------------

def test_preflight_egress_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import installer.firewall as fw

    layout = RootLayout(tmp_path / "root")
    render_check = check_firewall(make_inventory({"mode": "render"}), layout)
    assert render_check.status == WARN and "egress is NOT enforced (firewall.mode: render)" in render_check.detail
    assert f"nft -f {layout.root}/firewall/sovereign-egress.nft" in render_check.fix
    monkeypatch.setattr(fw, "can_enforce_here", lambda: (False, "nft (nftables) not found"))
    auto = check_firewall(make_inventory({"mode": "auto"}), layout)
    assert auto.status == WARN and "egress will NOT be enforced (nft (nftables) not found)" in auto.detail
    assert "apt-get install nftables" in auto.fix
    enforce = check_firewall(make_inventory({"mode": "enforce"}), layout)
    assert enforce.status == FAIL and "expected nftables usable as root, found nft (nftables) not found" in \
        enforce.detail and "firewall.mode: render" in enforce.fix
    monkeypatch.setattr(fw, "can_enforce_here", lambda: (True, "nftables v1.0.6"))
    ok = check_firewall(make_inventory({"mode": "enforce"}), layout)
    assert ok.status == PASS and "table inet sovereign_egress will be enforced" in ok.detail


# ---- for real, in network namespaces ------------------------------------------------------------

CLIENT = textwrap.dedent("""
    import socket, sys
    host, port = sys.argv[1], int(sys.argv[2])
    try:
        with socket.create_connection((host, port), timeout=float(sys.argv[3])) as conn:
            print("ok:" + conn.recv(16).decode())
    except TimeoutError:
        print("timeout")
    except PermissionError:
        print("blocked")  # EPERM: the local output hook dropped the SYN
    except OSError as exc:
        print(f"error:{type(exc).__name__}")
""")
SERVER = textwrap.dedent("""
    import socket, sys, threading
    def serve(port):
        with socket.create_server((sys.argv[1], port)) as srv:
            while True:
                conn, _ = srv.accept()
                conn.sendall(b"hello")
                conn.close()
    for port in sys.argv[2:]:
        threading.Thread(target=serve, args=(int(port),), daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()
""")
PLAY = """
- name: Apply the egress firewall of one node
  hosts: fw
  gather_facts: false
  tasks:
    - name: Run the firewall role
      ansible.builtin.include_role:
        name: sovereign_firewall
        tasks_from: "{{ sovereign_test_tasks }}"
"""
RUN_PLAY = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from installer.ansible_runner import run_playbook
    args = json.loads(sys.argv[1])
    result = run_playbook(args["playbook"], inventory=args["inventory"], extra_vars=args["vars"],
                          work_dir=Path(args["work"]), timeout_s=300)
    print(json.dumps(result.to_dict() | {"output": result.output[-20:], "stderr": result.stderr[-3000:]}))
""")


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=120, check=check)


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (ip netns, nft)"
    if NFT is None:
        return "needs nft (apt-get install nftables; .ci/run installs it)"
    if shutil.which("ip") is None:
        return "needs ip (iproute2)"
    probe = f"sovprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"ip netns add refused here: {made.stderr.strip()}"
    try:
        listed = subprocess.run(["ip", "netns", "exec", probe, NFT, "list", "tables"], capture_output=True, text=True)
        if listed.returncode != 0:
            return f"nftables not permitted in a network namespace here: {listed.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class Net:
    """Two namespaces joined by a veth pair: FW (10.X.Y.1, firewalled) and PEER (10.X.Y.2, .3, .4)."""

    def __init__(self, tmp: Path) -> None:
        tag = os.getpid() % 100000
        self.fw, self.peer = f"sovfw{tag}", f"sovpeer{tag}"
        self.subnet = f"10.{199 - (tag // 250) % 50}.{tag % 250}"
        self.client, self.server = tmp / "client.py", tmp / "server.py"
        self.client.write_text(CLIENT)
        self.server.write_text(SERVER)
        self.procs: list[subprocess.Popen[str]] = []

    def ip(self, n: int) -> str:
        return f"{self.subnet}.{n}"

    def up(self) -> None:
        vfw, vpeer = f"vsfw{self.fw[5:]}", f"vspe{self.fw[5:]}"
        _sh("ip", "netns", "add", self.fw)
        _sh("ip", "netns", "add", self.peer)
        _sh("ip", "link", "add", vfw, "netns", self.fw, "type", "veth", "peer", "name", vpeer, "netns", self.peer)
        for ns, dev, addrs in ((self.fw, vfw, [1]), (self.peer, vpeer, [2, 3, 4])):
            for n in addrs:
                _sh("ip", "-n", ns, "addr", "add", f"{self.ip(n)}/24", "dev", dev)
            _sh("ip", "-n", ns, "link", "set", dev, "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")

    def serve(self, ns: str, host: str, *ports: int) -> None:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, str(self.server), host,
                                 *map(str, ports)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"

    def connect(self, ns: str, host: str, port: int, timeout: float = 2.0) -> str:
        return _sh("ip", "netns", "exec", ns, sys.executable, str(self.client), host, str(port), str(timeout)
                   ).stdout.strip()

    def down(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait(timeout=10)
        for ns in (self.fw, self.peer):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    why = _netns_unavailable()
    if why:
        pytest.skip(why)
    net = Net(tmp_path)
    try:
        net.up()
        yield net
    finally:
        net.down()


def _play(net: Net, tmp: Path, inv: Inventory, tasks: str, run: int) -> dict[str, Any]:
    """The real role, run by ansible-playbook inside the firewalled namespace (as root there)."""
    playbook = tmp / "firewall-play.yml"
    playbook.write_text(PLAY)
    args = {"playbook": str(playbook), "inventory": inv.to_ansible(tmp / f"remote-tmp-{run}"),
            "work": str(tmp / f"ansible-{run}"),
            "vars": {"sovereign_root": str(tmp / "root"), "sovereign_test_tasks": tasks, **firewall_vars(inv)}}
    proc = subprocess.run(["ip", "netns", "exec", net.fw, sys.executable, "-c", RUN_PLAY, json.dumps(args)],
                          capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ok"], json.dumps(result, indent=1)[-4000:]
    return dict(result)


@pytest.mark.slow
def test_enforced_ruleset_blocks_egress_but_keeps_loopback_replies_peers_and_allow_list(
        net: Net, tmp_path: Path) -> None:
    blocked, allowed_port = 8124, 8123
    inv = make_inventory({"mode": "enforce", "allow_egress": [
        {"cidr": f"{net.ip(2)}/32", "ports": [allowed_port], "protocol": "tcp"},
        {"cidr": f"{net.ip(3)}/32"}]}, peers={"engine-2": net.ip(4)})
    net.serve(net.peer, "0.0.0.0", blocked, allowed_port)
    net.serve(net.fw, "127.0.0.1", 8125)
    net.serve(net.fw, "0.0.0.0", 8126)
    assert net.connect(net.fw, net.ip(2), blocked) == "ok:hello"  # open before the firewall
    _sh("ip", "netns", "exec", net.fw, NFT or "nft", "add table inet other_admin_table")

    first = _play(net, tmp_path, inv, "main", 1)
    assert first["hosts"]["fw"]["changed"] >= 2  # rendered and applied
    assert first["firewall"][0]["enforced"] is True and first["firewall"][0]["mode"] == "enforce"
    table = _sh("ip", "netns", "exec", net.fw, NFT or "nft", "list", "table", "inet", "sovereign_egress").stdout
    assert "policy drop" in table
    assert (tmp_path / "root" / "firewall" / "sovereign-egress.nft").is_file()

    assert net.connect(net.fw, net.ip(2), blocked) in ("blocked", "timeout")       # egress denied
    assert net.connect(net.fw, net.ip(2), allowed_port) == "ok:hello"             # allow-listed port
    assert net.connect(net.fw, net.ip(3), blocked) == "ok:hello"                  # allow-listed CIDR
    assert net.connect(net.fw, net.ip(4), blocked) == "ok:hello"                  # another inventory node
    assert net.connect(net.fw, "127.0.0.1", 8125) == "ok:hello"                   # loopback
    assert net.connect(net.peer, net.ip(1), 8126) == "ok:hello"                   # inbound: replies get out
    counted = _sh("ip", "netns", "exec", net.fw, NFT or "nft", "list", "table", "inet", "sovereign_egress").stdout
    dropped = [ln for ln in counted.splitlines() if "counter packets" in ln and ln.strip().endswith(
        'drop comment "everything else"')]
    assert dropped and int(dropped[0].split("counter packets")[1].split()[0]) > 0
    tables = _sh("ip", "netns", "exec", net.fw, NFT or "nft", "list", "tables").stdout
    assert "table inet other_admin_table" in tables  # other tables are never touched

    second = _play(net, tmp_path, inv, "main", 2)
    assert second["hosts"]["fw"]["changed"] == 0  # idempotent: nothing rendered or applied again

    _sh("ip", "netns", "exec", net.fw, NFT or "nft", "delete table inet sovereign_egress")
    third = _play(net, tmp_path, inv, "main", 3)  # a node that lost its table (reboot) gets it back
    assert third["hosts"]["fw"]["changed"] == 1
    assert net.connect(net.fw, net.ip(2), blocked) in ("blocked", "timeout")

    removed = _play(net, tmp_path, inv, "remove", 4)
    assert removed["hosts"]["fw"]["changed"] == 1
    assert "sovereign_egress" not in _sh("ip", "netns", "exec", net.fw, NFT or "nft", "list", "tables").stdout
    assert net.connect(net.fw, net.ip(2), blocked) == "ok:hello"


@pytest.mark.slow
def test_render_mode_writes_but_never_applies(net: Net, tmp_path: Path) -> None:
    inv = make_inventory({"mode": "render"})
    result = _play(net, tmp_path, inv, "main", 1)
    report = result["firewall"][0]
    assert report["enforced"] is False and report["reason"] == "firewall.mode is render"
    assert (tmp_path / "root" / "firewall" / "sovereign-egress.nft").is_file()
    assert "sovereign_egress" not in _sh("ip", "netns", "exec", net.fw, NFT or "nft", "list", "tables").stdout
    auto = _play(net, tmp_path, make_inventory({"mode": "auto"}), "main", 2)  # root with nft here: enforced
    assert auto["firewall"][0]["enforced"] is True


def _play_here(tmp: Path, inv: Inventory, extra: dict[str, Any]) -> Any:
    """The role on this machine with nft looked for where it is not: nothing can be applied."""
    from installer.ansible_runner import run_playbook

    tmp.mkdir(parents=True, exist_ok=True)
    playbook = tmp / "firewall-play.yml"
    playbook.write_text(PLAY)
    return run_playbook(str(playbook), inventory=inv.to_ansible(tmp / "remote-tmp"), work_dir=tmp / "ansible",
                        extra_vars={"sovereign_root": str(tmp / "root"), "sovereign_test_tasks": "main",
                                    "sovereign_firewall_nft_paths": [str(tmp / "no-nft-here")], **extra,
                                    **firewall_vars(inv)}, timeout_s=300)


@pytest.mark.slow
def test_enforce_without_nft_fails_the_run_and_auto_renders_with_a_warning(tmp_path: Path) -> None:
    from installer.firewall import firewall_notes

    enforced = _play_here(tmp_path / "enforce", make_inventory({"mode": "enforce"}), {})
    assert not enforced.ok
    failure = enforced.failures[0]
    assert failure.task.endswith("Refuse to leave egress open when the inventory requires enforcement")
    assert "firewall.mode enforce on fw: expected nftables usable as root, found nft (nftables) not found on " \
           "the node; install nftables (apt-get install nftables)" in " ".join(failure.msg.split())

    auto = _play_here(tmp_path / "auto", make_inventory({"mode": "auto"}), {})
    assert auto.ok, auto.summary()
    assert auto.firewall_reports[0]["enforced"] is False
    file = tmp_path / "auto" / "root" / "firewall" / "sovereign-egress.nft"
    assert file.is_file() and "policy drop" in file.read_text()
    assert firewall_notes(auto) == [
        f"fw: WARN egress firewall NOT enforced (nft (nftables) not found on the node): rendered {file} only; "
        f"to fix: install nftables (apt-get install nftables) and run the installer as root, or apply {file} "
        "yourself with `nft -f`; firewall.mode: enforce makes this a failure instead of a warning"]
