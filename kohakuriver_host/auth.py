"""Who is calling and what they may do: roles, API tokens, the first admin, the cluster token.

Roles, lowest to highest: ``viewer < user < operator < admin``. What each may do with tasks:

- **viewer**: read-only. Sees cluster-wide information that belongs to nobody (nodes, health), its own profile
  and tokens, and tasks it owns (a user demoted to viewer keeps read access to its history). It never
  submits, controls or reaches a task (no kill/pause/stop, no port forward, SSH or terminal), not even its
  own, and never sees other users' tasks. Use it for lab-wide dashboards and for suspended accounts.
- **user**: submits tasks and VPS; sees, controls and reaches its own, nobody else's.
- **operator**: everything a user may do, on every user's tasks; approves and rejects; manages nodes.
- **admin**: everything, including users and other users' tokens.

A task another user owns is invisible to a user or viewer: the HTTP layer should answer 404, not 403, so that
task ids of other users cannot be probed. ``Unauthorized`` (no or bad token) maps to 401, ``Forbidden``
(authenticated, not allowed) to 403.

API tokens are ``krt_`` + 43 characters of URL-safe base64 (32 random bytes), shown once and stored only as a
SHA-256 hash. Runners authenticate with a separate cluster token (``krc_...``) kept in the store's meta table.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import json
import logging
import os
import pathlib
import re
import secrets
import stat
from typing import Any

import attrs
import trio

from kohakuriver_net.atomic_file import publish_file, stage_file

from .store import ReadTx, Store, TokenRow, UserRow, WriteTx

log = logging.getLogger("kohakuriver.host.auth")

TOKEN_PREFIX = "krt_"
CLUSTER_TOKEN_PREFIX = "krc_"
TOKEN_BYTES = 32
_TOKEN_RE = re.compile(r"krt_[A-Za-z0-9_-]{43}")
#: ``last_used_at`` is written at most this often per token: a request must not cost a database write.
LAST_USED_RESOLUTION_SECONDS = 60.0
CLUSTER_TOKEN_META_KEY = "cluster_token"
FIRST_ADMIN_USERNAME = "admin"
FIRST_ADMIN_TOKEN_NAME = "first admin (created at first start)"
_USERNAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
MAX_TOKEN_NAME = 100


# -- errors ------------------------------------------------------------------------------------------------


class AuthError(Exception):
    """Base of the errors the HTTP layer maps to a status code."""

    status_code = 400


class Unauthorized(AuthError):
    """No credentials, or credentials that are not valid: 401."""

    status_code = 401


class Forbidden(AuthError):
    """Valid credentials, but this principal may not do this: 403."""

    status_code = 403


# -- roles and principals ----------------------------------------------------------------------------------


class Role(enum.StrEnum):
    VIEWER = "viewer"
    USER = "user"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def at_least(self, minimum: Role | str) -> bool:
        return self.rank >= parse_role(minimum).rank


_RANK = {Role.VIEWER: 0, Role.USER: 1, Role.OPERATOR: 2, Role.ADMIN: 3}


def parse_role(value: Role | str) -> Role:
    try:
        return Role(value)
    except ValueError:
        raise ValueError(f"unknown role {value!r}: expected one of viewer, user, operator, admin") from None


@attrs.frozen
class Principal:
    """An authenticated caller. ``token_id`` is None for principals not made from an API token."""

    user_id: int
    username: str
    role: Role = attrs.field(converter=parse_role)
    token_id: int | None = None

    def at_least(self, minimum: Role | str) -> bool:
        return self.role.at_least(minimum)


# -- authorization helpers ---------------------------------------------------------------------------------


class TaskAction(enum.StrEnum):
    VIEW = "view"  # details, logs, status, listing
    CONTROL = "control"  # kill, pause, resume, stop, restart, snapshot
    REACH = "reach"  # port forward, SSH proxy, terminal, file access: code runs or data flows


def require_role(principal: Principal | None, minimum: Role | str) -> Principal:
    """Return ``principal`` if it has at least ``minimum``, else raise ``Unauthorized`` / ``Forbidden``."""
    if principal is None:
        raise Unauthorized("authentication required: send 'Authorization: Bearer <token>'")
    minimum = parse_role(minimum)
    if not principal.at_least(minimum):
        raise Forbidden(
            f"this needs role {minimum.value} or higher; {principal.username} is {principal.role.value}"
        )
    return principal


def can_act_on_task(principal: Principal | None, owner_id: int | None, action: TaskAction | str) -> bool:
    """Whether ``principal`` may perform ``action`` on a task owned by ``owner_id`` (None: nobody's)."""
    if principal is None:
        return False
    action = TaskAction(action)
    if principal.at_least(Role.OPERATOR):
        return True
    own = owner_id is not None and owner_id == principal.user_id
    if action is TaskAction.VIEW:
        return own
    return own and principal.at_least(Role.USER)


def can_see_task(principal: Principal | None, owner_id: int | None) -> bool:
    return can_act_on_task(principal, owner_id, TaskAction.VIEW)


def require_task_action(
    principal: Principal | None, owner_id: int | None, action: TaskAction | str
) -> Principal:
    """Raise ``Unauthorized`` without a principal, ``Forbidden`` if the action is not allowed.

    For a task the principal cannot even *see*, prefer answering 404 (check ``can_see_task`` first).
    """
    if principal is None:
        raise Unauthorized("authentication required: send 'Authorization: Bearer <token>'")
    if not can_act_on_task(principal, owner_id, action):
        raise Forbidden(
            f"{principal.username} ({principal.role.value}) may not {TaskAction(action).value} this task"
        )
    return principal


def can_submit(principal: Principal | None) -> bool:
    return principal is not None and principal.at_least(Role.USER)


# -- API tokens --------------------------------------------------------------------------------------------


def new_api_token() -> str:
    """A fresh API token: ``krt_`` + URL-safe base64 of 32 random bytes (43 characters, no padding)."""
    return TOKEN_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(TOKEN_BYTES)).rstrip(b"=").decode(
        "ascii"
    )


def looks_like_api_token(token: object) -> bool:
    return isinstance(token, str) and _TOKEN_RE.fullmatch(token) is not None


def hash_token(token: str) -> str:
    """Hex SHA-256 of a token, the only form in which tokens are stored.

    A fast, unsalted hash is the right tool here, unlike for passwords: a token carries 256 bits from
    ``secrets``, so nobody can brute-force it whatever the hash costs. Slow salted KDFs (bcrypt, argon2) exist
    to protect *guessable* secrets; for tokens they would only add milliseconds to every request and, being
    salted, make lookup by hash impossible. What the hash buys is that a copy of the database (a backup, a
    leaked file) holds no usable credential: SHA-256 cannot be inverted. Looking the hash up through the
    unique index leaks at most timing about *hashes* of an attacker's own guesses, which says nothing useful
    about any stored token.
    """
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _check_token_name(name: str) -> str:
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_TOKEN_NAME or not name.isprintable():
        raise ValueError(f"token name must be 1..{MAX_TOKEN_NAME} printable characters")
    return name.strip()


def check_username(username: str) -> str:
    if not isinstance(username, str) or not _USERNAME_RE.fullmatch(username):
        raise ValueError(
            "username must be 1..64 letters, digits, '_', '.' or '-', and not start with '.' or '-'"
        )
    return username


async def create_user(store: Store, username: str, role: Role | str) -> UserRow:
    """Create an active user; ``store.ConstraintError`` if the name is taken, ``ValueError`` if invalid."""
    return await store.write(WriteTx.create_user, check_username(username), parse_role(role).value)


async def create_token(store: Store, user_id: int, name: str) -> tuple[TokenRow, str]:
    """Create an API token for ``user_id``. Returns the stored row and the plaintext, which is never stored:
    show it once."""
    token = new_api_token()
    row = await store.write(WriteTx.create_token, user_id, _check_token_name(name), hash_token(token))
    return row, token


async def list_tokens(store: Store, user_id: int) -> list[TokenRow]:
    """The user's tokens (hashes only; never the plaintext)."""
    return await store.read(ReadTx.list_tokens, user_id)


async def revoke_token(store: Store, token_id: int, *, owner_id: int | None = None) -> bool:
    """Revoke a token. With ``owner_id`` only that user's token (a user revoking its own); without it, any
    token (an admin). True if a token was active and is revoked now."""
    revoked = await store.write(WriteTx.revoke_token, token_id, user_id=owner_id)
    if revoked:
        log.info("API token %d revoked", token_id)
    return revoked


async def _resolve(store: Store, token: object) -> tuple[TokenRow, UserRow] | None:
    if not looks_like_api_token(token):  # garbage never reaches the database
        return None
    digest = hash_token(token)
    found = await store.read(ReadTx.lookup_token, digest)
    if found is None:
        return None
    row, user = found
    # The index found it by equality already; the constant-time compare keeps the one explicit comparison of
    # secret-derived values in this module free of timing differences.
    if not hmac.compare_digest(row.token_hash.encode("ascii"), digest.encode("ascii")):
        return None
    if row.revoked or not user.is_active:
        return None
    return row, user


async def authenticate(store: Store, token: object, *, now: float | None = None) -> Principal | None:
    """The principal for an API token, or None if it is malformed, unknown, revoked or its user inactive.

    Records use in ``last_used_at`` at most once per ``LAST_USED_RESOLUTION_SECONDS`` per token.
    """
    found = await _resolve(store, token)
    if found is None:
        return None
    row, user = found
    t = store.clock() if now is None else now
    if row.last_used_at is None or t - row.last_used_at >= LAST_USED_RESOLUTION_SECONDS:
        await store.write(WriteTx.touch_token, row.id, now=t, min_interval=LAST_USED_RESOLUTION_SECONDS)
    return Principal(user.id, user.username, user.role, row.id)


def bearer_token(authorization_header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value, or None."""
    if not authorization_header:
        return None
    scheme, _, value = authorization_header.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


# -- cluster token (runners) -------------------------------------------------------------------------------


async def ensure_cluster_token(store: Store) -> str:
    """The cluster's runner-join token, generated (``secrets``) and stored on first use, stable afterwards."""
    candidate = CLUSTER_TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)
    return await store.write(WriteTx.get_or_set_meta, CLUSTER_TOKEN_META_KEY, candidate)


def check_cluster_token(expected: str, presented: object) -> bool:
    """Constant-time comparison of a presented cluster token with the expected one."""
    if not isinstance(presented, str) or not expected:
        return False
    # compare_digest on str only accepts ASCII; compare bytes so odd input is False, not a TypeError.
    return hmac.compare_digest(expected.encode("utf-8"), presented.encode("utf-8", "surrogatepass"))


# -- the first admin and the credentials file --------------------------------------------------------------


@attrs.frozen
class FirstAdminResult:
    """What ``ensure_first_admin`` found or did.

    status: ``created`` (first start: admin and token made, file written), ``valid`` (file present, token
    works), ``missing`` (users exist, no file), ``invalid`` (file present, token does not authenticate),
    ``unreadable`` (file present but not a credentials JSON).
    """

    status: str
    credentials_path: pathlib.Path
    username: str | None = None


def write_credentials_file(path: str | os.PathLike[str], data: dict[str, Any]) -> None:
    """Write ``data`` as JSON to ``path`` atomically, mode 0600, in a directory created 0700 if missing:
    a reader sees the old file or the complete new one, never a partial or world-readable one."""
    path = pathlib.Path(path).expanduser()
    _publish(_write_temp(path, data), path)


def _write_temp(path: pathlib.Path, data: dict[str, Any]) -> pathlib.Path:
    if path.parent.exists() and path.parent.stat().st_mode & 0o077:
        log.warning("%s is accessible to other users; the credentials file itself is 0600", path.parent)
    payload = (json.dumps(data, indent=2) + "\n").encode("utf-8")
    return stage_file(path, payload, parent_mode=0o700)


def _publish(tmp: pathlib.Path, path: pathlib.Path) -> None:
    publish_file(tmp, path, sync_dir=True)


def read_credentials_file(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The credentials JSON at ``path``; None if missing; ``ValueError`` if it is not a credentials file."""
    path = pathlib.Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("token"), str):
        raise ValueError(f"{path} has no 'token' string")
    return data


async def ensure_first_admin(
    store: Store, credentials_path: str | os.PathLike[str], host_url: str
) -> FirstAdminResult:
    """On first start (no users at all) create user ``admin`` (role admin) and a token, and write
    ``{"host": host_url, "token": ...}`` to ``credentials_path`` (0600, atomically).

    On later starts never create or overwrite anything: only check the file and log what to do if it is
    missing or its token no longer works. The check "no users" and the creation are one transaction, so two
    hosts starting on one database cannot both create an admin.
    """
    path = pathlib.Path(credentials_path).expanduser()
    if await store.read(ReadTx.count_users) == 0:
        token = new_api_token()
        # Write the temporary file first: if that fails (read-only home, full disk) no admin exists whose
        # token nobody knows, and the next start tries again.
        tmp = await trio.to_thread.run_sync(_write_temp, path, {"host": host_url, "token": token})
        try:
            created = await store.write(
                WriteTx.create_first_admin, FIRST_ADMIN_USERNAME, FIRST_ADMIN_TOKEN_NAME, hash_token(token)
            )
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(lambda: tmp.unlink(missing_ok=True))
            raise
        if created is None:  # another process made the first user meanwhile
            await trio.to_thread.run_sync(lambda: tmp.unlink(missing_ok=True))
        else:
            try:
                await trio.to_thread.run_sync(_publish, tmp, path)
            except OSError as exc:
                log.error("admin token created, but not moved to %s (%s); it is in %s (0600)", path, exc, tmp)
                raise
            log.info(
                "first start: created user %r (admin), API token in %s (0600)", FIRST_ADMIN_USERNAME, path
            )
            return FirstAdminResult("created", path, FIRST_ADMIN_USERNAME)

    hint = (
        "an admin can create a new token with `kr token create --admin` on the host machine, or use an "
        "existing admin token"
    )
    try:
        data = await trio.to_thread.run_sync(read_credentials_file, path)
    except (OSError, ValueError) as exc:
        log.warning("cannot use the credentials file %s: %s; %s", path, exc, hint)
        return FirstAdminResult("unreadable", path)
    if data is None:
        log.info("no credentials file at %s (users already exist, nothing created); %s", path, hint)
        return FirstAdminResult("missing", path)
    mode = await trio.to_thread.run_sync(lambda: stat.S_IMODE(path.stat().st_mode))
    if mode & 0o077:
        log.warning("credentials file %s has mode %o; it should be 0600 (chmod 600 %s)", path, mode, path)
    found = await _resolve(store, data["token"])
    if found is None:
        log.warning(
            "the token in %s is not valid for this cluster (revoked, or another database); %s", path, hint
        )
        return FirstAdminResult("invalid", path)
    return FirstAdminResult("valid", path, found[1].username)


async def issue_admin_credentials(
    store: Store,
    credentials_path: str | os.PathLike[str],
    host_url: str,
    *,
    username: str = FIRST_ADMIN_USERNAME,
) -> TokenRow:
    """Recovery path for a lost credentials file (``kr token create --admin`` on the host machine): a new
    token for the existing active admin ``username``, written to ``credentials_path`` like the first one.
    Whoever can run this can read the host's database anyway, so it grants nothing new."""
    user = await store.read(ReadTx.get_user_by_name, username)
    if user is None or not user.is_active or user.role != Role.ADMIN:
        raise ValueError(f"{username!r} is not an active admin user")
    row, token = await create_token(store, user.id, "admin credentials (reissued)")
    try:
        await trio.to_thread.run_sync(
            write_credentials_file, credentials_path, {"host": host_url, "token": token}
        )
    except BaseException:
        with trio.CancelScope(shield=True):  # nobody will ever know this token: do not leave it valid
            await store.write(WriteTx.revoke_token, row.id)
        raise
    log.info("new API token %d for %r written to %s", row.id, username, credentials_path)
    return row
