"""The guest agent end to end without a VM: the runner's ``TunnelServer`` behind its tunnel door (the lean
WebSocket routes the runner serves on plain TCP) and the real Rust ``tunnel-client --agent`` in standalone
mode, as a VM's systemd unit runs it.

The "VM" is a ``HeldContainer`` with ``address`` 127.0.0.1 (no Docker is asked); its services are on the
test's own loopback, which is where the tunnel client dials. Checked: heartbeats arrive as TEXT messages on
the tunnel's WebSocket and parse (seq 0 at once after each attach, then one per interval, with this
machine's real figures); forwarding through the same client works meanwhile; a client connecting from
another address than the VM's is refused; malformed and unknown agent messages are ignored without
touching the tunnel; the binary locator hands VMs only a build that has ``--agent``.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import secrets
import subprocess
import types
from pathlib import Path

import pytest
import trio
from trio_websocket import open_websocket_url

from kohakuriver_net.front_door import peek_request_line, route_for
from kohakuriver_proto import forwarder as fwd
from kohakuriver_proto.agent import AgentHeartbeat, encode_agent_message
from kohakuriver_proto.flow import SendFrame
from kohakuriver_proto.frames import MsgType, Proto, decode, encode
from kohakuriver_runner.tunnel_door import routes
from kohakuriver_runner.tunnel_secret import container_secret
from kohakuriver_runner.tunnel_server import HeldContainer, TunnelClientLocator, TunnelServer

from ..need import need

pytestmark = pytest.mark.slow

CLIENT = Path(__file__).resolve().parents[2] / "tunnel-client-rs" / "target" / "release" / "tunnel-client"
KEY = secrets.token_bytes(32)
TOKEN = "krc_test_" + secrets.token_urlsafe(16)
NAME = "kohakuriver-vm-7"
INTERVAL = 0.2


class Runner:
    """A TunnelServer on a loopback port with one VM at ``address``, recording what its hooks see."""

    def __init__(self, address: str) -> None:
        config = types.SimpleNamespace(TUNNEL_ENABLED=True, CLUSTER_TOKEN=TOKEN)
        self.held = HeldContainer(task_id=7, name=NAME, running=True, address=address)
        self.events: list[tuple[str, float, AgentHeartbeat | None]] = []
        self.changed = trio.Event()
        self.tunnels = TunnelServer(
            config,
            docker=None,  # a VM: Docker is never asked
            key=KEY,
            on_agent_heartbeat=lambda name, hb: self._record("heartbeat", name, hb),
            on_tunnel_attached=lambda name: self._record("attached", name),
            on_tunnel_detached=lambda name: self._record("detached", name),
        )
        self.tunnels.directories.append(lambda ref: self.held if ref in ("7", NAME) else None)
        self.routes = routes(self.tunnels, config, 16 * 1024 * 1024)
        self.port = 0

    def _record(self, kind: str, name: str, hb: AgentHeartbeat | None = None) -> None:
        assert name == NAME
        self.events.append((kind, trio.current_time(), hb))
        self.changed.set()
        self.changed = trio.Event()

    def heartbeats(self) -> list[AgentHeartbeat]:
        return [hb for kind, _, hb in self.events if kind == "heartbeat"]

    async def wait_for(self, predicate, what: str, timeout: float = 15) -> None:
        with trio.fail_after(timeout):
            while not predicate():
                await self.changed.wait()

    async def _handle(self, stream: trio.SocketStream) -> None:
        line = await peek_request_line(stream.socket, trio.current_time() + 5)
        handler = route_for(self.routes, line)
        assert handler is not None, line
        try:
            await handler(stream)
        finally:
            await trio.aclose_forcefully(stream)

    async def serve(self, nursery: trio.Nursery) -> None:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1"))
        self.port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(self.tunnels.run)

    def client_env(self) -> dict[str, str]:
        return {
            "KOHAKURIVER_TUNNEL_URL": f"ws://127.0.0.1:{self.port}",
            "KOHAKURIVER_CONTAINER_ID": NAME,
            "KOHAKURIVER_TUNNEL_TOKEN": container_secret(KEY, NAME),
        }


@pytest.fixture
def client_binary() -> str:
    need(CLIENT.is_file(), f"the tunnel client is not built ({CLIENT}): bash tunnel-client-rs/build.sh")
    return str(CLIENT)


async def start_agent(nursery: trio.Nursery, runner: Runner, binary: str, *extra: str) -> trio.Process:
    argv = [binary, "--agent", "--agent-interval", str(INTERVAL), "--log-level", "debug", *extra]
    return await nursery.start(
        functools.partial(
            trio.run_process, argv, env=runner.client_env(), stdout=subprocess.DEVNULL, check=False
        )
    )


async def echo_server(nursery: trio.Nursery) -> int:
    async def echo(stream: trio.SocketStream) -> None:
        async for data in stream:
            await stream.send_all(data)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


async def forward_echo(runner: Runner, port: int, payload: bytes) -> bytes:
    """One TCP connection through ``/ws/forward/7/<port>``, as the host relays ``kr forward``."""
    url = f"ws://127.0.0.1:{runner.port}/ws/forward/7/{port}?proto=tcp"
    headers = [(b"Authorization", f"Bearer {TOKEN}".encode())]
    forwarder = fwd.Forwarder(Proto.TCP, port)
    got = bytearray()
    async with open_websocket_url(url, extra_headers=headers) as ws:
        with trio.fail_after(15):
            assert await ws.get_message() == "CONNECTED"
            for event in forwarder.start():
                await ws.send_message(event.data)
            cid, out = forwarder.open_connection()
            for event in out:
                await ws.send_message(event.data)
            while len(got) < len(payload):
                for event in forwarder.receive_frame(await ws.get_message(), trio.current_time()):
                    if isinstance(event, SendFrame):
                        await ws.send_message(event.data)
                    elif isinstance(event, fwd.ConnectionReady):
                        for sent in forwarder.send_data(cid, payload):
                            await ws.send_message(sent.data)
                    elif isinstance(event, fwd.DataReceived):
                        got += event.data
                        for sent in forwarder.delivered(cid, len(event.data)):
                            await ws.send_message(sent.data)
                    elif isinstance(event, fwd.ConnectionClosed):
                        raise AssertionError(f"connection closed: {event.reason}")
    return bytes(got)


async def test_the_agent_phones_home_heartbeats_and_forwards_on_one_websocket(nursery, client_binary):
    runner = Runner("127.0.0.1")
    await runner.serve(nursery)
    started = trio.current_time()
    process = await start_agent(nursery, runner, client_binary)

    # Attached, then seq 0 at once, then one per interval.
    await runner.wait_for(lambda: len(runner.heartbeats()) >= 4, "four heartbeats")
    assert runner.events[0][0] == "attached"
    first = runner.heartbeats()[:4]
    assert [hb.seq for hb in first] == [0, 1, 2, 3]
    times = [t for kind, t, _ in runner.events if kind == "heartbeat"][:4]
    assert times[0] - started < 3  # the phone-home does not wait for an interval
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(INTERVAL * 0.5 < gap < INTERVAL * 5 for gap in gaps), gaps

    # This machine's real figures, as /proc and statvfs give them.
    hb = first[0]
    assert hb.hostname == Path("/proc/sys/kernel/hostname").read_text().strip()
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    assert hb.memory_total_bytes == int(meminfo["MemTotal"].split()[0]) * 1024
    assert 0 < hb.memory_available_bytes <= hb.memory_total_bytes
    assert 0 < hb.disk_free_bytes <= hb.disk_total_bytes
    assert hb.uptime_seconds > 0 and hb.version == 1
    nvidia = Path("/proc/driver/nvidia/gpus")
    assert hb.gpus == (len(list(nvidia.iterdir())) if nvidia.is_dir() else 0)

    # Forwarding through the same client works while heartbeats flow, and they keep flowing.
    port = await echo_server(nursery)
    payload = secrets.token_bytes(3 * 1024 * 1024)
    assert await forward_echo(runner, port, payload) == payload
    seen = len(runner.heartbeats())
    await runner.wait_for(lambda: len(runner.heartbeats()) >= seen + 2, "heartbeats after the forward")
    seqs = [hb.seq for hb in runner.heartbeats()]
    assert seqs == list(range(len(seqs)))  # none lost, none reordered

    # A new attach (the runner dropped the tunnel; the client comes back): seq 0 again.
    runner.tunnels.container_ended(NAME)
    await runner.wait_for(
        lambda: [kind for kind, _, _ in runner.events].count("attached") >= 2, "the client to come back"
    )
    kinds = [kind for kind, _, _ in runner.events if kind != "heartbeat"]
    assert kinds == ["attached", "detached", "attached"]
    reattached = max(i for i, (kind, _, _) in enumerate(runner.events) if kind == "attached")
    await runner.wait_for(lambda: len(runner.events) > reattached + 1, "the phone-home after the new attach")
    assert runner.events[reattached + 1][2].seq == 0
    process.terminate()


async def test_a_client_from_another_address_than_the_vms_is_refused(nursery, client_binary):
    runner = Runner("127.0.0.2")  # the VM's address; the client connects from 127.0.0.1
    await runner.serve(nursery)
    argv = [client_binary, "--agent", "--agent-interval", str(INTERVAL), "--max-reconnect", "1"]
    with trio.fail_after(20):
        done = await trio.run_process(argv, env=runner.client_env(), capture_stderr=True, check=False)
    assert done.returncode == 1
    assert b"403" in done.stderr, done.stderr
    assert runner.events == []
    # Same answer from the check itself, with the right secret; an IPv4-mapped form of the address passes.
    auth = f"Bearer {container_secret(KEY, NAME)}"
    problem = await runner.tunnels.check_tunnel_client(NAME, auth, "127.0.0.1")
    assert problem == (403, "the connection does not come from the container's address")
    assert await runner.tunnels.check_tunnel_client(NAME, auth, "::ffff:127.0.0.2") is None
    assert (await runner.tunnels.check_tunnel_client(NAME, "Bearer wrong", "127.0.0.2"))[0] == 401


async def test_malformed_and_unknown_agent_messages_are_ignored(nursery, caplog):
    """A tunnel client (here the test, over the same door) that sends garbage text: each is logged at a
    falling rate and ignored, the tunnel stays attached, and a valid heartbeat after them still counts."""
    runner = Runner("127.0.0.1")
    await runner.serve(nursery)
    url = f"ws://127.0.0.1:{runner.port}/ws/tunnel/{NAME}"
    headers = [(b"Authorization", f"Bearer {container_secret(KEY, NAME)}".encode())]
    caplog.set_level(logging.WARNING, logger="kohakuriver.runner.tunnel")
    async with open_websocket_url(url, extra_headers=headers) as ws:
        with trio.fail_after(15):
            assert decode(await ws.get_message()).type == MsgType.HELLO
            await ws.send_message(encode(MsgType.PONG, 0))  # a seed-protocol tunnel client
            for i in range(10):
                await ws.send_message(f"not json {i}")
            await ws.send_message(json.dumps({"type": "agent.heartbeat", "version": 1, "seq": -1}))
            await ws.send_message(json.dumps({"type": "agent.future", "anything": [1, 2]}))
            valid = AgentHeartbeat(
                seq=0,
                hostname="vps-7",
                uptime_seconds=1.5,
                load1=0.0,
                load5=0.0,
                load15=0.0,
                memory_total_bytes=1,
                memory_available_bytes=1,
                disk_total_bytes=1,
                disk_free_bytes=1,
                gpus=0,
            )
            await ws.send_message(encode_agent_message(valid))
            await runner.wait_for(lambda: runner.heartbeats() == [valid], "the valid heartbeat")
            # The tunnel is still up: a tunnel PING is answered.
            await ws.send_message(encode(MsgType.PING, 0))
            while decode(await ws.get_message()).type != MsgType.PONG:
                pass
    warnings = [r.getMessage() for r in caplog.records if "malformed agent message" in r.getMessage()]
    # 11 malformed messages: the first five, then the 8th (powers of two) are logged.
    assert len(warnings) == 6, warnings
    assert "(8 so far)" in warnings[-1]  # the 11th (a heartbeat with a bad seq) is not logged
    assert [kind for kind, _, _ in runner.events][:2] == ["attached", "heartbeat"]


async def test_the_locator_gives_vms_only_a_client_with_the_agent_mode(tmp_path, client_binary):
    def locator(path: Path) -> TunnelClientLocator:
        config = types.SimpleNamespace(
            TUNNEL_ENABLED=True, find_tunnel_client=lambda: path, tunnel_client_candidates=[path]
        )
        return TunnelClientLocator(config)

    built = locator(Path(client_binary))
    assert await built.find(agent=True) == Path(client_binary)
    # An older build: --exec but no --agent. Containers still get it; VMs do not, and forwarding's
    # problem stays unset (it is about containers).
    older = tmp_path / "tunnel-client"
    older.write_text("#!/bin/sh\necho '  --exec  Exec mode'\necho '  --agent-interval <S>'\n")
    older.chmod(0o755)
    old = locator(older)
    assert await old.find() == older
    assert await old.find(agent=True) is None
    assert old.problem is None
