"""How a forward or terminal session opens: accepted, or refused with a machine-readable code.

Both session WebSockets (forward: ``/ws/forward/...``, terminal: ``/ws/terminal/...``, on the host and on the
runner alike) start with exactly one text message from the server:

- forward: ``CONNECTED``, or ``Error: <reason>``;
- terminal: ``{"started": true}``, or ``{"error": "<reason>", "code": "<code>"}``;

and a refusal is followed at once by a close frame whose code says what the client should do (RFC 6455
section 7.4.1): **1008** (policy) = this request will not be served, do not retry; **1011** = the server
cannot serve it now, a later attempt may work. The close frame's *reason* is the refusal's code, one of
``RefusalCode`` (``not_found``, ``not_allowed``, ...). This module builds what a server sends
(``forward_refusal``, ``terminal_refusal``) and reads what a client receives (``forward_answer``,
``terminal_answer``, then ``Refusing.closed`` with the close frame) into ``Connected`` or ``Refused``. It
never touches a socket.

Decisions:

- The code travels in the close reason, because that is the one place a seed-protocol client already
  ignores: it reads ``Error: <reason>`` for the people and the close *code* for its decision, both
  unchanged. The reason is exactly the code's name (``[a-z][a-z0-9_]*``, far below the 123-byte limit of a
  control frame), so it is never confused with prose. The terminal's JSON carries the same code in a
  ``code`` field too (a text message can gain a key: the other side ignores keys it does not know); where
  both are there, the message's code is read first. A terminal session that breaks after its start ends
  the same way (``{"error", "code"}`` and the close).
- Reading is lenient and never guesses from words. A close reason that is not a code name (a peer from
  before the codes, which put its prose there) gives no code; a well-formed name this version does not know
  (a newer peer) is kept in ``Refused.code_name`` but gives no code either. Without a code the close code
  alone decides: 1008 reads as "no such running task" (exit 3, the commonest refusal), anything else as
  "try again later" (exit 1). Malformed first messages raise ``RemoteProtocolError`` with what was wrong.
- When the code and the close code disagree (a broken peer), the code wins: it is the precise statement,
  and the close code exists for clients that cannot read it.
- ``not_found`` covers both an unknown task and another user's task (same code, same words), so a user
  cannot probe which ids exist.
- Each code names the exit code a command-line client ends with (the README's contract for ``kr forward``,
  ``kr connect`` and ``kr terminal exec``: 1 error, 2 bad arguments, 3 not found or not running, 4 not
  allowed): one table for every client, so a code means the same in all of them.
- A relay (the host between the client and the runner) passes the runner's refusal on as it came: the same
  text message, close code and close reason (``Refused.relayed``). A runner that did not close with 1008 or
  1011 is a broken one: its text goes on closed as the code it carried, if any (the terminal's message
  has one), else as ``runner_unavailable``.
"""

from __future__ import annotations

import enum
import json
import re
from typing import Any

import attrs

from .errors import RemoteProtocolError

__all__ = [
    "CLOSE_POLICY",
    "CLOSE_UNAVAILABLE",
    "CONNECTED",
    "ERROR_PREFIX",
    "Connected",
    "Refusal",
    "RefusalCode",
    "Refused",
    "Refusing",
    "clip_reason",
    "code_name_of",
    "forward_answer",
    "forward_refusal",
    "refused",
    "terminal_answer",
    "terminal_error_text",
    "terminal_refusal",
]

CONNECTED = "CONNECTED"
ERROR_PREFIX = "Error:"
#: Close codes of a refusal: will not be served (policy), cannot be served now.
CLOSE_POLICY = 1008
CLOSE_UNAVAILABLE = 1011
#: A close frame's reason: at most 123 bytes of UTF-8 (a control frame's payload is at most 125).
MAX_CLOSE_REASON = 123
#: What a code name looks like on the wire; anything else in a close reason is prose.
_CODE_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")

# The README's exit-code contract of the session commands.
EXIT_ERROR, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_NOT_ALLOWED = 1, 2, 3, 4


class RefusalCode(enum.Enum):
    """Why a session was refused. The value is the name on the wire."""

    #: A bad port or proto, a malformed terminal start request (or none in time), a bad message.
    BAD_REQUEST = "bad_request"
    #: No such task, or another user's (the same code, so ids cannot be probed).
    NOT_FOUND = "not_found"
    #: The task exists but is not running (completed, paused, starting, ended since).
    NOT_RUNNING = "not_running"
    #: The user may see the task but not reach it (a viewer).
    NOT_ALLOWED = "not_allowed"
    #: The user holds as many sessions as the host allows.
    TOO_MANY = "too_many"
    #: The task's node is offline, or the task has no node.
    NODE_OFFLINE = "node_offline"
    #: The runner could not be reached, refused the upgrade, stayed silent or answered nonsense.
    RUNNER_UNAVAILABLE = "runner_unavailable"
    #: The container's tunnel client is not connected (starting, restarting, or the task just ended).
    TUNNEL_UNAVAILABLE = "tunnel_unavailable"
    #: Port forwarding is switched off on the task's runner.
    FORWARD_DISABLED = "forward_disabled"
    #: The host could not look the task up in time.
    BUSY = "busy"
    #: Something failed on the server's side (Docker refused the exec, ...).
    INTERNAL = "internal"

    @property
    def close_code(self) -> int:
        return _MEANING[self][0]

    @property
    def exit_code(self) -> int:
        """The exit code of a command-line client refused with this code."""
        return _MEANING[self][1]

    @property
    def retry_later(self) -> bool:
        """True when a later attempt may be served (the close code is 1011)."""
        return self.close_code == CLOSE_UNAVAILABLE


#: Code -> (close code, CLI exit code).
_MEANING: dict[RefusalCode, tuple[int, int]] = {
    RefusalCode.BAD_REQUEST: (CLOSE_POLICY, EXIT_USAGE),
    RefusalCode.NOT_FOUND: (CLOSE_POLICY, EXIT_NOT_FOUND),
    RefusalCode.NOT_RUNNING: (CLOSE_POLICY, EXIT_NOT_FOUND),
    RefusalCode.NOT_ALLOWED: (CLOSE_POLICY, EXIT_NOT_ALLOWED),
    RefusalCode.TOO_MANY: (CLOSE_POLICY, EXIT_NOT_ALLOWED),
    RefusalCode.NODE_OFFLINE: (CLOSE_UNAVAILABLE, EXIT_ERROR),
    RefusalCode.RUNNER_UNAVAILABLE: (CLOSE_UNAVAILABLE, EXIT_ERROR),
    RefusalCode.TUNNEL_UNAVAILABLE: (CLOSE_UNAVAILABLE, EXIT_ERROR),
    RefusalCode.FORWARD_DISABLED: (CLOSE_UNAVAILABLE, EXIT_ERROR),
    RefusalCode.BUSY: (CLOSE_UNAVAILABLE, EXIT_ERROR),
    RefusalCode.INTERNAL: (CLOSE_UNAVAILABLE, EXIT_ERROR),
}
_BY_NAME = {code.value: code for code in RefusalCode}


def code_name_of(text: Any) -> str | None:
    """``text`` when it is a well-formed code name (known to this version or not), else None."""
    if isinstance(text, str) and _CODE_NAME.fullmatch(text):
        return text
    return None


def clip_reason(text: str) -> str:
    """``text`` cut to what fits in a close frame, on a character boundary."""
    data = text.encode("utf-8", "replace")
    if len(data) <= MAX_CLOSE_REASON:
        return text
    return data[:MAX_CLOSE_REASON].decode("utf-8", "ignore")


# -- what a server sends -------------------------------------------------------------------------------------


@attrs.frozen
class Refusal:
    """A refusal as a server sends it: ``text`` as the one text message, then a close frame with
    ``close_code`` and ``close_reason``. ``reason`` is for logs."""

    text: str
    close_code: int
    close_reason: str
    reason: str


def _check(code: RefusalCode, reason: str) -> None:
    if not isinstance(code, RefusalCode):
        raise TypeError(f"code must be a RefusalCode, not {type(code).__name__}")
    if not isinstance(reason, str):
        raise TypeError(f"reason must be a string, not {type(reason).__name__}")


def forward_refusal(code: RefusalCode, reason: str) -> Refusal:
    """``Error: <reason>`` and the close that carries ``code``."""
    _check(code, reason)
    return Refusal(f"{ERROR_PREFIX} {reason}", code.close_code, code.value, reason)


def terminal_error_text(reason: str, code: RefusalCode | None = None) -> str:
    """The terminal's ``{"error": reason, "code": code}`` (no ``code`` key when None)."""
    body: dict[str, str] = {"error": reason}
    if code is not None:
        body["code"] = code.value
    return json.dumps(body)


def terminal_refusal(code: RefusalCode, reason: str) -> Refusal:
    """``{"error": reason, "code": code}`` and the close that carries ``code``."""
    _check(code, reason)
    return Refusal(terminal_error_text(reason, code), code.close_code, code.value, reason)


# -- what a client receives ----------------------------------------------------------------------------------


@attrs.frozen
class Connected:
    """The session is open (``CONNECTED``; ``{"started": true}``)."""


@attrs.frozen
class Refused:
    """A refused session as the client understood it.

    ``code``: the refusal's code, or None when the server sent none this version knows (``code_name`` then
    holds a well-formed name from a newer peer, if any). ``close_code``: None when no close frame came.
    ``text``: the refusal's text message as received (None when the server only closed)."""

    reason: str
    close_code: int | None
    code: RefusalCode | None = None
    code_name: str | None = None
    close_reason: str = ""
    text: str | None = None

    @property
    def retry_later(self) -> bool:
        """Whether a later attempt may work: the code's meaning, else anything but a 1008 close."""
        if self.code is not None:
            return self.code.retry_later
        return self.close_code != CLOSE_POLICY

    @property
    def exit_code(self) -> int:
        """The exit code of a command-line client: the code's, else 3 for a 1008 close and 1 otherwise."""
        if self.code is not None:
            return self.code.exit_code
        return EXIT_NOT_FOUND if self.close_code == CLOSE_POLICY else EXIT_ERROR

    def relayed(self) -> Refusal:
        """What a relay sends its own client: this refusal as it came (text, close code, close reason).
        When the server did not close with 1008 or 1011, the same text is closed as its code says, else as
        ``runner_unavailable`` (a broken server)."""
        text = self.text if self.text is not None else f"{ERROR_PREFIX} {self.reason}"
        if self.close_code in (CLOSE_POLICY, CLOSE_UNAVAILABLE):
            return Refusal(text, self.close_code, clip_reason(self.close_reason), self.reason)
        code = self.code if self.code is not None else RefusalCode.RUNNER_UNAVAILABLE
        return Refusal(text, code.close_code, code.value, self.reason)


def refused(
    reason: str,
    close_code: int | None,
    close_reason: str | None = "",
    *,
    code_name: str | None = None,
    text: str | None = None,
) -> Refused:
    """A ``Refused`` from what arrived. ``code_name``: a code carried in the message itself (the
    terminal's ``code`` field), which wins over the close reason. A close reason that is not a code name is
    prose from an older server: it stands in for ``reason`` when that is empty."""
    close_reason = close_reason if isinstance(close_reason, str) else ""
    name = code_name_of(code_name) or code_name_of(close_reason)
    if not reason and name is None:
        reason = close_reason
    return Refused(
        reason=reason,
        close_code=close_code,
        code=_BY_NAME.get(name) if name is not None else None,
        code_name=name,
        close_reason=close_reason,
        text=text,
    )


@attrs.frozen
class Refusing:
    """The first message was a refusal; the close that follows carries its code (``closed``)."""

    reason: str
    text: str
    code_name: str | None = None

    def closed(self, close_code: int | None, close_reason: str | None = "") -> Refused:
        """The refusal complete with its close (``close_code`` None: none came in time)."""
        return refused(self.reason, close_code, close_reason, code_name=self.code_name, text=self.text)


def forward_answer(message: str | bytes) -> Connected | Refusing:
    """The forward server's first message. ``RemoteProtocolError`` for anything but ``CONNECTED`` or
    ``Error: <reason>``."""
    if not isinstance(message, str):
        raise RemoteProtocolError("the first message of a forward session must be text, not binary")
    if message == CONNECTED:
        return Connected()
    if message.startswith(ERROR_PREFIX):
        return Refusing(message[len(ERROR_PREFIX) :].strip(), message)
    raise RemoteProtocolError(f"unexpected first message of a forward session: {message[:60]!r}")


def terminal_answer(message: str | bytes) -> Connected | Refusing:
    """The terminal server's first message. ``RemoteProtocolError`` for anything but ``{"started": true}``
    or ``{"error": ...}``."""
    if not isinstance(message, str):
        raise RemoteProtocolError("the first message of a terminal session must be text, not binary")
    try:
        data = json.loads(message)
    except ValueError:
        raise RemoteProtocolError("the first message of a terminal session is not JSON") from None
    if not isinstance(data, dict):
        raise RemoteProtocolError("the first message of a terminal session must be a JSON object")
    if "error" in data:
        return Refusing(str(data["error"]), message, code_name_of(data.get("code")))
    if data.get("started") is True:
        return Connected()
    raise RemoteProtocolError(f"unexpected first message of a terminal session: {message[:60]!r}")
