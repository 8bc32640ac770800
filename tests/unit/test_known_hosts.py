"""kohakuriver_cli.known_hosts: pinning VPS host keys in kohakuriver's own known_hosts file."""

from __future__ import annotations

import stat

import pytest

from kohakuriver_cli.known_hosts import (
    KeyUnavailable,
    changed_key_hint,
    host_key_options,
    key_from_answer,
    known_hosts_path,
    pin,
    pinned_key,
    ssh_file_value,
    ssh_options,
)

KEY_A = "ssh-ed25519 " + "A" * 68
KEY_B = "ssh-ed25519 " + "B" * 68


def test_pin_writes_once_and_never_replaces(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KOHAKURIVER_HOME", str(tmp_path / "home"))
    path = known_hosts_path()
    assert pinned_key("kohakuriver-1") is None
    assert pin("kohakuriver-1", KEY_A + " comment")
    assert pin("kohakuriver-1", KEY_A)  # the same key again: nothing to do
    assert pin("kohakuriver-2", KEY_B)
    assert not pin("kohakuriver-1", KEY_B)  # a changed key is left for ssh to refuse
    assert pinned_key("kohakuriver-1") == KEY_A and pinned_key("kohakuriver-2") == KEY_B
    assert path.read_text() == f"kohakuriver-1 {KEY_A}\nkohakuriver-2 {KEY_B}\n"
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_reading_skips_what_it_does_not_understand(tmp_path) -> None:
    path = tmp_path / "known_hosts"
    path.write_text(
        f"# comment\n|1|hashed= {KEY_B}\n@revoked kohakuriver-3 {KEY_B}\nbroken\nx,kohakuriver-3 {KEY_A}"
    )
    assert pinned_key("kohakuriver-3", path) == KEY_A
    assert pin("kohakuriver-4", KEY_B, path)  # appended after a last line without a newline
    assert pinned_key("kohakuriver-4", path) == KEY_B and pinned_key("kohakuriver-3", path) == KEY_A


def test_ssh_options_check_strictly_against_the_file(tmp_path) -> None:
    options = ssh_options("kohakuriver-7", tmp_path / "kh")
    assert options == [
        f"UserKnownHostsFile={tmp_path / 'kh'}",
        "HostKeyAlias=kohakuriver-7",
        "StrictHostKeyChecking=yes",
    ]
    assert not any("StrictHostKeyChecking=no" in o for o in options)


def test_host_key_options_pins_once_and_warns_when_the_key_cannot_be_had(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KOHAKURIVER_HOME", str(tmp_path))
    fetched: list[str] = []
    warnings: list[str] = []

    def fetch() -> str:
        fetched.append("x")
        return KEY_A

    def unavailable() -> str:
        raise KeyUnavailable("VPS 2 has no host key yet (HTTP 409)")

    expected = ssh_options("kohakuriver-1", tmp_path / "known_hosts")
    assert host_key_options(1, "kohakuriver-1", fetch, warnings.append) == expected
    assert host_key_options(1, "kohakuriver-1", fetch, warnings.append) == expected
    assert fetched == ["x"] and warnings == []  # the second run read the file only
    assert host_key_options(2, "kohakuriver-2", unavailable, warnings.append) is None
    assert warnings == [
        "kr ssh: cannot pin the host key of VPS 2 (VPS 2 has no host key yet (HTTP 409)); "
        "ssh checks it the usual way"
    ]


def test_changed_key_hint_only_for_a_key_the_host_changed(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KOHAKURIVER_HOME", str(tmp_path))

    def unavailable() -> str:
        raise KeyUnavailable("offline")

    assert changed_key_hint(3, "kohakuriver-3", lambda: KEY_B) is None  # nothing pinned
    pin("kohakuriver-3", KEY_A)
    assert changed_key_hint(3, "kohakuriver-3", lambda: KEY_A) is None  # ssh failed for another reason
    assert changed_key_hint(3, "kohakuriver-3", unavailable) is None
    hint = changed_key_hint(3, "kohakuriver-3", lambda: KEY_B)
    assert hint is not None and "\n" not in hint
    assert str(tmp_path / "known_hosts") in hint and "re-created node" in hint


def test_key_from_answer_takes_one_ed25519_key_only() -> None:
    assert key_from_answer({"task_id": "1", "host_key": KEY_A}) == KEY_A
    for bad in [
        None,
        [],
        {},
        {"host_key": KEY_A + "\n" + KEY_B},
        {"host_key": "ssh-rsa AAAA"},
        {"host_key": 1},
    ]:
        with pytest.raises(KeyUnavailable):
            key_from_answer(bad)


def test_file_names_ssh_cannot_take_are_refused(tmp_path) -> None:
    assert ssh_file_value(tmp_path / "a b%" / "kh") == f'"{tmp_path}/a b%%/kh"'
    with pytest.raises(ValueError):
        ssh_file_value(tmp_path / 'a"b')
