"""The ``kr`` / ``kohakuriver`` click group. Subcommand groups register themselves here, one per noun.

Global options (before the subcommand): ``--host URL`` (or ``KOHAKURIVER_HOST``), ``--token TOKEN`` (or
``KOHAKURIVER_TOKEN``), ``--json``; without them the host and token come from the credentials file that
``kr login`` / ``kr up`` write (``client.resolve_settings``).

Exit codes scripts can rely on: 0 ok, 1 error, 2 usage, 3 not found, 4 not allowed or not authenticated,
5 host unreachable; ``kr task submit --wait`` exits with the task's own exit code.
"""

from __future__ import annotations

import click

from .auth_cmd import login, logout, token, user, whoami
from .context import CliContext
from .daemon_cmd import host_cmd, runner_cmd, up_cmd
from .forward_cmd import forward
from .init_cmd import init
from .node_cmd import node
from .ssh_cmd import ssh
from .task_cmd import task
from .terminal_cmd import connect, terminal
from .vps_cmd import vps


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kohakuriver")
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


cli.add_command(init)
cli.add_command(host_cmd)
cli.add_command(runner_cmd)
cli.add_command(up_cmd)
cli.add_command(task)
cli.add_command(node)
cli.add_command(login)
cli.add_command(logout)
cli.add_command(whoami)
cli.add_command(token)
cli.add_command(user)
cli.add_command(forward)
cli.add_command(vps)
cli.add_command(ssh)
cli.add_command(connect)
cli.add_command(terminal)


def main() -> None:
    cli()
