"""A VM VPS on the overlay: a QEMU VM on one runner and a container on another reach each other by overlay
address, across VXLAN through the host (hub mode), as two containers do (tests/e2e/test_overlay.py, whose
namespaces-as-machines cluster this reuses, with the VM settings of tests/e2e/test_vm_vps.py).

The VM's TAP joins the runner's overlay bridge, its address comes from the half of the runner's subnet that
Docker never picks from, and its seed gives it the overlay's gateway (where its agent finds the runner).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shlex
import signal
from pathlib import Path

import pytest

from tests.need import need

from .cluster import wait_until
from .forwarding import docker_exec
from .test_overlay import SERVER_PORT, SERVER_TASK, overlay_cluster
from .test_vm_vps import IMAGE_NAME, image_dir
from .test_vps import VpsCluster, _text

pytestmark = [pytest.mark.slow, pytest.mark.docker, pytest.mark.vm]


def _qemu_pids(instances: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (entry / "cmdline").read_bytes()
                if b"qemu-system" in argv and str(instances).encode() in argv:
                    pids.append(int(entry.name))
    return pids


def test_a_vm_and_a_container_on_two_nodes_reach_each_other(tmp_path, test_image) -> None:
    need(os.geteuid() == 0, "VMs and the overlay need root")
    images = image_dir(tmp_path)
    instances = tmp_path / "instances"
    vm_settings = {
        "VM_IMAGES_DIR": str(images),
        "VM_INSTANCES_DIR": str(instances),
        "VM_DEFAULT_MEMORY_MB": 1024,
    }
    try:
        with overlay_cluster(tmp_path / "oc", "hub", **vm_settings) as oc:
            cluster = oc.cluster
            vc = VpsCluster(cluster, tmp_path)
            server_task = oc.submit(1, "sh", "-c", SERVER_TASK)
            server_ip = cluster.task(server_task)["overlay_ip"]

            created = vc.kr(
                "vps", "create", "--backend", "qemu", "--vm-image", IMAGE_NAME, "--disk", "4G", "-c", "2",
                "-t", oc.runners[0].name, "--gen-ssh-key", "--wait", timeout=600,
            )  # fmt: skip
            vm = created.stdout.decode().split()[0]
            record = cluster.task(vm)
            subnet = oc.subnet_of(0)
            vm_ip = ipaddress.IPv4Address(record["overlay_ip"])
            assert record["vm_ip"] == str(vm_ip), record
            assert vm_ip in subnet and int(vm_ip) >= int(subnet.network_address) + subnet.num_addresses // 2
            vc.wait_ssh(vm, timeout=60)

            # the VM fetches the page of the container on the other node
            fetch = (
                "import urllib.request as u;"
                f"print(u.urlopen('http://{server_ip}:{SERVER_PORT}/', timeout=10).read().decode(), end='')"
            )
            command = f"python3 -c {shlex.quote(fetch)}"  # ssh hands the remote shell one string
            wait_until(
                lambda: vc.kr_ssh(vm, command).stdout == b"from-server\n",
                60,
                lambda: f"the VM to fetch from {server_ip}: {_text(vc.kr_ssh(vm, command))}",
            )
            # the container on the other node reaches the VM's sshd by its overlay address
            banner = docker_exec(server_task, "sh", "-c", f"echo | nc -w 5 {vm_ip} 22", timeout=30)
            assert banner.startswith("SSH-2.0-"), banner
            # the guest's agent found the runner through the overlay gateway: kr forward works
            health = wait_until(
                lambda: (cluster.task(vm).get("vm_health") or {}).get("agent") == "healthy", 120, "agent"
            )
            assert health
    finally:
        for pid in _qemu_pids(instances):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
