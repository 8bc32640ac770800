"""``kohakuriver_proto.terminal``: the start request, control messages, output tagging, the client machine."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kohakuriver_proto import terminal as term
from kohakuriver_proto.errors import LocalProtocolError, RemoteProtocolError, ValidationError
from kohakuriver_proto.session_opening import Connected, RefusalCode, Refusing, terminal_answer

argv = st.lists(st.text(min_size=1).filter(lambda s: "\0" not in s), min_size=1, max_size=8)
env_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True)
env = st.dictionaries(env_names, st.text().filter(lambda s: "\0" not in s), max_size=5)
sizes = st.integers(1, term.MAX_SIZE)


@given(
    tty=st.booleans(),
    command=st.none() | argv,
    rows=sizes,
    cols=sizes,
    env=env,
    user=st.none() | st.sampled_from(["root", "1000", "1000:1000", "app:staff"]),
    workdir=st.none() | st.sampled_from(["/", "/tmp", "/shared/a b"]),
)
def test_start_request_round_trips(tty, command, rows, cols, env, user, workdir):
    request = term.StartRequest(
        tty=tty, command=command, rows=rows, cols=cols, env=env, user=user, workdir=workdir
    )
    assert term.parse_start(request.encode()) == request


def test_start_request_defaults_and_login_shell():
    request = term.parse_start('{"tty": false}')
    assert (request.command, request.rows, request.cols, dict(request.env)) == (None, 24, 80, {})
    assert request.user is None and request.workdir is None


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ('{"command": ["ls"]}', "tty"),
        ('{"tty": "yes"}', "tty"),
        ('{"tty": true, "command": "rm -rf /"}', "command"),  # a shell string is not an argv
        ('{"tty": true, "command": []}', "command"),
        ('{"tty": true, "command": [""]}', "command[0]"),
        ('{"tty": true, "command": ["ls", 3]}', "command[1]"),
        ('{"tty": true, "command": ["ls", "a\\u0000b"]}', "command[1]"),
        ('{"tty": true, "rows": 0}', "rows"),
        ('{"tty": true, "cols": 100000}', "cols"),
        ('{"tty": true, "rows": 1.5}', "rows"),
        ('{"tty": true, "rows": true}', "rows"),
        ('{"tty": true, "env": {"A B": "x"}}', "env.A B"),
        ('{"tty": true, "env": {"A": 1}}', "env.A"),
        ('{"tty": true, "env": ["A=1"]}', "env"),
        ('{"tty": true, "user": "root; reboot"}', "user"),
        ('{"tty": true, "user": "-o"}', "user"),
        ('{"tty": true, "workdir": "relative"}', "workdir"),
    ],
)
def test_bad_start_requests_name_the_field(message, field):
    with pytest.raises(ValidationError) as info:
        term.parse_start(message)
    assert info.value.field == field


@pytest.mark.parametrize("message", ["not json", "[1, 2]", '"tty"', b'{"tty": true}', "x" * (2 << 20)])
def test_start_request_that_is_not_a_json_object(message):
    with pytest.raises(RemoteProtocolError):
        term.parse_start(message)


@given(rows=sizes, cols=sizes)
def test_resize_round_trips(rows, cols):
    assert term.parse_client_message(term.encode_resize(rows, cols)) == term.Resize(rows, cols)


def test_client_messages():
    assert term.parse_client_message(b"\x03abc") == term.Stdin(b"\x03abc")
    assert term.parse_client_message(term.encode_eof()) == term.Eof()
    assert term.parse_client_message('{"ping": 1}') is None  # unknown control: ignored
    assert term.parse_client_message('{"eof": false}') is None
    for bad in ('{"resize": [0, 80]}', '{"resize": [24]}', '{"resize": "24x80"}', "{", "[]"):
        with pytest.raises(RemoteProtocolError):
            term.parse_client_message(bad)


def test_server_messages():
    assert json.loads(term.encode_started()) == {"started": True}
    assert json.loads(term.encode_exit(3)) == {"exit": 3}
    assert json.loads(term.encode_error('a "quoted" reason')) == {"error": 'a "quoted" reason'}
    assert json.loads(term.encode_error("gone", RefusalCode.NOT_FOUND)) == {
        "error": "gone",
        "code": "not_found",
    }
    assert term.encode_output(None, b"\x01raw") == b"\x01raw"
    assert term.encode_output(term.Stream.STDERR, b"e") == b"\x02e"
    # A relay reads the first message with session_opening: started, a refusal, or a broken server.
    assert terminal_answer(term.encode_started()) == Connected()
    assert terminal_answer(term.encode_error("no")) == Refusing("no", term.encode_error("no"))
    for other in (b"\x01x", "CONNECTED", '{"exit": 0}', "{"):
        with pytest.raises(RemoteProtocolError):
            terminal_answer(other)


def started(tty: bool) -> term.TerminalClient:
    client = term.TerminalClient(term.StartRequest(tty=tty, command=["sh"]))
    assert json.loads(client.start())["command"] == ["sh"]
    assert client.receive(term.encode_started()) == [term.Started()]
    return client


@given(chunks=st.lists(st.tuples(st.sampled_from(list(term.Stream)), st.binary()), max_size=10))
def test_client_untags_output_without_tty(chunks):
    client = started(tty=False)
    got = []
    for stream, data in chunks:
        got += client.receive(term.encode_output(stream, data))
    assert got == [term.Output(stream, data) for stream, data in chunks]


@given(data=st.binary(min_size=1))
def test_client_passes_tty_output_raw(data):
    client = started(tty=True)
    assert client.receive(data) == [term.Output(term.Stream.STDOUT, data)]


def test_client_session_to_exit():
    client = started(tty=True)
    assert client.stdin(b"ls\n") == b"ls\n"
    assert json.loads(client.resize(30, 100)) == {"resize": [30, 100]}
    assert client.receive('{"exit": 5, "future": 1}') == [term.Exited(5)]
    assert client.closed(1000, "exited") == term.Closed(1000, "exited", True)
    assert client.exit_code == 5


def test_client_refused_and_failed():
    client = term.TerminalClient(term.StartRequest(tty=False))
    client.start()
    assert client.receive(term.encode_error("task 1 not found")) == [term.Refused("task 1 not found")]
    assert client.closed(1008, "task 1 not found") == term.Closed(1008, "task 1 not found", False)

    client = started(tty=False)
    assert client.receive(term.encode_error("docker died")) == [term.Failed("docker died")]
    assert not client.closed(1011, "").clean

    # The code travels with the error; a malformed one is dropped, never fatal.
    client = term.TerminalClient(term.StartRequest(tty=False))
    client.start()
    coded = term.encode_error("task 1 not found", RefusalCode.NOT_FOUND)
    assert client.receive(coded) == [term.Refused("task 1 not found", "not_found")]
    client = started(tty=False)
    assert client.receive('{"error": "x", "code": "Not A Code"}') == [term.Failed("x")]


def test_client_rejects_protocol_violations():
    client = term.TerminalClient(term.StartRequest(tty=False))
    with pytest.raises(LocalProtocolError):
        client.stdin(b"x")
    with pytest.raises(LocalProtocolError):
        client.receive(term.encode_started())
    client.start()
    with pytest.raises(LocalProtocolError):
        client.start()
    with pytest.raises(RemoteProtocolError):
        client.receive(b"\x01output before started")
    with pytest.raises(RemoteProtocolError):
        client.receive(term.encode_exit(0))  # exit before started
    assert client.receive('{"hello": "future"}') == []  # unknown server message: ignored
    client.receive(term.encode_started())
    with pytest.raises(RemoteProtocolError):
        client.receive(term.encode_started())
    for bad in (b"", b"\x07tag", '{"exit": "0"}'):
        with pytest.raises(RemoteProtocolError):
            client.receive(bad)
