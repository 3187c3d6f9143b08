"""Admin API for the policy set in force: read it, its schema, apply files without restart, reset.

The set in force is the release's policy files (``policies_dir`` in appliance.yaml, never
written) with the applied files (DATA_DIR/policies) laid over them by name (``policies.effective``).
``POST /admin/v1/policies`` takes policy files and writes them to the applied directory: each
replaces the applied file of the same name or is added, and so lays over the release's file of
that name, if any (``policies.apply``). The body is either one file's YAML text
(``Content-Type: application/yaml``, its name in ``?name=``, default ``site.yaml``) or JSON
``{"files": {"NAME.yaml": "TEXT", ...}}``, at most ``MAX_APPLY_BYTES`` in all. In order:

1. the set that would be in force is validated; any problem: 400 ``invalid_policy`` with every
   problem (file, line, column, place, expected, found) under ``problems``; nothing changes;
2. the files are written to the applied directory, each atomically, so the next start (of this
   release or of an upgrade) loads the same set;
3. ``admin.policy_applied`` (old and new digest, the admin and key id, the files) is made durable;
   if that fails the files are put back and the answer is 503: no unrecorded change;
4. the set is swapped in one step on the event loop (``Runtime.replace_policies``): requests
   admitted from then on use it, requests in flight keep theirs.

``DELETE /admin/v1/policies`` (all applied files, or those named by ``?file=``) and
``DELETE /admin/v1/policies/{file}`` remove applied files, so the release's file of that name (if
any) is in force again: the same steps, with the set that remains validated first (refused with
every problem when it is invalid; 404 for a file that is not applied) and recorded as
``admin.policy_applied`` with ``reset: true``.

Applies and resets are serialised per process (an asyncio lock, shared with the policy watch) and across the
processes of one data directory (``policy_audit.policy_lock`` around steps 1-3). The other gateway
workers of the install take the new files up within their watch interval (``policy_watch.py``).
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from appliance.gateway.deps import AdminDep, RuntimeDep
from appliance.gateway.policy_watch import apply_lock, watch_policies
from appliance.openai_schema import error_body
from appliance.policy_audit import policy_lock, record_policy_applied
from appliance.principal import AdminPrincipal
from appliance.service import RequestRejected
from policies import PolicySet
from policies.apply import MAX_FILES, overlay, remove_policy_files, restore_policy_files, without, write_policy_files
from policies.effective import applied_policy_dir
from policies.errors import PolicyError, PolicyNotFoundError, PolicyValidationError
from policies.schema import policy_file_schema

router = APIRouter(prefix="/admin/v1", lifespan=watch_policies)  # files changed under it: policy_watch.py
MAX_APPLY_BYTES = 1 << 20  # all files of one apply together
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml", "text/plain")


class PolicyFiles(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    files: dict[str, str] = Field(min_length=1, max_length=MAX_FILES)


def invalid_policy_response(exc: PolicyValidationError, policy_dir: Path, names: list[str]) -> JSONResponse:
    """400 with every problem; a file posted is named as posted (its name), not by its place on disk."""
    posted = {str(policy_dir / name): name for name in names}
    located = [dataclasses.replace(p, file=posted.get(p.file, p.file)) for p in exc.problems]
    problems = [p.to_dict() for p in located]
    first = located[0].located()
    more = f" (and {len(problems) - 1} more problem(s): see problems)" if len(problems) > 1 else ""
    body = error_body(f"invalid policy, nothing applied: {first}{more}", "invalid_request_error", "invalid_policy")
    return JSONResponse({**body, "problems": problems}, status_code=400)


async def _read_files(request: Request, name: str) -> dict[str, bytes]:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_APPLY_BYTES:
        raise RequestRejected(413, f"policy body too large: expected at most {MAX_APPLY_BYTES} bytes, "
                                   f"found {declared}", "invalid_request_error", "request_too_large")
    raw = await request.body()
    if len(raw) > MAX_APPLY_BYTES:
        raise RequestRejected(413, f"policy body too large: expected at most {MAX_APPLY_BYTES} bytes, "
                                   f"found {len(raw)}", "invalid_request_error", "request_too_large")
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if kind == "application/json":
        try:
            parsed = PolicyFiles.model_validate_json(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "body"
            raise RequestRejected(400, f"policy body: expected {{\"files\": {{\"NAME.yaml\": \"YAML text\"}}}} "
                                       f"({where}: {first['msg']})", "invalid_request_error", "invalid_request",
                                  param=where) from None
        return {file: text.encode() for file, text in parsed.files.items()}
    if kind in YAML_TYPES:
        return {name: raw}
    raise RequestRejected(400, f"policy body: expected Content-Type application/yaml (one file, named by ?name=) "
                               f"or application/json ({{\"files\": {{...}}}}), found {kind[:64] or 'none'!r}",
                          "invalid_request_error", "unsupported_media_type")


def _apply_files(runtime: Any, admin: AdminPrincipal, old: PolicySet, files: dict[str, bytes]) -> PolicySet:
    """In a worker thread, under the data directory's policy lock (so no other gateway process takes
    the files up half written, or records them as a change of its own): check, write, record."""
    release, data_dir = runtime.config.policies_dir, runtime.config.data_dir
    applied = applied_policy_dir(data_dir)
    with policy_lock(data_dir):
        new = overlay(release, applied, files)
        before = write_policy_files(applied, files)
        try:
            record_policy_applied(runtime.audit, old, new, sorted(files), data_dir, admin.actor, {
                "via": "admin api", "by_key_id": admin.key_id, "running": True, "changed": new.digest != old.digest,
                "run_id": runtime.run_id})
        except Exception as exc:
            restore_policy_files(applied, before)
            raise RequestRejected(503, "audit log unavailable: the policy was not applied", "server_error",
                                  "audit_unavailable") from exc
    return new


def _reset_files(runtime: Any, admin: AdminPrincipal, old: PolicySet,
                 names: list[str] | None) -> tuple[list[str], PolicySet]:
    """As ``_apply_files``, removing applied files (``None``: all): check, remove, record."""
    release, data_dir = runtime.config.policies_dir, runtime.config.data_dir
    applied = applied_policy_dir(data_dir)
    with policy_lock(data_dir):
        gone, new = without(release, applied, names)
        before = remove_policy_files(applied, gone)
        try:
            record_policy_applied(runtime.audit, old, new, gone, data_dir, admin.actor, {
                "via": "admin api", "by_key_id": admin.key_id, "running": True, "changed": new.digest != old.digest,
                "reset": True, "run_id": runtime.run_id})
        except Exception as exc:
            restore_policy_files(applied, before)
            raise RequestRejected(503, "audit log unavailable: the policy was not reset", "server_error",
                                  "audit_unavailable") from exc
    return gone, new


@router.get("/policies")
def get_policies(runtime: RuntimeDep, _admin: AdminDep) -> dict[str, Any]:
    """The policy set in force: digest, source files and every document."""
    return runtime.policies.to_dict()


@router.get("/policies/schema")
def get_policy_schema(_admin: AdminDep) -> dict[str, Any]:
    """The JSON Schema of one policy file (also in docs/policy.schema.json)."""
    return policy_file_schema()


_BODY = {"requestBody": {"required": True, "content": {
    "application/yaml": {"schema": {"type": "string", "description": "One policy file's YAML text, named by ?name="}},
    "application/json": {"schema": PolicyFiles.model_json_schema()}}}}


@router.post("/policies", response_model=None, openapi_extra=_BODY)
async def apply_policies(request: Request, runtime: RuntimeDep, admin: AdminDep,
                         name: str = "site.yaml") -> dict[str, Any] | JSONResponse:
    files = await _read_files(request, name)
    applied = applied_policy_dir(runtime.config.data_dir)
    async with apply_lock(request.app):
        old = runtime.policies
        try:
            new = await asyncio.to_thread(_apply_files, runtime, admin, old, files)
        except PolicyValidationError as exc:
            return invalid_policy_response(exc, applied, list(files))
        except PolicyError as exc:
            raise RequestRejected(400, str(exc), "invalid_request_error", "invalid_policy") from None
        runtime.replace_policies(new)
    return {"applied": True, "running": True, "changed": new.digest != old.digest, "old_digest": old.digest,
            "new_digest": new.digest, "files": sorted(files), "applied_dir": str(applied)}


async def _reset(request: Request, runtime: Any, admin: AdminPrincipal,
                 names: list[str] | None) -> dict[str, Any] | JSONResponse:
    applied = applied_policy_dir(runtime.config.data_dir)
    async with apply_lock(request.app):
        old = runtime.policies
        try:
            gone, new = await asyncio.to_thread(_reset_files, runtime, admin, old, names)
        except PolicyValidationError as exc:
            return invalid_policy_response(exc, applied, [])
        except PolicyNotFoundError as exc:
            raise RequestRejected(404, str(exc), "invalid_request_error", "policy_not_found") from None
        except PolicyError as exc:
            raise RequestRejected(400, str(exc), "invalid_request_error", "invalid_policy") from None
        runtime.replace_policies(new)
    return {"applied": True, "reset": True, "running": True, "changed": new.digest != old.digest,
            "old_digest": old.digest, "new_digest": new.digest, "files": gone, "applied_dir": str(applied)}


@router.delete("/policies", response_model=None)
async def reset_policies(request: Request, runtime: RuntimeDep, admin: AdminDep,
                         file: Annotated[list[str] | None, Query()] = None,
                         ) -> dict[str, Any] | JSONResponse:
    """Remove applied files (all, or those named by ``?file=``): the release's policy is in force again."""
    return await _reset(request, runtime, admin, file)


@router.delete("/policies/{file}", response_model=None)
async def reset_policy_file(request: Request, runtime: RuntimeDep, admin: AdminDep,
                            file: str) -> dict[str, Any] | JSONResponse:
    """Remove one applied file: the release's file of that name (if any) is in force again."""
    return await _reset(request, runtime, admin, [file])
