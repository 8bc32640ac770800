"""The CLI's credentials file: ``{"host": URL, "token": TOKEN}``, mode 0600.

``kr host``/``kr up`` write it for the first admin; ``kr login`` writes it for anyone else. It is written
atomically (temp file + rename) so a crash never leaves a half-written token behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import attrs

from .paths import credentials_path


@attrs.frozen
class Credentials:
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
    path = path or credentials_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(attrs.asdict(creds), f)
            f.write("\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
