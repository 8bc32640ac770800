"""``vm_process`` with a real QEMU (TCG, paused with ``-S``: no guest is needed to have a process to start,
recognise, wait for and kill), started from ``vm_argv``'s argv. Also a QEMU that is not our child (started
by a helper process, as after a runner restart). Missing QEMU skips, or fails under ``CI=true``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from kohakuriver_runner import vm_process
from kohakuriver_runner.qmp_client import open_qmp
from kohakuriver_runner.vm_argv import VmLaunch, qemu_argv
from tests.need import need_program


@pytest.fixture(scope="module")
def qemu() -> str:
    need_program("qemu-img")
    return need_program("qemu-system-x86_64")


def make_launch(instance: Path, **overrides) -> VmLaunch:
    instance.mkdir(parents=True, exist_ok=True)
    disk = instance / "disk.qcow2"
    if not disk.exists():
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True, timeout=30)
    fields = {
        "name": "vps-1",
        "accel": "tcg",
        "cores": 1,
        "memory_mb": 64,
        "disk": disk,
        "qmp_socket": instance / "qmp.sock",
        "serial_log": instance / "serial.log",
        "pidfile": instance / "qemu.pid",
        "extra": ["-S"],
    }
    fields.update(overrides)
    return VmLaunch(**fields)


def gone(pid: int) -> bool:
    """No process and no zombie with this pid."""
    return not Path(f"/proc/{pid}").exists()


@asynccontextmanager
async def launched(qemu: str, launch: VmLaunch, log: Path) -> AsyncIterator[int]:
    pid = await vm_process.launch(qemu_argv(launch, qemu=qemu), log_path=log)
    try:
        yield pid
    finally:
        with trio.CancelScope(shield=True), trio.fail_after(10):
            vm_process.signal(pid, signal.SIGKILL)
            await vm_process.wait_exit(pid)


async def test_launch_recognise_quit(qemu, tmp_path):
    instance = tmp_path / "vms,x" / "12"
    launch = make_launch(instance)
    log = instance / "qemu.log"
    log.write_text("from an earlier run\n")
    async with launched(qemu, launch, log) as pid:
        # its own session: a signal to the runner's process group does not reach it
        assert os.getsid(pid) == pid and os.getpgid(pid) != os.getpgid(0)
        assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
        assert os.readlink(f"/proc/{pid}/fd/1") == os.readlink(f"/proc/{pid}/fd/2") == str(log)
        async with open_qmp(launch.qmp_socket) as qmp:  # QEMU is up (and has written its pidfile)
            assert (await qmp.query_status()).status == "prelaunch"
            assert await vm_process.wait_exit(2**22 + 1) is None  # no such process
            assert vm_process.read_pidfile(launch.pidfile) == pid

            assert vm_process.is_qemu_of(pid, instance)
            assert vm_process.is_qemu_of(pid, str(instance) + "/")
            assert not vm_process.is_qemu_of(pid, tmp_path / "vms,x" / "2")
            assert not vm_process.is_qemu_of(pid, tmp_path / "vms,x" / "1")  # VM 1 is not VM 12
            assert not vm_process.is_qemu_of(pid, instance / "disk")  # a prefix of a file name
            assert not vm_process.is_qemu_of(os.getpid(), instance)  # not a QEMU
            assert not vm_process.is_qemu_of(2**22 + 1, instance)  # no such process

            await qmp.quit()
        codes: list[int | None] = []

        async def waiter() -> None:
            codes.append(await vm_process.wait_exit(pid))

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:  # two supervisors waiting for one VM
                nursery.start_soon(waiter)
                nursery.start_soon(waiter)
        assert codes == [0, 0]
        assert gone(pid)  # reaped: no zombie
        # asked again (the pid may be someone else's by now): the remembered status, and no signal sent
        assert await vm_process.wait_exit(pid) == 0
        assert not vm_process.signal(pid, signal.SIGTERM)
    assert log.read_text().startswith("from an earlier run\n")  # appended to, not truncated


async def test_sigkill_and_cancelled_wait(qemu, tmp_path):
    launch = make_launch(tmp_path / "1")
    async with launched(qemu, launch, tmp_path / "qemu.log") as pid:
        async with open_qmp(launch.qmp_socket):
            pass
        with trio.move_on_after(0.3) as waited:
            await vm_process.wait_exit(pid)
        assert waited.cancelled_caught and not gone(pid)  # cancellable, and the VM is untouched
        assert vm_process.signal(pid, signal.SIGKILL)
        with trio.fail_after(10):
            assert await vm_process.wait_exit(pid) == -signal.SIGKILL
        assert gone(pid)


async def test_qemu_refusing_its_argv_exits_with_its_message_in_the_log(qemu, tmp_path):
    launch = make_launch(tmp_path / "1", extra=["-S", "-no-such-option"])
    log = tmp_path / "qemu.log"
    pid = await vm_process.launch(qemu_argv(launch, qemu=qemu), log_path=log)
    with trio.fail_after(20):
        assert await vm_process.wait_exit(pid) == 1
    assert gone(pid)
    assert "-no-such-option" in log.read_text()
    assert log.stat().st_mode & 0o077 == 0  # made 0600


async def test_missing_program(tmp_path):
    with pytest.raises(FileNotFoundError):
        await vm_process.launch([str(tmp_path / "no-qemu")], log_path=tmp_path / "log")


async def test_uefi_pflash_argv_is_accepted(qemu, tmp_path):
    # No OVMF is needed to check the argv: blank 4 MiB flash images, and the CPU never starts (-S).
    code, variables = tmp_path / "OVMF_CODE.fd", tmp_path / "OVMF_VARS.fd"
    for path in (code, variables):
        with path.open("wb") as f:
            f.truncate(4 << 20)
    launch = make_launch(tmp_path / "1", firmware="uefi", ovmf_code=code, ovmf_vars=variables)
    async with launched(qemu, launch, tmp_path / "qemu.log") as pid:
        async with open_qmp(launch.qmp_socket) as qmp:
            assert (await qmp.query_status()).status == "prelaunch"
            await qmp.quit()
        with trio.fail_after(20):
            assert await vm_process.wait_exit(pid) == 0


HELPER = """
import subprocess, sys
qemu = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL, start_new_session=True)
print(qemu.pid, flush=True)
sys.exit(qemu.wait())
"""


async def test_wait_exit_on_a_qemu_that_is_not_our_child(qemu, tmp_path):
    """As after a runner restart: QEMU's parent is another process; we watch it through a pidfd."""
    launch = make_launch(tmp_path / "1")
    argv = qemu_argv(launch, qemu=qemu)
    helper = await trio.lowlevel.open_process(
        [sys.executable, "-c", HELPER, *argv], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    pid: int | None = None
    try:
        assert helper.stdout is not None
        with trio.fail_after(10):
            line = b""
            while not line.endswith(b"\n"):
                line += await helper.stdout.receive_some(64)
        pid = int(line)

        exited = trio.Event()
        result: list[int | None] = []

        async def watch() -> None:
            result.append(await vm_process.wait_exit(pid))
            exited.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            async with open_qmp(launch.qmp_socket) as qmp:
                # (checked once QEMU answers: for a moment after exec the kernel shows an empty cmdline)
                assert vm_process.is_qemu_of(pid, launch.disk.parent)
                await trio.sleep(0.2)
                assert not exited.is_set()  # waits while QEMU runs
                await qmp.quit()
            with trio.fail_after(20):
                await exited.wait()
        assert result == [None]  # not ours to reap: its parent gets the status
        with trio.fail_after(10):
            assert await helper.wait() == 0  # the helper reaped it
        assert gone(pid)
    finally:
        with trio.CancelScope(shield=True), trio.fail_after(10):
            if helper.returncode is None:
                # QEMU first, while the helper still waits for it (and will reap it): an orphaned QEMU
                # would be re-parented to an init that may never reap it
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    with trio.move_on_after(5):
                        await helper.wait()  # it exits once it has reaped QEMU
                helper.kill()
            await helper.wait()
