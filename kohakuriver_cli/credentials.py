"""The CLI's credentials file: ``{"host": URL, "token": TOKEN}``, mode 0600.

``kr host``/``kr up`` write it for the first admin; ``kr login`` writes it for anyone else. It is written
atomically (temp file + rename) so a crash never leaves a half-written token behind.
"""

from __future__ import annotations

import json
from pathlib import Path

from kohakuriver_net.paths import credentials_path


class Credentials:
    """Host URL and token. A plain class, not attrs or a NamedTuple: every ``kr`` that talks to a host reads
    this file first, and ``typing`` alone costs a few milliseconds of that start."""

    __slots__ = ("host", "token")

    def __init__(self, host: str | None = None, token: str | None = None) -> None:
        self.host = host
        self.token = token

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Credentials):
            return NotImplemented
        return (self.host, self.token) == (other.host, other.token)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:  # never the token itself
        return f"Credentials(host={self.host!r}, token={'<set>' if self.token else None})"


def load_credentials(path: Path | None = None) -> Credentials:
    path = path or credentials_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        return Credentials()
    except (OSError, ValueError):
        return Credentials()
    if not isinstance(data, dict):
        return Credentials()
    host, token = data.get("host"), data.get("token")
    return Credentials(host if isinstance(host, str) else None, token if isinstance(token, str) else None)


def save_credentials(creds: Credentials, path: Path | None = None) -> Path:
    from kohakuriver_net.atomic_file import write_file_atomic

    path = path or credentials_path()
    data = (json.dumps({"host": creds.host, "token": creds.token}) + "\n").encode("utf-8")
    write_file_atomic(path, data, parent_mode=0o700)
    return path
