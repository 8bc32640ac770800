"""The runner's TunnelServer obeys PauseReading/ResumeReading: over in-memory streams and the lean WebSocket,
a seed-protocol tunnel client that runs ahead of a slow session is not read until the session catches up,
nothing is lost, and a paused reader ends at once when its tunnel is replaced or its task ends."""

from __future__ import annotations

import types

import trio
import trio.testing

from kohakuriver_net.websocket import ConnectionClosed, WebSocket
from kohakuriver_proto import frames
from kohakuriver_proto.flow import DEFAULT_LEGACY_BUFFER, hello_frame
from kohakuriver_proto.frames import MsgType, encode, encode_window
from kohakuriver_runner.tunnel_server import HeldContainer, TunnelServer

MAX = 16 * 1024 * 1024
CHUNK = 64 * 1024
WINDOW = 64 * 1024


def pair() -> tuple[WebSocket, WebSocket]:
    """(the peer's end, the runner's end) of one WebSocket."""
    a, b = trio.testing.memory_stream_pair()
    return WebSocket(a, client=True, max_message=MAX), WebSocket(b, client=False, max_message=MAX)


def server() -> TunnelServer:
    config = types.SimpleNamespace(TUNNEL_ENABLED=True)
    tunnels = TunnelServer(config, docker=None, key=b"k" * 32)
    held = HeldContainer(task_id=1, name="c1", running=True)
    tunnels.directories.append(lambda ref: held if ref in ("1", "c1") else None)
    return tunnels


async def next_frame(ws: WebSocket, skip=(MsgType.PING, MsgType.HELLO)) -> frames.Frame:
    while True:
        frame = frames.decode(bytes(await ws.receive()))
        if frame.type not in skip:
            return frame


async def until(predicate, what: str) -> None:
    with trio.fail_after(5):
        while not predicate():
            await trio.sleep(0.01)


async def open_paused_download(nursery, tunnels: TunnelServer):
    """A seed-protocol tunnel client and a flow-controlled session with one connection; the client sends
    far more than the session's window and the runner's bound. Returns (tunnel, session, tid, payload)."""
    tunnel, runner_end = pair()
    nursery.start_soon(tunnels.serve_tunnel_client, "c1", runner_end)
    assert (await tunnel.receive())[0] == MsgType.HELLO
    await tunnel.send(encode(MsgType.PONG, 0))  # a seed-protocol client: no HELLO
    session, runner_end = pair()
    nursery.start_soon(tunnels.serve_forward, "c1", "80", "tcp", runner_end)
    assert await session.receive() == "CONNECTED"
    await session.send(hello_frame(True, WINDOW))
    assert (await session.receive())[0] == MsgType.HELLO  # the runner's
    await session.send(encode(MsgType.CONNECT, 1, port=80))
    connect = await next_frame(tunnel)
    assert connect.type == MsgType.CONNECT
    tid = connect.client_id
    await tunnel.send(encode(MsgType.CONNECTED, tid))
    assert (await next_frame(session)).type == MsgType.CONNECTED
    payload = bytes(i % 253 for i in range(4 * DEFAULT_LEGACY_BUFFER))
    for i in range(0, len(payload), CHUNK):  # the memory stream takes it all: only the runner can hold back
        await tunnel.send(encode(MsgType.DATA, tid, payload[i : i + CHUNK]))
    entry = tunnels._tunnels["c1"]
    await until(lambda: entry.tunnel.paused, "the tunnel client to be paused")
    return tunnel, session, tid, payload


async def test_a_seed_protocol_tunnel_client_is_read_only_as_fast_as_the_session_takes_it(nursery):
    tunnels = server()
    _tunnel, session, tid, payload = await open_paused_download(nursery, tunnels)
    machine = tunnels._tunnels["c1"].machine
    held = machine._conns[tid].down.queued
    await trio.sleep(0.1)
    assert machine._conns[tid].down.queued == held  # paused: nothing more was read
    assert DEFAULT_LEGACY_BUFFER <= held < DEFAULT_LEGACY_BUFFER + CHUNK
    received = bytearray()
    while len(received) < len(payload):
        frame = await next_frame(session)
        assert frame.type == MsgType.DATA
        received += frame.payload
        await session.send(encode_window(1, len(frame.payload)))  # the slow reader catches up
    assert received == payload
    await until(lambda: not tunnels._tunnels["c1"].tunnel.paused, "reading to resume")
    tunnels.container_ended("c1")


async def test_a_paused_reader_ends_when_its_task_ends(nursery):
    tunnels = server()
    tunnel, session, _tid, _payload = await open_paused_download(nursery, tunnels)
    tunnels.container_ended("c1")
    with trio.fail_after(5):  # both WebSockets are closed by the runner, the paused one included
        for ws in (tunnel, session):
            try:
                while True:
                    await ws.receive()
            except ConnectionClosed:
                pass


async def test_a_paused_tunnel_client_replaced_by_a_new_one_is_dropped_at_once(nursery):
    tunnels = server()
    tunnel, session, _tid, _payload = await open_paused_download(nursery, tunnels)
    _newer, runner_end = pair()
    nursery.start_soon(tunnels.serve_tunnel_client, "c1", runner_end)
    with trio.fail_after(5):
        try:
            while True:
                await tunnel.receive()
        except ConnectionClosed:
            pass
        # The session's connection ended with the old tunnel client; the new one starts unpaused.
        frame = await next_frame(session, skip=(MsgType.PING, MsgType.HELLO, MsgType.DATA))
        assert frame.type == MsgType.ERROR
    assert not tunnels._tunnels["c1"].tunnel.paused
    tunnels.container_ended("c1")
