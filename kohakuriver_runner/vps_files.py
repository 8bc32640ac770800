"""The files the runner puts into a Docker VPS before it starts, and the VPS's SSH host key.

Why files and not a setup script: the upstream runner built a ``/bin/sh -c`` string with the user's public key
in it and installed openssh from the network at every start. Here nothing runs in the container but sshd: the
runner uploads a tar archive (made in memory, ``PUT /containers/{id}/archive``) into the created, not yet
started container, holding

- ``/root/.ssh/authorized_keys`` (0600, directory 0700, owned by root) with the user's public key, for the
  key modes that carry one;
- the VPS's own Ed25519 host key (0600), generated once by the runner with ``cryptography`` and kept in the
  runner's state directory, so the VPS's host identity survives a stop and re-create (users' known_hosts
  stay valid);
- ``/run/sshd``, the privilege-separation directory sshd insists on (0755, root).

``build_archive`` is pure (tests read the archive back); ``HostKeyStore`` touches the disk and is called
through ``trio.to_thread``.
"""

from __future__ import annotations

import io
import os
import tarfile
import time
from pathlib import Path

import attrs
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kohakuriver_net.atomic_file import write_file_atomic

from .docker_api import DockerClient, NotFound

__all__ = [
    "AUTHORIZED_KEYS",
    "HOST_KEY_PATH",
    "PRIVSEP_DIR",
    "SSHD",
    "HostKeyStore",
    "SshdMissing",
    "VpsFile",
    "build_archive",
    "generate_host_key",
    "install_vps_files",
    "public_host_key",
    "vps_files",
]

SSHD = "/usr/sbin/sshd"
AUTHORIZED_KEYS = "/root/.ssh/authorized_keys"
#: Outside the image's usual ``ssh_host_*`` names: the image's own keys (if any) are left alone, and sshd
#: is told to use this one with ``-h``.
HOST_KEY_PATH = "/etc/ssh/kohakuriver_host_ed25519_key"
PRIVSEP_DIR = "/run/sshd"


class SshdMissing(Exception):
    """The VPS's image has no sshd where the runner starts it."""


@attrs.frozen
class VpsFile:
    """One entry of the archive: an absolute container path, its mode, and content (``None`` = directory)."""

    path: str
    mode: int
    content: bytes | None = None

    def __attrs_post_init__(self) -> None:
        parts = self.path.split("/")
        if not self.path.startswith("/") or any(p in ("", ".", "..") for p in parts[1:]):
            raise ValueError(f"not a clean absolute path: {self.path!r}")


def vps_files(public_key: str | None, host_key: bytes | None) -> list[VpsFile]:
    """What goes into a VPS: the key (if any), the host key (if any) and sshd's runtime directory."""
    files = [VpsFile(PRIVSEP_DIR, 0o755)]
    if host_key is not None:
        files.append(VpsFile(HOST_KEY_PATH, 0o600, host_key))
    if public_key is not None:
        line = public_key.strip() + "\n"
        files.append(VpsFile(os.path.dirname(AUTHORIZED_KEYS), 0o700))
        files.append(VpsFile(AUTHORIZED_KEYS, 0o600, line.encode()))
    return files


def build_archive(files: list[VpsFile], *, mtime: int = 0) -> bytes:
    """A tar archive to extract at ``/`` holding ``files`` (root-owned, with their modes).

    Only the entries listed are written: parent directories that already exist in the image keep their
    modes (``/root`` must stay private for sshd's StrictModes), missing ones are created by the engine.
    """
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for f in files:
            info = tarfile.TarInfo(f.path.lstrip("/"))
            info.mode = f.mode
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mtime = mtime
            if f.content is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(f.content)
                tar.addfile(info, io.BytesIO(f.content))
    return buf.getvalue()


def generate_host_key() -> bytes:
    """A new Ed25519 private key in OpenSSH format (what sshd reads with ``-h``)."""
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )


class HostKeyStore:
    """Per-VPS host keys under ``<state_dir>/vps-host-keys/<task_id>`` (0600; blocking calls)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path(self, task_id: int) -> Path:
        return self.root / str(int(task_id))

    def get_or_create(self, task_id: int) -> bytes:
        """The VPS's host key, generated on first use."""
        path = self.path(task_id)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            pass
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = generate_host_key()
        write_file_atomic(path, key)  # 0600 from the start: the key is never readable by others
        return key

    def public_key(self, task_id: int) -> str | None:
        """The VPS's public host key as a known_hosts key (``ssh-ed25519 AAAA...``), None before its first
        creation. Users pin it (``kr ssh``), so it is the key's own public half, never a guess."""
        try:
            private = self.path(task_id).read_bytes()
        except FileNotFoundError:
            return None
        return public_host_key(private)


def public_host_key(private: bytes) -> str:
    """``ssh-ed25519 AAAA...`` of an OpenSSH private key made by ``generate_host_key``."""
    key = serialization.load_ssh_private_key(private, password=None)
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )


async def install_vps_files(
    docker: DockerClient,
    container: str,
    *,
    image: str,
    public_key: str | None,
    host_keys: HostKeyStore,
    task_id: int,
) -> None:
    """Check the created (not started) container has sshd, then upload the files of ``vps_files``.

    The check is a stat through the archive API (nothing runs in the container): an image without sshd
    fails here with a reason a user can act on, instead of a container that exits 127.
    """
    try:
        found = await docker.stat_path(container, SSHD)
    except NotFound:
        found = None
    if found is None or found.is_dir:
        raise SshdMissing(
            f"image {image} has no {SSHD}; build an SSH-ready image with scripts/images/sshd.sh "
            "(or create the VPS without SSH)"
        )
    host_key = await trio.to_thread.run_sync(host_keys.get_or_create, task_id)
    archive = build_archive(vps_files(public_key, host_key), mtime=int(time.time()))
    await docker.put_archive(container, "/", archive)
