"""Forwarder <-> ContainerTunnel <-> TunnelClient wired in memory, with fake local apps and services.

A ``World`` plays the daemons: every WebSocket is a FIFO per direction, every step moves one message or
lets one fake app act, and hypothesis chooses the interleaving. Like the runner, the World stops reading a
peer the ContainerTunnel paused (``PauseReading``) until it is resumed. Local apps on the CLI side send a
payload unique to their (session, connection) and half-close; the service in the container echoes what it
reads and closes after its input ended. So a frame routed to the wrong session or connection shows up as a
corrupted echo, and a connection left open anywhere shows up in the final tables.
"""

from __future__ import annotations

import itertools
from collections import deque

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kohakuriver_proto import container_tunnel as ctm
from kohakuriver_proto import forwarder as fwm
from kohakuriver_proto import frames
from kohakuriver_proto import tunnel_client as tcm
from kohakuriver_proto.container_tunnel import ContainerTunnel
from kohakuriver_proto.flow import ReceiveWindow
from kohakuriver_proto.forwarder import Forwarder
from kohakuriver_proto.frames import MsgType, Proto
from kohakuriver_proto.tunnel_client import TunnelClient

ECHO_PORT = 7


class Client:
    """A local TCP client of ``kr forward``: sends ``payload``, half-closes, reads the echo."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.sent = 0
        self.eof_sent = False
        self.ready = False
        self.inbox: deque[bytes] = deque()
        self.received = bytearray()
        self.remote_eof = False
        self.closed = False
        self.aborted = False
        self.reason: str | None = None


class Service:
    """A connection accepted by the echo service in the container."""

    def __init__(self) -> None:
        self.accepted = False
        self.inbox: deque[bytes] = deque()
        self.outbox = bytearray()
        self.eof_in = False
        self.eof_sent = False
        self.closing = False


class Session:
    def __init__(self, fw: Forwarder) -> None:
        self.fw = fw
        self.to_fw: deque = deque()  # runner actions for this session, in order
        self.to_ct: deque[bytes] = deque()  # frames from the Forwarder
        self.clients: dict[int, Client] = {}
        self.done: dict[int, Client] = {}


class World:
    def __init__(
        self,
        *,
        runner_fc: bool = True,
        runner_window: int = 1024,
        client_fc: bool = True,
        client_hello: bool = True,
        client_window: int = 1024,
        fw_fc: bool = True,
        fw_hello: bool = True,
        fw_window: int = 1024,
        legacy_limit: int = 1 << 30,
        runner_legacy_limit: int | None = None,
        chunk: int = 300,
        first_id: int = 1,
    ) -> None:
        self.now = 0.0
        self.chunk = chunk
        self.fw_kwargs = dict(
            flow_control=fw_fc, hello=fw_hello, window=fw_window, legacy_buffer_limit=legacy_limit
        )
        self.ct = ContainerTunnel(
            "c1",
            flow_control=runner_fc,
            window=runner_window,
            legacy_buffer_limit=legacy_limit if runner_legacy_limit is None else runner_legacy_limit,
            first_id=first_id,
        )
        self.tc = TunnelClient(
            flow_control=client_fc, hello=client_hello, window=client_window, legacy_buffer_limit=legacy_limit
        )
        self.attached = False
        self.to_tc: deque = deque()
        self.to_ct: deque[bytes] = deque()
        self.sessions: dict[int, Session] = {}
        self.ended: list[Session] = []
        self.services: dict[int, Service] = {}
        self.closed_by_runner: list[ctm.ConnectionClosed] = []
        self._keys = itertools.count(1)
        self._payload_ids = itertools.count(1)
        self.stalled: set[tuple[int, int]] = set()  # (session, cid) whose local reader never reads
        self.services_stalled = False  # the services in the container read nothing
        self.paused: set[int | None] = set()  # peers the runner does not read (None: the tunnel client)
        self.pauses = 0

    # -- dispatch --------------------------------------------------------------------------------------

    def runner(self, actions: list) -> None:
        for a in actions:
            if isinstance(a, ctm.SendToContainer):
                assert self.attached, "the runner wrote to a detached tunnel client"
                self.to_tc.append(a)
            elif isinstance(a, ctm.SendToSession):
                # Routing property: the machine never addresses a session that is gone.
                self.sessions[a.session].to_fw.append(a)
            elif isinstance(a, ctm.ConnectionClosed):
                self.closed_by_runner.append(a)
            elif isinstance(a, ctm.PauseReading):
                assert a.peer not in self.paused
                assert a.peer is None or a.peer in self.sessions, "pause for a session that is gone"
                self.paused.add(a.peer)
                self.pauses += 1
            elif isinstance(a, ctm.ResumeReading):
                self.paused.remove(a.peer)
            else:
                assert isinstance(a, ctm.TunnelDead), a
        assert self.ct.reading_paused() is (None in self.paused)

    def client_side(self, key: int, events: list) -> None:
        s = self.sessions[key]
        for e in events:
            if isinstance(e, fwm.SendFrame):
                s.to_ct.append(bytes(e.data))
            elif isinstance(e, fwm.ConnectionReady):
                s.clients[e.client_id].ready = True
            elif isinstance(e, fwm.DataReceived):
                s.clients[e.client_id].inbox.append(bytes(e.data))
            elif isinstance(e, fwm.RemoteEOF):
                s.clients[e.client_id].remote_eof = True
            elif isinstance(e, fwm.ConnectionClosed):
                c = s.clients.pop(e.client_id)
                c.closed, c.aborted, c.reason = True, e.aborted, e.reason
                if not e.aborted:  # graceful: what is queued still gets written
                    c.received += b"".join(c.inbox)
                    c.inbox.clear()
                s.done[e.client_id] = c
            else:
                assert isinstance(e, fwm.CreditAvailable | fwm.Negotiated | fwm.PongReceived), e

    def container_side(self, actions: list) -> None:
        for a in actions:
            if isinstance(a, tcm.SendFrame):
                assert self.attached
                self.to_ct.append(bytes(a.data))
            elif isinstance(a, tcm.OpenTcp):
                assert a.port == ECHO_PORT
                assert a.client_id not in self.services, "tunnel id reused while still open in the container"
                self.services[a.client_id] = Service()
            elif isinstance(a, tcm.WriteData):
                self.services[a.client_id].inbox.append(bytes(a.data))
            elif isinstance(a, tcm.ShutdownWrite):
                self.services[a.client_id].eof_in = True
            elif isinstance(a, tcm.CloseConnection):
                svc = self.services[a.client_id]
                if a.abort or not svc.inbox:
                    del self.services[a.client_id]
                else:
                    svc.closing = True
            else:
                assert isinstance(a, tcm.CreditAvailable | tcm.Negotiated), a

    # -- steps: each returns True when it did something ---------------------------------------------------

    def attach(self) -> bool:
        if self.attached:
            return False
        self.attached = True
        self.container_side(self.tc.start())
        self.runner(self.ct.attach(self.now))
        return True

    def detach(self) -> bool:
        if not self.attached:
            return False
        self.to_tc.clear()  # whatever was on the dead WebSocket is lost
        self.to_ct.clear()
        self.attached = False
        self.paused.discard(None)  # a new WebSocket is read from the start
        self.runner(self.ct.detach())
        self.container_side(self.tc.disconnected())
        return True

    def open_session(self) -> bool:
        if not self.attached:
            return False
        key = next(self._keys)
        fw = Forwarder(Proto.TCP, ECHO_PORT, **self.fw_kwargs)
        self.sessions[key] = Session(fw)
        assert self.ct.open_session(key, Proto.TCP, ECHO_PORT) == []
        self.client_side(key, fw.start())
        return True

    def end_session(self, key: int) -> bool:
        s = self.sessions.get(key)
        if s is None:
            return False
        self.runner(self.ct.end_session(key))
        self.client_side(key, s.fw.close())
        del self.sessions[key]
        self.paused.discard(key)
        self.ended.append(s)
        return True

    def open_conn(self, key: int, size: int) -> bool:
        s = self.sessions.get(key)
        if s is None:
            return False
        cid, events = s.fw.open_connection()
        tag = f"<{key}:{cid}:{next(self._payload_ids)}>".encode()
        s.clients[cid] = Client((tag * (size // len(tag) + 1))[:size] + tag)
        self.client_side(key, events)
        return True

    def client_send(self, key: int, cid: int) -> bool:
        s = self.sessions.get(key)
        c = s and s.clients.get(cid)
        if c is None or not c.ready or c.eof_sent:
            return False
        if c.sent == len(c.payload):
            c.eof_sent = True
            self.client_side(key, s.fw.local_eof(cid))
            return True
        credit = s.fw.send_credit(cid)
        n = min(self.chunk, len(c.payload) - c.sent, self.chunk if credit is None else credit)
        if n == 0:
            return False
        self.client_side(key, s.fw.send_data(cid, c.payload[c.sent : c.sent + n]))
        c.sent += n
        return True

    def client_deliver(self, key: int, cid: int) -> bool:
        s = self.sessions.get(key)
        c = s and s.clients.get(cid)
        if c is None or not c.inbox or (key, cid) in self.stalled:
            return False
        data = c.inbox.popleft()
        c.received += data
        self.client_side(key, s.fw.delivered(cid, len(data)))
        return True

    def session_to_runner(self, key: int) -> bool:
        s = self.sessions.get(key)
        if s is None or not s.to_ct or key in self.paused:
            return False
        self.runner(self.ct.receive_from_session(key, s.to_ct.popleft()))
        return True

    def runner_to_session(self, key: int) -> bool:
        s = self.sessions.get(key)
        if s is None or not s.to_fw:
            return False
        action = s.to_fw.popleft()
        if action.needs_ack:
            self.runner(self.ct.written(action))
        self.client_side(key, s.fw.receive_frame(action.data, self.now))
        return True

    def runner_to_tc(self) -> bool:
        if not self.to_tc:
            return False
        action = self.to_tc.popleft()
        if action.needs_ack:
            self.runner(self.ct.written(action))
        self.container_side(self.tc.receive_frame(action.data, self.now))
        return True

    def tc_to_runner(self) -> bool:
        if not self.to_ct or None in self.paused:
            return False
        self.runner(self.ct.receive_from_container(self.to_ct.popleft(), self.now))
        return True

    def service_step(self, cid: int) -> bool:
        svc = self.services.get(cid)
        if svc is None:
            return False
        if not svc.accepted:
            svc.accepted = True
            self.container_side(self.tc.connected(cid))
            return True
        if svc.inbox and not self.services_stalled:
            data = svc.inbox.popleft()
            svc.outbox += data
            self.container_side(self.tc.delivered(cid, len(data)))
            if svc.closing and not svc.inbox:
                del self.services[cid]
            return True
        if svc.closing or svc.eof_sent:
            return False
        if svc.outbox:
            credit = self.tc.send_credit(cid)
            n = min(self.chunk, len(svc.outbox), self.chunk if credit is None else credit)
            if n == 0:
                return False
            data = bytes(svc.outbox[:n])
            del svc.outbox[:n]
            self.container_side(self.tc.data_read(cid, data))
            return True
        if svc.eof_in and not svc.inbox:  # everything read was echoed first
            svc.eof_sent = True
            self.container_side(self.tc.eof(cid))
            return True
        return False

    # -- driving ---------------------------------------------------------------------------------------

    def transport_steps(self) -> list:
        steps: list = [self.runner_to_tc, self.tc_to_runner]
        for key, s in self.sessions.items():
            steps += [lambda k=key: self.session_to_runner(k), lambda k=key: self.runner_to_session(k)]
            for cid in s.clients:
                steps += [
                    lambda k=key, c=cid: self.client_send(k, c),
                    lambda k=key, c=cid: self.client_deliver(k, c),
                ]
        steps += [lambda c=cid: self.service_step(c) for cid in self.services]
        return steps

    def step(self, choice: int) -> bool:
        steps = self.transport_steps()
        return steps[choice % len(steps)]()

    def drain(self, limit: int = 100_000) -> None:
        """Run every step round-robin until nothing moves any more."""
        for _ in range(limit):
            progress = False
            for step in self.transport_steps():
                progress |= step()
            self.check_bounds()
            if not progress:
                return
        raise AssertionError("no quiescence")

    def check_bounds(self) -> None:
        # Per-connection buffering in the container stays within the window the tunnel client announced
        # (or the legacy bound): nobody can push more into a stalled connection.
        link = self.tc.link
        for cid, svc in self.services.items():
            queued = sum(map(len, svc.inbox))
            bound = self.tc.window if link is not None and link.flow_control else self.tc.legacy_buffer_limit
            assert queued <= bound, (cid, queued, bound)
        # What the runner holds per connection from a sender without flow control: its bound, plus the one
        # message that crossed it (a sender with flow control is held to its window by the credit).
        limit = self.ct.legacy_buffer_limit + self.chunk
        for relay in (r for conn in self.ct._conns.values() for r in (conn.up, conn.down)):
            if relay.recv is None:
                assert relay.queued + relay.unwritten < limit, (relay.queued, relay.unwritten, limit)

    def all_clients(self):
        for key, s in itertools.chain(self.sessions.items(), ((None, s) for s in self.ended)):
            for cid, c in itertools.chain(s.clients.items(), s.done.items()):
                yield key, cid, c


def check_final(world: World, *, may_abort: bool) -> None:
    world.drain()
    assert world.ct.connection_count == 0
    assert world.tc.connections == []
    assert world.services == {}
    for s in itertools.chain(world.sessions.values(), world.ended):
        assert s.fw.connections == [] or all(not c.ready for c in s.clients.values())
    for _key, _cid, c in world.all_clients():
        if c.closed and not c.aborted:
            assert bytes(c.received) == c.payload  # intact echo: nothing misrouted, nothing lost
        else:
            assert may_abort, (c.reason, c.closed)
            assert c.payload.startswith(bytes(c.received))  # a prefix of its own echo, never another's


# -- deterministic scenarios ------------------------------------------------------------------------------


CONFIGS = {
    "all flow control, equal windows (pass-through)": {},
    "all flow control, windows differ (runner terminates)": dict(
        runner_window=700, client_window=1500, fw_window=300
    ),
    "legacy tunnel client": dict(client_hello=False),
    "legacy forwarder": dict(fw_hello=False),
    "everything legacy": dict(client_hello=False, fw_hello=False),
    "runner without flow control": dict(runner_fc=False),
    "forwarder flow control off but HELLO sent": dict(fw_fc=False),
    "tiny windows": dict(runner_window=7, client_window=5, fw_window=3, chunk=11),
    # A runner holding little for seed-protocol senders: they are paused (never cut) all the time.
    "legacy tunnel client, small runner buffer": dict(client_hello=False, runner_legacy_limit=700),
    "legacy forwarder, small runner buffer": dict(fw_hello=False, runner_legacy_limit=700),
    "everything legacy, small runner buffer": dict(
        client_hello=False, fw_hello=False, runner_legacy_limit=500
    ),
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_data_moves_end_to_end_for_several_sessions(config):
    world = World(**config)
    world.attach()
    for _ in range(3):
        world.open_session()
    for key in list(world.sessions):
        for size in (0, 1, 5000, 20000):
            world.open_conn(key, size)
    world.drain()
    check_final(world, may_abort=False)
    assert sum(1 for _ in world.all_clients()) == 12
    assert all(c.closed and not c.aborted and c.remote_eof for _, _, c in world.all_clients())


def test_a_stalled_reader_never_blocks_the_other_connections():
    world = World(runner_window=4096, client_window=4096, fw_window=4096, chunk=1024)
    world.attach()
    world.open_session()
    world.open_session()
    world.open_conn(1, 200_000)  # its local reader never reads
    world.open_conn(1, 200_000)
    world.open_conn(2, 200_000)
    world.stalled.add((1, 1))
    world.drain()
    s1, s2 = world.sessions[1], world.sessions[2]
    # Both other connections finished while the stalled one holds at most a window in every buffer.
    assert 2 in s1.done and not s1.done[2].aborted and bytes(s1.done[2].received) == s1.done[2].payload
    assert 1 in s2.done and not s2.done[1].aborted
    stalled = s1.clients[1]
    assert sum(map(len, stalled.inbox)) <= 4096
    for svc in world.services.values():
        assert sum(map(len, svc.inbox)) <= 4096
    assert all(len(a.data) <= frames.HEADER_SIZE + 4096 for a in s1.to_fw)  # nothing piled up for it
    world.stalled.clear()
    check_final(world, may_abort=False)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_session_end_closes_its_connections_everywhere_and_spares_the_others(config):
    world = World(**config)
    world.attach()
    world.open_session()
    world.open_session()
    for key in (1, 2):
        for _ in range(3):
            world.open_conn(key, 3000)
    for i in range(400):  # get things going
        world.step(i * 7919)
    world.end_session(1)
    check_final(world, may_abort=True)
    assert world.ended[0].clients == {} and len(world.ended[0].done) == 3  # each finished or aborted
    assert all(c.closed and not c.aborted for c in world.sessions[2].done.values())
    assert len(world.sessions[2].done) == 3


def test_detach_aborts_every_connection_and_a_new_tunnel_serves_the_old_sessions():
    world = World()
    world.attach()
    world.open_session()
    world.open_conn(1, 50_000)
    for i in range(200):
        world.step(i)
    world.detach()
    while world.runner_to_session(1):
        pass
    c = world.sessions[1].done[1]
    assert c.aborted and c.reason == "tunnel disconnected"
    assert world.ct.connection_count == 0 and world.tc.connections == [] and world.services == {}
    # While detached a CONNECT is refused at once; after re-attaching the same session works again.
    world.open_conn(1, 10)
    world.session_to_runner(1)
    world.runner_to_session(1)
    assert world.sessions[1].done[2].aborted and world.sessions[1].done[2].reason == "tunnel not connected"
    world.attach()
    world.open_conn(1, 10_000)
    check_final(world, may_abort=True)
    assert bytes(world.sessions[1].done[3].received) == world.sessions[1].done[3].payload


def test_tunnel_ids_wrap_around_end_to_end():
    world = World(first_id=frames.MAX_CLIENT_ID - 2)
    world.attach()
    world.open_session()
    for _ in range(6):
        world.open_conn(1, 500)
    check_final(world, may_abort=False)
    tids = sorted(c.tunnel_id for c in world.closed_by_runner)
    assert tids == [1, 2, 3, frames.MAX_CLIENT_ID - 2, frames.MAX_CLIENT_ID - 1, frames.MAX_CLIENT_ID]


# -- hypothesis: random interleavings of everything ---------------------------------------------------------

OPS = ["step"] * 12 + ["open_session", "end_session", "open_conn", "open_conn", "detach", "attach", "stall"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    config=st.sampled_from(list(CONFIGS.values())),
    ops=st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 10_000)), min_size=20, max_size=300),
)
def test_random_interleavings_keep_sessions_apart_and_close_everything(config, ops):
    world = World(**config)
    world.attach()
    for key in (1, 2):
        world.open_session()
        world.open_conn(key, 2000)
        world.open_conn(key, 1)
    for op, arg in ops:
        if op == "step":
            world.step(arg)
        elif op == "open_session":
            world.open_session()
        elif op == "end_session" and world.sessions:
            world.end_session(sorted(world.sessions)[arg % len(world.sessions)])
        elif op == "open_conn" and world.sessions:
            world.open_conn(sorted(world.sessions)[arg % len(world.sessions)], arg % 3000)
        elif op == "detach":
            world.detach()
        elif op == "attach":
            world.attach()
        elif op == "stall" and world.sessions:
            key = sorted(world.sessions)[arg % len(world.sessions)]
            if world.sessions[key].clients:
                world.stalled.add(
                    (key, sorted(world.sessions[key].clients)[arg % len(world.sessions[key].clients)])
                )
        world.check_bounds()
        # ids never collide: the runner's tunnel ids are exactly the open connections, one per (session, id)
        seen = set()
        for key in world.ct.sessions:
            for tid in world.ct.connections(key).values():
                assert tid not in seen
                seen.add(tid)
        assert len(seen) == world.ct.connection_count
    world.stalled.clear()
    check_final(world, may_abort=True)
    # Unless a tunnel or session dropped, every connection completed intact.
    for _key, _cid, c in world.all_clients():
        if c.aborted:
            assert c.reason in ("tunnel disconnected", "tunnel not connected", "session closed"), c.reason


@pytest.mark.parametrize("legacy", ["client_hello", "fw_hello"])
def test_a_seed_protocol_sender_far_ahead_of_a_slow_reader_is_paused_and_loses_nothing(legacy):
    # 200 KB each way per connection through a runner that holds at most 1000 bytes per connection from
    # the seed-protocol side: that side is paused hundreds of times and every echo still arrives intact.
    world = World(**{legacy: False}, runner_legacy_limit=1000, runner_window=512, client_window=512,
                  fw_window=512, chunk=900)  # fmt: skip
    world.attach()
    world.open_session()
    world.open_session()
    for key in (1, 2):
        world.open_conn(key, 200_000)
        world.open_conn(key, 200_000)
    for i in range(200):  # the readers at both ends stop for a while, then read again
        stop = i % 2 == 0
        world.stalled = {(k, c) for k, s in world.sessions.items() for c in s.clients} if stop else set()
        world.services_stalled = stop
        for j in range(200):
            world.step(i * 7919 + j * 104_729)
    world.stalled, world.services_stalled = set(), False
    check_final(world, may_abort=False)
    assert world.pauses > 50
    assert all(c.closed and not c.aborted for _, _, c in world.all_clients())


def test_receive_window_type_is_used_for_flow_controlled_links():
    # Guard for the harness: with flow control everywhere the tunnel client's connections use windows.
    world = World()
    world.attach()
    world.open_session()
    world.open_conn(1, 10)
    for _ in range(10):
        world.runner_to_tc() or world.tc_to_runner() or world.session_to_runner(1) or world.runner_to_session(
            1
        )
    assert world.tc.link.flow_control and world.ct.link.flow_control
    conn = world.tc._conns[next(iter(world.tc._conns))]
    assert type(conn.recv) is ReceiveWindow and conn.send.window == world.ct.window
    assert MsgType.WINDOW == 9
