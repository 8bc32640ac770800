"""Node facts: NUMA from a fake sysfs tree (or a numactl stand-in), GPUs from a fake pynvml module,
temperatures from fake sensors."""

from __future__ import annotations

from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kohakuriver_runner import system_info
from kohakuriver_runner.config import runner_config_from
from kohakuriver_runner.monitor import detect_numa_topology
from kohakuriver_runner.system_info import (
    GPU_FIELDS,
    GpuMonitor,
    numa_topology,
    parse_cpulist,
    parse_numactl_hardware,
    temperatures,
)

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


NUMACTL_TWO_NODES = """available: 3 nodes (0-2)
node 0 cpus: 0 1 2 3 8 9 10 11
node 0 size: 16384 MB
node 0 free: 9000 MB
node 1 cpus: 4 5 6 7 12 13 14 15
node 1 size: 8192 MB
node 1 free: 100 MB
node 2 cpus:
node 2 size: 65536 MB
node 2 free: 65536 MB
node distances:
node   0   1   2
  0:  10  21  30
  1:  21  10  30
  2:  30  30  10
"""


def test_numactl_hardware_output():
    assert parse_numactl_hardware(NUMACTL_TWO_NODES) == {
        0: {"cores": [0, 1, 2, 3, 8, 9, 10, 11], "memory_bytes": 16 * 1024**3},
        1: {"cores": [4, 5, 6, 7, 12, 13, 14, 15], "memory_bytes": 8 * 1024**3},
    }  # node 2 has memory only: nothing to pin to, as with sysfs
    assert parse_numactl_hardware("No NUMA available on this system\n") is None
    assert parse_numactl_hardware("") is None


@given(
    st.dictionaries(
        st.integers(0, 1023),
        st.tuples(st.lists(st.integers(0, 4095), min_size=1, max_size=20), st.integers(0, 1 << 24)),
        max_size=8,
    )
)
def test_numactl_output_round_trip(nodes):
    lines = [f"available: {len(nodes)} nodes"]
    for node, (cpus, mib) in nodes.items():
        lines += [
            f"node {node} cpus: {' '.join(map(str, cpus))}",
            f"node {node} size: {mib} MB",
            f"node {node} free: 0 MB",
        ]
    expected = {
        node: {"cores": sorted(set(cpus)), "memory_bytes": mib * 1024 * 1024}
        for node, (cpus, mib) in nodes.items()
    }
    assert parse_numactl_hardware("\n".join(lines) + "\n") == (dict(sorted(expected.items())) or None)


def fake_numactl(tmp_path: Path, output: str, status: int = 0) -> Path:
    """A real executable that answers ``--hardware`` like numactl (and records its arguments)."""
    (tmp_path / "output.txt").write_text(output)
    script = tmp_path / "numactl"
    script.write_text(
        f'#!/bin/sh\necho "$@" > "{tmp_path}/args.txt"\ncat "{tmp_path}/output.txt"\nexit {status}\n'
    )
    script.chmod(0o755)
    return script


async def test_numa_layout_falls_back_to_numactl_without_sysfs(tmp_path):
    numactl = fake_numactl(tmp_path, NUMACTL_TWO_NODES)
    config = runner_config_from(NUMACTL_PATH=str(numactl))
    sysfs = tmp_path / "sys"
    topology = await detect_numa_topology(config, sysfs)
    assert topology == parse_numactl_hardware(NUMACTL_TWO_NODES)
    assert (tmp_path / "args.txt").read_text() == "--hardware\n"
    # sysfs, where it has the layout, wins: numactl is not asked at all.
    make_node(sysfs, 0, "0-1", 1024)
    (tmp_path / "args.txt").unlink()
    assert await detect_numa_topology(config, sysfs) == {0: {"cores": [0, 1], "memory_bytes": 1024 * 1024}}
    assert not (tmp_path / "args.txt").exists()


async def test_numa_layout_without_numactl_or_numa(tmp_path):
    sysfs = tmp_path / "sys"
    missing = runner_config_from(NUMACTL_PATH=str(tmp_path / "no-such-numactl"))
    assert missing.find_numactl() is None
    assert await detect_numa_topology(missing, sysfs) is None
    (tmp_path / "not-executable").write_text("")
    assert runner_config_from(NUMACTL_PATH=str(tmp_path / "not-executable")).find_numactl() is None
    no_numa = runner_config_from(
        NUMACTL_PATH=str(fake_numactl(tmp_path, "No NUMA available on this system\n", 1))
    )
    assert await detect_numa_topology(no_numa, sysfs) is None


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
