"""The host's overlay against a real ``serve_host`` whose links live in a network namespace the test makes
(its underlay bridge holds HOST_REACHABLE_ADDRESS 192.0.2.1), with stand-ins for runners (``FakeRunner``):
the settings check at registration, runner ids in the store (stable across re-registration, host restart
and address changes; lowest free; released by ``DELETE /api/nodes``), the links they give, mesh peers in
the answers, reservations end to end (reserve, use at submit and VPS create, the dispatch's
``overlay_ip``, release when the task ends, every refusal naming its field), and what ``GET /api/overlay``
shows to whom."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from kohakuriver_host import scheduling_loop, tasks_service
from kohakuriver_host.daemon import serve_host
from kohakuriver_host.overlay_links import HOST_LINK, OverlayLinks
from tests.integration._host_harness import GiB, Host, executed, fake_runner, host_config, wait_for
from tests.integration.test_vm_network import link, namespaces, ns_ip, run
from tests.need import need_program, need_root

HOST_UL = "192.0.2.1"
SUBNET = "10.128.0.0/12/6/14"


def overlay_view(**changes: Any) -> dict[str, Any]:
    view = {
        "enabled": True,
        "subnet": SUBNET,
        "vxlan_id": 100,
        "vxlan_port": 4789,
        "mtu": 1450,
        "mode": "hub",
    }
    return {**view, **changes}


@pytest.fixture
def host_ns() -> Iterator[str]:
    need_root("the host overlay test (network namespaces, VXLAN, iptables)")
    for program in ("ip", "iptables", "sysctl"):
        need_program(program)
    name = f"krtest-{secrets.token_hex(4)}"
    with namespaces(name):
        ns_ip(name, "link", "add", "ul0", "type", "bridge")
        ns_ip(name, "addr", "add", f"{HOST_UL}/24", "dev", "ul0")
        ns_ip(name, "link", "set", "ul0", "up")
        yield name


@asynccontextmanager
async def overlay_host(home: Path, ns: str, monkeypatch: Any, **overrides: Any) -> AsyncIterator[Host]:
    """``serve_host`` with the overlay on and its links in ``ns``; quick scheduling and dispatch retries."""
    monkeypatch.setenv("KOHAKURIVER_HOME", str(home))
    monkeypatch.setattr(tasks_service, "DISPATCH_BACKOFF_SECONDS", (0.1, 0.1))
    monkeypatch.setattr(scheduling_loop, "TICK_SECONDS", 0.2)
    settings = {"OVERLAY_ENABLED": True, "OVERLAY_SUBNET": SUBNET, "HOST_REACHABLE_ADDRESS": HOST_UL}
    config = host_config(home, **{**settings, **overrides})
    links = OverlayLinks(
        config.overlay_subnet, vxlan_id=config.OVERLAY_VXLAN_ID, port=config.OVERLAY_VXLAN_PORT,
        mtu=config.OVERLAY_MTU, local=HOST_UL, netns=ns,
    )  # fmt: skip
    async with trio.open_nursery() as nursery:
        handle = await nursery.start(partial(serve_host, config, port=0, overlay_links=links))
        creds = json.loads(config.credentials_file.read_text())
        async with httpx.AsyncClient(base_url=handle.url, timeout=15) as http:
            yield Host(handle, config, home, http, creds["token"])
        nursery.cancel_scope.cancel()


async def register(
    host: Host, hostname: str, url: str, underlay: str | None, overlay: dict[str, Any] | None = None, **extra
) -> httpx.Response:
    body: dict[str, Any] = {
        "hostname": hostname,
        "url": url,
        "total_cores": 8,
        "memory_total_bytes": 16 * GiB,
        "overlay": overlay_view() if overlay is None else overlay,
        **extra,
    }
    if underlay is not None:
        body["underlay_address"] = underlay
    return await host.call("POST", "/api/register", host.cluster_token, json=body)


async def joined(host: Host, hostname: str, url: str, underlay: str, **view: Any) -> dict[str, Any]:
    r = await register(host, hostname, url, underlay, overlay_view(**view) if view else None)
    assert r.status_code == 200, r.text
    body = r.json()
    assert "overlay_error" not in body, body
    return body["overlay"]


def remote(ns: str, name: str) -> str:
    return link(ns, name)["linkinfo"]["info_data"]["remote"]


def error(r: httpx.Response, status: int, field: str | None = "any") -> str:
    assert r.status_code == status, r.text
    body = r.json()
    if field != "any":
        assert body["field"] == field, body
    return body["message"]


# -- registration ------------------------------------------------------------------------------------------


async def test_mismatched_settings_are_refused_with_every_reason(tmp_path, host_ns, monkeypatch):
    async with overlay_host(tmp_path, host_ns, monkeypatch) as host:
        r = await register(
            host, "r1", "http://192.0.2.11:8001", None, overlay_view(mtu=1400, vxlan_port=4790)
        )
        message = error(r, 409, "overlay")
        assert "OVERLAY_MTU: host 1450, runner 1400" in message
        assert "OVERLAY_VXLAN_PORT: host 4789, runner 4790" in message
        r = await register(host, "r1", "http://192.0.2.11:8001", None, overlay_view(enabled=False))
        assert "OVERLAY_ENABLED: host True, runner False" in error(r, 409, "overlay")
        body = {"hostname": "r1", "url": "http://192.0.2.11:8001", "total_cores": 8, "memory_total_bytes": 1}
        r = await host.call("POST", "/api/register", host.cluster_token, json=body)  # an older runner
        assert "OVERLAY_ENABLED" in error(r, 409, "overlay")
        r = await register(host, "r1", "http://192.0.2.11:8001", None, overlay_view(mode="mesh"))
        assert "OVERLAY_MODE: host hub, runner mesh" in error(r, 409, "overlay")
        # Nothing was stored.
        assert (await host.call("GET", "/api/nodes/r1")).status_code == 404
        assert run("ip", "-n", host_ns, "link", "show", "vxkr1", check=False).returncode != 0


async def test_a_host_without_the_overlay_refuses_a_runner_with_it(tmp_path, monkeypatch):
    from tests.integration._host_harness import running_host

    monkeypatch.setenv("KOHAKURIVER_HOME", str(tmp_path))
    async with running_host(tmp_path) as host:
        r = await register(host, "r1", "http://127.0.0.1:9", None)
        assert "OVERLAY_ENABLED: host False, runner True" in error(r, 409, "overlay")
        r = await register(host, "r1", "http://127.0.0.1:9", None, overlay_view(enabled=False, mtu=1400))
        assert r.status_code == 200 and r.json() == {"message": "node r1 registered"}
        assert await host.ok("GET", "/api/overlay") == {
            "enabled": False, "mode": None, "subnet": None, "host_overlay_address": None,
            "runners": [], "reservations": [],
        }  # fmt: skip
        r = await host.call("POST", "/api/overlay/reserve", json={"node": "r1"})
        assert "OVERLAY_ENABLED" in error(r, 409)


async def test_ids_links_and_assignments_survive_address_changes_and_restarts(tmp_path, host_ns, monkeypatch):
    async with overlay_host(tmp_path, host_ns, monkeypatch) as host:
        first = await joined(host, "r1", "http://192.0.2.11:8001", "192.0.2.11")
        assert first == {
            "runner_id": 1, "subnet": "10.128.64.0/18", "gateway": "10.128.64.1",
            "host_address": "10.128.64.254", "host_overlay_address": "10.128.0.1/12", "vni": 101,
            "vxlan_port": 4789, "mtu": 1450, "host_underlay_address": HOST_UL, "mode": "hub", "peers": [],
        }  # fmt: skip
        second = await joined(host, "r2", "http://192.0.2.12:8001", "192.0.2.12")
        assert (second["runner_id"], second["subnet"], second["vni"]) == (2, "10.128.128.0/18", 102)
        assert remote(host_ns, "vxkr1") == "192.0.2.11" and remote(host_ns, "vxkr2") == "192.0.2.12"
        assert link(host_ns, HOST_LINK)
        # The underlay address from the URL when the runner names none.
        r = await register(host, "r3", "http://192.0.2.13:8001", None)
        assert r.json()["overlay"]["runner_id"] == 3 and remote(host_ns, "vxkr3") == "192.0.2.13"
        # A runner that moved keeps its id; its link follows it.
        again = await joined(host, "r1", "http://192.0.2.21:8001", "192.0.2.21")
        assert again["runner_id"] == 1 and remote(host_ns, "vxkr1") == "192.0.2.21"
        view = await host.ok("GET", "/api/overlay")
        assert view["enabled"] is True and view["mode"] == "hub" and view["subnet"] == SUBNET
        assert view["host_overlay_address"] == "10.128.0.1/12"
        runners = {r["hostname"]: r for r in view["runners"]}
        assert runners["r1"] == {
            "runner_id": 1, "hostname": "r1", "subnet": "10.128.64.0/18", "link": "vxkr1",
            "underlay_address": "192.0.2.21", "active": True, "last_seen": runners["r1"]["last_seen"],
        }  # fmt: skip
        assert runners["r1"]["last_seen"].endswith("Z")
        indexes = {name: link(host_ns, name)["ifindex"] for name in ("vxkr1", "vxkr2", "vxkr3")}

    # A host restart: the same ids, the links untouched (not made again), a new runner gets the next id.
    async with overlay_host(tmp_path, host_ns, monkeypatch) as host:
        assert {name: link(host_ns, name)["ifindex"] for name in indexes} == indexes
        assert (await joined(host, "r2", "http://192.0.2.12:8001", "192.0.2.12"))["runner_id"] == 2
        assert (await joined(host, "r4", "http://192.0.2.14:8001", "192.0.2.14"))["runner_id"] == 4
        assert {name: link(host_ns, name)["ifindex"] for name in indexes} == indexes


async def test_addresses_that_cannot_work_are_said_not_silently_used(tmp_path, host_ns, monkeypatch):
    async with overlay_host(tmp_path, host_ns, monkeypatch) as host:
        r = await register(host, "r1", "http://127.0.0.1:8001", None)
        assert r.status_code == 200
        body = r.json()
        assert "overlay" not in body and "loopback 127.0.0.1" in body["overlay_error"]
        r = await register(host, "r2", "http://no-such-name.invalid:8001", None)
        assert "does not resolve" in r.json()["overlay_error"]
        assert (await host.ok("GET", "/api/overlay"))["runners"] == []
        assert run("ip", "-n", host_ns, "link", "show", "vxkr1", check=False).returncode != 0


async def test_the_last_id_is_refused_then_freed_by_removing_a_node(tmp_path, host_ns, monkeypatch):
    small = "10.128.0.0/12/1/19"  # NODE_BITS 1: one runner
    async with overlay_host(
        tmp_path, host_ns, monkeypatch, OVERLAY_SUBNET=small, HEARTBEAT_INTERVAL_SECONDS=1,
        HEARTBEAT_TIMEOUT_FACTOR=1, CLEANUP_CHECK_INTERVAL_SECONDS=1,
    ) as host:  # fmt: skip
        assert (await joined(host, "r1", "http://192.0.2.11:8001", "192.0.2.11", subnet=small))[
            "runner_id"
        ] == 1
        r = await register(host, "r2", "http://192.0.2.12:8001", "192.0.2.12", overlay_view(subnet=small))
        assert r.status_code == 200 and "every overlay runner id is taken" in r.json()["overlay_error"]
        assert "kr node remove" in r.json()["overlay_error"]

        user = await host.create_user("alice", "user")
        assert (await host.call("DELETE", "/api/nodes/r1", user)).status_code == 403
        assert "is online" in error(await host.call("DELETE", "/api/nodes/r1"), 409)

        async def offline():
            return (await host.ok("GET", "/api/nodes/r1"))["status"] == "offline"

        await wait_for(offline, 15, what="r1 to go offline")
        removed = await host.ok("DELETE", "/api/nodes/r1")
        assert "overlay runner id 1 released" in removed["message"]
        assert (await host.call("GET", "/api/nodes/r1")).status_code == 404
        assert (await host.call("DELETE", "/api/nodes/r1")).status_code == 404
        got = await joined(host, "r2", "http://192.0.2.12:8001", "192.0.2.12", subnet=small)
        assert got["runner_id"] == 1 and remote(host_ns, "vxkr1") == "192.0.2.12"


async def test_mesh_peers_in_assignments_and_heartbeats(tmp_path, host_ns, monkeypatch):
    async with overlay_host(tmp_path, host_ns, monkeypatch, OVERLAY_MODE="mesh") as host:
        first = await joined(host, "r1", "http://192.0.2.11:8001", "192.0.2.11", mode="mesh")
        assert first["mode"] == "mesh" and first["peers"] == []
        second = await joined(host, "r2", "http://192.0.2.12:8001", "192.0.2.12", mode="mesh")
        assert second["peers"] == [{"runner_id": 1, "hostname": "r1", "underlay_address": "192.0.2.11"}]

        async def beat(hostname: str) -> dict[str, Any]:
            r = await host.heartbeat(hostname)
            assert r.status_code == 200, r.text
            return r.json()

        # r1 learned of r2 after it registered: its next heartbeat says so, the one after has nothing new.
        assert (await beat("r1"))["overlay_peers"] == [
            {"runner_id": 2, "hostname": "r2", "underlay_address": "192.0.2.12"}
        ]
        assert await beat("r1") == {"kill": []}
        assert await beat("r2") == {"kill": []}  # its registration answer had the list
        await joined(host, "r2", "http://192.0.2.22:8001", "192.0.2.22", mode="mesh")
        assert (await beat("r1"))["overlay_peers"][0]["underlay_address"] == "192.0.2.22"
        # A body the fast path does not take (the Quart endpoint answers) says the same.
        r = await host.call("PUT", "/api/heartbeat/r1", host.cluster_token, json={"running_tasks": []})
        assert r.status_code == 200 and r.json() == {"kill": []}


# -- reservations ------------------------------------------------------------------------------------------


async def test_reservations_from_reserve_to_release(tmp_path, host_ns, monkeypatch):
    async with (
        overlay_host(tmp_path, host_ns, monkeypatch) as host,
        fake_runner(host.cluster_token) as runner,
    ):
        await joined(host, "r1", runner.url, "192.0.2.11")
        await joined(host, "r2", runner.url, "192.0.2.12")
        alice = await host.create_user("alice", "user")
        bob = await host.create_user("bob", "user")
        viewer = await host.create_user("vic", "viewer")
        operator = await host.create_user("olga", "operator")

        assert (
            await host.call("POST", "/api/overlay/reserve", viewer, json={"node": "r1"})
        ).status_code == 403
        reserved = await host.call(
            "POST", "/api/overlay/reserve", alice, json={"node": "r1", "ttl_seconds": 120}
        )
        assert reserved.status_code == 201, reserved.text
        alice_res = reserved.json()
        assert (
            alice_res["ip"] == "10.128.127.254" and alice_res["node"] == "r1" and alice_res["used_by"] is None
        )
        token = alice_res["token"]
        second = await host.ok("POST", "/api/overlay/reserve", bob, json={"node": "r1"})
        assert second["ip"] == "10.128.127.253"

        # Refusals, each naming its field.
        for ip, status in (
            ("10.128.64.254", 400),
            ("10.128.64.1", 400),
            ("10.128.128.5", 400),
            (alice_res["ip"], 409),
        ):
            r = await host.call("POST", "/api/overlay/reserve", bob, json={"node": "r1", "ip": ip})
            error(r, status, "ip" if status == 400 else None)
        error(await host.call("POST", "/api/overlay/reserve", bob, json={"node": "nope"}), 404)
        error(
            await host.call("POST", "/api/overlay/reserve", bob, json={"node": "r1", "ttl_seconds": 5}),
            422,
            "ttl_seconds",
        )

        # Who sees which: users their own, operators all, viewers none.
        def ips(view: dict) -> list[str]:
            return sorted(r["ip"] for r in view["reservations"])

        assert ips(await host.ok("GET", "/api/overlay", alice)) == [alice_res["ip"]]
        assert ips(await host.ok("GET", "/api/overlay", operator)) == [second["ip"], alice_res["ip"]]
        assert ips(await host.ok("GET", "/api/overlay", viewer)) == []
        mine = (await host.ok("GET", "/api/overlay", alice))["reservations"][0]
        assert mine["token"] == token

        # Using it: another node's target, a forged token, then pinned to its node by itself.
        r = await host.call(
            "POST", "/api/submit", alice, json={"command": "true", "targets": ["r2"], "ip_token": token}
        )
        assert "reserves 10.128.127.254 on node r1" in error(r, 400, "ip_token")
        forged = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
        r = await host.call("POST", "/api/submit", alice, json={"command": "true", "ip_token": forged})
        assert "forged" in error(r, 422, "ip_token")
        (task_id,) = await host.submit(alice, command="true", ip_token=token)
        sent = (await executed(runner))[0]
        assert sent["task_id"] == task_id and sent["overlay_ip"] == "10.128.127.254"
        record = await host.task(task_id)
        assert record["target"] == "r1" and record["assigned_node"] == "r1"
        assert "reserved_ip" not in record  # the host's bookkeeping, not the record
        r = await host.call("POST", "/api/submit", alice, json={"command": "true", "ip_token": token})
        assert f"already used by task {task_id}" in error(r, 409, "ip_token")
        r = await host.call("DELETE", f"/api/overlay/reservations/{alice_res['ip']}", alice)
        assert f"in use by task {task_id}" in error(r, 409)
        listed = (await host.ok("GET", "/api/overlay", alice))["reservations"]
        assert listed[0]["used_by"] == task_id

        # The runner reports its address; a task ending releases its reservation.
        await host.update(task_id, "running", overlay_ip="10.128.127.254")
        assert (await host.task(task_id))["overlay_ip"] == "10.128.127.254"
        await host.update(task_id, "completed", exit_code=0)
        assert ips(await host.ok("GET", "/api/overlay", alice)) == []
        again = await host.ok(
            "POST", "/api/overlay/reserve", bob, json={"node": "r1", "ip": "10.128.127.254"}
        )
        assert again["ip"] == "10.128.127.254"

        # An address a running task got from Docker is never handed out.
        (other,) = await host.submit(bob, command="sleep", targets=["r1"])
        await executed(runner, 2)
        await host.update(other, "running", overlay_ip="10.128.64.7")
        r = await host.call("POST", "/api/overlay/reserve", alice, json={"node": "r1", "ip": "10.128.64.7"})
        assert f"in use by task {other}" in error(r, 409)

        # Release: by address only its owner or an operator, by token whoever holds it.
        r = await host.call("DELETE", f"/api/overlay/reservations/{second['ip']}", alice)
        error(r, 404)
        released = await host.ok("DELETE", f"/api/overlay/reservations/{second['token']}", alice)
        assert released["ip"] == second["ip"]
        error(await host.call("DELETE", f"/api/overlay/reservations/{second['token']}", alice), 404)
        await host.ok("DELETE", f"/api/overlay/reservations/{again['ip']}", operator)
        assert ips(await host.ok("GET", "/api/overlay", operator)) == []
        error(await host.call("DELETE", "/api/overlay/reservations/not-a-token", alice), 422, "ip_token")


async def test_a_vps_keeps_its_reserved_address_across_a_restart(tmp_path, host_ns, monkeypatch):
    from tests.integration.test_host_vps import VpsRunner

    async with (
        overlay_host(tmp_path, host_ns, monkeypatch) as host,
        fake_runner(host.cluster_token, VpsRunner) as runner,
    ):
        await joined(host, "r1", runner.url, "192.0.2.11")
        reservation = await host.ok("POST", "/api/overlay/reserve", json={"node": "r1", "ip": "10.128.64.9"})
        r = await host.call(
            "POST", "/api/vps/create", json={"ssh_key_mode": "none", "ip_token": reservation["token"]}
        )
        assert r.status_code == 202, r.text
        vps_id = r.json()["task_id"]
        assert (await executed(runner))[0]["overlay_ip"] == "10.128.64.9"
        await host.update(vps_id, "running", ssh_port=2222, overlay_ip="10.128.64.9")
        await host.ok("POST", f"/api/vps/{vps_id}/stop")
        assert (await host.task(vps_id))["status"] == "stopped"
        assert (await host.ok("GET", "/api/overlay"))["reservations"] == []  # released with the VPS

        await host.ok("POST", f"/api/vps/{vps_id}/restart")
        assert (await executed(runner, 2))[1]["overlay_ip"] == "10.128.64.9"  # taken again
        assert (await host.ok("GET", "/api/overlay"))["reservations"][0]["used_by"] == vps_id

        # Stopped again, someone else reserves the address: the next restart gets another.
        await host.update(vps_id, "running", ssh_port=2222)
        await host.ok("POST", f"/api/vps/{vps_id}/stop")
        await host.ok("POST", "/api/overlay/reserve", json={"node": "r1", "ip": "10.128.64.9"})
        answer = await host.ok("POST", f"/api/vps/{vps_id}/restart")
        assert "reserved overlay address 10.128.64.9 was taken meanwhile" in answer["message"]
        assert (await executed(runner, 3))[2]["overlay_ip"] is None
