"""WebSocket opening handshakes done by hand on a raw trio stream (the front door's routes).

Used where a connection bypasses hypercorn (``front_door``): the host's spliced forward sessions and the
runner's tunnel routes. h11 parses and writes the HTTP, ``kohakuriver_proto.ws_frames.accept_token`` computes
the accept key (shared with the CLI's blocking log client); this module adds the upgrade's rules:

- server side: ``read_request`` (bounded head size and time, no body), ``check_upgrade`` (GET, ``Upgrade:
  websocket``, version 13, a 16-byte key), ``switching_protocols`` (the 101 with the accept key and no
  extension: the frames must pass through relays untouched), and ``HttpRefusal``/``answer_and_close`` for a
  JSON error before the upgrade, in the same shape as the apps' answers;
- client side: ``upgrade_request``/``read_upgrade_response`` (a fresh key, the accept key checked, an
  extension refused).
"""

from __future__ import annotations

import base64
import binascii
import http
import json
import os
import urllib.parse

import h11
import trio

from kohakuriver_proto.ws_frames import accept_token

__all__ = [
    "MAX_HEAD_BYTES",
    "Dropped",
    "HttpRefusal",
    "UpgradeRejected",
    "answer_and_close",
    "check_upgrade",
    "http_error",
    "query_value",
    "read_request",
    "read_upgrade_response",
    "route_parts",
    "switching_protocols",
    "upgrade_request",
]

#: Largest request (or response) head accepted; more is dropped with 431.
MAX_HEAD_BYTES = 16 * 1024
#: Time a client has to send its whole request head.
REQUEST_SECONDS = 10.0
#: After an error answer: how long to wait for the peer's FIN, so that closing does not turn into a reset
#: that destroys the answer before the peer read it.
LINGER_SECONDS = 1.0
READ_BYTES = 64 * 1024
#: Largest error body read from a server that refuses an upgrade (only its message is used).
MAX_REFUSAL_BODY = 16 * 1024


class Dropped(Exception):
    """The connection ended (or sent nothing usable in time) before there was anything to answer."""


def http_error(status: int, error: str, message: str, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A complete JSON error response (``{"error", "message", "field"}`` as the apps answer), then close."""
    body = {"error": error, "message": message, "field": None}
    data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    head = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}"]
    head += [f"{name}: {value}" for name, value in headers]
    head += ["content-type: application/json", f"content-length: {len(data)}", "connection: close"]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + data


class HttpRefusal(Exception):
    """Answer the request with this JSON error and close (raised before any WebSocket exists)."""

    def __init__(self, status: int, error: str, message: str, headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(message)
        self.status = status
        self.response = http_error(status, error, message, headers)


async def read_request(stream: trio.abc.ReceiveStream) -> tuple[h11.Request, h11.Connection]:
    """The request head (at most ``MAX_HEAD_BYTES``, within ``REQUEST_SECONDS``) and the h11 connection,
    whose ``trailing_data`` holds what the client sent after it. ``HttpRefusal`` for bad HTTP or a body,
    ``Dropped`` when the client goes away or is too slow."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    request = None
    received = 0
    with trio.move_on_after(REQUEST_SECONDS):
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    # Never read past the head's limit: a head that does not end within it then stays
                    # incomplete, which h11 refuses (431); frames sent behind a short head stay queued.
                    data = await stream.receive_some(max(1, MAX_HEAD_BYTES + 1 - received))
                    received += len(data)
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.EndOfMessage) and request is not None:
                    return request, conn
                elif isinstance(event, h11.ConnectionClosed):
                    raise Dropped
                else:  # a body on a GET: not an upgrade
                    raise HttpRefusal(400, "invalid", "a WebSocket upgrade has no body")
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            raise HttpRefusal(status, "too_large" if status == 431 else "invalid", str(exc)) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise Dropped from None
    raise Dropped(f"no complete request head within {REQUEST_SECONDS:g} s")


def headers_of(event: h11.Request | h11.InformationalResponse | h11.Response) -> dict[bytes, bytes]:
    """Header names lower-cased (h11 already does) to their last value, stripped."""
    return {name.lower(): value.strip() for name, value in event.headers}


def check_upgrade(request: h11.Request) -> str:
    """The ``Sec-WebSocket-Key`` of a valid upgrade request; ``HttpRefusal`` otherwise."""
    headers = headers_of(request)
    connection = {t.strip().lower() for t in headers.get(b"connection", b"").split(b",")}
    if request.method != b"GET":
        raise HttpRefusal(405, "method_not_allowed", "this route is a WebSocket upgrade (GET)")
    if headers.get(b"upgrade", b"").lower() != b"websocket" or b"upgrade" not in connection:
        raise HttpRefusal(400, "invalid", "this route is a WebSocket upgrade: send 'Upgrade: websocket'")
    if headers.get(b"sec-websocket-version", b"") != b"13":
        version = (("Sec-WebSocket-Version", "13"),)
        raise HttpRefusal(426, "invalid", "WebSocket version 13 is required", version)
    key = headers.get(b"sec-websocket-key", b"")
    try:
        valid_key = len(base64.b64decode(key, validate=True)) == 16
    except binascii.Error:
        valid_key = False
    if not valid_key:
        raise HttpRefusal(400, "invalid", "Sec-WebSocket-Key must be 16 bytes in base64")
    return key.decode("ascii")


def route_parts(request: h11.Request, prefix: str, count: int) -> tuple[list[str], str]:
    """The ``count`` percent-decoded path segments after ``prefix``, and the query string; 404 otherwise."""
    path, _, query = request.target.decode("ascii", "replace").partition("?")
    parts = path.removeprefix(prefix).split("/")
    if not path.startswith(prefix) or len(parts) != count or not all(parts):
        raise HttpRefusal(404, "not_found", "no such route")
    return [urllib.parse.unquote(p) for p in parts], query


def query_value(query: str, name: str) -> str | None:
    return urllib.parse.parse_qs(query, keep_blank_values=True).get(name, [None])[0]


def switching_protocols(conn: h11.Connection, key: str) -> bytes:
    """The 101 answer to an upgrade with ``key`` (no subprotocol, no extension)."""
    accept = accept_token(key.encode("ascii")).decode("ascii")
    return conn.send(
        h11.InformationalResponse(
            status_code=101,
            reason=b"Switching Protocols",
            headers=[("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Accept", accept)],
        )
    )


async def answer_and_close(stream: trio.abc.HalfCloseableStream, response: bytes) -> None:
    """Send an HTTP answer, half-close, and give the peer a moment to read it (bounded)."""
    with trio.move_on_after(LINGER_SECONDS):
        try:
            await stream.send_all(response)
            await stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


# -- the client side ---------------------------------------------------------------------------------------


class UpgradeRejected(Exception):
    """The server did not switch protocols: ``status`` (0 when it answered no valid HTTP) and ``body``;
    ``answered`` is False when the connection closed without a byte of answer."""

    def __init__(self, status: int, body: bytes, message: str, *, answered: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.body = body
        self.answered = answered


def upgrade_request(
    resource: str, netloc: str, headers: list[tuple[str, str]]
) -> tuple[h11.Connection, bytes, bytes]:
    """(h11 connection, the key, the request bytes) of an upgrade to ``resource`` on ``netloc``."""
    key = base64.b64encode(os.urandom(16))
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
    request = h11.Request(
        method="GET",
        target=resource,
        headers=[
            ("Host", netloc),
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", key),
            ("Sec-WebSocket-Version", "13"),
            *headers,
        ],
    )
    return conn, key, conn.send(request) + conn.send(h11.EndOfMessage())


async def read_upgrade_response(stream: trio.abc.ReceiveStream, conn: h11.Connection, key: bytes) -> bytes:
    """Read the answer to ``upgrade_request``: the bytes that followed a valid 101 (the first frames).
    ``UpgradeRejected`` for any other answer (its status and up to ``MAX_REFUSAL_BODY`` of its body), for
    a wrong accept key or an extension nobody offered; ``trio.BrokenResourceError`` passes through."""
    status = 0
    body = bytearray()
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(READ_BYTES))
            elif isinstance(event, h11.InformationalResponse) and event.status_code == 101:
                headers = headers_of(event)
                if headers.get(b"sec-websocket-accept") != accept_token(key):
                    raise UpgradeRejected(101, b"", "the upgrade was answered with a wrong accept key")
                if headers.get(b"sec-websocket-extensions"):
                    message = "the server accepted a WebSocket extension nobody offered"
                    raise UpgradeRejected(101, b"", message)
                return conn.trailing_data[0]
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data) and len(body) < MAX_REFUSAL_BODY:
                body += event.data
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                data = bytes(body[:MAX_REFUSAL_BODY])
                if status:
                    raise UpgradeRejected(status, data, f"the upgrade was refused with HTTP {status}")
                raise UpgradeRejected(0, b"", "the connection closed without an answer", answered=False)
    except h11.RemoteProtocolError as exc:
        raise UpgradeRejected(0, b"", f"bad HTTP in the answer to the upgrade: {exc}") from None
