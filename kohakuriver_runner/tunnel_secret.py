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
    # Written whole to a private temporary name, then linked into place: a concurrent reader never sees
    # a partial key, and of two runners racing on one state directory the first link wins for both.
    tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(KEY_SIZE))
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
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
