"""``kr ssh TASK_ID [OPTIONS] [-- COMMAND...]`` without the CLI's start-up, and with no relay at all.

What the slow way cost (``bench/ssh.py``: 882 ms against 269 ms for direct ssh): the full CLI's imports,
``GET /api/health`` for the proxy port, then a second Python process as ssh's ProxyCommand, which did the
handshake and copied every byte between ssh's pipes and the socket. Here, instead:

1. The VPS's host key: pinned already in kohakuriver's known_hosts (the common case: a file read, no
   request), then ssh starts at once (step 4) and gets ready while this process does steps 2 and 3; else,
   after step 3, fetched from the host with the same ``http.client`` transport and pinned
   (``known_hosts.host_key_options``, the click command's policy). ssh checks it strictly.
2. The proxy port: ``--proxy-port``, ``KOHAKURIVER_SSH_PROXY_PORT``, else the port the host announced the
   last time, kept in ``<home>/ssh_proxy_ports.json`` per host URL, else ``/api/health`` (then kept).
3. This process connects to the SSH proxy and does the ``REQUEST_TUNNEL`` handshake itself (the sans-IO
   ``ClientHandshake``), reading exactly the reply line and nothing after it, so ssh finds the VPS's sshd
   banner first on the socket. A refusal is the only line printed: an ssh started early is killed before
   it had a connection, when it has said nothing.
4. ssh runs with ``ProxyUseFdpass=yes``: its ProxyCommand is a few lines of Python started with ``-S -I``
   (no site, no packages: ~10 ms) that fetch the connected socket from this process over a Unix socket in
   a private directory and hand it to ssh (``SCM_RIGHTS``). ssh then talks to the socket itself: no
   process or thread copies the bytes, so throughput is that of a direct connection.

Only the plain form is served: a decimal id, then ``--key/-i``, ``--user/-u``, ``--proxy-port``,
``-o/--ssh-option``, then ``--`` and the command. Anything else (``--local-port``, ``--help``, words before
``--``, a key file that is missing, a host that does not answer ``/api/health``) returns None and the click
command handles it, with its own messages. The ssh argv is the one ``ssh_cmd.build_ssh_argv`` makes apart
from how the bytes reach the proxy; tests/unit/test_cli_ssh.py compares the two.

Exit codes: ssh's own; 255 (what ssh returns when it cannot connect) when the proxy is unreachable or
refuses, after one line on stderr (``ERROR <reason>`` as ``kr ssh proxy-command`` prints it). When ssh
exits 255 with a pinned key, the host is asked for the key once more: a different one (a re-created node)
is said in one line naming the file that holds the pinned key (``known_hosts.changed_key_hint``).
"""

from __future__ import annotations

# ``_socket`` is the C core of ``socket``: the few calls this file makes, without socket.py's ~4 ms of enum
# and selectors imports (ssh is started after those imports, so they delay everything that follows).
import _socket
import contextlib
import os
import re
import select
import shlex
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

HOST_ALIAS_PREFIX = "kohakuriver-"
PROXY_PORT_ENV = "KOHAKURIVER_SSH_PROXY_PORT"
PORTS_FILE = "ssh_proxy_ports.json"
CONNECT_TIMEOUT = 30.0
#: How long the ProxyCommand may take to ask for the socket (ssh starts it before anything else).
FDPASS_TIMEOUT = 60.0
EXIT_SSH_FAILED = 255
_USER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,63}")
_MAX_TASK_ID = (1 << 63) - 1

#: ssh's ProxyCommand with ProxyUseFdpass: connect to the Unix socket named by argv[1], receive one
#: descriptor, pass it on to ssh through stdout (a socket ssh made for this). Any failure exits 1 without a
#: word (``excepthook``): when ``kr`` gives up on the tunnel it has killed ssh already, and nothing may reach
#: the terminal after kr's own line. One line: ssh options cannot hold a line break; no ``%``: ssh would
#: expand it.
FDPASS_CODE = (
    "import _socket as s,sys,posix;sys.excepthook=lambda*e:posix._exit(1);"
    "u=s.socket(s.AF_UNIX,s.SOCK_STREAM);u.settimeout(60);u.connect(sys.argv[1]);"
    "m,a,f,r=u.recvmsg(1,s.CMSG_SPACE(4));a or sys.exit(1);"
    "s.socket(fileno=1).sendmsg([b'k'],a[:1])"
)


class _Unserved(Exception):
    """This path does not serve the call: the click command takes it."""


def parse_args(args: list[str]) -> dict[str, object] | None:
    """The options of the plain form, or None when the full CLI must decide."""
    if not args or not (args[0].isascii() and args[0].isdigit()):
        return None
    task_id = int(args[0])
    if not 0 < task_id <= _MAX_TASK_ID:
        return None
    found: dict[str, object] = {"task_id": task_id, "key": None, "user": "root", "proxy_port": None}
    options: list[str] = []
    rest = args[1:]
    names = {"--key": "key", "-i": "key", "--user": "user", "-u": "user", "--proxy-port": "proxy_port"}
    while rest:
        arg = rest.pop(0)
        if arg == "--":
            break
        name, eq, value = arg.partition("=")
        if not eq and arg in ("-o", "--ssh-option", *names) and rest:
            name, value = arg, rest.pop(0)
        elif not (eq and name.startswith("--") and (name in names or name == "--ssh-option")):
            return None  # --help, --local-port, a command without --, -oX, ...: the full CLI
        if name in ("-o", "--ssh-option"):
            options.append(value)
        else:
            found[names[name]] = value
    found["options"] = options
    found["command"] = rest
    return found


def _ssh_value(text: str) -> str:
    if any(c in text for c in "\n\r\0"):
        raise _Unserved  # the full CLI explains
    return text.replace("%", "%%")


def fast_ssh_argv(
    task_id: int,
    *,
    proxy_options: list[str],
    user: str,
    key: Path | None,
    options: list[str],
    command: list[str],
    ssh: str = "ssh",
    host_key_options: list[str] | None = None,
) -> list[str]:
    """ssh's argv: ``ssh_cmd.build_ssh_argv``'s with ``proxy_options`` where its ProxyCommand is."""
    if not _USER_RE.fullmatch(user):
        raise _Unserved
    alias = f"{HOST_ALIAS_PREFIX}{task_id}"
    argv = [ssh, *proxy_options, "-l", user]
    if key is not None:
        argv += ["-i", _ssh_value(os.fspath(key)), "-o", "IdentitiesOnly=yes"]
    # The user's options as typed (their % tokens are ssh's to expand), then how the host key is checked.
    for option in [*options, *(host_key_options or [f"HostKeyAlias={alias}"])]:
        if any(c in option for c in "\n\r\0"):
            raise _Unserved  # the full CLI explains
        argv += ["-o", option]
    return [*argv, "--", alias, *command]


def fdpass_options(socket_path: str) -> list[str]:
    proxy = shlex.join([sys.executable, "-S", "-I", "-c", FDPASS_CODE, socket_path])
    return ["-o", f"ProxyCommand={_ssh_value(proxy)}", "-o", "ProxyUseFdpass=yes"]


# -- the proxy port ------------------------------------------------------------------------------------------


def _ports_file() -> Path:
    from kohakuriver_net.paths import kohakuriver_home

    return kohakuriver_home() / PORTS_FILE


def _port(text: object) -> int:
    if isinstance(text, bool):
        raise _Unserved
    try:
        port = int(str(text))
    except ValueError:
        raise _Unserved from None
    if not 1 <= port <= 65535:
        raise _Unserved
    return port


def remembered_port(host_url: str) -> int | None:
    import json  # not at the top: an early ssh (a pinned key) starts before this is needed

    try:
        ports = json.loads(_ports_file().read_text(encoding="utf-8"))
        return _port(ports[host_url])
    except (OSError, ValueError, KeyError, TypeError, _Unserved):
        return None


def remember_port(host_url: str, port: int | None) -> None:
    """Keep (or, with None, forget) the port the host announced; a failure to write only costs speed."""
    import json

    from kohakuriver_net.atomic_file import write_file_atomic

    path = _ports_file()
    try:
        ports = json.loads(path.read_text(encoding="utf-8"))
        ports = ports if isinstance(ports, dict) else {}
    except (OSError, ValueError):
        ports = {}
    if port is None:
        ports.pop(host_url, None)
    else:
        ports[host_url] = port
    with contextlib.suppress(OSError):
        write_file_atomic(path, (json.dumps(ports, indent=1) + "\n").encode(), parent_mode=0o700)


def announced_port(host_url: str, token: str | None) -> int:
    """``ssh_proxy_port`` of ``/api/health`` (8002 when the host does not say); ``_Unserved`` when the host
    does not answer well (the full CLI reports it)."""
    from .http_transport import StdlibTransport, TransportError

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        wire = StdlibTransport(host_url, 10.0)
        try:
            reply = wire.send("GET", "/api/health", headers, None)
        finally:
            wire.close()
        health = reply.json() if reply.status_code == 200 else None
    except (TransportError, ValueError):
        raise _Unserved from None
    port = health.get("ssh_proxy_port") if isinstance(health, dict) else None
    if isinstance(port, int) and not isinstance(port, bool) and 1 <= port <= 65535:
        return port
    return 8002


def fetch_host_key(host_url: str, token: str | None, task_id: int) -> str:
    """The VPS's public host key from the host; ``known_hosts.KeyUnavailable`` with the host's reason when
    it gives none (an older host without the route: 404; a VPS never started: 409; its node offline: 503)."""
    from .http_transport import StdlibTransport, TransportError
    from .known_hosts import KeyUnavailable, key_from_answer

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        wire = StdlibTransport(host_url, 10.0)
        try:
            reply = wire.send("GET", f"/api/vps/{task_id}/host-key", headers, None)
        finally:
            wire.close()
    except (TransportError, ValueError) as exc:
        raise KeyUnavailable(f"cannot reach the host at {host_url}: {exc}") from None
    try:
        body = reply.json()
    except ValueError:
        body = None
    if reply.status_code == 200:
        return key_from_answer(body)
    message = body.get("message") if isinstance(body, dict) else None
    reason = message if isinstance(message, str) else reply.reason_phrase
    raise KeyUnavailable(" ".join(f"{reason} (HTTP {reply.status_code})".split()))


def _warn(line: str) -> None:
    print(line, file=sys.stderr)


# -- the tunnel ----------------------------------------------------------------------------------------------


class TunnelFailed(Exception):
    """Could not open the tunnel; the message is the line for stderr."""


def _connect(address: str, port: int, timeout: float) -> _socket.socket:
    """``socket.create_connection`` on ``_socket``. An ASCII name is given as bytes: a str makes
    ``getaddrinfo`` load the IDNA codec (~1.5 ms) to encode it."""
    host = address.encode("ascii") if address.isascii() else address
    error: OSError | None = None
    for family, kind, proto, _, where in _socket.getaddrinfo(host, port, 0, _socket.SOCK_STREAM):
        sock = _socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(where)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error or OSError(f"no address for {address}")


def open_tunnel(address: str, port: int, task_id: int, token: str | None) -> _socket.socket:
    """A socket to the VPS's sshd, the handshake done and nothing of the sshd's bytes read."""
    from kohakuriver_proto.errors import ProtocolError
    from kohakuriver_proto.ssh_handshake import NEED_DATA, ClientHandshake, TunnelRejected

    try:
        sock = _connect(address, port, CONNECT_TIMEOUT)
    except OSError as exc:
        reason = "no answer in time" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise TunnelFailed(f"kr ssh: cannot reach the SSH proxy at {address}:{port}: {reason}") from None
    try:
        hs = ClientHandshake(task_id, token)
        sock.sendall(hs.send_request())
        while (event := hs.next_event()) is NEED_DATA:
            # Up to the end of the reply line only: what follows is the sshd's, and ssh reads it.
            ahead = sock.recv(4096, _socket.MSG_PEEK)
            end = ahead.find(b"\n")
            hs.receive_data(sock.recv(len(ahead) if end < 0 else end + 1) if ahead else b"")
        if isinstance(event, TunnelRejected):
            raise TunnelFailed(f"ERROR {event.message}")
        sock.settimeout(None)
        return sock
    except OSError as exc:
        sock.close()
        raise TunnelFailed(f"kr ssh: the SSH proxy at {address}:{port} closed: {exc}") from None
    except ProtocolError as exc:
        sock.close()
        raise TunnelFailed(f"kr ssh: the SSH proxy at {address}:{port} answered oddly: {exc}") from None
    except BaseException:
        sock.close()
        raise


def _private_dir(environ: dict[str, str]) -> str:
    """A new 0700 directory for the hand-over socket: only this user can ask for the tunnel. (Not
    ``tempfile``: with ``shutil`` it costs ~6 ms of imports, more than this whole function.)"""
    for base in dict.fromkeys([environ.get("TMPDIR") or "/tmp", "/tmp"]):
        for _ in range(8):
            path = os.path.join(base, f"kr-ssh-{os.urandom(6).hex()}")
            try:
                os.mkdir(path, 0o700)
                return path
            except FileExistsError:
                continue
            except OSError:
                break
    raise _Unserved


def _hand_over(listener: _socket.socket, tunnel: _socket.socket, pid: int) -> int | None:
    """Give the tunnel's descriptor to the first process that connects (ssh's ProxyCommand), unless ssh
    ends before (a master connection reused, an option refused): ssh's wait status if this reaped it."""
    try:
        ssh_ended: int | None = os.pidfd_open(pid)
    except (AttributeError, OSError):
        ssh_ended = None  # no pidfd (an old kernel): look at ssh every 50 ms instead
    try:
        deadline = time.monotonic() + FDPASS_TIMEOUT
        while (left := deadline - time.monotonic()) > 0:
            if ssh_ended is None:
                ready, _, _ = select.select([listener], [], [], min(left, 0.05))
            else:
                ready, _, _ = select.select([listener, ssh_ended], [], [], left)
            if listener in ready:
                conn = _socket.socket(fileno=listener._accept()[0])
                try:
                    fd = tunnel.fileno().to_bytes(4, sys.byteorder)  # one C int, as socket.send_fds packs it
                    conn.sendmsg([b"k"], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fd)])
                finally:
                    conn.close()
                return None
            if ssh_ended is None:
                reaped, status = os.waitpid(pid, os.WNOHANG)
                if reaped:
                    return status
            elif ready:
                return None
        return None
    except OSError:
        return None  # the ProxyCommand went away: ssh says why
    finally:
        if ssh_ended is not None:
            os.close(ssh_ended)


class FdpassSsh:
    """ssh started with ``ProxyUseFdpass`` (``argv_of(socket_path)``), its ProxyCommand waiting on a Unix
    socket in a fresh 0700 directory for the tunnel this process will hand over (``serve``), or killed before
    it has a connection (``abort``), when it has printed nothing yet: ssh touches neither the terminal nor
    its keys before its ProxyCommand gives it the connection, and the ProxyCommand exits silently.

    ``posix_spawn`` and a ``select`` loop in this thread rather than ``subprocess`` and a thread: the same
    work without ~6 ms of imports. ``setsigdef``: ssh starts with the SIGPIPE/SIGXFSZ dispositions Python
    changed for itself put back (what ``subprocess``'s ``restore_signals`` does)."""

    def __init__(self, argv_of: Callable[[str], list[str]], env: dict[str, str]) -> None:
        self._folder = _private_dir(env)
        self._path = os.path.join(self._folder, "s")
        self._listener = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        self._pid: int | None = None
        try:
            try:
                self._listener.bind(self._path)
            except OSError:
                raise _Unserved from None  # a TMPDIR too long for a socket name: the click command relays
            self._listener.listen(1)
            argv = argv_of(self._path)
            self._pid = os.posix_spawn(argv[0], argv, env, setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))
        except BaseException:
            self._close()
            raise

    def serve(self, tunnel: _socket.socket) -> int:
        """Hand ``tunnel`` to ssh's ProxyCommand, wait for ssh: its exit code (128 + N for signal N)."""
        assert self._pid is not None
        # Ctrl-C belongs to ssh (the terminal sends it to both): a handler, not SIG_IGN, so ssh keeps
        # the default.
        previous = signal.signal(signal.SIGINT, lambda *_: None)
        try:
            status = _hand_over(self._listener, tunnel, self._pid)
            tunnel.close()
            self._close()
            if status is None:
                status = os.waitpid(self._pid, 0)[1]
        finally:
            signal.signal(signal.SIGINT, previous)
            tunnel.close()
            self._close()
        code = os.waitstatus_to_exitcode(status)
        return 128 - code if code < 0 else code

    def abort(self) -> None:
        """Kill ssh before it has a connection (it prints nothing); its ProxyCommand finds no socket."""
        if self._pid is not None:
            with contextlib.suppress(OSError):
                os.kill(self._pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self._pid, 0)
        self._close()

    def _close(self) -> None:
        self._listener.close()
        with contextlib.suppress(OSError):
            os.unlink(self._path)
        with contextlib.suppress(OSError):
            os.rmdir(self._folder)


def run_ssh(argv_of: Callable[[str], list[str]], tunnel: _socket.socket, env: dict[str, str]) -> int:
    """Run ssh (``argv_of(socket_path)``) in the foreground, serving ``tunnel`` to its ProxyCommand."""
    try:
        ssh = FdpassSsh(argv_of, env)
    except BaseException:
        tunnel.close()
        raise
    return ssh.serve(tunnel)


def _which(name: str, environ: dict[str, str]) -> str | None:
    """``shutil.which`` without importing ``shutil``: the first executable ``name`` on PATH."""
    for folder in environ.get("PATH", os.defpath).split(os.pathsep):
        path = os.path.join(folder or os.curdir, name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return os.path.abspath(path)
    return None


def try_run(args: list[str], environ: dict[str, str] | None = None) -> int | None:
    """Serve ``kr ssh ARGS`` and return the exit code, or None when the click command must."""
    parsed = parse_args(args)
    if parsed is None:
        return None
    environ = dict(os.environ) if environ is None else environ
    try:
        return _run(parsed, environ)
    except _Unserved:
        return None


def _run(parsed: dict[str, object], environ: dict[str, str]) -> int:
    from urllib.parse import urlsplit

    from .host_settings import resolve_settings
    from .ssh_keys import default_private_key_path

    task_id = parsed["task_id"]
    assert isinstance(task_id, int)
    ssh = _which("ssh", environ)
    if ssh is None:
        raise _Unserved
    key_text = parsed["key"]
    if key_text is not None:
        key: Path | None = Path(str(key_text)).expanduser()
        if not key.is_file():
            raise _Unserved
    else:
        default = default_private_key_path(task_id)
        key = default if default.is_file() else None
    options = [str(o) for o in parsed["options"]]  # type: ignore[attr-defined]
    command = [str(c) for c in parsed["command"]]  # type: ignore[attr-defined]
    user = str(parsed["user"])
    fast_ssh_argv(task_id, proxy_options=[], user=user, key=key, options=options, command=command)  # checks

    from . import known_hosts

    alias = f"{HOST_ALIAS_PREFIX}{task_id}"

    def start_ssh(checking: list[str] | None) -> FdpassSsh:
        return FdpassSsh(
            lambda path: fast_ssh_argv(
                task_id, proxy_options=fdpass_options(path), user=user, key=key, options=options,
                command=command, ssh=ssh, host_key_options=checking,
            ),
            environ,
        )  # fmt: skip

    # The common case, a key pinned already: ssh starts now, and its start (ssh, then its ProxyCommand, a
    # second Python) overlaps this process reading the settings and opening the tunnel, ~15 ms each. A
    # failure from here to the hand-over kills it before it has printed anything.
    checking = known_hosts.pinned_options(alias)
    early = start_ssh(checking) if checking is not None else None
    try:
        settings = resolve_settings(environ.get("KOHAKURIVER_HOST"), environ.get("KOHAKURIVER_TOKEN"), False)
        try:
            address = urlsplit(settings.host_url).hostname
        except ValueError:
            address = None
        if not address or not settings.host_url.lower().startswith(("http://", "https://")):
            raise _Unserved
        tunnel = _tunnel(settings.host_url, address, parsed["proxy_port"], environ, task_id, settings.token)
    except TunnelFailed as exc:
        if early is not None:
            early.abort()
        print(exc, file=sys.stderr)
        return EXIT_SSH_FAILED
    except BaseException:
        if early is not None:
            early.abort()
        raise
    host_url, token = settings.host_url, settings.token
    if early is not None:
        child = early
    else:
        # Not pinned yet: fetched and pinned first (one request), after the tunnel, so that a refusal or an
        # unreachable proxy is said first, and alone. The tunnel waits meanwhile, well inside sshd's
        # LoginGraceTime.
        try:
            checking = known_hosts.host_key_options(
                task_id, alias, lambda: fetch_host_key(host_url, token, task_id), _warn
            )
            child = start_ssh(checking)
        except BaseException:
            tunnel.close()
            raise
    code = child.serve(tunnel)
    if code == EXIT_SSH_FAILED and checking is not None:
        hint = known_hosts.changed_key_hint(task_id, alias, lambda: fetch_host_key(host_url, token, task_id))
        if hint is not None:
            _warn(hint)
    return code


def _tunnel(
    host_url: str, address: str, option: object, environ: dict[str, str], task_id: int, token: str | None
) -> _socket.socket:
    """The tunnel through the proxy port that the option, the environment, the remembered announcement or
    the host says, in that order. A remembered port that no longer takes the handshake is forgotten and
    the host asked again."""
    explicit = option if option is not None else environ.get(PROXY_PORT_ENV)
    if explicit not in (None, ""):
        return open_tunnel(address, _port(explicit), task_id, token)
    port = remembered_port(host_url)
    if port is not None:
        try:
            return open_tunnel(address, port, task_id, token)
        except TunnelFailed as exc:
            if str(exc).startswith("ERROR"):  # the proxy answered: the port is right
                raise
            remember_port(host_url, None)
    port = announced_port(host_url, token)
    remember_port(host_url, port)
    return open_tunnel(address, port, task_id, token)
