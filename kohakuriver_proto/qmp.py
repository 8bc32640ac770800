"""The QEMU Machine Protocol (QMP), client side, sans-IO: bytes in, events out; commands in, bytes out.

The runner drives each VM's QEMU through its QMP Unix socket. This machine holds everything about the
protocol; the trio wrapper (``kohakuriver_runner.qmp_client``) only moves bytes between it and the socket.

Wire format. A stream of JSON objects, one per line (QEMU ends each with ``\\r\\n``; a bare ``\\n`` is
accepted too, blank lines are skipped; QEMU's ``pretty=on`` multi-line mode is not supported)::

    server -> client  {"QMP": {"version": {"qemu": {"major": 10, ...}, ...}, "capabilities": ["oob"]}}
    client -> server  {"execute": "qmp_capabilities", "id": 1}
    server -> client  {"return": {}, "id": 1}
    client -> server  {"execute": "query-status", "id": 2}           (with ``arguments`` when there are any)
    server -> client  {"return": {"status": "running", "running": true}, "id": 2}
                  or  {"error": {"class": "CommandNotFound", "desc": "..."}, "id": 2}
    server -> client  {"event": "STOP", "data": {...}, "timestamp": {"seconds": s, "microseconds": us}}

Usage::

    qmp = QmpMachine()
    # feed everything received: qmp.receive_data(chunk); b"" when the peer closed
    # drain: while (event := qmp.next_event()) is not NEED_DATA: handle(event)
    #   Greeting          -> write qmp.negotiate()
    #   Ready             -> commands may be sent: command_id, data = qmp.execute("query-status"); write data
    #   Response          -> the answer to command ``id``;  CommandFailed -> its error
    #   QmpEvent          -> an asynchronous event; ConnectionClosed -> the end (``unanswered`` lists the ids
    #                        that will never be answered)

Ordering rules:

- Nothing may be sent before the greeting has come out of ``next_event()``; ``negotiate()`` is then the
  first and only thing to send until ``Ready`` (QEMU refuses every other command until then, so the machine
  refuses them first: ``LocalProtocolError``). After ``Ready``, commands may be pipelined: every command
  carries an id this machine allocated (increasing integers, the capabilities command included), answers are
  matched by id, so the order QEMU answers in does not matter.
- Asynchronous events may arrive at any time after the greeting, between any two answers: QEMU sends
  ``STOP`` *before* the answer to ``stop``, and ``SHUTDOWN`` before the answer to ``quit``. They are handed
  out in the order they arrived, interleaved with the answers exactly as on the wire.
- ``next_event()`` hands out one event per call, so every message before a broken one comes out before the
  error: the events are the same however the input was split into ``receive_data`` calls.

Who broke the protocol:

- ``RemoteProtocolError`` (QEMU, or whatever listens on the socket): a line that is not a JSON object, a
  message of no known kind or with fields of the wrong type, anything before the greeting or a second
  greeting, an answer without an id or for an id that is not waiting (answers are exactly-once), the
  capabilities refused, a line longer than ``max_line``, the connection closed in the middle of a line. The
  machine then stays broken: ``next_event()`` raises the same error again, and the caller closes the socket.
- ``LocalProtocolError`` (the caller): ``negotiate()`` twice or before the greeting, a command before
  ``Ready`` or after the end, a command name or arguments that are not JSON, ``receive_data`` after EOF.

Line bound. A line may be at most ``max_line`` bytes (``MAX_LINE``, 16 MiB, by default; the line end is not
counted). QEMU's answers can be large and a bound must not refuse a real one: ``query-qmp-schema`` is about
240 KB on QEMU 10, ``human-monitor-command`` returns whatever the monitor printed (``info mtree`` or
``info qtree`` of a guest with many devices run to megabytes), and ``query-block``/``query-named-block-nodes``
grow with every backing file of a long snapshot chain. The bound is there because the socket is a peer like
any other: a QEMU that is broken (or something else listening on the socket) and never sends ``\\n`` must
not grow the runner's memory without end. The machine holds at most one incomplete line (plus what the
caller fed in one call), and scans each byte for the line end once, however small the pieces are.
"""

from __future__ import annotations

import enum
import json
from typing import Any

import attrs

from .errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "MAX_LINE",
    "NEED_DATA",
    "CommandFailed",
    "ConnectionClosed",
    "Greeting",
    "QmpEvent",
    "QmpMachine",
    "QmpState",
    "Ready",
    "Response",
]

#: Default bound of one line, in bytes (the line end not counted). See the module docstring for why 16 MiB.
MAX_LINE = 16 * 1024 * 1024

_CAPABILITIES = "qmp_capabilities"


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return self.value


#: ``next_event()`` result: feed more bytes with ``receive_data``.
NEED_DATA = _Sentinel.NEED_DATA


# -- events --------------------------------------------------------------------------------------------------


@attrs.frozen
class Greeting:
    """The server's first message. ``version`` is QEMU's ``(major, minor, micro)``; ``package`` its build
    string (e.g. the Debian version); ``capabilities`` what it offers (``"oob"``; none is enabled here)."""

    version: tuple[int, int, int]
    package: str
    capabilities: tuple[str, ...]


@attrs.frozen
class Ready:
    """Capabilities negotiation succeeded: commands may be sent."""


@attrs.frozen
class Response:
    """Command ``id`` succeeded; ``value`` is its ``return`` (any JSON value, often a dict)."""

    id: int
    value: Any


@attrs.frozen
class CommandFailed:
    """Command ``id`` failed: QEMU's error ``class`` (``CommandNotFound``, ``GenericError``, ...) and text."""

    id: int
    error_class: str
    description: str


@attrs.frozen
class QmpEvent:
    """An asynchronous event (``STOP``, ``RESUME``, ``SHUTDOWN``, ``POWERDOWN``, ...). ``data`` is ``{}`` when
    QEMU sent none; the timestamp is QEMU's wall clock when it emitted the event (-1, -1 if it had none)."""

    name: str
    data: dict[str, Any]
    seconds: int
    microseconds: int


@attrs.frozen
class ConnectionClosed:
    """The peer closed the connection between two messages. ``unanswered``: the ids of the commands sent and
    never answered (in the order they were sent), which will never be answered now."""

    unanswered: tuple[int, ...]


# -- states --------------------------------------------------------------------------------------------------


class QmpState(enum.Enum):
    GREETING = "greeting"  # waiting for the server's greeting
    GREETED = "greeted"  # the greeting is out: negotiate() is due
    NEGOTIATING = "negotiating"  # qmp_capabilities sent, its answer not yet received
    READY = "ready"  # commands may be sent
    CLOSED = "closed"  # the peer closed the connection (ConnectionClosed was returned)
    BROKEN = "broken"  # the peer broke the protocol: close the connection


# -- parsing helpers -----------------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return type(value) is int  # not bool: JSON true must not pass for the id 1


def _reject_constant(name: str) -> None:
    # Python's json accepts NaN and Infinity; JSON (and QEMU) do not.
    raise ValueError(f"{name} is not JSON")


def _show(raw: bytes | bytearray) -> str:
    text = repr(bytes(raw[:80]))
    return text + f"... ({len(raw)} bytes)" if len(raw) > 80 else text


def _parse_greeting(body: object) -> Greeting:
    if not isinstance(body, dict):
        raise RemoteProtocolError("QMP greeting: 'QMP' is not an object")
    version = body.get("version")
    capabilities = body.get("capabilities")
    qemu = version.get("qemu") if isinstance(version, dict) else None
    if not isinstance(qemu, dict) or not all(_is_int(qemu.get(k)) for k in ("major", "minor", "micro")):
        raise RemoteProtocolError("QMP greeting: 'version.qemu' must hold integers major, minor and micro")
    package = version.get("package", "")
    if not isinstance(package, str):
        raise RemoteProtocolError("QMP greeting: 'version.package' is not a string")
    if not isinstance(capabilities, list) or not all(isinstance(c, str) for c in capabilities):
        raise RemoteProtocolError("QMP greeting: 'capabilities' must be a list of strings")
    return Greeting((qemu["major"], qemu["minor"], qemu["micro"]), package, tuple(capabilities))


def _parse_event(message: dict[str, Any]) -> QmpEvent:
    name = message["event"]
    data = message.get("data", {})
    stamp = message.get("timestamp")
    if not isinstance(name, str) or not name:
        raise RemoteProtocolError("QMP event: 'event' must be a non-empty string")
    if not isinstance(data, dict):
        raise RemoteProtocolError(f"QMP event {name}: 'data' is not an object")
    if not (isinstance(stamp, dict) and _is_int(stamp.get("seconds")) and _is_int(stamp.get("microseconds"))):
        raise RemoteProtocolError(f"QMP event {name}: 'timestamp' must hold integer seconds and microseconds")
    return QmpEvent(name, data, stamp["seconds"], stamp["microseconds"])


def _parse_error(body: object, command_id: int) -> tuple[str, str]:
    if not (
        isinstance(body, dict) and isinstance(body.get("class"), str) and isinstance(body.get("desc"), str)
    ):
        raise RemoteProtocolError(
            f"QMP error answer to command {command_id}: needs string 'class' and 'desc'"
        )
    return body["class"], body["desc"]


# -- the machine ---------------------------------------------------------------------------------------------


class QmpMachine:
    """One QMP connection, client side. See the module docstring for the contract."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        if not _is_int(max_line) or max_line < 1:
            raise LocalProtocolError(f"max_line must be a positive integer, got {max_line!r}")
        self.max_line = max_line
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf known to hold no b"\n"
        self._eof = False
        self._state = QmpState.GREETING
        self._error: RemoteProtocolError | None = None
        self._greeting: Greeting | None = None
        self._next_id = 1
        self._capabilities_id: int | None = None
        self._pending: dict[int, str] = {}  # id -> command name, in the order sent

    # -- what the caller may look at --

    @property
    def state(self) -> QmpState:
        return self._state

    @property
    def greeting(self) -> Greeting | None:
        return self._greeting

    @property
    def pending(self) -> dict[int, str]:
        """The commands sent and not yet answered (``qmp_capabilities`` too): id -> name, oldest first."""
        return dict(self._pending)

    # -- input --

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes received from the socket; ``b""`` means the peer closed its side."""
        if self._eof:
            if data:
                raise LocalProtocolError("receive_data() after EOF")
            return
        if data:
            self._buf += data
        else:
            self._eof = True

    def next_event(
        self,
    ) -> Greeting | Ready | Response | CommandFailed | QmpEvent | ConnectionClosed | _Sentinel:
        """The next event, or ``NEED_DATA``. Raises ``RemoteProtocolError`` when the peer broke the protocol
        (again on every later call)."""
        if self._state is QmpState.BROKEN:
            assert self._error is not None
            raise self._error
        if self._state is QmpState.CLOSED:
            raise LocalProtocolError("the connection is closed: ConnectionClosed was already returned")
        try:
            while True:
                line = self._take_line()
                if line is None:
                    if self._eof:
                        self._state = QmpState.CLOSED
                        unanswered = tuple(self._pending)
                        self._pending.clear()
                        return ConnectionClosed(unanswered)
                    return NEED_DATA
                if line.strip():
                    return self._handle(self._decode(line))
        except RemoteProtocolError as exc:
            self._state = QmpState.BROKEN
            self._error = exc
            raise

    # -- output --

    def negotiate(self) -> bytes:
        """The ``qmp_capabilities`` command: the one thing to send after the greeting."""
        if self._state is not QmpState.GREETED:
            raise LocalProtocolError(
                f"negotiate() is due once, right after the greeting (the connection is {self._state.value})"
            )
        self._capabilities_id, data = self._encode(_CAPABILITIES, None)
        self._state = QmpState.NEGOTIATING
        return data

    def execute(self, name: str, arguments: dict[str, Any] | None = None) -> tuple[int, bytes]:
        """Command ``name`` with ``arguments``: ``(its id, the bytes to write)``. Only after ``Ready``."""
        if self._state is not QmpState.READY:
            raise LocalProtocolError(f"no command can be sent: the connection is {self._state.value}")
        if self._eof:
            raise LocalProtocolError("no command can be sent: the peer closed the connection")
        if not isinstance(name, str) or not name:
            raise LocalProtocolError(f"a command name must be a non-empty string, got {name!r}")
        if name == _CAPABILITIES:
            raise LocalProtocolError("capabilities were already negotiated")
        if arguments is not None and not (
            isinstance(arguments, dict) and all(isinstance(k, str) for k in arguments)
        ):
            raise LocalProtocolError(f"arguments of {name} must be a dict with string keys")
        return self._encode(name, arguments)

    # -- internals --

    def _encode(self, name: str, arguments: dict[str, Any] | None) -> tuple[int, bytes]:
        message: dict[str, Any] = {"execute": name}
        if arguments:
            message["arguments"] = arguments
        command_id = self._next_id
        message["id"] = command_id
        try:
            # One line: json.dumps escapes every control character inside strings, so no b"\n" but the last.
            data = json.dumps(message, separators=(",", ":"), allow_nan=False).encode() + b"\n"
        except (TypeError, ValueError) as exc:
            raise LocalProtocolError(f"arguments of {name} cannot be sent as JSON: {exc}") from None
        self._next_id += 1
        self._pending[command_id] = name
        return command_id, data

    def _take_line(self) -> bytes | None:
        """The next line without its line end, or None if it is not complete yet."""
        buf = self._buf
        end = buf.find(b"\n", self._scanned)
        if end < 0:
            self._scanned = len(buf)
            if len(buf) > self.max_line:
                raise RemoteProtocolError(f"QMP line longer than {self.max_line} bytes: {_show(buf)}")
            if self._eof and buf:
                raise RemoteProtocolError(f"connection closed in the middle of a QMP line: {_show(buf)}")
            return None
        if end > self.max_line:
            raise RemoteProtocolError(f"QMP line longer than {self.max_line} bytes: {_show(buf[:end])}")
        line = bytes(buf[:end])
        del buf[: end + 1]  # cheap: CPython's bytearray drops its head without moving the rest
        self._scanned = 0
        return line[:-1] if line.endswith(b"\r") else line

    @staticmethod
    def _decode(line: bytes) -> dict[str, Any]:
        try:
            message = json.loads(line.decode("utf-8"), parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError; so is JSON's
            raise RemoteProtocolError(f"QMP line is not JSON ({exc}): {_show(line)}") from None
        if not isinstance(message, dict):
            raise RemoteProtocolError(f"QMP message is not a JSON object: {_show(line)}")
        return message

    def _handle(self, message: dict[str, Any]) -> Greeting | Ready | Response | CommandFailed | QmpEvent:
        if self._state is QmpState.GREETING:
            if "QMP" not in message:
                raise RemoteProtocolError(f"expected the QMP greeting first, got keys {sorted(message)[:5]}")
            self._greeting = _parse_greeting(message["QMP"])
            self._state = QmpState.GREETED
            return self._greeting
        if "QMP" in message:
            raise RemoteProtocolError("a second QMP greeting")
        if "event" in message:
            return _parse_event(message)
        if ("return" in message) == ("error" in message):
            raise RemoteProtocolError(
                f"QMP message is neither an answer nor an event (keys {sorted(message)[:5]})"
            )
        command_id = message.get("id")
        if not _is_int(command_id) or command_id not in self._pending:
            raise RemoteProtocolError(f"QMP answer for an id that is not waiting: {command_id!r}")
        del self._pending[command_id]
        failed = _parse_error(message["error"], command_id) if "error" in message else None
        if command_id == self._capabilities_id:
            if failed is not None:
                raise RemoteProtocolError(f"QEMU refused capabilities negotiation: {failed[0]}: {failed[1]}")
            self._state = QmpState.READY
            return Ready()
        if failed is not None:
            return CommandFailed(command_id, *failed)
        return Response(command_id, message["return"])
