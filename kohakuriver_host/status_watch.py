"""Wake-ups for clients waiting on a task's status (``GET /api/status/{id}?wait=&since=``).

The store tells the watch, after each committed write transaction, which tasks changed status
(``Store.write``); a waiting request sleeps on the task's event instead of polling the database. One event
per task with waiters: ``changed`` sets it and forgets it, so the next wait of that task gets a fresh one;
the last waiter to leave without a change removes it, so tasks nobody waits for cost nothing.

Only trio code touches the watch (``Store.write`` calls ``changed`` on the trio side, after the writer
thread handed the outcome back), so it needs no lock.
"""

from __future__ import annotations

from collections.abc import Iterable

import trio

__all__ = ["StatusWatch"]


class _Slot:
    __slots__ = ("event", "waiters")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.waiters = 0


class StatusWatch:
    def __init__(self) -> None:
        self._slots: dict[int, _Slot] = {}

    def changed(self, task_ids: Iterable[int]) -> None:
        """These tasks' statuses changed (committed): wake whoever waits on them."""
        for task_id in task_ids:
            slot = self._slots.pop(task_id, None)
            if slot is not None:
                slot.event.set()

    def waiting(self, task_id: int) -> int:
        """How many requests wait on ``task_id`` now (tests)."""
        slot = self._slots.get(task_id)
        return 0 if slot is None else slot.waiters

    def subscribe(self, task_id: int) -> _Slot:
        """Register interest *before* reading the status, so that a change in between is not missed."""
        slot = self._slots.get(task_id)
        if slot is None:
            slot = self._slots[task_id] = _Slot()
        slot.waiters += 1
        return slot

    async def wait(self, task_id: int, slot: _Slot, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the change ``slot`` (from ``subscribe``) announces; True if
        it came. Always releases the subscription."""
        try:
            with trio.move_on_after(timeout):
                await slot.event.wait()
            return slot.event.is_set()
        finally:
            self.release(task_id, slot)

    def release(self, task_id: int, slot: _Slot) -> None:
        """Drop a subscription that will not be waited on (the status had already moved on)."""
        slot.waiters -= 1
        if slot.waiters == 0 and self._slots.get(task_id) is slot:
            del self._slots[task_id]
