"""Human formatting helpers of ``kohakuriver_cli.output``."""

from __future__ import annotations

import datetime as dt

import pytest

from kohakuriver_cli.output import (
    clean,
    command_line,
    fmt_age,
    fmt_duration,
    fmt_size,
    fmt_time,
    items_of,
    parse_time,
    status_text,
)

NOW = dt.datetime(2025, 4, 10, 12, 0, 0, tzinfo=dt.UTC)


def test_clean_escapes_control_characters():
    assert clean("a\x1b[31mb\nc\x07\x9b") == "a\\x1b[31mb\\nc\\x07\\x9b"
    assert clean("[bold]ünïcode\t") == "[bold]ünïcode\\t"
    assert clean(None) == "-"
    assert clean(12) == "12"
    assert clean("x" * 10, 5) == "xxxx…"


def test_status_text_is_not_markup():
    text = status_text("[red]running")
    assert text.plain == "[red]running"
    assert status_text("running").style == "bold green"
    assert status_text(None).plain == "-"


def test_command_line_quotes_for_display():
    assert command_line({"command": "echo", "arguments": ["; rm -rf /", "a b", "$HOME"]}) == (
        "echo '; rm -rf /' 'a b' '$HOME'"
    )
    assert command_line({"command": None}) == "-"


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (4 << 30, "4 GiB"), (None, "-"), (-1, "-")],
)
def test_fmt_size(n, text):
    assert fmt_size(n) == text


def test_parse_time_accepts_iso_and_unix_seconds():
    iso = parse_time("2025-04-10T08:30:00.250000Z")
    assert iso == dt.datetime(2025, 4, 10, 8, 30, 0, 250000, tzinfo=dt.UTC)
    assert parse_time("2025-04-10T10:30:00+02:00") == dt.datetime(2025, 4, 10, 8, 30, tzinfo=dt.UTC)
    assert parse_time(1744273800) == dt.datetime(2025, 4, 10, 8, 30, tzinfo=dt.UTC)
    assert parse_time("yesterday") is None
    assert parse_time(None) is None
    assert parse_time(True) is None


@pytest.mark.parametrize(
    ("seconds_ago", "text"),
    [
        (3, "3s ago"),
        (59, "59s ago"),
        (61, "1m ago"),
        (7200, "2h ago"),
        (3 * 86400, "3d ago"),
        (-2, "just now"),
    ],
)
def test_fmt_age(seconds_ago, text):
    when = (NOW - dt.timedelta(seconds=seconds_ago)).isoformat()
    assert fmt_age(when, NOW) == text


def test_fmt_age_unknown():
    assert fmt_age(None, NOW) == "-"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.42, "0.4s"),
        (12, "12s"),
        (185, "3m05s"),
        (7620, "2h07m"),
        (3 * 86400 + 4 * 3600, "3d04h"),
        (None, "-"),
    ],
)
def test_fmt_duration(seconds, text):
    assert fmt_duration(seconds) == text


def test_fmt_time_is_local_seconds():
    text = fmt_time("2025-04-10T08:30:00Z")
    assert len(text) == 19 and text[4] == "-" and text[13] == ":"
    assert fmt_time(None) == "-"


def test_items_of():
    assert items_of([1, 2]) == [1, 2]
    assert items_of({"tasks": [1], "total": 1}, "tasks") == [1]
    assert items_of({"other": 1}, "tasks") == []
    assert items_of(None, "tasks") == []
