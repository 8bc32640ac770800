"""Facts about this node: cores, memory, CPU load, temperatures, NUMA topology, GPUs.

Every function is synchronous and cheap (no sleeping, no subprocess): psutil's CPU percentage is measured
since the previous call (``interval=None``), NUMA comes from sysfs (or from ``numactl --hardware`` output,
which ``monitor`` runs and this module parses), GPUs from NVML. NVML calls go to the
driver and can stall on a sick GPU, so the runner calls ``gpu_info`` (or ``resource_snapshot``) through
``trio.to_thread.run_sync``. Results are plain dicts; the field names are those of the models in
``kohakuriver_proto``.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil

__all__ = [
    "GPU_FIELDS",
    "GpuMonitor",
    "cpu_count",
    "cpu_percent",
    "gpu_info",
    "memory_info",
    "numa_topology",
    "parse_cpulist",
    "parse_numactl_hardware",
    "resource_snapshot",
    "temperatures",
]

log = logging.getLogger("kohakuriver.runner.system_info")

UNAVAILABLE = -1

GPU_FIELDS = (
    "gpu_id",
    "name",
    "driver_version",
    "pci_bus_id",
    "gpu_utilization",
    "graphics_clock_mhz",
    "mem_utilization",
    "mem_clock_mhz",
    "memory_total_mib",
    "memory_used_mib",
    "memory_free_mib",
    "temperature",
    "fan_speed",
    "power_usage_mw",
    "power_limit_mw",
)

# Sensor groups that measure the CPU package/cores, best first; other groups (NVMe, wifi, battery, GPU)
# are used only when none of these exist.
_CPU_SENSOR_GROUPS = (
    "coretemp",
    "k10temp",
    "zenpower",
    "cpu_thermal",
    "cpu-thermal",
    "soc_thermal",
    "acpitz",
)


# ---------------------------------------------------------------------------------------------------------
# CPU and memory


def cpu_count() -> int:
    """Logical CPUs of the machine (what the scheduler hands out as cores)."""
    return psutil.cpu_count(logical=True) or os.cpu_count() or 1


def cpu_percent() -> float:
    """Machine-wide CPU use since the previous call (the first call returns 0.0). Never sleeps."""
    return float(psutil.cpu_percent(interval=None))


def memory_info() -> dict[str, int | float]:
    mem = psutil.virtual_memory()
    return {
        "memory_total_bytes": int(mem.total),
        "memory_used_bytes": int(mem.total - mem.available),
        "memory_available_bytes": int(mem.available),
        "memory_percent": float(mem.percent),
    }


def temperatures(
    read: Callable[[], dict[str, list[Any]]] | None = None,
) -> tuple[float | None, float | None]:
    """(average, maximum) current temperature in °C of the CPU sensors, ``(None, None)`` without sensors."""
    if read is None:
        read = getattr(psutil, "sensors_temperatures", None)
        if read is None:  # not on this platform
            return None, None
    try:
        groups = read() or {}
    except (OSError, RuntimeError, ValueError) as exc:
        log.debug("reading temperatures failed: %s", exc)
        return None, None
    chosen = [groups[name] for name in _CPU_SENSOR_GROUPS if groups.get(name)]
    if not chosen:
        chosen = [entries for entries in groups.values() if entries]
    readings = [
        float(entry.current)
        for entries in chosen
        for entry in entries
        if entry.current is not None and 0 < float(entry.current) < 150
    ]
    if not readings:
        return None, None
    return sum(readings) / len(readings), max(readings)


# ---------------------------------------------------------------------------------------------------------
# NUMA


def parse_cpulist(text: str) -> list[int]:
    """The kernel's cpulist format, ``"0-3,8,10-11"`` -> ``[0, 1, 2, 3, 8, 10, 11]``."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            low, _, high = part.partition("-")
            stride = 1
            if ":" in high:  # "0-15:2" (rare, but the kernel can print it)
                high, _, step = high.partition(":")
                stride = int(step.split("/")[0])
            cpus.update(range(int(low), int(high) + 1, stride))
        else:
            cpus.add(int(part))
    return sorted(cpus)


_MEMTOTAL = re.compile(r"^Node\s+\d+\s+MemTotal:\s+(\d+)\s*kB", re.MULTILINE)


def numa_topology(sysfs_root: str | os.PathLike[str] = "/sys") -> dict[int, dict[str, Any]] | None:
    """``{node_id: {"cores": [cpu ids], "memory_bytes": int}}`` from sysfs, or ``None`` without NUMA info.

    Nodes without CPUs (memory-only or CXL nodes) are left out: nothing can be pinned to them.
    """
    base = Path(sysfs_root) / "devices" / "system" / "node"
    try:
        entries = list(base.iterdir())
    except OSError:
        return None
    topology: dict[int, dict[str, Any]] = {}
    for entry in entries:
        match = re.fullmatch(r"node(\d+)", entry.name)
        if not match:
            continue
        try:
            cores = parse_cpulist((entry / "cpulist").read_text())
        except (OSError, ValueError):
            continue
        if not cores:
            continue
        memory = 0
        try:
            found = _MEMTOTAL.search((entry / "meminfo").read_text())
            if found:
                memory = int(found.group(1)) * 1024
        except OSError:
            pass
        topology[int(match.group(1))] = {"cores": cores, "memory_bytes": memory}
    return dict(sorted(topology.items())) or None


_NUMACTL_CPUS = re.compile(r"^node[ \t]+(\d+)[ \t]+cpus:([\d \t]*)$", re.MULTILINE)
_NUMACTL_SIZE = re.compile(r"^node[ \t]+(\d+)[ \t]+size:[ \t]+(\d+)[ \t]*MB[ \t]*$", re.MULTILINE)


def parse_numactl_hardware(text: str) -> dict[int, dict[str, Any]] | None:
    """The ``numa_topology`` shape from the output of ``numactl --hardware``, or ``None`` without nodes.

    The lines used are ``node N cpus: 0 1 2 3`` and ``node N size: 7872 MB``; nodes without CPUs are left out,
    as in ``numa_topology``. "No NUMA available on this system" (or any other text) has neither: ``None``.
    """
    memory = {int(node): int(mib) * 1024 * 1024 for node, mib in _NUMACTL_SIZE.findall(text)}
    topology = {
        int(node): {"cores": sorted({int(c) for c in cpus.split()}), "memory_bytes": memory.get(int(node), 0)}
        for node, cpus in _NUMACTL_CPUS.findall(text)
        if cpus.split()
    }
    return dict(sorted(topology.items())) or None


# ---------------------------------------------------------------------------------------------------------
# GPUs (NVML)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class GpuMonitor:
    """NVML, initialised once and shut down at exit (or ``close()``).

    ``nvml`` is the ``pynvml`` module (nvidia-ml-py) or a stand-in with the same names (tests). Without the
    library or the driver, ``query()`` returns ``[]``; initialisation is retried at most every
    ``retry_interval`` seconds, so a driver loaded after the runner started is picked up. A value a GPU does
    not report (fan speed of a passively cooled card, power on some boards) is -1 (``""`` for text).
    """

    def __init__(self, nvml: ModuleType | Any | None = None, *, retry_interval: float = 60.0) -> None:
        self._nvml = nvml
        self._retry_interval = retry_interval
        self._initialised = False
        self._last_attempt: float | None = None
        self._lock = threading.Lock()
        self._atexit_registered = False

    def _load(self) -> Any | None:
        if self._nvml is None:
            try:
                import pynvml  # nvidia-ml-py
            except ImportError:
                return None
            self._nvml = pynvml
        return self._nvml

    def _ensure_init(self) -> Any | None:
        if self._initialised:
            return self._nvml
        now = time.monotonic()
        if self._last_attempt is not None and now - self._last_attempt < self._retry_interval:
            return None
        self._last_attempt = now
        nvml = self._load()
        if nvml is None:
            return None
        try:
            nvml.nvmlInit()
        except Exception as exc:  # NVMLError (no driver, library missing) or OSError from ctypes
            log.debug("NVML unavailable: %s", exc)
            return None
        self._initialised = True
        if not self._atexit_registered:
            atexit.register(self.close)
            self._atexit_registered = True
        return nvml

    def close(self) -> None:
        # A query stuck in the driver must not hang interpreter exit: give up on the shutdown instead.
        if not self._lock.acquire(timeout=5.0):
            return
        try:
            if self._initialised:
                self._initialised = False
                try:
                    self._nvml.nvmlShutdown()
                except Exception as exc:
                    log.debug("nvmlShutdown failed: %s", exc)
        finally:
            self._lock.release()

    def query(self) -> list[dict[str, Any]]:
        """One dict per GPU with every field of ``GPU_FIELDS``."""
        with self._lock:
            nvml = self._ensure_init()
            if nvml is None:
                return []
            try:
                count = int(nvml.nvmlDeviceGetCount())
            except Exception as exc:
                log.warning("NVML could not count GPUs: %s", exc)
                return []
            driver = self._get(lambda: _text(nvml.nvmlSystemGetDriverVersion()), "")
            return [self._device(nvml, index, driver) for index in range(count)]

    @staticmethod
    def _get(fn: Callable[[], Any], default: Any = UNAVAILABLE) -> Any:
        try:
            value = fn()
        except Exception:  # NVMLError_NotSupported, GpuIsLost, ... : one field, not the whole report
            return default
        return default if value is None else value

    def _device(self, nvml: Any, index: int, driver: str) -> dict[str, Any]:
        get = self._get
        info: dict[str, Any] = dict.fromkeys(GPU_FIELDS, UNAVAILABLE)
        info.update(gpu_id=index, name="", driver_version=driver, pci_bus_id="")
        handle = get(lambda: nvml.nvmlDeviceGetHandleByIndex(index), None)
        if handle is None:
            return info
        info["name"] = get(lambda: _text(nvml.nvmlDeviceGetName(handle)), "")
        info["pci_bus_id"] = get(lambda: _text(nvml.nvmlDeviceGetPciInfo(handle).busId), "")
        util = get(lambda: nvml.nvmlDeviceGetUtilizationRates(handle), None)
        if util is not None:
            info["gpu_utilization"] = int(util.gpu)
            info["mem_utilization"] = int(util.memory)
        info["graphics_clock_mhz"] = int(
            get(lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_GRAPHICS))
        )
        info["mem_clock_mhz"] = int(get(lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM)))
        mem = get(lambda: nvml.nvmlDeviceGetMemoryInfo(handle), None)
        if mem is not None:
            info["memory_total_mib"] = int(mem.total) // (1024 * 1024)
            info["memory_used_mib"] = int(mem.used) // (1024 * 1024)
            info["memory_free_mib"] = int(mem.free) // (1024 * 1024)
        info["temperature"] = int(
            get(lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
        )
        info["fan_speed"] = int(get(lambda: nvml.nvmlDeviceGetFanSpeed(handle)))
        info["power_usage_mw"] = int(get(lambda: nvml.nvmlDeviceGetPowerUsage(handle)))
        info["power_limit_mw"] = int(get(lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle)))
        return info


_default_monitor = GpuMonitor()


def gpu_info(monitor: GpuMonitor | None = None) -> list[dict[str, Any]]:
    """Every GPU of this node (``[]`` without NVML or driver). May block on the driver: call in a thread."""
    return (monitor or _default_monitor).query()


def resource_snapshot(monitor: GpuMonitor | None = None) -> dict[str, Any]:
    """What a heartbeat reports: CPU %, memory, temperatures and GPUs (call in a thread)."""
    avg_temp, max_temp = temperatures()
    mem = memory_info()
    return {
        "cpu_percent": cpu_percent(),
        "memory_percent": mem["memory_percent"],
        "memory_used_bytes": mem["memory_used_bytes"],
        "memory_total_bytes": mem["memory_total_bytes"],
        "current_avg_temp": avg_temp,
        "current_max_temp": max_temp,
        "gpu_info": gpu_info(monitor),
    }
