"""``WS /ws/terminal/{task_id}``: a user's terminal session (``kr connect``, ``kr terminal exec``), relayed to
the task's runner. Message formats: ``kohakuriver_proto.terminal``; the relay: ``terminal_relay``.

A missing or bad API token is the JSON 401 of every endpoint, before the upgrade. After it every answer is on
the WebSocket, within ``FORWARD_CONNECT_TIMEOUT_SECONDS`` (10 s) whatever the runner does: ``{"error":
"..."}`` then a close. 1008: an unknown task or another user's (the same words, so ids cannot be probed), a
viewer (who may look but not run commands), a task that is not running, a bad start request, too many open
terminals. 1011: no node or the node offline, the runner unreachable or failing. Command tasks and VPS alike.
"""

from __future__ import annotations

import trio
from quart import Blueprint, current_app, websocket
from quart.blueprints import BlueprintSetupState

from kohakuriver_proto.lifecycle import TaskStatus
from kohakuriver_proto.snowflake import MAX_ID

from .api_common import ctx, principal
from .api_forward import setup_seconds
from .auth import Principal, TaskAction, can_act_on_task, can_see_task
from .context import HostContext
from .forward_relay import POLICY, UNAVAILABLE, Refusal, SessionCounter
from .terminal_relay import TerminalTarget, refusal, refuse, run_terminal

bp = Blueprint("terminal", __name__)

#: Terminals one user may hold open at once (each is a process in a container and two WebSockets).
MAX_TERMINALS_PER_USER = 32
_SESSIONS_KEY = "kohakuriver.terminal_sessions"


@bp.record_once
def _setup(state: BlueprintSetupState) -> None:
    state.app.extensions[_SESSIONS_KEY] = SessionCounter(MAX_TERMINALS_PER_USER)


@bp.websocket("/ws/terminal/<task_id>")
async def terminal(task_id: str) -> None:
    who = await principal()  # before accept: no or a bad token is the JSON 401 of every endpoint
    host = ctx()
    client = websocket._get_current_object()
    await websocket.accept()
    deadline = trio.current_time() + setup_seconds(host.config)
    counter: SessionCounter = current_app.extensions[_SESSIONS_KEY]
    try:
        with trio.move_on_at(deadline) as scope:
            target = await _target(host, who, task_id)
        if scope.cancelled_caught:  # the store did not answer in time
            raise refusal(UNAVAILABLE, "the host is too busy to start the terminal now")
        if not counter.try_acquire(who.user_id):
            raise refusal(
                POLICY, f"{who.username} has {counter.limit} terminals open already; close one first"
            )
    except Refusal as refused:
        await refuse(client, refused)
        return
    try:
        await run_terminal(client, target, host.cluster_token, deadline)
    finally:
        counter.release(who.user_id)


async def _target(host: HostContext, who: Principal, task_text: str) -> TerminalTarget:
    """The checks, in the contract's order (exists and visible, allowed, running, node online)."""
    task_id = _task_id(task_text)
    row = await host.store.get_task(task_id) if task_id is not None else None
    if row is None or not can_see_task(who, row.owner_id):
        raise refusal(POLICY, f"task {task_text[:40]} not found")
    if not can_act_on_task(who, row.owner_id, TaskAction.REACH):
        raise refusal(POLICY, f"{who.username} ({who.role.value}) may not open terminals in task {task_id}")
    if row.status != TaskStatus.RUNNING.value:
        not_running = "" if row.status == TaskStatus.PAUSED.value else ", not running"
        raise refusal(POLICY, f"task {task_id} is {row.status}{not_running}")
    if row.assigned_node is None:
        raise refusal(UNAVAILABLE, f"task {task_id} has no node")
    node = host.nodes.get(row.assigned_node)
    if node is None or node.status != "online":
        raise refusal(UNAVAILABLE, f"node {row.assigned_node} is offline")
    return TerminalTarget(node.hostname, node.url, task_id)


def _task_id(text: str) -> int | None:
    if 0 < len(text) <= 19 and text.isascii() and text.isdigit() and int(text) <= MAX_ID:
        return int(text)
    return None
