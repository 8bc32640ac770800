"""A thin synchronous REST client for the host API, with the error mapping every command shares.

The requests travel over ``http_transport`` (a small HTTP/1.1 client on a socket: importing httpx, or even
``http.client``, would cost a large part of a whole ``kr task list``); tests hand in an httpx transport
instead. Every failure becomes a
``click.ClickException`` subclass carrying a one-line message and an exit code, so commands never print a
traceback: 2 for a usage problem, 3 for "not found", 4 for "not allowed" (or not
authenticated), 5 when the host cannot be reached, 1 for anything else.
"""

from __future__ import annotations

import re
from typing import Any

import click

# Re-exported: commands and tests know them as the client's.
from .host_settings import DEFAULT_HOST_URL as DEFAULT_HOST_URL
from .host_settings import Settings
from .host_settings import normalize_host_url as normalize_host_url
from .host_settings import resolve_settings as resolve_settings
from .http_transport import (
    HttpxTransport,
    Reply,
    StdlibTransport,
    TransportError,
    TransportTimeout,
    TransportUnreachable,
    json_body,
    target,
)

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_FORBIDDEN = 4
EXIT_UNREACHABLE = 5

_LINE_BREAKS = re.compile(r"[\r\n\u2028\u2029]+")


def one_line(text: str, limit: int = 500) -> str:
    """``text`` on one line (errors are one line on stderr, whatever the server or an exception said)."""
    text = _LINE_BREAKS.sub(" ", text).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


class CliError(click.ClickException):
    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(one_line(message))
        self.exit_code = exit_code


class ApiError(CliError):
    """The host answered with an error status."""

    def __init__(self, status: int, error: str, message: str) -> None:
        code = {401: EXIT_FORBIDDEN, 403: EXIT_FORBIDDEN, 404: EXIT_NOT_FOUND}.get(status, EXIT_ERROR)
        super().__init__(f"{message} (HTTP {status})", code)
        self.status = status
        self.error = error


class HostClient:
    """REST calls to one host. ``transport``: an httpx transport for tests (``httpx.MockTransport``); None
    sends over the network (``http_transport.StdlibTransport``)."""

    def __init__(self, settings: Settings, timeout: float = 30.0, transport: Any = None) -> None:
        self.settings = settings
        if not settings.host_url.lower().startswith(("http://", "https://")):
            raise CliError(f"invalid host URL {settings.host_url!r}: use http:// or https://", EXIT_USAGE)
        self._headers = {"Authorization": f"Bearer {settings.token}"} if settings.token else {}
        try:
            if transport is None:
                self._wire: Any = StdlibTransport(settings.host_url, timeout)
            else:
                self._wire = HttpxTransport(settings.host_url, timeout, transport)
        except ValueError as exc:
            raise CliError(f"invalid host URL {settings.host_url!r}: {exc}", EXIT_USAGE) from None

    def close(self) -> None:
        self._wire.close()

    def __enter__(self) -> HostClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self, method: str, path: str, *, params: dict[str, str] | None = None, json: Any = None
    ) -> Reply:
        host = self.settings.host_url
        headers = dict(self._headers)
        body = None
        if json is not None:
            body = json_body(json)
            headers["Content-Type"] = "application/json"
        if params:
            path = target("", path, {k: str(v) for k, v in params.items()})
        try:
            response = self._wire.send(method, path, headers, body)
        except TransportTimeout:
            raise CliError(f"the host at {host} did not answer in time", EXIT_UNREACHABLE) from None
        except TransportUnreachable as exc:
            raise CliError(f"cannot reach the host at {host}: {exc}", EXIT_UNREACHABLE) from None
        except TransportError as exc:
            raise CliError(f"request to {host} failed: {exc}") from None
        if response.status_code >= 400:
            raise self._error(response)
        return response

    def _error(self, response: Reply) -> ApiError:
        error = _api_error(response)
        if response.status_code == 401 and not self.settings.token:
            error = ApiError(
                401,
                error.error,
                f"not logged in to {self.settings.host_url}: "
                "run `kr login --token TOKEN` or set KOHAKURIVER_TOKEN",
            )
        return error

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.request(method, path, **kwargs)
        if not response.content.strip():
            return None
        try:
            return response.json()
        except ValueError:
            raise CliError(
                f"the host answered {method} {path} with something that is not JSON "
                f"({response.headers.get('content-type', 'no content type')})"
            ) from None

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.json("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.json("POST", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> Any:
        return self.json("DELETE", path, **kwargs)

    def text(self, path: str, **kwargs: Any) -> str:
        return self.request("GET", path, **kwargs).text

    def content(self, path: str, **kwargs: Any) -> bytes:
        return self.request("GET", path, **kwargs).content


def _api_error(response: Reply) -> ApiError:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        message = body["message"]
        field = body.get("field")
        if isinstance(field, str) and field and field not in message:
            message = f"{field}: {message}"
        return ApiError(response.status_code, str(body.get("error", "error")), message)
    text = response.text.strip().splitlines()[0] if response.text.strip() else response.reason_phrase
    return ApiError(response.status_code, "error", text[:300])
