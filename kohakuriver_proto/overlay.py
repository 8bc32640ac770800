"""The overlay network's address plan, names and reservation tokens: pure functions the host and runner share.

``OVERLAY_SUBNET = "BASE/TOTAL_PREFIX/NODE_BITS/SUBNET_BITS"`` (``settings.parse_overlay_subnet`` reads it
into an ``OverlaySubnet``) splits the overlay ``BASE/TOTAL_PREFIX`` into ``2**NODE_BITS`` blocks of
``2**SUBNET_BITS`` addresses. Block 0 is the host's (its overlay address is BASE + 1); block ``id`` belongs
to runner ``id`` (1 .. 2**NODE_BITS - 1), the addressing of the original project kept as it was:

    runner subnet   BASE + (id << SUBNET_BITS) / (32 - SUBNET_BITS)     10.128.64.0/18 for id 1 (default plan)
    gateway         subnet + 1      the runner's bridge ``kohaku-overlay``
    host address    subnet + 254    the host's end of the runner's VXLAN link ``vxkr<id>``
    containers      subnet + 2 .. broadcast - 1, except the host address

A runner's VXLAN id is ``OVERLAY_VXLAN_ID + id``; the host's link to it is named ``vxkr`` + the id in base
36 (at most 8 characters, under Linux's 15). In mesh mode each runner keeps a forwarding entry per peer
runner; ``fdb_changes`` says which to add and remove.

Reservation tokens (``sign_reservation`` / ``verify_reservation``): ``<payload>.<mac>``, both unpadded
urlsafe base64; the payload is the claim as compact JSON, the MAC a full HMAC-SHA256 over a purpose label
and the payload text, compared in constant time. The key is the host's (persisted by it); the caller
passes the current time, as everywhere in this package.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from .errors import ValidationError
from .models.overlay import (
    MAX_RUNNER_ID,
    VXLAN_MAX_ID,
    OverlayAssignment,
    OverlayMode,
    OverlayPeer,
    OverlaySettingsView,
    check_ipv4,
)
from .settings import OverlaySubnet, parse_overlay_subnet
from .targets import check_hostname

__all__ = [
    "HOST_ADDRESS_OFFSET",
    "HOST_LINK_MAC_PREFIX",
    "HOST_RUNNER_ID",
    "LINK_PREFIX",
    "MAX_RUNNER_ID",
    "MIN_KEY_BYTES",
    "VXLAN_MAX_ID",
    "OverlaySubnet",
    "ReservationClaim",
    "build_assignment",
    "check_runner_id",
    "container_range",
    "fdb_changes",
    "host_address_on",
    "host_link_mac",
    "host_overlay_address",
    "is_container_address",
    "link_name",
    "max_runners",
    "parse_ip",
    "parse_overlay_subnet",
    "runner_gateway",
    "runner_id_of_link",
    "runner_of_address",
    "runner_subnet",
    "settings_mismatch",
    "sign_reservation",
    "verify_reservation",
    "vni",
]

#: Runner id 0 is the host: block 0 of the overlay holds the host's own address.
HOST_RUNNER_ID = 0
#: The host's address on a runner's subnet is subnet + 254 (the original's choice, kept).
HOST_ADDRESS_OFFSET = 254
#: The host's VXLAN link to runner ``id`` is ``LINK_PREFIX + base36(id)``.
LINK_PREFIX = "vxkr"
#: A shorter reservation key is refused (a programming error, not bad input).
MIN_KEY_BYTES = 16

Address = str | ipaddress.IPv4Address


# -- the address plan ----------------------------------------------------------------------------------------


def max_runners(plan: OverlaySubnet) -> int:
    """How many runners the plan has room for: ``2**NODE_BITS - 1`` (ids 1 .. that)."""
    return 2**plan.node_bits - 1


def check_runner_id(plan: OverlaySubnet, runner_id: object) -> None:
    """``ValidationError("runner_id", ...)`` unless ``runner_id`` is a runner id of ``plan``."""
    if isinstance(runner_id, bool) or not isinstance(runner_id, int):
        raise ValidationError("runner_id", f"must be an integer, got {type(runner_id).__name__}")
    highest = max_runners(plan)
    if not 1 <= runner_id <= highest:
        raise ValidationError(
            "runner_id",
            f"must be between 1 and {highest} (NODE_BITS {plan.node_bits} of OVERLAY_SUBNET allows "
            f"{highest} runners; 0 is the host), got {runner_id}",
        )


def _block(plan: OverlaySubnet, runner_id: int) -> int:
    check_runner_id(plan, runner_id)
    return int(plan.network.network_address) + (runner_id << plan.subnet_bits)


def runner_subnet(plan: OverlaySubnet, runner_id: int) -> ipaddress.IPv4Network:
    """Runner ``runner_id``'s subnet: BASE + (id << SUBNET_BITS), prefix 32 - SUBNET_BITS."""
    return ipaddress.IPv4Network((_block(plan, runner_id), plan.runner_prefix))


def runner_gateway(plan: OverlaySubnet, runner_id: int) -> ipaddress.IPv4Address:
    """The runner's bridge address (subnet + 1): its containers' default gateway on the overlay."""
    return ipaddress.IPv4Address(_block(plan, runner_id) + 1)


def host_address_on(plan: OverlaySubnet, runner_id: int) -> ipaddress.IPv4Address:
    """The host's address on the runner's subnet (subnet + 254), on its link ``vxkr<id>``."""
    return ipaddress.IPv4Address(_block(plan, runner_id) + HOST_ADDRESS_OFFSET)


def host_overlay_address(plan: OverlaySubnet) -> ipaddress.IPv4Interface:
    """The host's own overlay address: BASE + 1 with the overlay's prefix (in block 0, no runner's)."""
    return ipaddress.IPv4Interface((int(plan.network.network_address) + 1, plan.network.prefixlen))


def container_range(
    plan: OverlaySubnet, runner_id: int
) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
    """The first and last address containers and VMs on the runner may get: subnet + 2 .. broadcast - 1.

    The host address (subnet + 254) lies inside this range unless it is its last address (a /24, where
    the range ends at + 253): give it to Docker's IPAM as an auxiliary address, and use
    ``is_container_address`` rather than the bounds alone.
    """
    start = _block(plan, runner_id)
    last = start + 2**plan.subnet_bits - 2
    if last - start == HOST_ADDRESS_OFFSET:
        last -= 1
    return ipaddress.IPv4Address(start + 2), ipaddress.IPv4Address(last)


def parse_ip(ip: object, field: str = "ip") -> ipaddress.IPv4Address:
    """An IPv4 address from text or an ``IPv4Address``; ``ValidationError(field, ...)`` otherwise."""
    if isinstance(ip, ipaddress.IPv4Address):
        return ip
    if not isinstance(ip, str):
        raise ValidationError(field, f"must be an IPv4 address, got {type(ip).__name__}")
    try:
        return ipaddress.IPv4Address(ip)
    except ValueError:
        raise ValidationError(field, f"must be an IPv4 address like 10.128.64.2, got {ip[:40]!r}") from None


def is_container_address(plan: OverlaySubnet, runner_id: int, ip: Address) -> bool:
    """Whether ``ip`` may be given to a container or VM on the runner: in ``container_range`` and not the
    host's address (the network, gateway and broadcast addresses are outside the range)."""
    address = parse_ip(ip)
    first, last = container_range(plan, runner_id)
    return first <= address <= last and address != host_address_on(plan, runner_id)


def runner_of_address(plan: OverlaySubnet, ip: Address) -> int | None:
    """The runner whose subnet holds ``ip``; None outside the overlay and in the host's block 0."""
    address = parse_ip(ip)
    if address not in plan.network:
        return None
    runner_id = (int(address) - int(plan.network.network_address)) >> plan.subnet_bits
    return runner_id or None


# -- VXLAN ids and link names --------------------------------------------------------------------------------


def _check_int(value: object, field: str, minimum: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(field, f"must be an integer, got {type(value).__name__}")
    if not minimum <= value <= maximum:
        raise ValidationError(field, f"must be between {minimum} and {maximum}, got {value}")
    return value


def vni(vxlan_id: int, runner_id: int) -> int:
    """The VXLAN network identifier of runner ``runner_id``: ``OVERLAY_VXLAN_ID + runner_id``."""
    _check_int(vxlan_id, "vxlan_id", 1, VXLAN_MAX_ID)
    _check_int(runner_id, "runner_id", 0, MAX_RUNNER_ID)
    if vxlan_id + runner_id > VXLAN_MAX_ID:
        raise ValidationError(
            "vxlan_id",
            f"OVERLAY_VXLAN_ID {vxlan_id} + runner id {runner_id} exceeds the largest VXLAN id "
            f"{VXLAN_MAX_ID}",
        )
    return vxlan_id + runner_id


_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"
_LINK_RE = re.compile(rf"{LINK_PREFIX}([1-9a-z][0-9a-z]{{0,3}})")


def link_name(runner_id: int) -> str:
    """The host's VXLAN link to runner ``runner_id``: ``vxkr`` + the id in lower-case base 36."""
    n = _check_int(runner_id, "runner_id", 1, MAX_RUNNER_ID)
    digits = ""
    while n:
        n, rest = divmod(n, 36)
        digits = _DIGITS[rest] + digits
    return LINK_PREFIX + digits


def runner_id_of_link(name: str) -> int | None:
    """The runner id a link name stands for, or None if it is not exactly what ``link_name`` writes
    (another device, upper case, leading zeros, an id out of range)."""
    if not isinstance(name, str):
        return None
    match = _LINK_RE.fullmatch(name)
    if not match:
        return None
    runner_id = int(match.group(1), 36)
    return runner_id if runner_id <= MAX_RUNNER_ID else None


def fdb_changes(
    current: Mapping[int, str], wanted: Mapping[int, str]
) -> tuple[dict[int, str], dict[int, str]]:
    """Mesh mode: how to turn the forwarding entries ``current`` (peer runner id -> underlay address) into
    ``wanted``. Returns ``(to_add, to_remove)``; a peer whose address changed is in both (remove the old
    entry first, then add the new one)."""
    to_remove = {rid: ip for rid, ip in current.items() if wanted.get(rid) != ip}
    to_add = {rid: ip for rid, ip in wanted.items() if current.get(rid) != ip}
    return to_add, to_remove


# -- settings and assignment ---------------------------------------------------------------------------------


def _same_subnet(a: str, b: str) -> bool:
    try:
        return parse_overlay_subnet(a) == parse_overlay_subnet(b)
    except ValueError:
        return a == b


def settings_mismatch(host: OverlaySettingsView, runner: OverlaySettingsView) -> list[str]:
    """Every ``OVERLAY_*`` setting whose values differ, as ``"OVERLAY_MTU: host 1450, runner 1400"``.

    Empty when they agree, and when the overlay is off on both sides (the other values do not matter
    then). ``OVERLAY_SUBNET`` values are compared as plans (``10.128.0.0/012/6/14`` equals the default).
    """
    if not host.enabled and not runner.enabled:
        return []
    out = []
    pairs: list[tuple[str, Any, Any, bool]] = [
        ("OVERLAY_ENABLED", host.enabled, runner.enabled, host.enabled == runner.enabled),
        ("OVERLAY_SUBNET", host.subnet, runner.subnet, _same_subnet(host.subnet, runner.subnet)),
        ("OVERLAY_VXLAN_ID", host.vxlan_id, runner.vxlan_id, host.vxlan_id == runner.vxlan_id),
        ("OVERLAY_VXLAN_PORT", host.vxlan_port, runner.vxlan_port, host.vxlan_port == runner.vxlan_port),
        ("OVERLAY_MTU", host.mtu, runner.mtu, host.mtu == runner.mtu),
        ("OVERLAY_MODE", host.mode.value, runner.mode.value, host.mode == runner.mode),
    ]
    for name, ours, theirs, same in pairs:
        if not same:
            out.append(f"{name}: host {ours}, runner {theirs}")
    return out


def build_assignment(
    settings: OverlaySettingsView,
    runner_id: int,
    host_underlay_address: Address,
    peers: Iterable[OverlayPeer] = (),
) -> OverlayAssignment:
    """The ``OverlayAssignment`` of runner ``runner_id`` under the host's ``settings``; ``peers`` are kept
    only in mesh mode (in hub mode the runner needs none)."""
    plan = parse_overlay_subnet(settings.subnet)
    return OverlayAssignment(
        runner_id=runner_id,
        subnet=str(runner_subnet(plan, runner_id)),
        gateway=str(runner_gateway(plan, runner_id)),
        host_address=str(host_address_on(plan, runner_id)),
        host_overlay_address=str(host_overlay_address(plan)),
        vni=vni(settings.vxlan_id, runner_id),
        vxlan_port=settings.vxlan_port,
        mtu=settings.mtu,
        host_underlay_address=str(parse_ip(host_underlay_address, "host_underlay_address")),
        mode=settings.mode,
        peers=sorted(peers, key=lambda p: p.runner_id) if settings.mode is OverlayMode.MESH else [],
    )


# -- reservation tokens --------------------------------------------------------------------------------------

_NONCE_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_TOKEN_FIELD = "ip_token"
_TOKEN_VERSION = 1
# Ties a MAC to this use of the key: a signature made for anything else never verifies as a reservation.
_MAC_LABEL = b"kohakuriver ip reservation v1\x00"
_MAC_CHARS = 43  # 32 bytes in unpadded base64
_MAX_TOKEN = 1024
#: 9999-12-31T23:59:59Z, the last second ``datetime`` can write.
MAX_EXPIRES_AT = 253402300799
_SEGMENT_RE = re.compile(r"[A-Za-z0-9_-]+")


def _check_claim_ip(_instance: object, attribute: attrs.Attribute, value: object) -> None:
    check_ipv4(value, attribute.name)  # canonical dotted quad: one address, one text


def _check_claim_node(_instance: object, attribute: attrs.Attribute, value: object) -> None:
    check_hostname(value, attribute.name)


def _check_claim_runner_id(_instance: object, attribute: attrs.Attribute, value: object) -> None:
    _check_int(value, attribute.name, 1, MAX_RUNNER_ID)


def _check_claim_expiry(_instance: object, attribute: attrs.Attribute, value: object) -> None:
    _check_int(value, attribute.name, 0, MAX_EXPIRES_AT)


def _check_claim_nonce(_instance: object, attribute: attrs.Attribute, value: object) -> None:
    if not isinstance(value, str) or not _NONCE_RE.fullmatch(value):
        raise ValidationError(attribute.name, "must be 1 to 64 characters of A-Z a-z 0-9 _ -")


@attrs.frozen
class ReservationClaim:
    """What a reservation token asserts: ``ip`` on ``node`` (runner ``runner_id``) until ``expires_at``
    (Unix seconds); ``nonce`` (the caller draws it) makes two reservations of one address distinct."""

    ip: str = attrs.field(validator=_check_claim_ip)
    node: str = attrs.field(validator=_check_claim_node)
    runner_id: int = attrs.field(validator=_check_claim_runner_id)
    expires_at: int = attrs.field(validator=_check_claim_expiry)
    nonce: str = attrs.field(validator=_check_claim_nonce)


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes | None:
    """Strict unpadded urlsafe base64: None unless ``text`` is exactly what ``_b64encode`` writes."""
    if len(text) % 4 == 1:
        return None
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    # Unused trailing bits make several texts decode alike: only the canonical one is a token.
    return data if _b64encode(data) == text else None


def _mac(key: bytes, payload: str) -> bytes:
    if not isinstance(key, bytes | bytearray) or len(key) < MIN_KEY_BYTES:
        raise ValueError(f"the reservation key must be at least {MIN_KEY_BYTES} bytes")
    return hmac.new(bytes(key), _MAC_LABEL + payload.encode("ascii"), hashlib.sha256).digest()


def sign_reservation(key: bytes, claim: ReservationClaim) -> str:
    """The token for ``claim``: ``<payload>.<mac>`` (urlsafe, no padding, no ``=``)."""
    body = {"v": _TOKEN_VERSION, **attrs.asdict(claim)}
    payload = _b64encode(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    return f"{payload}.{_b64encode(_mac(key, payload))}"


def _refuse(message: str) -> ValidationError:
    return ValidationError(_TOKEN_FIELD, message)


def verify_reservation(key: bytes, token: str, now: float) -> ReservationClaim:
    """The claim of a token this key signed and that has not expired at ``now`` (Unix seconds); else a
    ``ValidationError`` on ``ip_token`` that says whether it is malformed, forged or expired. A token is
    valid while ``now < expires_at``."""
    if not isinstance(token, str):
        raise _refuse(f"malformed token: must be a string, got {type(token).__name__}")
    if len(token) > _MAX_TOKEN:
        raise _refuse(f"malformed token: longer than {_MAX_TOKEN} characters")
    payload, dot, mac_text = token.partition(".")
    if not dot or not _SEGMENT_RE.fullmatch(payload) or not _SEGMENT_RE.fullmatch(mac_text):
        raise _refuse("malformed token: expected <payload>.<signature> in urlsafe base64")
    mac = _b64decode(mac_text) if len(mac_text) == _MAC_CHARS else None
    raw = _b64decode(payload)
    if mac is None or raw is None:
        raise _refuse("malformed token: not valid urlsafe base64")
    if not hmac.compare_digest(mac, _mac(key, payload)):
        raise _refuse("forged token: the signature does not match (altered, or not issued by this host)")
    # Signed by this key from here on: a problem below is a bug or another version, not an attack.
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise _refuse("malformed token: the payload is not JSON") from None
    fields = ("expires_at", "ip", "node", "nonce", "runner_id", "v")
    if not isinstance(body, dict) or sorted(body) != list(fields):
        raise _refuse("malformed token: unexpected payload fields")
    if type(body["v"]) is not int or body["v"] != _TOKEN_VERSION:
        raise _refuse(f"malformed token: version {body['v']!r} is not {_TOKEN_VERSION}")
    try:
        claim = ReservationClaim(**{name: body[name] for name in fields if name != "v"})
    except ValidationError as exc:
        raise _refuse(f"malformed token: {exc}") from None
    if not now < claim.expires_at:
        when = dt.datetime.fromtimestamp(claim.expires_at, dt.UTC).isoformat().replace("+00:00", "Z")
        raise _refuse(f"expired token: the reservation of {claim.ip} on {claim.node} ended at {when}")
    return claim


#: The host's VXLAN link to runner N has the MAC ``HOST_LINK_MAC_PREFIX`` + N ("kh", locally administered):
#: the host sets it and every runner pins it in its own VXLAN link, so unicast to the host is never flooded to
#: the other peers in mesh mode.
HOST_LINK_MAC_PREFIX = "02:6b:68"


def host_link_mac(runner_id: int) -> str:
    """The MAC of the host's link to runner ``runner_id``: ``02:6b:68:`` + the id in three bytes."""
    if not 0 < runner_id < 1 << 24:
        raise ValueError(f"runner id {runner_id} is out of range")
    return HOST_LINK_MAC_PREFIX + ":" + ":".join(f"{b:02x}" for b in runner_id.to_bytes(3, "big"))
