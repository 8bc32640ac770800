"""Task endpoints of the runner API: execute, kill, pause, resume, logs, and the runner's info.

Thin: parse and validate, call the ``TaskManager``, map its exceptions to statuses (404 unknown task,
409 wrong state, 503 Docker unavailable, 502 another Docker failure).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from quart import Response, request
from quart_trio import QuartTrio

from kohakuriver_net.task_steps import step
from kohakuriver_proto.converter import loads, unstructure
from kohakuriver_proto.models import ExecuteRequest, TaskControl

from .api_common import ApiFailure, control_answer, json_response, path_task_id
from .docker_api import DockerError, DockerUnavailable
from .executor import RunnerUnavailable
from .logs import STREAMS, TaskLogsNotFound, check_task_logs, stream_task_logs

if TYPE_CHECKING:
    from .daemon import Runtime

__all__ = ["register"]

#: Largest ``lines`` a log request may ask for (the tail is kept in memory while reading).
MAX_LINES = 1_000_000


def _flag(name: str, default: bool) -> bool:
    value = request.args.get(name)
    if value is None:
        return default
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise ApiFailure(400, "invalid", f"{name} must be 0 or 1, got {value[:20]!r}", name)


def _lines() -> int | None:
    value = request.args.get("lines")
    if value is None or value == "":
        return None
    if not (value.isascii() and value.isdigit()) or int(value) > MAX_LINES:
        raise ApiFailure(
            400, "invalid", f"lines must be a number from 0 to {MAX_LINES}, got {value[:20]!r}", "lines"
        )
    return int(value)


def register(app: QuartTrio, runtime: Runtime) -> None:
    manager = runtime.manager

    @app.post("/api/execute")
    async def execute() -> Response:
        body = await request.get_data()
        req = loads(body, ExecuteRequest)  # a command task or a Docker VPS (the executor tells them apart)
        try:
            new = await manager.execute(req)
        except RunnerUnavailable as exc:
            raise ApiFailure(503, "unavailable", str(exc)) from None
        message = "accepted" if new else "already accepted (a repeated dispatch)"
        return json_response(TaskControl(task_id=req.task_id, ok=True, message=message), 202)

    @app.post("/api/kill/<task_id>")
    async def kill(task_id: str) -> Response:
        return await control_answer(manager.kill, path_task_id(task_id))

    @app.post("/api/pause/<task_id>")
    async def pause(task_id: str) -> Response:
        return await control_answer(manager.pause, path_task_id(task_id))

    @app.post("/api/resume/<task_id>")
    async def resume(task_id: str) -> Response:
        return await control_answer(manager.resume, path_task_id(task_id))

    @app.get("/api/tasks/<task_id>/logs")
    async def logs(task_id: str) -> Response:
        tid = path_task_id(task_id)
        stream = request.args.get("stream", "stdout")
        if stream not in STREAMS:
            raise ApiFailure(
                400, "invalid", f"stream must be stdout or stderr, got {stream[:20]!r}", "stream"
            )
        lines = _lines()
        follow = _flag("follow", False)
        try:
            await check_task_logs(manager.runs, runtime.store, tid)
        except TaskLogsNotFound as exc:
            raise ApiFailure(404, "not_found", str(exc)) from None

        async def body() -> AsyncIterator[bytes]:
            source = stream_task_logs(manager.runs, runtime.store, runtime.docker, tid, stream, lines, follow)
            async with aclosing(source) as chunks:
                async for chunk in chunks:
                    yield chunk
            if follow:
                step(tid, f"runner.follow_{stream}_ended")

        if follow:
            # Headers go out at once; the body lasts as long as the task (no response timeout).
            response = Response(body(), mimetype="text/plain")
            response.timeout = None
            return response
        # A plain read: fetch the first piece before answering, so that a Docker failure (which shows
        # up there) gets a real error status rather than a cut-off 200.
        chunks = body()
        try:
            first = await anext(chunks, b"")
        except DockerUnavailable as exc:
            raise ApiFailure(503, "unavailable", f"Docker is not available: {exc}") from None
        except DockerError as exc:
            raise ApiFailure(502, "docker_error", f"reading the logs failed: {exc}") from None

        async def rest() -> AsyncIterator[bytes]:
            async with aclosing(chunks):
                yield first
                async for chunk in chunks:
                    yield chunk

        response = Response(rest(), mimetype="text/plain")
        response.timeout = None  # a large saved log may take longer than Quart's default 60 s to send
        return response

    @app.get("/api/info")
    async def info() -> Response:
        host = runtime.host
        data: dict[str, Any] = {
            "hostname": runtime.hostname,
            "url": runtime.url,
            "version": runtime.version,
            "registered": host.registered.is_set(),
            "registration": unstructure(host.registration()),
            "running_tasks": [str(t) for t in manager.held_task_ids()],
            "pending_reports": len(runtime.reporter.pending_finals()),
            "docker_available": runtime.docker_status.available,
            "docker_error": None if runtime.docker_status.available else runtime.docker_status.error,
            "heartbeat": unstructure(host.heartbeat()),
        }
        return Response(json.dumps(data, separators=(",", ":")), mimetype="application/json")
