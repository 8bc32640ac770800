"""Node facts: NUMA from a fake sysfs tree, GPUs from a fake pynvml module, temperatures from fake sensors."""

from __future__ import annotations

from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace

import pytest

from kohakuriver_runner import system_info
from kohakuriver_runner.system_info import GPU_FIELDS, GpuMonitor, numa_topology, parse_cpulist, temperatures

# -- NUMA -----------------------------------------------------------------------------------------------


def make_node(root: Path, node: int, cpulist: str, mem_kb: int | None) -> None:
    d = root / "devices" / "system" / "node" / f"node{node}"
    d.mkdir(parents=True)
    (d / "cpulist").write_text(cpulist + "\n")
    if mem_kb is not None:
        (d / "meminfo").write_text(
            f"Node {node} MemTotal:       {mem_kb} kB\nNode {node} MemFree:        1234 kB\n"
            f"Node {node} MemUsed:        {mem_kb - 1234} kB\n"
        )


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("0", [0]),
        ("0-3", [0, 1, 2, 3]),
        ("0-1,8-9\n", [0, 1, 8, 9]),
        ("4,2,3", [2, 3, 4]),
        ("0-6:2/4", [0, 2, 4, 6]),
        ("", []),
    ],
)
def test_parse_cpulist(text, cpus):
    assert parse_cpulist(text) == cpus


def test_two_node_topology(tmp_path):
    make_node(tmp_path, 0, "0-3,8-11", 16 * 1024 * 1024)
    make_node(tmp_path, 1, "4-7,12-15", 8 * 1024 * 1024)
    (tmp_path / "devices/system/node/online").write_text("0-1\n")  # not a node directory
    assert numa_topology(tmp_path) == {
        0: {"cores": [0, 1, 2, 3, 8, 9, 10, 11], "memory_bytes": 16 * 1024**3},
        1: {"cores": [4, 5, 6, 7, 12, 13, 14, 15], "memory_bytes": 8 * 1024**3},
    }


def test_nodes_sorted_numerically_and_memory_only_nodes_skipped(tmp_path):
    make_node(tmp_path, 10, "2", 1024)
    make_node(tmp_path, 2, "1", 1024)
    make_node(tmp_path, 3, "", 4096)  # CXL / memory-only node: nothing to pin to
    make_node(tmp_path, 0, "0", None)  # meminfo missing: memory unknown
    topo = numa_topology(tmp_path)
    assert list(topo) == [0, 2, 10]
    assert topo[0] == {"cores": [0], "memory_bytes": 0}


def test_no_numa_information(tmp_path):
    assert numa_topology(tmp_path) is None
    (tmp_path / "devices/system/node").mkdir(parents=True)
    assert numa_topology(tmp_path) is None


def test_real_sysfs_if_present():
    topo = numa_topology()
    if topo is not None:
        assert all(info["cores"] for info in topo.values())


# -- CPU, memory, temperatures ------------------------------------------------------------------------------

Temp = namedtuple("Temp", "label current high critical")


def test_cpu_and_memory_are_sane():
    assert system_info.cpu_count() >= 1
    assert 0.0 <= system_info.cpu_percent() <= 100.0
    mem = system_info.memory_info()
    assert mem["memory_total_bytes"] > 0
    assert 0 <= mem["memory_used_bytes"] <= mem["memory_total_bytes"]
    assert 0.0 <= mem["memory_percent"] <= 100.0


def test_temperatures_prefer_cpu_sensors():
    sensors = {
        "nvme": [Temp("Composite", 70.0, None, None)],
        "coretemp": [Temp("Package id 0", 50.0, 80, 100), Temp("Core 0", 40.0, 80, 100)],
    }
    assert temperatures(lambda: sensors) == (45.0, 50.0)


def test_temperatures_fall_back_to_any_sensor_and_ignore_nonsense():
    sensors = {"acpi_x": [], "nvme": [Temp("Composite", 30.0, None, None), Temp("bogus", -273.0, None, None)]}
    assert temperatures(lambda: sensors) == (30.0, 30.0)


@pytest.mark.parametrize("sensors", [{}, {"coretemp": []}])
def test_no_temperature_sensors(sensors):
    assert temperatures(lambda: sensors) == (None, None)


def test_temperature_read_error_is_tolerated():
    def broken():
        raise OSError("permission denied")

    assert temperatures(broken) == (None, None)


def test_platform_without_sensors(monkeypatch):
    monkeypatch.delattr(system_info.psutil, "sensors_temperatures", raising=False)
    assert temperatures() == (None, None)


# -- GPUs ---------------------------------------------------------------------------------------------------


class NVMLError(Exception):
    pass


class FakeNvml:
    """The parts of pynvml that system_info uses, for two GPUs; GPU 1 is passively cooled."""

    NVML_CLOCK_GRAPHICS = 0
    NVML_CLOCK_MEM = 2
    NVML_TEMPERATURE_GPU = 0
    NVMLError = NVMLError

    def __init__(self, *, init_error: bool = False, count: int = 2):
        self.init_error = init_error
        self.count = count
        self.init_calls = 0
        self.shutdown_calls = 0

    def nvmlInit(self):
        self.init_calls += 1
        if self.init_error:
            raise NVMLError("Driver Not Loaded")

    def nvmlShutdown(self):
        self.shutdown_calls += 1

    def nvmlDeviceGetCount(self):
        return self.count

    def nvmlSystemGetDriverVersion(self):
        return b"550.54.15"  # old pynvml versions return bytes

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("handle", index)

    def nvmlDeviceGetName(self, handle):
        return ["NVIDIA GeForce RTX 4090", "NVIDIA A100-SXM4-80GB"][handle[1]]

    def nvmlDeviceGetPciInfo(self, handle):
        return SimpleNamespace(busId=f"00000000:{0x41 + handle[1]:02X}:00.0")

    def nvmlDeviceGetUtilizationRates(self, handle):
        return SimpleNamespace(gpu=87, memory=45)

    def nvmlDeviceGetClockInfo(self, handle, kind):
        return {self.NVML_CLOCK_GRAPHICS: 2520, self.NVML_CLOCK_MEM: 10501}[kind]

    def nvmlDeviceGetMemoryInfo(self, handle):
        mib = 1024 * 1024
        return SimpleNamespace(total=24564 * mib, used=1000 * mib + 5, free=23564 * mib)

    def nvmlDeviceGetTemperature(self, handle, sensor):
        assert sensor == self.NVML_TEMPERATURE_GPU
        return 61

    def nvmlDeviceGetFanSpeed(self, handle):
        if handle[1] == 1:
            raise NVMLError("Not Supported")
        return 30

    def nvmlDeviceGetPowerUsage(self, handle):
        return 350123

    def nvmlDeviceGetEnforcedPowerLimit(self, handle):
        return 450000


def test_gpu_fields_and_values():
    fake = FakeNvml()
    gpus = GpuMonitor(fake).query()
    assert [list(g) for g in gpus] == [list(GPU_FIELDS)] * 2
    assert gpus[0] == {
        "gpu_id": 0,
        "name": "NVIDIA GeForce RTX 4090",
        "driver_version": "550.54.15",
        "pci_bus_id": "00000000:41:00.0",
        "gpu_utilization": 87,
        "graphics_clock_mhz": 2520,
        "mem_utilization": 45,
        "mem_clock_mhz": 10501,
        "memory_total_mib": 24564,
        "memory_used_mib": 1000,
        "memory_free_mib": 23564,
        "temperature": 61,
        "fan_speed": 30,
        "power_usage_mw": 350123,
        "power_limit_mw": 450000,
    }
    assert gpus[1]["fan_speed"] == -1
    assert gpus[1]["gpu_id"] == 1
    assert gpus[1]["pci_bus_id"] == "00000000:42:00.0"


def test_nvml_initialised_once_and_shut_down_once():
    fake = FakeNvml()
    monitor = GpuMonitor(fake)
    monitor.query()
    monitor.query()
    assert fake.init_calls == 1
    monitor.close()
    monitor.close()
    assert fake.shutdown_calls == 1


def test_no_driver_gives_empty_list_and_retries_later():
    fake = FakeNvml(init_error=True)
    monitor = GpuMonitor(fake, retry_interval=3600)
    assert monitor.query() == []
    assert monitor.query() == []
    assert fake.init_calls == 1  # not hammered on every heartbeat
    monitor.close()
    assert fake.shutdown_calls == 0

    fake = FakeNvml(init_error=True)
    monitor = GpuMonitor(fake, retry_interval=0)
    assert monitor.query() == []
    fake.init_error = False  # the driver was loaded meanwhile
    assert len(monitor.query()) == 2


def test_missing_library_gives_empty_list(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pynvml(name, *args, **kwargs):
        if name == "pynvml":
            raise ImportError("No module named 'pynvml'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pynvml)
    assert GpuMonitor().query() == []


def test_every_call_failing_still_reports_each_gpu():
    class Broken(FakeNvml):
        def __getattribute__(self, name):
            if name.startswith("nvmlDeviceGet") and name not in ("nvmlDeviceGetCount",):

                def fail(*args):
                    raise NVMLError("GPU is lost")

                return fail
            return super().__getattribute__(name)

    gpus = GpuMonitor(Broken(count=1)).query()
    assert gpus == [
        {
            **dict.fromkeys(GPU_FIELDS, -1),
            "gpu_id": 0,
            "name": "",
            "pci_bus_id": "",
            "driver_version": "550.54.15",
        }
    ]


def test_this_machine_without_gpu_reports_a_list():
    # The real NVML: [] on a machine without the driver, one dict per GPU otherwise.
    assert all(set(g) == set(GPU_FIELDS) for g in system_info.gpu_info())


def test_resource_snapshot_has_heartbeat_fields():
    snap = system_info.resource_snapshot(GpuMonitor(FakeNvml(count=1)))
    assert set(snap) == {
        "cpu_percent",
        "memory_percent",
        "memory_used_bytes",
        "memory_total_bytes",
        "current_avg_temp",
        "current_max_temp",
        "gpu_info",
    }
    assert len(snap["gpu_info"]) == 1
