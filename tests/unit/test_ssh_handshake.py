"""REQUEST_TUNNEL handshake: both machines, every split of the input, limits, and the host's messages."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kohakuriver_proto import LocalProtocolError, RemoteProtocolError
from kohakuriver_proto.ssh_handshake import (
    MAX_LINE,
    NEED_DATA,
    ClientHandshake,
    RejectReason,
    ServerHandshake,
    TunnelAccepted,
    TunnelRejected,
    TunnelRequest,
    build_error,
    build_request,
    check_tunnel_target,
    parse_reply_line,
)

TOKEN_CHARS = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
tokens = st.text(TOKEN_CHARS, min_size=1, max_size=100)
task_ids = st.integers(min_value=0, max_value=(1 << 63) - 1)


def drive(machine, chunks, eof=True):
    """Feed ``chunks`` (then EOF) one by one, pulling an event after each.

    Returns ``(event, trailing_data)`` once an event arrives (the remaining chunks are still fed: they are
    the stream), ``(("error", message), None)`` for a RemoteProtocolError, or ``(NEED_DATA, None)``.
    """
    feed = [*chunks, *([b""] if eof else [])]
    for i, chunk in enumerate(feed):
        machine.receive_data(chunk)
        try:
            event = machine.next_event()
        except RemoteProtocolError as exc:
            return ("error", str(exc)), None
        if event is not NEED_DATA:
            for more in feed[i + 1 :]:
                machine.receive_data(more)
            return event, machine.trailing_data
    return NEED_DATA, None


def server_outcome(chunks, eof=True):
    return drive(ServerHandshake(), list(chunks), eof)


def client_outcome(chunks, eof=True):
    client = ClientHandshake(1)
    client.send_request()
    return drive(client, list(chunks), eof)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at ``cuts`` (no empty chunks: an empty chunk would mean EOF)."""
    points = sorted({0, len(data), *(min(c, len(data)) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


# -- server: happy paths -------------------------------------------------------------------------------------


def test_plain_request():
    outcome, trailing = server_outcome([b"REQUEST_TUNNEL 123\n"])
    assert outcome == TunnelRequest(123, None)
    assert trailing == (b"", True)


def test_request_with_token_and_crlf_and_early_stream_bytes():
    outcome, trailing = server_outcome([b"REQUEST_TUNNEL 42 abc.DEF-123_x\r\nSSH-2.0-OpenSSH_9.6\r\n"])
    assert outcome == TunnelRequest(42, "abc.DEF-123_x")
    assert trailing == (b"SSH-2.0-OpenSSH_9.6\r\n", True)


def test_token_is_not_in_repr():
    assert "secret" not in repr(TunnelRequest(1, "secret"))
    assert repr(TunnelRequest(1, "secret")) == "TunnelRequest(task_id=1)"


def test_events_are_values_and_frozen():
    """Equal by value (and hashed alike), never equal across types, and not changed after construction."""
    assert TunnelRequest(1, "t") == TunnelRequest(1, "t") and TunnelRequest(1, "t") != TunnelRequest(1)
    assert TunnelRequest(5) == TunnelRequest(5, None) and TunnelAccepted() == TunnelAccepted()
    assert TunnelRejected("no") != TunnelRejected("nope") and TunnelAccepted() != TunnelRejected("")
    assert len({TunnelRequest(1, "t"), TunnelRequest(1, "t"), TunnelAccepted(), TunnelAccepted()}) == 2
    event = TunnelRejected("why")
    with pytest.raises(AttributeError):
        event.message = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        event.extra = 1  # type: ignore[attr-defined]
    assert event.message == "why" and repr(event) == "TunnelRejected(message='why')"


def test_server_reply_flow():
    server = ServerHandshake()
    server.receive_data(b"REQUEST_TUNNEL 7\n")
    assert server.next_event() == TunnelRequest(7)
    assert server.request == TunnelRequest(7)
    assert server.send_success() == b"SUCCESS\n"
    assert server.accepted is True
    with pytest.raises(LocalProtocolError):
        server.send_success()
    with pytest.raises(LocalProtocolError):
        server.send_error("late")
    with pytest.raises(LocalProtocolError):
        server.next_event()


def test_server_error_reply_is_one_line():
    server = ServerHandshake()
    server.receive_data(b"REQUEST_TUNNEL 7\n")
    server.next_event()
    reply = server.send_error("task 7 not found\nsecond line\r\nthird")
    assert reply == b"ERROR task 7 not found second line third\n"
    assert server.accepted is False
    with pytest.raises(LocalProtocolError):
        server.send_success()


def test_server_may_send_error_without_or_after_bad_request():
    server = ServerHandshake()
    assert server.send_error("timed out waiting for REQUEST_TUNNEL").startswith(b"ERROR timed out")
    bad = ServerHandshake()
    bad.receive_data(b"HELLO\n")
    with pytest.raises(RemoteProtocolError):
        bad.next_event()
    assert bad.send_error("bad request") == b"ERROR bad request\n"
    with pytest.raises(LocalProtocolError):
        bad.send_success()


def test_success_needs_a_request():
    server = ServerHandshake()
    with pytest.raises(LocalProtocolError):
        server.send_success()
    server.receive_data(b"REQUEST_TUN")
    assert server.next_event() is NEED_DATA
    with pytest.raises(LocalProtocolError):
        server.send_success()


def test_need_data_until_newline_without_eof():
    assert server_outcome([b"REQUEST_TUNNEL 1"], eof=False) == (NEED_DATA, None)


# -- server: malformed input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"GET / HTTP/1.1\r\n", "expected 'REQUEST_TUNNEL"),
        (b"REQUEST_TUNNEL\n", "arguments"),
        (b"REQUEST_TUNNEL \n", "decimal digits"),
        (b"REQUEST_TUNNEL abc\n", "decimal digits"),
        (b"REQUEST_TUNNEL -1\n", "decimal digits"),
        (b"REQUEST_TUNNEL +1\n", "decimal digits"),
        ("REQUEST_TUNNEL \u0661\u0662\n".encode(), "decimal digits"),  # Arabic-Indic digits
        (b"REQUEST_TUNNEL 99999999999999999999\n", "out of range"),
        (b"REQUEST_TUNNEL  1\n", "decimal digits"),
        (b"REQUEST_TUNNEL 1 tok extra\n", "arguments"),
        (b"REQUEST_TUNNEL 1 \n", "printable ASCII"),
        (b"REQUEST_TUNNEL 1 t\x01k\n", "printable ASCII"),
        ("REQUEST_TUNNEL 1 t\u00e9k\n".encode(), "printable ASCII"),
        (b"request_tunnel 1\n", "expected 'REQUEST_TUNNEL"),
        (b"REQUEST_TUNNEL 1\r\r\n", "decimal digits"),
        (b"", "closed before"),
        (b"REQUEST_TUNNEL 1", "closed in the middle"),
        (b"\n", "expected 'REQUEST_TUNNEL"),
    ],
)
def test_malformed_requests(raw, fragment):
    outcome, _ = server_outcome([raw])
    assert outcome[0] == "error"
    assert fragment in outcome[1]


def test_error_state_is_sticky():
    server = ServerHandshake()
    server.receive_data(b"NOPE\n")
    with pytest.raises(RemoteProtocolError) as first:
        server.next_event()
    with pytest.raises(RemoteProtocolError) as second:
        server.next_event()
    assert first.value is second.value


def test_data_after_eof_is_misuse():
    server = ServerHandshake()
    server.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"x")


def test_line_limit_exactly_512_bytes_is_accepted():
    prefix = b"REQUEST_TUNNEL 1 "
    token = b"t" * (MAX_LINE - len(prefix) - 1)
    line = prefix + token + b"\n"
    assert len(line) == MAX_LINE
    outcome, _ = server_outcome([line])
    assert outcome == TunnelRequest(1, token.decode())


def test_line_limit_513_bytes_is_refused_without_waiting_for_more():
    prefix = b"REQUEST_TUNNEL 1 "
    line = prefix + b"t" * (MAX_LINE - len(prefix)) + b"\n"
    assert len(line) == MAX_LINE + 1
    outcome, _ = server_outcome([line])
    assert outcome[0] == "error" and "longer than 512" in outcome[1]
    # no newline, no EOF: 512 buffered bytes are already enough to refuse
    outcome, _ = server_outcome([b"x" * MAX_LINE], eof=False)
    assert outcome[0] == "error"
    outcome, _ = server_outcome([b"x" * (MAX_LINE - 1)], eof=False)
    assert outcome == NEED_DATA


# -- splitting: the outcome never depends on how bytes arrive ------------------------------------------------


SAMPLES = [
    b"REQUEST_TUNNEL 123\n",
    b"REQUEST_TUNNEL 123 tok3n\r\nSSH-2.0-x\r\nmore",
    b"REQUEST_TUNNEL 12a\nrest",
    b"REQUEST_TUNNEL 1 " + b"t" * 494 + b"\n",
    b"REQUEST_TUNNEL 1 " + b"t" * 495 + b"\n",
    b"REQUEST_TUNNEL 1",
]


@pytest.mark.parametrize("data", SAMPLES)
def test_every_single_split_point(data):
    whole = server_outcome([data])
    for cut in range(len(data) + 1):
        assert server_outcome(split_at(data, [cut])) == whole, cut


@pytest.mark.parametrize("data", SAMPLES)
def test_byte_by_byte(data):
    assert server_outcome([data[i : i + 1] for i in range(len(data))]) == server_outcome([data])


request_like = st.one_of(
    st.builds(
        lambda tid, tok, tail, cr: build_request(tid, tok)[:-1] + (b"\r" if cr else b"") + b"\n" + tail,
        task_ids,
        st.none() | tokens,
        st.binary(max_size=64),
        st.booleans(),
    ),
    st.binary(max_size=600),
    st.builds(lambda a, b: b"REQUEST_TUNNEL " + a + b, st.binary(max_size=40), st.sampled_from([b"\n", b""])),
)


@settings(max_examples=300)
@given(request_like, st.lists(st.integers(min_value=0, max_value=700), max_size=12), st.booleans())
def test_server_random_chunkings(data, cuts, eof):
    assert server_outcome(split_at(data, cuts), eof) == server_outcome(split_at(data, []), eof)


reply_like = st.one_of(
    st.builds(lambda tail: b"SUCCESS\n" + tail, st.binary(max_size=64)),
    st.builds(lambda msg, tail: build_error(msg) + tail, st.text(max_size=600), st.binary(max_size=32)),
    st.binary(max_size=600),
)


@settings(max_examples=300)
@given(reply_like, st.lists(st.integers(min_value=0, max_value=700), max_size=12), st.booleans())
def test_client_random_chunkings(data, cuts, eof):
    assert client_outcome(split_at(data, cuts), eof) == client_outcome(split_at(data, []), eof)


# -- client --------------------------------------------------------------------------------------------------


def test_client_success_with_early_stream_bytes():
    client = ClientHandshake("55", token="tok")
    assert client.send_request() == b"REQUEST_TUNNEL 55 tok\n"
    with pytest.raises(LocalProtocolError):
        client.send_request()
    client.receive_data(b"SUCC")
    assert client.next_event() is NEED_DATA
    client.receive_data(b"ESS\r\nSSH-2.0-OpenSSH\r\n")
    assert client.next_event() == TunnelAccepted()
    assert client.trailing_data == (b"SSH-2.0-OpenSSH\r\n", False)
    with pytest.raises(LocalProtocolError):
        client.next_event()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"ERROR task 9 not found\n", "task 9 not found"),
        (b"ERROR\n", ""),
        ("ERROR caf\u00e9\n".encode(), "caf\u00e9"),
    ],
)
def test_client_rejection(raw, message):
    outcome, _ = client_outcome([raw])
    assert outcome == TunnelRejected(message)


@pytest.mark.parametrize(
    "raw", [b"OK\n", b"SUCCESS extra\n", b"ERRORS\n", b"", b"SUCCESS", b"E" * MAX_LINE, b"success\n"]
)
def test_client_refuses_garbage(raw):
    outcome, _ = client_outcome([raw])
    assert outcome[0] == "error"


def test_client_misuse():
    client = ClientHandshake(1)
    with pytest.raises(LocalProtocolError):
        client.next_event()
    for bad_id in ["12a", "-1", "", "\u0661", 1 << 63, -1, True]:
        with pytest.raises(LocalProtocolError):
            ClientHandshake(bad_id)
    for bad_token in ["", "a b", "t\u00e9", "a\nb", "x" * 600]:
        with pytest.raises(LocalProtocolError):
            ClientHandshake(1, bad_token)


@given(task_ids, st.none() | tokens, st.text(max_size=700))
def test_both_machines_talk_to_each_other(task_id, token, message):
    client, server = ClientHandshake(task_id, token), ServerHandshake()
    server.receive_data(client.send_request())
    assert server.next_event() == TunnelRequest(task_id, token)
    client.receive_data(server.send_error(message))
    event = client.next_event()
    assert isinstance(event, TunnelRejected)
    assert "\n" not in event.message and "\r" not in event.message


@given(st.text(max_size=2000))
def test_error_line_always_fits_and_is_one_line(message):
    line = build_error(message)
    assert len(line) <= MAX_LINE
    assert line.endswith(b"\n") and line.count(b"\n") == 1 and b"\r" not in line
    assert isinstance(parse_reply_line(line), TunnelRejected)


def test_error_truncation_keeps_utf8_valid():
    line = build_error("\u00e9" * 600)
    assert len(line) <= MAX_LINE
    line.decode("utf-8")


# -- the host's validation messages --------------------------------------------------------------------------


def test_check_tunnel_target_order_and_messages():
    ok = dict(task_id=5, exists=True, allowed=True, task_type="vps", status="running", node="gpu1",
              node_online=True, ssh_port=2222)  # fmt: skip
    assert check_tunnel_target(**ok) is None
    assert check_tunnel_target(**{**ok, "status": "paused"}) is None
    assert check_tunnel_target(**{**ok, "exists": False, "allowed": False}) == "task 5 not found"
    # not allowed hides everything else about the task
    denied = check_tunnel_target(**{**ok, "allowed": False, "task_type": "command"})
    assert denied == "not allowed to reach task 5"
    assert "not a VPS" in check_tunnel_target(**{**ok, "task_type": "command"})
    assert "not running (status: stopped)" in check_tunnel_target(**{**ok, "status": "stopped"})
    assert "offline" in check_tunnel_target(**{**ok, "node_online": False})
    assert "offline" in check_tunnel_target(**{**ok, "node": None})
    assert "no SSH port" in check_tunnel_target(**{**ok, "ssh_port": None})
    assert "no SSH port" in check_tunnel_target(**{**ok, "ssh_port": 0})


def test_reject_reasons_are_one_line():
    for reason in RejectReason:
        text = reason.message(task_id=1, task_type="command", status="x", node="n", detail="refused")
        assert "\n" not in text and build_error(text) == b"ERROR " + text.encode() + b"\n"
