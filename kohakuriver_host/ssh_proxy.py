"""The host's SSH proxy (``HOST_SSH_PROXY_PORT``, 8002): ``REQUEST_TUNNEL <task_id>[ <token>]\\n``, then a raw
byte pipe to the VPS's SSH port on its runner (DESIGN section 5).

The handshake itself is ``kohakuriver_proto.ssh_handshake`` (``ServerHandshake`` parses the line, builds the
reply; ``check_tunnel_target`` says why a tunnel is refused, in the order that leaks nothing); this module
binds it to sockets:

1. accept; refuse with ``ERROR`` at once when ``SSH_PROXY_MAX_PENDING_HANDSHAKES`` connections are already
   in their handshake (a flood of idle connections cannot pile up tasks and sockets);
2. read the request line within ``SSH_PROXY_HANDSHAKE_TIMEOUT_SECONDS``;
3. with a token: authenticate it (an unknown or revoked token is refused before anything about the task is
   said); look the task up in the store and its node in the node registry; a token holder must be allowed to
   *reach* the task (owner with role user+, or operator/admin);
4. connect to the runner's address (host part of the node's registered URL) at the VPS's ``ssh_port``
   within ``FORWARD_CONNECT_TIMEOUT_SECONDS``; reply ``SUCCESS`` or ``ERROR <message>``;
5. forward the bytes the client sent after its line, then pipe both ways. EOF on one side becomes
   ``send_eof`` on the other (half-close: ``scp`` and ``ssh host cmd < file`` rely on it); the tunnel ends
   when both directions are done, or at once when either side fails;
6. one log line per tunnel when it ends: task, user, peer, bytes each way, duration.

Without a token (``REQUEST_TUNNEL <id>``, the seed's form, what hand-written ``ProxyCommand nc ...`` setups
send) the request is accepted when ``allow_unauthenticated`` is True, the default: it only opens a TCP path
to the VPS's sshd, which authenticates the user by key itself. ``kr ssh`` always sends the token.

Throughput: each direction is one task; on Linux the bytes move socket -> pipe -> socket with ``splice(2)``
(``kohakuriver_net.splice``: no copy through Python, one call per chunk in each direction, waits through
trio), elsewhere ``receive_some`` / ``send_all``. Nothing per chunk but a byte count.
"""

from __future__ import annotations

import errno
import logging
from typing import Any
from urllib.parse import urlsplit

import attrs
import trio

from kohakuriver_net.splice import pipe_both_ways
from kohakuriver_proto.errors import ProtocolError
from kohakuriver_proto.ssh_handshake import (
    NEED_DATA,
    RejectReason,
    ServerHandshake,
    TunnelRequest,
    check_tunnel_target,
)

from . import auth
from .api_common import principal_for
from .auth import Principal, TaskAction
from .context import HostContext
from .store import ReadTx

log = logging.getLogger("kohakuriver.host.ssh_proxy")

#: Bytes per read when piping. Large reads keep the per-byte cost of the Python loop negligible.
HANDSHAKE_READ = 4096
#: After an ERROR reply: how long to drain what the client still sends, so closing does not turn into a
#: TCP reset that could destroy the ERROR line before the client read it.
LINGER_SECONDS = 1.0
LINGER_BYTES = 64 * 1024
BUSY_MESSAGE = "the SSH proxy is busy (too many connections in their handshake): try again"
BAD_TOKEN_MESSAGE = "invalid or revoked API token"


def _lost_with_its_node(row: Any, node_name: str | None, node_online: bool) -> bool:
    """A VPS that is ``lost`` because its node is offline (not one that failed in another way)."""
    return row.task_type == "vps" and row.status == "lost" and node_name is not None and not node_online


class _Refused(Exception):
    """The tunnel is refused; ``str(exc)`` is the ERROR line's message."""


@attrs.define
class _Tunnel:
    """What the log line of one tunnel says."""

    peer: str
    task_id: int | None = None
    user: str = "-"
    up: int = 0  # client -> VPS
    down: int = 0  # VPS -> client


def runner_address(url: str) -> str | None:
    """The host part of a runner URL (``http://10.0.0.5:8001`` -> ``10.0.0.5``), None if it has none."""
    try:
        return urlsplit(url).hostname or None
    except ValueError:
        return None


def describe_connect_error(exc: BaseException) -> str:
    """A short reason for a failed connect (trio wraps the per-address errors in its own OSError)."""
    seen: list[BaseException] = [exc]
    while seen:
        current = seen.pop(0)
        if isinstance(current, OSError) and current.errno is not None:
            if current.errno == errno.ECONNREFUSED:
                return "connection refused"
            return current.strerror or str(current)
        if isinstance(current, BaseExceptionGroup):
            seen.extend(current.exceptions)
        if current.__cause__ is not None:
            seen.append(current.__cause__)
    return str(exc) or type(exc).__name__


class SshProxy:
    """One per host: the handshake bound and the per-connection handler."""

    def __init__(self, host: HostContext, *, allow_unauthenticated: bool = True) -> None:
        self.host = host
        config = host.config
        self.handshake_timeout = float(config.SSH_PROXY_HANDSHAKE_TIMEOUT_SECONDS)
        self.connect_timeout = float(config.FORWARD_CONNECT_TIMEOUT_SECONDS)
        self.max_pending = int(config.SSH_PROXY_MAX_PENDING_HANDSHAKES)
        self.allow_unauthenticated = allow_unauthenticated
        self.pending = 0  # connections between accept and their reply
        self.active = 0  # tunnels piping

    # -- per connection -----------------------------------------------------------------------------------

    async def handle(self, stream: trio.SocketStream) -> None:
        """``trio.serve_listeners`` handler: never raises (an exception would stop the whole server)."""
        tunnel = _Tunnel(peer=_peer(stream))
        try:
            async with stream:
                if self.pending >= self.max_pending:
                    log.warning("ssh proxy: refusing %s, %d handshakes pending", tunnel.peer, self.pending)
                    await self._refuse(stream, ServerHandshake(), BUSY_MESSAGE)
                    return
                self.pending += 1
                try:
                    target = await self._handshake(stream, tunnel)
                finally:
                    self.pending -= 1
                if target is not None:
                    await self._pipe(stream, target, tunnel)
        except Exception:  # a bug must cost one connection, not the server
            log.exception("ssh proxy: connection from %s failed", tunnel.peer)

    async def _handshake(
        self, stream: trio.SocketStream, tunnel: _Tunnel
    ) -> tuple[trio.SocketStream, bytes, bool] | None:
        """Read and check the request, connect to the VPS; reply. The target stream, the client's early
        bytes and whether it already sent EOF; None when refused (the reply was sent)."""
        hs = ServerHandshake()
        request: TunnelRequest | None = None
        with trio.move_on_after(self.handshake_timeout):
            try:
                request = await _read_request(stream, hs)
            except ProtocolError as exc:
                await self._refuse(stream, hs, str(exc))
                return None
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return None
        if request is None:
            message = f"no REQUEST_TUNNEL line within {self.handshake_timeout:g} s"
            await self._refuse(stream, hs, message)
            return None
        tunnel.task_id = request.task_id
        try:
            target = await self._open_target(request, tunnel)
        except _Refused as exc:
            log.info(
                "ssh proxy: %s refused for task %s (%s): %s", tunnel.peer, request.task_id, tunnel.user, exc
            )
            await self._refuse(stream, hs, str(exc))
            return None
        try:
            await stream.send_all(hs.send_success())
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await target.aclose()
            return None
        early, eof = hs.trailing_data
        return target, early, eof

    async def _open_target(self, request: TunnelRequest, tunnel: _Tunnel) -> trio.SocketStream:
        host = self.host
        who: Principal | None = None
        if request.token is None:
            if not self.allow_unauthenticated:
                raise _Refused(RejectReason.UNAUTHENTICATED.message())
        else:
            who = await self._principal(request.token)
            if who is None:
                raise _Refused(BAD_TOKEN_MESSAGE)
            tunnel.user = who.username
        row = await host.store.read(ReadTx.get_task, request.task_id)
        task_id = request.task_id
        node_name = row.assigned_node if row is not None else None
        entry = host.nodes.get(node_name) if node_name else None
        ssh_port = row.task.ssh_port if row is not None else None
        allowed = row is not None and (
            who is None or auth.can_act_on_task(who, row.owner_id, TaskAction.REACH)
        )
        node_online = entry is not None and entry.status == "online"
        refusal = check_tunnel_target(
            task_id=task_id,
            exists=row is not None,
            allowed=allowed,
            task_type=row.task_type if row is not None else None,
            status=row.status if row is not None else None,
            node=node_name,
            node_online=node_online,
            ssh_port=ssh_port if isinstance(ssh_port, int) and not isinstance(ssh_port, bool) else None,
        )
        if refusal is not None and allowed and _lost_with_its_node(row, node_name, node_online):
            # Liveness marks a VPS ``lost`` in the same write that marks its node offline, and the VPS comes
            # back when the node does: "node X is offline" is the reason, "not running (lost)" the symptom.
            refusal = RejectReason.NODE_OFFLINE.message(task_id=task_id, node=node_name)
        if refusal is not None:
            raise _Refused(refusal)
        assert entry is not None and isinstance(ssh_port, int)
        address = runner_address(entry.url)
        if address is None:
            raise _Refused(
                RejectReason.CONNECT_FAILED.message(
                    task_id=task_id, node=node_name, detail=f"the node's URL {entry.url!r} has no host"
                )
            )
        try:
            with trio.fail_after(self.connect_timeout):
                return await trio.open_tcp_stream(address, ssh_port)
        except trio.TooSlowError:
            detail = f"no answer within {self.connect_timeout:g} s"
        except OSError as exc:
            detail = describe_connect_error(exc)
        raise _Refused(RejectReason.CONNECT_FAILED.message(task_id=task_id, node=node_name, detail=detail))

    async def _principal(self, token: str) -> Principal | None:
        """The user behind an API token (the HTTP API's rules and cache: ``api_common.principal_for``)."""
        try:
            return await principal_for(self.host, f"Bearer {token}")
        except auth.Unauthorized:
            return None

    async def _refuse(self, stream: trio.SocketStream, hs: ServerHandshake, message: str) -> None:
        """Send ``ERROR <message>``, half-close, and drain briefly so the line is not lost to a reset."""
        with trio.move_on_after(LINGER_SECONDS):
            try:
                await stream.send_all(hs.send_error(message))
                await stream.send_eof()
                drained = 0
                while drained < LINGER_BYTES:
                    data = await stream.receive_some(HANDSHAKE_READ)
                    if not data:
                        break
                    drained += len(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass

    # -- the pipe -------------------------------------------------------------------------------------------

    async def _pipe(
        self, client: trio.SocketStream, target_info: tuple[trio.SocketStream, bytes, bool], tunnel: _Tunnel
    ) -> None:
        target, early, client_eof = target_info
        start = trio.current_time()
        self.active += 1
        log.info("ssh tunnel open: task %s, user %s, from %s", tunnel.task_id, tunnel.user, tunnel.peer)
        outcome = "closed"

        def up(n: int) -> None:
            tunnel.up += n

        def down(n: int) -> None:
            tunnel.down += n

        try:
            async with target:
                try:
                    await pipe_both_ways(
                        client, target, first=early, a_done=client_eof, a_to_b=up, b_to_a=down
                    )
                except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as group:
                    # One side reset or vanished: the other direction was cancelled with it.
                    outcome = f"aborted ({describe_connect_error(group.exceptions[0])})"
        finally:
            self.active -= 1
            log.info(
                "ssh tunnel %s: task %s, user %s, from %s, %d bytes up, %d bytes down, %.2f s",
                outcome,
                tunnel.task_id,
                tunnel.user,
                tunnel.peer,
                tunnel.up,
                tunnel.down,
                trio.current_time() - start,
            )


async def _read_request(stream: trio.SocketStream, hs: ServerHandshake) -> TunnelRequest:
    while (event := hs.next_event()) is NEED_DATA:
        hs.receive_data(await stream.receive_some(HANDSHAKE_READ))
    assert isinstance(event, TunnelRequest)
    return event


def _peer(stream: trio.SocketStream) -> str:
    try:
        address = stream.socket.getpeername()
    except OSError:
        return "?"
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)


async def serve_ssh_proxy(
    host: HostContext,
    port: int,
    *,
    bind_ip: str | None = None,
    allow_unauthenticated: bool = True,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the SSH proxy on ``bind_ip`` (default ``HOST_BIND_IP``) and ``port`` (0: any free port) until
    cancelled. ``task_status.started`` gets the bound port."""
    bind = host.config.HOST_BIND_IP if bind_ip is None else bind_ip
    try:
        listeners = await trio.open_tcp_listeners(port, host=bind, backlog=None)
    except OSError as exc:
        raise OSError(
            exc.errno, f"the SSH proxy cannot listen on {bind}:{port} (HOST_SSH_PROXY_PORT): {exc.strerror}"
        ) from exc
    bound = listeners[0].socket.getsockname()[1]
    proxy = SshProxy(host, allow_unauthenticated=allow_unauthenticated)
    log.info("SSH proxy listening on %s:%d", bind, bound)
    await trio.serve_listeners(proxy.handle, listeners, task_status=_Started(task_status, bound))


@attrs.frozen
class _Started:
    """Hands the port, not trio's listener list, to whoever started the proxy."""

    inner: Any
    port: int

    def started(self, _value: Any = None) -> None:
        self.inner.started(self.port)


__all__ = [
    "SshProxy",
    "describe_connect_error",
    "runner_address",
    "serve_ssh_proxy",
]
