"""``serve_host``: the host daemon, one trio nursery with the HTTP/WebSocket API (quart-trio on hypercorn),
the scheduling loop, the liveness loop and the SSH proxy.

Start-up order, so that ``task_status.started(HostHandle(...))`` means "usable":

1. open the store (created and migrated if needed);
2. the cluster token: ``CLUSTER_TOKEN`` if set, else generated once and kept in the store (and written to
   ``config.cluster_token_file``, 0600, for a runner on the same machine);
3. dispatches that were in flight when the host last stopped go back to the queue;
4. the overlay network (``overlay_service``): the reservation key and the runners' ids loaded, the host's
   links reconciled with them (a restart changes nothing that works, so traffic keeps flowing); with the
   overlay off, links an earlier run left are removed;
5. the API listens (``HOST_BIND_IP:HOST_PORT``; https when ``TLS_CERT_FILE``/``TLS_KEY_FILE`` are set, served
   by hypercorn; plain http through ``front_door``, which splices forward sessions past hypercorn);
6. the first admin's credentials file exists (``auth.ensure_first_admin``) with a URL a local CLI can use;
7. the scheduling, liveness and overlay loops run, and the SSH proxy listens (``ssh_proxy.serve_ssh_proxy``).

The overlay's links are left in place when the host stops: runners' traffic through the host must survive
a restart; the next start reconciles them.

Shutdown is cancellation (the CLI cancels the scope on SIGTERM): the nursery cancels the server and both
loops, then the runner HTTP client and the store are closed (shielded, bounded) on the way out, so no
thread, socket or half-written transaction is left behind.
"""

from __future__ import annotations

import gc
import ipaddress
import logging
import pathlib
from collections.abc import Callable
from functools import partial

import attrs
import hypercorn.config
import hypercorn.trio
import trio

from kohakuriver_net.atomic_file import write_file_atomic
from kohakuriver_net.front_door import FrontDoor
from kohakuriver_proto.snowflake import SnowflakeGenerator

from . import api_forward, auth
from .app import create_app
from .context import HostContext
from .fast_path import HeartbeatFastPath
from .forward_splice import FORWARD_LINE, serve_forward
from .host_settings import HostSettings
from .liveness import requeue_unconfirmed, run_liveness
from .local_runner import LocalRunner
from .node_service import HeartbeatBatcher
from .overlay_links import OverlayLinks
from .overlay_service import OverlayService
from .runner_client import RunnerClient
from .scheduling_loop import SchedulingLoop
from .ssh_proxy import serve_ssh_proxy
from .store import ReadTx, Store, open_store

log = logging.getLogger("kohakuriver.host")

#: Instance bits of the task-id generator: one host issues ids, so 0.
ID_INSTANCE = 0
CLOSE_TIMEOUT = 5.0


@attrs.frozen
class HostHandle:
    """What ``serve_host`` hands to whoever started it once the host is usable."""

    url: str  # where a CLI on this machine reaches the API
    cluster_token: str  # runners join with it (``kr up`` gives it to its runner)
    ssh_proxy_port: int  # where the SSH proxy listens (HOST_SSH_PROXY_PORT; a free port when port=0)
    #: ``kr up``: announce the runner started in this process (``local_runner``), so forward sessions to it
    #: are handed over in memory instead of relayed through a loopback connection.
    adopt_runner: Callable[[LocalRunner], None]


def _url_host(address: str) -> str:
    try:
        return f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
    except ValueError:
        return address


def local_url(config: HostSettings, port: int) -> str:
    """The API's URL for a client on this machine: loopback when bound to every address. With TLS it is the
    reachable address, the name the certificate was most likely made for."""
    if config.tls_enabled:
        return f"https://{_url_host(config.HOST_REACHABLE_ADDRESS)}:{port}"
    bind = config.HOST_BIND_IP
    address = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(bind, bind)
    return f"http://{_url_host(address)}:{port}"


def hypercorn_config(config: HostSettings, port: int) -> hypercorn.config.Config:
    hc = hypercorn.config.Config()
    hc.bind = [f"{_url_host(config.HOST_BIND_IP)}:{port}"]
    if config.tls_enabled:
        hc.certfile = config.TLS_CERT_FILE
        hc.keyfile = config.TLS_KEY_FILE
    hc.accesslog = None
    hc.errorlog = logging.getLogger("kohakuriver.host.http")
    # Runners keep one connection each: keep it open across heartbeat intervals instead of reconnecting.
    hc.keep_alive_timeout = float(config.HEARTBEAT_INTERVAL_SECONDS) * 2 + 5
    # Every runner reconnects within one interval after a host restart: do not drop their SYNs.
    hc.backlog = 2048
    hc.graceful_timeout = 3.0
    hc.include_server_header = False
    return hc


def _bound_port(binds: list[str]) -> int:
    # hypercorn reports what it bound, e.g. "http://127.0.0.1:43123"; port 0 was resolved by the kernel.
    return int(binds[0].rsplit(":", 1)[1])


def _write_secret_file(path: pathlib.Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, mode 0600, unless it already holds it."""
    if path.exists() and path.read_text(encoding="utf-8").strip() == text:
        return
    write_file_atomic(path, (text + "\n").encode("utf-8"), parent_mode=0o700)


def tune_gc() -> None:
    """Keep the cyclic GC from stalling the event loop.

    With the default thresholds a busy host (100 heartbeats a second) ran a full collection every few
    seconds, 30-80 ms each with the loop stopped, plus frequent 5-15 ms second-generation ones: that, not
    the request handling, set the API's p99. Everything alive at start-up (modules, the app) lives as long
    as the process, so it is frozen out of the scans; and the young generation is made large enough that
    request garbage dies by reference counting before a collection sees it. A full collection still runs
    every few minutes, so cyclic garbage of a daemon that runs for months is still freed.
    """
    gc.freeze()
    gc.set_threshold(20_000, 20, 50)


async def _cluster_token(store: Store, config: HostSettings) -> str:
    if config.CLUSTER_TOKEN:
        return config.CLUSTER_TOKEN
    token = await auth.ensure_cluster_token(store)
    path = config.cluster_token_file
    try:
        await trio.to_thread.run_sync(_write_secret_file, path, token)
    except OSError as exc:  # the token still works; only the convenience copy is missing
        log.warning("cannot write the cluster token to %s: %s", path, exc)
    return token


async def serve_host(
    config: HostSettings,
    *,
    port: int | None = None,
    overlay_links: OverlayLinks | None = None,
    task_status: trio.TaskStatus[HostHandle] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the host until cancelled. ``port`` overrides ``HOST_PORT`` (0: any free port, for tests and
    benchmarks); the handle's URL carries the port actually bound. ``overlay_links``: where the overlay's
    links live (None: this machine's own network namespace; tests pass one bound to a namespace)."""
    async with open_store(config.db_path) as store:
        cluster_token = await _cluster_token(store, config)
        runners = RunnerClient(cluster_token)
        try:
            loop = SchedulingLoop()
            last_id = await store.read(ReadTx.max_task_id)
            host = HostContext(
                config=config,
                store=store,
                cluster_token=cluster_token,
                runners=runners,
                ids=SnowflakeGenerator(ID_INSTANCE, last_id=last_id),
                wake_scheduler=loop.wake,
            )
            for row in await store.read(ReadTx.list_nodes):
                host.nodes.put(row)
            await requeue_unconfirmed(host)
            overlay = OverlayService(config, store, host.nodes, links=overlay_links, clock=host.now)
            await overlay.start()
            host.overlay = overlay
            quart_app = create_app(host)
            app = HeartbeatFastPath(quart_app, host)
            hc = hypercorn_config(config, config.HOST_PORT if port is None else port)
            async with trio.open_nursery() as nursery:
                # The CLI owns the signals; the server stops when this nursery is cancelled.
                if config.tls_enabled:
                    # TLS: hypercorn alone; forwards take the message relay (api_forward).
                    serve = partial(hypercorn.trio.serve, app, hc, shutdown_trigger=trio.sleep_forever)
                else:
                    # Plain TCP: the front door splices forward sessions and hands the rest to hypercorn.
                    counter = api_forward.session_counter(quart_app)
                    routes = [(FORWARD_LINE, partial(serve_forward, host, counter))]
                    serve = FrontDoor(app, hc, routes).serve
                binds = await nursery.start(serve)
                url = local_url(config, _bound_port(binds))
                await auth.ensure_first_admin(store, config.credentials_file, url)
                batcher = HeartbeatBatcher(host)
                await nursery.start(batcher.run)
                host.heartbeats = batcher
                await nursery.start(partial(loop.run, host))
                await nursery.start(partial(run_liveness, host))
                await nursery.start(overlay.run)
                # The SSH proxy (DESIGN section 5) on HOST_BIND_IP:HOST_SSH_PROXY_PORT. With ``port=0``
                # (tests, benchmarks: several hosts on one machine) it takes a free port too; the handle
                # says which.
                proxy_port = await nursery.start(
                    serve_ssh_proxy, host, 0 if port == 0 else config.HOST_SSH_PROXY_PORT
                )
                host.ssh_proxy_port = proxy_port
                tune_gc()
                log.info("host API listening on %s (local URL %s)", ", ".join(binds), url)
                task_status.started(
                    HostHandle(url, cluster_token, proxy_port, partial(setattr, host, "local_runner"))
                )
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                await runners.aclose()
