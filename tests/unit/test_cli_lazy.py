"""The CLI's lazy loading: `kr --help` lists every command from ``main.COMMANDS`` without importing them, so
that table must say what the commands themselves say; and a command imports only its own module."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from kohakuriver_cli.main import COMMANDS, LazyGroup, cli


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_the_table_matches_each_command(name):
    command = cli.get_command(click.Context(cli), name)
    assert command is not None and command.name == name
    assert COMMANDS[name][2] == command.get_short_help_str(limit=10**6)


def test_help_is_the_same_before_and_after_loading_every_command():
    before = CliRunner().invoke(LazyGroup(commands={}, callback=cli.callback, params=cli.params), ["--help"])
    for name in COMMANDS:
        cli.get_command(click.Context(cli), name)
    after = CliRunner().invoke(cli, ["--help"])
    assert before.exit_code == after.exit_code == 0
    assert before.output.split("Commands:")[1] == after.output.split("Commands:")[1]


def test_unknown_command_is_a_usage_error():
    result = CliRunner().invoke(cli, ["no-such-command"])
    assert result.exit_code == 2 and "No such command" in result.output


def _modules_after(args: list[str]) -> set[str]:
    code = (
        "import sys\n"
        f"sys.argv = ['kr', *{args!r}]\n"
        "from kohakuriver_cli.entry import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(' '.join(sorted(sys.modules)), file=sys.stderr)\n"
    )
    env = {"KOHAKURIVER_HOST": "http://127.0.0.1:9", "KOHAKURIVER_TOKEN": "krt_x", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    return set(proc.stderr.strip().splitlines()[-1].split())


def test_task_commands_load_only_their_module():
    """`kr task list` (the host is unreachable here: the import set is the same) loads task_cmd alone."""
    loaded = _modules_after(["task", "list"])
    heavy = {"httpx", "trio", "cryptography", "cattrs", "kohakuriver_proto.models"}
    heavy |= {f"kohakuriver_cli.{m}" for m in ("vps_cmd", "daemon_cmd", "forward_session", "ssh_cmd")}
    assert "kohakuriver_cli.task_cmd" in loaded
    assert not heavy & loaded, heavy & loaded


def test_the_fast_version_says_what_click_says():
    """`kr --version` alone is answered before click loads; it must read exactly like click's own."""
    code = "import sys; sys.argv = ['kr', '--version']; from kohakuriver_cli.entry import main; main()"
    fast = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert fast.stdout == CliRunner().invoke(cli, ["--version"], prog_name="kr").output
