"""``WS /ws/terminal/{task_id}``: a process in a task's or VPS's container, or in a VM VPS, attached to a
WebSocket.

The host connects here with the cluster token (``app.py`` checks it before the upgrade) on behalf of
``kr connect`` / ``kr terminal exec``; the message formats are ``kohakuriver_proto.terminal``'s. One session:

1. the start request (the client's first message, within ``START_WAIT`` seconds), validated by the
   protocol module; ``{task_id}`` is a decimal task id or container name this runner holds, running;
2. the process starts: in a container, ``docker_exec`` creates the exec (argv; no command = the container's
   login shell) and starts it on a hijacked connection; in a VM (``Runtime.vm_terminal_target`` gives its
   SSH target), ``vm_terminal`` runs ssh as root with the runner's management key against the pinned host
   key (no command = the VM's login shell). Then ``{"started": true}`` and the initial TTY size;
3. two tasks: output -> binary messages (tagged 1/2 without a TTY), messages -> stdin / resize / stdin EOF;
4. the output ends -> ``{"exit": code}`` and a close with 1000.

Both kinds are one ``_Process`` to the session loop, so they behave alike; a VM needs no Docker.
Refusals are ``{"error": "...", "code": "..."}`` then a close whose reason is the same code
(``kohakuriver_proto.session_opening``): 1008 for a request that will not be served (bad start message:
``bad_request``; unknown task: ``not_found``; task not running or paused: ``not_running``), 1011 for Docker
or ssh failing to start (``internal``). A session that breaks after the start ends the same way. ssh that
starts but cannot reach the VM (unreachable, another host key) ends like a program that cannot start in a
container: its reason on stderr and an exit status, 255. A client that goes away closes the exec's
connection and hangs the process up (SIGHUP, ``docker_exec.hang_up``; in a VM ``VmSession.hang_up``), as a
dropped SSH session would: the engine alone would leave a TTY shell running forever.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol

import trio
from quart import websocket
from quart_trio import QuartTrio

from kohakuriver_proto.errors import ProtocolError, ValidationError
from kohakuriver_proto.session_opening import RefusalCode, terminal_refusal
from kohakuriver_proto.terminal import (
    NORMAL,
    Eof,
    Resize,
    StartRequest,
    Stdin,
    Stream,
    encode_exit,
    encode_output,
    encode_started,
    parse_client_message,
    parse_start,
)

from .docker_api import Conflict, DockerError, NotFound
from .docker_exec import (
    ExecConfig,
    ExecStream,
    create_exec,
    exec_exit_code,
    hang_up,
    login_shell,
    resize_exec,
    start_exec,
    start_failure,
)
from .docker_logs import StreamType
from .vm_ssh import VmSshTarget
from .vm_terminal import VmSession, VmTerminalError, VmTerminalTargets, open_vm_session

if TYPE_CHECKING:
    from .daemon import Runtime
    from .tunnel_server import HeldContainer

__all__ = ["TERMINAL_ROUTE", "register", "serve_terminal"]

log = logging.getLogger("kohakuriver.runner.terminal")

TERMINAL_ROUTE = "/ws/terminal/<task_ref>"
#: Seconds the client has to send its start request after the upgrade.
START_WAIT = 10.0
DEFAULT_TERM = "xterm-256color"
#: Time for the last messages and the close frame when a session ends.
CLOSE_WAIT = 2.0


class Refused(Exception):
    def __init__(self, code: RefusalCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def register(app: QuartTrio, runtime: Runtime) -> None:
    @app.websocket(TERMINAL_ROUTE)
    async def terminal(task_ref: str) -> None:
        await websocket.accept()
        await serve_terminal(runtime, task_ref, websocket._get_current_object())


async def _close(ws: Any, code: int, reason: str) -> None:
    try:
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_WAIT):
            await ws.close(code, reason.encode()[:120].decode("utf-8", "ignore"))
    except Exception:  # the client is already gone
        pass


async def _refuse(ws: Any, refused: Refused) -> None:
    opening = terminal_refusal(refused.code, refused.reason)
    try:
        with trio.move_on_after(CLOSE_WAIT):
            await ws.send(opening.text)
    except Exception:
        pass
    await _close(ws, opening.close_code, opening.close_reason)


async def serve_terminal(runtime: Runtime, task_ref: str, ws: Any) -> None:
    """Run one terminal session on the accepted WebSocket ``ws``; every refusal is answered here."""
    try:
        request = await _start_request(ws)
        held = _held(runtime, task_ref)
        target = _vm_target(runtime, held.task_id)
        if target is None:
            _require_docker(runtime)
    except Refused as refused:
        log.info("terminal on %s refused: %s", task_ref[:40], refused.reason)
        await _refuse(ws, refused)
        return
    if target is not None:
        await _serve_vm(ws, target, request)
    else:
        await _serve_container(runtime, ws, held.name, held.task_id, request)


async def _serve_container(
    runtime: Runtime, ws: Any, container: str, task_id: int, request: StartRequest
) -> None:
    try:
        exec_id, stream = await _start(runtime, container, task_id, request)
    except Refused as refused:
        log.info("terminal on task %s refused: %s", task_id, refused.reason)
        await _refuse(ws, refused)
        return
    log.info("terminal on task %s: exec %s started (tty=%s)", task_id, exec_id[:12], request.tty)
    code: int | None = None
    try:
        code = await _session(ws, _DockerProcess(runtime.docker, exec_id, stream, request.tty), request)
    except Refused as refused:
        log.warning("terminal on task %s failed: %s", task_id, refused.reason)
        await _refuse(ws, refused)
        return
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()
            if code is None:  # the client went away (or the session broke) with the process running
                await _hang_up(runtime.docker, exec_id)
    log.info("terminal on task %s: exec %s exited with %d", task_id, exec_id[:12], code)
    await _exited(ws, code)


async def _serve_vm(ws: Any, target: VmSshTarget, request: StartRequest) -> None:
    """The same session in a VM, through ``vm_terminal`` (ssh as root with the management key). Leaving
    ``open_vm_session`` early (the client went away, a bad message) hangs the session up there."""
    task_id = target.task_id
    try:
        async with open_vm_session(target, request) as session:
            log.info("terminal on task %s: ssh to the VM started (tty=%s)", task_id, request.tty)
            code = await _session(ws, _VmProcess(session), request)
    except VmTerminalError as exc:
        refused = Refused(RefusalCode.INTERNAL, f"cannot open a terminal in the VM: {exc.reason}")
        log.warning("terminal on task %s refused: %s", task_id, refused.reason)
        await _refuse(ws, refused)
        return
    except Refused as refused:
        log.warning("terminal on task %s failed: %s", task_id, refused.reason)
        await _refuse(ws, refused)
        return
    log.info("terminal on task %s: the VM session exited with %d", task_id, code)
    await _exited(ws, code)


async def _exited(ws: Any, code: int) -> None:
    try:
        with trio.move_on_after(CLOSE_WAIT):
            await ws.send(encode_exit(code))
    except Exception:
        pass
    await _close(ws, NORMAL, "exited")


async def _hang_up(docker: Any, exec_id: str) -> None:
    try:
        with trio.move_on_after(CLOSE_WAIT):
            if await hang_up(docker, exec_id):
                log.info("exec %s: hung up (its client went away)", exec_id[:12])
    except DockerError as exc:
        log.info("exec %s: cannot hang up: %s", exec_id[:12], exc)


async def _start_request(ws: Any) -> StartRequest:
    with trio.move_on_after(START_WAIT):
        message = await ws.receive()
        try:
            return parse_start(message)
        except ValidationError as exc:
            raise Refused(RefusalCode.BAD_REQUEST, f"bad start request: {exc}") from None
        except ProtocolError as exc:
            raise Refused(RefusalCode.BAD_REQUEST, f"bad start request: {exc}") from None
    raise Refused(RefusalCode.BAD_REQUEST, f"no start request within {START_WAIT:.0f} s")


def _held(runtime: Runtime, task_ref: str) -> HeldContainer:
    held = runtime.tunnels.lookup(task_ref)
    if held is None:
        raise Refused(RefusalCode.NOT_FOUND, f"this runner holds no task {task_ref[:40]}")
    if not held.running:
        raise Refused(RefusalCode.NOT_RUNNING, f"task {held.task_id} is not running ({held.status})")
    return held


def _vm_target(runtime: Runtime, task_id: int) -> VmSshTarget | None:
    """The SSH target when the task is a VM VPS (``Runtime.vm_terminal_target``), None for a container.
    A runtime without VM support has no such attribute: every task is a container then."""
    targets: VmTerminalTargets | None = getattr(runtime, "vm_terminal_target", None)
    return None if targets is None else targets(task_id)


def _require_docker(runtime: Runtime) -> None:
    if not runtime.docker_status.available:
        raise Refused(
            RefusalCode.INTERNAL, f"Docker is not available on this runner: {runtime.docker_status.error}"
        )


async def _start(
    runtime: Runtime, container: str, task_id: int, request: StartRequest
) -> tuple[str, ExecStream]:
    docker = runtime.docker
    env = dict(request.env)
    if request.tty:
        env.setdefault("TERM", DEFAULT_TERM)
    try:
        command = request.command or await login_shell(docker, container)
        config = ExecConfig(
            command=command, tty=request.tty, env=env, user=request.user, workdir=request.workdir
        )
        exec_id = await create_exec(docker, container, config)
        stream = await start_exec(docker, exec_id, tty=request.tty)
    except (NotFound, Conflict) as exc:  # the container ended, or is paused, since the lookup
        raise Refused(
            RefusalCode.NOT_RUNNING, f"task {task_id} cannot run commands now: {exc.message}"
        ) from None
    except DockerError as exc:
        raise Refused(RefusalCode.INTERNAL, f"Docker refused the exec: {exc}") from None
    return exec_id, stream


class _Process(Protocol):
    """What a session drives: a process in a container (``docker_exec``) or in a VM (``vm_terminal``).
    Failures are ``Refused`` (``internal``)."""

    async def receive(self) -> tuple[Stream | None, bytes] | None: ...
    async def send_input(self, data: bytes) -> None: ...
    async def close_input(self) -> None: ...
    async def resize(self, rows: int, cols: int) -> None: ...
    async def ending(self) -> tuple[int, bytes | None]: ...


async def _session(ws: Any, process: _Process, request: StartRequest) -> int:
    """Pump both ways until the process's output ends; return its exit code. ``Refused``: a bad client
    message or the process's backend failing."""
    await ws.send(encode_started())
    if request.tty:
        await process.resize(request.rows, request.cols)
    problem: list[Refused] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_input, ws, process, problem, nursery.cancel_scope)
        try:
            await _output(ws, process)
        except Refused as refused:
            problem.append(refused)
        nursery.cancel_scope.cancel()
    if problem:
        raise problem[0]
    code, note = await process.ending()
    if note:
        # Why the process ended without running (the engine's start failure, ssh failing) goes to stderr.
        await ws.send(encode_output(None if request.tty else Stream.STDERR, note))
    return code


async def _output(ws: Any, process: _Process) -> None:
    while (piece := await process.receive()) is not None:
        await ws.send(encode_output(*piece))


async def _input(ws: Any, process: _Process, problem: list[Refused], done: trio.CancelScope) -> None:
    while True:
        message = await ws.receive()
        try:
            parsed = parse_client_message(message)
        except ProtocolError as exc:
            problem.append(Refused(RefusalCode.BAD_REQUEST, f"bad message: {exc}"))
            done.cancel()
            return
        if isinstance(parsed, Stdin):
            await process.send_input(parsed.data)
        elif isinstance(parsed, Resize):
            await process.resize(parsed.rows, parsed.cols)
        elif isinstance(parsed, Eof):
            await process.close_input()


class _DockerProcess:
    """An exec in a container: its hijacked stream, the engine's "could not start" note, its exit code."""

    def __init__(self, docker: Any, exec_id: str, stream: ExecStream, tty: bool) -> None:
        self.docker, self.exec_id, self.stream, self.tty = docker, exec_id, stream, tty
        self._first = True
        self._override: tuple[int, bytes] | None = None

    async def receive(self) -> tuple[Stream | None, bytes] | None:
        try:
            piece = await self.stream.receive()
        except DockerError as exc:
            raise Refused(RefusalCode.INTERNAL, f"the exec's output stream failed: {exc}") from None
        if piece is None:
            return None
        kind, data = piece
        if self._first:
            self._first = False
            failure = start_failure(data)
            if failure is not None:
                # The engine's "could not start" note goes to stderr, with a shell's exit status.
                message, code = failure
                self._override = (code, (message + "\n").encode())
                return await self.receive()
        return (None if self.tty else (Stream.STDERR if kind is StreamType.STDERR else Stream.STDOUT)), data

    async def send_input(self, data: bytes) -> None:
        await self.stream.send_input(data)

    async def close_input(self) -> None:
        await self.stream.close_input()

    async def resize(self, rows: int, cols: int) -> None:
        try:
            await resize_exec(self.docker, self.exec_id, rows, cols)
        except DockerError as exc:  # the process has just exited: nothing to resize
            log.debug("resize of exec %s failed: %s", self.exec_id[:12], exc)

    async def ending(self) -> tuple[int, bytes | None]:
        if self._override is not None:
            return self._override
        try:
            return await exec_exit_code(self.docker, self.exec_id), None
        except DockerError as exc:
            raise Refused(RefusalCode.INTERNAL, f"no exit code from Docker: {exc}") from None


class _VmProcess:
    """A command in a VM over ssh; exit status 255 with a reason in ssh's log = ssh failed, said on stderr."""

    def __init__(self, session: VmSession) -> None:
        self.session = session

    async def receive(self) -> tuple[Stream | None, bytes] | None:
        return await self.session.receive()

    async def send_input(self, data: bytes) -> None:
        await self.session.send_input(data)

    async def close_input(self) -> None:
        await self.session.close_input()

    async def resize(self, rows: int, cols: int) -> None:
        self.session.resize(rows, cols)

    async def ending(self) -> tuple[int, bytes | None]:
        code = await self.session.wait()
        if code != 255:
            return code, None
        reason = await self.session.failure()
        if reason is None:
            return code, None
        newline = "\r\n" if self.session.tty else "\n"
        return code, f"kohakuriver: {reason}{newline}".encode()
