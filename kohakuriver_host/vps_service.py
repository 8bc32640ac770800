"""VPS operations on the host: create, list, stop, restart, and snapshots proxied to the VPS's node.

A VPS is a task of type ``vps``: it is queued, placed and dispatched by the same scheduler as a command task
(``POST {runner}/api/execute`` with ``task_type`` vps, its key mode and public key), and moves through the
same lifecycle table. What is VPS-only lives here:

- **Keys.** The host never generates or sees a private key. ``generate`` means the CLI generated the pair
  and sends the public half; ``upload`` sends an existing public key; both are stored with the task
  (``StoredTask.ssh_public_key``) so that every re-creation injects the same key with the same mode.
- **Stop** asks the runner to stop it (snapshot when ``AUTO_SNAPSHOT_ON_STOP``, container removed). The
  runner answers 200 when it is done (the host records ``stopped``) or 202 when it finishes in the background
  and reports ``stopped`` itself. The status never says ``stopped`` while the container may still be
  committed: a final status puts the task in the heartbeat's kill list.
- **Restart** of a running/paused VPS is a container restart on the runner (state kept). Restart of an ended
  one puts it back in the queue pinned to its last node (``StoredTask.restart_node``: its snapshots live
  there); the scheduler places it (``assigning``) when the node has room, exactly like any other queued task,
  so two placers can never hand out the same cores.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import attrs

from kohakuriver_proto.converter import structure
from kohakuriver_proto.errors import LocalProtocolError
from kohakuriver_proto.lifecycle import FINAL, TaskStatus, TaskType
from kohakuriver_proto.models import SshKeyMode, VpsBackend, VpsSpec

from . import tasks_service, vm_request
from .api_common import ApiProblem, conflict, not_found, unavailable
from .auth import Principal, can_see_task
from .context import HostContext
from .runner_client import RunnerRefused, RunnerUnavailable
from .store import Mutation, NodeRow, ReadTx, TaskNotFound, TaskRow, WriteTx
from .stored_task import StoredTask
from .tasks_service import clip, moved_by_user, node_unreachable, runner_errors, transition, utc

log = logging.getLogger("kohakuriver.host.vps")

#: Ended states from which a restart re-creates the VPS (the lifecycle table's ``-> assigning`` rows).
RESTARTABLE = frozenset(
    {TaskStatus.STOPPED, TaskStatus.FAILED, TaskStatus.KILLED, TaskStatus.KILLED_OOM, TaskStatus.LOST}
)
#: States in which the VPS has a live container on its node.
LIVE = frozenset({TaskStatus.RUNNING, TaskStatus.PAUSED})
#: States in which a dispatch may be in progress on the node (the runner prepares the container).
DISPATCHED = frozenset({TaskStatus.ASSIGNING, TaskStatus.PENDING})
MAX_SNAPSHOTS_LISTED = 1000


# -- the create request ------------------------------------------------------------------------------------


@attrs.frozen
class VpsRequest:
    """A validated create request: the spec and the key mode to record."""

    spec: VpsSpec
    key_mode: SshKeyMode


def parse_create(body: Any) -> VpsRequest:
    """``POST /api/vps/create`` body -> ``VpsRequest``; ``ValidationError`` (422) naming the field.

    ``generate`` requires the public half of the pair the CLI made: the host never generates or stores
    private keys.
    """
    spec = structure(body, VpsSpec)
    return VpsRequest(spec, spec.ssh_key_mode)


async def create(host: HostContext, who: Principal, request: VpsRequest) -> tuple[int, str]:
    """Store a queued VPS (placed and dispatched by the scheduler); its task id and a message."""
    spec = request.spec
    tasks_service.check_container_rights(who, spec)
    vm = spec.vps_backend is VpsBackend.QEMU
    memory_bytes, memory_mb = spec.required_memory_bytes, None
    if vm:
        # Everything a VM needs that waiting will not bring is checked against the node facts first.
        choice = await vm_request.check_create(host, spec)
        memory_mb = choice.memory_mb
        memory_bytes = memory_mb * vm_request.MIB  # what the scheduler reserves: the VM's memory
    placement = spec.placement()
    claim = None
    if spec.ip_token is not None:
        claim, placement = tasks_service.reservation_claim(host, spec.ip_token, placement)
    notes = tasks_service.check_feasible(
        host, spec.required_cores, memory_bytes, [placement], "target", vm_image=spec.vm_image if vm else None
    )
    now = host.now()
    config = host.config
    task_id = host.new_task_id()
    task = StoredTask(
        task_id=task_id,
        task_type=TaskType.VPS,
        status=TaskStatus.PENDING,
        submitted_at=utc(now),
        name=spec.name,
        owner=who.username,
        owner_id=who.user_id,
        container_name=spec.container_name,
        registry_image=spec.registry_image,
        # A VM is not a container: the cluster's container defaults (privileged, extra mounts) do not apply.
        privileged=not vm and (spec.privileged or config.TASKS_PRIVILEGED),
        additional_mounts=[]
        if vm
        else list(dict.fromkeys([*spec.additional_mounts, *config.ADDITIONAL_MOUNTS])),
        required_cores=spec.required_cores,
        required_memory_bytes=memory_bytes,
        required_gpus=list(placement.gpu_ids) if placement is not None else [],
        target=None if placement is None else str(placement),
        target_numa_node_id=None if placement is None else placement.numa_node,
        vps_backend=spec.vps_backend,
        vm_image=spec.vm_image if vm else None,
        vm_disk_size=spec.vm_disk_size if vm else None,
        memory_mb=memory_mb,
        ssh_key_mode=request.key_mode,
        status_message="queued",
        ssh_public_key=None if spec.ssh_public_key is None else spec.ssh_public_key.strip(),
        reserved_ip=None if claim is None else claim.ip,
    )
    await host.store.write(tasks_service.insert_tasks_using, [task], claim, now)
    host.wake_scheduler()
    log.info(
        "%s created %sVPS %d (ssh key mode %s)",
        who.username,
        f"VM ({spec.vm_image}, {memory_mb} MiB) " if vm else "",
        task_id,
        request.key_mode.value,
    )
    what = f"VM VPS {task_id} ({spec.vm_image}, {memory_mb} MiB)" if vm else f"VPS {task_id}"
    message = f"{what} created; it starts as soon as a node has room"
    return task_id, message + (f"; {notes[0]}" if notes else "")


# -- reading -----------------------------------------------------------------------------------------------


async def visible_vps(host: HostContext, who: Principal, task_id: int) -> TaskRow:
    """The VPS if it exists and ``who`` may see it; 404 otherwise (a command task is not a VPS)."""
    row = await host.store.read(ReadTx.get_task, task_id)
    if row is None or row.task_type is not TaskType.VPS or not can_see_task(who, row.owner_id):
        raise not_found(f"no VPS {task_id}")
    return row


async def controllable_vps(host: HostContext, who: Principal, task_id: int) -> TaskRow:
    row = await visible_vps(host, who, task_id)
    tasks_service.require_control(who, row)
    return row


async def online_node(host: HostContext, row: TaskRow) -> NodeRow:
    """The VPS's node, which must be online (503 otherwise: its container cannot be reached)."""
    if row.assigned_node is None:
        raise conflict(f"VPS {row.task_id} is not on a node yet")
    node = await host.store.read(ReadTx.get_node, row.assigned_node)
    if node is None:
        raise unavailable(f"node {row.assigned_node} of VPS {row.task_id} is not registered")
    if node.status != "online":
        raise unavailable(f"node {node.hostname} of VPS {row.task_id} is offline")
    return node


def result(task_id: int, status: TaskStatus, message: str) -> dict[str, Any]:
    return {"task_id": str(task_id), "status": status.value, "message": message}


# -- stop --------------------------------------------------------------------------------------------------


async def stop(host: HostContext, who: Principal, task_id: int) -> dict[str, Any]:
    row = await controllable_vps(host, who, task_id)
    status = row.status
    if status in FINAL:
        raise conflict(f"VPS {task_id} is already {status.value}")
    if status in LIVE:
        return await _stop_live(host, who, row)
    # Queued or being prepared: nothing to snapshot. Stop it here; a runner preparing it is told to drop it
    # (the kill path cancels a preparation; a container it still starts is in the heartbeat's kill list).
    before: list[StoredTask] = []

    def mutate(task: StoredTask) -> StoredTask:
        if task.status in FINAL or task.status in LIVE:
            raise conflict(f"VPS {task_id} is {task.status.value} now; try again")
        before.append(task)
        message = f"stopped by {who.username} before it started"
        return transition(task, TaskStatus.STOPPED, host.now(), status_message=message)

    row = await _update(host, task_id, mutate)
    host.wake_scheduler()
    message = f"VPS {task_id} stopped"
    node = before[-1].assigned_node
    if node:
        message += await tasks_service.tell_runner_to_kill(host, node, task_id)
    log.info("%s stopped VPS %d before it started", who.username, task_id)
    return result(task_id, row.status, message)


async def _stop_live(host: HostContext, who: Principal, row: TaskRow) -> dict[str, Any]:
    task_id = row.task_id
    node = await online_node(host, row)
    try:
        code = await host.runners.vps_action(node.url, "stop", task_id)
    except RunnerRefused as exc:
        if exc.status != 404:
            raise conflict(f"the runner refused to stop VPS {task_id}: {exc.message}") from None
        code = 200  # the runner has no such container: there is nothing left to stop
    except RunnerUnavailable as exc:
        raise node_unreachable(node, exc) from None
    if code == 202:  # the runner finishes (snapshot, removal) in the background and reports `stopped`
        row = await _update(
            host, task_id, lambda task: _note(task, f"stopping (requested by {who.username})")
        )
        log.info("%s is stopping VPS %d", who.username, task_id)
        return result(task_id, row.status, f"VPS {task_id} is stopping")
    now = host.now()

    def mutate(task: StoredTask) -> StoredTask | None:
        try:
            stopped = transition(task, TaskStatus.STOPPED, now, status_message=f"stopped by {who.username}")
        except LocalProtocolError:
            return None  # it ended otherwise meanwhile (killed, lost); that status stands
        return None if stopped is task else stopped

    row = await _update(host, task_id, mutate)
    host.wake_scheduler()
    log.info("%s stopped VPS %d", who.username, task_id)
    return result(task_id, row.status, f"VPS {task_id} is {row.status.value}")


def _note(task: StoredTask, message: str) -> StoredTask:
    return attrs.evolve(task, status_message=clip(message))


async def _update(host: HostContext, task_id: int, mutate: Mutation) -> TaskRow:
    try:
        return await host.store.write(WriteTx.update_task, task_id, mutate)
    except TaskNotFound:
        raise not_found(f"no VPS {task_id}") from None


# -- restart -----------------------------------------------------------------------------------------------


async def restart(host: HostContext, who: Principal, task_id: int) -> dict[str, Any]:
    row = await controllable_vps(host, who, task_id)
    status = row.status
    if status in LIVE:
        return await _restart_live(host, who, row)
    if status not in RESTARTABLE:
        raise conflict(
            f"VPS {task_id} is {status.value}; only a running, paused or ended "
            "(stopped, failed, killed, killed_oom, lost) VPS can be restarted"
        )
    last_node = row.assigned_node
    if last_node is not None:
        await online_node(host, row)  # its snapshots and disk are there: 503 until it is back
        if row.task.vps_backend is VpsBackend.QEMU:
            vm_request.check_restart(host, last_node, row.task.vm_image)
    now = host.now()

    def mutate(task: StoredTask) -> StoredTask:
        if task.status not in RESTARTABLE:
            raise conflict(f"VPS {task_id} is {task.status.value} now; try again")
        # stopped -> assigning is the table's restart row; -> pending (without a node) hands the placement
        # to the scheduler, which checks the node has room and sets it assigning again.
        queued = transition(transition(task, TaskStatus.ASSIGNING, now), TaskStatus.PENDING, now)
        where = f" on {last_node}" if last_node else ""
        return attrs.evolve(
            queued,
            assigned_node=None,
            restart_node=last_node,
            dispatch_attempts=0,
            retry_after=None,
            exit_code=None,
            error_message=None,
            ssh_port=None,
            started_at=None,
            vm_ip=None,
            vm_health=None,
            overlay_ip=None,
            status_message=f"restart requested by {who.username}: queued{where}",
        )

    def write(tx: WriteTx) -> tuple[TaskRow, str | None]:
        # Its reserved overlay address was released when it ended: take it again if nobody else has.
        row = tx.update_task(task_id, mutate)
        overlay, reserved = host.overlay, row.task.reserved_ip
        if reserved is None or overlay is None:
            return row, None
        row = tx.update_task(task_id, lambda task: overlay.retake_tx(tx, task, now))
        return row, (None if row.task.reserved_ip == reserved else reserved)

    try:
        row, lost_ip = await host.store.write(write)
    except TaskNotFound:
        raise not_found(f"no VPS {task_id}") from None
    host.wake_scheduler()
    log.info(
        "%s restarts VPS %d (was %s) on %s", who.username, task_id, status.value, last_node or "any node"
    )
    message = f"VPS {task_id} is being re-created" + (f" on {last_node}" if last_node else "")
    if lost_ip is not None:
        message += f"; its reserved overlay address {lost_ip} was taken meanwhile: it gets another one"
    return result(task_id, row.status, message)


async def _restart_live(host: HostContext, who: Principal, row: TaskRow) -> dict[str, Any]:
    task_id = row.task_id
    node = await online_node(host, row)
    refused = f"the runner refused to restart VPS {task_id}"
    with runner_errors(node, lambda exc: conflict(f"{refused}: {exc.message}")):
        await host.runners.vps_action(node.url, "restart", task_id)
    now = host.now()
    message = f"restarted by {who.username}"
    # A restarted container is running, even if it was paused.
    row = await _update(host, task_id, lambda task: moved_by_user(task, TaskStatus.RUNNING, now, message))
    log.info("%s restarted VPS %d in place", who.username, task_id)
    return result(task_id, row.status, f"VPS {task_id} restarted")


# -- SSH host key ------------------------------------------------------------------------------------------

#: What a public host key from a runner must look like before the host passes it on: users pin it.
_HOST_KEY = re.compile(r"ssh-ed25519 [A-Za-z0-9+/]{68}")


async def host_key(host: HostContext, who: Principal, task_id: int) -> dict[str, Any]:
    """The VPS's public SSH host key, for its owner (or an operator) to pin before the first connection.

    The runner makes the key when it first creates the VPS and keeps it across stops and re-creations, so
    pinning it once is enough; asked before that, the answer is 409 (there is no key yet)."""
    row = await controllable_vps(host, who, task_id)
    if row.assigned_node is None:
        raise conflict(f"VPS {task_id} has not been created on a node yet: it has no host key")
    node = await online_node(host, row)
    with runner_errors(node, lambda exc: _host_key_problem(exc, task_id)):
        body = await host.runners.host_key(node.url, task_id)
    key = body.get("host_key") if isinstance(body, Mapping) else None
    if not (isinstance(key, str) and _HOST_KEY.fullmatch(key)):
        raise unavailable(f"node {node.hostname} answered without a valid host key for VPS {task_id}")
    return {"task_id": str(task_id), "host_key": key}


def _host_key_problem(exc: RunnerRefused, task_id: int) -> ApiProblem:
    if exc.status == 404:
        return conflict(f"VPS {task_id} has no host key yet (it was never started on its node)")
    return conflict(f"the runner refused to give the host key of VPS {task_id}: {exc.message}")


# -- snapshots ---------------------------------------------------------------------------------------------


def _tag_time(tag: str) -> int:
    """The ``<unixts>`` of a ``kohakuriver-snapshot/vps-<id>:<unixts>`` tag (0 when it has none)."""
    _, _, suffix = tag.rpartition(":")
    return int(suffix) if suffix.isascii() and suffix.isdigit() and len(suffix) <= 12 else 0


def snapshot_entry(item: Any) -> dict[str, Any] | None:
    """One snapshot as the API returns it: ``{tag, timestamp, created_at, size_bytes}`` (None if it is not
    one). ``timestamp`` is what ``DELETE .../snapshots/{timestamp}`` takes (the tag's suffix)."""
    if not isinstance(item, Mapping) or not isinstance(item.get("tag"), str):
        return None
    size = item.get("size_bytes")
    created = item.get("created_at")
    return {
        "tag": item["tag"],
        "timestamp": _tag_time(item["tag"]) or None,
        "created_at": created if isinstance(created, str | int | float) else None,
        "size_bytes": size if isinstance(size, int) and not isinstance(size, bool) else None,
    }


def snapshot_list(body: Any) -> list[dict[str, Any]]:
    """A runner's list (a JSON list, or ``{"snapshots": [...]}``), newest first."""
    items = body.get("snapshots") if isinstance(body, Mapping) else body
    if not isinstance(items, list):
        return []
    entries = [e for e in map(snapshot_entry, items[:MAX_SNAPSHOTS_LISTED]) if e is not None]
    return sorted(entries, key=lambda e: e["timestamp"] or 0, reverse=True)


def _runner_problem(exc: RunnerRefused, task_id: int, what: str) -> ApiProblem:
    if exc.status == 404:
        return not_found(exc.message)
    return conflict(f"the runner refused to {what} of VPS {task_id}: {exc.message}")


async def list_snapshots(host: HostContext, who: Principal, task_id: int) -> list[dict[str, Any]]:
    row = await visible_vps(host, who, task_id)
    if row.assigned_node is None:
        return []  # never placed: it has no snapshots anywhere
    node = await online_node(host, row)
    try:
        body = await host.runners.list_snapshots(node.url, task_id)
    except RunnerRefused as exc:
        if exc.status == 404:
            return []
        raise _runner_problem(exc, task_id, "list the snapshots") from None
    except RunnerUnavailable as exc:
        raise node_unreachable(node, exc) from None
    return snapshot_list(body)


async def create_snapshot(host: HostContext, who: Principal, task_id: int) -> dict[str, Any]:
    row = await controllable_vps(host, who, task_id)
    if row.status not in LIVE:
        raise conflict(f"VPS {task_id} is {row.status.value}; snapshots are taken of a running or paused VPS")
    node = await online_node(host, row)
    with runner_errors(node, lambda exc: _runner_problem(exc, task_id, "take a snapshot")):
        body = await host.runners.create_snapshot(node.url, task_id)
    entry = snapshot_entry(body.get("snapshot", body) if isinstance(body, Mapping) else None)
    if entry is None:
        raise unavailable(f"node {node.hostname} answered the snapshot request without a snapshot tag")
    log.info("%s took snapshot %s of VPS %d", who.username, entry["tag"], task_id)
    return entry


async def delete_snapshot(host: HostContext, who: Principal, task_id: int, timestamp: int) -> dict[str, Any]:
    row = await controllable_vps(host, who, task_id)
    if row.assigned_node is None:
        raise not_found(f"VPS {task_id} has no snapshot {timestamp}")
    node = await online_node(host, row)
    with runner_errors(node, lambda exc: _runner_problem(exc, task_id, "delete a snapshot")):
        await host.runners.delete_snapshot(node.url, task_id, timestamp)
    log.info("%s deleted snapshot %d of VPS %d", who.username, timestamp, task_id)
    return {"task_id": str(task_id), "timestamp": timestamp, "deleted": True}


async def restore_snapshot(host: HostContext, who: Principal, task_id: int, timestamp: int) -> dict[str, Any]:
    """Put a VPS back to one of its snapshots, on its node (the runner decides what that takes: a VM's
    disk is reverted, with the VM stopped or restarted around it). The runner's 404 (no such snapshot),
    409 (not in a state it can restore from) and 501 (a backend that cannot restore in place) pass on."""
    row = await controllable_vps(host, who, task_id)
    if row.assigned_node is None:
        raise not_found(f"VPS {task_id} has no snapshot {timestamp}")
    node = await online_node(host, row)
    try:
        body = await host.runners.restore_snapshot(node.url, task_id, timestamp)
    except RunnerRefused as exc:
        raise _runner_problem(exc, task_id, f"restore snapshot {timestamp}") from None
    except RunnerUnavailable as exc:
        if exc.status == 501:
            text = exc.message.removeprefix("HTTP 501: ")
            raise ApiProblem(501, "not_implemented", f"node {node.hostname}: {text}") from None
        raise node_unreachable(node, exc) from None
    message = body.get("message") if isinstance(body, Mapping) else None
    if not isinstance(message, str) or not message.strip():
        message = f"VPS {task_id} restored to snapshot {timestamp}"
    log.info("%s restored VPS %d to snapshot %d", who.username, task_id, timestamp)
    return {"task_id": str(task_id), "timestamp": timestamp, "message": clip(message)}
