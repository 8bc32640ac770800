"""Task output through the host: the stdout/stderr tail (HTTP) and the follow WebSocket, both proxied from
the runner that runs (or ran) the task. The host stores no logs itself.

- ``GET /api/tasks/{id}/stdout|stderr?lines=N``: text/plain, streamed through as the runner sends it. A task
  that never reached a node has no output: the answer is empty, not an error.
- ``WS /ws/tasks/{id}/logs?stream=stdout|stderr&lines=N``: the last N lines, then new output as it comes, as
  text messages. A queued task is waited for. The socket closes with 1000 when the task has ended and its
  output is sent, and with 1011 when the runner's stream broke while the task still runs (the client may
  reconnect).
"""

from __future__ import annotations

import codecs
import logging
from collections.abc import AsyncIterator

import httpx
import trio
from quart import Response, websocket

from kohakuriver_proto.lifecycle import FINAL

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
    await websocket.accept()
    while True:
        row = await host.store.read(ReadTx.get_task, task_id)
        if row is None:
            await websocket.close(1011, "the task is gone")
            return
        node = await host.store.read(ReadTx.get_node, row.assigned_node) if row.assigned_node else None
        if node is None or node.status != "online":
            if _final(row):
                await websocket.close(1000, f"task {row.status}")
                return
            await trio.sleep(POLL_SECONDS)  # queued, or its node is away: wait for it
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
                await websocket.close(1011, f"runner: {exc.message}"[:120])
            return
        except RunnerUnavailable as exc:
            if _final(row):
                await websocket.close(1011, f"cannot reach node {node.hostname}"[:120])
                return
            log.debug("follow of task %d: %s unreachable (%s), retrying", task_id, node.hostname, exc.message)
            await trio.sleep(POLL_SECONDS)
            continue
        try:
            broke = await _pump(upstream)
        finally:  # also when the client goes away and this handler is cancelled
            await _close_response(upstream)
        if not broke:
            with trio.move_on_after(END_GRACE_SECONDS):
                while not _final(row := await host.store.read(ReadTx.get_task, task_id) or row):
                    await trio.sleep(POLL_SECONDS / 5)
        if _final(row):
            await websocket.close(1000, f"task {row.status}")
        else:
            await websocket.close(1011, "the runner's log stream ended while the task still runs")
        return


async def _pump(upstream: httpx.Response) -> bool:
    """Copy the runner's stream into text messages; True if it broke instead of ending."""
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
