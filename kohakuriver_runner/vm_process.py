"""The QEMU process of a VM: start it, recognise it, wait for its end, signal it.

The runner supervises QEMU as a plain process (``vm_argv`` never asks for ``-daemonize``):

- ``launch`` starts it in a session of its own (``start_new_session``), so a signal sent to the runner's
  process group (Ctrl-C in a terminal, a service manager stopping the runner's main process) never reaches a
  VM; the runner's service unit has ``KillMode=process`` for the same reason, and a restarted runner
  re-adopts the VMs by their pidfiles. stdin is ``/dev/null``; stdout and stderr (QEMU's own messages, not
  the guest's console, which goes to the serial log) are appended to ``log_path``. The fork and exec run in
  a thread (``trio.lowlevel.open_process``), so the loop never waits for them, and are shielded: once QEMU
  runs its pid is always handed back.
- A VM started by this runner process is its child: ``wait_exit`` must be called for every pid ``launch``
  returned (the VM manager's supervising task does), which reaps it and gives its exit status; nothing else
  reaps it, so a VM nobody waits for stays a zombie until the runner exits. The ``trio.Process`` is kept in
  ``_children`` meanwhile: dropped, ``subprocess`` could reap it behind our back (``Popen.__del__``) and the
  status would be lost.
- A VM adopted after a restart is not our child (it was re-parented to init or a subreaper). ``wait_exit``
  watches it through a pidfd (readable when the process exits, whoever reaps it): no polling, cancellable.
  Its exit status is its parent's to read, so the answer is ``None``.
- ``is_qemu_of`` protects adoption against pid reuse: the pid must run a ``qemu-system-*`` binary whose
  arguments name the instance's directory (as a whole path component: ``/vm/1`` is not ``/vm/12``).
"""

from __future__ import annotations

import collections
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

import trio

__all__ = ["is_qemu_of", "launch", "read_pidfile", "signal", "wait_exit"]

#: Processes started by ``launch`` and not yet reaped by ``wait_exit``.
_children: dict[int, trio.Process] = {}
#: Exit statuses of children ``wait_exit`` reaped, newest last, so that a late ``wait_exit`` or ``signal``
#: with that pid (one supervisor reaped it while another was about to kill it) answers from here instead of
#: reaching a process that reused the pid. Bounded; forgotten when ``launch`` gets the pid again.
_reaped: collections.OrderedDict[int, int] = collections.OrderedDict()
REAPED_KEPT = 4096


def _open_log(path: Path) -> int:
    # 0600: QEMU's messages can name paths of other users' shares. O_NOFOLLOW: a link planted at the log's
    # name is not written through.
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    return os.open(path, flags, 0o600)


async def launch(
    argv: Sequence[str], *, log_path: str | os.PathLike[str], cwd: str | os.PathLike[str] | None = None
) -> int:
    """Start ``argv`` (QEMU, from ``vm_argv.qemu_argv``) detached in its own session; return its pid.

    The caller must ``wait_exit(pid)`` to reap it. ``OSError`` when the program cannot be started.
    """
    argv = [os.fspath(arg) for arg in argv]
    log_fd = await trio.to_thread.run_sync(_open_log, Path(log_path))
    try:
        # Shielded: a cancel arriving during the fork would otherwise lose the pid of a running QEMU.
        with trio.CancelScope(shield=True):
            process = await trio.lowlevel.open_process(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                cwd=cwd,
                start_new_session=True,
            )
    finally:
        os.close(log_fd)
    _reaped.pop(process.pid, None)
    _children[process.pid] = process
    return process.pid


def read_pidfile(path: str | os.PathLike[str]) -> int | None:
    """The pid QEMU wrote to its ``-pidfile``, or ``None`` when the file is missing or holds no pid."""
    try:
        text = Path(path).read_text(encoding="ascii", errors="replace").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def _mentions(arg: str, directory: str) -> bool:
    """``directory`` appears in ``arg`` as a whole path: after the start, ``=``, ``:`` or ``,``, and before
    the end, ``/`` or ``,``."""
    start = arg.find(directory)
    while start >= 0:
        end = start + len(directory)
        before_ok = start == 0 or arg[start - 1] in "=:,"
        after_ok = end == len(arg) or arg[end] in "/,"
        if before_ok and after_ok:
            return True
        start = arg.find(directory, start + 1)
    return False


def is_qemu_of(pid: int, instance_dir: str | os.PathLike[str], *, proc: str = "/proc") -> bool:
    """Whether ``pid`` is a QEMU (``qemu-system-*``) whose arguments name ``instance_dir``.

    For a moment after the exec (before the new program's arguments are set up) the kernel shows an empty
    command line, which reads as ``False``; adoption asks long after the launch."""
    try:
        raw = Path(proc, str(int(pid)), "cmdline").read_bytes()
    except OSError:  # gone, or not ours to read
        return False
    args = raw.rstrip(b"\x00").split(b"\x00") if raw else []  # a zombie's cmdline is empty
    if not args or not os.path.basename(args[0]).startswith(b"qemu-system"):
        return False
    directory = os.fsdecode(os.path.normpath(os.fspath(instance_dir)))
    return any(_mentions(os.fsdecode(arg), directory) for arg in args[1:])


def _reap_if_child(pid: int) -> int | None:
    try:
        reaped, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    if reaped == 0:  # cannot happen once the pidfd said it exited; said, not assumed
        return None
    return os.waitstatus_to_exitcode(status)


async def wait_exit(pid: int) -> int | None:
    """Wait until process ``pid`` has exited. For a VM ``launch`` started (or any child of this process),
    reap it and return its exit status (``-N`` for a signal ``N``, as ``subprocess`` does; asked again, the
    same status); for a process that is not our child (a VM adopted after a restart), return ``None``.
    Cancellable; no polling. Several tasks may wait for one pid."""
    process = _children.get(pid)
    if process is not None:
        code = await process.wait()
        if _children.get(pid) is process:
            del _children[pid]
            _remember(pid, code)
        return code
    if pid in _reaped:
        return _reaped[pid]
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:  # already gone (and reaped: a zombie still has its pid)
        return None
    try:
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)
    return _reap_if_child(pid)


def _remember(pid: int, code: int) -> None:
    _reaped[pid] = code
    _reaped.move_to_end(pid)
    while len(_reaped) > REAPED_KEPT:
        _reaped.popitem(last=False)


def signal(pid: int, sig: int) -> bool:
    """Send ``sig`` to ``pid``; ``False`` when the process is already gone. For a child ``launch`` started,
    through its ``trio.Process``; never to a pid ``wait_exit`` reaped (another process may have it now)."""
    if pid in _reaped:
        return False
    process = _children.get(pid)
    if process is not None:
        if process.returncode is not None:
            return False
        process.send_signal(sig)
        return True
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True
