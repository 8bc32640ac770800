"""The host's settings (``~/.kohakuriver/host_config.py``) and the ``HostConfig`` object.

The original host's settings keep their names and defaults, with two deliberate changes: authentication is
always on (DESIGN section 9), so ``AUTH_ENABLED`` defaults to True and rejects False; and the original's
unused ``INVITATION_EXPIRE_HOURS`` is gone. Added: ``CLUSTER_TOKEN``, ``CREDENTIALS_FILE``,
``TLS_CERT_FILE``/``TLS_KEY_FILE`` and the SSH-proxy and port-forward limits.

Derived values are lower-case attributes of ``HostConfig`` (``config.container_dir``,
``config.cluster_token_file``, ...).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from kohakuriver_net import paths
from kohakuriver_proto import settings as s
from kohakuriver_proto import shared_settings as ss
from kohakuriver_proto.settings import CrossCheck, Section, Setting

from .host_settings import HostSettings


def _auth_always_on(value: bool) -> None:
    if not value:
        raise ValueError(
            "authentication cannot be turned off in this version: every endpoint needs an API token "
            "(`kr host` writes the first admin token to CREDENTIALS_FILE); remove this line"
        )


_ENV_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*")


def _env_name(value: str) -> None:
    # Environments become image names (kohakuriver/<name>:base), and Docker repository names are lower case.
    if not _ENV_NAME.fullmatch(value) or len(value) > 128:
        raise ValueError(
            f"must be lower-case letters, digits, '_', '.' or '-' (an image name), got {value!r}"
        )


_NETWORK = Section(
    "Network",
    [
        Setting(
            "HOST_BIND_IP",
            str,
            "0.0.0.0",
            "IP address the API and the SSH proxy bind to (0.0.0.0 = all).",
            s.ip_address,
        ),
        Setting("HOST_PORT", int, 8000, "API, WebSocket and dashboard port.", s.port),
        Setting("HOST_SSH_PROXY_PORT", int, 8002, "SSH proxy port.", s.port),
        Setting(
            "HOST_REACHABLE_ADDRESS",
            str,
            "127.0.0.1",
            "Address runners and clients use to reach this host; with the overlay on it is also the VXLAN "
            "local address, so it must then be an IP address.",
            s.reachable_address,
        ),
        *ss.tls_settings("API and WebSockets"),
    ],
)

_PATHS = Section(
    "Paths",
    [
        Setting(
            "SHARED_DIR",
            str,
            "/mnt/cluster-share",
            "Shared storage path (the same path on every node); needed for tarball-based environments.",
            s.absolute_path,
        ),
        Setting(
            "DB_FILE",
            str,
            "/var/lib/kohakuriver/kohakuriver.db",
            "SQLite database of the cluster state.",
            s.non_empty,
        ),
        Setting(
            "CONTAINER_DIR",
            str,
            "",
            'Environment tarball directory ("" = SHARED_DIR/kohakuriver-containers).',
            s.optional(s.absolute_path),
        ),
        Setting("HOST_LOG_FILE", str, "", 'Log file path ("" = console only).'),
        Setting(
            "CREDENTIALS_FILE",
            str,
            "",
            'Where the first admin token is written, mode 0600 ("" = ~/.kohakuriver/credentials.json of '
            "the user running the host, where `kr` looks for it).",
        ),
    ],
)

_AUTH = Section(
    "Authentication",
    [
        Setting(
            "AUTH_ENABLED",
            bool,
            True,
            "Always True: every endpoint needs an API token. Kept so configuration files of the original "
            "project that set it to True still load; False is rejected.",
            _auth_always_on,
        ),
        Setting(
            "CLUSTER_TOKEN",
            str,
            "",
            'Secret runners join with (their CLUSTER_TOKEN must be equal). "" = generated on first start '
            "and stored next to DB_FILE.",
            s.optional(s.token),
            secret=True,
        ),
        Setting(
            "ADMIN_SECRET",
            str,
            "",
            'A secret that grants admin rights when presented instead of a token ("" = disabled). At least '
            "16 characters; prefer per-user tokens.",
            s.optional(s.token),
            secret=True,
        ),
        Setting(
            "ADMIN_REGISTER_SECRET",
            str,
            "",
            'A secret that lets a new account register as admin ("" = disabled). At least 16 characters.',
            s.optional(s.token),
            secret=True,
        ),
        Setting(
            "SESSION_EXPIRE_HOURS", int, 720, "Lifetime of a login session, in hours (30 days).", s.positive
        ),
    ],
)

_TIMING = Section(
    "Timing",
    [
        Setting(
            "HEARTBEAT_INTERVAL_SECONDS",
            int,
            5,
            "Expected heartbeat interval of the runners, in seconds.",
            s.positive,
        ),
        Setting(
            "HEARTBEAT_TIMEOUT_FACTOR",
            int,
            6,
            "A node is offline after this many missed heartbeat intervals (5 x 6 = 30 s).",
            s.positive,
        ),
        Setting(
            "CLEANUP_CHECK_INTERVAL_SECONDS",
            int,
            10,
            "How often offline nodes are looked for, in seconds.",
            s.positive,
        ),
    ],
)

_PROXY = Section(
    "SSH proxy and port forwarding",
    [
        Setting(
            "SSH_PROXY_HANDSHAKE_TIMEOUT_SECONDS",
            float,
            10.0,
            "A client must complete the REQUEST_TUNNEL handshake within this time, in seconds.",
            s.positive,
        ),
        Setting(
            "SSH_PROXY_MAX_PENDING_HANDSHAKES",
            int,
            64,
            "Connections allowed to be in the handshake at once; more are refused.",
            s.positive,
        ),
        Setting(
            "FORWARD_CONNECT_TIMEOUT_SECONDS",
            float,
            10.0,
            "Time allowed to reach the runner (and the container) for a port-forward or SSH session, in "
            "seconds.",
            s.positive,
        ),
    ],
)

_ENVIRONMENTS = Section(
    "Environments and tasks",
    [
        Setting(
            "DEFAULT_CONTAINER_NAME",
            str,
            "kohakuriver-base",
            "Default environment of tasks that name none; created at start-up if missing.",
            _env_name,
        ),
        Setting(
            "INITIAL_BASE_IMAGE",
            str,
            "python:3.12-alpine",
            "Image the default environment is created from.",
            s.non_empty,
        ),
        ss.TASKS_PRIVILEGED,
        ss.ADDITIONAL_MOUNTS,
        ss.DEFAULT_WORKING_DIR,
        Setting(
            "ENV_CONTAINER_CPU_LIMIT",
            float,
            0.25,
            "Share of the host's CPUs an environment container may use while you edit it (0 < x <= 1).",
            s.fraction,
        ),
        Setting(
            "ENV_CONTAINER_MEM_LIMIT",
            float,
            0.25,
            "Share of the host's memory an environment container may use (0 < x <= 1).",
            s.fraction,
        ),
    ],
)

_OVERLAY = ss.overlay_section()

_LOGGING = ss.LOGGING_SECTION


def _overlay_needs_ip(values: Mapping[str, Any]) -> Iterable[tuple[str, str]]:
    if not values["OVERLAY_ENABLED"]:
        return
    try:
        ipaddress.IPv4Address(values["HOST_REACHABLE_ADDRESS"])
    except ValueError:
        yield (
            "HOST_REACHABLE_ADDRESS",
            (
                f"must be an IPv4 address when OVERLAY_ENABLED is True (it is the VXLAN local address), got "
                f"{values['HOST_REACHABLE_ADDRESS']!r}"
            ),
        )


_CROSS_CHECKS = [
    s.distinct_ports("HOST_PORT", "HOST_SSH_PROXY_PORT"),
    s.tls_pair("TLS_CERT_FILE", "TLS_KEY_FILE"),
    s.vxlan_ids_fit("OVERLAY_VXLAN_ID", "OVERLAY_SUBNET"),
    CrossCheck(("OVERLAY_ENABLED", "HOST_REACHABLE_ADDRESS"), _overlay_needs_ip),
]

CONTAINERS_SUBDIR = "kohakuriver-containers"
CLUSTER_TOKEN_FILENAME = "cluster_token"


class HostConfigBase(s.ConfigBase):
    """Derived values of the host configuration (the settings themselves are the UPPER_CASE attributes)."""

    __slots__ = ()

    @property
    def container_dir(self) -> Path:
        return Path(self.CONTAINER_DIR or os.path.join(self.SHARED_DIR, CONTAINERS_SUBDIR))

    @property
    def db_path(self) -> Path:
        return Path(self.DB_FILE).expanduser()

    @property
    def cluster_token_file(self) -> Path:
        """Where a generated cluster token is kept (next to the database, mode 0600)."""
        return self.db_path.parent / CLUSTER_TOKEN_FILENAME

    @property
    def credentials_file(self) -> Path:
        return Path(self.CREDENTIALS_FILE).expanduser() if self.CREDENTIALS_FILE else paths.credentials_path()

    @property
    def heartbeat_timeout_seconds(self) -> float:
        """A node is offline when it has not sent a heartbeat for this long."""
        return float(self.HEARTBEAT_INTERVAL_SECONDS * self.HEARTBEAT_TIMEOUT_FACTOR)

    @property
    def tls_enabled(self) -> bool:
        return bool(self.TLS_CERT_FILE)

    @property
    def public_url(self) -> str:
        """Base URL at which runners and clients reach the API, e.g. ``http://127.0.0.1:8000``."""
        scheme = "https" if self.tls_enabled else "http"
        address = self.HOST_REACHABLE_ADDRESS
        try:
            if ipaddress.ip_address(address).version == 6:
                address = f"[{address}]"
        except ValueError:
            pass
        return f"{scheme}://{address}:{self.HOST_PORT}"

    @property
    def log_file(self) -> Path | None:
        return Path(self.HOST_LOG_FILE).expanduser() if self.HOST_LOG_FILE else None

    @property
    def overlay_subnet(self) -> s.OverlaySubnet:
        return s.parse_overlay_subnet(self.OVERLAY_SUBNET)


HOST_SCHEMA = s.Schema(
    class_name="HostConfig",
    title="KohakuRiver host configuration",
    filename=paths.HOST_CONFIG_NAME,
    sections=[_NETWORK, _PATHS, _AUTH, _TIMING, _PROXY, _ENVIRONMENTS, _OVERLAY, _LOGGING],
    cross_checks=_CROSS_CHECKS,
    base=HostConfigBase,
    module=__name__,
    intro="Start the host with `kr host` (reads ~/.kohakuriver/host_config.py) or `kr host --config PATH`. "
    "This file may hold secrets: keep it mode 0600.",
)

#: The host's frozen config class; build one with ``load_host_config`` or ``host_config_from``.
HostConfig: Any = HOST_SCHEMA.config_class


def load_host_config(path: str | os.PathLike[str] | None = None) -> HostSettings:
    """Load the host configuration.

    ``path`` None: ``~/.kohakuriver/host_config.py`` (or ``$KOHAKURIVER_HOME/host_config.py``); a missing
    default file means every setting at its default. An explicit ``path`` that does not exist is an error.
    Raises ``SettingsError`` (one message listing every problem).
    """
    return paths.load_config(HOST_SCHEMA, path, paths.default_host_config_path())


def host_config_from(
    values: Mapping[str, Any] | Iterable[tuple[str, Any]] = (), **overrides: Any
) -> HostSettings:
    """A validated ``HostConfig`` from overrides of the defaults (for ``kr up`` and tests)."""
    return HOST_SCHEMA.build({**dict(values), **overrides}, source="host settings")
