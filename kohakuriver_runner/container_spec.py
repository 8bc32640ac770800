"""What a command task's container looks like: ``ExecuteRequest`` + runner settings -> ``ContainerSpec``.

Pure: no Docker, no file system, no clock. Facts about the machine (NUMA layout, GPU count, whether the shared
directory exists) come in as ``NodeFacts`` so that every mapping is testable without a machine that has them.
The executor creates the host directories ``host_directories`` names before it creates the container.

The user's command is an argv (``entrypoint=[]`` + ``cmd=[command, *arguments]``): it is never joined into a
shell string, so nothing a user sends is interpreted by a shell the runner starts.

Port forwarding (``TunnelInjection`` + ``with_tunnel``, also pure, reusable for any container the runner
starts): the tunnel-client binary is bind-mounted read-only and becomes the entrypoint in ``--exec`` mode
(``tunnel-client --exec -- <the original entrypoint + cmd>``): it starts itself in the background and execs
the command, so argv, exit code and signals stay the command's own.

The overlay (``OverlayPlacement``, given while this runner's overlay is up): the container joins
``OVERLAY_NETWORK_NAME`` instead of ``DOCKER_NETWORK_NAME``, with the address the host reserved for it
(``ExecuteRequest.overlay_ip``) when there is one, and its tunnel client reaches the runner at the overlay
gateway. A request with an overlay address while the overlay is down is refused (``SpecError``): the task
was promised that address.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath

import attrs

from kohakuriver_proto.errors import ValidationError
from kohakuriver_proto.lifecycle import TaskType
from kohakuriver_proto.models import ExecuteRequest, parse_mount

from .docker_api import ContainerSpec, Mount
from .runner_settings import RunnerSettings

__all__ = [
    "CONTAINER_PREFIX",
    "LABEL_RUNNER",
    "LABEL_TASK_ID",
    "LABEL_TASK_TYPE",
    "LOCAL_TEMP_TARGET",
    "SHARED_DATA_SUBDIR",
    "SHARED_TARGET",
    "TASK_LOG_DRIVER",
    "TUNNEL_CLIENT_TARGET",
    "TUNNEL_ENV_CONTAINER_ID",
    "TUNNEL_ENV_TOKEN",
    "TUNNEL_ENV_URL",
    "NodeFacts",
    "OverlayPlacement",
    "SpecError",
    "TunnelInjection",
    "build_container_spec",
    "container_name",
    "host_directories",
    "shared_data_dir",
    "task_id_from_labels",
    "task_labels",
    "task_log_options",
    "tunnel_url",
    "with_tunnel",
]

CONTAINER_PREFIX = "kohakuriver-task-"
LABEL_TASK_ID = "kohakuriver.task_id"
LABEL_RUNNER = "kohakuriver.runner"
LABEL_TASK_TYPE = "kohakuriver.task_type"
SHARED_TARGET = "/shared"
LOCAL_TEMP_TARGET = "/local_temp"
SHARED_DATA_SUBDIR = "shared_data"
NANO = 1_000_000_000
TUNNEL_CLIENT_TARGET = "/usr/local/bin/tunnel-client"
TUNNEL_ENV_URL = "KOHAKURIVER_TUNNEL_URL"
TUNNEL_ENV_CONTAINER_ID = "KOHAKURIVER_CONTAINER_ID"
TUNNEL_ENV_TOKEN = "KOHAKURIVER_TUNNEL_TOKEN"


#: Docker's json-file driver (the engine's usual default) stores each line as a JSON string and replaces
#: bytes that are not UTF-8 before anyone can read them; ``local`` keeps the bytes as they were written.
TASK_LOG_DRIVER = "local"


def task_log_options(config: RunnerSettings) -> dict[str, str]:
    """The ``local`` log driver's options for a task container, from TASK_LOG_MAX_SIZE_MB and
    TASK_LOG_MAX_FILES: always explicit, since the driver's own defaults (20 MB x 5 files) would cut a long
    output, and a daemon-wide default set by the machine's admin should not decide what a task keeps.
    Rotated files stay uncompressed: the runner reads the whole output once, at the end, to save it."""
    return {
        "max-size": f"{int(config.TASK_LOG_MAX_SIZE_MB)}m",
        "max-file": str(int(config.TASK_LOG_MAX_FILES)),
        "compress": "false",
    }


class SpecError(ValueError):
    """The request cannot run on this node as asked (a NUMA node or GPU it lacks, clashing mounts)."""


@attrs.frozen(kw_only=True)
class NodeFacts:
    """What the spec needs to know about the machine.

    ``numa_topology``: NUMA node id -> its CPU ids, ``None`` when the machine reports no NUMA layout.
    ``shared_dir_available``: SHARED_DIR exists (it is optional: a node without shared storage still runs
    tasks, just without ``/shared``).
    """

    cpu_count: int
    numa_topology: Mapping[int, Sequence[int]] | None = None
    gpu_count: int = 0
    shared_dir_available: bool = False


@attrs.frozen(kw_only=True)
class TunnelInjection:
    """What a container needs to run the tunnel client: the binary on this machine, the runner's WebSocket
    base URL as seen from the container (``tunnel_url``), and the container's secret (``tunnel_secret``)."""

    client_path: str
    url: str
    secret: str


@attrs.frozen(kw_only=True)
class OverlayPlacement:
    """This runner's overlay network as a container sees it (``overlay_manager`` gives it while the overlay
    is up): the Docker network, the runner's subnet, its gateway, and addresses no container may take."""

    network: str
    subnet: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address
    reserved: frozenset[ipaddress.IPv4Address] = frozenset()
    #: The bridge the Docker network is on (a VM's TAP joins it too).
    bridge: str = ""
    mtu: int = 1450

    def check_address(self, text: str) -> str:
        """``text`` as a container's fixed address here, or ``SpecError`` saying why it cannot be one."""
        try:
            address = ipaddress.IPv4Address(text)
        except ValueError:
            raise SpecError(f"overlay address {text!r} is not an IPv4 address") from None
        if address not in self.subnet:
            raise SpecError(f"overlay address {address} is not in this runner's overlay subnet {self.subnet}")
        taken = {self.subnet.network_address, self.subnet.broadcast_address, self.gateway, *self.reserved}
        if address in taken:
            raise SpecError(f"overlay address {address} is reserved on this runner (gateway or host address)")
        return str(address)


def tunnel_url(config: RunnerSettings, gateway: str | None = None) -> str:
    """``ws(s)://<gateway>:<RUNNER_PORT>``: where a container reaches its runner. ``gateway``: the gateway of
    the network the container is on (the overlay's), else ``DOCKER_NETWORK_GATEWAY``."""
    scheme = "wss" if config.tls_enabled else "ws"
    gateway = gateway or config.DOCKER_NETWORK_GATEWAY
    host = f"[{gateway}]" if ":" in gateway else gateway
    return f"{scheme}://{host}:{config.RUNNER_PORT}"


def with_tunnel(spec: ContainerSpec, tunnel: TunnelInjection) -> ContainerSpec:
    """``spec`` with the tunnel client injected (see the module docstring).

    The three tunnel variables override anything the user put in the environment: a task must not point its
    tunnel client elsewhere or present another container's identity. ``spec.entrypoint`` must be explicit
    (``[]`` or an argv): ``None`` would mean "the image's entrypoint", which the runner cannot prefix.
    """
    if spec.entrypoint is None:
        raise SpecError("the tunnel client needs an explicit entrypoint to prefix")
    for mount in spec.mounts:
        if str(PurePosixPath(mount.target)) == TUNNEL_CLIENT_TARGET:
            raise SpecError(f"a mount targets {TUNNEL_CLIENT_TARGET}, where the tunnel client goes")
    env = dict(spec.env)
    env[TUNNEL_ENV_URL] = tunnel.url
    env[TUNNEL_ENV_CONTAINER_ID] = spec.name
    env[TUNNEL_ENV_TOKEN] = tunnel.secret
    return attrs.evolve(
        spec,
        env=env,
        mounts=(*spec.mounts, Mount(tunnel.client_path, TUNNEL_CLIENT_TARGET, read_only=True)),
        entrypoint=(TUNNEL_CLIENT_TARGET, "--exec", "--", *spec.entrypoint),
    )


def container_name(task_id: int) -> str:
    return f"{CONTAINER_PREFIX}{int(task_id)}"


def task_labels(task_id: int, hostname: str, task_type: TaskType = TaskType.COMMAND) -> dict[str, str]:
    """The labels that let a restarted runner find its own containers (and only its own)."""
    return {
        LABEL_TASK_ID: str(int(task_id)),
        LABEL_RUNNER: hostname,
        LABEL_TASK_TYPE: TaskType(task_type).value,
    }


def task_id_from_labels(labels: Mapping[str, str]) -> int | None:
    """The task id a container was labelled with, ``None`` when the label is missing or malformed."""
    text = labels.get(LABEL_TASK_ID, "")
    if not (text.isascii() and text.isdigit()) or len(text) > 19:
        return None
    return int(text)


def shared_data_dir(config: RunnerSettings) -> str:
    return os.path.join(config.SHARED_DIR, SHARED_DATA_SUBDIR)


def host_directories(config: RunnerSettings, facts: NodeFacts) -> list[str]:
    """Host directories that must exist before the container is created (bind sources are not created
    by the Mounts API: a missing one fails the create)."""
    dirs = [config.LOCAL_TEMP_DIR]
    if facts.shared_dir_available:
        dirs.append(shared_data_dir(config))
    return dirs


def _cpu_limits(request: ExecuteRequest, facts: NodeFacts) -> dict[str, object]:
    """cpuset (the task's NUMA node) and/or a CFS quota of ``required_cores``.

    The scheduler counts a NUMA-bound task against that NUMA node's cores without picking individual cores,
    so the container may use any core of the node (cpuset) but only ``required_cores`` worth of CPU time
    (quota); memory comes from that node too (cpuset_mems). 0 cores means no CPU limit.
    """
    limits: dict[str, object] = {}
    usable = max(1, facts.cpu_count)
    if request.numa_node is not None and facts.numa_topology is not None:
        cores = facts.numa_topology.get(request.numa_node)
        if not cores:
            known = ", ".join(str(n) for n in sorted(facts.numa_topology)) or "none"
            raise SpecError(f"NUMA node {request.numa_node} does not exist on this runner (nodes: {known})")
        limits["cpuset_cpus"] = sorted(cores)
        limits["cpuset_mems"] = str(request.numa_node)
        usable = len(cores)
    if request.required_cores > 0:
        # The engine refuses a quota above the CPUs it can see; more cores than exist means "all of them".
        limits["nano_cpus"] = min(request.required_cores, usable) * NANO
    return limits


def _gpu_ids(request: ExecuteRequest, facts: NodeFacts) -> list[str]:
    if not request.gpu_ids:
        return []
    if facts.gpu_count == 0:
        raise SpecError(f"the task asks for GPUs {request.gpu_ids} but this runner has no GPUs")
    missing = [g for g in request.gpu_ids if g >= facts.gpu_count]
    if missing:
        raise SpecError(f"GPUs {missing} do not exist on this runner (it has {facts.gpu_count})")
    return [str(g) for g in request.gpu_ids]


def _mounts(request: ExecuteRequest, config: RunnerSettings, facts: NodeFacts) -> list[Mount]:
    mounts: list[Mount] = []
    if facts.shared_dir_available:
        mounts.append(Mount(shared_data_dir(config), SHARED_TARGET))
    mounts.append(Mount(config.LOCAL_TEMP_DIR, LOCAL_TEMP_TARGET))
    extra = [(f"ADDITIONAL_MOUNTS[{i}]", m) for i, m in enumerate(config.ADDITIONAL_MOUNTS)]
    extra += [(f"additional_mounts[{i}]", m) for i, m in enumerate(request.additional_mounts)]
    for field, text in extra:
        try:
            parsed = parse_mount(text, field)
        except ValidationError as exc:
            raise SpecError(str(exc)) from None
        mounts.append(Mount(parsed.source, parsed.target, parsed.read_only))
    # Docker refuses two mounts on one target with a terse "Duplicate mount point"; name the culprits.
    seen: dict[str, str] = {}
    for mount in mounts:
        target = str(PurePosixPath(mount.target))
        if target in seen:
            raise SpecError(f"two mounts target {target}: {seen[target]} and {mount.source}")
        seen[target] = mount.source
    return mounts


def build_container_spec(
    request: ExecuteRequest,
    config: RunnerSettings,
    facts: NodeFacts,
    image: str,
    tunnel: TunnelInjection | None = None,
    overlay: OverlayPlacement | None = None,
) -> ContainerSpec:
    """The container for ``request`` on this runner (``config`` is a ``RunnerConfig``), with the tunnel
    client when ``tunnel`` is given, on the overlay network when ``overlay`` is given (its tunnel URL must
    then name the overlay gateway: ``TunnelServer.injection(name, gateway)``).

    Raises ``SpecError`` when the request cannot be honoured here.
    """
    network, address = config.DOCKER_NETWORK_NAME, None
    if overlay is not None:
        network = overlay.network
        if request.overlay_ip:
            address = overlay.check_address(request.overlay_ip)
    elif request.overlay_ip:
        raise SpecError(
            f"the task was given overlay address {request.overlay_ip}, but the overlay network is not up on "
            "this runner"
        )
    env = dict(request.env_vars)
    env["KOHAKURIVER_TASK_ID"] = str(request.task_id)
    env["KOHAKURIVER_SHARED_DIR"] = SHARED_TARGET
    env["KOHAKURIVER_LOCAL_TEMP_DIR"] = LOCAL_TEMP_TARGET
    if request.numa_node is not None:
        env["KOHAKURIVER_TARGET_NUMA_NODE"] = str(request.numa_node)
    privileged = bool(config.TASKS_PRIVILEGED or request.privileged)
    spec = ContainerSpec(
        name=container_name(request.task_id),
        image=image,
        # An empty entrypoint: the image's own entrypoint (often a shell wrapper) must not reinterpret argv.
        entrypoint=[],
        cmd=[request.command, *request.arguments],
        env=env,
        labels=task_labels(request.task_id, config.hostname, request.task_type),
        working_dir=request.working_dir or config.DEFAULT_WORKING_DIR,
        user=config.RUNNER_USER or None,
        mounts=_mounts(request, config, facts),
        memory_bytes=request.required_memory_bytes,
        gpu_ids=_gpu_ids(request, facts),
        privileged=privileged,
        # Without privileges a task may still renice/pin its own threads (numactl, OpenMP affinity).
        cap_add=() if privileged else ("SYS_NICE",),
        network=network,
        ipv4_address=address,
        init=True,
        log_driver=TASK_LOG_DRIVER,
        log_options=task_log_options(config),
        **_cpu_limits(request, facts),
    )
    return spec if tunnel is None else with_tunnel(spec, tunnel)
