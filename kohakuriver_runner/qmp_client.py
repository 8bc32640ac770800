"""A trio client for a VM's QMP socket: commands and their answers, and QEMU's asynchronous events.

The protocol is ``kohakuriver_proto.qmp.QmpMachine``; this module moves bytes between it and the Unix
socket. Usage::

    async with open_qmp(instance_dir / "qmp.sock") as qmp:      # connect, greeting, capabilities
        status = await qmp.query_status()                       # VmRunState(status="running", running=True)
        await qmp.execute("human-monitor-command", {"command-line": "info block"})
        await qmp.system_powerdown()
        await qmp.wait_event("SHUTDOWN", timeout=60)

Decisions:

- **One reader task**, owned by ``open_qmp``'s nursery: it feeds every received byte to the machine and
  hands the answers to the waiting ``execute`` calls (matched by id) and the events to a queue. Leaving the
  ``async with`` cancels it and closes the socket; nothing outlives the block.
- **Every wait is bounded or cancellable.** Connecting (which retries while QEMU has not created its socket
  yet), the greeting and the capabilities answer share ``connect_timeout``; each command has
  ``command_timeout`` (per client, or per call; ``None``: only the caller's cancel scopes bound it).
  Timeouts raise ``QmpTimeout``. QEMU serves one QMP client per socket: a second client is accepted by the
  kernel but gets no greeting until the first leaves, so a greeting timeout says so.
- **A command is written whole or not at all.** A half-written line would corrupt the stream for every
  later command, so the write is shielded from the caller's cancellation (a cancelled caller is noticed
  before anything is written) and bounded by ``SEND_TIMEOUT`` on its own; a QEMU that stops reading for that
  long loses its connection.
- **QEMU going away** (killed, exited, closed the socket, reset it, or broke the protocol) ends the
  connection: every command waiting for an answer fails with ``QmpConnectionError`` saying why, later calls
  fail the same way at once, and the event iterator ends after the events that arrived before.
- **Events are never allowed to stall the commands.** The reader never waits for the event consumer: the
  queue keeps the newest ``event_buffer`` events and counts what it dropped (``dropped_events``, logged), so
  a client that never reads events still gets its answers.
- A command that timed out or was cancelled may still run in QEMU; its late answer is dropped.
"""

from __future__ import annotations

import collections
import logging
import math
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
from typing import Any

import attrs
import trio

from kohakuriver_proto.errors import RemoteProtocolError
from kohakuriver_proto.qmp import (
    MAX_LINE,
    NEED_DATA,
    CommandFailed,
    ConnectionClosed,
    Greeting,
    QmpEvent,
    QmpMachine,
    Ready,
    Response,
)

__all__ = [
    "COMMAND_TIMEOUT",
    "CONNECT_TIMEOUT",
    "QmpClient",
    "QmpCommandError",
    "QmpConnectionError",
    "QmpError",
    "QmpTimeout",
    "VmRunState",
    "open_qmp",
]

log = logging.getLogger("kohakuriver.runner.qmp")

CONNECT_TIMEOUT = 10.0  # the socket appearing, the greeting and the capabilities answer, together
COMMAND_TIMEOUT = 30.0  # one command's answer (savevm of a big guest: pass a longer one per call)
SEND_TIMEOUT = 10.0  # writing one command: QEMU reads its socket all the time, even with the guest paused
EVENT_BUFFER = 256  # events kept for a consumer that reads them late
_CONNECT_RETRY = 0.05  # while the socket does not exist yet or refuses
_RECEIVE = 1 << 16
_DEFAULT: Any = object()  # "the client's command_timeout"


# -- errors --------------------------------------------------------------------------------------------------


class QmpError(Exception):
    """Anything this client raises about QMP."""


class QmpConnectionError(QmpError):
    """No connection could be made, or it ended (QEMU exited, was killed, or broke the protocol)."""


class QmpTimeout(QmpError, TimeoutError):
    """QEMU did not connect, greet, or answer in time."""


class QmpCommandError(QmpError):
    """QEMU answered a command with an error: ``error_class`` is QMP's (``CommandNotFound``,
    ``GenericError``, ``DeviceNotFound``, ...), ``description`` its text."""

    def __init__(self, command: str, error_class: str, description: str) -> None:
        super().__init__(f"{command}: {error_class}: {description}")
        self.command = command
        self.error_class = error_class
        self.description = description


@attrs.frozen
class VmRunState:
    """``query-status``: QEMU's run state (``running``, ``paused``, ``prelaunch``, ``shutdown``, ...)."""

    status: str
    running: bool


# -- the client ----------------------------------------------------------------------------------------------


class _Waiter:
    __slots__ = ("done", "error", "name", "value")

    def __init__(self, name: str) -> None:
        self.name = name
        self.done = trio.Event()
        self.value: Any = None
        self.error: QmpError | None = None


class QmpClient:
    """One negotiated QMP connection. Made by ``open_qmp``; valid inside its ``async with`` block."""

    def __init__(
        self,
        stream: trio.SocketStream,
        machine: QmpMachine,
        greeting: Greeting,
        *,
        command_timeout: float | None,
        event_buffer: int,
    ) -> None:
        self.greeting = greeting
        self.command_timeout = command_timeout
        self.dropped_events = 0
        self._stream = stream
        self._machine = machine
        self._send_lock = trio.Lock()
        self._waiters: dict[int, _Waiter] = {}
        self._events: collections.deque[QmpEvent] = collections.deque()
        self._event_buffer = event_buffer
        self._event_arrived = trio.Event()
        self._ended: str | None = None  # why the connection ended

    # -- state --

    @property
    def closed(self) -> bool:
        return self._ended is not None

    @property
    def close_reason(self) -> str | None:
        return self._ended

    # -- commands --

    async def execute(
        self,
        name: str,
        arguments: Mapping[str, Any] | None = None,
        /,
        *,
        timeout: float | None = _DEFAULT,
        **kwargs: Any,
    ) -> Any:
        """Run QMP command ``name`` and return its ``return`` value.

        Arguments come as a mapping (QMP names often hold ``-``: ``{"command-line": ...}``) and/or as keyword
        arguments, merged. ``timeout`` (seconds; ``None`` for none of its own) defaults to the client's
        ``command_timeout``; an argument really named ``timeout`` goes in the mapping. Raises
        ``QmpCommandError``, ``QmpTimeout`` or ``QmpConnectionError``.
        """
        if timeout is _DEFAULT:
            timeout = self.command_timeout
        merged = {**(arguments or {}), **kwargs} or None
        await trio.lowlevel.checkpoint_if_cancelled()  # a cancelled caller sends nothing
        self._check_open()
        waiter = _Waiter(name)
        command_id: int | None = None
        with trio.move_on_after(math.inf if timeout is None else timeout) as deadline:
            try:
                async with self._send_lock:
                    self._check_open()
                    # LocalProtocolError for a bad name or arguments: the caller's bug, raised as it is.
                    command_id, data = self._machine.execute(name, merged)
                    self._waiters[command_id] = waiter
                    await self._send_whole(data, name)
                await waiter.done.wait()
            finally:
                if command_id is not None:
                    self._waiters.pop(command_id, None)
        if deadline.cancelled_caught:
            raise QmpTimeout(f"QEMU did not answer {name} within {timeout} s")
        if waiter.error is not None:
            raise waiter.error
        return waiter.value

    async def query_status(self) -> VmRunState:
        value = await self.execute("query-status")
        try:
            return VmRunState(status=str(value["status"]), running=bool(value["running"]))
        except (KeyError, TypeError):
            raise QmpError(f"query-status answered {value!r}") from None

    async def stop(self) -> None:
        """Pause the guest's CPUs (QEMU emits ``STOP``)."""
        await self.execute("stop")

    async def cont(self) -> None:
        """Resume the guest's CPUs (QEMU emits ``RESUME``); also starts a VM launched with ``-S``."""
        await self.execute("cont")

    async def system_powerdown(self) -> None:
        """Press the ACPI power button; the guest decides (wait for ``SHUTDOWN``, with a deadline)."""
        await self.execute("system_powerdown")

    async def quit(self) -> None:
        """Make QEMU exit at once. QEMU may close the socket before its answer is read: that is success."""
        with suppress(QmpConnectionError):
            await self.execute("quit")

    async def human_monitor_command(self, command_line: str, *, timeout: float | None = _DEFAULT) -> str:
        """A human-monitor (HMP) command such as ``info block`` or ``savevm snap1``; its printed output."""
        return await self.execute("human-monitor-command", {"command-line": command_line}, timeout=timeout)

    # -- events --

    async def next_event(self) -> QmpEvent:
        """The oldest event not yet taken; waits for one. ``QmpConnectionError`` once the connection has
        ended and every event that came before the end was taken."""
        while not self._events:
            if self._ended is not None:
                raise QmpConnectionError(self._ended)
            if self._event_arrived.is_set():
                self._event_arrived = trio.Event()
            await self._event_arrived.wait()
        return self._events.popleft()

    async def wait_event(self, *names: str, timeout: float | None = None) -> QmpEvent:
        """The next event named one of ``names``; the events before it are taken and dropped. ``QmpTimeout``
        after ``timeout`` seconds, ``QmpConnectionError`` if the connection ends first."""
        with trio.move_on_after(math.inf if timeout is None else timeout):
            while True:
                event = await self.next_event()
                if event.name in names:
                    return event
        raise QmpTimeout(f"no {' or '.join(names)} event within {timeout} s")

    def __aiter__(self) -> AsyncIterator[QmpEvent]:
        """``async for event in client``: the events until the connection ends."""
        return self

    async def __anext__(self) -> QmpEvent:
        try:
            return await self.next_event()
        except QmpConnectionError:
            raise StopAsyncIteration from None

    # -- internals --

    def _check_open(self) -> None:
        if self._ended is not None:
            raise QmpConnectionError(self._ended)

    async def _send_whole(self, data: bytes, name: str) -> None:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(SEND_TIMEOUT) as bound:
                try:
                    await self._stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self._end(f"the QMP connection broke while sending {name}: {exc}")
                    raise QmpConnectionError(self._ended) from exc
            if bound.cancelled_caught:
                self._end(f"QEMU read nothing for {SEND_TIMEOUT} s while {name} was being sent")
                await self._stream.aclose()  # the reader stops; the half line is never continued
                raise QmpConnectionError(self._ended)

    def _push_event(self, event: QmpEvent) -> None:
        if len(self._events) >= self._event_buffer:
            self._events.popleft()
            self.dropped_events += 1
            if self.dropped_events == 1 or self.dropped_events % 1000 == 0:
                log.warning("QMP events are not being read: %d dropped so far", self.dropped_events)
        self._events.append(event)
        self._event_arrived.set()

    def _end(self, reason: str) -> None:
        """The connection is over: fail every waiting command and wake the event consumer. Idempotent."""
        if self._ended is not None:
            return
        self._ended = reason
        for waiter in self._waiters.values():
            waiter.error = QmpConnectionError(f"{waiter.name} got no answer: {reason}")
            waiter.done.set()
        self._waiters.clear()
        self._event_arrived.set()

    def _dispatch(self, event: object) -> None:
        if isinstance(event, QmpEvent):
            self._push_event(event)
        elif isinstance(event, Response | CommandFailed):
            waiter = self._waiters.pop(event.id, None)
            if waiter is None:  # its caller timed out or was cancelled
                log.debug("dropping the late answer to QMP command %d", event.id)
                return
            if isinstance(event, CommandFailed):
                waiter.error = QmpCommandError(waiter.name, event.error_class, event.description)
            else:
                waiter.value = event.value
            waiter.done.set()
        elif isinstance(event, ConnectionClosed):
            self._end("QEMU closed the QMP connection")

    async def _read(self) -> None:
        try:
            while self._ended is None:
                try:
                    data = await self._stream.receive_some(_RECEIVE)
                except trio.ClosedResourceError:
                    return  # we closed it; _end already said why
                except (trio.BrokenResourceError, OSError) as exc:
                    # A reset: QEMU exited or was killed with bytes of ours unread (after quit, often the
                    # newline that ends the command: QEMU acts on the closing brace).
                    cause = (
                        exc.__cause__ if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ else exc
                    )
                    self._end(f"QEMU closed the QMP connection abruptly ({cause})")
                    return
                self._machine.receive_data(data)
                try:
                    while (event := self._machine.next_event()) is not NEED_DATA:
                        self._dispatch(event)
                        if isinstance(event, ConnectionClosed):
                            return
                except RemoteProtocolError as exc:
                    log.warning("QEMU broke the QMP protocol: %s", exc)
                    self._end(f"QEMU broke the QMP protocol: {exc}")
                    return
        finally:
            self._end("the QMP client was closed")


# -- opening -------------------------------------------------------------------------------------------------


async def _open_socket(path: str) -> trio.SocketStream:
    """Connect, retrying while QEMU has not created (or not yet listens on) its socket."""
    while True:
        try:
            return await trio.open_unix_socket(path)
        except (FileNotFoundError, ConnectionRefusedError):
            await trio.sleep(_CONNECT_RETRY)


async def _negotiate(stream: trio.SocketStream, machine: QmpMachine, early: list[QmpEvent]) -> Greeting:
    """Greeting, then capabilities; events that come meanwhile go to ``early``."""
    greeting: Greeting | None = None
    while True:
        data = await stream.receive_some(_RECEIVE)
        machine.receive_data(data)
        while (event := machine.next_event()) is not NEED_DATA:
            if isinstance(event, Greeting):
                greeting = event
                await stream.send_all(machine.negotiate())
            elif isinstance(event, Ready):
                assert greeting is not None
                return greeting
            elif isinstance(event, QmpEvent):
                early.append(event)
            elif isinstance(event, ConnectionClosed):
                raise QmpConnectionError("QEMU closed the QMP connection before it was ready")


async def _connect(
    path: str, machine: QmpMachine, early: list[QmpEvent], timeout: float
) -> tuple[trio.SocketStream, Greeting]:
    stream: trio.SocketStream | None = None
    try:
        with trio.move_on_after(timeout):
            stream = await _open_socket(path)
            return stream, await _negotiate(stream, machine, early)
    except BaseException as exc:
        if stream is not None:
            await _close(stream)
        if isinstance(exc, OSError | trio.BrokenResourceError | RemoteProtocolError):
            raise QmpConnectionError(f"cannot talk QMP at {path}: {exc}") from exc
        raise
    if stream is None:
        raise QmpTimeout(f"no QMP socket to connect to at {path} within {timeout} s")
    await _close(stream)
    raise QmpTimeout(
        f"QMP at {path} was not ready within {timeout} s (QEMU serves one QMP client at a time: is another "
        "one connected?)"
    )


@asynccontextmanager
async def open_qmp(
    path: str | os.PathLike[str],
    *,
    connect_timeout: float = CONNECT_TIMEOUT,
    command_timeout: float | None = COMMAND_TIMEOUT,
    event_buffer: int = EVENT_BUFFER,
    max_line: int = MAX_LINE,
) -> AsyncIterator[QmpClient]:
    """Connect to the QMP socket at ``path``, negotiate, and yield the client; its reader task runs for the
    block. ``QmpTimeout`` when QEMU does not let us in within ``connect_timeout``; ``QmpConnectionError``
    when the connection fails otherwise."""
    path = os.fspath(path)
    machine = QmpMachine(max_line=max_line)
    early: list[QmpEvent] = []
    stream, greeting = await _connect(path, machine, early, connect_timeout)
    client = QmpClient(stream, machine, greeting, command_timeout=command_timeout, event_buffer=event_buffer)
    for event in early:
        client._push_event(event)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._read)
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()
    finally:
        client._end("the QMP client was closed")
        await _close(stream)


async def _close(stream: trio.SocketStream) -> None:
    with trio.CancelScope(shield=True):
        await stream.aclose()
