"""The trio side of ``kr forward``: a local listener, one session WebSocket to the host at a time, and the
bytes between them. Every protocol rule (HELLO, credit, half-close, ids, UDP mappings) lives in
``kohakuriver_proto.forwarder.Forwarder``; this module only moves bytes and events between it and sockets.

Task tree (everything in a nursery; nothing outlives ``run_forward``)::

    run_forward                signal watcher: SIGINT/SIGTERM cancel everything -> exit 0
    └── ForwardService.run     session loop: connect -> "CONNECTED" -> Session.run -> dropped -> backoff
        ├── TCP: serve_listeners; one task per local connection, two pumps each:
        │     pump_out  socket -> (credit) -> DATA          pump_in  DataReceived -> socket -> delivered()
        └── UDP: one socket; a receive loop (datagram_from) and a reply sender
        Session.run: ws reader (frames -> machine -> dispatch), one writer (Outbox -> ws), keepalive,
                     UDP expiry

The listener outlives sessions: when the WebSocket drops (host or runner restart, network) the connections of
that session are aborted (nothing survives a session) and new local connections wait up to
``SESSION_WAIT`` seconds for the next one. Memory stays bounded: what a connection receives is capped by the
window we announce (the machine rejects more), what it sends by the server's credit, and the writer's queue
by ``OUTBOX_LIMIT`` (readers stop while it is full).
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import socket
import struct
from collections import deque
from collections.abc import Callable
from typing import Any

import attrs
import click
import trio

from kohakuriver_net import sock_io
from kohakuriver_net.websocket import ConnectionClosed as WebSocketClosed
from kohakuriver_net.websocket import WebSocket
from kohakuriver_net.ws_client import ConnectionRejected, HandshakeFailed, open_websocket
from kohakuriver_proto.errors import RemoteProtocolError
from kohakuriver_proto.flow import CAN_SEND
from kohakuriver_proto.forwarder import (
    ConnectionClosed,
    ConnectionReady,
    CreditAvailable,
    DatagramReceived,
    DataReceived,
    Forwarder,
    RemoteEOF,
    SendFrame,
)
from kohakuriver_proto.frames import DEFAULT_WINDOW, HEADER_SIZE, Proto
from kohakuriver_proto.session_opening import (
    CLOSE_POLICY,
    CLOSE_UNAVAILABLE,
    Connected,
    Refused,
    forward_answer,
    refused,
)

from .client import EXIT_ERROR, EXIT_FORBIDDEN, EXIT_NOT_FOUND, EXIT_UNREACHABLE, EXIT_USAGE, one_line

#: Local reads: up to 256 KiB per DATA frame (bounded by the credit), as the tunnel client reads. Every frame
#: costs a fixed amount of Python in this process and the runner: 64 KiB frames moved 181 MiB/s upstream
#: through the whole chain, 256 KiB frames 225 MiB/s (bench/tunnel.py's path, same machine, same run).
CHUNK = 256 * 1024
#: A legal DATA frame never exceeds the window we announce; at least 1 MiB + header for any peer's chunking.
WS_MAX_MESSAGE = max(1024 * 1024, DEFAULT_WINDOW) + HEADER_SIZE
WS_CONNECT_TIMEOUT = 15.0
#: The writer sends at most this much of the outbox per system call.
WRITE_BATCH = 1024 * 1024
#: Stopping: the close frame goes out at once; its answer is not worth waiting for.
GOODBYE_TIMEOUT = 0.25
#: The host answers CONNECTED or Error within 10 s (DESIGN section 4).
HANDSHAKE_TIMEOUT = 15.0
#: After an "Error:" text, how long to wait for the close frame that carries the refusal's code.
CLOSE_CODE_WAIT = 5.0
#: A local connection that arrives while no session is up waits this long for one.
SESSION_WAIT = 10.0
#: How long a local connection waits for the container's CONNECTED (or ERROR).
OPEN_TIMEOUT = 30.0
#: A session silent this long gets a WebSocket ping; no pong within KEEPALIVE_TIMEOUT = dropped.
KEEPALIVE_INTERVAL = 15.0
KEEPALIVE_TIMEOUT = 20.0
UDP_EXPIRE_INTERVAL = 5.0
#: Bytes queued for the WebSocket writer before readers of local sockets pause.
OUTBOX_LIMIT = 2 * 1024 * 1024
UDP_REPLY_QUEUE = 256
TCP_BACKLOG = 1024
#: At start, a host that says "runner or tunnel unavailable" (1011) is retried this long (a task that just
#: started may not have its tunnel client connected yet); unreachable hosts and refusals end at once.
START_GRACE = 20.0
#: Identical messages on stderr are printed at most once per this many seconds.
REPEAT_INTERVAL = 5.0

_LINGER_RESET = struct.pack("ii", 1, 0)


# -- pure helpers ------------------------------------------------------------------------------------------


@attrs.frozen
class ForwardSpec:
    """What ``kr forward`` was asked to do; ``url`` is the session WebSocket (``forward_cmd.forward_url``)."""

    task_id: str
    remote_port: int
    proto: str  # "tcp" | "udp"
    local_host: str
    local_port: int
    url: str
    token: str | None = None
    ssl_context: Any = None


@attrs.frozen
class ForwardEnd:
    """How ``kr forward`` ended: the process exit code and, when it failed, a one-line reason."""

    exit_code: int = 0
    message: str | None = None


class Fatal(Exception):
    """Ends ``kr forward``: a refusal, a host that cannot be reached at start, a port that cannot be bound."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.message = one_line(message)
        self.exit_code = exit_code


class Unavailable(Exception):
    """This attempt failed but a later one may work. ``unreachable``: the host itself did not answer."""

    def __init__(self, message: str, *, unreachable: bool = False) -> None:
        super().__init__(message)
        self.message = one_line(message)
        self.unreachable = unreachable


def refusal_error(refusal: Refused) -> Fatal | Unavailable:
    """What a refusal means for ``kr forward``, from its code (``session_opening``), never its words: one
    that will not be served ends ``kr forward`` with the code's exit code (3 not found or not running, 4
    not allowed, 2 bad request); one that may be served later is retried."""
    text = one_line(refusal.reason or refusal.code_name or "")
    if refusal.retry_later:
        return Unavailable(f"the task's runner or tunnel is unavailable: {text or 'no reason given'}")
    return Fatal(f"the host refused the forward: {text or 'policy violation'}", refusal.exit_code)


def close_error(code: int | None, reason: str | None) -> Fatal | Unavailable:
    """What the server closing the session means: a refusal (1008 or 1011, its code in the close reason),
    or a lost session (retry)."""
    text = one_line(reason or "")
    if code in (CLOSE_POLICY, CLOSE_UNAVAILABLE):
        return refusal_error(refused("", code, reason))
    if code in (None, 1006):
        return Unavailable("the connection to the host was lost")
    return Unavailable(f"the host closed the session (code {code}{': ' + text if text else ''})")


def closed_error(exc: WebSocketClosed) -> Fatal | Unavailable:
    return close_error(exc.code, exc.reason)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def forwarding_line(local: str, spec: ForwardSpec) -> str:
    """The one stdout line scripts read to learn the local port."""
    return f"Forwarding {local} -> task {spec.task_id} port {spec.remote_port}/{spec.proto}"


class Backoff:
    """Exponential backoff with jitter for reconnecting: ``first`` doubling up to ``maximum``, each delay
    drawn from the upper half of its step so many clients do not reconnect in lockstep."""

    def __init__(
        self, first: float = 0.2, maximum: float = 5.0, rng: Callable[[], float] = random.random
    ) -> None:
        self.first = first
        self.maximum = maximum
        self._rng = rng
        self._attempt = 0

    def next(self) -> float:
        step = min(self.maximum, self.first * 2.0 ** min(self._attempt, 32))
        self._attempt += 1
        return min(self.maximum, max(self.first, step * (0.5 + 0.5 * self._rng())))

    def reset(self) -> None:
        self._attempt = 0


class RepeatFilter:
    """One stderr line per distinct message per ``interval`` seconds: a client retrying against a closed
    port must not flood the terminal. Suppressed repeats are counted into the next line printed."""

    def __init__(self, interval: float = REPEAT_INTERVAL, max_entries: int = 256) -> None:
        self.interval = interval
        self.max_entries = max_entries
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def check(self, message: str, now: float) -> str | None:
        """The line to print now, or None to stay quiet."""
        last = self._last.get(message)
        if last is not None and now - last < self.interval:
            self._suppressed[message] = self._suppressed.get(message, 0) + 1
            return None
        if len(self._last) >= self.max_entries:
            self._prune(now)
        self._last[message] = now
        repeats = self._suppressed.pop(message, 0)
        return f"{message} (repeated {repeats} more times)" if repeats else message

    def _prune(self, now: float) -> None:
        for key in [k for k, t in self._last.items() if now - t >= self.interval]:
            del self._last[key]
            self._suppressed.pop(key, None)
        while len(self._last) >= self.max_entries:  # all recent: forget the oldest
            oldest = min(self._last, key=self._last.__getitem__)
            del self._last[oldest]
            self._suppressed.pop(oldest, None)


class Reporter:
    """Messages for the person at the terminal (stderr), rate-limited per identical text."""

    def __init__(self, write: Callable[[str], None] | None = None) -> None:
        self._write = write or (lambda line: click.echo(line, err=True))
        self._filter = RepeatFilter()

    def __call__(self, message: str, *, limit: bool = True) -> None:
        line = self._filter.check(message, trio.current_time()) if limit else message
        if line is not None:
            self._write(f"kr forward: {line}")


# -- queues ------------------------------------------------------------------------------------------------


class Outbox:
    """Binary messages for the one WebSocket writer, in order. ``put`` never blocks (the WebSocket reader
    must never wait on the writer: two peers both blocked writing would deadlock); local readers call
    ``wait_room`` before reading so the queue stays under ``limit`` bytes."""

    def __init__(self, limit: int = OUTBOX_LIMIT) -> None:
        self.limit = limit
        self.queued = 0
        self._items: deque[bytes] = deque()
        self._nonempty = trio.Event()
        self._room = trio.Event()
        self._room.set()
        #: The writer waits in ``get`` for something to write (the queue is empty).
        self.waiting = False

    def put(self, data: bytes) -> None:
        self._items.append(data)
        self.queued += len(data)
        self._nonempty.set()
        if self.queued >= self.limit and self._room.is_set():
            self._room = trio.Event()

    async def wait_room(self) -> None:
        await self._room.wait()

    async def get(self, max_bytes: int = WRITE_BATCH) -> list[bytes]:
        """The oldest messages, at least one, about ``max_bytes`` together (one write's worth); an empty list
        when ``kick`` woke the writer with nothing queued."""
        items = self._items
        if not items:
            self._nonempty = trio.Event()
            self.waiting = True
            try:
                await self._nonempty.wait()
            finally:
                self.waiting = False
            if not items:
                return []
        batch = [items.popleft()]
        size = len(batch[0])
        while items and size < max_bytes:
            data = items.popleft()
            batch.append(data)
            size += len(data)
        self.queued -= size
        if self.queued < self.limit:
            self._room.set()
        return batch

    def kick(self) -> None:
        """Wake a waiting ``get`` even though nothing is queued."""
        self._nonempty.set()


_EOF = object()  # in a link's inbox: the container finished sending (shut down our write side)
_DONE = object()  # in a link's inbox: the connection is finished (after the queued data)


class TcpLink:
    """One local TCP connection inside a session: the wake-ups and the inbox its two pumps share."""

    __slots__ = (
        "cid", "credit", "failure", "inbox", "quiet", "ready", "scope", "stream", "waiting", "wakeup",
    )  # fmt: skip

    def __init__(self, cid: int, stream: trio.SocketStream) -> None:
        self.cid = cid
        self.stream = stream
        self.ready = trio.Event()
        self.credit = trio.Event()
        self.inbox: deque[Any] = deque()  # bounded by our receive window (the machine enforces it)
        self.wakeup = trio.Event()
        self.scope = trio.CancelScope()
        self.failure: str | None = None
        self.quiet = False
        self.waiting = False  # its writing pump waits in ``pop`` (the inbox is empty)

    def push(self, item: Any) -> None:
        self.inbox.append(item)
        self.wakeup.set()

    async def pop(self) -> Any:
        while not self.inbox:
            self.wakeup = trio.Event()
            self.waiting = True
            try:
                await self.wakeup.wait()
            finally:
                self.waiting = False
        return self.inbox.popleft()

    def abort(self, reason: str | None, quiet: bool = False) -> None:
        """Close now, dropping what is queued: the socket is reset so the local app knows data was lost."""
        if self.failure is None:
            self.failure = reason or "aborted"
            self.quiet = quiet
        self.scope.cancel()


# -- one session -------------------------------------------------------------------------------------------


class Session:
    """One WebSocket to the host after its ``CONNECTED``, with its own ``Forwarder`` (ids are per session)."""

    def __init__(
        self,
        ws: WebSocket,
        spec: ForwardSpec,
        report: Reporter,
        udp_reply: Callable[[Any, Any], None] | None = None,
        on_close: Callable[[Session], None] | None = None,
    ) -> None:
        self.ws = ws
        self.spec = spec
        self.report = report
        self.udp = spec.proto == "udp"
        self.fw = Forwarder(Proto.UDP if self.udp else Proto.TCP, spec.remote_port)
        self.outbox = Outbox()
        self.links: dict[int, TcpLink] = {}
        self.closed = False
        self._udp_reply = udp_reply
        self._on_close = on_close
        self._end: Fatal | Unavailable | None = None
        self._scope: trio.CancelScope | None = None

    # -- the machine's events --------------------------------------------------------------------------------

    def dispatch(self, events: list) -> None:
        for event in events:
            kind = type(event)
            if kind is SendFrame:
                outbox = self.outbox
                # The writer idle and nothing queued: write from here (no task switch on the way out).
                if outbox.waiting and not outbox.queued and self.ws.send_now(event.data):
                    if self.ws.backlogged:
                        outbox.kick()
                else:
                    outbox.put(event.data)
            elif kind is DataReceived:
                link = self.links.get(event.client_id)
                if link is not None:
                    self._deliver(link, event.data)
            elif kind is CreditAvailable:
                link = self.links.get(event.client_id)
                if link is not None:
                    link.credit.set()
            elif kind is DatagramReceived:
                if self._udp_reply is not None:
                    self._udp_reply(event.data, event.addr)
            elif kind is ConnectionReady:
                link = self.links.get(event.client_id)
                if link is not None:
                    link.ready.set()
            elif kind is RemoteEOF:
                link = self.links.get(event.client_id)
                if link is not None:
                    link.push(_EOF)
            elif kind is ConnectionClosed:
                self._on_closed(event)
            # Negotiated, PongReceived: nothing to do.

    def _deliver(self, link: TcpLink, data: Any) -> None:
        """Data for a local connection: written from here when its pump is idle and the socket has room (an
        interactive reply skips a task switch), else queued for the pump, which credits it once written."""
        if link.waiting and not link.inbox:
            rest = sock_io.send_now(link.stream.socket, (data,))
            if rest is not None:
                left = sum(len(part) for part in rest)
                self.dispatch(self.fw.delivered(link.cid, len(data) - left))
                if left:
                    link.push(b"".join(rest))
                return
        link.push(data)

    def _on_closed(self, event: ConnectionClosed) -> None:
        link = self.links.get(event.client_id)
        if self.closed:  # the session itself went away: one message for all, printed by the loop
            if link is not None:
                link.abort(event.reason, quiet=True)
            return
        if event.aborted and event.reason not in (None, "idle"):
            self.report(f"task {self.spec.task_id} port {self.spec.remote_port}: {event.reason}")
        if link is None:
            return
        if event.aborted:
            link.abort(event.reason, quiet=True)  # reported just above
        else:
            link.push(_DONE)

    # -- lifetime --------------------------------------------------------------------------------------------

    async def run(self) -> Unavailable:
        """Serve until the WebSocket ends. Returns why (retry), or raises Fatal (the host refused)."""
        self.dispatch(self.fw.start())
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                nursery.start_soon(self._writer)
                nursery.start_soon(self._keepalive)
                if self.udp:
                    nursery.start_soon(self._expire)
                await self._reader()
        finally:
            self.close()
        end = self._end or Unavailable("the session ended")
        if isinstance(end, Fatal):
            raise end
        return end

    def _finish(self, end: Fatal | Unavailable) -> None:
        if self._end is None:
            self._end = end
        if self._scope is not None:
            self._scope.cancel()

    def close(self) -> None:
        """Every connection of the session is aborted (nothing survives the WebSocket)."""
        if not self.closed:
            self.closed = True
            if self._on_close is not None:
                self._on_close(self)
            self.dispatch(self.fw.close("the session to the host was lost"))

    async def _reader(self) -> None:
        ws, fw, dispatch = self.ws, self.fw, self.dispatch
        while True:
            try:
                message = await ws.receive()
            except WebSocketClosed as exc:
                self._finish(closed_error(exc))
                return
            now = trio.current_time()
            if type(message) is str:
                continue  # only the first message is text; later text is not ours to interpret
            try:
                events = fw.receive_frame(message, now)
            except RemoteProtocolError as exc:
                self._finish(Unavailable(f"protocol error from the host: {exc}"))
                return
            dispatch(events)

    async def _writer(self) -> None:
        outbox, ws = self.outbox, self.ws
        try:
            while True:
                batch = await outbox.get()
                if batch:
                    await ws.send_batch(batch)
                else:
                    await ws.flush()  # the rest of a message dispatch wrote with send_now
        except WebSocketClosed as exc:
            self._finish(closed_error(exc))

    async def _keepalive(self) -> None:
        """A silent network path is only noticed by asking: ping when nothing arrived for a while."""
        ws = self.ws
        while True:
            await trio.sleep(KEEPALIVE_INTERVAL)
            if trio.current_time() - ws.last_received < KEEPALIVE_INTERVAL:
                continue
            asked = trio.current_time()
            try:
                await ws.ping()
            except WebSocketClosed:
                return  # the reader reports it
            await trio.sleep(KEEPALIVE_TIMEOUT)
            if ws.last_received < asked:  # not even the pong came back
                self._finish(Unavailable(f"the host did not answer a ping within {KEEPALIVE_TIMEOUT:.0f} s"))
                return

    async def _expire(self) -> None:
        while True:
            await trio.sleep(UDP_EXPIRE_INTERVAL)
            self.dispatch(self.fw.expire(trio.current_time()))

    # -- TCP connections -------------------------------------------------------------------------------------

    def open_link(self, stream: trio.SocketStream) -> TcpLink:
        cid, events = self.fw.open_connection()
        link = self.links[cid] = TcpLink(cid, stream)
        self.dispatch(events)
        return link

    def abort_link(self, link: TcpLink, reason: str) -> None:
        """A local problem (the app reset or went away): tell the container side, close our end."""
        self.dispatch(self.fw.abort(link.cid, reason))
        link.abort(reason, quiet=True)

    def release(self, link: TcpLink) -> None:
        self.links.pop(link.cid, None)
        if not self.closed and link.cid in self.fw.connections:
            self.dispatch(self.fw.abort(link.cid, "local connection closed"))

    async def serve_link(self, link: TcpLink) -> None:
        """Run one local connection from CONNECT to the end, within ``link.scope``."""
        with link.scope:
            with trio.move_on_after(OPEN_TIMEOUT):
                await link.ready.wait()
            if not link.ready.is_set():
                self.report(
                    f"task {self.spec.task_id} port {self.spec.remote_port}: "
                    f"no answer from the container within {OPEN_TIMEOUT:.0f} s"
                )
                self.abort_link(link, "connect timeout")
                return
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump_out, link)
                await self._pump_in(link)

    async def _pump_out(self, link: TcpLink) -> None:
        """Local socket -> DATA, never more than the credit the server gave."""
        fw, cid, stream, outbox, dispatch = self.fw, link.cid, link.stream, self.outbox, self.dispatch
        while True:
            credit = fw.send_credit(cid)
            if credit == 0:
                if fw.state(cid) not in CAN_SEND:
                    return
                link.credit = trio.Event()
                await link.credit.wait()
                continue
            if outbox.queued >= outbox.limit:
                await outbox.wait_room()
            try:
                data = await sock_io.receive_some(
                    stream.socket, CHUNK if credit is None or credit > CHUNK else credit
                )
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                self.abort_link(link, "connection reset by the local client")
                return
            if not data:
                dispatch(fw.local_eof(cid))
                return
            dispatch(fw.send_data(cid, data))

    async def _pump_in(self, link: TcpLink) -> None:
        """Received data -> local socket, then credit back (``delivered``) once it is written."""
        fw, cid, stream, dispatch = self.fw, link.cid, link.stream, self.dispatch
        while True:
            item = await link.pop()
            if item is _DONE:
                return
            try:
                if item is _EOF:
                    await stream.send_eof()
                    continue
                await sock_io.sendmsg_all(stream.socket, (item,))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                self.abort_link(link, "the local client closed the connection")
                return
            dispatch(fw.delivered(cid, len(item)))


# -- the service: listener + session loop ------------------------------------------------------------------


class ForwardService:
    """The listener for the whole life of ``kr forward`` and the sessions that come and go under it."""

    def __init__(
        self,
        spec: ForwardSpec,
        *,
        connect: Callable[..., Any] | None = None,
        write_line: Callable[[str], None] | None = None,
        report: Reporter | None = None,
    ) -> None:
        self.spec = spec
        self._connect = connect or open_websocket
        self._write_line = write_line or (lambda line: print(line, flush=True))
        self.report = report or Reporter()
        self.session: Session | None = None
        self._session_up = trio.Event()
        self._udp_replies: trio.MemorySendChannel | None = None

    # -- sessions --------------------------------------------------------------------------------------------

    async def wait_session(self, timeout: float = math.inf) -> Session | None:
        with trio.move_on_after(timeout):
            while self.session is None:
                await self._session_up.wait()
            return self.session
        return None

    def _session_down(self, session: Session) -> None:
        if self.session is session:
            self.session = None
            self._session_up = trio.Event()

    async def run(self) -> ForwardEnd:
        async with trio.open_nursery() as nursery:
            try:
                await self._session_loop(nursery, await self._listen())
            except Fatal as exc:
                nursery.cancel_scope.cancel()
                return ForwardEnd(exc.exit_code, exc.message)
        return ForwardEnd(0)  # pragma: no cover - the loop only ends by Fatal or cancellation

    async def _session_loop(self, nursery: trio.Nursery, listen: tuple[Any, str]) -> None:
        backoff = Backoff()
        started = False
        lost = False
        give_up_at = trio.current_time() + START_GRACE
        while True:
            try:
                async with self._open_ws() as ws:
                    await self._handshake(ws)
                    session = Session(ws, self.spec, self.report, self._send_udp_reply, self._session_down)
                    if not started:
                        await nursery.start(self._serve_local, listen[0])
                        self._write_line(forwarding_line(listen[1], self.spec))
                        started = True
                    elif lost:
                        self.report("session to the host restored", limit=False)
                    lost = False
                    backoff.reset()
                    self.session = session
                    self._session_up.set()
                    try:
                        end = await session.run()  # its close() calls _session_down
                    except BaseException:  # Ctrl-C arrives as a group of Cancelled
                        await _say_goodbye(ws)
                        raise
            except Unavailable as exc:
                if not started and (exc.unreachable or trio.current_time() >= give_up_at):
                    raise Fatal(exc.message, EXIT_UNREACHABLE if exc.unreachable else EXIT_ERROR) from None
                end = exc
            if not started:
                self.report(f"{end.message}; retrying")
            elif not lost:
                self.report(f"{end.message}; reconnecting", limit=False)
                lost = True
            else:
                self.report(f"reconnect failed: {end.message}")
            await trio.sleep(backoff.next())

    def _open_ws(self) -> Any:
        spec = self.spec
        headers = [("Authorization", f"Bearer {spec.token}")] if spec.token else []
        return _HandshakeErrors(
            self._connect(
                spec.url, ssl_context=spec.ssl_context, headers=headers, max_message=WS_MAX_MESSAGE
            ),
            spec,
        )

    async def _handshake(self, ws: WebSocket) -> None:
        """The server's first message: text ``CONNECTED``, or ``Error: <reason>`` and a close whose code and
        reason say what it means (``session_opening``)."""
        first: Any = None
        with trio.move_on_after(HANDSHAKE_TIMEOUT):
            try:
                first = await ws.receive()
            except WebSocketClosed as exc:
                raise closed_error(exc) from None
        if first is None:
            raise Unavailable(f"the host did not confirm the session within {HANDSHAKE_TIMEOUT:.0f} s")
        try:
            answer = forward_answer(first)
        except RemoteProtocolError:
            raise Unavailable(
                f"unexpected first message from the host: {one_line(repr(first), 80)}"
            ) from None
        if isinstance(answer, Connected):
            return
        code, reason = None, ""
        with trio.move_on_after(CLOSE_CODE_WAIT):
            try:
                while True:
                    await ws.receive()
            except WebSocketClosed as exc:
                code, reason = exc.code, exc.reason
        err = refusal_error(answer.closed(code, reason))
        if isinstance(err, Unavailable):
            err = Unavailable(answer.reason or err.message)
        raise err

    # -- local side ------------------------------------------------------------------------------------------

    async def _listen(self) -> tuple[Any, str]:
        """Bind before connecting, so a port in use fails at once. Returns (listener or socket, address)."""
        spec = self.spec
        udp = spec.proto == "udp"
        kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
        where = format_address(spec.local_host, spec.local_port)
        try:
            infos = await trio.socket.getaddrinfo(spec.local_host, spec.local_port, type=kind)
        except OSError as exc:
            raise Fatal(f"cannot listen on {where}: {exc.strerror or exc}", EXIT_USAGE) from None
        family, type_, proto, _, sockaddr = infos[0]
        sock = trio.socket.socket(family, type_, proto)
        try:
            if not udp:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            await sock.bind(sockaddr)
            if not udp:
                sock.listen(TCP_BACKLOG)
        except OSError as exc:
            sock.close()
            raise Fatal(f"cannot listen on {where}: {exc.strerror or exc}") from None
        host, port = sock.getsockname()[:2]
        address = format_address(host, port)
        return (sock if udp else trio.SocketListener(sock)), address

    async def _serve_local(self, listener: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        if self.spec.proto == "udp":
            await self._serve_udp(listener, task_status)
            return
        async with listener:
            await trio.serve_listeners(self._serve_tcp, [listener], task_status=task_status)

    async def _serve_tcp(self, stream: trio.SocketStream) -> None:
        async with stream:
            session = await self.wait_session(SESSION_WAIT)
            if session is None:
                self.report(f"no session to the host within {SESSION_WAIT:.0f} s; closed a local connection")
                _reset(stream)
                return
            link = session.open_link(stream)
            try:
                await session.serve_link(link)
            finally:
                session.release(link)
            if link.failure is not None:
                _reset(stream)

    async def _serve_udp(self, sock: Any, task_status: Any) -> None:
        send, receive = trio.open_memory_channel[tuple[Any, Any]](UDP_REPLY_QUEUE)
        self._udp_replies = send
        with sock:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._udp_sender, sock, receive)
                task_status.started()
                while True:
                    await self.wait_session()
                    try:
                        data, addr = await sock.recvfrom(65536)
                    except OSError:
                        continue  # an ICMP error for an earlier reply; the socket is fine
                    session = self.session
                    if session is None:
                        self.report("no session to the host; dropped a datagram")
                        continue
                    session.dispatch(session.fw.datagram_from(addr, data, trio.current_time()))

    def _send_udp_reply(self, data: Any, addr: Any) -> None:
        if self._udp_replies is not None:
            # UDP: a datagram the local socket cannot take now is dropped, not queued
            with contextlib.suppress(trio.WouldBlock):
                self._udp_replies.send_nowait((data, addr))

    @staticmethod
    async def _udp_sender(sock: Any, receive: trio.MemoryReceiveChannel) -> None:
        async for data, addr in receive:
            with contextlib.suppress(OSError):  # the local peer went away: nothing to tell the container
                await sock.sendto(data, addr)


class _HandshakeErrors:
    """Wraps ``open_websocket`` so opening failures become Unavailable/Fatal, within WS_CONNECT_TIMEOUT."""

    def __init__(self, cm: Any, spec: ForwardSpec) -> None:
        self._cm = cm
        self._spec = spec

    async def __aenter__(self) -> WebSocket:
        where = self._spec.url.split("?")[0]
        try:
            with trio.move_on_after(WS_CONNECT_TIMEOUT):
                return await self._cm.__aenter__()
        except ConnectionRejected as exc:
            raise _rejected(exc, self._spec) from None
        except HandshakeFailed as exc:
            raise Unavailable(f"cannot reach the host at {where}: {exc}", unreachable=True) from None
        except OSError as exc:
            raise Unavailable(
                f"cannot reach the host at {where}: {exc.strerror or exc}", unreachable=True
            ) from None
        raise Unavailable(
            f"the host did not accept the session within {WS_CONNECT_TIMEOUT:.0f} s ({where})",
            unreachable=True,
        )

    async def __aexit__(self, *exc: Any) -> bool | None:
        return await self._cm.__aexit__(*exc)


def _rejected(exc: ConnectionRejected, spec: ForwardSpec) -> Fatal | Unavailable:
    status = exc.status
    body = (exc.body or b"").decode("utf-8", "replace").strip()
    detail = one_line(_error_text(body) or "no reason given", 300)
    if status == 401 and not spec.token:
        return Fatal(
            "not logged in to the host: run `kr login --token TOKEN` or set KOHAKURIVER_TOKEN", EXIT_FORBIDDEN
        )
    if status in (401, 403):
        return Fatal(f"the host refused the forward: {detail} (HTTP {status})", EXIT_FORBIDDEN)
    if status == 404:
        return Fatal(f"the host refused the forward: {detail} (HTTP 404)", EXIT_NOT_FOUND)
    if status >= 500:
        return Unavailable(f"the host failed to open the session: {detail} (HTTP {status})")
    return Fatal(f"the host refused the forward: {detail} (HTTP {status})")


def _error_text(body: str) -> str:
    """The ``message`` of a JSON error body, else the body's first line."""
    import json

    try:
        data = json.loads(body)
    except ValueError:
        return body.splitlines()[0] if body else ""
    if isinstance(data, dict) and isinstance(data.get("message"), str):
        return data["message"]
    return body.splitlines()[0] if body else ""


async def _say_goodbye(ws: WebSocket) -> None:
    """Stopping (Ctrl-C): a close frame, so the host ends the session at once instead of seeing a dead
    TCP connection. Shielded because we are being cancelled, and bounded by GOODBYE_TIMEOUT."""
    with trio.CancelScope(shield=True), trio.move_on_after(GOODBYE_TIMEOUT):
        await ws.close(1001, "kr forward stopped")


def _reset(stream: trio.SocketStream) -> None:
    """Close with a TCP reset rather than a FIN: the local app must not take a cut stream as complete."""
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


# -- entry point -------------------------------------------------------------------------------------------


async def run_forward(spec: ForwardSpec, **kwargs: Any) -> ForwardEnd:
    """Run ``kr forward`` until SIGINT/SIGTERM (exit 0) or a fatal error (its exit code and message)."""
    end = ForwardEnd(0)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

            async def serve() -> None:
                nonlocal end
                end = await ForwardService(spec, **kwargs).run()
                nursery.cancel_scope.cancel()

            nursery.start_soon(stop_on_signal)
            nursery.start_soon(serve)
    return end
