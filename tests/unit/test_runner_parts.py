"""Runner pieces that need no Docker: log tails, the state store, the report outbox, tarball selection."""

from __future__ import annotations

import datetime as dt
import re

import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from kohakuriver_proto.lifecycle import TaskStatus
from kohakuriver_proto.models import ExecuteRequest, StatusUpdate
from kohakuriver_runner.host_client import Reporter
from kohakuriver_runner.images import env_image_ref, newest_tarball
from kohakuriver_runner.logs import LineTail, _tail_file_sync, tail_file
from kohakuriver_runner.state import Phase, StateStore, TaskState


def last_lines(data: bytes, n: int) -> bytes:
    lines = re.findall(rb"[^\n]*\n|[^\n]+$", data)
    return b"".join(lines[-n:]) if n > 0 else b""


text = st.binary(max_size=300).map(lambda b: b.replace(b"\r", b"x"))


@given(data=text, n=st.integers(0, 8), cuts=st.lists(st.integers(0, 300), max_size=6))
def test_line_tail_is_split_independent(data, n, cuts):
    tail = LineTail(n)
    points = sorted({min(c, len(data)) for c in cuts})
    start = 0
    for point in [*points, len(data)]:
        tail.feed(data[start:point])
        start = point
    assert tail.result() == last_lines(data, n)


@given(data=text, n=st.integers(0, 8))
def test_file_tail_matches(tmp_path_factory, data, n):
    path = tmp_path_factory.mktemp("tail") / "f.log"
    path.write_bytes(data)
    assert _tail_file_sync(path, n) == last_lines(data, n)
    assert _tail_file_sync(path, None) == data


async def test_file_tail_reads_backwards_over_blocks(tmp_path):
    path = tmp_path / "big.log"
    path.write_bytes(b"".join(b"line %d %s\n" % (i, b"x" * 100) for i in range(5000)))
    assert await tail_file(path, 2) == b"line 4998 " + b"x" * 100 + b"\nline 4999 " + b"x" * 100 + b"\n"
    assert await tail_file(tmp_path / "missing.log", 5) == b""


def test_very_long_lines_are_bounded():
    tail = LineTail(2)
    for _ in range(40):
        tail.feed(b"y" * 100_000)
    assert len(tail.result()) <= (1 << 20)


async def test_state_store_round_trip_and_bad_records(tmp_path):
    store = StateStore(tmp_path / "state")
    await store.open()
    request = ExecuteRequest(task_id=77, command="echo", arguments=["hi"], env_vars={"A": "b"})
    now = dt.datetime(2025, 5, 1, tzinfo=dt.UTC)
    report = StatusUpdate(task_id=77, status=TaskStatus.FAILED, exit_code=3, message="exit code 3")
    entry = TaskState(
        task_id=77,
        request=request,
        phase=Phase.FINISHED,
        container_id="abc",
        killed_by_user=True,
        accepted_at=now,
        final_report=report,
    )
    await store.save(entry)
    await store.save(TaskState(task_id=78, accepted_at=now))
    (tmp_path / "state" / "tasks" / "79.json").write_text("{not json")
    (tmp_path / "state" / "tasks" / ".80.json.1234.tmp").write_text("half")

    again = StateStore(tmp_path / "state")
    await again.open()
    assert again.get(77) == entry
    assert again.get(78).request is None
    assert again.get(79) is None
    assert (tmp_path / "state" / "tasks" / "79.json.bad").exists()
    assert not (tmp_path / "state" / "tasks" / ".80.json.1234.tmp").exists()
    assert again.get(77).final_report == report
    await again.delete(77)
    assert not (tmp_path / "state" / "tasks" / "77.json").exists()
    assert again.get(77) is None


async def test_reporter_keeps_order_and_coalesces_progress():
    reporter = Reporter()
    reporter.progress(1, "pulling 1/3")
    reporter.progress(1, "pulling 2/3")
    reporter.progress(2, "loading")
    running = StatusUpdate(task_id=1, status=TaskStatus.RUNNING)
    reporter.send(running)  # drops task 1's stale progress
    final = StatusUpdate(task_id=1, status=TaskStatus.COMPLETED, exit_code=0)
    reporter.send_final(final)
    reporter.send_final(final)  # queued once
    queued = [(i.update.task_id, i.update.status, i.update.message) for i in reporter._queue]
    assert queued == [
        (2, TaskStatus.ASSIGNING, "loading"),
        (1, TaskStatus.RUNNING, None),
        (1, TaskStatus.COMPLETED, None),
    ]
    acknowledged: list[StatusUpdate] = []

    async def on_delivered(update: StatusUpdate) -> None:
        acknowledged.append(update)

    reporter.on_final_delivered = on_delivered
    assert reporter.pending_finals() == [final]
    await reporter.delivered([final])  # e.g. carried by a heartbeat
    assert acknowledged == [final]
    assert reporter.pending_finals() == []
    assert len(reporter._queue) == 2


def test_newest_tarball_and_image_name(tmp_path):
    for name in (
        "torch-100.tar",
        "torch-300.tar",
        "Torch-200.tar",
        "torch-400.tar.part",
        "torchvision-999.tar",
    ):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "torch-500.tar").mkdir()  # not a file
    assert newest_tarball(tmp_path, "torch") == (300, tmp_path / "torch-300.tar")
    assert newest_tarball(tmp_path, "TORCH")[0] == 300
    assert newest_tarball(tmp_path, "jax") is None
    assert newest_tarball(tmp_path / "missing", "torch") is None
    assert env_image_ref("MyEnv") == "kohakuriver/myenv:base"


async def test_reporter_copes_with_reports_acknowledged_while_it_waits(nursery):
    """A heartbeat may acknowledge a final report while the outbox waits for registration."""

    class Host:
        def __init__(self) -> None:
            self.registered = trio.Event()
            self.posted: list[StatusUpdate] = []

        async def post_update(self, update: StatusUpdate) -> str:
            self.posted.append(update)
            return "ok"

    host = Host()
    reporter = Reporter()
    nursery.start_soon(reporter.run, host)
    final = StatusUpdate(task_id=5, status=TaskStatus.FAILED, exit_code=1)
    reporter.send_final(final)
    await trio.testing.wait_all_tasks_blocked()
    await reporter.delivered([final])
    host.registered.set()
    await trio.testing.wait_all_tasks_blocked()
    assert host.posted == []
    later = StatusUpdate(task_id=6, status=TaskStatus.RUNNING)
    reporter.send(later)
    await trio.testing.wait_all_tasks_blocked()
    assert host.posted == [later]
