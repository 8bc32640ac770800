"""The host's side of VM VPS against a real ``serve_host`` and a stand-in for the runner's HTTP API: node VM
facts from registration and heartbeats, every refusal of a VM create (each a 4xx naming the field, nothing
stored), what the dispatch carries, placement by capability and image, GPUs shared with containers, restart
on the VM's node, the agent's health in status updates, the image list, the instance list with orphans and
its removal, and snapshot restore passed on to the node."""

from __future__ import annotations

import json
from typing import Any

import attrs
import pytest
import trio
from quart import Response, request
from quart_trio import QuartTrio

from kohakuriver_proto.converter import structure
from kohakuriver_proto.models import NodeInfo

from ._host_harness import closed_port_url, executed, fake_runner, host_config, quick_host, running_host
from .test_host_vps import VpsRunner, assert_error, create, public_key

GiB = 1 << 30
MiB = 1 << 20


def image(name: str = "debian-12", size: int = 2 * GiB, **fields: Any) -> dict[str, Any]:
    return {"name": name, "virtual_size_bytes": size, "file_size_bytes": size // 4, **fields}


def gpu(gpu_id: int, *, viable: bool = True, problems=(), group: int | None = None, mates=()) -> dict:
    return {
        "gpu_id": gpu_id,
        "address": f"0000:0{gpu_id + 1}:00.0",
        "iommu_group": gpu_id + 10 if group is None else group,
        "driver": "vfio-pci",
        "viable": viable,
        "problems": list(problems),
        "group_gpus": [f"0000:0{m + 1}:00.0" for m in mates],
    }


def vm_facts(*, capable: bool = True, images=None, gpus=(), reason: str | None = None, **more) -> dict:
    return {
        "capable": capable,
        "accel": "tcg" if capable else None,
        "reason": reason
        if reason is not None
        else ("KVM is unusable here (kvm_pvm, no kvm_intel/kvm_amd): TCG" if capable else "QEMU is missing"),
        "qemu_version": "10.0.2" if capable else None,
        "qemu_img_version": "10.0.2" if capable else None,
        "ovmf_version": "2025.02-3",
        "images": [image()] if images is None else images,
        "vfio_gpus": list(gpus),
        **more,
    }


@attrs.define
class VmRunner(VpsRunner):
    """``VpsRunner`` plus the runner's VM routes: its instance list, their removal and snapshot restore.
    ``restore_code`` / ``remove_code``: what those answer (200 or the error status)."""

    instances: list[dict[str, Any]] = attrs.field(factory=list)
    removed: list[str] = attrs.field(factory=list)
    remove_code: int = 200
    restores: list[tuple[str, str]] = attrs.field(factory=list)
    restore_code: int = 200

    def app(self) -> QuartTrio:
        app = super().app()

        def reply(data: Any, status: int = 200) -> Response:
            return Response(json.dumps(data), status, content_type="application/json")

        def authorized() -> bool:
            if request.headers.get("Authorization") != f"Bearer {self.cluster_token}":
                self.bad_auth += 1
                return False
            return True

        @app.get("/api/vm/instances")
        async def instances() -> Response:
            if not authorized():
                return reply({"error": "unauthorized", "message": "cluster token needed"}, 401)
            return reply({"instances": self.instances})

        @app.delete("/api/vm/instances/<task_id>")
        async def remove(task_id: str) -> Response:
            if not authorized():
                return reply({"error": "unauthorized", "message": "cluster token needed"}, 401)
            self.removed.append(task_id)
            if self.remove_code != 200:
                return reply({"error": "x", "message": f"cannot remove {task_id} now"}, self.remove_code)
            if not any(i["task_id"] == task_id for i in self.instances):
                return reply({"error": "not_found", "message": f"no instance {task_id}"}, 404)
            self.instances = [i for i in self.instances if i["task_id"] != task_id]
            return reply({"removed": task_id})

        @app.post("/api/vps/<task_id>/snapshots/<timestamp>/restore")
        async def restore(task_id: str, timestamp: str) -> Response:
            if not authorized():
                return reply({"error": "unauthorized", "message": "cluster token needed"}, 401)
            self.restores.append((task_id, timestamp))
            if self.restore_code != 200:
                words = {404: "no snapshot", 409: "the VM is busy", 501: "restore needs a stopped VM"}
                return reply({"error": "x", "message": words[self.restore_code]}, self.restore_code)
            return reply({"message": f"VM {task_id} restored to {timestamp}"})

        return app


@pytest.fixture
async def host(tmp_path, monkeypatch):
    async with quick_host(tmp_path, monkeypatch) as h:
        yield h


@pytest.fixture
async def runner(host):
    async with fake_runner(host.cluster_token, VmRunner) as r:
        yield r


async def vm_create(host, token: str | None = "admin", **spec: Any):
    spec.setdefault("vps_backend", "qemu")
    spec.setdefault("ssh_key_mode", "none")
    return await host.call("POST", "/api/vps/create", token, json=spec)


async def running_vm(host, runner, token: str | None = "admin", **spec: Any) -> str:
    before = len(runner.executed)
    spec.setdefault("target", "vm1")
    r = await vm_create(host, token, vm_image="debian-12", **spec)
    assert r.status_code == 202, r.text
    vm_id = r.json()["task_id"]
    await executed(runner, before + 1)
    assert await host.update(vm_id, "running", ssh_port=2222, vm_ip="10.201.0.5") == {"accepted": True}
    return vm_id


# -- node facts --------------------------------------------------------------------------------------------


async def test_vm_facts_come_from_registration_and_heartbeats(host, runner):
    facts = vm_facts(gpus=[gpu(0)], default_memory_mb=2048)
    await host.register("vm1", runner.url, vm=facts)
    await host.register("plain", runner.url)
    nodes = {n["hostname"]: n for n in await host.ok("GET", "/api/nodes")}
    assert nodes["vm1"]["vm_capable"] is True and nodes["vm1"]["vm"]["accel"] == "tcg"
    assert nodes["plain"]["vm_capable"] is False and nodes["plain"]["vm"] is None
    info = structure(nodes["vm1"], NodeInfo)
    assert info.vm.images[0].name == "debian-12" and info.vm.vfio_gpus[0].viable
    assert info.vm.default_memory_mb == 2048 and "TCG" in info.vm.reason

    # A heartbeat's facts win (an image was added); one without facts keeps the registration's.
    newer = vm_facts(images=[image(), image("ubuntu-24.04", 3 * GiB)])
    assert (await host.heartbeat("vm1", vm=newer)).status_code == 200
    node = await host.ok("GET", "/api/nodes/vm1")
    assert [i["name"] for i in node["vm"]["images"]] == ["debian-12", "ubuntu-24.04"]
    assert (await host.heartbeat("vm1")).status_code == 200
    node = await host.ok("GET", "/api/nodes/vm1")
    assert [i["name"] for i in node["vm"]["images"]] == ["debian-12"] and node["vm_capable"] is True
    # The facts a heartbeat brings are used for placement at once: the new image can be asked for.
    await host.heartbeat("vm1", vm=newer)
    r = await vm_create(host, target="vm1", vm_image="ubuntu-24.04")
    assert r.status_code == 202, r.text


async def test_images_are_listed_from_the_node_facts(host, runner):
    await host.register("vm1", runner.url, vm=vm_facts(images=[image("b-img", direct_boot=True), image()]))
    await host.register("vm2", runner.url, vm=vm_facts(capable=False, images=[image("old", firmware="uefi")]))
    await host.register("plain", runner.url)
    viewer = await host.create_user("vic", "viewer")
    listed = (await host.ok("GET", "/api/vm/images", viewer))["images"]
    assert [(i["node"], i["name"]) for i in listed] == [
        ("vm1", "b-img"),
        ("vm1", "debian-12"),
        ("vm2", "old"),
    ]
    first = listed[0]
    assert first["direct_boot"] is True and first["virtual_size_bytes"] == 2 * GiB
    assert first["vm_capable"] is True and first["node_status"] == "online" and first["format"] == "qcow2"
    assert listed[2]["vm_capable"] is False and listed[2]["firmware"] == "uefi"
    one = (await host.ok("GET", "/api/vm/images?node=vm2", viewer))["images"]
    assert [i["name"] for i in one] == ["old"]
    assert (await host.ok("GET", "/api/vm/images?node=plain"))["images"] == []
    assert_error(await host.call("GET", "/api/vm/images?node=nope"), 404)
    assert_error(await host.call("GET", "/api/vm/images?node=a/b"), 400, "node")
    assert_error(await host.call("GET", "/api/vm/images", None), 401)
    assert runner.vps_calls == [] and runner.bad_auth == 0  # no runner was asked


# -- create: refusals --------------------------------------------------------------------------------------


async def test_every_refusal_names_its_field_and_stores_nothing(host, runner):
    gpus = [
        gpu(0),
        gpu(1, viable=False, problems=["IOMMU group 11 also holds 0000:02:00.1 (USB controller)"]),
        gpu(2, group=20, mates=[3]),
        gpu(3, group=20, mates=[2]),
    ]
    await host.register("vm1", runner.url, vm=vm_facts(gpus=gpus, images=[image(size=8 * GiB)]))
    await host.register("novm", runner.url, vm=vm_facts(capable=False, reason="qemu-system-x86_64 not found"))
    await host.register("plain", runner.url)
    alice = await host.create_user("alice")

    async def refused(status: int, field: str, *words: str, **spec: Any) -> None:
        body = assert_error(await vm_create(host, alice, **spec), status, field)
        for word in words:
            assert word in body["message"], body

    await refused(422, "vm_image", "required", target="vm1")
    await refused(422, "target", "unknown node", target="ghost", vm_image="debian-12")
    await refused(422, "target", "qemu-system-x86_64 not found", target="novm", vm_image="debian-12")
    await refused(422, "target", "reports no VM support", target="plain", vm_image="debian-12")
    await refused(422, "vm_image", "no VM image 'ubuntu'", "debian-12", target="vm1", vm_image="ubuntu")
    await refused(422, "vm_image", "no node has VM image 'ubuntu'", "vm1: debian-12", vm_image="ubuntu")
    await refused(
        422,
        "vm_disk_size",
        "4G (4 GiB)",
        "8 GiB on vm1",
        target="vm1",
        vm_image="debian-12",
        vm_disk_size="4G",
    )
    await refused(422, "vm_disk_size", "8 GiB", vm_image="debian-12", vm_disk_size="1G")  # untargeted too
    await refused(422, "required_gpus", "no GPU 7", target="vm1", vm_image="debian-12", required_gpus=[7])
    await refused(
        422, "required_gpus", "USB controller", target="vm1", vm_image="debian-12", required_gpus=[1]
    )
    await refused(
        422,
        "required_gpus",
        "GPU 2 shares IOMMU group 20 with GPU 3",
        target="vm1",
        vm_image="debian-12",
        required_gpus=[2],
    )
    await refused(
        422,
        "ssh_public_key",
        target="vm1",
        vm_image="debian-12",
        ssh_key_mode="upload",
        ssh_public_key="ssh-ed25519 AAAA",
    )
    await refused(422, "ssh_public_key", target="vm1", vm_image="debian-12", ssh_key_mode="generate")
    await refused(
        422, "registry_image", "only for vps_backend 'docker'", vm_image="debian-12", registry_image="x"
    )
    await refused(422, "required_memory_bytes", "memory_mb", vm_image="debian-12", required_memory_bytes=GiB)
    await refused(422, "memory_mb", vm_image="debian-12", memory_mb=8)
    await refused(422, "vm_disk_size", vm_image="debian-12", vm_disk_size="lots")
    # Docker-only fields on a VM and VM fields on a container are named too.
    body = assert_error(
        await host.call("POST", "/api/vps/create", alice, json={"vm_image": "debian-12"}), 422
    )
    assert body["field"] == "vm_image" and "qemu" in body["message"]
    # What no node can ever run is still refused by the scheduler's check (400 naming the target).
    await refused(400, "target", "cores", target="vm1", vm_image="debian-12", required_cores=64)
    assert (await host.ok("GET", "/api/vps?all=1"))["vps"] == [] and runner.executed == []


async def test_no_vm_node_at_all_and_offline_nodes(tmp_path, monkeypatch):
    monkeypatch.setenv("KOHAKURIVER_HOME", str(tmp_path))
    config = host_config(
        tmp_path, HEARTBEAT_INTERVAL_SECONDS=1, HEARTBEAT_TIMEOUT_FACTOR=2, CLEANUP_CHECK_INTERVAL_SECONDS=1
    )
    async with running_host(tmp_path, config) as host, fake_runner(host.cluster_token, VmRunner) as runner:
        await host.register("novm", runner.url, vm=vm_facts(capable=False, reason="no qemu-img"))
        body = assert_error(await vm_create(host, vm_image="debian-12"), 422, "vps_backend")
        assert "novm: no qemu-img" in body["message"]
        await host.register("vm1", runner.url, vm=vm_facts())

        async def offline() -> bool:
            return (await host.ok("GET", "/api/nodes/vm1"))["status"] == "offline"

        with trio.fail_after(10):
            while not await offline():
                await host.heartbeat("novm")
                await trio.sleep(0.2)
        body = assert_error(await vm_create(host, target="vm1", vm_image="debian-12"), 409, "target")
        assert "offline" in body["message"]
        body = assert_error(await vm_create(host, vm_image="debian-12"), 409, "vm_image")
        assert "vm1" in body["message"]
        assert (await host.ok("GET", "/api/vps?all=1"))["vps"] == []


async def test_a_gpu_is_never_given_to_a_container_and_a_vm_at_once(host, runner):
    await host.register("vm1", runner.url, gpus=(0, 1), vm=vm_facts(gpus=[gpu(0), gpu(1)]))
    container = await create(host, target="vm1::0", ssh_key_mode="none")
    await executed(runner)
    await host.wait_status(container, "assigning")
    body = assert_error(await vm_create(host, target="vm1", vm_image="debian-12", required_gpus=[0]), 409)
    assert body["field"] == "required_gpus" and "GPU 0 of node vm1 is in use" in body["message"]
    assert "free for a VM: 1" in body["message"]
    vm_id = await running_vm(host, runner, required_gpus=[1])
    assert runner.executed[-1]["gpu_ids"] == [1]
    # A container asking for the VM's GPU waits in the queue (the scheduler counts both alike).
    waiting = await create(host, target="vm1::1", ssh_key_mode="none")
    await trio.sleep(0.5)
    record = await host.task(waiting)
    assert record["status"] == "pending" and "GPU 1 (in use)" in record["status_message"]
    assert (await host.ok("GET", "/api/nodes/vm1"))["gpus_in_use"] == [0, 1]
    await host.ok("POST", f"/api/vps/{vm_id}/stop")
    await host.wait_status(waiting, "assigning")


# -- create: dispatch and placement ------------------------------------------------------------------------


async def test_dispatch_carries_the_vm_fields_and_memory_is_reserved(host, runner):
    await host.register("vm1", runner.url, cores=8, memory=16 * GiB, vm=vm_facts(default_memory_mb=2048))
    key = public_key()
    r = await vm_create(
        host,
        target="vm1",
        vm_image="debian-12",
        vm_disk_size="20G",
        memory_mb=3072,
        required_cores=2,
        ssh_key_mode="upload",
        ssh_public_key=key,
        name="vm box",
    )
    assert r.status_code == 202, r.text
    assert "debian-12" in r.json()["message"] and "3072 MiB" in r.json()["message"]
    vm_id = r.json()["task_id"]
    (sent,) = await executed(runner)
    assert sent["task_type"] == "vps" and sent["vps_backend"] == "qemu" and sent["vm_image"] == "debian-12"
    assert (
        sent["vm_disk_size"] == "20G" and sent["memory_mb"] == 3072 and sent["required_memory_bytes"] is None
    )
    assert sent["required_cores"] == 2 and sent["ssh_key_mode"] == "upload" and sent["ssh_public_key"] == key
    assert sent["privileged"] is False and sent["additional_mounts"] == []
    record = await host.wait_status(vm_id, "assigning")
    assert record["vps_backend"] == "qemu" and record["vm_image"] == "debian-12"
    assert record["vm_disk_size"] == "20G" and record["memory_mb"] == 3072
    assert record["required_memory_bytes"] == 3072 * MiB
    node = await host.ok("GET", "/api/nodes/vm1")
    assert node["memory_reserved_bytes"] == 3072 * MiB and node["cores_in_use"] == 2

    # No memory asked: the node's default (its runner's VM_DEFAULT_MEMORY_MB), sent explicitly.
    other = await running_vm(host, runner)
    assert runner.executed[-1]["memory_mb"] == 2048 and runner.executed[-1]["vm_disk_size"] is None
    assert (await host.task(other))["required_memory_bytes"] == 2048 * MiB


async def test_without_a_node_default_the_host_reserves_4096_mib(host, runner):
    await host.register("vm1", runner.url, vm=vm_facts())
    vm_id = await running_vm(host, runner, target=None)
    assert runner.executed[-1]["memory_mb"] == 4096
    assert (await host.task(vm_id))["memory_mb"] == 4096


async def test_an_untargeted_vm_goes_to_a_node_that_can_run_it(host, runner):
    await host.register("big", runner.url, cores=64, memory=256 * GiB)  # no VMs
    await host.register("noimg", runner.url, cores=32, vm=vm_facts(images=[image("other")]))
    await host.register("vm1", runner.url, cores=4, vm=vm_facts())
    vm_id = await running_vm(host, runner, target=None)
    assert (await host.task(vm_id))["assigned_node"] == "vm1"
    # A container still goes to the biggest node.
    docker = await create(host, ssh_key_mode="none")
    await executed(runner, 2)
    assert (await host.wait_status(docker, "assigning"))["assigned_node"] == "big"


async def test_restart_of_a_stopped_vm_comes_back_on_its_node(host, runner):
    await host.register("vm1", runner.url, cores=4, vm=vm_facts())
    vm_id = await running_vm(host, runner, target=None, vm_disk_size="10G", memory_mb=1024)
    await host.update(vm_id, "running", vm_health={"agent": "healthy", "load1": 0.1})
    assert (await host.ok("POST", f"/api/vps/{vm_id}/stop"))["status"] == "stopped"
    # A bigger VM node joins with the same image: the disk of this VM is on vm1 only.
    await host.register("vm2", runner.url, cores=64, vm=vm_facts())
    answer = await host.ok("POST", f"/api/vps/{vm_id}/restart")
    assert "vm1" in answer["message"]
    (_, again) = await executed(runner, 2)
    assert again["task_id"] == vm_id and again["vps_backend"] == "qemu" and again["vm_image"] == "debian-12"
    assert again["vm_disk_size"] == "10G" and again["memory_mb"] == 1024
    record = await host.wait_status(vm_id, "assigning")
    assert record["assigned_node"] == "vm1" and record["vm_ip"] is None and record["vm_health"] is None

    # Its node no longer has the image: a restart is refused rather than queued to fail.
    await host.update(vm_id, "running")
    await host.ok("POST", f"/api/vps/{vm_id}/stop")
    await host.heartbeat("vm1", vm=vm_facts(images=[image("other")]))
    body = assert_error(await host.call("POST", f"/api/vps/{vm_id}/restart"), 409, "vm_image")
    assert "no longer has VM image 'debian-12'" in body["message"]
    await host.heartbeat("vm1", vm=vm_facts(capable=False, reason="QEMU was removed"))
    body = assert_error(await host.call("POST", f"/api/vps/{vm_id}/restart"), 409, "target")
    assert "QEMU was removed" in body["message"]


# -- status updates ----------------------------------------------------------------------------------------


async def test_the_agents_health_and_the_vm_address_are_recorded(host, runner):
    await host.register("vm1", runner.url, vm=vm_facts())
    vm_id = await running_vm(host, runner)
    record = await host.task(vm_id)
    assert record["vm_ip"] == "10.201.0.5" and record["vm_health"] is None
    health = {
        "agent": "healthy",
        "last_heartbeat_at": "2026-01-02T03:04:05Z",
        "load1": 0.25,
        "memory_total_bytes": 2 * GiB,
        "memory_available_bytes": GiB,
        "disk_total_bytes": 20 * GiB,
        "disk_free_bytes": 15 * GiB,
        "uptime_seconds": 12.5,
    }
    assert await host.update(vm_id, "running", vm_health=health) == {"accepted": True}
    record = await host.task(vm_id)
    assert record["vm_health"]["agent"] == "healthy" and record["vm_health"]["load1"] == 0.25
    assert record["status"] == "running" and record["status_message"] == "running"

    # Paused by its user: a health report the runner computed before the pause does not resume it.
    assert (await host.ok("POST", f"/api/vps/{vm_id}/pause"))["status"] == "paused"
    silent = {"agent": "unhealthy", "message": "no heartbeat for 95 s"}
    assert await host.update(vm_id, "running", vm_health=silent) == {"accepted": True}
    record = await host.task(vm_id)
    assert record["status"] == "paused" and record["vm_health"]["agent"] == "unhealthy"
    assert await host.update(vm_id, "paused", vm_health={"agent": "waiting"}) == {"accepted": True}
    assert (await host.task(vm_id))["vm_health"]["agent"] == "waiting"
    # A plain report still moves it (the runner re-adopting it running, say).
    assert await host.update(vm_id, "running") == {"accepted": True}
    assert (await host.task(vm_id))["status"] == "running"
    # Once it ended, health reports are not accepted.
    await host.ok("POST", f"/api/kill/{vm_id}")
    assert await host.update(vm_id, "running", vm_health=health) == {"accepted": False}
    assert (await host.task(vm_id))["status"] == "killed"
    # Malformed health is a 422 naming the field.
    r = await host.call(
        "POST",
        "/api/update",
        host.cluster_token,
        json={"task_id": vm_id, "status": "running", "vm_health": {"agent": "dizzy"}},
    )
    assert_error(r, 422, "vm_health.agent")


# -- instances ---------------------------------------------------------------------------------------------


def instance(task_id: str, running: bool = False, **fields: Any) -> dict[str, Any]:
    return {
        "task_id": task_id,
        "path": f"/var/lib/kohakuriver/vm-instances/{task_id}",
        "disk_bytes": 123456,
        "running": running,
        "pid": 4242 if running else None,
        "tap": "kr-tap0" if running else None,
        **fields,
    }


async def test_instances_are_listed_with_the_hosts_status_and_orphans(host, runner):
    await host.register("vm1", runner.url, vm=vm_facts())
    await host.register("novm", runner.url, vm=vm_facts(capable=False))  # never asked
    vm_id = await running_vm(host, runner)
    docker = await create(host, target="vm1", ssh_key_mode="none")
    runner.instances = [
        instance(vm_id, running=True),
        instance("123456789"),  # the host has no such task
        instance(docker),  # a Docker VPS is not a VM: its id on a VM instance is an orphan
    ]
    operator = await host.create_user("olga", "operator")
    answer = await host.ok("GET", "/api/vm/instances?node=vm1", operator)
    assert answer["unreachable"] == []
    rows = {i["task_id"]: i for i in answer["instances"]}
    assert rows[vm_id]["status"] == "running" and rows[vm_id]["orphan"] is False
    assert rows[vm_id]["running"] is True and rows[vm_id]["pid"] == 4242 and rows[vm_id]["tap"] == "kr-tap0"
    assert rows[vm_id]["node"] == "vm1" and rows[vm_id]["disk_bytes"] == 123456
    assert rows["123456789"]["status"] is None and rows["123456789"]["orphan"] is True
    assert rows[docker]["orphan"] is True and rows[docker]["status"] in ("pending", "assigning")
    # Every node: the same (only VM-capable online nodes are asked).
    everyone = await host.ok("GET", "/api/vm/instances")
    assert sorted(i["task_id"] for i in everyone["instances"]) == sorted(rows)
    # A stopped VM VPS keeps its instance, and it is not an orphan.
    await host.ok("POST", f"/api/vps/{vm_id}/stop")
    rows = {i["task_id"]: i for i in (await host.ok("GET", "/api/vm/instances?node=vm1"))["instances"]}
    assert rows[vm_id]["status"] == "stopped" and rows[vm_id]["orphan"] is False
    assert runner.bad_auth == 0

    alice = await host.create_user("alice")
    assert_error(await host.call("GET", "/api/vm/instances", alice), 403)
    assert_error(await host.call("GET", "/api/vm/instances?node=nope"), 404)


async def test_instances_of_an_unreachable_node(host, runner):
    await host.register("vm1", runner.url, vm=vm_facts())
    await host.register("gone", closed_port_url(), vm=vm_facts())
    runner.instances = [instance("99")]
    answer = await host.ok("GET", "/api/vm/instances")
    assert [i["task_id"] for i in answer["instances"]] == ["99"]
    assert [u["node"] for u in answer["unreachable"]] == ["gone"]
    assert_error(await host.call("GET", "/api/vm/instances?node=gone"), 503)


async def test_removing_an_instance(host, runner):
    await host.register("vm1", runner.url, vm=vm_facts())
    vm_id = await running_vm(host, runner)
    runner.instances = [instance(vm_id, running=True), instance("77")]
    operator = await host.create_user("olga", "operator")
    assert_error(await host.call("DELETE", "/api/vm/instances/vm1/77", operator), 403)
    # The host's VPS is running there: 409 before the runner is asked.
    body = assert_error(await host.call("DELETE", f"/api/vm/instances/vm1/{vm_id}"), 409)
    assert "stop it" in body["message"] and runner.removed == []
    answer = await host.ok("DELETE", "/api/vm/instances/vm1/77")
    assert answer == {"node": "vm1", "task_id": "77", "removed": True} and runner.removed == ["77"]
    # The runner's own answers pass on.
    assert_error(await host.call("DELETE", "/api/vm/instances/vm1/77"), 404)
    runner.remove_code = 409
    assert (
        "cannot remove 78 now"
        in assert_error(await host.call("DELETE", "/api/vm/instances/vm1/78"), 409)["message"]
    )
    assert_error(await host.call("DELETE", "/api/vm/instances/nope/78"), 404)
    assert_error(await host.call("DELETE", "/api/vm/instances/vm1/abc"), 404)
    # A stopped VM's instance may be removed (its restart then starts from a fresh disk on the runner).
    runner.remove_code = 200
    await host.ok("POST", f"/api/vps/{vm_id}/stop")
    assert (await host.ok("DELETE", f"/api/vm/instances/vm1/{vm_id}"))["removed"] is True
    await host.register("vm1", closed_port_url(), vm=vm_facts())
    assert_error(await host.call("DELETE", "/api/vm/instances/vm1/79"), 503)


# -- snapshot restore --------------------------------------------------------------------------------------


async def test_snapshot_restore_is_passed_to_the_node(host, runner):
    await host.register("vm1", runner.url, vm=vm_facts())
    alice = await host.create_user("alice")
    bob = await host.create_user("bob")
    vm_id = await running_vm(host, runner, alice)
    answer = await host.ok("POST", f"/api/vps/{vm_id}/snapshots/1700000000/restore", alice)
    assert answer == {
        "task_id": vm_id,
        "timestamp": 1700000000,
        "message": f"VM {vm_id} restored to 1700000000",
    }
    assert runner.restores == [(vm_id, "1700000000")] and runner.bad_auth == 0
    for code in (404, 409, 501):
        runner.restore_code = code
        r = await host.call("POST", f"/api/vps/{vm_id}/snapshots/1700000000/restore", alice)
        assert_error(r, code)
    assert "restore needs a stopped VM" in r.json()["message"] and r.json()["error"] == "not_implemented"
    assert_error(await host.call("POST", f"/api/vps/{vm_id}/snapshots/latest/restore", alice), 404)
    assert_error(await host.call("POST", f"/api/vps/{vm_id}/snapshots/1/restore", bob), 404)
    operator = await host.create_user("olga", "operator")
    runner.restore_code = 200
    assert (await host.ok("POST", f"/api/vps/{vm_id}/snapshots/1/restore", operator))["timestamp"] == 1
    await host.register("vm1", closed_port_url(), vm=vm_facts())
    assert_error(await host.call("POST", f"/api/vps/{vm_id}/snapshots/1/restore", alice), 503)
