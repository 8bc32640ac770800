"""``kr login``, ``kr logout``, ``kr whoami``, ``kr token ...`` and ``kr user ...``.

``kr login`` checks the token with ``GET /api/auth/me`` before it writes the credentials file (0600), so a
mistyped or revoked token is never saved. Secrets the host shows once (a new token, a new user's first token)
are the only thing printed on stdout, so ``T=$(kr token create ci)`` captures exactly the token.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import click

from .client import DEFAULT_HOST_URL, CliError, Settings, normalize_host_url
from .context import CliContext, KrCommand, KrGroup, json_option, pass_cli
from .credentials import Credentials, load_credentials, save_credentials
from .output import (
    DASH,
    clean,
    fmt_age,
    fmt_bool,
    fmt_time,
    info,
    items_of,
    new_table,
    plain,
    print_json,
    print_renderable,
)

ROLES = ("viewer", "user", "operator", "admin")


def _check_token(token: str) -> str:
    token = token.strip()
    if not token:
        raise click.BadParameter("the token is empty", param_hint="'--token'")
    if any(c.isspace() or not c.isprintable() for c in token):
        raise click.BadParameter("a token has no spaces or control characters", param_hint="'--token'")
    return token


def _me_line(me: Any, host: str) -> str:
    if not isinstance(me, Mapping):
        return f"authenticated at {host}"
    return f"{clean(me.get('username'))} ({clean(me.get('role'))}) at {host}"


# -- login / logout / whoami ---------------------------------------------------------------------------------


@click.command("login", cls=KrCommand)
@click.option(
    "--host", "host_url", metavar="URL", help="Host URL (default: kr --host, KOHAKURIVER_HOST, saved)."
)
@click.option("--token", metavar="TOKEN", help="API token (asked for, hidden, when not given).")
@json_option
@pass_cli
def login(obj: CliContext, host_url: str | None, token: str | None) -> None:
    """Check an API token and save it, with the host URL, for the next commands."""
    saved = load_credentials()
    host = normalize_host_url(host_url or obj.host_option or saved.host or DEFAULT_HOST_URL)
    token = token or obj.token_option
    if not token:
        token = click.prompt("API token", hide_input=True, err=True)
    token = _check_token(token)
    me = obj.client_for(Settings(host, token, obj.json_output)).get("/api/auth/me")
    if not isinstance(me, Mapping) or not me.get("username"):
        raise CliError(f"{host} accepted the token but did not say who it belongs to; not saved")
    path = save_credentials(Credentials(host, token))
    if obj.json_output:
        print_json(me)
    info(f"Logged in: {_me_line(me, host)}. Credentials saved to {path} (mode 0600).")


@click.command("logout", cls=KrCommand)
def logout() -> None:
    """Forget the saved token (the token itself stays valid: `kr token revoke ID` revokes it)."""
    from kohakuriver_net.paths import credentials_path

    path = credentials_path()
    try:
        path.unlink()
    except FileNotFoundError:
        info("Not logged in (no saved credentials).")
    except OSError as exc:
        raise CliError(f"cannot remove {path}: {exc.strerror or exc}") from None
    else:
        info(f"Logged out: removed {path}.")
    if os.environ.get("KOHAKURIVER_TOKEN"):
        info("Note: KOHAKURIVER_TOKEN is still set in this shell and is still used.")


@click.command("whoami", cls=KrCommand)
@json_option
@pass_cli
def whoami(obj: CliContext) -> None:
    """Who the current token belongs to."""
    me = obj.client().get("/api/auth/me")
    if obj.json_output:
        print_json(me)
        return
    click.echo(_me_line(me, obj.settings().host_url))


# -- tokens --------------------------------------------------------------------------------------------------


@click.group("token", cls=KrGroup)
def token() -> None:
    """Your API tokens: list, create, revoke."""


def token_table(tokens: Sequence[Mapping[str, Any]]):
    table = new_table("ID", "NAME", "CREATED", "LAST USED", "STATE", right=("ID",))
    for row in tokens:
        revoked = bool(row.get("revoked") or row.get("revoked_at"))
        table.add_row(
            plain(row.get("id")),
            plain(row.get("name"), 60),
            plain(fmt_time(row.get("created_at"))),
            plain(fmt_age(row.get("last_used_at")) if row.get("last_used_at") is not None else "never"),
            plain("revoked" if revoked else "active", style="red" if revoked else "green"),
        )
    if not tokens:
        table.add_row(plain("(no tokens)"), *[plain("")] * 4)
    return table


@token.command("list")
@json_option
@pass_cli
def token_list(obj: CliContext) -> None:
    """List your tokens (never their secrets)."""
    answer = obj.client().get("/api/auth/tokens")
    if obj.json_output:
        print_json(answer)
        return
    print_renderable(token_table(items_of(answer, "tokens", "items")))


def _secret(answer: Any) -> str | None:
    """The one-time secret in a create answer: ``{"token": "krt_..."}`` or ``{"token": {"token": ...}}``."""
    if not isinstance(answer, Mapping):
        return None
    value = answer.get("token")
    if isinstance(value, Mapping):
        value = value.get("token")
    return value if isinstance(value, str) and value else None


@token.command("create")
@click.argument("name")
@json_option
@pass_cli
def token_create(obj: CliContext, name: str) -> None:
    """Create a token; prints the secret (once, on stdout)."""
    answer = obj.client().post("/api/auth/tokens", json={"name": name})
    if obj.json_output:
        print_json(answer)
        return
    secret = _secret(answer)
    if secret is None:
        raise CliError("the host created the token but did not return its secret")
    click.echo(secret)
    token_id = answer.get("id", DASH)
    info(f"Token {clean(name, 60)!r} (id {clean(token_id)}) created. This is the only time it is shown.")


@token.command("revoke")
@click.argument("token_id", type=click.IntRange(0), metavar="ID")
@json_option
@pass_cli
def token_revoke(obj: CliContext, token_id: int) -> None:
    """Revoke a token (yours, or anyone's as admin)."""
    answer = obj.client().delete(f"/api/auth/tokens/{token_id}")
    if obj.json_output:
        print_json(answer)
        return
    click.echo(f"token {token_id} revoked")


# -- users ---------------------------------------------------------------------------------------------------


@click.group("user", cls=KrGroup)
def user() -> None:
    """Users: list (operators), create (admins)."""


def user_table(users: Sequence[Mapping[str, Any]]):
    table = new_table("ID", "USERNAME", "ROLE", "ACTIVE", "CREATED", right=("ID",))
    for row in users:
        table.add_row(
            plain(row.get("id", row.get("user_id"))),
            plain(row.get("username"), 64),
            plain(row.get("role")),
            plain(fmt_bool(row.get("is_active", row.get("active")))),
            plain(fmt_time(row.get("created_at"))),
        )
    if not users:
        table.add_row(plain("(no users)"), *[plain("")] * 4)
    return table


@user.command("list")
@json_option
@pass_cli
def user_list(obj: CliContext) -> None:
    """List users."""
    answer = obj.client().get("/api/auth/users")
    if obj.json_output:
        print_json(answer)
        return
    print_renderable(user_table(items_of(answer, "users", "items")))


@user.command("create")
@click.argument("username")
@click.option("--role", type=click.Choice(ROLES), default="user", show_default=True, help="The user's role.")
@json_option
@pass_cli
def user_create(obj: CliContext, username: str, role: str) -> None:
    """Create a user; prints their first API token (once, on stdout)."""
    answer = obj.client().post("/api/auth/users", json={"username": username, "role": role})
    if obj.json_output:
        print_json(answer)
        return
    secret = _secret(answer)
    if secret is None:
        raise CliError(f"user {username!r} was created but the host returned no token for them")
    click.echo(secret)
    info(
        f"User {clean(username, 64)!r} ({role}) created. Give them this token (shown only once); "
        "they run `kr login --token TOKEN`."
    )
