"""The runner's end of the VXLAN overlay in the kernel: the bridge its containers join, the VXLAN link to the
host (and in mesh mode to every other runner), the routes and the firewall rules.

What ``OverlayNetwork.ensure(layout)`` makes (``layout`` comes from the host's ``OverlayAssignment``):

- the bridge ``OVERLAY_BRIDGE_NAME`` (``kohaku-overlay``) with the runner's gateway (subnet + 1) and prefix,
  ``OVERLAY_MTU``, a MAC made from the runner id (``bridge_mac``: stable whatever ports come and go, and
  known to the other runners in mesh mode), ``arp_ignore = 1`` (it answers ARP only for its own address:
  on a machine with two runners, the tests' case, the other runner's gateway is local too), up. Docker's
  network ``OVERLAY_NETWORK_NAME`` is made on this bridge (``overlay_manager``).
- ``OVERLAY_VXLAN_NAME`` (``vxlan0``): VNI ``OVERLAY_VXLAN_ID + id``, local = this runner's underlay address,
  remote = the host's, ``OVERLAY_VXLAN_PORT``, no learning, a port of the bridge. Made again when its VNI,
  local or remote address, port or learning differ (the kernel changes none of them in place). With
  ``OVERLAY_UNDERLAY_NETNS`` it is created in that network namespace and moved into the runner's: its UDP
  socket stays where the underlay address is, so several runners on one machine (the tests) each have
  their own underlay address while their bridges share the machine's Docker.
- routes in the runner's own table (``route_table``: ``0x6b720000 + id``), chosen by the rule
  ``iif <bridge> lookup <table>`` (priority ``RULE_PRIORITY``): the runner's subnet on the bridge, the
  whole overlay via the host's address on this subnet (subnet + 254), and in mesh mode each peer's subnet
  via the peer's gateway. A table per runner, not the main table: two runners on one machine would fight
  over one overlay route there, and the traffic of one runner's containers must leave through its own
  bridge (so it crosses VXLAN) even though the other runner's subnet is connected on the same machine. The
  runner's own processes keep the main table, where the kernel routes the runner's subnet to the bridge.
- mesh mode (``OverlayMode.MESH``): forwarding entries on ``vxlan0`` for every other runner: an all-zeros
  entry (broadcasts, ARP) and one for the peer's bridge MAC, each with the peer's underlay address and the
  peer's own VNI (the VNI of its link with the host; the host keeps its links as in hub mode), and a
  permanent neighbour entry for the peer's gateway with that MAC on the bridge. So traffic between two
  runners' containers goes from one runner's bridge straight to the other's, without the host, and without
  flooding. ``sync_peers`` updates only these.
- in both modes, a forwarding entry on ``vxlan0`` for the MAC of the host's link to this runner
  (``host_link_mac``: the host gives its links fixed MACs) toward the host's underlay address: without it
  that MAC is unknown to the link, and in mesh mode an unknown MAC goes to every all-zeros entry, so all
  traffic to the host's overlay addresses would also reach every peer, whose bridge floods it to every
  container there (a copy for everyone to see, and work for every runner).
- IPv4 forwarding, and iptables rules: ``-t nat POSTROUTING -s <runner subnet> ! -d <overlay> -j MASQUERADE``
  (only traffic leaving the overlay is translated; overlay traffic keeps its addresses), and at the top of
  FORWARD ``-i <bridge> -j ACCEPT`` and ``-o <bridge> -m conntrack --ctstate RELATED,ESTABLISHED -j
  ACCEPT`` (from the outside only replies come in). Each rule carries the comment
  ``kohakuriver-overlay:<bridge>:<digest of the rule>``: a rule is added when its comment is missing, a
  marked rule whose comment is not wanted any more (another subnet after a new runner id) or a second copy
  is deleted. So a restart never piles rules up, and ``teardown`` finds exactly this runner's rules.

A runner whose underlay address is the host's (``kr up``: host and runner in one namespace) gets no VXLAN
link: its table holds only its subnet and the rest falls through to the main table, where the host's links
route it (``OverlayLayout.colocated``).

``teardown()`` removes all of it: rules, the rule's routes, the VXLAN link, the bridge (only one with a MAC
``bridge_mac`` made: never a bridge somebody else named the same).

Everything here blocks (netlink through pyroute2, iptables and sysctl as argv lists): the runner calls it
through ``trio.to_thread.run_sync``. ``netns`` puts the whole runner side in a network namespace (``ip
netns exec NS iptables ...``), which is how the tests run it: never in the machine's own namespace.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import shlex
import socket
import subprocess
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs

from kohakuriver_proto.models import OverlayAssignment, OverlayMode
from kohakuriver_proto.overlay import (
    fdb_changes,
    host_link_mac,
    runner_gateway,
    runner_subnet,
    vni,
)
from kohakuriver_proto.settings import OverlaySubnet

__all__ = [
    "BRIDGE_MAC_PREFIX",
    "COMMENT_PREFIX",
    "RULE_PRIORITY",
    "TABLE_BASE",
    "FirewallRule",
    "OverlayLayout",
    "OverlayNetwork",
    "OverlayNetworkError",
    "Peer",
    "Route",
    "bridge_mac",
    "host_link_mac",
    "layout_from",
    "route_table",
    "runner_id_of_mac",
]

log = logging.getLogger("kohakuriver.runner.overlay")

#: Locally administered (bit 1 of the first byte), unicast; "kr" in the second and third bytes. The last
#: three bytes are the runner id, so every runner's bridge has a MAC the others can compute.
BRIDGE_MAC_PREFIX = "02:6b:72"
#: The runner's routing table is ``TABLE_BASE + runner id`` (Linux tables are 32 bits; "kr" again).
TABLE_BASE = 0x6B720000
#: Priority of the rule ``iif <bridge> lookup <table>``: after ``local`` (0), before ``main`` (32766).
RULE_PRIORITY = 10000
COMMENT_PREFIX = "kohakuriver-overlay"
ZERO_MAC = "00:00:00:00:00:00"

_COMMAND_TIMEOUT = 30.0  # iptables waits at most 10 s for the xtables lock (-w 10), then fails
_IFF_UP = 1
_NUD_PERMANENT = 0x80
_RT_SCOPE_LINK = 253
_ENODEV, _ENOENT, _ESRCH, _EEXIST = 19, 2, 3, 17


class OverlayNetworkError(Exception):
    """A step on the runner's overlay links failed; the message names the step and the link or rule."""


# -- what the runner side should be (pure) -------------------------------------------------------------------


def bridge_mac(runner_id: int) -> str:
    """The overlay bridge's MAC for runner ``runner_id`` (1 .. 2**16 - 1): ``02:6b:72:00:HH:LL``."""
    if not 0 < runner_id < 1 << 24:
        raise ValueError(f"runner id {runner_id} is out of range")
    low = runner_id.to_bytes(3, "big")
    return BRIDGE_MAC_PREFIX + ":" + ":".join(f"{b:02x}" for b in low)


def runner_id_of_mac(mac: str) -> int | None:
    """The runner id ``bridge_mac`` wrote into ``mac``; None for any other MAC."""
    mac = mac.lower()
    if not mac.startswith(BRIDGE_MAC_PREFIX + ":") or len(mac) != 17:
        return None
    try:
        value = int(mac[9:].replace(":", ""), 16)
    except ValueError:
        return None
    return value or None


def route_table(runner_id: int) -> int:
    return TABLE_BASE + runner_id


@attrs.frozen
class Peer:
    """Another runner, in mesh mode: where its VXLAN ends, its VNI, subnet, gateway and bridge MAC."""

    runner_id: int
    underlay: ipaddress.IPv4Address
    vni: int
    subnet: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address

    @property
    def mac(self) -> str:
        return bridge_mac(self.runner_id)


@attrs.frozen
class Route:
    """A route of the runner's table: ``dst`` via ``gateway``, or on the bridge itself (``gateway`` None)."""

    dst: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address | None = None

    def __str__(self) -> str:
        return f"{self.dst} via {self.gateway}" if self.gateway else f"{self.dst} on the bridge"


@attrs.frozen
class FirewallRule:
    """One iptables rule: ``table``, ``chain``, whether it goes to the top of the chain, the match/target."""

    table: str
    chain: str
    insert: bool
    rule: tuple[str, ...]

    def comment(self, bridge: str) -> str:
        text = " ".join((self.table, self.chain, *self.rule))
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        return f"{COMMENT_PREFIX}:{bridge}:{digest}"

    def argv(self, bridge: str) -> list[str]:
        """The rule as iptables takes it after ``-A/-I/-C/-D CHAIN``, with its marking comment."""
        *matches, jump, target = self.rule
        assert jump == "-j"
        return [*matches, "-m", "comment", "--comment", self.comment(bridge), "-j", target]

    def __str__(self) -> str:
        return f"-t {self.table} {self.chain} {' '.join(self.rule)}"


@attrs.frozen
class OverlayLayout:
    """The runner side as it must be, from the host's assignment and this runner's underlay address."""

    runner_id: int
    mode: OverlayMode
    overlay: ipaddress.IPv4Network
    subnet: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address
    host_address: ipaddress.IPv4Address
    vni: int
    port: int
    mtu: int
    local: ipaddress.IPv4Address
    host_underlay: ipaddress.IPv4Address
    #: Mesh mode only: the other runners, in runner id order (empty in hub mode).
    peers: tuple[Peer, ...] = ()

    @property
    def mac(self) -> str:
        return bridge_mac(self.runner_id)

    @property
    def table(self) -> int:
        return route_table(self.runner_id)

    @property
    def host_mac(self) -> str:
        """The MAC of the host's link to this runner (the next hop toward the rest of the overlay)."""
        return host_link_mac(self.runner_id)

    @property
    def colocated(self) -> bool:
        """The host is in this runner's namespace (``kr up``: one underlay address for both). Then there is
        no VXLAN link to the host (the host makes none either): the runner's table holds only its subnet,
        and everything else falls through to the main table, where the host's own links route it."""
        return self.local == self.host_underlay

    def routes(self) -> frozenset[Route]:
        if self.colocated:
            return frozenset({Route(self.subnet)})
        routes = {Route(self.subnet), Route(self.overlay, self.host_address)}
        for peer in self.peers:
            # The /32 makes the peer's gateway reachable on the bridge in this table, so the next route's
            # gateway passes the kernel's check even where that address is local (two runners, one machine).
            routes.add(Route(ipaddress.IPv4Network(peer.gateway)))
            routes.add(Route(peer.subnet, peer.gateway))
        return frozenset(routes)

    def flood_entries(self) -> dict[int, tuple[str, int]]:
        """All-zeros forwarding entries besides the host's (which is the link's remote): peer id ->
        (underlay address, VNI)."""
        if self.colocated:
            return {}
        return {p.runner_id: (str(p.underlay), p.vni) for p in self.peers}

    def mac_entries(self) -> dict[int, tuple[str, int]]:
        """Forwarding entries for the peers' bridge MACs: peer id -> (underlay address, VNI)."""
        if self.colocated:
            return {}
        return {p.runner_id: (str(p.underlay), p.vni) for p in self.peers}

    def neighbours(self) -> dict[str, str]:
        """Permanent neighbour entries on the bridge: peer gateway -> the peer bridge's MAC."""
        if self.colocated:
            return {}
        return {str(p.gateway): p.mac for p in self.peers}

    def firewall(self, bridge: str) -> list[FirewallRule]:
        subnet, overlay = str(self.subnet), str(self.overlay)
        return [
            FirewallRule("nat", "POSTROUTING", False, ("-s", subnet, "!", "-d", overlay, "-j", "MASQUERADE")),
            FirewallRule("filter", "FORWARD", True, ("-i", bridge, "-j", "ACCEPT")),
            FirewallRule(
                "filter",
                "FORWARD",
                True,
                ("-o", bridge, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT"),
            ),
        ]


def layout_from(
    assignment: OverlayAssignment,
    plan: OverlaySubnet,
    *,
    vxlan_id: int,
    local: ipaddress.IPv4Address | str,
) -> OverlayLayout:
    """The layout for ``assignment`` (the host's answer) with this runner's underlay address ``local``;
    ``plan`` and ``vxlan_id`` are the runner's OVERLAY_SUBNET and OVERLAY_VXLAN_ID (equal to the host's:
    the host refuses a registration where they differ). ``ValueError`` when the assignment does not fit the
    plan or names this runner's own underlay address as a peer's."""
    local_address = ipaddress.IPv4Address(local)
    subnet = ipaddress.IPv4Network(assignment.subnet)
    if subnet != runner_subnet(plan, assignment.runner_id):
        raise ValueError(
            f"the host assigned {subnet} to runner id {assignment.runner_id}, but this runner's "
            f"OVERLAY_SUBNET gives {runner_subnet(plan, assignment.runner_id)}"
        )
    peers = []
    if assignment.mode is OverlayMode.MESH:
        for peer in sorted(assignment.peers, key=lambda p: p.runner_id):
            underlay = ipaddress.IPv4Address(peer.underlay_address)
            if underlay == local_address:
                raise ValueError(f"peer {peer.hostname} has this runner's underlay address {underlay}")
            peers.append(
                Peer(
                    runner_id=peer.runner_id,
                    underlay=underlay,
                    vni=vni(vxlan_id, peer.runner_id),
                    subnet=runner_subnet(plan, peer.runner_id),
                    gateway=runner_gateway(plan, peer.runner_id),
                )
            )
    return OverlayLayout(
        runner_id=assignment.runner_id,
        mode=assignment.mode,
        overlay=plan.network,
        subnet=subnet,
        gateway=ipaddress.IPv4Address(assignment.gateway),
        host_address=ipaddress.IPv4Address(assignment.host_address),
        vni=assignment.vni,
        port=assignment.vxlan_port,
        mtu=assignment.mtu,
        local=local_address,
        host_underlay=ipaddress.IPv4Address(assignment.host_underlay_address),
        peers=tuple(peers),
    )


# -- the kernel ----------------------------------------------------------------------------------------------


def _netlink_error(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    if isinstance(code, int) and code > 0:
        return f"{os.strerror(code)} (errno {code})"
    return str(exc) or type(exc).__name__


def _code(exc: BaseException) -> int | None:
    code = getattr(exc, "code", None)
    return code if isinstance(code, int) else None


class OverlayNetwork:
    """The runner's overlay links named ``bridge`` and ``vxlan``, in network namespace ``netns`` (None: the
    runner's own), the VXLAN's socket in ``underlay_netns`` (None: the same namespace). Every method blocks;
    calls on one instance are serialized by a lock."""

    def __init__(
        self,
        bridge: str,
        vxlan: str,
        *,
        netns: str | None = None,
        underlay_netns: str | None = None,
        iptables: str = "iptables",
    ) -> None:
        for name in (bridge, vxlan):
            if not 0 < len(name) <= 15 or "/" in name or ":" in name or any(c.isspace() for c in name):
                raise ValueError(f"{name!r} is not a valid interface name")
        if bridge == vxlan:
            raise ValueError("the bridge and the VXLAN link need different names")
        self.bridge = bridge
        self.vxlan = vxlan
        self.netns = netns
        self.underlay_netns = underlay_netns
        self.iptables = iptables
        self._lock = threading.Lock()

    # -- helpers

    def _where(self, netns: str | None) -> str:
        return f" in network namespace {netns}" if netns else ""

    @contextmanager
    def _ipr(self, netns: str | None = None) -> Iterator[Any]:  # pyroute2's objects are untyped
        from pyroute2 import IPRoute

        try:
            # flags=0: a namespace that does not exist is an error, not created (pyroute2's default).
            ipr = IPRoute(netns=netns, flags=0) if netns else IPRoute()
        except FileNotFoundError as exc:
            raise OverlayNetworkError(f"network namespace {netns} does not exist") from exc
        except OSError as exc:
            raise OverlayNetworkError(f"cannot open netlink{self._where(netns)}: {exc}") from exc
        try:
            yield ipr
        finally:
            ipr.close()

    def _run(self, argv: list[str], what: str) -> subprocess.CompletedProcess[str]:
        argv = (["ip", "netns", "exec", self.netns] if self.netns else []) + argv
        try:
            return subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=_COMMAND_TIMEOUT,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except FileNotFoundError as exc:
            raise OverlayNetworkError(f"{what}: {argv[0]} is not installed") from exc
        except subprocess.TimeoutExpired as exc:
            raise OverlayNetworkError(
                f"{what}: {shlex.join(argv)} did not finish in {_COMMAND_TIMEOUT:.0f} s"
            ) from exc

    @staticmethod
    def _link(ipr: Any, name: str) -> Any:
        found = ipr.link_lookup(ifname=name)
        return ipr.get_links(found[0])[0] if found else None

    def _must(self, ipr: Any, name: str) -> Any:
        link = self._link(ipr, name)
        if link is None:
            raise OverlayNetworkError(f"{name} vanished{self._where(self.netns)}")
        return link

    # -- inspection (tests and the manager)

    def present(self) -> bool:
        """Whether the bridge exists (with this module's MAC: ours)."""
        if self.netns is None and not Path("/sys/class/net", self.bridge).exists():
            return False  # the common case, answered without loading pyroute2
        with self._lock, self._ipr(self.netns) as ipr:
            link = self._link(ipr, self.bridge)
            return link is not None and runner_id_of_mac(link.get("address") or "") is not None

    # -- ensure

    def ensure(self, layout: OverlayLayout) -> None:
        """Make the runner side match ``layout``, changing only what differs (see the module docstring).
        A second call changes nothing; a call after a crash half-way finishes the job."""
        with self._lock:
            with self._ipr(self.netns) as ipr:
                bridge = self._ensure_bridge(ipr, layout)
                self._ensure_vxlan(ipr, layout, bridge)
                self._sync_mesh(ipr, layout, bridge)
                self._ensure_routes(ipr, layout, bridge)
            self._ensure_sysctl("net.ipv4.ip_forward", "1")
            self._ensure_sysctl(f"net.ipv4.conf.{self.bridge}.arp_ignore", "1")
            self._ensure_rules(layout.firewall(self.bridge))

    def sync_peers(self, layout: OverlayLayout) -> None:
        """Only the mesh parts (forwarding entries, neighbours, routes) for a new peer list."""
        with self._lock, self._ipr(self.netns) as ipr:
            bridge = self._must(ipr, self.bridge)["index"]
            self._sync_mesh(ipr, layout, bridge)
            self._ensure_routes(ipr, layout, bridge)

    def _ensure_bridge(self, ipr: Any, layout: OverlayLayout) -> int:
        from pyroute2.netlink.exceptions import NetlinkError

        link = self._link(ipr, self.bridge)
        if link is None:
            try:
                ipr.link("add", ifname=self.bridge, kind="bridge", address=layout.mac, mtu=layout.mtu)
            except NetlinkError as exc:
                raise OverlayNetworkError(
                    f"cannot create bridge {self.bridge}: {_netlink_error(exc)}"
                ) from exc
            log.info("overlay: created bridge %s", self.bridge)
            link = self._must(ipr, self.bridge)
        elif link.get(("linkinfo", "kind")) != "bridge":
            raise OverlayNetworkError(
                f"{self.bridge} exists and is a {link.get(('linkinfo', 'kind')) or 'plain'} link, not a "
                "bridge (set OVERLAY_BRIDGE_NAME to a free name)"
            )
        index = link["index"]
        changes: dict[str, Any] = {}
        if (link.get("address") or "").lower() != layout.mac:
            changes["address"] = layout.mac
        if link.get("mtu") != layout.mtu:
            changes["mtu"] = layout.mtu
        if changes:
            try:
                ipr.link("set", index=index, **changes)
            except NetlinkError as exc:
                raise OverlayNetworkError(
                    f"cannot set {changes} on {self.bridge}: {_netlink_error(exc)}"
                ) from exc
            log.info("overlay: bridge %s set to %s", self.bridge, changes)
        self._ensure_address(ipr, index, layout)
        self._ensure_up(ipr, index, self.bridge)
        return index

    def _ensure_address(self, ipr: Any, index: int, layout: OverlayLayout) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        wanted = (str(layout.gateway), layout.subnet.prefixlen)
        present = [
            (a.get("address"), a["prefixlen"]) for a in ipr.get_addr(index=index, family=socket.AF_INET)
        ]
        for address, prefix in present:
            if (address, prefix) == wanted:
                continue
            if ipaddress.IPv4Address(address) in layout.overlay:
                # A former assignment's gateway (another runner id): it would route a subnet not ours.
                try:
                    ipr.addr("del", index=index, address=address, prefixlen=prefix)
                except NetlinkError as exc:
                    raise OverlayNetworkError(
                        f"cannot remove the old address {address}/{prefix} from {self.bridge}: "
                        f"{_netlink_error(exc)}"
                    ) from exc
                log.info("overlay: removed the old address %s/%s from %s", address, prefix, self.bridge)
            else:
                log.warning("overlay: bridge %s also holds %s/%s", self.bridge, address, prefix)
        if wanted not in present:
            try:
                ipr.addr("add", index=index, address=wanted[0], prefixlen=wanted[1])
            except NetlinkError as exc:
                raise OverlayNetworkError(
                    f"cannot add {wanted[0]}/{wanted[1]} to {self.bridge}: {_netlink_error(exc)}"
                ) from exc
            log.info("overlay: bridge %s has address %s/%s", self.bridge, *wanted)

    def _ensure_up(self, ipr: Any, index: int, name: str) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        if ipr.get_links(index)[0]["flags"] & _IFF_UP:
            return
        try:
            ipr.link("set", index=index, state="up")
        except NetlinkError as exc:
            raise OverlayNetworkError(f"cannot bring {name} up: {_netlink_error(exc)}") from exc
        log.info("overlay: %s is up", name)

    def _vxlan_differences(self, link: Any, layout: OverlayLayout) -> list[str]:
        if link.get(("linkinfo", "kind")) != "vxlan":
            return [f"it is a {link.get(('linkinfo', 'kind')) or 'plain'} link"]
        data = link.get(("linkinfo", "data"))

        def attr(key: str) -> Any:
            return None if data is None else data.get(key)

        wanted = {
            "VNI": (attr("IFLA_VXLAN_ID"), layout.vni),
            "local": (attr("IFLA_VXLAN_LOCAL"), str(layout.local)),
            "remote": (attr("IFLA_VXLAN_GROUP"), str(layout.host_underlay)),
            "port": (attr("IFLA_VXLAN_PORT"), layout.port),
            "learning": (attr("IFLA_VXLAN_LEARNING"), 0),
            # Made in another namespace (its socket is there) or not: the setting decides.
            "underlay namespace": (
                link.get("IFLA_LINK_NETNSID") is not None,
                self.underlay_netns is not None,
            ),
        }
        return [f"{what} {have} (wanted {want})" for what, (have, want) in wanted.items() if have != want]

    def _ensure_vxlan(self, ipr: Any, layout: OverlayLayout, bridge: int) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        link = self._link(ipr, self.vxlan)
        if layout.colocated:
            if link is not None and link.get(("linkinfo", "kind")) == "vxlan":
                log.info("overlay: the host is in this namespace: no VXLAN link to it")
                self._delete_link(ipr, link["index"], self.vxlan)
            return
        if link is not None:
            differences = self._vxlan_differences(link, layout)
            if differences:
                if link.get(("linkinfo", "kind")) != "vxlan":
                    raise OverlayNetworkError(
                        f"{self.vxlan} exists and is not a VXLAN link (set OVERLAY_VXLAN_NAME to a free name)"
                    )
                log.info("overlay: making %s again: %s", self.vxlan, "; ".join(differences))
                self._delete_link(ipr, link["index"], self.vxlan)
                link = None
        if link is None:
            self._create_vxlan(ipr, layout)
            link = self._must(ipr, self.vxlan)
        index = link["index"]
        changes: dict[str, Any] = {}
        if link.get("mtu") != layout.mtu:
            changes["mtu"] = layout.mtu
        if link.get("master") != bridge:
            changes["master"] = bridge
        if changes:
            try:
                ipr.link("set", index=index, **changes)
            except NetlinkError as exc:
                raise OverlayNetworkError(
                    f"cannot set {changes} on {self.vxlan}: {_netlink_error(exc)}"
                ) from exc
            log.info("overlay: %s set to %s", self.vxlan, changes)
        self._ensure_up(ipr, index, self.vxlan)

    def _create_vxlan(self, ipr: Any, layout: OverlayLayout) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        spec = {
            "ifname": self.vxlan,
            "kind": "vxlan",
            "vxlan_id": layout.vni,
            "vxlan_local": str(layout.local),
            "vxlan_group": str(layout.host_underlay),
            "vxlan_port": layout.port,
            "vxlan_learning": 0,
            "mtu": layout.mtu,
        }
        remote = f"{layout.host_underlay}:{layout.port}"
        what = f"VXLAN link {self.vxlan} (VNI {layout.vni}, {layout.local} -> {remote})"
        if self.underlay_netns is None:
            try:
                ipr.link("add", **spec)
            except NetlinkError as exc:
                raise OverlayNetworkError(f"cannot create {what}: {_netlink_error(exc)}") from exc
            log.info("overlay: created %s", what)
            return
        # Created where the underlay address is, then moved here: the kernel keeps the link's UDP socket in
        # the namespace it was created in.
        target: dict[str, Any] = {"net_ns_fd": self.netns} if self.netns else {"net_ns_pid": os.getpid()}
        with self._ipr(self.underlay_netns) as under:
            stale = self._link(under, self.vxlan)
            if stale is not None:  # left by a crash between the two steps
                self._delete_link(under, stale["index"], f"{self.vxlan}{self._where(self.underlay_netns)}")
            try:
                under.link("add", **spec)
            except NetlinkError as exc:
                raise OverlayNetworkError(
                    f"cannot create {what}{self._where(self.underlay_netns)}: {_netlink_error(exc)}"
                ) from exc
            index = self._must(under, self.vxlan)["index"]
            try:
                under.link("set", index=index, **target)
            except NetlinkError as exc:
                self._delete_link(under, index, self.vxlan)
                raise OverlayNetworkError(
                    f"cannot move {self.vxlan} from {self.underlay_netns} into the runner's namespace: "
                    f"{_netlink_error(exc)}"
                ) from exc
        log.info("overlay: created %s in %s and moved it here", what, self.underlay_netns)

    def _delete_link(self, ipr: Any, index: int, name: str) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            ipr.link("del", index=index)
        except NetlinkError as exc:
            if exc.code == _ENODEV:
                return
            raise OverlayNetworkError(f"cannot delete {name}: {_netlink_error(exc)}") from exc
        log.info("overlay: deleted %s", name)

    # -- mesh: forwarding entries and neighbours

    def _fdb(
        self, ipr: Any, index: int, vni_base: int
    ) -> tuple[dict[int, tuple[str, int]], dict[int, tuple[str, int]]]:
        """The link's all-zeros entries other than the remote's, and the peer bridge MAC entries, each as
        peer id -> (dst, VNI). An entry the kernel lists without a VNI has the link's own."""
        flood: dict[int, tuple[str, int]] = {}
        macs: dict[int, tuple[str, int]] = {}
        own_vni = ipr.get_links(index)[0].get(("linkinfo", "data", "vxlan_id"))
        for entry in ipr.fdb("dump", ifindex=index):
            if entry.get("ifindex") not in (None, index):
                continue
            dst = entry.get("NDA_DST")
            if dst is None:
                continue  # the link's own address, not a tunnel entry
            entry_vni = entry.get("NDA_VNI") or own_vni
            if entry_vni is None or entry_vni == own_vni:
                continue  # toward the host: the remote, or an entry of the host's VNI (not ours to manage)
            peer_id = entry_vni - vni_base
            mac = (entry.get("NDA_LLADDR") or "").lower()
            if mac == ZERO_MAC:
                flood[peer_id] = (dst, entry_vni)
            elif runner_id_of_mac(mac) == peer_id:
                macs[peer_id] = (dst, entry_vni)
        return flood, macs

    def _sync_mesh(self, ipr: Any, layout: OverlayLayout, bridge: int) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        if layout.colocated:
            self._sync_neighbours(ipr, layout, bridge)
            return
        index = self._must(ipr, self.vxlan)["index"]
        self._sync_host_entry(ipr, layout, index)
        vni_base = layout.vni - layout.runner_id
        flood, macs = self._fdb(ipr, index, vni_base)
        for kind, current, wanted in (
            ("flood", flood, layout.flood_entries()),
            ("mac", macs, layout.mac_entries()),
        ):
            to_add, to_remove = fdb_changes(current, wanted)
            for peer_id, (dst, peer_vni) in sorted(to_remove.items()):
                mac = ZERO_MAC if kind == "flood" else bridge_mac(peer_id)
                try:
                    ipr.fdb("del", ifindex=index, lladdr=mac, dst=dst, vni=peer_vni)
                except NetlinkError as exc:
                    if exc.code not in (_ENOENT, _ENODEV):
                        raise OverlayNetworkError(
                            f"cannot remove the forwarding entry {mac} -> {dst} (VNI {peer_vni}) from "
                            f"{self.vxlan}: {_netlink_error(exc)}"
                        ) from exc
                log.info("overlay: %s: removed %s -> %s (runner %s)", self.vxlan, mac, dst, peer_id)
            for peer_id, (dst, peer_vni) in sorted(to_add.items()):
                mac = ZERO_MAC if kind == "flood" else bridge_mac(peer_id)
                try:
                    # append: several all-zeros entries (one per peer) coexist; a MAC has one entry.
                    command = "append" if kind == "flood" else "add"
                    ipr.fdb(command, ifindex=index, lladdr=mac, dst=dst, vni=peer_vni)
                except NetlinkError as exc:
                    if exc.code != _EEXIST:
                        raise OverlayNetworkError(
                            f"cannot add the forwarding entry {mac} -> {dst} (VNI {peer_vni}) to "
                            f"{self.vxlan}: {_netlink_error(exc)}"
                        ) from exc
                log.info("overlay: %s: %s -> %s VNI %s (runner %s)", self.vxlan, mac, dst, peer_vni, peer_id)
        self._sync_neighbours(ipr, layout, bridge)

    def _sync_host_entry(self, ipr: Any, layout: OverlayLayout, index: int) -> None:
        """Exactly one forwarding entry for the host link's MAC: toward the host, with the link's own VNI."""
        from pyroute2.netlink.exceptions import NetlinkError

        own_vni = ipr.get_links(index)[0].get(("linkinfo", "data", "vxlan_id"))
        wanted = (str(layout.host_underlay), own_vni)
        found = []
        for entry in ipr.fdb("dump", ifindex=index):
            dst = entry.get("NDA_DST")
            if entry.get("ifindex") not in (None, index) or dst is None:
                continue
            if (entry.get("NDA_LLADDR") or "").lower() == layout.host_mac:
                found.append((dst, entry.get("NDA_VNI") or own_vni))
        if found == [wanted]:
            return
        for dst, entry_vni in found:
            try:
                ipr.fdb("del", ifindex=index, lladdr=layout.host_mac, dst=dst, vni=entry_vni)
            except NetlinkError as exc:
                if exc.code not in (_ENOENT, _ENODEV):
                    raise OverlayNetworkError(
                        f"cannot remove the forwarding entry {layout.host_mac} -> {dst} from {self.vxlan}: "
                        f"{_netlink_error(exc)}"
                    ) from exc
        try:
            ipr.fdb("add", ifindex=index, lladdr=layout.host_mac, dst=wanted[0])
        except NetlinkError as exc:
            if exc.code != _EEXIST:
                raise OverlayNetworkError(
                    f"cannot add the forwarding entry {layout.host_mac} -> {wanted[0]} (the host) to "
                    f"{self.vxlan}: {_netlink_error(exc)}"
                ) from exc
        log.info("overlay: %s: %s -> %s (the host)", self.vxlan, layout.host_mac, wanted[0])

    def _sync_neighbours(self, ipr: Any, layout: OverlayLayout, bridge: int) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        wanted = layout.neighbours()
        current: dict[str, str] = {}
        for entry in ipr.get_neighbours(family=socket.AF_INET, ifindex=bridge):
            dst, mac = entry.get("NDA_DST"), (entry.get("NDA_LLADDR") or "").lower()
            if dst and entry["state"] & _NUD_PERMANENT and runner_id_of_mac(mac) is not None:
                current[dst] = mac
        for dst, mac in current.items():
            if wanted.get(dst) != mac:
                try:
                    ipr.neigh("del", dst=dst, lladdr=mac, ifindex=bridge)
                except NetlinkError as exc:
                    if exc.code not in (_ENOENT, _ENODEV):
                        raise OverlayNetworkError(
                            f"cannot remove the neighbour {dst} from {self.bridge}: {_netlink_error(exc)}"
                        ) from exc
                log.info("overlay: %s: removed neighbour %s", self.bridge, dst)
        for dst, mac in wanted.items():
            if current.get(dst) == mac:
                continue
            try:
                ipr.neigh("replace", dst=dst, lladdr=mac, ifindex=bridge, state=_NUD_PERMANENT)
            except NetlinkError as exc:
                raise OverlayNetworkError(
                    f"cannot add the neighbour {dst} ({mac}) on {self.bridge}: {_netlink_error(exc)}"
                ) from exc
            log.info("overlay: %s: neighbour %s is %s", self.bridge, dst, mac)

    # -- routes and the rule

    def _routes(self, ipr: Any, table: int) -> dict[Route, dict[str, Any]]:
        found: dict[Route, dict[str, Any]] = {}
        for route in ipr.get_routes(family=socket.AF_INET, table=table):
            if route.get("table") != table and route.get("RTA_TABLE") != table:
                continue
            dst = ipaddress.IPv4Network((route.get("dst") or "0.0.0.0", route["dst_len"]))
            gateway = route.get("gateway")
            key = Route(dst, ipaddress.IPv4Address(gateway) if gateway else None)
            found[key] = {
                "oif": route.get("oif"),
                "dst": str(dst.network_address),
                "dst_len": dst.prefixlen,
                "gateway": gateway,
                "scope": route["scope"],
            }
        return found

    def _ensure_routes(self, ipr: Any, layout: OverlayLayout, bridge: int) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        table = layout.table
        current = self._routes(ipr, table)
        wanted = layout.routes()
        for route, found in current.items():
            if route in wanted and found["oif"] == bridge:
                continue
            self._delete_route(ipr, table, found)
            log.info("overlay: removed the route %s from table %s", route, table)
        current = self._routes(ipr, table)
        # Routes on the bridge first: a gateway route needs its gateway reachable in the table.
        for route in sorted(wanted - set(current), key=lambda r: (r.gateway is not None, str(r.dst))):
            spec: dict[str, Any] = {"table": table, "dst": str(route.dst), "oif": bridge}
            if route.gateway is None:
                spec["scope"] = _RT_SCOPE_LINK
                if route.dst == layout.subnet:
                    spec["prefsrc"] = str(layout.gateway)
            else:
                spec["gateway"] = str(route.gateway)
            try:
                ipr.route("add", **spec)
            except NetlinkError as exc:
                if exc.code == _EEXIST:
                    continue
                raise OverlayNetworkError(
                    f"cannot add the route {route} (table {table}): {_netlink_error(exc)}"
                ) from exc
            log.info("overlay: route %s in table %s", route, table)
        self._ensure_rule(ipr, table)

    def _rules_of_bridge(self, ipr: Any) -> list[Any]:
        return [r for r in ipr.get_rules(family=socket.AF_INET) if r.get("FRA_IIFNAME") == self.bridge]

    def _ensure_rule(self, ipr: Any, table: int) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        have = False
        for rule in self._rules_of_bridge(ipr):
            rule_table = rule.get("FRA_TABLE") or rule.get("table")
            if rule_table == table and rule.get("FRA_PRIORITY") == RULE_PRIORITY and not have:
                have = True
                continue
            self._delete_rule(ipr, rule)
        if have:
            return
        try:
            ipr.rule("add", table=table, priority=RULE_PRIORITY, iifname=self.bridge)
        except NetlinkError as exc:
            raise OverlayNetworkError(
                f"cannot add the rule iif {self.bridge} lookup {table}: {_netlink_error(exc)}"
            ) from exc
        log.info("overlay: rule iif %s lookup %s", self.bridge, table)

    def _delete_rule(self, ipr: Any, rule: Any) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        table = rule.get("FRA_TABLE") or rule.get("table")
        priority = rule.get("FRA_PRIORITY")
        try:
            ipr.rule("del", table=table, priority=priority, iifname=self.bridge)
        except NetlinkError as exc:
            if exc.code not in (_ENOENT, _ESRCH):
                raise OverlayNetworkError(
                    f"cannot remove the rule iif {self.bridge} lookup {table}: {_netlink_error(exc)}"
                ) from exc
        log.info("overlay: removed the rule iif %s lookup %s (priority %s)", self.bridge, table, priority)

    # -- sysctl and firewall

    def _ensure_sysctl(self, key: str, value: str) -> None:
        # The runner's own namespace through /proc; another only from inside it (sysctl under ip netns exec).
        if self.netns is None:
            path = Path("/proc/sys") / key.replace(".", "/")
            try:
                if path.read_text().strip() == value:
                    return
                path.write_text(value + "\n")
            except OSError as exc:
                raise OverlayNetworkError(f"cannot set {key} = {value}: {exc}") from exc
        else:
            done = self._run(["sysctl", "-n", key], f"read {key}")
            if done.returncode == 0 and done.stdout.strip() == value:
                return
            done = self._run(["sysctl", "-q", "-w", f"{key}={value}"], f"set {key}")
            if done.returncode != 0:
                raise OverlayNetworkError(
                    f"cannot set {key} = {value}{self._where(self.netns)}: {done.stderr.strip()}"
                )
        log.info("overlay: %s = %s%s", key, value, self._where(self.netns))

    def _marked(self, table: str, chain: str) -> list[tuple[str, list[str]]]:
        """This bridge's marked rules of ``chain``: (comment, the rule's ``-S`` words after ``-A CHAIN``)."""
        done = self._run(
            [self.iptables, "-w", "10", "-t", table, "-S", chain], f"list iptables {table} {chain}"
        )
        if done.returncode != 0:
            raise OverlayNetworkError(f"cannot list iptables -t {table} {chain}: {done.stderr.strip()}")
        prefix = f"{COMMENT_PREFIX}:{self.bridge}:"
        found = []
        for line in done.stdout.splitlines():
            words = shlex.split(line)
            if len(words) < 2 or words[0] != "-A" or words[1] != chain or "--comment" not in words:
                continue
            comment = words[words.index("--comment") + 1]
            if comment.startswith(prefix):
                found.append((comment, words[2:]))
        return found

    def _ensure_rules(self, rules: list[FirewallRule]) -> None:
        chains = sorted({(r.table, r.chain) for r in rules} | {("nat", "POSTROUTING"), ("filter", "FORWARD")})
        for table, chain in chains:
            wanted = {r.comment(self.bridge): r for r in rules if (r.table, r.chain) == (table, chain)}
            seen: set[str] = set()
            for comment, words in self._marked(table, chain):
                if comment in wanted and comment not in seen:
                    seen.add(comment)
                    continue
                self._delete_rule_words(table, chain, words)
            for comment, rule in wanted.items():
                if comment in seen:
                    continue
                base = [self.iptables, "-w", "10", "-t", table]
                where = ["-I", chain, "1"] if rule.insert else ["-A", chain]
                done = self._run([*base, *where, *rule.argv(self.bridge)], f"add iptables rule {rule}")
                if done.returncode != 0:
                    raise OverlayNetworkError(f"cannot add iptables rule {rule}: {done.stderr.strip()}")
                log.info("overlay: added iptables rule %s", rule)

    def _delete_rule_words(self, table: str, chain: str, words: list[str]) -> None:
        argv = [self.iptables, "-w", "10", "-t", table, "-D", chain, *words]
        done = self._run(argv, f"delete iptables rule {' '.join(words)}")
        if done.returncode != 0:
            raise OverlayNetworkError(
                f"cannot delete iptables rule -t {table} {chain} {shlex.join(words)}: {done.stderr.strip()}"
            )
        log.info("overlay: deleted iptables rule -t %s %s %s", table, chain, shlex.join(words))

    # -- teardown

    def teardown(self) -> None:
        """Remove everything ``ensure`` made: the marked firewall rules, the rule and its routes, the VXLAN
        link, the bridge (only if its MAC says it is ours). Missing pieces are skipped."""
        with self._lock:
            for table, chain in (("nat", "POSTROUTING"), ("filter", "FORWARD")):
                for _comment, words in self._marked(table, chain):
                    self._delete_rule_words(table, chain, words)
            with self._ipr(self.netns) as ipr:
                bridge = self._link(ipr, self.bridge)
                for rule in self._rules_of_bridge(ipr):
                    table = rule.get("FRA_TABLE") or rule.get("table")
                    if bridge is not None:
                        for found in self._routes(ipr, table).values():
                            if found["oif"] == bridge["index"]:
                                self._delete_route(ipr, table, found)
                    self._delete_rule(ipr, rule)
                vxlan = self._link(ipr, self.vxlan)
                if vxlan is not None and vxlan.get(("linkinfo", "kind")) == "vxlan":
                    self._delete_link(ipr, vxlan["index"], self.vxlan)
                if bridge is not None:
                    if runner_id_of_mac(bridge.get("address") or "") is None:
                        log.warning("overlay: %s was not made by the runner; not deleting it", self.bridge)
                    else:
                        self._delete_link(ipr, bridge["index"], self.bridge)

    def _delete_route(self, ipr: Any, table: int, found: Mapping[str, Any]) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            # The scope too: without it the kernel finds no scope-link route to delete.
            spec = {"dst": found["dst"], "dst_len": found["dst_len"], "scope": found["scope"]}
            if found["gateway"]:
                spec["gateway"] = found["gateway"]
            ipr.route("del", table=table, **spec)
        except NetlinkError as exc:
            if exc.code not in (_ESRCH, _ENODEV):
                raise OverlayNetworkError(
                    f"cannot remove a route of table {table}: {_netlink_error(exc)}"
                ) from exc
