"""The project's Debian VM image (``scripts/images/vm-debian.sh``) boots with the project's own seed and QMP
client, end to end: a real QEMU (TCG here: DESIGN allows KVM only with ``kvm_intel``/``kvm_amd``), the disk
booting itself through its GRUB, cloud-init applying a seed from ``vm_seed.build_seed`` (hostname, both
accounts' keys, the pinned host key, the static network, a 9p share), then real ``ssh`` with
``StrictHostKeyChecking=yes`` against a known_hosts holding only the seed's host key, and an ACPI power-off
through ``qmp_client.open_qmp``.

The image is built on first use (a few minutes) and cached under ``~/.cache/kohakuriver/images`` by the
script's content, so later runs reuse it. Without QEMU, OpenSSH or the build tools the test is skipped,
except under ``CI=true``, where it fails. Timings (image build, boot to SSH, and the boot's phases as they
appear on the serial console) are printed (``pytest -s`` shows them).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kohakuriver_proto.models import SshKeyMode
from kohakuriver_runner.qmp_client import open_qmp
from kohakuriver_runner.vm_seed import GuestMount, GuestNetwork, SeedRequest, build_seed, build_seed_iso

from .cluster import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "images" / "vm-debian.sh"
HOSTNAME = "vps-4242"
# QEMU's user-mode network: the guest is 10.0.2.15 behind 10.0.2.2, slirp's resolver is 10.0.2.3. The
# seed's static configuration says exactly that, matched by the NIC's MAC.
MAC = "52:54:00:12:34:56"
NETWORK = GuestNetwork(address="10.0.2.15/24", gateway="10.0.2.2", mac=MAC, dns_servers=("10.0.2.3",))
SHARE_TAG = "krshared"
SHARE_PATH = "/mnt/shared"
BOOT_TO_SSH_TIMEOUT = 240  # TCG with cloud-init takes about 1.5-2 min on a loaded 2-core machine
POWEROFF_TIMEOUT = 60
# First appearance of each on the serial console, in boot order (the log's split of boot to SSH).
CONSOLE_MARKS = (
    ("grub", "Booting `Debian"),
    ("kernel", "Linux version"),
    ("initrd", "Run /init as init process"),
    ("systemd", "Welcome to"),
    ("cloud-init local", "running 'init-local'"),
    ("cloud-init network", "running 'init' at"),
    ("cloud-init config", "running 'modules:config'"),
    ("cloud-init final", "running 'modules:final'"),
    ("cloud-init done", "finished at"),
    ("login prompt", " login:"),
)


def _require(ok: bool, message: str) -> None:
    if not ok:
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def vm_image() -> Path:
    """The image's qcow2 (built, or taken from the cache), with the build time printed."""
    for tool in ("qemu-system-x86_64", "qemu-img", "ssh"):
        _require(shutil.which(tool) is not None, f"{tool} is not installed (scripts/setup.sh installs it)")
    _require(os.geteuid() == 0, "building the VM image needs root (debootstrap, chroot)")
    _require(shutil.which("debootstrap") is not None, "debootstrap is not installed (scripts/setup.sh)")
    _require(shutil.which("mkfs.ext4") is not None, "mkfs.ext4 is not installed (e2fsprogs)")
    timings = []
    for _ in range(2):  # the second run shows what a cached image costs
        started = time.monotonic()
        done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=900)
        timings.append(time.monotonic() - started)
        if done.returncode != 0:
            pytest.fail(f"vm-debian.sh failed ({done.returncode}):\n{done.stderr[-4000:]}")
    how = "taken from the cache" if "is cached" in done.stderr and timings[0] < 10 else "built"
    print(f"\nVM image {how} in {timings[0]:.1f} s; a cached run takes {timings[1]:.2f} s", file=sys.stderr)
    image = Path(done.stdout.strip().splitlines()[-1])
    for suffix in (".qcow2", ".vmlinuz", ".initrd", ".cmdline"):
        assert image.with_suffix(suffix).stat().st_size > 0, suffix
    return image


def _ed25519() -> tuple[bytes, str]:
    """A new key: (OpenSSH private key, public key line)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public.decode()


def _accel() -> list[str]:
    # /dev/kvm alone is not enough: under a PVM-only host (kvm_pvm) stock kernels hang.
    kvm = os.access("/dev/kvm", os.W_OK) and any(
        Path("/sys/module", m).is_dir() for m in ("kvm_intel", "kvm_amd")
    )
    return ["-accel", "kvm", "-cpu", "host"] if kvm else ["-accel", "tcg,thread=multi", "-cpu", "max"]


class Console:
    """Follows the serial log: when each of ``CONSOLE_MARKS`` first showed, seconds after ``start``."""

    def __init__(self, path: Path, start: float) -> None:
        self.path = path
        self.start = start
        self.seen: dict[str, float] = {}
        self.changed = trio.Event()

    def text(self) -> str:
        try:
            return self.path.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    async def follow(self) -> None:
        while True:
            text = await trio.to_thread.run_sync(self.text)
            now = time.monotonic() - self.start
            for name, mark in CONSOLE_MARKS:
                if name not in self.seen and mark in text:
                    self.seen[name] = now
                    self.changed.set()
                    self.changed = trio.Event()
            await trio.sleep(0.2)

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-lines:])


async def _ssh_banner(port: int) -> bool:
    """True once sshd itself answers: slirp accepts the TCP connection before the guest listens."""
    try:
        with trio.move_on_after(5):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                data = b""
                while b"\n" not in data:
                    chunk = await stream.receive_some(256)
                    if not chunk:
                        return False
                    data += chunk
                return data.startswith(b"SSH-2.0-")
    except OSError:
        return False
    return False


async def test_debian_image_boots_with_the_project_seed(vm_image, tmp_path):
    qemu = shutil.which("qemu-system-x86_64")
    work = tmp_path
    user_private, user_public = _ed25519()
    _, management_public = _ed25519()
    host_private, host_public = _ed25519()
    user_key = work / "user_key"
    user_key.write_bytes(user_private)
    user_key.chmod(0o600)
    port = free_port()
    known_hosts = work / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {host_public}\n")

    share = work / "share"
    share.mkdir()
    (share / "from-host").write_text("written by the host\n")
    request = SeedRequest(
        hostname=HOSTNAME,
        ssh_key_mode=SshKeyMode.UPLOAD,
        network=NETWORK,
        management_public_key=management_public,
        ssh_public_key=user_public,
        host_key=host_private,
        mounts=(GuestMount(tag=SHARE_TAG, guest_path=SHARE_PATH),),
    )
    started = time.monotonic()
    seed = work / "seed.iso"
    seed.write_bytes(await trio.to_thread.run_sync(build_seed_iso, build_seed(request)))
    disk = work / "disk.qcow2"
    # 3 GiB over the 2 GiB base: growpart and resize_rootfs must grow the root file system at first boot.
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(vm_image), "-F", "qcow2", str(disk), "3G"],
        check=True,
    )
    prepared = time.monotonic() - started

    qmp_socket = work / "qmp.sock"
    console_log = work / "console.log"
    argv = [
        qemu,
        *_accel(),
        "-m", "1024", "-smp", "2", "-nodefaults", "-display", "none", "-monitor", "none",
        "-drive", f"file={disk},if=none,id=root,format=qcow2",
        "-device", "virtio-blk-pci,drive=root,bootindex=0",
        "-drive", f"file={seed},if=virtio,format=raw,readonly=on",
        "-netdev", f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:22",
        "-device", f"virtio-net-pci,netdev=n0,mac={MAC}",
        "-device", "virtio-rng-pci",
        "-virtfs", f"local,path={share},mount_tag={SHARE_TAG},security_model=none,id=share0",
        "-serial", f"file:{console_log}",
        "-qmp", f"unix:{qmp_socket},server=on,wait=off",
    ]  # fmt: skip

    def ssh_argv(user: str, command: str, **options: str) -> list[str]:
        # No config file, agent or default key: only the user's key and the seed's host key count.
        options = {
            "IdentitiesOnly": "yes",
            "IdentityAgent": "none",
            "StrictHostKeyChecking": "yes",
            "UserKnownHostsFile": str(known_hosts),
            "GlobalKnownHostsFile": "/dev/null",
            "ConnectTimeout": "20",
            "LogLevel": "ERROR",
            "BatchMode": "yes",
            **options,
        }
        cmd = ["ssh", "-F", "/dev/null", "-p", str(port), "-i", str(user_key)]
        for name, value in options.items():
            cmd += ["-o", f"{name}={value}"]
        return [*cmd, f"{user}@127.0.0.1", command]

    async def ssh(user: str, command: str) -> subprocess.CompletedProcess:
        with trio.fail_after(60):
            return await trio.run_process(
                ssh_argv(user, command),
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                stdin=subprocess.DEVNULL,
            )

    boot_started = time.monotonic()
    console = Console(console_log, boot_started)
    with (work / "qemu.err").open("wb") as qemu_err:
        process = await trio.lowlevel.open_process(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=qemu_err
        )
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(console.follow)
            async with open_qmp(qmp_socket) as qmp:
                status = await qmp.query_status()
                assert status.running, status

                # SSH: first sshd's banner, then a real login (keys, host key, account all in place).
                with trio.move_on_after(BOOT_TO_SSH_TIMEOUT) as waited:
                    while True:
                        assert process.returncode is None, f"QEMU exited early:\n{console.tail()}"
                        if await _ssh_banner(port):
                            done = await ssh("root", "true")
                            if done.returncode == 0:
                                break
                        await trio.sleep(1)
                assert not waited.cancelled_caught, f"no SSH in {BOOT_TO_SSH_TIMEOUT} s:\n{console.tail()}"
                boot_to_ssh = time.monotonic() - boot_started

                # Both accounts take the user's key; the host key is the seed's (StrictHostKeyChecking=yes).
                root = await ssh("root", "hostname; id -un; ls /etc/ssh | grep '^ssh_host_'")
                assert root.returncode == 0, root.stderr
                assert root.stdout.decode().split() == [
                    HOSTNAME,
                    "root",
                    "ssh_host_ed25519_key",
                    "ssh_host_ed25519_key.pub",
                ], root.stdout
                user = await ssh("kohaku", "id -un; hostname; sudo -n id -un")
                assert user.returncode == 0, user.stderr
                assert user.stdout.decode().split() == ["kohaku", HOSTNAME, "root"], user.stdout

                # cloud-init finished every module without an error; note when.
                status_run = await ssh("root", "cloud-init status --wait --long")
                cloud_init_done = time.monotonic() - boot_started
                assert b"status: done" in status_run.stdout, status_run.stdout + status_run.stderr

                # The seed's network-config applied (NIC renamed eth0, static address, its DNS server);
                # the root file system grew into the bigger overlay; the 9p share is mounted both ways.
                facts = await ssh(
                    "root",
                    "ip -4 -o addr show dev eth0; resolvectl dns eth0; df -B1M --output=size /;"
                    f" cat {SHARE_PATH}/from-host; echo from-guest > {SHARE_PATH}/from-guest;"
                    " sshd -T | grep -E '^(passwordauthentication|kbdinteractiveauthentication) ';"
                    " passwd -S root; passwd -S kohaku",
                )
                assert facts.returncode == 0, facts.stderr
                out = facts.stdout.decode()
                assert "inet 10.0.2.15/24" in out, out
                assert "10.0.2.3" in out, out
                size_mib = int(out.split("1M-blocks")[1].split()[0])
                assert size_mib > 2500, out  # the base's file system is 2 GiB less 1 MiB
                assert "written by the host" in out, out
                assert (share / "from-guest").read_text() == "from-guest\n"
                assert "passwordauthentication no" in out, out
                assert "kbdinteractiveauthentication no" in out, out
                assert "root L " in out and "kohaku L " in out, out  # both passwords locked

                # A password is never even asked for: with an askpass program forced on, ssh offers a
                # bogus password if the server accepts the method; it must be refused without one.
                asked = work / "askpass-called"
                askpass = work / "askpass"
                askpass.write_text('#!/bin/sh\necho called > "$KR_TEST_ASKPASS_MARK"\necho bogus-password\n')
                askpass.chmod(0o700)
                env = {
                    **os.environ,
                    "SSH_ASKPASS": str(askpass),
                    "SSH_ASKPASS_REQUIRE": "force",
                    "DISPLAY": ":0",
                    "KR_TEST_ASKPASS_MARK": str(asked),
                }
                with trio.fail_after(60):
                    refused = await trio.run_process(
                        ssh_argv(
                            "kohaku",
                            "true",
                            BatchMode="no",
                            PubkeyAuthentication="no",
                            PreferredAuthentications="password,keyboard-interactive",
                            NumberOfPasswordPrompts="1",
                        ),
                        capture_stdout=True,
                        capture_stderr=True,
                        check=False,
                        stdin=subprocess.DEVNULL,
                        env=env,
                        start_new_session=True,  # no controlling terminal to ask on
                    )
                assert refused.returncode == 255, refused
                assert b"Permission denied (publickey)" in refused.stderr, refused.stderr
                assert not asked.exists(), "ssh was asked for a password: the server offered the method"

                # ACPI power button; the guest shuts down and QEMU exits.
                powerdown_started = time.monotonic()
                await qmp.system_powerdown()
                with trio.move_on_after(POWEROFF_TIMEOUT) as off:
                    await process.wait()
                assert not off.cancelled_caught, f"no power-off in {POWEROFF_TIMEOUT} s:\n{console.tail()}"
                powerdown = time.monotonic() - powerdown_started
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True), trio.fail_after(10):
            if process.returncode is None:
                process.send_signal(signal.SIGKILL)
            await process.wait()

    assert process.returncode == 0, (work / "qemu.err").read_text()
    phases = ", ".join(f"{name} {at:.1f}" for name, at in sorted(console.seen.items(), key=lambda i: i[1]))
    print(
        f"\nVM boot ({' '.join(_accel()[:2])}): disk and seed {prepared:.2f} s,"
        f" boot to SSH {boot_to_ssh:.1f} s, cloud-init done {cloud_init_done:.1f} s,"
        f" power-off {powerdown:.1f} s\n"
        f"serial console, seconds after QEMU started: {phases}",
        file=sys.stderr,
    )
