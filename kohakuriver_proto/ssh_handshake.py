"""The SSH-proxy handshake (host port 8002), both sides, sans-IO in the h11 manner.

Wire format, one line each way, then the connection is a raw byte pipe::

    client -> host   REQUEST_TUNNEL <task_id>\\n            (or REQUEST_TUNNEL <task_id> <token>\\n)
    host -> client   SUCCESS\\n                             (then: raw bytes both ways)
                     ERROR <message>\\n                     (then: close)

Lines are at most ``MAX_LINE`` (512) bytes including the ``\\n``; a ``\\r`` before the ``\\n`` is tolerated.
``task_id`` is ASCII decimal digits (a snowflake id); ``token`` is printable ASCII without spaces.

Usage (host)::

    hs = ServerHandshake()
    while (event := hs.next_event()) is NEED_DATA:
        hs.receive_data(await stream.receive_some())   # b"" = EOF
    # event is a TunnelRequest; check it, connect to the runner, then
    await stream.send_all(hs.send_success())            # or hs.send_error("task 12 not found")
    early, _closed = hs.trailing_data                   # bytes the client sent after its line: forward them

``ClientHandshake`` is the mirror image (``send_request()``, then ``TunnelAccepted`` / ``TunnelRejected``).
Any malformed input raises ``RemoteProtocolError`` (the machine stays in the error state: the same error is
raised again); misuse raises ``LocalProtocolError``. Events come out identical however the bytes are split.
"""

from __future__ import annotations

import enum

from .errors import LocalProtocolError, RemoteProtocolError

MAX_LINE = 512
COMMAND = b"REQUEST_TUNNEL"
SUCCESS_LINE = b"SUCCESS\n"
_MAX_TASK_ID = (1 << 63) - 1


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return self.value


#: ``next_event()`` result: feed more bytes with ``receive_data``.
NEED_DATA = _Sentinel.NEED_DATA


# -- events ------------------------------------------------------------------------------------------------
#
# Plain classes rather than attrs: every ``kr ssh`` and every ProxyCommand start imports this module, and
# attrs costs ~25 ms of imports there, more than the handshake's round trip. They keep what attrs gave them:
# equality and hash by value, a repr without the token, and no assignment after construction.


class _Event:
    __slots__: tuple[str, ...] = ()
    #: The fields the repr shows (the token is left out: it must not reach logs).
    _shown: tuple[str, ...] = ()

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self.__slots__)

    def __hash__(self) -> int:
        return hash((type(self), *(getattr(self, name) for name in self.__slots__)))

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._shown)
        return f"{type(self).__name__}({shown})"

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen")


class TunnelRequest(_Event):
    """The client asked for a tunnel to a VPS. ``token`` is None in the unauthenticated form."""

    __slots__ = ("task_id", "token")
    _shown = ("task_id",)  # keep API tokens out of logs
    task_id: int
    token: str | None

    def __init__(self, task_id: int, token: str | None = None) -> None:
        object.__setattr__(self, "task_id", task_id)
        object.__setattr__(self, "token", token)


class TunnelAccepted(_Event):
    """The host replied ``SUCCESS``: everything from now on is the SSH byte stream."""

    __slots__ = ()


class TunnelRejected(_Event):
    """The host replied ``ERROR <message>`` and will close the connection."""

    __slots__ = ("message",)
    _shown = ("message",)
    message: str

    def __init__(self, message: str) -> None:
        object.__setattr__(self, "message", message)


# -- the seed's validation table, as messages for the host ---------------------------------------------------


class RejectReason(enum.Enum):
    """Why the host refuses a tunnel. ``message(...)`` gives the one-line text for ``ERROR <message>``.

    The host checks in this order, which never tells a caller more than it may know: existence, then
    authorization (so an unauthorized caller learns nothing about the task's type or status), then the rest.
    """

    UNAUTHENTICATED = "authentication required: send an API token (kr ssh does this for you)"
    NOT_FOUND = "task {task_id} not found"
    NOT_ALLOWED = "not allowed to reach task {task_id}"
    NOT_VPS = "task {task_id} is a {task_type} task, not a VPS: only VPS tasks have SSH"
    NOT_RUNNING = "VPS {task_id} is not running (status: {status})"
    NODE_OFFLINE = "node {node} of VPS {task_id} is offline"
    NO_SSH_PORT = "VPS {task_id} has no SSH port (was it created without SSH?)"
    CONNECT_FAILED = "cannot reach the SSH port of VPS {task_id} on node {node}: {detail}"
    INTERNAL = "internal error in the SSH proxy"

    def message(self, **fields: object) -> str:
        return self.value.format(**fields)


def check_tunnel_target(
    *,
    task_id: int,
    exists: bool,
    allowed: bool,
    task_type: str | None = None,
    status: str | None = None,
    node: str | None = None,
    node_online: bool = False,
    ssh_port: int | None = None,
) -> str | None:
    """The ``ERROR`` message for a tunnel request, or None when the host may connect.

    Plain values in, so the host can call it with whatever its store returns: ``task_type``/``status`` as
    the enum values (``"vps"``, ``"running"``), ``node`` = the assigned node's hostname.
    """
    if not exists:
        return RejectReason.NOT_FOUND.message(task_id=task_id)
    if not allowed:
        return RejectReason.NOT_ALLOWED.message(task_id=task_id)
    if task_type != "vps":
        return RejectReason.NOT_VPS.message(task_id=task_id, task_type=task_type)
    if status not in ("running", "paused"):
        return RejectReason.NOT_RUNNING.message(task_id=task_id, status=status)
    if node is None or not node_online:
        return RejectReason.NODE_OFFLINE.message(task_id=task_id, node=node or "(none)")
    if not ssh_port:
        return RejectReason.NO_SSH_PORT.message(task_id=task_id)
    return None


# -- line building and parsing -------------------------------------------------------------------------------


def _check_task_id(task_id: int | str) -> int:
    if isinstance(task_id, bool):
        raise LocalProtocolError("task_id must be an int or a decimal string")
    if isinstance(task_id, str):
        if not (task_id.isascii() and task_id.isdigit()):
            raise LocalProtocolError(f"task_id must be decimal digits, got {task_id[:40]!r}")
        task_id = int(task_id)
    if not isinstance(task_id, int) or not 0 <= task_id <= _MAX_TASK_ID:
        raise LocalProtocolError(f"task_id out of range: {task_id!r}")
    return task_id


def _is_token(text: bytes) -> bool:
    return bool(text) and all(0x21 <= b <= 0x7E for b in text)


def build_request(task_id: int | str, token: str | None = None) -> bytes:
    """``REQUEST_TUNNEL <task_id>[ <token>]\\n``; ``LocalProtocolError`` for an id or token it cannot send."""
    line = COMMAND + b" " + str(_check_task_id(task_id)).encode()
    if token is not None:
        if not isinstance(token, str) or not token.isascii() or not _is_token(token.encode("ascii")):
            raise LocalProtocolError("token must be printable ASCII without spaces")
        line += b" " + token.encode("ascii")
    line += b"\n"
    if len(line) > MAX_LINE:
        raise LocalProtocolError(f"request line would be {len(line)} bytes, the limit is {MAX_LINE}")
    return line


def parse_request_line(line: bytes) -> TunnelRequest:
    """Parse one request line (with or without ``\\n``/``\\r\\n``); ``RemoteProtocolError`` if malformed."""
    line = _strip_eol(line)
    parts = line.split(b" ")
    if parts[0] != COMMAND:
        raise RemoteProtocolError(f"expected 'REQUEST_TUNNEL <task_id>', got {_show(line)}")
    if len(parts) not in (2, 3):
        raise RemoteProtocolError(
            f"expected 'REQUEST_TUNNEL <task_id>' or 'REQUEST_TUNNEL <task_id> <token>' "
            f"separated by single spaces, got {len(parts) - 1} arguments"
        )
    raw_id = parts[1]
    if not raw_id or not raw_id.isdigit():  # bytes.isdigit() is ASCII-only
        raise RemoteProtocolError(f"task id must be decimal digits, got {_show(raw_id)}")
    task_id = int(raw_id)
    if task_id > _MAX_TASK_ID:
        raise RemoteProtocolError(f"task id out of range: {_show(raw_id)}")
    token: str | None = None
    if len(parts) == 3:
        if not _is_token(parts[2]):
            raise RemoteProtocolError("token must be printable ASCII without spaces")
        token = parts[2].decode("ascii")
    return TunnelRequest(task_id, token)


def build_success() -> bytes:
    return SUCCESS_LINE


def build_error(message: str) -> bytes:
    """``ERROR <message>\\n`` with the message forced onto one line and cut to fit ``MAX_LINE``.

    Line breaks and other control characters become spaces; an empty message becomes ``unknown error``.
    """
    text = "".join(
        " " if (ord(c) < 0x20 or ord(c) == 0x7F or c in "\u2028\u2029\x85") else c for c in message
    )
    text = " ".join(text.split()) or "unknown error"
    raw = text.encode("utf-8")
    budget = MAX_LINE - len(b"ERROR \n")
    if len(raw) > budget:
        raw = raw[:budget].decode("utf-8", errors="ignore").encode("utf-8")  # never split a character
    return b"ERROR " + raw + b"\n"


def parse_reply_line(line: bytes) -> TunnelAccepted | TunnelRejected:
    """Parse the host's reply line; ``RemoteProtocolError`` for anything but ``SUCCESS`` / ``ERROR ...``."""
    line = _strip_eol(line)
    if line == b"SUCCESS":
        return TunnelAccepted()
    if line == b"ERROR" or line.startswith(b"ERROR "):
        return TunnelRejected(line[6:].decode("utf-8", errors="replace").strip())
    raise RemoteProtocolError(
        f"expected 'SUCCESS' or 'ERROR <message>' from the SSH proxy, got {_show(line)}"
    )


def _strip_eol(line: bytes) -> bytes:
    if line.endswith(b"\n"):
        line = line[:-1]
    if line.endswith(b"\r"):
        line = line[:-1]
    return line


def _show(raw: bytes) -> str:
    text = repr(bytes(raw[:60]))
    return text + "..." if len(raw) > 60 else text


# -- the connection machines ---------------------------------------------------------------------------------


class _LineReader:
    """Buffers bytes until one ``\\n``-terminated line (at most ``MAX_LINE`` bytes) has arrived."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._buf = bytearray()
        self._eof = False

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof:
            if data:
                raise LocalProtocolError("receive_data() after EOF")
            return
        if data:
            self._buf += data
        else:
            self._eof = True

    def take_line(self) -> bytes | None:
        """The line (with its ``\\n``) or None if more data is needed; ``RemoteProtocolError`` if bad."""
        end = self._buf.find(b"\n", 0, MAX_LINE)
        if end >= 0:
            line = bytes(self._buf[: end + 1])
            del self._buf[: end + 1]
            return line
        if len(self._buf) >= MAX_LINE:
            raise RemoteProtocolError(f"{self._what} line longer than {MAX_LINE} bytes")
        if self._eof:
            if self._buf:
                raise RemoteProtocolError(f"connection closed in the middle of the {self._what} line")
            raise RemoteProtocolError(f"connection closed before the {self._what} line")
        return None

    @property
    def trailing(self) -> tuple[bytes, bool]:
        return bytes(self._buf), self._eof


class _State(enum.Enum):
    WAITING = "waiting"  # for the peer's line
    GOT_LINE = "got_line"  # the event was returned; server: our reply is due
    DONE = "done"  # server: reply sent; client: reply received
    ERROR = "error"


class ServerHandshake:
    """Host side: parses the request line, then builds the reply."""

    def __init__(self) -> None:
        self._reader = _LineReader("REQUEST_TUNNEL")
        self._state = _State.WAITING
        self._error: RemoteProtocolError | None = None
        self._request: TunnelRequest | None = None
        self.accepted: bool | None = None  # after the reply: True for SUCCESS, False for ERROR

    @property
    def request(self) -> TunnelRequest | None:
        return self._request

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the client; ``b""`` means the client closed its side."""
        self._reader.feed(data)

    def next_event(self) -> TunnelRequest | _Sentinel:
        if self._state is _State.ERROR:
            assert self._error is not None
            raise self._error
        if self._state is _State.GOT_LINE:
            raise LocalProtocolError("the request was already returned; reply with send_success/send_error")
        if self._state is _State.DONE:
            raise LocalProtocolError("the handshake is over: the reply was sent")
        try:
            line = self._reader.take_line()
            if line is None:
                return NEED_DATA
            request = parse_request_line(line)
        except RemoteProtocolError as exc:
            self._state = _State.ERROR
            self._error = exc
            raise
        self._request = request
        self._state = _State.GOT_LINE
        return request

    def send_success(self) -> bytes:
        if self._state is not _State.GOT_LINE or self.accepted is not None:
            raise LocalProtocolError("SUCCESS can only answer a well-formed request, exactly once")
        self._state = _State.DONE
        self.accepted = True
        return build_success()

    def send_error(self, message: str) -> bytes:
        """The ``ERROR`` reply: once, instead of SUCCESS; also before or after a malformed request line
        (timeouts, bad requests), so the client always learns why it is closed."""
        if self.accepted is not None:
            raise LocalProtocolError("the reply was already sent")
        if self._state is not _State.ERROR:
            self._state = _State.DONE
        self.accepted = False
        return build_error(message)

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        """``(bytes after the request line, whether the client sent EOF)``: the start of the SSH stream.

        Read it once the request event is out, and from then on hand new bytes straight to the stream
        (feeding them here too only grows this buffer)."""
        return self._reader.trailing


class ClientHandshake:
    """CLI side: builds the request line, then parses the host's reply."""

    def __init__(self, task_id: int | str, token: str | None = None) -> None:
        self._request_bytes = build_request(task_id, token)  # validate early: bad ids never reach the wire
        self.task_id = _check_task_id(task_id)
        self._sent = False
        self._reader = _LineReader("SSH proxy reply")
        self._state = _State.WAITING
        self._error: RemoteProtocolError | None = None

    def send_request(self) -> bytes:
        if self._sent:
            raise LocalProtocolError("the request was already sent")
        self._sent = True
        return self._request_bytes

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the host; ``b""`` means the host closed its side."""
        self._reader.feed(data)

    def next_event(self) -> TunnelAccepted | TunnelRejected | _Sentinel:
        if self._state is _State.ERROR:
            assert self._error is not None
            raise self._error
        if not self._sent:
            raise LocalProtocolError("send_request() first")
        if self._state is _State.DONE:
            raise LocalProtocolError("the reply was already returned")
        try:
            line = self._reader.take_line()
            if line is None:
                return NEED_DATA
            event = parse_reply_line(line)
        except RemoteProtocolError as exc:
            self._state = _State.ERROR
            self._error = exc
            raise
        self._state = _State.DONE
        return event

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        """``(bytes after the reply line, whether the host sent EOF)``: after SUCCESS, the SSH stream."""
        return self._reader.trailing
