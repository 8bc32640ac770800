"""``vm_ssh`` against a real OpenSSH server: the management key, the argv's quoting, the pinned host key.

The server stands in for a VM's sshd: ``running_sshd`` starts ``sshd -D -e`` as root on 127.0.0.1 with an
Ed25519 host key the test makes and pins, and the runner's management key as the only authorized key
(``tests/integration/test_vm_terminal.py`` uses it too). Root logs in with a key only, as in a VM.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import psutil
import pytest
import trio

from kohakuriver_proto.errors import ValidationError
from kohakuriver_proto.models import check_ssh_public_key
from kohakuriver_runner.vm_ssh import (
    KEY_FILE,
    ManagementKey,
    SshFailed,
    VmSshTarget,
    known_hosts_line,
    remote_command,
    run,
    ssh_argv,
    with_env,
)
from kohakuriver_runner.vps_files import generate_host_key, public_host_key
from tests.need import need_program, need_root

#: sshd's privilege-separation directory (Debian's build insists on it; its service unit makes it).
PRIVSEP_DIR = Path("/run/sshd")


@attrs.frozen
class Sshd:
    """A running sshd: the target that reaches it, its log, and a second host key that is not its own."""

    target: VmSshTarget
    log: Path
    other_host_key: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def running_sshd(tmp_path: Path) -> Iterator[Sshd]:
    """sshd on a free loopback port, accepting root with the management key made in ``tmp_path/state``."""
    sshd = need_program("sshd", "openssh-server; scripts/setup.sh installs it")
    need_program("ssh", "openssh-client; scripts/setup.sh installs it")
    need_program("setsid", "util-linux")
    need_root("a real sshd that logs in as root")
    PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
    key = ManagementKey.load_or_create(tmp_path / "state")
    host_key = tmp_path / "ssh_host_ed25519_key"
    host_key.write_bytes(generate_host_key())
    host_key.chmod(0o600)
    authorized = tmp_path / "authorized_keys"
    authorized.write_text(key.public_openssh + "\n")
    log = tmp_path / "sshd.log"
    for _attempt in range(3):  # a free port can be taken between the probe and sshd's bind
        port = _free_port()
        config = tmp_path / "sshd_config"
        config.write_text(
            f"ListenAddress 127.0.0.1:{port}\n"
            f"HostKey {host_key}\n"
            f"AuthorizedKeysFile {authorized}\n"
            "PermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "StrictModes no\n"
            "PidFile none\n"
            "PrintMotd no\n"
            "PrintLastLog no\n"
        )
        with open(log, "ab") as log_file:
            process = subprocess.Popen([sshd, "-D", "-e", "-f", str(config)], stderr=log_file)
        deadline = time.monotonic() + 10
        while process.poll() is None and not _listening(port) and time.monotonic() < deadline:
            time.sleep(0.02)
        if process.poll() is None and _listening(port):
            break
        process.kill()
        process.wait()
    else:
        pytest.fail(f"sshd did not start: {log.read_text()[-2000:]}")
    target = VmSshTarget(
        task_id=4242, address="127.0.0.1", port=port, host_public_key=public_host_key(host_key.read_bytes()),
        key=key,
    )  # fmt: skip
    try:
        yield Sshd(target, log, public_host_key(generate_host_key()))
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def sshd(tmp_path) -> Iterator[Sshd]:
    with running_sshd(tmp_path) as server:
        yield server


def ssh_children() -> list[psutil.Process]:
    """ssh clients this test process started that are still running (none may be left behind)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if child.name() in ("ssh", "setsid") and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
    return found


# -- the management key -------------------------------------------------------------------------------------


def test_management_key_is_made_once_private_and_reused(tmp_path):
    state = tmp_path / "state"
    first = ManagementKey.load_or_create(state)
    path = state / KEY_FILE
    assert first.private_path == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    kind, blob, comment = first.public_openssh.split(" ")
    assert kind == "ssh-ed25519" and blob.startswith("AAAA") and comment.startswith("kohakuriver-runner@")
    check_ssh_public_key(first.public_openssh)  # what the VM's seed accepts as the management key
    assert public_host_key(path.read_bytes()) == f"{kind} {blob}"

    # The same key after a restart, and a key file others could read is made private again.
    before = path.read_bytes()
    path.chmod(0o644)
    again = ManagementKey.load_or_create(state)
    assert again == first and path.read_bytes() == before
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in state.iterdir()] == [KEY_FILE]  # no temporary file left


# -- the argv -----------------------------------------------------------------------------------------------


def test_argv_pins_the_key_and_trusts_no_configuration(tmp_path):
    key = ManagementKey.load_or_create(tmp_path)
    host = public_host_key(generate_host_key())
    target = VmSshTarget(task_id=1, address="10.0.0.5", host_public_key=host + " comment\n", key=key)
    assert known_hosts_line(target) == f"10.0.0.5 {host}\n"
    assert known_hosts_line(attrs.evolve(target, port=2222)) == f"[10.0.0.5]:2222 {host}\n"

    argv = ssh_argv(target, "/kh", ["echo", "a b"], tty=True, env={})
    for option in (
        "IdentitiesOnly=yes", "BatchMode=yes", "StrictHostKeyChecking=yes", "UserKnownHostsFile=/kh",
        "GlobalKnownHostsFile=/dev/null", "ConnectTimeout=10", "ServerAliveInterval=15", "LogLevel=ERROR",
        "EscapeChar=none",
    ):  # fmt: skip
        assert argv[argv.index(option) - 1] == "-o", option
    assert argv[argv.index("-F") + 1] == "/dev/null"
    assert argv[argv.index("-i") + 1] == str(key.private_path)
    assert argv[-4:] == ["-tt", "root@10.0.0.5", "--", "echo 'a b'"]
    assert ssh_argv(target, "/kh", None, tty=False, env={})[-3:] == ["-T", "root@10.0.0.5", "--"]

    # Nothing that could become an ssh option or a second known_hosts line gets in.
    for bad in ("-oProxyCommand=touch /x", "vm.example", "10.0.0.5 x"):
        with pytest.raises(ValidationError):
            attrs.evolve(target, address=bad)
    with pytest.raises(ValidationError):
        attrs.evolve(target, host_public_key=f"{host}\n10.0.0.6 {host}")
    with pytest.raises(ValidationError):
        remote_command(["true"], {"BAD-NAME": "x"})
    # Variables: ``env NAME=value``; a program named with "=" is not taken for one more variable.
    assert with_env({"A": "1"}, ["a=b"])[:3] == ["env", "A=1", "/bin/sh"]


# -- against sshd -------------------------------------------------------------------------------------------

HOSTILE = [
    "a b", "$(id)", "`id`", "x;y", "q'\"", "l1\nl2", "", "*", "~", "$HOME", "\\", "--", "-n", " lead",
    "tab\there", "é ü", "!", "&&", "|", ">out", "#c", "'", '"', "${IFS}",
]  # fmt: skip


async def test_run_passes_hostile_arguments_verbatim(sshd, tmp_path):
    code, out, err = await run(sshd.target, ["printf", "%s\\n", *HOSTILE], timeout=30)
    assert (code, err) == (0, b"")
    assert out.decode() == "".join(arg + "\n" for arg in HOSTILE)
    assert not (Path.cwd() / "out").exists()

    # Variables with hostile values, and an exit status and stderr of the command's own.
    env = {"A": "x y $(id) 'q'", "B": "l1\nl2"}
    code, out, err = await run(
        sshd.target,
        with_env(env, ["sh", "-c", 'printf "%s|%s" "$A" "$B"; echo oops >&2; exit 7']),
        timeout=30,
    )
    assert (code, out, err) == (7, b"x y $(id) 'q'|l1\nl2", b"oops\n")
    # A program named "a=b" is looked for, not assigned.
    code, _, err = await run(sshd.target, with_env({"A": "1"}, ["a=b"]), timeout=30)
    assert code == 127 and b"a=b" in err
    # The remote command's own 255 is a status, not an ssh failure.
    assert (await run(sshd.target, ["sh", "-c", "exit 255"], timeout=30))[0] == 255
    assert ssh_children() == []


async def test_another_host_key_is_refused(sshd):
    impostor = attrs.evolve(sshd.target, host_public_key=sshd.other_host_key)
    with pytest.raises(SshFailed) as failed:
        await run(impostor, ["touch", "/should-not-exist"], timeout=30)
    assert "pinned" in failed.value.reason and "Host key verification failed" in failed.value.reason
    assert "Accepted publickey" not in sshd.log.read_text()

    # A key root does not trust, and a port nothing listens on: ssh's reason, not a remote status.
    other_key = ManagementKey.load_or_create(sshd.log.parent / "other-state")
    with pytest.raises(SshFailed) as failed:
        await run(attrs.evolve(sshd.target, key=other_key), ["true"], timeout=30)
    assert "Permission denied" in failed.value.reason
    closed = attrs.evolve(sshd.target, port=_free_port())
    with pytest.raises(SshFailed) as failed:
        await run(closed, ["true"], timeout=30)
    assert "Connection refused" in failed.value.reason


async def test_run_is_bounded(sshd):
    started = trio.current_time()
    with pytest.raises(trio.TooSlowError):
        await run(sshd.target, ["sleep", "30"], timeout=1.5)
    assert trio.current_time() - started < 6
    assert ssh_children() == []


async def test_run_without_ssh_says_so(sshd, monkeypatch):
    monkeypatch.setitem(os.environ, "PATH", "/nonexistent")
    monkeypatch.setattr("kohakuriver_runner.vm_ssh.SSH_ENV", {"PATH": "/nonexistent"})
    with pytest.raises(SshFailed, match="openssh-client"):
        await run(sshd.target, ["true"], timeout=10)
