"""The CLI's REST client and error rendering: every failure is one line on stderr, with the documented
exit code.

Also home of ``FakeHost``, the ``httpx.MockTransport`` stand-in for the host API that the other
``test_cli_*`` modules use: no server, no sockets.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result

from kohakuriver_cli.client import (
    EXIT_FORBIDDEN,
    EXIT_NOT_FOUND,
    EXIT_UNREACHABLE,
    HostClient,
    Settings,
    resolve_settings,
)
from kohakuriver_cli.context import CliContext
from kohakuriver_cli.credentials import Credentials, save_credentials
from kohakuriver_cli.main import cli

TOKEN = "krt_" + "t" * 43
HOST = "http://kr-host.test:8000"

Reply = httpx.Response | Callable[[httpx.Request], httpx.Response]


def error_reply(status: int, code: str, message: str, field: str | None = None) -> httpx.Response:
    return httpx.Response(status, json={"error": code, "message": message, "field": field})


class FakeHost:
    """Answers ``(method, path)`` from a table; records every request. Unknown routes are a JSON 404."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Reply | list[Reply]] = {}
        self.requests: list[httpx.Request] = []

    def on(self, method: str, path: str, reply: Reply | Any = None, status: int = 200) -> None:
        """``reply``: an httpx.Response, a handler, or JSON data to answer with ``status``."""
        if not isinstance(reply, httpx.Response) and not callable(reply):
            reply = httpx.Response(status, json=reply)
        self.routes[(method, path)] = reply

    def on_each(self, method: str, path: str, *replies: Reply | Any) -> None:
        """One reply per call (JSON data is a 200), the last one repeating."""
        self.routes[(method, path)] = [
            r if isinstance(r, httpx.Response) or callable(r) else httpx.Response(200, json=r)
            for r in replies
        ]

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        reply = self.routes.get((request.method, request.url.path))
        if reply is None:
            return error_reply(404, "not_found", f"no route {request.method} {request.url.path}")
        if isinstance(reply, list):
            reply = reply.pop(0) if len(reply) > 1 else reply[0]
        return reply(request) if callable(reply) else reply

    def calls(self, method: str, path: str) -> list[httpx.Request]:
        return [r for r in self.requests if r.method == method and r.url.path == path]

    def body(self, method: str, path: str, index: int = -1) -> Any:
        return json.loads(self.calls(method, path)[index].content)

    def invoke(self, *args: str, token: str | None = TOKEN, input: str | None = None, **env: str) -> Result:
        obj = CliContext(transport=httpx.MockTransport(self.handle))
        environ: dict[str, str | None] = {"KOHAKURIVER_HOST": HOST, "KOHAKURIVER_TOKEN": token}
        environ.update(env)
        return CliRunner().invoke(cli, list(args), obj=obj, env=environ, input=input)


@pytest.fixture(autouse=True)
def kr_home(tmp_path, monkeypatch):
    """Every CLI test gets its own ~/.kohakuriver and no KOHAKURIVER_* from the developer's shell."""
    home = tmp_path / "krhome"
    monkeypatch.setenv("KOHAKURIVER_HOME", str(home))
    for name in ("KOHAKURIVER_HOST", "KOHAKURIVER_TOKEN", "KOHAKURIVER_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    return home


@pytest.fixture
def host() -> FakeHost:
    return FakeHost()


def assert_one_line_error(result: Result, exit_code: int, *fragments: str) -> None:
    assert result.exit_code == exit_code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert result.stdout == ""


# -- settings ------------------------------------------------------------------------------------------------


def test_settings_default_to_local_host_without_token():
    settings = resolve_settings(None, None, False)
    assert settings.host_url == "http://127.0.0.1:8000"
    assert settings.token is None


def test_settings_from_credentials_file():
    save_credentials(Credentials("http://10.0.0.1:8000/", TOKEN))
    settings = resolve_settings(None, None, True)
    assert (settings.host_url, settings.token, settings.json_output) == ("http://10.0.0.1:8000", TOKEN, True)


def test_options_override_credentials_file():
    save_credentials(Credentials("http://10.0.0.1:8000", TOKEN))
    settings = resolve_settings("other:9000", "krt_other", False)
    assert (settings.host_url, settings.token) == ("http://other:9000", "krt_other")


def test_saved_token_is_not_sent_to_another_host():
    save_credentials(Credentials("http://10.0.0.1:8000", TOKEN))
    assert resolve_settings("http://elsewhere:8000", None, False).token is None
    assert resolve_settings("10.0.0.1:8000", None, False).token == TOKEN


def test_env_vars_feed_the_global_options(host):
    host.on("GET", "/api/auth/me", {"user_id": 1, "username": "alice", "role": "user"})
    result = host.invoke("whoami", KOHAKURIVER_HOST="http://from-env:8000", token="krt_from_env")
    assert result.exit_code == 0, result.output
    request = host.requests[0]
    assert str(request.url) == "http://from-env:8000/api/auth/me"
    assert request.headers["authorization"] == "Bearer krt_from_env"
    assert result.stdout == "alice (user) at http://from-env:8000\n"


def test_global_options_beat_env_vars(host):
    host.on("GET", "/api/auth/me", {"user_id": 1, "username": "alice", "role": "user"})
    result = host.invoke("--host", "http://opt:1", "--token", "krt_opt", "whoami")
    assert result.exit_code == 0, result.output
    assert str(host.requests[0].url) == "http://opt:1/api/auth/me"
    assert host.requests[0].headers["authorization"] == "Bearer krt_opt"


# -- client --------------------------------------------------------------------------------------------------


def test_client_uses_injected_transport(host):
    host.on("GET", "/api/health", {"status": "ok"})
    with HostClient(Settings(HOST, None), transport=httpx.MockTransport(host.handle)) as client:
        assert client.get("/api/health") == {"status": "ok"}
    assert "authorization" not in host.requests[0].headers


def test_api_error_carries_status_and_code(host):
    host.on("GET", "/api/status/1", error_reply(404, "not_found", "task 1 not found"))
    client = HostClient(Settings(HOST, TOKEN), transport=httpx.MockTransport(host.handle))
    with client, pytest.raises(Exception) as info:
        client.get("/api/status/1")
    assert info.value.exit_code == EXIT_NOT_FOUND
    assert info.value.status == 404 and info.value.error == "not_found"
    assert info.value.format_message() == "task 1 not found (HTTP 404)"


# -- error rendering through the CLI -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "exit_code"),
    [
        (400, 1),
        (401, EXIT_FORBIDDEN),
        (403, EXIT_FORBIDDEN),
        (404, EXIT_NOT_FOUND),
        (409, 1),
        (500, 1),
        (503, 1),
    ],
)
def test_http_errors_map_to_exit_codes(host, status, exit_code):
    host.on("GET", "/api/status/42", error_reply(status, "whatever", "the host says no"))
    result = host.invoke("task", "status", "42")
    assert_one_line_error(result, exit_code, "the host says no", f"HTTP {status}")


def test_validation_error_names_the_field(host):
    host.on("POST", "/api/submit", error_reply(422, "invalid", "must be >= 1", "required_cores"))
    result = host.invoke("task", "submit", "--", "true")
    assert_one_line_error(result, 1, "required_cores: must be >= 1 (HTTP 422)")


def test_multi_line_server_message_is_one_line(host):
    host.on("GET", "/api/nodes", error_reply(500, "internal", "first line\nsecond line\r\nthird"))
    result = host.invoke("node", "list")
    assert_one_line_error(result, 1, "first line second line third")


def test_non_json_error_body(host):
    host.on("GET", "/api/nodes", httpx.Response(502, text="<html>\n<h1>Bad Gateway</h1>\n</html>"))
    result = host.invoke("node", "list")
    assert_one_line_error(result, 1, "<html>", "HTTP 502")


def test_unauthenticated_without_token_hints_at_login(host):
    host.on("GET", "/api/nodes", error_reply(401, "unauthorized", "missing bearer token"))
    result = host.invoke("node", "list", token=None)
    assert_one_line_error(result, EXIT_FORBIDDEN, "kr login", "HTTP 401")
    assert "authorization" not in host.requests[0].headers


def test_unreachable_host_exits_5(host):
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("Connection refused", request=request)

    host.on("GET", "/api/nodes", refuse)
    result = host.invoke("node", "list")
    assert_one_line_error(result, EXIT_UNREACHABLE, "cannot reach the host", HOST)


def test_timeout_exits_5(host):
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    host.on("GET", "/api/nodes", slow)
    assert_one_line_error(host.invoke("node", "list"), EXIT_UNREACHABLE, "did not answer in time")


def test_other_httpx_errors_are_wrapped(host):
    def broken(request: httpx.Request) -> httpx.Response:
        raise httpx.DecodingError("bad gzip", request=request)

    host.on("GET", "/api/nodes", broken)
    assert_one_line_error(host.invoke("node", "list"), 1, "bad gzip")


def test_answer_that_is_not_json(host):
    host.on("GET", "/api/nodes", httpx.Response(200, text="hello", headers={"content-type": "text/html"}))
    assert_one_line_error(host.invoke("node", "list"), 1, "not JSON")


def test_unexpected_exception_is_one_line_without_traceback(host):
    def bug(request: httpx.Request) -> httpx.Response:
        raise RuntimeError("boom\nwith a second line")

    host.on("GET", "/api/nodes", bug)
    assert_one_line_error(
        host.invoke("node", "list"), 1, "unexpected error: RuntimeError: boom with a second line"
    )


def test_debug_env_lets_the_traceback_through(host):
    def bug(request: httpx.Request) -> httpx.Response:
        raise RuntimeError("boom")

    host.on("GET", "/api/nodes", bug)
    result = host.invoke("node", "list", KOHAKURIVER_DEBUG="1")
    assert isinstance(result.exception, RuntimeError)


def test_invalid_host_url_is_a_usage_error(host):
    result = host.invoke("node", "list", KOHAKURIVER_HOST="ftp://somewhere")
    assert_one_line_error(result, 2, "http:// or https://")
