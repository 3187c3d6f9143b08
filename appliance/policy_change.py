"""Changing a root's applied policy files (ROOT/data/policies) for ``appliance policy apply`` and
``reset``: through the running gateway's admin API when one runs, directly otherwise.

``gateway_running`` asks the root's run marker (a live process holds it). ``call_running`` sends
one request to ``/admin/v1/policies`` with the root's admin key over TLS checked against
ROOT/tls/ca.pem; the gateway checks, writes, records and swaps. ``apply_stopped`` and
``reset_stopped`` do the same without a gateway: under the data directory's policy lock the new set
is checked, the files written (or removed) and the change recorded as ``admin.policy_applied``
(put back if it cannot be recorded: no unrecorded change).
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from appliance.errors import ApplianceError
from policies import PolicySet
from policies.apply import overlay, remove_policy_files, restore_policy_files, without, write_policy_files
from policies.effective import applied_policy_dir, load_in_force
from policies.errors import PolicyError, PolicyValidationError


def gateway_running(data_dir: Path) -> bool:
    from appliance.runmarker import holder_is_alive, marker_path, read_marker

    try:
        marker = read_marker(marker_path(data_dir))
    except ValueError:
        return False
    return marker is not None and holder_is_alive(marker)


def apply_stopped(config: Any, files: dict[str, bytes]) -> dict[str, Any]:
    release, applied = config.policies_dir, applied_policy_dir(config.data_dir)

    def change() -> tuple[PolicySet, list[str], dict[str, bytes | None]]:
        new = overlay(release, applied, files)
        return new, sorted(files), write_policy_files(applied, files)

    return _change_stopped(config, change, {})


def reset_stopped(config: Any, names: list[str] | None) -> dict[str, Any]:
    release, applied = config.policies_dir, applied_policy_dir(config.data_dir)

    def change() -> tuple[PolicySet, list[str], dict[str, bytes | None]]:
        gone, new = without(release, applied, names)
        return new, gone, remove_policy_files(applied, gone)

    return _change_stopped(config, change, {"reset": True})


def _change_stopped(config: Any, change: Any, extra: dict[str, Any]) -> dict[str, Any]:
    """Under the data directory's policy lock: ``change()`` checks and writes (or removes) the applied
    files, returning the new set, the files' names and what to put back; then the change is recorded
    (put back if it cannot be)."""
    from appliance.audit import AuditLog
    from appliance.audit.cli import cli_actor
    from appliance.policy_audit import policy_lock, record_policy_applied

    release, applied = config.policies_dir, applied_policy_dir(config.data_dir)
    config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # a root whose gateway never ran yet
    audit = AuditLog(config.db_url, config.audit_key_path)
    try:
        with policy_lock(config.data_dir):  # no other apply or gateway watch in between
            try:
                old: str | None = load_in_force(release, applied).digest
            except PolicyError:
                old = None  # the files in place do not load: the record says there was no valid set
            new, names, before = change()
            try:
                record_policy_applied(audit, old, new, names, config.data_dir, cli_actor(),
                                      {"via": "cli", "running": False, "changed": new.digest != old, **extra})
            except BaseException:
                restore_policy_files(applied, before)  # no unrecorded change
                raise
    finally:
        audit.close()
    return {"applied": True, **extra, "running": False, "changed": new.digest != old, "old_digest": old,
            "new_digest": new.digest, "files": names, "applied_dir": str(applied)}


def call_running(config: Any, key_file: Path, url: str | None, method: str, **request: Any) -> dict[str, Any]:
    """One admin API call on the running gateway for ``/admin/v1/policies``; its JSON answer."""
    import httpx

    if not key_file.is_file():
        raise ApplianceError(f"the gateway is running but no admin key was found: expected {key_file} "
                             "(or pass --admin-key-file)")
    key = key_file.read_text().strip()
    if url is None:
        host = "127.0.0.1" if config.host in ("0.0.0.0", "", "::") else config.host
        url = f"https://{host}:{config.port}"
    elif not url.startswith("https://"):
        raise ApplianceError(f"--url: expected https://HOST:PORT, found {url[:100]!r}")
    url = url.rstrip("/")
    ca = config.tls_dir / "ca.pem"
    if not ca.is_file():
        raise ApplianceError(f"the gateway is running but its CA certificate is missing: expected {ca} "
                             "(made at the gateway's first start); nothing applied")
    ctx = ssl.create_default_context(cafile=str(ca))
    try:
        answer = httpx.request(method, f"{url}/admin/v1/policies", headers={"Authorization": f"Bearer {key}"},
                               verify=ctx, timeout=60, **request)
    except httpx.HTTPError as exc:
        raise ApplianceError(f"the gateway is running (its run marker names a live process) but {url} did not "
                             f"answer: {type(exc).__name__}; nothing applied") from None
    doc = answer.json() if answer.headers.get("content-type", "").startswith("application/json") else {}
    if answer.status_code == 400 and doc.get("problems"):
        from policies.errors import PolicyProblem

        raise PolicyValidationError([PolicyProblem(p["file"], p["place"], p["expected"], p["found"],
                                                   p.get("line"), p.get("column")) for p in doc["problems"]])
    if answer.status_code != 200:
        message = (doc.get("error") or {}).get("message", answer.text[:200])
        raise ApplianceError(f"the gateway at {url} refused the policy: {answer.status_code} {message}")
    return {**doc, "gateway": url}


def apply_running(config: Any, files: dict[str, bytes], key_file: Path, url: str | None) -> dict[str, Any]:
    body = {"files": {name: data.decode("utf-8", errors="replace") for name, data in files.items()}}
    return call_running(config, key_file, url, "POST", json=body)
