"""The guest agent of a VM VPS: its heartbeat message and the runner's liveness tracker (``AgentWatch``).

The agent is the tunnel client (``tunnel-client --agent``) running inside the VM. It already holds an
authenticated WebSocket to the runner (``/ws/tunnel/<name>``, the per-VM secret as bearer token), so its
heartbeats travel on that WebSocket as TEXT messages: the tunnel protocol uses binary messages only, and a
seed-protocol client never sends text, so text is free for the agent and never reaches ``ContainerTunnel``.

**The message.** One JSON object per TEXT message, keys in this order, no spaces::

    {"type":"agent.heartbeat","version":1,"seq":0,"hostname":"vps-1","uptime_seconds":12.5,"load1":0.0,
     "load5":0.0,"load15":0.0,"memory_total_bytes":1,"memory_available_bytes":1,"disk_total_bytes":1,
     "disk_free_bytes":1,"gpus":0}

``seq`` counts per WebSocket: 0 is the phone-home sent right after each attach, then 1, 2, ... every
interval. Floats are written as their shortest round-trip form (Python's ``repr``, Rust's ``{:?}``), so both
encoders give the same bytes; ``tests/vectors/agent_heartbeat.json`` holds that contract for both sides.

**Compatibility.** A receiver reads what it knows and ignores the rest:

- unknown keys are ignored (a newer agent may add figures);
- ``version`` is at least 1; a higher one is read as version 1 as long as the version-1 keys are there (a
  change that is not additive gets a new ``type``, not a new version);
- a ``type`` this version does not know parses to ``UnknownAgentMessage`` (not an error: ignore it), so
  future message types do not break older runners, as ``frames.UnknownFrame`` does for the tunnel frames.

Errors: ``RemoteProtocolError`` for a message that is not a JSON object of at most ``MAX_MESSAGE``
characters or has no string ``type``; ``ValidationError`` naming the field for a heartbeat field that is
missing or out of bounds. Both derive from ``ProtocolError``: that one ``except`` is "malformed, ignore it".
There are no cross-field checks (available memory above the total, say): the figures are the kernel's
estimates, and refusing a heartbeat for one would make a live VM look dead.

**``AgentWatch``** (sans-IO; the caller passes a monotonic ``now`` and, for ``health``, the wall clock):
``WAITING`` from boot until the first heartbeat, ``HEALTHY`` while heartbeats come, ``UNHEALTHY`` once
silent for ``timeout_seconds`` (VM_HEARTBEAT_TIMEOUT_SECONDS), also when the first heartbeat has not come
within that time of boot. Attach and detach of the agent's WebSocket change no state (a reconnect after a
runner restart must not flap the VM), they only explain an unhealthy one in ``health().message``.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from typing import Any

import attrs

from .errors import LocalProtocolError, RemoteProtocolError, ValidationError
from .models.tasks import VmAgentState, VmHealth

__all__ = [
    "HEARTBEAT_TYPE",
    "MAX_GPUS",
    "MAX_HOSTNAME",
    "MAX_LOAD",
    "MAX_MESSAGE",
    "MAX_UPTIME",
    "VERSION",
    "AgentHeartbeat",
    "AgentMessage",
    "AgentWatch",
    "UnknownAgentMessage",
    "encode_agent_message",
    "parse_agent_message",
]

HEARTBEAT_TYPE = "agent.heartbeat"
#: The version this module writes (and the lowest it reads).
VERSION = 1
#: Longest text message parsed, in characters; a heartbeat is about 300. Also bounds JSON nesting.
MAX_MESSAGE = 65536
#: Linux allows 64 bytes (HOST_NAME_MAX); a DNS name up to 253 characters.
MAX_HOSTNAME = 255
#: About 317 years: more is not an uptime.
MAX_UPTIME = 1e10
#: Load averages beyond this are not a real machine's.
MAX_LOAD = 1e6
#: As ``VmHealth.gpus``.
MAX_GPUS = 4096
_INT64_MAX = (1 << 63) - 1
_MAX_VERSION = (1 << 31) - 1
_MAX_TYPE = 128
# Control characters, line separators and lone surrogates (which no UTF-8 encoder could write).
_BAD_HOSTNAME = re.compile("[\x00-\x1f\x7f\u2028\u2029\ud800-\udfff]")


def _to_float(value: Any) -> Any:
    # ints are numbers on the wire ("load1":0 is 0.0); bool is not, and is left for the validator to refuse.
    return float(value) if type(value) is int else value


def _number(maximum: float) -> Any:
    def check(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        name = attribute.name
        if type(value) is not float:
            raise ValidationError(name, f"must be a number, got {_type_name(value)}")
        if not math.isfinite(value):
            raise ValidationError(name, "must be a finite number")
        if not 0.0 <= value <= maximum:
            raise ValidationError(name, f"must be between 0 and {maximum:g}, got {value!r}")

    return check


def _integer(maximum: int, minimum: int = 0) -> Any:
    def check(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        name = attribute.name
        if type(value) is not int:
            raise ValidationError(name, f"must be an integer, got {_type_name(value)}")
        if not minimum <= value <= maximum:
            raise ValidationError(name, f"must be between {minimum} and {maximum}, got {value}")

    return check


def _hostname(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if type(value) is not str:
        raise ValidationError(attribute.name, f"must be a string, got {_type_name(value)}")
    if len(value) > MAX_HOSTNAME:
        raise ValidationError(attribute.name, f"must be at most {MAX_HOSTNAME} characters, got {len(value)}")
    if _BAD_HOSTNAME.search(value):
        raise ValidationError(attribute.name, "must be one line of text without control characters")


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


@attrs.frozen(kw_only=True)
class AgentHeartbeat:
    """One heartbeat of the guest agent: what the VM reports about itself. Validated on construction
    (``ValidationError`` names the field); ints given for the float fields become floats."""

    seq: int = attrs.field(validator=_integer(_INT64_MAX))
    hostname: str = attrs.field(validator=_hostname)
    uptime_seconds: float = attrs.field(converter=_to_float, validator=_number(MAX_UPTIME))
    load1: float = attrs.field(converter=_to_float, validator=_number(MAX_LOAD))
    load5: float = attrs.field(converter=_to_float, validator=_number(MAX_LOAD))
    load15: float = attrs.field(converter=_to_float, validator=_number(MAX_LOAD))
    memory_total_bytes: int = attrs.field(validator=_integer(_INT64_MAX))
    memory_available_bytes: int = attrs.field(validator=_integer(_INT64_MAX))
    disk_total_bytes: int = attrs.field(validator=_integer(_INT64_MAX))
    disk_free_bytes: int = attrs.field(validator=_integer(_INT64_MAX))
    gpus: int = attrs.field(validator=_integer(MAX_GPUS))
    version: int = attrs.field(default=VERSION, validator=_integer(_MAX_VERSION, minimum=1))


#: The heartbeat's keys after ``type`` and ``version``, in wire order (= the attrs fields but ``version``).
_FIELDS: tuple[str, ...] = tuple(f.name for f in attrs.fields(AgentHeartbeat) if f.name != "version")


@attrs.frozen
class UnknownAgentMessage:
    """A message whose ``type`` this version does not know: ignore it. ``type`` is clipped to 128
    characters."""

    type: str


AgentMessage = AgentHeartbeat | UnknownAgentMessage


def parse_agent_message(text: str) -> AgentMessage:
    """Read one TEXT message of the agent. Raises ``RemoteProtocolError`` (not a JSON object, too long,
    no string ``type``) or ``ValidationError`` (a heartbeat field; ``field`` names it)."""
    if type(text) is not str:
        raise LocalProtocolError(f"parse_agent_message takes the text of a TEXT message, not {type(text)}")
    if len(text) > MAX_MESSAGE:
        raise RemoteProtocolError(f"agent message of {len(text)} characters (at most {MAX_MESSAGE})")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: deeply nested arrays within the bound
        raise RemoteProtocolError(f"agent message is not JSON: {str(exc)[:200]}") from None
    if type(data) is not dict:
        raise RemoteProtocolError(f"agent message must be a JSON object, got {_type_name(data)}")
    kind = data.get("type")
    if type(kind) is not str:
        raise RemoteProtocolError(f"agent message needs a string 'type', got {_type_name(kind)}")
    if kind != HEARTBEAT_TYPE:
        return UnknownAgentMessage(kind[:_MAX_TYPE])
    if "version" not in data:
        raise ValidationError("version", "missing")
    missing = [name for name in _FIELDS if name not in data]
    if missing:
        raise ValidationError(missing[0], "missing")
    return AgentHeartbeat(version=data["version"], **{name: data[name] for name in _FIELDS})


def encode_agent_message(message: AgentHeartbeat) -> str:
    """The TEXT message for ``message``: compact JSON, keys in wire order, floats in shortest form."""
    if type(message) is not AgentHeartbeat:
        raise LocalProtocolError(f"cannot encode {type(message).__name__} as an agent message")
    body: dict[str, Any] = {"type": HEARTBEAT_TYPE, "version": message.version}
    for name in _FIELDS:
        body[name] = getattr(message, name)
    return json.dumps(body, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


class AgentWatch:
    """Liveness of one VM's guest agent, fed with what the runner sees and the time it saw it.

    ``now`` is any monotonic clock in seconds (the same one for every call); a ``now`` earlier than a
    previous one counts as no time passed. ``booted(now)`` starts over (a restarted VM waits again for its
    agent, and the last boot's figures are forgotten); the constructor is the first boot.
    """

    __slots__ = (
        "_booted_at", "_connected", "_detached_at", "_ever_attached", "_heard_at", "_last", "_reported",
        "timeout",
    )  # fmt: skip

    def __init__(self, timeout_seconds: float, started_at: float) -> None:
        if (
            isinstance(timeout_seconds, bool)
            or not isinstance(timeout_seconds, int | float)
            or not math.isfinite(timeout_seconds)
            or timeout_seconds <= 0
        ):
            raise ValidationError("timeout_seconds", f"must be a positive number, got {timeout_seconds!r}")
        self.timeout = float(timeout_seconds)
        self._reported: VmAgentState | None = None
        self.booted(started_at)

    # -- input -----------------------------------------------------------------------------------------------

    def booted(self, now: float) -> None:
        """The VM (re)started: WAITING until its agent's first heartbeat, for at most the timeout."""
        self._booted_at = now
        self._heard_at: float | None = None
        self._last: AgentHeartbeat | None = None
        self._connected = False
        self._ever_attached = False
        self._detached_at: float | None = None

    def heartbeat(self, heartbeat: AgentHeartbeat, now: float) -> None:
        """A valid heartbeat arrived."""
        self._last = heartbeat
        self._heard_at = max(now, self._heard_at) if self._heard_at is not None else now

    def attached(self, now: float) -> None:
        """The agent's WebSocket was accepted (its heartbeat seq 0 follows)."""
        self._connected = True
        self._ever_attached = True
        self._detached_at = None

    def detached(self, now: float) -> None:
        """The agent's WebSocket ended (it reconnects by itself; the state changes only with the timeout)."""
        if self._connected:
            self._connected = False
            self._detached_at = now

    # -- output ----------------------------------------------------------------------------------------------

    @property
    def last(self) -> AgentHeartbeat | None:
        """The latest heartbeat since boot."""
        return self._last

    @property
    def last_heard_at(self) -> float | None:
        """When the latest heartbeat arrived (the caller's clock)."""
        return self._heard_at

    @property
    def connected(self) -> bool:
        return self._connected

    def deadline(self) -> float:
        """When the state turns (or turned) UNHEALTHY unless a heartbeat comes first: a daemon that sleeps
        until then and reports if ``changed`` learns of a silent agent without polling."""
        return (self._booted_at if self._heard_at is None else self._heard_at) + self.timeout

    def state(self, now: float) -> VmAgentState:
        since = self._booted_at if self._heard_at is None else self._heard_at
        if now - since >= self.timeout:
            return VmAgentState.UNHEALTHY
        return VmAgentState.WAITING if self._heard_at is None else VmAgentState.HEALTHY

    def changed(self, now: float) -> bool:
        """True when the state differs from the one the previous True answer was about (the first call:
        always), i.e. when the daemon should report; the answer is remembered."""
        state = self.state(now)
        if state is self._reported:
            return False
        self._reported = state
        return True

    def message(self, now: float) -> str | None:
        """Why the state is what it is, for people; None when healthy."""
        state = self.state(now)
        if state is VmAgentState.HEALTHY:
            return None
        if state is VmAgentState.WAITING:
            if self._connected:
                return "the guest agent is connected; waiting for its first heartbeat"
            return "waiting for the guest agent to phone home"
        if self._heard_at is None:
            text = f"no heartbeat from the guest agent within {self.timeout:g} s of boot"
            if self._ever_attached:
                text += "; it connected but sent none (is the tunnel client started with --agent?)"
            return text
        text = f"no heartbeat from the guest agent for {max(0.0, now - self._heard_at):.0f} s"
        if self._detached_at is not None:
            text += f"; its connection dropped {max(0.0, now - self._detached_at):.0f} s ago"
        elif self._connected:
            text += "; its connection is still open"
        return text

    def health(self, now: float, wall: dt.datetime) -> VmHealth:
        """What the runner reports: the state, why, and the latest heartbeat's figures. ``wall`` is the
        timezone-aware wall-clock time at ``now`` (the heartbeat's time is derived from it)."""
        if not isinstance(wall, dt.datetime) or wall.utcoffset() is None:
            raise ValidationError("wall", "must be a timezone-aware datetime")
        last = self._last
        if last is None or self._heard_at is None:
            return VmHealth(agent=self.state(now), message=self.message(now))
        return VmHealth(
            agent=self.state(now),
            message=self.message(now),
            last_heartbeat_at=wall - dt.timedelta(seconds=max(0.0, now - self._heard_at)),
            uptime_seconds=last.uptime_seconds,
            load1=last.load1,
            memory_total_bytes=last.memory_total_bytes,
            memory_available_bytes=last.memory_available_bytes,
            disk_total_bytes=last.disk_total_bytes,
            disk_free_bytes=last.disk_free_bytes,
            gpus=last.gpus,
        )
