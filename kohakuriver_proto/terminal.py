"""The terminal session protocol (``kr connect``, ``kr terminal exec``): message formats, parsing, the client.

One WebSocket per session, the same on both legs (CLI -> host ``/ws/terminal/{task_id}`` -> runner
``/ws/terminal/{task_id}``); the host relays messages verbatim, preserving text/binary types.

Client -> server:

- first message, text JSON: ``{"command": [argv...], "tty": bool, "rows": n, "cols": n, "env": {...},
  "user": "u[:g]", "workdir": "/abs"}``. Only ``tty`` is required. No ``command`` means a login shell
  (``/bin/bash`` if the container has it, else ``/bin/sh``). ``command`` is an argv, never a shell string.
- binary: bytes for the process's stdin.
- text JSON control: ``{"resize": [rows, cols]}`` (TTY sessions), ``{"eof": true}`` (close stdin).

Server -> client:

- text ``{"started": true}`` once the process runs (the first message of an accepted session);
- binary: output. With a TTY the raw terminal bytes; without, one leading byte tags the stream
  (1 = stdout, 2 = stderr) followed by the data;
- text ``{"exit": code}`` when the process ended, then a close with 1000;
- text ``{"error": "reason", "code": "not_found"}`` then a close: 1008 when the request will not be served
  (bad request, unknown or not running task, not allowed), 1011 when the node, runner or Docker failed
  (before or during the session). ``code`` and the close reason are the machine-readable ``RefusalCode``;
  how a session opens, and what codes mean, is ``session_opening``'s.

Text messages this version does not know (other keys) are ignored by both sides, so either may add some.
Everything here is pure: callers feed messages in and send what comes out.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping
from typing import Any

import attrs

from .errors import LocalProtocolError, RemoteProtocolError, ValidationError
from .session_opening import CLOSE_POLICY, CLOSE_UNAVAILABLE, RefusalCode, code_name_of, terminal_error_text

__all__ = [
    "DEFAULT_COLS",
    "DEFAULT_ROWS",
    "MAX_START_BYTES",
    "Closed",
    "Eof",
    "Exited",
    "Failed",
    "Output",
    "Refused",
    "Resize",
    "StartRequest",
    "Started",
    "Stdin",
    "Stream",
    "TerminalClient",
    "encode_error",
    "encode_exit",
    "encode_output",
    "encode_started",
    "parse_client_message",
    "parse_start",
]

#: WebSocket close codes of the session (RFC 6455): done, refused, failed.
NORMAL, POLICY, INTERNAL = 1000, CLOSE_POLICY, CLOSE_UNAVAILABLE
DEFAULT_ROWS, DEFAULT_COLS = 24, 80
#: A terminal larger than this is a mistake, not a monitor (Docker takes the sizes as uint16 anyway).
MAX_SIZE = 9999
MAX_START_BYTES = 1 << 20
MAX_ARGS = 4096
MAX_ENV = 256
MAX_ENV_VALUE = 32 * 1024
MAX_PATH = 4096
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}")
# Docker's ``User``: name or uid, optionally ``:group``/``:gid``. No spaces, no shell characters.
_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,63})?")


class Stream(enum.IntEnum):
    """The tag byte of a non-TTY output message (Docker's own numbering)."""

    STDOUT = 1
    STDERR = 2


# -- the start request --------------------------------------------------------------------------------------


def _check_text(field: str, value: Any, limit: int) -> str:
    if not isinstance(value, str):
        raise ValidationError(field, "must be a string")
    if "\0" in value:
        raise ValidationError(field, "must not contain NUL")
    if len(value.encode("utf-8", "surrogatepass")) > limit:
        raise ValidationError(field, f"is longer than {limit} bytes")
    return value


def _check_size(field: str, value: Any) -> int:
    if type(value) is not int or not 1 <= value <= MAX_SIZE:
        raise ValidationError(field, f"must be an integer from 1 to {MAX_SIZE}")
    return value


def _command(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list | tuple) or not value:
        raise ValidationError("command", "must be a non-empty list of strings (an argv) or absent")
    if len(value) > MAX_ARGS:
        raise ValidationError("command", f"has more than {MAX_ARGS} arguments")
    args = tuple(_check_text(f"command[{i}]", arg, MAX_START_BYTES) for i, arg in enumerate(value))
    if not args[0]:
        raise ValidationError("command[0]", "must not be empty")
    return args


def _env(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValidationError("env", "must be an object of strings")
    if len(value) > MAX_ENV:
        raise ValidationError("env", f"has more than {MAX_ENV} variables")
    env = {}
    for name, text in value.items():
        if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            raise ValidationError(f"env.{str(name)[:40]}", "is not a valid variable name")
        env[name] = _check_text(f"env.{name}", text, MAX_ENV_VALUE)
    return env


def _user(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not _USER.fullmatch(value):
        raise ValidationError("user", "must be a user name or uid, optionally with :group")
    return value


def _workdir(value: Any) -> str | None:
    if value is None or value == "":
        return None
    text = _check_text("workdir", value, MAX_PATH)
    if not text.startswith("/"):
        raise ValidationError("workdir", "must be an absolute path")
    return text


@attrs.frozen(kw_only=True)
class StartRequest:
    """What to run. ``command`` None = the container's login shell. Validated on construction."""

    tty: bool = attrs.field(validator=attrs.validators.instance_of(bool))
    command: tuple[str, ...] | None = attrs.field(default=None, converter=_command)
    rows: int = attrs.field(default=DEFAULT_ROWS)
    cols: int = attrs.field(default=DEFAULT_COLS)
    env: Mapping[str, str] = attrs.field(factory=dict, converter=_env)
    user: str | None = attrs.field(default=None, converter=_user)
    workdir: str | None = attrs.field(default=None, converter=_workdir)

    @rows.validator
    def _rows(self, attribute: Any, value: Any) -> None:
        _check_size("rows", value)

    @cols.validator
    def _cols(self, attribute: Any, value: Any) -> None:
        _check_size("cols", value)

    def encode(self) -> str:
        body: dict[str, Any] = {"tty": self.tty, "rows": self.rows, "cols": self.cols}
        if self.command is not None:
            body["command"] = list(self.command)
        if self.env:
            body["env"] = dict(self.env)
        if self.user is not None:
            body["user"] = self.user
        if self.workdir is not None:
            body["workdir"] = self.workdir
        return json.dumps(body, separators=(",", ":"))


def _json_object(message: str | bytes, what: str) -> dict[str, Any]:
    if not isinstance(message, str):
        raise RemoteProtocolError(f"{what} must be a text message")
    try:
        data = json.loads(message)
    except ValueError:
        raise RemoteProtocolError(f"{what} is not JSON") from None
    if not isinstance(data, dict):
        raise RemoteProtocolError(f"{what} must be a JSON object")
    return data


def parse_start(message: str | bytes) -> StartRequest:
    """The client's first message. ``RemoteProtocolError`` (not JSON) or ``ValidationError`` (a bad field)."""
    if len(message) > MAX_START_BYTES:
        raise RemoteProtocolError(f"the start message is longer than {MAX_START_BYTES} bytes")
    data = _json_object(message, "the start message")
    if "tty" not in data:
        raise ValidationError("tty", "is required (true or false)")
    if not isinstance(data["tty"], bool):
        raise ValidationError("tty", "must be true or false")
    return StartRequest(
        tty=data["tty"],
        command=data.get("command"),
        rows=data.get("rows", DEFAULT_ROWS),
        cols=data.get("cols", DEFAULT_COLS),
        env=data.get("env"),
        user=data.get("user"),
        workdir=data.get("workdir"),
    )


# -- client -> server after the start ------------------------------------------------------------------------


@attrs.frozen
class Stdin:
    data: bytes


@attrs.frozen
class Resize:
    rows: int
    cols: int


@attrs.frozen
class Eof:
    pass


def parse_client_message(message: str | bytes) -> Stdin | Resize | Eof | None:
    """A message after the start request; None for a control message this version does not know."""
    if not isinstance(message, str):
        return Stdin(bytes(message))
    data = _json_object(message, "a control message")
    if "resize" in data:
        size = data["resize"]
        if not isinstance(size, list) or len(size) != 2:
            raise RemoteProtocolError("resize must be [rows, cols]")
        try:
            return Resize(_check_size("rows", size[0]), _check_size("cols", size[1]))
        except ValidationError as exc:
            raise RemoteProtocolError(f"resize: {exc}") from None
    if data.get("eof") is True:
        return Eof()
    return None


def encode_resize(rows: int, cols: int) -> str:
    return json.dumps({"resize": [_check_size("rows", rows), _check_size("cols", cols)]})


def encode_eof() -> str:
    return '{"eof":true}'


# -- server -> client --------------------------------------------------------------------------------------


def encode_started() -> str:
    return '{"started":true}'


def encode_exit(code: int) -> str:
    return json.dumps({"exit": int(code)})


def encode_error(reason: str, code: RefusalCode | None = None) -> str:
    return terminal_error_text(reason, code)


def encode_output(stream: Stream | None, data: bytes) -> bytes:
    """One output message: raw for a TTY session (``stream`` None), else tagged with the stream."""
    if stream is None:
        return bytes(data)
    return bytes((int(stream),)) + bytes(data)


@attrs.frozen
class Started:
    pass


@attrs.frozen
class Output:
    stream: Stream  # STDOUT for every TTY output
    data: bytes


@attrs.frozen
class Exited:
    code: int


@attrs.frozen
class Refused:
    """The server refused the session before it started (``{"error"}`` before ``{"started"}``).
    ``code_name``: its ``code`` field when well formed (``session_opening.refused`` reads it, with the
    close)."""

    reason: str
    code_name: str | None = None


@attrs.frozen
class Failed:
    """The session broke after it started (``{"error"}`` after ``{"started"}``)."""

    reason: str
    code_name: str | None = None


@attrs.frozen
class Closed:
    """The WebSocket closed. ``clean``: after ``{"exit"}``; otherwise the session ended without an exit
    status (``code``/``reason`` of the close, None when the connection just dropped)."""

    code: int | None
    reason: str
    clean: bool


class _State(enum.Enum):
    IDLE = "idle"
    STARTING = "starting"
    RUNNING = "running"
    EXITED = "exited"
    DONE = "done"


class TerminalClient:
    """The client side of one session: ``start()``, then ``receive(message)`` for every message from the
    server and ``closed(code, reason)`` at the end; ``stdin``/``resize``/``eof`` give what to send.

    Events: ``Started``, ``Output``, ``Exited``, ``Refused`` (before the start), ``Failed`` (after),
    ``Closed``. Output before ``{"started"}`` or a bad tag is a ``RemoteProtocolError``.
    """

    def __init__(self, request: StartRequest) -> None:
        self.request = request
        self._state = _State.IDLE
        self.exit_code: int | None = None

    @property
    def running(self) -> bool:
        return self._state is _State.RUNNING

    def start(self) -> str:
        if self._state is not _State.IDLE:
            raise LocalProtocolError("start() called twice")
        self._state = _State.STARTING
        return self.request.encode()

    def stdin(self, data: bytes) -> bytes:
        self._require_started("stdin")
        return bytes(data)

    def resize(self, rows: int, cols: int) -> str:
        self._require_started("resize")
        return encode_resize(rows, cols)

    def eof(self) -> str:
        self._require_started("eof")
        return encode_eof()

    def _require_started(self, what: str) -> None:
        if self._state is _State.IDLE:
            raise LocalProtocolError(f"{what} before start()")

    def receive(self, message: str | bytes) -> list[Started | Output | Exited | Refused | Failed]:
        if self._state in (_State.IDLE, _State.DONE):
            raise LocalProtocolError(f"receive() while {self._state.value}")
        if not isinstance(message, str):
            if self._state is not _State.RUNNING:
                raise RemoteProtocolError(f"output while the session is {self._state.value}")
            return [self._output(bytes(message))]
        data = _json_object(message, "a server message")
        if "error" in data:
            reason, name = str(data["error"]), code_name_of(data.get("code"))
            return [Failed(reason, name) if self._state is _State.RUNNING else Refused(reason, name)]
        if data.get("started") is True:
            if self._state is not _State.STARTING:
                raise RemoteProtocolError("started twice")
            self._state = _State.RUNNING
            return [Started()]
        if "exit" in data:
            code = data["exit"]
            if type(code) is not int:
                raise RemoteProtocolError("exit must be an integer")
            if self._state is not _State.RUNNING:
                raise RemoteProtocolError(f"exit while the session is {self._state.value}")
            self._state = _State.EXITED
            self.exit_code = code
            return [Exited(code)]
        return []

    def _output(self, data: bytes) -> Output:
        if self.request.tty:
            return Output(Stream.STDOUT, data)
        if not data:
            raise RemoteProtocolError("empty output message (the stream tag is missing)")
        try:
            stream = Stream(data[0])
        except ValueError:
            raise RemoteProtocolError(f"unknown output stream tag {data[0]}") from None
        return Output(stream, data[1:])

    def closed(self, code: int | None, reason: str = "") -> Closed:
        clean = self._state is _State.EXITED
        self._state = _State.DONE
        return Closed(code, reason or "", clean)
