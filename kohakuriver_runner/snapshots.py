"""Snapshots of Docker VPS: ``docker commit``s tagged ``kohakuriver-snapshot/vps-<id>:<unixts>`` (DESIGN 8).

A snapshot is an image in the runner's engine, so it outlives the VPS's container: a stopped VPS's snapshots
can still be listed and deleted, and re-creating the VPS (same task id) starts from the newest one when
``AUTO_RESTORE_ON_CREATE`` is on. At most ``MAX_SNAPSHOTS_PER_VPS`` are kept (oldest removed after each new
one; 0 = no limit). Tags are unique per VPS: a second snapshot within the same second gets the next second.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import time
from typing import Any

import attrs

from .docker_api import Conflict, DockerClient, NotFound
from .runner_settings import RunnerSettings

__all__ = [
    "LABEL_SNAPSHOT_OF",
    "SNAPSHOT_REPO_PREFIX",
    "Snapshot",
    "SnapshotNotFound",
    "Snapshots",
    "snapshot_repo",
]

log = logging.getLogger("kohakuriver.runner.snapshots")

SNAPSHOT_REPO_PREFIX = "kohakuriver-snapshot/vps-"
LABEL_SNAPSHOT_OF = "kohakuriver.snapshot_of"
_TAG_RE = re.compile(r"[0-9]{1,12}")


class SnapshotNotFound(LookupError):
    """No such snapshot."""


def snapshot_repo(task_id: int) -> str:
    return f"{SNAPSHOT_REPO_PREFIX}{int(task_id)}"


@attrs.frozen
class Snapshot:
    """One snapshot; ``timestamp`` is its tag (the key users delete it by)."""

    task_id: int
    timestamp: int
    size_bytes: int

    @property
    def tag(self) -> str:
        return f"{snapshot_repo(self.task_id)}:{self.timestamp}"

    def to_json(self) -> dict[str, Any]:
        created = dt.datetime.fromtimestamp(self.timestamp, dt.UTC)
        return {
            "tag": self.tag,
            "timestamp": self.timestamp,
            "created_at": created.isoformat().replace("+00:00", "Z"),
            "size_bytes": self.size_bytes,
        }


class Snapshots:
    """Snapshot operations for one runner (``config`` gives ``MAX_SNAPSHOTS_PER_VPS``)."""

    def __init__(self, docker: DockerClient, config: RunnerSettings) -> None:
        self.docker = docker
        self.config = config

    async def list_snapshots(self, task_id: int) -> list[Snapshot]:
        """The VPS's snapshots, newest first."""
        repo = snapshot_repo(task_id)
        found: dict[int, Snapshot] = {}
        for image in await self.docker.list_images(reference=repo):
            for ref in image.repo_tags:
                name, _, tag = ref.rpartition(":")
                if name == repo and _TAG_RE.fullmatch(tag):
                    found[int(tag)] = Snapshot(task_id, int(tag), image.size)
        return sorted(found.values(), key=lambda s: s.timestamp, reverse=True)

    async def newest(self, task_id: int) -> Snapshot | None:
        snapshots = await self.list_snapshots(task_id)
        return snapshots[0] if snapshots else None

    async def create(self, task_id: int, container: str, message: str | None = None) -> Snapshot:
        """Commit the container (paused for the commit, so the files are consistent) and prune."""
        existing = await self.list_snapshots(task_id)
        stamp = int(time.time())
        if existing and existing[0].timestamp >= stamp:
            stamp = existing[0].timestamp + 1
        repo = snapshot_repo(task_id)
        await self.docker.commit(
            container,
            repo,
            str(stamp),
            message=message or f"VPS {task_id} snapshot at {stamp}",
            author="kohakuriver",
            changes=[f'LABEL {LABEL_SNAPSHOT_OF}="{int(task_id)}"'],
        )
        log.info("task %s: snapshot %s:%s", task_id, repo, stamp)
        await self.prune(task_id)
        size = next((s.size_bytes for s in await self.list_snapshots(task_id) if s.timestamp == stamp), 0)
        return Snapshot(task_id, stamp, size)

    async def delete(self, task_id: int, timestamp: int) -> None:
        ref = Snapshot(task_id, timestamp, 0).tag
        try:
            await self.docker.remove_image(ref)
        except NotFound:
            raise SnapshotNotFound(f"VPS {task_id} has no snapshot {timestamp}") from None
        except Conflict:
            # The VPS's current container was created from it: drop the tag, the layers stay in use.
            await self.docker.remove_image(ref, force=True)

    async def prune(self, task_id: int) -> list[int]:
        """Remove the oldest snapshots beyond the limit; return the removed timestamps."""
        keep = int(self.config.MAX_SNAPSHOTS_PER_VPS)
        if keep <= 0:
            return []
        removed = []
        for old in (await self.list_snapshots(task_id))[keep:]:
            try:
                await self.delete(task_id, old.timestamp)
            except SnapshotNotFound:
                continue
            removed.append(old.timestamp)
        if removed:
            log.info("task %s: pruned snapshots %s", task_id, removed)
        return removed
