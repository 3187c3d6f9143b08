"""Admin API for the node registry: list, add, remove, drain, undrain. Every change is an audit
event under the admin's name; the gateway's fleet picks it up at its next refresh."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from appliance.gateway.deps import AdminDep, RuntimeDep
from appliance.nodes import NodeError
from appliance.service import RequestRejected

router = APIRouter(prefix="/admin/v1/nodes")

Short = Annotated[str, StringConstraints(min_length=1, max_length=128)]


class NodeCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    url: Annotated[str, StringConstraints(min_length=9, max_length=512)]
    labels: dict[Short, Short] = Field(max_length=32)
    models: list[Short] = Field(min_length=1, max_length=64)


def _actor(admin: Any) -> str:
    return str(getattr(admin, "actor", "admin-api"))


def _refused(exc: NodeError) -> RequestRejected:
    status = 404 if str(exc).startswith("no node named") else 409 if "already exists" in str(exc) else 400
    return RequestRejected(status, str(exc), "invalid_request_error", "node_invalid" if status != 404 else
                           "node_not_found")


async def _audit(runtime: RuntimeDep, admin: Any, event: str, data: dict[str, Any]) -> None:
    await asyncio.to_thread(runtime.audit.append, f"admin.{event}", stream="_admin", actor=_actor(admin), data=data)


@router.get("")
async def list_nodes(runtime: RuntimeDep, _admin: AdminDep) -> dict[str, Any]:
    nodes = await asyncio.to_thread(runtime.nodes.all)
    live = {h.name: h for h in runtime.fleet.handles()}
    data = []
    for node in nodes:
        entry = node.public()
        handle = live.get(node.name)
        entry["in_flight"] = handle.in_flight if handle else 0
        entry["waiting"] = int(handle.stats.get("waiting", 0)) if handle else 0
        data.append(entry)
    return {"data": data}


@router.post("", status_code=201)
async def add_node(body: NodeCreate, runtime: RuntimeDep, admin: AdminDep) -> dict[str, Any]:
    try:
        node = await asyncio.to_thread(runtime.nodes.add, body.name, body.url, dict(body.labels), body.models)
    except NodeError as exc:
        raise _refused(exc) from exc
    await _audit(runtime, admin, "node_added", {"node": node.name, "url": node.url, "labels": node.labels,
                                                "models": list(node.models), "source": "admin"})
    return node.public()


@router.delete("/{name}")
async def remove_node(name: str, runtime: RuntimeDep, admin: AdminDep) -> dict[str, Any]:
    try:
        node = await asyncio.to_thread(runtime.nodes.remove, name)
    except NodeError as exc:
        raise _refused(exc) from exc
    await _audit(runtime, admin, "node_removed", {"node": node.name})
    return {"name": node.name, "removed": True}


@router.post("/{name}/drain")
async def drain_node(name: str, runtime: RuntimeDep, admin: AdminDep) -> dict[str, Any]:
    try:
        node = await asyncio.to_thread(runtime.nodes.require, name)
        if node.state == "active":
            await asyncio.to_thread(runtime.nodes.set_state, name, "draining", expect=("active",))
            await _audit(runtime, admin, "node_draining", {"node": name})
    except NodeError as exc:
        raise _refused(exc) from exc
    await runtime.fleet.refresh(probe=False)  # the new state at once; probes stay with the health loop
    refreshed = await asyncio.to_thread(runtime.nodes.require, name)
    return refreshed.public()


@router.post("/{name}/undrain")
async def undrain_node(name: str, runtime: RuntimeDep, admin: AdminDep) -> dict[str, Any]:
    try:
        node = await asyncio.to_thread(runtime.nodes.require, name)
        if node.state != "active":
            await asyncio.to_thread(runtime.nodes.set_state, name, "active")
            await _audit(runtime, admin, "node_undrained", {"node": name, "was": node.state})
    except NodeError as exc:
        raise _refused(exc) from exc
    await runtime.fleet.refresh(probe=False)  # the new state at once; probes stay with the health loop
    return (await asyncio.to_thread(runtime.nodes.require, name)).public()
