"""KohakuRiver's own known_hosts file: every VPS's SSH host key, pinned before the first connection.

Each VPS has an Ed25519 host key that its runner makes once and keeps across stops and re-creations; the
host hands its public half to the VPS's owner (``GET /api/vps/{id}/host-key``). ``kr ssh``, ``kr vps connect``
and ``kr ssh config`` write it here under the VPS's alias (``kohakuriver-<id>``, the ``HostKeyAlias`` ssh is
given), so the very first connection is verified without a prompt: scripts and CI work, and a key that later
changes is refused by ssh itself, loudly. The file is separate from ``~/.ssh/known_hosts`` so that pinning
never edits a file the user curates, and is given to ssh with ``UserKnownHostsFile``.

A key already pinned for an alias is never replaced here: a different key from the host is exactly the case
ssh must refuse (``kr ssh`` says which file to edit if the change was expected).
"""

from __future__ import annotations

from pathlib import Path

from kohakuriver_net.atomic_file import write_file_atomic
from kohakuriver_net.paths import kohakuriver_home

__all__ = ["KNOWN_HOSTS_NAME", "known_hosts_path", "pin", "pinned_key", "ssh_options"]

KNOWN_HOSTS_NAME = "known_hosts"


def known_hosts_path() -> Path:
    return kohakuriver_home() / KNOWN_HOSTS_NAME


def _entries(path: Path) -> list[tuple[str, str]]:
    """``(alias, "type base64")`` of each plain entry; comments, hashed and malformed lines are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    found = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3 and not fields[0].startswith(("#", "|", "@")):
            found += [(name, f"{fields[1]} {fields[2]}") for name in fields[0].split(",")]
    return found


def pinned_key(alias: str, path: Path | None = None) -> str | None:
    """The key pinned for ``alias`` (``"ssh-ed25519 AAAA..."``), or None."""
    for name, key in _entries(path or known_hosts_path()):
        if name == alias:
            return key
    return None


def pin(alias: str, key: str, path: Path | None = None) -> bool:
    """Pin ``key`` for ``alias``; True when it is (now or already) the pinned key, False when another key is
    pinned for it (left as it is: ssh will refuse the connection and say so). Blocking."""
    path = path or known_hosts_path()
    key = " ".join(key.split()[:2])
    current = pinned_key(alias, path)
    if current is not None:
        return current == key
    try:
        old = path.read_bytes()
    except FileNotFoundError:
        old = b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    write_file_atomic(path, old + f"{alias} {key}\n".encode("ascii"), mode=0o644, parent_mode=0o700)
    return True


def ssh_options(alias: str, path: Path | None = None) -> list[str]:
    """The ``-o`` values that make ssh check the VPS against its pinned key and nothing else."""
    return [
        f"UserKnownHostsFile={path or known_hosts_path()}",
        f"HostKeyAlias={alias}",
        "StrictHostKeyChecking=yes",
    ]
