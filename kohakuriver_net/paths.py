"""Where KohakuRiver keeps per-user files: ``~/.kohakuriver`` (or ``$KOHAKURIVER_HOME``).

- ``host_config.py`` / ``runner_config.py``: the daemons' default configuration files.
- ``credentials.json``: the CLI's API token (mode 0600); ``kr host`` / ``kr up`` write the first admin token
  here so the local path needs no login.

``KOHAKURIVER_HOME`` relocates the whole directory (tests, several clusters on one account). The functions
read the environment at call time, so a test can set it with ``monkeypatch.setenv``.

Every ``kr`` command that talks to a host imports this module (for the credentials file), so it imports no
more than ``os`` and ``pathlib`` at load: the settings machinery (20-45 ms of imports) is loaded by the two
functions that read a config file.
"""

from __future__ import annotations

import os
from pathlib import Path

#: ``typing.TYPE_CHECKING`` without importing ``typing`` (~5 ms, on every ``kr`` that reads credentials);
#: type checkers treat any ``TYPE_CHECKING`` name as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from kohakuriver_proto.settings import Schema

HOME_ENV = "KOHAKURIVER_HOME"
HOST_CONFIG_NAME = "host_config.py"
RUNNER_CONFIG_NAME = "runner_config.py"
CREDENTIALS_NAME = "credentials.json"


def kohakuriver_home() -> Path:
    """The per-user directory: ``$KOHAKURIVER_HOME`` if set and non-empty, else ``~/.kohakuriver``."""
    override = os.environ.get(HOME_ENV, "")
    if override:
        return Path(override).expanduser()
    return Path.home() / ".kohakuriver"


def default_host_config_path() -> Path:
    return kohakuriver_home() / HOST_CONFIG_NAME


def default_runner_config_path() -> Path:
    return kohakuriver_home() / RUNNER_CONFIG_NAME


def credentials_path() -> Path:
    """The CLI's credentials file (the host's ``CREDENTIALS_FILE`` defaults to it)."""
    return kohakuriver_home() / CREDENTIALS_NAME


def read_config_file(explicit: str | os.PathLike[str] | None, default: Path) -> tuple[str, str] | None:
    """``(source_text, filename)`` of the config file to load, or None when the default file is absent.

    An ``explicit`` path (from ``--config``) must exist; a missing default file means "all defaults".
    Unreadable files raise ``SettingsError`` naming the file.
    """
    from kohakuriver_proto.settings import SettingsError, SettingsProblem

    if explicit is not None:
        path = Path(explicit).expanduser()
    else:
        path = default
        if not path.exists():
            return None
    filename = str(path)
    try:
        return path.read_text(encoding="utf-8"), filename
    except FileNotFoundError:
        problem = "config file not found"
    except IsADirectoryError:
        problem = "is a directory, not a config file"
    except UnicodeDecodeError as exc:
        problem = f"not UTF-8 text ({exc.reason} at byte {exc.start})"
    except OSError as exc:
        problem = f"cannot read the config file: {exc.strerror or exc}"
    raise SettingsError([SettingsProblem(None, problem)], filename)


def load_config(schema: Schema, explicit: str | os.PathLike[str] | None, default: Path) -> Any:
    """The config of ``schema`` from ``explicit`` (must exist) or ``default`` (absent: all defaults)."""
    from kohakuriver_proto.settings import load_settings

    found = read_config_file(explicit, default)
    if found is None:
        return schema.defaults()
    text, filename = found
    return load_settings(schema, text, filename)
