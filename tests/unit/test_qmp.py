"""The QMP client machine: every split of the input, interleaved events and answers, errors, garbage, limits.

The transcripts are what QEMU 10 sends (``\\r\\n`` line ends, ``STOP`` before the answer to ``stop``,
``SHUTDOWN`` before the answer to ``quit``), written by hand so that these tests need no QEMU;
tests/integration/test_qmp_client.py runs the same protocol against a real one.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kohakuriver_proto import LocalProtocolError, RemoteProtocolError
from kohakuriver_proto.qmp import (
    MAX_LINE,
    NEED_DATA,
    CommandFailed,
    ConnectionClosed,
    Greeting,
    QmpEvent,
    QmpMachine,
    QmpState,
    Ready,
    Response,
)

GREETING = (
    b'{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, '
    b'"package": "Debian 1:10.0.2+ds-2"}, "capabilities": ["oob"]}}\r\n'
)
CAPS_OK = b'{"return": {}, "id": 1}\r\n'
GREETING_EVENT = Greeting((10, 0, 2), "Debian 1:10.0.2+ds-2", ("oob",))


def line(obj: object, eol: bytes = b"\r\n") -> bytes:
    return json.dumps(obj).encode() + eol


def event_line(name: str, data: dict | None = None, seconds: int = 1796614613, micro: int = 655409) -> bytes:
    message: dict = {"timestamp": {"seconds": seconds, "microseconds": micro}, "event": name}
    if data is not None:
        message["data"] = data
    return line(message)


class Client:
    """A client as the runner's wrapper drives the machine: feed, drain, react to each event at once."""

    def __init__(self, commands=(), max_line: int = MAX_LINE) -> None:
        self.machine = QmpMachine(max_line=max_line)
        self.commands = list(commands)  # (name, arguments) sent as soon as Ready comes out
        self.events: list = []
        self.sent: list[bytes] = []
        self.error: str | None = None

    def feed(self, data: bytes) -> None:
        self.machine.receive_data(data)
        self.drain()

    def drain(self) -> None:
        if self.error is not None or self.machine.state is QmpState.CLOSED:
            return
        try:
            while (event := self.machine.next_event()) is not NEED_DATA:
                self.events.append(event)
                if isinstance(event, Greeting):
                    self.sent.append(self.machine.negotiate())
                elif isinstance(event, Ready):
                    for name, arguments in self.commands:
                        self.sent.append(self.machine.execute(name, arguments)[1])
                elif isinstance(event, ConnectionClosed):
                    return
        except RemoteProtocolError as exc:
            self.error = str(exc)

    def outcome(self) -> tuple[list, str | None]:
        return self.events, self.error


def run(chunks, commands=(), max_line: int = MAX_LINE, eof: bool = True) -> tuple[list, str | None]:
    client = Client(commands, max_line)
    for chunk in chunks:
        client.feed(chunk)
    if eof:
        client.feed(b"")
    return client.outcome()


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    pieces, start = [], 0
    for p in points:
        pieces.append(data[start:p])
        start = p
    pieces.append(data[start:])
    return [p for p in pieces if p]  # an empty piece would be EOF


# -- the ordinary session ------------------------------------------------------------------------------------

SESSION_COMMANDS = [("query-status", None), ("stop", None), ("nope", None), ("quit", None)]
SESSION = b"".join(
    [
        GREETING,
        CAPS_OK,
        line({"return": {"status": "running", "running": True}, "id": 2}),
        event_line("STOP"),  # QEMU emits STOP before the answer to stop
        line({"return": {}, "id": 3}),
        line({"id": 4, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}),
        event_line("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"}, 1796614620, 9379),
        line({"return": {}, "id": 5}),
    ]
)
SESSION_EVENTS = [
    GREETING_EVENT,
    Ready(),
    Response(2, {"status": "running", "running": True}),
    QmpEvent("STOP", {}, 1796614613, 655409),
    Response(3, {}),
    CommandFailed(4, "CommandNotFound", "The command nope has not been found"),
    QmpEvent("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"}, 1796614620, 9379),
    Response(5, {}),
    ConnectionClosed(()),
]


def test_a_whole_session_in_one_piece():
    client = Client(SESSION_COMMANDS)
    client.feed(SESSION)
    client.feed(b"")
    assert client.outcome() == (SESSION_EVENTS, None)
    assert [json.loads(s) for s in client.sent] == [
        {"execute": "qmp_capabilities", "id": 1},
        {"execute": "query-status", "id": 2},
        {"execute": "stop", "id": 3},
        {"execute": "nope", "id": 4},
        {"execute": "quit", "id": 5},
    ]
    assert client.machine.state is QmpState.CLOSED
    assert client.machine.greeting == GREETING_EVENT
    assert client.machine.pending == {}


def test_every_single_split_and_byte_by_byte_give_the_same_events():
    for cut in range(len(SESSION) + 1):
        assert run(split_at(SESSION, [cut]), SESSION_COMMANDS) == (SESSION_EVENTS, None), cut
    assert run([bytes([b]) for b in SESSION], SESSION_COMMANDS) == (SESSION_EVENTS, None)


@settings(max_examples=300)
@given(st.lists(st.integers(min_value=0, max_value=len(SESSION)), max_size=30))
def test_any_split_gives_the_same_events(cuts):
    assert run(split_at(SESSION, cuts), SESSION_COMMANDS) == (SESSION_EVENTS, None)


def test_bare_newlines_and_blank_lines_are_accepted():
    data = SESSION.replace(b"\r\n", b"\n").replace(CAPS_OK.replace(b"\r\n", b"\n"), b"\r\n\n  \n" + CAPS_OK)
    assert run([data], SESSION_COMMANDS) == (SESSION_EVENTS, None)


# -- generated sessions: answers in any order, events between them, errors -----------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
event_names = st.sampled_from(["STOP", "RESUME", "SHUTDOWN", "POWERDOWN", "RESET", "DEVICE_DELETED"])


@st.composite
def sessions(draw):
    """A list of commands, the server's messages (answers in any order, events anywhere) and the events the
    client must see, in wire order."""
    count = draw(st.integers(min_value=0, max_value=6))
    commands = [(f"cmd-{i}", draw(st.none() | st.dictionaries(st.text(max_size=6), json_values, max_size=3)))
                for i in range(count)]  # fmt: skip
    order = draw(st.permutations(range(count)))
    wire: list[bytes] = [GREETING, CAPS_OK]
    expected: list = [GREETING_EVENT, Ready()]
    pending_events = draw(st.integers(min_value=0, max_value=5))
    for index in order:
        if pending_events and draw(st.booleans()):
            pending_events -= 1
            name, data = (
                draw(event_names),
                draw(st.none() | st.dictionaries(st.text(max_size=6), json_values)),
            )
            seconds, micro = draw(st.integers(-1, 2**40)), draw(st.integers(-1, 999_999))
            wire.append(event_line(name, data, seconds, micro))
            expected.append(QmpEvent(name, data or {}, seconds, micro))
        command_id = index + 2
        if draw(st.booleans()):
            value = draw(json_values)
            wire.append(line({"return": value, "id": command_id}, draw(st.sampled_from([b"\n", b"\r\n"]))))
            expected.append(Response(command_id, value))
        else:
            error_class, desc = draw(st.sampled_from(["GenericError", "CommandNotFound"])), draw(st.text())
            wire.append(line({"id": command_id, "error": {"class": error_class, "desc": desc}}))
            expected.append(CommandFailed(command_id, error_class, desc))
    expected.append(ConnectionClosed(()))
    return commands, b"".join(wire), expected


@settings(max_examples=300)
@given(sessions(), st.lists(st.integers(min_value=0, max_value=5000), max_size=20))
def test_generated_sessions_give_the_same_events_however_split(session, cuts):
    commands, data, expected = session
    assert run([data], commands) == (expected, None)
    assert run(split_at(data, cuts), commands) == (expected, None)


@settings(max_examples=100)
@given(sessions(), st.integers(min_value=0, max_value=6))
def test_closing_early_names_the_unanswered_commands(session, dropped):
    commands, data, _ = session
    lines = data.splitlines(keepends=True)
    answered = lines[: max(2, len(lines) - dropped)]  # greeting and capabilities always arrive
    events, error = run([b"".join(answered)], commands)
    assert error is None
    seen = {e.id for e in events if isinstance(e, Response | CommandFailed)}
    assert events[-1] == ConnectionClosed(tuple(i + 2 for i in range(len(commands)) if i + 2 not in seen))


# -- garbage and malformed messages --------------------------------------------------------------------------

MALFORMED = {
    b"not json": "not JSON",
    b'{"return": {}, "id": 2': "not JSON",
    b"[1, 2]": "not a JSON object",
    b'"text"': "not a JSON object",
    b'{"return": NaN, "id": 2}': "not JSON",
    b'{"return": Infinity, "id": 2}': "not JSON",
    b'{"return": "\xff\xfe", "id": 2}': "not JSON",
    b"[" * 100_000 + b"]" * 100_000: "not JSON",
    b'{"return": {}}': "not waiting: None",
    b'{"return": {}, "id": 99}': "not waiting: 99",
    b'{"return": {}, "id": "2"}': "not waiting: '2'",
    b'{"return": {}, "id": true}': "not waiting: True",
    b'{"return": {}, "id": 2.0}': "not waiting: 2.0",
    b'{"return": {}, "id": 1}': "not waiting: 1",  # the capabilities answer, a second time
    b'{"return": {}, "error": {"class": "X", "desc": "y"}, "id": 2}': "neither an answer nor an event",
    b'{"id": 2}': "neither an answer nor an event",
    b"{}": "neither an answer nor an event",
    b'{"error": "boom", "id": 2}': "needs string 'class' and 'desc'",
    b'{"error": {"class": 1, "desc": "x"}, "id": 2}': "needs string 'class' and 'desc'",
    b'{"event": "STOP"}': "'timestamp' must hold",
    b'{"event": "STOP", "timestamp": {"seconds": 1.5, "microseconds": 0}}': "'timestamp' must hold",
    b'{"event": "STOP", "timestamp": {"seconds": true, "microseconds": 0}}': "'timestamp' must hold",
    b'{"event": 7, "timestamp": {"seconds": 1, "microseconds": 0}}': "non-empty string",
    b'{"event": "", "timestamp": {"seconds": 1, "microseconds": 0}}': "non-empty string",
    b'{"event": "X", "data": [1], "timestamp": {"seconds": 1, "microseconds": 0}}': "'data' is not an object",
    GREETING.rstrip(): "a second QMP greeting",
}  # fmt: skip


@pytest.mark.parametrize("bad", list(MALFORMED), ids=lambda b: repr(b[:40]))
def test_malformed_messages_break_the_connection_after_the_good_ones(bad):
    before = GREETING + CAPS_OK + event_line("RESUME")
    data = before + bad + b"\r\n" + line({"return": {}, "id": 2})
    expected_events = [GREETING_EVENT, Ready(), QmpEvent("RESUME", {}, 1796614613, 655409)]
    for cuts in ([], [len(before) + 1], [len(before) + len(bad) // 2], [len(before) + len(bad) + 1]):
        events, error = run(split_at(data, cuts), [("query-status", None)])
        assert events == expected_events
        assert error is not None and MALFORMED[bad] in error
    # The machine stays broken: the same error again, and no command can be sent.
    client = Client([("query-status", None)])
    client.feed(data)
    assert client.machine.state is QmpState.BROKEN
    with pytest.raises(RemoteProtocolError) as again:
        client.machine.next_event()
    assert str(again.value) == client.error
    with pytest.raises(LocalProtocolError):
        client.machine.execute("query-status")


@pytest.mark.parametrize(
    "first",
    [
        event_line("STOP"),
        CAPS_OK,
        b'{"QMP": []}\r\n',
        b'{"QMP": {"version": {"qemu": {"major": 10, "minor": 0}}, "capabilities": []}}\r\n',
        b'{"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 0}}, "capabilities": "oob"}}\r\n',
        b'{"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 0}, "package": 1}, '
        b'"capabilities": []}}\r\n',
    ],
)
def test_anything_but_a_well_formed_greeting_first_is_refused(first):
    events, error = run([first])
    assert events == [] and error is not None and "greeting" in error


def test_a_greeting_without_package_is_accepted():
    greeting = b'{"QMP": {"version": {"qemu": {"major": 9, "minor": 2, "micro": 0}}, "capabilities": []}}\n'
    assert run([greeting])[0] == [Greeting((9, 2, 0), "", ()), ConnectionClosed((1,))]


def test_an_answer_before_capabilities_were_sent_is_refused():
    machine = QmpMachine()
    machine.receive_data(GREETING + CAPS_OK)
    assert machine.next_event() == GREETING_EVENT
    with pytest.raises(RemoteProtocolError, match="not waiting: 1"):
        machine.next_event()


def test_refused_capabilities_break_the_connection():
    refusal = line({"id": 1, "error": {"class": "GenericError", "desc": "no"}})
    events, error = run([GREETING + refusal])
    assert events == [GREETING_EVENT]
    assert error == "QEMU refused capabilities negotiation: GenericError: no"


def test_a_line_cut_by_the_end_of_the_connection_is_an_error():
    for cut in range(1, len(CAPS_OK) - 1):  # any part of the line but the line end itself
        events, error = run([GREETING + CAPS_OK[:cut]])
        assert events == [GREETING_EVENT]
        assert error is not None and "closed in the middle" in error
    # Only the "\n" missing: still cut.
    assert "closed in the middle" in run([GREETING + CAPS_OK[:-1]])[1]


@settings(max_examples=300)
@given(st.binary(max_size=300), st.lists(st.integers(min_value=0, max_value=400), max_size=10))
def test_garbage_after_the_greeting_gives_the_same_outcome_however_split(garbage, cuts):
    data = GREETING + CAPS_OK + garbage
    whole = run([data], [("a", None), ("b", {"x": 1})])
    assert (
        run(split_at(data, [len(GREETING) + len(CAPS_OK) + c for c in cuts]), [("a", None), ("b", {"x": 1})])
        == whole
    )
    events, error = whole
    assert events[:2] == [GREETING_EVENT, Ready()]
    assert (error is None) == isinstance(events[-1], ConnectionClosed)


@settings(max_examples=200)
@given(st.binary(max_size=300))
def test_garbage_instead_of_a_greeting_is_refused_or_waited_for(garbage):
    events, error = run(split_at(garbage, []), eof=False)
    assert events == []
    if error is None:  # only blank lines so far, and perhaps the start of one more
        assert all(not part.strip() for part in garbage.split(b"\n")[:-1])


# -- the line bound ------------------------------------------------------------------------------------------


def test_the_line_bound_counts_the_bytes_before_the_newline():
    content = len(GREETING) - 1  # the greeting with its "\r", without the "\n"
    for cut in range(len(GREETING) + 1):
        pieces = split_at(GREETING, [cut])
        assert run(pieces, max_line=content) == ([GREETING_EVENT, ConnectionClosed((1,))], None)
        events, error = run(pieces, max_line=content - 1)
        assert events == [] and f"longer than {content - 1} bytes" in error


@settings(max_examples=200)
@given(st.integers(min_value=1, max_value=200), st.lists(st.integers(min_value=0, max_value=600), max_size=8))
def test_a_long_line_is_refused_at_the_same_event_however_split(excess, cuts):
    limit = 300
    value = "x" * (limit - len('{"return": "", "id": 2}') + excess)
    long_line = line({"return": value, "id": 2}, b"\n")
    data = GREETING + CAPS_OK + event_line("STOP") + long_line
    events, error = run(split_at(data, cuts), [("query-status", None)], max_line=limit, eof=False)
    assert events == [GREETING_EVENT, Ready(), QmpEvent("STOP", {}, 1796614613, 655409)]
    assert error is not None and f"longer than {limit} bytes" in error


def test_a_long_line_is_refused_before_its_end_arrives():
    machine = QmpMachine(max_line=1000)
    machine.receive_data(GREETING)
    machine.next_event()
    machine.receive_data(b"x" * 1000)
    assert machine.next_event() is NEED_DATA  # exactly at the bound: maybe a line end comes next
    machine.receive_data(b"x")
    with pytest.raises(RemoteProtocolError, match="longer than 1000 bytes"):
        machine.next_event()


def test_answers_up_to_the_default_bound_arrive_in_small_pieces():
    value = "y" * (MAX_LINE - 40)
    big = line({"return": value, "id": 2}, b"\n")
    assert len(big) - 1 <= MAX_LINE
    client = Client([("human-monitor-command", {"command-line": "info mtree"})])
    client.feed(GREETING + CAPS_OK)
    for start in range(0, len(big), 65536):  # as a socket hands them over
        client.feed(big[start : start + 65536])
    client.feed(b"")
    assert client.error is None
    assert client.events[2] == Response(2, value)

    too_big = b"z" * (MAX_LINE + 1)
    machine = QmpMachine()
    machine.receive_data(GREETING)
    machine.next_event()
    for start in range(0, len(too_big), 1 << 20):
        machine.receive_data(too_big[start : start + (1 << 20)])
        if start + (1 << 20) < len(too_big):
            assert machine.next_event() is NEED_DATA
    with pytest.raises(RemoteProtocolError, match=f"longer than {MAX_LINE} bytes"):
        machine.next_event()


# -- the caller's mistakes -----------------------------------------------------------------------------------


def test_nothing_but_capabilities_before_ready():
    machine = QmpMachine()
    with pytest.raises(LocalProtocolError, match="greeting"):
        machine.negotiate()
    with pytest.raises(LocalProtocolError, match="greeting"):
        machine.execute("query-status")
    machine.receive_data(GREETING)
    assert machine.next_event() == GREETING_EVENT
    with pytest.raises(LocalProtocolError, match="greeted"):
        machine.execute("query-status")
    assert json.loads(machine.negotiate()) == {"execute": "qmp_capabilities", "id": 1}
    assert machine.pending == {1: "qmp_capabilities"}
    with pytest.raises(LocalProtocolError, match="negotiating"):
        machine.execute("query-status")
    with pytest.raises(LocalProtocolError, match="once"):
        machine.negotiate()
    machine.receive_data(CAPS_OK)
    assert machine.next_event() == Ready()
    assert machine.state is QmpState.READY
    assert machine.execute("query-status") == (2, b'{"execute":"query-status","id":2}\n')
    with pytest.raises(LocalProtocolError, match="once"):
        machine.negotiate()


def ready_machine() -> QmpMachine:
    machine = QmpMachine()
    machine.receive_data(GREETING + CAPS_OK)
    assert machine.next_event() == GREETING_EVENT
    machine.negotiate()
    assert machine.next_event() == Ready()
    return machine


@pytest.mark.parametrize(
    ("name", "arguments", "message"),
    [
        ("", None, "non-empty string"),
        (7, None, "non-empty string"),
        ("qmp_capabilities", None, "already negotiated"),
        ("x", [1], "dict with string keys"),
        ("x", {1: 2}, "dict with string keys"),
        ("x", {"a": object()}, "cannot be sent as JSON"),
        ("x", {"a": float("nan")}, "cannot be sent as JSON"),
        ("x", {"a": {"b": b"bytes"}}, "cannot be sent as JSON"),
    ],
)
def test_commands_that_cannot_be_sent(name, arguments, message):
    machine = ready_machine()
    with pytest.raises(LocalProtocolError, match=message):
        machine.execute(name, arguments)
    assert machine.pending == {}
    assert machine.execute("query-status")[0] == 2  # a refused command used no id


@given(st.text(), st.dictionaries(st.text(), json_values, max_size=4))
def test_a_command_is_one_line_that_reads_back(name, arguments):
    if not name or name == "qmp_capabilities":
        return
    machine = ready_machine()
    command_id, data = machine.execute(name, arguments)
    assert data.endswith(b"\n") and data.count(b"\n") == 1 and b"\r" not in data
    expected = {"execute": name, "id": command_id, **({"arguments": arguments} if arguments else {})}
    assert json.loads(data) == expected
    assert machine.pending == {command_id: name}


def test_after_the_end():
    machine = ready_machine()
    machine.execute("query-status")
    machine.receive_data(b"")
    with pytest.raises(LocalProtocolError, match="closed"):
        machine.execute("cont")
    with pytest.raises(LocalProtocolError, match="after EOF"):
        machine.receive_data(b"{}")
    machine.receive_data(b"")  # a second EOF is harmless
    assert machine.next_event() == ConnectionClosed((2,))
    assert machine.state is QmpState.CLOSED and machine.pending == {}
    with pytest.raises(LocalProtocolError, match="already returned"):
        machine.next_event()


def test_closed_while_negotiating_names_the_capabilities_command():
    events, error = run([GREETING], eof=True)
    assert error is None and events == [GREETING_EVENT, ConnectionClosed((1,))]


def test_bad_max_line():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(LocalProtocolError):
            QmpMachine(max_line=bad)


def test_events_may_come_while_negotiating():
    data = GREETING + event_line("RESUME") + CAPS_OK
    assert run([data])[0] == [GREETING_EVENT, QmpEvent("RESUME", {}, 1796614613, 655409), Ready(),
                              ConnectionClosed(())]  # fmt: skip
