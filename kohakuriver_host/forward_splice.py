"""The zero-copy forward path: ``GET /ws/forward/{task_id}/{port}`` on the plain-TCP listener (front_door).

After both WebSocket upgrades the frames are valid end to end: the CLI's are client frames (masked), which
is what the runner's server expects; the runner's are server frames (unmasked), which is what the CLI
expects. Provided no extension is negotiated on either side (none is ever offered or accepted here), the
host does not need to look at a single frame of the session: it pipes the raw TCP bytes both ways with
``splice(2)`` (``kohakuriver_net.splice.pipe_both_ways``, half-close included), so a forward costs the
host a few syscalls per MiB instead of a WebSocket parse and re-encode of every frame.

The session, with the same checks, messages, close codes, per-user limit and deadline as the message relay
(``api_forward.admit`` and ``forward_relay``'s answer helpers are shared, not copied):

1. the request, parsed with h11 (``kohakuriver_net.ws_handshake``: a bounded head within a deadline, else
   the connection is dropped), must be a WebSocket upgrade; the API token is checked (JSON 401 before the
   upgrade, as every route); then ``101`` with ``Sec-WebSocket-Accept`` and no extension;
2. ``admit`` (task, role, status, node, session slot) before ``FORWARD_CONNECT_TIMEOUT_SECONDS`` (minus the
   answer margin); a refusal is one text frame ``Error: <reason>`` and a close frame with the close code
   and the refusal code as its reason (``kohakuriver_proto.session_opening``), sent by the host (server
   frames);
3. TCP (or TLS) to the runner, our own upgrade request (cluster token, fresh key, no extension), its 101
   and accept key checked, its first frame read: ``CONNECTED`` -> the bytes read so far go to the client
   as they are and the splice starts; ``Error: ...`` + close -> the same text, close code and close reason
   (the runner's refusal code) sent on to the client; anything else, or nothing before the deadline ->
   ``Error: ...`` 1011 ``runner_unavailable`` from the host;
4. the session counts against the user's limit until both directions have ended.

The runner of ``kr up`` (same process, ``local_runner``) gets the client's connection itself after step 2:
no step 3, no splice, and the runner's answer and frames are the same bytes the splice would have passed on.

A runner reached over https is served on the same bytes with a copy loop instead of splice (trio.SSLStream
cannot be spliced and cannot half-close: the session ends when the client's direction ends).
"""

from __future__ import annotations

import logging
from functools import partial

import attrs
import h11
import trio

from kohakuriver_net.front_door import route_line
from kohakuriver_net.splice import pipe_both_ways
from kohakuriver_net.websocket import tune_for_tunnel
from kohakuriver_net.ws_handshake import (
    Dropped,
    HttpRefusal,
    UpgradeRejected,
    answer_and_close,
    check_upgrade,
    headers_of,
    http_error,
    query_value,
    read_request,
    read_upgrade_response,
    route_parts,
    switching_protocols,
    upgrade_request,
)
from kohakuriver_proto.session_opening import RefusalCode
from kohakuriver_proto.ws_frames import (
    OP_CLOSE,
    OP_TEXT,
    Close,
    FrameReader,
    Ping,
    Pong,
    WebSocketProtocolError,
    close_payload,
    frame_parts,
)

from . import auth
from .api_common import principal_for
from .api_forward import admit, setup_seconds
from .context import HostContext
from .forward_relay import (
    Endpoint,
    Refusal,
    RunnerTarget,
    SessionCounter,
    closed_without_answer,
    no_answer,
    open_runner_stream,
    runner_answer,
    unexpected_answer,
    upgrade_refused,
)
from .local_runner import LocalRunner

log = logging.getLogger("kohakuriver.host.forward")

READ_BYTES = 64 * 1024
#: The runner's answer (its first message, and the close after an ``Error:``) fits in far less.
MAX_ANSWER_BYTES = 16 * 1024
#: After a refusal: how long to wait for the client's close reply and its FIN, so that closing does not
#: turn into a reset that destroys the refusal before the client read it.
LINGER_SECONDS = 1.0
#: Bytes per read when a TLS runner rules splice out.
COPY_BYTES = 256 * 1024
ROUTE_PREFIX = "/ws/forward/"
#: Request lines the front door sends here: exactly the forward route's shape.
FORWARD_LINE = route_line(ROUTE_PREFIX, 2)


@attrs.frozen
class ForwardRequest:
    task_text: str
    port_text: str
    proto: str | None
    key: str
    authorization: str | None


# -- frames the host itself sends (refusals) ---------------------------------------------------------------


def refusal_frames(refusal: Refusal) -> bytes:
    """A refused session as the client reads it: one text frame ``Error: <reason>`` and the close frame with
    the close code and the refusal code (server frames: unmasked)."""
    opening = refusal.opening
    text = frame_parts(OP_TEXT, opening.text.encode("utf-8"))
    close = frame_parts(OP_CLOSE, close_payload(opening.close_code, opening.close_reason))
    return b"".join([*text, *close])


def parse_upgrade(request: h11.Request) -> ForwardRequest:
    """The forward route's pieces from a WebSocket upgrade request; ``HttpRefusal`` when it is not one."""
    key = check_upgrade(request)
    (task_text, port_text), query = route_parts(request, ROUTE_PREFIX, 2)
    authorization = headers_of(request).get(b"authorization")
    return ForwardRequest(
        task_text,
        port_text,
        query_value(query, "proto"),
        key,
        authorization.decode("latin-1") if authorization is not None else None,
    )


# -- the session ---------------------------------------------------------------------------------------------


async def serve_forward(host: HostContext, counter: SessionCounter, stream: trio.SocketStream) -> None:
    """One forward connection, from its request line to the end of the pipe (the front door closes
    ``stream`` afterwards)."""
    try:
        request, conn = await read_request(stream)
        forward = parse_upgrade(request)
        who = await principal_for(host, forward.authorization)
    except HttpRefusal as refusal:
        await answer_and_close(stream, refusal.response)
        return
    except auth.Unauthorized as exc:
        response = http_error(401, "unauthorized", str(exc), (("WWW-Authenticate", "Bearer"),))
        await answer_and_close(stream, response)
        return
    except Dropped as exc:
        if str(exc):
            log.info("forward request dropped: %s", exc)
        return
    try:
        await stream.send_all(switching_protocols(conn, forward.key))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return
    early, client_eof = conn.trailing_data  # frames the client sent right after its request
    deadline = trio.current_time() + setup_seconds(host.config)
    try:
        target = await admit(
            host, counter, who, forward.task_text, forward.port_text, forward.proto, deadline
        )
    except Refusal as refusal:
        await _refuse(stream, refusal)
        return
    try:
        local = host.local_runner
        if local is not None and local.serves(target.node, target.node_url):
            await _in_process(stream, target, local, deadline, early)
        else:
            await _session(stream, target, host.cluster_token, deadline, early, client_eof)
    finally:
        counter.release(who.user_id)


async def _refuse(stream: trio.SocketStream, refusal: Refusal) -> None:
    """The refusal frames, then wait (bounded) for the client's close reply and FIN."""
    with trio.move_on_after(LINGER_SECONDS):
        try:
            await stream.send_all(refusal_frames(refusal))
            await stream.send_eof()
            while await stream.receive_some(READ_BYTES):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def _session(
    client: trio.SocketStream,
    target: RunnerTarget,
    cluster_token: str,
    deadline: float,
    early: bytes,
    client_eof: bool,
) -> None:
    try:
        runner, answer = await _connect(target, cluster_token, deadline)
    except Refusal as refusal:
        log.info("forward to task %d port %d refused: %s", target.task_id, target.port, refusal.reason)
        await _refuse(client, refusal)
        return
    log.info(
        "forward to task %d port %d/%s on %s open (splice)", target.task_id, target.port, target.proto,
        target.node,
    )  # fmt: skip
    up = down = 0

    def count_up(n: int) -> None:
        nonlocal up
        up += n

    def count_down(n: int) -> None:
        nonlocal down
        down += n

    outcome = "closed"
    try:
        async with runner:
            try:
                await client.send_all(answer)  # CONNECTED and whatever followed it, byte for byte
                if isinstance(runner, trio.SocketStream):
                    tune_for_tunnel(client.socket)
                    tune_for_tunnel(runner.socket)
                    await pipe_both_ways(
                        client, runner, first=early, a_done=client_eof, a_to_b=count_up, b_to_a=count_down
                    )
                else:
                    await _copy_both_ways(client, runner, early, client_eof)
            except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as group:
                outcome = f"aborted ({group.exceptions[0]!r})"
    finally:
        log.info(
            "forward to task %d port %d %s: %d bytes up, %d bytes down",
            target.task_id, target.port, outcome, up, down,
        )  # fmt: skip


async def _in_process(
    client: trio.SocketStream, target: RunnerTarget, local: LocalRunner, deadline: float, early: bytes
) -> None:
    """The session served by the runner of this process on the client's own connection (``local_runner``)."""
    log.info(
        "forward to task %d port %d/%s on %s open (in process)", target.task_id, target.port, target.proto,
        target.node,
    )  # fmt: skip
    await local.forward(client, str(target.task_id), str(target.port), target.proto, early, deadline)
    log.info("forward to task %d port %d closed", target.task_id, target.port)


# -- the runner side ----------------------------------------------------------------------------------------


async def _connect(
    target: RunnerTarget, cluster_token: str, deadline: float
) -> tuple[trio.SocketStream | trio.SSLStream[trio.SocketStream], bytes]:
    """The runner's stream after its ``CONNECTED``, and every byte it sent after the 101 (to pass on as it
    is); ``Refusal`` for anything else, and when ``deadline`` passes first."""
    endpoint = target.endpoint()
    with trio.move_on_at(deadline):
        stream = await open_runner_stream(target, endpoint)
        try:
            after_upgrade = await _upgrade(stream, target, endpoint, cluster_token)
            return stream, await _answer(stream, target, after_upgrade, deadline)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
    raise no_answer(target)


async def _upgrade(
    stream: trio.abc.Stream, target: RunnerTarget, endpoint: Endpoint, cluster_token: str
) -> bytes:
    """Our own upgrade request to the runner; the bytes that followed its 101."""
    conn, key, request = upgrade_request(
        endpoint.resource, endpoint.netloc, [("Authorization", f"Bearer {cluster_token}")]
    )
    try:
        await stream.send_all(request)
        return await read_upgrade_response(stream, conn, key)
    except UpgradeRejected as exc:
        if exc.status >= 200:
            raise upgrade_refused(target, exc.status, exc.body) from None
        if not exc.answered:
            raise closed_without_answer(target, None) from None
        raise Refusal(RefusalCode.RUNNER_UNAVAILABLE, f"node {target.node}: {exc}") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise Refusal(RefusalCode.RUNNER_UNAVAILABLE, f"cannot reach node {target.node}: {exc}") from None


async def _answer(stream: trio.abc.Stream, target: RunnerTarget, received: bytes, deadline: float) -> bytes:
    """Read the runner's first message; all bytes read when it is ``CONNECTED``, else the ``Refusal``."""
    frames = FrameReader(masked=False, max_message=MAX_ANSWER_BYTES)
    raw = bytearray()
    data = received
    try:
        while True:
            raw += data
            frames.receive_data(data)
            event = frames.next_event()
            while type(event) is Ping or type(event) is Pong:  # a ping before the answer goes on with it
                event = frames.next_event()
            if type(event) is Close:
                raise closed_without_answer(target, event.code)
            if type(event) is str:
                first = event
                break
            if event is not None or len(raw) > MAX_ANSWER_BYTES:  # binary first, or far too long
                raise unexpected_answer(target)
            data = await stream.receive_some(READ_BYTES)
            if not data:
                raise closed_without_answer(target, 1006)  # what a WebSocket library reports for it
    except WebSocketProtocolError:
        raise unexpected_answer(target) from None
    refusing = runner_answer(target, first)
    if refusing is None:
        return bytes(raw)
    # Its close follows, with the refusal code as its reason: both go on to the client when they come in time.
    raise Refusal.passed_on(refusing.closed(*await _close_of(stream, frames, deadline)))


async def _close_of(stream: trio.abc.Stream, frames: FrameReader, deadline: float) -> tuple[int | None, str]:
    """Code and reason of the runner's close after its ``Error:``; (None, "") if none comes before
    ``deadline``."""
    read = 0
    with trio.move_on_at(deadline):
        try:
            while read <= MAX_ANSWER_BYTES:
                while (event := frames.next_event()) is not None:
                    if type(event) is Close:
                        return event.code, event.reason
                data = await stream.receive_some(READ_BYTES)
                if not data:
                    return None, ""
                read += len(data)
                frames.receive_data(data)
        except (WebSocketProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            return None, ""
    return None, ""


# -- TLS runners: a copy loop -------------------------------------------------------------------------------


async def _copy_both_ways(
    client: trio.SocketStream, runner: trio.abc.Stream, early: bytes, client_eof: bool
) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(_copy, runner, client, half_close=True))
        if early:
            await runner.send_all(early)
        if not client_eof:
            await _copy(client, runner, half_close=False)
        # A TLS stream cannot half-close: the client's end of its direction ends the session.
        nursery.cancel_scope.cancel()


async def _copy(src: trio.abc.Stream, dst: trio.abc.Stream, *, half_close: bool) -> None:
    while data := await src.receive_some(COPY_BYTES):
        await dst.send_all(data)
    if half_close:
        await dst.send_eof()  # type: ignore[attr-defined]
