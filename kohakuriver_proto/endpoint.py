"""What both ends of a multiplexed tunnel link share: the connection table, HELLO negotiation, flow control.

``Forwarder`` (CLI side, ``forwarder.py``) and ``TunnelClient`` (container side, ``tunnel_client.py``) speak
the same frames to the same kind of peer (the server/runner relaying between them), so the bookkeeping that
does not depend on which side opens connections lives here once: a change to the credit rules or the
connection state machine then cannot drift between the two. Each subclass supplies its own DATA/CONNECT/
CONNECTED/CLOSE handling and, through ``_closed``, its own "the connection is finished" event type.
"""

from __future__ import annotations

from collections.abc import Hashable

from .errors import LocalProtocolError, RemoteProtocolError
from .flow import (
    CAN_RECEIVE,
    CAN_SEND,
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
from .frames import HEADER, HEADER_SIZE, WINDOW_PAYLOAD, MsgType, Proto, encode

__all__ = ["Conn", "Endpoint"]

_CONNECT, _CONNECTED, _DATA, _CLOSE, _ERROR, _PING, _PONG, _HELLO, _WINDOW = (int(t) for t in MsgType)

# Once the peer's CLOSE arrived, a second one is ignored rather than treated as a protocol error.
_PEER_CLOSED = (ConnState.PEER_DONE, ConnState.CONNECTING_PEER_DONE)


class Conn:
    """One multiplexed connection. ``addr``: the local UDP peer (CLI side only); ``pending``: datagrams that
    arrived before the connection was ready."""

    __slots__ = (
        "addr", "cid", "last_active", "pending", "pending_bytes", "proto", "recv", "send", "state", "udp",
    )  # fmt: skip

    def __init__(self, cid: int, proto: Proto, now: float = 0.0, addr: Hashable = None) -> None:
        self.cid = cid
        self.proto = proto
        self.udp = proto is Proto.UDP
        self.addr = addr
        self.state = ConnState.CONNECTING
        self.send: SendWindow | None = None  # None: the peer does not speak flow control
        self.recv: ReceiveWindow | BoundedBuffer | None = None
        self.last_active = now
        self.pending: list[bytes] = []
        self.pending_bytes = 0


class Endpoint:
    """The shared half of ``Forwarder`` and ``TunnelClient``; not used on its own."""

    # Who is at the other end of the WebSocket, for error messages ("server" or "runner").
    _peer = "peer"

    def __init__(
        self,
        *,
        flow_control: bool,
        hello: bool,
        window: int,
        legacy_buffer_limit: int,
        udp_idle_timeout: float,
    ) -> None:
        # hello=False behaves as a seed-protocol client: no HELLO, hence no flow control either.
        self.hello = hello
        self.flow_control = flow_control and hello
        self.window = window
        self.legacy_buffer_limit = legacy_buffer_limit
        self.udp_idle_timeout = udp_idle_timeout
        self._link: LinkParams | None = None
        self._conns: dict[int, Conn] = {}

    # -- introspection ------------------------------------------------------------------------------------

    @property
    def link(self) -> LinkParams | None:
        """The negotiated features, once the peer's first binary message arrived."""
        return self._link

    def state(self, client_id: int) -> ConnState:
        """A connection's state (CLOSED once it left the table)."""
        conn = self._conns.get(client_id)
        return ConnState.CLOSED if conn is None else conn.state

    @property
    def connections(self) -> list[int]:
        return list(self._conns)

    def send_credit(self, client_id: int) -> int | None:
        """Bytes that may be read from the local socket and sent now; None: unlimited (no flow control)."""
        conn = self._conns.get(client_id)
        if conn is None or conn.state not in CAN_SEND:
            return 0
        return None if conn.send is None else conn.send.credit

    # -- hooks for the subclasses ----------------------------------------------------------------------------

    def _closed(self, cid: int, reason: str | None = None, aborted: bool = False) -> object:
        """The side's "connection finished" event (``ConnectionClosed`` / ``CloseConnection``)."""
        raise NotImplementedError

    def _on_data(self, cid: int, data: bytes | bytearray | memoryview, now: float, out: list) -> None:
        raise NotImplementedError

    def _on_connect(self, cid: int, proto: Proto, port: int, now: float, out: list) -> None:
        raise RemoteProtocolError(f"CONNECT from the {self._peer}")

    def _on_connected(self, cid: int, out: list) -> None:
        raise RemoteProtocolError(f"CONNECTED from the {self._peer}")

    def _on_close(self, conn: Conn, out: list) -> None:
        raise NotImplementedError

    def _on_pong(self, cid: int, out: list) -> None:
        pass  # an answer to nothing this side tracks

    # -- frames from the peer --------------------------------------------------------------------------------

    def receive_frame(self, data: bytes | bytearray | memoryview, now: float) -> list:
        """One binary message from the WebSocket (the server's or the runner's)."""
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
        elif type_code == _CONNECTED:
            self._on_connected(cid, out)
        elif type_code == _CLOSE:
            conn = self._conns.get(cid)
            if conn is not None and conn.state not in _PEER_CLOSED:
                self._on_close(conn, out)
        elif type_code == _ERROR:
            conn = self._conns.get(cid)
            if conn is not None:
                self._forget(conn)
                reason = bytes(data[HEADER_SIZE:]).decode("utf-8", errors="replace")
                out.append(self._closed(cid, reason, aborted=True))
        elif type_code == _PING:
            out.append(SendFrame(encode(MsgType.PONG, cid)))
        elif type_code == _PONG:
            self._on_pong(cid, out)
        elif type_code == _HELLO:
            raise RemoteProtocolError(f"HELLO must be the {self._peer}'s first message")
        # Unknown types: ignored (DESIGN section 4).
        return out

    # -- local events ----------------------------------------------------------------------------------------

    def delivered(self, client_id: int, n: int) -> list:
        """``n`` bytes of received data were written to the local socket: returns the WINDOW credit to send
        (flow control), or releases the bounded buffer (seed-protocol peer)."""
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
        """CLOSE UDP connections idle for ``udp_idle_timeout`` seconds; call every few seconds."""
        deadline = now - self.udp_idle_timeout
        out: list = []
        for conn in [c for c in self._conns.values() if c.udp and c.last_active <= deadline]:
            self._forget(conn)
            out.append(SendFrame(encode(MsgType.CLOSE, conn.cid, proto=Proto.UDP)))
            out.append(self._closed(conn.cid, "idle"))
        return out

    # -- shared steps of the public calls --------------------------------------------------------------------

    def _hello(self) -> list:
        return [SendFrame(hello_frame(self.flow_control, self.window))] if self.hello else []

    def _abort_all(self, reason: str) -> list:
        """The WebSocket is gone: every connection is aborted (nothing survives it)."""
        out = [self._closed(cid, reason, aborted=True) for cid in self._conns]
        self._conns.clear()
        return out

    def _open_windows(self, conn: Conn) -> None:
        """The connection is set up: its flow control follows what the link negotiated."""
        link = self._link
        if link.flow_control:
            conn.send = SendWindow(link.send_window)
            conn.recv = ReceiveWindow(self.window)
        else:
            conn.recv = BoundedBuffer(self.legacy_buffer_limit)

    def _send_stream(self, client_id: int, data: bytes | bytearray | memoryview) -> list:
        """Bytes read from the local TCP socket: DATA. Raises LocalProtocolError beyond ``send_credit``."""
        conn = self._conns.get(client_id)
        if conn is None or not data:
            return []  # the connection ended meanwhile (its closed event is on its way)
        if conn.state not in CAN_SEND or conn.udp:
            raise LocalProtocolError(
                f"connection {client_id}: cannot send DATA in state {conn.state.value!r}"
            )
        if conn.send is not None:
            conn.send.consume(len(data))
        return [SendFrame(encode(MsgType.DATA, client_id, data))]

    def _half_close(self, client_id: int) -> list:
        """The local socket finished sending: CLOSE (a half-close)."""
        conn = self._conns.get(client_id)
        if conn is None:
            return []
        out: list = [SendFrame(encode(MsgType.CLOSE, client_id, proto=conn.proto))]
        self._step(conn, ConnEvent.SEND_CLOSE, LocalProtocolError, out)
        return out

    def _drop(self, conn: Conn, reason: str) -> SendFrame:
        """Forget ``conn`` at once; returns the ERROR that tells the peer why."""
        self._forget(conn)
        return SendFrame(encode(MsgType.ERROR, conn.cid, reason.encode(), proto=conn.proto))

    def _overflow(self, conn: Conn, out: list) -> None:
        """A seed-protocol peer sent more than the bounded buffer holds: abort the connection."""
        self._forget(conn)
        out.append(SendFrame(encode(MsgType.ERROR, conn.cid, b"receive buffer overflow")))
        out.append(self._closed(conn.cid, "receive buffer overflow", aborted=True))

    def _credit(self, conn: Conn, n: int, out: list) -> None:
        credit = conn.recv.delivered(n)
        if credit and conn.state in CAN_RECEIVE:
            out.append(
                SendFrame(encode(MsgType.WINDOW, conn.cid, WINDOW_PAYLOAD.pack(credit), proto=conn.proto))
            )

    # -- bookkeeping -----------------------------------------------------------------------------------------

    def _step(self, conn: Conn, event: ConnEvent, error: type, out: list) -> None:
        conn.state = conn_transition(conn.udp, conn.state, event, error, conn.cid)
        if conn.state is ConnState.CLOSED:
            self._forget(conn)
            out.append(self._closed(conn.cid))

    def _forget(self, conn: Conn) -> None:
        conn.state = ConnState.CLOSED
        del self._conns[conn.cid]
