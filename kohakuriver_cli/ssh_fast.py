"""``kr ssh TASK_ID [OPTIONS] [-- COMMAND...]`` without the CLI's start-up, and with no relay at all.

What the slow way cost (``bench/ssh.py``: 882 ms against 269 ms for direct ssh): the full CLI's imports,
``GET /api/health`` for the proxy port, then a second Python process as ssh's ProxyCommand, which did the
handshake and copied every byte between ssh's pipes and the socket. Here, instead:

1. The VPS's host key: pinned already in kohakuriver's known_hosts (the common case: a file read, no
   request), then ssh starts at once (step 4) and gets ready while this process does steps 2 and 3; else,
   after step 3, fetched from the host with the same ``http.client`` transport and pinned
   (``known_hosts.host_key_options``, the click command's policy). ssh checks it strictly.
2. The proxy port: ``--proxy-port``, ``KOHAKURIVER_SSH_PROXY_PORT``, else the port the host announced the
   last time, kept in ``<home>/ssh_proxy_ports`` per host URL, else ``/api/health`` (then kept).
3. This process connects to the SSH proxy and does the ``REQUEST_TUNNEL`` handshake itself (the sans-IO
   ``ClientHandshake``), reading exactly the reply line and nothing after it, so ssh finds the VPS's sshd
   banner first on the socket. A refusal is the only line printed: an ssh started early is killed before
   it had a connection, when it has said nothing.
4. ssh runs with ``ProxyUseFdpass=yes``: its ProxyCommand fetches the connected socket from this process
   over a Unix socket in a private directory and hands it to ssh (``SCM_RIGHTS``). ssh then talks to the
   socket itself: no process or thread copies the bytes, so throughput is that of a direct connection.
   (ssh closes every inherited descriptor above stderr when it starts, so the socket cannot simply be
   inherited.) The ProxyCommand is ``tunnel-client --fdpass SOCKET``, the project's static Rust binary
   (~1 ms to start), when ``fdpass_binary`` finds a build that has the mode, else a few lines of Python
   started with ``-S -I`` (no site, no packages: still 10-20 ms).

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

# Everything up to ssh's start delays everything that follows, so this file loads only C modules and ``os``
# before it: ``_socket`` and ``_signal`` are the cores of ``socket`` and ``signal`` without their enum and
# selectors imports (~4 ms); no ``re``, ``shlex``, ``contextlib`` or ``pathlib`` either (with what they
# import, ``enum``, ``collections``, ``functools``, ``urllib.parse``, ``ipaddress``: 8-14 ms on this
# project's 2-core test machine), which is why this file quotes, matches and joins paths by hand.
# (``import signal`` would still cost the enum; ``select``, ``time``, ``posix`` are built in.)
import _signal
import _socket
import os
import select
import sys
import time

#: ``typing.TYPE_CHECKING`` without importing ``typing`` (as ``kohakuriver_net.paths`` does).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

HOST_ALIAS_PREFIX = "kohakuriver-"
PROXY_PORT_ENV = "KOHAKURIVER_SSH_PROXY_PORT"
#: ``<home>/ssh_proxy_ports``: ``PORT HOST_URL`` a line (plain text: ``json`` loads ``re``, ~4 ms).
PORTS_FILE = "ssh_proxy_ports"
CONNECT_TIMEOUT = 30.0
#: How long the ProxyCommand may take to ask for the socket (ssh starts it before anything else).
FDPASS_TIMEOUT = 60.0
EXIT_SSH_FAILED = 255
#: The tunnel-client binary to pass the socket with (``tunnel-client --fdpass``): a path, used as it is, or
#: empty for the Python passer. Unset: ``fdpass_binary`` looks for one.
TUNNEL_CLIENT_ENV = "KOHAKURIVER_TUNNEL_CLIENT"
#: ``<home>/tunnel_client_fdpass``: which binaries were probed for the mode, by size and mtime.
FDPASS_CACHE = "tunnel_client_fdpass"
FDPASS_PROBE_ANSWER = b"fdpass 1\n"
_USER_FIRST = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
_USER_REST = _USER_FIRST | frozenset(".@-")
#: What a shell word may hold unquoted (``shlex.quote``'s set).
_SHELL_SAFE = _USER_FIRST | frozenset("@%+=:,./-")
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


def _quietly(call: Callable[..., object], *args: object, **kwargs: object) -> None:
    """``call(*args, **kwargs)``, an ``OSError`` ignored: ``contextlib.suppress`` without ``contextlib``."""
    try:
        call(*args, **kwargs)
    except OSError:
        return


def _valid_user(user: str) -> bool:
    """``[A-Za-z0-9_][A-Za-z0-9_.@-]{0,63}``, what ``ssh_cmd`` accepts, without ``re``."""
    return 0 < len(user) <= 64 and user[0] in _USER_FIRST and all(c in _USER_REST for c in user)


def _shell_join(words: list[str]) -> str:
    """``shlex.join`` without ``shlex`` (which imports ``re``): the same quoting, word for word."""
    return " ".join(
        w if w and all(c in _SHELL_SAFE for c in w) else "'" + w.replace("'", "'\"'\"'") + "'" for w in words
    )


def _ssh_value(text: str) -> str:
    if any(c in text for c in "\n\r\0"):
        raise _Unserved  # the full CLI explains
    return text.replace("%", "%%")


def fast_ssh_argv(
    task_id: int,
    *,
    proxy_options: list[str],
    user: str,
    key: str | os.PathLike[str] | None,
    options: list[str],
    command: list[str],
    ssh: str = "ssh",
    host_key_options: list[str] | None = None,
) -> list[str]:
    """ssh's argv: ``ssh_cmd.build_ssh_argv``'s with ``proxy_options`` where its ProxyCommand is."""
    if not _valid_user(user):
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


def fdpass_options(socket_path: str, passer: str | None = None) -> list[str]:
    """ssh's options that make it take the tunnel from ``socket_path``: through ``passer --fdpass`` (a
    tunnel-client binary, see ``fdpass_binary``) or, without one, the Python one-liner."""
    if passer:
        proxy = _shell_join([passer, "--fdpass", socket_path])
    else:
        proxy = _shell_join([sys.executable, "-S", "-I", "-c", FDPASS_CODE, socket_path])
    return ["-o", f"ProxyCommand={_ssh_value(proxy)}", "-o", "ProxyUseFdpass=yes"]


# -- what is read before ssh starts --------------------------------------------------------------------------
#
# ``kohakuriver_net.paths`` and ``known_hosts`` need ``pathlib`` and ``re``; these few lines give the same
# answers with ``os`` alone (tests/unit/test_cli_ssh.py holds them equal).


def _home() -> str:
    """``kohakuriver_net.paths.kohakuriver_home()`` as a string."""
    override = os.environ.get("KOHAKURIVER_HOME", "")
    return os.path.expanduser(override) if override else os.path.join(os.path.expanduser("~"), ".kohakuriver")


def pinned_options(alias: str) -> list[str] | None:
    """``known_hosts.pinned_options(alias)``: ssh's options checking the VPS against the key pinned in
    kohakuriver's known_hosts, when one is pinned for ``alias`` (a file read, no request), else None."""
    path = os.path.join(_home(), "known_hosts")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3 and not fields[0].startswith(("#", "|", "@")) and alias in fields[0].split(","):
            break
    else:
        return None
    if any(c in path for c in '"\n\r\0'):
        return None  # known_hosts.host_key_options says why
    value = path.replace("%", "%%")
    if any(c.isspace() for c in value):
        value = f'"{value}"'
    return [f"UserKnownHostsFile={value}", f"HostKeyAlias={alias}", "StrictHostKeyChecking=yes"]


# -- the fd passer -------------------------------------------------------------------------------------------


def _passer_candidates(environ: dict[str, str]) -> list[str]:
    """Where a tunnel-client may be, in order: beside this Python (the venv's ``kr``), the checkout's build
    output (``tunnel-client-rs/build.sh``, what ``scripts/setup.sh`` runs), the kohakuriver home (the
    runner's first place too), then PATH. A few ``stat`` calls: microseconds."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    found = [
        os.path.join(os.path.dirname(sys.executable), "tunnel-client"),
        os.path.join(repo, "tunnel-client-rs", "target", "release", "tunnel-client"),
        os.path.join(_home(), "tunnel-client"),
    ]
    on_path = _which("tunnel-client", environ)
    return [*found, on_path] if on_path else found


def fdpass_binary(environ: dict[str, str]) -> str | None:
    """The tunnel-client to pass the socket to ssh with, or None (the Python passer).

    ``KOHAKURIVER_TUNNEL_CLIENT`` decides when set (a path, or empty for none). Otherwise the first candidate
    that answers ``--fdpass-probe``: an older build without the mode would make ssh fail, so each binary is
    probed once (~1 ms) and the answer kept in ``<home>/tunnel_client_fdpass`` by path, size and mtime (a
    rebuilt binary is probed again). The common case costs a few ``stat`` calls and one small file read."""
    explicit = environ.get(TUNNEL_CLIENT_ENV)
    if explicit is not None:
        return explicit or None
    cache: dict[str, str] | None = None
    for path in _passer_candidates(environ):
        try:
            st = os.stat(path)
        except OSError:
            continue
        if not (st.st_mode & 0o170000 == 0o100000 and os.access(path, os.X_OK)):  # a regular executable
            continue
        if cache is None:
            cache = _probed()
        stamp = f"{st.st_size} {st.st_mtime_ns}"
        verdict = cache.get(path)
        if verdict is None or verdict.partition(" ")[2] != stamp:
            verdict = f"{'yes' if _probe(path) else 'no'} {stamp}"
            cache[path] = verdict
            _remember_probed(cache)
        if verdict.startswith("yes "):
            return path
    return None


def _probed() -> dict[str, str]:
    """``{path: "yes|no SIZE MTIME_NS"}`` from the cache file (one ``yes|no SIZE MTIME_NS PATH`` a line)."""
    found: dict[str, str] = {}
    try:
        with open(os.path.join(_home(), FDPASS_CACHE), encoding="utf-8") as f:
            for line in f:
                fields = line.rstrip("\n").split(" ", 3)
                if len(fields) == 4 and fields[0] in ("yes", "no"):
                    found[fields[3]] = " ".join(fields[:3])
    except (OSError, ValueError):
        pass
    return found


def _remember_probed(cache: dict[str, str]) -> None:
    """Keep the probes' answers; a failure to write only costs a probe next time."""
    from kohakuriver_net.atomic_file import write_file_atomic

    text = "".join(f"{verdict} {path}\n" for path, verdict in cache.items() if "\n" not in path)
    _quietly(write_file_atomic, os.path.join(_home(), FDPASS_CACHE), text.encode(), parent_mode=0o700)


def _probe(path: str, timeout: float = 2.0) -> bool:
    """Whether ``path --fdpass-probe`` answers ``fdpass 1`` and exits 0 within ``timeout``."""
    read_end, write_end = os.pipe()
    try:
        try:
            pid = os.posix_spawn(
                path, [path, "--fdpass-probe"], {},
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, write_end, 1),
                    (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
                ],
                setsigdef=(_signal.SIGPIPE,),
            )  # fmt: skip
        except OSError:
            return False
        finally:
            os.close(write_end)
        answer = b""
        deadline = time.monotonic() + timeout
        while len(answer) <= len(FDPASS_PROBE_ANSWER) and (left := deadline - time.monotonic()) > 0:
            if not select.select([read_end], [], [], left)[0] or not (chunk := os.read(read_end, 64)):
                break
            answer += chunk
        # Its stdout closed: it is exiting (a poll of a few ms at most), unless it hangs: then it is killed.
        while not (reaped := os.waitpid(pid, os.WNOHANG))[0] and time.monotonic() < deadline:
            time.sleep(0.001)
        if not reaped[0]:
            _quietly(os.kill, pid, _signal.SIGKILL)
            os.waitpid(pid, 0)
            return False
        return answer == FDPASS_PROBE_ANSWER and os.waitstatus_to_exitcode(reaped[1]) == 0
    finally:
        os.close(read_end)


# -- the proxy port ------------------------------------------------------------------------------------------


def _ports_file() -> str:
    return os.path.join(_home(), PORTS_FILE)


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


def _read_ports() -> dict[str, int]:
    """The remembered ports by host URL; lines that are not ``PORT URL`` are skipped."""
    ports: dict[str, int] = {}
    try:
        with open(_ports_file(), encoding="utf-8") as f:
            for line in f:
                port, _, url = line.rstrip("\n").partition(" ")
                try:
                    ports[url] = _port(port)
                except _Unserved:
                    continue
    except (OSError, ValueError):
        pass
    return ports


def remembered_port(host_url: str) -> int | None:
    return _read_ports().get(host_url)


def remember_port(host_url: str, port: int | None) -> None:
    """Keep (or, with None, forget) the port the host announced; a failure to write only costs speed."""
    from kohakuriver_net.atomic_file import write_file_atomic

    ports = _read_ports()
    if port is None:
        ports.pop(host_url, None)
    elif not any(c.isspace() for c in host_url):  # one line per URL: a URL with spaces is not kept
        ports[host_url] = port
    text = "".join(f"{p} {url}\n" for url, p in ports.items())
    _quietly(write_file_atomic, _ports_file(), text.encode(), parent_mode=0o700)


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
            self._pid = os.posix_spawn(argv[0], argv, env, setsigdef=(_signal.SIGPIPE, _signal.SIGXFSZ))
        except BaseException:
            self._close()
            raise

    def serve(self, tunnel: _socket.socket) -> int:
        """Hand ``tunnel`` to ssh's ProxyCommand, wait for ssh: its exit code (128 + N for signal N)."""
        assert self._pid is not None
        # Ctrl-C belongs to ssh (the terminal sends it to both): a handler, not SIG_IGN, so ssh keeps
        # the default.
        previous = _signal.signal(_signal.SIGINT, lambda *_: None)
        try:
            status = _hand_over(self._listener, tunnel, self._pid)
            tunnel.close()
            self._close()
            if status is None:
                status = os.waitpid(self._pid, 0)[1]
        finally:
            _signal.signal(_signal.SIGINT, previous)
            tunnel.close()
            self._close()
        code = os.waitstatus_to_exitcode(status)
        return 128 - code if code < 0 else code

    def abort(self) -> None:
        """Kill ssh before it has a connection (it prints nothing); its ProxyCommand finds no socket."""
        if self._pid is not None:
            _quietly(os.kill, self._pid, _signal.SIGKILL)
            _quietly(os.waitpid, self._pid, 0)  # ChildProcessError (an OSError): reaped already
        self._close()

    def _close(self) -> None:
        self._listener.close()
        _quietly(os.unlink, self._path)
        _quietly(os.rmdir, self._folder)


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
    task_id = parsed["task_id"]
    assert isinstance(task_id, int)
    ssh = _which("ssh", environ)
    if ssh is None:
        raise _Unserved
    key_text = parsed["key"]
    if key_text is not None:
        key: str | None = os.path.expanduser(str(key_text))
        if not os.path.isfile(key):
            raise _Unserved
    else:
        # ssh_keys.default_private_key_path (without pathlib): where `kr vps create --gen-ssh-key` saves it.
        default = os.path.join(os.path.expanduser("~"), ".ssh", f"kohakuriver_{task_id}")
        key = default if os.path.isfile(default) else None
    options = [str(o) for o in parsed["options"]]  # type: ignore[attr-defined]
    command = [str(c) for c in parsed["command"]]  # type: ignore[attr-defined]
    user = str(parsed["user"])
    fast_ssh_argv(task_id, proxy_options=[], user=user, key=key, options=options, command=command)  # checks

    alias = f"{HOST_ALIAS_PREFIX}{task_id}"
    passer = fdpass_binary(environ)

    def start_ssh(checking: list[str] | None) -> FdpassSsh:
        return FdpassSsh(
            lambda path: fast_ssh_argv(
                task_id, proxy_options=fdpass_options(path, passer), user=user, key=key, options=options,
                command=command, ssh=ssh, host_key_options=checking,
            ),
            environ,
        )  # fmt: skip

    # The common case, a key pinned already: ssh starts now, and its start (~10 ms, then its ProxyCommand)
    # overlaps this process loading the rest, reading the settings and opening the tunnel. A failure from
    # here to the hand-over kills it before it has printed anything.
    checking = pinned_options(alias)
    early = start_ssh(checking) if checking is not None else None
    try:
        host_url, token = _settings(environ)
        address = _hostname(host_url)
        if not address:
            raise _Unserved
        tunnel = _tunnel(host_url, address, parsed["proxy_port"], environ, task_id, token)
    except TunnelFailed as exc:
        if early is not None:
            early.abort()
        print(exc, file=sys.stderr)
        return EXIT_SSH_FAILED
    except BaseException:
        if early is not None:
            early.abort()
        raise
    if early is not None:
        child = early
    else:
        # Not pinned yet: fetched and pinned first (one request), after the tunnel, so that a refusal or an
        # unreachable proxy is said first, and alone. The tunnel waits meanwhile, well inside sshd's
        # LoginGraceTime.
        try:
            from . import known_hosts

            checking = known_hosts.host_key_options(
                task_id, alias, lambda: fetch_host_key(host_url, token, task_id), _warn
            )
            child = start_ssh(checking)
        except BaseException:
            tunnel.close()
            raise
    code = child.serve(tunnel)
    if code == EXIT_SSH_FAILED and checking is not None:
        from . import known_hosts  # not before the hand-over: re and pathlib, ~8 ms

        hint = known_hosts.changed_key_hint(task_id, alias, lambda: fetch_host_key(host_url, token, task_id))
        if hint is not None:
            _warn(hint)
    return code


def _settings(environ: dict[str, str]) -> tuple[str, str | None]:
    """``(host URL, token)`` as ``host_settings.resolve_settings`` gives them. With both in the environment
    (``KOHAKURIVER_HOST``, ``KOHAKURIVER_TOKEN``: its first case) the credentials file is not read, and its
    module not even loaded (``json``, ``pathlib``: ~8 ms, on the tunnel's side of the race)."""
    from .host_settings import normalize_host_url, resolve_settings  # a module without imports

    host, token = environ.get("KOHAKURIVER_HOST"), environ.get("KOHAKURIVER_TOKEN")
    if host and token:
        return normalize_host_url(host), token
    settings = resolve_settings(host, token, False)
    return settings.host_url, settings.token


def _hostname(url: str) -> str | None:
    """``urlsplit(url).hostname`` of an ``http(s)://`` URL, else None, without ``urllib.parse`` (~7 ms with
    ``re`` and ``ipaddress``). A malformed one (an unclosed ``[``) is None too: the click command explains."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        return None
    for end in "/?#":
        rest = rest.partition(end)[0]
    host = rest.rpartition("@")[2]
    if host.startswith("["):
        inside, closed, _ = host[1:].partition("]")
        host = inside if closed else ""
    elif "]" in host:
        return None
    else:
        host = host.partition(":")[0]
    return host.lower() or None


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
