"""Runner-facing endpoints: register, heartbeat, status update. Only the cluster token is accepted.

Answers: ``models.RegisterAnswer`` (keys that are None left out, so an older runner reads ``message`` as
before) and ``models.HeartbeatAnswer`` (``overlay_peers`` only when there is something to say)."""

from __future__ import annotations

from quart import Blueprint, Response

from kohakuriver_net.task_steps import step
from kohakuriver_proto.converter import structure, unstructure
from kohakuriver_proto.errors import ValidationError
from kohakuriver_proto.models import Heartbeat, NodeRegistration, StatusUpdate
from kohakuriver_proto.targets import check_hostname

from . import node_service, tasks_service
from .api_common import ctx, json_body, json_response, not_found, require_cluster_token

bp = Blueprint("runner", __name__)


@bp.post("/api/register")
async def register() -> Response:
    require_cluster_token()
    reg = structure(await json_body(), NodeRegistration)
    # RegisterAnswer: the message, and with the overlay on the runner's assignment or why it has none.
    answer = unstructure(await node_service.register(ctx(), reg))
    return json_response({k: value for k, value in answer.items() if value is not None})


@bp.put("/api/heartbeat/<hostname>")
async def heartbeat(hostname: str) -> Response:
    require_cluster_token()
    try:
        check_hostname(hostname)
    except ValidationError:
        raise not_found(f"unknown node {hostname[:80]!r}: register first") from None
    hb = structure(await json_body(), Heartbeat)
    outcome = await node_service.heartbeat(ctx(), hostname, hb)
    if not outcome.known:
        # The runner's cue to register again (the host's database was reset, or it never registered).
        raise not_found(f"unknown node {hostname!r}: register first")
    return json_response(outcome.answer())


@bp.post("/api/update")
async def update() -> Response:
    require_cluster_token()
    report = structure(await json_body(), StatusUpdate)
    step(report.task_id, f"host.{report.status.value}_received")
    accepted = await tasks_service.report(ctx(), report)
    return json_response({"accepted": accepted})
