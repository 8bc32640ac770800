"""Credit windows, the legacy bound, HELLO negotiation, client ids and the connection lifecycle table."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kohakuriver_proto import LocalProtocolError, RemoteProtocolError, frames
from kohakuriver_proto.flow import (
    TCP_TRANSITIONS,
    UDP_TRANSITIONS,
    BoundedBuffer,
    ConnEvent,
    ConnState,
    IdAllocator,
    LinkParams,
    ReceiveWindow,
    SendWindow,
    conn_transition,
    hello_frame,
    resolve_link,
)
from kohakuriver_proto.frames import FEATURE_FLOW_CONTROL, MAX_CLIENT_ID, MsgType

# -- windows ---------------------------------------------------------------------------------------------


def test_send_window_consumes_and_regains_credit():
    w = SendWindow(100)
    w.consume(60)
    assert (w.credit, w.in_flight) == (40, 60)
    with pytest.raises(LocalProtocolError):
        w.consume(41)  # overspending is our own bug
    w.add(60)
    assert w.credit == 100
    with pytest.raises(RemoteProtocolError):
        w.add(1)  # the peer returned credit for bytes that were never in flight
    assert w.credit == 100


def test_receive_window_rejects_overrun_and_batches_credit():
    r = ReceiveWindow(100)
    assert r.threshold == 25
    r.received(100)
    with pytest.raises(RemoteProtocolError):
        r.received(1)
    assert r.delivered(10) == 0  # below a quarter window: no WINDOW frame yet
    assert r.delivered(10) == 0
    assert r.delivered(5) == 25  # batch reached
    assert (r.held, r.pending, r.buffered) == (75, 0, 75)
    assert r.delivered(3) == 0
    assert r.flush() == 3
    assert r.held == 72
    with pytest.raises(LocalProtocolError):
        r.delivered(73)  # cannot deliver more than was received


def test_tiny_window_threshold_is_at_least_one_byte():
    r = ReceiveWindow(3)
    r.received(1)
    assert r.delivered(1) == 1


def test_bounded_buffer():
    b = BoundedBuffer(10)
    assert b.received(6) and b.received(4)
    assert not b.received(1)  # overflow: nothing accounted
    assert b.used == 10
    b.delivered(10)
    assert b.used == 0
    with pytest.raises(LocalProtocolError):
        b.delivered(1)


@given(
    window=st.integers(1, 5000),
    chunks=st.lists(st.integers(1, 3000), min_size=1, max_size=40),
    schedule=st.lists(st.integers(0, 2), max_size=400),
)
def test_credit_loop_never_exceeds_the_window_and_never_deadlocks(window, chunks, schedule):
    """A sender with a SendWindow and a receiver with a ReceiveWindow over a FIFO, in any interleaving."""
    send, recv = SendWindow(window), ReceiveWindow(window)
    to_recv: deque[int] = deque()  # DATA sizes on the wire
    to_send: deque[int] = deque()  # WINDOW credits on the wire
    buffered = 0  # received, not yet delivered
    todo = sum(chunks)
    delivered_total = 0

    def send_some():
        nonlocal todo
        n = min(todo, send.credit, 3000)
        if n:
            send.consume(n)
            to_recv.append(n)
            todo -= n
        return bool(n)

    def receive_one():
        nonlocal buffered
        if not to_recv:
            return False
        n = to_recv.popleft()
        recv.received(n)
        buffered += n
        return True

    def deliver_and_credit():
        nonlocal buffered, delivered_total
        moved = False
        if buffered:
            credit = recv.delivered(buffered)
            delivered_total += buffered
            buffered = 0
            if credit:
                to_send.append(credit)
            moved = True
        if to_send:
            send.add(to_send.popleft())
            moved = True
        return moved

    steps = [send_some, receive_one, deliver_and_credit]
    for choice in schedule:
        steps[choice]()
        assert sum(to_recv) + recv.held <= window  # in flight + held never exceeds the window
        assert send.in_flight == sum(to_recv) + recv.held + sum(to_send)
    while any([step() for step in steps]):
        pass
    assert todo == 0 and delivered_total == sum(chunks)  # no deadlock: everything arrived
    assert send.credit == window - recv.pending  # what is left out is less than one batch
    assert recv.pending < recv.threshold


# -- negotiation -----------------------------------------------------------------------------------------


def test_hello_frame():
    raw = hello_frame(True, 1234)
    f = frames.decode(raw)
    assert (f.type, f.client_id, f.port) == (MsgType.HELLO, 0, 0)
    assert frames.parse_hello(f) == (FEATURE_FLOW_CONTROL, 1234)
    assert frames.parse_hello(frames.decode(hello_frame(False))) == (0, frames.DEFAULT_WINDOW)
    with pytest.raises(LocalProtocolError):
        hello_frame(True, 0)


def test_resolve_link_from_the_first_message():
    hello = hello_frame(True, 5000)
    assert resolve_link(True, 100, MsgType.HELLO, hello) == LinkParams(True, True, 5000, 100)
    # We did not announce flow control: off, but the peer still speaks this version.
    assert resolve_link(False, 100, MsgType.HELLO, hello) == LinkParams(True, False, 0, 100)
    # The peer did not announce it.
    assert resolve_link(True, 100, MsgType.HELLO, hello_frame(False, 5000)).flow_control is False
    # Unknown feature bits are ignored.
    other = frames.encode(MsgType.HELLO, 0, frames.HELLO_PAYLOAD.pack(0xFFFF_FFFF, 7))
    assert resolve_link(True, 100, MsgType.HELLO, other) == LinkParams(True, True, 7, 100)
    # Anything else first: a seed-protocol peer.
    connect = frames.encode(MsgType.CONNECT, 1, port=80)
    assert resolve_link(True, 100, MsgType.CONNECT, connect) == LinkParams(False, False, 0, 100)


def test_resolve_link_rejects_bad_hellos():
    with pytest.raises(RemoteProtocolError):
        resolve_link(True, 100, MsgType.HELLO, frames.encode(MsgType.HELLO, 0, b"\x00\x00\x00\x01"))
    zero = frames.encode(MsgType.HELLO, 0, frames.HELLO_PAYLOAD.pack(FEATURE_FLOW_CONTROL, 0))
    with pytest.raises(RemoteProtocolError):
        resolve_link(True, 100, MsgType.HELLO, zero)
    assert resolve_link(False, 100, MsgType.HELLO, zero).flow_control is False  # irrelevant when off


# -- client ids ------------------------------------------------------------------------------------------


def test_ids_count_up_from_one():
    ids = IdAllocator()
    assert [ids.allocate(()) for _ in range(3)] == [1, 2, 3]


def test_ids_wrap_around_skipping_zero_and_ids_in_use():
    ids = IdAllocator(MAX_CLIENT_ID - 1)
    in_use = {MAX_CLIENT_ID, 1, 2}
    assert ids.allocate(in_use) == MAX_CLIENT_ID - 1
    assert ids.allocate(in_use) == 3  # MAX in use, 0 reserved, 1 and 2 in use
    assert ids.allocate(set()) == 4


def test_closed_ids_come_back_only_after_a_full_cycle():
    ids = IdAllocator()
    first = ids.allocate(set())
    assert ids.allocate(set()) != first  # closed at once, still not reused


def test_ids_exhausted():
    class Full:
        def __len__(self):
            return MAX_CLIENT_ID

        def __contains__(self, item):
            return True

    with pytest.raises(LocalProtocolError):
        IdAllocator().allocate(Full())


@given(st.integers(0, MAX_CLIENT_ID), st.sets(st.integers(1, 64), max_size=40), st.integers(1, 50))
def test_ids_never_collide_with_ids_in_use(first, in_use, count):
    ids = IdAllocator(first)
    live = {(first + i) & MAX_CLIENT_ID for i in in_use}
    for _ in range(count):
        cid = ids.allocate(live)
        assert cid != 0 and cid not in live and 0 < cid <= MAX_CLIENT_ID
        live.add(cid)


# -- lifecycle table -------------------------------------------------------------------------------------


def test_tcp_half_close_both_orders():
    s = ConnState.CONNECTING
    s = conn_transition(False, s, ConnEvent.READY, LocalProtocolError, 1)
    assert conn_transition(False, s, ConnEvent.SEND_CLOSE, LocalProtocolError, 1) is ConnState.LOCAL_DONE
    done = conn_transition(False, ConnState.LOCAL_DONE, ConnEvent.RECV_CLOSE, RemoteProtocolError, 1)
    assert done is ConnState.CLOSED
    s = conn_transition(False, ConnState.OPEN, ConnEvent.RECV_CLOSE, RemoteProtocolError, 1)
    assert conn_transition(False, s, ConnEvent.SEND_CLOSE, LocalProtocolError, 1) is ConnState.CLOSED


def test_peer_close_before_ready_is_remembered():
    s = conn_transition(False, ConnState.CONNECTING, ConnEvent.RECV_CLOSE, RemoteProtocolError, 1)
    assert conn_transition(False, s, ConnEvent.READY, LocalProtocolError, 1) is ConnState.PEER_DONE


def test_illegal_transitions_blame_the_right_side():
    with pytest.raises(LocalProtocolError, match="connection 7"):
        conn_transition(False, ConnState.CONNECTING, ConnEvent.SEND_CLOSE, LocalProtocolError, 7)
    with pytest.raises(RemoteProtocolError):
        conn_transition(False, ConnState.OPEN, ConnEvent.READY, RemoteProtocolError, 7)


def test_udp_has_no_half_close():
    assert (
        conn_transition(True, ConnState.OPEN, ConnEvent.SEND_CLOSE, LocalProtocolError, 1) is ConnState.CLOSED
    )
    assert (
        conn_transition(True, ConnState.OPEN, ConnEvent.RECV_CLOSE, LocalProtocolError, 1) is ConnState.CLOSED
    )


def test_no_transition_leaves_closed():
    for table in (TCP_TRANSITIONS, UDP_TRANSITIONS):
        assert all(state is not ConnState.CLOSED for state, _ in table)
