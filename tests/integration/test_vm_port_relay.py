"""The VM SSH relay with real TCP on 127.0.0.1: bytes both ways, half-close, refusals, cancellation."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from functools import partial

import pytest
import trio

from kohakuriver_runner.vm_port_relay import serve_relay

LOCAL = "127.0.0.1"


async def echo(stream: trio.SocketStream) -> None:
    async with stream:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)


async def reply_after_eof(stream: trio.SocketStream) -> None:
    """Reads everything until the client's EOF, then answers with what it got, reversed, and closes."""
    async with stream:
        got = bytearray()
        while data := await stream.receive_some(65536):
            got += data
        await stream.send_all(b"got " + bytes(reversed(got)))


@asynccontextmanager
async def tcp_server(handler: Callable[[trio.SocketStream], object]) -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host=LOCAL))
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def relay(
    target: Callable[[], tuple[str, int] | None], **kw: float
) -> AsyncIterator[tuple[int, trio.CancelScope]]:
    """A relay on an ephemeral port, and the cancel scope of the relay alone (not of the caller)."""
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[int]) -> None:
        with scope:
            await serve_relay(LOCAL, 0, target, task_status=task_status, **kw)

    async with trio.open_nursery() as nursery:
        port = await nursery.start(run)
        yield port, scope
        scope.cancel()


async def read_all(stream: trio.SocketStream) -> bytes:
    got = bytearray()
    with trio.fail_after(10):
        while data := await stream.receive_some(65536):
            got += data
    return bytes(got)


async def test_bytes_both_ways() -> None:
    async with tcp_server(echo) as upstream, relay(lambda: (LOCAL, upstream)) as (port, _):
        stream = await trio.open_tcp_stream(LOCAL, port)
        async with stream:
            assert stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            await stream.send_all(b"SSH-2.0-test\r\n")
            with trio.fail_after(10):
                assert await stream.receive_some(100) == b"SSH-2.0-test\r\n"

            # A few MiB at once, both directions busy at the same time.
            payload = os.urandom(4 * 1024 * 1024)
            received = bytearray()

            async def receive() -> None:
                while len(received) < len(payload):
                    received.extend(await stream.receive_some(1 << 20))

            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(receive)
                    await stream.send_all(payload)
            assert received == payload


async def test_half_close_both_ways() -> None:
    async with tcp_server(reply_after_eof) as upstream, relay(lambda: (LOCAL, upstream)) as (port, _):
        stream = await trio.open_tcp_stream(LOCAL, port)
        async with stream:
            await stream.send_all(b"abc")
            await stream.send_all(b"def")
            await stream.send_eof()  # our side is done; the answer must still come back
            assert await read_all(stream) == b"got fedcba"


async def test_each_connection_asks_the_target() -> None:
    async with tcp_server(echo) as first, tcp_server(reply_after_eof) as second:
        where: list[tuple[str, int] | None] = [(LOCAL, first)]
        async with relay(lambda: where[0]) as (port, _):
            a = await trio.open_tcp_stream(LOCAL, port)
            where[0] = (LOCAL, second)
            b = await trio.open_tcp_stream(LOCAL, port)
            async with a, b:
                await a.send_all(b"x")
                with trio.fail_after(10):
                    assert await a.receive_some(10) == b"x"
                await b.send_all(b"yz")
                await b.send_eof()
                assert await read_all(b) == b"got zy"


async def closed_at_once(port: int) -> None:
    stream = await trio.open_tcp_stream(LOCAL, port)
    async with stream:
        with trio.fail_after(5):
            with suppress(trio.BrokenResourceError):  # a reset is a close too
                assert await stream.receive_some(100) == b""


async def test_no_target_closes_at_once_and_the_relay_goes_on() -> None:
    calls = 0

    def nowhere() -> None:
        nonlocal calls
        calls += 1

    async with relay(nowhere) as (port, _):
        await closed_at_once(port)
        await closed_at_once(port)
    assert calls == 2


async def test_a_failing_target_closes_only_that_connection() -> None:
    async with tcp_server(echo) as upstream:
        answers: list[object] = [RuntimeError("boom"), (LOCAL, upstream)]

        def target() -> tuple[str, int] | None:
            answer = answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer  # type: ignore[return-value]

        async with relay(target) as (port, _):
            await closed_at_once(port)
            stream = await trio.open_tcp_stream(LOCAL, port)
            async with stream:
                await stream.send_all(b"still here")
                with trio.fail_after(10):
                    assert await stream.receive_some(100) == b"still here"


async def test_unreachable_target_closes_the_connection() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind((LOCAL, 0))
        dead = probe.getsockname()[1]
    async with relay(lambda: (LOCAL, dead)) as (port, _):
        await closed_at_once(port)


async def test_connect_timeout() -> None:
    # A listener whose accept queue is full drops new SYNs, so a connect to it hangs (all on loopback).
    full = socket.socket()
    full.bind((LOCAL, 0))
    full.listen(0)
    fillers = []
    try:
        for _ in range(8):
            filler = socket.socket()
            filler.setblocking(False)
            with suppress(BlockingIOError):
                filler.connect(full.getsockname())
            fillers.append(filler)
        async with relay(lambda: full.getsockname(), connect_timeout=0.3) as (port, _):
            start = trio.current_time()
            await closed_at_once(port)
            assert 0.25 <= trio.current_time() - start < 5
    finally:
        for filler in fillers:
            filler.close()
        full.close()


async def test_cancelling_closes_listener_and_connections() -> None:
    upstream_ended = trio.Event()
    reached_the_end = False

    async def hold(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(b"hello")
            try:
                while await stream.receive_some(100):
                    pass
            except trio.BrokenResourceError:
                pass
        upstream_ended.set()

    async with tcp_server(hold) as upstream, relay(lambda: (LOCAL, upstream)) as (port, scope):
        stream = await trio.open_tcp_stream(LOCAL, port)
        async with stream:
            with trio.fail_after(10):
                assert await stream.receive_some(100) == b"hello"
            scope.cancel()
            with trio.fail_after(5):
                with suppress(trio.BrokenResourceError):
                    assert await stream.receive_some(100) == b""
                await upstream_ended.wait()
        reached_the_end = True
    assert reached_the_end
    with pytest.raises(OSError) as caught:
        await trio.open_tcp_stream(LOCAL, port)
    assert caught.value.errno in (errno.ECONNREFUSED, None)


async def test_bind_error_raises_before_started() -> None:
    async with tcp_server(echo) as taken, trio.open_nursery() as nursery:
        with pytest.raises(OSError) as caught:  # from start() itself: nothing ran, nothing to group
            await nursery.start(
                lambda task_status: serve_relay(LOCAL, taken, lambda: None, task_status=task_status)
            )
        assert caught.value.errno == errno.EADDRINUSE
