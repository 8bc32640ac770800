"""The ``kr`` / ``kohakuriver`` click group. Subcommand groups register themselves here, one per noun.

Global options (before the subcommand): ``--host URL`` (or ``KOHAKURIVER_HOST``), ``--token TOKEN`` (or
``KOHAKURIVER_TOKEN``), ``--json``; without them the host and token come from the credentials file that
``kr login`` / ``kr up`` write (``client.resolve_settings``).

Exit codes scripts can rely on: 0 ok, 1 error, 2 usage, 3 not found, 4 not allowed or not authenticated,
5 host unreachable; ``kr task submit --wait`` exits with the task's own exit code.
"""

from __future__ import annotations

import click

from .context import CliContext

#: name -> (module of kohakuriver_cli, attribute, the command's short help). The short help is repeated here
#: so that `kr --help` lists every command without importing any of them (tests/unit/test_cli_lazy.py checks
#: that it matches each command's own).
COMMANDS: dict[str, tuple[str, str, str]] = {
    "connect": (
        "terminal_cmd",
        "connect",
        "Open a shell (or run COMMAND) in running task or VPS TASK_ID, interactively.",
    ),
    "forward": (
        "forward_cmd",
        "forward",
        "Forward a local port to REMOTE_PORT inside task TASK_ID's container.",
    ),
    "host": ("daemon_cmd", "host_cmd", "Run the host daemon (API, WebSockets, SSH proxy, scheduler)."),
    "init": ("init_cmd", "init", "Create configuration files and systemd services."),
    "login": (
        "auth_cmd",
        "login",
        "Check an API token and save it, with the host URL, for the next commands.",
    ),
    "logout": (
        "auth_cmd",
        "logout",
        "Forget the saved token (the token itself stays valid: `kr token revoke ID` revokes it).",
    ),
    "node": ("node_cmd", "node", "Cluster nodes: list, status, remove."),
    "overlay": ("overlay_cmd", "overlay", "The overlay network: status, reserve and release addresses."),
    "runner": (
        "daemon_cmd",
        "runner_cmd",
        "Run a runner daemon (executes tasks in Docker, hosts the tunnel server, heartbeats to the host).",
    ),
    "ssh": ("ssh_cmd", "ssh", "SSH into a VPS through the host's SSH proxy."),
    "task": ("task_cmd", "task", "Command tasks: submit, list, status, logs, kill, pause, resume."),
    "terminal": (
        "terminal_cmd",
        "terminal",
        "Run commands in running tasks and VPS (see also `kr connect`).",
    ),
    "token": ("auth_cmd", "token", "Your API tokens: list, create, revoke."),
    "up": (
        "daemon_cmd",
        "up_cmd",
        "A whole single-machine cluster in one process: host and runner, state under ~/.kohakuriver.",
    ),
    "user": ("auth_cmd", "user", "Users: list (operators), create (admins)."),
    "vm": ("vm_cmd", "vm", "Virtual machines: base images on the nodes, VM instances (operators)."),
    "vps": (
        "vps_cmd",
        "vps",
        "Long-lived machines (VPS): create, list, status, stop, restart, snapshots, connect.",
    ),
    "whoami": ("auth_cmd", "whoami", "Who the current token belongs to."),
}


def _version() -> str:
    """The version without importlib.metadata (15 ms): both distributions take it from kohakuriver_proto."""
    from kohakuriver_proto import __version__

    return __version__


class LazyGroup(click.Group):
    """A group whose subcommands live in modules imported when one of them runs or shows its help (click's
    "lazily loading subcommands" pattern): `kr task list` imports task_cmd and never vps_cmd, the daemons,
    trio or cryptography; `kr --help` imports none of them."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands or cmd_name not in COMMANDS:
            return self.commands.get(cmd_name)
        import importlib

        module, attr, _ = COMMANDS[cmd_name]
        command = getattr(importlib.import_module(f"{__package__}.{module}"), attr)
        self.commands[cmd_name] = command
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """As click's, with the short help from ``COMMANDS`` for the commands not imported yet."""
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(len(name) for name in names)
        rows = []
        for name in names:
            loaded = self.commands.get(name)
            if loaded is not None:
                if loaded.hidden:
                    continue
                rows.append((name, loaded.get_short_help_str(limit)))
            else:
                # A stand-in command with the same help: click shortens it exactly as it would the real one's.
                stand_in = click.Command(name, help=COMMANDS[name][2])
                rows.append((name, stand_in.get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kohakuriver", version=_version())
@click.option(
    "--host", "host_url", envvar="KOHAKURIVER_HOST", metavar="URL", help="Host API URL [KOHAKURIVER_HOST]."
)
@click.option("--token", envvar="KOHAKURIVER_TOKEN", metavar="TOKEN", help="API token [KOHAKURIVER_TOKEN].")
@click.option("--json", "json_output", is_flag=True, help="JSON output (also accepted after each command).")
@click.pass_context
def cli(ctx: click.Context, host_url: str | None, token: str | None, json_output: bool) -> None:
    """KohakuRiver: tasks and VPS on your lab's machines, port forwarding and SSH through one host."""
    obj = ctx.ensure_object(CliContext)
    obj.host_option = host_url or obj.host_option
    obj.token_option = token or obj.token_option
    obj.json_output = json_output or obj.json_output


def main() -> None:
    cli()
