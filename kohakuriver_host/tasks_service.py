"""Task operations: submit, kill, pause, resume, and applying runners' status reports.

Every status change goes through ``transition`` inside ``store.update_task``, so the lifecycle check and the
write are one transaction: two writers (a user's kill and a runner's report) can never both win, and a
final status is never replaced by another final one.

A task is a ``StoredTask`` (``stored_task.py``): its ``TaskRecord`` (what the API returns) plus the host's
dispatch bookkeeping. Mutations here take a record and return a new one (``attrs.evolve``), validated by the
model on every change.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import trio

from kohakuriver_net.task_steps import step
from kohakuriver_proto import lifecycle
from kohakuriver_proto.errors import LocalProtocolError
from kohakuriver_proto.lifecycle import FINAL, TaskStatus, TaskType
from kohakuriver_proto.models import (
    CommandTaskSpec,
    ExecuteRequest,
    SshKeyMode,
    StatusUpdate,
    VpsBackend,
    VpsSpec,
)
from kohakuriver_proto.overlay import ReservationClaim
from kohakuriver_proto.targets import Target

from . import scheduler
from .api_common import ApiProblem, conflict, invalid, not_found, unavailable
from .auth import Forbidden, Principal, Role, TaskAction, can_act_on_task, can_see_task
from .context import HostContext
from .overlay_service import OverlayService
from .runner_client import RunnerRefused, RunnerUnavailable
from .store import NodeRow, ReadTx, TaskNotFound, TaskRow, WriteTx
from .stored_task import StoredTask

log = logging.getLogger("kohakuriver.host.tasks")

MAX_MESSAGE = 4096
#: Dispatches that fail to reach the runner before the task fails (backoff between them).
MAX_DISPATCH_ATTEMPTS = 3
DISPATCH_BACKOFF_SECONDS = (2.0, 5.0)
#: Statuses in which a task has (or had) a container on its node that the runner must be told about.
ON_NODE = frozenset({TaskStatus.ASSIGNING, TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.PAUSED})
_LIVE = frozenset({TaskStatus.RUNNING, TaskStatus.PAUSED})


def clip(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.UTC)


def transition(
    task: StoredTask,
    new: TaskStatus,
    now: float,
    *,
    started_at: dt.datetime | None = None,
    completed_at: dt.datetime | None = None,
    **with_move: Any,
) -> StoredTask:
    """``task`` moved to ``new`` by the lifecycle table, with the fields in ``with_move`` set too (one
    ``attrs.evolve``: every change of a record validates it whole); ``task`` itself, unchanged, when it
    already is there.

    Raises ``LocalProtocolError`` for an illegal transition (the caller decides whether that is a 409 or an
    ignored report). Records ``started_at`` on the first start and ``completed_at`` on a final status.
    """
    old = task.status
    status = lifecycle.apply(task.task_type, old, new)
    if status == old:
        return task
    changes: dict[str, Any] = {**with_move, "status": status}
    if status is TaskStatus.RUNNING and task.started_at is None:
        changes["started_at"] = started_at or utc(now)
    if status in FINAL:
        changes["completed_at"] = completed_at or utc(now)
    elif old in FINAL:  # a VPS coming back: it is not completed any more
        changes["completed_at"] = None
    return attrs.evolve(task, **changes)


# -- submit ------------------------------------------------------------------------------------------------


def demand_for(
    task_id: int,
    queue_seq: int,
    cores: Any,
    memory: Any,
    gpus: Any,
    target: Target | None,
    vm_image: str | None = None,
) -> scheduler.Demand:
    return scheduler.Demand(
        task_id=task_id,
        queue_seq=queue_seq,
        cores=int(cores or 0),
        memory_bytes=int(memory or 0),
        gpu_ids=frozenset(gpus or ()),
        target=None if target is None else target.hostname,
        numa_node=None if target is None else target.numa_node,
        vm_image=vm_image,
    )


@attrs.frozen
class Submitted:
    task_ids: list[int]
    message: str


def check_container_rights(who: Principal, spec: CommandTaskSpec | VpsSpec) -> None:
    """Role checks every container request shares (command tasks and VPS)."""
    if not who.at_least(Role.USER):
        raise Forbidden(f"this needs role user or higher; {who.username} is {who.role.value}")
    # A privileged container or a bind mount of the runner's filesystem is root on that machine: only
    # operators may ask for them (the runner trusts what the host sends).
    if spec.privileged and not who.at_least(Role.OPERATOR):
        raise ApiProblem(403, "forbidden", "privileged containers need role operator or higher", "privileged")
    if spec.additional_mounts and not who.at_least(Role.OPERATOR):
        raise ApiProblem(
            403,
            "forbidden",
            "bind mounts of the node's filesystem need role operator or higher",
            "additional_mounts",
        )


def check_feasible(
    host: HostContext,
    cores: int,
    memory: int | None,
    placements: list[Target | None],
    field: str,
    vm_image: str | None = None,
) -> list[str]:
    """Refuse (400) what no registered node could ever run; notes for the answer's message.
    ``field`` names the target in the error (``{i}`` is replaced by the placement's index); ``vm_image``:
    a VM VPS on that base image."""
    caps = host.nodes.capacities()
    notes: list[str] = []
    for i, target in enumerate(placements):
        demand = demand_for(0, 0, cores, memory, target and target.gpu_ids, target, vm_image)
        if target is None and not caps:
            notes.append("no node is registered yet: the task waits in the queue until a runner joins")
            continue
        problem = scheduler.feasible(caps, demand)
        if problem is not None:
            raise invalid(f"this task can never run: {problem}", field.format(i) if target else None)
    return notes


async def submit(host: HostContext, who: Principal, spec: CommandTaskSpec) -> Submitted:
    """Validate ``spec`` against the cluster, store one queued task per target, wake the scheduler."""
    received = time.monotonic()
    check_container_rights(who, spec)
    placements = spec.placements()
    claim = None
    if spec.ip_token is not None:
        claim, placement = reservation_claim(host, spec.ip_token, placements[0])  # the model allows one
        placements = [placement]
    notes = check_feasible(host, spec.required_cores, spec.required_memory_bytes, placements, "targets[{}]")

    now = host.now()
    config = host.config
    mounts = list(dict.fromkeys([*spec.additional_mounts, *config.ADDITIONAL_MOUNTS]))
    tasks: list[StoredTask] = []
    batch_id: int | None = None
    for target in placements:
        task_id = host.new_task_id()
        batch_id = batch_id or task_id
        task = StoredTask(
            task_id=task_id,
            task_type=TaskType.COMMAND,
            status=TaskStatus.PENDING,
            submitted_at=utc(now),
            batch_id=batch_id if len(placements) > 1 else None,
            name=spec.name,
            owner=who.username,
            owner_id=who.user_id,
            command=spec.command,
            arguments=list(spec.arguments),
            env_vars=dict(spec.env_vars),
            container_name=spec.container_name,
            registry_image=spec.registry_image,
            working_dir=spec.working_dir,
            privileged=spec.privileged or config.TASKS_PRIVILEGED,
            additional_mounts=mounts,
            required_cores=spec.required_cores,
            required_memory_bytes=spec.required_memory_bytes,
            required_gpus=list(target.gpu_ids) if target is not None else [],
            target=None if target is None else str(target),
            target_numa_node_id=None if target is None else target.numa_node,
            status_message="queued",
            reserved_ip=None if claim is None else claim.ip,
        )
        tasks.append(task)
    await host.store.write(insert_tasks_using, tasks, claim, now)
    host.wake_scheduler()
    ids = [t.task_id for t in tasks]
    for task_id in ids:
        step(task_id, "host.submit_received", received)
        step(task_id, "host.stored")
    message = f"{len(ids)} task{'s' if len(ids) != 1 else ''} submitted"
    if notes:
        message += f"; {notes[0]}"
    log.info("%s submitted %s", who.username, ", ".join(map(str, ids)))
    return Submitted(ids, message)


def reservation_claim(
    host: HostContext, token: str, placement: Target | None
) -> tuple[ReservationClaim, Target]:
    """The claim of an ``ip_token`` and the task's placement: its target, or the token's node when it named
    none. 4xx naming ``ip_token`` when the overlay is off, the token bad or for another node."""
    if host.overlay is None:
        raise ApiProblem(
            409, "conflict", "the overlay network is off on this host (OVERLAY_ENABLED)", "ip_token"
        )
    claim, node = host.overlay.claim_for(token, placement)
    return claim, placement if placement is not None else Target(hostname=node)


def insert_tasks_using(
    tx: WriteTx, tasks: list[StoredTask], claim: ReservationClaim | None, now: float
) -> list[TaskRow]:
    """Store new tasks; with ``claim``, the first (and only) one uses that reservation, in the same
    transaction (nothing is stored when the reservation cannot be used)."""
    rows = tx.insert_tasks(tasks)
    if claim is not None:
        OverlayService.use_tx(tx, claim, tasks[0].task_id, now)
    return rows


# -- reading and permissions -------------------------------------------------------------------------------


async def visible_task(host: HostContext, who: Principal, task_id: int) -> TaskRow:
    """The task if it exists and ``who`` may see it; otherwise 404 (others' tasks cannot be probed)."""
    row = await host.store.read(ReadTx.get_task, task_id)
    if row is None or not can_see_task(who, row.owner_id):
        raise not_found(f"no task {task_id}")
    return row


async def status_change(
    host: HostContext, who: Principal, task_id: int, since: TaskStatus, timeout: float
) -> TaskRow:
    """The task as ``visible_task`` gives it, once its status is no longer ``since`` or after ``timeout``
    seconds, whichever comes first (a long-poll: woken by the store's ``status_watch``, no polling)."""
    watch = host.store.status_watch
    deadline = trio.current_time() + timeout
    while True:
        # Subscribe before reading: a change committed between the read and the wait still wakes us.
        slot = watch.subscribe(task_id)
        try:
            row = await visible_task(host, who, task_id)
        except BaseException:
            watch.release(task_id, slot)
            raise
        left = deadline - trio.current_time()
        if row.status is not since or left <= 0:
            watch.release(task_id, slot)
            return row
        await watch.wait(task_id, slot, left)


def require_control(who: Principal, row: TaskRow) -> None:
    if not can_act_on_task(who, row.owner_id, TaskAction.CONTROL):
        raise Forbidden(f"{who.username} ({who.role.value}) may not control task {row.task_id}")


# -- kill, pause, resume -----------------------------------------------------------------------------------


async def kill(host: HostContext, who: Principal, task_id: int) -> dict[str, Any]:
    row = await visible_task(host, who, task_id)
    require_control(who, row)
    now = host.now()
    before: list[StoredTask] = []

    def mutate(task: StoredTask) -> StoredTask:
        if task.status in FINAL:
            raise conflict(f"task {task_id} is already {task.status.value}")
        before.append(task)
        return transition(task, TaskStatus.KILLED, now, status_message=f"killed by {who.username}")

    try:
        row = await host.store.write(WriteTx.update_task, task_id, mutate)
    except TaskNotFound:
        raise not_found(f"no task {task_id}") from None
    host.wake_scheduler()  # its resources are free
    message = f"task {task_id} killed"
    was = before[-1]
    if was.assigned_node is not None and was.status in ON_NODE:
        message += await tell_runner_to_kill(host, was.assigned_node, task_id)
    log.info("%s killed task %d (was %s)", who.username, task_id, was.status.value)
    return {"task_id": str(task_id), "status": row.status.value, "message": message}


async def tell_runner_to_kill(host: HostContext, hostname: str, task_id: int) -> str:
    node = await host.store.read(ReadTx.get_node, hostname)
    if node is None or node.status != "online":
        return f"; node {hostname} is offline: it will be told when it returns"
    try:
        await host.runners.control(node.url, "kill", task_id)
    except RunnerRefused as exc:
        if exc.status == 404:  # the runner never got it or already forgot it: nothing runs
            return ""
        log.warning("runner %s refused to kill task %d: %s", hostname, task_id, exc.message)
        return f"; the runner said: {exc.message}"
    except RunnerUnavailable as exc:
        # The heartbeat reconciliation kills it later: the host answers every heartbeat that still lists a
        # final task with a kill order.
        log.warning("cannot reach %s to kill task %d: %s", hostname, task_id, exc.message)
        return f"; node {hostname} is not answering: it will be told at its next heartbeat"
    return ""


@contextmanager
def runner_errors(node: NodeRow, refused: Callable[[RunnerRefused], ApiProblem]) -> Iterator[None]:
    """Around a call to ``node``'s runner: its refusal becomes ``refused(exc)``, no answer a 503."""
    try:
        yield
    except RunnerRefused as exc:
        raise refused(exc) from None
    except RunnerUnavailable as exc:
        raise node_unreachable(node, exc) from None


def node_unreachable(node: NodeRow, exc: RunnerUnavailable) -> ApiProblem:
    return unavailable(f"cannot reach node {node.hostname}: {exc.message}")


def moved_by_user(task: StoredTask, becomes: TaskStatus, now: float, message: str) -> StoredTask | None:
    """The store mutation once the runner did what a user asked: ``task`` becomes ``becomes`` with
    ``message``; None (no change) when it ended meanwhile, as its final status stands."""
    try:
        moved = transition(task, becomes, now)
    except LocalProtocolError:
        return None
    return attrs.evolve(moved, status_message=message)


async def pause(host: HostContext, who: Principal, task_id: int) -> dict[str, Any]:
    return await _freeze(host, who, task_id, "pause", TaskStatus.RUNNING, TaskStatus.PAUSED)


async def resume(host: HostContext, who: Principal, task_id: int) -> dict[str, Any]:
    return await _freeze(host, who, task_id, "resume", TaskStatus.PAUSED, TaskStatus.RUNNING)


async def _freeze(
    host: HostContext, who: Principal, task_id: int, action: str, need: TaskStatus, becomes: TaskStatus
) -> dict[str, Any]:
    row = await visible_task(host, who, task_id)
    require_control(who, row)
    if row.status is not need:
        raise conflict(f"task {task_id} is {row.status.value}; only a {need.value} task can {action}")
    node = await host.store.read(ReadTx.get_node, row.assigned_node) if row.assigned_node else None
    if node is None or node.status != "online":
        raise unavailable(f"node {row.assigned_node} is offline")
    # The runner acts first: the status says "paused" only once the container really is frozen.
    refused = f"the runner refused to {action} task {task_id}"
    with runner_errors(node, lambda exc: conflict(f"{refused}: {exc.message}")):
        await host.runners.control(node.url, action, task_id)
    now = host.now()
    message = f"{'paused' if action == 'pause' else 'resumed'} by {who.username}"
    row = await host.store.write(
        WriteTx.update_task, task_id, lambda task: moved_by_user(task, becomes, now, message)
    )
    log.info("%s %sd task %d", who.username, action, task_id)
    status = row.status.value
    return {"task_id": str(task_id), "status": status, "message": f"task {task_id} is {status}"}


# -- runner reports ----------------------------------------------------------------------------------------


@attrs.frozen
class ReportOutcome:
    accepted: bool
    #: The task reached a final status with this report (its resources are free: schedule again).
    finished: bool = False


def apply_report(tx: WriteTx, report: StatusUpdate, now: float, *, node: str | None = None) -> ReportOutcome:
    """Apply a runner's ``StatusUpdate`` inside the caller's transaction (``/api/update`` and heartbeats).

    Illegal transitions are ignored (``accepted`` False, logged at debug): a late report never overrides
    what the host decided (a kill, a lost node). A late *final* report of a task that is already final is
    kept as information (exit code and message) without changing the status. Reports about a task that has
    no node (queued again after a failed dispatch) or, with ``node``, sits on another node are ignored.

    A VM VPS's report may carry its address (``vm_ip``) and its guest agent's last word (``vm_health``);
    both are recorded with an accepted report. The runner also sends them on their own, as a non-final
    report of the status it saw (when the agent's state changes and every ~30 s): such a report is accepted
    for a running or paused VPS and never moves it between running and paused, because one computed before
    a pause (or resume) the host has recorded since must not undo it; those moves come from the user's
    pause/resume, which the runner carries out first.
    """
    row = tx.get_task(report.task_id)
    if row is None:
        log.debug("report about unknown task %d ignored", report.task_id)
        return ReportOutcome(False)
    if row.assigned_node is None or (node is not None and row.assigned_node != node):
        log.debug(
            "report about task %d from %s ignored: it is on %s", report.task_id, node, row.assigned_node
        )
        return ReportOutcome(False)
    result: list[ReportOutcome] = [ReportOutcome(False)]

    def mutate(task: StoredTask) -> StoredTask:
        old = task.status
        new = report.status
        if report.vm_health is not None and old in _LIVE and new in _LIVE:
            new = old  # a health report: see the docstring
        if (
            old in (TaskStatus.ASSIGNING, TaskStatus.PENDING)
            and not lifecycle.check_transition(task.task_type, old, new)
            and lifecycle.check_transition(task.task_type, TaskStatus.RUNNING, new)
        ):
            # A final report (completed, killed_oom) for a task the host still has as dispatched: the
            # runner's "running" report was lost (or overtaken by a quick exit). It did run: step through
            # running so the table's rules stay the only rules.
            task = transition(task, TaskStatus.RUNNING, now, started_at=report.started_at)
        changes: dict[str, Any] = {"last_report_at": now}
        try:
            moved = transition(task, new, now, started_at=report.started_at, completed_at=report.completed_at)
        except LocalProtocolError as exc:
            log.debug("task %d: runner report ignored: %s", report.task_id, exc)
            if old in FINAL and new in FINAL and report.exit_code is not None and task.exit_code is None:
                changes["exit_code"] = report.exit_code
                changes["status_message"] = clip(
                    f"{old.value}; the runner reported later: {new.value}, "
                    + lifecycle.describe_exit(report.exit_code, oom_killed=new is TaskStatus.KILLED_OOM)
                )
            return attrs.evolve(task, **changes)
        changed = moved is not task
        result[0] = ReportOutcome(True, changed and new in FINAL)
        if report.exit_code is not None:
            changes["exit_code"] = report.exit_code
        if report.ssh_port is not None:
            changes["ssh_port"] = report.ssh_port
        if report.vm_ip is not None:
            changes["vm_ip"] = report.vm_ip
        if report.vm_health is not None:
            changes["vm_health"] = report.vm_health
        if report.overlay_ip is not None:
            changes["overlay_ip"] = report.overlay_ip
        text = report.message
        if new in (TaskStatus.FAILED, TaskStatus.KILLED_OOM, TaskStatus.LOST):
            if text is None and report.exit_code is not None:
                text = lifecycle.describe_exit(report.exit_code, oom_killed=new is TaskStatus.KILLED_OOM)
            if text is not None:
                changes["error_message"] = clip(text)
        elif new is TaskStatus.COMPLETED and text is None:
            text = "exit code 0"
        elif new is TaskStatus.RUNNING and changed and text is None:
            text = "running"
        if text is not None:
            changes["status_message"] = clip(text)
        return attrs.evolve(moved, **changes)

    tx.update_task(report.task_id, mutate)
    return result[0]


async def report(host: HostContext, update: StatusUpdate) -> bool:
    outcome = await host.store.write(apply_report, update, host.now())
    step(update.task_id, f"host.{update.status.value}_stored")
    if outcome.finished:
        host.wake_scheduler()
    return outcome.accepted


# -- dispatch bookkeeping (used by the scheduling loop) ----------------------------------------------------


def execute_request(task: StoredTask) -> ExecuteRequest:
    """What the runner is asked to run, from the stored task (resources already allocated). A VPS has no
    command; it carries its key mode and public key, the same on every (re-)creation. A VM VPS carries its
    base image, disk size and memory (``memory_mb``, the reservation the host resolved at creation; its
    ``required_memory_bytes`` is that reservation for the scheduler and is not sent). A task with a reserved
    overlay address carries it as ``overlay_ip`` (None: the runner gives it any free one)."""
    vps = task.task_type is TaskType.VPS
    vm = vps and task.vps_backend is VpsBackend.QEMU
    return ExecuteRequest(
        task_id=task.task_id,
        task_type=task.task_type,
        command=task.command or "",
        arguments=list(task.arguments),
        env_vars=dict(task.env_vars),
        required_cores=task.required_cores,
        required_memory_bytes=None if vm else task.required_memory_bytes,
        gpu_ids=list(task.required_gpus),
        numa_node=task.target_numa_node_id,
        container_name=task.container_name,
        registry_image=task.registry_image,
        working_dir=task.working_dir,
        privileged=task.privileged,
        additional_mounts=list(task.additional_mounts),
        ssh_key_mode=(task.ssh_key_mode or SshKeyMode.DISABLED) if vps else None,
        ssh_public_key=task.ssh_public_key if vps else None,
        vps_backend=VpsBackend.QEMU if vm else VpsBackend.DOCKER,
        vm_image=task.vm_image if vm else None,
        vm_disk_size=task.vm_disk_size if vm else None,
        memory_mb=task.memory_mb if vm else None,
        overlay_ip=task.reserved_ip,
    )


def dispatch_failed(
    task: StoredTask, hostname: str, reason: str, now: float, *, refused: bool
) -> StoredTask | None:
    """A dispatch to ``hostname`` failed: queue the task again (with backoff), or fail it when the runner
    refused it or after ``MAX_DISPATCH_ATTEMPTS``. None if the task moved on meanwhile (killed, running)."""
    if task.status is not TaskStatus.ASSIGNING or task.assigned_node != hostname:
        return None
    attempts = task.dispatch_attempts + 1
    if refused or attempts >= MAX_DISPATCH_ATTEMPTS:
        why = clip(
            f"node {hostname} refused the task: {reason}"
            if refused
            else (f"could not reach node {hostname} ({attempts} attempts): {reason}")
        )
        return transition(
            task, TaskStatus.FAILED, now, dispatch_attempts=attempts, error_message=why, status_message=why
        )
    backoff = DISPATCH_BACKOFF_SECONDS[min(attempts, len(DISPATCH_BACKOFF_SECONDS)) - 1]
    return transition(
        task,
        TaskStatus.PENDING,
        now,
        dispatch_attempts=attempts,
        assigned_node=None,
        retry_after=now + backoff,
        status_message=clip(f"could not reach node {hostname} ({reason}); queued again"),
    )


def waits_for_retry(retry_after: Any, now: float) -> bool:
    return isinstance(retry_after, int | float) and math.isfinite(retry_after) and retry_after > now
