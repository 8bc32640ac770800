"""The runner's tunnel key file and the per-container secrets derived from it."""

from __future__ import annotations

import hashlib
import hmac
import stat

import pytest

from kohakuriver_runner.tunnel_secret import (
    KEY_FILE,
    KEY_SIZE,
    TunnelKeyError,
    container_secret,
    load_or_create_key,
    secret_matches,
)


def test_key_is_created_private_once_and_read_back(tmp_path):
    state = tmp_path / "state" / "nested"
    key = load_or_create_key(state)
    assert len(key) == KEY_SIZE
    path = state / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_key(state) == key  # a restarted runner gets the same key
    assert [p.name for p in state.iterdir()] == [KEY_FILE]  # no temporary file left behind
    assert load_or_create_key(tmp_path / "other") != key


def test_a_damaged_key_file_is_refused_not_replaced(tmp_path):
    (tmp_path / KEY_FILE).write_bytes(b"short")
    with pytest.raises(TunnelKeyError, match="5 bytes"):
        load_or_create_key(tmp_path)
    assert (tmp_path / KEY_FILE).read_bytes() == b"short"


def test_secret_is_hmac_sha256_of_the_container_name():
    key = bytes(range(32))
    secret = container_secret(key, "kohakuriver-task-42")
    assert secret == hmac.new(key, b"kohakuriver-task-42", hashlib.sha256).hexdigest()
    assert len(secret) == 64
    assert container_secret(key, "kohakuriver-task-42") == secret  # deterministic
    assert container_secret(key, "kohakuriver-task-43") != secret
    assert container_secret(bytes(32), "kohakuriver-task-42") != secret


def test_secret_matches_only_that_containers_secret():
    key = bytes(range(32))
    secret = container_secret(key, "kohakuriver-task-1")
    assert secret_matches(key, "kohakuriver-task-1", secret)
    assert not secret_matches(key, "kohakuriver-task-2", secret)
    assert not secret_matches(key, "kohakuriver-task-1", secret[:-1])
    assert not secret_matches(key, "kohakuriver-task-1", "")
    assert not secret_matches(key, "kohakuriver-task-1", "é" * 64)  # non-ASCII input is just wrong
