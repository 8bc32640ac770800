"""Settings the host (``HOST_SCHEMA``) and the runner (``RUNNER_SCHEMA``) both have, defined once.

Each is the same setting on both sides (name, type, default, check); the two schemas pick them up as
``Setting`` objects or through the small section helpers below, so their order within a section is the
schema's own. Pure, like ``kohakuriver_proto.settings``.
"""

from __future__ import annotations

from . import settings as s
from .models.overlay import OverlayMode
from .settings import LogLevel, Section, Setting

__all__ = [
    "ADDITIONAL_MOUNTS",
    "DEFAULT_WORKING_DIR",
    "LOGGING_SECTION",
    "LOG_LEVEL",
    "OVERLAY_ENABLED",
    "OVERLAY_MODE",
    "OVERLAY_MTU",
    "OVERLAY_SUBNET",
    "OVERLAY_VXLAN_ID",
    "OVERLAY_VXLAN_PORT",
    "TASKS_PRIVILEGED",
    "TLS_KEY_FILE",
    "overlay_section",
    "tls_settings",
]

# -- TLS ----------------------------------------------------------------------------------------------------

TLS_KEY_FILE = Setting("TLS_KEY_FILE", str, "", "Private key (PEM) for TLS_CERT_FILE; set both or neither.")


def tls_settings(served: str) -> list[Setting]:
    """``TLS_CERT_FILE`` and ``TLS_KEY_FILE``; ``served`` names what is served, e.g. ``"runner API"``."""
    cert = Setting(
        "TLS_CERT_FILE",
        str,
        "",
        f'Certificate (PEM) to serve the {served} over https/wss ("" = plain http/ws).',
    )
    return [cert, TLS_KEY_FILE]


# -- Task containers ----------------------------------------------------------------------------------------

TASKS_PRIVILEGED = Setting(
    "TASKS_PRIVILEGED",
    bool,
    False,
    "Run every task container with --privileged (a task can also ask for it itself).",
)

ADDITIONAL_MOUNTS = Setting(
    "ADDITIONAL_MOUNTS",
    list[str],
    [],
    'Extra bind mounts for every task container, added to the task\'s own: "host_path:container_path" with '
    'an optional ":ro" or ":rw"; both paths absolute.',
    s.mounts,
)

DEFAULT_WORKING_DIR = Setting(
    "DEFAULT_WORKING_DIR",
    str,
    "/shared",
    "Default working directory inside containers.",
    s.absolute_path,
)

# -- Overlay network (the host and every runner must agree) -------------------------------------------------

OVERLAY_ENABLED = Setting(
    "OVERLAY_ENABLED", bool, False, "Enable the VXLAN overlay (the host and every runner must match)."
)

OVERLAY_SUBNET = Setting(
    "OVERLAY_SUBNET",
    str,
    "10.128.0.0/12/6/14",
    "Overlay address plan BASE/TOTAL_PREFIX/NODE_BITS/SUBNET_BITS (the host and every runner must match): "
    "the default gives 10.128.0.0/12, up to 63 runners with a /18 each.",
    s.overlay_subnet,
)

OVERLAY_VXLAN_ID = Setting(
    "OVERLAY_VXLAN_ID",
    int,
    100,
    "Base VXLAN id; a runner's VNI is base + runner id (the host and every runner must match).",
    s.vxlan_id,
)

OVERLAY_VXLAN_PORT = Setting(
    "OVERLAY_VXLAN_PORT", int, 4789, "VXLAN UDP port (the host and every runner must match).", s.port
)

OVERLAY_MTU = Setting(
    "OVERLAY_MTU",
    int,
    1450,
    "Overlay MTU, 50 bytes of VXLAN overhead below 1500 (the host and every runner must match).",
    s.mtu,
)

OVERLAY_MODE = Setting(
    "OVERLAY_MODE",
    OverlayMode,
    OverlayMode.HUB,
    '"hub": all overlay traffic goes through the host; "mesh": runners reach each other directly and the '
    "host only distributes the list of peers (the host and every runner must match).",
)


def overlay_section(after_subnet: tuple[Setting, ...] = ()) -> Section:
    """The "Overlay network" section, with one side's own ``after_subnet`` settings after OVERLAY_SUBNET."""
    return Section(
        "Overlay network",
        [
            OVERLAY_ENABLED,
            OVERLAY_SUBNET,
            *after_subnet,
            OVERLAY_VXLAN_ID,
            OVERLAY_VXLAN_PORT,
            OVERLAY_MTU,
            OVERLAY_MODE,
        ],
    )


# -- Logging ------------------------------------------------------------------------------------------------

LOG_LEVEL = Setting(
    "LOG_LEVEL", LogLevel, LogLevel.INFO, "Logging verbosity: full, debug, info, warning or error."
)

LOGGING_SECTION = Section("Logging", [LOG_LEVEL])
