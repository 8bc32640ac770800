"""DockerClient against the real engine, with the locally built busybox image.

Every container carries the label ``org.kohakuriver.test=<run id>`` and a ``kr-test-<run id>-`` name; the
fixture removes them (and the networks and images a test registers) whatever the test's outcome.
"""

from __future__ import annotations

import os
import secrets
import time
from contextlib import aclosing, suppress
from pathlib import Path

import pytest
import trio

from kohakuriver_runner.docker_api import (
    Conflict,
    ContainerSpec,
    DockerClient,
    DockerError,
    DockerUnavailable,
    Mount,
    NotFound,
    PortBinding,
    StreamType,
)

pytestmark = pytest.mark.docker

SOCKET = os.environ.get("KR_DOCKER_SOCKET", "/var/run/docker.sock")
BUSYBOX = "kohakuriver/busybox:latest"
REPO_ROOT = Path(__file__).resolve().parents[2]
RUN = f"{os.getpid()}{secrets.token_hex(3)}"
TEST_LABEL = "org.kohakuriver.test"


def cname(what: str) -> str:
    return f"kr-test-{RUN}-{what}"


class Env:
    """The client plus what the test created, for cleanup."""

    def __init__(self, docker: DockerClient) -> None:
        self.docker = docker
        self.networks: list[str] = []
        self.images: list[str] = []

    def spec(self, what: str, cmd: list[str] | None = None, **kwargs) -> ContainerSpec:
        labels = {TEST_LABEL: RUN, **kwargs.pop("labels", {})}
        return ContainerSpec(
            name=cname(what), image=kwargs.pop("image", BUSYBOX), cmd=cmd, labels=labels, **kwargs
        )

    async def run(self, what: str, cmd: list[str], **kwargs) -> str:
        cid = await self.docker.create_container(self.spec(what, cmd, **kwargs))
        await self.docker.start(cid)
        return cid

    async def wait(self, cid: str, seconds: float = 60) -> int:
        with trio.fail_after(seconds):
            return await self.docker.wait(cid)

    async def output(self, cid: str, **kwargs) -> tuple[bytes, bytes]:
        out, err = bytearray(), bytearray()
        async for stream, data in self.docker.logs(cid, **kwargs):
            (err if stream == StreamType.STDERR else out).extend(data)
        return bytes(out), bytes(err)


async def ensure_busybox(docker: DockerClient) -> None:
    if await docker.image_exists(BUSYBOX):
        return
    script = REPO_ROOT / "scripts" / "images" / "busybox.sh"
    if not script.exists():
        pytest.fail(f"{BUSYBOX} is missing and {script} does not exist to build it")
    await trio.run_process(["bash", str(script)])


@pytest.fixture
async def env():
    if not os.path.exists(SOCKET):
        pytest.skip(f"no Docker socket at {SOCKET}")
    async with DockerClient(SOCKET) as docker:
        await ensure_busybox(docker)
        e = Env(docker)
        try:
            yield e
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(60):
                for c in await docker.list_containers(labels={TEST_LABEL: RUN}):
                    await docker.remove(c.id, force=True)
                for net in e.networks:
                    with suppress(NotFound):
                        await docker.remove_network(net)
                for image in e.images:
                    with suppress(NotFound):
                        await docker.remove_image(image, force=True)


# -- engine ---------------------------------------------------------------------------------------------


async def test_ping_and_version(env):
    await env.docker.ping()
    assert await env.docker.unavailable_reason() is None
    version = await env.docker.version()
    assert tuple(int(x) for x in version.api_version.split(".")) >= (1, 41)


async def test_missing_socket_says_cannot_reach_docker(tmp_path):
    async with DockerClient(str(tmp_path / "no.sock")) as docker:
        with pytest.raises(DockerUnavailable, match="cannot reach Docker"):
            await docker.ping()
        reason = await docker.unavailable_reason()
        assert reason is not None
        assert "No such file" in reason


async def test_socket_that_refuses(tmp_path):
    # A socket file nobody listens on.
    path = tmp_path / "dead.sock"
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.close()
    async with DockerClient(str(path)) as docker:
        with pytest.raises(DockerUnavailable, match="cannot reach Docker"):
            await docker.list_containers()


# -- networks -------------------------------------------------------------------------------------------


async def test_network_is_created_once_and_a_different_subnet_is_refused(env):
    net = cname("net")
    third = secrets.randbelow(200) + 20
    subnet, gateway = f"10.251.{third}.0/24", f"10.251.{third}.1"
    env.networks.append(net)
    first = await env.docker.ensure_network(net, subnet, gateway, labels={TEST_LABEL: RUN})
    again = await env.docker.ensure_network(net, subnet, gateway)
    assert first.id == again.id
    assert (again.subnet, again.gateway, again.driver) == (subnet, gateway, "bridge")

    with pytest.raises(Conflict) as info:
        await env.docker.ensure_network(net, f"10.252.{third}.0/24", f"10.252.{third}.1")
    assert subnet in str(info.value)
    assert f"10.252.{third}.0/24" in str(info.value)

    # A container with a fixed address on it.
    ip = f"10.251.{third}.10"
    cid = await env.run("fixed-ip", ["sleep", "30"], network=net, ipv4_address=ip)
    info = await env.docker.inspect(cid)
    assert info.networks == {net: ip}
    assert info.ip_address == ip
    await env.docker.remove(cid, force=True)


async def test_inspect_network_needs_the_exact_name(env):
    with pytest.raises(NotFound):
        await env.docker.inspect_network(cname("no-such-net"))


# -- containers -----------------------------------------------------------------------------------------


async def test_echo_logs_and_exit_code(env):
    cid = await env.run("echo", ["sh", "-c", "echo hi; echo oops >&2; exit 3"], labels={"kind": "echo"})
    assert await env.wait(cid) == 3
    assert await env.output(cid) == (b"hi\n", b"oops\n")
    assert await env.output(cid, stderr=False) == (b"hi\n", b"")
    info = await env.docker.inspect(cid)
    assert info.name == cname("echo")
    assert info.state.status == "exited"
    assert info.state.exit_code == 3
    assert not info.state.running
    assert not info.state.oom_killed
    assert info.state.started_at is not None
    assert info.state.finished_at is not None
    assert info.state.finished_at >= info.state.started_at
    assert info.labels["kind"] == "echo"
    assert info.raw["HostConfig"]["Init"] is True
    assert info.raw["HostConfig"]["AutoRemove"] is False


async def test_follow_logs_until_exit_and_tail(env):
    script = "for i in 1 2 3 4 5; do echo line$i; sleep 0.1; done"
    cid = await env.run("follow", ["sh", "-c", script])
    got = bytearray()
    with trio.fail_after(30):
        async for stream, data in env.docker.logs(cid, follow=True):
            assert stream == StreamType.STDOUT
            got += data
    assert got.decode().split() == [f"line{i}" for i in range(1, 6)]
    assert await env.output(cid, tail=2) == (b"line4\nline5\n", b"")
    assert await env.output(cid, since=time.time() + 3600) == (b"", b"")


async def test_leaving_a_follow_early_is_clean(env):
    cid = await env.run("follow-early", ["sh", "-c", "while :; do echo tick; sleep 0.05; done"])
    with trio.fail_after(30):
        async with aclosing(env.docker.logs(cid, follow=True)) as stream:
            async for _kind, data in stream:
                if b"tick" in data:
                    break
    with trio.move_on_after(0.3) as scope:
        async for _ in env.docker.logs(cid, follow=True):
            pass
    assert scope.cancelled_caught  # follow has no timeout of its own; cancellation ends it
    assert (await env.docker.inspect(cid)).state.running


async def test_tty_logs_are_raw(env):
    cid = await env.run("tty", ["sh", "-c", "echo in-a-tty"], tty=True)
    await env.wait(cid)
    out, err = await env.output(cid)
    assert out.replace(b"\r\n", b"\n") == b"in-a-tty\n"
    assert err == b""


async def test_oom_kill_is_reported(env):
    limit = 16 * 1024 * 1024
    # A shell string that doubles until it cannot fit in 16 MiB. (`head -c 64m /dev/zero | tail` also
    # works but sometimes spends half a minute in reclaim before the OOM killer acts.)
    cid = await env.run(
        "oom", ["sh", "-c", "x=0123456789abcdef; while :; do x=$x$x; done"], memory_bytes=limit
    )
    code = await env.wait(cid)
    info = await env.docker.inspect(cid)
    assert info.raw["HostConfig"]["Memory"] == limit
    assert info.raw["HostConfig"]["MemorySwap"] in (limit, -1, 0)  # -1/0: kernel without swap accounting
    assert info.state.oom_killed, info.state
    assert code == 137


async def test_kill_stop_and_state_errors(env):
    cid = await env.run("kill", ["sleep", "1000"])
    await env.docker.kill(cid, "SIGKILL")
    assert await env.wait(cid) == 137
    with pytest.raises(Conflict):
        await env.docker.kill(cid)

    # With tini as PID 1 (init), SIGTERM reaches `sleep` and stop does not need its grace period.
    cid = await env.run("stop", ["sleep", "1000"])
    with trio.fail_after(8):
        await env.docker.stop(cid, timeout=20)
    assert (await env.docker.inspect(cid)).state.exit_code == 143
    await env.docker.stop(cid)  # already stopped: fine


async def test_wait_is_cancellable_and_sees_a_finished_container(env):
    cid = await env.run("wait", ["sleep", "1000"])
    with trio.move_on_after(0.5) as scope:
        await env.docker.wait(cid)
    assert scope.cancelled_caught
    assert (await env.docker.inspect(cid)).state.running
    await env.docker.kill(cid)
    assert await env.wait(cid) == 137
    assert await env.wait(cid) == 137  # an exited container answers at once


async def test_pause_and_unpause(env):
    cid = await env.run("pause", ["sleep", "1000"])
    await env.docker.pause(cid)
    state = (await env.docker.inspect(cid)).state
    assert (state.status, state.paused) == ("paused", True)
    with pytest.raises(Conflict):
        await env.docker.pause(cid)
    await env.docker.unpause(cid)
    state = (await env.docker.inspect(cid)).state
    assert (state.status, state.paused, state.running) == ("running", False, True)


async def test_remove(env):
    cid = await env.run("remove", ["sleep", "1000"])
    with pytest.raises(Conflict):
        await env.docker.remove(cid)  # running, not forced
    await env.docker.remove(cid, force=True, volumes=True)
    with pytest.raises(NotFound):
        await env.docker.inspect(cid)
    with pytest.raises(NotFound):
        await env.docker.remove(cid)


async def test_duplicate_name_is_a_conflict(env):
    await env.docker.create_container(env.spec("dup", ["true"]))
    with pytest.raises(Conflict):
        await env.docker.create_container(env.spec("dup", ["true"]))


async def test_create_options_reach_the_engine(env, tmp_path):
    (tmp_path / "hello.txt").write_text("from the host\n")
    spec = env.spec(
        "options",
        ["sh", "-c", "cat /data/hello.txt; pwd; echo $GREETING; touch /data/x 2>/dev/null || echo read-only"],
        env={"GREETING": "hello world"},
        working_dir="/tmp",
        mounts=[Mount(str(tmp_path), "/data", read_only=True)],
        cpuset_cpus=[0],
        nano_cpus=500_000_000,
        memory_bytes=64 * 1024 * 1024,
        cap_add=["SYS_NICE"],
        ports={8080: PortBinding("127.0.0.1", 0), "5353/udp": PortBinding()},
        restart_policy="on-failure",
        restart_max_retries=2,
        stop_signal="SIGINT",
    )
    cid = await env.docker.create_container(spec)
    await env.docker.start(cid)
    assert await env.wait(cid) == 0
    assert await env.output(cid) == (b"from the host\n/tmp\nhello world\nread-only\n", b"")
    host = (await env.docker.inspect(cid)).raw["HostConfig"]
    assert host["CpusetCpus"] == "0"
    assert host["NanoCpus"] == 500_000_000
    assert host["Memory"] == 64 * 1024 * 1024
    assert host["CapAdd"] == ["SYS_NICE"]
    assert host["RestartPolicy"] == {"Name": "on-failure", "MaximumRetryCount": 2}
    assert host["Mounts"] == [{"Type": "bind", "Source": str(tmp_path), "Target": "/data", "ReadOnly": True}]
    assert host["PortBindings"]["8080/tcp"] == [{"HostIp": "127.0.0.1", "HostPort": ""}]
    assert "5353/udp" in host["PortBindings"]


async def test_published_port_is_reported(env):
    cid = await env.run("ports", ["sleep", "1000"], ports={22: PortBinding("127.0.0.1", 0)})
    info = await env.docker.inspect(cid)
    port = info.host_port(22)
    assert port is not None
    assert port > 0
    assert info.ports["22/tcp"][0].host_ip == "127.0.0.1"


async def test_gpu_request_is_recorded(env):
    # No GPU here: create (not start) and check what the engine stored.
    cid = await env.docker.create_container(env.spec("gpu", ["true"], gpu_ids=[0, 1]))
    requests = (await env.docker.inspect(cid)).raw["HostConfig"]["DeviceRequests"]
    assert requests == [
        {"Driver": "nvidia", "Count": 0, "DeviceIDs": ["0", "1"], "Capabilities": [["gpu"]], "Options": None}
    ]


async def test_entrypoint_override(env):
    cid = await env.run("entry", ["-c", "echo via-entrypoint"], entrypoint=["/bin/sh"])
    assert await env.wait(cid) == 0
    assert await env.output(cid) == (b"via-entrypoint\n", b"")


async def test_label_filtering(env):
    for what, role in [("lab-a1", "a"), ("lab-a2", "a"), ("lab-b", "b")]:
        await env.docker.create_container(env.spec(what, ["true"], labels={"role": role}))
    mine = {TEST_LABEL: RUN}
    a = await env.docker.list_containers(labels={**mine, "role": "a"})
    assert sorted(c.name for c in a) == [cname("lab-a1"), cname("lab-a2")]
    has_role = await env.docker.list_containers(labels={**mine, "role": None})
    assert len(has_role) == 3
    assert all(c.state == "created" for c in has_role)
    assert await env.docker.list_containers(labels={**mine, "role": "c"}) == []
    running_only = await env.docker.list_containers(labels=mine, all=False)
    assert running_only == []


# -- exec -----------------------------------------------------------------------------------------------


async def test_exec_returns_code_and_both_streams(env):
    cid = await env.run("exec", ["sleep", "1000"])
    result = await env.docker.exec_run(cid, ["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (result.exit_code, result.stdout, result.stderr) == (7, b"out\n", b"err\n")

    result = await env.docker.exec_run(cid, ["sh", "-c", "head -c 300000 /dev/zero"], env={"X": "1"})
    assert result.exit_code == 0
    assert result.stdout == b"\0" * 300000

    result = await env.docker.exec_run(cid, ["pwd"], workdir="/tmp")
    assert result.stdout == b"/tmp\n"

    result = await env.docker.exec_run(cid, ["head", "-c", "1000", "/dev/zero"], max_output=10)
    assert (result.stdout, result.truncated) == (b"\0" * 10, True)

    with pytest.raises(DockerError):
        await env.docker.exec_run(cid, ["sleep", "5"], timeout=0.5)

    await env.docker.kill(cid)
    await env.wait(cid)
    with pytest.raises(Conflict):
        await env.docker.exec_run(cid, ["true"])


# -- images ---------------------------------------------------------------------------------------------


async def test_commit_list_and_remove_image(env):
    repo = f"kr-test-{RUN}/snapshot"
    env.images.append(f"{repo}:1")
    cid = await env.run("commit", ["sh", "-c", "echo snapshot-data > /marker; sleep 1000"])
    with trio.fail_after(10):
        while (await env.docker.exec_run(cid, ["cat", "/marker"])).exit_code != 0:
            await trio.sleep(0.05)
    image_id = await env.docker.commit(cid, repo, "1", message="kr test snapshot")
    assert image_id.startswith("sha256:")
    assert (await env.docker.inspect(cid)).state.running  # unpaused again after the commit

    info = await env.docker.inspect_image(f"{repo}:1")
    assert info.id == image_id
    assert info.created is not None
    listed = await env.docker.list_images(reference=repo)
    assert [i.repo_tags for i in listed] == [(f"{repo}:1",)]

    restored = await env.run("from-snapshot", ["cat", "/marker"], image=f"{repo}:1")
    assert await env.wait(restored) == 0
    assert await env.output(restored) == (b"snapshot-data\n", b"")

    with pytest.raises(Conflict):
        await env.docker.remove_image(f"{repo}:1")  # used by a container
    await env.docker.remove_image(f"{repo}:1", force=True)
    assert not await env.docker.image_exists(f"{repo}:1")
    with pytest.raises(NotFound):
        await env.docker.inspect_image(f"{repo}:1")


async def test_save_and_load_image(env, tmp_path):
    ref = f"kr-test-{RUN}/roundtrip:1"
    env.images.append(ref)
    await env.docker.tag_image(BUSYBOX, f"kr-test-{RUN}/roundtrip", "1")
    tarball = tmp_path / "roundtrip.tar"
    size = await env.docker.save_image(ref, tarball)
    assert size == tarball.stat().st_size > 0
    assert not (tmp_path / "roundtrip.tar.part").exists()
    await env.docker.remove_image(ref)
    assert not await env.docker.image_exists(ref)

    events = []
    loaded = await env.docker.load_image(tarball, progress=events.append)
    assert loaded == [ref]
    assert events
    assert await env.docker.image_exists(ref)


async def test_load_rejects_garbage(env, tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tarball" * 100)
    with pytest.raises(DockerError):
        await env.docker.load_image(junk)
    with pytest.raises(FileNotFoundError):
        await env.docker.load_image(tmp_path / "missing.tar")


async def test_pull_failure_is_an_error_not_a_hang(env):
    events = []
    with trio.fail_after(60), pytest.raises(DockerError):
        await env.docker.pull_image("127.0.0.1:1/kr-test/none:latest", progress=events.append)


async def test_bad_references_are_refused_before_any_request(env):
    with pytest.raises(ValueError):
        await env.docker.inspect("../../images/json")
    with pytest.raises(ValueError):
        await env.docker.inspect_image("a/../b")
