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
    list_of,
    opt,
    v,
)
from .tasks import _check_gpu_id, _check_memory_limit, _check_mount


@attrs.frozen(kw_only=True)
class ExecuteRequest:
    """``POST /api/execute`` on the runner: run this task with these (already allocated) resources.

    Image choice, in order: ``registry_image`` (used if present locally, else pulled), then
    ``container_name`` (an environment tarball ``<name>-<unixts>.tar`` loaded as ``kohakuriver/<name>:base``),
    else the runner's ``DEFAULT_IMAGE``. ``command``/``arguments`` are an argv, never a shell string.
    """

    task_id: SnowflakeId = attrs.field(validator=v(check_int))
    task_type: TaskType = attrs.field(default=TaskType.COMMAND, validator=v(check_enum(TaskType)))
    command: str = attrs.field(validator=v(check_str, max_len=MAX_COMMAND, allow_empty=False))
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


@attrs.frozen(kw_only=True)
class TaskControl:
    """Reply of the runner's kill/pause/resume endpoints."""

    task_id: SnowflakeId = attrs.field(validator=v(check_int))
    ok: bool = attrs.field(default=True, validator=v(check_bool))
    message: str | None = attrs.field(default=None, validator=opt(check_str))


__all__ = ["ExecuteRequest", "TaskControl"]
