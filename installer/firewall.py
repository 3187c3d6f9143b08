"""The nodes' egress firewall: what the sovereign_firewall role renders and applies.

Every node gets ROOT/firewall/sovereign-egress.nft, an nftables ruleset holding only
``table inet sovereign_egress``: its output chain drops by default and accepts loopback, replies
of connections that came in (SSH, HTTPS), IPv6 neighbour discovery, the other inventory nodes (the
engine's mutual-TLS API between nodes) and the inventory's ``firewall.allow_egress`` list; what
it drops is counted and logged at a limited rate. Applying it (``nft -f``) replaces that one table
in a single transaction and touches no other table.

Modes (inventory ``firewall.mode``): ``enforce`` applies it and fails the install when nft is
missing or not permitted; ``render`` only writes the file; ``auto`` enforces where nft exists and
the installer runs as root with the right to use it, else renders and says so (a WARN).
Host names of ssh nodes are resolved here, on the controller, because nftables takes addresses.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import shutil
import socket
import subprocess
from typing import Any

from installer.ansible_runner import PLAYBOOK_DIR, PlaybookResult
from installer.errors import InventoryError
from installer.inventory import Inventory

TABLE = "inet sovereign_egress"
RULESET_FILE = "firewall/sovereign-egress.nft"
TEMPLATE = PLAYBOOK_DIR / "roles" / "sovereign_firewall" / "templates" / "sovereign-egress.nft.j2"
NFT_PATHS = ("/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft", "/usr/local/sbin/nft")
FIX_NOT_ENFORCED = ("install nftables (apt-get install nftables) and run the installer as root, or apply "
                    "ROOT/firewall/sovereign-egress.nft yourself with `nft -f`; firewall.mode: enforce makes "
                    "this a failure instead of a warning")


def node_addresses(host: str, source: str) -> list[str]:
    """The addresses of an ssh node's host: the host itself when it is an address, else what it
    resolves to on the controller (/etc/hosts or DNS), sorted."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as exc:
        raise InventoryError(f"{source}: firewall: expected node host {host!r} to resolve to an address (the "
                             f"egress firewall lets the other nodes reach it by address), found {exc}; use an "
                             "IP address or add the name to /etc/hosts") from None
    return sorted({str(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])) for info in infos})


def _allow_rules(inv: Inventory) -> list[dict[str, Any]]:
    rules = []
    for index, rule in enumerate(inv.firewall.allow_egress):
        net = ipaddress.ip_network(rule.cidr)
        if rule.ports:
            protocols = ["tcp", "udp"] if rule.protocol == "any" else [rule.protocol]
        else:
            protocols = [] if rule.protocol == "any" else [rule.protocol]
        rules.append({"index": index, "family": "ip" if net.version == 4 else "ip6", "cidr": str(net),
                      "protocols": protocols, "ports": list(rule.ports)})
    return rules


def firewall_vars(inv: Inventory) -> dict[str, Any]:
    """Extra vars for the sovereign_firewall role (the same for every node: the template leaves a
    node's own addresses out of its peers)."""
    peers = {node.name: node_addresses(node.host, inv.source) for node in inv.nodes if node.host}
    allow = _allow_rules(inv)
    template = TEMPLATE.read_bytes()
    ids = {}
    for node in inv.names:
        # The ruleset's identity, written into the table's comment: the role re-applies the file when
        # the live table lacks it (table removed, replaced, or a node rebooted without it).
        doc = json.dumps({"node": node, "peers": peers, "allow": allow}, sort_keys=True).encode()
        ids[node] = hashlib.sha256(template + b"\0" + doc).hexdigest()[:16]
    return {"sovereign_firewall_mode": inv.firewall.mode, "sovereign_firewall_peers": peers,
            "sovereign_firewall_allow": allow, "sovereign_firewall_ruleset_ids": ids}


def firewall_notes(result: PlaybookResult) -> list[str]:
    """One line per node: enforced, or a WARN saying egress is not enforced, why and how to fix it."""
    notes = []
    for report in result.firewall_reports:
        node = report.get("node") or report.get("host")
        if report.get("enforced"):
            notes.append(f"{node}: egress firewall enforced (nft table {TABLE}, {report.get('file')})")
        elif report.get("mode") == "render":
            notes.append(f"{node}: WARN egress firewall NOT enforced (firewall.mode is render): rendered "
                         f"{report.get('file')} only; to enforce it set firewall.mode: enforce in the inventory "
                         f"and install again, or apply it yourself with `nft -f {report.get('file')}`")
        else:
            notes.append(f"{node}: WARN egress firewall NOT enforced ({report.get('reason')}): rendered "
                         f"{report.get('file')} only; to fix: "
                         + FIX_NOT_ENFORCED.replace("ROOT/firewall/sovereign-egress.nft", str(report.get("file"))))
    return notes


def find_nft() -> str | None:
    return shutil.which("nft") or next((p for p in NFT_PATHS if os.access(p, os.X_OK)), None)


def can_enforce_here() -> tuple[bool, str]:
    """Whether this machine can apply the ruleset now: nft exists, we are root and the kernel lets
    us use nftables (a read-only `nft list tables` answers)."""
    nft = find_nft()
    if nft is None:
        return False, "nft (nftables) not found"
    if os.geteuid() != 0:
        return False, f"the installer runs as uid {os.geteuid()}, not root"
    try:
        proc = subprocess.run([nft, "list", "tables"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"{nft} did not answer ({exc})"
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        return False, f"nftables not permitted here ({why})"
    version = subprocess.run([nft, "--version"], capture_output=True, text=True, timeout=20).stdout.strip()
    return True, version or nft
