"""The nodes in memory: a write-through copy of the ``nodes`` table for the hot paths.

Why: with 500 runners, reading and parsing 500 node rows for every submit, every scheduling pass and every
``GET /api/nodes`` costs tens of milliseconds of CPU each time, which stalls the event loop and with it every
heartbeat. The store stays the source of truth (it is written first, in the same transaction as the task
changes); this registry is updated right after each committed node write (register, heartbeat, offline),
and loaded from the store at start-up. Only this host process writes nodes, so the copy cannot drift.

What it keeps per node: the stored row's facts, the scheduler's ``NodeCapacity`` (rebuilt only when the
registration, the online state, Docker availability or the VM facts change) and the node's JSON for
``GET /api/nodes`` without the usage fields, rendered lazily and reused until the node changes, so a list
of 500 nodes is a string join, not 500 serialisations.

VM facts (``models.VmFacts``: capability, accelerator, base images, VFIO GPUs) come with the registration
and every heartbeat; the latest heartbeat's win, and a heartbeat without them keeps the registration's.
They are kept as the dict the runner sent (replaced only when they differ, so a steady node makes no
garbage), because the scheduler places VM VPS by them and the API shows them.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from . import scheduler
from .store import NodeRow
from .timefmt import iso

#: Usage fields of a node view (``models.NodeInfo``), computed from active tasks for every request.
USAGE_FIELDS = (
    "cores_in_use",
    "available_cores",
    "memory_reserved_bytes",
    "gpus_in_use",
    "running_task_count",
)


@attrs.define
class NodeEntry:
    """One node. Its latest metrics are kept as the JSON text the heartbeat carried, not as dicts: 500 nodes
    replacing a nest of dicts every 5 s would keep the cyclic GC busy with long-lived garbage (full
    collections of tens of milliseconds on the event loop), while a string is invisible to it. The text is
    parsed only to render the node's view, and only after it changed."""

    hostname: str
    url: str
    status: str
    last_heartbeat: float | None
    registration: dict[str, Any]
    metrics_text: str
    docker_available: bool
    docker_error: str | None
    #: The latest ``VmFacts`` (JSON shape), or None when the runner reported none.
    vm: dict[str, Any] | None = None
    capacity: scheduler.NodeCapacity = attrs.field(init=False)
    total_cores: int = attrs.field(init=False)
    _json: str | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self.total_cores = int(self.registration.get("total_cores") or 0)
        self.capacity = self._capacity()

    @property
    def metrics(self) -> dict[str, Any]:
        return json.loads(self.metrics_text)

    @property
    def usable(self) -> bool:
        """Online and able to run containers: the scheduler may place tasks here."""
        return self.status == "online" and self.docker_available

    def _capacity(self) -> scheduler.NodeCapacity:
        reg = self.registration
        numa = reg.get("numa_topology") or None
        vm = self.vm or {}
        vfio = [g for g in vm.get("vfio_gpus") or () if isinstance(g, dict)]
        # A GPU bound to vfio-pci is invisible to NVML: the node's GPUs are both lists' ids.
        gpu_ids = {int(g["gpu_id"]) for g in reg.get("gpu_info") or ()} | {int(g["gpu_id"]) for g in vfio}
        return scheduler.NodeCapacity(
            hostname=self.hostname,
            online=self.usable,
            total_cores=self.total_cores,
            memory_total_bytes=int(reg.get("memory_total_bytes") or 0),
            gpu_ids=frozenset(gpu_ids),
            numa=None if numa is None else {int(k): v.get("cores") or () for k, v in numa.items()},
            vm_capable=bool(vm.get("capable")),
            vm_reason=str(vm.get("reason") or ""),
            vm_images=frozenset(str(i["name"]) for i in vm.get("images") or () if isinstance(i, dict)),
            vm_gpus=frozenset(int(g["gpu_id"]) for g in vfio if g.get("viable")),
        )

    def static_view(self) -> dict[str, Any]:
        """The node as the API returns it, without the usage fields."""
        reg, metrics = self.registration, self.metrics

        def latest(key: str, default: Any) -> Any:
            return metrics[key] if key in metrics else reg.get(key, default)

        return {
            "hostname": self.hostname,
            "url": self.url,
            "status": self.status,
            "total_cores": self.total_cores,
            "memory_total_bytes": int(reg.get("memory_total_bytes") or 0),
            "last_heartbeat": None if self.last_heartbeat is None else iso(self.last_heartbeat),
            "numa_topology": reg.get("numa_topology"),
            "gpu_info": latest("gpu_info", []),
            "runner_version": latest("runner_version", ""),
            "docker_available": self.docker_available,
            "docker_error": self.docker_error,
            "vm_capable": bool(self.vm["capable"]) if self.vm else bool(latest("vm_capable", False)),
            "vm": self.vm,
            "cpu_percent": float(metrics.get("cpu_percent", 0.0)),
            "memory_percent": float(metrics.get("memory_percent", 0.0)),
            "memory_used_bytes": int(metrics.get("memory_used_bytes", 0)),
            "current_avg_temp": metrics.get("current_avg_temp"),
            "current_max_temp": metrics.get("current_max_temp"),
        }

    def json_prefix(self) -> str:
        """``static_view`` as JSON without its closing brace, ready for the usage fields."""
        if self._json is None:
            self._json = json.dumps(self.static_view(), separators=(",", ":"), ensure_ascii=False)[:-1]
        return self._json

    def changed(self, *, capacity: bool) -> None:
        self._json = None
        if capacity:
            self.capacity = self._capacity()


def docker_facts(metrics: dict[str, Any], registration: dict[str, Any]) -> tuple[bool, str | None]:
    """(available, error): the latest word wins; register copies the registration's into the metrics."""
    available = metrics.get("docker_available", registration.get("docker_available", True))
    return bool(available), metrics.get("docker_error", registration.get("docker_error"))


class NodeRegistry:
    def __init__(self) -> None:
        self._nodes: dict[str, NodeEntry] = {}
        self._capacities: list[scheduler.NodeCapacity] | None = None
        self._sorted: list[NodeEntry] | None = None

    def __len__(self) -> int:
        return len(self._nodes)

    def get(self, hostname: str) -> NodeEntry | None:
        return self._nodes.get(hostname)

    def entries(self) -> list[NodeEntry]:
        """Every node, by hostname."""
        if self._sorted is None:
            self._sorted = sorted(self._nodes.values(), key=lambda e: e.hostname)
        return self._sorted

    def capacities(self) -> list[scheduler.NodeCapacity]:
        if self._capacities is None:
            self._capacities = [e.capacity for e in self.entries()]
        return self._capacities

    def counts(self) -> tuple[int, int]:
        """(online, total)."""
        return sum(e.status == "online" for e in self._nodes.values()), len(self._nodes)

    # -- write-through updates (call after the store transaction committed) -------------------------------

    def put(self, row: NodeRow) -> NodeEntry:
        """A node as stored (start-up, registration)."""
        available, error = docker_facts(row.metrics, row.registration)
        text = json.dumps(row.metrics, separators=(",", ":"), ensure_ascii=False)
        vm = row.metrics.get("vm") or row.registration.get("vm")
        entry = NodeEntry(
            row.hostname,
            row.url,
            row.status,
            row.last_heartbeat,
            row.registration,
            text,
            available,
            error,
            vm,
        )
        if row.hostname not in self._nodes:
            self._sorted = None
        self._nodes[row.hostname] = entry
        self._capacities = None
        self._sorted = None
        return entry

    def heartbeat(
        self,
        hostname: str,
        metrics_text: str,
        docker: tuple[bool, str | None],
        now: float,
        vm: dict[str, Any] | None = None,
    ) -> tuple[bool, bool]:
        """Record a heartbeat (``vm``: its VM facts, None = unchanged from the registration). Returns (it
        was online, placement facts changed: back online, Docker flipped or the VM facts changed)."""
        entry = self._nodes.get(hostname)
        if entry is None:
            return False, False
        was_online, docker_before = entry.status == "online", entry.docker_available
        entry.metrics_text = metrics_text
        entry.docker_available, entry.docker_error = docker
        entry.last_heartbeat = now
        entry.status = "online"
        vm = vm or entry.registration.get("vm")
        vm_changed = vm != entry.vm
        if vm_changed:
            entry.vm = vm
        placement_changed = not was_online or docker_before != entry.docker_available or vm_changed
        entry.changed(capacity=placement_changed)
        if placement_changed:
            self._capacities = None
        return was_online, placement_changed

    def remove(self, hostname: str) -> None:
        """Forget a node (after the store deleted it)."""
        if self._nodes.pop(hostname, None) is not None:
            self._capacities = None
            self._sorted = None

    def offline(self, hostname: str) -> None:
        entry = self._nodes.get(hostname)
        if entry is not None and entry.status != "offline":
            entry.status = "offline"
            entry.changed(capacity=True)
            self._capacities = None
