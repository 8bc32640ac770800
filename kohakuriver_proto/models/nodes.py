"""Node models: what a runner registers and heartbeats, and a node as the API returns it."""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any, NewType
from urllib.parse import urlsplit

import attrs

from ..snowflake import SnowflakeId
from ._fields import (
    check_bool,
    check_datetime,
    check_enum,
    check_float,
    check_hostname_field,
    check_int,
    check_str,
    fail,
    instances_of,
    list_of,
    opt,
    v,
)
from .overlay import OverlaySettingsView, check_ipv4
from .tasks import StatusUpdate

#: A NUMA node id. A JSON object key, so the converter writes it as a decimal string (``{"0": {...}}``).
NumaId = NewType("NumaId", int)


class NodeStatus(enum.StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"


def check_runner_url(value: object, path: str) -> None:
    """A runner base URL: ``http(s)://host[:port]``, no credentials, path, query or fragment."""
    check_str(value, path, max_len=2048, allow_empty=False, one_line=True)
    if any(c.isspace() for c in value):
        fail(path, "must not contain spaces")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        fail(path, f"not a valid URL: {exc}")
    if parts.scheme not in ("http", "https"):
        fail(path, f"must start with http:// or https://, got {value[:80]!r}")
    if not parts.hostname:
        fail(path, "has no host")
    if parts.username is not None or parts.password is not None:
        fail(path, "must not contain credentials")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        fail(path, "must be a base URL (scheme, host and port only)")
    if port == 0:
        fail(path, "port must be 1..65535")


def _check_cores(value: object, path: str) -> None:
    check_int(value, path, maximum=65535)


def _check_gpu_metric(value: object, path: str) -> None:
    check_int(value, path, minimum=-1)


def _check_numa_topology(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        fail(attribute.name, "must be an object {numa_id: {cores: [...], memory_bytes: n}}")
    for key, node in value.items():
        path = f"{attribute.name}.{key}"
        check_int(key, path, maximum=1023)
        if not isinstance(node, NumaNode):
            fail(path, f"must be a NumaNode, got {type(node).__name__}")


@attrs.frozen(kw_only=True)
class NumaNode:
    cores: list[int] = attrs.field(factory=list, validator=list_of(_check_cores, unique=True))
    memory_bytes: int | None = attrs.field(default=None, validator=opt(check_int))


NumaTopology = dict[NumaId, NumaNode]


@attrs.frozen(kw_only=True)
class GpuInfo:
    """One GPU as NVML reports it. Every metric is -1 when unavailable."""

    gpu_id: int = attrs.field(validator=v(check_int, maximum=4095))
    name: str = attrs.field(default="", validator=v(check_str, max_len=256, one_line=True))
    driver_version: str = attrs.field(default="", validator=v(check_str, max_len=64, one_line=True))
    pci_bus_id: str = attrs.field(default="", validator=v(check_str, max_len=64, one_line=True))
    gpu_utilization: int = attrs.field(default=-1, validator=v(_check_gpu_metric))
    graphics_clock_mhz: int = attrs.field(default=-1, validator=v(_check_gpu_metric))
    mem_utilization: int = attrs.field(default=-1, validator=v(_check_gpu_metric))
    mem_clock_mhz: int = attrs.field(default=-1, validator=v(_check_gpu_metric))
    memory_total_mib: int = attrs.field(default=-1, validator=v(_check_gpu_metric))
    memory_used_mib: int = attrs.field(default=-1, validator=v(_check_gpu_metric))
    memory_free_mib: int = attrs.field(default=-1, validator=v(_check_gpu_metric))
    temperature: int = attrs.field(default=-1, validator=v(_check_gpu_metric))
    fan_speed: int = attrs.field(default=-1, validator=v(_check_gpu_metric))
    power_usage_mw: int = attrs.field(default=-1, validator=v(_check_gpu_metric))
    power_limit_mw: int = attrs.field(default=-1, validator=v(_check_gpu_metric))
    vfio_bound: bool = attrs.field(default=False, validator=v(check_bool))


def _check_unique_gpu_ids(gpus: list[GpuInfo], field: str) -> None:
    seen: set[int] = set()
    for i, gpu in enumerate(gpus):
        if gpu.gpu_id in seen:
            fail(f"{field}[{i}].gpu_id", f"duplicate GPU id {gpu.gpu_id}")
        seen.add(gpu.gpu_id)


class VmAccel(enum.StrEnum):
    KVM = "kvm"
    TCG = "tcg"


@attrs.frozen(kw_only=True)
class VmImageInfo:
    """A base image in the runner's ``VM_IMAGES_DIR`` (``<name>.qcow2``)."""

    name: str = attrs.field(validator=v(check_str, max_len=128, allow_empty=False, one_line=True))
    virtual_size_bytes: int = attrs.field(validator=v(check_int))
    file_size_bytes: int = attrs.field(default=0, validator=v(check_int))
    format: str = attrs.field(default="qcow2", validator=v(check_str, max_len=32, one_line=True))
    direct_boot: bool = attrs.field(default=False, validator=v(check_bool))  # kernel + initrd beside it
    firmware: str = attrs.field(default="bios", validator=v(check_str, max_len=16, one_line=True))


@attrs.frozen(kw_only=True)
class VfioGpuInfo:
    """A GPU as VFIO passthrough sees it: PCI address, IOMMU group, and why it cannot be passed (if so)."""

    gpu_id: int = attrs.field(validator=v(check_int, maximum=4095))
    address: str = attrs.field(validator=v(check_str, max_len=32, one_line=True))
    iommu_group: int | None = attrs.field(default=None, validator=opt(check_int))
    driver: str | None = attrs.field(default=None, validator=opt(check_str, max_len=64, one_line=True))
    viable: bool = attrs.field(default=False, validator=v(check_bool))
    problems: list[str] = attrs.field(factory=list, validator=list_of(check_str, max_items=32, max_len=512))
    group_gpus: list[str] = attrs.field(factory=list, validator=list_of(check_str, max_items=64, max_len=32))


@attrs.frozen(kw_only=True)
class VmFacts:
    """What a runner can do with VMs: whether, with which accelerator and why, the tools' versions, its
    base images and its passthrough GPUs. Reported at registration and in every heartbeat."""

    capable: bool = attrs.field(default=False, validator=v(check_bool))
    accel: VmAccel | None = attrs.field(default=None, validator=opt(check_enum(VmAccel)))
    reason: str = attrs.field(default="", validator=v(check_str, max_len=4096))
    qemu_version: str | None = attrs.field(default=None, validator=opt(check_str, max_len=128, one_line=True))
    qemu_img_version: str | None = attrs.field(
        default=None, validator=opt(check_str, max_len=128, one_line=True)
    )
    ovmf_version: str | None = attrs.field(default=None, validator=opt(check_str, max_len=128, one_line=True))
    images: list[VmImageInfo] = attrs.field(factory=list, validator=instances_of(VmImageInfo))
    vfio_gpus: list[VfioGpuInfo] = attrs.field(factory=list, validator=instances_of(VfioGpuInfo))
    #: The runner's ``VM_DEFAULT_MEMORY_MB``: what the host reserves (and asks for) when a create request
    #: names no memory. None: unknown (the host then uses its own default, 4096).
    default_memory_mb: int | None = attrs.field(
        default=None, validator=opt(check_int, minimum=64, maximum=1 << 32)
    )

    def image(self, name: str) -> VmImageInfo | None:
        return next((i for i in self.images if i.name == name), None)


_vm_facts = attrs.validators.optional(attrs.validators.instance_of(VmFacts))


@attrs.frozen(kw_only=True)
class NodeRegistration:
    """Runner -> host at start-up (``POST /api/register``)."""

    hostname: str = attrs.field(validator=v(check_hostname_field))
    url: str = attrs.field(validator=v(check_runner_url))
    total_cores: int = attrs.field(validator=v(check_int, minimum=1, maximum=65536))
    memory_total_bytes: int = attrs.field(validator=v(check_int))
    numa_topology: NumaTopology | None = attrs.field(default=None, validator=_check_numa_topology)
    gpu_info: list[GpuInfo] = attrs.field(factory=list, validator=instances_of(GpuInfo))
    runner_version: str = attrs.field(default="", validator=v(check_str, max_len=64, one_line=True))
    docker_available: bool = attrs.field(default=True, validator=v(check_bool))
    docker_error: str | None = attrs.field(default=None, validator=opt(check_str))
    vm_capable: bool = attrs.field(default=False, validator=v(check_bool))
    vm: VmFacts | None = attrs.field(default=None, validator=_vm_facts)
    # overlay network: the runner's OVERLAY_* settings (the host refuses a mismatch) and its VXLAN address
    # (None: the host part of ``url``)
    overlay: OverlaySettingsView | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.instance_of(OverlaySettingsView))
    )
    underlay_address: str | None = attrs.field(default=None, validator=opt(check_ipv4))

    def __attrs_post_init__(self) -> None:
        _check_unique_gpu_ids(self.gpu_info, "gpu_info")


@attrs.frozen(kw_only=True)
class Heartbeat:
    """Runner -> host every ``HEARTBEAT_INTERVAL_SECONDS`` (``PUT /api/heartbeat/{hostname}``).

    ``running_tasks``: every task the runner holds alive (running or paused). ``finished_tasks``: final
    reports the host may not have received (tasks that ended while the runner was down, or whose
    ``/api/update`` failed); the host applies them like ``/api/update`` and they are idempotent.
    """

    running_tasks: list[SnowflakeId] = attrs.field(
        factory=list, validator=list_of(check_int, max_items=65536)
    )
    finished_tasks: list[StatusUpdate] = attrs.field(factory=list, validator=instances_of(StatusUpdate))
    cpu_percent: float = attrs.field(default=0.0, validator=v(check_float, minimum=0))
    memory_percent: float = attrs.field(default=0.0, validator=v(check_float, minimum=0))
    memory_used_bytes: int = attrs.field(default=0, validator=v(check_int))
    memory_total_bytes: int = attrs.field(default=0, validator=v(check_int))
    current_avg_temp: float | None = attrs.field(default=None, validator=opt(check_float))
    current_max_temp: float | None = attrs.field(default=None, validator=opt(check_float))
    gpu_info: list[GpuInfo] = attrs.field(factory=list, validator=instances_of(GpuInfo))
    numa_topology: NumaTopology | None = attrs.field(default=None, validator=_check_numa_topology)
    docker_available: bool = attrs.field(default=True, validator=v(check_bool))
    docker_error: str | None = attrs.field(default=None, validator=opt(check_str))
    runner_version: str = attrs.field(default="", validator=v(check_str, max_len=64, one_line=True))
    vm_capable: bool = attrs.field(default=False, validator=v(check_bool))
    vm: VmFacts | None = attrs.field(default=None, validator=_vm_facts)

    def __attrs_post_init__(self) -> None:
        _check_unique_gpu_ids(self.gpu_info, "gpu_info")


@attrs.frozen(kw_only=True)
class NodeInfo:
    """A node as the API returns it (``GET /api/nodes``): registration, liveness, last metrics, usage.

    Usage counts the resources of every task in ``lifecycle.ACTIVE`` on the node.
    """

    hostname: str = attrs.field(validator=v(check_hostname_field))
    url: str = attrs.field(validator=v(check_runner_url))
    status: NodeStatus = attrs.field(validator=v(check_enum(NodeStatus)))
    total_cores: int = attrs.field(validator=v(check_int, maximum=65536))
    memory_total_bytes: int = attrs.field(validator=v(check_int))
    last_heartbeat: dt.datetime | None = attrs.field(default=None, validator=opt(check_datetime))
    numa_topology: NumaTopology | None = attrs.field(default=None, validator=_check_numa_topology)
    gpu_info: list[GpuInfo] = attrs.field(factory=list, validator=instances_of(GpuInfo))
    runner_version: str = attrs.field(default="", validator=v(check_str, max_len=64, one_line=True))
    docker_available: bool = attrs.field(default=True, validator=v(check_bool))
    docker_error: str | None = attrs.field(default=None, validator=opt(check_str))
    vm_capable: bool = attrs.field(default=False, validator=v(check_bool))
    vm: VmFacts | None = attrs.field(default=None, validator=_vm_facts)
    # last heartbeat metrics
    cpu_percent: float = attrs.field(default=0.0, validator=v(check_float, minimum=0))
    memory_percent: float = attrs.field(default=0.0, validator=v(check_float, minimum=0))
    memory_used_bytes: int = attrs.field(default=0, validator=v(check_int))
    current_avg_temp: float | None = attrs.field(default=None, validator=opt(check_float))
    current_max_temp: float | None = attrs.field(default=None, validator=opt(check_float))
    # usage by ACTIVE tasks
    cores_in_use: int = attrs.field(default=0, validator=v(check_int))
    available_cores: int = attrs.field(default=0, validator=v(check_int))
    memory_reserved_bytes: int = attrs.field(default=0, validator=v(check_int))
    gpus_in_use: list[int] = attrs.field(factory=list, validator=list_of(check_int, unique=True))
    running_task_count: int = attrs.field(default=0, validator=v(check_int))


__all__ = [
    "GpuInfo",
    "Heartbeat",
    "NodeInfo",
    "NodeRegistration",
    "NodeStatus",
    "NumaId",
    "NumaNode",
    "NumaTopology",
    "VfioGpuInfo",
    "VmAccel",
    "VmFacts",
    "VmImageInfo",
    "check_runner_url",
]
