"""The runner daemon against real Docker: execute, logs, exit codes, kill, pause/resume, OOM, preparation.

The runner runs in the test's nursery on an ephemeral port; ``FakeHost`` stands in for the host's
runner-facing endpoints and records the reports (see ``_runner_harness``).
"""

from __future__ import annotations

import time
from contextlib import suppress

import httpx
import pytest
import trio

from kohakuriver_runner.container_spec import container_name
from kohakuriver_runner.docker_api import NotFound

from ._runner_harness import (
    BUSYBOX,
    TOKEN,
    container_gone,
    hanging_registry,
    new_task_id,
    req,
    runner_name,
    runner_rig,
)

pytestmark = pytest.mark.docker


@pytest.fixture
async def rig(nursery, tmp_path):
    async with runner_rig(nursery, tmp_path) as r:
        yield r


async def test_echo_completes_and_logs_are_served(rig):
    runner = await rig.start()
    tid = new_task_id()
    script = "echo hello; echo $KOHAKURIVER_TASK_ID $FOO; pwd; echo oops >&2; ls -d /local_temp /shared"
    resp = await runner.execute(req(tid, "sh", "-c", script, env_vars={"FOO": "bar"}, working_dir="/tmp"))
    assert resp.status_code == 202, resp.text
    assert resp.json()["task_id"] == str(tid)
    final = await rig.host.wait_final(tid)
    assert final.status.value == "completed"
    assert final.exit_code == 0
    assert final.started_at is not None and final.completed_at is not None
    statuses = [u.status.value for u in rig.host.reports(tid)]
    assert statuses.index("running") < statuses.index("completed")
    await container_gone(rig.docker, tid)
    # From the saved files now (the container is gone).
    out = await runner.logs(tid)
    assert out.status_code == 200
    assert out.text == f"hello\n{tid} bar\n/tmp\n/local_temp\n/shared\n"
    err = await runner.logs(tid, stream="stderr")
    assert err.text == "oops\n"
    tail = await runner.logs(tid, lines=2)
    assert tail.text == "/local_temp\n/shared\n"
    assert (await runner.logs(tid, lines=0)).text == ""
    # A repeated dispatch of a task the runner already finished is not run twice.
    assert (rig.tmp / runner_name("a") / "state" / "logs" / str(tid) / "stdout.log").exists()


async def test_exit_0_is_reported_at_the_engine_s_die_event_then_collected_as_before(rig):
    """A command that exits 0 is reported ``completed`` from the engine's ``die`` event, before the
    container is collected; the collection still records and delivers the final report, which the host
    acknowledges, and the record goes. A failure is reported once, by the collection (it quotes stderr)."""
    runner = await rig.start()
    ok, bad = new_task_id(), new_task_id()
    await runner.execute(req(ok, "sh", "-c", "echo done"))
    await runner.execute(req(bad, "sh", "-c", "echo why >&2; exit 3"))
    first = await rig.host.wait_final(ok)
    assert first.status.value == "completed" and first.exit_code == 0 and first.completed_at is not None
    # The collection's report comes after, with the engine's exit time, and the saved output.
    collected = await rig.host.wait_for(
        lambda: len([u for u in rig.host.updates if u.task_id == ok and u.status.value == "completed"]) >= 2
    )
    assert collected
    await container_gone(rig.docker, ok)
    assert (await runner.logs(ok)).text == "done\n"
    record = runner.config.state_dir / "tasks" / f"{ok}.json"
    with trio.fail_after(10):
        while record.exists():  # deleted once the host acknowledged the final report
            await trio.sleep(0.05)
    failed = await rig.host.wait_final(bad)
    assert failed.status.value == "failed" and "last stderr line: why" in (failed.message or "")
    await container_gone(rig.docker, bad)
    assert [u.status.value for u in rig.host.updates if u.task_id == bad].count("failed") == 1


async def test_arguments_never_reach_a_shell(rig):
    runner = await rig.start()
    tid = new_task_id()
    marker = rig.tmp / "shared" / "shared_data" / "pwned"
    resp = await runner.execute(req(tid, "echo", "$(touch /shared/pwned)", "a;b", "`id`", "&&", "|"))
    assert resp.status_code == 202
    final = await rig.host.wait_final(tid)
    assert final.status.value == "completed"
    assert (await runner.logs(tid)).text == "$(touch /shared/pwned) a;b `id` && |\n"
    assert not marker.exists()


async def test_nonzero_exit_is_failed_with_code(rig):
    runner = await rig.start()
    tid = new_task_id()
    await runner.execute(req(tid, "sh", "-c", "echo partial; exit 3"))
    final = await rig.host.wait_final(tid)
    assert final.status.value == "failed"
    assert final.exit_code == 3
    assert "exit code 3" in (final.message or "")
    assert (await runner.logs(tid)).text == "partial\n"


async def test_missing_executable_fails_clearly(rig):
    runner = await rig.start()
    tid = new_task_id()
    await runner.execute(req(tid, "no-such-program-kr"))
    final = await rig.host.wait_final(tid)
    assert final.status.value == "failed"
    assert "no-such-program-kr" in (final.message or "")
    await container_gone(rig.docker, tid)


async def test_kill_running_task(rig):
    runner = await rig.start()
    tid = new_task_id()
    await runner.execute(req(tid, "sleep", "300"))
    await rig.host.wait_status(tid, "running")
    resp = await runner.client.post(f"/api/kill/{tid}")
    assert resp.status_code == 200, resp.text
    assert resp.json()["ok"] is True
    final = await rig.host.wait_final(tid, timeout=20)
    assert final.status.value == "killed"
    assert final.exit_code == 137
    await container_gone(rig.docker, tid)
    # Killing it again: it is over.
    again = await runner.client.post(f"/api/kill/{tid}")
    assert again.status_code in (404, 409)
    assert again.json()["error"] in ("not_found", "conflict")


async def test_pause_and_resume(rig):
    runner = await rig.start()
    tid = new_task_id()
    await runner.execute(req(tid, "sh", "-c", "i=0; while :; do i=$((i+1)); echo $i; sleep 0.05; done"))
    await rig.host.wait_status(tid, "running")
    assert (await runner.client.post(f"/api/pause/{tid}")).status_code == 200
    info = await rig.docker.inspect(container_name(tid))
    assert info.state.paused
    frozen = (await runner.logs(tid)).text
    await trio.sleep(0.5)
    assert (await runner.logs(tid)).text == frozen
    again = await runner.client.post(f"/api/pause/{tid}")
    assert again.status_code == 200 and again.json()["message"] == "already paused"
    # Paused tasks are still held (the heartbeat lists them).
    beat = await rig.host.next_heartbeat(runner.handle.hostname)
    assert tid in beat.running_tasks
    assert (await runner.client.post(f"/api/resume/{tid}")).status_code == 200
    await trio.sleep(0.5)
    assert len((await runner.logs(tid)).text) > len(frozen)
    # A paused task can be killed too.
    assert (await runner.client.post(f"/api/pause/{tid}")).status_code == 200
    assert (await runner.client.post(f"/api/kill/{tid}")).status_code == 200
    final = await rig.host.wait_final(tid, timeout=20)
    assert final.status.value == "killed"


async def test_out_of_memory_is_killed_oom(rig):
    runner = await rig.start()
    tid = new_task_id()
    await runner.execute(
        req(tid, "sh", "-c", "x=a; while :; do x=$x$x; done", required_memory_bytes=16 * 1024 * 1024)
    )
    final = await rig.host.wait_final(tid)
    assert final.status.value == "killed_oom"
    assert final.exit_code == 137
    assert "memory" in (final.message or "")


async def test_follow_streams_until_the_task_ends(rig):
    runner = await rig.start()
    tid = new_task_id()
    await runner.execute(req(tid, "sh", "-c", "sleep 0.5; for i in 1 2 3 4; do echo line$i; sleep 0.3; done"))
    chunks: list[str] = []
    with trio.fail_after(30):
        async with runner.client.stream("GET", f"/api/tasks/{tid}/logs", params={"follow": "1"}) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/plain")
            async for text in resp.aiter_text():
                chunks.append(text)
    assert "".join(chunks) == "line1\nline2\nline3\nline4\n"
    assert len(chunks) > 1  # it arrived while the task ran, not at the end


async def test_follow_with_lines_then_new_output(rig):
    runner = await rig.start()
    tid = new_task_id()
    script = "for i in 1 2 3 4 5; do echo old$i; echo err >&2; done; sleep 1.5; echo new1; echo new2"
    await runner.execute(req(tid, "sh", "-c", script))
    await rig.host.wait_status(tid, "running")
    await trio.sleep(0.7)
    with trio.fail_after(30):
        resp = await runner.client.get(f"/api/tasks/{tid}/logs", params={"follow": "1", "lines": "2"})
    assert resp.text == "old4\nold5\nnew1\nnew2\n"


async def test_kill_while_preparing_cancels_the_pull(rig, nursery):
    hang = await nursery.start(hanging_registry)
    runner = await rig.start()
    tid = new_task_id()
    image = f"127.0.0.1:{hang}/kohakuriver-test/hangs:{tid}"
    assert (await runner.execute(req(tid, "echo", "never", registry_image=image))).status_code == 202
    progress = await rig.host.wait_status(tid, "assigning", timeout=20)
    assert "pulling" in (progress.message or "")
    # Preparing tasks are not in the heartbeat's running list (the host would mark them running).
    beat = await rig.host.next_heartbeat(runner.handle.hostname)
    assert tid not in beat.running_tasks
    resp = await runner.client.post(f"/api/kill/{tid}")
    assert resp.status_code == 200
    final = await rig.host.wait_final(tid, timeout=10)
    assert final.status.value == "killed"
    assert "never started" in (final.message or "")
    with pytest.raises(NotFound):
        await rig.docker.inspect(container_name(tid))


async def test_image_sync_timeout_is_enforced(rig, nursery):
    hang = await nursery.start(hanging_registry)
    runner = await rig.start(DOCKER_IMAGE_SYNC_TIMEOUT=1)
    tid = new_task_id()
    await runner.execute(req(tid, "echo", "never", registry_image=f"127.0.0.1:{hang}/kr/hangs:{tid}"))
    final = await rig.host.wait_final(tid, timeout=20)
    assert final.status.value == "failed"
    assert "DOCKER_IMAGE_SYNC_TIMEOUT" in (final.message or "")


async def test_environment_tarball_is_loaded_once(rig):
    env = f"krtest{new_task_id() % 10**8}"
    ref = f"kohakuriver/{env}:base"
    tar_dir = rig.tmp / "containers"
    tar_dir.mkdir()
    await rig.docker.tag_image(BUSYBOX, f"kohakuriver/{env}", "base")
    try:
        await rig.docker.save_image(ref, tar_dir / f"{env}-{int(time.time())}.tar")
        await rig.docker.remove_image(ref)
        runner = await rig.start()
        first, second = new_task_id(), new_task_id()
        await runner.execute(req(first, "echo", "from-env", container_name=env))
        final = await rig.host.wait_final(first)
        assert final.status.value == "completed", final
        assert any("loading" in (u.message or "") for u in rig.host.reports(first))
        assert await rig.docker.image_exists(ref)
        await runner.execute(req(second, "echo", "again", container_name=env))
        assert (await rig.host.wait_final(second)).status.value == "completed"
        assert not any("loading" in (u.message or "") for u in rig.host.reports(second))
        # A missing environment fails with the reason.
        third = new_task_id()
        await runner.execute(req(third, "echo", "x", container_name=f"{env}-missing"))
        missing = await rig.host.wait_final(third)
        assert missing.status.value == "failed"
        assert "no tarball" in (missing.message or "")
    finally:
        with suppress(NotFound):
            await rig.docker.remove_image(ref, force=True)


async def test_numa_binding_and_limits(rig):
    runner = await rig.start()
    tid = new_task_id()
    await runner.execute(
        req(tid, "sleep", "30", numa_node=0, required_cores=1, required_memory_bytes=64 * 1024 * 1024)
    )
    await rig.host.wait_status(tid, "running")
    info = await rig.docker.inspect(container_name(tid))
    hc = info.raw["HostConfig"]
    beat = await rig.host.next_heartbeat(runner.handle.hostname)
    assert beat.numa_topology is not None and 0 in beat.numa_topology
    cores = beat.numa_topology[0].cores
    assert hc["CpusetCpus"] == ",".join(str(c) for c in sorted(cores))
    assert hc["CpusetMems"] == "0"
    assert hc["NanoCpus"] == 1_000_000_000
    assert hc["Memory"] == 64 * 1024 * 1024
    assert hc["Init"] is True
    assert hc["CapAdd"] == ["SYS_NICE"]
    # The image's entrypoint never reinterprets argv: none at all, or the tunnel client's exec mode.
    assert info.raw["Config"]["Entrypoint"] in (
        None,
        [""],
        [],
        ["/usr/local/bin/tunnel-client", "--exec", "--"],
    )
    assert info.raw["Config"]["Cmd"] == ["sleep", "30"]
    assert "KOHAKURIVER_TARGET_NUMA_NODE=0" in info.raw["Config"]["Env"]
    assert info.labels["kohakuriver.runner"] == runner.handle.hostname
    await runner.client.post(f"/api/kill/{tid}")
    await rig.host.wait_final(tid)


async def test_api_auth_and_errors(rig):
    runner = await rig.start()
    base = runner.handle.bind_url
    async with httpx.AsyncClient(base_url=base) as anon:
        resp = await anon.post("/api/execute", content="{}")
        assert resp.status_code == 401
        assert resp.json()["error"] == "unauthorized"
        resp = await anon.get("/api/info", headers={"Authorization": "Bearer wrong-token-wrong-token"})
        assert resp.status_code == 401
    client = runner.client
    bad = await client.post("/api/execute", content='{"task_id": "1", "command": ""}')
    assert bad.status_code == 400
    assert bad.json() == {"error": "invalid", "message": bad.json()["message"], "field": "command"}
    assert (await client.post("/api/execute", content="not json")).json()["field"] == "body"
    assert (await client.post("/api/kill/12345")).status_code == 404
    assert (await client.post("/api/kill/abc")).json()["field"] == "task_id"
    assert (await client.get("/api/tasks/12345/logs")).status_code == 404
    assert (await client.get("/api/nope")).json()["error"] == "not_found"
    assert (await client.get("/api/execute")).status_code == 405
    tid = new_task_id()
    assert (await runner.execute(req(tid, "sleep", "30"))).status_code == 202
    dup = await runner.execute(req(tid, "sleep", "30"))
    assert dup.status_code == 202 and "already" in dup.json()["message"]
    await rig.host.wait_status(tid, "running")
    logs = await client.get(f"/api/tasks/{tid}/logs", params={"stream": "stdin"})
    assert logs.json()["field"] == "stream"
    info = (await client.get("/api/info")).json()
    assert info["hostname"] == runner.handle.hostname
    assert info["docker_available"] is True
    assert str(tid) in info["running_tasks"]
    await client.post(f"/api/kill/{tid}")
    await rig.host.wait_final(tid)
    assert TOKEN not in str(info)


async def test_registration_heartbeat_and_host_kill_list(rig):
    runner = await rig.start()
    hostname = runner.handle.hostname
    reg = await rig.host.wait_for(lambda: [r for r in rig.host.registrations if r.hostname == hostname])
    assert reg[0].url == runner.handle.url
    assert reg[0].total_cores >= 1 and reg[0].memory_total_bytes > 0
    assert reg[0].docker_available is True
    beat = await rig.host.next_heartbeat(hostname)
    assert beat.memory_total_bytes > 0 and beat.docker_available and beat.docker_error is None
    tid = new_task_id()
    await runner.execute(req(tid, "sleep", "300"))
    await rig.host.wait_for(lambda: tid in (rig.host.last_heartbeat(hostname) or beat).running_tasks)
    # The host says the task is over: the runner kills it and reports nothing.
    rig.host.kill.add(tid)
    await container_gone(rig.docker, tid)
    await trio.sleep(1.5)
    assert rig.host.final(tid) is None
    # The host forgot the node: the runner registers again.
    count = len(rig.host.registrations)
    rig.host.known.clear()
    await rig.host.wait_for(lambda: len(rig.host.registrations) > count, timeout=20)


async def test_reports_survive_a_host_outage(rig):
    runner = await rig.start()
    hostname = runner.handle.hostname
    await rig.host.next_heartbeat(hostname)
    rig.host.down = True
    tid = new_task_id()
    await runner.execute(req(tid, "sh", "-c", "echo during-outage; exit 5"))
    await container_gone(rig.docker, tid)
    await trio.sleep(1)
    assert rig.host.final(tid) is None
    rig.host.down = False
    final = await rig.host.wait_final(tid, timeout=40)
    assert final.status.value == "failed" and final.exit_code == 5
    # Once acknowledged, the record is gone.
    record = rig.tmp / runner_name("a") / "state" / "tasks" / f"{tid}.json"
    await rig.host.wait_for(lambda: not record.exists(), timeout=20)
