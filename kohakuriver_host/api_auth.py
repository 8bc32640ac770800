"""``/api/auth``: who am I, my API tokens, and (operators/admins) the users.

Token secrets are shown exactly once, in the answer that creates them; lists never include them.
"""

from __future__ import annotations

from typing import Any

from quart import Blueprint, Response

from . import auth
from .api_common import (
    ApiProblem,
    conflict,
    ctx,
    invalid,
    json_body,
    json_response,
    not_found,
    principal,
    require,
)
from .auth import Role
from .context import iso
from .store import ConstraintError, ReadTx, TokenRow, UserRow, WriteTx

bp = Blueprint("auth", __name__)


def token_view(row: TokenRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "created_at": iso(row.created_at),
        "last_used_at": None if row.last_used_at is None else iso(row.last_used_at),
        "revoked": row.revoked,
        "revoked_at": None if row.revoked_at is None else iso(row.revoked_at),
    }


def user_view(row: UserRow) -> dict[str, Any]:
    return {
        "user_id": row.id,
        "username": row.username,
        "role": row.role,
        "is_active": row.is_active,
        "created_at": iso(row.created_at),
    }


def _object_body(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise invalid("the body must be a JSON object", "body", status=422)
    return data


def _string_field(data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    if value is None:
        raise invalid(f"{name}: is required", name, status=422)
    if not isinstance(value, str):
        raise invalid(f"{name}: must be a string", name, status=422)
    return value


@bp.get("/api/auth/me")
async def me() -> Response:
    who = await principal()
    return json_response({"user_id": who.user_id, "username": who.username, "role": who.role.value})


@bp.get("/api/auth/tokens")
async def list_tokens() -> Response:
    who = await principal()
    rows = await auth.list_tokens(ctx().store, who.user_id)
    return json_response([token_view(r) for r in rows])


@bp.post("/api/auth/tokens")
async def create_token() -> Response:
    who = await principal()
    data = _object_body(await json_body())
    unknown = sorted(set(data) - {"name"})
    if unknown:
        raise invalid(f"{unknown[0]}: unknown field", unknown[0], status=422)
    name = _string_field(data, "name")
    try:
        row, token = await auth.create_token(ctx().store, who.user_id, name)
    except ValueError as exc:
        raise invalid(f"name: {exc}", "name", status=422) from None
    return json_response({"id": row.id, "name": row.name, "token": token}, 201)


@bp.delete("/api/auth/tokens/<token_id>")
async def revoke_token(token_id: str) -> Response:
    who = await principal()
    if not (token_id.isascii() and token_id.isdigit()) or len(token_id) > 18:
        raise not_found(f"no token {token_id[:40]!r}")
    store = ctx().store
    row = await store.read(ReadTx.get_token, int(token_id))
    # Someone else's token is "not found" for a non-admin: token ids of others cannot be probed.
    if row is None or (row.user_id != who.user_id and not who.at_least(Role.ADMIN)):
        raise not_found(f"no token {token_id}")
    if row.revoked:
        raise conflict(f"token {token_id} is already revoked")
    await auth.revoke_token(store, row.id)
    ctx().tokens.clear()  # the revoked token must stop working now, not when its cache entry expires
    return json_response({"id": row.id, "revoked": True})


@bp.get("/api/auth/users")
async def list_users() -> Response:
    await require(Role.OPERATOR)
    rows = await ctx().store.read(ReadTx.list_users)
    return json_response([user_view(r) for r in rows])


@bp.post("/api/auth/users")
async def create_user() -> Response:
    await require(Role.ADMIN)
    data = _object_body(await json_body())
    unknown = sorted(set(data) - {"username", "role", "token_name"})
    if unknown:
        raise invalid(f"{unknown[0]}: unknown field", unknown[0], status=422)
    username = _string_field(data, "username")
    role = data.get("role", Role.USER.value)
    token_name = data.get("token_name", "first token")
    try:
        auth.check_username(username)
    except ValueError as exc:
        raise invalid(f"username: {exc}", "username", status=422) from None
    try:
        role = auth.parse_role(role) if isinstance(role, str) else auth.parse_role("")
    except ValueError as exc:
        raise invalid(f"role: {exc}", "role", status=422) from None
    if not isinstance(token_name, str) or not token_name.strip() or len(token_name) > auth.MAX_TOKEN_NAME:
        raise invalid(f"token_name: must be 1..{auth.MAX_TOKEN_NAME} characters", "token_name", status=422)
    token = auth.new_api_token()
    digest = auth.hash_token(token)

    def write(tx: WriteTx) -> tuple[UserRow, TokenRow]:
        # One transaction: a user is never created without the token the admin is about to hand over.
        user = tx.create_user(username, role.value)
        return user, tx.create_token(user.id, token_name.strip(), digest)

    try:
        user, row = await ctx().store.write(write)
    except ConstraintError:
        raise ApiProblem(409, "conflict", f"user {username!r} already exists", "username") from None
    return json_response({"user": user_view(user), "token_id": row.id, "token": token}, 201)
