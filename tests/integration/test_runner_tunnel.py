"""The runner's tunnel server against real Docker and the real Rust tunnel client.

A runner daemon runs in the test's nursery (``_runner_harness``), bound on all addresses so that containers
reach it through the network gateway. Tasks are busybox containers started through ``/api/execute``; the
runner injects the built ``tunnel-client`` in ``--exec`` mode. The test process plays the host on
``/ws/forward/...`` with trio-websocket and the protocol library's ``Forwarder``.
"""

from __future__ import annotations

import os
import secrets

import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from kohakuriver_proto import forwarder as fwd
from kohakuriver_proto.flow import SendFrame
from kohakuriver_proto.frames import Proto
from kohakuriver_runner.container_spec import (
    TUNNEL_CLIENT_TARGET,
    TUNNEL_ENV_CONTAINER_ID,
    TUNNEL_ENV_TOKEN,
    TUNNEL_ENV_URL,
    container_name,
)
from kohakuriver_runner.tunnel_secret import container_secret, load_or_create_key

from ._runner_harness import REPO_ROOT, TOKEN, new_task_id, req, runner_rig

pytestmark = [pytest.mark.docker, pytest.mark.slow]

CLIENT = REPO_ROOT / "tunnel-client-rs" / "target" / "release" / "tunnel-client"
ECHO_PORT = 7000
SERVICE = f"nc -ll -p {ECHO_PORT} -e cat & exec sleep 600"


@pytest.fixture
async def rig(nursery, tmp_path):
    if not os.access(CLIENT, os.X_OK):
        pytest.fail(f"build the tunnel client first: bash tunnel-client-rs/build.sh ({CLIENT} is missing)")
    async with runner_rig(nursery, tmp_path) as r:
        yield r


async def start_runner(rig, what="a", **overrides):
    # 0.0.0.0: containers reach the runner at the gateway of the task network.
    overrides.setdefault("RUNNER_BIND_IP", "0.0.0.0")
    overrides.setdefault("TUNNEL_CLIENT_PATH", str(CLIENT))
    return await rig.start(what, **overrides)


def ws_base(runner) -> str:
    port = runner.config.RUNNER_PORT
    return f"ws://127.0.0.1:{port}"


async def start_service(rig, runner) -> int:
    tid = new_task_id()
    resp = await runner.execute(req(tid, "sh", "-c", SERVICE))
    assert resp.status_code == 202, resp.text
    await rig.host.wait_status(tid, "running", timeout=30)
    await wait_listening(container_name(tid), ECHO_PORT)
    return tid


async def wait_listening(container: str, port: int) -> None:
    """Until a socket in ``container`` listens on ``port`` (IPv4 or IPv6): `running` means the process
    started, not that its server is up yet (the runner reports it as soon as the engine started it)."""
    listen = "0A"  # TCP_LISTEN in /proc/net/tcp's "st" column
    with trio.fail_after(15):
        while True:
            done = await trio.run_process(
                ["docker", "exec", container, "cat", "/proc/net/tcp", "/proc/net/tcp6"],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            rows = [line.split() for line in done.stdout.decode(errors="replace").splitlines()[1:]]
            if any(row[1].endswith(f":{port:04X}") and row[3] == listen for row in rows if len(row) > 3):
                return
            await trio.sleep(0.05)


def auth(token: str = TOKEN) -> list[tuple[bytes, bytes]]:
    return [(b"Authorization", f"Bearer {token}".encode())]


async def send_all(ws, events) -> None:
    for event in events:
        if isinstance(event, SendFrame):
            await ws.send_message(event.data)


async def echo(ws, payloads: list[bytes]) -> list[bytes]:
    """One connection per payload through the session ``ws`` (after CONNECTED); returns what came back.

    Sends within the flow-control credit, in 64 KiB messages, as the CLI does."""
    fw = fwd.Forwarder(Proto.TCP, ECHO_PORT)
    await send_all(ws, fw.start())
    want: dict[int, bytes] = {}
    got: dict[int, bytearray] = {}
    sent: dict[int, int] = {}
    for payload in payloads:
        cid, out = fw.open_connection()
        want[cid], got[cid] = payload, bytearray()
        await send_all(ws, out)

    async def pump(cid: int) -> None:
        while sent[cid] < len(want[cid]):
            credit = fw.send_credit(cid)
            size = min(65536, len(want[cid]) - sent[cid], 65536 if credit is None else credit)
            if size == 0:
                return  # wait for CreditAvailable
            await send_all(ws, fw.send_data(cid, want[cid][sent[cid] : sent[cid] + size]))
            sent[cid] += size

    with trio.fail_after(20):
        while any(len(got[c]) < len(want[c]) for c in want):
            message = await ws.get_message()
            assert isinstance(message, bytes), f"text after CONNECTED: {message!r}"
            for event in fw.receive_frame(message, trio.current_time()):
                if isinstance(event, SendFrame):
                    await ws.send_message(event.data)
                elif isinstance(event, fwd.ConnectionReady):
                    sent[event.client_id] = 0
                    await pump(event.client_id)
                elif isinstance(event, fwd.CreditAvailable):
                    await pump(event.client_id)
                elif isinstance(event, fwd.DataReceived):
                    got[event.client_id] += event.data
                    await send_all(ws, fw.delivered(event.client_id, len(event.data)))
                elif isinstance(event, fwd.ConnectionClosed):
                    raise AssertionError(f"connection {event.client_id} closed: {event.reason}")
    return [bytes(got[c]) for c in want]


async def forward_refusal(url: str, headers=None) -> tuple[str, int, str]:
    """Open a forward session that must be refused: (first text, close code, close reason)."""
    async with open_websocket_url(url, extra_headers=headers or auth()) as ws:
        with trio.fail_after(15):
            first = await ws.get_message()
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
    return first, closed.value.reason.code, closed.value.reason.reason


async def wait_forward_connected(url: str, timeout: float = 20):
    """Retry until the session says CONNECTED (the tunnel client reconnects with backoff)."""
    with trio.fail_after(timeout):
        while True:
            async with open_websocket_url(url, extra_headers=auth()) as ws:
                first = await ws.get_message()
                if first == "CONNECTED":
                    return await echo(ws, [b"after restart"])
            await trio.sleep(0.2)


# -- injection ---------------------------------------------------------------------------------------------


async def test_the_tunnel_client_is_injected_with_its_own_secret(rig):
    runner = await start_runner(rig)
    tid = await start_service(rig, runner)
    info = await rig.docker.inspect(container_name(tid))
    config = info.raw["Config"]
    assert config["Entrypoint"] == [TUNNEL_CLIENT_TARGET, "--exec", "--"]
    assert config["Cmd"] == ["sh", "-c", SERVICE]  # the user's argv, unchanged
    env = dict(item.split("=", 1) for item in config["Env"])
    key = load_or_create_key(runner.config.state_dir)
    assert env[TUNNEL_ENV_TOKEN] == container_secret(key, container_name(tid))
    assert env[TUNNEL_ENV_CONTAINER_ID] == container_name(tid)
    gateway, port = runner.config.DOCKER_NETWORK_GATEWAY, runner.config.RUNNER_PORT
    assert env[TUNNEL_ENV_URL] == f"ws://{gateway}:{port}"
    mounts = {m["Destination"]: m for m in info.raw["Mounts"]}
    assert mounts[TUNNEL_CLIENT_TARGET]["RW"] is False
    assert mounts[TUNNEL_CLIENT_TARGET]["Source"] == str(CLIENT)


# -- forwarding --------------------------------------------------------------------------------------------


async def test_echo_through_the_tunnel_with_concurrent_sessions(rig):
    runner = await start_runner(rig)
    tid = await start_service(rig, runner)
    base = ws_base(runner)
    payloads = [secrets.token_bytes(100_000), b"hello", secrets.token_bytes(300_000)]
    results: dict[str, list[bytes]] = {}

    async def session(ref: str, data: list[bytes]) -> None:
        url = f"{base}/ws/forward/{ref}/{ECHO_PORT}?proto=tcp"
        async with open_websocket_url(url, extra_headers=auth()) as ws:
            with trio.fail_after(10):
                assert await ws.get_message() == "CONNECTED"
            await ws.send_message("text after CONNECTED is ignored")
            results[ref] = await echo(ws, data)

    # Two sessions at once, by task id and by container name: their client ids (both start at 1) must be
    # translated onto distinct tunnel ids.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session, str(tid), payloads[:2])
        nursery.start_soon(session, container_name(tid), payloads[2:])
    assert results[str(tid)] == payloads[:2]
    assert results[container_name(tid)] == payloads[2:]


async def test_forward_refusals(rig):
    runner = await start_runner(rig)
    tid = await start_service(rig, runner)
    base = ws_base(runner)
    # Without the cluster token: refused before the upgrade.
    with pytest.raises(ConnectionRejected) as rejected:
        async with open_websocket_url(f"{base}/ws/forward/{tid}/{ECHO_PORT}", extra_headers=auth("wrong")):
            pass
    assert rejected.value.status_code == 401
    for path, reason, refusal_code in [
        (f"{new_task_id()}/{ECHO_PORT}", "holds no task", "not_found"),
        (f"kohakuriver-task-x/{ECHO_PORT}", "holds no task", "not_found"),
        (f"{tid}/0", "port must be", "bad_request"),
        (f"{tid}/65536", "port must be", "bad_request"),
        (f"{tid}/{ECHO_PORT}?proto=sctp", "proto must be", "bad_request"),
    ]:
        first, code, close_reason = await forward_refusal(f"{base}/ws/forward/{path}")
        assert first.startswith("Error: ") and reason in first, (path, first)
        assert (code, close_reason) == (1008, refusal_code), (path, code, close_reason)


async def test_no_tunnel_client_means_1011(rig):
    # Bound on loopback only: the container cannot reach the runner, its tunnel client never attaches.
    runner = await start_runner(rig, RUNNER_BIND_IP="127.0.0.1")
    tid = await start_service(rig, runner)
    started = trio.current_time()
    first, code, close_reason = await forward_refusal(f"{ws_base(runner)}/ws/forward/{tid}/{ECHO_PORT}")
    assert first == f"Error: tunnel client not connected for task {tid}"
    assert (code, close_reason) == (1011, "tunnel_unavailable")
    assert 4.5 <= trio.current_time() - started < 10  # it waited for the tunnel client to attach


async def test_tunnel_disabled_means_1011_and_no_injection(rig):
    runner = await start_runner(rig, TUNNEL_ENABLED=False)
    tid = await start_service(rig, runner)
    info = await rig.docker.inspect(container_name(tid))
    assert not info.raw["Config"]["Entrypoint"]
    first, code, close_reason = await forward_refusal(f"{ws_base(runner)}/ws/forward/{tid}/{ECHO_PORT}")
    assert "disabled" in first and (code, close_reason) == (1011, "forward_disabled")


async def test_tunnel_route_checks_secret_and_source_address(rig):
    runner = await start_runner(rig)
    tid = await start_service(rig, runner)
    name = container_name(tid)
    key = load_or_create_key(runner.config.state_dir)
    url = f"{ws_base(runner)}/ws/tunnel/{name}"

    async def status(headers) -> tuple[int, bytes]:
        with pytest.raises(ConnectionRejected) as rejected:
            async with open_websocket_url(url, extra_headers=headers or []):
                pass
        return rejected.value.status_code, rejected.value.body or b""

    assert (await status(None))[0] == 401
    assert (await status(auth(TOKEN)))[0] == 401  # the cluster token is not a container secret
    assert (await status(auth(container_secret(key, container_name(tid + 1)))))[0] == 401
    # The right secret, but the test process is not the container's address.
    code, body = await status(auth(container_secret(key, name)))
    assert code == 403 and b"address" in body
    # A container this runner does not run.
    other = container_name(new_task_id())
    with pytest.raises(ConnectionRejected) as rejected:
        async with open_websocket_url(
            f"{ws_base(runner)}/ws/tunnel/{other}", extra_headers=auth(container_secret(key, other))
        ):
            pass
    assert rejected.value.status_code == 404


async def test_task_end_closes_the_sessions(rig):
    runner = await start_runner(rig)
    tid = await start_service(rig, runner)
    url = f"{ws_base(runner)}/ws/forward/{tid}/{ECHO_PORT}"
    async with open_websocket_url(url, extra_headers=auth()) as ws:
        with trio.fail_after(10):
            assert await ws.get_message() == "CONNECTED"
        assert await echo(ws, [b"before the end"]) == [b"before the end"]
        resp = await runner.client.post(f"/api/kill/{tid}")
        assert resp.status_code == 200, resp.text
        with trio.fail_after(20), pytest.raises(ConnectionClosed) as closed:
            while True:
                await ws.get_message()
    assert closed.value.reason.code == 1011
    assert closed.value.reason.reason == "task ended"


async def test_forwarding_survives_a_runner_restart(rig):
    config = rig.config("a", RUNNER_BIND_IP="0.0.0.0", TUNNEL_CLIENT_PATH=str(CLIENT))
    runner = await rig.start(config=config)
    tid = await start_service(rig, runner)
    url = f"{ws_base(runner)}/ws/forward/{tid}/{ECHO_PORT}"
    assert await wait_forward_connected(url) == [b"after restart"]
    await runner.crash()
    runner = await rig.start(config=config)  # same state dir: same key, the container is re-adopted
    await rig.host.wait_for(
        lambda: any(u.message == "re-adopted by the restarted runner" for u in rig.host.reports(tid))
    )
    assert await wait_forward_connected(url) == [b"after restart"]
