"""The scheduling loop: places queued tasks on nodes and dispatches them to their runners.

It runs a pass when woken (a submit, a task ending, a node registering or coming back, a dispatch failing)
and on a periodic tick (backoff of requeued tasks expires, missed wake-ups are harmless). Wake-ups that
arrive during a pass cause exactly one more pass, so a burst of 100 submits costs a few passes, not 100.

A pass:

1. reads, in one snapshot, the nodes, what every active task holds, and the queue (``pending`` tasks without
   a node, oldest first);
2. asks ``scheduler.plan_detailed`` where tasks go;
3. in one write transaction, for each placement checks that the task is still queued and its node is still
   online with Docker, and sets it ``assigning`` on that node (the resources count from this moment, so the
   next pass cannot place something else in the same room); tasks no node can ever run now (a node shrank)
   fail with the reason, waiting tasks get their reason as ``status_message``;
4. dispatches each placed task to its runner in the background (bounded concurrency, short timeouts): the
   runner's 202 is recorded; a runner that cannot be reached puts the task back in the queue with backoff
   (and fails it after a few attempts); a runner that refuses it (4xx) fails it with the runner's reason.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import attrs
import trio

from kohakuriver_net.task_steps import step
from kohakuriver_proto.errors import ValidationError
from kohakuriver_proto.lifecycle import ACTIVE, TaskStatus
from kohakuriver_proto.models import VpsBackend
from kohakuriver_proto.targets import parse_target

from . import scheduler
from .context import HostContext
from .runner_client import RunnerRefused, RunnerUnavailable
from .store import ReadTx, WriteTx
from .stored_task import K_RESTART_NODE, K_RETRY_AFTER, StoredTask
from .tasks_service import clip, dispatch_failed, execute_request, transition, waits_for_retry

log = logging.getLogger("kohakuriver.host.scheduler")

TICK_SECONDS = 2.0
#: Pause after a pass before the next one, so a burst of wake-ups is one more pass, not many.
MIN_PASS_INTERVAL = 0.02
DISPATCH_CONCURRENCY = 32
ALLOC_KEYS = ("required_cores", "required_memory_bytes", "required_gpus", "target_numa_node_id")
QUEUE_KEYS = (
    "required_cores",
    "required_memory_bytes",
    "required_gpus",
    "target",
    "status_message",
    K_RETRY_AFTER,
    K_RESTART_NODE,
    "vps_backend",
    "vm_image",
)


def still_queued(task: StoredTask) -> bool:
    return task.status is TaskStatus.PENDING and task.assigned_node is None


def _ints(value: Any) -> frozenset[int]:
    if value is None:
        return frozenset()
    if isinstance(value, str):
        value = json.loads(value)
    return frozenset(int(v) for v in value)


class SchedulingLoop:
    def __init__(self) -> None:
        self._wakeup = trio.Event()
        self._wakeup.set()  # the first pass runs at once: the queue may hold tasks from before a restart
        self._limiter = trio.CapacityLimiter(DISPATCH_CONCURRENCY)
        self.passes = 0

    def wake(self) -> None:
        self._wakeup.set()

    async def run(
        self, host: HostContext, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with trio.open_nursery() as dispatches:
            task_status.started()
            while True:
                with trio.move_on_after(TICK_SECONDS):
                    await self._wakeup.wait()
                self._wakeup = trio.Event()
                try:
                    await self.run_pass(host, dispatches, woken=time.monotonic())
                except Exception:  # one bad pass must not stop scheduling; the next tick tries again
                    log.exception("scheduling pass failed")
                self.passes += 1
                await trio.sleep(MIN_PASS_INTERVAL)

    async def run_pass(
        self, host: HostContext, dispatches: trio.Nursery, *, woken: float | None = None
    ) -> None:
        def read(tx: ReadTx) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
            queue = tx.task_summaries([TaskStatus.PENDING], QUEUE_KEYS, assigned=False)
            if not queue:
                return [], []
            return tx.task_summaries(ACTIVE, ALLOC_KEYS, assigned=True), queue

        active, queue = await host.store.read(read)
        if not queue:
            return
        now = host.now()
        caps = host.nodes.capacities()
        allocations = [
            scheduler.Allocation(task_id, node, seq, int(cores or 0), int(memory or 0), _ints(gpus), numa)
            for task_id, _type, _status, node, seq, cores, memory, gpus, numa in active
        ]
        demands: list[scheduler.Demand] = []
        current: dict[int, str | None] = {}
        targets: dict[int, str | None] = {}
        for row in queue:
            (task_id, _type, _status, _node, seq, cores, memory, gpus, target, message, retry_after, pin,
             backend, vm_image) = row  # fmt: skip
            if waits_for_retry(retry_after, now):
                continue
            parsed = parse_target(target) if target else None
            # A restarted VPS goes back to the node that holds its snapshots, whatever its target said.
            hostname = pin if isinstance(pin, str) and pin else (parsed and parsed.hostname)
            demands.append(
                scheduler.Demand(
                    task_id=task_id,
                    queue_seq=seq,
                    cores=int(cores or 0),
                    memory_bytes=int(memory or 0),
                    gpu_ids=_ints(gpus),
                    target=hostname or None,
                    numa_node=None if parsed is None else parsed.numa_node,
                    # A VM VPS goes only to a node that can run VMs and has its base image.
                    vm_image=vm_image if backend == VpsBackend.QEMU.value else None,
                )
            )
            current[task_id] = message
            targets[task_id] = hostname or None
        if not demands:
            return
        result = scheduler.plan_detailed(caps, allocations, demands)
        planned = time.monotonic()

        failures = dict(result.impossible) if caps else {}  # no nodes at all: wait for the first runner
        messages: dict[int, str] = {}
        for task_id, why in result.waiting.items():
            node = host.nodes.get(targets[task_id] or "")
            if node is not None and node.status == "online" and not node.docker_available:
                why = f"node {node.hostname} cannot run containers: {node.docker_error or 'no Docker'}"
            messages[task_id] = why
        if not caps:
            messages = {t: "no node is registered yet: waiting for a runner to join" for t in current}
        messages = {t: m for t, m in messages.items() if current.get(t) != m}

        placed = await host.store.write(self._commit, result.placements, failures, messages, now)
        for task_id, reason in failures.items():
            log.warning("task %d can no longer run anywhere: %s", task_id, reason)
        for task, hostname, url in placed:
            log.info("task %d placed on %s", task.task_id, hostname)
            if woken is not None:
                step(task.task_id, "host.scheduler_woken", woken)
            step(task.task_id, "host.planned", planned)
            step(task.task_id, "host.assigning_stored")
            dispatches.start_soon(self._dispatch, host, task, hostname, url)

    @staticmethod
    def _commit(
        tx: WriteTx,
        placements: tuple[scheduler.Placement, ...],
        failures: dict[int, str],
        messages: dict[int, str],
        now: float,
    ) -> list[tuple[StoredTask, str, str]]:
        nodes: dict[str, tuple[str, str, bool] | None] = {}
        placed: list[tuple[StoredTask, str, str]] = []
        assigned: set[int] = set()
        for p in placements:
            if p.hostname not in nodes:
                nodes[p.hostname] = tx.node_state(p.hostname)
            node = nodes[p.hostname]
            # Checked again inside the write: the node may have gone offline since the snapshot.
            if node is None or node[0] != "online" or not node[2]:
                continue
            url = node[1]

            def assign(task: StoredTask, p: scheduler.Placement = p) -> StoredTask | None:
                if not still_queued(task):
                    return None  # killed or placed meanwhile
                assigned.add(p.task_id)
                return transition(
                    task,
                    TaskStatus.ASSIGNING,
                    now,
                    assigned_node=p.hostname,
                    required_gpus=sorted(p.gpu_ids),
                    dispatched_at=now,
                    dispatch_confirmed=False,
                    retry_after=None,
                    status_message=f"dispatching to {p.hostname}",
                )

            row = tx.update_task(p.task_id, assign)
            if p.task_id in assigned:
                placed.append((row.task, p.hostname, url))

        for task_id, reason in failures.items():

            def fail(task: StoredTask, reason: str = reason) -> StoredTask | None:
                if not still_queued(task):
                    return None
                why = clip(f"can no longer be placed: {reason}")
                return transition(task, TaskStatus.FAILED, now, error_message=why, status_message=why)

            tx.update_task(task_id, fail)
        for task_id, message in messages.items():

            def note(task: StoredTask, message: str = message) -> StoredTask | None:
                if not still_queued(task):
                    return None
                return attrs.evolve(task, status_message=clip(message))

            tx.update_task(task_id, note)
        return placed

    async def _dispatch(self, host: HostContext, task: StoredTask, hostname: str, url: str) -> None:
        task_id = task.task_id
        async with self._limiter:
            try:
                step(task_id, "host.execute_sent")
                await host.runners.execute(url, execute_request(task))
                step(task_id, "host.execute_answered")
            except RunnerRefused as exc:
                if exc.status == 409:  # the runner already has it (a repeated dispatch): that is success
                    await self._confirm(host, task_id, hostname)
                    return
                log.warning("node %s refused task %d: %s", hostname, task_id, exc.message)
                await self._failed(host, task_id, hostname, exc.message, refused=True)
            except RunnerUnavailable as exc:
                log.warning("cannot dispatch task %d to %s: %s", task_id, hostname, exc.message)
                await self._failed(host, task_id, hostname, exc.message, refused=False)
            except ValidationError as exc:  # a stored task the runner model refuses: never retry it
                log.error("task %d cannot be sent to a runner: %s", task_id, exc)
                await self._failed(host, task_id, hostname, f"invalid task: {exc}", refused=True)
            else:
                await self._confirm(host, task_id, hostname)
                step(task_id, "host.dispatch_confirmed")

    @staticmethod
    async def _confirm(host: HostContext, task_id: int, hostname: str) -> None:
        def confirm(task: StoredTask) -> StoredTask | None:
            if task.assigned_node != hostname or task.dispatch_confirmed is not False:
                return None
            message = task.status_message
            if task.status is TaskStatus.ASSIGNING and (message or "").startswith("dispatching"):
                message = f"accepted by {hostname}"
            return attrs.evolve(task, dispatch_confirmed=True, status_message=message)

        await host.store.write(WriteTx.update_task, task_id, confirm)

    async def _failed(
        self, host: HostContext, task_id: int, hostname: str, reason: str, *, refused: bool
    ) -> None:
        now = host.now()
        await host.store.write(
            WriteTx.update_task,
            task_id,
            lambda task: dispatch_failed(task, hostname, reason, now, refused=refused),
        )
        self.wake()
