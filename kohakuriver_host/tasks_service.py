"""Task operations: submit, kill, pause, resume, and applying runners' status reports.

Every status change goes through ``transition`` inside ``store.update_task``, so the lifecycle check and the
write are one transaction: two writers (a user's kill and a runner's report) can never both win, and a
final status is never replaced by another final one.

A task is stored as its ``TaskRecord`` JSON (what the API returns) plus a few host-internal keys
(``INTERNAL_KEYS``: dispatch bookkeeping) that ``public_record`` strips.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import attrs

from kohakuriver_proto import lifecycle
from kohakuriver_proto.converter import unstructure
from kohakuriver_proto.errors import LocalProtocolError
from kohakuriver_proto.lifecycle import FINAL, TaskStatus, TaskType
from kohakuriver_proto.models import (
    CommandTaskSpec,
    ExecuteRequest,
    SshKeyMode,
    StatusUpdate,
    TaskRecord,
    VpsSpec,
)
from kohakuriver_proto.targets import Target

from . import scheduler
from .api_common import ApiProblem, conflict, invalid, not_found, unavailable
from .auth import Forbidden, Principal, Role, TaskAction, can_act_on_task, can_see_task
from .context import HostContext, iso
from .runner_client import RunnerRefused, RunnerUnavailable
from .store import Doc, NodeRow, TaskNotFound, TaskRow, WriteTx

log = logging.getLogger("kohakuriver.host.tasks")

RECORD_FIELDS: tuple[str, ...] = tuple(f.name for f in attrs.fields(TaskRecord))
# Host-internal document keys (never returned by the API).
K_ATTEMPTS = "dispatch_attempts"  # failed dispatches so far
K_DISPATCHED_AT = "dispatched_at"  # epoch seconds of the latest placement
K_CONFIRMED = "dispatch_confirmed"  # the runner accepted the latest dispatch (202)
K_RETRY_AFTER = "retry_after"  # epoch seconds before which a requeued task is not placed again
K_LAST_REPORT = "last_report_at"  # epoch seconds of the latest runner report about it
# A VPS's public key (not a secret, but not part of the record either): sent with every (re-)creation, so a
# restart injects the same key as the first start.
K_SSH_PUBLIC_KEY = "ssh_public_key"
# A restarted VPS must come back on the node that holds its snapshots: the scheduler places it only there.
K_RESTART_NODE = "restart_node"
INTERNAL_KEYS = (
    K_ATTEMPTS,
    K_DISPATCHED_AT,
    K_CONFIRMED,
    K_RETRY_AFTER,
    K_LAST_REPORT,
    K_SSH_PUBLIC_KEY,
    K_RESTART_NODE,
)

MAX_MESSAGE = 4096
#: Dispatches that fail to reach the runner before the task fails (backoff between them).
MAX_DISPATCH_ATTEMPTS = 3
DISPATCH_BACKOFF_SECONDS = (2.0, 5.0)
#: Statuses in which a task has (or had) a container on its node that the runner must be told about.
ON_NODE = frozenset({TaskStatus.ASSIGNING, TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.PAUSED})


def public_record(doc: Doc) -> dict[str, Any]:
    """The task as the API returns it: the ``TaskRecord`` fields of the stored document."""
    return {k: doc[k] for k in RECORD_FIELDS if k in doc}


def clip(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def transition(
    doc: Doc,
    new: TaskStatus,
    now: float,
    *,
    started_at: str | None = None,
    completed_at: str | None = None,
) -> bool:
    """Move ``doc`` to ``new`` by the lifecycle table; True if the status changed.

    Raises ``LocalProtocolError`` for an illegal transition (the caller decides whether that is a 409 or an
    ignored report). Records ``started_at`` on the first start and ``completed_at`` on a final status.
    """
    old = TaskStatus(doc["status"])
    status = lifecycle.apply(TaskType(doc["task_type"]), old, new)
    if status == old:
        return False
    doc["status"] = status.value
    if status is TaskStatus.RUNNING and not doc.get("started_at"):
        doc["started_at"] = started_at or iso(now)
    if status in FINAL:
        doc["completed_at"] = completed_at or iso(now)
    elif old in FINAL:  # a VPS coming back: it is not completed any more
        doc["completed_at"] = None
    return True


# -- submit ------------------------------------------------------------------------------------------------


def demand_for(
    task_id: int, queue_seq: int, cores: Any, memory: Any, gpus: Any, target: Target | None
) -> scheduler.Demand:
    return scheduler.Demand(
        task_id=task_id,
        queue_seq=queue_seq,
        cores=int(cores or 0),
        memory_bytes=int(memory or 0),
        gpu_ids=frozenset(gpus or ()),
        target=None if target is None else target.hostname,
        numa_node=None if target is None else target.numa_node,
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
    host: HostContext, cores: int, memory: int | None, placements: list[Target | None], field: str
) -> list[str]:
    """Refuse (400) what no registered node could ever run; notes for the answer's message.
    ``field`` names the target in the error (``{i}`` is replaced by the placement's index)."""
    caps = host.nodes.capacities()
    notes: list[str] = []
    for i, target in enumerate(placements):
        demand = demand_for(0, 0, cores, memory, target and target.gpu_ids, target)
        if target is None and not caps:
            notes.append("no node is registered yet: the task waits in the queue until a runner joins")
            continue
        problem = scheduler.feasible(caps, demand)
        if problem is not None:
            raise invalid(f"this task can never run: {problem}", field.format(i) if target else None)
    return notes


async def submit(host: HostContext, who: Principal, spec: CommandTaskSpec) -> Submitted:
    """Validate ``spec`` against the cluster, store one queued task per target, wake the scheduler."""
    check_container_rights(who, spec)
    placements = spec.placements()
    notes = check_feasible(host, spec.required_cores, spec.required_memory_bytes, placements, "targets[{}]")

    now = host.now()
    config = host.config
    mounts = list(dict.fromkeys([*spec.additional_mounts, *config.ADDITIONAL_MOUNTS]))
    docs: list[Doc] = []
    batch_id: int | None = None
    for target in placements:
        task_id = host.new_task_id()
        batch_id = batch_id or task_id
        record = TaskRecord(
            task_id=task_id,
            task_type=TaskType.COMMAND,
            status=TaskStatus.PENDING,
            submitted_at=dt.datetime.fromtimestamp(now, dt.UTC),
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
        )
        doc = unstructure(record)
        doc[K_ATTEMPTS] = 0
        docs.append(doc)
    await host.store.insert_tasks(docs)
    host.wake_scheduler()
    ids = [int(d["task_id"]) for d in docs]
    message = f"{len(ids)} task{'s' if len(ids) != 1 else ''} submitted"
    if notes:
        message += f"; {notes[0]}"
    log.info("%s submitted %s", who.username, ", ".join(map(str, ids)))
    return Submitted(ids, message)


# -- reading and permissions -------------------------------------------------------------------------------


async def visible_task(host: HostContext, who: Principal, task_id: int) -> TaskRow:
    """The task if it exists and ``who`` may see it; otherwise 404 (others' tasks cannot be probed)."""
    row = await host.store.get_task(task_id)
    if row is None or not can_see_task(who, row.owner_id):
        raise not_found(f"no task {task_id}")
    return row


def require_control(who: Principal, row: TaskRow) -> None:
    if not can_act_on_task(who, row.owner_id, TaskAction.CONTROL):
        raise Forbidden(f"{who.username} ({who.role.value}) may not control task {row.task_id}")


# -- kill, pause, resume -----------------------------------------------------------------------------------


async def kill(host: HostContext, who: Principal, task_id: int) -> dict[str, Any]:
    row = await visible_task(host, who, task_id)
    require_control(who, row)
    now = host.now()
    before: dict[str, Any] = {}

    def mutate(doc: Doc) -> Doc:
        old = TaskStatus(doc["status"])
        if old in FINAL:
            raise conflict(f"task {task_id} is already {old.value}")
        before["status"], before["node"] = old, doc.get("assigned_node")
        transition(doc, TaskStatus.KILLED, now)
        doc["status_message"] = f"killed by {who.username}"
        return doc

    try:
        row = await host.store.update_task(task_id, mutate)
    except TaskNotFound:
        raise not_found(f"no task {task_id}") from None
    host.wake_scheduler()  # its resources are free
    message = f"task {task_id} killed"
    node = before.get("node")
    if node is not None and before["status"] in ON_NODE:
        message += await tell_runner_to_kill(host, node, task_id)
    log.info("%s killed task %d (was %s)", who.username, task_id, before["status"].value)
    return {"task_id": str(task_id), "status": row.status, "message": message}


async def tell_runner_to_kill(host: HostContext, hostname: str, task_id: int) -> str:
    node = await host.store.get_node(hostname)
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


def moved_by_user(doc: Doc, becomes: TaskStatus, now: float, message: str) -> Doc | None:
    """The store mutation once the runner did what a user asked: ``doc`` becomes ``becomes`` with
    ``message``; None (no change) when it ended meanwhile, as its final status stands."""
    try:
        transition(doc, becomes, now)
    except LocalProtocolError:
        return None
    doc["status_message"] = message
    return doc


async def pause(host: HostContext, who: Principal, task_id: int) -> dict[str, Any]:
    return await _freeze(host, who, task_id, "pause", TaskStatus.RUNNING, TaskStatus.PAUSED)


async def resume(host: HostContext, who: Principal, task_id: int) -> dict[str, Any]:
    return await _freeze(host, who, task_id, "resume", TaskStatus.PAUSED, TaskStatus.RUNNING)


async def _freeze(
    host: HostContext, who: Principal, task_id: int, action: str, need: TaskStatus, becomes: TaskStatus
) -> dict[str, Any]:
    row = await visible_task(host, who, task_id)
    require_control(who, row)
    if row.status != need.value:
        raise conflict(f"task {task_id} is {row.status}; only a {need.value} task can {action}")
    node = await host.store.get_node(row.assigned_node) if row.assigned_node else None
    if node is None or node.status != "online":
        raise unavailable(f"node {row.assigned_node} is offline")
    # The runner acts first: the status says "paused" only once the container really is frozen.
    refused = f"the runner refused to {action} task {task_id}"
    with runner_errors(node, lambda exc: conflict(f"{refused}: {exc.message}")):
        await host.runners.control(node.url, action, task_id)
    now = host.now()
    message = f"{'paused' if action == 'pause' else 'resumed'} by {who.username}"
    row = await host.store.update_task(task_id, lambda doc: moved_by_user(doc, becomes, now, message))
    log.info("%s %sd task %d", who.username, action, task_id)
    return {"task_id": str(task_id), "status": row.status, "message": f"task {task_id} is {row.status}"}


# -- runner reports ----------------------------------------------------------------------------------------


@attrs.frozen
class ReportOutcome:
    accepted: bool
    #: The task reached a final status with this report (its resources are free: schedule again).
    finished: bool = False


def _report_time(value: Any) -> str | None:
    return None if value is None else unstructure(value)


def apply_report(tx: WriteTx, report: StatusUpdate, now: float, *, node: str | None = None) -> ReportOutcome:
    """Apply a runner's ``StatusUpdate`` inside the caller's transaction (``/api/update`` and heartbeats).

    Illegal transitions are ignored (``accepted`` False, logged at debug): a late report never overrides
    what the host decided (a kill, a lost node). A late *final* report of a task that is already final is
    kept as information (exit code and message) without changing the status. Reports about a task that has
    no node (queued again after a failed dispatch) or, with ``node``, sits on another node are ignored.
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
    result: dict[str, bool] = {"accepted": False, "finished": False}

    def mutate(doc: Doc) -> Doc:
        doc[K_LAST_REPORT] = now
        old = TaskStatus(doc["status"])
        new = report.status
        task_type = TaskType(doc["task_type"])
        if (
            old in (TaskStatus.ASSIGNING, TaskStatus.PENDING)
            and not lifecycle.check_transition(task_type, old, new)
            and lifecycle.check_transition(task_type, TaskStatus.RUNNING, new)
        ):
            # A final report (completed, killed_oom) for a task the host still has as dispatched: the
            # runner's "running" report was lost (or overtaken by a quick exit). It did run: step through
            # running so the table's rules stay the only rules.
            transition(doc, TaskStatus.RUNNING, now, started_at=_report_time(report.started_at))
        try:
            changed = transition(
                doc,
                new,
                now,
                started_at=_report_time(report.started_at),
                completed_at=_report_time(report.completed_at),
            )
        except LocalProtocolError as exc:
            log.debug("task %d: runner report ignored: %s", report.task_id, exc)
            if (
                old in FINAL
                and new in FINAL
                and report.exit_code is not None
                and doc.get("exit_code") is None
            ):
                doc["exit_code"] = report.exit_code
                doc["status_message"] = clip(
                    f"{old.value}; the runner reported later: {new.value}, "
                    + lifecycle.describe_exit(report.exit_code, oom_killed=new is TaskStatus.KILLED_OOM)
                )
            return doc
        result["accepted"] = True
        result["finished"] = changed and new in FINAL
        if report.exit_code is not None:
            doc["exit_code"] = report.exit_code
        if report.ssh_port is not None:
            doc["ssh_port"] = report.ssh_port
        text = report.message
        if new in (TaskStatus.FAILED, TaskStatus.KILLED_OOM, TaskStatus.LOST):
            if text is None and report.exit_code is not None:
                text = lifecycle.describe_exit(report.exit_code, oom_killed=new is TaskStatus.KILLED_OOM)
            if text is not None:
                doc["error_message"] = clip(text)
        elif new is TaskStatus.COMPLETED and text is None:
            text = "exit code 0"
        elif new is TaskStatus.RUNNING and changed and text is None:
            text = "running"
        if text is not None:
            doc["status_message"] = clip(text)
        return doc

    tx.update_task(report.task_id, mutate)
    return ReportOutcome(result["accepted"], result["finished"])


async def report(host: HostContext, update: StatusUpdate) -> bool:
    outcome = await host.store.transaction(lambda tx: apply_report(tx, update, host.now()))
    if outcome.finished:
        host.wake_scheduler()
    return outcome.accepted


# -- dispatch bookkeeping (used by the scheduling loop) ----------------------------------------------------


def execute_request(doc: Doc) -> ExecuteRequest:
    """What the runner is asked to run, from the stored task (resources already allocated). A VPS has no
    command; it carries its key mode and public key, the same on every (re-)creation."""
    task_type = TaskType(doc["task_type"])
    vps = task_type is TaskType.VPS
    key_mode = doc.get("ssh_key_mode") if vps else None
    return ExecuteRequest(
        task_id=int(doc["task_id"]),
        task_type=task_type,
        command=doc.get("command") or "",
        arguments=list(doc.get("arguments") or []),
        env_vars=dict(doc.get("env_vars") or {}),
        required_cores=int(doc.get("required_cores") or 0),
        required_memory_bytes=doc.get("required_memory_bytes"),
        gpu_ids=list(doc.get("required_gpus") or []),
        numa_node=doc.get("target_numa_node_id"),
        container_name=doc.get("container_name"),
        registry_image=doc.get("registry_image"),
        working_dir=doc.get("working_dir"),
        privileged=bool(doc.get("privileged")),
        additional_mounts=list(doc.get("additional_mounts") or []),
        ssh_key_mode=SshKeyMode(key_mode or SshKeyMode.DISABLED) if vps else None,
        ssh_public_key=doc.get(K_SSH_PUBLIC_KEY) if vps else None,
    )


def dispatch_failed(doc: Doc, hostname: str, reason: str, now: float, *, refused: bool) -> Doc | None:
    """A dispatch to ``hostname`` failed: queue the task again (with backoff), or fail it when the runner
    refused it or after ``MAX_DISPATCH_ATTEMPTS``. None if the task moved on meanwhile (killed, running)."""
    if doc["status"] != TaskStatus.ASSIGNING.value or doc.get("assigned_node") != hostname:
        return None
    attempts = int(doc.get(K_ATTEMPTS) or 0) + 1
    doc[K_ATTEMPTS] = attempts
    if refused or attempts >= MAX_DISPATCH_ATTEMPTS:
        transition(doc, TaskStatus.FAILED, now)
        why = (
            f"node {hostname} refused the task: {reason}"
            if refused
            else (f"could not reach node {hostname} ({attempts} attempts): {reason}")
        )
        doc["error_message"] = doc["status_message"] = clip(why)
        return doc
    transition(doc, TaskStatus.PENDING, now)
    doc["assigned_node"] = None
    backoff = DISPATCH_BACKOFF_SECONDS[min(attempts, len(DISPATCH_BACKOFF_SECONDS)) - 1]
    doc[K_RETRY_AFTER] = now + backoff
    doc["status_message"] = clip(f"could not reach node {hostname} ({reason}); queued again")
    return doc


def waits_for_retry(retry_after: Any, now: float) -> bool:
    return isinstance(retry_after, int | float) and math.isfinite(retry_after) and retry_after > now
