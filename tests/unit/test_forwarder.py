"""Forwarder (CLI side of ``kr forward``): frames out, events in, flow control, UDP mappings."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kohakuriver_proto import LocalProtocolError, ProtocolError, RemoteProtocolError, frames
from kohakuriver_proto.flow import ConnState, CreditAvailable, Negotiated, SendFrame, hello_frame
from kohakuriver_proto.forwarder import (
    ConnectionClosed,
    ConnectionReady,
    DatagramReceived,
    DataReceived,
    Forwarder,
    PongReceived,
    RemoteEOF,
)
from kohakuriver_proto.frames import MsgType, Proto, encode, encode_window

T, U = Proto.TCP, Proto.UDP


def sent(events) -> list:
    """The frames among ``events`` as (type name, client id, payload)."""
    out = []
    for e in events:
        if isinstance(e, SendFrame):
            f = frames.decode(bytes(e.data))
            out.append((f.type.name, f.client_id, bytes(f.payload)))
    return out


def others(events) -> list:
    return [e for e in events if not isinstance(e, SendFrame)]


def ready(window=100, server_window=50, flow_control=True, **kw) -> tuple[Forwarder, int]:
    fw = Forwarder(T, 8080, window=window, flow_control=flow_control, **kw)
    fw.start()
    fw.receive_frame(hello_frame(True, server_window), 0.0)
    cid, _ = fw.open_connection()
    assert others(fw.receive_frame(encode(MsgType.CONNECTED, cid), 0.0)) == [ConnectionReady(cid)]
    return fw, cid


# -- session start and negotiation ---------------------------------------------------------------------------


def test_start_sends_hello_first():
    fw = Forwarder(T, 8080, window=4096)
    assert sent(fw.start()) == [("HELLO", 0, frames.HELLO_PAYLOAD.pack(1, 4096))]
    with pytest.raises(LocalProtocolError):
        fw.start()
    assert Forwarder(T, 8080, hello=False).start() == []
    assert sent(Forwarder(T, 8080, flow_control=False).start()) == [
        ("HELLO", 0, frames.HELLO_PAYLOAD.pack(0, frames.DEFAULT_WINDOW))
    ]


def test_server_hello_settles_flow_control():
    fw = Forwarder(T, 8080)
    fw.start()
    (neg,) = fw.receive_frame(hello_frame(True, 777), 0.0)
    assert isinstance(neg, Negotiated) and neg.params.flow_control and neg.params.send_window == 777


def test_a_seed_protocol_server_never_sends_hello():
    fw = Forwarder(T, 8080)
    fw.start()
    cid, out = fw.open_connection()
    assert sent(out) == [("CONNECT", 1, b"")] and frames.decode(out[0].data).port == 8080
    events = fw.receive_frame(encode(MsgType.CONNECTED, cid), 0.0)
    assert isinstance(events[0], Negotiated) and not events[0].params.flow_control
    assert events[1:] == [ConnectionReady(cid)]
    assert fw.send_credit(cid) is None  # unlimited
    assert sent(fw.send_data(cid, b"x" * 1_000_000))[0][2] == b"x" * 1_000_000


def test_late_hello_and_wrong_direction_frames_are_remote_errors():
    fw, _ = ready()
    with pytest.raises(RemoteProtocolError):
        fw.receive_frame(hello_frame(True), 0.0)
    with pytest.raises(RemoteProtocolError):
        fw.receive_frame(encode(MsgType.CONNECT, 1, port=1), 0.0)
    with pytest.raises(RemoteProtocolError):
        fw.receive_frame(b"\x03", 0.0)


# -- TCP -------------------------------------------------------------------------------------------------


def test_data_waits_for_connected():
    fw = Forwarder(T, 8080)
    fw.start()
    cid, _ = fw.open_connection()
    assert fw.send_credit(cid) == 0
    with pytest.raises(LocalProtocolError):
        fw.send_data(cid, b"too early")
    with pytest.raises(LocalProtocolError):
        fw.local_eof(cid)


def test_send_credit_and_window_frames():
    fw, cid = ready(server_window=10)
    assert fw.send_credit(cid) == 10
    assert sent(fw.send_data(cid, b"0123456789")) == [("DATA", cid, b"0123456789")]
    assert fw.send_credit(cid) == 0
    with pytest.raises(LocalProtocolError):
        fw.send_data(cid, b"!")
    assert fw.receive_frame(encode_window(cid, 4), 0.0) == [CreditAvailable(cid, 4)]
    with pytest.raises(RemoteProtocolError):
        fw.receive_frame(encode_window(cid, 7), 0.0)  # more credit than bytes in flight
    assert fw.send_data(cid, b"") == []


def test_received_data_is_credited_in_batches_once_delivered():
    fw, cid = ready(window=100)
    (ev,) = fw.receive_frame(encode(MsgType.DATA, cid, b"a" * 60), 0.0)
    assert ev == DataReceived(cid, memoryview(b"a" * 60))
    assert fw.delivered(cid, 20) == []  # below a quarter window
    assert sent(fw.delivered(cid, 10)) == [("WINDOW", cid, frames.WINDOW_PAYLOAD.pack(30))]
    fw.receive_frame(encode(MsgType.DATA, cid, b"b" * 70), 0.0)  # 30 held + 70 = the window
    with pytest.raises(RemoteProtocolError):
        fw.receive_frame(encode(MsgType.DATA, cid, b"c"), 0.0)


def test_half_close_from_either_side_first():
    fw, cid = ready()
    assert sent(fw.local_eof(cid)) == [("CLOSE", cid, b"")]
    assert fw.state(cid) is ConnState.LOCAL_DONE
    assert fw.send_credit(cid) == 0
    with pytest.raises(LocalProtocolError):
        fw.send_data(cid, b"x")
    assert fw.receive_frame(encode(MsgType.DATA, cid, b"still"), 0.0) == [
        DataReceived(cid, memoryview(b"still"))
    ]
    assert fw.receive_frame(encode(MsgType.CLOSE, cid), 0.0) == [RemoteEOF(cid), ConnectionClosed(cid)]
    assert fw.connections == []

    fw, cid = ready()
    assert fw.receive_frame(encode(MsgType.CLOSE, cid), 0.0) == [RemoteEOF(cid)]
    assert fw.receive_frame(encode(MsgType.CLOSE, cid), 0.0) == []  # repeated
    with pytest.raises(RemoteProtocolError):
        fw.receive_frame(encode(MsgType.DATA, cid, b"after close"), 0.0)
    fw, cid = ready()
    fw.receive_frame(encode(MsgType.CLOSE, cid), 0.0)
    assert sent(fw.send_data(cid, b"reply")) == [("DATA", cid, b"reply")]
    out = fw.local_eof(cid)
    assert sent(out) == [("CLOSE", cid, b"")] and others(out) == [ConnectionClosed(cid)]


def test_error_from_the_server_aborts_with_its_reason():
    fw = Forwarder(T, 8080)
    fw.start()
    cid, _ = fw.open_connection()
    fw.receive_frame(hello_frame(True), 0.0)
    out = fw.receive_frame(encode(MsgType.ERROR, cid, "connection refused ✗".encode()), 0.0)
    assert out == [ConnectionClosed(cid, "connection refused ✗", aborted=True)]
    assert fw.state(cid) is ConnState.CLOSED


def test_abort_sends_error_and_forgets():
    fw, cid = ready()
    assert sent(fw.abort(cid, "reset by peer")) == [("ERROR", cid, b"reset by peer")]
    assert fw.abort(cid) == [] and fw.send_data(cid, b"x") == [] and fw.delivered(cid, 1) == []
    # What the server still had in flight is answered so it stops, the rest dropped.
    assert sent(fw.receive_frame(encode(MsgType.DATA, cid, b"late"), 0.0)) == [
        ("ERROR", cid, b"unknown connection")
    ]
    assert fw.receive_frame(encode(MsgType.CONNECTED, cid), 0.0) == []
    assert fw.receive_frame(encode(MsgType.CLOSE, cid), 0.0) == []
    assert fw.receive_frame(encode_window(cid, 1), 0.0) == []


def test_ping_pong_and_unknown_types():
    fw, _ = ready()
    assert sent(fw.ping()) == [("PING", 0, b"")]
    assert fw.receive_frame(encode(MsgType.PONG, 0), 0.0) == [PongReceived(0)]
    assert sent(fw.receive_frame(encode(MsgType.PING, 5), 0.0)) == [("PONG", 5, b"")]
    assert fw.receive_frame(bytes([0x33, 0, 0, 0, 0, 1, 0, 0, 1, 2]), 0.0) == []


def test_seed_protocol_server_is_bounded_per_connection():
    fw = Forwarder(T, 8080, legacy_buffer_limit=10)
    fw.start()
    cid, _ = fw.open_connection()
    fw.receive_frame(encode(MsgType.CONNECTED, cid), 0.0)
    fw.receive_frame(encode(MsgType.DATA, cid, b"x" * 10), 0.0)
    fw.delivered(cid, 4)
    fw.receive_frame(encode(MsgType.DATA, cid, b"y" * 4), 0.0)
    out = fw.receive_frame(encode(MsgType.DATA, cid, b"z"), 0.0)
    assert sent(out) == [("ERROR", cid, b"receive buffer overflow")]
    assert others(out) == [ConnectionClosed(cid, "receive buffer overflow", aborted=True)]


def test_close_aborts_everything():
    fw, cid = ready()
    cid2, _ = fw.open_connection()
    assert fw.close() == [
        ConnectionClosed(cid, "session closed", aborted=True),
        ConnectionClosed(cid2, "session closed", aborted=True),
    ]
    assert fw.connections == []


def test_ids_wrap_around_and_skip_open_ones():
    fw = Forwarder(T, 8080, first_id=frames.MAX_CLIENT_ID - 1)
    ids = [fw.open_connection()[0] for _ in range(3)]
    assert ids == [frames.MAX_CLIENT_ID - 1, frames.MAX_CLIENT_ID, 1]
    fw.abort(1)
    assert fw.open_connection()[0] == 2


def test_tcp_and_udp_calls_are_not_mixed():
    with pytest.raises(LocalProtocolError):
        Forwarder(U, 53).open_connection()
    with pytest.raises(LocalProtocolError):
        Forwarder(T, 80).datagram_from(("127.0.0.1", 1), b"x", 0.0)
    with pytest.raises(LocalProtocolError):
        Forwarder(T, 0)


# -- UDP -------------------------------------------------------------------------------------------------


def test_udp_mapping_lifecycle():
    fw = Forwarder(U, 53, window=100, udp_idle_timeout=30.0)
    fw.start()
    fw.receive_frame(hello_frame(True, 20), 0.0)
    a, b = ("127.0.0.1", 5000), ("127.0.0.1", 5001)
    out = fw.datagram_from(a, b"q1", 1.0)
    assert sent(out) == [("CONNECT", 1, b"")]  # the datagram waits for CONNECTED
    assert fw.datagram_from(a, b"q2", 2.0) == []
    assert sent(fw.datagram_from(b, b"other", 2.0)) == [("CONNECT", 2, b"")]
    out = fw.receive_frame(encode(MsgType.CONNECTED, 1, proto=U), 3.0)
    assert sent(out) == [("DATA", 1, b"q1"), ("DATA", 1, b"q2")]
    assert ConnectionReady(1) in others(out)
    assert sent(fw.datagram_from(a, b"q3", 4.0)) == [("DATA", 1, b"q3")]
    # Replies carry the peer address; credit returns by itself, datagrams need no delivered() call.
    out = fw.receive_frame(encode(MsgType.DATA, 1, b"r" * 30, proto=U), 5.0)
    assert others(out) == [DatagramReceived(1, a, memoryview(b"r" * 30))]
    assert sent(out) == [("WINDOW", 1, frames.WINDOW_PAYLOAD.pack(30))]
    # Beyond the credit (20 - 6 bytes in flight) a datagram is dropped, not queued.
    assert fw.datagram_from(a, b"x" * 15, 6.0) == []
    # Idle mappings expire: b (last seen at 2.0) goes at 32.0, a (6.0) stays.
    out = fw.expire(32.0)
    assert sent(out) == [("CLOSE", 2, b"")] and others(out) == [ConnectionClosed(2, "idle")]
    # A CLOSE from the server ends a's mapping; its next datagram opens a new one.
    assert fw.receive_frame(encode(MsgType.CLOSE, 1, proto=U), 33.0) == [ConnectionClosed(1)]
    assert sent(fw.datagram_from(a, b"again", 34.0)) == [("CONNECT", 3, b"")]


def test_udp_pending_queue_is_bounded():
    fw = Forwarder(U, 53, udp_pending_limit=5)
    fw.start()
    addr = ("::1", 9)
    fw.datagram_from(addr, b"abc", 0.0)
    fw.datagram_from(addr, b"defg", 0.0)  # would exceed 5 bytes: dropped
    fw.datagram_from(addr, b"hi", 0.0)
    out = fw.receive_frame(encode(MsgType.CONNECTED, 1, proto=U), 0.0)
    assert sent(out) == [("DATA", 1, b"abc"), ("DATA", 1, b"hi")]


def test_expire_is_a_no_op_for_tcp():
    fw, _ = ready()
    assert fw.expire(1e9) == []


# -- flow-control property, with a fake server that echoes -------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    window=st.integers(1, 4000),
    server_window=st.integers(1, 4000),
    sizes=st.lists(st.integers(0, 6000), min_size=1, max_size=4),
    stalled=st.integers(0, 3),
    schedule=st.lists(st.integers(0, 1000), max_size=300),
)
def test_in_flight_bytes_never_exceed_the_window_and_a_stalled_reader_blocks_no_one(
    window, server_window, sizes, stalled, schedule
):
    """The fake server receives into a per-connection buffer and returns WINDOW when it consumes; the
    Forwarder's local readers deliver, except one that never reads. The window holds at every step and
    every other connection completes."""
    fw = Forwarder(T, 80, window=window)
    fw.start()
    up: deque[bytes] = deque()  # frames Forwarder -> server
    down: deque[bytes] = deque()  # frames server -> Forwarder
    down.append(hello_frame(True, server_window))
    payload = {}
    server_buf: dict[int, int] = {}  # bytes the server holds per connection
    server_sent: dict[int, int] = {}  # payload bytes the server still must echo
    server_credit: dict[int, int] = {}
    inbox: dict[int, list] = {}
    got: dict[int, int] = {}
    on_wire_down: dict[int, int] = {}
    for size in sizes:
        cid, out = fw.open_connection()
        up.extend(bytes(e.data) for e in out)
        payload[cid] = size
        server_buf[cid] = server_sent[cid] = 0
        server_credit[cid] = window
        inbox[cid], got[cid], on_wire_down[cid] = [], 0, 0
    stalled_cid = (stalled % len(sizes)) + 1
    sent_up = dict.fromkeys(payload, 0)

    def handle(events):
        for e in events:
            if isinstance(e, SendFrame):
                up.append(bytes(e.data))
            elif isinstance(e, DataReceived):
                inbox[e.client_id].append(len(e.data))
                on_wire_down[e.client_id] -= len(e.data)

    def step(k):
        kind, cid = k % 5, (k // 5) % len(sizes) + 1
        if kind == 0 and up:  # the server reads a frame
            f = frames.decode(up.popleft())
            if f.type == MsgType.CONNECT:
                down.append(encode(MsgType.CONNECTED, f.client_id))
            elif f.type == MsgType.DATA:
                server_buf[f.client_id] += len(f.payload)
                assert server_buf[f.client_id] <= server_window  # the Forwarder kept to the window
            elif f.type == MsgType.WINDOW:
                server_credit[f.client_id] += frames.parse_window(f)
        elif kind == 1 and down:
            handle(fw.receive_frame(down.popleft(), 0.0))
        elif kind == 2 and fw.state(cid) is ConnState.OPEN:  # the local app sends
            n = min(payload[cid] - sent_up[cid], fw.send_credit(cid), 700)
            if n:
                handle(fw.send_data(cid, b"u" * n))
                sent_up[cid] += n
        elif kind == 3 and server_buf[cid]:  # the server consumes and echoes within its credit
            n = min(server_buf[cid], server_credit[cid])
            if n:
                server_buf[cid] -= n
                down.append(encode_window(cid, n))
                server_credit[cid] -= n
                on_wire_down[cid] += n
                down.append(encode(MsgType.DATA, cid, b"d" * n))
        elif kind == 4 and inbox[cid] and cid != stalled_cid:  # the local app reads
            n = inbox[cid].pop(0)
            got[cid] += n
            handle(fw.delivered(cid, n))
        # Bytes the Forwarder holds undelivered + echo bytes on the wire never exceed its window.
        for c in payload:
            assert sum(inbox[c]) + on_wire_down[c] <= window

    for k in schedule:
        step(k)
    for _ in range(100_000):
        before = (len(up), len(down), sum(got.values()), sum(sent_up.values()), sum(server_buf.values()))
        for k in range(5 * len(sizes)):
            step(k)
        if before == (len(up), len(down), sum(got.values()), sum(sent_up.values()), sum(server_buf.values())):
            break
    for cid in payload:
        if cid != stalled_cid:
            assert sent_up[cid] == payload[cid] and got[cid] == payload[cid]
    assert sum(inbox[stalled_cid]) <= window


_frame = st.builds(
    lambda t, p, cid, payload: bytes([t, p]) + cid.to_bytes(4, "big") + b"\0\0" + payload,
    st.integers(0, 11),
    st.sampled_from([0, 0, 1, 3]),
    st.integers(0, 3),
    st.sampled_from([b"", b"\0\0\0\1", b"\0\0\0\1\0\0\0\4", b"xyz"]),
)


@settings(max_examples=300, deadline=None)
@given(
    proto=st.sampled_from([T, U]), messages=st.lists(st.one_of(_frame, st.binary(max_size=10)), max_size=40)
)
def test_arbitrary_frames_only_raise_protocol_errors(proto, messages):
    fw = Forwarder(proto, 80, window=8, legacy_buffer_limit=8)
    fw.start()
    for i in range(2):
        if proto is T:
            fw.open_connection()
        else:
            fw.datagram_from(("h", i), b"d", 0.0)
    for m in messages:
        try:
            fw.receive_frame(m, 1.0)
        except ProtocolError:
            break
