"""Container exits as the engine announces them: the ``die`` event, ahead of ``POST /containers/{id}/wait``.

Why: on Docker 20.10 the wait answers, and the container can be inspected or its logs read, only once the
engine has cleaned up after the exit (network endpoint, mounts); measured here, 60-70 ms after the ``die``
event that carries the exit code. A task that exits 0 is ``completed`` whatever else there is to learn, so
the executor reports that at the event and collects the container (logs, record, removal) when the wait
answers, as before.

An accelerator only, never the source of truth: one event stream per runner (``GET /events`` filtered on
``die`` and this runner's label), reconnected after a second when it drops. An exit whose event is missed
(stream down, or not yet connected) is simply seen by the wait. ``expect`` a container before starting it,
so an exit that comes before ``start`` answers is caught; ``forget`` it when done.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging

import attrs
import trio

from .container_spec import LABEL_RUNNER
from .docker_api import DockerClient, DockerError

__all__ = ["ContainerExit", "ExitEvents"]

log = logging.getLogger("kohakuriver.runner.exits")

RECONNECT_DELAY = 1.0


@attrs.define(eq=False)
class ContainerExit:
    """One expected exit: ``event`` is set once the engine said ``die`` (``exit_code``, ``at``)."""

    event: trio.Event = attrs.field(factory=trio.Event)
    exit_code: int | None = None
    at: dt.datetime | None = None


class ExitEvents:
    """Run ``run`` in the daemon's nursery; ``expect``/``forget`` per container."""

    def __init__(self, docker: DockerClient, hostname: str) -> None:
        self.docker = docker
        self.hostname = hostname
        self._expected: dict[str, ContainerExit] = {}

    def expect(self, container_id: str) -> ContainerExit:
        return self._expected.setdefault(container_id, ContainerExit())

    def forget(self, container_id: str) -> None:
        self._expected.pop(container_id, None)

    def _on_event(self, event: dict) -> None:
        actor = event.get("Actor") or {}
        slot = self._expected.get(str(actor.get("ID") or event.get("id") or ""))
        if slot is None or slot.event.is_set():
            return
        try:
            slot.exit_code = int((actor.get("Attributes") or {})["exitCode"])
        except (KeyError, TypeError, ValueError):
            return  # no usable code: the wait will tell
        nanos = event.get("timeNano")
        if isinstance(nanos, int):
            slot.at = dt.datetime.fromtimestamp(nanos / 1e9, dt.UTC)
        slot.event.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        filters = {"type": ["container"], "event": ["die"], "label": [f"{LABEL_RUNNER}={self.hostname}"]}
        task_status.started()
        while True:
            try:
                async with contextlib.aclosing(self.docker.events(filters=filters)) as events:
                    async for event in events:
                        self._on_event(event)
            except DockerError as exc:
                log.debug("container event stream: %s; reconnecting", exc)
            await trio.sleep(RECONNECT_DELAY)
