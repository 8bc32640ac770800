"""Terminal sessions in a VM (``vm_terminal``, and ``api_terminal``'s dispatch to it) against a real sshd.

The sshd of ``test_vm_ssh.running_sshd`` stands in for the VM's: root logs in with the runner's management
key, the host key is pinned. ``serve_terminal`` is driven with a stand-in WebSocket and a runtime whose
``vm_terminal_target`` names that sshd and whose Docker is unavailable: a VM session must not need it.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

import attrs
import psutil
import pytest
import trio

from kohakuriver_proto import terminal as term
from kohakuriver_runner.api_terminal import serve_terminal
from kohakuriver_runner.tunnel_server import HeldContainer
from kohakuriver_runner.vm_terminal import SESSION_VARIABLE, VmSession, open_vm_session

from .test_vm_ssh import ssh_children
from .test_vm_ssh import sshd as sshd  # the fixture


async def collect(session: VmSession, into: dict[Any, bytearray]) -> None:
    while (piece := await session.receive()) is not None:
        into.setdefault(piece[0], bytearray()).extend(piece[1])


async def read_until(session: VmSession, needle: bytes, seen: bytearray) -> None:
    with trio.fail_after(15):
        while needle not in seen:
            piece = await session.receive()
            assert piece is not None, bytes(seen)
            seen += piece[1]


def remote(pattern: str) -> list[psutil.Process]:
    """Processes of the "VM" (this machine: the sshd is local) whose command line holds ``pattern``."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        if process.info["status"] != psutil.STATUS_ZOMBIE and pattern in " ".join(
            process.info["cmdline"] or ()
        ):
            found.append(process)
    return found


async def wait_remote(pattern: str, *, present: bool, timeout: float = 15) -> None:
    """Until a process whose command line holds ``pattern`` runs (``present``) or none does."""
    with trio.fail_after(timeout):
        while bool(remote(pattern)) is not present:
            await trio.sleep(0.05)


# -- vm_terminal ------------------------------------------------------------------------------------------


async def test_tty_session_size_resize_term_and_exit_code(sshd):
    request = term.StartRequest(tty=True, rows=31, cols=101, env={"TERM": "vt220"})
    seen = bytearray()
    async with open_vm_session(sshd.target, request) as session:
        await session.send_input(b"stty size; echo $TERM; tty\n")
        await read_until(session, b"31 101\r\nvt220\r\n/dev/pts/", seen)
        session.resize(42, 123)
        await session.send_input(b"stty size\n")
        await read_until(session, b"42 123", seen)
        # Input is passed raw: ^C reaches the VM's foreground job, not the local ssh.
        await session.send_input(b"sleep 30\n")
        await trio.sleep(0.3)
        await session.send_input(b"\x03")
        await session.send_input(b"echo after-interrupt $?\n")
        await read_until(session, b"after-interrupt 130", seen)
        await session.send_input(b"exit 5\n")
        rest: dict[Any, bytearray] = {}
        with trio.fail_after(15):
            await collect(session, rest)
            assert await session.wait() == 5
    assert await session.failure() is None
    assert ssh_children() == []


async def test_tty_command_and_sshd_login_shell(sshd):
    # A command with a TTY: its output, CR LF as a terminal gives it, its status.
    request = term.StartRequest(tty=True, command=["sh", "-c", "printf 'a\\nb\\n'; exit 3"])
    out: dict[Any, bytearray] = {}
    async with open_vm_session(sshd.target, request) as session:
        with trio.fail_after(15):
            await collect(session, out)
            assert await session.wait() == 3
    assert bytes(out[None]) == b"a\r\nb\r\n"


async def test_non_tty_separate_streams_stdin_eof_and_status(sshd):
    payload = b"hello\n" + bytes(range(256)) * 600  # binary, larger than one pipe read
    request = term.StartRequest(tty=False, command=["sh", "-c", "cat; echo err >&2; exit 4"])
    out: dict[Any, bytearray] = {}
    async with open_vm_session(sshd.target, request) as session:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect, session, out)
            await session.send_input(payload[:1000])
            await session.send_input(payload[1000:])
            await session.close_input()
        assert await session.wait() == 4
    assert bytes(out[term.Stream.STDOUT]) == payload and bytes(out[term.Stream.STDERR]) == b"err\n"
    assert None not in out


async def test_user_workdir_and_variables_apply_in_the_vm(sshd):
    script = 'echo "$(id -u):$(id -g) $(pwd) $HOME [$GREETING]"'
    cases = [
        ({}, "0:0 /root /root [x y $(id) 'q']"),
        ({"user": "nobody", "workdir": "/tmp"}, "65534:65534 /tmp /nonexistent [x y $(id) 'q']"),
        ({"user": "4321:4322", "workdir": "/"}, "4321:4322 / / [x y $(id) 'q']"),
    ]
    for extra, expected in cases:
        request = term.StartRequest(
            tty=False, command=["sh", "-c", script], env={"GREETING": "x y $(id) 'q'"}, **extra
        )
        out: dict[Any, bytearray] = {}
        async with open_vm_session(sshd.target, request) as session:
            with trio.fail_after(15):
                await collect(session, out)
            assert await session.wait() == 0, out
        assert bytes(out[term.Stream.STDOUT]).decode().strip() == expected, extra

    # An unknown user name and a missing directory are refused in the VM, as Docker refuses them.
    for extra, words in (
        ({"user": "no-such-user"}, b"unable to find user"),
        ({"workdir": "/nope"}, b"/nope"),
    ):
        out = {}
        request = term.StartRequest(tty=False, command=["true"], **extra)
        async with open_vm_session(sshd.target, request) as session:
            with trio.fail_after(15):
                await collect(session, out)
            assert await session.wait() == 126
        assert words in bytes(out[term.Stream.STDERR])


async def test_another_host_key_ends_with_255_and_the_reason(sshd):
    impostor = attrs.evolve(sshd.target, host_public_key=sshd.other_host_key)
    for tty in (False, True):
        out: dict[Any, bytearray] = {}
        async with open_vm_session(impostor, term.StartRequest(tty=tty, command=["true"])) as session:
            with trio.fail_after(15):
                await collect(session, out)
            assert await session.wait() == 255
            reason = await session.failure()
        assert reason is not None and "pinned" in reason
        assert b"REMOTE HOST IDENTIFICATION" not in b"".join(out.values())  # ssh's banner stays in its log


async def test_a_client_that_goes_away_ends_ssh_and_the_remote_processes(sshd):
    for tty in (True, False):
        marker = f"4{secrets.randbelow(10**6):06d}.5"
        request = term.StartRequest(tty=tty, command=["sh"])
        async with open_vm_session(sshd.target, request) as session:
            await session.send_input(f"sleep {marker}; echo finished\n".encode())
            await wait_remote(f"sleep {marker}", present=True)
            if not tty:
                environ = remote(f"sleep {marker}")[0].environ()
                assert environ.get(SESSION_VARIABLE) == session.session_id
            ssh = psutil.Process(session.process.pid)
        # Leaving the session with the process running is a hang-up.
        assert session.process.returncode is not None and not ssh.is_running()
        await wait_remote(f"sleep {marker}", present=False)
        assert ssh_children() == []


# -- api_terminal's dispatch --------------------------------------------------------------------------------


class FakeWs:
    """The part of Quart's websocket that ``serve_terminal`` uses. The test feeds client messages into
    ``incoming`` and reads what the server sent from ``sent``."""

    def __init__(self) -> None:
        self.incoming, self._receive = trio.open_memory_channel[Any](100)
        self.sent: list[str | bytes] = []
        self.closed: tuple[int, str] | None = None
        self._changed = trio.Event()

    async def receive(self) -> str | bytes:
        return await self._receive.receive()

    async def send(self, message: str | bytes) -> None:
        self.sent.append(message)
        self._changed.set()
        self._changed = trio.Event()

    async def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)
        self._changed.set()

    async def wait(self, predicate, timeout: float = 15) -> None:
        with trio.fail_after(timeout):
            while not predicate():
                await self._changed.wait()

    def output(self, tty: bool) -> dict[Any, bytes]:
        client = term.TerminalClient(term.StartRequest(tty=tty))
        client.start()
        got: dict[Any, bytearray] = {}
        for message in self.sent:
            for event in client.receive(message):
                if isinstance(event, term.Output):
                    got.setdefault(event.stream, bytearray()).extend(event.data)
        return {k: bytes(v) for k, v in got.items()}

    def texts(self) -> list[dict]:
        return [json.loads(m) for m in self.sent if isinstance(m, str)]


@attrs.define
class FakeTunnels:
    held: dict[str, HeldContainer]

    def lookup(self, ref: str) -> HeldContainer | None:
        return self.held.get(ref)


@attrs.define
class DockerDown:
    available: bool = False
    error: str = "the engine is not running"


@attrs.define
class VmRuntime:
    """What ``serve_terminal`` reads from the daemon's ``Runtime`` for a VM: the task directory and the
    ``vm_terminal_target`` the lead wires in; Docker is down and has no client at all."""

    tunnels: FakeTunnels
    targets: dict[int, Any]
    docker_status: DockerDown = attrs.field(factory=DockerDown)
    docker: None = None

    def vm_terminal_target(self, task_id: int) -> Any:
        return self.targets.get(task_id)


def vm_runtime(sshd, *, running: bool = True) -> VmRuntime:
    tid = sshd.target.task_id
    held = HeldContainer(
        task_id=tid, name=f"vm-{tid}", running=running, status="running" if running else "paused"
    )
    return VmRuntime(tunnels=FakeTunnels({str(tid): held}), targets={tid: sshd.target})


async def test_serve_terminal_runs_a_vm_session_without_docker(sshd):
    runtime = vm_runtime(sshd)
    ref = str(sshd.target.task_id)

    # Without a TTY: separate streams, stdin and its EOF, the exit status, a clean close.
    ws = FakeWs()
    request = term.StartRequest(tty=False, command=["sh", "-c", "cat; echo err >&2; exit 6"])
    await ws.incoming.send(request.encode())
    await ws.incoming.send(b"from stdin")
    await ws.incoming.send(term.encode_eof())
    with trio.fail_after(30):
        await serve_terminal(runtime, ref, ws)
    assert ws.texts()[0] == {"started": True} and ws.texts()[-1] == {"exit": 6}
    assert ws.output(False) == {term.Stream.STDOUT: b"from stdin", term.Stream.STDERR: b"err\n"}
    assert ws.closed == (1000, "exited")

    # With a TTY: the start size, a resize message, the exit status.
    ws = FakeWs()
    await ws.incoming.send(term.StartRequest(tty=True, rows=20, cols=70).encode())
    await ws.incoming.send(b"stty size\n")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_terminal, runtime, ref, ws)
        await ws.wait(lambda: b"20 70" in ws.output(True).get(term.Stream.STDOUT, b""))
        await ws.incoming.send(json.dumps({"resize": [33, 90]}))
        await ws.incoming.send(b"stty size; exit 2\n")
        await ws.wait(lambda: ws.closed is not None, timeout=30)
    assert b"33 90" in ws.output(True)[term.Stream.STDOUT]
    assert ws.texts()[-1] == {"exit": 2} and ws.closed == (1000, "exited")
    assert ssh_children() == []


async def test_serve_terminal_vm_failures_and_refusals(sshd):
    ref = str(sshd.target.task_id)

    # ssh cannot get in (another host key): the reason on stderr and 255, as a program that cannot start.
    runtime = vm_runtime(sshd)
    runtime.targets[sshd.target.task_id] = attrs.evolve(sshd.target, host_public_key=sshd.other_host_key)
    ws = FakeWs()
    await ws.incoming.send(term.StartRequest(tty=False, command=["true"]).encode())
    with trio.fail_after(30):
        await serve_terminal(runtime, ref, ws)
    assert ws.texts()[-1] == {"exit": 255}
    stderr = ws.output(False)[term.Stream.STDERR]
    assert stderr.startswith(b"kohakuriver: ") and b"pinned" in stderr

    # The refusals keep their codes: unknown task, a task that is not running, a bad start request.
    for runtime, ref_, start, code in (
        (vm_runtime(sshd), "999", term.StartRequest(tty=False, command=["true"]).encode(), "not_found"),
        (vm_runtime(sshd, running=False), ref, term.StartRequest(tty=False).encode(), "not_running"),
        (vm_runtime(sshd), ref, '{"tty": true, "command": "rm -rf /"}', "bad_request"),
    ):
        ws = FakeWs()
        await ws.incoming.send(start)
        with trio.fail_after(30):
            await serve_terminal(runtime, ref_, ws)
        assert ws.texts()[-1]["code"] == code and ws.closed == (1008, code)

    # A bad message during the session: refused by name, and the session in the VM is hung up.
    ws = FakeWs()
    await ws.incoming.send(term.StartRequest(tty=False, command=["sleep", "4242.25"]).encode())
    await ws.incoming.send('{"resize": "big"}')
    with trio.fail_after(30):
        await serve_terminal(vm_runtime(sshd), ref, ws)
    assert ws.texts()[0] == {"started": True} and ws.texts()[-1]["code"] == "bad_request"
    assert ws.closed == (1008, "bad_request")
    await wait_remote("sleep 4242.25", present=False)


async def test_serve_terminal_client_gone_hangs_the_vm_session_up(sshd):
    runtime = vm_runtime(sshd)
    for tty in (True, False):
        marker = f"5{secrets.randbelow(10**6):06d}.5"
        ws = FakeWs()
        await ws.incoming.send(term.StartRequest(tty=tty, command=["sh"]).encode())
        await ws.incoming.send(f"sleep {marker}; echo finished\n".encode())
        with trio.CancelScope() as handler:  # Quart cancels the handler when its client disconnects
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve_terminal, runtime, str(sshd.target.task_id), ws)
                await wait_remote(f"sleep {marker}", present=True)
                handler.cancel()
        await wait_remote(f"sleep {marker}", present=False)
        assert ssh_children() == []
        assert {"exit": 0} not in ws.texts()


@pytest.mark.parametrize("tty", [True, False])
async def test_no_session_variable_leaks_into_a_tty(sshd, tty):
    """The hang-up marker is there exactly where it is needed: in non-TTY sessions."""
    request = term.StartRequest(tty=tty, command=["sh", "-c", f'echo "[${SESSION_VARIABLE}]"'])
    out: dict[Any, bytearray] = {}
    async with open_vm_session(sshd.target, request) as session:
        with trio.fail_after(15):
            await collect(session, out)
        await session.wait()
    text = b"".join(out.values()).decode()
    assert (text.strip() == "[]") is tty
