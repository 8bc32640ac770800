"""The runner's settings (``~/.kohakuriver/runner_config.py``) and the ``RunnerConfig`` object.

Every setting of the runner-configuration seed exists with its name, type and default; the additions this
design needs are HOST_USE_TLS, HOST_TLS_CA_FILE, RUNNER_HOSTNAME, RUNNER_URL, VPS_SSH_PORT_START,
CLUSTER_TOKEN, TLS_CERT_FILE, TLS_KEY_FILE, RUNNER_STATE_DIR, DOCKER_SOCKET, DEFAULT_IMAGE,
TASK_LOG_MAX_SIZE_MB, TASK_LOG_MAX_FILES, VM_ACCEL and the overlay's OVERLAY_BRIDGE_NAME,
OVERLAY_VXLAN_NAME, OVERLAY_UNDERLAY_ADDRESS and OVERLAY_UNDERLAY_NETNS.
``load_runner_config(path)`` reads the file; the pure work (execute, validate, collect every problem) is
``kohakuriver_proto.settings``.

Derived values are lower-case attributes of ``RunnerConfig`` (``config.container_tar_dir``,
``config.host_url``, ...) so an empty "derive it" setting is resolved in one place.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import urllib.parse
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from kohakuriver_net import paths
from kohakuriver_proto import settings as s
from kohakuriver_proto import shared_settings as ss
from kohakuriver_proto.settings import Section, Setting

_NETWORK = Section(
    "Network",
    [
        Setting(
            "RUNNER_BIND_IP",
            str,
            "0.0.0.0",
            "IP address the runner API binds to (0.0.0.0 = all interfaces).",
            s.ip_address,
        ),
        Setting(
            "RUNNER_PORT", int, 8001, "Runner API port (the host and tunnel clients connect here).", s.port
        ),
        Setting(
            "HOST_ADDRESS",
            str,
            "127.0.0.1",
            "Host server address: how this runner reaches the host (a name or an IP address).",
            s.reachable_address,
        ),
        Setting("HOST_PORT", int, 8000, "Host server port.", s.port),
        Setting(
            "HOST_USE_TLS",
            bool,
            False,
            "Talk to the host over https/wss instead of http/ws (the host must have a certificate).",
        ),
        Setting(
            "HOST_TLS_CA_FILE",
            str,
            "",
            "CA bundle that signed the host's certificate, for a self-signed cluster CA "
            '("" = the system trust store). Only used with HOST_USE_TLS.',
        ),
        Setting(
            "RUNNER_HOSTNAME",
            str,
            "",
            'Node name this runner registers as ("" = the system host name). Give two runners on one '
            "machine different names (and different RUNNER_PORTs).",
            s.optional(s.node_name),
        ),
        Setting(
            "RUNNER_URL",
            str,
            "",
            'URL the host uses to reach this runner, e.g. "http://10.0.0.5:8001" ("" = derived: '
            "RUNNER_BIND_IP if it is a specific address, otherwise the local address of the route towards "
            "the host, with RUNNER_PORT).",
            s.optional(s.http_url),
        ),
        Setting(
            "VPS_SSH_PORT_START",
            int,
            2222,
            "First port for VPS SSH; ports are allocated sequentially per node, skipping ports in use.",
            s.port,
        ),
    ],
)

_SECURITY = Section(
    "Security",
    [
        Setting(
            "CLUSTER_TOKEN",
            str,
            "",
            "Secret this runner joins the cluster with; it must equal the host's cluster token (the host "
            'generates one on first start and stores it next to its database). "" = not set: the runner '
            "cannot join until it is given one.",
            s.optional(s.token),
            secret=True,
        ),
        *ss.tls_settings("runner API"),
    ],
)

_PATHS = Section(
    "Paths",
    [
        Setting(
            "SHARED_DIR",
            str,
            "/mnt/cluster-share",
            "Shared storage path (must match the host). Required for tarball-based container environments; "
            "not needed if you only use registry or local images.",
            s.absolute_path,
        ),
        Setting(
            "LOCAL_TEMP_DIR",
            str,
            "/tmp/kohakuriver",
            "Local fast temporary storage.",
            s.absolute_path,
        ),
        Setting(
            "CONTAINER_TAR_DIR",
            str,
            "",
            'Environment tarball directory ("" = SHARED_DIR/kohakuriver-containers). Only used for '
            "tarball-based environments.",
            s.optional(s.absolute_path),
        ),
        Setting(
            "NUMACTL_PATH",
            str,
            "",
            'Path to numactl ("" = look it up on PATH). Only used to read the NUMA layout (numactl '
            "--hardware) when sysfs shows none: a task bound to a NUMA node gets that node's CPUs and memory "
            "through its container's cpuset, so images never need numactl.",
        ),
        Setting("RUNNER_LOG_FILE", str, "", 'Log file path ("" = console only).'),
        Setting(
            "RUNNER_STATE_DIR",
            str,
            "",
            "Where the runner keeps its state (tasks it runs, allocated ports, its keys) across restarts "
            '("" = KOHAKURIVER_HOME/runner/<hostname>, by default ~/.kohakuriver/runner/<hostname>). Never '
            "inside LOCAL_TEMP_DIR or SHARED_DIR: tasks see those directories.",
            s.optional(s.absolute_path),
        ),
    ],
)

_TIMING = Section(
    "Timing",
    [
        Setting(
            "HEARTBEAT_INTERVAL_SECONDS", int, 5, "Heartbeat frequency to the host, in seconds.", s.positive
        ),
        Setting(
            "RESOURCE_CHECK_INTERVAL_SECONDS",
            int,
            1,
            "Resource monitoring frequency, in seconds.",
            s.positive,
        ),
    ],
)

_EXECUTION = Section(
    "Execution",
    [
        Setting(
            "RUNNER_USER", str, "", 'User to run tasks as inside containers ("" = the image\'s default user).'
        ),
        ss.DEFAULT_WORKING_DIR,
    ],
)

_DOCKER = Section(
    "Docker",
    [
        ss.TASKS_PRIVILEGED,
        ss.ADDITIONAL_MOUNTS,
        Setting(
            "DOCKER_IMAGE_SYNC_TIMEOUT",
            int,
            600,
            "Timeout for loading or pulling an image, in seconds (10 minutes).",
            s.positive,
        ),
        Setting(
            "DOCKER_SOCKET",
            str,
            "/var/run/docker.sock",
            "Unix socket of the Docker Engine API.",
            s.absolute_path,
        ),
        Setting(
            "DEFAULT_IMAGE",
            str,
            "kohakuriver/kohakuriver-base:base",
            "Image used when a task names neither an environment nor an image (the image of the host's "
            "default environment).",
            s.non_empty,
        ),
        Setting(
            "TASK_LOG_MAX_SIZE_MB",
            int,
            100,
            "Task containers keep their stdout and stderr with Docker's 'local' log driver (bytes as the "
            "task wrote them): one log file holds this many MB (both streams together) before Docker starts "
            "the next one.",
            s.positive,
        ),
        Setting(
            "TASK_LOG_MAX_FILES",
            int,
            10,
            "Log files Docker keeps per task container: at most TASK_LOG_MAX_SIZE_MB x TASK_LOG_MAX_FILES "
            "of output (1000 MB by default). Beyond that the oldest file is dropped: the saved output and "
            "`kr task logs` lose the beginning; a follower that keeps up still receives every byte.",
            s.positive,
        ),
    ],
)

_DOCKER_NETWORK = Section(
    "Docker network",
    [
        Setting(
            "DOCKER_NETWORK_NAME",
            str,
            "kohakuriver-net",
            "Docker bridge network for containers.",
            s.docker_name,
        ),
        Setting("DOCKER_NETWORK_SUBNET", str, "172.30.0.0/16", "Subnet of the bridge network.", s.ip_network),
        Setting(
            "DOCKER_NETWORK_GATEWAY",
            str,
            "172.30.0.1",
            "Gateway IP of the bridge network (tunnel clients reach the runner here); inside the subnet.",
            s.ip_address,
        ),
    ],
)

_TUNNEL = Section(
    "Tunnel",
    [
        Setting("TUNNEL_ENABLED", bool, True, "Start the tunnel client in containers (port forwarding)."),
        Setting(
            "TUNNEL_CLIENT_PATH",
            str,
            "",
            'Path to the tunnel-client binary ("" = search ~/.kohakuriver/tunnel-client, '
            "/usr/local/bin/tunnel-client, /usr/bin/tunnel-client, SHARED_DIR/bin/tunnel-client and the "
            "project's tunnel-client-rs build).",
        ),
    ],
)

_SNAPSHOT = Section(
    "Snapshot",
    [
        Setting("AUTO_SNAPSHOT_ON_STOP", bool, True, "Snapshot a Docker VPS when it is stopped."),
        Setting(
            "MAX_SNAPSHOTS_PER_VPS",
            int,
            3,
            "Snapshots kept per VPS, oldest pruned first (0 = unlimited).",
            s.non_negative,
        ),
        Setting(
            "AUTO_RESTORE_ON_CREATE", bool, True, "Restore from the latest snapshot when a VPS is re-created."
        ),
    ],
)


def _vm_accel(value: str) -> None:
    # The values live here, not in vm_capability, so reading the settings never imports the VM code.
    if value not in ("auto", "kvm", "tcg"):
        raise ValueError(f"must be 'auto', 'kvm' or 'tcg', got {value!r}")


_VM = Section(
    "VM (QEMU/KVM)",
    [
        Setting(
            "VM_IMAGES_DIR",
            str,
            "/var/lib/kohakuriver/vm-images",
            "Base VM image directory (<name>.qcow2).",
            s.absolute_path,
        ),
        Setting(
            "VM_INSTANCES_DIR",
            str,
            "/var/lib/kohakuriver/vm-instances",
            "VM instance storage.",
            s.absolute_path,
        ),
        Setting("VM_DEFAULT_MEMORY_MB", int, 4096, "Default VM memory in MB (4 GB).", s.positive),
        Setting(
            "VM_DEFAULT_DISK_SIZE",
            str,
            "500G",
            "Default virtual disk size (thin-provisioned).",
            s.disk_size,
        ),
        Setting(
            "VM_ACS_OVERRIDE",
            bool,
            True,
            "Disable ACS on PCI bridges at start-up (lets GPUs behind one bridge go to different VMs).",
        ),
        Setting(
            "VM_ACCEL",
            str,
            "auto",
            'Accelerator VMs run with: "auto" = KVM only where the kvm_intel or kvm_amd module is loaded and '
            "/dev/kvm opens read-write, TCG (QEMU's software translator, much slower) otherwise; a /dev/kvm "
            'from kvm_pvm does not count, stock guests hang under it. "kvm" = KVM or no VMs at all (the '
            'runner reports why it is not VM-capable, it never falls back to TCG); "tcg" = always TCG.',
            _vm_accel,
        ),
        Setting("VM_BOOT_TIMEOUT_SECONDS", int, 600, "VM boot timeout, in seconds.", s.positive),
        Setting(
            "VM_SSH_READY_TIMEOUT_SECONDS", int, 600, "VM SSH readiness timeout, in seconds.", s.positive
        ),
        Setting(
            "VM_HEARTBEAT_TIMEOUT_SECONDS", int, 120, "VM agent heartbeat timeout, in seconds.", s.positive
        ),
        Setting(
            "VM_BRIDGE_NAME",
            str,
            "kohaku-br0",
            "NAT bridge for VMs when the overlay is off.",
            s.interface_name,
        ),
        Setting("VM_BRIDGE_SUBNET", str, "10.200.0.0/24", "Subnet of the VM NAT bridge.", s.ip_network),
        Setting(
            "VM_BRIDGE_GATEWAY",
            str,
            "10.200.0.1",
            "Gateway of the VM NAT bridge; inside the subnet.",
            s.ip_address,
        ),
    ],
)


def _netns_name(value: str) -> None:
    # A name under /run/netns (what `ip netns add NAME` makes): one path component.
    if not value or len(value) > 255 or value in (".", "..") or "/" in value or "\0" in value:
        raise ValueError(
            f"must be the name of a network namespace (as `ip netns list` shows it), got {value!r}"
        )


def _ipv4_address(value: str) -> None:
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        raise ValueError(f"must be an IPv4 address, got {value!r}") from None


_OVERLAY = ss.overlay_section(
    after_subnet=(
        Setting(
            "OVERLAY_NETWORK_NAME",
            str,
            "kohakuriver-overlay",
            "Docker network for the overlay: tasks and Docker VPS join it instead of DOCKER_NETWORK_NAME "
            "while the overlay is up. The runner creates it on OVERLAY_BRIDGE_NAME with its subnet.",
            s.docker_name,
        ),
        Setting(
            "OVERLAY_BRIDGE_NAME",
            str,
            "kohaku-overlay",
            "Linux bridge of the overlay on this machine (the Docker network's bridge; holds the runner's "
            "overlay gateway). Two runners on one machine need different names.",
            s.interface_name,
        ),
        Setting(
            "OVERLAY_VXLAN_NAME",
            str,
            "vxlan0",
            "VXLAN link of the overlay toward the host (a port of OVERLAY_BRIDGE_NAME). Two runners on one "
            "machine need different names.",
            s.interface_name,
        ),
        Setting(
            "OVERLAY_UNDERLAY_ADDRESS",
            str,
            "",
            "This runner's VXLAN endpoint: the IPv4 address the host and, in mesh mode, the other runners "
            'send overlay traffic to ("" = the host part of the runner URL, RUNNER_URL or derived, resolved '
            "if it is a name).",
            s.optional(_ipv4_address),
        ),
        Setting(
            "OVERLAY_UNDERLAY_NETNS",
            str,
            "",
            'Network namespace that holds OVERLAY_UNDERLAY_ADDRESS ("" = the runner\'s own). The VXLAN '
            "link is created there and moved into the runner's namespace, keeping its UDP socket where the "
            "address is. For several runners on one machine, each with its own underlay address (tests).",
            s.optional(_netns_name),
        ),
    )
)

_LOGGING = ss.LOGGING_SECTION


_CROSS_CHECKS = [
    s.gateway_in_subnet("DOCKER_NETWORK_SUBNET", "DOCKER_NETWORK_GATEWAY"),
    s.gateway_in_subnet("VM_BRIDGE_SUBNET", "VM_BRIDGE_GATEWAY"),
    s.networks_disjoint("DOCKER_NETWORK_SUBNET", "VM_BRIDGE_SUBNET"),
    s.networks_disjoint("OVERLAY_SUBNET", "DOCKER_NETWORK_SUBNET", when="OVERLAY_ENABLED"),
    s.networks_disjoint("OVERLAY_SUBNET", "VM_BRIDGE_SUBNET", when="OVERLAY_ENABLED"),
    # The same check as for ports: three links of this machine, so three names.
    s.distinct_ports("OVERLAY_BRIDGE_NAME", "OVERLAY_VXLAN_NAME", "VM_BRIDGE_NAME"),
    s.tls_pair("TLS_CERT_FILE", "TLS_KEY_FILE"),
    s.vxlan_ids_fit("OVERLAY_VXLAN_ID", "OVERLAY_SUBNET"),
]

CONTAINERS_SUBDIR = "kohakuriver-containers"


def _url_host(address: str) -> str:
    """``address`` as it goes into a URL (IPv6 literals in brackets)."""
    try:
        if ipaddress.ip_address(address).version == 6:
            return f"[{address}]"
    except ValueError:
        pass
    return address


class RunnerConfigBase(s.ConfigBase):
    """Derived values of the runner configuration (the settings themselves are the UPPER_CASE attributes)."""

    __slots__ = ()

    @property
    def hostname(self) -> str:
        """The node name: RUNNER_HOSTNAME, or the system host name."""
        return self.RUNNER_HOSTNAME or socket.gethostname()

    @property
    def container_tar_dir(self) -> Path:
        return Path(self.CONTAINER_TAR_DIR or os.path.join(self.SHARED_DIR, CONTAINERS_SUBDIR))

    @property
    def state_dir(self) -> Path:
        """RUNNER_STATE_DIR, else ``KOHAKURIVER_HOME/runner/<hostname>``: never under LOCAL_TEMP_DIR, which
        every task and VM mounts (the state holds the tunnel key, the VPS host keys and the VM management
        key)."""
        if self.RUNNER_STATE_DIR:
            return Path(self.RUNNER_STATE_DIR)
        return paths.kohakuriver_home() / "runner" / self.hostname

    @property
    def legacy_state_dir(self) -> Path:
        """Where earlier versions kept the state by default (moved out at start: ``state.move_legacy``)."""
        return Path(self.LOCAL_TEMP_DIR) / ".kohakuriver"

    @property
    def tls_enabled(self) -> bool:
        """Whether the runner serves https/wss."""
        return bool(self.TLS_CERT_FILE)

    @property
    def host_url(self) -> str:
        """Base URL of the host API, e.g. ``http://127.0.0.1:8000`` (no trailing slash)."""
        scheme = "https" if self.HOST_USE_TLS else "http"
        return f"{scheme}://{_url_host(self.HOST_ADDRESS)}:{self.HOST_PORT}"

    @property
    def heartbeat_interval(self) -> float:
        return float(self.HEARTBEAT_INTERVAL_SECONDS)

    @property
    def log_file(self) -> Path | None:
        return Path(self.RUNNER_LOG_FILE).expanduser() if self.RUNNER_LOG_FILE else None

    @property
    def overlay_subnet(self) -> s.OverlaySubnet:
        return s.parse_overlay_subnet(self.OVERLAY_SUBNET)

    def overlay_underlay_address(self, runner_url: str) -> str:
        """This runner's VXLAN endpoint: OVERLAY_UNDERLAY_ADDRESS, else the host part of ``runner_url``
        (resolved to IPv4 when it is a name: blocking, call it from a thread). ``ValueError`` when there is
        no usable IPv4 address (an IPv6 or unresolvable runner URL: then set OVERLAY_UNDERLAY_ADDRESS)."""
        if self.OVERLAY_UNDERLAY_ADDRESS:
            return self.OVERLAY_UNDERLAY_ADDRESS
        host = urllib.parse.urlsplit(runner_url).hostname or ""
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            pass
        try:
            infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_DGRAM)
        except OSError as exc:
            raise ValueError(
                f"cannot resolve {host!r} (from the runner URL {runner_url}) to an IPv4 address for the "
                f"overlay: {exc}; set OVERLAY_UNDERLAY_ADDRESS"
            ) from exc
        if not infos:
            raise ValueError(f"{host!r} has no IPv4 address; set OVERLAY_UNDERLAY_ADDRESS")
        return str(infos[0][4][0])

    @property
    def tunnel_client_candidates(self) -> list[Path]:
        """Where the tunnel-client binary is looked for, in order (just TUNNEL_CLIENT_PATH if set)."""
        if self.TUNNEL_CLIENT_PATH:
            return [Path(self.TUNNEL_CLIENT_PATH).expanduser()]
        repo = Path(__file__).resolve().parent.parent / "tunnel-client-rs" / "target"
        return [
            paths.kohakuriver_home() / "tunnel-client",
            Path("/usr/local/bin/tunnel-client"),
            Path("/usr/bin/tunnel-client"),
            Path(self.SHARED_DIR) / "bin" / "tunnel-client",
            repo / "x86_64-unknown-linux-musl" / "release" / "tunnel-client",
            repo / "release" / "tunnel-client",
        ]

    def find_tunnel_client(self) -> Path | None:
        """The first existing executable of ``tunnel_client_candidates`` (reads the file system)."""
        for candidate in self.tunnel_client_candidates:
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
        return None

    def find_numactl(self) -> str | None:
        """The numactl to ask for the NUMA layout when sysfs shows none: NUMACTL_PATH (a path, or a name
        looked up on PATH), or numactl on PATH; None when that is not an executable file."""
        return shutil.which(self.NUMACTL_PATH or "numactl")

    def runner_url(self) -> str:
        """How the host reaches this runner: RUNNER_URL, or derived from the bind address / route to the host.

        With a bind-all RUNNER_BIND_IP this asks the kernel which local address routes towards HOST_ADDRESS
        (a UDP "connect" sends no packet, but resolving a host name may block: call it from a thread).
        """
        if self.RUNNER_URL:
            return self.RUNNER_URL.rstrip("/")
        scheme = "https" if self.tls_enabled else "http"
        address = self.RUNNER_BIND_IP
        if ipaddress.ip_address(address).is_unspecified:
            address = _route_source_address(self.HOST_ADDRESS, self.HOST_PORT)
        return f"{scheme}://{_url_host(address)}:{self.RUNNER_PORT}"


def _route_source_address(host: str, port: int) -> str:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError:
        return "127.0.0.1"
    for family, type_, proto, _, sockaddr in infos:
        try:
            with socket.socket(family, type_, proto) as sock:
                sock.connect(sockaddr)
                return sock.getsockname()[0]
        except OSError:
            continue
    return "127.0.0.1"


RUNNER_SCHEMA = s.Schema(
    class_name="RunnerConfig",
    title="KohakuRiver runner configuration",
    filename=paths.RUNNER_CONFIG_NAME,
    sections=[
        _NETWORK,
        _SECURITY,
        _PATHS,
        _TIMING,
        _EXECUTION,
        _DOCKER,
        _DOCKER_NETWORK,
        _TUNNEL,
        _SNAPSHOT,
        _VM,
        _OVERLAY,
        _LOGGING,
    ],
    cross_checks=_CROSS_CHECKS,
    base=RunnerConfigBase,
    module=__name__,
    intro="Start the runner with `kr runner` (reads ~/.kohakuriver/runner_config.py) or "
    "`kr runner --config PATH`.",
)

#: The runner's frozen config class; build one with ``load_runner_config`` or ``runner_config_from``.
RunnerConfig: Any = RUNNER_SCHEMA.config_class


def load_runner_config(path: str | os.PathLike[str] | None = None) -> Any:
    """Load the runner configuration.

    ``path`` None: ``~/.kohakuriver/runner_config.py`` (or ``$KOHAKURIVER_HOME/runner_config.py``); a
    missing default file means every setting at its default. An explicit ``path`` that does not exist is an
    error. Raises ``SettingsError`` (one message listing every problem).
    """
    return paths.load_config(RUNNER_SCHEMA, path, paths.default_runner_config_path())


def runner_config_from(values: Mapping[str, Any] | Iterable[tuple[str, Any]] = (), **overrides: Any) -> Any:
    """A validated ``RunnerConfig`` from overrides of the defaults (for ``kr up`` and tests)."""
    return RUNNER_SCHEMA.build({**dict(values), **overrides}, source="runner settings")
