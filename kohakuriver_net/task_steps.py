"""Where a task's start and end spend their time: one DEBUG line per step of its path, host and runner.

A step is logged as ``task <id> step <name> at <seconds>`` on the ``kohakuriver.steps`` logger, where
``<seconds>`` is ``time.monotonic()``. On Linux that clock is the machine's ``CLOCK_MONOTONIC``, shared by
every process, so the lines of a host, a runner and a client on one machine line up without any clock
exchange (``bench/task_latency.py`` reads them from the daemons' logs and prints a table of median offsets).
Across machines only the offsets inside one daemon mean something.

Cheap enough to stay in the code for good: when DEBUG is off for that logger, ``step`` is one level check.
Names are ``<daemon>.<what happened>`` (``host.stored``, ``runner.container_started``, ...).
"""

from __future__ import annotations

import logging
import time

__all__ = ["LOGGER_NAME", "enabled", "step"]

LOGGER_NAME = "kohakuriver.steps"
_log = logging.getLogger(LOGGER_NAME)


def enabled() -> bool:
    """Whether step lines are being logged (skip work that only feeds them)."""
    return _log.isEnabledFor(logging.DEBUG)


def step(task_id: int, name: str, at: float | None = None) -> None:
    """Log that ``task_id`` reached step ``name`` now (or at ``at``, an earlier ``time.monotonic()``)."""
    if _log.isEnabledFor(logging.DEBUG):
        _log.debug("task %d step %s at %.6f", task_id, name, time.monotonic() if at is None else at)
