"""The tunnel client's machine (container side): the executable specification of ``tunnel-client-rs``.

The tunnel client keeps one WebSocket to its runner (``/ws/tunnel/{container}``) and opens TCP connections
and UDP sockets to ``127.0.0.1:{port}`` on request. Each call returns a list of actions, to be applied in
order (per connection, ``WriteData``/``ShutdownWrite``/``CloseConnection`` go through one FIFO, so a
shutdown never overtakes the data before it):

==========================  ==============================================================================
action                      the daemon does
==========================  ==============================================================================
``SendFrame(data)``         write one binary message to the runner
``OpenTcp(cid, port)``      connect to 127.0.0.1:port, then call ``connected`` or ``connect_failed``
``OpenUdp(cid, port)``      a UDP socket connected to 127.0.0.1:port, then ``connected``/``connect_failed``
``WriteData(cid, data)``    write to the TCP connection (data may arrive before it is connected: queue it);
                            call ``delivered(cid, n)`` once written
``SendDatagram(cid, data)`` send one datagram on the UDP socket
``ShutdownWrite(cid)``      after the queued writes, shut down the write side (the runner sent CLOSE)
``CloseConnection(cid,      close the socket: after the queued writes, or at once dropping them when
abort, reason)``            ``abort`` is true (a TCP reset is appropriate then)
``CreditAvailable(cid, n)`` the runner returned credit: reading the socket may resume
``Negotiated(params)``      the runner's first frame settled the features (log it)
==========================  ==============================================================================

Local events go in as calls: ``connected``, ``connect_failed``, ``data_read`` (never more than
``send_credit`` bytes; read at most that much), ``eof``, ``datagram``, ``local_error``, ``delivered``; the
WebSocket itself: ``start()`` after each (re)connect (sends HELLO), ``disconnected()`` when it drops (every
connection is aborted; nothing survives a reconnect), ``expire(now)`` every few seconds (idle UDP sockets).

Protocol rules this machine pins down: PING is answered with PONG carrying the same client id; unknown
message types are ignored; CLOSE is a half-close (the runner sends CLOSE when the user's side finished
sending, or when its session ended); ERROR from the runner aborts the connection; DATA for a connection
that does not exist is answered with ERROR "unknown connection" so a runner that forgot it can say so;
CONNECT for an id that is still open replaces it (the runner only reuses an id it has closed).
"""

from __future__ import annotations

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
    "CloseConnection",
    "CreditAvailable",
    "Negotiated",
    "OpenTcp",
    "OpenUdp",
    "SendDatagram",
    "SendFrame",
    "ShutdownWrite",
    "TunnelClient",
    "WriteData",
]

_CONNECT, _CONNECTED, _DATA, _CLOSE, _ERROR, _PING, _PONG, _HELLO, _WINDOW = (int(t) for t in MsgType)


# -- actions -----------------------------------------------------------------------------------------------


@attrs.frozen
class OpenTcp:
    client_id: int
    port: int


@attrs.frozen
class OpenUdp:
    client_id: int
    port: int


@attrs.frozen
class WriteData:
    client_id: int
    data: bytes | memoryview


@attrs.frozen
class SendDatagram:
    client_id: int
    data: bytes | memoryview


@attrs.frozen
class ShutdownWrite:
    client_id: int


@attrs.frozen
class CloseConnection:
    client_id: int
    abort: bool = False
    reason: str | None = None


# -- per connection ----------------------------------------------------------------------------------------


class _Conn:
    __slots__ = ("cid", "last_active", "pending", "pending_bytes", "proto", "recv", "send", "state", "udp")

    def __init__(self, cid: int, proto: Proto, now: float) -> None:
        self.cid = cid
        self.proto = proto
        self.udp = proto is Proto.UDP
        self.state = ConnState.CONNECTING
        self.send: SendWindow | None = None
        self.recv: ReceiveWindow | BoundedBuffer | None = None
        self.last_active = now
        self.pending: list[bytes] = []  # UDP datagrams that arrived before the socket was ready
        self.pending_bytes = 0


class TunnelClient:
    """Container side of one container tunnel. ``window``: what we accept per connection (announced)."""

    def __init__(
        self,
        *,
        flow_control: bool = True,
        hello: bool = True,
        window: int = DEFAULT_WINDOW,
        legacy_buffer_limit: int = DEFAULT_LEGACY_BUFFER,
        udp_idle_timeout: float = 300.0,
        max_connections: int = 65536,
    ) -> None:
        self.hello = hello  # hello=False: behave as a seed-protocol client (tests of the runner's fallbacks)
        self.flow_control = flow_control and hello
        self.window = window
        self.legacy_buffer_limit = legacy_buffer_limit
        self.udp_idle_timeout = udp_idle_timeout
        self.max_connections = max_connections
        self._link: LinkParams | None = None
        self._conns: dict[int, _Conn] = {}

    # -- introspection ------------------------------------------------------------------------------------

    @property
    def link(self) -> LinkParams | None:
        return self._link

    def state(self, client_id: int) -> ConnState:
        conn = self._conns.get(client_id)
        return ConnState.CLOSED if conn is None else conn.state

    @property
    def connections(self) -> list[int]:
        return list(self._conns)

    def send_credit(self, client_id: int) -> int | None:
        """Bytes that may be read from the local socket and sent now; None: unlimited."""
        conn = self._conns.get(client_id)
        if conn is None or conn.state not in CAN_SEND:
            return 0
        return None if conn.send is None else conn.send.credit

    # -- the WebSocket -------------------------------------------------------------------------------------

    def start(self) -> list:
        """The WebSocket to the runner is (re)connected: send HELLO first."""
        if self._link is not None or self._conns:
            raise LocalProtocolError("start() on a link that is in use: call disconnected() first")
        return [SendFrame(hello_frame(self.flow_control, self.window))] if self.hello else []

    def disconnected(self, reason: str = "tunnel disconnected") -> list:
        """The WebSocket dropped: every connection is aborted and the features are forgotten."""
        out = [CloseConnection(cid, abort=True, reason=reason) for cid in self._conns]
        self._conns.clear()
        self._link = None
        return out

    def receive_frame(self, data: bytes | bytearray | memoryview, now: float) -> list:
        """One binary message from the runner."""
        if len(data) < HEADER_SIZE:
            raise RemoteProtocolError(f"frame too short: {len(data)} bytes")
        type_code, proto_code, cid, port = HEADER.unpack_from(data)
        if proto_code > 1 and _CONNECT <= type_code <= _WINDOW:
            raise RemoteProtocolError(f"unknown proto 0x{proto_code:02x}")
        out: list = []
        if self._link is None:
            self._link = resolve_link(self.flow_control, self.window, type_code, data)
            out.append(Negotiated(self._link))
            if type_code == _HELLO:
                return out
        if type_code == _DATA:  # the hot path first
            self._on_data(cid, data, now, out)
        elif type_code == _WINDOW:
            if len(data) != HEADER_SIZE + WINDOW_PAYLOAD.size:
                raise RemoteProtocolError(f"WINDOW payload must be {WINDOW_PAYLOAD.size} bytes")
            conn = self._conns.get(cid)
            if conn is not None and conn.send is not None:
                conn.send.add(WINDOW_PAYLOAD.unpack_from(data, HEADER_SIZE)[0])
                if conn.state in CAN_SEND:
                    out.append(CreditAvailable(cid, conn.send.credit))
        elif type_code == _CONNECT:
            self._on_connect(cid, Proto(proto_code), port, now, out)
        elif type_code == _CLOSE:
            conn = self._conns.get(cid)
            if conn is not None and conn.state not in (ConnState.PEER_DONE, ConnState.CONNECTING_PEER_DONE):
                if conn.udp:
                    self._forget(conn)
                    out.append(CloseConnection(cid))
                else:
                    out.append(ShutdownWrite(cid))
                    self._step(conn, ConnEvent.RECV_CLOSE, RemoteProtocolError, out)
        elif type_code == _ERROR:
            conn = self._conns.get(cid)
            if conn is not None:
                self._forget(conn)
                reason = bytes(data[HEADER_SIZE:]).decode("utf-8", errors="replace")
                out.append(CloseConnection(cid, abort=True, reason=reason))
        elif type_code == _PING:
            out.append(SendFrame(encode(MsgType.PONG, cid)))
        elif type_code == _HELLO:
            raise RemoteProtocolError("HELLO must be the runner's first message")
        elif type_code == _CONNECTED:
            raise RemoteProtocolError("CONNECTED from the runner")
        # PONG (an answer to nothing we track) and unknown types: ignored.
        return out

    def _on_connect(self, cid: int, proto: Proto, port: int, now: float, out: list) -> None:
        old = self._conns.get(cid)
        if old is not None:
            self._forget(old)
            out.append(CloseConnection(cid, abort=True, reason="client id reused by the runner"))
        if port == 0:
            out.append(SendFrame(encode(MsgType.ERROR, cid, b"invalid port 0", proto=proto)))
            return
        if len(self._conns) >= self.max_connections:
            out.append(SendFrame(encode(MsgType.ERROR, cid, b"too many connections", proto=proto)))
            return
        conn = self._conns[cid] = _Conn(cid, proto, now)
        link = self._link
        if link.flow_control:
            conn.send = SendWindow(link.send_window)
            conn.recv = ReceiveWindow(self.window)
        else:
            conn.recv = BoundedBuffer(self.legacy_buffer_limit)
        out.append(OpenUdp(cid, port) if conn.udp else OpenTcp(cid, port))

    def _on_data(self, cid: int, data: bytes | bytearray | memoryview, now: float, out: list) -> None:
        conn = self._conns.get(cid)
        if conn is None:
            out.append(SendFrame(encode(MsgType.ERROR, cid, b"unknown connection")))
            return
        state = conn.state
        # DATA may precede our CONNECTED: a seed-protocol CLI streams right after CONNECT.
        if state not in CAN_RECEIVE and state is not ConnState.CONNECTING:
            raise RemoteProtocolError(f"connection {cid}: DATA in state {state.value!r}")
        payload = memoryview(data)[HEADER_SIZE:]
        n = len(payload)
        recv = conn.recv
        window = type(recv) is ReceiveWindow
        if window:
            recv.received(n)
        if conn.udp:
            conn.last_active = now
            if state is ConnState.OPEN:
                out.append(SendDatagram(cid, payload))
                if window:  # a datagram is delivered the moment it is handed over
                    self._credit(conn, n, out)
            elif window or conn.pending_bytes + n <= self.legacy_buffer_limit:
                # Until the socket exists; the window (or the legacy bound) caps this queue.
                conn.pending.append(bytes(payload))
                conn.pending_bytes += n
            return
        if not window and not recv.received(n):
            self._forget(conn)
            out.append(SendFrame(encode(MsgType.ERROR, cid, b"receive buffer overflow")))
            out.append(CloseConnection(cid, abort=True, reason="receive buffer overflow"))
            return
        out.append(WriteData(cid, payload))

    # -- local events --------------------------------------------------------------------------------------

    def connected(self, client_id: int) -> list:
        """The local connect (or UDP socket) succeeded: CONNECTED, then whatever waited for it."""
        conn = self._conns.get(client_id)
        if conn is None:
            return []  # aborted while connecting; the CloseConnection for it was already returned
        out: list = [SendFrame(encode(MsgType.CONNECTED, client_id, proto=conn.proto))]
        self._step(conn, ConnEvent.READY, LocalProtocolError, out)
        if conn.pending:
            pending, conn.pending, conn.pending_bytes = conn.pending, [], 0
            for datagram in pending:
                out.append(SendDatagram(client_id, datagram))
                if type(conn.recv) is ReceiveWindow:
                    self._credit(conn, len(datagram), out)
        return out

    def connect_failed(self, client_id: int, reason: str) -> list:
        conn = self._conns.get(client_id)
        if conn is None:
            return []
        if conn.state not in (ConnState.CONNECTING, ConnState.CONNECTING_PEER_DONE):
            raise LocalProtocolError(f"connection {client_id}: connect_failed in state {conn.state.value!r}")
        self._forget(conn)
        return [
            SendFrame(encode(MsgType.ERROR, client_id, reason.encode(), proto=conn.proto)),
            CloseConnection(client_id, abort=True, reason=reason),
        ]

    def data_read(self, client_id: int, data: bytes | bytearray | memoryview) -> list:
        """Bytes read from the local TCP connection (at most ``send_credit``)."""
        conn = self._conns.get(client_id)
        if conn is None or not data:
            return []
        if conn.state not in CAN_SEND or conn.udp:
            raise LocalProtocolError(
                f"connection {client_id}: cannot send DATA in state {conn.state.value!r}"
            )
        if conn.send is not None:
            conn.send.consume(len(data))
        return [SendFrame(encode(MsgType.DATA, client_id, data))]

    def datagram(self, client_id: int, data: bytes | bytearray | memoryview, now: float) -> list:
        """A datagram from the local UDP service; dropped when it exceeds the credit (DESIGN)."""
        conn = self._conns.get(client_id)
        if conn is None:
            return []
        if conn.state is not ConnState.OPEN or not conn.udp:
            raise LocalProtocolError(
                f"connection {client_id}: no datagram expected in state {conn.state.value!r}"
            )
        conn.last_active = now
        send = conn.send
        if send is not None:
            if len(data) > send.credit:
                return []
            send.credit -= len(data)
        return [SendFrame(encode(MsgType.DATA, client_id, data, proto=Proto.UDP))]

    def eof(self, client_id: int) -> list:
        """The local TCP connection reached end of file: CLOSE (a half-close)."""
        conn = self._conns.get(client_id)
        if conn is None:
            return []
        out: list = [SendFrame(encode(MsgType.CLOSE, client_id, proto=conn.proto))]
        self._step(conn, ConnEvent.SEND_CLOSE, LocalProtocolError, out)
        return out

    def local_error(self, client_id: int, reason: str) -> list:
        """The local socket failed (reset, ...): abort the connection both ways."""
        conn = self._conns.get(client_id)
        if conn is None:
            return []
        self._forget(conn)
        return [
            SendFrame(encode(MsgType.ERROR, client_id, reason.encode(), proto=conn.proto)),
            CloseConnection(client_id, abort=True, reason=reason),
        ]

    def delivered(self, client_id: int, n: int) -> list:
        """``n`` bytes of WriteData reached the local socket."""
        conn = self._conns.get(client_id)
        if conn is None:
            return []
        out: list = []
        if type(conn.recv) is ReceiveWindow:
            self._credit(conn, n, out)
        elif conn.recv is not None:
            conn.recv.delivered(n)
        return out

    def expire(self, now: float) -> list:
        """Close UDP sockets idle for ``udp_idle_timeout`` seconds (a CLI that vanished never CLOSEs them)."""
        deadline = now - self.udp_idle_timeout
        out: list = []
        for conn in [c for c in self._conns.values() if c.udp and c.last_active <= deadline]:
            self._forget(conn)
            out.append(SendFrame(encode(MsgType.CLOSE, conn.cid, proto=Proto.UDP)))
            out.append(CloseConnection(conn.cid, reason="idle"))
        return out

    # -- bookkeeping -----------------------------------------------------------------------------------------

    def _credit(self, conn: _Conn, n: int, out: list) -> None:
        credit = conn.recv.delivered(n)
        if credit and conn.state in CAN_RECEIVE:
            out.append(
                SendFrame(encode(MsgType.WINDOW, conn.cid, WINDOW_PAYLOAD.pack(credit), proto=conn.proto))
            )

    def _step(self, conn: _Conn, event: ConnEvent, error: type, out: list) -> None:
        conn.state = conn_transition(conn.udp, conn.state, event, error, conn.cid)
        if conn.state is ConnState.CLOSED:
            self._forget(conn)
            out.append(CloseConnection(conn.cid))

    def _forget(self, conn: _Conn) -> None:
        conn.state = ConnState.CLOSED
        del self._conns[conn.cid]
