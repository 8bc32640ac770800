"""VPS and SSH end to end: ``kr vps create`` on a real runner (the ``kohakuriver/sshd`` image), then real
``ssh``/``scp``/``rsync`` through the host's SSH proxy and ``kr ssh proxy-command``.

Covered: ``kr ssh ID -- cmd`` (the proxy port learnt from the host, no ``--proxy-port``), a 100 MiB ``scp``
both ways with checksums, ``ssh -F <kr ssh config --output>``, ``rsync``; host keys pinned with no prompt
and no ssh option (no terminal: every process runs in a session of its own with stdin not a tty), and a
changed pinned key refused; every key mode (default upload of
``~/.ssh/id_*.pub``, ``--gen-ssh-key``, ``--public-key-file``, ``--no-ssh-key``, ``--no-ssh``); every
REQUEST_TUNNEL refusal through the real proxy (unknown task, command task, stopped VPS, offline node, no SSH
port, another user's token); a file surviving ``kr vps restart`` (in place, and stop + restart from the
snapshot); ``kr vps snapshot create|list|delete``; pause/resume.

``HOME`` is a temporary directory with its own key pair (so ``kr vps create`` uploads that one and
``--gen-ssh-key`` writes there); ``ssh`` gets ``-i`` explicitly where it would otherwise look in the real
user's home (OpenSSH takes ``~`` from the password database, not from ``HOME``), and no agent. No test gives
ssh a host key option: ``kr ssh`` and ``kr ssh config`` pin each VPS's key in the cluster's KOHAKURIVER_HOME.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .cluster import KR, Cluster, free_port, local_image, running_cluster, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.docker]

SSHD_IMAGE = "kohakuriver/sshd:latest"
MIB = 1 << 20


# -- fixtures ------------------------------------------------------------------------------------------------


class VpsCluster:
    """A real cluster plus a user's side of it: a HOME with a key pair, kohakuriver's known_hosts (where
    ``kr ssh`` pins host keys), the env that ``kr``/``ssh`` run with, and every VPS created (their snapshot
    images are removed at the end)."""

    def __init__(self, cluster: Cluster, root: Path) -> None:
        self.cluster = cluster
        self.home = root / "user-home"
        (self.home / ".ssh").mkdir(parents=True, mode=0o700)
        self.key = self.home / ".ssh" / "id_ed25519"
        _keygen(self.key)
        self.known_hosts = cluster.home / "known_hosts"
        # A copy: the daemons keep the dict they were started with.
        self.env = dict(cluster.env, HOME=str(self.home))
        self.env.pop("SSH_AUTH_SOCK", None)  # only the keys a test names may work
        self.env.pop("KOHAKURIVER_SSH_PROXY_PORT", None)  # kr must learn the port from the host
        self.created: list[str] = []

    def run(self, argv: list[str], *, token: str | None = None, timeout: float = 120,
            input: bytes | None = None) -> subprocess.CompletedProcess:  # fmt: skip
        """No terminal, as in a script or CI: a session of its own (ssh cannot open /dev/tty to ask
        anything) and stdin never a tty."""
        env = dict(self.env)
        if token is not None:
            env["KOHAKURIVER_TOKEN"] = token
        stdin = subprocess.DEVNULL if input is None else None
        return subprocess.run(argv, env=env, capture_output=True, timeout=timeout, input=input, stdin=stdin,
                              start_new_session=True)  # fmt: skip

    def kr(self, *args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        proc = self.run([KR, *args], **kwargs)
        if check:
            assert proc.returncode == 0, f"kr {args} -> {proc.returncode}\n{_text(proc)}"
        return proc

    def create(self, *options: str) -> str:
        """``kr vps create -c 0 --image sshd --wait OPTIONS``: the id of the running VPS."""
        proc = self.kr("vps", "create", "-c", "0", "--image", SSHD_IMAGE, "--wait", *options)
        task_id = proc.stdout.decode().split()[0]
        self.created.append(task_id)
        return task_id

    def kr_ssh(self, task_id: str, *command: str, key: Path | None = None, options: tuple[str, ...] = (),
               input: bytes | None = None) -> subprocess.CompletedProcess:  # fmt: skip
        """``kr ssh ID [--key KEY] [-o OPTION...] -- COMMAND`` (no --proxy-port: kr asks the host)."""
        argv = [KR, "ssh", task_id]
        if key is not None:
            argv += ["--key", str(key)]
        for option in options:
            argv += ["-o", option]
        return self.run([*argv, "--", *command], input=input)

    def wait_ssh(self, task_id: str, key: Path | None = None, timeout: float = 30) -> None:
        """Until ``kr ssh ID -- true`` works: ``running`` means the container started, sshd may need a
        moment more (and a restarted runner a heartbeat to be reachable again)."""
        last: list[subprocess.CompletedProcess] = []

        def ok() -> bool:
            last[:] = [self.kr_ssh(task_id, "true", key=key)]
            return last[0].returncode == 0

        wait_until(ok, timeout, f"ssh to VPS {task_id}: {last and _text(last[0])}", interval=0.3)

    def proxy_command(self, task_id: str, token: str | None = None) -> subprocess.CompletedProcess:
        """``kr ssh proxy-command ID`` with nothing on stdin: a refusal is all it can answer with."""
        return self.run([KR, "ssh", "proxy-command", task_id], token=token, input=b"", timeout=60)


@pytest.fixture(scope="module")
def sshd_image() -> str:
    return local_image(SSHD_IMAGE, "sshd.sh")


@contextlib.contextmanager
def _vps_cluster(root: Path) -> Iterator[VpsCluster]:
    """A host and a runner whose SSH ports start at a free port (other clusters on this machine allocate
    from 2222 too), with a user's side; the VPS's snapshot images are removed once the cluster stopped."""
    created: list[str] = []
    try:
        with running_cluster(root / "cluster", VPS_SSH_PORT_START=free_port()) as cluster:
            vc = VpsCluster(cluster, root)
            created = vc.created
            yield vc
    finally:
        _remove_snapshots(created)


@pytest.fixture(scope="module")
def vc(tmp_path_factory, sshd_image):
    """One cluster for the tests that do not disturb each other (each makes its own VPS)."""
    with _vps_cluster(tmp_path_factory.mktemp("vps")) as vc:
        yield vc


# -- helpers -------------------------------------------------------------------------------------------------


def _text(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout.decode(errors="replace") if isinstance(proc.stdout, bytes) else proc.stdout
    err = proc.stderr.decode(errors="replace") if isinstance(proc.stderr, bytes) else proc.stderr
    return f"stdout: {out[-2000:]}\nstderr: {err[-2000:]}"


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "kr-test", "-f", str(path)],
                   check=True, capture_output=True)  # fmt: skip


def _snapshot_tags(task_id: str) -> list[str]:
    out = subprocess.run(
        ["docker", "images", "--format", "{{.Repository}}:{{.Tag}}", f"kohakuriver-snapshot/vps-{task_id}"],
        capture_output=True, text=True,
    ).stdout  # fmt: skip
    return out.split()


def _remove_snapshots(task_ids: list[str]) -> None:
    tags = [tag for task_id in task_ids for tag in _snapshot_tags(task_id)]
    if tags:
        subprocess.run(["docker", "rmi", "-f", *tags], capture_output=True)


def _container_state(task_id: str) -> dict:
    out = subprocess.run(
        ["docker", "inspect", "--format", "{{json .State}}", f"kohakuriver-task-{task_id}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return json.loads(out)


def _refusal(proc: subprocess.CompletedProcess) -> str:
    """The ERROR line ``kr ssh proxy-command`` prints for a refused tunnel (exit 1, nothing on stdout)."""
    assert proc.returncode == 1 and proc.stdout == b"", _text(proc)
    return proc.stderr.decode()


def _raw_request(port: int, line: bytes, timeout: float = 15) -> tuple[socket.socket, bytes]:
    """Send a handshake line to the proxy by hand; the socket and the reply line."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(line)
    reply = b""
    while not reply.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        reply += chunk
    return sock, reply


# -- SSH through the proxy -----------------------------------------------------------------------------------


def test_generated_key_ssh_scp_config_and_rsync(vc: VpsCluster, tmp_path: Path) -> None:
    """``--gen-ssh-key``: the private key lands in ~/.ssh/kohakuriver_<id> (0600) and is what ``kr ssh`` and
    the generated ssh config use; the proxy port is learnt from the host, never given."""
    task_id = vc.create("--gen-ssh-key")
    key = vc.home / ".ssh" / f"kohakuriver_{task_id}"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    record = vc.cluster.task(task_id)
    assert (record["ssh_key_mode"], record["status"]) == ("generate", "running")
    assert isinstance(record["ssh_port"], int)

    # The first `kr ssh` pins the VPS's host key (no prompt, no option, no terminal) where ssh checks it.
    alias = f"kohakuriver-{task_id}"
    assert alias not in (vc.known_hosts.read_text() if vc.known_hosts.exists() else "")
    vc.wait_ssh(task_id)
    host_key = vc.cluster.api("GET", f"/api/vps/{task_id}/host-key")["host_key"]
    assert f"{alias} {host_key}\n" in vc.known_hosts.read_text()
    r = vc.kr_ssh(task_id, "echo", "ok")
    assert (r.returncode, r.stdout, r.stderr) == (0, b"ok\n", b""), _text(r)
    r = vc.kr_ssh(task_id, "hostname")
    assert r.stdout.decode().strip() == f"vps-{task_id}", _text(r)

    # ssh -F <generated config>: no kr on the command line, ProxyCommand does it
    cfg = tmp_path / "kohakuriver.sshconfig"
    vc.kr("ssh", "config", "--output", str(cfg))
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
    text = cfg.read_text()
    assert f"Host {alias}\n" in text and f"--proxy-port {vc.cluster.ssh_port} {task_id}" in text, text
    assert f"    UserKnownHostsFile {vc.known_hosts}\n" in text, text
    ssh = ["ssh", "-F", str(cfg)]
    r = vc.run([*ssh, alias, "true"])
    assert r.returncode == 0, _text(r)

    # 100 MiB scp up and back, checksums on both ends
    blob = tmp_path / "blob"
    data = os.urandom(100 * MIB)
    blob.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    scp = ["scp", "-F", str(cfg)]
    r = vc.run([*scp, str(blob), f"{alias}:blob"])
    assert r.returncode == 0, _text(r)
    r = vc.run([*ssh, alias, "sha256sum", "blob"])
    assert r.stdout.split()[:1] == [digest.encode()], _text(r)
    back = tmp_path / "back"
    r = vc.run([*scp, f"{alias}:blob", str(back)])
    assert r.returncode == 0, _text(r)
    assert hashlib.sha256(back.read_bytes()).hexdigest() == digest
    back.unlink()
    blob.unlink()

    # rsync over the same config, twice: the second run finds nothing to send
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.txt").write_text("alpha\n")
    (tree / "sub" / "b.bin").write_bytes(os.urandom(300_000))
    rsh = f"ssh -F {cfg}"
    rsync = ["rsync", "-a", "--stats", "-e", rsh, f"{tree}/", f"{alias}:tree/"]
    r = vc.run(rsync)
    assert r.returncode == 0, _text(r)
    r = vc.run([*ssh, alias, "cat tree/a.txt && sha256sum tree/sub/b.bin"])
    expected = hashlib.sha256((tree / "sub" / "b.bin").read_bytes()).hexdigest()
    assert r.stdout.decode().split()[:2] == ["alpha", expected], _text(r)
    r = vc.run(rsync)
    assert r.returncode == 0 and b"Number of regular files transferred: 0" in r.stdout, _text(r)

    # stdin through both hops, EOF included; the remote exit code comes back
    r = vc.kr_ssh(task_id, "wc", "-c", input=b"y" * 123_456)
    assert (r.returncode, r.stdout.strip()) == (0, b"123456"), _text(r)
    assert vc.kr_ssh(task_id, "exit 7").returncode == 7

    # A pinned key that is not the VPS's any more: ssh refuses, kr says where the pinned key is.
    pinned = vc.known_hosts.read_text()
    other = tmp_path / "other_host_key"
    _keygen(other)
    other_key = " ".join(Path(f"{other}.pub").read_text().split()[:2])
    vc.known_hosts.write_text(pinned.replace(host_key, other_key))
    try:
        r = vc.kr_ssh(task_id, "true")
        assert r.returncode == 255, _text(r)
        assert b"HOST IDENTIFICATION HAS CHANGED" in r.stderr, _text(r)
        hint = [line for line in r.stderr.decode().splitlines() if line.startswith("kr ssh:")]
        assert len(hint) == 1 and str(vc.known_hosts) in hint[0] and "re-created node" in hint[0], _text(r)
        r = vc.run([*ssh, alias, "true"])  # the config's entries check the same file
        assert r.returncode == 255 and b"HOST IDENTIFICATION HAS CHANGED" in r.stderr, _text(r)
    finally:
        vc.known_hosts.write_text(pinned)
    assert vc.kr_ssh(task_id, "true").returncode == 0


def test_default_key_mode_uploads_the_users_key(vc: VpsCluster) -> None:
    """No key option: ~/.ssh/id_ed25519.pub (of $HOME) is injected; the matching private key logs in."""
    task_id = vc.create()
    assert vc.cluster.task(task_id)["ssh_key_mode"] == "upload"
    vc.wait_ssh(task_id, key=vc.key)
    r = vc.kr_ssh(task_id, "cat", ".ssh/authorized_keys", key=vc.key)
    assert r.returncode == 0, _text(r)
    assert r.stdout.decode().split()[:2] == (vc.key.with_suffix(".pub")).read_text().split()[:2]


def test_public_key_file_mode_injects_only_that_key(vc: VpsCluster, tmp_path: Path) -> None:
    other = tmp_path / "other_key"
    _keygen(other)
    task_id = vc.create("--public-key-file", f"{other}.pub")
    assert vc.cluster.task(task_id)["ssh_key_mode"] == "upload"
    vc.wait_ssh(task_id, key=other)
    r = vc.kr_ssh(task_id, "echo", "other", key=other)
    assert (r.returncode, r.stdout) == (0, b"other\n"), _text(r)
    r = vc.kr_ssh(task_id, "true", key=vc.key)  # the default key was not uploaded this time
    assert r.returncode == 255 and b"Permission denied" in r.stderr, _text(r)


def test_no_ssh_key_mode_refuses_every_login(vc: VpsCluster, tmp_path: Path) -> None:
    """sshd runs and answers, but no key gets in and it offers no password login at all."""
    task_id = vc.create("--no-ssh-key")
    record = vc.cluster.task(task_id)
    assert record["ssh_key_mode"] == "none" and isinstance(record["ssh_port"], int)
    fresh = tmp_path / "fresh"
    _keygen(fresh)

    def denied(key: Path) -> subprocess.CompletedProcess:
        return vc.kr_ssh(task_id, "true", key=key, options=("LogLevel=DEBUG1",))

    # sshd may still be starting: wait until it answers at all (a refusal, by key)
    result: list[subprocess.CompletedProcess] = []
    wait_until(lambda: result.append(denied(vc.key)) or b"Permission denied" in result[-1].stderr, 30,
               f"sshd of VPS {task_id} to answer: {result and _text(result[-1])}", 0.3)  # fmt: skip
    for key in (vc.key, fresh):
        r = denied(key)
        assert r.returncode == 255 and b"Permission denied (publickey)" in r.stderr, _text(r)
        # the server offers public keys only: no password, no keyboard-interactive
        offered = {
            line for line in r.stderr.decode().splitlines() if "Authentications that can continue" in line
        }
        assert offered and all(line.endswith(": publickey") for line in offered), offered


def test_no_ssh_has_no_port_and_the_proxy_refuses(vc: VpsCluster) -> None:
    task_id = vc.create("--no-ssh")
    record = vc.cluster.task(task_id)
    assert (record["ssh_key_mode"], record["ssh_port"], record["status"]) == ("disabled", None, "running")
    message = _refusal(vc.proxy_command(task_id))
    assert message == f"ERROR VPS {task_id} has no SSH port (was it created without SSH?)\n"
    r = vc.kr_ssh(task_id, "true")
    assert r.returncode == 255 and f"VPS {task_id} has no SSH port".encode() in r.stderr, _text(r)


# -- refusals through the real proxy -------------------------------------------------------------------------


def test_proxy_refusals(vc: VpsCluster) -> None:
    """Each REQUEST_TUNNEL refusal the real proxy gives, with its message (node offline: its own test)."""
    cluster = vc.cluster
    unknown = "999999999999"
    assert _refusal(vc.proxy_command(unknown)) == f"ERROR task {unknown} not found\n"

    command = cluster.kr("task", "submit", "-c", "0", "--", "sleep", "600").stdout.split()[0]
    cluster.wait_status(command, "running")
    assert _refusal(vc.proxy_command(command)) == (
        f"ERROR task {command} is a command task, not a VPS: only VPS tasks have SSH\n"
    )
    cluster.kr("task", "kill", command)

    task_id = vc.create("--gen-ssh-key")
    bob = cluster.kr("user", "create", f"bob-{cluster.tag}").stdout.strip()
    assert _refusal(vc.proxy_command(task_id, token=bob)) == f"ERROR not allowed to reach task {task_id}\n"
    # bob's refusal says nothing about what the task is: the same answer as for a command task
    assert _refusal(vc.proxy_command(command, token=bob)) == f"ERROR not allowed to reach task {command}\n"
    assert _refusal(vc.proxy_command(task_id, token="not-a-token")).startswith("ERROR ")

    # the seed's unauthenticated form, by hand: SUCCESS then the VPS's sshd banner
    sock, reply = _raw_request(cluster.ssh_port, f"REQUEST_TUNNEL {task_id}\n".encode())
    with sock:
        assert reply == b"SUCCESS\n"
        assert sock.recv(64).startswith(b"SSH-2.0-")

    vc.kr("vps", "stop", task_id)
    assert cluster.task(task_id)["status"] == "stopped"
    assert _refusal(vc.proxy_command(task_id)) == f"ERROR VPS {task_id} is not running (status: stopped)\n"
    sock, reply = _raw_request(cluster.ssh_port, f"REQUEST_TUNNEL {task_id}\n".encode())
    sock.close()
    assert reply == f"ERROR VPS {task_id} is not running (status: stopped)\n".encode()


def test_node_offline_refusal_and_return(tmp_path: Path, sshd_image: str) -> None:
    """The runner stops, the node goes offline: the proxy says so; the runner comes back with the VPS
    still alive (its container kept running): SSH works again."""
    with _vps_cluster(tmp_path) as vc:
        cluster = vc.cluster
        task_id = vc.create("--gen-ssh-key")
        vc.wait_ssh(task_id)
        name = cluster.runner_name(0)
        runner = cluster.runners[name]
        runner.stop()
        wait_until(lambda: cluster.api("GET", f"/api/nodes/{name}")["status"] == "offline", 30,
                   f"node {name} to go offline")  # fmt: skip
        assert _refusal(vc.proxy_command(task_id)) == f"ERROR node {name} of VPS {task_id} is offline\n"
        assert _container_state(task_id)["Running"]

        runner.start()
        cluster.wait_node_online(name)
        cluster.wait_status(task_id, "running", timeout=30)
        vc.wait_ssh(task_id)


# -- lifecycle: restart, snapshots, pause --------------------------------------------------------------------


def test_files_survive_restart_and_stop_restart(vc: VpsCluster) -> None:
    cluster = vc.cluster
    task_id = vc.create("--gen-ssh-key")
    vc.wait_ssh(task_id)
    r = vc.kr_ssh(task_id, "echo kept-1 > marker && sync")
    assert r.returncode == 0, _text(r)
    started = _container_state(task_id)["StartedAt"]

    # a running VPS restarts in place: same container, new start
    vc.kr("vps", "restart", task_id)
    cluster.wait_status(task_id, "running")
    wait_until(lambda: _container_state(task_id)["StartedAt"] != started, 30, "the container to restart")
    vc.wait_ssh(task_id)
    r = vc.kr_ssh(task_id, "cat", "marker")
    assert r.stdout == b"kept-1\n", _text(r)

    # stop (snapshot taken, container removed), then restart: re-created from the snapshot
    r = vc.kr_ssh(task_id, "echo kept-2 >> marker && sync")
    assert r.returncode == 0, _text(r)
    vc.kr("vps", "stop", task_id)
    assert cluster.task(task_id)["status"] == "stopped"
    assert len(_snapshot_tags(task_id)) == 1
    gone = subprocess.run(["docker", "inspect", f"kohakuriver-task-{task_id}"], capture_output=True)
    assert gone.returncode != 0, "the stopped VPS's container is still there"
    vc.kr("vps", "restart", task_id)
    cluster.wait_status(task_id, "running")
    vc.wait_ssh(task_id)  # the same generated key still works: it is injected again
    r = vc.kr_ssh(task_id, "cat", "marker")
    assert r.stdout == b"kept-1\nkept-2\n", _text(r)


def test_snapshot_create_list_delete(vc: VpsCluster) -> None:
    task_id = vc.create("--gen-ssh-key")
    vc.wait_ssh(task_id)
    tag = vc.kr("vps", "snapshot", "create", task_id).stdout.decode().strip()
    assert tag.startswith(f"kohakuriver-snapshot/vps-{task_id}:"), tag
    timestamp = tag.rpartition(":")[2]
    assert tag in _snapshot_tags(task_id)
    listed = json.loads(vc.kr("vps", "snapshot", "list", task_id, "--json").stdout)
    snapshots = listed["snapshots"] if isinstance(listed, dict) else listed
    assert [s["tag"] for s in snapshots] == [tag], listed
    table = vc.kr("vps", "snapshot", "list", task_id).stdout.decode()
    assert timestamp in table
    # the VPS kept running through the commit
    assert vc.cluster.task(task_id)["status"] == "running"
    assert vc.kr_ssh(task_id, "true").returncode == 0

    vc.kr("vps", "snapshot", "delete", task_id, timestamp)
    assert _snapshot_tags(task_id) == []
    listed = json.loads(vc.kr("vps", "snapshot", "list", task_id, "--json").stdout)
    assert (listed["snapshots"] if isinstance(listed, dict) else listed) == []
    r = vc.kr("vps", "snapshot", "delete", task_id, timestamp, check=False)
    assert r.returncode != 0 and r.stderr, _text(r)


def test_pause_and_resume(vc: VpsCluster) -> None:
    """Paused: the proxy still connects (SUCCESS) but the frozen sshd says nothing; resumed, the same
    connection gets its banner and ``kr ssh`` works."""
    cluster = vc.cluster
    task_id = vc.create("--gen-ssh-key")
    vc.wait_ssh(task_id)
    vc.kr("vps", "pause", task_id)
    assert cluster.task(task_id)["status"] == "paused"
    assert _container_state(task_id)["Paused"]
    sock, reply = _raw_request(cluster.ssh_port, f"REQUEST_TUNNEL {task_id}\n".encode())
    with sock:
        assert reply == b"SUCCESS\n"
        sock.settimeout(1.0)
        with pytest.raises(TimeoutError):
            sock.recv(64)
        vc.kr("vps", "resume", task_id)
        sock.settimeout(15)
        assert sock.recv(64).startswith(b"SSH-2.0-")
    assert cluster.task(task_id)["status"] == "running"
    assert not _container_state(task_id)["Paused"]
    r = vc.kr_ssh(task_id, "echo", "awake")
    assert (r.returncode, r.stdout) == (0, b"awake\n"), _text(r)


def test_kr_ssh_fails_cleanly_for_a_stopped_vps(vc: VpsCluster) -> None:
    """What a user sees when the proxy refuses inside ``kr ssh``: ssh fails (255) and the ERROR is shown."""
    task_id = vc.create("--gen-ssh-key")
    vc.kr("vps", "stop", task_id)
    started = time.monotonic()
    r = vc.kr_ssh(task_id, "true")
    assert r.returncode == 255, _text(r)
    assert f"ERROR VPS {task_id} is not running (status: stopped)".encode() in r.stderr, _text(r)
    assert time.monotonic() - started < 10
