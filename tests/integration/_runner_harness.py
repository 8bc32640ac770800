"""Helpers for the runner integration tests: a stand-in for the host's runner-facing endpoints, runner
instances on ephemeral ports, and cleanup of the containers they leave.

``FakeHost`` serves ``POST /api/register``, ``PUT /api/heartbeat/{hostname}`` and ``POST /api/update`` with
the real models (every body the runner sends is parsed with the protocol converter, so a malformed report
fails the test), records what arrives, and can play a host that is down, forgot a node, or wants tasks
killed. It is not the host daemon: these tests check the runner alone.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from quart import Response, request
from quart_trio import QuartTrio

from kohakuriver_proto.converter import dumps, loads
from kohakuriver_proto.lifecycle import FINAL
from kohakuriver_proto.models import ExecuteRequest, Heartbeat, NodeRegistration, StatusUpdate
from kohakuriver_runner.config import runner_config_from
from kohakuriver_runner.container_spec import LABEL_RUNNER, container_name
from kohakuriver_runner.daemon import RunnerHandle, serve_runner
from kohakuriver_runner.docker_api import Conflict, DockerClient, NotFound

T = TypeVar("T")

SOCKET = os.environ.get("KR_DOCKER_SOCKET", "/var/run/docker.sock")
BUSYBOX = "kohakuriver/busybox:latest"
REPO_ROOT = Path(__file__).resolve().parents[2]
RUN = f"{os.getpid()}{secrets.token_hex(2)}"
TOKEN = "krc_test_" + secrets.token_urlsafe(24)


def new_task_id() -> int:
    return secrets.randbits(60) + 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FakeHost:
    """Records registrations, heartbeats and reports; ``port`` once ``serve`` has started."""

    def __init__(self, token: str = TOKEN) -> None:
        self.token = token
        self.port = 0
        self.registrations: list[NodeRegistration] = []
        self.heartbeats: list[tuple[str, Heartbeat]] = []
        self.updates: list[StatusUpdate] = []
        self.errors: list[str] = []
        self.known: set[str] = set()
        self.kill: set[int] = set()
        self.down = False  # answer 503 to everything
        self._changed = trio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def app(self) -> QuartTrio:
        app = QuartTrio(__name__, static_folder=None)

        @app.before_request
        async def check() -> Response | None:
            if self.down:
                return Response('{"error":"unavailable","message":"down"}', 503, mimetype="application/json")
            if request.headers.get("Authorization") != f"Bearer {self.token}":
                self.errors.append(f"bad token on {request.path}")
                return Response('{"error":"unauthorized","message":"no"}', 401, mimetype="application/json")
            return None

        def parse(cls: type[T], data: bytes) -> T:
            try:
                return loads(data, cls)
            except Exception as exc:
                self.errors.append(f"{cls.__name__}: {exc}")
                raise

        @app.post("/api/register")
        async def register() -> Response:
            reg = parse(NodeRegistration, await request.get_data())
            self.registrations.append(reg)
            self.known.add(reg.hostname)
            self._notify()
            return Response('{"message":"ok"}', mimetype="application/json")

        @app.put("/api/heartbeat/<hostname>")
        async def heartbeat(hostname: str) -> Response:
            beat = parse(Heartbeat, await request.get_data())
            if hostname not in self.known:
                return Response(
                    '{"error":"not_found","message":"unknown node"}', 404, mimetype="application/json"
                )
            self.heartbeats.append((hostname, beat))
            self._notify()
            kill = [str(t) for t in beat.running_tasks if t in self.kill]
            return Response(json.dumps({"kill": kill}), mimetype="application/json")

        @app.post("/api/update")
        async def update() -> Response:
            self.updates.append(parse(StatusUpdate, await request.get_data()))
            self._notify()
            return Response('{"accepted":true}', mimetype="application/json")

        return app

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = HypercornConfig()
        cfg.bind = [f"127.0.0.1:{self.port or 0}"]
        cfg.accesslog = None
        cfg.errorlog = None

        async def started_serve(*, task_status: trio.TaskStatus[list[str]]) -> None:
            await serve(self.app(), cfg, task_status=task_status)

        async with trio.open_nursery() as nursery:
            binds = await nursery.start(started_serve)
            self.port = int(binds[0].rsplit(":", 1)[1])
            task_status.started(self.port)

    async def wait_for(self, predicate: Callable[[], T], timeout: float = 30, what: str = "") -> T:
        with trio.fail_after(timeout):
            while True:
                value = predicate()
                if value:
                    return value
                changed = self._changed
                with trio.move_on_after(0.2):
                    await changed.wait()

    def reports(self, task_id: int) -> list[StatusUpdate]:
        """Every report for the task, from updates and heartbeats' ``finished_tasks``."""
        found = [u for u in self.updates if u.task_id == task_id]
        for _, beat in self.heartbeats:
            found += [u for u in beat.finished_tasks if u.task_id == task_id]
        return found

    def final(self, task_id: int) -> StatusUpdate | None:
        return next((u for u in self.reports(task_id) if u.status in FINAL), None)

    async def wait_final(self, task_id: int, timeout: float = 60) -> StatusUpdate:
        return await self.wait_for(lambda: self.final(task_id), timeout, f"final report of {task_id}")

    async def wait_status(self, task_id: int, status: str, timeout: float = 60) -> StatusUpdate:
        return await self.wait_for(
            lambda: next((u for u in self.reports(task_id) if u.status.value == status), None), timeout
        )

    def last_heartbeat(self, hostname: str) -> Heartbeat | None:
        return next((b for h, b in reversed(self.heartbeats) if h == hostname), None)

    async def next_heartbeat(self, hostname: str, timeout: float = 30) -> Heartbeat:
        count = sum(1 for h, _ in self.heartbeats if h == hostname)
        await self.wait_for(lambda: sum(1 for h, _ in self.heartbeats if h == hostname) > count, timeout)
        beat = self.last_heartbeat(hostname)
        assert beat is not None
        return beat


class Runner:
    """One runner daemon in the test's nursery; ``crash()`` cancels it (containers keep running)."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.handle: RunnerHandle | None = None
        self._scope: trio.CancelScope | None = None
        self._stopped = trio.Event()
        self.client: httpx.AsyncClient | None = None

    async def _run(self, *, task_status: trio.TaskStatus[RunnerHandle]) -> None:
        try:
            with trio.CancelScope() as self._scope:
                await serve_runner(self.config, task_status=task_status)
        finally:
            self._stopped.set()

    async def start(self, nursery: trio.Nursery) -> Runner:
        self._stopped = trio.Event()
        self.handle = await nursery.start(self._run)
        self.client = httpx.AsyncClient(
            base_url=self.handle.bind_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
        )
        return self

    async def crash(self) -> None:
        assert self._scope is not None
        self._scope.cancel()
        await self._stopped.wait()
        if self.client is not None:
            await self.client.aclose()

    async def execute(self, request: ExecuteRequest) -> httpx.Response:
        assert self.client is not None
        return await self.client.post("/api/execute", content=dumps(request))

    async def logs(self, task_id: int, **params: Any) -> httpx.Response:
        assert self.client is not None
        return await self.client.get(f"/api/tasks/{task_id}/logs", params=params)


def runner_config(tmp: Path, host: FakeHost, name: str, **overrides: Any) -> Any:
    base = tmp / name
    shared = tmp / "shared"
    shared.mkdir(exist_ok=True)
    values: dict[str, Any] = {
        "RUNNER_BIND_IP": "127.0.0.1",
        "RUNNER_PORT": free_port(),
        "HOST_ADDRESS": "127.0.0.1",
        "HOST_PORT": host.port,
        "RUNNER_HOSTNAME": name,
        "CLUSTER_TOKEN": TOKEN,
        "SHARED_DIR": str(shared),
        "LOCAL_TEMP_DIR": str(base / "local"),
        "RUNNER_STATE_DIR": str(base / "state"),
        "HEARTBEAT_INTERVAL_SECONDS": 1,
        "DEFAULT_IMAGE": BUSYBOX,
        "CONTAINER_TAR_DIR": str(tmp / "containers"),
    }
    values.update(overrides)
    return runner_config_from(values)


def runner_name(what: str) -> str:
    return f"krt-{RUN}-{what}"


async def ensure_busybox(docker: DockerClient) -> None:
    if await docker.image_exists(BUSYBOX):
        return
    await trio.run_process(["bash", str(REPO_ROOT / "scripts" / "images" / "busybox.sh")])


async def remove_runner_containers(docker: DockerClient, hostnames: list[str]) -> None:
    for hostname in hostnames:
        for container in await docker.list_containers(labels={LABEL_RUNNER: hostname}):
            # Conflict: the runner is removing it already (it removes a finished task's container after
            # reporting the end, so a test's clean-up can meet that removal).
            with suppress(NotFound, Conflict):
                await docker.remove(container.id, force=True)


class Rig:
    def __init__(self, nursery: trio.Nursery, tmp_path: Path, host: FakeHost, docker: DockerClient) -> None:
        self.nursery = nursery
        self.tmp = tmp_path
        self.host = host
        self.docker = docker
        self.runners: list[Runner] = []
        self.hostnames: list[str] = []

    def config(self, what: str, **overrides):
        name = runner_name(what)
        if name not in self.hostnames:
            self.hostnames.append(name)
        return runner_config(self.tmp, self.host, name, **overrides)

    async def start(self, what: str = "a", config=None, **overrides) -> Runner:
        runner = Runner(config or self.config(what, **overrides))
        await runner.start(self.nursery)
        self.runners.append(runner)
        return runner


@asynccontextmanager
async def runner_rig(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Rig]:
    """A fake host and a Docker client; on exit, stop the runners and remove their containers.

    Test modules wrap it in their own ``rig`` fixture (``nursery`` is pytest-trio's).
    """
    if not os.path.exists(SOCKET):
        pytest.skip(f"no Docker socket at {SOCKET}")
    async with DockerClient(SOCKET) as docker:
        await ensure_busybox(docker)
        host = FakeHost()
        await nursery.start(host.serve)
        rig = Rig(nursery, tmp_path, host, docker)
        try:
            yield rig
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(60):
                for runner in rig.runners:
                    with suppress(Exception):
                        await runner.crash()
                await remove_runner_containers(docker, rig.hostnames)
        assert not host.errors, host.errors


def req(task_id: int, command: str, *args: str, **kwargs) -> ExecuteRequest:
    return ExecuteRequest(task_id=task_id, command=command, arguments=list(args), **kwargs)


async def container_gone(docker: DockerClient, task_id: int, timeout: float = 20) -> None:
    with trio.fail_after(timeout):
        while True:
            try:
                await docker.inspect(container_name(task_id))
            except NotFound:
                return
            await trio.sleep(0.1)


async def hanging_registry(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """A "registry" that accepts connections and never answers: pulls from it hang."""

    async def hold(stream: trio.SocketStream) -> None:
        async with stream:
            await trio.sleep_forever()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(hold, listeners)
