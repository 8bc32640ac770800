"""kohakuriver_net.atomic_file: the one writer of private files."""

from __future__ import annotations

import os
import stat

import pytest

from kohakuriver_net.atomic_file import publish_file, stage_file, write_file_atomic


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_new_file_is_private_and_whole(tmp_path) -> None:
    path = tmp_path / "secret"
    write_file_atomic(path, b"one")
    assert path.read_bytes() == b"one"
    assert _mode(path) == 0o600
    write_file_atomic(path, b"two")
    assert path.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["secret"]  # no temporary left behind


def test_mode_and_missing_parent(tmp_path) -> None:
    path = tmp_path / "a" / "b" / "record.json"
    write_file_atomic(path, b"{}", mode=0o644, parent_mode=0o700, sync_dir=True)
    assert _mode(path) == 0o644 & ~_umask()
    assert _mode(path.parent) == 0o700
    with pytest.raises(FileNotFoundError):
        write_file_atomic(tmp_path / "missing" / "x", b"")  # without parent_mode the folder must exist


def test_exclusive_never_replaces(tmp_path) -> None:
    path = tmp_path / "key"
    write_file_atomic(path, b"first", exclusive=True)
    with pytest.raises(FileExistsError):
        write_file_atomic(path, b"second", exclusive=True)
    assert path.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["key"]


def test_a_link_at_the_target_is_replaced_not_followed(tmp_path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    path = tmp_path / "config"
    path.symlink_to(victim)
    write_file_atomic(path, b"new")
    assert victim.read_bytes() == b"keep"
    assert not path.is_symlink() and path.read_bytes() == b"new"


def test_failed_publish_keeps_the_staged_file_for_the_caller(tmp_path) -> None:
    target_dir = tmp_path / "dir"
    target_dir.mkdir()
    (target_dir / "x").write_text("occupied")  # a non-empty folder cannot be replaced by a file
    tmp = stage_file(target_dir, b"token")
    with pytest.raises(OSError):
        publish_file(tmp, target_dir)
    assert tmp.read_bytes() == b"token" and _mode(tmp) == 0o600


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old
