"""Overlay network models: the settings both sides compare, a runner's assignment, peers, reservations.

The VXLAN overlay gives every runner one subnet of ``OVERLAY_SUBNET`` (``kohakuriver_proto.overlay`` holds
the address plan). These are the JSON bodies around it:

- ``OverlaySettingsView``: one side's ``OVERLAY_*`` settings; the runner sends its own at registration
  (``NodeRegistration.overlay``) so the host can refuse a mismatch with the reason.
- ``OverlayAssignment``: the host's answer (``RegisterAnswer.overlay``): the runner's id, subnet, gateway,
  the host's end of the link, the VNI and, in mesh mode, the other runners (``OverlayPeer``).
- ``RegisterAnswer`` / ``HeartbeatAnswer``: the bodies of ``POST /api/register`` and
  ``PUT /api/heartbeat/{hostname}``. Both read the older bodies (``{"message": ...}``, ``{"kill": [...]}``).
- ``ReserveRequest`` / ``IpReservation``: reserving an overlay address on a node for a later task or VPS.
- ``OverlayRunnerView`` / ``OverlayStatus``: the host's view (``GET /api/overlay/status``).

Addresses are IPv4 text in canonical dotted-quad form (``10.128.64.2``, no leading zeros); networks and
interfaces are ``address/prefix``. The checks here are regular expressions and integer arithmetic rather
than ``ipaddress``: ``models.tasks`` uses ``check_ipv4`` and ``check_ip_token``, and ``kr task submit``
should not pay for more than it needs.
"""

from __future__ import annotations

import datetime as dt
import enum
import re
from typing import Any

import attrs

from ..snowflake import SnowflakeId
from ._fields import (
    check_bool,
    check_datetime,
    check_enum,
    check_hostname_field,
    check_int,
    check_port,
    check_str,
    fail,
    instances_of,
    list_of,
    opt,
    v,
)

#: The largest VXLAN network identifier (24 bits).
VXLAN_MAX_ID = 2**24 - 1
#: The largest runner id any plan allows (NODE_BITS is at most 16).
MAX_RUNNER_ID = 2**16 - 1
#: Longest reservation token accepted (a real one is under 600 characters).
MAX_IP_TOKEN = 1024

_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4_RE = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")
_CIDR_RE = re.compile(rf"({_OCTET}(?:\.{_OCTET}){{3}})/(3[0-2]|[12]?[0-9])")
# payload (urlsafe base64 of JSON, no padding) "." HMAC-SHA256 (32 bytes = 43 characters, no padding)
IP_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{1,960}\.[A-Za-z0-9_-]{43}")


class OverlayMode(enum.StrEnum):
    """How overlay traffic between runners flows (``OVERLAY_MODE``; the host and every runner must match).

    ``hub``: every packet between runners goes through the host (the original design). ``mesh``: each
    runner's VXLAN device has a forwarding entry for every other runner, so runner-to-runner traffic goes
    directly; the host distributes the peer list and remains one more endpoint of the overlay.
    """

    HUB = "hub"
    MESH = "mesh"


# -- field checks --------------------------------------------------------------------------------------------


def ipv4_int(text: str) -> int:
    """The 32-bit value of a dotted quad that passed ``check_ipv4``."""
    a, b, c, d = (int(part) for part in text.split("."))
    return (a << 24) | (b << 16) | (c << 8) | d


def check_ipv4(value: object, path: str) -> None:
    """An IPv4 address in canonical dotted-quad form (``10.128.64.2``)."""
    check_str(value, path, max_len=15)
    if not _IPV4_RE.fullmatch(value):
        fail(path, f"must be an IPv4 address like 10.128.64.2, got {value[:40]!r}")


def _split_cidr(value: object, path: str) -> tuple[int, int]:
    check_str(value, path, max_len=18)
    match = _CIDR_RE.fullmatch(value)
    if not match:
        fail(path, f"must be an IPv4 address/prefix like 10.128.64.0/18, got {value[:40]!r}")
    return ipv4_int(match.group(1)), int(match.group(2))


def check_ipv4_network(value: object, path: str) -> None:
    """An IPv4 network ``address/prefix`` without host bits (``10.128.64.0/18``)."""
    address, prefix = _split_cidr(value, path)
    if address & ((1 << (32 - prefix)) - 1):
        fail(path, f"has host bits set: {value} is not a network address")


def check_ipv4_interface(value: object, path: str) -> None:
    """An IPv4 address with its prefix (``10.128.0.1/12``)."""
    _split_cidr(value, path)


def _in_network(address: str, network: str) -> bool:
    base, prefix = network.split("/")
    mask = ((1 << 32) - 1) ^ ((1 << (32 - int(prefix))) - 1)
    return ipv4_int(address) & mask == ipv4_int(base)


def check_ip_token(value: object, path: str = "ip_token") -> None:
    """The shape of a reservation token (``overlay.sign_reservation``); the host checks its signature."""
    check_str(value, path, max_len=MAX_IP_TOKEN)
    if not IP_TOKEN_RE.fullmatch(value):
        fail(path, "is not a reservation token (kr overlay reserve prints one)")


def check_overlay_subnet(value: object, path: str) -> None:
    """``BASE/TOTAL_PREFIX/NODE_BITS/SUBNET_BITS``, as ``OVERLAY_SUBNET`` accepts it."""
    check_str(value, path, max_len=64, allow_empty=False, one_line=True)
    # The settings module is only needed where a registration carries overlay settings (the host).
    from ..settings import parse_overlay_subnet

    try:
        parse_overlay_subnet(value)
    except ValueError as exc:
        fail(path, str(exc))


def _check_vni(value: object, path: str) -> None:
    check_int(value, path, minimum=1, maximum=VXLAN_MAX_ID)


def _check_runner_id(value: object, path: str) -> None:
    check_int(value, path, minimum=1, maximum=MAX_RUNNER_ID)


def _check_mtu(value: object, path: str) -> None:
    check_int(value, path, minimum=576, maximum=9216)


_mode = v(check_enum(OverlayMode))


# -- settings and assignment ---------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class OverlaySettingsView:
    """One side's ``OVERLAY_*`` settings, as the runner reports them at registration."""

    enabled: bool = attrs.field(validator=v(check_bool))
    subnet: str = attrs.field(validator=v(check_overlay_subnet))
    vxlan_id: int = attrs.field(validator=v(_check_vni))
    vxlan_port: int = attrs.field(validator=v(check_port))
    mtu: int = attrs.field(validator=v(_check_mtu))
    mode: OverlayMode = attrs.field(default=OverlayMode.HUB, validator=_mode)

    @classmethod
    def from_config(cls, config: Any) -> OverlaySettingsView:
        """The view of a host or runner config object (anything with the ``OVERLAY_*`` attributes)."""
        return cls(
            enabled=config.OVERLAY_ENABLED,
            subnet=config.OVERLAY_SUBNET,
            vxlan_id=config.OVERLAY_VXLAN_ID,
            vxlan_port=config.OVERLAY_VXLAN_PORT,
            mtu=config.OVERLAY_MTU,
            mode=OverlayMode(getattr(config, "OVERLAY_MODE", OverlayMode.HUB)),
        )


@attrs.frozen(kw_only=True)
class OverlayPeer:
    """Another runner of the overlay (mesh mode): its id (hence its subnet and VNI) and VXLAN address."""

    runner_id: int = attrs.field(validator=v(_check_runner_id))
    hostname: str = attrs.field(validator=v(check_hostname_field))
    underlay_address: str = attrs.field(validator=v(check_ipv4))


def _unique_peers(peers: list[OverlayPeer], field: str) -> None:
    seen: set[int] = set()
    for i, peer in enumerate(peers):
        if peer.runner_id in seen:
            fail(f"{field}[{i}].runner_id", f"duplicate runner id {peer.runner_id}")
        seen.add(peer.runner_id)


@attrs.frozen(kw_only=True)
class OverlayAssignment:
    """Host -> runner at registration: where the runner sits in the overlay and how to reach the host.

    ``subnet`` is the runner's (CIDR), ``gateway`` its bridge address (subnet + 1), ``host_address`` the
    host's end of this runner's VXLAN link (subnet + 254: the next hop toward the rest of the overlay),
    ``host_overlay_address`` the host's own overlay address (CIDR over the whole overlay), ``vni`` this
    runner's VXLAN id, ``host_underlay_address`` the host's VXLAN endpoint. ``peers``: the other runners, in
    mesh mode (empty in hub mode).
    """

    runner_id: int = attrs.field(validator=v(_check_runner_id))
    subnet: str = attrs.field(validator=v(check_ipv4_network))
    gateway: str = attrs.field(validator=v(check_ipv4))
    host_address: str = attrs.field(validator=v(check_ipv4))
    host_overlay_address: str = attrs.field(validator=v(check_ipv4_interface))
    vni: int = attrs.field(validator=v(_check_vni))
    vxlan_port: int = attrs.field(validator=v(check_port))
    mtu: int = attrs.field(validator=v(_check_mtu))
    host_underlay_address: str = attrs.field(validator=v(check_ipv4))
    mode: OverlayMode = attrs.field(default=OverlayMode.HUB, validator=_mode)
    peers: list[OverlayPeer] = attrs.field(factory=list, validator=instances_of(OverlayPeer))

    def __attrs_post_init__(self) -> None:
        for field in ("gateway", "host_address"):
            if not _in_network(getattr(self, field), self.subnet):
                fail(field, f"{getattr(self, field)} is not inside the subnet {self.subnet}")
        if self.gateway == self.host_address:
            fail("host_address", "must differ from the gateway")
        _unique_peers(self.peers, "peers")
        for i, peer in enumerate(self.peers):
            if peer.runner_id == self.runner_id:
                fail(f"peers[{i}].runner_id", "a runner is not its own peer")


@attrs.frozen(kw_only=True)
class RegisterAnswer:
    """The body of ``POST /api/register``. ``overlay``: the runner's assignment when the overlay is on;
    ``overlay_error``: why it has none although it asked (settings mismatch, no free runner id)."""

    message: str = attrs.field(validator=v(check_str, max_len=4096))
    overlay: OverlayAssignment | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.instance_of(OverlayAssignment))
    )
    overlay_error: str | None = attrs.field(default=None, validator=opt(check_str, max_len=4096))

    def __attrs_post_init__(self) -> None:
        if self.overlay is not None and self.overlay_error is not None:
            fail("overlay_error", "an answer carries an assignment or an error, not both")


@attrs.frozen(kw_only=True)
class HeartbeatAnswer:
    """The body of ``PUT /api/heartbeat/{hostname}``: tasks to kill, and in mesh mode the current peer list
    (None: unchanged or not in mesh mode; the runner keeps what it has)."""

    kill: list[SnowflakeId] = attrs.field(factory=list, validator=list_of(check_int, max_items=65536))
    overlay_peers: list[OverlayPeer] | None = attrs.field(default=None)

    @overlay_peers.validator
    def _check_peers(self, attribute: attrs.Attribute, value: Any) -> None:
        if value is not None:
            instances_of(OverlayPeer)(self, attribute, value)
            _unique_peers(value, attribute.name)


# -- reservations --------------------------------------------------------------------------------------------

MIN_RESERVATION_TTL = 60
MAX_RESERVATION_TTL = 1800
DEFAULT_RESERVATION_TTL = 300


@attrs.frozen(kw_only=True)
class ReserveRequest:
    """``POST /api/overlay/reserve``: an overlay address on ``node`` (a given ``ip``, or any free one)."""

    node: str = attrs.field(validator=v(check_hostname_field))
    ip: str | None = attrs.field(default=None, validator=opt(check_ipv4))
    ttl_seconds: int = attrs.field(
        default=DEFAULT_RESERVATION_TTL,
        validator=v(check_int, minimum=MIN_RESERVATION_TTL, maximum=MAX_RESERVATION_TTL),
    )


@attrs.frozen(kw_only=True)
class IpReservation:
    """A reserved overlay address: the token to pass as ``ip_token``, until when, and the task using it."""

    token: str = attrs.field(validator=v(check_ip_token))
    ip: str = attrs.field(validator=v(check_ipv4))
    node: str = attrs.field(validator=v(check_hostname_field))
    expires_at: dt.datetime = attrs.field(validator=v(check_datetime))
    used_by: SnowflakeId | None = attrs.field(default=None, validator=opt(check_int))


# -- the host's view -----------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class OverlayRunnerView:
    """One runner as the host's overlay sees it: id, subnet, the host's VXLAN link to it, liveness."""

    runner_id: int = attrs.field(validator=v(_check_runner_id))
    hostname: str = attrs.field(validator=v(check_hostname_field))
    subnet: str = attrs.field(validator=v(check_ipv4_network))
    link: str = attrs.field(validator=v(check_str, max_len=15, allow_empty=False, one_line=True))
    underlay_address: str = attrs.field(validator=v(check_ipv4))
    active: bool = attrs.field(validator=v(check_bool))
    last_seen: dt.datetime | None = attrs.field(default=None, validator=opt(check_datetime))


@attrs.frozen(kw_only=True)
class OverlayStatus:
    """``GET /api/overlay/status``. ``mode``, ``subnet`` and ``host_overlay_address`` are None when off."""

    enabled: bool = attrs.field(validator=v(check_bool))
    mode: OverlayMode | None = attrs.field(default=None, validator=opt(check_enum(OverlayMode)))
    subnet: str | None = attrs.field(default=None, validator=opt(check_str, max_len=64, one_line=True))
    host_overlay_address: str | None = attrs.field(default=None, validator=opt(check_ipv4_interface))
    runners: list[OverlayRunnerView] = attrs.field(factory=list, validator=instances_of(OverlayRunnerView))
    reservations: list[IpReservation] = attrs.field(factory=list, validator=instances_of(IpReservation))


__all__ = [
    "DEFAULT_RESERVATION_TTL",
    "IP_TOKEN_RE",
    "MAX_IP_TOKEN",
    "MAX_RESERVATION_TTL",
    "MAX_RUNNER_ID",
    "MIN_RESERVATION_TTL",
    "VXLAN_MAX_ID",
    "HeartbeatAnswer",
    "IpReservation",
    "OverlayAssignment",
    "OverlayMode",
    "OverlayPeer",
    "OverlayRunnerView",
    "OverlaySettingsView",
    "OverlayStatus",
    "RegisterAnswer",
    "ReserveRequest",
    "check_ip_token",
    "check_ipv4",
    "check_ipv4_interface",
    "check_ipv4_network",
    "check_overlay_subnet",
    "ipv4_int",
]
