"""Socket reads and writes for the forward data path with one trip through trio's scheduler per wait.

trio's own socket methods bracket every call with checkpoints: a read that first has to wait for data goes
through the scheduler twice (``wait_readable``, then a shielded checkpoint after the read) before its
caller sees the bytes. On the forward chain a 64-byte round trip makes about ten such reads in three trio
processes, and each scheduler pass costs tens of microseconds on a small machine (measured with
``bench/tunnel.py``: the scheduler, not the relaying, was most of each daemon's CPU per round trip).

These functions keep trio's guarantees with fewer passes: an operation that had to wait has already yielded
(and been cancellable) in ``wait_readable``/``wait_writable``, so it returns at once; one that completed
without waiting yields afterwards in a cancel-shielded checkpoint, as trio does, so a task that always finds
data still lets the others run. Cancellation is only seen before any byte moved (reads) or while waiting
(writes; as with trio's ``send_all``, a cancelled write may have sent part of the data).

The system calls are ``os.readv``/``os.read``/``os.writev`` on the socket's descriptor (non-blocking, as
trio sets it); Python ignores SIGPIPE, so a write to a closed peer raises ``BrokenPipeError`` (an
``OSError``), like every other failure here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import trio

__all__ = ["MAX_IOVECS", "receive_some", "recv_into", "send_now", "sendmsg_all", "unsent"]

#: At most this many buffers per ``writev`` (IOV_MAX is 1024 on Linux).
MAX_IOVECS = 512

_checkpoint_if_cancelled = trio.lowlevel.checkpoint_if_cancelled
_shielded_checkpoint = trio.lowlevel.cancel_shielded_checkpoint
_wait_readable = trio.lowlevel.wait_readable
_wait_writable = trio.lowlevel.wait_writable
# Module-level names, so a test can watch the system calls.
_read = os.read
_readv = os.readv
_writev = os.writev


async def recv_into(sock: trio.socket.SocketType, view: memoryview) -> int:
    """Read what is available (at least one byte, or 0 at end of stream) into ``view``."""
    await _checkpoint_if_cancelled()
    fd = sock.fileno()
    try:
        n = _readv(fd, [view])
    except BlockingIOError:
        while True:
            await _wait_readable(sock)
            try:
                return _readv(fd, [view])
            except BlockingIOError:  # woken without data (spurious, or another reader took it)
                continue
    await _shielded_checkpoint()
    return n


async def receive_some(sock: trio.socket.SocketType, max_bytes: int) -> bytes:
    """Up to ``max_bytes`` of what is available (``b""`` at end of stream)."""
    await _checkpoint_if_cancelled()
    fd = sock.fileno()
    try:
        data = _read(fd, max_bytes)
    except BlockingIOError:
        while True:
            await _wait_readable(sock)
            try:
                return _read(fd, max_bytes)
            except BlockingIOError:
                continue
    await _shielded_checkpoint()
    return data


async def sendmsg_all(sock: trio.socket.SocketType, parts: Sequence[bytes | bytearray | memoryview]) -> None:
    """Write every byte of ``parts``, many buffers per system call (a partial write continues from its
    first unsent byte)."""
    await _checkpoint_if_cancelled()
    fd = sock.fileno()
    views = [memoryview(p) for p in parts if len(p)]
    waited = False
    while views:
        try:
            sent = _writev(fd, views[:MAX_IOVECS])
        except BlockingIOError:
            await _wait_writable(sock)
            waited = True
            continue
        views = unsent(views, sent)
    if not waited:
        await _shielded_checkpoint()


def send_now(sock: trio.socket.SocketType, parts: Sequence[bytes | bytearray | memoryview]) -> list | None:
    """One non-blocking write of ``parts``, no scheduler involved: None when the socket took nothing (full,
    or failed: the next ordinary send reports the error), else what it did not take (usually nothing)."""
    views = [memoryview(p) for p in parts if len(p)]
    try:
        sent = _writev(sock.fileno(), views[:MAX_IOVECS])
    except OSError:
        return None
    return unsent(views, sent)


def unsent(views: list[memoryview], sent: int) -> list[memoryview]:
    """What is left of ``views`` once their first ``sent`` bytes went out: whole buffers dropped, a buffer
    written in part continues from its first unsent byte."""
    i = 0
    while i < len(views) and sent >= len(views[i]):
        sent -= len(views[i])
        i += 1
    rest = views[i:]
    if rest and sent:
        rest[0] = rest[0][sent:]
    return rest
