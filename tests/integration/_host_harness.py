"""A real host (``serve_host`` in a trio nursery, ephemeral port, tmp database) and a minimal stand-in for
the runner's HTTP endpoints, for integration tests of the host alone.

The stand-in is not a runner: it runs nothing. It records what the host sends (``/api/execute``, kill, pause,
resume, with the Authorization header), answers like the contract says, and serves canned log text, so a
test can drive dispatch, reconciliation and liveness and check exactly what reached "the node". Real
runners with Docker are the end-to-end tests' business.
"""

from __future__ import annotations

import inspect
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import httpx
import hypercorn.config
import hypercorn.trio
import trio
from quart import Response, request
from quart_trio import QuartTrio

from kohakuriver_host import scheduling_loop, tasks_service
from kohakuriver_host.config import host_config_from
from kohakuriver_host.daemon import HostHandle, serve_host

GiB = 1 << 30


def auth(token: str | None) -> dict[str, str]:
    return {} if token is None else {"Authorization": f"Bearer {token}"}


def closed_port_url() -> str:
    """A URL on which nothing listens (connection refused): an unreachable runner."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    """Poll a predicate (sync or async) until it returns something truthy; fail the test after ``timeout``."""
    with trio.move_on_after(timeout):
        while True:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return result
            await trio.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# -- the runner stand-in -----------------------------------------------------------------------------------


@attrs.define
class FakeRunner:
    """Records calls. ``mode`` for ``/api/execute``: ``accept`` (202), ``refuse`` (422), ``error`` (503) or
    ``hang`` (never answers)."""

    cluster_token: str
    url: str = ""
    mode: str = "accept"
    executed: list[dict[str, Any]] = attrs.field(factory=list)
    controls: list[tuple[str, str]] = attrs.field(factory=list)
    bad_auth: int = 0
    logs: dict[tuple[str, str], str] = attrs.field(factory=dict)
    log_requests: list[dict[str, str]] = attrs.field(factory=list)
    #: Followed streams: (task id, stream) -> send channel the test writes chunks to (close to end).
    follow_send: dict[tuple[str, str], trio.MemorySendChannel] = attrs.field(factory=dict)
    follow_recv: dict[tuple[str, str], trio.MemoryReceiveChannel] = attrs.field(factory=dict)

    def follow_channel(self, task_id: str, stream: str = "stdout") -> trio.MemorySendChannel:
        send, recv = trio.open_memory_channel(100)
        self.follow_send[(task_id, stream)] = send
        self.follow_recv[(task_id, stream)] = recv
        return send

    def executed_ids(self) -> list[str]:
        return [e["task_id"] for e in self.executed]

    def app(self) -> QuartTrio:
        app = QuartTrio(__name__, static_folder=None)

        def authorized() -> bool:
            ok = request.headers.get("Authorization") == f"Bearer {self.cluster_token}"
            if not ok:
                self.bad_auth += 1
            return ok

        def denied() -> Response:
            return Response('{"error":"unauthorized","message":"cluster token needed"}', 401)

        @app.post("/api/execute")
        async def execute() -> Response:
            if not authorized():
                return denied()
            body = json.loads(await request.get_data())
            self.executed.append(body)
            if self.mode == "refuse":
                return Response('{"error":"invalid","message":"no such image"}', 422)
            if self.mode == "error":
                return Response('{"error":"unavailable","message":"Docker is down"}', 503)
            if self.mode == "hang":
                await trio.sleep_forever()
            return Response('{"accepted":true}', 202, content_type="application/json")

        @app.post("/api/<action>/<task_id>")
        async def control(action: str, task_id: str) -> Response:
            if not authorized():
                return denied()
            self.controls.append((action, task_id))
            return Response(
                json.dumps({"task_id": task_id, "ok": True}), 200, content_type="application/json"
            )

        @app.get("/api/tasks/<task_id>/logs")
        async def logs(task_id: str) -> Response:
            if not authorized():
                return denied()
            args = dict(request.args)
            self.log_requests.append({"task_id": task_id, **args})
            stream = args.get("stream", "stdout")
            if args.get("follow") == "1" and (task_id, stream) in self.follow_recv:
                recv = self.follow_recv[(task_id, stream)]

                async def body() -> AsyncIterator[bytes]:
                    yield self.logs.get((task_id, stream), "").encode()
                    async for chunk in recv:
                        yield chunk if isinstance(chunk, bytes) else chunk.encode()

                return Response(body(), content_type="text/plain")
            if (task_id, stream) not in self.logs:
                return Response('{"error":"not_found","message":"no such task"}', 404)
            text = self.logs[(task_id, stream)]
            lines = args.get("lines")
            if lines:
                text = "".join(text.splitlines(keepends=True)[-int(lines) :])
            return Response(text, content_type="text/plain")

        return app


@asynccontextmanager
async def fake_runner(
    cluster_token: str, cls: type[FakeRunner] = FakeRunner, **kwargs: Any
) -> AsyncIterator[FakeRunner]:
    """``cls`` (a ``FakeRunner`` or a subclass with more routes) served on 127.0.0.1 and a free port."""
    runner = cls(cluster_token, **kwargs)
    hc = hypercorn.config.Config()
    hc.bind = ["127.0.0.1:0"]
    hc.accesslog = None
    hc.errorlog = None
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            partial(hypercorn.trio.serve, runner.app(), hc, shutdown_trigger=trio.sleep_forever)
        )
        runner.url = binds[0]
        yield runner
        nursery.cancel_scope.cancel()


# -- the host ----------------------------------------------------------------------------------------------


@attrs.define
class Host:
    handle: HostHandle
    config: Any
    home: Path
    http: httpx.AsyncClient
    admin_token: str

    @property
    def cluster_token(self) -> str:
        return self.handle.cluster_token

    async def call(
        self, method: str, path: str, token: str | None = "admin", **kwargs: Any
    ) -> httpx.Response:
        token = self.admin_token if token == "admin" else token
        headers = {**auth(token), **kwargs.pop("headers", {})}
        return await self.http.request(method, path, headers=headers, **kwargs)

    async def ok(self, method: str, path: str, token: str | None = "admin", **kwargs: Any) -> Any:
        r = await self.call(method, path, token, **kwargs)
        assert r.status_code < 400, f"{method} {path}: {r.status_code} {r.text}"
        return r.json()

    async def create_user(self, username: str, role: str = "user") -> str:
        body = await self.ok("POST", "/api/auth/users", json={"username": username, "role": role})
        return body["token"]

    async def submit(self, token: str | None = "admin", **spec: Any) -> list[str]:
        spec.setdefault("command", "echo")
        body = await self.ok("POST", "/api/submit", token, json=spec)
        return body["task_ids"]

    async def task(self, task_id: str) -> dict[str, Any]:
        return await self.ok("GET", f"/api/status/{task_id}")

    async def wait_status(self, task_id: str, *statuses: str, timeout: float = 10.0) -> dict[str, Any]:
        async def reached():
            record = await self.task(task_id)
            return record if record["status"] in statuses else None

        return await wait_for(reached, timeout, what=f"task {task_id} to reach {statuses}")

    async def register(
        self,
        hostname: str,
        url: str,
        *,
        cores: int = 8,
        memory: int = 16 * GiB,
        gpus: tuple[int, ...] = (),
        numa: dict[str, Any] | None = None,
        docker: bool = True,
        vm: dict[str, Any] | None = None,
    ) -> httpx.Response:
        """Register a node; ``vm``: its ``VmFacts`` (JSON shape), none by default."""
        body: dict[str, Any] = {
            "hostname": hostname,
            "url": url,
            "total_cores": cores,
            "memory_total_bytes": memory,
            "gpu_info": [{"gpu_id": g, "name": f"GPU {g}"} for g in gpus],
            "numa_topology": numa,
            "docker_available": docker,
            "docker_error": None if docker else "cannot connect to /var/run/docker.sock",
            "runner_version": "test",
        }
        if vm is not None:
            body["vm"] = vm
            body["vm_capable"] = bool(vm.get("capable"))
        r = await self.call("POST", "/api/register", self.cluster_token, json=body)
        assert r.status_code == 200, r.text
        return r

    async def heartbeat(
        self,
        hostname: str,
        running: list[str] = (),
        finished: list[dict[str, Any]] = (),
        docker: bool = True,
        vm: dict[str, Any] | None = None,
    ) -> httpx.Response:
        body: dict[str, Any] = {
            "running_tasks": list(running),
            "finished_tasks": list(finished),
            "cpu_percent": 12.5,
            "memory_percent": 40.0,
            "memory_used_bytes": 1 << 30,
            "memory_total_bytes": 16 * GiB,
            "docker_available": docker,
            "docker_error": None if docker else "Docker went away",
        }
        if vm is not None:
            body["vm"] = vm
            body["vm_capable"] = bool(vm.get("capable"))
        return await self.call("PUT", f"/api/heartbeat/{hostname}", self.cluster_token, json=body)

    async def update(self, task_id: str, status: str, **fields: Any) -> dict[str, Any]:
        r = await self.call(
            "POST", "/api/update", self.cluster_token, json={"task_id": task_id, "status": status, **fields}
        )
        assert r.status_code == 200, r.text
        return r.json()


def host_config(home: Path, **overrides: Any) -> Any:
    values = {
        "HOST_BIND_IP": "127.0.0.1",
        "DB_FILE": str(home / "host.db"),
        "SHARED_DIR": str(home / "shared"),
        **overrides,
    }
    return host_config_from(**values)


@asynccontextmanager
async def running_host(home: Path, config: Any | None = None, **overrides: Any) -> AsyncIterator[Host]:
    """``serve_host`` on 127.0.0.1 and a free port, state under ``home``; stopped (cancelled) on exit."""
    config = config or host_config(home, **overrides)
    async with trio.open_nursery() as nursery:
        handle = await nursery.start(partial(serve_host, config, port=0))
        creds = json.loads(config.credentials_file.read_text())
        async with httpx.AsyncClient(base_url=handle.url, timeout=15) as http:
            yield Host(handle, config, home, http, creds["token"])
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def quick_host(home: Path, monkeypatch: Any) -> AsyncIterator[Host]:
    """``running_host`` with a short dispatch backoff and scheduler tick, so that retry paths take a fraction
    of a second (``monkeypatch`` undoes them after the test)."""
    monkeypatch.setenv("KOHAKURIVER_HOME", str(home))
    monkeypatch.setattr(tasks_service, "DISPATCH_BACKOFF_SECONDS", (0.1, 0.1))
    monkeypatch.setattr(scheduling_loop, "TICK_SECONDS", 0.2)
    async with running_host(home) as host:
        yield host


async def executed(runner: FakeRunner, count: int = 1) -> list[dict]:
    """The runner's first ``count`` execute calls, once it has had them."""

    async def enough():
        return runner.executed if len(runner.executed) >= count else None

    return await wait_for(enough, what=f"{count} execute call(s) on the runner")
