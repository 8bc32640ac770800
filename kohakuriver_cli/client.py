"""A thin synchronous REST client for the host API (httpx), with the error mapping every command shares.

Every failure becomes a ``click.ClickException`` subclass carrying a one-line message and an exit code, so
commands never print a traceback: 2 for a usage problem, 3 for "not found", 4 for "not allowed", 5 when the
host cannot be reached, 1 for anything else.
"""

from __future__ import annotations

from typing import Any

import attrs
import click
import httpx

from .credentials import load_credentials

DEFAULT_HOST_URL = "http://127.0.0.1:8000"

EXIT_ERROR = 1
EXIT_NOT_FOUND = 3
EXIT_FORBIDDEN = 4
EXIT_UNREACHABLE = 5


class CliError(click.ClickException):
    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ApiError(CliError):
    """The host answered with an error status."""

    def __init__(self, status: int, error: str, message: str) -> None:
        code = {401: EXIT_FORBIDDEN, 403: EXIT_FORBIDDEN, 404: EXIT_NOT_FOUND}.get(status, EXIT_ERROR)
        super().__init__(f"{message} (HTTP {status})", code)
        self.status = status
        self.error = error


@attrs.define
class Settings:
    """What the global options resolved to."""

    host_url: str
    token: str | None
    json_output: bool = False


def resolve_settings(host_option: str | None, token_option: str | None, json_output: bool) -> Settings:
    creds = load_credentials()
    host = host_option or creds.host or DEFAULT_HOST_URL
    if "://" not in host:
        host = f"http://{host}"
    return Settings(host.rstrip("/"), token_option or creds.token, json_output)


class HostClient:
    def __init__(self, settings: Settings, timeout: float = 30.0) -> None:
        self.settings = settings
        headers = {"Authorization": f"Bearer {settings.token}"} if settings.token else {}
        self._http = httpx.Client(base_url=settings.host_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> HostClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise CliError(
                f"the host at {self.settings.host_url} did not answer in time", EXIT_UNREACHABLE
            ) from None
        except httpx.TransportError as exc:
            raise CliError(
                f"cannot reach the host at {self.settings.host_url}: {exc}", EXIT_UNREACHABLE
            ) from None
        if response.status_code >= 400:
            raise _api_error(response)
        return response

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs).json()

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs).json()

    def delete(self, path: str, **kwargs: Any) -> Any:
        return self.request("DELETE", path, **kwargs).json()

    def text(self, path: str, **kwargs: Any) -> str:
        return self.request("GET", path, **kwargs).text


def _api_error(response: httpx.Response) -> ApiError:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return ApiError(response.status_code, str(body.get("error", "error")), body["message"])
    text = response.text.strip().splitlines()[0] if response.text.strip() else response.reason_phrase
    return ApiError(response.status_code, "error", text[:300])
