"""``WebSocket``: a WebSocket after its handshake, on a trio stream, for the tunnel's data path.

The runner's tunnel routes and ``kr forward`` move every forwarded byte through one of these. Compared
with hypercorn + Quart (server) or trio-websocket (client), both built on wsproto, it removes the per-message
layers and copies that made those two processes the ceiling of a forward (measured: ``bench/tunnel.py``):

- reads go straight into the frame reader's buffer (``recv_into``, up to a MiB per call), and a payload is
  copied once, unmasked in C when masked (``ws_speedups.unmask``);
- writes are vectored (header and payload, never concatenated), and ``send_batch`` writes many queued
  messages in one system call;
- both go through ``sock_io``, one pass through trio's scheduler per wait instead of two.

The frame rules are ``kohakuriver_proto.ws_frames``' (sans-IO). Pings are answered by ``receive``. The
interface is the part of Quart's websocket the tunnel server uses (``send``, ``receive``, ``close``), so the
same server code runs on either. A stream that is not a plain socket (TLS) takes the generic path:
``receive_some`` and ``send_all``.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Sequence

import trio

from kohakuriver_proto.ws_frames import (
    CLOSE_NO_STATUS,
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Close,
    FrameReader,
    Ping,
    WebSocketProtocolError,
    close_payload,
    frame_parts,
)

from . import sock_io, ws_speedups

__all__ = ["ConnectionClosed", "WebSocket"]

#: Free buffer space offered to each ``recv_into``.
READ_AT_LEAST = 256 * 1024
#: While at least this much of a frame is still to come, sleep until it has all arrived (``SO_RCVLOWAT``);
#: below it, wake for any byte. ``LOWAT_AT_MOST`` bounds the request (the kernel grows the receive buffer to
#: hold it, up to half of ``tcp_rmem``'s maximum).
LOWAT_FROM = 32 * 1024
LOWAT_AT_MOST = 1024 * 1024
#: Close codes for what the peer did.
ABNORMAL = 1006  # never on the wire: the connection ended without a close frame


class ConnectionClosed(Exception):
    """The WebSocket is closed: by a close frame (``code``, ``reason``), or the connection ended (1006)."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"WebSocket closed ({code}{': ' + reason if reason else ''})")
        self.code = code
        self.reason = reason


class WebSocket:
    """One side of an open WebSocket. ``client``: our frames are masked, the peer's must not be.

    ``early``: bytes that arrived with the handshake (the first frames). ``max_message``: largest message
    accepted (a bigger one closes with 1009).
    """

    def __init__(
        self, stream: trio.abc.Stream, *, client: bool, max_message: int, early: bytes = b""
    ) -> None:
        self._stream = stream
        self._sock = stream.socket if isinstance(stream, trio.SocketStream) else None
        self._client = client
        self._unmask = ws_speedups.unmask
        self._reader = FrameReader(masked=not client, max_message=max_message, unmask=self._unmask)
        if early:
            self._reader.receive_data(early)
        self._lowat = 1  # the socket's SO_RCVLOWAT (1: the default)
        self._send_lock = trio.Lock()
        self._backlog: list = []  # what a send_now left unwritten: goes out before anything else
        self._close_sent = False
        #: The peer's close frame (or ``ABNORMAL``) once the connection has ended for reading.
        self.closed: ConnectionClosed | None = None
        #: ``trio.current_time()`` of the last bytes received (any frame: keepalives compare with it).
        self.last_received = trio.current_time()

    @property
    def stream(self) -> trio.abc.Stream:
        return self._stream

    # -- receiving -----------------------------------------------------------------------------------------

    async def receive(self) -> bytes | str:
        """The next message (bytes for binary, str for text). Answers pings on the way. Raises
        ``ConnectionClosed`` once the peer closed (its close is answered) or the connection ended, and
        closes with the matching code when the peer breaks the protocol."""
        if self.closed is not None:
            raise self.closed
        reader = self._reader
        while True:
            try:
                event = reader.next_event()
            except WebSocketProtocolError as exc:
                await self._fail(exc.code, str(exc))
                raise self.closed from None  # type: ignore[misc]
            if event is None:
                await self._fill()
                continue
            kind = type(event)
            if kind is bytes or kind is str:
                return event  # type: ignore[return-value]
            if kind is Ping and not self._close_sent:  # no pong after our close frame (RFC 6455 5.5.1)
                await self._send_frame(OP_PONG, event.payload)  # type: ignore[union-attr]
            elif kind is Close:
                code = event.code  # type: ignore[union-attr]
                self.closed = ConnectionClosed(code, event.reason)  # type: ignore[union-attr]
                # Echo the code (RFC 6455 section 5.5.1); a close without one is answered without one.
                await self._send_close(None if code == CLOSE_NO_STATUS else code, "")
                raise self.closed
            # a Pong: nothing to do

    async def _fill(self) -> None:
        reader = self._reader
        try:
            if self._sock is not None:
                self._sleep_for(reader.missing)
                with reader.writable(READ_AT_LEAST) as view:
                    n = await sock_io.recv_into(self._sock, view)
                reader.commit(n)
            else:
                data = await self._stream.receive_some(READ_AT_LEAST)
                n = len(data)
                reader.receive_data(data)
        except (OSError, trio.BrokenResourceError) as exc:
            self.closed = ConnectionClosed(ABNORMAL, f"connection lost: {exc}")
            raise self.closed from None
        except trio.ClosedResourceError:
            self.closed = ConnectionClosed(ABNORMAL, "closed locally")
            raise self.closed from None
        if not n:
            self.closed = ConnectionClosed(ABNORMAL, "the connection ended without a close frame")
            raise self.closed
        self.last_received = trio.current_time()

    def _sleep_for(self, missing: int) -> None:
        """Be woken once ``missing`` more bytes are there, not for each segment, when they are the rest of a
        large frame: nothing can be done with part of a frame, and every wake-up is a pass through trio's
        scheduler (a 256 KiB frame arrives in 3-5 segments on loopback). The rest of a frame always comes
        (the peer is writing it; an end of stream or a full receive buffer wakes the reader too), so this
        never delays anything; small frames and headers wake as usual."""
        lowat = min(missing, LOWAT_AT_MOST) if missing >= LOWAT_FROM else 1
        if lowat != self._lowat:
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)  # type: ignore[union-attr]
            except OSError:
                return
            self._lowat = lowat

    # -- sending -------------------------------------------------------------------------------------------

    async def send(self, message: bytes | bytearray | memoryview | str) -> None:
        """Send one message (text for str, binary otherwise)."""
        if isinstance(message, str):
            await self._send_frame(OP_TEXT, message.encode("utf-8"))
        else:
            await self._send_frame(OP_BINARY, message)

    async def ping(self, payload: bytes = b"") -> None:
        """Send a ping; its pong (like any frame) moves ``last_received`` when ``receive`` reads it."""
        await self._send_frame(OP_PING, payload)

    async def send_batch(self, messages: Sequence[bytes | bytearray | memoryview]) -> None:
        """Send several binary messages with as few system calls as possible (one per ``MAX_IOVECS / 2``)."""
        client, unmask = self._client, self._unmask
        parts: list[bytes | bytearray | memoryview] = []
        for message in messages:
            key = os.urandom(4) if client else None
            parts += frame_parts(OP_BINARY, message, mask_key=key, unmask=unmask)
        await self._write(parts)

    def send_now(self, message: bytes | bytearray | memoryview) -> bool:
        """Write one binary message from synchronous code, without waiting and without a task switch, if
        nothing else is being sent and the socket has room: True when it went out (whatever the socket did
        not take, rarely anything, is written first by the next send or ``flush``; see ``backlogged``).
        False: nothing was written, send it the ordinary way. Not available on TLS streams (False)."""
        if self._sock is None or self._close_sent or self._backlog or self._send_lock.locked():
            return False
        key = os.urandom(4) if self._client else None
        parts = frame_parts(OP_BINARY, message, mask_key=key, unmask=self._unmask)
        rest = sock_io.send_now(self._sock, parts)
        if rest is None:
            return False
        self._backlog = rest
        return True

    @property
    def backlogged(self) -> bool:
        """Part of a ``send_now`` message is still unwritten (``flush`` writes it)."""
        return bool(self._backlog)

    async def flush(self) -> None:
        """Write what ``send_now`` left unwritten."""
        await self._write([])

    async def _send_frame(self, opcode: int, payload: bytes | bytearray | memoryview) -> None:
        key = os.urandom(4) if self._client else None  # RFC 6455: a fresh unpredictable key per frame
        await self._write(frame_parts(opcode, payload, mask_key=key, unmask=self._unmask))

    async def _write(self, parts: list[bytes | bytearray | memoryview]) -> None:
        async with self._send_lock:
            if self._close_sent:
                raise ConnectionClosed(self.closed.code if self.closed else ABNORMAL, "closed")
            if self._backlog:
                parts = [*self._backlog, *parts]
                self._backlog = []
            try:
                if self._sock is not None:
                    await sock_io.sendmsg_all(self._sock, parts)
                else:
                    await self._stream.send_all(b"".join(parts))
            except (OSError, trio.BrokenResourceError) as exc:
                self._close_sent = True
                if self.closed is None:
                    self.closed = ConnectionClosed(ABNORMAL, f"connection lost: {exc}")
                raise ConnectionClosed(ABNORMAL, f"connection lost: {exc}") from None

    # -- closing -------------------------------------------------------------------------------------------

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Send a close frame (once) and wait for the peer's, reading and dropping messages meanwhile;
        callers bound the wait. Call it when no other task is receiving."""
        await self._send_close(code, reason)
        while self.closed is None:
            try:
                await self.receive()
            except ConnectionClosed:
                break

    async def _send_close(self, code: int | None, reason: str) -> None:
        if self._close_sent:
            return
        payload = b"" if code is None else close_payload(code, reason)
        with contextlib.suppress(ConnectionClosed):
            await self._send_frame(OP_CLOSE, payload)
        self._close_sent = True

    async def _fail(self, code: int, reason: str) -> None:
        """The peer broke the protocol: close with ``code`` and stop reading."""
        self.closed = ConnectionClosed(code, reason)
        with trio.move_on_after(1):
            await self._send_close(code, reason)


#: At most this much written to a tunnel connection's socket and not yet sent (``TCP_NOTSENT_LOWAT``).
UNSENT_AT_MOST = 64 * 1024


def tune_for_tunnel(sock: trio.socket.SocketType | socket.socket) -> None:
    """Socket options for a connection that carries many forwarded connections' frames at once.

    - ``TCP_NODELAY``: a small frame (echo, keystroke) goes out at once; bulk writes are large anyway.
    - ``TCP_NOTSENT_LOWAT``: a writer may leave at most ``UNSENT_AT_MOST`` bytes unsent in the kernel (a
      write takes no more, and the socket counts as writable only below it). Without it the send buffer
      grows to megabytes when the next process is slower, and an interactive frame queued behind that
      kernel FIFO waits for all of it (the under-load echo of ``bench/tunnel.py``); with it the bulk data
      waits in the writer's own queue instead, where ``WriteLanes`` and the tunnel client's express lane
      let small frames go first. Throughput is unchanged: the socket is refilled as it drains.
    """
    for level, option, value in (
        (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_NOTSENT_LOWAT", 25), UNSENT_AT_MOST),
    ):
        with contextlib.suppress(OSError):  # not TCP (a test's socketpair), or an older kernel
            sock.setsockopt(level, option, value)
