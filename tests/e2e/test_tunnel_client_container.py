"""The static Rust tunnel client inside the busybox image, against a runner stand-in written with the
project's own Python frame codec.

The container runs with ``--network host`` so the stand-in and the container's services stay on
127.0.0.1: the client dials ``ws://127.0.0.1:<port>`` and the services bind 127.0.0.1 only. Both the binary
(``tunnel-client-rs/build.sh``) and the image (``scripts/images/busybox.sh``) are built by setup/CI before the
tests; when either is missing the tests fail and say how to build it.
"""

from __future__ import annotations

import hashlib
import secrets
import socket
import subprocess
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

from kohakuriver_proto import frames
from kohakuriver_proto.frames import FEATURE_FLOW_CONTROL, Frame, MsgType, Proto

pytestmark = [pytest.mark.slow, pytest.mark.docker]

REPO = Path(__file__).resolve().parents[2]
BINARY = REPO / "tunnel-client-rs" / "target" / "release" / "tunnel-client"
IMAGE = "kohakuriver/busybox:latest"
MOUNT = "/usr/local/bin/tunnel-client"
CHUNK = 64 * 1024


def require_binary() -> Path:
    if not BINARY.is_file():
        pytest.fail(f"{BINARY} is missing: build it with `bash tunnel-client-rs/build.sh`")
    return BINARY


def require_image() -> str:
    probe = subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True)
    if probe.returncode != 0:
        pytest.fail(f"docker image {IMAGE} is missing: build it with `bash scripts/images/busybox.sh`")
    return IMAGE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_static_binary_runs_in_busybox():
    binary = require_binary()
    image = require_image()
    linkage = subprocess.run(["ldd", str(binary)], capture_output=True, text=True)
    assert "not a dynamic executable" in linkage.stdout + linkage.stderr, linkage
    run = subprocess.run(
        ["docker", "run", "--rm", "-v", f"{binary}:{MOUNT}:ro", image, MOUNT, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert "--runner-url" in run.stdout


class Conn:
    """One tunneled connection seen from the runner side, honouring the client's window."""

    def __init__(self, tunnel: Tunnel, client_id: int) -> None:
        self.tunnel = tunnel
        self.id = client_id
        self.credit = tunnel.client_window
        self.credit_changed = trio.Event()
        self.inbox_send, self.inbox = trio.open_memory_channel[Frame](1000)

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            while self.tunnel.flow and self.credit == 0:
                self.credit_changed = trio.Event()
                await self.credit_changed.wait()
            n = min(len(view), CHUNK, self.credit if self.tunnel.flow else CHUNK)
            await self.tunnel.ws.send_message(frames.encode(MsgType.DATA, self.id, view[:n]))
            self.credit -= n
            view = view[n:]

    async def close(self) -> None:
        await self.tunnel.ws.send_message(frames.encode(MsgType.CLOSE, self.id))

    async def read_to_close(self) -> bytes:
        """Everything the client sends until its CLOSE, returning credit as it is consumed."""
        out = bytearray()
        async for f in self.inbox:
            if f.type == MsgType.CLOSE:
                return bytes(out)
            assert f.type == MsgType.DATA, f
            out += f.payload
            if self.tunnel.flow and len(f.payload):
                await self.tunnel.ws.send_message(frames.encode_window(self.id, len(f.payload)))
        raise AssertionError("tunnel ended before CLOSE")


class Tunnel:
    """The runner's end of one tunnel WebSocket: HELLO exchange, then frame routing by client id."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.flow = False
        self.client_window = frames.DEFAULT_WINDOW
        self.next_id = 1
        self.conns: dict[int, Conn] = {}
        self.pongs_send, self.pongs = trio.open_memory_channel[Frame](100)

    async def handshake(self) -> tuple[int, int]:
        first = frames.decode(await self.ws.get_message())
        assert isinstance(first, Frame) and first.type == MsgType.HELLO, first
        features, window = frames.parse_hello(first)
        await self.ws.send_message(frames.encode_hello())
        self.flow = bool(features & FEATURE_FLOW_CONTROL)
        self.client_window = window
        return features, window

    async def route(self) -> None:
        try:
            while True:
                f = frames.decode(await self.ws.get_message())
                if not isinstance(f, Frame):
                    continue
                if f.type == MsgType.PONG:
                    await self.pongs_send.send(f)
                elif f.type == MsgType.WINDOW and f.client_id in self.conns:
                    conn = self.conns[f.client_id]
                    conn.credit += frames.parse_window(f)
                    conn.credit_changed.set()
                elif f.client_id in self.conns:
                    f = Frame(f.type, f.proto, f.client_id, f.port, bytes(f.payload))
                    await self.conns[f.client_id].inbox_send.send(f)
        except ConnectionClosed:
            pass

    async def open(self, port: int) -> Conn | str:
        """CONNECT; the connection, or the ERROR reason."""
        conn = Conn(self, self.next_id)
        self.next_id += 1
        self.conns[conn.id] = conn
        await self.ws.send_message(frames.encode(MsgType.CONNECT, conn.id, proto=Proto.TCP, port=port))
        answer = await conn.inbox.receive()
        if answer.type == MsgType.CONNECTED:
            return conn
        assert answer.type == MsgType.ERROR, answer
        del self.conns[conn.id]
        return frames.parse_error_reason(answer)

    async def open_retrying(self, port: int) -> Conn:
        """The service in the container may still be starting: retry refused connects for a while."""
        with trio.fail_after(15):
            while True:
                result = await self.open(port)
                if isinstance(result, Conn):
                    return result
                await trio.sleep(0.2)


CGI = """#!/bin/sh
echo "Content-Type: text/plain"
echo
head -c "$CONTENT_LENGTH" | sha256sum
"""


def container_script(http_port: int) -> str:
    # A static page and a CGI that answers with the sha256 of the request body, served by busybox httpd on
    # 127.0.0.1 only; then the tunnel client in the foreground, as the runner starts it.
    return (
        "set -e; mkdir -p /tmp/www/cgi-bin; "
        "echo 'hello through the tunnel' > /tmp/www/index.html; "
        f"printf '%s' '{CGI}' > /tmp/www/cgi-bin/sum; chmod +x /tmp/www/cgi-bin/sum; "
        f"httpd -p 127.0.0.1:{http_port} -h /tmp/www; "
        f"exec {MOUNT} --log-level debug"
    )


async def docker(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return await trio.run_process(["docker", *args], capture_stdout=True, capture_stderr=True, check=check)


async def test_tunnel_client_in_busybox_container_serves_connections():
    binary = require_binary()
    image = require_image()
    token = secrets.token_hex(16)
    name = f"kr-tunnel-e2e-{secrets.token_hex(4)}"
    http_port = free_port()
    refused_port = free_port()
    accepted_send, accepted = trio.open_memory_channel[tuple[WebSocketRequest, WebSocketConnection]](1)
    done = trio.Event()

    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        await accepted_send.send((request, ws))
        await done.wait()

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
        try:
            await docker(
                "run", "-d", "--rm", "--network", "host", "--name", name,
                "-e", f"KOHAKURIVER_TUNNEL_URL=ws://127.0.0.1:{server.port}",
                "-e", f"KOHAKURIVER_CONTAINER_ID={name}",
                "-e", f"KOHAKURIVER_TUNNEL_TOKEN={token}",
                "-v", f"{binary}:{MOUNT}:ro",
                image, "sh", "-c", container_script(http_port),
            )  # fmt: skip
            with trio.fail_after(30):
                request, ws = await accepted.receive()
            assert request.path == f"/ws/tunnel/{name}"
            headers = {k.decode().lower(): v.decode() for k, v in request.headers}
            assert headers.get("authorization") == f"Bearer {token}"

            tunnel = Tunnel(ws)
            with trio.fail_after(10):
                features, window = await tunnel.handshake()
            assert features & FEATURE_FLOW_CONTROL and window == frames.DEFAULT_WINDOW
            nursery.start_soon(tunnel.route)

            with trio.fail_after(60):
                # A plain GET: request, half-close, response until the client's CLOSE.
                conn = await tunnel.open_retrying(http_port)
                await conn.send(b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n")
                reply = await conn.read_to_close()
                assert reply.startswith(b"HTTP/1.") and b" 200 " in reply.split(b"\r\n", 1)[0], reply[:200]
                assert reply.endswith(b"hello through the tunnel\n"), reply[-200:]

                # 4 MiB through the window both ways: the CGI hashes the body inside the container.
                body = secrets.token_bytes(4 << 20)
                conn = await tunnel.open_retrying(http_port)
                head = f"POST /cgi-bin/sum HTTP/1.0\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                async with trio.open_nursery() as io:
                    io.start_soon(conn.send, head + body)
                    reply = await conn.read_to_close()
                assert hashlib.sha256(body).hexdigest().encode() in reply, reply[-300:]

                # A refused port is an ERROR with the OS reason; the tunnel keeps working.
                reason = await tunnel.open(refused_port)
                assert isinstance(reason, str) and "refused" in reason.lower(), reason

                # Tunnel PING is answered with a PONG of the same client id.
                await ws.send_message(frames.encode(MsgType.PING, 77))
                pong = await tunnel.pongs.receive()
                assert pong.client_id == 77
        except BaseException:
            logs = await docker("logs", name, check=False)
            out, err = (b.decode(errors="replace") for b in (logs.stdout, logs.stderr))
            print(f"container log:\n{out}{err}")
            raise
        finally:
            done.set()
            with trio.move_on_after(30) as cleanup:
                cleanup.shield = True
                await docker("rm", "-f", name, check=False)
            nursery.cancel_scope.cancel()
