"""The state store: migrations, atomic read-modify-write, one writer thread, a never-blocked event loop."""

from __future__ import annotations

import sqlite3
import stat
import threading
import time

import pytest
import trio

from kohakuriver_host import migrations, store
from kohakuriver_host.store import (
    ConstraintError,
    InvalidTaskDoc,
    SchemaVersionError,
    StoreClosed,
    TaskNotFound,
    open_store,
)


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def doc(task_id, status="pending", owner_id=None, node=None, task_type="command", **extra):
    return {
        "task_id": task_id,
        "task_type": task_type,
        "owner_id": owner_id,
        "status": status,
        "assigned_node": node,
        "batch_id": None,
        "submitted_at": 1_700_000_000.0 + task_id,
        **extra,
    }


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
        assert await s.transaction(lambda tx: tx.conn.execute("PRAGMA foreign_keys").fetchone()[0]) == 1
        assert (
            await s.transaction(lambda tx: tx.conn.execute("PRAGMA synchronous").fetchone()[0]) == 1
        )  # NORMAL
        assert await s.transaction(lambda tx: tx.conn.execute("PRAGMA busy_timeout").fetchone()[0]) > 0
    # a fresh directory and database are private (the database holds the cluster token)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_reopen_keeps_data_and_does_not_migrate_again(tmp_path):
    path = tmp_path / "host.db"
    async with open_store(path) as s:
        await s.set_meta("k", "v")
        await s.insert_tasks([doc(1)])
    async with open_store(path) as s:
        assert await s.get_meta("k") == "v"
        assert (await s.get_task(1)).status == "pending"


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
            await s.create_token(12345, "orphan", "ab" * 32)
        with pytest.raises(ConstraintError):
            await s.insert_tasks([doc(1, owner_id=999)])


async def test_close_joins_the_writer_and_later_use_fails(tmp_path):
    async with open_store(tmp_path / "host.db") as s:
        assert len(writer_threads()) == 1
    assert writer_threads() == []
    with pytest.raises(StoreClosed):
        await s.get_meta("x")
    with pytest.raises(StoreClosed):
        await s.set_meta("x", "y")


# -- tasks -------------------------------------------------------------------------------------------------


async def test_insert_list_and_filters(tmp_path):
    async with open_store(tmp_path / "host.db") as s:
        alice = await s.create_user("alice", "user")
        bob = await s.create_user("bob", "user")
        rows = await s.insert_tasks(
            [
                doc(10, owner_id=alice.id),
                doc(11, owner_id=bob.id, status="running", node="n1"),
                doc(12, owner_id=alice.id, status="running", node="n2", task_type="vps"),
                doc(13, owner_id=alice.id, status="completed", node="n1"),
            ]
        )
        assert [r.queue_seq for r in rows] == [1, 2, 3, 4]
        newest_first = [r.task_id for r in await s.list_tasks()]
        assert newest_first == [13, 12, 11, 10]
        assert [r.task_id for r in await s.list_tasks(owner_id=alice.id)] == [13, 12, 10]
        assert [r.task_id for r in await s.list_tasks(statuses={"running"})] == [12, 11]
        assert [r.task_id for r in await s.list_tasks(statuses=set())] == []
        assert [r.task_id for r in await s.list_tasks(node="n1")] == [13, 11]
        assert [r.task_id for r in await s.list_tasks(task_type="vps")] == [12]
        assert [r.task_id for r in await s.list_tasks(limit=2, offset=1)] == [12, 11]
        assert await s.count_tasks(owner_id=alice.id, statuses=["running", "completed"]) == 2
        assert [r.task_id for r in await s.tasks_in_status(["running", "pending"])] == [10, 11, 12]
        assert [r.task_id for r in await s.tasks_in_status(["running"], node="n2")] == [12]
        with pytest.raises(ValueError, match="limit"):
            await s.list_tasks(limit=0)
        # more submissions continue the queue order
        assert (await s.insert_tasks([doc(5)]))[0].queue_seq == 5


async def test_insert_is_all_or_nothing(tmp_path):
    async with open_store(tmp_path / "host.db") as s:
        await s.insert_tasks([doc(1)])
        with pytest.raises(ConstraintError, match="task 1"):
            await s.insert_tasks([doc(2), doc(1)])
        assert await s.get_task(2) is None
        with pytest.raises(InvalidTaskDoc, match="status"):
            await s.insert_tasks([doc(3), {**doc(4), "status": None}])
        assert await s.get_task(3) is None


async def test_documents_from_the_model_converter_are_accepted(tmp_path):
    # The converter writes ids as decimal strings and datetimes as ISO-8601 UTC strings.
    big = (1 << 62) + 12345
    async with open_store(tmp_path / "host.db") as s:
        [row] = await s.insert_tasks(
            [
                {
                    "task_id": str(big),
                    "task_type": "vps",
                    "status": "pending",
                    "submitted_at": "2025-01-01T00:00:00Z",
                }
            ]
        )
        assert row.task_id == big and row.submitted_at == 1735689600.0
        got = await s.get_task(big)
        assert got.doc["task_id"] == str(big) and got.doc["submitted_at"] == "2025-01-01T00:00:00Z"
        with pytest.raises(InvalidTaskDoc, match="offset"):
            await s.insert_tasks([{**doc(7), "submitted_at": "2025-01-01T00:00:00"}])


async def test_update_task_is_atomic_and_columns_follow_the_document(tmp_path):
    async with open_store(tmp_path / "host.db") as s:
        await s.insert_tasks([doc(1)])

        def assign(d):
            d["status"] = "assigning"
            d["assigned_node"] = "n1"
            return d

        row = await s.update_task(1, assign)
        assert (row.status, row.assigned_node, row.queue_seq) == ("assigning", "n1", 1)
        assert [r.task_id for r in await s.list_tasks(node="n1", statuses={"assigning"})] == [1]

        def boom(d):
            d["status"] = "running"
            raise RuntimeError("illegal transition")

        with pytest.raises(RuntimeError):
            await s.update_task(1, boom)
        assert (await s.get_task(1)).status == "assigning"

        assert (await s.update_task(1, lambda d: None)).status == "assigning"
        with pytest.raises(TaskNotFound):
            await s.update_task(99, assign)
        with pytest.raises(InvalidTaskDoc, match="task_id"):
            await s.update_task(1, lambda d: {**d, "task_id": 2})

        # several tasks: all or none
        await s.insert_tasks([doc(2), doc(3)])
        with pytest.raises(TaskNotFound):
            await s.update_tasks([2, 3, 4], assign)
        assert (await s.get_task(2)).status == "pending"
        assert [r.status for r in await s.update_tasks([2, 3], assign)] == ["assigning", "assigning"]


async def test_concurrent_read_modify_writes_lose_no_update(tmp_path):
    async with open_store(tmp_path / "host.db") as s:
        await s.insert_tasks([doc(1, counter=0)])

        def bump(d):
            d["counter"] += 1
            return d

        async def worker():
            for _ in range(10):
                await s.update_task(1, bump)
                await s.get_task(1)

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(worker)
        assert (await s.get_task(1)).doc["counter"] == 200


async def test_writes_run_in_submission_order(tmp_path):
    async with open_store(tmp_path / "host.db") as s:
        await s.insert_tasks([doc(1, log=[])])
        async with trio.open_nursery() as nursery:
            for i in range(30):
                nursery.start_soon(s.update_task, 1, lambda d, i=i: {**d, "log": [*d["log"], i]})
                await trio.sleep(0)  # the update has been queued before the next one starts
        assert (await s.get_task(1)).doc["log"] == list(range(30))


# -- never blocking the loop; cancellation --------------------------------------------------------------


async def test_a_slow_transaction_does_not_block_the_event_loop_or_readers(tmp_path):
    async with open_store(tmp_path / "host.db") as s:
        await s.set_meta("k", "before")
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
            value = await s.get_meta("k")  # WAL: readers see the last commit while the writer works
            read_done_during_write = value == "before" and not write_done.is_set()

        def slow(tx):
            tx.set_meta("k", "after")
            time.sleep(0.4)

        async def writer():
            await s.transaction(slow)
            write_done.set()

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            nursery.start_soon(reader)
            nursery.start_soon(writer)
        assert trio.current_time() - start >= 0.4
        assert ticks >= 15  # ~40 if nothing blocks; a blocked loop would tick once or twice
        assert read_done_during_write
        assert await s.get_meta("k") == "after"


async def test_a_cancelled_queued_write_never_runs_and_a_started_one_completes(tmp_path):
    async with open_store(tmp_path / "host.db") as s:
        started = threading.Event()

        def slow(tx):
            started.set()
            time.sleep(0.3)
            tx.set_meta("slow", "done")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(s.transaction, slow)
            await trio.to_thread.run_sync(started.wait)
            # queued behind the slow one, then cancelled before the writer reaches it
            with trio.move_on_after(0.05) as scope:
                await s.set_meta("queued", "x")
            assert scope.cancelled_caught
        assert await s.get_meta("slow") == "done"
        assert await s.get_meta("queued") is None

        # cancelled while running: like trio.to_thread, the transaction runs to its end and its result is
        # returned (the caller learns it committed); the cancellation fires at the next checkpoint.
        started.clear()
        result = None
        with trio.move_on_after(0.05) as scope:
            result = await s.transaction(lambda tx: (slow(tx), "committed")[1])
            await trio.lowlevel.checkpoint()
            pytest.fail("the cancellation should have been delivered")  # pragma: no cover
        assert scope.cancelled_caught and started.is_set() and result == "committed"


# -- users, tokens, nodes, meta ----------------------------------------------------------------------------


async def test_users_and_tokens(tmp_path):
    clock = FakeClock()
    async with open_store(tmp_path / "host.db", clock=clock) as s:
        u = await s.create_user("alice", "user")
        assert (u.username, u.role, u.is_active, u.created_at) == ("alice", "user", True, clock.now)
        with pytest.raises(ConstraintError, match="alice"):
            await s.create_user("alice", "admin")
        with pytest.raises(ConstraintError):
            await s.create_user("carol", "superuser")  # CHECK constraint on role
        t = await s.create_token(u.id, "laptop", "11" * 32)
        token, user = await s.lookup_token("11" * 32)
        assert token.id == t.id and user.username == "alice"
        assert await s.lookup_token("22" * 32) is None
        assert await s.touch_token(t.id, min_interval=60)
        clock.now += 30
        assert not await s.touch_token(t.id, min_interval=60)
        clock.now += 31
        assert await s.touch_token(t.id, min_interval=60)
        other = await s.create_user("bob", "user")
        assert not await s.revoke_token(t.id, user_id=other.id)  # not bob's token
        assert await s.revoke_token(t.id, user_id=u.id)
        assert not await s.revoke_token(t.id)  # already revoked
        assert (await s.get_token(t.id)).revoked
        assert (await s.update_user(u.id, is_active=False)).is_active is False
        assert await s.count_users() == 2
        assert await s.create_first_admin("admin", "first", "33" * 32) is None  # users exist


async def test_nodes_and_offline_marking_with_task_updates(tmp_path):
    clock = FakeClock(1000.0)
    async with open_store(tmp_path / "host.db", clock=clock) as s:
        n = await s.upsert_node("n1", "http://n1:8001", {"total_cores": 8}, runner_token_hash="aa")
        assert (n.status, n.last_heartbeat, n.registration, n.metrics) == (
            "online",
            1000.0,
            {"total_cores": 8},
            {},
        )
        clock.now = 1010.0
        n = await s.heartbeat_node("n1", {"cpu_percent": 5.0})
        assert n.metrics == {"cpu_percent": 5.0} and n.last_heartbeat == 1010.0
        assert await s.heartbeat_node("ghost", {}) is None
        n = await s.upsert_node("n1", "http://n1:8001", {"total_cores": 16})  # re-register
        assert n.runner_token_hash == "aa" and n.metrics == {"cpu_percent": 5.0}
        await s.upsert_node("n2", "http://n2:8001", {}, now=900.0)
        assert [x.hostname for x in await s.stale_nodes(1000.0)] == ["n2"]

        await s.insert_tasks(
            [
                doc(1, status="running", node="n2"),
                doc(2, status="paused", node="n2"),
                doc(3, "completed", node="n2"),
            ]
        )
        was_online, changed = await s.mark_node_offline(
            "n2", task_statuses={"running", "paused", "assigning"}, mutate=lambda d: {**d, "status": "lost"}
        )
        assert was_online and sorted(r.task_id for r in changed) == [1, 2]
        assert (await s.get_task(3)).status == "completed"
        assert (await s.mark_node_offline("n2"))[0] is False
        assert [x.hostname for x in await s.list_nodes("offline")] == ["n2"]


async def test_meta(tmp_path):
    async with open_store(tmp_path / "host.db") as s:
        assert await s.get_meta("cluster_token") is None
        assert await s.get_or_set_meta("cluster_token", "first") == "first"
        assert await s.get_or_set_meta("cluster_token", "second") == "first"
        await s.set_meta("cluster_token", "third")
        assert await s.get_meta("cluster_token") == "third"


def test_task_columns_rejects_bad_documents():
    with pytest.raises(InvalidTaskDoc, match="task_id"):
        store.task_columns({"task_type": "command", "status": "pending", "submitted_at": 1.0})
    with pytest.raises(InvalidTaskDoc, match="task_id"):
        store.task_columns({**doc(1), "task_id": -1})
    with pytest.raises(InvalidTaskDoc, match="submitted_at"):
        store.task_columns({**doc(1), "submitted_at": float("nan")})
    with pytest.raises(InvalidTaskDoc):
        store.task_columns(["not", "a", "mapping"])
