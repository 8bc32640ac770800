"""``WS /ws/forward/{task_id}/{port}?proto=tcp|udp``: a user's port-forward session, relayed to the runner.

Authentication is that of every endpoint: a missing or bad API token is refused before the upgrade with the
JSON 401. Everything after that is answered on the WebSocket, because that is what the CLI reads: exactly
one text message, ``CONNECTED`` or ``Error: <reason>`` followed by a close, within
``FORWARD_CONNECT_TIMEOUT_SECONDS`` (10 s by default) of the upgrade, whatever the runner does.

Every refusal carries its ``RefusalCode`` as the close reason (``kohakuriver_proto.session_opening``).
Refused with 1008 (the request will not be served): a bad port or proto (``bad_request``); an unknown
task, or another user's (``not_found``, the same words, so ids cannot be probed); a viewer
(``not_allowed``); a task that is not running ("task N is paused", ``not_running``); a user over
``MAX_SESSIONS_PER_USER`` (``too_many``). Refused with 1011 (try again later): no node or the node offline
(``node_offline``); the store too slow to answer (``busy``); the runner unreachable, silent or refusing the
upgrade (``runner_unavailable``). The runner's own ``Error: ...`` is passed on unchanged, with the runner's
close code and reason.

Then ``forward_relay`` pipes messages verbatim until one side closes.

This route is the TLS path (and serves any forward that reaches hypercorn). On the plain-TCP listener the
``front_door`` sends forward upgrades to ``forward_splice`` instead, which pipes raw bytes with splice(2);
both paths call ``api_common.principal_for``, ``admit`` here and ``forward_relay``'s answer helpers, so the
checks, messages and codes are one implementation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio
from quart import Blueprint, current_app, websocket
from quart.blueprints import BlueprintSetupState

from kohakuriver_net import ws_speedups
from kohakuriver_proto.lifecycle import TaskStatus
from kohakuriver_proto.session_opening import RefusalCode
from kohakuriver_proto.snowflake import MAX_ID

from .api_common import ctx, principal_for
from .auth import Principal, TaskAction, can_act_on_task, can_see_task
from .context import HostContext
from .forward_relay import Refusal, RunnerTarget, SessionCounter, refuse, run_session
from .host_settings import HostSettings
from .store import ReadTx

bp = Blueprint("forward", __name__)

PROTOS = ("tcp", "udp")
#: Open sessions one user may hold at once (a browser through a forward opens a handful; scripts more).
MAX_SESSIONS_PER_USER = 64
#: Part of the timeout kept for sending the refusal itself, so that a client which started its own
#: ``FORWARD_CONNECT_TIMEOUT_SECONDS`` clock before the upgrade still hears the reason.
ANSWER_MARGIN_SECONDS = 0.5
_SESSIONS_KEY = "kohakuriver.forward_sessions"


@bp.record_once
def _setup(state: BlueprintSetupState) -> None:
    # Every client frame is masked and hypercorn unmasks it; every frame the host sends on to the runner is
    # masked again. wsproto's pure-Python masker caps that near 2 Gbit/s; the C one is two orders faster.
    ws_speedups.install()
    state.app.extensions[_SESSIONS_KEY] = SessionCounter(MAX_SESSIONS_PER_USER)


def sessions() -> SessionCounter:
    return session_counter(current_app)


def session_counter(app: Any) -> SessionCounter:
    """The per-user session count of ``app``: the relay route and ``forward_splice`` share it."""
    return app.extensions[_SESSIONS_KEY]


def setup_seconds(config: HostSettings) -> float:
    total = float(config.FORWARD_CONNECT_TIMEOUT_SECONDS)
    return max(total / 2, total - ANSWER_MARGIN_SECONDS)


@bp.websocket("/ws/forward/<task_id>/<port>")
async def forward(task_id: str, port: str) -> None:
    host = ctx()
    # Before accept: no or a bad token is the JSON 401 of every endpoint.
    who = await principal_for(host, websocket.headers.get("Authorization"))
    # The real object, not the context-local proxy: the pipe touches it for every message.
    client = websocket._get_current_object()
    await websocket.accept()
    deadline = trio.current_time() + setup_seconds(host.config)
    counter = sessions()
    try:
        target = await admit(host, counter, who, task_id, port, websocket.args.get("proto"), deadline)
    except Refusal as refusal:
        await refuse(client, refusal)
        return
    try:
        await run_session(client, target, host.cluster_token, deadline)
    finally:
        counter.release(who.user_id)


async def admit(
    host: HostContext,
    counter: SessionCounter,
    who: Principal,
    task_text: str,
    port_text: str,
    proto: str | None,
    deadline: float,
) -> RunnerTarget:
    """Every check of an upgraded forward request, then a session slot; ``Refusal`` names the first that
    fails. Both forward paths (this route and ``forward_splice``) call it after the upgrade; on success the
    caller releases ``counter`` for ``who`` when the session has ended."""
    with trio.move_on_at(deadline) as scope:
        target = await _target(host, who, task_text, port_text, proto)
    if scope.cancelled_caught:  # the store did not answer in time
        raise Refusal(RefusalCode.BUSY, "the host is too busy to start the forward now")
    if not counter.try_acquire(who.user_id):
        raise Refusal(
            RefusalCode.TOO_MANY,
            f"{who.username} has {counter.limit} forward sessions open already; close one first",
        )
    return target


async def _target(
    host: HostContext, who: Principal, task_text: str, port_text: str, proto: str | None
) -> RunnerTarget:
    """The checks, in the contract's order; ``Refusal`` names the first that fails."""
    port = _port(port_text)
    proto = "tcp" if proto in (None, "") else proto
    if proto not in PROTOS:
        raise Refusal(RefusalCode.BAD_REQUEST, f"proto must be tcp or udp, got {proto[:20]!r}")
    task_id, node = await reach_running_task(host, who, task_text, "forward ports of", Refusal)
    return RunnerTarget(node.hostname, node.url, task_id, port, proto)


async def reach_running_task(
    host: HostContext,
    who: Principal,
    task_text: str,
    verb: str,
    refused: Callable[[RefusalCode, str], Exception],
) -> tuple[int, Any]:
    """The checks every session into a task makes (forward, terminal), in the contract's order: the task
    exists and ``who`` sees it (another user's reads the same as unknown), may reach it (``verb`` words the
    refusal), it runs, its node is online. ``(task_id, node)``; ``refused(code, reason)`` is raised
    otherwise, in the caller's protocol."""
    task_id = _task_id(task_text)
    row = await host.store.read(ReadTx.get_task, task_id) if task_id is not None else None
    if row is None or not can_see_task(who, row.owner_id):
        raise refused(RefusalCode.NOT_FOUND, f"task {task_text[:40]} not found")
    if not can_act_on_task(who, row.owner_id, TaskAction.REACH):
        raise refused(
            RefusalCode.NOT_ALLOWED, f"{who.username} ({who.role.value}) may not {verb} task {task_id}"
        )
    if row.status != TaskStatus.RUNNING.value:
        not_running = "" if row.status == TaskStatus.PAUSED.value else ", not running"
        raise refused(RefusalCode.NOT_RUNNING, f"task {task_id} is {row.status}{not_running}")
    if row.assigned_node is None:
        raise refused(RefusalCode.NODE_OFFLINE, f"task {task_id} has no node")
    node = host.nodes.get(row.assigned_node)
    if node is None or node.status != "online":
        raise refused(RefusalCode.NODE_OFFLINE, f"node {row.assigned_node} is offline")
    return task_id, node


def _port(text: str) -> int:
    if text.isascii() and text.isdigit() and len(text) <= 5 and 1 <= int(text) <= 65535:
        return int(text)
    raise Refusal(RefusalCode.BAD_REQUEST, f"port must be 1..65535, got {text[:20]!r}")


def _task_id(text: str) -> int | None:
    if 0 < len(text) <= 19 and text.isascii() and text.isdigit() and int(text) <= MAX_ID:
        return int(text)
    return None
