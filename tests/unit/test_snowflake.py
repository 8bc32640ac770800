"""Snowflake ids: layout, strict monotonicity under any clock, seeding, parsing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kohakuriver_proto import LocalProtocolError, ValidationError
from kohakuriver_proto.snowflake import (
    EPOCH_MS,
    MAX_ID,
    MAX_SEQUENCE,
    SnowflakeGenerator,
    format_id,
    instance_of,
    parse_id,
    timestamp_ms,
)

NOW = EPOCH_MS + 10_000_000


def test_layout():
    gen = SnowflakeGenerator(instance=5)
    first = gen.next_id(NOW)
    assert timestamp_ms(first) == NOW
    assert instance_of(first) == 5
    assert first & MAX_SEQUENCE == 0
    second = gen.next_id(NOW)
    assert second == first + 1
    assert 0 < first < MAX_ID


def test_clock_callable_and_missing_clock():
    ticks = iter(range(NOW, NOW + 100))
    gen = SnowflakeGenerator(1, clock=lambda: next(ticks))
    a, b = gen.next_id(), gen.next_id()
    assert timestamp_ms(b) == timestamp_ms(a) + 1
    with pytest.raises(LocalProtocolError):
        SnowflakeGenerator(1).next_id()


def test_sequence_overflow_advances_the_logical_clock():
    gen = SnowflakeGenerator()
    ids = [gen.next_id(NOW) for _ in range(MAX_SEQUENCE + 3)]
    assert ids == sorted(set(ids))
    assert timestamp_ms(ids[-1]) == NOW + 1


def test_backwards_clock_borrows_the_last_timestamp():
    gen = SnowflakeGenerator()
    a = gen.next_id(NOW)
    b = gen.next_id(NOW - 60_000)  # NTP step backwards by a minute
    assert b > a and timestamp_ms(b) == NOW
    c = gen.next_id(NOW + 1)
    assert c > b and timestamp_ms(c) == NOW + 1


def test_clock_before_epoch_behaves_like_the_epoch():
    gen = SnowflakeGenerator()
    assert gen.next_id(EPOCH_MS - 5) < gen.next_id(EPOCH_MS - 4) < gen.next_id(EPOCH_MS + 1)


def test_bad_instance():
    with pytest.raises(ValueError):
        SnowflakeGenerator(1024)
    with pytest.raises(ValueError):
        SnowflakeGenerator(-1)


@given(st.integers(0, 1023), st.integers(0, 1023), st.integers(0, 1 << 40), st.integers(0, MAX_SEQUENCE))
def test_seeding_with_last_id_keeps_ids_increasing(instance, other_instance, ts, seq):
    last = (ts << 22) | (other_instance << 12) | seq
    gen = SnowflakeGenerator(instance, last_id=last)
    assert gen.next_id(EPOCH_MS) > last  # even with a clock far behind


@given(
    st.integers(0, 1023),
    st.lists(st.integers(-5_000, 5_000), min_size=1, max_size=300),
    st.integers(EPOCH_MS, EPOCH_MS + (1 << 38)),
)
def test_unique_and_increasing_under_random_clocks(instance, steps, start):
    gen = SnowflakeGenerator(instance)
    now, previous = start, -1
    for step in steps:
        now += step  # jumps forwards and backwards
        snowflake = gen.next_id(now)
        assert snowflake > previous
        assert instance_of(snowflake) == instance
        previous = snowflake


@given(st.lists(st.sampled_from([0, 0, 0, 1, -3]), max_size=10_000))
def test_bursts_in_one_millisecond(steps):
    gen = SnowflakeGenerator(3)
    now, ids = NOW, []
    for step in steps:
        now += step
        ids.append(gen.next_id(now))
    assert ids == sorted(set(ids))


def test_parse_id():
    assert parse_id("0") == 0
    assert parse_id("123") == 123
    assert parse_id(str(MAX_ID)) == MAX_ID
    assert parse_id(77) == 77
    assert format_id(parse_id("9007199254740993")) == "9007199254740993"  # > 2**53 survives


@pytest.mark.parametrize(
    "bad",
    [
        "",
        " 1",
        "1 ",
        "+1",
        "-1",
        "1.0",
        "0x10",
        "\u0661\u0662",
        str(MAX_ID + 1),
        "9" * 20,
        True,
        -1,
        1.0,
        None,
    ],
)
def test_parse_id_rejects(bad):
    with pytest.raises(ValidationError) as info:
        parse_id(bad, field="task_id")
    assert info.value.field == "task_id"
