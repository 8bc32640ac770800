"""The runner's overlay, pure parts: the layout from the host's assignment (routes, forwarding entries,
firewall rules), bridge MACs, the Docker network it needs, container specs on the overlay, the underlay
address, and reading the host's answers. The kernel side is tested in
``tests/integration/test_runner_overlay_network.py``."""

from __future__ import annotations

import ipaddress

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kohakuriver_host import overlay_links
from kohakuriver_proto.models import ExecuteRequest, OverlayMode, OverlayPeer, OverlaySettingsView
from kohakuriver_proto.overlay import build_assignment
from kohakuriver_proto.settings import parse_overlay_subnet
from kohakuriver_runner.config import runner_config_from
from kohakuriver_runner.container_spec import (
    NodeFacts,
    OverlayPlacement,
    SpecError,
    build_container_spec,
    tunnel_url,
)
from kohakuriver_runner.docker_api import NetworkInfo
from kohakuriver_runner.host_client import _beat_answer
from kohakuriver_runner.overlay_manager import (
    BRIDGE_OPTION,
    HOST_AUX_NAME,
    MTU_OPTION,
    OverlayManager,
    docker_auto_range,
    docker_network_differences,
)
from kohakuriver_runner.overlay_network import (
    COMMENT_PREFIX,
    Route,
    bridge_mac,
    host_link_mac,
    layout_from,
    route_table,
    runner_id_of_mac,
)
from kohakuriver_runner.vps_spec import build_vps_spec

SUBNET = "10.128.0.0/12/6/14"
PLAN = parse_overlay_subnet(SUBNET)
IP = ipaddress.IPv4Address
NET = ipaddress.IPv4Network


def view(mode: OverlayMode = OverlayMode.HUB) -> OverlaySettingsView:
    return OverlaySettingsView(
        enabled=True, subnet=SUBNET, vxlan_id=100, vxlan_port=4789, mtu=1450, mode=mode
    )


def peer(runner_id: int, address: str) -> OverlayPeer:
    return OverlayPeer(runner_id=runner_id, hostname=f"node{runner_id}", underlay_address=address)


def layout(mode: OverlayMode = OverlayMode.HUB, peers=(), runner_id: int = 1, local: str = "192.0.2.11"):
    assignment = build_assignment(view(mode), runner_id, "192.0.2.1", list(peers))
    return layout_from(assignment, PLAN, vxlan_id=100, local=local)


@given(st.integers(min_value=1, max_value=2**16 - 1))
def test_bridge_mac_round_trip(runner_id: int) -> None:
    mac = bridge_mac(runner_id)
    assert runner_id_of_mac(mac) == runner_id == runner_id_of_mac(mac.upper())
    first = int(mac[:2], 16)
    assert first & 2 and not first & 1  # locally administered, unicast
    assert route_table(runner_id) == 0x6B720000 + runner_id


@given(st.integers(min_value=1, max_value=2**24 - 1))
def test_host_link_mac_is_the_hosts(runner_id: int) -> None:
    """The runner pins the MAC the host gives its link to this runner: both sides compute the same, and it is
    never one of the runners' bridge MACs."""
    mac = host_link_mac(runner_id)
    assert mac == overlay_links.host_link_mac(runner_id)
    assert layout(runner_id=runner_id % 60 + 1).host_mac == host_link_mac(runner_id % 60 + 1)
    assert runner_id_of_mac(mac) is None
    first = int(mac[:2], 16)
    assert first & 2 and not first & 1  # locally administered, unicast


@pytest.mark.parametrize("runner_id", [0, -1, 2**24])
def test_host_link_mac_range(runner_id: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        host_link_mac(runner_id)
    with pytest.raises(ValueError, match="out of range"):
        overlay_links.host_link_mac(runner_id)


@pytest.mark.parametrize("mac", ["02:42:ac:11:00:02", "02:6b:72:00:00:00", "02:6b:72:00:00", "", "zz"])
def test_other_macs_are_not_ours(mac: str) -> None:
    assert runner_id_of_mac(mac) is None


def test_hub_layout() -> None:
    out = layout()
    assert (out.subnet, out.gateway, out.host_address) == (
        NET("10.128.64.0/18"),
        IP("10.128.64.1"),
        IP("10.128.64.254"),
    )
    assert (out.vni, out.port, out.mtu, out.local, out.host_underlay) == (
        101,
        4789,
        1450,
        IP("192.0.2.11"),
        IP("192.0.2.1"),
    )
    assert out.routes() == {Route(NET("10.128.64.0/18")), Route(NET("10.128.0.0/12"), IP("10.128.64.254"))}
    assert out.peers == () and out.flood_entries() == {} and out.neighbours() == {}
    # Peers are ignored in hub mode (the host routes between runners).
    assert layout(peers=[peer(2, "192.0.2.12")]).peers == ()


def test_mesh_layout() -> None:
    out = layout(OverlayMode.MESH, [peer(3, "192.0.2.13"), peer(2, "192.0.2.12")])
    assert [p.runner_id for p in out.peers] == [2, 3]
    assert out.flood_entries() == {2: ("192.0.2.12", 102), 3: ("192.0.2.13", 103)}
    assert out.mac_entries() == out.flood_entries()
    assert out.neighbours() == {"10.128.128.1": bridge_mac(2), "10.128.192.1": bridge_mac(3)}
    assert Route(NET("10.128.128.0/18"), IP("10.128.128.1")) in out.routes()
    assert Route(NET("10.128.128.1/32")) in out.routes()
    assert len(out.routes()) == 2 + 2 * 2


def test_layout_refusals() -> None:
    with pytest.raises(ValueError, match="this runner's underlay address"):
        layout(OverlayMode.MESH, [peer(2, "192.0.2.11")])
    other_plan = parse_overlay_subnet("10.0.0.0/8/8/16")
    assignment = build_assignment(view(), 1, "192.0.2.1")
    with pytest.raises(ValueError, match=r"OVERLAY_SUBNET gives 10\.1\.0\.0/16"):
        layout_from(assignment, other_plan, vxlan_id=100, local="192.0.2.11")


def test_firewall_rules_are_marked_per_bridge_and_rule() -> None:
    rules = layout().firewall("kohaku-overlay")
    assert [str(r) for r in rules] == [
        "-t nat POSTROUTING -s 10.128.64.0/18 ! -d 10.128.0.0/12 -j MASQUERADE",
        "-t filter FORWARD -i kohaku-overlay -j ACCEPT",
        "-t filter FORWARD -o kohaku-overlay -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
    ]
    comments = [r.comment("kohaku-overlay") for r in rules]
    assert len(set(comments)) == 3 and all(
        c.startswith(f"{COMMENT_PREFIX}:kohaku-overlay:") for c in comments
    )
    assert all(" " not in c for c in comments)  # one word in iptables -S output
    assert rules[0].argv("kohaku-overlay")[-4:] == ["--comment", comments[0], "-j", "MASQUERADE"]
    # Another runner id gives another masquerade rule (a stale one is recognised by its comment).
    other = layout(runner_id=2).firewall("kohaku-overlay")
    assert other[0].comment("kohaku-overlay") != comments[0]
    assert other[1].comment("kohaku-overlay") == comments[1]


def test_docker_network_wanted() -> None:
    out = layout()
    assert docker_auto_range(out.subnet) == NET("10.128.64.0/19")
    info = NetworkInfo(
        id="x",
        name="kohakuriver-overlay",
        driver="bridge",
        subnet="10.128.64.0/18",
        gateway="10.128.64.1",
        labels={},
        options={
            BRIDGE_OPTION: "kohaku-overlay",
            MTU_OPTION: "1450",
            "com.docker.network.bridge.enable_ip_masquerade": "false",
            "com.docker.network.bridge.enable_icc": "true",
        },
        ip_range="10.128.64.0/19",
        aux_addresses={HOST_AUX_NAME: "10.128.64.254"},
    )
    assert docker_network_differences(info, out, "kohaku-overlay") == []
    moved = layout(runner_id=2)
    problems = docker_network_differences(info, moved, "kohaku-overlay")
    assert any(p.startswith("subnet 10.128.64.0/18 (wanted 10.128.128.0/18)") for p in problems)
    assert docker_network_differences(info, out, "other-br")[0].startswith("options")


PLACEMENT = OverlayPlacement(
    network="kohakuriver-overlay",
    subnet=NET("10.128.64.0/18"),
    gateway=IP("10.128.64.1"),
    reserved=frozenset({IP("10.128.64.254")}),
    bridge="kohaku-overlay",
)


def config(**overrides):
    return runner_config_from({"RUNNER_HOSTNAME": "node1", "DOCKER_NETWORK_NAME": "kr-net", **overrides})


def request(**kwargs) -> ExecuteRequest:
    return ExecuteRequest(task_id=42, command="sleep", **kwargs)


FACTS = NodeFacts(cpu_count=4)


def test_container_on_the_overlay() -> None:
    spec = build_container_spec(request(), config(), FACTS, "img", overlay=PLACEMENT)
    assert spec.network == "kohakuriver-overlay" and spec.ipv4_address is None
    fixed = build_container_spec(
        request(overlay_ip="10.128.100.7"), config(), FACTS, "img", overlay=PLACEMENT
    )
    assert fixed.ipv4_address == "10.128.100.7"
    body = fixed.to_api()
    assert body["HostConfig"]["NetworkMode"] == "kohakuriver-overlay"
    assert body["NetworkingConfig"] == {
        "EndpointsConfig": {"kohakuriver-overlay": {"IPAMConfig": {"IPv4Address": "10.128.100.7"}}}
    }
    # A Docker VPS keeps the base spec's network and address.
    vps = build_vps_spec(fixed, request(overlay_ip="10.128.100.7"), ssh_port=None, bind_ip="0.0.0.0")
    assert (vps.network, vps.ipv4_address) == ("kohakuriver-overlay", "10.128.100.7")
    # Off the overlay: the task network.
    assert build_container_spec(request(), config(), FACTS, "img").network == "kr-net"


@pytest.mark.parametrize(
    ("ip", "reason"),
    [
        ("10.128.128.5", "not in this runner's overlay subnet"),
        ("10.128.64.1", "reserved"),
        ("10.128.64.254", "reserved"),
        ("10.128.64.0", "reserved"),
        ("10.128.127.255", "reserved"),
    ],
)
def test_overlay_address_refusals(ip: str, reason: str) -> None:
    with pytest.raises(SpecError, match=reason):
        build_container_spec(request(overlay_ip=ip), config(), FACTS, "img", overlay=PLACEMENT)


def test_overlay_address_without_overlay_is_refused() -> None:
    with pytest.raises(SpecError, match="overlay network is not up"):
        build_container_spec(request(overlay_ip="10.128.64.9"), config(), FACTS, "img")


def test_tunnel_url_on_the_overlay_gateway() -> None:
    assert tunnel_url(config()) == "ws://172.30.0.1:8001"
    assert tunnel_url(config(), "10.128.64.1") == "ws://10.128.64.1:8001"


def test_underlay_address() -> None:
    assert config().overlay_underlay_address("http://10.1.2.3:8001") == "10.1.2.3"
    assert (
        config(OVERLAY_UNDERLAY_ADDRESS="192.0.2.7").overlay_underlay_address("http://10.1.2.3:8001")
        == "192.0.2.7"
    )
    assert config().overlay_underlay_address("http://localhost:8001") == "127.0.0.1"
    with pytest.raises(ValueError, match="OVERLAY_UNDERLAY_ADDRESS"):
        config().overlay_underlay_address("http://[fd00::1]:8001")


def test_manager_view_and_placement_before_registration() -> None:
    manager = OverlayManager(config(OVERLAY_ENABLED=True, OVERLAY_MODE="mesh"), docker=None)  # type: ignore[arg-type]
    assert manager.settings_view() == OverlaySettingsView(
        enabled=True, subnet=SUBNET, vxlan_id=100, vxlan_port=4789, mtu=1450, mode=OverlayMode.MESH
    )
    assert manager.placement() is None and manager.problem == "not registered with the host yet"
    assert manager.network.bridge == "kohaku-overlay" and manager.network.vxlan == "vxlan0"


def answer(body: object) -> httpx.Response:
    return httpx.Response(200, json=body)


def test_heartbeat_answer() -> None:
    assert _beat_answer(answer({"kill": [5]})) == ([5], None)
    kill, peers = _beat_answer(
        answer(
            {
                "kill": [],
                "overlay_peers": [{"runner_id": 2, "hostname": "b", "underlay_address": "192.0.2.12"}],
            }
        )
    )
    assert kill == [] and peers == [OverlayPeer(runner_id=2, hostname="b", underlay_address="192.0.2.12")]
    # Peers that cannot be read do not cost the kill list.
    assert _beat_answer(answer({"kill": [7], "overlay_peers": [{"runner_id": "x"}]})) == ([7], None)
    assert _beat_answer(httpx.Response(200, text="not json")) == ([], None)


def test_colocated_layout() -> None:
    """Host and runner in one namespace (``kr up``): no VXLAN to the host, only the runner's subnet."""
    out = layout(OverlayMode.MESH, [peer(2, "192.0.2.12")], local="192.0.2.1")
    assert out.colocated
    assert out.routes() == {Route(NET("10.128.64.0/18"))}
    assert out.flood_entries() == {} and out.mac_entries() == {} and out.neighbours() == {}
    assert not layout().colocated
