"""kohakuriver_proto: the sans-IO protocol core of KohakuRiver.

Nothing in this package performs I/O, reads a clock or draws randomness: callers feed bytes and the current
time in, and get bytes and events out. Host, runner, CLI and the Rust client's tests all bind to it, and it is
published on its own as the ``kohakuriver-proto`` distribution (attrs and cattrs are its only dependencies).

The public API is module by module (``from kohakuriver_proto.forwarder import Forwarder``): a flat namespace
would be ambiguous (``forwarder.ConnectionClosed`` and ``container_tunnel.ConnectionClosed`` are different
events; ``frames.encode`` is not the only encoder). ``public_names(module)`` says what a public module
offers; docs/proto-api.md describes it. The modules load on first use (``kohakuriver_proto.frames`` works
after a bare ``import kohakuriver_proto``), so importing the package costs only the error classes.
"""

from __future__ import annotations

import importlib

from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError, ValidationError

# Not typing.TYPE_CHECKING: importing typing would double the cost of importing this package. Type checkers
# read a module-level TYPE_CHECKING as theirs.
TYPE_CHECKING = False
if TYPE_CHECKING:  # what the lazy loading below hands out, for type checkers and editors
    from . import (
        agent,
        container_tunnel,
        converter,
        endpoint,
        errors,
        flow,
        forwarder,
        frames,
        lifecycle,
        models,
        overlay,
        qmp,
        session_opening,
        settings,
        snowflake,
        ssh_handshake,
        targets,
        terminal,
        tunnel_client,
        units,
        write_lanes,
        ws_frames,
    )

# The one place that holds the version of both distributions (kohakuriver and kohakuriver-proto): both
# pyproject files read it from here, so they cannot drift apart.
__version__ = "0.1.0"

# The public modules. A module's public names are its own ``__all__`` plus the names listed here: modules
# written before they had an ``__all__`` list everything here; the others only what their ``__all__`` misses.
# A name added to a module's ``__all__`` becomes public without a change here.
_PUBLIC: dict[str, tuple[str, ...]] = {
    # the tunnel wire protocol
    "frames": (
        "HEADER", "HEADER_SIZE", "MAX_CLIENT_ID", "MAX_PORT", "HELLO_PAYLOAD", "WINDOW_PAYLOAD",
        "FEATURE_FLOW_CONTROL", "SUPPORTED_FEATURES", "DEFAULT_WINDOW", "MsgType", "Proto", "Frame",
        "UnknownFrame", "encode", "decode", "encode_hello", "parse_hello", "encode_window", "parse_window",
        "parse_error_reason", "rewrite_client_id",
    ),
    "ws_frames": ("OP_TEXT", "OP_BINARY", "OP_CLOSE", "OP_PING", "OP_PONG", "frame_header"),
    "flow": (),
    "endpoint": (),
    "forwarder": (),
    "tunnel_client": (),
    "container_tunnel": (),
    "write_lanes": (),
    # other session protocols
    "ssh_handshake": (
        "MAX_LINE", "COMMAND", "SUCCESS_LINE", "NEED_DATA", "TunnelRequest", "TunnelAccepted",
        "TunnelRejected", "RejectReason", "check_tunnel_target", "build_request", "parse_request_line",
        "build_success", "build_error", "parse_reply_line", "ServerHandshake", "ClientHandshake",
    ),
    "terminal": ("encode_resize", "encode_eof"),
    "session_opening": (),
    # virtual machines: QEMU's control socket, the guest agent's heartbeats
    "qmp": (),
    "agent": (),
    # tasks, nodes and the REST API's bodies
    "lifecycle": (
        "TaskType", "TaskStatus", "FINAL", "ACTIVE", "REACHABLE", "TRANSITIONS", "check_transition", "apply",
        "allowed_next", "status_for_exit", "describe_exit",
    ),
    "models": (),
    "converter": (),
    # the overlay network: address plan, VXLAN ids and link names, reservation tokens
    "overlay": (),
    "snowflake": (
        "SnowflakeId", "EPOCH_MS", "TIMESTAMP_BITS", "INSTANCE_BITS", "SEQUENCE_BITS", "MAX_INSTANCE",
        "MAX_SEQUENCE", "MAX_TIMESTAMP", "MAX_ID", "SnowflakeGenerator", "timestamp_ms", "instance_of",
        "parse_id", "format_id",
    ),
    "targets": (
        "MAX_HOSTNAME_LENGTH", "MAX_NUMA_ID", "MAX_GPU_ID", "check_hostname", "Target", "parse_target",
        "format_target",
    ),
    "units": ("MAX_SIZE", "unit_multiplier", "parse_size", "format_size"),
    # configuration files (the schema machinery; the daemons' own settings are not part of the library)
    "settings": (),
    "errors": ("ProtocolError", "LocalProtocolError", "RemoteProtocolError", "ValidationError"),
}  # fmt: skip

#: The public modules, in the order docs/proto-api.md presents them.
PUBLIC_MODULES: tuple[str, ...] = tuple(_PUBLIC)

# The error classes, PUBLIC_MODULES, public_names and the public modules (loaded on first use). Spelled out
# rather than built from PUBLIC_MODULES so that linters and editors can read it (tests/packaging checks both).
__all__ = [
    "PUBLIC_MODULES",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "ValidationError",
    "agent",
    "container_tunnel",
    "converter",
    "endpoint",
    "errors",
    "flow",
    "forwarder",
    "frames",
    "lifecycle",
    "models",
    "overlay",
    "public_names",
    "qmp",
    "session_opening",
    "settings",
    "snowflake",
    "ssh_handshake",
    "targets",
    "terminal",
    "tunnel_client",
    "units",
    "write_lanes",
    "ws_frames",
]


def public_names(module: str) -> tuple[str, ...]:
    """The public names of ``kohakuriver_proto.<module>`` (imports that module)."""
    if module not in _PUBLIC:
        raise KeyError(f"{module!r} is not a public module of kohakuriver_proto")
    own = getattr(importlib.import_module(f"{__name__}.{module}"), "__all__", ())
    return tuple(dict.fromkeys([*own, *_PUBLIC[module]]))


def __getattr__(name: str) -> object:
    # Only reached for names not yet in the namespace: a submodule loads on its first use.
    if name in _PUBLIC:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
