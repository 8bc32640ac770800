"""Placeholder: ``kr vps``."""

from __future__ import annotations

import click


@click.group("vps")
def vps() -> None:
    """Long-lived machines (VPS)."""
