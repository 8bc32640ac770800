"""``vm_disk`` against the real ``qemu-img`` (and ``qemu-io`` to change a disk's content,
``qemu-system-x86_64`` under TCG for the snapshots of a running VM): base images, overlays, and internal
snapshots offline and through QMP. The folders have commas in their names, so QEMU's option escaping is
exercised for real. Missing QEMU skips, or fails under ``CI=true`` (scripts/setup.sh installs it)."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest
import trio

from kohakuriver_proto.errors import ValidationError
from kohakuriver_runner import vm_disk, vm_process
from kohakuriver_runner.qmp_client import open_qmp
from kohakuriver_runner.vm_argv import VmLaunch, qemu_argv
from tests.need import need_program

MiB = 1 << 20


@pytest.fixture(scope="module")
def qemu_img() -> str:
    return need_program("qemu-img")


@pytest.fixture(scope="module")
def qemu_io() -> str:
    return need_program("qemu-io")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "vm,disks dir"
    path.mkdir()
    return path


def run(*argv: str | Path) -> str:
    return subprocess.run(
        [str(a) for a in argv], check=True, capture_output=True, text=True, timeout=60
    ).stdout


def make_qcow2(path: Path, size: int = 64 * MiB, fill: bytes | None = None) -> Path:
    """A qcow2 of ``size`` bytes; ``fill`` is written at offset 0 (through a raw image converted)."""
    if fill is None:
        run("qemu-img", "create", "-q", "-f", "qcow2", path, str(size))
        return path
    raw = path.with_suffix(".raw")
    with raw.open("wb") as out:
        out.write(fill)
        out.truncate(size)
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path)
    raw.unlink()
    return path


def head(disk: Path, n: int) -> bytes:
    """The first ``n`` bytes the guest would see on ``disk`` (through its backing chain)."""
    raw = disk.with_name(disk.name + ".read.raw")
    run("qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", disk, raw)
    try:
        with raw.open("rb") as data:
            return data.read(n)
    finally:
        raw.unlink()


def write_pattern(disk: Path, byte: int, length: int = 65536) -> None:
    run("qemu-io", "-f", "qcow2", "-c", f"write -P {byte:#x} 0 {length}", disk)


# -- base images ---------------------------------------------------------------------------------------------


def test_list_images(qemu_img, folder, caplog):
    make_qcow2(folder / "debian-12.qcow2", 64 * MiB)
    (folder / "debian-12.vmlinuz").write_bytes(b"kernel")
    (folder / "debian-12.initrd").write_bytes(b"initrd")
    (folder / "debian-12.cmdline").write_text("root=LABEL=kr-root ro console=ttyS0,115200n8\n")
    make_qcow2(folder / "plain.qcow2", 32 * MiB)
    make_qcow2(folder / "uefi-img.qcow2", 16 * MiB)
    (folder / "uefi-img.uefi").touch()
    (folder / "uefi-img.vmlinuz").write_bytes(b"kernel")  # no cmdline: no direct boot
    make_qcow2(folder / "-dash.qcow2")  # badly named
    make_qcow2(folder / "with space.qcow2")
    (folder / "garbage.qcow2").write_text("not an image\n")  # would probe as raw: refused, never probed
    (folder / "broken.qcow2").write_bytes(b"QFI\xfb\x00\x00\x00\x03" + b"\xff" * 1016)  # a bad header
    (folder / "folder.qcow2").mkdir()
    (folder / "notes.txt").write_text("ignored")

    with caplog.at_level(logging.WARNING, logger="kohakuriver.runner.vm_disk"):
        images = vm_disk.list_images(folder)

    assert [i.name for i in images] == ["debian-12", "plain", "uefi-img"]
    debian, plain, uefi = images
    assert debian.path == folder / "debian-12.qcow2"
    assert (debian.format, debian.virtual_size_bytes, debian.firmware) == ("qcow2", 64 * MiB, "bios")
    assert 0 < debian.file_size_bytes < MiB
    assert debian.kernel == folder / "debian-12.vmlinuz"
    assert debian.initrd == folder / "debian-12.initrd"
    assert debian.cmdline == "root=LABEL=kr-root ro console=ttyS0,115200n8"
    assert debian.direct_boot
    assert (plain.kernel, plain.initrd, plain.cmdline, plain.direct_boot) == (None, None, None, False)
    assert uefi.firmware == "uefi" and not uefi.direct_boot

    info = debian.to_info()
    assert (info.name, info.virtual_size_bytes, info.direct_boot, info.firmware) == (
        "debian-12",
        64 * MiB,
        True,
        "bios",
    )
    assert uefi.to_info().firmware == "uefi"

    logged = "\n".join(r.getMessage() for r in caplog.records)
    for skipped in ("-dash.qcow2", "with space.qcow2", "garbage.qcow2", "broken.qcow2", "folder.qcow2"):
        assert skipped in logged
    assert "uefi-img.vmlinuz without uefi-img.cmdline" in logged
    assert "not in qcow2 format" in logged  # qemu-img's own words are quoted

    assert vm_disk.find_image(folder, "debian-12") == debian
    assert vm_disk.find_image(folder, "missing") is None
    assert vm_disk.find_image(folder, "garbage") is None
    assert vm_disk.find_image(folder, "../debian-12") is None
    assert vm_disk.list_images(folder / "absent") == []


# -- overlays ------------------------------------------------------------------------------------------------


def test_create_overlay(qemu_img, folder):
    make_qcow2(folder / "base.qcow2", 64 * MiB, fill=b"BASE" * 1024)
    image = vm_disk.find_image(folder, "base")
    assert image is not None
    instance = folder / "vm,1"
    instance.mkdir()

    same = instance / "same.qcow2"
    vm_disk.create_overlay(image, same)
    bigger = instance / "disk.qcow2"
    vm_disk.create_overlay(image, bigger, 100 * MiB + 1)  # rounded up to 512

    for disk, size in ((same, 64 * MiB), (bigger, 100 * MiB + 512)):
        info = vm_disk._info(disk, "test")
        assert info["virtual-size"] == size
        assert info["backing-filename"] == str(folder / "base.qcow2")  # absolute, comma and all
        assert info["backing-filename-format"] == "qcow2"
        assert head(disk, 8) == b"BASEBASE"
    assert sorted(p.name for p in instance.iterdir()) == ["disk.qcow2", "same.qcow2"]  # no staging left

    with pytest.raises(ValidationError) as refused:
        vm_disk.create_overlay(image, instance / "small.qcow2", 32 * MiB)
    assert refused.value.field == "vm_disk_size"
    assert "32 MiB" in refused.value.message and "64 MiB" in refused.value.message
    assert not (instance / "small.qcow2").exists()

    before = bigger.read_bytes()
    with pytest.raises(FileExistsError):
        vm_disk.create_overlay(image, bigger)
    assert bigger.read_bytes() == before  # a VM's disk is never replaced


# -- snapshots, offline --------------------------------------------------------------------------------------


def test_offline_snapshots_restore_content(qemu_img, qemu_io, folder):
    make_qcow2(folder / "base.qcow2", 16 * MiB, fill=b"\x11" * 65536)
    image = vm_disk.find_image(folder, "base")
    assert image is not None
    disk = folder / "disk.qcow2"
    vm_disk.create_overlay(image, disk)
    assert vm_disk.list_snapshots(disk) == []

    first = vm_disk.create_snapshot(disk, message="clean install, déjà vu")
    now = first.timestamp
    assert now is not None and first.tag == f"kr-{now}"
    assert first.message == "clean install, déjà vu" and first.vm_state_bytes == 0
    write_pattern(disk, 0xAA)
    assert head(disk, 4) == b"\xaa" * 4

    # the same second: the tag moves on to the next one
    second = vm_disk.create_snapshot(disk, now=now, message="")
    assert second.tag == f"kr-{now + 1}" and second.message == ""
    write_pattern(disk, 0xBB)
    assert vm_disk.new_tag(disk, now=now) == f"kr-{now + 2}"

    listed = vm_disk.list_snapshots(disk)
    assert [s.tag for s in listed] == [second.tag, first.tag]  # newest first
    assert [s.message for s in listed] == ["", "clean install, déjà vu"]

    vm_disk.apply_snapshot(disk, first.tag)
    assert head(disk, 4) == b"\x11" * 4
    vm_disk.apply_snapshot(disk, second.tag)
    assert head(disk, 4) == b"\xaa" * 4

    with pytest.raises(vm_disk.VmDiskError, match="already has"):
        vm_disk.create_snapshot(disk, first.tag)
    with pytest.raises(vm_disk.SnapshotNotFound):
        vm_disk.apply_snapshot(disk, "kr-1")
    with pytest.raises(ValidationError) as bad:
        vm_disk.delete_snapshot(disk, "-l")
    assert bad.value.field == "tag"

    vm_disk.delete_snapshot(disk, first.tag)
    assert [s.tag for s in vm_disk.list_snapshots(disk)] == [second.tag]
    assert not (folder / "disk.qcow2.snapshots.json").exists()  # no message left to keep
    with pytest.raises(vm_disk.SnapshotNotFound):
        vm_disk.delete_snapshot(disk, first.tag)


# -- snapshots of a running VM -------------------------------------------------------------------------------


async def test_online_snapshot_through_qmp(qemu_img, folder):
    qemu = need_program("qemu-system-x86_64")
    make_qcow2(folder / "base.qcow2", 16 * MiB, fill=b"\x22" * 512)
    image = vm_disk.find_image(folder, "base")
    assert image is not None
    instance = folder / "vm,7"
    instance.mkdir()
    (instance / "share,d").mkdir()
    (instance / "seed.iso").write_bytes(b"\0" * 65536)
    disk = instance / "disk.qcow2"
    vm_disk.create_overlay(image, disk, 32 * MiB)
    launch = VmLaunch(
        name="vps-7",
        accel="tcg",
        cores=1,
        memory_mb=128,
        disk=disk,
        seed_iso=instance / "seed.iso",
        qmp_socket=instance / "qmp.sock",
        serial_log=instance / "serial,log",
        pidfile=instance / "qemu.pid",
        shares=[("kr-share", instance / "share,d", False)],
        extra=["-S"],  # no guest runs: QMP and the block layer are all this needs
    )
    pid = await vm_process.launch(qemu_argv(launch, qemu=qemu), log_path=instance / "qemu.log")
    try:
        async with open_qmp(launch.qmp_socket) as qmp:
            made = await vm_disk.create_snapshot_online(qmp, vm_disk.DRIVE_ID, disk, message="while running")
            assert made.tag.startswith("kr-") and made.message == "while running"
            assert made.vm_state_bytes == 0  # the disk only

            doomed = await vm_disk.create_snapshot_online(qmp, vm_disk.DRIVE_ID, disk, message="doomed")
            assert doomed.timestamp is not None and made.timestamp is not None
            assert doomed.timestamp > made.timestamp
            listed = await vm_disk.list_snapshots_online(qmp, vm_disk.DRIVE_ID, disk)
            assert [s.tag for s in listed] == [doomed.tag, made.tag]
            # readable offline while QEMU holds the disk, but reverting needs the VM off: the lock refuses
            assert [s.tag for s in await trio.to_thread.run_sync(vm_disk.list_snapshots, disk)] == [
                doomed.tag,
                made.tag,
            ]
            with pytest.raises(vm_disk.VmDiskError, match="lock"):
                await trio.to_thread.run_sync(vm_disk.apply_snapshot, disk, made.tag)

            await vm_disk.delete_snapshot_online(qmp, vm_disk.DRIVE_ID, disk, doomed.tag)
            with pytest.raises(vm_disk.SnapshotNotFound):
                await vm_disk.delete_snapshot_online(qmp, vm_disk.DRIVE_ID, disk, doomed.tag)
            await qmp.quit()
        with trio.fail_after(20):
            assert await vm_process.wait_exit(pid) == 0
    finally:
        if vm_process.signal(pid, 9):
            with trio.CancelScope(shield=True), trio.fail_after(10):
                await vm_process.wait_exit(pid)

    listed = vm_disk.list_snapshots(disk)
    assert [(s.tag, s.message) for s in listed] == [(made.tag, "while running")]
    vm_disk.apply_snapshot(disk, made.tag)  # the VM is off now
    assert head(disk, 2) == b"\x22\x22"
