"""Task models: the two submit requests, the stored/returned task, and the runner's status report."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import enum
import struct

import attrs

from ..lifecycle import TaskStatus, TaskType
from ..snowflake import SnowflakeId
from ..targets import Target, parse_target
from ..units import parse_size
from ._fields import (
    MAX_ARGUMENT,
    MAX_ARGUMENTS,
    MAX_COMMAND,
    MAX_NAME,
    MIN_MEMORY_LIMIT,
    check_abs_path,
    check_bool,
    check_container_name,
    check_datetime,
    check_enum,
    check_float,
    check_hostname_field,
    check_image_ref,
    check_int,
    check_port,
    check_str,
    env_mapping,
    fail,
    list_of,
    opt,
    v,
)
from .overlay import check_ip_token, check_ipv4


class SshKeyMode(enum.StrEnum):
    """How a VPS gets SSH access. ``none`` = sshd runs but no key is injected: the image's own accounts
    decide who gets in. It never means a passwordless root login (DESIGN section 9)."""

    DISABLED = "disabled"  # no sshd, terminal only
    NONE = "none"
    UPLOAD = "upload"  # ``ssh_public_key`` is injected
    # The client generated an Ed25519 pair and sends its public half; no private key ever leaves the client.
    GENERATE = "generate"


class VpsBackend(enum.StrEnum):
    DOCKER = "docker"
    QEMU = "qemu"


# -- element checks ------------------------------------------------------------------------------------------


@attrs.frozen
class Mount:
    """A bind mount ``source:target[:ro|:rw]`` (both absolute host/container paths)."""

    source: str
    target: str
    read_only: bool = False

    def __str__(self) -> str:
        return f"{self.source}:{self.target}" + (":ro" if self.read_only else "")


def parse_mount(text: object, field: str = "mount") -> Mount:
    """Parse ``/host/path:/container/path[:ro|:rw]``; ``ValidationError`` naming ``field`` if malformed."""
    check_str(text, field, max_len=8192, allow_empty=False, one_line=True)
    parts = text.split(":")
    if len(parts) not in (2, 3):
        fail(field, f"expected 'source:target' or 'source:target:ro', got {text[:80]!r}")
    read_only = False
    if len(parts) == 3:
        if parts[2] not in ("ro", "rw"):
            fail(field, f"mount option must be 'ro' or 'rw', got {parts[2][:20]!r}")
        read_only = parts[2] == "ro"
    for part in parts[:2]:
        check_abs_path(part, field)
        if "," in part:
            fail(field, f"paths with ',' cannot be mounted: {part[:80]!r}")
    if parts[1].rstrip("/") == "":
        fail(field, "cannot mount over the container's root directory")
    return Mount(parts[0], parts[1], read_only)


def _check_mount(value: object, path: str) -> None:
    parse_mount(value, path)


def _check_target(value: object, path: str) -> None:
    parse_target(value, path)


def _check_gpu_id(value: object, path: str) -> None:
    check_int(value, path, maximum=4095)


def _check_memory_limit(value: object, path: str) -> None:
    check_int(value, path)
    if value < MIN_MEMORY_LIMIT:
        fail(path, "must be at least 6 MiB (Docker's minimum), or null for no limit")


def _check_disk_size(value: object, path: str) -> None:
    check_str(value, path, max_len=32)
    if parse_size(value, path) <= 0:
        fail(path, "must be larger than 0")


def _check_exit_code(value: object, path: str) -> None:
    check_int(value, path, minimum=-(1 << 31), maximum=(1 << 31) - 1)


#: OpenSSH public key types accepted for ``ssh_public_key``.
SSH_KEY_TYPES = frozenset(
    {
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    }
)


def check_ssh_public_key(value: object, path: str = "ssh_public_key") -> None:
    """One OpenSSH public key line: ``<type> <base64 blob> [comment]``.

    The blob must decode and start with the same key type (as every real key does), so a pasted private key,
    a fingerprint or a line with ``authorized_keys`` options (``command="..."``) is refused.
    """
    check_str(value, path, max_len=16384, allow_empty=False)
    if "\n" in value or "\r" in value:
        fail(path, "must be a single public key line (no line breaks)")
    if "PRIVATE KEY" in value:
        fail(path, "this is a private key: paste the public key (the .pub file)")
    fields = value.strip().split(None, 2)
    if len(fields) < 2:
        fail(path, "expected '<type> <base64> [comment]', e.g. the content of ~/.ssh/id_ed25519.pub")
    key_type, blob = fields[0], fields[1]
    if key_type not in SSH_KEY_TYPES:
        fail(
            path,
            f"unsupported key type {key_type[:40]!r} (expected one of {', '.join(sorted(SSH_KEY_TYPES))})",
        )
    try:
        raw = base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError):
        fail(path, "the key data is not valid base64")
    if len(raw) < 4:
        fail(path, "the key data is truncated")
    (length,) = struct.unpack_from(">I", raw)
    if raw[4 : 4 + length] != key_type.encode():
        fail(path, f"the key data does not match its type {key_type!r}")
    if len(fields) == 3 and any(ord(c) < 0x20 or ord(c) == 0x7F for c in fields[2]):
        fail(path, "the comment must not contain control characters")


def _resource_fields_check(spec: CommandTaskSpec | VpsSpec, targets: list[Target]) -> None:
    if spec.container_name is not None and spec.registry_image is not None:
        fail("registry_image", "give either container_name (an environment) or registry_image, not both")
    if spec.required_gpus:
        if not targets:
            fail("required_gpus", "GPU ids are per node: give a target node too (or use node::0,1)")
        for i, target in enumerate(targets):
            if target.gpu_ids:
                field = "target" if isinstance(spec, VpsSpec) else f"targets[{i}]"
                fail(field, "give GPU ids either in the target (node::0,1) or in required_gpus, not both")


# -- submit requests -----------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class CommandTaskSpec:
    """``POST /api/submit``: a one-shot command. One task per target (none = any node that fits).

    ``command`` is the program (argv[0]) and ``arguments`` the rest of argv; they are executed directly,
    never through a shell (to use a shell, submit ``sh`` with ``["-c", "..."]``).
    """

    command: str = attrs.field(validator=v(check_str, max_len=MAX_COMMAND, allow_empty=False))
    arguments: list[str] = attrs.field(
        factory=list, validator=list_of(check_str, max_items=MAX_ARGUMENTS, max_len=MAX_ARGUMENT)
    )
    env_vars: dict[str, str] = attrs.field(factory=dict, validator=env_mapping)
    required_cores: int = attrs.field(default=1, validator=v(check_int, maximum=65536))
    required_memory_bytes: int | None = attrs.field(default=None, validator=opt(_check_memory_limit))
    required_gpus: list[int] = attrs.field(factory=list, validator=list_of(_check_gpu_id, unique=True))
    targets: list[str] = attrs.field(factory=list, validator=list_of(_check_target, max_items=1024))
    container_name: str | None = attrs.field(default=None, validator=opt(check_container_name))
    registry_image: str | None = attrs.field(default=None, validator=opt(check_image_ref))
    working_dir: str | None = attrs.field(default=None, validator=opt(check_abs_path))
    privileged: bool = attrs.field(default=False, validator=v(check_bool))
    additional_mounts: list[str] = attrs.field(factory=list, validator=list_of(_check_mount, max_items=64))
    name: str | None = attrs.field(default=None, validator=opt(check_str, max_len=MAX_NAME, one_line=True))
    task_type: TaskType = attrs.field(default=TaskType.COMMAND, validator=v(check_enum(TaskType)))
    # a reservation token (``kr overlay reserve``): the task gets the reserved overlay address
    ip_token: str | None = attrs.field(default=None, validator=opt(check_ip_token))

    def __attrs_post_init__(self) -> None:
        if self.task_type is not TaskType.COMMAND:
            fail("task_type", "must be 'command' here (create a VPS with POST /api/vps/create)")
        targets = self.parsed_targets()
        if self.ip_token is not None and len(targets) > 1:
            fail("ip_token", "a reserved address is for one task: give at most one target")
        _resource_fields_check(self, targets)

    def parsed_targets(self) -> list[Target]:
        return [parse_target(t, f"targets[{i}]") for i, t in enumerate(self.targets)]

    def placements(self) -> list[Target | None]:
        """One entry per task to create: a Target (with ``required_gpus`` folded into its ``gpu_ids``), or
        a single None when no target was given (the scheduler picks any node that fits)."""
        targets = self.parsed_targets()
        if not targets:
            return [None]
        gpus = tuple(self.required_gpus)
        return [attrs.evolve(t, gpu_ids=gpus) if gpus else t for t in targets]

    def mounts(self) -> list[Mount]:
        return [parse_mount(m, f"additional_mounts[{i}]") for i, m in enumerate(self.additional_mounts)]


@attrs.frozen(kw_only=True)
class VpsSpec:
    """``POST /api/vps/create``: a long-lived machine (Docker container or QEMU VM) on one node."""

    name: str | None = attrs.field(default=None, validator=opt(check_str, max_len=MAX_NAME, one_line=True))
    required_cores: int = attrs.field(default=1, validator=v(check_int, maximum=65536))
    required_memory_bytes: int | None = attrs.field(default=None, validator=opt(_check_memory_limit))
    required_gpus: list[int] = attrs.field(factory=list, validator=list_of(_check_gpu_id, unique=True))
    target: str | None = attrs.field(default=None, validator=opt(_check_target))
    container_name: str | None = attrs.field(default=None, validator=opt(check_container_name))
    registry_image: str | None = attrs.field(default=None, validator=opt(check_image_ref))
    privileged: bool = attrs.field(default=False, validator=v(check_bool))
    additional_mounts: list[str] = attrs.field(factory=list, validator=list_of(_check_mount, max_items=64))
    ssh_key_mode: SshKeyMode = attrs.field(default=SshKeyMode.DISABLED, validator=v(check_enum(SshKeyMode)))
    ssh_public_key: str | None = attrs.field(default=None, validator=opt(check_ssh_public_key))
    vps_backend: VpsBackend = attrs.field(default=VpsBackend.DOCKER, validator=v(check_enum(VpsBackend)))
    vm_image: str | None = attrs.field(default=None, validator=opt(check_container_name))
    vm_disk_size: str | None = attrs.field(default=None, validator=opt(_check_disk_size))
    memory_mb: int | None = attrs.field(default=None, validator=opt(check_int, minimum=64, maximum=1 << 32))
    # a reservation token (``kr overlay reserve``): the VPS gets the reserved overlay address
    ip_token: str | None = attrs.field(default=None, validator=opt(check_ip_token))

    def __attrs_post_init__(self) -> None:
        keyed = self.ssh_key_mode in (SshKeyMode.UPLOAD, SshKeyMode.GENERATE)
        if keyed and self.ssh_public_key is None:
            fail(
                "ssh_public_key",
                f"required with ssh_key_mode {self.ssh_key_mode.value!r} (for 'generate': the public half of "
                "the pair the client generated; the host never makes or sees private keys)",
            )
        if not keyed and self.ssh_public_key is not None:
            fail(
                "ssh_public_key",
                f"only used with ssh_key_mode 'upload' or 'generate', not {self.ssh_key_mode.value!r}",
            )
        if self.vps_backend is VpsBackend.DOCKER:
            for field in ("vm_image", "vm_disk_size", "memory_mb"):
                if getattr(self, field) is not None:
                    fail(field, "only for vps_backend 'qemu'")
        else:
            for field in ("container_name", "registry_image", "required_memory_bytes"):
                if getattr(self, field) is not None:
                    hint = " (use memory_mb for a VM)" if field == "required_memory_bytes" else ""
                    fail(field, f"only for vps_backend 'docker'{hint}")
            if self.privileged:
                fail("privileged", "only for vps_backend 'docker'")
            if self.additional_mounts:
                fail("additional_mounts", "only for vps_backend 'docker'")
        _resource_fields_check(self, self.parsed_targets())

    def parsed_targets(self) -> list[Target]:
        return [] if self.target is None else [parse_target(self.target, "target")]

    def placement(self) -> Target | None:
        """The target with ``required_gpus`` folded in, or None (any node that fits)."""
        targets = self.parsed_targets()
        if not targets:
            return None
        return (
            attrs.evolve(targets[0], gpu_ids=tuple(self.required_gpus)) if self.required_gpus else targets[0]
        )

    def mounts(self) -> list[Mount]:
        return [parse_mount(m, f"additional_mounts[{i}]") for i, m in enumerate(self.additional_mounts)]


class VmAgentState(enum.StrEnum):
    """The guest agent of a VM VPS as its runner sees it."""

    WAITING = "waiting"  # booted, the agent has not phoned home yet
    HEALTHY = "healthy"  # heartbeats arrive
    UNHEALTHY = "unhealthy"  # silent for longer than VM_HEARTBEAT_TIMEOUT_SECONDS


@attrs.frozen(kw_only=True)
class VmHealth:
    """A VM VPS's guest as its agent last reported it (runner -> host in status updates)."""

    agent: VmAgentState = attrs.field(validator=v(check_enum(VmAgentState)))
    message: str | None = attrs.field(default=None, validator=opt(check_str, max_len=1024))
    last_heartbeat_at: dt.datetime | None = attrs.field(default=None, validator=opt(check_datetime))
    uptime_seconds: float | None = attrs.field(default=None, validator=opt(check_float, minimum=0))
    load1: float | None = attrs.field(default=None, validator=opt(check_float, minimum=0))
    memory_total_bytes: int | None = attrs.field(default=None, validator=opt(check_int))
    memory_available_bytes: int | None = attrs.field(default=None, validator=opt(check_int))
    disk_total_bytes: int | None = attrs.field(default=None, validator=opt(check_int))
    disk_free_bytes: int | None = attrs.field(default=None, validator=opt(check_int))
    gpus: int | None = attrs.field(default=None, validator=opt(check_int, maximum=4096))


_vm_health = attrs.validators.optional(attrs.validators.instance_of(VmHealth))


# -- the task as stored and returned -------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class TaskRecord:
    """A task as the host stores it and the API returns it (``GET /api/status/{id}``, lists)."""

    task_id: SnowflakeId = attrs.field(validator=v(check_int))
    task_type: TaskType = attrs.field(validator=v(check_enum(TaskType)))
    status: TaskStatus = attrs.field(validator=v(check_enum(TaskStatus)))
    submitted_at: dt.datetime = attrs.field(validator=v(check_datetime))
    batch_id: SnowflakeId | None = attrs.field(default=None, validator=opt(check_int))
    name: str | None = attrs.field(default=None, validator=opt(check_str, max_len=MAX_NAME, one_line=True))
    owner: str | None = attrs.field(default=None, validator=opt(check_str, max_len=128, one_line=True))
    owner_id: int | None = attrs.field(default=None, validator=opt(check_int))
    # what to run
    command: str | None = attrs.field(default=None, validator=opt(check_str, max_len=MAX_COMMAND))
    arguments: list[str] = attrs.field(
        factory=list, validator=list_of(check_str, max_items=MAX_ARGUMENTS, max_len=MAX_ARGUMENT)
    )
    env_vars: dict[str, str] = attrs.field(factory=dict, validator=env_mapping)
    container_name: str | None = attrs.field(default=None, validator=opt(check_container_name))
    registry_image: str | None = attrs.field(default=None, validator=opt(check_image_ref))
    docker_image_name: str | None = attrs.field(default=None, validator=opt(check_image_ref))
    working_dir: str | None = attrs.field(default=None, validator=opt(check_abs_path))
    privileged: bool = attrs.field(default=False, validator=v(check_bool))
    additional_mounts: list[str] = attrs.field(factory=list, validator=list_of(_check_mount, max_items=64))
    # resources and placement
    required_cores: int = attrs.field(default=1, validator=v(check_int, maximum=65536))
    required_memory_bytes: int | None = attrs.field(default=None, validator=opt(check_int))
    required_gpus: list[int] = attrs.field(factory=list, validator=list_of(_check_gpu_id, unique=True))
    target: str | None = attrs.field(default=None, validator=opt(_check_target))
    target_numa_node_id: int | None = attrs.field(default=None, validator=opt(check_int, maximum=1023))
    assigned_node: str | None = attrs.field(default=None, validator=opt(check_hostname_field))
    # VPS
    vps_backend: VpsBackend | None = attrs.field(default=None, validator=opt(check_enum(VpsBackend)))
    ssh_key_mode: SshKeyMode | None = attrs.field(default=None, validator=opt(check_enum(SshKeyMode)))
    ssh_port: int | None = attrs.field(default=None, validator=opt(check_port))
    vm_image: str | None = attrs.field(default=None, validator=opt(check_container_name))
    vm_disk_size: str | None = attrs.field(default=None, validator=opt(_check_disk_size))
    vm_ip: str | None = attrs.field(default=None, validator=opt(check_str, max_len=64, one_line=True))
    vm_health: VmHealth | None = attrs.field(default=None, validator=_vm_health)
    memory_mb: int | None = attrs.field(default=None, validator=opt(check_int))
    # overlay network: the task's address on it (the reservation token itself is not stored)
    overlay_ip: str | None = attrs.field(default=None, validator=opt(check_ipv4))
    # outcome
    exit_code: int | None = attrs.field(default=None, validator=opt(_check_exit_code))
    error_message: str | None = attrs.field(default=None, validator=opt(check_str))
    status_message: str | None = attrs.field(default=None, validator=opt(check_str))
    approved_by: str | None = attrs.field(default=None, validator=opt(check_str, max_len=128, one_line=True))
    approved_at: dt.datetime | None = attrs.field(default=None, validator=opt(check_datetime))
    started_at: dt.datetime | None = attrs.field(default=None, validator=opt(check_datetime))
    completed_at: dt.datetime | None = attrs.field(default=None, validator=opt(check_datetime))

    def __attrs_post_init__(self) -> None:
        if self.task_type is TaskType.COMMAND and not (self.command and self.command.strip()):
            fail("command", "must not be empty for a command task")


# -- the runner's report -------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class StatusUpdate:
    """Runner -> host: a task changed status (``POST /api/update``, and ``Heartbeat.finished_tasks``)."""

    task_id: SnowflakeId = attrs.field(validator=v(check_int))
    status: TaskStatus = attrs.field(validator=v(check_enum(TaskStatus)))
    exit_code: int | None = attrs.field(default=None, validator=opt(_check_exit_code))
    message: str | None = attrs.field(default=None, validator=opt(check_str))
    started_at: dt.datetime | None = attrs.field(default=None, validator=opt(check_datetime))
    completed_at: dt.datetime | None = attrs.field(default=None, validator=opt(check_datetime))
    ssh_port: int | None = attrs.field(default=None, validator=opt(check_port))
    # VM VPS: the guest's address on the runner's VM bridge, and its agent's last word
    vm_ip: str | None = attrs.field(default=None, validator=opt(check_str, max_len=64, one_line=True))
    vm_health: VmHealth | None = attrs.field(default=None, validator=_vm_health)
    # the address the runner gave the container or VM on the overlay network
    overlay_ip: str | None = attrs.field(default=None, validator=opt(check_ipv4))


__all__ = [
    "SSH_KEY_TYPES",
    "CommandTaskSpec",
    "Mount",
    "SshKeyMode",
    "StatusUpdate",
    "TaskRecord",
    "VmAgentState",
    "VmHealth",
    "VpsBackend",
    "VpsSpec",
    "check_ssh_public_key",
    "parse_mount",
]
