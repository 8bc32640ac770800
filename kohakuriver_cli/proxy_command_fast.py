"""``kr ssh proxy-command`` without the CLI's import cost: the command OpenSSH runs for every connection.

Why a second path: `ssh`, `scp`, `rsync` and IDE extensions start a new ProxyCommand per connection, and the
full CLI imports click, httpx, rich, trio and every command module before doing anything: 250-500 ms per
connection, measured by ``bench/ssh.py``, against a proxy that answers in 2 ms. This module needs the
standard library and the sans-IO handshake of ``kohakuriver_proto`` only (about 45 ms with the interpreter).

It takes the call `kr ssh` and `kr ssh config` generate, ``kr ssh proxy-command --proxy-port P TASK_ID``
with ``KOHAKURIVER_HOST`` (and ``KOHAKURIVER_TOKEN``) in the environment, which `kr ssh` always sets for its
child. Anything else (no port, no host in the environment, other options, ``--help``) returns ``None`` and
the full CLI handles it, reading the credentials file and asking the host for its proxy port.

The bytes then move with ``splice(2)`` through a kernel pipe in each direction (two threads: there is no
event loop in this short-lived process, and each thread blocks on exactly one descriptor), with the
half-close the SSH protocol needs: stdin's EOF shuts the socket's write side; the proxy's EOF closes stdout.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import sys
import threading
from urllib.parse import urlsplit

#: Same meanings as the full CLI's (``client.py``): 1 error, 5 host unreachable.
EXIT_ERROR = 1
EXIT_UNREACHABLE = 5
CONNECT_TIMEOUT = 30.0
SPLICE_CHUNK = 1 << 20
COPY_CHUNK = 256 * 1024


def parse_args(args: list[str], environ: dict[str, str]) -> tuple[str, int, int, str | None] | None:
    """``(address, port, task_id, token)`` for the call this path serves, else None (the full CLI decides)."""
    port_text: str | None = None
    task_text: str | None = None
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        if arg == "--proxy-port" and rest:
            port_text = rest.pop(0)
        elif arg.startswith("--proxy-port="):
            port_text = arg.partition("=")[2]
        elif arg.isascii() and arg.isdigit() and task_text is None:
            task_text = arg
        else:
            return None  # --help, other options, a malformed id: the full CLI explains
    port_text = port_text or environ.get("KOHAKURIVER_SSH_PROXY_PORT")
    host_url = environ.get("KOHAKURIVER_HOST", "")
    if not (task_text and port_text and port_text.isascii() and port_text.isdigit() and "://" in host_url):
        return None
    port, task_id = int(port_text), int(task_text)
    try:
        address = urlsplit(host_url).hostname
    except ValueError:
        return None
    if not (address and 1 <= port <= 65535 and 0 < task_id < 1 << 63):
        return None
    return address, port, task_id, environ.get("KOHAKURIVER_TOKEN") or None


def _handshake(sock: socket.socket, task_id: int, token: str | None) -> tuple[bytes, bool] | str:
    """Send the request, read the reply: ``(bytes after SUCCESS, EOF seen)`` or the ERROR message."""
    from kohakuriver_proto.ssh_handshake import NEED_DATA, ClientHandshake, TunnelRejected

    hs = ClientHandshake(task_id, token)
    sock.sendall(hs.send_request())
    while (event := hs.next_event()) is NEED_DATA:
        hs.receive_data(sock.recv(4096))
    if isinstance(event, TunnelRejected):
        return event.message
    return hs.trailing_data


def _copy(src: int, dst: int) -> None:
    while data := os.read(src, COPY_CHUNK):
        view = memoryview(data)
        while view:
            view = view[os.write(dst, view) :]


def _move(src: int, dst: int) -> None:
    """Everything from ``src`` to ``dst`` until EOF: splice through a pipe, or copy where splice cannot."""
    pipe_r, pipe_w = os.pipe()
    try:
        while True:
            try:
                n = os.splice(src, pipe_w, SPLICE_CHUNK)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                _copy(src, dst)  # a terminal or a regular file: splice does not take those
                return
            if n == 0:
                return
            while n:
                n -= os.splice(pipe_r, dst, n)
    finally:
        os.close(pipe_r)
        os.close(pipe_w)


def _pipe(sock: socket.socket, early: bytes, remote_eof: bool) -> None:
    def upstream() -> None:
        with contextlib.suppress(OSError):  # the proxy went away: downstream sees it too
            _move(0, sock.fileno())
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)

    def downstream() -> None:
        try:
            if early:
                os.write(1, early)
            if not remote_eof:
                _move(sock.fileno(), 1)
        except OSError:
            pass  # ssh went away
        finally:
            os.close(1)  # ssh sees EOF

    up = threading.Thread(target=upstream, daemon=True)
    down = threading.Thread(target=downstream, daemon=True)
    up.start()
    down.start()
    down.join()
    # ssh closes its side once it has read our EOF; do not wait for ever on one that does not.
    up.join(5.0)


def try_run(args: list[str], environ: dict[str, str] | None = None) -> int | None:
    """Run the proxy command and return its exit code, or None when this path does not serve ``args``."""
    parsed = parse_args(args, dict(os.environ) if environ is None else environ)
    if parsed is None:
        return None
    address, port, task_id, token = parsed
    from kohakuriver_proto.errors import ProtocolError

    try:
        sock = socket.create_connection((address, port), timeout=CONNECT_TIMEOUT)
    except OSError as exc:
        reason = "no answer in time" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        print(f"kr ssh: cannot reach the SSH proxy at {address}:{port}: {reason}", file=sys.stderr)
        return EXIT_UNREACHABLE
    with sock:
        try:
            reply = _handshake(sock, task_id, token)
        except OSError as exc:
            print(f"kr ssh: the SSH proxy at {address}:{port} closed: {exc}", file=sys.stderr)
            return EXIT_ERROR
        except ProtocolError as exc:  # a reply that is not the handshake's
            print(f"kr ssh: the SSH proxy at {address}:{port} answered oddly: {exc}", file=sys.stderr)
            return EXIT_ERROR
        if isinstance(reply, str):
            print(f"ERROR {reply}", file=sys.stderr)
            return EXIT_ERROR
        sock.settimeout(None)
        _pipe(sock, *reply)
    return 0
