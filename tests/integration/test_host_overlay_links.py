"""The host's overlay links on a real kernel, inside network namespaces the test makes and deletes (never the
machine's own namespace: no link, address or firewall rule of the machine is touched).

Machines as namespaces: ``H`` is the host; ``R1`` and ``R2`` are runners, each joined to ``H`` by a veth
whose ``H`` end is a port of the underlay bridge ``ul0`` (192.0.2.0/24: H .1, R1 .11, R2 .12). Each runner
gets a stand-in for its side of the overlay (the runner's real one is ``kohakuriver_runner``'s): ``vxlan0``
toward the host with the runner's gateway address and the route to the overlay via the host's address on
its subnet. Traffic is probed with small Python TCP programs under ``ip netns exec`` (no ping here).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import secrets
from collections.abc import Iterator

import pytest
import trio

from kohakuriver_host.overlay_links import (
    HOST_LINK,
    RULE_COMMENT,
    OverlayLinkError,
    OverlayLinks,
    host_link_mac,
)
from kohakuriver_proto.settings import parse_overlay_subnet
from tests.integration.test_vm_network import connect, link, namespaces, ns_ip, rules, run, server
from tests.need import need_program, need_root

PLAN = parse_overlay_subnet("10.128.0.0/12/6/14")
HOST_UL = "192.0.2.1"
UNDERLAY = {1: "192.0.2.11", 2: "192.0.2.12"}
VXLAN_ID, PORT, MTU = 100, 4789, 1450


@pytest.fixture
def machines() -> Iterator[tuple[str, str, str]]:
    need_root("the host overlay links test (network namespaces, VXLAN, iptables)")
    for program in ("ip", "iptables", "sysctl"):
        need_program(program)
    base = f"krtest-{secrets.token_hex(3)}"
    host, r1, r2 = f"{base}-h", f"{base}-r1", f"{base}-r2"
    with namespaces(host, r1, r2):
        ns_ip(host, "link", "add", "ul0", "type", "bridge")
        ns_ip(host, "addr", "add", f"{HOST_UL}/24", "dev", "ul0")
        ns_ip(host, "link", "set", "ul0", "up")
        for i, runner in ((1, r1), (2, r2)):
            ns_ip(host, "link", "add", f"ul-r{i}", "type", "veth", "peer", "name", "eth0", "netns", runner)
            ns_ip(host, "link", "set", f"ul-r{i}", "master", "ul0", "up")
            ns_ip(runner, "addr", "add", f"{UNDERLAY[i]}/24", "dev", "eth0")
            ns_ip(runner, "link", "set", "eth0", "up")
        yield host, r1, r2


def links_in(ns: str, **kwargs) -> OverlayLinks:
    options = {"vxlan_id": VXLAN_ID, "port": PORT, "mtu": MTU, "local": HOST_UL, **kwargs}
    return OverlayLinks(PLAN, netns=ns, **options)


def runner_side(ns: str, runner_id: int) -> None:
    """A stand-in for the runner's end: vxlan0 (VNI base + id) toward the host, the gateway address, the
    route to the whole overlay via the host's address on this runner's subnet."""
    subnet = ipaddress.IPv4Network(("10.128.0.0", 18))
    subnet = ipaddress.IPv4Network((int(subnet.network_address) + (runner_id << 14), 18))
    gateway, host_side = subnet.network_address + 1, subnet.network_address + 254
    ns_ip(ns, "link", "add", "vxlan0", "type", "vxlan", "id", str(VXLAN_ID + runner_id), "local",
          UNDERLAY[runner_id], "remote", HOST_UL, "dstport", str(PORT), "nolearning")  # fmt: skip
    ns_ip(ns, "link", "set", "vxlan0", "mtu", str(MTU), "up")
    ns_ip(ns, "addr", "add", f"{gateway}/18", "dev", "vxlan0")
    ns_ip(ns, "route", "add", "10.128.0.0/12", "via", str(host_side))


def marked(ns: str) -> list[str]:
    return [line for line in rules(ns, "filter") if RULE_COMMENT in line]


def addresses(ns: str, name: str) -> list[str]:
    data = json.loads(run("ip", "-n", ns, "-j", "addr", "show", "dev", name).stdout)[0]
    return sorted(
        f"{a['local']}/{a['prefixlen']}" for a in data.get("addr_info", []) if a["family"] == "inet"
    )


def vxkr(ns: str) -> list[str]:
    data = json.loads(run("ip", "-n", ns, "-j", "link", "show").stdout)
    return sorted(d["ifname"] for d in data if d["ifname"].startswith("vxkr"))


def test_reconcile_makes_the_hub_and_traffic_flows(machines) -> None:
    host, r1, r2 = machines
    # The machine's firewall as Docker leaves it: forwarding dropped unless a rule accepts it.
    run("ip", "netns", "exec", host, "iptables", "-P", "FORWARD", "DROP")
    links = links_in(host)
    changes = links.reconcile(UNDERLAY)
    assert set(changes.created) == {HOST_LINK, "vxkr1", "vxkr2"}
    assert run("ip", "netns", "exec", host, "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "1"

    for runner_id, name in ((1, "vxkr1"), (2, "vxkr2")):
        info = link(host, name)
        data = info["linkinfo"]["info_data"]
        assert info["linkinfo"]["info_kind"] == "vxlan"
        assert data["id"] == VXLAN_ID + runner_id
        assert data["remote"] == UNDERLAY[runner_id] and data["local"] == HOST_UL
        assert data["port"] == PORT and data["learning"] is False
        assert info["mtu"] == MTU and "UP" in info["flags"]
        assert info["address"] == host_link_mac(runner_id)  # the runner pins it: never random
    assert addresses(host, "vxkr1") == ["10.128.64.254/18"]
    assert addresses(host, "vxkr2") == ["10.128.128.254/18"]
    assert addresses(host, HOST_LINK) == ["10.128.0.1/12"]
    assert marked(host) == [
        f"-A FORWARD -s 10.128.0.0/12 -m comment --comment {RULE_COMMENT} -j ACCEPT",
        f"-A FORWARD -d 10.128.0.0/12 -m comment --comment {RULE_COMMENT} -j ACCEPT",
    ]
    assert rules(host, "filter").index(marked(host)[0]) < 2 + 3  # at the top of FORWARD

    runner_side(r1, 1)
    runner_side(r2, 2)
    # A runner reaches the host's own overlay address...
    with server(host, "10.128.0.1", 7001):
        done = connect(r1, "10.128.0.1", 7001, 15)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.strip() == "10.128.64.1"
    # ...and the other runner through the hub, unmasqueraded (the source is runner 1's overlay address).
    with server(r2, "10.128.128.1", 7002):
        done = connect(r1, "10.128.128.1", 7002, 15)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.strip() == "10.128.64.1"


def test_reconcile_is_idempotent_and_repairs(machines) -> None:
    host, _, _ = machines
    links = links_in(host)
    links.reconcile(UNDERLAY)
    before = (link(host, "vxkr1")["ifindex"], link(host, "vxkr2")["ifindex"], sorted(marked(host)))
    again = links.reconcile(UNDERLAY)
    assert again.empty, again
    assert (link(host, "vxkr1")["ifindex"], link(host, "vxkr2")["ifindex"], sorted(marked(host))) == before

    # Damage in place: MTU, MAC, a missing address, a stray address, down; a stale link; a wrong VNI.
    ns_ip(host, "link", "set", "vxkr1", "mtu", "1400")
    ns_ip(host, "link", "set", "vxkr1", "address", "02:00:00:00:00:99")
    ns_ip(host, "addr", "flush", "dev", "vxkr1")
    ns_ip(host, "addr", "add", "10.99.0.1/24", "dev", "vxkr1")
    ns_ip(host, "link", "set", "vxkr1", "down")
    ns_ip(host, "link", "del", "vxkr2")
    ns_ip(host, "link", "add", "vxkr2", "type", "vxlan", "id", "777", "local", HOST_UL, "remote",
          UNDERLAY[2], "dstport", str(PORT), "nolearning")  # fmt: skip
    ns_ip(
        host, "link", "add", "vxkr5", "type", "vxlan", "id", "105", "remote", "192.0.2.99", "dstport", "4789"
    )
    ns_ip(
        host,
        "link",
        "add",
        "vx-other",
        "type",
        "vxlan",
        "id",
        "999",
        "remote",
        "192.0.2.98",
        "dstport",
        "4790",
    )
    run("ip", "netns", "exec", host, "iptables", "-D", "FORWARD", "-d", "10.128.0.0/12", "-m", "comment",
        "--comment", RULE_COMMENT, "-j", "ACCEPT")  # fmt: skip
    index1 = link(host, "vxkr1")["ifindex"]

    fixed = links.reconcile(UNDERLAY)
    assert "vxkr1" in fixed.fixed and set(fixed.deleted) == {"vxkr2", "vxkr5"}
    assert fixed.created == ("vxkr2",)
    assert link(host, "vxkr1")["ifindex"] == index1  # fixed in place, not made again
    assert link(host, "vxkr1")["mtu"] == MTU and "UP" in link(host, "vxkr1")["flags"]
    assert link(host, "vxkr1")["address"] == host_link_mac(1)
    assert addresses(host, "vxkr1") == ["10.128.64.254/18"]
    assert link(host, "vxkr2")["address"] == host_link_mac(2)
    assert link(host, "vxkr2")["linkinfo"]["info_data"]["id"] == VXLAN_ID + 2
    assert vxkr(host) == ["vxkr1", "vxkr2"]
    assert link(host, "vx-other")  # not ours: untouched
    assert sorted(marked(host)) == before[2]  # the missing one is back, none doubled
    assert links.reconcile(UNDERLAY).empty

    # A runner moved to another underlay address; another left.
    moved = links.reconcile({1: "192.0.2.21"})
    assert set(moved.deleted) == {"vxkr1", "vxkr2"} and moved.created == ("vxkr1",)
    assert link(host, "vxkr1")["linkinfo"]["info_data"]["remote"] == "192.0.2.21"
    assert vxkr(host) == ["vxkr1"]
    assert links.reconcile({1: "192.0.2.21"}).empty


def test_an_underlay_on_a_bridge_is_named_once(machines, caplog) -> None:
    """The host's address here is on the underlay bridge: its VXLAN traffic is segmented in software there,
    which the log says once (not at every reconcile)."""
    host, _, _ = machines
    links = links_in(host)
    with caplog.at_level(logging.WARNING, logger="kohakuriver.host.overlay"):
        links.reconcile(UNDERLAY)
        links.reconcile(UNDERLAY)
    said = [r.getMessage() for r in caplog.records if "no encapsulation offloads" in r.getMessage()]
    assert len(said) == 1 and "bridge ul0" in said[0], said

    # With the address on a port of the bridge instead (a NIC into a switch), nothing to say.
    ns_ip(host, "addr", "del", f"{HOST_UL}/24", "dev", "ul0")
    ns_ip(host, "link", "add", "ul-host", "type", "veth", "peer", "name", "ul-hport")
    ns_ip(host, "link", "set", "ul-hport", "master", "ul0", "up")
    ns_ip(host, "addr", "add", f"{HOST_UL}/24", "dev", "ul-host")
    ns_ip(host, "link", "set", "ul-host", "up")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kohakuriver.host.overlay"):
        links_in(host).reconcile(UNDERLAY)
    assert not [r for r in caplog.records if "no encapsulation offloads" in r.getMessage()]


def test_a_former_subnet_is_cleaned_and_teardown_removes_everything(machines) -> None:
    host, _, _ = machines
    old = OverlayLinks(parse_overlay_subnet("10.0.0.0/8/8/16"), netns=host, vxlan_id=VXLAN_ID, port=PORT,
                       mtu=MTU, local=HOST_UL)  # fmt: skip
    old.reconcile({1: UNDERLAY[1]})
    assert addresses(host, "vxkr1") == ["10.1.0.254/16"]
    links = links_in(host)
    links.reconcile(UNDERLAY)
    assert addresses(host, "vxkr1") == ["10.128.64.254/18"]
    assert addresses(host, HOST_LINK) == ["10.128.0.1/12"]
    assert all("10.128.0.0/12" in rule for rule in marked(host)) and len(marked(host)) == 2
    assert links.present()

    done = links.teardown()
    assert set(done.deleted) == {HOST_LINK, "vxkr1", "vxkr2"}
    assert vxkr(host) == [] and marked(host) == []  # the rules go too
    assert run("ip", "-n", host, "link", "show", HOST_LINK, check=False).returncode != 0
    assert not links.present()
    assert links.teardown().empty


def test_refusals_name_the_problem(machines) -> None:
    host, _, _ = machines
    ns_ip(host, "link", "add", HOST_LINK, "type", "veth", "peer", "name", "kh-peer")
    with pytest.raises(OverlayLinkError, match=f"{HOST_LINK} exists and is a veth"):
        links_in(host).reconcile(UNDERLAY)
    # Everything else was still done.
    assert vxkr(host) == ["vxkr1", "vxkr2"]
    with pytest.raises(OverlayLinkError, match="does not exist"):
        links_in(f"{host}-absent").reconcile(UNDERLAY)


async def test_from_a_worker_thread(machines) -> None:
    """How the host calls it: from trio, through trio.to_thread."""
    host, _, _ = machines
    links = links_in(host)
    changes = await trio.to_thread.run_sync(links.reconcile, UNDERLAY)
    assert "vxkr1" in changes.created
    states = await trio.to_thread.run_sync(links.states)
    assert states["vxkr2"].runner_id == 2 and states["vxkr2"].remote == UNDERLAY[2] and states["vxkr2"].up
    assert (await trio.to_thread.run_sync(links.reconcile, UNDERLAY)).empty
