"""Which host and token a ``kr`` command uses, without click: shared by the CLI (``client.py``) and the fast
paths of ``entry.py`` that start before click is imported (``ssh_fast``)."""

from __future__ import annotations

DEFAULT_HOST_URL = "http://127.0.0.1:8000"


class Settings:
    """What the global options resolved to. (A plain class: attrs would add 30 ms to every ``kr``.)"""

    __slots__ = ("host_url", "json_output", "token")

    def __init__(self, host_url: str, token: str | None, json_output: bool = False) -> None:
        self.host_url = host_url
        self.token = token
        self.json_output = json_output

    def __repr__(self) -> str:
        token = "***" if self.token else None
        return f"Settings(host_url={self.host_url!r}, token={token}, json_output={self.json_output})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Settings):
            return NotImplemented
        mine = (self.host_url, self.token, self.json_output)
        return mine == (other.host_url, other.token, other.json_output)


def normalize_host_url(host: str) -> str:
    """``host:port`` -> ``http://host:port``; no trailing slash."""
    host = host.strip()
    if "://" not in host:
        host = f"http://{host}"
    return host.rstrip("/")


def resolve_settings(host_option: str | None, token_option: str | None, json_output: bool) -> Settings:
    """Host: ``--host``/``KOHAKURIVER_HOST``, else the credentials file, else the local default.
    Token: ``--token``/``KOHAKURIVER_TOKEN``, else the credentials file's token, but only when the host is the
    one that file was written for: a token is never sent to another host just because ``--host`` named it."""
    from .credentials import load_credentials  # not at import time: `kr --help` reads no file

    if host_option and token_option:
        # Both given (flags or KOHAKURIVER_HOST/TOKEN, as `kr ssh` passes them to its ProxyCommand): the file
        # can change neither, so it is not read at all.
        return Settings(normalize_host_url(host_option), token_option, json_output)
    creds = load_credentials()
    cred_host = normalize_host_url(creds.host) if creds.host else None
    host = normalize_host_url(host_option) if host_option else (cred_host or DEFAULT_HOST_URL)
    token = token_option
    if not token and creds.token and (cred_host is None or cred_host == host):
        token = creds.token
    return Settings(host, token or None, json_output)
