"""Peers that speak only the seed protocol (the seven messages of the tunnel-system seed, DESIGN section 4):
no HELLO, no WINDOW, no flow control. They send as fast as their sockets let them, as the original
implementation's clients did, so a runner that holds their data without bound, or cuts them, fails the
tests that use them.

Written from the seed's message table, on purpose without the project's protocol library: an 8-byte
``>BBIH`` header (type, proto, client id, port) and the payload, one binary WebSocket message each. Message
types this peer does not know (the runner's HELLO and WINDOW) are ignored, as the seed asks.

- ``serve_tunnel``: a tunnel client for one container (``python seed_peers.py tunnel``; the test runs it in
  the container's network namespace, so it dials the container's services and connects from its address).
- ``forward_exchange``: one connection of a forward client against the host's ``/ws/forward`` route.
"""

from __future__ import annotations

import contextlib
import struct
import sys
from collections.abc import Callable, Iterable

import trio
from trio_websocket import ConnectionClosed, open_websocket_url

HEADER = struct.Struct(">BBIH")
CONNECT, CONNECTED, DATA, CLOSE, ERROR, PING, PONG = range(1, 8)
TCP = 0
CHUNK = 256 * 1024
#: What these peers accept per message (the runner and the host send at most a few MiB).
MAX_MESSAGE = 16 * 1024 * 1024
#: Larger socket reads than trio-websocket's 4 KiB default, so that the peer is not the bottleneck.
RECEIVE_BUFFER = 256 * 1024


def frame(kind: int, client_id: int, payload: bytes = b"", port: int = 0) -> bytes:
    return HEADER.pack(kind, TCP, client_id, port) + payload


# -- the tunnel client -------------------------------------------------------------------------------------


async def serve_tunnel(runner_url: str, container: str, secret: str) -> None:
    """Keep one WebSocket to the runner and serve its CONNECTs from 127.0.0.1, until the runner closes."""
    url = f"{runner_url.rstrip('/')}/ws/tunnel/{container}"
    headers = [(b"Authorization", f"Bearer {secret}".encode())]
    async with open_websocket_url(
        url, extra_headers=headers, max_message_size=MAX_MESSAGE, receive_buffer_size=RECEIVE_BUFFER
    ) as ws:
        streams: dict[int, trio.SocketStream] = {}
        print("attached", flush=True)

        async def uplink(client_id: int, port: int) -> None:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError as exc:
                await ws.send_message(frame(ERROR, client_id, str(exc).encode()))
                return
            streams[client_id] = stream
            await ws.send_message(frame(CONNECTED, client_id))
            try:
                while data := await stream.receive_some(CHUNK):
                    await ws.send_message(frame(DATA, client_id, data))
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                return  # torn down by the runner's CLOSE
            if streams.pop(client_id, None) is not None:
                await ws.send_message(frame(CLOSE, client_id))
                await stream.aclose()

        try:
            async with trio.open_nursery() as nursery:
                while True:
                    message = await ws.get_message()
                    if isinstance(message, str) or len(message) < HEADER.size:
                        continue
                    kind, _proto, client_id, port = HEADER.unpack_from(message)
                    if kind == CONNECT:
                        nursery.start_soon(uplink, client_id, port)
                    elif kind == DATA and client_id in streams:
                        # Waiting here is this client's only back-pressure: it reads nothing meanwhile.
                        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                            await streams[client_id].send_all(message[HEADER.size :])
                    elif kind in (CLOSE, ERROR) and client_id in streams:
                        await streams.pop(client_id).aclose()  # the seed's CLOSE tears the connection down
                    elif kind == PING:
                        await ws.send_message(frame(PONG, client_id))
        except ConnectionClosed:
            return


# -- a forward client --------------------------------------------------------------------------------------


async def forward_exchange(
    url: str, token: str, port: int, chunks: Iterable[bytes], on_data: Callable[[bytes], object]
) -> None:
    """Open one connection to ``port`` through the host's forward route ``url`` (``CONNECTED`` first), send
    every chunk of the iterable ``chunks`` as DATA as fast as the WebSocket takes them, and hand every
    DATA payload received to ``on_data`` until the container side sends CLOSE."""
    headers = [(b"Authorization", f"Bearer {token}".encode())]
    async with open_websocket_url(
        url, extra_headers=headers, max_message_size=MAX_MESSAGE, receive_buffer_size=RECEIVE_BUFFER
    ) as ws:
        first = await ws.get_message()
        if first != "CONNECTED":
            raise AssertionError(f"the host answered {first!r}")
        await ws.send_message(frame(CONNECT, 1, port=port))
        while True:
            message = await ws.get_message()
            kind, _proto, _cid, _port = HEADER.unpack_from(message)
            if kind == CONNECTED:
                break
            if kind == ERROR:
                raise AssertionError(f"CONNECT refused: {message[HEADER.size :]!r}")

        async def send_all() -> None:
            for chunk in chunks:
                await ws.send_message(frame(DATA, 1, chunk))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_all)
            while True:
                message = await ws.get_message()
                kind, _proto, _cid, _port = HEADER.unpack_from(message)
                if kind == DATA:
                    on_data(message[HEADER.size :])
                elif kind == CLOSE:
                    break
                elif kind == ERROR:
                    raise AssertionError(f"connection aborted: {message[HEADER.size :]!r}")
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    if sys.argv[1:2] != ["tunnel"] or len(sys.argv) != 5:
        sys.exit("usage: seed_peers.py tunnel RUNNER_URL CONTAINER SECRET")
    trio.run(serve_tunnel, *sys.argv[2:])
