"""Verifying a bundle offline against a trusted root: eight numbered checks in a fixed order.

Written in the style of python-tuf's ``TrustedMetadataSet``: each check builds on the state the
previous ones established, and the first failure stops the run (later checks are recorded as
skipped). Signatures and thresholds use ``tuf.api.metadata``'s ``get_verification_result``.

1 bundle structure     readable uncompressed tar; regular files only; safe unique names; no
                       unknown members; bounded header records and metadata sizes; zero
                       padding; end marker with a bounded tail; bundle digest
2 root chain           from the trusted root (or the newer persisted one) through every
                       metadata/<N>.root.json: each new root signed by a threshold of the old
                       and of the new keys
3 timestamp signature  timestamp.json signed by a threshold of the timestamp keys
4 snapshot             snapshot.json has the length, sha256 and version timestamp names; signed
5 targets              targets.json has the length, sha256 and version snapshot names; signed
6 expiry               no role (root, timestamp, snapshot, targets) expired (freeze attack)
7 rollback             no version older than the persisted trusted state
8 target files         every listed target present with exact length and sha256 (streamed);
                       no unlisted file; manifest.json readable. Targets with signed chunk hashes
                       are verified chunk by chunk, all chunks of all files on parallel workers.

Nothing here reads a byte beyond a length the signed metadata gave: member sizes are compared
with signed lengths before any target data is read, and the bundle digest reads only headers,
metadata and padding (see ``tar_reader.bundle_digest``).
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp

from .check_failure import CheckFailure as _Fail
from .hashing import default_workers
from .layout import MANIFEST, VERSIONED_ROOT, Limits, metadata_member, target_member
from .progress import NullProgress, ProgressSink
from .report import CheckResult, TargetInfo, VerificationReport
from .tar_reader import Member, StructureProblem, bundle_digest, read_member, scan_members
from .target_check import TargetFilesCheck
from .trust_state import load_state, load_state_root

CHECKS = (
    (1, "bundle structure"),
    (2, "root chain"),
    (3, "timestamp signature threshold"),
    (4, "snapshot matches timestamp"),
    (5, "targets matches snapshot"),
    (6, "expiry"),
    (7, "rollback"),
    (8, "target files"),
)


def _short(keyids: object) -> str:
    return ", ".join(sorted(str(k)[:12] for k in keyids)) or "none"  # type: ignore[attr-defined]


def _check_signed(delegator: Root, role: str, md: Metadata, path: str) -> str:
    """Threshold of ``role``'s keys signed ``md``; the detail names key ids, never key material."""
    result = delegator.get_verification_result(role, md.signed_bytes, md.signatures)
    if not result.verified:
        raise _Fail(
            f"expected >= {result.threshold} valid signature(s) from {role} keys of root v{delegator.version} "
            f"[{_short(delegator.roles[role].keyids)}], found {len(result.signed)} "
            f"[{_short(result.signed)}]", path)
    return f"{len(result.signed)}/{result.threshold} {role} signatures (root v{delegator.version})"


def _parse(data: bytes, kind: Any, path: str) -> Metadata:
    try:
        md = Metadata.from_bytes(data)
    except Exception as exc:
        raise _Fail(f"expected {kind.type} metadata, found unparsable data: {exc}", path) from exc
    if not isinstance(md.signed, kind):
        raise _Fail(f"expected {kind.type} metadata, found {md.signed.type}", path)
    return md


class _Verifier:
    def __init__(self, bundle: Path, trusted_root: Path, state_dir: Path | None, now: datetime,
                 limits: Limits, workers: int, progress: ProgressSink) -> None:
        self.bundle, self.trusted_root, self.state_dir = bundle, trusted_root, state_dir
        self.now, self.limits, self.workers, self.progress = now, limits, workers, progress
        self.members: dict[str, Member] = {}
        self.digest = ""
        self.root: Metadata[Root] | None = None
        self.root_bytes = b""
        self.timestamp: Metadata[Timestamp] | None = None
        self.timestamp_sha256 = ""
        self.snapshot: Metadata[Snapshot] | None = None
        self.targets: Metadata[Targets] | None = None
        self.manifest: dict[str, Any] = {}
        self.base_dir: Path | None = None
        self.from_base: list[str] = []
        self.rollback_checked = False

    def _meta_bytes(self, role: str) -> bytes:
        name = metadata_member(role)
        if name not in self.members:
            raise _Fail(f"expected {name} in the bundle, found none", name)
        try:
            return read_member(self.bundle, self.members[name], self.limits.max_metadata_bytes)
        except StructureProblem as exc:
            raise _Fail(str(exc), name) from exc

    def check_1(self) -> str:
        if not self.bundle.is_file():
            raise _Fail("expected a bundle file, found none", str(self.bundle))
        try:
            self.members = scan_members(self.bundle, self.limits)
        except StructureProblem as exc:
            raise _Fail(str(exc), exc.member) from exc
        for role in ("root", "timestamp", "snapshot", "targets"):
            if metadata_member(role) not in self.members:
                raise _Fail(f"expected {metadata_member(role)}, found none", metadata_member(role))
        try:
            self.digest = f"sha256:{bundle_digest(self.bundle, self.members)}"
        except StructureProblem as exc:
            raise _Fail(str(exc), exc.member) from exc
        return f"{len(self.members)} regular-file members, zero padding, end marker; digest {self.digest}"

    def _trusted_start(self) -> tuple[Metadata[Root], bytes]:
        try:
            data = self.trusted_root.read_bytes()
        except OSError as exc:
            raise _Fail(f"expected trusted root metadata, found unreadable file: {exc}",
                        str(self.trusted_root)) from exc
        root = _parse(data, Root, str(self.trusted_root))
        if self.state_dir is not None:
            state_root = load_state_root(self.state_dir)
            if state_root is not None:
                candidate = _parse(state_root, Root, str(self.state_dir / "root.json"))
                if candidate.signed.version > root.signed.version:
                    root, data = candidate, state_root
        _check_signed(root.signed, "root", root, str(self.trusted_root))
        return root, data

    def check_2(self) -> str:
        root, data = self._trusted_start()
        start = root.signed.version
        bundle_root = _parse(self._meta_bytes("root"), Root, metadata_member("root"))
        target = bundle_root.signed.version
        if target - start > self.limits.max_root_rotations:
            raise _Fail(f"expected at most {self.limits.max_root_rotations} root rotations, found {target - start}",
                        metadata_member("root"))
        for version in range(start + 1, target + 1):
            name = f"metadata/{version}.root.json"
            if name not in self.members:
                raise _Fail(f"expected {name} to continue the chain from root v{version - 1}, found none", name)
            new_bytes = read_member(self.bundle, self.members[name], self.limits.max_metadata_bytes)
            new = _parse(new_bytes, Root, name)
            if new.signed.version != version:
                raise _Fail(f"expected root version {version}, found {new.signed.version}", name)
            _check_signed(root.signed, "root", new, name)  # threshold of the old root's keys
            _check_signed(new.signed, "root", new, name)  # and of the new root's own keys
            root, data = new, new_bytes
        if target >= start and self._meta_bytes("root") != data:
            raise _Fail(f"expected metadata/root.json to equal root v{target} of the chain, found other bytes",
                        metadata_member("root"))
        for name in self.members:
            if VERSIONED_ROOT.match(name) and int(VERSIONED_ROOT.match(name).group(1)) > target:  # type: ignore[union-attr]
                raise _Fail(f"expected no root newer than metadata/root.json (v{target}), found one", name)
        self.root, self.root_bytes = root, data
        return f"trusted root v{start} -> v{root.signed.version} ({root.signed.version - start} rotation(s))"

    def check_3(self) -> str:
        assert self.root is not None  # established by check 2; not input validation
        data = self._meta_bytes("timestamp")
        self.timestamp = _parse(data, Timestamp, metadata_member("timestamp"))
        self.timestamp_sha256 = hashlib.sha256(data).hexdigest()
        return _check_signed(self.root.signed, "timestamp", self.timestamp, metadata_member("timestamp"))

    def _follow(self, meta: Any, role: str, kind: Any, referrer: str) -> tuple[Metadata, str]:
        assert self.root is not None
        name = metadata_member(role)
        data = self._meta_bytes(role)
        if "sha256" not in (meta.hashes or {}) or meta.length is None:
            raise _Fail(f"expected {referrer} to give length and sha256 of {role}.json, found {meta.to_dict()}", name)
        found_sha = hashlib.sha256(data).hexdigest()
        if len(data) != meta.length or found_sha != meta.hashes["sha256"]:
            raise _Fail(f"expected {meta.length} bytes sha256 {meta.hashes['sha256']} (from {referrer}), "
                        f"found {len(data)} bytes sha256 {found_sha}", name)
        md = _parse(data, kind, name)
        signed = _check_signed(self.root.signed, role, md, name)
        if md.signed.version != meta.version:
            raise _Fail(f"expected version {meta.version} (from {referrer}), found {md.signed.version}", name)
        return md, f"v{md.signed.version}, hash matches {referrer}; {signed}"

    def check_4(self) -> str:
        assert self.timestamp is not None
        md, detail = self._follow(self.timestamp.signed.snapshot_meta, "snapshot", Snapshot, "timestamp.json")
        self.snapshot = md
        return detail

    def check_5(self) -> str:
        assert self.snapshot is not None
        meta = self.snapshot.signed.meta.get("targets.json")
        if meta is None:
            raise _Fail("expected snapshot.json to list targets.json, found no entry", metadata_member("snapshot"))
        md, detail = self._follow(meta, "targets", Targets, "snapshot.json")
        self.targets = md
        return detail

    def _roles(self) -> dict[str, Metadata]:
        assert self.root and self.timestamp and self.snapshot and self.targets
        return {"root": self.root, "timestamp": self.timestamp, "snapshot": self.snapshot, "targets": self.targets}

    def check_6(self) -> str:
        for role, md in self._roles().items():
            if md.signed.is_expired(self.now):
                raise _Fail(f"expected {role} to expire after now ({self.now:%Y-%m-%dT%H:%M:%SZ}), found expiry "
                            f"{md.signed.expires:%Y-%m-%dT%H:%M:%SZ}", metadata_member(role))
        return "earliest expiry " + min(f"{md.signed.expires:%Y-%m-%dT%H:%M:%SZ}" for md in self._roles().values())

    def check_7(self) -> str:
        if self.state_dir is None:
            return "NOT CHECKED: no state directory given, versions not compared with a trusted state"
        state = load_state(self.state_dir)
        self.rollback_checked = True
        if not state:
            return f"no trusted state yet in {self.state_dir}"
        for role, md in self._roles().items():
            if md.signed.version < state[role]:
                raise _Fail(f"expected {role} version >= {state[role]} (trusted state), found {md.signed.version}",
                            metadata_member(role))
        ts = self._roles()["timestamp"]
        if ts.signed.version == state["timestamp"] and self.timestamp_sha256 != state.get("timestamp_sha256"):
            raise _Fail(f"expected timestamp v{ts.signed.version} to be the one trusted before "
                        f"(sha256 {state.get('timestamp_sha256')}), found sha256 {self.timestamp_sha256}",
                        metadata_member("timestamp"))
        return f"not older than trusted state (timestamp v{state['timestamp']})"

    def check_8(self) -> str:
        assert self.targets is not None
        check = TargetFilesCheck(self.bundle, self.members, self.targets.signed.targets, self.limits, self.workers,
                                 self.progress, self.base_dir)
        detail = check.run()
        self.from_base = check.from_base
        try:
            raw = read_member(self.bundle, self.members[target_member(MANIFEST)], self.limits.max_manifest_bytes)
            self.manifest = json.loads(raw)
        except (StructureProblem, ValueError) as exc:
            raise _Fail(f"expected a JSON manifest, found: {exc}", MANIFEST) from exc
        if not isinstance(self.manifest, dict) or not {"name", "version"} <= set(self.manifest):
            raise _Fail("expected a manifest object with name and version", MANIFEST)
        return detail

    def report_fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"digest": self.digest}
        if self.targets is not None and self.manifest:
            out["targets"] = {p: TargetInfo(t.length, t.hashes["sha256"])
                              for p, t in self.targets.signed.targets.items()}
            out["name"], out["version"] = str(self.manifest["name"]), str(self.manifest["version"])
            out["versions"] = {r: md.signed.version for r, md in self._roles().items()}
            out["expires"] = {r: f"{md.signed.expires:%Y-%m-%dT%H:%M:%SZ}" for r, md in self._roles().items()}
            out["timestamp_sha256"], out["trusted_root"] = self.timestamp_sha256, self.root_bytes
            out["from_base"] = tuple(sorted(self.from_base))
            out["base_dir"] = str(self.base_dir) if self.from_base else ""
            out["rollback_checked"] = self.rollback_checked
        return out


def verify_bundle(
    bundle: Path,
    trusted_root: Path,
    state_dir: Path | None = None,
    *,
    now: datetime | None = None,
    limits: Limits | None = None,
    workers: int | None = None,
    progress: ProgressSink | None = None,
    base_dir: Path | None = None,
) -> VerificationReport:
    """Run checks 1-8 in order; return the report (never raises for a bad bundle).

    ``state_dir`` enables rollback protection (check 7) against state written by
    ``commit_trust``; nothing is written here. Without it check 7 passes as "NOT CHECKED" and
    the report's ``rollback_checked`` is False: callers that install must pass it.
    ``workers`` hashes targets in parallel (default: one per CPU, at most 8).
    ``base_dir`` (an unpacked earlier release) lets a delta bundle leave out unchanged targets:
    each one absent from the tar must be a regular file there with the signed length and sha256.
    ``now`` can only move the clock forward ("still valid on that date?"): a time earlier than
    the system clock is ignored, so no argument can make an expired bundle pass.

    No argument skips a check: every one of checks 1-8 runs on every call, in order.
    """
    system_now = datetime.now(UTC)
    when = max(now.astimezone(UTC), system_now) if now is not None else system_now
    verifier = _Verifier(Path(bundle), Path(trusted_root), Path(state_dir) if state_dir is not None else None,
                         when, limits or Limits(), workers or default_workers(), progress or NullProgress())
    verifier.base_dir = Path(base_dir) if base_dir is not None else None
    results: list[CheckResult] = []
    failed: CheckResult | None = None
    for number, name in CHECKS:
        if failed is not None:
            results.append(CheckResult(number, name, False, f"not run: check {failed.label} failed", skipped=True))
            continue
        try:
            detail = getattr(verifier, f"check_{number}")()
            results.append(CheckResult(number, name, True, detail))
        except _Fail as exc:  # the bundle file itself when no member, target or metadata file is concerned
            failed = CheckResult(number, name, False, str(exc), path=exc.path or str(bundle))
            results.append(failed)
        except Exception as exc:  # malformed input we did not anticipate still fails closed
            failed = CheckResult(number, name, False, f"expected well-formed input, found {type(exc).__name__}: {exc}",
                                 path=str(bundle))
            results.append(failed)
    ok = failed is None
    fields = verifier.report_fields() if ok else {"digest": verifier.digest}
    return VerificationReport(bundle=str(bundle), ok=ok, checks=results, **fields)
