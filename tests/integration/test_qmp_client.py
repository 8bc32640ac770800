"""The QMP client against a real QEMU, started as a child of the test (no guest: QMP needs none).

``-machine none`` for the plain protocol; ``-machine q35 -accel tcg -S`` (no disk: the firmware idles looking
for one) where the guest's run state matters: ``cont``/``stop`` give ``RESUME``/``STOP``, ``quit`` gives
``SHUTDOWN``. Without QEMU the tests are skipped, except under ``CI=true``, where they fail: scripts/setup.sh
installs it. The last tests put a scripted peer on the socket instead, for what QEMU does not do on demand
(break the protocol, flood events); they need no QEMU.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from kohakuriver_runner.qmp_client import (
    QmpCommandError,
    QmpConnectionError,
    QmpTimeout,
    VmRunState,
    open_qmp,
)

QEMU = shutil.which("qemu-system-x86_64")
NO_MACHINE = ["-machine", "none"]
Q35_PAUSED = ["-machine", "q35", "-accel", "tcg", "-m", "64", "-S"]


@pytest.fixture(scope="module")
def qemu() -> str:
    if QEMU is None:
        message = "qemu-system-x86_64 is not installed (scripts/setup.sh installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return QEMU


class Qemu:
    def __init__(self, process: trio.Process, socket: Path, log: Path) -> None:
        self.process = process
        self.socket = socket
        self.log = log

    def gone(self) -> bool:
        try:
            os.kill(self.process.pid, 0)
        except ProcessLookupError:
            return True
        return False


@asynccontextmanager
async def running_qemu(binary: str, tmp_path: Path, machine: list[str]) -> AsyncIterator[Qemu]:
    """QEMU as our child; killed and reaped at the end whatever happened (also when cancelled)."""
    socket = tmp_path / "qmp.sock"
    log = tmp_path / "qemu.log"
    argv = [binary, *machine, "-nodefaults", "-display", "none", "-qmp", f"unix:{socket},server=on,wait=off"]
    with log.open("wb") as err:
        process = await trio.lowlevel.open_process(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    try:
        yield Qemu(process, socket, log)
    finally:
        with trio.CancelScope(shield=True), trio.fail_after(10):
            if process.returncode is None:
                process.send_signal(signal.SIGCONT)  # a test may have stopped it
                process.kill()
            await process.wait()


def live_tasks() -> set[trio.lowlevel.Task]:
    def walk(task: trio.lowlevel.Task):
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                yield child
                yield from walk(child)

    return set(walk(trio.lowlevel.current_root_task()))


async def test_greeting_status_commands_and_errors(qemu, tmp_path):
    version = subprocess.run([qemu, "--version"], capture_output=True, text=True, check=True).stdout
    major, minor, micro = (int(x) for x in re.search(r"version (\d+)\.(\d+)\.(\d+)", version).groups())
    async with running_qemu(qemu, tmp_path, NO_MACHINE) as vm, open_qmp(vm.socket) as qmp:
        assert qmp.greeting.version == (major, minor, micro)
        assert await qmp.query_status() == VmRunState(status="running", running=True)

        with pytest.raises(QmpCommandError) as failed:
            await qmp.execute("no-such-command")
        assert failed.value.error_class == "CommandNotFound"
        assert failed.value.command == "no-such-command"
        assert "no-such-command" in failed.value.description

        with pytest.raises(QmpCommandError) as failed:  # arguments reach QEMU: a wrong one is refused
            await qmp.execute("qom-list", path="/no/such/object")
        assert failed.value.error_class in ("GenericError", "DeviceNotFound")

        # The connection survives its errors; keyword and mapping arguments both arrive.
        children = await qmp.execute("qom-list", path="/machine")
        assert {"name": "type", "type": "string"} in children
        assert await qmp.execute("qom-get", {"path": "/machine", "property": "type"}) == "none-machine"
        assert f"{major}.{minor}.{micro}" in await qmp.human_monitor_command("info version")

        # Pipelined commands from many tasks are matched to their answers.
        results: dict[int, object] = {}

        async def one(i: int) -> None:
            results[i] = await qmp.execute("qom-get", {"path": "/machine", "property": "type"})

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(one, i)
        assert results == dict.fromkeys(range(20), "none-machine")


async def test_pause_resume_and_quit_events(qemu, tmp_path):
    async with running_qemu(qemu, tmp_path, Q35_PAUSED) as vm, open_qmp(vm.socket) as qmp:
        assert await qmp.query_status() == VmRunState(status="prelaunch", running=False)
        await qmp.cont()
        resume = await qmp.wait_event("RESUME", timeout=10)
        assert resume.seconds > 0 and resume.data == {}
        assert await qmp.query_status() == VmRunState(status="running", running=True)

        await qmp.stop()
        assert (await qmp.next_event()).name == "STOP"  # QEMU sends it before stop's answer
        assert await qmp.query_status() == VmRunState(status="paused", running=False)

        await qmp.quit()
        names = [event.name async for event in qmp]  # ends when QEMU closes the socket
        assert names == ["SHUTDOWN"]
        assert qmp.closed and qmp.dropped_events == 0
        with pytest.raises(QmpConnectionError, match="closed the QMP connection"):
            await qmp.query_status()
        with trio.fail_after(10):
            assert await vm.process.wait() == 0


async def test_qemu_killed_with_commands_pending(qemu, tmp_path):
    async with running_qemu(qemu, tmp_path, NO_MACHINE) as vm, open_qmp(vm.socket) as qmp:
        vm.process.send_signal(signal.SIGSTOP)  # it reads nothing more: the commands stay unanswered
        failures: list[Exception] = []

        async def pending(name: str) -> None:
            try:
                await qmp.execute(name, timeout=None)
            except QmpConnectionError as exc:
                failures.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pending, "query-status")
            nursery.start_soon(pending, "query-version")
            await trio.testing.wait_all_tasks_blocked()  # both are written and waiting for answers
            vm.process.kill()
            with trio.fail_after(10):
                await vm.process.wait()
        assert sorted(str(f).split(":")[0] for f in failures) == [
            "query-status got no answer",
            "query-version got no answer",
        ]
        assert all("QMP connection" in str(f) for f in failures)
        with pytest.raises(QmpConnectionError):
            await qmp.query_status()
        assert [event async for event in qmp] == []


async def test_a_slow_answer_times_out_and_is_dropped_when_it_comes(qemu, tmp_path):
    async with (
        running_qemu(qemu, tmp_path, NO_MACHINE) as vm,
        open_qmp(vm.socket, command_timeout=0.5) as qmp,
    ):
        vm.process.send_signal(signal.SIGSTOP)
        with pytest.raises(QmpTimeout, match=r"query-status within 0\.5 s"):
            await qmp.query_status()
        vm.process.send_signal(signal.SIGCONT)
        # The late answer to the first query arrives first and is dropped; this one gets its own.
        assert "qemu" in await qmp.execute("query-version", timeout=10)
        assert not qmp.closed


async def test_cancellation_leaves_no_task_socket_or_process(qemu, tmp_path):
    before = live_tasks()
    with trio.CancelScope() as scope:
        async with running_qemu(qemu, tmp_path, NO_MACHINE) as vm, open_qmp(vm.socket) as qmp:
            assert live_tasks() - before  # the reader runs
            vm.process.send_signal(signal.SIGSTOP)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(qmp.wait_event, "SHUTDOWN")
                nursery.start_soon(partial(qmp.execute, "query-status", timeout=None))  # never answered
                await trio.testing.wait_all_tasks_blocked()
                scope.cancel()
    assert scope.cancelled_caught
    assert live_tasks() == before
    assert vm.gone() and vm.process.returncode is not None


async def test_the_socket_is_released_on_exit(qemu, tmp_path):
    async with running_qemu(qemu, tmp_path, NO_MACHINE) as vm:
        with trio.CancelScope() as scope:
            async with open_qmp(vm.socket) as qmp, trio.open_nursery() as nursery:
                nursery.start_soon(qmp.next_event)  # no event comes: cancelled
                await trio.testing.wait_all_tasks_blocked()
                scope.cancel()
        # QEMU serves one client at a time: a second one gets in only because the first really left.
        async with open_qmp(vm.socket, connect_timeout=5) as again:
            assert (await again.query_status()).running


async def test_connect_timeouts(qemu, tmp_path):
    with pytest.raises(QmpTimeout, match="no QMP socket"):
        async with open_qmp(tmp_path / "missing.sock", connect_timeout=0.3):
            pass
    async with running_qemu(qemu, tmp_path, NO_MACHINE) as vm, open_qmp(vm.socket) as first:
        with pytest.raises(QmpTimeout, match="another one connected"):
            async with open_qmp(vm.socket, connect_timeout=0.5):
                pass
        assert (await first.query_status()).running  # the refused one disturbed nothing


async def test_connecting_while_qemu_starts(qemu, tmp_path):
    """The socket does not exist yet when QEMU is spawned: the client waits for it, within its deadline."""
    socket = tmp_path / "qmp.sock"
    async with trio.open_nursery() as nursery:
        opened = trio.Event()

        async def connect() -> None:
            async with open_qmp(socket, connect_timeout=20) as qmp:
                assert (await qmp.query_status()).running
                opened.set()

        nursery.start_soon(connect)
        await trio.testing.wait_all_tasks_blocked()  # the client is retrying
        assert not socket.exists()
        async with running_qemu(qemu, tmp_path, NO_MACHINE):
            with trio.fail_after(20):
                await opened.wait()


# -- a scripted peer, for what a real QEMU does not do on demand ---------------------------------------------

GREETING = b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 10}}, "capabilities": []}}\r\n'


class Lines:
    """The client's commands, one JSON object at a time (None at EOF)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffered = b""

    async def next(self) -> dict | None:
        while b"\n" not in self.buffered:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                return None
            self.buffered += chunk
        line, self.buffered = self.buffered.split(b"\n", 1)
        return json.loads(line)


@asynccontextmanager
async def scripted_peer(tmp_path: Path, script) -> AsyncIterator[Path]:
    """A Unix socket whose one client is greeted, negotiated, then handed to ``script(stream, lines)``."""
    path = tmp_path / "fake.sock"
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await listener.bind(str(path))
    listener.listen(1)

    async def serve() -> None:
        conn, _ = await listener.accept()
        stream = trio.SocketStream(conn)
        async with stream:
            await stream.send_all(GREETING)
            incoming = Lines(stream)
            caps = await incoming.next()
            await stream.send_all(json.dumps({"return": {}, "id": caps["id"]}).encode() + b"\r\n")
            await script(stream, incoming)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        try:
            yield path
        finally:
            nursery.cancel_scope.cancel()
            listener.close()


async def test_a_peer_breaking_the_protocol_fails_the_waiting_commands(tmp_path):
    async def script(stream, incoming):
        await incoming.next()
        await stream.send_all(b'{"return": {}, "id": 999}\r\n')  # an answer to nothing
        await trio.sleep_forever()

    async with scripted_peer(tmp_path, script) as path, open_qmp(path) as qmp:
        with pytest.raises(QmpConnectionError, match=r"broke the QMP protocol.*not waiting: 999"):
            await qmp.query_status()
        assert qmp.closed


async def test_unread_events_never_hold_up_the_answers(tmp_path):
    async def script(stream, incoming):
        command = await incoming.next()
        for n in range(300):
            event = {
                "event": "BLOCK_JOB_READY",
                "data": {"n": n},
                "timestamp": {"seconds": n, "microseconds": 0},
            }
            await stream.send_all(json.dumps(event).encode() + b"\r\n")
        await stream.send_all(json.dumps({"return": {"ok": 1}, "id": command["id"]}).encode() + b"\r\n")
        await trio.sleep_forever()

    async with scripted_peer(tmp_path, script) as path, open_qmp(path, event_buffer=100) as qmp:
        assert await qmp.execute("anything") == {"ok": 1}
        assert qmp.dropped_events == 200
        assert [(await qmp.next_event()).data["n"] for _ in range(100)] == list(range(200, 300))


async def test_a_clean_close_fails_the_waiting_commands(tmp_path):
    async def script(stream, incoming):
        await incoming.next()  # then the peer closes without answering

    async with scripted_peer(tmp_path, script) as path, open_qmp(path) as qmp:
        with pytest.raises(
            QmpConnectionError, match="query-status got no answer: QEMU closed the QMP connection"
        ):
            await qmp.query_status()
