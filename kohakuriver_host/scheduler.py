"""Task placement: which queued task starts on which node, with which GPUs. Pure: no I/O, no clock.

The host's scheduling loop reads the nodes, the allocations of every task that holds resources (``assigning``,
``pending`` on a node, ``running``, ``paused``) and the queue (``pending`` tasks without a node), calls
``plan`` and dispatches the placements. ``feasible`` is the submit-time check that refuses requests no node
could ever satisfy, so nothing waits forever for a machine that does not exist.

Resources, per node: cores (an integer; 0 = no CPU limit), memory bytes (0 = no limit), GPU ids (runner-local
indices) and, for tasks bound to a NUMA node, that NUMA node's cores. A NUMA-bound task counts against both
the node's cores and its NUMA node's cores; an unbound task only against the node's cores.

A VM VPS (``Demand.vm_image`` set) may only go to a node that can run VMs and has that base image, and its
GPU ids must be GPUs the node can pass through (VFIO-viable). Its GPUs, cores and memory (the VM's memory)
count like a container's: a GPU held by a VM is never free for a container, nor one held by a container
for a VM, because both are simply "GPU ids held by an active task" here.

The queue rule: first come, first served, with conservative backfill.

1. Tasks are considered in submission order (``queue_seq``). A task that fits now is placed: on its target
   node, or, untargeted, on the online node with the most free cores (then most free memory, then name).
2. A task that does not fit now *reserves* one node: its target, or (untargeted) among the online nodes big
   enough for it the one where it is closest to fitting, preferring nodes where the reservation is intact.
3. A later task may be placed on a node only if, for every earlier task reserved there, the resources held
   on that node by tasks submitted after the reserved one, plus the new task, still leave room for it in
   every dimension they share (cores, memory, the NUMA node, GPU ids). Only dimensions both tasks use count,
   so a CPU-only task can always backfill next to a task waiting for a GPU.

Why this rule: without run-time estimates (a VPS runs for weeks), EASY backfilling cannot know whether a
backfilled task ends before the head could start; this rule needs no estimate. It guarantees that a waiting
task is never delayed past the moment every task submitted *before* it (on its reserved node) has finished:
what later tasks hold there always leaves room for it. So a stream of small tasks can overtake a big one
only while the big one could not start anyway, and never starves it. Untargeted reservations are re-chosen
at every pass; the guarantee holds for the node chosen at each pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import attrs


def _frozen_ints(value: Iterable[int]) -> frozenset[int]:
    return frozenset(value)


def _numa_map(value: Mapping[int, Iterable[int]] | None) -> dict[int, frozenset[int]] | None:
    if value is None:
        return None
    return {int(k): frozenset(v) for k, v in value.items()}


def _non_negative(_instance: object, attribute: attrs.Attribute, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{attribute.name} must be a non-negative integer, got {value!r}")


def _ids(_instance: object, attribute: attrs.Attribute, value: frozenset[int]) -> None:
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            raise ValueError(f"{attribute.name} must hold non-negative integers, got {item!r}")


@attrs.frozen
class NodeCapacity:
    """What a node has. ``numa`` maps NUMA node id -> its core ids, or is None if the node reports none."""

    hostname: str
    online: bool
    total_cores: int = attrs.field(validator=_non_negative)
    memory_total_bytes: int = attrs.field(validator=_non_negative)
    gpu_ids: frozenset[int] = attrs.field(factory=frozenset, converter=_frozen_ints, validator=_ids)
    numa: dict[int, frozenset[int]] | None = attrs.field(default=None, converter=_numa_map)
    #: VMs: whether the runner can run them (and why not), its base images, the GPU ids it can pass through.
    vm_capable: bool = False
    vm_reason: str = ""
    vm_images: frozenset[str] = attrs.field(factory=frozenset, converter=frozenset)
    vm_gpus: frozenset[int] = attrs.field(factory=frozenset, converter=_frozen_ints, validator=_ids)


@attrs.frozen
class Demand:
    """What a queued task asks for. Give explicit ``gpu_ids`` (needs a ``target``) or a ``gpu_count``.
    ``vm_image``: a VM VPS on that base image (None: a container)."""

    task_id: int
    queue_seq: int
    cores: int = attrs.field(default=0, validator=_non_negative)
    memory_bytes: int = attrs.field(default=0, validator=_non_negative)
    gpu_ids: frozenset[int] = attrs.field(factory=frozenset, converter=_frozen_ints, validator=_ids)
    gpu_count: int = attrs.field(default=0, validator=_non_negative)
    target: str | None = None
    numa_node: int | None = None
    vm_image: str | None = None


@attrs.frozen
class Allocation:
    """What a task holds on a node (for placements: what it will hold once dispatched)."""

    task_id: int
    hostname: str
    queue_seq: int
    cores: int = 0
    memory_bytes: int = 0
    gpu_ids: frozenset[int] = attrs.field(factory=frozenset, converter=_frozen_ints)
    numa_node: int | None = None


#: A placement is the allocation the task will hold: append it to the allocations once dispatched.
Placement = Allocation


@attrs.frozen
class Plan:
    """The outcome of one scheduling pass.

    ``placements`` in submission order; ``waiting``: task id -> why it waits (it stays queued);
    ``reservations``: task id -> the node kept for it; ``impossible``: task id -> why no node can ever run it
    (a node left or shrank since it was submitted; the host may fail such tasks).
    """

    placements: tuple[Placement, ...]
    waiting: Mapping[int, str]
    reservations: Mapping[int, str]
    impossible: Mapping[int, str]


# -- feasibility -------------------------------------------------------------------------------------------


def _fmt_bytes(n: int) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _fmt_ids(ids: Iterable[int]) -> str:
    ids = sorted(ids)
    return ", ".join(map(str, ids)) if ids else "none"


def _capacity_problems(node: NodeCapacity, d: Demand) -> list[str]:
    """Why ``d`` could never run on ``node`` even if the node were empty (empty list: it could)."""
    h = node.hostname
    problems = []
    if d.cores > node.total_cores:
        problems.append(f"needs {d.cores} cores, node {h!r} has {node.total_cores}")
    if d.numa_node is not None:
        if not node.numa:
            problems.append(f"node {h!r} reports no NUMA topology, so NUMA node {d.numa_node} cannot be used")
        elif d.numa_node not in node.numa:
            problems.append(f"node {h!r} has no NUMA node {d.numa_node} (it has {_fmt_ids(node.numa)})")
        elif d.cores > len(node.numa[d.numa_node]):
            problems.append(
                f"needs {d.cores} cores on NUMA node {d.numa_node} of {h!r}, "
                f"which has {len(node.numa[d.numa_node])}"
            )
    if d.memory_bytes > node.memory_total_bytes:
        problems.append(
            f"needs {_fmt_bytes(d.memory_bytes)} of memory, "
            f"node {h!r} has {_fmt_bytes(node.memory_total_bytes)}"
        )
    missing = d.gpu_ids - node.gpu_ids
    if missing:
        problems.append(f"GPU {_fmt_ids(missing)} not on node {h!r} (its GPUs: {_fmt_ids(node.gpu_ids)})")
    if d.gpu_count > len(node.gpu_ids):
        problems.append(f"needs {d.gpu_count} GPUs, node {h!r} has {len(node.gpu_ids)}")
    if d.vm_image is not None:
        problems.extend(_vm_problems(node, d))
    return problems


def _vm_problems(node: NodeCapacity, d: Demand) -> list[str]:
    h = node.hostname
    if not node.vm_capable:
        return [f"node {h!r} cannot run VMs" + (f": {node.vm_reason}" if node.vm_reason else "")]
    problems = []
    if d.vm_image not in node.vm_images:
        have = ", ".join(sorted(node.vm_images)) or "none"
        problems.append(f"node {h!r} has no VM image {d.vm_image!r} (it has {have})")
    cannot = d.gpu_ids - node.vm_gpus
    if cannot:
        problems.append(f"GPU {_fmt_ids(cannot)} of node {h!r} cannot be passed through to a VM")
    return problems


def feasible(nodes: Sequence[NodeCapacity], demand: Demand) -> str | None:
    """None if some known node could ever run ``demand`` (online or not: an offline node may come back and
    the task waits for it); otherwise the reason, for the submitter."""
    if demand.gpu_ids and demand.gpu_count:
        return "give either GPU ids (node::0,1) or a GPU count, not both"
    if demand.target is None:
        if demand.gpu_ids:
            return "GPU ids are per node: give a target node (node::0,1) or ask for a GPU count"
        if demand.numa_node is not None:
            return "a NUMA node is per node: give a target node (node:0)"
        if not nodes:
            return "no nodes are registered"
        if any(not _capacity_problems(n, demand) for n in nodes):
            return None
        if demand.vm_image is not None:
            # A VM: the node that comes closest (has the image, then can run VMs at all) says most.
            image = demand.vm_image
            closest = max(
                nodes, key=lambda n: (image in n.vm_images, n.vm_capable, n.total_cores, n.hostname)
            )
            return "no node can ever run this VM; the closest: " + "; ".join(
                _capacity_problems(closest, demand)
            )
        largest = max(nodes, key=lambda n: (n.total_cores, n.memory_total_bytes, len(n.gpu_ids), n.hostname))
        return "no node can ever run this task; the largest: " + "; ".join(
            _capacity_problems(largest, demand)
        )
    node = next((n for n in nodes if n.hostname == demand.target), None)
    if node is None:
        return f"unknown node {demand.target!r}"
    problems = _capacity_problems(node, demand)
    return "; ".join(problems) if problems else None


# -- planning ----------------------------------------------------------------------------------------------


class _Reservation:
    """A waiting task's claim on a node, and what tasks submitted after it hold there."""

    __slots__ = ("cores", "demand", "gpus", "memory", "numa_cores")

    def __init__(self, demand: Demand, allocations: Iterable[Allocation]) -> None:
        self.demand = demand
        self.cores = self.memory = self.numa_cores = 0
        self.gpus: set[int] = set()
        for a in allocations:
            self.add(a)

    def add(self, a: Allocation) -> None:
        d = self.demand
        if a.queue_seq <= d.queue_seq:
            return  # submitted before the waiting task: the waiting task waits for it anyway
        self.cores += a.cores
        self.memory += a.memory_bytes
        self.gpus |= a.gpu_ids
        if d.numa_node is not None and a.numa_node == d.numa_node:
            self.numa_cores += a.cores

    def allows(self, cap: NodeCapacity, t: Demand, t_gpus: frozenset[int]) -> bool:
        """Whether placing ``t`` (with ``t_gpus``) still leaves room for the waiting task. Only dimensions
        both use are checked: ``t`` cannot make a dimension it does not use any worse."""
        d = self.demand
        numa_size = _numa_size(cap, d.numa_node)
        cores = bool(t.cores and d.cores)
        if cores and self.cores + t.cores + d.cores > cap.total_cores:
            return False
        same_numa = cores and numa_size is not None and t.numa_node == d.numa_node
        if same_numa and self.numa_cores + t.cores + d.cores > numa_size:
            return False
        memory = bool(t.memory_bytes and d.memory_bytes)
        if memory and self.memory + t.memory_bytes + d.memory_bytes > cap.memory_total_bytes:
            return False
        if t_gpus and d.gpu_ids and t_gpus & d.gpu_ids:
            return False
        return not (t_gpus and d.gpu_count and len(self.gpus | t_gpus) + d.gpu_count > len(cap.gpu_ids))

    def intact(self, cap: NodeCapacity) -> bool:
        """Whether the waiting task will fit once every task submitted before it has left the node."""
        d = self.demand
        numa_size = _numa_size(cap, d.numa_node)
        if d.cores and self.cores + d.cores > cap.total_cores:
            return False
        if d.cores and numa_size is not None and self.numa_cores + d.cores > numa_size:
            return False
        if d.memory_bytes and self.memory + d.memory_bytes > cap.memory_total_bytes:
            return False
        if d.gpu_ids and self.gpus & d.gpu_ids:
            return False
        return not (d.gpu_count and len(self.gpus) + d.gpu_count > len(cap.gpu_ids))


def _numa_size(cap: NodeCapacity, numa_node: int | None) -> int | None:
    if numa_node is None or not cap.numa or numa_node not in cap.numa:
        return None
    return len(cap.numa[numa_node])


class _Node:
    __slots__ = ("allocations", "cap", "free_cores", "free_gpus", "free_memory", "numa_free", "reservations")

    def __init__(self, cap: NodeCapacity) -> None:
        self.cap = cap
        self.free_cores = cap.total_cores
        self.free_memory = cap.memory_total_bytes
        self.free_gpus = set(cap.gpu_ids)
        self.numa_free = {n: len(cores) for n, cores in (cap.numa or {}).items()}
        self.allocations: list[Allocation] = []
        self.reservations: list[_Reservation] = []

    def take(self, a: Allocation) -> None:
        self.free_cores -= a.cores
        self.free_memory -= a.memory_bytes
        self.free_gpus -= a.gpu_ids
        if a.numa_node in self.numa_free:
            self.numa_free[a.numa_node] -= a.cores
        self.allocations.append(a)
        for r in self.reservations:
            r.add(a)

    def shortfall(self, d: Demand) -> list[str]:
        """What ``d`` lacks here right now (empty: it fits, ignoring reservations)."""
        lacks = []
        if d.cores and d.cores > self.free_cores:
            lacks.append(f"{d.cores - max(self.free_cores, 0)} more cores")
        if d.numa_node is not None and d.cores and d.cores > self.numa_free.get(d.numa_node, 0):
            lacks.append(
                f"{d.cores - max(self.numa_free.get(d.numa_node, 0), 0)} more cores "
                f"on NUMA node {d.numa_node}"
            )
        if d.memory_bytes and d.memory_bytes > self.free_memory:
            lacks.append(f"{_fmt_bytes(d.memory_bytes - max(self.free_memory, 0))} more memory")
        busy = d.gpu_ids - self.free_gpus
        if busy:
            lacks.append(f"GPU {_fmt_ids(busy)} (in use)")
        if d.gpu_count > len(self.free_gpus):
            lacks.append(f"{d.gpu_count - len(self.free_gpus)} more free GPUs")
        return lacks

    def deficit(self, d: Demand) -> tuple[int, int, int]:
        gpus = len(d.gpu_ids - self.free_gpus) + max(0, d.gpu_count - len(self.free_gpus))
        cores = max(0, d.cores - self.free_cores) if d.cores else 0
        if d.numa_node is not None and d.cores:
            cores = max(cores, d.cores - self.numa_free.get(d.numa_node, 0))
        memory = max(0, d.memory_bytes - self.free_memory) if d.memory_bytes else 0
        return gpus, cores, memory

    def try_place(self, d: Demand) -> frozenset[int] | _Reservation | None:
        """The GPU ids ``d`` would get here; None if it does not fit now; the blocking reservation if it would
        fit but an earlier task's reservation forbids it."""
        if self.shortfall(d):
            return None
        if d.gpu_ids:
            gpus = d.gpu_ids
        elif d.gpu_count:
            # Never hand out GPU ids an earlier waiting task asked for by id.
            claimed = set().union(*(r.demand.gpu_ids for r in self.reservations))
            pool = sorted(self.free_gpus - claimed)
            if len(pool) < d.gpu_count:
                blocker = next(r for r in self.reservations if r.demand.gpu_ids & self.free_gpus)
                return blocker
            gpus = frozenset(pool[: d.gpu_count])
        else:
            gpus = frozenset()
        for r in self.reservations:
            if not r.allows(self.cap, d, gpus):
                return r
        return gpus


def plan_detailed(
    nodes: Sequence[NodeCapacity], allocations: Iterable[Allocation], queue: Iterable[Demand]
) -> Plan:
    """One scheduling pass; see the module docstring for the rule. Tasks already in ``allocations`` are
    skipped if they also appear in ``queue``."""
    states: dict[str, _Node] = {}
    for cap in nodes:
        if cap.hostname in states:
            raise ValueError(f"node {cap.hostname!r} listed twice")
        states[cap.hostname] = _Node(cap)
    holding: set[int] = set()
    for a in allocations:
        holding.add(a.task_id)
        if a.hostname in states:
            states[a.hostname].take(a)

    placements: list[Placement] = []
    waiting: dict[int, str] = {}
    reservations: dict[int, str] = {}
    impossible: dict[int, str] = {}
    for d in sorted(queue, key=lambda d: (d.queue_seq, d.task_id)):
        if d.task_id in holding:
            continue
        problem = feasible(nodes, d)
        if problem is not None:
            impossible[d.task_id] = problem
            continue
        candidates = [states[d.target]] if d.target is not None else list(states.values())
        online = [n for n in candidates if n.cap.online and not _capacity_problems(n.cap, d)]
        fits: list[tuple[_Node, frozenset[int]]] = []
        blockers: list[tuple[_Node, _Reservation]] = []
        for node in online:
            got = node.try_place(d)
            if isinstance(got, frozenset):
                fits.append((node, got))
            elif got is not None:
                blockers.append((node, got))
        if fits:
            node, gpus = min(fits, key=lambda f: (-f[0].free_cores, -f[0].free_memory, f[0].cap.hostname))
            a = Allocation(
                d.task_id, node.cap.hostname, d.queue_seq, d.cores, d.memory_bytes, gpus, d.numa_node
            )
            node.take(a)
            holding.add(d.task_id)
            placements.append(a)
            continue
        if not online:
            if d.target is not None:
                waiting[d.task_id] = f"node {d.target!r} is offline"
            else:
                waiting[d.task_id] = "no online node is large enough; waiting for one to come back"
            continue

        # The node closest to fitting, among those where the reservation is intact if there are any.
        ordered = sorted(online, key=lambda n, d=d: (n.deficit(d), -n.free_cores, n.cap.hostname))
        node, reservation = ordered[0], _Reservation(d, ordered[0].allocations)
        for candidate in ordered:
            r = reservation if candidate is node else _Reservation(d, candidate.allocations)
            if r.intact(candidate.cap):
                node, reservation = candidate, r
                break
        node.reservations.append(reservation)
        reservations[d.task_id] = node.cap.hostname
        blocked_by = next((r for n, r in blockers if n is node), None)
        if blocked_by is not None:
            waiting[d.task_id] = (
                f"would fit on {node.cap.hostname!r}, but that room is kept for earlier task "
                f"{blocked_by.demand.task_id}; reserved there"
            )
        else:
            lacks = ", ".join(node.shortfall(d)) or "room"
            waiting[d.task_id] = f"waiting for {lacks} on {node.cap.hostname!r} (reserved)"
    return Plan(tuple(placements), waiting, reservations, impossible)


def plan(
    nodes: Sequence[NodeCapacity], allocations: Iterable[Allocation], queue: Iterable[Demand]
) -> list[Placement]:
    """The placements of one scheduling pass (``plan_detailed`` also says why the others wait)."""
    return list(plan_detailed(nodes, allocations, queue).placements)
