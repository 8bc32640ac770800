"""The network of this runner's VMs: one NAT bridge, a TAP per VM, the guests' addresses and DNS servers.

Every VM's NIC is a TAP device that is a port of ``VM_BRIDGE_NAME``; the bridge holds ``VM_BRIDGE_GATEWAY``
(the guests' default route, and the address the runner listens on for their agents) and the host
masquerades ``VM_BRIDGE_SUBNET`` towards everything that is not the bridge. This is the Docker bridge's
recipe (a bridge, an address, ``ip_forward``, one MASQUERADE rule, FORWARD accepts) done for QEMU, which
has no engine to do it.

- ``tap_name`` / ``mac_address`` / ``mac_for_address``: pure, deterministic names, so a restarted runner
  finds the TAPs of the VMs it adopts and removes the others (``VmBridge.taps``).
- ``guest_dns_servers`` (pure) / ``read_guest_dns_servers``: the host's resolvers as a guest can use them.
- ``AddressBook``: task id -> guest address, in ``<state_dir>/vm_addresses.json``, so a VM keeps its address
  across restarts of the VM and of the runner.
- ``VmBridge``: the bridge, its address, forwarding and NAT (``ensure``, idempotent), and the TAPs.

Everything here that touches netlink, a file or a program is blocking: the trio code of the runner calls it
through ``trio.to_thread.run_sync``. Netlink goes through pyroute2 (no ``ip`` in a shell); the firewall
through ``iptables`` argv lists (``ip netns exec <ns> iptables ...`` for a bridge in a network namespace,
which is how the tests run it: never in the machine's own namespace). Each change made is logged; a
failure raises ``VmNetworkError`` naming what failed.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kohakuriver_net.atomic_file import write_file_atomic

__all__ = [
    "DEFAULT_RESOLV_FILES",
    "MAX_IFNAME",
    "TAP_PREFIX",
    "AddressBook",
    "AddressesExhausted",
    "VmBridge",
    "VmNetworkError",
    "bridge_mac",
    "guest_dns_servers",
    "mac_address",
    "mac_for_address",
    "read_guest_dns_servers",
    "tap_name",
    "task_id_of_tap",
]

log = logging.getLogger("kohakuriver.runner.vm_network")

TAP_PREFIX = "krvm"
#: Linux interface names hold at most 15 characters (IFNAMSIZ 16 with the NUL).
MAX_IFNAME = 15

#: Base 62 (case matters in interface names): every id below 2**64 fits in the 11 characters left after
#: the prefix, so the name is the id itself, not a hash: distinct tasks never share a TAP.
_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_ID_DIGITS = MAX_IFNAME - len(TAP_PREFIX)
_MAX_TASK_ID = (1 << 64) - 1

#: /etc/resolv.conf first; where it names only systemd-resolved's stub (127.0.0.53), the upstream servers
#: resolved itself uses are in the second file.
DEFAULT_RESOLV_FILES = ("/etc/resolv.conf", "/run/systemd/resolve/resolv.conf")

_COMMAND_TIMEOUT = 30.0  # an iptables run waits at most 10 s for the xtables lock (-w 10), then fails


class VmNetworkError(Exception):
    """A network step for VMs failed; the message names the step and the object (bridge, TAP, rule)."""


class AddressesExhausted(VmNetworkError):
    """Every usable address of the VM subnet is held by a task."""


# --------------------------------------------------------------------------------------------- names


def tap_name(task_id: int) -> str:
    """The TAP of a task's VM: ``krvm`` + the id in base 62, at most 15 characters, one name per id."""
    if not 0 <= task_id <= _MAX_TASK_ID:
        raise ValueError(f"task id {task_id} is outside 0..2**64-1")
    digits = []
    n = task_id
    while True:
        n, rest = divmod(n, len(_ALPHABET))
        digits.append(_ALPHABET[rest])
        if n == 0:
            break
    name = TAP_PREFIX + "".join(reversed(digits))
    assert len(name) <= MAX_IFNAME
    return name


def task_id_of_tap(name: str) -> int | None:
    """The task id a ``tap_name`` encodes, or None for any other name (orphan cleanup reads it back)."""
    digits = name[len(TAP_PREFIX) :]
    if not name.startswith(TAP_PREFIX) or not 0 < len(digits) <= _ID_DIGITS:
        return None
    if len(digits) > 1 and digits[0] == "0":
        return None  # not a name tap_name makes
    value = 0
    for char in digits:
        index = _ALPHABET.find(char)
        if index < 0:
            return None
        value = value * len(_ALPHABET) + index
    return value if value <= _MAX_TASK_ID else None


def mac_address(task_id: int) -> str:
    """A deterministic guest MAC for a task: QEMU's ``52:54:00`` prefix + 24 bits of a hash of the id.

    24 bits cannot tell every id apart: two VMs of one bridge share a MAC with a chance of about n²/2**25
    (n VMs). ``mac_for_address`` has no such chance and is the one to prefer when the address is known."""
    if task_id < 0:
        raise ValueError(f"task id {task_id} is negative")
    digest = hashlib.blake2b(str(task_id).encode(), digest_size=3, person=b"kohakuriver-mac").digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest)


def mac_for_address(address: ipaddress.IPv4Address | str) -> str:
    """The guest MAC for a guest address: ``52:54:00`` + the address's last three bytes.

    Unique on the bridge whenever the subnet is /8 or smaller (addresses are unique there), and the same
    address always gets the same MAC, so a released address given to the next VM does not leave a stale
    ARP entry in the other guests."""
    packed = ipaddress.IPv4Address(address).packed
    return "52:54:00:" + ":".join(f"{b:02x}" for b in packed[1:])


def bridge_mac(name: str) -> str:
    """A fixed, locally administered MAC for the bridge.

    Without one a Linux bridge takes the lowest MAC of its ports and changes it as TAPs come and go; every
    guest's ARP entry for the gateway would then point at a MAC the bridge no longer answers to."""
    digest = hashlib.blake2b(name.encode(), digest_size=5, person=b"kohakuriver-br").digest()
    return "02:" + ":".join(f"{b:02x}" for b in digest)


# ----------------------------------------------------------------------------------------------- DNS


def _usable_nameserver(value: str) -> str | None:
    if "%" in value:
        return None  # a scoped (link-local) address: it names a link of the host, not one of the guest
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    if address.is_loopback or address.is_unspecified:
        return None  # the host itself: inside a guest it would be the guest
    if isinstance(address, ipaddress.IPv6Address) and address.is_link_local:
        return None
    return str(address)


def _nameservers(text: str) -> list[str]:
    found: list[str] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 2 or fields[0] != "nameserver":
            continue  # comments ('#', ';'), options, search lines, garbage
        server = _usable_nameserver(fields[1])
        if server is not None and server not in found:
            found.append(server)
    return found


def guest_dns_servers(texts: Sequence[str]) -> list[str]:
    """The nameservers a guest should use, from resolv.conf texts in order of preference (pure).

    The first text that names any nameserver a guest can reach wins: its servers in its order, without
    duplicates, IPv4 and IPv6. Loopback (systemd-resolved's 127.0.0.53, a local dnsmasq's 127.0.1.1, ::1),
    unspecified and IPv6 link-local addresses are left out: they mean the host, which a guest cannot ask.
    Empty when no text names one; the caller decides what a guest gets then."""
    for text in texts:
        servers = _nameservers(text)
        if servers:
            return servers
    return []


def read_guest_dns_servers(paths: Sequence[str | os.PathLike[str]] = DEFAULT_RESOLV_FILES) -> list[str]:
    """``guest_dns_servers`` of ``/etc/resolv.conf`` then ``/run/systemd/resolve/resolv.conf`` (blocking:
    reads files). A missing or unreadable file is skipped."""
    texts: list[str] = []
    for path in paths:
        try:
            texts.append(Path(path).read_text(encoding="utf-8", errors="replace"))
        except OSError as exc:
            log.debug("cannot read %s: %s", path, exc)
    return guest_dns_servers(texts)


# ---------------------------------------------------------------------------------------- addresses


class AddressBook:
    """Task id -> guest IPv4 address in the VM subnet, persisted in a JSON file (``{"<id>": "<ip>"}``).

    Blocking (reads the file when made, writes it, fsynced, on each change): call it through
    ``trio.to_thread.run_sync``. Safe to use from several threads. Entries the settings no longer allow
    (another subnet or gateway) are dropped when read; an unparsable file is moved aside and the book
    starts empty, so the runner re-adopting its VMs should ``claim`` their addresses before it gives out
    new ones."""

    def __init__(self, path: Path, subnet: str, gateway: str) -> None:
        self.path = Path(path)
        self.subnet = ipaddress.IPv4Network(subnet)
        self.gateway = ipaddress.IPv4Address(gateway)
        if self.gateway not in self.subnet:
            raise ValueError(f"gateway {self.gateway} is not in {self.subnet}")
        self._lock = threading.Lock()
        self._table: dict[int, ipaddress.IPv4Address] = self._load()

    def _reserved(self, address: ipaddress.IPv4Address) -> bool:
        if address == self.gateway:
            return True
        if self.subnet.prefixlen >= 31:  # RFC 3021: no network or broadcast address in a /31 (or /32)
            return False
        return address in (self.subnet.network_address, self.subnet.broadcast_address)

    def _load(self) -> dict[int, ipaddress.IPv4Address]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise VmNetworkError(f"cannot read the VM address table {self.path}: {exc}") from exc
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            # Written atomically, so this is damage from outside. Keep it for a look, start empty: the VMs
            # the runner adopts claim their addresses back (``claim``) before new ones are given out.
            aside = self.path.with_name(f"{self.path.name}.unreadable-{int(time.time())}")
            try:
                os.replace(self.path, aside)
            except OSError as move_exc:
                raise VmNetworkError(f"unreadable VM address table {self.path} ({exc}): {move_exc}") from exc
            log.error(
                "unreadable VM address table %s (%s): moved to %s, starting empty", self.path, exc, aside
            )
            return {}
        table: dict[int, ipaddress.IPv4Address] = {}
        held: set[ipaddress.IPv4Address] = set()
        for key, value in data.items():
            try:
                task_id = int(key)
                address = ipaddress.IPv4Address(value)
            except (TypeError, ValueError):
                log.warning("VM address table %s: dropping entry %r: %r", self.path, key, value)
                continue
            if address not in self.subnet or self._reserved(address) or address in held:
                # The subnet or gateway setting changed, or the file was edited: that VM gets a new address.
                log.warning(
                    "VM address table %s: task %s: %s is not usable in %s, dropped",
                    self.path,
                    task_id,
                    address,
                    self.subnet,
                )
                continue
            table[task_id] = address
            held.add(address)
        return table

    def _save(self) -> None:
        data = {str(t): str(a) for t, a in sorted(self._table.items())}
        try:
            write_file_atomic(self.path, json.dumps(data).encode(), mode=0o644, sync_dir=True)
        except OSError as exc:
            raise VmNetworkError(f"cannot write the VM address table {self.path}: {exc}") from exc

    def allocate(self, task_id: int) -> ipaddress.IPv4Address:
        """The task's address: the one it holds, else the lowest free one (saved before returning).
        Never the network, gateway or broadcast address; ``AddressesExhausted`` when none is free."""
        with self._lock:
            address = self._table.get(task_id)
            if address is not None:
                return address
            held = set(self._table.values())
            for candidate in self.subnet:
                if candidate not in held and not self._reserved(candidate):
                    address = candidate
                    break
            else:
                raise AddressesExhausted(
                    f"no free VM address in {self.subnet}: all {len(held)} are held by other VMs"
                )
            self._table[task_id] = address
            try:
                self._save()
            except BaseException:
                del self._table[task_id]
                raise
        log.info("task %s: VM address %s", task_id, address)
        return address

    def claim(self, task_id: int, address: ipaddress.IPv4Address | str) -> None:
        """Record the address a running VM already has (adopted after a lost table); refused with
        ``VmNetworkError`` when it is outside the subnet, reserved, or another task's."""
        address = ipaddress.IPv4Address(address)
        with self._lock:
            if self._table.get(task_id) == address:
                return
            if address not in self.subnet or self._reserved(address):
                raise VmNetworkError(f"task {task_id}: {address} is not a usable address of {self.subnet}")
            for other, held in self._table.items():
                if held == address and other != task_id:
                    raise VmNetworkError(f"task {task_id}: {address} is held by task {other}")
            previous = self._table.get(task_id)
            self._table[task_id] = address
            try:
                self._save()
            except BaseException:
                if previous is None:
                    del self._table[task_id]
                else:
                    self._table[task_id] = previous
                raise
        log.info("task %s: VM address %s claimed", task_id, address)

    def get(self, task_id: int) -> ipaddress.IPv4Address | None:
        with self._lock:
            return self._table.get(task_id)

    def release(self, task_id: int) -> None:
        """Free the task's address (nothing when it holds none)."""
        with self._lock:
            address = self._table.pop(task_id, None)
            if address is None:
                return
            try:
                self._save()
            except BaseException:
                self._table[task_id] = address
                raise
        log.info("task %s: VM address %s released", task_id, address)

    def items(self) -> dict[int, ipaddress.IPv4Address]:
        with self._lock:
            return dict(self._table)


# ------------------------------------------------------------------------------------------- bridge


def _netlink_error(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    if isinstance(code, int) and code > 0:
        return f"{os.strerror(code)} (errno {code})"
    return str(exc) or type(exc).__name__


class VmBridge:
    """The VM bridge named ``name`` holding ``gateway`` in ``subnet``, in the network namespace ``netns``
    (None: the runner's own). All methods are blocking (netlink, iptables, sysctl): call them through
    ``trio.to_thread.run_sync``. Calls on one instance are serialized by a lock."""

    def __init__(
        self, name: str, subnet: str, gateway: str, *, netns: str | None = None, iptables: str = "iptables"
    ) -> None:
        if not 0 < len(name) <= MAX_IFNAME or "/" in name or ":" in name or any(c.isspace() for c in name):
            raise ValueError(f"{name!r} is not a valid interface name")
        self.name = name
        self.subnet = ipaddress.IPv4Network(subnet)
        self.gateway = ipaddress.IPv4Address(gateway)
        if self.gateway not in self.subnet:
            raise ValueError(f"gateway {self.gateway} is not in {self.subnet}")
        self.netns = netns
        self.iptables = iptables
        self._lock = threading.Lock()

    # -- helpers

    @contextmanager
    def _ipr(self) -> Iterator[Any]:  # pyroute2's IPRoute and messages are untyped
        from pyroute2 import IPRoute  # imported here: a runner without VMs never loads it

        where = f" in network namespace {self.netns}" if self.netns else ""
        try:
            # flags=0: a namespace that does not exist is an error, not created (pyroute2's default).
            ipr = IPRoute(netns=self.netns, flags=0) if self.netns else IPRoute()
        except FileNotFoundError as exc:
            raise VmNetworkError(f"network namespace {self.netns} does not exist") from exc
        except OSError as exc:
            raise VmNetworkError(f"cannot open netlink{where}: {exc}") from exc
        try:
            yield ipr
        finally:
            ipr.close()

    def _ns_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns] if self.netns else []

    def _run(self, argv: list[str], what: str) -> subprocess.CompletedProcess[str]:
        argv = self._ns_prefix() + argv
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
            raise VmNetworkError(f"{what}: {argv[0]} is not installed") from exc
        except subprocess.TimeoutExpired as exc:
            raise VmNetworkError(
                f"{what}: {' '.join(argv)} did not finish in {_COMMAND_TIMEOUT:.0f} s"
            ) from exc

    @staticmethod
    def _link(ipr: Any, name: str) -> Any:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return None
        return ipr.get_links(found[0])[0]

    def _bridge_index(self, ipr: Any) -> int:
        link = self._link(ipr, self.name)
        if link is None:
            raise VmNetworkError(f"bridge {self.name} does not exist (VmBridge.ensure makes it)")
        return link["index"]

    # -- the bridge

    def ensure(self) -> None:
        """Make the bridge as it should be, changing only what is not: the bridge (with a fixed MAC), the
        gateway address with the subnet's prefix, up; IPv4 forwarding on; the MASQUERADE rule for the subnet
        towards every other interface and the FORWARD accepts (out of the bridge: all; into it: replies
        only, so nothing outside reaches a guest it did not talk to). Repeated calls change nothing."""
        with self._lock:
            with self._ipr() as ipr:
                index = self._ensure_link(ipr)
                self._ensure_address(ipr, index)
                self._ensure_up(ipr, index, self.name)
            self._ensure_forwarding()
            for table, chain, insert, rule in self._rules():
                self._ensure_rule(table, chain, insert, rule)

    def _ensure_link(self, ipr: Any) -> int:
        from pyroute2.netlink.exceptions import NetlinkError

        link = self._link(ipr, self.name)
        if link is not None:
            kind = link.get(("linkinfo", "kind"))
            if kind != "bridge":
                raise VmNetworkError(f"{self.name} exists and is a {kind or 'plain'} link, not a bridge")
            return link["index"]
        try:
            ipr.link("add", ifname=self.name, kind="bridge", address=bridge_mac(self.name))
        except NetlinkError as exc:
            raise VmNetworkError(f"cannot create bridge {self.name}: {_netlink_error(exc)}") from exc
        log.info("VM network: created bridge %s", self.name)
        return self._bridge_index(ipr)

    def _ensure_address(self, ipr: Any, index: int) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        present = [
            (a.get("address"), a["prefixlen"]) for a in ipr.get_addr(index=index, family=socket.AF_INET)
        ]
        wanted = (str(self.gateway), self.subnet.prefixlen)
        if wanted in present:
            return
        if present:
            log.warning(
                "VM network: bridge %s also holds %s", self.name, ", ".join(f"{a}/{p}" for a, p in present)
            )
        try:
            ipr.addr("add", index=index, address=wanted[0], prefixlen=wanted[1])
        except NetlinkError as exc:
            raise VmNetworkError(
                f"cannot add {wanted[0]}/{wanted[1]} to bridge {self.name}: {_netlink_error(exc)}"
            ) from exc
        log.info("VM network: bridge %s has address %s/%s", self.name, *wanted)

    def _ensure_up(self, ipr: Any, index: int, name: str) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        link = ipr.get_links(index)[0]
        if link["flags"] & 1:  # IFF_UP
            return
        try:
            ipr.link("set", index=index, state="up")
        except NetlinkError as exc:
            raise VmNetworkError(f"cannot bring {name} up: {_netlink_error(exc)}") from exc
        log.info("VM network: %s is up", name)

    def _ensure_forwarding(self) -> None:
        # Per network namespace: the runner's own is read and written through /proc; another namespace's
        # only from inside it (sysctl under ip netns exec).
        where = f" in network namespace {self.netns}" if self.netns else ""
        if self.netns is None:
            path = Path("/proc/sys/net/ipv4/ip_forward")
            try:
                if path.read_text().strip() == "1":
                    return
                path.write_text("1\n")
            except OSError as exc:
                raise VmNetworkError(f"cannot turn on IPv4 forwarding: {exc}") from exc
        else:
            done = self._run(["sysctl", "-n", "net.ipv4.ip_forward"], "read IPv4 forwarding")
            if done.returncode == 0 and done.stdout.strip() == "1":
                return
            done = self._run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"], "turn on IPv4 forwarding")
            if done.returncode != 0:
                raise VmNetworkError(f"cannot turn on IPv4 forwarding{where}: {done.stderr.strip()}")
        log.info("VM network: IPv4 forwarding turned on%s", where)

    def _rules(self) -> list[tuple[str, str, bool, list[str]]]:
        """(table, chain, insert at the top?, rule). The FORWARD accepts go first: a host whose FORWARD
        policy is DROP (Docker sets that) or whose firewall rejects at the end of the chain must still pass
        the guests' traffic."""
        subnet = str(self.subnet)
        return [
            ("nat", "POSTROUTING", False, ["-s", subnet, "!", "-o", self.name, "-j", "MASQUERADE"]),
            ("filter", "FORWARD", True, ["-i", self.name, "-j", "ACCEPT"]),
            (
                "filter",
                "FORWARD",
                True,
                ["-o", self.name, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT"],
            ),
        ]

    def _ensure_rule(self, table: str, chain: str, insert: bool, rule: list[str]) -> None:
        base = [self.iptables, "-w", "10", "-t", table]
        text = f"-t {table} {chain} {' '.join(rule)}"
        check = self._run([*base, "-C", chain, *rule], f"check iptables rule {text}")
        if check.returncode == 0:
            return
        add = [*base, "-I", chain, "1", *rule] if insert else [*base, "-A", chain, *rule]
        done = self._run(add, f"add iptables rule {text}")
        if done.returncode != 0:
            detail = done.stderr.strip() or check.stderr.strip() or f"exit {done.returncode}"
            raise VmNetworkError(f"cannot add iptables rule {text}: {detail}")
        log.info("VM network: added iptables rule %s", text)

    # -- TAPs

    def add_tap(self, name: str, *, multi_queue: bool = False) -> None:
        """A persistent TAP ``name`` (QEMU opens it by name with ``script=no``), a port of the bridge, up.
        Idempotent: an existing TAP is attached and brought up. ``multi_queue`` must match how QEMU opens it
        (``queues=N`` > 1), or QEMU's open fails with EINVAL."""
        from pyroute2.netlink.exceptions import NetlinkError

        if not 0 < len(name) <= MAX_IFNAME:
            raise ValueError(f"{name!r} is not a valid interface name")
        with self._lock, self._ipr() as ipr:
            bridge = self._bridge_index(ipr)
            link = self._link(ipr, name)
            if link is None:
                flags = {"no_pi": True, "one_queue": False, "vnet_hdr": False, "multi_queue": multi_queue}
                try:
                    ipr.link("add", ifname=name, kind="tuntap", mode="tap", ifr=flags)
                except (NetlinkError, OSError) as exc:
                    raise VmNetworkError(f"cannot create TAP {name}: {_netlink_error(exc)}") from exc
                log.info("VM network: created TAP %s", name)
                link = self._link(ipr, name)
                if link is None:
                    raise VmNetworkError(f"TAP {name} vanished right after it was created")
            elif link.get(("linkinfo", "kind")) != "tun":
                raise VmNetworkError(f"{name} exists and is not a TAP")
            index = link["index"]
            if link.get("master") != bridge:
                try:
                    ipr.link("set", index=index, master=bridge)
                except NetlinkError as exc:
                    raise VmNetworkError(
                        f"cannot attach TAP {name} to bridge {self.name}: {_netlink_error(exc)}"
                    ) from exc
                log.info("VM network: TAP %s attached to %s", name, self.name)
            self._ensure_up(ipr, index, f"TAP {name}")

    def remove_tap(self, name: str) -> None:
        """Delete the TAP ``name``; nothing when it does not exist. Refuses a link that is not a TAP."""
        from pyroute2.netlink.exceptions import NetlinkError

        with self._lock, self._ipr() as ipr:
            link = self._link(ipr, name)
            if link is None:
                return
            if link.get(("linkinfo", "kind")) != "tun":
                raise VmNetworkError(f"{name} is not a TAP; not removing it")
            try:
                ipr.link("del", index=link["index"])
            except NetlinkError as exc:
                if exc.code == 19:  # ENODEV: gone meanwhile
                    return
                raise VmNetworkError(f"cannot remove TAP {name}: {_netlink_error(exc)}") from exc
        log.info("VM network: removed TAP %s", name)

    def taps(self) -> list[str]:
        """The TAPs named with ``TAP_PREFIX`` that are ports of this bridge, sorted (to find TAPs of VMs
        that are gone). Only this bridge's: another runner on the machine has its own bridge and its own
        live VMs, whose TAPs share the prefix."""
        with self._lock, self._ipr() as ipr:
            bridge = self._link(ipr, self.name)
            if bridge is None:
                return []
            names = [
                link.get("ifname")
                for link in ipr.get_links()
                if link.get("master") == bridge["index"] and link.get(("linkinfo", "kind")) == "tun"
            ]
        return sorted(n for n in names if n and n.startswith(TAP_PREFIX))
