"""SSH keys on the user's machine: fresh Ed25519 key pairs (``cryptography``, never ``ssh-keygen`` through a
shell), private key files written 0600, and the user's default public key for ``kr vps create``.

- ``generate_ed25519(task_id)`` -> ``(private key in OpenSSH format, public key line)``; the public line's
  comment is ``kohakuriver-<task id>`` (the OpenSSH private format written by ``cryptography`` carries no
  comment).
- ``write_private_key(path, data)``: created 0600 through a temporary file and a rename, so a crash never
  leaves a half-written or world-readable key; an existing file is kept unless ``overwrite=True``.
- ``default_public_key()``: ``~/.ssh/id_ed25519.pub``, ``id_ecdsa.pub``, ``id_rsa.pub``, the first that
  exists, validated as one OpenSSH public key line.
"""

from __future__ import annotations

import os
from pathlib import Path

from kohakuriver_proto.errors import ValidationError

#: Searched in this order: the modern key types first.
DEFAULT_PUBLIC_KEY_NAMES = ("id_ed25519.pub", "id_ecdsa.pub", "id_rsa.pub")
KEY_COMMENT_PREFIX = "kohakuriver"


class SshKeyError(Exception):
    """A key file cannot be written or read; the message names the file and says why."""


def key_comment(task_id: int | str | None = None) -> str:
    return KEY_COMMENT_PREFIX if task_id is None else f"{KEY_COMMENT_PREFIX}-{task_id}"


def default_private_key_path(task_id: int | str) -> Path:
    """Where ``kr vps create --gen-ssh-key`` saves the key and ``kr ssh`` looks for it by default."""
    return Path.home() / ".ssh" / f"kohakuriver_{task_id}"


def generate_ed25519(task_id: int | str | None = None, *, comment: str | None = None) -> tuple[bytes, str]:
    """A new Ed25519 key pair: ``(OpenSSH private key, "ssh-ed25519 <base64> <comment>")``.

    The comment is ``kohakuriver-<task_id>`` (``kohakuriver`` without an id) unless ``comment`` is given.
    """
    # Imported here: cryptography costs tens of milliseconds at every `kr` start otherwise.
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    comment = key_comment(task_id) if comment is None else comment
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in comment):
        raise ValueError("a key comment must be printable, without spaces or line breaks")
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    line = public.decode("ascii") + (f" {comment}" if comment else "")
    return private, line


def write_private_key(path: str | os.PathLike[str], data: bytes, *, overwrite: bool = False) -> Path:
    """Write ``data`` to ``path`` with mode 0600, atomically. ``SshKeyError`` if the file exists (and
    ``overwrite`` is False) or cannot be written. The parent directory is created 0700 when missing."""
    # Here, not at the top: ``kr ssh`` imports this module for ``default_private_key_path`` alone, and the
    # writer's imports (secrets, hashlib) would cost it ~4 ms.
    from kohakuriver_net.atomic_file import write_file_atomic

    path = Path(path).expanduser()
    exists = SshKeyError(f"{path} already exists: not overwriting a key (choose another path)")
    if path.exists() and not overwrite:
        raise exists
    try:
        # exclusive (link, not rename) unless asked to overwrite: never replace a key someone just wrote.
        write_file_atomic(path, data, exclusive=not overwrite, parent_mode=0o700)
    except FileExistsError:
        raise exists from None
    except OSError as exc:
        raise SshKeyError(f"cannot write the private key to {path}: {exc.strerror or exc}") from None
    return path


def read_public_key(path: str | os.PathLike[str]) -> str:
    """The one public key line in ``path``, validated; ``SshKeyError`` naming the file otherwise."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SshKeyError(f"cannot read the public key {path}: {exc}") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) != 1:
        raise SshKeyError(f"{path} must hold exactly one public key line, it has {len(lines)}")
    try:
        from kohakuriver_proto.models import check_ssh_public_key  # (cattrs: only when a key is read)

        check_ssh_public_key(lines[0], str(path))
    except ValidationError as exc:
        raise SshKeyError(str(exc)) from None
    return lines[0]


def default_public_key(ssh_dir: str | os.PathLike[str] | None = None) -> tuple[Path, str] | None:
    """``(path, key line)`` of the user's default public key, or None when there is none.

    The first of ``id_ed25519.pub``, ``id_ecdsa.pub``, ``id_rsa.pub`` in ``~/.ssh`` that exists; an
    existing but invalid file raises ``SshKeyError`` rather than silently trying the next one.
    """
    base = Path(ssh_dir).expanduser() if ssh_dir is not None else Path.home() / ".ssh"
    for name in DEFAULT_PUBLIC_KEY_NAMES:
        path = base / name
        if path.is_file():
            return path, read_public_key(path)
    return None
