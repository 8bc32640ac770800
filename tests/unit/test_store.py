"""The state store: migrations, atomic read-modify-write, one writer thread, a never-blocked event loop."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import stat
import threading
import time

import attrs
import pytest
import trio

from kohakuriver_host import migrations, store
from kohakuriver_host.store import (
    ConstraintError,
    InvalidTaskDoc,
    ReadTx,
    SchemaVersionError,
    StoreClosed,
    TaskNotFound,
    WriteTx,
    open_store,
)
from kohakuriver_host.stored_task import StoredTask
from kohakuriver_proto.errors import ValidationError
from kohakuriver_proto.lifecycle import TaskStatus, TaskType


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def task(task_id, status="pending", owner_id=None, node=None, task_type="command", **extra):
    return StoredTask(
        task_id=task_id,
        task_type=TaskType(task_type),
        owner_id=owner_id,
        status=TaskStatus(status),
        assigned_node=node,
        submitted_at=dt.datetime.fromtimestamp(1_700_000_000.0 + task_id, dt.UTC),
        command="true" if task_type == "command" else None,
        **extra,
    )


def moved(status, node=None):
    """A mutation: the task in ``status`` on ``node`` (the store does not judge the lifecycle)."""
    return lambda t: attrs.evolve(t, status=TaskStatus(status), assigned_node=node)


def writer_threads():
    return [t for t in threading.enumerate() if t.name == "kohakuriver-store-writer"]


# -- opening, migrations, pragmas --------------------------------------------------------------------------


async def test_migrates_an_empty_database_and_sets_the_pragmas(tmp_path):
    path = tmp_path / "state" / "host.db"
    async with open_store(path) as s:
        assert await s.read(lambda tx: tx.conn.execute("PRAGMA user_version").fetchone()[0]) == len(
            migrations.MIGRATIONS
        )
        tables = await s.read(
            lambda tx: {r[0] for r in tx.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        )
        assert {"meta", "users", "tokens", "nodes", "tasks"} <= tables
        assert await s.read(lambda tx: tx.conn.execute("PRAGMA journal_mode").fetchone()[0]) == "wal"
        # foreign keys and synchronous are per connection: check the writer's.
        assert await s.write(lambda tx: tx.conn.execute("PRAGMA foreign_keys").fetchone()[0]) == 1
        assert await s.write(lambda tx: tx.conn.execute("PRAGMA synchronous").fetchone()[0]) == 1  # NORMAL
        assert await s.write(lambda tx: tx.conn.execute("PRAGMA busy_timeout").fetchone()[0]) > 0
    # a fresh directory and database are private (the database holds the cluster token)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_reopen_keeps_data_and_does_not_migrate_again(tmp_path):
    path = tmp_path / "host.db"
    async with open_store(path) as s:
        await s.write(WriteTx.set_meta, "k", "v")
        await s.write(WriteTx.insert_tasks, [task(1)])
    async with open_store(path) as s:
        assert await s.read(ReadTx.get_meta, "k") == "v"
        assert (await s.read(ReadTx.get_task, 1)).status == "pending"


async def test_a_newer_database_is_refused_and_nothing_leaks(tmp_path):
    path = tmp_path / "host.db"
    async with open_store(path):
        pass
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {len(migrations.MIGRATIONS) + 1}")
    with pytest.raises(SchemaVersionError, match="newer"):
        async with open_store(path):
            pass  # pragma: no cover
    assert writer_threads() == []


async def test_each_migration_is_atomic(tmp_path):
    path = tmp_path / "host.db"
    broken = (*migrations.MIGRATIONS, ("CREATE TABLE extra (x INTEGER)", "THIS IS NOT SQL"))
    with pytest.raises(sqlite3.OperationalError):
        async with open_store(path, migrations=broken):
            pass  # pragma: no cover
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(migrations.MIGRATIONS)
        assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'extra'").fetchone() is None
    fixed = (*migrations.MIGRATIONS, ("CREATE TABLE extra (x INTEGER)",))
    async with open_store(path, migrations=fixed) as s:
        assert await s.read(lambda tx: tx.conn.execute("PRAGMA user_version").fetchone()[0]) == len(fixed)


async def test_foreign_keys_are_enforced(tmp_path):
    async with open_store(tmp_path / "host.db") as s:
        with pytest.raises(ConstraintError):
            await s.write(WriteTx.create_token, 12345, "orphan", "ab" * 32)
        with pytest.raises(ConstraintError):
            await s.write(WriteTx.insert_tasks, [task(1, owner_id=999)])


async def test_close_joins_the_writer_and_later_use_fails(tmp_path):
    async with open_store(tmp_path / "host.db") as s:
        assert len(writer_threads()) == 1
    assert writer_threads() == []
    with pytest.raises(StoreClosed):
        await s.read(ReadTx.get_meta, "x")
    with pytest.raises(StoreClosed):
        await s.write(WriteTx.set_meta, "x", "y")


# -- tasks -------------------------------------------------------------------------------------------------


async def test_insert_list_and_filters(tmp_path):
    async with open_store(tmp_path / "host.db") as s:
        alice = await s.write(WriteTx.create_user, "alice", "user")
        bob = await s.write(WriteTx.create_user, "bob", "user")
        rows = await s.write(
            WriteTx.insert_tasks,
            [
                task(10, owner_id=alice.id),
                task(11, owner_id=bob.id, status="running", node="n1"),
                task(12, owner_id=alice.id, status="running", node="n2", task_type="vps"),
                task(13, owner_id=alice.id, status="completed", node="n1"),
            ],
        )
        assert [r.queue_seq for r in rows] == [1, 2, 3, 4]
        newest_first = [r.task_id for r in await s.read(ReadTx.list_tasks)]
        assert newest_first == [13, 12, 11, 10]
        assert [r.task_id for r in await s.read(ReadTx.list_tasks, owner_id=alice.id)] == [13, 12, 10]
        assert [r.task_id for r in await s.read(ReadTx.list_tasks, statuses={"running"})] == [12, 11]
        assert [r.task_id for r in await s.read(ReadTx.list_tasks, statuses=set())] == []
        assert [r.task_id for r in await s.read(ReadTx.list_tasks, node="n1")] == [13, 11]
        assert [r.task_id for r in await s.read(ReadTx.list_tasks, task_type="vps")] == [12]
        assert [r.task_id for r in await s.read(ReadTx.list_tasks, limit=2, offset=1)] == [12, 11]
        assert await s.read(ReadTx.count_tasks, owner_id=alice.id, statuses=["running", "completed"]) == 2
        assert [r.task_id for r in await s.read(ReadTx.tasks_in_status, ["running", "pending"])] == [
            10,
            11,
            12,
        ]
        assert [r.task_id for r in await s.read(ReadTx.tasks_in_status, ["running"], node="n2")] == [12]
        with pytest.raises(ValueError, match="limit"):
            await s.read(ReadTx.list_tasks, limit=0)
        # more submissions continue the queue order
        assert (await s.write(WriteTx.insert_tasks, [task(5)]))[0].queue_seq == 5


async def test_insert_is_all_or_nothing(tmp_path):
    async with open_store(tmp_path / "host.db") as s:
        await s.write(WriteTx.insert_tasks, [task(1)])
        with pytest.raises(ConstraintError, match="task 1"):
            await s.write(WriteTx.insert_tasks, [task(2), task(1)])
        assert await s.read(ReadTx.get_task, 2) is None
        with pytest.raises(InvalidTaskDoc, match="StoredTask"):
            await s.write(WriteTx.insert_tasks, [task(3), {"task_id": 4, "status": None}])
        assert await s.read(ReadTx.get_task, 3) is None


async def test_tasks_are_stored_as_the_converter_writes_them_and_read_back_typed(tmp_path):
    # The document is the converter's JSON (ids as decimal strings, datetimes as ISO-8601 UTC strings);
    # the row hands out the typed record, equal to what was stored.
    big = (1 << 62) + 12345
    submitted = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    path = tmp_path / "host.db"
    async with open_store(path) as s:
        vps = attrs.evolve(task(1, task_type="vps"), task_id=big, submitted_at=submitted, restart_node="n1")
        [row] = await s.write(WriteTx.insert_tasks, [vps])
        assert row.task_id == big and row.task is vps
        got = await s.read(ReadTx.get_task, big)
        assert got.task == vps and got.task_type is TaskType.VPS and got.status is TaskStatus.PENDING
        text, column = await s.read(
            lambda tx: tuple(
                tx.conn.execute("SELECT doc, submitted_at FROM tasks WHERE task_id = ?", (big,)).fetchone()
            )
        )
        stored = json.loads(text)
        assert stored["task_id"] == str(big) and stored["submitted_at"] == "2025-01-01T00:00:00Z"
        assert stored["restart_node"] == "n1" and column == 1735689600.0
        # A naive time never gets this far: the record refuses it.
        with pytest.raises(ValidationError, match="submitted_at"):
            attrs.evolve(task(7), submitted_at=dt.datetime(2025, 1, 1))


async def test_a_document_from_before_the_host_fields_reads_back_with_their_defaults(tmp_path):
    path = tmp_path / "host.db"
    async with open_store(path) as s:
        await s.write(WriteTx.insert_tasks, [task(1), task(2)])
    old = {
        "task_id": "1",
        "task_type": "command",
        "status": "pending",
        "submitted_at": "2025-01-01T00:00:00Z",
        "command": "true",
        "some_retired_key": 3,
    }
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE tasks SET doc = ? WHERE task_id = 1", (json.dumps(old),))
        conn.execute('UPDATE tasks SET doc = \'{"task_id": "2"}\' WHERE task_id = 2')
    async with open_store(path) as s:
        row = await s.read(ReadTx.get_task, 1)
        assert row.task.dispatch_attempts == 0 and row.task.restart_node is None
        # A document that is no task at all is named, not handed out half-read.
        with pytest.raises(InvalidTaskDoc, match="stored task 2"):
            await s.read(ReadTx.get_task, 2)


async def test_update_task_is_atomic_and_columns_follow_the_record(tmp_path):
    async with open_store(tmp_path / "host.db") as s:
        await s.write(WriteTx.insert_tasks, [task(1)])
        assign = moved("assigning", "n1")

        row = await s.write(WriteTx.update_task, 1, assign)
        assert (row.status, row.assigned_node, row.queue_seq) == ("assigning", "n1", 1)
        assert [r.task_id for r in await s.read(ReadTx.list_tasks, node="n1", statuses={"assigning"})] == [1]

        def boom(t):
            attrs.evolve(t, status=TaskStatus.RUNNING)
            raise RuntimeError("illegal transition")

        with pytest.raises(RuntimeError):
            await s.write(WriteTx.update_task, 1, boom)
        assert (await s.read(ReadTx.get_task, 1)).status == "assigning"

        # "no change": None, the record itself, or an equal one; the row is handed back unchanged
        same = await s.write(WriteTx.update_task, 1, lambda t: None)
        assert same.status == "assigning"
        assert (await s.write(WriteTx.update_task, 1, lambda t: t)).task == same.task
        assert (await s.write(WriteTx.update_task, 1, lambda t: attrs.evolve(t))).task == same.task
        with pytest.raises(TaskNotFound):
            await s.write(WriteTx.update_task, 99, assign)
        with pytest.raises(InvalidTaskDoc, match="task_id"):
            await s.write(WriteTx.update_task, 1, lambda t: attrs.evolve(t, task_id=2))

        # several tasks: all or none
        await s.write(WriteTx.insert_tasks, [task(2), task(3)])
        with pytest.raises(TaskNotFound):
            await s.write(WriteTx.update_tasks, [2, 3, 4], assign)
        assert (await s.read(ReadTx.get_task, 2)).status == "pending"
        assert [r.status for r in await s.write(WriteTx.update_tasks, [2, 3], assign)] == [
            "assigning",
            "assigning",
        ]


async def test_concurrent_read_modify_writes_lose_no_update(tmp_path):
    async with open_store(tmp_path / "host.db") as s:
        await s.write(WriteTx.insert_tasks, [task(1)])

        def bump(t):
            return attrs.evolve(t, dispatch_attempts=t.dispatch_attempts + 1)

        async def worker():
            for _ in range(10):
                await s.write(WriteTx.update_task, 1, bump)
                await s.read(ReadTx.get_task, 1)

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(worker)
        assert (await s.read(ReadTx.get_task, 1)).task.dispatch_attempts == 200


async def test_writes_run_in_submission_order(tmp_path):
    async with open_store(tmp_path / "host.db") as s:
        await s.write(WriteTx.insert_tasks, [task(1)])
        async with trio.open_nursery() as nursery:
            for i in range(30):
                append = lambda t, i=i: attrs.evolve(t, arguments=[*t.arguments, str(i)])  # noqa: E731
                nursery.start_soon(s.write, WriteTx.update_task, 1, append)
                await trio.sleep(0)  # the update has been queued before the next one starts
        assert (await s.read(ReadTx.get_task, 1)).task.arguments == [str(i) for i in range(30)]


# -- never blocking the loop; cancellation --------------------------------------------------------------


async def test_a_slow_transaction_does_not_block_the_event_loop_or_readers(tmp_path):
    async with open_store(tmp_path / "host.db") as s:
        await s.write(WriteTx.set_meta, "k", "before")
        ticks = 0
        read_done_during_write = False
        write_done = trio.Event()

        async def ticker():
            nonlocal ticks
            while not write_done.is_set():
                ticks += 1
                await trio.sleep(0.01)

        async def reader():
            nonlocal read_done_during_write
            await trio.sleep(0.05)
            value = await s.read(
                ReadTx.get_meta, "k"
            )  # WAL: readers see the last commit while the writer works
            read_done_during_write = value == "before" and not write_done.is_set()

        def slow(tx):
            tx.set_meta("k", "after")
            time.sleep(0.4)

        async def writer():
            await s.write(slow)
            write_done.set()

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            nursery.start_soon(reader)
            nursery.start_soon(writer)
        assert trio.current_time() - start >= 0.4
        assert ticks >= 15  # ~40 if nothing blocks; a blocked loop would tick once or twice
        assert read_done_during_write
        assert await s.read(ReadTx.get_meta, "k") == "after"


async def test_a_cancelled_queued_write_never_runs_and_a_started_one_completes(tmp_path):
    async with open_store(tmp_path / "host.db") as s:
        started = threading.Event()

        def slow(tx):
            started.set()
            time.sleep(0.3)
            tx.set_meta("slow", "done")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(s.write, slow)
            await trio.to_thread.run_sync(started.wait)
            # queued behind the slow one, then cancelled before the writer reaches it
            with trio.move_on_after(0.05) as scope:
                await s.write(WriteTx.set_meta, "queued", "x")
            assert scope.cancelled_caught
        assert await s.read(ReadTx.get_meta, "slow") == "done"
        assert await s.read(ReadTx.get_meta, "queued") is None

        # cancelled while running: like trio.to_thread, the transaction runs to its end and its result is
        # returned (the caller learns it committed); the cancellation fires at the next checkpoint.
        started.clear()
        result = None
        with trio.move_on_after(0.05) as scope:
            result = await s.write(lambda tx: (slow(tx), "committed")[1])
            await trio.lowlevel.checkpoint()
            pytest.fail("the cancellation should have been delivered")  # pragma: no cover
        assert scope.cancelled_caught and started.is_set() and result == "committed"


# -- users, tokens, nodes, meta ----------------------------------------------------------------------------


async def test_users_and_tokens(tmp_path):
    clock = FakeClock()
    async with open_store(tmp_path / "host.db", clock=clock) as s:
        u = await s.write(WriteTx.create_user, "alice", "user")
        assert (u.username, u.role, u.is_active, u.created_at) == ("alice", "user", True, clock.now)
        with pytest.raises(ConstraintError, match="alice"):
            await s.write(WriteTx.create_user, "alice", "admin")
        with pytest.raises(ConstraintError):
            await s.write(WriteTx.create_user, "carol", "superuser")  # CHECK constraint on role
        t = await s.write(WriteTx.create_token, u.id, "laptop", "11" * 32)
        token, user = await s.read(ReadTx.lookup_token, "11" * 32)
        assert token.id == t.id and user.username == "alice"
        assert await s.read(ReadTx.lookup_token, "22" * 32) is None
        assert await s.write(WriteTx.touch_token, t.id, min_interval=60)
        clock.now += 30
        assert not await s.write(WriteTx.touch_token, t.id, min_interval=60)
        clock.now += 31
        assert await s.write(WriteTx.touch_token, t.id, min_interval=60)
        other = await s.write(WriteTx.create_user, "bob", "user")
        assert not await s.write(WriteTx.revoke_token, t.id, user_id=other.id)  # not bob's token
        assert await s.write(WriteTx.revoke_token, t.id, user_id=u.id)
        assert not await s.write(WriteTx.revoke_token, t.id)  # already revoked
        assert (await s.read(ReadTx.get_token, t.id)).revoked
        assert (await s.write(WriteTx.update_user, u.id, is_active=False)).is_active is False
        assert await s.read(ReadTx.count_users) == 2
        assert await s.write(WriteTx.create_first_admin, "admin", "first", "33" * 32) is None  # users exist


async def test_nodes_and_offline_marking_with_task_updates(tmp_path):
    clock = FakeClock(1000.0)
    async with open_store(tmp_path / "host.db", clock=clock) as s:
        n = await s.write(
            WriteTx.upsert_node, "n1", "http://n1:8001", {"total_cores": 8}, runner_token_hash="aa"
        )
        assert (n.status, n.last_heartbeat, n.registration, n.metrics) == (
            "online",
            1000.0,
            {"total_cores": 8},
            {},
        )
        clock.now = 1010.0
        n = await s.write(WriteTx.heartbeat_node, "n1", {"cpu_percent": 5.0})
        assert n.metrics == {"cpu_percent": 5.0} and n.last_heartbeat == 1010.0
        assert await s.write(WriteTx.heartbeat_node, "ghost", {}) is None
        n = await s.write(WriteTx.upsert_node, "n1", "http://n1:8001", {"total_cores": 16})  # re-register
        assert n.runner_token_hash == "aa" and n.metrics == {"cpu_percent": 5.0}
        await s.write(WriteTx.upsert_node, "n2", "http://n2:8001", {}, now=900.0)
        assert [x.hostname for x in await s.read(ReadTx.stale_nodes, 1000.0)] == ["n2"]

        await s.write(
            WriteTx.insert_tasks,
            [
                task(1, status="running", node="n2"),
                task(2, status="paused", node="n2"),
                task(3, "completed", node="n2"),
            ],
        )
        was_online, changed = await s.write(
            WriteTx.mark_node_offline,
            "n2",
            task_statuses={"running", "paused", "assigning"},
            mutate=moved("lost", "n2"),
        )
        assert was_online and sorted(r.task_id for r in changed) == [1, 2]
        assert (await s.read(ReadTx.get_task, 3)).status == "completed"
        assert (await s.write(WriteTx.mark_node_offline, "n2"))[0] is False
        assert [x.hostname for x in await s.read(ReadTx.list_nodes, "offline")] == ["n2"]


async def test_meta(tmp_path):
    async with open_store(tmp_path / "host.db") as s:
        assert await s.read(ReadTx.get_meta, "cluster_token") is None
        assert await s.write(WriteTx.get_or_set_meta, "cluster_token", "first") == "first"
        assert await s.write(WriteTx.get_or_set_meta, "cluster_token", "second") == "first"
        await s.write(WriteTx.set_meta, "cluster_token", "third")
        assert await s.read(ReadTx.get_meta, "cluster_token") == "third"


def test_task_columns_come_from_a_validated_record():
    assert store.task_columns(task(1, owner_id=4, node="n1")) == (
        1, "command", 4, "pending", "n1", None, 1_700_000_001.0,
    )  # fmt: skip
    with pytest.raises(InvalidTaskDoc, match="StoredTask"):
        store.task_columns({"task_id": 1, "task_type": "command", "status": "pending", "submitted_at": 1.0})
    # What the old document checks refused cannot be built any more.
    with pytest.raises(ValidationError, match="task_id"):
        attrs.evolve(task(1), task_id=-1)
    with pytest.raises(ValidationError, match="status"):
        attrs.evolve(task(1), status="pending")  # a string, not a TaskStatus
