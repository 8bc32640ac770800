"""A blocking client for the host's log-follow WebSocket (``/ws/tasks/{id}/logs``): read-only, no trio.

Why not trio-websocket (or ``kohakuriver_net.ws_client``, also on trio): ``kr task submit --wait`` and
``kr task logs -f`` only read one or two streams and write what comes to stdout/stderr. Importing trio and
trio-websocket took 100-150 ms of such a command, and tearing them down at exit about as much again, on a
command whose goal is to take no longer than ``docker run``. This needs little: a socket (TLS for wss), the
upgrade request written with ``http_transport.request_bytes`` and its answer read with
``http_transport.read_head``, then frames parsed by ``kohakuriver_proto.ws_frames.FrameReader``. The only
frames a client sends here are the close answer and pongs, masked as RFC 6455 wants.

``open_log_socket`` raises ``Rejected`` (the host answered the upgrade with an HTTP error: status and body),
``HandshakeFailed`` (no WebSocket: not reachable, or not answered as one) or ``TimeoutError``;
``LogSocket.receive`` returns the next message (bytes; str from a host that sends text) or how the socket
ended (``Ended``: the close frame's code and reason, or 1006 when the connection dropped without one).
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import socket
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from kohakuriver_proto.ws_frames import (
    CLOSE_NO_STATUS,
    OP_CLOSE,
    OP_PONG,
    Close,
    FrameReader,
    Ping,
    WebSocketProtocolError,
    accept_token,
    close_payload,
    frame_parts,
)

from .http_transport import USER_AGENT, TransportFailed, read_head, request_bytes, tls_context

__all__ = ["CLOSE_DROPPED", "Ended", "HandshakeFailed", "LogSocket", "Rejected", "open_log_socket"]

#: What a close "code" of 1006 means (RFC 6455 section 7.1.5): the connection ended without a close frame.
CLOSE_DROPPED = 1006
MAX_HEAD = 64 * 1024
MAX_REFUSAL_BODY = 64 * 1024
_RECV = 256 * 1024


class Rejected(Exception):
    """The host answered the upgrade with HTTP ``status`` (``body``: its body, possibly cut)."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"the upgrade was refused with HTTP {status}")
        self.status = status
        self.body = body


class HandshakeFailed(Exception):
    """No WebSocket: the host could not be reached, or did not answer the upgrade as one."""


class Ended(NamedTuple):
    """How a log socket ended: the close frame's ``code`` and ``reason`` (1006 and None: no close frame)."""

    code: int
    reason: str | None = None


def _connect(hostname: str, port: int, secure: bool, timeout: float) -> Any:
    # The name as bytes when it is ASCII: socket then need not load the idna codec.
    address = hostname.encode("ascii") if hostname.isascii() else hostname
    try:
        sock = socket.create_connection((address, port), timeout=timeout)
    except TimeoutError:
        raise
    except OSError as exc:
        raise HandshakeFailed(exc.strerror or str(exc) or type(exc).__name__) from None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if secure:
            sock = tls_context().wrap_socket(sock, server_hostname=hostname)
    except TimeoutError:
        sock.close()
        raise
    except OSError as exc:
        sock.close()
        raise HandshakeFailed(str(exc) or type(exc).__name__) from None
    return sock


def _read_until_head(sock: Any) -> tuple[bytes, bytes]:
    """(the answer's status line and headers, what came after them)."""
    data = b""
    while b"\r\n\r\n" not in data:
        if len(data) > MAX_HEAD:
            raise HandshakeFailed(f"the host's answer to the upgrade has a head over {MAX_HEAD} bytes")
        chunk = sock.recv(4096)
        if not chunk:
            raise HandshakeFailed("the host closed the connection during the upgrade")
        data += chunk
    end = data.index(b"\r\n\r\n") + 4
    return data[:end], data[end:]


def _refusal_body(sock: Any, headers: dict[str, str], rest: bytes) -> bytes:
    """Up to ``MAX_REFUSAL_BODY`` of an error answer's body (by Content-Length, else to the end)."""
    length = headers.get("content-length", "")
    want = int(length) if length.isascii() and length.isdigit() else MAX_REFUSAL_BODY
    want = min(want, MAX_REFUSAL_BODY)
    body = rest
    try:
        while len(body) < want:
            chunk = sock.recv(want - len(body))
            if not chunk:
                break
            body += chunk
    except OSError:
        pass  # the status says enough
    return body[:want]


def open_log_socket(url: str, headers: dict[str, str], *, timeout: float, max_message: int) -> LogSocket:
    """Connect to ``url`` (ws:// or wss://), upgrade with ``headers`` added, and return the open socket.

    ``timeout`` bounds the connection and the upgrade (``TimeoutError``); reads after it never time out (a
    task may print nothing for hours)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("ws", "wss") or not parts.hostname:
        raise HandshakeFailed(f"not a WebSocket URL: {url}")
    secure = scheme == "wss"
    port = parts.port or (443 if secure else 80)
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    netloc = parts.netloc.rpartition("@")[2]
    sock = _connect(parts.hostname, port, secure, timeout)
    try:
        key = base64.b64encode(os.urandom(16))
        upgrade = {
            "User-Agent": USER_AGENT,
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": key.decode("ascii"),
            "Sec-WebSocket-Version": "13",
            **headers,
        }
        try:
            sock.sendall(request_bytes("GET", netloc, resource, upgrade, None))
            head, rest = _read_until_head(sock)
            status, _reason, _http10, answer = read_head(io.BytesIO(head))
        except TransportFailed as exc:
            raise HandshakeFailed(str(exc)) from None
        except TimeoutError:
            raise
        except OSError as exc:
            raise HandshakeFailed(exc.strerror or str(exc) or type(exc).__name__) from None
        if status != 101:
            if status >= 200:
                raise Rejected(status, _refusal_body(sock, answer, rest))
            raise HandshakeFailed(f"the host answered the upgrade with HTTP {status}")
        if answer.get("upgrade", "").lower() != "websocket" or answer.get(
            "sec-websocket-accept"
        ) != accept_token(key).decode("ascii"):
            raise HandshakeFailed("the host's answer is not a WebSocket upgrade (wrong accept key)")
        if answer.get("sec-websocket-extensions"):
            raise HandshakeFailed("the host agreed to a WebSocket extension nobody offered")
        sock.settimeout(None)
        return LogSocket(sock, rest, max_message)
    except BaseException:
        sock.close()
        raise


class LogSocket:
    """An open client WebSocket that is only read. ``receive`` blocks until a message or the end."""

    def __init__(self, sock: Any, early: bytes, max_message: int) -> None:
        self._sock = sock
        self._frames = FrameReader(masked=False, max_message=max_message)
        if early:
            self._frames.receive_data(early)
        self._ended: Ended | None = None

    def _send(self, opcode: int, payload: bytes) -> None:
        with contextlib.suppress(OSError):  # the peer is gone: nothing more to say to it
            self._sock.sendall(b"".join(frame_parts(opcode, payload, mask_key=os.urandom(4))))

    def receive(self) -> bytes | str | Ended:
        """The next message, or how the socket ended (then again on every later call)."""
        while self._ended is None:
            try:
                event = self._frames.next_event()
            except WebSocketProtocolError as exc:
                self._send(OP_CLOSE, close_payload(exc.code))
                return self._end(CLOSE_DROPPED, f"the host broke the WebSocket protocol: {exc}")
            if isinstance(event, bytes | str):
                return event
            if isinstance(event, Close):
                # Answer the close (with its code, as RFC 6455 says) and leave: all the output has come.
                code = event.code
                self._send(OP_CLOSE, b"" if code == CLOSE_NO_STATUS else close_payload(code))
                return self._end(code, event.reason)
            if isinstance(event, Ping):
                self._send(OP_PONG, event.payload)
                continue
            if event is not None:
                continue  # a pong nobody asked for
            try:
                with self._frames.writable(_RECV) as view:
                    n = self._sock.recv_into(view)
            except OSError:
                n = 0
            if not n:
                return self._end(CLOSE_DROPPED, None)
            self._frames.commit(n)
        return self._ended

    def _end(self, code: int, reason: str | None) -> Ended:
        self._ended = Ended(code, reason)
        self.close()
        return self._ended

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __enter__(self) -> LogSocket:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
