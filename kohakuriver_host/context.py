"""What every part of the running host shares: the config, the store, the runner client, the scheduler's
wake-up call, the task id generator. One ``HostContext`` per ``serve_host`` run, built in ``daemon.py``.

Times: the host stores float epoch seconds for its own bookkeeping (``dispatched_at``, node heartbeats) and
ISO-8601 UTC strings (the converter's format) in task records, which the API returns as they are.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from importlib import metadata
from typing import TYPE_CHECKING

import attrs

from kohakuriver_proto.snowflake import SnowflakeGenerator

from .auth import Principal, hash_token
from .host_settings import HostSettings
from .local_runner import LocalRunner
from .node_registry import NodeRegistry
from .runner_client import RunnerClient
from .store import Store
from .timefmt import iso

if TYPE_CHECKING:  # node_service and overlay_service import this module
    from .node_service import HeartbeatBatcher
    from .overlay_service import OverlayService

__all__ = ["HostContext", "TokenCache", "iso", "package_version"]


def package_version() -> str:
    try:
        return metadata.version("kohakuriver")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


class TokenCache:
    """Recently authenticated API tokens, so that a client sending many requests does not cost a database
    read (a thread hop) for each. Entries live ``ttl`` seconds; revoking a token through the API drops the
    cache at once (``clear``), so a revoked token stops working immediately on this host. Keys are token
    hashes: the cache holds no usable secret."""

    def __init__(self, ttl: float = 5.0, max_entries: int = 10_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[str, tuple[Principal, float]] = {}

    def get(self, token: str, now: float) -> Principal | None:
        key = hash_token(token)
        found = self._entries.get(key)
        if found is None:
            return None
        if found[1] <= now:
            del self._entries[key]
            return None
        return found[0]

    def put(self, token: str, principal: Principal, now: float) -> None:
        if len(self._entries) >= self.max_entries:
            self._entries.clear()  # a crude bound: refilling costs one read per active token
        self._entries[hash_token(token)] = (principal, now + self.ttl)

    def clear(self) -> None:
        self._entries.clear()


@attrs.define
class HostContext:
    config: HostSettings
    store: Store
    cluster_token: str
    runners: RunnerClient
    ids: SnowflakeGenerator
    #: Ask the scheduling loop for a pass soon (cheap, never blocks; many calls coalesce into one pass).
    wake_scheduler: Callable[[], None]
    #: The nodes in memory (write-through copy of the store's table, for the hot paths).
    nodes: NodeRegistry = attrs.field(factory=NodeRegistry)
    tokens: TokenCache = attrs.field(factory=TokenCache)
    #: Group commit of heartbeats (``node_service.HeartbeatBatcher``), set by the daemon once it runs.
    heartbeats: HeartbeatBatcher | None = None
    #: When this host process started serving (epoch seconds): liveness gives nodes a grace period after it.
    started_at: float = attrs.field(factory=time.time)
    version: str = attrs.field(factory=package_version)
    #: Where the SSH proxy listens, once it does (announced by ``/api/health`` so ``kr ssh`` finds it).
    ssh_proxy_port: int | None = None
    #: The runner in this same process (``kr up``), once it serves: forward sessions to it skip the socket.
    local_runner: LocalRunner | None = None
    #: The overlay network (``overlay_service``), set by the daemon; None: off, with no service at all.
    overlay: OverlayService | None = None
    clock: Callable[[], float] = time.time

    def now(self) -> float:
        return self.clock()

    def new_task_id(self) -> int:
        return self.ids.next_id(int(self.clock() * 1000))
