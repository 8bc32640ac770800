"""A byte relay between two sockets with half-close, through the kernel where it can.

Used by the host's SSH proxy and forward splice, and by ``kr ssh`` (stdin/stdout <-> the proxy). On Linux
the bytes move socket -> pipe -> socket with ``splice(2)``: no copy through Python, one call per chunk in
each direction, waits through trio. Elsewhere the streams are copied in ``CHUNK``-sized reads.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable
from functools import partial

import trio

__all__ = ["CHUNK", "HAVE_SPLICE", "SPLICE_CHUNK", "grow_pipe", "pipe_both_ways", "relay", "splice_fds"]

CHUNK = 256 * 1024


#: Linux moves the bytes socket -> pipe -> socket inside the kernel (no copy into Python, no allocation);
#: elsewhere the streams are copied in CHUNK-sized reads.
HAVE_SPLICE = hasattr(os, "splice")
SPLICE_CHUNK = 1 << 20


def _ignore(_n: int) -> None:
    pass


def grow_pipe(fd: int, size: int = SPLICE_CHUNK) -> None:
    """Ask for a ``size``-byte pipe buffer (64 KiB by default): fewer, larger moves per bulk transfer. The
    kernel may refuse (``pipe-max-size``, per-user limits); the default buffer still works."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), size)


async def splice_fds(src: int, dst: int, count: Callable[[int], None] = _ignore) -> None:
    """Move bytes from fd ``src`` to fd ``dst`` (non-blocking sockets or pipes) until EOF on ``src``, through
    a kernel pipe with ``splice(2)``. Waits are trio's, so it is cancellable and never blocks the loop.

    Not a worker thread in blocking ``splice`` (tried, measured with ``bench/tunnel.py``): it halved the
    host's cost per idle round trip, but under a bulk transfer the busy direction's thread kept retaking the
    GIL, so the other direction waited out 5 ms switch intervals (interactive p99 64-262 ms, downstream
    throughput -15%). In ``kr up`` the host shares its GIL with the runner's busy loop, which is worse."""
    flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
    pipe_r, pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    grow_pipe(pipe_w)
    try:
        waited = False
        while True:
            try:
                n = os.splice(src, pipe_w, SPLICE_CHUNK, flags=flags)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(src)
                waited = True
                continue
            if n == 0:
                return
            left = n
            while left:
                try:
                    left -= os.splice(pipe_r, dst, left, flags=flags)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(dst)
                    waited = True
            count(n)
            if n < SPLICE_CHUNK:
                # Less than asked for: the socket is (almost surely) drained, so wait for more instead of
                # asking once more for an EAGAIN. A wrong guess costs nothing: epoll says ready at once.
                await trio.lowlevel.wait_readable(src)
            elif not waited:
                # A busy tunnel may never find its socket empty: let other tasks (and cancellation) in, unless
                # this round already waited (one more scheduler pass would only add latency and CPU).
                await trio.lowlevel.checkpoint()
            waited = False
    finally:
        os.close(pipe_r)
        os.close(pipe_w)


async def relay(
    src: trio.SocketStream,
    dst: trio.SocketStream,
    *,
    first: bytes = b"",
    src_done: bool = False,
    count: Callable[[int], None] = _ignore,
) -> None:
    """``first``, then everything ``src`` sends, to ``dst``; then half-close ``dst`` (``send_eof``)."""
    if first:
        await dst.send_all(first)
        count(len(first))
    if not src_done:
        if HAVE_SPLICE:
            await splice_fds(src.socket.fileno(), dst.socket.fileno(), count)
        else:
            while data := await src.receive_some(CHUNK):
                await dst.send_all(data)
                count(len(data))
    await dst.send_eof()


async def pipe_both_ways(
    a: trio.SocketStream,
    b: trio.SocketStream,
    *,
    first: bytes = b"",
    a_done: bool = False,
    a_to_b: Callable[[int], None] = _ignore,
    b_to_a: Callable[[int], None] = _ignore,
) -> None:
    """Relay both directions with half-close; ``first`` (already read from ``a``) goes to ``b`` first.
    Returns when both directions reached EOF; if one fails, the other is cancelled and the error raised."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(relay, a, b, first=first, src_done=a_done, count=a_to_b))
        nursery.start_soon(partial(relay, b, a, count=b_to_a))
