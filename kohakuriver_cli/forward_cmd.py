"""``kr forward TASK_ID REMOTE_PORT``: a local TCP/UDP port that reaches a port inside a task's container.

This module is the command line: arguments, the session URL, the exit code. The sockets, the WebSocket and
reconnection are in ``forward_session``; the protocol is ``kohakuriver_proto.forwarder.Forwarder``.

Exit codes: 0 after SIGINT/SIGTERM (the user asked to stop; nothing failed), 3 when the host refuses the
task (unknown or not running), 4 when it is not allowed (or no valid token, or too many sessions), 5 when
the host cannot be reached at start, 2 for a bad argument or local address, 1 otherwise. A refusal's exit
code follows its machine-readable code (``kohakuriver_proto.session_opening``), never its words.
"""

from __future__ import annotations

import re
from urllib.parse import quote, urlsplit, urlunsplit

import click

from .client import EXIT_USAGE, CliError
from .context import CliContext, KrCommand, pass_cli

_TASK_ID = re.compile(r"[0-9]{1,20}")
_WS_SCHEMES = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}


def forward_url(host_url: str, task_id: str, port: int, proto: str) -> str:
    """``http(s)://host[:port][/prefix]`` -> ``ws(s)://host[:port][/prefix]/ws/forward/{id}/{port}?proto=``."""
    parts = urlsplit(host_url)
    scheme = _WS_SCHEMES.get(parts.scheme.lower())
    if scheme is None or not parts.netloc:
        raise CliError(f"invalid host URL {host_url!r}: use http:// or https://", EXIT_USAGE)
    path = f"{parts.path.rstrip('/')}/ws/forward/{quote(task_id, safe='')}/{port}"
    return urlunsplit((scheme, parts.netloc, path, f"proto={proto}", ""))


@click.command("forward", cls=KrCommand)
@click.argument("task_id")
@click.argument("remote_port", type=click.IntRange(1, 65535))
@click.option(
    "--local-port",
    "-l",
    type=click.IntRange(0, 65535),
    default=None,
    help="Local port to listen on (default: REMOTE_PORT; 0 = any free port).",
)
@click.option("--local-host", "-H", default="127.0.0.1", show_default=True, help="Local address to bind.")
@click.option(
    "--proto",
    "-p",
    type=click.Choice(["tcp", "udp"], case_sensitive=False),
    default="tcp",
    show_default=True,
    help="Protocol to forward.",
)
@pass_cli
def forward(
    cli: CliContext, task_id: str, remote_port: int, local_port: int | None, local_host: str, proto: str
) -> None:
    """Forward a local port to REMOTE_PORT inside task TASK_ID's container.

    Prints one line, `Forwarding ADDR:PORT -> task ID port N/PROTO`, once listening; runs until Ctrl-C.
    The listener stays up while the session to the host reconnects (host or runner restarts).
    """
    import trio  # keep `kr --help` quick: only forward needs trio and trio-websocket

    from .forward_session import ForwardSpec, run_forward

    if not _TASK_ID.fullmatch(task_id):
        raise CliError(f"invalid task id {task_id!r}: expected a decimal number", EXIT_USAGE)
    proto = proto.lower()
    settings = cli.settings()
    url = forward_url(settings.host_url, task_id, remote_port, proto)
    spec = ForwardSpec(
        task_id=task_id,
        remote_port=remote_port,
        proto=proto,
        local_host=local_host,
        local_port=remote_port if local_port is None else local_port,
        url=url,
        token=settings.token,
        ssl_context=_ssl_context() if url.startswith("wss:") else None,
    )
    from kohakuriver_net.allocator import keep_freed_memory

    keep_freed_memory()  # every forwarded byte passes through here in 256 KiB frames
    end = trio.run(run_forward, spec)
    if end.exit_code:
        raise CliError(end.message or "kr forward failed", end.exit_code)


def _ssl_context():  # an ssl.SSLContext; httpx is imported lazily
    """The same trust as the REST client (httpx's defaults: its CA bundle, SSL_CERT_FILE/SSL_CERT_DIR)."""
    import httpx

    return httpx.create_ssl_context()
