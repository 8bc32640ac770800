"""The host's SSH proxy against a real ``serve_host``: every refusal of the seed's table with its exact
message, the authenticated and the seed form, bytes both ways, half-close in both directions, early bytes,
the handshake deadline, the line limit and the bound on concurrent handshakes.

The VPS creation path is not used: the test writes the state a running VPS leaves in the store (users with
tokens, nodes, task records with ``ssh_port``) before the host starts, and each VPS's "SSH port" is a local
TCP server run by the test (an echo server, a greeter that half-closes first).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from kohakuriver_host import auth
from kohakuriver_host.host_settings import HostSettings
from kohakuriver_host.store import WriteTx, open_store
from kohakuriver_host.stored_task import StoredTask
from kohakuriver_net import splice
from kohakuriver_proto.lifecycle import TaskStatus, TaskType

from ._host_harness import Host, host_config, running_host

# -- seeding the host's state --------------------------------------------------------------------------------


def vps_task(
    task_id: int,
    *,
    owner: tuple[int, str],
    node: str | None,
    ssh_port: int | None,
    status: str = "running",
    task_type: str = "vps",
) -> StoredTask:
    """A task as the host stores it once a VPS runs (what the VPS path writes)."""
    return StoredTask(
        task_id=task_id,
        task_type=TaskType(task_type),
        status=TaskStatus(status),
        submitted_at=dt.datetime.now(dt.UTC),
        owner_id=owner[0],
        owner=owner[1],
        command="sleep" if task_type == "command" else None,
        assigned_node=node,
        ssh_port=ssh_port,
        required_cores=1,
    )


#: The name tests/e2e/test_ssh_proxy_sshd.py imports.


async def seed_state(
    config: HostSettings,
    *,
    users: dict[str, str],
    nodes: dict[str, tuple[str, bool]],
    tasks: list[StoredTask | Any],
) -> dict[str, tuple[int, str, str]]:
    """Write users (with one token each, ``admin`` included), nodes ``{hostname: (url, online)}`` and tasks
    (callables get the user table and return a task) into a fresh host database, and the
    admin's credentials file the harness reads. Returns ``{username: (user id, username, token)}``."""
    made: dict[str, tuple[int, str, str]] = {}
    async with open_store(config.db_path) as store:
        for name, role in {"admin": "admin", **users}.items():
            user = await store.write(WriteTx.create_user, name, role)
            token = auth.new_api_token()
            await store.write(WriteTx.create_token, user.id, "test", auth.hash_token(token))
            made[name] = (user.id, name, token)
        for hostname, (url, online) in nodes.items():
            await store.write(
                WriteTx.upsert_node, hostname, url, {"total_cores": 4, "memory_total_bytes": 1 << 30}
            )
            if not online:
                await store.write(WriteTx.mark_node_offline, hostname)
        await store.write(WriteTx.insert_tasks, [t(made) if callable(t) else t for t in tasks])
    creds = config.credentials_file
    assert creds.is_relative_to(config.db_path.parent), f"{creds}: set KOHAKURIVER_HOME to the test's home"
    creds.parent.mkdir(parents=True, exist_ok=True)
    creds.write_text(json.dumps({"host": "http://127.0.0.1:1", "token": made["admin"][2]}))
    creds.chmod(0o600)
    return made


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the stand-ins for a VPS's sshd --------------------------------------------------------------------------


@attrs.define
class Services:
    echo_port: int = 0
    greeter_port: int = 0
    #: what the greeter received after it had half-closed (one entry per connection)
    greeter_got: list[bytes] = attrs.field(factory=list)
    #: the echo server saw the client's EOF (one entry per connection)
    echo_eofs: int = 0


async def _echo(stream: trio.SocketStream, services: Services) -> None:
    async with stream:
        with contextlib.suppress(trio.BrokenResourceError):  # clients that just leave are fine
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
            services.echo_eofs += 1
            await stream.send_all(b"<client EOF seen>")  # data after the client's EOF: upstream half-close
            await stream.send_eof()


async def _greeter(stream: trio.SocketStream, services: Services) -> None:
    async with stream:
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(b"HELLO\n")
            await stream.send_eof()  # the "VPS" half-closes first, and keeps reading
            got = bytearray()
            while data := await stream.receive_some(65536):
                got += data
            services.greeter_got.append(bytes(got))


@asynccontextmanager
async def services_running() -> AsyncIterator[Services]:
    services = Services()
    async with trio.open_nursery() as nursery:
        for attr, handler in (("echo_port", _echo), ("greeter_port", _greeter)):
            serve = partial(trio.serve_tcp, partial(handler, services=services), 0, host="127.0.0.1")
            listeners = await nursery.start(serve)
            setattr(services, attr, listeners[0].socket.getsockname()[1])
        yield services
        nursery.cancel_scope.cancel()


# -- the scene: one host, its nodes, users and tasks ---------------------------------------------------------

ECHO, GREETER, PAUSED, COMMAND, STOPPED, OFFLINE, NO_PORT, REFUSED, FOREIGN = (
    1001, 1002, 1003, 1004, 1005, 1006, 1007, 1008, 1009,
)  # fmt: skip


@attrs.define
class Scene:
    host: Host
    services: Services
    users: dict[str, tuple[int, str, str]]

    @property
    def port(self) -> int:
        return self.host.handle.ssh_proxy_port

    def token(self, user: str) -> str:
        return self.users[user][2]


@asynccontextmanager
async def scene(home: Path, **overrides: Any) -> AsyncIterator[Scene]:
    config = host_config(home, **overrides)
    async with services_running() as services:
        users = await seed_state(
            config,
            users={"alice": "user", "bob": "user", "olga": "operator", "vic": "viewer"},
            nodes={"n1": ("http://127.0.0.1:8001", True), "n-off": ("http://127.0.0.1:8001", False)},
            tasks=[
                lambda u: vps_task(ECHO, owner=u["alice"][:2], node="n1", ssh_port=services.echo_port),
                lambda u: vps_task(GREETER, owner=u["alice"][:2], node="n1", ssh_port=services.greeter_port),
                lambda u: vps_task(
                    PAUSED, owner=u["alice"][:2], node="n1", ssh_port=services.echo_port, status="paused"
                ),
                lambda u: vps_task(
                    COMMAND, owner=u["alice"][:2], node="n1", ssh_port=None, task_type="command"
                ),
                lambda u: vps_task(STOPPED, owner=u["alice"][:2], node="n1", ssh_port=2222, status="stopped"),
                lambda u: vps_task(OFFLINE, owner=u["alice"][:2], node="n-off", ssh_port=services.echo_port),
                lambda u: vps_task(NO_PORT, owner=u["alice"][:2], node="n1", ssh_port=None),
                lambda u: vps_task(REFUSED, owner=u["alice"][:2], node="n1", ssh_port=closed_port()),
                lambda u: vps_task(FOREIGN, owner=u["bob"][:2], node="n1", ssh_port=services.echo_port),
            ],
        )
        async with running_host(home, config) as host:
            yield Scene(host, services, users)


# -- a client ------------------------------------------------------------------------------------------------


async def read_line(stream: trio.SocketStream) -> tuple[bytes, bytes]:
    """(the first line, bytes after it) from ``stream``."""
    buf = b""
    with trio.fail_after(10):
        while b"\n" not in buf:
            data = await stream.receive_some(4096)
            if not data:
                return buf, b""
            buf += data
    line, _, rest = buf.partition(b"\n")
    return line + b"\n", rest


async def read_all(stream: trio.SocketStream, first: bytes = b"", timeout: float = 10) -> bytes:
    got = bytearray(first)
    with trio.fail_after(timeout):
        while data := await stream.receive_some(65536):
            got += data
    return bytes(got)


async def ask(port: int, line: bytes) -> tuple[trio.SocketStream, bytes, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(line)
    reply, rest = await read_line(stream)
    return stream, reply, rest


async def refusal(port: int, line: bytes) -> bytes:
    """The reply to ``line``, checking that the proxy closes the connection after an ERROR."""
    stream, reply, rest = await ask(port, line)
    async with stream:
        assert await read_all(stream, rest) == b""
    return reply


def req(task_id: int, token: str | None = None) -> bytes:
    return f"REQUEST_TUNNEL {task_id}{'' if token is None else ' ' + token}\n".encode()


# -- tests ---------------------------------------------------------------------------------------------------


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("KOHAKURIVER_HOME", str(tmp_path))  # the credentials file goes here, not to ~
    return tmp_path


async def test_every_refusal_row_has_its_exact_message(home):
    async with scene(home) as s:
        alice = s.token("alice")
        rows = {
            req(424242, alice): "task 424242 not found",
            req(COMMAND, alice): f"task {COMMAND} is a command task, not a VPS: only VPS tasks have SSH",
            req(STOPPED, alice): f"VPS {STOPPED} is not running (status: stopped)",
            req(OFFLINE, alice): f"node n-off of VPS {OFFLINE} is offline",
            req(NO_PORT, alice): f"VPS {NO_PORT} has no SSH port (was it created without SSH?)",
            req(FOREIGN, alice): f"not allowed to reach task {FOREIGN}",
            req(ECHO, s.token("bob")): f"not allowed to reach task {ECHO}",
            req(ECHO, s.token("vic")): f"not allowed to reach task {ECHO}",  # viewers never reach
            req(ECHO, "krt_" + "x" * 43): "invalid or revoked API token",
            req(REFUSED, alice): f"cannot reach the SSH port of VPS {REFUSED} on node n1: connection refused",
            b"HELLO\n": "expected 'REQUEST_TUNNEL <task_id>', got b'HELLO'",
            b"REQUEST_TUNNEL 12a\n": "task id must be decimal digits, got b'12a'",
        }
        for line, message in rows.items():
            assert await refusal(s.port, line) == f"ERROR {message}\n".encode(), line
        # a user without access learns nothing more about a task than that it is not theirs
        assert (
            await refusal(s.port, req(COMMAND, s.token("bob")))
            == f"ERROR not allowed to reach task {COMMAND}\n".encode()
        )


@pytest.fixture(params=["splice", "copy"])
def relay_mode(request, monkeypatch):
    """Both relays: splice(2) (Linux) and the portable copy loop."""
    if request.param == "copy":
        monkeypatch.setattr(splice, "HAVE_SPLICE", False)  # the relay moved to kohakuriver_net
    else:
        assert splice.HAVE_SPLICE
    return request.param


async def test_tunnel_carries_bytes_both_ways_and_is_logged(home, caplog, relay_mode):
    caplog.set_level(logging.INFO, "kohakuriver.host.ssh_proxy")
    payload = os.urandom(3 * 1024 * 1024 + 17)
    async with scene(home) as s:
        stream, reply, rest = await ask(s.port, req(ECHO, s.token("alice")))
        assert reply == b"SUCCESS\n"
        async with stream, trio.open_nursery() as nursery:

            async def send() -> None:
                await stream.send_all(payload)
                await stream.send_eof()

            nursery.start_soon(send)
            echoed = await read_all(stream, rest)
        assert echoed == payload + b"<client EOF seen>"
        # operators and admins reach everyone's VPS; paused VPS are reachable; the seed form is accepted
        for line in (
            req(ECHO, s.token("olga")),
            req(FOREIGN, s.token("admin")),
            req(PAUSED, s.token("alice")),
            req(ECHO),
        ):
            stream, reply, rest = await ask(s.port, line + b"early bytes")
            async with stream:
                assert reply == b"SUCCESS\n", line
                await stream.send_eof()
                assert await read_all(stream, rest) == b"early bytes<client EOF seen>"
    closed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ssh tunnel closed")]
    assert any(
        f"task {ECHO}, user alice" in m
        and f"{len(payload)} bytes up" in m
        and f"{len(payload) + 17} bytes down" in m
        for m in closed
    ), closed


async def test_half_close_from_the_vps_side(home, relay_mode):
    """The VPS ends its direction first; the client's direction stays open and its bytes arrive."""
    async with scene(home) as s:
        stream, reply, rest = await ask(s.port, req(GREETER, s.token("alice")))
        async with stream:
            assert reply == b"SUCCESS\n"
            assert await read_all(stream, rest) == b"HELLO\n"  # EOF reached the client
            await stream.send_all(b"still talking after your EOF")
            await stream.send_eof()
            with trio.fail_after(5):
                while not s.services.greeter_got:
                    await trio.sleep(0.01)
        assert s.services.greeter_got == [b"still talking after your EOF"]


async def test_handshake_deadline_and_line_limit(home):
    async with scene(home, SSH_PROXY_HANDSHAKE_TIMEOUT_SECONDS=0.3) as s:
        for sent in (b"", b"REQUEST_TUNNEL 10"):  # silence, and a line that never ends
            start = trio.current_time()
            assert await refusal(s.port, sent) == b"ERROR no REQUEST_TUNNEL line within 0.3 s\n"
            assert trio.current_time() - start < 3
        too_long = b"REQUEST_TUNNEL 1 " + b"A" * 600 + b"\n"
        assert await refusal(s.port, too_long) == b"ERROR REQUEST_TUNNEL line longer than 512 bytes\n"


async def test_concurrent_handshakes_are_bounded(home):
    async with scene(home, SSH_PROXY_MAX_PENDING_HANDSHAKES=3, SSH_PROXY_HANDSHAKE_TIMEOUT_SECONDS=30) as s:
        idle = [await trio.open_tcp_stream("127.0.0.1", s.port) for _ in range(3)]
        await trio.sleep(0.2)  # the proxy has accepted all three
        busy = "ERROR the SSH proxy is busy (too many connections in their handshake): try again\n"
        with trio.fail_after(5):  # refused at once, not after the 30 s handshake deadline
            assert await refusal(s.port, req(ECHO, s.token("alice"))) == busy.encode()
        await idle.pop().aclose()
        with trio.fail_after(5):  # a slot is free again once the idle client left
            while True:
                stream, reply, _ = await ask(s.port, req(ECHO, s.token("alice")))
                await stream.aclose()
                if reply == b"SUCCESS\n":
                    break
                assert reply == busy.encode()
                await trio.sleep(0.05)
        for stream in idle:
            await stream.aclose()


async def test_the_handle_reports_the_bound_port(home):
    async with scene(home) as s:
        assert s.port not in (0, s.host.config.HOST_SSH_PROXY_PORT)
        stream, reply, _ = await ask(s.port, req(ECHO, s.token("alice")))
        await stream.aclose()
        assert reply == b"SUCCESS\n"


# -- the byte relay itself ----------------------------------------------------------------------------------


def _stream_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    left, right = socket.socketpair()
    return (
        trio.SocketStream(trio.socket.from_stdlib_socket(left)),
        trio.SocketStream(trio.socket.from_stdlib_socket(right)),
    )


async def test_relay_carries_both_ways_with_half_close():
    (client, a), (b, server) = _stream_pair(), _stream_pair()
    up, down = [], []
    payload = os.urandom(5 * 1024 * 1024 + 3)
    async with client, a, b, server:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                relay = partial(splice.pipe_both_ways, first=b"early", a_to_b=up.append)
                relay = partial(relay, b_to_a=down.append)
                nursery.start_soon(relay, a, b)

                async def client_side():
                    await client.send_all(payload)
                    await client.send_eof()
                    got = bytearray()
                    while data := await client.receive_some(1 << 20):
                        got += data
                    assert got == b"answer"

                async def server_side():
                    got = bytearray()
                    while data := await server.receive_some(1 << 20):
                        got += data
                    assert got == b"early" + payload  # EOF came through: the client's half-close
                    await server.send_all(b"answer")
                    await server.send_eof()

                nursery.start_soon(client_side)
                nursery.start_soon(server_side)
        assert sum(up) == len(payload) + 5 and sum(down) == 6


async def test_cancelling_the_relay_returns_at_once_and_leaves_the_streams_usable():
    (client, a), (b, server) = _stream_pair(), _stream_pair()
    async with client, a, b, server:
        await client.send_all(b"before")
        with trio.fail_after(5):
            with trio.move_on_after(0.5) as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(splice.pipe_both_ways, a, b)
                    assert await server.receive_some(100) == b"before"
                    await trio.sleep_forever()  # both directions wait for data
            assert scope.cancelled_caught
            # nothing was half-closed by the cancellation; the owner decides what happens next
            await a.send_all(b"still mine")
            assert await client.receive_some(100) == b"still mine"
