"""The runner's state never lives where tasks can see it; an earlier default location is moved out once."""

from __future__ import annotations

import stat

from kohakuriver_runner.config import RUNNER_SCHEMA
from kohakuriver_runner.state import move_legacy_state


def test_default_state_dir_is_outside_what_tasks_mount(monkeypatch, tmp_path):
    monkeypatch.setenv("KOHAKURIVER_HOME", str(tmp_path / "home"))
    config = RUNNER_SCHEMA.defaults()
    assert config.state_dir == tmp_path / "home" / "runner" / config.hostname
    for mounted in (config.LOCAL_TEMP_DIR, config.SHARED_DIR):
        assert not config.state_dir.is_relative_to(mounted)


def test_legacy_state_is_moved_once_and_made_private(tmp_path):
    legacy = tmp_path / "local" / ".kohakuriver"
    (legacy / "tasks").mkdir(parents=True)
    (legacy / "tunnel.key").write_bytes(b"k" * 32)
    target = tmp_path / "home" / "runner" / "node-a"
    assert move_legacy_state(legacy, target)
    assert not legacy.exists()
    assert (target / "tunnel.key").read_bytes() == b"k" * 32
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    # a second start finds the state where it is now and leaves everything alone
    legacy.mkdir()
    assert not move_legacy_state(legacy, target)
    assert legacy.exists()


def test_nothing_to_move(tmp_path):
    assert not move_legacy_state(tmp_path / "absent", tmp_path / "state")
    assert not (tmp_path / "state").exists()
