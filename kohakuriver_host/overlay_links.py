"""The host's end of the VXLAN overlay in the kernel: one VXLAN link per runner, the host's own overlay
address, IPv4 forwarding between the runners' subnets, and the firewall accepts that let it through.

The host is the hub: runner ``N``'s link ``vxkr<N in base 36>`` carries VNI ``OVERLAY_VXLAN_ID + N`` from
``HOST_REACHABLE_ADDRESS`` to the runner's underlay address, learns nothing (one fixed remote), and holds
the host's address on that runner's subnet (subnet + 254, the runner's next hop toward the rest of the
overlay); the kernel's connected routes then route between runners at L3, no bridge. Its MAC is
``host_link_mac(N)`` (``02:6b:68`` + the runner id), not a random one: the runner computes it and pins it
in its VXLAN link's forwarding table, so in mesh mode, where the runner's link also floods to every peer,
unicast to the host goes to the host alone instead of to every peer and every container behind it.

Where the host's underlay address is on a Linux bridge (a hypervisor's ``br0``), everything it relays in
hub mode is segmented and checksummed in software: a bridge has no encapsulation offloads, so the kernel
cannot hand a VXLAN-encapsulated GSO packet to it whole (``bench/overlay.py --host-on-bridge``: hub
throughput falls by more than half). ``reconcile`` says so once per device in the log. The host's own overlay
address (``BASE+1/TOTAL_PREFIX``) sits on ``kohaku-host``: a dummy link, or an empty bridge on kernels built
without the dummy driver (an address on it is as local as on a dummy).

``OverlayLinks.reconcile(wanted)`` makes the kernel match ``wanted`` (runner id -> underlay address) and
changes only what differs: missing links are made, a link whose VXLAN parameters differ (VNI, remote, local
address, port, learning: the kernel changes few of them in place) is made again, MTU, addresses and the up
state are fixed in place, and ``vxkr*`` VXLAN links nobody wants any more are deleted. Every step reads the
kernel first, so a second call changes nothing and a call after a crash half-way finishes the job; a host
restart therefore leaves working links alone and traffic flows on. ``teardown()`` removes all of it (used
when the overlay was turned off in the configuration).

Firewall: two ``FORWARD`` accepts (from and to the overlay) inserted at the top of the chain, each checked
with ``-C`` first so that restarts never pile them up, both marked with the comment
``kohakuriver-host-overlay`` so that a runner on the same machine (whose own rules match the same
networks) is never touched by the host's teardown, and so that a rule for a former ``OVERLAY_SUBNET`` is
recognised and removed. All firewall and sysctl work runs as argv lists (``ip netns exec NS ...`` when the
links live in a network namespace, which is how the tests run it: never in the machine's own namespace).

Everything here blocks (netlink, iptables): the host calls it through ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

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

from kohakuriver_proto.overlay import (
    LINK_PREFIX,
    host_address_on,
    host_link_mac,
    host_overlay_address,
    link_name,
    runner_id_of_link,
    runner_subnet,
    vni,
)
from kohakuriver_proto.settings import OverlaySubnet

__all__ = [
    "HOST_LINK",
    "LINK_PREFIX",
    "RULE_COMMENT",
    "Changes",
    "HostSide",
    "LinkPlan",
    "LinkState",
    "OverlayLinkError",
    "OverlayLinks",
    "host_link_mac",
    "plan_host_side",
]

log = logging.getLogger("kohakuriver.host.overlay")

HOST_LINK = "kohaku-host"
RULE_COMMENT = "kohakuriver-host-overlay"
_COMMAND_TIMEOUT = 30.0  # iptables waits at most 10 s for the xtables lock (-w 10), then fails
_EOPNOTSUPP = 95
_ENODEV = 19
_IFF_UP = 1


class OverlayLinkError(Exception):
    """A step on the host's overlay links failed; the message names the step and the link or rule."""


# -- what the host side should be (pure) ---------------------------------------------------------------------


@attrs.frozen
class LinkPlan:
    """One runner's VXLAN link as it must be."""

    runner_id: int
    name: str
    vni: int
    local: ipaddress.IPv4Address
    remote: ipaddress.IPv4Address
    port: int
    mtu: int
    #: The host's address on the runner's subnet, with the subnet's prefix.
    address: ipaddress.IPv4Interface
    mac: str


@attrs.frozen
class HostSide:
    """The whole host side: the overlay network (the firewall rules), the host's own address, the links."""

    overlay: ipaddress.IPv4Network
    host_address: ipaddress.IPv4Interface
    links: tuple[LinkPlan, ...]


def plan_host_side(
    plan: OverlaySubnet,
    *,
    vxlan_id: int,
    port: int,
    mtu: int,
    local: ipaddress.IPv4Address | str,
    wanted: Mapping[int, ipaddress.IPv4Address | str],
) -> HostSide:
    """The links for ``wanted`` (runner id -> the runner's underlay address), in runner id order."""
    local_address = ipaddress.IPv4Address(local)
    links = []
    for runner_id in sorted(wanted):
        subnet = runner_subnet(plan, runner_id)
        links.append(
            LinkPlan(
                runner_id=runner_id,
                name=link_name(runner_id),
                vni=vni(vxlan_id, runner_id),
                local=local_address,
                remote=ipaddress.IPv4Address(wanted[runner_id]),
                port=port,
                mtu=mtu,
                address=ipaddress.IPv4Interface(f"{host_address_on(plan, runner_id)}/{subnet.prefixlen}"),
                mac=host_link_mac(runner_id),
            )
        )
    return HostSide(plan.network, host_overlay_address(plan), tuple(links))


# -- what the kernel has -------------------------------------------------------------------------------------


@attrs.frozen
class LinkState:
    """A ``vxkr*`` link as the kernel has it (``None`` where the kernel did not say)."""

    name: str
    runner_id: int | None
    kind: str | None
    vni: int | None
    local: str | None
    remote: str | None
    port: int | None
    learning: bool | None
    mtu: int
    up: bool
    addresses: tuple[str, ...]
    mac: str | None = None


@attrs.frozen
class Changes:
    """What one call changed: links created, fixed in place, deleted; ``notes`` says what else it did."""

    created: tuple[str, ...] = ()
    fixed: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.created or self.fixed or self.deleted or self.notes)


def _netlink_error(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    if isinstance(code, int) and code > 0:
        return f"{os.strerror(code)} (errno {code})"
    return str(exc) or type(exc).__name__


def _state(link: Any, addresses: tuple[str, ...]) -> LinkState:
    data = link.get(("linkinfo", "data"))
    name = link.get("ifname")

    def attr(key: str) -> Any:
        return None if data is None else data.get(key)

    learning = attr("IFLA_VXLAN_LEARNING")
    return LinkState(
        name=name,
        runner_id=runner_id_of_link(name),
        kind=link.get(("linkinfo", "kind")),
        vni=attr("IFLA_VXLAN_ID"),
        local=attr("IFLA_VXLAN_LOCAL"),
        remote=attr("IFLA_VXLAN_GROUP"),
        port=attr("IFLA_VXLAN_PORT"),
        learning=None if learning is None else bool(learning),
        mtu=int(link.get("mtu") or 0),
        up=bool(link["flags"] & _IFF_UP),
        addresses=addresses,
        mac=(link.get("address") or "").lower() or None,
    )


def _vxlan_differences(state: LinkState, want: LinkPlan) -> list[str]:
    """What cannot be fixed in place (the kernel refuses to change a VXLAN's VNI or port)."""
    found = []
    if state.kind != "vxlan":
        return [f"it is a {state.kind or 'plain'} link"]
    if state.vni != want.vni:
        found.append(f"VNI {state.vni} (want {want.vni})")
    if state.remote != str(want.remote):
        found.append(f"remote {state.remote} (want {want.remote})")
    if state.local != str(want.local):
        found.append(f"local {state.local} (want {want.local})")
    if state.port != want.port:
        found.append(f"port {state.port} (want {want.port})")
    if state.learning is not False:
        found.append("learning on")
    return found


# -- the links -----------------------------------------------------------------------------------------------


class OverlayLinks:
    """The host side of the overlay for one address plan, in network namespace ``netns`` (None: the host's
    own). Blocking; calls on one instance are serialized by a lock."""

    def __init__(
        self,
        plan: OverlaySubnet,
        *,
        vxlan_id: int,
        port: int,
        mtu: int,
        local: ipaddress.IPv4Address | str,
        netns: str | None = None,
        iptables: str = "iptables",
    ) -> None:
        self.plan = plan
        self.vxlan_id = vxlan_id
        self.port = port
        self.mtu = mtu
        self.local = ipaddress.IPv4Address(local)
        self.netns = netns
        self.iptables = iptables
        self._lock = threading.Lock()
        #: Underlay devices already named in the log as bridges (said once, not at every reconcile).
        self._bridges_said: set[str] = set()

    def desired(self, wanted: Mapping[int, ipaddress.IPv4Address | str]) -> HostSide:
        return plan_host_side(
            self.plan, vxlan_id=self.vxlan_id, port=self.port, mtu=self.mtu, local=self.local, wanted=wanted
        )

    # -- helpers

    @property
    def _where(self) -> str:
        return f" in network namespace {self.netns}" if self.netns else ""

    @contextmanager
    def _ipr(self) -> Iterator[Any]:  # pyroute2's IPRoute and its messages are untyped
        from pyroute2 import IPRoute  # imported here: a host without the overlay never loads it

        try:
            # flags=0: a namespace that does not exist is an error, not created (pyroute2's default).
            ipr = IPRoute(netns=self.netns, flags=0) if self.netns else IPRoute()
        except FileNotFoundError as exc:
            raise OverlayLinkError(f"network namespace {self.netns} does not exist") from exc
        except OSError as exc:
            raise OverlayLinkError(f"cannot open netlink{self._where}: {exc}") from exc
        try:
            yield ipr
        finally:
            ipr.close()

    def _run(self, argv: list[str], what: str) -> subprocess.CompletedProcess[str]:
        argv = (["ip", "netns", "exec", self.netns] if self.netns else []) + argv
        try:
            return subprocess.run(
                argv, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT, check=False,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        except FileNotFoundError as exc:
            raise OverlayLinkError(f"{what}: {argv[0]} is not installed") from exc
        except subprocess.TimeoutExpired as exc:
            raise OverlayLinkError(
                f"{what}: {shlex.join(argv)} did not finish in {_COMMAND_TIMEOUT:.0f} s"
            ) from exc

    @staticmethod
    def _ipv4(ipr: Any, index: int) -> list[tuple[str, int]]:
        return [(a.get("address"), a["prefixlen"]) for a in ipr.get_addr(index=index, family=socket.AF_INET)]

    @staticmethod
    def _find(ipr: Any, name: str) -> Any:
        found = ipr.link_lookup(ifname=name)
        return ipr.get_links(found[0])[0] if found else None

    def _ours(self, ipr: Any) -> list[Any]:
        return [link for link in ipr.get_links() if (link.get("ifname") or "").startswith(LINK_PREFIX)]

    # -- reading

    def states(self) -> dict[str, LinkState]:
        """Every ``vxkr*`` link the kernel has, by name."""
        with self._lock, self._ipr() as ipr:
            found = {}
            for link in self._ours(ipr):
                addresses = tuple(f"{a}/{p}" for a, p in self._ipv4(ipr, link["index"]))
                found[link.get("ifname")] = _state(link, addresses)
            return found

    def present(self) -> bool:
        """Whether the host's links exist (``kohaku-host`` or a ``vxkr*`` link): teardown's cue. In the
        machine's own namespace this reads ``/sys/class/net`` (no netlink library loaded for a host whose
        overlay is off); elsewhere netlink."""
        if self.netns is None:
            try:
                names = os.listdir("/sys/class/net")
            except OSError:
                names = None
            if names is not None:
                return any(n == HOST_LINK or runner_id_of_link(n) is not None for n in names)
        with self._lock, self._ipr() as ipr:
            return self._find(ipr, HOST_LINK) is not None or any(
                link.get(("linkinfo", "kind")) == "vxlan" for link in self._ours(ipr)
            )

    # -- reconcile

    def reconcile(self, wanted: Mapping[int, ipaddress.IPv4Address | str]) -> Changes:
        """Make the host side match ``wanted`` (runner id -> underlay address); see the module docstring.
        Raises ``OverlayLinkError`` naming every step that failed, after doing every step it could."""
        side = self.desired(wanted)
        created: list[str] = []
        fixed: list[str] = []
        deleted: list[str] = []
        notes: list[str] = []
        errors: list[str] = []
        with self._lock:
            try:
                self._ensure_forwarding(notes)
            except OverlayLinkError as exc:
                errors.append(str(exc))
            with self._ipr() as ipr:
                try:
                    self._ensure_host_link(ipr, side.host_address, created, fixed)
                except OverlayLinkError as exc:
                    errors.append(str(exc))
                by_name = {link.name: link for link in side.links}
                for link in self._ours(ipr):
                    name = link.get("ifname")
                    if name in by_name or link.get(("linkinfo", "kind")) != "vxlan":
                        continue  # a wanted one is checked below; a foreign kind is not ours to delete
                    try:
                        self._delete(ipr, link["index"], name, "no runner has it any more")
                        deleted.append(name)
                    except OverlayLinkError as exc:
                        errors.append(str(exc))
                for plan in side.links:
                    try:
                        self._ensure_link(ipr, plan, created, fixed, deleted)
                    except OverlayLinkError as exc:
                        errors.append(str(exc))
                self._say_bridged_underlay(ipr, side)
            try:
                self._ensure_rules(side.overlay, notes)
            except OverlayLinkError as exc:
                errors.append(str(exc))
        if errors:
            raise OverlayLinkError("; ".join(errors))
        return Changes(tuple(created), tuple(dict.fromkeys(fixed)), tuple(deleted), tuple(notes))

    def _ensure_forwarding(self, notes: list[str]) -> None:
        # Per network namespace: the host's own through /proc, another's from inside it (sysctl argv).
        if self.netns is None:
            path = Path("/proc/sys/net/ipv4/ip_forward")
            try:
                if path.read_text().strip() == "1":
                    return
                path.write_text("1\n")
            except OSError as exc:
                raise OverlayLinkError(f"cannot turn on IPv4 forwarding: {exc}") from exc
        else:
            done = self._run(["sysctl", "-n", "net.ipv4.ip_forward"], "read IPv4 forwarding")
            if done.returncode == 0 and done.stdout.strip() == "1":
                return
            done = self._run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"], "turn on IPv4 forwarding")
            if done.returncode != 0:
                raise OverlayLinkError(f"cannot turn on IPv4 forwarding{self._where}: {done.stderr.strip()}")
        notes.append("IPv4 forwarding turned on")
        log.info("overlay: IPv4 forwarding turned on%s", self._where)

    def _ensure_host_link(
        self, ipr: Any, address: ipaddress.IPv4Interface, created: list[str], fixed: list[str]
    ) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        link = self._find(ipr, HOST_LINK)
        if link is not None and link.get(("linkinfo", "kind")) not in ("dummy", "bridge"):
            raise OverlayLinkError(
                f"{HOST_LINK} exists and is a {link.get(('linkinfo', 'kind')) or 'plain'} link, not the"
                " host's overlay link: remove it or rename it"
            )
        if link is None:
            try:
                ipr.link("add", ifname=HOST_LINK, kind="dummy")
            except NetlinkError as exc:
                if exc.code != _EOPNOTSUPP:
                    raise OverlayLinkError(f"cannot create {HOST_LINK}: {_netlink_error(exc)}") from exc
                # A kernel without the dummy driver: an empty bridge holds a local address just as well.
                try:
                    ipr.link("add", ifname=HOST_LINK, kind="bridge")
                except NetlinkError as exc2:
                    raise OverlayLinkError(f"cannot create {HOST_LINK}: {_netlink_error(exc2)}") from exc2
            created.append(HOST_LINK)
            log.info("overlay: created %s%s", HOST_LINK, self._where)
            link = self._find(ipr, HOST_LINK)
            if link is None:
                raise OverlayLinkError(f"{HOST_LINK} vanished right after it was created")
        if self._ensure_addresses(ipr, link["index"], HOST_LINK, address):
            fixed.append(HOST_LINK)
        if self._ensure_up(ipr, link, HOST_LINK):
            fixed.append(HOST_LINK)

    def _ensure_link(
        self, ipr: Any, plan: LinkPlan, created: list[str], fixed: list[str], deleted: list[str]
    ) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        link = self._find(ipr, plan.name)
        if link is not None:
            differences = _vxlan_differences(_state(link, ()), plan)
            if differences and link.get(("linkinfo", "kind")) != "vxlan":
                raise OverlayLinkError(
                    f"{plan.name} exists and {differences[0]}: not the host's VXLAN link to runner"
                    f" {plan.runner_id}; remove it"
                )
            if differences:
                # The kernel cannot change a VXLAN's VNI or port in place: make it again (only this
                # runner's traffic pauses, and its parameters were wrong anyway).
                self._delete(ipr, link["index"], plan.name, ", ".join(differences))
                deleted.append(plan.name)
                link = None
        if link is None:
            try:
                ipr.link(
                    "add",
                    ifname=plan.name,
                    kind="vxlan",
                    vxlan_id=plan.vni,
                    vxlan_local=str(plan.local),
                    vxlan_group=str(plan.remote),
                    vxlan_port=plan.port,
                    vxlan_learning=0,
                    mtu=plan.mtu,
                    address=plan.mac,
                )
            except NetlinkError as exc:
                raise OverlayLinkError(
                    f"cannot create VXLAN link {plan.name} (VNI {plan.vni}, {plan.local} -> {plan.remote}"
                    f" port {plan.port}){self._where}: {_netlink_error(exc)}"
                ) from exc
            created.append(plan.name)
            log.info(
                "overlay: created %s (runner %d, VNI %d, %s -> %s port %d)%s",
                plan.name, plan.runner_id, plan.vni, plan.local, plan.remote, plan.port, self._where,
            )  # fmt: skip
            link = self._find(ipr, plan.name)
            if link is None:
                raise OverlayLinkError(f"{plan.name} vanished right after it was created")
        index = link["index"]
        if int(link.get("mtu") or 0) != plan.mtu:
            try:
                ipr.link("set", index=index, mtu=plan.mtu)
            except NetlinkError as exc:
                raise OverlayLinkError(f"cannot set the MTU of {plan.name}: {_netlink_error(exc)}") from exc
            fixed.append(plan.name)
            log.info("overlay: %s MTU set to %d", plan.name, plan.mtu)
        if (link.get("address") or "").lower() != plan.mac:
            # A link made before MACs were fixed (or changed by hand). Changed in place, up: the runner's
            # cached neighbour entry for the old MAC goes stale and is resolved again within seconds.
            try:
                ipr.link("set", index=index, address=plan.mac)
            except NetlinkError as exc:
                raise OverlayLinkError(f"cannot set the MAC of {plan.name}: {_netlink_error(exc)}") from exc
            fixed.append(plan.name)
            log.info("overlay: %s MAC set to %s", plan.name, plan.mac)
        if self._ensure_addresses(ipr, index, plan.name, plan.address):
            fixed.append(plan.name)
        if self._ensure_up(ipr, self._find(ipr, plan.name), plan.name):
            fixed.append(plan.name)

    def _say_bridged_underlay(self, ipr: Any, side: HostSide) -> None:
        """Log (once per device) when the way to a runner's underlay address leaves through a Linux bridge:
        the host's own VXLAN packets are then segmented and checksummed in software (module docstring)."""
        from pyroute2.netlink.exceptions import NetlinkError

        for plan in side.links:
            try:
                found = ipr.route("get", dst=str(plan.remote))
                index = found[0].get("RTA_OIF") or found[0].get("oif")
                link = ipr.get_links(index)[0] if index else None
            except (NetlinkError, OSError, IndexError):
                continue  # no route yet: reconcile's errors say what matters
            name = None if link is None else link.get("ifname")
            if link is None or link.get(("linkinfo", "kind")) != "bridge" or name in self._bridges_said:
                continue
            self._bridges_said.add(name)
            log.warning(
                "overlay: the host's VXLAN traffic leaves through the bridge %s (toward %s)%s: a Linux "
                "bridge has no encapsulation offloads, so the kernel segments and checksums every packet the "
                "host sends into the overlay in software, which costs hub mode more than half its "
                "throughput. HOST_REACHABLE_ADDRESS on the NIC itself, or OVERLAY_MODE = 'mesh', avoids it",
                name, plan.remote, self._where,
            )  # fmt: skip

    def _ensure_addresses(self, ipr: Any, index: int, name: str, want: ipaddress.IPv4Interface) -> bool:
        """Exactly ``want`` as the link's IPv4 address (it is ours: others are removed). True if changed."""
        from pyroute2.netlink.exceptions import NetlinkError

        changed = False
        wanted = (str(want.ip), want.network.prefixlen)
        present = self._ipv4(ipr, index)
        for address, prefix in present:
            if (address, prefix) == wanted:
                continue
            try:
                ipr.addr("del", index=index, address=address, prefixlen=prefix)
            except NetlinkError as exc:
                raise OverlayLinkError(
                    f"cannot remove {address}/{prefix} from {name}: {_netlink_error(exc)}"
                ) from exc
            changed = True
            log.info("overlay: removed %s/%s from %s", address, prefix, name)
        if wanted not in present:
            try:
                ipr.addr("add", index=index, address=wanted[0], prefixlen=wanted[1])
            except NetlinkError as exc:
                raise OverlayLinkError(f"cannot add {want} to {name}: {_netlink_error(exc)}") from exc
            changed = True
            log.info("overlay: %s has address %s", name, want)
        return changed

    def _ensure_up(self, ipr: Any, link: Any, name: str) -> bool:
        from pyroute2.netlink.exceptions import NetlinkError

        if link is None:
            raise OverlayLinkError(f"{name} vanished")
        if link["flags"] & _IFF_UP:
            return False
        try:
            ipr.link("set", index=link["index"], state="up")
        except NetlinkError as exc:
            raise OverlayLinkError(f"cannot bring {name} up: {_netlink_error(exc)}") from exc
        return True

    def _delete(self, ipr: Any, index: int, name: str, why: str) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            ipr.link("del", index=index)
        except NetlinkError as exc:
            if exc.code == _ENODEV:  # gone meanwhile
                return
            raise OverlayLinkError(f"cannot delete {name}: {_netlink_error(exc)}") from exc
        log.info("overlay: deleted %s (%s)%s", name, why, self._where)

    # -- firewall

    @staticmethod
    def _rules(overlay: ipaddress.IPv4Network) -> list[list[str]]:
        # Inserted at the top: a FORWARD policy of DROP (Docker sets it) or a reject at the end of the chain
        # must not stop traffic between runners.
        marked = ["-m", "comment", "--comment", RULE_COMMENT, "-j", "ACCEPT"]
        return [["-s", str(overlay), *marked], ["-d", str(overlay), *marked]]

    def _iptables(self, *args: str) -> list[str]:
        return [self.iptables, "-w", "10", "-t", "filter", *args]

    def _marked_rules(self) -> list[list[str]]:
        """The FORWARD rules carrying the host's comment, as argument lists (without ``-A FORWARD``)."""
        done = self._run(self._iptables("-S", "FORWARD"), "list iptables FORWARD rules")
        if done.returncode != 0:
            raise OverlayLinkError(
                f"cannot list the iptables FORWARD rules{self._where}: {done.stderr.strip()}"
            )
        found = []
        for line in done.stdout.splitlines():
            words = shlex.split(line)
            if words[:2] == ["-A", "FORWARD"] and RULE_COMMENT in words:
                found.append(words[2:])
        return found

    def _ensure_rules(self, overlay: ipaddress.IPv4Network, notes: list[str]) -> None:
        wanted = self._rules(overlay)
        for rule in self._marked_rules():
            if rule not in wanted:  # a former OVERLAY_SUBNET's rule
                self._delete_rule(rule)
                notes.append(f"removed the firewall rule {shlex.join(rule)}")
        for rule in reversed(wanted):  # each inserted at the top: the first ends first
            text = shlex.join(rule)
            check = self._run(self._iptables("-C", "FORWARD", *rule), f"check iptables rule {text}")
            if check.returncode == 0:
                continue
            done = self._run(self._iptables("-I", "FORWARD", "1", *rule), f"add iptables rule {text}")
            if done.returncode != 0:
                detail = done.stderr.strip() or check.stderr.strip() or f"exit {done.returncode}"
                raise OverlayLinkError(f"cannot add iptables rule FORWARD {text}{self._where}: {detail}")
            notes.append(f"added the firewall rule FORWARD {text}")
            log.info("overlay: added iptables rule FORWARD %s%s", text, self._where)

    def _delete_rule(self, rule: list[str]) -> None:
        text = shlex.join(rule)
        done = self._run(self._iptables("-D", "FORWARD", *rule), f"delete iptables rule {text}")
        if done.returncode != 0:
            raise OverlayLinkError(
                f"cannot delete iptables rule FORWARD {text}{self._where}: {done.stderr.strip()}"
            )
        log.info("overlay: deleted iptables rule FORWARD %s%s", text, self._where)

    # -- teardown

    def teardown(self) -> Changes:
        """Remove the host side: every ``vxkr*`` VXLAN link, ``kohaku-host`` and the marked rules. IPv4
        forwarding stays on (other things on the machine may need it). Nothing to remove is no error."""
        deleted: list[str] = []
        notes: list[str] = []
        errors: list[str] = []
        with self._lock:
            with self._ipr() as ipr:
                for link in self._ours(ipr):
                    if link.get(("linkinfo", "kind")) != "vxlan":
                        continue
                    try:
                        self._delete(ipr, link["index"], link.get("ifname"), "the overlay is off")
                        deleted.append(link.get("ifname"))
                    except OverlayLinkError as exc:
                        errors.append(str(exc))
                host = self._find(ipr, HOST_LINK)
                if host is not None and host.get(("linkinfo", "kind")) in ("dummy", "bridge"):
                    try:
                        self._delete(ipr, host["index"], HOST_LINK, "the overlay is off")
                        deleted.append(HOST_LINK)
                    except OverlayLinkError as exc:
                        errors.append(str(exc))
            try:
                for rule in self._marked_rules():
                    self._delete_rule(rule)
                    notes.append(f"removed the firewall rule FORWARD {shlex.join(rule)}")
            except OverlayLinkError as exc:
                errors.append(str(exc))
        if errors:
            raise OverlayLinkError("; ".join(errors))
        return Changes(deleted=tuple(deleted), notes=tuple(notes))
