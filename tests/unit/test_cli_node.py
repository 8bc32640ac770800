"""``kr node list`` / ``kr node status``: tables, JSON passthrough, errors."""

from __future__ import annotations

import datetime as dt
import json

from kohakuriver_cli.node_cmd import compress_ids, cores_text, gpus_text, memory_text, vm_text

from . import test_cli_client
from .test_cli_client import assert_one_line_error, error_reply

# the shared fixtures: an isolated ~/.kohakuriver (autouse) and a FakeHost
kr_home = test_cli_client.kr_home
host = test_cli_client.host

GIB = 1 << 30


def node(hostname: str = "gpu1", **fields) -> dict:
    data = {
        "hostname": hostname,
        "url": f"http://{hostname}:8001",
        "status": "online",
        "total_cores": 32,
        "memory_total_bytes": 128 * GIB,
        "last_heartbeat": (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=3)).isoformat(),
        "numa_topology": {
            "0": {"cores": list(range(16)), "memory_bytes": 64 * GIB},
            "1": {"cores": list(range(16, 32)), "memory_bytes": 64 * GIB},
        },
        "gpu_info": [
            {
                "gpu_id": 0,
                "name": "NVIDIA A100",
                "gpu_utilization": 87,
                "memory_total_mib": 40960,
                "memory_used_mib": 20480,
                "temperature": 61,
                "power_usage_mw": 250000,
                "power_limit_mw": 400000,
            },
            {
                "gpu_id": 1,
                "name": "NVIDIA A100",
                "gpu_utilization": -1,
                "memory_total_mib": -1,
                "memory_used_mib": -1,
                "temperature": -1,
                "power_usage_mw": -1,
                "power_limit_mw": -1,
            },
        ],
        "runner_version": "0.1.0",
        "docker_available": True,
        "docker_error": None,
        "vm_capable": False,
        "cpu_percent": 12.5,
        "memory_percent": 20.0,
        "memory_used_bytes": 25 * GIB,
        "cores_in_use": 8,
        "available_cores": 24,
        "memory_reserved_bytes": 16 * GIB,
        "gpus_in_use": [0],
        "running_task_count": 2,
    }
    data.update(fields)
    return data


def test_summaries():
    record = node()
    assert cores_text(record) == "8/32"
    assert memory_text(record) == "16 GiB / 128 GiB"
    assert gpus_text(record) == "1/2"
    assert gpus_text(node(gpu_info=[])) == "-"
    assert cores_text({}) == "-"


def test_compress_ids():
    assert compress_ids([0, 1, 2, 3, 8, 10, 11]) == "0-3,8,10-11"
    assert compress_ids([5]) == "5"
    assert compress_ids([]) == "-"
    assert compress_ids([3, 1, 2, 2]) == "1-3"


def test_node_list_table(host):
    host.on(
        "GET", "/api/nodes", [node(), node("cpu1", status="offline", docker_available=False, gpu_info=[])]
    )
    result = host.invoke("node", "list")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "HOSTNAME",
        "STATUS",
        "CORES",
        "MEMORY",
        "CPU",
        "GPUS",
        "TASKS",
        "DOCKER",
        "VM",
        "HEARTBEAT",
    ]
    gpu1 = next(line for line in lines if line.startswith("gpu1"))
    for fragment in ("online", "8/32", "16 GiB / 128 GiB", "1/2", "ok", "s ago"):
        assert fragment in gpu1, (fragment, gpu1)
    cpu1 = next(line for line in lines if line.startswith("cpu1"))
    assert "offline" in cpu1 and "DOWN" in cpu1


def test_node_list_json_verbatim(host):
    nodes = [node()]
    host.on("GET", "/api/nodes", nodes)
    result = host.invoke("node", "list", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == nodes


def test_node_list_empty(host):
    host.on("GET", "/api/nodes", {"nodes": []})
    result = host.invoke("node", "list")
    assert "(no nodes registered)" in result.stdout


def test_node_status_details(host):
    host.on("GET", "/api/nodes/gpu1", node())
    result = host.invoke("node", "status", "gpu1")
    assert result.exit_code == 0, result.output
    out = result.stdout
    expected = ["node gpu1", "http://gpu1:8001", "8/32 in use (free 24)", "12.5%", "0-15", "16-31", "64 GiB"]
    expected += ["NVIDIA A100", "in use", "free", "87%", "20 GiB / 40 GiB", "61 °C", "250 W / 400 W"]
    for fragment in expected:
        assert fragment in out, (fragment, out)


def test_node_status_docker_down_shows_why(host):
    host.on("GET", "/api/nodes/cpu1", node("cpu1", docker_available=False, docker_error="socket\nmissing"))
    result = host.invoke("node", "status", "cpu1")
    assert "DOWN: socket\\nmissing" in result.stdout


def test_node_status_json(host):
    host.on("GET", "/api/nodes/gpu1", node())
    result = host.invoke("node", "status", "gpu1", "--json")
    assert json.loads(result.stdout) == node() | {
        "last_heartbeat": json.loads(result.stdout)["last_heartbeat"]
    }


def test_node_status_unknown_is_exit_3(host):
    host.on("GET", "/api/nodes/nope", error_reply(404, "not_found", "unknown node 'nope'"))
    assert_one_line_error(host.invoke("node", "status", "nope"), 3, "unknown node")


def test_node_status_bad_hostname_is_usage_error(host):
    result = host.invoke("node", "status", "../api/tasks")
    assert result.exit_code == 2
    assert host.requests == []


# -- VMs -----------------------------------------------------------------------------------------------------

TCG_REASON = "/dev/kvm is kvm_pvm's (no kvm_intel or kvm_amd loaded): stock guests hang under it, so TCG"


def vm_facts(**fields) -> dict:
    data = {
        "capable": True,
        "accel": "tcg",
        "reason": TCG_REASON,
        "qemu_version": "10.0.2 (Debian 1:10.0.2+ds-1~bpo12+1)",
        "qemu_img_version": "10.0.2",
        "ovmf_version": "2022.11-6+deb12u2",
        "images": [
            {
                "name": "debian-12",
                "virtual_size_bytes": 2 * GIB,
                "file_size_bytes": 700 << 20,
                "format": "qcow2",
                "direct_boot": True,
                "firmware": "bios",
            }
        ],
        "vfio_gpus": [
            {"gpu_id": 0, "address": "0000:01:00.0", "iommu_group": 14, "driver": "nvidia", "viable": True},
            {
                "gpu_id": 1,
                "address": "0000:02:00.0",
                "iommu_group": 15,
                "driver": "nvidia",
                "viable": False,
                "problems": ["IOMMU group 15 also holds 0000:02:00.2 (USB controller)"],
            },
        ],
        "default_memory_mb": 4096,
    }
    data.update(fields)
    return data


def test_vm_column():
    assert vm_text(node(vm_capable=True, vm=vm_facts())) == "tcg"
    assert vm_text(node(vm_capable=True, vm=vm_facts(accel="kvm"))) == "kvm"
    assert vm_text(node(vm=vm_facts(capable=False, accel=None))) == "-"
    assert vm_text(node()) == "-"
    assert vm_text(node(vm_capable=True)) == "yes"  # an older runner: the flag without facts


def test_node_list_shows_the_accelerator(host):
    host.on("GET", "/api/nodes", [node(vm_capable=True, vm=vm_facts()), node("cpu1")])
    lines = host.invoke("node", "list").stdout.splitlines()
    assert next(line for line in lines if line.startswith("gpu1")).split()[-3] == "tcg"
    assert next(line for line in lines if line.startswith("cpu1")).split()[-3] == "-"


def test_node_status_vm_section(host):
    host.on("GET", "/api/nodes/gpu1", node(vm_capable=True, vm=vm_facts()))
    result = host.invoke("node", "status", "gpu1", COLUMNS="250")
    assert result.exit_code == 0, result.output
    out = result.stdout
    for fragment in (
        "Accelerator",
        "tcg",
        "kvm_pvm",
        "so TCG",
        "10.0.2 (Debian",
        "2022.11-6+deb12u2",
        "4 GiB",  # the default memory
        "debian-12",
        "2 GiB",
        "700 MiB",
        "direct",
        "0000:01:00.0",
        "14",
        "in use",  # GPU 0 is in gpus_in_use
        "no: IOMMU group 15 also holds 0000:02:00.2 (USB controller)",
    ):
        assert fragment in out, (fragment, out)


def test_node_status_without_vms_says_why(host):
    reason = "qemu-system-x86_64 not found (install qemu-system-x86)"
    facts = vm_facts(capable=False, accel=None, reason=reason, qemu_version=None, images=[], vfio_gpus=[])
    host.on("GET", "/api/nodes/cpu1", node("cpu1", vm=facts))
    out = host.invoke("node", "status", "cpu1", COLUMNS="250").stdout
    assert "qemu-system-x86_64 not found" in out and "not found" in out and "VM IMAGE" not in out
    host.on("GET", "/api/nodes/old", node("old"))
    out = host.invoke("node", "status", "old").stdout
    assert "the runner reports no VM support" in out
