"""KohakuRiver's own known_hosts file: every VPS's SSH host key, pinned before the first connection.

Each VPS has an Ed25519 host key that its runner makes once and keeps across stops and re-creations; the
host hands its public half to the VPS's owner (``GET /api/vps/{id}/host-key``). ``kr ssh``, ``kr vps connect``
and ``kr ssh config`` write it here under the VPS's alias (``kohakuriver-<id>``, the ``HostKeyAlias`` ssh is
given), so the very first connection is verified without a prompt: scripts and CI work, and a key that later
changes is refused by ssh itself, loudly. The file is separate from ``~/.ssh/known_hosts`` so that pinning
never edits a file the user curates, and is given to ssh with ``UserKnownHostsFile``.

A key already pinned for an alias is never replaced here: a different key from the host is exactly the case
ssh must refuse (``kr ssh`` says which file to edit if the change was expected).

``host_key_options`` is the one policy both ``kr ssh`` paths (the click command and ``ssh_fast``) follow:

- pinned already: the strict options, and no request at all (the file is read first);
- not pinned: fetch the key (one request, through the caller's ``fetch``), pin it, the strict options;
- the key cannot be had (a host without the route answers 404, a VPS never started 409, its node offline
  503, the host unreachable): one warning line, and ssh checks the VPS as it checks any host (the user's
  known_hosts, a prompt on a terminal). Never ``StrictHostKeyChecking=no``.

This module is loaded by ``kr ssh``'s fast path before anything else: it imports only ``re`` and ``pathlib``
at load time (the atomic writer only when it writes).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from kohakuriver_net.paths import kohakuriver_home

__all__ = [
    "KNOWN_HOSTS_NAME",
    "KeyUnavailable",
    "changed_key_hint",
    "host_key_options",
    "key_from_answer",
    "known_hosts_path",
    "pin",
    "pinned_key",
    "pinned_options",
    "ssh_options",
]

KNOWN_HOSTS_NAME = "known_hosts"
#: What a VPS host key from the host must look like before it is pinned (the host checks the same).
HOST_KEY_RE = re.compile(r"ssh-ed25519 [A-Za-z0-9+/]{68}")


class KeyUnavailable(Exception):
    """The VPS's host key could not be had from the host; the message says why (one line)."""


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
    from kohakuriver_net.atomic_file import write_file_atomic

    write_file_atomic(path, old + f"{alias} {key}\n".encode("ascii"), mode=0o644, parent_mode=0o700)
    return True


def ssh_file_value(path: Path) -> str:
    """``path`` as ssh reads a file name in an option or config line: ``%`` doubled (ssh expands ``%``
    tokens there), double-quoted when it has spaces (``UserKnownHostsFile`` takes a list of files).
    ``ValueError`` for what ssh cannot be given: a double quote, a line break, a NUL."""
    text = str(path)
    if any(c in text for c in '"\n\r\0'):
        raise ValueError(f"ssh cannot be given the file name {text[:80]!r}")
    text = text.replace("%", "%%")
    return f'"{text}"' if any(c.isspace() for c in text) else text


def ssh_options(alias: str, path: Path | None = None) -> list[str]:
    """The ``-o`` values that make ssh check the VPS against its pinned key and nothing else."""
    return [
        f"UserKnownHostsFile={ssh_file_value(path or known_hosts_path())}",
        f"HostKeyAlias={alias}",
        "StrictHostKeyChecking=yes",
    ]


def key_from_answer(body: object) -> str:
    """The key of a ``GET /api/vps/{id}/host-key`` answer; ``KeyUnavailable`` when it holds none."""
    key = body.get("host_key") if isinstance(body, dict) else None
    if not (isinstance(key, str) and HOST_KEY_RE.fullmatch(key)):
        raise KeyUnavailable("the host's answer holds no Ed25519 host key")
    return key


def pinned_options(alias: str) -> list[str] | None:
    """``ssh_options`` for ``alias`` when its key is pinned already (a file read, no request), else None."""
    path = known_hosts_path()
    if pinned_key(alias, path) is None:
        return None
    try:
        return ssh_options(alias, path)
    except ValueError:
        return None  # host_key_options says why


def host_key_options(
    task_id: int, alias: str, fetch: Callable[[], str], warn: Callable[[str], None]
) -> list[str] | None:
    """The ssh ``-o`` values that check VPS ``task_id`` against its pinned key (module docstring), pinning it
    first with ``fetch()`` (the key, or ``KeyUnavailable``) when it is not yet. None, after ``warn(line)``,
    when it cannot be pinned: ssh then checks the VPS as it checks any host (``HostKeyAlias`` alone)."""
    path = known_hosts_path()
    try:
        options = ssh_options(alias, path)
    except ValueError as exc:
        warn(f"kr ssh: cannot pin the host key of VPS {task_id}: {exc}")
        return None
    if pinned_key(alias, path) is not None:
        return options
    try:
        pin(alias, fetch(), path)
    except (KeyUnavailable, OSError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        warn(f"kr ssh: cannot pin the host key of VPS {task_id} ({reason}); ssh checks it the usual way")
        return None
    return options


def changed_key_hint(task_id: int, alias: str, fetch: Callable[[], str]) -> str | None:
    """After ssh failed (exit 255) with a pinned key: the line that says where that key is pinned, when the
    host now gives another key for the VPS (its node was re-created, or its key store lost). None when
    nothing is pinned, the key cannot be had, or it is the pinned one (ssh failed for another reason)."""
    path = known_hosts_path()
    pinned = pinned_key(alias, path)
    if pinned is None:
        return None
    try:
        current = fetch()
    except KeyUnavailable:
        return None
    if current == pinned:
        return None
    return (
        f"kr ssh: VPS {task_id}'s pinned host key ({alias} in {path}) is not the key the host gives now; "
        f"a re-created node may have made a new one: if you expect that, delete the {alias} line of that "
        "file and kr ssh pins the new key"
    )
