"""What every endpoint module shares: the JSON error type, who is calling, body and query parsing.

Errors: handlers raise ``ApiProblem`` (or ``ValidationError``, ``auth.Unauthorized``/``Forbidden``) and
``app.py`` turns each into ``{"error", "message", "field"}`` with its status code, so no endpoint builds an
error body by hand and none can forget the shape.
"""

from __future__ import annotations

import json
from typing import Any

from quart import Response, current_app, has_request_context, has_websocket_context, request, websocket

from kohakuriver_proto.snowflake import MAX_ID

from . import auth
from .auth import Principal, Role
from .context import HostContext
from .store import ReadTx

EXTENSION_KEY = "kohakuriver"


class ApiProblem(Exception):
    """An error answer: HTTP ``status`` with the JSON body ``{error, message, field}``."""

    def __init__(self, status: int, error: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.field = field


def not_found(message: str) -> ApiProblem:
    return ApiProblem(404, "not_found", message)


def conflict(message: str) -> ApiProblem:
    return ApiProblem(409, "conflict", message)


def invalid(message: str, field: str | None = None, status: int = 400) -> ApiProblem:
    return ApiProblem(status, "invalid", message, field)


def unavailable(message: str) -> ApiProblem:
    return ApiProblem(503, "unavailable", message)


def ctx() -> HostContext:
    return current_app.extensions[EXTENSION_KEY]


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    # json.dumps directly: the data is already JSON-shaped (documents, unstructured models), and Quart's
    # provider would sort keys and re-encode for nothing.
    body = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return Response(body, status=status, content_type="application/json", headers=headers)


def error_body(error: str, message: str, field: str | None = None) -> dict[str, Any]:
    return {"error": error, "message": message, "field": field}


# -- who is calling ----------------------------------------------------------------------------------------


def _authorization_header() -> str | None:
    if has_request_context():
        return request.headers.get("Authorization")
    if has_websocket_context():
        return websocket.headers.get("Authorization")
    return None


async def principal() -> Principal:
    """The authenticated user of this request (or WebSocket); ``auth.Unauthorized`` if there is none."""
    return await principal_for(ctx(), _authorization_header())


async def principal_for(host: HostContext, authorization: str | None) -> Principal:
    """The user an ``Authorization`` header names, also for callers outside Quart's request context (the
    front door's forward sessions): token cache, ADMIN_SECRET, then the store; ``auth.Unauthorized`` (the
    JSON 401) when there is no such user."""
    token = auth.bearer_token(authorization)
    if token is None:
        raise auth.Unauthorized("authentication required: send 'Authorization: Bearer <token>'")
    secret = host.config.ADMIN_SECRET
    if secret and auth.check_cluster_token(secret, token):
        return await _admin_secret_principal(host)
    cached = host.tokens.get(token, host.now())
    if cached is not None:
        return cached
    found = await auth.authenticate(host.store, token)
    if found is None:
        raise auth.Unauthorized("invalid or revoked API token")
    host.tokens.put(token, found, host.now())
    return found


async def _admin_secret_principal(host: HostContext) -> Principal:
    # ADMIN_SECRET acts as the first active admin, so what it submits has a real owner (tasks.owner_id is a
    # foreign key to users).
    users = await host.store.read(ReadTx.list_users)
    admin = next((u for u in users if u.role == Role.ADMIN and u.is_active), None)
    if admin is None:
        raise auth.Unauthorized("ADMIN_SECRET is set but there is no active admin user")
    return Principal(admin.id, admin.username, Role.ADMIN, None)


async def require(minimum: Role) -> Principal:
    return auth.require_role(await principal(), minimum)


def require_cluster_token() -> None:
    """Runner endpoints: only the cluster token is accepted (user tokens are refused like no token)."""
    token = auth.bearer_token(_authorization_header())
    if token is None or not auth.check_cluster_token(ctx().cluster_token, token):
        raise auth.Unauthorized("runner endpoints need the cluster token: 'Authorization: Bearer <token>'")


# -- input -------------------------------------------------------------------------------------------------


async def json_body() -> Any:
    """The request body as JSON; 400 naming ``body`` if it is not JSON."""
    raw = await request.get_data(as_text=False)
    if not raw:
        raise invalid("a JSON body is required", "body")
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid(f"invalid JSON: {exc}", "body") from None


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def path_task_id(text: str) -> int:
    """A task id from the URL. Anything that is not a decimal id is answered like an unknown id: 404."""
    if not (0 < len(text) <= 19 and text.isascii() and text.isdigit()) or int(text) > MAX_ID:
        raise not_found(f"no task {text[:40]!r}")
    return int(text)


def query_int(name: str, default: int | None, *, minimum: int = 0, maximum: int = 1 << 31) -> int | None:
    """An integer query parameter; 400 naming it when it is not an integer in range."""
    args = request.args if has_request_context() else websocket.args
    raw = args.get(name)
    if raw is None or raw == "":
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 12:
        raise invalid(f"{name} must be a non-negative integer, got {raw[:40]!r}", name)
    value = int(raw)
    if not minimum <= value <= maximum:
        raise invalid(f"{name} must be between {minimum} and {maximum}, got {value}", name)
    return value


def query_choice(name: str, choices: tuple[str, ...], default: str | None) -> str | None:
    args = request.args if has_request_context() else websocket.args
    raw = args.get(name)
    if raw is None or raw == "":
        return default
    if raw not in choices:
        raise invalid(f"{name} must be one of {', '.join(choices)}, got {raw[:40]!r}", name)
    return raw
