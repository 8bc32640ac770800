"""The host's overlay network: which runner has which overlay id, the host's links to them, the settings
check at registration, mesh peers, and reserved addresses.

**Runner ids** live in the store (``overlay_runners``): a runner keeps its id across host restarts and
underlay address changes (it is found by hostname); a new runner gets the lowest free id; an id is freed
only when its node is removed (``DELETE /api/nodes/{hostname}``), never taken from a runner that is merely
offline (its containers' addresses are in that subnet). An id the current ``OVERLAY_SUBNET`` does not have
(fewer NODE_BITS than before) is dropped at start; that runner gets a new one when it registers again.

**Links**: the store's ids and underlay addresses are the wanted state; ``OverlayLinks.reconcile`` makes the
kernel match at start, after every registration that changed something, and every
``RECONCILE_INTERVAL_SECONDS`` (repairs what someone removed, retries what failed). A host restart thus
changes nothing that works. With ``OVERLAY_ENABLED`` off, the host removes its links once if it finds them
(and nothing else: the ids stay for when it is turned on again).

**Registration**: the runner's ``OVERLAY_*`` settings must equal the host's (``settings_mismatch``; a runner
with the overlay off at a host with it on, and the reverse, are mismatches too): otherwise ``409`` with every
difference, and nothing is stored. The runner's underlay address is ``NodeRegistration.underlay_address``,
else the host part of its URL. If that cannot work (a loopback address on one side only, a name that does
not resolve, no free id) the registration succeeds with ``overlay_error`` saying why instead of an
assignment that would silently carry nothing. A runner whose underlay address is the host's own
(``kr up``: one machine, one namespace) gets its assignment but no VXLAN link: its bridge is the host's.

**Mesh peers**: in mesh mode the assignment lists every other runner with an id; heartbeat answers carry
the list again when it changed since that runner last got it, and at least every
``PEERS_RESEND_SECONDS`` (an answer may be lost), else nothing (the runner keeps what it has).

**Reservations** (``overlay_reservations``): an address of a node's container range for a TTL, named by a
signed token (``kohakuriver_proto.overlay.sign_reservation``; the key is made once and kept in the store's
meta, so tokens survive host restarts). A reservation is held while unused and unexpired, or while the task
using it has not ended: any final status releases it, with no hook on every path that ends a task (the
store's query decides, ``ReservationRow.live``). Addresses in use are never handed out: live reservations,
every address a task that has not ended has (reported ``overlay_ip``, reserved ``reserved_ip``), and the
gateway and host addresses (outside ``is_container_address``). Free addresses are taken from the top of the
range: Docker's IPAM hands out the bottom first.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import secrets
import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import attrs
import trio

from kohakuriver_proto.converter import unstructure
from kohakuriver_proto.models import NodeRegistration
from kohakuriver_proto.models.overlay import (
    IpReservation,
    OverlayAssignment,
    OverlayMode,
    OverlayPeer,
    OverlayRunnerView,
    OverlaySettingsView,
    OverlayStatus,
    ReserveRequest,
)
from kohakuriver_proto.overlay import (
    ReservationClaim,
    build_assignment,
    container_range,
    host_overlay_address,
    is_container_address,
    link_name,
    max_runners,
    runner_subnet,
    settings_mismatch,
    sign_reservation,
    verify_reservation,
)
from kohakuriver_proto.targets import Target

from .api_common import ApiProblem, conflict, invalid, not_found
from .auth import Forbidden, Principal, Role
from .host_settings import HostSettings
from .node_registry import NodeRegistry
from .overlay_links import OverlayLinkError, OverlayLinks
from .store import OverlayRunnerRow, ReservationRow, Store, WriteTx
from .stored_task import StoredTask

log = logging.getLogger("kohakuriver.host.overlay")

#: The store's meta key of the reservation signing key (hex).
KEY_META = "overlay_reservation_key"
KEY_BYTES = 32
RECONCILE_INTERVAL_SECONDS = 60.0
PEERS_RESEND_SECONDS = 60.0
RESOLVE_TIMEOUT_SECONDS = 5.0
_FIELD = "ip_token"

__all__ = [
    "KEY_META",
    "OverlayService",
    "Registered",
    "check_settings",
    "mismatch_reasons",
]


def mismatch_reasons(host: OverlaySettingsView, runner: OverlaySettingsView | None) -> list[str]:
    """Why a runner with ``runner`` settings (None: it sent none, an older runner or the overlay off) may
    not join a host with ``host``'s: every differing ``OVERLAY_*`` value. Empty when both are off."""
    if runner is None:
        if not host.enabled:
            return []
        return ["OVERLAY_ENABLED: host True, runner False (it sent no overlay settings)"]
    return settings_mismatch(host, runner)


def check_settings(host: OverlaySettingsView, reg: NodeRegistration) -> None:
    """``mismatch_reasons`` as the 409 that refuses the registration (field ``overlay``)."""
    reasons = mismatch_reasons(host, reg.overlay)
    if reasons:
        raise ApiProblem(
            409,
            "conflict",
            f"node {reg.hostname}: its overlay settings differ from the host's ({'; '.join(reasons)}):"
            " make them equal in the runner's configuration",
            "overlay",
        )


def _iso(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.UTC)


@attrs.frozen
class Registered:
    """What the registration answer says about the overlay: an assignment or why there is none."""

    assignment: OverlayAssignment | None = None
    error: str | None = None


class OverlayService:
    """The overlay of one host process. Built by the daemon (``start`` before the API serves, ``run`` in its
    nursery); ``links`` is where the host's links live (None: the host's own namespace, made on ``start``),
    tests give one bound to a network namespace."""

    def __init__(
        self,
        config: HostSettings,
        store: Store,
        nodes: NodeRegistry,
        *,
        links: OverlayLinks | None = None,
        clock: Callable[[], float],
    ) -> None:
        self.config = config
        self.store = store
        self.nodes = nodes
        self.clock = clock
        self.settings = OverlaySettingsView.from_config(config)
        self.enabled = config.OVERLAY_ENABLED
        self.plan = config.overlay_subnet
        self.mode = config.OVERLAY_MODE
        self.local = ipaddress.IPv4Address(config.HOST_REACHABLE_ADDRESS) if self.enabled else None
        self._links = links
        self._key: bytes | None = None
        #: hostname -> its row (a copy of the store's table; only this process writes it).
        self._runners: dict[str, OverlayRunnerRow] = {}
        #: runner id -> why its link is not in place after the last reconcile (absent: it is).
        self._link_errors: dict[int, str] = {}
        self._reconcile_lock = trio.Lock()
        #: Mesh peers: bumped when the runners change; hostname -> (version, when) it was last sent.
        self._version = 0
        self._sent: dict[str, tuple[int, float]] = {}
        self._peer_cache: dict[str, list[dict[str, Any]]] = {}

    # -- start and the reconcile loop ----------------------------------------------------------------------

    def _make_links(self) -> OverlayLinks:
        return OverlayLinks(
            self.plan,
            vxlan_id=self.config.OVERLAY_VXLAN_ID,
            port=self.config.OVERLAY_VXLAN_PORT,
            mtu=self.config.OVERLAY_MTU,
            local=self.config.HOST_REACHABLE_ADDRESS if self.enabled else "127.0.0.1",
        )

    async def start(self) -> None:
        """Load the key and the runner ids, then make the kernel match (or remove the links of an overlay
        that was turned off). A netlink failure is logged, not fatal: the API serves, the loop retries."""
        key = secrets.token_hex(KEY_BYTES)
        self._key = bytes.fromhex(await self.store.write(WriteTx.get_or_set_meta, KEY_META, key))
        if not self.enabled:
            await self._teardown_if_present()
            return
        highest = max_runners(self.plan)

        def load(tx: WriteTx) -> tuple[list[OverlayRunnerRow], list[OverlayRunnerRow]]:
            dropped = [row for row in tx.overlay_runners() if row.runner_id > highest]
            for row in dropped:
                tx.delete_overlay_runner(row.hostname)
            return tx.overlay_runners(), dropped

        rows, dropped = await self.store.write(load)
        for row in dropped:
            log.warning(
                "overlay: runner %s had id %d, which OVERLAY_SUBNET %s no longer has (at most %d): it gets a"
                " new one when it registers again",
                row.hostname, row.runner_id, self.config.OVERLAY_SUBNET, highest,
            )  # fmt: skip
        self._runners = {row.hostname: row for row in rows}
        self._version += 1
        if self._links is None:
            self._links = self._make_links()
        await self.reconcile()

    async def _teardown_if_present(self) -> None:
        links = self._links or self._make_links()
        try:
            if not await trio.to_thread.run_sync(links.present):
                return
            done = await trio.to_thread.run_sync(links.teardown)
        except OverlayLinkError as exc:
            log.warning("overlay: it is off, but its old links could not be removed: %s", exc)
            return
        log.info("overlay: it is off; removed the host's links %s", ", ".join(done.deleted) or "(none)")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Reconcile every ``RECONCILE_INTERVAL_SECONDS`` (nothing to do when the overlay is off)."""
        task_status.started()
        if not self.enabled:
            return
        while True:
            await trio.sleep(RECONCILE_INTERVAL_SECONDS)
            await self.reconcile()

    def _wanted(self) -> dict[int, str]:
        # A runner whose underlay address is the host's own shares its network namespace: no VXLAN to it.
        return {
            row.runner_id: row.underlay for row in self._runners.values() if row.underlay != str(self.local)
        }

    async def reconcile(self) -> bool:
        """Make the host's links match the runners (serialized); False if a step failed (logged)."""
        if not self.enabled or self._links is None:
            return True
        async with self._reconcile_lock:
            wanted = self._wanted()
            try:
                changes = await trio.to_thread.run_sync(self._links.reconcile, wanted)
            except OverlayLinkError as exc:
                log.error("overlay: the host's links are not all in place: %s", exc)
                self._link_errors = await self._link_problems(wanted, str(exc))
                return False
            self._link_errors = {}
            if not changes.empty:
                notes = "; " + "; ".join(changes.notes) if changes.notes else ""
                log.info(
                    "overlay: links reconciled (created %s; fixed %s; deleted %s)%s",
                    ", ".join(changes.created) or "none", ", ".join(changes.fixed) or "none",
                    ", ".join(changes.deleted) or "none", notes,
                )  # fmt: skip
            return True

    async def _link_problems(self, wanted: dict[int, str], error: str) -> dict[int, str]:
        """Which wanted links are missing or down after a failed reconcile (each gets the error)."""
        assert self._links is not None
        try:
            states = await trio.to_thread.run_sync(self._links.states)
        except OverlayLinkError:
            return dict.fromkeys(wanted, error)
        problems = {}
        for runner_id, remote in wanted.items():
            state = states.get(link_name(runner_id))
            if state is None or not state.up or state.remote != remote:
                problems[runner_id] = error
        return problems

    # -- registration --------------------------------------------------------------------------------------

    def check_settings(self, reg: NodeRegistration) -> None:
        """409 naming every differing ``OVERLAY_*`` value (before anything of the registration is stored)."""
        check_settings(self.settings, reg)

    async def underlay_of(self, reg: NodeRegistration) -> tuple[str | None, str | None]:
        """(the runner's underlay IPv4 address, None) or (None, why it cannot be used)."""
        if not self.enabled:
            return None, None
        text = reg.underlay_address
        if text is None:
            name = urlsplit(reg.url).hostname or ""
            try:
                text = str(ipaddress.IPv4Address(name))
            except ValueError:
                text = await self._resolve(name)
                if text is None:
                    return None, (
                        f"the runner's URL names {name!r}, which does not resolve to an IPv4 address here:"
                        " set the runner's underlay address (an IPv4 address the host reaches it at)"
                    )
        address = ipaddress.IPv4Address(text)
        assert self.local is not None
        if address.is_loopback != self.local.is_loopback:
            if self.local.is_loopback:
                return None, (
                    f"HOST_REACHABLE_ADDRESS is {self.local} (loopback) but runner {reg.hostname} is at"
                    f" {address}: set HOST_REACHABLE_ADDRESS to an address the runners reach the host at"
                )
            return None, (
                f"runner {reg.hostname} registered from loopback {address} but the host's VXLAN address is"
                f" {self.local}: the runner must register with an address the host reaches it at"
            )
        return str(address), None

    @staticmethod
    async def _resolve(name: str) -> str | None:
        if not name:
            return None
        with trio.move_on_after(RESOLVE_TIMEOUT_SECONDS):
            try:
                found = await trio.socket.getaddrinfo(name, None, family=socket.AF_INET)
            except OSError:
                return None
            for *_rest, sockaddr in found:
                return str(sockaddr[0])
        return None

    def allocate_tx(self, tx: WriteTx, hostname: str, underlay: str, now: float) -> OverlayRunnerRow | None:
        """In the registration's transaction: the runner's id (kept, with its address updated), or the
        lowest free one; None when every id of the plan is taken."""
        row = tx.overlay_runner(hostname)
        if row is not None:
            if row.underlay == underlay:
                return row
            return tx.put_overlay_runner(row.runner_id, hostname, underlay, now=now)
        taken = {r.runner_id for r in tx.overlay_runners()}
        for runner_id in range(1, max_runners(self.plan) + 1):
            if runner_id not in taken:
                return tx.put_overlay_runner(runner_id, hostname, underlay, now=now)
        return None

    def no_free_id(self) -> str:
        highest = max_runners(self.plan)
        return (
            f"every overlay runner id is taken (OVERLAY_SUBNET {self.config.OVERLAY_SUBNET} has NODE_BITS for"
            f" {highest} runners): remove a node that is gone (kr node remove NODE) or use more NODE_BITS"
        )

    async def registered(self, hostname: str, row: OverlayRunnerRow | None, error: str | None) -> Registered:
        """After the registration committed: the host's link to it, and its assignment (or the error)."""
        if not self.enabled:
            return Registered()
        if row is None:
            error = error or self.no_free_id()
            log.warning("node %s joins without the overlay: %s", hostname, error)
            return Registered(error=error)
        before = self._runners.get(hostname)
        self._runners[hostname] = row
        if before != row:
            self._version += 1
            self._peer_cache.clear()
            log.info(
                "overlay: runner %s has id %d (subnet %s, underlay %s)",
                hostname, row.runner_id, runner_subnet(self.plan, row.runner_id), row.underlay,
            )  # fmt: skip
        if before != row or row.runner_id in self._link_errors:
            await self.reconcile()
        self._sent[hostname] = (self._version, self.clock())
        assert self.local is not None
        assignment = build_assignment(self.settings, row.runner_id, self.local, self._peers(hostname))
        return Registered(assignment)

    async def node_removed(self, hostname: str, row: OverlayRunnerRow | None) -> None:
        """After ``DELETE /api/nodes/{hostname}`` committed (its id released in that transaction)."""
        self._sent.pop(hostname, None)
        if self._runners.pop(hostname, None) is not None or row is not None:
            self._version += 1
            self._peer_cache.clear()
            await self.reconcile()

    # -- mesh peers ----------------------------------------------------------------------------------------

    def _peers(self, hostname: str) -> list[OverlayPeer]:
        return [
            OverlayPeer(runner_id=row.runner_id, hostname=row.hostname, underlay_address=row.underlay)
            for row in sorted(self._runners.values(), key=lambda r: r.runner_id)
            if row.hostname != hostname
        ]

    def heartbeat_peers(self, hostname: str) -> list[dict[str, Any]] | None:
        """Mesh mode: the peer list (JSON shape) for this heartbeat's answer when the runner's copy may be
        stale (changed since it was last sent, or sent ``PEERS_RESEND_SECONDS`` ago); else None."""
        if self.mode is not OverlayMode.MESH or not self.enabled or hostname not in self._runners:
            return None
        now = self.clock()
        sent = self._sent.get(hostname)
        if sent is not None and sent[0] == self._version and now - sent[1] < PEERS_RESEND_SECONDS:
            return None
        self._sent[hostname] = (self._version, now)
        peers = self._peer_cache.get(hostname)
        if peers is None:
            peers = self._peer_cache[hostname] = [unstructure(p) for p in self._peers(hostname)]
        return peers

    # -- status --------------------------------------------------------------------------------------------

    def runner_id(self, hostname: str) -> int | None:
        row = self._runners.get(hostname)
        return None if row is None else row.runner_id

    async def status(self, who: Principal) -> OverlayStatus:
        if not self.enabled:
            return OverlayStatus(enabled=False)
        runners = []
        for row in sorted(self._runners.values(), key=lambda r: r.runner_id):
            node = self.nodes.get(row.hostname)
            online = node is not None and node.status == "online"
            seen = None if node is None or node.last_heartbeat is None else _iso(node.last_heartbeat)
            runners.append(
                OverlayRunnerView(
                    runner_id=row.runner_id,
                    hostname=row.hostname,
                    subnet=str(runner_subnet(self.plan, row.runner_id)),
                    link=link_name(row.runner_id),
                    underlay_address=row.underlay,
                    active=online and row.runner_id not in self._link_errors,
                    last_seen=seen,
                )
            )
        now = self.clock()
        rows = await self.store.read(lambda tx: tx.reservations())
        mine = who.at_least(Role.OPERATOR)
        reservations = [self._view(r) for r in rows if r.live(now) and (mine or r.owner_id == who.user_id)]
        return OverlayStatus(
            enabled=True,
            mode=self.mode,
            subnet=self.config.OVERLAY_SUBNET,
            host_overlay_address=str(host_overlay_address(self.plan)),
            runners=runners,
            reservations=reservations,
        )

    def _token(self, row: ReservationRow) -> str:
        # Tokens are not stored: the same claim signed with the same key is the same token.
        assert self._key is not None
        claim = ReservationClaim(row.ip, row.node, row.runner_id, int(row.expires_at), row.nonce)
        return sign_reservation(self._key, claim)

    def _view(self, row: ReservationRow) -> IpReservation:
        return IpReservation(
            token=self._token(row),
            ip=row.ip,
            node=row.node,
            expires_at=_iso(row.expires_at),
            used_by=row.used_by,
        )

    # -- reservations --------------------------------------------------------------------------------------

    def _require_enabled(self, field: str | None = None) -> None:
        if not self.enabled:
            raise ApiProblem(
                409, "conflict", "the overlay network is off on this host (OVERLAY_ENABLED)", field
            )

    @staticmethod
    def _holders(tx: WriteTx, now: float, *, besides: int | None = None) -> dict[str, str]:
        """Address -> who holds it, for every address that must not be handed out (those of task
        ``besides`` left out)."""
        held: dict[str, str] = {}
        for ip, task_id in tx.overlay_ips_in_use():
            if task_id != besides:
                held.setdefault(ip, f"task {task_id}")
        for row in tx.reservations():
            if row.live(now) and (row.used_by is None or row.used_by != besides):
                who = (
                    f"task {row.used_by}"
                    if row.used_by is not None
                    else f"a reservation until {_iso(row.expires_at)}"
                )
                held.setdefault(row.ip, who)
        return held

    @staticmethod
    def _purge(tx: WriteTx, now: float) -> int:
        dead = [row.nonce for row in tx.reservations() if not row.live(now)]
        for nonce in dead:
            tx.delete_reservation(nonce)
        return len(dead)

    async def reserve(self, who: Principal, request: ReserveRequest) -> IpReservation:
        """Reserve ``request.ip`` (or the highest free address) on ``request.node`` for its TTL."""
        if not who.at_least(Role.USER):
            raise Forbidden(
                f"reserving an address needs role user or higher; {who.username} is {who.role.value}"
            )
        self._require_enabled()
        plan = self.plan
        now = self.clock()
        expires_at = int(now) + request.ttl_seconds
        nonce = secrets.token_urlsafe(18)

        def write(tx: WriteTx) -> ReservationRow:
            runner = tx.overlay_runner(request.node)
            if runner is None:
                raise not_found(
                    f"node {request.node} has no overlay subnet (it never registered with the overlay on)"
                )
            self._purge(tx, now)
            held = self._holders(tx, now)
            runner_id = runner.runner_id
            if request.ip is not None:
                if not is_container_address(plan, runner_id, request.ip):
                    first, last = container_range(plan, runner_id)
                    raise invalid(
                        f"{request.ip} is not a container address of node {request.node} (its range is"
                        f" {first} - {last}, without the host's address)",
                        "ip",
                    )
                if request.ip in held:
                    raise conflict(f"{request.ip} on node {request.node} is in use by {held[request.ip]}")
                ip = request.ip
            else:
                ip = self._highest_free(runner_id, held)
                if ip is None:
                    raise conflict(f"node {request.node} has no free overlay address")
            return tx.insert_reservation(nonce, ip, request.node, runner_id, who.user_id, expires_at, now=now)

        row = await self.store.write(write)
        log.info("%s reserved %s on %s until %s", who.username, row.ip, row.node, _iso(row.expires_at))
        return self._view(row)

    def _highest_free(self, runner_id: int, held: dict[str, str]) -> str | None:
        first, last = container_range(self.plan, runner_id)
        address = int(last)
        while address >= int(first):
            text = str(ipaddress.IPv4Address(address))
            if text not in held and is_container_address(self.plan, runner_id, text):
                return text
            address -= 1
        return None

    async def release(self, who: Principal, what: str) -> dict[str, Any]:
        """Release a reservation named by its token (whoever holds it) or its address (its owner or an
        operator). One in use by a task that has not ended is refused: it goes when the task ends."""
        if not who.at_least(Role.USER):
            raise Forbidden(
                f"releasing an address needs role user or higher; {who.username} is {who.role.value}"
            )
        self._require_enabled()
        now = self.clock()
        nonce: str | None = None
        ip: str | None = None
        try:
            ip = str(ipaddress.IPv4Address(what))
        except ValueError:
            assert self._key is not None
            # The signature is what matters here; whether it still holds is the stored row's business.
            claim = verify_reservation(self._key, what, float("-inf"))
            nonce = claim.nonce

        def write(tx: WriteTx) -> ReservationRow:
            if nonce is not None:
                row = tx.reservation(nonce)
                live = [row] if row is not None and row.live(now) else []
            else:
                live = [r for r in tx.reservations(ip=ip) if r.live(now)]
                if not who.at_least(Role.OPERATOR):
                    live = [r for r in live if r.owner_id == who.user_id]
            if not live:
                raise not_found(
                    f"no reservation of {ip or 'that token'} is held (released, expired or never made)"
                )
            row = live[0]
            if row.used_by is not None:
                raise conflict(
                    f"{row.ip} on {row.node} is in use by task {row.used_by}: it is released when the task"
                    " ends"
                )
            tx.delete_reservation(row.nonce)
            return row

        row = await self.store.write(write)
        log.info("%s released the reservation of %s on %s", who.username, row.ip, row.node)
        return {"ip": row.ip, "node": row.node, "message": f"released {row.ip} on {row.node}"}

    # -- using a reservation -------------------------------------------------------------------------------

    def claim_for(self, token: str, placement: Target | None) -> tuple[ReservationClaim, str]:
        """The claim of a submit's or create's ``ip_token`` and the node the task must run on (its target,
        or the token's node when it named none). 4xx naming ``ip_token`` when the token is bad, the overlay
        off or the target another node."""
        self._require_enabled(_FIELD)
        assert self._key is not None
        claim = verify_reservation(self._key, token, self.clock())  # ValidationError(ip_token) -> 422
        if placement is not None and placement.hostname != claim.node:
            raise invalid(
                f"the token reserves {claim.ip} on node {claim.node}, but the target is {placement.hostname}:"
                f" target {claim.node} (or none)",
                _FIELD,
            )
        return claim, claim.node

    @staticmethod
    def use_tx(tx: WriteTx, claim: ReservationClaim, task_id: int, now: float) -> None:
        """In the transaction that stores the task: the reservation is used by it (409 naming ``ip_token``
        if it was released, expired meanwhile, is used by another task, or the node changed subnet)."""
        row = tx.reservation(claim.nonce)
        if row is None or not row.live(now):
            raise ApiProblem(
                409, "conflict", f"the reservation of {claim.ip} was released or has expired", _FIELD
            )
        if row.used_by is not None:
            raise ApiProblem(409, "conflict", f"{claim.ip} is already used by task {row.used_by}", _FIELD)
        runner = tx.overlay_runner(claim.node)
        if runner is None or runner.runner_id != claim.runner_id:
            raise ApiProblem(
                409,
                "conflict",
                f"node {claim.node} has another overlay subnet since {claim.ip} was reserved",
                _FIELD,
            )
        if not tx.use_reservation(claim.nonce, task_id):
            raise ApiProblem(409, "conflict", f"{claim.ip} was taken meanwhile", _FIELD)

    def retake_tx(self, tx: WriteTx, task: StoredTask, now: float) -> StoredTask:
        """A VPS re-created after it ended: it keeps its reserved address if nobody took it meanwhile (a
        new reservation row for it), else it gets any address (``reserved_ip`` cleared, said in its status
        message)."""
        ip = task.reserved_ip
        if ip is None:
            return task
        tx.delete_reservations_of_task(task.task_id)
        runner_id = self.runner_id(task.restart_node or task.assigned_node or "")
        holders = self._holders(tx, now, besides=task.task_id)
        if (
            runner_id is None
            or not self.enabled
            or ip in holders
            or not is_container_address(self.plan, runner_id, ip)
        ):
            why = holders.get(ip, "the overlay changed")
            return attrs.evolve(
                task,
                reserved_ip=None,
                status_message=f"{task.status_message}; its reserved address {ip} is taken ({why}): it gets"
                " another",
            )
        tx.insert_reservation(
            secrets.token_urlsafe(18), ip, task.restart_node or task.assigned_node or "", runner_id,
            task.owner_id, now, used_by=task.task_id, now=now,
        )  # fmt: skip
        return task
