"""Per-container tunnel secrets: HMAC-SHA256(runner key, container name), hex.

The runner keeps one random key in ``<state_dir>/tunnel.key`` (32 bytes, mode 0600, made on first start).
A container's secret is derived from its name, so nothing per container is stored: a restarted runner that
re-adopts its containers knows their secrets again, and a container cannot guess another one's secret from
its own. The secret reaches the container as ``KOHAKURIVER_TUNNEL_TOKEN`` and comes back as the tunnel
client's ``Authorization: Bearer`` header.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from kohakuriver_net.atomic_file import write_file_atomic

__all__ = [
    "KEY_FILE",
    "KEY_SIZE",
    "TunnelKeyError",
    "container_secret",
    "load_or_create_key",
    "secret_matches",
]

KEY_FILE = "tunnel.key"
KEY_SIZE = 32


class TunnelKeyError(Exception):
    """The key file exists but is not a key (wrong size): refusing beats silently changing every secret."""


def load_or_create_key(state_dir: str | os.PathLike[str]) -> bytes:
    """Read ``<state_dir>/tunnel.key``, creating it first if missing. Blocking: call from a thread."""
    path = Path(state_dir) / KEY_FILE
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    # Linked into place, never renamed: of two runners racing on one state directory the first key wins
    # for both, and a concurrent reader never sees a partial key.
    with contextlib.suppress(FileExistsError):
        write_file_atomic(path, secrets.token_bytes(KEY_SIZE), exclusive=True)
    return _read(path)


def _read(path: Path) -> bytes:
    key = path.read_bytes()
    if len(key) != KEY_SIZE:
        raise TunnelKeyError(f"{path} holds {len(key)} bytes, not a {KEY_SIZE}-byte tunnel key")
    return key


def container_secret(key: bytes, container: str) -> str:
    """The secret of the container named ``container`` (64 hex digits)."""
    return hmac.new(key, container.encode("utf-8"), hashlib.sha256).hexdigest()


def secret_matches(key: bytes, container: str, given: str) -> bool:
    """Whether ``given`` is ``container``'s secret (constant-time comparison)."""
    expected = container_secret(key, container).encode("ascii")
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected)
