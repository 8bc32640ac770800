"""VPS endpoints of the runner API: stop, restart and snapshots of a VPS (Docker container or VM).

Creation is ``POST /api/execute`` with ``task_type`` vps (``api_tasks``), kill/pause/resume are the task
routes. Thin, like ``api_tasks``: parse, call the ``TaskManager``, map its exceptions (404 unknown task or
snapshot, 409 wrong state, 503 Docker unavailable, 502 another Docker failure).

- ``POST /api/vps/{id}/stop``: snapshot (``AUTO_SNAPSHOT_ON_STOP``), stop and remove the container; the VPS is
  reported ``stopped`` and its SSH port freed.
- ``POST /api/vps/{id}/restart``: ``docker restart``; the files and the SSH port stay, it stays ``running``.
- ``GET /api/vps/{id}/snapshots``: ``[{tag, timestamp, created_at, size_bytes}]`` newest first (snapshots are
  images: this works after the container is gone).
- ``POST /api/vps/{id}/snapshots`` (optional JSON ``{"message": "..."}``): 201 with the new snapshot.
- ``DELETE /api/vps/{id}/snapshots/{timestamp}``.
- ``POST /api/vps/{id}/snapshots/{timestamp}/restore``: a VM's disk goes back to the snapshot (a running VM
  is powered off, reverted and booted again); 501 for a Docker VPS, which is restored by re-creating it.
  A VM's snapshots are internal snapshots of its disk: they answer as long as its disk is on this node, and
  carry ``name`` (the qcow2 tag) and ``message`` besides the Docker VPS's fields.
- ``GET /api/vps/{id}/host-key``: ``{"task_id": "...", "host_key": "ssh-ed25519 AAAA..."}``, the public half
  of the VPS's SSH host key, which the host hands to the owner to pin (``kr ssh``); 404 before the VPS was
  first created here (no key yet). Read from the key store, not the container: it answers for a stopped VPS
  too, and the key is the one every later re-creation installs.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import trio
from quart import Response, request
from quart_trio import QuartTrio

from .api_common import ApiFailure, control_answer, manager_errors, path_task_id
from .snapshots import SnapshotNotFound

if TYPE_CHECKING:
    from .daemon import Runtime

__all__ = ["register"]

T = TypeVar("T")

MAX_MESSAGE = 1024


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data, separators=(",", ":")), status=status, mimetype="application/json")


def _timestamp(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 12:
        raise ApiFailure(
            400, "invalid", f"a snapshot timestamp is a unix time, got {text[:40]!r}", "timestamp"
        )
    return int(text)


async def _message() -> str | None:
    body = await request.get_data()
    if not body.strip():
        return None
    try:
        data = json.loads(body)
    except ValueError:
        raise ApiFailure(400, "invalid", 'the body must be JSON ({"message": "..."})') from None
    message = data.get("message") if isinstance(data, dict) else None
    if isinstance(data, dict) and set(data) - {"message"}:
        raise ApiFailure(400, "invalid", f"unknown fields {sorted(set(data) - {'message'})}")
    if message is None:
        return None
    if not isinstance(message, str) or len(message) > MAX_MESSAGE or "\0" in message:
        raise ApiFailure(
            400, "invalid", f"message must be a string of at most {MAX_MESSAGE} characters", "message"
        )
    return message


async def _call(fn: Callable[[], Awaitable[T]]) -> T:
    with manager_errors(SnapshotNotFound):
        return await fn()


def register(app: QuartTrio, runtime: Runtime) -> None:
    manager = runtime.manager

    @app.post("/api/vps/<task_id>/stop")
    async def stop_vps(task_id: str) -> Response:
        return await control_answer(manager.stop_vps, path_task_id(task_id))

    @app.post("/api/vps/<task_id>/restart")
    async def restart_vps(task_id: str) -> Response:
        return await control_answer(manager.restart_vps, path_task_id(task_id))

    @app.get("/api/vps/<task_id>/snapshots")
    async def list_snapshots(task_id: str) -> Response:
        tid = path_task_id(task_id)
        return _json(await _call(lambda: manager.list_snapshots(tid)))

    @app.post("/api/vps/<task_id>/snapshots")
    async def create_snapshot(task_id: str) -> Response:
        tid = path_task_id(task_id)
        message = await _message()
        return _json(await _call(lambda: manager.snapshot_vps(tid, message)), 201)

    @app.get("/api/vps/<task_id>/host-key")
    async def host_key(task_id: str) -> Response:
        tid = path_task_id(task_id)
        # A file read and an Ed25519 parse: off the loop, like every other use of the key store.
        key = await trio.to_thread.run_sync(manager.host_keys.public_key, tid)
        if key is None:
            raise ApiFailure(404, "not_found", f"VPS {tid} has no host key on this node")
        return _json({"task_id": str(tid), "host_key": key})

    @app.delete("/api/vps/<task_id>/snapshots/<timestamp>")
    async def delete_snapshot(task_id: str, timestamp: str) -> Response:
        tid, ts = path_task_id(task_id), _timestamp(timestamp)
        return _json(await _call(lambda: manager.delete_snapshot(tid, ts)))

    @app.post("/api/vps/<task_id>/snapshots/<timestamp>/restore")
    async def restore_snapshot(task_id: str, timestamp: str) -> Response:
        tid, ts = path_task_id(task_id), _timestamp(timestamp)
        return _json(await _call(lambda: manager.restore_snapshot(tid, ts)))
