"""Task output through the host: the stdout/stderr tail (HTTP) and the follow WebSocket, both proxied from
the runner that runs (or ran) the task. The host stores no logs itself.

- ``GET /api/tasks/{id}/stdout|stderr?lines=N``: text/plain, streamed through as the runner sends it. A task
  that never reached a node has no output: the answer is empty, not an error.
- ``WS /ws/tasks/{id}/logs?stream=stdout|stderr&lines=N&binary=0|1``: the last N lines, then new output as
  it comes. A queued task is waited for. The socket closes with 1000 when the task has ended and its
  output is sent.

Decisions:

- ``binary=1`` sends the output as binary messages, the runner's bytes exactly as they came; without it
  (the default, what clients from before it ask for) as text messages, decoded as UTF-8 with invalid
  bytes replaced by U+FFFD and a character split between two chunks kept whole. A task's output is bytes
  (a tool printing Latin-1, a binary dump), and ``kr`` writes it to a terminal or a pipe as bytes, so the
  CLI asks for binary; a browser that shows text keeps getting text. Control stays out of band either way:
  the only thing besides output is the close frame.
- A refusal before the socket is accepted (bad token, wrong role, unknown or another user's task, bad
  query) is an HTTP answer with the JSON error and its status, as on every other route. Once the socket
  is open, the close frame says how it ended: 1000 with ``task <status>`` when the output is complete,
  otherwise a refusal close of ``kohakuriver_proto.session_opening`` whose reason is exactly a
  ``RefusalCode`` name: 1008 ``not_found`` (the task is gone: do not reconnect), 1011
  ``runner_unavailable`` (the runner's stream broke or the runner refused it while the task runs, or its
  saved output cannot be reached now: reconnecting may work). Clients decide by the code, or by the close
  code alone when there is none (an older host put prose there); the details go to the host's log.
"""

from __future__ import annotations

import codecs
import logging
from collections.abc import AsyncIterator, Callable

import httpx
import trio
from quart import Response, websocket

from kohakuriver_net.task_steps import step
from kohakuriver_proto.lifecycle import FINAL
from kohakuriver_proto.session_opening import RefusalCode

from .api_common import ApiProblem, unavailable
from .auth import Principal
from .context import HostContext
from .runner_client import RunnerRefused, RunnerUnavailable
from .store import ReadTx, TaskRow
from .tasks_service import visible_task

log = logging.getLogger("kohakuriver.host.logs")

POLL_SECONDS = 0.5
#: After the runner's follow stream ends, how long to wait for the task's final status to arrive.
END_GRACE_SECONDS = 5.0
CLOSE_TIMEOUT = 2.0


def _final(row: TaskRow) -> bool:
    return row.status in FINAL


async def _refuse(code: RefusalCode, detail: str, task_id: int) -> None:
    """Close the follow socket as a refusal: the close code of ``code`` and its name as the reason."""
    log.info("log follow of task %d ends with %s: %s", task_id, code.value, detail)
    await websocket.close(code.close_code, code.value)


def _binary_requested() -> bool:
    return websocket.args.get("binary", "").lower() in ("1", "true", "yes")


async def _close_response(response: httpx.Response) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
        await response.aclose()


async def tail(host: HostContext, who: Principal, task_id: int, stream: str, lines: int | None) -> Response:
    row = await visible_task(host, who, task_id)
    empty = Response("", content_type="text/plain; charset=utf-8")
    if row.assigned_node is None:
        return empty
    node = await host.store.read(ReadTx.get_node, row.assigned_node)
    if node is None:
        return empty
    if node.status != "online":
        raise unavailable(
            f"node {node.hostname} is offline: the output of task {task_id} is not reachable now"
        )
    try:
        upstream = await host.runners.open_logs(node.url, task_id, stream=stream, lines=lines, follow=False)
    except RunnerRefused as exc:
        if exc.status == 404:  # the runner never created it (refused, failed while preparing)
            return empty
        raise ApiProblem(502, "unavailable", f"node {node.hostname}: {exc.message}") from None
    except RunnerUnavailable as exc:
        raise unavailable(f"cannot reach node {node.hostname}: {exc.message}") from None

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in upstream.aiter_bytes():
                yield chunk
        except httpx.HTTPError as exc:  # the runner went away mid-answer: end what we have
            log.info("log tail of task %d from %s cut short: %s", task_id, node.hostname, exc)
        finally:
            await _close_response(upstream)

    return Response(body(), content_type="text/plain; charset=utf-8")


async def follow(host: HostContext, who: Principal, task_id: int, stream: str, lines: int | None) -> None:
    """Serve the follow WebSocket (called before ``accept``: a refusal is still an HTTP answer)."""
    await visible_task(host, who, task_id)
    binary = _binary_requested()
    await websocket.accept()
    while True:
        row = await host.store.read(ReadTx.get_task, task_id)
        if row is None:
            await _refuse(RefusalCode.NOT_FOUND, "the task is gone", task_id)
            return
        node = await host.store.read(ReadTx.get_node, row.assigned_node) if row.assigned_node else None
        if node is None or node.status != "online":
            if _final(row):
                await websocket.close(1000, f"task {row.status}")
                return
            # Queued, or its node is away: wait for it (a status change wakes this at once; a node that
            # comes back is seen at the next look).
            seen = row.status
            await _row_when(host, task_id, row, lambda now, seen=seen: now.status != seen, POLL_SECONDS)
            continue
        try:
            upstream = await host.runners.open_logs(
                node.url, task_id, stream=stream, lines=lines, follow=not _final(row)
            )
        except RunnerRefused as exc:
            if exc.status == 404 and not _final(row):
                await trio.sleep(POLL_SECONDS)  # dispatched but not started yet (image pull)
                continue
            if exc.status == 404:
                await websocket.close(1000, f"task {row.status}")
            else:
                await _refuse(RefusalCode.RUNNER_UNAVAILABLE, f"{node.hostname}: {exc.message}", task_id)
            return
        except RunnerUnavailable as exc:
            if _final(row):
                await _refuse(RefusalCode.RUNNER_UNAVAILABLE, f"{node.hostname}: {exc.message}", task_id)
                return
            log.debug("follow of task %d: %s unreachable (%s), retrying", task_id, node.hostname, exc.message)
            await trio.sleep(POLL_SECONDS)
            continue
        try:
            broke = await _pump(upstream, binary)
        finally:  # also when the client goes away and this handler is cancelled
            await _close_response(upstream)
        if not broke:
            # The runner's stream ends when the engine has closed the container's log, about when the
            # runner's report of the exit reaches the store (either may come first): close right after.
            row = await _row_when(host, task_id, row, _final, END_GRACE_SECONDS)
        step(task_id, f"host.follow_{stream}_ended")
        if _final(row):
            await websocket.close(1000, f"task {row.status}")
            step(task_id, f"host.follow_{stream}_closed")
        else:
            detail = f"{node.hostname}: the stream {'broke' if broke else 'ended'} while the task runs"
            await _refuse(RefusalCode.RUNNER_UNAVAILABLE, detail, task_id)
        return


async def _row_when(
    host: HostContext, task_id: int, row: TaskRow, done: Callable[[TaskRow], bool], timeout: float
) -> TaskRow:
    """The task's row once ``done`` says so, or as it is after ``timeout`` seconds; woken by the store's
    status watch (no polling)."""
    watch = host.store.status_watch
    deadline = trio.current_time() + timeout
    while True:
        # Subscribe before reading: a change committed between the read and the wait still wakes us.
        slot = watch.subscribe(task_id)
        try:
            row = await host.store.read(ReadTx.get_task, task_id) or row
        except BaseException:
            watch.release(task_id, slot)
            raise
        left = deadline - trio.current_time()
        if done(row) or left <= 0:
            watch.release(task_id, slot)
            return row
        await watch.wait(task_id, slot, left)


async def _pump(upstream: httpx.Response, binary: bool) -> bool:
    """Copy the runner's stream into messages (binary: the bytes; else text); True if it broke instead of
    ending."""
    if binary:
        try:
            async for chunk in upstream.aiter_bytes():
                if chunk:
                    await websocket.send(chunk)
        except httpx.HTTPError:
            return True
        return False
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    try:
        async for chunk in upstream.aiter_bytes():
            text = decoder.decode(chunk)
            if text:
                await websocket.send(text)
    except httpx.HTTPError:
        return True
    rest = decoder.decode(b"", final=True)
    if rest:
        await websocket.send(rest)
    return False
