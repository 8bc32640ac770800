"""The host's settings as the rest of the host sees them: a static type for ``HostConfig``.

``HOST_SCHEMA`` generates the config class at import time (``kohakuriver_proto.settings``), so a type checker
cannot name it. ``HostSettings`` lists what the host's modules read, setting by setting and derived value by
derived value, with the schema's types: ``HostContext.config`` and the daemon's functions take it, and a
misspelt or unknown setting is a type error instead of an ``AttributeError`` on a rarely taken path.
``tests/unit/test_host_settings.py`` checks that the generated class provides every member with that type.
Add a member here when a module starts reading a new setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class HostSettings(Protocol):
    # network (settings keep their UPPER_CASE names)
    @property
    def HOST_BIND_IP(self) -> str: ...
    @property
    def HOST_PORT(self) -> int: ...
    @property
    def HOST_SSH_PROXY_PORT(self) -> int: ...
    @property
    def HOST_REACHABLE_ADDRESS(self) -> str: ...
    @property
    def TLS_CERT_FILE(self) -> str: ...
    @property
    def TLS_KEY_FILE(self) -> str: ...

    # auth
    @property
    def CLUSTER_TOKEN(self) -> str: ...
    @property
    def ADMIN_SECRET(self) -> str: ...

    # timing and proxy limits
    @property
    def HEARTBEAT_INTERVAL_SECONDS(self) -> int: ...
    @property
    def CLEANUP_CHECK_INTERVAL_SECONDS(self) -> int: ...
    @property
    def SSH_PROXY_HANDSHAKE_TIMEOUT_SECONDS(self) -> float: ...
    @property
    def SSH_PROXY_MAX_PENDING_HANDSHAKES(self) -> int: ...
    @property
    def FORWARD_CONNECT_TIMEOUT_SECONDS(self) -> float: ...

    # task containers
    @property
    def TASKS_PRIVILEGED(self) -> bool: ...
    @property
    def ADDITIONAL_MOUNTS(self) -> tuple[str, ...]: ...  # a list setting, frozen as a tuple

    # derived values (``config.HostConfigBase``)
    @property
    def db_path(self) -> Path: ...
    @property
    def cluster_token_file(self) -> Path: ...
    @property
    def credentials_file(self) -> Path: ...
    @property
    def heartbeat_timeout_seconds(self) -> float: ...
    @property
    def tls_enabled(self) -> bool: ...
