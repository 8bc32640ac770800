"""Human formatting helpers of ``kohakuriver_cli.output``."""

from __future__ import annotations

import datetime as dt
import io

import pytest

from kohakuriver_cli.output import (
    TextTable,
    cell_width,
    clean,
    command_line,
    fmt_age,
    fmt_duration,
    fmt_size,
    fmt_time,
    items_of,
    output_width,
    parse_time,
    status_cell,
    status_text,
    use_color,
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


def test_text_table_aligns_by_terminal_columns():
    table = TextTable("ID", "NAME", "N", right=("N",))
    table.add_row("1", "训练模型", "3")
    table.add_row("22", "café\u0301", ("12", "bold"))
    assert cell_width("训练模型") == 8 and cell_width("café\u0301") == 4
    assert table.render() == "ID  NAME       N\n1   训练模型   3\n22  café\u0301      12\n"


def test_text_table_colours_only_when_asked_and_shrinks_one_column():
    table = TextTable("ID", "COMMAND", "STATUS", shrink="COMMAND")
    table.add_row("1", "python train.py --epochs 100", status_cell("running"))
    plain_text = table.render()
    assert "\x1b" not in plain_text and "python train.py --epochs 100" in plain_text
    coloured = table.render(color=True)
    assert "\x1b[1;32mrunning\x1b[0m" in coloured and "\x1b[1mID\x1b[0m" in coloured
    narrow = table.render(width=30).splitlines()
    assert narrow[1] == "1   python train.py …  running" and all(len(line) <= 30 for line in narrow)
    # Never below the header's width: a terminal too narrow wraps the lines instead.
    assert table.render(width=5).splitlines()[1] == "1   python…  running"
    assert status_cell(None) == ("-", "") and status_cell("weird") == ("weird", "")


def test_colour_and_width_follow_the_usual_variables(monkeypatch):
    class Tty:
        def isatty(self) -> bool:
            return True

        def fileno(self) -> int:
            raise OSError("not a real terminal")

    for name in ("NO_COLOR", "FORCE_COLOR", "TERM", "COLUMNS"):
        monkeypatch.delenv(name, raising=False)
    assert use_color(Tty()) and not use_color(io.StringIO())
    monkeypatch.setenv("TERM", "dumb")
    assert not use_color(Tty())
    monkeypatch.setenv("FORCE_COLOR", "1")
    assert use_color(io.StringIO())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not use_color(Tty())
    assert output_width(io.StringIO()) is None and output_width(Tty()) is None
    monkeypatch.setenv("COLUMNS", "77")
    assert output_width(io.StringIO()) == 77
