"""The host as a process that starts, stops and restarts: nothing is lost across a restart, a dispatch in
flight at shutdown is retried, nodes that stop heartbeating go offline and their tasks are lost, and
cancelling ``serve_host`` leaves no thread or socket behind."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import socket
import ssl
import stat
import threading
from functools import partial

import httpx
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kohakuriver_host.daemon import serve_host

from ._host_harness import fake_runner, host_config, running_host, wait_for


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("KOHAKURIVER_HOME", str(tmp_path))
    return tmp_path


async def test_first_start_writes_private_credentials_and_cluster_token(home):
    async with running_host(home) as host:
        creds = json.loads((home / "credentials.json").read_text())
        assert creds == {"host": host.handle.url, "token": host.admin_token}
        assert host.handle.url.startswith("http://127.0.0.1:")
        assert stat.S_IMODE((home / "credentials.json").stat().st_mode) == 0o600
        token_file = host.config.cluster_token_file
        assert token_file.read_text().strip() == host.cluster_token
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        # The in-process harness serves with port=0: the proxy takes a free port, the handle says which.
        assert host.handle.ssh_proxy_port > 0


async def test_configured_cluster_token_is_used(home):
    token = "a-configured-cluster-token-0123"
    async with running_host(home, CLUSTER_TOKEN=token) as host:
        assert host.cluster_token == token
        await host.register("n1", "http://127.0.0.1:9")


async def test_restart_loses_nothing(home):
    config = host_config(home)
    async with running_host(home, config) as host:
        alice = await host.create_user("alice")
        await host.register("n1", "http://127.0.0.1:9", docker=False)
        waiting = await host.submit(alice, command="sleep", targets=["n1"])
        killed = await host.submit(alice, command="sleep")
        await host.ok("POST", f"/api/kill/{killed[0]}", alice)
        before = {t["task_id"]: t for t in (await host.ok("GET", "/api/tasks"))["tasks"]}
        first = (host.admin_token, host.cluster_token, (home / "credentials.json").read_text())
    assert not [t for t in threading.enumerate() if t.name == "kohakuriver-store-writer"]

    async with running_host(home, config) as host:
        assert (host.admin_token, host.cluster_token, (home / "credentials.json").read_text()) == first
        assert (await host.ok("GET", "/api/auth/me", alice))["username"] == "alice"
        after = {t["task_id"]: t for t in (await host.ok("GET", "/api/tasks"))["tasks"]}

        def settled(tasks: dict) -> dict:  # the scheduler may have refreshed a waiting task's reason
            return {k: {f: v for f, v in t.items() if f != "status_message"} for k, t in tasks.items()}

        assert settled(after) == settled(before)
        assert after[waiting[0]]["status"] == "pending" and after[killed[0]]["status"] == "killed"
        node = await host.ok("GET", "/api/nodes/n1")
        assert node["hostname"] == "n1"
        (new,) = await host.submit(alice, command="true", targets=["n1"])
        assert int(new) > max(int(t) for t in before)  # ids keep increasing across restarts


async def test_a_dispatch_in_flight_at_shutdown_is_retried(home):
    config = host_config(home)
    async with fake_runner("") as runner:
        async with running_host(home, config) as host:
            runner.cluster_token = host.cluster_token
            runner.mode = "hang"
            await host.register("n1", runner.url)
            (task_id,) = await host.submit(command="echo")
            await wait_for(lambda: len(runner.executed) == 1, what="the first dispatch")
            assert (await host.task(task_id))["status"] == "assigning"
        runner.mode = "accept"
        async with running_host(home, config) as host:
            await wait_for(lambda: len(runner.executed) == 2, what="the dispatch after the restart")
            record = await host.wait_status(task_id, "assigning")
            assert record["assigned_node"] == "n1"


async def test_silent_node_goes_offline_and_its_tasks_are_lost(home):
    config = host_config(
        home, HEARTBEAT_INTERVAL_SECONDS=1, HEARTBEAT_TIMEOUT_FACTOR=2, CLEANUP_CHECK_INTERVAL_SECONDS=1
    )
    async with running_host(home, config) as host, fake_runner(host.cluster_token) as runner:
        await host.register("n1", runner.url)
        await host.register("n2", runner.url)
        running, paused = await host.submit(command="sleep", targets=["n1", "n1"])
        (elsewhere,) = await host.submit(command="sleep", targets=["n2"])
        await wait_for(lambda: len(runner.executed) == 3, what="three dispatches")
        await host.heartbeat("n1", running=[running, paused])
        await host.heartbeat("n2", running=[elsewhere])
        await host.ok("POST", f"/api/command/{paused}/pause")

        async def keep_n2_alive():
            while True:
                await host.heartbeat("n2", running=[elsewhere])
                await trio.sleep(0.3)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_n2_alive)
            record = await host.wait_status(running, "lost", timeout=8)
            nursery.cancel_scope.cancel()
        assert "node n1 went offline" in record["error_message"] and record["completed_at"]
        assert (await host.task(paused))["status"] == "lost"  # paused tasks are not exempt
        assert (await host.task(elsewhere))["status"] == "running"
        nodes = {n["hostname"]: n for n in await host.ok("GET", "/api/nodes")}
        assert nodes["n1"]["status"] == "offline" and nodes["n2"]["status"] == "online"
        assert nodes["n1"]["cores_in_use"] == 0
        # The node comes back with the tasks still alive: command tasks stay lost and are killed there.
        r = await host.heartbeat("n1", running=[running, paused])
        assert sorted(r.json()["kill"]) == sorted([running, paused])
        assert (await host.ok("GET", "/api/nodes/n1"))["status"] == "online"
        assert (await host.task(running))["status"] == "lost"
        # A late exit report is kept as information; the status stays lost.
        assert await host.update(running, "completed", exit_code=0) == {"accepted": False}
        record = await host.task(running)
        assert record["status"] == "lost" and record["exit_code"] == 0
        assert "reported later: completed" in record["status_message"]


async def test_cancelling_serve_host_closes_everything(home):
    async with running_host(home) as host:
        port = int(host.handle.url.rsplit(":", 1)[1])
        await host.ok("GET", "/api/nodes")
    assert not [t for t in threading.enumerate() if t.name == "kohakuriver-store-writer"]
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", port))


def _self_signed(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kohakuriver test host")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "host.crt", tmp_path / "host.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_file, key_file


async def test_tls_when_a_certificate_is_configured(home):
    cert_file, key_file = _self_signed(home)
    config = host_config(home, TLS_CERT_FILE=str(cert_file), TLS_KEY_FILE=str(key_file))
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(partial(serve_host, config, port=0))
            assert handle.url.startswith("https://127.0.0.1:")
            creds = json.loads((home / "credentials.json").read_text())
            assert creds["host"] == handle.url
            async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(cert_file))) as http:
                r = await http.get(
                    f"{handle.url}/api/auth/me", headers={"Authorization": f"Bearer {creds['token']}"}
                )
                assert r.status_code == 200 and r.json()["role"] == "admin"
            plain = handle.url.replace("https://", "http://")
            async with httpx.AsyncClient() as http:
                with pytest.raises(httpx.HTTPError):
                    await http.get(f"{plain}/api/health")
            nursery.cancel_scope.cancel()
