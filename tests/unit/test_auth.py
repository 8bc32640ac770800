"""Auth: tokens hashed at rest, revocation, roles and task permissions, the first admin's credentials file."""

from __future__ import annotations

import json
import logging
import os
import stat

import pytest

from kohakuriver_host import auth
from kohakuriver_host.auth import Forbidden, Principal, Role, TaskAction, Unauthorized
from kohakuriver_host.store import ConstraintError, ReadTx, WriteTx, open_store

HOST = "http://127.0.0.1:8000"


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def s(tmp_path):
    async with open_store(tmp_path / "db" / "host.db", clock=FakeClock()) as st:
        yield st


# -- tokens ------------------------------------------------------------------------------------------------


def test_token_format_and_hash():
    a, b = auth.new_api_token(), auth.new_api_token()
    assert a != b
    assert a.startswith("krt_") and len(a) == 4 + 43 and auth.looks_like_api_token(a)
    assert auth.hash_token(a) != a and len(auth.hash_token(a)) == 64
    assert not auth.looks_like_api_token("krt_short") and not auth.looks_like_api_token(None)


async def test_authenticate_and_no_plaintext_at_rest(s, tmp_path):
    user = await auth.create_user(s, "alice", "user")
    row, token = await auth.create_token(s, user.id, "laptop")
    assert row.token_hash == auth.hash_token(token)
    p = await auth.authenticate(s, token)
    assert p == Principal(user.id, "alice", Role.USER, row.id)
    # neither the database nor its WAL holds the token, only its hash
    blobs = b"".join(f.read_bytes() for f in (tmp_path / "db").iterdir() if f.is_file())
    assert token.encode() not in blobs and token[4:].encode() not in blobs
    assert auth.hash_token(token).encode() in blobs
    assert all(token not in repr(t) for t in await auth.list_tokens(s, user.id))


async def test_garbage_unknown_revoked_and_inactive_do_not_authenticate(s):
    user = await auth.create_user(s, "alice", "user")
    row, token = await auth.create_token(s, user.id, "laptop")
    for bad in (None, "", "Bearer x", token[:-1], token + "A", auth.new_api_token(), "krc_" + token[4:], 42):
        assert await auth.authenticate(s, bad) is None
    assert not await auth.revoke_token(s, row.id, owner_id=user.id + 1)  # someone else's: refused
    assert await auth.authenticate(s, token) is not None
    assert await auth.revoke_token(s, row.id, owner_id=user.id)
    assert await auth.authenticate(s, token) is None

    _, token2 = await auth.create_token(s, user.id, "desktop")
    await s.write(WriteTx.update_user, user.id, is_active=False)
    assert await auth.authenticate(s, token2) is None


async def test_last_used_is_written_at_most_once_a_minute(s):
    clock = s.clock
    user = await auth.create_user(s, "alice", "user")
    row, token = await auth.create_token(s, user.id, "laptop")
    assert (await s.read(ReadTx.get_token, row.id)).last_used_at is None
    await auth.authenticate(s, token)
    first = clock.now
    assert (await s.read(ReadTx.get_token, row.id)).last_used_at == first
    clock.now += 59
    await auth.authenticate(s, token)
    assert (await s.read(ReadTx.get_token, row.id)).last_used_at == first
    clock.now += 2
    await auth.authenticate(s, token)
    assert (await s.read(ReadTx.get_token, row.id)).last_used_at == clock.now


async def test_user_and_token_validation(s):
    with pytest.raises(ValueError, match="role"):
        await auth.create_user(s, "bob", "root")
    with pytest.raises(ValueError, match="username"):
        await auth.create_user(s, "-bob", "user")
    await auth.create_user(s, "bob", "user")
    with pytest.raises(ConstraintError):
        await auth.create_user(s, "bob", "viewer")
    with pytest.raises(ValueError, match="name"):
        await auth.create_token(s, 1, "")


def test_bearer_header_parsing():
    assert auth.bearer_token("Bearer krt_abc") == "krt_abc"
    assert auth.bearer_token("bearer   krt_abc ") == "krt_abc"
    assert auth.bearer_token("Basic xyz") is None
    assert auth.bearer_token("Bearer") is None
    assert auth.bearer_token(None) is None


# -- roles and permissions ---------------------------------------------------------------------------------


def test_role_hierarchy():
    order = [Role.VIEWER, Role.USER, Role.OPERATOR, Role.ADMIN]
    for i, low in enumerate(order):
        for j, high in enumerate(order):
            assert high.at_least(low) == (j >= i)
    with pytest.raises(ValueError):
        auth.parse_role("anonymous")


def test_require_role():
    viewer = Principal(1, "v", "viewer")
    admin = Principal(2, "a", "admin")
    with pytest.raises(Unauthorized):
        auth.require_role(None, Role.VIEWER)
    with pytest.raises(Forbidden, match="operator"):
        auth.require_role(viewer, "operator")
    assert auth.require_role(admin, "operator") is admin
    assert Unauthorized.status_code == 401 and Forbidden.status_code == 403


@pytest.mark.parametrize(
    ("role", "own", "view", "control", "reach"),
    [
        ("viewer", True, True, False, False),
        ("viewer", False, False, False, False),
        ("user", True, True, True, True),
        ("user", False, False, False, False),
        ("operator", False, True, True, True),
        ("admin", False, True, True, True),
    ],
)
def test_task_permissions(role, own, view, control, reach):
    p = Principal(7, "p", role)
    owner = 7 if own else 8
    assert auth.can_see_task(p, owner) is view
    assert auth.can_act_on_task(p, owner, TaskAction.CONTROL) is control
    assert auth.can_act_on_task(p, owner, "reach") is reach
    if not control:
        with pytest.raises(Forbidden):
            auth.require_task_action(p, owner, TaskAction.CONTROL)


def test_ownerless_tasks_and_anonymous():
    assert not auth.can_see_task(Principal(1, "u", "user"), None)
    assert auth.can_see_task(Principal(1, "o", "operator"), None)
    assert not auth.can_see_task(None, 1)
    with pytest.raises(Unauthorized):
        auth.require_task_action(None, 1, TaskAction.VIEW)
    assert auth.can_submit(Principal(1, "u", "user")) and not auth.can_submit(Principal(1, "v", "viewer"))


# -- cluster token -----------------------------------------------------------------------------------------


async def test_cluster_token_is_stable_and_compared_safely(s):
    token = await auth.ensure_cluster_token(s)
    assert token.startswith("krc_") and len(token) > 40
    assert await auth.ensure_cluster_token(s) == token
    assert auth.check_cluster_token(token, token)
    assert not auth.check_cluster_token(token, token[:-1])
    assert not auth.check_cluster_token(token, None)
    assert not auth.check_cluster_token(token, "é\udc80")  # non-ASCII / surrogates: False, not TypeError
    assert not auth.check_cluster_token("", "")


# -- first admin -------------------------------------------------------------------------------------------


async def test_first_start_creates_admin_and_a_private_credentials_file(s, tmp_path):
    cred = tmp_path / "home" / ".kohakuriver" / "credentials.json"
    result = await auth.ensure_first_admin(s, cred, HOST)
    assert result.status == "created" and result.username == "admin"
    assert stat.S_IMODE(cred.stat().st_mode) == 0o600
    assert stat.S_IMODE(cred.parent.stat().st_mode) == 0o700
    data = json.loads(cred.read_text())
    assert data["host"] == HOST
    p = await auth.authenticate(s, data["token"])
    assert p is not None and p.username == "admin" and p.role is Role.ADMIN
    assert [f.name for f in cred.parent.iterdir()] == ["credentials.json"]  # no temporary file left

    # later starts create nothing and touch nothing
    before = cred.read_bytes()
    assert (await auth.ensure_first_admin(s, cred, HOST)).status == "valid"
    assert cred.read_bytes() == before
    assert len(await s.read(ReadTx.list_users)) == 1


async def test_later_starts_never_create_an_admin(s, tmp_path, caplog):
    cred = tmp_path / "credentials.json"
    await auth.ensure_first_admin(s, cred, HOST)
    token = json.loads(cred.read_text())["token"]

    cred.unlink()
    with caplog.at_level(logging.INFO, logger="kohakuriver.host.auth"):
        assert (await auth.ensure_first_admin(s, cred, HOST)).status == "missing"
    assert "kr token create --admin" in caplog.text
    assert not cred.exists() and len(await s.read(ReadTx.list_users)) == 1

    cred.write_text(json.dumps({"host": HOST, "token": auth.new_api_token()}))
    assert (await auth.ensure_first_admin(s, cred, HOST)).status == "invalid"
    cred.write_text("not json")
    assert (await auth.ensure_first_admin(s, cred, HOST)).status == "unreadable"
    assert len(await s.read(ReadTx.list_users)) == 1 and len(await s.read(ReadTx.list_tokens)) == 1

    # the recovery path issues a new token for the existing admin and rewrites the file
    await auth.issue_admin_credentials(s, cred, HOST)
    new = json.loads(cred.read_text())["token"]
    assert new != token and (await auth.authenticate(s, new)).role is Role.ADMIN
    assert stat.S_IMODE(cred.stat().st_mode) == 0o600


async def test_credentials_file_write_is_atomic(s, tmp_path, monkeypatch):
    cred = tmp_path / "credentials.json"
    cred.write_text('{"host": "old", "token": "old"}')

    def failing_replace(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        auth.write_credentials_file(cred, {"host": HOST, "token": "new"})
    monkeypatch.undo()
    # the old file is untouched; the only other file is the complete, private temporary one
    assert json.loads(cred.read_text())["token"] == "old"
    leftovers = [f for f in tmp_path.iterdir() if f.name != "credentials.json" and f.name != "db"]
    assert len(leftovers) == 1 and stat.S_IMODE(leftovers[0].stat().st_mode) == 0o600
    assert json.loads(leftovers[0].read_text())["token"] == "new"

    auth.write_credentials_file(cred, {"host": HOST, "token": "new"})
    assert json.loads(cred.read_text())["token"] == "new" and stat.S_IMODE(cred.stat().st_mode) == 0o600


async def test_first_admin_is_not_created_when_the_file_cannot_be_written(s, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with pytest.raises(OSError):
        await auth.ensure_first_admin(s, blocker / "credentials.json", HOST)
    assert (
        await s.read(ReadTx.count_users) == 0
    )  # the next start tries again instead of leaving an unknown admin token
