"""The values of ``kr task submit``'s ``-e``, ``--gpus`` and ``-m`` options, without click.

Shared by the click command (``task_cmd``, which turns ``BadValue`` into ``click.BadParameter`` naming the
option) and the path served before click loads (``task_submit_fast``, which hands any ``BadValue`` to the
click command), so both read an option the same way and send the same body. Importing this module costs
nothing beyond ``os``: ``-m`` loads ``kohakuriver_proto.units`` when it is given, and only an error's
message loads ``output`` (and click with it).
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (the fast path's start)
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

ENV_HINT = "'-e' / '--env'"
GPUS_HINT = "'--gpus'"
MEMORY_HINT = "'-m' / '--memory'"


class BadValue(Exception):
    """An option's value that cannot be used: ``message`` says why, ``hint`` names the option as click
    names it in its errors."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


def _shown(value: str, limit: int) -> str:
    from .output import clean  # only for an error's message (output imports click)

    return clean(value, limit)


def parse_env(items: Iterable[str], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``-e K=V`` pairs (split at the first ``=``; V may contain ``=`` or be empty). ``-e K`` alone copies K
    from this shell's environment, as ``docker run -e K`` does. Later values win."""
    environ = os.environ if environ is None else environ
    env: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not name:
            raise BadValue(f"expected NAME=VALUE, got {_shown(item, 60)!r}", ENV_HINT)
        if not sep:
            if name not in environ:
                raise BadValue(f"{_shown(name, 60)!r} has no '=VALUE' and is not set in this shell", ENV_HINT)
            value = environ[name]
        env[name] = value
    return env


def parse_gpus(text: str | None) -> list[int]:
    """``--gpus 0,1`` -> ``[0, 1]`` (GPU ids of the target node)."""
    if text is None:
        return []
    items = [item.strip() for item in text.split(",")]
    if any(not item.isascii() or not item.isdigit() for item in items):
        raise BadValue(f"expected GPU ids like 0,1, got {_shown(text, 40)!r}", GPUS_HINT)
    ids = [int(item) for item in items]
    if len(set(ids)) != len(ids):
        raise BadValue(f"duplicate GPU id in {_shown(text, 40)!r}", GPUS_HINT)
    return ids


def parse_memory(text: str | None) -> int | None:
    """``-m 4G`` -> bytes (``kohakuriver_proto.units``: K/M/G are x1024, KB/MB/GB x1000); 0 = no limit."""
    if text is None:
        return None
    from kohakuriver_proto.errors import ValidationError
    from kohakuriver_proto.units import parse_size

    try:
        size = parse_size(text, "--memory")
    except ValidationError as exc:
        raise BadValue(exc.message, MEMORY_HINT) from None
    return size or None
