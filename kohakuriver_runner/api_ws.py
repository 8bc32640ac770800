"""The runner's two tunnel WebSocket routes (the work itself is ``tunnel_server.TunnelServer``).

- ``/ws/tunnel/{container}``: the tunnel client inside a container. Not the cluster token (``app.py``
  exempts it) but the container's own secret as ``Authorization: Bearer``, from the container's address on
  the task network. Refused *before* the upgrade with a JSON 401/403/404.
- ``/ws/forward/{container}/{port}?proto=tcp|udp``: a forward session from the host (cluster token).
  ``{container}`` is a decimal task id or a container name. The first message is the text ``CONNECTED``,
  or ``Error: <reason>`` and a close with 1008 (bad request, unknown or not-running task) or 1011 (no tunnel)
  whose reason is the refusal code (``kohakuriver_proto.session_opening``, used by ``tunnel_server``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from quart import Response, websocket
from quart_trio import QuartTrio

from .api_common import error_response
from .tunnel_server import TunnelServer

if TYPE_CHECKING:
    from .daemon import Runtime

__all__ = ["TUNNEL_PREFIX", "register"]

#: Path prefix of the tunnel-client route (authenticated by the container secret, not the cluster token).
TUNNEL_PREFIX = "/ws/tunnel/"

_ERRORS = {401: "unauthorized", 403: "forbidden", 404: "not_found"}


def register(app: QuartTrio, runtime: Runtime) -> None:
    tunnels: TunnelServer = runtime.tunnels

    @app.websocket("/ws/tunnel/<container>")
    async def tunnel_client(container: str) -> Response | None:
        client = websocket.scope.get("client") or ("", 0)
        problem = await tunnels.check_tunnel_client(
            container, websocket.headers.get("Authorization", ""), client[0]
        )
        if problem is not None:
            status, message = problem
            return error_response(status, _ERRORS[status], message)
        await websocket.accept()
        await tunnels.serve_tunnel_client(container, websocket._get_current_object())
        return None

    @app.websocket("/ws/forward/<container>/<port>")
    async def forward(container: str, port: str) -> None:
        await websocket.accept()
        proto = websocket.args.get("proto", "tcp")
        await tunnels.serve_forward(container, port, proto, websocket._get_current_object())
