"""Overlay models: JSON round trips, the older register/heartbeat bodies, the new fields of the existing
models, errors that name the field, and OVERLAY_MODE in both daemons' settings."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import types

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kohakuriver_proto import ValidationError
from kohakuriver_proto import converter as conv
from kohakuriver_proto import overlay as ov
from kohakuriver_proto.lifecycle import TaskStatus
from kohakuriver_proto.models import (
    CommandTaskSpec,
    ExecuteRequest,
    HeartbeatAnswer,
    IpReservation,
    NodeRegistration,
    OverlayAssignment,
    OverlayMode,
    OverlayPeer,
    OverlayRunnerView,
    OverlaySettingsView,
    OverlayStatus,
    RegisterAnswer,
    ReserveRequest,
    StatusUpdate,
    TaskRecord,
    VpsSpec,
)
from kohakuriver_proto.settings import SettingsError, load_settings, render_template

KEY = b"k" * 32

ipv4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
hostnames = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,20}[A-Za-z0-9])?", fullmatch=True)
times = st.datetimes(
    min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2100, 1, 1), timezones=st.just(dt.UTC)
)
ids = st.integers(0, (1 << 63) - 1)
runner_ids = st.integers(1, ov.MAX_RUNNER_ID)
modes = st.sampled_from(list(OverlayMode))
messages = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=30)
subnets = st.sampled_from(["10.128.0.0/12/6/14", "10.0.0.0/8/8/16", "172.16.0.0/16/8/8"])


@st.composite
def plan_texts_and_ids(draw):
    text = draw(subnets)
    plan = ov.parse_overlay_subnet(text)
    return text, draw(st.integers(1, ov.max_runners(plan)))


settings_views = st.builds(
    OverlaySettingsView,
    enabled=st.booleans(),
    subnet=subnets,
    vxlan_id=st.integers(1, 2**24 - 1),
    vxlan_port=st.integers(1, 65535),
    mtu=st.integers(576, 9216),
    mode=modes,
)
peers = st.builds(OverlayPeer, runner_id=runner_ids, hostname=hostnames, underlay_address=ipv4)
peer_lists = st.lists(peers, max_size=4, unique_by=lambda p: p.runner_id)


@st.composite
def assignments(draw):
    text, rid = draw(plan_texts_and_ids())
    view = OverlaySettingsView(
        enabled=True,
        subnet=text,
        vxlan_id=draw(st.integers(1, 2**20)),
        vxlan_port=4789,
        mtu=1450,
        mode=OverlayMode.MESH,
    )
    others = draw(peer_lists.map(lambda ps: [p for p in ps if p.runner_id != rid]))
    return ov.build_assignment(view, rid, draw(ipv4), others)


@st.composite
def reservations(draw):
    claim = ov.ReservationClaim(
        draw(ipv4), draw(hostnames), draw(runner_ids), draw(st.integers(0, 2**34)), "n1"
    )
    return IpReservation(
        token=ov.sign_reservation(KEY, claim),
        ip=claim.ip,
        node=claim.node,
        expires_at=draw(times),
        used_by=draw(st.none() | ids),
    )


@st.composite
def runner_views(draw):
    text, rid = draw(plan_texts_and_ids())
    return OverlayRunnerView(
        runner_id=rid,
        hostname=draw(hostnames),
        subnet=str(ov.runner_subnet(ov.parse_overlay_subnet(text), rid)),
        link=ov.link_name(rid),
        underlay_address=draw(ipv4),
        active=draw(st.booleans()),
        last_seen=draw(st.none() | times),
    )


MODELS = {
    OverlaySettingsView: settings_views,
    OverlayPeer: peers,
    OverlayAssignment: assignments(),
    RegisterAnswer: st.builds(
        RegisterAnswer,
        message=messages,
        overlay=st.none() | assignments(),
        overlay_error=st.none(),
    )
    | st.builds(RegisterAnswer, message=messages, overlay_error=messages),
    HeartbeatAnswer: st.builds(
        HeartbeatAnswer, kill=st.lists(ids, max_size=4), overlay_peers=st.none() | peer_lists
    ),
    ReserveRequest: st.builds(
        ReserveRequest, node=hostnames, ip=st.none() | ipv4, ttl_seconds=st.integers(60, 1800)
    ),
    IpReservation: reservations(),
    OverlayRunnerView: runner_views(),
    OverlayStatus: st.builds(
        OverlayStatus,
        enabled=st.booleans(),
        mode=st.none() | modes,
        subnet=st.none() | subnets,
        host_overlay_address=st.none() | st.just("10.128.0.1/12"),
        runners=st.lists(runner_views(), max_size=3),
        reservations=st.lists(reservations(), max_size=3),
    ),
}


@pytest.mark.parametrize("cls", list(MODELS), ids=lambda c: c.__name__)
def test_every_overlay_model_round_trips_through_json(cls):
    @settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow])
    @given(MODELS[cls])
    def check(obj):
        raw = conv.unstructure(obj)
        assert json.loads(json.dumps(raw)) == raw
        assert conv.structure(raw, cls) == obj
        assert conv.loads(conv.dumps(obj), cls) == obj

    check()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)


@pytest.mark.parametrize("cls", list(MODELS), ids=lambda c: c.__name__)
def test_garbage_and_broken_fields_only_ever_raise_validation_error(cls):
    @settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
    @given(MODELS[cls], json_values, st.data())
    def check(obj, garbage, data):
        for candidate in (garbage, {**conv.unstructure(obj)}):
            if isinstance(candidate, dict) and candidate:
                candidate[data.draw(st.sampled_from(sorted(candidate)))] = data.draw(json_values)
            try:
                conv.structure(candidate, cls)
            except ValidationError as exc:
                assert exc.field and exc.message

    check()


# -- older bodies still parse --------------------------------------------------------------------------------


def test_the_older_register_and_heartbeat_answers_parse():
    assert conv.loads('{"message": "node n1 registered"}', RegisterAnswer) == RegisterAnswer(
        message="node n1 registered"
    )
    answer = conv.loads('{"kill": ["7", "123456789012345678"]}', HeartbeatAnswer)
    assert answer.kill == [7, 123456789012345678] and answer.overlay_peers is None
    assert conv.loads('{"kill": []}', HeartbeatAnswer) == HeartbeatAnswer()
    # and a newer host's extra keys do not trouble them
    assert conv.loads('{"kill": [], "later": 1}', HeartbeatAnswer) == HeartbeatAnswer()


def test_heartbeat_answers_are_written_as_before():
    assert conv.unstructure(HeartbeatAnswer(kill=[7])) == {"kill": ["7"], "overlay_peers": None}


def test_bodies_without_the_overlay_fields_parse():
    reg = conv.structure(
        {"hostname": "n1", "url": "http://10.0.0.5:8001", "total_cores": 4, "memory_total_bytes": 1 << 30},
        NodeRegistration,
    )
    assert reg.overlay is None and reg.underlay_address is None
    assert conv.structure({"task_id": "5", "status": "running"}, StatusUpdate).overlay_ip is None
    assert conv.structure({"task_id": "5", "command": "true"}, ExecuteRequest).overlay_ip is None
    record = conv.structure(
        {"task_id": "5", "task_type": "command", "status": "running", "submitted_at": 0, "command": "x"},
        TaskRecord,
    )
    assert record.overlay_ip is None
    assert CommandTaskSpec(command="true").ip_token is None and VpsSpec().ip_token is None


def test_the_new_fields_round_trip():
    view = OverlaySettingsView(
        enabled=True, subnet="10.128.0.0/12/6/14", vxlan_id=100, vxlan_port=4789, mtu=1450
    )
    reg = NodeRegistration(
        hostname="n1",
        url="http://n1:8001",
        total_cores=4,
        memory_total_bytes=1,
        overlay=view,
        underlay_address="192.0.2.5",
    )
    raw = conv.unstructure(reg)
    assert raw["overlay"]["mode"] == "hub" and raw["underlay_address"] == "192.0.2.5"
    assert conv.structure(raw, NodeRegistration) == reg
    token = ov.sign_reservation(KEY, ov.ReservationClaim("10.128.64.9", "n1", 1, 2000, "n"))
    for model in (
        CommandTaskSpec(command="true", targets=["n1"], ip_token=token),
        VpsSpec(ip_token=token),
        ExecuteRequest(task_id=5, command="true", overlay_ip="10.128.64.9"),
        StatusUpdate(task_id=5, status=TaskStatus.RUNNING, overlay_ip="10.128.64.9"),
    ):
        assert conv.loads(conv.dumps(model), type(model)) == model


# -- bad fields are named ------------------------------------------------------------------------------------

REG = {"hostname": "n1", "url": "http://10.0.0.5:8001", "total_cores": 4, "memory_total_bytes": 1 << 30}
VIEW = {"enabled": True, "subnet": "10.128.0.0/12/6/14", "vxlan_id": 100, "vxlan_port": 4789, "mtu": 1450}
ASSIGNMENT = {
    "runner_id": 1,
    "subnet": "10.128.64.0/18",
    "gateway": "10.128.64.1",
    "host_address": "10.128.64.254",
    "host_overlay_address": "10.128.0.1/12",
    "vni": 101,
    "vxlan_port": 4789,
    "mtu": 1450,
    "host_underlay_address": "192.0.2.1",
    "mode": "hub",
}
PEER = {"runner_id": 2, "hostname": "n2", "underlay_address": "192.0.2.2"}


@pytest.mark.parametrize(
    ("cls", "data", "field", "fragment"),
    [
        (
            NodeRegistration,
            {**REG, "overlay": {**VIEW, "subnet": "10.128.0.0/12/6"}},
            "overlay.subnet",
            "BASE/",
        ),
        (NodeRegistration, {**REG, "overlay": {**VIEW, "mode": "ring"}}, "overlay.mode", "'hub'"),
        (NodeRegistration, {**REG, "overlay": {**VIEW, "vxlan_id": 0}}, "overlay.vxlan_id", ">= 1"),
        (NodeRegistration, {**REG, "overlay": {**VIEW, "mtu": 100}}, "overlay.mtu", ">= 576"),
        (NodeRegistration, {**REG, "underlay_address": "n1.lab"}, "underlay_address", "IPv4"),
        (OverlayAssignment, {**ASSIGNMENT, "gateway": "10.128.128.1"}, "gateway", "not inside"),
        (OverlayAssignment, {**ASSIGNMENT, "host_address": "10.128.64.1"}, "host_address", "differ"),
        (OverlayAssignment, {**ASSIGNMENT, "subnet": "10.128.64.1/18"}, "subnet", "host bits"),
        (OverlayAssignment, {**ASSIGNMENT, "subnet": "10.128.64.0/33"}, "subnet", "address/prefix"),
        (OverlayAssignment, {**ASSIGNMENT, "vni": 2**24}, "vni", "<="),
        (OverlayAssignment, {**ASSIGNMENT, "peers": [PEER, PEER]}, "peers[1].runner_id", "duplicate"),
        (
            OverlayAssignment,
            {**ASSIGNMENT, "peers": [{**PEER, "runner_id": 1}]},
            "peers[0].runner_id",
            "own peer",
        ),
        (
            OverlayAssignment,
            {**ASSIGNMENT, "peers": [{**PEER, "underlay_address": "::1"}]},
            "peers[0].underlay_address",
            "",
        ),
        (
            RegisterAnswer,
            {"message": "x", "overlay": ASSIGNMENT, "overlay_error": "y"},
            "overlay_error",
            "not both",
        ),
        (RegisterAnswer, {}, "message", "required"),
        (HeartbeatAnswer, {"kill": ["x"]}, "kill[0]", "decimal"),
        (HeartbeatAnswer, {"overlay_peers": [PEER, PEER]}, "overlay_peers[1].runner_id", "duplicate"),
        (ReserveRequest, {"node": "n1", "ttl_seconds": 59}, "ttl_seconds", ">= 60"),
        (ReserveRequest, {"node": "n1", "ttl_seconds": 1801}, "ttl_seconds", "<= 1800"),
        (ReserveRequest, {"node": "n1", "ip": "10.0.0.256"}, "ip", "IPv4"),
        (ReserveRequest, {"node": "n1", "ip": "010.0.0.1"}, "ip", "IPv4"),
        (ReserveRequest, {"node": "-n1"}, "node", "hostname"),
        (
            IpReservation,
            {"token": "abc", "ip": "10.0.0.1", "node": "n1", "expires_at": 0},
            "token",
            "reservation token",
        ),
        (
            OverlayStatus,
            {"enabled": True, "host_overlay_address": "10.128.0.1"},
            "host_overlay_address",
            "prefix",
        ),
        (CommandTaskSpec, {"command": "true", "ip_token": "nope"}, "ip_token", "reservation token"),
        (VpsSpec, {"ip_token": 5}, "ip_token", "string"),
        (ExecuteRequest, {"task_id": "1", "command": "x", "overlay_ip": "10.0.0"}, "overlay_ip", "IPv4"),
        (StatusUpdate, {"task_id": "1", "status": "running", "overlay_ip": "::1"}, "overlay_ip", "IPv4"),
    ],
)
def test_bad_fields_are_named(cls, data, field, fragment):
    with pytest.raises(ValidationError) as info:
        conv.structure(data, cls)
    assert info.value.field == field
    assert fragment in info.value.message


def test_a_reserved_address_serves_one_task():
    token = ov.sign_reservation(KEY, ov.ReservationClaim("10.128.64.9", "n1", 1, 2000, "n"))
    with pytest.raises(ValidationError) as info:
        CommandTaskSpec(command="true", targets=["n1", "n2"], ip_token=token)
    assert info.value.field == "ip_token"


def test_reserve_request_defaults():
    assert conv.structure({"node": "n1"}, ReserveRequest) == ReserveRequest(
        node="n1", ip=None, ttl_seconds=300
    )


# -- OVERLAY_MODE in both daemons' settings ------------------------------------------------------------------


def _schemas():
    from kohakuriver_host.config import HOST_SCHEMA
    from kohakuriver_runner.config import RUNNER_SCHEMA

    return [HOST_SCHEMA, RUNNER_SCHEMA]


@pytest.mark.parametrize("schema", _schemas(), ids=["host", "runner"])
def test_overlay_mode_setting(schema):
    assert schema.defaults().OVERLAY_MODE is OverlayMode.HUB
    assert load_settings(schema, 'OVERLAY_MODE = "mesh"\n', "c.py").OVERLAY_MODE is OverlayMode.MESH
    with pytest.raises(SettingsError) as info:
        load_settings(schema, 'OVERLAY_MODE = "ring"\n', "c.py")
    assert info.value.field == "OVERLAY_MODE" and "'hub', 'mesh'" in str(info.value)
    text = render_template(schema)
    assert "OVERLAY_MODE: OverlayMode = OverlayMode.HUB" in text
    assert load_settings(schema, text, "c.py") == schema.defaults()
    view = OverlaySettingsView.from_config(load_settings(schema, 'OVERLAY_MODE = "mesh"\n', "c.py"))
    assert view.mode is OverlayMode.MESH and view.subnet == "10.128.0.0/12/6/14" and not view.enabled


def test_settings_view_from_an_older_config_object():
    old = types.SimpleNamespace(
        OVERLAY_ENABLED=True,
        OVERLAY_SUBNET="10.0.0.0/8/8/16",
        OVERLAY_VXLAN_ID=7,
        OVERLAY_VXLAN_PORT=4789,
        OVERLAY_MTU=1450,
    )
    assert OverlaySettingsView.from_config(old).mode is OverlayMode.HUB
