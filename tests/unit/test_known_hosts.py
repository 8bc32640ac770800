"""kohakuriver_cli.known_hosts: pinning VPS host keys in kohakuriver's own known_hosts file."""

from __future__ import annotations

import stat

from kohakuriver_cli.known_hosts import known_hosts_path, pin, pinned_key, ssh_options

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
