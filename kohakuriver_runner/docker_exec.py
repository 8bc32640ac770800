"""Interactive ``docker exec``: a process in a running container with a live, two-way stream (terminals).

The Engine API does this in three calls:

1. ``POST /containers/{id}/exec`` (argv ``Cmd``, ``Tty``, ``AttachStdin/Stdout/Stderr``, ``Env``, ``User``,
   ``WorkingDir``) -> an exec id; ``create_exec``.
2. ``POST /exec/{id}/start`` with ``Connection: Upgrade`` / ``Upgrade: tcp``: the engine answers
   ``101 UPGRADED`` and the HTTP connection becomes the process's stdin (our writes) and output (our
   reads). httpx cannot hand over a connection like that, so ``start_exec`` opens the Unix socket with trio
   itself, speaks the request with h11 and keeps the socket after the 101 (``conn.trailing_data`` holds
   output that came in the same read as the response head). With a TTY the output is the terminal's raw
   bytes; without, it is Docker's 8-byte multiplexed stdout/stderr frames (``docker_logs.MultiplexDecoder``).
   Half-closing our side (``close_input``) closes the process's stdin.
3. ``POST /exec/{id}/resize?h=&w=`` while it runs, and ``GET /exec/{id}/json`` for the exit code once the
   stream has ended (``exit_code``).

The short calls go through the runner's ``DockerClient`` (its error mapping and timeouts); only the hijacked
connection is opened here. Errors are the ``docker_api`` ones: ``NotFound``, ``Conflict`` (container not
running or paused), ``DockerUnavailable``, ``DockerTimeout``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
from collections.abc import Mapping

import attrs
import h11
import trio

from .docker_api import (
    API_VERSION,
    DockerClient,
    DockerError,
    DockerTimeout,
    DockerUnavailable,
    NotFound,
    container_ref,
)
from .docker_logs import MultiplexDecoder, StreamFormatError, StreamType

__all__ = [
    "ExecConfig",
    "ExecStream",
    "create_exec",
    "exec_exit_code",
    "hang_up",
    "login_shell",
    "resize_exec",
    "start_exec",
    "start_failure",
]

log = logging.getLogger("kohakuriver.runner.exec")

#: Connecting and reading the 101: the engine answers at once unless it is stuck.
START_TIMEOUT = 10.0
#: How long the engine may take to record the exit code after the output stream ended.
EXIT_CODE_TIMEOUT = 10.0
READ_SIZE = 64 * 1024
#: Largest response head/body of a refused start that is read (a JSON error message).
MAX_ERROR_BODY = 64 * 1024
SHELLS = ("/bin/bash", "/bin/sh")


@attrs.frozen(kw_only=True)
class ExecConfig:
    """One exec: an argv (never a shell string) and how to attach it."""

    command: tuple[str, ...] = attrs.field(converter=tuple)
    tty: bool = False
    stdin: bool = True
    env: Mapping[str, str] = attrs.field(factory=dict)
    user: str | None = None
    workdir: str | None = None

    def to_api(self) -> dict:
        if not self.command:
            raise ValueError("exec needs a command")
        body: dict = {
            "Cmd": list(self.command),
            "Tty": self.tty,
            "AttachStdin": self.stdin,
            "AttachStdout": True,
            "AttachStderr": True,
            "Env": [f"{k}={v}" for k, v in self.env.items()],
        }
        if self.user:
            body["User"] = self.user
        if self.workdir:
            body["WorkingDir"] = self.workdir
        return body


def _exec_path(exec_id: str, what: str) -> str:
    if not exec_id or not all(c in "0123456789abcdefABCDEF" for c in exec_id):
        raise ValueError(f"invalid exec id {exec_id[:80]!r}")
    return f"/exec/{exec_id}/{what}"


async def create_exec(docker: DockerClient, container: str, config: ExecConfig) -> str:
    """Prepare the exec in a running container; return its id (``Conflict``: not running or paused)."""
    path = f"/containers/{container_ref(container)}/exec"  # the name checked like every other container call
    resp = await docker.request("POST", path, json_body=config.to_api())
    return str(resp.json()["Id"])


async def login_shell(docker: DockerClient, container: str) -> tuple[str, ...]:
    """``/bin/bash`` when the container has it, else ``/bin/sh`` (asked through the archive API, so
    nothing runs in the container to find out)."""
    for shell in SHELLS[:-1]:
        try:
            await docker.stat_path(container, shell)
        except NotFound:
            continue
        return (shell,)
    return (SHELLS[-1],)


async def resize_exec(docker: DockerClient, exec_id: str, rows: int, cols: int) -> None:
    """Set the exec's TTY size (the process gets SIGWINCH)."""
    await docker.request("POST", _exec_path(exec_id, "resize"), params={"h": rows, "w": cols})


async def exec_exit_code(docker: DockerClient, exec_id: str, *, timeout: float = EXIT_CODE_TIMEOUT) -> int:
    """The exit code once the process ended; the engine records it a moment after the stream closes."""
    delay = 0.005
    with trio.move_on_after(timeout):
        while True:
            data = (await docker.request("GET", _exec_path(exec_id, "json"))).json()
            if not data.get("Running") and data.get("ExitCode") is not None:
                return int(data["ExitCode"])
            await trio.sleep(delay)
            delay = min(delay * 2, 0.25)
    raise DockerTimeout(None, f"exec {exec_id[:12]} has no exit code after {timeout:.0f} s")


class ExecStream:
    """The hijacked connection of a started exec. One reader and one writer task may use it at once."""

    def __init__(self, stream: trio.SocketStream, tty: bool, initial: bytes, closed: bool) -> None:
        self.tty = tty
        self._stream = stream
        self._initial = initial
        self._eof = closed
        self._decoder = None if tty else MultiplexDecoder()
        self._input_closed = False

    async def receive(self) -> tuple[StreamType, bytes] | None:
        """The next piece of output: ``(STDOUT, data)`` for a TTY, the frame's stream otherwise; None when
        the process's output has ended (it exited, or closed both stdout and stderr)."""
        while True:
            if self._decoder is not None:
                chunk = self._decoder.next_chunk()
                if chunk is not None:
                    if chunk.stream in (StreamType.STDOUT, StreamType.STDERR):
                        return chunk.stream, chunk.data
                    continue  # stdin echo or engine notes: not the process's output
            data = self._take_initial()
            if data is None:
                if self._eof:
                    return self._end()
                try:
                    data = await self._stream.receive_some(READ_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    self._eof = True
                    return self._end()
            if self._decoder is None:
                return StreamType.STDOUT, data
            try:
                self._decoder.receive_data(data)
            except StreamFormatError as exc:
                raise DockerError(None, f"malformed exec output stream: {exc}") from exc

    def _take_initial(self) -> bytes | None:
        data, self._initial = self._initial, b""
        return data or None

    def _end(self) -> None:
        if self._decoder is not None:
            # A process killed mid-frame: what arrived was handed out already.
            with contextlib.suppress(StreamFormatError, RuntimeError):
                self._decoder.close()
        return None

    async def send_input(self, data: bytes) -> None:
        """Bytes for the process's stdin (dropped once stdin was closed or the process is gone)."""
        if self._input_closed or not data:
            return
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._input_closed = True

    async def close_input(self) -> None:
        """Close the process's stdin (a half-close of the connection: output keeps coming)."""
        if self._input_closed:
            return
        self._input_closed = True
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


async def start_exec(
    docker: DockerClient, exec_id: str, *, tty: bool, timeout: float = START_TIMEOUT
) -> ExecStream:
    """Start a created exec and take over its connection. The caller owns the stream (``aclose``)."""
    path = f"/{API_VERSION}{_exec_path(exec_id, 'start')}"
    where = f"unix://{docker.socket_path}"
    try:
        stream = await trio.open_unix_socket(docker.socket_path)
    except OSError as exc:
        raise DockerUnavailable(None, f"cannot reach Docker at {where}: {exc}") from None
    try:
        with trio.fail_after(timeout):
            initial, closed = await _upgrade(stream, path, tty)
    except trio.TooSlowError:
        await trio.aclose_forcefully(stream)
        raise DockerTimeout(None, f"Docker did not start exec {exec_id[:12]} in time ({where})") from None
    except (trio.BrokenResourceError, h11.ProtocolError) as exc:
        await trio.aclose_forcefully(stream)
        raise DockerUnavailable(None, f"exec start failed on {where}: {exc}") from None
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return ExecStream(stream, tty, initial, closed)


async def _upgrade(stream: trio.SocketStream, path: str, tty: bool) -> tuple[bytes, bool]:
    conn = h11.Connection(h11.CLIENT)
    body = json.dumps({"Detach": False, "Tty": tty}).encode()
    request = h11.Request(
        method="POST",
        target=path,
        headers=[
            ("Host", "docker"),
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Connection", "Upgrade"),
            ("Upgrade", "tcp"),
        ],
    )
    await stream.send_all(conn.send(request) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(READ_SIZE))
            continue
        if isinstance(event, h11.InformationalResponse):
            if event.status_code == 101:
                return conn.trailing_data
            continue  # 100 Continue and the like
        if isinstance(event, h11.Response):
            error_body = await _read_body(conn, stream)
            raise DockerClient.error_for_status(event.status_code, error_body, f"POST {path}")
        if isinstance(event, h11.ConnectionClosed):
            raise trio.BrokenResourceError("Docker closed the connection before answering")


async def _read_body(conn: h11.Connection, stream: trio.SocketStream) -> bytes:
    body = bytearray()
    while len(body) < MAX_ERROR_BODY:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(READ_SIZE))
        elif isinstance(event, h11.Data):
            body += event.data
        else:
            break
    return bytes(body)


#: How the engine reports, on the output stream, an exec whose program could not be started (exit 126).
_START_FAILURE = b"OCI runtime exec failed"
_NOT_FOUND_WORDS = (b"not found", b"no such file")


def start_failure(first_output: bytes) -> tuple[str, int] | None:
    """(message, exit code) when the exec's first output is the engine saying the program did not start.

    The engine writes that message on the process's stdout and records 126 even for a missing program; a
    shell says 127 for "command not found", which is what scripts test for, so that case is mapped to 127.
    """
    if not first_output.startswith(_START_FAILURE):
        return None
    text = first_output.decode("utf-8", "replace").strip()
    lowered = first_output.lower()
    return text, 127 if any(word in lowered for word in _NOT_FOUND_WORDS) else 126


async def hang_up(docker: DockerClient, exec_id: str) -> bool:
    """SIGHUP to an exec's process that is still running, as a terminal hangup would (the session's client
    went away). True when a signal was sent.

    The engine has no "kill exec" call, and closing the connection does not end a TTY exec (the engine
    keeps its pseudo-terminal open), so the signal is sent from here to the process's host pid, but only
    after ``/proc/<pid>/cgroup`` confirmed that the pid belongs to that container: a runner that does not
    share the engine's view of pids (or lost a race with pid reuse) sends nothing. With a TTY the process
    leads its own session, so its process group is signalled too; a program that ignores SIGHUP (nohup) is
    left running, as after an SSH disconnect.
    """
    data = (await docker.request("GET", _exec_path(exec_id, "json"))).json()
    pid, container = int(data.get("Pid") or 0), str(data.get("ContainerID") or "")
    if not data.get("Running") or pid <= 0 or len(container) < 12:
        return False
    return await trio.to_thread.run_sync(_signal_if_in, pid, container)


def _signal_if_in(pid: int, container: str) -> bool:
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8", errors="replace") as f:
            if container not in f.read():
                return False
        leader = os.getpgid(pid) == pid
        os.kill(pid, signal.SIGHUP)
        if leader:
            os.killpg(pid, signal.SIGHUP)
    except (OSError, ValueError) as exc:
        log.info("cannot hang up exec process %d: %s", pid, exc)
        return False
    return True
