"""The ``kr`` / ``kohakuriver`` click group. Subcommand groups register themselves here, one per noun."""

from __future__ import annotations

import click

from .daemon_cmd import host_cmd, runner_cmd, up_cmd
from .init_cmd import init


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kohakuriver")
def cli() -> None:
    """KohakuRiver: tasks and VPS on your lab's machines, port forwarding and SSH through one host."""


cli.add_command(init)
cli.add_command(host_cmd)
cli.add_command(runner_cmd)
cli.add_command(up_cmd)


def main() -> None:
    cli()
