"""The working cluster, end to end: real `kr host`, `kr runner`, `kr` processes and real Docker containers."""

from __future__ import annotations

import subprocess
import time

import pytest

from .cluster import KR, Cluster, running_cluster, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.docker]


def submit(cluster: Cluster, *argv: str, token: str | None = None) -> str:
    out = cluster.kr("task", "submit", *argv, token=token).stdout.split()
    assert len(out) == 1, out
    return out[0]


def container_state(task_id: str) -> dict | None:
    proc = subprocess.run(
        ["docker", "inspect", "-f", "{{json .State}}", f"kohakuriver-task-{task_id}"],
        capture_output=True, text=True,
    )  # fmt: skip
    if proc.returncode != 0:
        return None
    import json

    return json.loads(proc.stdout)


def test_echo_completes_and_output_is_readable(cluster):
    proc = cluster.kr("task", "submit", "--wait", "--quiet", "--", "echo", "hi there", "; rm -rf /")
    task_id = proc.stdout.split()[0]
    record = cluster.task(task_id)
    assert record["status"] == "completed" and record["exit_code"] == 0
    # The argv arrived untouched: no shell ever saw it.
    assert cluster.kr("task", "logs", task_id).stdout == "hi there ; rm -rf /\n"
    assert cluster.kr("task", "logs", task_id, "--stderr").stdout == ""


def test_nonzero_exit_is_failed_with_code_and_wait_returns_it(cluster):
    argv = ("task", "submit", "--wait", "--quiet", "--", "sh", "-c", "echo oops >&2; exit 3")
    proc = cluster.kr(*argv, check=False)
    assert proc.returncode == 3, proc.stderr
    task_id = proc.stdout.split()[0]
    record = cluster.task(task_id)
    assert record["status"] == "failed" and record["exit_code"] == 3
    assert cluster.kr("task", "logs", task_id, "--stderr").stdout == "oops\n"


def test_wait_shows_the_output_like_docker_run(cluster):
    """`kr task submit --wait`: stdout to stdout, stderr to stderr, each whole and once, then the task's exit
    code; for a task that ends before anything is followed, one that runs a while, and a large output."""
    # Both streams, and the exit code, for a task that is over in milliseconds (it may end before the CLI
    # sees it running: the saved output is then served), several times to meet both orders of events.
    script = "echo out1; echo err1 >&2; echo out2; echo err2 >&2; exit 3"
    for _ in range(3):
        proc = cluster.kr("task", "submit", "--wait", "--", "sh", "-c", script, check=False)
        assert (proc.returncode, proc.stdout, proc.stderr) == (3, "out1\nout2\n", "err1\nerr2\n")
    proc = cluster.kr("task", "submit", "--wait", "--", "echo", "hi")
    assert (proc.stdout, proc.stderr) == ("hi\n", "")
    # A task that is running when the CLI looks: followed live over the WebSockets, then the code.
    script = "echo start; sleep 1.5; echo late >&2; echo end; exit 3"
    proc = cluster.kr("task", "submit", "--wait", "--", "sh", "-c", script, check=False)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "start\nend\n", "late\n")
    # 5 MiB arrives whole, in order, once (live, then the end of the saved output).
    line = "0123456789abcdefghijklmnopqrstuvwxyz" * 3 + "\n"
    size = 5 << 20
    script = f"sleep 1; yes {line[:-1]} | head -c {size}; echo done >&2"
    proc = cluster.kr("task", "submit", "--wait", "--", "sh", "-c", script)
    expected = (line * (size // len(line) + 1))[:size]
    assert len(proc.stdout) == size and proc.stdout == expected
    assert proc.stderr == "done\n"


def kr_bytes(cluster: Cluster, *args: str) -> subprocess.CompletedProcess:
    """`kr` with its output as bytes (``Cluster.kr`` decodes text)."""
    return subprocess.run([KR, *args], env=cluster.env, capture_output=True, timeout=120)


def test_output_that_is_not_utf8_arrives_byte_for_byte(cluster):
    """Invalid UTF-8, and a character split across two writes, reach the user unchanged through
    `kr task submit --wait` (live and saved output) and `kr task logs -f`."""
    out = b"\xff\xfe live\ncaf\xc3\xa9 \x80 end\n"
    script = (
        "printf '\\377\\376 live\\n'; sleep 1.5; printf 'caf\\303'; sleep 0.3; "
        "printf '\\251 \\200 end\\n'; printf '\\377 err\\n' >&2"
    )
    proc = kr_bytes(cluster, "task", "submit", "--wait", "--", "sh", "-c", script)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, out, b"\xff err\n"), proc.stderr
    task_id = submit(cluster, "--", "sh", "-c", script)
    cluster.wait_status(task_id, "running")
    proc = kr_bytes(cluster, "task", "logs", "-f", task_id)
    assert (proc.returncode, proc.stdout) == (0, out), proc.stderr
    assert kr_bytes(cluster, "task", "logs", task_id, "--stderr").stdout == b"\xff err\n"


def test_kill(cluster):
    task_id = submit(cluster, "--", "sleep", "600")
    cluster.wait_status(task_id, "running")
    cluster.kr("task", "kill", task_id)
    record = cluster.wait_status(task_id, "killed", timeout=20)
    assert record["status"] == "killed"
    wait_until(lambda: container_state(task_id) is None, 20, "the container to be removed")


def test_pause_and_resume(cluster):
    task_id = submit(cluster, "--", "sh", "-c", "i=0; while :; do i=$((i+1)); echo $i; sleep 0.2; done")
    cluster.wait_status(task_id, "running")
    cluster.kr("task", "pause", task_id)
    assert cluster.task(task_id)["status"] == "paused"
    assert container_state(task_id)["Paused"] is True
    cluster.kr("task", "resume", task_id)
    assert cluster.task(task_id)["status"] == "running"
    assert container_state(task_id)["Paused"] is False
    cluster.kr("task", "kill", task_id)
    cluster.wait_status(task_id, "killed")


def test_memory_hungry_task_is_killed_oom(cluster):
    task_id = submit(cluster, "-m", "16M", "--", "sh", "-c", "x=a; while :; do x=$x$x; done")
    record = cluster.wait_status(task_id, {"killed_oom", "failed", "completed"}, timeout=90)
    assert record["status"] == "killed_oom", record


def test_task_that_does_not_fit_waits_then_runs(cluster):
    node = cluster.api("GET", f"/api/nodes/{cluster.runner_name(0)}")
    cores = node["total_cores"]
    first = submit(cluster, "-c", str(cores), "--", "sleep", "4")
    cluster.wait_status(first, "running")
    second = submit(cluster, "-c", str(cores), "--", "echo", "second")
    time.sleep(1.5)
    assert cluster.task(second)["status"] == "pending"
    cluster.wait_status(first, "completed", timeout=60)
    cluster.wait_status(second, "completed", timeout=60)
    assert cluster.kr("task", "logs", second).stdout == "second\n"


def test_impossible_request_is_refused_at_submit(cluster):
    proc = cluster.kr("task", "submit", "-c", "100000", "--", "true", check=False)
    assert proc.returncode != 0
    assert "core" in proc.stderr.lower()
    proc = cluster.kr("task", "submit", "-t", "no-such-node", "--", "true", check=False)
    assert proc.returncode != 0 and "no-such-node" in proc.stderr


def test_two_runners_targeted_placement(cluster):
    second = cluster.add_runner(1)
    listed = {n["hostname"] for n in cluster.api("GET", "/api/nodes")}
    assert {cluster.runner_name(0), second} <= listed
    for name in (cluster.runner_name(0), second):
        task_id = submit(cluster, "-t", name, "--", "echo", name)
        record = cluster.wait_status(task_id, "completed")
        assert record["assigned_node"] == name
        assert cluster.kr("task", "logs", task_id).stdout == f"{name}\n"


@pytest.fixture
def slow_liveness_cluster(tmp_path, test_image):
    """Node timeout long enough that a runner restart happens before the host calls the node offline."""
    with running_cluster(tmp_path, heartbeat=1, timeout_factor=60) as c:
        yield c


def test_runner_kill9_and_restart_readopts(slow_liveness_cluster):
    cluster = slow_liveness_cluster
    name = cluster.runner_name(0)
    long_task = submit(cluster, "--", "sleep", "600")
    short_task = submit(cluster, "--", "sh", "-c", "sleep 3; echo done; exit 7")
    cluster.wait_status(long_task, "running")
    cluster.wait_status(short_task, "running")
    cluster.runners[name].kill9()
    time.sleep(5)  # the short task ends while its runner is down
    cluster.runners[name].start()
    record = cluster.wait_status(short_task, "failed", timeout=60)
    assert record["exit_code"] == 7
    assert cluster.kr("task", "logs", short_task).stdout == "done\n"
    assert cluster.task(long_task)["status"] == "running"
    cluster.kr("task", "kill", long_task)
    cluster.wait_status(long_task, "killed")


def test_host_restart_loses_nothing(cluster):
    done = submit(cluster, "--", "echo", "before")
    cluster.wait_status(done, "completed")
    running = submit(cluster, "--", "sh", "-c", "sleep 4; echo after")
    cluster.wait_status(running, "running")
    cluster.host.stop()
    cluster.host.start()
    wait_until(lambda: cluster.api("GET", "/api/health", check=False), 30, "the host to come back")
    assert cluster.task(done)["status"] == "completed"
    cluster.wait_status(running, "completed", timeout=60)
    assert cluster.kr("task", "logs", running).stdout == "after\n"
    listed = {t["task_id"] for t in cluster.api("GET", "/api/tasks")["tasks"]}
    assert {done, running} <= listed


def test_unauthenticated_and_cross_user_requests_are_refused(cluster):
    alice = cluster.api("POST", "/api/auth/users", json={"username": "alice", "role": "user"})["token"]
    bob = cluster.api("POST", "/api/auth/users", json={"username": "bob", "role": "user"})["token"]
    task_id = submit(cluster, "--", "sleep", "600", token=alice)
    cluster.wait_status(task_id, "running")
    # No token at all.
    import httpx

    for method, path in [("GET", f"/api/status/{task_id}"), ("GET", "/api/tasks"), ("GET", "/api/nodes"),
                         ("POST", f"/api/kill/{task_id}"), ("POST", "/api/submit")]:  # fmt: skip
        assert httpx.request(method, f"{cluster.url}{path}").status_code == 401, path
    # Bob cannot see or touch Alice's task, through the CLI or the API.
    proc = cluster.kr("task", "status", task_id, token=bob, check=False)
    assert proc.returncode == 3, proc.stderr
    proc = cluster.kr("task", "kill", task_id, token=bob, check=False)
    assert proc.returncode == 3
    assert cluster.task(task_id)["status"] == "running"
    cluster.kr("task", "kill", task_id, token=alice)
    cluster.wait_status(task_id, "killed")


def test_sigterm_stops_daemons_cleanly(cluster):
    name = cluster.runner_name(0)
    assert cluster.runners[name].stop() == 0
    assert cluster.host.stop() == 0
