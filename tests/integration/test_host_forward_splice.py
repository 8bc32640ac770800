"""What is specific to the host's zero-copy forward path (``front_door`` + ``forward_splice``).

The behaviour both forward paths share (checks, messages, codes, limits, deadlines) is
``test_host_forward.py``, which runs against this path (an in-process host without TLS). Here: bytes pass
untouched both ways, no extension is ever negotiated, bad request heads are dropped, hypercorn still serves
everything else on the same port, a real ``kr host`` stops promptly with a session open, and the hypercorn
internals the front door builds on are still what it expects.
"""

from __future__ import annotations

import base64
import inspect
import json
import os
import signal
import ssl
import subprocess
import time
from functools import partial
from importlib import metadata

import httpx
import hypercorn.trio.run
import pytest
import trio
import trio.testing
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from trio_websocket import open_websocket_url
from wsproto.frame_protocol import FrameProtocol
from wsproto.utilities import generate_accept_token

from kohakuriver_host import daemon, forward_splice
from kohakuriver_net import front_door, ws_handshake

from . import _host_harness
from ._host_harness import wait_for
from .test_host_forward import bearer, cluster, forward_runner
from .test_host_lifecycle import _self_signed

KEY = base64.b64encode(b"0123456789abcdef").decode()


def upgrade_request(path: str, token: str, *extra: str) -> bytes:
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: test",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {KEY}",
        "Sec-WebSocket-Version: 13",
        f"Authorization: Bearer {token}",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def read_head(stream: trio.SocketStream) -> tuple[bytes, bytes]:
    """An HTTP response head and the bytes after it."""
    data = b""
    with trio.fail_after(10):
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            assert chunk, f"closed after {data!r}"
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


async def read_exactly(stream: trio.SocketStream, have: bytes, n: int) -> bytes:
    with trio.fail_after(10):
        while len(have) < n:
            chunk = await stream.receive_some(65536)
            assert chunk, f"closed after {len(have)} of {n} bytes"
            have += chunk
    assert len(have) == n, (have, n)
    return have


class RawRunner:
    """A runner that speaks the forward route by hand, so the test sees every byte the host passes on."""

    def __init__(self, cluster_token: str) -> None:
        self.cluster_token = cluster_token
        self.request = b""
        self.stream: trio.SocketStream | None = None
        self.ready = trio.Event()
        self.url = ""

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        task_status.started()
        stream = await listeners[0].accept()
        head, rest = await read_head(stream)
        assert not rest
        self.request = head
        key = next(
            line.split(b":", 1)[1].strip()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        answer = (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + generate_accept_token(key) + b"\r\n\r\n"
        )
        await stream.send_all(
            answer + bytes(FrameProtocol(client=False, extensions=[]).send_data("CONNECTED"))
        )
        self.stream = stream
        self.ready.set()
        await trio.sleep_forever()


async def test_frames_pass_byte_for_byte_and_no_extension_is_negotiated(tmp_path, monkeypatch):
    async with cluster(tmp_path, monkeypatch) as c, trio.open_nursery() as nursery:
        runner = RawRunner(c.host.cluster_token)
        await nursery.start(runner.serve)
        await c.host.register("n1", runner.url)
        host, port = c.host.handle.url.removeprefix("http://").rsplit(":", 1)
        client = await trio.open_tcp_stream(host, int(port))
        offer = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"
        path = f"/ws/forward/{c.task_id}/8080?proto=tcp"
        # A HELLO-like frame right behind the request: it must wait for, then reach, the runner.
        masked = FrameProtocol(client=True, extensions=[])
        early = bytes(masked.send_data(b"\x08early"))
        await client.send_all(upgrade_request(path, c.alice, offer) + early)
        head, rest = await read_head(client)
        assert head.startswith(b"HTTP/1.1 101 ")
        assert b"\r\nSec-WebSocket-Accept: " + generate_accept_token(KEY.encode()) in head
        assert b"extensions" not in head.lower()
        server = FrameProtocol(client=False, extensions=[])
        connected = bytes(server.send_data("CONNECTED"))
        assert await read_exactly(client, rest, len(connected)) == connected
        with trio.fail_after(10):
            await runner.ready.wait()
        assert b"extensions" not in runner.request.lower()
        assert runner.request.startswith(f"GET /ws/forward/{c.task_id}/8080?proto=tcp HTTP/1.1".encode())
        assert f"\r\nAuthorization: Bearer {c.host.cluster_token}\r\n".encode() in runner.request + b"\r\n"
        # Client -> runner: masked frames of every kind, as the client wrote them.
        up = early + b"".join(
            bytes(f)
            for f in (
                masked.send_data(os.urandom(300_000)),
                masked.ping(b"p1"),
                masked.pong(b"p2"),
                masked.send_data("text"),
                masked.close(1000, "bye"),
            )
        )
        # Write and read at once: the bytes in flight may exceed what the socket buffers hold.
        async with trio.open_nursery() as io:
            io.start_soon(client.send_all, up[len(early) :])
            assert await read_exactly(runner.stream, b"", len(up)) == up
        # Runner -> client: unmasked frames, ping and close included.
        down = b"".join(
            bytes(f)
            for f in (
                server.send_data(os.urandom(200_000)),
                server.ping(b"r1"),
                server.close(1000, "bye"),
            )
        )
        async with trio.open_nursery() as io:
            io.start_soon(runner.stream.send_all, down)
            assert await read_exactly(client, b"", len(down)) == down
        # Half-close both ways ends the session; the host then closes the client.
        await runner.stream.send_eof()
        with trio.fail_after(5):
            assert await client.receive_some(10) == b""
        await client.send_eof()
        with trio.fail_after(5):
            assert await runner.stream.receive_some(10) == b""
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_oversized_or_slow_request_heads_are_dropped(tmp_path, monkeypatch):
    monkeypatch.setattr(ws_handshake, "REQUEST_SECONDS", 0.5)
    async with cluster(tmp_path, monkeypatch) as c:
        host, port = c.host.handle.url.removeprefix("http://").rsplit(":", 1)
        path = f"/ws/forward/{c.task_id}/8080"
        big = upgrade_request(path, c.alice, "X-Pad: " + "a" * (ws_handshake.MAX_HEAD_BYTES + 10))
        async with await trio.open_tcp_stream(host, int(port)) as s:
            await s.send_all(big)
            head, rest = await read_head(s)
            assert head.startswith(b"HTTP/1.1 431 ")
            assert json.loads(rest)["error"] == "too_large"
        async with await trio.open_tcp_stream(host, int(port)) as s:
            await s.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n".encode())  # and nothing more
            start = time.monotonic()
            with trio.fail_after(5):
                assert await s.receive_some(100) == b""
            assert time.monotonic() - start < 2
        assert c.runner.requests == []


async def test_plain_api_and_other_websockets_still_go_to_hypercorn(tmp_path, monkeypatch):
    async with cluster(tmp_path, monkeypatch) as c:
        r = await c.host.http.get("/api/health")
        assert r.status_code == 200
        # A client that trickles its request line still gets its answer.
        host, port = c.host.handle.url.removeprefix("http://").rsplit(":", 1)
        async with await trio.open_tcp_stream(host, int(port)) as s:
            for part in (b"GET /api/hea", b"lth HTTP/1.1\r\n", b"Host: x\r\nConnection: close\r\n\r\n"):
                await s.send_all(part)
                await trio.sleep(0.05)
            head, _ = await read_head(s)
            assert head.startswith(b"HTTP/1.1 200")
        # The log-follow WebSocket is Quart's, through the same port.
        c.runner.fake.logs[(c.task_id, "stdout")] = "first line\n"
        send = c.runner.fake.follow_channel(c.task_id)
        url = c.host.handle.url.replace("http", "ws", 1)
        async with open_websocket_url(
            f"{url}/ws/tasks/{c.task_id}/logs", extra_headers=bearer(c.alice)
        ) as ws:
            await send.send("second line\n")
            text = ""
            with trio.fail_after(10):
                while "second line" not in text:
                    message = await ws.get_message()
                    text += message if isinstance(message, str) else message.decode()
            assert "first line" in text


def test_hypercorn_internals_are_what_the_front_door_uses():
    # The front door re-does hypercorn.trio.run.worker_serve; if any of this changes, so must front_door.py.
    version = tuple(int(p) for p in metadata.version("hypercorn").split(".")[:2])
    assert (0, 17) <= version < (0, 19), version
    assert list(inspect.signature(TCPServer.__init__).parameters) == [
        "self", "app", "config", "context", "state", "stream",
    ]  # fmt: skip
    assert list(inspect.signature(Lifespan.__init__).parameters) == ["self", "app", "config", "state"]
    context = WorkerContext(None)
    assert hasattr(context, "terminate") and hasattr(context, "terminated")
    for method in ("handle_lifespan", "wait_for_startup", "wait_for_shutdown"):
        assert inspect.iscoroutinefunction(getattr(Lifespan, method)), method
    source = inspect.getsource(hypercorn.trio.run.worker_serve)
    for piece in (
        "Lifespan(app, config, lifespan_state)",
        "WorkerContext(",
        "TCPServer,",
        "ConnectionState(",
    ):
        assert piece in source, piece
    routes = [(forward_splice.FORWARD_LINE, forward_splice.serve_forward)]
    assert front_door.route_for(routes, b"GET /ws/forward/12/80?proto=udp HTTP/1.1\r\n") is not None
    for line in (
        b"GET /ws/forward/12/80/x HTTP/1.1\r\n",
        b"POST /ws/forward/12/80 HTTP/1.1\r\n",
        b"GET /ws/forwarder/12/80 HTTP/1.1\r\n",
        b"GET /ws/forward/12/80 HTTP/1.1",
    ):
        assert front_door.route_for(routes, line) is None, line


@pytest.mark.slow
async def test_sigterm_of_a_real_host_with_an_open_session_exits_0_promptly(tmp_path):
    from tests.e2e.cluster import KR, _write_config, free_port

    home = tmp_path / "home"
    home.mkdir()
    port = free_port()
    config = home / "host_config.py"
    _write_config(
        config,
        {
            "HOST_BIND_IP": "127.0.0.1",
            "HOST_PORT": port,
            "HOST_SSH_PROXY_PORT": free_port(),
            "DB_FILE": str(home / "host.db"),
            "SHARED_DIR": str(tmp_path / "shared"),
        },
    )
    env = dict(os.environ, KOHAKURIVER_HOME=str(home))
    log = (tmp_path / "host.log").open("wb")
    proc = subprocess.Popen([KR, "host", "--config", str(config)], env=env, stdout=log, stderr=log)
    try:
        url = f"http://127.0.0.1:{port}"

        async def up():
            try:
                return (await http.get("/api/health")).status_code == 200
            except httpx.TransportError:
                return False

        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            await wait_for(up, 30, what="the host")
            admin = json.loads((home / "credentials.json").read_text())["token"]
            cluster_token = (home / "cluster_token").read_text().strip()
            async with forward_runner(cluster_token) as runner:
                node = {"hostname": "n1", "url": runner.url, "total_cores": 4,
                        "memory_total_bytes": 1 << 30, "runner_version": "test"}  # fmt: skip
                r = await http.post(
                    "/api/register", json=node, headers={"Authorization": f"Bearer {cluster_token}"}
                )
                assert r.status_code == 200, r.text
                r = await http.post(
                    "/api/submit", json={"command": "sleep", "targets": ["n1"]},
                    headers={"Authorization": f"Bearer {admin}"},
                )  # fmt: skip
                (task_id,) = r.json()["task_ids"]
                await wait_for(lambda: runner.fake.executed, what="the dispatch")
                r = await http.put(
                    "/api/heartbeat/n1", json={"running_tasks": [task_id], "finished_tasks": []},
                    headers={"Authorization": f"Bearer {cluster_token}"},
                )  # fmt: skip
                assert r.status_code == 200, r.text
                ws_url = f"ws://127.0.0.1:{port}/ws/forward/{task_id}/8080"
                async with open_websocket_url(ws_url, extra_headers=bearer(admin)) as ws:
                    assert await ws.get_message() == "CONNECTED"
                    await ws.send_message(b"ping")
                    assert await ws.get_message() == b"ping"
                    start = time.monotonic()
                    proc.send_signal(signal.SIGTERM)
                    code = await trio.to_thread.run_sync(proc.wait, 10)
                    took = time.monotonic() - start
                    assert code == 0, (tmp_path / "host.log").read_text()
                    assert took < 2.5, f"{took:.2f} s\n" + (tmp_path / "host.log").read_text()[-4000:]
                    with trio.fail_after(5), pytest.raises(Exception):  # noqa: B017 (any end will do)
                        await ws.get_message()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


async def test_a_tls_host_keeps_the_message_relay(tmp_path, monkeypatch):
    # With TLS the front door is not used: hypercorn serves the forward route (api_forward's relay).
    cert_file, key_file = _self_signed(tmp_path)
    monkeypatch.setattr(daemon, "serve_forward", None)  # the front door could not even be built
    overrides = {"TLS_CERT_FILE": str(cert_file), "TLS_KEY_FILE": str(key_file)}
    context = ssl.create_default_context(cafile=str(cert_file))
    monkeypatch.setattr(_host_harness.httpx, "AsyncClient", partial(httpx.AsyncClient, verify=context))
    async with cluster(tmp_path, monkeypatch, **overrides) as c:
        url = c.url().replace("ws://", "wss://", 1)
        assert url.startswith("wss://")
        async with open_websocket_url(url, ssl_context=context, extra_headers=bearer(c.alice)) as ws:
            assert await ws.get_message() == "CONNECTED"
            await ws.send_message(b"through the relay")
            assert await ws.get_message() == b"through the relay"


# -- reading the runner's answer -----------------------------------------------------------------------------


async def _answer_to(wire: bytes, *, split: int | None = None):
    """What ``_answer`` makes of a runner that sends ``wire`` (server frames) and then ends its stream: the
    bytes to pass on, or the Refusal as the client gets it (close code, text, close reason). ``split``: bytes
    delivered with the upgrade."""
    from kohakuriver_host.forward_relay import Refusal, RunnerTarget

    target = RunnerTarget("n1", "http://127.0.0.1:1", 7, 80, "tcp")
    early, rest = (wire[:split], wire[split:]) if split is not None else (b"", wire)
    send, receive = trio.testing.memory_stream_pair()
    await send.send_all(rest)
    await send.send_eof()
    try:
        with trio.fail_after(5):
            return await forward_splice._answer(receive, target, early, trio.current_time() + 2)
    except Refusal as refusal:
        return refusal.opening.close_code, refusal.opening.text, refusal.opening.close_reason


async def test_the_runners_answer_in_every_shape():
    server = partial(FrameProtocol, client=False, extensions=[])
    # A ping first and CONNECTED in two fragments: everything read goes on to the client as it came.
    frames = server()
    wire = bytes(frames.ping(b"p") + frames.send_data("CONN", fin=False) + frames.send_data("ECTED"))
    wire += bytes(server().send_data(b"first data"))
    for split in (None, 3, len(wire)):
        assert await _answer_to(wire, split=split) == wire
    # An Error with its close: passed on as the runner said it, the refusal code in the reason included.
    frames = server()
    refused = bytes(frames.send_data("Error: no such port") + frames.close(1008, "not_found"))
    assert await _answer_to(refused) == (1008, "Error: no such port", "not_found")
    # A runner from before the codes: its prose reason goes on too (the client reads the close code alone).
    frames = server()
    refused = bytes(frames.send_data("Error: no such port") + frames.close(1008, "no"))
    assert await _answer_to(refused) == (1008, "Error: no such port", "no")
    # Binary before any text, a close or the end of the stream before an answer, garbage: 1011 from the host.
    unexpected = (
        1011,
        "Error: node n1 answered the forward with an unexpected message",
        "runner_unavailable",
    )
    assert await _answer_to(bytes(server().send_data(b"CONNECTED"))) == unexpected
    assert await _answer_to(bytes(server().close(1001, "bye"))) == (
        1011, "Error: node n1 closed the forward without an answer (code 1001)", "runner_unavailable",
    )  # fmt: skip
    assert await _answer_to(b"") == (
        1011, "Error: node n1 closed the forward without an answer (code 1006)", "runner_unavailable",
    )  # fmt: skip
    assert await _answer_to(b"\x8f\x00") == unexpected  # an unknown opcode
    assert await _answer_to(bytes(server().send_data("x" * 20000))) == unexpected  # far too long
