"""SSH port allocation: sequential from the start, skipping held and busy ports, persisted."""

from __future__ import annotations

import json
import socket

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from kohakuriver_runner.ssh_ports import MAX_PORT, NoFreePort, SshPorts, pick_port, port_in_use


def never(port: int) -> bool:
    return False


def test_first_port_is_the_start():
    assert pick_port(2222, set(), never) == 2222


def test_skips_held_and_busy_ports():
    busy = {2223, 2225}
    assert pick_port(2222, {2222, 2224}, busy.__contains__) == 2226


@given(
    start=st.integers(1024, 2000),
    held=st.sets(st.integers(1024, 2100), max_size=40),
    busy=st.sets(st.integers(1024, 2100), max_size=40),
)
def test_lowest_free_port(start, held, busy):
    port = pick_port(start, held, busy.__contains__)
    assert port >= start and port not in held and port not in busy
    assert all(p in held or p in busy for p in range(start, port))


def test_no_free_port():
    with pytest.raises(NoFreePort):
        pick_port(MAX_PORT - 1, {MAX_PORT - 1}, lambda p: p == MAX_PORT)


def test_bind_test_sees_a_listener():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert port_in_use("127.0.0.1", port)
    assert not port_in_use("127.0.0.1", port)


async def test_allocation_is_sequential_persisted_and_freed(tmp_path):
    path = tmp_path / "ssh_ports.json"
    # A free run of ports to play with, starting where a busy one is held by this test.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        start = busy.getsockname()[1]
        ports = SshPorts(path, start, "127.0.0.1")
        await ports.load()
        a = await ports.allocate(1)
        b = await ports.allocate(2)
    assert a > start and b > a
    assert await ports.allocate(1) == a  # asking again keeps the port
    assert json.loads(path.read_text()) == {"1": a, "2": b}

    again = SshPorts(path, start, "127.0.0.1")  # a restarted runner
    await again.load()
    assert again.get(1) == a and again.get(2) == b
    await again.release(1)
    assert again.get(1) is None
    assert json.loads(path.read_text()) == {"2": b}
    await again.claim(3, 40000)
    assert again.table() == {2: b, 3: 40000}


async def test_concurrent_allocations_get_distinct_ports(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        start = s.getsockname()[1] + 1
    ports = SshPorts(tmp_path / "p.json", start, "127.0.0.1")
    await ports.load()
    got: list[int] = []

    async def one(task_id: int) -> None:
        got.append(await ports.allocate(task_id))

    async with trio.open_nursery() as nursery:
        for task_id in range(8):
            nursery.start_soon(one, task_id)
    assert len(set(got)) == 8


async def test_unreadable_table_starts_empty(tmp_path):
    path = tmp_path / "p.json"
    path.write_text("{not json")
    ports = SshPorts(path, 2222, "127.0.0.1")
    await ports.load()
    assert ports.table() == {}
