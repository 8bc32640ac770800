"""This machine's facts (cores, NUMA layout, GPUs) and live figures (CPU, memory, temperatures, GPU use).

``system_info`` reads psutil, sysfs and NVML synchronously; NVML can stall on a sick GPU. So one loop samples
everything in a worker thread every ``RESOURCE_CHECK_INTERVAL_SECONDS`` and keeps the latest sample: the
heartbeat and the executors read it without ever waiting on the driver.

The NUMA layout is read once, at start: from sysfs, or, where sysfs shows none, from ``numactl --hardware``
(``NUMACTL_PATH``, or numactl on PATH; argv, no shell). That is all numactl is used for: a task bound to a
NUMA node gets that node's CPUs and memory through its container's cpuset (``container_spec``), so images
never need numactl.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import trio

from kohakuriver_proto.converter import structure
from kohakuriver_proto.errors import ValidationError
from kohakuriver_proto.models import GpuInfo, NumaNode

from . import system_info
from .container_spec import NodeFacts
from .runner_settings import RunnerSettings

__all__ = ["NodeMonitor", "detect_numa_topology"]

log = logging.getLogger("kohakuriver.runner.monitor")

#: ``numactl --hardware`` answers at once; a hung one must not hold up the runner's start.
NUMACTL_TIMEOUT = 10.0


def _gpu_models(raw: list[dict[str, Any]]) -> list[GpuInfo]:
    gpus: list[GpuInfo] = []
    for item in raw:
        try:
            gpus.append(structure(item, GpuInfo))
        except ValidationError as exc:
            log.debug("ignoring GPU entry %r: %s", item.get("gpu_id"), exc)
    return gpus


async def detect_numa_topology(
    config: RunnerSettings, sysfs_root: str | os.PathLike[str] = "/sys"
) -> dict[int, Any] | None:
    """The NUMA layout (``system_info.numa_topology``'s shape) or None: sysfs first, then numactl."""
    topology = await trio.to_thread.run_sync(system_info.numa_topology, sysfs_root)
    if topology is not None:
        return topology
    numactl = await trio.to_thread.run_sync(config.find_numactl)
    if numactl is None:
        if config.NUMACTL_PATH:
            log.warning("NUMACTL_PATH %s is not an executable file: no NUMA layout", config.NUMACTL_PATH)
        return None
    with trio.move_on_after(NUMACTL_TIMEOUT):
        try:
            done = await trio.run_process(
                [numactl, "--hardware"], stdin=b"", capture_stdout=True, capture_stderr=True, check=False
            )
        except OSError as exc:
            log.warning("running %s failed: %s", numactl, exc)
            return None
        if done.returncode != 0:  # "No NUMA available on this system"
            log.info("%s --hardware: %s", numactl, done.stderr.decode("utf-8", "replace").strip()[:200])
            return None
        return system_info.parse_numactl_hardware(done.stdout.decode("utf-8", "replace"))
    log.warning("%s --hardware did not answer within %s s", numactl, NUMACTL_TIMEOUT)
    return None


class NodeMonitor:
    """Call ``await start()`` once (first sample), then run ``run()`` in a nursery."""

    def __init__(self, config: RunnerSettings, gpu_monitor: system_info.GpuMonitor | None = None) -> None:
        self.config = config
        self._gpu_monitor = gpu_monitor
        self.cpu_count = system_info.cpu_count()
        self.numa_topology: dict[int, dict[str, Any]] | None = None
        self.snapshot: dict[str, Any] = {}
        self.gpus: list[GpuInfo] = []

    def _sample(self) -> dict[str, Any]:
        return system_info.resource_snapshot(self._gpu_monitor)

    async def start(self) -> None:
        self.numa_topology = await detect_numa_topology(self.config)
        await self._refresh()

    async def _refresh(self) -> None:
        snapshot = await trio.to_thread.run_sync(self._sample)
        self.gpus = _gpu_models(snapshot.get("gpu_info") or [])
        self.snapshot = snapshot

    async def run(self) -> None:
        interval = float(self.config.RESOURCE_CHECK_INTERVAL_SECONDS)
        while True:
            await trio.sleep(interval)
            try:
                await self._refresh()
            except Exception as exc:  # a sensor or driver hiccup must not end monitoring
                log.warning("sampling resources failed: %s", exc)

    def numa_models(self) -> dict[int, NumaNode] | None:
        if not self.numa_topology:
            return None
        return {
            node: NumaNode(cores=list(info["cores"]), memory_bytes=info.get("memory_bytes"))
            for node, info in self.numa_topology.items()
        }

    def heartbeat_fields(self) -> dict[str, Any]:
        """The resource part of a heartbeat (the models' field names)."""
        snap = self.snapshot
        return {
            "cpu_percent": float(snap.get("cpu_percent") or 0.0),
            "memory_percent": float(snap.get("memory_percent") or 0.0),
            "memory_used_bytes": int(snap.get("memory_used_bytes") or 0),
            "memory_total_bytes": int(snap.get("memory_total_bytes") or 0),
            "current_avg_temp": snap.get("current_avg_temp"),
            "current_max_temp": snap.get("current_max_temp"),
            "gpu_info": list(self.gpus),
            "numa_topology": self.numa_models(),
        }

    async def node_facts(self) -> NodeFacts:
        # SHARED_DIR may be mounted after the runner started: look each time.
        shared = await trio.to_thread.run_sync(os.path.isdir, self.config.SHARED_DIR)
        numa = None
        if self.numa_topology:
            numa = {node: list(info["cores"]) for node, info in self.numa_topology.items()}
        return NodeFacts(
            cpu_count=self.cpu_count,
            numa_topology=numa,
            gpu_count=len(self.gpus),
            shared_dir_available=shared,
        )
