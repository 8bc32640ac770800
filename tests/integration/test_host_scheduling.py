"""The host's queue, dispatch, runner reports, heartbeat reconciliation, control calls and log proxying,
against a real ``serve_host`` and a stand-in for the runner's HTTP endpoints (see ``_host_harness``)."""

from __future__ import annotations

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from ._host_harness import closed_port_url, executed, fake_runner, quick_host


@pytest.fixture
async def host(tmp_path, monkeypatch):
    async with quick_host(tmp_path, monkeypatch) as h:
        yield h


@pytest.fixture
async def runner(host):
    async with fake_runner(host.cluster_token) as r:
        yield r


async def test_dispatch_report_and_completion(host, runner):
    await host.register("n1", runner.url, cores=4)
    (task_id,) = await host.submit(
        command="python", arguments=["-c", "print(1)"], env_vars={"A": "1"}, required_cores=2, name="job"
    )
    (request,) = await executed(runner)
    assert runner.bad_auth == 0  # the host sent the cluster token
    assert request["task_id"] == task_id and request["command"] == "python"
    assert request["arguments"] == ["-c", "print(1)"] and request["env_vars"] == {"A": "1"}
    assert request["required_cores"] == 2 and request["gpu_ids"] == [] and request["numa_node"] is None
    record = await host.wait_status(task_id, "assigning")
    assert record["assigned_node"] == "n1"

    assert await host.update(task_id, "assigning", message="pulling image: 40%") == {"accepted": True}
    assert (await host.task(task_id))["status_message"] == "pulling image: 40%"
    assert await host.update(task_id, "running", started_at="2025-04-10T08:30:00Z") == {"accepted": True}
    record = await host.task(task_id)
    assert record["status"] == "running" and record["started_at"] == "2025-04-10T08:30:00Z"
    node = await host.ok("GET", "/api/nodes/n1")
    assert node["cores_in_use"] == 2 and node["available_cores"] == 2 and node["running_task_count"] == 1

    assert await host.update(task_id, "failed", exit_code=3) == {"accepted": True}
    record = await host.task(task_id)
    assert record["status"] == "failed" and record["exit_code"] == 3 and record["completed_at"]
    assert record["error_message"] == "exit code 3"
    # A final status is never replaced: a late or repeated report is ignored, not an error.
    assert await host.update(task_id, "completed", exit_code=0) == {"accepted": False}
    assert await host.update(task_id, "running") == {"accepted": False}
    assert await host.update(task_id, "failed", exit_code=3) == {"accepted": True}  # idempotent repeat
    assert (await host.task(task_id))["status"] == "failed"
    assert (await host.ok("GET", "/api/nodes/n1"))["cores_in_use"] == 0


async def test_a_task_that_does_not_fit_waits_and_runs_when_room_frees(host, runner):
    await host.register("n1", runner.url, cores=4, memory=8 << 30)
    (first,) = await host.submit(command="sleep", required_cores=3)
    (second,) = await host.submit(command="sleep", required_cores=2)
    (small,) = await host.submit(command="sleep", required_cores=1)  # backfills next to the first
    await executed(runner, 2)
    await trio.sleep(0.5)
    assert sorted(runner.executed_ids()) == sorted([first, small])
    waiting = await host.task(second)
    assert waiting["status"] == "pending" and waiting["assigned_node"] is None
    assert "more cores" in waiting["status_message"], waiting
    await host.update(first, "running")
    await host.update(first, "completed", exit_code=0)
    await executed(runner, 3)
    assert runner.executed_ids()[2] == second
    assert (await host.wait_status(second, "assigning"))["assigned_node"] == "n1"


async def test_targets_numa_and_gpus_reach_the_runner(host, runner):
    numa = {"0": {"cores": [0, 1, 2, 3]}, "1": {"cores": [4, 5, 6, 7]}}
    await host.register("g1", runner.url, cores=8, gpus=(0, 1, 2), numa=numa)
    (on_numa,) = await host.submit(command="x", targets=["g1:1"], required_cores=4)
    (with_gpus,) = await host.submit(command="x", targets=["g1::0,2"])
    (same_gpu,) = await host.submit(command="x", targets=["g1"], required_gpus=[2])
    await executed(runner, 2)
    await trio.sleep(0.3)
    by_id = {e["task_id"]: e for e in runner.executed}
    assert set(by_id) == {on_numa, with_gpus}
    assert by_id[on_numa]["numa_node"] == 1 and by_id[on_numa]["required_cores"] == 4
    assert by_id[with_gpus]["gpu_ids"] == [0, 2]
    node = await host.ok("GET", "/api/nodes/g1")
    assert node["gpus_in_use"] == [0, 2] and node["cores_in_use"] == 5
    assert "GPU 2 (in use)" in (await host.task(same_gpu))["status_message"]
    await host.ok("POST", f"/api/kill/{with_gpus}")
    await executed(runner, 3)
    assert runner.executed[2]["task_id"] == same_gpu and runner.executed[2]["gpu_ids"] == [2]


async def test_heartbeat_reconciles_tasks(host, runner):
    await host.register("n1", runner.url)
    a, b = await host.submit(command="sleep", targets=["n1", "n1"])
    await executed(runner, 2)
    # The runner lists a (dispatched): it is running. It also lists a task the host never heard of.
    r = await host.heartbeat("n1", running=[a, "4242"])
    assert r.status_code == 200 and r.json() == {"kill": ["4242"]}
    assert (await host.task(a))["status"] == "running"
    assert (await host.task(b))["status"] == "assigning"
    # b ended while its report was lost: the heartbeat's finished_tasks carries it.
    finished = [{"task_id": b, "status": "killed_oom", "exit_code": 137}]
    r = await host.heartbeat("n1", running=[a], finished=finished)
    assert r.json() == {"kill": []}
    record = await host.task(b)
    assert record["status"] == "killed_oom" and "OOM" in record["error_message"]
    # A killed task the runner still runs goes back in the kill list until the runner drops it.
    await host.ok("POST", f"/api/kill/{a}")
    assert ("kill", a) in runner.controls
    assert (await host.heartbeat("n1", running=[a])).json() == {"kill": [a]}
    assert (await host.task(a))["status"] == "killed"
    metrics = await host.ok("GET", "/api/nodes/n1")
    assert metrics["cpu_percent"] == 12.5 and metrics["last_heartbeat"]


async def test_kill_pause_resume_call_the_runner(host, runner):
    await host.register("n1", runner.url)
    (task_id,) = await host.submit(command="sleep")
    await executed(runner)
    assert (await host.call("POST", f"/api/command/{task_id}/pause")).status_code == 409  # not running yet
    await host.update(task_id, "running")
    paused = await host.ok("POST", f"/api/command/{task_id}/pause")
    assert paused["status"] == "paused" and runner.controls[-1] == ("pause", task_id)
    node = await host.ok("GET", "/api/nodes/n1")
    assert node["cores_in_use"] == 1  # a paused task keeps its resources
    resumed = await host.ok("POST", f"/api/command/{task_id}/resume")
    assert resumed["status"] == "running" and runner.controls[-1] == ("resume", task_id)
    killed = await host.ok("POST", f"/api/kill/{task_id}")
    assert killed["status"] == "killed" and runner.controls[-1] == ("kill", task_id)
    assert await host.update(task_id, "killed", exit_code=137) == {"accepted": True}
    record = await host.task(task_id)
    assert record["status"] == "killed" and record["exit_code"] == 137


async def test_queued_kill_never_reaches_a_runner(host, runner):
    (task_id,) = await host.submit(command="sleep")
    await host.ok("POST", f"/api/kill/{task_id}")
    await host.register("n1", runner.url)
    await trio.sleep(0.5)
    assert runner.executed == [] and runner.controls == []


async def test_unreachable_runner_requeues_then_fails(host):
    await host.register("gone", closed_port_url())
    (task_id,) = await host.submit(command="echo")
    record = await host.wait_status(task_id, "failed", timeout=15)
    assert "could not reach node gone (3 attempts)" in record["error_message"]
    assert record["assigned_node"] == "gone"


async def test_runner_that_refuses_fails_the_task_and_503_requeues(host, runner):
    await host.register("n1", runner.url)
    runner.mode = "refuse"
    (refused,) = await host.submit(command="echo")
    record = await host.wait_status(refused, "failed")
    assert "refused the task: no such image" in record["error_message"]
    runner.mode = "error"
    (retried,) = await host.submit(command="echo")
    await executed(runner, 2)
    runner.mode = "accept"
    await executed(runner, 3)
    assert runner.executed_ids()[1:] == [retried, retried]
    await host.wait_status(retried, "assigning")


async def test_a_node_without_docker_gets_no_tasks(host, runner):
    await host.register("n1", runner.url, docker=False)
    (task_id,) = await host.submit(command="echo", targets=["n1"])
    await trio.sleep(0.5)
    assert runner.executed == []
    record = await host.task(task_id)
    assert record["status"] == "pending" and "cannot run containers" in record["status_message"]
    await host.heartbeat("n1", docker=True)  # Docker is back
    await executed(runner)
    await host.heartbeat("n1", docker=False)
    (second,) = await host.submit(command="echo", targets=["n1"])
    await trio.sleep(0.5)
    assert runner.executed_ids() == [task_id]
    assert (await host.task(second))["status"] == "pending"


async def test_stdout_and_stderr_are_proxied(host, runner):
    await host.register("n1", runner.url)
    alice = await host.create_user("alice")
    (task_id,) = await host.submit(alice, command="echo")
    await executed(runner)
    runner.logs[(task_id, "stdout")] = "one\ntwo\nthree\n"
    runner.logs[(task_id, "stderr")] = "warning\n"
    r = await host.call("GET", f"/api/tasks/{task_id}/stdout?lines=2", alice)
    assert (
        r.status_code == 200
        and r.text == "two\nthree\n"
        and r.headers["content-type"].startswith("text/plain")
    )
    assert runner.log_requests[-1] == {"task_id": task_id, "stream": "stdout", "follow": "0", "lines": "2"}
    assert (await host.call("GET", f"/api/tasks/{task_id}/stderr", alice)).text == "warning\n"
    runner.logs.clear()  # the runner has no output for it (never started): empty, not an error
    assert (await host.call("GET", f"/api/tasks/{task_id}/stdout", alice)).text == ""


async def test_follow_websocket_streams_until_the_task_ends(host, runner):
    await host.register("n1", runner.url)
    (task_id,) = await host.submit(command="echo")
    await executed(runner)
    await host.update(task_id, "running")
    runner.logs[(task_id, "stdout")] = "line 1\n"
    feed = runner.follow_channel(task_id)
    url = host.handle.url.replace("http", "ws", 1) + f"/ws/tasks/{task_id}/logs?lines=5"
    headers = [(b"Authorization", f"Bearer {host.admin_token}".encode())]
    received = []
    async with open_websocket_url(url, extra_headers=headers) as ws:
        with trio.fail_after(5):
            received.append(await ws.get_message())
            await feed.send("line 2\n")
            received.append(await ws.get_message())
            await feed.send(b"caf\xc3")  # a chunk boundary inside a UTF-8 character must not garble it
            await feed.send(b"\xa9\n")
            await host.update(task_id, "completed", exit_code=0)
            await feed.aclose()
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    received.append(await ws.get_message())
    assert "".join(received) == "line 1\nline 2\ncaf\u00e9\n"
    assert closed.value.reason.code == 1000
    assert runner.log_requests[-1]["follow"] == "1" and runner.log_requests[-1]["lines"] == "5"
