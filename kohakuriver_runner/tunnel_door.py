"""The runner's tunnel routes on its own WebSocket, past hypercorn (plain TCP; the front door routes here).

Every forwarded byte crosses the runner twice (tunnel client -> runner -> host and back), and through
hypercorn + Quart each message paid an ASGI event, several wsproto copies and a write per message: the
runner was the busiest process of a forward. Here the two routes of ``api_ws`` are served on
``kohakuriver_net.websocket.WebSocket`` (one copy per byte, vectored and batched writes) with the same
checks, answers and codes:

- ``GET /ws/tunnel/{container}``: the container's secret and address (``TunnelServer.check_tunnel_client``),
  a JSON 401/403/404 before the upgrade otherwise;
- ``GET /ws/forward/{container}/{port}?proto=``: the cluster token (JSON 401 before the upgrade), then
  ``TunnelServer.serve_forward`` (``CONNECTED``, or ``Error:`` + a close whose reason is the refusal code:
  ``kohakuriver_proto.session_opening``).

With TLS the runner serves these routes through Quart (``api_ws``), the same ``TunnelServer`` behind both.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from kohakuriver_net.front_door import route_line
from kohakuriver_net.websocket import ConnectionClosed, WebSocket, tune_for_tunnel
from kohakuriver_net.ws_handshake import (
    Dropped,
    HttpRefusal,
    answer_and_close,
    check_upgrade,
    headers_of,
    query_value,
    read_request,
    route_parts,
    switching_protocols,
)

from .api_common import cluster_token_problem
from .runner_settings import RunnerSettings
from .tunnel_server import TunnelServer

__all__ = ["FORWARD_LINE", "TUNNEL_LINE", "in_process_forward", "routes"]

log = logging.getLogger("kohakuriver.runner.tunnel")

TUNNEL_PREFIX, FORWARD_PREFIX = "/ws/tunnel/", "/ws/forward/"
TUNNEL_LINE = route_line(TUNNEL_PREFIX, 1)
FORWARD_LINE = route_line(FORWARD_PREFIX, 2)
_ERRORS = {401: "unauthorized", 403: "forbidden", 404: "not_found"}


def routes(tunnels: TunnelServer, config: RunnerSettings, max_message: int) -> list:
    """The front door's routes for the two tunnel paths."""
    token = (config.CLUSTER_TOKEN or "").encode()

    async def tunnel(stream: trio.SocketStream) -> None:
        async def serve(request: Any, ws_open: Any) -> None:
            (name,), _ = route_parts(request, TUNNEL_PREFIX, 1)
            authorization = headers_of(request).get(b"authorization", b"").decode("latin-1")
            peer_ip = stream.socket.getpeername()[0]
            problem = await tunnels.check_tunnel_client(name, authorization, peer_ip)
            if problem is not None:
                status, message = problem
                raise HttpRefusal(status, _ERRORS[status], message)
            await tunnels.serve_tunnel_client(name, await ws_open())

        await _serve(stream, max_message, serve)

    async def forward(stream: trio.SocketStream) -> None:
        async def serve(request: Any, ws_open: Any) -> None:
            (ref, port), query = route_parts(request, FORWARD_PREFIX, 2)
            authorization = headers_of(request).get(b"authorization", b"").decode("latin-1")
            problem = cluster_token_problem(token, authorization)
            if problem is not None:
                raise HttpRefusal(401, "unauthorized", problem, (("WWW-Authenticate", "Bearer"),))
            proto = query_value(query, "proto") or "tcp"
            await tunnels.serve_forward(ref, port, proto, await ws_open())

        await _serve(stream, max_message, serve)

    return [(TUNNEL_LINE, tunnel), (FORWARD_LINE, forward)]


def in_process_forward(tunnels: TunnelServer, max_message: int) -> Any:
    """The forward route for a host in this same process (``kr up``; ``kohakuriver_host.local_runner``):
    the host has checked the user and sent the ``101`` on the client's connection, which is served here as
    if it had come through the host's relay (no cluster token: the caller is the host itself)."""

    async def forward(
        stream: trio.SocketStream, ref: str, port: str, proto: str, early: bytes, answer_by: float
    ) -> None:
        tune_for_tunnel(stream.socket)
        ws = WebSocket(stream, client=False, max_message=max_message, early=early)
        try:
            await tunnels.serve_forward(ref, port, proto, ws, answer_by=answer_by)
        except* (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError) as group:
            log.debug("in-process forward connection ended: %r", group.exceptions[0])

    return forward


async def _serve(stream: trio.SocketStream, max_message: int, serve: Any) -> None:
    """Read and check the upgrade, let ``serve`` check the route and run it on the WebSocket that
    ``ws_open()`` returns (after sending the 101); JSON errors before the upgrade."""
    try:
        request, conn = await read_request(stream)
        key = check_upgrade(request)
    except HttpRefusal as refusal:
        await answer_and_close(stream, refusal.response)
        return
    except Dropped:
        return

    async def ws_open() -> WebSocket:
        await stream.send_all(switching_protocols(conn, key))
        tune_for_tunnel(stream.socket)
        early, _ = conn.trailing_data
        return WebSocket(stream, client=False, max_message=max_message, early=early)

    try:
        try:
            await serve(request, ws_open)
        except HttpRefusal as refusal:
            await answer_and_close(stream, refusal.response)
    except* (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError) as group:
        log.debug("tunnel route connection ended: %r", group.exceptions[0])
