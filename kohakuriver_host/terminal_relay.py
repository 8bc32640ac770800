"""The host's half of a terminal session: check the start request, reach the runner, relay both ways.

Message formats are ``kohakuriver_proto.terminal``'s. The host takes the client's start request (so a
malformed one is refused here, by name), opens ``ws(s)://<runner>/ws/terminal/<task_id>`` with the cluster
token, passes the request on and waits for the runner's first message, all before ``deadline``:
``{"started": true}`` is passed on and the pipe runs; the runner's ``{"error": ...}`` is passed on as it
came, with the runner's close code and reason (the refusal code, ``kohakuriver_proto.session_opening``);
anything else, an unreachable runner or the deadline is ``{"error": ..., "code": "runner_unavailable"}``
and 1011.
The pipe itself (messages verbatim, text and binary types preserved, backpressure both ways) and the
TCP/TLS connection to the runner are the forward relay's (``forward_relay``): one relay for both routes.
"""

from __future__ import annotations

import logging
import math

import attrs
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, WebSocketConnection

from kohakuriver_proto.errors import ProtocolError, RemoteProtocolError
from kohakuriver_proto.session_opening import (
    Connected,
    RefusalCode,
    terminal_answer,
    terminal_refusal,
)
from kohakuriver_proto.terminal import parse_start

from .forward_relay import (
    ClientSocket,
    Endpoint,
    Refusal,
    body_message,
    close_runner,
    open_runner_stream,
    pipe,
    runner_endpoint,
    runner_refusal,
    runner_websocket,
    runner_ws_url,
)

__all__ = ["TerminalTarget", "refusal", "refuse", "run_terminal"]

log = logging.getLogger("kohakuriver.host.terminal")


def refusal(code: RefusalCode, reason: str) -> Refusal:
    """A refused terminal session: ``{"error": reason, "code": code}`` then a close that carries ``code``."""
    return Refusal(code, reason, opening=terminal_refusal(code, reason))


async def refuse(client: ClientSocket, refused: Refusal) -> None:
    """Send a refusal (made by ``refusal``, or the runner's passed on as it came)."""
    try:
        await client.send(refused.opening.text)
        await client.close(refused.opening.close_code, refused.opening.close_reason)
    except Exception:  # the client is gone already
        pass


@attrs.frozen
class TerminalTarget:
    """The runner of the task, as it registered, and the task."""

    node: str
    node_url: str
    task_id: int

    @property
    def url(self) -> str:
        return runner_ws_url(self.node, self.node_url, f"/ws/terminal/{self.task_id}", _unusable)

    def endpoint(self) -> Endpoint:
        return runner_endpoint(self.node, self.node_url, f"/ws/terminal/{self.task_id}", _unusable)


def _unusable(message: str) -> Refusal:
    return refusal(RefusalCode.RUNNER_UNAVAILABLE, message)


async def run_terminal(
    client: ClientSocket, target: TerminalTarget, cluster_token: str, deadline: float
) -> None:
    """Serve one accepted client WebSocket until the session ends. Every refusal is answered here."""
    try:
        code, reason = await _session(client, target, cluster_token, deadline)
    except Refusal as refused:
        log.info("terminal on task %d refused: %s", target.task_id, refused.reason)
        await refuse(client, refused)
        return
    log.info("terminal on task %d ended (%d)", target.task_id, code)
    await client.close(code, reason)


async def _start_request(client: ClientSocket) -> str:
    message = await client.receive()
    try:
        parse_start(message)
    except ProtocolError as exc:
        raise refusal(RefusalCode.BAD_REQUEST, f"bad start request: {exc}") from None
    assert isinstance(message, str)  # parse_start accepts text only
    return message


async def _session(
    client: ClientSocket, target: TerminalTarget, cluster_token: str, deadline: float
) -> tuple[int, str]:
    result: tuple[int, str] | Refusal | None = None
    start: str | None = None
    with trio.CancelScope(deadline=deadline) as setup:
        start = await _start_request(client)
        endpoint = target.endpoint()
        try:
            stream = await open_runner_stream(target, endpoint)  # type: ignore[arg-type]  # uses .node only
        except Refusal as exc:  # the forward relay's words: said again in the terminal's
            assert exc.code is not None
            raise refusal(exc.code, exc.reason) from None
        try:
            async with trio.open_nursery() as nursery:
                runner = await runner_websocket(nursery, stream, endpoint, cluster_token)
                try:
                    result = await _answer_and_pipe(client, runner, target, start, setup, deadline)
                finally:
                    await close_runner(runner)
                    nursery.cancel_scope.cancel()
        except* ConnectionRejected as group:
            result = _rejected(group, target)
        finally:
            await trio.aclose_forcefully(stream)
    if result is None and start is None:  # only the setup deadline ends the block without a result
        result = refusal(RefusalCode.BAD_REQUEST, "no start request in time")
    elif result is None:
        result = refusal(RefusalCode.RUNNER_UNAVAILABLE, f"node {target.node} did not answer in time")
    if isinstance(result, Refusal):
        raise result
    return result


def _rejected(group: BaseExceptionGroup, target: TerminalTarget) -> Refusal:
    exc = group.exceptions[0]
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    assert isinstance(exc, ConnectionRejected)
    detail = body_message(exc.body or b"")
    return refusal(
        RefusalCode.RUNNER_UNAVAILABLE,
        f"node {target.node} refused the terminal: HTTP {exc.status_code}" + (f" {detail}" if detail else ""),
    )


async def _answer_and_pipe(
    client: ClientSocket,
    runner: WebSocketConnection,
    target: TerminalTarget,
    start: str,
    setup: trio.CancelScope,
    deadline: float,
) -> tuple[int, str] | Refusal:
    try:
        await runner.send_message(start)
        first = await runner.get_message()
    except ConnectionClosed as exc:
        code = exc.reason.code if exc.reason else None
        reason = f"node {target.node} closed the terminal without an answer (code {code})"
        return refusal(RefusalCode.RUNNER_UNAVAILABLE, reason)
    setup.deadline = math.inf
    try:
        answer = terminal_answer(first)
    except RemoteProtocolError:
        reason = f"node {target.node} answered the terminal with an unexpected message"
        return refusal(RefusalCode.RUNNER_UNAVAILABLE, reason)
    if isinstance(answer, Connected):
        await client.send(first)
        log.info("terminal on task %d on %s started", target.task_id, target.node)
        return await pipe(client, runner)
    return await runner_refusal(answer, runner, deadline)
