"""TLS material of the gateway.

Installed appliances serve what the installer issued from the installation's internal CA:
ROOT/tls/issuer.json names the issuer, and ``installer_tls`` checks that material and uses it as
it is. It is never regenerated here: if it is damaged, expired or does not cover the host being
served, starting fails with a TlsError that names the file and says to run the installer again.

Without that marker (a development ``appliance serve`` on a bare root) ``ensure_tls`` makes a
throwaway local CA and a server certificate it signs, reused while valid for the requested host
names. Keys are written 0600 and never logged.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance.errors import TlsError

ISSUER_MARKER = "issuer.json"
INSTALLER_ISSUER = "sovereign-installer"
WILDCARD_HOSTS = ("", "0.0.0.0", "::")
RERUN = "run `sovereign-installer install` again to reissue it (it is never replaced here)"


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    cert: Path
    key: Path


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san_entries(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _cert_covers(cert_path: Path, hosts: list[str]) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError):
        return False
    if cert.not_valid_after_utc < dt.datetime.now(dt.UTC) + dt.timedelta(days=1):
        return False
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    present = {str(v) for v in san.get_values_for_type(x509.DNSName)}
    present |= {str(v) for v in san.get_values_for_type(x509.IPAddress)}
    return all(h in present for h in hosts)


def ensure_tls(tls_dir: Path, hosts: list[str], days: int = 825) -> TlsFiles:
    """Create (or reuse) ``ca.pem``, ``server.pem`` and ``server.key`` under ``tls_dir``."""
    tls_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(tls_dir, 0o700)
    files = TlsFiles(tls_dir / "ca.pem", tls_dir / "server.pem", tls_dir / "server.key")
    if files.key.exists() and files.ca_cert.exists() and _cert_covers(files.cert, hosts):
        return files

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Sovereign Appliance Local CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_san_entries(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    # The CA key is not kept: this CA only vouches for this one server certificate.
    _write_private(files.key, _key_pem(key))
    _write_public(files.cert, cert.public_bytes(serialization.Encoding.PEM))
    _write_public(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    return files


def _load_cert(path: Path, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise TlsError(f"{path}: expected the {what} issued by the installer, found {exc.strerror}; {RERUN}") from None
    except ValueError:
        raise TlsError(f"{path}: expected the {what} issued by the installer (PEM), found data that does not "
                       f"parse as a certificate; {RERUN}") from None


def _covers(cert: x509.Certificate, host: str) -> bool:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    try:
        return ipaddress.ip_address(host) in san.get_values_for_type(x509.IPAddress)
    except ValueError:
        return host.lower() in {name.lower() for name in san.get_values_for_type(x509.DNSName)}


def installer_tls(tls_dir: Path, host: str) -> TlsFiles | None:
    """The installer-issued material under ``tls_dir``, checked for serving ``host``; None when the
    directory holds no installer marker (then the caller may make its own). Checks, in order: the
    marker names the installer; ca.pem is the CA it names; server.pem was issued by that CA, is
    valid now and covers ``host``; server.key is private (0600) and belongs to server.pem."""
    marker = tls_dir / ISSUER_MARKER
    if not marker.exists():
        return None
    files = TlsFiles(tls_dir / "ca.pem", tls_dir / "server.pem", tls_dir / "server.key")
    try:
        doc = json.loads(marker.read_text())
    except (OSError, ValueError) as exc:
        raise TlsError(f"{marker}: expected the installer's JSON marker, found {type(exc).__name__}; {RERUN}") from None
    if not isinstance(doc, dict) or doc.get("issuer") != INSTALLER_ISSUER:
        found = doc.get("issuer") if isinstance(doc, dict) else type(doc).__name__
        raise TlsError(f"{marker}: expected issuer {INSTALLER_ISSUER!r}, found {found!r}; {RERUN}")
    ca = _load_cert(files.ca_cert, "installation CA certificate")
    fingerprint = "sha256:" + ca.fingerprint(hashes.SHA256()).hex()
    if fingerprint != doc.get("ca_fingerprint"):
        raise TlsError(f"{files.ca_cert}: expected the CA {doc.get('ca_fingerprint')} named in {marker}, found "
                       f"{fingerprint}; {RERUN}")
    cert = _load_cert(files.cert, "gateway certificate")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise TlsError(f"{files.cert}: expected a certificate issued by the installation CA {fingerprint}, "
                       f"found one issued by {cert.issuer.rfc4514_string()}; {RERUN}") from None
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        fmt = "%Y-%m-%dT%H:%M:%SZ"
        raise TlsError(f"{files.cert}: expected a certificate valid now ({now:{fmt}}), found validity "
                       f"{cert.not_valid_before_utc:{fmt}} to {cert.not_valid_after_utc:{fmt}}; {RERUN}")
    if host not in WILDCARD_HOSTS and not _covers(cert, host):
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = ", ".join(str(name.value) for name in san)
        except x509.ExtensionNotFound:
            names = ""
        raise TlsError(f"{files.cert}: expected a certificate for {host}, found one for {names or 'no names'}; "
                       f"add the host to the inventory (gateway.host or the node's host) and {RERUN}")
    try:
        mode = stat.S_IMODE(files.key.stat().st_mode)
        key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
    except OSError as exc:
        raise TlsError(f"{files.key}: expected the gateway's private key, found {exc.strerror}; {RERUN}") from None
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise TlsError(f"{files.key}: expected the gateway's private key (PEM), found data that does not parse as "
                       f"one; {RERUN}") from None
    if mode & 0o077:
        raise TlsError(f"{files.key}: expected mode 0600 (private), found {mode:04o}; {RERUN}")
    if key.public_key() != cert.public_key():
        raise TlsError(f"{files.key}: expected the key of {files.cert}, found another key; {RERUN}")
    return files
