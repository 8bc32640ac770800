"""``WS /ws/terminal/{task_id}``: a user's terminal session (``kr connect``, ``kr terminal exec``), relayed to
the task's runner. Message formats: ``kohakuriver_proto.terminal``; the relay: ``terminal_relay``.

A missing or bad API token is the JSON 401 of every endpoint, before the upgrade. After it every answer is on
the WebSocket, within ``FORWARD_CONNECT_TIMEOUT_SECONDS`` (10 s) whatever the runner does: ``{"error":
"...", "code": "..."}`` then a close whose reason is the same code (``kohakuriver_proto.session_opening``).
1008: an unknown task or another user's (``not_found``, the same words, so ids cannot be probed), a viewer
(``not_allowed``: may look but not run commands), a task that is not running (``not_running``), a bad start
request (``bad_request``), too many open terminals (``too_many``). 1011: no node or the node offline
(``node_offline``), the host too busy (``busy``), the runner unreachable or failing (``runner_unavailable``,
or the runner's own code). Command tasks and VPS alike.
"""

from __future__ import annotations

import trio
from quart import Blueprint, current_app, websocket
from quart.blueprints import BlueprintSetupState

from kohakuriver_proto.session_opening import RefusalCode

from .api_common import ctx, principal
from .api_forward import reach_running_task, setup_seconds
from .auth import Principal
from .context import HostContext
from .forward_relay import Refusal, SessionCounter
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
            raise refusal(RefusalCode.BUSY, "the host is too busy to start the terminal now")
        if not counter.try_acquire(who.user_id):
            raise refusal(
                RefusalCode.TOO_MANY,
                f"{who.username} has {counter.limit} terminals open already; close one first",
            )
    except Refusal as refused:
        await refuse(client, refused)
        return
    try:
        await run_terminal(client, target, host.cluster_token, deadline)
    finally:
        counter.release(who.user_id)


async def _target(host: HostContext, who: Principal, task_text: str) -> TerminalTarget:
    task_id, node = await reach_running_task(host, who, task_text, "open terminals in", refusal)
    return TerminalTarget(node.hostname, node.url, task_id)
