"""The CLI side of ``kr forward``: local TCP connections or UDP peers multiplexed over one session WebSocket.

One ``Forwarder`` per session (one WebSocket to ``/ws/forward/{task}/{port}?proto=``), after the server's
text ``CONNECTED``. Every call returns a list of events; ``SendFrame(data)`` means "write this binary
message to the WebSocket" (in order). A trio loop runs one task reading the WebSocket::

    for event in fw.receive_frame(message, now): ...   # route by event type

and, for TCP, one task per accepted local connection::

    cid, events = fw.open_connection()                  # CONNECT; wait for ConnectionReady(cid)
    while True:
        credit = fw.send_credit(cid)                    # None: unlimited (the server has no flow control)
        if credit == 0: wait for CreditAvailable(cid)
        data = await sock.receive_some(min(credit or 65536, 65536))
        events = fw.send_data(cid, data) if data else fw.local_eof(cid)

Data for the local socket comes as ``DataReceived``; after writing it call ``delivered(cid, n)``, which
returns the WINDOW credit to send (flow control), or releases the bounded buffer (seed-protocol server).
``RemoteEOF`` means: once the queued data is written, shut down the socket's write side;
``ConnectionClosed`` means the connection is finished (aborted=True: close now, dropping queued data).

DATA is sent only after ``ConnectionReady`` (the server's CONNECTED), when the server's features are known.
UDP: ``datagram_from(addr, data, now)`` maps each source address to a client id (CONNECT on first sight;
datagrams wait in a small bounded queue until CONNECTED); replies come as ``DatagramReceived`` with the
address; ``expire(now)`` closes mappings idle for ``udp_idle_timeout`` seconds.
"""

from __future__ import annotations

from collections.abc import Hashable

import attrs

from .endpoint import Conn, Endpoint
from .errors import LocalProtocolError, RemoteProtocolError
from .flow import (
    CAN_RECEIVE,
    DEFAULT_LEGACY_BUFFER,
    ConnEvent,
    ConnState,
    CreditAvailable,
    IdAllocator,
    Negotiated,
    ReceiveWindow,
    SendFrame,
)
from .frames import DEFAULT_WINDOW, HEADER_SIZE, MsgType, Proto, encode

__all__ = [
    "ConnectionClosed",
    "ConnectionReady",
    "CreditAvailable",
    "DataReceived",
    "DatagramReceived",
    "Forwarder",
    "Negotiated",
    "PongReceived",
    "RemoteEOF",
    "SendFrame",
]

# -- events ------------------------------------------------------------------------------------------------


@attrs.frozen
class ConnectionReady:
    """The service in the container accepted the connection: start reading the local socket."""

    client_id: int


@attrs.frozen
class DataReceived:
    """Bytes for the local TCP socket; call ``delivered(client_id, len(data))`` once written."""

    client_id: int
    data: bytes | memoryview


@attrs.frozen
class DatagramReceived:
    """One datagram for the local UDP peer at ``addr`` (no ``delivered`` call needed)."""

    client_id: int
    addr: Hashable
    data: bytes | memoryview


@attrs.frozen
class RemoteEOF:
    """The container side finished sending: shut down the local socket's write side after the queued data."""

    client_id: int


@attrs.frozen
class ConnectionClosed:
    """The connection is finished. ``aborted``: close at once and drop queued data (``reason`` says why);
    otherwise close after writing what is queued."""

    client_id: int
    reason: str | None = None
    aborted: bool = False


@attrs.frozen
class PongReceived:
    client_id: int


class Forwarder(Endpoint):
    """One forward session, CLI side. ``proto``/``port``: what the session forwards to in the container."""

    _peer = "server"

    def __init__(
        self,
        proto: Proto,
        port: int,
        *,
        flow_control: bool = True,
        hello: bool = True,
        window: int = DEFAULT_WINDOW,
        legacy_buffer_limit: int = DEFAULT_LEGACY_BUFFER,
        udp_idle_timeout: float = 120.0,
        udp_pending_limit: int = 64 * 1024,
        first_id: int = 1,
    ) -> None:
        if not 1 <= port <= 0xFFFF:
            raise LocalProtocolError(f"port out of range: {port}")
        super().__init__(
            flow_control=flow_control,
            hello=hello,
            window=window,
            legacy_buffer_limit=legacy_buffer_limit,
            udp_idle_timeout=udp_idle_timeout,
        )
        self.proto = Proto(proto)
        self.port = port
        self.udp_pending_limit = udp_pending_limit
        self._udp = self.proto is Proto.UDP
        self._ids = IdAllocator(first_id)
        self._started = False
        self._by_addr: dict[Hashable, Conn] = {}

    # -- session -------------------------------------------------------------------------------------------

    def start(self) -> list:
        """The first binary message of the session: HELLO (nothing when ``hello`` is off)."""
        if self._started:
            raise LocalProtocolError("start() was already called")
        self._started = True
        return self._hello()

    def ping(self, client_id: int = 0) -> list:
        return [SendFrame(encode(MsgType.PING, client_id))]

    def close(self, reason: str = "session closed") -> list:
        """The WebSocket is gone: every connection is aborted."""
        self._by_addr.clear()
        return self._abort_all(reason)

    # -- TCP, local side -----------------------------------------------------------------------------------

    def open_connection(self) -> tuple[int, list]:
        """A local TCP client connected: its client id and the CONNECT to send."""
        if self._udp:
            raise LocalProtocolError("open_connection() is for TCP sessions; use datagram_from()")
        cid = self._ids.allocate(self._conns)
        self._conns[cid] = Conn(cid, Proto.TCP)
        return cid, [SendFrame(encode(MsgType.CONNECT, cid, proto=Proto.TCP, port=self.port))]

    def send_data(self, client_id: int, data: bytes | bytearray | memoryview) -> list:
        """Bytes read from the local socket. Raises LocalProtocolError beyond ``send_credit``."""
        return self._send_stream(client_id, data)

    def local_eof(self, client_id: int) -> list:
        """The local client shut down its write side (or closed): CLOSE, a half-close."""
        return self._half_close(client_id)

    def abort(self, client_id: int, reason: str = "aborted by the client") -> list:
        """Give up on a connection in any state (local error, connect timeout): ERROR, forgotten at once."""
        conn = self._conns.get(client_id)
        return [] if conn is None else [self._drop(conn, reason)]

    # -- UDP, local side -----------------------------------------------------------------------------------

    def datagram_from(self, addr: Hashable, data: bytes | bytearray | memoryview, now: float) -> list:
        """A datagram from local peer ``addr``. Datagrams beyond the credit are dropped (DESIGN)."""
        if not self._udp:
            raise LocalProtocolError("datagram_from() is for UDP sessions")
        out: list = []
        conn = self._by_addr.get(addr)
        if conn is None:
            cid = self._ids.allocate(self._conns)
            conn = self._conns[cid] = self._by_addr[addr] = Conn(cid, Proto.UDP, now, addr)
            out.append(SendFrame(encode(MsgType.CONNECT, cid, proto=Proto.UDP, port=self.port)))
        conn.last_active = now
        if conn.state is ConnState.CONNECTING:
            if conn.pending_bytes + len(data) <= self.udp_pending_limit:
                conn.pending.append(bytes(data))
                conn.pending_bytes += len(data)
            return out
        self._send_datagram(conn, data, out)
        return out

    def _send_datagram(self, conn: Conn, data: bytes | bytearray | memoryview, out: list) -> None:
        send = conn.send
        if send is not None:
            if len(data) > send.credit:
                return
            send.credit -= len(data)
        out.append(SendFrame(encode(MsgType.DATA, conn.cid, data, proto=Proto.UDP)))

    # -- frames from the server (Endpoint.receive_frame dispatches here) -------------------------------------

    def _closed(self, cid: int, reason: str | None = None, aborted: bool = False) -> ConnectionClosed:
        return ConnectionClosed(cid, reason, aborted=aborted)

    def _on_data(self, cid: int, data: bytes | bytearray | memoryview, now: float, out: list) -> None:
        conn = self._conns.get(cid)
        if conn is None:
            out.append(SendFrame(encode(MsgType.ERROR, cid, b"unknown connection", proto=self.proto)))
            return
        if conn.state not in CAN_RECEIVE:
            raise RemoteProtocolError(f"connection {cid}: DATA in state {conn.state.value!r}")
        payload = memoryview(data)[HEADER_SIZE:]
        n = len(payload)
        recv = conn.recv
        if conn.udp:
            conn.last_active = now
            if type(recv) is ReceiveWindow:
                recv.received(n)
                self._credit(conn, n, out)  # a datagram is delivered the moment it is handed over
            out.append(DatagramReceived(cid, conn.addr, payload))
            return
        if type(recv) is ReceiveWindow:
            recv.received(n)
        elif not recv.received(n):
            self._overflow(conn, out)
            return
        out.append(DataReceived(cid, payload))

    def _on_connected(self, cid: int, out: list) -> None:
        conn = self._conns.get(cid)
        if conn is None:
            return  # aborted while connecting; the server has our ERROR
        if conn.state not in (ConnState.CONNECTING, ConnState.CONNECTING_PEER_DONE):
            raise RemoteProtocolError(f"connection {cid}: CONNECTED in state {conn.state.value!r}")
        self._open_windows(conn)
        self._step(conn, ConnEvent.READY, RemoteProtocolError, out)
        out.append(ConnectionReady(cid))
        if conn.pending:
            pending, conn.pending, conn.pending_bytes = conn.pending, [], 0
            for datagram in pending:
                self._send_datagram(conn, datagram, out)

    def _on_close(self, conn: Conn, out: list) -> None:
        if not conn.udp:
            out.append(RemoteEOF(conn.cid))
        self._step(conn, ConnEvent.RECV_CLOSE, RemoteProtocolError, out)

    def _on_pong(self, cid: int, out: list) -> None:
        out.append(PongReceived(cid))

    def _forget(self, conn: Conn) -> None:
        super()._forget(conn)
        if conn.addr is not None:
            self._by_addr.pop(conn.addr, None)
