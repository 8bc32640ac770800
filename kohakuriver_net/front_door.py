"""A plain-TCP front door: one accept loop that routes each connection by its request line.

Why: the tunnel's data path is too hot for hypercorn's per-message layers (ASGI events, wsproto's copies).
The host splices ``GET /ws/forward/<task>/<port>`` connections (``kohakuriver_host.forward_splice``), the
runner serves ``/ws/tunnel/`` and ``/ws/forward/`` on its own lean WebSocket (``kohakuriver_runner.
tunnel_door``). Each daemon gives a list of routes: a request line that fully matches a route's pattern goes
to its handler; everything else is served by hypercorn exactly as ``hypercorn.trio.serve`` would, on the
same socket, with nothing consumed: the request line is only *peeked* (``MSG_PEEK``).

This replaces ``hypercorn.trio.run.worker_serve`` for the plain-TCP case (TLS keeps ``hypercorn.trio.serve``
and the routes' Quart versions) and so depends on hypercorn internals: ``Lifespan``,
``WorkerContext``, ``TCPServer`` and ``ConnectionState`` used the way ``worker_serve`` uses them (hypercorn
is pinned to the tested range in ``pyproject.toml``; ``test_host_forward_splice`` fails loudly if they
change). What is kept from ``worker_serve``: the same ``Config`` (bind, backlog, timeouts, logs), lifespan
startup before listening and shutdown after the connections end, and a graceful stop on cancellation:
accept no more, close idle keep-alive connections, give requests in progress ``graceful_timeout``.
Routed connections are cut at once on shutdown: nothing could drain them, a tunnel has no end of its own.
"""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import hypercorn.config
import trio
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.statsd import StatsdLogger
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import LifespanTimeoutError, repr_socket_addr, wrap_app

log = logging.getLogger("kohakuriver.front_door")

#: The most of a request line the router looks at; a longer one is hypercorn's to refuse.
PEEK_BYTES = 8192
#: How long the router waits for a request line before handing the connection to hypercorn anyway (which
#: then applies its own keep-alive timeout to a silent client).
PEEK_SECONDS = 2.0
#: Pause between peeks when the client sent part of a line: the socket stays readable, so without it the
#: router would spin on the same bytes.
PEEK_RETRY_SECONDS = 0.005

#: Serves one routed connection (the front door closes the stream afterwards).
Handler = Callable[[trio.SocketStream], Awaitable[None]]
#: A request-line pattern (``fullmatch`` against the line with its CRLF) and its handler.
Route = tuple[re.Pattern[bytes], Handler]


async def peek_request_line(sock: trio.socket.SocketType, deadline: float) -> bytes:
    """The connection's first line (with its ``\\r\\n``) without consuming it; what arrived by ``deadline``,
    at EOF or at ``PEEK_BYTES`` otherwise."""
    seen = -1
    data = b""
    with trio.move_on_at(deadline):
        while True:
            data = await sock.recv(PEEK_BYTES, socket.MSG_PEEK)
            if not data or b"\r\n" in data or len(data) >= PEEK_BYTES:
                break
            if len(data) == seen:
                await trio.sleep(PEEK_RETRY_SECONDS)
            seen = len(data)
    end = data.find(b"\r\n")
    return data if end < 0 else data[: end + 2]


def route_line(prefix: str, segments: int) -> re.Pattern[bytes]:
    """The request lines of ``GET <prefix><segment>[/<segment>...][?query]`` with exactly ``segments``
    non-empty path segments after ``prefix`` (what ``ws_handshake.route_parts`` then takes apart); anything
    else, including a malformed path under the same prefix, stays hypercorn's and the app's to answer."""
    segment = rb"[^/?#\s]+"
    path = re.escape(prefix.encode()) + rb"/".join([segment] * segments)
    return re.compile(rb"GET " + path + rb"(\?[^#\s]*)? HTTP/1\.1\r\n")


def route_for(routes: Sequence[Route], line: bytes) -> Handler | None:
    """The handler of the first route whose pattern matches the whole request line; None: hypercorn's."""
    for pattern, handler in routes:
        if pattern.fullmatch(line) is not None:
            return handler
    return None


class FrontDoor:
    """``serve()`` is ``hypercorn.trio.serve(app, config)`` with connections matching ``routes`` taken out."""

    def __init__(self, app: Any, config: hypercorn.config.Config, routes: Sequence[Route]) -> None:
        if config.ssl_enabled:
            raise ValueError("the front door serves plain TCP; serve TLS with hypercorn.trio.serve")
        config.set_statsd_logger_class(StatsdLogger)  # what worker_serve does first
        self.app = wrap_app(app, config.wsgi_max_body_size, "asgi")
        self.config = config
        self.routes = tuple(routes)
        self.context = WorkerContext(None)
        self.lifespan_state: dict[str, Any] = {}
        self.routed = 0  # routed connections open now

    async def serve(self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until cancelled; ``task_status.started`` gets the binds (``http://ip:port``).
        Cancellation is the graceful stop described above (bounded by the config's timeouts)."""
        stopping = trio.Event()
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(self._run, stopping)
            task_status.started(binds)
            try:
                await trio.sleep_forever()
            finally:
                stopping.set()

    async def _run(self, stopping: trio.Event, *, task_status: trio.TaskStatus[list[str]]) -> None:
        lifespan = Lifespan(self.app, self.config, self.lifespan_state)
        async with trio.open_nursery() as lifespan_nursery:
            await lifespan_nursery.start(lifespan.handle_lifespan)
            await lifespan.wait_for_startup()
            # From here the daemon's cancellation must not cut requests in progress nor the app's shutdown
            # hooks: it sets ``stopping`` instead, and the deadlines below bound what follows.
            lifespan_nursery.cancel_scope.shield = True
            with trio.CancelScope() as connections:
                async with trio.open_nursery() as handlers:
                    listeners, binds = self._listeners()
                    accepting = trio.CancelScope()
                    handlers.start_soon(self._accept, listeners, handlers, accepting)
                    task_status.started(binds)
                    await stopping.wait()
                    accepting.cancel()
                    await self.context.terminated.set()  # idle keep-alive connections close now
                    connections.deadline = trio.current_time() + self.config.graceful_timeout
            # Every connection has ended: the app's shutdown hooks run last, as in ``worker_serve``.
            with trio.move_on_after(self.config.shutdown_timeout + 1):
                try:
                    await lifespan.wait_for_shutdown()
                except LifespanTimeoutError:
                    log.warning("the application's shutdown did not finish in time")
            lifespan_nursery.cancel_scope.cancel()

    async def _accept(
        self, listeners: list[trio.SocketListener], handlers: trio.Nursery, accepting: trio.CancelScope
    ) -> None:
        with accepting:
            await trio.serve_listeners(self._handle, listeners, handler_nursery=handlers)

    def _listeners(self) -> tuple[list[trio.SocketListener], list[str]]:
        sockets = self.config.create_sockets()
        listeners = []
        binds = []
        for sock in sockets.insecure_sockets:
            sock.listen(self.config.backlog)
            listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
            binds.append(f"http://{repr_socket_addr(sock.family, sock.getsockname())}")
        return listeners, binds

    async def _handle(self, stream: trio.SocketStream) -> None:
        line = await peek_request_line(stream.socket, trio.current_time() + PEEK_SECONDS)
        handler = route_for(self.routes, line)
        if handler is None:
            # ``worker_serve`` hands each connection a fresh ConnectionState over a copy of the lifespan
            # state; TCPServer wraps it once more per connection.
            await TCPServer(
                self.app, self.config, self.context, ConnectionState(self.lifespan_state.copy()), stream
            )
            return
        self.routed += 1
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_when_terminated, self.context, nursery.cancel_scope)
                await handler(stream)
                nursery.cancel_scope.cancel()
        except Exception:  # a bug costs one connection, never the accept loop
            log.exception("routed connection failed")
        finally:
            self.routed -= 1
            await trio.aclose_forcefully(stream)


async def _cancel_when_terminated(context: WorkerContext, scope: trio.CancelScope) -> None:
    await context.terminated.wait()
    scope.cancel()
