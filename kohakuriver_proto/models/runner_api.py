"""Host -> runner requests: what the host sends when it places a task on a node."""

from __future__ import annotations

import attrs

from ..lifecycle import TaskType
from ..snowflake import SnowflakeId
from ._fields import (
    MAX_ARGUMENT,
    MAX_ARGUMENTS,
    MAX_COMMAND,
    check_abs_path,
    check_bool,
    check_container_name,
    check_enum,
    check_image_ref,
    check_int,
    check_str,
    env_mapping,
    fail,
    list_of,
    opt,
    v,
)
from .overlay import check_ipv4
from .tasks import (
    SshKeyMode,
    VpsBackend,
    _check_disk_size,
    _check_gpu_id,
    _check_memory_limit,
    _check_mount,
    check_ssh_public_key,
)

#: Key modes that carry a public key to inject.
_KEYED = (SshKeyMode.UPLOAD, SshKeyMode.GENERATE)


@attrs.frozen(kw_only=True)
class ExecuteRequest:
    """``POST /api/execute`` on the runner: run this task with these (already allocated) resources.

    Image choice, in order: ``registry_image`` (used if present locally, else pulled), then
    ``container_name`` (an environment tarball ``<name>-<unixts>.tar`` loaded as ``kohakuriver/<name>:base``),
    else the runner's ``DEFAULT_IMAGE``. ``command``/``arguments`` are an argv, never a shell string.

    A VPS (``task_type`` vps) has no command of its own (the runner starts the image's sshd, or the image's
    default command when SSH is disabled); ``ssh_key_mode`` says how its ``authorized_keys`` is made:
    ``upload``/``generate`` carry ``ssh_public_key`` (the host received it or the CLI generated the pair),
    ``none`` means SSH without an injected key (the image's own login), ``disabled`` means no sshd at all.
    """

    task_id: SnowflakeId = attrs.field(validator=v(check_int))
    task_type: TaskType = attrs.field(default=TaskType.COMMAND, validator=v(check_enum(TaskType)))
    command: str = attrs.field(default="", validator=v(check_str, max_len=MAX_COMMAND))
    arguments: list[str] = attrs.field(
        factory=list, validator=list_of(check_str, max_items=MAX_ARGUMENTS, max_len=MAX_ARGUMENT)
    )
    env_vars: dict[str, str] = attrs.field(factory=dict, validator=env_mapping)
    required_cores: int = attrs.field(default=1, validator=v(check_int, maximum=65536))
    required_memory_bytes: int | None = attrs.field(default=None, validator=opt(_check_memory_limit))
    gpu_ids: list[int] = attrs.field(factory=list, validator=list_of(_check_gpu_id, unique=True))
    numa_node: int | None = attrs.field(default=None, validator=opt(check_int, maximum=1023))
    container_name: str | None = attrs.field(default=None, validator=opt(check_container_name))
    registry_image: str | None = attrs.field(default=None, validator=opt(check_image_ref))
    working_dir: str | None = attrs.field(default=None, validator=opt(check_abs_path))
    privileged: bool = attrs.field(default=False, validator=v(check_bool))
    additional_mounts: list[str] = attrs.field(factory=list, validator=list_of(_check_mount, max_items=64))
    ssh_key_mode: SshKeyMode | None = attrs.field(default=None, validator=opt(check_enum(SshKeyMode)))
    ssh_public_key: str | None = attrs.field(default=None, validator=opt(check_ssh_public_key))
    # VM VPS (vps_backend qemu): the base image in VM_IMAGES_DIR, the disk size ("50G"; default
    # VM_DEFAULT_DISK_SIZE) and memory (default VM_DEFAULT_MEMORY_MB)
    vps_backend: VpsBackend = attrs.field(default=VpsBackend.DOCKER, validator=v(check_enum(VpsBackend)))
    vm_image: str | None = attrs.field(default=None, validator=opt(check_container_name))
    vm_disk_size: str | None = attrs.field(default=None, validator=opt(_check_disk_size))
    memory_mb: int | None = attrs.field(default=None, validator=opt(check_int, minimum=64, maximum=1 << 32))
    # overlay network: the address the container or VM must get (from a reservation); None = any free one
    overlay_ip: str | None = attrs.field(default=None, validator=opt(check_ipv4))

    def __attrs_post_init__(self) -> None:
        if self.vps_backend is VpsBackend.QEMU:
            if self.task_type is not TaskType.VPS:
                fail("vps_backend", "'qemu' only for a VPS")
            if self.vm_image is None:
                fail("vm_image", "required with vps_backend 'qemu'")
        if self.task_type is TaskType.COMMAND:
            if not self.command.strip():
                fail("command", "must not be empty for a command task")
            if self.ssh_key_mode is not None or self.ssh_public_key is not None:
                fail("ssh_key_mode", "only for a VPS")
        elif self.ssh_public_key is not None and self.ssh_key_mode not in _KEYED:
            fail("ssh_public_key", "only with ssh_key_mode 'upload' or 'generate'")


@attrs.frozen(kw_only=True)
class TaskControl:
    """Reply of the runner's kill/pause/resume endpoints."""

    task_id: SnowflakeId = attrs.field(validator=v(check_int))
    ok: bool = attrs.field(default=True, validator=v(check_bool))
    message: str | None = attrs.field(default=None, validator=opt(check_str))


__all__ = ["ExecuteRequest", "TaskControl"]
