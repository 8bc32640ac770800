"""The runner's own small state store: one JSON file per task it holds, ``<state_dir>/tasks/<id>.json``.

Why a file per task and not a database: the runner holds tens of tasks, each record changes a handful of times
in its life, and a file per task makes every write independent and atomic (written to a temporary file,
fsynced, renamed over the old one), so a ``kill -9`` at any moment leaves either the old or the new record.
Writes go through ``trio.to_thread`` (nothing blocks the event loop) and are serialised per task so that
two writes of one record cannot land out of order.

A record says what the runner was asked to run (the ``ExecuteRequest``), how far it got (``phase``), whether
a user killed it, and the final report until the host has acknowledged it. Together with the Docker labels
this is what a restarted runner uses to re-adopt containers and report what ended while it was down.
The saved stdout/stderr of finished tasks live next to it in ``<state_dir>/logs/<id>/``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import attrs
import trio

from kohakuriver_net.atomic_file import write_file_atomic
from kohakuriver_proto.converter import structure, unstructure
from kohakuriver_proto.errors import ValidationError
from kohakuriver_proto.models import ExecuteRequest, StatusUpdate

__all__ = ["Phase", "StateStore", "TaskState", "atomic_write_json", "move_legacy_state"]

log = logging.getLogger("kohakuriver.runner.state")

FORMAT_VERSION = 1


class Phase(enum.StrEnum):
    PREPARING = "preparing"  # resolving the image (pull / tarball load), not yet a container
    CREATED = "created"  # the container exists but has not been started
    RUNNING = "running"  # started (possibly paused)
    FINISHED = "finished"  # exited and collected; ``final_report`` awaits the host's acknowledgement


def _utc(value: Any) -> dt.datetime | None:
    if value is None:
        return None
    return structure(value, dt.datetime)


@attrs.define(kw_only=True)
class TaskState:
    """One task the runner holds. ``request`` is None for a container adopted without a record."""

    task_id: int
    request: ExecuteRequest | None = None
    phase: Phase = Phase.PREPARING
    container_id: str | None = None
    killed_by_user: bool = False
    #: The host said the task is over (heartbeat ``kill`` list): kill it and report nothing.
    forget: bool = False
    accepted_at: dt.datetime | None = None
    started_at: dt.datetime | None = None
    final_report: StatusUpdate | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "task_id": str(self.task_id),
            "request": None if self.request is None else unstructure(self.request),
            "phase": self.phase.value,
            "container_id": self.container_id,
            "killed_by_user": self.killed_by_user,
            "forget": self.forget,
            "accepted_at": None if self.accepted_at is None else unstructure(self.accepted_at),
            "started_at": None if self.started_at is None else unstructure(self.started_at),
            "final_report": None if self.final_report is None else unstructure(self.final_report),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TaskState:
        request = data.get("request")
        report = data.get("final_report")
        return cls(
            task_id=int(data["task_id"]),
            request=None if request is None else structure(request, ExecuteRequest),
            phase=Phase(data.get("phase", Phase.PREPARING.value)),
            container_id=data.get("container_id"),
            killed_by_user=bool(data.get("killed_by_user")),
            forget=bool(data.get("forget")),
            accepted_at=_utc(data.get("accepted_at")),
            started_at=_utc(data.get("started_at")),
            final_report=None if report is None else structure(report, StatusUpdate),
        )


def atomic_write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` so that a crash, even a power cut, leaves the old or the new
    content (blocking). Mode 0666 less the umask, as a plain ``open`` would give."""
    write_file_atomic(path, json.dumps(data, separators=(",", ":")).encode(), mode=0o666, sync_dir=True)


def _load_all(tasks_dir: Path) -> tuple[list[TaskState], list[str]]:
    entries: list[TaskState] = []
    problems: list[str] = []
    for path in sorted(tasks_dir.glob("*.json")):
        if path.name.startswith("."):
            continue
        try:
            entry = TaskState.from_json(json.loads(path.read_text(encoding="utf-8")))
            if path.stem != str(entry.task_id):
                raise ValueError(f"file name does not match task id {entry.task_id}")
        except (OSError, ValueError, KeyError, TypeError, ValidationError) as exc:
            # Keep the evidence but get it out of the way: one bad file must not stop the runner.
            bad = path.with_name(path.name + ".bad")
            problems.append(f"{path}: {exc} (moved to {bad.name})")
            with contextlib.suppress(OSError):
                os.replace(path, bad)
            continue
        entries.append(entry)
    # Leftovers of writes interrupted by a crash.
    for tmp in tasks_dir.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    return entries, problems


class StateStore:
    """The records under ``<state_dir>``. Call ``await open()`` once before use."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.root = Path(state_dir)
        self.tasks_dir = self.root / "tasks"
        self.logs_root = self.root / "logs"
        self.images_dir = self.root / "images"
        self._entries: dict[int, TaskState] = {}
        self._locks: dict[int, trio.Lock] = {}

    async def open(self) -> None:
        def prepare() -> tuple[list[TaskState], list[str]]:
            # Private: it holds the tunnel key, the VPS host keys and the VM management key.
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            for directory in (self.tasks_dir, self.logs_root, self.images_dir):
                directory.mkdir(parents=True, exist_ok=True)
            return _load_all(self.tasks_dir)

        entries, problems = await trio.to_thread.run_sync(prepare)
        for problem in problems:
            log.error("unreadable task record %s", problem)
        self._entries = {e.task_id: e for e in entries}
        if entries:
            log.info("state: %d task record(s) from a previous run", len(entries))

    def get(self, task_id: int) -> TaskState | None:
        return self._entries.get(task_id)

    def entries(self) -> list[TaskState]:
        return list(self._entries.values())

    def logs_dir(self, task_id: int) -> Path:
        return self.logs_root / str(int(task_id))

    def _path(self, task_id: int) -> Path:
        return self.tasks_dir / f"{int(task_id)}.json"

    def _lock(self, task_id: int) -> trio.Lock:
        return self._locks.setdefault(task_id, trio.Lock())

    async def save(self, entry: TaskState) -> None:
        """Persist ``entry`` (and make it the in-memory record)."""
        self._entries[entry.task_id] = entry
        async with self._lock(entry.task_id):
            # Snapshot under the lock: the latest content wins even if saves were queued behind each other.
            data = entry.to_json()
            await trio.to_thread.run_sync(atomic_write_json, self._path(entry.task_id), data)

    async def delete(self, task_id: int) -> None:
        self._entries.pop(task_id, None)
        async with self._lock(task_id):
            await trio.to_thread.run_sync(lambda: self._path(task_id).unlink(missing_ok=True))
        lock = self._locks.get(task_id)
        if lock is not None and not lock.locked() and task_id not in self._entries:
            del self._locks[task_id]


def move_legacy_state(legacy: Path, state_dir: Path) -> bool:
    """Move a state directory an earlier version kept under LOCAL_TEMP_DIR (which every task mounts) to
    ``state_dir``, once: only when ``state_dir`` does not exist yet. Blocking (a thread). True if moved."""
    if state_dir.exists() or not legacy.is_dir():
        return False
    state_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(legacy), str(state_dir))
    os.chmod(state_dir, 0o700)
    log.warning(
        "moved the runner state from %s to %s: tasks mount LOCAL_TEMP_DIR and could read its keys",
        legacy,
        state_dir,
    )
    return True
