"""The host's forward proxy ``/ws/forward/{task_id}/{port}`` against a real ``serve_host``.

The node's URL points at a stand-in for the runner: the harness's ``FakeRunner`` (so dispatch, pause and
the other HTTP calls of a running task work) plus the runner's forward route as its contract says: the
cluster token, then ``CONNECTED`` and a verbatim echo, or ``Error: ...`` and 1008/1011 (with the refusal
code as the close reason, or a runner's prose from before the codes). It is the far side
of the code under test; the real runner, container and tunnel client are the end-to-end tests' business.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from contextlib import asynccontextmanager
from functools import partial

import attrs
import hypercorn.config
import hypercorn.trio
import pytest
import trio
from quart import Response, websocket
from trio_websocket import ConnectionClosed, ConnectionRejected, DisconnectionTimeout, open_websocket_url

from kohakuriver_host import api_forward, daemon, forward_relay
from kohakuriver_host.store import WriteTx
from kohakuriver_proto import frames
from kohakuriver_proto.session_opening import RefusalCode, forward_refusal

from ._host_harness import FakeRunner, closed_port_url, host_config, running_host, wait_for
from .test_host_lifecycle import _self_signed

#: The stand-in closes its side with 1011 "task ended" when it gets this.
RUNNER_CLOSE = b"please close"
#: The test client's own limit: above the largest frame a forward carries (1 MiB of payload + 8).
BIG = 4 << 20


@attrs.define
class ForwardRunner:
    """What the stand-in saw on its forward route, and how it answers (``mode``)."""

    fake: FakeRunner
    mode: str = "connect"  # connect | refuse-1008 | refuse-1011 | refuse-<code name> | reject | silent | ...
    requests: list[dict] = attrs.field(factory=list)
    flooded: int = 0  # bytes the "flood" mode got to send
    open_sessions: int = 0
    ended_sessions: int = 0

    @property
    def url(self) -> str:
        return self.fake.url


def add_forward_route(app, runner: ForwardRunner) -> None:
    @app.websocket("/ws/forward/<container>/<port>")
    async def forward(container: str, port: str):
        runner.requests.append(
            {
                "container": container,
                "port": port,
                "proto": websocket.args.get("proto"),
                "auth": websocket.headers.get("Authorization"),
            }
        )
        if websocket.headers.get("Authorization") != f"Bearer {runner.fake.cluster_token}":
            return Response('{"error":"unauthorized","message":"cluster token needed"}', 401)
        if runner.mode == "reject":
            return Response('{"error":"unavailable","message":"tunnel server is starting"}', 503)
        await websocket.accept()
        if runner.mode == "silent":
            await trio.sleep_forever()
        if runner.mode in ("refuse-1008", "refuse-1011"):  # a runner from before the refusal codes
            code = int(runner.mode.removeprefix("refuse-"))
            await websocket.send(f"Error: refused by the runner ({code})")
            await websocket.close(code, "refused")
            return None
        if runner.mode.startswith("refuse-"):
            refusal = forward_refusal(RefusalCode(runner.mode.removeprefix("refuse-")), "a token was denied")
            await websocket.send(refusal.text)
            await websocket.close(refusal.close_code, refusal.close_reason)
            return None
        await websocket.send("CONNECTED")
        if runner.mode == "stall":  # never reads what the client sends
            await trio.sleep_forever()
        if runner.mode == "flood":  # sends as fast as the host takes it
            chunk = os.urandom(64 * 1024)
            while True:
                await websocket.send(chunk)
                runner.flooded += len(chunk)
                # Once the client's close arrived, hypercorn's send returns at once without a checkpoint:
                # this loop would then starve the event loop the whole test shares.
                await trio.lowlevel.checkpoint()
        runner.open_sessions += 1
        try:
            while True:
                message = await websocket.receive()
                if message == RUNNER_CLOSE:
                    await websocket.close(1011, "task ended")
                    return None
                await websocket.send(message)
        finally:
            runner.ended_sessions += 1
        return None


@asynccontextmanager
async def forward_runner(cluster_token: str, tls: tuple | None = None):
    fake = FakeRunner(cluster_token)
    runner = ForwardRunner(fake)
    app = fake.app()
    add_forward_route(app, runner)
    hc = hypercorn.config.Config()
    hc.bind = ["127.0.0.1:0"]
    if tls is not None:
        hc.certfile, hc.keyfile = (str(path) for path in tls)
    hc.accesslog = None
    hc.errorlog = None
    hc.websocket_max_message_size = forward_relay.MAX_MESSAGE_BYTES
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            partial(hypercorn.trio.serve, app, hc, shutdown_trigger=trio.sleep_forever)
        )
        fake.url = binds[0]
        yield runner
        nursery.cancel_scope.cancel()


@attrs.define
class Cluster:
    host: object
    runner: ForwardRunner
    context: object  # the host's HostContext, to put the node registry into states the API cannot reach
    alice: str
    bob: str
    viewer: str
    task_id: str

    def url(self, task_id: str | None = None, port: int | str = 8080, proto: str = "tcp") -> str:
        base = self.host.handle.url.replace("http", "ws", 1)
        return f"{base}/ws/forward/{task_id or self.task_id}/{port}?proto={proto}"


def bearer(token: str | None) -> list[tuple[bytes, bytes]]:
    return [] if token is None else [(b"Authorization", f"Bearer {token}".encode())]


@asynccontextmanager
async def cluster(home, monkeypatch, runner_tls: tuple | None = None, **overrides):
    contexts = []
    real_create_app = daemon.create_app

    def capture(host):
        contexts.append(host)
        return real_create_app(host)

    monkeypatch.setenv("KOHAKURIVER_HOME", str(home))
    monkeypatch.setattr(daemon, "create_app", capture)
    config = host_config(home, **overrides)
    async with running_host(home, config) as host, forward_runner(host.cluster_token, runner_tls) as runner:
        await host.register("n1", runner.url)
        alice = await host.create_user("alice")
        bob = await host.create_user("bob")
        viewer = await host.create_user("vic", "viewer")
        (task_id,) = await host.submit(alice, command="sleep", targets=["n1"])
        await wait_for(lambda: runner.fake.executed, what="the dispatch")
        await host.heartbeat("n1", running=[task_id])
        await host.wait_status(task_id, "running")
        yield Cluster(host, runner, contexts[0], alice, bob, viewer, task_id)


async def answer(url: str, token: str | None) -> tuple[str | bytes, int | None]:
    """The session's first message and, when it is not CONNECTED, the close code that follows it."""
    first, code, _ = await answer_in_full(url, token)
    return first, code


async def answer_in_full(url: str, token: str | None) -> tuple[str | bytes, int | None, str | None]:
    """``answer`` and the close reason (the refusal code)."""
    async with open_websocket_url(url, extra_headers=bearer(token)) as ws:
        with trio.fail_after(12):
            first = await ws.get_message()
            if first == "CONNECTED":
                return first, None, None
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
    return first, closed.value.reason.code, closed.value.reason.reason


# -- the working session ---------------------------------------------------------------------------------


async def test_connected_then_every_message_comes_back_unchanged(tmp_path, monkeypatch):
    async with cluster(tmp_path, monkeypatch) as c:
        messages = [
            frames.encode(frames.MsgType.CONNECT, 7, proto=frames.Proto.UDP, port=5353),
            frames.encode(frames.MsgType.DATA, 7, b"hello", proto=frames.Proto.UDP),
            b"\x03\x00",  # too short for a header: the host does not care, it never parses
            b"\xff" * 9,  # an unknown type
            os.urandom((1 << 20) + 8),  # the largest frame a client may send, 1 MiB of payload
            "a text message",
        ]
        async with open_websocket_url(
            c.url(proto="udp"), extra_headers=bearer(c.alice), max_message_size=BIG
        ) as ws:
            with trio.fail_after(10):
                assert await ws.get_message() == "CONNECTED"
                for message in messages:
                    await ws.send_message(message)
                echoed = [await ws.get_message() for _ in messages]
        assert echoed == messages
        (request,) = c.runner.requests
        assert request == {
            "container": c.task_id,
            "port": "8080",
            "proto": "udp",
            "auth": f"Bearer {c.host.cluster_token}",
        }


async def test_many_messages_in_flight_both_ways_keep_their_order(tmp_path, monkeypatch):
    async with cluster(tmp_path, monkeypatch) as c:
        sent = [i.to_bytes(4, "big") + os.urandom(i % 3000) for i in range(2000)]
        async with open_websocket_url(c.url(), extra_headers=bearer(c.alice)) as ws:
            assert await ws.get_message() == "CONNECTED"
            received = []

            async def send_all():
                for message in sent:
                    await ws.send_message(message)

            with trio.fail_after(20):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send_all)
                    while len(received) < len(sent):
                        received.append(await ws.get_message())
        assert received == sent


async def test_runner_closing_closes_the_client_with_its_code(tmp_path, monkeypatch):
    async with cluster(tmp_path, monkeypatch) as c:
        async with open_websocket_url(c.url(), extra_headers=bearer(c.alice)) as ws:
            assert await ws.get_message() == "CONNECTED"
            await ws.send_message(b"before")
            await ws.send_message(RUNNER_CLOSE)
            with trio.fail_after(5):
                assert await ws.get_message() == b"before"
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
        assert (closed.value.reason.code, closed.value.reason.reason) == (1011, "task ended")


async def test_a_message_over_the_size_limit_ends_the_session(tmp_path, monkeypatch):
    # On the splice path the host never sees a message: the limit is the runner's (the stand-in's is set to
    # the relay's), and its 1009 reaches the client through the host. The relay path enforces it itself.
    async with cluster(tmp_path, monkeypatch) as c:
        async with open_websocket_url(c.url(), extra_headers=bearer(c.alice), max_message_size=BIG) as ws:
            assert await ws.get_message() == "CONNECTED"
            await ws.send_message(b"x" * (forward_relay.MAX_MESSAGE_BYTES + 1))
            with trio.fail_after(5), pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
        assert closed.value.reason.code == 1009
        await wait_for(lambda: c.runner.ended_sessions == 1, timeout=5, what="the runner side to close")


async def test_client_closing_closes_the_runner_side(tmp_path, monkeypatch):
    async with cluster(tmp_path, monkeypatch) as c:
        async with open_websocket_url(c.url(), extra_headers=bearer(c.alice)) as ws:
            assert await ws.get_message() == "CONNECTED"
            await wait_for(lambda: c.runner.open_sessions == 1, what="the runner's session")
        await wait_for(lambda: c.runner.ended_sessions == 1, timeout=5, what="the runner side to close")
        # A client that vanishes without a closing handshake ends the runner side too.
        with trio.CancelScope() as scope:
            async with open_websocket_url(c.url(), extra_headers=bearer(c.alice)) as ws:
                assert await ws.get_message() == "CONNECTED"
                await ws._stream.aclose()  # the TCP connection, under the WebSocket
                scope.cancel()
        await wait_for(lambda: c.runner.ended_sessions == 2, timeout=5, what="the runner side to close")


async def test_runner_over_tls_is_verified(tmp_path, monkeypatch):
    cert_file, key_file = _self_signed(tmp_path)
    # The host trusts what its HTTP calls to runners trust (here the test's certificate, through the
    # standard variable); the context is built once per process, so the test starts from none.
    monkeypatch.setenv("SSL_CERT_FILE", str(cert_file))
    monkeypatch.setattr(forward_relay, "_ssl_context", None)
    async with cluster(tmp_path, monkeypatch, runner_tls=(cert_file, key_file)) as c:
        assert c.runner.url.startswith("https://")
        async with open_websocket_url(c.url(), extra_headers=bearer(c.alice)) as ws:
            assert await ws.get_message() == "CONNECTED"
            await ws.send_message(b"over tls")
            assert await ws.get_message() == b"over tls"
        # A certificate the host does not trust is a runner it cannot reach, said at once.
        monkeypatch.delenv("SSL_CERT_FILE")
        monkeypatch.setattr(forward_relay, "_ssl_context", None)
        start = time.monotonic()
        first, code = await answer(c.url(), c.alice)
        assert code == 1011 and first.startswith("Error: cannot reach node n1"), first
        assert "certificate" in first.lower()
        assert time.monotonic() - start < 5


async def _progress_stops(count, what: str) -> int:
    """Wait until ``count()`` stays the same for a second; return it."""
    last = -1
    with trio.fail_after(30):
        while (now := count()) != last:
            last = now
            await trio.sleep(1.0)
    return last


async def test_a_side_that_stops_reading_stops_the_other_side(tmp_path, monkeypatch):
    # Backpressure instead of buffering: what the host holds per session is bounded by small queues, so
    # the bytes in flight stay within the kernel's socket buffers plus a few messages.
    bound = 48 << 20
    async with cluster(tmp_path, monkeypatch) as c:
        c.runner.mode = "stall"
        sent = 0
        # The stalled path cannot carry the client's close frame either: the client gives up on it.
        with contextlib.suppress(DisconnectionTimeout):
            async with open_websocket_url(
                c.url(), extra_headers=bearer(c.alice), disconnect_timeout=0.5
            ) as ws:
                assert await ws.get_message() == "CONNECTED"
                chunk = os.urandom(64 * 1024)

                async def send_forever():
                    nonlocal sent
                    while True:
                        await ws.send_message(chunk)
                        sent += len(chunk)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send_forever)
                    stalled_at = await _progress_stops(lambda: sent, "the client's sends")
                    nursery.cancel_scope.cancel()
        assert 0 < stalled_at < bound
        c.runner.mode = "flood"
        # The runner's close reply queues behind the flood the client never reads: the client gives up on it.
        with contextlib.suppress(DisconnectionTimeout):
            async with open_websocket_url(
                c.url(), extra_headers=bearer(c.alice), disconnect_timeout=0.5
            ) as ws:
                assert await ws.get_message() == "CONNECTED"  # and then never reads
                flooded = await _progress_stops(lambda: c.runner.flooded, "the runner's sends")
        assert 0 < flooded < bound


# -- who may forward --------------------------------------------------------------------------------------


async def test_token_and_role_rules(tmp_path, monkeypatch):
    async with cluster(tmp_path, monkeypatch) as c:
        for token in (None, "krt_" + "x" * 43, c.host.cluster_token):
            with pytest.raises(ConnectionRejected) as rejected:
                async with open_websocket_url(c.url(), extra_headers=bearer(token)):
                    pass
            assert rejected.value.status_code == 401
            assert b'"unauthorized"' in rejected.value.body
        unknown = await answer(c.url(task_id="123456789"), c.bob)
        assert unknown == ("Error: task 123456789 not found", 1008)
        # Another user's task reads exactly like an unknown one, so ids cannot be probed: words and code.
        assert await answer_in_full(c.url(), c.bob) == (
            f"Error: task {c.task_id} not found",
            1008,
            "not_found",
        )
        assert (await answer_in_full(c.url(task_id="123456789"), c.bob))[2] == "not_found"
        assert await answer(c.url(), c.viewer) == (f"Error: task {c.task_id} not found", 1008)
        assert await answer(c.url(task_id="not-a-number"), c.alice) == (
            "Error: task not-a-number not found",
            1008,
        )
        # The owner and an admin reach it; the runner never heard of the refused ones.
        assert await answer(c.url(), c.alice) == ("CONNECTED", None)
        assert await answer(c.url(), c.host.admin_token) == ("CONNECTED", None)
        assert len(c.runner.requests) == 2
        # A user demoted to viewer still sees its task, but may not reach it (there is no API for roles yet).
        me = await c.host.ok("GET", "/api/auth/me", c.alice)
        await c.context.store.write(WriteTx.update_user, me["user_id"], role="viewer")
        c.context.tokens.clear()
        expected = f"Error: alice (viewer) may not forward ports of task {c.task_id}"
        assert await answer_in_full(c.url(), c.alice) == (expected, 1008, "not_allowed")
        assert len(c.runner.requests) == 2


async def test_bad_port_or_proto_is_refused_with_1008(tmp_path, monkeypatch):
    async with cluster(tmp_path, monkeypatch) as c:
        for port, proto in ((0, "tcp"), (65536, "tcp"), ("http", "tcp"), (22, "sctp")):
            first, code, reason = await answer_in_full(c.url(port=port, proto=proto), c.alice)
            assert code == 1008 and first.startswith("Error: ") and ("port" in first or "proto" in first)
            assert reason == "bad_request"
        assert c.runner.requests == []


async def test_tasks_that_are_not_running_are_refused_with_1008(tmp_path, monkeypatch):
    async with cluster(tmp_path, monkeypatch) as c:
        await c.host.ok("POST", f"/api/command/{c.task_id}/pause", c.alice)
        paused = (f"Error: task {c.task_id} is paused", 1008, "not_running")
        assert await answer_in_full(c.url(), c.alice) == paused
        await c.host.ok("POST", f"/api/kill/{c.task_id}", c.alice)
        assert await answer(c.url(), c.alice) == (f"Error: task {c.task_id} is killed, not running", 1008)
        assert c.runner.requests == []


async def test_offline_node_is_refused_with_1011(tmp_path, monkeypatch):
    async with cluster(tmp_path, monkeypatch) as c:
        # The store marks a silent node's tasks lost in the same transaction; between that and the next
        # read, or with a node that vanished from memory, the task still reads running.
        c.context.nodes.offline("n1")
        assert await answer_in_full(c.url(), c.alice) == ("Error: node n1 is offline", 1011, "node_offline")
        assert c.runner.requests == []


# -- the runner's answers ---------------------------------------------------------------------------------


async def test_runner_refusals_are_passed_on_with_their_code(tmp_path, monkeypatch):
    async with cluster(tmp_path, monkeypatch) as c:
        for code in (1008, 1011):
            c.runner.mode = f"refuse-{code}"
            passed_on = (f"Error: refused by the runner ({code})", code, "refused")
            assert await answer_in_full(c.url(), c.alice) == passed_on
        # A runner's refusal code reaches the client intact, with the runner's words and close code.
        for refusal_code in (RefusalCode.TUNNEL_UNAVAILABLE, RefusalCode.NOT_FOUND):
            c.runner.mode = f"refuse-{refusal_code.value}"
            passed_on = ("Error: a token was denied", refusal_code.close_code, refusal_code.value)
            assert await answer_in_full(c.url(), c.alice) == passed_on
        c.runner.mode = "reject"
        first, code, reason = await answer_in_full(c.url(), c.alice)
        assert code == 1011 and first.startswith("Error: node n1 refused the forward: HTTP 503")
        assert reason == "runner_unavailable"
        assert "tunnel server is starting" in first


async def test_unreachable_or_silent_runner_is_answered_1011_in_time(tmp_path, monkeypatch):
    timeout = 2.0
    async with cluster(tmp_path, monkeypatch, FORWARD_CONNECT_TIMEOUT_SECONDS=timeout) as c:
        await c.host.register("n1", closed_port_url())
        start = time.monotonic()
        first, code = await answer(c.url(), c.alice)
        assert code == 1011 and first.startswith("Error: cannot reach node n1"), first
        assert time.monotonic() - start < timeout
        # A runner whose kernel accepts the TCP connection but which never answers the upgrade.
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen(8)
            await c.host.register("n1", f"http://127.0.0.1:{silent.getsockname()[1]}")
            start = time.monotonic()
            assert await answer(c.url(), c.alice) == ("Error: node n1 did not answer in time", 1011)
            elapsed = time.monotonic() - start
        assert timeout / 2 <= elapsed < timeout
        # A runner that upgrades and then says nothing.
        await c.host.register("n1", c.runner.url)
        c.runner.mode = "silent"
        start = time.monotonic()
        assert await answer(c.url(), c.alice) == ("Error: node n1 did not answer in time", 1011)
        assert time.monotonic() - start < timeout


def test_default_setup_time_is_within_ten_seconds(tmp_path):
    config = host_config(tmp_path)
    assert config.FORWARD_CONNECT_TIMEOUT_SECONDS == 10.0
    assert 5.0 <= api_forward.setup_seconds(config) < 10.0


# -- the per-user limit -----------------------------------------------------------------------------------


async def test_sessions_per_user_are_limited(tmp_path, monkeypatch):
    monkeypatch.setattr(api_forward, "MAX_SESSIONS_PER_USER", 3)
    async with cluster(tmp_path, monkeypatch) as c, trio.open_nursery() as nursery:
        opened = []
        for _ in range(3):
            ws = await nursery.start(_hold_session, c.url(), c.alice)
            opened.append(ws)
        first, code, reason = await answer_in_full(c.url(), c.alice)
        assert code == 1008 and "3 forward sessions open already" in first and reason == "too_many"
        # The limit is per user: the admin still gets in.
        assert await answer(c.url(), c.host.admin_token) == ("CONNECTED", None)
        # Closing one frees its slot.
        await opened.pop().aclose()

        async def slot_free():
            return await answer(c.url(), c.alice) == ("CONNECTED", None)

        await wait_for(slot_free, timeout=5, what="a freed slot")
        nursery.cancel_scope.cancel()


async def _hold_session(url: str, token: str, task_status=trio.TASK_STATUS_IGNORED) -> None:
    async with open_websocket_url(url, extra_headers=bearer(token)) as ws:
        assert await ws.get_message() == "CONNECTED"
        task_status.started(ws)
        await trio.sleep_forever()


# -- pure pieces ------------------------------------------------------------------------------------------


def test_runner_url_and_close_codes():
    target = forward_relay.RunnerTarget("n1", "https://node1:8001/", 42, 8080, "udp")
    assert target.url == "wss://node1:8001/ws/forward/42/8080?proto=udp"
    plain = forward_relay.RunnerTarget("n1", "http://[::1]:8001", 42, 22, "tcp")
    assert plain.url == "ws://[::1]:8001/ws/forward/42/22?proto=tcp"
    with pytest.raises(forward_relay.Refusal):
        _ = forward_relay.RunnerTarget("n1", "node1:8001", 42, 22, "tcp").url
    assert [forward_relay.sendable_code(c) for c in (1000, 1005, 1006, 1008, 1011, 4000, None)] == [
        1000, 1000, 1011, 1008, 1011, 4000, 1011,
    ]  # fmt: skip
    assert forward_relay.clip_reason("é" * 100).encode() == ("é" * 61).encode()
