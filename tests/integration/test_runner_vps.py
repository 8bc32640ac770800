"""Docker VPS on the runner, against real Docker, the real sshd image and the real ``ssh`` client.

The runner runs in the test's nursery (``_runner_harness``); ``FakeHost`` records its reports. Every test
picks its own SSH port range (``VPS_SSH_PORT_START`` at a port free now) so that tests and other runners on
this machine do not meet, and removes the snapshot images of its task ids.
"""

from __future__ import annotations

import socket
from contextlib import suppress
from pathlib import Path

import httpx
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from trio_websocket import open_websocket_url

from kohakuriver_proto import forwarder as fwd
from kohakuriver_proto.flow import SendFrame
from kohakuriver_proto.frames import Proto
from kohakuriver_proto.lifecycle import TaskType
from kohakuriver_proto.models import ExecuteRequest, SshKeyMode
from kohakuriver_runner.container_spec import container_name
from kohakuriver_runner.docker_api import DockerError
from kohakuriver_runner.snapshots import snapshot_repo

from ._runner_harness import BUSYBOX, REPO_ROOT, TOKEN, container_gone, new_task_id, runner_rig

pytestmark = [pytest.mark.docker, pytest.mark.slow]

SSHD_IMAGE = "kohakuriver/sshd:latest"
CLIENT = REPO_ROOT / "tunnel-client-rs" / "target" / "release" / "tunnel-client"


@pytest.fixture
async def rig(nursery, tmp_path):
    async with runner_rig(nursery, tmp_path) as r:
        if not await r.docker.image_exists(SSHD_IMAGE):
            await trio.run_process(["bash", str(REPO_ROOT / "scripts" / "images" / "sshd.sh")])
        r.vps_ids = []
        try:
            yield r
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(60):
                await remove_snapshots(r.docker, r.vps_ids)


async def remove_snapshots(docker, task_ids) -> None:
    for tid in task_ids:
        for image in await docker.list_images(reference=snapshot_repo(tid)):
            for tag in image.repo_tags:
                with suppress(DockerError):
                    await docker.remove_image(tag, force=True)


def port_start() -> int:
    """A port free now, with room above it."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port < 60000:
            return port


class Key:
    """An Ed25519 key pair on disk for the ssh client."""

    def __init__(self, directory: Path, name: str) -> None:
        key = Ed25519PrivateKey.generate()
        self.path = directory / name
        self.path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            )
        )
        self.path.chmod(0o600)
        raw = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        self.public = raw.decode() + f" {name}@test"


def vps(tid: int, mode: SshKeyMode, key: Key | None = None, **kwargs) -> ExecuteRequest:
    return ExecuteRequest(
        task_id=tid,
        task_type=TaskType.VPS,
        ssh_key_mode=mode,
        ssh_public_key=key.public if key else None,
        registry_image=kwargs.pop("image", SSHD_IMAGE),
        **kwargs,
    )


async def ssh(
    tmp: Path,
    port: int,
    command: str,
    *,
    key: Key | None = None,
    methods: str = "publickey",
    pinned: Path | None = None,
) -> trio.CompletedProcess:
    """``pinned``: a known_hosts file the server must be in (strict checking); else any server key goes."""
    checking = ["StrictHostKeyChecking=yes", f"UserKnownHostsFile={pinned}", "HostKeyAlias=the-vps"]
    if pinned is None:
        checking = ["StrictHostKeyChecking=no", f"UserKnownHostsFile={tmp / 'known_hosts'}"]
    argv = [
        "ssh",
        "-p",
        str(port),
        *(word for option in checking for word in ("-o", option)),
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=5",
        "-o",
        f"PreferredAuthentications={methods}",
        "-o",
        "IdentitiesOnly=yes",
        "-F",
        "/dev/null",
    ]
    if key is not None:
        argv += ["-i", str(key.path)]
    argv += ["root@127.0.0.1", command]
    with trio.fail_after(30):
        return await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)


async def ssh_until_answer(tmp: Path, port: int, command: str, **kwargs) -> trio.CompletedProcess:
    """sshd needs a moment after the container starts: retry while the connection itself fails (255 without
    an authentication verdict)."""
    with trio.fail_after(30):
        while True:
            result = await ssh(tmp, port, command, **kwargs)
            if result.returncode != 255 or b"Permission denied" in result.stderr:
                return result
            await trio.sleep(0.3)


async def running(rig, tid: int) -> int | None:
    update = await rig.host.wait_status(tid, "running")
    return update.ssh_port


async def exec_in(rig, tid: int, *argv: str) -> str:
    result = await rig.docker.exec_run(container_name(tid), list(argv), timeout=30)
    assert result.exit_code == 0, result.stderr
    return result.stdout.decode()


async def test_upload_and_generate_keys_log_in_on_sequential_ports(rig):
    start = port_start()
    # The test holds the second port of the range: the allocation must skip it.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", start + 1))
        busy.listen()
        runner = await rig.start(VPS_SSH_PORT_START=start)
        keys = [Key(rig.tmp, "upload"), Key(rig.tmp, "generate")]
        ids = [new_task_id(), new_task_id()]
        rig.vps_ids += ids
        for tid, mode, key in zip(ids, (SshKeyMode.UPLOAD, SshKeyMode.GENERATE), keys, strict=True):
            resp = await runner.execute(vps(tid, mode, key))
            assert resp.status_code == 202, resp.text
        ports = [await running(rig, tid) for tid in ids]
    assert ports == [start, start + 2]
    for tid, port, key in zip(ids, ports, keys, strict=True):
        result = await ssh_until_answer(rig.tmp, port, "echo ok; hostname", key=key)
        assert result.returncode == 0, result.stderr
        assert result.stdout.decode().split() == ["ok", f"vps-{tid}"]
        mode = await exec_in(rig, tid, "stat", "-c", "%a %U", "/root/.ssh", "/root/.ssh/authorized_keys")
        assert mode.split("\n")[:2] == ["700 root", "600 root"]
    # One key does not open the other VPS.
    wrong = await ssh_until_answer(rig.tmp, ports[0], "true", key=keys[1])
    assert wrong.returncode == 255 and b"Permission denied" in wrong.stderr


async def test_mode_none_refuses_keys_and_passwords(rig):
    runner = await rig.start(VPS_SSH_PORT_START=port_start())
    tid = new_task_id()
    rig.vps_ids.append(tid)
    key = Key(rig.tmp, "someone")
    assert (await runner.execute(vps(tid, SshKeyMode.NONE))).status_code == 202
    port = await running(rig, tid)
    assert port is not None
    by_key = await ssh_until_answer(rig.tmp, port, "true", key=key)
    assert by_key.returncode == 255 and b"Permission denied" in by_key.stderr
    # The server offers nothing but public keys, whatever the client is willing to try.
    by_password = await ssh_until_answer(rig.tmp, port, "true", methods="password,keyboard-interactive")
    assert by_password.returncode == 255
    assert b"Permission denied (publickey)" in by_password.stderr
    assert "authorized_keys" not in await exec_in(rig, tid, "ls", "-a", "/root")


async def test_image_without_sshd_fails_with_the_reason(rig):
    runner = await rig.start(VPS_SSH_PORT_START=port_start())
    tid = new_task_id()
    rig.vps_ids.append(tid)
    assert (await runner.execute(vps(tid, SshKeyMode.NONE, image=BUSYBOX))).status_code == 202
    final = await rig.host.wait_final(tid)
    assert final.status.value == "failed"
    assert f"image {BUSYBOX} has no /usr/sbin/sshd" in final.message
    assert "scripts/images/sshd.sh" in final.message
    await container_gone(rig.docker, tid)


async def test_disabled_vps_has_no_port_and_runs_on_busybox(rig):
    runner = await rig.start(VPS_SSH_PORT_START=port_start())
    tid = new_task_id()
    rig.vps_ids.append(tid)
    assert (await runner.execute(vps(tid, SshKeyMode.DISABLED, image=BUSYBOX))).status_code == 202
    assert await running(rig, tid) is None
    info = await rig.docker.inspect(container_name(tid))
    assert info.state.running and not info.ports.get("22/tcp")
    # A VPS whose main process dies on its own: failed, with the exit code.
    await rig.docker.kill(container_name(tid), "SIGKILL")
    final = await rig.host.wait_final(tid)
    assert (final.status.value, final.exit_code) == ("failed", 137)


async def test_restart_stop_restore_and_snapshots(rig):
    start = port_start()
    runner = await rig.start(VPS_SSH_PORT_START=start, MAX_SNAPSHOTS_PER_VPS=2)
    tid = new_task_id()
    rig.vps_ids.append(tid)
    key = Key(rig.tmp, "me")
    assert (await runner.execute(vps(tid, SshKeyMode.UPLOAD, key))).status_code == 202
    port = await running(rig, tid)
    await exec_in(rig, tid, "sh", "-c", "echo kept > /root/state.txt")

    # restart: same container state, same port, still running, and SSH works again.
    resp = await runner.client.post(f"/api/vps/{tid}/restart")
    assert resp.status_code == 200, resp.text
    assert await exec_in(rig, tid, "cat", "/root/state.txt") == "kept\n"
    assert (await ssh_until_answer(rig.tmp, port, "cat /root/state.txt", key=key)).stdout == b"kept\n"
    info = await rig.docker.inspect(container_name(tid))
    assert info.state.running and info.host_port(22) == port
    assert rig.host.final(tid) is None

    # Snapshots of a running VPS: create, list newest first, pruned to 2.
    made = []
    for _ in range(3):
        resp = await runner.client.post(f"/api/vps/{tid}/snapshots", json={"message": "by the test"})
        assert resp.status_code == 201, resp.text
        made.append(resp.json())
    listed = (await runner.client.get(f"/api/vps/{tid}/snapshots")).json()
    assert [s["tag"] for s in listed] == [made[2]["tag"], made[1]["tag"]]
    assert all(s["size_bytes"] > 0 and s["created_at"].endswith("Z") for s in listed)
    assert made[0]["tag"].startswith(f"kohakuriver-snapshot/vps-{tid}:")
    assert not await rig.docker.image_exists(made[0]["tag"])
    resp = await runner.client.delete(f"/api/vps/{tid}/snapshots/{made[1]['timestamp']}")
    assert resp.status_code == 200, resp.text
    resp = await runner.client.delete(f"/api/vps/{tid}/snapshots/{made[1]['timestamp']}")
    assert resp.status_code == 404
    assert (await runner.client.delete(f"/api/vps/{tid}/snapshots/abc")).status_code == 400

    # stop: a snapshot of the current state, the container goes, `stopped`, the port is free again.
    await exec_in(rig, tid, "sh", "-c", "echo after-restart >> /root/state.txt")
    resp = await runner.client.post(f"/api/vps/{tid}/stop")
    assert resp.status_code == 200, resp.text
    final = await rig.host.wait_final(tid)
    assert final.status.value == "stopped"
    await container_gone(rig.docker, tid)
    snaps = (await runner.client.get(f"/api/vps/{tid}/snapshots")).json()
    assert len(snaps) == 2 and snaps[0]["timestamp"] > made[2]["timestamp"]
    # Nothing listens there any more. (Not a bind test: the SSH session's closed connections may still sit
    # in TIME_WAIT on that port, and a plain bind then fails although the port is free.)
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", port)

    # Re-create with the same id: the newest snapshot wins over the requested image; the file is back.
    with trio.fail_after(20):
        while (resp := await runner.execute(vps(tid, SshKeyMode.UPLOAD, key))).json()[
            "message"
        ] != "accepted":
            assert resp.status_code == 202
            await trio.sleep(0.1)  # the host has not acknowledged the final report yet
    updates_before = len(rig.host.reports(tid))
    await rig.host.wait_for(
        lambda: any(u.status.value == "running" for u in rig.host.reports(tid)[updates_before:])
    )
    info = await rig.docker.inspect(container_name(tid))
    assert info.image == snaps[0]["tag"]
    result = await ssh_until_answer(rig.tmp, port, "cat /root/state.txt", key=key)
    assert result.stdout == b"kept\nafter-restart\n"
    # Snapshots of a VPS whose container is gone are still there to list.
    await rig.docker.remove(container_name(tid), force=True)
    await rig.host.wait_final(tid)
    assert len((await runner.client.get(f"/api/vps/{tid}/snapshots")).json()) == 2


async def test_runner_restart_readopts_a_running_vps(rig):
    start = port_start()
    config = rig.config("a", VPS_SSH_PORT_START=start)
    runner = await rig.start(config=config)
    tid = new_task_id()
    rig.vps_ids.append(tid)
    key = Key(rig.tmp, "me")
    assert (await runner.execute(vps(tid, SshKeyMode.GENERATE, key))).status_code == 202
    port = await running(rig, tid)
    await runner.crash()
    count = len(rig.host.reports(tid))

    # A VPS the new runner does not know yet is not given the adopted one's port.
    runner = await rig.start(config=config)
    update = await rig.host.wait_for(
        lambda: next((u for u in rig.host.reports(tid)[count:] if u.status.value == "running"), None)
    )
    assert update.ssh_port == port
    assert (await ssh_until_answer(rig.tmp, port, "echo ok", key=key)).stdout == b"ok\n"
    other = new_task_id()
    rig.vps_ids.append(other)
    assert (await runner.execute(vps(other, SshKeyMode.NONE))).status_code == 202
    assert await running(rig, other) != port
    resp = await runner.client.post(f"/api/vps/{tid}/stop")
    assert resp.status_code == 200, resp.text
    assert (await rig.host.wait_final(tid)).status.value == "stopped"


async def test_unknown_vps_routes(rig):
    runner = await rig.start(VPS_SSH_PORT_START=port_start())
    tid = new_task_id()
    assert (await runner.client.post(f"/api/vps/{tid}/stop")).status_code == 404
    assert (await runner.client.post(f"/api/vps/{tid}/restart")).status_code == 404
    assert (await runner.client.post(f"/api/vps/{tid}/snapshots")).status_code == 404
    assert (await runner.client.get(f"/api/vps/{tid}/snapshots")).json() == []
    assert (await runner.client.post("/api/vps/x/stop")).status_code == 400


async def test_host_key_route_gives_the_key_sshd_presents(rig):
    runner = await rig.start(VPS_SSH_PORT_START=port_start())
    tid = new_task_id()
    rig.vps_ids.append(tid)
    assert (await runner.client.get(f"/api/vps/{tid}/host-key")).status_code == 404  # never created here
    key = Key(rig.tmp, "me")
    assert (await runner.execute(vps(tid, SshKeyMode.UPLOAD, key))).status_code == 202
    port = await running(rig, tid)
    resp = await runner.client.get(f"/api/vps/{tid}/host-key")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["task_id"] == str(tid) and body["host_key"].startswith("ssh-ed25519 ")
    # Pinned alone, the key lets ssh in with strict checking: it is the key the VPS's sshd holds.
    pinned = rig.tmp / "pinned_hosts"
    pinned.write_text(f"the-vps {body['host_key']}\n")
    result = await ssh_until_answer(rig.tmp, port, "echo ok", key=key, pinned=pinned)
    assert (result.returncode, result.stdout) == (0, b"ok\n"), result.stderr
    other = Key(rig.tmp, "other").public.split()[:2]
    pinned.write_text(f"the-vps {' '.join(other)}\n")
    refused = await ssh(rig.tmp, port, "true", key=key, pinned=pinned)
    assert refused.returncode == 255 and b"HOST IDENTIFICATION HAS CHANGED" in refused.stderr
    # The cluster token guards it like every runner route.
    async with httpx.AsyncClient(base_url=str(runner.client.base_url)) as anonymous:
        assert (await anonymous.get(f"/api/vps/{tid}/host-key")).status_code == 401
    assert (await runner.client.get("/api/vps/x/host-key")).status_code == 400


async def first_bytes_through_tunnel(runner, tid: int, port: int) -> bytes:
    """Open ``/ws/forward/<tid>/<port>`` as the host does and return the first bytes the service sends.

    Retried while the tunnel client is not attached yet or the service does not listen yet (the container
    has just started)."""
    url = f"ws://127.0.0.1:{runner.config.RUNNER_PORT}/ws/forward/{tid}/{port}?proto=tcp"
    headers = [(b"Authorization", f"Bearer {TOKEN}".encode())]
    with trio.fail_after(30):
        while True:
            async with open_websocket_url(url, extra_headers=headers) as ws:
                if await ws.get_message() == "CONNECTED":
                    data = await _first_data(ws, port)
                    if data is not None:
                        return data
            await trio.sleep(0.2)


async def _first_data(ws, port: int) -> bytes | None:
    fw = fwd.Forwarder(Proto.TCP, port)
    cid, out = fw.open_connection()
    for event in [*fw.start(), *out]:
        if isinstance(event, SendFrame):
            await ws.send_message(event.data)
    while True:
        for event in fw.receive_frame(await ws.get_message(), trio.current_time()):
            if isinstance(event, SendFrame):
                await ws.send_message(event.data)
            elif isinstance(event, fwd.DataReceived) and event.client_id == cid:
                return bytes(event.data)
            elif isinstance(event, fwd.ConnectionClosed):
                return None  # refused: not listening yet


async def test_port_forwarding_reaches_sshd_and_the_keepalive(rig):
    # 0.0.0.0: containers reach the runner's tunnel server through the network gateway.
    runner = await rig.start(
        VPS_SSH_PORT_START=port_start(), RUNNER_BIND_IP="0.0.0.0", TUNNEL_CLIENT_PATH=str(CLIENT)
    )
    ssh_vps, plain = new_task_id(), new_task_id()
    rig.vps_ids += [ssh_vps, plain]
    assert (await runner.execute(vps(ssh_vps, SshKeyMode.NONE))).status_code == 202
    assert (await runner.execute(vps(plain, SshKeyMode.DISABLED, image=BUSYBOX))).status_code == 202
    await running(rig, ssh_vps)
    await running(rig, plain)
    # The tunnel client wraps sshd (--exec) ...
    info = await rig.docker.inspect(container_name(ssh_vps))
    assert info.raw["Config"]["Entrypoint"] == ["/usr/local/bin/tunnel-client", "--exec", "--"]
    assert (await first_bytes_through_tunnel(runner, ssh_vps, 22)).startswith(b"SSH-2.0-OpenSSH")
    # ... and is itself the keep-alive of a VPS without SSH: it attaches, and forwards to its services.
    info = await rig.docker.inspect(container_name(plain))
    assert info.raw["Config"]["Entrypoint"] == ["/usr/local/bin/tunnel-client"]
    await exec_in(rig, plain, "sh", "-c", "(echo hello-from-vps | nc -l -p 7000 &) ; true")
    assert await first_bytes_through_tunnel(runner, plain, 7000) == b"hello-from-vps\n"


async def test_vps_that_exited_while_the_runner_was_down_is_reported(rig):
    config = rig.config("a", VPS_SSH_PORT_START=port_start())
    runner = await rig.start(config=config)
    tid = new_task_id()
    rig.vps_ids.append(tid)
    assert (await runner.execute(vps(tid, SshKeyMode.NONE))).status_code == 202
    port = await running(rig, tid)
    await runner.crash()
    await rig.docker.kill(container_name(tid), "SIGKILL")
    await rig.start(config=config)
    final = await rig.host.wait_final(tid)
    assert (final.status.value, final.exit_code) == ("failed", 137)
    await container_gone(rig.docker, tid)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))  # its port is free again
