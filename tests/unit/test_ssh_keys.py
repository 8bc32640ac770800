"""``kohakuriver_cli.ssh_keys``: Ed25519 keys made with ``cryptography``, private key files 0600 written
atomically and never overwritten by accident, the user's default public key."""

from __future__ import annotations

import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kohakuriver_cli.ssh_keys import (
    SshKeyError,
    default_private_key_path,
    default_public_key,
    generate_ed25519,
    write_private_key,
)
from kohakuriver_proto.models import check_ssh_public_key


def test_generated_pair_parses_back_and_matches():
    private, public = generate_ed25519(42)
    assert private.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----\n")
    key = serialization.load_ssh_private_key(private, password=None)
    assert isinstance(key, Ed25519PrivateKey)
    kind, blob, comment = public.split(" ")
    assert (kind, comment) == ("ssh-ed25519", "kohakuriver-42")
    derived = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    assert derived.decode() == f"{kind} {blob}"
    loaded = serialization.load_ssh_public_key(f"{kind} {blob}".encode())
    assert loaded == key.public_key()
    check_ssh_public_key(public)  # what the host will accept


def test_each_call_makes_a_new_key_and_comments_are_checked():
    assert generate_ed25519()[1] != generate_ed25519()[1]
    assert generate_ed25519()[1].endswith(" kohakuriver")
    assert generate_ed25519(comment="me@laptop")[1].endswith(" me@laptop")
    with pytest.raises(ValueError):
        generate_ed25519(comment="two words")
    with pytest.raises(ValueError):
        generate_ed25519(comment="line\nbreak")


def test_private_key_file_is_0600_and_not_overwritten(tmp_path):
    private, _ = generate_ed25519(7)
    path = tmp_path / "new-dir" / "kohakuriver_7"
    assert write_private_key(path, private) == path
    assert path.read_bytes() == private
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    with pytest.raises(SshKeyError, match="already exists"):
        write_private_key(path, b"other")
    assert path.read_bytes() == private
    write_private_key(path, b"replaced", overwrite=True)
    assert path.read_bytes() == b"replaced"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["kohakuriver_7"]  # no temp files left


def test_private_key_file_is_0600_whatever_the_umask(tmp_path):
    import os

    old = os.umask(0)
    try:
        path = write_private_key(tmp_path / "k", b"secret")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_write_error_names_the_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(SshKeyError, match=r"cannot write the private key to .*file/k"):
        write_private_key(blocker / "k", b"x")


def test_default_public_key_order_and_validation(tmp_path):
    assert default_public_key(tmp_path) is None
    rsa_line = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 me@box"
    # a truncated but well-typed RSA blob still has to decode and name its type
    _, ed_line = generate_ed25519(comment="me@box")
    (tmp_path / "id_rsa.pub").write_text(ed_line.replace("ssh-ed25519", "ssh-rsa", 1) + "\n")
    with pytest.raises(SshKeyError, match="does not match its type"):
        default_public_key(tmp_path)
    (tmp_path / "id_rsa.pub").write_text(
        rsa_line.replace("AAAAB3NzaC1yc2EAAAADAQABAAABAQC7", _rsa_blob()) + "\n"
    )
    path, line = default_public_key(tmp_path)
    assert path.name == "id_rsa.pub" and line.startswith("ssh-rsa ")
    (tmp_path / "id_ed25519.pub").write_text(ed_line + "\n")
    assert default_public_key(tmp_path) == (tmp_path / "id_ed25519.pub", ed_line)
    (tmp_path / "id_ed25519.pub").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    with pytest.raises(SshKeyError, match="private key"):
        default_public_key(tmp_path)


def test_default_paths_follow_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_private_key_path(42) == tmp_path / ".ssh" / "kohakuriver_42"
    assert default_public_key() is None
    (tmp_path / ".ssh").mkdir()
    _, line = generate_ed25519()
    (tmp_path / ".ssh" / "id_ed25519.pub").write_text(line)
    assert default_public_key() == (tmp_path / ".ssh" / "id_ed25519.pub", line)


def _rsa_blob() -> str:
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return line.decode().split(" ")[1]
