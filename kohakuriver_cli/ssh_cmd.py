"""``kr ssh``: SSH into a VPS through the host's SSH proxy (DESIGN section 5).

- ``kr ssh TASK_ID [--key PATH] [--user root] [--proxy-port N] [-o SSH_OPTION] [-- COMMAND...]`` runs
  ``ssh`` so that ssh itself talks to the VPS's sshd through the proxy (host keys, agent, ``-L`` forwards:
  all plain ssh). Its plain form is served before click loads by ``ssh_fast`` (which hands ssh a connected
  socket); this command serves the rest with ``ProxyCommand=<this kr> ssh proxy-command TASK_ID``, and the
  two run the same ssh otherwise. ``kr ssh connect TASK_ID`` is the same (the original's spelling).
- Host keys: the VPS's key is pinned in kohakuriver's own known_hosts before ssh runs and ssh checks it
  strictly there, under ``HostKeyAlias=kohakuriver-<id>`` (``known_hosts.host_key_options``); the user's
  own ``-o`` options come first, so they win where they say otherwise.
- ``kr ssh TASK_ID --local-port N`` instead listens on 127.0.0.1:N and tunnels every connection through the
  proxy, until Ctrl-C, for tools that only know ``host:port``.
- ``kr ssh proxy-command TASK_ID``: stdin/stdout <-> the proxy, after the authenticated
  ``REQUEST_TUNNEL <id> <token>`` handshake (``kohakuriver_proto.ssh_handshake.ClientHandshake``). A refusal
  is printed to stderr as ``ERROR ...`` with exit code 1.
- ``kr ssh config [--output PATH]``: ``Host kohakuriver-<id>`` entries for the caller's running/paused VPS,
  each VPS's host key pinned first (``UserKnownHostsFile`` + ``HostKeyAlias`` in its entry).

Quoting: ssh hands ``ProxyCommand`` to ``$SHELL -c`` after expanding ``%`` tokens, so every word is
``shlex.quote``-d and ``%`` doubled; the task id is checked to be decimal before it is used anywhere. The
token never appears on a command line: the ssh child (and its ProxyCommand) get it in their environment,
and ``ssh config`` entries let ``kr`` read it from the credentials file.

The proxy port: ``--proxy-port``, else ``KOHAKURIVER_SSH_PROXY_PORT``, else what the host announces in
``/api/health`` (``ssh_proxy_port``, when it does), else 8002.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import click

from kohakuriver_net.atomic_file import write_file_atomic
from kohakuriver_proto.errors import ProtocolError
from kohakuriver_proto.ssh_handshake import NEED_DATA, ClientHandshake, TunnelRejected

from . import known_hosts
from .client import EXIT_ERROR, EXIT_UNREACHABLE, EXIT_USAGE, CliError, normalize_host_url
from .context import CliContext, KrCommand, KrGroup, pass_cli
from .output import info
from .ssh_keys import default_private_key_path

DEFAULT_PROXY_PORT = 8002
PROXY_PORT_ENV = "KOHAKURIVER_SSH_PROXY_PORT"
HOST_ALIAS_PREFIX = "kohakuriver-"
#: Connect + handshake with the proxy (the host itself gives up on the runner after 10 s by default).
PROXY_TIMEOUT = 30.0
CHUNK = 256 * 1024
#: What ssh exits with when it could not connect or log in (a changed host key among the reasons).
EXIT_SSH_FAILED = 255
_MAX_TASK_ID = (1 << 63) - 1
_USER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,63}")


# -- validation and quoting ----------------------------------------------------------------------------------


def parse_task_id(value: object) -> int:
    """A task id as typed by the user: decimal digits only (it ends up in a shell command line)."""
    text = str(value)
    if not (text.isascii() and text.isdigit()) or int(text) > _MAX_TASK_ID:
        raise CliError(f"invalid task id {text[:40]!r}: expected decimal digits", EXIT_USAGE)
    return int(text)


def _ssh_safe(text: str, what: str) -> str:
    """``text`` for an ssh option or config value: ``%`` doubled (ssh expands ``%`` tokens there); line
    breaks and NULs cannot be represented at all."""
    if any(c in text for c in "\n\r\0"):
        raise CliError(f"{what} contains a line break or NUL: {text[:80]!r}", EXIT_USAGE)
    return text.replace("%", "%%")


def kr_executable() -> str:
    """The path of this ``kr``, for ProxyCommand: the script that is running, else the one next to this
    Python (a virtualenv), else ``kr`` on PATH."""
    argv0 = sys.argv[0] if sys.argv else ""
    if Path(argv0).name in ("kr", "kohakuriver"):
        found = argv0 if os.sep in argv0 else shutil.which(argv0)
        if found and os.access(found, os.X_OK):
            return str(Path(found).absolute())
    sibling = Path(sys.executable).with_name("kr")
    if os.access(sibling, os.X_OK):
        return str(sibling)
    on_path = shutil.which("kr")
    if on_path:
        return str(Path(on_path).absolute())
    raise CliError("cannot find the kr executable for ssh's ProxyCommand (is kr on PATH?)")


def proxy_command(task_id: int, *, kr: str, proxy_port: int, host_url: str | None = None) -> str:
    """``<kr> [--host URL] ssh proxy-command --proxy-port N <id>``, quoted for ssh's ProxyCommand."""
    words = [kr]
    if host_url:
        words += ["--host", host_url]
    words += ["ssh", "proxy-command", "--proxy-port", str(proxy_port), str(parse_task_id(task_id))]
    return _ssh_safe(shlex.join(words), "the ProxyCommand")


def host_alias(task_id: int) -> str:
    return f"{HOST_ALIAS_PREFIX}{task_id}"


def default_key(task_id: int) -> Path | None:
    """``~/.ssh/kohakuriver_<id>`` (the key ``kr vps create --gen-ssh-key`` saves) if it exists."""
    path = default_private_key_path(task_id)
    return path if path.is_file() else None


def build_ssh_argv(
    task_id: int,
    *,
    kr: str,
    proxy_port: int,
    user: str = "root",
    key: str | os.PathLike[str] | None = None,
    command: Sequence[str] = (),
    ssh: str = "ssh",
    options: Sequence[str] = (),
    host_key_options: Sequence[str] | None = None,
) -> list[str]:
    """The ssh argv of ``kr ssh``. ``options`` are the user's ``-o`` values, passed on as typed (ssh expands
    their ``%`` tokens as it would); ``host_key_options`` how the VPS's host key is checked
    (``known_hosts.host_key_options``; None: ``HostKeyAlias`` alone, ssh's own checking).

    ssh takes the first value it is given for an option: the ProxyCommand comes first (it must win), the
    user's options before the host key options (theirs win). The destination comes after ``--``, so neither
    it nor the remote command is parsed as ssh options; the command words are passed on as ssh passes them
    (joined by the remote shell, as with plain ssh).
    """
    task_id = parse_task_id(task_id)
    if not _USER_RE.fullmatch(user):
        raise CliError(f"invalid user name {user[:40]!r}", EXIT_USAGE)
    argv = [ssh, "-o", f"ProxyCommand={proxy_command(task_id, kr=kr, proxy_port=proxy_port)}", "-l", user]
    if key is not None:
        argv += ["-i", _ssh_safe(os.fspath(key), "the key path"), "-o", "IdentitiesOnly=yes"]
    if host_key_options is None:
        host_key_options = [f"HostKeyAlias={host_alias(task_id)}"]
    for option in [*options, *host_key_options]:
        if any(c in option for c in "\n\r\0"):
            raise CliError(f"an ssh option contains a line break or NUL: {option[:80]!r}", EXIT_USAGE)
        argv += ["-o", option]
    argv += ["--", host_alias(task_id), *command]
    return argv


# -- settings ------------------------------------------------------------------------------------------------


def _port(value: Any, what: str) -> int:
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise CliError(f"{what} must be a port number, got {str(value)[:40]!r}", EXIT_USAGE) from None
    if not 1 <= port <= 65535:
        raise CliError(f"{what} must be between 1 and 65535, got {port}", EXIT_USAGE)
    return port


def proxy_port_without_host(option: int | None) -> int | None:
    """``--proxy-port`` or ``KOHAKURIVER_SSH_PROXY_PORT``; None if neither says."""
    if option is not None:
        return _port(option, "--proxy-port")
    env = os.environ.get(PROXY_PORT_ENV, "").strip()
    if env:
        return _port(env, PROXY_PORT_ENV)
    return None


def resolve_proxy_port(cli_ctx: CliContext, option: int | None) -> int:
    """As ``proxy_port_without_host``, then the port the host announces, then 8002."""
    port = proxy_port_without_host(option)
    if port is not None:
        return port
    health = cli_ctx.client().get("/api/health")
    announced = health.get("ssh_proxy_port") if isinstance(health, dict) else None
    if isinstance(announced, int) and not isinstance(announced, bool) and 1 <= announced <= 65535:
        return announced
    return DEFAULT_PROXY_PORT


def proxy_address(host_url: str) -> str:
    """The host part of the API URL: the proxy runs on the same machine."""
    try:
        address = urlsplit(normalize_host_url(host_url)).hostname
    except ValueError:
        address = None
    if not address:
        raise CliError(f"cannot tell the host's address from {host_url!r}", EXIT_USAGE)
    return address


# -- host keys -----------------------------------------------------------------------------------------------


def fetch_host_key(cli_ctx: CliContext, task_id: int) -> str:
    """The VPS's public host key from the host (``known_hosts.KeyUnavailable`` when it gives none)."""
    try:
        answer = cli_ctx.client().get(f"/api/vps/{task_id}/host-key")
    except CliError as exc:
        raise known_hosts.KeyUnavailable(exc.message) from None
    return known_hosts.key_from_answer(answer)


def pinned_options(cli_ctx: CliContext, task_id: int) -> list[str] | None:
    """``known_hosts.host_key_options`` for VPS ``task_id`` (None: not pinned), warnings on stderr."""
    return known_hosts.host_key_options(
        task_id, host_alias(task_id), lambda: fetch_host_key(cli_ctx, task_id), info
    )


# -- trio plumbing (imported lazily: ``kr ssh config`` needs none of it) -------------------------------------


class TunnelRefused(Exception):
    """The proxy answered ``ERROR <message>``."""


async def open_tunnel(address: str, port: int, task_id: int, token: str | None) -> tuple[Any, bytes, bool]:
    """Connect to the proxy and do the handshake: ``(stream, bytes after SUCCESS, proxy sent EOF)``.
    ``TunnelRefused`` for an ERROR reply; ``OSError``/``ProtocolError``/``trio.TooSlowError`` otherwise."""
    import trio

    hs = ClientHandshake(task_id, token)
    with trio.fail_after(PROXY_TIMEOUT):
        stream = await trio.open_tcp_stream(address, port)
        try:
            await stream.send_all(hs.send_request())
            while (event := hs.next_event()) is NEED_DATA:
                hs.receive_data(await stream.receive_some(4096))
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
    if isinstance(event, TunnelRejected):
        await trio.aclose_forcefully(stream)
        raise TunnelRefused(event.message)
    early, eof = hs.trailing_data
    return stream, early, eof


async def _copy(source: Any, sink: Any, first: bytes = b"", source_done: bool = False) -> None:
    """``first`` then everything from ``source`` into ``sink``, then end ``sink``: ``send_eof`` for the
    socket, ``aclose`` for stdout (closing the pipe is its EOF)."""
    if first:
        await sink.send_all(first)
    if not source_done:
        while data := await source.receive_some(CHUNK):
            await sink.send_all(data)
    if hasattr(sink, "send_eof"):
        await sink.send_eof()
    else:
        await sink.aclose()


def _take_stdio() -> tuple[int, int]:
    """Private copies of fds 0 and 1, with /dev/null put on 0 and 1: closing our copy of stdout then really
    ends ssh's pipe (no other copy stays open), and a stray print cannot corrupt the SSH stream."""
    fd_in, fd_out = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    return fd_in, fd_out


def _spliceable(fd: int) -> bool:
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


async def _write_all_fd(fd: int, data: bytes) -> None:
    import trio

    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(fd)


def _close_fd(fd: int) -> None:
    import trio

    trio.lowlevel.notify_closing(fd)
    os.close(fd)


async def pipe_stdio(fd_in: int, fd_out: int, remote: Any, early: bytes, remote_eof: bool) -> None:
    """stdin -> ``remote`` and ``early`` + ``remote`` -> stdout, half-close both ways; closes both fds.

    ssh gives ProxyCommand pipes: then the bytes go through ``splice(2)`` without entering Python (the
    host's relay, ``kohakuriver_net.splice.splice_fds``); a terminal, or a system without splice, gets
    the plain copy loop."""
    import trio

    from kohakuriver_net.splice import HAVE_SPLICE, grow_pipe, splice_fds

    if not (HAVE_SPLICE and _spliceable(fd_in) and _spliceable(fd_out)):
        stdin, stdout = trio.lowlevel.FdStream(fd_in), trio.lowlevel.FdStream(fd_out)
        async with stdin, stdout, trio.open_nursery() as nursery:
            nursery.start_soon(_copy, stdin, remote)
            nursery.start_soon(_copy, remote, stdout, early, remote_eof)
        return
    sock = remote.socket.fileno()
    open_fds = {fd_in, fd_out}

    async def upstream() -> None:
        await splice_fds(fd_in, sock)
        await remote.send_eof()

    async def downstream() -> None:
        if early:
            await _write_all_fd(fd_out, early)
        if not remote_eof:
            await splice_fds(sock, fd_out)
        open_fds.discard(fd_out)
        _close_fd(fd_out)  # ssh sees EOF

    try:
        for fd in (fd_in, fd_out):
            os.set_blocking(fd, False)
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                grow_pipe(fd)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(upstream)
            nursery.start_soon(downstream)
    finally:
        for fd in open_fds:
            _close_fd(fd)


async def _proxy_stdio(address: str, port: int, task_id: int, token: str | None) -> int:
    import trio

    try:
        stream, early, eof = await open_tunnel(address, port, task_id, token)
    except TunnelRefused as exc:
        click.echo(f"ERROR {exc}", err=True)
        return EXIT_ERROR
    except (OSError, trio.TooSlowError) as exc:
        reason = "no answer in time" if isinstance(exc, trio.TooSlowError) else (exc.strerror or str(exc))
        click.echo(f"kr ssh: cannot reach the SSH proxy at {address}:{port}: {reason}", err=True)
        return EXIT_UNREACHABLE
    except ProtocolError as exc:
        click.echo(f"kr ssh: the SSH proxy at {address}:{port} answered oddly: {exc}", err=True)
        return EXIT_ERROR
    fd_in, fd_out = _take_stdio()
    code = 0
    try:
        async with stream:
            await pipe_stdio(fd_in, fd_out, stream, early, eof)
    except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        code = EXIT_ERROR  # ssh went away or the connection was reset: ssh reports it itself
    return code


async def _serve_local(
    port: int, address: str, proxy_port: int, task_id: int, token: str | None, checking: list[str] | None
) -> None:
    import trio

    from kohakuriver_net.splice import pipe_both_ways

    async def handle(local: trio.SocketStream) -> None:
        async with local:
            try:
                stream, early, eof = await open_tunnel(address, proxy_port, task_id, token)
            except (TunnelRefused, OSError, ProtocolError, trio.TooSlowError) as exc:
                info(f"kr ssh: task {task_id}: {'ERROR ' if isinstance(exc, TunnelRefused) else ''}{exc}")
                return
            try:
                async with stream:
                    await pipe_both_ways(stream, local, first=early, a_done=eof)
            except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass

    try:
        listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    except OSError as exc:
        raise CliError(f"cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}") from None
    bound = listeners[0].socket.getsockname()[1]
    options = checking or [f"HostKeyAlias={host_alias(task_id)}"]
    info(
        f"Forwarding 127.0.0.1:{bound} to the SSH server of VPS {task_id}; connect with "
        f"`ssh -p {bound} {' '.join(shlex.quote(f'-o{o}') for o in options)} root@127.0.0.1`. Ctrl-C stops."
    )
    # Ctrl-C (or SIGTERM) is the normal end: cancel the server and its connections in order.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, handle, listeners)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


# -- the commands' bodies ------------------------------------------------------------------------------------


def _run_foreground(argv: list[str], env: dict[str, str]) -> int:
    """Run ssh in the foreground; Ctrl-C belongs to ssh (it was delivered to both), not to us."""
    previous = signal.signal(signal.SIGINT, lambda *_: None)  # a handler, not SIG_IGN: ssh gets the default
    try:
        code = subprocess.call(argv, env=env)
    finally:
        signal.signal(signal.SIGINT, previous)
    return 128 - code if code < 0 else code


def ssh_to_task(
    cli_ctx: CliContext,
    task_id: int,
    *,
    key: str | None,
    user: str,
    proxy_port: int | None,
    local_port: int | None,
    command: list[str],
    ssh_options: Sequence[str] = (),
) -> int:
    """``kr ssh`` / ``kr vps connect``: ssh to the VPS through the proxy; the exit code (ssh's own)."""
    import trio

    task_id = parse_task_id(task_id)
    settings = cli_ctx.settings()
    address = proxy_address(settings.host_url)
    port = resolve_proxy_port(cli_ctx, proxy_port)
    if local_port is not None:
        if command:
            raise CliError("--local-port runs no command: connect to the local port instead", EXIT_USAGE)
        local = _port(local_port, "--local-port")
        checking = pinned_options(cli_ctx, task_id)
        trio.run(_serve_local, local, address, port, task_id, settings.token, checking)
        return 0
    ssh = shutil.which("ssh")
    if ssh is None:
        raise CliError("the OpenSSH client (ssh) is not installed")
    if key is not None:
        key_path: Path | None = Path(key).expanduser()
        if not key_path.is_file():
            raise CliError(f"no key file {key_path}", EXIT_USAGE)
    else:
        key_path = default_key(task_id)
    argv = build_ssh_argv(
        task_id,
        kr=kr_executable(),
        proxy_port=port,
        user=user,
        key=key_path,
        command=command,
        ssh=ssh,
        options=ssh_options,
        host_key_options=pinned_options(cli_ctx, task_id),
    )
    # ProxyCommand is another kr: it finds the same host and token in its environment.
    env = {**os.environ, "KOHAKURIVER_HOST": settings.host_url}
    if settings.token:
        env["KOHAKURIVER_TOKEN"] = settings.token
    cli_ctx.close()
    code = _run_foreground(argv, env)
    if code == EXIT_SSH_FAILED:
        hint = known_hosts.changed_key_hint(
            task_id, host_alias(task_id), lambda: fetch_host_key(cli_ctx, task_id)
        )
        if hint is not None:
            info(hint)
    return code


def proxy_stdio(cli_ctx: CliContext, task_id: int, proxy_port: int | None) -> int:
    import trio

    task_id = parse_task_id(task_id)
    settings = cli_ctx.settings()
    # ``kr ssh`` and ``kr ssh config`` always pass --proxy-port; a hand-written ProxyCommand may not, and
    # then the port is the host's, as for every other ssh command (one health request).
    port = resolve_proxy_port(cli_ctx, proxy_port)
    cli_ctx.close()
    return trio.run(_proxy_stdio, proxy_address(settings.host_url), port, task_id, settings.token)


def _config_value(text: str, what: str) -> str:
    """A value for an ssh_config line: ``%`` doubled, double-quoted when it has spaces."""
    text = _ssh_safe(text, what)
    if '"' in text:
        raise CliError(f"{what} cannot contain a double quote in an ssh config: {text[:80]!r}", EXIT_USAGE)
    return f'"{text}"' if any(c.isspace() for c in text) else text


def render_config(
    tasks: Sequence[dict[str, Any]],
    *,
    kr: str,
    host_url: str,
    proxy_port: int,
    pinned: Collection[int] = (),
    known_hosts_file: Path | None = None,
) -> str:
    """ssh_config ``Host`` entries, one per VPS record. The VPS in ``pinned`` have their host key pinned in
    ``known_hosts_file``: ssh checks them there, strictly; the others as ssh checks any host."""
    address = proxy_address(host_url)
    lines = [
        "# KohakuRiver VPS, written by `kr ssh config`. Use it from ~/.ssh/config with a line at the top:",
        "#   Include <this file>",
        "# then: ssh kohakuriver-<task id>",
        "",
    ]
    for task in tasks:
        task_id = parse_task_id(task.get("task_id"))
        name = task.get("name")
        comment = f" ({name})" if isinstance(name, str) and name.isprintable() else ""
        lines += [
            f"# VPS {task_id}{comment}, node {task.get('assigned_node') or '-'}, {task.get('status')}",
            f"Host {host_alias(task_id)}",
            f"    HostName {_config_value(address, 'the host address')}",
            "    User root",
            f"    HostKeyAlias {host_alias(task_id)}",
            f"    ProxyCommand {proxy_command(task_id, kr=kr, proxy_port=proxy_port, host_url=host_url)}",
        ]
        if task_id in pinned and known_hosts_file is not None:
            lines += [
                f"    UserKnownHostsFile {known_hosts.ssh_file_value(known_hosts_file)}",
                "    StrictHostKeyChecking yes",
            ]
        key = default_key(task_id)
        if key is not None:
            lines += [f"    IdentityFile {_config_value(str(key), 'the key path')}", "    IdentitiesOnly yes"]
        lines.append("")
    return "\n".join(lines)


def list_vps(cli_ctx: CliContext, everyone: bool) -> list[dict[str, Any]]:
    """The caller's running/paused VPS (operators: everyone's with ``everyone``), all pages."""
    client = cli_ctx.client()
    query: dict[str, Any] = {"task_type": "vps", "status": "running,paused", "limit": 1000}
    if not everyone:
        me = client.get("/api/auth/me")
        query["owner"] = me["username"]
    tasks: list[dict[str, Any]] = []
    while True:
        page = client.get("/api/tasks?" + urlencode({**query, "offset": len(tasks)}))
        tasks += page.get("tasks", [])
        if not page.get("has_more") or not page.get("tasks"):
            return tasks


def write_private_file(path: Path, text: str) -> None:
    """``text`` to ``path`` atomically, mode 0600 (the file names hosts and key paths)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(path, text.encode("utf-8"))


# -- click ---------------------------------------------------------------------------------------------------


class SshGroup(KrGroup):
    """``kr ssh TASK_ID ...`` runs ``connect``: a first argument that is not a subcommand is a task id."""

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            return "connect", self.commands["connect"], args
        return super().resolve_command(ctx, args)


@click.group("ssh", cls=SshGroup)
def ssh() -> None:
    """SSH into a VPS through the host's SSH proxy.

    \b
      kr ssh TASK_ID [--key PATH] [--user root] [-o SSH_OPTION] [-- COMMAND...]
      kr ssh TASK_ID --local-port 2222      (then: ssh -p 2222 root@127.0.0.1)
      kr ssh config [--output FILE]         (ssh_config entries: ssh kohakuriver-<id>)
    """


_proxy_port_option = click.option(
    "--proxy-port",
    type=int,
    default=None,
    help=f"The host's SSH proxy port [{PROXY_PORT_ENV}; default: the host's, else 8002].",
)


@ssh.command("connect", cls=KrCommand)
@click.argument("task_id")
@click.option("--key", "-i", "key", metavar="PATH", help="Private key (default: ~/.ssh/kohakuriver_<id>).")
@click.option("--user", "-u", "user", default="root", show_default=True, help="Remote user.")
@_proxy_port_option
@click.option("--local-port", type=int, default=None, help="Listen on 127.0.0.1:N instead of running ssh.")
@click.option(
    "--ssh-option",
    "-o",
    "ssh_options",
    multiple=True,
    metavar="OPTION",
    help="Passed to ssh as -o OPTION, e.g. -o StrictHostKeyChecking=accept-new (repeatable).",
)
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@pass_cli
def connect(
    cli_ctx: CliContext,
    task_id: str,
    key: str | None,
    user: str,
    proxy_port: int | None,
    local_port: int | None,
    ssh_options: tuple[str, ...],
    command: tuple[str, ...],
) -> None:
    """Open an SSH session to VPS TASK_ID (COMMAND after `--` runs it instead of a shell)."""
    code = ssh_to_task(
        cli_ctx,
        parse_task_id(task_id),
        key=key,
        user=user,
        proxy_port=proxy_port,
        local_port=local_port,
        command=list(command),
        ssh_options=ssh_options,
    )
    sys.exit(code)


@ssh.command("proxy-command", cls=KrCommand)
@click.argument("task_id")
@_proxy_port_option
@pass_cli
def proxy_command_cmd(cli_ctx: CliContext, task_id: str, proxy_port: int | None) -> None:
    """Connect stdin/stdout to VPS TASK_ID's SSH port (for ssh's ProxyCommand)."""
    sys.exit(proxy_stdio(cli_ctx, parse_task_id(task_id), proxy_port))


@ssh.command("config", cls=KrCommand)
@click.option("--output", "-o", "output", metavar="PATH", help="Write to this file (0600) instead of stdout.")
@_proxy_port_option
@click.option("--all", "everyone", is_flag=True, help="Every user's VPS (operators and admins).")
@pass_cli
def config_cmd(cli_ctx: CliContext, output: str | None, proxy_port: int | None, everyone: bool) -> None:
    """Print (or write) ssh_config entries `Host kohakuriver-<id>` for your running VPS."""
    tasks = list_vps(cli_ctx, everyone)
    pinned = [
        task_id
        for task_id in (parse_task_id(task.get("task_id")) for task in tasks)
        if pinned_options(cli_ctx, task_id) is not None  # else the warning is out: ssh checks it as usual
    ]
    text = render_config(
        tasks,
        kr=kr_executable(),
        host_url=cli_ctx.settings().host_url,
        proxy_port=resolve_proxy_port(cli_ctx, proxy_port),
        pinned=pinned,
        known_hosts_file=known_hosts.known_hosts_path(),
    )
    if output is None:
        click.echo(text, nl=False)
        return
    path = Path(output).expanduser().absolute()
    try:
        write_private_file(path, text)
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror or exc}") from None
    include = _config_value(str(path), "the output path")
    info(f"Wrote {len(tasks)} VPS entr{'y' if len(tasks) == 1 else 'ies'} to {path}.")
    info(f"Add this line at the top of ~/.ssh/config: Include {include}")
