"""Replace a file atomically: readers see the old content or the new, never a half-written file.

The one writer of the project's small private files: the CLI's credentials and private keys, ``kr ssh
config``'s output, the host's first admin token and cluster token copy, the runner's task records, VPS host
keys and tunnel key. Before it existed there were five hand-written variants, one of which truncated a
predictable temporary name in place and one of which never fsynced.

Two steps, because the host needs them apart (``stage_file`` the admin token before the admin exists, so a
full disk never leaves an admin whose token nobody knows, then ``publish_file``); ``write_file_atomic`` is
both. Blocking: trio code calls these through ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

__all__ = ["publish_file", "stage_file", "write_file_atomic"]


def stage_file(path: Path, data: bytes, *, mode: int = 0o600, parent_mode: int | None = None) -> Path:
    """Write ``data`` to a fresh temporary file beside ``path``, fsynced, and return its path.

    The file is created with ``mode`` (0600 by default: a key or a token is never readable by others, not
    even for a moment) and O_EXCL | O_NOFOLLOW, so nothing already there, a link included, is written
    through. ``parent_mode``: create the folder with that mode when it is missing (else it must exist).
    """
    path = Path(path)
    if parent_mode is not None and not path.parent.exists():
        path.parent.mkdir(mode=parent_mode, parents=True, exist_ok=True)
        os.chmod(path.parent, parent_mode)  # mkdir's mode goes through the umask
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(tmp, flags, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def publish_file(tmp: Path, path: Path, *, exclusive: bool = False, sync_dir: bool = False) -> None:
    """Move a staged file into place.

    ``exclusive``: link instead of rename, so an existing ``path`` is never replaced (``FileExistsError``):
    of two writers racing for one key file, the first wins for both; the temporary name is gone afterwards
    either way. A failed rename leaves the staged file for the caller (the host logs where a token it could
    not move is). ``sync_dir`` also fsyncs the folder, so the new name survives a power cut.
    """
    if exclusive:
        try:
            os.link(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    else:
        os.replace(tmp, path)
    if sync_dir:
        with contextlib.suppress(OSError):  # some file systems cannot fsync a folder; the rename is done
            dir_fd = os.open(Path(path).parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)


def write_file_atomic(
    path: Path,
    data: bytes,
    *,
    mode: int = 0o600,
    sync_dir: bool = False,
    exclusive: bool = False,
    parent_mode: int | None = None,
) -> None:
    """``stage_file`` then ``publish_file``: ``path`` holds ``data`` whole, with ``mode``, or is unchanged."""
    tmp = stage_file(path, data, mode=mode, parent_mode=parent_mode)
    try:
        publish_file(tmp, Path(path), exclusive=exclusive, sync_dir=sync_dir)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
