"""Sizes: parsing conventions, errors, and format/parse round trips."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kohakuriver_proto import ValidationError
from kohakuriver_proto.units import MAX_SIZE, format_size, parse_size

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1024", 1024),
        (1024, 1024),
        ("0", 0),
        ("512M", 512 * MiB),
        ("512m", 512 * MiB),
        ("4G", 4 * GiB),
        ("4g", 4 * GiB),
        ("4Gi", 4 * GiB),
        ("4GiB", 4 * GiB),
        ("4gib", 4 * GiB),
        ("1.5G", 3 * GiB // 2),
        ("1.5 G", 3 * GiB // 2),
        (" 2T ", 2 * TiB),
        ("1K", KiB),
        ("2GB", 2 * 10**9),
        ("2gb", 2 * 10**9),
        ("1MB", 10**6),
        ("1kB", 1000),
        ("100B", 100),
        (".5K", 512),
        ("1.", 1),
        ("0.3K", 307),  # rounds down
    ],
)
def test_parse(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("", "expected a size"),
        ("abc", "expected a size"),
        ("-1G", "expected a size"),
        ("1.5", "whole"),
        ("1X", "unknown unit"),
        ("1GiBB", "unknown unit"),
        ("1 0G", "expected a size"),
        ("99999999999P", "too large"),
        (-1, "between"),
        (True, "boolean"),
        (1.5, "float"),
        (None, "NoneType"),
    ],
)
def test_parse_errors_name_the_field(value, fragment):
    with pytest.raises(ValidationError) as info:
        parse_size(value, field="vm_disk_size")
    assert info.value.field == "vm_disk_size"
    assert fragment in info.value.message


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (1023, "1023 B"), (KiB, "1 KiB"), (512 * MiB, "512 MiB"), (3 * GiB // 2, "1.5 GiB"),
     (4 * GiB, "4 GiB"), (5 * TiB, "5 TiB")],
)  # fmt: skip
def test_format(n, text):
    assert format_size(n) == text


def test_format_exact():
    assert format_size(1536 * MiB, exact=True) == "1536 MiB"
    assert format_size(0, exact=True) == "0 B"
    assert format_size(1025, exact=True) == "1025 B"
    with pytest.raises(ValueError):
        format_size(-1)


@given(st.integers(0, MAX_SIZE))
def test_exact_round_trip(n):
    assert parse_size(format_size(n, exact=True)) == n


@given(st.integers(0, 1 << 60))
def test_rounded_round_trip_is_close(n):
    back = parse_size(format_size(n))
    assert abs(back - n) <= max(n * 0.05, 1)


@given(st.integers(0, 10**6), st.sampled_from(["K", "M", "G", "Ki", "MiB", "GB", "kb", "T"]))
def test_integer_amounts_are_exact(amount, unit):
    multiplier = {"K": KiB, "M": MiB, "G": GiB, "Ki": KiB, "MiB": MiB, "GB": 10**9, "kb": 1000, "T": TiB}[
        unit
    ]
    assert parse_size(f"{amount}{unit}") == amount * multiplier


@given(
    st.from_regex(r"[0-9]{0,22}\.[0-9]{0,70}|[0-9]{1,22}", fullmatch=True).filter(lambda t: t != "."),
    st.sampled_from(["K", "M", "G", "T", "P", "KB", "MB", "GB", "TB", "PB", "Ki", "PiB"]),
)
def test_fractions_round_down_exactly(number, unit):
    """Integer arithmetic on the digits gives what exact rational arithmetic gives (the floor)."""
    from fractions import Fraction

    from kohakuriver_proto.units import unit_multiplier

    exact = int(Fraction(number) * unit_multiplier(unit))
    if exact > MAX_SIZE:
        with pytest.raises(ValidationError):
            parse_size(number + unit)
    else:
        assert parse_size(number + unit) == exact


def test_absurdly_long_numbers_are_errors_not_crashes():
    with pytest.raises(ValidationError):
        parse_size("9" * 5000 + "K")
    assert parse_size("0." + "0" * 5000 + "1K") == 0
    assert parse_size("0" * 5000 + "1K") == 1024


def test_units_does_not_import_fractions():
    import subprocess
    import sys

    code = "import sys, kohakuriver_proto.units; print('fractions' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    )
