"""The JSON models of KohakuRiver's APIs: attrs classes, validated on construction.

Encode and decode them only through ``kohakuriver_proto.converter`` (one cattrs converter): it writes
snowflake ids as decimal strings, enums as their values and datetimes as ISO-8601 UTC strings, and turns
every failure into a ``ValidationError`` naming the field path.
"""

from ..lifecycle import TaskStatus, TaskType
from ..snowflake import SnowflakeId
from .api import ERROR_CODES, ApiError
from .nodes import GpuInfo, Heartbeat, NodeInfo, NodeRegistration, NodeStatus, NumaId, NumaNode, NumaTopology
from .runner_api import ExecuteRequest, TaskControl
from .tasks import (
    SSH_KEY_TYPES,
    CommandTaskSpec,
    Mount,
    SshKeyMode,
    StatusUpdate,
    TaskRecord,
    VpsBackend,
    VpsSpec,
    check_ssh_public_key,
    parse_mount,
)

__all__ = [
    "ERROR_CODES",
    "SSH_KEY_TYPES",
    "ApiError",
    "CommandTaskSpec",
    "ExecuteRequest",
    "GpuInfo",
    "Heartbeat",
    "Mount",
    "NodeInfo",
    "NodeRegistration",
    "NodeStatus",
    "NumaId",
    "NumaNode",
    "NumaTopology",
    "SnowflakeId",
    "SshKeyMode",
    "StatusUpdate",
    "TaskControl",
    "TaskRecord",
    "TaskStatus",
    "TaskType",
    "VpsBackend",
    "VpsSpec",
    "check_ssh_public_key",
    "parse_mount",
]
