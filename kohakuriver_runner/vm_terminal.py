"""A terminal session in a VM VPS: ``kr connect`` / ``kr terminal exec`` over the runner's own SSH.

The VM counterpart of ``docker_exec``, with the same shape for ``api_terminal``: start, output pieces (raw
with a TTY, tagged stdout/stderr without), stdin, resize, stdin EOF, an exit code. The process is the
OpenSSH client (argv from ``vm_ssh.ssh_argv``: management key, pinned host key) running the request's
command as root in the VM.

With a TTY, ssh gets a pseudo-terminal of its own (``os.openpty``): the slave is its stdin/stdout/stderr and
its controlling terminal in a new session (``setsid --ctty``: setting a controlling terminal needs code in
the child between fork and exec, which Python offers only through ``preexec_fn``, unsafe in a threaded
process), so ``-tt`` works as from a real terminal: ssh puts it in raw mode and passes every byte, and a
resize is ``TIOCSWINSZ`` on the master, after which the kernel sends ssh SIGWINCH and ssh sends the VM a
window-change. The slave starts as a normal cooked terminal (plus UTF-8 input), because ssh copies its
modes into the VM's terminal (a raw slave gave a VM terminal without echo, line editing or ^C); input is
therefore held until ssh has set it raw itself (polled on the master, a few hundred ms after the start), so
early keystrokes are neither echoed back here nor turned into signals for ssh. The master is read and
written through trio (``FdStream``). Stdin EOF is ignored with a TTY: a terminal cannot be half-closed, and
a container's TTY exec also keeps running.

Without a TTY: three pipes, stdout and stderr read apart (tagged 1/2 like Docker's); stdin EOF closes ssh's
stdin, which ssh passes on as the channel's EOF.

``user`` and ``workdir`` (what ``docker exec`` takes as ``User``/``WorkingDir``) are applied in the VM by a
fixed ``sh`` script that gets them as quoted arguments: ``cd``, then ``setpriv`` to the user (its groups and
a reset environment; a uid without an account gets group 0 and ``HOME=/`` as in Docker). Variables are set
innermost (``env``), after the switch.

Exit code: ssh's (the remote command's). 255 with something in ssh's log means ssh itself failed: ``failure``
then gives the sentence to show on stderr. A session whose client went away is hung up: SIGHUP to ssh, then
SIGKILL after ``HANGUP_WAIT``. With a TTY that ends the remote session (sshd hangs up the VM's terminal).
Without one sshd leaves the remote processes running (it signals nothing when the connection drops), so
every non-TTY session carries ``KOHAKURIVER_TERMINAL_SESSION=<random id>`` in its environment and the hang-up
also sends SIGHUP, over a management connection (``vm_ssh.run``), to every VM process that still has it: what
``docker_exec.hang_up`` does for a container. A process that ignores SIGHUP keeps running, as after an SSH
disconnect. Nothing is left behind here: the pty, pipes and private files end with the session (no task or
thread outlives a call), and every wait is bounded.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import shutil
import signal
import struct
import subprocess
import termios
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, Protocol

import trio

from kohakuriver_proto.terminal import StartRequest, Stream

from .vm_ssh import LOGIN_SHELL, SSH_ENV, SshFailed, SshScratch, VmSshTarget, run, ssh_scratch, with_env

__all__ = [
    "HANGUP_WAIT",
    "SESSION_VARIABLE",
    "VmSession",
    "VmTerminalError",
    "VmTerminalTargets",
    "open_vm_session",
    "session_command",
]

log = logging.getLogger("kohakuriver.runner.vm_terminal")

#: The variable that marks a non-TTY session's processes in the VM, so a hang-up can find them.
SESSION_VARIABLE = "KOHAKURIVER_TERMINAL_SESSION"
DEFAULT_TERM = "xterm-256color"
#: Seconds ssh has to end after SIGHUP before SIGKILL.
HANGUP_WAIT = 2.0
#: Seconds for the management connection that hangs up a non-TTY session's processes.
REMOTE_HANGUP_WAIT = 8.0
#: Seconds ssh has to exit once its output ended.
EXIT_WAIT = 10.0
#: Seconds a TTY session's input waits for ssh to set its terminal raw (its connect timeout is 10 s), and
#: how often it looks.
RAW_WAIT, RAW_POLL = 20.0, 0.01
READ_SIZE = 65536
#: Linux's input flag for UTF-8 line editing (Python's termios does not export it).
_IUTF8 = getattr(termios, "IUTF8", 0o40000)

#: ``sh -c`` script: ``$1`` workdir, ``$2`` user, ``$3`` group ("" = unchanged), then the argv to run.
#: Only the arguments carry request data; the script itself is constant.
_SWITCH = r"""d=$1 u=$2 g=$3; shift 3
if [ -n "$d" ] && ! cd "$d" 2>/dev/null; then
  echo "cannot change to the working directory $d" >&2; exit 126
fi
[ -n "$u" ] || exec "$@"
if id "$u" >/dev/null 2>&1; then
  [ -n "$g" ] || g=$(id -g "$u") || exit 126
  exec setpriv --reuid="$u" --regid="$g" --init-groups --reset-env "$@"
fi
case $u in *[!0-9]*)
  echo "unable to find user $u: no matching entries in passwd file" >&2; exit 126;;
esac
HOME=/; export HOME; unset USER LOGNAME MAIL
exec setpriv --reuid="$u" --regid="${g:-0}" --clear-groups "$@"
"""
#: ``sh -c`` script: SIGHUP to every process whose environment has ``SESSION_VARIABLE=$1``.
_HANGUP = r"""for e in /proc/[0-9]*/environ; do
  if tr '\0' '\n' < "$e" 2>/dev/null | grep -qxF "KOHAKURIVER_TERMINAL_SESSION=$1"; then
    p=${e%/environ}; kill -HUP "${p#/proc/}" 2>/dev/null
  fi
done
exit 0
"""


class VmTerminalTargets(Protocol):
    """How ``api_terminal`` tells a VM from a container (the daemon's ``Runtime.vm_terminal_target``): the
    SSH target of a running VM VPS with this task id, None for anything else. Called on the trio loop, so it
    answers from memory (no file or network I/O)."""

    def __call__(self, task_id: int) -> VmSshTarget | None: ...


class VmTerminalError(Exception):
    """The session could not start (ssh or setsid missing, a bad command). ``reason`` is for the user."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def session_command(
    request: StartRequest, session_id: str
) -> tuple[list[str] | None, dict[str, str], str | None]:
    """What to run in the VM for ``request``: ``(command, env, term)`` for ``ssh_argv`` (command None =
    sshd's login shell) and, with a TTY, the ``TERM`` ssh announces for the VM's terminal (ssh takes it
    from its own environment; it is not set again as a variable)."""
    env = dict(request.env)
    term = None
    if request.tty:
        term = env.pop("TERM", None) or DEFAULT_TERM
    else:
        env[SESSION_VARIABLE] = session_id
    command = list(request.command) if request.command is not None else None
    if request.user is None and request.workdir is None:
        return command, env, term
    user, _, group = (request.user or "").partition(":")
    inner = with_env(env, command if command is not None else LOGIN_SHELL)
    return ["/bin/sh", "-c", _SWITCH, "kr-terminal", request.workdir or "", user, group, *inner], {}, term


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _exit_status(returncode: int) -> int:
    """A shell's way of saying "killed by signal N" when ssh itself was killed."""
    return returncode if returncode >= 0 else 128 - returncode


class VmSession:
    """One running ssh. One task reads (``receive``), another writes (``send_input``/``resize``/
    ``close_input``), as with ``docker_exec.ExecStream``."""

    def __init__(self, target: VmSshTarget, scratch: SshScratch, process: trio.Process, tty: bool) -> None:
        self.target = target
        self.tty = tty
        self.process = process
        self._scratch = scratch
        self._master: trio.lowlevel.FdStream | None = None
        self._master_fd = -1
        # Without a TTY: the pipes still open, and what a read brought beyond the piece returned.
        self._pipes: dict[Stream, trio.abc.ReceiveStream] = {}
        self._pending: deque[tuple[Stream | None, bytes]] = deque()
        self._input_closed = False
        self._raw = False
        self.session_id = ""

    async def receive(self) -> tuple[Stream | None, bytes] | None:
        """The next piece of output: ``(None, data)`` with a TTY, ``(STDOUT|STDERR, data)`` without; None
        once ssh's output ended."""
        if self._master is not None:
            try:
                data = await self._master.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):  # EIO: every slave fd is closed
                return None
            return (None, data) if data else None
        while not self._pending and self._pipes:
            # Read both pipes at once; the first to answer ends the round. A receive_some cancelled while
            # waiting has consumed nothing, and one that completed anyway is kept in ``_pending``.
            async with trio.open_nursery() as nursery:
                for tag, stream in list(self._pipes.items()):
                    nursery.start_soon(self._read_pipe, tag, stream, nursery.cancel_scope)
        return self._pending.popleft() if self._pending else None

    async def _read_pipe(self, tag: Stream, stream: trio.abc.ReceiveStream, round_: trio.CancelScope) -> None:
        try:
            data = await stream.receive_some(READ_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if data:
            self._pending.append((tag, data))
        else:
            self._pipes.pop(tag, None)
        round_.cancel()

    async def send_input(self, data: bytes) -> None:
        """Bytes for the remote stdin (dropped once it was closed or ssh is gone)."""
        if self._input_closed or not data:
            return
        if self._master is not None and not self._raw:
            await self._wait_raw()
        stream = self._master if self._master is not None else self.process.stdin
        assert stream is not None
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._input_closed = True

    async def _wait_raw(self) -> None:
        """Hold input until ssh has put its terminal in raw mode (bounded by ``RAW_WAIT``).

        Until then the local line discipline is cooked, as ssh must see it to give the VM's terminal normal
        modes: a keystroke written now would be echoed back here as output, and a ^C would be a SIGINT for
        ssh instead of a byte for the VM. ssh goes raw once the session is open, a few hundred ms.
        """
        with trio.move_on_after(RAW_WAIT):
            while self.process.poll() is None:
                try:
                    lflag = termios.tcgetattr(self._master_fd)[3]  # a pty master reports the slave's modes
                except termios.error:
                    break
                if not lflag & (termios.ICANON | termios.ECHO | termios.ISIG):
                    break
                await trio.sleep(RAW_POLL)
        self._raw = True

    async def close_input(self) -> None:
        """Stdin EOF: closes ssh's stdin without a TTY; nothing with one (a terminal has no half-close)."""
        if self._master is not None or self._input_closed:
            return
        self._input_closed = True
        if self.process.stdin is not None:
            with trio.CancelScope(shield=True), contextlib.suppress(trio.BrokenResourceError):
                await self.process.stdin.aclose()

    def resize(self, rows: int, cols: int) -> None:
        """The VM terminal's size (TTY sessions; ignored without)."""
        if self._master is None:
            return
        with contextlib.suppress(OSError):  # the pty is gone: ssh has exited, nothing to resize
            _set_size(self._master_fd, rows, cols)

    async def wait(self) -> int:
        """ssh's exit status once its output ended (bounded by ``EXIT_WAIT``: then it is killed, 255)."""
        with trio.move_on_after(EXIT_WAIT):
            return _exit_status(await self.process.wait())
        log.warning("ssh to task %s did not exit after its output ended; killed", self.target.task_id)
        await self._end_ssh()
        return 255

    async def failure(self) -> str | None:
        """After an exit status of 255: why ssh failed, or None when 255 was the remote command's."""
        return await trio.to_thread.run_sync(self._scratch.failure)

    async def _end_ssh(self) -> bool:
        """SIGHUP, then SIGKILL after ``HANGUP_WAIT``; True when ssh was still running. Shielded."""
        process = self.process
        with trio.CancelScope(shield=True):
            if process.returncode is not None:
                return False
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGHUP)
            with trio.move_on_after(HANGUP_WAIT):
                await process.wait()
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
            return True

    async def hang_up(self) -> None:
        """End a session whose client went away: ssh first, then (without a TTY) the VM processes it left."""
        if not await self._end_ssh():
            return
        log.info("terminal on task %s: ssh hung up (its client went away)", self.target.task_id)
        if self.tty:
            return  # sshd hangs up the VM's terminal: its processes get SIGHUP from the kernel there
        with trio.CancelScope(shield=True):
            try:
                command = ["/bin/sh", "-c", _HANGUP, "kr-hangup", self.session_id]
                await run(self.target, command, timeout=REMOTE_HANGUP_WAIT)
            except SshFailed as exc:
                log.info("terminal on task %s: cannot hang up its processes: %s", self.target.task_id, exc)
            except trio.TooSlowError:
                log.info("terminal on task %s: hanging up its processes took too long", self.target.task_id)


def _tool(name: str, package: str) -> str:
    path = shutil.which(name, path=SSH_ENV["PATH"])
    if path is None:
        raise VmTerminalError(f"{name} ({package}) is not installed on this runner")
    return path


def _open_pty(rows: int, cols: int) -> tuple[int, int]:
    master, slave = os.openpty()
    try:
        # ssh sends the VM these modes for its terminal (the pty-req): a normal cooked terminal, UTF-8.
        attributes = termios.tcgetattr(slave)
        attributes[0] |= _IUTF8
        termios.tcsetattr(slave, termios.TCSANOW, attributes)
        _set_size(master, rows, cols)
    except BaseException:
        os.close(master)
        os.close(slave)
        raise
    return master, slave


@contextlib.asynccontextmanager
async def open_vm_session(target: VmSshTarget, request: StartRequest) -> AsyncIterator[VmSession]:
    """Start ssh for ``request`` and yield the session; on the way out a still-running session is hung up
    (``VmSession.hang_up``) and everything it held is closed. ``VmTerminalError`` when it cannot start."""
    session_id = secrets.token_hex(12)
    command, env, term = session_command(request, session_id)
    async with ssh_scratch(target) as scratch:
        try:
            argv = scratch.argv(command, tty=request.tty, env=env)
        except SshFailed as exc:
            raise VmTerminalError(exc.reason) from None
        process_env = dict(SSH_ENV)
        master = slave = -1
        try:
            if request.tty:
                argv = [_tool("setsid", "util-linux"), "--ctty", "--wait", *argv]
                process_env["TERM"] = term or DEFAULT_TERM
                master, slave = _open_pty(request.rows, request.cols)
                process = await trio.lowlevel.open_process(
                    argv, stdin=slave, stdout=slave, stderr=slave, env=process_env
                )
            else:
                pipe = subprocess.PIPE
                process = await trio.lowlevel.open_process(
                    argv, stdin=pipe, stdout=pipe, stderr=pipe, env=process_env
                )
        except OSError as exc:
            if master >= 0:
                os.close(master)
            raise VmTerminalError(f"cannot start ssh: {exc}") from None
        finally:
            if slave >= 0:
                os.close(slave)  # ssh holds it now; ours would keep the pty from ever reporting EOF
        session = VmSession(target, scratch, process, request.tty)
        session.session_id = session_id
        if master >= 0:
            session._master, session._master_fd = trio.lowlevel.FdStream(master), master
        else:
            assert process.stdout is not None and process.stderr is not None
            session._pipes = {Stream.STDOUT: process.stdout, Stream.STDERR: process.stderr}
        try:
            yield session
        finally:
            with trio.CancelScope(shield=True):
                await session.hang_up()
                await _close_all(session)


async def _close_all(session: VmSession) -> None:
    streams: list[Any] = [
        session._master,
        session.process.stdin,
        session.process.stdout,
        session.process.stderr,
    ]
    for stream in streams:
        if stream is not None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await stream.aclose()
