"""Placement: no over-commit ever, FIFO with backfill that never starves the head, clear refusal reasons."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kohakuriver_host.scheduler import Allocation, Demand, NodeCapacity, feasible, plan, plan_detailed

GiB = 1 << 30


def node(hostname, cores=8, memory=16 * GiB, gpus=(), numa=None, online=True):
    return NodeCapacity(hostname, online, cores, memory, frozenset(gpus), numa)


def alloc(task_id, hostname, seq=None, cores=0, memory=0, gpus=(), numa=None):
    return Allocation(
        task_id, hostname, task_id if seq is None else seq, cores, memory, frozenset(gpus), numa
    )


def demand(task_id, cores=0, memory=0, gpus=(), gpu_count=0, target=None, numa=None, seq=None):
    return Demand(
        task_id, task_id if seq is None else seq, cores, memory, frozenset(gpus), gpu_count, target, numa
    )


def placed(placements):
    return {p.task_id: p.hostname for p in placements}


# -- placement basics --------------------------------------------------------------------------------------


def test_untargeted_goes_to_the_online_node_with_most_free_cores():
    nodes = [node("a", 8), node("b", 16), node("c", 32, online=False)]
    allocs = [alloc(1, "b", cores=12)]  # b has 4 free, a has 8
    assert placed(plan(nodes, allocs, [demand(10, cores=2)])) == {10: "a"}
    # ties: more free memory, then the name
    assert placed(plan([node("x", 4), node("w", 4)], [], [demand(10, cores=1)])) == {10: "w"}


def test_a_task_that_does_not_fit_waits_and_is_placed_when_resources_free():
    nodes = [node("a", 8)]
    allocs = [alloc(1, "a", cores=6)]
    result = plan_detailed(nodes, allocs, [demand(10, cores=4)])
    assert result.placements == ()
    assert result.reservations == {10: "a"}
    assert "2 more cores" in result.waiting[10]
    assert placed(plan(nodes, [], [demand(10, cores=4)])) == {10: "a"}  # allocation 1 released


def test_offline_and_unknown_targets():
    nodes = [node("a", 8, online=False)]
    result = plan_detailed(nodes, [], [demand(10, cores=1, target="a"), demand(11, cores=1, target="zz")])
    assert result.placements == ()
    assert "offline" in result.waiting[10]
    assert "unknown node 'zz'" in result.impossible[11]


def test_zero_cores_and_memory_mean_no_limit_and_fit_anywhere():
    nodes = [node("a", 4, memory=GiB)]
    allocs = [alloc(1, "a", cores=4, memory=GiB)]
    assert placed(plan(nodes, allocs, [demand(10)])) == {10: "a"}


def test_numa_cores_are_counted_per_numa_node():
    nodes = [node("a", 8, numa={0: range(0, 4), 1: range(4, 8)})]
    allocs = [alloc(1, "a", cores=3, numa=0)]
    result = plan_detailed(
        nodes, allocs, [demand(10, cores=2, target="a", numa=0), demand(11, cores=2, target="a", numa=1)]
    )
    assert placed(result.placements) == {11: "a"}
    assert "NUMA node 0" in result.waiting[10]
    # unbound tasks only count against the node's total
    assert placed(plan(nodes, allocs, [demand(12, cores=5)])) == {12: "a"}
    assert plan(nodes, allocs, [demand(12, cores=6)]) == []


def test_gpu_ids_and_counts():
    nodes = [node("a", 8, gpus=range(4))]
    allocs = [alloc(1, "a", cores=1, gpus={0})]
    [p] = plan(nodes, allocs, [demand(10, gpu_count=2)])
    assert p.gpu_ids == frozenset({1, 2})
    [p] = plan(nodes, allocs, [demand(10, gpus={3}, target="a")])
    assert p.gpu_ids == frozenset({3})
    result = plan_detailed(nodes, allocs, [demand(10, gpus={0}, target="a")])
    assert result.placements == () and "GPU 0 (in use)" in result.waiting[10]


# -- FIFO and backfill -------------------------------------------------------------------------------------


def test_backfill_may_not_take_the_room_the_waiting_head_needs():
    nodes = [node("a", 8)]
    allocs = [alloc(1, "a", cores=2)]  # submitted before the head
    head = demand(10, cores=7, target="a")  # 6 cores free now: it waits for task 1
    result = plan_detailed(nodes, allocs, [head, demand(11, cores=2), demand(12, cores=1)])
    # 12 fits beside the head once task 1 ends (1 + 7 <= 8); 11 would not (2 + 7 > 8) although it fits now
    assert placed(result.placements) == {12: "a"}
    assert "kept for earlier task 10" in result.waiting[11]
    assert result.reservations == {10: "a", 11: "a"}
    # task 1 ends: the head starts, next to the backfilled task, before task 11
    assert placed(plan(nodes, [alloc(12, "a", cores=1)], [head, demand(11, cores=2)])) == {10: "a"}


def test_a_stream_of_small_tasks_cannot_starve_a_big_one():
    nodes = [node("a", 8)]
    allocs = [alloc(1, "a", cores=5)]
    queue = [demand(10, cores=8)]
    for seq in range(11, 21):  # a small task arrives every round
        queue.append(demand(seq, cores=1))
        if seq == 15:
            allocs = [a for a in allocs if a.task_id != 1]  # the only task older than the head ends
        result = plan_detailed(nodes, allocs, queue)
        allocs += result.placements
        queue = [d for d in queue if d.task_id not in placed(result.placements)]
        if seq < 15:
            assert sum(a.cores for a in allocs) <= 5  # nothing later takes the head's room
        if seq == 15:
            assert 10 in placed(result.placements)


def test_cpu_only_tasks_backfill_next_to_a_task_waiting_for_a_gpu():
    nodes = [node("a", 8, gpus={0})]
    allocs = [alloc(1, "a", cores=1, gpus={0})]
    result = plan_detailed(nodes, allocs, [demand(10, cores=1, gpus={0}, target="a"), demand(11, cores=6)])
    assert placed(result.placements) == {11: "a"} and result.reservations == {10: "a"}


def test_gpu_count_tasks_avoid_gpu_ids_reserved_by_earlier_tasks():
    nodes = [node("a", 8, gpus=range(3))]
    allocs = [alloc(1, "a", gpus={0})]
    queue = [demand(10, gpus={0, 1}, target="a"), demand(11, gpu_count=1), demand(12, gpu_count=1)]
    result = plan_detailed(nodes, allocs, queue)
    assert [(p.task_id, p.gpu_ids) for p in result.placements] == [(11, frozenset({2}))]
    assert "kept for earlier task 10" in result.waiting[12]


def test_untargeted_waiting_task_reserves_the_node_closest_to_fitting():
    nodes = [node("a", 8), node("b", 8)]
    allocs = [alloc(1, "a", cores=7), alloc(2, "b", cores=5)]
    result = plan_detailed(nodes, allocs, [demand(10, cores=6), demand(11, cores=3), demand(12, cores=1)])
    assert result.reservations[10] == "b"
    # 11 would take b's 3 free cores, leaving the head 8-3 = 5 < 6 once task 2 ends: held back.
    # 12 fits on a (most free: a has 1) or b; b can afford 1 more core (1 + 6 <= 8).
    assert placed(result.placements) == {12: "b"}


def test_an_untargeted_reservation_never_moves_to_a_node_where_later_tasks_block_it():
    nodes = [node("x", 8), node("y", 8)]
    head, small = demand(10, cores=6), demand(11, cores=3)
    # pass 1: the head is closer to fitting on x (2 cores short) than on y (6 short): x is kept for it
    allocs = [alloc(1, "x", cores=4), alloc(2, "y", cores=5), alloc(3, "y", cores=3)]
    assert plan_detailed(nodes, allocs, [head]).reservations == {10: "x"}
    # pass 2: task 3 ended; the small task may not use x (3 + 6 > 8) but takes y, which nobody reserved
    allocs = allocs[:2]
    result = plan_detailed(nodes, allocs, [head, small])
    assert placed(result.placements) == {11: "y"} and result.reservations[10] == "x"
    allocs += result.placements
    # pass 3: task 2 ended. y is now 1 core short, x 2, but on y a later task holds what the head needs
    # forever: the reservation stays on x, where only older tasks stand in the way.
    allocs = [a for a in allocs if a.task_id != 2]
    assert plan_detailed(nodes, allocs, [head]).reservations == {10: "x"}


def test_tasks_already_holding_resources_are_not_placed_twice():
    nodes = [node("a", 8)]
    assert plan(nodes, [alloc(10, "a", cores=1)], [demand(10, cores=1)]) == []


# -- feasibility -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("d", "reason"),
    [
        (
            demand(1, cores=64),
            "no node can ever run this task; the largest: needs 64 cores, node 'big' has 16",
        ),
        (demand(1, cores=9, target="small"), "needs 9 cores, node 'small' has 8"),
        (demand(1, memory=64 * GiB, target="small"), "needs 64.0 GiB of memory, node 'small' has 16.0 GiB"),
        (demand(1, target="nowhere"), "unknown node 'nowhere'"),
        (demand(1, gpus={5}, target="big"), "GPU 5 not on node 'big' (its GPUs: 0, 1)"),
        (demand(1, gpus={0}, target="small"), "GPU 0 not on node 'small' (its GPUs: none)"),
        (demand(1, gpu_count=3, target="big"), "needs 3 GPUs, node 'big' has 2"),
        (demand(1, numa=2, target="big"), "node 'big' has no NUMA node 2 (it has 0, 1)"),
        (demand(1, numa=0, target="small"), "node 'small' reports no NUMA topology"),
        (demand(1, cores=9, numa=0, target="big"), "needs 9 cores on NUMA node 0 of 'big', which has 8"),
        (demand(1, gpus={0}), "GPU ids are per node: give a target node"),
        (demand(1, numa=0), "a NUMA node is per node: give a target node"),
        (demand(1, gpus={0}, gpu_count=1, target="big"), "not both"),
    ],
)
def test_feasibility_reasons(d, reason):
    nodes = [
        node("small", 8),
        node("big", 16, gpus={0, 1}, numa={0: range(8), 1: range(8, 16)}, online=False),
    ]
    got = feasible(nodes, d)
    assert got is not None and reason in got


def test_feasible_requests():
    nodes = [node("a", 8, gpus={0}, online=False)]
    assert feasible(nodes, demand(1, cores=8, gpus={0}, target="a")) is None  # offline: it may come back
    assert feasible(nodes, demand(1, gpu_count=1)) is None
    assert feasible([], demand(1)) == "no nodes are registered"


def test_requests_that_became_impossible_are_reported():
    result = plan_detailed([node("a", 4)], [], [demand(10, cores=8, target="a")])
    assert result.placements == () and "needs 8 cores" in result.impossible[10]


# -- properties --------------------------------------------------------------------------------------------

HOSTS = ("n0", "n1", "n2")


@st.composite
def clusters(draw):
    nodes = []
    for hostname in HOSTS[: draw(st.integers(1, len(HOSTS)))]:
        cores = draw(st.integers(0, 12))
        numa = None
        if cores >= 2 and draw(st.booleans()):
            split = draw(st.integers(1, cores - 1))
            numa = {0: range(split), 1: range(split, cores)}
        nodes.append(
            NodeCapacity(
                hostname,
                draw(st.sampled_from([True, True, True, False])),
                cores,
                draw(st.integers(0, 16)),
                frozenset(range(draw(st.integers(0, 4)))),
                numa,
            )
        )
    return nodes


@st.composite
def demands(draw, seq):
    target = draw(st.none() | st.sampled_from([*HOSTS, "ghost"]))
    gpus, gpu_count, numa = frozenset(), 0, None
    if target is None:
        gpu_count = draw(st.sampled_from([0, 0, 1, 2]))
    else:
        mode = draw(st.sampled_from(["none", "ids", "count"]))
        if mode == "ids":
            gpus = draw(st.frozensets(st.integers(0, 4), min_size=1, max_size=3))
        elif mode == "count":
            gpu_count = draw(st.integers(1, 3))
        numa = draw(st.sampled_from([None, None, 0, 1, 2]))
    return Demand(seq, seq, draw(st.integers(0, 8)), draw(st.integers(0, 10)), gpus, gpu_count, target, numa)


def could_ever_run(n, d):
    """Independent of the scheduler: whether an empty ``n`` could run ``d``."""
    if not n.online or (d.target is not None and d.target != n.hostname):
        return False
    if d.gpu_ids and d.gpu_count:
        return False
    if d.cores > n.total_cores or d.memory_bytes > n.memory_total_bytes:
        return False
    if not d.gpu_ids <= n.gpu_ids or d.gpu_count > len(n.gpu_ids):
        return False
    if d.numa_node is None:
        return True
    return (
        d.target is not None
        and bool(n.numa)
        and d.numa_node in n.numa
        and d.cores <= len(n.numa[d.numa_node])
    )


def free_resources(n, allocs):
    mine = [a for a in allocs if a.hostname == n.hostname]
    numa_free = {
        k: len(v) - sum(a.cores for a in mine if a.numa_node == k) for k, v in (n.numa or {}).items()
    }
    return (
        n.total_cores - sum(a.cores for a in mine),
        n.memory_total_bytes - sum(a.memory_bytes for a in mine),
        set(n.gpu_ids) - {g for a in mine for g in a.gpu_ids},
        numa_free,
    )


def fits_now(n, d, allocs):
    if not could_ever_run(n, d):
        return False
    cores, memory, gpus, numa_free = free_resources(n, allocs)
    if (d.cores and d.cores > cores) or (d.memory_bytes and d.memory_bytes > memory):
        return False
    if d.numa_node is not None and d.cores and d.cores > numa_free[d.numa_node]:
        return False
    return d.gpu_ids <= gpus and d.gpu_count <= len(gpus)


def assert_no_overcommit(nodes, allocs):
    for n in nodes:
        mine = [a for a in allocs if a.hostname == n.hostname]
        assert sum(a.cores for a in mine) <= n.total_cores
        assert sum(a.memory_bytes for a in mine) <= n.memory_total_bytes
        gpus = [g for a in mine for g in a.gpu_ids]
        assert len(gpus) == len(set(gpus)) and set(gpus) <= n.gpu_ids
        for k, cores in (n.numa or {}).items():
            assert sum(a.cores for a in mine if a.numa_node == k) <= len(cores)


def assert_reservation_intact(n, h, allocs):
    """What tasks submitted after ``h`` hold on ``n`` leaves room for ``h``: it waits only for older ones."""
    later = [a for a in allocs if a.hostname == n.hostname and a.queue_seq > h.queue_seq]
    if h.cores:
        assert sum(a.cores for a in later) + h.cores <= n.total_cores
        if h.numa_node is not None:
            assert sum(a.cores for a in later if a.numa_node == h.numa_node) + h.cores <= len(
                n.numa[h.numa_node]
            )
    if h.memory_bytes:
        assert sum(a.memory_bytes for a in later) + h.memory_bytes <= n.memory_total_bytes
    held = {g for a in later for g in a.gpu_ids}
    assert not held & h.gpu_ids
    assert len(held) + h.gpu_count <= len(n.gpu_ids)


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_simulation_never_overcommits_keeps_fifo_and_never_starves(data):
    nodes = data.draw(clusters())
    by_name = {n.hostname: n for n in nodes}
    allocs: list[Allocation] = []
    queue: list[Demand] = []
    seq = 0
    for _ in range(data.draw(st.integers(1, 8))):
        for _ in range(data.draw(st.integers(0, 4))):
            seq += 1
            queue.append(data.draw(demands(seq)))

        relevant = [d for d in queue if any(could_ever_run(n, d) for n in nodes)]
        # FIFO: the oldest task that could run at all, if it fits now, starts now.
        head = min(relevant, key=lambda d: d.queue_seq, default=None)
        head_fits = head is not None and any(fits_now(n, head, allocs) for n in nodes)
        # Bounded wait: once nothing submitted earlier holds or waits for resources, a task starts.
        unblocked = [
            d.task_id
            for d in relevant
            if not any(a.queue_seq < d.queue_seq for a in allocs)
            and not any(e.queue_seq < d.queue_seq for e in relevant)
        ]

        result = plan_detailed(nodes, allocs, queue)
        got = placed(result.placements)
        for p in result.placements:
            d = next(d for d in queue if d.task_id == p.task_id)
            n = by_name[p.hostname]
            assert n.online and d.target in (None, p.hostname)
            assert (p.cores, p.memory_bytes, p.numa_node, p.queue_seq) == (
                d.cores, d.memory_bytes, d.numa_node, d.queue_seq,
            )  # fmt: skip
            assert p.gpu_ids == d.gpu_ids if d.gpu_ids else len(p.gpu_ids) == d.gpu_count
        allocs += result.placements
        queue = [d for d in queue if d.task_id not in got]

        assert_no_overcommit(nodes, allocs)
        if head_fits:
            assert head.task_id in got
        assert set(unblocked) <= set(got)
        for d in queue:
            assert d.task_id in result.waiting or d.task_id in result.impossible
            if d.task_id in result.reservations:
                assert_reservation_intact(by_name[result.reservations[d.task_id]], d, allocs)
            if d.task_id in result.impossible:
                assert not any(could_ever_run(n, d) for n in nodes)

        if allocs:
            done = data.draw(st.sets(st.sampled_from([a.task_id for a in allocs])))
            allocs = [a for a in allocs if a.task_id not in done]


@settings(max_examples=200, deadline=None)
@given(nodes=clusters(), data=st.data())
def test_feasible_agrees_with_an_empty_cluster(nodes, data):
    # A request is feasible exactly when some node (online or not) could run it if it were empty.
    d = data.draw(demands(1))
    every = [
        NodeCapacity(n.hostname, True, n.total_cores, n.memory_total_bytes, n.gpu_ids, n.numa) for n in nodes
    ]
    assert (feasible(nodes, d) is None) == any(could_ever_run(n, d) for n in every)
    if feasible(nodes, d) is None and all(n.online for n in nodes):
        assert placed(plan(nodes, [], [d])) != {}
