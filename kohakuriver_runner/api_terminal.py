"""``WS /ws/terminal/{task_id}``: a process in a task's or VPS's container, attached to a WebSocket.

The host connects here with the cluster token (``app.py`` checks it before the upgrade) on behalf of
``kr connect`` / ``kr terminal exec``; the message formats are ``kohakuriver_proto.terminal``'s. One session:

1. the start request (the client's first message, within ``START_WAIT`` seconds), validated by the
   protocol module; ``{task_id}`` is a decimal task id or container name this runner holds, running;
2. ``docker_exec``: create the exec (argv; no command = the container's login shell), start it on a
   hijacked connection, ``{"started": true}``, apply the initial TTY size;
3. two tasks: output -> binary messages (tagged 1/2 without a TTY), messages -> stdin / resize / stdin EOF;
4. the output ends -> ``{"exit": code}`` and a close with 1000.

Refusals are ``{"error": "...", "code": "..."}`` then a close whose reason is the same code
(``kohakuriver_proto.session_opening``): 1008 for a request that will not be served (bad start message:
``bad_request``; unknown task: ``not_found``; task not running or paused: ``not_running``), 1011 for Docker
failing (``internal``). A session that breaks after the start ends the same way. A client that goes away
closes the exec's connection and hangs the process up (SIGHUP, ``docker_exec.hang_up``), as a dropped SSH
session would: the engine alone would leave a TTY shell running forever.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from .daemon import Runtime

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
        container, task_id = _container(runtime, task_ref)
        exec_id, stream = await _start(runtime, container, task_id, request)
    except Refused as refused:
        log.info("terminal on %s refused: %s", task_ref[:40], refused.reason)
        await _refuse(ws, refused)
        return
    log.info("terminal on task %s: exec %s started (tty=%s)", task_id, exec_id[:12], request.tty)
    code: int | None = None
    try:
        code = await _session(runtime, ws, exec_id, stream, request)
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


def _container(runtime: Runtime, task_ref: str) -> tuple[str, int]:
    held = runtime.tunnels.lookup(task_ref)
    if held is None:
        raise Refused(RefusalCode.NOT_FOUND, f"this runner holds no task {task_ref[:40]}")
    if not held.running:
        raise Refused(RefusalCode.NOT_RUNNING, f"task {held.task_id} is not running ({held.status})")
    if not runtime.docker_status.available:
        raise Refused(
            RefusalCode.INTERNAL, f"Docker is not available on this runner: {runtime.docker_status.error}"
        )
    return held.name, held.task_id


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


async def _session(runtime: Runtime, ws: Any, exec_id: str, stream: ExecStream, request: StartRequest) -> int:
    """Pump both ways until the process's output ends; return its exit code. ``Refused``: a bad client
    message or Docker failing."""
    docker = runtime.docker
    await ws.send(encode_started())
    if request.tty:
        await _resize(docker, exec_id, request.rows, request.cols)
    problem: list[Refused] = []
    override: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_input, docker, ws, exec_id, stream, problem, nursery.cancel_scope)
        try:
            await _output(ws, stream, request.tty, override)
        except DockerError as exc:
            problem.append(Refused(RefusalCode.INTERNAL, f"the exec's output stream failed: {exc}"))
        nursery.cancel_scope.cancel()
    if problem:
        raise problem[0]
    if override:
        return override[0]
    try:
        return await exec_exit_code(docker, exec_id)
    except DockerError as exc:
        raise Refused(RefusalCode.INTERNAL, f"no exit code from Docker: {exc}") from None


async def _output(ws: Any, stream: ExecStream, tty: bool, override: list[int]) -> None:
    first = True
    while (piece := await stream.receive()) is not None:
        kind, data = piece
        if first:
            first = False
            failure = start_failure(data)
            if failure is not None:
                # The engine's "could not start" note goes to stderr, with a shell's exit status.
                message, code = failure
                override.append(code)
                text = (message + "\n").encode()
                await ws.send(encode_output(None if tty else Stream.STDERR, text))
                continue
        tag = None if tty else (Stream.STDERR if kind is StreamType.STDERR else Stream.STDOUT)
        await ws.send(encode_output(tag, data))


async def _input(
    docker: Any,
    ws: Any,
    exec_id: str,
    stream: ExecStream,
    problem: list[Refused],
    done: trio.CancelScope,
) -> None:
    while True:
        message = await ws.receive()
        try:
            parsed = parse_client_message(message)
        except ProtocolError as exc:
            problem.append(Refused(RefusalCode.BAD_REQUEST, f"bad message: {exc}"))
            done.cancel()
            return
        if isinstance(parsed, Stdin):
            await stream.send_input(parsed.data)
        elif isinstance(parsed, Resize):
            await _resize(docker, exec_id, parsed.rows, parsed.cols)
        elif isinstance(parsed, Eof):
            await stream.close_input()


async def _resize(docker: Any, exec_id: str, rows: int, cols: int) -> None:
    try:
        await resize_exec(docker, exec_id, rows, cols)
    except DockerError as exc:  # the process has just exited: nothing to resize
        log.debug("resize of exec %s failed: %s", exec_id[:12], exc)
