"""The host's follow WebSocket for task output: ``binary=1`` relays the runner's bytes unchanged, and a
stream that ends without the task's end is closed with a refusal code (``session_opening``), against a real
``serve_host`` and the runner stand-in of ``_host_harness``."""

from __future__ import annotations

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from kohakuriver_host import logs_proxy

from ._host_harness import executed, fake_runner, quick_host


@pytest.fixture
async def host(tmp_path, monkeypatch):
    monkeypatch.setattr(logs_proxy, "END_GRACE_SECONDS", 0.3)
    async with quick_host(tmp_path, monkeypatch) as h:
        yield h


@pytest.fixture
async def runner(host):
    async with fake_runner(host.cluster_token) as r:
        yield r


async def _running_task(host, runner) -> str:
    await host.register("n1", runner.url)
    (task_id,) = await host.submit(command="printf")
    await executed(runner)
    await host.update(task_id, "running")
    return task_id


def _url(host, task_id: str, query: str) -> str:
    return host.handle.url.replace("http", "ws", 1) + f"/ws/tasks/{task_id}/logs?{query}"


async def _receive_all(ws) -> tuple[list, ConnectionClosed]:
    received = []
    with trio.fail_after(5):
        while True:
            try:
                received.append(await ws.get_message())
            except ConnectionClosed as closed:
                return received, closed


async def test_binary_messages_carry_the_bytes_unchanged(host, runner):
    task_id = await _running_task(host, runner)
    runner.logs[(task_id, "stdout")] = "start\n"
    feed = runner.follow_channel(task_id)
    headers = [(b"Authorization", f"Bearer {host.admin_token}".encode())]
    async with open_websocket_url(_url(host, task_id, "binary=1"), extra_headers=headers) as ws:
        await feed.send(b"\xff\xfe not UTF-8 \x80")
        await feed.send(b"caf\xc3")  # a character split between two chunks
        await feed.send(b"\xa9\n")
        await host.update(task_id, "completed", exit_code=0)
        await feed.aclose()
        received, closed = await _receive_all(ws)
    assert all(isinstance(m, bytes) for m in received)
    assert b"".join(received) == b"start\n\xff\xfe not UTF-8 \x80caf\xc3\xa9\n"
    assert closed.reason.code == 1000


async def test_text_messages_stay_the_default(host, runner):
    task_id = await _running_task(host, runner)
    runner.logs[(task_id, "stdout")] = ""
    feed = runner.follow_channel(task_id)
    headers = [(b"Authorization", f"Bearer {host.admin_token}".encode())]
    async with open_websocket_url(_url(host, task_id, "stream=stdout"), extra_headers=headers) as ws:
        await feed.send(b"ok \xff\n")
        await host.update(task_id, "completed", exit_code=0)
        await feed.aclose()
        received, closed = await _receive_all(ws)
    assert "".join(received) == "ok \ufffd\n" and closed.reason.code == 1000


async def test_a_stream_that_ends_while_the_task_runs_closes_with_a_code(host, runner):
    task_id = await _running_task(host, runner)
    runner.logs[(task_id, "stdout")] = "partial\n"
    feed = runner.follow_channel(task_id)
    headers = [(b"Authorization", f"Bearer {host.admin_token}".encode())]
    async with open_websocket_url(_url(host, task_id, "binary=1"), extra_headers=headers) as ws:
        await feed.aclose()  # the runner's stream ends, the task is still running
        received, closed = await _receive_all(ws)
    assert received == [b"partial\n"]
    assert (closed.reason.code, closed.reason.reason) == (1011, "runner_unavailable")
