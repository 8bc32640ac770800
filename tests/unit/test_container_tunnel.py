"""ContainerTunnel: translation of every message type both ways, sessions, detach, keepalive, flow control."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kohakuriver_proto import LocalProtocolError, ProtocolError, RemoteProtocolError, frames
from kohakuriver_proto.container_tunnel import (
    ConnectionClosed,
    ContainerTunnel,
    PauseReading,
    ResumeReading,
    SendToContainer,
    SendToSession,
    SessionState,
    TunnelDead,
    TunnelState,
)
from kohakuriver_proto.flow import hello_frame
from kohakuriver_proto.frames import Frame, MsgType, Proto, encode, encode_window

T, U = Proto.TCP, Proto.UDP


def dec(action) -> Frame:
    return frames.decode(bytes(action.data))


def summary(actions) -> list:
    """Actions as comparable tuples: ("c"|session, type name, client id, payload) or the event itself."""
    out = []
    for a in actions:
        if isinstance(a, SendToContainer | SendToSession):
            f = dec(a)
            who = "c" if isinstance(a, SendToContainer) else a.session
            out.append((who, f.type.name, f.client_id, bytes(f.payload)))
        else:
            out.append(a)
    return out


def frames_only(actions) -> list:
    return [s for s in summary(actions) if isinstance(s, tuple)]


def attached(window=1024, client_hello: bytes | None = None, **kw) -> ContainerTunnel:
    """A tunnel whose client sent ``client_hello`` (default: flow control with ``window``)."""
    ct = ContainerTunnel("c1", window=window, **kw)
    ct.attach(0.0)
    ct.receive_from_container(client_hello if client_hello is not None else hello_frame(True, window), 0.0)
    return ct


LEGACY_FIRST = encode(MsgType.PONG, 0)  # a seed-protocol client's answer to the runner's PING


def session(ct, key="s1", proto=T, port=8080, hello: bytes | None = b"default") -> list:
    ct.open_session(key, proto, port)
    if hello == b"default":
        hello = hello_frame(True, ct.window)
    return ct.receive_from_session(key, hello) if hello is not None else []


def connect(ct, key="s1", sid=1, proto=T, port=8080) -> int:
    out = ct.receive_from_session(key, encode(MsgType.CONNECT, sid, proto=proto, port=port))
    (f,) = [dec(a) for a in out if isinstance(a, SendToContainer)]
    assert f.type == MsgType.CONNECT and f.port == port and f.proto == proto
    return f.client_id


def open_conn(ct, key="s1", sid=1, proto=T) -> int:
    tid = connect(ct, key, sid, proto)
    out = ct.receive_from_container(encode(MsgType.CONNECTED, tid, proto=proto), 0.0)
    assert frames_only(out) == [(key, "CONNECTED", sid, b"")]
    return tid


# -- attach, negotiation -------------------------------------------------------------------------------------


def test_attach_sends_hello_and_ping_and_settles_features_on_the_first_frame():
    ct = ContainerTunnel("c1", window=4096)
    out = ct.attach(0.0)
    assert summary(out) == [("c", "HELLO", 0, frames.HELLO_PAYLOAD.pack(1, 4096)), ("c", "PING", 0, b"")]
    assert ct.state is TunnelState.NEGOTIATING and ct.attached and ct.link is None
    assert ct.receive_from_container(hello_frame(True, 777), 0.0) == []
    assert ct.state is TunnelState.ATTACHED
    assert ct.link.flow_control and ct.link.send_window == 777 and ct.link.peer_hello


def test_seed_protocol_client_is_detected_by_its_first_frame():
    ct = ContainerTunnel("c1")
    ct.attach(0.0)
    assert ct.receive_from_container(LEGACY_FIRST, 0.0) == []
    assert ct.link.peer_hello is False and ct.link.flow_control is False


def test_attach_twice_is_a_local_error_and_detach_is_idempotent():
    ct = ContainerTunnel("c1")
    ct.attach(0.0)
    with pytest.raises(LocalProtocolError):
        ct.attach(0.0)
    assert ct.detach() == []
    assert ct.detach() == []
    assert ct.state is TunnelState.DETACHED
    with pytest.raises(LocalProtocolError):
        ct.receive_from_container(LEGACY_FIRST, 0.0)
    with pytest.raises(LocalProtocolError):
        ct.open_session("s", T, 80)


def test_late_hello_from_the_container_breaks_the_tunnel():
    ct = attached()
    with pytest.raises(RemoteProtocolError):
        ct.receive_from_container(hello_frame(True), 0.0)
    assert ct.state is TunnelState.BROKEN
    with pytest.raises(LocalProtocolError):
        ct.receive_from_container(LEGACY_FIRST, 0.0)
    ct.detach()
    ct.attach(1.0)  # a new tunnel client may attach


def test_session_hello_is_answered_with_the_tunnel_clients_window():
    ct = attached(window=1024, client_hello=hello_frame(True, 5000))
    out = session(ct, hello=hello_frame(True, 300))
    assert summary(out) == [("s1", "HELLO", 0, frames.HELLO_PAYLOAD.pack(1, 5000))]


def test_session_hello_before_the_container_is_known_gets_the_runners_window():
    ct = ContainerTunnel("c1", window=1024)
    ct.attach(0.0)
    out = session(ct)
    assert summary(out) == [("s1", "HELLO", 0, frames.HELLO_PAYLOAD.pack(1, 1024))]


def test_runner_without_flow_control_announces_no_features():
    ct = attached(flow_control=False)
    out = session(ct)
    assert summary(out)[0][3] == frames.HELLO_PAYLOAD.pack(0, ct.window)


def test_open_session_checks():
    ct = attached()
    ct.open_session("s", T, 80)
    with pytest.raises(LocalProtocolError):
        ct.open_session("s", T, 80)
    with pytest.raises(LocalProtocolError):
        ct.open_session("t", T, 0)
    with pytest.raises(LocalProtocolError):
        ct.receive_from_session("nope", LEGACY_FIRST)
    assert ct.end_session("nope") == []


# -- translation of every message type -----------------------------------------------------------------------


def test_every_message_type_is_translated_both_ways():
    ct = attached(first_id=500)
    session(ct, "a")
    session(ct, "b")
    ta = connect(ct, "a", sid=1)
    tb = connect(ct, "b", sid=1)  # the same client id in another session: a different tunnel id
    assert (ta, tb) == (500, 501)
    # CONNECTED
    assert frames_only(ct.receive_from_container(encode(MsgType.CONNECTED, tb), 0.0)) == [
        ("b", "CONNECTED", 1, b"")
    ]
    assert frames_only(ct.receive_from_container(encode(MsgType.CONNECTED, ta), 0.0)) == [
        ("a", "CONNECTED", 1, b"")
    ]
    # DATA both ways
    assert summary(ct.receive_from_session("a", encode(MsgType.DATA, 1, b"up-a"))) == [
        ("c", "DATA", ta, b"up-a")
    ]
    assert summary(ct.receive_from_container(encode(MsgType.DATA, tb, b"down-b"), 0.0)) == [
        ("b", "DATA", 1, b"down-b")
    ]
    # WINDOW both ways (flow control everywhere with equal windows: passed through)
    assert summary(ct.receive_from_container(encode_window(ta, 4), 0.0)) == [("a", "WINDOW", 1, b"\0\0\0\4")]
    assert summary(ct.receive_from_session("b", encode_window(1, 6))) == [("c", "WINDOW", tb, b"\0\0\0\6")]
    # PING from a session is answered by the runner, PING from the container too; PONGs are absorbed.
    assert summary(ct.receive_from_session("a", encode(MsgType.PING, 9))) == [("a", "PONG", 9, b"")]
    assert summary(ct.receive_from_container(encode(MsgType.PING, 3), 0.0)) == [("c", "PONG", 3, b"")]
    assert ct.receive_from_session("a", encode(MsgType.PONG, 9)) == []
    assert ct.receive_from_container(encode(MsgType.PONG, 0), 0.0) == []
    # ERROR both ways: the connection ends
    out = ct.receive_from_container(encode(MsgType.ERROR, tb, b"boom"), 0.0)
    assert summary(out) == [
        ("b", "ERROR", 1, b"boom"),
        ConnectionClosed("b", 1, tb, "error from the tunnel client: boom"),
    ]
    out = ct.receive_from_session("a", encode(MsgType.ERROR, 1, b"bye"))
    assert summary(out) == [
        ("c", "ERROR", ta, b"bye"),
        ConnectionClosed("a", 1, ta, "error from the session: bye"),
    ]
    assert ct.connection_count == 0


def test_close_is_a_half_close_passed_on_both_ways():
    ct = attached()
    session(ct)
    tid = open_conn(ct)
    assert summary(ct.receive_from_session("s1", encode(MsgType.CLOSE, 1))) == [("c", "CLOSE", tid, b"")]
    # The container may still send until it closes too.
    assert summary(ct.receive_from_container(encode(MsgType.DATA, tid, b"tail"), 0.0)) == [
        ("s1", "DATA", 1, b"tail")
    ]
    with pytest.raises(RemoteProtocolError):
        ct.receive_from_session("s1", encode(MsgType.DATA, 1, b"after close"))
    assert ct.session_state("s1") is SessionState.BROKEN


def test_both_closes_finish_the_connection():
    ct = attached()
    session(ct)
    tid = open_conn(ct)
    assert summary(ct.receive_from_container(encode(MsgType.CLOSE, tid), 0.0)) == [("s1", "CLOSE", 1, b"")]
    assert ct.receive_from_container(encode(MsgType.CLOSE, tid), 0.0) == []  # a repeat changes nothing
    out = ct.receive_from_session("s1", encode(MsgType.CLOSE, 1))
    assert summary(out) == [("c", "CLOSE", tid, b""), ConnectionClosed("s1", 1, tid, None)]
    assert ct.connections("s1") == {}


def test_udp_close_ends_the_mapping_at_once():
    ct = attached()
    session(ct, proto=U, port=53)
    tid = connect(ct, proto=U, port=53)
    ct.receive_from_container(encode(MsgType.CONNECTED, tid, proto=U), 0.0)
    out = ct.receive_from_session("s1", encode(MsgType.CLOSE, 1, proto=U))
    assert summary(out) == [("c", "CLOSE", tid, b""), ConnectionClosed("s1", 1, tid, None)]


def test_stale_frames_for_unknown_ids():
    ct = attached()
    session(ct)
    # DATA for a connection nobody has is answered with ERROR so the sender stops; the rest is dropped.
    assert summary(ct.receive_from_container(encode(MsgType.DATA, 77, b"x"), 0.0)) == [
        ("c", "ERROR", 77, b"unknown connection")
    ]
    assert summary(ct.receive_from_session("s1", encode(MsgType.DATA, 5, b"x"))) == [
        ("s1", "ERROR", 5, b"unknown connection")
    ]
    for t in (MsgType.CONNECTED, MsgType.CLOSE, MsgType.ERROR):
        assert ct.receive_from_container(encode(t, 77), 0.0) == []
    assert ct.receive_from_container(encode_window(77, 5), 0.0) == []
    for t in (MsgType.CLOSE, MsgType.ERROR):
        assert ct.receive_from_session("s1", encode(t, 5)) == []
    assert ct.receive_from_session("s1", encode_window(5, 5)) == []


def test_unknown_message_types_are_ignored_on_both_sides():
    ct = attached()
    session(ct)
    assert ct.receive_from_container(encode(0x42, 1, b"future"), 0.0) == []  # type: ignore[arg-type]
    assert ct.receive_from_session("s1", bytes([0x42, 7, 0, 0, 0, 1, 0, 0])) == []
    assert ct.session_state("s1") is SessionState.ACTIVE


@pytest.mark.parametrize(
    "bad",
    [
        b"\x03\x00\x00",  # short
        bytes([3, 9, 0, 0, 0, 1, 0, 0]),  # unknown proto
        encode(MsgType.CONNECT, 1, proto=U, port=8080),  # proto of another session
        encode(MsgType.CONNECT, 1, port=22),  # another port
        encode(MsgType.CONNECTED, 1),  # wrong direction
        hello_frame(True),  # late HELLO
        encode(MsgType.WINDOW, 1, b"\0"),  # malformed WINDOW
    ],
)
def test_a_bad_frame_breaks_only_its_session(bad):
    ct = attached()
    session(ct, "bad")
    session(ct, "good")
    tid_bad = open_conn(ct, "bad")
    tid_good = open_conn(ct, "good")
    with pytest.raises(RemoteProtocolError):
        ct.receive_from_session("bad", bad)
    assert ct.session_state("bad") is SessionState.BROKEN
    with pytest.raises(LocalProtocolError):
        ct.receive_from_session("bad", encode(MsgType.DATA, 1, b"x"))
    assert summary(ct.end_session("bad")) == [
        ("c", "ERROR", tid_bad, b"session ended"),
        ConnectionClosed("bad", 1, tid_bad, "session ended"),
    ]
    assert summary(ct.receive_from_session("good", encode(MsgType.DATA, 1, b"ok"))) == [
        ("c", "DATA", tid_good, b"ok")
    ]


def test_connect_for_an_open_id_is_a_session_error():
    ct = attached()
    session(ct)
    connect(ct)
    with pytest.raises(RemoteProtocolError):
        ct.receive_from_session("s1", encode(MsgType.CONNECT, 1, port=8080))


def test_container_protocol_errors():
    for bad in (encode(MsgType.CONNECT, 1, port=1), b"\x01"):
        ct = attached()
        with pytest.raises(RemoteProtocolError):
            ct.receive_from_container(bad, 0.0)
        assert ct.state is TunnelState.BROKEN
    ct = attached()
    session(ct)
    tid = connect(ct)
    with pytest.raises(RemoteProtocolError):
        ct.receive_from_container(encode(MsgType.DATA, tid, b"early"), 0.0)  # before CONNECTED
    ct = attached()
    session(ct)
    tid = open_conn(ct)
    with pytest.raises(RemoteProtocolError):
        ct.receive_from_container(encode(MsgType.CONNECTED, tid), 0.0)


def test_connection_limit_per_session():
    ct = attached(max_connections_per_session=2)
    session(ct)
    connect(ct, sid=1)
    connect(ct, sid=2)
    out = ct.receive_from_session("s1", encode(MsgType.CONNECT, 3, port=8080))
    assert summary(out) == [("s1", "ERROR", 3, b"too many connections")]


# -- sessions ending, tunnel detaching -----------------------------------------------------------------------


def test_session_end_tears_down_its_connections_in_the_container():
    ct = attached()
    session(ct, "a")
    session(ct, "b")
    t1, t2 = open_conn(ct, "a", 1), open_conn(ct, "a", 2)
    tb = open_conn(ct, "b", 1)
    out = ct.end_session("a")
    assert summary(out) == [
        ("c", "ERROR", t1, b"session ended"),
        ConnectionClosed("a", 1, t1, "session ended"),
        ("c", "ERROR", t2, b"session ended"),
        ConnectionClosed("a", 2, t2, "session ended"),
    ]
    assert ct.sessions == ["b"] and ct.connections("b") == {1: tb}
    # Late frames from the container for the torn-down connections reach nobody.
    assert summary(ct.receive_from_container(encode(MsgType.DATA, t1, b"late"), 0.0)) == [
        ("c", "ERROR", t1, b"unknown connection")
    ]


def test_session_end_sends_close_to_a_seed_protocol_client():
    ct = attached(client_hello=LEGACY_FIRST)
    session(ct, hello=None)
    tid = open_conn(ct)
    assert frames_only(ct.end_session("s1")) == [("c", "CLOSE", tid, b"")]


def test_detach_ends_every_connection_with_an_error_and_keeps_the_sessions():
    ct = attached()
    session(ct, "a")
    session(ct, "b")
    ta, tb = open_conn(ct, "a"), open_conn(ct, "b")
    out = ct.detach()
    assert summary(out) == [
        ("a", "ERROR", 1, b"tunnel disconnected"),
        ConnectionClosed("a", 1, ta, "tunnel disconnected"),
        ("b", "ERROR", 1, b"tunnel disconnected"),
        ConnectionClosed("b", 1, tb, "tunnel disconnected"),
    ]
    assert ct.connection_count == 0 and sorted(ct.sessions) == ["a", "b"]
    out = ct.receive_from_session("a", encode(MsgType.CONNECT, 2, port=8080))
    assert summary(out) == [("a", "ERROR", 2, b"tunnel not connected")]
    assert ct.end_session("a") == []  # nothing to tell a detached container
    ct.attach(5.0)
    ct.receive_from_container(hello_frame(True, ct.window), 5.0)
    open_conn(ct, "b", 2)


def test_connections_opened_before_the_container_is_known_are_set_up_later():
    ct = ContainerTunnel("c1", window=1024)
    ct.attach(0.0)
    session(ct)
    tid = connect(ct)
    out = ct.receive_from_session("s1", encode(MsgType.DATA, 1, b"early"))
    assert out == []  # held until the tunnel client's features are known
    out = ct.receive_from_container(hello_frame(True, 1024), 0.0)
    assert summary(out) == [("c", "DATA", tid, b"early")]


# -- keepalive -----------------------------------------------------------------------------------------------


def test_tick_pings_every_interval_and_reports_a_silent_tunnel_once():
    ct = ContainerTunnel("c1", ping_interval=10.0, dead_after=3)
    assert ct.tick(0.0) == []  # detached
    ct.attach(0.0)
    assert ct.tick(5.0) == []
    assert summary(ct.tick(10.0)) == [("c", "PING", 0, b"")]
    assert ct.tick(15.0) == []
    ct.receive_from_container(LEGACY_FIRST, 16.0)  # any frame counts as life
    assert summary(ct.tick(20.0)) == [("c", "PING", 0, b"")]
    assert summary(ct.tick(30.0)) == [("c", "PING", 0, b"")]
    assert summary(ct.tick(40.0)) == [("c", "PING", 0, b"")]
    (dead,) = ct.tick(46.0)
    assert isinstance(dead, TunnelDead)
    assert ct.tick(50.0) == []
    ct.detach()
    ct.attach(60.0)
    assert ct.tick(61.0) == []


# -- flow control at the runner ------------------------------------------------------------------------------


def test_pass_through_rejects_a_session_that_overruns_its_window():
    ct = attached(window=10)
    session(ct)
    open_conn(ct)
    ct.receive_from_session("s1", encode(MsgType.DATA, 1, b"x" * 10))
    with pytest.raises(RemoteProtocolError):
        ct.receive_from_session("s1", encode(MsgType.DATA, 1, b"y"))


def test_windows_differ_the_runner_credits_each_side_itself():
    # The container accepts 4 bytes per connection; the runner announced 8 to it; the session accepts 2.
    ct = attached(window=8, client_hello=hello_frame(True, 4))
    out = session(ct, hello=hello_frame(True, 2))
    assert summary(out)[0][3] == frames.HELLO_PAYLOAD.pack(1, 4)  # session -> container passes through
    tid = open_conn(ct)
    # container -> session: the container may send 8, the session takes 2: the runner queues the rest.
    # Credit goes back to the container as bytes leave the runner, batched at a quarter of its 8 bytes.
    out = ct.receive_from_container(encode(MsgType.DATA, tid, b"abcdefgh"), 0.0)
    assert summary(out) == [("s1", "DATA", 1, b"ab"), ("c", "WINDOW", tid, b"\0\0\0\2")]
    out = ct.receive_from_session("s1", encode_window(1, 2))
    assert summary(out) == [("s1", "DATA", 1, b"cd"), ("c", "WINDOW", tid, b"\0\0\0\2")]
    with pytest.raises(RemoteProtocolError):
        ct.receive_from_container(encode(MsgType.DATA, tid, b"12345"), 0.0)  # 4 of 8 still held


def test_seed_protocol_session_into_a_flow_controlled_container_is_paused_not_aborted():
    ct = attached(window=4, legacy_buffer_limit=10)
    session(ct, hello=None)  # seed-protocol session: no HELLO
    tid = open_conn(ct, sid=1)
    tid2 = open_conn(ct, sid=2)
    assert summary(ct.receive_from_session("s1", encode(MsgType.DATA, 1, b"0123"))) == [
        ("c", "DATA", tid, b"0123")
    ]
    assert not ct.reading_paused("s1")
    # 10 bytes queued: the bound. The session is paused, not cut.
    assert ct.receive_from_session("s1", encode(MsgType.DATA, 1, b"4567890123")) == [PauseReading("s1")]
    assert ct.reading_paused("s1") and not ct.reading_paused()
    # A message the daemon already held is accepted all the same (the bound is exceeded by it alone).
    assert ct.receive_from_session("s1", encode(MsgType.DATA, 1, b"!")) == []
    # Credit from the container drains the queue; at half the bound (5) reading resumes.
    out = ct.receive_from_container(encode_window(tid, 4), 0.0)
    assert summary(out) == [("c", "DATA", tid, b"4567")]
    out = ct.receive_from_container(encode_window(tid, 4), 0.0)
    assert summary(out) == [("c", "DATA", tid, b"8901"), ResumeReading("s1")]
    assert not ct.reading_paused("s1")
    out = ct.receive_from_container(encode_window(tid, 4), 0.0)
    assert summary(out) == [("c", "DATA", tid, b"23"), ("c", "DATA", tid, b"!")]  # every byte, in order
    # The session's other connection was never touched.
    assert summary(ct.receive_from_session("s1", encode(MsgType.DATA, 2, b"ok"))) == [
        ("c", "DATA", tid2, b"ok")
    ]
    assert ct.connection_count == 2


def test_a_paused_seed_protocol_tunnel_client_leaves_flow_controlled_sessions_sending():
    # The download case: a seed-protocol tunnel client serves faster than the session reads.
    ct = attached(window=4, client_hello=LEGACY_FIRST, legacy_buffer_limit=8)
    session(ct, "s1")
    session(ct, "s2")
    tid = open_conn(ct, "s1")
    tid2 = open_conn(ct, "s2")
    out = ct.receive_from_container(encode(MsgType.DATA, tid, b"abcdefghijkl"), 0.0)
    assert summary(out) == [("s1", "DATA", 1, b"abcd"), PauseReading(None)]
    assert ct.reading_paused() and not ct.reading_paused("s1") and not ct.reading_paused("s2")
    # s2 still sends to the container: the runner writes to a paused peer, it only stops reading it.
    (send,) = ct.receive_from_session("s2", encode(MsgType.DATA, 1, b"up"))
    assert summary([send]) == [("c", "DATA", tid2, b"up")] and send.needs_ack
    assert summary(ct.written(send)) == [("s2", "WINDOW", 1, b"\0\0\0\2")]  # and gets its credit back
    out = ct.receive_from_session("s1", encode_window(1, 4))
    assert summary(out) == [("s1", "DATA", 1, b"efgh"), ResumeReading(None)]
    out = ct.receive_from_session("s1", encode_window(1, 4))
    assert summary(out) == [("s1", "DATA", 1, b"ijkl")]
    assert not ct.reading_paused()


def test_a_session_that_ends_releases_the_tunnel_client_it_held_paused():
    ct = attached(window=4, client_hello=LEGACY_FIRST, legacy_buffer_limit=8)
    session(ct, "s1")
    session(ct, "s2")
    tid = open_conn(ct, "s1")
    tid2 = open_conn(ct, "s2")
    assert PauseReading(None) in ct.receive_from_container(encode(MsgType.DATA, tid, b"x" * 20), 0.0)
    assert PauseReading(None) not in ct.receive_from_container(encode(MsgType.DATA, tid2, b"y" * 20), 0.0)
    out = ct.end_session("s1")
    assert ResumeReading(None) not in out and ct.reading_paused()  # s2's connection still holds it
    out = ct.receive_from_session("s2", encode(MsgType.ERROR, 1, b"gone"))
    assert ResumeReading(None) in out and not ct.reading_paused()


def test_nothing_is_said_about_a_paused_peer_that_is_gone():
    ct = attached(window=4, client_hello=LEGACY_FIRST, legacy_buffer_limit=8)
    session(ct, "s1", hello=None)
    tid = open_conn(ct, "s1")
    out = ct.receive_from_container(encode(MsgType.DATA, tid, b"x" * 8), 0.0)
    assert PauseReading(None) in out and ct.reading_paused()
    # A detached tunnel client is not resumed (its WebSocket is gone) and a new one starts unpaused.
    assert not any(isinstance(a, ResumeReading) for a in ct.detach())
    assert not ct.reading_paused()
    ct.attach(1.0)
    ct.receive_from_container(LEGACY_FIRST, 1.0)
    assert not ct.reading_paused()
    # Likewise for a paused session that ends.
    tid = open_conn(ct, "s1", sid=2)
    out = ct.receive_from_session("s1", encode(MsgType.DATA, 2, b"y" * 8))
    assert PauseReading("s1") in out
    assert not any(isinstance(a, ResumeReading) for a in ct.end_session("s1"))
    assert not ct.reading_paused("s1")
    with pytest.raises(LocalProtocolError):
        ct.open_session(None, T, 80)  # None names the tunnel client


def test_queued_data_goes_before_the_close():
    ct = attached(window=4)
    session(ct, hello=None)
    tid = open_conn(ct)
    ct.receive_from_session("s1", encode(MsgType.DATA, 1, b"0123456"))
    assert ct.receive_from_session("s1", encode(MsgType.CLOSE, 1)) == []  # waits behind 3 queued bytes
    out = ct.receive_from_container(encode_window(tid, 4), 0.0)
    assert summary(out) == [("c", "DATA", tid, b"456"), ("c", "CLOSE", tid, b"")]


def test_seed_protocol_container_gets_acked_sends_and_credits_the_session_once_written():
    ct = attached(window=8, client_hello=LEGACY_FIRST)
    session(ct)
    tid = open_conn(ct)
    out = ct.receive_from_session("s1", encode(MsgType.DATA, 1, b"abcd"))
    (send,) = out
    assert send.needs_ack and summary(out) == [("c", "DATA", tid, b"abcd")]
    assert summary(ct.written(send)) == [("s1", "WINDOW", 1, b"\0\0\0\4")]
    # An ack for a connection that ended meanwhile is ignored.
    (send,) = ct.receive_from_session("s1", encode(MsgType.DATA, 1, b"ef"))
    ct.receive_from_session("s1", encode(MsgType.ERROR, 1, b"gone"))
    assert ct.written(send) == []


def test_seed_protocol_on_both_sides_is_bounded_by_unwritten_bytes():
    ct = attached(window=4, client_hello=LEGACY_FIRST, legacy_buffer_limit=5)
    session(ct, hello=None)
    tid = open_conn(ct)
    (a,) = ct.receive_from_session("s1", encode(MsgType.DATA, 1, b"abc"))
    assert a.needs_ack
    b, pause = ct.receive_from_session("s1", encode(MsgType.DATA, 1, b"defghijklm"))
    assert summary([b]) == [("c", "DATA", tid, b"defghijklm")] and pause == PauseReading("s1")
    # What the runner may have handed to the writer counts the message that crossed the bound.
    assert ct.queue_bound() == 13
    assert ct.written(a) == []  # 10 bytes still unwritten: above half the bound
    assert ct.written(b) == [ResumeReading("s1")]
    assert ct.queue_bound() == 5


def test_a_paused_tunnel_client_is_not_declared_dead_for_the_silence_the_runner_caused():
    ct = ContainerTunnel("c1", window=4, legacy_buffer_limit=8, ping_interval=10.0, dead_after=3)
    ct.attach(0.0)
    ct.receive_from_container(LEGACY_FIRST, 0.0)
    session(ct)
    tid = open_conn(ct)
    assert PauseReading(None) in ct.receive_from_container(encode(MsgType.DATA, tid, b"x" * 12), 1.0)
    for now in range(10, 101, 10):  # a slow reader holds the tunnel client paused for 100 s
        assert summary(ct.tick(float(now))) == [("c", "PING", 0, b"")]  # the client still hears the runner
    assert ResumeReading(None) in ct.receive_from_session("s1", encode_window(1, 4))
    # From the last paused tick on, silence counts again: dead after three silent intervals.
    assert summary(ct.tick(110.0)) == [("c", "PING", 0, b"")]
    assert summary(ct.tick(120.0)) == [("c", "PING", 0, b"")]
    assert ct.tick(129.0) == []
    (dead,) = ct.tick(130.0)
    assert isinstance(dead, TunnelDead)


_CASES = {
    "seed-protocol tunnel client to a flow-controlled session": (LEGACY_FIRST, True),
    "seed-protocol session to a flow-controlled tunnel client": (None, False),
    "seed-protocol on both sides": (LEGACY_FIRST, False),
}


@settings(max_examples=300, deadline=None)
@given(
    case=st.sampled_from(list(_CASES)),
    limit=st.integers(1, 64),
    window=st.integers(1, 32),
    ops=st.lists(st.tuples(st.sampled_from(["send", "send", "drain"]), st.integers(1, 40)), max_size=120),
)
def test_a_seed_protocol_sender_is_paused_never_cut_and_every_byte_arrives_in_order(case, limit, window, ops):
    """A daemon that obeys Pause/ResumeReading, a sender without flow control that sends whenever it is
    read, a receiver that drains at random: nothing is dropped or reordered, memory stays bounded."""
    client_hello, session_fc = _CASES[case]
    down = client_hello is not None and session_fc  # the sender is the tunnel client
    ct = attached(window=window, client_hello=client_hello, legacy_buffer_limit=limit)
    session(ct, hello=hello_frame(True, window) if session_fc else None)
    tid = open_conn(ct)
    receiver_fc = session_fc if down else client_hello is None
    stream = bytes(i % 251 for i in range(40 * 120))
    sent = received = written = owed = 0
    paused = False
    unacked: list = []  # actions the "writer" has yet to write (receiver without flow control)

    def apply(actions):
        nonlocal received, owed, paused
        for a in actions:
            if isinstance(a, PauseReading | ResumeReading):
                assert a.peer == (None if down else "s1")
                assert paused is isinstance(a, ResumeReading), "pause and resume alternate"
                paused = isinstance(a, PauseReading)
                continue
            assert not isinstance(a, ConnectionClosed), a  # never cut
            f = dec(a)
            to_receiver = isinstance(a, SendToSession) if down else isinstance(a, SendToContainer)
            assert to_receiver and f.type == MsgType.DATA, summary([a])  # nothing (no WINDOW) to the sender
            assert bytes(f.payload) == stream[received : received + len(f.payload)], "bytes out of order"
            received += len(f.payload)
            owed += len(f.payload)
            if a.needs_ack:
                unacked.append(a)
        assert ct.reading_paused(None if down else "s1") is paused

    def drain(n):
        nonlocal owed, written
        if receiver_fc:
            n = min(n, owed)
            if n:
                owed -= n
                if down:
                    apply(ct.receive_from_session("s1", encode_window(1, n)))
                else:
                    apply(ct.receive_from_container(encode_window(tid, n), 0.0))
        else:
            for _ in range(n):
                if unacked:
                    action = unacked.pop(0)
                    written += len(action.data) - frames.HEADER_SIZE
                    apply(ct.written(action))

    def held():
        return sent - (received if receiver_fc else written)

    for op, n in ops:
        if op == "send" and not paused:
            n = min(n, len(stream) - sent)
            if n:
                frame = encode(MsgType.DATA, tid if down else 1, stream[sent : sent + n])
                sent += n
                apply(ct.receive_from_container(frame, 0.0) if down else ct.receive_from_session("s1", frame))
        elif op == "drain":
            drain(n)
        assert held() < limit + 40  # the bound, plus at most the one message that crossed it
        assert paused or held() < limit
    for _ in range(10_000):
        if not owed and not unacked:
            break
        drain(64)
    assert not paused and received == sent and ct.connection_count == 1


def test_udp_datagrams_beyond_the_credit_are_dropped_not_queued():
    ct = attached(window=10)
    session(ct, proto=U, port=53, hello=None)
    tid = connect(ct, proto=U, port=53)
    ct.receive_from_container(encode(MsgType.CONNECTED, tid, proto=U), 0.0)
    assert len(ct.receive_from_session("s1", encode(MsgType.DATA, 1, b"x" * 8, proto=U))) == 1
    assert ct.receive_from_session("s1", encode(MsgType.DATA, 1, b"y" * 8, proto=U)) == []  # dropped
    assert ct.connection_count == 1


def test_ids_wrap_around_and_skip_ids_in_use():
    ct = attached(first_id=frames.MAX_CLIENT_ID)
    session(ct)
    assert connect(ct, sid=1) == frames.MAX_CLIENT_ID
    assert connect(ct, sid=2) == 1
    ct.receive_from_session("s1", encode(MsgType.ERROR, 2))  # id 1 closed, and still not reused soon
    assert connect(ct, sid=3) == 2


def test_memoryview_input_is_accepted():
    ct = attached()
    session(ct)
    tid = open_conn(ct)
    out = ct.receive_from_session("s1", memoryview(encode(MsgType.DATA, 1, b"mv")))
    assert summary(out) == [("c", "DATA", tid, b"mv")]


# -- a stateful model: many sessions, random traffic, never a wrong delivery ---------------------------------


class MultiplexerModel(RuleBasedStateMachine):
    """Sessions and a fake tunnel client drive one ContainerTunnel at random. The model learns each tunnel
    id's owner from the CONNECT the container sees; every DATA names its origin, so a frame delivered to
    the wrong session or connection is caught, and the machine's tables must equal the model's."""

    @initialize(fc=st.booleans())
    def setup(self, fc):
        self.ct = ContainerTunnel("c", window=1 << 20, first_id=frames.MAX_CLIENT_ID - 3)
        self.fc = fc
        self.keys = 0
        self.sessions: set[int] = set()
        self.next_sid: dict[int, int] = {}
        self.owner: dict[int, tuple[int, int]] = {}  # tid -> (session, sid), for open connections
        self.connected: set[int] = set()
        self.session_done: set[int] = set()  # tids whose session side sent CLOSE
        self.container_done: set[int] = set()
        self.attach()

    def attach(self):
        self.ct.attach(0.0)
        self.ct.receive_from_container(hello_frame(True, 1 << 20) if self.fc else LEGACY_FIRST, 0.0)

    def forget(self, tid):
        self.owner.pop(tid, None)
        for s in (self.connected, self.session_done, self.container_done):
            s.discard(tid)

    def apply(self, actions, connecting=None):
        for a in actions:
            if isinstance(a, SendToContainer):
                f = dec(a)
                if f.type == MsgType.CONNECT:
                    assert connecting is not None and f.client_id not in self.owner, "tunnel id collision"
                    self.owner[f.client_id] = connecting
                elif f.type == MsgType.DATA:
                    key, sid = self.owner[f.client_id]
                    assert bytes(f.payload) == f"{key}/{sid}".encode(), "DATA sent for the wrong connection"
            elif isinstance(a, SendToSession):
                assert a.session in self.sessions, "frame for a session that is gone"
                f = dec(a)
                if f.type == MsgType.DATA:
                    tid = int(bytes(f.payload))
                    assert self.owner[tid] == (a.session, f.client_id), "DATA delivered to the wrong session"
            elif isinstance(a, ConnectionClosed):
                assert self.owner.get(a.tunnel_id) == (a.session, a.client_id)
                self.forget(a.tunnel_id)

    def pick(self, i, ok):
        live = sorted(tid for tid in self.owner if ok(tid))
        return live[i % len(live)] if live else None

    @rule()
    def open_session(self):
        self.keys += 1
        self.sessions.add(self.keys)
        self.next_sid[self.keys] = 1
        self.ct.open_session(self.keys, T, 80)
        self.apply(self.ct.receive_from_session(self.keys, hello_frame(True, 1 << 20)))

    @precondition(lambda self: self.sessions)
    @rule(i=st.integers(0, 100))
    def session_connect(self, i):
        key = sorted(self.sessions)[i % len(self.sessions)]
        sid = self.next_sid[key]
        self.next_sid[key] += 1
        self.apply(self.ct.receive_from_session(key, encode(MsgType.CONNECT, sid, port=80)), (key, sid))

    @rule(i=st.integers(0, 100))
    def container_connected(self, i):
        tid = self.pick(i, lambda t: t not in self.connected)
        if tid is not None:
            self.connected.add(tid)
            self.apply(self.ct.receive_from_container(encode(MsgType.CONNECTED, tid), 0.0))

    @rule(i=st.integers(0, 100))
    def container_data(self, i):
        tid = self.pick(i, lambda t: t in self.connected and t not in self.container_done)
        if tid is not None:
            self.apply(self.ct.receive_from_container(encode(MsgType.DATA, tid, str(tid).encode()), 0.0))

    @rule(i=st.integers(0, 100))
    def session_data(self, i):
        tid = self.pick(i, lambda t: t not in self.session_done)
        if tid is not None:
            key, sid = self.owner[tid]
            self.apply(self.ct.receive_from_session(key, encode(MsgType.DATA, sid, f"{key}/{sid}".encode())))

    @rule(i=st.integers(0, 100), side=st.booleans())
    def close(self, i, side):
        done = self.session_done if side else self.container_done
        tid = self.pick(i, lambda t: t not in done and (side or t in self.connected))
        if tid is not None:
            key, sid = self.owner[tid]
            done.add(tid)
            if side:
                self.apply(self.ct.receive_from_session(key, encode(MsgType.CLOSE, sid)))
            else:
                self.apply(self.ct.receive_from_container(encode(MsgType.CLOSE, tid), 0.0))

    @rule(i=st.integers(0, 100), side=st.booleans())
    def abort(self, i, side):
        tid = self.pick(i, lambda t: side or t in self.connected)
        if tid is not None:
            key, sid = self.owner[tid]
            if side:
                self.apply(self.ct.receive_from_session(key, encode(MsgType.ERROR, sid, b"x")))
            else:
                self.apply(self.ct.receive_from_container(encode(MsgType.ERROR, tid, b"x"), 0.0))
            assert tid not in self.owner

    @precondition(lambda self: self.sessions)
    @rule(i=st.integers(0, 100))
    def end_session(self, i):
        key = sorted(self.sessions)[i % len(self.sessions)]
        actions = self.ct.end_session(key)
        self.sessions.discard(key)
        assert not any(isinstance(a, SendToSession) for a in actions)
        torn_down = {dec(a).client_id for a in actions if isinstance(a, SendToContainer)}
        mine = {tid for tid, owner in self.owner.items() if owner[0] == key}
        assert torn_down == mine  # every connection of the session is torn down in the container
        self.apply(actions)
        assert all(owner[0] != key for owner in self.owner.values()), "a connection survived its session"

    @rule()
    def detach_and_attach(self):
        actions = self.ct.detach()
        told = {(a.session, dec(a).client_id) for a in actions if isinstance(a, SendToSession)}
        assert told == set(self.owner.values())  # every session connection hears "tunnel disconnected"
        self.apply(actions)
        assert self.owner == {} and self.ct.connection_count == 0
        self.attach()

    @invariant()
    def tables_agree(self):
        if hasattr(self, "ct"):
            table = {
                tid: (key, sid) for key in self.ct.sessions for sid, tid in self.ct.connections(key).items()
            }
            assert table == self.owner
            assert self.ct.connection_count == len(self.owner)


TestMultiplexerModel = MultiplexerModel.TestCase
TestMultiplexerModel.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)


# -- fuzz: arbitrary frames from anyone only ever raise the library's errors ---------------------------------

_frame = st.builds(
    lambda t, p, cid, port, payload: (
        bytes([t, p]) + cid.to_bytes(4, "big") + port.to_bytes(2, "big") + payload
    ),
    st.integers(0, 11),
    st.sampled_from([0, 0, 0, 1, 2]),
    st.integers(0, 4),
    st.sampled_from([0, 80, 81]),
    st.sampled_from([b"", b"\0\0\0\1", b"\0\0\0\0\0\4\0\0", b"xyz"]),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["c", "s1", "s2"]), st.one_of(_frame, st.binary(max_size=10))), max_size=60
    )
)
def test_arbitrary_frames_only_raise_protocol_errors(messages):
    ct = ContainerTunnel("c", window=8, legacy_buffer_limit=16, first_id=frames.MAX_CLIENT_ID - 1)
    ct.attach(0.0)
    for key in ("s1", "s2"):
        ct.open_session(key, T, 80)
    for who, data in messages:
        try:
            if who == "c":
                ct.receive_from_container(data, 1.0)
            else:
                ct.receive_from_session(who, data)
        except ProtocolError:
            if who == "c":
                ct.detach()
                ct.attach(1.0)
            else:
                ct.end_session(who)
                ct.open_session(who, T, 80)
    for key in ct.sessions:
        ct.end_session(key)
    ct.detach()
    assert ct.connection_count == 0


def test_queue_bound_counts_each_open_connection_at_its_window_or_legacy_buffer():
    # The runner's writers close a peer only beyond this bound (plus a margin): 100 bulk connections with
    # full windows are legitimate, one peer not reading its WebSocket is not.
    ct = attached(window=1024, legacy_buffer_limit=4096)
    assert ct.queue_bound() == 0 and ct.queue_bound("nobody") == 0
    session(ct, "a")
    session(ct, "b")
    for sid in (1, 2, 3):
        open_conn(ct, "a", sid)
    open_conn(ct, "b", 1)
    assert ct.queue_bound("a") == 3 * 4096
    assert ct.queue_bound("b") == 4096
    assert ct.queue_bound() == 4 * 4096
    ct.end_session("a")
    assert ct.queue_bound("a") == 0
    assert ct.queue_bound() == 4096
