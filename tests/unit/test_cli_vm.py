"""``kr vm images`` / ``kr vm instances [remove]``: tables, the node filter, JSON passthrough, errors
(``FakeHost``, no server)."""

from __future__ import annotations

import json

from . import test_cli_client
from .test_cli_client import assert_one_line_error, error_reply

kr_home = test_cli_client.kr_home
host = test_cli_client.host

GIB = 1 << 30


def image(node: str = "vm1", name: str = "debian-12", **fields) -> dict:
    data = {
        "node": node,
        "node_status": "online",
        "vm_capable": True,
        "name": name,
        "virtual_size_bytes": 2 * GIB,
        "file_size_bytes": 700 << 20,
        "format": "qcow2",
        "direct_boot": True,
        "firmware": "bios",
    }
    data.update(fields)
    return data


def instance(task_id: str, *, orphan: bool = False, running: bool = False, **fields) -> dict:
    data = {
        "node": "vm1",
        "task_id": task_id,
        "path": f"/srv/vm-instances/{task_id}",
        "disk_bytes": 3 * GIB,
        "running": running,
        "pid": 4242 if running else None,
        "tap": "kr-tap3" if running else None,
        "status": None if orphan else "running",
        "orphan": orphan,
    }
    data.update(fields)
    return data


def rows(stdout: str) -> dict[str, str]:
    return {line.split()[0] + " " + line.split()[1]: line for line in stdout.splitlines()[1:] if line.strip()}


def test_images_table(host):
    images = [
        image(),
        image(name="alpine", direct_boot=False, firmware="uefi"),
        image("vm2", vm_capable=False),
    ]
    host.on("GET", "/api/vm/images", {"images": images})
    result = host.invoke("vm", "images", COLUMNS="200")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NODE", "IMAGE", "SIZE", "FILE", "FORMAT", "BOOT", "FIRMWARE"]
    debian = next(line for line in lines if "debian-12" in line and line.startswith("vm1"))
    for fragment in ("2 GiB", "700 MiB", "qcow2", "direct", "bios"):
        assert fragment in debian, (fragment, debian)
    alpine = next(line for line in lines if "alpine" in line)
    assert "disk" in alpine and "uefi" in alpine
    assert "(no VMs)" in next(line for line in lines if line.startswith("vm2"))
    assert "node" not in host.calls("GET", "/api/vm/images")[0].url.params


def test_images_of_one_node_and_json(host):
    host.on("GET", "/api/vm/images", {"images": [image()]})
    result = host.invoke("vm", "images", "-n", "vm1", "--json")
    assert json.loads(result.stdout) == {"images": [image()]}
    assert host.calls("GET", "/api/vm/images")[0].url.params["node"] == "vm1"
    host.on("GET", "/api/vm/images", {"images": []})
    assert "(no VM images)" in host.invoke("vm", "images").stdout
    host.on("GET", "/api/vm/images", error_reply(404, "not_found", "no node 'nope'"))
    assert_one_line_error(host.invoke("vm", "images", "-n", "nope"), 3, "no node 'nope'")
    result = host.invoke("vm", "images", "-n", "../x")
    assert result.exit_code == 2 and len(host.calls("GET", "/api/vm/images")) == 3


def test_instances_table_with_orphans(host):
    answer = {
        "instances": [instance("7301", running=True), instance("99", orphan=True)],
        "unreachable": [{"node": "vm2", "message": "timed out"}],
    }
    host.on("GET", "/api/vm/instances", answer)
    result = host.invoke("vm", "instances", COLUMNS="200")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NODE", "TASK", "STATUS", "RUNNING", "PID", "TAP", "DISK", "ORPHAN"]
    table = rows(result.stdout)
    assert table["vm1 7301"].split() == ["vm1", "7301", "running", "yes", "4242", "kr-tap3", "3", "GiB", "no"]
    assert table["vm1 99"].split() == ["vm1", "99", "-", "no", "-", "-", "3", "GiB", "yes"]
    assert "warning: node vm2 did not answer: timed out" in result.stderr
    result = host.invoke("vm", "instances", "-n", "vm1", "--json")
    assert json.loads(result.stdout) == answer
    assert host.calls("GET", "/api/vm/instances")[-1].url.params["node"] == "vm1"
    host.on("GET", "/api/vm/instances", error_reply(403, "forbidden", "this needs role operator"))
    assert_one_line_error(host.invoke("vm", "instances"), 4, "operator")


def test_remove_an_instance(host):
    path = "/api/vm/instances/vm1/99"
    host.on("DELETE", path, {"node": "vm1", "task_id": "99", "removed": True})
    result = host.invoke("vm", "instances", "remove", "vm1", "99")
    assert result.exit_code == 0, result.output
    assert "VM instance 99 removed from vm1" in result.stderr and len(host.calls("DELETE", path)) == 1
    assert host.calls("GET", "/api/vm/instances") == []  # the group's listing did not run
    host.on("DELETE", path, error_reply(409, "conflict", "VPS 99 is running on vm1: stop it"))
    assert_one_line_error(host.invoke("vm", "instances", "remove", "vm1", "99"), 1, "stop it")
    for args in (["vm1", "abc"], ["../x", "99"], ["vm1"]):
        assert host.invoke("vm", "instances", "remove", *args).exit_code == 2
    assert len(host.calls("DELETE", path)) == 2
