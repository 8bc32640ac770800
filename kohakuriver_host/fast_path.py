"""The heartbeat fast path: ``PUT /api/heartbeat/{hostname}`` answered at the ASGI level, without Quart.

Why: heartbeats are most of the host's requests (500 runners every 5 s = 100 a second), and Quart's
per-request machinery (request object and context, signals, routing, response finalisation) costs more CPU
than the heartbeat itself. This wrapper handles a heartbeat that is in order (cluster token, a valid node
name, a body that parses) directly with ``node_service.heartbeat`` and answers like the Quart endpoint
would. Anything else (no or wrong token, a malformed body, an oversized one) is handed to the Quart app
with the body replayed, so every error answer keeps coming from one place (``app.py``) and reads the same.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from kohakuriver_proto.converter import loads
from kohakuriver_proto.errors import ValidationError
from kohakuriver_proto.models import Heartbeat
from kohakuriver_proto.targets import check_hostname

from . import auth, node_service
from .app import MAX_BODY_BYTES
from .context import HostContext

log = logging.getLogger("kohakuriver.host.api")

PREFIX = "/api/heartbeat/"
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class HeartbeatFastPath:
    """ASGI application wrapping ``app``; see the module docstring."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], host: HostContext) -> None:
        self.app = app
        self.host = host

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "PUT" or not scope["path"].startswith(PREFIX):
            await self.app(scope, receive, send)
            return
        hostname = scope["path"][len(PREFIX) :]
        if not self._authorized(scope) or not _valid_hostname(hostname):
            await self.app(scope, receive, send)  # nothing consumed yet: Quart answers 401/404
            return
        body, complete = await _read_body(receive, MAX_BODY_BYTES)
        if not complete:
            await self.app(scope, _replay(body, receive), send)  # Quart refuses the size (413)
            return
        try:
            hb = loads(body, Heartbeat)
        except ValidationError:
            await self.app(scope, _replay(body, receive), send)  # Quart answers 400/422 naming the field
            return
        try:
            outcome = await node_service.heartbeat(self.host, hostname, hb)
        except Exception:  # the same answer as Quart's handler for anything unexpected
            log.exception("unhandled error in the heartbeat of %s", hostname)
            await _respond(send, 500, {"error": "internal", "message": "internal error", "field": None})
            return
        if not outcome.known:
            message = f"unknown node {hostname!r}: register first"
            await _respond(send, 404, {"error": "not_found", "message": message, "field": None})
            return
        await _respond(send, 200, outcome.answer())

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                token = auth.bearer_token(value.decode("latin-1"))
                return token is not None and auth.check_cluster_token(self.host.cluster_token, token)
        return False


def _valid_hostname(hostname: str) -> bool:
    try:
        check_hostname(hostname)
    except ValidationError:
        return False
    return True


async def _read_body(receive: Receive, limit: int) -> tuple[bytes, bool]:
    """The request body; (what was read, False) once it exceeds ``limit`` or the client went away."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), False
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return b"".join(chunks), False
        if not message.get("more_body", False):
            return b"".join(chunks), True


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that yields the already-read body first, then whatever the client sends next."""
    pending = [{"type": "http.request", "body": body, "more_body": True}]

    async def replayed() -> dict[str, Any]:
        if pending:
            message = pending.pop()
            # The rest of an oversized body is still with the client; a complete one ends here.
            message["more_body"] = len(body) > MAX_BODY_BYTES
            return message
        return await receive()

    return replayed


async def _respond(send: Send, status: int, data: Any) -> None:
    body = json.dumps(data, separators=(",", ":")).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode("ascii"))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
