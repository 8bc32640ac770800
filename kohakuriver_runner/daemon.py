"""The runner daemon: ``serve_runner(config)`` runs until cancelled.

One nursery holds everything the runner does: the executors (``TaskManager.serve``), the Docker watch, the
resource sampler, the tunnel keepalive (``TunnelServer.run``), the heartbeat/registration/report loops and
hypercorn serving the API (its WebSocket handlers drive the container tunnels). Cancelling it
(SIGTERM via ``kr runner``, or a test) stops them all in order and leaves the task containers running: the
next start re-adopts them. No thread or process outlives it (the only threads are ``trio.to_thread`` calls
it awaits, and the log-file writer, stopped on the way out).

Start-up order, and why:
1. the state store is read (what the previous run held);
2. Docker is checked once: a runner that cannot reach it says so in its log at once, keeps running and keeps
   retrying; if it answers, the bridge network is ensured and the previous run's containers are adopted
   *before* the API accepts new tasks, so a repeated dispatch cannot race an adoption;
3. the API listens (readiness: ``task_status.started(RunnerHandle)``);
4. registration with the host is retried in the background (a host that is down never blocks start-up).
   With ``OVERLAY_ENABLED`` its answer sets up the overlay (``overlay_manager``): links, then the Docker
   network (again whenever Docker comes back); new containers join it once both are up. With the overlay
   off, an earlier start's overlay is removed once Docker answers (when no container uses it).
"""

from __future__ import annotations

import importlib.metadata
import logging
import logging.handlers
import os
import queue
from typing import Any

import attrs
import httpx
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from kohakuriver_net import ws_speedups
from kohakuriver_net.front_door import FrontDoor

from . import tunnel_door
from .app import create_app
from .docker_api import DockerClient, DockerError
from .executor import DockerStatus, TaskManager
from .exit_events import ExitEvents
from .host_client import HostClient, Reporter, make_http_client
from .images import ImageResolver
from .monitor import NodeMonitor
from .overlay_manager import OverlayManager
from .reconcile import reconcile
from .runner_settings import RunnerSettings
from .state import StateStore, move_legacy_state
from .tunnel_secret import load_or_create_key
from .tunnel_server import TunnelServer

__all__ = ["RunnerHandle", "Runtime", "serve_runner"]

log = logging.getLogger("kohakuriver.runner")

#: How often a reachable engine is pinged, and the bounds of retrying an unreachable one.
DOCKER_CHECK_INTERVAL = 5.0
DOCKER_RETRY_MIN = 1.0
DOCKER_RETRY_MAX = 10.0
NETWORK_LABELS = {"kohakuriver.network": "tasks"}
#: Largest WebSocket message accepted: tunnel frames are up to the 64 KiB the clients read at a time, but a
#: peer may send up to 1 MiB of payload + the 8-byte header in one message; leave room above that.
WS_MAX_MESSAGE = 16 * 1024 * 1024


@attrs.frozen
class RunnerHandle:
    """What ``serve_runner`` hands to ``task_status.started``.

    ``url`` is the URL registered with the host; ``bind_url`` is where the API actually listens.
    """

    url: str
    hostname: str
    bind_url: str = ""
    #: The forward route for a host in this same process (``kr up``: ``tunnel_door.in_process_forward``).
    forward: Any = None


@attrs.define(eq=False)
class Runtime:
    """Everything the API handlers need, in one place."""

    config: RunnerSettings
    hostname: str
    url: str
    version: str
    docker: DockerClient
    store: StateStore
    monitor: NodeMonitor
    manager: TaskManager
    reporter: Reporter
    docker_status: DockerStatus
    tunnels: TunnelServer
    vms: Any = None  # vm_manager.VmManager where VMs are possible
    overlay: OverlayManager | None = None
    host: HostClient | None = None
    http: httpx.AsyncClient | None = None

    def vm_terminal_target(self, task_id: int) -> Any:
        """How a terminal reaches into the VM of ``task_id`` (``vm_ssh.VmSshTarget``), None if not a VM."""
        return None if self.vms is None else self.vms.ssh_target(task_id)


def _version() -> str:
    try:
        return importlib.metadata.version("kohakuriver")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


async def _check_docker(rt: Runtime) -> None:
    """Ping the engine; on (re)gaining it, ensure the network and adopt containers; update the status."""
    status = rt.docker_status
    reason = await rt.docker.unavailable_reason()
    if reason is None:
        config = rt.config
        try:
            # Idempotent and shared: two runners on one engine use the same bridge.
            await rt.docker.ensure_network(
                config.DOCKER_NETWORK_NAME,
                config.DOCKER_NETWORK_SUBNET,
                config.DOCKER_NETWORK_GATEWAY,
                labels=NETWORK_LABELS,
            )
        except DockerError as exc:
            reason = f"cannot set up the Docker network {config.DOCKER_NETWORK_NAME}: {exc}"
    if reason is None and rt.overlay is not None and config.OVERLAY_ENABLED:
        # Not a reason to refuse tasks: without it they run on the task network (the manager logs why).
        await rt.overlay.ensure_docker_network()
    elif reason is not None and rt.overlay is not None:
        rt.overlay.docker_lost()
    if reason is None and not status.available:
        try:
            await reconcile(rt.docker, rt.store, rt.manager, rt.hostname)
        except DockerError as exc:
            reason = f"cannot list this runner's containers: {exc}"
    if reason is None:
        if not status.available:
            log.info("Docker is available (%s)", rt.config.DOCKER_SOCKET)
        status.available, status.error = True, None
    else:
        if status.available or status.error != reason:
            log.error("Docker is not usable: %s; tasks are refused until it is (retrying)", reason)
        status.available, status.error = False, reason


async def _check_docker_safely(rt: Runtime) -> None:
    try:
        await _check_docker(rt)
    except Exception as exc:  # never let a surprise end the watch (or the start-up): retry instead
        log.exception("checking Docker failed")
        rt.docker_status.available, rt.docker_status.error = False, f"checking Docker failed: {exc}"


async def _watch_docker(rt: Runtime) -> None:
    delay = DOCKER_RETRY_MIN
    while True:
        if rt.docker_status.available:
            delay = DOCKER_RETRY_MIN
            await trio.sleep(min(DOCKER_CHECK_INTERVAL, rt.config.heartbeat_interval))
        else:
            await trio.sleep(delay)
            delay = min(delay * 2, DOCKER_RETRY_MAX)
        await _check_docker_safely(rt)


async def _vm_manager(
    config: RunnerSettings,
    store: StateStore,
    reporter: Reporter,
    manager: TaskManager,
    tunnels: TunnelServer,
    tunnel_key: bytes | None,
) -> Any:
    """The VM manager, with this node's VM capability found once (QEMU, KVM or TCG, OVMF, GPUs).

    Always made, capable or not: the heartbeats say why a node cannot run VMs, and a runner whose QEMU
    went away still re-adopts or reports the VMs its records name."""
    from . import vm_capability
    from .vm_manager import VmManager

    capability = await trio.to_thread.run_sync(vm_capability.detect, config.VM_ACCEL)
    log.info(
        "VMs: %s (%s)",
        f"capable, {capability.accel.value}" if capability.capable else "not capable",
        capability.reason,
    )
    return VmManager(
        config=config,
        store=store,
        reporter=reporter,
        capability=capability,
        ssh_ports=manager.ssh_ports,
        host_keys=manager.host_keys,
        tunnels=tunnels,
        tunnel_key=tunnel_key,
    )


def _hypercorn_config(config: RunnerSettings) -> HypercornConfig:
    cfg = HypercornConfig()
    host = config.RUNNER_BIND_IP
    cfg.bind = [f"[{host}]:{config.RUNNER_PORT}" if ":" in host else f"{host}:{config.RUNNER_PORT}"]
    if config.tls_enabled:
        cfg.certfile = config.TLS_CERT_FILE
        cfg.keyfile = config.TLS_KEY_FILE
    cfg.accesslog = None
    cfg.errorlog = logging.getLogger("kohakuriver.runner.http")
    cfg.include_server_header = False
    cfg.graceful_timeout = 2.0
    cfg.websocket_max_message_size = WS_MAX_MESSAGE
    # Keepalive on tunnels is the protocol's own PING/PONG (ContainerTunnel.tick), not WebSocket pings.
    cfg.websocket_ping_interval = None
    return cfg


async def _serve_api(
    app: Any, config: RunnerSettings, tunnels: TunnelServer, *, task_status: trio.TaskStatus[list[str]]
) -> None:
    cfg = _hypercorn_config(config)
    try:
        if config.tls_enabled:  # hypercorn alone; the tunnel routes take Quart's WebSocket (api_ws)
            await hypercorn_serve(app, cfg, task_status=task_status)
        else:  # the tunnel routes on the lean WebSocket (tunnel_door), the rest through hypercorn
            door = FrontDoor(app, cfg, tunnel_door.routes(tunnels, config, WS_MAX_MESSAGE))
            await door.serve(task_status=task_status)
    except OSError as exc:
        log.error("cannot serve the runner API on %s: %s", cfg.bind[0], exc)
        raise


class _LogFile:
    """RUNNER_LOG_FILE: records go through a queue to a writer thread, so logging never blocks the loop."""

    def __init__(self, path: os.PathLike[str] | str) -> None:
        self.handler = logging.FileHandler(path, encoding="utf-8", delay=True)
        self.handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
        )
        self.queue: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        self.queue_handler = logging.handlers.QueueHandler(self.queue)
        self.listener = logging.handlers.QueueListener(self.queue, self.handler, respect_handler_level=True)

    def __enter__(self) -> _LogFile:
        self.listener.start()
        logging.getLogger().addHandler(self.queue_handler)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger().removeHandler(self.queue_handler)
        self.listener.stop()
        self.handler.close()


async def serve_runner(
    config: RunnerSettings, *, task_status: trio.TaskStatus[RunnerHandle] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run the runner daemon until cancelled; ``task_status.started(RunnerHandle)`` once the API listens."""
    log_file = config.log_file
    if log_file is not None:
        await trio.to_thread.run_sync(lambda: log_file.parent.mkdir(parents=True, exist_ok=True))
        with _LogFile(log_file):
            await _serve(config, task_status)
    else:
        await _serve(config, task_status)


async def _serve(config: RunnerSettings, task_status: trio.TaskStatus[RunnerHandle]) -> None:
    hostname = config.hostname
    if not config.RUNNER_STATE_DIR:
        await trio.to_thread.run_sync(move_legacy_state, config.legacy_state_dir, config.state_dir)
    store = StateStore(config.state_dir)
    await store.open()
    await trio.to_thread.run_sync(lambda: os.makedirs(config.LOCAL_TEMP_DIR, exist_ok=True))
    version = await trio.to_thread.run_sync(_version)
    monitor = NodeMonitor(config)
    await monitor.start()
    # The URL may come from resolving HOST_ADDRESS (the route towards the host): a blocking lookup.
    url = await trio.to_thread.run_sync(config.runner_url)

    # Every tunnel byte the runner receives is masked by its sender: unmask in C, not in pure Python.
    ws_speedups.install()
    # The per-container tunnel secrets' key: the same across restarts, so adopted containers keep theirs.
    tunnel_key = (
        await trio.to_thread.run_sync(load_or_create_key, config.state_dir) if config.TUNNEL_ENABLED else None
    )

    docker = DockerClient(config.DOCKER_SOCKET)
    http = await make_http_client(config)
    try:
        overlay = OverlayManager(config, docker, hostname=hostname)
        await overlay.resolve_underlay(url)
        docker_status = DockerStatus()
        reporter = Reporter()
        tunnels = TunnelServer(config, docker, tunnel_key)
        exits = ExitEvents(docker, hostname)
        manager = TaskManager(
            config=config,
            docker=docker,
            store=store,
            images=ImageResolver(docker, config, store.images_dir),
            reporter=reporter,
            docker_status=docker_status,
            node_facts=monitor.node_facts,
            tunnels=tunnels,
            exits=exits,
        )
        tunnels.directories.append(manager.find_container)
        vms = await _vm_manager(config, store, reporter, manager, tunnels, tunnel_key)
        if vms is not None:
            manager.vms = vms
            vms.container_gpus = manager.held_gpus
            tunnels.directories.append(vms.find_vm)
        reporter.on_final_delivered = manager.final_delivered
        if config.OVERLAY_ENABLED:
            manager.overlay = overlay
            if vms is not None:  # VMs join the overlay too while it is up
                vms.overlay_placement = overlay.placement
        rt = Runtime(
            config=config,
            hostname=hostname,
            url=url,
            version=version,
            docker=docker,
            store=store,
            monitor=monitor,
            manager=manager,
            reporter=reporter,
            docker_status=docker_status,
            tunnels=tunnels,
            vms=vms,
            overlay=overlay,
            http=http,
        )
        rt.host = HostClient(
            config=config,
            http=http,
            hostname=hostname,
            runner_url=url,
            version=version,
            monitor=monitor,
            manager=manager,
            reporter=reporter,
            docker_status=docker_status,
            overlay=overlay,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(manager.serve)
            if vms is not None:  # VMs do not need Docker: adopted before the API listens
                await nursery.start(vms.serve)
            # Before any task starts: the event stream lets a command's exit be reported without waiting
            # for the engine's cleanup (a lost or late stream only costs that head start).
            await nursery.start(exits.run)
            await _check_docker_safely(rt)
            if not config.OVERLAY_ENABLED and docker_status.available:
                nursery.start_soon(overlay.disable)
            nursery.start_soon(_watch_docker, rt)
            nursery.start_soon(monitor.run)
            await nursery.start(tunnels.run)
            binds = await nursery.start(_serve_api, create_app(rt), config, tunnels)
            log.info("runner %s serving on %s (registers as %s)", hostname, ", ".join(binds), url)
            nursery.start_soon(rt.host.run)
            task_status.started(
                RunnerHandle(
                    url=url,
                    hostname=hostname,
                    bind_url=binds[0] if binds else "",
                    forward=tunnel_door.in_process_forward(tunnels, WS_MAX_MESSAGE),
                )
            )
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await http.aclose()
            await docker.aclose()
