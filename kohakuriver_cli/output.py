"""How the CLI prints: tables and panels for people, the host's JSON for scripts, messages on stderr.

Rules every command follows:

- ``--json`` prints exactly the JSON the host returned (same keys, same order, ids as strings), indented,
  on stdout. That is the stable contract for scripts; tables are for people and may change.
- Data goes to stdout, messages (``Submitted 2 tasks``, spinners, hints) to stderr.
- Every string that came from the host or another user (task names, commands, error texts) is shown with
  control characters escaped and never parsed as rich markup, so a task named ``\\x1b]0;pwned\\x07`` or
  ``[bold]`` cannot write escape sequences to an operator's terminal.
- Tables come in two kinds. ``TextTable`` draws itself with plain string work (and ANSI colours on a
  terminal): ``kr task list``, the command people run most, cannot afford rich (45-75 ms to import, more to
  lay out) within its 150 ms. The other tables and the panels of ``status`` commands use rich
  (``new_table``, ``kv_panel``), imported by the functions that draw.
- The helpers accept what the API is likely to send and a little more (times as ISO-8601 strings or Unix
  seconds; missing fields show as ``-``), so a field the host adds or leaves out never breaks a table.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shlex
import sys
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:  # rich is imported by the functions that draw: a `kr` that prints no table never loads it
    from rich.console import Console
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

DASH = "-"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")

STATUS_STYLES: dict[str, str] = {
    "pending_approval": "yellow",
    "pending": "yellow",
    "assigning": "cyan",
    "running": "bold green",
    "paused": "blue",
    "completed": "green",
    "failed": "bold red",
    "killed": "magenta",
    "killed_oom": "bold magenta",
    "lost": "red",
    "rejected": "red",
    "stopped": "dim",
    "online": "green",
    "offline": "bold red",
}


# -- consoles ------------------------------------------------------------------------------------------------


def stdout_console() -> Console:
    """A console on the current ``sys.stdout``; wide (no wrapping) when stdout is a pipe or a file."""
    from rich.console import Console

    console = Console(file=sys.stdout, highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(file=sys.stdout, highlight=False, width=200)
    return console


def stderr_console() -> Console:
    from rich.console import Console

    return Console(file=sys.stderr, highlight=False)


def info(message: str) -> None:
    """A message for the person at the terminal: stderr, so stdout stays data only."""
    click.echo(message, err=True)


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def print_renderable(renderable: Any) -> None:
    stdout_console().print(renderable)


# -- text ----------------------------------------------------------------------------------------------------


def clean(value: Any, max_len: int | None = None) -> str:
    """``value`` as a one-line string with control characters escaped (``\\n``, ``\\x1b``)."""
    if value is None:
        return DASH
    text = value if isinstance(value, str) else str(value)

    def escape(match: re.Match[str]) -> str:
        return match.group().encode("unicode_escape").decode("ascii")

    text = _CONTROL.sub(escape, text)
    if max_len is not None and len(text) > max_len:
        text = text[: max_len - 1] + "…"
    return text


def plain(value: Any, max_len: int | None = None, style: str = "") -> Text:
    """A rich Text that is never interpreted as markup."""
    from rich.text import Text

    return Text(clean(value, max_len), style=style)


def status_text(status: Any) -> Text:
    from rich.text import Text

    text = clean(status) if status else DASH
    return Text(text, style=STATUS_STYLES.get(text, ""))


def command_line(record: Mapping[str, Any], max_len: int | None = None) -> str:
    """``command`` + ``arguments`` quoted the way a POSIX shell would need them (for display only)."""
    command = record.get("command")
    if not command:
        return DASH
    arguments = record.get("arguments") or []
    argv = [str(command), *(str(a) for a in arguments)]
    return clean(shlex.join(argv), max_len)


# -- numbers, sizes, times -----------------------------------------------------------------------------------


def fmt_size(n: Any) -> str:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        return DASH
    from kohakuriver_proto.units import format_size  # (fractions: 10 ms that `kr --help` need not pay)

    return format_size(n)


def parse_time(value: Any) -> dt.datetime | None:
    """An API time (ISO-8601 string or Unix seconds) as an aware UTC datetime; None if absent/unreadable."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        try:
            return dt.datetime.fromtimestamp(value, dt.UTC)
        except (OverflowError, OSError, ValueError):
            return None
    if isinstance(value, str):
        try:
            parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00") if value.endswith("Z") else value)
        except ValueError:
            return None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=dt.UTC)
        return parsed.astimezone(dt.UTC)
    return None


def fmt_duration(seconds: float | None) -> str:
    """``0.4s``, ``12s``, ``3m05s``, ``2h07m``, ``3d04h``."""
    if seconds is None:
        return DASH
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def fmt_age(value: Any, now: dt.datetime | None = None) -> str:
    """How long ago: ``4s ago``, ``3m ago``, ``2h ago``, ``5d ago``; ``-`` when unknown."""
    when = parse_time(value)
    if when is None:
        return DASH
    now = now or dt.datetime.now(dt.UTC)
    s = int((now - when).total_seconds())
    if s < 0:
        return "just now" if s > -5 else "in the future"
    if s < 60:
        return f"{s}s ago"
    if s < 3600:
        return f"{s // 60}m ago"
    if s < 86400:
        return f"{s // 3600}h ago"
    return f"{s // 86400}d ago"


def fmt_time(value: Any) -> str:
    """Local time ``2025-04-10 10:30:00`` (seconds precision); ``-`` when unknown."""
    when = parse_time(value)
    if when is None:
        return DASH
    return when.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def fmt_time_and_age(value: Any, now: dt.datetime | None = None) -> str:
    if parse_time(value) is None:
        return DASH
    return f"{fmt_time(value)} ({fmt_age(value, now)})"


def fmt_bool(value: Any, yes: str = "yes", no: str = "no") -> str:
    if value is None:
        return DASH
    return yes if value else no


# -- tables and panels ---------------------------------------------------------------------------------------


def new_table(*columns: str, right: Iterable[str] = ()) -> Table:
    """A borderless table; columns named in ``right`` are right-aligned (numbers)."""
    from rich.table import Table

    right = set(right)
    table = Table(box=None, header_style="bold", pad_edge=False, show_edge=False)
    for column in columns:
        table.add_column(column, justify="right" if column in right else "left", overflow="fold")
    return table


def kv_panel(title: str, rows: Iterable[tuple[str, Any]]) -> Panel:
    """A key/value panel; values are Text (already styled) or anything ``clean`` can show."""
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    for key, value in rows:
        grid.add_row(key, value if isinstance(value, Text) else plain(value))
    return Panel(grid, title=Text(clean(title)), title_align="left", expand=False)


# -- tables without rich -------------------------------------------------------------------------------------

#: rich style names (``STATUS_STYLES``) as ANSI SGR parameters.
_SGR = {
    "bold": "1",
    "dim": "2",
    "red": "31",
    "green": "32",
    "yellow": "33",
    "blue": "34",
    "magenta": "35",
    "cyan": "36",
}


def cell_width(text: str) -> int:
    """Terminal columns of ``text``: East Asian wide and full-width characters take two, combining marks
    none (what rich and terminals count), so CJK task names line up."""
    if text.isascii():
        return len(text)
    import unicodedata

    return sum(
        0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1
        for ch in text
    )


def cut_to_width(text: str, width: int) -> str:
    """``text`` in at most ``width`` columns, ending in ``…`` when cut."""
    if cell_width(text) <= width:
        return text
    out, used = [], 0
    for ch in text:
        w = cell_width(ch)
        if used + w > width - 1:
            break
        out.append(ch)
        used += w
    return "".join(out) + "…"


def use_color(stream: Any) -> bool:
    """Colours on ``stream``: ``NO_COLOR`` says never, ``FORCE_COLOR`` always, else a terminal that is not
    ``TERM=dumb`` (the conventions rich follows too)."""
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and os.environ.get("TERM") != "dumb"


def output_width(stream: Any) -> int | None:
    """Columns available on ``stream``: ``COLUMNS``, else a terminal's width, else None (a pipe or a file:
    never cut, so that grep and awk see whole values)."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    isatty = getattr(stream, "isatty", None)
    if not (isatty and isatty()):
        return None
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return None


class TextTable:
    """A borderless table like ``new_table``'s (two spaces between columns, a bold header, ``right`` columns
    right-aligned), drawn with string work alone. Cells are strings (already ``clean``) or ``(text, style)``
    with a ``STATUS_STYLES`` style. When the table is wider than the output, the ``shrink`` column is cut
    (with ``…``) down to its header's width."""

    def __init__(self, *columns: str, right: Iterable[str] = (), shrink: str | None = None) -> None:
        self.columns = columns
        self.right = {columns.index(name) for name in right}
        self.shrink = columns.index(shrink) if shrink is not None else None
        self.rows: list[list[tuple[str, str]]] = []

    def add_row(self, *cells: str | tuple[str, str]) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"{len(cells)} cells for {len(self.columns)} columns")
        self.rows.append([cell if isinstance(cell, tuple) else (cell, "") for cell in cells])

    def render(self, width: int | None = None, color: bool = False) -> str:
        header = [(name, "bold") for name in self.columns]
        rows = [header, *self.rows]
        widths = [max(cell_width(row[i][0]) for row in rows) for i in range(len(self.columns))]
        total = sum(widths) + 2 * (len(widths) - 1)
        if width is not None and total > width and self.shrink is not None:
            floor = cell_width(self.columns[self.shrink])
            widths[self.shrink] = max(floor, widths[self.shrink] - (total - width))
        lines = []
        for row in rows:
            parts = []
            for i, (text, style) in enumerate(row):
                text = cut_to_width(text, widths[i])
                pad = " " * (widths[i] - cell_width(text))
                if color and style:
                    codes = ";".join(_SGR[word] for word in style.split() if word in _SGR)
                    text = f"\x1b[{codes}m{text}\x1b[0m" if codes else text
                parts.append(pad + text if i in self.right else text + pad)
            lines.append("  ".join(parts).rstrip())
        return "\n".join(lines) + "\n"


def print_table(table: TextTable) -> None:
    """``table`` on stdout, fitted to a terminal's width and coloured there."""
    out = sys.stdout
    out.write(table.render(output_width(out), use_color(out)))
    out.flush()


def status_cell(status: Any) -> tuple[str, str]:
    """A ``TextTable`` cell for a status, in its ``STATUS_STYLES`` colour."""
    text = clean(status) if status else DASH
    return text, STATUS_STYLES.get(text, "")


def items_of(data: Any, *keys: str) -> list[Any]:
    """The list in an API answer: the answer itself, or the first of ``keys`` that holds a list."""
    if isinstance(data, list):
        return data
    if isinstance(data, Mapping):
        for key in keys:
            if isinstance(data.get(key), list):
                return data[key]
    return []
