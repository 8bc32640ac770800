"""The store's status watch: a committed status change wakes the waiters of that task, nothing else does."""

from __future__ import annotations

import attrs
import pytest
import trio
import trio.testing

from kohakuriver_host.status_watch import StatusWatch
from kohakuriver_host.store import WriteTx, open_store
from kohakuriver_proto.lifecycle import TaskStatus

from .test_store import moved, task


async def _woken(watch: StatusWatch, task_id: int, timeout: float = 0.2) -> bool:
    return await watch.wait(task_id, watch.subscribe(task_id), timeout)


async def test_only_committed_status_changes_wake_the_task_s_waiters(tmp_path):
    async with open_store(tmp_path / "s.db") as s:
        watch = s.status_watch
        await s.write(WriteTx.insert_tasks, [task(1), task(2)])
        results: dict[str, bool] = {}

        async def waits(name: str, task_id: int) -> None:
            results[name] = await _woken(watch, task_id, 1.0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waits, "one", 1)
            nursery.start_soon(waits, "one again", 1)
            nursery.start_soon(waits, "two", 2)
            await trio.testing.wait_all_tasks_blocked()
            assert watch.waiting(1) == 2 and watch.waiting(2) == 1
            # Not a status change, and a rolled-back one: nobody wakes.
            await s.write(WriteTx.update_task, 1, lambda t: attrs.evolve(t, status_message="note"))

            def rolled_back(tx: WriteTx) -> None:
                tx.update_task(1, moved("killed"))
                raise RuntimeError("abort")

            with pytest.raises(RuntimeError):
                await s.write(rolled_back)
            await trio.sleep(0.05)
            assert results == {}
            await s.write(WriteTx.update_task, 1, moved("assigning", "n1"))
        assert results == {"one": True, "one again": True, "two": False}
        # Every subscription is gone once its waiter left, woken or not.
        assert watch.waiting(1) == watch.waiting(2) == 0 and not watch._slots


async def test_a_change_between_subscribe_and_wait_is_not_missed(tmp_path):
    async with open_store(tmp_path / "s.db") as s:
        await s.write(WriteTx.insert_tasks, [task(7)])
        slot = s.status_watch.subscribe(7)
        await s.write(WriteTx.update_task, 7, moved("killed"))
        with trio.fail_after(1):
            assert await s.status_watch.wait(7, slot, 10)
        record = await s.read(lambda tx: tx.get_task(7))
        assert record.status is TaskStatus.KILLED


async def test_release_without_waiting_forgets_the_subscription():
    watch = StatusWatch()
    slot = watch.subscribe(3)
    watch.release(3, slot)
    assert watch.waiting(3) == 0 and not watch._slots
    watch.changed([3])  # nobody to wake: harmless
