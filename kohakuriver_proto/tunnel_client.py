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

from .endpoint import Conn, Endpoint
from .errors import LocalProtocolError, RemoteProtocolError
from .flow import (
    CAN_RECEIVE,
    DEFAULT_LEGACY_BUFFER,
    ConnEvent,
    ConnState,
    CreditAvailable,
    Negotiated,
    ReceiveWindow,
    SendFrame,
)
from .frames import DEFAULT_WINDOW, HEADER_SIZE, MsgType, Proto, encode

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


class TunnelClient(Endpoint):
    """Container side of one container tunnel. ``window``: what we accept per connection (announced)."""

    _peer = "runner"

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
        # hello=False: behave as a seed-protocol client (tests of the runner's fallbacks)
        super().__init__(
            flow_control=flow_control,
            hello=hello,
            window=window,
            legacy_buffer_limit=legacy_buffer_limit,
            udp_idle_timeout=udp_idle_timeout,
        )
        self.max_connections = max_connections

    # -- the WebSocket -------------------------------------------------------------------------------------

    def start(self) -> list:
        """The WebSocket to the runner is (re)connected: send HELLO first."""
        if self._link is not None or self._conns:
            raise LocalProtocolError("start() on a link that is in use: call disconnected() first")
        return self._hello()

    def disconnected(self, reason: str = "tunnel disconnected") -> list:
        """The WebSocket dropped: every connection is aborted and the features are forgotten."""
        self._link = None
        return self._abort_all(reason)

    # -- frames from the runner (Endpoint.receive_frame dispatches here) -------------------------------------

    def _closed(self, cid: int, reason: str | None = None, aborted: bool = False) -> CloseConnection:
        return CloseConnection(cid, abort=aborted, reason=reason)

    def _on_close(self, conn: Conn, out: list) -> None:
        if conn.udp:
            self._forget(conn)
            out.append(CloseConnection(conn.cid))
        else:
            out.append(ShutdownWrite(conn.cid))
            self._step(conn, ConnEvent.RECV_CLOSE, RemoteProtocolError, out)

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
        conn = self._conns[cid] = Conn(cid, proto, now)
        self._open_windows(conn)
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
            self._overflow(conn, out)
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
        return [self._drop(conn, reason), CloseConnection(client_id, abort=True, reason=reason)]

    def data_read(self, client_id: int, data: bytes | bytearray | memoryview) -> list:
        """Bytes read from the local TCP connection (at most ``send_credit``)."""
        return self._send_stream(client_id, data)

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
        return self._half_close(client_id)

    def local_error(self, client_id: int, reason: str) -> list:
        """The local socket failed (reset, ...): abort the connection both ways."""
        conn = self._conns.get(client_id)
        if conn is None:
            return []
        return [self._drop(conn, reason), CloseConnection(client_id, abort=True, reason=reason)]
