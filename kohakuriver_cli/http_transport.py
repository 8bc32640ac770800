"""The REST client's HTTP/1.1 connection: what ``HostClient`` sends requests over.

Why neither httpx nor ``http.client``: importing httpx takes 120-180 ms on a small machine (it pulls in its
own command line, rich and pygments when they are installed), and ``http.client`` 30-35 ms (it parses
headers with the ``email`` package and imports ``ssl`` even for plain HTTP), on a command whose whole budget
is 150 ms. A CLI call makes a handful of sequential requests to one host and reads small JSON answers, so
the client needs little of HTTP/1.1: one keep-alive connection opened on first use, a request written in one
``sendall``, and an answer framed by Content-Length, chunked transfer coding or the connection's end. That
is ``send_request``/``read_response`` below (about a hundred lines, tested on their own in
tests/unit/test_cli_http_wire.py, including every split of the bytes); ``ssl`` is imported only for https.

- ``Reply``: what a request returned (status, headers, body), whatever carried it.
- ``StdlibTransport``: that client over a TCP socket, or TLS. TLS trusts what httpx trusts
  (``tls_context``), so ``kr forward`` and ``kr connect`` (which use httpx's context) and REST calls agree
  about a host.
- ``HttpxTransport``: an httpx transport (``httpx.MockTransport`` in tests) behind the same interface, so the
  fakes of the unit tests keep working and exercise everything above the wire.

Failures are ``TransportError`` subclasses: ``TransportTimeout`` (no answer in time), ``TransportUnreachable``
(cannot connect, or the connection broke) and ``TransportFailed`` (anything else the wire did wrong, an
answer that is not HTTP/1.x); ``client.HostClient`` turns them into exit codes. Environment proxies
(``HTTP_PROXY``) are not used: the host is a machine of the lab, reached directly, as ``kr forward``'s
WebSocket always has.
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


#: Bounds on what the host may send before the body: one header line, the number of header lines.
MAX_LINE = 64 * 1024
MAX_HEADERS = 200
_NO_BODY_STATUS = frozenset({204, 304})


class StaleConnection(ConnectionResetError):
    """The connection closed before any byte of the answer: a kept-alive connection the host had closed in
    the meantime (a ``ConnectionResetError``, so ``StdlibTransport.send`` may retry an idempotent request)."""


def _line(reader: Any, what: str) -> bytes:
    line = reader.readline(MAX_LINE + 1)
    if len(line) > MAX_LINE:
        raise TransportFailed(f"the host sent a {what} longer than {MAX_LINE} bytes")
    if not line.endswith(b"\n"):
        raise TransportFailed(f"the connection ended inside the answer's {what}")
    return line.rstrip(b"\r\n")


def _head(reader: Any) -> tuple[int, str, bool, dict[str, str]]:
    """Status line and headers of one answer: ``(status, reason, is HTTP/1.0, headers)``; repeated headers
    are joined with ``, `` (RFC 9110 section 5.3)."""
    first = reader.readline(MAX_LINE + 1)
    if not first:
        raise StaleConnection("the host closed the connection")
    if not first.endswith(b"\n"):
        raise TransportFailed("the connection ended inside the answer's status line")
    version, _, rest = first.rstrip(b"\r\n").partition(b" ")
    code, _, reason = rest.partition(b" ")
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code) != 3 or not code.isdigit():
        raise TransportFailed(f"the host did not answer in HTTP/1.x: {first[:40]!r}")
    headers: dict[str, str] = {}
    last = ""
    for _ in range(MAX_HEADERS + 1):
        line = _line(reader, "header line")
        if not line:
            return int(code), reason.decode("latin-1"), version == b"HTTP/1.0", headers
        text = line.decode("latin-1")
        if text[0] in " \t" and last:  # obsolete line folding: part of the previous value
            headers[last] += " " + text.strip()
            continue
        name, colon, value = text.partition(":")
        if not colon or not name or name != name.strip():
            raise TransportFailed(f"the host sent a malformed header line: {text[:40]!r}")
        last = name.lower()
        value = value.strip(" \t")
        headers[last] = f"{headers[last]}, {value}" if last in headers else value
    raise TransportFailed(f"the host sent more than {MAX_HEADERS} header lines")


def read_head(reader: Any) -> tuple[int, str, bool, dict[str, str]]:
    """The status line and headers of an answer whose body is not for this module to read (the answer to
    a WebSocket upgrade, ``log_socket``): ``(status, reason, is HTTP/1.0, headers)``."""
    return _head(reader)


def _exactly(reader: Any, n: int) -> bytes:
    data = reader.read(n)
    if len(data) != n:
        raise TransportFailed(f"the answer was cut short ({len(data)} of {n} bytes)")
    return data


def _chunked(reader: Any) -> bytes:
    parts = []
    while True:
        size_text = _line(reader, "chunk size").split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise TransportFailed(f"the host sent a malformed chunk size: {size_text[:20]!r}") from None
        if size < 0:
            raise TransportFailed("the host sent a negative chunk size")
        if size == 0:
            while _line(reader, "trailer line"):  # trailers: read and dropped
                pass
            return b"".join(parts)
        parts.append(_exactly(reader, size))
        if _line(reader, "chunk end"):
            raise TransportFailed("a chunk did not end where its size said")


def read_response(reader: Any, method: str) -> tuple[int, str, dict[str, str], bytes, bool]:
    """One answer from ``reader`` (anything with ``readline(limit)`` and ``read(n)``: a socket's buffered
    file, ``io.BytesIO``): ``(status, reason, headers, body, will_close)``. Interim 1xx answers are skipped.
    ``StaleConnection`` when nothing at all arrived; ``TransportFailed`` when what arrived is not HTTP/1.x."""
    status, reason, http10, headers = _head(reader)
    while 100 <= status < 200:
        status, reason, http10, headers = _head(reader)
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    will_close = "close" in tokens or (http10 and "keep-alive" not in tokens)
    if method == "HEAD" or status in _NO_BODY_STATUS:
        return status, reason, headers, b"", will_close
    coding = headers.get("transfer-encoding", "").lower()
    if coding:
        if coding.split(",")[-1].strip() != "chunked":
            raise TransportFailed(f"the host used a transfer coding this client does not read: {coding!r}")
        return status, reason, headers, _chunked(reader), will_close
    length = headers.get("content-length")
    if length is not None:
        if not (length.isascii() and length.isdigit()):
            raise TransportFailed(f"the host sent a malformed Content-Length: {length[:20]!r}")
        return status, reason, headers, _exactly(reader, int(length)), will_close
    return status, reason, headers, reader.read(), True  # delimited by the connection's end


def request_bytes(
    method: str, host_header: str, request_target: str, headers: dict[str, str], body: bytes | None
) -> bytes:
    """A request's bytes. ``TransportFailed`` for a target or header that would break the framing (a line
    break in a token from a credentials file must not become a second header)."""
    if not request_target.startswith("/") or any(c <= " " or c == "\x7f" for c in request_target):
        raise TransportFailed(f"not a request target: {request_target[:60]!r}")
    lines = [f"{method} {request_target} HTTP/1.1", f"Host: {host_header}"]
    for name, value in headers.items():
        if any(c in "\r\n\0" for c in name + value) or not name or ":" in name:
            raise TransportFailed(f"header {name[:40]!r} holds a character a header cannot hold")
        lines.append(f"{name}: {value}")
    if body is not None or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body or b'')}")
    try:
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    except UnicodeEncodeError:
        raise TransportFailed("a request header holds a character outside Latin-1") from None
    return head + (body or b"")


class StdlibTransport:
    """One keep-alive HTTP/1.1 connection (a plain socket, or TLS) to ``base_url``'s host."""

    def __init__(self, base_url: str, timeout: float) -> None:
        check_base_url(base_url)
        parts = urlsplit(base_url)
        self.base_url = base_url
        self.timeout = timeout
        self._tls = parts.scheme.lower() == "https"
        self._hostname = parts.hostname or ""
        self._port = parts.port or (443 if self._tls else 80)
        # The name as the resolver wants it: bytes, so that socket need not load the idna codec (2 ms) for
        # a name that is plain ASCII anyway.
        self._address = self._hostname.encode("ascii" if self._hostname.isascii() else "idna")
        name = self._address.decode("ascii")
        name = f"[{name}]" if ":" in name else name
        default = 443 if self._tls else 80
        self._host_header = name if self._port == default else f"{name}:{self._port}"
        self._sock: Any = None
        self._reader: Any = None
        self._last_used = 0.0

    def _connect(self) -> None:
        import socket

        sock = socket.create_connection((self._address, self._port), timeout=self.timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls:
                sock = tls_context().wrap_socket(sock, server_hostname=self._hostname)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._reader = sock.makefile("rb")

    def close(self) -> None:
        if self._sock is not None:
            self._reader.close()
            self._sock.close()
            self._sock = self._reader = None

    def send(self, method: str, path: str, headers: dict[str, str], body: bytes | None) -> Reply:
        reused = self._sock is not None
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
        except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError) as exc:
            self.close()
            raise TransportUnreachable(str(exc) or type(exc).__name__) from None
        except BaseException:
            self.close()
            raise

    def _send_once(self, method: str, path: str, headers: dict[str, str], body: bytes | None) -> Reply:
        all_headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **headers}
        data = request_bytes(method, self._host_header, target(self.base_url, path, None), all_headers, body)
        try:
            if self._sock is None:
                self._connect()
            self._sock.sendall(data)
            status, reason, reply_headers, content, will_close = read_response(self._reader, method)
        except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
            raise  # maybe a stale kept-alive connection (send() retries)
        except TimeoutError as exc:
            raise TransportTimeout(str(exc) or "timed out") from None
        except OSError as exc:  # refused, no route, name not resolved, TLS failure
            raise TransportUnreachable(exc.strerror or str(exc) or type(exc).__name__) from None
        self._last_used = time.monotonic()
        if will_close:
            self.close()
        return Reply(status, reply_headers, content, reason)


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
