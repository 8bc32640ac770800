"""``kr connect TASK_ID [-- COMMAND...]`` and ``kr terminal exec TASK_ID -- COMMAND...``: a process in a
running task or VPS, over the host's ``/ws/terminal/{task_id}`` (formats: ``kohakuriver_proto.terminal``).

``kr connect``: with stdin a terminal, a TTY session: the local terminal goes to raw mode (restored on every
way out: exit, error, Ctrl-C, SIGTERM, SIGHUP), its size is sent at start and on every SIGWINCH, and
keys, Ctrl-C included, go to the remote side. Without a terminal on stdin (pipes), the same without a TTY.
No COMMAND = the container's login shell.

``kr terminal exec``: never a TTY; stdout and stderr of the command go to the local stdout and stderr.
Stdin is passed on when it is a pipe or a file; from a terminal the command gets EOF at once, as
``docker exec`` without ``-i`` (use ``kr connect`` to type into a program).

Exit codes: the remote command's; 3 unknown or not running task, 4 not allowed (or too many terminals), 5
host unreachable, 2 bad argument, 1 other failures (node offline, the session dropped without an exit
status); 128+N after signal N locally. A refusal's exit code follows its machine-readable code
(``kohakuriver_proto.session_opening``), never its words.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import attrs
import click

from kohakuriver_proto.errors import ProtocolError, ValidationError
from kohakuriver_proto.session_opening import refused
from kohakuriver_proto.terminal import (
    DEFAULT_COLS,
    DEFAULT_ROWS,
    Closed,
    Exited,
    Failed,
    Output,
    Refused,
    StartRequest,
    Stream,
    TerminalClient,
)

from .client import (
    EXIT_ERROR,
    EXIT_FORBIDDEN,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    CliError,
    one_line,
)
from .context import CliContext, KrCommand, KrGroup, pass_cli

_TASK_ID = re.compile(r"[0-9]{1,20}")
_WS_SCHEMES = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}
#: The host answers within 10 s; the slack covers connecting.
ANSWER_TIMEOUT = 15.0
CONNECT_TIMEOUT = 10.0
READ_SIZE = 64 * 1024


def terminal_url(host_url: str, task_id: str) -> str:
    """``http(s)://host[:port][/prefix]`` -> ``ws(s)://host[:port][/prefix]/ws/terminal/{task_id}``."""
    parts = urlsplit(host_url)
    scheme = _WS_SCHEMES.get(parts.scheme.lower())
    if scheme is None or not parts.netloc:
        raise CliError(f"invalid host URL {host_url!r}: use http:// or https://", EXIT_USAGE)
    path = f"{parts.path.rstrip('/')}/ws/terminal/{quote(task_id, safe='')}"
    return urlunsplit((scheme, parts.netloc, path, "", ""))


@attrs.frozen
class SessionSpec:
    url: str
    token: str | None
    request: StartRequest
    #: Put the local terminal (stdin) in raw mode and follow its size.
    local_tty: bool
    #: Pass local stdin on (else the remote stdin is closed at once).
    forward_stdin: bool
    ssl_context: Any = None


@attrs.frozen
class SessionEnd:
    exit_code: int
    message: str | None = None  # said on stderr when set


# -- the local terminal -------------------------------------------------------------------------------------


def terminal_size(fd: int) -> tuple[int, int]:
    """(rows, cols) of the terminal on ``fd``, the defaults when it has none."""
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return DEFAULT_ROWS, DEFAULT_COLS
    return size.lines or DEFAULT_ROWS, size.columns or DEFAULT_COLS


@contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """The terminal on ``fd`` in raw mode (keys go through unprocessed: Ctrl-C is a byte, not SIGINT), the
    saved settings put back however the block ends."""
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    try:
        # TCSADRAIN, not setraw's default TCSAFLUSH: keys typed before the session started are kept.
        tty.setraw(fd, termios.TCSADRAIN)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


# -- the session --------------------------------------------------------------------------------------------


async def run_session(spec: SessionSpec) -> SessionEnd:
    """One terminal session, start to exit status. Signals SIGTERM/SIGHUP end it with 128+N."""
    import trio

    end: list[SessionEnd] = []
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                async for signum in signals:
                    end.append(SessionEnd(128 + signum, None))
                    nursery.cancel_scope.cancel()

            async def session() -> None:
                end.append(await _session(spec))
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_signals)
            nursery.start_soon(session)
    return end[0]


async def _session(spec: SessionSpec) -> SessionEnd:
    import trio
    import trio_websocket

    headers = [(b"authorization", f"Bearer {spec.token}".encode())] if spec.token else []
    client = TerminalClient(spec.request)
    try:
        async with trio_websocket.open_websocket_url(
            spec.url,
            ssl_context=spec.ssl_context,
            extra_headers=headers,
            connect_timeout=CONNECT_TIMEOUT,
            disconnect_timeout=2,
        ) as ws:
            # A refusal may close the connection before the request is read: its reason is then among
            # the messages received, which _converse reads.
            with contextlib.suppress(trio_websocket.ConnectionClosed):
                await ws.send_message(client.start())
            return await _converse(ws, client, spec)
    except trio_websocket.ConnectionRejected as exc:
        status = exc.status_code
        detail = one_line((exc.body or b"").decode("utf-8", "replace"), 200)
        code = EXIT_FORBIDDEN if status in (401, 403) else EXIT_ERROR
        return SessionEnd(code, f"the host refused the terminal: HTTP {status} {detail}".rstrip())
    except (trio_websocket.HandshakeError, OSError, trio.TooSlowError) as exc:
        return SessionEnd(
            EXIT_UNREACHABLE, f"cannot reach the host at {spec.url}: {exc or type(exc).__name__}"
        )


async def _converse(ws: Any, client: TerminalClient, spec: SessionSpec) -> SessionEnd:
    import trio
    import trio_websocket

    out = _Writer(1)
    err = _Writer(2)
    try:
        with trio.move_on_after(ANSWER_TIMEOUT) as answer:
            first = await _next_message(ws)
        if answer.cancelled_caught:
            return SessionEnd(EXIT_ERROR, f"the host did not answer within {ANSWER_TIMEOUT:.0f} s")
        if isinstance(first, Closed):
            return SessionEnd(EXIT_ERROR, _dropped(first))
        events = client.receive(first)
        if events and isinstance(events[0], Refused):
            closed = await _wait_close(ws)
            event = events[0]
            refusal = refused(event.reason, closed.code, closed.reason, code_name=event.code_name)
            return SessionEnd(refusal.exit_code, refusal.reason or "the host refused the terminal")
        if not client.running:
            return SessionEnd(EXIT_ERROR, "unexpected first message from the host")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_pump_stdin, ws, client, spec)
            if spec.local_tty and spec.request.tty:
                nursery.start_soon(_follow_size, ws, client)
            result = await _receive_output(ws, client, out, err)
            nursery.cancel_scope.cancel()
        return result
    except ProtocolError as exc:
        return SessionEnd(EXIT_ERROR, f"the host broke the terminal protocol: {exc}")
    except trio_websocket.ConnectionClosed as exc:
        return SessionEnd(EXIT_ERROR, _dropped(client.closed(*_close_of(exc))))
    finally:
        await out.aclose()
        await err.aclose()


def _close_of(exc: Any) -> tuple[int | None, str]:
    reason = getattr(exc, "reason", None)
    return getattr(reason, "code", None), getattr(reason, "reason", None) or ""


async def _next_message(ws: Any) -> str | bytes | Closed:
    import trio_websocket

    try:
        return await ws.get_message()
    except trio_websocket.ConnectionClosed as exc:
        code, reason = _close_of(exc)
        return Closed(code, reason, False)


async def _wait_close(ws: Any) -> Closed:
    import trio

    with trio.move_on_after(2):
        while True:
            message = await _next_message(ws)
            if isinstance(message, Closed):
                return message
    return Closed(None, "", False)


def _dropped(closed: Closed) -> str:
    text = f" (code {closed.code}{': ' + one_line(closed.reason, 200) if closed.reason else ''})"
    return "the session ended without an exit status" + (text if closed.code else "")


async def _receive_output(ws: Any, client: TerminalClient, out: _Writer, err: _Writer) -> SessionEnd:
    failure: str | None = None
    while True:
        message = await _next_message(ws)
        if isinstance(message, Closed):
            closed = client.closed(message.code, message.reason)
            if closed.clean and client.exit_code is not None:
                return SessionEnd(client.exit_code)
            return SessionEnd(EXIT_ERROR, failure or _dropped(closed))
        try:
            events = client.receive(message)
        except ProtocolError as exc:  # here, not in the caller: a nursery would wrap it in a group
            return SessionEnd(EXIT_ERROR, f"the host broke the terminal protocol: {exc}")
        for event in events:
            if isinstance(event, Output):
                await (err if event.stream is Stream.STDERR else out).write(event.data)
            elif isinstance(event, Failed):
                failure = event.reason
            elif isinstance(event, Exited):
                pass  # the close follows; the exit code is kept by the client


async def _pump_stdin(ws: Any, client: TerminalClient, spec: SessionSpec) -> None:
    """Local stdin -> the remote process. A closed connection ends this quietly: the output side reads
    why it closed."""
    import trio
    import trio_websocket

    try:
        if not spec.forward_stdin:
            await ws.send_message(client.eof())
            return
        stdin = trio.lowlevel.FdStream(os.dup(0))
        try:
            while True:
                data = await stdin.receive_some(READ_SIZE)
                if not data:
                    await ws.send_message(client.eof())
                    return
                await ws.send_message(client.stdin(data))
        finally:
            await stdin.aclose()
    except trio_websocket.ConnectionClosed:
        return


async def _follow_size(ws: Any, client: TerminalClient) -> None:
    import trio
    import trio_websocket

    with trio.open_signal_receiver(signal.SIGWINCH) as winch:
        async for _ in winch:
            rows, cols = terminal_size(0)
            try:
                await ws.send_message(client.resize(rows, cols))
            except trio_websocket.ConnectionClosed:
                return


class _Writer:
    """Local stdout/stderr without blocking the loop (a paused terminal or a full pipe just waits).

    ``FdStream`` on a duplicate makes the shared file description non-blocking while the session runs and
    puts it back on close."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._stream: Any = None
        self._broken = False

    async def write(self, data: bytes) -> None:
        import trio

        if self._broken or not data:
            return
        if self._stream is None:
            self._stream = trio.lowlevel.FdStream(os.dup(self._fd))
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, OSError):
            self._broken = True  # the reader went away (| head): drop the rest, keep the exit status

    async def aclose(self) -> None:
        import trio

        if self._stream is not None:
            with trio.CancelScope(shield=True):
                await self._stream.aclose()


# -- the commands -------------------------------------------------------------------------------------------


def _request(tty: bool, command: tuple[str, ...], user: str | None, workdir: str | None) -> StartRequest:
    rows, cols = terminal_size(0) if tty else (DEFAULT_ROWS, DEFAULT_COLS)
    env = {"TERM": os.environ["TERM"]} if tty and os.environ.get("TERM") else {}
    try:
        return StartRequest(
            tty=tty, command=list(command) or None, rows=rows, cols=cols, env=env, user=user, workdir=workdir
        )
    except ValidationError as exc:
        raise CliError(f"invalid {exc.field}: {exc.message}", EXIT_USAGE) from None


def _run(
    cli: CliContext, task_id: str, request: StartRequest, *, local_tty: bool, forward_stdin: bool
) -> None:
    import trio

    if not _TASK_ID.fullmatch(task_id):
        raise CliError(f"invalid task id {task_id!r}: expected a decimal number", EXIT_USAGE)
    settings = cli.settings()
    url = terminal_url(settings.host_url, task_id)
    spec = SessionSpec(
        url=url,
        token=settings.token,
        request=request,
        local_tty=local_tty,
        forward_stdin=forward_stdin,
        ssl_context=_ssl_context() if url.startswith("wss:") else None,
    )
    try:
        if local_tty:
            with raw_mode(0):
                end = trio.run(run_session, spec)
        else:
            end = trio.run(run_session, spec)
    except KeyboardInterrupt:
        end = SessionEnd(128 + signal.SIGINT, None)
    if end.message:
        raise CliError(one_line(end.message), end.exit_code or EXIT_ERROR)
    sys.stdout.flush()
    raise click.exceptions.Exit(end.exit_code)


def _ssl_context() -> Any:
    import httpx

    return httpx.create_ssl_context()


_COMMAND_ARGS = {"nargs": -1, "type": click.UNPROCESSED}


@click.command("connect", cls=KrCommand)
@click.argument("task_id")
@click.option("--user", "-u", metavar="USER[:GROUP]", help="Run as this user (name or uid) in the container.")
@click.option("--workdir", "-w", metavar="DIR", help="Working directory in the container.")
@click.argument("command", **_COMMAND_ARGS)
@pass_cli
def connect(
    cli: CliContext, task_id: str, user: str | None, workdir: str | None, command: tuple[str, ...]
) -> None:
    """Open a shell (or run COMMAND) in running task or VPS TASK_ID, interactively.

    With a terminal: a TTY session (raw mode, window size followed); exits with the remote exit code.
    Put COMMAND after `--`: `kr connect 123 -- top`.
    """
    local_tty = os.isatty(0)
    request = _request(local_tty, command, user, workdir)
    _run(cli, task_id, request, local_tty=local_tty, forward_stdin=True)


@click.group("terminal", cls=KrGroup)
def terminal() -> None:
    """Run commands in running tasks and VPS (see also `kr connect`)."""


@terminal.command("exec", cls=KrCommand)
@click.argument("task_id")
@click.option("--user", "-u", metavar="USER[:GROUP]", help="Run as this user (name or uid) in the container.")
@click.option("--workdir", "-w", metavar="DIR", help="Working directory in the container.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@pass_cli
def exec_command(
    cli: CliContext, task_id: str, user: str | None, workdir: str | None, command: tuple[str, ...]
) -> None:
    """Run COMMAND (after `--`) in TASK_ID without a TTY; its output, and its exit code.

    `kr terminal exec 123 -- ls -l /` (an argv: no shell unless you run one, `-- sh -c '...'`).
    """
    request = _request(False, command, user, workdir)
    _run(cli, task_id, request, local_tty=False, forward_stdin=not os.isatty(0))
