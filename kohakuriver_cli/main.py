"""The ``kr`` / ``kohakuriver`` click group. Subcommand groups register themselves here, one per noun."""

from __future__ import annotations

import click

from .init_cmd import init


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kohakuriver")
def cli() -> None:
    """KohakuRiver: tasks and VPS on your lab's machines, port forwarding and SSH through one host."""


cli.add_command(init)


def main() -> None:
    cli()
