"""Task endpoints: submit, list, status, kill, pause/resume, output (tail and follow)."""

from __future__ import annotations

import re
from typing import Any

from quart import Blueprint, Response, request

from kohakuriver_proto.converter import structure
from kohakuriver_proto.errors import ValidationError
from kohakuriver_proto.lifecycle import TaskStatus, TaskType
from kohakuriver_proto.models import CommandTaskSpec
from kohakuriver_proto.targets import check_hostname

from . import logs_proxy, tasks_service
from .api_common import (
    ctx,
    invalid,
    json_body,
    json_response,
    path_task_id,
    principal,
    query_choice,
    query_int,
    require,
)
from .auth import Role
from .store import ReadTx
from .stored_task import INTERNAL_KEYS, public_record

bp = Blueprint("tasks", __name__)

MAX_PAGE = 1000
STREAMS = ("stdout", "stderr")
MAX_LINES = 1_000_000
#: Longest hold of ``GET /api/status/{id}?wait=`` (larger waits are capped: the client simply asks again).
MAX_STATUS_WAIT = 30.0
_DECIMAL = re.compile(r"[0-9]+(\.[0-9]*)?|\.[0-9]+")


@bp.post("/api/submit")
async def submit() -> Response:
    who = await require(Role.USER)
    spec = structure(await json_body(), CommandTaskSpec)  # ValidationError -> 422 naming the field
    result = await tasks_service.submit(ctx(), who, spec)
    return json_response({"task_ids": [str(t) for t in result.task_ids], "message": result.message}, 202)


def _statuses(raw: str | None) -> list[str] | None:
    if not raw:
        return None
    wanted = [s.strip() for s in raw.split(",") if s.strip()]
    valid = {s.value for s in TaskStatus}
    for s in wanted:
        if s not in valid:
            raise invalid(f"status: unknown status {s[:40]!r} (one of {', '.join(sorted(valid))})", "status")
    return wanted


@bp.get("/api/tasks")
async def list_tasks() -> Response:
    who = await require(Role.VIEWER)
    host = ctx()
    statuses = _statuses(request.args.get("status"))
    task_type = query_choice("task_type", tuple(t.value for t in TaskType), None)
    node = request.args.get("node") or None
    if node is not None:
        try:
            check_hostname(node, "node")
        except ValidationError as exc:
            raise invalid(str(exc), "node") from None
    limit, offset = page_window()
    owner = request.args.get("owner") or None
    # Users and viewers only ever see their own tasks, whatever they ask for.
    owner_id: int | None = None
    if not who.at_least(Role.OPERATOR):
        if owner is not None and owner != who.username:
            return json_response({"tasks": [], "limit": limit, "offset": offset, "has_more": False})
        owner_id = who.user_id
    elif owner is not None:
        user = await host.store.read(ReadTx.get_user_by_name, owner)
        if user is None:
            return json_response({"tasks": [], "limit": limit, "offset": offset, "has_more": False})
        owner_id = user.id
    return await task_page(
        "tasks", limit, offset, owner_id=owner_id, statuses=statuses, task_type=task_type, node=node
    )


def page_window() -> tuple[int, int]:
    """``?limit=`` (1 to ``MAX_PAGE``, 100 by default) and ``?offset=`` of a listing."""
    return query_int("limit", 100, minimum=1, maximum=MAX_PAGE), query_int("offset", 0, maximum=1 << 40)


async def task_page(key: str, limit: int, offset: int, **filters: Any) -> Response:
    """One page of task records as ``{key: [...], "limit", "offset", "has_more"}``; ``filters`` go to the
    store's ``list_task_documents``. The records are the store's JSON text, joined without parsing them."""
    # One row more than asked tells whether another page exists, without a COUNT over the whole table.
    docs = await ctx().store.read(
        ReadTx.list_task_documents, limit=limit + 1, offset=offset, drop_keys=INTERNAL_KEYS, **filters
    )
    more = "true" if len(docs) > limit else "false"
    body = f'{{"{key}":[{",".join(docs[:limit])}],"limit":{limit},"offset":{offset},"has_more":{more}}}'
    return Response(body, content_type="application/json")


@bp.get("/api/status/<task_id>")
async def status(task_id: str) -> Response:
    """The task's record. ``?since=<status>&wait=<seconds>``: a long-poll; while the task still has status
    ``since``, the answer waits (up to ``wait`` seconds, at most ``MAX_STATUS_WAIT``) for it to change."""
    who = await require(Role.VIEWER)
    wait = _wait_seconds(request.args.get("wait"))
    since = _since_status(request.args.get("since"))
    host = ctx()
    tid = path_task_id(task_id)
    if since is None or wait <= 0:
        row = await tasks_service.visible_task(host, who, tid)
    else:
        row = await tasks_service.status_change(host, who, tid, since, wait)
    return json_response(public_record(row.task))


def _wait_seconds(raw: str | None) -> float:
    """``?wait=``: seconds, a decimal number >= 0 (0 when absent); above ``MAX_STATUS_WAIT`` it is capped."""
    if raw is None or raw == "":
        return 0.0
    if len(raw) > 20 or not _DECIMAL.fullmatch(raw):
        raise invalid(f"wait must be a number of seconds (0 to {MAX_STATUS_WAIT}), got {raw[:40]!r}", "wait")
    return min(float(raw), MAX_STATUS_WAIT)


def _since_status(raw: str | None) -> TaskStatus | None:
    """``?since=``: a task status (the one the caller last saw)."""
    if raw is None or raw == "":
        return None
    try:
        return TaskStatus(raw)
    except ValueError:
        valid = ", ".join(sorted(s.value for s in TaskStatus))
        raise invalid(f"since must be a task status ({valid}), got {raw[:40]!r}", "since") from None


@bp.post("/api/kill/<task_id>")
async def kill(task_id: str) -> Response:
    who = await principal()
    return json_response(await tasks_service.kill(ctx(), who, path_task_id(task_id)))


@bp.post("/api/command/<task_id>/pause")
async def pause(task_id: str) -> Response:
    who = await principal()
    return json_response(await tasks_service.pause(ctx(), who, path_task_id(task_id)))


@bp.post("/api/command/<task_id>/resume")
async def resume(task_id: str) -> Response:
    who = await principal()
    return json_response(await tasks_service.resume(ctx(), who, path_task_id(task_id)))


@bp.get("/api/tasks/<task_id>/stdout")
async def stdout(task_id: str) -> Response:
    return await _tail(task_id, "stdout")


@bp.get("/api/tasks/<task_id>/stderr")
async def stderr(task_id: str) -> Response:
    return await _tail(task_id, "stderr")


async def _tail(task_id: str, stream: str) -> Response:
    who = await require(Role.VIEWER)
    lines = query_int("lines", None, maximum=MAX_LINES)
    return await logs_proxy.tail(ctx(), who, path_task_id(task_id), stream, lines)


@bp.websocket("/ws/tasks/<task_id>/logs")
async def follow_logs(task_id: str) -> None:
    who = await require(Role.VIEWER)
    stream = query_choice("stream", STREAMS, "stdout")
    lines = query_int("lines", None, maximum=MAX_LINES)
    await logs_proxy.follow(ctx(), who, path_task_id(task_id), stream, lines)
