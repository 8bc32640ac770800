"""The lean WebSocket (``kohakuriver_net.websocket``, ``ws_client``) on real sockets: against itself, against
trio-websocket in both roles, against raw peers that misbehave, and on streams that are not sockets."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import random
import socket
import struct
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial

import pytest
import trio
import trio.testing
import trio_websocket
from wsproto.frame_protocol import FrameProtocol, Opcode
from wsproto.utilities import generate_accept_token

from kohakuriver_net import sock_io
from kohakuriver_net import websocket as websocket_module
from kohakuriver_net.sock_io import MAX_IOVECS, unsent
from kohakuriver_net.websocket import ConnectionClosed, WebSocket
from kohakuriver_net.ws_client import ConnectionRejected, HandshakeFailed, open_websocket
from kohakuriver_net.ws_handshake import (
    answer_and_close,
    check_upgrade,
    http_error,
    read_request,
    read_upgrade_response,
    switching_protocols,
    upgrade_request,
)
from kohakuriver_proto.ws_frames import OP_BINARY, OP_CONTINUATION, OP_TEXT, frame_header, python_unmask

MiB = 1 << 20
SIZES = [0, 1, 125, 126, 65535, 65536, 65537, MiB + 1, 5 * MiB + 3]


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed * 1_000_003 + size).randbytes(size)


def text(size: int) -> str:
    """``size`` bytes of UTF-8 with multi-byte characters (so that cuts land inside some)."""
    unit = "aé€😀"  # 1 + 2 + 3 + 4 bytes
    return (unit * (size // 10 + 1)).encode()[:size].decode("utf-8", "ignore")


def url(port: int, path: str = "/ws") -> str:
    return f"ws://127.0.0.1:{port}{path}"


async def listen() -> tuple[trio.SocketListener, int]:
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    return listener, listener.socket.getsockname()[1]


async def server_handshake(stream: trio.abc.Stream):
    """Our server side of the upgrade: (the request, the bytes that followed it)."""
    request, conn = await read_request(stream)
    key = check_upgrade(request)
    await stream.send_all(switching_protocols(conn, key))
    return request, conn.trailing_data[0]


async def client_handshake(stream: trio.abc.Stream, path: str = "/ws") -> bytes:
    """A client upgrade by hand: the bytes that followed the 101."""
    conn, key, request = upgrade_request(path, "127.0.0.1", [])
    await stream.send_all(request)
    return await read_upgrade_response(stream, conn, key)


async def wsproto_frames(stream: trio.abc.ReceiveStream, proto: FrameProtocol, count: int) -> list:
    """The next ``count`` (small) frames the peer sent, parsed by wsproto."""
    frames: list = []
    while True:
        frames += proto.received_frames()
        if len(frames) >= count:
            return frames
        data = await stream.receive_some(65536)
        if not data:
            return frames
        proto.receive_bytes(data)


async def closed(ws: WebSocket) -> ConnectionClosed:
    """How ``ws`` ended: what its next ``receive`` raises."""
    with pytest.raises(ConnectionClosed) as info:
        await ws.receive()
    return info.value


def close_of(frames: list) -> tuple[int, str]:
    (close,) = [f for f in frames if f.opcode is Opcode.CLOSE]
    return tuple(close.payload)


@asynccontextmanager
async def ws_pair(
    *, max_message: int = 8 * MiB, path: str = "/ws", headers=(), server_max: int | None = None
):
    """(our client from ``open_websocket``, our server ``WebSocket``, the upgrade request) on TCP."""
    listener, port = await listen()
    box: dict = {}

    async def accept():
        stream = await listener.accept()
        box["stream"] = stream
        box["request"], early = await server_handshake(stream)
        box["ws"] = WebSocket(stream, client=False, max_message=server_max or max_message, early=early)

    async with AsyncExitStack() as stack:
        stack.push_async_callback(listener.aclose)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept)
            client = await stack.enter_async_context(
                open_websocket(url(port, path), headers=list(headers), max_message=max_message)
            )
        stack.push_async_callback(trio.aclose_forcefully, box["stream"])
        yield client, box["ws"], box["request"]


@asynccontextmanager
async def our_server(handler, *, max_message: int = 8 * MiB):
    """Serve ``handler(ws, request)`` with our WebSocket on 127.0.0.1; yields the port."""
    listener, port = await listen()

    async def serve_one(stream):
        async with stream:
            request, early = await server_handshake(stream)
            await handler(WebSocket(stream, client=False, max_message=max_message, early=early), request)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(trio.serve_listeners, serve_one, [listener]))
        yield port
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def tws_server(handler, *, max_message: int = 16 * MiB):
    """trio-websocket serving ``handler(request)``; yields the port."""
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            partial(
                trio_websocket.serve_websocket,
                handler,
                "127.0.0.1",
                0,
                None,
                max_message_size=max_message,
                receive_buffer_size=256 * 1024,
            )
        )
        yield server.port
        nursery.cancel_scope.cancel()


def tws_client(port: int, path: str = "/ws", max_message: int = 16 * MiB):
    return trio_websocket.open_websocket_url(
        url(port, path), max_message_size=max_message, receive_buffer_size=256 * 1024
    )


async def transfer(sender: WebSocket, receiver: WebSocket, message):
    """Send while the other side receives (a big message does not fit in the sockets' buffers)."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender.send, message)
        return await receiver.receive()


async def echo(ws: WebSocket, request=None) -> None:
    """Echo until the peer closes."""
    try:
        while True:
            await ws.send(await ws.receive())
    except ConnectionClosed:
        pass


# -- ours against ours -------------------------------------------------------------------------------------


async def test_ours_both_ways_messages_of_many_sizes_and_the_request_seen():
    with trio.fail_after(20):
        headers = [("Authorization", "Bearer krt_x"), ("X-Kohaku", "1")]
        async with ws_pair(path="/tunnel/abc?token=t%20y", headers=headers) as (client, server, request):
            assert request.target == b"/tunnel/abc?token=t%20y"
            got = {k.lower(): v for k, v in request.headers}
            assert got[b"authorization"] == b"Bearer krt_x" and got[b"x-kohaku"] == b"1"
            assert got[b"host"] == f"127.0.0.1:{client.stream.socket.getpeername()[1]}".encode()
            for size in SIZES:
                for message in (payload(size), text(size)):
                    got = await transfer(client, server, message)
                    assert type(got) is type(message) and got == message
                    back = await transfer(server, client, got)
                    assert type(back) is type(message) and back == message
            await client.send(memoryview(b"view"))
            await client.send(bytearray(b"array"))
            assert [await server.receive(), await server.receive()] == [b"view", b"array"]


async def test_ours_close_handshake_propagates_code_and_reason():
    with trio.fail_after(10):
        async with ws_pair() as (client, server, _):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.close, 4001, "client bye é")
                with pytest.raises(ConnectionClosed) as info:
                    while True:
                        await server.receive()
            assert (info.value.code, info.value.reason) == (4001, "client bye é")
            assert server.closed is info.value
            assert client.closed is not None and client.closed.code == 4001  # the echo
            with pytest.raises(ConnectionClosed) as again:
                await server.receive()
            assert again.value.code == 4001
            with pytest.raises(ConnectionClosed):
                await client.send(b"after close")
            with pytest.raises(ConnectionClosed):
                await server.send(b"after close")


async def test_ours_messages_sent_before_a_close_are_received_first():
    with trio.fail_after(10):
        async with ws_pair() as (client, server, _):
            await server.send("one")
            await server.send_batch([b"two", b"three"])
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.close, 1001, "going away")
                assert [await client.receive() for _ in range(3)] == ["one", b"two", b"three"]
                with pytest.raises(ConnectionClosed) as info:
                    await client.receive()
            assert (info.value.code, info.value.reason) == (1001, "going away")
            assert server.closed is not None and server.closed.code == 1001


async def test_ours_ping_is_answered_while_receiving():
    with trio.fail_after(10):
        async with ws_pair() as (client, server, _), trio.open_nursery() as nursery:
            nursery.start_soon(echo, server)
            before = client.last_received
            await client.ping(b"are you there")
            with trio.move_on_after(0.3):
                await client.receive()  # only the pong comes: read and dropped
            assert client.last_received > before
            await client.send("after the ping")
            assert await client.receive() == "after the ping"
            await client.close()


async def test_abrupt_tcp_close_is_1006_both_ways():
    with trio.fail_after(10):
        async with ws_pair() as (client, server, _):
            await client.send(b"last words")
            await client.stream.aclose()  # no close frame
            assert await server.receive() == b"last words"
            info = await closed(server)
            assert info.code == 1006
            info = await closed(client)  # closed locally
            assert info.code == 1006
            # writing to a peer that is gone fails too (soon: the first writes may still be buffered)
            with pytest.raises(ConnectionClosed) as info:
                for _ in range(1000):
                    await server.send(b"x" * 65536)
            assert info.value.code == 1006
        async with ws_pair() as (client, server, _):
            await server.stream.aclose()
            info = await closed(client)
            assert info.code == 1006 and client.closed is info


async def test_message_over_max_message_is_1009_both_ways():
    with trio.fail_after(10):
        async with ws_pair(max_message=8 * MiB, server_max=65536) as (client, server, _):
            await client.send(b"x" * 65536)  # exactly the limit is fine
            assert await server.receive() == b"x" * 65536
            await client.send(b"y" * 65537)  # (fits in the sockets' buffers: the server stops reading)
            info = await closed(server)
            assert info.code == 1009
            info = await closed(client)
            assert info.code == 1009
        async with ws_pair(max_message=1000, server_max=MiB) as (client, server, _):
            await server.send("é" * 501)  # 1002 bytes
            info = await closed(client)
            assert info.code == 1009
            info = await closed(server)
            assert info.code == 1009


async def test_send_batch_arrives_in_order_both_ways():
    rng = random.Random(7)
    messages = [rng.randbytes(rng.choice([0, 1, 10, 200, 5000, 70000])) for _ in range(1500)]
    with trio.fail_after(20):
        async with ws_pair() as (client, server, _):
            for sender, receiver in ((client, server), (server, client)):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(sender.send_batch, messages)
                    got = [await receiver.receive() for _ in messages]
                assert got == messages
            await client.send_batch([])  # nothing to send is fine
            await client.send("still open")
            assert await server.receive() == "still open"


class RecordingWrites:
    """Stands in for ``os.writev`` in ``sock_io``: counts the calls and those that wrote only part of what
    they were given."""

    def __init__(self) -> None:
        self.calls = 0
        self.partial = 0

    def __call__(self, fd, buffers):
        assert len(buffers) <= MAX_IOVECS
        sent = os.writev(fd, buffers)
        self.calls += 1
        self.partial += sent < sum(len(b) for b in buffers)
        return sent


@pytest.mark.parametrize("sender", ["client", "server"])
async def test_big_send_batch_to_a_slow_reader_arrives_intact(sender, monkeypatch):
    rng = random.Random(11)
    messages = [rng.randbytes(rng.randrange(0, 16000)) for _ in range(1200)]  # ~10 MiB, >2 sendmsg batches
    expected = hashlib.sha256()
    for m in messages:
        expected.update(struct.pack(">I", len(m)) + m)
    with trio.fail_after(25):
        async with ws_pair() as (client, server, _):
            writer, reader = (client, server) if sender == "client" else (server, client)
            writer.stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
            reader.stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            recorder = RecordingWrites()
            monkeypatch.setattr(sock_io, "_writev", recorder)
            got = hashlib.sha256()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer.send_batch, messages)
                for i in range(len(messages)):
                    if i % 100 == 0:
                        await trio.sleep(0.02)  # a slow reader: the writer's socket fills up
                    m = await reader.receive()
                    got.update(struct.pack(">I", len(m)) + m)
            assert got.hexdigest() == expected.hexdigest()
            assert recorder.partial > 0, "no partial write happened: the test did not exercise it"
            assert recorder.calls >= 3


async def test_concurrent_senders_do_not_interleave_frames():
    rng = random.Random(3)
    batches = [[rng.randbytes(rng.randrange(1, 300_000)) for _ in range(20)] for _ in range(4)]
    with trio.fail_after(20):
        async with ws_pair() as (client, server, _):
            client.stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
            got = []
            async with trio.open_nursery() as nursery:
                for batch in batches:
                    nursery.start_soon(client.send_batch, batch)
                nursery.start_soon(client.send, "single")
                for _ in range(sum(map(len, batches)) + 1):
                    got.append(await server.receive())
            assert "single" in got
            # every message whole, and each batch in its order
            for batch in batches:
                positions = [got.index(m) for m in batch]
                assert positions == sorted(positions)
            assert sorted(m for m in got if isinstance(m, bytes)) == sorted(m for b in batches for m in b)


@pytest.mark.parametrize("sender", ["client", "server"])
async def test_send_now_writes_at_once_and_a_partial_write_goes_out_first_on_the_next_send(sender):
    with trio.fail_after(20):
        async with ws_pair() as (client, server, _):
            writer, reader = (client, server) if sender == "client" else (server, client)
            assert writer.send_now(b"at once") and not writer.backlogged
            assert await reader.receive() == b"at once"
            # A message bigger than the socket takes in one write: the rest waits in the backlog, nothing
            # else may be written before it, and the next send (or flush) writes it first.
            writer.stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
            big = random.Random(5).randbytes(4 * MiB)
            assert writer.send_now(big)
            assert writer.backlogged
            assert not writer.send_now(b"must wait"), "send_now must not pass a backlog"
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer.send, b"after")
                assert await reader.receive() == big
                assert await reader.receive() == b"after"
            assert not writer.backlogged
            await writer.flush()  # nothing left: a no-op
            await writer.send("still fine")
            assert await reader.receive() == "still fine"


async def test_send_now_refuses_while_a_send_is_in_progress():
    with trio.fail_after(20):
        async with ws_pair() as (client, server, _):
            client.stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
            big = bytes(8 * MiB)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.send, big)
                await trio.testing.wait_all_tasks_blocked()  # the send is waiting for room
                assert not client.send_now(b"x")
                assert await server.receive() == big


async def test_a_tunnel_socket_keeps_little_unsent_in_the_kernel():
    """``open_websocket`` (and the runner's routes) tune the socket: no Nagle, and a writer facing a reader
    that stopped leaves about ``UNSENT_AT_MOST`` unsent in the kernel, the rest in its own hands."""
    siocoutqnsd = 0x894B  # bytes written and not yet sent (linux/sockios.h)
    with trio.fail_after(20):
        async with ws_pair(max_message=64 * MiB) as (client, server, _):
            sock = client.stream.socket
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            lowat = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)
            assert lowat == websocket_module.UNSENT_AT_MOST
            big = bytes(32 * MiB)  # far more than the reader's buffers take
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.send, big)
                await trio.testing.wait_all_tasks_blocked()  # the reader's buffers are full
                unsent = struct.unpack("i", fcntl.ioctl(sock.fileno(), siocoutqnsd, b"\0" * 4))[0]
                assert 0 < unsent <= 2 * lowat
                assert await server.receive() == big


def test_unsent_continues_partial_writes_at_the_right_byte():
    for seed in range(30):
        rng = random.Random(seed)
        parts = [rng.randbytes(rng.choice([0, 1, 2, 7, 100, 3000])) for _ in range(rng.randrange(1, 1300))]
        parts += [bytearray(b"tail"), memoryview(b"view")]
        views = [memoryview(p) for p in parts if len(p)]
        out = bytearray()
        while views:
            data = b"".join(bytes(b) for b in views[:MAX_IOVECS])
            n = rng.choice([1, len(data), rng.randrange(1, len(data) + 1)])  # what one writev took
            out += data[:n]
            views = unsent(views, n)
            assert all(len(v) for v in views)
        assert bytes(out) == b"".join(bytes(p) for p in parts)


# -- early data ----------------------------------------------------------------------------------------------


async def test_frames_that_arrive_with_the_handshake_are_not_lost():
    """Both ways: the first frames in the same packet as the 101 / as the upgrade request."""
    listener, port = await listen()
    with trio.fail_after(10):
        async with listener, trio.open_nursery() as nursery:

            async def raw_server():
                stream = await listener.accept()
                request, conn = await read_request(stream)
                key = check_upgrade(request)
                first = frame_header(OP_TEXT, 5) + b"hello" + frame_header(OP_BINARY, 3) + b"abc"
                await stream.send_all(switching_protocols(conn, key) + first)
                await wsproto_frames(stream, FrameProtocol(client=False, extensions=[]), 1)
                await stream.aclose()

            nursery.start_soon(raw_server)
            async with open_websocket(url(port), max_message=MiB) as ws:
                assert await ws.receive() == "hello"
                assert await ws.receive() == b"abc"
                await ws.close()

        async with trio.open_nursery() as nursery:
            listener, port = await listen()
            done = trio.Event()
            seen = []

            async def our_side():
                stream = await listener.accept()
                _, early = await server_handshake(stream)
                assert early  # the frames came with the head
                ws = WebSocket(stream, client=False, max_message=MiB, early=early)
                seen.extend([await ws.receive(), await ws.receive()])
                await stream.aclose()
                done.set()

            nursery.start_soon(our_side)
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            conn, key, request = upgrade_request("/ws", "127.0.0.1", [])
            frames = frame_header(OP_BINARY, 2, mask_key=b"abcd") + python_unmask(memoryview(b"hi"), b"abcd")
            frames += frame_header(OP_TEXT, 2, mask_key=b"wxyz") + python_unmask(memoryview(b"yo"), b"wxyz")
            await tcp.send_all(request + frames)
            await read_upgrade_response(tcp, conn, key)
            await done.wait()
            await tcp.aclose()
            await listener.aclose()
            assert seen == [b"hi", "yo"]


# -- raw peers: protocol violations, pings, closes without a code ------------------------------------------


@asynccontextmanager
async def raw_server_and_client(*, max_message: int = MiB):
    """(our client WebSocket, the raw server stream after the 101)."""
    listener, port = await listen()
    box = {}

    async def accept():
        box["stream"] = await listener.accept()
        await server_handshake(box["stream"])

    async with AsyncExitStack() as stack:
        stack.push_async_callback(listener.aclose)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept)
            ws = await stack.enter_async_context(open_websocket(url(port), max_message=max_message))
        stack.push_async_callback(trio.aclose_forcefully, box["stream"])
        yield ws, box["stream"]


@asynccontextmanager
async def raw_client_and_server(*, max_message: int = MiB):
    """(our server WebSocket, the raw client stream after the 101)."""
    listener, port = await listen()
    async with listener, AsyncExitStack() as stack:
        box = {}

        async def accept():
            stream = await listener.accept()
            _, early = await server_handshake(stream)
            box["ws"] = WebSocket(stream, client=False, max_message=max_message, early=early)
            stack.push_async_callback(trio.aclose_forcefully, stream)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept)
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            stack.push_async_callback(trio.aclose_forcefully, tcp)
            early = await client_handshake(tcp)
            assert early == b""
        yield box["ws"], tcp


VIOLATIONS = {
    "unknown opcode": (b"\x83\x00", 1002),
    "rsv bit": (b"\xc2\x01x", 1002),
    "masked server frame": (b"\x82\x81abcd\x00", 1002),
    "fragmented ping": (b"\x09\x00", 1002),
    "long ping": (b"\x89\x7e\x00\x7e" + b"p" * 126, 1002),
    "lone continuation": (b"\x80\x01x", 1002),
    "non-minimal length": (b"\x82\x7e\x00\x05hello", 1002),
    "bad utf-8": (b"\x81\x02\xc3\x28", 1007),
    "bad close code": (b"\x88\x02\x03\xec", 1002),
    "one-byte close": (b"\x88\x01\x03", 1002),
}


@pytest.mark.parametrize("name", list(VIOLATIONS))
async def test_a_violation_from_the_server_closes_with_the_code(name):
    data, code = VIOLATIONS[name]
    with trio.fail_after(10):
        async with raw_server_and_client() as (ws, stream):
            await stream.send_all(frame_header(OP_TEXT, 2) + b"ok" + data)
            assert await ws.receive() == "ok"  # what came before is delivered
            info = await closed(ws)
            assert info.code == code
            frames = await wsproto_frames(stream, FrameProtocol(client=False, extensions=[]), 1)
            assert close_of(frames)[0] == code  # our close frame, masked as a client's must be
            with pytest.raises(ConnectionClosed) as again:
                await ws.receive()
            assert again.value.code == code


async def test_client_frames_each_have_a_fresh_mask_key():
    with trio.fail_after(10):
        async with raw_server_and_client() as (ws, stream):
            for i in range(4):
                await ws.send(b"k%d" % i)
            await ws.send_batch([b"b%d" % i for i in range(4)])
            data = b""
            while len(data) < 8 * 8:  # 8 frames: 2 header bytes, 4 key bytes, 2 payload bytes
                data += await stream.receive_some(65536)
            assert len(data) == 64
            keys, messages = [], []
            for pos in range(0, 64, 8):
                assert data[pos : pos + 2] == b"\x82\x82"  # final binary, masked, 2 bytes
                key = data[pos + 2 : pos + 6]
                keys.append(key)
                messages.append(python_unmask(memoryview(data[pos + 6 : pos + 8]), key))
            assert messages == [b"k0", b"k1", b"k2", b"k3", b"b0", b"b1", b"b2", b"b3"]
            assert len(set(keys)) == 8


async def test_a_violation_from_the_client_closes_with_1002():
    with trio.fail_after(10):
        async with raw_client_and_server() as (ws, stream):
            await stream.send_all(b"\x82\x02no")  # unmasked client frame
            info = await closed(ws)
            assert info.code == 1002
            frames = await wsproto_frames(stream, FrameProtocol(client=True, extensions=[]), 1)
            assert close_of(frames)[0] == 1002


async def test_raw_peer_sees_pong_and_close_echo():
    with trio.fail_after(10):
        async with raw_server_and_client() as (ws, stream):
            proto = FrameProtocol(client=False, extensions=[])
            await ws.ping(b"ping payload")
            (frame,) = await wsproto_frames(stream, proto, 1)
            assert (frame.opcode, bytes(frame.payload)) == (Opcode.PING, b"ping payload")
            # the server answers, pings us, then says something
            await stream.send_all(
                bytes(proto.pong(b"ping payload"))
                + bytes(proto.ping(b"yours"))
                + bytes(proto.send_data("hi"))
            )
            before = ws.last_received
            assert await ws.receive() == "hi"
            assert ws.last_received >= before
            (frame,) = await wsproto_frames(stream, proto, 1)
            assert (frame.opcode, bytes(frame.payload)) == (Opcode.PONG, b"yours")
            # a close without a code: 1005 here, answered with an empty close frame
            await stream.send_all(bytes(proto.close()))
            info = await closed(ws)
            assert (info.code, info.reason) == (1005, "")
            proto = FrameProtocol(client=False, extensions=[])
            (frame,) = await wsproto_frames(stream, proto, 1)
            assert frame.opcode is Opcode.CLOSE and tuple(frame.payload) == (1005, "")


async def test_fragmented_message_from_a_raw_peer():
    with trio.fail_after(10):
        async with raw_server_and_client() as (ws, stream):
            data = "fragments €".encode()
            await stream.send_all(
                frame_header(OP_TEXT, 11, fin=False)
                + data[:11]
                + b"\x89\x01p"  # a ping between the fragments
                + frame_header(OP_CONTINUATION, len(data) - 11)
                + data[11:]
            )
            assert await ws.receive() == "fragments €"
            frames = await wsproto_frames(stream, FrameProtocol(client=False, extensions=[]), 1)
            assert bytes(frames[0].payload) == b"p" and frames[0].opcode is Opcode.PONG


# -- against trio-websocket ------------------------------------------------------------------------------


async def test_our_client_against_trio_websocket_server():
    received = []

    async def handler(request):
        ws = await request.accept()
        received.append(request.path)
        try:
            while True:
                message = await ws.get_message()
                received.append(len(message))
                await ws.send_message(message)
        except trio_websocket.ConnectionClosed as exc:
            received.append((exc.reason.code, exc.reason.reason))

    with trio.fail_after(20):
        async with tws_server(handler) as port:
            async with open_websocket(url(port, "/p?q=1"), max_message=16 * MiB) as ws:
                for size in SIZES:
                    for message in (payload(size, 1), text(size)):
                        await ws.send(message)
                        back = await ws.receive()
                        assert type(back) is type(message) and back == message
                before = ws.last_received
                await ws.ping(b"hello?")
                with trio.move_on_after(0.3):
                    await ws.receive()  # reads (and drops) the pong; nothing else is coming
                assert ws.last_received > before
                await ws.close(4001, "client bye")
                assert ws.closed is not None and ws.closed.code == 4001
            await trio.sleep(0.05)
    assert received[0] == "/p?q=1"
    assert received[-1] == (4001, "client bye")


async def test_trio_websocket_server_closes_our_client():
    async def handler(request):
        ws = await request.accept()
        await ws.send_message("bye soon")
        await ws.aclose(4002, "server bye")

    with trio.fail_after(10):
        async with tws_server(handler) as port, open_websocket(url(port), max_message=MiB) as ws:
            assert await ws.receive() == "bye soon"
            info = await closed(ws)
            assert (info.code, info.reason) == (4002, "server bye")
            with pytest.raises(ConnectionClosed):
                await ws.send("too late")


async def test_trio_websocket_server_gets_1009_from_our_small_client():
    server_codes = []

    async def handler(request):
        ws = await request.accept()
        await ws.send_message(b"z" * 5000)
        try:
            await ws.get_message()
        except trio_websocket.ConnectionClosed as exc:
            server_codes.append(exc.reason.code)

    with trio.fail_after(10):
        async with tws_server(handler) as port:
            async with open_websocket(url(port), max_message=4096) as ws:
                info = await closed(ws)
                assert info.code == 1009
            await trio.sleep(0.1)
    assert server_codes == [1009]


async def test_send_batch_to_trio_websocket_server_in_order():
    rng = random.Random(5)
    messages = [rng.randbytes(rng.choice([0, 3, 125, 126, 4000, 66000])) for _ in range(800)]
    digest = trio.Event()
    result = {}

    async def handler(request):
        ws = await request.accept()
        got = [await ws.get_message() for _ in messages]
        result["got"] = got
        digest.set()
        await ws.send_message(f"{len(got)}")

    with trio.fail_after(20):
        async with tws_server(handler) as port, open_websocket(url(port), max_message=MiB) as ws:
            await ws.send_batch(messages)
            assert await ws.receive() == "800"
            await digest.wait()
    assert result["got"] == messages


async def test_trio_websocket_client_against_our_server():
    with trio.fail_after(20):
        async with our_server(echo, max_message=16 * MiB) as port, tws_client(port) as tws:
            for size in SIZES:
                for message in (payload(size, 2), text(size)):
                    await tws.send_message(message)
                    back = await tws.get_message()
                    assert type(back) is type(message) and back == message
            with trio.fail_after(2):
                await tws.ping(b"our server answers")  # returns only when the pong arrives
                await tws.ping(b"again")


async def test_our_server_closes_trio_websocket_client():
    async def handler(ws, request):
        assert await ws.receive() == "close me"
        await ws.close(4003, "server says bye")

    with trio.fail_after(10):
        async with our_server(handler) as port, tws_client(port) as tws:
            await tws.send_message("close me")
            with pytest.raises(trio_websocket.ConnectionClosed) as info:
                await tws.get_message()
            assert (info.value.reason.code, info.value.reason.reason) == (4003, "server says bye")


async def test_trio_websocket_client_closes_our_server():
    seen = []
    done = trio.Event()

    async def handler(ws, request):
        try:
            while True:
                seen.append(await ws.receive())
        except ConnectionClosed as exc:
            seen.append((exc.code, exc.reason))
        done.set()

    with trio.fail_after(10):
        async with our_server(handler) as port:
            async with tws_client(port) as tws:
                await tws.send_message(b"data")
                await tws.aclose(4004, "client is done")
            await done.wait()
    assert seen == [b"data", (4004, "client is done")]


async def test_trio_websocket_client_over_our_max_message_gets_1009():
    seen = []

    async def handler(ws, request):
        try:
            await ws.receive()
        except ConnectionClosed as exc:
            seen.append(exc.code)

    with trio.fail_after(10):
        async with our_server(handler, max_message=MiB) as port, tws_client(port) as tws:
            with contextlib.suppress(trio_websocket.ConnectionClosed):  # we may close before it is all sent
                await tws.send_message(b"q" * (2 * MiB))
            with pytest.raises(trio_websocket.ConnectionClosed) as info:
                await tws.get_message()
            assert info.value.reason.code == 1009
    assert seen == [1009]


# -- the client's handshake failures ---------------------------------------------------------------------


@asynccontextmanager
async def answering_server(answer):
    """A server that reads the request head and runs ``answer(stream, request, conn)``; yields the port."""
    listener, port = await listen()

    async def serve_one(stream):
        async with stream:
            request, conn = await read_request(stream)
            await answer(stream, request, conn)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(trio.serve_listeners, serve_one, [listener]))
        yield port
        nursery.cancel_scope.cancel()


async def test_connection_rejected_reports_status_and_json_body():
    async def refuse(stream, request, conn):
        await answer_and_close(stream, http_error(403, "forbidden", "no token for this route"))

    with trio.fail_after(10):
        async with answering_server(refuse) as port:
            with pytest.raises(ConnectionRejected) as info:
                async with open_websocket(url(port), max_message=MiB):
                    pytest.fail("the upgrade was refused")
    assert info.value.status == 403
    body = {"error": "forbidden", "message": "no token for this route", "field": None}
    assert json.loads(info.value.body) == body


async def test_handshake_failed_when_nobody_listens():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with trio.fail_after(10), pytest.raises(HandshakeFailed):
        async with open_websocket(url(port), max_message=MiB):
            pytest.fail("connected to nobody")


def accept_header(request) -> bytes:
    key = dict(request.headers)[b"sec-websocket-key"]
    return generate_accept_token(key)


BAD_ANSWERS = {
    "garbage": lambda request: b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    "wrong accept key": lambda request: (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + generate_accept_token(b"dGhlIHNhbXBsZSBub25jZQ==") + b"\r\n\r\n"
    ),
    "no accept key": lambda request: (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    ),
    "an extension": lambda request: (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept_header(request) + b"\r\n"
        b"Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n"
    ),
    "nothing": lambda request: b"",
    "half a head": lambda request: b"HTTP/1.1 101 Switch",
}


@pytest.mark.parametrize("name", list(BAD_ANSWERS))
async def test_handshake_failed_when_the_answer_is_no_websocket(name):
    async def answer(stream, request, conn):
        await stream.send_all(BAD_ANSWERS[name](request))
        await stream.send_eof()
        with trio.move_on_after(2):
            await stream.receive_some(1)

    with trio.fail_after(10):
        async with answering_server(answer) as port:
            with pytest.raises(HandshakeFailed):
                async with open_websocket(url(port), max_message=MiB):
                    pytest.fail("a WebSocket on a bad answer")


async def test_a_correct_answer_by_hand_is_accepted():
    """The control for the bad answers above: the same server code with the right accept key works."""

    async def answer(stream, request, conn):
        await stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept_header(request) + b"\r\n\r\n" + b"\x81\x02ok"
        )
        with trio.move_on_after(2):
            await stream.receive_some(1)

    with trio.fail_after(10):
        async with answering_server(answer) as port, open_websocket(url(port), max_message=MiB) as ws:
            assert await ws.receive() == "ok"


@pytest.mark.parametrize("bad_url", ["http://127.0.0.1:1/ws", "ws:///nohost", "127.0.0.1:80"])
async def test_handshake_failed_for_a_url_that_is_no_websocket(bad_url):
    with pytest.raises(HandshakeFailed):
        async with open_websocket(bad_url, max_message=MiB):
            pytest.fail("no WebSocket URL")


# -- streams that are not sockets (the generic receive_some / send_all path) ---------------------------------


async def test_memory_stream_pair_both_ways():
    a, b = trio.testing.memory_stream_pair()
    client = WebSocket(a, client=True, max_message=8 * MiB)
    server = WebSocket(b, client=False, max_message=8 * MiB)
    assert client._sock is None and server._sock is None  # the generic path
    with trio.fail_after(20):
        for size in SIZES:
            for message in (payload(size, 3), text(size)):
                await client.send(message)
                got = await server.receive()
                assert type(got) is type(message) and got == message
                await server.send(got)
                assert await client.receive() == message
        messages = [payload(i * 37, 4) for i in range(600)]
        await client.send_batch(messages)
        assert [await server.receive() for _ in messages] == messages
        await server.send_batch(messages)
        assert [await client.receive() for _ in messages] == messages
        # pings answered on the way, then a close handshake
        await client.ping(b"mem")
        await server.send("after")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(echo, server)
            assert await client.receive() == "after"
            await client.close(3001, "memory bye")
        assert client.closed is not None and client.closed.code == 3001
        assert server.closed is not None
        assert (server.closed.code, server.closed.reason) == (3001, "memory bye")


async def test_a_ping_during_our_close_handshake_is_dropped_and_the_close_awaited():
    """After our close frame no pong may go out; close() still waits for the peer's close."""
    a, b = trio.testing.memory_stream_pair()
    ws = WebSocket(a, client=True, max_message=MiB)
    peer = FrameProtocol(client=False, extensions=[])
    await b.send_all(bytes(peer.ping(b"late ping")) + bytes(peer.close(4000, "peer bye")))
    with trio.fail_after(5):
        await ws.close(1000, "bye")
    assert ws.closed is not None and (ws.closed.code, ws.closed.reason) == (4000, "peer bye")
    peer.receive_bytes(await b.receive_some())  # what we sent: masked client frames
    frames = list(peer.received_frames())
    assert [f.opcode for f in frames] == [Opcode.CLOSE]  # our close, and no pong after it
    assert tuple(frames[0].payload) == (1000, "bye")


async def test_memory_stream_abrupt_close_and_violation():
    with trio.fail_after(10):
        a, b = trio.testing.memory_stream_pair()
        server = WebSocket(b, client=False, max_message=MiB)
        await a.aclose()
        info = await closed(server)
        assert info.code == 1006

        a, b = trio.testing.memory_stream_pair()
        server = WebSocket(b, client=False, max_message=MiB)
        await a.send_all(b"\x81\x83abcd" + python_unmask(memoryview(b"\xff\xfe\xfd"), b"abcd"))  # bad utf-8
        info = await closed(server)
        assert info.code == 1007
        proto = FrameProtocol(client=True, extensions=[])
        proto.receive_bytes(await a.receive_some())
        (frame,) = proto.received_frames()
        assert frame.opcode is Opcode.CLOSE and frame.payload[0] == 1007

        a, b = trio.testing.memory_stream_pair()
        client = WebSocket(a, client=True, max_message=MiB)
        await b.aclose()
        with pytest.raises(ConnectionClosed) as info:
            await client.send(b"nobody reads this")
        assert info.value.code == 1006
        info = await closed(client)
        assert info.code == 1006


async def test_lockstep_stream_reads_in_small_pieces():
    """A stream that hands over data only as the reader asks: many partial reads per message."""
    a, b = trio.testing.lockstep_stream_pair()
    client = WebSocket(a, client=True, max_message=4 * MiB)
    server = WebSocket(b, client=False, max_message=4 * MiB)
    messages = [payload(n, 6) for n in (0, 5, 126, 70000, 3 * MiB)]
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_batch, messages)
            assert [await server.receive() for _ in messages] == messages


async def test_stapled_stream_over_tcp_against_trio_websocket_server():
    async def handler(request):
        ws = await request.accept()
        try:
            while True:
                await ws.send_message(await ws.get_message())
        except trio_websocket.ConnectionClosed:
            pass

    with trio.fail_after(20):
        async with tws_server(handler) as port:
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            async with tcp:
                early = await client_handshake(tcp)
                ws = WebSocket(trio.StapledStream(tcp, tcp), client=True, max_message=16 * MiB, early=early)
                assert ws._sock is None  # not a SocketStream: the generic path on a real socket
                for size in SIZES:
                    for message in (payload(size, 8), text(size)):
                        await ws.send(message)
                        assert await ws.receive() == message
                batch = [payload(n, 9) for n in range(0, 3000, 7)]
                await ws.send_batch(batch)
                assert [await ws.receive() for _ in batch] == batch
                await ws.close(4005, "stapled bye")
                assert ws.closed is not None and ws.closed.code == 4005


async def test_module_constants_are_what_the_tests_assume():
    # the batch tests send more than MAX_IOVECS / 2 messages so that a batch takes several sendmsg calls
    assert MAX_IOVECS <= 1024 and websocket_module.ABNORMAL == 1006


async def test_a_large_frame_sent_in_slow_pieces_then_a_small_one_arrive_without_a_stall():
    """While the rest of a large frame is on its way the reader sleeps until all of it is there
    (``SO_RCVLOWAT``); it must still get that frame, and a small frame right after it, without waiting."""
    async with ws_pair() as (client, server, _):
        big, small, key = payload(600 * 1024, 7), b"after", b"\x01\x02\x03\x04"
        head = frame_header(OP_BINARY, len(big), mask_key=key) + python_unmask(memoryview(big), key)
        tail = frame_header(OP_BINARY, len(small), mask_key=key) + python_unmask(memoryview(small), key)
        got: list = []
        lowat = server.stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)
        assert lowat == 1

        async def read() -> None:
            got.append(await server.receive())
            got.append(await server.receive())

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                await client.stream.send_all(head[:100_000])
                await trio.sleep(0.2)
                # The reader now waits for the frame's last byte, not for the next segment.
                lowat = server.stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)
                assert lowat == len(head) - 100_000
                for start in range(100_000, len(head), 150_000):
                    await client.stream.send_all(head[start : start + 150_000])
                    await trio.sleep(0.05)
                await client.stream.send_all(tail)
        assert got == [big, small]
        assert server.stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1
