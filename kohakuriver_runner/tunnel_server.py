"""The runner's tunnel server: one ``ContainerTunnel`` per container, bound to WebSockets.

Two kinds of peers meet here (``api_ws.py`` hands their WebSockets over):

- the tunnel client inside a container (``/ws/tunnel/{container}``), at most one per container: a second one
  replaces the first (the old WebSocket is closed, the machine detached, then attached to the new one);
- forward sessions from the host (``/ws/forward/{container}/{port}``), any number per container.

All protocol logic is ``kohakuriver_proto.container_tunnel.ContainerTunnel``; this module only routes its
actions. Every peer has one writer task fed by a queue (``_Peer``; ``WriteLanes`` puts small frames of
otherwise idle connections ahead of bulk data): the machine's actions are queued without waiting, so a slow
or stalled peer never blocks the container's other sessions nor the tunnel. The machine's flow control
bounds what it hands out per connection; ``MAX_PEER_QUEUE`` is the backstop for a peer that stops reading
its WebSocket altogether: it is closed rather than buffered without limit.

A peer without flow control (a seed-protocol tunnel client or forward client) is slowed, not cut: when the
machine says ``PauseReading`` the peer's reader finishes the message in hand and then waits for
``ResumeReading`` instead of receiving (TCP pushes back on the sender). Its writer goes on, so it still
hears PINGs and gets what is sent to it; the wait is in the peer's cancel scope, so a detach, a replacing
tunnel client or the end of the task ends it like any other wait.

A container's tunnel lives as long as the runner holds the task: ``container_ended`` (called by the executor
when the container stops) drops it: every connection gets ERROR "task ended", the sessions are closed with
1011, the tunnel client's WebSocket with 1001.

VM VPSes use the same server: inside a VM the tunnel client runs with ``--agent`` and is the guest agent. Its
heartbeats are TEXT messages on the tunnel client's WebSocket (the tunnel protocol is binary only), parsed
with ``kohakuriver_proto.agent`` and handed to ``on_agent_heartbeat``; they never reach the machine. With
``on_tunnel_attached`` / ``on_tunnel_detached`` the VM manager feeds its ``AgentWatch``. A VM is not a Docker
container: its ``HeldContainer.address`` (the address the runner gave it) is what the tunnel client's
connection must come from, where a container's address is asked of Docker.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import attrs
import trio

from kohakuriver_net.websocket import ConnectionClosed as WebSocketClosed
from kohakuriver_proto.agent import AgentHeartbeat, UnknownAgentMessage, parse_agent_message
from kohakuriver_proto.container_tunnel import (
    ConnectionClosed,
    ContainerTunnel,
    PauseReading,
    ResumeReading,
    SendToContainer,
    SendToSession,
    TunnelDead,
)
from kohakuriver_proto.errors import ProtocolError, RemoteProtocolError
from kohakuriver_proto.frames import Proto
from kohakuriver_proto.session_opening import RefusalCode, forward_refusal
from kohakuriver_proto.write_lanes import WriteLanes, lane_of

from .container_spec import TunnelInjection, tunnel_url
from .docker_api import DockerClient, DockerError
from .runner_settings import RunnerSettings
from .tunnel_secret import container_secret, secret_matches

__all__ = [
    "ATTACH_WAIT",
    "MAX_PEER_QUEUE",
    "ForwardRefused",
    "HeldContainer",
    "TunnelClientLocator",
    "TunnelServer",
]

log = logging.getLogger("kohakuriver.runner.tunnel")

#: A forward session waits this long for the container's tunnel client (a fresh container needs a moment).
ATTACH_WAIT = 5.0
#: Bytes queued towards one peer, beyond what flow control lets its connections have in flight
#: (``ContainerTunnel.queue_bound``), before it counts as not reading and is closed: the margin for frame
#: headers and control frames. It guards against a peer that stopped reading its WebSocket.
MAX_PEER_QUEUE = 64 * 1024 * 1024
#: A writer takes at most about this much of its queue per write (when its WebSocket can batch): a bulk
#: frame (256 KiB) goes alone, small ones together. A frame that arrives in the express lane while a
#: write is under way waits for that write to finish, and the socket takes only what it can send
#: (``tune_for_tunnel``), so a larger batch would only make it wait longer (1 MiB: 2-4 ms under load).
MAX_BATCH_BYTES = 128 * 1024
#: Keepalive: PING the tunnel client this often; it is dead after ``DEAD_AFTER`` silent intervals. The Rust
#: client pings every 10 s and gives up on a runner after 30 s of silence, so 10 s keeps both sides alive.
PING_INTERVAL = 10.0
DEAD_AFTER = 3
TICK = 1.0
DISABLED = "port forwarding is disabled on this runner (TUNNEL_ENABLED = False)"
#: WebSocket close codes.
NORMAL, GOING_AWAY, PROTOCOL_ERROR, INTERNAL = 1000, 1001, 1002, 1011


@attrs.frozen
class HeldContainer:
    """A container of a task this runner holds (what ``/ws/forward/{container}`` may name)."""

    task_id: int
    name: str
    running: bool  # running or paused; False while preparing or finishing
    status: str = "running"
    #: A VM's address (the runner assigned it): the tunnel client must connect from there. None: a Docker
    #: container, whose address on the task network is asked of Docker.
    address: str | None = None


#: Finds the container a forward or tunnel request names (a decimal task id or a container name).
ContainerDirectory = Callable[[str], "HeldContainer | None"]
#: Called with a container's name (and the heartbeat) from the tunnel client's reader: must not block.
HeartbeatHook = Callable[[str, AgentHeartbeat], None]
TunnelHook = Callable[[str], None]


def _ignore(*_args: Any) -> None:
    return None


class ForwardRefused(Exception):
    """A forward session cannot start: send ``Error: <message>`` and close as ``code`` says (its close code,
    and its name as the close reason: ``kohakuriver_proto.session_opening``)."""

    def __init__(self, code: RefusalCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class TunnelClientLocator:
    """Finds the tunnel-client binary, and checks once per binary version that it has the ``--exec`` mode
    (and, for VMs, ``--agent``).

    The check matters because the runner makes the binary the container's entrypoint: an older build without
    ``--exec`` would make every task fail at start, where no tunnel at all only disables forwarding. A VM runs
    it as ``tunnel-client --agent``: a build without it would exit at once, over and over, in every VM.
    """

    def __init__(self, config: RunnerSettings) -> None:
        self.config = config
        self._checked: dict[tuple[str, int, int], frozenset[str]] = {}
        self._warned: set[str] = set()
        self.problem: str | None = None

    async def find(self, *, agent: bool = False) -> Path | None:
        """The binary to inject, or None (``problem`` says why; a warning is logged once per reason).
        ``agent``: the binary for a VM, which must also have ``--agent`` (a build without it gives None and
        a warning, and leaves ``problem``, which is about containers, alone)."""
        if not self.config.TUNNEL_ENABLED:
            self.problem = DISABLED
            return None
        found = await trio.to_thread.run_sync(_find_with_stat, self.config)
        if found is None:
            where = ", ".join(str(p) for p in self.config.tunnel_client_candidates)
            return self._fail(f"no tunnel-client binary on this runner (looked in {where})")
        path, version = found
        modes = self._checked.get(version)
        if modes is None:
            modes = await _modes(path)
            self._checked[version] = modes
        if "--exec" not in modes:
            return self._fail(f"the tunnel-client at {path} has no --exec mode (rebuild it)")
        self.problem = None
        if agent and "--agent" not in modes:
            self._warn(
                f"the tunnel-client at {path} has no --agent mode (rebuild it): VMs run without an agent"
            )
            return None
        return path

    def _fail(self, problem: str) -> None:
        self.problem = problem
        self._warn(f"{problem}: tasks run without port forwarding")
        return None

    def _warn(self, text: str) -> None:
        if text not in self._warned:
            self._warned.add(text)
            log.warning("%s", text)


def _find_with_stat(config: RunnerSettings) -> tuple[Path, tuple[str, int, int]] | None:
    path = config.find_tunnel_client()
    if path is None:
        return None
    st = os.stat(path)
    return path, (str(path), st.st_mtime_ns, st.st_size)


#: The modes ``TunnelClientLocator`` looks for in ``tunnel-client --help``.
_MODES = ("--exec", "--agent")


async def _modes(path: Path) -> frozenset[str]:
    """Which of ``_MODES`` the binary's ``--help`` names (none when it cannot be run)."""
    try:
        with trio.move_on_after(10):
            result = await trio.run_process(
                [str(path), "--help"], capture_stdout=True, capture_stderr=True, check=False
            )
            words = set(result.stdout.split())
            return frozenset(mode for mode in _MODES if mode.encode() in words)
    except OSError as exc:
        log.warning("cannot run %s: %s", path, exc)
        return frozenset()
    log.warning("%s --help did not answer within 10 s", path)
    return frozenset()


# -- peers -------------------------------------------------------------------------------------------------


class _CloseMarker:
    __slots__ = ("code", "reason")

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason


class _Peer:
    """One WebSocket: the queue of what to write to it (``WriteLanes``: interactive frames ahead of bulk
    data, each connection's frames in order), its writer task, whether its reader may read (``paused``)
    and how it is to be closed."""

    __slots__ = (
        "_idle", "_lot", "_resumed", "_send_now", "bound", "close_code", "close_reason", "closing", "label",
        "paused", "queue", "queued", "scope", "ws",
    )  # fmt: skip

    def __init__(self, ws: Any, label: str, bound: Callable[[], int]) -> None:
        self.ws = ws
        self.label = label
        self.bound = bound  # what flow control allows in flight towards this peer now
        self.queue = WriteLanes()
        self.queued = 0
        self._lot = trio.lowlevel.ParkingLot()
        self._idle = False  # the writer is parked with nothing to write
        self._send_now = getattr(ws, "send_now", None)  # the lean WebSocket's; Quart's (TLS) has none
        self.scope = trio.CancelScope()
        self.closing = False
        self.close_code = NORMAL
        self.close_reason = ""
        self.paused = False
        self._resumed = trio.Event()

    def pause(self) -> None:
        if not self.paused:
            self.paused = True
            self._resumed = trio.Event()

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            self._resumed.set()

    async def wait_resumed(self) -> None:
        """Until ``resume`` (cancelled with the peer's scope like every other wait of the peer)."""
        while self.paused:
            await self._resumed.wait()

    def push(self, action: Any) -> None:
        if self.closing:
            return
        if (
            self._idle
            and not self.queue
            and not action.needs_ack
            and self._send_now is not None
            and self._send_now(action.data)
        ):
            # Written from here, the writer idle and nothing queued: an interactive message skips a task
            # switch (and a pass through the scheduler) on its way.
            if self.ws.backlogged:
                self._lot.unpark_all()
            return
        key, small = lane_of(action.data)
        self.queue.push(action, key, small)
        self.queued += len(action.data)
        if self.queued > MAX_PEER_QUEUE and self.queued > MAX_PEER_QUEUE + self.bound():
            log.warning("%s: %d bytes queued, it is not reading: closed", self.label, self.queued)
            self.close(INTERNAL, "peer not reading")
            return
        self._lot.unpark_all()

    def close(self, code: int, reason: str) -> None:
        """Close now (whatever is still queued is dropped)."""
        if not self.closing:
            self.closing = True
            self.close_code, self.close_reason = code, reason
        self.scope.cancel()

    def close_after_queue(self, code: int, reason: str) -> None:
        """Close once everything queued so far has been written."""
        if not self.closing:
            self.queue.push_last(_CloseMarker(code, reason))
            self._lot.unpark_all()

    async def write_loop(self, written: Callable[[Any], None]) -> None:
        queue = self.queue
        send = self.ws.send
        # The lean WebSocket (tunnel_door) writes a run of queued messages in one system call; Quart's
        # (TLS) one message at a time.
        send_batch = getattr(self.ws, "send_batch", None)
        flush = self.ws.flush if self._send_now is not None else None  # the lean WebSocket only
        try:
            while True:
                while not queue:
                    if flush is not None and self.ws.backlogged:
                        await flush()
                        continue
                    self._idle = True
                    try:
                        await self._lot.park()
                    finally:
                        self._idle = False
                if send_batch is not None and type(queue.first()) is not _CloseMarker:
                    batch = []
                    size = 0
                    while queue and size < MAX_BATCH_BYTES and type(queue.first()) is not _CloseMarker:
                        action = queue.popleft()
                        batch.append(action)
                        size += len(action.data)
                    self.queued -= size
                    await send_batch([action.data for action in batch])
                    for action in batch:
                        if action.needs_ack:
                            written(action)
                    continue
                action = queue.popleft()
                if type(action) is _CloseMarker:
                    self.close(action.code, action.reason)
                    return
                self.queued -= len(action.data)
                await send(action.data)
                if action.needs_ack:
                    written(action)
        except WebSocketClosed:  # the connection is gone: so is the peer
            self.scope.cancel()

    async def finish(self) -> None:
        """After the peer's scope: close the WebSocket with the recorded code (if it is still open)."""
        code = self.close_code if self.closing else NORMAL
        reason = self.close_reason.encode()[:120].decode("utf-8", "ignore")
        try:
            with trio.move_on_after(2):
                await self.ws.close(code, reason)
        except Exception:  # already closed by the other side, or by the server shutting down
            pass


class _Tunnel:
    """One container's machine and the peers bound to it."""

    __slots__ = ("attached", "client_ip", "dropped", "machine", "malformed", "name", "sessions", "tunnel")

    def __init__(self, name: str) -> None:
        self.name = name
        self.malformed = 0  # malformed agent messages, to keep a broken agent from flooding the log
        self.machine = ContainerTunnel(name, ping_interval=PING_INTERVAL, dead_after=DEAD_AFTER)
        self.tunnel: _Peer | None = None
        self.sessions: dict[Hashable, _Peer] = {}
        self.attached = trio.Event()
        self.dropped = False
        self.client_ip: str | None = None


# -- the server --------------------------------------------------------------------------------------------


class TunnelServer:
    """The registry of container tunnels. Run ``run`` (the keepalive ticker) in the daemon's nursery.

    Hooks (settable attributes, or keyword arguments; each called with the container's name from a reader
    task, so it must return at once; an exception is logged and costs nothing else):
    ``on_agent_heartbeat(name, heartbeat)`` for each valid agent heartbeat, ``on_tunnel_attached(name)``
    when a tunnel client's WebSocket is accepted and ``on_tunnel_detached(name)`` when it ends (a replacing
    client: detached, then attached).
    """

    def __init__(
        self,
        config: RunnerSettings,
        docker: DockerClient,
        key: bytes | None,
        *,
        on_agent_heartbeat: HeartbeatHook = _ignore,
        on_tunnel_attached: TunnelHook = _ignore,
        on_tunnel_detached: TunnelHook = _ignore,
    ) -> None:
        self.config = config
        self.docker = docker
        self.key = key
        self.locator = TunnelClientLocator(config)
        self.directories: list[ContainerDirectory] = []
        self.on_agent_heartbeat = on_agent_heartbeat
        self.on_tunnel_attached = on_tunnel_attached
        self.on_tunnel_detached = on_tunnel_detached
        self._tunnels: dict[str, _Tunnel] = {}
        self._session_ids = 0

    # -- injection (called by whoever creates a container) -------------------------------------------------

    async def injection(self, container: str, gateway: str | None = None) -> TunnelInjection | None:
        """What to inject into the container named ``container``; None: run it without a tunnel.
        ``gateway``: the runner's address on the container's network, when that is not the task network
        (the overlay's gateway)."""
        if self.key is None:
            return None
        path = await self.locator.find()
        if path is None:
            return None
        return TunnelInjection(
            client_path=str(path),
            url=tunnel_url(self.config, gateway),
            secret=container_secret(self.key, container),
        )

    # -- lookups -------------------------------------------------------------------------------------------

    def lookup(self, ref: str) -> HeldContainer | None:
        for directory in self.directories:
            held = directory(ref)
            if held is not None:
                return held
        return None

    def _entry(self, name: str) -> _Tunnel:
        entry = self._tunnels.get(name)
        if entry is None:
            entry = self._tunnels[name] = _Tunnel(name)
        return entry

    async def _container_ip(self, entry: _Tunnel, held: HeldContainer) -> str | None:
        if held.address is not None:  # a VM: the runner gave it its address
            return _normal_ip(held.address)
        if entry.client_ip is None:
            info = await self.docker.inspect(entry.name)
            # The address on the network the container is on: the task network, or the overlay's (where
            # its tunnel client reaches the runner at the overlay gateway).
            entry.client_ip = (
                info.networks.get(self.config.DOCKER_NETWORK_NAME)
                or info.networks.get(self.config.OVERLAY_NETWORK_NAME)
                or None
            )
        return entry.client_ip

    # -- the keepalive -------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(TICK)
            now = trio.current_time()
            for name, entry in list(self._tunnels.items()):
                if entry.tunnel is None and not entry.sessions:
                    held = self.lookup(name)
                    if held is None or not held.running:
                        # A tunnel client that attached as its container was ending: nothing to drop.
                        del self._tunnels[name]
                        continue
                self._dispatch(entry, entry.machine.tick(now))

    # -- the executor's hook -------------------------------------------------------------------------------

    def container_ended(self, name: str) -> None:
        """The container stopped (or the runner let go of its task): drop its tunnel. Idempotent."""
        entry = self._tunnels.pop(name, None)
        if entry is None:
            return
        entry.dropped = True
        if entry.machine.attached:
            self._dispatch(entry, entry.machine.detach("task ended"))
        if entry.tunnel is not None:
            entry.tunnel.close(GOING_AWAY, "task ended")
            entry.tunnel = None
            self._hook(self.on_tunnel_detached, name)
        for peer in entry.sessions.values():
            peer.close_after_queue(INTERNAL, "task ended")
        entry.attached.set()  # wake sessions waiting for an attach: they find the tunnel dropped
        log.info("tunnel of %s dropped: the task ended", name)

    # -- routing actions -----------------------------------------------------------------------------------

    def _dispatch(self, entry: _Tunnel, actions: list) -> None:
        for action in actions:
            kind = type(action)
            if kind is SendToSession:
                peer = entry.sessions.get(action.session)
                if peer is not None:
                    peer.push(action)
            elif kind is SendToContainer:
                if entry.tunnel is not None:
                    entry.tunnel.push(action)
            elif kind is PauseReading or kind is ResumeReading:
                peer = entry.tunnel if action.peer is None else entry.sessions.get(action.peer)
                if peer is not None:
                    if kind is PauseReading:
                        peer.pause()
                    else:
                        peer.resume()
            elif kind is TunnelDead:
                log.warning("tunnel client of %s: %s; disconnecting it", entry.name, action.reason)
                self._detach(entry, INTERNAL, action.reason)
            elif kind is ConnectionClosed and action.reason is not None:
                log.debug("%s: connection %s closed: %s", entry.name, action.tunnel_id, action.reason)

    def _written(self, entry: _Tunnel) -> Callable[[Any], None]:
        def written(action: Any) -> None:
            if not entry.dropped:
                self._dispatch(entry, entry.machine.written(action))

        return written

    def _detach(self, entry: _Tunnel, code: int, reason: str) -> None:
        peer = entry.tunnel
        if peer is None:
            return
        entry.tunnel = None
        peer.close(code, reason)
        entry.attached = trio.Event()
        self._dispatch(entry, entry.machine.detach())
        self._hook(self.on_tunnel_detached, entry.name)

    # -- the guest agent (text on the tunnel client's WebSocket) ---------------------------------------------

    def _hook(self, hook: Callable[..., None], *args: Any) -> None:
        try:
            hook(*args)
        except Exception:  # the VM manager's bug must not end the tunnel
            log.exception("tunnel hook %s failed", getattr(hook, "__name__", hook))

    def _agent_text(self, entry: _Tunnel, text: str) -> None:
        """One TEXT message of a tunnel client: an agent heartbeat, a message type for a newer runner
        (ignored) or garbage (logged, at a falling rate, and ignored: it never closes the tunnel)."""
        try:
            message = parse_agent_message(text)
        except ProtocolError as exc:
            entry.malformed += 1
            if entry.malformed <= 5 or entry.malformed & (entry.malformed - 1) == 0:
                log.warning(
                    "%s: ignoring a malformed agent message (%d so far): %s", entry.name, entry.malformed, exc
                )
            return
        if type(message) is UnknownAgentMessage:
            log.debug("%s: ignoring an agent message of type %r", entry.name, message.type)
            return
        self._hook(self.on_agent_heartbeat, entry.name, message)

    # -- /ws/tunnel/{container} ----------------------------------------------------------------------------

    async def check_tunnel_client(
        self, name: str, authorization: str, peer_ip: str
    ) -> tuple[int, str] | None:
        """Why this tunnel client may not attach ((status, message)), or None when it may."""
        if self.key is None:
            return 403, "port forwarding is disabled on this runner"
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer" or not secret_matches(self.key, name, given.strip()):
            return 401, "missing or wrong tunnel secret"
        held = self.lookup(name)
        if held is None or held.name != name or not held.running:
            return 404, f"this runner runs no container named {name[:100]}"
        try:
            expected = await self._container_ip(self._entry(name), held)
        except DockerError as exc:
            return 403, f"cannot check the container's address: {exc}"
        if expected is None or _normal_ip(peer_ip) != expected:
            return 403, "the connection does not come from the container's address"
        return None

    async def serve_tunnel_client(self, name: str, ws: Any) -> None:
        """Drive the accepted tunnel client WebSocket of container ``name`` until it or the task ends."""
        entry = self._tunnels.get(name)
        if entry is None or entry.dropped:
            entry = self._entry(name)
        peer = _Peer(ws, f"tunnel client of {name}", entry.machine.queue_bound)
        if entry.tunnel is not None:
            log.info("%s: a new tunnel client replaces the attached one", name)
            self._detach(entry, NORMAL, "replaced by a new tunnel client connection")
        entry.tunnel = peer
        machine = entry.machine
        self._dispatch(entry, machine.attach(trio.current_time()))
        entry.attached.set()
        log.info("%s: tunnel client attached", name)
        self._hook(self.on_tunnel_attached, name)
        try:
            await self._pump(
                entry,
                peer,
                lambda data: machine.receive_from_container(data, trio.current_time()),
                lambda text: self._agent_text(entry, text),
            )
        finally:
            if entry.tunnel is peer:
                self._detach(entry, NORMAL, "")
                log.info("%s: tunnel client detached", name)
        await peer.finish()

    # -- /ws/forward/{container}/{port}?proto= -------------------------------------------------------------

    def check_forward(self, ref: str, port_text: str, proto_text: str) -> tuple[HeldContainer, int, Proto]:
        """Validate a forward request; raises ``ForwardRefused``."""
        if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 0xFFFF:
            raise ForwardRefused(
                RefusalCode.BAD_REQUEST, f"port must be a number from 1 to 65535, got {port_text[:20]!r}"
            )
        try:
            proto = Proto.parse(proto_text)
        except ValueError:
            raise ForwardRefused(
                RefusalCode.BAD_REQUEST, f"proto must be tcp or udp, got {proto_text[:20]!r}"
            ) from None
        held = self.lookup(ref)
        if held is None:
            raise ForwardRefused(RefusalCode.NOT_FOUND, f"this runner holds no task or container {ref[:100]}")
        if not held.running:
            raise ForwardRefused(
                RefusalCode.NOT_RUNNING, f"task {held.task_id} is not running ({held.status})"
            )
        if self.key is None or not self.config.TUNNEL_ENABLED:
            raise ForwardRefused(RefusalCode.FORWARD_DISABLED, DISABLED)
        return held, int(port_text), proto

    async def serve_forward(
        self, ref: str, port_text: str, proto_text: str, ws: Any, *, answer_by: float | None = None
    ) -> None:
        """Run one forward session on the accepted WebSocket ``ws``; a tunnel client that is not attached is
        waited for until ``ATTACH_WAIT`` or ``answer_by`` (``trio.current_time()``), whichever is sooner."""
        try:
            held, port, proto = self.check_forward(ref, port_text, proto_text)
            entry = await self._wait_attached(held, answer_by)
        except ForwardRefused as refused:
            await _refuse(ws, refused)
            return
        self._session_ids += 1
        key = self._session_ids
        machine = entry.machine
        label = f"forward session {key} to {held.name}:{port}/{proto.name.lower()}"
        peer = _Peer(ws, label, lambda: machine.queue_bound(key))
        machine.open_session(key, proto, port)
        entry.sessions[key] = peer
        try:
            # The text CONNECTED goes before any binary message: the writer starts only after it.
            await ws.send("CONNECTED")
            # Once the tunnel is dropped the writer sends what is queued, then closes the session: what the
            # user still sends goes nowhere.
            await self._pump(
                entry, peer, lambda data: [] if entry.dropped else machine.receive_from_session(key, data)
            )
        finally:
            entry.sessions.pop(key, None)
            if not entry.dropped:
                self._dispatch(entry, machine.end_session(key))
        await peer.finish()

    async def _pump(
        self,
        entry: _Tunnel,
        peer: _Peer,
        feed: Callable[[bytes], list],
        text: Callable[[str], None] | None = None,
    ) -> None:
        """Run ``peer``'s writer beside its reader, which hands each binary message to ``feed`` (a machine's
        receive) and routes the actions it returns; a protocol error closes the peer with 1002. Text is
        not the tunnel's: it goes to ``text`` (the tunnel client's agent messages), and means nothing after
        CONNECTED on a forward session (quart-trio gives None for b""). While the machine has the peer
        paused the reader waits instead of receiving."""
        with peer.scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(peer.write_loop, self._written(entry))
                receive = peer.ws.receive
                while True:
                    if peer.paused:
                        await peer.wait_resumed()
                    try:
                        data = await receive()
                    except WebSocketClosed:  # the lean WebSocket's end (Quart's cancels the handler)
                        peer.scope.cancel()
                        break
                    if type(data) is str or data is None:
                        if text is not None and data:
                            text(data)
                        continue
                    try:
                        out = feed(data)
                    except RemoteProtocolError as exc:
                        log.warning("%s broke the protocol: %s", peer.label, exc)
                        peer.close(PROTOCOL_ERROR, str(exc))
                        break
                    if out:
                        self._dispatch(entry, out)

    async def _wait_attached(self, held: HeldContainer, answer_by: float | None) -> _Tunnel:
        give_up = trio.current_time() + ATTACH_WAIT
        with trio.move_on_at(give_up if answer_by is None else min(give_up, answer_by)):
            while True:
                entry = self._entry(held.name)
                if entry.machine.attached:
                    return entry
                await entry.attached.wait()
                if entry.dropped:
                    raise ForwardRefused(RefusalCode.TUNNEL_UNAVAILABLE, f"task {held.task_id} ended")
        if self.locator.problem is not None:
            raise ForwardRefused(RefusalCode.TUNNEL_UNAVAILABLE, self.locator.problem)
        raise ForwardRefused(
            RefusalCode.TUNNEL_UNAVAILABLE, f"tunnel client not connected for task {held.task_id}"
        )


async def _refuse(ws: Any, refused: ForwardRefused) -> None:
    try:
        with trio.move_on_after(2):
            opening = forward_refusal(refused.code, refused.message)
            await ws.send(opening.text)
            await ws.close(opening.close_code, opening.close_reason)
    except Exception:  # the other side is already gone
        pass


def _normal_ip(text: str) -> str:
    """``text`` as the engine writes container addresses (IPv4-mapped IPv6 unwrapped)."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return text
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)
