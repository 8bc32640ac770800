"""The JSON models of KohakuRiver's APIs: attrs classes, validated on construction.

Encode and decode them only through ``kohakuriver_proto.converter`` (one cattrs converter): it writes
snowflake ids as decimal strings, enums as their values and datetimes as ISO-8601 UTC strings, and turns
every failure into a ``ValidationError`` naming the field path.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: Where each public name lives. Loaded on first use: ``kr task submit`` needs only ``tasks``, and every
#: submodule costs the CLI's start (``nodes``, ``runner_api`` and ``api`` are ~13 ms it never uses).
_HOMES = {
    "TaskStatus": "..lifecycle",
    "TaskType": "..lifecycle",
    "SnowflakeId": "..snowflake",
    "ERROR_CODES": ".api",
    "ApiError": ".api",
    **dict.fromkeys(
        (
            "GpuInfo",
            "Heartbeat",
            "NodeInfo",
            "NodeRegistration",
            "NodeStatus",
            "NumaId",
            "NumaNode",
            "NumaTopology",
            "VfioGpuInfo",
            "VmAccel",
            "VmFacts",
            "VmImageInfo",
        ),
        ".nodes",
    ),
    **dict.fromkeys(
        (
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
        ),
        ".overlay",
    ),
    "ExecuteRequest": ".runner_api",
    "TaskControl": ".runner_api",
    **dict.fromkeys(
        (
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
        ),
        ".tasks",
    ),
}

if TYPE_CHECKING:
    from ..lifecycle import TaskStatus, TaskType
    from ..snowflake import SnowflakeId
    from .api import ERROR_CODES, ApiError
    from .nodes import (
        GpuInfo,
        Heartbeat,
        NodeInfo,
        NodeRegistration,
        NodeStatus,
        NumaId,
        NumaNode,
        NumaTopology,
        VfioGpuInfo,
        VmAccel,
        VmFacts,
        VmImageInfo,
    )
    from .overlay import (
        HeartbeatAnswer,
        IpReservation,
        OverlayAssignment,
        OverlayMode,
        OverlayPeer,
        OverlayRunnerView,
        OverlaySettingsView,
        OverlayStatus,
        RegisterAnswer,
        ReserveRequest,
    )
    from .runner_api import ExecuteRequest, TaskControl
    from .tasks import (
        SSH_KEY_TYPES,
        CommandTaskSpec,
        Mount,
        SshKeyMode,
        StatusUpdate,
        TaskRecord,
        VmAgentState,
        VmHealth,
        VpsBackend,
        VpsSpec,
        check_ssh_public_key,
        parse_mount,
    )


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value  # once loaded, a plain module attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))


__all__ = [
    "ERROR_CODES",
    "SSH_KEY_TYPES",
    "ApiError",
    "CommandTaskSpec",
    "ExecuteRequest",
    "GpuInfo",
    "Heartbeat",
    "HeartbeatAnswer",
    "IpReservation",
    "Mount",
    "NodeInfo",
    "NodeRegistration",
    "NodeStatus",
    "NumaId",
    "NumaNode",
    "NumaTopology",
    "OverlayAssignment",
    "OverlayMode",
    "OverlayPeer",
    "OverlayRunnerView",
    "OverlaySettingsView",
    "OverlayStatus",
    "RegisterAnswer",
    "ReserveRequest",
    "SnowflakeId",
    "SshKeyMode",
    "StatusUpdate",
    "TaskControl",
    "TaskRecord",
    "TaskStatus",
    "TaskType",
    "VfioGpuInfo",
    "VmAccel",
    "VmAgentState",
    "VmFacts",
    "VmHealth",
    "VmImageInfo",
    "VpsBackend",
    "VpsSpec",
    "check_ssh_public_key",
    "parse_mount",
]
