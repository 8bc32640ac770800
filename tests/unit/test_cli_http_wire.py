"""The CLI's own HTTP/1.1 framing (``http_transport.read_response`` and ``request_bytes``): every way
the host may frame an answer, every split of its bytes, and what is refused. (test_cli_http_transport.py
runs the whole transport against the standard library's HTTP server.)"""

from __future__ import annotations

import io
import socket
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kohakuriver_cli.http_transport import (
    MAX_HEADERS,
    MAX_LINE,
    StaleConnection,
    StdlibTransport,
    TransportFailed,
    TransportUnreachable,
    read_response,
    request_bytes,
)


class Trickle(io.RawIOBase):
    """A raw stream that hands out its bytes in the given piece sizes, as a socket may."""

    def __init__(self, data: bytes, sizes: list[int]) -> None:
        self.data, self.sizes, self.pos = data, sizes or [1], 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        size = self.sizes[self.pos % len(self.sizes)] if self.pos < len(self.data) else 0
        piece = self.data[self.pos : self.pos + min(size, len(buffer))]
        buffer[: len(piece)] = piece
        self.pos += len(piece)
        return len(piece)


def reader(data: bytes, sizes: list[int] | None = None) -> io.BufferedReader:
    return io.BufferedReader(Trickle(data, sizes or [len(data) or 1]), buffer_size=16)


def chunked(body: bytes, cuts: list[int]) -> bytes:
    out, pos = b"", 0
    for cut in [*sorted(set(cuts)), len(body)]:
        if cut > pos:
            out += b"%x;ext=1\r\n%s\r\n" % (cut - pos, body[pos:cut])
            pos = cut
    return out + b"0\r\nX-Trailer: t\r\n\r\n"


@given(
    body=st.binary(max_size=300),
    cuts=st.lists(st.integers(0, 300), max_size=6),
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=5),
    framing=st.sampled_from(["length", "chunked", "close"]),
)
def test_any_framing_and_any_split_gives_the_body(body, cuts, sizes, framing):
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
    if framing == "length":
        wire = head + b"Content-Length: %d\r\n\r\n" % len(body) + body
    elif framing == "chunked":
        wire = (
            head + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(body, [c for c in cuts if c < len(body)])
        )
    else:
        wire = head + b"\r\n" + body
    following = b"HTTP/1.1 204 No Content\r\n\r\n"
    r = reader(wire + (b"" if framing == "close" else following), sizes)
    status, reason, headers, content, will_close = read_response(r, "GET")
    assert (status, reason, content, headers["content-type"]) == (200, "OK", body, "text/plain")
    assert will_close == (framing == "close")
    if framing != "close":  # the next answer on the same connection starts exactly after this one
        assert read_response(r, "GET")[0] == 204


def test_interim_answers_headers_and_connection_rules():
    wire = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 201 Created\r\nSet-Thing: a\r\nset-thing: b\r\nX-Folded: one\r\n two\r\n"
        b"Connection: keep-alive, Close\r\nContent-Length: 2\r\n\r\n{}"
    )
    status, reason, headers, body, will_close = read_response(reader(wire), "POST")
    assert (status, reason, body, will_close) == (201, "Created", b"{}", True)
    assert headers["set-thing"] == "a, b" and headers["x-folded"] == "one two"
    old = b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"
    assert read_response(reader(old), "GET")[4] is True
    kept = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n"
    assert read_response(reader(kept), "GET")[4] is False
    # No body for HEAD and 204/304, whatever the headers say.
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nHTTP/1.1 304 Not Modified\r\n\r\n"
    r = reader(head)
    assert read_response(r, "HEAD")[3] == b"" and read_response(r, "GET")[:2] == (304, "Not Modified")
    assert read_response(reader(b"HTTP/1.1 200\r\nContent-Length: 1\r\n\r\nx"), "GET")[:2] == (200, "")


@pytest.mark.parametrize(
    "wire",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"HTTP/2 200\r\n\r\n",
        b"HTTP/1.1 20x OK\r\n\r\n",
        b"HTTP/1.1 200 OK",  # cut inside the status line
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab",  # cut inside the body
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Name : x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc",
        b"HTTP/1.1 200 OK\r\nX: " + b"y" * MAX_LINE + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * (MAX_HEADERS + 1) + b"\r\n",
    ],
)
def test_what_is_not_http_is_refused(wire):
    with pytest.raises(TransportFailed):
        read_response(reader(wire, [7]), "GET")


def test_nothing_at_all_is_a_stale_connection():
    with pytest.raises(StaleConnection):
        read_response(reader(b""), "GET")
    assert issubclass(StaleConnection, ConnectionResetError)  # what send() retries for an idempotent request


def test_request_bytes():
    wire = request_bytes("POST", "h:8000", "/api/x?a=1", {"Authorization": "Bearer t"}, b"{}")
    assert wire == (
        b"POST /api/x?a=1 HTTP/1.1\r\nHost: h:8000\r\nAuthorization: Bearer t\r\nContent-Length: 2\r\n\r\n{}"
    )
    assert request_bytes("POST", "h", "/", {}, None).endswith(b"Content-Length: 0\r\n\r\n")
    assert b"Content-Length" not in request_bytes("GET", "h", "/", {}, None)
    for bad_headers in (
        {"Authorization": "Bearer t\r\nX-Evil: 1"},
        {"Bad:Name": "v"},
        {"X": "caf\u00e9\u20ac"},
    ):
        with pytest.raises(TransportFailed):
            request_bytes("GET", "h", "/", bad_headers, None)
    for bad_target in ("/a b", "/a\r\nX: y", "relative"):
        with pytest.raises(TransportFailed):
            request_bytes("GET", "h", bad_target, {}, None)


class RawServer:
    """A TCP server that answers each connection with a script: per request, the bytes to send (in pieces of
    ``piece`` bytes), or None to close the connection without answering."""

    def __init__(self, script: list[bytes | None], piece: int = 3) -> None:
        self.script, self.piece = list(script), piece
        self.requests: list[bytes] = []
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.script:
            conn, _ = self.listener.accept()
            self.connections += 1
            with conn:
                while self.script:
                    data = conn.recv(65536)
                    if not data:
                        break
                    self.requests.append(data)
                    answer = self.script.pop(0)
                    if answer is None:
                        break
                    for i in range(0, len(answer), self.piece):
                        conn.sendall(answer[i : i + self.piece])

    def close(self) -> None:
        self.listener.close()


def test_keep_alive_over_a_trickling_socket_and_a_stale_connection_retried_for_a_get():
    ok = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    server = RawServer([ok, ok, None, ok])
    wire = StdlibTransport(server.url + "/p", 5)
    try:
        assert wire.send("GET", "/a", {"Authorization": "Bearer x"}, None).content == b"hello"
        assert wire.send("GET", "/b", {}, None).content == b"hello"
        assert server.connections == 1
        # The host closes the kept-alive connection without answering: a GET goes again on a new one.
        assert wire.send("GET", "/c", {}, None).content == b"hello"
        assert server.connections == 2
    finally:
        wire.close()
        server.close()
    first = server.requests[0]
    assert (
        first.startswith(b"GET /p/a HTTP/1.1\r\nHost: 127.0.0.1:") and b"Authorization: Bearer x\r\n" in first
    )


def test_a_post_is_never_sent_twice():
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    server = RawServer([ok, None])
    wire = StdlibTransport(server.url, 5)
    try:
        wire.send("GET", "/", {}, None)
        with pytest.raises(TransportUnreachable):
            wire.send("POST", "/api/submit", {}, b"{}")
    finally:
        wire.close()
        server.close()
    assert server.connections == 1
