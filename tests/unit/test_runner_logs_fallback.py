"""A finished task's output is read from the saved files once its container is gone or going.

The runner removes a container only after saving its output, and reports the task's end before removing it,
so a reader can ask the engine while the removal runs: Docker then answers 409 ("dead or marked for
removal") instead of 404. Both mean: read the saved files."""

from __future__ import annotations

import pytest
import trio

from kohakuriver_runner.docker_api import Conflict, NotFound
from kohakuriver_runner.logs import stream_task_logs
from kohakuriver_runner.state import StateStore

TASK = 4242


class _Run:
    def __init__(self) -> None:
        self.started = trio.Event()
        self.started.set()
        self.container_id = "c0ffee"


class _GoneDocker:
    def __init__(self, error: Exception) -> None:
        self.error = error

    async def logs(self, container: str, **_: object):
        raise self.error
        yield  # pragma: no cover  (an async generator, as DockerClient.logs is)


@pytest.mark.parametrize(
    "error",
    [NotFound(404, "no such container"), Conflict(409, "container is dead or marked for removal")],
)
@pytest.mark.parametrize("follow", [False, True])
async def test_output_comes_from_the_saved_files(tmp_path, error, follow) -> None:
    store = StateStore(tmp_path)
    saved = store.logs_dir(TASK)
    saved.mkdir(parents=True)
    (saved / "stdout.log").write_bytes(b"one\ntwo\n\xff\n")
    chunks = [
        chunk
        async for chunk in stream_task_logs(
            {TASK: _Run()}, store, _GoneDocker(error), TASK, "stdout", None, follow
        )
    ]
    assert b"".join(chunks) == b"one\ntwo\n\xff\n"
