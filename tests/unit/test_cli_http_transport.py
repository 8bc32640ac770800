"""The REST client's wire (``http_transport.StdlibTransport``) against a real local HTTP/1.1 server: bodies
with a length and chunked, keep-alive, a kept-alive connection the server closed, and every failure mapped
to its kind. (The unit tests of the commands use httpx's MockTransport through ``HttpxTransport``.)"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kohakuriver_cli.client import EXIT_UNREACHABLE, CliError, HostClient, Settings
from kohakuriver_cli.http_transport import (
    StdlibTransport,
    TransportTimeout,
    TransportUnreachable,
    target,
)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    connections: set[int] = set()

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        type(self).connections.add(id(self.connection))
        if self.path.startswith("/prefix/api/json"):
            query = self.path.partition("?")[2]
            self._send(200, json.dumps({"path": self.path, "query": query,
                                        "auth": self.headers.get("Authorization")}).encode())  # fmt: skip
        elif self.path == "/chunked":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"hello ", b"chunked ", "wörld".encode()):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/then-close":
            self._send(200, b"{}")
            self.close_connection = True  # without saying so: the client finds out on its next request
        elif self.path == "/slow":
            time.sleep(2)
            self._send(200, b"{}")
        else:
            self._send(404, b'{"error": "not_found", "message": "nothing here"}')

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self._send(201, json.dumps({"got": json.loads(body), "type": self.headers["Content-Type"]}).encode())


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    Handler.connections = set()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_json_params_prefix_and_keep_alive(server):
    with HostClient(Settings(server + "/prefix/", "krt_x")) as client:
        first = client.get("/api/json", params={"a": "1 2", "b": "ü"})
        second = client.get("/api/json?x=1", params={"y": "2"})
    assert first == {
        "path": "/prefix/api/json?a=1+2&b=%C3%BC",
        "query": "a=1+2&b=%C3%BC",
        "auth": "Bearer krt_x",
    }
    assert second["query"] == "x=1&y=2"
    assert len(Handler.connections) == 1  # one connection for both


def test_post_json_and_chunked_text(server):
    with HostClient(Settings(server, None)) as client:
        assert client.post("/echo", json={"k": ["v", 1]}) == {
            "got": {"k": ["v", 1]},
            "type": "application/json",
        }
        assert client.text("/chunked") == "hello chunked wörld"


def test_error_status_is_an_api_error(server):
    with HostClient(Settings(server, None)) as client, pytest.raises(CliError) as info:
        client.get("/missing")
    assert info.value.exit_code == 3 and "nothing here (HTTP 404)" in info.value.format_message()


def test_a_kept_alive_connection_the_server_closed_is_replaced_for_a_get(server):
    wire = StdlibTransport(server, 5)
    assert wire.send("GET", "/then-close", {}, None).status_code == 200
    time.sleep(0.1)
    assert wire.send("GET", "/prefix/api/json", {}, None).status_code == 200
    wire.close()


def test_refused_and_timeout(server):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TransportUnreachable):
        StdlibTransport(f"http://127.0.0.1:{port}", 5).send("GET", "/", {}, None)
    with pytest.raises(TransportTimeout):
        StdlibTransport(server, 0.3).send("GET", "/slow", {}, None)
    with pytest.raises(CliError) as info:
        HostClient(Settings(f"http://127.0.0.1:{port}", None)).get("/api/health")
    assert info.value.exit_code == EXIT_UNREACHABLE and "cannot reach the host" in info.value.format_message()


@pytest.mark.parametrize("url", ["http://h:99999", "http://h:abc", "http://", "ftp://h"])
def test_bad_urls_are_usage_errors(url):
    with pytest.raises(CliError) as info:
        HostClient(Settings(url, None))
    assert info.value.exit_code == 2


def test_target():
    assert target("http://h:1/p/", "/api/x", {"a": "b"}) == "/p/api/x?a=b"
    assert target("http://h:1", "/api/x?c=d", {"a": "b"}) == "/api/x?c=d&a=b"
    assert target("", "/api/x", None) == "/api/x"
