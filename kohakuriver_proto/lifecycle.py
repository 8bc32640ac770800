"""The task lifecycle: statuses, the one transition table, and how a container exit maps to a final status.

Every status change anywhere (host API, scheduler, runner reports, liveness) goes through ``apply`` so that
the rules live in one place. The table is explicit: a pair ``(old, new)`` is legal only if it is listed, for
the task types listed with it.

Rules the table encodes (and ``tests/unit/test_lifecycle.py`` checks exhaustively):

- A final status is never replaced by another final status. Whatever a late runner report says, ``killed``
  stays ``killed`` and ``lost`` stays ``lost``.
- A command task never leaves a final status. In particular a command task marked ``lost`` (its node missed
  6 heartbeats) stays ``lost`` even if the node comes back and the runner reports the real exit code. Why: a
  final status is a promise to users and their scripts (``kr task wait`` returned, a pipeline resubmitted
  the job); flipping it later produces duplicate runs and histories that contradict what people saw, and
  the task's resources were already released and may be in use by other tasks. The host keeps such a late
  report as information (``exit_code`` and ``status_message`` of the lost task) without changing the
  status, and tells the runner to kill a lost command task it finds still running. A runner that restarts
  *before* the node is declared offline reports finished tasks while they are still ``running``; that path
  is the normal ``running -> completed/failed/killed_oom`` and loses nothing.
- A VPS is a machine with an identity (SSH port, disk, the user's state), not a job anyone resubmits, so it
  may leave a final status: ``lost -> running``/``paused`` when its node returns with it alive, and
  ``-> assigning`` from ``stopped``/``failed``/``killed``/``killed_oom``/``lost`` when a user restarts it
  (re-created on its node, restoring its newest snapshot). ``rejected`` is final for both types.
- Reporting the current status again (``running`` while ``running``) is not a transition; ``apply`` accepts
  it as a no-op so that retried reports are idempotent.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from .errors import LocalProtocolError


class TaskType(enum.StrEnum):
    COMMAND = "command"
    VPS = "vps"


class TaskStatus(enum.StrEnum):
    PENDING_APPROVAL = "pending_approval"
    REJECTED = "rejected"
    PENDING = "pending"
    ASSIGNING = "assigning"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    KILLED = "killed"
    KILLED_OOM = "killed_oom"
    LOST = "lost"
    STOPPED = "stopped"


S = TaskStatus

#: Statuses after which nothing runs. ``rejected`` is final too (the original forgot it).
FINAL: frozenset[TaskStatus] = frozenset(
    {S.REJECTED, S.COMPLETED, S.FAILED, S.KILLED, S.KILLED_OOM, S.LOST, S.STOPPED}
)
#: Statuses whose resources (cores, memory, GPUs) count against their node. ``pending`` counts only when the
#: task has an ``assigned_node`` (the runner is preparing it, e.g. pulling the image); a queued ``pending``
#: task without a node holds nothing.
ACTIVE: frozenset[TaskStatus] = frozenset({S.ASSIGNING, S.PENDING, S.RUNNING, S.PAUSED})
#: Statuses in which a VPS accepts SSH-proxy and port-forward connections.
REACHABLE: frozenset[TaskStatus] = frozenset({S.RUNNING, S.PAUSED})

_C = frozenset({TaskType.COMMAND})
_V = frozenset({TaskType.VPS})
_ALL = frozenset(TaskType)

#: THE transition table: (old, new) -> (task types it applies to, what causes it). Nothing else is legal.
TRANSITIONS: Mapping[tuple[TaskStatus, TaskStatus], tuple[frozenset[TaskType], str]] = {
    # -- waiting for an operator
    (S.PENDING_APPROVAL, S.PENDING): (_ALL, "an operator approved it; it joins the queue"),
    (S.PENDING_APPROVAL, S.REJECTED): (_ALL, "an operator rejected it"),
    (S.PENDING_APPROVAL, S.KILLED): (_ALL, "its owner cancelled it before approval"),
    # -- queued, or being prepared on its node (image sync/pull)
    (S.PENDING, S.ASSIGNING): (_ALL, "the scheduler placed it and dispatches it to the node"),
    (S.PENDING, S.RUNNING): (_ALL, "the runner finished preparing it and started it"),
    (S.PENDING, S.FAILED): (_ALL, "it can never be placed (target gone) or preparing it failed"),
    (S.PENDING, S.KILLED): (_ALL, "cancelled while queued or being prepared"),
    (S.PENDING, S.LOST): (_ALL, "its node went offline while preparing it"),
    (S.PENDING, S.STOPPED): (_V, "the VPS was stopped before it started"),
    # -- dispatched, the runner has not confirmed yet
    (S.ASSIGNING, S.PENDING): (_ALL, "the runner prepares it, or dispatch failed and it is queued again"),
    (S.ASSIGNING, S.RUNNING): (_ALL, "the runner started it"),
    (S.ASSIGNING, S.FAILED): (_ALL, "the runner refused it or could not create the container/VM"),
    (S.ASSIGNING, S.KILLED): (_ALL, "cancelled during dispatch"),
    (S.ASSIGNING, S.LOST): (_ALL, "its node went offline during dispatch"),
    (S.ASSIGNING, S.STOPPED): (_V, "the VPS was stopped during dispatch"),
    # -- running
    (S.RUNNING, S.PAUSED): (_ALL, "paused (cgroup freezer / VM pause)"),
    (S.RUNNING, S.COMPLETED): (_C, "the command exited with code 0"),
    (S.RUNNING, S.FAILED): (_ALL, "it exited non-zero, or the runner lost its container"),
    (S.RUNNING, S.KILLED): (_ALL, "killed by a user"),
    (S.RUNNING, S.KILLED_OOM): (_ALL, "the kernel OOM killer ended it"),
    (S.RUNNING, S.LOST): (_ALL, "its node missed 6 heartbeats"),
    (S.RUNNING, S.STOPPED): (_V, "the VPS was stopped, or it shut itself down"),
    (S.RUNNING, S.ASSIGNING): (_V, "the VPS is being restarted"),
    # -- paused
    (S.PAUSED, S.RUNNING): (_ALL, "resumed"),
    (S.PAUSED, S.FAILED): (_ALL, "the runner found its container gone"),
    (S.PAUSED, S.KILLED): (_ALL, "killed by a user"),
    (S.PAUSED, S.LOST): (_ALL, "its node missed 6 heartbeats (paused tasks are not exempt)"),
    (S.PAUSED, S.STOPPED): (_V, "the VPS was stopped"),
    (S.PAUSED, S.ASSIGNING): (_V, "the VPS is being restarted"),
    # -- a VPS leaving a final status (a command task never does)
    (S.LOST, S.RUNNING): (_V, "its node came back with the VPS alive"),
    (S.LOST, S.PAUSED): (_V, "its node came back with the VPS alive and paused"),
    (S.LOST, S.ASSIGNING): (_V, "restarted by a user"),
    (S.STOPPED, S.ASSIGNING): (_V, "restarted by a user (restores the newest snapshot)"),
    (S.FAILED, S.ASSIGNING): (_V, "restarted by a user"),
    (S.KILLED, S.ASSIGNING): (_V, "restarted by a user"),
    (S.KILLED_OOM, S.ASSIGNING): (_V, "restarted by a user"),
}


def check_transition(task_type: TaskType, old: TaskStatus, new: TaskStatus) -> bool:
    """True when the table allows ``old -> new`` for ``task_type``. ``old == new`` is not a transition."""
    row = TRANSITIONS.get((old, new))
    return row is not None and task_type in row[0]


def apply(task_type: TaskType, old: TaskStatus, new: TaskStatus) -> TaskStatus:
    """Return the status after ``old -> new``, or raise ``LocalProtocolError`` if the table forbids it.

    Repeating the current status is accepted and returns it unchanged (idempotent reports). The host calls
    this inside the transaction that writes the new status, so the check and the write are atomic.
    """
    task_type, old, new = TaskType(task_type), TaskStatus(old), TaskStatus(new)
    if old == new or check_transition(task_type, old, new):
        return new
    if old in FINAL and new in FINAL:
        why = f"{old.value} is final and is never replaced by another final status"
    elif old in FINAL:
        why = f"a {task_type.value} task cannot leave {old.value}"
    else:
        why = "not in the transition table"
    raise LocalProtocolError(
        f"illegal transition for a {task_type.value} task: {old.value} -> {new.value} ({why})"
    )


def allowed_next(task_type: TaskType, old: TaskStatus) -> frozenset[TaskStatus]:
    """Every status ``old`` may move to for ``task_type`` (for error messages and the API)."""
    return frozenset(new for (o, new), (types, _) in TRANSITIONS.items() if o == old and task_type in types)


# -- container exits ---------------------------------------------------------------------------------------

_SIGNAL_NAMES = {1: "SIGHUP", 2: "SIGINT", 3: "SIGQUIT", 4: "SIGILL", 6: "SIGABRT", 7: "SIGBUS", 8: "SIGFPE",
                 9: "SIGKILL", 11: "SIGSEGV", 13: "SIGPIPE", 14: "SIGALRM", 15: "SIGTERM"}  # fmt: skip


def status_for_exit(
    exit_code: int,
    *,
    oom_killed: bool = False,
    killed_by_user: bool = False,
    task_type: TaskType = TaskType.COMMAND,
) -> TaskStatus:
    """The final status of a container or VM that exited.

    - ``killed_by_user`` wins: the user asked for it, whatever the exit code or OOM flag says.
    - ``oom_killed`` (Docker's ``State.OOMKilled``) with a non-zero exit code is ``killed_oom``; exit 137
      *without* the flag is a plain SIGKILL (``docker kill``, a watchdog), reported as ``failed``, not OOM.
      The flag with exit 0 means a child was OOM-killed but the main process succeeded: ``completed``.
    - exit 0 is ``completed`` for a command task and ``stopped`` for a VPS (a VPS does not "complete").
    - anything else is ``failed``.
    """
    if killed_by_user:
        return TaskStatus.KILLED
    if exit_code != 0 and oom_killed:
        return TaskStatus.KILLED_OOM
    if exit_code == 0:
        return TaskStatus.COMPLETED if TaskType(task_type) is TaskType.COMMAND else TaskStatus.STOPPED
    return TaskStatus.FAILED


def describe_exit(exit_code: int, *, oom_killed: bool = False) -> str:
    """A short human text for an exit code: ``exit code 1``, ``killed by SIGKILL (exit 137)``, ...

    Exit codes 129..192 are the shell's 128+signal convention, which is what Docker reports for a process
    ended by a signal.
    """
    if oom_killed and exit_code != 0:
        return f"killed by the OOM killer (exit {exit_code}): the memory limit was reached"
    if 128 < exit_code <= 128 + 64:
        signum = exit_code - 128
        name = _SIGNAL_NAMES.get(signum, f"signal {signum}")
        return f"killed by {name} (exit {exit_code})"
    return f"exit code {exit_code}"
