"""Targets: parse, format, round trips, errors naming the field."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kohakuriver_proto import ValidationError
from kohakuriver_proto.targets import Target, check_hostname, format_target, parse_target


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("gpu1", Target("gpu1")),
        ("gpu1:0", Target("gpu1", 0)),
        ("gpu1::0,1", Target("gpu1", None, (0, 1))),
        ("gpu1:1::3", Target("gpu1", 1, (3,))),
        ("node-a.lab_x", Target("node-a.lab_x")),
        ("  gpu1::0, 1 ", Target("gpu1", None, (0, 1))),
        ("gpu1::2,0", Target("gpu1", None, (2, 0))),
    ],
)
def test_parse(text, expected):
    assert parse_target(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        (":0", "missing node name"),
        ("::0", "missing node name"),
        ("gpu1:", "NUMA node"),
        ("gpu1:x", "NUMA node"),
        ("gpu1:-1", "NUMA node"),
        ("gpu1:0:1", "NUMA node"),
        ("gpu1:5000", "at most"),
        ("gpu1::", "no GPU ids"),
        ("gpu1::0,,1", "empty GPU id"),
        ("gpu1::0,0", "duplicate"),
        ("gpu1::a", "GPU id"),
        ("gpu1:::1", "GPU id"),
        ("gpu 1", "invalid hostname"),
        ("-gpu", "invalid hostname"),
        ("gpu/1", "invalid hostname"),
        ("x" * 300, "at most 253"),
        (5, "must be a string"),
    ],
)
def test_parse_errors_name_the_field(text, fragment):
    with pytest.raises(ValidationError) as info:
        parse_target(text, field="targets[2]")
    assert info.value.field == "targets[2]"
    assert fragment in info.value.message


hostnames = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,30}[A-Za-z0-9])?", fullmatch=True)
targets = st.builds(
    Target,
    hostnames,
    st.none() | st.integers(0, 1023),
    st.lists(st.integers(0, 4095), unique=True, max_size=8).map(tuple),
)


@given(targets)
def test_round_trip(target):
    text = format_target(target)
    assert str(target) == text
    assert parse_target(text) == target
    assert format_target(parse_target(text)) == text


def test_target_validates_on_construction():
    with pytest.raises(ValidationError):
        Target("bad host")
    with pytest.raises(ValidationError):
        Target("h", gpu_ids=(1, 1))
    with pytest.raises(ValidationError):
        Target("h", numa_node=True)
    assert Target("h", gpu_ids=[1, 2]).gpu_ids == (1, 2)


def test_check_hostname():
    assert check_hostname("a") == "a"
    for bad in ["", "a:b", "a b", "a.", "_a", "a\x00", "é"]:
        with pytest.raises(ValidationError):
            check_hostname(bad)
