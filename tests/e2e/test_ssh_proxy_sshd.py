"""Real ``ssh``/``scp`` to a real OpenSSH server (the ``kohakuriver/sshd`` image) through the host's SSH proxy
and ``kr ssh proxy-command``: ``kr ssh ID -- echo ok`` with a generated key, a 20 MiB ``scp`` both ways with
checksums, ``ssh -F <kr ssh config output>``, ``kr ssh ID --local-port N`` and a refusal. No ssh is given a
host key option and none has a terminal: ``kr ssh`` pins the VPS's key, which the host gets from the node.

The VPS creation path is someone else's: the container is started here (``docker run -p 127.0.0.1:P:22``,
the key put in with ``docker cp``) and recorded in the host's store as a running VPS whose ``ssh_port`` is P
on a node at 127.0.0.1, whose "runner" is a small HTTP server giving the container's own Ed25519 host key
(``GET /api/vps/<id>/host-key``, as a runner does). The host runs in-process (``serve_host``); ``kr``,
``ssh`` and ``scp`` are real processes with HOME and KOHAKURIVER_HOME (so kohakuriver's known_hosts) in the
test's directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import trio

from kohakuriver_cli.known_hosts import ssh_options
from kohakuriver_cli.ssh_keys import generate_ed25519, write_private_key
from tests.integration._host_harness import host_config, running_host
from tests.integration.test_ssh_proxy import seed_state, vps_task

from .cluster import KR, REPO, free_port

pytestmark = [pytest.mark.slow, pytest.mark.docker]

SSHD_IMAGE = "kohakuriver/sshd:latest"
TASK_ID = 4242


def _docker(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check, timeout=60)


def _wait_for_banner(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                if s.recv(64).startswith(b"SSH-2.0-"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"no SSH banner on 127.0.0.1:{port} within {timeout} s")


@contextmanager
def _node_with_host_key(host_key: str) -> Iterator[str]:
    """A stand-in for the VPS's runner: answers ``GET /api/vps/<TASK_ID>/host-key``; yields its URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            found = self.path == f"/api/vps/{TASK_ID}/host-key"
            body = {"task_id": str(TASK_ID), "host_key": host_key} if found else {"message": "no route"}
            data = json.dumps(body).encode()
            self.send_response(200 if found else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture
def sshd(tmp_path):
    """An sshd container on 127.0.0.1:<port> accepting a fresh Ed25519 key: (port, private key, home, its
    Ed25519 host key)."""
    if _docker("image", "inspect", SSHD_IMAGE, check=False).returncode != 0:
        subprocess.run(["bash", str(REPO / "scripts/images/sshd.sh")], check=True)
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    private, public = generate_ed25519(TASK_ID)
    key = write_private_key(home / ".ssh" / f"kohakuriver_{TASK_ID}", private)  # where kr ssh looks
    authorized = tmp_path / "authorized_keys"
    authorized.write_text(public + "\n")
    authorized.chmod(0o600)
    name = f"kr-test-sshd-{secrets.token_hex(4)}"
    port = free_port()
    try:
        _docker("run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:22", SSHD_IMAGE)
        _docker("cp", str(authorized), f"{name}:/root/.ssh/authorized_keys")
        _docker("exec", name, "chown", "root:root", "/root/.ssh/authorized_keys")
        _wait_for_banner(port)
        host_key = _docker("exec", name, "cat", "/etc/ssh/ssh_host_ed25519_key.pub").stdout
        yield port, key, home, " ".join(host_key.split()[:2])
    finally:
        _docker("rm", "-f", name, check=False)


async def _run(argv: list[str], env: dict[str, str], stdin: bytes = b"", timeout: float = 60):
    """No terminal: stdin is a pipe and the process has a session of its own (no /dev/tty to ask on)."""
    with trio.fail_after(timeout):
        return await trio.run_process(
            argv, env=env, stdin=stdin, capture_stdout=True, capture_stderr=True, check=False,
            start_new_session=True,
        )  # fmt: skip


async def test_ssh_scp_and_config_through_the_proxy(sshd, tmp_path, monkeypatch):
    port, key, home, host_key = sshd
    krhome = tmp_path / "krhome"
    monkeypatch.setenv("KOHAKURIVER_HOME", str(krhome))
    config = host_config(krhome)
    with _node_with_host_key(host_key) as node_url:
        users = await seed_state(
            config,
            users={"alice": "user", "bob": "user"},
            nodes={"n1": (node_url, True)},
            tasks=[lambda u: vps_task(TASK_ID, owner=u["alice"][:2], node="n1", ssh_port=port)],
        )
        await _through_the_proxy(krhome, config, users, key, home, host_key, tmp_path)


async def _through_the_proxy(krhome, config, users, key, home, host_key, tmp_path) -> None:
    known = krhome / "known_hosts"  # kohakuriver's own, where kr ssh pins the VPS's key
    alias = f"kohakuriver-{TASK_ID}"
    async with running_host(krhome, config) as host:
        proxy = str(host.handle.ssh_proxy_port)
        env = {
            **os.environ,
            "HOME": str(home),
            "KOHAKURIVER_HOME": str(krhome),
            "KOHAKURIVER_HOST": host.handle.url,
            "KOHAKURIVER_TOKEN": users["alice"][2],
        }
        env.pop("SSH_AUTH_SOCK", None)  # only the generated key may work

        # kr ssh ID -- COMMAND: the default key, the VPS's host key pinned first (no prompt, no option)
        assert not known.exists()
        r = await _run([KR, "ssh", str(TASK_ID), "--proxy-port", proxy, "--", "echo", "ok"], env)
        assert (r.returncode, r.stdout, r.stderr) == (0, b"ok\n", b"")
        assert known.read_text() == f"{alias} {host_key}\n"
        found = await _run(["ssh-keygen", "-F", alias, "-f", str(known)], env)  # ssh's own reader agrees
        assert found.returncode == 0 and host_key.split()[1].encode() in found.stdout, found
        r = await _run([KR, "ssh", str(TASK_ID), "--proxy-port", proxy, "--", "exit", "3"], env)
        assert r.returncode == 3, r.stderr

        # ssh -F <generated config>: plain ssh and scp with no kr in sight
        cfg = tmp_path / "ssh config" / "kohakuriver"
        r = await _run([KR, "ssh", "config", "--proxy-port", proxy, "--output", str(cfg)], env)
        assert r.returncode == 0, r.stderr
        assert f"Host {alias}" in cfg.read_text() and "StrictHostKeyChecking yes" in cfg.read_text()
        r = await _run(["ssh", "-F", str(cfg), alias, "true"], env)
        assert r.returncode == 0, r.stderr

        blob = tmp_path / "blob"
        data = os.urandom(20 * 1024 * 1024)
        blob.write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        start = time.monotonic()
        r = await _run(["scp", "-F", str(cfg), str(blob), f"{alias}:/tmp/blob"], env)
        upload = time.monotonic() - start
        assert r.returncode == 0, r.stderr
        r = await _run(["ssh", "-F", str(cfg), alias, "sha256sum", "/tmp/blob"], env)
        assert r.stdout.split()[0].decode() == digest, r.stderr
        back = tmp_path / "back"
        r = await _run(["scp", "-F", str(cfg), f"{alias}:/tmp/blob", str(back)], env)
        assert r.returncode == 0, r.stderr
        assert hashlib.sha256(back.read_bytes()).hexdigest() == digest
        print(f"20 MiB scp upload through the proxy: {upload:.2f} s")

        # stdin to a remote command, EOF included (half-close through both hops)
        r = await _run(
            [KR, "ssh", str(TASK_ID), "--proxy-port", proxy, "--", "wc", "-c"],
            env,
            b"x" * 100_000,
        )
        assert (r.returncode, r.stdout.strip()) == (0, b"100000"), r.stderr

        # refusals reach the user as one ERROR line and a non-zero exit
        r = await _run([KR, "ssh", "proxy-command", "--proxy-port", proxy, "999"], env)
        assert (r.returncode, r.stderr) == (1, b"ERROR task 999 not found\n")
        bob = {**env, "KOHAKURIVER_TOKEN": users["bob"][2]}
        r = await _run([KR, "ssh", "proxy-command", "--proxy-port", proxy, str(TASK_ID)], bob)
        assert (r.returncode, r.stderr) == (1, f"ERROR not allowed to reach task {TASK_ID}\n".encode())

        await _local_port_mode(env, proxy, known, key)


async def _local_port_mode(env: dict[str, str], proxy: str, known: Path, key: Path) -> None:
    """``kr ssh ID --local-port N``: plain ``ssh -p N`` works until Ctrl-C, checking the pinned key as the
    hint kr prints says."""
    local = free_port()
    argv = [KR, "ssh", str(TASK_ID), "--proxy-port", proxy, "--local-port", str(local)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with trio.fail_after(20):
            while True:
                try:
                    (await trio.open_tcp_stream("127.0.0.1", local)).socket.close()
                    break
                except OSError:
                    assert proc.poll() is None, proc.stderr.read()
                    await trio.sleep(0.05)
        ssh = ["ssh", "-p", str(local), "-i", str(key), "-o", "IdentitiesOnly=yes"]
        for option in ssh_options(f"kohakuriver-{TASK_ID}", known):
            ssh += ["-o", option]
        ssh += ["root@127.0.0.1", "echo", "local"]
        r = await _run(ssh, env)
        assert (r.returncode, r.stdout) == (0, b"local\n"), r.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
