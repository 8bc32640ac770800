"""A VM VPS create (or restart) request checked against what the nodes reported, before anything is stored.

A Docker VPS that does not fit waits in the queue, because containers fit almost anywhere and room frees
up. A VM needs things that do not come by waiting: a node that can run VMs at all, its base image there, a
disk no smaller than that image, GPUs the node can pass through. So ``POST /api/vps/create`` with
``vps_backend`` qemu refuses at once, each refusal naming the field and saying why, from the node facts the
runners sent (``models.VmFacts``: registration and heartbeats, kept by ``node_registry``):

| problem | status | field |
| --- | --- | --- |
| no ``vm_image`` | 422 | ``vm_image`` |
| target unknown / cannot run VMs (the node's own reason) | 422 | ``target`` |
| target offline | 409 | ``target`` |
| no node at all can run VMs (each node's reason) | 422 | ``vps_backend`` |
| image not on the target (or, untargeted, on no VM node): what they have | 422 | ``vm_image`` |
| untargeted, every node with the image offline | 409 | ``vm_image`` |
| disk smaller than the image's virtual size (both sizes) | 422 | ``vm_disk_size`` |
| a GPU not on the node, not VFIO-viable (its problems), or apart from its group | 422 | ``required_gpus`` |
| a GPU held by another task (container or VM) | 409 | ``required_gpus`` |

Memory: the VM gets ``memory_mb`` when the request names it; otherwise the runner's default
(``VmFacts.default_memory_mb``, its ``VM_DEFAULT_MEMORY_MB``; without a target the largest among the nodes
that could run it), else ``DEFAULT_VM_MEMORY_MB``. The host resolves it here and sends it with every
dispatch, so what the scheduler reserves is exactly what the VM gets.
"""

from __future__ import annotations

import logging

import attrs

from kohakuriver_proto.converter import structure
from kohakuriver_proto.errors import ValidationError
from kohakuriver_proto.lifecycle import ACTIVE
from kohakuriver_proto.models import VmFacts, VmImageInfo, VpsSpec
from kohakuriver_proto.units import format_size, parse_size

from .api_common import ApiProblem, invalid
from .context import HostContext
from .node_registry import NodeEntry
from .node_service import USAGE_KEYS, usage_by_node
from .store import ReadTx

log = logging.getLogger("kohakuriver.host.vm")

#: The memory of a VM whose request names none and whose nodes do not say their default (MiB).
DEFAULT_VM_MEMORY_MB = 4096
MIB = 1 << 20
#: How many nodes a message lists before it says "and N more".
MAX_LISTED = 8


@attrs.frozen
class VmChoice:
    """What the checks resolved: the memory the VM gets (MiB) and the base image as the nodes report it."""

    memory_mb: int
    images: tuple[tuple[str, VmImageInfo], ...]  # (hostname, image) of every node that could run it


def vm_facts(entry: NodeEntry) -> VmFacts | None:
    """The node's VM facts as the model (None when its runner reported none, or something unreadable)."""
    if not entry.vm:
        return None
    try:
        return structure(entry.vm, VmFacts)
    except ValidationError as exc:  # validated when it arrived: only a store from another version
        log.warning("node %s: unreadable VM facts ignored: %s", entry.hostname, exc)
        return None


def _why_not(facts: VmFacts | None) -> str:
    if facts is None:
        return "its runner reports no VM support"
    return facts.reason or "its runner says it cannot run VMs"


def _listed(items: list[str]) -> str:
    if not items:
        return "none"
    more = len(items) - MAX_LISTED
    return ", ".join(items[:MAX_LISTED]) + (f" and {more} more" if more > 0 else "")


def _image_names(facts: VmFacts) -> str:
    return _listed(sorted(i.name for i in facts.images))


async def check_create(host: HostContext, spec: VpsSpec) -> VmChoice:
    """Check a ``vps_backend`` qemu request; ``ApiProblem`` (the table above) or what it resolved."""
    image = spec.vm_image
    if image is None:
        raise invalid(
            "required with vps_backend 'qemu': the base image to boot (see `kr vm images`)", "vm_image", 422
        )
    placement = spec.placement()
    if placement is not None:
        entry, facts, info = _target(host, placement.hostname, image)
        await check_gpus(host, entry, facts, placement.gpu_ids)
        candidates = [(entry, facts, info)]
    else:
        candidates = _untargeted(host, image)
    if spec.vm_disk_size is not None:
        _check_disk(spec.vm_disk_size, image, [(e.hostname, i) for e, _, i in candidates])
    if spec.memory_mb is not None:
        memory_mb = spec.memory_mb
    else:
        defaults = [f.default_memory_mb for _, f, _ in candidates if f.default_memory_mb is not None]
        memory_mb = max(defaults, default=DEFAULT_VM_MEMORY_MB)
    return VmChoice(memory_mb, tuple((e.hostname, i) for e, _, i in candidates))


def _target(host: HostContext, hostname: str, image: str) -> tuple[NodeEntry, VmFacts, VmImageInfo]:
    entry = host.nodes.get(hostname)
    if entry is None:
        raise invalid(f"unknown node {hostname!r}", "target", 422)
    if entry.status != "online":
        raise ApiProblem(
            409,
            "conflict",
            f"node {hostname} is offline: a VM can only be created on a node that is online",
            "target",
        )
    facts = vm_facts(entry)
    if facts is None or not facts.capable:
        raise invalid(f"node {hostname} cannot run VMs: {_why_not(facts)}", "target", 422)
    info = facts.image(image)
    if info is None:
        raise invalid(
            f"node {hostname} has no VM image {image!r} (it has: {_image_names(facts)})", "vm_image", 422
        )
    return entry, facts, info


def _untargeted(host: HostContext, image: str) -> list[tuple[NodeEntry, VmFacts, VmImageInfo]]:
    entries = host.nodes.entries()
    capable = [(e, f) for e in entries if (f := vm_facts(e)) is not None and f.capable]
    if not capable:
        reasons = [f"{e.hostname}: {_why_not(vm_facts(e))}" for e in entries]
        raise invalid(
            f"no node can run VMs ({_listed(reasons) if reasons else 'no node is registered'})",
            "vps_backend",
            422,
        )
    candidates = [(e, f, i) for e, f in capable if (i := f.image(image)) is not None]
    if not candidates:
        have = [f"{e.hostname}: {_image_names(f)}" for e, f in capable]
        raise invalid(f"no node has VM image {image!r} (images: {_listed(have)})", "vm_image", 422)
    if not any(e.status == "online" for e, _, _ in candidates):
        nodes = _listed([e.hostname for e, _, _ in candidates])
        raise ApiProblem(
            409, "conflict", f"every node with VM image {image!r} is offline ({nodes})", "vm_image"
        )
    return candidates


def _check_disk(text: str, image: str, images: list[tuple[str, VmImageInfo]]) -> None:
    size = parse_size(text, "vm_disk_size")
    hostname, largest = max(images, key=lambda item: item[1].virtual_size_bytes)
    if size < largest.virtual_size_bytes:
        raise invalid(
            f"{text} ({format_size(size)}) is smaller than VM image {image!r} "
            f"({format_size(largest.virtual_size_bytes)} on {hostname}): the disk must hold the whole image",
            "vm_disk_size",
            422,
        )


async def check_gpus(host: HostContext, entry: NodeEntry, facts: VmFacts, gpu_ids: tuple[int, ...]) -> None:
    """A VM's GPUs: each a VFIO-viable GPU of the node asked for with its IOMMU group's other GPUs (422),
    and none held by another active task, container or VM (409)."""
    if not gpu_ids:
        return
    wanted = set(gpu_ids)
    by_id = {g.gpu_id: g for g in facts.vfio_gpus}
    by_address = {g.address: g for g in facts.vfio_gpus}
    h = entry.hostname
    problems = []
    for gpu_id in sorted(wanted):
        gpu = by_id.get(gpu_id)
        if gpu is None:
            have = _listed([str(i) for i in sorted(by_id)])
            problems.append(f"node {h} has no GPU {gpu_id} to pass through (its GPUs: {have})")
        elif not gpu.viable:
            why = "; ".join(gpu.problems) or "not viable"
            problems.append(f"GPU {gpu_id} ({gpu.address}) of node {h} cannot be passed through: {why}")
        else:
            mates = sorted(
                by_address[a].gpu_id for a in gpu.group_gpus if a in by_address and a != gpu.address
            )
            missing = [m for m in mates if m not in wanted]
            if missing:
                problems.append(
                    f"GPU {gpu_id} shares IOMMU group {gpu.iommu_group} with GPU "
                    f"{','.join(map(str, missing))}: ask for them together"
                )
    if problems:
        raise invalid("; ".join(problems), "required_gpus", 422)
    rows = await host.store.read(ReadTx.task_summaries, ACTIVE, USAGE_KEYS, assigned=True)
    held = usage_by_node(r for r in rows if r[3] == h).get(h)
    busy = sorted(wanted & held.gpus) if held is not None else []
    if busy:
        free = [str(g.gpu_id) for g in facts.vfio_gpus if g.viable and g.gpu_id not in held.gpus]
        raise ApiProblem(
            409,
            "conflict",
            f"GPU {','.join(map(str, busy))} of node {h} is in use by another task "
            f"(free for a VM: {_listed(free)})",
            "required_gpus",
        )


def check_restart(host: HostContext, hostname: str, image: str | None) -> None:
    """A stopped VM VPS comes back on its node, whose disk overlay needs the base image: refuse (409) a
    restart its node can no longer serve rather than queue it and fail it there."""
    entry = host.nodes.get(hostname)
    if entry is None:
        return  # an unknown node is answered by the caller (503 until it is back)
    facts = vm_facts(entry)
    if facts is None or not facts.capable:
        raise ApiProblem(409, "conflict", f"node {hostname} cannot run VMs now: {_why_not(facts)}", "target")
    if image is not None and facts.image(image) is None:
        raise ApiProblem(
            409,
            "conflict",
            f"node {hostname} no longer has VM image {image!r} (it has: {_image_names(facts)})",
            "vm_image",
        )


__all__ = ["DEFAULT_VM_MEMORY_MB", "VmChoice", "check_create", "check_gpus", "check_restart", "vm_facts"]
