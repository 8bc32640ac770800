"""TunnelClient: the reference machine the Rust tunnel client is tested against.

Each test is a small transcript: frames from the runner and local events in, actions out.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kohakuriver_proto import LocalProtocolError, ProtocolError, RemoteProtocolError, frames
from kohakuriver_proto.flow import ConnState, CreditAvailable, Negotiated, SendFrame, hello_frame
from kohakuriver_proto.frames import MsgType, Proto, encode, encode_window
from kohakuriver_proto.tunnel_client import (
    CloseConnection,
    OpenTcp,
    OpenUdp,
    SendDatagram,
    ShutdownWrite,
    TunnelClient,
    WriteData,
)

T, U = Proto.TCP, Proto.UDP


def sent(actions) -> list:
    out = []
    for a in actions:
        if isinstance(a, SendFrame):
            f = frames.decode(bytes(a.data))
            out.append((f.type.name, f.client_id, bytes(f.payload)))
    return out


def others(actions) -> list:
    return [a for a in actions if not isinstance(a, SendFrame)]


def client(window=100, runner_window=50, runner_hello=True, **kw) -> TunnelClient:
    tc = TunnelClient(window=window, **kw)
    tc.start()
    if runner_hello:
        tc.receive_frame(hello_frame(True, runner_window), 0.0)
    return tc


def opened(tc: TunnelClient, cid=1, port=8080, proto=T) -> None:
    out = tc.receive_frame(encode(MsgType.CONNECT, cid, proto=proto, port=port), 0.0)
    assert others(out)[-1] == (OpenUdp(cid, port) if proto is U else OpenTcp(cid, port))
    assert sent(tc.connected(cid)) == [("CONNECTED", cid, b"")]


def test_start_sends_hello_and_the_runners_hello_negotiates():
    tc = TunnelClient(window=4096)
    assert sent(tc.start()) == [("HELLO", 0, frames.HELLO_PAYLOAD.pack(1, 4096))]
    (neg,) = tc.receive_frame(hello_frame(True, 999), 0.0)
    assert isinstance(neg, Negotiated) and neg.params.flow_control and neg.params.send_window == 999
    with pytest.raises(LocalProtocolError):
        tc.start()  # the link is in use
    assert TunnelClient(hello=False).start() == []


def test_a_seed_protocol_runner_starts_with_connect():
    tc = TunnelClient()
    tc.start()
    out = tc.receive_frame(encode(MsgType.CONNECT, 1, port=22), 0.0)
    assert isinstance(out[0], Negotiated) and not out[0].params.flow_control
    assert out[1:] == [OpenTcp(1, 22)]
    tc.connected(1)
    assert tc.send_credit(1) is None


def test_tcp_connection_lifecycle_remote_closes_first():
    tc = client()
    opened(tc)
    assert tc.receive_frame(encode(MsgType.DATA, 1, b"request"), 0.0) == [
        WriteData(1, memoryview(b"request"))
    ]
    assert tc.receive_frame(encode(MsgType.CLOSE, 1), 0.0) == [ShutdownWrite(1)]
    assert tc.state(1) is ConnState.PEER_DONE
    assert sent(tc.data_read(1, b"response")) == [("DATA", 1, b"response")]
    out = tc.eof(1)
    assert sent(out) == [("CLOSE", 1, b"")] and others(out) == [CloseConnection(1)]
    assert tc.connections == []


def test_tcp_connection_lifecycle_local_closes_first():
    tc = client()
    opened(tc)
    assert sent(tc.eof(1)) == [("CLOSE", 1, b"")]
    with pytest.raises(LocalProtocolError):
        tc.data_read(1, b"after eof")
    assert tc.receive_frame(encode(MsgType.DATA, 1, b"more"), 0.0) == [WriteData(1, memoryview(b"more"))]
    assert tc.receive_frame(encode(MsgType.CLOSE, 1), 0.0) == [ShutdownWrite(1), CloseConnection(1)]


def test_connect_failure_is_reported_with_its_reason():
    tc = client()
    tc.receive_frame(encode(MsgType.CONNECT, 1, port=81), 0.0)
    out = tc.connect_failed(1, "Connection refused (os error 111)")
    assert sent(out) == [("ERROR", 1, b"Connection refused (os error 111)")]
    assert others(out) == [CloseConnection(1, abort=True, reason="Connection refused (os error 111)")]
    assert tc.connected(1) == [] and tc.connect_failed(1, "x") == []


def test_data_before_connected_is_written_once_connected():
    tc = client()
    tc.receive_frame(encode(MsgType.CONNECT, 1, port=81), 0.0)
    assert tc.receive_frame(encode(MsgType.DATA, 1, b"early"), 0.0) == [WriteData(1, memoryview(b"early"))]
    assert tc.receive_frame(encode(MsgType.CLOSE, 1), 0.0) == [ShutdownWrite(1)]
    assert tc.state(1) is ConnState.CONNECTING_PEER_DONE
    assert sent(tc.connected(1)) == [("CONNECTED", 1, b"")]
    assert tc.state(1) is ConnState.PEER_DONE


def test_error_from_the_runner_aborts():
    tc = client()
    opened(tc)
    assert tc.receive_frame(encode(MsgType.ERROR, 1, b"session ended"), 0.0) == [
        CloseConnection(1, abort=True, reason="session ended")
    ]
    assert tc.data_read(1, b"x") == [] and tc.eof(1) == [] and tc.delivered(1, 3) == []


def test_local_error_aborts_both_ways():
    tc = client()
    opened(tc)
    out = tc.local_error(1, "Connection reset by peer")
    assert sent(out) == [("ERROR", 1, b"Connection reset by peer")]
    assert others(out) == [CloseConnection(1, abort=True, reason="Connection reset by peer")]


def test_unknown_connection_data_is_answered_and_other_strays_are_dropped():
    tc = client()
    assert sent(tc.receive_frame(encode(MsgType.DATA, 9, b"x"), 0.0)) == [("ERROR", 9, b"unknown connection")]
    for t in (MsgType.CLOSE, MsgType.ERROR):
        assert tc.receive_frame(encode(t, 9), 0.0) == []
    assert tc.receive_frame(encode_window(9, 1), 0.0) == []


def test_ping_pong_and_unknown_types():
    tc = client()
    assert sent(tc.receive_frame(encode(MsgType.PING, 0), 0.0)) == [("PONG", 0, b"")]
    assert sent(tc.receive_frame(encode(MsgType.PING, 42), 0.0)) == [("PONG", 42, b"")]
    assert tc.receive_frame(encode(MsgType.PONG, 0), 0.0) == []
    assert tc.receive_frame(bytes([0x0A, 0, 0, 0, 0, 0, 0, 0, 0xFF]), 0.0) == []
    assert tc.receive_frame(bytes([0xFF, 0x77, 0, 0, 0, 0, 0, 0]), 0.0) == []  # unknown type, odd proto


@pytest.mark.parametrize(
    "bad",
    [b"", b"\x01\x00", bytes([1, 5, 0, 0, 0, 1, 0, 80]), hello_frame(True), encode(MsgType.CONNECTED, 1)],
)
def test_remote_protocol_errors(bad):
    tc = client()
    with pytest.raises(RemoteProtocolError):
        tc.receive_frame(bad, 0.0)


def test_flow_control_send_side():
    tc = client(runner_window=10)
    opened(tc)
    assert tc.send_credit(1) == 10
    tc.data_read(1, b"x" * 10)
    with pytest.raises(LocalProtocolError):
        tc.data_read(1, b"y")
    assert tc.receive_frame(encode_window(1, 6), 0.0) == [CreditAvailable(1, 6)]
    with pytest.raises(RemoteProtocolError):
        tc.receive_frame(encode_window(1, 5), 0.0)


def test_flow_control_receive_side_batches_credit():
    tc = client(window=40)
    opened(tc)
    tc.receive_frame(encode(MsgType.DATA, 1, b"a" * 40), 0.0)
    with pytest.raises(RemoteProtocolError):
        tc.receive_frame(encode(MsgType.DATA, 1, b"b"), 0.0)  # the runner overran the window


def test_flow_control_delivered_returns_window():
    tc = client(window=40)
    opened(tc)
    tc.receive_frame(encode(MsgType.DATA, 1, b"a" * 30), 0.0)
    assert tc.delivered(1, 5) == []
    assert sent(tc.delivered(1, 5)) == [("WINDOW", 1, frames.WINDOW_PAYLOAD.pack(10))]
    tc.receive_frame(encode(MsgType.CLOSE, 1), 0.0)
    assert tc.delivered(1, 20) == []  # the runner finished sending: no credit needed any more


def test_seed_protocol_runner_is_bounded_per_connection():
    tc = TunnelClient(legacy_buffer_limit=8)
    tc.start()
    tc.receive_frame(encode(MsgType.CONNECT, 1, port=1), 0.0)
    tc.receive_frame(encode(MsgType.CONNECT, 2, port=1), 0.0)
    tc.receive_frame(encode(MsgType.DATA, 1, b"12345678"), 0.0)
    out = tc.receive_frame(encode(MsgType.DATA, 1, b"9"), 0.0)
    assert sent(out) == [("ERROR", 1, b"receive buffer overflow")]
    assert others(out) == [CloseConnection(1, abort=True, reason="receive buffer overflow")]
    assert tc.receive_frame(encode(MsgType.DATA, 2, b"ok"), 0.0) == [WriteData(2, memoryview(b"ok"))]


def test_udp_socket():
    tc = client(window=100, runner_window=20, udp_idle_timeout=60.0)
    tc.receive_frame(encode(MsgType.CONNECT, 5, proto=U, port=53), 0.0)
    assert tc.receive_frame(encode(MsgType.DATA, 5, b"early", proto=U), 0.0) == []  # no socket yet
    out = tc.connected(5)
    assert sent(out) == [("CONNECTED", 5, b"")] and others(out) == [SendDatagram(5, b"early")]
    out = tc.receive_frame(encode(MsgType.DATA, 5, b"q" * 30, proto=U), 1.0)
    assert others(out) == [SendDatagram(5, memoryview(b"q" * 30))]
    assert sent(out) == [("WINDOW", 5, frames.WINDOW_PAYLOAD.pack(35))]  # delivered at once, 35 >= 25
    assert sent(tc.datagram(5, b"a" * 15, 2.0)) == [("DATA", 5, b"a" * 15)]
    assert tc.datagram(5, b"b" * 6, 3.0) == []  # over the remaining credit of 5: dropped
    with pytest.raises(LocalProtocolError):
        tc.data_read(5, b"stream bytes on a UDP socket")
    assert tc.expire(62.0) == []
    out = tc.expire(63.0)
    assert sent(out) == [("CLOSE", 5, b"")] and others(out) == [CloseConnection(5, reason="idle")]


def test_udp_close_from_the_runner():
    tc = client()
    opened(tc, 3, 53, U)
    assert tc.receive_frame(encode(MsgType.CLOSE, 3, proto=U), 0.0) == [CloseConnection(3)]


def test_connect_with_port_zero_and_connection_limit():
    tc = client(max_connections=1)
    assert sent(tc.receive_frame(encode(MsgType.CONNECT, 1, port=0), 0.0)) == [
        ("ERROR", 1, b"invalid port 0")
    ]
    opened(tc, 2)
    assert sent(tc.receive_frame(encode(MsgType.CONNECT, 3, port=80), 0.0)) == [
        ("ERROR", 3, b"too many connections")
    ]


def test_connect_for_an_open_id_replaces_it():
    tc = client()
    opened(tc, 7)
    out = tc.receive_frame(encode(MsgType.CONNECT, 7, port=9), 0.0)
    assert out == [CloseConnection(7, abort=True, reason="client id reused by the runner"), OpenTcp(7, 9)]


def test_disconnect_aborts_everything_and_a_new_link_renegotiates():
    tc = client()
    opened(tc, 1)
    opened(tc, 2)
    assert tc.disconnected() == [
        CloseConnection(1, abort=True, reason="tunnel disconnected"),
        CloseConnection(2, abort=True, reason="tunnel disconnected"),
    ]
    assert tc.link is None and tc.connections == []
    assert sent(tc.start()) == [("HELLO", 0, frames.HELLO_PAYLOAD.pack(1, 100))]


@given(st.lists(st.binary(max_size=24), max_size=30))
def test_arbitrary_frames_only_raise_protocol_errors(messages):
    tc = client()
    opened(tc, 1)
    for m in messages:
        try:
            tc.receive_frame(m, 0.0)
        except ProtocolError:
            return
