"""``kr ssh ID``'s fd passer with a real OpenSSH client and server: the tunnel socket ``kr`` opened reaches
ssh through ``tunnel-client --fdpass`` (the static Rust binary; the Python one-liner where none is found),
ssh logs in over that very socket (sshd names its client port), and ``kr`` picks a binary only when it
answers ``--fdpass-probe``, asking each build once.

The sshd is ``running_sshd`` of test_vm_ssh.py (root, an Ed25519 host key, key-only login). The full path
through the host's real SSH proxy and a VPS is tests/e2e/test_vps.py's; here a proxy of a few lines (the
handshake's server side, then a byte relay) stands in for it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from kohakuriver_cli import ssh_fast
from kohakuriver_proto.ssh_handshake import NEED_DATA, ServerHandshake
from tests.integration.test_vm_ssh import running_sshd
from tests.need import need

REPO = Path(__file__).resolve().parents[2]
BINARY = REPO / "tunnel-client-rs" / "target" / "release" / "tunnel-client"
KR = str(Path(sys.executable).with_name("kr"))
TASK_ID = 4242


def require_binary() -> str:
    ok = BINARY.is_file() and os.access(BINARY, os.X_OK)
    need(ok, f"{BINARY} is missing: build it with `bash tunnel-client-rs/build.sh`")
    return str(BINARY)


def pin(path: Path, host_public_key: str) -> list[str]:
    """Pin the sshd's key for ``kohakuriver-<TASK_ID>`` in ``path``; the options that check it."""
    path.write_text(f"kohakuriver-{TASK_ID} {host_public_key}\n")
    return [f"UserKnownHostsFile={path}", f"HostKeyAlias=kohakuriver-{TASK_ID}", "StrictHostKeyChecking=yes"]


@pytest.mark.parametrize("passer", ["rust", "python"])
def test_the_tunnel_socket_reaches_a_real_ssh_and_sshd(tmp_path, capfd, passer):
    """``FdpassSsh`` hands a socket this test connected to sshd to a real ssh through the passer; ssh runs a
    command over it, and sshd's log names that socket's port: no other connection was made."""
    binary = require_binary() if passer == "rust" else None
    with running_sshd(tmp_path) as sshd:
        tunnel = ssh_fast._connect("127.0.0.1", sshd.target.port, 10)
        tunnel.settimeout(None)
        client_port = tunnel.getsockname()[1]
        checking = pin(tmp_path / "known_hosts", sshd.target.host_public_key)
        argvs: list[list[str]] = []

        def argv_of(path: str) -> list[str]:
            argv = ssh_fast.fast_ssh_argv(
                TASK_ID, proxy_options=ssh_fast.fdpass_options(path, binary), user="root",
                key=sshd.target.key.private_path, options=["BatchMode=yes", "LogLevel=ERROR"],
                command=["echo", "over-the-passed-socket"], ssh="ssh", host_key_options=checking,
            )  # fmt: skip
            argvs.append(argv)
            return argv

        env = {**os.environ, "TMPDIR": str(tmp_path)}
        env["PATH"] = os.environ.get("PATH", os.defpath)
        ssh_path = ssh_fast._which("ssh", env)
        assert ssh_path is not None
        code = ssh_fast.FdpassSsh(lambda p: [ssh_path, *argv_of(p)[1:]], env).serve(tunnel)
        out, err = capfd.readouterr()
        assert code == 0, err
        assert out == "over-the-passed-socket\n"
        log = sshd.log.read_text()
    assert f"Accepted publickey for root from 127.0.0.1 port {client_port}" in log
    [proxy] = [o for o in argvs[0] if o.startswith("ProxyCommand=")]
    assert (f"{binary} --fdpass " in proxy) if binary else (" -S -I -c " in proxy)
    assert not list(tmp_path.glob("kr-ssh-*"))  # the hand-over directory is gone


class RelayProxy:
    """The host's SSH proxy in miniature: one connection, the handshake's server side, then a byte relay to
    ``target`` both ways (half-closes passed on)."""

    def __init__(self, target: int) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.target = target
        self.request = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        hs = ServerHandshake()
        while (event := hs.next_event()) is NEED_DATA:
            hs.receive_data(conn.recv(4096))
        self.request = event
        upstream = socket.create_connection(("127.0.0.1", self.target))
        conn.sendall(hs.send_success())
        early, _closed = hs.trailing_data
        upstream.sendall(early)
        back = threading.Thread(target=self._copy, args=(upstream, conn), daemon=True)
        back.start()
        self._copy(conn, upstream)
        back.join(20)
        conn.close()
        upstream.close()

    @staticmethod
    def _copy(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def test_kr_ssh_runs_ssh_with_the_rust_passer(tmp_path):
    """The real ``kr ssh ID``: it finds the checkout's tunnel-client (probed once, the answer kept in its
    home), ssh runs it as its proxy dialer (ssh's debug log says so) and the command runs in the real sshd."""
    binary = require_binary()
    with running_sshd(tmp_path) as sshd:
        proxy = RelayProxy(sshd.target.port)
        home = tmp_path / "krhome"
        home.mkdir()
        pin(home / "known_hosts", sshd.target.host_public_key)
        env = {**os.environ, "KOHAKURIVER_HOME": str(home), "KOHAKURIVER_HOST": "http://127.0.0.1:9",
               "KOHAKURIVER_TOKEN": "krt_x", "HOME": str(tmp_path), "TMPDIR": str(tmp_path)}  # fmt: skip
        env.pop("KOHAKURIVER_TUNNEL_CLIENT", None)
        proc = subprocess.run(
            [KR, "ssh", str(TASK_ID), "--key", str(sshd.target.key.private_path),
             "--proxy-port", str(proxy.port), "-o", "BatchMode=yes", "-o", "LogLevel=DEBUG1",
             "--", "echo", "via-kr-ssh"],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        proxy.thread.join(20)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "via-kr-ssh\n"
    assert proxy.request.task_id == TASK_ID and proxy.request.token == "krt_x"
    assert f"Executing proxy dialer command: exec {binary} --fdpass " in proc.stderr
    [line] = (home / ssh_fast.FDPASS_CACHE).read_text().splitlines()
    assert line.startswith("yes ") and line.endswith(f" {binary}")


def test_only_a_binary_that_answers_the_probe_is_used_and_each_build_is_asked_once(tmp_path, monkeypatch):
    binary = require_binary()
    monkeypatch.setenv("KOHAKURIVER_HOME", str(tmp_path / "home"))
    asked = tmp_path / "asked"
    old = tmp_path / "old" / "tunnel-client"
    old.parent.mkdir()
    # A build from before the mode: clap refuses the flag (exit 2), as the real older binary does.
    old.write_text(
        f'#!/bin/sh\necho "$@" >> {asked}\necho "error: unexpected argument \'$1\' found" >&2\nexit 2\n'
    )
    old.chmod(0o755)
    monkeypatch.setattr(ssh_fast, "_passer_candidates", lambda environ: [str(old), binary])
    assert ssh_fast.fdpass_binary({}) == binary
    assert ssh_fast.fdpass_binary({}) == binary
    assert asked.read_text() == "--fdpass-probe\n"  # once: the answer is kept
    cache = (tmp_path / "home" / ssh_fast.FDPASS_CACHE).read_text().splitlines()
    assert [line.split()[0] for line in cache] == ["no", "yes"]
    # Rebuilt (another size): asked again. Now it has the mode, so it is the one used.
    old.write_text(f"#!/bin/sh\necho \"$@\" >> {asked}\necho 'fdpass 1'\n")
    assert ssh_fast.fdpass_binary({}) == str(old)
    assert asked.read_text() == "--fdpass-probe\n--fdpass-probe\n"
    # The environment decides when it says: a path is used as given, empty means the Python passer.
    assert ssh_fast.fdpass_binary({"KOHAKURIVER_TUNNEL_CLIENT": "/x/tunnel-client"}) == "/x/tunnel-client"
    assert ssh_fast.fdpass_binary({"KOHAKURIVER_TUNNEL_CLIENT": ""}) is None


def test_a_probe_that_hangs_is_given_up(tmp_path):
    hangs = tmp_path / "tunnel-client"
    hangs.write_text("#!/bin/sh\nexec sleep 30\n")
    hangs.chmod(0o755)
    assert ssh_fast._probe(str(hangs), timeout=0.3) is False
    assert ssh_fast._probe(str(tmp_path / "missing")) is False


def test_the_candidates_are_beside_kr_the_build_output_the_home_and_path(tmp_path, monkeypatch):
    monkeypatch.setenv("KOHAKURIVER_HOME", str(tmp_path / "home"))
    on_path = tmp_path / "bin" / "tunnel-client"
    on_path.parent.mkdir()
    on_path.write_text("#!/bin/sh\n")
    on_path.chmod(0o755)
    found = ssh_fast._passer_candidates({"PATH": str(on_path.parent)})
    assert found == [
        str(Path(sys.executable).parent / "tunnel-client"),
        str(BINARY),
        str(tmp_path / "home" / "tunnel-client"),
        str(on_path),
    ]
