"""VM endpoints: the base images the nodes reported (any user) and the VM instances on the nodes
(operators list them, admins remove them). The logic is in ``vm_service``."""

from __future__ import annotations

from quart import Blueprint, Response, request

from kohakuriver_proto.errors import ValidationError
from kohakuriver_proto.targets import check_hostname

from . import vm_service
from .api_common import ctx, invalid, json_response, not_found, path_task_id, require
from .auth import Role

bp = Blueprint("vm", __name__)


def _node_query() -> str | None:
    raw = request.args.get("node")
    if raw is None or raw == "":
        return None
    try:
        check_hostname(raw, "node")
    except ValidationError as exc:
        raise invalid(exc.message, "node") from None
    return raw


@bp.get("/api/vm/images")
async def images() -> Response:
    await require(Role.VIEWER)
    return json_response({"images": vm_service.images(ctx(), _node_query())})


@bp.get("/api/vm/instances")
async def instances() -> Response:
    await require(Role.OPERATOR)
    return json_response(await vm_service.instances(ctx(), _node_query()))


@bp.delete("/api/vm/instances/<node>/<task_id>")
async def remove_instance(node: str, task_id: str) -> Response:
    await require(Role.ADMIN)
    try:
        check_hostname(node, "node")
    except ValidationError:
        raise not_found(f"no node {node[:80]!r}") from None
    return json_response(await vm_service.remove_instance(ctx(), node, path_task_id(task_id)))
