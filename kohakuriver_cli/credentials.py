"""The CLI's credentials file: ``{"host": URL, "token": TOKEN}``, mode 0600.

``kr host``/``kr up`` write it for the first admin; ``kr login`` writes it for anyone else. It is written
atomically (temp file + rename) so a crash never leaves a half-written token behind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from kohakuriver_net.paths import credentials_path


class Credentials(NamedTuple):
    """(A NamedTuple rather than attrs: every ``kr`` that talks to a host reads this file first.)"""

    host: str | None = None
    token: str | None = None


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
    data = (json.dumps(creds._asdict()) + "\n").encode("utf-8")
    write_file_atomic(path, data, parent_mode=0o700)
    return path
