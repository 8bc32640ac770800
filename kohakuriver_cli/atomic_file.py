"""Replace a file atomically: readers see the old content or the new, never a half-written file.

One helper for the CLI (``kr ssh config``'s private config) and the runner (its state records, VPS host
keys). It lives here because ``kohakuriver_proto`` stays free of I/O and the CLI must not import the
runner; the daemons already take small shared helpers from this package (``paths``, ``ws_speedups``).
Blocking: trio code calls it through ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

__all__ = ["write_file_atomic"]


def write_file_atomic(path: Path, data: bytes, *, mode: int = 0o600, sync_dir: bool = False) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    The temporary file is created with ``mode`` (0600 by default: a key or a private config is never
    readable by others, not even for a moment) and O_EXCL, so nothing already there, a link included, is
    written through. ``sync_dir`` also fsyncs the folder, so that the rename survives a power cut.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
