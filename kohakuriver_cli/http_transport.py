"""The REST client's HTTP/1.1 connection, from the standard library: what ``HostClient`` sends requests over.

Why not httpx here: importing httpx takes 120-180 ms on a small machine (it pulls in its own command line,
rich and pygments when they are installed), more than a whole ``kr task list`` may take. A CLI call makes a
handful of sequential requests to one host, which ``http.client`` does well: one keep-alive connection,
opened on first use.

- ``Reply``: what a request returned (status, headers, body), whatever carried it.
- ``StdlibTransport``: ``http.client`` over TCP or TLS. TLS trusts what httpx trusts (``tls_context``), so
  ``kr forward`` and ``kr connect`` (which use httpx's context) and REST calls agree about a host.
- ``HttpxTransport``: an httpx transport (``httpx.MockTransport`` in tests) behind the same interface, so the
  fakes of the unit tests keep working and exercise everything above the wire.

Failures are ``TransportError`` subclasses: ``TransportTimeout`` (no answer in time), ``TransportUnreachable``
(cannot connect, or the connection broke) and ``TransportFailed`` (anything else the wire did wrong);
``client.HostClient`` turns them into exit codes. Environment proxies (``HTTP_PROXY``) are not used: the host
is a machine of the lab, reached directly, as ``kr forward``'s WebSocket always has.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any
from urllib.parse import urlencode, urlsplit

#: A kept-alive connection idle longer than this is not trusted with a request that cannot be retried (the
#: host's server closes idle connections after 5 s; a POST must not race that close).
REUSE_FOR_POST = 2.0
_IDEMPOTENT = frozenset({"GET", "HEAD", "DELETE", "PUT", "OPTIONS"})
USER_AGENT = "kohakuriver-cli"


class TransportError(Exception):
    """The request did not get an answer."""


class TransportTimeout(TransportError):
    pass


class TransportUnreachable(TransportError):
    pass


class TransportFailed(TransportError):
    pass


class Reply:
    """An HTTP answer: ``status_code``, ``headers`` (lower-case names), ``content``; ``text``/``json()``
    decode it."""

    __slots__ = ("content", "headers", "reason_phrase", "status_code")

    def __init__(
        self, status_code: int, headers: dict[str, str], content: bytes, reason_phrase: str = ""
    ) -> None:
        self.status_code = status_code
        self.headers = headers
        self.content = content
        self.reason_phrase = reason_phrase

    @property
    def text(self) -> str:
        charset = "utf-8"
        for part in self.headers.get("content-type", "").split(";")[1:]:
            name, _, value = part.strip().partition("=")
            if name.lower() == "charset" and value:
                charset = value.strip('"')
        try:
            return self.content.decode(charset, "replace")
        except LookupError:
            return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)


def tls_context() -> Any:
    """An ``ssl.SSLContext`` with httpx's trust: ``SSL_CERT_FILE`` or ``SSL_CERT_DIR`` if set, else certifi's
    CA bundle."""
    import ssl

    if os.environ.get("SSL_CERT_FILE"):
        return ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
    if os.environ.get("SSL_CERT_DIR"):
        return ssl.create_default_context(capath=os.environ["SSL_CERT_DIR"])
    import certifi

    return ssl.create_default_context(cafile=certifi.where())


def check_base_url(base_url: str) -> None:
    """``ValueError`` for a URL this transport cannot talk to (scheme, host, port)."""
    parts = urlsplit(base_url)
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError("use http:// or https://")
    if not parts.hostname:
        raise ValueError("no host name")
    parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range


def target(base_url: str, path: str, params: dict[str, str] | None) -> str:
    """The request target: the base URL's path prefix, ``path``, and ``params`` as a query."""
    prefix = urlsplit(base_url).path.rstrip("/")
    query = urlencode(params) if params else ""
    if query:
        path = f"{path}{'&' if '?' in path else '?'}{query}"
    return prefix + path


def json_body(data: Any) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


class StdlibTransport:
    """One keep-alive ``http.client`` connection to ``base_url``'s host."""

    def __init__(self, base_url: str, timeout: float) -> None:
        check_base_url(base_url)
        self.base_url = base_url
        self.timeout = timeout
        self._conn: Any = None
        self._last_used = 0.0

    def _connect(self) -> Any:
        import http.client

        parts = urlsplit(self.base_url)
        if parts.scheme.lower() == "https":
            return http.client.HTTPSConnection(
                parts.hostname, parts.port, timeout=self.timeout, context=tls_context()
            )
        return http.client.HTTPConnection(parts.hostname, parts.port, timeout=self.timeout)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def send(self, method: str, path: str, headers: dict[str, str], body: bytes | None) -> Reply:
        reused = self._conn is not None
        if reused and method not in _IDEMPOTENT and time.monotonic() - self._last_used > REUSE_FOR_POST:
            self.close()
            reused = False
        try:
            return self._send_once(method, path, headers, body)
        except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError) as exc:
            self.close()
            # A kept-alive connection the host closed in the meantime: try once more on a new one, when
            # sending the request twice cannot do it twice.
            if not (reused and method in _IDEMPOTENT):
                raise TransportUnreachable(str(exc) or type(exc).__name__) from None
        except BaseException:
            self.close()
            raise
        try:
            return self._send_once(method, path, headers, body)
        except BaseException:
            self.close()
            raise

    def _send_once(self, method: str, path: str, headers: dict[str, str], body: bytes | None) -> Reply:
        import http.client

        if self._conn is None:
            self._conn = self._connect()
        all_headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **headers}
        try:
            self._conn.request(method, target(self.base_url, path, None), body=body, headers=all_headers)
            response = self._conn.getresponse()
            content = response.read()
        except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
            raise  # http.client.RemoteDisconnected too: maybe a stale kept-alive connection (send() retries)
        except TimeoutError as exc:
            raise TransportTimeout(str(exc) or "timed out") from None
        except http.client.HTTPException as exc:
            raise TransportFailed(f"{type(exc).__name__}: {exc}") from None
        except OSError as exc:
            raise TransportUnreachable(exc.strerror or str(exc) or type(exc).__name__) from None
        self._last_used = time.monotonic()
        if response.will_close:
            self.close()
        reply_headers = {name.lower(): value for name, value in response.getheaders()}
        return Reply(response.status, reply_headers, content, response.reason or "")


class HttpxTransport:
    """An httpx transport (tests: ``httpx.MockTransport``) behind ``StdlibTransport``'s interface."""

    def __init__(self, base_url: str, timeout: float, transport: Any) -> None:
        import httpx

        check_base_url(base_url)
        self.base_url = base_url
        self._http = httpx.Client(timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def send(self, method: str, path: str, headers: dict[str, str], body: bytes | None) -> Reply:
        import httpx

        parts = urlsplit(self.base_url)
        url = f"{parts.scheme}://{parts.netloc}{target(self.base_url, path, None)}"
        try:
            response = self._http.request(method, url, headers=headers, content=body)
        except httpx.TimeoutException as exc:
            raise TransportTimeout(str(exc) or "timed out") from None
        except httpx.TransportError as exc:
            raise TransportUnreachable(str(exc) or type(exc).__name__) from None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise TransportFailed(str(exc) or type(exc).__name__) from None
        return Reply(response.status_code, dict(response.headers), response.content, response.reason_phrase)
