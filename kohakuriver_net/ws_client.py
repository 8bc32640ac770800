"""Opening a client ``WebSocket`` (``kohakuriver_net.websocket``) to a ``ws://`` or ``wss://`` URL.

``kr forward`` uses it for its session to the host: TCP (TLS for wss), the upgrade request with our headers
(``ws_handshake``), the 101 checked. Failures are told apart the way the caller needs them: the server
answered with an HTTP error (``ConnectionRejected``: status and body), or it could not be reached or spoke
no WebSocket (``HandshakeFailed``); the caller bounds the whole with its own timeout.
"""

from __future__ import annotations

import ssl
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from .websocket import WebSocket, tune_for_tunnel
from .ws_handshake import UpgradeRejected, read_upgrade_response, upgrade_request

__all__ = ["ConnectionRejected", "HandshakeFailed", "open_websocket"]


class ConnectionRejected(Exception):
    """The server answered the upgrade with HTTP ``status`` (``body``: its body, possibly cut)."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"the upgrade was refused with HTTP {status}")
        self.status = status
        self.body = body


class HandshakeFailed(Exception):
    """No WebSocket: the server could not be reached, or did not answer the upgrade as one."""


@asynccontextmanager
async def open_websocket(
    url: str,
    *,
    headers: list[tuple[str, str]] = (),  # type: ignore[assignment]
    ssl_context: ssl.SSLContext | None = None,
    max_message: int,
) -> AsyncIterator[WebSocket]:
    """Connect, upgrade and yield the open WebSocket; the connection is closed (abruptly) on exit, so say
    goodbye with ``ws.close`` before leaving when the peer deserves one."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise HandshakeFailed(f"not a WebSocket URL: {url}")
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    netloc = parts.netloc.rpartition("@")[2]
    try:
        tcp = await trio.open_tcp_stream(parts.hostname, port)
    except OSError as exc:
        raise HandshakeFailed(exc.strerror or str(exc) or type(exc).__name__) from None
    stream: trio.abc.Stream = tcp
    try:
        tune_for_tunnel(tcp.socket)
        if secure:
            context = ssl_context or ssl.create_default_context()
            stream = trio.SSLStream(tcp, context, server_hostname=parts.hostname)
        conn, key, request = upgrade_request(resource, netloc, list(headers))
        try:
            await stream.send_all(request)
            early = await read_upgrade_response(stream, conn, key)
        except UpgradeRejected as exc:
            if exc.status >= 200:
                raise ConnectionRejected(exc.status, exc.body) from None
            raise HandshakeFailed(str(exc)) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError) as exc:
            cause = exc.__cause__ or exc
            text = getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
            raise HandshakeFailed(text) from None
        yield WebSocket(stream, client=True, max_message=max_message, early=early)
    finally:
        await trio.aclose_forcefully(stream)
