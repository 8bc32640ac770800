"""Placement targets: ``node``, ``node:numa``, ``node::g1,g2`` and ``node:numa::g1,g2``.

``numa`` is a NUMA node id of that machine, ``g1,g2`` are GPU ids of that machine (runner-local indices as
the node reports them in ``gpu_info``). Several targets in one submit make one task each.

Also home of the hostname rule, shared by targets and node registration: letters, digits, ``-``, ``_`` and
``.``, starting and ending with a letter or digit, at most 253 characters. No ``:`` (it separates the parts of
a target), no spaces, nothing a shell or a URL would reinterpret.
"""

from __future__ import annotations

import re

import attrs

from .errors import ValidationError

MAX_HOSTNAME_LENGTH = 253
MAX_NUMA_ID = 1023
MAX_GPU_ID = 4095
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
_DIGITS_RE = re.compile(r"[0-9]+")


def check_hostname(hostname: object, field: str = "hostname") -> str:
    """Return ``hostname`` if it is a valid node name, else raise ``ValidationError`` naming ``field``."""
    if not isinstance(hostname, str):
        raise ValidationError(field, f"must be a string, got {type(hostname).__name__}")
    if not hostname:
        raise ValidationError(field, "must not be empty")
    if len(hostname) > MAX_HOSTNAME_LENGTH:
        raise ValidationError(field, f"must be at most {MAX_HOSTNAME_LENGTH} characters")
    if not _HOSTNAME_RE.fullmatch(hostname):
        raise ValidationError(
            field,
            f"invalid hostname {hostname[:80]!r}: use letters, digits, '-', '_' and '.', "
            "starting and ending with a letter or digit",
        )
    return hostname


def _small_int(text: str, field: str, what: str, maximum: int) -> int:
    if not _DIGITS_RE.fullmatch(text):
        raise ValidationError(field, f"{what} must be a non-negative integer, got {text[:40]!r}")
    value = int(text)
    if value > maximum:
        raise ValidationError(field, f"{what} must be at most {maximum}, got {value}")
    return value


def _gpu_ids_converter(value: object) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, list | tuple) else value  # type: ignore[return-value]


@attrs.frozen
class Target:
    """One placement constraint. ``numa_node`` None = any; ``gpu_ids`` empty = no specific GPUs."""

    hostname: str = attrs.field()
    numa_node: int | None = attrs.field(default=None)
    gpu_ids: tuple[int, ...] = attrs.field(default=(), converter=_gpu_ids_converter)

    @hostname.validator
    def _check_hostname(self, _attribute: attrs.Attribute, value: str) -> None:
        check_hostname(value, "hostname")

    @numa_node.validator
    def _check_numa(self, _attribute: attrs.Attribute, value: int | None) -> None:
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_NUMA_ID:
            raise ValidationError("numa_node", f"must be an integer in 0..{MAX_NUMA_ID}, got {value!r}")

    @gpu_ids.validator
    def _check_gpus(self, _attribute: attrs.Attribute, value: tuple[int, ...]) -> None:
        if not isinstance(value, tuple):
            raise ValidationError("gpu_ids", f"must be a list of GPU ids, got {type(value).__name__}")
        for i, gpu in enumerate(value):
            if isinstance(gpu, bool) or not isinstance(gpu, int) or not 0 <= gpu <= MAX_GPU_ID:
                raise ValidationError(f"gpu_ids[{i}]", f"must be an integer in 0..{MAX_GPU_ID}, got {gpu!r}")
        if len(set(value)) != len(value):
            raise ValidationError("gpu_ids", f"duplicate GPU id in {list(value)}")

    def __str__(self) -> str:
        return format_target(self)


def parse_target(text: object, field: str = "target") -> Target:
    """Parse a target string; errors are ``ValidationError`` naming ``field`` and saying what is wrong.

    Spaces around the whole target and around GPU ids are tolerated (``node::0, 1``); the result formats back
    to the canonical form.
    """
    if not isinstance(text, str):
        raise ValidationError(field, f"must be a string like 'node', 'node:0' or 'node::0,1', got {text!r}")
    spec = text.strip()
    if not spec:
        raise ValidationError(field, "must not be empty")
    gpu_ids: tuple[int, ...] = ()
    if "::" in spec:
        spec, gpu_part = spec.split("::", 1)
        items = [item.strip() for item in gpu_part.split(",")]
        if items == [""]:
            raise ValidationError(field, f"no GPU ids after '::' in {text!r} (expected node::0,1)")
        if "" in items:
            raise ValidationError(field, f"empty GPU id in {text!r} (expected node::0,1)")
        gpu_ids = tuple(_small_int(item, field, "GPU id", MAX_GPU_ID) for item in items)
        if len(set(gpu_ids)) != len(gpu_ids):
            raise ValidationError(field, f"duplicate GPU id in {text!r}")
    numa_node: int | None = None
    if ":" in spec:
        spec, numa_part = spec.split(":", 1)
        numa_node = _small_int(numa_part, field, "NUMA node", MAX_NUMA_ID)
    if not spec:
        raise ValidationError(field, f"missing node name in {text!r}")
    try:
        check_hostname(spec, field)
    except ValidationError as exc:
        raise ValidationError(field, f"{exc.message} (in target {text!r})") from None
    return Target(spec, numa_node, gpu_ids)


def format_target(target: Target) -> str:
    """The canonical string of a target; ``parse_target(format_target(t)) == t``."""
    text = target.hostname
    if target.numa_node is not None:
        text += f":{target.numa_node}"
    if target.gpu_ids:
        text += "::" + ",".join(str(g) for g in target.gpu_ids)
    return text
