"""The fast paths of `kr`: `kr ssh proxy-command` and `kr ssh ID` (the real `kr` executable, and the real
OpenSSH client for the latter) against a TCP server speaking the proxy's side of the handshake (the sans-IO
``ServerHandshake``), so the client's behaviour is checked on its own; and what `kr --help`/`--version`
import. The whole path through the host's real proxy and a real sshd is covered by
tests/e2e/test_ssh_proxy_sshd.py and tests/e2e/test_vps.py, whose `kr ssh` calls take these paths."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kohakuriver_cli.proxy_command_fast import parse_args
from kohakuriver_proto.ssh_handshake import NEED_DATA, ServerHandshake

KR = str(Path(sys.executable).with_name("kr"))
ENV = {"KOHAKURIVER_HOST": "http://127.0.0.1:8000", "KOHAKURIVER_TOKEN": "krt_x"}


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--proxy-port", "8002", "42"], ENV, ("127.0.0.1", 8002, 42, "krt_x")),
        (["--proxy-port=9", "42"], {"KOHAKURIVER_HOST": "https://h.lab:8000"}, ("h.lab", 9, 42, None)),
        (["42"], {**ENV, "KOHAKURIVER_SSH_PROXY_PORT": "7"}, ("127.0.0.1", 7, 42, "krt_x")),
        (["42"], ENV, None),  # no port: the full CLI asks the host
        (["--proxy-port", "8002", "42"], {}, None),  # no host in the environment: the credentials file
        (["--help"], ENV, None),
        (["--proxy-port", "8002", "4x2"], ENV, None),  # the full CLI explains the bad id
        (["--proxy-port", "70000", "42"], ENV, None),
        (["--proxy-port", "8002", "42", "43"], ENV, None),
        (["--proxy-port", "8002", "0"], ENV, None),
    ],
)
def test_parse_args_serves_only_the_generated_form(args, env, expected):
    assert parse_args(args, env) == expected


@pytest.mark.parametrize("module", ["proxy_command_fast", "ssh_fast"])
def test_the_fast_paths_import_no_cli_machinery(module):
    code = (
        f"import sys, kohakuriver_cli.entry, kohakuriver_cli.{module} as f\n"
        "import kohakuriver_proto.ssh_handshake, kohakuriver_cli.host_settings, kohakuriver_cli.ssh_keys\n"
        "heavy = [m for m in ('click', 'httpx', 'trio', 'rich', 'kohakuriver_host') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_kr_ssh_starts_ssh_before_the_slower_imports():
    """What `kr ssh ID` loads before it can start ssh (a pinned key): none of the standard modules it avoids
    on purpose (subprocess, threading, tempfile, shutil: the hand-over; socket, json, typing: later)."""
    code = (
        "import sys, kohakuriver_cli.entry, kohakuriver_cli.ssh_fast, kohakuriver_cli.known_hosts\n"
        "import kohakuriver_cli.ssh_keys, kohakuriver_cli.host_settings\n"
        "avoided = ('socket', 'subprocess', 'threading', 'tempfile', 'shutil', 'json', 'typing', 'attrs')\n"
        "loaded = [m for m in avoided if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["task", "--help"]])
def test_help_and_version_import_nothing_heavy(args):
    """What every `kr` pays before it does anything: click, and none of the network, UI or crypto stacks."""
    code = (
        "import sys\n"
        f"sys.argv = ['kr', *{args!r}]\n"
        "from kohakuriver_cli.entry import main\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert exc.code in (0, None), exc.code\n"
        "heavy = [m for m in ('httpx', 'trio', 'rich', 'cryptography', 'cattrs', 'kohakuriver_host',\n"
        "                     'kohakuriver_runner') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout


class FakeProxy:
    """Accepts one connection, answers the handshake with ``reply`` (None: SUCCESS), then echoes until EOF
    and half-closes, recording what it was asked."""

    def __init__(self, reply: str | None = None) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.port = self.sock.getsockname()[1]
        self.reply = reply
        self.request = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            hs = ServerHandshake()
            while (event := hs.next_event()) is NEED_DATA:
                hs.receive_data(conn.recv(4096))
            self.request = event
            if self.reply is not None:
                conn.sendall(hs.send_error(self.reply))
                return
            self.after_success(conn, hs.send_success())

    def after_success(self, conn: socket.socket, success: bytes) -> None:
        conn.sendall(success + b"early bytes|")
        while data := conn.recv(65536):
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)


def run_kr(port: int, stdin: bytes, task_id: str = "42") -> subprocess.CompletedProcess:
    env = {**os.environ, **ENV}
    return subprocess.run(
        [KR, "ssh", "proxy-command", "--proxy-port", str(port), task_id],
        input=stdin, capture_output=True, env=env, timeout=30,
    )  # fmt: skip


def test_success_pipes_both_ways_with_half_close():
    proxy = FakeProxy()
    payload = os.urandom(3 << 20)
    proc = run_kr(proxy.port, payload)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"early bytes|" + payload
    assert proxy.request.task_id == 42 and proxy.request.token == "krt_x"


def test_error_reply_is_printed_with_a_nonzero_exit():
    proxy = FakeProxy(reply="VPS 42 is not running (status: stopped)")
    proc = run_kr(proxy.port, b"")
    assert proc.returncode == 1
    assert proc.stderr.decode().strip() == "ERROR VPS 42 is not running (status: stopped)"
    assert proc.stdout == b""


def test_unreachable_proxy_exits_5():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = run_kr(port, b"")
    assert proc.returncode == 5
    assert "cannot reach the SSH proxy" in proc.stderr.decode()


# -- kr ssh ID: the tunnel opened by kr, the socket handed to ssh ------------------------------------------


class BannerProxy(FakeProxy):
    """After SUCCESS, plays an SSH server's first move (its banner) and records what the client sends."""

    def after_success(self, conn: socket.socket, success: bytes) -> None:
        conn.sendall(success + b"SSH-2.0-FakeServer\r\n")
        conn.settimeout(20)
        self.received = b""
        try:
            while b"\n" not in self.received and (data := conn.recv(4096)):
                self.received += data
        except OSError:
            pass


def run_kr_ssh(port: int, tmp_path: Path, task_id: str = "42") -> subprocess.CompletedProcess:
    env = {**os.environ, **ENV, "KOHAKURIVER_HOME": str(tmp_path / "home"), "HOME": str(tmp_path),
           "TMPDIR": str(tmp_path)}  # fmt: skip
    options = ["-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={tmp_path / 'known_hosts'}"]
    return subprocess.run(
        [KR, "ssh", task_id, "--proxy-port", str(port), *options, "--", "true"],
        capture_output=True, env=env, timeout=60, start_new_session=True,
    )  # fmt: skip


def pin_a_key(tmp_path: Path, task_id: str = "42") -> None:
    """A key pinned for the VPS: `kr ssh` then starts ssh before it opens the tunnel."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    (home / "known_hosts").write_text(f"kohakuriver-{task_id} ssh-ed25519 {'A' * 68}\n")


def no_process_left(tmp_path: Path) -> None:
    """Neither ssh nor its ProxyCommand outlives `kr ssh` (they name the hand-over socket under TMPDIR)."""
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path) not in out, out


@pytest.mark.skipif(shutil.which("ssh") is None and os.environ.get("CI") != "true", reason="needs OpenSSH")
def test_kr_ssh_hands_the_connected_socket_to_ssh(tmp_path):
    """ssh speaks on the very socket kr opened: the proxy sees the handshake, then ssh's own banner, and ssh
    saw the server's banner (it then fails the key exchange with this fake, as it should: 255)."""
    proxy = BannerProxy()
    proc = run_kr_ssh(proxy.port, tmp_path)
    proxy.thread.join(20)
    assert proxy.request.task_id == 42 and proxy.request.token == "krt_x"
    assert proxy.received.startswith(b"SSH-2.0-OpenSSH"), (proxy.received, proc.stderr)
    assert proc.returncode == 255
    assert not list(Path(tmp_path).glob("kr-ssh-*"))
    no_process_left(tmp_path)


@pytest.mark.skipif(shutil.which("ssh") is None and os.environ.get("CI") != "true", reason="needs OpenSSH")
@pytest.mark.parametrize("pinned", [False, True], ids=["ssh-starts-after", "ssh-started-early"])
def test_kr_ssh_refusal_is_one_line_and_nothing_else(tmp_path, pinned):
    """Unpinned, ssh never starts; pinned, it started before the handshake and is killed without a word, its
    ProxyCommand too."""
    if pinned:
        pin_a_key(tmp_path)
    proxy = BannerProxy(reply="VPS 42 is not running (status: stopped)")
    proc = run_kr_ssh(proxy.port, tmp_path)
    assert proc.returncode == 255
    assert proc.stderr.decode() == "ERROR VPS 42 is not running (status: stopped)\n"
    time.sleep(0.5)  # a ProxyCommand still starting would need this long to show up
    no_process_left(tmp_path)
    assert not list(tmp_path.glob("kr-ssh-*"))


@pytest.mark.skipif(shutil.which("ssh") is None and os.environ.get("CI") != "true", reason="needs OpenSSH")
def test_kr_ssh_started_early_gets_the_socket(tmp_path):
    """A pinned key: ssh starts before the tunnel is open and still speaks first on kr's socket, strictly
    checking the pinned key (the fake server's kex fails, as it should: 255)."""
    pin_a_key(tmp_path)
    proxy = BannerProxy()
    proc = run_kr_ssh(proxy.port, tmp_path)
    proxy.thread.join(20)
    assert proxy.request.task_id == 42 and proxy.request.token == "krt_x"
    assert proxy.received.startswith(b"SSH-2.0-OpenSSH"), (proxy.received, proc.stderr)
    assert proc.returncode == 255
    no_process_left(tmp_path)
    assert not list(tmp_path.glob("kr-ssh-*"))


def test_kr_ssh_unreachable_proxy(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = run_kr_ssh(port, tmp_path)
    assert proc.returncode == 255
    assert "cannot reach the SSH proxy" in proc.stderr.decode()
