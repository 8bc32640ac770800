"""``kr forward`` as a real process against a stand-in for the host's ``/ws/forward`` endpoint.

The stand-in speaks the host's contract (bearer token, text ``CONNECTED`` or ``Error: ...`` + close 1008/1011
whose reason is the refusal code, or prose as a host from before the codes, then binary tunnel frames) and
plays the container side itself with the ``TunnelClient`` reference machine dialing real sockets on
127.0.0.1: a TCP echo, a UDP echo, a port nothing listens on. So everything between the local socket and the
tunnel frames is the code under test; the real host/runner/container chain is covered by the end-to-end
tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket

from kohakuriver_proto.flow import CAN_SEND
from kohakuriver_proto.session_opening import RefusalCode, forward_refusal
from kohakuriver_proto.tunnel_client import (
    CloseConnection,
    CreditAvailable,
    OpenTcp,
    OpenUdp,
    SendDatagram,
    SendFrame,
    ShutdownWrite,
    TunnelClient,
    WriteData,
)

pytestmark = pytest.mark.slow

KR = str(Path(sys.executable).with_name("kr"))
TOKEN = "krt_forward-test-token"
TASK = "7001"
GONE_TASK = "7404"  # refused with 1008, as a host from before the refusal codes does for an unknown task
CHUNK = 64 * 1024
_PATH = re.compile(r"/ws/forward/([^/?]+)/(\d+)\?proto=(tcp|udp)")

# -- the container side: TunnelClient bound to real local sockets --------------------------------------------


class _Conn:
    def __init__(self) -> None:
        self.queue: deque[Any] = deque()
        self.wakeup = trio.Event()
        self.credit = trio.Event()
        self.scope = trio.CancelScope()

    def push(self, item: Any) -> None:
        self.queue.append(item)
        self.wakeup.set()

    async def pop(self) -> Any:
        while not self.queue:
            self.wakeup = trio.Event()
            await self.wakeup.wait()
        return self.queue.popleft()


_EOF, _CLOSE = object(), object()


class ContainerSide:
    """What the runner + tunnel client do for one session, collapsed: frames in, local sockets out."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        self.tc = TunnelClient()
        self.conns: dict[int, _Conn] = {}
        self.out_send, self.out_recv = trio.open_memory_channel[bytes](float("inf"))

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self._writer)
            self.dispatch(self.tc.start())
            try:
                while True:
                    message = await self.ws.get_message()
                    self.dispatch(self.tc.receive_frame(message, trio.current_time()))
            except trio_websocket.ConnectionClosed:
                pass
            nursery.cancel_scope.cancel()

    async def _writer(self) -> None:
        async for data in self.out_recv:
            await self.ws.send_message(data)

    def dispatch(self, actions: list) -> None:
        for action in actions:
            kind = type(action)
            if kind is SendFrame:
                self.out_send.send_nowait(action.data)
            elif kind in (OpenTcp, OpenUdp):
                self.conns[action.client_id] = _Conn()
                opener = self._tcp if kind is OpenTcp else self._udp
                self.nursery.start_soon(opener, action.client_id, action.port)
            elif kind in (WriteData, SendDatagram):
                self.conns[action.client_id].push(bytes(action.data))
            elif kind is ShutdownWrite:
                self.conns[action.client_id].push(_EOF)
            elif kind is CloseConnection:
                conn = self.conns.pop(action.client_id, None)
                if conn is not None:
                    conn.scope.cancel() if action.abort else conn.push(_CLOSE)
            elif kind is CreditAvailable:
                conn = self.conns.get(action.client_id)
                if conn is not None:
                    conn.credit.set()

    async def _tcp(self, cid: int, port: int) -> None:
        conn = self.conns[cid]
        with conn.scope:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError as exc:
                self.dispatch(self.tc.connect_failed(cid, f"connect to port {port}: {exc.strerror or exc}"))
                return
            async with stream, trio.open_nursery() as nursery:
                self.dispatch(self.tc.connected(cid))
                nursery.start_soon(self._tcp_reader, cid, conn, stream)
                while (item := await conn.pop()) is not _CLOSE:
                    if item is _EOF:
                        await stream.send_eof()
                        continue
                    await stream.send_all(item)
                    self.dispatch(self.tc.delivered(cid, len(item)))

    async def _tcp_reader(self, cid: int, conn: _Conn, stream: trio.SocketStream) -> None:
        while True:
            credit = self.tc.send_credit(cid)
            if credit == 0:
                if self.tc.state(cid) not in CAN_SEND:
                    return
                conn.credit = trio.Event()
                await conn.credit.wait()
                continue
            data = await stream.receive_some(min(credit or CHUNK, CHUNK))
            if not data:
                self.dispatch(self.tc.eof(cid))
                return
            self.dispatch(self.tc.data_read(cid, data))

    async def _udp(self, cid: int, port: int) -> None:
        conn = self.conns[cid]
        with conn.scope, trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            await sock.connect(("127.0.0.1", port))
            self.dispatch(self.tc.connected(cid))
            async with trio.open_nursery() as nursery:

                async def replies() -> None:
                    while True:
                        self.dispatch(self.tc.datagram(cid, await sock.recv(65536), trio.current_time()))

                nursery.start_soon(replies)
                while (item := await conn.pop()) is not _CLOSE:
                    await sock.send(item)


class StandInHost:
    """``/ws/forward/{task}/{port}?proto=`` as the host serves it; can stop, restart and change its mind."""

    def __init__(self) -> None:
        self.port = 0
        #: Refusals without a code (prose in the close reason), and with one.
        self.refuse: dict[str, str] = {GONE_TASK: f"task {GONE_TASK} not found"}
        self.coded: dict[str, tuple[RefusalCode, str]] = {}
        self.unavailable: str | None = None
        self.unavailable_answers = 0
        self.sessions = 0
        self.paths: list[str] = []
        self._scope: trio.CancelScope | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, nursery: trio.Nursery) -> None:
        self._scope = await nursery.start(self._serve)

    def stop(self) -> None:
        assert self._scope is not None
        self._scope.cancel()

    async def _serve(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                server = await nursery.start(
                    trio_websocket.serve_websocket, self._handle, "127.0.0.1", self.port, None
                )
                self.port = server.port
                task_status.started(scope)

    async def _handle(self, request: trio_websocket.WebSocketRequest) -> None:
        headers = dict(request.headers)
        if headers.get(b"authorization") != f"Bearer {TOKEN}".encode():
            body = json.dumps({"error": "unauthorized", "message": "invalid or missing API token"})
            await request.reject(401, body=body.encode())
            return
        match = _PATH.fullmatch(request.path)
        if match is None:
            await request.reject(404)
            return
        self.paths.append(request.path)
        task_id = match.group(1)
        ws = await request.accept()
        if task_id in self.refuse:
            await ws.send_message(f"Error: {self.refuse[task_id]}")
            await ws.aclose(1008, self.refuse[task_id])
            return
        if task_id in self.coded:
            refusal = forward_refusal(*self.coded[task_id])
            await ws.send_message(refusal.text)
            await ws.aclose(refusal.close_code, refusal.close_reason)
            return
        if self.unavailable:
            self.unavailable_answers += 1
            await ws.send_message(f"Error: {self.unavailable}")
            await ws.aclose(1011, self.unavailable)
            return
        self.sessions += 1
        await ws.send_message("CONNECTED")
        await ContainerSide(ws).run()


# -- local services ------------------------------------------------------------------------------------------


async def _echo(stream: trio.SocketStream) -> None:
    async with stream:
        try:
            while data := await stream.receive_some(CHUNK):
                await stream.send_all(data)
            await stream.send_eof()
        except trio.BrokenResourceError:
            pass


async def start_tcp_echo(nursery: trio.Nursery) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, _echo, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


async def start_udp_echo(nursery: trio.Nursery) -> int:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))

    async def serve() -> None:
        with sock:
            while True:
                data, addr = await sock.recvfrom(65536)
                await sock.sendto(b"echo:" + data, addr)

    nursery.start_soon(serve)
    return sock.getsockname()[1]


async def _echo_or_flood(stream: trio.SocketStream) -> None:
    """First byte ``F``: send forever (a download nobody reads); anything else: echo."""
    first = await stream.receive_some(1)
    if first == b"F":
        async with stream:
            block = b"f" * CHUNK
            with suppress(trio.BrokenResourceError):
                while True:
                    await stream.send_all(block)
    else:
        await stream.send_all(first)
        await _echo(stream)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- kr forward as a process ---------------------------------------------------------------------------------


class KrForward:
    LINE = re.compile(r"Forwarding (\S+):(\d+) -> task (\d+) port (\d+)/(tcp|udp)")

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.stderr = b""
        self.port = 0
        self.line = ""

    @property
    def stderr_text(self) -> str:
        return self.stderr.decode("utf-8", "replace")

    async def _pump_stderr(self) -> None:
        while data := await self.proc.stderr.receive_some(4096):
            self.stderr += data

    async def _read_line(self) -> None:
        buf = b""
        while b"\n" not in buf:
            data = await self.proc.stdout.receive_some(4096)
            if not data:
                await self.proc.wait()
                return
            buf += data
        self.line = buf.decode().strip()
        match = self.LINE.fullmatch(self.line)
        assert match, self.line
        self.port = int(match.group(2))

    async def wait(self, timeout: float = 15) -> int:
        with trio.fail_after(timeout):
            return await self.proc.wait()

    async def stop(self, sig: int = signal.SIGINT) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        return await self.wait(10)


def kr_env(host: StandInHost, home: Path, token: str | None = TOKEN) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KOHAKURIVER_")}
    env.update(KOHAKURIVER_HOME=str(home), KOHAKURIVER_HOST=host.url)
    if token is not None:
        env["KOHAKURIVER_TOKEN"] = token
    return env


@asynccontextmanager
async def kr_forward(
    host: StandInHost, home: Path, task: str, port: int, *extra: str, token: str | None = TOKEN,
    expect_line: bool = True, env: dict[str, str] | None = None,
) -> AsyncIterator[KrForward]:  # fmt: skip
    argv = [KR, "forward", task, str(port), "--local-port", "0", *extra]
    env = env or kr_env(host, home, token)
    async with trio.open_nursery() as nursery:
        proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        fwd = KrForward(proc)
        try:
            nursery.start_soon(fwd._pump_stderr)
            with trio.fail_after(20):
                await fwd._read_line()
            if expect_line:
                assert fwd.port, f"no Forwarding line; exit {proc.returncode}: {fwd.stderr_text}"
            yield fwd
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGINT)
                with trio.move_on_after(10):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            await proc.stdout.aclose()


@pytest.fixture
async def host(nursery: trio.Nursery) -> StandInHost:
    server = StandInHost()
    await server.start(nursery)
    yield server
    server.stop()


async def connect(port: int) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port)


async def receive_exactly(stream: trio.SocketStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = await stream.receive_some(min(n - len(buf), 1 << 20))
        assert data, f"connection closed after {len(buf)} of {n} bytes"
        buf += data
    return bytes(buf)


async def echo_once(port: int, payload: bytes) -> bytes:
    stream = await connect(port)

    async def send() -> None:
        await stream.send_all(payload)
        await stream.send_eof()

    async with stream, trio.open_nursery() as nursery:
        nursery.start_soon(send)  # concurrently: an echo of more than the buffers would deadlock otherwise
        data = await receive_exactly(stream, len(payload))
        assert await stream.receive_some(1) == b""  # the echo's EOF comes back as a half-close
        return data


# -- tests ---------------------------------------------------------------------------------------------------


async def test_echo_through_100_concurrent_connections(host: StandInHost, tmp_path: Path, nursery) -> None:
    echo_port = await start_tcp_echo(nursery)
    # host and token from the credentials file, as `kr login` writes it
    (tmp_path / "credentials.json").write_text(json.dumps({"host": host.url, "token": TOKEN}))
    env = kr_env(host, tmp_path, token=None)
    del env["KOHAKURIVER_HOST"]
    async with kr_forward(host, tmp_path, TASK, echo_port, env=env) as fwd:
        assert fwd.line == f"Forwarding 127.0.0.1:{fwd.port} -> task {TASK} port {echo_port}/tcp"
        results: dict[int, bytes] = {}

        async def one(i: int) -> None:
            payload = f"connection {i} ".encode() * (50 + i * 37)
            results[i] = await echo_once(fwd.port, payload)
            assert results[i] == payload

        with trio.fail_after(30):
            async with trio.open_nursery() as clients:
                for i in range(100):
                    clients.start_soon(one, i)
        assert len(results) == 100
        assert host.sessions == 1  # one session multiplexes every connection
        assert host.paths == [f"/ws/forward/{TASK}/{echo_port}?proto=tcp"]
        assert await fwd.stop() == 0
    assert "Traceback" not in fwd.stderr_text


async def test_64_mib_both_ways_with_sha256(host: StandInHost, tmp_path: Path, nursery) -> None:
    echo_port = await start_tcp_echo(nursery)
    payload = os.urandom(1 << 20) * 64  # 64 MiB
    async with kr_forward(host, tmp_path, TASK, echo_port) as fwd:
        stream = await connect(fwd.port)
        received = hashlib.sha256()
        count = 0

        async def send() -> None:
            view = memoryview(payload)
            for offset in range(0, len(view), 1 << 20):
                await stream.send_all(view[offset : offset + (1 << 20)])
            await stream.send_eof()

        with trio.fail_after(60):
            async with stream, trio.open_nursery() as n:
                n.start_soon(send)
                while data := await stream.receive_some(1 << 20):
                    received.update(data)
                    count += len(data)
        assert count == len(payload)
        assert received.hexdigest() == hashlib.sha256(payload).hexdigest()


async def test_udp_request_response(host: StandInHost, tmp_path: Path, nursery) -> None:
    udp_port = await start_udp_echo(nursery)
    async with kr_forward(host, tmp_path, TASK, udp_port, "--proto", "udp") as fwd:
        assert fwd.line.endswith(f"port {udp_port}/udp")
        clients = [trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
        try:
            with trio.fail_after(15):
                for round_ in range(5):
                    for i, sock in enumerate(clients):
                        await sock.sendto(f"{i}:{round_}".encode(), ("127.0.0.1", fwd.port))
                    for i, sock in enumerate(clients):
                        data, _ = await sock.recvfrom(65536)  # each reply reaches its own sender
                        assert data == f"echo:{i}:{round_}".encode()
        finally:
            for sock in clients:
                sock.close()


async def test_refused_task_exits_with_not_found(host: StandInHost, tmp_path: Path) -> None:
    async with kr_forward(host, tmp_path, GONE_TASK, 8080, expect_line=False) as fwd:
        assert await fwd.wait() == 3
    assert fwd.line == ""
    assert f"task {GONE_TASK} not found" in fwd.stderr_text
    assert len(fwd.stderr_text.strip().splitlines()) == 1, fwd.stderr_text


@pytest.mark.parametrize(
    ("code", "reason", "exit_code"),
    [
        # Words that once made kr forward exit 4 ("token", "denied"): the code says not found.
        (RefusalCode.NOT_FOUND, "task 7410 not found (token denied)", 3),
        # And words that once meant 3: the code says not allowed.
        (RefusalCode.NOT_ALLOWED, "task 7410 not found", 4),
        (RefusalCode.BAD_REQUEST, "port must be 1..65535", 2),
    ],
)
async def test_exit_code_follows_the_refusal_code_not_its_words(
    host: StandInHost, tmp_path: Path, code: RefusalCode, reason: str, exit_code: int
) -> None:
    host.coded["7410"] = (code, reason)
    async with kr_forward(host, tmp_path, "7410", 8080, expect_line=False) as fwd:
        assert await fwd.wait() == exit_code
    assert reason in fwd.stderr_text


async def test_bad_token_exits_with_not_allowed(host: StandInHost, tmp_path: Path) -> None:
    async with kr_forward(host, tmp_path, TASK, 8080, token="krt_wrong", expect_line=False) as fwd:
        assert await fwd.wait() == 4
    assert "invalid or missing API token" in fwd.stderr_text and "401" in fwd.stderr_text


async def test_unreachable_host_exits_5(tmp_path: Path) -> None:
    nobody = StandInHost()
    nobody.port = closed_port()
    async with kr_forward(nobody, tmp_path, TASK, 8080, expect_line=False) as fwd:
        assert await fwd.wait() == 5
    assert "cannot reach the host" in fwd.stderr_text


async def test_port_in_use_is_reported(host: StandInHost, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = kr_env(host, tmp_path)
        proc = await trio.run_process(
            [KR, "forward", TASK, "9", "--local-port", str(port)], env=env, capture_stdout=True,
            capture_stderr=True, check=False,
        )  # fmt: skip
    assert proc.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr.decode()
    assert proc.stdout == b""


async def test_host_restart_reconnects_and_keeps_listener(tmp_path: Path, nursery) -> None:
    echo_port = await start_tcp_echo(nursery)
    host = StandInHost()
    await host.start(nursery)
    async with kr_forward(host, tmp_path, TASK, echo_port) as fwd:
        assert await echo_once(fwd.port, b"before") == b"before"
        host.stop()
        await trio.sleep(0.5)
        # A connection made while the host is down waits for the next session.
        early = await connect(fwd.port)
        await host.start(nursery)  # same port: SO_REUSEADDR
        with trio.fail_after(15):
            async with early:
                await early.send_all(b"during the outage")
                assert await receive_exactly(early, 17) == b"during the outage"
            assert await echo_once(fwd.port, b"after") == b"after"
        assert host.sessions == 2
        assert "reconnecting" in fwd.stderr_text and "restored" in fwd.stderr_text

        # Now the task is gone: the next session is refused, which ends kr forward.
        host.refuse[TASK] = f"task {TASK} is not running"
        host.stop()
        await host.start(nursery)
        assert await fwd.wait(20) == 3
        assert f"task {TASK} is not running" in fwd.stderr_text
    host.stop()


async def test_closed_port_closes_local_socket_with_one_message(host: StandInHost, tmp_path: Path) -> None:
    port = closed_port()
    async with kr_forward(host, tmp_path, TASK, port) as fwd:
        with trio.fail_after(15):
            for _ in range(20):
                stream = await connect(fwd.port)
                async with stream:
                    await stream.send_all(b"anyone?")
                    with suppress(trio.BrokenResourceError):  # a reset: refused on the far side
                        assert await stream.receive_some(100) == b""
        await trio.sleep(0.2)
        assert await fwd.stop() == 0
    lines = [line for line in fwd.stderr_text.splitlines() if f"connect to port {port}" in line]
    assert 1 <= len(lines) <= 2, fwd.stderr_text  # rate-limited: not one line per attempt
    assert lines[0].startswith(f"kr forward: task {TASK} port {port}: ")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_signal_exits_cleanly_with_open_connections(
    host: StandInHost, tmp_path: Path, nursery, sig: int
) -> None:
    echo_port = await start_tcp_echo(nursery)
    async with kr_forward(host, tmp_path, TASK, echo_port) as fwd:
        streams = [await connect(fwd.port) for _ in range(5)]
        for stream in streams:
            await stream.send_all(b"x")
            assert await receive_exactly(stream, 1) == b"x"
        assert await fwd.stop(sig) == 0
        for stream in streams:
            with trio.fail_after(5):
                with suppress(trio.BrokenResourceError):
                    assert await stream.receive_some(10) == b""
            await stream.aclose()
    assert "Traceback" not in fwd.stderr_text


async def test_unavailable_at_start_is_retried(host: StandInHost, tmp_path: Path, nursery) -> None:
    echo_port = await start_tcp_echo(nursery)
    host.unavailable = "container tunnel not connected"  # 1011, as for a task whose tunnel is starting

    async def tunnel_comes_up() -> None:
        while host.unavailable_answers < 2:  # kr forward was told twice, so it does retry
            await trio.sleep(0.02)
        host.unavailable = None

    nursery.start_soon(tunnel_comes_up)
    async with kr_forward(host, tmp_path, TASK, echo_port) as fwd:
        assert await echo_once(fwd.port, b"hello") == b"hello"
    assert "container tunnel not connected; retrying" in fwd.stderr_text
    assert host.sessions == 1


async def test_stalled_reader_does_not_block_others_and_memory_stays_bounded(
    host: StandInHost, tmp_path: Path, nursery
) -> None:
    listeners = await nursery.start(partial(trio.serve_tcp, _echo_or_flood, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    async with kr_forward(host, tmp_path, TASK, port) as fwd:
        assert await echo_once(fwd.port, b"warm up") == b"warm up"
        before = rss_bytes(fwd.proc.pid)
        stalled = await connect(fwd.port)
        async with stalled:
            await stalled.send_all(b"F")  # a download the local app never reads
            await trio.sleep(0.5)
            payload = os.urandom(4 << 20)
            with trio.fail_after(10):
                for _ in range(3):
                    assert await echo_once(fwd.port, payload) == payload
            growth = rss_bytes(fwd.proc.pid) - before
            # credit caps what is in flight for the stalled connection (one window, 8 MiB); without it the
            # flood would pile up in kr forward at hundreds of MB/s
            assert growth < 24 << 20, f"kr forward grew by {growth >> 20} MiB"
