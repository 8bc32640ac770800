"""The runner's overlay links on a real kernel, inside network namespaces the test makes and deletes (never
the machine's own namespace: no link, address, route, rule or firewall rule of the machine is touched).

Machines as namespaces. ``H`` is the host: the underlay bridge ``ul0`` (192.0.2.0/24, the host .1) and a
stand-in for the host's side of the overlay as the host daemon makes it (``vxkr<id>`` per runner, VNI
``100 + id``, the host's address on each runner's subnet, its own overlay address, forwarding). Two layouts
of the runners, both of which the runner supports:

- ``separate``: runner 1 in ``R1`` with its underlay address on its own veth (no underlay namespace);
  runner 2 in ``R2`` with its underlay address in ``U2`` (``OVERLAY_UNDERLAY_NETNS``).
- ``shared``: both runners in one namespace ``R`` (as both runners of the end-to-end test share the
  machine's namespace and its Docker), underlay addresses in ``U1`` and ``U2``, bridges and VXLAN links with
  different names. Here each runner's gateway is a local address of the other, which the routing table per
  runner and the bridge's ``arp_ignore`` must cope with.

A "container" behind each runner is a namespace ``C1``/``C2`` on a veth whose other end is a port of the
runner's bridge, with an address of the runner's subnet and the gateway as default route. Traffic is probed
with small Python TCP programs (no ping on these machines); the server answers with the client's address,
so a probe also shows that overlay traffic is not masqueraded.
"""

from __future__ import annotations

import json
import secrets
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import trio

from kohakuriver_host.overlay_links import host_link_mac
from kohakuriver_proto.models import OverlayMode, OverlayPeer, OverlaySettingsView
from kohakuriver_proto.overlay import build_assignment, host_address_on, runner_subnet
from kohakuriver_proto.settings import parse_overlay_subnet
from kohakuriver_runner.overlay_network import (
    COMMENT_PREFIX,
    OverlayNetwork,
    OverlayNetworkError,
    bridge_mac,
    layout_from,
    route_table,
)
from tests.integration.test_vm_network import connect, link, namespaces, ns_ip, rules, run, server
from tests.need import need_program, need_root

SUBNET_TEXT = "10.128.0.0/12/6/14"
PLAN = parse_overlay_subnet(SUBNET_TEXT)
HOST_UL = "192.0.2.1"
UNDERLAY = {1: "192.0.2.11", 2: "192.0.2.12"}
CONTAINER = {1: "10.128.64.10", 2: "10.128.128.10"}
VXLAN_ID, PORT, MTU = 100, 4789, 1450


def settings(mode: OverlayMode) -> OverlaySettingsView:
    return OverlaySettingsView(
        enabled=True, subnet=SUBNET_TEXT, vxlan_id=VXLAN_ID, vxlan_port=PORT, mtu=MTU, mode=mode
    )


def layout(runner_id: int, mode: OverlayMode, peers: tuple[int, ...] | None = None):
    """Runner ``runner_id``'s layout; in mesh mode its peers are the other runner (or ``peers``)."""
    others = [i for i in UNDERLAY if i != runner_id] if peers is None else list(peers)
    peer_list = [
        OverlayPeer(runner_id=i, hostname=f"runner-{i}", underlay_address=UNDERLAY[i]) for i in others
    ]
    assignment = build_assignment(settings(mode), runner_id, HOST_UL, peer_list)
    return layout_from(assignment, PLAN, vxlan_id=VXLAN_ID, local=UNDERLAY[runner_id])


@dataclass
class Runner:
    runner_id: int
    ns: str  # where its bridge lives (the runner's machine)
    container: str  # the namespace standing in for one of its containers
    network: OverlayNetwork

    @property
    def bridge(self) -> str:
        return self.network.bridge


@dataclass
class World:
    host: str
    runners: dict[int, Runner]


def host_side(host: str) -> None:
    """The host daemon's side, as ``kohakuriver_host.overlay_links`` makes it (hub links in both modes)."""
    ns_ip(host, "link", "add", "kohaku-host", "type", "bridge")
    ns_ip(host, "addr", "add", "10.128.0.1/12", "dev", "kohaku-host")
    ns_ip(host, "link", "set", "kohaku-host", "up")
    for runner_id, underlay in UNDERLAY.items():
        name = f"vxkr{runner_id}"
        ns_ip(host, "link", "add", name, "address", host_link_mac(runner_id), "type", "vxlan", "id",
              str(VXLAN_ID + runner_id), "local", HOST_UL, "remote", underlay, "dstport", str(PORT),
              "nolearning")  # fmt: skip
        ns_ip(host, "link", "set", name, "mtu", str(MTU), "up")
        subnet = runner_subnet(PLAN, runner_id)
        ns_ip(host, "addr", "add", f"{host_address_on(PLAN, runner_id)}/{subnet.prefixlen}", "dev", name)
    run("ip", "netns", "exec", host, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")


def underlay_port(host: str, ns: str, runner_id: int) -> None:
    """A veth from the host's underlay bridge into ``ns``, holding runner ``runner_id``'s underlay address."""
    ns_ip(host, "link", "add", f"ul-r{runner_id}", "type", "veth", "peer", "name", "ul0", "netns", ns)
    ns_ip(host, "link", "set", f"ul-r{runner_id}", "master", "ul0", "up")
    ns_ip(ns, "addr", "add", f"{UNDERLAY[runner_id]}/24", "dev", "ul0")
    ns_ip(ns, "link", "set", "ul0", "up")


def attach_container(runner: Runner) -> None:
    """The container namespace on a veth into the runner's bridge, as Docker attaches a container."""
    port = f"c{runner.runner_id}-{secrets.token_hex(2)}"
    ns_ip(runner.ns, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", runner.container)
    ns_ip(runner.ns, "link", "set", port, "master", runner.bridge, "up")
    subnet = runner_subnet(PLAN, runner.runner_id)
    ns_ip(runner.container, "link", "set", "eth0", "mtu", str(MTU), "up")
    ns_ip(runner.container, "addr", "add", f"{CONTAINER[runner.runner_id]}/{subnet.prefixlen}", "dev", "eth0")
    ns_ip(runner.container, "route", "add", "default", "via", str(subnet.network_address + 1))


@pytest.fixture(params=["separate", "shared"])
def world(request) -> Iterator[World]:
    need_root("the runner overlay test (network namespaces, VXLAN, iptables)")
    for program in ("ip", "iptables", "sysctl"):
        need_program(program)
    base = f"krtest-{secrets.token_hex(3)}"
    host = f"{base}-h"
    containers = {1: f"{base}-c1", 2: f"{base}-c2"}
    if request.param == "separate":
        r1, r2, u2 = f"{base}-r1", f"{base}-r2", f"{base}-u2"
        names = [host, r1, r2, u2, *containers.values()]
        networks = {
            1: OverlayNetwork("kohaku-overlay", "vxlan0", netns=r1),
            2: OverlayNetwork("kohaku-overlay", "vxlan0", netns=r2, underlay_netns=u2),
        }
        machines = {1: r1, 2: r2}
        underlays = {1: r1, 2: u2}
    else:
        r, u1, u2 = f"{base}-r", f"{base}-u1", f"{base}-u2"
        names = [host, r, u1, u2, *containers.values()]
        networks = {
            1: OverlayNetwork("kr-ov1", "kr-vx1", netns=r, underlay_netns=u1),
            2: OverlayNetwork("kr-ov2", "kr-vx2", netns=r, underlay_netns=u2),
        }
        machines = {1: r, 2: r}
        underlays = {1: u1, 2: u2}
    with namespaces(*names):
        ns_ip(host, "link", "add", "ul0", "type", "bridge")
        ns_ip(host, "addr", "add", f"{HOST_UL}/24", "dev", "ul0")
        ns_ip(host, "link", "set", "ul0", "up")
        for runner_id, ns in underlays.items():
            underlay_port(host, ns, runner_id)
        host_side(host)
        for ns in set(machines.values()):
            # The machine's firewall as Docker leaves it: forwarding dropped unless a rule accepts it.
            run("ip", "netns", "exec", ns, "iptables", "-P", "FORWARD", "DROP")
        runners = {i: Runner(i, machines[i], containers[i], networks[i]) for i in (1, 2)}
        yield World(host, runners)


def probe(world: World, source: int, target_ns: str, address: str, port: int, deadline: float = 15) -> str:
    """Connect from runner ``source``'s container to ``address`` (served in ``target_ns``): the address the
    server saw the connection come from."""
    with server(target_ns, address, port):
        done = connect(world.runners[source].container, address, port, deadline)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip()


# Reads and discards until the sender closes, then prints how many bytes came. Prints "ready" once bound.
SINK = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen()
print("ready", flush=True)
c, _ = s.accept()
n = 0
while data := c.recv(65536):
    n += len(data)
print(n, flush=True)
"""
SEND = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as c:
    c.sendall(bytes(int(sys.argv[3])))
"""


def bulk(source_ns: str, target_ns: str, address: str, port: int, size: int) -> None:
    """``size`` bytes from ``source_ns`` to a sink at ``address`` in ``target_ns``; all of them arrived."""
    sink = subprocess.Popen(
        ["ip", "netns", "exec", target_ns, sys.executable, "-c", SINK, address, str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
        run("ip", "netns", "exec", source_ns, sys.executable, "-c", SEND, address, str(port), str(size))
        assert sink.stdout.readline().strip() == str(size)
    finally:
        sink.kill()
        sink.wait(timeout=10)


def rx_bytes(ns: str, dev: str) -> int:
    data = json.loads(run("ip", "-n", ns, "-j", "-s", "link", "show", "dev", dev).stdout)[0]
    return int(data["stats64"]["rx"]["bytes"])


def fdb(ns: str, dev: str) -> list[dict]:
    return json.loads(run("bridge", "-n", ns, "-j", "fdb", "show", "dev", dev).stdout)


def table(ns: str, runner_id: int) -> list[str]:
    out = run("ip", "-n", ns, "route", "show", "table", str(route_table(runner_id))).stdout
    return sorted(line.strip() for line in out.splitlines())


def ip_rules(ns: str) -> list[str]:
    return run("ip", "-n", ns, "rule", "show").stdout.splitlines()


def marked(ns: str) -> list[str]:
    return [line for t in ("nat", "filter") for line in rules(ns, t) if COMMENT_PREFIX in line]


def snapshot(world: World) -> dict:
    out = {}
    for runner in world.runners.values():
        vxlan = runner.network.vxlan
        out[runner.runner_id] = (
            table(runner.ns, runner.runner_id),
            # The link's own entries (the bridge's learned ones come and go with traffic).
            sorted(json.dumps(e, sort_keys=True) for e in fdb(runner.ns, vxlan) if "self" in e["flags"]),
            link(runner.ns, vxlan)["ifindex"],
            link(runner.ns, runner.bridge)["ifindex"],
        )
    machines = {r.ns for r in world.runners.values()}
    out["rules"] = {ns: (ip_rules(ns), rules(ns, "nat"), rules(ns, "filter")) for ns in machines}
    return out


def test_hub_traffic_crosses_the_host(world: World) -> None:
    for runner in world.runners.values():
        runner.network.ensure(layout(runner.runner_id, OverlayMode.HUB))
        attach_container(runner)
    r1, r2 = world.runners[1], world.runners[2]

    info = link(r1.ns, r1.bridge)
    assert info["linkinfo"]["info_kind"] == "bridge" and "UP" in info["flags"]
    assert info["address"] == bridge_mac(1) and info["mtu"] == MTU
    vx = link(r2.ns, r2.network.vxlan)
    data = vx["linkinfo"]["info_data"]
    assert (data["id"], data["local"], data["remote"], data["port"]) == (102, UNDERLAY[2], HOST_UL, PORT)
    assert data["learning"] is False and vx["master"] == r2.bridge and vx["mtu"] == MTU
    assert table(r1.ns, 1) == sorted(
        [
            "10.128.0.0/12 via 10.128.64.254 dev kohaku-overlay proto static".replace(
                "kohaku-overlay", r1.bridge
            ),
            f"10.128.64.0/18 dev {r1.bridge} proto static scope link src 10.128.64.1",
        ]
    )
    assert f"{10000}:\tfrom all iif {r1.bridge} lookup {route_table(1)}" in ip_rules(r1.ns)

    # Container to container on the other runner, through the host; the source address is kept.
    assert probe(world, 1, r2.container, CONTAINER[2], 7101) == CONTAINER[1]
    assert probe(world, 2, r1.container, CONTAINER[1], 7102) == CONTAINER[2]
    # A container reaches the host's own overlay address.
    assert probe(world, 1, world.host, "10.128.0.1", 7103) == CONTAINER[1]
    # With the host's link to runner 2 down, runner 1 cannot reach runner 2 in hub mode.
    ns_ip(world.host, "link", "set", "vxkr2", "down")
    with server(r2.container, CONTAINER[2], 7104):
        assert connect(r1.container, CONTAINER[2], 7104, 2).returncode != 0


def test_mesh_traffic_skips_the_host(world: World) -> None:
    for runner in world.runners.values():
        runner.network.ensure(layout(runner.runner_id, OverlayMode.MESH))
        attach_container(runner)
    r1, r2 = world.runners[1], world.runners[2]

    entries = {(e["mac"], e.get("dst"), e.get("vni")) for e in fdb(r1.ns, r1.network.vxlan)}
    assert ("00:00:00:00:00:00", HOST_UL, None) in entries  # the remote: the host, the link's own VNI
    assert ("00:00:00:00:00:00", UNDERLAY[2], 102) in entries  # the peer, with the peer's VNI
    assert (bridge_mac(2), UNDERLAY[2], 102) in entries
    assert f"10.128.128.0/18 via 10.128.128.1 dev {r1.bridge} proto static" in table(r1.ns, 1)
    neighbours = run("ip", "-n", r1.ns, "neigh", "show", "dev", r1.bridge).stdout
    assert f"10.128.128.1 lladdr {bridge_mac(2)} PERMANENT" in neighbours

    assert probe(world, 1, world.host, "10.128.0.1", 7201) == CONTAINER[1]
    # Every link of the host down: runner to runner still flows, directly.
    for name in ("vxkr1", "vxkr2", "kohaku-host"):
        ns_ip(world.host, "link", "set", name, "down")
    assert probe(world, 1, r2.container, CONTAINER[2], 7202) == CONTAINER[1]
    assert probe(world, 2, r1.container, CONTAINER[1], 7203) == CONTAINER[2]

    # A peer that left: its entries, neighbour and routes go; the host's remote stays.
    r1.network.sync_peers(layout(1, OverlayMode.MESH, peers=()))
    entries = {(e["mac"], e.get("dst")) for e in fdb(r1.ns, r1.network.vxlan)}
    assert ("00:00:00:00:00:00", HOST_UL) in entries
    assert not {e for e in entries if e[1] == UNDERLAY[2]}
    assert not [line for line in table(r1.ns, 1) if "10.128.128" in line]
    assert "10.128.128.1" not in run("ip", "-n", r1.ns, "neigh", "show", "dev", r1.bridge).stdout
    with server(r2.container, CONTAINER[2], 7204):
        assert connect(r1.container, CONTAINER[2], 7204, 2).returncode != 0
    # ...and came back.
    r1.network.sync_peers(layout(1, OverlayMode.MESH))
    assert probe(world, 1, r2.container, CONTAINER[2], 7205) == CONTAINER[1]


def test_mesh_traffic_to_the_host_reaches_the_host_alone(world: World) -> None:
    """In mesh mode the runner's VXLAN link floods to the host and every peer: the host link's MAC is pinned
    toward the host, so what a container sends to the host's overlay address is not copied to the peers
    (whose bridges would flood it to every container there)."""
    for runner in world.runners.values():
        runner.network.ensure(layout(runner.runner_id, OverlayMode.MESH))
        attach_container(runner)
    r1, r2 = world.runners[1], world.runners[2]
    entries = {(e["mac"], e.get("dst"), e.get("vni")) for e in fdb(r1.ns, r1.network.vxlan)}
    assert (host_link_mac(1), HOST_UL, None) in entries  # the link's own VNI: the host's link to runner 1
    assert probe(world, 1, world.host, "10.128.0.1", 7301) == CONTAINER[1]  # neighbours resolved

    size = 4 << 20
    host_before, peer_before = rx_bytes(world.host, "vxkr1"), rx_bytes(r2.ns, r2.network.vxlan)
    bulk(r1.container, world.host, "10.128.0.1", 7302, size)
    assert rx_bytes(world.host, "vxkr1") - host_before >= size
    # A few stray broadcasts at most (IPv6 neighbour discovery on the links), not the 4 MiB.
    assert rx_bytes(r2.ns, r2.network.vxlan) - peer_before < 64 << 10

    # The link's entry (not the bridge's learned one) is kept exactly once, and made again when removed.
    r1.network.ensure(layout(1, OverlayMode.MESH))
    own = [e for e in fdb(r1.ns, r1.network.vxlan) if e["mac"] == host_link_mac(1) and "self" in e["flags"]]
    assert len(own) == 1
    run("bridge", "-n", r1.ns, "fdb", "del", host_link_mac(1), "dev", r1.network.vxlan, "dst", HOST_UL)
    r1.network.ensure(layout(1, OverlayMode.MESH))
    assert (host_link_mac(1), HOST_UL, None) in {
        (e["mac"], e.get("dst"), e.get("vni")) for e in fdb(r1.ns, r1.network.vxlan)
    }


def test_ensure_twice_changes_nothing_and_teardown_removes_everything(world: World) -> None:
    for ns in {r.ns for r in world.runners.values()}:
        run("ip", "netns", "exec", ns, "iptables", "-A", "FORWARD", "-j", "DROP")
    for mode in (OverlayMode.MESH, OverlayMode.HUB):
        for runner in world.runners.values():
            runner.network.ensure(layout(runner.runner_id, mode))
        first = snapshot(world)
        for runner in world.runners.values():
            runner.network.ensure(layout(runner.runner_id, mode))
        assert snapshot(world) == first
    for ns in {r.ns for r in world.runners.values()}:
        nat, filt = rules(ns, "nat"), rules(ns, "filter")
        for runner in world.runners.values():
            if runner.ns != ns:
                continue
            subnet = runner_subnet(PLAN, runner.runner_id)
            assert len([r for r in nat if f"-s {subnet} ! -d 10.128.0.0/12" in r and "MASQUERADE" in r]) == 1
            assert len([r for r in filt if f"-i {runner.bridge} " in r]) == 1
            assert len([r for r in filt if f"-o {runner.bridge} " in r and "RELATED,ESTABLISHED" in r]) == 1
            # At the top of FORWARD, ahead of the machine's own rule that drops everything.
            accept = next(r for r in filt if f"-i {runner.bridge} " in r)
            assert filt.index(accept) < filt.index("-A FORWARD -j DROP")

    r1, r2 = world.runners[1], world.runners[2]
    r1.network.teardown()
    r1.network.teardown()  # nothing left: fine
    assert run("ip", "-n", r1.ns, "link", "show", r1.bridge, check=False).returncode != 0
    assert run("ip", "-n", r1.ns, "link", "show", r1.network.vxlan, check=False).returncode != 0
    assert not [line for line in ip_rules(r1.ns) if f"iif {r1.bridge}" in line]
    assert table(r1.ns, 1) == []
    assert not [line for line in marked(r1.ns) if f":{r1.bridge}:" in line]
    # The other runner of a shared machine keeps its own.
    assert link(r2.ns, r2.bridge)["ifname"] == r2.bridge
    assert [line for line in marked(r2.ns) if f":{r2.bridge}:" in line]
    r2.network.teardown()
    for ns in {r.ns for r in world.runners.values()}:
        assert marked(ns) == []


def test_changed_assignment_is_applied(world: World) -> None:
    """A new runner id (another subnet, VNI, MAC): the link is made again, the old address, routes and rules
    go; a damaged set-up is repaired."""
    r1 = world.runners[1]
    r1.network.ensure(layout(1, OverlayMode.HUB))
    old_index = link(r1.ns, r1.network.vxlan)["ifindex"]
    moved = layout_from(
        build_assignment(settings(OverlayMode.HUB), 3, HOST_UL), PLAN, vxlan_id=VXLAN_ID, local=UNDERLAY[1]
    )
    r1.network.ensure(moved)
    info = link(r1.ns, r1.network.vxlan)
    assert info["ifindex"] != old_index and info["linkinfo"]["info_data"]["id"] == 103
    addresses = json.loads(run("ip", "-n", r1.ns, "-j", "-4", "addr", "show", r1.bridge).stdout)[0][
        "addr_info"
    ]
    assert [(a["local"], a["prefixlen"]) for a in addresses] == [("10.128.192.1", 18)]
    assert link(r1.ns, r1.bridge)["address"] == bridge_mac(3)
    assert table(r1.ns, 1) == [] and table(r1.ns, 3)
    assert [line for line in ip_rules(r1.ns) if f"iif {r1.bridge}" in line] == [
        f"10000:\tfrom all iif {r1.bridge} lookup {route_table(3)}"
    ]
    nat = rules(r1.ns, "nat")
    assert not [r for r in nat if "10.128.64.0/18" in r]
    assert [r for r in nat if "10.128.192.0/18" in r]

    # Damage: the VXLAN link detached and down, a rule deleted by hand, a route gone.
    ns_ip(r1.ns, "link", "set", r1.network.vxlan, "nomaster", "down")
    masquerade = next(r for r in nat if "MASQUERADE" in r and f":{r1.bridge}:" in r)
    run(
        "ip",
        "netns",
        "exec",
        r1.ns,
        "iptables",
        "-t",
        "nat",
        *shlex.split(masquerade.replace("-A ", "-D ", 1)),
    )
    ns_ip(r1.ns, "route", "del", "10.128.0.0/12", "table", str(route_table(3)))
    r1.network.ensure(moved)
    info = link(r1.ns, r1.network.vxlan)
    assert info["master"] == r1.bridge and "UP" in info["flags"]
    assert len([r for r in rules(r1.ns, "nat") if f":{r1.bridge}:" in r]) == 1
    assert any(line.startswith("10.128.0.0/12 via 10.128.192.254") for line in table(r1.ns, 3))
    r1.network.teardown()


def test_foreign_links(world: World) -> None:
    r1 = world.runners[1]
    ns_ip(r1.ns, "link", "add", r1.bridge, "type", "veth", "peer", "name", "kr-other")
    with pytest.raises(OverlayNetworkError, match="not a bridge"):
        r1.network.ensure(layout(1, OverlayMode.HUB))
    ns_ip(r1.ns, "link", "del", r1.bridge)
    # A bridge of that name with another MAC (not made here): teardown leaves it alone...
    ns_ip(r1.ns, "link", "add", r1.bridge, "type", "bridge")
    r1.network.teardown()
    assert link(r1.ns, r1.bridge)["ifname"] == r1.bridge
    # ...ensure adopts it (an older installation's bridge of the same name), with this runner's MAC.
    r1.network.ensure(layout(1, OverlayMode.HUB))
    assert link(r1.ns, r1.bridge)["address"] == bridge_mac(1)
    r1.network.teardown()
    assert run("ip", "-n", r1.ns, "link", "show", r1.bridge, check=False).returncode != 0


def test_missing_namespace_is_an_error() -> None:
    need_root("the runner overlay test")
    network = OverlayNetwork("kohaku-overlay", "vxlan0", netns=f"krtest-absent-{secrets.token_hex(4)}")
    with pytest.raises(OverlayNetworkError, match="does not exist"):
        network.ensure(layout(1, OverlayMode.HUB))


async def test_from_a_worker_thread(world: World) -> None:
    """How the runner calls it: from trio, through trio.to_thread."""
    r2 = world.runners[2]
    await trio.to_thread.run_sync(r2.network.ensure, layout(2, OverlayMode.HUB))
    assert await trio.to_thread.run_sync(r2.network.present)
    await trio.to_thread.run_sync(r2.network.teardown)
    assert not await trio.to_thread.run_sync(r2.network.present)


def test_runner_in_the_host_namespace() -> None:
    """``kr up``: the host and runner 1 share a namespace (one underlay address). Runner 1 makes no VXLAN
    link; its containers reach the host's overlay address and, through the host's link, runner 2's."""
    need_root("the runner overlay test (network namespaces, VXLAN, iptables)")
    base = f"krtest-{secrets.token_hex(3)}"
    machine, r2, c1, c2 = f"{base}-m", f"{base}-r2", f"{base}-c1", f"{base}-c2"
    with namespaces(machine, r2, c1, c2):
        ns_ip(machine, "link", "add", "ul0", "type", "bridge")
        ns_ip(machine, "addr", "add", f"{HOST_UL}/24", "dev", "ul0")
        ns_ip(machine, "link", "set", "ul0", "up")
        underlay_port(machine, r2, 2)
        # The host's side in the machine's namespace: its own address and its link to runner 2 only.
        ns_ip(machine, "link", "add", "kohaku-host", "type", "bridge")
        ns_ip(machine, "addr", "add", "10.128.0.1/12", "dev", "kohaku-host")
        ns_ip(machine, "link", "set", "kohaku-host", "up")
        ns_ip(machine, "link", "add", "vxkr2", "type", "vxlan", "id", "102", "local", HOST_UL, "remote",
              UNDERLAY[2], "dstport", str(PORT), "nolearning")  # fmt: skip
        ns_ip(machine, "link", "set", "vxkr2", "mtu", str(MTU), "up")
        ns_ip(machine, "addr", "add", "10.128.128.254/18", "dev", "vxkr2")
        run("ip", "netns", "exec", machine, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")

        one = Runner(1, machine, c1, OverlayNetwork("kohaku-overlay", "vxlan0", netns=machine))
        colocated = layout_from(
            build_assignment(settings(OverlayMode.HUB), 1, HOST_UL), PLAN, vxlan_id=VXLAN_ID, local=HOST_UL
        )
        assert colocated.colocated
        one.network.ensure(colocated)
        two = Runner(2, r2, c2, OverlayNetwork("kohaku-overlay", "vxlan0", netns=r2))
        two.network.ensure(layout(2, OverlayMode.HUB))
        for runner in (one, two):
            attach_container(runner)
        assert run("ip", "-n", machine, "link", "show", "vxlan0", check=False).returncode != 0
        assert table(machine, 1) == [
            "10.128.64.0/18 dev kohaku-overlay proto static scope link src 10.128.64.1"
        ]

        world = World(machine, {1: one, 2: two})
        assert probe(world, 1, machine, "10.128.0.1", 7301) == CONTAINER[1]
        assert probe(world, 1, c2, CONTAINER[2], 7302) == CONTAINER[1]
        assert probe(world, 2, c1, CONTAINER[1], 7303) == CONTAINER[2]
        one.network.teardown()
        assert marked(machine) == []
