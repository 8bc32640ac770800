"""Nodes: registration, heartbeats (with task reconciliation) and the node views with usage.

A heartbeat is the hottest path of the host (500 runners every 5 s = 100 a second), so it is exactly one
store transaction of a few statements (update the node, look up the states of the tasks the runner names,
change only those that need it), and it wakes the scheduler only when something that matters for placement
changed (the node came back, its Docker state flipped, a task ended). Node facts are served from the
in-memory registry (``node_registry.py``); usage comes from the active tasks in the store.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

import attrs
import trio

from kohakuriver_proto import lifecycle
from kohakuriver_proto.converter import unstructure
from kohakuriver_proto.lifecycle import ACTIVE, FINAL, TaskStatus, TaskType
from kohakuriver_proto.models import Heartbeat, NodeRegistration
from kohakuriver_proto.models.overlay import OverlaySettingsView, RegisterAnswer

from . import overlay_service
from .api_common import conflict, not_found
from .context import HostContext
from .node_registry import NodeEntry
from .store import NodeRow, OverlayRunnerRow, ReadTx, WriteTx
from .stored_task import StoredTask
from .tasks_service import apply_report, transition

log = logging.getLogger("kohakuriver.host.nodes")

USAGE_KEYS = ("required_cores", "required_memory_bytes", "required_gpus")
#: Heartbeat fields kept as the node's latest metrics (the task lists are acted on, not stored).
_NOT_METRICS = ("running_tasks", "finished_tasks")


# -- views -------------------------------------------------------------------------------------------------


@attrs.define
class Usage:
    cores: int = 0
    memory: int = 0
    gpus: set[int] = attrs.field(factory=set)
    tasks: int = 0


def _ints(value: Any) -> list[int]:
    """``required_gpus`` as ``json_extract`` returns it (JSON text) or as a list."""
    if value is None:
        return []
    if isinstance(value, str):
        value = json.loads(value)
    return [int(v) for v in value]


def usage_by_node(rows: Iterable[tuple[Any, ...]]) -> dict[str, Usage]:
    """Resources held per node by active tasks, from ``task_summaries(ACTIVE, USAGE_KEYS, assigned=True)``."""
    usage: dict[str, Usage] = {}
    for _task_id, _type, _status, node, _seq, cores, memory, gpus in rows:
        u = usage.setdefault(node, Usage())
        u.cores += int(cores or 0)
        u.memory += int(memory or 0)
        u.gpus.update(_ints(gpus))
        u.tasks += 1
    return usage


def usage_fields(entry: NodeEntry, usage: Usage | None) -> dict[str, Any]:
    u = usage or Usage()
    return {
        "cores_in_use": u.cores,
        "available_cores": max(entry.total_cores - u.cores, 0),
        "memory_reserved_bytes": u.memory,
        "gpus_in_use": sorted(u.gpus),
        "running_task_count": u.tasks,
    }


def node_view(entry: NodeEntry, usage: Usage | None) -> dict[str, Any]:
    """A node as the API returns it (the fields of ``models.NodeInfo``)."""
    return {**entry.static_view(), **usage_fields(entry, usage)}


async def _usage(host: HostContext) -> dict[str, Usage]:
    return usage_by_node(await host.store.read(ReadTx.task_summaries, ACTIVE, USAGE_KEYS, assigned=True))


async def list_nodes_json(host: HostContext) -> str:
    """``GET /api/nodes`` as JSON text: each node's cached JSON plus its usage (see ``node_registry``)."""
    usage = await _usage(host)
    idle = Usage()
    parts = []
    for entry in host.nodes.entries():
        u = usage.get(entry.hostname, idle)
        # The usage fields are integers only: formatting them directly is several times cheaper than
        # json.dumps, and this loop runs for every node on every request.
        gpus = ",".join(map(str, sorted(u.gpus)))
        parts.append(
            f'{entry.json_prefix()},"cores_in_use":{u.cores},'
            f'"available_cores":{max(entry.total_cores - u.cores, 0)},"memory_reserved_bytes":{u.memory},'
            f'"gpus_in_use":[{gpus}],"running_task_count":{u.tasks}}}'
        )
    return "[" + ",".join(parts) + "]"


async def get_node(host: HostContext, hostname: str) -> dict[str, Any] | None:
    entry = host.nodes.get(hostname)
    if entry is None:
        return None

    def read(tx: ReadTx) -> list[tuple[Any, ...]]:
        return [r for r in tx.task_summaries(ACTIVE, USAGE_KEYS, assigned=True) if r[3] == hostname]

    return node_view(entry, usage_by_node(await host.store.read(read)).get(hostname))


# -- register and heartbeat --------------------------------------------------------------------------------


async def register(host: HostContext, reg: NodeRegistration) -> RegisterAnswer:
    """Upsert the node as online (its tasks are reconciled by its heartbeats) and, with the overlay on,
    give it its overlay id in the same transaction. A runner whose ``OVERLAY_*`` settings differ from the
    host's is refused (409) before anything is stored."""
    overlay = host.overlay
    if overlay is None:
        overlay_service.check_settings(OverlaySettingsView.from_config(host.config), reg)
    else:
        overlay.check_settings(reg)
    underlay, overlay_error = (None, None) if overlay is None else await overlay.underlay_of(reg)
    now = host.now()
    registration = unstructure(reg)

    def write(tx: WriteTx) -> tuple[bool, NodeRow, OverlayRunnerRow | None]:
        existed = tx.get_node(reg.hostname) is not None
        node = tx.upsert_node(reg.hostname, reg.url, registration, now=now)
        # Whatever an earlier heartbeat said about Docker, the registration is newer.
        metrics = {
            **node.metrics,
            "docker_available": reg.docker_available,
            "docker_error": reg.docker_error,
            "runner_version": reg.runner_version,
            "gpu_info": registration["gpu_info"],
            "vm_capable": reg.vm_capable,
            "vm": registration["vm"],
        }
        row = tx.heartbeat_node(reg.hostname, metrics, now=now)
        assert row is not None  # upserted just above, in this transaction
        runner = (
            None
            if overlay is None or underlay is None
            else overlay.allocate_tx(tx, reg.hostname, underlay, now)
        )
        return not existed, row, runner

    created, row, runner = await host.store.write(write)
    host.nodes.put(row)
    host.wake_scheduler()
    verb = "registered" if created else "registered again"
    if reg.docker_available:
        log.info("node %s %s at %s", reg.hostname, verb, reg.url)
    else:
        log.warning(
            "node %s registered without Docker (%s): it gets no tasks", reg.hostname, reg.docker_error
        )
    message = f"node {reg.hostname} {verb}"
    if overlay is None or not overlay.enabled:
        return RegisterAnswer(message=message)
    joined = await overlay.registered(reg.hostname, runner, overlay_error)
    return RegisterAnswer(message=message, overlay=joined.assignment, overlay_error=joined.error)


async def remove_node(host: HostContext, hostname: str) -> dict[str, Any]:
    """Forget an offline node without active tasks: its row, its overlay id and its unused reservations
    (one transaction); its link goes with the next reconcile. Its ended tasks keep its name."""

    def write(tx: WriteTx) -> OverlayRunnerRow | None:
        node = tx.get_node(hostname)
        if node is None:
            raise not_found(f"no node {hostname[:80]!r}")
        if node.status == "online":
            raise conflict(
                f"node {hostname} is online: stop its runner first (a running runner registers again)"
            )
        active = tx.count_tasks(node=hostname, statuses=[s.value for s in ACTIVE])
        if active:
            raise conflict(f"node {hostname} still has {active} active task(s): kill or stop them first")
        tx.delete_node(hostname)
        for reservation in tx.reservations(node=hostname):
            if reservation.used_by is None:
                tx.delete_reservation(reservation.nonce)
        return tx.delete_overlay_runner(hostname)

    released = await host.store.write(write)
    host.nodes.remove(hostname)
    if host.overlay is not None:
        await host.overlay.node_removed(hostname, released)
    host.wake_scheduler()
    message = f"node {hostname} removed"
    if released is not None:
        message += f"; overlay runner id {released.runner_id} released"
    log.info("%s", message)
    return {"hostname": hostname, "message": message}


@attrs.frozen
class HeartbeatOutcome:
    known: bool
    kill: list[int] = attrs.field(factory=list)
    #: A task ended with this heartbeat (its resources are free).
    finished: bool = False
    #: Mesh mode: the runner's peers (JSON shape) when its copy may be stale; None: nothing to say.
    overlay_peers: list[dict[str, Any]] | None = None

    def answer(self) -> dict[str, Any]:
        """The heartbeat's answer body (``models.HeartbeatAnswer``)."""
        body: dict[str, Any] = {"kill": [str(t) for t in self.kill]}
        if self.overlay_peers is not None:
            body["overlay_peers"] = self.overlay_peers
        return body


def _running(task: StoredTask, now: float) -> StoredTask | None:
    try:
        running = transition(task, TaskStatus.RUNNING, now, last_report_at=now, status_message="running")
    except lifecycle.LocalProtocolError:
        return None
    return None if running is task else running


def heartbeat_tx(
    tx: WriteTx, hostname: str, hb: Heartbeat, metrics: dict[str, Any] | str, now: float
) -> HeartbeatOutcome:
    """Record the heartbeat and reconcile the tasks the runner reports, in the caller's transaction.

    - a task the runner runs that the host has as ``assigning`` (or ``pending`` on that node) is running;
    - a VPS the host had marked ``lost`` is running again (its node came back with it alive);
    - a task the host has as final, does not know, or has on another node goes in the kill list: the host's
      record is the truth, and a container nobody tracks would hold the node's resources forever;
    - ``finished_tasks`` are applied like ``/api/update`` reports.
    """
    if not tx.record_heartbeat(hostname, metrics, now=now):
        return HeartbeatOutcome(False)
    kill: list[int] = []
    states = tx.task_states(hb.running_tasks) if hb.running_tasks else {}
    for task_id in hb.running_tasks:
        state = states.get(task_id)
        if state is None or state[2] != hostname:
            kill.append(task_id)
            continue
        status, task_type = TaskStatus(state[0]), TaskType(state[1])
        if status in (TaskStatus.ASSIGNING, TaskStatus.PENDING) or (
            status in FINAL and lifecycle.check_transition(task_type, status, TaskStatus.RUNNING)
        ):
            tx.update_task(task_id, lambda task: _running(task, now))
        elif status in FINAL:
            kill.append(task_id)
    finished = False
    for update in hb.finished_tasks:
        finished = apply_report(tx, update, now, node=hostname).finished or finished
    return HeartbeatOutcome(True, kill, finished)


class _Pending:
    __slots__ = ("done", "hb", "hostname", "metrics", "now", "result")

    def __init__(self, hostname: str, hb: Heartbeat, metrics: dict[str, Any] | str, now: float) -> None:
        self.hostname, self.hb, self.metrics, self.now = hostname, hb, metrics, now
        self.done = trio.Event()
        self.result: HeartbeatOutcome | BaseException | None = None


class HeartbeatBatcher:
    """Group commit for heartbeats: the heartbeats that arrive while one transaction runs are applied
    together in the next one, each inside its own savepoint (one bad heartbeat cannot undo the others).

    Why: at 100 heartbeats a second one transaction each means 100 hand-offs a second to the store's writer
    thread and back, each paying for the GIL; after any stall (a slow disk, a busy machine) they queue up
    and are worked off one by one, which is where tail latency comes from. Batching makes the catch-up one
    transaction and costs nothing when the host is idle (a batch of one)."""

    def __init__(self, host: HostContext) -> None:
        self._host = host
        self._pending: list[_Pending] = []
        self._wakeup = trio.Event()

    async def apply(
        self, hostname: str, hb: Heartbeat, metrics: dict[str, Any] | str, now: float
    ) -> HeartbeatOutcome:
        item = _Pending(hostname, hb, metrics, now)
        self._pending.append(item)
        self._wakeup.set()
        await item.done.wait()
        if isinstance(item.result, BaseException):
            raise item.result
        assert item.result is not None
        return item.result

    @staticmethod
    def _apply_all(tx: WriteTx, batch: list[_Pending]) -> list[HeartbeatOutcome | BaseException]:
        results: list[HeartbeatOutcome | BaseException] = []
        for item in batch:
            tx.conn.execute("SAVEPOINT heartbeat")
            try:
                results.append(heartbeat_tx(tx, item.hostname, item.hb, item.metrics, item.now))
            except Exception as exc:  # this heartbeat's error, answered to its runner; the others commit
                tx.conn.execute("ROLLBACK TO heartbeat")
                results.append(exc)
            tx.conn.execute("RELEASE heartbeat")
        return results

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            batch, self._pending = self._pending, []
            if not batch:
                continue
            try:
                results = await self._host.store.write(self._apply_all, batch)
            except BaseException as exc:
                for item in batch:
                    item.result = exc if isinstance(exc, Exception) else RuntimeError("the host is stopping")
                    item.done.set()
                raise
            for item, result in zip(batch, results, strict=True):
                item.result = result
                item.done.set()


async def heartbeat(host: HostContext, hostname: str, hb: Heartbeat) -> HeartbeatOutcome:
    data = unstructure(hb)
    for key in _NOT_METRICS:
        data.pop(key, None)
    # Serialised once, here: the store writes this text and the registry keeps it (see NodeEntry).
    metrics = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    now = host.now()
    if host.heartbeats is not None:
        outcome = await host.heartbeats.apply(hostname, hb, metrics, now)
    else:
        outcome = await host.store.write(heartbeat_tx, hostname, hb, metrics, now)
    if not outcome.known:
        return outcome
    docker = (hb.docker_available, hb.docker_error)
    was_online, placement_changed = host.nodes.heartbeat(hostname, metrics, docker, now, data.get("vm"))
    if not was_online:
        log.info("node %s is back online", hostname)
    if outcome.kill:
        log.info("node %s runs tasks that are over: telling it to kill %s", hostname, outcome.kill)
    if placement_changed or outcome.finished:
        host.wake_scheduler()
    if host.overlay is not None:
        peers = host.overlay.heartbeat_peers(hostname)
        if peers is not None:
            outcome = attrs.evolve(outcome, overlay_peers=peers)
    return outcome


def health_counts(host: HostContext) -> tuple[int, int]:
    return host.nodes.counts()


__all__ = [
    "HeartbeatBatcher",
    "HeartbeatOutcome",
    "Usage",
    "get_node",
    "health_counts",
    "heartbeat",
    "list_nodes_json",
    "node_view",
    "register",
    "remove_node",
    "usage_by_node",
]
