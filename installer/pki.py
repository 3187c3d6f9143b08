"""The installation's internal CA and the node certificates it issues (installer side).

Created on the first install under ROOT/state/pki (0700) and reused by every later run::

    ca.key                         ECDSA P-256, 0600: never copied to a node, never logged
    ca.pem                         what clients trust (copied to every node as tls/ca.pem)
    nodes/<node>/server.*          gateway HTTPS certificate (serverAuth)
    nodes/<node>/engine-server.*   engine node server certificate for mutual TLS (serverAuth)
    nodes/<node>/engine-client.*   the gateway's client certificate towards engine nodes (clientAuth)

A node certificate is reissued (new key) when it is missing or unreadable, does not match its
key, was not issued by this CA, names other hosts than the node now has, or expires within
``renew_before_days``; otherwise it is reused byte for byte, so a second install changes nothing.
The CA is loaded with explicit checks in a fixed order (see ``load_ca``); any failure is a
PkiError naming the file, what was expected and what was found, before anything is written.
No function here prints, logs or puts key material in a message.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import secrets
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from airgap_bundle.fsutil import write_bytes_atomic
from installer.errors import PkiError
from installer.inventory import Inventory, InventoryNode
from installer.layout import RootLayout

ISSUER = "sovereign-installer"
WILDCARD_HOSTS = ("", "0.0.0.0", "::")
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class PkiConfig:
    """Lifetimes; every limit is configuration."""

    ca_days: int = 3650
    leaf_days: int = 397
    renew_before_days: int = 30

    def __post_init__(self) -> None:
        if not 0 < self.renew_before_days < self.leaf_days < self.ca_days:
            raise ValueError(f"expected 0 < renew_before_days < leaf_days < ca_days, found "
                             f"{self.renew_before_days}, {self.leaf_days}, {self.ca_days}")


@dataclass(frozen=True)
class LeafSpec:
    """One certificate a node gets: file stem under nodes/<node>/, usage and subject."""

    stem: str
    usage: str  # "server" | "client"
    common_name: str


@dataclass(frozen=True)
class LeafOutcome:
    node: str
    stem: str
    not_after: str
    reissued: bool
    reason: str  # why it was (re)issued, "" when reused


@dataclass(frozen=True)
class PkiResult:
    """What ``prepare_pki`` did: the CA (created or reused) and every node certificate."""

    pki_dir: Path
    ca_fingerprint: str
    ca_created: bool
    leaves: list[LeafOutcome] = field(default_factory=list)

    @property
    def reissued(self) -> list[LeafOutcome]:
        return [leaf for leaf in self.leaves if leaf.reissued]

    def notes(self) -> list[str]:
        out = [f"created the installation CA {self.ca_fingerprint} in {self.pki_dir}"] if self.ca_created else []
        for node in dict.fromkeys(leaf.node for leaf in self.reissued):
            leaves = [leaf for leaf in self.reissued if leaf.node == node]
            reasons = "; ".join(dict.fromkeys(leaf.reason for leaf in leaves))
            out.append(f"{node}: issued {', '.join(leaf.stem for leaf in leaves)} certificate(s) ({reasons}), "
                       f"valid until {min(leaf.not_after for leaf in leaves)}")
        return out


def leaf_specs(node: str) -> tuple[LeafSpec, ...]:
    return (LeafSpec("server", "server", node),
            LeafSpec("engine-server", "server", f"{node} engine"),
            LeafSpec("engine-client", "client", f"{node} gateway"))


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _fingerprint(cert: x509.Certificate) -> str:
    return "sha256:" + cert.fingerprint(hashes.SHA256()).hex()


def _iso(when: dt.datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host.lower())


def _san_key(name: x509.GeneralName) -> str:
    if isinstance(name, x509.IPAddress):
        return f"ip:{name.value}"
    return f"dns:{str(name.value).lower()}"


def node_sans(node: InventoryNode, inv: Inventory) -> list[str]:
    """Host names and addresses the node's certificates must cover, in a stable order: its name,
    its SSH host, the inventory's gateway host (unless a wildcard), localhost, 127.0.0.1, ::1."""
    hosts = [node.name, node.host or "", inv.gateway.host, *LOCAL_NAMES]
    out: list[str] = []
    seen: set[str] = set()
    for host in hosts:
        if host in WILDCARD_HOSTS:
            continue
        key = _san_key(_general_name(host))
        if key not in seen:
            seen.add(key)
            out.append(host)
    return out


class InternalCA:
    """The loaded CA: certificate and key (the key stays in this object and in ca.key)."""

    def __init__(self, pki_dir: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.pki_dir = pki_dir
        self.cert = cert
        self._key = key

    @property
    def fingerprint(self) -> str:
        return _fingerprint(self.cert)

    def issued(self, cert: x509.Certificate) -> bool:
        if cert.issuer != self.cert.subject:
            return False
        try:
            cert.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True

    def issue(self, spec: LeafSpec, sans: list[str], cfg: PkiConfig) -> tuple[x509.Certificate, bytes]:
        """A new key and a certificate for it; returns the certificate and the key's PEM."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        not_after = min(now + dt.timedelta(days=cfg.leaf_days), self.cert.not_valid_after_utc)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if spec.usage == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ISSUER),
                                     x509.NameAttribute(NameOID.COMMON_NAME, spec.common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([_general_name(h) for h in sans]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                           critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return cert, _key_pem(key)


def _new_ca(cfg: PkiConfig) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ISSUER),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"Sovereign appliance installation CA "
                                                              f"{secrets.token_hex(4)}")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=cfg.ca_days))
        # path_length=0: this CA signs node certificates only, never another CA
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def create_ca(pki_dir: Path, cfg: PkiConfig) -> InternalCA:
    """Make the CA in a private temporary directory and rename it into place: either the whole
    CA exists afterwards or nothing does."""
    pki_dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".pki-", dir=pki_dir.parent))  # 0700
    try:
        cert, key = _new_ca(cfg)
        write_bytes_atomic(tmp / "ca.key", _key_pem(key), 0o600)
        write_bytes_atomic(tmp / "ca.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)
        (tmp / "nodes").mkdir(mode=0o700)
        os.rename(tmp, pki_dir)  # fails if pki_dir appeared meanwhile: never overwrite a CA
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return InternalCA(pki_dir, cert, key)


def _check_private(path: Path, what: str, *, directory: bool = False) -> None:
    try:
        st = path.lstat()
    except OSError as exc:
        raise PkiError(f"{path}: expected the {what}, found it unreadable ({exc.strerror})") from None
    kind_ok = stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)
    if not kind_ok:
        expected = "a directory" if directory else "a regular file (not a symlink)"
        raise PkiError(f"{path}: expected the {what} as {expected}, found something else; "
                       "refusing to use it")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        want = "0700" if directory else "0600"
        raise PkiError(f"{path}: expected the {what} with mode {want} (owner only), found {mode:04o}; "
                       f"refusing to use it: check who could have read it, then `chmod {want} {path}` "
                       "(or rotate the CA)")
    if st.st_uid != os.geteuid():
        raise PkiError(f"{path}: expected the {what} owned by uid {os.geteuid()} (the installer's user), "
                       f"found uid {st.st_uid}; refusing to use it")


def load_ca(pki_dir: Path, cfg: PkiConfig) -> InternalCA:
    """Load the CA with these checks, in this order: (1) the directory is private, (2) ca.key is a
    private regular file of ours, (3) it holds an unencrypted ECDSA P-256 key, (4) ca.pem is a
    CA certificate, (5) for that key, (6) valid now and not within renew_before_days of expiry."""
    key_path, cert_path = pki_dir / "ca.key", pki_dir / "ca.pem"
    _check_private(pki_dir, "installation CA directory", directory=True)
    _check_private(key_path, "installation CA key")
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # the exception text is not shown: it could quote the file's content
        raise PkiError(f"{key_path}: expected an unencrypted PEM ECDSA P-256 private key (the installation "
                       f"CA key), found data that does not parse as one ({type(exc).__name__}); restore it "
                       f"from a backup, or rotate the CA (move {pki_dir} aside and install again)") from None
    except OSError as exc:
        raise PkiError(f"{key_path}: expected a readable CA key, found {exc.strerror}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        found = f"{type(key).__name__}" + (f" on {key.curve.name}" if isinstance(key, ec.EllipticCurvePrivateKey)
                                           else "")
        raise PkiError(f"{key_path}: expected an ECDSA P-256 private key, found {found}")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise PkiError(f"{cert_path}: expected the installation CA certificate (PEM), found "
                       f"{getattr(exc, 'strerror', None) or type(exc).__name__}") from None
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise PkiError(f"{cert_path}: expected a CA certificate (basicConstraints CA:TRUE), found a leaf")
    if cert.public_key() != key.public_key():
        raise PkiError(f"{cert_path}: expected the certificate of {key_path}, found one for another key")
    now = _now()
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        raise PkiError(f"{cert_path}: expected a CA valid now, found validity {_iso(cert.not_valid_before_utc)} to "
                       f"{_iso(cert.not_valid_after_utc)}; rotate the CA (move {pki_dir} aside and install again)")
    if cert.not_valid_after_utc - now < dt.timedelta(days=cfg.renew_before_days):
        raise PkiError(f"{cert_path}: expected the CA to be valid for more than {cfg.renew_before_days} days, "
                       f"found it expires at {_iso(cert.not_valid_after_utc)}; rotate the CA (move {pki_dir} "
                       "aside and install again, then give clients the new ca.pem)")
    return InternalCA(pki_dir, cert, key)


def load_or_create_ca(pki_dir: Path, cfg: PkiConfig) -> tuple[InternalCA, bool]:
    """The installation CA and whether it was created now. A directory that holds only part of
    a CA is refused, never completed: a lost key must not be replaced without the admin knowing."""
    if not pki_dir.exists() and not pki_dir.is_symlink():
        return create_ca(pki_dir, cfg), True
    missing = [name for name in ("ca.key", "ca.pem") if not (pki_dir / name).exists()]
    if missing:
        raise PkiError(f"{pki_dir}: expected the installation CA (ca.key and ca.pem), found no "
                       f"{' and no '.join(missing)}; restore it from a backup, or rotate the CA "
                       f"(move {pki_dir} aside and install again)")
    return load_ca(pki_dir, cfg), False


def _why_reissue(ca: InternalCA, cert_path: Path, key_path: Path, spec: LeafSpec, sans: list[str],
                 cfg: PkiConfig) -> str:
    """Why the leaf must be issued again, or "" when it is fine as it is."""
    if not cert_path.is_file() or not key_path.is_file():
        return "new"
    mode = stat.S_IMODE(key_path.lstat().st_mode)
    if key_path.is_symlink() or mode & 0o077:
        return f"its key file had mode {mode:04o}, expected 0600"
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm):
        return "the stored certificate or key was unreadable"
    if cert.public_key() != key.public_key():
        return "the stored certificate did not match its key"
    if not ca.issued(cert):
        return "it was not issued by the current CA"
    try:
        present = {_san_key(n) for n in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value}
        eku = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return "it lacked subjectAltName or extendedKeyUsage"
    wanted = {_san_key(_general_name(h)) for h in sans}
    if present != wanted:
        added = sorted(k.split(":", 1)[1] for k in wanted - present)
        dropped = sorted(k.split(":", 1)[1] for k in present - wanted)
        return "host names changed: " + ", ".join([*(f"+{h}" for h in added), *(f"-{h}" for h in dropped)])
    usage = ExtendedKeyUsageOID.SERVER_AUTH if spec.usage == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
    if eku != [usage]:
        return f"its extended key usage was not {spec.usage}Auth only"
    if cert.not_valid_after_utc - _now() < dt.timedelta(days=cfg.renew_before_days):
        return f"it expires at {_iso(cert.not_valid_after_utc)}, within {cfg.renew_before_days} days"
    return ""


def ensure_node_certs(ca: InternalCA, node: str, sans: list[str], cfg: PkiConfig) -> list[LeafOutcome]:
    node_dir = ca.pki_dir / "nodes" / node
    node_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(node_dir, 0o700)
    outcomes = []
    for spec in leaf_specs(node):
        cert_path, key_path = node_dir / f"{spec.stem}.pem", node_dir / f"{spec.stem}.key"
        reason = _why_reissue(ca, cert_path, key_path, spec, sans, cfg)
        if reason:
            cert, key_pem = ca.issue(spec, sans, cfg)
            # key first: a crash in between leaves a pair that does not match, reissued next run
            write_bytes_atomic(key_path, key_pem, 0o600)
            write_bytes_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        else:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        outcomes.append(LeafOutcome(node, spec.stem, _iso(cert.not_valid_after_utc), bool(reason), reason))
    return outcomes


def prepare_pki(layout: RootLayout, inv: Inventory, cfg: PkiConfig | None = None) -> PkiResult:
    """Load (or create) the installation CA and make sure every inventory node has valid certificates."""
    cfg = cfg or PkiConfig()
    ca, created = load_or_create_ca(layout.pki, cfg)
    leaves: list[LeafOutcome] = []
    for node in inv.nodes:
        leaves += ensure_node_certs(ca, node.name, node_sans(node, inv), cfg)
    return PkiResult(pki_dir=layout.pki, ca_fingerprint=ca.fingerprint, ca_created=created, leaves=leaves)


# (file under nodes/<node>/ or the CA's, where it goes under the node's tls/, private)
NODE_FILES = (("server.pem", "server.pem", False), ("server.key", "server.key", True),
              ("engine-server.pem", "engine/server.pem", False), ("engine-server.key", "engine/server.key", True),
              ("engine-client.pem", "engine/client.pem", False), ("engine-client.key", "engine/client.key", True))
CA_COPIES = ("ca.pem", "engine/ca.pem")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tls_vars(result: PkiResult) -> dict[str, Any]:
    """Extra vars for the sovereign_tls role: for each node, where its PEM files lie on the
    controller, where they go under tls/ and their sha256 (never their content)."""
    ca_pem = result.pki_dir / "ca.pem"
    ca_entries = [{"src": str(ca_pem), "dest": dest, "sha256": _sha256(ca_pem), "secret": False} for dest in CA_COPIES]
    files: dict[str, list[dict[str, Any]]] = {}
    for node in dict.fromkeys(leaf.node for leaf in result.leaves):
        node_dir = result.pki_dir / "nodes" / node
        files[node] = ca_entries + [{"src": str(node_dir / name), "dest": dest, "sha256": _sha256(node_dir / name),
                                     "secret": secret} for name, dest, secret in NODE_FILES]
    return {"sovereign_tls_files": files, "sovereign_tls_ca_fingerprint": result.ca_fingerprint,
            "sovereign_tls_issuer": ISSUER}


def remove_pki(layout: RootLayout) -> bool:
    """Delete the CA and node certificates (uninstall); True when there was something to delete."""
    if not layout.pki.exists():
        return False
    shutil.rmtree(layout.pki)
    return True


def read_pki_status(layout: RootLayout) -> dict[str, Any] | None:
    """CA fingerprint and expiry, and each node certificate's expiry, for `status` (no key is read)."""
    ca_path = layout.pki / "ca.pem"
    if not ca_path.is_file():
        return None
    try:
        ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    except (OSError, ValueError):
        return {"ca_fingerprint": None, "ca_not_after": None, "detail": f"{ca_path}: unreadable", "certificates": []}
    certs: list[dict[str, Any]] = []
    nodes_dir = layout.pki / "nodes"
    for node_dir in sorted(p for p in nodes_dir.iterdir() if p.is_dir()) if nodes_dir.is_dir() else []:
        for spec in leaf_specs(node_dir.name):
            path = node_dir / f"{spec.stem}.pem"
            try:
                cert = x509.load_pem_x509_certificate(path.read_bytes())
            except (OSError, ValueError):
                certs.append({"node": node_dir.name, "certificate": spec.stem, "not_after": None,
                              "detail": "missing or unreadable"})
                continue
            days = (cert.not_valid_after_utc - _now()).days
            certs.append({"node": node_dir.name, "certificate": spec.stem, "not_after": _iso(cert.not_valid_after_utc),
                          "days_left": days})
    return {"ca_fingerprint": _fingerprint(ca), "ca_not_after": _iso(ca.not_valid_after_utc),
            "detail": str(layout.pki), "certificates": certs}
