"""The runner's SSH access to a VM VPS: its management key, the ``ssh`` argv, and short management commands.

A VM has no ``docker exec``. The runner reaches into it the way an administrator would: OpenSSH's client, as
root, with the runner's own **management key** (``ManagementKey``; its public half is put on root's account
by the VM's cloud-init seed, ``vm_seed.SeedRequest.management_public_key``), checking the VM's host key
against the pinned one (``vps_files.HostKeyStore``: the runner made it and put it in the same seed). Terminals
(``vm_terminal``) and management commands (``run``: ``sync`` before a snapshot, readiness probes) share the
argv built here.

Why the OpenSSH client and not an SSH library: it is already a system dependency, it is what the VM's sshd is
tested against, and it does the terminal work (window changes, raw mode, keepalives) that a terminal needs.

The argv (``ssh_argv``) trusts nothing around it: ``-F /dev/null`` (no user or system config),
``IdentitiesOnly`` with ``-i`` and ``IdentityAgent=none`` (only the management key is offered, never an
agent's), ``BatchMode`` (no prompt can ever wait on a terminal), ``StrictHostKeyChecking=yes`` against a
known_hosts file holding only the pinned key (a VM presenting another key is refused: exit 255),
``EscapeChar=none`` (a user typing ``~.`` must not end the runner's ssh: a container's terminal has no escape
either), keepalives so a VM that vanished is noticed.

The remote command: sshd hands the command to root's shell as one string, so every argv element is quoted
with ``shlex.quote`` and joined (the one correct way: a quoted word is never expanded or split, and never
taken for an assignment); variables go in front as ``env NAME=value ...`` quoted the same way (``SendEnv``
is no use: the VM's sshd accepts only what its ``AcceptEnv`` lists). Names are checked as the terminal
protocol checks them. No command and no variables = sshd's own login shell.

ssh's own messages go to a log file (``-E``), not to the remote command's stderr: the caller can then tell
"ssh could not connect" (exit 255 with a message in the log) from "the remote command exited 255" (nothing
logged), and show the first as one clear sentence. The known_hosts file and the log live in a private
temporary directory per call (``ssh_scratch``), removed afterwards.

Blocking parts (key file, scratch directory) run in threads; every wait is bounded or cancellable.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

import attrs
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kohakuriver_net.atomic_file import write_file_atomic
from kohakuriver_proto.errors import ValidationError
from kohakuriver_proto.models import check_ssh_public_key

__all__ = [
    "KEY_FILE",
    "LOGIN_SHELL",
    "SSH_ENV",
    "ManagementKey",
    "SshFailed",
    "SshScratch",
    "VmSshTarget",
    "known_hosts_line",
    "remote_command",
    "run",
    "ssh_argv",
    "ssh_program",
    "ssh_scratch",
    "with_env",
    "write_known_hosts",
]

log = logging.getLogger("kohakuriver.runner.vm_ssh")

#: The management key's file in the runner's state directory (OpenSSH format, 0600).
KEY_FILE = "vm-management-key"
#: ssh's own environment: nothing of the runner's (no agent socket, no locale to forward).
SSH_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
#: The login shell when a session has a command-less start with variables (sshd's own login shell cannot
#: take them): the account's shell, or bash, else sh when the account has none (as ``docker_exec``).
LOGIN_SHELL = (
    "/bin/sh",
    "-c",
    'case ${SHELL:-} in ""|*/nologin|*/false) if [ -x /bin/bash ]; then SHELL=/bin/bash; '
    'else SHELL=/bin/sh; fi;; esac; exec "$SHELL" -l',
)
#: Runs the rest of its argv as given: the guard for a program whose name contains ``=``, which ``env``
#: would take for one more variable.
_EXEC_ARGS = ("/bin/sh", "-c", 'exec "$@"', "sh")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}")
#: Bytes of ssh's log read back to explain a failure.
_LOG_TAIL = 16 * 1024
#: Output kept per stream by ``run`` (management commands print little; the rest is read and dropped).
RUN_OUTPUT_LIMIT = 1 << 20
#: Seconds between SIGTERM and SIGKILL when ``run`` is cancelled or times out.
_KILL_GRACE = 2.0


class SshFailed(Exception):
    """ssh itself failed (could not connect, authenticate or verify the host key), or is not installed.
    ``reason`` is one sentence for a user."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# -- the management key -------------------------------------------------------------------------------------


def _comment() -> str:
    host = re.sub(r"[^A-Za-z0-9._-]", "", os.uname().nodename)[:64] or "runner"
    return f"kohakuriver-runner@{host}"


@attrs.frozen
class ManagementKey:
    """The runner's SSH key for its VMs. ``public_openssh``: ``ssh-ed25519 AAAA... kohakuriver-runner@host``,
    the line the seed puts on root's account."""

    private_path: Path
    public_openssh: str

    @classmethod
    def load_or_create(cls, state_dir: str | os.PathLike[str]) -> ManagementKey:
        """``<state_dir>/vm-management-key``, made once (Ed25519, 0600) and the same after every restart:
        VMs created before a restart keep trusting it. Blocking: call through ``trio.to_thread``."""
        path = Path(state_dir) / KEY_FILE
        try:
            private = path.read_bytes()
        except FileNotFoundError:
            private = Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            )
            try:
                # Exclusive: of two runners starting on one state directory, the first key wins for both.
                write_file_atomic(path, private, exclusive=True, sync_dir=True, parent_mode=0o700)
                log.info("made the VM management key %s", path)
            except FileExistsError:
                private = path.read_bytes()
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            # ssh ignores a private key others can read; put it right rather than fail every VM.
            log.warning("the VM management key %s had mode %o; set to 600", path, mode)
            os.chmod(path, 0o600)
        key = serialization.load_ssh_private_key(private, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} is not an Ed25519 key")
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        return cls(private_path=path, public_openssh=f"{public.decode()} {_comment()}")


# -- the target ---------------------------------------------------------------------------------------------


def _address(value: object) -> str:
    try:
        return str(ipaddress.ip_address(str(value)))
    except ValueError:
        raise ValidationError("address", f"{str(value)[:60]!r} is not an IP address") from None


def _port(_inst: object, _attr: object, value: object) -> None:
    if type(value) is not int or not 1 <= value <= 65535:
        raise ValidationError("port", "must be an integer from 1 to 65535")


def _host_key(value: object) -> str:
    """The pinned key as ``<type> <base64>`` (the comment dropped): one known_hosts field, never a line
    break."""
    if isinstance(value, str):
        value = value.strip()  # the newline that ends a .pub file
    check_ssh_public_key(value, "host_public_key")
    assert isinstance(value, str)
    return " ".join(value.split()[:2])


@attrs.frozen(kw_only=True)
class VmSshTarget:
    """Where and how the runner reaches one VM: its address and sshd port, the host key pinned for it (from
    ``HostKeyStore``), and the management key that root's account trusts."""

    task_id: int
    address: str = attrs.field(converter=_address)
    port: int = attrs.field(default=22, validator=_port)
    host_public_key: str = attrs.field(converter=_host_key)
    key: ManagementKey


def known_hosts_line(target: VmSshTarget) -> str:
    """The one known_hosts line: the pinned key for the address (``[address]:port`` off port 22)."""
    host = target.address if target.port == 22 else f"[{target.address}]:{target.port}"
    return f"{host} {target.host_public_key}\n"


def write_known_hosts(path: str | os.PathLike[str], target: VmSshTarget) -> None:
    """Write the pinned line to ``path`` (0600). Blocking."""
    write_file_atomic(Path(path), known_hosts_line(target).encode())


# -- the argv -----------------------------------------------------------------------------------------------


def with_env(env: Mapping[str, str], argv: Sequence[str]) -> list[str]:
    """``argv`` run with ``env`` added: ``env NAME=value ... argv`` (``argv`` alone without variables)."""
    for name, value in env.items():
        if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            raise ValidationError(f"env.{str(name)[:40]}", "is not a valid variable name")
        if "\0" in value:
            raise ValidationError(f"env.{name}", "must not contain NUL")
    if not env:
        return list(argv)
    program = list(argv)
    if "=" in program[0]:
        program = [*_EXEC_ARGS, *program]
    return ["env", *(f"{name}={value}" for name, value in env.items()), *program]


def remote_command(command: Sequence[str] | None, env: Mapping[str, str]) -> str | None:
    """The string sshd gives root's shell: every word quoted. None = sshd's login shell."""
    if command is None and not env:
        return None
    argv = with_env(env, LOGIN_SHELL if command is None else command)
    if not argv or not argv[0]:
        raise ValidationError("command", "must be a non-empty argv")
    for i, arg in enumerate(argv):
        if "\0" in arg:  # a C string cannot hold it: it would be cut, not quoted
            raise ValidationError(f"command[{i}]", "must not contain NUL")
    return " ".join(shlex.quote(arg) for arg in argv)


def ssh_argv(
    target: VmSshTarget,
    known_hosts_path: str | os.PathLike[str],
    command: Sequence[str] | None,
    *,
    tty: bool,
    env: Mapping[str, str],
    log_path: str | os.PathLike[str] | None = None,
    program: str = "ssh",
) -> list[str]:
    """The OpenSSH client argv for ``command`` (an argv; None = a login shell) as root in the VM.

    ``tty``: ``-tt`` (a terminal on the far side even though ours is a pseudo-terminal) else ``-T``.
    ``log_path``: ssh's own messages go there (``-E``) instead of the command's stderr.
    """
    remote = remote_command(command, env)
    argv = [
        program,
        "-F", "/dev/null",
        "-i", str(target.key.private_path),
        "-o", "IdentitiesOnly=yes",
        "-o", "IdentityAgent=none",
        "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={known_hosts_path}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "UpdateHostKeys=no",
        "-o", "ConnectTimeout=10",
        "-o", "ServerAliveInterval=15",
        "-o", "LogLevel=ERROR",
        "-o", "EscapeChar=none",
        "-o", "ControlMaster=no",
        "-o", "ControlPath=none",
        "-o", "ForwardAgent=no",
        "-o", "ForwardX11=no",
        "-p", str(target.port),
    ]  # fmt: skip
    if log_path is not None:
        argv += ["-E", str(log_path)]
    argv += ["-tt" if tty else "-T", f"root@{target.address}", "--"]
    if remote is not None:
        argv.append(remote)
    return argv


def ssh_program() -> str:
    """The ``ssh`` client's path; ``SshFailed`` when it is not installed."""
    path = shutil.which("ssh", path=SSH_ENV["PATH"])
    if path is None:
        raise SshFailed("ssh (openssh-client) is not installed on this runner")
    return path


# -- per-call files -----------------------------------------------------------------------------------------


@attrs.frozen
class SshScratch:
    """One call's private files: the known_hosts with the pinned key, and ssh's log."""

    target: VmSshTarget
    directory: Path
    known_hosts: Path
    log: Path

    def argv(self, command: Sequence[str] | None, *, tty: bool, env: Mapping[str, str]) -> list[str]:
        return ssh_argv(
            self.target, self.known_hosts, command, tty=tty, env=env, log_path=self.log, program=ssh_program()
        )

    def failure(self) -> str | None:
        """After ssh exited 255: why, as one sentence, when ssh logged a reason; None when it logged nothing
        (then 255 was the remote command's own status). Blocking (reads the log)."""
        try:
            with open(self.log, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - _LOG_TAIL))
                text = f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return None
        lines = [line.strip() for line in text.splitlines()]
        lines = [line for line in lines if line and not line.startswith("@")]
        if not lines:
            return None
        where = f"the VM of task {self.target.task_id} ({self.target.address})"
        if any("Host key verification failed" in line for line in lines):
            return (
                f"{where} presented an SSH host key other than the one pinned for it; "
                "refused (Host key verification failed)"
            )
        return f"ssh to {where} failed: {'; '.join(lines[-3:])}"


def _make_scratch(target: VmSshTarget) -> SshScratch:
    directory = Path(tempfile.mkdtemp(prefix="kr-vm-ssh-"))  # 0700
    known_hosts = directory / "known_hosts"
    write_known_hosts(known_hosts, target)
    return SshScratch(target, directory, known_hosts, directory / "ssh.log")


@contextlib.asynccontextmanager
async def ssh_scratch(target: VmSshTarget) -> AsyncIterator[SshScratch]:
    """A private directory with the known_hosts file and the log path, removed on the way out."""
    scratch = await trio.to_thread.run_sync(_make_scratch, target)
    try:
        yield scratch
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(shutil.rmtree, scratch.directory, True)


# -- management commands ------------------------------------------------------------------------------------


async def _collect(stream: trio.abc.ReceiveStream, into: bytearray) -> None:
    while data := await stream.receive_some(65536):
        room = RUN_OUTPUT_LIMIT - len(into)
        if room > 0:
            into += data[:room]


async def _end_process(process: trio.Process) -> None:
    """SIGTERM, then SIGKILL after ``_KILL_GRACE``; reaps it. Shielded: runs while cancelled."""
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            with trio.move_on_after(_KILL_GRACE):
                await process.wait()
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()


async def run(target: VmSshTarget, command: Sequence[str], *, timeout: float) -> tuple[int, bytes, bytes]:
    """Run ``command`` (an argv) as root in the VM; ``(exit code, stdout, stderr)``, each output at most
    ``RUN_OUTPUT_LIMIT`` bytes. stdin is empty.

    ``SshFailed`` when ssh itself failed (unreachable, refused, another host key); ``trio.TooSlowError``
    after ``timeout`` seconds (ssh is ended; without a terminal sshd does not signal the remote command, so
    one that is still running finishes on its own: management commands are short and harmless to finish).
    """
    with trio.fail_after(timeout):
        async with ssh_scratch(target) as scratch:
            argv = scratch.argv(command, tty=False, env={})
            out, err = bytearray(), bytearray()
            try:
                pipe = subprocess.PIPE
                process = await trio.lowlevel.open_process(
                    argv, stdin=subprocess.DEVNULL, stdout=pipe, stderr=pipe, env=SSH_ENV
                )
            except OSError as exc:
                raise SshFailed(f"cannot start ssh: {exc}") from None
            try:
                async with trio.open_nursery() as nursery:
                    assert process.stdout is not None and process.stderr is not None
                    nursery.start_soon(_collect, process.stdout, out)
                    nursery.start_soon(_collect, process.stderr, err)
                code = await process.wait()
            finally:
                await _end_process(process)
                for stream in (process.stdout, process.stderr):
                    if stream is not None:
                        with trio.CancelScope(shield=True):
                            await stream.aclose()
            if code == 255:
                reason = await trio.to_thread.run_sync(scratch.failure)
                if reason is not None:
                    raise SshFailed(reason)
            return code, bytes(out), bytes(err)
