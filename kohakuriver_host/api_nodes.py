"""Node endpoints for people (list, one node with usage, removal of a node that is gone) and the
unauthenticated health probe."""

from __future__ import annotations

from quart import Blueprint, Response

from . import node_service
from .api_common import ctx, json_response, not_found, require
from .auth import Role

bp = Blueprint("nodes", __name__)


@bp.get("/api/health")
async def health() -> Response:
    # The one endpoint without a token (load balancers, `kr up` readiness): it says nothing about tasks.
    host = ctx()
    online, total = node_service.health_counts(host)
    return json_response(
        {
            "status": "ok",
            "nodes_online": online,
            "nodes_total": total,
            "version": host.version,
            # Not a secret (anyone can probe the port); lets `kr ssh` find a proxy that is not on 8002.
            "ssh_proxy_port": host.ssh_proxy_port,
        }
    )


@bp.get("/api/nodes")
async def list_nodes() -> Response:
    await require(Role.VIEWER)
    return Response(await node_service.list_nodes_json(ctx()), content_type="application/json")


@bp.get("/api/nodes/<hostname>")
async def get_node(hostname: str) -> Response:
    await require(Role.VIEWER)
    view = await node_service.get_node(ctx(), hostname)
    if view is None:
        raise not_found(f"no node {hostname[:80]!r}")
    return json_response(view)


@bp.delete("/api/nodes/<hostname>")
async def remove_node(hostname: str) -> Response:
    # Admins only: it frees the node's overlay id, which a returning runner would otherwise keep.
    await require(Role.ADMIN)
    return json_response(await node_service.remove_node(ctx(), hostname))
