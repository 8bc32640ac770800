"""The host's VPS endpoints against a real ``serve_host`` and a stand-in for the runner's HTTP API (the
``_host_harness`` one, plus the runner's VPS routes): create -> dispatch with the key, the queue, stop,
restart in place and re-creation, snapshots proxied to the node, who may see what, and refusals."""

from __future__ import annotations

import json
from typing import Any

import attrs
import pytest
import trio
from quart import Response, request
from quart_trio import QuartTrio

from kohakuriver_cli.ssh_keys import generate_ed25519
from kohakuriver_host import scheduling_loop

from ._host_harness import (
    FakeRunner,
    closed_port_url,
    executed,
    fake_runner,
    host_config,
    quick_host,
    running_host,
)

GiB = 1 << 30


def public_key(comment: str = "alice@laptop") -> str:
    return generate_ed25519(comment=comment)[1]


@attrs.define
class VpsRunner(FakeRunner):
    """``FakeRunner`` plus the runner's VPS routes. ``stop_code``: 200 (stopped when it answers) or 202
    (it reports ``stopped`` later); ``refuse``: answer the VPS routes with this 4xx status."""

    vps_calls: list[tuple[str, str]] = attrs.field(factory=list)
    stop_code: int = 200
    refuse: int | None = None
    snapshots: dict[str, list[dict[str, Any]]] = attrs.field(factory=dict)
    host_keys: dict[str, str] = attrs.field(factory=dict)

    def app(self) -> QuartTrio:
        app = super().app()

        def check() -> Response | None:
            if request.headers.get("Authorization") != f"Bearer {self.cluster_token}":
                self.bad_auth += 1
                return Response('{"error":"unauthorized","message":"cluster token needed"}', 401)
            if self.refuse is not None:
                return Response('{"error":"conflict","message":"the container is busy"}', self.refuse)
            return None

        def reply(data: Any, status: int = 200) -> Response:
            return Response(json.dumps(data), status, content_type="application/json")

        @app.post("/api/vps/<task_id>/<action>")
        async def vps_action(task_id: str, action: str) -> Response:
            if (denied := check()) is not None:
                return denied
            self.vps_calls.append((action, task_id))
            code = self.stop_code if action == "stop" else 200
            return reply({"task_id": task_id, "ok": True}, code)

        @app.get("/api/vps/<task_id>/snapshots")
        async def list_snapshots(task_id: str) -> Response:
            if (denied := check()) is not None:
                return denied
            self.vps_calls.append(("list_snapshots", task_id))
            # Oldest first on purpose: the host answers newest first whatever order the runner uses.
            return reply({"task_id": task_id, "snapshots": self.snapshots.get(task_id, [])})

        @app.post("/api/vps/<task_id>/snapshots")
        async def create_snapshot(task_id: str) -> Response:
            if (denied := check()) is not None:
                return denied
            self.vps_calls.append(("create_snapshot", task_id))
            ts = 1_700_000_000 + len(self.snapshots.get(task_id, []))
            snap = {
                "tag": f"kohakuriver-snapshot/vps-{task_id}:{ts}",
                "created_at": "2025-04-10T08:30:00Z",
                "size_bytes": 4096,
            }
            self.snapshots.setdefault(task_id, []).append(snap)
            return reply(snap, 201)

        @app.get("/api/vps/<task_id>/host-key")
        async def host_key(task_id: str) -> Response:
            if (denied := check()) is not None:
                return denied
            self.vps_calls.append(("host_key", task_id))
            if task_id not in self.host_keys:
                return reply({"error": "not_found", "message": f"no host key for {task_id}"}, 404)
            return reply({"task_id": task_id, "host_key": self.host_keys[task_id]})

        @app.delete("/api/vps/<task_id>/snapshots/<timestamp>")
        async def delete_snapshot(task_id: str, timestamp: str) -> Response:
            if (denied := check()) is not None:
                return denied
            self.vps_calls.append(("delete_snapshot", f"{task_id}:{timestamp}"))
            kept = [s for s in self.snapshots.get(task_id, []) if not s["tag"].endswith(f":{timestamp}")]
            if len(kept) == len(self.snapshots.get(task_id, [])):
                return reply({"error": "not_found", "message": f"no snapshot {timestamp}"}, 404)
            self.snapshots[task_id] = kept
            return reply({"deleted": True})

        return app


@pytest.fixture
async def host(tmp_path, monkeypatch):
    async with quick_host(tmp_path, monkeypatch) as h:
        yield h


@pytest.fixture
async def runner(host):
    async with fake_runner(host.cluster_token, VpsRunner) as r:
        yield r


async def create(host, token: str | None = "admin", **spec: Any) -> str:
    r = await host.call("POST", "/api/vps/create", token, json=spec)
    assert r.status_code == 202, r.text
    body = r.json()
    assert set(body) == {"task_id", "message"}, body
    return body["task_id"]


def assert_error(r, status: int, field: str | None = "any") -> dict:
    assert r.status_code == status, f"{r.status_code} {r.text}"
    body = r.json()
    assert set(body) == {"error", "message", "field"}, body
    if field != "any":
        assert body["field"] == field, body
    return body


async def running_vps(host, runner, token: str | None = "admin", port: int = 2222, **spec: Any) -> str:
    before = len(runner.executed)
    vps_id = await create(host, token, target="n1", ssh_key_mode="none", **spec)
    await executed(runner, before + 1)
    assert await host.update(vps_id, "running", ssh_port=port) == {"accepted": True}
    return vps_id


# -- create and dispatch -----------------------------------------------------------------------------------


async def test_create_dispatches_the_key_and_resources_and_records_the_ssh_port(host, runner):
    await host.register("n1", runner.url, cores=4, memory=8 * GiB)
    alice = await host.create_user("alice")
    key = public_key()
    vps_id = await create(
        host,
        alice,
        name="dev box",
        required_cores=2,
        required_memory_bytes=2 * GiB,
        registry_image="kohakuriver/sshd:latest",
        ssh_key_mode="upload",
        ssh_public_key=key,
    )
    (sent,) = await executed(runner)
    assert runner.bad_auth == 0
    assert sent["task_id"] == vps_id and sent["task_type"] == "vps" and sent["command"] == ""
    assert sent["ssh_key_mode"] == "upload" and sent["ssh_public_key"] == key
    assert sent["required_cores"] == 2 and sent["required_memory_bytes"] == 2 * GiB
    assert sent["registry_image"] == "kohakuriver/sshd:latest" and sent["container_name"] is None
    record = await host.wait_status(vps_id, "assigning")
    assert record["assigned_node"] == "n1" and record["task_type"] == "vps"
    assert record["vps_backend"] == "docker" and record["ssh_key_mode"] == "upload"
    assert "ssh_public_key" not in record and record["ssh_port"] is None

    assert await host.update(vps_id, "running", ssh_port=2222) == {"accepted": True}
    listed = await host.ok("GET", "/api/vps", alice)
    assert [v["task_id"] for v in listed["vps"]] == [vps_id] and listed["has_more"] is False
    (vps,) = listed["vps"]
    assert vps["status"] == "running" and vps["ssh_port"] == 2222 and vps["assigned_node"] == "n1"
    assert vps["name"] == "dev box" and "ssh_public_key" not in vps
    assert (await host.ok("GET", f"/api/vps/{vps_id}", alice))["ssh_port"] == 2222
    assert (await host.ok("GET", f"/api/status/{vps_id}", alice))["status"] == "running"
    node = await host.ok("GET", "/api/nodes/n1")
    assert node["cores_in_use"] == 2 and node["memory_reserved_bytes"] == 2 * GiB


async def test_generate_mode_carries_the_clients_public_key(host, runner):
    await host.register("n1", runner.url)
    key = public_key("kohakuriver-generated")
    vps_id = await create(host, target="n1", ssh_key_mode="generate", ssh_public_key=key)
    (sent,) = await executed(runner)
    assert sent["ssh_key_mode"] == "generate" and sent["ssh_public_key"] == key
    assert (await host.task(vps_id))["ssh_key_mode"] == "generate"
    # The host never makes a pair: generate without the public half is refused.
    r = await host.call("POST", "/api/vps/create", json={"ssh_key_mode": "generate"})
    assert_error(r, 422, "ssh_public_key")


async def test_disabled_and_none_modes_send_no_key(host, runner):
    await host.register("n1", runner.url)
    off = await create(host)  # the model's default: no sshd at all
    none = await create(host, ssh_key_mode="none", container_name="base")
    sent = {e["task_id"]: e for e in await executed(runner, 2)}
    assert sent[off]["ssh_key_mode"] == "disabled" and sent[off]["ssh_public_key"] is None
    assert sent[none]["ssh_key_mode"] == "none" and sent[none]["ssh_public_key"] is None
    assert sent[none]["container_name"] == "base"


async def test_a_vps_that_does_not_fit_waits_in_the_queue(host, runner):
    await host.register("n1", runner.url, cores=2)
    first = await running_vps(host, runner, required_cores=2)
    second = await create(host, required_cores=2)
    await trio.sleep(0.5)
    record = await host.task(second)
    assert record["status"] == "pending" and record["assigned_node"] is None
    assert "cores" in record["status_message"]
    assert runner.executed_ids() == [first]
    # Stopping the first frees its cores: the runner is asked to stop it, and the queued one starts.
    stopped = await host.ok("POST", f"/api/vps/{first}/stop")
    assert stopped["status"] == "stopped" and runner.vps_calls == [("stop", first)]
    record = await host.task(first)
    assert record["status"] == "stopped" and record["ssh_port"] == 2222  # recorded, no longer reachable
    await executed(runner, 2)
    assert runner.executed_ids()[1] == second
    # A VPS stopped while still queued is just marked stopped (nothing on any node to tell).
    third = await create(host, required_cores=2)
    await trio.sleep(0.3)
    r = await host.ok("POST", f"/api/vps/{third}/stop")
    assert r["status"] == "stopped" and len(runner.vps_calls) == 1
    assert_error(await host.call("POST", f"/api/vps/{third}/stop"), 409)


async def test_stop_while_the_runner_prepares_it_cancels_the_preparation(host, runner):
    await host.register("n1", runner.url)
    vps_id = await create(host, target="n1", ssh_key_mode="none")
    await executed(runner)
    await host.wait_status(vps_id, "assigning")
    answer = await host.ok("POST", f"/api/vps/{vps_id}/stop")
    assert answer["status"] == "stopped"
    # Nothing to snapshot yet: the runner is told to drop it (the kill path cancels a preparation).
    assert runner.controls == [("kill", vps_id)] and runner.vps_calls == []
    assert (await host.ok("GET", "/api/nodes/n1"))["cores_in_use"] == 0


async def test_stop_in_the_background_waits_for_the_runners_report(host, runner):
    await host.register("n1", runner.url)
    vps_id = await running_vps(host, runner)
    runner.stop_code = 202
    answer = await host.ok("POST", f"/api/vps/{vps_id}/stop")
    # The runner still snapshots it: "stopped" now would put it in the heartbeat's kill list.
    assert answer["status"] == "running" and "stopping" in answer["message"]
    assert "stopping" in (await host.task(vps_id))["status_message"]
    assert (await host.heartbeat("n1", running=[vps_id])).json() == {"kill": []}
    assert await host.update(vps_id, "stopped", exit_code=0) == {"accepted": True}
    record = await host.task(vps_id)
    assert record["status"] == "stopped" and record["completed_at"] and record["ssh_port"] == 2222


# -- restart -----------------------------------------------------------------------------------------------


async def test_restart_of_a_stopped_vps_recreates_it_on_its_node_with_the_same_key(host, runner):
    await host.register("n1", runner.url)
    key = public_key()
    vps_id = await create(host, ssh_key_mode="upload", ssh_public_key=key)  # no target: any node
    await executed(runner)
    await host.update(vps_id, "running", ssh_port=2223)
    await host.ok("POST", f"/api/vps/{vps_id}/stop")
    assert (await host.task(vps_id))["status"] == "stopped"
    # A bigger node joins: an unpinned task would go there, but the VPS's snapshots are on n1.
    await host.register("n2", runner.url, cores=64)

    answer = await host.ok("POST", f"/api/vps/{vps_id}/restart")
    assert answer["status"] in ("pending", "assigning") and "n1" in answer["message"]
    (_, again) = await executed(runner, 2)
    assert again["task_id"] == vps_id and again["task_type"] == "vps"
    assert again["ssh_key_mode"] == "upload" and again["ssh_public_key"] == key  # never changed
    record = await host.wait_status(vps_id, "assigning")
    assert record["assigned_node"] == "n1" and record["ssh_key_mode"] == "upload"
    assert record["completed_at"] is None and record["exit_code"] is None and record["ssh_port"] is None
    await host.update(vps_id, "running", ssh_port=2224)
    assert (await host.task(vps_id))["ssh_port"] == 2224

    # Running: a container restart on the runner, state kept; the status stays running.
    answer = await host.ok("POST", f"/api/vps/{vps_id}/restart")
    assert answer["status"] == "running" and runner.vps_calls[-1] == ("restart", vps_id)
    assert len(runner.executed) == 2


async def test_restart_and_stop_refusals(host, runner):
    await host.register("n1", runner.url)
    await host.register("nodocker", runner.url, docker=False)
    queued = await create(host, target="nodocker")  # a node without Docker gets nothing: it stays queued
    r = await host.call("POST", f"/api/vps/{queued}/restart")
    assert_error(r, 409)
    vps_id = await running_vps(host, runner)
    runner.refuse = 409
    assert_error(await host.call("POST", f"/api/vps/{vps_id}/restart"), 409)
    assert_error(await host.call("POST", f"/api/vps/{vps_id}/stop"), 409)
    assert (await host.task(vps_id))["status"] == "running"
    runner.refuse = None
    assert (await host.ok("POST", f"/api/vps/{vps_id}/restart"))["status"] == "running"


async def test_unreachable_node_answers_503(host, runner):
    await host.register("n1", runner.url)
    vps_id = await running_vps(host, runner)
    # The node's runner moves away (re-registers at an address where nothing listens).
    await host.register("n1", closed_port_url())
    for action in ("stop", "restart", "pause", "snapshots"):
        r = await host.call("POST", f"/api/vps/{vps_id}/{action}")
        assert_error(r, 503)
    assert_error(await host.call("GET", f"/api/vps/{vps_id}/snapshots"), 503)
    assert (await host.task(vps_id))["status"] == "running"


async def test_lost_vps_restart_waits_for_its_node_and_returns_when_it_comes_back(tmp_path, monkeypatch):
    monkeypatch.setenv("KOHAKURIVER_HOME", str(tmp_path))
    monkeypatch.setattr(scheduling_loop, "TICK_SECONDS", 0.2)
    config = host_config(
        tmp_path, HEARTBEAT_INTERVAL_SECONDS=1, HEARTBEAT_TIMEOUT_FACTOR=2, CLEANUP_CHECK_INTERVAL_SECONDS=1
    )
    async with running_host(tmp_path, config) as host, fake_runner(host.cluster_token, VpsRunner) as runner:
        await host.register("n1", runner.url)
        vps_id = await running_vps(host, runner)
        await host.wait_status(vps_id, "lost", timeout=8)
        assert_error(await host.call("POST", f"/api/vps/{vps_id}/restart"), 503)  # its node is offline
        # The node comes back with the VPS alive: running again, nothing re-created.
        r = await host.heartbeat("n1", running=[vps_id])
        assert r.json() == {"kill": []}
        assert (await host.task(vps_id))["status"] == "running"
        assert len(runner.executed) == 1


# -- pause, resume, kill -----------------------------------------------------------------------------------


async def test_pause_resume_and_kill_a_vps(host, runner):
    await host.register("n1", runner.url)
    vps_id = await running_vps(host, runner)
    assert (await host.ok("POST", f"/api/vps/{vps_id}/pause"))["status"] == "paused"
    assert runner.controls[-1] == ("pause", vps_id)
    assert (await host.ok("POST", f"/api/vps/{vps_id}/resume"))["status"] == "running"
    assert runner.controls[-1] == ("resume", vps_id)
    assert_error(await host.call("POST", f"/api/vps/{vps_id}/resume"), 409)
    assert (await host.ok("POST", f"/api/kill/{vps_id}"))["status"] == "killed"
    assert runner.controls[-1] == ("kill", vps_id)
    # A command task is not a VPS.
    (task_id,) = await host.submit(command="sleep", targets=["n1"])
    for path in (f"/api/vps/{task_id}/stop", f"/api/vps/{task_id}/pause"):
        assert_error(await host.call("POST", path), 404)
    assert_error(await host.call("GET", f"/api/vps/{task_id}"), 404)


# -- snapshots ---------------------------------------------------------------------------------------------


async def test_snapshots_are_proxied_to_the_node(host, runner):
    await host.register("n1", runner.url)
    alice = await host.create_user("alice")
    vps_id = await running_vps(host, runner, alice)
    assert (await host.ok("GET", f"/api/vps/{vps_id}/snapshots", alice)) == {
        "task_id": vps_id,
        "snapshots": [],
    }
    r = await host.call("POST", f"/api/vps/{vps_id}/snapshots", alice)
    assert r.status_code == 201, r.text
    first = r.json()
    assert first == {
        "tag": f"kohakuriver-snapshot/vps-{vps_id}:1700000000",
        "timestamp": 1700000000,
        "created_at": "2025-04-10T08:30:00Z",
        "size_bytes": 4096,
    }
    second = await host.ok("POST", f"/api/vps/{vps_id}/snapshots", alice)
    listed = await host.ok("GET", f"/api/vps/{vps_id}/snapshots", alice)
    assert [s["tag"] for s in listed["snapshots"]] == [second["tag"], first["tag"]]  # newest first
    deleted = await host.ok("DELETE", f"/api/vps/{vps_id}/snapshots/1700000000", alice)
    assert deleted["deleted"] is True
    assert runner.vps_calls[-1] == ("delete_snapshot", f"{vps_id}:1700000000")
    assert_error(await host.call("DELETE", f"/api/vps/{vps_id}/snapshots/1700000000", alice), 404)
    assert_error(await host.call("DELETE", f"/api/vps/{vps_id}/snapshots/latest", alice), 404)
    assert runner.bad_auth == 0
    # A stopped VPS keeps its snapshots (listable), but a new one needs a running container.
    await host.ok("POST", f"/api/vps/{vps_id}/stop", alice)
    assert len((await host.ok("GET", f"/api/vps/{vps_id}/snapshots", alice))["snapshots"]) == 1
    assert_error(await host.call("POST", f"/api/vps/{vps_id}/snapshots", alice), 409)


# -- who may do what ---------------------------------------------------------------------------------------


async def test_the_host_key_is_proxied_for_pinning(host, runner):
    await host.register("n1", runner.url)
    alice = await host.create_user("alice")
    vps_id = await running_vps(host, runner, alice)
    assert_error(await host.call("GET", f"/api/vps/{vps_id}/host-key", alice), 409)  # the runner has none yet
    key = public_key("").strip()
    runner.host_keys[vps_id] = key
    assert await host.ok("GET", f"/api/vps/{vps_id}/host-key", alice) == {"task_id": vps_id, "host_key": key}
    # Users pin what the host passes on: anything but one Ed25519 key from the runner is not passed on.
    runner.host_keys[vps_id] = key + "\nssh-ed25519 " + "A" * 68 + " injected"
    assert_error(await host.call("GET", f"/api/vps/{vps_id}/host-key", alice), 503)


async def test_users_see_and_control_only_their_own_vps(host, runner):
    await host.register("n1", runner.url)
    alice = await host.create_user("alice")
    bob = await host.create_user("bob")
    viewer = await host.create_user("vic", "viewer")
    operator = await host.create_user("olga", "operator")
    vps_id = await running_vps(host, runner, alice)
    bobs = await running_vps(host, runner, bob, port=2223)
    for method, path in (
        ("GET", f"/api/vps/{vps_id}"),
        ("GET", f"/api/vps/{vps_id}/snapshots"),
        ("GET", f"/api/vps/{vps_id}/host-key"),
        ("POST", f"/api/vps/{vps_id}/snapshots"),
        ("DELETE", f"/api/vps/{vps_id}/snapshots/1"),
        ("POST", f"/api/vps/{vps_id}/stop"),
        ("POST", f"/api/vps/{vps_id}/restart"),
        ("POST", f"/api/vps/{vps_id}/pause"),
        ("POST", f"/api/kill/{vps_id}"),
    ):
        assert_error(await host.call(method, path, bob), 404)
        assert_error(await host.call(method, path, viewer), 404)
    assert [v["task_id"] for v in (await host.ok("GET", "/api/vps", bob))["vps"]] == [bobs]
    assert [v["task_id"] for v in (await host.ok("GET", "/api/vps?all=1", bob))["vps"]] == [bobs]
    assert (await host.ok("GET", "/api/vps", operator))["vps"] == []  # own by default
    everyone = await host.ok("GET", "/api/vps?all=1&status=running", operator)
    assert sorted(v["task_id"] for v in everyone["vps"]) == sorted([vps_id, bobs])
    assert_error(await host.call("GET", "/api/vps?status=bogus", operator), 400, "status")
    assert_error(await host.call("POST", "/api/vps/create", viewer, json={}), 403)
    assert (await host.ok("POST", f"/api/vps/{vps_id}/restart", operator))["status"] == "running"
    assert runner.vps_calls == [("restart", vps_id)] and (await host.task(vps_id))["status"] == "running"


async def test_create_refusals(host, runner):
    await host.register("n1", runner.url, cores=4)
    alice = await host.create_user("alice")
    # No node here can run VMs: a VM VPS is refused at once, naming the backend (every VM refusal is in
    # test_host_vm.py).
    r = await host.call(
        "POST", "/api/vps/create", alice, json={"vps_backend": "qemu", "vm_image": "debian-12"}
    )
    body = assert_error(r, 422, "vps_backend")
    assert "no node can run VMs" in body["message"]
    cases = [
        ({"required_cores": -1}, "required_cores"),
        ({"ssh_key_mode": "upload"}, "ssh_public_key"),
        ({"ssh_key_mode": "upload", "ssh_public_key": "ssh-ed25519 AAAA"}, "ssh_public_key"),
        ({"ssh_key_mode": "sometimes"}, "ssh_key_mode"),
        ({"ssh_key_mode": "none", "ssh_public_key": public_key()}, "ssh_public_key"),
        ({"target": "n1:x"}, "target"),
        ({"registry_image": "a", "container_name": "b"}, "registry_image"),
        ({"command": "sh"}, "command"),
        ({"vm_image": "ubuntu"}, "vm_image"),
    ]
    for spec, field in cases:
        assert_error(await host.call("POST", "/api/vps/create", alice, json=spec), 422, field)
    assert_error(await host.call("POST", "/api/vps/create", alice, json=["x"]), 422, "body")
    assert_error(await host.call("POST", "/api/vps/create", alice, content=b"{"), 400, "body")
    # What no node could ever run is refused with the reason; privileges need an operator.
    assert_error(
        await host.call("POST", "/api/vps/create", alice, json={"target": "n1", "required_cores": 64}),
        400,
        "target",
    )
    assert_error(
        await host.call("POST", "/api/vps/create", alice, json={"privileged": True}), 403, "privileged"
    )
    r = await host.call("POST", "/api/vps/create", alice, json={"additional_mounts": ["/data:/data"]})
    assert_error(r, 403, "additional_mounts")
    assert (await host.ok("GET", "/api/vps", alice))["vps"] == []
