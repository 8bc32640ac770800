"""Which image a task runs in, and getting it into the local Docker engine.

Order (``ExecuteRequest`` docstring): a VPS's newest snapshot when ``AUTO_RESTORE_ON_CREATE``, then
``registry_image`` (used if present locally, else pulled), then
``container_name`` (an environment: the newest tarball ``<name>-<unixts>.tar`` in ``CONTAINER_TAR_DIR``,
loaded as ``kohakuriver/<name>:base`` when newer than the local copy), else ``DEFAULT_IMAGE`` (local, else
the environment it names when it is ``kohakuriver/<name>:base``, else pulled).

- One tarball load at a time per runner: loads are disk- and CPU-heavy, and two tasks of one environment
  must not load the same tarball twice (the second finds the image fresh once it gets the lock).
- Each pull or load is bounded by ``DOCKER_IMAGE_SYNC_TIMEOUT``; waiting for another task's load is bounded by
  that task's own deadline.
- Progress goes to a callback as one-line texts (the executor forwards them as the task's status message),
  at most every ``PROGRESS_INTERVAL`` seconds.
- "Newer than the local copy": a loaded image keeps the creation time of the container it was committed
  from, which is always older than the tarball's export time, so comparing with ``Created`` alone would
  reload the same tarball for every task. The runner records which tarball it loaded (``<state>/images``)
  and compares with that too.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import trio

from kohakuriver_proto.lifecycle import TaskType
from kohakuriver_proto.models import ExecuteRequest
from kohakuriver_proto.units import format_size

from .docker_api import DockerClient, DockerError, NotFound
from .runner_settings import RunnerSettings
from .snapshots import Snapshots
from .state import atomic_write_json

__all__ = [
    "ENV_IMAGE_REPO",
    "ENV_IMAGE_TAG",
    "ImageError",
    "ImageResolver",
    "env_image_ref",
    "newest_tarball",
]

log = logging.getLogger("kohakuriver.runner.images")

ENV_IMAGE_REPO = "kohakuriver"
ENV_IMAGE_TAG = "base"
PROGRESS_INTERVAL = 2.0
_TARBALL_RE = re.compile(r"(?P<name>.+)-(?P<ts>[0-9]{1,12})\.tar")
_ENV_REF_RE = re.compile(rf"{ENV_IMAGE_REPO}/(?P<name>[a-z0-9][a-z0-9_.-]*):{ENV_IMAGE_TAG}")

Progress = Callable[[str], Awaitable[None]]


class ImageError(Exception):
    """The task's image cannot be made available (message says why, for the task's error)."""


def env_image_ref(name: str) -> str:
    """``kohakuriver/<name>:base`` (Docker repository names are lower case)."""
    return f"{ENV_IMAGE_REPO}/{name.lower()}:{ENV_IMAGE_TAG}"


def newest_tarball(directory: Path, name: str) -> tuple[int, Path] | None:
    """The newest ``<name>-<unixts>.tar`` in ``directory`` as ``(unixts, path)`` (blocking: use a thread).

    Names compare case-insensitively (the image name is lower-cased anyway). ``.tar.part`` files, which a
    writer renames when complete, never match, so a half-written tarball is never loaded.
    """
    best: tuple[int, Path] | None = None
    try:
        candidates = list(directory.iterdir())
    except OSError:
        return None
    for path in candidates:
        match = _TARBALL_RE.fullmatch(path.name)
        if not match or match["name"].lower() != name.lower() or not path.is_file():
            continue
        ts = int(match["ts"])
        if best is None or ts > best[0]:
            best = (ts, path)
    return best


class _Throttle:
    """Forward progress texts at most every ``interval`` seconds (the first one at once)."""

    def __init__(self, progress: Progress | None, interval: float = PROGRESS_INTERVAL) -> None:
        self._progress = progress
        self._interval = interval
        self._last = -math.inf

    async def __call__(self, text: str, *, force: bool = False) -> None:
        if self._progress is None:
            return
        now = trio.current_time()
        if force or now - self._last >= self._interval:
            self._last = now
            await self._progress(text)


class _PullSummary:
    """Turns the engine's per-layer pull events into one line: layers done and bytes downloaded."""

    def __init__(self, ref: str) -> None:
        self.ref = ref
        self.layers: dict[str, tuple[int, int]] = {}
        self.done: set[str] = set()

    def feed(self, event: Mapping[str, Any]) -> str | None:
        layer = event.get("id")
        status = str(event.get("status") or "")
        if not layer or layer == self.ref.rpartition(":")[2]:
            return f"pulling {self.ref}: {status}" if status else None
        detail = event.get("progressDetail") or {}
        if status == "Downloading" and detail.get("total"):
            self.layers[layer] = (int(detail.get("current") or 0), int(detail["total"]))
        elif status in ("Pull complete", "Already exists", "Download complete"):
            self.done.add(layer)
        elif status in ("Pulling fs layer", "Waiting"):
            self.layers.setdefault(layer, (0, 0))
        current = sum(c for c, _ in self.layers.values())
        total = sum(t for _, t in self.layers.values())
        count = len(set(self.layers) | self.done)
        text = f"pulling {self.ref}: {len(self.done)}/{count} layers"
        if total:
            text += f", {format_size(current)} of {format_size(total)} downloaded"
        return text


class ImageResolver:
    """Resolve and fetch images for tasks. One per runner (it owns the load lock)."""

    def __init__(self, docker: DockerClient, config: RunnerSettings, records_dir: Path) -> None:
        self.docker = docker
        self.config = config
        self.records_dir = records_dir
        self.tar_dir = Path(config.container_tar_dir)
        self.timeout = float(config.DOCKER_IMAGE_SYNC_TIMEOUT)
        self._load_lock = trio.Lock()

    async def resolve(self, request: ExecuteRequest, progress: Progress | None = None) -> str:
        """Make the task's image available locally; return the reference to create the container from.

        A VPS re-created with ``AUTO_RESTORE_ON_CREATE`` starts from its newest snapshot, whatever image
        the request names: the snapshot *is* that VPS's disk (the image it was made from is in it).
        """
        throttle = _Throttle(progress)
        if request.task_type is TaskType.VPS and self.config.AUTO_RESTORE_ON_CREATE:
            snapshot = await Snapshots(self.docker, self.config).newest(request.task_id)
            if snapshot is not None:
                await throttle(f"restoring snapshot {snapshot.tag}", force=True)
                return snapshot.tag
        if request.registry_image:
            return await self._registry(request.registry_image, throttle)
        if request.container_name:
            return await self._environment(request.container_name, throttle)
        default = self.config.DEFAULT_IMAGE
        if await self.docker.image_exists(default):
            return default
        match = _ENV_REF_RE.fullmatch(default)
        if match:
            return await self._environment(match["name"], throttle)
        return await self._registry(default, throttle)

    # -- registry images -----------------------------------------------------------------------------

    async def _registry(self, ref: str, progress: _Throttle) -> str:
        if await self.docker.image_exists(ref):
            return ref
        summary = _PullSummary(ref)

        async def on_event(event: Mapping[str, Any]) -> None:
            text = summary.feed(event)
            if text:
                await progress(text)

        await progress(f"pulling {ref}", force=True)
        log.info("pulling %s", ref)
        try:
            with trio.fail_after(self.timeout):
                await self.docker.pull_image(ref, progress=on_event)
        except trio.TooSlowError:
            raise ImageError(
                f"pulling {ref} took longer than DOCKER_IMAGE_SYNC_TIMEOUT ({self.timeout:g} s)"
            ) from None
        except DockerError as exc:
            raise ImageError(f"cannot pull {ref}: {exc}") from None
        await progress(f"pulled {ref}", force=True)
        return ref

    # -- environment tarballs ------------------------------------------------------------------------

    def _record_path(self, ref: str) -> Path:
        return self.records_dir / (ref.replace("/", "_").replace(":", "_") + ".json")

    async def _loaded_timestamp(self, ref: str) -> float | None:
        """When the local copy of ``ref`` was made, as the tarball timestamp it corresponds to (None: no
        local copy)."""
        try:
            info = await self.docker.inspect_image(ref)
        except NotFound:
            return None
        stamp = info.created.timestamp() if info.created else 0.0
        record = await trio.to_thread.run_sync(_read_record, self._record_path(ref))
        if record and record.get("image_id") == info.id:
            stamp = max(stamp, float(record.get("timestamp") or 0))
        return stamp

    async def _environment(self, name: str, progress: _Throttle) -> str:
        ref = env_image_ref(name)
        newest = await trio.to_thread.run_sync(newest_tarball, self.tar_dir, name)
        local = await self._loaded_timestamp(ref)
        if newest is None:
            if local is not None:
                return ref
            raise ImageError(
                f"environment {name!r}: no tarball {name}-<timestamp>.tar in {self.tar_dir} and no local "
                f"image {ref}"
            )
        if local is not None and local >= newest[0]:
            return ref
        if self._load_lock.locked():
            await progress(f"waiting for another image load before loading {newest[1].name}", force=True)
        async with self._load_lock:
            # Another task may have loaded it while this one waited.
            newest = await trio.to_thread.run_sync(newest_tarball, self.tar_dir, name) or newest
            local = await self._loaded_timestamp(ref)
            if local is not None and local >= newest[0]:
                return ref
            await self._load(ref, newest[0], newest[1], progress)
        return ref

    async def _load(self, ref: str, ts: int, path: Path, progress: _Throttle) -> None:
        size = (await trio.Path(path).stat()).st_size
        what = f"loading {path.name} ({format_size(size)})"

        async def on_event(event: Mapping[str, Any]) -> None:
            status = str(event.get("status") or event.get("stream") or "").strip()
            detail = str(event.get("progress") or "").strip()
            await progress(f"{what}: {status} {detail}".strip())

        await progress(what, force=True)
        log.info("%s as %s", what, ref)
        try:
            with trio.fail_after(self.timeout):
                loaded = await self.docker.load_image(path, progress=on_event)
                if not await self.docker.image_exists(ref):
                    # The tarball was saved under another name: make it this environment's image.
                    if len(loaded) != 1:
                        raise ImageError(
                            f"{path.name} does not contain {ref} (it has {', '.join(loaded) or 'nothing'})"
                        )
                    repo, _, tag = ref.rpartition(":")
                    await self.docker.tag_image(loaded[0], repo, tag)
                info = await self.docker.inspect_image(ref)
        except trio.TooSlowError:
            raise ImageError(
                f"loading {path.name} took longer than DOCKER_IMAGE_SYNC_TIMEOUT ({self.timeout:g} s)"
            ) from None
        except (DockerError, OSError) as exc:
            raise ImageError(f"cannot load {path}: {exc}") from None
        record = {"tarball": path.name, "timestamp": ts, "image_id": info.id}
        await trio.to_thread.run_sync(atomic_write_json, self._record_path(ref), record)
        await progress(f"loaded {path.name} as {ref}", force=True)


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
