"""Restart safety: a runner that stops without cleaning up (its nursery cancelled, or ``kill -9`` of a real
``kr runner`` process) finds its containers again at the next start, reports the exit codes of the tasks that
ended meanwhile, and reports records whose container vanished."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import httpx
import pytest
import trio

from kohakuriver_proto.converter import dumps
from kohakuriver_proto.models import Heartbeat
from kohakuriver_runner.container_spec import container_name

from ._runner_harness import (
    TOKEN,
    container_gone,
    free_port,
    hanging_registry,
    new_task_id,
    req,
    runner_rig,
)

pytestmark = pytest.mark.docker


@pytest.fixture
async def rig(nursery, tmp_path):
    async with runner_rig(nursery, tmp_path) as r:
        yield r


async def wait_exited(docker, task_id: int, timeout: float = 30) -> None:
    with trio.fail_after(timeout):
        await docker.wait(container_name(task_id))


async def test_crash_then_restart_readopts_and_reports_exits(rig):
    config = rig.config("a")
    runner = await rig.start(config=config)
    ended, alive = new_task_id(), new_task_id()
    await runner.execute(req(ended, "sh", "-c", "echo before; sleep 2; echo after >&2; exit 7"))
    await runner.execute(req(alive, "sh", "-c", "echo up; sleep 300"))
    await rig.host.wait_status(ended, "running")
    await rig.host.wait_status(alive, "running")

    await runner.crash()
    # Without their runner the containers go on.
    assert (await rig.docker.inspect(container_name(alive))).state.running
    await wait_exited(rig.docker, ended)
    assert rig.host.final(ended) is None

    again = await rig.start(config=config)
    final = await rig.host.wait_final(ended)
    assert final.status.value == "failed"
    assert final.exit_code == 7
    assert (await again.logs(ended)).text == "before\n"
    assert (await again.logs(ended, stream="stderr")).text == "after\n"
    await container_gone(rig.docker, ended)

    hostname = again.handle.hostname
    await rig.host.wait_for(lambda: alive in (rig.host.last_heartbeat(hostname) or _empty()).running_tasks)
    assert any("re-adopted" in (u.message or "") for u in rig.host.reports(alive))
    assert (await again.logs(alive)).text == "up\n"
    assert (await again.client.post(f"/api/kill/{alive}")).status_code == 200
    killed = await rig.host.wait_final(alive, timeout=20)
    assert killed.status.value == "killed"


async def test_records_without_containers_are_reported(rig, nursery):
    hang = await nursery.start(hanging_registry)
    config = rig.config("a")
    runner = await rig.start(config=config)
    preparing, vanished = new_task_id(), new_task_id()
    await runner.execute(req(preparing, "echo", "x", registry_image=f"127.0.0.1:{hang}/kr/hangs:{preparing}"))
    await runner.execute(req(vanished, "sleep", "300"))
    await rig.host.wait_status(preparing, "assigning")
    await rig.host.wait_status(vanished, "running")
    await runner.crash()
    await rig.docker.remove(container_name(vanished), force=True)

    await rig.start(config=config)
    lost = await rig.host.wait_final(preparing)
    assert lost.status.value == "failed"
    assert "while preparing" in (lost.message or "")
    gone = await rig.host.wait_final(vanished)
    assert gone.status.value == "failed"
    assert "disappeared" in (gone.message or "")
    with pytest.raises(Exception, match="No such"):
        await rig.docker.inspect(container_name(preparing))


async def test_kill_dash_9_of_a_kr_runner_process(rig, tmp_path):
    """The real thing: ``kr runner`` as a process, SIGKILLed while tasks run, started again."""
    config = rig.config("proc")
    settings = {
        name: getattr(config, name)
        for name in (
            "RUNNER_BIND_IP",
            "HOST_ADDRESS",
            "HOST_PORT",
            "RUNNER_HOSTNAME",
            "CLUSTER_TOKEN",
            "SHARED_DIR",
            "LOCAL_TEMP_DIR",
            "RUNNER_STATE_DIR",
            "HEARTBEAT_INTERVAL_SECONDS",
            "DEFAULT_IMAGE",
        )
    }
    settings["RUNNER_PORT"] = free_port()
    path = tmp_path / "runner_config.py"
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in settings.items()))
    base = f"http://127.0.0.1:{settings['RUNNER_PORT']}"
    hostname = settings["RUNNER_HOSTNAME"]
    log_path = tmp_path / "kr-runner.log"

    async def start() -> trio.Process:
        count = sum(1 for r in rig.host.registrations if r.hostname == hostname)
        proc = await spawn_kr_runner(path, tmp_path, log_path)
        try:
            await rig.host.wait_for(
                lambda: sum(1 for r in rig.host.registrations if r.hostname == hostname) > count, timeout=60
            )
        except BaseException:
            proc.kill()
            raise
        return proc

    ended, alive = new_task_id(), new_task_id()
    proc = await start()
    try:
        async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
            for task in (
                req(ended, "sh", "-c", "echo bye; sleep 2; exit 9"),
                req(alive, "sh", "-c", "echo alive; sleep 300"),
            ):
                resp = await client.post("/api/execute", content=dumps(task))
                assert resp.status_code == 202, resp.text
            await rig.host.wait_status(ended, "running")
            await rig.host.wait_status(alive, "running")

            proc.kill()  # SIGKILL: no cleanup of any kind
            await proc.wait()
            await wait_exited(rig.docker, ended)
            assert rig.host.final(ended) is None

            proc = await start()
            final = await rig.host.wait_final(ended)
            assert (final.status.value, final.exit_code) == ("failed", 9)
            assert (await client.get(f"/api/tasks/{ended}/logs")).text == "bye\n"
            await rig.host.wait_for(
                lambda: alive in (rig.host.last_heartbeat(hostname) or _empty()).running_tasks, timeout=30
            )
            info = (await client.get("/api/info")).json()
            assert str(alive) in info["running_tasks"]

            # SIGTERM is an orderly stop: the process exits, the task container stays up.
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(20):
                assert await proc.wait() == 0
            assert (await rig.docker.inspect(container_name(alive))).state.running
            proc = await start()
            assert (await client.post(f"/api/kill/{alive}")).status_code == 200
            assert (await rig.host.wait_final(alive, timeout=20)).status.value == "killed"
    finally:
        if proc.returncode is None:
            proc.kill()
            with trio.move_on_after(10):
                await proc.wait()
    text = log_path.read_text()
    assert "Traceback" not in text, text[-3000:]


async def spawn_kr_runner(config_path: Path, home: Path, log_path: Path) -> trio.Process:
    env = {**os.environ, "KOHAKURIVER_HOME": str(home / "kr-home")}
    with open(log_path, "ab") as log_file:
        return await trio.lowlevel.open_process(
            [
                sys.executable,
                "-c",
                "from kohakuriver_cli.main import cli; cli()",
                "runner",
                "--config",
                str(config_path),
            ],
            stdout=log_file,
            stderr=log_file,
            env=env,
            # Away from the checkout, as a user runs it: the package is imported as installed.
            cwd=str(home),
        )


def _empty() -> Heartbeat:
    return Heartbeat()
