"""The guest agent's heartbeat message and ``AgentWatch`` (kohakuriver_proto.agent).

The shared vectors (tests/vectors/agent_heartbeat.json) are the contract with the Rust agent
(tunnel-client-rs/tests/agent_vectors.rs checks its encoder against the same file): canonical texts are
produced byte for byte by both encoders, accepted ones only read; unknown types and invalid messages are
what a reader must ignore or refuse.
"""

from __future__ import annotations

import datetime as dt
import json
import pathlib

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kohakuriver_proto.agent import (
    HEARTBEAT_TYPE,
    MAX_GPUS,
    MAX_HOSTNAME,
    MAX_LOAD,
    MAX_MESSAGE,
    MAX_UPTIME,
    AgentHeartbeat,
    AgentWatch,
    UnknownAgentMessage,
    encode_agent_message,
    parse_agent_message,
)
from kohakuriver_proto.errors import LocalProtocolError, ProtocolError, RemoteProtocolError, ValidationError
from kohakuriver_proto.models import VmAgentState, VmHealth

VECTORS = json.loads(
    (pathlib.Path(__file__).resolve().parents[1] / "vectors" / "agent_heartbeat.json").read_text()
)
INT64_MAX = (1 << 63) - 1
UTC = dt.UTC


def heartbeat(**changes) -> AgentHeartbeat:
    fields = dict(
        seq=0,
        hostname="vps-1",
        uptime_seconds=12.5,
        load1=0.5,
        load5=0.25,
        load15=0.0,
        memory_total_bytes=2 << 30,
        memory_available_bytes=1 << 30,
        disk_total_bytes=10 << 30,
        disk_free_bytes=8 << 30,
        gpus=1,
    )
    fields.update(changes)
    return AgentHeartbeat(**fields)


# -- the shared vectors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("vector", VECTORS["canonical"], ids=lambda v: v["name"])
def test_canonical_vectors_encode_byte_for_byte_and_parse_back(vector):
    hb = AgentHeartbeat(**vector["fields"])
    assert encode_agent_message(hb) == vector["text"]
    assert parse_agent_message(vector["text"]) == hb
    assert vector["text"].isascii()


@pytest.mark.parametrize("vector", VECTORS["accepted"], ids=lambda v: v["name"])
def test_accepted_vectors_parse_to_their_fields(vector):
    assert parse_agent_message(vector["text"]) == AgentHeartbeat(**vector["fields"])


@pytest.mark.parametrize("vector", VECTORS["unknown_type"], ids=lambda v: v["name"])
def test_unknown_types_are_an_ignorable_result(vector):
    assert parse_agent_message(vector["text"]) == UnknownAgentMessage(vector["type"])


@pytest.mark.parametrize("vector", VECTORS["invalid"], ids=lambda v: v["name"])
def test_invalid_vectors_are_refused_naming_the_field(vector):
    if vector["field"] is None:
        with pytest.raises(RemoteProtocolError):
            parse_agent_message(vector["text"])
    else:
        with pytest.raises(ValidationError) as caught:
            parse_agent_message(vector["text"])
        assert caught.value.field == vector["field"]


def test_the_vectors_cover_every_field():
    fields = {f.name for f in attrs.fields(AgentHeartbeat)}
    assert set(VECTORS["canonical"][0]["fields"]) == fields
    assert fields <= {v["field"] for v in VECTORS["invalid"]}


# -- the message: limits and misuse --------------------------------------------------------------------------


def test_a_message_longer_than_the_limit_is_refused_before_parsing():
    text = encode_agent_message(heartbeat())
    padded = text[:-1] + "," + '"pad":"' + "x" * (MAX_MESSAGE - len(text) - 9) + '"}'
    assert len(padded) == MAX_MESSAGE
    assert parse_agent_message(padded) == heartbeat()
    with pytest.raises(RemoteProtocolError, match="at most"):
        parse_agent_message(padded[:-2] + 'x"}')


def test_deep_nesting_within_the_limit_is_a_protocol_error_not_a_recursion_error():
    depth = MAX_MESSAGE // 2
    with pytest.raises(RemoteProtocolError):
        parse_agent_message("[" * depth + "]" * depth)
    with pytest.raises(RemoteProtocolError):  # nested inside a heartbeat's ignored key
        parse_agent_message('{"type":"agent.heartbeat","x":' + "[" * 30000 + "]" * 30000 + "}")


def test_huge_integers_are_refused_as_values_or_as_json():
    text = encode_agent_message(heartbeat()).replace('"gpus":1', '"gpus":' + "9" * 5000)
    with pytest.raises(ProtocolError):
        parse_agent_message(text)
    with pytest.raises(ValidationError, match="gpus"):
        parse_agent_message(encode_agent_message(heartbeat()).replace('"gpus":1', '"gpus":' + "9" * 100))


def test_misuse_is_a_local_error():
    with pytest.raises(LocalProtocolError):
        parse_agent_message(b'{"type":"agent.heartbeat"}')  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        encode_agent_message(UnknownAgentMessage("x"))  # type: ignore[arg-type]


def test_the_model_validates_like_the_parser():
    with pytest.raises(ValidationError) as caught:
        heartbeat(load1=True)
    assert caught.value.field == "load1"
    with pytest.raises(ValidationError, match="hostname"):
        heartbeat(hostname="a\u2028b")
    with pytest.raises(ValidationError, match="version"):
        heartbeat(version=0)
    assert heartbeat(uptime_seconds=7).uptime_seconds == 7.0
    assert type(heartbeat(load15=3).load15) is float
    assert heartbeat(hostname="h" * MAX_HOSTNAME, gpus=MAX_GPUS, load1=MAX_LOAD, uptime_seconds=MAX_UPTIME)


def test_unknown_types_are_clipped():
    assert parse_agent_message(json.dumps({"type": "t" * 1000})) == UnknownAgentMessage("t" * 128)


# -- the message: properties ---------------------------------------------------------------------------------

hostnames = st.text(
    st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\u2028\u2029"),
    max_size=MAX_HOSTNAME,
)
counts = st.integers(0, INT64_MAX)
heartbeats = st.builds(
    AgentHeartbeat,
    seq=counts,
    hostname=hostnames,
    uptime_seconds=st.floats(0, MAX_UPTIME) | st.integers(0, int(MAX_UPTIME)),
    load1=st.floats(0, MAX_LOAD),
    load5=st.floats(0, MAX_LOAD),
    load15=st.floats(0, MAX_LOAD),
    memory_total_bytes=counts,
    memory_available_bytes=counts,
    disk_total_bytes=counts,
    disk_free_bytes=counts,
    gpus=st.integers(0, MAX_GPUS),
    version=st.integers(1, 5),
)


@given(heartbeats)
def test_every_heartbeat_round_trips(hb):
    text = encode_agent_message(hb)
    assert text.isascii() and len(text) <= MAX_MESSAGE
    assert parse_agent_message(text) == hb
    keys = list(json.loads(text))
    assert keys[:2] == ["type", "version"] and keys[2:] == [
        f.name for f in attrs.fields(AgentHeartbeat) if f.name != "version"
    ]
    assert json.loads(text)["type"] == HEARTBEAT_TYPE


def _parse_or_documented_error(text: str) -> None:
    try:
        result = parse_agent_message(text)
    except (RemoteProtocolError, ValidationError):
        return
    assert isinstance(result, AgentHeartbeat | UnknownAgentMessage)


@given(st.text(max_size=300))
def test_garbage_text_raises_only_the_documented_errors(text):
    _parse_or_documented_error(text)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@given(json_values)
def test_any_json_raises_only_the_documented_errors(value):
    _parse_or_documented_error(json.dumps(value))


@given(heartbeats, st.data())
@settings(max_examples=300)
def test_a_heartbeat_with_one_field_broken_is_refused_naming_it_or_still_valid(hb, data):
    body = json.loads(encode_agent_message(hb))
    key = data.draw(st.sampled_from(sorted(body)))
    body[key] = data.draw(json_values)
    if data.draw(st.booleans()):
        del body[key]
    try:
        result = parse_agent_message(json.dumps(body))
    except ValidationError as exc:
        assert exc.field == key
        return
    except RemoteProtocolError:
        assert key == "type"
        return
    if key == "type" and body.get("type") != HEARTBEAT_TYPE:
        assert isinstance(result, UnknownAgentMessage)
    else:
        assert isinstance(result, AgentHeartbeat)


# -- AgentWatch ----------------------------------------------------------------------------------------------

W, H, U = VmAgentState.WAITING, VmAgentState.HEALTHY, VmAgentState.UNHEALTHY


def test_waiting_then_healthy_then_unhealthy_when_silent():
    watch = AgentWatch(30, started_at=100.0)
    assert watch.state(100.0) is W and watch.last is None
    assert watch.deadline() == 130.0
    watch.attached(101.0)
    watch.heartbeat(heartbeat(seq=0), 101.0)
    assert watch.state(101.0) is H and watch.last == heartbeat(seq=0)
    assert watch.deadline() == 131.0
    assert watch.state(130.9) is H
    assert watch.state(131.0) is U  # silent for the timeout
    watch.heartbeat(heartbeat(seq=1), 140.0)
    assert watch.state(140.0) is H and watch.last.seq == 1


def test_a_first_heartbeat_that_never_comes_is_unhealthy_after_the_timeout():
    watch = AgentWatch(10, started_at=0.0)
    assert watch.state(9.99) is W
    assert watch.state(10.0) is U
    assert "within 10 s of boot" in watch.message(10.0)
    watch.attached(11.0)
    assert "is the tunnel client started with --agent" in watch.message(12.0)
    watch.heartbeat(heartbeat(), 12.0)  # late, but alive
    assert watch.state(12.0) is H


def test_attach_and_detach_do_not_change_the_state_only_explain_it():
    watch = AgentWatch(10, started_at=0.0)
    watch.attached(0.5)
    assert watch.state(1.0) is W and watch.connected
    assert watch.message(1.0) == "the guest agent is connected; waiting for its first heartbeat"
    watch.heartbeat(heartbeat(), 1.0)
    watch.detached(2.0)
    assert not watch.connected and watch.state(5.0) is H and watch.message(5.0) is None
    assert watch.state(11.0) is U
    assert watch.message(11.0) == (
        "no heartbeat from the guest agent for 10 s; its connection dropped 9 s ago"
    )
    watch.attached(12.0)  # back, but silent: still unhealthy until a heartbeat
    assert watch.state(12.0) is U and watch.message(12.0).endswith("its connection is still open")
    watch.heartbeat(heartbeat(seq=0), 12.1)
    assert watch.state(12.1) is H


def test_a_reboot_waits_again_and_forgets_the_figures():
    watch = AgentWatch(10, started_at=0.0)
    watch.attached(1.0)
    watch.heartbeat(heartbeat(), 1.0)
    watch.booted(50.0)
    assert watch.state(50.0) is W and watch.last is None and watch.last_heard_at is None
    assert not watch.connected
    assert watch.health(50.0, dt.datetime(2030, 1, 1, tzinfo=UTC)) == VmHealth(
        agent=W, message="waiting for the guest agent to phone home"
    )
    assert watch.state(60.0) is U


def test_changed_reports_each_state_once():
    watch = AgentWatch(5, started_at=0.0)
    assert watch.changed(0.0)  # the first answer: WAITING is news
    assert not watch.changed(1.0)
    watch.heartbeat(heartbeat(), 2.0)
    assert watch.changed(2.0)
    watch.heartbeat(heartbeat(seq=1), 3.0)
    assert not watch.changed(3.0)  # still healthy: nothing to report
    assert watch.changed(8.0)  # silent: unhealthy
    assert not watch.changed(100.0)
    watch.heartbeat(heartbeat(seq=2), 101.0)
    assert watch.changed(101.0)


def test_health_carries_the_last_figures_and_when_they_came():
    watch = AgentWatch(30, started_at=0.0)
    hb = heartbeat(uptime_seconds=99.5, load1=1.25, gpus=2)
    watch.heartbeat(hb, 10.0)
    wall = dt.datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
    health = watch.health(14.5, wall)
    assert health == VmHealth(
        agent=H,
        last_heartbeat_at=wall - dt.timedelta(seconds=4.5),
        uptime_seconds=99.5,
        load1=1.25,
        memory_total_bytes=hb.memory_total_bytes,
        memory_available_bytes=hb.memory_available_bytes,
        disk_total_bytes=hb.disk_total_bytes,
        disk_free_bytes=hb.disk_free_bytes,
        gpus=2,
    )
    stale = watch.health(100.0, wall)
    assert stale.agent is U and stale.gpus == 2 and "for 90 s" in stale.message
    with pytest.raises(ValidationError, match="wall"):
        watch.health(1.0, dt.datetime(2030, 1, 1))  # naive


def test_a_clock_that_goes_back_counts_as_no_time():
    watch = AgentWatch(5, started_at=10.0)
    assert watch.state(3.0) is W
    watch.heartbeat(heartbeat(), 20.0)
    watch.heartbeat(heartbeat(seq=1), 15.0)  # an earlier now does not move the last heard time back
    assert watch.last_heard_at == 20.0 and watch.last.seq == 1
    assert watch.state(24.9) is H
    assert watch.health(18.0, dt.datetime(2030, 1, 1, tzinfo=UTC)).last_heartbeat_at == dt.datetime(
        2030, 1, 1, tzinfo=UTC
    )


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), True, "5"])
def test_the_timeout_must_be_a_positive_number(bad):
    with pytest.raises(ValidationError, match="timeout_seconds"):
        AgentWatch(bad, started_at=0.0)


events = st.lists(
    st.tuples(
        st.sampled_from(["heartbeat", "attached", "detached", "booted", "look"]),
        st.floats(0, 20, allow_nan=False),
    ),
    max_size=40,
)


@given(events, st.floats(0.5, 15))
@settings(max_examples=300)
def test_the_state_follows_the_reference_model(steps, timeout):
    """Whatever happens in whatever order: UNHEALTHY exactly when nothing was heard for the timeout (since
    the last heartbeat, or since boot before the first one), WAITING before the first heartbeat, else
    HEALTHY; ``changed`` is true exactly when the state differs from the last reported one."""
    now = 0.0
    watch = AgentWatch(timeout, started_at=now)
    booted, heard, reported = now, None, None
    for kind, step in steps:
        now += step
        if kind == "heartbeat":
            watch.heartbeat(heartbeat(), now)
            heard = now
        elif kind == "attached":
            watch.attached(now)
        elif kind == "detached":
            watch.detached(now)
        elif kind == "booted":
            watch.booted(now)
            booted, heard = now, None
        since = booted if heard is None else heard
        expected = U if now - since >= timeout else (W if heard is None else H)
        assert watch.state(now) is expected
        assert watch.deadline() == since + timeout
        assert watch.changed(now) == (expected is not reported)
        reported = expected
        assert (watch.message(now) is None) == (expected is H)
        health = watch.health(now, dt.datetime(2030, 1, 1, tzinfo=UTC))
        assert health.agent is expected and (health.last_heartbeat_at is None) == (heard is None)
