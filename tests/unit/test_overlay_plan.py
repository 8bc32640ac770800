"""The overlay address plan, VXLAN ids, link names, mesh FDB diffs and the host/runner settings comparison.

Properties over random valid plans (every BASE/TOTAL_PREFIX/NODE_BITS/SUBNET_BITS the settings accept) and
runner ids, plus the values of the original's documented examples.
"""

from __future__ import annotations

import ipaddress

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kohakuriver_proto import ValidationError
from kohakuriver_proto import overlay as ov
from kohakuriver_proto.models import OverlayMode, OverlayPeer, OverlaySettingsView

# -- strategies ----------------------------------------------------------------------------------------------


@st.composite
def plans(draw):
    """Any plan ``parse_overlay_subnet`` accepts, with a random base, built from its text."""
    node = draw(st.integers(1, 16))
    subnet = draw(st.integers(8, 31 - node))
    total = 32 - node - subnet  # 1 .. 23, inside TOTAL_PREFIX's 1 .. 24
    base = draw(st.integers(0, 2**32 - 1)) >> (32 - total) << (32 - total)
    return ov.parse_overlay_subnet(f"{ipaddress.IPv4Address(base)}/{total}/{node}/{subnet}")


@st.composite
def plan_and_id(draw):
    plan = draw(plans())
    return plan, draw(st.integers(1, ov.max_runners(plan)))


@st.composite
def plan_and_two_ids(draw):
    plan = draw(plans().filter(lambda p: ov.max_runners(p) >= 2))
    a = draw(st.integers(1, ov.max_runners(plan)))
    b = draw(st.integers(1, ov.max_runners(plan)).filter(lambda x: x != a))
    return plan, a, b


DEFAULT = ov.parse_overlay_subnet("10.128.0.0/12/6/14")

# -- known values --------------------------------------------------------------------------------------------


def test_default_plan_matches_the_original():
    assert ov.max_runners(DEFAULT) == 63
    assert ov.runner_subnet(DEFAULT, 1) == ipaddress.IPv4Network("10.128.64.0/18")
    assert ov.runner_gateway(DEFAULT, 1) == ipaddress.IPv4Address("10.128.64.1")
    assert ov.host_address_on(DEFAULT, 1) == ipaddress.IPv4Address("10.128.64.254")
    assert ov.host_overlay_address(DEFAULT) == ipaddress.IPv4Interface("10.128.0.1/12")
    assert ov.container_range(DEFAULT, 1) == (
        ipaddress.IPv4Address("10.128.64.2"),
        ipaddress.IPv4Address("10.128.127.254"),
    )
    assert ov.runner_subnet(DEFAULT, 63) == ipaddress.IPv4Network("10.143.192.0/18")
    assert ov.vni(100, 1) == 101
    assert ov.link_name(1) == "vxkr1"
    assert ov.link_name(35) == "vxkrz"
    assert ov.link_name(36) == "vxkr10"


def test_eight_bit_plan():
    plan = ov.parse_overlay_subnet("10.0.0.0/8/8/16")
    assert ov.max_runners(plan) == 255
    assert ov.runner_subnet(plan, 255) == ipaddress.IPv4Network("10.255.0.0/16")
    assert ov.host_overlay_address(plan) == ipaddress.IPv4Interface("10.0.0.1/8")


def test_a_24_subnet_ends_its_range_before_the_host_address():
    plan = ov.parse_overlay_subnet("10.0.0.0/16/8/8")
    assert ov.runner_subnet(plan, 3) == ipaddress.IPv4Network("10.0.3.0/24")
    assert ov.container_range(plan, 3) == (
        ipaddress.IPv4Address("10.0.3.2"),
        ipaddress.IPv4Address("10.0.3.253"),
    )
    assert ov.host_address_on(plan, 3) == ipaddress.IPv4Address("10.0.3.254")
    assert not ov.is_container_address(plan, 3, "10.0.3.254")
    assert not ov.is_container_address(plan, 3, "10.0.3.255")
    assert ov.is_container_address(plan, 3, "10.0.3.253")


def test_the_host_address_inside_a_larger_range_is_not_a_container_address():
    assert not ov.is_container_address(DEFAULT, 1, "10.128.64.254")
    assert ov.is_container_address(DEFAULT, 1, "10.128.64.253")
    assert ov.is_container_address(DEFAULT, 1, "10.128.64.255")  # not special in a /18
    assert not ov.is_container_address(DEFAULT, 1, "10.128.64.1")
    assert not ov.is_container_address(DEFAULT, 1, "10.128.64.0")
    assert not ov.is_container_address(DEFAULT, 1, "10.128.127.255")
    assert not ov.is_container_address(DEFAULT, 1, "10.128.128.5")  # runner 2's


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("10.128.0.0/12/6", "BASE/TOTAL_PREFIX/NODE_BITS/SUBNET_BITS"),
        ("10.128.0.0/12/6/15", "must be 32"),
        ("10.128.0.1/12/6/14", "host bits"),  # a base that overlaps the previous /12
        ("10.300.0.0/12/6/14", "BASE must be an IPv4 address"),
        ("10.0.0.0/4/20/8", "NODE_BITS"),
        ("10.0.0.0/26/0/6", "TOTAL_PREFIX"),
        ("10.0.0.0/16/10/6", "SUBNET_BITS"),
        ("10.0.0.0/a/8/16", "integers"),
    ],
)
def test_bad_plans_are_refused_with_the_reason(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        ov.parse_overlay_subnet(text)


@pytest.mark.parametrize("bad", [0, 64, -1, True, "1", 1.0, None])
def test_runner_ids_outside_the_plan_are_refused(bad):
    for check in (ov.check_runner_id, ov.runner_subnet, ov.runner_gateway, ov.host_address_on):
        with pytest.raises(ValidationError) as info:
            check(DEFAULT, bad)
        assert info.value.field == "runner_id"
    with pytest.raises(ValidationError, match="NODE_BITS 6 of OVERLAY_SUBNET allows 63 runners"):
        ov.check_runner_id(DEFAULT, 64)


@pytest.mark.parametrize("bad", ["10.128.64", "10.128.64.2/18", "::1", "", 167772160, None])
def test_bad_addresses_are_validation_errors(bad):
    with pytest.raises(ValidationError) as info:
        ov.is_container_address(DEFAULT, 1, bad)
    assert info.value.field == "ip"
    with pytest.raises(ValidationError):
        ov.runner_of_address(DEFAULT, bad)


# -- properties of the plan ----------------------------------------------------------------------------------


@given(plan_and_two_ids())
def test_runner_subnets_are_disjoint_and_inside_the_overlay(case):
    plan, a, b = case
    sa, sb = ov.runner_subnet(plan, a), ov.runner_subnet(plan, b)
    assert not sa.overlaps(sb)
    for subnet in (sa, sb):
        assert subnet.subnet_of(plan.network)
        assert subnet.prefixlen == 32 - plan.subnet_bits
    host = ov.host_overlay_address(plan)
    assert host.network == plan.network
    assert host.ip not in sa and host.ip not in sb


@given(plan_and_id())
def test_gateway_host_address_and_container_range_sit_inside_the_subnet(case):
    plan, rid = case
    subnet = ov.runner_subnet(plan, rid)
    gateway, host = ov.runner_gateway(plan, rid), ov.host_address_on(plan, rid)
    first, last = ov.container_range(plan, rid)
    for address in (gateway, host, first, last):
        assert address in subnet and subnet.network_address < address < subnet.broadcast_address
    assert gateway == subnet.network_address + 1 and host == subnet.network_address + 254
    assert gateway < first <= last < subnet.broadcast_address
    for special in (subnet.network_address, gateway, host, subnet.broadcast_address):
        assert not ov.is_container_address(plan, rid, special)
    assert ov.is_container_address(plan, rid, first) and ov.is_container_address(plan, rid, str(last))


@given(plan_and_id(), st.data())
def test_runner_of_address_inverts_runner_subnet(case, data):
    plan, rid = case
    subnet = ov.runner_subnet(plan, rid)
    offset = data.draw(st.integers(0, subnet.num_addresses - 1))
    address = subnet.network_address + offset
    assert ov.runner_of_address(plan, address) == rid
    assert ov.runner_of_address(plan, str(address)) == rid
    assert ov.is_container_address(plan, rid, address) == (
        2 <= offset <= subnet.num_addresses - 2 and offset != 254
    )


@given(plans(), st.data())
def test_addresses_outside_every_runner_belong_to_none(plan, data):
    block0 = int(plan.network.network_address) + data.draw(st.integers(0, 2**plan.subnet_bits - 1))
    assert ov.runner_of_address(plan, ipaddress.IPv4Address(block0)) is None
    outside = data.draw(
        st.integers(0, 2**32 - 1).filter(lambda n: ipaddress.IPv4Address(n) not in plan.network)
    )
    assert ov.runner_of_address(plan, ipaddress.IPv4Address(outside)) is None


# -- VXLAN ids and link names --------------------------------------------------------------------------------


@given(st.integers(1, ov.VXLAN_MAX_ID), st.integers(0, ov.MAX_RUNNER_ID))
def test_vni_is_base_plus_id_within_24_bits(base, rid):
    if base + rid <= ov.VXLAN_MAX_ID:
        assert ov.vni(base, rid) == base + rid
    else:
        with pytest.raises(ValidationError, match="exceeds the largest VXLAN id"):
            ov.vni(base, rid)


@pytest.mark.parametrize(
    ("base", "rid"), [(0, 1), (2**24, 0), (100, -1), (100, 2**16), (True, 1), (100, "1")]
)
def test_vni_refuses_impossible_inputs(base, rid):
    with pytest.raises(ValidationError):
        ov.vni(base, rid)


@given(st.integers(1, ov.MAX_RUNNER_ID))
def test_link_name_round_trip_and_length(rid):
    name = ov.link_name(rid)
    assert len(name) <= 15 and name.startswith("vxkr") and name.isascii() and name.isalnum()
    assert ov.runner_id_of_link(name) == rid


@given(st.text(max_size=20) | st.from_regex(r"vxkr[0-9a-zA-Z_ +-]{0,6}", fullmatch=True))
def test_only_canonical_link_names_decode(name):
    rid = ov.runner_id_of_link(name)
    assert rid is None or ov.link_name(rid) == name


@pytest.mark.parametrize(
    "name",
    [
        "vxkr",
        "vxkr0",
        "vxkr01",
        "VXKR1",
        "vxkrA",
        "vxkr1_0",
        "vxkr 1",
        "vxkr+1",
        "vxkr1ekg",
        "eth0",
        "vxlan0",
    ],
)
def test_other_names_are_no_runner_links(name):
    assert ov.runner_id_of_link(name) is None


@pytest.mark.parametrize("bad", [0, -1, 2**16, True, "1"])
def test_link_name_refuses_bad_ids(bad):
    with pytest.raises(ValidationError):
        ov.link_name(bad)


# -- mesh forwarding entries ---------------------------------------------------------------------------------

peer_maps = st.dictionaries(
    st.integers(1, 20), st.sampled_from(["192.0.2.1", "192.0.2.2", "192.0.2.3"]), max_size=8
)


@given(peer_maps, peer_maps)
def test_fdb_changes_turn_current_into_wanted(current, wanted):
    to_add, to_remove = ov.fdb_changes(current, wanted)
    result = dict(current)
    for rid, ip in to_remove.items():
        assert result.pop(rid) == ip  # only entries that exist are removed
    for rid, ip in to_add.items():
        assert rid not in result  # a changed address was removed first
        result[rid] = ip
    assert result == wanted
    # nothing that stays the same is touched
    unchanged = {rid for rid in current if wanted.get(rid) == current[rid]}
    assert not unchanged & (set(to_add) | set(to_remove))


def test_fdb_changes_changed_address_is_remove_and_add():
    assert ov.fdb_changes({1: "192.0.2.1", 2: "192.0.2.2"}, {1: "192.0.2.9", 3: "192.0.2.3"}) == (
        {1: "192.0.2.9", 3: "192.0.2.3"},
        {1: "192.0.2.1", 2: "192.0.2.2"},
    )


# -- settings comparison and assignment ----------------------------------------------------------------------

HOST_VIEW = OverlaySettingsView(
    enabled=True, subnet="10.128.0.0/12/6/14", vxlan_id=100, vxlan_port=4789, mtu=1450, mode=OverlayMode.HUB
)


def test_matching_settings_have_no_mismatch():
    assert ov.settings_mismatch(HOST_VIEW, HOST_VIEW) == []
    same_plan = attrs.evolve(HOST_VIEW, subnet="10.128.0.0/012/6/14")
    assert ov.settings_mismatch(HOST_VIEW, same_plan) == []


def test_every_differing_setting_is_named():
    runner = OverlaySettingsView(
        enabled=True, subnet="10.0.0.0/8/8/16", vxlan_id=200, vxlan_port=4790, mtu=1400, mode=OverlayMode.MESH
    )
    assert ov.settings_mismatch(HOST_VIEW, runner) == [
        "OVERLAY_SUBNET: host 10.128.0.0/12/6/14, runner 10.0.0.0/8/8/16",
        "OVERLAY_VXLAN_ID: host 100, runner 200",
        "OVERLAY_VXLAN_PORT: host 4789, runner 4790",
        "OVERLAY_MTU: host 1450, runner 1400",
        "OVERLAY_MODE: host hub, runner mesh",
    ]
    assert ov.settings_mismatch(HOST_VIEW, attrs.evolve(HOST_VIEW, enabled=False)) == [
        "OVERLAY_ENABLED: host True, runner False"
    ]


def test_nothing_matters_when_both_sides_are_off():
    off = attrs.evolve(HOST_VIEW, enabled=False)
    assert ov.settings_mismatch(off, attrs.evolve(off, mtu=1400, mode=OverlayMode.MESH)) == []


@given(plan_and_id(), st.sampled_from(list(OverlayMode)))
@settings(max_examples=50)
def test_build_assignment_agrees_with_the_plan(case, mode):
    plan, rid = case
    text = f"{plan.network.network_address}/{plan.network.prefixlen}/{plan.node_bits}/{plan.subnet_bits}"
    view = attrs.evolve(HOST_VIEW, subnet=text, vxlan_id=1, mode=mode)
    others = [r for r in (3, 1, 2) if r != rid][:2]
    peers = [OverlayPeer(runner_id=r, hostname=f"n{r}", underlay_address="192.0.2.7") for r in others]
    a = ov.build_assignment(view, rid, "192.0.2.1", peers)
    assert a.subnet == str(ov.runner_subnet(plan, rid))
    assert a.gateway == str(ov.runner_gateway(plan, rid))
    assert a.host_address == str(ov.host_address_on(plan, rid))
    assert a.host_overlay_address == str(ov.host_overlay_address(plan))
    assert a.vni == 1 + rid and a.mode is mode and a.host_underlay_address == "192.0.2.1"
    assert [p.runner_id for p in a.peers] == (sorted(others) if mode is OverlayMode.MESH else [])
