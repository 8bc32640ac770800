"""Placeholder: ``kr forward``."""

from __future__ import annotations

import click


@click.command("forward")
def forward() -> None:
    """Forward a local port to a port inside a task's container."""
    raise click.ClickException("not built yet")
