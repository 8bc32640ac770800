"""VM administration on the host: the base images the nodes reported, and the VM instances on the nodes.

- **Images** come from the node facts the runners send (``VmFacts.images``, registration and heartbeats),
  so listing them asks no runner and works for any authenticated user.
- **Instances** are the runner's (``GET {runner}/api/vm/instances``: every instance directory under its
  ``VM_INSTANCES_DIR``, running or not). The host adds what only it knows: the status of the VPS each one
  belongs to, and ``orphan`` when it has no VM VPS with that id on that node (a task removed from the
  host's store, a runner that kept files it could not clean up). Removing one is proxied to the runner,
  and refused (409) while the host's VPS is active on that node: its disk is in use or about to be.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import trio

from kohakuriver_proto.lifecycle import ACTIVE, TaskType
from kohakuriver_proto.models import VpsBackend

from .api_common import ApiProblem, conflict, not_found, unavailable
from .context import HostContext
from .node_registry import NodeEntry
from .runner_client import RunnerRefused, RunnerUnavailable
from .store import ReadTx
from .vm_request import vm_facts

log = logging.getLogger("kohakuriver.host.vm")

#: Nodes asked at once when listing the instances of every node.
LIST_CONCURRENCY = 16
#: Instances accepted from one runner's answer.
MAX_INSTANCES = 10_000
#: The whole "every node" listing answers within this, with the nodes that did not answer named.
LIST_DEADLINE = 15.0


def runner_refused(entry: NodeEntry, exc: RunnerRefused) -> ApiProblem:
    """A runner's refusal the caller cannot act on (its 401 is the cluster token, not the user's): 502."""
    return ApiProblem(502, "bad_gateway", f"node {entry.hostname} refused (HTTP {exc.status}): {exc.message}")


def _node(host: HostContext, hostname: str) -> NodeEntry:
    entry = host.nodes.get(hostname)
    if entry is None:
        raise not_found(f"no node {hostname[:80]!r}")
    return entry


# -- images ------------------------------------------------------------------------------------------------


def images(host: HostContext, hostname: str | None) -> list[dict[str, Any]]:
    """Every base image every node (or ``hostname``) reported: ``{node, node_status, vm_capable, name,
    virtual_size_bytes, file_size_bytes, format, direct_boot, firmware}``, by node then name."""
    entries = [_node(host, hostname)] if hostname is not None else host.nodes.entries()
    rows: list[dict[str, Any]] = []
    for entry in entries:
        facts = vm_facts(entry)
        if facts is None:
            continue
        for image in sorted(facts.images, key=lambda i: i.name):
            rows.append(
                {
                    "node": entry.hostname,
                    "node_status": entry.status,
                    "vm_capable": facts.capable,
                    "name": image.name,
                    "virtual_size_bytes": image.virtual_size_bytes,
                    "file_size_bytes": image.file_size_bytes,
                    "format": image.format,
                    "direct_boot": image.direct_boot,
                    "firmware": image.firmware,
                }
            )
    return rows


# -- instances ---------------------------------------------------------------------------------------------


def _task_id(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit() and 0 < len(value) <= 19:
        return int(value)
    return None


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str_or_none(value: Any) -> str | None:
    return value[:256] if isinstance(value, str) else None


def _instances_of(body: Any, url: str) -> list[Mapping[str, Any]]:
    items = body.get("instances") if isinstance(body, Mapping) else None
    if not isinstance(items, list):
        raise RunnerUnavailable(url, "the answer has no instance list")
    return [i for i in items[:MAX_INSTANCES] if isinstance(i, Mapping)]


async def _node_instances(host: HostContext, entry: NodeEntry) -> list[dict[str, Any]]:
    """One node's instances as the runner lists them, with the host's status and ``orphan``."""
    items = _instances_of(await host.runners.vm_instances(entry.url), entry.url)
    ids = [t for t in (_task_id(i.get("task_id")) for i in items) if t is not None]
    rows = await host.store.read(_vm_vps_states, ids)
    out = []
    for item in items:
        task_id = _task_id(item.get("task_id"))
        known = rows.get(task_id) if task_id is not None else None
        status = known[0] if known is not None else None
        mine = known is not None and known[1] == entry.hostname and known[2]
        out.append(
            {
                "node": entry.hostname,
                "task_id": str(task_id) if task_id is not None else _str_or_none(item.get("task_id")),
                "path": _str_or_none(item.get("path")),
                "disk_bytes": _int_or_none(item.get("disk_bytes")),
                "running": bool(item.get("running")),
                "pid": _int_or_none(item.get("pid")),
                "tap": _str_or_none(item.get("tap")),
                "status": status,
                "orphan": not mine,
            }
        )
    return out


def _vm_vps_states(tx: ReadTx, task_ids: list[int]) -> dict[int, tuple[str, str | None, bool]]:
    """``task_id -> (status, assigned node, is a VM VPS)`` of those of ``task_ids`` the host knows."""
    found: dict[int, tuple[str, str | None, bool]] = {}
    for task_id in task_ids:
        row = tx.get_task(task_id)
        if row is None:
            continue
        task = row.task
        vm = task.task_type is TaskType.VPS and task.vps_backend is VpsBackend.QEMU
        # A stopped VM VPS keeps its disk on the node it last ran on (``restart_node`` while queued).
        node = task.assigned_node or task.restart_node
        found[task_id] = (task.status.value, node, vm)
    return found


async def instances(host: HostContext, hostname: str | None) -> dict[str, Any]:
    """``{"instances": [...], "unreachable": [{node, message}]}``: one node's (its runner must answer:
    503 otherwise) or every online VM-capable node's, asked concurrently (those that do not answer within
    ``LIST_DEADLINE`` are named in ``unreachable``)."""
    if hostname is not None:
        entry = _node(host, hostname)
        if entry.status != "online":
            raise unavailable(f"node {entry.hostname} is offline")
        try:
            found = await _node_instances(host, entry)
        except RunnerUnavailable as exc:
            raise unavailable(
                f"cannot list the VM instances of node {entry.hostname}: {exc.message}"
            ) from None
        except RunnerRefused as exc:
            raise runner_refused(entry, exc) from None
        return {"instances": found, "unreachable": []}

    entries = [
        e
        for e in host.nodes.entries()
        if e.status == "online" and (f := vm_facts(e)) is not None and f.capable
    ]
    results: dict[str, list[dict[str, Any]]] = {}
    failures: dict[str, str] = {}
    limiter = trio.CapacityLimiter(LIST_CONCURRENCY)

    async def one(entry: NodeEntry) -> None:
        async with limiter:
            try:
                results[entry.hostname] = await _node_instances(host, entry)
            except (RunnerUnavailable, RunnerRefused) as exc:
                failures[entry.hostname] = exc.message

    with trio.move_on_after(LIST_DEADLINE):
        async with trio.open_nursery() as nursery:
            for entry in entries:
                nursery.start_soon(one, entry)
    for entry in entries:
        if entry.hostname not in results and entry.hostname not in failures:
            failures[entry.hostname] = f"no answer within {LIST_DEADLINE:g} s"
    listed = [i for e in entries for i in results.get(e.hostname, [])]
    unreachable = [{"node": h, "message": m} for h, m in sorted(failures.items())]
    return {"instances": listed, "unreachable": unreachable}


async def remove_instance(host: HostContext, hostname: str, task_id: int) -> dict[str, Any]:
    """Remove a VM instance's files on ``hostname``; 409 while the host's VPS is active there."""
    entry = _node(host, hostname)
    states = await host.store.read(_vm_vps_states, [task_id])
    known = states.get(task_id)
    if known is not None and known[1] == entry.hostname and known[0] in {s.value for s in ACTIVE}:
        raise conflict(
            f"VPS {task_id} is {known[0]} on {entry.hostname}: stop it (`kr vps stop {task_id}`) before "
            "removing its instance"
        )
    if entry.status != "online":
        raise unavailable(f"node {entry.hostname} is offline")
    try:
        await host.runners.delete_vm_instance(entry.url, task_id)
    except RunnerRefused as exc:
        if exc.status == 404:
            raise not_found(f"node {entry.hostname} has no VM instance {task_id}") from None
        if exc.status == 409:
            raise conflict(f"node {entry.hostname} refused: {exc.message}") from None
        raise runner_refused(entry, exc) from None
    except RunnerUnavailable as exc:
        raise unavailable(f"cannot reach node {entry.hostname}: {exc.message}") from None
    log.info("VM instance %d removed from node %s", task_id, entry.hostname)
    return {"node": entry.hostname, "task_id": str(task_id), "removed": True}


__all__ = ["images", "instances", "remove_instance"]
