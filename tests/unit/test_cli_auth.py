"""``kr login`` / ``logout`` / ``whoami`` / ``token`` / ``user``."""

from __future__ import annotations

import json
import stat

import httpx

from kohakuriver_cli.credentials import Credentials, load_credentials, save_credentials
from kohakuriver_net.paths import credentials_path

from . import test_cli_client
from .test_cli_client import HOST, TOKEN, assert_one_line_error, error_reply

# the shared fixtures: an isolated ~/.kohakuriver (autouse) and a FakeHost
kr_home = test_cli_client.kr_home
host = test_cli_client.host

ME = {"user_id": 2, "username": "alice", "role": "user"}
NEW_TOKEN = "krt_" + "n" * 43


def test_login_verifies_then_saves_0600(host):
    host.on("GET", "/api/auth/me", ME)
    result = host.invoke("login", "--host", "gpu-host:8000", "--token", NEW_TOKEN, token=None)
    assert result.exit_code == 0, result.output
    request = host.requests[0]
    assert str(request.url) == "http://gpu-host:8000/api/auth/me"
    assert request.headers["authorization"] == f"Bearer {NEW_TOKEN}"
    assert load_credentials() == Credentials("http://gpu-host:8000", NEW_TOKEN)
    assert stat.S_IMODE(credentials_path().stat().st_mode) == 0o600
    assert "alice (user)" in result.stderr
    assert result.stdout == ""


def test_login_uses_global_host_and_prompts_for_the_token(host):
    host.on("GET", "/api/auth/me", ME)
    result = host.invoke("login", token=None, input=NEW_TOKEN + "\n")
    assert result.exit_code == 0, result.output
    assert NEW_TOKEN not in result.output  # hidden input
    assert load_credentials() == Credentials(HOST, NEW_TOKEN)


def test_login_with_a_bad_token_saves_nothing(host):
    host.on("GET", "/api/auth/me", error_reply(401, "unauthorized", "invalid or revoked token"))
    result = host.invoke("login", "--token", "krt_bad", token=None)
    assert_one_line_error(result, 4, "invalid or revoked token")
    assert not credentials_path().exists()


def test_login_refuses_a_token_with_spaces(host):
    result = host.invoke("login", "--token", "krt_a b", token=None)
    assert result.exit_code == 2
    assert host.requests == []


def test_login_json_prints_me(host):
    host.on("GET", "/api/auth/me", ME)
    result = host.invoke("login", "--token", NEW_TOKEN, "--json", token=None)
    assert json.loads(result.stdout) == ME


def test_logout_removes_the_file(host):
    save_credentials(Credentials(HOST, TOKEN))
    result = host.invoke("logout")
    assert result.exit_code == 0
    assert not credentials_path().exists()
    assert "Logged out" in result.stderr
    again = host.invoke("logout", token=None)
    assert again.exit_code == 0 and "Not logged in" in again.stderr
    assert host.requests == []


def test_whoami(host):
    host.on("GET", "/api/auth/me", ME)
    assert host.invoke("whoami").stdout == f"alice (user) at {HOST}\n"
    assert json.loads(host.invoke("whoami", "--json").stdout) == ME


def test_token_list(host):
    tokens = [
        {
            "id": 1,
            "name": "laptop",
            "created_at": "2025-04-10T08:30:00Z",
            "last_used_at": None,
            "revoked": False,
        },
        {"id": 2, "name": "ci", "created_at": 1744273800.0, "last_used_at": 1744273900.0, "revoked": True},
    ]
    host.on("GET", "/api/auth/tokens", tokens)
    result = host.invoke("token", "list")
    assert result.exit_code == 0, result.output
    assert "laptop" in result.stdout and "never" in result.stdout and "revoked" in result.stdout
    assert "2025-04-10" in result.stdout
    assert json.loads(host.invoke("token", "list", "--json").stdout) == tokens


def test_token_create_prints_only_the_secret(host):
    host.on("POST", "/api/auth/tokens", {"id": 9, "name": "ci", "token": NEW_TOKEN})
    result = host.invoke("token", "create", "ci")
    assert result.exit_code == 0, result.output
    assert result.stdout == NEW_TOKEN + "\n"
    assert "only time" in result.stderr
    assert host.body("POST", "/api/auth/tokens") == {"name": "ci"}


def test_token_create_without_secret_is_an_error(host):
    host.on("POST", "/api/auth/tokens", {"id": 9, "name": "ci"})
    assert_one_line_error(host.invoke("token", "create", "ci"), 1, "did not return its secret")


def test_token_revoke(host):
    host.on("DELETE", "/api/auth/tokens/9", {"message": "revoked"})
    result = host.invoke("token", "revoke", "9")
    assert result.exit_code == 0 and result.stdout == "token 9 revoked\n"
    assert host.invoke("token", "revoke", "x").exit_code == 2


def test_token_revoke_someone_elses_is_exit_4(host):
    host.on("DELETE", "/api/auth/tokens/3", error_reply(403, "forbidden", "not your token"))
    assert_one_line_error(host.invoke("token", "revoke", "3"), 4, "not your token")


def test_user_list(host):
    users = [{"id": 1, "username": "admin", "role": "admin", "is_active": True, "created_at": 1744273800.0}]
    host.on("GET", "/api/auth/users", {"users": users})
    result = host.invoke("user", "list")
    assert result.exit_code == 0, result.output
    assert "admin" in result.stdout and "yes" in result.stdout


def test_user_create_prints_the_first_token(host):
    host.on_each(
        "POST",
        "/api/auth/users",
        {"user": {"id": 5, "username": "bob", "role": "operator"}, "token": NEW_TOKEN},
        {
            "id": 6,
            "username": "carol",
            "role": "user",
            "token": {"id": 3, "name": "first", "token": NEW_TOKEN},
        },
    )
    result = host.invoke("user", "create", "bob", "--role", "operator")
    assert result.exit_code == 0, result.output
    assert result.stdout == NEW_TOKEN + "\n"
    assert host.body("POST", "/api/auth/users") == {"username": "bob", "role": "operator"}
    result = host.invoke("user", "create", "carol")
    assert result.stdout == NEW_TOKEN + "\n"
    assert host.body("POST", "/api/auth/users") == {"username": "carol", "role": "user"}


def test_user_create_bad_role_is_usage_error(host):
    assert host.invoke("user", "create", "bob", "--role", "root").exit_code == 2


def test_user_create_as_non_admin(host):
    host.on(
        "POST", "/api/auth/users", httpx.Response(403, json={"error": "forbidden", "message": "admins only"})
    )
    assert_one_line_error(host.invoke("user", "create", "bob"), 4, "admins only")
