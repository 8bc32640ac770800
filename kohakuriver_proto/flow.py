"""Per-connection bookkeeping shared by the tunnel machines: credit windows, HELLO negotiation, client ids
and the lifecycle table of one tunnelled connection.

Flow control (DESIGN section 4). Each side announces in its HELLO the window it is willing to *receive*
per connection; the window the peer announced is therefore our initial *send* credit (as in HTTP/2's
``SETTINGS_INITIAL_WINDOW_SIZE``). Per connection and direction:

- the sender holds a ``SendWindow``: DATA consumes credit, WINDOW frames from the receiver add it back;
- the receiver holds a ``ReceiveWindow``: DATA is "held" until the receiver reports it handed to its local
  socket, and the credit goes back in WINDOW frames batched at a quarter window, so a fast reader does not
  answer every DATA frame with a WINDOW frame. Batching at ``window // 4`` cannot deadlock: a sender that
  is out of credit has a full window held by the receiver, which returns it once delivered.

A peer that did not announce flow control (a seed-protocol peer) cannot be asked to wait, so what it
sends is bounded per connection some other way. At an endpoint (``Forwarder``, ``TunnelClient``) a
``BoundedBuffer`` holds the bytes received and not yet delivered below a limit, and a connection that
overflows it is closed (the caller decides how; the other connections are not affected). The runner's
``ContainerTunnel`` never cuts such a peer: at the same limit it stops reading the peer's WebSocket until
the connection drains (DESIGN section 11; see ``container_tunnel``).

Nothing here allocates per DATA frame: every operation is a few integer comparisons.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Hashable

import attrs

from . import frames
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .frames import DEFAULT_WINDOW, FEATURE_FLOW_CONTROL, HELLO_PAYLOAD, MAX_CLIENT_ID, MsgType

#: Per-connection bound on bytes a machine holds from a peer that does not speak flow control and has not
#: yet delivered onwards. An endpoint closes the connection beyond it ("receive buffer overflow"); the
#: runner's ContainerTunnel pauses reading that peer at it instead.
DEFAULT_LEGACY_BUFFER = 1024 * 1024

__all__ = [
    "CAN_RECEIVE",
    "CAN_SEND",
    "DEFAULT_LEGACY_BUFFER",
    "TCP_TRANSITIONS",
    "UDP_TRANSITIONS",
    "BoundedBuffer",
    "ConnEvent",
    "ConnState",
    "CreditAvailable",
    "IdAllocator",
    "LinkParams",
    "Negotiated",
    "ReceiveWindow",
    "SendFrame",
    "SendWindow",
    "conn_transition",
    "hello_frame",
    "resolve_link",
]


# -- credit windows ----------------------------------------------------------------------------------------


class SendWindow:
    """Credit for sending DATA payload on one connection in one direction."""

    __slots__ = ("credit", "window")

    def __init__(self, window: int) -> None:
        self.window = window
        self.credit = window

    @property
    def in_flight(self) -> int:
        """Bytes sent and not yet credited back by the receiver."""
        return self.window - self.credit

    def consume(self, n: int) -> None:
        """Account ``n`` bytes of DATA we are about to send; overspending is our bug."""
        if n > self.credit:
            raise LocalProtocolError(f"{n} bytes of DATA exceed the send credit of {self.credit} bytes")
        self.credit -= n

    def add(self, n: int) -> None:
        """Credit returned by a WINDOW frame. More than is in flight means the peer's accounting is broken."""
        if n > self.window - self.credit:
            raise RemoteProtocolError(
                f"WINDOW returns {n} bytes but only {self.window - self.credit} bytes are in flight"
            )
        self.credit += n

    def __repr__(self) -> str:
        return f"SendWindow(credit={self.credit}, window={self.window})"


class ReceiveWindow:
    """What the peer may still send us on one connection, and the credit we owe it.

    ``held`` counts bytes received and not yet credited back (the peer's view of its in-flight bytes);
    ``pending`` counts the delivered part of them, waiting to be returned in one batched WINDOW.
    """

    __slots__ = ("held", "pending", "threshold", "window")

    def __init__(self, window: int, threshold: int | None = None) -> None:
        self.window = window
        self.held = 0
        self.pending = 0
        self.threshold = max(1, window // 4) if threshold is None else threshold

    @property
    def buffered(self) -> int:
        """Bytes received and not yet handed to the local socket."""
        return self.held - self.pending

    def received(self, n: int) -> None:
        if self.held + n > self.window:
            raise RemoteProtocolError(
                f"peer sent {n} bytes of DATA with only {self.window - self.held} bytes of window left"
            )
        self.held += n

    def delivered(self, n: int) -> int:
        """``n`` received bytes were handed on; returns the credit to send in a WINDOW frame now (0: none)."""
        pending = self.pending + n
        if pending > self.held:
            raise LocalProtocolError(f"delivered {n} bytes but only {self.held - self.pending} were buffered")
        if pending >= self.threshold:
            self.held -= pending
            self.pending = 0
            return pending
        self.pending = pending
        return 0

    def flush(self) -> int:
        """Return every delivered-but-uncredited byte now (used when a batch must not wait)."""
        pending, self.pending = self.pending, 0
        self.held -= pending
        return pending

    def __repr__(self) -> str:
        return f"ReceiveWindow(held={self.held}, pending={self.pending}, window={self.window})"


class BoundedBuffer:
    """Receive-side bound for a peer without flow control: bytes received and not yet delivered."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int = DEFAULT_LEGACY_BUFFER) -> None:
        self.limit = limit
        self.used = 0

    def received(self, n: int) -> bool:
        """Account ``n`` more bytes; False (and nothing accounted) when that would exceed the limit."""
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def delivered(self, n: int) -> None:
        if n > self.used:
            raise LocalProtocolError(f"delivered {n} bytes but only {self.used} were buffered")
        self.used -= n

    def __repr__(self) -> str:
        return f"BoundedBuffer(used={self.used}, limit={self.limit})"


# -- HELLO negotiation -------------------------------------------------------------------------------------


@attrs.frozen
class LinkParams:
    """The outcome of the HELLO exchange on one WebSocket (one "link").

    ``peer_hello``: the peer sent HELLO, so it implements this version's semantics (CLOSE half-closes,
    ERROR aborts, in both directions). ``flow_control``: both sides announced it. ``send_window``: the
    peer's announced window, our initial credit on every new connection; ``recv_window``: ours.
    """

    peer_hello: bool
    flow_control: bool
    send_window: int
    recv_window: int


def hello_frame(flow_control: bool, window: int = DEFAULT_WINDOW) -> bytes:
    """Our HELLO: the flow-control bit when enabled, and the window we accept per connection."""
    if not 1 <= window <= MAX_CLIENT_ID:
        raise LocalProtocolError(f"window must be between 1 and 2**32-1 bytes, not {window}")
    return frames.encode_hello(FEATURE_FLOW_CONTROL if flow_control else 0, window)


def resolve_link(
    flow_control: bool, window: int, first_type: int, first: bytes | bytearray | memoryview
) -> LinkParams:
    """Decide a link's parameters from the peer's *first* binary message.

    A HELLO announces the peer's features; anything else means the peer speaks the seed protocol only.
    ``flow_control`` is whether we announced it, ``window`` what we announced.
    """
    if first_type != MsgType.HELLO:
        return LinkParams(peer_hello=False, flow_control=False, send_window=0, recv_window=window)
    if len(first) - frames.HEADER_SIZE < HELLO_PAYLOAD.size:
        raise RemoteProtocolError(f"HELLO payload must be {HELLO_PAYLOAD.size} bytes")
    features, peer_window = HELLO_PAYLOAD.unpack_from(first, frames.HEADER_SIZE)
    on = flow_control and bool(features & FEATURE_FLOW_CONTROL)
    if on and peer_window == 0:
        raise RemoteProtocolError("HELLO announces flow control with a zero window")
    return LinkParams(
        peer_hello=True, flow_control=on, send_window=peer_window if on else 0, recv_window=window
    )


@attrs.frozen
class Negotiated:
    """The peer's first binary message arrived and settled the link's features."""

    params: LinkParams


# -- events shared by the endpoint machines (Forwarder, TunnelClient) --------------------------------------


@attrs.frozen
class SendFrame:
    """Write ``data`` as one binary WebSocket message to the peer (in order with every other SendFrame)."""

    data: bytes | bytearray


@attrs.frozen
class CreditAvailable:
    """The peer returned credit on ``client_id``: up to ``credit`` bytes may be read and sent now."""

    client_id: int
    credit: int


# -- client ids --------------------------------------------------------------------------------------------


class IdAllocator:
    """Client ids: a u32 counter that wraps around, never yields 0 (reserved for link-level frames such as
    HELLO and PING) and skips ids still in use. Because it is a counter, a closed id comes back only after
    2**32 - 1 further allocations, so a late frame for a closed connection never reaches a new one."""

    __slots__ = ("_next",)

    def __init__(self, first: int = 1) -> None:
        if not 0 <= first <= MAX_CLIENT_ID:
            raise ValueError(f"first id out of range: {first}")
        self._next = first

    def allocate(self, in_use: Collection[int]) -> int:
        if len(in_use) >= MAX_CLIENT_ID:
            raise LocalProtocolError("every client id is in use")
        cid = self._next
        while cid == 0 or cid in in_use:
            cid = (cid + 1) & MAX_CLIENT_ID
        self._next = (cid + 1) & MAX_CLIENT_ID
        return cid


# -- the lifecycle of one connection at an endpoint --------------------------------------------------------


class ConnState(enum.Enum):
    """One tunnelled connection as seen by an endpoint (the CLI's Forwarder or the tunnel client).

    CLOSE is a half-close: the sender will send no more DATA. The connection is gone when both sides have
    sent CLOSE (or either sent ERROR, which aborts it). UDP mappings have no half-close: either CLOSE ends
    them.
    """

    CONNECTING = "connecting"  # CONNECT sent/received, not yet connected
    CONNECTING_PEER_DONE = "connecting, peer done"  # the peer sent CLOSE before the connection was ready
    OPEN = "open"
    LOCAL_DONE = "local done"  # we sent CLOSE; the peer may still send
    PEER_DONE = "peer done"  # the peer sent CLOSE; we may still send
    CLOSED = "closed"


class ConnEvent(enum.Enum):
    READY = "ready"  # CONNECTED (sent by the tunnel client, received by the Forwarder)
    SEND_CLOSE = "send CLOSE"
    RECV_CLOSE = "receive CLOSE"


_S, _E = ConnState, ConnEvent
TCP_TRANSITIONS: dict[tuple[ConnState, ConnEvent], ConnState] = {
    (_S.CONNECTING, _E.READY): _S.OPEN,
    (_S.CONNECTING, _E.RECV_CLOSE): _S.CONNECTING_PEER_DONE,
    (_S.CONNECTING_PEER_DONE, _E.READY): _S.PEER_DONE,
    (_S.OPEN, _E.SEND_CLOSE): _S.LOCAL_DONE,
    (_S.OPEN, _E.RECV_CLOSE): _S.PEER_DONE,
    (_S.LOCAL_DONE, _E.RECV_CLOSE): _S.CLOSED,
    (_S.PEER_DONE, _E.SEND_CLOSE): _S.CLOSED,
}
UDP_TRANSITIONS: dict[tuple[ConnState, ConnEvent], ConnState] = {
    (_S.CONNECTING, _E.READY): _S.OPEN,
    (_S.CONNECTING, _E.RECV_CLOSE): _S.CLOSED,
    (_S.OPEN, _E.SEND_CLOSE): _S.CLOSED,
    (_S.OPEN, _E.RECV_CLOSE): _S.CLOSED,
}
#: States in which an endpoint may send DATA, and in which it accepts DATA from the peer.
CAN_SEND = frozenset({_S.OPEN, _S.PEER_DONE})
CAN_RECEIVE = frozenset({_S.OPEN, _S.LOCAL_DONE})
del _S, _E


def conn_transition(
    udp: bool, state: ConnState, event: ConnEvent, error: type[ProtocolError], client_id: Hashable
) -> ConnState:
    """The next state, or ``error`` (Local- or RemoteProtocolError: whoever caused ``event``)."""
    table = UDP_TRANSITIONS if udp else TCP_TRANSITIONS
    try:
        return table[state, event]
    except KeyError:
        raise error(f"connection {client_id}: cannot {event.value} in state {state.value!r}") from None
