"""A TCP relay that publishes a VM's sshd on the runner, as Docker publishes a container's port 22.

A Docker VPS has port 22 on ``RUNNER_BIND_IP:<ssh port>`` (``vps_spec``), and the host's SSH proxy connects
there. A VM's sshd is at ``<vm address>:22`` on the VM bridge, which the host cannot reach; so the runner
listens on ``RUNNER_BIND_IP:<ssh port>`` itself and relays each connection to the VM. Nothing of SSH is
read: the bytes pass through ``kohakuriver_net.splice`` (kernel ``splice(2)`` on Linux), with half-close,
so the host side sees exactly what it would see from a published container port.

The target is asked per connection (``target()``): the VM's address may be unknown yet (booting) or gone
(stopped), and a relay need not be restarted when it changes. ``None`` closes the connection at once, as a
published port of a stopped container would refuse it.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable
from functools import partial

import trio

from kohakuriver_net.splice import pipe_both_ways

__all__ = ["serve_relay"]

log = logging.getLogger("kohakuriver.runner.vm_port_relay")

Target = Callable[[], tuple[str, int] | None]


def _no_delay(stream: trio.SocketStream) -> None:
    # Interactive SSH: a keystroke must not wait for Nagle (trio sets it on TCP streams already; said here
    # because the relay depends on it).
    with contextlib.suppress(OSError):
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _relay_one(client: trio.SocketStream, target: Target, connect_timeout: float, label: str) -> None:
    async with client:
        try:
            where = target()
        except Exception:
            log.exception("%s: asking for the VM's address failed; closing the connection", label)
            return
        if where is None:
            log.debug("%s: no VM to relay to; connection closed", label)
            return
        host, port = where
        upstream: trio.SocketStream | None = None
        with trio.move_on_after(connect_timeout):
            try:
                upstream = await trio.open_tcp_stream(host, port)
            except OSError as exc:
                log.info("%s: cannot reach %s:%s: %s", label, host, port, exc)
                return
        if upstream is None:
            log.info("%s: %s:%s did not answer within %.0f s", label, host, port, connect_timeout)
            return
        moved = [0, 0]

        def up(n: int) -> None:
            moved[0] += n

        def down(n: int) -> None:
            moved[1] += n

        outcome = "closed"
        async with upstream:
            _no_delay(client)
            _no_delay(upstream)
            try:
                await pipe_both_ways(client, upstream, a_to_b=up, b_to_a=down)
            except* (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as group:
                # A reset from either side ends the connection (the other direction was cancelled with it).
                outcome = f"aborted ({group.exceptions[0]!r})"
            finally:
                log.debug("%s -> %s:%s %s: %d bytes up, %d down", label, host, port, outcome, *moved)


async def serve_relay(
    listen_host: str,
    listen_port: int,
    target: Target,
    *,
    connect_timeout: float = 10.0,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``listen_host:listen_port`` and relay every connection to ``target()`` until cancelled.

    ``task_status.started(port)`` once listening, with the port bound (useful with ``listen_port=0``); a
    bind error raises before that. Per connection: ``target()`` (None: closed at once), a connect bounded
    by ``connect_timeout`` (on failure the connection is closed), then both directions relayed with
    half-close until both have ended. Cancelling closes the listener and every connection."""
    listeners = await trio.open_tcp_listeners(listen_port, host=listen_host)
    port = listeners[0].socket.getsockname()[1]
    label = f"relay {listen_host}:{port}"

    async def handle(client: trio.SocketStream) -> None:
        try:
            await _relay_one(client, target, connect_timeout, label)
        except Exception:
            # One connection's failure must not end the relay (serve_listeners would take it down).
            log.exception("%s: connection failed", label)

    try:
        async with trio.open_nursery() as nursery:
            # The handlers run in this nursery too: leaving it (cancelled) closes every connection.
            nursery.start_soon(partial(trio.serve_listeners, handle, listeners, handler_nursery=nursery))
            log.info("%s: listening", label)
            task_status.started(port)
    finally:
        for listener in listeners:
            listener.socket.close()  # idempotent; here in case the accept loop never started
        log.info("%s: closed", label)
