"""VPS endpoints: create, list, one VPS, stop, restart, pause/resume, the SSH host key and snapshots (list,
create, delete, restore; all proxied to its node).

The logic is in ``vps_service``; pause and resume are the command tasks' own (``tasks_service``), after
checking that the id is a VPS. ``GET /api/status/{id}`` and ``POST /api/kill/{id}`` work for a VPS too.
"""

from __future__ import annotations

from quart import Blueprint, Response, request

from kohakuriver_proto.lifecycle import TaskType

from . import tasks_service, vps_service
from .api_common import ctx, json_body, json_response, not_found, path_task_id, principal, require
from .api_tasks import _statuses as statuses_query  # the same ?status=a,b parsing as /api/tasks
from .api_tasks import page_window, task_page
from .auth import Role
from .stored_task import public_record

bp = Blueprint("vps", __name__)

#: Snapshot tags end in a Unix timestamp; anything else in the path is answered like an unknown snapshot.
MAX_TIMESTAMP_DIGITS = 12


@bp.post("/api/vps/create")
async def create() -> Response:
    who = await require(Role.USER)
    parsed = vps_service.parse_create(await json_body())  # ValidationError -> 422 naming the field
    task_id, message = await vps_service.create(ctx(), who, parsed)
    return json_response({"task_id": str(task_id), "message": message}, 202)


@bp.get("/api/vps")
async def list_vps() -> Response:
    who = await require(Role.VIEWER)
    statuses = statuses_query(request.args.get("status"))
    limit, offset = page_window()
    # Everyone sees their own by default; operators and admins may ask for every user's (?all=1).
    everyone = request.args.get("all") in ("1", "true") and who.at_least(Role.OPERATOR)
    owner_id = None if everyone else who.user_id
    return await task_page(
        "vps", limit, offset, owner_id=owner_id, statuses=statuses, task_type=TaskType.VPS.value
    )


@bp.get("/api/vps/<task_id>")
async def one(task_id: str) -> Response:
    who = await require(Role.VIEWER)
    row = await vps_service.visible_vps(ctx(), who, path_task_id(task_id))
    return json_response(public_record(row.task))


@bp.post("/api/vps/<task_id>/stop")
async def stop(task_id: str) -> Response:
    who = await principal()
    return json_response(await vps_service.stop(ctx(), who, path_task_id(task_id)))


@bp.post("/api/vps/<task_id>/restart")
async def restart(task_id: str) -> Response:
    who = await principal()
    return json_response(await vps_service.restart(ctx(), who, path_task_id(task_id)))


@bp.post("/api/vps/<task_id>/pause")
async def pause(task_id: str) -> Response:
    who = await principal()
    row = await vps_service.visible_vps(ctx(), who, path_task_id(task_id))
    return json_response(await tasks_service.pause(ctx(), who, row.task_id))


@bp.post("/api/vps/<task_id>/resume")
async def resume(task_id: str) -> Response:
    who = await principal()
    row = await vps_service.visible_vps(ctx(), who, path_task_id(task_id))
    return json_response(await tasks_service.resume(ctx(), who, row.task_id))


@bp.get("/api/vps/<task_id>/host-key")
async def host_key(task_id: str) -> Response:
    who = await principal()  # owner (user role) or operator: those who may reach it
    return json_response(await vps_service.host_key(ctx(), who, path_task_id(task_id)))


@bp.get("/api/vps/<task_id>/snapshots")
async def list_snapshots(task_id: str) -> Response:
    who = await require(Role.VIEWER)
    tid = path_task_id(task_id)
    snapshots = await vps_service.list_snapshots(ctx(), who, tid)
    return json_response({"task_id": str(tid), "snapshots": snapshots})


@bp.post("/api/vps/<task_id>/snapshots")
async def create_snapshot(task_id: str) -> Response:
    who = await principal()
    return json_response(await vps_service.create_snapshot(ctx(), who, path_task_id(task_id)), 201)


def _timestamp(text: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= MAX_TIMESTAMP_DIGITS):
        raise not_found(f"no snapshot {text[:40]!r} (snapshots are named by their Unix timestamp)")
    return int(text)


@bp.post("/api/vps/<task_id>/snapshots/<timestamp>/restore")
async def restore_snapshot(task_id: str, timestamp: str) -> Response:
    who = await principal()  # the owner (user role) or an operator
    tid = path_task_id(task_id)
    return json_response(await vps_service.restore_snapshot(ctx(), who, tid, _timestamp(timestamp)))


@bp.delete("/api/vps/<task_id>/snapshots/<timestamp>")
async def delete_snapshot(task_id: str, timestamp: str) -> Response:
    who = await principal()
    tid = path_task_id(task_id)
    return json_response(await vps_service.delete_snapshot(ctx(), who, tid, _timestamp(timestamp)))
