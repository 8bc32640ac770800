"""The host's half of a port-forward session: reach the task's runner, relay its answer, then pipe messages.

The host is a pipe here, not a tunnel endpoint. After the runner's ``CONNECTED`` every message (binary
tunnel frames, and whatever text a peer sends) goes through verbatim in both directions: the host neither
parses nor re-encodes frames, so the flow-control extension and any later one pass through untouched, and
the runner, which translates client ids, stays the only place where the protocol is interpreted.

Session shape (DESIGN section 4):

1. ``run_session`` connects to ``ws(s)://<runner>/ws/forward/<task_id>/<port>?proto=`` with the cluster
   token and waits for the runner's first text message, all before ``deadline`` (one cancel scope). TCP and
   TLS are opened here and handed to trio-websocket, so a refused connection or an untrusted certificate
   is reported at once by name instead of as a timeout.
2. ``CONNECTED`` is passed on and the pipe runs; ``Error: ...`` is passed on as the runner sent it, with its
   close code and close reason (the refusal code: ``kohakuriver_proto.session_opening``). Anything else, a
   refusal of the upgrade, an unreachable runner or the deadline is a ``Refusal`` coded
   ``runner_unavailable`` (1011): the caller sends ``Error: <reason>`` and closes.
3. The pipe: one task per direction. Each awaits the far side's send before reading the next message, so a
   slow reader on either end stops the host from reading the other end (backpressure down to TCP); what
   the host holds per session is a few messages in the libraries' small queues, never more.
4. The runner closing ends the pipe and closes the client with the runner's code and reason; the client
   going away cancels the handler, and the runner connection is closed on the way out.
"""

from __future__ import annotations

import json
import logging
import math
import ssl
import urllib.parse
from collections.abc import Callable
from typing import Protocol

import attrs
import httpx
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, WebSocketConnection, wrap_client_stream

from kohakuriver_proto import session_opening
from kohakuriver_proto.errors import RemoteProtocolError
from kohakuriver_proto.session_opening import (
    CONNECTED,
    Connected,
    RefusalCode,
    forward_answer,
    forward_refusal,
)

log = logging.getLogger("kohakuriver.host.forward")

#: Close codes of the contract: a request the host (or runner) will not serve, and a node or tunnel problem.
POLICY = session_opening.CLOSE_POLICY
UNAVAILABLE = session_opening.CLOSE_UNAVAILABLE
MESSAGE_TOO_BIG = 1009
#: Largest message accepted from the runner: the clients read at most 1 MiB, plus the 8-byte header; the
#: rest is slack for a peer that frames a little differently. Memory per session stays bounded by it.
MAX_MESSAGE_BYTES = 2 * 1024 * 1024
#: Runner -> host messages the client library may hold before it stops reading the socket.
RUNNER_QUEUE_MESSAGES = 4
#: Bytes per socket read from the runner. trio-websocket's 4 KiB default costs one loop turn per 4 KiB,
#: which capped a relay near 0.4 Gbit/s; 256 KiB reads take a 64 KiB frame (or several) in one go.
RECEIVE_BUFFER_BYTES = 256 * 1024
#: Time allowed for the closing handshake with the runner when a session ends.
CLOSE_TIMEOUT = 2.0
#: Time to hand the close frame to the kernel when the session is cancelled (it fits in the socket buffer).
CLOSE_FRAME_SECONDS = 0.1
#: Close reasons travel in a control frame: at most 123 bytes of UTF-8.
MAX_REASON_BYTES = session_opening.MAX_CLOSE_REASON
#: Codes a peer reports but that must never be sent in a close frame (RFC 6455 section 7.4.1).
_NOT_SENDABLE = {1005: 1000, 1006: UNAVAILABLE, 1015: UNAVAILABLE}


class ClientSocket(Protocol):
    """The user's side, as Quart's ``websocket`` object offers it (already accepted)."""

    async def receive(self) -> str | bytes: ...

    async def send(self, data: str | bytes) -> None: ...

    async def close(self, code: int, reason: str = "") -> None: ...


class Refusal(Exception):
    """A session that will not start. ``opening`` is what the client is sent (the text message, then the
    close with its code and reason): by default ``Error: <reason>`` closed with ``code``; a runner's own
    refusal is passed on as it came (``passed_on``), and its ``code`` is None when it carried none this
    version knows."""

    def __init__(
        self,
        code: RefusalCode | None,
        reason: str,
        *,
        opening: session_opening.Refusal | None = None,
    ) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        if opening is None:
            assert code is not None, "a refusal of the host's own has a code"
            opening = forward_refusal(code, reason)
        self.opening = opening

    @classmethod
    def passed_on(cls, refused: session_opening.Refused) -> Refusal:
        """The runner's refusal, to be sent on as the runner sent it."""
        return cls(refused.code, refused.reason, opening=refused.relayed())


@attrs.frozen
class Endpoint:
    """The pieces of a ``ws(s)://`` URL a connection is built from."""

    host: str  # for the socket and for TLS verification (an IPv6 address without brackets)
    port: int
    tls: bool
    netloc: str  # the Host header
    resource: str  # path and query


@attrs.frozen
class RunnerTarget:
    """Where the session goes: the node's API URL (as it registered) and what to forward there."""

    node: str
    node_url: str
    task_id: int
    port: int
    proto: str

    @property
    def url(self) -> str:
        """The runner's forward route. ``{container}`` is the decimal task id, which the runner resolves
        to the task's container (Docker) or VM, so the host needs no naming convention of the runner."""
        return runner_ws_url(self.node, self.node_url, self._route, _unusable)

    @property
    def _route(self) -> str:
        return f"/ws/forward/{self.task_id}/{self.port}?proto={self.proto}"

    def endpoint(self) -> Endpoint:
        return runner_endpoint(self.node, self.node_url, self._route, _unusable)


def _unusable(message: str) -> Refusal:
    return Refusal(RefusalCode.RUNNER_UNAVAILABLE, message)


def runner_ws_url(node: str, node_url: str, route: str, refused: Callable[[str], Exception]) -> str:
    """``ws(s)://`` + the runner's registered address + ``route``; ``refused(message)`` is raised for a URL
    that cannot be one (each protocol words its refusal its own way)."""
    scheme, sep, rest = node_url.rstrip("/").partition("://")
    ws_scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(scheme.lower())
    if not sep or ws_scheme is None or not rest:
        raise refused(f"node {node} has an unusable URL")
    return f"{ws_scheme}://{rest}{route}"


def runner_endpoint(node: str, node_url: str, route: str, refused: Callable[[str], Exception]) -> Endpoint:
    """Where to open the TCP (and TLS) connection for ``route`` on the runner, and what to ask for."""
    parts = urllib.parse.urlsplit(runner_ws_url(node, node_url, route, refused))
    tls = parts.scheme == "wss"
    try:
        port = parts.port or (443 if tls else 80)
    except ValueError:
        raise refused(f"node {node} has an unusable URL") from None
    if not parts.hostname:
        raise refused(f"node {node} has an unusable URL")
    target = f"{parts.path}?{parts.query}" if parts.query else parts.path
    return Endpoint(parts.hostname, port, tls, parts.netloc.rpartition("@")[2], target)


clip_reason = session_opening.clip_reason


def sendable_code(code: int | None) -> int:
    """The runner's close code as the host may repeat it to the client."""
    if code is None:
        return UNAVAILABLE
    return _NOT_SENDABLE.get(code, code)


async def refuse(client: ClientSocket, refusal: Refusal) -> None:
    """The one text message of a refused session, then the close that carries its code."""
    await client.send(refusal.opening.text)
    await client.close(refusal.opening.close_code, refusal.opening.close_reason)


# -- TLS ---------------------------------------------------------------------------------------------------

_ssl_context: ssl.SSLContext | None = None


async def _tls_context() -> ssl.SSLContext:
    """The same verification as the host's HTTP calls to runners (httpx's defaults, ``SSL_CERT_FILE``
    honoured), built once: loading the CA bundle is blocking file work, so it runs in a thread."""
    global _ssl_context
    if _ssl_context is None:
        _ssl_context = await trio.to_thread.run_sync(httpx.create_ssl_context)
    return _ssl_context


# -- the session -------------------------------------------------------------------------------------------


async def open_runner_stream(
    target: RunnerTarget, endpoint: Endpoint
) -> trio.SocketStream | trio.SSLStream[trio.SocketStream]:
    """TCP to the runner, and TLS with its handshake done here, so that a refused connection or a certificate
    the host does not trust is reported at once and by name (a WebSocket library would wait for the
    deadline). Shared by the message relay and ``forward_splice``."""
    try:
        stream = await trio.open_tcp_stream(endpoint.host, endpoint.port)
    except OSError as exc:
        raise Refusal(
            RefusalCode.RUNNER_UNAVAILABLE, f"cannot reach node {target.node}: {exc.strerror or exc}"
        ) from None
    if not endpoint.tls:
        return stream
    tls = trio.SSLStream(stream, await _tls_context(), server_hostname=endpoint.host, https_compatible=True)
    try:
        await tls.do_handshake()
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(stream)
        cause = exc.__cause__
        reason = getattr(cause, "verify_message", None) or getattr(cause, "reason", None) or cause or exc
        unreachable = f"cannot reach node {target.node}: TLS: {reason}"
        raise Refusal(RefusalCode.RUNNER_UNAVAILABLE, unreachable) from None
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return tls


#: The name ``terminal_relay`` imports.
_open_stream = open_runner_stream


# -- what the runner's answers mean (one place for both forward paths) -------------------------------------


def upgrade_refused(target: RunnerTarget, status: int, body: bytes) -> Refusal:
    """The runner answered the upgrade with an HTTP error."""
    detail = body_message(body)
    return Refusal(
        RefusalCode.RUNNER_UNAVAILABLE,
        f"node {target.node} refused the forward: HTTP {status}" + (f" {detail}" if detail else ""),
    )


def no_answer(target: RunnerTarget) -> Refusal:
    """The setup deadline passed before the runner's first message."""
    return Refusal(RefusalCode.RUNNER_UNAVAILABLE, f"node {target.node} did not answer in time")


def closed_without_answer(target: RunnerTarget, code: int | None) -> Refusal:
    reason = f"node {target.node} closed the forward without an answer (code {code})"
    return Refusal(RefusalCode.RUNNER_UNAVAILABLE, reason)


def unexpected_answer(target: RunnerTarget) -> Refusal:
    """The runner's first message is neither ``CONNECTED`` nor ``Error: ...``: a broken runner."""
    return Refusal(
        RefusalCode.RUNNER_UNAVAILABLE, f"node {target.node} answered the forward with an unexpected message"
    )


def runner_answer(target: RunnerTarget, first: str | bytes) -> session_opening.Refusing | None:
    """None when the runner's first message is ``CONNECTED``; its refusal, whose close is still to be read;
    ``Refusal`` for anything else."""
    try:
        answer = forward_answer(first)
    except RemoteProtocolError:
        raise unexpected_answer(target) from None
    return None if isinstance(answer, Connected) else answer


def _rejected(group: BaseExceptionGroup, target: RunnerTarget) -> Refusal:
    exc = group.exceptions[0]
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    assert isinstance(exc, ConnectionRejected)
    return upgrade_refused(target, exc.status_code, exc.body or b"")


def body_message(raw: bytes) -> str:
    """The ``message`` of a JSON error body, else the start of the body."""
    try:
        body = json.loads(raw)
        if isinstance(body, dict) and isinstance(body.get("message"), str):
            return body["message"][:200]
    except (ValueError, UnicodeDecodeError):
        pass
    return raw[:200].decode("utf-8", "replace").strip()


async def run_session(
    client: ClientSocket, target: RunnerTarget, cluster_token: str, deadline: float
) -> None:
    """Serve one accepted client WebSocket until either side closes. Every refusal is answered here."""
    try:
        code, reason = await _session(client, target, cluster_token, deadline)
    except Refusal as refusal:
        log.info("forward to task %d port %d refused: %s", target.task_id, target.port, refusal.reason)
        await refuse(client, refusal)
        return
    log.info("forward to task %d port %d closed by the runner (%d)", target.task_id, target.port, code)
    await client.close(code, reason)


async def _session(
    client: ClientSocket, target: RunnerTarget, cluster_token: str, deadline: float
) -> tuple[int, str]:
    """Connect, hand over the runner's answer, pipe. Returns the runner's close; raises ``Refusal``.

    Nothing raises inside the connection's nursery on purpose: what goes wrong there is returned, because a
    nursery wraps exceptions in groups. The one exception that does arrive that way is trio-websocket's
    ``ConnectionRejected``, which its reader task raises when the runner answers the upgrade with an error.
    """
    endpoint = target.endpoint()
    result: tuple[int, str] | Refusal | None = None
    # One deadline over connecting, the upgrade and the runner's answer; lifted once the answer is in.
    with trio.CancelScope(deadline=deadline) as setup:
        stream = await open_runner_stream(target, endpoint)
        try:
            async with trio.open_nursery() as nursery:
                runner = await runner_websocket(nursery, stream, endpoint, cluster_token)
                try:
                    result = await _answer_and_pipe(client, runner, target, setup, deadline)
                finally:
                    await close_runner(runner)
                    nursery.cancel_scope.cancel()  # the reader task, had the close not ended it
        except* ConnectionRejected as group:
            result = _rejected(group, target)
        finally:
            await trio.aclose_forcefully(stream)  # a no-op after a clean close; else the socket is freed
    if result is None:  # only the setup deadline ends the block without a result
        result = no_answer(target)
    if isinstance(result, Refusal):
        raise result
    return result


async def _answer_and_pipe(
    client: ClientSocket,
    runner: WebSocketConnection,
    target: RunnerTarget,
    setup: trio.CancelScope,
    deadline: float,
) -> tuple[int, str] | Refusal:
    try:
        first = await runner.get_message()
    except ConnectionClosed as exc:
        return closed_without_answer(target, exc.reason.code if exc.reason else None)
    setup.deadline = math.inf
    try:
        refusing = runner_answer(target, first)
    except Refusal as refusal:
        return refusal
    if refusing is not None:
        return await runner_refusal(refusing, runner, deadline)
    await client.send(CONNECTED)
    log.info(
        "forward to task %d port %d/%s on %s open", target.task_id, target.port, target.proto, target.node
    )
    return await pipe(client, runner)


async def runner_websocket(
    nursery: trio.Nursery, stream: trio.abc.Stream, endpoint: Endpoint, cluster_token: str
) -> WebSocketConnection:
    """The WebSocket upgrade to a runner route over ``stream``, with the cluster token and this module's
    limits; its reader task runs in ``nursery``. ``ConnectionRejected`` (from that task) if refused."""
    return await wrap_client_stream(
        nursery,
        stream,
        endpoint.netloc,
        endpoint.resource,
        extra_headers=[(b"Authorization", f"Bearer {cluster_token}".encode("latin-1"))],
        message_queue_size=RUNNER_QUEUE_MESSAGES,
        max_message_size=MAX_MESSAGE_BYTES,
        receive_buffer_size=RECEIVE_BUFFER_BYTES,
    )


async def close_runner(runner: WebSocketConnection) -> None:
    # Shielded, or a cancelled session would not even send the close frame. When the client went away or the
    # setup deadline passed, the connection's reader task is being cancelled with us (it runs in this scope),
    # so the runner's close reply could never be read: hand the close frame to the kernel and drop the
    # connection. Otherwise the closing handshake, bounded (a no-op when the runner closed first). A
    # cancellation may arrive wrapped in an exception group, so the effective deadline, not the exception
    # type, tells which case this is.
    cancelled = trio.current_effective_deadline() == -math.inf
    with (
        trio.CancelScope(shield=True),
        trio.move_on_after(CLOSE_FRAME_SECONDS if cancelled else CLOSE_TIMEOUT),
    ):
        await runner.aclose(1000, "forward session ended")


async def runner_refusal(
    refusing: session_opening.Refusing, runner: WebSocketConnection, deadline: float
) -> Refusal:
    """The runner's refusal (forward ``Error:``, terminal ``{"error"}``) with the close that follows it (which
    carries the code and close code), to be passed on as it came; a runner that does not close in time is a
    broken one (1011)."""
    code, reason = None, ""
    with trio.move_on_at(deadline):
        try:
            await runner.get_message()
        except ConnectionClosed as exc:
            if exc.reason is not None:
                code, reason = exc.reason.code, exc.reason.reason or ""
    return Refusal.passed_on(refusing.closed(code, reason))


async def pipe(client: ClientSocket, runner: WebSocketConnection) -> tuple[int, str]:
    """Relay messages both ways until the runner's side closes (or the client breaks the size limit); return
    the close (code, reason) for the client. (The client closing cancels the caller's handler, which ends
    this too.)"""
    result: list[tuple[int, str]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_client_to_runner, client, runner, result, nursery.cancel_scope)
        try:
            while True:
                await client.send(await runner.get_message())
        except ConnectionClosed as exc:
            if exc.reason is not None:
                result.append((sendable_code(exc.reason.code), clip_reason(exc.reason.reason or "")))
        nursery.cancel_scope.cancel()
    return result[0] if result else (UNAVAILABLE, "the runner connection ended")


async def _client_to_runner(
    client: ClientSocket, runner: WebSocketConnection, result: list[tuple[int, str]], done: trio.CancelScope
) -> None:
    try:
        while True:
            message = await client.receive()
            if len(message) > MAX_MESSAGE_BYTES:
                # The same limit as the other direction; hypercorn has already read the message, but passing
                # it on would make the runner (and the host's own queues) hold what no client needs to send.
                result.append((MESSAGE_TOO_BIG, f"messages are limited to {MAX_MESSAGE_BYTES} bytes"))
                done.cancel()
                return
            await runner.send_message(message)
    except ConnectionClosed:
        return  # the runner side is closing: the other direction sees it and ends the session


# -- sessions per user -------------------------------------------------------------------------------------


class SessionCounter:
    """Open forward sessions per user, so one user (or a runaway script) cannot hold the host's sockets and
    buffers without limit. Counted from admission to the end of the session, setup included."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[int, int] = {}

    def open_count(self, user_id: int) -> int:
        return self._open.get(user_id, 0)

    def try_acquire(self, user_id: int) -> bool:
        held = self._open.get(user_id, 0)
        if held >= self.limit:
            return False
        self._open[user_id] = held + 1
        return True

    def release(self, user_id: int) -> None:
        held = self._open.get(user_id, 0) - 1
        if held > 0:
            self._open[user_id] = held
        else:
            self._open.pop(user_id, None)
