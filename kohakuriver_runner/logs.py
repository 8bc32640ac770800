"""A task's stdout/stderr: saved when it exits, served while it runs and afterwards.

While the container exists the output is read from Docker (``GET /containers/{id}/logs``); when it exits the
executor copies both streams to ``<state>/logs/<id>/{stdout,stderr}.log`` before removing the container, and
from then on the files are served. No shared file system is involved.

``lines=N`` means the last N lines *of the chosen stream*. Docker's own ``tail`` counts lines of both streams
together and filters afterwards (asking for 10 stdout lines can return 3), so the runner reads the stream and
keeps the last N lines itself. Following with ``lines`` reads the history up to a moment ``t0`` and then
follows from ``t0`` (the engine's ``until``/``since`` are inclusive, so nothing falls in between).
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing
from pathlib import Path
from typing import Protocol

import trio

from .docker_api import Conflict, DockerClient, NotFound, StreamType
from .state import StateStore

__all__ = [
    "STREAMS",
    "LineTail",
    "LiveRun",
    "TaskLogsNotFound",
    "check_task_logs",
    "save_container_logs",
    "stream_task_logs",
    "tail_file",
]

STREAMS = ("stdout", "stderr")
#: A "line" longer than this (a progress bar without newlines, binary output) is cut to its last bytes.
MAX_LINE = 1 << 20
_WRITE_BUFFER = 1 << 20
_READ_BLOCK = 64 * 1024


class TaskLogsNotFound(LookupError):
    """Neither a container nor saved output exists for the task."""


class LiveRun(Protocol):
    """What the log reader needs of a task the executor still holds (``executor.TaskRun`` is one): the
    executor saves the logs through this module, so this module cannot know the executor."""

    @property
    def started(self) -> trio.Event:
        """Set once the container exists (or the run ended without one)."""
        ...

    @property
    def container_id(self) -> str | None: ...


class LineTail:
    """Keeps the last ``n`` lines of what it is fed (bounded memory: ``n`` lines of at most ``MAX_LINE``)."""

    def __init__(self, n: int) -> None:
        self.lines: collections.deque[bytes] = collections.deque(maxlen=max(n, 0))
        self.partial = bytearray()

    def feed(self, data: bytes) -> None:
        if self.lines.maxlen == 0:
            return
        self.partial += data
        if b"\n" in data:
            *complete, rest = bytes(self.partial).split(b"\n")
            for line in complete[-(self.lines.maxlen or 1) :]:
                self.lines.append(line[-MAX_LINE:] + b"\n")
            self.partial = bytearray(rest)
        if len(self.partial) > MAX_LINE:
            del self.partial[:-MAX_LINE]

    def result(self) -> bytes:
        lines = list(self.lines)
        if self.partial and self.lines.maxlen:
            lines.append(bytes(self.partial))
            lines = lines[-self.lines.maxlen :]
        return b"".join(lines)


async def save_container_logs(docker: DockerClient, container: str, dest: Path, *, tty: bool = False) -> None:
    """Copy the container's whole stdout and stderr into ``dest/{stdout,stderr}.log`` (atomically each)."""
    await trio.Path(dest).mkdir(parents=True, exist_ok=True)
    parts = {name: trio.Path(dest / f".{name}.log.part") for name in STREAMS}
    files = {name: await trio.open_file(path, "wb") for name, path in parts.items()}
    buffers = {name: bytearray() for name in STREAMS}
    try:
        async with aclosing(docker.logs(container, follow=False, tty=tty)) as chunks:
            async for stream, data in chunks:
                name = "stderr" if stream == StreamType.STDERR else "stdout"
                buffers[name] += data
                # Batch small frames: each write is a trip to a worker thread.
                if len(buffers[name]) >= _WRITE_BUFFER:
                    await files[name].write(bytes(buffers[name]))
                    buffers[name].clear()
        for name in STREAMS:
            if buffers[name]:
                await files[name].write(bytes(buffers[name]))
            await files[name].aclose()
        for name, path in parts.items():
            await path.rename(dest / f"{name}.log")
    finally:
        with trio.CancelScope(shield=True):
            for name, path in parts.items():
                await files[name].aclose()
                await path.unlink(missing_ok=True)


def _tail_file_sync(path: Path, lines: int | None) -> bytes:
    with open(path, "rb") as f:
        if lines is None:
            return f.read()
        if lines <= 0:
            return b""
        f.seek(0, os.SEEK_END)
        end = f.tell()
        pos = end
        data = b""
        # Read backwards until there are lines+1 newlines (the last line may end with one).
        while pos > 0 and data.count(b"\n") <= lines:
            step = min(_READ_BLOCK, pos)
            pos -= step
            f.seek(pos)
            data = f.read(step) + data
    tail = LineTail(lines)
    tail.feed(data)
    return tail.result()


async def tail_file(path: Path, lines: int | None) -> bytes:
    """The last ``lines`` lines of a file (all of it for None); a missing file reads as empty."""
    try:
        return await trio.to_thread.run_sync(_tail_file_sync, path, lines)
    except FileNotFoundError:
        return b""


async def file_chunks(path: Path) -> AsyncIterator[bytes]:
    """A whole file in blocks (memory stays bounded however large it is); a missing file is empty."""
    try:
        f = await trio.open_file(path, "rb")
    except FileNotFoundError:
        return
    async with f:
        while data := await f.read(_READ_BLOCK):
            yield data


async def _docker_chunks(
    docker: DockerClient,
    container: str,
    stream: str,
    *,
    follow: bool,
    since: float | None = None,
    until: float | None = None,
) -> AsyncIterator[bytes]:
    want = StreamType.STDERR if stream == "stderr" else StreamType.STDOUT
    async with aclosing(
        docker.logs(
            container,
            stdout=stream == "stdout",
            stderr=stream == "stderr",
            follow=follow,
            since=since,
            until=until,
        )
    ) as chunks:
        async for kind, data in chunks:
            if kind == want:
                yield data


async def _from_docker(
    docker: DockerClient, container: str, stream: str, lines: int | None, follow: bool
) -> AsyncIterator[bytes]:
    if lines is None:
        async for data in _docker_chunks(docker, container, stream, follow=follow):
            yield data
        return
    t0 = time.time()
    tail = LineTail(lines)
    async for data in _docker_chunks(docker, container, stream, follow=False, until=t0 if follow else None):
        tail.feed(data)
    head = tail.result()
    if head:
        yield head
    if follow:
        async for data in _docker_chunks(docker, container, stream, follow=True, since=t0):
            yield data


async def check_task_logs(runs: Mapping[int, LiveRun], store: StateStore, task_id: int) -> None:
    """Raise ``TaskLogsNotFound`` when the runner knows nothing of the task (called before streaming, so
    the caller can still answer 404). ``runs``: the tasks the executor holds (``TaskManager.runs``)."""
    if task_id in runs or store.get(task_id) is not None:
        return
    if await trio.Path(store.logs_dir(task_id)).is_dir():
        return
    raise TaskLogsNotFound(f"this runner has no output of task {task_id}")


async def stream_task_logs(
    runs: Mapping[int, LiveRun],
    store: StateStore,
    docker: DockerClient,
    task_id: int,
    stream: str,
    lines: int | None,
    follow: bool,
) -> AsyncIterator[bytes]:
    """The task's output as byte chunks; with ``follow`` it ends when the task ends."""
    if stream not in STREAMS:
        raise ValueError(f"stream must be stdout or stderr, got {stream!r}")
    run = runs.get(task_id)
    if run is not None and follow:
        # Still preparing (pulling/loading the image): the output starts with the container.
        await run.started.wait()
    container = None if run is None else run.container_id
    if container is not None:
        try:
            async for data in _from_docker(docker, container, stream, lines, follow):
                yield data
            return
        except (NotFound, Conflict):
            # Removed, or being removed ("dead or marked for removal", 409), after its output was saved: the
            # runner removes a container only once its output is on disk, and the engine says so before it
            # streams anything.
            pass
    saved = store.logs_dir(task_id) / f"{stream}.log"
    if lines is None:
        async for data in file_chunks(saved):
            yield data
    else:
        yield await tail_file(saved, lines)
