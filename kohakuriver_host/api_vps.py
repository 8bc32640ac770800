"""Placeholder: filled in by the work on this module."""

from __future__ import annotations

from quart import Blueprint

bp = Blueprint("vps", __name__)
