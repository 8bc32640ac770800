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

from .errors import LocalProtocolError, RemoteProtocolError
from .flow import (
    CAN_RECEIVE,
    CAN_SEND,
    DEFAULT_LEGACY_BUFFER,
    BoundedBuffer,
    ConnEvent,
    ConnState,
    CreditAvailable,
    IdAllocator,
    LinkParams,
    Negotiated,
    ReceiveWindow,
    SendFrame,
    SendWindow,
    conn_transition,
    hello_frame,
    resolve_link,
)
from .frames import DEFAULT_WINDOW, HEADER, HEADER_SIZE, WINDOW_PAYLOAD, MsgType, Proto, encode

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

_CONNECT, _CONNECTED, _DATA, _CLOSE, _ERROR, _PING, _PONG, _HELLO, _WINDOW = (int(t) for t in MsgType)


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


# -- per connection ----------------------------------------------------------------------------------------


class _Conn:
    __slots__ = ("addr", "cid", "last_active", "pending", "pending_bytes", "recv", "send", "state", "udp")

    def __init__(self, cid: int, udp: bool, addr: Hashable = None, now: float = 0.0) -> None:
        self.cid = cid
        self.udp = udp
        self.addr = addr
        self.state = ConnState.CONNECTING
        self.send: SendWindow | None = None  # None: the server does not speak flow control
        self.recv: ReceiveWindow | BoundedBuffer | None = None
        self.last_active = now
        self.pending: list[bytes] = []  # UDP datagrams waiting for CONNECTED
        self.pending_bytes = 0


class Forwarder:
    """One forward session, CLI side. ``proto``/``port``: what the session forwards to in the container."""

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
        self.proto = Proto(proto)
        self.port = port
        # hello=False behaves as a seed-protocol client: no HELLO, hence no flow control either.
        self.hello = hello
        self.flow_control = flow_control and hello
        self.window = window
        self.legacy_buffer_limit = legacy_buffer_limit
        self.udp_idle_timeout = udp_idle_timeout
        self.udp_pending_limit = udp_pending_limit
        self._udp = self.proto is Proto.UDP
        self._ids = IdAllocator(first_id)
        self._link: LinkParams | None = None
        self._started = False
        self._conns: dict[int, _Conn] = {}
        self._by_addr: dict[Hashable, _Conn] = {}

    # -- introspection ------------------------------------------------------------------------------------

    @property
    def link(self) -> LinkParams | None:
        """The negotiated features, once the server's first binary message arrived."""
        return self._link

    def state(self, client_id: int) -> ConnState:
        """A connection's state (CLOSED once it left the table)."""
        conn = self._conns.get(client_id)
        return ConnState.CLOSED if conn is None else conn.state

    @property
    def connections(self) -> list[int]:
        return list(self._conns)

    def send_credit(self, client_id: int) -> int | None:
        """Bytes that may be sent on the connection now; None: unlimited (no flow control)."""
        conn = self._conns.get(client_id)
        if conn is None or conn.state not in CAN_SEND:
            return 0
        return None if conn.send is None else conn.send.credit

    # -- session -------------------------------------------------------------------------------------------

    def start(self) -> list:
        """The first binary message of the session: HELLO (nothing when ``hello`` is off)."""
        if self._started:
            raise LocalProtocolError("start() was already called")
        self._started = True
        return [SendFrame(hello_frame(self.flow_control, self.window))] if self.hello else []

    def ping(self, client_id: int = 0) -> list:
        return [SendFrame(encode(MsgType.PING, client_id))]

    def close(self, reason: str = "session closed") -> list:
        """The WebSocket is gone: every connection is aborted."""
        out = [ConnectionClosed(conn.cid, reason, aborted=True) for conn in self._conns.values()]
        self._conns.clear()
        self._by_addr.clear()
        return out

    # -- TCP, local side -----------------------------------------------------------------------------------

    def open_connection(self) -> tuple[int, list]:
        """A local TCP client connected: its client id and the CONNECT to send."""
        if self._udp:
            raise LocalProtocolError("open_connection() is for TCP sessions; use datagram_from()")
        cid = self._ids.allocate(self._conns)
        self._conns[cid] = _Conn(cid, False)
        return cid, [SendFrame(encode(MsgType.CONNECT, cid, proto=Proto.TCP, port=self.port))]

    def send_data(self, client_id: int, data: bytes | bytearray | memoryview) -> list:
        """Bytes read from the local socket. Raises LocalProtocolError beyond ``send_credit``."""
        conn = self._conns.get(client_id)
        if conn is None or not data:
            return []  # the connection ended meanwhile (its ConnectionClosed is on its way)
        if conn.state not in CAN_SEND or conn.udp:
            raise LocalProtocolError(
                f"connection {client_id}: cannot send DATA in state {conn.state.value!r}"
            )
        if conn.send is not None:
            conn.send.consume(len(data))
        return [SendFrame(encode(MsgType.DATA, client_id, data))]

    def local_eof(self, client_id: int) -> list:
        """The local client shut down its write side (or closed): CLOSE, a half-close."""
        conn = self._conns.get(client_id)
        if conn is None:
            return []
        out: list = [SendFrame(encode(MsgType.CLOSE, client_id, proto=self.proto))]
        self._step(conn, ConnEvent.SEND_CLOSE, LocalProtocolError, out)
        return out

    def abort(self, client_id: int, reason: str = "aborted by the client") -> list:
        """Give up on a connection in any state (local error, connect timeout): ERROR, forgotten at once."""
        conn = self._conns.get(client_id)
        if conn is None:
            return []
        self._forget(conn)
        return [SendFrame(encode(MsgType.ERROR, client_id, reason.encode(), proto=self.proto))]

    def delivered(self, client_id: int, n: int) -> list:
        """``n`` bytes of DataReceived were written to the local socket."""
        conn = self._conns.get(client_id)
        if conn is None:
            return []
        recv = conn.recv
        if type(recv) is ReceiveWindow:
            credit = recv.delivered(n)
            if credit and conn.state in CAN_RECEIVE:
                return [SendFrame(encode(MsgType.WINDOW, client_id, WINDOW_PAYLOAD.pack(credit)))]
        elif recv is not None:
            recv.delivered(n)
        return []

    # -- UDP, local side -----------------------------------------------------------------------------------

    def datagram_from(self, addr: Hashable, data: bytes | bytearray | memoryview, now: float) -> list:
        """A datagram from local peer ``addr``. Datagrams beyond the credit are dropped (DESIGN)."""
        if not self._udp:
            raise LocalProtocolError("datagram_from() is for UDP sessions")
        out: list = []
        conn = self._by_addr.get(addr)
        if conn is None:
            cid = self._ids.allocate(self._conns)
            conn = self._conns[cid] = self._by_addr[addr] = _Conn(cid, True, addr, now)
            out.append(SendFrame(encode(MsgType.CONNECT, cid, proto=Proto.UDP, port=self.port)))
        conn.last_active = now
        if conn.state is ConnState.CONNECTING:
            if conn.pending_bytes + len(data) <= self.udp_pending_limit:
                conn.pending.append(bytes(data))
                conn.pending_bytes += len(data)
            return out
        self._send_datagram(conn, data, out)
        return out

    def _send_datagram(self, conn: _Conn, data: bytes | bytearray | memoryview, out: list) -> None:
        send = conn.send
        if send is not None:
            if len(data) > send.credit:
                return
            send.credit -= len(data)
        out.append(SendFrame(encode(MsgType.DATA, conn.cid, data, proto=Proto.UDP)))

    def expire(self, now: float) -> list:
        """CLOSE UDP mappings idle for ``udp_idle_timeout`` seconds; call every few seconds."""
        out: list = []
        if not self._udp:
            return out
        deadline = now - self.udp_idle_timeout
        for conn in [c for c in self._conns.values() if c.last_active <= deadline]:
            out.append(SendFrame(encode(MsgType.CLOSE, conn.cid, proto=Proto.UDP)))
            out.append(ConnectionClosed(conn.cid, "idle"))
            self._forget(conn)
        return out

    # -- frames from the server ------------------------------------------------------------------------------

    def receive_frame(self, data: bytes | bytearray | memoryview, now: float) -> list:
        """One binary message from the session WebSocket."""
        if len(data) < HEADER_SIZE:
            raise RemoteProtocolError(f"frame too short: {len(data)} bytes")
        type_code, proto_code, cid, _port = HEADER.unpack_from(data)
        if proto_code > 1 and _CONNECT <= type_code <= _WINDOW:
            raise RemoteProtocolError(f"unknown proto 0x{proto_code:02x}")
        out: list = []
        if self._link is None:
            self._link = resolve_link(self.flow_control, self.window, type_code, data)
            out.append(Negotiated(self._link))
            if type_code == _HELLO:
                return out
        if type_code == _DATA:  # the hot path first
            conn = self._conns.get(cid)
            if conn is None:
                out.append(SendFrame(encode(MsgType.ERROR, cid, b"unknown connection", proto=self.proto)))
                return out
            if conn.state not in CAN_RECEIVE:
                raise RemoteProtocolError(f"connection {cid}: DATA in state {conn.state.value!r}")
            payload = memoryview(data)[HEADER_SIZE:]
            n = len(payload)
            recv = conn.recv
            if conn.udp:
                conn.last_active = now
                if type(recv) is ReceiveWindow:
                    recv.received(n)
                    credit = recv.delivered(n)  # a datagram is delivered the moment it is handed over
                    if credit:
                        out.append(
                            SendFrame(
                                encode(MsgType.WINDOW, cid, WINDOW_PAYLOAD.pack(credit), proto=Proto.UDP)
                            )
                        )
                out.append(DatagramReceived(cid, conn.addr, payload))
                return out
            if type(recv) is ReceiveWindow:
                recv.received(n)
            elif not recv.received(n):
                self._forget(conn)
                out.append(SendFrame(encode(MsgType.ERROR, cid, b"receive buffer overflow")))
                out.append(ConnectionClosed(cid, "receive buffer overflow", aborted=True))
                return out
            out.append(DataReceived(cid, payload))
            return out
        if type_code == _WINDOW:
            if len(data) != HEADER_SIZE + WINDOW_PAYLOAD.size:
                raise RemoteProtocolError(f"WINDOW payload must be {WINDOW_PAYLOAD.size} bytes")
            conn = self._conns.get(cid)
            if conn is not None and conn.send is not None:
                conn.send.add(WINDOW_PAYLOAD.unpack_from(data, HEADER_SIZE)[0])
                if conn.state in CAN_SEND:
                    out.append(CreditAvailable(cid, conn.send.credit))
        elif type_code == _CONNECTED:
            self._on_connected(cid, out)
        elif type_code == _CLOSE:
            conn = self._conns.get(cid)
            if conn is not None and conn.state not in (ConnState.PEER_DONE, ConnState.CONNECTING_PEER_DONE):
                if not conn.udp:
                    out.append(RemoteEOF(cid))
                self._step(conn, ConnEvent.RECV_CLOSE, RemoteProtocolError, out)
        elif type_code == _ERROR:
            conn = self._conns.get(cid)
            if conn is not None:
                self._forget(conn)
                reason = bytes(data[HEADER_SIZE:]).decode("utf-8", errors="replace")
                out.append(ConnectionClosed(cid, reason, aborted=True))
        elif type_code == _PING:
            out.append(SendFrame(encode(MsgType.PONG, cid)))
        elif type_code == _PONG:
            out.append(PongReceived(cid))
        elif type_code == _HELLO:
            raise RemoteProtocolError("HELLO must be the server's first message")
        elif type_code == _CONNECT:
            raise RemoteProtocolError("CONNECT from the server")
        # Unknown types: ignored (DESIGN section 4).
        return out

    def _on_connected(self, cid: int, out: list) -> None:
        conn = self._conns.get(cid)
        if conn is None:
            return  # aborted while connecting; the server has our ERROR
        if conn.state not in (ConnState.CONNECTING, ConnState.CONNECTING_PEER_DONE):
            raise RemoteProtocolError(f"connection {cid}: CONNECTED in state {conn.state.value!r}")
        link = self._link
        if link.flow_control:
            conn.send = SendWindow(link.send_window)
            conn.recv = ReceiveWindow(self.window)
        else:
            conn.recv = BoundedBuffer(self.legacy_buffer_limit)
        self._step(conn, ConnEvent.READY, RemoteProtocolError, out)
        out.append(ConnectionReady(cid))
        if conn.pending:
            pending, conn.pending, conn.pending_bytes = conn.pending, [], 0
            for datagram in pending:
                self._send_datagram(conn, datagram, out)

    # -- bookkeeping -----------------------------------------------------------------------------------------

    def _step(self, conn: _Conn, event: ConnEvent, error: type, out: list) -> None:
        conn.state = conn_transition(conn.udp, conn.state, event, error, conn.cid)
        if conn.state is ConnState.CLOSED:
            self._forget(conn)
            out.append(ConnectionClosed(conn.cid))

    def _forget(self, conn: _Conn) -> None:
        conn.state = ConnState.CLOSED
        del self._conns[conn.cid]
        if conn.addr is not None:
            self._by_addr.pop(conn.addr, None)
