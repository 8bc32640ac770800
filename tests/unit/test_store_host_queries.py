"""The store's read helpers for the host's hot paths: summaries read by SQLite (``json_extract``), task
states without documents, node state without JSON parsing, lists as JSON text, lean heartbeats."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from kohakuriver_host.store import ReadTx, WriteTx, open_store
from kohakuriver_host.stored_task import INTERNAL_KEYS, StoredTask
from kohakuriver_proto.lifecycle import TaskStatus, TaskType


def task(task_id, status="pending", node=None, **extra):
    return StoredTask(
        task_id=task_id,
        task_type=TaskType.COMMAND,
        status=TaskStatus(status),
        assigned_node=node,
        submitted_at=dt.datetime(2025, 4, 10, 8, 30, tzinfo=dt.UTC),
        command="true",
        **extra,
    )


@pytest.fixture
async def s(tmp_path):
    async with open_store(tmp_path / "host.db") as store:
        yield store


async def test_task_summaries_and_states(s):
    await s.write(
        WriteTx.insert_tasks,
        [
            task(1, "running", "a", required_cores=2, required_gpus=[0, 1]),
            task(2, "pending", None, required_cores=1, target="a:0"),
            task(3, "pending", "a", required_cores=4),
            task(4, "completed", "a", required_cores=8),
        ],
    )
    rows = await s.read(
        lambda tx: tx.task_summaries(
            ["running", "pending"], ["required_cores", "required_gpus"], assigned=True
        )
    )
    assert [(r[0], r[3], r[5]) for r in rows] == [(1, "a", 2), (3, "a", 4)]
    assert json.loads(rows[0][6]) == [0, 1] and json.loads(rows[1][6]) == []
    queue = await s.read(lambda tx: tx.task_summaries(["pending"], ["target"], assigned=False))
    assert [(r[0], r[5]) for r in queue] == [(2, "a:0")]
    with pytest.raises(ValueError):
        await s.read(lambda tx: tx.task_summaries(["pending"], ["x') FROM tasks; --"]))
    states = await s.read(lambda tx: tx.task_states([4, 1, 99, *range(1000, 1700)]))
    assert states == {1: ("running", "command", "a"), 4: ("completed", "command", "a")}
    assert await s.read(lambda tx: tx.max_task_id()) == 4


async def test_list_task_documents_drops_keys_in_sqlite(s):
    await s.write(
        WriteTx.insert_tasks, [task(1, ssh_public_key="ssh-ed25519 AAAA", name="one"), task(2, name="two")]
    )
    texts = await s.read(ReadTx.list_task_documents, limit=10, drop_keys=INTERNAL_KEYS)
    assert [json.loads(t)["name"] for t in texts] == ["two", "one"]  # newest first
    assert all(not set(INTERNAL_KEYS) & set(json.loads(t)) for t in texts)
    with pytest.raises(ValueError):
        await s.read(lambda tx: tx.list_task_documents(limit=0))


async def test_node_state_and_lean_heartbeat(s):
    assert await s.read(lambda tx: tx.node_state("a")) is None
    await s.write(WriteTx.upsert_node, "a", "http://a:1", {"docker_available": False}, now=1.0)
    assert await s.read(lambda tx: tx.node_state("a")) == ("online", "http://a:1", False)
    assert await s.write(WriteTx.record_heartbeat, "a", {"docker_available": True}, now=5.0)
    assert await s.read(lambda tx: tx.node_state("a")) == ("online", "http://a:1", True)
    assert not await s.write(WriteTx.record_heartbeat, "ghost", {}, now=5.0)
    await s.write(WriteTx.mark_node_offline, "a")
    assert await s.read(lambda tx: tx.count_nodes_by_status()) == {"offline": 1}
    node = await s.read(ReadTx.get_node, "a")
    assert node.last_heartbeat == 5.0 and node.metrics == {"docker_available": True}
