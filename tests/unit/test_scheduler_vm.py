"""The scheduler and VM VPS: a VM goes only to a node that can run VMs and has its base image, its GPUs must
be passable, and GPUs are one pool for containers and VMs. Also the registry's capacity built from a node's
VM facts."""

from __future__ import annotations

from kohakuriver_host.node_registry import NodeRegistry
from kohakuriver_host.scheduler import Allocation, Demand, NodeCapacity, feasible, plan_detailed
from kohakuriver_host.store import NodeRow

GiB = 1 << 30


def node(
    name: str, cores: int = 8, *, vm: bool = False, images=(), gpus=(), vm_gpus=(), reason=""
) -> NodeCapacity:
    return NodeCapacity(
        name,
        True,
        cores,
        64 * GiB,
        frozenset(gpus),
        None,
        vm_capable=vm,
        vm_reason=reason,
        vm_images=frozenset(images),
        vm_gpus=frozenset(vm_gpus),
    )


def vm_demand(task_id: int = 1, image: str = "debian-12", **fields) -> Demand:
    return Demand(task_id=task_id, queue_seq=task_id, cores=1, memory_bytes=GiB, vm_image=image, **fields)


def test_a_vm_needs_a_capable_node_with_its_image():
    nodes = [node("big", 64), node("tcg", 4, vm=True, images=["debian-12"])]
    result = plan_detailed(nodes, [], [vm_demand()])
    assert [(p.task_id, p.hostname) for p in result.placements] == [(1, "tcg")]
    # A container still goes to the node with the most free cores.
    container = Demand(task_id=2, queue_seq=2, cores=1)
    assert plan_detailed(nodes, [], [container]).placements[0].hostname == "big"


def test_why_a_vm_can_never_run():
    nodes = [
        node("plain"),
        node("novm", reason="qemu-img not found"),
        node("vm1", vm=True, images=["alpine"]),
    ]
    assert "has no VM image 'debian-12' (it has alpine)" in feasible(nodes, vm_demand())
    assert feasible(nodes, vm_demand(image="alpine")) is None
    targeted = vm_demand(target="novm")
    assert feasible(nodes, targeted) == "node 'novm' cannot run VMs: qemu-img not found"
    assert feasible([node("plain")], vm_demand()).startswith("no node can ever run this VM")
    # Queued VMs whose node lost the image become impossible (the host fails them with the reason).
    result = plan_detailed([node("vm1", vm=True)], [], [vm_demand(target="vm1")])
    assert "no VM image" in result.impossible[1]


def test_a_vms_gpus_must_be_passable_and_are_shared_with_containers():
    gpu_node = node("g", vm=True, images=["debian-12"], gpus=[0, 1], vm_gpus=[1])
    assert "GPU 0 of node 'g' cannot be passed through" in feasible(
        [gpu_node], vm_demand(target="g", gpu_ids={0})
    )
    # GPU 1 is held by a container: the VM waits; once it is a VM's, a container asking for it waits.
    held = [Allocation(9, "g", 0, 1, 0, frozenset({1}))]
    result = plan_detailed([gpu_node], held, [vm_demand(target="g", gpu_ids={1})])
    assert result.placements == () and "GPU 1 (in use)" in result.waiting[1]
    container = Demand(task_id=2, queue_seq=2, cores=1, gpu_ids=frozenset({1}), target="g")
    result = plan_detailed([gpu_node], [], [vm_demand(target="g", gpu_ids={1}), container])
    assert [p.task_id for p in result.placements] == [1] and "GPU 1 (in use)" in result.waiting[2]


def test_the_registry_builds_vm_capacity_from_the_facts():
    vm = {
        "capable": True,
        "reason": "KVM is unusable: TCG",
        "images": [{"name": "debian-12", "virtual_size_bytes": 2 * GiB}],
        # A GPU bound to vfio-pci is not in NVML's list: the node's GPUs are both lists together.
        "vfio_gpus": [
            {"gpu_id": 1, "address": "0000:02:00.0", "viable": True},
            {"gpu_id": 2, "address": "0000:03:00.0", "viable": False},
        ],
    }
    registration = {"total_cores": 8, "memory_total_bytes": 8 * GiB, "gpu_info": [{"gpu_id": 0}], "vm": vm}
    registry = NodeRegistry()
    registry.put(NodeRow("n1", "http://n1:8001", "online", 0.0, 0.0, registration, {}, None))
    (cap,) = registry.capacities()
    assert cap.vm_capable and cap.vm_images == {"debian-12"} and cap.vm_reason == "KVM is unusable: TCG"
    assert cap.gpu_ids == {0, 1, 2} and cap.vm_gpus == {1}
    # New facts in a heartbeat change the capacity (and say so: the scheduler is woken); the same do not.
    newer = {**vm, "images": [*vm["images"], {"name": "alpine", "virtual_size_bytes": GiB}]}
    assert registry.heartbeat("n1", "{}", (True, None), 1.0, newer) == (True, True)
    assert registry.capacities()[0].vm_images == {"debian-12", "alpine"}
    assert registry.heartbeat("n1", "{}", (True, None), 2.0, dict(newer)) == (True, False)
    # A heartbeat without facts falls back to the registration's.
    assert registry.heartbeat("n1", "{}", (True, None), 3.0, None) == (True, True)
    assert registry.capacities()[0].vm_images == {"debian-12"}
    assert registry.get("n1").static_view()["vm_capable"] is True
