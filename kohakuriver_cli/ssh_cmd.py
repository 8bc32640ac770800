"""Placeholder: ``kr ssh``."""

from __future__ import annotations

import click


@click.group("ssh")
def ssh() -> None:
    """SSH into a VPS through the host's SSH proxy."""
