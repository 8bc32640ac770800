"""The runner's multiplexer for one container: many user forward sessions over one tunnel-client WebSocket.

One ``ContainerTunnel`` per container, for the container's lifetime; the tunnel client's WebSocket attaches
and detaches (it reconnects), user forward sessions open and end. The daemon feeds it every binary message
and gets back actions:

- ``SendToContainer(data)`` / ``SendToSession(session, data)``: write ``data`` as one binary message to
  that peer. Actions for one peer must be written in the order given (one writer task per peer, FIFO).
  When ``action.needs_ack`` is true, call ``written(action)`` once the message has been written: the runner
  is then the flow-control endpoint for a peer that does not speak it, and credit or buffer space is
  released only when the bytes have really left the process.
- ``PauseReading(peer)`` / ``ResumeReading(peer)``: ``peer`` is None for the tunnel client, else a session
  key. After ``PauseReading`` the daemon feeds the message it holds (if any) and then receives nothing more
  from that peer's WebSocket until ``ResumeReading``; it keeps writing to it. ``reading_paused(peer)`` says
  the same at any time. Only a peer without flow control is ever paused (see below).
- ``ConnectionClosed(session, client_id, tunnel_id, reason)``: bookkeeping only (logs, metrics).
- ``TunnelDead(reason)`` from ``tick``: close the tunnel client's WebSocket and call ``detach()``.

Translation. Every CONNECT from a session gets a fresh tunnel id from this tunnel's counter, so sessions
never collide; all later frames are translated both ways by rewriting the header's client id (one copy of
the payload, no re-encoding). Frames from the container are routed by tunnel id; frames for an id that is
not open are stale: DATA is answered with ERROR "unknown connection" (which tells the sender to abort, like
a TCP reset), everything else is dropped.

Decisions (see ARCHITECTURE.md):

- PING from a session is answered by the runner (PONG, same client id) and not passed on: it checks the
  session's path to the runner, and the container's liveness is the runner's business (``tick``).
- CLOSE is a half-close and is passed on once every queued byte before it has gone; ERROR aborts and is
  passed on at once. Towards a tunnel client that never sent HELLO (a seed-protocol client, for which CLOSE
  already means "tear down") an abort is sent as CLOSE.
- A session that ends tears down each of its connections in the container (DESIGN: "sends CLOSE"): with
  CLOSE to a seed-protocol client, for which CLOSE means teardown, and with ERROR to a client that sent
  HELLO, for which CLOSE is only a half-close: its service would see a clean end of a truncated stream, and
  a connection still sending towards the vanished session would wait forever for credit.
- A container that detaches ends every connection with ERROR "tunnel disconnected" to its session; the
  sessions stay open (new CONNECTs get ERROR until a tunnel client attaches again).

Flow control is decided per connection and direction (a ``_Relay``), sender X to receiver Y:

- both speak it with equal windows: credits are *passed through* (WINDOW frames translated), the runner
  buffers nothing;
- otherwise the runner is the endpoint for each side: it credits X when the bytes leave its queue towards
  Y (within Y's credit), or, when Y does not speak flow control, once the daemon reports them written.
  UDP datagrams beyond the credit are dropped, never queued.

A sender without flow control (a seed-protocol peer) is slowed, never cut (DESIGN section 11): it cannot
be told to stop, and aborting its connection would drop bytes a correct peer sent. What the runner holds
per connection from such a sender (queued, or handed out and not yet written) is bounded by
``legacy_buffer_limit``; when a connection reaches it, the machine pauses reading that peer's WebSocket
(TCP then pushes back on the sender) and resumes once every connection of that peer is down to half the
bound (half, so that a steady transfer pauses once per half bound, not once per frame). Consequences,
accepted:

- memory: at most the bound per connection, plus the one message that crossed it (the message in hand when
  the pause was decided: it is accepted, never dropped);
- head-of-line blocking: the paused peer's other connections wait too; a peer with flow control is never
  paused, so the other sessions of a container keep flowing unless they go through the paused peer;
- keepalive: while the tunnel client is paused its PONGs wait unread, so its silence is the runner's doing:
  ``tick`` does not count it (the silence clock restarts at each tick while paused) and keeps sending PINGs,
  which tell the client the runner is alive. A tunnel client that died while paused is noticed once reading
  resumes (or when its WebSocket breaks);
- a paused session's own end (its close frame) is seen once it is resumed, or when its container ends.
A UDP datagram beyond the bound is dropped, as beyond a credit: datagrams may be lost, streams may not.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Hashable

import attrs

from .errors import LocalProtocolError, RemoteProtocolError
from .flow import (
    DEFAULT_LEGACY_BUFFER,
    IdAllocator,
    LinkParams,
    ReceiveWindow,
    SendWindow,
    hello_frame,
    resolve_link,
)
from .frames import (
    DEFAULT_WINDOW,
    HEADER,
    HEADER_SIZE,
    WINDOW_PAYLOAD,
    MsgType,
    Proto,
    encode,
    rewrite_client_id,
)

__all__ = [
    "ConnectionClosed",
    "ContainerTunnel",
    "PauseReading",
    "ResumeReading",
    "SendToContainer",
    "SendToSession",
    "SessionState",
    "TunnelDead",
    "TunnelState",
]

# Plain ints for the hot path: comparing against IntEnum members costs an attribute lookup each.
_CONNECT, _CONNECTED, _DATA, _CLOSE, _ERROR, _PING, _PONG, _HELLO, _WINDOW = (int(t) for t in MsgType)


# -- actions -----------------------------------------------------------------------------------------------


@attrs.frozen
class SendToContainer:
    data: bytes | bytearray
    _ack: _Relay | None = attrs.field(default=None, repr=False, eq=False)

    @property
    def needs_ack(self) -> bool:
        """Call ``ContainerTunnel.written(action)`` after writing this message."""
        return self._ack is not None


@attrs.frozen
class SendToSession:
    session: Hashable
    data: bytes | bytearray
    _ack: _Relay | None = attrs.field(default=None, repr=False, eq=False)

    @property
    def needs_ack(self) -> bool:
        """Call ``ContainerTunnel.written(action)`` after writing this message."""
        return self._ack is not None


@attrs.frozen
class ConnectionClosed:
    """A connection left the tables. ``reason`` is None when both sides closed it normally."""

    session: Hashable
    client_id: int
    tunnel_id: int
    reason: str | None


@attrs.frozen
class PauseReading:
    """Receive nothing more from ``peer`` (None: the tunnel client; else a session key) until resumed."""

    peer: Hashable


@attrs.frozen
class ResumeReading:
    """Read ``peer``'s WebSocket again."""

    peer: Hashable


@attrs.frozen
class TunnelDead:
    """No frame from the tunnel client for too long: close its WebSocket and call ``detach()``."""

    reason: str


# -- states ------------------------------------------------------------------------------------------------


class TunnelState(enum.Enum):
    DETACHED = "detached"
    NEGOTIATING = "negotiating"  # attached; the tunnel client's first frame (HELLO or not) is still due
    ATTACHED = "attached"
    BROKEN = "broken"  # the tunnel client broke the protocol: the daemon must close it and detach()


class SessionState(enum.Enum):
    OPENING = "opening"  # no binary message yet: HELLO may come
    ACTIVE = "active"
    BROKEN = "broken"  # the session broke the protocol: the daemon must close it and end_session()


_T = TunnelState
_TUNNEL_TRANSITIONS: dict[tuple[TunnelState, str], TunnelState] = {
    (_T.DETACHED, "attach"): _T.NEGOTIATING,
    (_T.NEGOTIATING, "first frame"): _T.ATTACHED,
    (_T.NEGOTIATING, "remote error"): _T.BROKEN,
    (_T.ATTACHED, "remote error"): _T.BROKEN,
    (_T.NEGOTIATING, "detach"): _T.DETACHED,
    (_T.ATTACHED, "detach"): _T.DETACHED,
    (_T.BROKEN, "detach"): _T.DETACHED,
    (_T.DETACHED, "detach"): _T.DETACHED,  # idempotent, for the daemon's cleanup paths
}
_S = SessionState
_SESSION_TRANSITIONS: dict[tuple[SessionState, str], SessionState] = {
    (_S.OPENING, "first frame"): _S.ACTIVE,
    (_S.OPENING, "remote error"): _S.BROKEN,
    (_S.ACTIVE, "remote error"): _S.BROKEN,
}
del _T, _S


# -- one direction of one connection -----------------------------------------------------------------------

_PENDING, _PASS, _CREDIT, _UNBOUNDED = range(4)


class _Gate:
    """Whether the daemon may read one peer's WebSocket (the tunnel client's, or a session's): shut while
    ``full`` connections from that peer hold the legacy bound at the runner. One per WebSocket: ``live`` is
    False once that WebSocket is gone, and then nothing is said about it any more."""

    __slots__ = ("full", "key", "live")

    def __init__(self, key: Hashable) -> None:
        self.key = key
        self.full = 0
        self.live = True


class _Relay:
    """One direction of one connection through the runner: sender X, receiver Y.

    Modes: ``_PENDING`` (Y's features unknown yet: queue), ``_PASS`` (both speak flow control with equal
    windows: Y's credits go straight back to X), ``_CREDIT`` (Y speaks it: the runner spends Y's credit and
    credits X itself), ``_UNBOUNDED`` (Y does not: forward at once, ack-tracked until written).

    ``gate``: X's, when X does not speak flow control and this is a stream: what the relay holds
    (``queued + unwritten``) shuts it at ``limit`` and opens it again at half of that.
    """

    __slots__ = (
        "conn",
        "dead",
        "fin_in",
        "fin_out",
        "full",
        "gate",
        "limit",
        "mode",
        "queue",
        "queued",
        "recv",
        "send",
        "udp",
        "unwritten",
        "up",
        "x_fc",
        "x_id",
        "x_window",
        "y_id",
    )

    def __init__(
        self, conn: _Conn, up: bool, x_id: int, y_id: int, udp: bool, limit: int, gate: _Gate
    ) -> None:
        self.conn = conn
        self.up = up  # True: session -> container
        self.x_id = x_id
        self.y_id = y_id
        self.udp = udp
        self.limit = limit
        self.mode = _PENDING
        self.x_fc = False
        self.x_window = 0
        self.recv: ReceiveWindow | None = None
        self.send: SendWindow | None = None
        self.queue: deque[bytearray] = deque()
        self.queued = 0
        self.unwritten = 0
        self.fin_in = False  # X sent CLOSE
        self.fin_out = False  # the CLOSE went on to Y
        self.dead = False
        self.gate: _Gate | None = None if udp else gate  # datagrams are dropped, not paused for
        self.full = False  # this relay holds the gate shut

    # emission ----------------------------------------------------------------------------------------------

    def _to_y(self, out: list, data: bytes | bytearray, ack: _Relay | None = None) -> None:
        if self.up:
            out.append(SendToContainer(data, ack))
        else:
            out.append(SendToSession(self.conn.session.key, data, ack))

    def _to_x(self, out: list, data: bytes | bytearray) -> None:
        if self.up:
            out.append(SendToSession(self.conn.session.key, data))
        else:
            out.append(SendToContainer(data))

    def _credit_x(self, n: int, out: list) -> None:
        recv = self.recv
        if recv is not None:
            credit = recv.delivered(n)
            if credit and not self.fin_in:
                self._to_x(out, encode(MsgType.WINDOW, self.x_id, WINDOW_PAYLOAD.pack(credit)))

    # configuration -----------------------------------------------------------------------------------------

    def set_x(self, fc: bool, window: int) -> None:
        self.x_fc = fc
        self.x_window = window
        self.recv = ReceiveWindow(window) if fc else None
        if fc:
            self.gate = None  # X's credit bounds it

    # the legacy bound -------------------------------------------------------------------------------------

    def _check_full(self, out: list) -> None:
        if not self.full and self.queued + self.unwritten >= self.limit:
            self.full = True
            gate = self.gate
            gate.full += 1
            if gate.full == 1 and gate.live:
                out.append(PauseReading(gate.key))

    def _check_drained(self, out: list) -> None:
        if self.queued + self.unwritten <= self.limit >> 1:
            self.release(out)

    def release(self, out: list) -> None:
        """Stop holding X's gate shut (drained, or the connection is gone)."""
        self.full = False
        gate = self.gate
        gate.full -= 1
        if gate.full == 0 and gate.live:
            out.append(ResumeReading(gate.key))

    def set_y(self, fc: bool, window: int, out: list) -> None:
        if fc and self.x_fc and window == self.x_window:
            # X's credit equals Y's from here on: whatever is queued fits in it, nothing was credited yet.
            self.mode, self.recv = _PASS, None
        else:
            self.mode = _CREDIT if fc else _UNBOUNDED
        self.send = SendWindow(window) if fc else None
        self._flush(out)

    # frames from X -----------------------------------------------------------------------------------------

    def on_data(self, data: bytes | bytearray | memoryview, n: int, out: list) -> None:
        """DATA from X (``n`` payload bytes). Never refused: X with flow control is bounded by its credit
        (overrunning it is a protocol error), X without it by the gate."""
        if self.fin_in:
            raise RemoteProtocolError(f"connection {self.x_id}: DATA after CLOSE")
        mode = self.mode
        if mode == _PASS:
            send = self.send
            if n > send.credit:
                raise RemoteProtocolError(
                    f"connection {self.x_id}: {n} bytes of DATA exceed the remaining window of {send.credit}"
                )
            send.credit -= n
            self._to_y(out, rewrite_client_id(data, self.y_id), None)
            return
        recv = self.recv
        if recv is not None:
            recv.received(n)
        if mode == _UNBOUNDED:
            if recv is None and self.udp and self.unwritten + n > self.limit:
                return  # a datagram beyond the bound is dropped
            self.unwritten += n
            self._to_y(out, rewrite_client_id(data, self.y_id), self)
            if self.gate is not None:
                self._check_full(out)
            return
        if mode == _CREDIT and not self.queue:
            send = self.send
            if n <= send.credit:
                send.credit -= n
                self._to_y(out, rewrite_client_id(data, self.y_id), None)
                self._credit_x(n, out)
                return
            if self.udp:  # DESIGN: datagrams beyond the credit are dropped, not queued
                self._credit_x(n, out)
                return
        if recv is None and self.udp and self.queued + n > self.limit:
            return
        self.queue.append(rewrite_client_id(data, self.y_id))
        self.queued += n
        if mode == _CREDIT:
            self._flush(out)  # send the part the credit allows now
        if self.gate is not None:
            self._check_full(out)

    def on_close(self, out: list) -> None:
        """CLOSE from X: pass it on behind the queued data."""
        if self.fin_in:
            return  # a repeated CLOSE changes nothing
        self.fin_in = True
        if not self.queue:
            self._send_fin(out)

    def _send_fin(self, out: list) -> None:
        self.fin_out = True
        self._to_y(out, encode(MsgType.CLOSE, self.y_id, proto=self.conn.proto))

    # frames from Y, acks from the daemon -------------------------------------------------------------------

    def on_window(self, data: bytes | bytearray | memoryview, credit: int, out: list) -> None:
        mode = self.mode
        if mode == _PASS:
            self.send.add(credit)
            if not self.fin_in:
                self._to_x(out, rewrite_client_id(data, self.x_id))
        elif mode == _CREDIT:
            self.send.add(credit)
            self._flush(out)
        # _PENDING / _UNBOUNDED: Y did not negotiate flow control, its WINDOW frames mean nothing.

    def on_written(self, n: int, out: list) -> None:
        self.unwritten -= n
        self._credit_x(n, out)
        if self.full:
            self._check_drained(out)

    def _flush(self, out: list) -> None:
        queue = self.queue
        mode = self.mode
        if mode == _UNBOUNDED:
            while queue:
                frame = queue.popleft()
                n = len(frame) - HEADER_SIZE
                self.queued -= n
                self.unwritten += n
                self._to_y(out, frame, self)
        elif mode != _PENDING:
            send = self.send
            while queue:
                frame = queue[0]
                n = len(frame) - HEADER_SIZE
                if n <= send.credit:
                    queue.popleft()
                    send.credit -= n
                elif self.udp:
                    queue.popleft()
                    self.queued -= n
                    self._credit_x(n, out)
                    continue
                elif send.credit:
                    # Split: send what the credit allows now, keep the rest (with a copy of the header).
                    n = send.credit
                    queue[0] = frame[:HEADER_SIZE] + frame[HEADER_SIZE + n :]
                    frame = frame[: HEADER_SIZE + n]
                    send.credit = 0
                else:
                    break
                self.queued -= n
                self._to_y(out, frame, None)
                self._credit_x(n, out)
        if self.full:
            self._check_drained(out)
        if not queue and self.fin_in and not self.fin_out:
            self._send_fin(out)


# -- sessions and connections ------------------------------------------------------------------------------


class _Session:
    __slots__ = ("announced", "conns", "fc", "gate", "key", "port", "proto", "state", "window")

    def __init__(self, key: Hashable, proto: Proto, port: int) -> None:
        self.key = key
        self.gate = _Gate(key)
        self.proto = proto
        self.port = port
        self.state = SessionState.OPENING
        self.fc = False  # flow control negotiated with this session
        self.window = 0  # the session's announced window: the runner's credit towards it
        self.announced = 0  # the window the runner announced to it: the session's credit towards the runner
        self.conns: dict[int, _Conn] = {}


class _Conn:
    __slots__ = ("connected", "down", "proto", "session", "sid", "tid", "up")

    def __init__(self, session: _Session, sid: int, tid: int, limit: int, tunnel_gate: _Gate) -> None:
        self.session = session
        self.sid = sid
        self.tid = tid
        self.proto = session.proto
        self.connected = False
        udp = session.proto is Proto.UDP
        self.up = _Relay(self, True, sid, tid, udp, limit, session.gate)
        self.down = _Relay(self, False, tid, sid, udp, limit, tunnel_gate)


# -- the machine -------------------------------------------------------------------------------------------


class ContainerTunnel:
    """Runner side of one container's tunnel. See the module docstring for the actions it returns.

    ``window``: the per-connection window the runner announces (to the tunnel client, and to sessions
    when the tunnel client's own window is not known yet). ``legacy_buffer_limit``: per connection, what the
    runner holds from a sender without flow control before it pauses reading that sender. ``ping_interval``:
    seconds between PINGs to the tunnel client; it is dead after ``dead_after`` intervals without any frame
    from it (not counting the time the runner itself was not reading it).
    """

    def __init__(
        self,
        container_id: str,
        *,
        flow_control: bool = True,
        window: int = DEFAULT_WINDOW,
        legacy_buffer_limit: int = DEFAULT_LEGACY_BUFFER,
        ping_interval: float = 15.0,
        dead_after: int = 3,
        max_connections_per_session: int = 4096,
        first_id: int = 1,
    ) -> None:
        self.container_id = container_id
        self.flow_control = flow_control
        self.window = window
        self.legacy_buffer_limit = legacy_buffer_limit
        self.ping_interval = ping_interval
        self.dead_after = dead_after
        self.max_connections_per_session = max_connections_per_session
        self._hello = hello_frame(flow_control, window)
        self._ids = IdAllocator(first_id)
        self._state = TunnelState.DETACHED
        self._link: LinkParams | None = None  # the tunnel client's features, once its first frame arrived
        self._conns: dict[int, _Conn] = {}  # by tunnel id
        self._sessions: dict[Hashable, _Session] = {}
        self._gate = _Gate(None)  # the attached tunnel client's (a fresh one per attach)
        self._gate.live = False
        self._last_rx = 0.0
        self._next_ping = 0.0
        self._dead_reported = False

    # -- introspection --------------------------------------------------------------------------------------

    @property
    def state(self) -> TunnelState:
        return self._state

    @property
    def attached(self) -> bool:
        """A tunnel client is attached (new sessions may open)."""
        return self._state in (TunnelState.NEGOTIATING, TunnelState.ATTACHED)

    @property
    def link(self) -> LinkParams | None:
        return self._link

    @property
    def sessions(self) -> list[Hashable]:
        return list(self._sessions)

    def session_state(self, key: Hashable) -> SessionState:
        return self._session(key).state

    def connections(self, key: Hashable) -> dict[int, int]:
        """The session's open connections: its client id -> tunnel id."""
        return {sid: conn.tid for sid, conn in self._session(key).conns.items()}

    @property
    def connection_count(self) -> int:
        return len(self._conns)

    def queue_bound(self, key: Hashable | None = None) -> int:
        """The most payload this machine can have handed out, not yet written, towards session ``key`` (or
        the tunnel client: None): per open connection, the receiver's window or, towards a peer without
        flow control, what is unwritten (at most the sender's window or the legacy bound, plus the one
        message that crossed that bound before its sender was paused). What a peer's writer queues beyond
        this (plus a margin for frame headers and control frames) is a peer that stopped reading its
        WebSocket; a peer the runner stopped reading is not that, and is not counted here at all."""
        if key is None:
            relays = [conn.up for conn in self._conns.values()]
        else:
            session = self._sessions.get(key)
            relays = [] if session is None else [conn.down for conn in session.conns.values()]
        floor = max(self.window, self.legacy_buffer_limit)
        total = 0
        for relay in relays:
            send = relay.send
            total += max(floor, relay.unwritten, 0 if send is None else send.window)
        return total

    def reading_paused(self, peer: Hashable | None = None) -> bool:
        """Whether the daemon must not read ``peer`` (None: the tunnel client; else a session key) now:
        the state the last ``PauseReading`` / ``ResumeReading`` for it announced."""
        if peer is None:
            return self._gate.live and self._gate.full > 0
        session = self._sessions.get(peer)
        return session is not None and session.gate.full > 0

    def _transition(self, event: str) -> None:
        try:
            self._state = _TUNNEL_TRANSITIONS[self._state, event]
        except KeyError:
            raise LocalProtocolError(f"cannot {event} a tunnel in state {self._state.value!r}") from None

    def _session(self, key: Hashable) -> _Session:
        try:
            return self._sessions[key]
        except KeyError:
            raise LocalProtocolError(f"no session {key!r}") from None

    # -- the tunnel client's WebSocket ----------------------------------------------------------------------

    def attach(self, now: float) -> list:
        """A tunnel client connected. Returns the runner's HELLO and a PING: a seed-protocol client answers
        the PING with PONG, so its first frame settles the features even when it never sends HELLO."""
        self._transition("attach")
        self._gate = _Gate(None)
        self._last_rx = now
        self._next_ping = now + self.ping_interval
        self._dead_reported = False
        return [SendToContainer(self._hello), SendToContainer(encode(MsgType.PING, 0))]

    def detach(self, reason: str = "tunnel disconnected") -> list:
        """The tunnel client's WebSocket is gone: every connection ends with ERROR to its session."""
        self._transition("detach")
        self._link = None
        self._gate.live = False  # that WebSocket is gone: resuming it means nothing
        out: list = []
        payload = reason.encode()
        for conn in list(self._conns.values()):
            out.append(
                SendToSession(conn.session.key, encode(MsgType.ERROR, conn.sid, payload, proto=conn.proto))
            )
            self._remove(conn, reason, out)
        return out

    def tick(self, now: float) -> list:
        """Keepalive; call at least every ``ping_interval`` seconds."""
        if not self.attached:
            return []
        if self._gate.full:
            # The runner is not reading the tunnel client: its frames, PONGs included, wait unread, so its
            # silence is the runner's doing. The PINGs still go out: they tell the client the runner lives.
            self._last_rx = now
        silent = now - self._last_rx
        if silent >= self.dead_after * self.ping_interval:
            if self._dead_reported:
                return []
            self._dead_reported = True
            return [TunnelDead(f"no frame from the tunnel client for {silent:.1f} s")]
        if now >= self._next_ping:
            self._next_ping = now + self.ping_interval
            return [SendToContainer(encode(MsgType.PING, 0))]
        return []

    def receive_from_container(self, data: bytes | bytearray | memoryview, now: float) -> list:
        """One binary message from the tunnel client. RemoteProtocolError: close it and ``detach()``."""
        state = self._state
        if state is not TunnelState.ATTACHED and state is not TunnelState.NEGOTIATING:
            raise LocalProtocolError(f"tunnel is {state.value}: no frames expected from a tunnel client")
        try:
            if len(data) < HEADER_SIZE:
                raise RemoteProtocolError(f"frame too short: {len(data)} bytes")
            self._last_rx = now
            type_code, proto_code, tid, _port = HEADER.unpack_from(data)
            if proto_code > 1 and _CONNECT <= type_code <= _WINDOW:
                raise RemoteProtocolError(f"unknown proto 0x{proto_code:02x}")
            out: list = []
            if state is TunnelState.NEGOTIATING:
                self._resolve_container(type_code, data, out)
                if type_code == _HELLO:
                    return out
            if type_code == _DATA:  # the hot path first
                conn = self._conns.get(tid)
                if conn is None:
                    out.append(SendToContainer(encode(MsgType.ERROR, tid, b"unknown connection")))
                elif not conn.connected:
                    raise RemoteProtocolError(f"connection {tid}: DATA before CONNECTED")
                else:
                    conn.down.on_data(data, len(data) - HEADER_SIZE, out)
                return out
            self._container_frame(type_code, tid, data, out)
            return out
        except RemoteProtocolError:
            self._transition("remote error")
            raise

    def _container_frame(
        self, type_code: int, tid: int, data: bytes | bytearray | memoryview, out: list
    ) -> None:
        if type_code == _WINDOW:
            credit = _window_credit(data)
            conn = self._conns.get(tid)
            if conn is not None:
                conn.up.on_window(data, credit, out)
                self._maybe_finish(conn, out)
        elif type_code == _CONNECTED:
            conn = self._conns.get(tid)
            if conn is not None:
                if conn.connected:
                    raise RemoteProtocolError(f"connection {tid}: CONNECTED twice")
                conn.connected = True
                out.append(SendToSession(conn.session.key, rewrite_client_id(data, conn.sid)))
        elif type_code == _CLOSE:
            conn = self._conns.get(tid)
            if conn is not None:
                self._on_close(conn, conn.down, out)
        elif type_code == _ERROR:
            conn = self._conns.get(tid)
            if conn is not None:
                out.append(SendToSession(conn.session.key, rewrite_client_id(data, conn.sid)))
                self._remove(conn, "error from the tunnel client: " + _reason(data), out)
        elif type_code == _PING:
            out.append(SendToContainer(encode(MsgType.PONG, tid)))
        elif type_code == _HELLO:
            raise RemoteProtocolError("HELLO must be the tunnel client's first message")
        elif type_code == _CONNECT:
            raise RemoteProtocolError("CONNECT from the tunnel client")
        # PONG: liveness only (already noted). Unknown types: ignored (DESIGN section 4).

    def _resolve_container(self, type_code: int, data: bytes | bytearray | memoryview, out: list) -> None:
        link = resolve_link(self.flow_control, self.window, type_code, data)
        self._transition("first frame")
        self._link = link
        for conn in list(self._conns.values()):
            self._setup(conn, out)

    # -- sessions -------------------------------------------------------------------------------------------

    def open_session(self, key: Hashable, proto: Proto, port: int) -> list:
        """A user forward session for ``proto``/``port`` was accepted (the daemon sent it "CONNECTED")."""
        if not self.attached:
            raise LocalProtocolError("no tunnel client attached: answer the session with an error instead")
        if key is None:
            raise LocalProtocolError("None names the tunnel client, it cannot be a session key")
        if key in self._sessions:
            raise LocalProtocolError(f"session {key!r} is already open")
        if not 1 <= port <= 0xFFFF:
            raise LocalProtocolError(f"port out of range: {port}")
        self._sessions[key] = _Session(key, Proto(proto), port)
        return []

    def end_session(self, key: Hashable) -> list:
        """The session's WebSocket is gone (or it broke the protocol): tear down its connections."""
        session = self._sessions.pop(key, None)
        if session is None:
            return []
        session.gate.live = False
        out: list = []
        attached = self.attached
        for conn in list(session.conns.values()):
            if attached:
                self._abort_to_container(conn, "session ended", out)
            self._remove(conn, "session ended", out)
        return out

    def receive_from_session(self, key: Hashable, data: bytes | bytearray | memoryview) -> list:
        """One binary message from a session. RemoteProtocolError: close that session and ``end_session``."""
        session = self._session(key)
        if session.state is SessionState.BROKEN:
            raise LocalProtocolError(f"session {key!r} broke the protocol: end it")
        try:
            if len(data) < HEADER_SIZE:
                raise RemoteProtocolError(f"frame too short: {len(data)} bytes")
            type_code, proto_code, sid, port = HEADER.unpack_from(data)
            if proto_code > 1 and _CONNECT <= type_code <= _WINDOW:
                raise RemoteProtocolError(f"unknown proto 0x{proto_code:02x}")
            out: list = []
            if session.state is SessionState.OPENING:
                session.state = _SESSION_TRANSITIONS[session.state, "first frame"]
                if type_code == _HELLO:
                    self._session_hello(session, data, out)
                    return out
            if type_code == _DATA:  # the hot path first
                conn = session.conns.get(sid)
                if conn is None:
                    out.append(SendToSession(key, encode(MsgType.ERROR, sid, b"unknown connection")))
                else:
                    conn.up.on_data(data, len(data) - HEADER_SIZE, out)
                return out
            self._session_frame(session, type_code, proto_code, sid, port, data, out)
            return out
        except RemoteProtocolError:
            session.state = _SESSION_TRANSITIONS[session.state, "remote error"]
            raise

    def _session_frame(
        self,
        session: _Session,
        type_code: int,
        proto_code: int,
        sid: int,
        port: int,
        data: bytes | bytearray | memoryview,
        out: list,
    ) -> None:
        key = session.key
        if type_code == _WINDOW:
            credit = _window_credit(data)
            conn = session.conns.get(sid)
            if conn is not None:
                conn.down.on_window(data, credit, out)
                self._maybe_finish(conn, out)
        elif type_code == _CONNECT:
            self._session_connect(session, proto_code, sid, port, out)
        elif type_code == _CLOSE:
            conn = session.conns.get(sid)
            if conn is not None:
                self._on_close(conn, conn.up, out)
        elif type_code == _ERROR:
            conn = session.conns.get(sid)
            if conn is not None:
                reason = _reason(data)
                if self.attached:
                    self._abort_to_container(conn, reason, out, original=data)
                self._remove(conn, "error from the session: " + reason, out)
        elif type_code == _PING:
            out.append(SendToSession(key, encode(MsgType.PONG, sid)))
        elif type_code == _HELLO:
            raise RemoteProtocolError("HELLO must be the session's first message")
        elif type_code == _CONNECTED:
            raise RemoteProtocolError("CONNECTED from a session")
        # PONG and unknown types: ignored.

    def _session_hello(self, session: _Session, data: bytes | bytearray | memoryview, out: list) -> None:
        # Announce the tunnel client's own window when known, so that session -> container credits can be
        # passed straight through; otherwise the runner's (and the relay terminates flow control).
        link = self._link
        announced = link.send_window if link is not None and link.flow_control else self.window
        params = resolve_link(self.flow_control, announced, _HELLO, data)
        session.fc = params.flow_control
        session.window = params.send_window
        session.announced = announced
        out.append(SendToSession(session.key, hello_frame(self.flow_control, announced)))

    def _session_connect(self, session: _Session, proto_code: int, sid: int, port: int, out: list) -> None:
        if proto_code != session.proto:
            raise RemoteProtocolError(f"CONNECT proto {proto_code} in a {session.proto.name} session")
        if port not in (0, session.port):
            raise RemoteProtocolError(f"CONNECT to port {port} in a session for port {session.port}")
        if sid in session.conns:
            raise RemoteProtocolError(f"CONNECT for client id {sid}, which is already open")
        if not self.attached:
            out.append(SendToSession(session.key, _error(sid, session.proto, "tunnel not connected")))
            return
        if len(session.conns) >= self.max_connections_per_session:
            out.append(SendToSession(session.key, _error(sid, session.proto, "too many connections")))
            return
        tid = self._ids.allocate(self._conns)
        conn = _Conn(session, sid, tid, self.legacy_buffer_limit, self._gate)
        self._conns[tid] = conn
        session.conns[sid] = conn
        out.append(SendToContainer(encode(MsgType.CONNECT, tid, proto=session.proto, port=session.port)))
        conn.up.set_x(session.fc, session.announced)
        if self._link is not None:
            self._setup(conn, out)

    def _setup(self, conn: _Conn, out: list) -> None:
        """Both links' features are known: configure both directions (and flush what waited for that)."""
        link = self._link
        session = conn.session
        if conn.up.mode == _PENDING:
            conn.up.set_y(link.flow_control, link.send_window, out)
        conn.down.set_x(link.flow_control, self.window)
        conn.down.set_y(session.fc, session.window, out)
        self._maybe_finish(conn, out)

    # -- acks -----------------------------------------------------------------------------------------------

    def written(self, action: SendToContainer | SendToSession) -> list:
        """The daemon wrote an action whose ``needs_ack`` is true."""
        relay = action._ack
        if relay is None or relay.dead:
            return []
        out: list = []
        relay.on_written(len(action.data) - HEADER_SIZE, out)
        return out

    # -- closing --------------------------------------------------------------------------------------------

    def _on_close(self, conn: _Conn, relay: _Relay, out: list) -> None:
        if conn.proto is Proto.UDP:
            # No half-close for datagrams: either side's CLOSE ends the mapping.
            relay.queue.clear()
            relay._send_fin(out)
            self._remove(conn, None, out)
            return
        relay.on_close(out)
        self._maybe_finish(conn, out)

    def _maybe_finish(self, conn: _Conn, out: list) -> None:
        if conn.up.fin_out and conn.down.fin_out and not conn.up.dead:
            self._remove(conn, None, out)

    def _abort_to_container(
        self, conn: _Conn, reason: str, out: list, original: bytes | bytearray | memoryview | None = None
    ) -> None:
        link = self._link
        if link is not None and not link.peer_hello:
            out.append(SendToContainer(encode(MsgType.CLOSE, conn.tid, proto=conn.proto)))
        elif original is not None:
            out.append(SendToContainer(rewrite_client_id(original, conn.tid)))
        else:
            out.append(SendToContainer(_error(conn.tid, conn.proto, reason)))

    def _remove(self, conn: _Conn, reason: str | None, out: list) -> None:
        for relay in (conn.up, conn.down):
            if relay.full:
                relay.release(out)  # what it held is dropped with the connection
        conn.up.dead = conn.down.dead = True
        conn.up.queue.clear()
        conn.down.queue.clear()
        del self._conns[conn.tid]
        conn.session.conns.pop(conn.sid, None)
        out.append(ConnectionClosed(conn.session.key, conn.sid, conn.tid, reason))


def _window_credit(data: bytes | bytearray | memoryview) -> int:
    if len(data) != HEADER_SIZE + WINDOW_PAYLOAD.size:
        raise RemoteProtocolError(f"WINDOW payload must be {WINDOW_PAYLOAD.size} bytes")
    return WINDOW_PAYLOAD.unpack_from(data, HEADER_SIZE)[0]


def _reason(data: bytes | bytearray | memoryview) -> str:
    return bytes(data[HEADER_SIZE:]).decode("utf-8", errors="replace")


def _error(client_id: int, proto: Proto, reason: str) -> bytes:
    return encode(MsgType.ERROR, client_id, reason.encode(), proto=proto)
