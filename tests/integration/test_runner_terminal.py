"""The runner's ``/ws/terminal/{task_id}`` and ``docker_exec`` against a real runner and busybox containers.

A runner daemon runs in the test's nursery (``_runner_harness``); the test process plays the host with
trio-websocket and the protocol library's ``TerminalClient``.
"""

from __future__ import annotations

import json

import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from kohakuriver_proto import terminal as term
from kohakuriver_proto.session_opening import RefusalCode, refused
from kohakuriver_runner.container_spec import container_name
from kohakuriver_runner.docker_exec import ExecConfig, create_exec, exec_exit_code, start_exec

from ._runner_harness import TOKEN, new_task_id, req, runner_rig

pytestmark = [pytest.mark.docker, pytest.mark.slow]


@pytest.fixture
async def rig(nursery, tmp_path):
    async with runner_rig(nursery, tmp_path) as r:
        yield r


async def running_task(rig):
    """A runner and a task whose container sleeps: what terminals attach to."""
    runner = await rig.start("a")
    tid = new_task_id()
    resp = await runner.execute(req(tid, "sleep", "600"))
    assert resp.status_code == 202, resp.text
    await rig.host.wait_status(tid, "running", timeout=30)
    return runner, tid


def url(runner, ref) -> str:
    return f"ws://127.0.0.1:{runner.config.RUNNER_PORT}/ws/terminal/{ref}"


AUTH = [(b"Authorization", f"Bearer {TOKEN}".encode())]


class Result:
    def __init__(self) -> None:
        self.events: list = []
        self.out = bytearray()
        self.err = bytearray()
        self.exit: int | None = None
        self.close: term.Closed | None = None

    @property
    def refused(self) -> str | None:
        return next((e.reason for e in self.events if isinstance(e, term.Refused)), None)

    @property
    def refusal_code(self) -> RefusalCode | None:
        """The code as a client reads it, from the message (``code``) and from the close (its reason)."""
        event = next(e for e in self.events if isinstance(e, term.Refused))
        assert self.close is not None
        from_close = refused("", self.close.code, self.close.reason).code
        from_message = refused(event.reason, None, "", code_name=event.code_name).code
        assert from_close is from_message, (from_close, from_message)
        return from_close


async def session(target: str, request: term.StartRequest, stdin: list = (), headers=AUTH) -> Result:
    """One whole non-interactive session: send ``stdin`` (bytes, or text control messages) after the start."""
    result = Result()
    client = term.TerminalClient(request)
    with trio.fail_after(20):
        async with open_websocket_url(target, extra_headers=headers) as ws:
            await ws.send_message(client.start())
            sent = False
            try:
                while True:
                    message = await ws.get_message()
                    for event in client.receive(message):
                        result.events.append(event)
                        if isinstance(event, term.Started) and not sent:
                            sent = True
                            for item in stdin:
                                await ws.send_message(item)
                        elif isinstance(event, term.Output):
                            target_buf = result.err if event.stream is term.Stream.STDERR else result.out
                            target_buf += event.data
                        elif isinstance(event, term.Exited):
                            result.exit = event.code
            except ConnectionClosed as exc:
                result.close = client.closed(exc.reason.code, exc.reason.reason or "")
    return result


async def test_exit_codes_and_separate_stdout_stderr(rig):
    runner, tid = await running_task(rig)
    script = "echo out; echo err >&2; echo more; exit 3"
    r = await session(url(runner, tid), term.StartRequest(tty=False, command=["sh", "-c", script]))
    assert (bytes(r.out), bytes(r.err), r.exit) == (b"out\nmore\n", b"err\n", 3)
    assert r.close is not None and r.close.clean and r.close.code == 1000
    assert isinstance(r.events[0], term.Started)

    r = await session(url(runner, container_name(tid)), term.StartRequest(tty=False, command=["true"]))
    assert (r.exit, bytes(r.out), bytes(r.err)) == (0, b"", b"")

    # A program that does not exist: the engine's note on stderr, and a shell's 127.
    r = await session(url(runner, tid), term.StartRequest(tty=False, command=["no-such-program"]))
    assert r.exit == 127 and b"no-such-program" in r.err and r.out == b""


async def test_stdin_reaches_cat_and_eof_ends_it(rig):
    runner, tid = await running_task(rig)
    payload = b"hello\n" + bytes(range(256)) * 400  # binary, and larger than one read
    r = await session(
        url(runner, tid),
        term.StartRequest(tty=False, command=["cat"]),
        stdin=[payload[:1000], payload[1000:], term.encode_eof()],
    )
    assert r.exit == 0 and bytes(r.out) == payload and r.err == b""

    # env, user and workdir reach the process.
    r = await session(
        url(runner, tid),
        term.StartRequest(
            tty=False, command=["sh", "-c", 'echo "$GREETING $(id -u) $(pwd)"'], env={"GREETING": "hi"},
            user="65534", workdir="/tmp",
        ),
    )  # fmt: skip
    assert (r.exit, bytes(r.out)) == (0, b"hi 65534 /tmp\n")


async def read_until(ws, client: term.TerminalClient, needle: bytes, seen: bytearray) -> None:
    with trio.fail_after(10):
        while needle not in seen:
            for event in client.receive(await ws.get_message()):
                if isinstance(event, term.Output):
                    seen += event.data


async def test_tty_login_shell_with_resize(rig):
    runner, tid = await running_task(rig)
    client = term.TerminalClient(term.StartRequest(tty=True, rows=31, cols=101))
    seen = bytearray()
    async with open_websocket_url(url(runner, tid), extra_headers=AUTH) as ws:
        await ws.send_message(client.start())
        assert client.receive(await ws.get_message()) == [term.Started()]
        await ws.send_message(client.stdin(b"stty size; echo $TERM\n"))
        await read_until(ws, client, b"31 101\r\nxterm-256color", seen)
        await ws.send_message(client.resize(42, 123))
        await ws.send_message(client.stdin(b"stty size\n"))
        await read_until(ws, client, b"42 123", seen)
        await ws.send_message(client.stdin(b"exit 5\n"))
        exit_code = None
        with trio.fail_after(10):
            try:
                while True:
                    for event in client.receive(await ws.get_message()):
                        if isinstance(event, term.Exited):
                            exit_code = event.code
            except ConnectionClosed as exc:
                assert exc.reason.code == 1000
    assert exit_code == 5


async def test_refusals(rig):
    runner, tid = await running_task(rig)
    ok = term.StartRequest(tty=False, command=["true"])
    for ref in (str(new_task_id()), "kohakuriver-task-1", "x" * 300):
        r = await session(url(runner, ref), ok)
        assert r.refused is not None and "holds no task" in r.refused
        assert r.close is not None and r.close.code == 1008 and not r.close.clean
        assert r.refusal_code is RefusalCode.NOT_FOUND

    # A malformed start request is refused by name, before anything runs.
    with trio.fail_after(10):
        async with open_websocket_url(url(runner, tid), extra_headers=AUTH) as ws:
            await ws.send_message('{"tty": true, "command": "rm -rf /"}')
            answer = await ws.get_message()
            assert "command" in answer and json.loads(answer)["code"] == "bad_request"
            with pytest.raises(ConnectionClosed) as info:
                await ws.get_message()
            assert (info.value.reason.code, info.value.reason.reason) == (1008, "bad_request")

    # No cluster token: refused before the upgrade.
    with pytest.raises(ConnectionRejected) as rejected:
        await session(url(runner, tid), ok, headers=[])
    assert rejected.value.status_code == 401

    # A paused task cannot run commands.
    await rig.docker.pause(container_name(tid))
    try:
        r = await session(url(runner, tid), ok)
        assert r.refused is not None and "paused" in r.refused and r.close.code == 1008
        assert r.refusal_code is RefusalCode.NOT_RUNNING
    finally:
        await rig.docker.unpause(container_name(tid))


async def test_docker_exec_directly(rig):
    """``docker_exec`` alone: the hijacked stream without a TTY, stdin half-close, exit code."""
    _runner, tid = await running_task(rig)
    docker = rig.docker
    exec_id = await create_exec(
        docker, container_name(tid), ExecConfig(command=["sh", "-c", "cat; echo bye >&2; exit 7"])
    )
    stream = await start_exec(docker, exec_id, tty=False)
    try:
        await stream.send_input(b"abc")
        await stream.close_input()
        got = []
        with trio.fail_after(10):
            while (piece := await stream.receive()) is not None:
                got.append((piece[0].name, piece[1]))
    finally:
        await stream.aclose()
    # Each stream's bytes in order; the two streams are separate pipes the engine reads side by side, so
    # under load stderr's line may come first.
    streams = {name: b"".join(data for kind, data in got if kind == name) for name in ("STDOUT", "STDERR")}
    assert streams == {"STDOUT": b"abc", "STDERR": b"bye\n"}, got
    assert await exec_exit_code(docker, exec_id) == 7


async def processes(rig, tid) -> str:
    result = await rig.docker.exec_run(container_name(tid), ["ps", "-o", "args"])
    return result.stdout.decode()


async def test_a_client_that_goes_away_hangs_the_session_up(rig):
    runner, tid = await running_task(rig)
    for tty in (True, False):
        client = term.TerminalClient(term.StartRequest(tty=tty, command=["sh"]))
        async with open_websocket_url(url(runner, tid), extra_headers=AUTH) as ws:
            await ws.send_message(client.start())
            assert client.receive(await ws.get_message()) == [term.Started()]
            await ws.send_message(client.stdin(b"sleep 4321; echo finished\n"))
            with trio.fail_after(10):
                while "sleep 4321" not in await processes(rig, tid):
                    await trio.sleep(0.05)
        # The WebSocket is gone, the shell and its foreground job with it (a TTY exec would stay forever).
        with trio.fail_after(10):
            while "sleep 4321" in (ps := await processes(rig, tid)) or "\nsh\n" in ps:
                await trio.sleep(0.05)
