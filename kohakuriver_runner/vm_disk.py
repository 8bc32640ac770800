"""VM disks: the base images in ``VM_IMAGES_DIR``, per-VM overlays, and internal qcow2 snapshots.

Base images. ``<name>.qcow2`` is a disk that boots through its own boot loader; ``name`` follows the
environment-name rule (``check_container_name``), other files are skipped with a log line, as are images
``qemu-img`` cannot read (always read as qcow2: a ``.qcow2`` file is never probed, so a raw file under that
name is an error, not a raw disk). Beside it, as ``scripts/images/vm-debian.sh`` writes them, optionally:

- ``<name>.vmlinuz``, ``<name>.initrd``, ``<name>.cmdline`` (one line): a direct boot (``-kernel``,
  ``-initrd``, ``-append``) that skips firmware and boot loader. The kernel and the command line go together
  (a kernel without one has no ``root=``, a command line without a kernel means nothing): when only one of
  them is there, the image is offered without direct boot and a log line says why. The initrd is optional.
- ``<name>.uefi`` (any content, usually empty): the image boots with UEFI (OVMF); without it, BIOS.

Base images must never change in place: an overlay records its base by path, so a rebuilt image under the
same name would silently corrupt every VM made from the old one. A new build gets a new name.

Overlays. ``create_overlay`` makes a VM's disk: qcow2 over the base's absolute path, optionally larger (the
guest grows its root at first boot); never smaller, and never over an existing file (it is made under a
temporary name and linked into place, so a crash leaves no half-made disk at the real name either).

Snapshots are qcow2 internal snapshots of the VM's disk (no RAM: a VM with a virtio-9p share cannot save its
state, so restoring one is a cold boot). Tags are ``kr-<unix seconds>``; a second snapshot within one second
takes the next second, so the tag's seconds (``DiskSnapshot.timestamp``), not ``created_at``, identify a
snapshot. Offline (VM not running: ``qemu-img`` takes the image's write lock, so a running VM makes these
fail rather than corrupt the disk) with ``list_snapshots`` / ``create_snapshot`` / ``delete_snapshot`` /
``apply_snapshot``; online through the VM's QMP socket with ``*_online``, which name the disk by
``DRIVE_ID``, the qcow2 block node ``vm_argv`` defines (QEMU refuses the virtio device's id there).
Restoring is offline only. qcow2 keeps no message with a snapshot, so messages live in
``<disk>.snapshots.json`` beside the disk (written atomically); a snapshot whose message is lost has none.

Everything here but the ``*_online`` functions blocks (subprocesses with a time bound, file reads): the
runner calls them through ``trio.to_thread.run_sync``. The caller serialises the operations on one disk.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from kohakuriver_net.atomic_file import write_file_atomic
from kohakuriver_proto.errors import ValidationError
from kohakuriver_proto.models import VmImageInfo
from kohakuriver_proto.models._fields import check_container_name
from kohakuriver_proto.units import format_size

from . import snapshots
from .qmp_client import QmpClient
from .vm_argv import DISK_NODE, MAX_CMDLINE

__all__ = [
    "DRIVE_ID",
    "IMAGE_SUFFIX",
    "DiskSnapshot",
    "SnapshotNotFound",
    "VmDiskError",
    "VmImage",
    "apply_snapshot",
    "create_overlay",
    "create_snapshot",
    "create_snapshot_online",
    "delete_snapshot",
    "delete_snapshot_online",
    "find_image",
    "list_images",
    "list_snapshots",
    "list_snapshots_online",
    "new_snapshot_tag",
    "new_tag",
]

log = logging.getLogger("kohakuriver.runner.vm_disk")

#: The QMP name of a VM's disk (``vm_argv``'s qcow2 block node) for the ``*_online`` functions.
DRIVE_ID = DISK_NODE

IMAGE_SUFFIX = ".qcow2"
KERNEL_SUFFIX = ".vmlinuz"
INITRD_SUFFIX = ".initrd"
CMDLINE_SUFFIX = ".cmdline"
UEFI_SUFFIX = ".uefi"
MESSAGES_SUFFIX = ".snapshots.json"

QEMU_IMG = "qemu-img"
INFO_TIMEOUT = 30.0
CREATE_TIMEOUT = 60.0
#: Writing or reverting an internal snapshot updates refcounts over the whole image: seconds, more on a
#: big disk on slow storage.
SNAPSHOT_TIMEOUT = 300.0
MAX_MESSAGE = 1024
_TAG_RE = re.compile(r"kr-([0-9]{1,12})")


class VmDiskError(Exception):
    """A disk operation failed; the message says which and quotes qemu-img."""


class SnapshotNotFound(VmDiskError, snapshots.SnapshotNotFound):
    """The disk has no snapshot with that tag (a ``snapshots.SnapshotNotFound``: the API's 404 for both)."""


# -- running qemu-img ----------------------------------------------------------------------------------------


def _qemu_img(args: Sequence[str], *, timeout: float, what: str, qemu_img: str = QEMU_IMG) -> str:
    """Run ``qemu-img args`` (argv, no shell, bounded); its stdout, or ``VmDiskError`` naming ``what``."""
    try:
        done = subprocess.run(
            [qemu_img, *args],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise VmDiskError(f"{what}: qemu-img did not finish within {timeout:g} s") from None
    except OSError as exc:
        raise VmDiskError(f"{what}: cannot run qemu-img: {exc.strerror or exc}") from None
    if done.returncode != 0:
        # All of it: qemu-img's cause is often on one line and its advice on the next ("Failed to get
        # "write" lock" / "Is another process using the image?").
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        detail = " / ".join(lines)[-1000:] if lines else f"exit status {done.returncode}"
        raise VmDiskError(f"{what}: {detail}")
    return done.stdout


def _info(path: Path, what: str) -> dict[str, Any]:
    # -f qcow2: never probe (a raw file must not pass for an image); -U: read even while a VM holds the
    # image (a base under running overlays, or a running VM's disk for its snapshot list).
    out = _qemu_img(
        ["info", "-f", "qcow2", "-U", "--output=json", str(path)], timeout=INFO_TIMEOUT, what=what
    )
    try:
        info = json.loads(out)
    except ValueError:
        raise VmDiskError(f"{what}: qemu-img info gave no JSON") from None
    if not isinstance(info, dict):
        raise VmDiskError(f"{what}: qemu-img info gave {type(info).__name__}, not an object")
    return info


def _int(info: dict[str, Any], key: str, what: str) -> int:
    value = info.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise VmDiskError(f"{what}: qemu-img info has no {key}")
    return value


def _absolute(path: str | os.PathLike[str]) -> Path:
    # Absolute paths only reach qemu-img: a relative name like "nbd:..." would be read as a protocol.
    return Path(os.path.abspath(os.fspath(path)))


# -- base images ---------------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class VmImage:
    """A base image and what boots it."""

    name: str
    path: Path
    format: str
    virtual_size_bytes: int
    file_size_bytes: int  # what the file takes on disk (qemu-img's actual-size)
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str | None = None
    firmware: str = "bios"  # "bios" | "uefi"

    @property
    def direct_boot(self) -> bool:
        return self.kernel is not None

    def to_info(self) -> VmImageInfo:
        return VmImageInfo(
            name=self.name,
            virtual_size_bytes=self.virtual_size_bytes,
            file_size_bytes=self.file_size_bytes,
            format=self.format,
            direct_boot=self.direct_boot,
            firmware=self.firmware,
        )


def _read_cmdline(path: Path) -> str | None:
    """The one line of ``<name>.cmdline``, or ``None`` (logged) when it is not one usable line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("VM image: cannot read %s (%s); no direct boot", path, exc)
        return None
    text = text.rstrip("\n")
    if not text.strip() or "\n" in text or "\x00" in text or len(text.encode()) > MAX_CMDLINE:
        log.warning("VM image: %s is not one line of at most %d bytes; no direct boot", path, MAX_CMDLINE)
        return None
    return text


def _direct_boot(directory: Path, name: str) -> tuple[Path | None, Path | None, str | None]:
    kernel = directory / f"{name}{KERNEL_SUFFIX}"
    initrd = directory / f"{name}{INITRD_SUFFIX}"
    cmdline_file = directory / f"{name}{CMDLINE_SUFFIX}"
    has_kernel, has_cmdline = kernel.is_file(), cmdline_file.is_file()
    if not has_kernel and not has_cmdline:
        return None, None, None
    if has_kernel != has_cmdline:
        present, missing = (kernel, cmdline_file) if has_kernel else (cmdline_file, kernel)
        log.warning("VM image %s: %s without %s; no direct boot", name, present.name, missing.name)
        return None, None, None
    cmdline = _read_cmdline(cmdline_file)
    if cmdline is None:
        return None, None, None
    return kernel, (initrd if initrd.is_file() else None), cmdline


def _load_image(directory: Path, name: str) -> VmImage | None:
    path = directory / f"{name}{IMAGE_SUFFIX}"
    what = f"VM image {path}"
    try:
        info = _info(path, what)
        virtual = _int(info, "virtual-size", what)
        actual = info.get("actual-size")
        if not isinstance(actual, int) or isinstance(actual, bool) or actual < 0:
            actual = path.stat().st_size
        specific = info.get("format-specific")
        data = specific.get("data") if isinstance(specific, dict) else None
        if isinstance(data, dict) and data.get("corrupt") is True:
            raise VmDiskError(f"{what}: qemu-img marks it corrupt")
    except (VmDiskError, OSError) as exc:
        log.warning("skipping %s", exc)
        return None
    kernel, initrd, cmdline = _direct_boot(directory, name)
    return VmImage(
        name=name,
        path=path,
        format=str(info.get("format", "qcow2")),
        virtual_size_bytes=virtual,
        file_size_bytes=actual,
        kernel=kernel,
        initrd=initrd,
        cmdline=cmdline,
        firmware="uefi" if (directory / f"{name}{UEFI_SUFFIX}").exists() else "bios",
    )


def _valid_name(name: str) -> bool:
    try:
        check_container_name(name, "vm_image")
    except ValidationError:
        return False
    return True


def list_images(images_dir: str | os.PathLike[str]) -> list[VmImage]:
    """The usable base images in ``images_dir``, by name. A missing folder has none."""
    directory = _absolute(images_dir)
    try:
        entries = sorted(entry.name for entry in os.scandir(directory))
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("cannot list VM images in %s: %s", directory, exc)
        return []
    images = []
    for entry in entries:
        if not entry.endswith(IMAGE_SUFFIX):
            continue
        name = entry[: -len(IMAGE_SUFFIX)]
        if not _valid_name(name):
            log.warning(
                "skipping VM image %s: a name is at most 128 letters, digits, '_', '.', '-', starting with "
                "a letter or digit",
                directory / entry,
            )
            continue
        if not (directory / entry).is_file():
            log.warning("skipping VM image %s: not a file", directory / entry)
            continue
        image = _load_image(directory, name)
        if image is not None:
            images.append(image)
    return images


def find_image(images_dir: str | os.PathLike[str], name: str) -> VmImage | None:
    """The base image ``name``, or ``None`` when it is not there or not usable."""
    if not isinstance(name, str) or not _valid_name(name):
        return None
    directory = _absolute(images_dir)
    if not (directory / f"{name}{IMAGE_SUFFIX}").is_file():
        return None
    return _load_image(directory, name)


# -- overlays ------------------------------------------------------------------------------------------------


def create_overlay(image: VmImage, path: str | os.PathLike[str], size_bytes: int | None = None) -> None:
    """Make ``path`` a qcow2 overlay of ``image``, of ``size_bytes`` (rounded up to 512) or the base's size.

    ``ValidationError("vm_disk_size", ...)`` for a size below the base's; ``FileExistsError`` when ``path``
    exists (a VM's disk is never replaced); ``VmDiskError`` when qemu-img fails.
    """
    if size_bytes is not None:
        if isinstance(size_bytes, bool) or not isinstance(size_bytes, int) or size_bytes <= 0:
            raise ValidationError("vm_disk_size", f"must be a positive number of bytes, got {size_bytes!r}")
        if size_bytes < image.virtual_size_bytes:
            raise ValidationError(
                "vm_disk_size",
                f"{format_size(size_bytes)} is smaller than image {image.name}'s "
                f"{format_size(image.virtual_size_bytes)} (a disk can only grow)",
            )
        size_bytes = -(-size_bytes // 512) * 512
    target = _absolute(path)
    if target.exists() or target.is_symlink():
        raise FileExistsError(f"{target} exists")
    staging = target.with_name(f".{target.name}.part")
    staging.unlink(missing_ok=True)
    args = ["create", "-q", "-f", "qcow2", "-b", str(_absolute(image.path)), "-F", image.format, str(staging)]
    if size_bytes is not None:
        args.append(str(size_bytes))
    try:
        _qemu_img(args, timeout=CREATE_TIMEOUT, what=f"creating {target} over {image.name}")
        os.link(staging, target)  # FileExistsError when someone made it meanwhile: theirs stays
    finally:
        staging.unlink(missing_ok=True)


# -- snapshots -----------------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class DiskSnapshot:
    """One internal snapshot of a VM's disk."""

    tag: str
    created_at: int  # unix seconds
    vm_state_bytes: int  # 0 for ours: disk only
    message: str = ""

    @property
    def timestamp(self) -> int | None:
        """The seconds in a ``kr-<seconds>`` tag (the key the API deletes by), else ``None``."""
        match = _TAG_RE.fullmatch(self.tag)
        return int(match.group(1)) if match else None


def _check_tag(tag: object) -> str:
    if not isinstance(tag, str) or not _TAG_RE.fullmatch(tag):
        raise ValidationError("tag", f"must be kr-<unix seconds>, got {str(tag)[:40]!r}")
    return tag


def _check_message(message: object) -> str:
    if message is None:
        return ""
    if not isinstance(message, str):
        raise ValidationError("message", f"must be a string, got {type(message).__name__}")
    if "\x00" in message or len(message) > MAX_MESSAGE:
        raise ValidationError("message", f"must be text of at most {MAX_MESSAGE} characters")
    return message


def new_snapshot_tag(existing: Iterable[str], now: float) -> str:
    """``kr-<now>``, or one second after the newest ``kr-`` tag when that is not earlier (unique, ordered)."""
    seconds = int(now)
    for tag in existing:
        match = _TAG_RE.fullmatch(tag)
        if match:
            seconds = max(seconds, int(match.group(1)) + 1)
    return f"kr-{seconds}"


def new_tag(disk: str | os.PathLike[str], *, now: float | None = None) -> str:
    """A new tag for ``disk`` (``new_snapshot_tag`` over its snapshots; readable while the VM runs)."""
    return new_snapshot_tag((s.tag for s in list_snapshots(disk)), time.time() if now is None else now)


def _messages_path(disk: Path) -> Path:
    return disk.with_name(disk.name + MESSAGES_SUFFIX)


def _read_messages(disk: Path) -> dict[str, str]:
    path = _messages_path(disk)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("snapshot messages of %s unreadable (%s): shown without", disk, exc)
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): v for k, v in data.items() if isinstance(v, str)}


def _write_messages(disk: Path, messages: dict[str, str], keep: Iterable[str]) -> None:
    """Store ``messages`` for the tags in ``keep`` (the disk's snapshots): a deleted one's message goes."""
    kept = set(keep)
    data = {tag: text for tag, text in sorted(messages.items()) if tag in kept and text}
    path = _messages_path(disk)
    if not data:
        path.unlink(missing_ok=True)
        return
    write_file_atomic(path, json.dumps(data, indent=1).encode(), mode=0o600)


def _parse_snapshots(entries: object, messages: dict[str, str]) -> list[DiskSnapshot]:
    snapshots = []
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            continue
        created = entry.get("date-sec")
        state = entry.get("vm-state-size")
        snapshots.append(
            DiskSnapshot(
                tag=entry["name"],
                created_at=created if isinstance(created, int) else 0,
                vm_state_bytes=state if isinstance(state, int) else 0,
                message=messages.get(entry["name"], ""),
            )
        )
    snapshots.sort(key=lambda s: (s.created_at, s.timestamp or 0, s.tag), reverse=True)
    return snapshots


def list_snapshots(disk: str | os.PathLike[str]) -> list[DiskSnapshot]:
    """The disk's internal snapshots, newest first (readable while the VM runs, too)."""
    path = _absolute(disk)
    info = _info(path, f"listing the snapshots of {path}")
    return _parse_snapshots(info.get("snapshots"), _read_messages(path))


def _require(snapshots: list[DiskSnapshot], tag: str, disk: Path) -> None:
    if not any(s.tag == tag for s in snapshots):
        raise SnapshotNotFound(f"{disk} has no snapshot {tag}")


def create_snapshot(
    disk: str | os.PathLike[str],
    tag: str | None = None,
    message: str | None = None,
    *,
    now: float | None = None,
) -> DiskSnapshot:
    """Snapshot the disk of a stopped VM. ``tag`` defaults to a new ``kr-<seconds>``; a taken tag is a
    ``VmDiskError``."""
    path = _absolute(disk)
    message = _check_message(message)
    existing = list_snapshots(path)
    if tag is None:
        tag = new_snapshot_tag((s.tag for s in existing), time.time() if now is None else now)
    _check_tag(tag)
    if any(s.tag == tag for s in existing):
        raise VmDiskError(f"{path} already has a snapshot {tag}")
    _qemu_img(["snapshot", "-c", tag, str(path)], timeout=SNAPSHOT_TIMEOUT, what=f"snapshot {tag} of {path}")
    after = list_snapshots(path)
    if message:
        messages = _read_messages(path)
        messages[tag] = message
        _write_messages(path, messages, (s.tag for s in after))
    for snapshot in after:
        if snapshot.tag == tag:
            return attrs.evolve(snapshot, message=message)
    raise VmDiskError(f"snapshot {tag} of {path} is not listed after it was made")


def delete_snapshot(disk: str | os.PathLike[str], tag: str) -> None:
    """Delete a snapshot of a stopped VM's disk (``SnapshotNotFound`` when there is none)."""
    path = _absolute(disk)
    _check_tag(tag)
    _require(list_snapshots(path), tag, path)
    _qemu_img(["snapshot", "-d", tag, str(path)], timeout=SNAPSHOT_TIMEOUT, what=f"deleting {tag} of {path}")
    _write_messages(path, _read_messages(path), (s.tag for s in list_snapshots(path)))


def apply_snapshot(disk: str | os.PathLike[str], tag: str) -> None:
    """Revert a stopped VM's disk to a snapshot (the snapshot stays; later ones too)."""
    path = _absolute(disk)
    _check_tag(tag)
    _require(list_snapshots(path), tag, path)
    _qemu_img(["snapshot", "-a", tag, str(path)], timeout=SNAPSHOT_TIMEOUT, what=f"reverting {path} to {tag}")


# -- snapshots of a running VM (QMP) -------------------------------------------------------------------------


async def list_snapshots_online(
    qmp: QmpClient, node: str, disk: str | os.PathLike[str]
) -> list[DiskSnapshot]:
    """The snapshots of a running VM's disk as QEMU sees them (node ``node``, usually ``DRIVE_ID``), newest
    first. ``disk`` is the image file, for the messages."""
    nodes = await qmp.execute("query-named-block-nodes", {"flat": True})
    for entry in nodes if isinstance(nodes, list) else []:
        if isinstance(entry, dict) and entry.get("node-name") == node:
            image = entry.get("image") if isinstance(entry.get("image"), dict) else {}
            messages = await trio.to_thread.run_sync(_read_messages, _absolute(disk))
            return _parse_snapshots(image.get("snapshots", []), messages)
    raise VmDiskError(f"QEMU has no block node {node}")


async def create_snapshot_online(
    qmp: QmpClient,
    node: str,
    disk: str | os.PathLike[str],
    tag: str | None = None,
    message: str | None = None,
    *,
    now: float | None = None,
    timeout: float = SNAPSHOT_TIMEOUT,
) -> DiskSnapshot:
    """Snapshot a running VM's disk through QMP (``blockdev-snapshot-internal-sync`` on block node ``node``,
    ``DRIVE_ID`` for a VM from ``vm_argv``). Disk only and crash-consistent: the guest is not asked to
    flush. ``disk`` is the image file, for the message store; ``tag`` as for ``create_snapshot``."""
    path = _absolute(disk)
    message = _check_message(message)
    existing = await list_snapshots_online(qmp, node, path)
    if tag is None:
        tag = new_snapshot_tag((s.tag for s in existing), time.time() if now is None else now)
    _check_tag(tag)
    if any(s.tag == tag for s in existing):
        raise VmDiskError(f"{path} already has a snapshot {tag}")
    await qmp.execute("blockdev-snapshot-internal-sync", {"device": node, "name": tag}, timeout=timeout)
    after = await list_snapshots_online(qmp, node, path)
    if message:
        messages = await trio.to_thread.run_sync(_read_messages, path)
        messages[tag] = message
        await trio.to_thread.run_sync(_write_messages, path, messages, [s.tag for s in after])
    for snapshot in after:
        if snapshot.tag == tag:
            return attrs.evolve(snapshot, message=message)
    raise VmDiskError(f"snapshot {tag} of {path} is not listed after it was made")


async def delete_snapshot_online(
    qmp: QmpClient,
    node: str,
    disk: str | os.PathLike[str],
    tag: str,
    *,
    timeout: float = SNAPSHOT_TIMEOUT,
) -> None:
    """Delete a snapshot of a running VM's disk (``blockdev-snapshot-delete-internal-sync``)."""
    path = _absolute(disk)
    _check_tag(tag)
    _require(await list_snapshots_online(qmp, node, path), tag, path)
    arguments = {"device": node, "name": tag}
    await qmp.execute("blockdev-snapshot-delete-internal-sync", arguments, timeout=timeout)
    after = await list_snapshots_online(qmp, node, path)
    messages = await trio.to_thread.run_sync(_read_messages, path)
    await trio.to_thread.run_sync(_write_messages, path, messages, [s.tag for s in after])
