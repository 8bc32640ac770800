"""Liveness: nodes that stop heartbeating go offline and their tasks become ``lost``; dispatches that never
got an answer are recovered.

- A node is offline after ``HEARTBEAT_INTERVAL_SECONDS * HEARTBEAT_TIMEOUT_FACTOR`` without a heartbeat. The
  check and the marking are one write transaction, so a heartbeat arriving at the same moment cannot be
  overtaken by a stale decision. Its ``assigning``, ``pending``, ``running`` and ``paused`` tasks become
  ``lost`` (command tasks stay lost; a VPS comes back to ``running`` when the node returns with it alive).
- For one timeout after the host starts nobody is declared offline: runners could not heartbeat while the
  host was down, and need one interval to find it again.
- A task the runner accepted but never reported on (no heartbeat listing, no status update) for
  ``SILENCE_TIMEOUT_SECONDS`` fails: the runner lost it (for example it restarted while pulling the image).
- At start-up, tasks whose dispatch was in flight when the host stopped go back to the queue
  (``requeue_unconfirmed``): nobody will ever learn whether the runner got them, and the heartbeat
  reconciliation kills a copy that did start on a node the task is not assigned to.
"""

from __future__ import annotations

import logging

import trio

from kohakuriver_proto.errors import LocalProtocolError
from kohakuriver_proto.lifecycle import TaskStatus

from .context import HostContext
from .host_settings import HostSettings
from .store import WriteTx
from .stored_task import K_CONFIRMED, K_DISPATCHED_AT, K_LAST_REPORT, StoredTask
from .tasks_service import ON_NODE, clip, transition

log = logging.getLogger("kohakuriver.host.liveness")

#: Time a runner may stay silent about a task it accepted (image pulls report progress meanwhile).
SILENCE_TIMEOUT_SECONDS = 900.0
_ON_NODE = tuple(s.value for s in ON_NODE)


def check_interval(config: HostSettings) -> float:
    """How often to look: at most ``CLEANUP_CHECK_INTERVAL_SECONDS``, and often enough that a node is declared
    offline at most half a timeout late."""
    return max(0.1, min(float(config.CLEANUP_CHECK_INTERVAL_SECONDS), config.heartbeat_timeout_seconds / 2))


def _lost(task: StoredTask, hostname: str, timeout: float, now: float) -> StoredTask | None:
    why = f"node {hostname} went offline (no heartbeat for {timeout:.0f} s)"
    try:
        lost = transition(task, TaskStatus.LOST, now, error_message=why, status_message=why)
    except LocalProtocolError:
        return None
    return None if lost is task else lost


def _mark_stale_offline(tx: WriteTx, cutoff: float, timeout: float, now: float) -> list[tuple[str, int]]:
    offline = []
    for node in tx.stale_nodes(cutoff):
        hostname = node.hostname
        was_online, changed = tx.mark_node_offline(
            hostname, task_statuses=_ON_NODE, mutate=lambda task, h=hostname: _lost(task, h, timeout, now)
        )
        if was_online:
            offline.append((hostname, len(changed)))
    return offline


def _fail_silent(tx: WriteTx, now: float) -> list[int]:
    failed = []
    rows = tx.task_summaries(
        [TaskStatus.ASSIGNING, TaskStatus.PENDING],
        [K_DISPATCHED_AT, K_LAST_REPORT, K_CONFIRMED],
        assigned=True,
    )
    for task_id, _type, _status, node, _seq, dispatched_at, last_report, confirmed in rows:
        if not confirmed:
            continue  # its dispatch is still in flight
        last = max(float(dispatched_at or 0), float(last_report or 0))
        if now - last < SILENCE_TIMEOUT_SECONDS:
            continue

        def fail(task: StoredTask, node: str = node) -> StoredTask | None:
            why = clip(
                f"node {node} accepted the task but never reported on it for {SILENCE_TIMEOUT_SECONDS:.0f} s"
            )
            try:
                return transition(task, TaskStatus.FAILED, now, error_message=why, status_message=why)
            except LocalProtocolError:
                return None

        tx.update_task(task_id, fail)
        failed.append(task_id)
    return failed


async def check_once(host: HostContext) -> tuple[list[tuple[str, int]], list[int]]:
    """One look: (nodes marked offline with their number of lost tasks, silent tasks failed)."""
    now = host.now()
    timeout = host.config.heartbeat_timeout_seconds
    grace = now - host.started_at < timeout

    def write(tx: WriteTx) -> tuple[list[tuple[str, int]], list[int]]:
        offline = [] if grace else _mark_stale_offline(tx, now - timeout, timeout, now)
        return offline, _fail_silent(tx, now)

    offline, failed = await host.store.write(write)
    for hostname, _lost in offline:
        host.nodes.offline(hostname)
    for hostname, lost in offline:
        log.warning("node %s is offline (no heartbeat for %.0f s); %d task(s) lost", hostname, timeout, lost)
    for task_id in failed:
        log.warning("task %d failed: its runner never reported on it", task_id)
    if offline or failed:
        host.wake_scheduler()
    return offline, failed


async def run_liveness(
    host: HostContext, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    interval = check_interval(host.config)
    task_status.started()
    while True:
        await trio.sleep(interval)
        try:
            await check_once(host)
        except Exception:  # a failed check is retried at the next interval; the daemon keeps serving
            log.exception("liveness check failed")


async def requeue_unconfirmed(host: HostContext) -> list[int]:
    """Start-up: dispatches that were in flight when the host stopped go back to the queue."""
    now = host.now()

    def write(tx: WriteTx) -> list[int]:
        requeued = []
        for task_id, *_rest, confirmed in tx.task_summaries(
            [TaskStatus.ASSIGNING], [K_CONFIRMED], assigned=True
        ):
            if confirmed:
                continue

            def requeue(task: StoredTask) -> StoredTask:
                why = f"queued again: the host restarted while dispatching it to {task.assigned_node}"
                return transition(task, TaskStatus.PENDING, now, assigned_node=None, status_message=why)

            tx.update_task(task_id, requeue)
            requeued.append(task_id)
        return requeued

    requeued = await host.store.write(write)
    if requeued:
        log.info("queued again after a restart (dispatch was in flight): %s", requeued)
    return requeued
